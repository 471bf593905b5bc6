//! A tokio driver of one [`Connection`], for either role (feature `tokio`).
//!
//! A reader task feeds the connection the transport's bytes and routes each
//! frame of a session to that session's [`Route`]; a writer task writes what
//! the connection has to send. Both share the connection behind one lock,
//! held only between awaits. Every other [`Event`] reaches the application
//! through the [`Incoming`] channel that [`spawn`] returns, except frames
//! the connection ignored or rejected (and has answered where it owes an
//! answer): those are logged, so that the channel never holds what a peer
//! sends.
//!
//! Memory is bounded in bytes on both paths: a route's unread frames count
//! against the connection's limits ([`Connection::wants_input`]), so the
//! reader stops reading while the application is behind; and senders wait
//! while more than [`MAX_PENDING_WRITE`] bytes wait to be written.
//!
//! Given the transport's descriptor ([`spawn_splicing`], Linux), the writer
//! moves the data of piped frames (bulk records, [`Route::send_piped`], and
//! data frames, [`Route::send_piped_data`]) from their pipes into the
//! transport with `splice`: a file's pages, or a command's output, reach the
//! socket or port without a copy through this process.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use agentwire::{Flags, Message, Payload, WriteQueue};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::table::charge;
use crate::{Connection, Event, SendError};

/// How many bytes may wait to be written before senders wait.
pub const MAX_PENDING_WRITE: usize = 1024 * 1024;

/// What one read takes from the transport at most (but for the rest of a
/// large frame, read in one piece: see [`held_back`]).
const READ_CHUNK: usize = 256 * 1024;

/// A frame at least this long (length prefix included) is read to its end
/// and no further, so that the next one starts a read; every frame is
/// gathered whole in one buffer before the connection gets it, so that its
/// data is a view of what the transport filled rather than a copy put
/// together from reads.
const LARGE_FRAME: usize = 64 * 1024;

/// The longest frame gathered whole (the largest any peer may send); the
/// connection gets a longer one's head at once, and refuses it.
const MAX_GATHERED: usize = 4 + agentwire::MAX_FRAME_SIZE;

/// The head of a frame that ends `buf` (input that starts at a frame
/// boundary), which the driver keeps until the frame is whole: how many bytes
/// of it `buf` holds and how many more complete it. `None` when `buf` ends
/// with a whole frame, or with the head of a frame longer than any peer may
/// send (which the connection gets at once, and refuses or skips).
fn held_back(buf: &[u8]) -> Option<(usize, usize)> {
    let mut at = 0;
    loop {
        let have = buf.len() - at;
        let Some(head) = buf.get(at..at + 4) else {
            return (have > 0).then_some((have, 4 - have));
        };
        let total = 4 + u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if total > have {
            return (total <= MAX_GATHERED).then_some((have, total - have));
        }
        at += total;
    }
}

/// Frames and bytes of one direction.
#[derive(Debug, Default)]
pub struct Count {
    frames: AtomicU64,
    bytes: AtomicU64,
}

