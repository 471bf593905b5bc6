//! `agentwire host`: a host client for an agent. For `exec`, standard input,
//! output, error and the exit status are those of the remote command; with
//! `--tty` it runs on a terminal in the guest, interactively.

use std::process::ExitCode;
use std::time::Duration;

use agentwire::payload::Text;
use agentwire::payload::exec::{ExecFailureKind, ExecRequest};
use agentwire_client::{Client, ClientError, Exec, ExecEvent, ExitStatus};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::addr::{self, Addr};

/// What the host does once connected.
#[derive(clap::Subcommand)]
pub enum Action {
    /// Run a command in the guest: its stdin, stdout, stderr and exit status become this command's.
    Exec {
        /// The program, then its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
        /// Environment entries KEY=VALUE for the command (repeatable).
        #[arg(short, long = "env")]
        env: Vec<String>,
        /// Working directory in the guest.
        #[arg(long)]
        cwd: Option<String>,
        /// Run on a terminal in the guest, interactively like `ssh -t`: this
        /// terminal goes raw (restored at the end), its size follows, and
        /// every key goes to the command (Ctrl-D as 0x04). Without a local
        /// terminal the remote one is still allocated (24x80 unless stdout is
        /// a terminal), and the end of stdin is sent as one 0x04.
        #[arg(short, long)]
        tty: bool,
    },
    /// Ping the agent and print the round-trip times.
    Ping {
        /// How many pings.
        #[arg(short, long, default_value_t = 10)]
        count: usize,
    },
    /// Ask the agent to shut down (`core.shutdown`): it ends every command,
    /// and as a VM's init powers the VM off. Waits until it closes the connection.
    Shutdown,
    /// Copy a file from the guest (a path inside the agent's --root) to standard output.
    FsGet {
        /// Path inside the agent's root.
        path: String,
    },
    /// Copy a local file into the guest (a path inside the agent's --root).
    FsPut {
        /// Local file.
        local: std::path::PathBuf,
        /// Path inside the agent's root.
        path: String,
    },
}

/// Runs `action` against the agent at `addr`.
pub async fn run(addr: &str, action: Action) -> ExitCode {
    let addr = match Addr::parse(addr) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    // Bad local input is refused before anything is sent.
    if let Action::FsPut { local, .. } = &action {
        match std::fs::metadata(local) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return usage(&format!("{}: not a regular file", local.display())),
            Err(e) => return usage(&format!("cannot read {}: {e}", local.display())),
        }
    }
    let stream = match addr::connect(&addr).await {
        Ok(s) => s,
        Err(e) => return usage(&format!("cannot connect to {addr}: {e}")),
    };
    let client = match Client::connect(stream).await {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    let code = match act(client, action).await {
        Ok(code) => code,
        Err(e) => return fail(&e),
    };
    // Closing the connection (the client was dropped) ends this host's
    // sessions only; `core.shutdown` would stop every command of the agent
    // (and power a VM off), so it is sent only when asked for (`host shutdown`).
    ExitCode::from(code)
}

/// Runs `req` with this process's stdin, stdout and stderr, and gives the
/// status a shell would: the command's own; 255 when a signal killed it (the
/// agent does not say which); 127 when it was not found and 126 when it could
/// not be run, said on stderr after `who`.
pub async fn exec_with_stdio(client: &Client, req: ExecRequest, who: &str) -> Result<u8, String> {
    let cmd = req.cmd.clone();
    let exec = match start(client, req, who).await? {
        Ok(exec) => exec,
        Err(code) => return Ok(code),
    };
    let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
    let status = match exec.pipe(tokio::io::stdin(), &mut stdout, &mut stderr).await {
        Ok(status) => status,
        // Whoever reads our output went away (`| head`): end quietly, as a Unix command does.
        Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(141),
        Err(e) => return Err(e.to_string()),
    };
    Ok(shell_status(status, &cmd, who))
}

