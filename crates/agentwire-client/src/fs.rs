//! Files in the guest.

use agentwire::payload::bulk::{
    BulkAccepted, BulkCancelReason, BulkCredit, BulkFlow, BulkKind, BulkOffer, MAX_BULK_RECORD_PAYLOAD,
};
use agentwire::payload::fs::{
    FS_CHUNK_SIZE, FsData, FsEntryInfo, FsOp, FsOpenOptions, FsRequest, FsResponse, FsResponseData, FsSetAttrs,
};
use agentwire::{Flags, Message, Payload};
use agentwire_session::SendError;
use agentwire_session::bulk::{BulkOperation, BulkReceiver, BulkSender, BulkViolation};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::client::{Client, Session};
use crate::{ClientError, bulk};

/// What a reply carried, or the agent's refusal as an error naming `what`.
fn outcome(what: &str, reply: Payload) -> Result<Option<FsResponseData>, ClientError> {
    match reply {
        Payload::FsResponse(r) => fs_response(what, *r),
        other => Err(ClientError::unexpected("core.fs.response", other)),
    }
}

fn fs_response(what: &str, r: FsResponse) -> Result<Option<FsResponseData>, ClientError> {
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
        outcome(&what, self.call(FsRequest::new(op)).await?)
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
        self.fs(FsOp::Mkdir { path: path.into(), mode, user: None }).await.map(drop)
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

    /// Writes everything `data` gives to `path` (created or truncated); `len`,
    /// when known, is told to the agent. The number of bytes written. A local
    /// read error ends the transfer early, and the error says how much the
    /// guest file holds.
    ///
    /// With bulk records ([`Builder::bulk`](crate::Builder::bulk), an agent of
    /// generation 8 or later) the data goes as records of up to 3 MiB within
    /// the credit the agent grants as it writes the file, and `data` is read
    /// only as that credit allows; otherwise as `core.fs.data` chunks of at
    /// most [`FS_CHUNK_SIZE`]. Either way this side holds at most one
    /// record's or chunk's worth of the data besides what the connection is
    /// writing.
    pub async fn write_file(
        &self,
        path: &str,
        mut data: impl AsyncRead + Unpin,
        len: Option<u64>,
    ) -> Result<u64, ClientError> {
        let options = FsOpenOptions { write: true, create: true, truncate: true, ..Default::default() };
        let handle = self.open_file(path, options).await?;
        let result = if self.bulk {
            self.write_bulk(path, handle, &mut data, len).await
        } else {
            self.write_chunks(path, handle, &mut data, len).await
        };
        let closed = self.close_handle(handle).await;
        let sent = result?;
        closed.map(|_| sent)
    }

    /// A write as `core.fs.data` chunks, ended by an empty one (generation 7).
    async fn write_chunks(
        &self,
        path: &str,
        handle: u64,
        data: &mut (impl AsyncRead + Unpin),
        len: Option<u64>,
    ) -> Result<u64, ClientError> {
        let mut s = self.request(FsRequest::new(FsOp::Write { handle, offset: 0, len })).await?;
        let mut sent = 0u64;
        let mut failed = None;
        loop {
            let chunk = match read_up_to(data, FS_CHUNK_SIZE).await {
                Ok(chunk) => chunk,
                Err((chunk, e)) => {
                    failed = Some(e);
                    chunk
                }
            };
            let done = chunk.is_empty() || failed.is_some();
            sent += chunk.len() as u64;
            if !chunk.is_empty() {
                s.send(FsData { data: chunk }).await?;
            }
            if done {
                s.send(FsData { data: Bytes::new() }).await?;
                break;
            }
        }
        let reply = s.recv().await.ok_or_else(|| self.closed("core.fs.response"))?;
        outcome(&format!("write {path}"), reply.payload)?;
        local_failure(path, sent, failed)
    }

    /// A write as raw records (spec 7.4): the offer, the agent's acceptance,
    /// records within its credit, `core.bulk.finish`, its response.
    async fn write_bulk(
        &self,
        path: &str,
        handle: u64,
        data: &mut (impl AsyncRead + Unpin),
        len: Option<u64>,
    ) -> Result<u64, ClientError> {
        let what = format!("write {path}");
        let op = BulkOperation::FileWrite;
        let offer = op.offer(MAX_BULK_RECORD_PAYLOAD as u32, 0);
        let request = FsRequest { op: FsOp::Write { handle, offset: 0, len }, bulk: Some(offer) };
        let mut s = self.request(request).await?;
        let accepted = self.fs_accepted(&mut s, &what, op, &offer).await?;
        let (kind, flow) = (BulkKind::Filesystem, BulkFlow::HostToGuest);
        let mut tx = BulkSender::new(kind, flow, accepted.max_record_payload, accepted.host_to_guest_credit_limit);
        let mut failed = None;
        while failed.is_none() {
            // What the agent said meanwhile (credit, or the end); without credit, wait for it.
            while let Some(m) = s.try_recv() {
                written_early(&what, write_reply(&s, &what, &mut tx, m).await?)?;
            }
            let window = tx.window();
            if window == 0 {
                let m = s.recv().await.ok_or_else(|| self.closed("core.bulk.credit"))?;
                written_early(&what, write_reply(&s, &what, &mut tx, m).await?)?;
                continue;
            }
            // The source is read only as far as the credit goes: one record at a time.
            let chunk = match read_up_to(data, window).await {
                Ok(chunk) => chunk,
                Err((chunk, e)) => {
                    failed = Some(e);
                    chunk
                }
            };
            if chunk.is_empty() {
                break;
            }
            let record =
                tx.record(chunk).map_err(|v| ClientError::Fs { what: what.clone(), message: v.to_string() })?;
            if let Err(e) = s.send(record).await {
                return Err(self.ended_early(&mut s, &what, &mut tx, e).await);
            }
        }
        let sent = tx.sent();
        if let Err(e) = s.send(tx.finish()).await {
            return Err(self.ended_early(&mut s, &what, &mut tx, e).await);
        }
        let response = loop {
            let m = s.recv().await.ok_or_else(|| self.closed("core.fs.response"))?;
            if let Some(response) = write_reply(&s, &what, &mut tx, m).await? {
                break response;
            }
        };
        fs_response(&what, response)?;
        local_failure(path, sent, failed)
    }

    /// A bulk write's frame could not be sent (`e`): when the agent ended the
    /// operation first, its reason (a cancel, a failed response), from what
    /// is left to read of the operation.
    async fn ended_early(&self, s: &mut Session, what: &str, tx: &mut BulkSender, e: ClientError) -> ClientError {
        if !matches!(e, ClientError::Send(SendError::NoSession { .. })) {
            return e;
        }
        while let Some(m) = s.recv().await {
            match write_reply(s, what, tx, m).await {
                Err(reason) => return reason,
                Ok(Some(response)) => {
                    if let Err(reason) = fs_response(what, response) {
                        return reason;
                    }
                    let message = "the agent answered success before the data was finished".to_string();
                    return ClientError::Fs { what: what.into(), message };
                }
                Ok(None) => {}
            }
        }
        self.closed("core.fs.response")
    }

    /// The agent's `core.bulk.accepted` for `offer`, checked; a refusal or an
    /// acceptance that breaks the rules fails the operation.
    async fn fs_accepted(
        &self,
        s: &mut Session,
        what: &str,
        op: BulkOperation,
        offer: &BulkOffer,
    ) -> Result<BulkAccepted, ClientError> {
        let m = self.within(s.recv()).await?.ok_or_else(|| self.closed("core.bulk.accepted"))?;
        match m.payload {
            Payload::BulkAccepted(accepted) => match op.check_acceptance(offer, &accepted) {
                Ok(()) => Ok(accepted),
                Err(why) => {
                    // Abandoned: the agent stops and the rest of its frames are dropped.
                    bulk::cancel(s, op.kind(), BulkCancelReason::ProtocolViolation, why.clone()).await;
                    Err(ClientError::Fs { what: what.into(), message: why })
                }
            },
            Payload::FsResponse(r) if !r.ok => Err(fs_response(what, *r).unwrap_err()),
            other => Err(ClientError::unexpected("core.bulk.accepted", other)),
        }
    }

    /// Reads `path` whole into `out`, as fast as `out` takes it; the number of bytes read.
    ///
    /// With bulk records ([`Builder::bulk`](crate::Builder::bulk), an agent of
    /// generation 8 or later) the agent sends the file as records within a
    /// credit that this side extends only as `out` takes the data (8 MiB
    /// ahead of it, 4 MiB through a relay, less when
    /// [`Builder::buffer_limits`](crate::Builder::buffer_limits) allows a
    /// session less), so a slow `out` holds the agent back; the file's size
    /// is asked for first (`FStat`), so that no credit goes out once the
    /// agent can read to the end without it. Otherwise the file comes as
    /// `core.fs.data` chunks, held back by the connection's buffer limits.
    pub async fn read_file(&self, path: &str, out: &mut (impl AsyncWrite + Unpin)) -> Result<u64, ClientError> {
        let handle = self.open_file(path, FsOpenOptions { read: true, ..Default::default() }).await?;
        let result =
            if self.bulk { self.read_bulk(path, handle, out).await } else { self.read_chunks(path, handle, out).await };
        let closed = self.close_handle(handle).await;
        let got = result?;
        closed.map(|_| got)
    }

    /// A read as `core.fs.data` chunks (generation 7).
    async fn read_chunks(
        &self,
        path: &str,
        handle: u64,
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<u64, ClientError> {
        let mut s = self.request(FsRequest::new(FsOp::Read { handle, offset: 0, len: None })).await?;
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
                    return Ok(got);
                }
            }
        }
    }

    /// A read as raw records (spec 7.4): the offer with the initial credit,
    /// the agent's acceptance, records, `core.bulk.finish`, the response;
    /// credit goes back as `out` takes the data.
    async fn read_bulk(
        &self,
        path: &str,
        handle: u64,
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<u64, ClientError> {
        let what = format!("read {path}");
        let op = BulkOperation::FileRead;
        let offer = op.offer(MAX_BULK_RECORD_PAYLOAD as u32, self.read_window);
        // The file's size, asked for before the read: once the credit passes
        // the end of the file the agent can finish without more, and a credit
        // sent then could reach it after its response (which the deployed
        // agent answers with a cancel and a second response). Not alongside
        // it: the read's first credit fills what the connection lets one
        // session hold, and an agent serving sessions at once may send those
        // records before the size, which would then wait behind them, unread,
        // while this waits for it.
        let mut stat = self.request(FsRequest::new(FsOp::FStat { handle })).await?;
        let size = match self.within(stat.recv()).await?.map(|m| m.payload) {
            Some(Payload::FsResponse(r)) => match (r.ok, r.data) {
                (true, Some(FsResponseData::Stat(info))) => Some(info.size),
                _ => None,
            },
            _ => None,
        };
        drop(stat);
        let request = FsRequest { op: FsOp::Read { handle, offset: 0, len: None }, bulk: Some(offer) };
        let mut s = self.request(request).await?;
        let accepted = self.fs_accepted(&mut s, &what, op, &offer).await?;
        let (kind, flow) = (BulkKind::Filesystem, BulkFlow::GuestToHost);
        let granted = accepted.guest_to_host_credit_limit;
        let mut rx = BulkReceiver::new(kind, flow, accepted.max_record_payload, granted, self.read_window);
        let mut credit = ReadCredit { granted, unreported: 0, size };
        loop {
            let m = s.recv().await.ok_or_else(|| self.closed("core.fs.response"))?;
            let terminal = m.flags.contains(Flags::TERMINAL);
            match m.payload {
                Payload::BulkRecord(r) => {
                    if let Err(v) = rx.record(&r) {
                        return Err(ClientError::Fs { what, message: bulk::violated(&s, v, terminal).await });
                    }
                    if let Err(e) = out.write_all(&r.data).await {
                        let message = format!("{what}: writing the data to its destination failed: {e}");
                        bulk::cancel(&s, kind, BulkCancelReason::DestinationIo, message).await;
                        return Err(e.into());
                    }
                    // The destination has taken it: credit for it, when due.
                    if let Some(c) = credit.consumed(&mut rx, r.data.len()) {
                        match s.send(c).await {
                            // The agent's response has come (the operation is over
                            // for the connection) but is still to be read here.
                            Err(ClientError::Send(SendError::NoSession { .. })) => {}
                            other => other?,
                        }
                    }
                }
                Payload::BulkFinish(f) => {
                    if let Err(v) = rx.finish(&f) {
                        return Err(ClientError::Fs { what, message: bulk::violated(&s, v, terminal).await });
                    }
                }
                Payload::FsResponse(r) => {
                    if r.ok && !rx.is_finished() {
                        let message = format!(
                            "the agent answered success after {} bytes without core.bulk.finish",
                            rx.received()
                        );
                        return Err(ClientError::Fs { what, message });
                    }
                    fs_response(&what, *r)?;
                    out.flush().await?;
                    return Ok(rx.received());
                }
                Payload::BulkCancel(c) => return Err(ClientError::Fs { what, message: bulk::cancelled(&c) }),
                Payload::Error(e) => return Err(ClientError::unexpected("core.fs.response", Payload::Error(e))),
                other => {
                    let reason = format!("{} on a bulk read", other.message_type());
                    let message = bulk::violated(&s, BulkViolation { kind, flow, reason }, terminal).await;
                    return Err(ClientError::Fs { what, message });
                }
            }
        }
    }
}

