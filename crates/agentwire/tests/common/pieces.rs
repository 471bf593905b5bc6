//! Decoding a stream delivered in pieces, shared by the split tests and the
//! `split` fuzz target (which includes this file by path).

use agentwire::{FrameCodec, MessageCodec};
use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// Decodes `stream` delivered in the pieces that the sorted offsets `cuts` make,
/// with a message codec whose frame limit is `limit`, then the end of the
/// stream. Items are rendered with `Debug` (stream errors are not comparable
/// otherwise); a stream error ends the list.
pub fn decode_in_pieces(stream: &[u8], cuts: &[usize], limit: usize) -> Vec<String> {
    let mut codec = MessageCodec::with_frame_codec(FrameCodec::builder().max_frame_len(limit).build());
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
                    out.push(format!("stream error: {e}"));
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
                out.push(format!("stream error: {e}"));
                return out;
            }
        }
    }
}
