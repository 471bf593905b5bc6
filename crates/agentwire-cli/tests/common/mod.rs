//! Helpers of the command's tests: the codec's test helpers, and running the built binary.
#![allow(dead_code)]

#[path = "../../../agentwire/tests/common/mod.rs"]
mod codec;

pub use codec::*;

/// Runs the built `agentwire` command with `args`, feeding it `stdin` (from a
/// thread, so that a command that writes a lot before reading cannot block).
pub fn agentwire(args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentwire"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    output
}

/// A running `agentwire agent` on a Unix socket in a temporary directory: its
/// root is `DIR/root`, with `DIR/outside` beside it. Killed on drop.
pub struct RunningAgent {
    /// The agent process.
    pub child: std::process::Child,
    /// Its socket.
    pub socket: std::path::PathBuf,
    /// The temporary directory.
    pub tmp: TempDir,
}

impl RunningAgent {
    /// Starts an agent, and waits until it takes connections.
    pub fn start(tag: &str) -> RunningAgent {
        RunningAgent::start_with(tag, &[])
    }

    /// The same with `env` added to the agent's environment.
    pub fn start_with(tag: &str, env: &[(&str, &str)]) -> RunningAgent {
        use std::process::{Command, Stdio};
        let tmp = TempDir::new(tag);
        std::fs::create_dir(tmp.0.join("root")).unwrap();
        std::fs::create_dir(tmp.0.join("outside")).unwrap();
        let socket = tmp.0.join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_agentwire"))
            .args(["agent", "--listen"])
            .arg(&socket)
            .arg("--root")
            .arg(tmp.0.join("root"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(&socket);
        RunningAgent { child, socket, tmp }
    }

    /// The directory its `core.fs.*` paths are confined to.
    pub fn root(&self) -> std::path::PathBuf {
        self.tmp.0.join("root")
    }

    /// A directory beside the root, outside it.
    pub fn outside(&self) -> std::path::PathBuf {
        self.tmp.0.join("outside")
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts connections on `socket` (its file appears
/// at `bind`, a moment before `listen`).
pub fn wait_listening(socket: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(std::time::Instant::now() < deadline, "nothing listens on {}", socket.display());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Peak resident memory of process `pid` (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap();
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// What a process wrote on standard error, line by line, as it runs.
pub type Log = std::sync::Arc<std::sync::Mutex<String>>;

/// Starts `agentwire -v relay --agent unix:AGENT --listen unix:SOCKET` (with
/// `--bootstrap FILE` when given) and waits up to `wait` until it says it is
/// ready. Its standard error is collected in the returned log; when it does
/// not become ready it is stopped and the error is its log.
pub fn start_relay(
    agent: &std::path::Path,
    socket: &std::path::Path,
    bootstrap: Option<&std::path::Path>,
    wait: std::time::Duration,
) -> Result<(std::process::Child, Log), String> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentwire"));
    command.args(["-v", "relay", "--agent"]).arg(format!("unix:{}", agent.display()));
    command.arg("--listen").arg(format!("unix:{}", socket.display()));
    if let Some(path) = bootstrap {
        command.arg("--bootstrap").arg(path);
    }
    // Plain log lines, to look for words in them.
    command.env("NO_COLOR", "1").env_remove("RUST_LOG");
    let mut relay = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let log = Log::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = std::io::BufReader::new(relay.stderr.take().unwrap());
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("is ready") {
                let _ = tx.send(true);
            }
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
        let _ = tx.send(false);
    });
    match rx.recv_timeout(wait) {
        Ok(true) => Ok((relay, log)),
        _ => {
            let _ = relay.kill();
            let _ = relay.wait();
            let text = log.lock().unwrap().clone();
            Err(text)
        }
    }
}

/// The deployed agent, microsandbox-agentd 0.7.13, booted as PID 1 of a QEMU
/// guest by `agentwire vm --boot-only` with the image `vm/build-reference.sh
/// 0.7.13` writes to `target/vm-ref-0.7.13` (or under `$AGENTWIRE_VM_REF_DIR`),
/// and a connection to its port, made within 60 s. Fails when the image is
/// missing. The temporary directory and QEMU (killed on drop) go with the caller.
pub async fn boot_reference_0_7_13(tag: &str) -> (TempDir, tokio::process::Child, tokio::net::UnixStream) {
    let base = std::env::var_os("AGENTWIRE_VM_REF_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let image = base.join("vm-ref-0.7.13");
    for f in ["vmlinuz", "initramfs.cpio.gz", "reference"] {
        assert!(image.join(f).is_file(), "no {} (vm/build-reference.sh 0.7.13 builds it)", image.join(f).display());
    }
    let tmp = TempDir::new(tag);
    let socket = tmp.0.join("agent.sock");
    let vm = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentwire"))
        .args(["vm", "--boot-only", "--image"])
        .arg(&image)
        .arg("--socket")
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let connect = async {
        loop {
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    };
    let stream =
        tokio::time::timeout(std::time::Duration::from_secs(60), connect).await.expect("QEMU's socket within 60 s");
    (tmp, vm, stream)
}
