//! The loop BENCHMARKS.md profiles to show where the time of a 1 MiB
//! `core.fs.data` decode goes: each frame decoded from a fresh buffer made
//! right before it (as the benchmark does), by agentwire, the decode in its own
//! function that is never inlined, so that callgrind can count only it.
//!
//! `SIZE` is the data size of the frame; with `--record` it is a raw bulk
//! record (generation 8) instead of `core.fs.data`; with `--before-1m` the frame is
//! followed in its buffer by a frame of 1 MiB (the benchmark's
//! `decode_100b_before_1m`), so that making the input copies as much.
//!
//! ```text
//! cargo build --release --example profile_bulk
//! valgrind --tool=callgrind --cache-sim=yes --toggle-collect='profile_bulk::decode_ours' \
//!     target/release/examples/profile_bulk 1048576 2000
//! valgrind --tool=callgrind --cache-sim=yes --toggle-collect='profile_bulk::decode_ours' \
//!     target/release/examples/profile_bulk 100 2000
//! ```
//!
//! With `--reference` the reference 0.7.13 decodes instead (`decode_theirs`).
//! Without valgrind it prints the mean time of a decode, measured around each
//! decode alone.

use std::hint::black_box;
use std::time::Instant;

use agentwire::payload::fs::FsData;
use agentwire::{Message, MessageCodec};
use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

#[inline(never)]
fn decode_ours(codec: &mut MessageCodec, src: &mut BytesMut) -> Message {
    codec.decode(src).expect("stream").expect("frame").expect("valid")
}

/// The reference 0.7.13's decode of the same bytes (`--reference`, with `--record`).
#[inline(never)]
fn decode_theirs(src: &mut BytesMut) -> ref7::codec::DecodedFrame {
    ref7::codec::try_decode_frame_from_bytes(src).expect("stream").expect("frame")
}

fn frame(size: usize, record: bool) -> BytesMut {
    use agentwire::payload::bulk::{BulkFlow, BulkKind, BulkRecord};
    let mut frame = BytesMut::new();
    let data = Bytes::from(vec![7u8; size]);
    let message = if record {
        Message::new(7, BulkRecord::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 0, data))
    } else {
        Message::new(7, FsData { data })
    };
    MessageCodec::new().encode_message(&message, &mut frame).expect("encodes");
    frame
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1 << 20);
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let record = args.iter().any(|a| a == "--record");
    let reference = args.iter().any(|a| a == "--reference");
    let mut input = frame(size, record);
    if args.iter().any(|a| a == "--before-1m") {
        input.extend_from_slice(&frame(1 << 20, record));
    }
    let mut codec = MessageCodec::new();
    let mut nanos = 0u128;
    for _ in 0..n {
        // As `fresh_input` in benches/codec.rs: a new buffer, its header read.
        let mut src = BytesMut::from(&input[..]);
        black_box(src.iter().take(64).fold(0u8, |a, &b| a ^ b));
        let start = Instant::now();
        if reference {
            let decoded = decode_theirs(&mut src);
            nanos += start.elapsed().as_nanos();
            black_box((src, decoded));
            continue;
        }
        let message = decode_ours(&mut codec, &mut src);
        nanos += start.elapsed().as_nanos();
        black_box((src, message));
    }
    println!("{size}-byte frame: {:.0} ns a decode (mean of {n})", nanos as f64 / n as f64);
}
