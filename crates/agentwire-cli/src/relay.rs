//! `agentwire relay`: many host clients share one agent connection (spec
//! sections 6, 10.5 and 10.7).
//!
//! The relay runs the start-up exchange with the agent once, as its host, and
//! keeps the agent's `core.ready` frame as it arrived. Each client that
//! connects to its Unix socket gets the lowest free slot `s` of
//! [`AGENT_RELAY_MAX_CLIENTS`], whose ids are `s * STEP + 1 .. (s + 1) * STEP`, and
//! the prologue: that range and the cached `core.ready`. From then on frames
//! are routed on their 9-byte header alone, never decoded: a client's frames
//! go to the agent once their id and flags byte pass the checks of the 0.7.13
//! relay, and the agent's frames go to the client whose slot holds their id.
//! When a client leaves, the agent is told with `core.relay.client.disconnected`
//! for its slot's range, after every frame the client sent; the slot is
//! given to a new client only after that notice is queued, so the agent
//! never ends a new client's sessions for an old one. Without the leases of
//! 0.7.13 there is no incarnation to tell them apart in the other direction:
//! a frame the agent sent for the old client before it read the notice may
//! still reach the slot's next client.
//!
//! # Memory
//!
//! Every buffer is bounded in bytes:
//!
//! - frames from the agent for a client wait in that client's queue; the
//!   relay never stops reading the agent for one client, because the agent's
//!   connection is shared: waiting for one client to read would hold up every
//!   client of the relay (their pings, their commands). A client is
//!   disconnected instead (a warning in the log, then, as for any client that
//!   leaves, `core.relay.client.disconnected` for its range, so the agent ends
//!   its sessions) when it has more than [`CLIENT_STALL_BYTES`] waiting and
//!   has taken nothing for [`CLIENT_STALL_TIMEOUT`] (it does not read), or when
//!   a frame would take its queue past [`CLIENT_QUEUE_BYTES`], or all queues
//!   together past [`ALL_CLIENT_QUEUES_BYTES`]. A client that reads slowly
//!   keeps its connection: what it may have in flight is what it granted
//!   (bulk credit up to 32 MiB a transfer, the exec output allowance), and
//!   with generation 7's unmetered output it must read about as fast as the
//!   agent sends;
//! - frames from all clients to the agent wait in one queue of at most
//!   [`AGENT_QUEUE_BYTES`]; a client whose frames do not fit is not read from
//!   until they do, so an agent that does not read holds its clients back;
//! - each read buffer holds at most one frame (at most 4 MiB + 4 bytes, the
//!   codec's limit, which is enforced strictly: a longer frame ends the stream)
//!   and one read.
//!
//! In all, at most [`ALL_CLIENT_QUEUES_BYTES`] + 128 × (one frame and one
//! read) plus [`AGENT_QUEUE_BYTES`] and the agent's read buffer.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{ClockSync, RelayClientDisconnected};
use agentwire::relay::{AGENT_RELAY_MAX_CLIENTS, RelayHandshake, client_for_id, client_id_range};
use agentwire::{Flags, Frame, FrameCodec};
use agentwire_session::{Config, Connection, Event};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};
use tokio::task::JoinSet;
use tokio_util::codec::Decoder;

use crate::addr::{self, Addr, Listener, Stream};

/// The most bytes of frames that wait for one client to read them. A frame
/// from the agent that would take a client's queue past this disconnects
/// that client, instead of holding up the agent's connection, which every
/// client shares. The largest bulk window a client may grant (32 MiB, spec
/// 7.3) and a few of the largest frames fit.
pub const CLIENT_QUEUE_BYTES: usize = 40 * 1024 * 1024;

/// Above this many bytes waiting, a client that takes nothing for
/// [`CLIENT_STALL_TIMEOUT`] is disconnected: it does not read.
pub const CLIENT_STALL_BYTES: usize = 8 * 1024 * 1024;

/// How long a client with more than [`CLIENT_STALL_BYTES`] waiting may take nothing.
pub const CLIENT_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The most bytes waiting for all clients together; the client whose frame
/// would pass it is disconnected.
pub const ALL_CLIENT_QUEUES_BYTES: usize = 256 * 1024 * 1024;

