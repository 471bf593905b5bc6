//! Addresses the agent listens on and the host connects to, and the byte
//! streams they give: a Unix socket, TCP on loopback, or vsock.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream a connection runs over.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Transport for T {}

/// A boxed byte stream.
pub type Stream = Box<dyn Transport>;

/// Where a peer is: `unix:PATH` (or any PATH with a `/`), `HOST:PORT` or
/// `tcp:HOST:PORT` with a literal IP, `vsock:PORT` (listen) or `vsock:CID:PORT`,
/// and for an agent in a VM `port:NAME` or `serial:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address; the agent accepts only loopback ones.
    Tcp(SocketAddr),
    /// The virtio-serial port of this name (`port:NAME`), found under `/sys/class/virtio-ports`.
    Port(String),
    /// A serial device (`serial:PATH`), in raw mode if it is a terminal.
    Serial(PathBuf),
    /// A vsock port; `cid` is the peer's context id when connecting (any, when listening).
    Vsock {
        /// Context id: `None` when listening.
        cid: Option<u32>,
        /// Port.
        port: u32,
    },
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
            Addr::Port(name) => write!(f, "port:{name}"),
            Addr::Serial(p) => write!(f, "serial:{}", p.display()),
            Addr::Vsock { cid: None, port } => write!(f, "vsock:{port}"),
            Addr::Vsock { cid: Some(cid), port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

impl Addr {
    /// Parses an address as the command line gives it.
    pub fn parse(s: &str) -> Result<Addr, String> {
        if let Some(rest) = s.strip_prefix("vsock:") {
            let number = |what: &str, v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("{s}: the vsock {what} {v:?} is not a number from 0 to 4294967295"))
            };
            return match rest.split_once(':') {
                None => Ok(Addr::Vsock { cid: None, port: number("port", rest)? }),
                Some((cid, port)) => Ok(Addr::Vsock { cid: Some(number("cid", cid)?), port: number("port", port)? }),
            };
        }
        if let Some(name) = s.strip_prefix("port:") {
            return if name.is_empty() { Err(format!("{s}: no port name")) } else { Ok(Addr::Port(name.into())) };
        }
        if let Some(path) = s.strip_prefix("serial:") {
            return if path.is_empty() { Err(format!("{s}: no device path")) } else { Ok(Addr::Serial(path.into())) };
        }
        if let Some(path) = s.strip_prefix("unix:") {
            return if path.is_empty() { Err(format!("{s}: no socket path")) } else { Ok(Addr::Unix(path.into())) };
        }
        let tcp = s.strip_prefix("tcp:").unwrap_or(s);
        if let Ok(a) = tcp.parse::<SocketAddr>() {
            return Ok(Addr::Tcp(a));
        }
        if s.contains('/') || s.ends_with(".sock") {
            return Ok(Addr::Unix(s.into()));
        }
        Err(format!(
            "{s}: not an address (use unix:PATH, a path with a '/', IP:PORT such as 127.0.0.1:7000 or [::1]:7000, or vsock:PORT)"
        ))
    }

    /// Refuses what the agent must not listen on: TCP beyond this machine.
    pub fn check_listenable(&self) -> Result<(), String> {
        match self {
            Addr::Tcp(a) if !a.ip().is_loopback() => Err(format!(
                "refusing to listen on {a}: the agent serves TCP on loopback only (127.0.0.1 or [::1]); \
                 use a Unix socket or vsock to reach it from elsewhere"
            )),
            Addr::Vsock { cid: Some(_), .. } => Err(format!("{self}: an agent listens on vsock:PORT, without a cid")),
            _ => Ok(()),
        }
    }
}

