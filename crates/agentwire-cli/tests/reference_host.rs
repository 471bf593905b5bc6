//! Their host, our agent: the published reference host client,
//! `microsandbox-agent-client` 0.7.13 (a dev-dependency only), connects to
//! `agentwire relay` and drives `agentwire agent` behind it. Each test starts
//! its own agent and relay on Unix sockets in a temporary directory and talks
//! to them only through the reference client's public API: `AgentClient::connect`
//! on the relay's socket, `request` / `stream` / `send` with the reference's own
//! payload types (`microsandbox-protocol` 0.7.13), and `write_unchecked` for the
//! one id-0 frame a client may send, `core.shutdown`.
//!
//! Both sides are at generation 10. Unless a test says otherwise the relay's
//! `core.bootstrap` carries the execution policy the 0.7.13 runtime always
//! sends (`ExecLimits::default()`), so our agent advertises it in `core.ready`
//! and every execution is controlled: the helpers acknowledge output as their
//! client's callers must (spec 8). The tests at the end show the generation-10
//! mechanisms themselves: output held at the allowance and released by
//! acknowledgements, the exit held for the last one, stdin bounded by
//! `core.exec.stdin.ack`, admission, the legacy path without a policy, and
//! files and TCP over raw bulk records with credits (spec 7) through the SDK
//! connection type's bulk primitives.
//!
//! Everything waits under a deadline, so that a frame that never comes fails
//! the test instead of hanging it.

mod common;

use common::TempDir as Tmp;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microsandbox_agent_client::stream::StreamReceiver;
use microsandbox_agent_client::{
    AgentClient, AgentFrame, AgentProtocol, AgentWireFormat, ExecController, OptimizedAgentClient, TypedMessage,
};
use microsandbox_protocol::bulk::{
    BULK_FLOW_MASK_GUEST_TO_HOST, BULK_FLOW_MASK_HOST_TO_GUEST, BulkAccepted, BulkCancel, BulkCancelReason, BulkCredit,
    BulkFinish, BulkFlow, BulkKind, BulkOffer, BulkReceiveState, BulkRecord, BulkSendState,
    DEFAULT_BULK_RECORD_PAYLOAD, DEFAULT_BULK_WINDOW, MAX_BULK_RECORD_PAYLOAD,
};
use microsandbox_protocol::core::Ping;
use microsandbox_protocol::exec::{
    ExecExited, ExecFailureKind, ExecLimits, ExecOutputAck, ExecResize, ExecSignal, ExecStderr, ExecStdin, ExecStdout,
};
use microsandbox_protocol::fs::{FS_CHUNK_SIZE, FsData, FsOp, FsOpenOptions, FsRequest, FsResponse, FsResponseData};
use microsandbox_protocol::message::{FLAG_TERMINAL, Message as WireMessage, MessageType};
use microsandbox_protocol::tcp::{TcpConnect, TcpData, TcpEof, TcpFailed};

const BIN: &str = env!("CARGO_BIN_EXE_agentwire");

/// `agentwire agent` and `agentwire relay` in front of it, both killed on drop.
struct Relay {
    agent: Child,
    relay: Child,
    socket: PathBuf,
    root: PathBuf,
    /// What the relay wrote on standard error (it runs with `-v`).
    log: Arc<Mutex<String>>,
    _tmp: Tmp,
}

impl Relay {
    /// As the 0.7.13 runtime starts a sandbox: its bootstrap carries the
    /// runtime's fixed execution policy (`ExecLimits::default()`), which the
    /// agent advertises in `core.ready`, so executions are controlled (spec 8).
    fn start(tag: &str) -> Relay {
        Relay::start_with(tag, Some(ExecLimits::default()))
    }

