//! The async driver of one [`Connection`]: a reader task feeds it the
//! transport's bytes and routes its events to sessions; a writer task writes
//! what it has to send. Both share the connection behind one lock, held only
//! between awaits.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use agentwire::Message;
use agentwire::payload::core::{Ready, ResolvedUser};
use agentwire_session::table::charge;
use agentwire_session::{Connection, Event, SendError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

use crate::ClientError;

/// How many bytes may wait to be written before senders wait: bounds the
/// host's memory when the agent reads slowly.
pub(crate) const MAX_PENDING_WRITE: usize = 1024 * 1024;

/// What one read takes from the transport at most.
const READ_CHUNK: usize = 256 * 1024;

/// Frames and bytes of one direction.
#[derive(Debug, Default)]
pub struct Count {
    frames: AtomicU64,
    bytes: AtomicU64,
}

impl Count {
    pub(crate) fn add(&self, frames: u64, bytes: u64) {
        self.frames.fetch_add(frames, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// (frames, bytes) so far, length prefixes included.
    pub fn get(&self) -> (u64, u64) {
        (self.frames.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

/// What the client has sent and received.
#[derive(Debug, Default)]
pub struct Counters {
    /// To the agent.
    pub sent: Count,
    /// From the agent.
    pub received: Count,
}

/// What the start-up exchange established.
#[derive(Clone, Debug)]
pub(crate) struct Handshake {
    pub ready: Ready,
    pub peer_generation: u8,
    pub negotiated: u8,
}

pub(crate) struct State {
    pub conn: Connection,
    routes: HashMap<u32, mpsc::UnboundedSender<Message>>,
    pub handshake: Option<Handshake>,
    pub user: Option<ResolvedUser>,
    /// Why the connection ended, once it has.
    pub ended: Option<String>,
    capture: Option<Box<dyn Write + Send>>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// The writer has something to write.
    to_write: Notify,
    /// Input may be wanted again.
    to_read: Notify,
    /// Something was written, or the connection changed state.
    progress: Notify,
    pub counters: Counters,
}

impl Shared {
    pub fn new(conn: Connection, capture: Option<Box<dyn Write + Send>>) -> Arc<Shared> {
        let state = State { conn, routes: HashMap::new(), handshake: None, user: None, ended: None, capture };
        Arc::new(Shared {
            state: Mutex::new(state),
            to_write: Notify::new(),
            to_read: Notify::new(),
            progress: Notify::new(),
            counters: Counters::default(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere leaves the state consistent between calls.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `ready` holds of the state (checked after every change).
    pub async fn wait_for<T>(&self, mut ready: impl FnMut(&mut State) -> Option<T>) -> T {
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

    /// Queues a frame through `f` once the write backlog allows it.
    pub async fn send_with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, SendError>,
    ) -> Result<T, ClientError> {
        self.wait_for(
            |s| {
                if s.ended.is_some() || s.conn.pending_transmit() < MAX_PENDING_WRITE { Some(()) } else { None }
            },
        )
        .await;
        let result = {
            let mut state = self.lock();
            if let Some(why) = &state.ended {
                return Err(ClientError::Closed(why.clone()));
            }
            f(&mut state.conn)?
        };
        self.to_write.notify_one();
        Ok(result)
    }

    /// Opens a session with `f` and routes its replies to the returned receiver.
    pub async fn open(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<u32, SendError>,
    ) -> Result<(u32, mpsc::UnboundedReceiver<Message>), ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self
            .send_with(|conn| {
                let id = f(conn)?;
                Ok(id)
            })
            .await?;
        let mut state = self.lock();
        state.routes.insert(id, tx);
        // Replies cannot have been routed before this: the reader takes this lock too,
        // and the frame only just left for the writer.
        Ok((id, rx))
    }

    /// The application took `m` of session `id`: its bytes no longer count.
    pub fn consumed(&self, id: u32, m: &Message) {
        let mut state = self.lock();
        let was = state.conn.wants_input();
        state.conn.consumed(id, charge(&m.payload));
        if !was && state.conn.wants_input() {
            self.to_read.notify_one();
        }
    }

    /// The application gave up on session `id`.
    pub fn forget(&self, id: u32) {
        let mut state = self.lock();
        state.routes.remove(&id);
        state.conn.forget(id);
        self.to_read.notify_one();
    }

    fn end(&self, why: String) {
        let mut state = self.lock();
        if state.ended.is_none() {
            tracing::debug!("connection ended: {why}");
            state.ended = Some(why);
        }
        state.routes.clear();
        drop(state);
        self.progress.notify_waiters();
        self.to_write.notify_one();
        self.to_read.notify_one();
    }

    /// Routes the connection's events; called with the lock held.
    fn dispatch(&self, state: &mut State) {
        while let Some(event) = state.conn.poll_event() {
            match event {
                Event::Reply(m) => {
                    let (id, last) = (m.id, m.flags.contains(agentwire::Flags::TERMINAL));
                    let cost = charge(&m.payload);
                    let delivered = state.routes.get(&id).is_some_and(|tx| tx.send(m).is_ok());
                    if !delivered {
                        state.conn.consumed(id, cost);
                    }
                    if last {
                        state.routes.remove(&id);
                    }
                }
                Event::Ready { ready, peer_generation, negotiated } => {
                    tracing::debug!(peer_generation, negotiated, version = %ready.agent_version, "agent ready");
                    state.handshake = Some(Handshake { ready: *ready, peer_generation, negotiated });
                }
                Event::InitResolved(user) => state.user = Some(user),
                Event::PeerError { id, error } => {
                    tracing::warn!(id, kind = %error.kind, "core.error from the agent: {}", error.message)
                }
                Event::Rejected(r) => tracing::warn!("a frame from the agent was rejected: {r}"),
                Event::Ignored(m) => tracing::debug!(id = m.id, "ignored {} for no open session", m.message_type()),
                other => tracing::debug!("unexpected event for a host: {other:?}"),
            }
        }
    }
}

/// Reads the transport into the connection until it ends.
pub(crate) async fn read_loop(shared: Arc<Shared>, mut rd: impl AsyncRead + Unpin) {
    let mut buf = vec![0u8; READ_CHUNK];
    let why = loop {
        // Hold back while the application has not taken what it was given.
        let (wanted, deadline) = {
            let state = shared.lock();
            if let Some(why) = &state.ended {
                break why.clone();
            }
            (state.conn.wants_input(), state.conn.poll_timeout())
        };
        if !wanted {
            shared.to_read.notified().await;
            continue;
        }
        let read = match deadline {
            Some(at) => match tokio::time::timeout_at(at.into(), rd.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    let mut state = shared.lock();
                    if let Err(e) = state.conn.handle_timeout(Instant::now()) {
                        break e.to_string();
                    }
                    continue;
                }
            },
            None => rd.read(&mut buf).await,
        };
        let n = match read {
            Ok(0) => break "the agent closed the connection".to_string(),
            Ok(n) => n,
            Err(e) => break format!("reading from the agent: {e}"),
        };
        let mut state = shared.lock();
        let before = state.conn.frames_received();
        let result = state.conn.handle_input(&buf[..n], Instant::now());
        shared.counters.received.add(state.conn.frames_received() - before, n as u64);
        let frames = state.conn.take_tapped();
        if let Some(capture) = &mut state.capture {
            // A capture that cannot be written must not stop the session.
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
    shared.end(why);
}

/// Writes what the connection has to send until it ends.
pub(crate) async fn write_loop(shared: Arc<Shared>, mut wr: impl AsyncWrite + Unpin) -> std::io::Result<()> {
    loop {
        let notified = shared.to_write.notified();
        let (bytes, ended) = {
            let mut state = shared.lock();
            let bytes = state.conn.poll_transmit();
            if let Some(capture) = &mut state.capture {
                let _ = capture.write_all(&bytes);
            }
            (bytes, state.ended.is_some())
        };
        if bytes.is_empty() {
            if ended {
                let _ = wr.shutdown().await;
                return Ok(());
            }
            notified.await;
            continue;
        }
        let frames = count_frames(&bytes);
        if let Err(e) = wr.write_all(&bytes).await {
            shared.end(format!("writing to the agent: {e}"));
            return Err(e);
        }
        shared.counters.sent.add(frames, bytes.len() as u64);
        shared.progress.notify_waiters();
    }
}

/// The whole frames in `bytes` (what a connection transmits is always whole frames).
fn count_frames(mut bytes: &[u8]) -> u64 {
    let mut n = 0;
    while let Some(head) = bytes.get(..4) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        bytes = bytes.get(4 + len..).unwrap_or_default();
        n += 1;
    }
    n
}
