//! The client, how it is built, and the sessions it opens.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::bulk::{DEFAULT_BULK_WINDOW, MIN_BULK_RECORD_PAYLOAD};
use agentwire::payload::core::{ClockSync, Ping, Ready, ResolvedUser};
use agentwire::payload::exec::ExecLimits;
use agentwire::{Message, MessageType, Payload};
use agentwire_session::driver::{self, Counters, Driver, Handle, Incoming, Route, RouteSender};
use agentwire_session::{Config, Connection, Event, SendError};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use crate::ClientError;

/// The guest → host credit of a bulk file read through a relay.
const RELAY_READ_WINDOW: u64 = DEFAULT_BULK_WINDOW / 2;

/// How a [`Client`] connects; from [`Client::builder`].
pub struct Builder {
    config: Config,
    bootstrap: GuestBootstrap,
    /// `Some` once [`Builder::exec_limits`] was called.
    exec_limits: Option<Option<ExecLimits>>,
    via_relay: bool,
    clock_sync: bool,
    request_timeout: Option<Duration>,
    capture: Option<Box<dyn Write + Send>>,
    bulk: bool,
}

impl Builder {
    /// The `core.bootstrap` sent first (default: an empty one, but for its
    /// `exec_limits`: see [`Builder::exec_limits`]).
    pub fn bootstrap(mut self, bootstrap: GuestBootstrap) -> Builder {
        self.bootstrap = bootstrap;
        self
    }

    /// The execution flow-control policy placed in the bootstrap
    /// (`GuestBootstrap.exec_limits`, generation 10, spec section 8), which
    /// a generation-10 agent advertises back in `core.ready`; `None` sends
    /// no policy, so that every execution runs the legacy way.
    ///
    /// Unless set here, the bootstrap given to [`Builder::bootstrap`] keeps
    /// its own policy when it has one, and gets [`ExecLimits::default`]
    /// otherwise (128 executions, 64 KiB of stdin and 1 MiB of output in
    /// flight, 16 KiB chunks). An older agent ignores the field. An invalid
    /// policy ([`ExecLimits::validate`]) makes a generation-10 agent fail its
    /// start-up. Through a relay nothing is sent: the runtime's policy applies.
    ///
    /// Whatever is sent, what counts is what the agent advertises: when its
    /// `core.ready` has `exec_limits` and the negotiated generation is at least
    /// 10, every execution is *controlled* — output is acknowledged as the
    /// application consumes it (see [`Exec`](crate::Exec)) and stdin is sent
    /// in the advertised chunks within the advertised allowance (see
    /// [`ExecInput`](crate::ExecInput)); otherwise executions run as with a
    /// generation-7 agent. [`Client::exec_limits`] says which. Without flow
    /// control, stdin goes out as fast as it is written, and an agent may
    /// drop what it cannot queue (agentwire's agent keeps 1 MiB per
    /// execution), answering `core.exec.stdin.error` without an errno:
    /// [`Exec::pipe`](crate::Exec::pipe) turns that into
    /// [`ClientError::InputDropped`](crate::ClientError::InputDropped).
    ///
    /// ```
    /// use agentwire_client::{agentwire::payload::exec::ExecLimits, Client};
    /// let small = ExecLimits { output_limit: 256 * 1024, ..ExecLimits::default() };
    /// let builder = Client::builder().exec_limits(Some(small));
    /// let legacy = Client::builder().exec_limits(None);
    /// # let _ = (builder, legacy);
    /// ```
    pub fn exec_limits(mut self, limits: Option<ExecLimits>) -> Builder {
        self.exec_limits = Some(limits);
        self
    }

    /// Connect through a relay: read its prologue (id range and cached
    /// `core.ready`) instead of running the start-up exchange.
    pub fn via_relay(mut self, yes: bool) -> Builder {
        self.via_relay = yes;
        self
    }

