//! `agentwire agent`: a guest agent that serves the protocol on every
//! connection it accepts. Each connection is independent; each session on it
//! (exec, fs, tcp) is a task that owns its id, and the connection's reader
//! routes the host's frames to it.

mod exec;

pub use exec::reap_orphans;
mod fs;
mod tcp;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{CoreError, CoreErrorKind, InitResolved, Pong, Ready, ResolvedUser, Touched};
use agentwire::payload::fs::FsOp;
use agentwire::{Direction, Message, MessageType, Payload};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::addr::{Listener, Stream};
use crate::sys;
use crate::wire::{self, Counters, Outbox};

/// What every connection of one agent shares.
pub struct Config {
    /// The directory `core.fs.*` paths are confined to (canonical).
    pub root: PathBuf,
    /// Whether `core.tcp.connect` may reach beyond loopback.
    pub allow_net: bool,
    /// `CLOCK_BOOTTIME` when the agent started.
    pub boot_time_ns: u64,
    /// Time from start to serving, in ns.
    pub init_time_ns: u64,
    /// Whether the agent is the VM's init: it then applies `core.clock.sync`
    /// and the bootstrap's hostname, waits for `core.init.ack` before
    /// sessions, and powers the VM off on `core.shutdown`.
    pub init_mode: bool,
}

/// Accepts connections for ever, each served by its own task. A connection
/// that fails (its framing broke, say) is closed alone.
/// A serial device carries one connection at a time, so its connections are
/// served in turn; in init mode, `core.shutdown` powers the VM off.
pub async fn serve(listener: Listener, config: Arc<Config>, verbose: bool) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let served = serve_one(stream, peer, config.clone(), verbose);
        if !listener.is_serial() {
            tokio::spawn(served);
        } else if served.await == Ended::Shutdown && config.init_mode {
            return Err(sys::power_off());
        }
    }
}

async fn serve_one(stream: Stream, peer: String, config: Arc<Config>, verbose: bool) -> Ended {
    if verbose {
        eprintln!("agentwire agent: {peer}: connected");
    }
    match connection(stream, config).await {
        Ok(ended) => {
            if verbose {
                eprintln!("agentwire agent: {peer}: closed");
            }
            ended
        }
        Err(e) => {
            eprintln!("agentwire agent: {peer}: {e}; connection closed");
            Ended::Closed
        }
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The host sent `core.shutdown`.
    Shutdown,
    /// The host went away.
    Closed,
}

/// Sessions one connection may have open at once: a peer cannot make the
/// agent hold unbounded tasks, processes and buffers.
pub const MAX_SESSIONS: usize = 1024;

/// What the host sends into a running session.
pub enum Input {
    /// `core.exec.stdin` (empty: end of input).
    Stdin(Bytes),
    /// `core.exec.signal`.
    Signal(i32),
    /// `core.exec.resize`.
    Resize,
    /// `core.fs.data` (empty: end of a streamed write).
    FsData(Bytes),
    /// `core.tcp.data`.
    TcpData(Bytes),
    /// `core.tcp.eof`.
    TcpEof,
    /// `core.tcp.close`.
    TcpClose,
}

impl Input {
    /// The session kind this input belongs to.
    fn family(&self) -> &'static str {
        match self {
            Input::Stdin(_) | Input::Signal(_) | Input::Resize => "core.exec",
            Input::FsData(_) => "core.fs",
            Input::TcpData(_) | Input::TcpEof | Input::TcpClose => "core.tcp",
        }
    }
}

/// An open session: its family and where its input goes.
struct Session {
    family: &'static str,
    input: mpsc::Sender<Input>,
}

/// Settings a `core.bootstrap` gives the sessions that follow.
#[derive(Default)]
pub struct Defaults {
    /// Working directory of commands that name none.
    pub cwd: Option<String>,
    /// Environment added to every command.
    pub env: Vec<(String, String)>,
    /// User of commands that name none.
    pub user: Option<String>,
    /// Resource limits of every command (a request's own come after).
    pub rlimits: Vec<agentwire::payload::exec::ExecRlimit>,
}

impl Defaults {
    fn from_bootstrap(b: &GuestBootstrap) -> Defaults {
        Defaults {
            cwd: b.default_cwd.clone(),
            env: b.default_env.iter().map(|e| (e.key.clone(), e.value.clone())).collect(),
            user: b.user.clone(),
            rlimits: b.rlimits.clone(),
        }
    }
}

