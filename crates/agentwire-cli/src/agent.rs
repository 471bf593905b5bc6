//! `agentwire agent`: accepts connections and serves each with the agent
//! library. Connections are independent; a serial device carries one at a
//! time, so its connections are served in turn.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

pub use agentwire_agent::{Agent, Config, Ended, reap_orphans, sys};

use crate::addr::{Listener, Stream};

/// How connections are served.
#[derive(Clone, Copy, Debug)]
pub struct Serving {
    /// Log each connection's start and end.
    pub verbose: bool,
    /// File reads and command output go from their pipes into the connection
    /// by `splice` where it can take them (`Agent::serve_splicing`).
    pub splice: bool,
}

/// Accepts connections for ever, each served by its own task. A connection
/// that fails is closed alone; running out of file descriptors refuses the
/// connection being accepted, not the agent. In init mode, `core.shutdown`
/// on the serial port powers the VM off.
pub async fn serve(listener: Listener, agent: Arc<Agent>, serving: Serving) -> std::io::Result<()> {
    loop {
        let (stream, fd, peer) = match listener.accept(serving.splice).await {
            Ok(accepted) => accepted,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)) => {
                tracing::warn!("accept: {e}; a connection waits until a descriptor is free");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        let served = serve_one(stream, fd, peer, agent.clone(), serving.verbose);
        if !listener.is_serial() {
            tokio::spawn(served);
        } else if served.await == Ended::Shutdown && agent.config().init_mode {
            return Err(sys::power_off());
        }
    }
}

async fn serve_one(stream: Stream, fd: Option<OwnedFd>, peer: String, agent: Arc<Agent>, verbose: bool) -> Ended {
    if verbose {
        tracing::info!(%peer, "connected");
    }
    let served = match fd {
        Some(fd) => agent.serve_splicing(stream, fd).await,
        None => agent.serve(stream).await,
    };
    match served {
        Ok(ended) => {
            if verbose {
                tracing::info!(%peer, ?ended, "closed");
            }
            ended
        }
        Err(e) => {
            tracing::warn!(%peer, "{e}; connection closed");
            Ended::Closed
        }
    }
}
