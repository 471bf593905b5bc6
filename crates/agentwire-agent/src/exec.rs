//! `core.exec.*`: a real child process on pipes or a pseudo-terminal, its
//! output streamed as it comes.
//!
//! An execution is *controlled* (generation 10, spec section 8) when the
//! bootstrap set an [`ExecLimits`] policy and the request's envelope says
//! `v >= 10`: it is admitted only while fewer than `max_executions` are held,
//! its output goes in chunks of at most `output_chunk_size`, each charged
//! `len + 256` against `output_limit` until the host acknowledges it with
//! `core.exec.output.ack` (reading from the child stops while the allowance
//! is used up, so the child blocks on its pipe), its exit is reported once all
//! of its output is acknowledged, its stdin is bounded by `stdin_chunk_size`
//! and `input_limit`, and what reaches the child is acknowledged with
//! `core.exec.stdin.ack`. Any other execution is *legacy* (generation 7):
//! 4096-byte output chunks and no acknowledgements.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use agentwire::payload::exec::{
    EXEC_OUTPUT_EVENT_OVERHEAD, ExecExited, ExecFailed, ExecFailureKind, ExecLimits, ExecRequest, ExecStarted,
    ExecStderr, ExecStdinAck, ExecStdinError, ExecStdout,
};
use agentwire::{Message, MessageType, Payload, PipedData};

use agentwire_session::driver::{MAX_PENDING_WRITE, Route, RouteSender};
use bytes::{Bytes, BytesMut};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::piped::MIN_PIPED;
use crate::{Defaults, Service, SessionTask, sys};

// Declared here, its only user, rather than in lib.rs.
#[path = "pty.rs"]
mod pty;

/// `core.exec.*`: runs each request as a child process in its own process
/// group, with its output streamed as it comes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecService;

impl Service for ExecService {
    fn serve(&self, request: Message, route: Route, defaults: Arc<Defaults>) -> SessionTask {
        Box::pin(async move {
            let version = request.version;
            if let Payload::ExecRequest(req) = request.payload {
                run(*req, version, defaults, route).await
            }
        })
    }
}

/// Kills a command's whole process group unless disarmed: when its session
/// is abandoned (the host left, its relay client left, the agent stops), no
/// process of it survives.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = sys::kill_group(pgid, libc::SIGKILL);
        }
    }
}

/// Largest chunk of output in one frame of a legacy execution, as the
/// generation-7 agent sends them (spec 10.10).
pub(crate) const LEGACY_OUTPUT_CHUNK: usize = 4096;

/// The lowest request generation (`v`) whose execution is controlled (spec 8).
pub(crate) const CONTROLLED_FROM: u8 = 10;

/// Stdin bytes a legacy execution may have accepted but not yet written
/// into its child. Beyond it, `core.exec.stdin` frames are dropped and
/// answered with `core.exec.stdin.error`: the session loop never waits for
/// the child. (A controlled execution has the policy's `input_limit`.)
pub(crate) const STDIN_QUEUE_LIMIT: usize = 1024 * 1024;

/// [`EXEC_OUTPUT_EVENT_OVERHEAD`]: what each output chunk costs besides its bytes.
const OVERHEAD: u64 = EXEC_OUTPUT_EVENT_OVERHEAD;

/// The executions one connection holds (running, or ended with output not
/// yet acknowledged), counted for the admission of controlled requests
/// (spec 8). Clones count together.
#[derive(Clone, Debug, Default)]
pub(crate) struct Held(Arc<AtomicUsize>);

impl Held {
    /// A slot, held until it is dropped; `None` when `max` are held already.
    fn take(&self, max: usize) -> Option<Slot> {
        self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(self.0.clone()))
    }

    /// How many are held now.
    fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// One held execution; dropped when its task ends (however it ends).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The output allowance of a controlled execution (spec 8): the charge of
/// the chunks published (`len + 256` each, stdout and stderr together) and
/// not yet acknowledged never passes `limit`.
struct Allowance {
    limit: u64,
    charge: std::sync::Mutex<Charge>,
    /// An acknowledgement freed some of the allowance.
    freed: Notify,
}

/// Cumulative charges of one execution's output.
#[derive(Debug, Default)]
struct Charge {
    /// Of every chunk published (or about to be: charged first).
    published: u64,
    /// What the host has acknowledged.
    acked: u64,
}

