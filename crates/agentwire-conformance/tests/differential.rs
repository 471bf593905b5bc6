//! Differential tests against the deployed reference codec, the crate
//! `microsandbox-protocol` in its two published versions: 0.6.14 (generation 7)
//! and 0.7.13 (generation 10, the generation this codec speaks).
//!
//! For seeded arbitrary values of every message type (the codec's `arbitrary`
//! feature over splitmix64 bytes):
//!
//! 1. the frame this codec writes equals, byte for byte, the frame the reference
//!    writes for the same value with its own encoder, at `v = 10` (all 46 types,
//!    against 0.7.13) and at `v = 7` (the 32 types of generation 7, against both);
//! 2. this codec decodes the reference's frame to the value it started from, and
//!    the reference decodes this codec's frame to the value it was given.
//!
//! Raw bulk records (generation 8) have their own tests below: our frame against
//! 0.7.13's `encode_bulk_to_buf` and `encode_bulk_header`, each decoder on the
//! other's records, and both decoders on broken records. Every line of
//! `golden-gen10.jsonl` is also read by 0.7.13 and written again by it.
//!
//! A value is carried over to the reference's types through the serde data
//! model (`ciborium::Value`), never through either side's frame encoder, so each
//! frame compared is written by one side alone.
//!
//! Where this codec's value space is wider than the reference's, the value is
//! restricted or mapped explicitly, and every such case is counted as a
//! [`Difference`] and asserted in its exact shape rather than skipped (see
//! FUZZING.md, "Known differences"):
//!
//! - [`Difference::UserNull`] (0.7.13 at `v = 7` only): a generation-7 writer
//!   leaves the `None` `user` key of `FsOp::Symlink`, `FsOp::Mkdir` and
//!   `FsOpenOptions` out, 0.7.13 writes `"user": null` whatever `v` says (spec
//!   section 4, fs). The frames differ by exactly that key; both readers accept
//!   both forms. At `v = 10` both write `null`.
//! - [`Difference::NameTheyLack`]: this codec reads `CoreErrorKind`,
//!   `ExecFailureKind` and `BootstrapSecurityProfile` as open enums (an unknown
//!   name is kept as `Unknown(name)`); both references have closed enums and
//!   refuse a payload with a name they do not know, and 0.6.14 also lacks the two
//!   `CoreErrorKind` names of later generations (`initialization_failed`,
//!   `capability_unavailable`). Such values cannot be built on the reference
//!   side; the test checks that the reference refuses this codec's frame of them
//!   and that this codec reads its own frame back.
//! - Catch-all enums (`InitFailureReason`, `WorkloadFailureDisposition`, spec
//!   section 4) read an unknown name as `unknown` on both sides, so they need
//!   no exception.
//!
//! For 0.6.14 every value is restricted to generation 7 first ([`gen7_value`]:
//! the fields added after generation 7 cleared), since that is all a
//! generation-7 writer can hold; the test also checks that 0.6.14 reads our
//! frame of the unrestricted value to the restricted one (an old reader skips
//! the newer fields, spec section 5).

#[path = "../../agentwire/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fmt::Debug;

use agentwire::codec::bulk_record_header;
use agentwire::payload::bootstrap::BootstrapSecurityProfile;
use agentwire::payload::bulk::{BulkFlow, BulkKind, BulkRecord, MAX_BULK_RECORD_PAYLOAD};
use agentwire::payload::core::CoreErrorKind;
use agentwire::payload::exec::ExecFailureKind;
use agentwire::payload::fs::FsOp;
use agentwire::{MAX_FRAME_SIZE, Message, MessageCodec, MessageType, Payload};
use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use ciborium::Value;
use common::{hex, vectors};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

/// Values compared per type and per reference version.
const CASES: u64 = 300;

/// The reference's payload types under one path per version, with `()` for the
/// payload of `core.shutdown` (the reference has no type for it: it writes CBOR null).
mod r6 {
    pub use ref6::message::MessageType;
    pub use ref6::{bootstrap, core, exec, fs, tcp};
    pub mod unit {
        pub type Shutdown = ();
    }
}

mod r7 {
    pub use ref7::message::MessageType;
    pub use ref7::{bootstrap, bulk, core, exec, fs, tcp};
    pub mod unit {
        pub type Shutdown = ();
    }
}

/// A frame as a reference reads it: `(v, t, id, flags, p)`.
type Read<T> = (u8, T, u32, u8, Vec<u8>);

/// A reference version: how it writes and reads one frame.
trait Reference {
    type Type: Copy + PartialEq + Debug;
    const NAME: &'static str;
    /// The reference's generation (`PROTOCOL_VERSION`).
    const GENERATION: u8;
    /// The reference's own frame of `payload` with `v` set to `v`.
    fn encode<T: Serialize>(t: Self::Type, id: u32, v: u8, payload: &T) -> Vec<u8>;
    /// `(v, t, id, flags, p)` as the reference reads one frame.
    fn decode(frame: &[u8]) -> Result<Read<Self::Type>, String>;
    /// The reference's own typed read of a payload.
    fn payload<T: DeserializeOwned>(p: &[u8]) -> Result<T, String>;
}

