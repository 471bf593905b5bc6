//! File and TCP data as raw bulk records (generation 8, spec section 7) as
//! the client speaks them, against a scripted agent: the session core's
//! agent role over an in-memory stream, whose requests the test answers
//! frame by frame, checking what the client sends with the session core's
//! own bulk rules.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use agentwire::payload::bulk::{
    BulkAccepted, BulkCancel, BulkCancelReason, BulkFlow, BulkKind, BulkOffer, MAX_BULK_RECORD_PAYLOAD,
};
use agentwire::payload::core::{Ready, ResolvedUser};
use agentwire::payload::fs::{FsData, FsEntryInfo, FsOp, FsRequest, FsResponse, FsResponseData};
use agentwire::payload::tcp::{TcpClosed, TcpConnected};
use agentwire::{Message, MessageType, Payload};
use agentwire_client::{Builder, Client, ClientError};
use agentwire_session::bulk::{BulkOperation, BulkReceiver, BulkSender};
use agentwire_session::driver::{self, Driver, Handle, Incoming, Route};
use agentwire_session::{Config, Connection, Event};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// Counts allocations of [`LARGE_SIZE`] or more on the threads that ask for it (each
/// test runs on its own thread; a current-thread runtime keeps a test's tasks
/// on it), in const thread-locals so that counting never allocates.
struct CountingLarge;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static LARGE: Cell<usize> = const { Cell::new(0) };
}

/// What counts as a large allocation: a quarter of a record, below any
/// buffer a 1 MiB frame is gathered in, above anything else the read makes.
const LARGE_SIZE: usize = 256 << 10;

fn note(size: usize) {
    if size >= LARGE_SIZE && COUNTING.with(Cell::get) {
        LARGE.with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: every call goes to the system allocator unchanged; the counting
// touches only const-initialised thread-locals of plain integers.
unsafe impl GlobalAlloc for CountingLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingLarge = CountingLarge;

/// The handle the scripted agent gives every opened file.
const HANDLE: u64 = 7;

/// A scripted agent of generation 10: it runs the start-up exchange and
/// hands each request to the test.
struct FakeAgent {
    _driver: Driver,
    handle: Handle,
    requests: mpsc::UnboundedReceiver<(Message, Route)>,
}

impl FakeAgent {
    async fn request(&mut self) -> (Message, Route) {
        within(self.requests.recv()).await.expect("a request")
    }

    /// Answers `OpenFile`, `FStat` (with `size`) and `CloseHandle` until
    /// another request comes: that one.
    async fn next(&mut self, size: u64) -> (Message, Route) {
        loop {
            let (m, route) = self.request().await;
            let answer = match &m.payload {
                Payload::FsRequest(req) => match &req.op {
                    FsOp::OpenFile { .. } => FsResponse::success(Some(FsResponseData::Handle(HANDLE))),
                    FsOp::FStat { handle } if *handle == HANDLE => {
                        let info = FsEntryInfo { kind: "file".into(), size, ..FsEntryInfo::default() };
                        FsResponse::success(Some(FsResponseData::Stat(info)))
                    }
                    FsOp::CloseHandle { handle } if *handle == HANDLE => FsResponse::success(None),
                    _ => return (m, route),
                },
                _ => return (m, route),
            };
            route.send(answer).await.unwrap();
        }
    }

    /// The same, for a file-system request.
    async fn fs_request(&mut self, size: u64) -> (FsRequest, Route) {
        let (m, route) = self.next(size).await;
        match m.payload {
            Payload::FsRequest(req) => (*req, route),
            other => panic!("not an fs request: {other:?}"),
        }
    }

    /// Answers what follows a transfer (the handle's close) in the background.
    fn serve_the_rest(mut self) {
        tokio::spawn(async move {
            loop {
                let _ = self.next(0).await;
            }
        });
    }
}

/// Waits at most 20 s for `f`.
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f).await.expect("within 20 s")
}

/// A capture of the client's connection, to count frames by type.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// The type of every frame captured so far (both directions), by its
    /// wire name (`bulk.record` for a record).
    fn types(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap().clone();
        let mut rest = &bytes[..];
        let mut out = Vec::new();
        while rest.len() >= 9 {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let (frame, next) = rest.split_at(4 + len);
            if frame[8] == 0x08 {
                out.push("bulk.record".to_string());
            } else {
                // The envelope: a3 61 76 <v> 61 74 <text head> name ...
                let body = &frame[9..];
                let at = if body[3] < 0x18 { 4 } else { 5 };
                let head = body[at + 2];
                let (n, start) =
                    if head < 0x78 { ((head - 0x60) as usize, at + 3) } else { (body[at + 3] as usize, at + 4) };
                out.push(String::from_utf8_lossy(&body[start..start + n]).into_owned());
            }
            rest = next;
        }
        out
    }

    fn count(&self, t: &str) -> usize {
        self.types().iter().filter(|x| *x == t).count()
    }
}

