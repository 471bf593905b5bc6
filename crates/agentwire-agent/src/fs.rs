//! `core.fs.*`: the `FsOp` operations inside a root directory, with streamed
//! reads and writes in `FS_CHUNK_SIZE` chunks.
//!
//! Confinement is by construction, not by checking path strings. The root is
//! opened once, as a directory fd (`O_PATH | O_DIRECTORY`). Guest paths are
//! read as if the root were `/`; `..` is taken lexically first (a path whose
//! `..` climbs above the root is refused). Then every operation opens what it
//! works on relative to the root fd with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)` (see [`resolve`]), so the kernel refuses any symlink
//! that would lead out, whatever is renamed meanwhile, and acts on the fd it
//! got: `fstat`, `fchmod`, `fchown`, `futimens`, reads and writes; or on the
//! parent directory's fd and the final name: `mkdirat`, `unlinkat`,
//! `renameat`, `symlinkat`, `readlinkat`, `fchownat`/`utimensat` without
//! following. A path string checked earlier is never used again.
//!
//! Absolute symlinks are refused, not re-rooted (`RESOLVE_BENEATH`, not
//! `RESOLVE_IN_ROOT`): a guest's `/etc/x -> /usr/y` would name a different
//! file depending on whether the host or a guest process follows it, so the
//! agent serves only links that mean the same from both sides (relative ones
//! that stay inside).
//!
//! Only regular files and directories are opened: a FIFO, socket or device is
//! refused by its type (looked at through an `O_PATH` fd first, and every
//! real open carries `O_NONBLOCK | O_NOCTTY`, so nothing a guest puts in the
//! root can block a worker). Handles belong to the relay slot of the id that
//! opened them, at most [`MAX_HANDLES_PER_SLOT`] per slot and
//! [`MAX_HANDLES_PER_CONNECTION`] over all slots of a connection.
//!
//! A streamed write that ends without its reply (the host went away, or its
//! relay client left, in the middle of the chunks) is not dropped silently:
//! a warning names the file, the offset and the bytes written. When the
//! handle's own `OpenFile` created the file (it did not exist before) and no
//! write on that handle has finished yet (completed, or answered), the file
//! is removed, since nobody was ever told it exists; otherwise it is left as
//! it is, holding a partial write. A write that fails while the host is
//! there is answered with an error that says it is partial: how many bytes
//! of the stream were written, from which offset.

mod resolve;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agentwire::payload::bulk::{
    BulkAccepted, BulkCancel, BulkCancelReason, BulkFlow, BulkKind, BulkOffer, DEFAULT_BULK_WINDOW,
};
use agentwire::payload::fs::{
    FS_CHUNK_SIZE, FsData, FsEntryInfo, FsOp, FsRequest, FsResponse, FsResponseData, FsSetAttrs,
};
use agentwire::relay::client_for_id;
use agentwire::{Message, Payload, PipedData};
use agentwire_session::bulk::{BulkOperation, BulkReceiver, BulkSender, BulkViolation};
use agentwire_session::driver::Route;
use bytes::Bytes;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps, UTIME_OMIT};
use rustix::io::Errno;

use crate::{Defaults, Service, SessionTask};

/// The most handles the ids of one relay slot may hold open at once.
pub const MAX_HANDLES_PER_SLOT: usize = 1024;

/// The most handles one connection may hold open at once, over all its relay
/// slots (each handle is a file descriptor of the agent): 128 slots of 1024
/// would otherwise let one connection take 131,072 descriptors, beyond most
/// `RLIMIT_NOFILE`s, and every other connection's opens would fail.
pub const MAX_HANDLES_PER_CONNECTION: usize = 4096;

/// How deep `RemoveDir { recursive: true }` descends (one fd held per level).
const MAX_REMOVE_DEPTH: usize = 1024;

/// `core.fs.*` inside a root directory, with the open handles of one connection.
pub struct FsService(Arc<Fs>);

impl FsService {
    /// Operations confined to `root`, opened here once (an unusable root
    /// makes every operation fail with the reason).
    pub fn new(root: PathBuf) -> FsService {
        let root = root.canonicalize().unwrap_or(root);
        FsService(Arc::new(Fs::new(root)))
    }
}

impl Service for FsService {
    fn serve(&self, request: Message, route: Route, _: Arc<Defaults>) -> SessionTask {
        let fs = self.0.clone();
        Box::pin(async move {
            if let Payload::FsRequest(req) = request.payload {
                let FsRequest { op, bulk } = *req;
                run(fs, op, bulk.map(|offer| (offer, request.version)), route).await
            }
        })
    }

    fn client_left(&self, ids: Range<u32>) {
        self.0.close_opened_by(ids);
    }
}

/// What a handle is open on.
enum Handle {
    File(OpenedFile),
    Dir { dir: OwnedFd, path: String, entries: Vec<FsEntryInfo>, next: usize },
}

/// A file handle: the file, its guest path, and whether its open created it.
#[derive(Clone, Debug)]
struct OpenedFile {
    file: Arc<File>,
    path: String,
    /// Set when the `OpenFile` of this handle created the file.
    created: Option<Arc<Created>>,
}

/// A file that a handle's `OpenFile` created: it did not exist before.
#[derive(Debug)]
struct Created {
    /// The file's identity, to remove it only if its name still names it.
    dev: u64,
    ino: u64,
    /// Set once a write on the handle has finished: completed whole, or
    /// answered (the host was told what the file holds). From then on the
    /// file is the host's, and never removed by the agent.
    kept: std::sync::atomic::AtomicBool,
}

/// A handle and whom it belongs to.
struct Open {
    /// The id whose request opened it.
    opener: u32,
    /// That id's relay slot.
    slot: usize,
    handle: Handle,
}

#[derive(Default)]
struct Handles {
    open: HashMap<u64, Open>,
    per_slot: HashMap<usize, usize>,
    /// Directory entries the open directory handles hold, over the connection.
    dir_entries: usize,
}

/// Directory entries one connection's open directory handles may hold
/// between them (about 150 bytes each): 300 handles on a 20,000-entry
/// directory would otherwise hold a gigabyte.
const MAX_DIR_ENTRIES_HELD: usize = 100_000;

impl Handles {
    fn remove(&mut self, n: u64) -> Option<Open> {
        let open = self.open.remove(&n)?;
        if let Handle::Dir { entries, .. } = &open.handle {
            self.dir_entries -= entries.len();
        }
        if let Some(count) = self.per_slot.get_mut(&open.slot) {
            *count -= 1;
            if *count == 0 {
                self.per_slot.remove(&open.slot);
            }
        }
        Some(open)
    }
}

/// The root and the handles of one connection.
pub struct Fs {
    /// The root directory, or why it could not be opened.
    root: Result<OwnedFd, String>,
    handles: Mutex<Handles>,
    next_handle: AtomicU64,
    /// Bytes of file data the connection's reads may hold at once, read
    /// but not yet handed to the connection: many reads whose host does not
    /// read hold this much between them, not a chunk each.
    read_budget: Arc<tokio::sync::Semaphore>,
}

/// What all of a connection's streamed reads may hold at once.
const READ_BUDGET: usize = 16 * 1024 * 1024;

