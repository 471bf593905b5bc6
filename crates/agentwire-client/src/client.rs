//! The client, how it is built, and the sessions it opens.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{ClockSync, Ping, Ready, ResolvedUser};
use agentwire::{Message, Payload};
use agentwire_session::{Config, Connection};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::ClientError;
use crate::driver::{self, Counters, Handshake, Shared};

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
    /// ready (default true, as the deployed runtime).
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
        let mut conn = if self.via_relay {
            Connection::host_via_relay(self.config, now)
        } else {
            Connection::host(self.config, self.bootstrap, now)
        };
        conn.set_tap(self.capture.is_some());
        let shared = Shared::new(conn, self.capture);
        let (rd, wr) = tokio::io::split(io);
        let reader = tokio::spawn(driver::read_loop(shared.clone(), rd));
        let writer = tokio::spawn(driver::write_loop(shared.clone(), wr));
        let handshake = shared
            .wait_for(|s| match (&s.handshake, &s.ended) {
                (Some(h), _) => Some(Ok(h.clone())),
                (None, Some(why)) => Some(Err(ClientError::Closed(why.clone()))),
                (None, None) => None,
            })
            .await;
        let handshake = match handshake {
            Ok(h) => h,
            Err(e) => {
                reader.abort();
                writer.abort();
                return Err(e);
            }
        };
        let user = shared.lock().user.clone();
        let client =
            Client { shared, handshake, user, request_timeout: self.request_timeout, reader, writer: Some(writer) };
        if self.clock_sync {
            client.clock_sync(SystemTime::now()).await?;
        }
        Ok(client)
    }
}

/// A connection to an agent on which many operations run at once.
///
/// Every buffer is bounded in bytes: output the application does not read
/// holds back reading from the agent (so the agent, and the command, wait),
/// and input waits while the agent does not take it. Dropping an operation's
/// handle abandons it; dropping the client closes the connection.
pub struct Client {
    shared: Arc<Shared>,
    handshake: Handshake,
    user: Option<ResolvedUser>,
    pub(crate) request_timeout: Option<Duration>,
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<std::io::Result<()>>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(w) = &self.writer {
            w.abort();
        }
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
        &self.handshake.ready
    }

    /// The agent's generation.
    pub fn agent_generation(&self) -> u8 {
        self.handshake.peer_generation
    }

    /// The generation both sides use.
    pub fn negotiated(&self) -> u8 {
        self.handshake.negotiated
    }

    /// The agent's default user (not known through a relay).
    pub fn default_user(&self) -> Option<ResolvedUser> {
        self.user.clone()
    }

    /// Frames and bytes each way.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Sends `payload` on a fresh id and returns the session that gets its replies.
    pub async fn request(&self, payload: impl Into<Payload>) -> Result<Session, ClientError> {
        let payload = payload.into();
        let (id, rx) = self.shared.open(|conn| conn.open(payload)).await?;
        Ok(Session { id, rx, shared: self.shared.clone(), done: false })
    }

    /// Sends a frame of any type name (payload given as CBOR) on a fresh id:
    /// to see how an agent answers a type it may not know.
    pub async fn request_raw(&self, type_name: &str, payload: Bytes) -> Result<Session, ClientError> {
        let (id, rx) = self.shared.open(|conn| conn.open_raw(type_name, payload)).await?;
        Ok(Session { id, rx, shared: self.shared.clone(), done: false })
    }

    /// One request answered by one reply, within the request timeout.
    pub(crate) async fn call(&self, payload: impl Into<Payload>) -> Result<Payload, ClientError> {
        let mut s = self.request(payload).await?;
        let t = s.id;
        let reply = match self.request_timeout {
            Some(limit) => tokio::time::timeout(limit, s.recv()).await.map_err(|_| ClientError::Timeout(limit))?,
            None => s.recv().await,
        };
        reply.map(|m| m.payload).ok_or_else(|| self.closed(&format!("the reply on id {t}")))
    }

    /// Why the connection is gone, as an error about `waiting_for`.
    pub(crate) fn closed(&self, waiting_for: &str) -> ClientError {
        let why = self.shared.lock().ended.clone().unwrap_or_else(|| "the session ended".into());
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
        self.shared.send_with(|conn| conn.send(0, ClockSync { unix_time_nanos })).await
    }

    /// Sends `core.shutdown` and waits, up to `timeout`, for the agent to
    /// close the connection.
    pub async fn shutdown(mut self, timeout: Duration) -> Result<(), ClientError> {
        self.shared.send_with(|conn| conn.shutdown()).await?;
        let closed = self.shared.wait_for(|s| s.ended.as_ref().map(|_| ()));
        tokio::time::timeout(timeout, closed).await.map_err(|_| ClientError::Timeout(timeout))?;
        if let Some(writer) = self.writer.take() {
            let _ = writer.await;
        }
        Ok(())
    }
}

/// The replies of one operation, in order; dropped, the operation is abandoned.
pub struct Session {
    id: u32,
    rx: mpsc::UnboundedReceiver<Message>,
    shared: Arc<Shared>,
    done: bool,
}

impl Session {
    /// The operation's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The next frame; `None` after the TERMINAL one, or when the connection ends.
    pub async fn recv(&mut self) -> Option<Message> {
        let m = self.rx.recv().await?;
        self.shared.consumed(self.id, &m);
        self.done |= m.flags.contains(agentwire::Flags::TERMINAL);
        Some(m)
    }

    /// Sends a frame of this operation (stdin, file data, ...), waiting while
    /// the agent is behind.
    pub async fn send(&self, payload: impl Into<Payload>) -> Result<(), ClientError> {
        let payload = payload.into();
        self.shared.send_with(|conn| conn.send(self.id, payload)).await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.done {
            self.shared.forget(self.id);
        }
    }
}

/// A handle that sends frames of one operation; cheap to clone.
#[derive(Clone)]
pub(crate) struct Sender {
    id: u32,
    shared: Arc<Shared>,
}

impl Sender {
    pub fn of(s: &Session) -> Sender {
        Sender { id: s.id, shared: s.shared.clone() }
    }

    pub async fn send(&self, payload: impl Into<Payload>) -> Result<(), ClientError> {
        let payload = payload.into();
        self.shared.send_with(|conn| conn.send(self.id, payload)).await
    }
}
