//! `core.fs.*`: the `FsOp` operations inside a root directory, with streamed
//! reads and writes in `FS_CHUNK_SIZE` chunks.
//!
//! Guest paths are read as if the root were `/`. A path is refused when `..`
//! climbs above the root, or when a symlink leads out of it: the parent
//! directory (and the path itself, for operations that follow links) is
//! resolved by the kernel and must still lie under the root.

use std::collections::HashMap;
use std::fs::{self as stdfs, File, Metadata};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agentwire::payload::fs::{FS_CHUNK_SIZE, FsData, FsEntryInfo, FsOp, FsResponse, FsResponseData, FsSetAttrs};
use agentwire::{Message, Payload};
use agentwire_session::driver::Route;
use bytes::Bytes;

use crate::{Defaults, Service, SessionTask};

/// `core.fs.*` inside a root directory, with the open handles of one connection.
pub struct FsService(Arc<Fs>);

impl FsService {
    /// Operations confined to `root` (made canonical here; an unusable root
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
                run(fs, req.op, route).await
            }
        })
    }
}

/// An open handle.
enum Handle {
    File(Arc<File>),
    Dir { path: PathBuf, entries: Vec<FsEntryInfo>, next: usize },
}

/// The root and the handles of one connection.
pub struct Fs {
    root: PathBuf,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
}

type Outcome = Result<Option<FsResponseData>, String>;

impl Fs {
    /// Operations confined to `root`, which must be canonical.
    pub fn new(root: PathBuf) -> Fs {
        Fs { root, handles: Mutex::new(HashMap::new()), next_handle: AtomicU64::new(1) }
    }

    /// The real path of guest path `path`; see the module docs for what is refused.
    fn resolve(&self, path: &str, follow: bool) -> Result<PathBuf, String> {
        let escape = || format!("{path}: refused: the path leads outside the root");
        let mut rel = PathBuf::new();
        for c in Path::new(path).components() {
            match c {
                Component::Normal(n) => rel.push(n),
                Component::ParentDir => {
                    if !rel.pop() {
                        return Err(escape());
                    }
                }
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
        let Some(name) = rel.file_name().map(ToOwned::to_owned) else { return Ok(self.root.clone()) };
        let parent = self.root.join(&rel).parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        let parent = parent.canonicalize().map_err(|e| format!("{path}: {e}"))?;
        if !parent.starts_with(&self.root) {
            return Err(escape());
        }
        let full = parent.join(name);
        if follow {
            match full.canonicalize() {
                Ok(real) => return if real.starts_with(&self.root) { Ok(real) } else { Err(escape()) },
                // Creating through a link that leads nowhere would create its target, wherever that is.
                Err(_) if full.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) => {
                    return Err(format!("{path}: refused: a symlink that leads nowhere"));
                }
                Err(_) => {}
            }
        }
        Ok(full)
    }

    /// The guest path of a real path under the root.
    fn guest_path(&self, real: &Path) -> String {
        let rel = real.strip_prefix(&self.root).unwrap_or(real);
        format!("/{}", rel.display())
    }

    fn insert(&self, handle: Handle) -> u64 {
        let n = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).insert(n, handle);
        n
    }

    fn file(&self, handle: u64) -> Result<Arc<File>, String> {
        match self.handles.lock().unwrap_or_else(|e| e.into_inner()).get(&handle) {
            Some(Handle::File(f)) => Ok(f.clone()),
            Some(Handle::Dir { .. }) => Err(format!("handle {handle} is a directory")),
            None => Err(format!("no open handle {handle}")),
        }
    }

