//! How the size of criterion's batches changes the `core.ready` decode
//! figures, for agentwire and for the baseline: the measurement behind the
//! choice of batches of 64 in `benches/codec.rs` (see BENCHMARKS.md).
//!
//! Both codecs decode fresh buffers, keep every result until the batch ends,
//! then drop them all, as criterion's `iter_batched` does. With batches of
//! tens of thousands (criterion's `SmallInput` gives a tenth of a sample's
//! iterations), each decode's allocation reuses a block freed tens of
//! thousands of allocations earlier, cold in cache. agentwire makes one
//! allocation a decode and frees none, so it pays that miss on every decode;
//! the baseline frees two of its four allocations in each decode and reuses
//! them, warm, in the next. The measurements alternate between the two
//! codecs and the two batch sizes, so that the load on a shared machine hits
//! them alike.
//!
//! ```text
//! cargo run --release --example batch_effect -- [ROUNDS]
//! ```

#[path = "../benches/support/baseline.rs"]
mod baseline;

use std::hint::black_box;
use std::time::Instant;

use agentwire::payload::core::Ready;
use agentwire::{Message, MessageCodec};
use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// Decodes in all.
const TOTAL: usize = 40_960;
const BATCHES: [usize; 2] = [64, 20_480];

/// Nanoseconds per decode, timing only the decodes, batch by batch.
fn time_per_decode<T>(batch: usize, frame: &[u8], mut decode: impl FnMut(&mut BytesMut) -> T) -> f64 {
    let mut nanos = 0u128;
    for _ in 0..TOTAL / batch {
        let inputs: Vec<BytesMut> = (0..batch).map(|_| BytesMut::from(frame)).collect();
        let mut outputs = Vec::with_capacity(batch);
        let start = Instant::now();
        for mut src in inputs {
            let decoded = decode(&mut src);
            outputs.push((src, decoded));
        }
        nanos += start.elapsed().as_nanos();
        black_box(&outputs);
    }
    nanos as f64 / TOTAL as f64
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let ready = Ready {
        boot_time_ns: 1_234_567_890,
        init_time_ns: 45_678_901,
        ready_time_ns: 1_300_000_000,
        agent_version: "agentwire 0.1.0".into(),
        capabilities: None,
    };
    let mut frame = BytesMut::new();
    MessageCodec::new().encode_message(&Message::new(7, ready), &mut frame).expect("encodes");
    let mut ours = MessageCodec::new();
    let mut base = baseline::baseline_codec();
    println!("ns per core.ready decode, median of 10 passes of {TOTAL} decodes");
    for _ in 0..rounds {
        for batch in BATCHES {
            let mut times = [Vec::new(), Vec::new()];
            for _ in 0..10 {
                times[0].push(time_per_decode(batch, &frame, |src| {
                    ours.decode(src).expect("stream").expect("frame").expect("valid")
                }));
                times[1].push(time_per_decode(batch, &frame, |src| {
                    baseline::baseline_decode::<Ready>(&mut base, src).expect("frame")
                }));
            }
            let [o, b] = times.map(|mut t| {
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            });
            print!("batch {batch:>6}: agentwire {o:6.1}  baseline {b:7.1}  ratio {:5.2}   ", b / o);
        }
        println!();
    }
}