/// A client connected through `builder` (with a capture) to a scripted agent.
async fn connect(builder: Builder) -> (Client, FakeAgent, Capture) {
    let (host_io, agent_io) = tokio::io::duplex(256 * 1024);
    let conn = Connection::agent(Config::default(), std::time::Instant::now());
    connect_to(builder, host_io, driver::spawn(conn, agent_io, None)).await
}

#[cfg(target_os = "linux")] // `spawn_splicing` is Linux's
/// The same over a Unix socketpair, the scripted agent's driver splicing
/// piped records into its end (with `agent_capture`, it may not).
async fn connect_splicing(
    builder: Builder,
    agent_capture: Option<Box<dyn std::io::Write + Send>>,
) -> (Client, FakeAgent, Capture) {
    let (host_io, agent_io) = tokio::net::UnixStream::pair().unwrap();
    let fd = std::os::fd::AsFd::as_fd(&agent_io).try_clone_to_owned().unwrap();
    let conn = Connection::agent(Config::default(), std::time::Instant::now());
    connect_to(builder, host_io, driver::spawn_splicing(conn, agent_io, agent_capture, fd)).await
}

async fn connect_to(
    builder: Builder,
    host_io: impl AsyncRead + AsyncWrite + Send + Unpin + 'static,
    (driver, handle, mut incoming): (Driver, Handle, mpsc::UnboundedReceiver<Incoming>),
) -> (Client, FakeAgent, Capture) {
    let (tx, requests) = mpsc::unbounded_channel();
    let agent = handle.clone();
    tokio::spawn(async move {
        while let Some(item) = incoming.recv().await {
            match item {
                Incoming::Event(Event::Bootstrap(_)) => {
                    agent.send_now(|c| c.init_resolved(ResolvedUser { uid: 0, gid: 0 })).unwrap();
                }
                Incoming::Event(Event::InitAcked) => {
                    let ready = Ready { agent_version: "scripted".into(), ..Ready::default() };
                    agent.send_now(|c| c.ready(ready)).unwrap();
                }
                Incoming::Request { message, route } => {
                    let _ = tx.send((message, route));
                }
                _ => {}
            }
        }
    });
    let capture = Capture::default();
    let client = within(builder.capture(capture.clone()).connect(host_io)).await.expect("the client connects");
    assert_eq!(client.negotiated(), 10);
    (client, FakeAgent { _driver: driver, handle, requests }, capture)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 65536) as u8).collect()
}

/// A destination that takes `per_write` bytes at most per write, slowly,
/// counting what it has taken.
struct SlowWriter {
    taken: Arc<AtomicU64>,
    data: Vec<u8>,
    per_write: usize,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncWrite for SlowWriter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(2))));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.sleep = None;
        let n = buf.len().min(self.per_write);
        self.data.extend_from_slice(&buf[..n]);
        self.taken.fetch_add(n as u64, Ordering::SeqCst);
        Poll::Ready(Ok(n))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A source of `pattern(len)` that counts how far it has been read.
struct CountingReader {
    data: Bytes,
    read: Arc<AtomicU64>,
}

impl AsyncRead for CountingReader {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = buf.remaining().min(self.data.len()).min(64 * 1024);
        let piece = self.data.split_to(n);
        buf.put_slice(&piece);
        self.read.fetch_add(n as u64, Ordering::SeqCst);
        Poll::Ready(Ok(()))
    }
}

/// The offer of a read, checked, and the acceptance the deployed guest fills.
fn accept_read(req: &FsRequest) -> (BulkOffer, BulkAccepted) {
    let offer = req.bulk.expect("a bulk offer on the read");
    assert!(matches!(req.op, FsOp::Read { handle: HANDLE, offset: 0, len: None }), "{:?}", req.op);
    assert_eq!(offer.format, 1);
    assert_eq!(offer.max_record_payload, MAX_BULK_RECORD_PAYLOAD as u32);
    assert_eq!(offer.guest_to_host_credit_limit, 8 << 20, "8 MiB of credit up front");
    (offer, BulkOperation::FileRead.accept(&offer).unwrap())
}

/// Accepts the read `req` on `route` ([`accept_read`]): its sender of
/// records of at most 1 MiB within the client's credit.
async fn accept_and_send(req: &FsRequest, route: &Route) -> BulkSender {
    let (_, accepted) = accept_read(req);
    route.send(accepted).await.unwrap();
    let (kind, flow) = (BulkKind::Filesystem, BulkFlow::GuestToHost);
    BulkSender::new(kind, flow, 1 << 20, accepted.guest_to_host_credit_limit)
}

