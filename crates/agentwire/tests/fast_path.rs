//! The default payload path (serde derives through the crate's own CBOR
//! serializer and plain-form reader) against the serde path through ciborium,
//! for every payload type: the same bytes at generations 7 and 10, and on any
//! input, intact or damaged, the same answer (value or error).

use std::cell::Cell;

use agentwire::payload::{PayloadError, as_generation, serde_decode, serde_encode, serde_encoded_len};
use agentwire::{MessageType, Payload};
use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;
use proptest::prelude::*;
use serde::{Deserialize, Deserializer};

thread_local! {
    static DECODING: Cell<MessageType> = const { Cell::new(MessageType::Ping) };
}

/// A payload of the type in `DECODING`, read through its serde derive: lets
/// `serde_decode` (check, then ciborium) read any type the `Payload` enum holds.
struct AnyPayload(Payload);

impl<'de> Deserialize<'de> for AnyPayload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DECODING.with(Cell::get).deserialize_payload(d).map(AnyPayload)
    }
}

/// The serde path's answer for `p` as a payload of type `t`.
fn reference_decode(t: MessageType, p: &[u8]) -> Result<Payload, PayloadError> {
    DECODING.with(|c| c.set(t));
    serde_decode::<AnyPayload>(p).map(|a| a.0)
}

fn payload_from(entropy: &[u8]) -> Option<Payload> {
    let payload = Payload::arbitrary(&mut Unstructured::new(entropy)).ok()?;
    // A raw bulk record has no CBOR payload.
    payload.message_type().has_envelope().then_some(payload)
}

/// The default path writes the serde path's bytes, sizes them exactly, and
/// reads them back to the serde path's value. Returns the bytes.
fn same_bytes_and_value(payload: &Payload, generation: u8) -> Result<Vec<u8>, TestCaseError> {
    let mut fast = BytesMut::new();
    payload.encode_at(generation, &mut fast).unwrap();
    let mut reference = BytesMut::new();
    as_generation(generation, || serde_encode(payload, &mut reference)).unwrap();
    prop_assert_eq!(&fast[..], &reference[..], "{:?} at {}", payload, generation);
    prop_assert_eq!(payload.encoded_len_at(generation).unwrap(), fast.len());
    prop_assert_eq!(as_generation(generation, || serde_encoded_len(payload)).unwrap(), fast.len());
    let t = payload.message_type();
    let fast_value = t.decode_payload_slice(&fast);
    prop_assert_eq!(&fast_value, &reference_decode(t, &fast));
    prop_assert!(fast_value.is_ok(), "{:?}", fast_value);
    Ok(fast.to_vec())
}

/// Both paths give the same answer for `p` (the default path declines to the
/// serde path, so even the error messages agree).
fn same_answer(t: MessageType, p: &[u8]) -> Result<(), TestCaseError> {
    if is_empty_shutdown(t, p) {
        return Ok(());
    }
    prop_assert_eq!(t.decode_payload_slice(p), reference_decode(t, p), "{:02x?}", p);
    Ok(())
}

/// `core.shutdown` reads an empty payload on purpose (older senders wrote
/// nothing), where the serde path sees no item.
fn is_empty_shutdown(t: MessageType, p: &[u8]) -> bool {
    t == MessageType::Shutdown && p.is_empty()
}

/// One way of damaging a valid payload.
#[derive(Clone, Debug)]
enum Damage {
    Overwrite(Vec<(usize, u8)>),
    Truncate(usize),
    /// A tag in front of the item at this offset (or wherever it lands).
    Tag(usize),
    /// An unknown entry added to the top map, of the given kind.
    Extra(u8),
    /// The top map's head written with a two-byte argument.
    LongHead,
    /// The top map made indefinite.
    Indefinite,
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        prop::collection::vec((any::<usize>(), any::<u8>()), 1..4).prop_map(Damage::Overwrite),
        any::<usize>().prop_map(Damage::Truncate),
        any::<usize>().prop_map(Damage::Tag),
        (0u8..8).prop_map(Damage::Extra),
        Just(Damage::LongHead),
        Just(Damage::Indefinite),
    ]
}

/// The top map's entry count and the size of its head, when it is a definite map.
fn top_map(p: &[u8]) -> Option<(u64, usize)> {
    match *p.first()? {
        h @ 0xa0..=0xb7 => Some((u64::from(h - 0xa0), 1)),
        0xb8 => Some((u64::from(*p.get(1)?), 2)),
        _ => None,
    }
}