type Outcome = Result<Option<FsResponseData>, String>;

/// The relay slot of `id` (spec 10.6): id 0 and the ids above the last
/// slot's range belong to none and can use no handle.
fn slot_of(id: u32) -> Result<usize, String> {
    match client_for_id(id) {
        Some(slot) if id != 0 => Ok(slot),
        _ => Err(format!("id {id} is outside every relay slot's range: it can use no handle")),
    }
}

/// A guest path taken apart: `..` undone lexically, `.` and empty parts dropped.
struct GuestPath<'a> {
    /// As the request gave it, for messages.
    given: &'a str,
    parts: Vec<&'a str>,
}

impl<'a> GuestPath<'a> {
    fn parse(given: &'a str) -> Result<GuestPath<'a>, String> {
        let mut parts = Vec::new();
        for c in given.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        return Err(format!("{given}: refused: `..` leads outside the root"));
                    }
                }
                c => parts.push(c),
            }
        }
        Ok(GuestPath { given, parts })
    }

    /// The path beneath the root, as `a/b/c` (empty for the root).
    fn rel(&self) -> OsString {
        OsString::from(self.parts.join("/"))
    }

    /// The path beneath the root of the parent, and the final name (`None` for the root).
    fn split_last(&self) -> (OsString, Option<&'a str>) {
        match self.parts.split_last() {
            Some((last, parent)) => (OsString::from(parent.join("/")), Some(*last)),
            None => (OsString::new(), None),
        }
    }

    /// The guest path, normalized: `/a/b/c`.
    fn shown(&self) -> String {
        format!("/{}", self.parts.join("/"))
    }
}

/// `what: <why>`, with the refusals of the resolution said plainly.
fn fail(what: &str, e: Errno) -> String {
    match e {
        Errno::XDEV => format!("{what}: refused: a symlink leads outside the root"),
        Errno::LOOP => format!(
            "{what}: refused: a symlink where none may be followed, a magic link, or too many levels of symlinks"
        ),
        Errno::AGAIN => format!("{what}: refused: the path kept changing while it was resolved; try again"),
        e => format!("{what}: {}", std::io::Error::from(e)),
    }
}

fn io_fail(what: &str, e: std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => fail(what, Errno::from_raw_os_error(n)),
        None => format!("{what}: {e}"),
    }
}

fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// "a FIFO", "a socket", ...: what a file is, for messages.
fn describe(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        _ => "of an unknown type",
    }
}

/// Refuses anything but a regular file (and a directory when `dirs`).
fn served(what: &str, st: &Stat, dirs: bool) -> Result<(), String> {
    match file_type(st) {
        FileType::RegularFile => Ok(()),
        FileType::Directory if dirs => Ok(()),
        FileType::Directory => Err(format!("{what}: is a directory; only regular files are served here")),
        ft if dirs => Err(format!("{what}: is {}; only regular files and directories are served", describe(ft))),
        ft => Err(format!("{what}: is {}; only regular files are served here", describe(ft))),
    }
}

/// Flags every real open carries: nothing a guest put in the root can block
/// the worker (a FIFO without a peer) or become its terminal.
const SAFE: OFlags = OFlags::NONBLOCK.union(OFlags::NOCTTY).union(OFlags::CLOEXEC);

impl Fs {
    /// Operations confined to `root`, opened here as a directory fd.
    pub fn new(root: PathBuf) -> Fs {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let root =
            rustix::fs::open(&root, flags, Mode::empty()).map_err(|e| fail(&format!("the root {}", root.display()), e));
        Fs {
            root,
            handles: Mutex::new(Handles::default()),
            next_handle: AtomicU64::new(1),
            read_budget: Arc::new(tokio::sync::Semaphore::new(READ_BUDGET)),
        }
    }

