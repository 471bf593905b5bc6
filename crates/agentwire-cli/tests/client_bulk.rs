//! The host client's bulk transfers (generation 8, spec section 7) against
//! our own agent: `read_file`, `write_file` and `tcp_connect` move their
//! data as raw records under credit when both sides have them, and as
//! `core.fs.data` / `core.tcp.data` with bulk turned off or with a
//! generation-7 agent. Each test captures the client's connection
//! (`Builder::capture`) and counts its frames by type.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use agentwire::payload::bulk::{BulkFlow, BulkKind, BulkRecord};
use agentwire::payload::core::{InitResolved, Ready, ResolvedUser};
use agentwire::payload::fs::{FsData, FsOp, FsResponse, FsResponseData};
use agentwire::payload::tcp::{TcpConnected, TcpData, TcpEof};
use agentwire::{Message, MessageCodec, Payload};
use agentwire_client::{Builder, Client};
use bytes::{Bytes, BytesMut};
use common::RunningAgent;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Framed};

/// `f` within `secs` seconds, or the test fails saying `what`.
async fn within<T>(secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not within {secs} s"),
    }
}

/// Every frame of both directions, in the order the client saw them.
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
    /// The frames captured so far, decoded.
    fn messages(&self) -> Vec<Message> {
        let mut buf = BytesMut::from(&self.0.lock().unwrap()[..]);
        let mut codec = MessageCodec::new();
        let mut out = Vec::new();
        while let Some(item) = codec.decode(&mut buf).expect("the capture is a stream of frames") {
            out.push(item.expect("every captured frame decodes"));
        }
        out
    }

    /// How many frames of wire name `t` (`bulk.record` for records).
    fn count(&self, t: &str) -> usize {
        self.messages().iter().filter(|m| m.message_type().wire_name() == t).count()
    }

    /// How many records of `flow`.
    fn records(&self, flow: BulkFlow) -> usize {
        let flow_of = |m: &Message| match &m.payload {
            Payload::BulkRecord(r) => Some(r.flow),
            _ => None,
        };
        self.messages().iter().filter(|m| flow_of(m) == Some(flow)).count()
    }
}

/// A client connected to `agent` through `builder`, with a capture.
async fn connect(agent: &RunningAgent, builder: Builder) -> (Client, Capture) {
    let capture = Capture::default();
    let stream = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    let client = within(20, "the start-up exchange", builder.capture(capture.clone()).connect(stream)).await.unwrap();
    (client, capture)
}

/// Position-dependent bytes, so that a lost or moved piece shows.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i ^ (i >> 9) ^ (i >> 19)) as u8).collect()
}

/// A destination that takes at most `per_write` bytes a write, one write a
/// millisecond, counting what it has taken.
struct SlowWriter {
    taken: Arc<AtomicU64>,
    data: Vec<u8>,
    per_write: usize,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncWrite for SlowWriter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(1))));
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

/// A 40 MiB file written and read back through the client goes as records
/// both ways (no `core.fs.data`), each transfer offered, accepted and
/// finished once, and arrives intact both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_mib_written_and_read_back_go_as_bulk_records_intact() {
    let agent = RunningAgent::start("client-bulk-file");
    let (client, capture) = connect(&agent, Client::builder()).await;
    assert_eq!(client.negotiated(), 10);
    let size = 40 << 20;
    let data = pattern(size);

    let written = within(120, "write_file", client.write_file("/big.bin", &data[..], Some(size as u64))).await.unwrap();
    assert_eq!(written, size as u64);
    assert!(std::fs::read(agent.root().join("big.bin")).unwrap() == data, "the guest file holds what was written");
    // Records of at most 3 MiB: at least 14 of them.
    assert!(capture.records(BulkFlow::HostToGuest) >= 14, "{} host records", capture.records(BulkFlow::HostToGuest));

    let mut back = Vec::new();
    let read = within(120, "read_file", client.read_file("/big.bin", &mut back)).await.unwrap();
    assert_eq!(read, size as u64);
    assert!(back == data, "the file read back is intact ({} bytes)", back.len());
    assert!(capture.records(BulkFlow::GuestToHost) >= 14, "{} guest records", capture.records(BulkFlow::GuestToHost));

    let messages = capture.messages();
    let offers = messages.iter().filter(|m| matches!(&m.payload, Payload::FsRequest(r) if r.bulk.is_some())).count();
    assert_eq!(offers, 2, "one offer for the write, one for the read");
    for (t, n) in [("core.fs.data", 0), ("core.bulk.accepted", 2), ("core.bulk.finish", 2), ("core.bulk.cancel", 0)] {
        assert_eq!(capture.count(t), n, "{t}");
    }
    // The agent credited the upload as it wrote it (40 MiB through an 8 MiB window).
    assert!(capture.count("core.bulk.credit") >= 8);
}

