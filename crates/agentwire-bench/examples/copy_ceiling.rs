//! How fast file data and a child's pipe output can reach a Unix stream
//! socket, framed, against a raw copy over the same kind of socket, in the
//! same run: the kernel's ceilings behind the project's end-to-end transfer
//! figures (BENCHMARKS.md).
//!
//! Each case moves the same number of bytes (1 GiB by default) into one end
//! of a fresh `socketpair(AF_UNIX, SOCK_STREAM)`; a reader thread on the
//! other end reads 256 KiB at a time and discards. Every case but `raw` cuts
//! the data into chunks of at most 1 MiB, each preceded by a 16-byte header
//! (payload length and sequence number, little-endian), a stand-in for the
//! project's frame header: the reader parses the headers and checks the
//! sequence, that each length is in 1..=1 MiB, that no frame or header is cut
//! short, that it read exactly the bytes the writer put on the socket
//! (payload plus 16 bytes a frame) and that the payloads add up to the size.
//! The file cases read a file in `/dev/shm` (tmpfs, so no disk is involved),
//! written with a non-zero pattern before the first round and removed at the
//! end, also when a check fails. The exec cases read the stdout pipe of
//! `head -c SIZE /dev/zero` (GNU head writes 8 KiB at a time), or with
//! `--dd` (or `CHILD_DD` set in the environment) of
//! `dd if=/dev/zero bs=1M count=MIB`, which writes 1 MiB at a time.
//!
//! The cases, and what each stands for in the agent:
//!
//! - `raw`: 256 KiB `write`s of one buffer, unframed: the socket's ceiling.
//! - `pread_write`: `pread` of up to 1 MiB into a buffer, then `write` of the
//!   header and `write` of the data: the shape of what the agent does today
//!   for `core.fs` reads (a `pread` per chunk, then the frame written).
//! - `pread_writev`: the same with one `writev(header, data)`.
//! - `file_splice`: `write` of the header, then `splice` file→pipe→socket:
//!   the file's pages go into the socket without a copy through user space.
//! - `file_sendfile`: `write` of the header, then `sendfile` file→socket.
//! - `exec_read`: the child's stdout pipe widened to 1 MiB, a `read` of up
//!   to 1 MiB, then `write` of the header and of the data: what the agent's
//!   exec pump does (it widens stdout to the chunk size, up to 1 MiB).
//! - `exec_splice`: `poll`, `FIONREAD` gives the `n` bytes waiting, `write`
//!   of a header for `n`, then `splice` of `n` bytes pipe→socket.
//! - `exec_local`: the child's output read (1 MiB reads) and discarded, no
//!   socket: how fast the child alone produces it, the exec cases' ceiling.
//!
//! Before the rounds, a probe shows whether `splice` and `sendfile` are
//! zero-copy here: 4 KiB of a tmpfs file go into a socket, the file is
//! overwritten in place before the reader reads, and the reader sees the new
//! bytes only if the socket holds the file's pages rather than a copy.
//!
//! One unrecorded warm-up pass of every case comes first; then each round
//! runs every case once, the order rotating by one case a round so that
//! none always runs first or last, and each case's time is divided into the
//! `raw` time of the same round (`of raw`: 1.0 is as fast as the raw copy).
//! Each round's figures go to stderr as CSV; stdout ends with the medians
//! over the rounds as a markdown table.
//!
//! ```text
//! cargo run --release -p agentwire-bench --example copy_ceiling -- [MIB] [ROUNDS] [--dd]
//! ```
//!
//! `MIB` is the size in MiB (1024), `ROUNDS` the number of rounds (7).
//! `SNDBUF=BYTES` in the environment asks for that `SO_SNDBUF` on the
//! writer's socket (the kernel doubles it).
//!
//! CPU times: the writer's and reader's are their threads' CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`), user and system together. The child's is the
//! change in `cutime + cstime` of `/proc/self/stat` across the case (children
//! waited for), in clock ticks, so to 10 ms.

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, poll};
use rustix::io::retry_on_intr;
use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use rustix::time::{ClockId, clock_gettime};