/// One connection's state, owned by its reader.
struct Connection {
    config: Arc<Config>,
    outbox: Outbox,
    sessions: HashMap<u32, Session>,
    tasks: JoinSet<()>,
    fs: Arc<fs::Fs>,
    defaults: Arc<Defaults>,
    frames_received: u64,
    acked: bool,
}

/// Serves one connection until the host shuts it down or goes away.
pub async fn connection(stream: Stream, config: Arc<Config>) -> Result<Ended, String> {
    let (mut inbox, outbox, writer) = wire::split(stream, Arc::new(Counters::default()), None);
    let ready = Ready {
        boot_time_ns: config.boot_time_ns,
        init_time_ns: config.init_time_ns,
        ready_time_ns: sys::boottime_ns(),
        agent_version: concat!("agentwire ", env!("CARGO_PKG_VERSION")).into(),
    };
    let (uid, gid) = sys::effective_ids();
    let greeting = [Message::new(0, ready), Message::new(0, InitResolved { default_user: ResolvedUser { uid, gid } })];
    for m in greeting {
        outbox.send(m).await.map_err(|_| "the connection closed before core.ready was sent")?;
    }
    let mut conn = Connection {
        fs: Arc::new(fs::Fs::new(config.root.clone())),
        config,
        outbox,
        sessions: HashMap::new(),
        tasks: JoinSet::new(),
        defaults: Arc::new(Defaults::default()),
        frames_received: 0,
        acked: false,
    };
    let result = loop {
        match inbox.next().await {
            None => break Ok(Ended::Closed),
            // Framing is lost: nothing after this point can be read as a frame.
            Some(Err(e)) => break Err(e.to_string()),
            Some(Ok(Err(rejected))) => {
                conn.frames_received += 1;
                let _ = conn.outbox.send(rejected.error_reply()).await;
            }
            Some(Ok(Ok(m))) => {
                conn.frames_received += 1;
                if conn.handle(m).await == Flow::Stop {
                    break Ok(Ended::Shutdown);
                }
            }
        }
    };
    // Sessions end with the connection: their children are killed on drop.
    conn.tasks.shutdown().await;
    drop(conn);
    // What was queued is written before the stream closes; a failure to write is the peer's going.
    let _ = writer.await;
    result
}

#[derive(PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

impl Connection {
    async fn reply_error(&self, id: u32, kind: CoreErrorKind, t: MessageType, message: String) {
        let e = CoreError { kind, message, offending_type: Some(t.wire_name().to_string()) };
        let _ = self.outbox.send(Message::new(id, e)).await;
    }

