//! # agentwire-client
//!
//! An async host client for the agent wire protocol: connect over any byte
//! stream (Unix socket, vsock, TCP, a VM's serial port), then run commands,
//! move files and open TCP connections in the guest. It is a thin driver of
//! the sans-IO [`agentwire_session::Connection`]; every buffer is bounded in
//! bytes, with backpressure instead of growth.
//!
//! With a generation-10 agent, commands run under the agent's execution flow
//! control (spec section 8): the bootstrap offers a policy
//! ([`Builder::exec_limits`]), the agent advertises it in `core.ready`, and the
//! client then acknowledges output as the application consumes it ([`Exec`])
//! and keeps stdin within the advertised allowance ([`ExecInput`]). Against an
//! agent that advertises no policy, commands run as with a generation-7 agent.
//!
//! With an agent of generation 8 or later, file reads and writes
//! ([`Client::read_file`], [`Client::write_file`]) and TCP connections
//! ([`Client::tcp_connect`]) move their data as raw bulk records (spec
//! section 7) under per-transfer credit: the agent sends only as far as this
//! side's destination has taken the data, and this side reads its source
//! only as far as the agent has written. [`Builder::bulk`] turns this off;
//! with an older agent the same operations use `core.fs.data` and
//! `core.tcp.data` as generation 7 does.
//!
//! ```no_run
//! use agentwire_client::{Client, Command};
//!
//! # async fn f() -> Result<(), agentwire_client::ClientError> {
//! let socket = tokio::net::UnixStream::connect("/run/agent.sock").await?;
//! let client = Client::connect(socket).await?;
//! let out = client.exec(Command::new("uname").arg("-a")).await?.output().await?;
//! assert!(out.status.success());
//! client.write_file("/tmp/hello", &b"hello"[..], Some(5)).await?;
//! client.shutdown(std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod bulk;
mod client;
mod exec;
mod fs;
mod tcp;

pub use agentwire;
pub use agentwire_session;
pub use agentwire_session::driver::{Count, Counters};
pub use client::{Builder, Client, Session};
pub use exec::{Command, Exec, ExecEvent, ExecInput, ExitStatus, Output};
pub use tcp::TcpStream;

use agentwire::Payload;
use agentwire::payload::exec::ExecFailed;
use agentwire_session::{ConnectionError, SendError};

/// What can go wrong for a client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The transport or a local reader/writer failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// A frame could not be sent (generation, session, size).
    #[error(transparent)]
    Send(#[from] SendError),
    /// The connection ended.
    #[error("the connection is closed: {0}")]
    Closed(String),
    /// No answer within the limit.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The agent could not start the command.
    #[error("the command could not be started ({}): {}", .0.kind.as_str(), .0.message)]
    ExecFailed(Box<ExecFailed>),
    /// A file-system operation was refused.
    #[error("{what}: {message}")]
    Fs {
        /// The operation and its path.
        what: String,
        /// The agent's reason.
        message: String,
    },
    /// The agent dropped input of a command (`core.exec.stdin.error` without
    /// an errno: the frame broke the execution's input limits, or, for an
    /// execution without flow control, the agent's input queue was full), so
    /// the command did not get all of its input.
    #[error("the agent dropped input of the command: {0}")]
    InputDropped(String),
    /// The agent could not connect, or the connection failed.
    #[error("tcp: {0}")]
    TcpFailed(String),
    /// The agent answered `core.error`.
    #[error("core.error ({kind}): {message}")]
    Agent {
        /// Its kind.
        kind: String,
        /// Its message.
        message: String,
    },
    /// The agent answered something else than the protocol says.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: String,
    },
}

impl ClientError {
    /// `got` came where `expected` should have; a `core.error` becomes [`ClientError::Agent`].
    pub(crate) fn unexpected(expected: &'static str, got: Payload) -> ClientError {
        match got {
            Payload::Error(e) => ClientError::Agent { kind: e.kind.as_str().to_string(), message: e.message },
            other => ClientError::Unexpected { expected, got: other.message_type().wire_name().to_string() },
        }
    }
}