/// The most bytes of client frames that wait to be written to the agent.
pub const AGENT_QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// Bytes asked of a socket in one read.
const READ_CHUNK: usize = 64 * 1024;

/// A client's frames are handed to the agent's queue in batches of about this size.
const BATCH: usize = 256 * 1024;

/// What the command line says.
pub struct Options {
    /// The agent's address.
    pub agent: String,
    /// The Unix socket clients connect to.
    pub listen: String,
    /// The `core.bootstrap` to send, as JSON.
    pub bootstrap: Option<PathBuf>,
}

/// Runs the relay until a signal (status 0) or the end of the agent's connection (status 1).
pub async fn run(opts: Options) -> ExitCode {
    let agent_addr = match Addr::parse(&opts.agent) {
        Ok(a) => a,
        Err(e) => return usage(&format!("--agent {e}")),
    };
    let listen = match Addr::parse(&opts.listen) {
        Ok(a @ Addr::Unix(_)) => a,
        Ok(other) => return usage(&format!("--listen {other}: the relay listens on a Unix socket (unix:PATH)")),
        Err(e) => return usage(&format!("--listen {e}")),
    };
    let bootstrap = match opts.bootstrap.as_deref().map(load_bootstrap).transpose() {
        Ok(b) => b.unwrap_or_default(),
        Err(e) => return usage(&e),
    };
    let (mut sigint, mut sigterm) = match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => return fail(&format!("cannot handle signals: {e}")),
    };
    // Bound first, so that a bad path is reported before the agent is bothered;
    // connections wait in the backlog until the agent is ready. Dropped, the
    // listener removes its socket file.
    let listener = match Listener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => return usage(&format!("cannot listen on {listen}: {e}")),
    };
    let mut stream = match addr::connect(&agent_addr).await {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot connect to the agent at {agent_addr}: {e}")),
    };
    let started = tokio::select! {
        started = start_up(&mut stream, bootstrap) => started,
        _ = sigint.recv() => return ExitCode::SUCCESS,
        _ = sigterm.recv() => return ExitCode::SUCCESS,
    };
    let StartedUp { ready, codec, buf, notices, clock_sync } = match started {
        Ok(s) => s,
        Err(e) => return fail(&format!("the agent at {agent_addr}: {e}")),
    };
    eprintln!("agentwire relay: the agent at {agent_addr} is ready; clients connect to {listen}");

    let (agent_read, agent_write) = tokio::io::split(stream);
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let (to_agent, agent_queue) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        slots: Mutex::new((0..AGENT_RELAY_MAX_CLIENTS).map(|_| Slot::Free).collect()),
        to_agent,
        agent_room: Arc::new(Semaphore::new(AGENT_QUEUE_BYTES)),
        notices,
        all_client_room: Arc::new(Semaphore::new(ALL_CLIENT_QUEUES_BYTES)),
        ready,
    });
    let _ = shared.to_agent.send(ToAgent { bytes: clock_sync, _room: None });
    let writer = tokio::spawn(write_agent(agent_write, agent_queue, fatal_tx.clone()));
    let reader = tokio::spawn(read_agent(agent_read, codec, buf, shared.clone(), fatal_tx));
    let _tasks = AbortOnDrop(vec![writer, reader]);

    // Dropped on return, the set aborts every client's task, which closes its socket.
    let mut clients = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept(false) => match accepted {
                Ok((stream, _, _)) => admit(&shared, stream, &mut clients),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)) => {
                    tracing::warn!("accept: {e}; a client waits until a descriptor is free");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                Err(e) => return fail(&format!("accepting clients on {listen}: {e}")),
            },
            Some(why) = fatal_rx.recv() => {
                let n = clients.len();
                return fail(&format!("{why}; closing {n} client connection(s)"));
            }
            _ = sigint.recv() => return stopped("SIGINT"),
            _ = sigterm.recv() => return stopped("SIGTERM"),
            Some(_) = clients.join_next() => {}
        }
    }
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

fn load_bootstrap(path: &Path) -> Result<GuestBootstrap, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not a GuestBootstrap: {e}", path.display()))
}