macro_rules! reference {
    ($name:ident, $krate:ident, $label:literal, $generation:literal) => {
        struct $name;
        impl Reference for $name {
            type Type = $krate::message::MessageType;
            const NAME: &'static str = $label;
            const GENERATION: u8 = $generation;
            fn encode<T: Serialize>(t: Self::Type, id: u32, v: u8, payload: &T) -> Vec<u8> {
                let mut msg = $krate::message::Message::with_payload(t, id, payload).expect("reference encodes");
                // The reference stamps its own generation; the frames compared carry `v`.
                msg.v = v;
                let mut out = Vec::new();
                $krate::codec::encode_to_buf(&msg, &mut out).expect("reference frames");
                out
            }
            fn decode(frame: &[u8]) -> Result<Read<Self::Type>, String> {
                let m = $krate::codec::decode_message_frame(frame).map_err(|e| e.to_string())?;
                Ok((m.v, m.t, m.id, m.flags, m.p))
            }
            fn payload<T: DeserializeOwned>(p: &[u8]) -> Result<T, String> {
                let m = $krate::message::Message::new($krate::message::MessageType::Ping, 0, p.to_vec());
                m.payload::<T>().map_err(|e| e.to_string())
            }
        }
    };
}
reference!(Ref6, ref6, "microsandbox-protocol 0.6.14", 7);
reference!(Ref7, ref7, "microsandbox-protocol 0.7.13", 10);

/// A known, deliberate difference met by one value (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Difference {
    /// 0.7.13 writes `"user": null` in Symlink, Mkdir and OpenFile's options even at `v = 7`.
    UserNull,
    /// A name that our open enums keep but the reference's closed enum lacks.
    NameTheyLack,
}

#[derive(Default)]
struct Tally {
    identical: u64,
    differences: BTreeMap<Difference, u64>,
    /// 0.6.14 only: values whose later fields 0.6.14 skipped when reading our frame.
    later_fields_skipped: u64,
}

/// splitmix64: the bytes behind each value, from a seed made of the type and case.
fn seeded_bytes(seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    // Mostly small inputs (few, short fields), some large ones (long lists and data).
    let len = match next() % 4 {
        0 => next() % 64,
        1 | 2 => next() % 512,
        _ => next() % 8192,
    } as usize;
    (0..len).map(|_| next() as u8).collect()
}

fn our_frame(m: &Message) -> Vec<u8> {
    let mut buf = BytesMut::new();
    MessageCodec::new().encode(m.clone(), &mut buf).unwrap_or_else(|e| panic!("we refuse {m:?}: {e}"));
    buf.to_vec()
}

fn our_decode(frame: &[u8]) -> Message {
    let mut buf = BytesMut::from(frame);
    let mut codec = MessageCodec::new();
    let item = codec.decode_eof(&mut buf).unwrap_or_else(|e| panic!("we lose the stream on {frame:02x?}: {e}"));
    let m = item.expect("one frame").unwrap_or_else(|r| panic!("we reject the reference's frame {frame:02x?}: {r}"));
    assert!(buf.is_empty(), "we left bytes of one frame");
    m
}

/// Whether the value holds a name that this reference's closed enums lack.
fn name_they_lack(p: &Payload, generation: u8) -> bool {
    match p {
        Payload::Error(e) => match e.kind {
            CoreErrorKind::Unknown(_) => true,
            // Generation-10 names that 0.6.14 does not have.
            CoreErrorKind::InitializationFailed | CoreErrorKind::CapabilityUnavailable => generation < 10,
            _ => false,
        },
        Payload::ExecFailed(e) => matches!(e.kind, ExecFailureKind::Unknown(_)),
        Payload::Bootstrap(b) => matches!(b.security_profile, BootstrapSecurityProfile::Unknown(_)),
        _ => false,
    }
}

/// The value restricted to what a generation-7 writer holds: every field added
/// after generation 7 cleared (spec sections 4 and 5).
fn gen7_value(p: &Payload) -> Payload {
    let mut p = p.clone();
    match &mut p {
        Payload::Ready(r) => r.capabilities = None,
        Payload::InitAck(a) => a.failure = false,
        Payload::RelayClientDisconnected(d) => d.incarnation = None,
        Payload::Error(e) => {
            e.init_failure = None;
            e.workload_failure = None;
        }
        Payload::FsRequest(r) => {
            r.bulk = None;
            match &mut r.op {
                FsOp::Symlink { user, .. } | FsOp::Mkdir { user, .. } => *user = None,
                FsOp::OpenFile { options, .. } => options.user = None,
                _ => {}
            }
        }
        Payload::TcpConnect(c) => c.bulk = None,
        Payload::Bootstrap(b) => {
            b.init_failure_ack = false;
            b.exec_limits = None;
        }
        _ => {}
    }
    p
}