/// Takes the client's credits until `tx` may send again.
async fn wait_for_credit(route: &mut Route, tx: &mut BulkSender) {
    while tx.window() == 0 {
        let m = within(route.recv()).await.unwrap();
        let Payload::BulkCredit(c) = m.payload else { panic!("{m:?}") };
        tx.credit(&c).unwrap();
    }
}

/// Sends the rest of `data`, from `tx`'s offset on, in records of at most
/// 1 MiB within the credit the client grants.
async fn send_rest(route: &mut Route, tx: &mut BulkSender, data: &Bytes) {
    loop {
        let at = tx.sent() as usize;
        if at == data.len() {
            return;
        }
        wait_for_credit(route, tx).await;
        let n = tx.window().min(data.len() - at).min(1 << 20);
        route.send(tx.record(data.slice(at..at + n)).unwrap()).await.unwrap();
    }
}

/// A read's records go to a slow destination; the client credits only what
/// the destination has taken (never more than 8 MiB ahead of it), and once
/// the agent's credit passes the end of the file it sends no more (a credit
/// then could reach the agent after its response).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_credited_as_its_destination_takes_the_data_and_not_past_the_end() {
    let (client, mut agent, capture) = connect(Client::builder()).await;
    let size = 20 << 20;
    let data = Bytes::from(pattern(size));
    let taken = Arc::new(AtomicU64::new(0));
    let mut out = SlowWriter { taken: taken.clone(), data: Vec::new(), per_write: 256 * 1024, sleep: None };
    let guest = tokio::spawn({
        let taken = taken.clone();
        let data = data.clone();
        async move {
            let (req, mut route) = agent.fs_request(size as u64).await;
            let mut tx = accept_and_send(&req, &route).await;
            let mut credits = Vec::new();
            // Records of 1 MiB within the credit; a read at the end finishes.
            loop {
                while tx.window() == 0 {
                    let m = within(route.recv()).await.unwrap();
                    let Payload::BulkCredit(c) = m.payload else { panic!("{m:?}") };
                    let took = taken.load(Ordering::SeqCst);
                    assert!(
                        c.consumed_offset <= took,
                        "credit for {} bytes; the destination took {took}",
                        c.consumed_offset
                    );
                    assert!(c.credit_limit - c.consumed_offset <= 8 << 20);
                    assert!(tx.credit(&c).unwrap());
                    credits.push(c);
                }
                let at = tx.sent() as usize;
                if at == size {
                    break;
                }
                let n = tx.window().min(size - at);
                route.send(tx.record(data.slice(at..at + n)).unwrap()).await.unwrap();
            }
            // The read at the end of the file takes a while: a credit that
            // comes meanwhile would, with a faster disk, come after the response.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let late: Vec<Message> = std::iter::from_fn(|| route.try_recv()).collect();
            route.send(tx.finish()).await.unwrap();
            route.send(FsResponse::success(None)).await.unwrap();
            agent.serve_the_rest();
            (credits, late)
        }
    });
    let got = within(client.read_file("/big", &mut out)).await.unwrap();
    assert_eq!(got, size as u64);
    assert!(out.data == data, "the file arrives intact");
    let (credits, late) = within(guest).await.unwrap();
    assert!(!credits.is_empty());
    assert!(late.is_empty(), "credit once the agent could read to the end: {late:?}");
    // Nothing late: no credit after the response, so no cancel for it either.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let types = capture.types();
    assert_eq!(capture.count("core.bulk.credit"), credits.len(), "{types:?}");
    assert_eq!(capture.count("core.bulk.cancel"), 0, "{types:?}");
    assert_eq!(capture.count("core.fs.data"), 0);
    assert_eq!(capture.count("bulk.record"), 20);
}

/// A file that grew after its size was asked: the agent's credit passes the
/// size it was told, but not the file's end; the client still grants more
/// once the agent has sent everything it may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_a_file_that_grew_is_not_starved() {
    let (client, mut agent, _capture) = connect(Client::builder()).await;
    let size = 12 << 20;
    let data = Bytes::from(pattern(size));
    let guest = tokio::spawn({
        let data = data.clone();
        async move {
            // The size it reports is 1 MiB.
            let (req, mut route) = agent.fs_request(1 << 20).await;
            let (_, accepted) = accept_read(&req);
            route.send(accepted).await.unwrap();
            let mut tx = BulkSender::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 1 << 20, 8 << 20);
            while (tx.sent() as usize) < size {
                wait_for_credit(&mut route, &mut tx).await;
                let at = tx.sent() as usize;
                let n = tx.window().min(size - at);
                route.send(tx.record(data.slice(at..at + n)).unwrap()).await.unwrap();
            }
            route.send(tx.finish()).await.unwrap();
            route.send(FsResponse::success(None)).await.unwrap();
            agent.serve_the_rest();
        }
    });
    let mut out = Vec::new();
    assert_eq!(within(client.read_file("/grew", &mut out)).await.unwrap(), size as u64);
    assert!(out == data);
    within(guest).await.unwrap();
}