/// A bound listener of any kind.
pub enum Listener {
    /// Unix socket, with the path removed on drop.
    Unix(tokio::net::UnixListener, PathBuf),
    /// TCP on loopback.
    Tcp(tokio::net::TcpListener),
    /// vsock.
    Vsock(tokio_vsock::VsockListener),
    /// A virtio-serial port found by name, then served like [`Listener::Device`].
    Port(String),
    /// A serial device: one connection at a time, for as long as the host holds it open.
    Device(PathBuf),
}

impl Listener {
    /// Binds `addr`; a Unix socket is created with mode 0600.
    pub async fn bind(addr: &Addr) -> io::Result<Listener> {
        match addr {
            Addr::Unix(path) => {
                let listener = bind_private_unix(path)?;
                Ok(Listener::Unix(listener, path.clone()))
            }
            Addr::Tcp(a) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(a).await?)),
            Addr::Vsock { port, .. } => {
                let a = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port);
                Ok(Listener::Vsock(tokio_vsock::VsockListener::bind(a)?))
            }
            Addr::Port(name) => Ok(Listener::Port(name.clone())),
            Addr::Serial(path) => Ok(Listener::Device(path.clone())),
        }
    }

    /// Whether connections come one after another on one device (so are served in turn).
    pub fn is_serial(&self) -> bool {
        matches!(self, Listener::Port(_) | Listener::Device(_))
    }

    /// What it is bound to (a TCP port chosen by the system included).
    pub fn local_addr(&self) -> io::Result<Addr> {
        match self {
            Listener::Unix(_, p) => Ok(Addr::Unix(p.clone())),
            Listener::Tcp(l) => Ok(Addr::Tcp(l.local_addr()?)),
            Listener::Vsock(l) => Ok(Addr::Vsock { cid: None, port: l.local_addr()?.port() }),
            Listener::Port(name) => Ok(Addr::Port(name.clone())),
            Listener::Device(path) => Ok(Addr::Serial(path.clone())),
        }
    }

    /// The next connection, with a name for the peer, and with `duplicate` a
    /// duplicate of its descriptor (for the agent's writer to splice data
    /// into; `None` if it could not be made).
    pub async fn accept(&self, duplicate: bool) -> io::Result<(Stream, Option<OwnedFd>, String)> {
        let dup = |s: &dyn AsFd| {
            let fd = duplicate.then(|| s.as_fd().try_clone_to_owned());
            fd?.map_err(|e| tracing::debug!("no duplicate of the connection's descriptor: {e}")).ok()
        };
        let serial = async |path: &std::path::Path| {
            let s = crate::serial::SerialStream::open_when_connected(path).await?;
            io::Result::Ok((dup(&s), Box::new(s) as Stream, format!("host on {}", path.display())))
        };
        let (fd, stream, peer): (_, Stream, _) = match self {
            Listener::Unix(l, _) => {
                let s = l.accept().await?.0;
                widen_send_buffer(&s);
                (dup(&s), Box::new(s), "unix peer".to_string())
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                (dup(&s), Box::new(s), peer.to_string())
            }
            Listener::Vsock(l) => {
                let (s, peer) = l.accept().await?;
                (dup(&s), Box::new(s), format!("vsock:{}:{}", peer.cid(), peer.port()))
            }
            Listener::Port(name) => {
                serial(&crate::serial::find_port(name, std::time::Duration::from_secs(30)).await?).await?
            }
            Listener::Device(path) => serial(path).await?,
        };
        Ok((stream, fd, peer))
    }
}

/// What the agent asks for as a Unix connection's send buffer: a 1 MiB record
/// of a file read (the largest pipe an unprivileged agent splices) fits at
/// once, so the writer moves it with one `splice` and one wake-up rather than
/// five. Measured with `e2e_transfer 1024 9 --fs-only --child`, interleaved,
/// two runs: 2,986 and 3,675 MB/s (medians) with the default (208 KiB), 4,065
/// and 4,666 with this, 3,696 and 4,209 with 2 MiB, on a machine whose
/// `net.core.wmem_max` is 4 MiB. The kernel caps the request at `wmem_max`
/// (208 KiB by default on many systems, where this changes nothing).
pub const UNIX_SEND_BUFFER: usize = 1024 * 1024;

