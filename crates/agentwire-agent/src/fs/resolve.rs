//! Opening a path beneath a directory fd, with the kernel's help.
//!
//! [`open_beneath`] is `openat2(2)` with `RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS`: the kernel refuses, with `EXDEV`, any resolution
//! that would leave the directory (an absolute symlink, `..` above it, a
//! symlink whose target climbs out), whatever is renamed while it walks. On a
//! kernel without `openat2` (`ENOSYS`: Linux < 5.6, or a seccomp filter that
//! hides it) the same rules are applied by [`walk`]: one `openat(O_NOFOLLOW)`
//! per component, each relative to the fd of the directory before it,
//! reading and resolving symlinks here and never letting the kernel follow one.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Set once `openat2` answered `ENOSYS`: every later open walks.
static OPENAT2_MISSING: AtomicBool = AtomicBool::new(false);

/// `AGENTWIRE_FS_WALK=1` in the agent's environment makes every open walk, as
/// on a kernel without `openat2`: to test the fallback where the kernel has it.
fn walk_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var_os("AGENTWIRE_FS_WALK").is_some_and(|v| v == "1"))
}

/// The most symlinks one resolution follows (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

/// How often an `openat2` that met a concurrent rename (`EAGAIN`) is retried.
const AGAIN_RETRIES: usize = 64;

/// Opens `rel` beneath `dir` with `flags` (`O_CLOEXEC` is added; `mode` only
/// counts with `O_CREAT`). A final symlink is followed unless `flags` has
/// `O_NOFOLLOW`; every symlink followed must stay beneath `dir` (`EXDEV`
/// otherwise). An empty `rel` is `dir` itself.
pub(super) fn open_beneath(dir: BorrowedFd<'_>, rel: &OsStr, flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
    let rel = if rel.is_empty() { OsStr::new(".") } else { rel };
    let mode = if flags.intersects(OFlags::CREATE | OFlags::TMPFILE) { mode } else { Mode::empty() };
    if !OPENAT2_MISSING.load(Ordering::Relaxed) && !walk_forced() {
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        for _ in 0..AGAIN_RETRIES {
            match rustix::fs::openat2(dir, rel, flags | OFlags::CLOEXEC, mode, how) {
                Err(Errno::AGAIN) => continue,
                Err(Errno::NOSYS) => {
                    OPENAT2_MISSING.store(true, Ordering::Relaxed);
                    break;
                }
                other => return other,
            }
        }
        if !OPENAT2_MISSING.load(Ordering::Relaxed) {
            return Err(Errno::AGAIN);
        }
    }
    walk(dir, rel, flags, mode).map(|(fd, _)| fd)
}

/// The components of `p` between slashes, without empty ones and `.`.
fn split(p: &[u8]) -> impl DoubleEndedIterator<Item = OsString> + '_ {
    p.split(|b| *b == b'/').filter(|c| !c.is_empty() && *c != b".").map(|c| OsString::from_vec(c.to_vec()))
}

fn is_symlink(st: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Symlink
}