/// A destination that takes the data slowly: the client credits the agent
/// only for what the destination has taken, so what it receives stays
/// within 8 MiB of that, and the agent keeps every record within the
/// credit granted so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_destination_holds_the_agent_within_the_credit_the_client_grants() {
    let agent = RunningAgent::start("client-bulk-slow");
    let size = 40 << 20;
    let data = pattern(size);
    std::fs::write(agent.root().join("big.bin"), &data).unwrap();
    let (client, capture) = connect(&agent, Client::builder()).await;

    let taken = Arc::new(AtomicU64::new(0));
    // 64 KiB a millisecond at most: well under what the agent could send.
    let mut out = SlowWriter { taken: taken.clone(), data: Vec::new(), per_write: 64 * 1024, sleep: None };
    let base = client.counters().received.get().1;
    let done = AtomicBool::new(false);
    let window = 8u64 << 20;
    // Frame headers, the acceptance, the finish and the response.
    let slack = 64 * 1024;
    let watch = async {
        let mut widest = 0u64;
        while !done.load(Ordering::SeqCst) {
            // Received first: the destination can only have taken more by the time it is read.
            let received = client.counters().received.get().1 - base;
            let took = taken.load(Ordering::SeqCst);
            assert!(
                received <= took + window + slack,
                "{received} bytes received while the destination had taken {took}"
            );
            widest = widest.max(received.saturating_sub(took));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        widest
    };
    let read = async {
        let n = client.read_file("/big.bin", &mut out).await;
        done.store(true, Ordering::SeqCst);
        n
    };
    let (n, widest) = within(120, "the slow read", async { tokio::join!(read, watch) }).await;
    assert_eq!(n.unwrap(), size as u64);
    assert!(out.data == data, "the file arrives intact");
    // The agent did run ahead of the destination, as far as the credit let it.
    assert!(widest >= 2 << 20, "at most {widest} bytes ahead of the destination");

    // In the order the client saw them: every record ends within the credit
    // granted before it (the offer's, then each core.bulk.credit).
    let (mut limit, mut records, mut credits) = (0u64, 0, 0);
    for m in capture.messages() {
        match m.payload {
            Payload::FsRequest(r) => {
                if let Some(offer) = r.bulk {
                    limit = offer.guest_to_host_credit_limit;
                    assert_eq!(limit, window);
                }
            }
            Payload::BulkCredit(c) => {
                assert_eq!((c.kind, c.flow), (BulkKind::Filesystem, BulkFlow::GuestToHost));
                assert!(c.credit_limit - c.consumed_offset <= window);
                limit = limit.max(c.credit_limit);
                credits += 1;
            }
            Payload::BulkRecord(BulkRecord { offset, data, .. }) => {
                let end = offset + data.len() as u64;
                assert!(end <= limit, "a record ending at {end} with credit to {limit}");
                records += 1;
            }
            _ => {}
        }
    }
    // Each credit moves the limit by 4 to 8 MiB: 40 MiB past an 8 MiB start takes 4 at least.
    assert!(records >= 14 && credits >= 4, "{records} records, {credits} credits");
    assert_eq!(capture.count("core.bulk.cancel"), 0);
}

/// An echo server on loopback: accepts one connection at a time and sends back what it reads.
async fn echo_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// Writes `data` through `stream` in pieces, reading each piece's echo
/// back before the next (the stream has one reader), then half-closes and
/// reads to the end: all that came back.
async fn echo_through(stream: &mut agentwire_client::TcpStream, data: &[u8]) -> Vec<u8> {
    let mut echoed = Vec::new();
    for piece in data.chunks(512 * 1024) {
        within(30, "a write", stream.write(Bytes::copy_from_slice(piece))).await.unwrap();
        let sent = echoed.len() + piece.len();
        while echoed.len() < sent {
            let d = within(30, "the echo", stream.read()).await.unwrap().expect("data, not the end");
            echoed.extend_from_slice(&d);
        }
    }
    within(30, "shutdown_write", stream.shutdown_write()).await.unwrap();
    while let Some(d) = within(30, "the end", stream.read()).await.unwrap() {
        echoed.extend_from_slice(&d);
    }
    echoed
}

