//! Allocation counts and peak heap, measured with a counting global allocator.
//!
//! Counters are per thread (tests run in parallel threads), kept in
//! const-initialised thread-locals so that the allocator never allocates itself.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use agentwire::payload::Text;
use agentwire::payload::core::Ready;
use agentwire::payload::exec::{ExecExited, ExecRequest, ExecRlimit, ExecStdout};
use agentwire::{FrameCodec, Message, MessageCodec, Payload, RejectKind};
use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn on_alloc(size: usize) {
    if ON.with(Cell::get) {
        ALLOCS.with(|c| c.set(c.get() + 1));
        BYTES.with(|c| c.set(c.get() + size));
        LARGEST.with(|c| c.set(c.get().max(size)));
        let live = LIVE.with(|c| {
            c.set(c.get() + size as isize);
            c.get()
        });
        PEAK.with(|c| c.set(c.get().max(live)));
    }
}

fn on_free(size: usize) {
    if ON.with(Cell::get) {
        LIVE.with(|c| c.set(c.get() - size as isize));
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// bookkeeping only touches thread-local cells.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_free(layout.size());
        on_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[derive(Debug, Clone, Copy)]
struct Stats {
    allocs: usize,
    bytes: usize,
    largest: usize,
    /// Most heap held at once during `f`, above what was held before it.
    peak: usize,
}

fn measure<R>(f: impl FnOnce() -> R) -> (R, Stats) {
    for c in [&ALLOCS, &BYTES, &LARGEST] {
        c.with(|c| c.set(0));
    }
    LIVE.with(|c| c.set(0));
    PEAK.with(|c| c.set(0));
    ON.with(|c| c.set(true));
    let r = f();
    ON.with(|c| c.set(false));
    let stats = Stats {
        allocs: ALLOCS.with(Cell::get),
        bytes: BYTES.with(Cell::get),
        largest: LARGEST.with(Cell::get),
        peak: PEAK.with(Cell::get).max(0) as usize,
    };
    (r, stats)
}

fn frame(m: Message) -> Bytes {
    let mut b = BytesMut::new();
    MessageCodec::new().encode(m, &mut b).unwrap();
    b.freeze()
}

fn ready() -> Ready {
    Ready {
        boot_time_ns: 10,
        init_time_ns: 20,
        ready_time_ns: 40,
        agent_version: "agentwire 0.1.0".into(),
        capabilities: None,
    }
}

#[test]
fn decoding_a_64k_stdout_frame_allocates_no_block_of_1k_or_more() {
    let wire = frame(Message::new(3, ExecStdout { data: Bytes::from(vec![5u8; 64 * 1024]) }));
    let mut src = BytesMut::from(&wire[..]);
    let mut codec = MessageCodec::new();
    let (msg, stats) = measure(|| codec.decode(&mut src).unwrap().unwrap().unwrap());
    assert!(stats.largest < 1024, "{stats:?}");
    let Payload::ExecStdout(out) = msg.payload else { panic!() };
    assert_eq!(out.data.len(), 64 * 1024);
}

#[test]
fn data_frames_in_a_stream_decode_without_allocating() {
    let mut src = BytesMut::new();
    for i in 0..100 {
        src.put_slice(&frame(Message::new(i, ExecStdout { data: Bytes::from(vec![i as u8; 100]) })));
    }
    let mut codec = MessageCodec::new();
    // The first cut from a fresh buffer makes its shared control block, once.
    let first = codec.decode(&mut src).unwrap().unwrap().unwrap();
    let (messages, stats) = measure(|| {
        let mut out = Vec::with_capacity(99);
        while let Some(item) = codec.decode(&mut src).unwrap() {
            out.push(item.unwrap());
        }
        out
    });
    // The only allocation is the Vec that holds the results.
    assert_eq!(stats.allocs, 1, "{stats:?}");
    assert_eq!(messages.len(), 99);
    drop(first);
}

#[test]
fn encoding_into_a_buffer_with_room_allocates_nothing() {
    let ready = Message::new(0, ready());
    let stdout = Message::new(1, ExecStdout { data: Bytes::from(vec![9u8; 64 * 1024]) });
    let exited = Message::new(1, ExecExited { code: 0 });
    let mut dst = BytesMut::with_capacity(128 * 1024);
    let mut codec = MessageCodec::new();
    let (_, stats) = measure(|| {
        codec.encode_message(&ready, &mut dst).unwrap();
        codec.encode_message(&stdout, &mut dst).unwrap();
        codec.encode_message(&exited, &mut dst).unwrap();
    });
    assert_eq!(stats.allocs, 0, "{stats:?}");
    assert_eq!(dst.len(), ready.wire_len().unwrap() + stdout.wire_len().unwrap() + exited.wire_len().unwrap());
}

#[test]
fn decoding_ready_allocates_only_what_ready_owns() {
    // From a fresh read buffer, as the first frame of a connection: the frame
    // is read in place, so not even the buffer's shared control block is made.
    let mut src = BytesMut::from(&frame(Message::new(0, ready()))[..]);
    let mut codec = MessageCodec::new();
    let (msg, stats) = measure(|| codec.decode(&mut src).unwrap().unwrap().unwrap());
    let Payload::Ready(r) = msg.payload else { panic!() };
    assert_eq!(stats.allocs, 1, "{stats:?}");
    assert!(stats.bytes <= r.agent_version.capacity(), "{stats:?} for {} owned bytes", r.agent_version.capacity());
    assert!(src.is_empty());
}

#[test]
fn control_messages_decode_in_place_without_allocating() {
    let mut src = BytesMut::new();
    for i in 0..100 {
        src.put_slice(&frame(Message::new(i, ExecExited { code: i as i32 - 50 })));
    }
    let mut codec = MessageCodec::new();
    let (codes, stats) = measure(|| {
        let mut codes = [0i32; 100];
        for code in &mut codes {
            let Payload::ExecExited(e) = codec.decode(&mut src).unwrap().unwrap().unwrap().payload else { panic!() };
            *code = e.code;
        }
        codes
    });
    assert_eq!(stats.allocs, 0, "{stats:?}");
    assert!(codes.iter().enumerate().all(|(i, &code)| code == i as i32 - 50), "{codes:?}");
    assert!(src.is_empty());
}

#[test]
fn exec_request_strings_cost_no_allocation() {
    let mut req = ExecRequest::new("/usr/bin/python3");
    req.args = ["-m", "pytest", "-q", "tests/"].map(Text::from).to_vec();
    req.env = ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/home/sandbox", "LANG=C.UTF-8"].map(Text::from).to_vec();
    req.cwd = Some("/workspace".into());
    req.user = Some("sandbox".into());
    req.rlimits = vec![ExecRlimit { resource: "nofile".into(), soft: 1024, hard: 4096 }];
    let mut src = BytesMut::from(&frame(Message::new(7, req.clone()))[..]);
    let mut codec = MessageCodec::new();
    let (msg, stats) = measure(|| codec.decode(&mut src).unwrap().unwrap().unwrap());
    // The box of the payload, its three vectors, and the read buffer's shared
    // control block (the strings are views of the frame): not one of its eleven strings.
    assert_eq!(stats.allocs, 5, "{stats:?}");
    assert_eq!(msg.payload, Payload::ExecRequest(Box::new(req)));
}

#[test]
fn exec_request_arrays_claiming_every_byte_cost_little() {
    // `args` and `rlimits` each claiming as many items as bytes follow (1 MiB
    // of them, none an item of the right type), which a reader trusting the
    // claim would reserve 32 and 48 times over.
    for key in [&b"\x64args"[..], b"\x67rlimits"] {
        let filler = 1 << 20;
        let p = [&b"\xa2\x63cmd\x62sh"[..], key, b"\x9a\x00\x10\x00\x00", &vec![0; filler]].concat();
        let mut src = BytesMut::from(&envelope_frame("core.exec.request", &p)[..]);
        let mut codec = MessageCodec::new();
        let (out, stats) = measure(|| codec.decode(&mut src));
        assert!(matches!(out, Ok(Some(Err(_)))), "{key:?}: {out:?}");
        assert!(stats.peak < filler + PEAK_LIMIT / 4, "{key:?}: peak {} bytes", stats.peak);
    }
}

/// Most heap any hostile input below may cost, above its own size.
const PEAK_LIMIT: usize = 16 * 1024 * 1024;

fn rejected_within_limit(input: &[u8], expect: RejectKind, what: &str) {
    let mut src = BytesMut::from(input);
    let mut codec = MessageCodec::new();
    let (item, stats) = measure(|| codec.decode_eof(&mut src));
    match item {
        Ok(Some(Err(r))) => assert_eq!(r.kind, expect, "{what}: {r}"),
        other => panic!("{what}: {other:?}"),
    }
    assert!(stats.peak < PEAK_LIMIT, "{what}: peak {} bytes", stats.peak);
}

/// A frame of type `t` with the type's flags, carrying `p`.
fn envelope_frame(t: &str, p: &[u8]) -> Vec<u8> {
    let flags = agentwire::MessageType::from_wire_name(t).map_or(0, |t| t.flags().bits());
    common::frame(1, flags, t, p)
}

#[test]
fn hostile_inputs_stay_within_the_peak_heap_limit() {
    // A payload nested 1,000,000 levels deep, as arrays, maps and tags.
    for (shape, nest) in [("arrays", vec![0x81u8]), ("maps", b"\xa1\x61a".to_vec()), ("tags", vec![0xc1])] {
        let mut p = nest.repeat(1_000_000);
        p.push(0);
        rejected_within_limit(&envelope_frame("core.exec.stdout", &p), RejectKind::InvalidPayload, shape);
    }
    // Byte strings, text, arrays and maps claiming up to 2^64-1 bytes or items.
    for major in [2u8, 3, 4, 5] {
        for claim in [u64::MAX, 1 << 40, u32::MAX as u64] {
            let mut p = b"\xa1\x64data".to_vec();
            p.push(major << 5 | 27);
            p.extend_from_slice(&claim.to_be_bytes());
            p.extend_from_slice(&[0; 16]);
            for t in ["core.exec.stdout", "core.exec.request", "core.bootstrap", "core.fs.response"] {
                rejected_within_limit(
                    &envelope_frame(t, &p),
                    RejectKind::InvalidPayload,
                    &format!("{t} {major} {claim}"),
                );
            }
        }
    }
}

#[test]
fn every_malformed_vector_stays_within_the_peak_heap_limit() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/malformed.jsonl")).unwrap();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let hex = v["hex"].as_str().unwrap();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let mut src = BytesMut::from(&bytes[..]);
        let mut codec = MessageCodec::new();
        let (items, stats) = measure(|| {
            let mut items = 0;
            while let Ok(Some(_)) = codec.decode_eof(&mut src) {
                items += 1;
            }
            items
        });
        assert!(items <= 2, "{line}");
        assert!(stats.peak < PEAK_LIMIT, "peak {} for {line}", stats.peak);
    }
}

