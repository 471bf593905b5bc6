//! # agentwire-agent
//!
//! The guest agent's services as a library: command execution, files inside
//! a root directory, TCP connections for the host, and the start-up exchange
//! of the deployed agent (`core.bootstrap` → `core.init.resolved` →
//! `core.init.ack` → `core.ready`). Each connection is driven by the sans-IO
//! [`agentwire_session::Connection`]; each session runs as a task of the
//! [`Service`] for its family, which an embedder may replace.
//!
//! ```no_run
//! use std::sync::Arc;
//! use agentwire_agent::{Agent, Config};
//!
//! # async fn f() -> std::io::Result<()> {
//! let agent = Arc::new(Agent::new(Config::new("/srv/guest-root".into())));
//! let listener = tokio::net::UnixListener::bind("/run/agent.sock")?;
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     tokio::spawn(agent.clone().serve(stream));
//! }
//! # }
//! ```

#![deny(missing_docs)]

mod exec;
mod fs;
mod piped;
pub mod sys;
mod tcp;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentwire::Message;
use agentwire::MessageType;
use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{Ready, ReadyCapabilities, ResolvedUser};
use agentwire::payload::exec::{ExecLimits, ExecRlimit};
use agentwire_session::driver::{self, Incoming, Route};
use agentwire_session::{Connection, Event};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

pub use agentwire_session;
pub use exec::{ExecService, reap_orphans};
pub use fs::FsService;
pub use tcp::TcpService;

/// How the agent runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The directory `core.fs.*` paths are confined to.
    pub root: PathBuf,
    /// Whether `core.tcp.connect` may reach beyond loopback.
    pub allow_net: bool,
    /// Whether the agent is the VM's init: it then applies
    /// `core.clock.sync` and the bootstrap's hostname.
    pub init_mode: bool,
    /// `CLOCK_BOOTTIME` when the agent started (`Ready.boot_time_ns`).
    pub boot_time_ns: u64,
    /// Time spent before serving, in ns (added to each connection's init phase).
    pub init_time_ns: u64,
    /// What `Ready.agent_version` says.
    pub agent_version: String,
    /// The connection's limits and timeouts.
    pub session: agentwire_session::Config,
}

impl Config {
    /// Files under `root`, loopback TCP only, not init; the start-up
    /// exchange within 120 s (60 s for the bootstrap and 60 s for the
    /// acknowledgement, as the deployed agent).
    pub fn new(root: PathBuf) -> Config {
        let mut session = agentwire_session::Config::default();
        session.handshake_timeout = Duration::from_secs(120);
        Config {
            root,
            allow_net: false,
            init_mode: false,
            boot_time_ns: sys::boottime_ns(),
            init_time_ns: 0,
            agent_version: concat!("agentwire ", env!("CARGO_PKG_VERSION")).into(),
            session,
        }
    }
}

/// Settings a `core.bootstrap` gives the sessions that follow.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Defaults {
    /// Working directory of commands that name none.
    pub cwd: Option<String>,
    /// Environment added to every command.
    pub env: Vec<(String, String)>,
    /// User of commands that name none.
    pub user: Option<String>,
    /// Resource limits of every command (a request's own come after).
    pub rlimits: Vec<ExecRlimit>,
    /// The execution flow-control policy (generation 10, spec 8), advertised
    /// in `core.ready`; `None`: every execution is legacy.
    pub exec_limits: Option<ExecLimits>,
    /// The executions the connection holds, for the policy's admission.
    pub(crate) executions: exec::Held,
}

impl Defaults {
    /// What `b` sets.
    pub fn from_bootstrap(b: &GuestBootstrap) -> Defaults {
        Defaults {
            cwd: b.default_cwd.clone(),
            env: b.default_env.iter().map(|e| (e.key.clone(), e.value.clone())).collect(),
            user: b.user.clone(),
            rlimits: b.rlimits.clone(),
            exec_limits: b.exec_limits,
            executions: exec::Held::default(),
        }
    }
}