/// Whether a generation-7 writer leaves a `user` key out of this value's
/// payload where 0.7.13 writes `"user": null`.
fn has_none_user_field(p: &Payload) -> bool {
    let Payload::FsRequest(r) = p else { return false };
    match &r.op {
        FsOp::Symlink { user, .. } | FsOp::Mkdir { user, .. } => user.is_none(),
        FsOp::OpenFile { options, .. } => options.user.is_none(),
        _ => false,
    }
}

/// Removes every `"user": null` entry; how many it removed.
fn strip_null_user(v: &mut Value) -> usize {
    match v {
        Value::Map(entries) => {
            let before = entries.len();
            entries.retain(|(k, v)| !(k.as_text() == Some("user") && v.is_null()));
            let mut n = before - entries.len();
            for (_, v) in entries.iter_mut() {
                n += strip_null_user(v);
            }
            n
        }
        Value::Array(items) => items.iter_mut().map(strip_null_user).sum(),
        _ => 0,
    }
}

fn cbor(v: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).unwrap();
    out
}

/// A payload in another type with the same serde shape (ours to theirs).
fn convert<R: DeserializeOwned>(p: &Payload) -> Result<R, String> {
    Value::serialized(p).expect("a Value of our payload").deserialized::<R>().map_err(|e| e.to_string())
}

/// What is compared: which reference, at which `v`, with which of our values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// 0.6.14 at `v = 7`: values restricted to generation 7 ([`gen7_value`]).
    Gen7Reference,
    /// 0.7.13 at `v = 7`: any value; a generation-7 writer leaves a `None` `user` out.
    V7,
    /// 0.7.13 at `v = 10`: any value.
    V10,
}

impl Mode {
    fn v(self) -> u8 {
        if self == Mode::V10 { 10 } else { 7 }
    }
}

/// Compares one type against one reference over [`CASES`] seeded values.
fn differential<O, R, X>(t: MessageType, rt: X::Type, mode: Mode) -> Tally
where
    O: for<'a> Arbitrary<'a> + Into<Payload>,
    R: Serialize + DeserializeOwned + Debug,
    X: Reference,
{
    let v = mode.v();
    let mut tally = Tally::default();
    for case in 0..CASES {
        let bytes = seeded_bytes(((t as u64) << 32) | (u64::from(v) << 24) | case);
        let mut u = Unstructured::new(&bytes);
        let value = O::arbitrary(&mut u).expect("arbitrary never fails on too little data");
        let id = u32::arbitrary(&mut u).unwrap_or(case as u32);
        let original = Message::new(id, value).with_version(v);
        assert_eq!(original.message_type(), t);
        let label = format!("{} v={v} {t} case {case} (value {:?})", X::NAME, original.payload);

        // The value compared: restricted to generation 7 for 0.6.14.
        let mut ours = original.clone();
        if mode == Mode::Gen7Reference {
            ours.payload = gen7_value(&ours.payload);
        }
        let mut difference = None;
        let ours_frame = our_frame(&ours);

        // This codec's value in the reference's types, through the serde data model.
        let theirs: R = match convert(&ours.payload) {
            Ok(theirs) => theirs,
            Err(e) => {
                assert!(name_they_lack(&ours.payload, X::GENERATION), "{label}: the reference cannot hold it: {e}");
                // The reference refuses our frame of it (but reads its envelope), and we read it back.
                let (got_v, got_t, got_id, flags, p) = X::decode(&ours_frame).expect("the envelope is fine");
                assert_eq!((got_v, got_t, got_id, flags), (v, rt, id, t.flags().bits()), "{label}");
                assert!(X::payload::<R>(&p).is_err(), "{label}: the reference reads a name it lacks");
                assert_eq!(our_decode(&ours_frame), ours, "{label}");
                *tally.differences.entry(Difference::NameTheyLack).or_default() += 1;
                continue;
            }
        };
        let ref_frame = X::encode(rt, id, v, &theirs);

        // (a) The same bytes, or exactly the named difference.
        if ref_frame != ours_frame {
            let known = mode == Mode::V7 && has_none_user_field(&ours.payload);
            assert!(known, "{label}: frames differ\n ours      {ours_frame:02x?}\n reference {ref_frame:02x?}");
            let (rv, rtt, rid, rflags, rp) = X::decode(&ref_frame).expect("the reference reads its own frame");
            let (ov, ott, oid, oflags, op) = X::decode(&ours_frame).expect("the reference reads our frame");
            assert_eq!((rv, rtt, rid, rflags), (ov, ott, oid, oflags), "{label}: headers or envelopes differ");
            let mut payload: Value = ciborium::from_reader(&rp[..]).expect("reference payload is CBOR");
            assert_eq!(strip_null_user(&mut payload), 1, "{label}: expected one \"user\": null in {payload:?}");
            assert_eq!(cbor(&payload), op, "{label}: payloads differ by more than \"user\": null");
            difference = difference.or(Some(Difference::UserNull));
        }
        match difference {
            Some(d) => *tally.differences.entry(d).or_default() += 1,
            None => tally.identical += 1,
        }

        // (b) Each reads the other's frame to the value it started from.
        assert_eq!(our_decode(&ref_frame), ours, "{label}: we read the reference's frame to another value");
        let expected = format!("{theirs:?}");
        let their_read = |frame: &[u8], what: &str| {
            let (got_v, got_t, got_id, flags, p) =
                X::decode(frame).unwrap_or_else(|e| panic!("{label}: the reference refuses {what}: {e}"));
            assert_eq!((got_v, got_t, got_id, flags), (v, rt, id, t.flags().bits()), "{label}: {what}");
            let read: R = X::payload(&p).unwrap_or_else(|e| panic!("{label}: the reference refuses {what}: {e}"));
            assert_eq!(format!("{read:?}"), expected, "{label}: the reference reads {what} differently");
        };
        their_read(&ours_frame, "our frame");

        // (c) Our frame of the value as it was: a catch-all name reads as `unknown`
        // in 0.7.13, and 0.6.14 skips every field added after generation 7.
        if ours.payload != original.payload {
            their_read(&our_frame(&original), "our frame of the unmapped value");
            if mode == Mode::Gen7Reference {
                tally.later_fields_skipped += 1;
            }
        }
    }
    tally
}