/// A record where the rules do not allow it: the client cancels (reason 5)
/// and the read fails saying why.
#[tokio::test]
async fn a_read_whose_agent_breaks_the_rules_is_cancelled() {
    let (client, mut agent, _capture) = connect(Client::builder()).await;
    let guest = tokio::spawn(async move {
        let (req, mut route) = agent.fs_request(100).await;
        let (_, accepted) = accept_read(&req);
        route.send(accepted).await.unwrap();
        let mut tx = BulkSender::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 1 << 20, 8 << 20);
        route.send(tx.record(Bytes::from_static(b"0123456789")).unwrap()).await.unwrap();
        // Offset 20 where 10 is next.
        let wrong = agentwire::payload::bulk::BulkRecord::new(
            BulkKind::Filesystem,
            BulkFlow::GuestToHost,
            20,
            Bytes::from_static(b"x"),
        );
        route.send(wrong).await.unwrap();
        let m = within(route.recv()).await.unwrap();
        let Payload::BulkCancel(c) = m.payload else { panic!("{m:?}") };
        route.send(FsResponse::failure(c.message.clone())).await.unwrap();
        agent.serve_the_rest();
        c
    });
    let mut out = Vec::new();
    let err = within(client.read_file("/f", &mut out)).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("read /f") && text.contains("broke the bulk rules") && text.contains("at 20"), "{text}");
    let cancel = within(guest).await.unwrap();
    assert_eq!((cancel.kind, cancel.reason), (BulkKind::Filesystem, BulkCancelReason::ProtocolViolation));
    assert_eq!(out, b"0123456789");
}

/// An acceptance that does not match the offer: the read is abandoned with
/// an error that says so, and the agent is told with a cancel.
#[tokio::test]
async fn an_acceptance_that_breaks_the_rules_abandons_the_read() {
    let (client, mut agent, _capture) = connect(Client::builder()).await;
    let guest = tokio::spawn(async move {
        let (req, mut route) = agent.fs_request(100).await;
        let (_, accepted) = accept_read(&req);
        // Both flows for a read.
        route.send(BulkAccepted { flows: 3, host_to_guest_credit_limit: 1 << 20, ..accepted }).await.unwrap();
        let m = within(route.recv()).await.unwrap();
        let Payload::BulkCancel(c) = m.payload else { panic!("{m:?}") };
        route.send(FsResponse::failure(c.message.clone())).await.unwrap();
        agent.serve_the_rest();
        c
    });
    let err = within(client.read_file("/f", &mut Vec::new())).await.unwrap_err();
    assert!(matches!(&err, ClientError::Fs { .. }), "{err:?}");
    assert!(err.to_string().contains("bulk acceptance refused: flows"), "{err}");
    assert_eq!(within(guest).await.unwrap().reason, BulkCancelReason::ProtocolViolation);
}

/// A write's source is read only as far as the agent's credit goes, its
/// records stay within that credit, and the finish precedes the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_reads_its_source_only_as_the_agents_credit_allows() {
    let (client, mut agent, capture) = connect(Client::builder()).await;
    let size = 3 << 20;
    let data = Bytes::from(pattern(size));
    let read = Arc::new(AtomicU64::new(0));
    let source = CountingReader { data: data.clone(), read: read.clone() };
    let window = 256 * 1024u64;
    let guest = tokio::spawn({
        let read = read.clone();
        async move {
            let (req, mut route) = agent.fs_request(0).await;
            let offer = req.bulk.expect("a bulk offer on the write");
            assert!(matches!(req.op, FsOp::Write { handle: HANDLE, offset: 0, len: Some(l) } if l == size as u64));
            assert_eq!((offer.format, offer.guest_to_host_credit_limit), (1, 0));
            let accepted =
                BulkAccepted { host_to_guest_credit_limit: window, ..BulkOperation::FileWrite.accept(&offer).unwrap() };
            route.send(accepted).await.unwrap();
            let (kind, flow) = (BulkKind::Filesystem, BulkFlow::HostToGuest);
            let mut rx = BulkReceiver::new(kind, flow, accepted.max_record_payload, window, window);
            let (mut got, mut limit, mut credits) = (Vec::new(), window, 0);
            loop {
                let m = within(route.recv()).await.unwrap();
                match m.payload {
                    Payload::BulkRecord(r) => {
                        rx.record(&r).expect("the record keeps the rules");
                        got.extend_from_slice(&r.data);
                        // Slow, so that a client that read ahead would show it.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        let source_read = read.load(Ordering::SeqCst);
                        assert!(source_read <= limit, "{source_read} bytes of the source read with credit to {limit}");
                        if let Some(c) = rx.consumed(r.data.len()) {
                            limit = c.credit_limit;
                            credits += 1;
                            route.send(c).await.unwrap();
                        }
                    }
                    Payload::BulkFinish(f) => {
                        assert!(rx.finish(&f).unwrap());
                        break;
                    }
                    other => panic!("{other:?}"),
                }
            }
            route.send(FsResponse::success(None)).await.unwrap();
            agent.serve_the_rest();
            (got, credits)
        }
    });
    let n = within(client.write_file("/up", source, Some(size as u64))).await.unwrap();
    assert_eq!(n, size as u64);
    let (got, credits) = within(guest).await.unwrap();
    assert!(got == data, "the file arrives intact");
    // One a half window consumed: about one a window's worth of records.
    assert!(credits >= size as u64 / window - 1, "{credits} credits");
    assert_eq!(capture.count("core.fs.data"), 0);
}

