//! Files in the guest.

use agentwire::Payload;
use agentwire::payload::fs::{
    FS_CHUNK_SIZE, FsData, FsEntryInfo, FsOp, FsOpenOptions, FsRequest, FsResponse, FsResponseData, FsSetAttrs,
};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ClientError;
use crate::client::Client;

/// What a reply carried, or the agent's refusal as an error naming `what`.
fn outcome(what: &str, reply: Payload) -> Result<Option<FsResponseData>, ClientError> {
    match reply {
        Payload::FsResponse(r) => response(what, *r),
        other => Err(ClientError::unexpected("core.fs.response", other)),
    }
}

fn response(what: &str, r: FsResponse) -> Result<Option<FsResponseData>, ClientError> {
    if r.ok {
        Ok(r.data)
    } else {
        let message = r.error.unwrap_or_else(|| "failed, without a reason".into());
        Err(ClientError::Fs { what: what.to_string(), message })
    }
}

impl Client {
    /// One file-system request and its answer.
    pub async fn fs(&self, op: FsOp) -> Result<Option<FsResponseData>, ClientError> {
        let what = describe(&op);
        outcome(&what, self.call(FsRequest { op }).await?)
    }

    async fn fs_expect<T>(&self, op: FsOp, pick: impl FnOnce(FsResponseData) -> Option<T>) -> Result<T, ClientError> {
        let what = describe(&op);
        match self.fs(op).await? {
            Some(data) => {
                let shown = format!("{data:?}");
                pick(data).ok_or_else(|| ClientError::Fs { what, message: format!("unexpected answer {shown}") })
            }
            None => Err(ClientError::Fs { what, message: "the answer carried no data".into() }),
        }
    }

    /// The entry at `path`, following a final symlink when `follow` is true.
    pub async fn stat(&self, path: &str, follow: bool) -> Result<FsEntryInfo, ClientError> {
        let op = FsOp::Stat { path: path.into(), follow_symlink: follow };
        self.fs_expect(op, |d| if let FsResponseData::Stat(s) = d { Some(s) } else { None }).await
    }

    /// The entries of the directory at `path`.
    pub async fn list(&self, path: &str) -> Result<Vec<FsEntryInfo>, ClientError> {
        let op = FsOp::List { path: path.into() };
        self.fs_expect(op, |d| if let FsResponseData::List(l) = d { Some(l) } else { None }).await
    }

    /// Creates the directory `path`.
    pub async fn mkdir(&self, path: &str, mode: Option<u32>) -> Result<(), ClientError> {
        self.fs(FsOp::Mkdir { path: path.into(), mode }).await.map(drop)
    }

    /// Removes the file or symlink `path`.
    pub async fn remove(&self, path: &str) -> Result<(), ClientError> {
        self.fs(FsOp::Remove { path: path.into() }).await.map(drop)
    }

    /// Removes the directory `path`, with its contents when `recursive`.
    pub async fn remove_dir(&self, path: &str, recursive: bool) -> Result<(), ClientError> {
        self.fs(FsOp::RemoveDir { path: path.into(), recursive }).await.map(drop)
    }

    /// Renames `src` to `dst`.
    pub async fn rename(&self, src: &str, dst: &str) -> Result<(), ClientError> {
        self.fs(FsOp::Rename { src: src.into(), dst: dst.into() }).await.map(drop)
    }

    /// Changes the attributes of `path` (of a symlink itself when `follow` is false).
    pub async fn set_stat(&self, path: &str, follow: bool, attrs: FsSetAttrs) -> Result<(), ClientError> {
        self.fs(FsOp::SetStat { path: path.into(), follow_symlink: follow, attrs }).await.map(drop)
    }

    async fn open_file(&self, path: &str, options: FsOpenOptions) -> Result<u64, ClientError> {
        let op = FsOp::OpenFile { path: path.into(), options };
        self.fs_expect(op, |d| if let FsResponseData::Handle(h) = d { Some(h) } else { None }).await
    }

    async fn close_handle(&self, handle: u64) -> Result<(), ClientError> {
        self.fs(FsOp::CloseHandle { handle }).await.map(drop)
    }

