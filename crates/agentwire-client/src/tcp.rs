//! TCP connections the agent makes on the host's behalf.

use std::collections::VecDeque;

use agentwire::payload::bulk::{BulkAccepted, BulkCancelReason, BulkFlow, BulkKind, DEFAULT_TCP_BULK_RECORD_PAYLOAD};
use agentwire::payload::tcp::{TcpClose, TcpConnect, TcpData, TcpEof};
use agentwire::{Flags, Message, Payload};
use agentwire_session::bulk::{BulkOperation, BulkReceiver, BulkSender, BulkViolation};
use bytes::Bytes;

use crate::client::{Client, Session};
use crate::{ClientError, bulk};

/// The guest → host credit a bulk connection keeps ahead of what the application has read.
const TCP_WINDOW: u64 = 1024 * 1024;

/// A TCP connection from the guest. Dropped, it is closed.
///
/// With bulk records (see [`Builder::bulk`](crate::Builder::bulk)) its data
/// goes both ways as raw records under credit: the agent reads the socket
/// only as far as the application has read (1 MiB ahead of it), and a write
/// waits while the agent has not written what it was sent to the socket.
/// [`TcpStream::shutdown_write`] then sends `core.bulk.finish`, and the
/// agent's finish is the end of the stream for [`TcpStream::read`].
pub struct TcpStream {
    id: u32,
    /// Behind a lock so that `write` (which may have to wait for credit,
    /// taking the agent's frames meanwhile) can take `&self`.
    inner: tokio::sync::Mutex<Inner>,
}

struct Inner {
    session: Session,
    /// Nothing more will be read.
    read_closed: bool,
    /// The data's records and credits, when the agent accepted the bulk offer.
    bulk: Option<Bulk>,
}

/// Both flows of a bulk connection.
struct Bulk {
    /// Host → guest: what the application writes.
    tx: BulkSender,
    /// Guest → host: what the application reads.
    rx: BulkReceiver,
    /// `core.bulk.finish` has been sent.
    shut: bool,
    /// Records that came while a write waited for credit, for the reader
    /// (within the credit given, so bounded by the window).
    queued: VecDeque<Bytes>,
    /// The failure that ended the connection while a write was waiting, for the reader.
    failed: Option<ClientError>,
}

impl Client {
    /// Asks the agent to connect to `host:port`; waits for the outcome.
    ///
    /// With bulk records (see [`Builder::bulk`](crate::Builder::bulk)) the
    /// request carries an offer (records of up to 256 KiB, 1 MiB of guest →
    /// host credit), and the agent's `core.bulk.accepted`, which follows its
    /// `core.tcp.connected`, is checked before the stream is handed out.
    pub async fn tcp_connect(&self, host: &str, port: u16) -> Result<TcpStream, ClientError> {
        let window = TCP_WINDOW.min(self.read_window);
        let offer = self.bulk.then(|| BulkOperation::Tcp.offer(DEFAULT_TCP_BULK_RECORD_PAYLOAD as u32, window));
        let mut session = self.request(TcpConnect { host: host.into(), port, bulk: offer }).await?;
        let reply = self.within(session.recv()).await?;
        match reply.map(|m| m.payload) {
            Some(Payload::TcpConnected(_)) => {}
            Some(Payload::TcpFailed(f)) => return Err(ClientError::TcpFailed(f.error)),
            Some(other) => return Err(ClientError::unexpected("core.tcp.connected", other)),
            None => return Err(self.closed("core.tcp.connected")),
        }
        let bulk = match offer {
            None => None,
            Some(offer) => {
                let reply = self.within(session.recv()).await?;
                let accepted = match reply.map(|m| m.payload) {
                    Some(Payload::BulkAccepted(a)) => a,
                    // The agent refused the offer, and the connection with it.
                    Some(Payload::TcpFailed(f)) => return Err(ClientError::TcpFailed(f.error)),
                    Some(other) => {
                        let _ = session.send(TcpClose {}).await;
                        return Err(ClientError::unexpected("core.bulk.accepted", other));
                    }
                    None => return Err(self.closed("core.bulk.accepted")),
                };
                if let Err(why) = BulkOperation::Tcp.check_acceptance(&offer, &accepted) {
                    // Abandoned: the agent closes the connection and answers the cancel.
                    bulk::cancel(&session, BulkKind::Tcp, BulkCancelReason::ProtocolViolation, why.clone()).await;
                    return Err(ClientError::TcpFailed(format!("{host}:{port}: {why}")));
                }
                Some(Bulk::new(&accepted, window))
            }
        };
        let id = session.id();
        Ok(TcpStream { id, inner: tokio::sync::Mutex::new(Inner { session, read_closed: false, bulk }) })
    }
}