    /// How long the start-up exchange may take (default 180 s, as the deployed runtime).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Builder {
        self.config.handshake_timeout = timeout;
        self
    }

    /// How long a request answered by one reply (ping, fs operations, tcp
    /// connect) may wait for it (default: no limit).
    pub fn request_timeout(mut self, timeout: Duration) -> Builder {
        self.request_timeout = Some(timeout);
        self
    }

    /// Whether to send `core.clock.sync` with this machine's clock once
    /// ready (default true, as the deployed runtime). Never through a relay:
    /// the clock is the runtime's, and a relay refuses id-0 frames from clients.
    pub fn clock_sync(mut self, yes: bool) -> Builder {
        self.clock_sync = yes;
        self
    }

    /// Bytes the application may leave unread across all sessions (default
    /// 16 MiB) and per session (default 8 MiB) before the client stops
    /// reading from the agent.
    pub fn buffer_limits(mut self, total: usize, per_session: usize) -> Builder {
        self.config.max_buffered = total;
        self.config.max_buffered_per_session = per_session;
        self
    }

    /// Whether file and TCP data go as raw bulk records (generation 8, spec
    /// section 7) when the negotiated generation allows them (default true).
    ///
    /// With bulk on and an agent of generation 8 or later,
    /// [`Client::read_file`], [`Client::write_file`] and
    /// [`Client::tcp_connect`] put a bulk offer in their request, and once the
    /// agent has accepted it their data travels as raw records under
    /// per-transfer credit: the agent sends file or socket data only as far
    /// as this side's destination (the writer given to `read_file`, the
    /// application reading a [`TcpStream`](crate::TcpStream)) has taken it,
    /// and this side reads its source (the reader given to `write_file`) only
    /// as far as the agent has written to the guest's file or socket. With
    /// bulk off, or with an older agent, the same operations use
    /// `core.fs.data` and `core.tcp.data` exactly as generation 7 does.
    ///
    /// ```
    /// // Generation-7 framing for file and socket data, whatever the agent speaks.
    /// let builder = agentwire_client::Client::builder().bulk(false);
    /// # let _ = builder;
    /// ```
    pub fn bulk(mut self, yes: bool) -> Builder {
        self.bulk = yes;
        self
    }

    /// Copies every frame of both directions, whole, to `capture` (a stream
    /// that `agentwire inspect` reads).
    pub fn capture(mut self, capture: impl Write + Send + 'static) -> Builder {
        self.capture = Some(Box::new(capture));
        self
    }

    /// Connects over `io` (a Unix socket, vsock, TCP, a VM's serial port) and
    /// runs the start-up exchange.
    pub async fn connect(self, io: impl AsyncRead + AsyncWrite + Send + 'static) -> Result<Client, ClientError> {
        let now = Instant::now();
        // What a bulk read may have in flight: no more than the connection
        // lets one session hold unread, and through a relay half of that
        // window: a relay holds what a client has not read yet only up to a
        // limit of its own (8 MiB for `agentwire relay`), frames included.
        let window = if self.via_relay { RELAY_READ_WINDOW } else { DEFAULT_BULK_WINDOW };
        let read_window = window.min(self.config.max_buffered_per_session as u64).max(MIN_BULK_RECORD_PAYLOAD as u64);
        let conn = if self.via_relay {
            Connection::host_via_relay(self.config, now)
        } else {
            let mut bootstrap = self.bootstrap;
            bootstrap.exec_limits = match self.exec_limits {
                Some(set) => set,
                None => bootstrap.exec_limits.or(Some(ExecLimits::default())),
            };
            Connection::host(self.config, bootstrap, now)
        };
        let (driver, handle, mut incoming) = driver::spawn(conn, io, self.capture);
        let mut user = None;
        let (ready, agent_generation, negotiated) = loop {
            match incoming.recv().await {
                Some(Incoming::Event(Event::InitResolved(u))) => user = Some(u),
                Some(Incoming::Event(Event::Ready { ready, peer_generation, negotiated })) => {
                    break (*ready, peer_generation, negotiated);
                }
                Some(Incoming::Ended(why)) => return Err(ClientError::Closed(why)),
                Some(other) => log(other),
                None => return Err(ClientError::Closed("the connection's driver stopped".into())),
            }
        };
        // What comes later and belongs to no session is only worth a log line.
        let logger = tokio::spawn(async move {
            while let Some(item) = incoming.recv().await {
                log(item);
            }
        });
        let client = Client {
            handle,
            driver: Some(driver),
            logger,
            exec_limits: exec_policy(&ready, negotiated),
            ready,
            agent_generation,
            negotiated,
            user,
            request_timeout: self.request_timeout,
            bulk: self.bulk && negotiated >= MessageType::BulkRecord.generation(),
            read_window,
        };
        if self.clock_sync && !self.via_relay {
            client.clock_sync(SystemTime::now()).await?;
        }
        Ok(client)
    }
}

/// The policy executions run under: the agent's advertised one, when the
/// negotiated generation has the acknowledgements (spec section 8); `None`
/// means legacy executions.
pub(crate) fn exec_policy(ready: &Ready, negotiated: u8) -> Option<ExecLimits> {
    if negotiated < agentwire::MessageType::ExecOutputAck.generation() {
        return None;
    }
    ready.capabilities().exec_limits
}