    fn root(&self) -> Result<BorrowedFd<'_>, String> {
        self.root.as_ref().map(|fd| fd.as_fd()).map_err(Clone::clone)
    }

    /// Opens `rel` beneath the root.
    fn open(&self, what: &str, rel: &OsStr, flags: OFlags, mode: Mode) -> Result<OwnedFd, String> {
        resolve::open_beneath(self.root()?, rel, flags, mode).map_err(|e| fail(what, e))
    }

    /// The parent directory of `p` (`O_PATH`) and the final name; refuses the root itself as `doing`.
    fn parent<'a>(&self, p: &GuestPath<'a>, doing: &str) -> Result<(OwnedFd, &'a str), String> {
        let (parent, name) = p.split_last();
        let Some(name) = name else {
            return Err(format!("{}: refused: the root itself cannot be {doing}", p.given));
        };
        let fd = self.open(p.given, &parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        Ok((fd, name))
    }

    /// Opens the regular file (or, with `dirs`, directory) at `p` for I/O,
    /// following a final symlink inside the root. The type is looked at
    /// through an `O_PATH` fd first, so a FIFO or device is refused without
    /// being opened; the real open is non-blocking and looked at again.
    fn open_served(&self, p: &GuestPath<'_>, flags: OFlags, mode: Mode, dirs: bool) -> Result<(File, Stat), String> {
        self.open_served_created(p, flags, mode, dirs).map(|(file, st, _)| (file, st))
    }

    /// [`Fs::open_served`], and whether this open created the file. With
    /// `O_CREAT` and no file there, the open is tried with `O_EXCL` first, so
    /// that "created" is the kernel's word, not a guess: a file another
    /// process creates meanwhile is opened as it is, and counts as existing.
    fn open_served_created(
        &self,
        p: &GuestPath<'_>,
        flags: OFlags,
        mode: Mode,
        dirs: bool,
    ) -> Result<(File, Stat, bool), String> {
        let what = p.given;
        let mut absent = false;
        let (parent, name) = p.split_last();
        let (parent, name) = match name {
            Some(name) => (self.open(what, &parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?, name),
            None => (rustix::io::dup(self.root()?).map_err(|e| fail(what, e))?, "."),
        };
        match resolve::open_beneath(parent.as_fd(), OsStr::new(name), OFlags::PATH, Mode::empty()) {
            Ok(fd) => served(what, &rustix::fs::fstat(&fd).map_err(|e| fail(what, e))?, dirs)?,
            Err(e @ (Errno::NOENT | Errno::XDEV)) if flags.contains(OFlags::CREATE) => {
                // Creating through a link that leads nowhere (yet) would create its target: refused,
                // even where the target would be inside.
                let st = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW);
                if st.is_ok_and(|st| file_type(&st) == FileType::Symlink) {
                    return Err(format!("{what}: refused: a symlink that leads nowhere inside the root"));
                }
                if e == Errno::XDEV {
                    return Err(fail(what, e));
                }
                absent = true;
            }
            Err(e) => return Err(fail(what, e)),
        }
        let open = |flags: OFlags| {
            resolve::open_beneath(parent.as_fd(), OsStr::new(name), flags | SAFE, mode).map_err(|e| fail(what, e))
        };
        let exclusive = OFlags::CREATE | OFlags::EXCL;
        let (fd, created) = if flags.contains(exclusive) {
            (open(flags)?, true)
        } else if absent {
            match resolve::open_beneath(parent.as_fd(), OsStr::new(name), flags | exclusive | SAFE, mode) {
                Ok(fd) => (fd, true),
                Err(Errno::EXIST) => (open(flags)?, false),
                Err(e) => return Err(fail(what, e)),
            }
        } else {
            (open(flags)?, false)
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| fail(what, e))?;
        served(what, &st, dirs)?;
        Ok((File::from(fd), st, created))
    }

    /// Keeps `handle` for the slot of `id`, within the slot's limit.
    fn insert(&self, id: u32, what: &str, handle: Handle) -> Outcome {
        let slot = slot_of(id)?;
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if handles.open.len() >= MAX_HANDLES_PER_CONNECTION {
            return Err(format!(
                "{what}: refused: {MAX_HANDLES_PER_CONNECTION} handles are already open on this connection, over \
                 all its relay slots (the most one connection may hold); close some first"
            ));
        }
        if handles.per_slot.get(&slot).copied().unwrap_or(0) >= MAX_HANDLES_PER_SLOT {
            return Err(format!(
                "{what}: refused: {MAX_HANDLES_PER_SLOT} handles are already open in this relay slot (the most \
                 there may be); close some first"
            ));
        }
        let held = if let Handle::Dir { entries, .. } = &handle { entries.len() } else { 0 };
        if handles.dir_entries + held > MAX_DIR_ENTRIES_HELD {
            return Err(format!(
                "{what}: refused: its {held} entries would pass the {MAX_DIR_ENTRIES_HELD} that this connection's \
                 open directory handles may hold; close some, or use List"
            ));
        }
        *handles.per_slot.entry(slot).or_default() += 1;
        handles.dir_entries += held;
        let n = self.next_handle.fetch_add(1, Ordering::Relaxed);
        handles.open.insert(n, Open { opener: id, slot, handle });
        Ok(Some(FsResponseData::Handle(n)))
    }

    /// Runs `f` on handle `n` if the slot of `id` may use it.
    fn with_handle<T>(&self, id: u32, n: u64, f: impl FnOnce(&mut Handle) -> Result<T, String>) -> Result<T, String> {
        let slot = slot_of(id)?;
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        match handles.open.get_mut(&n) {
            Some(open) if open.slot == slot => f(&mut open.handle),
            Some(_) => Err(format!("no open handle {n} in the relay slot of id {id}")),
            None => Err(format!("no open handle {n}")),
        }
    }

    /// The file of handle `n`, its guest path and whether its open created it.
    fn file(&self, id: u32, n: u64) -> Result<OpenedFile, String> {
        self.with_handle(id, n, |h| match h {
            Handle::File(f) => Ok(f.clone()),
            Handle::Dir { path, .. } => Err(format!("handle {n} is the directory {path}")),
        })
    }

    /// Removes the file `opened` created, if its guest path still names
    /// that very file (same device and inode, not following a link). The
    /// parent is resolved beneath the root again, so this stays inside it.
    fn remove_created(&self, opened: &OpenedFile, created: &Created) -> Result<bool, String> {
        let path = &opened.path;
        let p = GuestPath::parse(path)?;
        let (parent, name) = self.parent(&p, "removed")?;
        let st = match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(fail(path, e)),
        };
        #[allow(clippy::unnecessary_cast)] // the field types differ between architectures
        let named = (st.st_dev as u64, st.st_ino as u64);
        if named != (created.dev, created.ino) {
            return Ok(false);
        }
        rustix::fs::unlinkat(&parent, name, AtFlags::empty()).map_err(|e| fail(path, e))?;
        Ok(true)
    }

    /// Closes every handle opened by an id in `ids` (a relay client left).
    fn close_opened_by(&self, ids: Range<u32>) {
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<u64> = handles.open.iter().filter(|(_, o)| ids.contains(&o.opener)).map(|(n, _)| *n).collect();
        for n in gone {
            handles.remove(n);
        }
    }

    /// Every operation that is one request and one response, for a request on `id`.
    fn operate(&self, op: FsOp, id: u32) -> Outcome {
        match op {
            FsOp::RealPath { path } => {
                let p = GuestPath::parse(&path)?;
                let (_, names) =
                    resolve::walk(self.root()?, &p.rel(), OFlags::PATH, Mode::empty()).map_err(|e| fail(&path, e))?;
                let names: Vec<_> = names.iter().map(|n| n.to_string_lossy()).collect();
                Ok(Some(FsResponseData::Path(format!("/{}", names.join("/")))))
            }
            FsOp::Stat { path, follow_symlink } => {
                let p = GuestPath::parse(&path)?;
                let st = if follow_symlink {
                    let fd = self.open(&path, &p.rel(), OFlags::PATH, Mode::empty())?;
                    rustix::fs::fstat(&fd)
                } else {
                    match p.split_last() {
                        (_, None) => rustix::fs::fstat(self.root()?),
                        (_, Some(_)) => {
                            let (parent, name) = self.parent(&p, "")?;
                            rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)
                        }
                    }
                };
                Ok(Some(FsResponseData::Stat(entry(p.shown(), &st.map_err(|e| fail(&path, e))?))))
            }
            FsOp::SetStat { path, follow_symlink, attrs } => {
                let p = GuestPath::parse(&path)?;
                let access = if attrs.size.is_some() { OFlags::WRONLY } else { OFlags::RDONLY };
                if follow_symlink || p.parts.is_empty() {
                    let (file, _) = self.open_served(&p, access, Mode::empty(), true)?;
                    return set_attrs(&file, &attrs).map(|_| None).map_err(|e| io_fail(&path, e));
                }
                let (parent, name) = self.parent(&p, "changed")?;
                let st = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fail(&path, e))?;
                if file_type(&st) == FileType::Symlink {
                    // The link itself, as lstat sees it: never its target.
                    set_link_attrs(parent.as_fd(), name, &attrs).map_err(|e| io_fail(&path, e))?;
                } else {
                    let flags = access | OFlags::NOFOLLOW | SAFE;
                    let fd = rustix::fs::openat(&parent, name, flags, Mode::empty()).map_err(|e| fail(&path, e))?;
                    served(&path, &rustix::fs::fstat(&fd).map_err(|e| fail(&path, e))?, true)?;
                    set_attrs(&File::from(fd), &attrs).map_err(|e| io_fail(&path, e))?;
                }
                Ok(None)
            }
            FsOp::List { path } => {
                let p = GuestPath::parse(&path)?;
                let dir = self.open(&path, &p.rel(), OFlags::RDONLY | OFlags::DIRECTORY | SAFE, Mode::empty())?;
                Ok(Some(FsResponseData::List(list(&dir, &p.shown()).map_err(|e| fail(&path, e))?)))
            }
            FsOp::ReadLink { path } => {
                let p = GuestPath::parse(&path)?;
                let (parent, name) = self.parent(&p, "read as a link")?;
                let target = rustix::fs::readlinkat(&parent, name, Vec::new()).map_err(|e| fail(&path, e))?;
                Ok(Some(FsResponseData::Path(target.to_string_lossy().into_owned())))
            }
            FsOp::Symlink { target, link_path, .. } => {
                let p = GuestPath::parse(&link_path)?;
                let (parent, name) = self.parent(&p, "replaced by a link")?;
                rustix::fs::symlinkat(target.as_str(), &parent, name).map_err(|e| fail(&link_path, e))?;
                Ok(None)
            }
            FsOp::Mkdir { path, mode, .. } => {
                let p = GuestPath::parse(&path)?;
                let (parent, name) = self.parent(&p, "created")?;
                let mode = Mode::from_raw_mode(mode.unwrap_or(0o755));
                rustix::fs::mkdirat(&parent, name, mode).map_err(|e| fail(&path, e))?;
                Ok(None)
            }
            FsOp::Remove { path } => {
                let p = GuestPath::parse(&path)?;
                let (parent, name) = self.parent(&p, "removed")?;
                rustix::fs::unlinkat(&parent, name, AtFlags::empty()).map_err(|e| fail(&path, e))?;
                Ok(None)
            }
            FsOp::RemoveDir { path, recursive } => {
                let p = GuestPath::parse(&path)?;
                let (parent, name) = self.parent(&p, "removed")?;
                if recursive {
                    remove_tree(&parent, name, &path)?;
                } else {
                    rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR).map_err(|e| fail(&path, e))?;
                }
                Ok(None)
            }
            FsOp::Copy { src, dst } => {
                self.copy(&GuestPath::parse(&src)?, &GuestPath::parse(&dst)?)?;
                Ok(None)
            }
            FsOp::Rename { src, dst } => {
                let (s, d) = (GuestPath::parse(&src)?, GuestPath::parse(&dst)?);
                let (sparent, sname) = self.parent(&s, "renamed")?;
                let (dparent, dname) = self.parent(&d, "replaced")?;
                rustix::fs::renameat(&sparent, sname, &dparent, dname).map_err(|e| fail(&src, e))?;
                Ok(None)
            }
            FsOp::OpenFile { path, options: o } => {
                let p = GuestPath::parse(&path)?;
                let flags = open_flags(&path, o.read, o.write, o.append, o.create, o.truncate, o.create_new)?;
                let mode = Mode::from_raw_mode(o.mode.unwrap_or(0o644));
                let (file, st, created) = self.open_served_created(&p, flags, mode, true)?;
                #[allow(clippy::unnecessary_cast)] // the field types differ between architectures
                let created = created.then(|| {
                    let (dev, ino) = (st.st_dev as u64, st.st_ino as u64);
                    Arc::new(Created { dev, ino, kept: Default::default() })
                });
                let opened = OpenedFile { file: Arc::new(file), path: p.shown(), created };
                self.insert(id, &path, Handle::File(opened))
            }
            FsOp::OpenDir { path } => {
                let p = GuestPath::parse(&path)?;
                let dir = self.open(&path, &p.rel(), OFlags::RDONLY | OFlags::DIRECTORY | SAFE, Mode::empty())?;
                let entries = list(&dir, &p.shown()).map_err(|e| fail(&path, e))?;
                self.insert(id, &path, Handle::Dir { dir, path: p.shown(), entries, next: 0 })
            }
            FsOp::CloseHandle { handle } => {
                self.with_handle(id, handle, |_| Ok(()))?;
                let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
                handles.remove(handle).map(|_| None).ok_or_else(|| format!("no open handle {handle}"))
            }
            FsOp::ReadDir { handle, limit } => self.with_handle(id, handle, |h| {
                let Handle::Dir { entries, next, .. } = h else {
                    return Err(format!("handle {handle} is not a directory"));
                };
                let n = limit.map_or(usize::MAX, |l| l as usize).min(entries.len() - *next);
                let batch = entries[*next..*next + n].to_vec();
                *next += n;
                Ok(Some(FsResponseData::List(batch)))
            }),
            FsOp::FStat { handle } => self.with_handle(id, handle, |h| {
                let (path, st) = match h {
                    Handle::File(f) => (String::new(), rustix::fs::fstat(&*f.file)),
                    Handle::Dir { dir, path, .. } => (path.clone(), rustix::fs::fstat(&*dir)),
                };
                Ok(Some(FsResponseData::Stat(entry(path, &st.map_err(|e| fail("fstat", e))?))))
            }),
            FsOp::FSetStat { handle, attrs } => {
                let f = self.file(id, handle)?;
                set_attrs(&f.file, &attrs).map_err(|e| io_fail(&f.path, e))?;
                Ok(None)
            }
            FsOp::Read { .. } | FsOp::Write { .. } => Err("a streamed operation reached the wrong path".into()),
            other => Err(format!("{other:?}: not an operation this agent knows")),
        }
    }

    /// Copies the regular file `src` to `dst` (created or truncated, with
    /// `src`'s permission bits), both opened by fd; a file onto itself is refused.
    fn copy(&self, src: &GuestPath<'_>, dst: &GuestPath<'_>) -> Result<(), String> {
        let (from, st) = self.open_served(src, OFlags::RDONLY, Mode::empty(), false)?;
        let mode = Mode::from_raw_mode(st.st_mode & 0o7777);
        let (to, dst_st) = self.open_served(dst, OFlags::WRONLY | OFlags::CREATE, mode, false)?;
        if (st.st_dev, st.st_ino) == (dst_st.st_dev, dst_st.st_ino) {
            return Err(format!("{}: refused: it is the same file as {}", dst.given, src.given));
        }
        to.set_len(0).map_err(|e| io_fail(dst.given, e))?;
        std::io::copy(&mut &from, &mut &to).map_err(|e| io_fail(&format!("copy {} to {}", src.given, dst.given), e))?;
        rustix::fs::fchmod(&to, mode).map_err(|e| fail(dst.given, e))?;
        Ok(())
    }
}