/// The largest chunk a framed case sends, and the size of every pipe.
const CHUNK: usize = 1 << 20;
/// The size of the raw case's writes.
const RAW_BUF: usize = 256 << 10;
/// The size of the reader's reads.
const RD_BUF: usize = 256 << 10;
/// The size of a frame header: payload length and sequence number.
const HDR: usize = 16;
/// Where the file and the probe's file go (tmpfs).
const DIR: &str = "/dev/shm";

/// What one run measures: its size, rounds and child.
struct Config {
    /// Bytes each case moves.
    total: u64,
    /// Recorded rounds.
    rounds: usize,
    /// The child is `dd bs=1M` rather than `head -c`.
    dd: bool,
}

/// A file removed when this is dropped, also while a failed check unwinds.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The calling thread's CPU time, user and system, in seconds.
fn thread_cpu() -> f64 {
    let t = clock_gettime(ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// The CPU time, user and system, of this process's children that were
/// waited for, in seconds (`cutime + cstime` of `/proc/self/stat`).
fn children_cpu() -> std::io::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The fields after the command's closing parenthesis start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |field: usize| -> u64 { fields.get(field - 3).and_then(|f| f.parse().ok()).expect("/proc/self/stat") };
    Ok((ticks(16) + ticks(17)) as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// A frame header: payload length and sequence number, little-endian.
fn header(len: u64, seq: u64) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[..8].copy_from_slice(&len.to_le_bytes());
    h[8..].copy_from_slice(&seq.to_le_bytes());
    h
}

/// A close-on-exec pipe (read end, write end) of at least `size` bytes.
fn make_pipe(size: usize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe_with(PipeFlags::CLOEXEC)?;
    let got = fcntl_setpipe_size(&r, size)?;
    assert!(got >= size, "F_SETPIPE_SZ gave {got} bytes, not {size}");
    Ok((r, w))
}

/// Splices exactly `len` bytes from the pipe `from` into `to`.
fn splice_exact(from: impl AsFd, to: impl AsFd, len: usize) -> std::io::Result<()> {
    let mut left = len;
    while left > 0 {
        let n = retry_on_intr(|| splice(&from, None, &to, None, left, SpliceFlags::MOVE))?;
        assert!(n > 0, "splice returned 0 with {left} bytes left");
        left -= n;
    }
    Ok(())
}

/// What a writer put out.
struct WriterOut {
    /// Payload bytes.
    payload: u64,
    /// Bytes put on the socket, headers and payload.
    wire: u64,
    /// Frames sent (for `exec_local`, reads from the pipe).
    chunks: u64,
    /// The writer thread's CPU time, in seconds.
    cpu: f64,
}

/// What a reader took in.
struct ReaderOut {
    /// Bytes read from the socket.
    bytes: u64,
    /// Payload bytes (all of them when unframed).
    payload: u64,
    /// Frames parsed.
    frames: u64,
    /// The reader thread's CPU time, in seconds.
    cpu: f64,
}

/// Reads the socket to its end in 256 KiB reads and discards the data; if
/// `framed`, parses the headers and checks their sequence, their lengths and
/// that the last frame is whole (the payload is not touched beyond the read).
fn reader(mut s: UnixStream, framed: bool) -> std::io::Result<ReaderOut> {
    let c0 = thread_cpu();
    let mut buf = vec![0u8; RD_BUF];
    let (mut total, mut payload, mut frames) = (0u64, 0u64, 0u64);
    let mut hdr = [0u8; HDR];
    let mut hdr_have = 0usize;
    let mut pay_left = 0u64;
    loop {
        let n = read_retrying(&mut s, &mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if !framed {
            continue;
        }
        let mut p = 0usize;
        while p < n {
            if pay_left > 0 {
                let take = (pay_left as usize).min(n - p);
                pay_left -= take as u64;
                payload += take as u64;
                p += take;
            } else {
                let take = (HDR - hdr_have).min(n - p);
                hdr[hdr_have..hdr_have + take].copy_from_slice(&buf[p..p + take]);
                hdr_have += take;
                p += take;
                if hdr_have == HDR {
                    hdr_have = 0;
                    pay_left = u64::from_le_bytes(hdr[..8].try_into().unwrap());
                    let seq = u64::from_le_bytes(hdr[8..].try_into().unwrap());
                    assert_eq!(seq, frames, "frame sequence");
                    assert!(pay_left > 0 && pay_left <= CHUNK as u64, "bad frame length {pay_left}");
                    frames += 1;
                }
            }
        }
    }
    if framed {
        assert_eq!(pay_left, 0, "truncated frame");
        assert_eq!(hdr_have, 0, "truncated header");
    } else {
        payload = total;
    }
    Ok(ReaderOut { bytes: total, payload, frames, cpu: thread_cpu() - c0 })
}

/// Starts the child writing `cfg.total` zero bytes into a 1 MiB pipe, and
/// returns it with the pipe's read end.
fn spawn_child(cfg: &Config) -> std::io::Result<(Child, OwnedFd)> {
    let (r, w) = make_pipe(CHUNK)?;
    let mut cmd = if cfg.dd {
        let mut c = Command::new("dd");
        c.args(["if=/dev/zero", "bs=1M", &format!("count={}", cfg.total >> 20), "status=none"]);
        c
    } else {
        let mut c = Command::new("head");
        c.args(["-c", &cfg.total.to_string(), "/dev/zero"]);
        c
    };
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::from(w)).spawn()?;
    Ok((child, r))
}

/// Waits for the child and checks that it succeeded.
fn reap(mut child: Child) -> std::io::Result<()> {
    let status = child.wait()?;
    assert!(status.success(), "child: {status}");
    Ok(())
}

/// One `read`, again when a signal interrupted it.
fn read_retrying(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// One way of moving the data.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Case {
    /// 256 KiB writes of one buffer, unframed.
    Raw,
    /// `pread`, then `write(header)` and `write(data)`.
    PreadWrite,
    /// `pread`, then `writev(header, data)`.
    PreadWritev,
    /// `write(header)`, then `splice` file→pipe→socket.
    FileSplice,
    /// `write(header)`, then `sendfile` file→socket.
    FileSendfile,
    /// The child's pipe: `read` up to 1 MiB, `write(header)`, `write(data)`.
    ExecRead,
    /// The child's pipe: `poll`, `FIONREAD` n, `write(header)`, `splice` n.
    ExecSplice,
    /// The child's pipe read and discarded, no socket.
    ExecLocal,
}

/// Every case, in the order of the table.
const CASES: [Case; 8] = [
    Case::Raw,
    Case::PreadWrite,
    Case::PreadWritev,
    Case::FileSplice,
    Case::FileSendfile,
    Case::ExecRead,
    Case::ExecSplice,
    Case::ExecLocal,
];

impl Case {
    /// The case's name in the output.
    fn name(self) -> &'static str {
        match self {
            Case::Raw => "raw",
            Case::PreadWrite => "pread_write",
            Case::PreadWritev => "pread_writev",
            Case::FileSplice => "file_splice",
            Case::FileSendfile => "file_sendfile",
            Case::ExecRead => "exec_read",
            Case::ExecSplice => "exec_splice",
            Case::ExecLocal => "exec_local",
        }
    }
}

/// Counts a framed writer's output.
#[derive(Default)]
struct Count {
    /// Payload bytes.
    payload: u64,
    /// Bytes on the socket.
    wire: u64,
    /// Frames.
    chunks: u64,
}

impl Count {
    /// Counts one frame of `n` payload bytes.
    fn frame(&mut self, n: usize) {
        self.payload += n as u64;
        self.wire += (HDR + n) as u64;
        self.chunks += 1;
    }
}

/// Moves `cfg.total` bytes the way `case` does into `sock` (none for
/// `exec_local`), then closes it.
fn writer(case: Case, sock: Option<UnixStream>, file: &File, cfg: &Config) -> std::io::Result<WriterOut> {
    let c0 = thread_cpu();
    let total = cfg.total;
    let mut c = Count::default();
    let s = || sock.as_ref().expect("a socket");
    match case {
        Case::Raw => {
            let buf = vec![0u8; RAW_BUF];
            while c.payload < total {
                s().write_all(&buf)?;
                c.payload += RAW_BUF as u64;
            }
            c.wire = c.payload;
        }
        Case::PreadWrite | Case::PreadWritev => {
            let mut buf = vec![0u8; CHUNK];
            while c.payload < total {
                let off = c.payload;
                let want = CHUNK.min((total - off) as usize);
                let mut got = 0;
                while got < want {
                    let n = file.read_at(&mut buf[got..want], off + got as u64)?;
                    assert!(n > 0, "file ended at {}", off + got as u64);
                    got += n;
                }
                let h = header(got as u64, c.chunks);
                if case == Case::PreadWrite {
                    s().write_all(&h)?;
                    s().write_all(&buf[..got])?;
                } else {
                    // writev(header, data), then the rest of a partial write.
                    let mut done = 0usize;
                    while done < HDR + got {
                        done += if done < HDR {
                            let iov = [IoSlice::new(&h[done..]), IoSlice::new(&buf[..got])];
                            retry_on_intr(|| rustix::io::writev(s(), &iov))?
                        } else {
                            retry_on_intr(|| rustix::io::write(s(), &buf[done - HDR..got]))?
                        };
                    }
                }
                c.frame(got);
            }
        }
        Case::FileSplice | Case::FileSendfile => {
            let pipe = if case == Case::FileSplice { Some(make_pipe(CHUNK)?) } else { None };
            let mut off = 0u64;
            while off < total {
                let want = CHUNK.min((total - off) as usize);
                s().write_all(&header(want as u64, c.chunks))?;
                let mut left = want;
                while left > 0 {
                    let n = match &pipe {
                        // file -> pipe (perhaps partly), then all of that pipe -> socket.
                        Some((pr, pw)) => {
                            let n = retry_on_intr(|| splice(file, Some(&mut off), pw, None, left, SpliceFlags::MOVE))?;
                            if n > 0 {
                                splice_exact(pr, s(), n)?;
                            }
                            n
                        }
                        None => retry_on_intr(|| rustix::fs::sendfile(s(), file, Some(&mut off), left))?,
                    };
                    assert!(n > 0, "{case:?}: 0 bytes moved at {off}");
                    left -= n;
                }
                c.frame(want);
            }
        }
        Case::ExecRead | Case::ExecLocal => {
            let (child, r) = spawn_child(cfg)?;
            let mut pipe = File::from(r);
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = read_retrying(&mut pipe, &mut buf)?;
                if n == 0 {
                    break;
                }
                if case == Case::ExecRead {
                    s().write_all(&header(n as u64, c.chunks))?;
                    s().write_all(&buf[..n])?;
                    c.frame(n);
                } else {
                    c.payload += n as u64;
                    c.chunks += 1;
                }
            }
            drop(pipe);
            reap(child)?;
        }
        Case::ExecSplice => {
            let (child, r) = spawn_child(cfg)?;
            loop {
                let mut fds = [PollFd::new(&r, PollFlags::IN)];
                retry_on_intr(|| poll(&mut fds, None))?;
                let hup = fds[0].revents().contains(PollFlags::HUP);
                let n = (rustix::io::ioctl_fionread(&r)? as usize).min(CHUNK);
                if n == 0 {
                    if hup {
                        break; // the child closed its end: EOF
                    }
                    continue;
                }
                s().write_all(&header(n as u64, c.chunks))?;
                splice_exact(&r, s(), n)?;
                c.frame(n);
            }
            drop(r);
            reap(child)?;
        }
    }
    drop(sock); // EOF to the reader
    Ok(WriterOut { payload: c.payload, wire: c.wire, chunks: c.chunks, cpu: thread_cpu() - c0 })
}

