//! `agentwire relay`, run as built between `agentwire agent` and clients:
//! each test starts its own agent and relay on Unix sockets in a temporary
//! directory, and connects with the host client (`via_relay`) or with raw
//! sockets that write frames by hand.

mod common;

use common::{TempDir as Tmp, agentwire, frame};

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentwire::relay::{AGENT_RELAY_ID_RANGE_STEP as STEP, AGENT_RELAY_MAX_CLIENTS, RelayHandshake};
use agentwire::{Message, MessageCodec, Payload};
use agentwire_client::{Client, Command as Exec, ExecEvent};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const BIN: &str = env!("CARGO_BIN_EXE_agentwire");

/// An agent and a relay in front of it, both killed on drop.
struct Relay {
    agent: Child,
    relay: Child,
    socket: PathBuf,
    /// What the relay wrote on standard error (it runs with `-v`).
    log: Arc<Mutex<String>>,
    _tmp: Tmp,
}

impl Relay {
    fn start(tag: &str, bootstrap: Option<&str>) -> Relay {
        let tmp = Tmp::new(tag);
        std::fs::create_dir(tmp.0.join("root")).unwrap();
        let agent_socket = tmp.0.join("agent.sock");
        let agent = Command::new(BIN)
            .args(["agent", "--listen"])
            .arg(&agent_socket)
            .arg("--root")
            .arg(tmp.0.join("root"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        common::wait_listening(&agent_socket);
        let socket = tmp.0.join("relay.sock");
        let bootstrap_file = bootstrap.map(|json| {
            let path = tmp.0.join("bootstrap.json");
            std::fs::write(&path, json).unwrap();
            path
        });
        let started = common::start_relay(&agent_socket, &socket, bootstrap_file.as_deref(), Duration::from_secs(20));
        let (relay, log) = started.unwrap_or_else(|log| panic!("the relay did not become ready: {log}"));
        Relay { agent, relay, socket, log, _tmp: tmp }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the relay's log has a line containing `what`.
    fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(what) {
            assert!(Instant::now() < deadline, "no {what:?} in the relay's log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn client(&self) -> Client {
        let socket = UnixStream::connect(&self.socket).await.unwrap();
        // A client's own core.clock.sync would be an id-0 frame, which the relay does not take.
        let connect = Client::builder().via_relay(true).clock_sync(false).connect(socket);
        tokio::time::timeout(Duration::from_secs(20), connect).await.expect("the prologue within 20 s").unwrap()
    }

    /// A raw connection and the relay's prologue.
    async fn raw(&self) -> (UnixStream, RelayHandshake) {
        let mut socket = UnixStream::connect(&self.socket).await.unwrap();
        let handshake = read_prologue(&mut socket).await.expect("a prologue");
        (socket, handshake)
    }

    /// Waits for the relay to exit; its status.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.relay.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the relay did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for child in [&mut self.relay, &mut self.agent] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads the prologue, or `None` when the relay closes the connection first.
async fn read_prologue(socket: &mut UnixStream) -> Option<RelayHandshake> {
    let mut buf = BytesMut::new();
    let read = async {
        loop {
            if let Some(handshake) = RelayHandshake::decode(&mut buf).unwrap() {
                return Some(handshake);
            }
            if socket.read_buf(&mut buf).await.unwrap() == 0 {
                return None;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("the prologue or the end within 20 s")
}

/// Whether the relay closes `socket` within 10 s (what it sent before is skipped).
async fn closed(socket: &mut UnixStream) -> bool {
    let mut sink = [0u8; 4096];
    let read = async {
        loop {
            match socket.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.is_ok()
}

/// One message from a raw connection.
async fn next_message(socket: &mut UnixStream, codec: &mut MessageCodec, buf: &mut BytesMut) -> Message {
    use tokio_util::codec::Decoder;
    let read = async {
        loop {
            if let Some(item) = codec.decode(buf).unwrap() {
                return item.unwrap();
            }
            assert_ne!(socket.read_buf(buf).await.unwrap(), 0, "the relay closed the connection");
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("a frame within 20 s")
}

fn encode(m: Message) -> BytesMut {
    let mut buf = BytesMut::new();
    MessageCodec::new().encode_message(&m, &mut buf).unwrap();
    buf
}

fn disjoint(a: &Range<u32>, b: &Range<u32>) -> bool {
    a.end <= b.start || b.end <= a.start
}

fn alive(pid: u32) -> bool {
    // A zombie is dead already; the agent reaps its commands soon after.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// `f`, which must finish within 20 s (a frame routed to the wrong client would leave it waiting).
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f).await.unwrap_or_else(|_| panic!("{what} took over 20 s"))
}

async fn ping(client: &Client) {
    within("a ping", client.ping()).await.unwrap();
}

async fn sh(client: &Client, script: &str) -> String {
    let run = async { client.exec(Exec::new("sh").arg("-c").arg(script)).await?.output().await };
    let output = within(script, run).await.unwrap();
    assert!(output.status.success(), "{script}: {:?}", output);
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_share_the_agent_and_a_leaving_client_s_command_is_killed() {
    let relay = Relay::start("share", Some(r#"{"default_env": [{"key": "RELAY_TEST", "value": "from-bootstrap"}]}"#));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&relay.socket).unwrap().permissions().mode() & 0o777, 0o600);
    let one = relay.client().await;
    let two = relay.client().await;
    let (r1, r2) = (one.id_range(), two.id_range());
    assert!(!r1.is_empty() && !r2.is_empty() && !r1.contains(&0) && !r2.contains(&0), "{r1:?} {r2:?}");
    assert!(disjoint(&r1, &r2), "{r1:?} and {r2:?} overlap");
    for r in [&r1, &r2] {
        assert!(r.end - r.start >= STEP - 1 && r.end <= AGENT_RELAY_MAX_CLIENTS as u32 * STEP, "{r:?}");
    }
    // Both at once; each gets its own command's output (the bootstrap's environment included).
    let (s1, s2) = ("echo client1 $$ $RELAY_TEST", "echo client2 $$ $RELAY_TEST");
    let (out1, out2) = tokio::join!(sh(&one, s1), sh(&two, s2));
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let (w1, w2) = (words(&out1), words(&out2));
    assert_eq!((w1.len(), w1[0].as_str(), w1[2].as_str()), (3, "client1", "from-bootstrap"), "{out1}");
    assert_eq!((w2.len(), w2[0].as_str(), w2[2].as_str()), (3, "client2", "from-bootstrap"), "{out2}");
    assert_ne!(w1[1], w2[1], "two commands, two pids");

    // Client one starts a long command and goes away without ending it.
    let mut sleeper = within("sleep 300", one.exec(Exec::new("sleep").arg("300"))).await.unwrap();
    let pid = match within("core.exec.started", sleeper.next()).await.unwrap() {
        Some(ExecEvent::Started(pid)) => pid,
        other => panic!("{other:?}"),
    };
    assert!(pid > 0 && alive(pid), "pid {pid}");
    drop(sleeper);
    drop(one);
    // The relay tells the agent, which kills what the client's sessions run.
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "sleep (pid {pid}) outlived its client:\n{}", relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.wait_log("client left");
    // The other client goes on.
    ping(&two).await;
    assert!(sh(&two, "echo still here").await.contains("still here"));
    // A new client takes the freed slot: the lowest free one.
    let three = relay.client().await;
    assert_eq!(three.id_range(), r1, "the lowest free slot is given again");
    ping(&two).await;
    ping(&three).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_breaks_the_id_or_flags_rules_is_disconnected_and_others_go_on() {
    let relay = Relay::start("rules", None);
    let other = relay.client().await;
    let (mut raw, handshake) = relay.raw().await;
    let ids = handshake.client_ids();
    assert!(matches!(handshake.ready_message().unwrap().payload, Payload::Ready(_)));
    assert!(disjoint(&ids, &other.id_range()));

    // In range: routed to the agent and back.
    let (mut codec, mut buf) = (MessageCodec::new(), BytesMut::new());
    raw.write_all(&encode(Message::new(ids.start, agentwire::payload::core::Ping {}))).await.unwrap();
    let pong = next_message(&mut raw, &mut codec, &mut buf).await;
    assert_eq!((pong.id, pong.message_type().wire_name()), (ids.start, "core.pong"));

    // Out of range: one of the other client's ids, then id 0 with flags other than SHUTDOWN.
    let other_id = other.id_range().start + 7;
    raw.write_all(&frame(other_id, 0, "core.ping", &[0xa0])).await.unwrap();
    assert!(closed(&mut raw).await, "a frame on id {other_id} (not the client's) did not end its connection");
    relay.wait_log(&format!("id {other_id} outside its range"));

    let (mut raw, handshake) = relay.raw().await;
    raw.write_all(&frame(0, 0, "core.clock.sync", &[0xa0])).await.unwrap();
    assert!(closed(&mut raw).await, "a frame on id 0 did not end the connection");
    relay.wait_log("id 0 outside its range");

    // A flags byte outside 0, 1, 2, 4, 8, on an id of its own.
    let (mut raw, handshake2) = relay.raw().await;
    assert_eq!(handshake2.id_min, handshake.id_min, "the freed slot again");
    raw.write_all(&frame(handshake2.client_ids().start, 0x10, "core.ping", &[0xa0])).await.unwrap();
    assert!(closed(&mut raw).await, "flags 0x10 did not end the connection");
    relay.wait_log("flags 0x10");

    // The well-behaved client was never disturbed.
    ping(&other).await;
    assert!(sh(&other, "echo ok").await.contains("ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_129th_client_is_refused_and_the_lowest_free_slot_is_reused() {
    let relay = Relay::start("full", None);
    let mut sockets = Vec::new();
    for slot in 0..AGENT_RELAY_MAX_CLIENTS as u32 {
        let (socket, handshake) = relay.raw().await;
        assert_eq!((handshake.id_min, handshake.id_max), (slot * STEP + 1, (slot + 1) * STEP), "client {slot}");
        assert_eq!(handshake.client_ids().start, slot * STEP + 1);
        sockets.push(socket);
    }
    let mut extra = UnixStream::connect(&relay.socket).await.unwrap();
    assert!(read_prologue(&mut extra).await.is_none(), "a 129th client got a prologue");
    relay.wait_log("refused a client");
    // Slot 5 leaves; the next client gets it.
    drop(sockets.remove(5));
    relay.wait_log("slot=5");
    let deadline = Instant::now() + Duration::from_secs(10);
    let handshake = loop {
        let mut socket = UnixStream::connect(&relay.socket).await.unwrap();
        if let Some(h) = read_prologue(&mut socket).await {
            sockets.push(socket);
            break h;
        }
        assert!(Instant::now() < deadline, "slot 5 was not freed:\n{}", relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(handshake.id_min, 5 * STEP + 1);
}

/// The pids of the agent's children running `comm` (each command leads its own group).
fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let mut rest = stat[close + 1..].split_whitespace();
        let (state, ppid) = (rest.next(), rest.next().and_then(|p| p.parse::<u32>().ok()));
        if &stat[open + 1..close] == comm && ppid == Some(parent) && state != Some("Z") {
            found.push(pid);
        }
    }
    found
}

/// Client A runs `yes` and never reads its socket; client B pings and runs
/// commands all along. A's queue reaches its limit, so the relay disconnects A
/// (a warning; the agent is told and kills `yes`) instead of holding up the
/// agent's connection; every operation of B completes within 5 s (with the
/// relay waiting for A, B's next ping would never be answered), and the
/// relay's peak memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_disconnected_and_the_others_go_on() {
    let relay = Relay::start("noreader", None);
    let agent_pid = relay.agent.id();
    let b = relay.client().await;
    ping(&b).await;
    let (mut a, handshake) = relay.raw().await;
    let a_slot = handshake.id_min / STEP;
    let started = Instant::now();
    // Output without end, never read by A.
    a.write_all(&encode(Message::new(handshake.client_ids().start, agentwire::payload::exec::ExecRequest::new("yes"))))
        .await
        .unwrap();

    let quick = Duration::from_secs(5);
    let (mut pings, mut execs, mut slowest, mut seen_yes) = (0u32, 0u32, Duration::ZERO, false);
    let mut disconnected_after = None;
    // B goes on for 3 s after A's disconnection (10 s at most in all).
    while disconnected_after.is_none_or(|d: Duration| started.elapsed() < d + Duration::from_secs(3)) {
        assert!(started.elapsed() < Duration::from_secs(10), "A was not disconnected within 10 s:\n{}", relay.log());
        seen_yes |= !children_named(agent_pid, "yes").is_empty();
        let t = Instant::now();
        tokio::time::timeout(quick, b.ping())
            .await
            .unwrap_or_else(|_| panic!("B's ping {pings} took over {quick:?}: A holds it up\n{}", relay.log()))
            .unwrap();
        pings += 1;
        let run = async { b.exec(Exec::new("sh").arg("-c").arg("echo b-$((6*7))")).await?.output().await };
        let out = tokio::time::timeout(quick, run)
            .await
            .unwrap_or_else(|_| panic!("B's exec {execs} took over {quick:?}: A holds it up\n{}", relay.log()))
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "b-42\n");
        execs += 1;
        slowest = slowest.max(t.elapsed());
        if disconnected_after.is_none() && relay.log().contains("does not read") {
            disconnected_after = Some(started.elapsed());
        }
    }
    let disconnected_after = disconnected_after.unwrap();
    relay.wait_log(&format!("slot={a_slot}"));
    relay.wait_log("client left: disconnected: it does not read");
    // The relay closed A's connection (what it had written before is skipped).
    assert!(closed(&mut a).await, "A's connection stayed open");
    // The agent was told (core.relay.client.disconnected) and killed A's command.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !children_named(agent_pid, "yes").is_empty() {
        assert!(Instant::now() < deadline, "A's `yes` outlived its disconnection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A's slot is free again, and B is still served.
    let (_again, h) = relay.raw().await;
    assert_eq!(h.id_min / STEP, a_slot, "the slot of the disconnected client is given again");
    ping(&b).await;
    let peak = common::peak_rss_kib(relay.relay.id());
    eprintln!(
        "no reader: A disconnected after {:.2} s; B: {pings} pings and {execs} execs, slowest ping+exec {:.1} ms; \
         `yes` seen running: {seen_yes}; relay peak RSS {peak} KiB",
        disconnected_after.as_secs_f64(),
        slowest.as_secs_f64() * 1000.0
    );
    assert!(pings >= 3 && execs >= 3, "B did too little to show anything: {pings} pings, {execs} execs");
    // At most CLIENT_QUEUE_BYTES (40 MiB) wait for A before it is disconnected,
    // plus the relay's own ~10 MiB.
    assert!(peak < 96 * 1024, "relay peak RSS {peak} KiB");
}

/// A client that reads what its command writes as it comes keeps all of it:
/// 64 MiB of output through the relay, at full speed, arrive whole and the
/// client is not disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_keeps_all_its_output() {
    let relay = Relay::start("reader", None);
    let client = relay.client().await;
    let run = async { client.exec(Exec::new("head").arg("-c").arg("67108864").arg("/dev/zero")).await?.output().await };
    let t = Instant::now();
    let out = within("64 MiB of output", run).await.unwrap();
    eprintln!("64 MiB through the relay in {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!((out.stdout.len(), out.status.code()), (64 << 20, Some(0)));
    assert!(!relay.log().contains("does not read"), "{}", relay.log());
    ping(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_exits_1_and_closes_its_clients_when_the_agent_goes() {
    let mut relay = Relay::start("agentgone", None);
    let (mut raw, _) = relay.raw().await;
    relay.agent.kill().unwrap();
    relay.agent.wait().unwrap();
    assert!(closed(&mut raw).await, "the client was not closed");
    assert_eq!(relay.wait_exit().code(), Some(1), "{}", relay.log());
    relay.wait_log("the agent's connection ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_stop_the_relay_cleanly_and_remove_its_socket() {
    use nix::sys::signal::{Signal, kill};
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut relay = Relay::start("signal", None);
        let _client = relay.client().await;
        assert!(relay.socket.exists());
        kill(nix::unistd::Pid::from_raw(relay.relay.id() as i32), signal).unwrap();
        assert_eq!(relay.wait_exit().code(), Some(0), "signal {signal:?}: {}", relay.log());
        assert!(!relay.socket.exists(), "signal {signal:?}: the socket file is left behind");
    }
}

#[test]
fn bad_arguments_are_usage_errors_and_help_names_every_option() {
    let tmp = Tmp::new("relayargs");
    let sock = tmp.0.join("r.sock");
    let sock = sock.to_str().unwrap();
    let bad_json = tmp.0.join("bad.json");
    std::fs::write(&bad_json, "{\"default_env\": 5}").unwrap();
    for (args, says) in [
        (vec!["relay", "--agent", "nowhere", "--listen", sock], "nowhere"),
        (vec!["relay", "--agent", "unix:/x/a.sock", "--listen", "127.0.0.1:9"], "Unix socket"),
        (
            vec!["relay", "--agent", "unix:/x/a.sock", "--listen", sock, "--bootstrap", "/nonexistent.json"],
            "cannot read",
        ),
        (
            vec!["relay", "--agent", "unix:/x/a.sock", "--listen", sock, "--bootstrap", bad_json.to_str().unwrap()],
            "GuestBootstrap",
        ),
    ] {
        let out = agentwire(&args, b"");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // No agent there: status 1, and no socket file left.
    let out =
        agentwire(&["relay", "--agent", &format!("unix:{}", tmp.0.join("none.sock").display()), "--listen", sock], b"");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!Path::new(sock).exists());
    let help = agentwire(&["relay", "--help"], b"");
    let help = String::from_utf8_lossy(&help.stdout);
    for word in
        ["--agent", "--listen", "--bootstrap", "128", "core.relay.client.disconnected", "SIGTERM", "Exit status"]
    {
        assert!(help.contains(word), "{word} not in:\n{help}");
    }
}
