//! The client, how it is built, and the sessions it opens.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{ClockSync, Ping, Ready, ResolvedUser};
use agentwire::{Message, Payload};
use agentwire_session::driver::{self, Counters, Driver, Handle, Incoming, Route, RouteSender};
use agentwire_session::{Config, Connection, Event, SendError};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use crate::ClientError;

/// How a [`Client`] connects; from [`Client::builder`].
pub struct Builder {
    config: Config,
    bootstrap: GuestBootstrap,
    via_relay: bool,
    clock_sync: bool,
    request_timeout: Option<Duration>,
    capture: Option<Box<dyn Write + Send>>,
}

impl Builder {
    /// The `core.bootstrap` sent first (default: an empty one).
    pub fn bootstrap(mut self, bootstrap: GuestBootstrap) -> Builder {
        self.bootstrap = bootstrap;
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
        let conn = if self.via_relay {
            Connection::host_via_relay(self.config, now)
        } else {
            Connection::host(self.config, self.bootstrap, now)
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
            ready,
            agent_generation,
            negotiated,
            user,
            request_timeout: self.request_timeout,
        };
        if self.clock_sync && !self.via_relay {
            client.clock_sync(SystemTime::now()).await?;
        }
        Ok(client)
    }
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
/// and input waits while the agent does not take it. Dropping an operation's
/// handle abandons it; dropping the client closes the connection.
pub struct Client {
    handle: Handle,
    driver: Option<Driver>,
    logger: JoinHandle<()>,
    ready: Ready,
    agent_generation: u8,
    negotiated: u8,
    user: Option<ResolvedUser>,
    pub(crate) request_timeout: Option<Duration>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.logger.abort();
    }
}

impl Client {
    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder {
            config: Config::default(),
            bootstrap: GuestBootstrap::default(),
            via_relay: false,
            clock_sync: true,
            request_timeout: None,
            capture: None,
        }
    }

    /// Connects with the defaults: an empty bootstrap, then the start-up exchange.
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

    /// Sends a frame of this operation (stdin, file data, ...), waiting while
    /// the agent is behind.
    pub async fn send(&self, payload: impl Into<Payload>) -> Result<(), ClientError> {
        self.route.send(payload).await.map_err(send_error)
    }

    pub(crate) fn sender(&self) -> Sender {
        Sender(self.route.sender())
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
