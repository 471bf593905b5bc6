//! The host side: a connection to an agent that many sessions use at once.
//! A reader task routes each incoming frame to the session that owns its id;
//! the session's TERMINAL frame closes its route.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{InitAck, Ping, Ready, ResolvedUser, Shutdown};
use agentwire::payload::exec::{ExecFailed, ExecFailureKind, ExecRequest, ExecStdin};
use agentwire::payload::fs::{FS_CHUNK_SIZE, FsData, FsOp, FsOpenOptions, FsRequest, FsResponseData};
use agentwire::{Flags, Message, Payload, RawMessage, version};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::addr::Stream;
use crate::wire::{self, Capture, Counters, Outbox};

type Routes = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Message>>>>;

/// How long the handshake may take (a VM under software emulation boots first).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to an agent, after the handshake.
pub struct Client {
    outbox: Outbox,
    routes: Routes,
    /// The next id to give a session; every id below it was given (and is open while it has a route).
    next_id: Arc<AtomicU32>,
    /// Whether a `core.bootstrap` was given to [`Client::connect`] and was
    /// encoded and written to the stream before anything else.
    pub bootstrap_written: bool,
    /// The generation both sides use.
    pub negotiated: u8,
    /// The agent's `core.ready`.
    pub ready: Ready,
    /// The agent's generation, from the `v` of its `core.ready`.
    pub agent_generation: u8,
    /// The agent's default user, from `core.init.resolved`.
    pub user: ResolvedUser,
    /// Frames and bytes each way.
    pub counters: Arc<Counters>,
    reader: tokio::task::JoinHandle<Result<(), String>>,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The frames of one session, in order.
pub struct Session {
    /// The session's id.
    pub id: u32,
    rx: mpsc::UnboundedReceiver<Message>,
}

impl Session {
    /// The next frame of the session; `None` after its TERMINAL frame or when the connection ends.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}

impl Client {
    /// Connects over `stream`: sends `bootstrap` first if given, waits for
    /// `core.ready` and `core.init.resolved`, negotiates, and acknowledges.
    pub async fn connect(
        stream: Stream,
        bootstrap: Option<GuestBootstrap>,
        capture: Option<Capture>,
    ) -> Result<Client, String> {
        let counters = Arc::new(Counters::default());
        let (mut inbox, outbox, writer) = wire::split(stream, counters.clone(), capture);
        let routes: Routes = Arc::default();
        let next_id = Arc::new(AtomicU32::new(1));
        let (control_tx, mut control) = mpsc::unbounded_channel();
        // The bootstrap goes out before anything is read, as it would sit in
        // front of the agent's input before a VM boots.
        let mut bootstrap_written = false;
        if let Some(b) = bootstrap {
            outbox.send(Message::new(0, b)).await.map_err(|_| "the connection closed")?;
            outbox.flushed().await.map_err(|_| "the connection closed")?;
            // The writer counts a frame once encoded; one it could not encode is not sent.
            bootstrap_written = counters.sent.get().0 == 1;
        }
        let reader_routes = routes.clone();
        let issued = next_id.clone();
        let reader = tokio::spawn(async move {
            let result = loop {
                let m = match inbox.next().await {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(format!("the agent's stream failed: {e}")),
                    Some(Ok(Err(rejected))) => {
                        eprintln!("agentwire host: a frame from the agent was rejected: {rejected}");
                        continue;
                    }
                    Some(Ok(Ok(m))) => m,
                };
                let route = {
                    let mut routes = reader_routes.lock().unwrap_or_else(|e| e.into_inner());
                    if m.flags.contains(Flags::TERMINAL) { routes.remove(&m.id) } else { routes.get(&m.id).cloned() }
                };
                match route {
                    Some(tx) => drop(tx.send(m)),
                    // Before the handshake ends, control frames go to it; later, there is nobody to tell.
                    None => {
                        if let Err(lost) = control_tx.send(m) {
                            let m = lost.0;
                            // A core.error on an id whose session this side has closed (stdin that
                            // raced the command's exit, say) concerns nothing that is still open.
                            let closed = m.id != 0 && m.id < issued.load(Ordering::Relaxed);
                            if !(closed && matches!(m.payload, Payload::Error(_))) {
                                eprintln!(
                                    "agentwire host: {} on id {}, which has no open session",
                                    m.message_type(),
                                    m.id
                                );
                            }
                        }
                    }
                }
            };
            // Sessions still open learn that nothing more will come.
            reader_routes.lock().unwrap_or_else(|e| e.into_inner()).clear();
            result
        });
        let mut next = async || match tokio::time::timeout(HANDSHAKE_TIMEOUT, control.recv()).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err("the agent closed the connection during the handshake".to_string()),
            Err(_) => Err(format!("no handshake from the agent within {HANDSHAKE_TIMEOUT:?}")),
        };
        let ready_message = next().await?;
        let agent_generation = ready_message.version;
        let Payload::Ready(ready) = ready_message.payload else {
            return Err(format!("the agent sent {} before core.ready", ready_message.payload.message_type()));
        };
        let negotiated = version::negotiate(agent_generation, agentwire::PROTOCOL_VERSION);
        let user = match next().await?.payload {
            Payload::InitResolved(r) => r.default_user,
            other => return Err(format!("the agent sent {} instead of core.init.resolved", other.message_type())),
        };
        outbox.send(Message::new(0, InitAck {})).await.map_err(|_| "the connection closed")?;
        drop(control);
        Ok(Client {
            outbox,
            routes,
            next_id,
            bootstrap_written,
            negotiated,
            ready,
            agent_generation,
            user,
            counters,
            reader,
            writer,
        })
    }