impl Count {
    fn add(&self, frames: u64, bytes: u64) {
        self.frames.fetch_add(frames, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// (frames, bytes) so far, length prefixes included.
    pub fn get(&self) -> (u64, u64) {
        (self.frames.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

/// What a connection has sent and received.
#[derive(Debug, Default)]
pub struct Counters {
    /// Written to the peer.
    pub sent: Count,
    /// Read from the peer.
    pub received: Count,
    /// Of what was sent, the frames whose data was moved by `splice` from a
    /// pipe (records and data frames), and those data bytes.
    pub spliced: Count,
}

/// What the application gets that is not a frame of a routed session.
#[derive(Debug)]
#[non_exhaustive]
pub enum Incoming {
    /// Agent: a request that opened a session; its later frames arrive on `route`.
    Request {
        /// The request.
        message: Message,
        /// The session's frames, and where its replies go.
        route: Route,
    },
    /// Any other event of the connection (not `Ignored` or `Rejected`: those are logged).
    Event(Event),
    /// The connection ended, and why; nothing follows.
    Ended(String),
}

struct State {
    conn: Connection,
    routes: HashMap<u32, mpsc::UnboundedSender<Message>>,
    /// Why the connection ended, once it has.
    ended: Option<String>,
    capture: Option<Box<dyn Write + Send>>,
}

struct Shared {
    state: Mutex<State>,
    /// The writer has something to write.
    to_write: Notify,
    /// Input may be wanted again.
    to_read: Notify,
    /// Something was written, or the connection changed state.
    progress: Notify,
    /// The connection ended: the reader stops even in the middle of a read.
    closing: Notify,
    counters: Counters,
    /// Where what the application must act on goes.
    incoming: mpsc::UnboundedSender<Incoming>,
    /// The writer splices piped data into the transport (rather than reading
    /// it into memory first).
    splices: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between calls, so a panic elsewhere does not poison it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn wait_for<T>(&self, mut ready: impl FnMut(&mut State) -> Option<T>) -> T {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = ready(&mut self.lock()) {
                return v;
            }
            notified.await;
        }
    }

    fn end(&self, why: String) {
        let mut state = self.lock();
        if state.ended.is_none() {
            tracing::debug!("connection ended: {why}");
            state.ended = Some(why);
        }
        // Sessions learn that nothing more will come.
        state.routes.clear();
        drop(state);
        self.progress.notify_waiters();
        self.closing.notify_waiters();
        self.to_write.notify_one();
        self.to_read.notify_one();
    }

    /// Routes the connection's events; called with the lock held.
    fn dispatch(self: &Arc<Self>, state: &mut State) {
        let incoming = &self.incoming;
        while let Some(event) = state.conn.poll_event() {
            match event {
                Event::Reply(m) | Event::Input(m) => {
                    let (id, last) = (m.id, m.flags.contains(Flags::TERMINAL));
                    let cost = charge(&m.payload);
                    let delivered = state.routes.get(&id).is_some_and(|tx| tx.send(m).is_ok());
                    if !delivered {
                        state.conn.consumed(id, cost);
                    }
                    if last {
                        state.routes.remove(&id);
                    }
                }
                Event::Request(message) => {
                    // The route exists before the next frame is read, so none of the session's is lost.
                    let (tx, rx) = mpsc::unbounded_channel();
                    state.routes.insert(message.id, tx);
                    let route = Route { id: message.id, rx, handle: Handle(self.clone()), done: false };
                    if let Err(mpsc::error::SendError(Incoming::Request { mut route, .. })) =
                        incoming.send(Incoming::Request { message, route })
                    {
                        // Nobody takes requests any more. Dropped as it is, the
                        // route would forget its session by taking the lock this
                        // holds: forget it here instead.
                        route.done = true;
                        state.routes.remove(&route.id);
                        state.conn.forget(route.id);
                        self.to_read.notify_one();
                    }
                }
                Event::ClientDisconnected { ids, sessions } => {
                    for id in &sessions {
                        state.routes.remove(id);
                    }
                    let _ = incoming.send(Incoming::Event(Event::ClientDisconnected { ids, sessions }));
                }
                // Logged here, not queued: they carry what a peer sent (up to a
                // frame each), and nothing is owed for them beyond what the
                // connection has already answered.
                Event::Ignored(m) => {
                    tracing::debug!(id = m.id, "ignored {} for no open session", m.message_type())
                }
                Event::Rejected(r) => tracing::debug!("a frame was rejected: {r}"),
                other => {
                    let _ = incoming.send(Incoming::Event(other));
                }
            }
        }
    }
}

/// A handle on a driven connection; cheap to clone.
#[derive(Clone)]
pub struct Handle(Arc<Shared>);

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("ended", &self.0.lock().ended).finish()
    }
}

impl Handle {
    /// Runs `f` on the connection once the write backlog allows it, and wakes the writer.
    pub async fn send_with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, SendError>) -> Result<T, SendError> {
        self.0.wait_for(|s| (s.ended.is_some() || s.conn.pending_transmit() < MAX_PENDING_WRITE).then_some(())).await;
        self.send_now(f)
    }

    /// Runs `f` on the connection at once, whatever the backlog (for answers
    /// that must not wait behind data), and wakes the writer.
    pub fn send_now<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, SendError>) -> Result<T, SendError> {
        let result = {
            let mut state = self.0.lock();
            if state.ended.is_some() {
                return Err(SendError::Closed);
            }
            let result = f(&mut state.conn)?;
            // A call can make events of its own (an acknowledgement that came early).
            self.0.dispatch(&mut state);
            result
        };
        self.0.to_write.notify_one();
        Ok(result)
    }