/// What the start-up exchange leaves.
struct StartedUp {
    /// The agent's `core.ready` frame, as it arrived.
    ready: Frame,
    /// The decoder of the agent's stream, and what it read beyond `core.ready`.
    codec: FrameCodec,
    buf: BytesMut,
    /// `core.relay.client.disconnected` for each slot, encoded for the agent's generation.
    notices: Vec<Bytes>,
    /// One `core.clock.sync`, to send first.
    clock_sync: Bytes,
}

/// Runs the start-up exchange as the agent's host: `core.bootstrap`, the
/// acknowledgement of `core.init.resolved`, and `core.ready`. The session
/// core is given one whole frame at a time, so that nothing after
/// `core.ready` is consumed by it; the bytes after it stay in the buffer.
async fn start_up(stream: &mut Stream, bootstrap: GuestBootstrap) -> Result<StartedUp, String> {
    let config = Config::default();
    let timeout = config.handshake_timeout;
    let mut conn = Connection::host(config, bootstrap, Instant::now());
    let mut codec = FrameCodec::builder().strict(true).build();
    let mut buf = BytesMut::new();
    let exchange = async {
        loop {
            let out = conn.poll_transmit();
            if !out.is_empty() {
                stream.write_all(&out).await.map_err(|e| format!("writing: {e}"))?;
                stream.flush().await.map_err(|e| format!("writing: {e}"))?;
            }
            while let Some(item) = codec.decode(&mut buf).map_err(|e| e.to_string())? {
                let frame = item.map_err(|o| format!("a frame of {} bytes is too long", o.len))?;
                let mut wire = BytesMut::with_capacity(frame.wire_len());
                FrameCodec::new().encode_frame(&frame, &mut wire).map_err(|e| e.to_string())?;
                conn.handle_input(&wire, Instant::now()).map_err(|e| e.to_string())?;
                let mut ready = false;
                while let Some(event) = conn.poll_event() {
                    match event {
                        Event::InitResolved(user) => tracing::info!(?user, "core.init.resolved, acknowledged"),
                        Event::Ready { ready: r, peer_generation, negotiated } => {
                            tracing::info!(version = %r.agent_version, peer_generation, negotiated, "core.ready");
                            ready = true;
                        }
                        other => tracing::debug!("before core.ready: {other:?}"),
                    }
                }
                if ready {
                    return Ok(frame);
                }
                let out = conn.poll_transmit();
                if !out.is_empty() {
                    stream.write_all(&out).await.map_err(|e| format!("writing: {e}"))?;
                    stream.flush().await.map_err(|e| format!("writing: {e}"))?;
                }
            }
            buf.reserve(READ_CHUNK);
            match stream.read_buf(&mut buf).await {
                Ok(0) => return Err("the connection ended before core.ready".to_string()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading: {e}")),
            }
        }
    };
    let ready = match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r?,
        Err(_) => return Err(format!("no core.ready within {timeout:?}")),
    };
    // The control frames the relay writes, in the generation both sides use.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    conn.send(0, ClockSync { unix_time_nanos: now }).map_err(|e| format!("core.clock.sync: {e}"))?;
    let clock_sync = conn.poll_transmit();
    let mut notices = Vec::with_capacity(AGENT_RELAY_MAX_CLIENTS);
    for slot in 0..AGENT_RELAY_MAX_CLIENTS {
        let ids = client_id_range(slot).expect("a slot below the maximum");
        conn.send(0, RelayClientDisconnected { id_start: ids.start, id_end_exclusive: ids.end, incarnation: None })
            .map_err(|e| format!("core.relay.client.disconnected: {e}"))?;
        notices.push(conn.poll_transmit());
    }
    Ok(StartedUp { ready, codec, buf, notices, clock_sync })
}

/// What the client tasks and the agent's reader share.
struct Shared {
    /// Who holds each slot. Never locked across an await.
    slots: Mutex<Vec<Slot>>,
    /// Frames for the agent, in the order they are to be written.
    to_agent: mpsc::UnboundedSender<ToAgent>,
    /// Bytes `to_agent` may still take.
    agent_room: Arc<Semaphore>,
    /// `core.relay.client.disconnected` of each slot.
    notices: Vec<Bytes>,
    /// Bytes all client queues together may still take.
    all_client_room: Arc<Semaphore>,
    /// The agent's `core.ready`.
    ready: Frame,
}

