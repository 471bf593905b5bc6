//! Starting and stopping the agent cleanly: a stale socket of a dead agent is
//! replaced, a live one is not taken over, and SIGTERM removes the socket,
//! ends the sessions (their commands killed) and exits 0.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TempDir as Tmp;

const BIN: &str = env!("CARGO_BIN_EXE_agentwire");

fn start(socket: &Path, root: &Path) -> Child {
    Command::new(BIN)
        .args(["agent", "--listen"])
        .arg(socket)
        .arg("--root")
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_listening(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {}", socket.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after {limit:?}");
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
    let mut second = start(&socket, &tmp.0);
    let status = wait_exit(&mut second, Duration::from_secs(20));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
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
    let marker = format!("agentwire-sigterm-{}", std::process::id());
    let mut host = Command::new(BIN)
        .args(["host", "--connect", socket.to_str().unwrap(), "exec", "sh", "-c"])
        .arg(format!("exec -a {marker} sleep 300"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
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