    /// With `limits` in the relay's `core.bootstrap`, or none at all (then
    /// the relay sends the default bootstrap, without a policy).
    fn start_with(tag: &str, limits: Option<ExecLimits>) -> Relay {
        let tmp = Tmp::new(tag);
        let root = tmp.0.join("root");
        std::fs::create_dir(&root).unwrap();
        let agent_socket = tmp.0.join("agent.sock");
        let agent = Command::new(BIN)
            .args(["agent", "--listen"])
            .arg(&agent_socket)
            .arg("--root")
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        common::wait_listening(&agent_socket);
        let socket = tmp.0.join("relay.sock");
        let bootstrap = limits.map(|limits| {
            // The relay reads its bootstrap as JSON with GuestBootstrap's field names.
            let path = tmp.0.join("bootstrap.json");
            std::fs::write(&path, serde_json::json!({ "exec_limits": limits }).to_string()).unwrap();
            path
        });
        let started = common::start_relay(&agent_socket, &socket, bootstrap.as_deref(), Duration::from_secs(20));
        let (relay, log) = started.unwrap_or_else(|log| panic!("the relay did not become ready:\n{log}"));
        Relay { agent, relay, socket, root, log, _tmp: tmp }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Their client, connected to our relay's socket by path.
    async fn client(&self) -> AgentClient {
        let connect = AgentClient::connect_with(&self.socket, |o| o.setup_timeout(Duration::from_secs(20)));
        match within(30, "connecting", connect).await {
            Ok(client) => client,
            Err(e) => panic!("their client cannot connect to our relay: {e}\n{}", self.log()),
        }
    }

    /// Whether the relay process has exited, waiting up to `secs`.
    fn exited_within(&mut self, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.relay.try_wait().unwrap().is_some() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if std::env::var_os("REFHOST_RELAY_LOG").is_some() {
            eprintln!("--- the relay's log:\n{}", self.log());
        }
        for child in [&mut self.relay, &mut self.agent] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `f`, which must finish within `secs`.
#[path = "common/their_client.rs"]
mod their_client;

use their_client::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_client_takes_our_prologue_and_pings() {
    let relay = Relay::start("refhost-ping");
    let client = relay.client().await;
    let ready = client.ready();
    assert_eq!(ready.wire_format, AgentWireFormat::Current, "the [id_min][id_max] prologue, not the pre-0.5 one");
    // Their client negotiates the lower of its generation (10) and our agent's:
    // both speak 10, so nothing is gated off.
    assert_eq!(agentwire::version::PROTOCOL_VERSION, 10, "our agent's generation");
    assert_eq!(ready.negotiated_version, 10, "negotiated generation");
    assert_eq!(ready.ready_bytes()[..4], [0xa3, 0x61, 0x76, 10], "core.ready's envelope begins map(3), \"v\": 10");
    assert!(!ready.agent_version().is_empty(), "core.ready names the agent's version");
    // The policy of the relay's bootstrap, as their client decoded it from our core.ready.
    assert_eq!(ready.agent.exec_limits, Some(ExecLimits::default()), "Ready.exec_limits");
    for t in [MessageType::ExecOutputAck, MessageType::BulkCredit, MessageType::BulkFinish, MessageType::BulkCancel] {
        assert!(ready.supports(t), "{t:?} is open at the negotiated generation");
    }
    // No host-side signal path is advertised, so their SDK signals in-band.
    assert!(ExecController::from_ready_body(ready.ready_bytes()).unwrap().is_none());
    for _ in 0..3 {
        let pong = within(20, "a ping", client.request(TypedMessage::new(MessageType::Ping, Ping {}))).await.unwrap();
        assert_eq!(pong.t, "core.pong");
        assert_ne!(pong.flags & FLAG_TERMINAL, 0);
        assert_eq!(pong.p, [0xa0], "an empty map");
    }
    // A generation-10 frame passes their client's gate, and an ack of nothing
    // is ignored by our agent (no error frame): the execution ends normally.
    let exec = Exec::start(&client, &exec_request("true", &[])).await;
    let ack = TypedMessage::new(MessageType::ExecOutputAck, ExecOutputAck { consumed: 0 });
    client.send(exec.id, ack).await.expect("core.exec.output.ack goes out at generation 10");
    let out = exec.finish(&client).await;
    assert_eq!(out.exit, Some(0), "{out:?}");
    assert!(out.other.is_empty(), "{out:?}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_stdin_stdout_stderr_and_an_exit_code() {
    let relay = Relay::start("refhost-exec");
    let client = relay.client().await;
    let mut exec = Exec::start(&client, &exec_request("sh", &["-c", "cat; echo err >&2; exit 3"])).await;
    exec.started(&client).await;
    exec.stdin(&client, b"hello from their host\n").await;
    exec.stdin(&client, b"second line\n").await;
    exec.stdin(&client, b"").await; // EOF
    let out = exec.finish(&client).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from their host\nsecond line\n", "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n", "{out:?}");
    assert_eq!(out.exit, Some(3), "{out:?}");
    assert!(out.failed.is_none() && out.other.is_empty() && out.stdin_errors.is_empty(), "{out:?}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_program_fails_with_not_found() {
    let relay = Relay::start("refhost-notfound");
    let client = relay.client().await;
    for cmd in ["agentwire-no-such-program", "/nonexistent/agentwire-no-such-program"] {
        let exec = Exec::start(&client, &exec_request(cmd, &["x"])).await;
        let out = exec.finish(&client).await;
        let failed = out.failed.as_ref().unwrap_or_else(|| panic!("{cmd}: no core.exec.failed: {out:?}"));
        assert_eq!(failed.kind, ExecFailureKind::NotFound, "{cmd}: {failed:?}");
        assert!(out.pid.is_none() && out.exit.is_none(), "{cmd}: {out:?}");
    }
    // The connection goes on.
    let pong = within(20, "a ping", client.request(TypedMessage::new(MessageType::Ping, Ping {}))).await.unwrap();
    assert_eq!(pong.t, "core.pong");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_ends_a_running_command_with_minus_one() {
    let relay = Relay::start("refhost-signal");
    let client = relay.client().await;
    let mut exec = Exec::start(&client, &exec_request("sleep", &["60"])).await;
    let pid = exec.started(&client).await;
    assert!(alive(pid));
    let signal = TypedMessage::new(MessageType::ExecSignal, ExecSignal { signal: 15 });
    client.send(exec.id, signal).await.expect("core.exec.signal goes out");
    let out = exec.finish(&client).await;
    assert_eq!(out.exit, Some(-1), "killed by a signal: {out:?}");
    wait_for(10, "the signalled command's end", || !alive(pid)).await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_write_read_stat_list_mkdir_remove_of_five_mib() {
    let relay = Relay::start("refhost-fs");
    let client = relay.client().await;
    let size = 5 * 1024 * 1024;
    let content: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();

    fs_ok(&client, FsOp::Mkdir { path: "/data".into(), mode: Some(0o755), user: None }).await;
    assert!(relay.root.join("data").is_dir());

    // Write: open, stream the bytes in FS_CHUNK_SIZE chunks and an empty one, close.
    let write = FsOpenOptions { write: true, create: true, truncate: true, mode: Some(0o644), ..Default::default() };
    let handle = open(&client, "/data/big.bin", write).await;
    let op = FsOp::Write { handle, offset: 0, len: Some(size as u64) };
    let stream = within(
        20,
        "opening the write",
        client.stream(TypedMessage::new(MessageType::FsRequest, FsRequest { op, bulk: None })),
    )
    .await
    .unwrap();
    let (sender, mut rx) = stream.into_parts();
    for chunk in content.chunks(FS_CHUNK_SIZE).chain([&[][..]]) {
        let m = TypedMessage::new(MessageType::FsData, FsData { data: chunk.to_vec() });
        within(20, "a core.fs.data", sender.send(m)).await.expect("core.fs.data goes out");
    }
    let reply = within(30, "the write's response", rx.recv()).await.unwrap().expect("a core.fs.response");
    assert_eq!(reply.t, "core.fs.response");
    let response = reply.payload::<FsResponse>().unwrap();
    assert!(response.ok, "the write: {:?}", response.error);
    fs_ok(&client, FsOp::CloseHandle { handle }).await;
    assert_eq!(std::fs::read(relay.root.join("data/big.bin")).unwrap(), content, "the bytes on disk");

    // Stat and list.
    match fs_ok(&client, FsOp::Stat { path: "/data/big.bin".into(), follow_symlink: true }).await {
        Some(FsResponseData::Stat(info)) => {
            assert_eq!((info.kind.as_str(), info.size, info.mode & 0o777), ("file", size as u64, 0o644), "{info:?}")
        }
        other => panic!("Stat: {other:?}"),
    }
    match fs_ok(&client, FsOp::List { path: "/data".into() }).await {
        Some(FsResponseData::List(entries)) => {
            let names: Vec<_> = entries.iter().map(|e| (e.path.as_str(), e.size)).collect();
            assert!(
                entries.len() == 1 && entries[0].path.ends_with("big.bin") && entries[0].size == size as u64,
                "{names:?}"
            );
        }
        other => panic!("List: {other:?}"),
    }

    // Read it back, streamed.
    let handle = open(&client, "/data/big.bin", FsOpenOptions { read: true, ..Default::default() }).await;
    let op = FsOp::Read { handle, offset: 0, len: None };
    let stream = within(
        20,
        "opening the read",
        client.stream(TypedMessage::new(MessageType::FsRequest, FsRequest { op, bulk: None })),
    )
    .await
    .unwrap();
    let (_sender, mut rx) = stream.into_parts();
    let mut read = Vec::new();
    let response = within(30, "the read", async {
        loop {
            let m = rx.recv().await.unwrap().expect("the read's frames");
            match m.t.as_str() {
                "core.fs.data" => read.extend(m.payload::<FsData>().unwrap().data),
                "core.fs.response" => break m.payload::<FsResponse>().unwrap(),
                other => panic!("{other} in a read"),
            }
        }
    })
    .await;
    assert!(response.ok, "the read: {:?}", response.error);
    assert_eq!(read.len(), size);
    assert!(read == content, "the bytes read back differ");
    fs_ok(&client, FsOp::CloseHandle { handle }).await;

    // Remove the file, then the directory; both are gone.
    fs_ok(&client, FsOp::Remove { path: "/data/big.bin".into() }).await;
    let gone = fs(&client, FsOp::Stat { path: "/data/big.bin".into(), follow_symlink: true }).await;
    assert!(!gone.ok && gone.error.is_some(), "{gone:?}");
    fs_ok(&client, FsOp::RemoveDir { path: "/data".into(), recursive: false }).await;
    assert!(!relay.root.join("data").exists());
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_through_the_agent() {
    let relay = Relay::start("refhost-tcp");
    let client = relay.client().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Echoes until the peer's EOF, then closes its side.
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 65536];
        let mut total = 0usize;
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    conn.write_all(&buf[..n]).unwrap();
                    total += n;
                }
                Err(e) => panic!("the echo server: {e}"),
            }
        }
        total
    });

    let connect = TcpConnect { host: "127.0.0.1".into(), port, bulk: None };
    let stream = within(20, "core.tcp.connect", client.stream(TypedMessage::new(MessageType::TcpConnect, connect)))
        .await
        .unwrap();
    let id = stream.id();
    let (_sender, mut rx) = stream.into_parts();
    let first = within(20, "core.tcp.connected", rx.recv()).await.unwrap().expect("an answer");
    if first.t == "core.tcp.failed" {
        panic!("core.tcp.failed: {}", first.payload::<TcpFailed>().unwrap().error);
    }
    assert_eq!(first.t, "core.tcp.connected");

    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 253) as u8).collect();
    for chunk in payload.chunks(60 * 1024) {
        let m = TypedMessage::new(MessageType::TcpData, TcpData { data: chunk.to_vec() });
        client.send(id, m).await.expect("core.tcp.data goes out");
    }
    client.send(id, TypedMessage::new(MessageType::TcpEof, TcpEof {})).await.expect("core.tcp.eof goes out");