/// Asks for [`UNIX_SEND_BUFFER`]; a refusal leaves the default, which works.
pub fn widen_send_buffer(s: &impl AsFd) {
    if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(s, UNIX_SEND_BUFFER) {
        tracing::debug!("send buffer of {UNIX_SEND_BUFFER} bytes refused: {e}");
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds a Unix socket that only its owner can connect to: the socket file is
/// created with mode 0600 (umask 077 around `bind`, so there is no moment at
/// which it is open to others), and chmod-ed again to be sure.
///
/// A socket file left by a process that is gone (nothing accepts on it) is
/// replaced; one that a live process serves, or a path that is not a socket,
/// is an error that says so.
fn bind_private_unix(path: &std::path::Path) -> io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            let what = format!("{} exists and is not a socket; remove it or choose another path", path.display());
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, what));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                let what = format!("another process is listening on {}", path.display());
                return Err(io::Error::new(io::ErrorKind::AddrInUse, what));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("replacing the stale socket {}", path.display());
                std::fs::remove_file(path)?;
            }
            Err(e) => return Err(e),
        }
    }
    // The mask is the process's: the command binds its sockets from one place,
    // before serving connections, so nothing else creates files meanwhile.
    let old = crate::sys::umask(0o077);
    let bound = tokio::net::UnixListener::bind(path);
    crate::sys::umask(old);
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Connects to `addr`.
pub async fn connect(addr: &Addr) -> io::Result<Stream> {
    match addr {
        Addr::Unix(p) => Ok(Box::new(tokio::net::UnixStream::connect(p).await?)),
        Addr::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        Addr::Vsock { cid, port } => {
            let cid = cid.ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "connecting over vsock needs vsock:CID:PORT")
            })?;
            Ok(Box::new(tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(cid, *port)).await?))
        }
        Addr::Port(_) | Addr::Serial(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} is the guest's side of a serial link; the host connects to the VM's socket"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_the_agent_refuses_what_is_not_loopback() {
        assert_eq!(Addr::parse("unix:/tmp/a.sock").unwrap(), Addr::Unix("/tmp/a.sock".into()));
        assert_eq!(Addr::parse("./a.sock").unwrap(), Addr::Unix("./a.sock".into()));
        assert_eq!(Addr::parse("vsock:5000").unwrap(), Addr::Vsock { cid: None, port: 5000 });
        assert_eq!(Addr::parse("vsock:3:5000").unwrap(), Addr::Vsock { cid: Some(3), port: 5000 });
        assert!(Addr::parse("vsock:x").unwrap_err().contains("port \"x\""));
        assert!(Addr::parse("vsock:-1:5").unwrap_err().contains("cid \"-1\""));
        assert!(Addr::parse("example.com:80").is_err());
        for ok in ["127.0.0.1:7000", "tcp:[::1]:7000", "127.9.9.9:1"] {
            Addr::parse(ok).unwrap().check_listenable().unwrap();
        }
        for refused in ["0.0.0.0:7000", "[::]:7000", "192.0.2.1:7000", "tcp:10.0.0.1:1"] {
            let e = Addr::parse(refused).unwrap().check_listenable().unwrap_err();
            assert!(e.contains("loopback only"), "{e}");
        }
        assert!(Addr::parse("vsock:2:5000").unwrap().check_listenable().is_err());
        assert_eq!(Addr::parse("port:agent").unwrap(), Addr::Port("agent".into()));
        assert_eq!(Addr::parse("serial:/dev/hvc0").unwrap(), Addr::Serial("/dev/hvc0".into()));
        assert!(Addr::parse("port:").is_err() && Addr::parse("serial:").is_err());
        Addr::parse("vsock:5000").unwrap().check_listenable().unwrap();
    }
}