    /// Sends a frame of session `id`, or a control frame on id 0.
    pub async fn send(&self, id: u32, payload: impl Into<Payload>) -> Result<(), SendError> {
        let payload = payload.into();
        self.send_with(|conn| conn.send(id, payload)).await
    }

    /// Host: opens a session with `f` (which queues its first frame and
    /// returns its id); its replies arrive on the returned route.
    pub async fn open(&self, f: impl FnOnce(&mut Connection) -> Result<u32, SendError>) -> Result<Route, SendError> {
        self.0.wait_for(|s| (s.ended.is_some() || s.conn.pending_transmit() < MAX_PENDING_WRITE).then_some(())).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut state = self.0.lock();
            if state.ended.is_some() {
                return Err(SendError::Closed);
            }
            let id = f(&mut state.conn)?;
            // Under the same lock, so the reader cannot see a reply before the route exists.
            state.routes.insert(id, tx);
            id
        };
        self.0.to_write.notify_one();
        Ok(Route { id, rx, handle: self.clone(), done: false })
    }

    /// Waits until the connection has ended; why.
    pub async fn closed(&self) -> String {
        self.0.wait_for(|s| s.ended.clone()).await
    }

    /// Why the connection ended, if it has.
    pub fn ended(&self) -> Option<String> {
        self.0.lock().ended.clone()
    }

    /// Ends the connection: nothing more is read; what is queued is still written.
    pub fn close(&self, why: &str) {
        self.0.end(why.to_string());
    }

    /// Whether piped frames ([`Route::send_piped`],
    /// [`Route::send_piped_data`]) go to the transport by `splice`, never
    /// through memory: the driver has the transport's
    /// descriptor ([`spawn_splicing`]), no capture, and the transport has
    /// taken `splice` so far. Without it they are read into memory first,
    /// which costs more than reading the data into memory in the first place.
    pub fn splices(&self) -> bool {
        self.0.splices.load(Ordering::Relaxed)
    }

    /// Frames and bytes each way.
    pub fn counters(&self) -> &Counters {
        &self.0.counters
    }

    /// Runs `f` on the connection (to read its state).
    pub fn with<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        f(&self.0.lock().conn)
    }

    fn consumed(&self, id: u32, m: &Message) {
        let mut state = self.0.lock();
        let was = state.conn.wants_input();
        state.conn.consumed(id, charge(&m.payload));
        if !was && state.conn.wants_input() {
            self.0.to_read.notify_one();
        }
    }

    fn forget(&self, id: u32) {
        let mut state = self.0.lock();
        state.routes.remove(&id);
        state.conn.forget(id);
        drop(state);
        self.0.to_read.notify_one();
    }
}

/// The frames of one session, in order, and where its own frames go.
/// Dropped before the session's TERMINAL frame, the session is forgotten
/// on this side (its later frames are dropped).
#[derive(Debug)]
pub struct Route {
    id: u32,
    rx: mpsc::UnboundedReceiver<Message>,
    handle: Handle,
    done: bool,
}

impl Route {
    /// The session's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The connection.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The next frame; `None` after the TERMINAL one, when the session was
    /// closed (a relay client left), or when the connection ends.
    pub async fn recv(&mut self) -> Option<Message> {
        let m = self.rx.recv().await?;
        self.handle.consumed(self.id, &m);
        self.done |= m.flags.contains(Flags::TERMINAL);
        Some(m)
    }

    /// The next frame if one is waiting, without waiting for one (for a task
    /// that sends and must also notice what the peer says meanwhile).
    pub fn try_recv(&mut self) -> Option<Message> {
        let m = self.rx.try_recv().ok()?;
        self.handle.consumed(self.id, &m);
        self.done |= m.flags.contains(Flags::TERMINAL);
        Some(m)
    }

    /// Sends a frame of this session, waiting while the peer is behind. An
    /// agent's TERMINAL frame ends the session.
    pub async fn send(&self, payload: impl Into<Payload>) -> Result<(), SendError> {
        let payload = payload.into();
        let last = payload.message_type().flags().contains(Flags::TERMINAL);
        self.handle.send(self.id, payload).await?;
        if last {
            self.handle.0.lock().routes.remove(&self.id);
        }
        Ok(())
    }