impl Allowance {
    fn new(limit: u64) -> Allowance {
        Allowance { limit, charge: std::sync::Mutex::new(Charge::default()), freed: Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Charge> {
        self.charge.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until at least `n` of the allowance is free and returns what is
    /// free; with `take`, charges `n` at once (under the same lock, so that
    /// two output streams cannot both take the last of it).
    async fn wait(&self, n: u64, take: bool) -> u64 {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut c = self.lock();
                let free = self.limit.saturating_sub(c.published - c.acked);
                if free >= n {
                    if take {
                        c.published += n;
                    }
                    return free;
                }
            }
            freed.await;
        }
    }

    /// Takes the host's cumulative `consumed`; false (and nothing changes)
    /// when it is below the previous one or above what was published.
    fn ack(&self, consumed: u64) -> bool {
        let mut c = self.lock();
        if consumed < c.acked || consumed > c.published {
            return false;
        }
        let freed = consumed > c.acked;
        c.acked = consumed;
        drop(c);
        if freed {
            self.freed.notify_waiters();
        }
        true
    }

    /// Whether every published chunk has been acknowledged.
    fn settled(&self) -> bool {
        let c = self.lock();
        c.published == c.acked
    }
}

/// Tasks of one execution (stdin feeder, stdin acknowledgements), aborted
/// when the execution's task is dropped (the agent aborts it, the
/// connection ends).
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Gives the stdout pipe room for a whole chunk of `chunk` bytes (at most
/// 1 MiB, the default `pipe-max-size`, which an unprivileged process may
/// reach) when that is more than the kernel's default 64 KiB, so that a
/// command writing fast fills chunks of the size the policy allows instead
/// of 64 KiB ones. Only stdout, and only under a policy whose chunks are
/// larger than the default pipe: the room counts against the user's pipe
/// quota. Best effort: a refusal leaves the pipe as it is.
fn widen_pipe(pipe: &impl std::os::fd::AsFd, chunk: usize) {
    const DEFAULT_PIPE: usize = 64 * 1024;
    if chunk > DEFAULT_PIPE {
        let size = chunk.min(crate::piped::DEFAULT_PIPE_MAX);
        if let Err(e) = crate::piped::resize(pipe, size) {
            tracing::debug!("a {size}-byte output pipe: {e}");
        }
    }
}

/// Where stdin goes: the child's pipe, or its terminal.
enum StdinSink {
    Pipe(tokio::process::ChildStdin),
    Pty(Arc<pty::Master>),
}

impl StdinSink {
    /// Writes some of `data`, waiting while the pipe or terminal is full.
    async fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            StdinSink::Pipe(w) => w.write(data).await,
            StdinSink::Pty(m) => m.write(data).await,
        }
    }
}

/// Where output comes from: one of the child's pipes, or its terminal.
enum Source {
    Stdout(tokio::process::ChildStdout),
    Stderr(tokio::process::ChildStderr),
    Pty(Arc<pty::Master>),
}

impl Source {
    /// The child's pipe, when the output comes from one.
    fn pipe(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match self {
            Source::Stdout(r) => Some(r.as_fd()),
            Source::Stderr(r) => Some(r.as_fd()),
            Source::Pty(_) => None,
        }
    }

    /// Appends at most `max` bytes that the command wrote to `buf`; 0 at the end.
    async fn read(&mut self, buf: &mut BytesMut, max: usize) -> std::io::Result<usize> {
        match self {
            Source::Stdout(r) => r.take(max as u64).read_buf(buf).await,
            Source::Stderr(r) => r.take(max as u64).read_buf(buf).await,
            Source::Pty(m) => {
                let start = buf.len();
                buf.resize(start + max, 0);
                let read = m.read(&mut buf[start..]).await;
                buf.truncate(start + *read.as_ref().unwrap_or(&0));
                read
            }
        }
    }

