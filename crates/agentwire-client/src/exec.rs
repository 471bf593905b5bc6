//! Running commands in the guest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use agentwire::payload::Text;
use agentwire::payload::exec::{
    EXEC_OUTPUT_EVENT_OVERHEAD, ExecLimits, ExecOutputAck, ExecRequest, ExecResize, ExecRlimit, ExecSignal, ExecStdin,
    ExecStdinError,
};
use agentwire::{Flags, Message, MessageType, Payload};
use agentwire_session::SendError;
use agentwire_session::driver::{Handle, Route};
use agentwire_session::table::charge;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

use crate::ClientError;
use crate::client::{Client, Sender, Session};

/// What stdin reads from the caller at most per frame.
const STDIN_CHUNK: usize = 64 * 1024;

/// A command to run, built like `std::process::Command`.
///
/// ```
/// use agentwire_client::Command;
/// let cmd = Command::new("sh").args(["-c", "echo $X"]).env("X", "1").cwd("/tmp");
/// assert_eq!(cmd.request().args, ["-c", "echo $X"]);
/// ```
#[derive(Clone, Debug)]
pub struct Command(ExecRequest);

impl Command {
    /// Runs `program` (looked up in the guest's `PATH`).
    pub fn new(program: impl Into<Text>) -> Command {
        Command(ExecRequest::new(program))
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<Text>) -> Command {
        self.0.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<Text>>(mut self, args: I) -> Command {
        self.0.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> Command {
        self.0.env.push(format!("{}={}", key.as_ref(), value.as_ref()).into());
        self
    }

    /// The working directory (default: the guest's).
    pub fn cwd(mut self, dir: impl Into<Text>) -> Command {
        self.0.cwd = Some(dir.into());
        self
    }

    /// The user to run as (default: the guest's).
    pub fn user(mut self, user: impl Into<Text>) -> Command {
        self.0.user = Some(user.into());
        self
    }

    /// Runs on a terminal of `rows` × `cols`: output arrives as stdout only.
    pub fn tty(mut self, rows: u16, cols: u16) -> Command {
        self.0.tty = true;
        self.0.rows = rows;
        self.0.cols = cols;
        self
    }

    /// Adds a resource limit.
    pub fn rlimit(mut self, limit: ExecRlimit) -> Command {
        self.0.rlimits.push(limit);
        self
    }

    /// The request as it will be sent.
    pub fn request(&self) -> &ExecRequest {
        &self.0
    }
}

impl From<ExecRequest> for Command {
    fn from(req: ExecRequest) -> Command {
        Command(req)
    }
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    code: i32,
}

impl ExitStatus {
    /// From `core.exec.exited`'s code: -1 means killed by a signal.
    pub fn from_code(code: i32) -> ExitStatus {
        ExitStatus { code }
    }

    /// The exit code, or `None` when a signal killed the command.
    pub fn code(&self) -> Option<i32> {
        (self.code >= 0).then_some(self.code)
    }

    /// Whether a signal killed it.
    pub fn signaled(&self) -> bool {
        self.code < 0
    }

    /// Whether it exited with 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// The status a shell would give: the code, or 255 for a killed command
    /// (the agent does not say which signal), never 0 for a failure.
    pub fn shell_code(&self) -> u8 {
        match self.code {
            0..=255 => self.code as u8,
            _ => 255,
        }
    }
}

/// What a running command reports.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExecEvent {
    /// It started with this process id.
    Started(u32),
    /// A piece of its standard output (of its terminal, with a tty).
    Stdout(Bytes),
    /// A piece of its standard error.
    Stderr(Bytes),
    /// Its standard input could not be written.
    StdinError(ExecStdinError),
    /// It ended; no event follows.
    Exited(ExitStatus),
}

/// Everything a command wrote, and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

/// A command running in the guest. Dropped, it is abandoned (the command runs on).
///
/// Under execution flow control (a generation-10 agent that advertises
/// `exec_limits`, see [`Client::exec_limits`]), the agent publishes output
/// only within its output allowance, and this handle gives the allowance
/// back with `core.exec.output.ack` as the application *consumes* output:
/// an event handed out by [`Exec::next`] (and so by [`Exec::output`] and
/// [`Exec::pipe`]) counts as consumed once the application asks for the next
/// one. Acknowledgements are coalesced: one is sent when a quarter of the
/// allowance has been consumed since the last, or when everything received
/// has been consumed. An application that stops reading therefore holds the
/// command back (it waits on its output pipe) instead of making this side
/// buffer its output; and since the agent withholds `core.exec.exited` until
/// all output is acknowledged, read until [`ExecEvent::Exited`]. A dropped
/// handle discards the rest of the output and acknowledges it, so that the
/// abandoned command can run to its end and free its slot in the agent.
pub struct Exec {
    id: u32,
    inner: Inner,
    /// A first reply that was output rather than `core.exec.started`.
    first: Option<Message>,
    ended: bool,
}

enum Inner {
    /// No flow control: the session's frames as they come.
    Legacy(Session),
    /// Section 8's flow control.
    Controlled(Controlled),
}

/// What a controlled execution's handle holds.
struct Controlled {
    /// The session's frames, but for stdin acknowledgements, from its task.
    rx: mpsc::UnboundedReceiver<Message>,
    shared: Arc<Flow>,
    /// The output charge handed to the application so far (cumulative).
    consumed: u64,
    /// The charge last acknowledged.
    acked: u64,
    /// How much consumed charge makes an acknowledgement worth sending at once.
    threshold: u64,
}

/// What a controlled execution's handle, its input handles and its task share.
struct Flow {
    id: u32,
    handle: Handle,
    /// Sends the session's frames.
    sender: Sender,
    /// The largest stdin frame.
    stdin_chunk: usize,
    /// Stdin bytes that may be sent and not yet acknowledged.
    input_limit: u64,
    /// The charge of frames the task has passed on and the handle not yet
    /// taken: bounded even against an agent that ignores its own limits.
    held: AtomicUsize,
    /// The handle took frames.
    taken: Notify,
    /// The handle was dropped: its input handles no longer act.
    abandoned: AtomicBool,
    /// Stdin senders, one at a time, in order.
    writer: tokio::sync::Mutex<StdinWriter>,
}

/// The stdin side of a controlled execution.
struct StdinWriter {
    /// Stdin bytes sent (cumulative).
    sent: u64,
    /// The agent's `core.exec.stdin.ack`: stdin bytes written into the command.
    acked: watch::Receiver<u64>,
}

/// What the task of a controlled execution holds back beyond the output
/// allowance before it stops reading the session (only ever reached with an
/// agent that ignores its allowance).
const HELD_SLACK: usize = 64 * 1024;

impl Flow {
    /// The error for input to an execution that is over or abandoned.
    fn gone(&self) -> ClientError {
        match self.handle.ended() {
            Some(_) => ClientError::Closed("the connection ended".into()),
            None => ClientError::Send(SendError::NoSession { id: self.id, message_type: MessageType::ExecStdin }),
        }
    }

