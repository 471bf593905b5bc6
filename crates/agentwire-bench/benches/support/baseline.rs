//! The codec a user would otherwise write, which the benchmarks measure
//! agentwire against: `tokio_util::codec::LengthDelimitedCodec` for framing,
//! the id and flags as the first five bytes of its frame, and the envelope and
//! the payload each serialized through ciborium's serde path into a `Vec`.
//!
//! Shared by `benches/codec.rs` and the examples `profile_ready` and
//! `batch_effect`, so that the criterion medians, the callgrind counts and the
//! batch measurements all measure the same code.
#![allow(dead_code)] // each user takes what it needs

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// The envelope as a user would declare it for serde.
#[derive(Serialize, Deserialize)]
struct BaselineEnvelope {
    v: u8,
    t: String,
    p: serde_bytes::ByteBuf,
}

/// `LengthDelimitedCodec` with the protocol's frame limit.
pub fn baseline_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(agentwire::MAX_FRAME_SIZE).new_codec()
}

/// Writes one frame: the payload and then the envelope through ciborium into
/// `Vec`s, the frame through `LengthDelimitedCodec`.
pub fn baseline_encode<T: Serialize>(
    codec: &mut LengthDelimitedCodec,
    id: u32,
    flags: u8,
    t: &str,
    payload: &T,
    dst: &mut BytesMut,
) {
    let mut p = Vec::new();
    ciborium::into_writer(payload, &mut p).unwrap();
    let envelope =
        BaselineEnvelope { v: agentwire::PROTOCOL_VERSION, t: t.to_string(), p: serde_bytes::ByteBuf::from(p) };
    let mut frame = Vec::with_capacity(5);
    frame.extend_from_slice(&id.to_be_bytes());
    frame.push(flags);
    ciborium::into_writer(&envelope, &mut frame).unwrap();
    codec.encode(Bytes::from(frame), dst).unwrap();
}

/// Reads one frame: cut out by `LengthDelimitedCodec`, the envelope and then
/// the payload through ciborium.
pub fn baseline_decode<T: DeserializeOwned>(
    codec: &mut LengthDelimitedCodec,
    src: &mut BytesMut,
) -> Option<(u32, u8, T)> {
    let frame = codec.decode(src).unwrap()?;
    let id = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
    let envelope: BaselineEnvelope = ciborium::from_reader(&frame[5..]).unwrap();
    let payload: T = ciborium::from_reader(&envelope.p[..]).unwrap();
    Some((id, frame[4], payload))
}