/// A few MiB through a loopback echo server: records both ways with credit
/// both ways, each side's finish in place of `core.tcp.eof`, intact, and
/// `core.tcp.closed` at the end (after which `close` has nothing to send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_goes_as_bulk_records_intact_and_ends_with_core_tcp_closed() {
    let port = echo_server().await;
    let agent = RunningAgent::start("client-bulk-tcp");
    let (client, capture) = connect(&agent, Client::builder()).await;
    let data = pattern(6 << 20);
    let mut stream = within(20, "tcp_connect", client.tcp_connect("127.0.0.1", port)).await.unwrap();
    let echoed = echo_through(&mut stream, &data).await;
    assert!(echoed == data, "{} bytes echoed of {}", echoed.len(), data.len());
    // Both halves are closed: the agent ends the connection.
    within(10, "core.tcp.closed", async {
        while capture.count("core.tcp.closed") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within(10, "close", stream.close()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last = capture.messages().last().map(|m| m.message_type().wire_name());
    assert_eq!(last, Some("core.tcp.closed"), "the connection's last frame");
    for (t, n) in [
        ("core.tcp.data", 0),
        ("core.tcp.eof", 0),
        ("core.tcp.close", 0),
        ("core.tcp.failed", 0),
        ("core.bulk.accepted", 1),
        ("core.bulk.finish", 2),
        ("core.bulk.cancel", 0),
        ("core.tcp.closed", 1),
    ] {
        assert_eq!(capture.count(t), n, "{t}");
    }
    // Records of at most 256 KiB: 24 each way at least; credit both ways
    // (6 MiB through 1 MiB of guest -> host credit and 8 MiB host -> guest).
    assert!(capture.records(BulkFlow::HostToGuest) >= 24 && capture.records(BulkFlow::GuestToHost) >= 24);
    let credits = |flow| {
        capture.messages().iter().filter(|m| matches!(&m.payload, Payload::BulkCredit(c) if c.flow == flow)).count()
    };
    assert!(credits(BulkFlow::GuestToHost) >= 5, "the client's credits: {}", credits(BulkFlow::GuestToHost));
    assert!(credits(BulkFlow::HostToGuest) >= 1, "the agent's credits: {}", credits(BulkFlow::HostToGuest));
}

/// `Builder::bulk(false)`: the same operations with generation 7's frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bulk_off_the_legacy_frames_are_used() {
    let port = echo_server().await;
    let agent = RunningAgent::start("client-bulk-off");
    let (client, capture) = connect(&agent, Client::builder().bulk(false)).await;
    assert_eq!(client.negotiated(), 10);
    let data = pattern(8 << 20);
    within(60, "write_file", client.write_file("/f.bin", &data[..], None)).await.unwrap();
    let mut back = Vec::new();
    within(60, "read_file", client.read_file("/f.bin", &mut back)).await.unwrap();
    assert!(back == data);
    let mut stream = within(20, "tcp_connect", client.tcp_connect("127.0.0.1", port)).await.unwrap();
    let echoed = echo_through(&mut stream, &data[..1 << 20]).await;
    assert!(echoed == data[..1 << 20]);
    within(10, "close", stream.close()).await.unwrap();

    let messages = capture.messages();
    assert!(messages.iter().all(|m| match &m.payload {
        Payload::FsRequest(r) => r.bulk.is_none(),
        Payload::TcpConnect(c) => c.bulk.is_none(),
        other => !other.message_type().wire_name().contains("bulk"),
    }));
    // 8 MiB in 3 MiB chunks and an empty one up, 3 chunks down.
    assert_eq!(capture.count("core.fs.data"), 4 + 3);
    assert!(capture.count("core.tcp.data") >= 4);
    assert_eq!(capture.count("core.tcp.eof"), 2);
}

/// A generation-7 agent, scripted: the client negotiates 7 and sends no
/// offer and nothing of a later generation; files and TCP go as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_generation_7_agent_no_offer_is_sent() {
    let (host_io, agent_io) = tokio::io::duplex(1 << 20);
    let agent = tokio::spawn(async move {
        let mut framed = Framed::new(agent_io, MessageCodec::new());
        let mut seen = Vec::new();
        let mut writing = Vec::new();
        while let Some(item) = framed.next().await {
            let m = item.expect("the stream is intact").expect("every frame decodes");
            let id = m.id;
            let reply: Vec<Payload> = match &m.payload {
                Payload::Bootstrap(_) => vec![
                    InitResolved { default_user: ResolvedUser { uid: 0, gid: 0 } }.into(),
                    Ready { agent_version: "0.6.14".into(), ..Ready::default() }.into(),
                ],
                Payload::FsRequest(r) => match &r.op {
                    FsOp::OpenFile { .. } => vec![FsResponse::success(Some(FsResponseData::Handle(3))).into()],
                    FsOp::CloseHandle { .. } => vec![FsResponse::success(None).into()],
                    FsOp::Read { .. } => vec![
                        FsData { data: Bytes::from_static(b"old ") }.into(),
                        FsData { data: Bytes::from_static(b"news") }.into(),
                        FsResponse::success(None).into(),
                    ],
                    _ => vec![],
                },
                Payload::FsData(d) if d.data.is_empty() => vec![FsResponse::success(None).into()],
                Payload::FsData(d) => {
                    writing.extend_from_slice(&d.data);
                    vec![]
                }
                Payload::TcpConnect(_) => vec![TcpConnected {}.into()],
                Payload::TcpData(d) => vec![TcpData { data: d.data.clone() }.into()],
                Payload::TcpEof(_) => vec![TcpEof {}.into()],
                _ => vec![],
            };
            let id = if matches!(m.payload, Payload::Bootstrap(_)) { 0 } else { id };
            seen.push(m);
            for p in reply {
                framed.send(Message::new(id, p).with_version(7)).await.unwrap();
            }
            if matches!(seen.last().map(|m| &m.payload), Some(Payload::TcpClose(_))) {
                break;
            }
        }
        (seen, writing)
    });
    let client = within(20, "the start-up exchange", Client::builder().connect(host_io)).await.unwrap();
    assert_eq!((client.agent_generation(), client.negotiated()), (7, 7));
    let mut back = Vec::new();
    within(20, "read_file", client.read_file("/f", &mut back)).await.unwrap();
    assert_eq!(back, b"old news");
    within(20, "write_file", client.write_file("/g", &b"fresh"[..], Some(5))).await.unwrap();
    let mut stream = within(20, "tcp_connect", client.tcp_connect("127.0.0.1", 80)).await.unwrap();
    let echoed = echo_through(&mut stream, b"ping").await;
    assert_eq!(echoed, b"ping");
    within(10, "close", stream.close()).await.unwrap();
    let (seen, writing) = within(20, "the scripted agent", agent).await.unwrap();
    assert_eq!(writing, b"fresh");
    let mut offers = 0;
    for m in &seen {
        assert!(m.message_type().generation() <= 7, "{} sent to a generation-7 agent", m.message_type());
        match &m.payload {
            Payload::FsRequest(r) => offers += usize::from(r.bulk.is_some()),
            Payload::TcpConnect(c) => offers += usize::from(c.bulk.is_some()),
            _ => {}
        }
    }
    assert_eq!(offers, 0, "no bulk offer to a generation-7 agent");
    assert!(seen.iter().any(|m| matches!(&m.payload, Payload::FsRequest(r) if matches!(r.op, FsOp::Read { .. }))));
    assert!(seen.iter().any(|m| matches!(&m.payload, Payload::FsRequest(r) if matches!(r.op, FsOp::Write { .. }))));
}

