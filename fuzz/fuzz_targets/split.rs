//! One input stream and a list of split points: decoding in pieces gives
//! exactly the items of decoding it whole.

#![no_main]

use agentwire::{FrameCodec, MessageCodec};
use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

#[derive(Arbitrary, Debug)]
struct Input {
    cuts: Vec<u16>,
    limit: u16,
    stream: Vec<u8>,
}

fn decode(stream: &[u8], cuts: &[usize], limit: usize) -> Vec<String> {
    let frames = FrameCodec::builder().max_frame_len(limit).build();
    let mut codec = MessageCodec::with_frame_codec(frames);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&stream.len())) {
        buf.extend_from_slice(&stream[start..end]);
        start = end;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(item)) => out.push(format!("{item:?}")),
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("error {e}"));
                    return out;
                }
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(item)) => out.push(format!("{item:?}")),
            Ok(None) => return out,
            Err(e) => {
                out.push(format!("error {e}"));
                return out;
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let limit = usize::from(input.limit).max(agentwire::FRAME_HEADER_SIZE);
    let mut cuts: Vec<usize> = input.cuts.iter().map(|c| usize::from(*c) % (input.stream.len() + 1)).collect();
    cuts.sort_unstable();
    let whole = decode(&input.stream, &[], limit);
    assert_eq!(decode(&input.stream, &cuts, limit), whole);
});