    fn check(&self) -> Result<(), ClientError> {
        if self.abandoned.load(Ordering::Acquire) { Err(self.gone()) } else { Ok(()) }
    }

    /// Sends `core.exec.output.ack {consumed}` now (a small control frame
    /// that must not wait behind stdin). Once the execution is over there is
    /// nothing to acknowledge.
    fn ack(&self, consumed: u64) {
        if let Err(e) = self.handle.send_now(|conn| conn.send(self.id, ExecOutputAck { consumed })) {
            tracing::debug!(id = self.id, "core.exec.output.ack {consumed}: {e}");
        }
    }
}

/// What an output frame costs in the agent's output allowance.
fn output_charge(m: &Message) -> u64 {
    match &m.payload {
        Payload::ExecStdout(o) => o.data.len() as u64 + EXEC_OUTPUT_EVENT_OVERHEAD,
        Payload::ExecStderr(o) => o.data.len() as u64 + EXEC_OUTPUT_EVENT_OVERHEAD,
        _ => 0,
    }
}

/// Reads a controlled execution's session: stdin acknowledgements go to the
/// input handles, everything else to the [`Exec`]. Once the `Exec` is
/// dropped, output is discarded and acknowledged. Ends with the session.
async fn serve_session(
    mut route: Route,
    out: mpsc::UnboundedSender<Message>,
    stdin_acked: watch::Sender<u64>,
    flow: Arc<Flow>,
    hold_limit: usize,
) {
    enum Step {
        Frame(Option<Message>),
        Abandoned,
    }
    let mut stdin_acked = Some(stdin_acked);
    // The output charge received (cumulative).
    let mut received = 0u64;
    let mut draining = false;
    loop {
        let step = if draining {
            Step::Frame(route.recv().await)
        } else if flow.held.load(Ordering::Acquire) > hold_limit {
            // The agent sent beyond its allowance: leave the rest with the
            // connection, whose own limits then hold the agent back.
            tokio::select! {
                _ = flow.taken.notified() => continue,
                _ = out.closed() => Step::Abandoned,
            }
        } else {
            tokio::select! {
                m = route.recv() => Step::Frame(m),
                _ = out.closed() => Step::Abandoned,
            }
        };
        let m = match step {
            Step::Frame(Some(m)) => m,
            Step::Frame(None) => return,
            Step::Abandoned => {
                // The input handles stop; the output is given back from now on.
                draining = true;
                flow.abandoned.store(true, Ordering::Release);
                stdin_acked = None;
                if received > 0 {
                    flow.ack(received);
                }
                continue;
            }
        };
        if let Payload::ExecStdinAck(a) = m.payload {
            if let Some(tx) = &stdin_acked {
                tx.send_if_modified(|v| {
                    let more = a.consumed > *v;
                    *v = (*v).max(a.consumed);
                    more
                });
            }
            continue;
        }
        let cost = output_charge(&m);
        received += cost;
        if draining {
            if cost > 0 {
                flow.ack(received);
            }
            continue;
        }
        let last = m.flags.contains(Flags::TERMINAL);
        flow.held.fetch_add(charge(&m.payload), Ordering::AcqRel);
        if let Err(mpsc::error::SendError(m)) = out.send(m) {
            // Dropped meanwhile: this frame is discarded too.
            flow.held.fetch_sub(charge(&m.payload), Ordering::AcqRel);
            draining = true;
            flow.abandoned.store(true, Ordering::Release);
            stdin_acked = None;
            flow.ack(received);
        }
        if last {
            return;
        }
    }
}

impl Controlled {
    fn start(session: Session, limits: &ExecLimits) -> Controlled {
        let id = session.id();
        let sender = session.sender();
        let route = session.into_route();
        let input_limit = u64::from(limits.input_limit.max(1));
        let stdin_chunk = (limits.stdin_chunk_size as usize).clamp(1, input_limit as usize);
        let (acked_tx, acked_rx) = watch::channel(0);
        let flow = Arc::new(Flow {
            id,
            handle: route.handle().clone(),
            sender,
            stdin_chunk,
            input_limit,
            held: AtomicUsize::new(0),
            taken: Notify::new(),
            abandoned: AtomicBool::new(false),
            writer: tokio::sync::Mutex::new(StdinWriter { sent: 0, acked: acked_rx }),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let hold_limit = limits.output_limit as usize + HELD_SLACK;
        tokio::spawn(serve_session(route, tx, acked_tx, flow.clone(), hold_limit));
        let threshold = u64::from(limits.output_limit / 4).max(1);
        Controlled { rx, shared: flow, consumed: 0, acked: 0, threshold }
    }

    /// The next frame. What the application consumed before it is
    /// acknowledged first when it reaches the threshold, or when nothing is
    /// waiting (so that the agent, which may be held back, goes on).
    async fn recv(&mut self) -> Option<Message> {
        if self.consumed - self.acked >= self.threshold {
            self.ack();
        }
        let m = match self.rx.try_recv() {
            Ok(m) => m,
            Err(mpsc::error::TryRecvError::Empty) => {
                if self.consumed > self.acked {
                    self.ack();
                }
                self.rx.recv().await?
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
        };
        self.shared.held.fetch_sub(charge(&m.payload), Ordering::AcqRel);
        self.shared.taken.notify_one();
        Some(m)
    }

    fn ack(&mut self) {
        self.acked = self.consumed;
        self.shared.ack(self.consumed);
    }
}

/// Writes a running command's standard input; cheap to clone.
///
/// Under execution flow control (see [`Exec`]) data goes in chunks of at
/// most the agent's `stdin_chunk_size`, and at most its `input_limit` bytes
/// are in flight — sent, and not yet written into the command according to
/// the agent's `core.exec.stdin.ack`: a writer waits for room rather than
/// fail. So, as with a local process, a command that writes output as it
/// reads its input needs its output read meanwhile ([`Exec::pipe`] does both).
#[derive(Clone)]
pub struct ExecInput {
    sender: Sender,
    flow: Option<Arc<Flow>>,
}

impl ExecInput {
    /// Sends `data` (waits while the agent is behind). Empty data is ignored;
    /// use [`ExecInput::close`] for the end of input.
    ///
    /// Under flow control, writes of several handles are sent one after the
    /// other, each whole; a write that is cancelled may have sent a part.
    pub async fn write(&self, mut data: Bytes) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        let Some(flow) = &self.flow else {
            return self.sender.send(ExecStdin { data }).await;
        };
        flow.check()?;
        let mut writer = flow.writer.lock().await;
        let StdinWriter { sent, acked } = &mut *writer;
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(flow.stdin_chunk));
            let len = chunk.len() as u64;
            // Room for it: at most input_limit bytes sent and not yet acknowledged.
            let limit = flow.input_limit;
            acked.wait_for(|acked| *sent + len <= acked.saturating_add(limit)).await.map_err(|_| flow.gone())?;
            flow.check()?;
            self.sender.send(ExecStdin { data: chunk }).await?;
            *sent += len;
        }
        Ok(())
    }

