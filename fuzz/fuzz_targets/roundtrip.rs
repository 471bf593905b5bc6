//! Structure-aware: any payload of the 32 types with any field values, any id
//! and generation. Encode then decode gives the same message; the frame is
//! canonical (re-encoding gives the same bytes) and its payload is exactly what
//! the serde path writes.

#![no_main]

use agentwire::payload::serde_encode;
use agentwire::{Message, MessageCodec, Payload};
use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

#[derive(Arbitrary, Debug)]
struct Input {
    id: u32,
    version: u8,
    payload: Payload,
}

fuzz_target!(|input: Input| {
    let message = Message::new(input.id, input.payload).with_version(input.version);
    let mut codec = MessageCodec::new();
    let mut wire = BytesMut::new();
    if codec.encode_message(&message, &mut wire).is_err() {
        // Only a frame above MAX_FRAME_SIZE may be refused, and then nothing is written.
        assert!(wire.is_empty());
        assert!(message.wire_len().unwrap() > agentwire::MAX_FRAME_SIZE + 4);
        return;
    }
    assert_eq!(wire.len(), message.wire_len().unwrap());
    let mut reference = BytesMut::new();
    serde_encode(&message.payload, &mut reference).unwrap();
    assert!(wire.ends_with(&reference), "payload bytes differ from the serde path");
    let bytes = wire.clone().freeze();
    let decoded = codec.decode_eof(&mut wire).unwrap().unwrap().unwrap();
    assert_eq!(decoded, message);
    let mut again = BytesMut::new();
    codec.encode_message(&decoded, &mut again).unwrap();
    assert_eq!(again.freeze(), bytes, "not canonical");
});