    fn open_route(&self) -> Session {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        Session { id, rx }
    }

    /// Sends `payload` on a new id and returns the session that gets its replies.
    /// Refused locally, with nothing sent, when the agent's generation lacks the type.
    pub async fn request(&self, payload: impl Into<Payload>) -> Result<Session, String> {
        let payload = payload.into();
        version::check_available(payload.message_type(), self.negotiated).map_err(|e| e.to_string())?;
        let session = self.open_route();
        self.outbox.send(Message::new(session.id, payload)).await.map_err(|_| "the connection closed")?;
        Ok(session)
    }

    /// Sends a frame of a type this side may not know, on a new id.
    pub async fn request_raw(&self, type_name: &str, payload: bytes::Bytes) -> Result<Session, String> {
        let session = self.open_route();
        let raw = RawMessage {
            id: session.id,
            flags: Flags::NONE,
            version: agentwire::PROTOCOL_VERSION,
            type_name: agentwire::TypeName::from_wire_name(type_name),
            payload,
        };
        self.outbox.send_raw(raw).await.map_err(|_| "the connection closed")?;
        Ok(session)
    }

    /// Sends a frame of an open session.
    pub async fn send(&self, id: u32, payload: impl Into<Payload>) -> Result<(), String> {
        let payload = payload.into();
        version::check_available(payload.message_type(), self.negotiated).map_err(|e| e.to_string())?;
        self.outbox.send(Message::new(id, payload)).await.map_err(|_| "the connection closed".to_string())
    }

    /// Sends `core.shutdown` and waits until the agent has closed the connection.
    pub async fn shutdown(self) -> Result<(), String> {
        self.outbox.send(Message::new(0, Shutdown)).await.map_err(|_| "the connection closed")?;
        drop(self.outbox);
        let closed = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.reader)
            .await
            .map_err(|_| "the agent did not close the connection after core.shutdown".to_string())?;
        closed.map_err(|e| e.to_string())??;
        self.writer.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
    }

    /// One ping, answered by a pong: the round-trip time.
    pub async fn ping(&self) -> Result<Duration, String> {
        let start = Instant::now();
        let mut s = self.request(Ping {}).await?;
        match s.recv().await.map(|m| m.payload) {
            Some(Payload::Pong(_)) => Ok(start.elapsed()),
            other => Err(unexpected("core.pong", other)),
        }
    }

    /// Runs a command: its stdin is read from `stdin`, its output written as it
    /// comes. Ok(Ok(code)) when it ran, Ok(Err(failed)) when it could not start.
    pub async fn exec(
        &self,
        req: ExecRequest,
        stdin: impl AsyncRead + Send + Unpin + 'static,
        stdout: &mut (impl AsyncWrite + Unpin),
        stderr: &mut (impl AsyncWrite + Unpin),
    ) -> Result<Result<i32, Box<ExecFailed>>, String> {
        let mut s = self.request(req).await?;
        let (id, out) = (s.id, self.outbox.clone());
        let feeder = tokio::spawn(async move {
            let mut stdin = stdin;
            let mut buf = BytesMut::new();
            loop {
                buf.reserve(64 * 1024);
                let n = stdin.read_buf(&mut buf).await.unwrap_or(0);
                // An empty chunk is the end of input.
                if out.send(Message::new(id, ExecStdin { data: buf.split().freeze() })).await.is_err() || n == 0 {
                    return;
                }
            }
        });
        let result = loop {
            match s.recv().await.map(|m| m.payload) {
                Some(Payload::ExecStarted(_)) => {}
                Some(Payload::ExecStdout(o)) => stdout.write_all(&o.data).await.map_err(|e| e.to_string())?,
                Some(Payload::ExecStderr(o)) => stderr.write_all(&o.data).await.map_err(|e| e.to_string())?,
                Some(Payload::ExecStdinError(e)) => eprintln!("agentwire host: the command's stdin: {}", e.message),
                Some(Payload::ExecExited(e)) => break Ok(Ok(e.code)),
                Some(Payload::ExecFailed(f)) => break Ok(Err(f)),
                other => break Err(unexpected("core.exec.exited", other)),
            }
        };
        feeder.abort();
        stdout.flush().await.map_err(|e| e.to_string())?;
        stderr.flush().await.map_err(|e| e.to_string())?;
        result
    }