/// The agent's cancel (its file write failed) ends the write with an error
/// that names it; the client sends nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_cancel_ends_a_write_with_an_error_naming_it() {
    let (client, mut agent, capture) = connect(Client::builder()).await;
    let guest = tokio::spawn(async move {
        let (req, mut route) = agent.fs_request(0).await;
        let accepted = BulkAccepted {
            host_to_guest_credit_limit: 65536,
            ..BulkOperation::FileWrite.accept(&req.bulk.unwrap()).unwrap()
        };
        route.send(accepted).await.unwrap();
        let m = within(route.recv()).await.unwrap();
        assert_eq!(m.message_type(), MessageType::BulkRecord);
        let cancel = BulkCancel {
            kind: BulkKind::Filesystem,
            reason: BulkCancelReason::DestinationIo,
            message: "/up: write at 0: No space left on device".into(),
        };
        route.send(cancel).await.unwrap();
        route.send(FsResponse::failure("/up: write at 0: No space left on device")).await.unwrap();
        agent.serve_the_rest();
    });
    let source = &vec![1u8; 1 << 20][..];
    let err = within(client.write_file("/up", source, None)).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("write /up")
            && text.contains("cancelled")
            && text.contains("destination I/O failed")
            && text.contains("No space left"),
        "{text}"
    );
    within(guest).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // One record within the 64 KiB, nothing after the cancel.
    assert_eq!(capture.count("bulk.record"), 1, "{:?}", capture.types());
    assert_eq!(capture.count("core.bulk.finish"), 0);
}

/// With bulk turned off, reads, writes and TCP connections carry no offer
/// and their data goes as `core.fs.data` / `core.tcp.data`.
#[tokio::test]
async fn with_bulk_off_no_offer_is_made_and_the_data_goes_as_before() {
    let (client, mut agent, capture) = connect(Client::builder().bulk(false)).await;
    let guest = tokio::spawn(async move {
        let (req, route) = agent.fs_request(5).await;
        assert!(matches!(req.op, FsOp::Read { .. }) && req.bulk.is_none(), "{req:?}");
        route.send(FsData { data: Bytes::from_static(b"hello") }).await.unwrap();
        route.send(FsResponse::success(None)).await.unwrap();
        let (req, mut route) = agent.fs_request(5).await;
        assert!(matches!(req.op, FsOp::Write { .. }) && req.bulk.is_none(), "{req:?}");
        let mut got = Vec::new();
        loop {
            let m = within(route.recv()).await.unwrap();
            let Payload::FsData(d) = m.payload else { panic!("{m:?}") };
            if d.data.is_empty() {
                break;
            }
            got.extend_from_slice(&d.data);
        }
        route.send(FsResponse::success(None)).await.unwrap();
        let (m, route) = agent.next(0).await;
        let Payload::TcpConnect(c) = m.payload else { panic!("{m:?}") };
        assert!(c.bulk.is_none());
        route.send(TcpConnected {}).await.unwrap();
        route.send(agentwire::payload::tcp::TcpData { data: Bytes::from_static(b"pong") }).await.unwrap();
        route.send(TcpClosed {}).await.unwrap();
        agent.serve_the_rest();
        got
    });
    let mut out = Vec::new();
    within(client.read_file("/f", &mut out)).await.unwrap();
    assert_eq!(out, b"hello");
    within(client.write_file("/g", &b"world"[..], None)).await.unwrap();
    let mut stream = within(client.tcp_connect("127.0.0.1", 9)).await.unwrap();
    assert_eq!(within(stream.read()).await.unwrap().as_deref(), Some(&b"pong"[..]));
    assert_eq!(within(stream.read()).await.unwrap(), None);
    assert_eq!(within(guest).await.unwrap(), b"world");
    let types = capture.types();
    assert!(types.iter().all(|t| t != "bulk.record" && !t.starts_with("core.bulk.")), "{types:?}");
    assert_eq!(capture.count("core.fs.data"), 3, "{types:?}");
}

