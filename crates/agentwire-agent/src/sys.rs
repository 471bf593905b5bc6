//! The few system calls the agent needs beyond std, through the safe
//! wrappers of `nix`. The only `unsafe` left here is `Command::pre_exec`,
//! which is unsafe by nature: its closure runs in the forked child, where only
//! async-signal-safe calls are sound.

use std::os::fd::AsFd;

use nix::sys::resource::Resource as NixResource;
use nix::sys::signal::Signal;
use nix::time::ClockId;
use nix::unistd::Pid;

/// `CLOCK_BOOTTIME` in nanoseconds: time since boot, suspend included.
pub fn boottime_ns() -> u64 {
    match nix::time::clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

/// The effective user and group ids of this process.
pub fn effective_ids() -> (u32, u32) {
    (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw())
}

/// Sends `signal` to process `pid` (0 only checks that the process exists).
pub fn kill(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    if pid <= 0 {
        // 0 and negative pids name process groups: never what a session means.
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    let signal = if signal == 0 { None } else { Some(Signal::try_from(signal)?) };
    Ok(nix::sys::signal::kill(Pid::from_raw(pid), signal)?)
}

/// Sends `signal` to every process of the group led by `pgid` (a command
/// the agent started in its own group).
pub fn kill_group(pgid: u32, signal: i32) -> std::io::Result<()> {
    let pgid = i32::try_from(pgid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    if pgid <= 1 {
        // 0 is the agent's own group and 1 is init's: never a session's.
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    let signal = if signal == 0 { None } else { Some(Signal::try_from(signal)?) };
    Ok(nix::sys::signal::killpg(Pid::from_raw(pgid), signal)?)
}

/// A resource that `setrlimit` limits.
pub type Resource = NixResource;

/// The `RLIMIT_*` resource of a lowercase name ("nofile", "nproc", "as", ...).
pub fn rlimit_resource(name: &str) -> Option<Resource> {
    Some(match name {
        "as" => NixResource::RLIMIT_AS,
        "core" => NixResource::RLIMIT_CORE,
        "cpu" => NixResource::RLIMIT_CPU,
        "data" => NixResource::RLIMIT_DATA,
        "fsize" => NixResource::RLIMIT_FSIZE,
        "locks" => NixResource::RLIMIT_LOCKS,
        "memlock" => NixResource::RLIMIT_MEMLOCK,
        "msgqueue" => NixResource::RLIMIT_MSGQUEUE,
        "nice" => NixResource::RLIMIT_NICE,
        "nofile" => NixResource::RLIMIT_NOFILE,
        "nproc" => NixResource::RLIMIT_NPROC,
        "rss" => NixResource::RLIMIT_RSS,
        "rtprio" => NixResource::RLIMIT_RTPRIO,
        "rttime" => NixResource::RLIMIT_RTTIME,
        "sigpending" => NixResource::RLIMIT_SIGPENDING,
        "stack" => NixResource::RLIMIT_STACK,
        _ => return None,
    })
}

/// The current hard limit of `resource`.
pub fn hard_limit(resource: Resource) -> u64 {
    nix::sys::resource::getrlimit(resource).map_or(0, |(_, hard)| hard)
}

/// Arranges for `limits` to be set in the child between fork and exec.
pub fn set_rlimits_in_child(cmd: &mut tokio::process::Command, limits: Vec<(Resource, u64, u64)>) {
    if limits.is_empty() {
        return;
    }
    // SAFETY: `pre_exec` is unsafe because its closure runs in the forked
    // child, where only async-signal-safe work is sound. This one only calls
    // setrlimit(2) through nix's thin wrapper (no allocation, no locks) on a
    // Vec built in the parent, and turns an errno into an io::Error, which
    // allocates nothing for an OS error.
    unsafe {
        cmd.pre_exec(move || {
            for &(resource, soft, hard) in &limits {
                nix::sys::resource::setrlimit(resource, soft, hard)?;
            }
            Ok(())
        });
    }
}

/// The symbolic name of an errno value, for `errno_name` fields.
pub fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        libc::ENOEXEC => "ENOEXEC",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ETXTBSY => "ETXTBSY",
        libc::ENOSPC => "ENOSPC",
        libc::EPIPE => "EPIPE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        _ => return None,
    })
}

/// Mounts a filesystem of type `fstype` at `target` (created if missing).
pub fn mount(source: &str, target: &str, fstype: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let flags = nix::mount::MsFlags::empty();
    Ok(nix::mount::mount(Some(source), target, Some(fstype), flags, None::<&str>)?)
}

/// Loads a kernel module from its file.
pub fn load_module(path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    Ok(nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty())?)
}

