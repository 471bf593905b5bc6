//! The `agentwire agent`, `host` and `demo` commands, run as built: each test
//! starts its own agent on a Unix socket in a temporary directory (or on
//! 127.0.0.1), and talks to it with the `host` command or with the library's
//! codec over a socket. Only the vsock test opens vsock sockets, and only
//! where the kernel has vsock loopback (CID 1); elsewhere it is ignored.

mod common;

use common::{TempDir as Tmp, agentwire};

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{CoreErrorKind, InitAck, Ping};
use agentwire::payload::exec::{ExecRequest, ExecSignal, ExecStdin};
use agentwire::{Message, MessageCodec, Payload};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

const BIN: &str = env!("CARGO_BIN_EXE_agentwire");

/// The agent of these tests.
use common::RunningAgent as Agent;

impl Agent {
    fn host(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut all = vec!["host", "--connect", self.socket.to_str().unwrap()];
        all.extend_from_slice(args);
        agentwire(&all, stdin)
    }

    /// A raw connection after the start-up exchange, in the deployed order:
    /// the host's bootstrap, the agent's init.resolved, the host's ack, the agent's ready.
    async fn connect(&self) -> Framed<UnixStream, MessageCodec> {
        let mut framed = Framed::new(UnixStream::connect(&self.socket).await.unwrap(), MessageCodec::new());
        framed.send(Message::new(0, GuestBootstrap::default())).await.unwrap();
        assert_eq!(next(&mut framed).await.message_type().wire_name(), "core.init.resolved");
        framed.send(Message::new(0, InitAck::default())).await.unwrap();
        assert_eq!(next(&mut framed).await.message_type().wire_name(), "core.ready");
        framed
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
        // (core.exec.stdin on an id with no session gets no reply at all: see
        // exec_control_frames_for_an_unknown_id_get_no_reply.)
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
    // Every kind a frame can earn; initialization_failed and capability_unavailable are not a frame's.
    assert_eq!(CoreErrorKind::KNOWN.len(), 8);
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
        // Killed by a signal: -1, as the reference agent says (spec 10.6).
        Payload::ExecExited(e) => assert_eq!(e.code, -1),
        other => panic!("{other:?}"),
    }
}