/// A TCP connection over records: the offer on connect, the acceptance
/// after `core.tcp.connected`, writes within the agent's (small) credit,
/// reads credited only as the application reads them, the finish both ways
/// in place of `core.tcp.eof`, then `core.tcp.closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_stream_moves_records_within_credit_both_ways() {
    let (client, mut agent, capture) = connect(Client::builder()).await;
    let size = 3 << 20;
    let data = Bytes::from(pattern(size));
    let app_read = Arc::new(AtomicU64::new(0));
    let h2g_window = 64 * 1024u64;
    // An echo, as the agent's relay with a socket that echoes.
    let guest = tokio::spawn({
        let app_read = app_read.clone();
        async move {
            let (m, mut route) = agent.next(0).await;
            let Payload::TcpConnect(c) = m.payload else { panic!("{m:?}") };
            let offer = c.bulk.expect("a bulk offer on connect");
            assert_eq!(
                (offer.format, offer.max_record_payload, offer.guest_to_host_credit_limit),
                (1, 256 * 1024, 1 << 20)
            );
            route.send(TcpConnected {}).await.unwrap();
            let accepted =
                BulkAccepted { host_to_guest_credit_limit: h2g_window, ..BulkOperation::Tcp.accept(&offer).unwrap() };
            route.send(accepted).await.unwrap();
            let max = accepted.max_record_payload;
            let mut rx = BulkReceiver::new(BulkKind::Tcp, BulkFlow::HostToGuest, max, h2g_window, h2g_window);
            let mut tx = BulkSender::new(BulkKind::Tcp, BulkFlow::GuestToHost, max, offer.guest_to_host_credit_limit);
            let (mut pending, mut their_finish, mut credits) = (Vec::<u8>::new(), false, 0);
            loop {
                // Echo what the credit allows.
                while !pending.is_empty() && tx.window() > 0 {
                    let n = tx.window().min(pending.len());
                    let piece: Vec<u8> = pending.drain(..n).collect();
                    route.send(tx.record(Bytes::from(piece)).unwrap()).await.unwrap();
                }
                if their_finish && pending.is_empty() {
                    break;
                }
                let m = within(route.recv()).await.unwrap();
                match m.payload {
                    Payload::BulkRecord(r) => {
                        rx.record(&r).expect("the client's record keeps the rules");
                        pending.extend_from_slice(&r.data);
                        if let Some(c) = rx.consumed(r.data.len()) {
                            route.send(c).await.unwrap();
                        }
                    }
                    Payload::BulkCredit(c) => {
                        let read = app_read.load(Ordering::SeqCst);
                        assert!(
                            c.consumed_offset <= read + 256 * 1024,
                            "credit for {} bytes; the application has read {read}",
                            c.consumed_offset
                        );
                        tx.credit(&c).expect("the client's credit keeps the rules");
                        credits += 1;
                    }
                    Payload::BulkFinish(f) => {
                        assert!(rx.finish(&f).unwrap());
                        assert_eq!(f.final_offset, size as u64);
                        their_finish = true;
                    }
                    other => panic!("{other:?}"),
                }
            }
            route.send(tx.finish()).await.unwrap();
            route.send(TcpClosed {}).await.unwrap();
            agent.serve_the_rest();
            credits
        }
    });
    let mut stream = within(client.tcp_connect("127.0.0.1", 7)).await.unwrap();
    // One write well past the agent's 64 KiB of credit.
    within(stream.write(data.clone())).await.unwrap();
    within(stream.shutdown_write()).await.unwrap();
    within(stream.shutdown_write()).await.unwrap();
    assert!(stream.write(Bytes::from_static(b"late")).await.is_err(), "a write after shutdown_write");
    let mut echoed = Vec::new();
    while let Some(d) = within(stream.read()).await.unwrap() {
        echoed.extend_from_slice(&d);
        app_read.fetch_add(d.len() as u64, Ordering::SeqCst);
    }
    assert!(echoed == data, "{} bytes echoed of {size}", echoed.len());
    let credits = within(guest).await.unwrap();
    assert!(credits >= 2, "{credits} credits");
    within(stream.close()).await.unwrap();
    let types = capture.types();
    for (t, n) in [("core.tcp.data", 0), ("core.tcp.eof", 0), ("core.bulk.finish", 2), ("core.tcp.closed", 1)] {
        assert_eq!(capture.count(t), n, "{t}: {types:?}");
    }
    assert!(capture.count("bulk.record") >= 2 * size / (256 * 1024));
}