/// Steps `CLOCK_REALTIME` to `unix_nanos`.
pub fn set_realtime(unix_nanos: u64) -> std::io::Result<()> {
    let ts = nix::sys::time::TimeSpec::new((unix_nanos / 1_000_000_000) as _, (unix_nanos % 1_000_000_000) as _);
    Ok(nix::time::clock_settime(ClockId::CLOCK_REALTIME, ts)?)
}

/// Sets the host name.
pub fn set_hostname(name: &str) -> std::io::Result<()> {
    Ok(nix::unistd::sethostname(name)?)
}

/// Flushes the filesystems and powers the machine off. Returns only on failure.
pub fn power_off() -> std::io::Error {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF) {
        Err(e) => e.into(),
        Ok(never) => match never {},
    }
}

/// Whether the other end of a virtio port is closed (`POLLHUP`), without waiting.
pub fn hung_up(fd: &impl AsFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    match nix::poll::poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLHUP)),
        Err(_) => true,
    }
}

/// Puts a terminal into raw mode: bytes pass unchanged, no echo, no line editing.
pub fn make_raw(fd: &impl AsFd) -> std::io::Result<()> {
    use nix::sys::termios;
    if !nix::unistd::isatty(fd.as_fd()).unwrap_or(false) {
        return Ok(());
    }
    let mut t = termios::tcgetattr(fd.as_fd())?;
    termios::cfmakeraw(&mut t);
    Ok(termios::tcsetattr(fd.as_fd(), termios::SetArg::TCSANOW, &t)?)
}

/// Arranges for the child to be killed when this process dies, however it dies.
pub fn kill_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: `pre_exec` is unsafe because its closure runs in the forked
    // child, where only async-signal-safe work is sound. This one only calls
    // prctl(PR_SET_PDEATHSIG) through nix's thin wrapper: no allocation, no locks.
    unsafe {
        cmd.pre_exec(|| Ok(nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?));
    }
}

/// Makes `terminal` (a pseudo-terminal's slave side) the child's stdin,
/// stdout, stderr and controlling terminal. The child leads a new session,
/// and so its own process group: its pgid is its pid, as with
/// `process_group(0)` (which must not be set as well: `setsid` fails in a
/// process that already leads a group).
pub fn attach_terminal(cmd: &mut tokio::process::Command, terminal: std::os::fd::OwnedFd) -> std::io::Result<()> {
    use std::process::Stdio;
    cmd.stdin(Stdio::from(terminal.try_clone()?));
    cmd.stdout(Stdio::from(terminal.try_clone()?));
    cmd.stderr(Stdio::from(terminal.try_clone()?));
    // SAFETY: `pre_exec` is unsafe because its closure runs in the forked
    // child, where only async-signal-safe work is sound. This one makes two
    // system calls through thin safe wrappers, setsid(2) (nix) and
    // ioctl(TIOCSCTTY) (rustix), on a descriptor opened in the parent and
    // moved into the closure; it allocates nothing and takes no lock, and an
    // errno becomes an io::Error without allocating. The descriptor is
    // close-on-exec, so the program keeps only the copies on 0, 1 and 2.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            rustix::process::ioctl_tiocsctty(&terminal)?;
            Ok(())
        });
    }
    Ok(())
}

/// Collects the exit status of zombie child `pid`; whether there was one.
pub fn reap(pid: u32) -> bool {
    use nix::sys::wait::{WaitPidFlag, WaitStatus};
    let Ok(pid) = i32::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    matches!(
        nix::sys::wait::waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)),
        Ok(status) if status != WaitStatus::StillAlive
    )
}

/// Swaps the process's file-creation mask, returning the previous one.
pub fn umask(mask: u32) -> u32 {
    let mode = nix::sys::stat::Mode::from_bits_truncate(mask as libc::mode_t);
    nix::sys::stat::umask(mode).bits() as u32
}

/// Sets the access and/or modification time (seconds since the epoch) of
/// `path` itself, not following a symlink; `None` leaves that time as it is.
pub fn set_times_nofollow(path: &std::path::Path, atime: Option<i64>, mtime: Option<i64>) -> std::io::Result<()> {
    use nix::sys::stat::UtimensatFlags;
    use nix::sys::time::TimeSpec;
    let spec = |t: Option<i64>| t.map_or(TimeSpec::UTIME_OMIT, |secs| TimeSpec::new(secs as _, 0));
    let (atime, mtime) = (spec(atime), spec(mtime));
    Ok(nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, path, &atime, &mtime, UtimensatFlags::NoFollowSymlink)?)
}
