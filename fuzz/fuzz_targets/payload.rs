//! For every message type, arbitrary bytes to that type's payload decoder: an
//! error or a value, never a panic; a value re-encodes to the serde path's
//! bytes and decodes to itself; the fast and serde decoders give the same
//! answer, and so do the decoders from `Bytes` and from a borrowed slice.
//!
//! Also per generation (3, 7, 10): a value written as a writer of that
//! generation writes it (`encode_at`, which leaves the fs `user` keys out below
//! 10) is what the serde path writes under `as_generation`, and reads back to
//! the same value. The raw bulk record, whose body is not CBOR, re-encodes to
//! exactly the bytes it was read from.

#![no_main]

use agentwire::MessageType;
use agentwire::payload::{as_generation, serde_encode};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = Bytes::copy_from_slice(data);
    for t in MessageType::ALL {
        let from_slice = t.decode_payload_slice(data);
        assert_eq!(t.decode_payload(&p), from_slice, "{t}: from Bytes and from a slice differ");
        // The serde path alone gives the same answer, errors included; but
        // `core.shutdown` reads an empty payload on purpose (older senders
        // wrote nothing), where the serde path sees no item.
        if t.has_envelope() && !(t == MessageType::Shutdown && data.is_empty()) {
            assert_eq!(from_slice, t.decode_payload_serde(data), "{t}: the fast and serde decoders differ");
        }
        let Ok(value) = from_slice else { continue };
        let mut ours = BytesMut::new();
        value.encode(&mut ours).expect("a decoded payload encodes");
        if t.has_envelope() {
            let mut reference = BytesMut::new();
            serde_encode(&value, &mut reference).expect("the serde path encodes it too");
            assert_eq!(ours, reference, "{t}: fast and serde encodings differ");
        } else {
            assert_eq!(&ours[..], data, "{t}: a raw record re-encodes to other bytes");
        }
        assert_eq!(value.encoded_len().unwrap(), ours.len());
        assert_eq!(t.decode_payload(&ours.freeze()).expect("re-decodes"), value);
        if !t.has_envelope() {
            continue;
        }
        for generation in [3, 7, 10] {
            let mut at = BytesMut::new();
            value.encode_at(generation, &mut at).expect("a decoded payload encodes at any generation");
            let mut reference = BytesMut::new();
            as_generation(generation, || serde_encode(&value, &mut reference)).expect("the serde path too");
            assert_eq!(at, reference, "{t}: encode_at({generation}) and the serde path differ");
            assert_eq!(value.encoded_len_at(generation).unwrap(), at.len(), "{t} at {generation}");
            assert_eq!(t.decode_payload(&at.freeze()).expect("re-decodes"), value, "{t} at {generation}");
        }
    }
});