impl Bulk {
    fn new(accepted: &BulkAccepted, window: u64) -> Bulk {
        let (kind, max) = (BulkKind::Tcp, accepted.max_record_payload);
        Bulk {
            tx: BulkSender::new(kind, BulkFlow::HostToGuest, max, accepted.host_to_guest_credit_limit),
            rx: BulkReceiver::new(kind, BulkFlow::GuestToHost, max, accepted.guest_to_host_credit_limit, window),
            shut: false,
            queued: VecDeque::new(),
            failed: None,
        }
    }

    /// Takes a frame of the connection: a record for the reader, a credit
    /// for the writer, the agent's finish or the end. An error for a frame
    /// that ends the connection with a failure, or that breaks the rules
    /// (then `core.bulk.cancel` goes out).
    async fn absorb(&mut self, session: &Session, read_closed: &mut bool, m: Message) -> Result<(), ClientError> {
        let terminal = m.flags.contains(Flags::TERMINAL);
        if terminal {
            *read_closed = true;
        }
        let violation = match m.payload {
            Payload::BulkRecord(r) => match self.rx.record(&r) {
                Ok(()) => {
                    self.queued.push_back(r.data);
                    return Ok(());
                }
                Err(v) => v,
            },
            Payload::BulkCredit(c) => match self.tx.credit(&c) {
                Ok(_) => return Ok(()),
                Err(v) => v,
            },
            Payload::BulkFinish(f) => match self.rx.finish(&f) {
                Ok(_) => return Ok(()),
                Err(v) => v,
            },
            Payload::TcpClosed(_) => return Ok(()),
            Payload::TcpFailed(f) => return Err(ClientError::TcpFailed(f.error)),
            Payload::BulkCancel(c) => return Err(ClientError::TcpFailed(bulk::cancelled(&c))),
            Payload::Error(e) => return Err(ClientError::unexpected("core.tcp.closed", Payload::Error(e))),
            other => BulkViolation {
                kind: BulkKind::Tcp,
                flow: BulkFlow::GuestToHost,
                reason: format!("{} on a bulk connection", other.message_type()),
            },
        };
        Err(ClientError::TcpFailed(bulk::violated(session, violation, terminal).await))
    }
}

