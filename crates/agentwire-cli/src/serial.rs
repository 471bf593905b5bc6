//! A serial device as a byte stream: a virtio-serial port (`/dev/vport0p1`,
//! found by its name) or a terminal such as `/dev/hvc0` (put into raw mode).
//! The file is non-blocking and driven by the runtime's reactor, so a read
//! that waits never holds a thread and is dropped cleanly with the connection.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sys;

/// An open serial device.
pub struct SerialStream {
    fd: AsyncFd<std::fs::File>,
}

impl SerialStream {
    fn open(path: &Path) -> io::Result<SerialStream> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        sys::make_raw(&file)?;
        // SAFETY: the File owns its descriptor, which stays open and the same
        // until the AsyncFd (which owns the File) is dropped.
        let fd = unsafe { AsyncFd::register(file) }.map_err(io::Error::from)?;
        Ok(SerialStream { fd })
    }

    /// Opens the device once its host side is connected: a virtio port reads
    /// as closed and drops what is written while no host holds it open.
    pub async fn open_when_connected(path: &Path) -> io::Result<SerialStream> {
        loop {
            let s = SerialStream::open(path)?;
            if !sys::hung_up(s.fd.get_ref()) {
                return Ok(s);
            }
            drop(s);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The device of the virtio-serial port called `name`, once it exists.
pub async fn find_port(name: &str, wait: Duration) -> io::Result<PathBuf> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") {
            for port in dir.flatten() {
                let named = std::fs::read_to_string(port.path().join("name")).unwrap_or_default();
                let dev = Path::new("/dev").join(port.file_name());
                if named.trim_end() == name && dev.exists() {
                    return Ok(dev);
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("no virtio-serial port named {name:?}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl AsyncRead for SerialStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for SerialStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