    /// Sends a bulk record of this session whose data waits in a pipe
    /// ([`Connection::send_piped`]), waiting while the peer is behind.
    #[cfg(unix)]
    pub async fn send_piped(&self, record: agentwire::payload::bulk::PipedRecord) -> Result<(), SendError> {
        let id = self.id;
        self.handle.send_with(|conn| conn.send_piped(id, record)).await
    }

    /// Sends a `{data: bytes}` frame of type `t` of this session whose data
    /// waits in a pipe ([`Connection::send_piped_data`]), waiting while the
    /// peer is behind.
    #[cfg(unix)]
    pub async fn send_piped_data(
        &self,
        t: agentwire::MessageType,
        data: agentwire::PipedData,
    ) -> Result<(), SendError> {
        self.sender().send_piped_data(t, data).await
    }

    /// A sender of this session's frames, for another task.
    pub fn sender(&self) -> RouteSender {
        RouteSender { id: self.id, handle: self.handle.clone() }
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        if !self.done {
            self.handle.forget(self.id);
        }
    }
}

/// Sends frames of one session from another task; cheap to clone.
#[derive(Clone, Debug)]
pub struct RouteSender {
    id: u32,
    handle: Handle,
}

impl RouteSender {
    /// The session's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends a frame of the session, waiting while the peer is behind.
    pub async fn send(&self, payload: impl Into<Payload>) -> Result<(), SendError> {
        self.handle.send(self.id, payload).await
    }

    /// [`Route::send_piped_data`], from another task.
    #[cfg(unix)]
    pub async fn send_piped_data(
        &self,
        t: agentwire::MessageType,
        data: agentwire::PipedData,
    ) -> Result<(), SendError> {
        let id = self.id;
        self.handle.send_with(|conn| conn.send_piped_data(id, t, data)).await
    }

    /// The connection.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

/// The tasks that drive a connection; dropped, they stop.
#[derive(Debug)]
pub struct Driver {
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
}

impl Driver {
    /// Waits until everything queued has been written and the writer has stopped.
    pub async fn finish(mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(w) = &self.writer {
            w.abort();
        }
    }
}

/// Drives `conn` over `io`: returns the tasks, a handle, and the channel of
/// what the application must act on. `capture`, if given, gets every frame
/// of both directions, whole, in the order this side saw them.
pub fn spawn(
    conn: Connection,
    io: impl AsyncRead + AsyncWrite + Send + 'static,
    capture: Option<Box<dyn Write + Send>>,
) -> (Driver, Handle, mpsc::UnboundedReceiver<Incoming>) {
    spawn_inner(conn, io, capture, None)
}

/// [`spawn`], with `fd`, a descriptor of the transport `io` (a duplicate of
/// its own, as `io.as_fd().try_clone_to_owned()` makes), into which the
/// writer splices the data of piped frames ([`Route::send_piped`],
/// [`Route::send_piped_data`]). The writer is still the only one to write:
/// `io` for everything else, in order. Without a capture only (which must
/// see every byte); a transport that refuses `splice` (`EINVAL`) turns it
/// off, and piped data is then read into memory.
#[cfg(target_os = "linux")]
pub fn spawn_splicing(
    conn: Connection,
    io: impl AsyncRead + AsyncWrite + Send + 'static,
    capture: Option<Box<dyn Write + Send>>,
    fd: std::os::fd::OwnedFd,
) -> (Driver, Handle, mpsc::UnboundedReceiver<Incoming>) {
    // tokio 1.54 deprecates the safe constructors for any `T: AsRawFd`, which
    // could report another descriptor later or close it while registered. An
    // `OwnedFd` moved in can do neither (its `unsafe` replacement asks for
    // exactly that), and this crate forbids `unsafe`.
    #[allow(deprecated)]
    let target = match capture {
        None => tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::WRITABLE)
            .map_err(|e| tracing::debug!("no splicing into the transport: {e}"))
            .ok(),
        Some(_) => None,
    };
    spawn_inner(conn, io, capture, target)
}

/// The transport's descriptor to splice into, where there is one.
#[cfg(target_os = "linux")]
type SpliceTarget = tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>;
/// No splicing off Linux.
#[cfg(not(target_os = "linux"))]
type SpliceTarget = std::convert::Infallible;

