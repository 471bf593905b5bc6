//! The connection state machine of either role.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use agentwire::payload::bootstrap::GuestBootstrap;
#[cfg(unix)]
use agentwire::payload::bulk::PipedRecord;
use agentwire::payload::bulk::{BulkCancel, BulkCancelReason, BulkCredit, BulkFinish, BulkKind, BulkRecord};
use agentwire::payload::core::{
    CoreError, CoreErrorKind, InitAck, InitResolved, Pong, Ready, RelayClientDisconnected, ResolvedUser, Touched,
    WorkloadFailure, WorkloadFailureDisposition,
};
use agentwire::payload::exec::MAX_EXEC_CONTROL_FRAME;
use agentwire::payload::fs::FsResponse;
use agentwire::payload::tcp::TcpFailed;
use agentwire::relay::RelayHandshake;
use agentwire::version::{self, GenerationError};
use agentwire::{
    Direction, EncodeError, Flags, FrameCodec, Message, MessageCodec, MessageType, PROTOCOL_VERSION, Payload,
    RawMessage, RawMessageCodec, Rejected, StreamError, TypeName, WriteQueue,
};
use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use crate::ids::{IdAllocator, is_relay_slot};
use crate::meter::InputMeter;
use crate::table::{Family, SessionTable, charge, is_data};

/// Which end of the stream this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// The host (SDK, runtime, relay client): opens sessions.
    Host,
    /// The guest agent: serves them.
    Agent,
}

/// Limits and timeouts of a connection; [`Config::default`] has the values
/// the deployed peers use where they have one.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// How long the start-up exchange may take, from the connection's creation
    /// (the deployed runtime waits 180 s for `core.ready`).
    pub handshake_timeout: Duration,
    /// A connection on which nothing arrives for this long ends (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Sessions open at once; a request beyond it is refused on its id.
    pub max_sessions: usize,
    /// Data bytes the application may hold for all sessions together before
    /// [`Connection::wants_input`] turns false, so the driver stops reading.
    pub max_buffered: usize,
    /// Data bytes one session may hold before the same happens.
    pub max_buffered_per_session: usize,
    /// The largest frame read or written (at most [`agentwire::MAX_FRAME_SIZE`]).
    pub max_frame_len: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            handshake_timeout: Duration::from_secs(180),
            idle_timeout: None,
            max_sessions: 1024,
            max_buffered: 16 * 1024 * 1024,
            max_buffered_per_session: 8 * 1024 * 1024,
            max_frame_len: agentwire::MAX_FRAME_SIZE,
        }
    }
}

/// Where the start-up exchange stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Agent: waiting for the host's `core.bootstrap`.
    AwaitBootstrap,
    /// Agent: the bootstrap is with the application, which answers with
    /// [`Connection::init_resolved`].
    Resolving,
    /// Agent: `core.init.resolved` sent, waiting for `core.init.ack`.
    AwaitAck,
    /// Agent: acknowledged; the application sends `core.ready` with [`Connection::ready`].
    Acked,
    /// Host: waiting for `core.init.resolved` and `core.ready` (or a relay's prologue).
    AwaitReady,
    /// Sessions may run.
    Established,
    /// The connection is over; nothing more is read or written.
    Closed,
}

/// Something the application must know or act on.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Agent: the host's `core.bootstrap`. Apply it, then call [`Connection::init_resolved`].
    Bootstrap(Box<GuestBootstrap>),
    /// Agent: `core.init.ack` arrived. Call [`Connection::ready`] with the agent's figures.
    InitAcked,
    /// Host: the agent's default user (`core.init.resolved`); the acknowledgement is already queued.
    InitResolved(ResolvedUser),
    /// Host: the agent is ready; sessions may start.
    Ready {
        /// The agent's `core.ready`.
        ready: Box<Ready>,
        /// The agent's generation (the `v` of its `core.ready`).
        peer_generation: u8,
        /// The generation both sides use.
        negotiated: u8,
    },
    /// Agent: a request that opened session `id` (exec, fs, tcp).
    Request(Message),
    /// Agent: a frame of the open session on its id. Data it carries counts as
    /// buffered until [`Connection::consumed`].
    Input(Message),
    /// Host: a frame of a session it opened; its TERMINAL flag ends the session.
    /// Data it carries counts as buffered until [`Connection::consumed`].
    Reply(Message),
    /// Agent: `core.clock.sync`, the host's wall clock in ns since the Unix epoch.
    ClockSync(u64),
    /// Agent: `core.shutdown`.
    Shutdown,
    /// Agent: a relay client left; these of its sessions were open and are now closed.
    ClientDisconnected {
        /// The client's ids.
        ids: Range<u32>,
        /// Its sessions that were open.
        sessions: Vec<u32>,
    },
    /// A `core.error` that answers no session of ours.
    PeerError {
        /// Its id.
        id: u32,
        /// What the peer said.
        error: Box<CoreError>,
    },
    /// A frame that could not be used (an agent has already answered it).
    Rejected(Box<Rejected>),
    /// A frame that belongs to no open session and asks nothing: a late frame
    /// of a session that ended, or one the peer sent in the wrong direction.
    Ignored(Message),
}