/// Every type of generation 7 as `(our variant, the reference's variant, our
/// module::type, the reference's module::type)`, handed to `$callback`.
macro_rules! gen7_types {
    ($callback:ident ! ( $($args:tt)* )) => {
        $callback! { $($args)* ;
            (Ready, Ready, core::Ready, core::Ready),
            (InitResolved, InitResolved, core::InitResolved, core::InitResolved),
            (InitAck, InitAck, core::InitAck, core::InitAck),
            (Shutdown, Shutdown, core::Shutdown, unit::Shutdown),
            (RelayClientDisconnected, RelayClientDisconnected, core::RelayClientDisconnected, core::RelayClientDisconnected),
            (ClockSync, ClockSync, core::ClockSync, core::ClockSync),
            (Ping, Ping, core::Ping, core::Ping),
            (Pong, Pong, core::Pong, core::Pong),
            (Touch, Touch, core::Touch, core::Touch),
            (Touched, Touched, core::Touched, core::Touched),
            (Error, CoreError, core::CoreError, core::CoreError),
            (ExecRequest, ExecRequest, exec::ExecRequest, exec::ExecRequest),
            (ExecStarted, ExecStarted, exec::ExecStarted, exec::ExecStarted),
            (ExecStdin, ExecStdin, exec::ExecStdin, exec::ExecStdin),
            (ExecStdinError, ExecStdinError, exec::ExecStdinError, exec::ExecStdinError),
            (ExecStdout, ExecStdout, exec::ExecStdout, exec::ExecStdout),
            (ExecStderr, ExecStderr, exec::ExecStderr, exec::ExecStderr),
            (ExecExited, ExecExited, exec::ExecExited, exec::ExecExited),
            (ExecFailed, ExecFailed, exec::ExecFailed, exec::ExecFailed),
            (ExecResize, ExecResize, exec::ExecResize, exec::ExecResize),
            (ExecSignal, ExecSignal, exec::ExecSignal, exec::ExecSignal),
            (FsRequest, FsRequest, fs::FsRequest, fs::FsRequest),
            (FsResponse, FsResponse, fs::FsResponse, fs::FsResponse),
            (FsData, FsData, fs::FsData, fs::FsData),
            (TcpConnect, TcpConnect, tcp::TcpConnect, tcp::TcpConnect),
            (TcpConnected, TcpConnected, tcp::TcpConnected, tcp::TcpConnected),
            (TcpData, TcpData, tcp::TcpData, tcp::TcpData),
            (TcpEof, TcpEof, tcp::TcpEof, tcp::TcpEof),
            (TcpClose, TcpClose, tcp::TcpClose, tcp::TcpClose),
            (TcpClosed, TcpClosed, tcp::TcpClosed, tcp::TcpClosed),
            (TcpFailed, TcpFailed, tcp::TcpFailed, tcp::TcpFailed),
            (Bootstrap, Bootstrap, bootstrap::GuestBootstrap, bootstrap::GuestBootstrap),
        }
    };
}