fn spawn_inner(
    mut conn: Connection,
    io: impl AsyncRead + AsyncWrite + Send + 'static,
    capture: Option<Box<dyn Write + Send>>,
    target: Option<SpliceTarget>,
) -> (Driver, Handle, mpsc::UnboundedReceiver<Incoming>) {
    conn.set_tap(capture.is_some());
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        state: Mutex::new(State { conn, routes: HashMap::new(), ended: None, capture }),
        to_write: Notify::new(),
        to_read: Notify::new(),
        progress: Notify::new(),
        closing: Notify::new(),
        counters: Counters::default(),
        incoming: tx,
        splices: AtomicBool::new(target.is_some()),
    });
    let (rd, wr) = tokio::io::split(io);
    let reader = tokio::spawn(read_loop(shared.clone(), rd));
    let writer = tokio::spawn(write_loop(shared.clone(), wr, target));
    (Driver { reader, writer: Some(writer) }, Handle(shared), rx)
}

/// The two allocations large frames are read into, in turn: while the
/// application still holds frames of one, the other (whose frames it has
/// dropped by then, as a rule) takes the next, so that a stream of large
/// frames reuses memory already faulted in rather than a fresh allocation
/// each. Each is held by an empty view of its start; at most two are kept.
#[derive(Default)]
struct Pool {
    /// The allocation large frames are read into now.
    current: Option<Bytes>,
    /// The one before.
    spare: Option<Bytes>,
    /// The most bytes a frame read into one of these has filled: a new
    /// buffer may be that large before as much has arrived, since frames that
    /// really came needed as much (a length only claimed does not count).
    /// So once a peer has sent a frame of n bytes, a head claiming n more
    /// allocates about n at once: at most one frame's worth (the largest
    /// frame, 4 MiB), for the one frame in progress, in exchange for no
    /// growth copies on a stream of large frames.
    proven: usize,
}

impl Pool {
    /// A buffer holding a copy of `head` (the start of a frame) with room for
    /// the `needed` bytes of the whole frame: the spare allocation when nothing else uses it
    /// any more and it is large enough. A new one is sized by what arrived,
    /// not by the length the frame claims: at most twice `head` and a read
    /// more, or as much as earlier frames filled, so that a frame that really
    /// comes grows its buffer a few times, and once frames that large have
    /// come, not at all.
    fn switch(&mut self, head: &[u8], needed: usize) -> BytesMut {
        let mut next = match self.spare.take().map(Bytes::try_into_mut) {
            Some(Ok(free)) if free.capacity() >= needed => free,
            _ => BytesMut::with_capacity(self.new_size(head.len(), needed)),
        };
        let anchor = next.split_to(0).freeze();
        self.spare = self.current.replace(anchor);
        next.extend_from_slice(head);
        next
    }

    /// A larger buffer for the frame [`Pool::switch`] began, holding a copy
    /// of `partial` (what has arrived of it) with room for the `needed`
    /// bytes of the whole frame, sized as there (at most twice `partial` and a read): it takes
    /// the place of the one it outgrew, and the spare stays for the next
    /// frame. Measured before this was split from `switch`: a 1 GiB fs read
    /// (records of up to 4 MiB) ran at 0.9 GB/s instead of 3, as every
    /// growth also put an outgrown buffer in the spare's place, so the next
    /// frame found none large enough and grew from a read's size again.
    fn grow(&mut self, partial: &[u8], needed: usize) -> BytesMut {
        let mut next = BytesMut::with_capacity(self.new_size(partial.len(), needed));
        self.current = Some(next.split_to(0).freeze());
        next.extend_from_slice(partial);
        next
    }

    /// The size of a new buffer for a frame of which `arrived` bytes are
    /// here and that needs `needed` in all, with a read's room after it for
    /// the next frame's head: at most twice what arrived, or what earlier
    /// frames filled, and a read more.
    fn new_size(&self, arrived: usize, needed: usize) -> usize {
        needed.min((2 * arrived).max(self.proven)) + READ_CHUNK
    }

    /// Notes that `len` bytes of whole frames were read into a buffer of the pool's.
    fn filled(&mut self, len: usize) {
        self.proven = self.proven.max(len);
    }
}

/// What the buffer of a large frame needs before the next read.
#[derive(Debug, PartialEq)]
enum Step {
    /// Into a buffer of the pool's, the frame's own.
    Switch,
    /// Into a larger one: the frame's is full.
    Grow,
}