impl TcpStream {
    /// The operation's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends `data` to the peer (waits while the agent is behind: with bulk
    /// records, until the agent's credit covers it).
    pub async fn write(&self, data: Bytes) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        let mut inner = self.inner.lock().await;
        let Inner { session, read_closed, bulk } = &mut *inner;
        let Some(bulk) = bulk else {
            return session.send(TcpData { data }).await;
        };
        if bulk.shut {
            return Err(ClientError::TcpFailed("write after shutdown_write: the sending half is closed".into()));
        }
        let mut data = data;
        while !data.is_empty() {
            // What the agent said meanwhile; without credit, wait for it.
            while let Some(m) = session.try_recv() {
                held(bulk, session, read_closed, m).await?;
            }
            let window = bulk.tx.window();
            if window == 0 {
                let Some(m) = session.recv().await else {
                    *read_closed = true;
                    return Err(ClientError::Closed("the connection ended while a write waited for credit".into()));
                };
                held(bulk, session, read_closed, m).await?;
                continue;
            }
            let piece = data.split_to(window.min(data.len()));
            let record = bulk.tx.record(piece).map_err(|v| ClientError::TcpFailed(v.to_string()))?;
            session.send(record).await?;
        }
        Ok(())
    }

    /// Closes the sending half (the peer reads end of file): `core.tcp.eof`,
    /// or with bulk records `core.bulk.finish`.
    pub async fn shutdown_write(&self) -> Result<(), ClientError> {
        let mut inner = self.inner.lock().await;
        let Inner { session, bulk, .. } = &mut *inner;
        match bulk {
            None => session.send(TcpEof {}).await,
            // A second finish would break the rules; the half is closed already.
            Some(bulk) if bulk.shut => Ok(()),
            Some(bulk) => {
                bulk.shut = true;
                session.send(bulk.tx.finish()).await
            }
        }
    }

    /// The next data from the peer; `None` once the peer has closed its half
    /// or the agent has ended the connection.
    pub async fn read(&mut self) -> Result<Option<Bytes>, ClientError> {
        let Inner { session, read_closed, bulk } = self.inner.get_mut();
        match bulk {
            None => read_legacy(session, read_closed).await,
            Some(bulk) => read_bulk(session, read_closed, bulk).await,
        }
    }

    /// Closes the connection. The agent sends nothing back for this (as the
    /// deployed agent), so nothing is awaited.
    pub async fn close(self) -> Result<(), ClientError> {
        match self.inner.into_inner().session.send(TcpClose {}).await {
            // The agent ended the connection first (`core.tcp.closed`): it is closed.
            Err(ClientError::Send(agentwire_session::SendError::NoSession { .. })) => Ok(()),
            other => other,
        }
    }
}

/// Takes a frame while a write waits: a failure is the write's, and kept for the reader.
async fn held(bulk: &mut Bulk, session: &Session, read_closed: &mut bool, m: Message) -> Result<(), ClientError> {
    match bulk.absorb(session, read_closed, m).await {
        Ok(()) => Ok(()),
        Err(e) => {
            let copy = match &e {
                ClientError::TcpFailed(why) => ClientError::TcpFailed(why.clone()),
                other => ClientError::TcpFailed(other.to_string()),
            };
            bulk.failed = Some(copy);
            Err(e)
        }
    }
}

async fn read_legacy(session: &mut Session, read_closed: &mut bool) -> Result<Option<Bytes>, ClientError> {
    while !*read_closed {
        let Some(m) = session.recv().await else {
            *read_closed = true;
            break;
        };
        match m.payload {
            Payload::TcpData(d) if d.data.is_empty() => {}
            Payload::TcpData(d) => return Ok(Some(d.data)),
            Payload::TcpEof(_) | Payload::TcpClosed(_) => *read_closed = true,
            Payload::TcpFailed(f) => return Err(ClientError::TcpFailed(f.error)),
            other => return Err(ClientError::unexpected("core.tcp.data", other)),
        }
    }
    Ok(None)
}

/// The next record's data, crediting the agent for it as it is handed out;
/// `None` after the agent's finish (or the end of the connection).
async fn read_bulk(
    session: &mut Session,
    read_closed: &mut bool,
    bulk: &mut Bulk,
) -> Result<Option<Bytes>, ClientError> {
    loop {
        if let Some(data) = bulk.queued.pop_front() {
            if let Some(credit) = bulk.rx.consumed(data.len())
                && let Err(e) = session.send(credit).await
            {
                // The connection is ending; what was received is still the application's.
                tracing::debug!(id = session.id(), "core.bulk.credit could not be sent: {e}");
            }
            return Ok(Some(data));
        }
        if let Some(e) = bulk.failed.take() {
            return Err(e);
        }
        if *read_closed || bulk.rx.is_finished() {
            return Ok(None);
        }
        let Some(m) = session.recv().await else {
            *read_closed = true;
            return Ok(None);
        };
        bulk.absorb(session, read_closed, m).await?;
    }
}