/// One case's figures in one round.
struct Res {
    /// Wall time, from the socket's creation to the reader's end.
    secs: f64,
    /// The writer thread's CPU seconds.
    wcpu: f64,
    /// The reader thread's CPU seconds (0 without a reader).
    rcpu: f64,
    /// The child's CPU seconds (0 without a child).
    child_cpu: f64,
    /// Frames, or pipe reads for `exec_local`.
    chunks: u64,
}

/// Asks for `SO_SNDBUF` = `SNDBUF` on `s`, if that is set.
fn set_sndbuf(s: &UnixStream) -> std::io::Result<()> {
    if let Ok(v) = std::env::var("SNDBUF") {
        let v: usize = v.parse().expect("SNDBUF: a number of bytes");
        rustix::net::sockopt::set_socket_send_buffer_size(s, v)?;
    }
    Ok(())
}

/// Runs `case` once, with a writer and a reader thread, and checks the byte
/// counts and frames.
fn run(case: Case, file: &File, cfg: &Config) -> std::io::Result<Res> {
    let ch0 = children_cpu()?;
    let t0 = Instant::now();
    let (w, rout) = if case == Case::ExecLocal {
        let w = std::thread::scope(|sc| sc.spawn(|| writer(case, None, file, cfg)).join().expect("writer panicked"))?;
        (w, None)
    } else {
        let (a, b) = UnixStream::pair()?;
        set_sndbuf(&a)?;
        let framed = case != Case::Raw;
        std::thread::scope(|sc| -> std::io::Result<_> {
            let rh = sc.spawn(move || reader(b, framed));
            let wh = sc.spawn(move || writer(case, Some(a), file, cfg));
            let w = wh.join().expect("writer panicked");
            let r = rh.join().expect("reader panicked");
            Ok((w?, Some(r?)))
        })?
    };
    let secs = t0.elapsed().as_secs_f64();
    let child_cpu = children_cpu()? - ch0;
    let name = case.name();
    assert_eq!(w.payload, cfg.total, "{name}: writer payload");
    let mut rcpu = 0.0;
    if let Some(r) = rout {
        assert_eq!(r.bytes, w.wire, "{name}: reader bytes != writer bytes on the socket");
        assert_eq!(r.payload, cfg.total, "{name}: reader payload");
        if case == Case::Raw {
            assert_eq!(r.bytes, cfg.total, "{name}: bytes");
        } else {
            assert_eq!(r.frames, w.chunks, "{name}: frames");
            assert_eq!(r.bytes, cfg.total + HDR as u64 * w.chunks, "{name}: bytes on the socket");
        }
        rcpu = r.cpu;
    }
    Ok(Res { secs, wcpu: w.cpu, rcpu, child_cpu, chunks: w.chunks })
}