    /// Appends at most `max` bytes that the command has written already to
    /// its pipe, without waiting for more: `None` when there are none yet
    /// (and always from a terminal, whose output goes as it is read).
    async fn read_ready(&mut self, buf: &mut BytesMut, max: usize) -> Option<std::io::Result<usize>> {
        // A terminal's read grows the buffer before it reads: it must not be
        // dropped half-way.
        if matches!(self, Source::Pty(_)) {
            return None;
        }
        let read = self.read(buf, max);
        tokio::pin!(read);
        // Dropped when not ready: a read that has not completed has taken nothing.
        std::future::poll_fn(|cx| match read.as_mut().poll(cx) {
            std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}

/// The execution's stdin, queued for its feeder task and bounded in bytes:
/// taking a frame never waits.
struct StdinQueue {
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    /// Bytes accepted so far.
    accepted: u64,
    /// Bytes written into the child so far (the feeder counts).
    written: watch::Receiver<u64>,
    /// Accepted bytes not yet written that may wait.
    limit: u64,
    /// The largest frame taken (a controlled execution's `stdin_chunk_size`).
    max_chunk: Option<u64>,
    /// Whether the host ended it with an empty frame (pipe mode).
    ended: bool,
}

impl StdinQueue {
    /// Queues `data`, or says why it was dropped.
    fn push(&mut self, data: Bytes) -> Result<(), String> {
        if self.ended {
            return Err("stdin data after its end (an empty core.exec.stdin) is dropped".into());
        }
        let Some(tx) = &self.tx else {
            // The feeder stopped: the child closed its end, which was reported
            // once, or the command has ended.
            return Ok(());
        };
        let len = data.len() as u64;
        if let Some(max) = self.max_chunk
            && len > max
        {
            return Err(format!("stdin frame of {len} bytes dropped: above the stdin_chunk_size of {max}"));
        }
        let waiting = self.accepted - *self.written.borrow();
        if waiting + len > self.limit {
            let limit = self.limit;
            return Err(format!(
                "stdin frame of {len} bytes dropped: {waiting} bytes wait for the command to read them \
                 (at most {limit})"
            ));
        }
        self.accepted += len;
        if tx.send(data).is_err() {
            self.tx = None;
        }
        Ok(())
    }

    /// Ends the input: the feeder writes what is queued, then closes the pipe.
    fn close(&mut self) {
        self.tx = None;
        self.ended = true;
    }

    /// The command has ended: what is queued is still written (to what it
    /// left behind), and later frames are dropped without a word.
    fn finish(&mut self) {
        self.tx = None;
    }
}

/// Sends `payload` on the session at once, without waiting behind the
/// connection's backlog (the session loop must not wait). When the host
/// does not even read its replies, the report is dropped too.
fn report_now(route: &Route, payload: impl Into<Payload>) {
    let (handle, id) = (route.handle(), route.id());
    if handle.with(|c| c.pending_transmit()) < MAX_PENDING_WRITE {
        let payload = payload.into();
        if let Err(e) = handle.send_now(|c| c.send(id, payload)) {
            tracing::debug!("id {id}: {e}");
        }
    } else {
        tracing::debug!("id {id}: the host does not read; a report is dropped");
    }
}

/// Runs one `core.exec.request` (whose envelope said `v = version`) to its
/// `core.exec.exited` or `core.exec.failed`.
async fn run(req: ExecRequest, version: u8, defaults: Arc<Defaults>, mut route: Route) {
    let out = route.sender();
    let id = route.id();
    // Controlled (spec 8) only with a policy, a request of generation 10 and
    // a connection at 10, on which the host can send its acknowledgements.
    let negotiated = route.handle().with(|c| c.negotiated());
    let policy: Option<ExecLimits> =
        defaults.exec_limits.filter(|_| version >= CONTROLLED_FROM && negotiated >= CONTROLLED_FROM);
    let max = policy.map_or(usize::MAX, |l| l.max_executions as usize);
    let Some(_slot) = defaults.executions.take(max) else {
        let held = defaults.executions.count();
        let message = format!("{held} executions are held, at most {max} (max_executions); {} is not started", req.cmd);
        let _ = out.send(failure(ExecFailureKind::ResourceLimit, None, message, "execution_admission")).await;
        return;
    };
    let mut command = match prepare(&req, &defaults) {
        Ok(c) => c,
        Err(failed) => {
            let _ = out.send(failed).await;
            return;
        }
    };
    let master = if req.tty {
        let opened = pty::open(req.rows, req.cols).and_then(|p| {
            sys::attach_terminal(&mut command, p.slave)?;
            Ok(Arc::new(p.master))
        });
        match opened {
            Ok(master) => Some(master),
            Err(e) => {
                let errno = e.raw_os_error();
                let message = format!("a {}x{} terminal: {e}", req.rows, req.cols);
                let _ = out.send(failure(ExecFailureKind::PtySetupFailed, errno, message, "pty")).await;
                return;
            }
        }
    } else {
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.process_group(0);
        None
    };
    let spawned = spawn_tracked(&mut command);
    // The command holds the parent's copies of the terminal's slave side: they
    // must be closed for the master to see the end (EIO) when the child's are.
    drop(command);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = out.send(spawn_failure(&req, &e)).await;
            return;
        }
    };
    // Its strings are views of the frame it came in, which would keep the
    // frame's read buffer for as long as the command runs.
    drop(req);
    let pid = child.id().unwrap_or(0);
    // The child leads its own process group (set before exec; in PTY mode it
    // leads a new session, so its pgid is its pid too): signals and the final
    // kill reach all of it.
    let mut group = GroupGuard(Some(pid));
    if out.send(ExecStarted { pid }).await.is_err() {
        untrack_after_kill(child, group).await;
        return;
    }
    let allowance = policy.map(|l| Arc::new(Allowance::new(l.output_limit.into())));
    let chunk = policy.map_or(LEGACY_OUTPUT_CHUNK, |l| l.output_chunk_size as usize);
    let mut pumps = JoinSet::new();
    // Where the connection splices, a pipe's output goes from it to the
    // transport without passing through the agent; chunks too small to get a
    // pipe are read as they would be anyway.
    let mut spawn_pump = |source: Source, t: MessageType, frame: fn(Bytes) -> Payload| {
        let splices = chunk >= MIN_PIPED && out.handle().splices();
        let watched = source.pipe().filter(|_| splices).and_then(watch_pipe);
        match watched {
            // The source is dropped: its descriptor closes, the duplicate stays.
            Some(from) => pumps.spawn(pump_piped(from, out.clone(), (t, frame), chunk, allowance.clone())),
            None => pumps.spawn(pump(source, out.clone(), frame, chunk, allowance.clone())),
        };
    };
    let sink = match &master {
        Some(m) => {
            spawn_pump(Source::Pty(m.clone()), MessageType::ExecStdout, stdout_frame);
            Some(StdinSink::Pty(m.clone()))
        }
        None => {
            if let Some(r) = child.stdout.take() {
                widen_pipe(&r, chunk);
                spawn_pump(Source::Stdout(r), MessageType::ExecStdout, stdout_frame);
            }
            if let Some(r) = child.stderr.take() {
                spawn_pump(Source::Stderr(r), MessageType::ExecStderr, stderr_frame);
            }
            child.stdin.take().map(StdinSink::Pipe)
        }
    };
    // stdin is written by its own task from a queue bounded in bytes, so that
    // a child that does not read can stop neither this loop nor the connection.
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel::<Bytes>();
    let (written_tx, written) = watch::channel(0u64);
    let mut tasks = Tasks(Vec::new());
    tasks.0.extend(sink.map(|s| tokio::spawn(feed_stdin(s, stdin_rx, written_tx, out.clone()))));
    // What the last core.exec.stdin.ack said (controlled executions only).
    let stdin_acked = Arc::new(AtomicU64::new(0));
    let acker = policy.map(|_| tokio::spawn(ack_stdin(written.clone(), stdin_acked.clone(), out.clone())));
    let mut stdin = StdinQueue {
        tx: Some(stdin_tx),
        accepted: 0,
        written: written.clone(),
        limit: policy.map_or(STDIN_QUEUE_LIMIT as u64, |l| l.input_limit.into()),
        max_chunk: policy.map(|l| l.stdin_chunk_size.into()),
        ended: false,
    };
    let mut status = None;
    loop {
        // The end: the command has exited, its output is all out (in pipe
        // mode both pipes reached their end), and all of it acknowledged.
        if status.is_some() && pumps.is_empty() && allowance.as_ref().is_none_or(|a| a.settled()) {
            break;
        }
        tokio::select! {
            exited = child.wait(), if status.is_none() => {
                // Reaped: its pid is no longer the orphan reaper's concern.
                untrack(pid);
                stdin.finish();
                status = Some(exited);
            }
            Some(_) = pumps.join_next(), if !pumps.is_empty() => {}
            next = route.recv() => match next.map(|m| m.payload) {
                // On a terminal an empty frame closes nothing: the host sends 0x04.
                Some(Payload::ExecStdin(s)) if s.data.is_empty() => {
                    if master.is_none() {
                        stdin.close();
                    }
                }
                Some(Payload::ExecStdin(s)) => {
                    if let Err(message) = stdin.push(s.data) {
                        report_now(&route, ExecStdinError { errno: None, errno_name: None, message });
                    }
                }
                Some(Payload::ExecOutputAck(ack)) => {
                    // Below the previous one or above what was sent: ignored,
                    // without an answer (spec 8). A legacy execution has no allowance.
                    if let Some(a) = &allowance
                        && !a.ack(ack.consumed)
                    {
                        tracing::debug!("id {id}: output ack of {} ignored", ack.consumed);
                    }
                }
                Some(Payload::ExecSignal(s)) => {
                    // Invalid numbers are ignored, as by the deployed agent.
                    if let Err(e) = sys::kill_group(pid, s.signal) {
                        tracing::debug!("signal {} to group {pid} (id {id}): {e}", s.signal);
                    }
                }
                Some(Payload::ExecResize(r)) => {
                    // Without a terminal there is nothing to resize (spec 10.6).
                    if let Some(m) = &master
                        && let Err(e) = m.resize(r.rows, r.cols)
                    {
                        tracing::debug!("resize to {}x{} (id {id}): {e}", r.rows, r.cols);
                    }
                }
                Some(_) => {}
                // The host is gone, or its relay client left: nobody will read
                // the output. The whole group is killed (the guard), and nothing
                // more is sent.
                None => {
                    drop(pumps);
                    drop(tasks);
                    if status.is_none() {
                        untrack_after_kill(child, group).await;
                    }
                    return;
                }
            },
        }
    }
    drop(stdin);
    drop(tasks);
    // The last count of stdin written goes out before the exit, if the
    // coalescing task had not sent it yet.
    if let Some(acker) = acker {
        acker.abort();
        let _ = acker.await;
        let consumed = *written.borrow();
        if consumed != stdin_acked.load(Ordering::Acquire) {
            let _ = out.send(ExecStdinAck { consumed }).await;
        }
    }
    let code = match status {
        // Killed by a signal: no exit status, and -1 as the reference agent says (spec 10.6).
        Some(Ok(s)) => s.code().unwrap_or(-1),
        Some(Err(e)) => {
            tracing::warn!("waiting for pid {pid} (id {id}): {e}");
            -1
        }
        None => -1,
    };
    // It ended on its own: what it left running in its group may go on (as a daemon would).
    group.0 = None;
    let _ = out.send(ExecExited { code }).await;
}

fn stdout_frame(data: Bytes) -> Payload {
    ExecStdout { data }.into()
}

fn stderr_frame(data: Bytes) -> Payload {
    ExecStderr { data }.into()
}

/// Kills the command's whole group (dropping the guard) and collects its status.
async fn untrack_after_kill(mut child: tokio::process::Child, group: GroupGuard) {
    let pid = group.0;
    drop(group);
    let _ = child.start_kill();
    let _ = child.wait().await;
    if let Some(pid) = pid {
        untrack(pid);
    }
}

/// The pids of the commands sessions run, which the runtime waits for itself.
/// As PID 1 the agent also inherits every orphan, and must reap those alone:
/// a blanket `waitpid(-1)` would take a session's exit status from it.
static SESSION_PIDS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Spawns under the lock the orphan reaper takes, so that a command that ends
/// at once is never mistaken for an orphan.
fn spawn_tracked(command: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let mut pids = SESSION_PIDS.lock().unwrap_or_else(|e| e.into_inner());
    let child = command.spawn()?;
    pids.extend(child.id());
    Ok(child)
}

fn untrack(pid: u32) {
    SESSION_PIDS.lock().unwrap_or_else(|e| e.into_inner()).retain(|&p| p != pid);
}

/// Reaps the zombies among this process's children that no session waits for.
pub fn reap_orphans() -> usize {
    let pids = SESSION_PIDS.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::process::id().to_string();
    let Ok(proc) = std::fs::read_dir("/proc") else { return 0 };
    let mut reaped = 0;
    for entry in proc.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pids.contains(&pid) {
            continue;
        }
        // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so read after the last ')'.
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let mut fields = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace();
        if fields.next() == Some("Z") && fields.next() == Some(me.as_str()) && sys::reap(pid) {
            reaped += 1;
        }
    }
    reaped
}