/// When a bulk read sends its credit.
struct ReadCredit {
    /// The credit limit the agent has been given.
    granted: u64,
    /// Bytes the destination took that no credit has counted yet.
    unreported: usize,
    /// The file's size when the read started, if known.
    size: Option<u64>,
}

impl ReadCredit {
    /// `n` more bytes reached the destination: the credit to send, if one is due.
    ///
    /// As a rule the receiver's own (half a window consumed). But once the
    /// agent's credit passes the file's size it can read to the end and
    /// finish without more; a credit then is held back, unless the agent
    /// has sent everything it may (the file grew: it waits for credit, and
    /// cannot have finished, since it finishes only after a read at the end
    /// of the file, which takes credit it does not have).
    fn consumed(&mut self, rx: &mut BulkReceiver, n: usize) -> Option<BulkCredit> {
        self.unreported += n;
        let can_finish = self.size.is_some_and(|size| self.granted > size);
        if can_finish && rx.received() < self.granted {
            return None;
        }
        let credit = rx.consumed(std::mem::take(&mut self.unreported))?;
        self.granted = credit.credit_limit;
        Some(credit)
    }
}

/// Reads from `data` until `max` bytes or its end: one chunk, or one record.
/// On a read error, what was read before it, and the error.
async fn read_up_to(data: &mut (impl AsyncRead + Unpin), max: usize) -> Result<Bytes, (Bytes, std::io::Error)> {
    let mut chunk = BytesMut::with_capacity(max);
    while chunk.len() < max {
        let room = max - chunk.len();
        match data.read_buf(&mut (&mut chunk).limit(room)).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err((chunk.freeze(), e)),
        }
    }
    Ok(chunk.freeze())
}

