//! Arbitrary bytes to the frame codec in arbitrary chunk sizes (taken from the
//! input), with an arbitrary limit and mode.
//!
//! Invariants: no panic; never more bytes consumed than given; every frame's
//! header and body add up to its `len` and respect the limit; the read buffer
//! never holds more than the limit plus one read.

#![no_main]

use agentwire::{FRAME_HEADER_SIZE, FrameCodec, LENGTH_FIELD_SIZE, MAX_FRAME_SIZE};
use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

#[derive(Arbitrary, Debug)]
struct Input {
    limit: u16,
    strict: bool,
    chunks: Vec<u8>,
    data: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let limit = usize::from(input.limit).clamp(FRAME_HEADER_SIZE, MAX_FRAME_SIZE);
    let mut codec = FrameCodec::builder().max_frame_len(limit).strict(input.strict).build();
    let mut src = BytesMut::new();
    let mut fed = 0usize;
    let mut framed_bytes = 0u64;
    let mut chunks = input.chunks.iter().map(|c| usize::from(*c) + 1).cycle();
    let mut rest = &input.data[..];
    let mut lost = false;
    while !rest.is_empty() && !lost {
        let n = chunks.next().unwrap_or(rest.len()).min(rest.len());
        src.extend_from_slice(&rest[..n]);
        fed += n;
        rest = &rest[n..];
        // What was left (at most one incomplete frame) plus this read.
        assert!(
            src.len() <= LENGTH_FIELD_SIZE + limit + n,
            "buffer {} over limit {limit} plus a read of {n}",
            src.len()
        );
        loop {
            match codec.decode(&mut src) {
                Ok(Some(Ok(frame))) => {
                    assert!(FRAME_HEADER_SIZE + frame.body.len() <= limit);
                    framed_bytes += frame.wire_len() as u64;
                }
                Ok(Some(Err(oversized))) => {
                    assert!(!input.strict);
                    assert!(oversized.len as usize > limit);
                    framed_bytes += u64::from(oversized.len) + LENGTH_FIELD_SIZE as u64;
                }
                Ok(None) => {
                    // Waiting for more: never more than one incomplete frame is held.
                    assert!(src.len() <= LENGTH_FIELD_SIZE + limit, "holding {} with limit {limit}", src.len());
                    break;
                }
                Err(_) => {
                    lost = true;
                    break;
                }
            }
        }
        // Consumed plus still buffered is exactly what was fed.
        assert_eq!(codec.stream_offset() + src.len() as u64, fed as u64);
        assert!(codec.stream_offset() >= framed_bytes);
    }
    if !lost {
        let _ = codec.decode_eof(&mut src);
    }
});
