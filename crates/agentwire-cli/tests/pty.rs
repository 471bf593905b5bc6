//! Terminals, stdin that a command does not read, and what is left when a
//! host goes away: each test starts its own `agentwire agent` on a Unix
//! socket in a temporary directory and drives it with `agentwire_client`
//! (or with the `host` command).

mod common;

use common::RunningAgent;

use std::future::Future;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use agentwire_client::{Client, Command, Exec, ExecEvent, ExitStatus};
use bytes::Bytes;

const BIN: &str = env!("CARGO_BIN_EXE_agentwire");

/// A connection to `agent` after the start-up exchange.
async fn connect(agent: &RunningAgent) -> Client {
    let stream = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    Client::connect(stream).await.unwrap()
}

/// `f` within `secs` seconds, or the test fails saying `what`.
async fn within<T>(secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not within {secs} s"),
    }
}

/// Everything the command writes until it ends: (stdout, stderr frames seen, status).
async fn collect(exec: &mut Exec) -> (String, usize, ExitStatus) {
    let (mut out, mut stderr_frames) = (Vec::new(), 0);
    loop {
        match exec.next().await.unwrap() {
            Some(ExecEvent::Stdout(d)) => out.extend_from_slice(&d),
            Some(ExecEvent::Stderr(_)) => stderr_frames += 1,
            Some(ExecEvent::Exited(status)) => {
                return (String::from_utf8_lossy(&out).into_owned(), stderr_frames, status);
            }
            Some(_) => {}
            None => panic!("no exit"),
        }
    }
}

/// Reads stdout until it contains `needle`; all of it so far.
async fn read_until(exec: &mut Exec, out: &mut String, needle: &str) {
    while !out.contains(needle) {
        match exec.next().await.unwrap() {
            Some(ExecEvent::Stdout(d)) => out.push_str(&String::from_utf8_lossy(&d)),
            Some(ExecEvent::Stderr(d)) => panic!("a stderr frame on a terminal: {d:?}"),
            Some(ExecEvent::Exited(s)) => panic!("ended ({s:?}) before {needle:?}; output: {out:?}"),
            Some(_) => {}
            None => panic!("no more events"),
        }
    }
}

#[tokio::test]
async fn tty_gives_a_terminal_of_the_requested_size_and_all_output_is_stdout() {
    let agent = RunningAgent::start("pty-size");
    let client = connect(&agent).await;
    let cmd = Command::new("sh").args(["-c", "tty -s && echo yes; stty size; echo to-stderr >&2"]).tty(24, 80);
    let mut exec = client.exec(cmd).await.unwrap();
    let (out, stderr_frames, status) = within(20, "the command", collect(&mut exec)).await;
    assert!(status.success(), "{status:?}: {out:?}");
    assert!(out.contains("yes\r\n"), "not a terminal: {out:?}");
    assert!(out.contains("24 80\r\n"), "{out:?}");
    assert!(out.contains("to-stderr\r\n"), "stderr goes to the terminal: {out:?}");
    assert_eq!(stderr_frames, 0, "no stderr frame with a terminal");

    // Another size, and the same command without a terminal.
    let mut exec = client.exec(Command::new("stty").arg("size").tty(7, 133)).await.unwrap();
    let (out, _, _) = within(20, "stty", collect(&mut exec)).await;
    assert_eq!(out, "7 133\r\n");
    let out = client.exec(Command::new("sh").args(["-c", "tty -s || echo no"])).await.unwrap().output().await.unwrap();
    assert_eq!(out.stdout, b"no\n");
}

#[tokio::test]
async fn resize_changes_the_size_the_running_shell_sees() {
    let agent = RunningAgent::start("pty-resize");
    let client = connect(&agent).await;
    let mut exec = client.exec(Command::new("sh").tty(24, 80)).await.unwrap();
    let input = exec.input();
    // An empty stdin frame closes nothing on a terminal: the shell keeps reading.
    input.close().await.unwrap();
    input.write(Bytes::from_static(b"stty size\n")).await.unwrap();
    let mut out = String::new();
    within(20, "the first size", read_until(&mut exec, &mut out, "24 80")).await;
    input.resize(40, 100).await.unwrap();
    input.write(Bytes::from_static(b"stty size\nexit 7\n")).await.unwrap();
    let (rest, stderr_frames, status) = within(20, "the shell's end", collect(&mut exec)).await;
    assert!(rest.contains("40 100"), "{rest:?}");
    assert_eq!((stderr_frames, status.code()), (0, Some(7)), "{rest:?}");
}

#[tokio::test]
async fn a_signal_ends_a_command_on_a_terminal_with_minus_one() {
    let agent = RunningAgent::start("pty-signal");
    let client = connect(&agent).await;
    let mut exec = client.exec(Command::new("sleep").arg("100").tty(24, 80)).await.unwrap();
    assert!(matches!(exec.next().await.unwrap(), Some(ExecEvent::Started(_))));
    exec.input().signal(15).await.unwrap();
    let (_, _, status) = within(10, "the end after SIGTERM", collect(&mut exec)).await;
    assert_eq!(status, ExitStatus::from_code(-1));
}

