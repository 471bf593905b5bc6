//! The few system calls the command needs beyond std, each in one small safe
//! wrapper (the library itself has no unsafe code at all).

/// `CLOCK_BOOTTIME` in nanoseconds: time since boot, suspend included.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The effective user and group ids of this process.
pub fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Sends `signal` to process `pid`.
pub fn kill(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    if pid <= 0 {
        // 0 and negative pids name process groups: never what a session means.
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(pid, signal) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The type `setrlimit` takes its resource as (glibc and musl differ).
#[cfg(target_env = "gnu")]
pub type Resource = libc::__rlimit_resource_t;
/// The type `setrlimit` takes its resource as (glibc and musl differ).
#[cfg(not(target_env = "gnu"))]
pub type Resource = libc::c_int;

/// The `RLIMIT_*` resource of a lowercase name ("nofile", "nproc", "as", ...).
pub fn rlimit_resource(name: &str) -> Option<Resource> {
    Some(match name {
        "as" => libc::RLIMIT_AS,
        "core" => libc::RLIMIT_CORE,
        "cpu" => libc::RLIMIT_CPU,
        "data" => libc::RLIMIT_DATA,
        "fsize" => libc::RLIMIT_FSIZE,
        "locks" => libc::RLIMIT_LOCKS,
        "memlock" => libc::RLIMIT_MEMLOCK,
        "msgqueue" => libc::RLIMIT_MSGQUEUE,
        "nice" => libc::RLIMIT_NICE,
        "nofile" => libc::RLIMIT_NOFILE,
        "nproc" => libc::RLIMIT_NPROC,
        "rss" => libc::RLIMIT_RSS,
        "rtprio" => libc::RLIMIT_RTPRIO,
        "rttime" => libc::RLIMIT_RTTIME,
        "sigpending" => libc::RLIMIT_SIGPENDING,
        "stack" => libc::RLIMIT_STACK,
        _ => return None,
    })
}

/// The current hard limit of `resource`.
pub fn hard_limit(resource: Resource) -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(resource, &mut r) } == 0 { r.rlim_max } else { 0 }
}

/// Arranges for `limits` to be set in the child between fork and exec.
pub fn set_rlimits_in_child(cmd: &mut tokio::process::Command, limits: Vec<(Resource, u64, u64)>) {
    if limits.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec and calls only
    // setrlimit, which is async-signal-safe; it allocates nothing (the Vec was
    // built in the parent).
    unsafe {
        cmd.pre_exec(move || {
            for &(resource, soft, hard) in &limits {
                let r = libc::rlimit { rlim_cur: soft, rlim_max: hard };
                if libc::setrlimit(resource, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
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

fn cstring(s: &str) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(s).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Mounts a filesystem of type `fstype` at `target` (created if missing).
pub fn mount(source: &str, target: &str, fstype: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let (source, target, fstype) = (cstring(source)?, cstring(target)?, cstring(fstype)?);
    // SAFETY: three valid NUL-terminated strings and no data argument.
    check(unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) })
}

/// Loads a kernel module from its file.
pub fn load_module(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let no_params = c"";
    // SAFETY: finit_module takes an open fd, a NUL-terminated parameter string and flags.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), no_params.as_ptr(), 0) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Steps `CLOCK_REALTIME` to `unix_nanos`.
pub fn set_realtime(unix_nanos: u64) -> std::io::Result<()> {
    let ts = libc::timespec { tv_sec: (unix_nanos / 1_000_000_000) as _, tv_nsec: (unix_nanos % 1_000_000_000) as _ };
    // SAFETY: clock_settime reads one timespec through a valid pointer.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
}

/// Sets the host name.
pub fn set_hostname(name: &str) -> std::io::Result<()> {
    // SAFETY: a pointer and the length of the bytes it points to.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Flushes the filesystems and powers the machine off. Returns only on failure.
pub fn power_off() -> std::io::Error {
    // SAFETY: sync and reboot take no pointers; reboot ends the machine.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    std::io::Error::last_os_error()
}

/// Whether the other end of a virtio port is closed (`POLLHUP`), without waiting.
pub fn hung_up(fd: &impl std::os::fd::AsRawFd) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd and a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n < 0 || p.revents & libc::POLLHUP != 0
}

/// Puts a terminal into raw mode: bytes pass unchanged, no echo, no line editing.
pub fn make_raw(fd: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: isatty takes a plain fd.
    if unsafe { libc::isatty(fd) } != 1 {
        return Ok(());
    }
    // SAFETY: termios is plain data; tcgetattr fills it, cfmakeraw edits it, tcsetattr reads it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        check(libc::tcgetattr(fd, &mut t))?;
        libc::cfmakeraw(&mut t);
        check(libc::tcsetattr(fd, libc::TCSANOW, &t))
    }
}

/// Arranges for the child to be killed when this process dies, however it dies.
pub fn kill_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and calls only
    // prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Collects the exit status of zombie child `pid`; whether there was one.
pub fn reap(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    let mut status = 0;
    // SAFETY: waitpid writes one int through a valid pointer.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == pid }
}