/// The 14 types of generations 8 to 10 (0.7.13 only), in the same form. Both
/// root-disk requests carry the reference's one `RootDiskGrow` payload.
macro_rules! later_types {
    ($callback:ident ! ( $($args:tt)* )) => {
        $callback! { $($args)* ;
            (WorkloadFreeze, WorkloadFreeze, workload::WorkloadFreeze, core::WorkloadFreeze),
            (WorkloadFrozen, WorkloadFrozen, workload::WorkloadFrozen, core::WorkloadFrozen),
            (WorkloadThaw, WorkloadThaw, workload::WorkloadThaw, core::WorkloadThaw),
            (WorkloadThawed, WorkloadThawed, workload::WorkloadThawed, core::WorkloadThawed),
            (TransportCredit, WorkloadTransportCredit, workload::TransportCredit, core::WorkloadTransportCredit),
            (RootDiskPrepare, RootDiskPrepare, workload::RootDiskPrepare, core::RootDiskGrow),
            (RootDiskGrow, RootDiskGrow, workload::RootDiskGrow, core::RootDiskGrow),
            (RootDiskState, RootDiskState, workload::RootDiskState, core::RootDiskState),
            (BulkAccepted, BulkAccepted, bulk::BulkAccepted, bulk::BulkAccepted),
            (BulkCredit, BulkCredit, bulk::BulkCredit, bulk::BulkCredit),
            (BulkFinish, BulkFinish, bulk::BulkFinish, bulk::BulkFinish),
            (BulkCancel, BulkCancel, bulk::BulkCancel, bulk::BulkCancel),
            (ExecOutputAck, ExecOutputAck, exec::ExecOutputAck, exec::ExecOutputAck),
            (ExecStdinAck, ExecStdinAck, exec::ExecStdinAck, exec::ExecStdinAck),
        }
    };
}

/// Runs [`differential`] for each listed type.
macro_rules! run_types {
    ($r:ident, $x:ty, $mode:expr ; $( ($ours:ident, $theirs:ident, $om:ident :: $oty:ident, $rm:ident :: $rty:ident) ),* $(,)?) => {
        vec![$(
            (
                MessageType::$ours,
                differential::<agentwire::payload::$om::$oty, $r::$rm::$rty, $x>(
                    MessageType::$ours,
                    $r::MessageType::$theirs,
                    $mode,
                ),
            ),
        )*]
    };
}

/// Prints the tally, checks that every type was compared, and sums the differences.
fn run_all(
    name: &str,
    mode: Mode,
    types: usize,
    results: Vec<(MessageType, Tally)>,
) -> (BTreeMap<Difference, u64>, u64) {
    let mut covered: Vec<MessageType> = results.iter().map(|(t, _)| *t).collect();
    covered.sort();
    covered.dedup();
    assert_eq!(covered.len(), types, "every type is compared");
    let (mut all, mut skipped) = (BTreeMap::new(), 0);
    println!("{name}, {mode:?}: {CASES} values per type");
    for (t, tally) in &results {
        println!(
            "  {:<32} identical {:>4}  known differences {:?}{}",
            t.wire_name(),
            tally.identical,
            tally.differences,
            if tally.later_fields_skipped > 0 {
                format!("  later fields skipped by the reader {}", tally.later_fields_skipped)
            } else {
                String::new()
            }
        );
        assert_eq!(tally.identical + tally.differences.values().sum::<u64>(), CASES);
        for (d, n) in &tally.differences {
            *all.entry(*d).or_default() += n;
        }
        skipped += tally.later_fields_skipped;
    }
    (all, skipped)
}

/// The number of types with an envelope (46 at generation 10).
fn envelope_types() -> usize {
    MessageType::ALL.iter().filter(|t| t.has_envelope()).count()
}

#[test]
fn every_gen10_type_matches_0_7_13_byte_for_byte() {
    let mode = Mode::V10;
    let mut results = gen7_types!(run_types!(r7, Ref7, mode));
    results.extend(later_types!(run_types!(r7, Ref7, mode)));
    assert_eq!(envelope_types(), 46);
    let (diffs, _) = run_all(Ref7::NAME, mode, 46, results);
    // Both named differences are met (the seeds reach them), and no other:
    // at v = 10 both write `"user": null`.
    assert_eq!(diffs.keys().copied().collect::<Vec<_>>(), vec![Difference::NameTheyLack], "{diffs:?}");
}

#[test]
fn every_gen7_type_matches_0_7_13_at_v7_but_for_the_user_field() {
    let mode = Mode::V7;
    let (diffs, _) = run_all(Ref7::NAME, mode, 32, gen7_types!(run_types!(r7, Ref7, mode)));
    assert_eq!(
        diffs.keys().copied().collect::<Vec<_>>(),
        vec![Difference::UserNull, Difference::NameTheyLack],
        "{diffs:?}"
    );
}

