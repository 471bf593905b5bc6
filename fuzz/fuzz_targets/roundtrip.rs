//! Structure-aware: any payload of the 46 types and raw bulk records with any
//! field values, any id and generation. Encode then decode gives the same
//! message; the frame is canonical (re-encoding gives the same bytes); its
//! payload is exactly what the serde path writes as a writer of the frame's
//! generation (`as_generation`), and a raw record's body is its 12-byte header
//! and data as spec section 7.1 lays them out.

#![no_main]

use agentwire::payload::{as_generation, serde_encode};
use agentwire::{Message, MessageCodec, PROTOCOL_VERSION, Payload};
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
    let expected = match &message.payload {
        Payload::BulkRecord(r) => {
            assert_eq!(wire[8], 0x08, "a raw record's flags are BULK alone");
            reference.extend_from_slice(&[r.kind.to_wire(), r.flow.to_wire(), 0, 0]);
            reference.extend_from_slice(&r.offset.to_be_bytes());
            reference.extend_from_slice(&r.data);
            assert_eq!(wire.len(), 9 + reference.len());
            // A record carries no `v`: it reads back with the negotiated generation.
            message.clone().with_version(PROTOCOL_VERSION)
        }
        payload => {
            as_generation(message.version, || serde_encode(payload, &mut reference)).unwrap();
            message.clone()
        }
    };
    assert!(wire.ends_with(&reference), "payload bytes differ from the serde path");
    let bytes = wire.clone().freeze();
    let decoded = codec.decode_eof(&mut wire).unwrap().unwrap().unwrap();
    assert_eq!(decoded, expected);
    let mut again = BytesMut::new();
    codec.encode_message(&decoded, &mut again).unwrap();
    assert_eq!(again.freeze(), bytes, "not canonical");
});