    /// Writes everything `data` gives to `path` (created or truncated), in
    /// chunks of at most [`FS_CHUNK_SIZE`]; `len`, when known, is told to the
    /// agent. The number of bytes written. A local read error ends the
    /// transfer early, and the error says how much the guest file holds.
    pub async fn write_file(
        &self,
        path: &str,
        mut data: impl AsyncRead + Unpin,
        len: Option<u64>,
    ) -> Result<u64, ClientError> {
        let options = FsOpenOptions { write: true, create: true, truncate: true, ..Default::default() };
        let handle = self.open_file(path, options).await?;
        let result = async {
            let mut s = self.request(FsRequest { op: FsOp::Write { handle, offset: 0, len } }).await?;
            let mut sent = 0u64;
            let mut failed = None;
            loop {
                let mut chunk = BytesMut::with_capacity(FS_CHUNK_SIZE);
                while chunk.len() < FS_CHUNK_SIZE {
                    match data.read_buf(&mut chunk).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                let done = chunk.is_empty() || failed.is_some();
                sent += chunk.len() as u64;
                if !chunk.is_empty() {
                    s.send(FsData { data: chunk.freeze() }).await?;
                }
                if done {
                    s.send(FsData { data: bytes::Bytes::new() }).await?;
                    break;
                }
            }
            let reply = s.recv().await.ok_or_else(|| self.closed("core.fs.response"))?;
            outcome(&format!("write {path}"), reply.payload)?;
            match failed {
                Some(e) => Err(ClientError::Fs {
                    what: format!("write {path}"),
                    message: format!(
                        "reading the local data failed after {sent} bytes, which the guest file holds: {e}"
                    ),
                }),
                None => Ok(sent),
            }
        }
        .await;
        let closed = self.close_handle(handle).await;
        let sent = result?;
        closed.map(|_| sent)
    }

    /// Reads `path` whole into `out`, as fast as `out` takes it; the number of bytes read.
    pub async fn read_file(&self, path: &str, out: &mut (impl AsyncWrite + Unpin)) -> Result<u64, ClientError> {
        let handle = self.open_file(path, FsOpenOptions { read: true, ..Default::default() }).await?;
        let result = async {
            let mut s = self.request(FsRequest { op: FsOp::Read { handle, offset: 0, len: None } }).await?;
            let mut got = 0u64;
            loop {
                let m = s.recv().await.ok_or_else(|| self.closed("core.fs.response"))?;
                match m.payload {
                    Payload::FsData(d) => {
                        got += d.data.len() as u64;
                        out.write_all(&d.data).await?;
                    }
                    other => {
                        outcome(&format!("read {path}"), other)?;
                        out.flush().await?;
                        return Ok::<u64, ClientError>(got);
                    }
                }
            }
        }
        .await;
        let closed = self.close_handle(handle).await;
        let got = result?;
        closed.map(|_| got)
    }
}

/// The operation and its path, for errors.
fn describe(op: &FsOp) -> String {
    match op {
        FsOp::RealPath { path } => format!("realpath {path}"),
        FsOp::Stat { path, .. } => format!("stat {path}"),
        FsOp::SetStat { path, .. } => format!("setstat {path}"),
        FsOp::List { path } => format!("list {path}"),
        FsOp::ReadLink { path } => format!("readlink {path}"),
        FsOp::Symlink { link_path, .. } => format!("symlink {link_path}"),
        FsOp::Mkdir { path, .. } => format!("mkdir {path}"),
        FsOp::Remove { path } => format!("remove {path}"),
        FsOp::RemoveDir { path, .. } => format!("rmdir {path}"),
        FsOp::Copy { src, dst } => format!("copy {src} to {dst}"),
        FsOp::Rename { src, dst } => format!("rename {src} to {dst}"),
        FsOp::OpenFile { path, .. } => format!("open {path}"),
        FsOp::OpenDir { path } => format!("opendir {path}"),
        FsOp::CloseHandle { handle } => format!("close handle {handle}"),
        FsOp::Read { handle, .. } => format!("read handle {handle}"),
        FsOp::Write { handle, .. } => format!("write handle {handle}"),
        FsOp::ReadDir { handle, .. } => format!("readdir handle {handle}"),
        FsOp::FStat { handle } => format!("fstat handle {handle}"),
        FsOp::FSetStat { handle, .. } => format!("fsetstat handle {handle}"),
        other => format!("{other:?}"),
    }
}