    /// Every operation that is one request and one response.
    fn operate(&self, op: FsOp) -> Outcome {
        let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
        match op {
            FsOp::RealPath { path } => {
                let real = self.resolve(&path, true)?.canonicalize().map_err(|e| io(&path, e))?;
                Ok(Some(FsResponseData::Path(self.guest_path(&real))))
            }
            FsOp::Stat { path, follow_symlink } => {
                let real = self.resolve(&path, follow_symlink)?;
                let md = if follow_symlink { stdfs::metadata(&real) } else { stdfs::symlink_metadata(&real) };
                Ok(Some(FsResponseData::Stat(entry(self.guest_path(&real), &md.map_err(|e| io(&path, e))?))))
            }
            FsOp::SetStat { path, follow_symlink, attrs } => {
                let real = self.resolve(&path, follow_symlink)?;
                let is_link = !follow_symlink && stdfs::symlink_metadata(&real).is_ok_and(|m| m.is_symlink());
                if is_link {
                    // The link itself, as lstat sees it: never its target.
                    set_link_attrs(&real, &attrs).map_err(|e| io(&path, e))?;
                } else {
                    let file = File::options().read(true).open(&real).map_err(|e| io(&path, e))?;
                    set_attrs(&file, &attrs).map_err(|e| io(&path, e))?;
                }
                Ok(None)
            }
            FsOp::List { path } => {
                let real = self.resolve(&path, true)?;
                Ok(Some(FsResponseData::List(self.list(&real).map_err(|e| io(&path, e))?)))
            }
            FsOp::ReadLink { path } => {
                let target = stdfs::read_link(self.resolve(&path, false)?).map_err(|e| io(&path, e))?;
                Ok(Some(FsResponseData::Path(target.display().to_string())))
            }
            FsOp::Symlink { target, link_path } => {
                let link = self.resolve(&link_path, false)?;
                std::os::unix::fs::symlink(&target, link).map_err(|e| io(&link_path, e))?;
                Ok(None)
            }
            FsOp::Mkdir { path, mode } => {
                let real = self.resolve(&path, false)?;
                stdfs::DirBuilder::new().mode(mode.unwrap_or(0o755)).create(real).map_err(|e| io(&path, e))?;
                Ok(None)
            }
            FsOp::Remove { path } => {
                stdfs::remove_file(self.resolve(&path, false)?).map_err(|e| io(&path, e))?;
                Ok(None)
            }
            FsOp::RemoveDir { path, recursive } => {
                let real = self.resolve(&path, false)?;
                if real == self.root {
                    return Err(format!("{path}: refused: the root itself cannot be removed"));
                }
                let done = if recursive { stdfs::remove_dir_all(real) } else { stdfs::remove_dir(real) };
                done.map_err(|e| io(&path, e))?;
                Ok(None)
            }
            FsOp::Copy { src, dst } => {
                stdfs::copy(self.resolve(&src, true)?, self.resolve(&dst, true)?).map_err(|e| io(&src, e))?;
                Ok(None)
            }
            FsOp::Rename { src, dst } => {
                stdfs::rename(self.resolve(&src, false)?, self.resolve(&dst, false)?).map_err(|e| io(&src, e))?;
                Ok(None)
            }
            FsOp::OpenFile { path, options: o } => {
                let real = self.resolve(&path, true)?;
                let mut open = File::options();
                open.read(o.read).write(o.write).append(o.append).create(o.create).truncate(o.truncate);
                open.create_new(o.create_new).mode(o.mode.unwrap_or(0o644));
                let file = open.open(real).map_err(|e| io(&path, e))?;
                Ok(Some(FsResponseData::Handle(self.insert(Handle::File(Arc::new(file))))))
            }
            FsOp::OpenDir { path } => {
                let real = self.resolve(&path, true)?;
                let entries = self.list(&real).map_err(|e| io(&path, e))?;
                Ok(Some(FsResponseData::Handle(self.insert(Handle::Dir { path: real, entries, next: 0 }))))
            }
            FsOp::CloseHandle { handle } => {
                let removed = self.handles.lock().unwrap_or_else(|e| e.into_inner()).remove(&handle);
                removed.map(|_| None).ok_or_else(|| format!("no open handle {handle}"))
            }
            FsOp::ReadDir { handle, limit } => {
                let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
                let Some(Handle::Dir { entries, next, .. }) = handles.get_mut(&handle) else {
                    return Err(format!("no open directory handle {handle}"));
                };
                let n = limit.map_or(usize::MAX, |l| l as usize).min(entries.len() - *next);
                let batch = entries[*next..*next + n].to_vec();
                *next += n;
                Ok(Some(FsResponseData::List(batch)))
            }
            FsOp::FStat { handle } => {
                let handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
                let (path, md) = match handles.get(&handle) {
                    Some(Handle::File(f)) => (String::new(), f.metadata()),
                    Some(Handle::Dir { path, .. }) => (self.guest_path(path), stdfs::metadata(path)),
                    None => return Err(format!("no open handle {handle}")),
                };
                Ok(Some(FsResponseData::Stat(entry(path, &md.map_err(|e| io("fstat", e))?))))
            }
            FsOp::FSetStat { handle, attrs } => {
                set_attrs(&*self.file(handle)?, &attrs).map_err(|e| io("fsetstat", e))?;
                Ok(None)
            }
            FsOp::Read { .. } | FsOp::Write { .. } => Err("a streamed operation reached the wrong path".into()),
            other => Err(format!("{other:?}: not an operation this agent knows")),
        }
    }

    /// A directory's entries, sorted by name.
    fn list(&self, dir: &Path) -> std::io::Result<Vec<FsEntryInfo>> {
        let mut entries = Vec::new();
        for e in stdfs::read_dir(dir)? {
            let e = e?;
            let md = e.metadata()?;
            entries.push(entry(self.guest_path(&e.path()), &md));
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(entries)
    }
}

fn entry(path: String, md: &Metadata) -> FsEntryInfo {
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    };
    FsEntryInfo {
        path,
        kind: kind.into(),
        size: md.len(),
        mode: md.mode(),
        modified: Some(md.mtime()),
        uid: md.uid(),
        gid: md.gid(),
        atime: Some(md.atime()),
        mtime: Some(md.mtime()),
    }
}