#[test]
fn every_gen7_type_matches_0_6_14_byte_for_byte_and_it_skips_the_later_fields() {
    let mode = Mode::Gen7Reference;
    let (diffs, skipped) = run_all(Ref6::NAME, mode, 32, gen7_types!(run_types!(r6, Ref6, mode)));
    // The generation-7 reference writes exactly our bytes; only names its enums lack differ.
    assert_eq!(diffs.keys().copied().collect::<Vec<_>>(), vec![Difference::NameTheyLack], "{diffs:?}");
    assert!(skipped > 100, "0.6.14 read only {skipped} frames with later fields");
}

/// A set `user` at `v = 7` and at `v = 10`: written by both, the same bytes.
#[test]
fn a_set_user_field_is_written_at_every_generation() {
    use ref7::fs::{FsOp as Op7, FsOpenOptions as Open7, FsRequest as Req7};
    let ops = [
        Op7::Symlink { target: "t".into(), link_path: "l".into(), user: Some("app:app".into()) },
        Op7::Mkdir { path: "/d".into(), mode: Some(0o755), user: Some("app".into()) },
        Op7::OpenFile {
            path: "/f".into(),
            options: Open7 { read: true, user: Some("1000".into()), ..Open7::default() },
        },
    ];
    for op in ops {
        for v in [7, 10] {
            let frame = Ref7::encode(r7::MessageType::FsRequest, 9, v, &Req7 { op: op.clone(), bulk: None });
            let ours = our_decode(&frame);
            assert_eq!(ours.version, v);
            assert_eq!(our_frame(&ours), frame, "{op:?} at v={v}");
        }
    }
}

// ---------------------------------------------------------------------------
// Raw bulk records (generation 8).

fn kind7(k: BulkKind) -> r7::bulk::BulkKind {
    r7::bulk::BulkKind::from_wire(k.to_wire()).expect("the same kinds")
}

fn flow7(f: BulkFlow) -> r7::bulk::BulkFlow {
    r7::bulk::BulkFlow::from_wire(f.to_wire()).expect("the same flows")
}

/// The reference's record of ours (its record carries the id).
fn record7(id: u32, r: &BulkRecord) -> r7::bulk::BulkRecord {
    r7::bulk::BulkRecord { id, kind: kind7(r.kind), flow: flow7(r.flow), offset: r.offset, payload: r.data.clone() }
}

/// What 0.7.13's frame decoder makes of one whole frame.
fn ref7_frame(frame: &[u8]) -> Result<ref7::codec::DecodedFrame, String> {
    let mut buf = BytesMut::from(frame);
    let decoded = ref7::codec::try_decode_frame_from_bytes(&mut buf).map_err(|e| e.to_string())?;
    let decoded = decoded.expect("a whole frame");
    assert!(buf.is_empty(), "0.7.13 left bytes of one frame");
    Ok(decoded)
}

/// One record both ways: the same bytes from both encoders (ours whole and as
/// the header of a vectored write, theirs the same two ways), and each decoder
/// reads the other's frame to the record.
fn compare_bulk_record(id: u32, record: &BulkRecord) {
    let label = format!(
        "id {id} {:?} {:?} offset {} with {} bytes",
        record.kind,
        record.flow,
        record.offset,
        record.data.len()
    );
    let ours = Message::new(id, record.clone());
    let ours_frame = our_frame(&ours);
    let theirs = record7(id, record);
    let mut ref_frame = Vec::new();
    ref7::codec::encode_bulk_to_buf(&theirs, &mut ref_frame).unwrap_or_else(|e| panic!("{label}: 0.7.13 refuses: {e}"));
    assert!(
        ours_frame == ref_frame,
        "{label}: frames differ in their first 21 bytes {:02x?} / {:02x?}",
        &ours_frame[..21],
        &ref_frame[..21]
    );
    let header = bulk_record_header(id, record, MAX_FRAME_SIZE).expect("a valid record");
    assert_eq!(header, ref7::codec::encode_bulk_header(&theirs).expect("a valid record"), "{label}: vectored headers");
    assert_eq!(ours_frame[..header.len()], header, "{label}");

    assert_eq!(our_decode(&ref_frame), ours, "{label}: we read 0.7.13's record to another value");
    match ref7_frame(&ours_frame) {
        Ok(ref7::codec::DecodedFrame::Bulk(read)) => assert_eq!(read, theirs, "{label}: 0.7.13 reads ours differently"),
        other => panic!("{label}: 0.7.13 reads our record as {other:?}"),
    }
}