/// The `open(2)` flags of `FsOpenOptions`, refused where `std::fs::OpenOptions` would refuse them.
fn open_flags(
    path: &str,
    read: bool,
    write: bool,
    append: bool,
    create: bool,
    truncate: bool,
    create_new: bool,
) -> Result<OFlags, String> {
    let refuse = |why: &str| Err(format!("{path}: refused: {why}"));
    let mut flags = match (read, write || append) {
        (true, false) => OFlags::RDONLY,
        (false, true) => OFlags::WRONLY,
        (true, true) => OFlags::RDWR,
        (false, false) => return refuse("opened for neither reading nor writing"),
    };
    if append {
        flags |= OFlags::APPEND;
    }
    if !(write || append) && (create || truncate || create_new) {
        return refuse("creating or truncating needs write access");
    }
    if append && truncate && !create_new {
        return refuse("append and truncate together");
    }
    if create_new {
        flags |= OFlags::CREATE | OFlags::EXCL;
    } else {
        if create {
            flags |= OFlags::CREATE;
        }
        if truncate {
            flags |= OFlags::TRUNC;
        }
    }
    Ok(flags)
}

/// Removes `name` in `parent` with everything under it, by fds: each
/// directory is opened with `O_NOFOLLOW | O_DIRECTORY` relative to its
/// parent's fd and its entries unlinked relative to its own, so a symlink is
/// removed, never followed, and a directory swapped for a link meanwhile
/// fails the open. `name` itself being a symlink removes the link.
fn remove_tree(parent: &OwnedFd, name: &str, what: &str) -> Result<(), String> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | SAFE;
    match rustix::fs::openat(parent, name, flags, Mode::empty()) {
        Ok(dir) => {
            remove_contents(&dir, 0).map_err(|e| match e {
                Errno::MLINK => format!("{what}: refused: more than {MAX_REMOVE_DEPTH} levels of directories"),
                e => fail(what, e),
            })?;
            drop(dir);
            rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR).map_err(|e| fail(what, e))
        }
        Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
            let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fail(what, e))?;
            if file_type(&st) != FileType::Symlink {
                return Err(fail(what, e));
            }
            rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(|e| fail(what, e))
        }
        Err(e) => Err(fail(what, e)),
    }
}