/// The bytes written, or the local read error that ended the write early.
fn local_failure(path: &str, sent: u64, failed: Option<std::io::Error>) -> Result<u64, ClientError> {
    match failed {
        Some(e) => Err(ClientError::Fs {
            what: format!("write {path}"),
            message: format!("reading the local data failed after {sent} bytes, which the guest file holds: {e}"),
        }),
        None => Ok(sent),
    }
}

/// What the agent said during a bulk write: `Some` with its response (the
/// end), `None` when the write goes on; an error for a cancel or a broken rule.
async fn write_reply(
    s: &Session,
    what: &str,
    tx: &mut BulkSender,
    m: Message,
) -> Result<Option<FsResponse>, ClientError> {
    let terminal = m.flags.contains(Flags::TERMINAL);
    let v = match m.payload {
        Payload::BulkCredit(c) => match tx.credit(&c) {
            Ok(_) => return Ok(None),
            Err(v) => v,
        },
        Payload::FsResponse(r) => return Ok(Some(*r)),
        Payload::BulkCancel(c) => return Err(ClientError::Fs { what: what.into(), message: bulk::cancelled(&c) }),
        Payload::Error(e) => return Err(ClientError::unexpected("core.fs.response", Payload::Error(e))),
        other => BulkViolation {
            kind: BulkKind::Filesystem,
            flow: BulkFlow::HostToGuest,
            reason: format!("{} on a bulk write", other.message_type()),
        },
    };
    Err(ClientError::Fs { what: what.into(), message: bulk::violated(s, v, terminal).await })
}

/// A response that came before the write's finish: a failure, or a success too early.
fn written_early(what: &str, response: Option<FsResponse>) -> Result<(), ClientError> {
    let Some(r) = response else { return Ok(()) };
    fs_response(what, r)?;
    let message = "the agent answered success before the data was finished".to_string();
    Err(ClientError::Fs { what: what.into(), message })
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