    let mut echoed = Vec::new();
    let mut seen = Vec::new();
    within(30, "the echo, the agent's core.tcp.eof and core.tcp.closed", async {
        while let Some(m) = rx.recv().await.unwrap() {
            match m.t.as_str() {
                "core.tcp.data" => echoed.extend(m.payload::<TcpData>().unwrap().data),
                other => seen.push(other.to_string()),
            }
        }
    })
    .await;
    assert_eq!(server.join().unwrap(), payload.len());
    assert!(echoed == payload, "{} bytes echoed of {}", echoed.len(), payload.len());
    assert_eq!(seen, ["core.tcp.eof", "core.tcp.closed"], "after the echo");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_takes_its_running_command_with_it() {
    let relay = Relay::start("refhost-leave");
    let stays = relay.client().await;
    let leaves = relay.client().await;
    let mut mine = Exec::start(&stays, &exec_request("sleep", &["60"])).await;
    let my_pid = mine.started(&stays).await;
    let mut theirs = Exec::start(&leaves, &exec_request("sleep", &["61"])).await;
    let their_pid = theirs.started(&leaves).await;
    // Two slots, two ranges of width STEP.
    let step = u32::MAX / 128;
    assert_ne!(mine.id / step, theirs.id / step, "ids {} and {} are in one slot", mine.id, theirs.id);

    leaves.close().await;
    drop(theirs);
    drop(leaves);
    wait_for(10, "the leaving client's command to be killed", || !alive(their_pid)).await;
    assert!(alive(my_pid), "the other client's command is left alone");
    let pong = within(20, "a ping", stays.request(TypedMessage::new(MessageType::Ping, Ping {}))).await.unwrap();
    assert_eq!(pong.t, "core.pong");

    // A new client gets the freed slot and works.
    let again = relay.client().await;
    let pong = within(20, "a ping", again.request(TypedMessage::new(MessageType::Ping, Ping {}))).await.unwrap();
    assert_eq!(pong.t, "core.pong");

    stays.send(mine.id, TypedMessage::new(MessageType::ExecSignal, ExecSignal { signal: 9 })).await.unwrap();
    let out = mine.finish(&stays).await;
    assert_eq!(out.exit, Some(-1), "{out:?}");
    stays.close().await;
    again.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_running_commands_and_the_connection() {
    let mut relay = Relay::start("refhost-shutdown");
    let client = relay.client().await;
    let mut exec = Exec::start(&client, &exec_request("sleep", &["60"])).await;
    let pid = exec.started(&client).await;

    // core.shutdown: id 0, flags SHUTDOWN, payload CBOR null; the one id-0
    // frame a client may send, so it goes out as exact bytes.
    let mut packet = Vec::new();
    microsandbox_protocol::codec::encode_to_buf(&WireMessage::new(MessageType::Shutdown, 0, vec![0xf6]), &mut packet)
        .unwrap();
    assert_eq!(packet[8], 0x04, "flags SHUTDOWN");
    client.write_unchecked(packet).await.expect("core.shutdown goes out");

    wait_for(10, "the running command's end after core.shutdown", || !alive(pid)).await;
    // No reply is due to core.shutdown. The execution's stream ends either
    // with core.exec.exited -1 (a SIGTERM'd child, if the agent still reports
    // it) or without a terminal frame, when the connection goes first.
    let end = within(20, "the end of the execution's stream", async {
        loop {
            match exec.step_or_end().await {
                Ok(true) => continue,
                other => break other,
            }
        }
    })
    .await;
    if end.is_ok() {
        assert_eq!(exec.out.exit, Some(-1), "{:?}", exec.out);
    }
    within(20, "the connection's end", client.closed()).await;
    assert!(relay.exited_within(10), "the relay ends with the agent's connection:\n{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_exec_with_a_resize() {
    let relay = Relay::start("refhost-pty");
    let client = relay.client().await;
    let mut request = exec_request("sh", &["-c", "stty size; read line; stty size; exit 4"]);
    request.tty = true;
    request.rows = 30;
    request.cols = 100;
    let mut exec = Exec::start(&client, &request).await;
    within(20, "core.exec.started", async {
        while exec.out.pid.is_none() && exec.out.failed.is_none() && exec.step(&client).await {}
    })
    .await;
    if let Some(failed) = &exec.out.failed {
        panic!("tty: true refused: {failed:?}");
    }
    within(20, "the first size", async {
        while !String::from_utf8_lossy(&exec.out.stdout).contains("30 100") {
            assert!(exec.step(&client).await, "ended early: {:?}", exec.out);
        }
    })
    .await;
    let resize = TypedMessage::new(MessageType::ExecResize, ExecResize { rows: 50, cols: 132 });
    client.send(exec.id, resize).await.expect("core.exec.resize goes out");
    exec.stdin(&client, b"go\r").await;
    let out = exec.finish(&client).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("30 100") && text.contains("50 132"), "{text:?}");
    assert!(out.stderr.is_empty(), "a terminal has no separate stderr: {out:?}");
    assert_eq!(out.exit, Some(4), "{out:?}");
    client.close().await;
}

/// Spec section 6: slot `s` owns `[s·STEP + 1, (s+1)·STEP)`; multiples of STEP
/// are never assigned (the 0.7.13 agent lets an id outside every canonical
/// range use no file handle, and stops on a disconnect notice whose range is
/// not canonical). Their client takes the first id of its range from our
/// prologue, so its first id in the second slot shows what we hand out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_slot_never_gets_a_multiple_of_step() {
    let relay = Relay::start("refhost-slot");
    let _first = relay.client().await;
    let second = relay.client().await;
    let exec = Exec::start(&second, &exec_request("true", &[])).await;
    let step = u32::MAX / 128;
    assert_eq!(exec.id, step + 1, "the second slot's first id");
    let out = exec.finish(&second).await;
    assert_eq!(out.exit, Some(0), "{out:?}");
}

/// The SDK's own connection type (`OptimizedAgentClient`, doc-hidden in the
/// crate, what the `microsandbox` SDK uses): our `core.ready` has no
/// `local_transport`, so it makes no shared-memory upgrade and stays in-band.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_connection_type_also_runs_a_command() {
    let relay = Relay::start("refhost-sdk");
    let client = within(30, "connecting", OptimizedAgentClient::connect(&relay.socket)).await.expect("it connects");
    assert_eq!(client.negotiated_version(), 10);
    // The policy is advertised, so executions are controlled: output is acknowledged.
    assert_eq!(client.ready().unwrap().exec_limits, Some(ExecLimits::default()));
    let pong = within(20, "a ping", client.request(MessageType::Ping, &Ping {})).await.unwrap();
    assert_eq!(pong.t, MessageType::Pong);
    let request = exec_request("sh", &["-c", "read x; echo \"got $x\"; echo oops >&2; exit 5"]);
    let (id, mut rx) = within(20, "the exec", client.stream(MessageType::ExecRequest, &request)).await.unwrap();
    client.send(id, MessageType::ExecStdin, &ExecStdin { data: b"it\n".to_vec() }).await.unwrap();
    let (mut stdout, mut stderr, mut exit, mut acked) = (Vec::new(), Vec::new(), None, ExecOutputAck::default());
    within(20, "the execution's end", async {
        while let Some(m) = rx.recv().await {
            let data = match m.t {
                MessageType::ExecStdout => Some(m.payload::<ExecStdout>().unwrap().data),
                MessageType::ExecStderr => Some(m.payload::<ExecStderr>().unwrap().data),
                MessageType::ExecExited => {
                    exit = Some(m.payload::<ExecExited>().unwrap().code);
                    None
                }
                _ => None,
            };
            if let Some(data) = data {
                acked.consume(data.len()).unwrap();
                client.send(id, MessageType::ExecOutputAck, &acked).await.expect("core.exec.output.ack goes out");
                if m.t == MessageType::ExecStdout { &mut stdout } else { &mut stderr }.extend(data);
            }
            if m.flags & FLAG_TERMINAL != 0 {
                break;
            }
        }
    })
    .await;
    assert_eq!((&stdout[..], &stderr[..], exit), (&b"got it\n"[..], &b"oops\n"[..], Some(5)));
    client.close().await;
}

