//! Pipes that carry a frame's data to the connection without passing through
//! the agent's memory: filled by `splice` from a file or from a command's
//! output pipe, then spliced into the transport by the session driver
//! (`agentwire::PipedData`).

use std::os::fd::{AsFd, OwnedFd};

use rustix::pipe::{PipeFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with};

/// The largest pipe an unprivileged process may ask for by default
/// (`/proc/sys/fs/pipe-max-size`).
pub(crate) const DEFAULT_PIPE_MAX: usize = 1024 * 1024;

/// The least data that gets a pipe of its own; less is read into memory. Each
/// queued pipe holds a descriptor and at least a page, so a peer granting
/// credit a few bytes at a time, or a command writing a few bytes at a time,
/// must not make one per few bytes: with the connection's write backlog of
/// 1 MiB, at most 16 queued pipes come from a connection's waiting frames.
/// And below this, making, filling and splicing a pipe costs more than the
/// copy it saves: with the output chunks of 16 KiB that the client's default
/// execution limits ask for, a command's output through `agentwire agent`
/// ran at 658–730 MB/s through pipes and 871–1,070 through memory (1 GiB,
/// `e2e_transfer --child --chunk 16 --window 1024`), and in the VM 27.8
/// against 41.6 MB/s (`vm/bench.sh`, `cat` of a tmpfs file).
pub(crate) const MIN_PIPED: usize = 64 * 1024;

/// A new pipe, both ends non-blocking, with room for `want` bytes where the
/// system allows it (above `pipe-max-size` only with CAP_SYS_RESOURCE; then
/// 1 MiB, then the default 64 KiB): its read end, write end and room.
pub(crate) fn pipe_for(want: usize) -> std::io::Result<(OwnedFd, OwnedFd, usize)> {
    let (read_end, write_end) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    let room = match resize(&write_end, want) {
        Ok(size) => size,
        Err(_) => fcntl_getpipe_size(&write_end)?,
    };
    Ok((read_end, write_end, room))
}

/// Gives `pipe` room for `want` bytes, or for [`DEFAULT_PIPE_MAX`] when
/// more is refused (`EPERM` above `pipe-max-size` without CAP_SYS_RESOURCE):
/// the room it has then.
pub(crate) fn resize(pipe: impl AsFd, want: usize) -> rustix::io::Result<usize> {
    fcntl_setpipe_size(&pipe, want).or_else(|_| fcntl_setpipe_size(&pipe, want.min(DEFAULT_PIPE_MAX)))
}