/// Applies what is set in `attrs`; times are seconds since the epoch.
fn set_attrs(file: &File, attrs: &FsSetAttrs) -> std::io::Result<()> {
    if let Some(mode) = attrs.mode {
        file.set_permissions(stdfs::Permissions::from_mode(mode))?;
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
    let mut times = stdfs::FileTimes::new();
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

/// Applies `attrs` to the symlink at `path` itself. Linux can change a link's
/// owner and times, not its mode (there is no lchmod) or its size: a request
/// for either is refused whole, before anything is changed.
fn set_link_attrs(path: &Path, attrs: &FsSetAttrs) -> std::io::Result<()> {
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
        std::os::unix::fs::lchown(path, attrs.uid, attrs.gid)?;
    }
    if attrs.atime.is_some() || attrs.mtime.is_some() {
        crate::sys::set_times_nofollow(path, attrs.atime, attrs.mtime)?;
    }
    Ok(())
}

/// Runs one `core.fs.request` to its `core.fs.response`.
async fn run(fs: Arc<Fs>, op: FsOp, mut route: Route) {
    let outcome = match op {
        FsOp::Read { handle, offset, len } => read(&fs, handle, offset, len, &route).await,
        FsOp::Write { handle, offset, len } => match write(&fs, handle, offset, len, &mut route).await {
            Some(outcome) => outcome,
            // The connection went away in the middle of the transfer.
            None => return,
        },
        op => {
            let fs = fs.clone();
            tokio::task::spawn_blocking(move || fs.operate(op)).await.unwrap_or_else(|e| Err(e.to_string()))
        }
    };
    let response = match outcome {
        Ok(data) => FsResponse::success(data),
        Err(message) => FsResponse::failure(message),
    };
    let _ = route.send(response).await;
}

/// A streamed read: `core.fs.data` chunks of at most `FS_CHUNK_SIZE`, then the response.
async fn read(fs: &Fs, handle: u64, offset: u64, len: Option<u64>, out: &Route) -> Outcome {
    let file = fs.file(handle)?;
    let end = len.map_or(u64::MAX, |l| offset.saturating_add(l));
    let mut at = offset;
    while at < end {
        // Sized by what is left and the chunk limit, never by a length the request only claims.
        let want = (end - at).min(FS_CHUNK_SIZE as u64) as usize;
        let f = file.clone();
        let chunk = tokio::task::spawn_blocking(move || read_at_most(&f, want, at))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("read at {at}: {e}"))?;
        if chunk.is_empty() {
            break;
        }
        at += chunk.len() as u64;
        let short = chunk.len() < want;
        out.send(FsData { data: chunk }).await.map_err(|_| "connection closed")?;
        if short {
            break;
        }
    }
    Ok(None)
}

fn read_at_most(file: &File, want: usize, at: u64) -> std::io::Result<Bytes> {
    let mut buf = vec![0u8; want];
    let mut filled = 0;
    while filled < want {
        match file.read_at(&mut buf[filled..], at + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(Bytes::from(buf))
}

/// A streamed write: chunks until the empty one. On an error the rest of the
/// chunks are still taken, so that the session ends with one response and no
/// stray frames. `None` when the connection closed first.
async fn write(fs: &Fs, handle: u64, offset: u64, len: Option<u64>, input: &mut Route) -> Option<Outcome> {
    let mut outcome = fs.file(handle).map(Some);
    let mut at = offset;
    loop {
        let data = match input.recv().await?.payload {
            Payload::FsData(d) => d.data,
            _ => continue,
        };
        if data.is_empty() {
            break;
        }
        if let Ok(Some(file)) = &outcome {
            let (f, n) = (file.clone(), data.len() as u64);
            let written = tokio::task::spawn_blocking(move || f.write_all_at(&data, at)).await;
            match written {
                Ok(Ok(())) => at += n,
                Ok(Err(e)) => outcome = Err(format!("write at {at}: {e}")),
                Err(e) => outcome = Err(e.to_string()),
            }
        }
    }
    let written = at - offset;
    Some(match (outcome, len) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(len)) if len != written => Err(format!("the request announced {len} bytes but {written} came")),
        (Ok(_), _) => Ok(None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_time_a_peer_sends_is_applied_or_refused_without_a_panic() {
        let path = std::env::temp_dir().join(format!("agentwire-setattrs-{}", std::process::id()));
        let file = File::options().create(true).truncate(true).write(true).open(&path).unwrap();
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
}