/// [`open_beneath`] without `openat2`, by hand; also the names of the
/// directories the resolution ended in, with symlinks resolved (the canonical
/// path beneath `dir`, as far as nothing was renamed meanwhile).
///
/// Each step opens one component with `O_NOFOLLOW` relative to the fd of the
/// directory before it (`O_PATH | O_DIRECTORY` for directories on the way).
/// A symlink is read with `readlinkat` and its target's components are walked
/// in its place: an absolute target, or `..` above `dir`, is `EXDEV`. `..` goes
/// back to the fd the walk came from, so it never leaves what was walked. A
/// component that turns into a symlink between the look and the open fails
/// the open (`ELOOP`/`ENOTDIR`) and is looked at again.
pub(super) fn walk(
    dir: BorrowedFd<'_>,
    rel: &OsStr,
    flags: OFlags,
    mode: Mode,
) -> Result<(OwnedFd, Vec<OsString>), Errno> {
    let follow_last = !flags.contains(OFlags::NOFOLLOW);
    let mut stack: Vec<(OwnedFd, OsString)> = Vec::new();
    let mut todo: VecDeque<OsString> = split(rel.as_bytes()).collect();
    let mut links = 0;
    let names = |stack: &[(OwnedFd, OsString)]| stack.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>();
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            stack.pop().ok_or(Errno::XDEV)?;
            continue;
        }
        let cur = stack.last().map_or(dir, |(fd, _)| fd.as_fd());
        let last = todo.is_empty();
        let mut follow = |cur: BorrowedFd<'_>, todo: &mut VecDeque<OsString>| -> Result<bool, Errno> {
            match rustix::fs::statat(cur, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if is_symlink(&st) => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(Errno::LOOP);
                    }
                    let target = rustix::fs::readlinkat(cur, &name, Vec::new())?;
                    let target = target.as_bytes();
                    if target.first() == Some(&b'/') {
                        return Err(Errno::XDEV);
                    }
                    for c in split(target).rev() {
                        todo.push_front(c);
                    }
                    Ok(true)
                }
                Ok(_) | Err(Errno::NOENT) => Ok(false),
                Err(e) => Err(e),
            }
        };
        if (!last || follow_last) && follow(cur, &mut todo)? {
            continue;
        }
        if last {
            match rustix::fs::openat(cur, &name, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, mode) {
                Ok(fd) => {
                    // With O_PATH, O_NOFOLLOW opens a link that appeared meanwhile instead of failing.
                    if follow_last && is_symlink(&rustix::fs::fstat(&fd)?) && follow(cur, &mut todo)? {
                        continue;
                    }
                    let mut names = names(&stack);
                    names.push(name);
                    return Ok((fd, names));
                }
                Err(e @ (Errno::LOOP | Errno::NOTDIR)) if follow_last => {
                    if !follow(cur, &mut todo)? {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        } else {
            let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rustix::fs::openat(cur, &name, dir_flags, Mode::empty()) {
                Ok(fd) => stack.push((fd, name)),
                Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                    if !follow(cur, &mut todo)? {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
    // The path ended on a directory already walked (or was empty).
    let cur = stack.last().map_or(dir, |(fd, _)| fd.as_fd());
    let fd = rustix::fs::openat(cur, ".", flags | OFlags::CLOEXEC, mode)?;
    Ok((fd, names(&stack)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> std::path::PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("agentwire-resolve-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Both ways of resolving give the same answers: what stays beneath the
    /// directory opens, what leaves it is EXDEV.
    #[test]
    fn the_walk_and_openat2_agree_on_what_stays_beneath() {
        let base = tmp("agree");
        let root = base.join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), "in").unwrap();
        std::fs::write(base.join("secret"), "out").unwrap();
        std::os::unix::fs::symlink("a/b", root.join("rel")).unwrap();
        std::os::unix::fs::symlink("../b/f", root.join("a/b/up")).unwrap();
        std::os::unix::fs::symlink(base.join("secret"), root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../secret", root.join("climb")).unwrap();
        std::os::unix::fs::symlink("a/../../secret", root.join("climb2")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        let rootfd = rustix::fs::open(&root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let cases: &[(&str, Result<&str, Errno>)] = &[
            ("a/b/f", Ok("a/b/f")),
            ("rel/f", Ok("a/b/f")),
            ("rel/up", Ok("a/b/f")),
            ("rel/../b/f", Ok("a/b/f")),
            ("abs", Err(Errno::XDEV)),
            ("climb", Err(Errno::XDEV)),
            ("climb2", Err(Errno::XDEV)),
            ("rel/../../..", Err(Errno::XDEV)),
            ("loop", Err(Errno::LOOP)),
            ("missing", Err(Errno::NOENT)),
        ];
        for (path, want) in cases {
            let walked = walk(rootfd.as_fd(), OsStr::new(path), OFlags::RDONLY, Mode::empty());
            let kernel = open_beneath(rootfd.as_fd(), OsStr::new(path), OFlags::RDONLY, Mode::empty());
            match want {
                Ok(real) => {
                    let (fd, names) = walked.unwrap_or_else(|e| panic!("{path}: {e}"));
                    let names: Vec<_> = names.iter().map(|n| n.to_str().unwrap()).collect();
                    assert_eq!(names.join("/"), *real, "{path}");
                    let st = rustix::fs::fstat(&fd).unwrap();
                    let want = std::fs::metadata(root.join(real)).unwrap();
                    assert_eq!(st.st_ino, std::os::unix::fs::MetadataExt::ino(&want), "{path}");
                    kernel.unwrap_or_else(|e| panic!("{path}: {e}"));
                }
                Err(e) => {
                    assert_eq!(walked.err(), Some(*e), "walk {path}");
                    assert_eq!(kernel.err(), Some(*e), "openat2 {path}");
                }
            }
        }
        // Not following the last component opens the link itself, or refuses it without O_PATH.
        let (fd, _) = walk(rootfd.as_fd(), OsStr::new("abs"), OFlags::PATH | OFlags::NOFOLLOW, Mode::empty()).unwrap();
        assert!(is_symlink(&rustix::fs::fstat(&fd).unwrap()));
        let r = walk(rootfd.as_fd(), OsStr::new("abs"), OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty());
        assert_eq!(r.err(), Some(Errno::LOOP));
        // Creating through a link that points out is refused; through one that stays in, it lands inside.
        let create = OFlags::WRONLY | OFlags::CREATE;
        std::os::unix::fs::symlink(base.join("planted"), root.join("dangling")).unwrap();
        let r = walk(rootfd.as_fd(), OsStr::new("dangling"), create, Mode::from_raw_mode(0o644));
        assert_eq!(r.err(), Some(Errno::XDEV));
        assert!(!base.join("planted").exists());
        std::os::unix::fs::symlink("a/new", root.join("inward")).unwrap();
        walk(rootfd.as_fd(), OsStr::new("inward"), create, Mode::from_raw_mode(0o644)).unwrap();
        assert!(root.join("a/new").exists());
        std::fs::remove_dir_all(base).unwrap();
    }
}
