//! Their host, our agent: the published reference host client,
//! `microsandbox-agent-client` 0.7.13 (a dev-dependency only), connects to
//! `agentwire relay` and drives `agentwire agent` behind it. Each test starts
//! its own agent and relay on Unix sockets in a temporary directory and talks
//! to them only through the reference client's public API: `AgentClient::connect`
//! on the relay's socket, `request` / `stream` / `send` with the reference's own
//! payload types (`microsandbox-protocol` 0.7.13), and `write_unchecked` for the
//! one id-0 frame a client may send, `core.shutdown`.
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

use microsandbox_agent_client::{AgentClient, AgentWireFormat, Delivery, ErrorKind, ExecController, TypedMessage};
use microsandbox_protocol::core::Ping;
use microsandbox_protocol::exec::{
    ExecExited, ExecFailureKind, ExecOutputAck, ExecResize, ExecSignal, ExecStderr, ExecStdin, ExecStdout,
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
    fn start(tag: &str) -> Relay {
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
        let started = common::start_relay(&agent_socket, &socket, None, Duration::from_secs(20));
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
    // Their client negotiates the lower of its generation (10) and our agent's.
    let ours = agentwire::version::PROTOCOL_VERSION;
    assert_eq!(ready.negotiated_version, ours.min(10), "negotiated with our agent's generation {ours}");
    assert_eq!(
        ready.ready_bytes()[..4],
        [0xa3, 0x61, 0x76, ours],
        "core.ready's envelope begins map(3), \"v\": {ours}"
    );
    assert!(!ready.agent_version().is_empty(), "core.ready names the agent's version");
    // No host-side signal path is advertised, so their SDK signals in-band.
    assert!(ExecController::from_ready_body(ready.ready_bytes()).unwrap().is_none());
    for _ in 0..3 {
        let pong = within(20, "a ping", client.request(TypedMessage::new(MessageType::Ping, Ping {}))).await.unwrap();
        assert_eq!(pong.t, "core.pong");
        assert_ne!(pong.flags & FLAG_TERMINAL, 0);
        assert_eq!(pong.p, [0xa0], "an empty map");
    }
    if ours < 10 {
        // A generation-10 type is refused by their client itself, before a byte
        // goes out, and the connection goes on.
        let exec = Exec::start(&client, &exec_request("true", &[])).await;
        let ack = TypedMessage::new(MessageType::ExecOutputAck, ExecOutputAck { consumed: 0 });
        let refused = client.send(exec.id, ack).await.expect_err("core.exec.output.ack needs generation 10");
        assert_eq!((refused.kind, refused.delivery), (ErrorKind::UnsupportedOperation, Delivery::NotSent));
        let out = exec.finish(&client).await;
        assert_eq!(out.exit, Some(0), "{out:?}");
    }
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
    use microsandbox_agent_client::OptimizedAgentClient;
    let relay = Relay::start("refhost-sdk");
    let client = within(30, "connecting", OptimizedAgentClient::connect(&relay.socket)).await.expect("it connects");
    assert_eq!(client.negotiated_version(), agentwire::version::PROTOCOL_VERSION.min(10));
    let pong = within(20, "a ping", client.request(MessageType::Ping, &Ping {})).await.unwrap();
    assert_eq!(pong.t, MessageType::Pong);
    let request = exec_request("sh", &["-c", "read x; echo \"got $x\"; echo oops >&2; exit 5"]);
    let (id, mut rx) = within(20, "the exec", client.stream(MessageType::ExecRequest, &request)).await.unwrap();
    client.send(id, MessageType::ExecStdin, &ExecStdin { data: b"it\n".to_vec() }).await.unwrap();
    let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), None);
    within(20, "the execution's end", async {
        while let Some(m) = rx.recv().await {
            match m.t {
                MessageType::ExecStdout => stdout.extend(m.payload::<ExecStdout>().unwrap().data),
                MessageType::ExecStderr => stderr.extend(m.payload::<ExecStderr>().unwrap().data),
                MessageType::ExecExited => exit = Some(m.payload::<ExecExited>().unwrap().code),
                _ => {}
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