// ---------------------------------------------------------------------------
// Generation 10 with its mechanisms: execution flow control (spec 8) under the
// policy of the relay's bootstrap, and raw bulk records with credits (spec 7)
// through their SDK connection type's bulk primitives (`stream_frames`,
// `send_bulk`, `cancel_bulk`) and their protocol crate's per-flow state
// (`BulkSendState`, `BulkReceiveState`), which check every record, credit and
// finish our agent sends.

/// `n` bytes of a pattern that does not repeat with any record size used here.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + i / 65521) as u8).collect()
}

/// The next message on `rx`, or `None` when nothing comes within `wait`.
async fn next_within(
    rx: &mut StreamReceiver<AgentProtocol>,
    wait: Duration,
) -> Option<microsandbox_agent_client::message::Message> {
    match tokio::time::timeout(wait, rx.recv()).await {
        Ok(Ok(Some(m))) => Some(m),
        Ok(Ok(None)) => panic!("the stream ended"),
        Ok(Err(e)) => panic!("the stream failed: {e}"),
        Err(_) => None,
    }
}

fn output_of(m: &microsandbox_agent_client::message::Message) -> Option<(bool, Vec<u8>)> {
    match m.t.as_str() {
        "core.exec.stdout" => Some((true, m.payload::<ExecStdout>().unwrap().data)),
        "core.exec.stderr" => Some((false, m.payload::<ExecStderr>().unwrap().data)),
        _ => None,
    }
}

/// Output above the allowance (4 MiB of stdout and 1 MiB of stderr against
/// an `output_limit` of 1 MiB): with no acknowledgement our agent publishes
/// up to the allowance and then holds the rest, the exit included; with their
/// SDK's own coalescing acknowledger (`OutputAcknowledgements`) running, the
/// rest arrives intact in `output_chunk_size` chunks, never more than the
/// allowance unacknowledged, then the exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlled_output_above_the_limit_is_held_until_acknowledged_and_arrives_intact() {
    use microsandbox_agent_client::OutputAcknowledgements;
    use std::sync::atomic::{AtomicU64, Ordering};

    let relay = Relay::start("refhost-output");
    let client = relay.client().await;
    let limits = client.ready().agent.exec_limits.expect("core.ready carries the bootstrap's exec_limits");
    let (limit, chunk, overhead) = (limits.output_limit as u64, limits.output_chunk_size as u64, 256u64);
    let stdout_data = pattern(4 * 1024 * 1024 + 5);
    let stderr_data: Vec<u8> = pattern(1024 * 1024 + 3).into_iter().rev().collect();
    std::fs::write(relay.root.join("out.bin"), &stdout_data).unwrap();
    std::fs::write(relay.root.join("err.bin"), &stderr_data).unwrap();
    let script = format!(
        "cat '{}'; cat '{}' >&2; exit 7",
        relay.root.join("out.bin").display(),
        relay.root.join("err.bin").display()
    );
    let exec = Exec::start(&client, &exec_request("sh", &["-c", &script])).await;
    let (id, mut rx) = (exec.id, exec.rx);

    let (mut stdout, mut stderr, mut charge, mut frames) = (Vec::new(), Vec::new(), 0u64, 0usize);
    let mut take = |m: &microsandbox_agent_client::message::Message, acked: u64| -> Option<usize> {
        let (is_stdout, data) = output_of(m)?;
        assert!(!data.is_empty() && data.len() as u64 <= chunk, "a chunk of {} bytes (at most {chunk})", data.len());
        charge += data.len() as u64 + overhead;
        assert!(charge - acked <= limit, "{} of charge unacknowledged, above output_limit {limit}", charge - acked);
        frames += 1;
        let n = data.len();
        if is_stdout { &mut stdout } else { &mut stderr }.extend_from_slice(&data);
        Some(n)
    };

    // Phase 1, no acknowledgement: output up to the allowance, then nothing.
    let started = next_within(&mut rx, Duration::from_secs(20)).await.expect("core.exec.started");
    assert_eq!(started.t, "core.exec.started");
    let (mut consumed, mut held_at) = (Vec::new(), 0u64);
    // While a whole chunk's charge still fits, more must come (cat has plenty)...
    while held_at + chunk + overhead <= limit {
        let m = next_within(&mut rx, Duration::from_secs(30)).await.unwrap_or_else(|| {
            panic!("output stopped at a charge of {held_at}, below the allowance {limit} (chunks of {chunk})")
        });
        let n = take(&m, 0).unwrap_or_else(|| panic!("{} before the allowance is used", m.t));
        consumed.push(n);
        held_at += n as u64 + overhead;
    }
    // ... and then nothing more: no chunk past the allowance (take checks), no exit.
    while let Some(m) = next_within(&mut rx, Duration::from_secs(2)).await {
        let n = take(&m, 0).unwrap_or_else(|| panic!("{} while the allowance is used up", m.t));
        consumed.push(n);
        held_at += n as u64 + overhead;
    }
    assert!(held_at <= limit, "published a charge of {held_at} with no acknowledgement, above {limit}");

    // Phase 2: their acknowledger sends the cumulative charge as it is consumed.
    let acks = OutputAcknowledgements::default();
    let consumer = acks.consumed.clone();
    let sent_ack = Arc::new(AtomicU64::new(0));
    let (ack_client, ack_sent) = (client.clone(), sent_ack.clone());
    let acker = tokio::spawn(acks.run(move |ack: ExecOutputAck| {
        let (client, sent) = (ack_client.clone(), ack_sent.clone());
        async move {
            // Recorded before it goes out: the agent can only have seen less.
            sent.fetch_max(ack.consumed, Ordering::SeqCst);
            client.send(id, TypedMessage::new(MessageType::ExecOutputAck, ack)).await
        }
    }));
    let mut published = held_at;
    for n in consumed {
        consumer.send_modify(|a| a.consume(n).unwrap());
    }
    let exit = within(120, "the rest of the output and the exit", async {
        loop {
            let m = match rx.recv().await {
                Ok(Some(m)) => m,
                other => panic!("the stream ended without core.exec.exited: {:?}", other.map(|m| m.map(|m| m.t))),
            };
            if let Some(n) = take(&m, sent_ack.load(Ordering::SeqCst)) {
                consumer.send_modify(|a| a.consume(n).unwrap());
                published += n as u64 + overhead;
                continue;
            }
            assert_eq!(m.t, "core.exec.exited", "only output, then the exit");
            assert_ne!(m.flags & FLAG_TERMINAL, 0);
            // Held until the agent had the acknowledgement of every chunk it
            // published: an acknowledgement it has seen was recorded here first.
            assert_eq!(sent_ack.load(Ordering::SeqCst), published, "the exit came before the last acknowledgement");
            break m.payload::<ExecExited>().unwrap().code;
        }
    })
    .await;
    drop(consumer);
    within(20, "the last acknowledgement", acker).await.unwrap().expect("the acknowledgements go out");
    assert_eq!(exit, 7);
    assert_eq!(published, charge);
    assert_eq!((stdout.len(), stderr.len()), (stdout_data.len(), stderr_data.len()));
    assert!(stdout == stdout_data && stderr == stderr_data, "the output arrives intact");
    assert!(frames as u64 >= (stdout_data.len() as u64).div_ceil(chunk), "{frames} output frames");
    client.close().await;
}

