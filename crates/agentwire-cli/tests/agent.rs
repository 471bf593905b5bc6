//! The `agentwire agent`, `host` and `demo` commands, run as built: each test
//! starts its own agent on a Unix socket in a temporary directory (or on
//! 127.0.0.1), and talks to it with the `host` command or with the library's
//! codec over a socket. Nothing here opens a vsock socket: these machines'
//! kernels have no vsock loopback, so vsock addresses are only parsed.

mod common;

use common::{TempDir as Tmp, agentwire};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentwire::payload::core::{CoreErrorKind, Ping};
use agentwire::payload::exec::{ExecRequest, ExecSignal};
use agentwire::{Message, MessageCodec, Payload};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

const BIN: &str = env!("CARGO_BIN_EXE_agentwire");

/// A running agent, killed on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
    tmp: Tmp,
}

impl Agent {
    fn start(tag: &str) -> Agent {
        let tmp = Tmp::new(tag);
        std::fs::create_dir(tmp.0.join("root")).unwrap();
        let socket = tmp.0.join("agent.sock");
        let child = Command::new(BIN)
            .args(["agent", "--listen"])
            .arg(&socket)
            .arg("--root")
            .arg(tmp.0.join("root"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the agent did not create {}", socket.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Agent { child, socket, tmp }
    }

    fn root(&self) -> PathBuf {
        self.tmp.0.join("root")
    }

    fn host(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut all = vec!["host", "--connect", self.socket.to_str().unwrap()];
        all.extend_from_slice(args);
        agentwire(&all, stdin)
    }

    async fn connect(&self) -> Framed<UnixStream, MessageCodec> {
        let mut framed = Framed::new(UnixStream::connect(&self.socket).await.unwrap(), MessageCodec::new());
        for want in ["core.ready", "core.init.resolved"] {
            let m = next(&mut framed).await;
            assert_eq!(m.message_type().wire_name(), want);
        }
        framed
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn next(framed: &mut Framed<UnixStream, MessageCodec>) -> Message {
    let item = tokio::time::timeout(Duration::from_secs(20), framed.next()).await.expect("a frame within 20 s");
    item.expect("the connection is open").expect("the stream is intact").expect("the frame decodes")
}

fn error_kind(m: &Message) -> Option<(u32, String)> {
    match &m.payload {
        Payload::Error(e) => Some((m.id, e.kind.as_str().to_string())),
        _ => None,
    }
}

#[test]
fn the_agent_refuses_addresses_beyond_loopback_and_malformed_vsock_ones() {
    let root = Tmp::new("refuse");
    for addr in ["0.0.0.0:7000", "[::]:7000", "192.0.2.1:7000", "tcp:10.1.2.3:80"] {
        let out = agentwire(&["agent", "--listen", addr, "--root", root.0.to_str().unwrap()], b"");
        assert_eq!(out.status.code(), Some(2), "{addr}");
        assert!(text(&out.stderr).contains("loopback only"), "{addr}: {}", text(&out.stderr));
    }
    for addr in ["vsock:port", "vsock:1:x", "vsock:-5", "nowhere"] {
        let out = agentwire(&["agent", "--listen", addr], b"");
        assert_eq!(out.status.code(), Some(2), "{addr}");
        assert!(text(&out.stderr).contains(addr), "{addr}: {}", text(&out.stderr));
    }
}

#[test]
fn the_agent_serves_tcp_on_loopback() {
    let tmp = Tmp::new("tcp");
    std::fs::create_dir(tmp.0.join("root")).unwrap();
    let mut child = Command::new(BIN)
        .args(["agent", "--listen", "127.0.0.1:0", "--root"])
        .arg(tmp.0.join("root"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stderr.take().unwrap()), &mut line).unwrap();
    let addr = line.split_whitespace().find_map(|w| w.strip_prefix("tcp:")).unwrap().trim_end_matches(',');
    let out = agentwire(&["host", "--connect", addr, "ping", "--count", "3"], b"");
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().filter(|l| l.starts_with("pong ")).count(), 3);
}

#[test]
fn the_socket_is_private_and_exec_gives_the_remote_streams_and_status() {
    use std::os::unix::fs::PermissionsExt;
    let agent = Agent::start("exec");
    let mode = std::fs::metadata(&agent.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let out = agent.host(&["exec", "sh", "-c", "cat; echo err >&2; exit 7"], b"abc\x00def");
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"abc\x00def");
    assert_eq!(text(&out.stderr), "err\n");

    let out = agent.host(&["exec", "--cwd", "/", "-e", "A=1", "sh", "-c", "echo $A $(pwd)"], b"");
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "1 /\n".to_string()));

    let out = agent.host(&["exec", "/nonexistent/program"], b"");
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("(not_found)"), "{}", text(&out.stderr));

