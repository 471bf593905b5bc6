//! 64 MiB over a Unix socketpair, in one criterion run: a raw copy of the
//! bytes (the limit), agentwire's framed writer and reader, and the reference
//! `microsandbox-protocol` 0.7.13 (`ref7`) moving the same bytes its own way.
//!
//! Every case moves the same 64 MiB from one end of a fresh
//! `std::os::unix::net::UnixStream::pair()` to the other (default socket
//! buffers). By default the writer and the reader run side by side in one
//! task (`tokio::join!`) of a current-thread tokio runtime, so a case costs
//! one core's time and the figures hold on a shared, loaded machine; with
//! `TRANSFER_THREADS=2` the writer runs on a thread of its own, as another
//! process would. The clock stops when the reader has seen the end of the
//! stream, with every byte counted (and, once before measuring, compared with
//! what was sent).
//!
//! - `raw`: `write_all` of 256 KiB slices of the data; reads into one reused
//!   256 KiB buffer. Nothing can move the bytes with fewer copies.
//! - `ours_fs_data_*`: `core.fs.data` frames at generation 7 (both codecs set
//!   to a generation-7 peer, `v = 7`), written by [`MessageSink`] (the frame's
//!   head and then its data from where it lies, one `writev`) and read by
//!   `FramedRead<_, MessageCodec>`; each message's data is a view of the read
//!   buffer.
//! - `ours_bulk_*`: the same with raw bulk records (generation 10).
//! - `ref7_bulk_*`: 0.7.13's bulk lane as it is written to be used:
//!   `codec::write_bulk_record` (its `encode_bulk_header`, then one vectored
//!   write of header and data, then a flush) and `codec::try_decode_frame_from_bytes`
//!   on a `BytesMut` fed by `read_buf` (256 KiB reserved before each read: the
//!   crate has no reader of its own, and that is a generous one).
//! - `ref7_fs_data_1m`: 0.7.13's `core.fs.data` frames, `codec::write_message`
//!   (the payload and envelope through ciborium, one vectored write) and
//!   `codec::try_decode_from_bytes` then `Message::payload`; the payloads are
//!   built before the clock starts, since its `FsData` owns a `Vec`.
//!
//! After the run, the median of each case (criterion's, from its
//! `estimates.json`) is printed with its ratio to `raw`'s median of the same
//! run; `raw_last`, the raw copy measured again after every other case, shows
//! how far the machine's speed drifted meanwhile (criterion measures the cases
//! one after the other). `TRANSFER_ROUNDS=n` measures instead `n` rounds of
//! every case in turn and prints each one's median over the rounds, which a
//! drift affects alike.
//!
//! ```text
//! cargo bench -p agentwire-bench --bench transfer                       # criterion, ratios printed after
//! TRANSFER_ROUNDS=31 cargo bench -p agentwire-bench --bench transfer    # interleaved rounds instead
//! TRANSFER_THREADS=2 cargo bench -p agentwire-bench --bench transfer    # writer on a thread of its own
//! ```

use std::future::Future;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use agentwire::payload::bulk::{BulkFlow, BulkKind, BulkRecord};
use agentwire::payload::fs::FsData;
use agentwire::{Message, MessageCodec, MessageSink, Payload};
use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::codec::FramedRead;

/// Bytes moved by every case.
const TOTAL: usize = 64 << 20;

/// The raw copy's write size and read buffer.
const RAW_CHUNK: usize = 256 << 10;

/// What the reference's reader reserves before each read.
const REF_READ_RESERVE: usize = 256 << 10;

/// The criterion group.
const GROUP: &str = "transfer_64m";

/// The 64 MiB sent by every case (not all one byte, so a misplaced slice shows).
fn payload() -> Bytes {
    Bytes::from((0..TOTAL).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8).collect::<Vec<_>>())
}

/// Counts what a reader received, comparing it with what was sent when asked.
struct Received {
    expected: Option<Bytes>,
    len: usize,
}

impl Received {
    fn new(expected: Option<Bytes>) -> Received {
        Received { expected, len: 0 }
    }

