//! A serial device as a byte stream: a virtio-serial port (`/dev/vport0p1`,
//! found by its name) or a terminal such as `/dev/hvc0` (put into raw mode).
//! The file is non-blocking and driven by the runtime's reactor, so a read
//! that waits never holds a thread and is dropped cleanly with the connection.

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
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
    /// Where a vectored write gathers small slices (frame heads, small frames)
    /// into one write: a port takes each write(2), and each slice of a
    /// writev(2), as a buffer of its own that the host side gets as one
    /// socket write, so a 20-byte head alone costs what 32 KiB do.
    gather: Vec<u8>,
}

/// What one write(2) of a virtio port takes at most (the guest driver's limit).
const PORT_WRITE_MAX: usize = 32 * 1024;

impl AsFd for SerialStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
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
        Ok(SerialStream { fd, gather: Vec::new() })
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
    /// Fills `buf` with as much as the device has now, not one read's worth:
    /// a virtio port's read gives at most one of its 4 KiB receive buffers, and
    /// a caller that handles each read returned (the session driver parses,
    /// dispatches and wakes its writer) would pay that for every 4 KiB.
    ///
    /// The bytes go straight into the unfilled part of `buf`, which is not
    /// zeroed first: the session driver offers 256 KiB of fresh capacity for
    /// each read, and zeroing it (`ReadBuf::initialize_unfilled`) cost a
    /// 256 KiB memset and its page faults for every read, however little came.
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // SAFETY: read(2) only writes into this memory, and only the bytes
            // it says it wrote are marked initialized and filled below.
            let unfilled = unsafe { buf.unfilled_mut() };
            let (n, drained) = read_available(guard.get_inner().as_fd(), unfilled);
            match n {
                Ok(n) => {
                    if drained {
                        // It said EAGAIN: wait for the reactor before reading again.
                        guard.clear_ready();
                    }
                    // SAFETY: read(2) wrote these n bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Reads into `buf` until it is full, the device has nothing more (then the
/// second value is true) or ends. An error after some bytes is left for the
/// next call, which meets it again.
fn read_available(fd: BorrowedFd<'_>, buf: &mut [MaybeUninit<u8>]) -> (io::Result<usize>, bool) {
    let mut n = 0;
    while n < buf.len() {
        // rustix reads into uninitialized memory without `unsafe` here.
        match rustix::io::read(fd, &mut buf[n..]) {
            Ok(([], _)) => break,
            Ok((read, _)) => n += read.len(),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) if n > 0 => return (Ok(n), e == rustix::io::Errno::AGAIN),
            Err(e) => return (Err(e.into()), false),
        }
    }
    (Ok(n), false)
}

impl AsyncWrite for SerialStream {
    /// Writes as much of `data` as the device takes now: a virtio port's write
    /// takes at most 32 KiB, and each return to the caller costs a wake-up.
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let mut n = 0;
            let mut error = None;
            while n < data.len() {
                match guard.get_inner().write(&data[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            match error {
                Some(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    if n > 0 {
                        return Poll::Ready(Ok(n));
                    }
                }
                Some(e) if n == 0 => return Poll::Ready(Err(e)),
                _ => return Poll::Ready(Ok(n)),
            }
        }
    }

    /// Slices of at least [`PORT_WRITE_MAX`] are written from where they are;
    /// smaller ones, and the start of a large one that follows them, are
    /// gathered into writes of up to that size first. Returns after the first
    /// write that the device takes only in part, or when it would block.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_write_ready(cx))?;
            let file = guard.get_inner();
            let mut written = 0;
            // The first slice not wholly written yet, and how far into it.
            let (mut i, mut at) = (0, 0);
            let outcome = loop {
                while i < slices.len() && at == slices[i].len() {
                    (i, at) = (i + 1, 0);
                }
                let Some(slice) = slices.get(i) else { break Ok(()) };
                let rest = &slice[at..];
                let result = if rest.len() >= PORT_WRITE_MAX {
                    { file }.write(&rest[..PORT_WRITE_MAX])
                } else {
                    // Gather what follows, up to one write's worth.
                    this.gather.clear();
                    let (mut j, mut from) = (i, at);
                    while j < slices.len() && this.gather.len() < PORT_WRITE_MAX {
                        let take = (slices[j].len() - from).min(PORT_WRITE_MAX - this.gather.len());
                        this.gather.extend_from_slice(&slices[j][from..from + take]);
                        (j, from) = (j + 1, 0);
                    }
                    { file }.write(&this.gather)
                };
                match result {
                    Ok(0) => break Ok(()),
                    Ok(k) => {
                        written += k;
                        let full = k == if rest.len() >= PORT_WRITE_MAX { PORT_WRITE_MAX } else { this.gather.len() };
                        // Step past the k bytes written.
                        let mut left = k;
                        while left > 0 {
                            let step = left.min(slices[i].len() - at);
                            (at, left) = (at + step, left - step);
                            if at == slices[i].len() && left > 0 {
                                (i, at) = (i + 1, 0);
                            }
                        }
                        if !full {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            match outcome {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    if written > 0 {
                        return Poll::Ready(Ok(written));
                    }
                }
                Err(e) if written == 0 => return Poll::Ready(Err(e)),
                _ => return Poll::Ready(Ok(written)),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The guest's side of the raw port copy of `agentwire vm-bench` (a hidden
/// diagnostic; `vm/build.sh` puts `/bench-init` in the image, which runs it
/// before it starts the agent as init on the same port): blocking reads and
/// writes of the sizes the host asks for, with no protocol, so that the host
/// can time what the port itself carries.
///
/// The guest first writes [`RAW_READY`]; then the host sends commands of
/// [`RAW_COMMAND_LEN`] bytes: the operation (0 end: [`RAW_READY`], and the
/// port is closed once the host hangs up; 1 sink N bytes then write one byte;
/// 2 source N bytes), the mode (0
/// blocking, 1 non-blocking with poll, 2 for a source: `splice` from a pipe
/// of that size), N and the read or write size, both as
/// u64 little-endian.
pub fn raw_copy_guest(name: &str) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;

    let path = {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
        rt.block_on(find_port(name, Duration::from_secs(30)))?
    };
    let mut port = loop {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(&path)?;
        if !sys::hung_up(&f) {
            break f;
        }
        drop(f);
        std::thread::sleep(Duration::from_millis(20));
    };
    let set_nonblocking = |f: &std::fs::File, yes: bool| -> io::Result<()> {
        let flags = OFlag::from_bits_truncate(fcntl(f.as_fd(), FcntlArg::F_GETFL)?);
        let flags = if yes { flags | OFlag::O_NONBLOCK } else { flags - OFlag::O_NONBLOCK };
        fcntl(f.as_fd(), FcntlArg::F_SETFL(flags))?;
        Ok(())
    };
    // Waits until `f` is ready for `what` (a non-blocking copy that got EAGAIN).
    let wait = |f: &std::fs::File, what: PollFlags| -> io::Result<()> {
        let mut fds = [PollFd::new(f.as_fd(), what)];
        poll(&mut fds, PollTimeout::NONE)?;
        Ok(())
    };
    // Says that the guest is there: the host times nothing before it.
    port.write_all(&[RAW_READY])?;
    loop {
        // Commands are read blocking, whatever the last copy's mode was.
        set_nonblocking(&port, false)?;
        let mut command = [0u8; RAW_COMMAND_LEN];
        port.read_exact(&mut command)?;
        let n = u64::from_le_bytes(command[2..10].try_into().unwrap_or_default()) as usize;
        let size = (u64::from_le_bytes(command[10..18].try_into().unwrap_or_default()) as usize).clamp(1, 16 << 20);
        // Mode 2 (splice) writes blocking.
        let nonblocking = command[1] == 1;
        set_nonblocking(&port, nonblocking)?;
        let mut buf = vec![0x5au8; size];
        let mut done = 0;
        match command[0] {
            0 => {
                // The port is closed only once the host has hung up: what it
                // sends next (to the agent that opens the port after this)
                // would be discarded by a close while it is connected.
                port.write_all(&[RAW_READY])?;
                let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
                for _ in 0..100 {
                    if sys::hung_up(&port) {
                        break;
                    }
                    let _ = poll(&mut fds, PollTimeout::from(100u8));
                }
                return Ok(());
            }
            1 => {
                while done < n {
                    let want = size.min(n - done);
                    match port.read(&mut buf[..want]) {
                        Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the host went away")),
                        Ok(k) => done += k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(&port, PollFlags::POLLIN)?,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                set_nonblocking(&port, false)?;
                port.write_all(&[1])?;
            }
            // Source by `splice`, as the agent's file reads go: pieces of
            // `size` mapped into a pipe (`vmsplice`, no copy) and spliced
            // into the port, which takes a whole pipe as one buffer.
            2 if command[1] == 2 => {
                use nix::fcntl::{SpliceFFlags, splice, vmsplice};
                let (from, to) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                let _ = fcntl(to.as_fd(), FcntlArg::F_SETPIPE_SZ(size as i32));
                let room = fcntl(to.as_fd(), FcntlArg::F_GETPIPE_SZ)? as usize;
                while done < n {
                    // As much of the piece as the empty pipe takes (a buffer
                    // that starts mid-page needs a slot more than its pages),
                    // never waiting: this thread is the one that drains it.
                    let want = size.min(room).min(n - done);
                    let placed = vmsplice(&to, &[io::IoSlice::new(&buf[..want])], SpliceFFlags::SPLICE_F_NONBLOCK)?;
                    let mut moved = 0;
                    while moved < placed {
                        moved += splice(&from, None, &port, None, placed - moved, SpliceFFlags::SPLICE_F_MOVE)?;
                    }
                    done += placed;
                }
            }
            2 => {
                while done < n {
                    let want = size.min(n - done);
                    match port.write(&buf[..want]) {
                        Ok(k) => done += k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(&port, PollFlags::POLLOUT)?,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            op => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("raw copy: no operation {op}"))),
        }
    }
}

/// The length of a command of [`raw_copy_guest`].
pub const RAW_COMMAND_LEN: usize = 18;

/// What [`raw_copy_guest`] writes once it has the port, and after the end
/// command before it waits for the host to hang up.
pub const RAW_READY: u8 = 0xa5;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Reads into fresh, unzeroed capacity (as the session driver's
    /// `read_buf` offers it) give the bytes written, whole and in order.
    #[tokio::test]
    async fn reads_into_spare_capacity_arrive_in_order() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("port");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut stream = SerialStream::open(&fifo).unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
        let (path, sent) = (fifo.clone(), data.clone());
        let writer = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            for piece in sent.chunks(10_000) {
                f.write_all(piece).unwrap();
            }
        });
        let mut got = bytes::BytesMut::new();
        while got.len() < data.len() {
            got.reserve(256 * 1024);
            let n = stream.read_buf(&mut got).await.unwrap();
            assert!(n > 0);
        }
        writer.join().unwrap();
        assert!(got[..] == data[..]);
    }

    /// Vectored writes of small and large slices arrive whole and in order
    /// (a FIFO stands in for the port).
    #[tokio::test]
    async fn vectored_writes_arrive_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("port");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut stream = SerialStream::open(&fifo).unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let pieces: Vec<Vec<u8>> =
            vec![b"head".to_vec(), big.clone(), vec![], b"t".to_vec(), big[..40_000].to_vec(), b"end".to_vec()];
        let expected: Vec<u8> = pieces.concat();
        let total = expected.len();
        let path = fifo.clone();
        let reader = std::thread::spawn(move || {
            let mut f = std::fs::File::open(path).unwrap();
            let mut got = vec![0u8; total];
            f.read_exact(&mut got).unwrap();
            got
        });
        let (mut i, mut at) = (0, 0);
        while i < pieces.len() {
            let mut slices = vec![io::IoSlice::new(&pieces[i][at..])];
            slices.extend(pieces[i + 1..].iter().map(|p| io::IoSlice::new(p)));
            let mut k = stream.write_vectored(&slices).await.unwrap();
            while k > 0 || (i < pieces.len() && at == pieces[i].len()) {
                let step = k.min(pieces[i].len() - at);
                (at, k) = (at + step, k - step);
                if at == pieces[i].len() {
                    (i, at) = (i + 1, 0);
                    if i == pieces.len() {
                        break;
                    }
                }
            }
        }
        assert!(reader.join().unwrap() == expected);
    }
}