/// A failure that ends the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The byte stream lost its framing.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The start-up exchange did not finish in time.
    #[error("no {waiting_for} within {timeout:?}")]
    HandshakeTimeout {
        /// What was awaited.
        waiting_for: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// Nothing arrived for the idle limit.
    #[error("nothing received for {0:?}")]
    Idle(Duration),
    /// The peer broke the start-up rules.
    #[error("start-up failed: {0}")]
    Startup(String),
    /// The agent reported that its initialization failed.
    #[error("the agent's initialization failed: {0}")]
    InitFailed(String),
}

/// Why a frame was not sent. Nothing was queued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The type is above the negotiated generation.
    #[error(transparent)]
    Generation(#[from] GenerationError),
    /// This role does not send that type.
    #[error("{message_type} is not sent by the {role}")]
    Direction {
        /// The type.
        message_type: MessageType,
        /// Our role, as a word.
        role: &'static str,
    },
    /// Sessions cannot run before the start-up exchange ends.
    #[error("{0} cannot be sent before the connection is established")]
    NotEstablished(MessageType),
    /// The id has no open session (it ended, or was never opened).
    #[error("id {id} has no open session for {message_type}")]
    NoSession {
        /// The id.
        id: u32,
        /// The type.
        message_type: MessageType,
    },
    /// Too many sessions are open, or every id is in use.
    #[error("no session can be opened: {0}")]
    Exhausted(String),
    /// The frame does not fit.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The connection is closed.
    #[error("the connection is closed")]
    Closed,
}

/// The sans-IO connection: bytes and time in, events and bytes out.
///
/// The driver reads from its transport into [`Connection::recv_buf`] (or
/// passes bytes to [`Connection::handle_input`]), calls
/// [`Connection::process`], takes [`Connection::poll_event`]s until `None`,
/// writes [`Connection::poll_transmit`], and calls
/// [`Connection::handle_timeout`] at [`Connection::poll_timeout`]. It stops
/// reading while [`Connection::wants_input`] is false.
///
/// ```
/// use agentwire::payload::core::{Ready, ResolvedUser};
/// use agentwire_session::{Config, Connection, Event};
/// use std::time::Instant;
///
/// let now = Instant::now();
/// let mut host = Connection::host(Config::default(), Default::default(), now);
/// let mut agent = Connection::agent(Config::default(), now);
/// // Pass bytes both ways until both are established, acting on events.
/// for _ in 0..4 {
///     let out = host.poll_transmit();
///     agent.handle_input(&out, now)?;
///     while let Some(e) = agent.poll_event() {
///         match e {
///             Event::Bootstrap(_) => agent.init_resolved(ResolvedUser { uid: 0, gid: 0 })?,
///             Event::InitAcked => agent.ready(Ready::default())?,
///             _ => {}
///         }
///     }
///     let back = agent.poll_transmit();
///     host.handle_input(&back, now)?;
///     while host.poll_event().is_some() {}
/// }
/// assert!(host.is_established() && agent.is_established());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Connection {
    role: Role,
    config: Config,
    phase: Phase,
    codec: MessageCodec,
    /// Whether a host expects the relay prologue instead of the init exchange.
    via_relay: bool,
    recv: BytesMut,
    send: WriteQueue,
    events: VecDeque<Event>,
    sessions: SessionTable,
    ids: IdAllocator,
    negotiated: u8,
    peer_generation: Option<u8>,
    frames_received: u64,
    /// Tapping (for captures): whole received frames, and the bytes of the
    /// frame not yet whole. A copy of the stream cut at its own length
    /// fields, independent of how the decoder consumes its buffer.
    tapped: Option<(BytesMut, BytesMut)>,
    /// Bytes of the relay prologue's id range still to leave out of the tap.
    tap_skip: usize,
    /// Agent: `core.init.ack` came before the application resolved the user.
    early_ack: bool,
    handshake_deadline: Option<Instant>,
    last_input: Instant,
    /// Host: what it has written, and frames waiting for the agent's
    /// transport credit (enforced with an agent that meters, spec 9.1).
    meter: InputMeter,
    /// Size on the wire of the frame being handled.
    last_frame_len: u64,
    /// Stream offset just past the last frame decoded.
    frame_end: u64,
}

impl Connection {
    fn new(role: Role, config: Config, phase: Phase, now: Instant) -> Connection {
        let frames = FrameCodec::builder().max_frame_len(config.max_frame_len).build();
        Connection {
            role,
            handshake_deadline: Some(now + config.handshake_timeout),
            config,
            phase,
            codec: MessageCodec::with_frame_codec(frames),
            via_relay: false,
            recv: BytesMut::new(),
            send: WriteQueue::new(),
            events: VecDeque::new(),
            sessions: SessionTable::default(),
            ids: IdAllocator::direct(),
            negotiated: PROTOCOL_VERSION,
            peer_generation: None,
            frames_received: 0,
            tapped: None,
            tap_skip: 0,
            early_ack: false,
            last_input: now,
            meter: InputMeter::default(),
            last_frame_len: 0,
            frame_end: 0,
        }
    }

