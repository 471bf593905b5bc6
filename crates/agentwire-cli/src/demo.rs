//! `agentwire demo`: the agent and a host in one process over a real Unix
//! socket, a scripted session with a check at every step, and a summary.

use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentwire::payload::bootstrap::{BootstrapEnvVar, GuestBootstrap};
use agentwire::payload::exec::ExecFailureKind;
use agentwire::{FrameCodec, Payload};
use agentwire_client::{Client, ClientError, Command};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::addr::{self, Addr, Listener};
use crate::agent;

/// Settings of one run.
pub struct Options {
    /// Exec sessions run at once on the connection.
    pub sessions: usize,
    /// Where to write both directions' frames.
    pub capture: Option<PathBuf>,
    /// Size of the file written and read back, in MiB.
    pub file_mib: usize,
    /// Pings whose round trip is measured.
    pub pings: usize,
}

/// The transcript: one line a step, and whether every check held.
#[derive(Default)]
struct Transcript {
    failed: usize,
}

impl Transcript {
    fn check(&mut self, ok: bool, what: impl std::fmt::Display) {
        if !ok {
            self.failed += 1;
        }
        println!("  [{}] {what}", if ok { " ok " } else { "FAIL" });
    }

    fn step(&mut self, result: Result<String, String>) {
        match result {
            Ok(line) => self.check(true, line),
            Err(line) => self.check(false, line),
        }
    }
}

/// A fresh private directory (mode 0700) named after `tag`, removed with
/// everything in it when the guard is dropped.
pub fn temp_dir(tag: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(&format!("agentwire-{tag}-")).tempdir()
}

