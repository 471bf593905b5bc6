//! `core.exec.*`: a real child process on pipes or a pseudo-terminal, its
//! output streamed as it comes.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use agentwire::payload::exec::{
    ExecExited, ExecFailed, ExecFailureKind, ExecRequest, ExecStarted, ExecStderr, ExecStdinError, ExecStdout,
};
use agentwire::{Message, Payload};
use std::sync::atomic::{AtomicUsize, Ordering};

use agentwire_session::driver::{MAX_PENDING_WRITE, Route, RouteSender};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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
            if let Payload::ExecRequest(req) = request.payload {
                run(*req, defaults, route).await
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

/// Largest chunk of output in one frame.
const OUTPUT_CHUNK: usize = 64 * 1024;

/// Stdin bytes an execution may have accepted but not yet written into its
/// child. Beyond it, `core.exec.stdin` frames are dropped and answered with
/// `core.exec.stdin.error`: the session loop never waits for the child.
pub(crate) const STDIN_QUEUE_LIMIT: usize = 1024 * 1024;

/// Tasks of one execution (output pumps, stdin feeder), aborted when the
/// execution's task is dropped (the agent aborts it, the connection ends).
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Where stdin goes: the child's pipe, or its terminal.
enum StdinSink {
    Pipe(tokio::process::ChildStdin),
    Pty(Arc<pty::Master>),
}

impl StdinSink {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            StdinSink::Pipe(w) => w.write_all(data).await,
            StdinSink::Pty(m) => m.write_all(data).await,
        }
    }
}

/// The execution's stdin, queued for its feeder task and bounded in bytes:
/// taking a frame never waits.
struct StdinQueue {
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    /// Accepted and not yet written into the child (the feeder subtracts).
    queued: Arc<AtomicUsize>,
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
            // The feeder stopped: the child closed its end, which was reported once.
            return Ok(());
        };
        let len = data.len();
        let queued = self.queued.load(Ordering::Acquire);
        if queued + len > STDIN_QUEUE_LIMIT {
            return Err(format!(
                "stdin frame of {len} bytes dropped: {queued} bytes wait for the command to read them \
                 (at most {STDIN_QUEUE_LIMIT})"
            ));
        }
        self.queued.fetch_add(len, Ordering::AcqRel);
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

/// Runs one `core.exec.request` to its `core.exec.exited` or `core.exec.failed`.
async fn run(req: ExecRequest, defaults: Arc<Defaults>, mut route: Route) {
    let out = route.sender();
    let id = route.id();
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
    let pid = child.id().unwrap_or(0);
    // The child leads its own process group (set before exec; in PTY mode it
    // leads a new session, so its pgid is its pid too): signals and the final
    // kill reach all of it.
    let mut group = GroupGuard(Some(pid));
    if out.send(ExecStarted { pid }).await.is_err() {
        untrack_after_kill(child, group).await;
        return;
    }
    let mut output = Tasks(Vec::new());
    let sink = match &master {
        Some(m) => {
            output.0.push(tokio::spawn(pump_pty(m.clone(), out.clone())));
            Some(StdinSink::Pty(m.clone()))
        }
        None => {
            for task in [
                child.stdout.take().map(|r| tokio::spawn(pump(r, out.clone(), |data| ExecStdout { data }.into()))),
                child.stderr.take().map(|r| tokio::spawn(pump(r, out.clone(), |data| ExecStderr { data }.into()))),
            ] {
                output.0.extend(task);
            }
            child.stdin.take().map(StdinSink::Pipe)
        }
    };
    // stdin is written by its own task from a queue bounded in bytes, so that
    // a child that does not read can stop neither this loop nor the connection.
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel::<Bytes>();
    let queued = Arc::new(AtomicUsize::new(0));
    let feeder =
        Tasks(sink.map(|s| tokio::spawn(feed_stdin(s, stdin_rx, queued.clone(), out.clone()))).into_iter().collect());
    let mut stdin = StdinQueue { tx: Some(stdin_tx), queued, ended: false };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
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
                    drop(output);
                    drop(feeder);
                    untrack_after_kill(child, group).await;
                    return;
                }
            },
        }
    };
    drop(stdin);
    // All output is sent before the exit status, so the host sees it complete.
    for task in &mut output.0 {
        let _ = task.await;
    }
    drop(feeder);
    let code = match status {
        // Killed by a signal: no exit status, and -1 as the reference agent says (spec 10.6).
        Ok(s) => s.code().unwrap_or(-1),
        Err(e) => {
            tracing::warn!("waiting for pid {pid} (id {id}): {e}");
            -1
        }
    };
    untrack(pid);
    // It ended on its own: what it left running in its group may go on (as a daemon would).
    group.0 = None;
    let _ = out.send(ExecExited { code }).await;
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
    if let Some(cwd) = req.cwd.as_ref().or(defaults.cwd.as_ref()) {
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
    if let Some(user) = req.user.as_ref().or(defaults.user.as_ref()) {
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

/// Streams one output pipe as frames of at most [`OUTPUT_CHUNK`] bytes, each as soon as it is read.
async fn pump(mut r: impl AsyncRead + Unpin, out: RouteSender, frame: fn(Bytes) -> Payload) {
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(OUTPUT_CHUNK);
        match (&mut r).take(OUTPUT_CHUNK as u64).read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if out.send(frame(buf.split().freeze())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Streams a terminal's output as `core.exec.stdout` frames until every
/// slave descriptor is closed (the master then reads EIO: the end).
async fn pump_pty(master: Arc<pty::Master>, out: RouteSender) {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    loop {
        match master.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if out.send(ExecStdout { data: Bytes::copy_from_slice(&buf[..n]) }).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!("reading the terminal (id {}): {e}", out.id());
                return;
            }
        }
    }
}

/// Writes queued stdin into the child as it reads; closing the channel
/// closes its stdin (a pipe; a terminal stays open).
async fn feed_stdin(
    mut sink: StdinSink,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
    out: RouteSender,
) {
    while let Some(data) = rx.recv().await {
        let written = sink.write_all(&data).await;
        queued.fetch_sub(data.len(), Ordering::AcqRel);
        if let Err(e) = written {
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