enum Slot {
    Free,
    /// A client is connected: frames for it go to its queue.
    Client(ClientQueue),
    /// The client is gone and the agent is being told: nothing is routed, and
    /// the slot is not given to another client yet.
    Leaving,
}

/// A client's outgoing queue: frames, each holding its bytes of `room`.
#[derive(Clone)]
struct ClientQueue {
    tx: mpsc::UnboundedSender<ToClient>,
    room: Arc<Semaphore>,
    /// Told when the queue overflowed: the client is to be disconnected.
    overflowed: Arc<Notify>,
}

struct ToClient {
    head: Bytes,
    body: Bytes,
    _room: OwnedSemaphorePermit,
    _all: Option<OwnedSemaphorePermit>,
}

struct ToAgent {
    bytes: Bytes,
    _room: Option<OwnedSemaphorePermit>,
}

fn lock(slots: &Mutex<Vec<Slot>>) -> std::sync::MutexGuard<'_, Vec<Slot>> {
    slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Gives a new client the lowest free slot and queues its prologue, or refuses it.
fn admit(shared: &Arc<Shared>, stream: Stream, clients: &mut JoinSet<()>) {
    let mut slots = lock(&shared.slots);
    let Some(slot) = slots.iter().position(|s| matches!(s, Slot::Free)) else {
        drop(slots);
        tracing::warn!("refused a client: {AGENT_RELAY_MAX_CLIENTS} clients are connected");
        return;
    };
    let handshake = RelayHandshake::for_client(slot, shared.ready.clone()).expect("a slot below the maximum");
    let mut prologue = BytesMut::new();
    if let Err(e) = handshake.encode(&mut prologue) {
        tracing::warn!("refused a client: the prologue cannot be written: {e}");
        return;
    }
    let room = Arc::new(Semaphore::new(CLIENT_QUEUE_BYTES));
    let (tx, rx) = mpsc::unbounded_channel();
    let permit = room.clone().try_acquire_many_owned(prologue.len() as u32).expect("an empty queue has room");
    let _ = tx.send(ToClient { head: prologue.freeze(), body: Bytes::new(), _room: permit, _all: None });
    let overflowed = Arc::new(Notify::new());
    slots[slot] = Slot::Client(ClientQueue { tx, room: room.clone(), overflowed: overflowed.clone() });
    drop(slots);
    let ids = handshake.client_ids();
    tracing::info!(slot, ?ids, "client connected");
    clients.spawn(serve_client(shared.clone(), slot, ids, stream, rx, room, overflowed));
}

/// Serves one client until it leaves or breaks a rule, then tells the agent.
async fn serve_client(
    shared: Arc<Shared>,
    slot: usize,
    ids: Range<u32>,
    stream: Stream,
    rx: mpsc::UnboundedReceiver<ToClient>,
    room: Arc<Semaphore>,
    overflowed: Arc<Notify>,
) {
    let (read, write) = tokio::io::split(stream);
    // Either side may end first; frames for the agent are queued whole, so
    // stopping the reader at any point leaves no partial frame behind.
    let taken = AtomicU64::new(0);
    let why = tokio::select! {
        why = read_client(read, &ids, &shared) => why,
        why = write_client(write, rx, &taken) => why,
        why = stalled(&room, &taken) => why,
        () = overflowed.notified() => "disconnected: it does not read fast enough (its queue, or all queues together, would pass their limit)".into(),
    };
    tracing::info!(slot, "client left: {why}");
    lock(&shared.slots)[slot] = Slot::Leaving;
    // A frame from the agent waiting for room in this queue is dropped.
    room.close();
    // After every frame of the client in the queue, so the agent ends its sessions after their last input.
    let notice = ToAgent { bytes: shared.notices[slot].clone(), _room: None };
    if shared.to_agent.send(notice).is_err() {
        tracing::debug!(slot, "the agent's connection is gone; no disconnect sent");
    }
    // What a new client of the slot sends is queued after the notice.
    lock(&shared.slots)[slot] = Slot::Free;
}