    async fn handle(&mut self, m: Message) -> Flow {
        let (id, t) = (m.id, m.message_type());
        if t.direction() == Direction::GuestToHost {
            let reason = format!("{t} is sent by the guest, not to it");
            self.reply_error(id, CoreErrorKind::UnsupportedMessageType, t, reason).await;
            return Flow::Go;
        }
        match m.payload {
            Payload::Bootstrap(b) => {
                if self.frames_received == 1 {
                    if self.config.init_mode
                        && let Some(name) = &b.hostname
                        && let Err(e) = sys::set_hostname(name)
                    {
                        eprintln!("agentwire agent: hostname {name:?}: {e}");
                    }
                    self.defaults = Arc::new(Defaults::from_bootstrap(&b));
                } else {
                    let reason = "core.bootstrap is accepted only as the first frame of a connection".to_string();
                    self.reply_error(id, CoreErrorKind::InvalidSession, t, reason).await;
                }
            }
            Payload::InitAck(_) => self.acked = true,
            // Outside a VM the wall clock is the host's own: only init steps it.
            Payload::ClockSync(c) if self.config.init_mode => {
                if let Err(e) = sys::set_realtime(c.unix_time_nanos) {
                    eprintln!("agentwire agent: core.clock.sync: {e}");
                }
            }
            Payload::ClockSync(_) => {}
            Payload::Shutdown(_) => return Flow::Stop,
            Payload::RelayClientDisconnected(r) => {
                // That client's sessions end: their input closes and they stop.
                self.sessions.retain(|&id, _| !(r.id_start..r.id_end_exclusive).contains(&id));
            }
            Payload::Ping(_) => {
                let _ = self.outbox.send(Message::new(id, Pong {})).await;
            }
            Payload::Touch(_) => {
                let touched = Touched { activity_seq: self.frames_received };
                let _ = self.outbox.send(Message::new(id, touched)).await;
            }
            Payload::Error(e) => eprintln!("agentwire agent: the host reports on id {id}: {:?}: {}", e.kind, e.message),
            Payload::ExecRequest(req) => {
                let (out, defaults) = (self.outbox.clone(), self.defaults.clone());
                self.start(id, t, "core.exec", |input| exec::run(id, *req, defaults, out, input)).await;
            }
            Payload::FsRequest(req) => {
                let (out, fs) = (self.outbox.clone(), self.fs.clone());
                let family = if matches!(req.op, FsOp::Write { .. }) { "core.fs" } else { "core.fs (no input)" };
                self.start(id, t, family, |input| fs::run(fs, id, req.op, out, input)).await;
            }
            Payload::TcpConnect(req) => {
                let (out, allow_net) = (self.outbox.clone(), self.config.allow_net);
                self.start(id, t, "core.tcp", |input| tcp::run(id, req, allow_net, out, input)).await;
            }
            Payload::ExecStdin(s) => self.route(id, t, Input::Stdin(s.data)).await,
            Payload::ExecSignal(s) => self.route(id, t, Input::Signal(s.signal)).await,
            Payload::ExecResize(_) => self.route(id, t, Input::Resize).await,
            Payload::FsData(d) => self.route(id, t, Input::FsData(d.data)).await,
            Payload::TcpData(d) => self.route(id, t, Input::TcpData(d.data)).await,
            Payload::TcpEof(_) => self.route(id, t, Input::TcpEof).await,
            Payload::TcpClose(_) => self.route(id, t, Input::TcpClose).await,
            other => {
                let reason = format!("{} is not served by this agent", other.message_type());
                self.reply_error(id, CoreErrorKind::UnsupportedMessageType, t, reason).await;
            }
        }
        Flow::Go
    }

    /// Opens a session on `id` and runs it as a task.
    async fn start<F>(
        &mut self,
        id: u32,
        t: MessageType,
        family: &'static str,
        session: impl FnOnce(mpsc::Receiver<Input>) -> F,
    ) where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        // Reap what has ended, so that ids can be reused and the set stays small.
        while self.tasks.try_join_next().is_some() {}
        self.sessions.retain(|_, s| !s.input.is_closed());
        if self.config.init_mode && !self.acked {
            let reason = format!("{t} before core.init.ack: the guest is not initialized yet");
            return self.reply_error(id, CoreErrorKind::InvalidSession, t, reason).await;
        }
        if id == 0 {
            let reason = format!("{t} opens a session and needs a non-zero id");
            return self.reply_error(id, CoreErrorKind::InvalidSession, t, reason).await;
        }
        if self.sessions.len() >= MAX_SESSIONS {
            let reason = format!("{MAX_SESSIONS} sessions are open on this connection; {t} waits until one ends");
            return self.reply_error(id, CoreErrorKind::InvalidSession, t, reason).await;
        }
        if let Some(open) = self.sessions.get(&id) {
            let reason = format!("id {id} already has an open {} session", open.family);
            return self.reply_error(id, CoreErrorKind::InvalidSession, t, reason).await;
        }
        // A few chunks in flight: up to 8 × FS_CHUNK_SIZE for a write; a slow
        // session holds up its connection's reader rather than memory growing.
        let (tx, rx) = mpsc::channel(8);
        self.sessions.insert(id, Session { family, input: tx });
        self.tasks.spawn(session(rx));
    }

    /// Hands a frame of a running session to it. Stdin, signal and resize for
    /// an id with no open session, or one whose session has ended, are dropped
    /// without a reply, as the reference agent does (spec 10.6, 10.9): the
    /// host's stdin can race the command's exit.
    async fn route(&mut self, id: u32, t: MessageType, input: Input) {
        let exec_control = input.family() == "core.exec";
        let reason = match self.sessions.get(&id) {
            None if exec_control => return,
            None => format!("id {id} has no open session"),
            Some(s) if s.family != input.family() => {
                format!("{t} on id {id}, which is a {} session", s.family)
            }
            Some(s) => match s.input.send(input).await {
                Ok(()) => return,
                Err(_) => {
                    self.sessions.remove(&id);
                    if exec_control {
                        return;
                    }
                    format!("the session on id {id} has ended")
                }
            },
        };
        self.reply_error(id, CoreErrorKind::InvalidSession, t, reason).await;
    }
}
