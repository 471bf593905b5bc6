//! `agentwire host`: a host client for an agent. For `exec`, standard input,
//! output, error and the exit status are those of the remote command.

use std::process::ExitCode;
use std::time::Duration;

use agentwire::payload::exec::{ExecFailureKind, ExecRequest};
use agentwire_client::{Client, ClientError};

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
    },
    /// Ping the agent and print the round-trip times.
    Ping {
        /// How many pings.
        #[arg(short, long, default_value_t = 10)]
        count: usize,
    },
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
    let code = match act(&client, action).await {
        Ok(code) => code,
        Err(e) => return fail(&e),
    };
    // The command's own status counts; a shutdown that the agent does not take is only reported.
    if let Err(e) = client.shutdown(Duration::from_secs(5)).await {
        eprintln!("agentwire host: {e}");
    }
    ExitCode::from(code)
}

/// Runs `req` with this process's stdin, stdout and stderr, and gives the
/// status a shell would: the command's own; 255 when a signal killed it (the
/// agent does not say which); 127 when it was not found and 126 when it could
/// not be run, said on stderr after `who`.
pub async fn exec_with_stdio(client: &Client, req: ExecRequest, who: &str) -> Result<u8, String> {
    let cmd = req.cmd.clone();
    let exec = match client.exec(req).await {
        Ok(exec) => exec,
        Err(ClientError::ExecFailed(failed)) => {
            eprintln!("{who}: {cmd} ({}): {}", failed.kind.as_str(), failed.message);
            return Ok(if failed.kind == ExecFailureKind::NotFound { 127 } else { 126 });
        }
        Err(e) => return Err(e.to_string()),
    };
    let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
    let status = match exec.pipe(tokio::io::stdin(), &mut stdout, &mut stderr).await {
        Ok(status) => status,
        // Whoever reads our output went away (`| head`): end quietly, as a Unix command does.
        Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(141),
        Err(e) => return Err(e.to_string()),
    };
    if status.signaled() {
        eprintln!("{who}: {cmd} was killed by a signal");
    } else if status.code().is_some_and(|c| c > 255) {
        eprintln!("{who}: {cmd} ended with code {:?}, which is no exit status", status.code());
    }
    Ok(status.shell_code())
}

async fn act(client: &Client, action: Action) -> Result<u8, String> {
    match action {
        Action::Exec { command, env, cwd } => {
            let mut req = ExecRequest::new(&command[0]);
            req.args = command[1..].to_vec();
            req.env = env;
            req.cwd = cwd;
            exec_with_stdio(client, req, "agentwire host").await
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