/// A Unix socket at `path` that forwards one connection at a time to
/// `target`, keeping a copy of each direction: (to the agent, from the agent).
async fn tap(path: std::path::PathBuf, target: std::path::PathBuf) -> (Capture, Capture) {
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (up, down) = (Capture::default(), Capture::default());
    let (up2, down2) = (up.clone(), down.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let agent = tokio::net::UnixStream::connect(&target).await.unwrap();
            let (cr, cw) = client.into_split();
            let (ar, aw) = agent.into_split();
            tokio::spawn(copy_tapped(cr, aw, up2.clone()));
            tokio::spawn(copy_tapped(ar, cw, down2.clone()));
        }
    });
    (up, down)
}

async fn copy_tapped(mut from: impl tokio::io::AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, copy: Capture) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        copy.0.lock().unwrap().extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// `agentwire host fs-put` and `fs-get` go through `write_file` and
/// `read_file`, and so as bulk records: seen on a tap between the command
/// and the agent, with the file intact both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_fs_put_and_fs_get_go_as_bulk_records() {
    let agent = RunningAgent::start("client-bulk-cli");
    let data = pattern(9 << 20);
    let local = agent.outside().join("up.bin");
    std::fs::write(&local, &data).unwrap();
    let tapped = agent.outside().join("tap.sock");
    let (up, down) = tap(tapped.clone(), agent.socket.clone()).await;
    let socket = tapped.to_str().unwrap().to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            common::agentwire(&args, b"")
        })
    };
    let put = run(vec![
        "host".into(),
        "--connect".into(),
        socket.clone(),
        "fs-put".into(),
        local.to_str().unwrap().into(),
        "/up.bin".into(),
    ]);
    let put = within(60, "fs-put", put).await.unwrap();
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
    assert!(std::fs::read(agent.root().join("up.bin")).unwrap() == data);
    let get = run(vec!["host".into(), "--connect".into(), socket, "fs-get".into(), "/up.bin".into()]);
    let get = within(60, "fs-get", get).await.unwrap();
    assert!(get.status.success(), "{}", String::from_utf8_lossy(&get.stderr));
    assert!(get.stdout == data, "{} bytes", get.stdout.len());
    // Both commands' frames: records up for fs-put, down for fs-get, and no fs.data.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(up.records(BulkFlow::HostToGuest) >= 3, "{} records up", up.records(BulkFlow::HostToGuest));
    assert!(down.records(BulkFlow::GuestToHost) >= 3, "{} records down", down.records(BulkFlow::GuestToHost));
    assert_eq!(up.count("core.fs.data") + down.count("core.fs.data"), 0);
}

