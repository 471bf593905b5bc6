//! Property tests over values of every type, built with `arbitrary` from
//! proptest's random bytes: round trips, canonical output, split invariance,
//! and prefixes of a stream.

mod common;

use agentwire::payload::serde_encode;
use agentwire::{Message, MessageCodec, MessageType, Payload};
use arbitrary::{Arbitrary, Unstructured};
use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

/// A message of any type with any field values, from raw entropy.
fn message_from(entropy: &[u8]) -> Option<Message> {
    let mut u = Unstructured::new(entropy);
    let payload = Payload::arbitrary(&mut u).ok()?;
    let id = u32::arbitrary(&mut u).ok()?;
    Some(Message::new(id, payload))
}

fn encode(m: &Message) -> BytesMut {
    let mut b = BytesMut::new();
    MessageCodec::new().encode_message(m, &mut b).unwrap();
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any message encodes, decodes to itself, re-encodes to the same bytes,
    /// and its payload bytes are the serde path's.
    #[test]
    fn round_trip_and_canonical(entropy in prop::collection::vec(any::<u8>(), 0..512)) {
        let Some(m) = message_from(&entropy) else { return Ok(()) };
        let wire = encode(&m);
        prop_assert_eq!(wire.len(), m.wire_len().unwrap());
        if m.message_type().has_envelope() {
            // A raw bulk record has no CBOR to compare with.
            let mut reference = BytesMut::new();
            serde_encode(&m.payload, &mut reference).unwrap();
            prop_assert!(wire.ends_with(&reference));
        }
        let decoded = MessageCodec::new().decode_eof(&mut wire.clone()).unwrap().unwrap().unwrap();
        prop_assert_eq!(&decoded, &m);
        prop_assert_eq!(encode(&decoded), wire);
    }

    /// A stream of messages decodes to the same items however it is split.
    #[test]
    fn split_invariance(entropy in prop::collection::vec(any::<u8>(), 0..1024), cuts in prop::collection::vec(any::<u16>(), 0..8)) {
        let mut wire = BytesMut::new();
        for chunk in entropy.chunks(128) {
            if let Some(m) = message_from(chunk) {
                wire.put_slice(&encode(&m));
            }
        }
        let whole = common::pieces::decode_in_pieces(&wire, &[], agentwire::MAX_FRAME_SIZE);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| usize::from(*c) % (wire.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(common::pieces::decode_in_pieces(&wire, &cuts, agentwire::MAX_FRAME_SIZE), whole);
    }

    /// A prefix of a valid stream gives its complete frames and waits for the rest.
    #[test]
    fn prefix_gives_complete_frames(entropy in prop::collection::vec(any::<u8>(), 0..1024), keep in any::<u16>()) {
        let mut wire = BytesMut::new();
        let mut ends = Vec::new();
        for chunk in entropy.chunks(128) {
            if let Some(m) = message_from(chunk) {
                wire.put_slice(&encode(&m));
                ends.push(wire.len());
            }
        }
        let keep = usize::from(keep) % (wire.len() + 1);
        let mut buf = BytesMut::from(&wire[..keep]);
        let mut codec = MessageCodec::new();
        let mut complete = 0;
        while let Some(item) = codec.decode(&mut buf).unwrap() {
            prop_assert!(item.is_ok());
            complete += 1;
        }
        prop_assert_eq!(complete, ends.iter().filter(|&&end| end <= keep).count());
        buf.put_slice(&wire[keep..]);
        while codec.decode(&mut buf).unwrap().is_some() {
            complete += 1;
        }
        prop_assert_eq!(complete, ends.len());
        prop_assert!(buf.is_empty());
    }
}

/// Every one of the 32 types, many times: a round trip of arbitrary values.
#[test]
fn round_trip_of_every_type() {
    let mut seen = std::collections::HashSet::new();
    let mut state = 0x1234_5678_9abc_def0u64;
    for _ in 0..20_000 {
        let entropy: Vec<u8> = (0..256)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let Some(m) = message_from(&entropy) else { continue };
        seen.insert(m.message_type());
        let wire = encode(&m);
        let decoded = MessageCodec::new().decode_eof(&mut wire.clone()).unwrap().unwrap().unwrap();
        assert_eq!(decoded, m);
    }
    for t in MessageType::ALL {
        assert!(seen.contains(&t), "no arbitrary value of {t} was tried");
    }
}