/// An agent serves sessions concurrently, so the answer to the `FStat` a read
/// asks for its size may come after the read's first records, up to its whole
/// initial credit: the client must still get to that answer, although those
/// unread records fill what the connection lets one session hold. (Asked for
/// alongside the read, the size waited behind them, unread, for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_size_comes_after_its_first_records_does_not_stall() {
    let (client, mut agent, _capture) = connect(Client::builder()).await;
    let size = 12 << 20;
    let data = Bytes::from(pattern(size));
    let stat_answer = move || {
        let info = FsEntryInfo { kind: "file".into(), size: size as u64, ..FsEntryInfo::default() };
        FsResponse::success(Some(FsResponseData::Stat(info)))
    };
    let guest = tokio::spawn({
        let data = data.clone();
        async move {
            let mut stat: Option<Route> = None;
            let (req, mut route) = loop {
                let (m, route) = if stat.is_some() {
                    match tokio::time::timeout(Duration::from_millis(500), agent.request()).await {
                        Ok(next) => next,
                        // A client that waits for the size before it asks for the read.
                        Err(_) => {
                            stat.take().unwrap().send(stat_answer()).await.unwrap();
                            continue;
                        }
                    }
                } else {
                    agent.request().await
                };
                let Payload::FsRequest(req) = m.payload else { panic!("{m:?}") };
                match req.op {
                    FsOp::OpenFile { .. } => {
                        route.send(FsResponse::success(Some(FsResponseData::Handle(HANDLE)))).await.unwrap()
                    }
                    FsOp::FStat { .. } => stat = Some(route),
                    FsOp::Read { .. } => break (*req, route),
                    ref other => panic!("{other:?}"),
                }
            };
            let mut tx = accept_and_send(&req, &route).await;
            // The whole initial credit in 1 MiB records, and only then the size.
            while tx.window() > 0 {
                let at = tx.sent() as usize;
                let n = tx.window().min(1 << 20);
                route.send(tx.record(data.slice(at..at + n)).unwrap()).await.unwrap();
            }
            if let Some(stat) = stat {
                stat.send(stat_answer()).await.unwrap();
            }
            send_rest(&mut route, &mut tx, &data).await;
            route.send(tx.finish()).await.unwrap();
            route.send(FsResponse::success(None)).await.unwrap();
            agent.serve_the_rest();
        }
    });
    let mut out = Vec::new();
    let got = within(client.read_file("/big", &mut out)).await.unwrap();
    assert_eq!(got, size as u64);
    assert!(out == data, "the file arrives intact");
    within(guest).await.unwrap();
}

/// 32 records of 1 MiB read by the client: its driver gathers each whole in
/// one buffer, made at its size once frames that large have come (or the
/// pool's spare, when the client has let go of it), so the read makes about
/// one large allocation a record (48 counted; with the session buffering up
/// to 8 MiB ahead of the client, most records need a buffer of their own). At
/// 29d7530, where every outgrown buffer took the reusable spare's place and
/// each record grew its buffer from a read's size, the count was 119.
#[tokio::test]
async fn a_long_read_reuses_the_drivers_buffers() {
    let (client, mut agent, _capture) = connect(Client::builder()).await;
    let size = 32 << 20;
    let data = Bytes::from(pattern(size));
    let guest = tokio::spawn({
        let data = data.clone();
        async move {
            let (m, mut route) = agent.next(size as u64).await;
            let Payload::FsRequest(req) = m.payload else { panic!("{m:?}") };
            let mut tx = accept_and_send(&req, &route).await;
            send_rest(&mut route, &mut tx, &data).await;
            route.send(tx.finish()).await.unwrap();
            route.send(FsResponse::success(None)).await.unwrap();
            agent.serve_the_rest();
        }
    });
    let mut out = Vec::with_capacity(size);
    COUNTING.with(|c| c.set(true));
    let got = within(client.read_file("/big", &mut out)).await.unwrap();
    COUNTING.with(|c| c.set(false));
    assert_eq!(got, size as u64);
    assert!(out == data, "the file arrives intact");
    let large = LARGE.with(Cell::get);
    assert!(large <= 64, "{large} allocations of 256 KiB or more for 32 records of 1 MiB");
    within(guest).await.unwrap();
}

#[cfg(target_os = "linux")] // `spawn_splicing` is Linux's
/// `data` in a new pipe (of the default 64 KiB: `data` must fit), its write
/// end closed, as a record's piped data.
fn in_a_pipe(data: &[u8]) -> agentwire::PipedData {
    in_a_pipe_claiming(data, data.len())
}

#[cfg(target_os = "linux")] // `spawn_splicing` is Linux's
/// The same, claiming `claimed` bytes.
fn in_a_pipe_claiming(data: &[u8], claimed: usize) -> agentwire::PipedData {
    let (reader, writer) = rustix::pipe::pipe().unwrap();
    let mut rest = data;
    while !rest.is_empty() {
        rest = &rest[rustix::io::write(&writer, rest).unwrap()..];
    }
    agentwire::PipedData::new(reader, claimed)
}