fn log(item: Incoming) {
    match item {
        Incoming::Event(Event::PeerError { id, error }) => {
            tracing::warn!(id, kind = %error.kind, "core.error from the agent: {}", error.message)
        }
        Incoming::Ended(why) => tracing::debug!("connection ended: {why}"),
        other => tracing::debug!("{other:?}"),
    }
}

/// A connection to an agent on which many operations run at once.
///
/// Every buffer is bounded in bytes: output the application does not read
/// holds back reading from the agent (so the agent, and the command, wait),
/// and input waits while the agent does not take it. With a generation-10
/// agent that advertises an execution policy, executions also run under its
/// flow control (spec section 8; [`Builder::exec_limits`]). Dropping an
/// operation's handle abandons it; dropping the client closes the connection.
pub struct Client {
    handle: Handle,
    driver: Option<Driver>,
    logger: JoinHandle<()>,
    /// The policy executions run under (`None`: legacy).
    pub(crate) exec_limits: Option<ExecLimits>,
    ready: Ready,
    agent_generation: u8,
    negotiated: u8,
    user: Option<ResolvedUser>,
    pub(crate) request_timeout: Option<Duration>,
    /// Whether file and TCP data go as bulk records (asked for, and the
    /// negotiated generation has them).
    pub(crate) bulk: bool,
    /// The guest → host credit a bulk file read grants ahead of what its destination took.
    pub(crate) read_window: u64,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.logger.abort();
        // Operations that outlive the client (and the tasks that serve
        // them) learn that nothing more will come, instead of waiting forever.
        self.handle.close("the client was dropped");
    }
}

impl Client {
    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder {
            config: Config::default(),
            bootstrap: GuestBootstrap::default(),
            exec_limits: None,
            via_relay: false,
            clock_sync: true,
            request_timeout: None,
            capture: None,
            bulk: true,
        }
    }

    /// Connects with the defaults: a bootstrap that only offers the default
    /// execution policy ([`Builder::exec_limits`]), then the start-up exchange.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), agentwire_client::ClientError> {
    /// let socket = tokio::net::UnixStream::connect("/run/agent.sock").await?;
    /// let client = agentwire_client::Client::connect(socket).await?;
    /// let output = client.exec(agentwire_client::Command::new("uname").arg("-a")).await?.output().await?;
    /// print!("{}", String::from_utf8_lossy(&output.stdout));
    /// # Ok(()) }
    /// ```
    pub async fn connect(io: impl AsyncRead + AsyncWrite + Send + 'static) -> Result<Client, ClientError> {
        Client::builder().connect(io).await
    }

    /// The agent's `core.ready`.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// The agent's generation.
    pub fn agent_generation(&self) -> u8 {
        self.agent_generation
    }

    /// The generation both sides use.
    pub fn negotiated(&self) -> u8 {
        self.negotiated
    }

    /// The execution flow-control policy every execution runs under: the
    /// agent's `core.ready.exec_limits` when the negotiated generation is at
    /// least 10; `None` when executions run the legacy way (no acknowledgements).
    pub fn exec_limits(&self) -> Option<&ExecLimits> {
        self.exec_limits.as_ref()
    }

    /// The agent's default user (not known through a relay).
    pub fn default_user(&self) -> Option<ResolvedUser> {
        self.user.clone()
    }

    /// Frames and bytes each way.
    pub fn counters(&self) -> &Counters {
        self.handle.counters()
    }

    /// The ids this client uses (a relay's range, or the direct default).
    pub fn id_range(&self) -> std::ops::Range<u32> {
        self.handle.with(|c| c.id_range())
    }

    /// A send error, with the reason when the connection has ended.
    pub(crate) fn send_error(&self, e: SendError) -> ClientError {
        match e {
            SendError::Closed => self.closed("the frame could be sent"),
            other => ClientError::Send(other),
        }
    }

    /// Sends `payload` on a fresh id and returns the session that gets its replies.
    pub async fn request(&self, payload: impl Into<Payload>) -> Result<Session, ClientError> {
        let payload = payload.into();
        let route = self.handle.open(|conn| conn.open(payload)).await.map_err(|e| self.send_error(e))?;
        Ok(Session { route })
    }

    /// Sends a frame of any type name (payload given as CBOR) on a fresh id:
    /// to see how an agent answers a type it may not know.
    pub async fn request_raw(&self, type_name: &str, payload: Bytes) -> Result<Session, ClientError> {
        let route = self.handle.open(|conn| conn.open_raw(type_name, payload)).await.map_err(|e| self.send_error(e))?;
        Ok(Session { route })
    }

    /// Waits for `reply` within the request timeout.
    pub(crate) async fn within<T>(&self, reply: impl Future<Output = T>) -> Result<T, ClientError> {
        match self.request_timeout {
            Some(limit) => tokio::time::timeout(limit, reply).await.map_err(|_| ClientError::Timeout(limit)),
            None => Ok(reply.await),
        }
    }

    /// One request answered by one reply, within the request timeout.
    pub(crate) async fn call(&self, payload: impl Into<Payload>) -> Result<Payload, ClientError> {
        let mut s = self.request(payload).await?;
        let reply = self.within(s.recv()).await?;
        reply.map(|m| m.payload).ok_or_else(|| self.closed(&format!("the reply on id {}", s.id())))
    }

    /// Why the connection is gone, as an error about `waiting_for`.
    pub(crate) fn closed(&self, waiting_for: &str) -> ClientError {
        let why = self.handle.ended().unwrap_or_else(|| "the session ended".into());
        ClientError::Closed(format!("{why}, before {waiting_for}"))
    }

    /// One ping: the round-trip time.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self.call(Ping {}).await? {
            Payload::Pong(_) => Ok(start.elapsed()),
            other => Err(ClientError::unexpected("core.pong", other)),
        }
    }

    /// Sets the agent's wall clock to `now` (`core.clock.sync`; no reply).
    pub async fn clock_sync(&self, now: SystemTime) -> Result<(), ClientError> {
        let unix_time_nanos = now.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        self.handle.send(0, ClockSync { unix_time_nanos }).await.map_err(|e| self.send_error(e))
    }

    /// Sends `core.shutdown` and waits, up to `timeout`, for the agent to
    /// close the connection.
    pub async fn shutdown(mut self, timeout: Duration) -> Result<(), ClientError> {
        self.handle.send_with(|conn| conn.shutdown()).await.map_err(|e| self.send_error(e))?;
        tokio::time::timeout(timeout, self.handle.closed()).await.map_err(|_| ClientError::Timeout(timeout))?;
        if let Some(driver) = self.driver.take() {
            driver.finish().await;
        }
        Ok(())
    }
}