    let out = agent.host(&["exec", "--cwd", "/nonexistent/dir", "true"], b"");
    assert_eq!(out.status.code(), Some(126));
    assert!(text(&out.stderr).contains("(bad_cwd)"), "{}", text(&out.stderr));

    let script = agent.root().join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let out = agent.host(&["exec", script.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(126));
    assert!(text(&out.stderr).contains("(permission_denied)"), "{}", text(&out.stderr));

    let out = agent.host(&["exec", "-e", "NOEQUALS", "true"], b"");
    assert!(text(&out.stderr).contains("(bad_args)"), "{}", text(&out.stderr));
}

#[test]
fn files_go_in_and_out_and_nothing_outside_the_root_is_reachable() {
    let agent = Agent::start("fs");
    let local = agent.tmp.0.join("local.bin");
    let data: Vec<u8> = (0..7_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let out = agent.host(&["fs-put", local.to_str().unwrap(), "/sub/../copy.bin"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(agent.root().join("copy.bin")).unwrap(), data);
    let out = agent.host(&["fs-get", "/copy.bin"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout == data, "{} bytes came back", out.stdout.len());

    // Outside the root: by `..`, and through a symlink that points out of it.
    std::fs::write(agent.tmp.0.join("secret"), "secret").unwrap();
    std::os::unix::fs::symlink(agent.tmp.0.join("secret"), agent.root().join("link")).unwrap();
    std::os::unix::fs::symlink(&agent.tmp.0, agent.root().join("dirlink")).unwrap();
    for path in ["/../secret", "../secret", "/a/../../secret", "/link", "/dirlink/secret"] {
        let out = agent.host(&["fs-get", path], b"");
        assert_eq!(out.status.code(), Some(1), "{path}");
        assert!(text(&out.stderr).contains("outside the root"), "{path}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "{path}");
    }
    let out = agent.host(&["fs-put", local.to_str().unwrap(), "/dirlink/planted"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(!agent.tmp.0.join("planted").exists());
    // A link to a file that does not exist yet: creating through it is refused.
    std::os::unix::fs::symlink(agent.tmp.0.join("created-outside"), agent.root().join("dangling")).unwrap();
    let out = agent.host(&["fs-put", local.to_str().unwrap(), "/dangling"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("leads nowhere"), "{}", text(&out.stderr));
    assert!(!agent.tmp.0.join("created-outside").exists());
}

#[tokio::test]
async fn a_frame_the_agent_cannot_decode_gets_core_error_and_the_connection_stays() {
    let agent = Agent::start("errors");
    let mut framed = agent.connect().await;
    let bad: Vec<(Vec<u8>, u32, &str)> = vec![
        (common::raw_frame(5, 0, b"\xff\xff"), 5, "malformed_message"),
        (common::frame(6, 0, "core.future.thing", b"\xa0"), 6, "unsupported_message_type"),
        (common::frame(7, 0, "core.ping", b"\x63abc"), 7, "invalid_payload"),
        (common::frame(8, 1, "core.ping", b"\xa0"), 8, "invalid_flags"),
        (common::frame(9, 0, "core.exec.stdin", b"\xa1\x64data\x41x"), 9, "invalid_session"),
        (common::frame(10, 1, "core.pong", b"\xa0"), 10, "unsupported_message_type"),
        (common::frame(0, 2, "core.exec.request", b"\xa1\x63cmd\x64true"), 0, "invalid_session"),
    ];
    for (bytes, id, kind) in &bad {
        framed.get_mut().write_all(bytes).await.unwrap();
        let reply = next(&mut framed).await;
        assert_eq!(error_kind(&reply), Some((*id, kind.to_string())), "{kind}: {reply:?}");
        framed.send(Message::new(100 + id, Ping {})).await.unwrap();
        let pong = next(&mut framed).await;
        assert!(matches!(pong.payload, Payload::Pong(_)) && pong.id == 100 + id, "{pong:?}");
    }
    assert_eq!(CoreErrorKind::KNOWN.len(), 6);
}

#[tokio::test]
async fn broken_framing_closes_only_that_connection_and_the_agent_keeps_accepting() {
    let agent = Agent::start("framing");
    let mut kept = agent.connect().await;
    let mut broken = agent.connect().await;
    // A length below the header's five bytes: nothing after it can be trusted.
    broken.get_mut().write_all(b"\x00\x00\x00\x02\x00\x00").await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(20), broken.next()).await.unwrap();
    assert!(end.is_none(), "the agent closes the broken connection: {end:?}");

    kept.send(Message::new(1, Ping {})).await.unwrap();
    assert!(matches!(next(&mut kept).await.payload, Payload::Pong(_)));
    let mut fresh = agent.connect().await;
    fresh.send(Message::new(1, Ping {})).await.unwrap();
    assert!(matches!(next(&mut fresh).await.payload, Payload::Pong(_)));
}

#[tokio::test]
async fn a_signal_reaches_the_command_and_the_status_says_so() {
    let agent = Agent::start("signal");
    let mut framed = agent.connect().await;
    let mut req = ExecRequest::new("sleep");
    req.args = vec!["30".into()];
    framed.send(Message::new(3, req)).await.unwrap();
    assert!(matches!(next(&mut framed).await.payload, Payload::ExecStarted(_)));
    // A second request on the open id is refused; the session is untouched.
    framed.send(Message::new(3, ExecRequest::new("true"))).await.unwrap();
    assert_eq!(error_kind(&next(&mut framed).await), Some((3, "invalid_session".into())));
    framed.send(Message::new(3, ExecSignal { signal: 15 })).await.unwrap();
    match next(&mut framed).await.payload {
        Payload::ExecExited(e) => assert_eq!(e.code, 128 + 15),
        other => panic!("{other:?}"),
    }
}

#[test]
fn demo_runs_every_check_and_its_capture_reads_back() {
    let tmp = Tmp::new("demo");
    let capture = tmp.0.join("demo.cap");
    let out = agentwire(
        &["demo", "--sessions", "16", "--file-mib", "8", "--pings", "100", "--capture", capture.to_str().unwrap()],
        b"",
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("checks failed: 0"), "{stdout}");
    assert!(stdout.contains("16 exec sessions at once: each got exactly its own"), "{stdout}");
    let inspected = agentwire(&["inspect", "--json", capture.to_str().unwrap()], b"");
    assert_eq!(inspected.status.code(), Some(0), "{}", text(&inspected.stderr));
    let records: Vec<serde_json::Value> =
        text(&inspected.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let first: Vec<_> = records[..4].iter().map(|r| r["t"].as_str().unwrap()).collect();
    assert_eq!(first, ["core.bootstrap", "core.ready", "core.init.resolved", "core.init.ack"]);
    assert_eq!(records.last().unwrap()["t"], "core.shutdown");
    // The one frame the agent cannot know is the demo's unknown type; everything else decodes.
    let errors: Vec<_> = records.iter().filter(|r| r.get("error").is_some()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["t"], "demo.unknown");
    assert!(Path::new(&capture).metadata().unwrap().len() > 16 << 20);
}

/// vsock end to end, where the kernel has vsock loopback (CID 1). These
/// machines' kernels do not, and the test then says it was skipped without
/// opening a vsock socket.
#[test]
fn vsock_loopback_when_the_kernel_has_it() {
    if !Path::new("/sys/module/vsock_loopback").exists() {
        eprintln!("vsock_loopback_when_the_kernel_has_it: skipped: no vsock loopback in this kernel");
        return;
    }
    let port = 40_000 + std::process::id() % 20_000;
    let listen = format!("vsock:{port}");
    let mut child = Command::new(BIN).args(["agent", "--listen", &listen]).stderr(Stdio::null()).spawn().unwrap();
    let connect = format!("vsock:1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = agentwire(&["host", "--connect", &connect, "ping", "--count", "2"], b"");
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test]
async fn a_connection_holds_at_most_1024_sessions_at_once() {
    use agentwire::payload::fs::{FsData, FsOp, FsRequest};
    let agent = Agent::start("limit");
    let mut framed = agent.connect().await;
    // A streamed write stays open until its last chunk: 1024 of them, no process each.
    let write = |id| Message::new(id, FsRequest { op: FsOp::Write { handle: 999, offset: 0, len: None } });
    for id in 1..=1024 {
        framed.feed(write(id)).await.unwrap();
    }
    framed.send(write(1025)).await.unwrap();
    let refused = next(&mut framed).await;
    assert_eq!(error_kind(&refused), Some((1025, "invalid_session".into())), "{refused:?}");
    // One ends; then a new session is taken.
    framed.send(Message::new(7, FsData { data: bytes::Bytes::new() })).await.unwrap();
    let ended = next(&mut framed).await;
    assert!(matches!(&ended.payload, Payload::FsResponse(r) if !r.ok) && ended.id == 7, "{ended:?}");
    framed.send(write(2000)).await.unwrap();
    framed.send(Message::new(2000, FsData { data: bytes::Bytes::new() })).await.unwrap();
    let answered = next(&mut framed).await;
    assert!(matches!(&answered.payload, Payload::FsResponse(_)) && answered.id == 2000, "{answered:?}");
}