/// Empties the directory `dir` (see [`remove_tree`]); `EMLINK` when deeper than allowed.
fn remove_contents(dir: &OwnedFd, depth: usize) -> Result<(), Errno> {
    if depth >= MAX_REMOVE_DEPTH {
        return Err(Errno::MLINK);
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | SAFE;
    loop {
        let names = names(dir)?;
        if names.is_empty() {
            return Ok(());
        }
        for name in &names {
            match rustix::fs::openat(dir, name, flags, Mode::empty()) {
                Ok(sub) => {
                    remove_contents(&sub, depth + 1)?;
                    drop(sub);
                    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
                        Ok(()) | Err(Errno::NOENT) => {}
                        Err(e) => return Err(e),
                    }
                }
                // Not a directory (or a symlink): the entry itself goes.
                Err(Errno::LOOP | Errno::NOTDIR) => match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(e),
                },
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The names in the directory `dir`, without `.` and `..`.
fn names(dir: &OwnedFd) -> Result<Vec<OsString>, Errno> {
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let name = OsStr::from_bytes(e.file_name().to_bytes());
        if name != "." && name != ".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// A directory's entries (not following links), sorted by name; `dir_path`
/// is the directory's guest path.
fn list(dir: &OwnedFd, dir_path: &str) -> Result<Vec<FsEntryInfo>, Errno> {
    let mut entries = Vec::new();
    for name in names(dir)? {
        let st = match rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Removed since it was listed.
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e),
        };
        let path = format!("{}/{}", dir_path.trim_end_matches('/'), name.to_string_lossy());
        entries.push(entry(path, &st));
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

fn entry(path: String, st: &Stat) -> FsEntryInfo {
    let kind = match file_type(st) {
        FileType::Symlink => "symlink",
        FileType::Directory => "dir",
        FileType::RegularFile => "file",
        _ => "other",
    };
    #[allow(clippy::unnecessary_cast)] // the field types differ between architectures
    FsEntryInfo {
        path,
        kind: kind.into(),
        size: st.st_size as u64,
        mode: st.st_mode as u32,
        modified: Some(st.st_mtime as i64),
        uid: st.st_uid,
        gid: st.st_gid,
        atime: Some(st.st_atime as i64),
        mtime: Some(st.st_mtime as i64),
    }
}

/// Applies what is set in `attrs`; times are seconds since the epoch.
fn set_attrs(file: &File, attrs: &FsSetAttrs) -> std::io::Result<()> {
    if let Some(mode) = attrs.mode {
        rustix::fs::fchmod(file, Mode::from_raw_mode(mode))?;
    }
    if attrs.uid.is_some() || attrs.gid.is_some() {
        std::os::unix::fs::fchown(file, attrs.uid, attrs.gid)?;
    }
    if let Some(size) = attrs.size {
        file.set_len(size)?;
    }
    // Any i64 may arrive; a time the system cannot represent is an error, not a panic.
    let at = |secs: i64| {
        let d = Duration::from_secs(secs.unsigned_abs());
        let t = if secs >= 0 { SystemTime::UNIX_EPOCH.checked_add(d) } else { SystemTime::UNIX_EPOCH.checked_sub(d) };
        t.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("time {secs} is out of range")))
    };
    let mut times = std::fs::FileTimes::new();
    if let Some(a) = attrs.atime {
        times = times.set_accessed(at(a)?);
    }
    if let Some(m) = attrs.mtime {
        times = times.set_modified(at(m)?);
    }
    if attrs.atime.is_some() || attrs.mtime.is_some() {
        file.set_times(times)?;
    }
    Ok(())
}

/// Applies `attrs` to the symlink `name` in `parent` itself. Linux can change
/// a link's owner and times, not its mode (there is no lchmod) or its size: a
/// request for either is refused whole, before anything is changed.
fn set_link_attrs(parent: BorrowedFd<'_>, name: &str, attrs: &FsSetAttrs) -> std::io::Result<()> {
    let refuse = |what: &str| {
        let message = format!("a symlink's own {what} cannot be set (follow_symlink: true sets its target's)");
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, message))
    };
    if attrs.mode.is_some() {
        return refuse("mode");
    }
    if attrs.size.is_some() {
        return refuse("size");
    }
    if attrs.uid.is_some() || attrs.gid.is_some() {
        // u32::MAX is chown's "leave as it is", as with lchown(2).
        let uid = attrs.uid.map(rustix::fs::Uid::from_raw_unchecked);
        let gid = attrs.gid.map(rustix::fs::Gid::from_raw_unchecked);
        rustix::fs::chownat(parent, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)?;
    }
    if attrs.atime.is_some() || attrs.mtime.is_some() {
        let spec = |t: Option<i64>| match t {
            Some(secs) => Timespec { tv_sec: secs as _, tv_nsec: 0 },
            None => Timespec { tv_sec: 0, tv_nsec: UTIME_OMIT },
        };
        let times = Timestamps { last_access: spec(attrs.atime), last_modification: spec(attrs.mtime) };
        rustix::fs::utimensat(parent, name, &times, AtFlags::SYMLINK_NOFOLLOW)?;
    }
    Ok(())
}

/// Runs one `core.fs.request` to its `core.fs.response`. A bulk offer (with
/// the request's `v`) moves a `Read`'s or `Write`'s data as raw records
/// (spec 7); it is refused on any other operation and below generation 8.
async fn run(fs: Arc<Fs>, op: FsOp, offer: Option<(BulkOffer, u8)>, mut route: Route) {
    let id = route.id();
    let bulk = match (&op, offer) {
        (_, None) => None,
        (_, Some((_, v))) if v < 8 => {
            let why = format!("a bulk offer needs generation 8; the request is generation {v}");
            return drop(route.send(FsResponse::failure(why)).await);
        }
        (FsOp::Read { .. }, Some((offer, _))) => Some(BulkOperation::FileRead.accept(&offer)),
        (FsOp::Write { .. }, Some((offer, _))) => Some(BulkOperation::FileWrite.accept(&offer)),
        (_, Some(_)) => {
            let why = "a bulk offer is only for Read and Write".to_string();
            return drop(route.send(FsResponse::failure(why)).await);
        }
    };
    let bulk = match bulk.transpose() {
        Ok(accepted) => accepted,
        // The deployed agent leaves an invalid offer unanswered; say why instead.
        Err(why) => return drop(route.send(FsResponse::failure(why)).await),
    };
    let outcome = match op {
        FsOp::Read { handle, offset, len } => match bulk {
            Some(accepted) => read_bulk(&fs, handle, offset, len, accepted, &mut route).await,
            None => read(&fs, id, handle, offset, len, &route).await,
        },
        FsOp::Write { handle, offset, len } => return write(fs, handle, offset, len, bulk, route).await,
        op => {
            let fs = fs.clone();
            tokio::task::spawn_blocking(move || fs.operate(op, id)).await.unwrap_or_else(|e| Err(e.to_string()))
        }
    };
    let _ = route.send(response(outcome)).await;
}