#[test]
fn a_header_claiming_u32_max_costs_nothing_and_is_a_stream_error() {
    let mut src = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0][..]);
    src.put_slice(&[0u8; 4096]);
    let mut codec = FrameCodec::new();
    let (result, stats) = measure(|| (codec.decode(&mut src).unwrap(), codec.decode_eof(&mut src)));
    assert!(result.0.is_none());
    assert!(result.1.is_err());
    assert_eq!(stats.allocs, 0, "{stats:?}");
}

#[test]
fn ten_thousand_unknown_frames_in_a_row_stay_within_the_limit() {
    let unknown = envelope_frame("core.future.thing", b"\xa0");
    let mut input = unknown.repeat(10_000);
    input.extend_from_slice(&frame(Message::new(9, ExecExited { code: 42 })));
    let mut src = BytesMut::from(&input[..]);
    let mut codec = MessageCodec::new();
    let ((unknown_count, last), stats) = measure(|| {
        let mut unknown_count = 0;
        let mut last = None;
        while let Some(item) = codec.decode(&mut src).unwrap() {
            match item {
                Err(r) if r.kind == RejectKind::UnsupportedMessageType => unknown_count += 1,
                other => last = Some(other),
            }
        }
        (unknown_count, last)
    });
    assert_eq!(unknown_count, 10_000);
    assert_eq!(last.unwrap().unwrap().id, 9);
    assert!(stats.peak < PEAK_LIMIT, "{stats:?}");
}