/// Starts `req`; a command that could not start is said on stderr and gives
/// its shell status (127 not found, 126 otherwise) as `Ok(Err(code))`.
async fn start(client: &Client, req: ExecRequest, who: &str) -> Result<Result<Exec, u8>, String> {
    let cmd = req.cmd.clone();
    match client.exec(req).await {
        Ok(exec) => Ok(Ok(exec)),
        Err(ClientError::ExecFailed(failed)) => {
            eprintln!("{who}: {cmd} ({}): {}", failed.kind.as_str(), failed.message);
            Ok(Err(if failed.kind == ExecFailureKind::NotFound { 127 } else { 126 }))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The status a shell would give for how `cmd` ended, with a word on stderr when it is not its own.
fn shell_status(status: ExitStatus, cmd: &str, who: &str) -> u8 {
    if status.signaled() {
        eprintln!("{who}: {cmd} was killed by a signal");
    } else if status.code().is_some_and(|c| c > 255) {
        eprintln!("{who}: {cmd} ended with code {:?}, which is no exit status", status.code());
    }
    status.shell_code()
}

/// The size of the local terminal (stdin's, else stdout's), if there is one.
fn local_size() -> Option<(u16, u16)> {
    let size = rustix::termios::tcgetwinsize(std::io::stdin())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdout()))
        .ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// The local terminal in raw mode while this lives: its settings come back
/// when it is dropped, on every way out (the end, an error, a signal handled
/// below, a panic that unwinds).
struct RawMode {
    stdin: std::io::Stdin,
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> std::io::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Flush, &raw)?;
        Ok(RawMode { stdin, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Drain, so that output still in the terminal is shown with the settings it was written for.
        let _ = rustix::termios::tcsetattr(&self.stdin, rustix::termios::OptionalActions::Drain, &self.saved);
    }
}

/// Runs `req` on a terminal in the guest, interactively as `ssh -t` does:
/// the local terminal (if stdin is one) is raw meanwhile, its size is the
/// remote one's and follows it (SIGWINCH), and stdin goes as it comes.
/// SIGINT, SIGTERM and SIGHUP hang the command up (SIGHUP to its group),
/// restore the terminal and end with 128 + the signal's number.
pub async fn exec_with_tty(client: &Client, mut req: ExecRequest, who: &str) -> Result<u8, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let cmd = req.cmd.clone();
    let interactive = rustix::termios::isatty(std::io::stdin());
    req.tty = true;
    if let Some((rows, cols)) = local_size() {
        (req.rows, req.cols) = (rows, cols);
    }
    if let Ok(term) = std::env::var("TERM")
        && !req.env.iter().any(|e| e.starts_with("TERM="))
    {
        req.env.push(format!("TERM={term}").into());
    }
    let listen = |kind: SignalKind| signal(kind).map_err(|e| format!("signal handler: {e}"));
    let (mut winch, mut int, mut term, mut hup) = (
        listen(SignalKind::window_change())?,
        listen(SignalKind::interrupt())?,
        listen(SignalKind::terminate())?,
        listen(SignalKind::hangup())?,
    );
    let mut exec = match start(client, req, who).await? {
        Ok(exec) => exec,
        Err(code) => return Ok(code),
    };
    let raw = if interactive {
        Some(RawMode::enter().map_err(|e| format!("raw mode on the local terminal: {e}"))?)
    } else {
        None
    };
    let input = exec.input();
    let feed = {
        let input = input.clone();
        async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = BytesMut::new();
            loop {
                buf.reserve(16 * 1024);
                let n = stdin.read_buf(&mut buf).await.map_err(ClientError::Io)?;
                if n == 0 {
                    // A terminal has no end of its own: a file or pipe ends as Ctrl-D would.
                    if !interactive {
                        input.write(Bytes::from_static(b"\x04")).await?;
                    }
                    return Ok::<(), ClientError>(());
                }
                input.write(buf.split().freeze()).await?;
            }
        }
    };
    tokio::pin!(feed);
    let mut feeding = true;
    let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
    let hang_up = async |signal: i32| {
        let _ = input.signal(libc::SIGHUP).await;
        128 + signal as u8
    };
    let ended = loop {
        tokio::select! {
            fed = &mut feed, if feeding => {
                feeding = false;
                if let Err(e) = fed {
                    tracing::debug!("the command's input: {e}");
                }
            }
            _ = winch.recv() => {
                if let Some((rows, cols)) = local_size() {
                    let _ = input.resize(rows, cols).await;
                }
            }
            _ = int.recv() => break Err(hang_up(libc::SIGINT).await),
            _ = term.recv() => break Err(hang_up(libc::SIGTERM).await),
            _ = hup.recv() => break Err(hang_up(libc::SIGHUP).await),
            event = exec.next() => match event {
                Ok(Some(ExecEvent::Stdout(d))) => write_now(&mut stdout, &d).await?,
                Ok(Some(ExecEvent::Stderr(d))) => write_now(&mut stderr, &d).await?,
                Ok(Some(ExecEvent::Exited(status))) => break Ok(status),
                Ok(Some(_)) => {}
                Ok(None) => break Err(255),
                Err(e) => {
                    drop(raw);
                    return Err(e.to_string());
                }
            },
        }
    };
    drop(raw);
    Ok(match ended {
        Ok(status) => shell_status(status, &cmd, who),
        Err(code) => code,
    })
}

async fn write_now(w: &mut (impl tokio::io::AsyncWrite + Unpin), data: &[u8]) -> Result<(), String> {
    w.write_all(data).await.map_err(|e| e.to_string())?;
    w.flush().await.map_err(|e| e.to_string())
}

async fn act(client: Client, action: Action) -> Result<u8, String> {
    if let Action::Shutdown = action {
        client.shutdown(Duration::from_secs(30)).await.map_err(|e| e.to_string())?;
        return Ok(0);
    }
    act_on(&client, action).await
}

async fn act_on(client: &Client, action: Action) -> Result<u8, String> {
    match action {
        Action::Shutdown => Ok(0),
        Action::Exec { command, env, cwd, tty } => {
            let mut req = ExecRequest::new(&command[0]);
            req.args = command[1..].iter().map(Text::from).collect();
            req.env = env.into_iter().map(Text::from).collect();
            req.cwd = cwd.map(Text::from);
            if tty {
                exec_with_tty(client, req, "agentwire host").await
            } else {
                exec_with_stdio(client, req, "agentwire host").await
            }
        }
        Action::Ping { count } => {
            for i in 1..=count {
                let rtt = client.ping().await.map_err(|e| e.to_string())?;
                println!("pong {i}: {:.1} µs", rtt.as_secs_f64() * 1e6);
            }
            Ok(0)
        }
        Action::FsGet { path } => {
            client.read_file(&path, &mut tokio::io::stdout()).await.map_err(|e| e.to_string())?;
            Ok(0)
        }
        Action::FsPut { local, path } => {
            let file =
                tokio::fs::File::open(&local).await.map_err(|e| format!("cannot read {}: {e}", local.display()))?;
            let len = file.metadata().await.ok().map(|m| m.len());
            let n = client.write_file(&path, file, len).await.map_err(|e| e.to_string())?;
            eprintln!("agentwire host: {n} bytes written to {path}");
            Ok(0)
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("agentwire host: {message}");
    ExitCode::from(crate::EXIT_USAGE)
}

fn fail(message: &str) -> ExitCode {
    eprintln!("agentwire host: {message}");
    ExitCode::FAILURE
}