/// The replies of one operation, in order; dropped, the operation is abandoned.
pub struct Session {
    route: Route,
}

impl Session {
    /// The operation's id.
    pub fn id(&self) -> u32 {
        self.route.id()
    }

    /// The next frame; `None` after the TERMINAL one, or when the connection ends.
    pub async fn recv(&mut self) -> Option<Message> {
        self.route.recv().await
    }

    /// The next frame if one has arrived, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Message> {
        self.route.try_recv()
    }

    /// Sends a frame of this operation (stdin, file data, ...), waiting while
    /// the agent is behind.
    pub async fn send(&self, payload: impl Into<Payload>) -> Result<(), ClientError> {
        self.route.send(payload).await.map_err(send_error)
    }

    pub(crate) fn sender(&self) -> Sender {
        Sender(self.route.sender())
    }

    /// The route itself, for a task that reads it.
    pub(crate) fn into_route(self) -> Route {
        self.route
    }
}

fn send_error(e: SendError) -> ClientError {
    match e {
        SendError::Closed => ClientError::Closed("the connection ended".into()),
        other => ClientError::Send(other),
    }
}

/// A handle that sends frames of one operation; cheap to clone.
#[derive(Clone)]
pub(crate) struct Sender(RouteSender);

impl Sender {
    pub async fn send(&self, payload: impl Into<Payload>) -> Result<(), ClientError> {
        self.0.send(payload).await.map_err(send_error)
    }
}

#[cfg(test)]
mod tests {
    use agentwire::payload::core::ReadyCapabilities;

    use super::*;

    #[test]
    fn executions_are_controlled_only_with_an_advertised_policy_at_generation_10() {
        let limits = ExecLimits { output_limit: 65536, ..ExecLimits::default() };
        let mut ready = Ready::default();
        assert_eq!(exec_policy(&ready, 10), None);
        ready.set_capabilities(ReadyCapabilities { exec_limits: Some(limits), ..ReadyCapabilities::default() });
        assert_eq!(exec_policy(&ready, 10), Some(limits));
        // The acknowledgements cannot be sent below generation 10.
        assert_eq!(exec_policy(&ready, 9), None);
        assert_eq!(exec_policy(&ready, 7), None);
    }
}
