//! `agentwire host`: a host client for an agent. For `exec`, standard input,
//! output, error and the exit status are those of the remote command.

use std::process::ExitCode;
use std::time::Duration;

use agentwire::payload::exec::ExecRequest;

use crate::addr::{self, Addr};
use crate::client::Client;

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
    let stream = match addr::connect(&addr).await {
        Ok(s) => s,
        Err(e) => return usage(&format!("cannot connect to {addr}: {e}")),
    };
    let client = match Client::connect(stream, None, None).await {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let code = match act(&client, action).await {
        Ok(code) => code,
        Err(e) => return fail(&e),
    };
    // The command's own status counts; a shutdown that the agent does not take is only reported.
    if let Err(e) = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await.unwrap_or(Ok(())) {
        eprintln!("agentwire host: {e}");
    }
    ExitCode::from(code)
}

async fn act(client: &Client, action: Action) -> Result<u8, String> {
    match action {
        Action::Exec { command, env, cwd } => {
            let mut req = ExecRequest::new(&command[0]);
            req.args = command[1..].to_vec();
            req.env = env;
            req.cwd = cwd;
            client.exec_with_stdio(req, "agentwire host").await
        }
        Action::Ping { count } => {
            for i in 1..=count {
                let rtt = client.ping().await?;
                println!("pong {i}: {:.1} µs", rtt.as_secs_f64() * 1e6);
            }
            Ok(0)
        }
        Action::FsGet { path } => {
            client.fs_get(&path, &mut tokio::io::stdout()).await?;
            Ok(0)
        }
        Action::FsPut { local, path } => {
            let file =
                tokio::fs::File::open(&local).await.map_err(|e| format!("cannot read {}: {e}", local.display()))?;
            let len = file.metadata().await.ok().map(|m| m.len());
            let n = client.fs_put(&path, file, len).await?;
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