/// `core.exec.exited` waits for the acknowledgement of the last chunk (spec
/// 8, "Exit"): a command that writes a little and exits is not reported as
/// ended until the host has acknowledged all it published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exit_waits_for_the_last_acknowledgement() {
    let relay = Relay::start("refhost-exit-ack");
    let client = relay.client().await;
    let exec = Exec::start(&client, &exec_request("sh", &["-c", "printf 'a few bytes'; exit 3"])).await;
    let (id, mut rx) = (exec.id, exec.rx);
    let mut output = Vec::new();
    let mut ack = ExecOutputAck::default();
    let mut take = |m: microsandbox_agent_client::message::Message| match output_of(&m) {
        Some((_, data)) => {
            ack.consume(data.len()).unwrap();
            output.extend(data);
        }
        None => assert_eq!(m.t, "core.exec.started", "nothing but output before the acknowledgement"),
    };
    let mut expected_len = 0;
    while expected_len < b"a few bytes".len() {
        let m = next_within(&mut rx, Duration::from_secs(30)).await.expect("the output");
        expected_len += output_of(&m).map_or(0, |(_, d)| d.len());
        take(m);
    }
    // The command has ended by now; its exit is held.
    while let Some(m) = next_within(&mut rx, Duration::from_secs(2)).await {
        take(m);
    }
    assert_eq!(output, b"a few bytes", "all the output came, and no exit");
    client.send(id, TypedMessage::new(MessageType::ExecOutputAck, ack)).await.expect("core.exec.output.ack goes out");
    let m = next_within(&mut rx, Duration::from_secs(20)).await.expect("the exit after the acknowledgement");
    assert_eq!((m.t.as_str(), m.payload::<ExecExited>().unwrap().code), ("core.exec.exited", 3));
    client.close().await;
}

/// Stdin larger than `input_limit` (1 MiB against 64 KiB) through `cat`, in
/// `stdin_chunk_size` chunks, never more than `input_limit` unacknowledged:
/// our agent's `core.exec.stdin.ack`s let it all through, strictly
/// increasing up to the total; a chunk above `stdin_chunk_size` is dropped
/// with `core.exec.stdin.error` and the execution goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlled_stdin_above_the_limit_goes_through_cat_with_acknowledgements() {
    let relay = Relay::start("refhost-stdin");
    let client = relay.client().await;
    let limits = client.ready().agent.exec_limits.expect("core.ready carries the bootstrap's exec_limits");
    let input = pattern(1024 * 1024 + 17);
    let mut exec = Exec::start(&client, &exec_request("cat", &[])).await;
    assert!(exec.metered, "their client sees the policy: output is acknowledged");
    exec.started(&client).await;

    // One chunk too large: refused, nothing of it reaches the child.
    exec.stdin(&client, &vec![b'X'; limits.stdin_chunk_size as usize + 1]).await;
    within(20, "core.exec.stdin.error", async {
        while exec.out.stdin_errors.is_empty() {
            assert!(exec.step(&client).await, "ended early: {:?}", exec.out);
        }
    })
    .await;

    let sent = exec.stdin_within(&client, &input, limits.stdin_chunk_size as usize, limits.input_limit as u64).await;
    assert_eq!(sent, input.len() as u64);
    within(60, "the last stdin acknowledgement", async {
        while exec.stdin_acked() < sent {
            assert!(exec.step(&client).await, "ended early: {:?}", exec.out.stdin_acks.last());
        }
    })
    .await;
    exec.stdin(&client, b"").await; // EOF
    let out = exec.finish(&client).await;
    assert_eq!(out.exit, Some(0), "{:?}", (out.failed, out.other, out.stdin_errors));
    assert_eq!(out.stdin_errors.len(), 1, "only the oversized chunk is refused: {:?}", out.stdin_errors);
    assert!(out.stdin_errors[0].contains(&limits.stdin_chunk_size.to_string()), "{:?}", out.stdin_errors);
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "cat gives back exactly what went in");
    assert!(out.stdin_acks.windows(2).all(|w| w[0] < w[1]), "stdin acks increase strictly");
    assert_eq!(out.stdin_acks.last(), Some(&(input.len() as u64)), "the last stdin ack counts every byte");
    assert!(out.largest_output <= limits.output_chunk_size as usize, "{out:?}");
    assert!(out.other.is_empty(), "{:?}", out.other);
    client.close().await;
}

/// Admission (spec 8): with `max_executions` 2 held, a third controlled
/// request is refused with `resource_limit` at stage `execution_admission`;
/// once one of them has ended and its output is acknowledged, a new one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_stops_at_max_executions() {
    let limits = ExecLimits { max_executions: 2, ..ExecLimits::default() };
    let relay = Relay::start_with("refhost-admission", Some(limits));
    let client = relay.client().await;
    assert_eq!(client.ready().agent.exec_limits, Some(limits));
    let mut first = Exec::start(&client, &exec_request("sleep", &["60"])).await;
    first.started(&client).await;
    let mut second = Exec::start(&client, &exec_request("sleep", &["61"])).await;
    second.started(&client).await;
    let third = Exec::start(&client, &exec_request("true", &[])).await.finish(&client).await;
    let failed = third.failed.as_ref().unwrap_or_else(|| panic!("a third execution was admitted: {third:?}"));
    assert_eq!(failed.kind, ExecFailureKind::ResourceLimit, "{failed:?}");
    assert_eq!(failed.stage.as_deref(), Some("execution_admission"), "{failed:?}");
    assert!(third.pid.is_none(), "{third:?}");

    client.send(first.id, TypedMessage::new(MessageType::ExecSignal, ExecSignal { signal: 9 })).await.unwrap();
    assert_eq!(first.finish(&client).await.exit, Some(-1));
    let again = Exec::start(&client, &exec_request("sh", &["-c", "echo admitted"])).await.finish(&client).await;
    assert_eq!((again.exit, &again.stdout[..]), (Some(0), &b"admitted\n"[..]), "{again:?}");
    client.send(second.id, TypedMessage::new(MessageType::ExecSignal, ExecSignal { signal: 9 })).await.unwrap();
    assert_eq!(second.finish(&client).await.exit, Some(-1));
    client.close().await;
}

/// Without `exec_limits` in the bootstrap the connection is still at
/// generation 10, but executions are legacy (spec 8): no policy in
/// `core.ready`, no acknowledgement either way, 4096-byte output chunks, and
/// the exit without waiting for the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_executions_stay_legacy_at_generation_10() {
    let relay = Relay::start_with("refhost-legacy", None);
    let client = relay.client().await;
    assert_eq!(client.ready().negotiated_version, 10);
    assert!(client.ready().agent.exec_limits.is_none(), "{:?}", client.ready().agent.exec_limits);
    let mut exec = Exec::start(&client, &exec_request("cat", &[])).await;
    assert!(!exec.metered);
    exec.started(&client).await;
    let input = pattern(200_000);
    for piece in input.chunks(32 * 1024) {
        exec.stdin(&client, piece).await;
    }
    exec.stdin(&client, b"").await;
    let out = exec.finish(&client).await;
    assert_eq!(out.exit, Some(0), "{out:?}");
    assert!(out.stdout == input, "cat gives back what went in");
    assert!(out.stdin_acks.is_empty(), "no core.exec.stdin.ack for a legacy execution: {:?}", out.stdin_acks);
    assert!(out.largest_output <= 4096, "legacy chunks of 4096 bytes at most: {}", out.largest_output);
    assert!(out.other.is_empty() && out.stdin_errors.is_empty(), "{out:?}");
    client.close().await;
}

// --- bulk ------------------------------------------------------------------

/// Their SDK's connection type on the relay's socket: at generation 10 it
/// opens the raw bulk path.
async fn sdk_client(relay: &Relay) -> OptimizedAgentClient {
    let client = within(30, "connecting", OptimizedAgentClient::connect(&relay.socket)).await.expect("it connects");
    assert_eq!(client.negotiated_version(), 10);
    assert!(client.supports(MessageType::BulkCredit));
    client
}

/// The next item of a bulk-capable stream.
async fn next_frame(rx: &mut tokio::sync::mpsc::Receiver<AgentFrame>, what: &str) -> AgentFrame {
    within(30, what, rx.recv()).await.unwrap_or_else(|| panic!("the stream ended before {what}"))
}

fn control(frame: AgentFrame, what: &str) -> WireMessage {
    match frame {
        AgentFrame::Control(m) => m,
        AgentFrame::Bulk(r) => panic!("a raw record ({} bytes at {}) where {what} was due", r.payload.len(), r.offset),
    }
}

/// What one bulk operation looked like from the host: the kinds of frames in
/// order, runs of records folded into one `records×N` entry.
#[derive(Default, Debug)]
struct Sequence(Vec<String>);

