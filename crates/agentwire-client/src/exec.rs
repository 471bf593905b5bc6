//! Running commands in the guest.

use agentwire::Payload;
use agentwire::payload::exec::{ExecRequest, ExecResize, ExecRlimit, ExecSignal, ExecStdin, ExecStdinError};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    pub fn new(program: impl Into<String>) -> Command {
        Command(ExecRequest::new(program))
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Command {
        self.0.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Command {
        self.0.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> Command {
        self.0.env.push(format!("{}={}", key.as_ref(), value.as_ref()));
        self
    }

    /// The working directory (default: the guest's).
    pub fn cwd(mut self, dir: impl Into<String>) -> Command {
        self.0.cwd = Some(dir.into());
        self
    }

    /// The user to run as (default: the guest's).
    pub fn user(mut self, user: impl Into<String>) -> Command {
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
pub struct Exec {
    session: Session,
    /// A first reply that was output rather than `core.exec.started`.
    first: Option<agentwire::Message>,
    ended: bool,
}

/// Writes a running command's standard input; cheap to clone.
#[derive(Clone)]
pub struct ExecInput(Sender);

impl ExecInput {
    /// Sends `data` (waits while the agent is behind). Empty data is ignored;
    /// use [`ExecInput::close`] for the end of input.
    pub async fn write(&self, data: Bytes) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        self.0.send(ExecStdin { data }).await
    }

    /// Ends the command's input (without a tty; on a tty send `0x04` instead).
    pub async fn close(&self) -> Result<(), ClientError> {
        self.0.send(ExecStdin { data: Bytes::new() }).await
    }

    /// Sends signal `signal` to the command's process group.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.0.send(ExecSignal { signal }).await
    }

    /// Resizes the command's terminal.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.0.send(ExecResize { rows, cols }).await
    }
}

impl Client {
    /// Starts `command`; fails with [`ClientError::ExecFailed`] when the agent
    /// could not start it. Input and output are then the [`Exec`]'s.
    pub async fn exec(&self, command: impl Into<Command>) -> Result<Exec, ClientError> {
        let mut session = self.request(command.into().0).await?;
        // The first reply says whether it started.
        let first = session.recv().await.ok_or_else(|| self.closed("core.exec.started"))?;
        match first.payload {
            Payload::ExecStarted(_) => Ok(Exec { session, first: Some(first), ended: false }),
            // An agent that sends no started message starts with output.
            Payload::ExecStdout(_) | Payload::ExecStderr(_) | Payload::ExecExited(_) => {
                Ok(Exec { session, first: Some(first), ended: false })
            }
            Payload::ExecFailed(f) => Err(ClientError::ExecFailed(f)),
            other => Err(ClientError::unexpected("core.exec.started", other)),
        }
    }
}

impl Exec {
    /// The operation's id.
    pub fn id(&self) -> u32 {
        self.session.id()
    }

    /// A handle on the command's input, signals and terminal size.
    pub fn input(&self) -> ExecInput {
        ExecInput(self.session.sender())
    }

    /// The next event; `None` after [`ExecEvent::Exited`].
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.ended {
            return Ok(None);
        }
        let next = match self.first.take() {
            Some(m) => Some(m),
            None => self.session.recv().await,
        };
        let Some(m) = next else {
            self.ended = true;
            return Err(ClientError::Closed("the connection ended before core.exec.exited".into()));
        };
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
    pub async fn output(mut self) -> Result<Output, ClientError> {
        match self.input().close().await {
            // The command may have ended already: its input is then closed anyway.
            Ok(()) | Err(ClientError::Send(agentwire_session::SendError::NoSession { .. })) => {}
            Err(e) => return Err(e),
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match self.next().await? {
                Some(ExecEvent::Stdout(d)) => stdout.extend_from_slice(&d),
                Some(ExecEvent::Stderr(d)) => stderr.extend_from_slice(&d),
                Some(ExecEvent::Exited(status)) => return Ok(Output { status, stdout, stderr }),
                Some(_) => {}
                None => return Err(ClientError::Closed("the command's events ended".into())),
            }
        }
    }

    /// Feeds `stdin` to the command and copies its output to `stdout` and
    /// `stderr` as it comes, until it ends. Output is read only as fast as
    /// the writers take it.
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
