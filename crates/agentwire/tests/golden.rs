//! Every golden vector (generations 3 and 7 in `golden.jsonl`, 10 in
//! `golden-gen10.jsonl`, raw bulk records included) decodes to the values it
//! names and encodes to its exact bytes.

mod common;

use agentwire::{Flags, Message, MessageCodec, MessageType, Payload};
use bytes::BytesMut;
use common::{hex, to_hex, vectors};
use tokio_util::codec::Decoder;

struct Golden {
    name: String,
    generation: u8,
    message_type: MessageType,
    id: u32,
    flags: u8,
    payload: serde_json::Value,
    frame: Vec<u8>,
}

const FILES: [&str; 2] = ["golden.jsonl", "golden-gen10.jsonl"];

fn golden() -> Vec<Golden> {
    FILES.into_iter().flat_map(golden_in).collect()
}

fn golden_in(file: &str) -> Vec<Golden> {
    vectors(file)
        .into_iter()
        .map(|v| Golden {
            name: v["name"].as_str().unwrap().to_string(),
            generation: v["gen"].as_u64().unwrap() as u8,
            message_type: MessageType::from_name(v["type"].as_str().unwrap()).expect("known type"),
            id: v["id"].as_u64().unwrap() as u32,
            flags: v["flags"].as_u64().unwrap() as u8,
            payload: v["payload"].clone(),
            frame: hex(v["frame"].as_str().unwrap()),
        })
        .collect()
}

#[test]
fn all_160_lines_of_generations_3_and_7() {
    let lines = golden_in("golden.jsonl");
    assert_eq!(lines.len(), 160);
    assert_eq!(lines.iter().filter(|l| l.generation == 3).count(), 32);
    assert_eq!(lines.iter().filter(|l| l.generation == 7).count(), 128);
    // Every type of generation 7 is covered.
    for t in MessageType::ALL.into_iter().filter(|t| t.is_available_at(7)) {
        assert!(lines.iter().any(|l| l.message_type == t), "no vector for {t}");
    }
}

#[test]
fn all_188_lines_of_generation_10() {
    let lines = golden_in("golden-gen10.jsonl");
    assert_eq!(lines.len(), 188);
    assert!(lines.iter().all(|l| l.generation == 10));
    // Four lines of every type, the raw bulk record included, in the table's order.
    let order: Vec<MessageType> = lines.chunks(4).map(|c| c[0].message_type).collect();
    assert!(lines.chunks(4).all(|c| c.iter().all(|l| l.message_type == c[0].message_type)));
    assert_eq!(order, MessageType::ALL.to_vec());
}

#[test]
fn decoding_each_frame_gives_its_values() {
    for g in golden() {
        let mut codec = MessageCodec::new();
        let mut buf = BytesMut::from(&g.frame[..]);
        let msg = match codec.decode_eof(&mut buf) {
            Ok(Some(Ok(m))) => m,
            other => panic!("{}: {other:?}", g.name),
        };
        assert!(buf.is_empty(), "{}: bytes left", g.name);
        assert_eq!(msg.version, g.generation, "{}", g.name);
        assert_eq!(msg.message_type(), g.message_type, "{}", g.name);
        assert_eq!(msg.id, g.id, "{}", g.name);
        assert_eq!(msg.flags.bits(), g.flags, "{}", g.name);
        let json = agentwire::payload::as_generation(g.generation, || serde_json::to_value(&msg.payload).unwrap());
        assert_eq!(json, g.payload, "{}", g.name);
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), None, "{}", g.name);
    }
}

#[test]
fn encoding_each_payload_gives_its_exact_bytes() {
    for g in golden() {
        let payload: Payload =
            g.message_type.deserialize_payload(&g.payload).unwrap_or_else(|e| panic!("{}: {e}", g.name));
        assert_eq!(g.message_type.flags(), Flags::from_bits(g.flags), "{}: flags are the type's", g.name);
        let msg = Message::new(g.id, payload).with_version(g.generation);
        let mut codec = MessageCodec::new();
        let mut out = BytesMut::new();
        codec.encode_message(&msg, &mut out).unwrap();
        assert_eq!(to_hex(&out), to_hex(&g.frame), "{}", g.name);
        assert_eq!(msg.wire_len().unwrap(), g.frame.len(), "{}: wire_len", g.name);
    }
}

#[test]
fn copies_match_the_shared_vectors() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors");
    // The shared folder lies beside the checkout (README, CI); a missing one is a failure, not a pass.
    assert!(shared.is_dir(), "{} is not present: the copies cannot be compared", shared.display());
    for name in ["golden.jsonl", "golden-gen10.jsonl", "malformed.jsonl"] {
        let ours = std::fs::read(common::vector_path(name)).unwrap();
        let theirs = std::fs::read(shared.join(name)).unwrap();
        assert!(ours == theirs, "tests/vectors/{name} differs from the shared copy");
    }
}