    /// A host connected straight to an agent: `bootstrap` is queued at once,
    /// then `core.init.resolved` is acknowledged and `core.ready` awaited.
    pub fn host(config: Config, bootstrap: GuestBootstrap, now: Instant) -> Connection {
        let mut c = Connection::new(Role::Host, config, Phase::AwaitReady, now);
        c.queue(Message::new(0, bootstrap)).expect("a bootstrap is within the frame limit");
        c
    }

    /// A host connected to a relay: the relay's prologue (id range and cached
    /// `core.ready`) is awaited; nothing is sent first.
    pub fn host_via_relay(config: Config, now: Instant) -> Connection {
        let mut c = Connection::new(Role::Host, config, Phase::AwaitReady, now);
        c.via_relay = true;
        c.tap_skip = 8;
        c
    }

    /// An agent on a fresh connection: waits for the host's `core.bootstrap`.
    pub fn agent(config: Config, now: Instant) -> Connection {
        Connection::new(Role::Agent, config, Phase::AwaitBootstrap, now)
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Where the start-up exchange stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether sessions may run.
    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    /// The generation both directions use (this side's own until the peer's is known).
    pub fn negotiated(&self) -> u8 {
        self.negotiated
    }

    /// The peer's generation, once known (from its `core.ready` or `core.bootstrap`).
    pub fn peer_generation(&self) -> Option<u8> {
        self.peer_generation
    }

    /// The ids this host uses (a relay's range, or the direct default).
    pub fn id_range(&self) -> Range<u32> {
        self.ids.range()
    }

    /// The open sessions.
    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    /// Frames received so far (what the agent reports as `activity_seq`).
    pub fn frames_received(&self) -> u64 {
        self.frames_received
    }

    /// The buffer a driver reads the transport into; call [`Connection::process`] after.
    pub fn recv_buf(&mut self) -> &mut BytesMut {
        &mut self.recv
    }

    /// Takes bytes that arrived and processes them.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) -> Result<(), ConnectionError> {
        self.recv.extend_from_slice(data);
        self.tap(data);
        self.process(now)
    }

    /// [`Connection::handle_input`] for bytes read into a buffer of the
    /// driver's: appended without a copy when they follow what is buffered in
    /// the same allocation (a driver that reads into one `BytesMut` and hands
    /// over what each read filled), so data frames stay views of that buffer.
    pub fn handle_input_buf(&mut self, data: BytesMut, now: Instant) -> Result<(), ConnectionError> {
        self.tap(&data);
        self.recv.unsplit(data);
        self.process(now)
    }

    /// Whether the input handed over so far ends at a frame boundary of the
    /// established connection, with no part of a frame buffered here: the
    /// next byte is a frame's length prefix. A driver may then gather each
    /// frame whole before handing it over ([`Connection::handle_input_buf`]),
    /// so that a large frame's data is one view of its read buffer.
    pub fn at_frame_boundary(&self) -> bool {
        self.phase == Phase::Established
            && self.recv.is_empty()
            && self.codec.frame_codec().stream_offset() == self.frame_end
    }

    /// Notes that input arrived at `now` that the driver holds back until
    /// the frame it belongs to is whole (so that the frame is handed over in
    /// one piece, see [`Connection::handle_input_buf`]): it counts as activity
    /// for the idle timeout, as input handed over does.
    pub fn input_arrived(&mut self, now: Instant) {
        if self.phase != Phase::Closed {
            self.last_input = now;
        }
    }

    /// Whether the driver should read more: false while the application holds
    /// more data than the limits allow (the peer is then held back by the
    /// transport), or once the connection is closed.
    pub fn wants_input(&self) -> bool {
        self.phase != Phase::Closed
            && self.sessions.buffered() < self.config.max_buffered
            && self.sessions.most_buffered() < self.config.max_buffered_per_session
    }