/// The step for a frame of which `rest` bytes are still to come, in a buffer
/// holding `len` bytes of `capacity`: a frame not yet in a buffer of the
/// pool's (`pooled`) moves into one when the rest does not fit; one that is
/// grows only once it is full, so that a frame arriving in small reads is
/// copied a few times as it doubles, not at every read.
fn next_buffer(pooled: bool, len: usize, capacity: usize, rest: usize) -> Option<Step> {
    match pooled {
        false if capacity - len < rest => Some(Step::Switch),
        true if capacity == len => Some(Step::Grow),
        _ => None,
    }
}

async fn read_loop(shared: Arc<Shared>, mut rd: impl AsyncRead + Unpin) {
    // Bytes are read into this buffer and handed over as they are: a data
    // frame the application gets is a view of what the transport filled.
    // Once the connection is established, the head of a frame stays here
    // until the frame is whole, the rest of it read into the same
    // allocation (one of the pool's, once it holds large enough ones), so
    // that a frame is not put together by copies.
    let mut buf = BytesMut::new();
    let mut pool = Pool::default();
    // Whether the frame at the start of `buf` already has a buffer of the pool's.
    let mut pooled = false;
    let why = loop {
        // Armed before `ended` is looked at, so an end that comes after is seen.
        let closing = shared.closing.notified();
        tokio::pin!(closing);
        closing.as_mut().enable();
        // Hold back while the application has not taken what it was given.
        let (wanted, deadline, aligned) = {
            let state = shared.lock();
            if let Some(why) = &state.ended {
                break why.clone();
            }
            (state.conn.wants_input(), state.conn.poll_timeout(), state.conn.at_frame_boundary())
        };
        if !wanted {
            shared.to_read.notified().await;
            continue;
        }
        // While the connection holds no part of a frame, `buf` starts at a
        // frame boundary: the head of a frame at its end is kept until the
        // frame is whole (otherwise everything read is handed over).
        let room = match aligned.then(|| held_back(&buf)).flatten() {
            // The rest of a large frame, and no more: the next read starts at a boundary.
            Some((head, rest)) if head + rest >= LARGE_FRAME => {
                match next_buffer(pooled, buf.len(), buf.capacity(), rest) {
                    Some(Step::Switch) => {
                        buf = pool.switch(&buf, head + rest);
                        pooled = true;
                    }
                    Some(Step::Grow) => buf = pool.grow(&buf, head + rest),
                    None => {}
                }
                rest.min(buf.capacity() - buf.len())
            }
            _ => READ_CHUNK,
        };
        buf.reserve(room);
        let reading = async {
            let mut room = (&mut buf).limit(room);
            let read = rd.read_buf(&mut room);
            match deadline {
                Some(at) => tokio::time::timeout_at(at.into(), read).await.ok(),
                None => Some(read.await),
            }
        };
        // An end (the writer failed, the application closed) stops a read
        // that waits: nothing more is read, and the peer is not kept waiting
        // on a transport that does not close by itself (a serial port).
        // Dropped before it completes, a read has taken nothing.
        let read = tokio::select! {
            biased;
            () = &mut closing => continue,
            read = reading => read,
        };
        let read = match read {
            Some(read) => read,
            None => match shared.lock().conn.handle_timeout(Instant::now()) {
                Ok(()) => continue,
                Err(e) => break e.to_string(),
            },
        };
        let n = match read {
            Ok(0) => break "the peer closed the connection".to_string(),
            Ok(n) => n,
            Err(e) => break format!("reading: {e}"),
        };
        let mut state = shared.lock();
        let keep = match aligned.then(|| held_back(&buf)).flatten() {
            Some((head, _)) => head,
            None => 0,
        };
        if keep == buf.len() {
            // Only the head of a frame so far: nothing to hand over yet.
            state.conn.input_arrived(Instant::now());
            shared.counters.received.add(0, n as u64);
            continue;
        }
        let before = state.conn.frames_received();
        if pooled {
            pool.filled(buf.len() - keep);
        }
        // What stays is the start of a frame not yet in a buffer of its own.
        pooled = false;
        let result = state.conn.handle_input_buf(buf.split_to(buf.len() - keep), Instant::now());
        shared.counters.received.add(state.conn.frames_received() - before, n as u64);
        let frames: Bytes = state.conn.take_tapped();
        if let Some(capture) = &mut state.capture {
            // A capture that cannot be written must not stop the connection.
            let _ = capture.write_all(&frames);
        }
        shared.dispatch(&mut state);
        drop(state);
        shared.progress.notify_waiters();
        shared.to_write.notify_one();
        if let Err(e) = result {
            break e.to_string();
        }
    };
    shared.end(why.clone());
    let _ = shared.incoming.send(Incoming::Ended(why));
}