impl Sequence {
    fn push(&mut self, what: &str) {
        if what == "record" {
            if let Some(last) = self.0.last_mut()
                && let Some(n) = last.strip_prefix("records×")
            {
                *last = format!("records×{}", n.parse::<usize>().unwrap() + 1);
                return;
            }
            self.0.push("records×1".into());
        } else {
            self.0.push(what.into());
        }
    }
    fn count(&self, what: &str) -> usize {
        self.0.iter().filter(|w| *w == what).count()
    }
}

async fn sdk_open(client: &OptimizedAgentClient, path: &str, options: FsOpenOptions) -> u64 {
    let op = FsOp::OpenFile { path: path.into(), options };
    let reply =
        within(20, "OpenFile", client.request(MessageType::FsRequest, &FsRequest { op, bulk: None })).await.unwrap();
    match reply.payload::<FsResponse>().unwrap() {
        FsResponse { ok: true, data: Some(FsResponseData::Handle(h)), .. } => h,
        other => panic!("OpenFile {path}: {other:?}"),
    }
}

async fn sdk_close(client: &OptimizedAgentClient, handle: u64) {
    let op = FsOp::CloseHandle { handle };
    let reply =
        within(20, "CloseHandle", client.request(MessageType::FsRequest, &FsRequest { op, bulk: None })).await.unwrap();
    assert!(reply.payload::<FsResponse>().unwrap().ok);
}

/// A 20 MiB file each way over raw records (spec 7.2–7.4): the write is
/// offered with `BulkOffer::filesystem_write()`, accepted as the spec's table
/// says, sent within the credit our agent grants as it writes (several
/// `core.bulk.credit`s: 20 MiB do not fit in the 8 MiB window), finished,
/// answered; the read is offered with `BulkOffer::filesystem_read()`,
/// accepted, its records checked by their `BulkReceiveState` (exact offsets,
/// within our credit), credited back as consumed, then the finish at the
/// file's size and the terminal response, in that order.
///
/// Both offers are their SDK's defaults. The read's 8 MiB grant in 3 MiB
/// records is 8 MiB + 63 bytes on the wire, more than the relay's per-client
/// queue (`CLIENT_QUEUE_BYTES`, 8 MiB): when their client has not yet drained
/// the first record as the third is routed, the relay disconnects it
/// ("a client does not read"), and this test fails with "the stream ended
/// before the read's frames". The same cause, made deterministic:
/// `a_client_that_pauses_within_the_credit_it_granted_keeps_its_connection`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twenty_mib_file_each_way_over_bulk_records() {
    let relay = Relay::start("refhost-bulk-fs");
    let client = sdk_client(&relay).await;
    let data = pattern(20 * 1024 * 1024 + 7);

    // --- the write.
    let write = FsOpenOptions { write: true, create: true, truncate: true, mode: Some(0o644), ..Default::default() };
    let handle = sdk_open(&client, "/up.bin", write).await;
    let offer = BulkOffer::filesystem_write();
    let op = FsOp::Write { handle, offset: 0, len: Some(data.len() as u64) };
    let (id, mut rx) =
        within(20, "the write", client.stream_frames(MessageType::FsRequest, &FsRequest { op, bulk: Some(offer) }))
            .await
            .unwrap();
    let mut seq = Sequence::default();
    let first = control(next_frame(&mut rx, "core.bulk.accepted").await, "core.bulk.accepted");
    assert_eq!(first.t, MessageType::BulkAccepted, "the acceptance is the first reply");
    seq.push("accepted");
    let accepted = first.payload::<BulkAccepted>().unwrap();
    let accepted = accepted
        .validate_against(offer, BulkKind::Filesystem, BULK_FLOW_MASK_HOST_TO_GUEST)
        .unwrap_or_else(|e| panic!("their client would abandon this acceptance: {e}: {accepted:?}"));
    assert_eq!(
        (accepted.max_record_payload, accepted.host_to_guest_credit_limit, accepted.guest_to_host_credit_limit),
        (MAX_BULK_RECORD_PAYLOAD, DEFAULT_BULK_WINDOW, 0),
        "a file write is accepted with min(offer, 3 MiB) and an 8 MiB window"
    );
    let mut state = BulkSendState::new(
        BulkKind::Filesystem,
        BulkFlow::HostToGuest,
        accepted.max_record_payload,
        accepted.host_to_guest_credit_limit,
    )
    .unwrap();
    let apply = |m: WireMessage, state: &mut BulkSendState, seq: &mut Sequence| {
        assert_eq!(m.t, MessageType::BulkCredit, "only credit comes while the write goes on");
        let credit = m.payload::<BulkCredit>().unwrap();
        state.apply_credit(credit).unwrap_or_else(|e| panic!("a credit their client refuses: {e}: {credit:?}"));
        seq.push("credit");
    };
    let mut sent = 0usize;
    within(120, "sending 20 MiB within the credit", async {
        while sent < data.len() {
            // Credits that have come, then wait for one if there is no room.
            while let Ok(frame) = rx.try_recv() {
                apply(control(frame, "core.bulk.credit"), &mut state, &mut seq);
            }
            if state.available_credit() == 0 {
                let frame = next_frame(&mut rx, "core.bulk.credit").await;
                apply(control(frame, "core.bulk.credit"), &mut state, &mut seq);
                continue;
            }
            let n = (data.len() - sent).min(state.max_record_payload() as usize).min(state.available_credit() as usize);
            let offset = state.admit(n).unwrap();
            assert_eq!(offset, sent as u64);
            let record = BulkRecord {
                id,
                kind: BulkKind::Filesystem,
                flow: BulkFlow::HostToGuest,
                offset,
                payload: bytes::Bytes::copy_from_slice(&data[sent..sent + n]),
            };
            client.send_bulk(record).await.expect("a raw record goes out");
            sent += n;
        }
    })
    .await;
    let finish = state.finish().unwrap();
    assert_eq!(finish.final_offset, data.len() as u64);
    client.send(id, MessageType::BulkFinish, &finish).await.expect("core.bulk.finish goes out");
    let response = within(60, "the write's response", async {
        loop {
            let m = control(next_frame(&mut rx, "core.fs.response").await, "core.fs.response");
            if m.t == MessageType::FsResponse {
                assert_ne!(m.flags & FLAG_TERMINAL, 0);
                seq.push("response");
                break m.payload::<FsResponse>().unwrap();
            }
            apply(m, &mut state, &mut seq);
        }
    })
    .await;
    eprintln!("the bulk write, as their client saw it: {seq:?}");
    assert!(response.ok, "the write: {:?} after {:?}", response.error, seq);
    assert!(seq.count("credit") >= 2, "20 MiB through an 8 MiB window takes credit: {seq:?}");
    assert!(within(5, "the stream's end", rx.recv()).await.is_none(), "nothing after the terminal response");
    sdk_close(&client, handle).await;
    assert!(std::fs::read(relay.root.join("up.bin")).unwrap() == data, "the file on disk is what was sent");

    // --- the read.
    let handle = sdk_open(&client, "/up.bin", FsOpenOptions { read: true, ..Default::default() }).await;
    let offer = BulkOffer::filesystem_read();
    let op = FsOp::Read { handle, offset: 0, len: None };
    let (id, mut rx) =
        within(20, "the read", client.stream_frames(MessageType::FsRequest, &FsRequest { op, bulk: Some(offer) }))
            .await
            .unwrap();
    let mut seq = Sequence::default();
    let first = control(next_frame(&mut rx, "core.bulk.accepted").await, "core.bulk.accepted");
    assert_eq!(first.t, MessageType::BulkAccepted, "the acceptance is the first reply");
    seq.push("accepted");
    let accepted = first.payload::<BulkAccepted>().unwrap();
    let accepted = accepted
        .validate_against(offer, BulkKind::Filesystem, BULK_FLOW_MASK_GUEST_TO_HOST)
        .unwrap_or_else(|e| panic!("their client would abandon this acceptance: {e}: {accepted:?}"));
    assert_eq!(
        (accepted.max_record_payload, accepted.host_to_guest_credit_limit, accepted.guest_to_host_credit_limit),
        (MAX_BULK_RECORD_PAYLOAD, 0, offer.guest_to_host_credit_limit),
        "a file read is accepted with min(offer, 3 MiB) and the offer's credit echoed"
    );
    let mut state = BulkReceiveState::new(
        BulkKind::Filesystem,
        BulkFlow::GuestToHost,
        accepted.max_record_payload,
        accepted.guest_to_host_credit_limit,
        DEFAULT_BULK_WINDOW,
    )
    .unwrap();
    let mut got = Vec::with_capacity(data.len());
    let mut finished = None;
    let response = within(120, "reading 20 MiB", async {
        loop {
            match next_frame(&mut rx, "the read's frames").await {
                AgentFrame::Bulk(record) => {
                    assert!(finished.is_none(), "a record after the finish");
                    assert_eq!(
                        (record.id, record.kind, record.flow),
                        (id, BulkKind::Filesystem, BulkFlow::GuestToHost)
                    );
                    let end = state
                        .accept_record(&record)
                        .unwrap_or_else(|e| panic!("a record their client refuses: {e} (after {seq:?})"));
                    got.extend_from_slice(&record.payload);
                    seq.push("record");
                    assert_eq!(end, got.len() as u64);
                    // Consumed at once: credit as their receive state says.
                    if let Some(credit) = state.consume(end).unwrap() {
                        client.send(id, MessageType::BulkCredit, &credit).await.expect("core.bulk.credit goes out");
                    }
                }
                AgentFrame::Control(m) => match m.t {
                    MessageType::BulkFinish => {
                        let finish = m.payload::<BulkFinish>().unwrap();
                        state.accept_finish(finish).unwrap_or_else(|e| panic!("a finish their client refuses: {e}"));
                        finished = Some(finish.final_offset);
                        seq.push("finish");
                    }
                    MessageType::FsResponse => {
                        assert_ne!(m.flags & FLAG_TERMINAL, 0);
                        seq.push("response");
                        break m.payload::<FsResponse>().unwrap();
                    }
                    other => panic!("{other:?} in a bulk read (after {seq:?})"),
                },
            }
        }
    })
    .await;
    eprintln!("the bulk read, as their client saw it: {seq:?}");
    assert!(response.ok, "the read: {:?} after {:?}", response.error, seq);
    assert_eq!(finished, Some(data.len() as u64), "the finish is at the file's size");
    let records = seq.0.get(1).cloned().unwrap_or_default();
    assert_eq!(seq.0, ["accepted".to_string(), records, "finish".into(), "response".into()], "the read's order");
    assert!(got == data, "the bytes read back are the file's");
    assert!(within(5, "the stream's end", rx.recv()).await.is_none(), "nothing after the terminal response");
    sdk_close(&client, handle).await;
}