/// Through `agentwire relay`, which routes records on their id and flags
/// without reading them: a file each way and a TCP echo as records, intact,
/// from two clients at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_relay_records_go_both_ways_intact() {
    let port = echo_server().await;
    let agent = RunningAgent::start("client-bulk-relay");
    let socket = agent.outside().join("relay.sock");
    let (mut relay, log) = common::start_relay(&agent.socket, &socket, None, Duration::from_secs(20))
        .unwrap_or_else(|log| panic!("the relay did not become ready: {log}"));
    let data = pattern(10 << 20);
    let run = |k: usize| {
        let (socket, data, log) = (socket.clone(), data.clone(), log.clone());
        async move {
            let capture = Capture::default();
            let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
            let builder = Client::builder().via_relay(true).clock_sync(false).capture(capture.clone());
            let client = within(20, "the relay's prologue", builder.connect(stream)).await.unwrap();
            let path = format!("/relayed-{k}.bin");
            let written = within(60, "write_file", client.write_file(&path, &data[..], Some(data.len() as u64))).await;
            if let Err(e) = written {
                std::thread::sleep(Duration::from_millis(200));
                panic!("client {k}: {e}; the relay's log:\n{}", log.lock().unwrap());
            }
            let mut back = Vec::new();
            let read = within(60, "read_file", client.read_file(&path, &mut back)).await;
            if let Err(e) = read {
                std::thread::sleep(Duration::from_millis(200));
                panic!("client {k}: {e}; the relay's log:\n{}", log.lock().unwrap());
            }
            assert!(back == data, "client {k}: the file read back is intact");
            let mut stream = within(20, "tcp_connect", client.tcp_connect("127.0.0.1", port)).await.unwrap();
            let echoed = echo_through(&mut stream, &data[..2 << 20]).await;
            assert!(echoed == data[..2 << 20], "client {k}: the echo is intact");
            let _ = stream.close().await;
            capture
        }
    };
    let (a, b) = tokio::join!(run(1), run(2));
    let _ = relay.kill();
    let _ = relay.wait();
    for capture in [a, b] {
        assert!(capture.records(BulkFlow::HostToGuest) >= 4 + 8, "{}", log.lock().unwrap());
        assert!(capture.records(BulkFlow::GuestToHost) >= 4 + 8);
        assert_eq!(capture.count("core.fs.data") + capture.count("core.tcp.data"), 0);
    }
    assert!(std::fs::read(agent.root().join("relayed-1.bin")).unwrap() == data);
}