/// The legacy (generation-7) execution: the client sends stdin as fast as the
/// connection takes it and the agent refuses what passes its queue with
/// `core.exec.stdin.error`. (A controlled execution's writer waits for stdin
/// acks instead; tests/client_flow.rs has that case.)
#[tokio::test]
async fn stdin_a_command_never_reads_stops_neither_pings_nor_signals() {
    let agent = RunningAgent::start("stdin-flood");
    let stream = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    let client = std::sync::Arc::new(Client::builder().exec_limits(None).connect(stream).await.unwrap());
    let mut exec = client.exec(Command::new("sleep").arg("100")).await.unwrap();
    let input = exec.input();
    // 64 MiB in 64 KiB frames, as fast as the connection takes them.
    let flood = tokio::spawn({
        let input = input.clone();
        async move {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            for _ in 0..1024 {
                input.write(chunk.clone()).await.unwrap();
            }
        }
    });
    let events = tokio::spawn(async move {
        let mut stdin_errors = 0;
        loop {
            match exec.next().await.unwrap() {
                // The queue still being written when the command is killed at the end: EPIPE.
                Some(ExecEvent::StdinError(e)) if e.errno == Some(32) => {}
                Some(ExecEvent::StdinError(e)) => {
                    assert_eq!((e.errno, e.errno_name.as_deref()), (None, None), "{e:?}");
                    stdin_errors += 1;
                }
                Some(ExecEvent::Exited(status)) => return (stdin_errors, status),
                Some(_) => {}
                None => panic!("no exit"),
            }
        }
    });
    // The connection keeps answering while the flood goes on, and after it.
    let started = Instant::now();
    let mut pings = 0;
    while !flood.is_finished() || pings < 5 {
        within(5, "a pong during the flood", client.ping()).await.unwrap();
        pings += 1;
        assert!(started.elapsed() < Duration::from_secs(120), "the flood did not get through");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flood.await.unwrap();
    // A signal on the same id still arrives.
    input.signal(9).await.unwrap();
    let (stdin_errors, status) = within(10, "the end after SIGKILL", events).await.unwrap();
    assert_eq!(status, ExitStatus::from_code(-1));
    // At most about 1 MiB + the pipe's buffer was taken; the rest was refused, frame by frame.
    assert!(stdin_errors >= 900, "{stdin_errors} stdin errors");
}

/// The pids whose command line has `arg` as an argument.
fn pids_with_arg(arg: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|&b| b == 0).any(|a| a == arg.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

async fn wait_for(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn no_process_of_a_session_outlives_its_connection() {
    let agent = RunningAgent::start("orphans");
    for tty in [false, true] {
        let client = connect(&agent).await;
        // Arguments no other process has: `sleep 300.<pid><0|1>`.
        let unique = |n| format!("{n}.{}{}", std::process::id(), tty as u8);
        let (a, b) = (unique(300), unique(301));
        let mut cmd = Command::new("sh").args(["-c", &format!("sleep {a} & sleep {b}")]);
        if tty {
            cmd = cmd.tty(24, 80);
        }
        let exec = client.exec(cmd).await.unwrap();
        wait_for(10, "both sleeps start", || pids_with_arg(&a).len() == 1 && pids_with_arg(&b).len() == 1).await;
        drop(exec);
        drop(client);
        wait_for(5, "both sleeps end", || pids_with_arg(&a).is_empty() && pids_with_arg(&b).is_empty()).await;
    }
}

/// `agentwire ARGS` with `stdin`, killed if it has not ended within 20 s.
fn agentwire(args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = Process::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(out) => out,
        Err(_) => {
            let _ = Process::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("agentwire {args:?} did not end within 20 s");
        }
    }
}

#[test]
fn host_exec_tty_allocates_a_terminal_without_a_local_one() {
    let agent = RunningAgent::start("host-tty");
    let sock = agent.socket.to_str().unwrap();
    // stdin is a pipe: no raw mode; its end reaches the shell as Ctrl-D.
    let out = agentwire(&["host", "--connect", sock, "exec", "--tty", "sh"], b"tty -s && echo yes; stty size\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout:?} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("yes\r\n") && stdout.contains("24 80\r\n"), "{stdout:?}");
    let out = agentwire(&["host", "--connect", sock, "exec", "-t", "sh", "-c", "echo e >&2; exit 3"], b"");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "e\r\n");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Under `script`, which gives the command a terminal: raw mode while it
/// runs (the remote terminal does the echo and line editing), the local
/// terminal's settings back afterwards.
#[test]
fn host_exec_tty_on_a_terminal_goes_raw_and_restores_it() {
    let agent = RunningAgent::start("host-tty-raw");
    let inner = format!(
        "stty size; stty -a | grep -o -- '-\\?icanon' | head -1; \
         {BIN} host --connect {} exec --tty sh -c 'stty size; exit 4'; echo status=$?; \
         stty -a | grep -o -- '-\\?icanon' | head -1",
        agent.socket.display()
    );
    let out = Process::new("timeout")
        .args(["30", "script", "-qec", &format!("stty rows 33 cols 99; {inner}"), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The local terminal's size became the remote one's.
    assert_eq!(stdout.matches("33 99").count(), 2, "{stdout:?}");
    assert!(stdout.contains("status=4"), "{stdout:?}");
    // Canonical mode before and after (`icanon`, not `-icanon`).
    let modes: Vec<_> = stdout.lines().map(str::trim).filter(|l| l.ends_with("icanon")).collect();
    assert_eq!(modes, ["icanon", "icanon"], "{stdout:?}");
}
