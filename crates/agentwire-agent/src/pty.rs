//! Pseudo-terminals for `tty: true` executions: opening one of a given size,
//! and the master side as an asynchronous reader and writer.
//!
//! The master is driven with tokio's [`AsyncFd`] (epoll) rather than a
//! blocking thread: a pty master polls like a socket (readable on data and on
//! the slave's hang-up, writable when the line discipline has room), so no
//! thread is parked per terminal, and a read or write in progress is simply
//! dropped when its task is aborted. A blocking read could not be cancelled:
//! a thread of an abandoned session would stay stuck in `read(2)` for as long
//! as any process held the slave side open.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;
use tokio::io::unix::AsyncFd;

/// A new terminal: the master stays with the agent, the slave goes to the child.
pub(crate) struct Pty {
    /// The agent's side.
    pub master: Master,
    /// The command's side (close-on-exec; the child gets it as stdio).
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of `rows` × `cols`. Both descriptors are
/// close-on-exec from the start, so that no command started meanwhile by
/// another session inherits them (which would keep the terminal open).
pub(crate) fn open(rows: u16, cols: u16) -> io::Result<Pty> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    // TIOCGPTPEER (Linux 4.13) opens the slave without a path lookup in /dev/pts.
    let slave = match rustix::pty::ioctl_tiocgptpeer(&master, flags) {
        Ok(slave) => slave,
        Err(_) => {
            let name = rustix::pty::ptsname(&master, Vec::new())?;
            let mode = rustix::fs::Mode::empty();
            let oflags = rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC;
            rustix::fs::open(name.as_c_str(), oflags, mode)?
        }
    };
    set_size(&master, rows, cols)?;
    rustix::io::ioctl_fionbio(&master, true)?;
    // tokio 1.54 deprecates the safe constructors for any `T: AsRawFd`, which
    // could report another descriptor later or close it while registered. An
    // `OwnedFd` moved into the `AsyncFd` can do neither: it stays open, and
    // the same, until the `AsyncFd` drops it. (`AsyncFd::register`, the
    // replacement, is an `unsafe fn` that asks for exactly this guarantee.)
    #[allow(deprecated)]
    let master = AsyncFd::new(master)?;
    Ok(Pty { master: Master(master), slave })
}

fn set_size(fd: impl AsFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    Ok(rustix::termios::tcsetwinsize(fd, size)?)
}

/// The agent's side of a terminal, non-blocking. A read and a write may be
/// in progress at once (from two tasks).
pub(crate) struct Master(AsyncFd<OwnedFd>);

impl Master {
    /// Reads what the command wrote. Linux answers `EIO` once every slave
    /// descriptor is closed (the command and all it left behind are gone):
    /// that is returned as the end, `Ok(0)`.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut *buf)?)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes some of `data` as the command's terminal input, waiting while
    /// the line discipline is full; how much went in.
    pub async fn write(&self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        loop {
            let mut ready = self.0.writable().await?;
            match ready.try_io(|fd| Ok(rustix::io::write(fd.get_ref(), data)?)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sets the window size (the foreground process group gets `SIGWINCH`).
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        set_size(self.0.get_ref(), rows, cols)
    }
}