/// Whether a client may send `frame` (the 0.7.13 relay's rules): a flags
/// byte of 0, 1, 2, 4 or 8, and an id of its range, or `core.shutdown` on id 0.
fn check(frame: &Frame, ids: &Range<u32>) -> Result<(), String> {
    let flags = frame.flags.bits();
    if !matches!(flags, 0x00 | 0x01 | 0x02 | 0x04 | 0x08) {
        return Err(format!("it sent flags {flags:#04x} on id {} (allowed: 0, 1, 2, 4, 8)", frame.id));
    }
    if frame.id == 0 && frame.flags == Flags::SHUTDOWN {
        return Ok(());
    }
    if !ids.contains(&frame.id) {
        return Err(format!("it sent id {} outside its range {ids:?} (flags {flags:#04x})", frame.id));
    }
    Ok(())
}

/// Reads a client's frames, checks them and queues them for the agent, until
/// the client closes its side, its stream breaks or it breaks a rule.
async fn read_client(mut read: ReadHalf<Stream>, ids: &Range<u32>, shared: &Shared) -> String {
    let mut codec = FrameCodec::builder().strict(true).build();
    let mut buf = BytesMut::new();
    let mut batch = BytesMut::new();
    loop {
        buf.reserve(READ_CHUNK);
        match read.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => return "it closed the connection".to_string(),
            Ok(0) => return "its stream ended inside a frame".to_string(),
            Ok(_) => {}
            Err(e) => return format!("reading: {e}"),
        }
        let verdict = loop {
            match codec.decode(&mut buf) {
                Ok(Some(Ok(frame))) => {
                    if let Err(why) = check(&frame, ids) {
                        break Some(why);
                    }
                    batch.extend_from_slice(&frame.header());
                    batch.extend_from_slice(&frame.body);
                    if batch.len() >= BATCH {
                        queue_for_agent(shared, &mut batch).await;
                    }
                }
                // Not with a strict codec; the length is out of range all the same.
                Ok(Some(Err(oversized))) => break Some(format!("it sent a frame of {} bytes", oversized.len)),
                Ok(None) => break None,
                Err(e) => break Some(format!("its stream broke: {e}")),
            }
        };
        // The frames before a bad one are the client's and go on.
        queue_for_agent(shared, &mut batch).await;
        if let Some(why) = verdict {
            return why;
        }
    }
}

/// Queues `batch` (whole frames) for the agent once the queue has room for it.
async fn queue_for_agent(shared: &Shared, batch: &mut BytesMut) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len().min(AGENT_QUEUE_BYTES) as u32;
    let Ok(room) = shared.agent_room.clone().acquire_many_owned(n).await else { return };
    let _ = shared.to_agent.send(ToAgent { bytes: batch.split().freeze(), _room: Some(room) });
}

/// Writes a client's queue to it; ends when a write fails.
async fn write_client(
    write: WriteHalf<Stream>,
    mut rx: mpsc::UnboundedReceiver<ToClient>,
    taken: &AtomicU64,
) -> String {
    let mut write = tokio::io::BufWriter::with_capacity(READ_CHUNK, write);
    while let Some(mut item) = rx.recv().await {
        loop {
            let written = async {
                write.write_all(&item.head).await?;
                write.write_all(&item.body).await
            };
            if let Err(e) = written.await {
                return format!("writing: {e}");
            }
            taken.fetch_add((item.head.len() + item.body.len()) as u64, Ordering::Relaxed);
            match rx.try_recv() {
                Ok(next) => item = next,
                Err(_) => break,
            }
        }
        if let Err(e) = write.flush().await {
            return format!("writing: {e}");
        }
    }
    "the relay closed its queue".to_string()
}