fn failure(kind: ExecFailureKind, errno: Option<i32>, message: String, stage: &str) -> ExecFailed {
    ExecFailed {
        kind,
        errno,
        errno_name: errno.and_then(sys::errno_name).map(String::from),
        message,
        stage: Some(stage.to_string()),
    }
}

/// Everything that can be checked before the process is created, each with its own kind.
fn prepare(req: &ExecRequest, defaults: &Defaults) -> Result<tokio::process::Command, ExecFailed> {
    let bad_args = |message: String| failure(ExecFailureKind::BadArgs, None, message, "prepare");
    if req.cmd.is_empty() {
        return Err(bad_args("the command is empty".into()));
    }
    if let Some(s) = std::iter::once(&req.cmd).chain(&req.args).chain(&req.env).find(|s| s.contains('\0')) {
        return Err(bad_args(format!("{s:?} contains a NUL byte")));
    }
    let mut command = tokio::process::Command::new(&req.cmd);
    command.args(&req.args);
    command.envs(defaults.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    for entry in &req.env {
        match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => command.env(key, value),
            _ => return Err(bad_args(format!("environment entry {entry:?} is not KEY=VALUE"))),
        };
    }
    if let Some(cwd) = req.cwd.as_deref().or(defaults.cwd.as_deref()) {
        match std::fs::metadata(cwd) {
            Ok(m) if m.is_dir() => {
                command.current_dir(cwd);
            }
            Ok(_) => {
                let message = format!("working directory {cwd}: not a directory");
                return Err(failure(ExecFailureKind::BadCwd, Some(libc::ENOTDIR), message, "cwd"));
            }
            Err(e) => {
                let message = format!("working directory {cwd}: {e}");
                return Err(failure(ExecFailureKind::BadCwd, e.raw_os_error(), message, "cwd"));
            }
        }
    }
    let (euid, _) = sys::effective_ids();
    if let Some(user) = req.user.as_deref().or(defaults.user.as_deref()) {
        let (uid, gid) = lookup_user(user)
            .ok_or_else(|| failure(ExecFailureKind::UserSetupFailed, None, format!("no user {user:?}"), "user"))?;
        if uid != euid {
            if euid != 0 {
                let message = format!("the agent runs as uid {euid} and cannot switch to {user} (uid {uid})");
                return Err(failure(ExecFailureKind::UserSetupFailed, Some(libc::EPERM), message, "user"));
            }
            command.uid(uid).gid(gid);
        }
    }
    let mut limits = Vec::new();
    for r in defaults.rlimits.iter().chain(&req.rlimits) {
        let fail = |message: String| failure(ExecFailureKind::ResourceLimit, None, message, "rlimit");
        let resource =
            sys::rlimit_resource(&r.resource).ok_or_else(|| fail(format!("no resource limit {:?}", r.resource)))?;
        if r.soft > r.hard {
            return Err(fail(format!("{}: soft limit {} above hard limit {}", r.resource, r.soft, r.hard)));
        }
        let current = sys::hard_limit(resource);
        if r.hard > current && euid != 0 {
            return Err(fail(format!("{}: cannot raise the hard limit from {current} to {}", r.resource, r.hard)));
        }
        limits.push((resource, r.soft, r.hard));
    }
    sys::set_rlimits_in_child(&mut command, limits);
    // Standard I/O and the process group are set by the caller: pipes, or a terminal.
    command.kill_on_drop(true);
    Ok(command)
}

