//! The hand-written paths (data frames, `core.ready`, `core.exec.exited`,
//! `core.exec.request`) and the serde path through ciborium give the same
//! bytes and the same values.

use agentwire::payload::core::Ready;
use agentwire::payload::exec::{ExecExited, ExecRequest, ExecRlimit, ExecStderr, ExecStdin, ExecStdout};
use agentwire::payload::fs::FsData;
use agentwire::payload::tcp::TcpData;
use agentwire::payload::{CborPayload, Text, serde_decode, serde_encode, serde_encoded_len};
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

/// Texts of every size class around the one-byte and two-byte heads, ASCII and not.
fn text() -> impl Strategy<Value = Text> {
    prop_oneof![".{0,30}", "[a-z=/]{20,300}", Just(String::new())].prop_map(Text::from)
}

fn exec_request() -> impl Strategy<Value = ExecRequest> {
    let rlimit =
        (text(), any::<u64>(), any::<u64>()).prop_map(|(resource, soft, hard)| ExecRlimit { resource, soft, hard });
    (
        (text(), prop::collection::vec(text(), 0..6), prop::collection::vec(text(), 0..6)),
        (prop::option::of(text()), prop::option::of(text()), any::<bool>(), any::<u16>(), any::<u16>()),
        prop::collection::vec(rlimit, 0..3),
    )
        .prop_map(|((cmd, args, env), (cwd, user, tty, rows, cols), rlimits)| ExecRequest {
            cmd,
            args,
            env,
            cwd,
            user,
            tty,
            rows,
            cols,
            rlimits,
        })
}

/// `value` written by the serde path with its map entries in the order
/// `order` puts them, as another writer might.
fn reordered<T: serde::Serialize>(value: &T, order: &[usize]) -> Vec<u8> {
    let mut v: ciborium::Value = ciborium::Value::serialized(value).unwrap();
    if let ciborium::Value::Map(entries) = &mut v {
        let taken = std::mem::take(entries);
        let mut slots: Vec<Option<_>> = taken.into_iter().map(Some).collect();
        let n = slots.len().max(1);
        for i in order.iter().copied().chain(0..slots.len()) {
            if let Some(e) = slots.get_mut(i % n).and_then(Option::take) {
                entries.push(e);
            }
        }
    }
    let mut out = Vec::new();
    ciborium::into_writer(&v, &mut out).unwrap();
    out
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
    fn exec_request_same_bytes_and_back(value in exec_request()) {
        let mut fast = BytesMut::new();
        value.encode(&mut fast).unwrap();
        let mut reference = BytesMut::new();
        serde_encode(&value, &mut reference).unwrap();
        prop_assert_eq!(&fast[..], &reference[..]);
        prop_assert_eq!(&ExecRequest::decode(&fast.freeze()).unwrap(), &value);
        prop_assert_eq!(&ExecRequest::decode_slice(&reference).unwrap(), &value);
    }

    #[test]
    fn exec_request_in_any_key_order_same_answer(value in exec_request(), order in prop::collection::vec(0..9usize, 0..9)) {
        let p = reordered(&value, &order);
        same_answer::<ExecRequest>(&p)?;
        prop_assert_eq!(&ExecRequest::decode(&Bytes::from(p)).unwrap(), &value);
    }

    #[test]
    fn exec_request_same_answer_on_damaged_input(p in exec_request().prop_flat_map(|r| damaged(encoded(&r)))) {
        same_answer::<ExecRequest>(&p)?;
    }

    #[test]
    fn same_answer_on_arbitrary_bytes(p in prop::collection::vec(any::<u8>(), 0..64)) {
        same_answer::<ExecRequest>(&p)?;
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

#[test]
fn decoded_exec_request_strings_are_views_of_the_payload() {
    let mut req = ExecRequest::new("/usr/bin/python3");
    req.args = vec!["-m".into(), "pytest".into()];
    req.cwd = Some("/workspace".into());
    let p = Bytes::from(encoded(&req));
    let out = ExecRequest::decode(&p).unwrap();
    assert_eq!(out, req);
    let range = p.as_ptr_range();
    for text in [&out.cmd, &out.args[0], &out.args[1], out.cwd.as_ref().unwrap()] {
        assert!(range.contains(&text.as_ptr()), "{text:?} is a copy");
    }
    assert!(!range.contains(&out.cmd.detached().as_ptr()));
}

/// Edge forms, some taken by the hand-written reader and most left to the
/// general path: the answer is the derive's for each.
#[test]
fn exec_request_edge_forms_same_answer() {
    let long_key = [&b"\xa2\x63cmd\x62sh\x79\x10\x01"[..], &[b'a'; 4097], b"\x00"].concat();
    let mut cases: Vec<&[u8]> = vec![&long_key];
    cases.extend::<[&[u8]; 16]>([
        // Only `cmd`: every default.
        b"\xa1\x63cmd\x62sh",
        // No `cmd`.
        b"\xa1\x64args\x80",
        // `cmd` twice.
        b"\xa2\x63cmd\x62sh\x63cmd\x62sh",
        // `cwd` undefined, which ciborium reads as none.
        b"\xa2\x63cmd\x62sh\x63cwd\xf7",
        // `rows` above 16 bits.
        b"\xa2\x63cmd\x62sh\x64rows\x1a\x00\x01\x00\x00",
        // `tty` as an integer.
        b"\xa2\x63cmd\x62sh\x63tty\x01",
        // An array claiming more items than there are bytes.
        b"\xa2\x63cmd\x62sh\x64args\x9a\xff\xff\xff\xff",
        // An rlimit with an unknown key, and one with its keys reordered.
        b"\xa2\x63cmd\x62sh\x67rlimits\x81\xa4\x68resource\x63cpu\x64soft\x01\x64hard\x02\x61x\x00",
        b"\xa2\x63cmd\x62sh\x67rlimits\x81\xa3\x64hard\x02\x64soft\x01\x68resource\x63cpu",
        // Invalid UTF-8 in an argument.
        b"\xa2\x63cmd\x62sh\x64args\x81\x62\xc3\x28",
        // A text split by an indefinite length.
        b"\xa1\x63cmd\x7f\x61s\x61h\xff",
        // A byte string where a text belongs.
        b"\xa1\x63cmd\x42sh",
        // Null among the arguments.
        b"\xa2\x63cmd\x62sh\x64args\x81\xf6",
        // `tty` undefined, and tagged.
        b"\xa2\x63cmd\x62sh\x63tty\xf7",
        b"\xa2\x63cmd\x62sh\x63tty\xc1\xf5",
        // All nine keys in order, with heads longer than they need be.
        b"\xa9\x63cmd\x78\x02sh\x64args\x98\x01\x61x\x63env\x80\x63cwd\xf6\x64user\xf6\x63tty\xf4\x64rows\x19\x00\x18\x64cols\x1a\x00\x00\x00\x50\x67rlimits\x80",
    ]);
    for p in &cases {
        let p = Bytes::copy_from_slice(p);
        assert_eq!(ExecRequest::decode(&p), serde_decode::<ExecRequest>(&p), "{p:x?}");
    }
    assert_eq!(ExecRequest::decode(&Bytes::copy_from_slice(cases[1])).unwrap(), ExecRequest::new("sh"));
    assert!(serde_decode::<ExecRequest>(&long_key).is_err(), "ciborium refuses a key above 4096 bytes");
    let mut longer = ExecRequest::new("sh");
    longer.args = vec!["x".into()];
    assert_eq!(ExecRequest::decode(&Bytes::copy_from_slice(cases[16])).unwrap(), longer);
}