fn apply(mut p: Vec<u8>, d: &Damage) -> Vec<u8> {
    let len = p.len().max(1);
    match d {
        Damage::Overwrite(edits) => {
            for &(at, b) in edits {
                if let Some(x) = p.get_mut(at % len) {
                    *x = b;
                }
            }
        }
        Damage::Truncate(keep) => p.truncate(keep % len),
        Damage::Tag(at) => p.insert(at % len, 0xc0),
        Damage::Extra(kind) => {
            let Some((n, used)) = top_map(&p) else { return p };
            let entry: Vec<u8> = match kind {
                0 => b"\x62zz\x82\x01\xf6".to_vec(),
                // Invalid UTF-8 in a value nobody reads, and in a key.
                1 => b"\x62zz\x62\xc3\x28".to_vec(),
                2 => b"\x62\xc3\x28\x00".to_vec(),
                // Deeper than the limit, and just within it.
                3 => [&b"\x62zz"[..], &[0x81; 40], b"\x00"].concat(),
                4 => [&b"\x62zz"[..], &[0x81; 30], b"\x00"].concat(),
                // A float, an undefined, a non-shortest integer.
                5 => b"\x62zz\xfa\x3f\x80\x00\x00".to_vec(),
                6 => b"\x62zz\xf7".to_vec(),
                _ => b"\x62zz\x1b\x00\x00\x00\x00\x00\x00\x00\x05".to_vec(),
            };
            let mut out = Vec::new();
            out.push(0xb8);
            out.push(u8::try_from(n + 1).unwrap_or(0));
            out.extend_from_slice(&p[used..]);
            out.extend_from_slice(&entry);
            return out;
        }
        Damage::LongHead => {
            if let Some((n, 1)) = top_map(&p) {
                p.splice(0..1, [0xb8, n as u8]);
            }
        }
        Damage::Indefinite => {
            if let Some((_, used)) = top_map(&p) {
                p.splice(0..used, [0xbf]);
                p.push(0xff);
            }
        }
    }
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_type_same_bytes_and_value(entropy in prop::collection::vec(any::<u8>(), 0..768)) {
        let Some(payload) = payload_from(&entropy) else { return Ok(()) };
        for generation in [7, 10] {
            same_bytes_and_value(&payload, generation)?;
        }
    }

    #[test]
    fn damaged_input_same_answer(
        entropy in prop::collection::vec(any::<u8>(), 0..512),
        damages in prop::collection::vec(damage(), 1..3),
    ) {
        let Some(payload) = payload_from(&entropy) else { return Ok(()) };
        let mut p = same_bytes_and_value(&payload, 10)?;
        for d in &damages {
            p = apply(p, d);
        }
        same_answer(payload.message_type(), &p)?;
    }
}

/// Every type, including ones arbitrary rarely picks, on a few fixed inputs.
#[test]
fn every_type_on_fixed_inputs() {
    let inputs: [&[u8]; 12] = [
        b"",
        b"\xa0",
        b"\xf6",
        b"\x80",
        b"\xa1\x61x\x00",
        b"\xa1\x61x\xc0\x00",
        b"\xbf\xff",
        b"\xa1\x62op\x68RealPath",
        b"\xa1\x62op\xa1\x68RealPath\xa1\x64path\x61/",
        b"\xa1\x62op\xa1\x68RealPath\xa1\x64path\x62\xc3\x28",
        b"\xa1\x63cmd\x62ls",
        b"\xa2\x63cmd\x62ls\x63cmd\x62ls",
    ];
    for t in MessageType::ALL {
        if !t.has_envelope() {
            continue;
        }
        for p in inputs {
            if is_empty_shutdown(t, p) {
                continue;
            }
            assert_eq!(t.decode_payload_slice(p), reference_decode(t, p), "{} {p:02x?}", t.wire_name());
        }
    }
}

/// The properties above see every type, and damaged inputs that still decode:
/// checked on a fixed stream of pseudo-random entropy.
#[test]
fn every_type_is_covered_and_damage_still_decodes() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut seen = std::collections::HashSet::new();
    let mut damaged_ok = 0;
    for _ in 0..4000 {
        let entropy: Vec<u8> = (0..(next() % 400)).map(|_| next() as u8).collect();
        let Some(payload) = payload_from(&entropy) else { continue };
        let t = payload.message_type();
        seen.insert(t);
        let mut p = same_bytes_and_value(&payload, 7).unwrap();
        same_bytes_and_value(&payload, 10).unwrap();
        let d = match next() % 4 {
            0 => Damage::Overwrite(vec![(next() as usize, next() as u8)]),
            1 => Damage::Extra((next() % 8) as u8),
            2 => Damage::LongHead,
            _ => Damage::Truncate(next() as usize),
        };
        p = apply(p, &d);
        if is_empty_shutdown(t, &p) {
            continue;
        }
        let answer = t.decode_payload_slice(&p);
        assert_eq!(answer, reference_decode(t, &p), "{} {d:?} {p:02x?}", t.wire_name());
        damaged_ok += answer.is_ok() as usize;
    }
    let missing: Vec<_> = MessageType::ALL.iter().filter(|t| t.has_envelope() && !seen.contains(t)).collect();
    assert!(missing.is_empty(), "never built: {missing:?}");
    assert!(damaged_ok > 500, "{damaged_ok}");
}