    fn take(&mut self, data: &[u8]) {
        if let Some(expected) = &self.expected {
            assert_eq!(data, &expected[self.len..self.len + data.len()], "bytes at offset {}", self.len);
        }
        self.len += data.len();
        black_box(data);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_io().build().expect("a tokio runtime")
}

/// Whether the writer runs on a thread of its own (`TRANSFER_THREADS=2`)
/// rather than beside the reader in one task on one thread (the default).
fn two_threads() -> bool {
    static TWO: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TWO.get_or_init(|| std::env::var("TRANSFER_THREADS").is_ok_and(|t| t == "2"))
}

/// One transfer: `write` and `read` each given one end of a fresh
/// socketpair; the time from both being ready to `read` returning (it
/// returns at the end of the stream, with the bytes it got).
fn transfer<W, WF, R, RF>(write: W, read: R) -> Duration
where
    W: FnOnce(UnixStream) -> WF + Send + 'static,
    WF: Future<Output = ()>,
    R: FnOnce(UnixStream) -> RF,
    RF: Future<Output = usize>,
{
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("a socketpair");
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let rt = runtime();
    if !two_threads() {
        let (received, elapsed) = rt.block_on(async move {
            let (a, b) = (UnixStream::from_std(a).unwrap(), UnixStream::from_std(b).unwrap());
            let start = Instant::now();
            let ((), received) = tokio::join!(write(a), read(b));
            (received, start.elapsed())
        });
        assert_eq!(received, TOTAL, "the reader got every byte");
        return elapsed;
    }
    let ready = Arc::new(Barrier::new(2));
    let writer_ready = ready.clone();
    let writer = std::thread::spawn(move || {
        runtime().block_on(async move {
            let stream = UnixStream::from_std(a).unwrap();
            writer_ready.wait();
            write(stream).await;
        })
    });
    let (received, elapsed) = rt.block_on(async move {
        let stream = UnixStream::from_std(b).unwrap();
        ready.wait();
        let start = Instant::now();
        let received = read(stream).await;
        (received, start.elapsed())
    });
    writer.join().expect("the writer");
    assert_eq!(received, TOTAL, "the reader got every byte");
    elapsed
}

/// One of the ways to move the bytes: the writer and reader of a case.
#[derive(Clone, Copy, Debug)]
enum Case {
    Raw,
    /// `raw` again, measured last: how far the machine drifted during the run.
    RawLast,
    OursFsData(usize),
    OursBulk(usize),
    Ref7Bulk(usize),
    Ref7FsData(usize),
}

impl Case {
    fn name(self) -> String {
        let size = |n: usize| if n >= 1 << 20 { format!("{}m", n >> 20) } else { format!("{}k", n >> 10) };
        match self {
            Case::Raw => "raw".into(),
            Case::RawLast => "raw_last".into(),
            Case::OursFsData(n) => format!("ours_fs_data_{}", size(n)),
            Case::OursBulk(n) => format!("ours_bulk_{}", size(n)),
            Case::Ref7Bulk(n) => format!("ref7_bulk_{}", size(n)),
            Case::Ref7FsData(n) => format!("ref7_fs_data_{}", size(n)),
        }
    }

    /// One transfer of `data`; with `check`, every byte received is compared.
    fn run(self, data: &Bytes, ref7_payloads: &Arc<Vec<ref7::fs::FsData>>, check: bool) -> Duration {
        let expected = check.then(|| data.clone());
        let data = data.clone();
        match self {
            Case::Raw | Case::RawLast => transfer(move |s| write_raw(s, data), move |s| read_raw(s, expected)),
            Case::OursFsData(chunk) => transfer(
                move |s| write_ours(s, data, chunk, 7, |data| FsData { data }.into()),
                move |s| read_ours(s, 7, expected),
            ),
            Case::OursBulk(chunk) => transfer(
                move |s| {
                    let record = |data| BulkRecord::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 0, data).into();
                    write_ours(s, data, chunk, agentwire::PROTOCOL_VERSION, record)
                },
                move |s| read_ours(s, agentwire::PROTOCOL_VERSION, expected),
            ),
            Case::Ref7Bulk(chunk) => {
                transfer(move |s| write_ref7_bulk(s, data, chunk), move |s| read_ref7(s, expected))
            }
            Case::Ref7FsData(chunk) => {
                assert_eq!(ref7_payloads[0].data.len(), chunk);
                let payloads = ref7_payloads.clone();
                transfer(move |s| write_ref7_fs_data(s, payloads), move |s| read_ref7(s, expected))
            }
        }
    }
}

