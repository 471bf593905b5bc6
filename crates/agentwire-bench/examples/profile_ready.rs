//! The loops BENCHMARKS.md counts with callgrind: `core.ready` decoded, each
//! frame from its own fresh buffer (as the benchmark does), and encoded into a
//! buffer that has room, by agentwire and by the benchmarks' baseline.
//!
//! Each operation runs inside its own function that is never inlined, so that
//! callgrind can count only the instructions spent in it
//! (`--toggle-collect`); `benches/callgrind.sh` does that for all four and
//! prints instructions per operation and the ratios.
//!
//! ```text
//! cargo build --release --example profile_ready
//! valgrind --tool=callgrind --toggle-collect='profile_ready::decode_ours' \
//!     target/release/examples/profile_ready decode 20000
//! ```

#[path = "../benches/support/baseline.rs"]
mod baseline;

use std::hint::black_box;

use agentwire::payload::core::Ready;
use agentwire::{Message, MessageCodec, TypedPayload};
use bytes::BytesMut;
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

#[inline(never)]
fn decode_ours(codec: &mut MessageCodec, src: &mut BytesMut) -> Message {
    codec.decode(src).expect("stream").expect("frame").expect("valid")
}

#[inline(never)]
fn encode_ours(codec: &mut MessageCodec, message: &Message, dst: &mut BytesMut) {
    codec.encode_message(message, dst).expect("encodes");
}

#[inline(never)]
fn decode_baseline(codec: &mut LengthDelimitedCodec, src: &mut BytesMut) -> (u32, u8, Ready) {
    baseline::baseline_decode(codec, src).expect("frame")
}

#[inline(never)]
fn encode_baseline(codec: &mut LengthDelimitedCodec, ready: &Ready, dst: &mut BytesMut) {
    let t = Ready::MESSAGE_TYPE;
    baseline::baseline_encode(codec, 7, t.flags().bits(), t.wire_name(), ready, dst);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "decode".into());
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let ready = Ready {
        boot_time_ns: 1_234_567_890,
        init_time_ns: 45_678_901,
        ready_time_ns: 1_300_000_000,
        agent_version: "agentwire 0.1.0".into(),
        capabilities: None,
    };
    let message = Message::new(7, ready.clone());
    let mut ours = MessageCodec::new();
    let mut base = baseline::baseline_codec();
    let mut frame = BytesMut::new();
    ours.encode_message(&message, &mut frame).expect("encodes");
    let inputs = || (0..n).map(|_| BytesMut::from(&frame[..])).collect::<Vec<_>>();
    let mut dst = BytesMut::with_capacity(frame.len() * 2);
    match mode.as_str() {
        "decode" => {
            let outputs: Vec<_> = inputs().into_iter().map(|mut src| (decode_ours(&mut ours, &mut src), src)).collect();
            assert!(outputs.iter().all(|(m, _)| *m == message));
        }
        "baseline-decode" => {
            let outputs: Vec<_> =
                inputs().into_iter().map(|mut src| (decode_baseline(&mut base, &mut src), src)).collect();
            assert!(outputs.iter().all(|((_, _, r), _)| *r == ready));
        }
        "encode" => {
            for _ in 0..n {
                dst.clear();
                encode_ours(&mut ours, black_box(&message), &mut dst);
            }
        }
        "baseline-encode" => {
            for _ in 0..n {
                dst.clear();
                encode_baseline(&mut base, black_box(&ready), &mut dst);
            }
        }
        other => panic!("the mode is decode, encode, baseline-decode or baseline-encode, not {other}"),
    }
    if mode.ends_with("encode") {
        assert_eq!(dst, frame);
    }
    println!("{mode}: {n} times");
}