/// A user by name or number, from `/etc/passwd`.
pub(crate) fn lookup_user(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        let (uid, gid) = (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
        (f[0] == user || user.parse::<u32>() == Ok(uid)).then_some((uid, gid))
    })
}

/// The spec's kind for an error from creating the process.
fn spawn_failure(req: &ExecRequest, e: &std::io::Error) -> ExecFailed {
    let errno = e.raw_os_error();
    let kind = match errno {
        Some(libc::ENOENT) => ExecFailureKind::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) => {
            // A directory or a file without x bits is there but cannot be run.
            if Path::new(&req.cmd).is_dir() {
                ExecFailureKind::NotExecutable
            } else {
                ExecFailureKind::PermissionDenied
            }
        }
        Some(libc::ENOEXEC) | Some(libc::ETXTBSY) | Some(libc::EISDIR) => ExecFailureKind::NotExecutable,
        Some(libc::E2BIG) | Some(libc::EINVAL) => ExecFailureKind::BadArgs,
        Some(libc::EAGAIN) | Some(libc::EMFILE) | Some(libc::ENFILE) => ExecFailureKind::ResourceLimit,
        Some(libc::ENOMEM) => ExecFailureKind::OutOfMemory,
        _ => ExecFailureKind::Other,
    };
    failure(kind, errno, format!("{}: {e}", req.cmd), "spawn")
}