/// A host's `core.bulk.cancel` through their client's `cancel_bulk` (spec
/// 7.4): our agent stops the read and answers with the failed response
/// carrying the cancel's message, and sends no cancel back; the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_cancel_ends_a_bulk_read_with_its_message() {
    let relay = Relay::start("refhost-bulk-cancel");
    std::fs::write(relay.root.join("big.bin"), pattern(8 * 1024 * 1024)).unwrap();
    let client = sdk_client(&relay).await;
    let handle = sdk_open(&client, "/big.bin", FsOpenOptions { read: true, ..Default::default() }).await;
    // 128 KiB of credit in 64 KiB records: the agent stops after two.
    let offer = BulkOffer { format: 1, max_record_payload: 65536, guest_to_host_credit_limit: 131072 };
    let op = FsOp::Read { handle, offset: 0, len: None };
    let (id, mut rx) =
        client.stream_frames(MessageType::FsRequest, &FsRequest { op, bulk: Some(offer) }).await.unwrap();
    assert_eq!(
        control(next_frame(&mut rx, "core.bulk.accepted").await, "core.bulk.accepted").t,
        MessageType::BulkAccepted
    );
    assert!(
        matches!(next_frame(&mut rx, "a record").await, AgentFrame::Bulk(r) if r.offset == 0 && r.payload.len() == 65536)
    );
    let cancel = BulkCancel {
        kind: BulkKind::Filesystem,
        reason: BulkCancelReason::CallerCancelled,
        message: "enough of it".into(),
    };
    client.cancel_bulk(id, &cancel).await.expect("core.bulk.cancel goes out");
    let response = within(20, "the failed response", async {
        loop {
            match next_frame(&mut rx, "the failed response").await {
                // One may have been on its way; their client drops later ones.
                AgentFrame::Bulk(r) => assert_eq!(r.offset, 65536, "only the record within the credit"),
                AgentFrame::Control(m) if m.t == MessageType::FsResponse => {
                    assert_ne!(m.flags & FLAG_TERMINAL, 0);
                    break m.payload::<FsResponse>().unwrap();
                }
                AgentFrame::Control(m) => panic!("{:?} after a host's cancel", m.t),
            }
        }
    })
    .await;
    assert_eq!((response.ok, response.error.as_deref()), (false, Some("enough of it")), "{response:?}");
    assert!(within(5, "the stream's end", rx.recv()).await.is_none());
    let pong = within(20, "a ping", client.request(MessageType::Ping, &Ping {})).await.unwrap();
    assert_eq!(pong.t, MessageType::Pong);
    sdk_close(&client, handle).await;
}

