//! End-to-end transfer throughput through the agent and the host client,
//! against a raw copy of the same byte count over a Unix socketpair measured
//! in the same run (issue 16).
//!
//! ```text
//! cargo run --release -p agentwire-cli --example e2e_transfer -- [MIB] [ROUNDS] [--child [--no-splice]] [--fs-only] [--chunk KIB] [--window KIB]
//! ```
//!
//! `MIB` (default 1024) is the size of every transfer; `ROUNDS` (default 3)
//! how often each is repeated (the best of them is printed, and the median).
//! The agent runs in this process on one end of a Unix socketpair, or with
//! `--child` as `agentwire agent` (the binary next to this example's
//! directory, built by `cargo build --release -p agentwire-cli`) listening on
//! a Unix socket (with `--no-splice` passed on to it: no `splice` of file
//! reads and command output). `--fs-only` runs the file read alone. Transfers:
//!
//! - raw: `MIB` MiB written into one end of a socketpair and read from the
//!   other, 256 KiB at a time, by two threads;
//! - local pipe: the commands below run here, their stdout read from a
//!   pipe 1 MiB at a time (what a command and a pipe reach without the
//!   agent: the ceiling of an exec stream);
//! - exec: `head -c N /dev/zero` through `core.exec.*`, its stdout taken as
//!   events (`Exec::next`), under the execution flow control the bootstrap
//!   sets (`--chunk`, default 1024 KiB output chunks; `--window`, default
//!   8192 KiB output allowance);
//! - exec cat: `cat` of the tmpfs file;
//! - exec dd: `dd if=/dev/zero bs=1M`, which writes 1 MiB a write (GNU
//!   `head` writes 8 KiB: on this kind of machine it is the limit by itself);
//! - exec busybox cat, when `busybox` is installed: its `cat` moves the tmpfs
//!   file into the pipe with `sendfile`, without a copy, so this one shows what
//!   the agent and client carry when the command is not the limit;
//! - fs read: `Client::read_file` of an N-byte file on tmpfs (`/dev/shm`)
//!   into a sink, as raw bulk records.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentwire::payload::exec::ExecLimits;
use agentwire_agent::{Agent, Config};
use agentwire_client::{Client, Command, ExecEvent};

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// `n` bytes through a Unix socketpair, 256 KiB a write and a read.
fn raw_copy(n: u64) -> Duration {
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let buf = vec![0u8; 256 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            a.write_all(&buf[..k]).expect("raw write");
            left -= k as u64;
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < n {
        let k = b.read(&mut buf).expect("raw read");
        assert!(k > 0, "raw copy: early end");
        got += k as u64;
    }
    writer.join().expect("writer");
    start.elapsed()
}

/// The same command run here with its stdout on a pipe of 1 MiB read 1 MiB
/// at a time: what the command and a pipe alone reach (the limit of an exec stream).
fn local_pipe(program: &str, args: &[String], n: u64) -> Duration {
    let start = Instant::now();
    let mut child =
        std::process::Command::new(program).args(args).stdout(std::process::Stdio::piped()).spawn().expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    // 1 MiB, as the agent widens a command's stdout pipe for 1 MiB chunks.
    nix::fcntl::fcntl(&out, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20)).expect("F_SETPIPE_SZ");
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        match out.read(&mut buf).expect("pipe read") {
            0 => break,
            k => got += k as u64,
        }
    }
    assert!(child.wait().expect("wait").success());
    assert_eq!(got, n, "local pipe: bytes received");
    start.elapsed()
}

async fn exec_stream(client: &Client, cmd: Command, n: u64) -> Duration {
    let start = Instant::now();
    let mut exec = client.exec(cmd).await.expect("exec");
    let mut got = 0u64;
    loop {
        match exec.next().await.expect("exec event") {
            Some(ExecEvent::Stdout(d)) => got += d.len() as u64,
            Some(ExecEvent::Exited(s)) => {
                assert!(s.success(), "exec: {s:?}");
                break;
            }
            Some(_) => {}
            None => panic!("exec: no exit"),
        }
    }
    let took = start.elapsed();
    assert_eq!(got, n, "exec: bytes received");
    took
}

