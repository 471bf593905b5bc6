//! The loop BENCHMARKS.md profiles with callgrind: decode `core.ready` frames,
//! each from its own fresh buffer (as the benchmark does), N times.
//!
//! ```text
//! cargo build --release --example profile_ready
//! valgrind --tool=callgrind --callgrind-out-file=ready.cg target/release/examples/profile_ready 20000
//! callgrind_annotate --inclusive=yes ready.cg | head -40
//! ```

use agentwire::payload::core::Ready;
use agentwire::{Message, MessageCodec};
use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let ready = Ready {
        boot_time_ns: 1_234_567_890,
        init_time_ns: 45_678_901,
        ready_time_ns: 1_300_000_000,
        agent_version: "agentwire 0.1.0".into(),
    };
    let mut frame = BytesMut::new();
    MessageCodec::new().encode(Message::new(0, ready), &mut frame).expect("encodes");
    let inputs: Vec<BytesMut> = (0..n).map(|_| BytesMut::from(&frame[..])).collect();
    let mut codec = MessageCodec::new();
    let mut outputs = Vec::with_capacity(n);
    for mut src in inputs {
        let message = codec.decode(&mut src).expect("stream").expect("frame").expect("valid");
        outputs.push((src, message));
    }
    println!("decoded {}", outputs.len());
}
