//! Input from a hostile peer: deep nesting, lying lengths, random damage.
//! Each gives a typed rejection or a stream error, never a panic, and the
//! frame after a rejected one still decodes.

mod common;

use agentwire::{Message, MessageCodec, MessageType, RejectKind, StreamError, payload::exec::ExecExited};
use bytes::{BufMut, Bytes, BytesMut};
use common::{frame, hex, push_head, raw_frame, vectors};
use tokio_util::codec::Decoder;

fn next_frame() -> Vec<u8> {
    hex("000000270000000901a3617607617470636f72652e657865632e657869746564617048a164636f6465182a")
}

/// Decodes `bad` followed by the good frame: the first item must be a rejection
/// of `kind`, the second the good frame.
fn rejected_then_next(bad: &[u8], kind: RejectKind, what: &str) {
    let mut buf = BytesMut::from(bad);
    buf.put_slice(&next_frame());
    let mut codec = MessageCodec::new();
    match codec.decode(&mut buf) {
        Ok(Some(Err(r))) => assert_eq!(r.kind, kind, "{what}: {r}"),
        other => panic!("{what}: {other:?}"),
    }
    match codec.decode_eof(&mut buf) {
        Ok(Some(Ok(m))) => assert_eq!(m, Message::new(9, ExecExited { code: 42 }).with_version(7), "{what}"),
        other => panic!("{what}: next frame lost: {other:?}"),
    }
}

#[test]
fn payloads_nested_a_million_levels_deep_for_every_type() {
    let depth = 1_000_000;
    let nests: [(&str, Vec<u8>); 3] = [
        ("arrays", [vec![0x81; depth], vec![0x00]].concat()),
        ("maps", [b"\xa1\x61a".repeat(depth), vec![0x00]].concat()),
        ("tags", [vec![0xc1; depth], vec![0x00]].concat()),
    ];
    for (shape, payload) in &nests {
        // (A raw bulk record has no envelope: nesting means nothing to it.)
        for t in MessageType::ALL.into_iter().filter(|t| t.has_envelope()) {
            let bad = frame(1, t.flags().bits(), t.wire_name(), payload);
            rejected_then_next(&bad, RejectKind::InvalidPayload, &format!("{t} {shape}"));
        }
        // The same nesting as an unknown envelope key's value.
        let mut body = b"\xa4\x61v\x07\x61t\x70core.exec.exited\x61p\x48\xa1\x64code\x18\x2a\x61x".to_vec();
        body.extend_from_slice(payload);
        rejected_then_next(&raw_frame(9, 1, &body), RejectKind::MalformedMessage, &format!("envelope {shape}"));
    }
}

#[test]
fn lengths_and_counts_claiming_up_to_u64_max() {
    for claim in [u64::MAX, 1 << 62, u32::MAX as u64, 1 << 20] {
        for (major, what) in [(2u8, "bytes"), (3, "text"), (4, "array"), (5, "map")] {
            // Inside a payload, as the value of the one field of each type.
            let mut p = b"\xa1\x64data".to_vec();
            push_head(&mut p, major, claim);
            p.extend_from_slice(b"abc");
            for t in [MessageType::ExecStdout, MessageType::FsData, MessageType::ExecRequest, MessageType::Bootstrap] {
                let bad = frame(1, t.flags().bits(), t.wire_name(), &p);
                rejected_then_next(&bad, RejectKind::InvalidPayload, &format!("{t} {what} {claim}"));
            }
            // As the whole payload.
            let mut p = Vec::new();
            push_head(&mut p, major, claim);
            rejected_then_next(&frame(1, 0, "core.exec.stdout", &p), RejectKind::InvalidPayload, what);
            // As the envelope's p or t.
            let mut body = b"\xa3\x61v\x07\x61t\x70core.exec.stdout\x61p".to_vec();
            push_head(&mut body, major, claim);
            rejected_then_next(&raw_frame(1, 0, &body), RejectKind::MalformedMessage, &format!("p {what}"));
            let mut body = b"\xa3\x61v\x07\x61t".to_vec();
            push_head(&mut body, major, claim);
            rejected_then_next(&raw_frame(1, 0, &body), RejectKind::MalformedMessage, &format!("t {what}"));
        }
    }
}

/// xorshift: deterministic, so a failure here reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Damages golden frames at random (flipped bytes, inserted heads, cut
/// payloads) and decodes each, followed by the good frame. Whatever the damage,
/// the result is an item or a stream error, and when the damaged frame kept its
/// length, the good frame after it still decodes.
#[test]
fn randomly_damaged_golden_frames_never_panic_and_never_lose_the_next_frame() {
    let frames: Vec<Vec<u8>> = vectors("golden.jsonl").iter().map(|v| hex(v["frame"].as_str().unwrap())).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let specials = [0x00u8, 0x18, 0x1b, 0x5b, 0x5f, 0x7b, 0x7f, 0x9b, 0x9f, 0xbb, 0xbf, 0xc1, 0xf6, 0xff, 0xfb];
    let (mut rejected, mut broken_records) = (0, 0);
    for round in 0..20_000 {
        let mut f = frames[rng.below(frames.len())].clone();
        for _ in 0..1 + rng.below(4) {
            // Leave the 4-byte length alone: damage to it is a stream fault, tested elsewhere.
            let at = 4 + rng.below(f.len() - 4);
            f[at] = if rng.below(2) == 0 { specials[rng.below(specials.len())] } else { rng.next() as u8 };
        }
        let mut buf = BytesMut::from(&f[..]);
        buf.put_slice(&next_frame());
        let mut codec = MessageCodec::new();
        let first = match codec.decode(&mut buf) {
            // Damage that sets the BULK flag makes a raw record, whose broken
            // layout loses the stream (spec 7.1); the stream error is the answer.
            Err(StreamError::BrokenBulkRecord { .. }) if f[8] & 0x08 != 0 => {
                broken_records += 1;
                continue;
            }
            other => other.unwrap_or_else(|e| panic!("round {round}: {e}")),
        };
        if matches!(first, Some(Err(_))) {
            rejected += 1;
        }
        match codec.decode_eof(&mut buf) {
            Ok(Some(Ok(m))) => assert_eq!(m.id, 9, "round {round}"),
            other => panic!("round {round}: next frame lost: {other:?}"),
        }
    }
    assert!(rejected > 5_000, "the damage should usually be caught: {rejected}");
    assert!(broken_records > 100, "flags damaged into BULK: {broken_records}");
}

#[test]
fn random_bytes_as_the_payload_of_every_type() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for t in MessageType::ALL {
        for _ in 0..2_000 {
            let len = rng.below(40);
            let p: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Either a value that re-encodes to a value equal to itself, or an
            // error; the same from a borrowed slice as from Bytes.
            let from_slice = t.decode_payload_slice(&p);
            assert_eq!(t.decode_payload(&Bytes::from(p)), from_slice, "{t}");
            if let Ok(value) = from_slice {
                let mut again = BytesMut::new();
                value.encode(&mut again).unwrap();
                assert_eq!(t.decode_payload(&again.freeze()).unwrap(), value, "{t}");
            }
        }
    }
}