    /// Ends the command's input (without a tty; on a tty send `0x04` instead).
    /// Under flow control it follows every write already started.
    pub async fn close(&self) -> Result<(), ClientError> {
        let Some(flow) = &self.flow else {
            return self.sender.send(ExecStdin { data: Bytes::new() }).await;
        };
        flow.check()?;
        let _writer = flow.writer.lock().await;
        flow.check()?;
        self.sender.send(ExecStdin { data: Bytes::new() }).await
    }

    /// Sends signal `signal` to the command's process group.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        if let Some(flow) = &self.flow {
            flow.check()?;
        }
        self.sender.send(ExecSignal { signal }).await
    }

    /// Resizes the command's terminal.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        if let Some(flow) = &self.flow {
            flow.check()?;
        }
        self.sender.send(ExecResize { rows, cols }).await
    }
}

impl Client {
    /// Starts `command`; fails with [`ClientError::ExecFailed`] when the agent
    /// could not start it. Input and output are then the [`Exec`]'s, under
    /// the agent's flow control when it has one ([`Client::exec_limits`]).
    pub async fn exec(&self, command: impl Into<Command>) -> Result<Exec, ClientError> {
        let session = self.request(command.into().0).await?;
        let mut exec = Exec::new(session, self.exec_limits.as_ref());
        // The first reply says whether it started.
        let first = exec.recv().await.ok_or_else(|| self.closed("core.exec.started"))?;
        match first.payload {
            // An agent that sends no started message starts with output.
            Payload::ExecStarted(_) | Payload::ExecStdout(_) | Payload::ExecStderr(_) | Payload::ExecExited(_) => {
                exec.first = Some(first);
                Ok(exec)
            }
            Payload::ExecFailed(f) => {
                exec.ended = true;
                Err(ClientError::ExecFailed(f))
            }
            other => Err(ClientError::unexpected("core.exec.started", other)),
        }
    }
}