async fn write_loop(shared: Arc<Shared>, mut wr: impl AsyncWrite + Unpin, mut target: Option<SpliceTarget>) {
    // Frames go out as they were queued: small ones gathered, large data
    // written from where the application left it, by vectored writes, piped
    // data spliced.
    let mut out = WriteQueue::new();
    let mut frames_counted = 0;
    loop {
        let notified = shared.to_write.notified();
        let (ended, loaded) = {
            let mut state = shared.lock();
            state.conn.poll_transmit_into(&mut out);
            let mut loaded = Ok(());
            if let Some(capture) = &mut state.capture {
                loaded = out.load_piped();
                for chunk in out.chunks() {
                    let _ = capture.write_all(chunk);
                }
            }
            (state.ended.is_some(), loaded)
        };
        if let Err(e) = loaded {
            shared.end(format!("reading piped data: {e}"));
            // Nothing may follow a frame cut short: the peer sees the end.
            let _ = wr.shutdown().await;
            return;
        }
        if out.is_empty() {
            if ended {
                let _ = wr.flush().await;
                let _ = wr.shutdown().await;
                return;
            }
            notified.await;
            continue;
        }
        let (frames, bytes) = (out.frames() - frames_counted, out.len());
        frames_counted = out.frames();
        if let Err(e) = write_out(&mut out, &mut wr, &mut target, &shared).await {
            shared.end(format!("writing: {e}"));
            // A frame may be cut short: the peer sees the end rather than wait for the rest.
            let _ = wr.shutdown().await;
            return;
        }
        shared.counters.sent.add(frames, bytes as u64);
        shared.progress.notify_waiters();
    }
}