/// The most the next chunk of output may carry: `chunk`, or less while the
/// allowance (if any) has less free, once it has room for a byte.
async fn next_chunk(chunk: usize, allowance: Option<&Allowance>) -> usize {
    match allowance {
        Some(a) => {
            let free = a.wait(OVERHEAD + 1, false).await;
            chunk.min(usize::try_from(free - OVERHEAD).unwrap_or(usize::MAX))
        }
        None => chunk,
    }
}

/// Streams one output (a pipe, or the terminal) as frames of at most
/// `chunk` bytes, each as soon as it is read, until its end. With an
/// allowance (a controlled execution) each chunk is charged `len + 256`
/// before it goes out, and nothing is read while the allowance is used up:
/// the command then blocks on its pipe, and the agent holds at most one
/// chunk of it.
async fn pump(
    mut source: Source,
    out: RouteSender,
    frame: fn(Bytes) -> Payload,
    chunk: usize,
    allowance: Option<Arc<Allowance>>,
) {
    let mut buf = BytesMut::new();
    loop {
        let max = next_chunk(chunk, allowance.as_deref()).await;
        buf.reserve(max);
        match source.read(&mut buf, max).await {
            Ok(0) => return,
            Ok(_) => {
                // What else the command has written already goes in the same
                // chunk (a pipe holds up to a chunk, see `widen_pipe`): fewer,
                // larger frames, none of them later than it would have been.
                while buf.len() < max {
                    let room = max - buf.len();
                    match source.read_ready(&mut buf, room).await {
                        Some(Ok(n)) if n > 0 => {}
                        // The end, an error or nothing yet: the next read says which.
                        _ => break,
                    }
                }
                let n = buf.len();
                // The other stream may have taken some meanwhile: this chunk waits for its charge.
                if let Some(a) = &allowance {
                    a.wait(n as u64 + OVERHEAD, true).await;
                }
                if out.send(frame(buf.split().freeze())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!("reading the command's output (id {}): {e}", out.id());
                return;
            }
        }
    }
}

/// A descriptor of the command's output pipe `pipe` (a duplicate: the
/// original, dropped, closes only itself) registered for readiness, for
/// [`pump_piped`]; `None` when it cannot be made (then [`pump`] reads it).
fn watch_pipe(pipe: std::os::fd::BorrowedFd<'_>) -> Option<AsyncFd<OwnedFd>> {
    let fd = pipe.try_clone_to_owned().ok()?;
    // tokio made the pipe non-blocking already (the flag is the open file's,
    // which the duplicate shares); set it all the same.
    rustix::io::ioctl_fionbio(&fd, true).ok()?;
    // The safe constructor is deprecated for any `T: AsRawFd`; an `OwnedFd`
    // moved in stays open and the same until the `AsyncFd` drops it, which
    // is what its `unsafe` replacement asks (see `pty.rs`).
    #[allow(deprecated)]
    let watched = AsyncFd::with_interest(fd, tokio::io::Interest::READABLE);
    watched.map_err(|e| tracing::debug!("the output pipe is read instead of spliced: {e}")).ok()
}

/// [`pump`] for a command's pipe when the connection splices: each chunk
/// moves from the command's pipe into a pipe of its own (`splice` between
/// pipes moves the pages, copying nothing), which the connection's writer
/// splices into the transport; a chunk below [`MIN_PIPED`] is read into
/// memory instead. The chunks, their sizes and the allowance are as
/// [`pump`]'s; `t` is the type `frame` makes.
async fn pump_piped(
    from: AsyncFd<OwnedFd>,
    out: RouteSender,
    (t, frame): (MessageType, fn(Bytes) -> Payload),
    chunk: usize,
    allowance: Option<Arc<Allowance>>,
) {
    let mut spare = None;
    loop {
        let max = next_chunk(chunk, allowance.as_deref()).await;
        let taken = loop {
            let mut ready = match from.readable().await {
                Ok(ready) => ready,
                Err(e) => break Err(e),
            };
            match ready.try_io(|fd| take_output(fd.get_ref(), max, &mut spare)) {
                Ok(result) => break result,
                Err(_nothing_yet) => continue,
            }
        };
        let output = match taken {
            Ok(Some(output)) => output,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("taking the command's output (id {}): {e}", out.id());
                return;
            }
        };
        // The other stream may have taken some meanwhile: this chunk waits for its charge.
        if let Some(a) = &allowance {
            a.wait(output.len() as u64 + OVERHEAD, true).await;
        }
        let sent = match output {
            Output::Piped(data) => out.send_piped_data(t, data).await,
            Output::Read(data) => out.send(frame(data)).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A chunk of a command's output: in a pipe of its own, or read into memory.
enum Output {
    Piped(PipedData),
    Read(Bytes),
}

impl Output {
    fn len(&self) -> usize {
        match self {
            Output::Piped(data) => data.len(),
            Output::Read(data) => data.len(),
        }
    }
}

/// Takes up to `max` bytes that the command has written to its pipe `from`:
/// moved into a pipe of their own (`spare`, or a new one) when at least
/// [`MIN_PIPED`] wait and may go, read into memory when fewer do or no pipe
/// can be made. `None` at the end of the output; `WouldBlock` when
/// nothing waits (a pipe made is kept in `spare` for the next try).
fn take_output(from: &OwnedFd, max: usize, spare: &mut Option<(OwnedFd, OwnedFd)>) -> std::io::Result<Option<Output>> {
    use rustix::io::Errno;
    use rustix::pipe::{SpliceFlags, splice};
    let waiting = rustix::io::ioctl_fionread(from).map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
    // A pipe only for a piece worth one: not when little waits, nor when the
    // allowance lets little go (a host acknowledging a few bytes at a time).
    let pipe = match waiting.min(max) >= MIN_PIPED {
        true => spare.take().or_else(|| crate::piped::pipe_for(max).ok().map(|(r, w, _)| (r, w))),
        false => None,
    };
    let Some((read_end, write_end)) = pipe else {
        // Little waits (or none: the read tells the end from nothing yet), or
        // no pipe could be made: through memory, as `pump` reads.
        let mut data = vec![0; waiting.clamp(1, max)];
        return match rustix::io::read(from, &mut data) {
            Ok(0) => Ok(None),
            Ok(n) => {
                data.truncate(n);
                Ok(Some(Output::Read(Bytes::from(data))))
            }
            Err(Errno::AGAIN) => Err(std::io::ErrorKind::WouldBlock.into()),
            Err(e) => Err(e.into()),
        };
    };
    let mut got = 0;
    while got < max {
        match splice(from, None, &write_end, None, max - got, SpliceFlags::NONBLOCK) {
            // The end of the output: what came before it goes first.
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::INTR) => {}
            // Nothing more waits, or the pipe is full.
            Err(Errno::AGAIN) if got > 0 => break,
            Err(Errno::AGAIN) => {
                *spare = Some((read_end, write_end));
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(Output::Piped(PipedData::new(read_end, got))))
}

/// Writes queued stdin into the child as it reads, counting in `written`
/// what went in; closing the channel closes its stdin (a pipe; a terminal
/// stays open).
async fn feed_stdin(
    mut sink: StdinSink,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    written: watch::Sender<u64>,
    out: RouteSender,
) {
    while let Some(data) = rx.recv().await {
        let mut rest = &data[..];
        while !rest.is_empty() {
            let e = match sink.write(rest).await {
                Ok(0) => std::io::Error::from(std::io::ErrorKind::WriteZero),
                Ok(n) => {
                    rest = &rest[n..];
                    written.send_modify(|w| *w += n as u64);
                    continue;
                }
                Err(e) => e,
            };
            let errno = e.raw_os_error();
            let report = ExecStdinError {
                errno,
                errno_name: errno.and_then(sys::errno_name).map(String::from),
                message: format!("writing to the command's stdin: {e}"),
            };
            let _ = out.send(report).await;
            return;
        }
    }
}

/// Sends `core.exec.stdin.ack` with the count of stdin bytes written into
/// the child whenever it has changed (a controlled execution, spec 8).
/// Coalesced: what the feeder writes while an ack waits to go out, or
/// before this task runs again, goes in the next one. `acked` is the count
/// of the last one sent.
async fn ack_stdin(mut written: watch::Receiver<u64>, acked: Arc<AtomicU64>, out: RouteSender) {
    while written.changed().await.is_ok() {
        // Lets the feeder and the session loop go on first.
        tokio::task::yield_now().await;
        let consumed = *written.borrow_and_update();
        if consumed != acked.load(Ordering::Acquire) {
            if out.send(ExecStdinAck { consumed }).await.is_err() {
                return;
            }
            // In the same poll as the send (no await between): an abort finds the two consistent.
            acked.store(consumed, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn admission_counts_held_executions() {
        let held = Held::default();
        let (a, b) = (held.take(2).unwrap(), held.take(2).unwrap());
        assert!(held.take(2).is_none(), "a third beyond max_executions 2");
        assert_eq!(held.count(), 2);
        drop(a);
        let c = held.take(2).expect("a slot was freed");
        drop((b, c));
        assert_eq!(held.count(), 0);
        // Legacy executions are counted but never refused.
        let many: Vec<Slot> = (0..5).map(|_| held.take(usize::MAX).unwrap()).collect();
        assert_eq!(held.count(), many.len());
    }

    #[tokio::test]
    async fn output_acks_free_the_allowance_and_invalid_ones_are_ignored() {
        let a = Allowance::new(1000);
        assert_eq!(a.wait(600, true).await, 1000);
        assert_eq!(a.wait(1, false).await, 400);
        assert!(!a.settled());
        assert!(!a.ack(601), "above what was published");
        assert!(a.ack(100));
        assert!(!a.ack(99), "below the previous one");
        assert!(a.ack(100), "a repeated ack is valid and frees nothing");
        assert_eq!(a.wait(1, false).await, 500);
        // A charge that does not fit waits for an ack that frees enough.
        let waiting = a.wait(700, true);
        tokio::pin!(waiting);
        assert!(tokio::time::timeout(Duration::from_millis(50), waiting.as_mut()).await.is_err());
        assert!(a.ack(500));
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap(), 900);
        assert!(a.ack(1300) && a.settled());
    }

    #[test]
    fn stdin_is_bounded_by_chunk_allowance_and_its_end() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (written_tx, written) = watch::channel(0u64);
        let mut q = StdinQueue { tx: Some(tx), accepted: 0, written, limit: 4096, max_chunk: Some(1024), ended: false };
        assert!(q.push(Bytes::from(vec![0; 1025])).unwrap_err().contains("stdin_chunk_size"));
        for _ in 0..4 {
            q.push(Bytes::from(vec![0; 1024])).unwrap();
        }
        assert!(q.push(Bytes::from(vec![0; 1])).unwrap_err().contains("4096"), "accepted − written at the limit");
        written_tx.send_replace(1000);
        q.push(Bytes::from(vec![0; 1000])).expect("what was written frees the allowance");
        assert_eq!(std::iter::from_fn(|| rx.try_recv().ok()).count(), 5, "refused frames are not queued");
        q.close();
        assert!(q.push(Bytes::from_static(b"late")).unwrap_err().contains("after its end"));
    }
}