/// Runs `sh -c SCRIPT` on `id` with no stdin, and returns its exit code.
async fn exit_code_of(framed: &mut Framed<UnixStream, MessageCodec>, id: u32, script: &str) -> i32 {
    let mut req = ExecRequest::new("sh");
    req.args = vec!["-c".into(), script.into()];
    framed.send(Message::new(id, req)).await.unwrap();
    framed.send(Message::new(id, ExecStdin { data: bytes::Bytes::new() })).await.unwrap();
    loop {
        let m = next(framed).await;
        assert_eq!(m.id, id, "{m:?}");
        match m.payload {
            Payload::ExecStarted(_) | Payload::ExecStdout(_) | Payload::ExecStderr(_) => {}
            Payload::ExecExited(e) => return e.code,
            other => panic!("{script}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_command_killed_by_a_signal_exits_with_minus_one() {
    let agent = Agent::start("killed");
    let mut framed = agent.connect().await;
    assert_eq!(exit_code_of(&mut framed, 1, "kill -9 $$").await, -1);
    assert_eq!(exit_code_of(&mut framed, 2, "kill -TERM $$").await, -1);
    // An exit status that only looks like a signal's is still the status.
    assert_eq!(exit_code_of(&mut framed, 3, "exit 137").await, 137);
}

#[test]
fn host_exec_never_reports_a_killed_command_as_success() {
    let agent = Agent::start("host-killed");
    let out = agent.host(&["exec", "sh", "-c", "kill -9 $$"], b"");
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("agentwire host: sh was killed by a signal"), "{}", text(&out.stderr));
    // A status of its own is passed through as it is.
    let out = agent.host(&["exec", "sh", "-c", "exit 137"], b"");
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
}

#[tokio::test]
async fn exec_control_frames_for_an_unknown_id_get_no_reply() {
    use agentwire::payload::exec::ExecResize;
    let agent = Agent::start("unknown-id");
    let mut framed = agent.connect().await;
    // Never opened, and one whose session has ended (the host's stdin feeder can race the exit).
    assert_eq!(exit_code_of(&mut framed, 5, "true").await, 0);
    for id in [9, 5] {
        framed.send(Message::new(id, ExecStdin { data: bytes::Bytes::from_static(b"late") })).await.unwrap();
        framed.send(Message::new(id, ExecStdin { data: bytes::Bytes::new() })).await.unwrap();
        framed.send(Message::new(id, ExecSignal { signal: 9 })).await.unwrap();
        framed.send(Message::new(id, ExecResize { rows: 30, cols: 100 })).await.unwrap();
    }
    framed.send(Message::new(10, Ping {})).await.unwrap();
    let reply = next(&mut framed).await;
    assert!(matches!(reply.payload, Payload::Pong(_)) && reply.id == 10, "the next frame is the pong: {reply:?}");
}

#[tokio::test]
async fn set_stat_without_following_acts_on_the_link_not_its_target() {
    use agentwire::payload::fs::{FsOp, FsRequest, FsSetAttrs};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let agent = Agent::start("setstat-link");
    let target = agent.root().join("target");
    std::fs::write(&target, "x").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink("target", agent.root().join("link")).unwrap();
    let target_mtime = std::fs::metadata(&target).unwrap().mtime();
    let mut framed = agent.connect().await;
    let mut set_stat = async |id, attrs| {
        let op = FsOp::SetStat { path: "/link".into(), follow_symlink: false, attrs };
        framed.send(Message::new(id, FsRequest::new(op))).await.unwrap();
        match next(&mut framed).await.payload {
            Payload::FsResponse(r) => r,
            other => panic!("{other:?}"),
        }
    };

    // Times: the link's own change, the target's stay.
    let times = FsSetAttrs { atime: Some(1_000_000_000), mtime: Some(1_000_000_000), ..FsSetAttrs::default() };
    let r = set_stat(1, times).await;
    assert!(r.ok, "{r:?}");
    let link = std::fs::symlink_metadata(agent.root().join("link")).unwrap();
    assert_eq!(link.mtime(), 1_000_000_000);
    assert_eq!(std::fs::metadata(&target).unwrap().mtime(), target_mtime, "the target's mtime changed");

    // A mode: Linux cannot change a link's, so it is refused, and the target keeps its own.
    let r = set_stat(2, FsSetAttrs { mode: Some(0o600), ..FsSetAttrs::default() }).await;
    assert!(!r.ok, "{r:?}");
    assert!(r.error.as_deref().unwrap_or("").contains("symlink"), "{r:?}");
    assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o644, "the target's mode changed");

    // Owner: lchown on the link itself (to its own ids, which needs no privilege).
    let (uid, gid) = (link.uid(), link.gid());
    let r = set_stat(3, FsSetAttrs { uid: Some(uid), gid: Some(gid), ..FsSetAttrs::default() }).await;
    assert!(r.ok, "{r:?}");

    // Following the link still acts on the target.
    let op = FsOp::SetStat {
        path: "/link".into(),
        follow_symlink: true,
        attrs: FsSetAttrs { mode: Some(0o600), mtime: Some(2_000_000_000), ..FsSetAttrs::default() },
    };
    framed.send(Message::new(4, FsRequest::new(op))).await.unwrap();
    assert!(matches!(next(&mut framed).await.payload, Payload::FsResponse(r) if r.ok));
    let t = std::fs::metadata(&target).unwrap();
    assert_eq!((t.mtime(), t.permissions().mode() & 0o777), (2_000_000_000, 0o600));
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
    assert_eq!(first, ["core.bootstrap", "core.init.resolved", "core.init.ack", "core.ready"]);
    assert_eq!(records.last().unwrap()["t"], "core.shutdown");
    // The one frame the agent cannot know is the demo's unknown type; everything else decodes.
    let errors: Vec<_> = records.iter().filter(|r| r.get("error").is_some()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["t"], "demo.unknown");
    assert!(Path::new(&capture).metadata().unwrap().len() > 16 << 20);
}

/// vsock end to end, where the kernel has vsock loopback (CID 1): the build
/// script sets `cfg(vsock_loopback)` when a vsock socket can be bound to CID 1.
/// Elsewhere the test is ignored, and shows as such.
#[test]
#[cfg_attr(not(vsock_loopback), ignore = "no vsock loopback (CID 1) in this kernel, as detected by build.rs")]
fn vsock_loopback_when_the_kernel_has_it() {
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
    let write = |id| Message::new(id, FsRequest::new(FsOp::Write { handle: 999, offset: 0, len: None }));
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

#[test]
fn host_refuses_to_put_a_directory_and_a_closed_pipe_ends_it_quietly() {
    let agent = Agent::start("host-bad-input");
    let dir = agent.tmp.0.join("outside");
    let out = agent.host(&["fs-put", dir.to_str().unwrap(), "/copy"], b"");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not a regular file"), "{}", text(&out.stderr));
    assert!(!agent.root().join("copy").exists(), "no empty guest file is left");
    // `host exec yes | head -1`: the reader goes away; the command ends without a word.
    let mut child = Command::new(BIN)
        .args(["host", "--connect", agent.socket.to_str().unwrap(), "exec", "yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 2];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    assert_eq!(&first, b"y\n");
    drop(child.stdout.take());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the host kept running after its reader left");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.is_empty(), "quietly: {err}");
    assert_ne!(status.code(), Some(0), "the output was cut short");
}

#[test]
fn agent_help_says_its_limits_and_what_allow_net_allows() {
    let help = agentwire(&["agent", "--help"], b"");
    assert!(help.status.success());
    // Help wraps lines where the terminal ends; the words are looked for in one line.
    let help = text(&help.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    for words in [
        "1024 sessions",
        "1024 open file handles per relay client and 4096 in all",
        "refused with an error naming the limit",
        "file is removed if its handle created it",
        "resolve names by DNS",
        "no DNS query is sent",
    ] {
        assert!(help.contains(words), "{words:?} not in:\n{help}");
    }
}
