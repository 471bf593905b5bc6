//! Stream behaviour: split invariance, prefixes, oversized frames in both modes.

mod common;

use agentwire::{FrameCodec, MAX_FRAME_SIZE, MessageCodec, RejectKind, StreamError};
use bytes::{BufMut, BytesMut};
use common::{hex, vectors};
use futures::StreamExt;
use tokio_util::codec::{Decoder, FramedRead};

/// A mixed stream: small golden frames of both generations, every `frame`-class
/// malformed input under 1 KiB (each followed by its valid frame), and one frame
/// above the 512-byte limit used here.
fn mixed_stream() -> Vec<u8> {
    let mut wire = Vec::new();
    for (i, v) in vectors("golden.jsonl").iter().enumerate() {
        let frame = hex(v["frame"].as_str().unwrap());
        if frame.len() < 200 && i % 3 == 0 {
            wire.extend(frame);
        }
    }
    for v in vectors("malformed.jsonl") {
        let bytes = hex(v["hex"].as_str().unwrap());
        if v["class"] != "fatal" && bytes.len() < 1024 {
            wire.extend(bytes);
        }
    }
    // id 77, SESSION_START, 700 bytes of body: over the limit.
    wire.extend((705u32).to_be_bytes());
    wire.extend(77u32.to_be_bytes());
    wire.push(2);
    wire.extend(std::iter::repeat_n(0xab, 700));
    wire.extend(hex("000000270000000901a3617607617470636f72652e657865632e657869746564617048a164636f6465182a"));
    wire
}

fn codec() -> MessageCodec {
    MessageCodec::with_frame_codec(FrameCodec::builder().max_frame_len(LIMIT).build())
}

/// The limit used here: small, so the mixed stream can hold an oversized frame.
const LIMIT: usize = 512;

fn decode_in_pieces(wire: &[u8], cuts: &[usize]) -> Vec<String> {
    common::pieces::decode_in_pieces(wire, cuts, LIMIT)
}

#[test]
fn every_two_way_split_and_byte_by_byte_give_the_same_items() {
    let wire = mixed_stream();
    let whole = decode_in_pieces(&wire, &[]);
    assert!(whole.len() > 20, "{}", whole.len());
    assert!(whole.iter().any(|i| i.contains("FrameTooLarge")));
    assert!(whole.iter().any(|i| i.contains("InvalidPayload")));
    assert!(!whole.iter().any(|i| i.starts_with("stream error")));
    for cut in 1..wire.len() {
        assert_eq!(decode_in_pieces(&wire, &[cut]), whole, "split at {cut}");
    }
    let every_byte: Vec<usize> = (1..wire.len()).collect();
    assert_eq!(decode_in_pieces(&wire, &every_byte), whole);
}

#[test]
fn a_prefix_gives_the_complete_frames_and_waits_for_the_rest() {
    let wire = mixed_stream();
    let whole = decode_in_pieces(&wire, &[]);
    let mut codec = codec();
    let mut complete = 0;
    let mut buf = BytesMut::from(&wire[..wire.len() - 10]);
    while let Some(item) = codec.decode(&mut buf).unwrap() {
        assert_eq!(format!("{item:?}"), whole[complete]);
        complete += 1;
    }
    assert_eq!(complete, whole.len() - 1, "all but the last frame");
    buf.put_slice(&wire[wire.len() - 10..]);
    assert_eq!(format!("{:?}", codec.decode(&mut buf).unwrap().unwrap()), whole[complete]);
}

#[test]
fn a_stream_ending_inside_a_frame_is_an_error_at_any_cut() {
    let wire = hex("000000270000000901a3617607617470636f72652e657865632e657869746564617048a164636f6465182a");
    for cut in 1..wire.len() {
        let items = decode_in_pieces(&wire[..cut], &[]);
        assert_eq!(items.len(), 1, "{items:?}");
        assert!(items[0].starts_with("stream error: stream ended inside the frame at offset 0"), "{}", items[0]);
    }
}

fn exited(id: u32) -> Vec<u8> {
    let mut f = hex("000000270000000901a3617607617470636f72652e657865632e657869746564617048a164636f6465182a");
    f[4..8].copy_from_slice(&id.to_be_bytes());
    f
}

/// Two valid frames around one of `MAX_FRAME_SIZE + 1000` bytes of real data.
fn oversized_between_valid() -> Vec<u8> {
    let mut wire = exited(1);
    let len = (MAX_FRAME_SIZE + 1000) as u32;
    wire.extend(len.to_be_bytes());
    wire.extend(0xdead_beefu32.to_be_bytes());
    wire.push(0x02);
    wire.extend((0..len as usize - 5).map(|i| i as u8));
    wire.extend(exited(2));
    wire
}