#[test]
fn bulk_records_match_0_7_13_byte_for_byte() {
    // Arbitrary records (1 to 64 bytes anywhere in the offset space).
    for case in 0..CASES * 4 {
        let bytes = seeded_bytes((0xb0_1c << 32) | case);
        let mut u = Unstructured::new(&bytes);
        let record = BulkRecord::arbitrary(&mut u).expect("arbitrary never fails on too little data");
        let id = u32::arbitrary(&mut u).unwrap_or(case as u32);
        compare_bulk_record(id, &record);
    }
    // The edges: the smallest and largest data, the last offsets that fit.
    let sizes = [1, 2, 16 * 1024, 256 * 1024, MAX_BULK_RECORD_PAYLOAD - 1, MAX_BULK_RECORD_PAYLOAD];
    for (i, &n) in sizes.iter().enumerate() {
        let data = Bytes::from((0..n).map(|b| (b * 31 + i) as u8).collect::<Vec<u8>>());
        for offset in [0, 1, u64::MAX / 2, u64::MAX - n as u64] {
            for kind in BulkKind::ALL {
                for flow in BulkFlow::ALL {
                    compare_bulk_record(u32::MAX - i as u32, &BulkRecord::new(*kind, *flow, offset, data.clone()));
                }
            }
        }
    }
}

/// A record frame written by hand: `[len][id][flags][kind][flow][reserved][offset][data]`.
fn raw_record(len: Option<u32>, flags: u8, kind: u8, flow: u8, reserved: [u8; 2], offset: u64, n: usize) -> Vec<u8> {
    let len = len.unwrap_or((5 + 12 + n) as u32);
    let mut f = len.to_be_bytes().to_vec();
    f.extend(7u32.to_be_bytes());
    f.extend([flags, kind, flow]);
    f.extend(reserved);
    f.extend(offset.to_be_bytes());
    f.extend(std::iter::repeat_n(0xab, n));
    f
}

/// Every rule of spec section 7.1, broken once: both decoders lose the stream
/// (ours with a `StreamError`, 0.7.13 with an error), and ours returns the
/// good record in front of it first.
#[test]
fn broken_bulk_records_lose_the_stream_in_both_decoders() {
    let good = raw_record(None, 8, 1, 2, [0, 0], 0, 3);
    let mut broken = Vec::new();
    for flags in [0x09, 0x0a, 0x0c, 0x0f, 0x18, 0x48, 0x88, 0xf8, 0xff] {
        broken.push((format!("flags {flags:#04x}"), raw_record(None, flags, 1, 1, [0, 0], 0, 4)));
    }
    for len in [5u32, 6, 9, 16, 17] {
        let mut f = raw_record(Some(len), 8, 1, 1, [0, 0], 0, 0);
        f.truncate(4 + len as usize);
        broken.push((format!("len {len}"), f));
    }
    for reserved in [[0, 1], [1, 0], [0xff, 0xff]] {
        broken.push((format!("reserved {reserved:?}"), raw_record(None, 8, 2, 2, reserved, 0, 1)));
    }
    for (kind, flow) in [(0, 1), (3, 1), (0xff, 2), (1, 0), (2, 3), (1, 0xff), (0, 0)] {
        broken.push((format!("kind {kind} flow {flow}"), raw_record(None, 8, kind, flow, [0, 0], 0, 1)));
    }
    broken.push(("data above 3 MiB".into(), raw_record(None, 8, 1, 1, [0, 0], 0, MAX_BULK_RECORD_PAYLOAD + 1)));
    broken.push(("offset + n above 2^64 - 1".into(), raw_record(None, 8, 1, 1, [0, 0], u64::MAX, 1)));
    broken.push(("offset + n above 2^64 - 1 by one".into(), raw_record(None, 8, 2, 1, [0, 0], u64::MAX - 1, 2)));

    for (what, frame) in &broken {
        assert!(ref7_frame(frame).is_err(), "{what}: 0.7.13 accepts it");
        let mut stream = BytesMut::from(&good[..]);
        stream.extend_from_slice(frame);
        stream.extend_from_slice(&good);
        let mut codec = MessageCodec::new();
        let first = codec.decode_eof(&mut stream).expect("the good record").expect("an item").expect("accepted");
        assert!(matches!(first.payload, Payload::BulkRecord(_)), "{what}: {first:?}");
        match codec.decode_eof(&mut stream) {
            Err(_) => {}
            Ok(item) => panic!("{what}: we read {item:?}"),
        }
        assert!(codec.decode_eof(&mut stream).is_err(), "{what}: the stream stays lost");
    }
    // The layout's limits themselves are fine for both: 1 byte and 3 MiB of data, the last offset.
    for frame in [
        raw_record(None, 8, 1, 1, [0, 0], u64::MAX - 1, 1),
        raw_record(None, 8, 2, 2, [0, 0], 0, MAX_BULK_RECORD_PAYLOAD),
    ] {
        assert!(matches!(ref7_frame(&frame), Ok(ref7::codec::DecodedFrame::Bulk(_))));
        assert!(matches!(our_decode(&frame).payload, Payload::BulkRecord(_)));
    }
}