#[cfg(target_os = "linux")] // `spawn_splicing` is Linux's
/// What a scripted read sent: records in all, and the piped ones and their bytes.
struct Sent {
    records: usize,
    piped: u64,
    piped_bytes: u64,
}

#[cfg(target_os = "linux")] // `spawn_splicing` is Linux's
/// A read whose records alternate between piped data (64 KiB pipes) and
/// data in memory (1 MiB): the piped ones go by `splice` into the socket,
/// between the others in order, and the file arrives intact. `capture` on
/// the agent's side: the driver may not splice (the capture must see every
/// byte), so it reads the pipes into memory, with the same result on the wire.
async fn read_with_piped_records(agent_capture: Option<Box<dyn std::io::Write + Send>>) -> (Handle, Capture, Sent) {
    let capturing = agent_capture.is_some();
    let (client, mut agent, capture) = connect_splicing(Client::builder(), agent_capture).await;
    let handle = agent.handle.clone();
    assert_eq!(handle.splices(), !capturing);
    let size = 9 * ((1 << 20) + (64 << 10)) + 1000;
    let data = Bytes::from(pattern(size));
    let guest = tokio::spawn({
        let data = data.clone();
        async move {
            let (req, mut route) = agent.fs_request(size as u64).await;
            let mut tx = accept_and_send(&req, &route).await;
            let mut sent = Sent { records: 0, piped: 0, piped_bytes: 0 };
            while (tx.sent() as usize) < size {
                wait_for_credit(&mut route, &mut tx).await;
                let at = tx.sent() as usize;
                let piped = sent.records % 2 == 1;
                let most = if piped { 64 << 10 } else { 1 << 20 };
                let n = tx.window().min(size - at).min(most);
                if piped {
                    let record = tx.piped_record(in_a_pipe(&data[at..at + n])).unwrap();
                    route.send_piped(record).await.unwrap();
                    sent.piped += 1;
                    sent.piped_bytes += n as u64;
                } else {
                    route.send(tx.record(data.slice(at..at + n)).unwrap()).await.unwrap();
                }
                sent.records += 1;
            }
            route.send(tx.finish()).await.unwrap();
            route.send(FsResponse::success(None)).await.unwrap();
            agent.serve_the_rest();
            sent
        }
    });
    let mut out = Vec::new();
    let got = within(client.read_file("/big", &mut out)).await.unwrap();
    assert_eq!(got, size as u64);
    assert!(out == data, "the file arrives intact");
    let sent = within(guest).await.unwrap();
    assert!(sent.piped >= 9, "{} piped records", sent.piped);
    assert_eq!(capture.count("bulk.record"), sent.records);
    (handle, capture, sent)
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_records_are_spliced_into_the_socket_in_order() {
    let (handle, _, sent) = read_with_piped_records(None).await;
    assert!(handle.splices(), "the socket takes splice");
    let spliced = handle.counters().spliced.get();
    assert_eq!(spliced, (sent.piped, sent.piped_bytes), "every piped record spliced, whole");
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_capture_piped_records_are_read_into_memory_and_captured() {
    let agent_side = Capture::default();
    let (handle, _, sent) = read_with_piped_records(Some(Box::new(agent_side.clone()))).await;
    assert_eq!(handle.counters().spliced.get(), (0, 0));
    // The agent's capture saw every record, whole (its frames parse in turn).
    assert_eq!(agent_side.count("bulk.record"), sent.records);
}

#[cfg(target_os = "linux")] // `spawn_splicing` is Linux's
/// A pipe that holds less than its record claims cannot be sent whole: the
/// connection ends, saying so, rather than cut the frame short and go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipe_short_of_its_records_length_ends_the_connection() {
    let (client, mut agent, _capture) = connect_splicing(Client::builder(), None).await;
    let handle = agent.handle.clone();
    let guest = tokio::spawn(async move {
        let (req, route) = agent.fs_request(100_000).await;
        let (_, accepted) = accept_read(&req);
        route.send(accepted).await.unwrap();
        let mut tx = BulkSender::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 1 << 20, 8 << 20);
        let short = in_a_pipe_claiming(&[7; 500], 1000);
        route.send_piped(tx.piped_record(short).unwrap()).await.unwrap();
        // The agent's driver stays until the end: dropped, it would stop its
        // writer before the writer finds the pipe short.
        (route, agent)
    });
    let mut out = Vec::new();
    let read = within(client.read_file("/short", &mut out)).await;
    assert!(read.is_err(), "{read:?}");
    let why = within(handle.closed()).await;
    assert!(why.contains("500") || why.contains("ran dry"), "{why}");
    assert!(why.contains("still owed"), "{why}");
    assert!(why.contains("with 500 bytes of a frame's data still owed"), "{why}");
    drop(within(guest).await.unwrap());
}