/// Zero-copy probe: 4 KiB of a tmpfs file go into a socket by `splice`,
/// `sendfile` or `pread` + `write`, then the file is overwritten in place
/// before the reader reads. If the reader sees the new bytes, the socket
/// holds references to the file's page-cache pages (zero-copy); if it sees
/// the old ones, the data was copied when sent.
fn zerocopy_probe() -> std::io::Result<()> {
    const LEN: usize = 4096;
    for mode in ["splice", "sendfile", "write"] {
        let path = Removed(Path::new(DIR).join(format!("agentwire-copy-ceiling-probe-{}.bin", std::process::id())));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path.0)?;
        f.write_all_at(&[b'A'; LEN], 0)?;
        let (a, mut b) = UnixStream::pair()?;
        match mode {
            "splice" => {
                let (pr, pw) = make_pipe(CHUNK)?;
                let mut off = 0u64;
                let n = splice(&f, Some(&mut off), &pw, None, LEN, SpliceFlags::empty())?;
                assert_eq!(n, LEN, "probe splice");
                splice_exact(&pr, &a, LEN)?;
            }
            "sendfile" => {
                let mut off = 0u64;
                let n = rustix::fs::sendfile(&a, &f, Some(&mut off), LEN)?;
                assert_eq!(n, LEN, "probe sendfile");
            }
            _ => {
                let mut buf = [0u8; LEN];
                f.read_exact_at(&mut buf, 0)?;
                (&a).write_all(&buf)?;
            }
        }
        f.write_all_at(&[b'B'; LEN], 0)?; // overwrite in place
        let mut got = [0u8; LEN];
        b.read_exact(&mut got)?;
        let nb = got.iter().filter(|&&c| c == b'B').count();
        let na = got.iter().filter(|&&c| c == b'A').count();
        let verdict = if nb == LEN {
            "zero-copy (the socket references the file's pages)"
        } else if na == LEN {
            "copied when sent"
        } else {
            "mixed"
        };
        println!("probe {mode:<8}: the reader saw {na} x 'A' (old) and {nb} x 'B' (new): {verdict}");
    }
    Ok(())
}

