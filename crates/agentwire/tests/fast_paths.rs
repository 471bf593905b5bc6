//! The hand-written paths (data frames, `core.ready`, `core.exec.exited`) and
//! the serde path through ciborium give the same bytes and the same values.

use agentwire::payload::core::Ready;
use agentwire::payload::exec::{ExecExited, ExecStderr, ExecStdin, ExecStdout};
use agentwire::payload::fs::FsData;
use agentwire::payload::tcp::TcpData;
use agentwire::payload::{CborPayload, serde_decode, serde_encode, serde_encoded_len};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use std::fmt::Debug;

/// Same bytes as the serde path, the announced size, and back to the value.
fn same_bytes_and_back<T: CborPayload + PartialEq + Debug>(value: &T) -> Result<(), TestCaseError> {
    let mut fast = BytesMut::new();
    value.encode(&mut fast).unwrap();
    let mut reference = BytesMut::new();
    serde_encode(value, &mut reference).unwrap();
    prop_assert_eq!(&fast[..], &reference[..]);
    prop_assert_eq!(value.exact_encoded_len(), Some(fast.len()));
    prop_assert_eq!(serde_encoded_len(value).unwrap(), fast.len());
    let bytes = fast.freeze();
    prop_assert_eq!(&T::decode(&bytes).unwrap(), value);
    Ok(())
}

/// On any input, damaged or not, the two decoders give equal results (a value
/// or an error), because the fast path either answers correctly or defers.
fn same_answer<T: CborPayload + PartialEq + Debug>(p: &[u8]) -> Result<(), TestCaseError> {
    let p = Bytes::copy_from_slice(p);
    prop_assert_eq!(T::decode(&p), serde_decode::<T>(&p));
    Ok(())
}

/// A valid encoding with some bytes overwritten, some cut off, or an unknown field added.
fn damaged(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len();
    (prop::collection::vec((0..len, any::<u8>()), 0..4), 0..=len, any::<bool>()).prop_map(
        move |(edits, keep, extra)| {
            let mut p = valid.clone();
            for (at, b) in edits {
                p[at] = b;
            }
            if extra && p.first().is_some_and(|h| h & 0xe0 == 0xa0 && h & 0x1f < 23) {
                // One more entry: {"zz": [1, null]} appended, map count bumped.
                p[0] += 1;
                p.extend_from_slice(b"\x62zz\x82\x01\xf6");
            } else {
                p.truncate(keep.max(1));
            }
            p
        },
    )
}

fn encoded<T: CborPayload>(value: &T) -> Vec<u8> {
    let mut b = BytesMut::new();
    value.encode(&mut b).unwrap();
    b.to_vec()
}

fn ready() -> impl Strategy<Value = Ready> {
    (any::<u64>(), any::<u64>(), any::<u64>(), prop_oneof![Just(String::new()), ".{0,40}"]).prop_map(
        |(boot_time_ns, init_time_ns, ready_time_ns, agent_version)| Ready {
            boot_time_ns,
            init_time_ns,
            ready_time_ns,
            agent_version,
            capabilities: None,
        },
    )
}

fn data() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..600).prop_map(Bytes::from)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ready_same_bytes(value in ready()) {
        same_bytes_and_back(&value)?;
    }

    #[test]
    fn exited_same_bytes(code in any::<i32>()) {
        same_bytes_and_back(&ExecExited { code })?;
    }

    #[test]
    fn data_payloads_same_bytes(data in data()) {
        same_bytes_and_back(&ExecStdin { data: data.clone() })?;
        same_bytes_and_back(&ExecStdout { data: data.clone() })?;
        same_bytes_and_back(&ExecStderr { data: data.clone() })?;
        same_bytes_and_back(&FsData { data: data.clone() })?;
        same_bytes_and_back(&TcpData { data })?;
    }

    #[test]
    fn ready_same_answer_on_damaged_input(p in ready().prop_flat_map(|r| damaged(encoded(&r)))) {
        same_answer::<Ready>(&p)?;
    }

    #[test]
    fn exited_same_answer_on_damaged_input(p in any::<i32>().prop_flat_map(|code| damaged(encoded(&ExecExited { code })))) {
        same_answer::<ExecExited>(&p)?;
    }

    #[test]
    fn data_same_answer_on_damaged_input(p in data().prop_flat_map(|data| damaged(encoded(&ExecStdout { data })))) {
        same_answer::<ExecStdout>(&p)?;
        same_answer::<FsData>(&p)?;
    }

    #[test]
    fn same_answer_on_arbitrary_bytes(p in prop::collection::vec(any::<u8>(), 0..64)) {
        same_answer::<Ready>(&p)?;
        same_answer::<ExecExited>(&p)?;
        same_answer::<TcpData>(&p)?;
    }
}

#[test]
fn decoded_data_is_a_view_of_the_payload_not_a_copy() {
    let p = Bytes::from(encoded(&ExecStdout { data: Bytes::from(vec![7u8; 65536]) }));
    let out = ExecStdout::decode(&p).unwrap();
    let offset = out.data.as_ptr() as usize - p.as_ptr() as usize;
    assert_eq!(offset, p.len() - 65536);
}