    /// Reports that the application has taken `n` bytes of session `id` out
    /// of what the connection counts as buffered: the [`charge`](crate::table::charge)
    /// of each frame it was handed.
    pub fn consumed(&mut self, id: u32, n: usize) {
        self.sessions.consumed(id, n);
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The bytes to write, in order (empty when there are none), as one
    /// buffer: large data is copied into it, and piped data
    /// ([`Connection::send_piped`]) read into it. A driver that writes
    /// vectored takes them with [`Connection::poll_transmit_into`] instead.
    ///
    /// A pipe that fails to give its data ends the connection: what preceded
    /// its data is returned (its own record's headers included, as a driver
    /// would have written them), and then nothing more, so the peer sees the
    /// frame cut short at the end of the stream, never followed by another.
    pub fn poll_transmit(&mut self) -> Bytes {
        if self.send.load_piped().is_err() {
            self.phase = Phase::Closed;
        }
        self.send.take_all()
    }

    /// Moves the bytes to write, in order, to the end of `out`, large data as
    /// the [`Bytes`] it was sent as (for a vectored write that copies nothing).
    pub fn poll_transmit_into(&mut self, out: &mut WriteQueue) {
        out.append(&mut self.send);
    }

    /// How many bytes wait to be written, or for the agent's transport
    /// credit: a driver holds back its application's sends while this is large.
    pub fn pending_transmit(&self) -> usize {
        self.send.len() + self.meter.held_bytes()
    }

    /// Host: what has been written and what the agent grants (spec 9.1);
    /// the grant is enforced only with an agent that meters its input.
    pub fn input_meter(&self) -> &InputMeter {
        &self.meter
    }

    /// When [`Connection::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let idle = self.config.idle_timeout.map(|t| self.last_input + t);
        match (self.handshake_deadline, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Checks the timers at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ConnectionError> {
        if let Some(deadline) = self.handshake_deadline
            && now >= deadline
        {
            let waiting_for = match self.phase {
                Phase::AwaitBootstrap => "core.bootstrap",
                Phase::Resolving => "the bootstrap to be applied",
                Phase::AwaitAck => "core.init.ack",
                Phase::Acked => "core.ready to be sent",
                _ if self.via_relay => "relay prologue",
                _ => "core.ready",
            };
            let timeout = self.config.handshake_timeout;
            if self.role == Role::Agent {
                // A startup failure, told on id 0 as the deployed agent does.
                let _ = self.startup_failure("bootstrap", format!("no {waiting_for} within {timeout:?}"));
            }
            self.phase = Phase::Closed;
            return Err(ConnectionError::HandshakeTimeout { waiting_for, timeout });
        }
        if let Some(idle) = self.config.idle_timeout
            && now >= self.last_input + idle
        {
            self.phase = Phase::Closed;
            return Err(ConnectionError::Idle(idle));
        }
        Ok(())
    }

    /// Processes the bytes in [`Connection::recv_buf`]: complete frames become
    /// events and answers; a partial frame waits for more.
    pub fn process(&mut self, now: Instant) -> Result<(), ConnectionError> {
        if self.phase == Phase::Closed {
            return Ok(());
        }
        if !self.recv.is_empty() {
            self.last_input = now;
        }
        if self.via_relay && self.phase == Phase::AwaitReady {
            let Some(prologue) = RelayHandshake::decode(&mut self.recv).inspect_err(|_| self.close())? else {
                return Ok(());
            };
            let ready = prologue.ready_message().map_err(|r| {
                self.close();
                ConnectionError::Startup(format!("the relay's cached core.ready: {r}"))
            })?;
            self.ids = IdAllocator::new(prologue.client_ids());
            self.established_by(ready)?;
        }
        while self.phase != Phase::Closed {
            let item = match self.codec.decode(&mut self.recv) {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(e) => {
                    self.close();
                    return Err(e.into());
                }
            };
            self.frames_received += 1;
            let frames = self.codec.frame_codec();
            self.last_frame_len = frames.stream_offset() - frames.last_frame_offset();
            self.frame_end = frames.stream_offset();
            match item {
                Ok(m) => self.handle_message(m)?,
                Err(rejected) => self.handle_rejected(rejected)?,
            }
        }
        Ok(())
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
    }

    /// Copies `data` to the tap, and every frame it completes to the tapped frames.
    fn tap(&mut self, mut data: &[u8]) {
        let Some((whole, partial)) = &mut self.tapped else { return };
        let skip = self.tap_skip.min(data.len());
        self.tap_skip -= skip;
        data = &data[skip..];
        partial.extend_from_slice(data);
        while let Some(head) = partial.get(..4) {
            let len = 4 + u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if len > 4 + self.config.max_frame_len {
                // The decoder skips an oversized frame as it arrives; so does the
                // tap, rather than hold what its header claims.
                let held = partial.len().min(len);
                partial.advance(held);
                self.tap_skip = len - held;
                let rest = partial.split();
                return self.tap(&rest);
            }
            if partial.len() < len {
                break;
            }
            whole.extend_from_slice(&partial.split_to(len));
        }
    }

    /// Bytes the tap holds of a frame not yet whole.
    #[cfg(test)]
    pub(crate) fn tap_held(&self) -> usize {
        self.tapped.as_ref().map_or(0, |(_, partial)| partial.len())
    }

    /// Turns on copying every whole frame received, for a capture of the
    /// connection (what was sent is what [`Connection::poll_transmit`] gives).
    /// Only bytes given to [`Connection::handle_input`] are tapped.
    pub fn set_tap(&mut self, on: bool) {
        self.tapped = on.then(|| (BytesMut::new(), BytesMut::new()));
    }

    /// The frames received since the last call, whole, in order (tapping on).
    pub fn take_tapped(&mut self) -> Bytes {
        self.tapped.as_mut().map(|(whole, _)| whole.split().freeze()).unwrap_or_default()
    }

    /// Encodes `m` into the send buffer, leaving it unchanged on failure. A
    /// host's frame that would pass the agent's transport credit waits.
    fn queue(&mut self, m: Message) -> Result<(), EncodeError> {
        self.queue_with(m.message_type(), |send, codec| send.push_message(codec, &m))
    }

    /// Queues the frame of type `t` that `push` encodes into the queue it is
    /// given (leaving it unchanged on failure): the send buffer, or for a
    /// host under the agent's transport credit, the meter's hold.
    fn queue_with(
        &mut self,
        t: MessageType,
        push: impl FnOnce(&mut WriteQueue, &mut MessageCodec) -> Result<usize, EncodeError>,
    ) -> Result<(), EncodeError> {
        let data = is_data(t);
        if self.role == Role::Host && self.meter.is_enforcing() {
            let mut frame = WriteQueue::new();
            push(&mut frame, &mut self.codec)?;
            self.meter.admit(frame, data, &mut self.send);
        } else {
            let len = push(&mut self.send, &mut self.codec)?;
            if self.role == Role::Host {
                self.meter.count_sent(len, data);
            }
        }
        Ok(())
    }

    /// Queues a frame the protocol owes; one the peer's generation lacks is
    /// left out (an old peer cannot read it; see spec section 10.9).
    fn answer(&mut self, m: Message) {
        let _ = self.queue(m);
    }

    fn answer_error(&mut self, id: u32, kind: CoreErrorKind, t: MessageType, message: String) {
        let e = CoreError::new(kind, message).with_offending_type(t.wire_name());
        self.answer(Message::new(id, e));
    }

    fn startup_failure(&mut self, stage: &str, cause: String) -> ConnectionError {
        if self.role == Role::Agent {
            let e = CoreError {
                kind: CoreErrorKind::InitializationFailed,
                message: format!("{stage} failed: {cause}"),
                offending_type: None,
                init_failure: None,
                workload_failure: None,
            };
            self.answer(Message::new(0, e));
        }
        self.close();
        ConnectionError::Startup(format!("{stage}: {cause}"))
    }

    fn handle_rejected(&mut self, rejected: Rejected) -> Result<(), ConnectionError> {
        match (self.role, self.phase) {
            (Role::Agent, Phase::Established) => {
                self.answer(rejected.error_reply());
                self.events.push_back(Event::Rejected(Box::new(rejected)));
                Ok(())
            }
            (Role::Agent, _) => Err(self.startup_failure("bootstrap", rejected.to_string())),
            // The runtime's private id carries frames of generations a host may
            // not know (transport credit); one that predates them discards them.
            (Role::Host, _) if rejected.id == u32::MAX => Ok(()),
            // A host reports and goes on; before ready, the deployed runtime discards.
            (Role::Host, _) => {
                self.events.push_back(Event::Rejected(Box::new(rejected)));
                Ok(())
            }
        }
    }

    fn handle_message(&mut self, m: Message) -> Result<(), ConnectionError> {
        match self.role {
            Role::Agent => self.agent_receives(m),
            Role::Host => self.host_receives(m),
        }
    }

    // ---- the agent's side -------------------------------------------------

    fn agent_receives(&mut self, m: Message) -> Result<(), ConnectionError> {
        let t = m.message_type();
        match self.phase {
            Phase::AwaitBootstrap => {
                let Payload::Bootstrap(b) = m.payload else {
                    return Err(
                        self.startup_failure("bootstrap", format!("the first frame is {t}, not core.bootstrap"))
                    );
                };
                if m.id != 0 || m.version < 7 {
                    let cause = format!("core.bootstrap on id {} with v {} (needs id 0, v >= 7)", m.id, m.version);
                    return Err(self.startup_failure("bootstrap", cause));
                }
                self.peer_generation = Some(m.version);
                self.negotiated = version::negotiate(PROTOCOL_VERSION, m.version);
                self.codec.set_peer_generation(m.version);
                self.phase = Phase::Resolving;
                self.events.push_back(Event::Bootstrap(b));
                Ok(())
            }
            Phase::Resolving | Phase::AwaitAck => match m.payload {
                Payload::InitAck(_) if self.phase == Phase::AwaitAck => {
                    self.phase = Phase::Acked;
                    self.events.push_back(Event::InitAcked);
                    Ok(())
                }
                // A host that acknowledges before it has read init.resolved: the ack
                // counts once the application has resolved the user.
                Payload::InitAck(_) if !self.early_ack => {
                    self.early_ack = true;
                    Ok(())
                }
                _ => Err(self.startup_failure("init", format!("{t} where core.init.ack was expected"))),
            },
            // Between the ack and ready, the application is about to send ready.
            Phase::Acked | Phase::Established => self.agent_serves(m),
            Phase::AwaitReady | Phase::Closed => Ok(()),
        }
    }

    fn agent_serves(&mut self, m: Message) -> Result<(), ConnectionError> {
        let (id, t) = (m.id, m.message_type());
        let exec_control = matches!(
            t,
            MessageType::ExecOutputAck | MessageType::ExecStdinAck | MessageType::ExecSignal | MessageType::ExecResize
        );
        if exec_control && self.last_frame_len > MAX_EXEC_CONTROL_FRAME as u64 {
            // Spec 6 and 8: these are small; a large one is refused, not handed on.
            let reason = format!("{t} of {} bytes on the wire; at most {MAX_EXEC_CONTROL_FRAME}", self.last_frame_len);
            self.answer_error(id, CoreErrorKind::InvalidPayload, t, reason);
            return Ok(());
        }
        if t.direction() == Direction::GuestToHost {
            // The deployed agent ignores these silently; say what happened instead.
            let reason = format!("{t} is sent by the guest, not to it");
            self.answer_error(id, CoreErrorKind::UnsupportedMessageType, t, reason);
            return Ok(());
        }
        match m.payload {
            Payload::Ping(_) => self.answer(Message::new(id, Pong {})),
            Payload::Touch(_) => self.answer(Message::new(id, Touched { activity_seq: self.frames_received })),
            Payload::ClockSync(c) => self.events.push_back(Event::ClockSync(c.unix_time_nanos)),
            Payload::Shutdown(_) => self.events.push_back(Event::Shutdown),
            Payload::InitAck(_) => {}
            Payload::Bootstrap(_) => {
                let reason = "core.bootstrap is accepted only as the first frame of a connection".to_string();
                self.answer_error(id, CoreErrorKind::InvalidSession, t, reason);
            }
            Payload::RelayClientDisconnected(RelayClientDisconnected { id_start, id_end_exclusive, .. }) => {
                let ids = id_start..id_end_exclusive;
                if !is_relay_slot(&ids) {
                    let reason = format!("ids {ids:?} are not one relay slot's range");
                    self.answer_error(id, CoreErrorKind::InvalidPayload, t, reason);
                    return Ok(());
                }
                let mut sessions: Vec<u32> = self.sessions.ids().filter(|s| ids.contains(s)).collect();
                sessions.sort_unstable();
                for s in &sessions {
                    self.sessions.close(*s);
                }
                self.events.push_back(Event::ClientDisconnected { ids, sessions });
            }
            Payload::Error(error) => self.events.push_back(Event::PeerError { id, error }),
            // This agent has no freezer and does not resize its root disk (spec 9.2, 9.3).
            Payload::WorkloadFreeze(ref f) => self.workload_unavailable(id, t, f.attempt_id.clone()),
            Payload::WorkloadThaw(ref w) => self.workload_unavailable(id, t, w.attempt_id.clone()),
            Payload::RootDiskPrepare(_) | Payload::RootDiskGrow(_) => {
                let reason = "this agent does not resize its root filesystem".to_string();
                self.answer_error(id, CoreErrorKind::CapabilityUnavailable, t, reason);
            }
            _ if m.flags.contains(Flags::SESSION_START) => self.agent_opens(m),
            _ => self.agent_routes(m),
        }
        Ok(())
    }

    fn workload_unavailable(&mut self, id: u32, t: MessageType, attempt_id: String) {
        let reason = "this agent has no workload freezer".to_string();
        let mut e = CoreError::new(CoreErrorKind::CapabilityUnavailable, reason).with_offending_type(t.wire_name());
        e.workload_failure = Some(WorkloadFailure { attempt_id, disposition: WorkloadFailureDisposition::Unavailable });
        self.answer(Message::new(id, e));
    }

    fn agent_opens(&mut self, m: Message) {
        let (id, t) = (m.id, m.message_type());
        if self.phase != Phase::Established {
            let reason = format!("{t} before core.ready: the agent is not ready yet");
            return self.answer_error(id, CoreErrorKind::InvalidSession, t, reason);
        }
        if id == 0 || id == u32::MAX {
            let reason = format!("{t} opens a session and needs an id other than {id}");
            return self.answer_error(id, CoreErrorKind::InvalidSession, t, reason);
        }
        if let Some(open) = self.sessions.get(id) {
            let reason = format!("id {id} already has an open {} session", open.family.as_str());
            return self.answer_error(id, CoreErrorKind::InvalidSession, t, reason);
        }
        if self.sessions.len() >= self.config.max_sessions {
            let max = self.config.max_sessions;
            let reason = format!("{max} sessions are open on this connection; {t} waits until one ends");
            return self.answer_error(id, CoreErrorKind::InvalidSession, t, reason);
        }
        self.sessions.open(id, Family::of(t));
        self.events.push_back(Event::Request(m));
    }

    /// A frame of a running session: to it, or the answer the deployed agent gives.
    fn agent_routes(&mut self, m: Message) {
        let (id, t) = (m.id, m.message_type());
        match self.sessions.get(id) {
            Some(open) if open.family.accepts(t) => {
                self.sessions.add_buffered(id, charge(&m.payload));
                self.events.push_back(Event::Input(m));
            }
            Some(open) => {
                let reason = format!("{t} on id {id}, which is a {} session", open.family.as_str());
                self.answer_error(id, CoreErrorKind::InvalidSession, t, reason);
            }
            // What the deployed agent answers for an id it does not know (spec 10.6).
            None => match m.payload {
                Payload::ExecStdin(_) | Payload::ExecSignal(_) | Payload::ExecResize(_) | Payload::ExecOutputAck(_) => {
                    self.events.push_back(Event::Ignored(m))
                }
                // A cancel ends the operation with the family's failure, even
                // for an id the agent does not know (spec 7.4).
                Payload::BulkCancel(c) => self.bulk_failure(id, c.kind, c.message),
                Payload::BulkCredit(c) if c.kind == BulkKind::Tcp => self.events.push_back(Event::Ignored(m)),
                Payload::BulkRecord(BulkRecord { kind, .. })
                | Payload::BulkCredit(BulkCredit { kind, .. })
                | Payload::BulkFinish(BulkFinish { kind, .. }) => {
                    let message = format!("{t} on id {id}, which has no bulk transfer");
                    let cancel =
                        BulkCancel { kind, reason: BulkCancelReason::ProtocolViolation, message: message.clone() };
                    self.answer(Message::new(id, cancel));
                    self.bulk_failure(id, kind, message);
                }
                Payload::FsData(_) => {
                    let error = Some(format!("id {id} has no file write in progress"));
                    self.answer(Message::new(id, FsResponse { ok: false, error, data: None }));
                }
                Payload::TcpData(_) | Payload::TcpEof(_) | Payload::TcpClose(_) => {
                    self.answer(Message::new(id, TcpFailed { error: format!("id {id} has no tcp connection") }));
                }
                _ => self.answer_error(id, CoreErrorKind::InvalidSession, t, format!("id {id} has no open session")),
            },
        }
    }

    /// The terminal failure of a bulk correlation's family.
    fn bulk_failure(&mut self, id: u32, kind: BulkKind, error: String) {
        match kind {
            BulkKind::Filesystem => self.answer(Message::new(id, FsResponse::failure(error))),
            BulkKind::Tcp => self.answer(Message::new(id, TcpFailed { error })),
        }
    }

    /// Agent: the bootstrap is applied; sends `core.init.resolved` with the default user.
    pub fn init_resolved(&mut self, default_user: ResolvedUser) -> Result<(), SendError> {
        if self.role != Role::Agent || self.phase != Phase::Resolving {
            return Err(SendError::NotEstablished(MessageType::InitResolved));
        }
        self.queue(Message::new(0, InitResolved { default_user }))?;
        self.phase = Phase::AwaitAck;
        if self.early_ack {
            self.phase = Phase::Acked;
            self.events.push_back(Event::InitAcked);
        }
        Ok(())
    }

    /// Agent: the bootstrap cannot be applied (`stage` says which step
    /// failed): sends `core.error` `initialization_failed` on id 0, as the
    /// deployed agent, and closes the connection.
    pub fn init_failed(&mut self, stage: &str, cause: &str) {
        let _ = self.startup_failure(stage, cause.to_string());
    }

    /// Agent: sends `core.ready`; sessions may start.
    pub fn ready(&mut self, ready: Ready) -> Result<(), SendError> {
        if self.role != Role::Agent || self.phase != Phase::Acked {
            return Err(SendError::NotEstablished(MessageType::Ready));
        }
        self.queue(Message::new(0, ready))?;
        self.phase = Phase::Established;
        self.handshake_deadline = None;
        Ok(())
    }

    // ---- the host's side --------------------------------------------------

    fn host_receives(&mut self, m: Message) -> Result<(), ConnectionError> {
        if let (u32::MAX, Payload::TransportCredit(credit)) = (m.id, &m.payload) {
            self.meter.granted(*credit, &mut self.send);
            return Ok(());
        }
        if self.phase == Phase::AwaitReady {
            return match m.payload {
                Payload::InitResolved(r) => {
                    self.answer(Message::new(0, InitAck::default()));
                    self.events.push_back(Event::InitResolved(r.default_user));
                    Ok(())
                }
                Payload::Ready(_) => self.established_by(m),
                Payload::Error(e) if m.id == 0 => {
                    self.close();
                    Err(ConnectionError::InitFailed(format!("{}: {}", e.kind, e.message)))
                }
                // The deployed runtime discards anything else before ready.
                _ => {
                    self.events.push_back(Event::Ignored(m));
                    Ok(())
                }
            };
        }
        let id = m.id;
        if self.sessions.contains(id) {
            self.sessions.add_buffered(id, charge(&m.payload));
            if m.flags.contains(Flags::TERMINAL) {
                // The application still holds the data; it is no longer the connection's to count.
                self.sessions.close(id);
            }
            self.events.push_back(Event::Reply(m));
        } else if let Payload::Error(error) = m.payload {
            self.events.push_back(Event::PeerError { id, error });
        } else {
            self.events.push_back(Event::Ignored(m));
        }
        Ok(())
    }

    fn established_by(&mut self, m: Message) -> Result<(), ConnectionError> {
        let Payload::Ready(ready) = m.payload else {
            return Err(self.startup_failure("ready", format!("expected core.ready, got {}", m.message_type())));
        };
        self.peer_generation = Some(m.version);
        self.negotiated = version::negotiate(PROTOCOL_VERSION, m.version);
        self.codec.set_peer_generation(m.version);
        self.phase = Phase::Established;
        self.handshake_deadline = None;
        // An agent that meters host input says so; through a relay, the relay
        // meters what it forwards.
        if !self.via_relay && ready.capabilities().workload_transport_barrier_version == Some(2) {
            self.meter.enforce();
        }
        let negotiated = self.negotiated;
        self.events.push_back(Event::Ready { ready: Box::new(ready), peer_generation: m.version, negotiated });
        Ok(())
    }

    // ---- sending ----------------------------------------------------------

    fn check_send(&self, t: MessageType) -> Result<(), SendError> {
        if self.phase == Phase::Closed {
            return Err(SendError::Closed);
        }
        let allowed = match (self.role, t.direction()) {
            (_, Direction::Both) => true,
            (Role::Host, d) => d != Direction::GuestToHost,
            (Role::Agent, d) => d == Direction::GuestToHost,
        };
        if !allowed {
            let role = if self.role == Role::Host { "host" } else { "agent" };
            return Err(SendError::Direction { message_type: t, role });
        }
        if self.phase != Phase::Established {
            return Err(SendError::NotEstablished(t));
        }
        version::check_available(t, self.negotiated)?;
        Ok(())
    }

    /// Host: sends `payload` on a fresh id and opens a session for its replies
    /// (a SESSION_START request, or a request answered once such as `core.ping`).
    /// Returns the id.
    pub fn open(&mut self, payload: impl Into<Payload>) -> Result<u32, SendError> {
        let payload = payload.into();
        let t = payload.message_type();
        self.check_send(t)?;
        if self.role != Role::Host {
            return Err(SendError::Direction { message_type: t, role: "agent" });
        }
        if self.sessions.len() >= self.config.max_sessions {
            return Err(SendError::Exhausted(format!("{} sessions are open", self.config.max_sessions)));
        }
        let sessions = &self.sessions;
        let id = self
            .ids
            .next(|id| sessions.contains(id))
            .ok_or_else(|| SendError::Exhausted(format!("every id of {:?} is in use", self.ids.range())))?;
        self.queue(Message::new(id, payload))?;
        self.sessions.open(id, Family::of(t));
        Ok(id)
    }

    /// Host: sends a frame of any type name, payload given as CBOR, on a fresh
    /// id with flags 0, opening a session for the answer: to probe how a peer
    /// handles a type this side may not know. Returns the id.
    pub fn open_raw(&mut self, type_name: &str, payload: Bytes) -> Result<u32, SendError> {
        if self.phase == Phase::Closed {
            return Err(SendError::Closed);
        }
        if self.role != Role::Host || self.phase != Phase::Established {
            return Err(SendError::NotEstablished(MessageType::Error));
        }
        let sessions = &self.sessions;
        let id = self
            .ids
            .next(|id| sessions.contains(id))
            .ok_or_else(|| SendError::Exhausted(format!("every id of {:?} is in use", self.ids.range())))?;
        let raw = RawMessage {
            id,
            flags: Flags::NONE,
            version: PROTOCOL_VERSION,
            type_name: TypeName::from_wire_name(type_name),
            payload,
        };
        let mut frame = WriteQueue::new();
        let mut codec =
            RawMessageCodec::with_frame_codec(FrameCodec::builder().max_frame_len(self.config.max_frame_len).build());
        frame.push_raw(&mut codec, &raw)?;
        self.meter.admit(frame, false, &mut self.send);
        self.sessions.open(id, Family::Reply);
        Ok(id)
    }

    /// Sends a frame of the open session `id` (host: input; agent: output,
    /// whose TERMINAL flag closes the session), or a control frame on id 0.
    pub fn send(&mut self, id: u32, payload: impl Into<Payload>) -> Result<(), SendError> {
        let payload = payload.into();
        let t = payload.message_type();
        self.check_send(t)?;
        if id != 0 && !self.sessions.contains(id) {
            return Err(SendError::NoSession { id, message_type: t });
        }
        self.queue(Message::new(id, payload))?;
        if self.role == Role::Agent && t.flags().contains(Flags::TERMINAL) {
            self.sessions.close(id);
        }
        Ok(())
    }

    /// Sends bulk record `record` of the open session `id`, its data left in
    /// its pipe: for a driver that moves it to the transport with `splice`
    /// (the `tokio` driver does when it is given the transport's descriptor,
    /// see `Handle::splices`). It is the same record on the wire as a
    /// [`BulkRecord`] of those bytes, and under the same rules.
    #[cfg(unix)]
    pub fn send_piped(&mut self, id: u32, record: PipedRecord) -> Result<(), SendError> {
        self.send_piped_frame(id, MessageType::BulkRecord, |frame, codec| frame.push_piped(codec, id, record))
    }

    /// Sends a `{data: bytes}` frame of type `t` (`core.exec.stdout`, say) of
    /// the open session `id`, its data left in its pipe, as
    /// [`Connection::send_piped`] sends a record: the same frame on the wire
    /// as one of those bytes, under the same rules.
    #[cfg(unix)]
    pub fn send_piped_data(&mut self, id: u32, t: MessageType, data: agentwire::PipedData) -> Result<(), SendError> {
        self.send_piped_frame(id, t, |frame, codec| frame.push_piped_data(codec, id, t, data))
    }

    /// Queues the frame `push` makes, of type `t` on the open session `id`,
    /// after the checks [`Connection::send`] makes.
    #[cfg(unix)]
    fn send_piped_frame(
        &mut self,
        id: u32,
        t: MessageType,
        push: impl FnOnce(&mut WriteQueue, &MessageCodec) -> Result<usize, EncodeError>,
    ) -> Result<(), SendError> {
        self.check_send(t)?;
        if !self.sessions.contains(id) {
            return Err(SendError::NoSession { id, message_type: t });
        }
        Ok(self.queue_with(t, |send, codec| push(send, codec))?)
    }

    /// Host: forgets session `id` without telling the agent (its replies that
    /// still arrive become [`Event::Ignored`]). For an operation the caller
    /// has abandoned.
    pub fn forget(&mut self, id: u32) {
        self.sessions.close(id);
    }

    /// Host: sends `core.shutdown`; the connection is then closed for sending.
    pub fn shutdown(&mut self) -> Result<(), SendError> {
        self.check_send(MessageType::Shutdown)?;
        self.queue(Message::new(0, agentwire::payload::core::Shutdown))?;
        Ok(())
    }
}