/// The same against the deployed agent, microsandbox-agentd 0.7.13, as PID 1
/// of a QEMU guest (`agentwire vm --boot-only` with the image that
/// `vm/build-reference.sh 0.7.13` writes to `target/vm-ref-0.7.13`, or under
/// `$AGENTWIRE_VM_REF_DIR`): a file each way as records (read by a slow
/// destination), a TCP echo as records, and no cancel anywhere — in
/// particular none for a credit that reached the agent after its response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots QEMU: build the image with vm/build-reference.sh 0.7.13, then run with --include-ignored"]
async fn the_deployed_agent_0_7_13_moves_our_files_and_tcp_as_bulk_records() {
    let (_tmp, mut vm, stream) = common::boot_reference_0_7_13("client-bulk-vm").await;
    let capture = Capture::default();
    let builder = Client::builder().handshake_timeout(Duration::from_secs(120)).capture(capture.clone());
    let client = within(150, "the start-up exchange", builder.connect(stream)).await.unwrap();
    assert_eq!((client.ready().agent_version.as_str(), client.negotiated()), ("0.7.13", 10));

    // 24 MiB up, then down to a destination slower than the agent.
    let size = 24 << 20;
    let data = pattern(size);
    let written = within(120, "write_file", client.write_file("/tmp/bulk.bin", &data[..], Some(size as u64))).await;
    assert_eq!(written.unwrap(), size as u64);
    let mut out = SlowWriter { taken: Default::default(), data: Vec::new(), per_write: 256 * 1024, sleep: None };
    let read = within(120, "read_file", client.read_file("/tmp/bulk.bin", &mut out)).await;
    assert_eq!(read.unwrap(), size as u64);
    assert!(out.data == data, "the file read back is intact");
    // A small one, which the first credit covers whole.
    within(20, "write_file", client.write_file("/tmp/small", &b"small"[..], Some(5))).await.unwrap();
    let mut small = Vec::new();
    within(20, "read_file", client.read_file("/tmp/small", &mut small)).await.unwrap();
    assert_eq!(small, b"small");

    // TCP to an echo server in the guest (busybox nc running cat).
    let mut server =
        within(20, "exec", client.exec(agentwire_client::Command::new("nc").args(["-l", "-p", "7777", "-e", "cat"])))
            .await
            .unwrap();
    let t = std::time::Instant::now();
    let mut tcp = loop {
        match client.tcp_connect("127.0.0.1", 7777).await {
            Ok(s) => break s,
            Err(agentwire_client::ClientError::TcpFailed(_)) if t.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let payload = pattern(3 << 20);
    let echoed = echo_through(&mut tcp, &payload).await;
    assert!(echoed == payload, "{} of {} bytes echoed", echoed.len(), payload.len());
    within(10, "core.tcp.closed", async {
        while capture.count("core.tcp.closed") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within(10, "close", tcp.close()).await.unwrap();
    while let Some(event) = within(20, "the echo server's end", server.next()).await.unwrap() {
        if matches!(event, agentwire_client::ExecEvent::Exited(_)) {
            break;
        }
    }
    within(20, "pong", client.ping()).await.unwrap();

    let (up, down) = (capture.records(BulkFlow::HostToGuest), capture.records(BulkFlow::GuestToHost));
    eprintln!(
        "0.7.13: {up} records up, {down} down, {} credits, {} finishes",
        capture.count("core.bulk.credit"),
        capture.count("core.bulk.finish")
    );
    assert!(up >= 8 + 12 && down >= 8 + 12, "{up} records up, {down} down");
    for (t, n) in [("core.fs.data", 0), ("core.tcp.data", 0), ("core.bulk.cancel", 0), ("core.bulk.accepted", 5)] {
        assert_eq!(capture.count(t), n, "{t}");
    }
    // One response per fs request: none doubled by a late credit.
    assert_eq!(capture.count("core.fs.response"), capture.count("core.fs.request"));

    within(30, "the shutdown", client.shutdown(Duration::from_secs(30))).await.unwrap();
    let status = within(30, "QEMU's end", vm.wait()).await.unwrap();
    assert!(status.success(), "{status}");
}