impl Exec {
    fn new(session: Session, limits: Option<&ExecLimits>) -> Exec {
        let id = session.id();
        let inner = match limits {
            Some(limits) => Inner::Controlled(Controlled::start(session, limits)),
            None => Inner::Legacy(session),
        };
        Exec { id, inner, first: None, ended: false }
    }

    /// The session's next frame, stdin acknowledgements left out.
    async fn recv(&mut self) -> Option<Message> {
        if let Some(m) = self.first.take() {
            return Some(m);
        }
        loop {
            let m = match &mut self.inner {
                Inner::Legacy(session) => session.recv().await?,
                Inner::Controlled(c) => c.recv().await?,
            };
            // Only a controlled execution gets them, and its task takes them.
            if !matches!(m.payload, Payload::ExecStdinAck(_)) {
                return Some(m);
            }
        }
    }

    /// The operation's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// A handle on the command's input, signals and terminal size.
    pub fn input(&self) -> ExecInput {
        match &self.inner {
            Inner::Legacy(session) => ExecInput { sender: session.sender(), flow: None },
            Inner::Controlled(c) => ExecInput { sender: c.shared.sender.clone(), flow: Some(c.shared.clone()) },
        }
    }

    /// The next event; `None` after [`ExecEvent::Exited`].
    ///
    /// Under flow control, output handed out counts as consumed when this is
    /// called again (see [`Exec`]).
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.ended {
            return Ok(None);
        }
        let Some(m) = self.recv().await else {
            self.ended = true;
            return Err(ClientError::Closed("the connection ended before core.exec.exited".into()));
        };
        if let Inner::Controlled(c) = &mut self.inner {
            c.consumed += output_charge(&m);
        }
        Ok(Some(match m.payload {
            Payload::ExecStarted(s) => ExecEvent::Started(s.pid),
            Payload::ExecStdout(o) => ExecEvent::Stdout(o.data),
            Payload::ExecStderr(o) => ExecEvent::Stderr(o.data),
            Payload::ExecStdinError(e) => ExecEvent::StdinError(e),
            Payload::ExecExited(e) => {
                self.ended = true;
                ExecEvent::Exited(ExitStatus::from_code(e.code))
            }
            Payload::ExecFailed(f) => {
                self.ended = true;
                return Err(ClientError::ExecFailed(f));
            }
            other => {
                self.ended = true;
                return Err(ClientError::unexpected("core.exec.exited", other));
            }
        }))
    }

    /// Closes the command's input and collects its output until it ends.
    ///
    /// The end of input follows any write of another [`ExecInput`] already
    /// under way; output is collected meanwhile.
    pub async fn output(mut self) -> Result<Output, ClientError> {
        let input = self.input();
        let close = async move { input.close().await };
        tokio::pin!(close);
        let mut closing = true;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            tokio::select! {
                biased;
                closed = &mut close, if closing => {
                    closing = false;
                    match closed {
                        // The command may have ended already: its input is then closed anyway.
                        Ok(()) | Err(ClientError::Send(SendError::NoSession { .. })) => {}
                        Err(e) => return Err(e),
                    }
                }
                event = self.next() => match event? {
                    Some(ExecEvent::Stdout(d)) => stdout.extend_from_slice(&d),
                    Some(ExecEvent::Stderr(d)) => stderr.extend_from_slice(&d),
                    Some(ExecEvent::Exited(status)) => return Ok(Output { status, stdout, stderr }),
                    Some(_) => {}
                    None => return Err(ClientError::Closed("the command's events ended".into())),
                },
            }
        }
    }

    /// Feeds `stdin` to the command and copies its output to `stdout` and
    /// `stderr` as it comes, until it ends. Output is read only as fast as
    /// the writers take it. Input the agent drops (see
    /// [`ClientError::InputDropped`]) ends it with that error: the command's
    /// output would not be the output of the input given.
    pub async fn pipe(
        mut self,
        mut stdin: impl AsyncRead + Unpin,
        stdout: &mut (impl AsyncWrite + Unpin),
        stderr: &mut (impl AsyncWrite + Unpin),
    ) -> Result<ExitStatus, ClientError> {
        let input = self.input();
        let feed = async move {
            let mut buf = BytesMut::new();
            loop {
                buf.reserve(STDIN_CHUNK);
                let n = stdin.read_buf(&mut buf).await.map_err(ClientError::Io)?;
                if n == 0 {
                    return input.close().await;
                }
                input.write(buf.split().freeze()).await?;
            }
        };
        tokio::pin!(feed);
        let mut feeding = true;
        let status = loop {
            tokio::select! {
                fed = &mut feed, if feeding => {
                    feeding = false;
                    // Input that cannot be delivered (the command ended) is not the command's failure.
                    if let Err(e) = fed {
                        tracing::debug!("the command's input: {e}");
                    }
                }
                event = self.next() => match event? {
                    Some(ExecEvent::Stdout(d)) => stdout.write_all(&d).await?,
                    Some(ExecEvent::Stderr(d)) => stderr.write_all(&d).await?,
                    // An errno is the command's side (it closed its input),
                    // as with a local pipe; none means input was dropped.
                    Some(ExecEvent::StdinError(e)) if e.errno.is_none() => {
                        return Err(ClientError::InputDropped(e.message));
                    }
                    Some(ExecEvent::StdinError(e)) => tracing::debug!("the command's input: {}", e.message),
                    Some(ExecEvent::Started(_)) => {}
                    Some(ExecEvent::Exited(status)) => break status,
                    None => return Err(ClientError::Closed("the command's events ended".into())),
                },
            }
        };
        stdout.flush().await?;
        stderr.flush().await?;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_never_calls_a_killed_command_a_success() {
        let killed = ExitStatus::from_code(-1);
        assert!(killed.signaled() && !killed.success());
        assert_eq!((killed.code(), killed.shell_code()), (None, 255));
        assert_eq!(ExitStatus::from_code(3).shell_code(), 3);
        assert_eq!(ExitStatus::from_code(300).shell_code(), 255);
        assert!(ExitStatus::from_code(0).success());
    }
}