/// Ends (with the reason) once the client has had more than
/// [`CLIENT_STALL_BYTES`] waiting and taken nothing for [`CLIENT_STALL_TIMEOUT`].
async fn stalled(room: &Semaphore, taken: &AtomicU64) -> String {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    let (mut last, mut since) = (taken.load(Ordering::Relaxed), Instant::now());
    loop {
        tick.tick().await;
        let now = taken.load(Ordering::Relaxed);
        let waiting = CLIENT_QUEUE_BYTES.saturating_sub(room.available_permits());
        if now != last || waiting <= CLIENT_STALL_BYTES {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= CLIENT_STALL_TIMEOUT {
            let what = format!("{waiting} bytes wait for it and it took none for {CLIENT_STALL_TIMEOUT:?}");
            tracing::warn!(
                "a client does not read: {what}; it is disconnected and its sessions ended, so that the other \
                 clients go on"
            );
            return format!("disconnected: it does not read: {what}");
        }
    }
}

/// Writes the queued frames to the agent in order; a failure is fatal.
async fn write_agent(
    mut write: WriteHalf<Stream>,
    mut queue: mpsc::UnboundedReceiver<ToAgent>,
    fatal: mpsc::UnboundedSender<String>,
) {
    while let Some(item) = queue.recv().await {
        let written = async {
            write.write_all(&item.bytes).await?;
            write.flush().await
        };
        if let Err(e) = written.await {
            let _ = fatal.send(format!("the agent's connection ended: writing: {e}"));
            return;
        }
    }
}

/// Reads the agent's frames and routes each to the client whose slot holds its id.
async fn read_agent(
    mut read: ReadHalf<Stream>,
    mut codec: FrameCodec,
    mut buf: BytesMut,
    shared: Arc<Shared>,
    fatal: mpsc::UnboundedSender<String>,
) {
    let why = loop {
        let broken = loop {
            match codec.decode(&mut buf) {
                Ok(Some(Ok(frame))) => route(&shared, frame),
                Ok(Some(Err(oversized))) => break Some(format!("a frame of {} bytes", oversized.len)),
                Ok(None) => break None,
                Err(e) => break Some(e.to_string()),
            }
        };
        if let Some(e) = broken {
            break format!("the agent's connection ended: its stream broke: {e}");
        }
        buf.reserve(READ_CHUNK);
        match read.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => break "the agent's connection ended: the agent closed it".to_string(),
            Ok(0) => break "the agent's connection ended inside a frame".to_string(),
            Ok(_) => {}
            Err(e) => break format!("the agent's connection ended: reading: {e}"),
        }
    };
    let _ = fatal.send(why);
}

/// Hands one frame of the agent to its client; never waits. A frame that
/// does not fit in the client's queue disconnects the client (see
/// [`CLIENT_QUEUE_BYTES`]) and is dropped, with every later frame for it.
fn route(shared: &Shared, frame: Frame) {
    let id = frame.id;
    if id == 0 || id == u32::MAX {
        tracing::debug!(id, flags = %frame.flags, "a control frame of the agent, for no client; dropped");
        return;
    }
    let queue = client_for_id(id).and_then(|slot| match &lock(&shared.slots)[slot] {
        Slot::Client(q) => Some((slot, q.clone())),
        _ => None,
    });
    let Some((slot, queue)) = queue else {
        tracing::debug!(id, flags = %frame.flags, "a frame for no connected client; dropped");
        return;
    };
    let len = frame.wire_len();
    let overflow = |what: String| {
        tracing::warn!(
            slot,
            id,
            "a client does not read fast enough: {what}; it is disconnected and its sessions ended, so that the other \
             clients go on"
        );
        // Later frames for it are dropped; its task ends and tells the agent.
        queue.room.close();
        queue.overflowed.notify_one();
    };
    let room = match queue.room.clone().try_acquire_many_owned(len as u32) {
        Ok(room) => room,
        Err(TryAcquireError::Closed) => {
            tracing::debug!(id, "a frame for a client that is leaving; dropped");
            return;
        }
        Err(TryAcquireError::NoPermits) => {
            let waiting = CLIENT_QUEUE_BYTES - queue.room.available_permits();
            return overflow(format!(
                "{waiting} bytes wait for it and a frame of {len} more would pass {CLIENT_QUEUE_BYTES}"
            ));
        }
    };
    let Ok(all) = shared.all_client_room.clone().try_acquire_many_owned(len as u32) else {
        return overflow(format!(
            "a frame of {len} bytes for it would take all clients' queues past {ALL_CLIENT_QUEUES_BYTES}"
        ));
    };
    let head = Bytes::copy_from_slice(&frame.header());
    let _ = queue.tx.send(ToClient { head, body: frame.body, _room: room, _all: Some(all) });
}

fn stopped(signal: &str) -> ExitCode {
    tracing::info!("{signal}: stopping");
    ExitCode::SUCCESS
}

fn usage(message: &str) -> ExitCode {
    eprintln!("agentwire relay: {message}");
    ExitCode::from(crate::EXIT_USAGE)
}

fn fail(message: &str) -> ExitCode {
    eprintln!("agentwire relay: {message}");
    ExitCode::FAILURE
}