/// A session's work, to its end.
pub type SessionTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves the sessions of one family on one connection. `request` opened
/// the session; its later frames arrive on `route`, and replies go through
/// it; the session ends with the family's TERMINAL frame (or without one
/// when the host closed it, as `core.tcp.close`). When `route` yields
/// `None`, the host is gone or its relay client left: stop, and kill what
/// the session started.
pub trait Service: Send + Sync {
    /// Starts serving one session.
    fn serve(&self, request: Message, route: Route, defaults: Arc<Defaults>) -> SessionTask;

    /// A relay client left: release what ids in `ids` hold beyond their
    /// sessions (open file handles, say). Their sessions' routes have already
    /// ended.
    fn client_left(&self, ids: std::ops::Range<u32>) {
        let _ = ids;
    }
}

/// The services of one connection.
#[derive(Clone)]
pub struct Services {
    /// `core.exec.*`.
    pub exec: Arc<dyn Service>,
    /// `core.fs.*` (one table of open handles per connection).
    pub fs: Arc<dyn Service>,
    /// `core.tcp.*`.
    pub tcp: Arc<dyn Service>,
}

impl Services {
    /// The standard services for one connection of `config`.
    pub fn standard(config: &Config) -> Services {
        Services {
            exec: Arc::new(ExecService),
            fs: Arc::new(FsService::new(config.root.clone())),
            tcp: Arc::new(TcpService { allow_net: config.allow_net }),
        }
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ended {
    /// The host sent `core.shutdown`.
    Shutdown,
    /// The host went away.
    Closed,
}

/// A guest agent: what all its connections share.
pub struct Agent {
    config: Config,
    services: Box<dyn Fn(&Config) -> Services + Send + Sync>,
}

impl Agent {
    /// An agent with the standard services.
    pub fn new(config: Config) -> Agent {
        Agent { config, services: Box::new(Services::standard) }
    }

    /// An agent whose connections get the services `make` builds (to replace one).
    pub fn with_services(config: Config, make: impl Fn(&Config) -> Services + Send + Sync + 'static) -> Agent {
        Agent { config, services: Box::new(make) }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves one connection until the host shuts it down or goes away.
    /// Its sessions end with it: their processes are killed, their files and
    /// sockets closed. An error says why the connection failed.
    pub async fn serve(self: Arc<Self>, io: impl AsyncRead + AsyncWrite + Send + 'static) -> Result<Ended, String> {
        let started = Instant::now();
        let conn = Connection::agent(self.config.session.clone(), started);
        self.run(driver::spawn(conn, io, None), started).await
    }

    /// [`Agent::serve`], given also `fd`, a descriptor of `io`'s transport (a
    /// duplicate of its own): bulk file reads, and the output of commands on
    /// pipes, then go from the file or pipe to the transport by `splice`,
    /// never copied through the agent (`driver::spawn_splicing`); pieces
    /// below 64 KiB are read into memory, so that the pipes queued stay few.
    pub async fn serve_splicing(
        self: Arc<Self>,
        io: impl AsyncRead + AsyncWrite + Send + 'static,
        fd: std::os::fd::OwnedFd,
    ) -> Result<Ended, String> {
        let started = Instant::now();
        let conn = Connection::agent(self.config.session.clone(), started);
        self.run(driver::spawn_splicing(conn, io, None, fd), started).await
    }

    async fn run(
        self: Arc<Self>,
        (driver, handle, mut incoming): (driver::Driver, driver::Handle, UnboundedReceiver<Incoming>),
        started: Instant,
    ) -> Result<Ended, String> {
        let services = (self.services)(&self.config);
        let mut defaults = Arc::new(Defaults::default());
        let mut tasks = JoinSet::new();
        let result = loop {
            while tasks.try_join_next().is_some() {}
            let Some(item) = incoming.recv().await else { break Ok(Ended::Closed) };
            match item {
                Incoming::Request { message, route } => {
                    let service = match message.message_type() {
                        MessageType::ExecRequest => &services.exec,
                        MessageType::FsRequest => &services.fs,
                        _ => &services.tcp,
                    };
                    tasks.spawn(service.serve(message, route, defaults.clone()));
                }
                Incoming::Event(Event::Bootstrap(b)) => {
                    if self.config.init_mode
                        && let Some(name) = &b.hostname
                        && let Err(e) = sys::set_hostname(name)
                    {
                        tracing::warn!("hostname {name:?}: {e}");
                    }
                    defaults = Arc::new(Defaults::from_bootstrap(&b));
                    // An invalid execution policy is a startup failure (spec 8).
                    let valid =
                        b.exec_limits.as_ref().map_or(Ok(()), ExecLimits::validate).map_err(|e| ("bootstrap", e));
                    let sent = match valid.and_then(|()| resolve_user(b.user.as_deref()).map_err(|e| ("user", e))) {
                        Ok(user) => handle.send_now(|c| c.init_resolved(user)),
                        Err((stage, cause)) => handle.send_now(|c| {
                            c.init_failed(stage, &cause);
                            Ok(())
                        }),
                    };
                    if let Err(e) = sent {
                        break Err(format!("start-up: {e}"));
                    }
                }
                Incoming::Event(Event::InitAcked) => {
                    let init_ns = started.elapsed().as_nanos() as u64;
                    let mut ready = Ready {
                        boot_time_ns: self.config.boot_time_ns,
                        init_time_ns: self.config.init_time_ns + init_ns,
                        ready_time_ns: sys::boottime_ns(),
                        agent_version: self.config.agent_version.clone(),
                        capabilities: None,
                    };
                    let exec_limits = defaults.exec_limits;
                    ready.set_capabilities(ReadyCapabilities { exec_limits, ..ReadyCapabilities::NONE });
                    if let Err(e) = handle.send_now(|c| c.ready(ready)) {
                        break Err(format!("start-up: {e}"));
                    }
                }
                // Outside a VM the wall clock is the machine's own: only init steps it.
                Incoming::Event(Event::ClockSync(ns)) if self.config.init_mode => {
                    if let Err(e) = sys::set_realtime(ns) {
                        tracing::warn!("core.clock.sync: {e}");
                    }
                }
                Incoming::Event(Event::Shutdown) => {
                    handle.close("the host sent core.shutdown");
                    break Ok(Ended::Shutdown);
                }
                Incoming::Event(Event::ClientDisconnected { ids, sessions }) => {
                    tracing::debug!(?ids, ?sessions, "relay client left; its sessions end");
                    for service in [&services.exec, &services.fs, &services.tcp] {
                        service.client_left(ids.clone());
                    }
                }
                Incoming::Event(Event::PeerError { id, error }) => {
                    tracing::warn!(id, kind = %error.kind, "the host reports: {}", error.message)
                }
                Incoming::Event(other) => tracing::trace!("{other:?}"),
                Incoming::Ended(why) => {
                    break if why == "the peer closed the connection" { Ok(Ended::Closed) } else { Err(why) };
                }
                _ => {}
            }
        };
        // Sessions end with the connection: their children are killed on drop.
        tasks.shutdown().await;
        handle.close("the connection is over");
        driver.finish().await;
        result
    }
}

/// The uid and gid of `user` (a name or number; root when `None`).
fn resolve_user(user: Option<&str>) -> Result<ResolvedUser, String> {
    match user {
        None => {
            let (uid, gid) = sys::effective_ids();
            Ok(ResolvedUser { uid, gid })
        }
        Some(u) => {
            let (uid, gid) = exec::lookup_user(u).ok_or_else(|| format!("no user {u:?} in /etc/passwd"))?;
            Ok(ResolvedUser { uid, gid })
        }
    }
}