/// Valid records with their header bytes changed (kind, flow, reserved, offset,
/// and flags among the values with the bulk bit): both decoders accept the
/// same ones, to the same record, and refuse the same ones.
#[test]
fn damaged_bulk_record_headers_get_the_same_answer_from_both_decoders() {
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..CASES * 20 {
        let bytes = seeded_bytes((0xda_3a << 32) | case);
        let mut u = Unstructured::new(&bytes);
        let record = BulkRecord::arbitrary(&mut u).expect("arbitrary");
        let mut frame = our_frame(&Message::new(case as u32, record));
        for _ in 0..u.int_in_range(1..=3u8).unwrap_or(1) {
            let at = u.int_in_range(8..=20usize).unwrap_or(9);
            frame[at] = match at {
                // Exactly BULK, or BULK with other bits.
                8 if bool::arbitrary(&mut u).unwrap_or(true) => 0x08,
                8 => 0x08 | u8::arbitrary(&mut u).unwrap_or(0xff),
                9 | 10 => u.int_in_range(0..=3u8).unwrap_or(3),
                _ => u8::arbitrary(&mut u).unwrap_or(0xff),
            };
        }
        let theirs = ref7_frame(&frame);
        let mut buf = BytesMut::from(&frame[..]);
        let ours = MessageCodec::new().decode_eof(&mut buf);
        match (ours, theirs) {
            (Ok(Some(Ok(m))), Ok(ref7::codec::DecodedFrame::Bulk(r))) => {
                let Payload::BulkRecord(ours) = &m.payload else { panic!("{m:?}") };
                assert_eq!(record7(m.id, ours), r, "{frame:02x?}");
                accepted += 1;
            }
            (Err(_), Err(_)) => refused += 1,
            (ours, theirs) => panic!("{frame:02x?}: ours {ours:?}, 0.7.13 {theirs:?}"),
        }
    }
    assert!(accepted > 500 && refused > 500, "accepted {accepted}, refused {refused}");
}

// ---------------------------------------------------------------------------
// golden-gen10.jsonl through 0.7.13.

/// 0.7.13's typed read of a golden frame: the payload read in its type equals
/// ours carried over, and written again by 0.7.13 gives the frame back.
fn golden_in<R: Serialize + DeserializeOwned + Debug>(m: &ref7::message::Message, ours: &Payload) -> Vec<u8> {
    let theirs: R = m.payload().unwrap_or_else(|e| panic!("{}: 0.7.13 refuses the payload: {e}", m.t.as_str()));
    let carried: R = convert(ours).unwrap_or_else(|e| panic!("{}: {e}", m.t.as_str()));
    assert_eq!(format!("{theirs:?}"), format!("{carried:?}"), "{}: 0.7.13 and we read different values", m.t.as_str());
    Ref7::encode(m.t, m.id, m.v, &theirs)
}

macro_rules! golden_table {
    ($name:ident ; $( ($ours:ident, $theirs:ident, $om:ident :: $oty:ident, $rm:ident :: $rty:ident) ),* $(,)?) => {
        fn $name(m: &ref7::message::Message, ours: &Payload) -> Option<Vec<u8>> {
            match m.t {
                $( r7::MessageType::$theirs => Some(golden_in::<r7::$rm::$rty>(m, ours)), )*
                #[allow(unreachable_patterns)]
                _ => None,
            }
        }
    };
}
gen7_types!(golden_table!(golden_gen7));
later_types!(golden_table!(golden_later));

#[test]
fn every_gen10_golden_frame_reads_the_same_in_0_7_13_and_it_writes_it_again() {
    let lines = vectors("golden-gen10.jsonl");
    assert_eq!(lines.len(), 188);
    let mut records = 0;
    for line in &lines {
        let name = line["name"].as_str().unwrap();
        let frame = hex(line["frame"].as_str().unwrap());
        let ours = our_decode(&frame);
        let again = match ref7_frame(&frame).unwrap_or_else(|e| panic!("{name}: 0.7.13 refuses it: {e}")) {
            ref7::codec::DecodedFrame::Bulk(r) => {
                let Payload::BulkRecord(record) = &ours.payload else { panic!("{name}: we read {ours:?}") };
                assert_eq!(record7(ours.id, record), r, "{name}");
                records += 1;
                let mut out = Vec::new();
                ref7::codec::encode_bulk_to_buf(&r, &mut out).unwrap();
                out
            }
            ref7::codec::DecodedFrame::Control(m) => {
                assert_eq!(
                    (m.v, m.t.as_str(), m.id, m.flags),
                    (ours.version, ours.message_type().wire_name(), ours.id, ours.flags.bits()),
                    "{name}"
                );
                assert_eq!(m.flags, m.t.flags(), "{name}");
                golden_gen7(&m, &ours.payload)
                    .or_else(|| golden_later(&m, &ours.payload))
                    .unwrap_or_else(|| panic!("{name}: no payload type for {}", m.t.as_str()))
            }
        };
        assert!(again == frame, "{name}: 0.7.13 writes it otherwise");
    }
    assert_eq!(records, 4);
}
