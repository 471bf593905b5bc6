//! A streamed `core.fs` write that does not finish is never left silently:
//! when a reply is still possible, the error says the file holds a partial
//! write (the bytes written, the offsets); when the host goes away in the
//! middle (connection closed, relay client gone), the agent logs a warning
//! naming the file and the bytes written, and removes the file if the
//! handle's own `OpenFile` created it and no write on it had finished.
//!
//! Each test starts `agentwire agent` on a Unix socket in a temporary
//! directory with its standard error collected, and drives it with raw
//! frames, so that the transfer can be cut exactly where the test wants.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentwire::payload::bootstrap::GuestBootstrap;
use agentwire::payload::core::{InitAck, Ping, RelayClientDisconnected};
use agentwire::payload::fs::{FsData, FsOp, FsOpenOptions, FsRequest, FsResponse, FsResponseData};
use agentwire::relay::AGENT_RELAY_ID_RANGE_STEP as STEP;
use agentwire::{Message, MessageCodec, Payload};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

use common::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_agentwire");
const MIB: usize = 1 << 20;

/// `agentwire agent` with its standard error kept; killed on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
    log: Arc<Mutex<String>>,
    tmp: TempDir,
}

impl Agent {
    /// Started by `sh -c PRELUDE; exec agentwire agent ...` (a `ulimit`, say).
    fn start(tag: &str, prelude: &str) -> Agent {
        use std::io::BufRead;
        let tmp = TempDir::new(tag);
        std::fs::create_dir(tmp.0.join("root")).unwrap();
        let socket = tmp.0.join("agent.sock");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("{prelude}\nexec \"$0\" agent --listen \"$1\" --root \"$2\""))
            .arg(BIN)
            .arg(&socket)
            .arg(tmp.0.join("root"))
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (sink, stderr) = (log.clone(), std::io::BufReader::new(child.stderr.take().unwrap()));
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        common::wait_listening(&socket);
        Agent { child, socket, log, tmp }
    }

    fn root(&self) -> PathBuf {
        self.tmp.0.join("root")
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The first line of the log containing every one of `words`, waiting up to 10 s for it.
    fn wait_line(&self, words: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.log().lines().find(|l| words.iter().all(|w| l.contains(w))) {
                return line.to_string();
            }
            assert!(Instant::now() < deadline, "no line with {words:?} in the agent's log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A raw connection after the start-up exchange.
    async fn connect(&self) -> Framed<UnixStream, MessageCodec> {
        let mut framed = Framed::new(UnixStream::connect(&self.socket).await.unwrap(), MessageCodec::new());
        framed.send(Message::new(0, GuestBootstrap::default())).await.unwrap();
        assert_eq!(next(&mut framed).await.message_type().wire_name(), "core.init.resolved");
        framed.send(Message::new(0, InitAck::default())).await.unwrap();
        assert_eq!(next(&mut framed).await.message_type().wire_name(), "core.ready");
        framed
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Raw = Framed<UnixStream, MessageCodec>;

async fn next(framed: &mut Raw) -> Message {
    let item = tokio::time::timeout(Duration::from_secs(20), framed.next()).await.expect("a frame within 20 s");
    item.expect("the connection is open").expect("the stream is intact").expect("the frame decodes")
}

/// The `core.fs.response` on `id`.
async fn response(framed: &mut Raw, id: u32) -> FsResponse {
    loop {
        let m = next(framed).await;
        if let (true, Payload::FsResponse(r)) = (m.id == id, m.payload) {
            return *r;
        }
    }
}

/// Opens `path` for writing (created if missing, not truncated) on `id`; the handle.
async fn open(framed: &mut Raw, id: u32, path: &str) -> u64 {
    let options = FsOpenOptions { write: true, create: true, ..FsOpenOptions::default() };
    framed.send(Message::new(id, FsRequest::new(FsOp::OpenFile { path: path.into(), options }))).await.unwrap();
    match response(framed, id).await {
        FsResponse { ok: true, data: Some(FsResponseData::Handle(h)), .. } => h,
        other => panic!("open {path}: {other:?}"),
    }
}

/// Starts a write stream on `id` and sends `chunks` chunks of 1 MiB of `byte` (no end).
async fn write_chunks(framed: &mut Raw, id: u32, handle: u64, len: Option<u64>, chunks: usize, byte: u8) {
    framed.send(Message::new(id, FsRequest::new(FsOp::Write { handle, offset: 0, len }))).await.unwrap();
    for _ in 0..chunks {
        framed.send(Message::new(id, FsData { data: Bytes::from(vec![byte; MIB]) })).await.unwrap();
    }
}

/// Waits until `path` holds `size` bytes: the agent has written what was sent.
fn wait_size(path: &Path, size: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) != size {
        assert!(Instant::now() < deadline, "{} never held {size} bytes", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a warning says reached the file: the bytes written, plus those of a
/// chunk still being written when the host went away (the file's size can
/// show a chunk before its write returns).
fn said_written(line: &str) -> u64 {
    let number_before = |marker: &str| -> Option<u64> {
        let head = &line[..line.find(marker)?];
        head.rsplit(' ').next()?.parse().ok()
    };
    let written = number_before(" bytes written").unwrap_or_else(|| panic!("no bytes written in {line}"));
    written + number_before(" bytes was being written").unwrap_or(0)
}

fn wait_gone(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while path.exists() {
        assert!(Instant::now() < deadline, "{} is still there", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The connection closes in the middle of three write streams: to a file the
/// stream's handle created (removed), to a file that existed (kept, with what
/// was written), and to a file created by its handle whose first write was
/// answered (kept). Each is named in a warning with the bytes written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_by_the_connection_is_logged_and_a_file_it_created_is_removed() {
    let agent = Agent::start("partial-drop", "");
    let root = agent.root();
    std::fs::write(root.join("old.bin"), b"ORIGINAL CONTENT").unwrap();
    let mut framed = agent.connect().await;

    let new = open(&mut framed, 1, "/new.bin").await;
    assert!(root.join("new.bin").exists(), "OpenFile with create made the file");
    let old = open(&mut framed, 2, "/old.bin").await;
    let kept = open(&mut framed, 3, "/kept.bin").await;
    // A whole write on /kept.bin, answered: the host knows the file.
    write_chunks(&mut framed, 4, kept, Some(MIB as u64), 1, b'k').await;
    framed.send(Message::new(4, FsData { data: Bytes::new() })).await.unwrap();
    let answered = response(&mut framed, 4).await;
    assert!(answered.ok, "{answered:?}");

    // Three streams cut in the middle: 2 MiB, 1 MiB and 1 MiB written of more announced.
    write_chunks(&mut framed, 5, new, Some(8 * MIB as u64), 2, b'n').await;
    write_chunks(&mut framed, 6, old, Some(8 * MIB as u64), 1, b'o').await;
    write_chunks(&mut framed, 7, kept, Some(8 * MIB as u64), 1, b'K').await;
    wait_size(&root.join("new.bin"), 2 * MIB as u64);
    wait_size(&root.join("old.bin"), MIB as u64);
    framed.send(Message::new(8, Ping {})).await.unwrap();
    next(&mut framed).await; // the pong: every chunk before it was taken
    drop(framed);

    let line = agent.wait_line(&["/new.bin", "abandoned"]);
    assert!(line.contains("WARN") && line.contains("removed"), "{line}");
    assert_eq!(said_written(&line), 2 * MIB as u64, "{line}");
    wait_gone(&root.join("new.bin"));
    let line = agent.wait_line(&["/old.bin", "abandoned"]);
    assert!(line.contains("WARN") && line.contains("partial write"), "{line}");
    assert_eq!(said_written(&line), MIB as u64, "{line}");
    // What was written stays (a chunk under way when the host left is finished).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let old_now = std::fs::read(root.join("old.bin")).unwrap();
        if old_now.len() == MIB && old_now.iter().all(|b| *b == b'o') {
            break;
        }
        assert!(Instant::now() < deadline, "/old.bin does not hold what was written");
        std::thread::sleep(Duration::from_millis(10));
    }
    let line = agent.wait_line(&["/kept.bin", "abandoned"]);
    assert!(line.contains("partial write") && !line.contains("is removed"), "{line}");
    assert!(root.join("kept.bin").exists(), "a file whose first write was answered was removed");
    eprintln!("{}", agent.log().trim_end());
}

/// A relay client leaves (`core.relay.client.disconnected` for its range) in
/// the middle of a write to a file its handle created: the file is removed
/// and said so, and the connection, and the other slots, go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_by_its_relay_client_leaving_removes_the_file_it_created() {
    let agent = Agent::start("partial-client", "");
    let root = agent.root();
    let mut framed = agent.connect().await;
    let (slot1, slot2) = (STEP + 1, 2 * STEP + 1);
    let handle = open(&mut framed, slot1, "/client.bin").await;
    write_chunks(&mut framed, slot1 + 1, handle, None, 3, b'c').await;
    wait_size(&root.join("client.bin"), 3 * MIB as u64);
    let left = RelayClientDisconnected { id_start: STEP, id_end_exclusive: 2 * STEP, incarnation: None };
    framed.send(Message::new(0, left)).await.unwrap();
    let line = agent.wait_line(&["/client.bin", "abandoned"]);
    assert!(line.contains("removed"), "{line}");
    assert_eq!(said_written(&line), 3 * MIB as u64, "{line}");
    wait_gone(&root.join("client.bin"));
    // The connection goes on for another slot.
    let other = open(&mut framed, slot2, "/other.bin").await;
    write_chunks(&mut framed, slot2 + 1, other, Some(MIB as u64), 1, b'x').await;
    framed.send(Message::new(slot2 + 1, FsData { data: Bytes::new() })).await.unwrap();
    assert!(response(&mut framed, slot2 + 1).await.ok);
    assert_eq!(std::fs::metadata(root.join("other.bin")).unwrap().len(), MIB as u64);
}

/// Writes that fail with the host still there are answered with an error
/// that says the file holds a partial write, how many bytes and where: the
/// agent runs with a file size limit (`ulimit -f`, `SIGXFSZ` ignored), and a
/// stream announces more bytes than it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_says_the_file_is_partial_with_the_bytes_written() {
    // 2048 blocks: 1 MiB where a block is 512 bytes (POSIX sh), 2 MiB where it is 1 KiB (bash).
    let agent = Agent::start("partial-fail", "trap '' XFSZ\nulimit -f 2048 || exit 9");
    let root = agent.root();
    let mut framed = agent.connect().await;
    let handle = open(&mut framed, 1, "/big.bin").await;
    write_chunks(&mut framed, 2, handle, Some(8 * MIB as u64), 8, b'b').await;
    framed.send(Message::new(2, FsData { data: Bytes::new() })).await.unwrap();
    let r = response(&mut framed, 2).await;
    let error = r.error.clone().unwrap_or_default();
    let on_disk = std::fs::metadata(root.join("big.bin")).unwrap().len();
    eprintln!("write past the file size limit: {error:?}; {on_disk} bytes on disk");
    assert!(!r.ok, "{r:?}");
    // The whole chunks before the failure are said; the failing chunk may have added some.
    let said: u64 = error
        .split("partial write: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {error:?}"));
    assert!(error.contains("/big.bin") && error.contains(&format!("offsets 0..{said}")), "{error}");
    assert!(said > 0 && said < 8 * MIB as u64 && said <= on_disk, "said {said}, on disk {on_disk}");
    assert!(agent.log().lines().all(|l| !l.contains("abandoned")), "{}", agent.log());

    // Fewer bytes than announced.
    let handle = open(&mut framed, 3, "/short.bin").await;
    framed.send(Message::new(4, FsRequest::new(FsOp::Write { handle, offset: 10, len: Some(100) }))).await.unwrap();
    framed.send(Message::new(4, FsData { data: Bytes::from(vec![b'5'; 50]) })).await.unwrap();
    framed.send(Message::new(4, FsData { data: Bytes::new() })).await.unwrap();
    let r = response(&mut framed, 4).await;
    let error = r.error.unwrap_or_default();
    assert!(!r.ok && error.contains("partial write") && error.contains("50 bytes, at offsets 10..60"), "{error}");
    assert_eq!(std::fs::metadata(root.join("short.bin")).unwrap().len(), 60);
}
