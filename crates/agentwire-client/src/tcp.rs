//! TCP connections the agent makes on the host's behalf.

use agentwire::Payload;
use agentwire::payload::tcp::{TcpClose, TcpConnect, TcpData, TcpEof};
use bytes::Bytes;

use crate::ClientError;
use crate::client::{Client, Session};

/// A TCP connection from the guest. Dropped, it is closed.
pub struct TcpStream {
    session: Session,
    read_closed: bool,
}

impl Client {
    /// Asks the agent to connect to `host:port`; waits for the outcome.
    pub async fn tcp_connect(&self, host: &str, port: u16) -> Result<TcpStream, ClientError> {
        let mut session = self.request(TcpConnect { host: host.into(), port }).await?;
        let reply = self.within(session.recv()).await?;
        match reply.map(|m| m.payload) {
            Some(Payload::TcpConnected(_)) => Ok(TcpStream { session, read_closed: false }),
            Some(Payload::TcpFailed(f)) => Err(ClientError::TcpFailed(f.error)),
            Some(other) => Err(ClientError::unexpected("core.tcp.connected", other)),
            None => Err(self.closed("core.tcp.connected")),
        }
    }
}

impl TcpStream {
    /// The operation's id.
    pub fn id(&self) -> u32 {
        self.session.id()
    }

    /// Sends `data` to the peer (waits while the agent is behind).
    pub async fn write(&self, data: Bytes) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        self.session.send(TcpData { data }).await
    }

    /// Closes the sending half (the peer reads end of file).
    pub async fn shutdown_write(&self) -> Result<(), ClientError> {
        self.session.send(TcpEof {}).await
    }

    /// The next data from the peer; `None` once the peer has closed its half
    /// or the agent has ended the connection.
    pub async fn read(&mut self) -> Result<Option<Bytes>, ClientError> {
        while !self.read_closed {
            let Some(m) = self.session.recv().await else {
                self.read_closed = true;
                break;
            };
            match m.payload {
                Payload::TcpData(d) if d.data.is_empty() => {}
                Payload::TcpData(d) => return Ok(Some(d.data)),
                Payload::TcpEof(_) | Payload::TcpClosed(_) => self.read_closed = true,
                Payload::TcpFailed(f) => return Err(ClientError::TcpFailed(f.error)),
                other => return Err(ClientError::unexpected("core.tcp.data", other)),
            }
        }
        Ok(None)
    }

    /// Closes the connection. The agent sends nothing back for this (as the
    /// deployed agent), so nothing is awaited.
    pub async fn close(self) -> Result<(), ClientError> {
        match self.session.send(TcpClose {}).await {
            // The agent ended the connection first (`core.tcp.closed`): it is closed.
            Err(ClientError::Send(agentwire_session::SendError::NoSession { .. })) => Ok(()),
            other => other,
        }
    }
}
