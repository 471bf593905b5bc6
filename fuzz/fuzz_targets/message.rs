//! Arbitrary bytes through the message codecs. Every message that decodes
//! re-encodes and decodes again to the same value (type, `v`, `id`, flags,
//! payload); so does every raw message.

#![no_main]

use std::fmt::Debug;

use agentwire::{MessageCodec, RawMessageCodec, Rejected, StreamError};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

/// Decodes `data` with a fresh `C`; every item that decodes must re-encode and
/// decode again, alone, to the same value.
fn reencodes<C, T>(data: &[u8])
where
    C: Default + Decoder<Item = Result<T, Rejected>, Error = StreamError> + Encoder<T>,
    <C as Encoder<T>>::Error: Debug,
    T: Clone + PartialEq + Debug,
{
    let mut codec = C::default();
    let mut src = BytesMut::from(data);
    while let Ok(Some(item)) = codec.decode_eof(&mut src) {
        let Ok(value) = item else { continue };
        let mut again = BytesMut::new();
        C::default().encode(value.clone(), &mut again).expect("a decoded value re-encodes");
        let back = C::default().decode_eof(&mut again).expect("stream").expect("a frame").expect("valid");
        assert_eq!(back, value);
        assert!(again.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    reencodes::<MessageCodec, _>(data);
    reencodes::<RawMessageCodec, _>(data);
});