fn response(outcome: Outcome) -> FsResponse {
    match outcome {
        Ok(data) => FsResponse::success(data),
        Err(message) => FsResponse::failure(message),
    }
}

/// A streamed read: `core.fs.data` chunks of at most `FS_CHUNK_SIZE`, then the response.
async fn read(fs: &Fs, id: u32, handle: u64, offset: u64, len: Option<u64>, out: &Route) -> Outcome {
    let OpenedFile { file, path, .. } = fs.file(id, handle)?;
    let end = len.map_or(u64::MAX, |l| offset.saturating_add(l));
    let mut at = offset;
    let mut spare = None;
    while at < end {
        // Sized by what is left and the chunk limit, never by a length the request only claims.
        let want = (end - at).min(FS_CHUNK_SIZE as u64) as usize;
        let (chunk, permit) = read_chunk(fs, &file, &path, want, at, &mut spare).await?;
        if chunk.is_empty() {
            break;
        }
        at += chunk.len() as u64;
        let short = chunk.len() < want;
        out.send(FsData { data: chunk }).await.map_err(|_| "connection closed")?;
        drop(permit);
        if short {
            break;
        }
    }
    Ok(None)
}

/// A streamed read over raw records (spec 7.4): `core.bulk.accepted`, records
/// within the host's credit, `core.bulk.finish`, then the response. Records
/// are read from the file only as credit allows, so the agent holds at most
/// one record's data for the read.
async fn read_bulk(
    fs: &Fs,
    handle: u64,
    offset: u64,
    len: Option<u64>,
    accepted: BulkAccepted,
    route: &mut Route,
) -> Outcome {
    let OpenedFile { file, path, .. } = fs.file(route.id(), handle)?;
    route.send(accepted).await.map_err(|_| "connection closed")?;
    let (kind, flow) = (BulkKind::Filesystem, BulkFlow::GuestToHost);
    let mut tx = BulkSender::new(kind, flow, accepted.max_record_payload, accepted.guest_to_host_credit_limit);
    let end = len.map_or(u64::MAX, |l| offset.saturating_add(l));
    let mut at = offset;
    let mut spare = None;
    // Records go from the file to the transport by `splice` where the
    // connection can (until the file refuses it), read into memory otherwise.
    let mut piped = route.handle().splices();
    while at < end {
        // What the host said meanwhile: credit, or a cancel. Without credit, wait for it.
        loop {
            let waiting = tx.window() == 0;
            let message = if waiting { route.recv().await } else { route.try_recv() };
            let Some(message) = message else {
                if waiting {
                    return Err("connection closed".into());
                }
                break;
            };
            match message.payload {
                Payload::BulkCredit(c) => {
                    if let Err(v) = tx.credit(&c) {
                        return Err(violation(route, v).await);
                    }
                }
                Payload::BulkCancel(c) => return Err(c.message),
                _ => {}
            }
        }
        let want = (end - at).min(tx.window() as u64) as usize;
        // A small window (a host crediting a little at a time) is read into memory.
        if piped && want >= crate::piped::MIN_PIPED {
            let splice = move |f: &File| splice_at_most(f, want, at);
            let (filled, permit) = read_in_budget(fs, &file, (&path, want, at), splice).await?;
            match filled {
                Some(Filled { data: None, .. }) => break,
                Some(Filled { data: Some(data), end_of_file }) => {
                    at += data.len() as u64;
                    let record = tx.piped_record(data).map_err(|v| v.to_string())?;
                    route.send_piped(record).await.map_err(|_| "connection closed")?;
                    drop(permit);
                    if end_of_file {
                        break;
                    }
                    continue;
                }
                None => piped = false,
            }
        }
        let (chunk, permit) = read_chunk(fs, &file, &path, want, at, &mut spare).await?;
        if chunk.is_empty() {
            break;
        }
        at += chunk.len() as u64;
        let short = chunk.len() < want;
        let record = tx.record(chunk).map_err(|v| v.to_string())?;
        route.send(record).await.map_err(|_| "connection closed")?;
        drop(permit);
        if short {
            break;
        }
    }
    route.send(tx.finish()).await.map_err(|_| "connection closed")?;
    Ok(None)
}

/// The peer broke a bulk rule: `core.bulk.cancel` (protocol violation) goes
/// out, and the reason becomes the failed response that follows it.
pub(crate) async fn violation(route: &Route, v: BulkViolation) -> String {
    let message = v.to_string();
    let cancel = BulkCancel { kind: v.kind, reason: BulkCancelReason::ProtocolViolation, message: message.clone() };
    let _ = route.send(cancel).await;
    message
}

/// Reads up to `want` bytes at `at`, once the connection's read budget has
/// room for them; the budget's share comes back when the permit is dropped
/// (after the connection has taken the chunk).
///
/// `spare` is the previous chunk of the same read: once the connection has
/// written and dropped it, its allocation takes this chunk (no new memory to
/// fault in); otherwise it is let go and a new one is made. It then becomes
/// this chunk, so a read keeps at most one chunk beyond what is in flight.
async fn read_chunk<'a>(
    fs: &'a Fs,
    file: &Arc<File>,
    path: &str,
    want: usize,
    at: u64,
    spare: &mut Option<Bytes>,
) -> Result<(Bytes, tokio::sync::SemaphorePermit<'a>), String> {
    let reuse = spare.take().and_then(|b| b.try_into_mut().ok()).map(Vec::from).filter(|v| v.capacity() >= want);
    let (chunk, permit) =
        read_in_budget(fs, file, (path, want, at), move |f: &File| read_at_most(f, want, at, reuse)).await?;
    *spare = Some(chunk.clone());
    Ok((chunk, permit))
}

/// Runs `read` of up to `want` bytes at `at` of `file` on a blocking thread
/// once the connection's read budget has room for them: what it read, and
/// the permit that gives the budget's share back when dropped. An error
/// names the path and the offset.
async fn read_in_budget<'a, T: Send + 'static>(
    fs: &'a Fs,
    file: &Arc<File>,
    (path, want, at): (&str, usize, u64),
    read: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
) -> Result<(T, tokio::sync::SemaphorePermit<'a>), String> {
    let permit = fs.read_budget.acquire_many(want as u32).await.map_err(|e| e.to_string())?;
    let f = file.clone();
    let got = tokio::task::spawn_blocking(move || read(&f))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{path}: read at {at}: {e}"))?;
    Ok((got, permit))
}