#[test]
fn oversized_frame_is_skipped_in_bounded_memory_and_reported_with_its_id() {
    let wire = oversized_between_valid();
    let mut codec = MessageCodec::new();
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    let mut most_buffered = 0;
    for chunk in wire.chunks(64 * 1024) {
        buf.put_slice(chunk);
        most_buffered = most_buffered.max(buf.len());
        while let Some(item) = codec.decode(&mut buf).unwrap() {
            items.push(item);
        }
        assert!(buf.capacity() <= MAX_FRAME_SIZE, "buffer capacity {}", buf.capacity());
    }
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
    assert!(most_buffered <= 64 * 1024 + 43, "never more than one read held: {most_buffered}");
    assert_eq!(items.len(), 3);
    assert_eq!(items[0].as_ref().unwrap().id, 1);
    let r = items[1].as_ref().unwrap_err();
    assert_eq!((r.kind, r.id, r.flags.bits(), r.offset), (RejectKind::FrameTooLarge, 0xdead_beef, 2, 43));
    assert!(r.reason.contains(&format!("length {}", MAX_FRAME_SIZE + 1000)), "{}", r.reason);
    assert_eq!(items[2].as_ref().unwrap().id, 2);
}

#[test]
fn oversized_frame_through_framed_read_in_default_and_strict_mode() {
    futures::executor::block_on(async {
        let wire = oversized_between_valid();
        let mut reader = FramedRead::new(&wire[..], MessageCodec::new());
        let mut ids = Vec::new();
        while let Some(item) = reader.next().await {
            let item = item.unwrap();
            ids.push(item.as_ref().map(|m| m.id).unwrap_or_else(|r| r.id));
            assert!(reader.read_buffer().capacity() <= MAX_FRAME_SIZE);
        }
        assert_eq!(ids, [1, 0xdead_beef, 2]);

        let strict = MessageCodec::with_frame_codec(FrameCodec::builder().strict(true).build());
        let items: Vec<_> = FramedRead::new(&wire[..], strict).collect().await;
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(items[0].as_ref().unwrap().as_ref().unwrap().id, 1);
        assert!(matches!(items[1], Err(StreamError::FrameTooLarge { offset: 43, .. })));
    })
}

#[test]
fn a_header_claiming_u32_max_reserves_nothing() {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 7, 0][..]);
    let before = buf.capacity();
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert!(buf.capacity() <= before);
    buf.put_slice(&[0u8; 1000]);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert!(buf.is_empty(), "discarded as it arrives");
    let err = codec.decode_eof(&mut buf).unwrap_err();
    assert!(err.to_string().contains("1009 of 4294967299 bytes"), "{err}");
}

#[test]
fn ten_thousand_unknown_frames_in_a_row_are_each_kept_and_the_stream_goes_on() {
    futures::executor::block_on(async {
        let unknown = hex("000000210000000100a3617607617471636f72652e6675747572652e7468696e67617041a0");
        let mut wire = Vec::new();
        for _ in 0..10_000 {
            wire.extend(&unknown);
        }
        wire.extend(exited(9));
        let items: Vec<_> = FramedRead::new(&wire[..], MessageCodec::new()).collect().await;
        assert_eq!(items.len(), 10_001);
        for item in &items[..10_000] {
            let r = item.as_ref().unwrap().as_ref().unwrap_err();
            assert_eq!(r.kind, RejectKind::UnsupportedMessageType);
        }
        assert_eq!(items[10_000].as_ref().unwrap().as_ref().unwrap().id, 9);
    })
}

#[test]
fn a_header_claiming_the_limit_reserves_only_what_arrives_and_a_little_more() {
    // len = MAX_FRAME_SIZE, id 1, flags 0, then one byte of body: a trickling peer.
    let mut buf = BytesMut::new();
    buf.put_u32(MAX_FRAME_SIZE as u32);
    buf.put_u32(1);
    buf.put_u8(0);
    buf.put_u8(0xa3);
    let mut codec = MessageCodec::new();
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert!(buf.capacity() <= 128 * 1024, "reserved {} bytes for 1 that arrived", buf.capacity());
    // The frame still decodes when the rest arrives, in pieces.
    let body = {
        let mut whole = BytesMut::new();
        codec_frame_of_len(&mut whole, MAX_FRAME_SIZE);
        whole.split_off(10)
    };
    for piece in body.chunks(1 << 20) {
        buf.put_slice(piece);
        if let Some(item) = codec.decode(&mut buf).unwrap() {
            assert!(item.is_err(), "the body is not an envelope, so it is a rejected frame");
            return;
        }
    }
    panic!("the frame was not read once whole");
}

/// A frame of exactly `len` whose body starts with 0xa3 and is otherwise zero.
fn codec_frame_of_len(out: &mut BytesMut, len: usize) {
    out.put_u32(len as u32);
    out.put_u32(1);
    out.put_u8(0);
    out.put_u8(0xa3);
    out.resize(4 + len, 0);
}