/// Deterministic bytes (xorshift64), so that a run is repeatable.
pub fn pattern(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn checksum(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(data);
    h.finish()
}

pub fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Runs the demo; exit status 0 only if every check held.
pub async fn run(opts: Options) -> ExitCode {
    // A step that hangs fails the demo with a message instead of holding it for ever.
    let limit = Duration::from_secs(300);
    // On SIGINT or SIGTERM the script is dropped, and with it the temporary
    // directory, the agent and every command it runs.
    let outcome = tokio::select! {
        done = tokio::time::timeout(limit, script(&opts)) => {
            done.unwrap_or_else(|_| Err(format!("not finished after {limit:?}: a step hangs")))
        }
        signal = crate::terminated() => Err(format!("{signal}: stopped; the temporary directory is removed")),
    };
    match outcome {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            println!("\n{n} check(s) failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("\nthe demo stopped: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A capture file that the demo can flush and read back while the client writes to it.
#[derive(Clone)]
struct CaptureFile(Arc<std::sync::Mutex<std::io::BufWriter<std::fs::File>>>);

impl std::io::Write for CaptureFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

async fn script(opts: &Options) -> Result<usize, String> {
    let started = Instant::now();
    // Removed, with everything in it, when the demo ends (the guard is dropped).
    let tmp = temp_dir("demo").map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).map_err(|e| e.to_string())?;
    let root = root.canonicalize().map_err(|e| e.to_string())?;
    let socket = Addr::Unix(tmp.path().join("agent.sock"));
    let listener = Listener::bind(&socket).await.map_err(|e| format!("cannot listen on {socket}: {e}"))?;
    let agent_task = tokio::spawn(agent::serve(
        listener,
        Arc::new(agent::Agent::new(agent::Config::new(root.clone()))),
        agent::Serving { verbose: false, splice: true },
    ));
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let echo_port = echo.local_addr().map_err(|e| e.to_string())?.port();
    let echo_task = tokio::spawn(echo_server(echo));
    let capture = match &opts.capture {
        None => None,
        Some(path) => {
            let file = std::fs::File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Some(CaptureFile(Arc::new(std::sync::Mutex::new(std::io::BufWriter::new(file)))))
        }
    };

    let mut t = Transcript::default();
    println!("agentwire demo: agent on {socket}, files under {}", root.display());
    let bootstrap = GuestBootstrap {
        hostname: Some("agentwire-demo".into()),
        default_cwd: Some(root.display().to_string()),
        default_env: vec![BootstrapEnvVar { key: "AGENTWIRE_DEMO".into(), value: "hello".into() }],
        ..GuestBootstrap::default()
    };
    let stream = addr::connect(&socket).await.map_err(|e| format!("cannot connect to {socket}: {e}"))?;
    let mut builder = Client::builder().bootstrap(bootstrap).request_timeout(Duration::from_secs(60));
    if let Some(c) = &capture {
        builder = builder.capture(c.clone());
    }
    let client = builder.connect(stream).await.map_err(|e| e.to_string())?;
    // The agent answers the bootstrap with its default user; the agent runs in this process, so it is ours.
    let (uid, gid) = agent::sys::effective_ids();
    let user = client.default_user();
    t.check(
        user.as_ref().is_some_and(|u| (u.uid, u.gid) == (uid, gid)),
        format!(
            "core.bootstrap sent first; core.init.resolved: {} (ours: uid {uid} gid {gid}); core.init.ack sent",
            user.as_ref().map_or("none".into(), |u| format!("uid {} gid {}", u.uid, u.gid))
        ),
    );
    let r = client.ready();
    t.check(
        !r.agent_version.is_empty() && r.ready_time_ns >= r.boot_time_ns,
        format!(
            "core.ready after the ack: {:?}, generation {}, boot {} ns, ready {} ns; negotiated generation {}",
            r.agent_version,
            client.agent_generation(),
            r.boot_time_ns,
            r.ready_time_ns,
            client.negotiated()
        ),
    );

    // A real command: output, error output and exit status; the bootstrap's cwd and environment apply.
    let cmd = Command::new("sh").args(["-c", r#"echo "$AGENTWIRE_DEMO from $(pwd)"; echo to-stderr >&2; exit 3"#]);
    let out = client.exec(cmd).await.map_err(|e| e.to_string())?.output().await.map_err(|e| e.to_string())?;
    let want = format!("hello from {}\n", root.display());
    t.check(
        out.status.code() == Some(3) && out.stdout == want.as_bytes() && out.stderr == b"to-stderr\n",
        format!(
            "exec sh -c '...': stdout {:?}, stderr {:?}, exit {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            out.status.code()
        ),
    );

    // Standard input streamed in and out through cat.
    let input = pattern(1 << 20, 7);
    let mut echoed = Vec::new();
    let exec = client.exec(Command::new("cat")).await.map_err(|e| e.to_string())?;
    let status = exec.pipe(&input[..], &mut echoed, &mut tokio::io::sink()).await.map_err(|e| e.to_string())?;
    t.check(
        status.success() && echoed == input,
        format!("exec cat: 1 MiB of stdin came back identical ({} bytes)", echoed.len()),
    );

    // A command killed by a signal is never a success.
    let killed = client.exec(Command::new("sh").args(["-c", "kill -9 $$"])).await.map_err(|e| e.to_string())?;
    let status = killed.output().await.map_err(|e| e.to_string())?.status;
    t.check(
        status.signaled() && !status.success(),
        format!(
            "exec sh -c 'kill -9 $$': killed by a signal (code {:?}, shell status {})",
            status.code(),
            status.shell_code()
        ),
    );

    let missing = client.exec(Command::new("/nonexistent/agentwire-demo")).await;
    let failed_kind = match &missing {
        Err(ClientError::ExecFailed(f)) => Some(f.kind.clone()),
        _ => None,
    };
    t.check(
        failed_kind == Some(ExecFailureKind::NotFound),
        format!(
            "exec of a missing program: core.exec.failed {}",
            failed_kind.as_ref().map_or("(none)", |k| k.as_str())
        ),
    );

    // A large file written and read back, each way measured against a raw
    // copy of the same bytes over a Unix socketpair (the kind of socket the
    // agent is on), in this run.
    let size = opts.file_mib << 20;
    let raw = tokio::task::spawn_blocking(move || raw_copy(size)).await.map_err(|e| e.to_string())?;
    let raw = raw.map_err(|e| format!("raw copy over a socketpair: {e}"))?;
    t.check(
        true,
        format!(
            "raw copy of {} MiB over a Unix socketpair: {:.0} ms, {:.0} MB/s (what the transfers are measured against)",
            opts.file_mib,
            raw.as_secs_f64() * 1e3,
            mb_per_s(size, raw)
        ),
    );
    let data = pattern(size, 42);
    let sum = checksum(&data);
    let put_start = Instant::now();
    let written = client.write_file("/demo.bin", &data[..], Some(size as u64)).await.map_err(|e| e.to_string())?;
    let put = put_start.elapsed();
    let on_disk = std::fs::read(root.join("demo.bin")).map(|d| checksum(&d)).unwrap_or(0);
    t.check(
        written == size as u64 && on_disk == sum,
        format!(
            "fs write /demo.bin: {} MiB in {:.0} ms, {:.0} MB/s ({:.2} of the raw copy), checksum on disk {on_disk:016x}",
            opts.file_mib,
            put.as_secs_f64() * 1e3,
            mb_per_s(size, put),
            of_raw(raw, put)
        ),
    );
    let stat_size = client.stat("/demo.bin", true).await.map(|e| e.size).unwrap_or(0);
    t.check(stat_size == size as u64, format!("fs stat /demo.bin: size {stat_size}"));
    let mut back = Vec::with_capacity(size);
    let get_start = Instant::now();
    client.read_file("/demo.bin", &mut back).await.map_err(|e| e.to_string())?;
    let get = get_start.elapsed();
    let back_sum = checksum(&back);
    t.check(
        back_sum == sum && back.len() == size,
        format!(
            "fs read /demo.bin: {} MiB in {:.0} ms, {:.0} MB/s ({:.2} of the raw copy), checksum {back_sum:016x} \
             (sent {sum:016x})",
            opts.file_mib,
            get.as_secs_f64() * 1e3,
            mb_per_s(size, get),
            of_raw(raw, get)
        ),
    );
    drop(back);
    let escape = client.stat("/../../etc/passwd", true).await;
    t.check(
        escape.as_ref().is_err_and(|e| e.to_string().contains("outside the root")),
        format!("fs stat /../../etc/passwd: refused ({})", escape.err().map(|e| e.to_string()).unwrap_or_default()),
    );

    // TCP through the agent to a loopback echo server.
    t.step(tcp_echo(&client, echo_port).await);
    let outside = match client.tcp_connect("192.0.2.1", 80).await {
        Ok(_) => "connected".to_string(),
        Err(e) => e.to_string(),
    };
    t.check(outside.contains("not loopback"), format!("core.tcp.connect to 192.0.2.1:80: {outside}"));

    // Round trips.
    let mut rtts = Vec::with_capacity(opts.pings);
    for _ in 0..opts.pings {
        rtts.push(client.ping().await.map_err(|e| e.to_string())?);
    }
    rtts.sort();
    let (p50, p99) = (percentile(&rtts, 50), percentile(&rtts, 99));
    t.check(rtts.len() == opts.pings, format!("{} pings: p50 {:.1} µs, p99 {:.1} µs", rtts.len(), us(p50), us(p99)));

    // A type the agent does not know, then the session goes on.
    let mut s = client.request_raw("demo.unknown", Bytes::from_static(b"\xa0")).await.map_err(|e| e.to_string())?;
    match s.recv().await.map(|m| m.payload) {
        Some(Payload::Error(e)) => t.check(
            e.kind.as_str() == "unsupported_message_type" && e.offending_type.as_deref() == Some("demo.unknown"),
            format!("demo.unknown answered by core.error {}: {:?}", e.kind.as_str(), e.message),
        ),
        other => t.check(false, format!("demo.unknown: expected core.error, got {other:?}")),
    }
    let after = client.ping().await;
    t.check(after.is_ok(), "the connection goes on: ping after the error answered");

    // Concurrent sessions on the one connection.
    t.step(concurrent(&client, opts.sessions).await);

    // Shutdown: the agent must close the connection within a few seconds.
    let (sent, received) = (client.counters().sent.get(), client.counters().received.get());
    let shutdown_limit = Duration::from_secs(10);
    let asked = Instant::now();
    let shutdown = client.shutdown(shutdown_limit).await;
    t.check(
        shutdown.is_ok(),
        match &shutdown {
            Ok(()) => format!(
                "core.shutdown: the agent closed the connection {:.1} ms later",
                asked.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => format!("core.shutdown: {e}"),
        },
    );
    // The shutdown frame itself was sent after the counts were taken.
    let sent = (sent.0 + 1, sent.1);
    agent_task.abort();
    echo_task.abort();

    if let (Some(mut c), Some(path)) = (capture, &opts.capture) {
        let flushed = std::io::Write::flush(&mut c);
        t.step(check_capture(path, flushed, sent.0 + received.0));
    }
    println!("\nsummary");
    println!("  host -> agent: {} frames, {} bytes", sent.0, sent.1);
    println!("  agent -> host: {} frames, {} bytes", received.0, received.1);
    println!(
        "  file transfer ({} MiB): write {:.0} MB/s ({:.2} of raw), read {:.0} MB/s ({:.2} of raw); \
         raw copy over a Unix socketpair {:.0} MB/s",
        opts.file_mib,
        mb_per_s(size, put),
        of_raw(raw, put),
        mb_per_s(size, get),
        of_raw(raw, get),
        mb_per_s(size, raw)
    );
    println!("  ping round trip over {} pings: p50 {:.1} µs, p99 {:.1} µs", rtts.len(), us(p50), us(p99));
    println!("  concurrent exec sessions: {}", opts.sessions);
    println!("  checks failed: {}; wall time {:.2} s", t.failed, started.elapsed().as_secs_f64());
    Ok(t.failed)
}

/// What a transfer that took `took` reached as a fraction of a raw copy of
/// the same bytes that took `raw` (1.0: as fast as the raw copy).
pub fn of_raw(raw: Duration, took: Duration) -> f64 {
    raw.as_secs_f64() / took.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// The time `size` bytes take through a Unix socketpair, written by one
/// thread and read by another, 256 KiB a call: the limit the demo's
/// transfers over a Unix socket are measured against.
pub fn raw_copy(size: usize) -> std::io::Result<Duration> {
    use std::io::{Read, Write};
    const BLOCK: usize = 256 * 1024;
    let (mut tx, mut rx) = std::os::unix::net::UnixStream::pair()?;
    let start = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let block = vec![0x5au8; BLOCK];
        let mut left = size;
        while left > 0 {
            let n = left.min(BLOCK);
            tx.write_all(&block[..n])?;
            left -= n;
        }
        Ok(())
    });
    let mut block = vec![0u8; BLOCK];
    let mut got = 0;
    while got < size {
        match rx.read(&mut block)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    writer.join().map_err(|_| std::io::Error::other("the writer panicked"))??;
    Ok(start.elapsed())
}

/// The `p`th percentile of sorted durations (zero for none).
pub fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted.get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1))).copied().unwrap_or_default()
}

/// Microseconds, for printing.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn echo_server(listener: tokio::net::TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

async fn tcp_echo(client: &Client, port: u16) -> Result<String, String> {
    let mut stream = client.tcp_connect("127.0.0.1", port).await.map_err(|e| format!("core.tcp.connect: {e}"))?;
    let sent = pattern(256 * 1024, 9);
    for piece in sent.chunks(64 * 1024) {
        stream.write(Bytes::copy_from_slice(piece)).await.map_err(|e| e.to_string())?;
    }
    stream.shutdown_write().await.map_err(|e| e.to_string())?;
    let mut echoed = Vec::new();
    while let Some(data) = stream.read().await.map_err(|e| format!("tcp echo: {e}"))? {
        echoed.extend_from_slice(&data);
    }
    let line =
        format!("tcp echo via 127.0.0.1:{port}: {} bytes sent, {} came back, then eof", sent.len(), echoed.len());
    if echoed == sent { Ok(line) } else { Err(line) }
}

/// `n` exec sessions at once; each must get exactly its own output, complete and in order.
async fn concurrent(client: &Client, n: usize) -> Result<String, String> {
    const LINES: usize = 200;
    let script = format!(r#"i=1; while [ $i -le {LINES} ]; do echo "session $S line $i"; i=$((i+1)); done"#);
    let start = Instant::now();
    let runs = (0..n).map(|k| {
        let cmd = Command::new("sh").args(["-c", &script]).env("S", k.to_string());
        async move {
            let out = match client.exec(cmd).await {
                Ok(exec) => exec.output().await,
                Err(e) => Err(e),
            };
            (k, out)
        }
    });
    let results: Vec<_> = futures_util::stream::iter(runs).buffer_unordered(n.max(1)).collect().await;
    let mut wrong = Vec::new();
    for (k, out) in results {
        let want: String = (1..=LINES).map(|i| format!("session {k} line {i}\n")).collect();
        if !out.is_ok_and(|o| o.status.success() && o.stdout == want.as_bytes()) {
            wrong.push(k);
        }
    }
    let line = format!(
        "{n} exec sessions at once: each got exactly its own {LINES} lines in order, in {:.0} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    if wrong.is_empty() {
        Ok(line)
    } else {
        Err(format!("{n} exec sessions at once: sessions {wrong:?} got wrong output"))
    }
}

/// Reads the capture back with the frame codec: every frame seen must be in it, whole.
fn check_capture(path: &Path, flushed: std::io::Result<()>, frames_seen: u64) -> Result<String, String> {
    flushed.map_err(|e| format!("capture {}: {e}", path.display()))?;
    let bytes = std::fs::read(path).map_err(|e| format!("capture {}: {e}", path.display()))?;
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let mut codec = FrameCodec::new();
    let mut frames = 0u64;
    loop {
        use tokio_util::codec::Decoder;
        match codec.decode_eof(&mut buf) {
            Ok(Some(Ok(_))) => frames += 1,
            Ok(Some(Err(o))) => return Err(format!("capture {}: {o}", path.display())),
            Ok(None) => break,
            Err(e) => return Err(format!("capture {}: {e}", path.display())),
        }
    }
    let line = format!(
        "capture {}: {} bytes, {frames} frames (seen: {frames_seen}); read it with `agentwire inspect {}`",
        path.display(),
        bytes.len(),
        path.display()
    );
    if frames == frames_seen { Ok(line) } else { Err(line) }
}