/// TCP over raw records both ways (spec 7.2–7.4): `BulkOffer::tcp()`, then
/// `core.tcp.connected` and `core.bulk.accepted` (flows 3, 256 KiB records,
/// the 8 MiB credit echoed), 20 MiB sent by one task within our agent's
/// credit while the echo is received, checked and credited by another; each
/// side's `core.bulk.finish` replaces `core.tcp.eof`, and `core.tcp.closed`
/// comes after both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_tcp_echo_of_twenty_mib() {
    let relay = Relay::start("refhost-bulk-tcp");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0usize;
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    conn.write_all(&buf[..n]).unwrap();
                    total += n;
                }
                Err(e) => panic!("the echo server: {e}"),
            }
        }
        total
    });
    let client = Arc::new(sdk_client(&relay).await);
    let data = Arc::new(pattern(20 * 1024 * 1024 + 11));

    let offer = BulkOffer::tcp();
    let connect = TcpConnect { host: "127.0.0.1".into(), port, bulk: Some(offer) };
    let (id, mut rx) =
        within(20, "core.tcp.connect", client.stream_frames(MessageType::TcpConnect, &connect)).await.unwrap();
    let mut seq = Sequence::default();
    let connected = control(next_frame(&mut rx, "core.tcp.connected").await, "core.tcp.connected");
    if connected.t == MessageType::TcpFailed {
        panic!("core.tcp.failed: {}", connected.payload::<TcpFailed>().unwrap().error);
    }
    assert_eq!(connected.t, MessageType::TcpConnected);
    seq.push("connected");
    let first = control(next_frame(&mut rx, "core.bulk.accepted").await, "core.bulk.accepted");
    assert_eq!(first.t, MessageType::BulkAccepted, "the acceptance follows core.tcp.connected");
    seq.push("accepted");
    let accepted = first.payload::<BulkAccepted>().unwrap();
    let accepted = accepted
        .validate_against(offer, BulkKind::Tcp, BULK_FLOW_MASK_HOST_TO_GUEST | BULK_FLOW_MASK_GUEST_TO_HOST)
        .unwrap_or_else(|e| panic!("their client would abandon this acceptance: {e}: {accepted:?}"));
    assert_eq!(
        (accepted.max_record_payload, accepted.host_to_guest_credit_limit, accepted.guest_to_host_credit_limit),
        (DEFAULT_BULK_RECORD_PAYLOAD, DEFAULT_BULK_WINDOW, offer.guest_to_host_credit_limit),
        "TCP is accepted with min(offer, 256 KiB), an 8 MiB window and the offer's credit echoed"
    );

    // The sender: records within the credit, then the finish (our half-close).
    let (credits_tx, mut credits) = tokio::sync::mpsc::unbounded_channel::<BulkCredit>();
    let sender = {
        let (client, data) = (client.clone(), data.clone());
        tokio::spawn(async move {
            let mut state = BulkSendState::new(
                BulkKind::Tcp,
                BulkFlow::HostToGuest,
                accepted.max_record_payload,
                accepted.host_to_guest_credit_limit,
            )
            .unwrap();
            let (mut sent, mut applied) = (0usize, 0usize);
            while sent < data.len() {
                while let Ok(credit) = credits.try_recv() {
                    applied += state.apply_credit(credit).unwrap_or_else(|e| panic!("a credit refused: {e}")) as usize;
                }
                if state.available_credit() == 0 {
                    let credit = credits.recv().await.expect("credit while data waits");
                    applied += state.apply_credit(credit).unwrap_or_else(|e| panic!("a credit refused: {e}")) as usize;
                    continue;
                }
                let n =
                    (data.len() - sent).min(state.max_record_payload() as usize).min(state.available_credit() as usize);
                let offset = state.admit(n).unwrap();
                let payload = bytes::Bytes::copy_from_slice(&data[sent..sent + n]);
                let record = BulkRecord { id, kind: BulkKind::Tcp, flow: BulkFlow::HostToGuest, offset, payload };
                client.send_bulk(record).await.expect("a raw record goes out");
                sent += n;
            }
            let finish = state.finish().unwrap();
            client.send(id, MessageType::BulkFinish, &finish).await.expect("core.bulk.finish goes out");
            applied
        })
    };

    // The receiver: the echo, checked and credited as it is consumed.
    let mut state = BulkReceiveState::new(
        BulkKind::Tcp,
        BulkFlow::GuestToHost,
        accepted.max_record_payload,
        accepted.guest_to_host_credit_limit,
        DEFAULT_BULK_WINDOW,
    )
    .unwrap();
    let (mut echoed, mut finished, mut credits_in) = (Vec::with_capacity(data.len()), None, 0usize);
    within(180, "the echo, both finishes and core.tcp.closed", async {
        loop {
            match next_frame(&mut rx, "the connection's frames").await {
                AgentFrame::Bulk(record) => {
                    assert!(finished.is_none(), "a record after the guest's finish");
                    assert_eq!((record.id, record.kind, record.flow), (id, BulkKind::Tcp, BulkFlow::GuestToHost));
                    let end = state.accept_record(&record).unwrap_or_else(|e| panic!("a record refused: {e}"));
                    echoed.extend_from_slice(&record.payload);
                    seq.push("record");
                    if let Some(credit) = state.consume(end).unwrap() {
                        client.send(id, MessageType::BulkCredit, &credit).await.expect("core.bulk.credit goes out");
                    }
                }
                AgentFrame::Control(m) => match m.t {
                    MessageType::BulkCredit => {
                        let credit = m.payload::<BulkCredit>().unwrap();
                        assert_eq!((credit.kind, credit.flow), (BulkKind::Tcp, BulkFlow::HostToGuest), "{credit:?}");
                        credits_in += 1;
                        let _ = credits_tx.send(credit);
                        seq.push("credit");
                    }
                    MessageType::BulkFinish => {
                        let finish = m.payload::<BulkFinish>().unwrap();
                        state.accept_finish(finish).unwrap_or_else(|e| panic!("a finish refused: {e}"));
                        finished = Some(finish.final_offset);
                        seq.push("finish");
                    }
                    MessageType::TcpClosed => {
                        assert_ne!(m.flags & FLAG_TERMINAL, 0);
                        seq.push("closed");
                        break;
                    }
                    other => panic!("{other:?} on a bulk TCP connection (after {:?})", seq.0.last()),
                },
            }
        }
    })
    .await;
    let applied = within(20, "the sender", sender).await.unwrap();
    eprintln!("the bulk TCP connection, as their client saw it: {seq:?}");
    assert_eq!(server.join().unwrap(), data.len(), "the server got every byte");
    assert_eq!(finished, Some(data.len() as u64), "the guest's finish is at the end of the echo");
    assert!(echoed == *data, "the echo arrives intact: {} bytes of {}", echoed.len(), data.len());
    assert!(
        credits_in >= 2 && applied >= 2,
        "20 MiB through an 8 MiB window take credit: {credits_in} in, {applied} applied"
    );
    let n = seq.0.len();
    assert_eq!(seq.0[..2], ["connected", "accepted"], "{seq:?}");
    assert_eq!(seq.0[n - 2..], ["finish", "closed"], "the guest's finish, then core.tcp.closed: {seq:?}");
    assert!(within(5, "the stream's end", rx.recv()).await.is_none(), "nothing after core.tcp.closed");
}

/// A host may grant up to `MAX_BULK_WINDOW` (32 MiB) of guest-to-host credit
/// (spec 7.2), and the agent may then send that much before hearing from it
/// again. A client that grants it and takes a moment before consuming (here
/// 2 s, as a host writing to a slow disk would) is within the protocol and
/// must get its data. Their client reads the socket into per-stream queues
/// of two frames and stops reading while the application has not taken
/// them, so the bytes in flight wait in the relay's queue for that client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pauses_within_the_credit_it_granted_keeps_its_connection() {
    use microsandbox_protocol::bulk::MAX_BULK_WINDOW;
    let relay = Relay::start("refhost-bulk-pause");
    let data = pattern(40 * 1024 * 1024 + 1);
    std::fs::write(relay.root.join("big.bin"), &data).unwrap();
    let client = sdk_client(&relay).await;
    let handle = sdk_open(&client, "/big.bin", FsOpenOptions { read: true, ..Default::default() }).await;
    let offer = BulkOffer {
        format: 1,
        max_record_payload: MAX_BULK_RECORD_PAYLOAD,
        guest_to_host_credit_limit: MAX_BULK_WINDOW,
    };
    let op = FsOp::Read { handle, offset: 0, len: None };
    let (id, mut rx) =
        client.stream_frames(MessageType::FsRequest, &FsRequest { op, bulk: Some(offer) }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accepted = control(next_frame(&mut rx, "core.bulk.accepted").await, "core.bulk.accepted");
    let accepted = accepted.payload::<BulkAccepted>().unwrap();
    assert_eq!(accepted.guest_to_host_credit_limit, MAX_BULK_WINDOW, "the 32 MiB grant is accepted: {accepted:?}");
    let mut state = BulkReceiveState::new(
        BulkKind::Filesystem,
        BulkFlow::GuestToHost,
        accepted.max_record_payload,
        accepted.guest_to_host_credit_limit,
        MAX_BULK_WINDOW,
    )
    .unwrap();
    let mut got = Vec::with_capacity(data.len());
    let response = within(120, "the read", async {
        loop {
            let frame = match within(30, "the read's frames", rx.recv()).await {
                Some(frame) => frame,
                None => panic!(
                    "the stream ended after {} of {} bytes, within the credit the client granted; the relay's log:\n{}",
                    got.len(),
                    data.len(),
                    relay.log()
                ),
            };
            match frame {
                AgentFrame::Bulk(record) => {
                    let end = state.accept_record(&record).unwrap_or_else(|e| panic!("a record refused: {e}"));
                    got.extend_from_slice(&record.payload);
                    if let Some(credit) = state.consume(end).unwrap() {
                        client.send(id, MessageType::BulkCredit, &credit).await.expect("core.bulk.credit goes out");
                    }
                }
                AgentFrame::Control(m) if m.t == MessageType::BulkFinish => {
                    state.accept_finish(m.payload::<BulkFinish>().unwrap()).unwrap();
                }
                AgentFrame::Control(m) if m.t == MessageType::FsResponse => break m.payload::<FsResponse>().unwrap(),
                AgentFrame::Control(m) => panic!("{:?} in a bulk read", m.t),
            }
        }
    })
    .await;
    assert!(response.ok, "{response:?}");
    assert!(got == data, "the file arrives intact");
}