    /// Runs a command with this process's stdin, stdout and stderr, and gives
    /// the status a shell would: the command's own, or 127 when it was not
    /// found and 126 when it could not be run, said on stderr after `who`.
    /// A command killed by a signal (code -1), or a code that is no exit
    /// status, gives 255, never success, and is said on stderr too.
    pub async fn exec_with_stdio(&self, req: ExecRequest, who: &str) -> Result<u8, String> {
        let cmd = req.cmd.clone();
        let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
        match self.exec(req, tokio::io::stdin(), &mut stdout, &mut stderr).await? {
            Ok(code) => Ok(exit_status(code).unwrap_or_else(|| {
                if code == -1 {
                    eprintln!("{who}: {cmd} was killed by a signal");
                } else {
                    eprintln!("{who}: {cmd} ended with code {code}, which is no exit status");
                }
                255
            })),
            Err(failed) => {
                eprintln!("{who}: {cmd} ({}): {}", failed.kind.as_str(), failed.message);
                Ok(if failed.kind == ExecFailureKind::NotFound { 127 } else { 126 })
            }
        }
    }

    /// One request and its response.
    pub async fn fs(&self, op: FsOp) -> Result<Option<FsResponseData>, String> {
        let mut s = self.request(FsRequest { op }).await?;
        fs_response(&mut s).await
    }

    async fn open_file(&self, path: &str, options: FsOpenOptions) -> Result<u64, String> {
        match self.fs(FsOp::OpenFile { path: path.into(), options }).await? {
            Some(FsResponseData::Handle(h)) => Ok(h),
            other => Err(format!("opening {path}: expected a handle, got {other:?}")),
        }
    }

    /// Writes everything `data` gives to `path` in `FS_CHUNK_SIZE` chunks; the number of bytes written.
    pub async fn fs_put(&self, path: &str, mut data: impl AsyncRead + Unpin, len: Option<u64>) -> Result<u64, String> {
        let options = FsOpenOptions { write: true, create: true, truncate: true, ..Default::default() };
        let handle = self.open_file(path, options).await?;
        let mut s = self.request(FsRequest { op: FsOp::Write { handle, offset: 0, len } }).await?;
        let mut sent = 0u64;
        loop {
            let mut chunk = BytesMut::with_capacity(FS_CHUNK_SIZE);
            while chunk.len() < FS_CHUNK_SIZE {
                if data.read_buf(&mut chunk).await.map_err(|e| e.to_string())? == 0 {
                    break;
                }
            }
            let done = chunk.is_empty();
            sent += chunk.len() as u64;
            self.send(s.id, FsData { data: chunk.freeze() }).await?;
            if done {
                break;
            }
        }
        let result = fs_response(&mut s).await;
        self.fs(FsOp::CloseHandle { handle }).await?;
        result.map(|_| sent)
    }

    /// Reads `path` whole into `out`; the number of bytes read.
    pub async fn fs_get(&self, path: &str, out: &mut (impl AsyncWrite + Unpin)) -> Result<u64, String> {
        let handle = self.open_file(path, FsOpenOptions { read: true, ..Default::default() }).await?;
        let mut s = self.request(FsRequest { op: FsOp::Read { handle, offset: 0, len: None } }).await?;
        let mut got = 0u64;
        let result = loop {
            match s.recv().await {
                Some(Message { payload: Payload::FsData(d), .. }) => {
                    got += d.data.len() as u64;
                    out.write_all(&d.data).await.map_err(|e| e.to_string())?;
                }
                other => break response_of(other.map(|m| m.payload)),
            }
        };
        self.fs(FsOp::CloseHandle { handle }).await?;
        out.flush().await.map_err(|e| e.to_string())?;
        result.map(|_| got)
    }
}

async fn fs_response(s: &mut Session) -> Result<Option<FsResponseData>, String> {
    response_of(s.recv().await.map(|m| m.payload))
}

fn response_of(p: Option<Payload>) -> Result<Option<FsResponseData>, String> {
    match p {
        Some(Payload::FsResponse(r)) if r.ok => Ok(r.data),
        Some(Payload::FsResponse(r)) => Err(r.error.unwrap_or_else(|| "failed, without a reason".into())),
        other => Err(unexpected("core.fs.response", other)),
    }
}

/// The exit status of a `core.exec.exited` code, when it is one (0..=255):
/// not for -1 (killed by a signal) or any other code out of that range.
pub fn exit_status(code: i32) -> Option<u8> {
    u8::try_from(code).ok()
}

/// Describes what came instead of what was expected.
pub fn unexpected(expected: &str, got: Option<Payload>) -> String {
    match got {
        None => format!("the connection ended before {expected}"),
        Some(Payload::Error(e)) => format!("core.error ({}): {}", e.kind.as_str(), e.message),
        Some(p) => format!("expected {expected}, got {}", p.message_type()),
    }
}

#[cfg(test)]
mod tests {
    use super::exit_status;

    #[test]
    fn only_a_code_in_0_to_255_is_an_exit_status() {
        for code in [0, 1, 7, 126, 137, 255] {
            assert_eq!(exit_status(code), Some(code as u8), "{code}");
        }
        // -1 is a command killed by a signal: never success, never clamped to 0.
        for code in [-1, -2, -255, i32::MIN, 256, 300, i32::MAX] {
            assert_eq!(exit_status(code), None, "{code}");
        }
    }
}