/// The median of `v` (NaN when empty).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Parses the arguments, writes the file, probes, runs the rounds and
/// prints the medians.
fn main() -> std::io::Result<()> {
    let mut dd = std::env::var_os("CHILD_DD").is_some();
    let mut positional = Vec::new();
    for a in std::env::args().skip(1) {
        if a == "--dd" {
            dd = true;
        } else {
            positional.push(a);
        }
    }
    let arg = |i: usize, default: u64| -> u64 {
        positional.get(i).map_or(default, |s| s.parse().unwrap_or_else(|_| panic!("not a number: {s}")))
    };
    let mib = arg(0, 1024);
    let rounds = arg(1, 7) as usize;
    assert!(mib > 0 && rounds > 0, "usage: copy_ceiling [MIB] [ROUNDS] [--dd]");
    let cfg = Config { total: mib << 20, rounds, dd };

    println!("{mib} MiB a case, {rounds} rounds, chunks of at most {} KiB", CHUNK >> 10);
    println!(
        "child: {}",
        if dd { format!("dd if=/dev/zero bs=1M count={mib}") } else { format!("head -c {} /dev/zero", cfg.total) }
    );
    if let Ok(v) = std::env::var("SNDBUF") {
        println!("SO_SNDBUF asked for on the writer's socket: {v}");
    }
    zerocopy_probe()?;

    // The file, with a non-zero pattern so that every page is real.
    let path = Removed(Path::new(DIR).join(format!("agentwire-copy-ceiling-{}.bin", std::process::id())));
    {
        let mut f = File::create(&path.0)?;
        let blk = vec![0xA5u8; CHUNK];
        for _ in 0..mib {
            f.write_all(&blk)?;
        }
    }
    let file = File::open(&path.0)?;
    assert_eq!(file.metadata()?.len(), cfg.total);

    // The warm-up pass, not recorded.
    for &c in &CASES {
        run(c, &file, &cfg)?;
    }

    let nc = CASES.len();
    let (mut secs, mut frac, mut wcpu, mut rcpu, mut ccpu, mut chunks) =
        (vec![vec![]; nc], vec![vec![]; nc], vec![vec![]; nc], vec![vec![]; nc], vec![vec![]; nc], vec![vec![]; nc]);
    eprintln!("round,case,secs,GBps,of_raw,writer_cpu,reader_cpu,child_cpu,chunks");
    for round in 0..cfg.rounds {
        let mut res: Vec<Option<Res>> = (0..nc).map(|_| None).collect();
        for k in 0..nc {
            let i = (k + round) % nc;
            res[i] = Some(run(CASES[i], &file, &cfg)?);
        }
        let res: Vec<Res> = res.into_iter().map(|r| r.expect("every case ran")).collect();
        let raw = res[0].secs;
        for (i, r) in res.iter().enumerate() {
            let of_raw = raw / r.secs;
            eprintln!(
                "{round},{},{:.4},{:.3},{:.3},{:.3},{:.3},{:.3},{}",
                CASES[i].name(),
                r.secs,
                cfg.total as f64 / r.secs / 1e9,
                of_raw,
                r.wcpu,
                r.rcpu,
                r.child_cpu,
                r.chunks
            );
            secs[i].push(r.secs);
            frac[i].push(of_raw);
            wcpu[i].push(r.wcpu);
            rcpu[i].push(r.rcpu);
            ccpu[i].push(r.child_cpu);
            chunks[i].push(r.chunks as f64);
        }
    }

    println!();
    println!("Medians over {rounds} rounds of {mib} MiB:");
    println!();
    println!("| case | s | GB/s | of raw | writer CPU s | reader CPU s | child CPU s | chunks |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for i in 0..nc {
        let s = median(&mut secs[i]);
        println!(
            "| {} | {:.3} | {:.2} | {:.3} | {:.3} | {:.3} | {:.2} | {:.0} |",
            CASES[i].name(),
            s,
            cfg.total as f64 / s / 1e9,
            median(&mut frac[i]),
            median(&mut wcpu[i]),
            median(&mut rcpu[i]),
            median(&mut ccpu[i]),
            median(&mut chunks[i]),
        );
    }
    drop(file);
    drop(path);
    Ok(())
}