async fn write_raw(mut s: UnixStream, data: Bytes) {
    for chunk in data.chunks(RAW_CHUNK) {
        s.write_all(chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
}

async fn read_raw(mut s: UnixStream, expected: Option<Bytes>) -> usize {
    let mut buf = vec![0u8; RAW_CHUNK];
    let mut received = Received::new(expected);
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            return received.len;
        }
        received.take(&buf[..n]);
    }
}

/// `data` in messages of `chunk` bytes (made by `payload`, at generation
/// `generation`) through a [`MessageSink`], with its default backpressure.
async fn write_ours(s: UnixStream, data: Bytes, chunk: usize, generation: u8, payload: fn(Bytes) -> Payload) {
    let mut codec = MessageCodec::new();
    codec.set_peer_generation(generation);
    let mut sink = MessageSink::new(s, codec);
    let mut at = 0;
    while at < data.len() {
        let end = (at + chunk).min(data.len());
        let m = Message::new(1, payload(data.slice(at..end))).with_version(generation);
        sink.feed(m).await.unwrap();
        at = end;
    }
    sink.close().await.unwrap();
}

async fn read_ours(s: UnixStream, generation: u8, expected: Option<Bytes>) -> usize {
    let mut codec = MessageCodec::new();
    codec.set_peer_generation(generation);
    let mut frames = FramedRead::new(s, codec);
    let mut received = Received::new(expected);
    while let Some(item) = frames.next().await {
        let m = item.expect("the stream").expect("a message");
        match &m.payload {
            Payload::FsData(p) => received.take(&p.data),
            Payload::BulkRecord(r) => received.take(&r.data),
            other => panic!("unexpected {}", other.message_type()),
        }
    }
    received.len
}

async fn write_ref7_bulk(mut s: UnixStream, data: Bytes, chunk: usize) {
    let mut at = 0;
    while at < data.len() {
        let end = (at + chunk).min(data.len());
        let record = ref7::bulk::BulkRecord {
            id: 1,
            kind: ref7::bulk::BulkKind::Filesystem,
            flow: ref7::bulk::BulkFlow::GuestToHost,
            offset: at as u64,
            payload: data.slice(at..end),
        };
        ref7::codec::write_bulk_record(&mut s, &record).await.unwrap();
        at = end;
    }
    s.shutdown().await.unwrap();
}

async fn write_ref7_fs_data(mut s: UnixStream, payloads: Arc<Vec<ref7::fs::FsData>>) {
    for p in payloads.iter() {
        let m = ref7::message::Message::with_payload(ref7::message::MessageType::FsData, 1, p).unwrap();
        ref7::codec::write_message(&mut s, &m).await.unwrap();
    }
    s.shutdown().await.unwrap();
}

/// 0.7.13's reader: `read_buf` into a `BytesMut`, then every whole frame
/// decoded by `try_decode_frame_from_bytes` (bulk records as views of the
/// buffer, control messages and their payloads through ciborium).
async fn read_ref7(mut s: UnixStream, expected: Option<Bytes>) -> usize {
    use ref7::codec::DecodedFrame;
    let mut buf = BytesMut::new();
    let mut received = Received::new(expected);
    loop {
        buf.reserve(REF_READ_RESERVE);
        if s.read_buf(&mut buf).await.unwrap() == 0 {
            assert!(buf.is_empty(), "the stream ended inside a frame");
            return received.len;
        }
        while let Some(frame) = ref7::codec::try_decode_frame_from_bytes(&mut buf).unwrap() {
            match frame {
                DecodedFrame::Bulk(record) => received.take(&record.payload),
                DecodedFrame::Control(m) => received.take(&m.payload::<ref7::fs::FsData>().unwrap().data),
            }
        }
    }
}

/// Where criterion writes its estimates: as criterion finds it.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("criterion")
}