async fn fs_read(client: &Client, n: u64) -> Duration {
    let start = Instant::now();
    let got = client.read_file("/e2e.bin", &mut tokio::io::sink()).await.expect("read_file");
    let took = start.elapsed();
    assert_eq!(got, n, "fs read: bytes received");
    took
}

/// `f`, which must end within a minute (a transfer that stalls is a bug).
async fn within(what: &str, f: impl std::future::Future<Output = Duration>) -> Duration {
    match tokio::time::timeout(Duration::from_secs(60), f).await {
        Ok(d) => d,
        Err(_) => panic!("{what}: not finished after 60 s"),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn arg_after(args: &[String], name: &str) -> Option<u64> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut positional = args.iter().filter(|a| a.parse::<u64>().is_ok());
    let mib: u64 = positional.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let rounds: usize = positional.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let child = args.iter().any(|a| a == "--child");
    let chunk_kib = arg_after(&args, "--chunk").unwrap_or(1024);
    let window_kib = arg_after(&args, "--window").unwrap_or(8192);
    let n = mib << 20;
    // `--fs-only`: the fs read alone (for a profiler).
    let fs_only = args.iter().any(|a| a == "--fs-only");
    // `--no-splice` (with `--child`): the agent writes every frame from memory.
    let no_splice = args.iter().any(|a| a == "--no-splice");

    let dir = tempfile::Builder::new().prefix("agentwire-e2e-").tempdir_in("/dev/shm").expect("tmpfs dir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("root");
    {
        let mut f = std::fs::File::create(root.join("e2e.bin")).expect("file");
        let block = vec![0x5au8; 1 << 20];
        for _ in 0..mib {
            f.write_all(&block).expect("file write");
        }
    }

    let mut agent_process = None;
    let stream = if child {
        let exe = std::env::current_exe().expect("exe");
        let bin = exe.parent().and_then(|d| d.parent()).expect("target dir").join("agentwire");
        let socket = dir.path().join("agent.sock");
        let listen = format!("unix:{}", socket.display());
        let process = tokio::process::Command::new(&bin)
            .args(["agent", "--listen", &listen, "--root"])
            .arg(&root)
            .args(no_splice.then_some("--no-splice"))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        agent_process = Some(process);
        let mut tries = 0;
        loop {
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(s) => break s,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("connect {}: {e}", socket.display()),
            }
        }
    } else {
        let (host, guest) = tokio::net::UnixStream::pair().expect("socketpair");
        let agent = Arc::new(Agent::new(Config::new(root.clone())));
        // As `agentwire agent` serves a Unix connection: a send buffer of
        // 1 MiB (its `UNIX_SEND_BUFFER`), file reads spliced.
        rustix::net::sockopt::set_socket_send_buffer_size(&guest, 1 << 20).expect("SO_SNDBUF");
        let fd = std::os::fd::AsFd::as_fd(&guest).try_clone_to_owned().expect("dup");
        tokio::spawn(agent.serve_splicing(guest, fd));
        host
    };
    let limits = ExecLimits {
        output_chunk_size: (chunk_kib * 1024) as u32,
        output_limit: (window_kib * 1024) as u32,
        ..ExecLimits::default()
    };
    let client = Client::builder().exec_limits(Some(limits)).connect(stream).await.expect("connect");
    println!(
        "agentwire e2e: {mib} MiB a transfer, {rounds} rounds, agent {}, exec output chunks {chunk_kib} KiB within {window_kib} KiB",
        if child { "as a child process (agentwire agent)" } else { "in this process" },
    );

    let mut pipe_head = Vec::new();
    let mut pipe_cat = Vec::new();
    let mut pipe_dd = Vec::new();
    let mut exec_dd = Vec::new();
    let mut raw = Vec::new();
    let mut exec = Vec::new();
    let mut cat = Vec::new();
    let mut read = Vec::new();
    let busybox = std::process::Command::new("busybox").args(["cat", "/dev/null"]).status().is_ok_and(|s| s.success());
    let (mut pipe_sendfile, mut exec_sendfile) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        if fs_only {
            read.push(within("fs read", fs_read(&client, n)).await);
            continue;
        }
        raw.push(tokio::task::spawn_blocking(move || raw_copy(n)).await.expect("raw"));
        let head_args = vec!["-c".to_string(), n.to_string(), "/dev/zero".to_string()];
        pipe_head.push(tokio::task::spawn_blocking(move || local_pipe("head", &head_args, n)).await.expect("pipe"));
        // dd writes 1 MiB a write where head writes 8 KiB: a faster command.
        let dd_args = ["if=/dev/zero".to_string(), "bs=1M".into(), format!("count={mib}"), "status=none".into()];
        let local_dd_args = dd_args.to_vec();
        pipe_dd.push(tokio::task::spawn_blocking(move || local_pipe("dd", &local_dd_args, n)).await.expect("pipe"));
        exec_dd.push(within("exec dd", exec_stream(&client, Command::new("dd").args(dd_args), n)).await);
        let cat_args = vec![root.join("e2e.bin").display().to_string()];
        pipe_cat.push(tokio::task::spawn_blocking(move || local_pipe("cat", &cat_args, n)).await.expect("pipe"));
        let head = Command::new("head").args(["-c".to_string(), n.to_string(), "/dev/zero".into()]);
        exec.push(within("exec head", exec_stream(&client, head, n)).await);
        let file = root.join("e2e.bin").display().to_string();
        cat.push(within("exec cat", exec_stream(&client, Command::new("cat").arg(file), n)).await);
        if busybox {
            let args = vec!["cat".to_string(), root.join("e2e.bin").display().to_string()];
            let local_args = args.clone();
            pipe_sendfile
                .push(tokio::task::spawn_blocking(move || local_pipe("busybox", &local_args, n)).await.expect("pipe"));
            exec_sendfile
                .push(within("exec busybox cat", exec_stream(&client, Command::new("busybox").args(args), n)).await);
        }
        read.push(within("fs read", fs_read(&client, n)).await);
    }
    if fs_only {
        let best = *read.iter().min().expect("rounds");
        println!("  fs read tmpfs: best {:.0} MB/s, median {:.0} MB/s", mb_s(n, best), mb_s(n, median(read)));
        return;
    }
    let (raw_best, raw_med) = (*raw.iter().min().expect("rounds"), median(raw.clone()));
    println!("  {:<24} {:>8} {:>8}   {:>6} {:>6}", "transfer", "best", "median", "best", "median");
    println!(
        "  {:<24} {:>8.0} {:>8.0}   {:>6} {:>6}",
        "raw socketpair copy",
        mb_s(n, raw_best),
        mb_s(n, raw_med),
        "1.00",
        "1.00"
    );
    for (name, d) in [
        ("local head -c | pipe", pipe_head),
        ("local cat tmpfs | pipe", pipe_cat),
        ("local dd bs=1M | pipe", pipe_dd),
        ("exec head -c (stdout)", exec),
        ("exec cat tmpfs (stdout)", cat),
        ("exec dd bs=1M (stdout)", exec_dd),
        ("local busybox cat | pipe", pipe_sendfile),
        ("exec busybox cat", exec_sendfile),
        ("fs read tmpfs", read),
    ] {
        if d.is_empty() {
            continue;
        }
        let (best, med) = (*d.iter().min().expect("rounds"), median(d));
        println!(
            "  {:<24} {:>8.0} {:>8.0}   {:>6.2} {:>6.2}",
            name,
            mb_s(n, best),
            mb_s(n, med),
            raw_best.as_secs_f64() / best.as_secs_f64(),
            raw_med.as_secs_f64() / med.as_secs_f64()
        );
    }
    println!("  (MB/s; fractions are of the raw copy's best and median in this run)");
    let _ = client.shutdown(Duration::from_secs(5)).await;
    drop(agent_process);
}
