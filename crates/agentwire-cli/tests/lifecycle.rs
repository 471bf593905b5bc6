//! Starting and stopping the agent cleanly: a stale socket of a dead agent is
//! replaced, a live one is not taken over, and SIGTERM removes the socket,
//! ends the sessions (their commands killed) and exits 0.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TempDir as Tmp, peak_rss_kib, wait_listening};

const BIN: &str = env!("CARGO_BIN_EXE_agentwire");

fn start(socket: &Path, root: &Path) -> Child {
    start_with(socket, root, &[])
}

/// An agent with `extra` arguments.
fn start_with(socket: &Path, root: &Path, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(["agent", "--listen"])
        .arg(socket)
        .arg("--root")
        .arg(root)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    try_wait_for(child, limit).unwrap_or_else(|| panic!("still running after {limit:?}"))
}

/// The child's exit status once it exits within `limit`; `None` if it is still running then.
fn try_wait_for(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_left_alone() {
    let tmp = Tmp::new("stale");
    let socket = tmp.0.join("agent.sock");
    // A socket file whose listener is gone, as a killed agent leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut first = start(&socket, &tmp.0);
    wait_listening(&socket);
    // A second agent on the same path must not take it over.
    let mut second = start_with(&socket, &tmp.0, &["-vv"]);
    let status = try_wait_for(&mut second, Duration::from_secs(20));
    if status.is_none() {
        let _ = second.kill();
        let _ = second.wait();
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    let first_state = first.try_wait().unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "second agent: {err}\nfirst agent exited: {first_state:?}");
    assert!(err.contains("another process is listening"), "{err}");
    std::os::unix::net::UnixStream::connect(&socket).expect("the first agent still serves");
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn sigterm_removes_the_socket_kills_the_sessions_and_exits_0() {
    let tmp = Tmp::new("sigterm");
    let socket = tmp.0.join("agent.sock");
    let mut agent = start(&socket, &tmp.0);
    wait_listening(&socket);
    // A command that would outlive the agent if its session were not ended.
    // `sleep` with an argument no other process has: found by its own command line.
    let marker = format!("{}", 1_000_000 + std::process::id());
    let mut host = Command::new(BIN)
        .args(["host", "--connect", socket.to_str().unwrap(), "exec", "sleep", &marker])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.len() >= 2 && args[0].ends_with(b"sleep") && args[1] == marker.as_bytes()
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !running() {
        assert!(Instant::now() < deadline, "the command did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut agent, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "the socket file is removed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while running() {
        assert!(Instant::now() < deadline, "the session's command outlived the agent");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = host.kill();
    let _ = host.wait();
}

/// Sends a ping as a host through the command; whether it was answered.
fn ping(socket: &Path) -> bool {
    Command::new(BIN)
        .args(["host", "--connect", socket.to_str().unwrap(), "ping", "--count", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// The agent under a limit of 64 open files, given 200 connections: accept
/// fails with EMFILE for those beyond the limit, which refuses them and not the
/// agent; once they close, a host is served again.
#[test]
fn running_out_of_descriptors_refuses_connections_not_the_agent() {
    let tmp = Tmp::new("emfile");
    let socket = tmp.0.join("agent.sock");
    let mut agent = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n 64 && exec {BIN} agent --listen {} --root {}", socket.display(), tmp.0.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&socket);
    let held: Vec<_> = (0..200).filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok()).collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(agent.try_wait().unwrap().is_none(), "the agent died with {} connections open", held.len());
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ping(&socket) {
        assert!(agent.try_wait().unwrap().is_none(), "the agent died");
        assert!(Instant::now() < deadline, "no host is served after the connections closed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = agent.kill();
    let _ = agent.wait();
}

/// 500 connections each send a header claiming a 4 MiB frame and one byte of
/// it, then nothing: the agent's memory grows with what arrived, not with what
/// the headers claim, and a handshake timeout (not tested here: 120 s) would
/// close them. Meanwhile another host is served.
#[test]
fn headers_that_claim_4_mib_cost_what_arrived() {
    use std::io::Write;
    let tmp = Tmp::new("trickle");
    let socket = tmp.0.join("agent.sock");
    let mut agent = start(&socket, &tmp.0);
    wait_listening(&socket);
    let before = peak_rss_kib(agent.id());
    let mut held = Vec::new();
    for _ in 0..500 {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        let mut claim = (4u32 * 1024 * 1024).to_be_bytes().to_vec();
        claim.extend([0, 0, 0, 0, 0, 0xa3]);
        s.write_all(&claim).unwrap();
        held.push(s);
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(ping(&socket), "another host is served");
    let after = peak_rss_kib(agent.id());
    eprintln!("500 connections claiming 4 MiB each: agent peak RSS {before} KiB before, {after} KiB after");
    assert!(after < before + 128 * 1024, "peak RSS grew from {before} to {after} KiB");
    drop(held);
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Everything `stream` gives until the agent closes it (within its read timeout).
fn read_until_closed(stream: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    let mut got = Vec::new();
    std::io::Read::read_to_end(stream, &mut got).unwrap_or_else(|e| panic!("the connection stayed open: {e}"));
    got
}

/// A connection that never finishes its start-up exchange, and one that goes
/// quiet, are closed by the agent after their (configurable) limits.
#[test]
fn handshake_and_idle_timeouts_close_quiet_connections() {
    let tmp = Tmp::new("timeouts");
    let socket = tmp.0.join("agent.sock");
    let mut agent = start_with(&socket, &tmp.0, &["--handshake-timeout", "1", "--idle-timeout", "1"]);
    wait_listening(&socket);
    let mut silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    // The agent answers a missing bootstrap with core.error on id 0, then closes.
    let got = read_until_closed(&mut silent).len();
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    assert!(got > 0, "an initialization_failed error came first");
    // A connection through its start-up exchange, then quiet: closed by the idle limit.
    let mut quiet = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    quiet.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let frame = |m: agentwire::Message| {
        let mut out = bytes::BytesMut::new();
        tokio_util::codec::Encoder::encode(&mut agentwire::MessageCodec::new(), m, &mut out).unwrap();
        out.to_vec()
    };
    use std::io::Write;
    quiet
        .write_all(&frame(agentwire::Message::new(0, agentwire::payload::bootstrap::GuestBootstrap::default())))
        .unwrap();
    quiet.write_all(&frame(agentwire::Message::new(0, agentwire::payload::core::InitAck::default()))).unwrap();
    let started = Instant::now();
    let got = read_until_closed(&mut quiet);
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("core.ready") && !text.contains("core.error"), "ready came first: {text:?}");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    let _ = agent.kill();
    let _ = agent.wait();
}