/// The median (ns) criterion estimated for `bench` in its last run, if any.
fn median(bench: &str) -> Option<f64> {
    let path = criterion_dir().join(GROUP).join(bench).join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}

/// The cases' medians from this run, with their throughput and ratio to `raw`.
fn print_ratios(cases: &[Case], started: std::time::SystemTime) {
    let fresh = |bench: &str| {
        let path = criterion_dir().join(GROUP).join(bench).join("new/estimates.json");
        std::fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t >= started)
    };
    let Some(raw) = median("raw").filter(|_| fresh("raw")) else {
        println!("(no median of raw from this run: nothing to compare with)");
        return;
    };
    println!("\n| case | median | throughput | time ratio, raw / case |");
    println!("|---|---|---|---|");
    for case in cases {
        let name = case.name();
        let Some(ns) = median(&name).filter(|_| fresh(&name)) else { continue };
        let gbps = TOTAL as f64 / ns;
        println!("| {name} | {:.2} ms | {gbps:.2} GB/s | {:.3} |", ns / 1e6, raw / ns);
    }
    println!("\n(ratio = raw's median / the case's median: the case's throughput as a fraction of the raw copy's)");
    if let Some(last) = median("raw_last").filter(|_| fresh("raw_last")) {
        let drift = raw / last;
        if !(0.95..=1.05).contains(&drift) {
            println!(
                "warning: raw_last ran at {drift:.2}x raw's speed: the machine drifted during the run, \
                 so these ratios are not comparable; TRANSFER_ROUNDS=31 interleaves the cases instead"
            );
        }
    }
}

/// `TRANSFER_ROUNDS=n`: instead of criterion, `n` rounds of every case one
/// after the other, and each case's median over the rounds with its ratio to
/// `raw`'s: on a shared machine whose speed drifts, every case then sees the
/// same phases.
fn interleaved(cases: &[Case], data: &Bytes, ref7_payloads: &Arc<Vec<ref7::fs::FsData>>, rounds: usize) {
    let mut times = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        for (case, times) in cases.iter().zip(&mut times) {
            times.push(case.run(data, ref7_payloads, false));
        }
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|t| {
            t.sort();
            t[t.len() / 2].as_nanos() as f64
        })
        .collect();
    println!(
        "{rounds} interleaved rounds\n\n| case | median | throughput | time ratio, raw / case |\n|---|---|---|---|"
    );
    for (case, ns) in cases.iter().zip(&medians) {
        let gbps = TOTAL as f64 / ns;
        println!("| {} | {:.2} ms | {gbps:.2} GB/s | {:.3} |", case.name(), ns / 1e6, medians[0] / ns);
    }
}

fn main() {
    let cases = [
        Case::Raw,
        Case::OursFsData(1 << 20),
        Case::OursBulk(1 << 20),
        Case::Ref7Bulk(1 << 20),
        Case::OursFsData(256 << 10),
        Case::OursBulk(256 << 10),
        Case::Ref7Bulk(256 << 10),
        Case::Ref7FsData(1 << 20),
        Case::RawLast,
    ];
    let data = payload();
    let ref7_payloads =
        Arc::new(data.chunks(1 << 20).map(|c| ref7::fs::FsData { data: c.to_vec() }).collect::<Vec<_>>());
    for case in cases {
        case.run(&data, &ref7_payloads, true);
    }
    if let Some(rounds) = std::env::var("TRANSFER_ROUNDS").ok().and_then(|r| r.parse().ok()) {
        return interleaved(&cases, &data, &ref7_payloads, rounds);
    }

    let started = std::time::SystemTime::now();
    let mut c = Criterion::default().configure_from_args();
    {
        let mut g = c.benchmark_group(GROUP);
        g.throughput(Throughput::Bytes(TOTAL as u64));
        g.sample_size(10);
        g.warm_up_time(Duration::from_secs(1));
        g.measurement_time(Duration::from_secs(4));
        for case in cases {
            g.bench_function(case.name(), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| case.run(&data, &ref7_payloads, false)).sum())
            });
        }
        g.finish();
    }
    c.final_summary();
    print_ratios(&cases, started);
}
