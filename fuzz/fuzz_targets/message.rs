//! Arbitrary bytes through the message codecs. Every message that decodes
//! re-encodes and decodes again to the same value (type, `v`, `id`, flags,
//! payload); so does every raw message.

#![no_main]

use agentwire::{MessageCodec, RawMessageCodec};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = MessageCodec::new();
    let mut src = BytesMut::from(data);
    while let Ok(Some(item)) = codec.decode_eof(&mut src) {
        let Ok(message) = item else { continue };
        let mut again = BytesMut::new();
        MessageCodec::new().encode_message(&message, &mut again).expect("a decoded message re-encodes");
        let back = MessageCodec::new().decode_eof(&mut again).expect("stream").expect("a frame").expect("valid");
        assert_eq!(back, message);
        assert!(again.is_empty());
    }

    let mut raw = RawMessageCodec::new();
    let mut src = BytesMut::from(data);
    while let Ok(Some(item)) = raw.decode_eof(&mut src) {
        let Ok(message) = item else { continue };
        let mut again = BytesMut::new();
        RawMessageCodec::new().encode_raw(&message, &mut again).expect("a decoded raw message re-encodes");
        let back = RawMessageCodec::new().decode_eof(&mut again).expect("stream").expect("a frame").expect("valid");
        assert_eq!(back, message);
    }
});