/// Writes everything in `out`: bytes in memory through `wr`, piped data
/// spliced into `target` where there is one (after `wr` is flushed, so the
/// two never interleave), read into memory otherwise. A target that refuses
/// `splice` is dropped, and `splices` cleared.
async fn write_out(
    out: &mut WriteQueue,
    wr: &mut (impl AsyncWrite + Unpin),
    target: &mut Option<SpliceTarget>,
    shared: &Shared,
) -> std::io::Result<()> {
    while !out.is_empty() {
        #[cfg(target_os = "linux")]
        if let (Some(piped), Some(fd)) = (out.front_piped(), target.as_ref()) {
            wr.flush().await?;
            let whole = piped.len();
            match splice_some(piped, fd).await {
                Ok(n) => {
                    out.advance(n);
                    shared.counters.spliced.add(u64::from(n == whole), n as u64);
                }
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    tracing::debug!("the transport refuses splice ({e}); piped data is read into memory");
                    *target = None;
                    shared.splices.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
            continue;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (&target, shared);
        // Piped data at the front is read into memory by the write itself.
        std::future::poll_fn(|cx| out.poll_write_to(cx, std::pin::Pin::new(&mut *wr))).await?;
    }
    Ok(())
}

/// Splices what it can of `piped` into `fd` once it is writable; how much.
/// `EINVAL` comes before anything moved (the target does not take splice).
#[cfg(target_os = "linux")]
async fn splice_some(piped: &agentwire::PipedData, fd: &SpliceTarget) -> std::io::Result<usize> {
    use rustix::pipe::{SpliceFlags, splice};
    loop {
        let mut ready = fd.writable().await?;
        let moved = ready.try_io(|fd| {
            splice(piped.pipe(), None, fd.get_ref(), None, piped.len(), SpliceFlags::NONBLOCK | SpliceFlags::MOVE)
                .map_err(std::io::Error::from)
        });
        match moved {
            Ok(Ok(0)) => {
                // The pipe ended early, or the transport took its pages and
                // dropped them (a virtio port whose queue refused the buffer).
                let owed = piped.len();
                let msg = format!(
                    "splice moved nothing with {owed} bytes of a frame's data still owed: the pipe ran dry, or the transport dropped them"
                );
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, msg));
            }
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: usize) -> Vec<u8> {
        let mut f = (body as u32).to_be_bytes().to_vec();
        f.resize(4 + body, 7);
        f
    }

    #[test]
    fn a_new_buffer_is_sized_by_what_arrived_and_a_free_spare_is_reused() {
        let mut pool = Pool::default();
        // A 4 MiB frame claimed by its 4-byte head: no 4 MiB allocation.
        let head = (4u32 << 20).to_be_bytes();
        let first = pool.switch(&head, (4 << 20) + 4);
        assert_eq!(&first[..], &head[..]);
        assert!(first.capacity() < 2 * READ_CHUNK, "{}", first.capacity());
        // Once buffers large enough have been made and let go, they are reused.
        let big = vec![1u8; 3 << 20];
        let grown = pool.switch(&big, (4 << 20) + READ_CHUNK);
        assert!(grown.capacity() >= (4 << 20) + READ_CHUNK);
        let at = grown.as_ptr();
        drop((first, grown));
        pool.switch(&head, 100);
        assert_eq!(pool.switch(&head, (4 << 20) + READ_CHUNK).as_ptr(), at);
    }

    #[test]
    fn a_pooled_frame_grows_only_when_its_buffer_is_full() {
        // Not pooled: a switch only when the rest does not fit.
        assert_eq!(next_buffer(false, 100, 1000, 901), Some(Step::Switch));
        assert_eq!(next_buffer(false, 100, 1000, 900), None);
        // Pooled: room left, however little, is read into first.
        assert_eq!(next_buffer(true, 999, 1000, 1 << 20), None);
        assert_eq!(next_buffer(true, 1000, 1000, 1 << 20), Some(Step::Grow));
        assert_eq!(next_buffer(true, 10, 1000, 5), None);
    }

    #[test]
    fn growing_a_frame_keeps_the_spare_for_the_next_one() {
        let mut pool = Pool::default();
        let want = (4 << 20) + READ_CHUNK;
        // A first large frame, grown read by read to its size, then let go.
        let mut buf = pool.switch(&[1; 8], want);
        while buf.capacity() < want {
            buf.resize(buf.capacity(), 1);
            buf = pool.grow(&buf, want);
        }
        let first = buf.as_ptr();
        drop(buf);
        // The second frame begins: the first's buffer is the current one, not yet the spare.
        let second = pool.switch(&[2; 8], want);
        assert_ne!(second.as_ptr(), first);
        let mut second = second;
        while second.capacity() < want {
            second.resize(second.capacity(), 2);
            second = pool.grow(&second, want);
        }
        drop(second);
        // The third takes the first's buffer whole, with no growth.
        let third = pool.switch(&[3; 8], want);
        assert_eq!(third.as_ptr(), first);
        assert!(third.capacity() >= want);
    }

    #[test]
    fn a_new_buffer_may_be_as_large_as_frames_that_came() {
        let mut pool = Pool::default();
        let want = (4 << 20) + READ_CHUNK;
        assert!(pool.switch(&[1; 8], want).capacity() < want, "a claim alone");
        pool.filled(4 << 20);
        // Both held (current and spare in use): a new buffer, large enough at once.
        let (a, b) = (pool.switch(&[1; 8], want), pool.switch(&[2; 8], want));
        assert!(a.capacity() >= 4 << 20 && b.capacity() >= 4 << 20);
        // Beyond what came before, the rule of what arrived holds again.
        assert!(pool.switch(&[3; 8], 64 << 20).capacity() < 8 << 20);
    }

    #[test]
    fn the_head_of_the_last_frame_is_held_back_until_it_is_whole() {
        assert_eq!(held_back(&[]), None);
        let (a, b) = (frame(20), frame(100_000));
        let mut buf = a.clone();
        assert_eq!(held_back(&buf), None, "whole frames only");
        buf.extend_from_slice(&b[..2]);
        assert_eq!(held_back(&buf), Some((2, 2)), "a length prefix cut short");
        buf.extend_from_slice(&b[2..5000]);
        assert_eq!(held_back(&buf), Some((5000, b.len() - 5000)));
        buf.extend_from_slice(&b[5000..]);
        assert_eq!(held_back(&buf), None);
        // A length beyond any frame's is the connection's to refuse, at once.
        let mut huge = a;
        huge.extend_from_slice(&(MAX_GATHERED as u32).to_be_bytes());
        assert_eq!(held_back(&huge), None);
    }
}