/// Reads up to `want` bytes at `at` into `reuse` (emptied; a fresh buffer
/// without it), never zeroed first: the file's bytes land in the allocation
/// that goes out as the frame's data (the record or chunk is a view of it,
/// written from where it is), so a chunk costs one copy, the kernel's.
fn read_at_most(file: &File, want: usize, at: u64, reuse: Option<Vec<u8>>) -> std::io::Result<Bytes> {
    let mut buf = match reuse {
        Some(mut v) => {
            v.clear();
            // `pread` fills all the spare room it is given: no more than the
            // chunk (shrinking an empty buffer moves nothing).
            v.shrink_to(want);
            v
        }
        None => Vec::with_capacity(want),
    };
    while buf.len() < want {
        let from = at + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), from) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Bytes::from(buf))
}

/// What [`splice_at_most`] put in a pipe.
struct Filled {
    /// The bytes, `None` at the end of the file.
    data: Option<PipedData>,
    /// The file ended before `want` bytes.
    end_of_file: bool,
}

/// Fills a new pipe with up to `want` bytes of `file` at `at` by `splice`:
/// the file's pages are referenced, not copied (so a write to the file before
/// they reach the transport can show in them, as in a read racing a write).
/// Fewer when the pipe holds less (its size is raised to `want` where the
/// system allows). `None` when the file does not splice (`EINVAL`) or no
/// pipe can be made: read it.
fn splice_at_most(file: &File, want: usize, at: u64) -> std::io::Result<Option<Filled>> {
    use rustix::pipe::{SpliceFlags, splice};
    // Out of descriptors (or pipe memory), the read goes on through memory.
    let Ok((read_end, write_end, room)) = crate::piped::pipe_for(want) else {
        return Ok(None);
    };
    let want = want.min(room);
    let (mut got, mut from) = (0, at);
    let end_of_file = loop {
        if got == want {
            break false;
        }
        match splice(file, Some(&mut from), &write_end, None, want - got, SpliceFlags::NONBLOCK) {
            Ok(0) => break true,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            // The pipe is full (pages that start mid-page take more room).
            Err(rustix::io::Errno::AGAIN) if got > 0 => break false,
            Err(rustix::io::Errno::INVAL) if got == 0 => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    };
    let data = (got > 0).then(|| PipedData::new(read_end, got));
    Ok(Some(Filled { data, end_of_file }))
}

/// A streamed write: chunks until the empty one, then the response. On an
/// error the rest of the chunks are still taken, so that the session ends
/// with one response and no stray frames; the error says how much of the
/// stream was written, and where. When the host goes away first, the
/// [`Abandoned`] guard says so in the log (and removes a file the handle's
/// open created, if no write on it had finished).
async fn write(
    fs: Arc<Fs>,
    handle: u64,
    offset: u64,
    len: Option<u64>,
    accepted: Option<BulkAccepted>,
    mut route: Route,
) {
    let id = route.id();
    let (mut outcome, mut guard): (Outcome, _) = match fs.file(id, handle) {
        Ok(opened) => {
            (Ok(None), Some(Abandoned { fs: fs.clone(), opened, offset, progress: Default::default(), done: false }))
        }
        Err(e) => (Err(e), None),
    };
    // With a bulk offer accepted, records replace `core.fs.data` (spec 7.4):
    // the acceptance goes first, and credit follows what reaches the file.
    let mut bulk = match (accepted, &outcome) {
        (Some(accepted), Ok(_)) => {
            if route.send(accepted).await.is_err() {
                return;
            }
            let (kind, flow) = (BulkKind::Filesystem, BulkFlow::HostToGuest);
            let limit = accepted.host_to_guest_credit_limit;
            Some(BulkReceiver::new(kind, flow, accepted.max_record_payload, limit, DEFAULT_BULK_WINDOW))
        }
        (Some(_), Err(e)) => return drop(route.send(FsResponse::failure(e.clone())).await),
        (None, _) => None,
    };
    let mut at = offset;
    loop {
        let Some(message) = route.recv().await else {
            // The guard, dropped here, says what is left behind.
            return;
        };
        let data = match (message.payload, &mut bulk) {
            (Payload::FsData(d), None) if d.data.is_empty() => break,
            (Payload::FsData(d), None) => d.data,
            (Payload::BulkRecord(r), Some(rx)) => match rx.record(&r) {
                Ok(()) => r.data,
                Err(v) => {
                    outcome = Err(violation(&route, v).await);
                    break;
                }
            },
            (Payload::BulkFinish(f), Some(rx)) => match rx.finish(&f) {
                Ok(_) => break,
                Err(v) => {
                    outcome = Err(violation(&route, v).await);
                    break;
                }
            },
            (Payload::BulkCancel(c), Some(_)) => {
                outcome = Err(c.message);
                break;
            }
            (Payload::FsData(_), Some(_)) => {
                let (kind, flow) = (BulkKind::Filesystem, BulkFlow::HostToGuest);
                let reason = "core.fs.data on a write whose data goes as bulk records".to_string();
                outcome = Err(violation(&route, BulkViolation { kind, flow, reason }).await);
                break;
            }
            _ => continue,
        };
        if let (Ok(_), Some(g)) = (&outcome, &mut guard) {
            let (f, n, progress) = (g.opened.file.clone(), data.len() as u64, g.progress.clone());
            progress.writing.store(n, Ordering::Relaxed);
            // Counted by the thread that writes, so that a task aborted while
            // it waits (the host went away) still knows what reached the file.
            let written = tokio::task::spawn_blocking(move || {
                let written = f.write_all_at(&data, at);
                if written.is_ok() {
                    progress.written.fetch_add(n, Ordering::Relaxed);
                }
                progress.writing.store(0, Ordering::Relaxed);
                written
            })
            .await;
            // A chunk that fails part-way is not counted: some of it may be on disk.
            let failed = match written {
                Ok(Ok(())) => {
                    at += n;
                    if let Some(credit) = bulk.as_mut().and_then(|rx| rx.consumed(n as usize))
                        && route.send(credit).await.is_err()
                    {
                        return;
                    }
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            outcome = Err(format!(
                "{}: write at {at}: {failed}; the file holds a partial write: {} bytes of this stream were \
                 written, at offsets {offset}..{at}; from offset {at} on, not (or not completely)",
                g.opened.path,
                at - offset
            ));
            if bulk.is_some() {
                // Records stop here: the host is told at once rather than sending the rest.
                let message = outcome.clone().err().unwrap_or_default();
                let cancel =
                    BulkCancel { kind: BulkKind::Filesystem, reason: BulkCancelReason::DestinationIo, message };
                let _ = route.send(cancel).await;
                break;
            }
        }
    }
    let written = at - offset;
    let outcome = match (outcome, len) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(len)) if len != written => Err(format!(
            "the request announced {len} bytes but {written} came; the file holds a partial write: those {written} \
             bytes, at offsets {offset}..{at}"
        )),
        (Ok(_), _) => Ok(None),
    };
    // Whole, the file is not partial, whether or not the reply gets out.
    if outcome.is_ok()
        && let Some(g) = &mut guard
    {
        g.finished();
    }
    if route.send(response(outcome)).await.is_ok()
        && let Some(g) = &mut guard
    {
        // Answered: the host knows what the file holds.
        g.finished();
    }
}

/// A streamed write in progress. Dropped before its response went out (the
/// task returns or is aborted when the host goes away), it logs a warning
/// naming the file, the offset and the bytes written, and removes the file
/// if this handle's open created it and no write on the handle had finished.
struct Abandoned {
    fs: Arc<Fs>,
    opened: OpenedFile,
    /// Where the stream started.
    offset: u64,
    progress: Arc<Progress>,
    /// The write completed, or its response went out: nothing to say.
    done: bool,
}

impl Abandoned {
    /// The write completed, or its outcome was answered: the file is the host's.
    fn finished(&mut self) {
        if let Some(c) = &self.opened.created {
            c.kept.store(true, Ordering::Relaxed);
        }
        self.done = true;
    }
}

/// How far a streamed write got, kept by the threads that write.
#[derive(Default)]
struct Progress {
    /// Bytes written, from the stream's offset on.
    written: AtomicU64,
    /// Bytes of the chunk being written (its thread finishes it regardless).
    writing: AtomicU64,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (path, offset) = (&self.opened.path, self.offset);
        let written = self.progress.written.load(Ordering::Relaxed);
        let writing = match self.progress.writing.load(Ordering::Relaxed) {
            0 => String::new(),
            n => format!(" (and a chunk of {n} bytes was being written)"),
        };
        let fate = match &self.opened.created {
            Some(c) if !c.kept.load(Ordering::Relaxed) => match self.fs.remove_created(&self.opened, c) {
                Ok(true) => "its open had created the file and no write on it had finished: the file is removed".into(),
                Ok(false) => {
                    "its open had created the file, but the name no longer names it: nothing is removed".into()
                }
                Err(e) => format!("the file its open created could not be removed ({e}): it holds a partial write"),
            },
            _ => "the file is left holding a partial write".to_string(),
        };
        tracing::warn!(
            "core.fs write to {path} abandoned: the host went away (connection closed or relay client left) after \
             {written} bytes written at offsets {offset}..{}{writing}; {fate}",
            offset + written
        );
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_time_a_peer_sends_is_applied_or_refused_without_a_panic() {
        use std::os::unix::fs::MetadataExt;
        let path = std::env::temp_dir().join(format!("agentwire-setattrs-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path).unwrap();
        for secs in [i64::MIN, -3_921_912_991_414_465_781, i64::MAX] {
            let attrs = FsSetAttrs { atime: Some(secs), mtime: Some(secs), ..FsSetAttrs::default() };
            // Filesystems clamp what they cannot store; the point is that nothing panics.
            let _ = set_attrs(&file, &attrs);
        }
        let fine = FsSetAttrs { atime: Some(1_700_000_000), mtime: Some(-86_400), ..FsSetAttrs::default() };
        set_attrs(&file, &fine).unwrap();
        assert_eq!(file.metadata().unwrap().mtime(), -86_400);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn dot_dot_is_taken_lexically_and_never_climbs_above_the_root() {
        let p = GuestPath::parse("/a/./b/../c//").unwrap();
        assert_eq!((p.shown(), p.rel()), ("/a/c".to_string(), OsString::from("a/c")));
        assert_eq!(GuestPath::parse("sub/../x").unwrap().shown(), "/x");
        assert_eq!(GuestPath::parse("/").unwrap().split_last(), (OsString::new(), None));
        for bad in ["..", "/../x", "/a/../../x", "a/b/../../../x"] {
            let e = GuestPath::parse(bad).err().unwrap();
            assert!(e.starts_with(bad) && e.contains("outside the root"), "{bad}: {e}");
        }
    }

    #[test]
    fn an_abandoned_write_removes_only_a_file_its_own_open_created_and_nobody_was_told_of() {
        let dir = std::env::temp_dir().join(format!("agentwire-abandoned-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("existing"), "before").unwrap();
        let fs = Arc::new(Fs::new(dir.clone()));
        let id = 1;
        let open = |path: &str| {
            let options = agentwire::payload::fs::FsOpenOptions { write: true, create: true, ..Default::default() };
            match fs.operate(FsOp::OpenFile { path: path.into(), options }, id) {
                Ok(Some(FsResponseData::Handle(h))) => fs.file(id, h).unwrap(),
                other => panic!("{other:?}"),
            }
        };
        let abandon = |opened: OpenedFile| {
            let progress = Arc::new(Progress::default());
            progress.written.store(3, Ordering::Relaxed);
            drop(Abandoned { fs: fs.clone(), opened, offset: 0, progress, done: false });
        };
        let created = open("/created");
        assert!(created.created.is_some() && dir.join("created").exists());
        abandon(created);
        assert!(!dir.join("created").exists(), "a file its open created stays");
        let existing = open("/existing");
        assert!(existing.created.is_none());
        abandon(existing);
        assert_eq!(std::fs::read(dir.join("existing")).unwrap(), b"before");
        // Created, but a write on it was answered: the host knows it.
        let answered = open("/answered");
        answered.created.as_ref().unwrap().kept.store(true, Ordering::Relaxed);
        abandon(answered);
        assert!(dir.join("answered").exists());
        // Created, then replaced by another file of the same name: that one is not removed.
        let replaced = open("/replaced");
        std::fs::remove_file(dir.join("replaced")).unwrap();
        std::fs::write(dir.join("replaced"), "someone else's").unwrap();
        abandon(replaced);
        assert_eq!(std::fs::read(dir.join("replaced")).unwrap(), b"someone else's");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn handles_belong_to_the_slot_that_opened_them_and_leave_with_its_client() {
        use agentwire::relay::AGENT_RELAY_ID_RANGE_STEP as STEP;
        let dir = std::env::temp_dir().join(format!("agentwire-handles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), "x").unwrap();
        let fs = Fs::new(dir.clone());
        let open = |id| {
            let options = agentwire::payload::fs::FsOpenOptions { read: true, ..Default::default() };
            match fs.operate(FsOp::OpenFile { path: "/f".into(), options }, id) {
                Ok(Some(FsResponseData::Handle(h))) => Ok(h),
                other => Err(format!("{other:?}")),
            }
        };
        let h = open(STEP + 1).unwrap();
        assert!(fs.file(STEP + 2, h).is_ok());
        assert!(fs.file(2 * STEP + 1, h).unwrap_err().contains("relay slot"));
        assert!(fs.file(0, h).unwrap_err().contains("outside every relay slot"));
        assert!(open(0).unwrap_err().contains("outside every relay slot"));
        assert!(open(u32::MAX).unwrap_err().contains("outside every relay slot"));
        for _ in 1..MAX_HANDLES_PER_SLOT {
            open(STEP + 3).unwrap();
        }
        assert!(open(STEP + 4).unwrap_err().contains("1024 handles"));
        let other = open(2 * STEP + 1).unwrap();
        fs.close_opened_by(STEP..2 * STEP);
        assert!(fs.file(STEP + 1, h).unwrap_err().contains("no open handle"));
        assert!(fs.file(2 * STEP + 1, other).is_ok());
        open(STEP + 4).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
