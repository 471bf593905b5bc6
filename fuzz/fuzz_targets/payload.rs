//! For every message type, arbitrary bytes to that type's payload decoder: an
//! error or a value, never a panic; a value re-encodes to the serde path's
//! bytes and decodes to itself; the fast and serde decoders give the same
//! answer, and so do the decoders from `Bytes` and from a borrowed slice.

#![no_main]

use agentwire::MessageType;
use agentwire::payload::serde_encode;
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = Bytes::copy_from_slice(data);
    for t in MessageType::ALL {
        let from_slice = t.decode_payload_slice(data);
        assert_eq!(t.decode_payload(&p), from_slice, "{t}: from Bytes and from a slice differ");
        let Ok(value) = from_slice else { continue };
        let mut ours = BytesMut::new();
        value.encode(&mut ours).expect("a decoded payload encodes");
        let mut reference = BytesMut::new();
        serde_encode(&value, &mut reference).expect("the serde path encodes it too");
        assert_eq!(ours, reference, "{t}: fast and serde encodings differ");
        assert_eq!(value.encoded_len().unwrap(), ours.len());
        assert_eq!(t.decode_payload(&ours.freeze()).expect("re-decodes"), value);
    }
});
