//! The same bytes to this codec's `MessageCodec` and to the deployed reference
//! decoders, frame by frame: both must accept the same frames, decode them to
//! the same values, and reject the same frames, except where the spec makes us
//! differ on purpose. Each such exception is a [`Why`] below, named in
//! FUZZING.md ("Known differences"); anything else is a finding.
//!
//! Two pairs are compared on every input:
//!
//! - generation 10: our codec as it starts (negotiated generation 10) against
//!   `microsandbox-protocol` 0.7.13, raw bulk records included;
//! - generation 7: our codec after `set_peer_generation(7)` against 0.6.14.
//!
//! The reference model is what its agent does with a frame: its codec splits
//! the frame and decodes the envelope into its closed list of types, or (0.7.13)
//! a frame with the `BULK` flag into a raw record; a failure there ends the
//! agent loop. The agent then compares the whole flags byte with the type's
//! flags (section 10.9) and decodes the payload into the type's struct.

#![no_main]

use agentwire::payload::fs::FsOp;
use agentwire::{MAX_FRAME_SIZE, Message, MessageCodec, MessageType, Payload, RejectKind, TypeName};
use bytes::BytesMut;
use ciborium::Value;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::Decoder;

/// Our nesting limit (`agentwire::MAX_NESTING_DEPTH`); ciborium's is 256.
const OUR_DEPTH: usize = agentwire::MAX_NESTING_DEPTH;

/// The raw bulk record's limits (spec 7.1), written out here rather than taken
/// from the codec, so that the harness checks the codec against the spec.
const BULK: u8 = 0x08;
const MIN_BULK_LEN: usize = 5 + 12 + 1;
const MAX_BULK_DATA: usize = 3 * 1024 * 1024;

/// What a reference does with one frame.
#[derive(Debug)]
enum Ref {
    /// The frame does not decode (unknown type, not an envelope, a broken bulk
    /// record, ...): the agent stops.
    Fatal(String),
    /// 0.7.13: a raw bulk record (flags exactly `0x08`), decoded.
    Bulk(ref7::bulk::BulkRecord),
    /// The flags byte is not exactly the type's flags: `core.error` `invalid_flags`.
    Flags,
    /// The payload does not decode into the type's struct.
    Payload(String),
    /// Accepted: the reference's value, written back to CBOR by ciborium.
    Value { v: u8, id: u32, flags: u8, t: &'static str, p: Vec<u8> },
}

/// Why this codec may answer otherwise than the reference; see FUZZING.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)] // Some are named where they apply rather than built.
enum Why {
    /// Bytes after the envelope map or after the payload item: an error of that
    /// frame for us (spec section 2); ciborium's `from_reader` ignores them.
    Trailing,
    /// `p` is a text string or an array of integers: an error of that frame for us
    /// (section 2); the reference's `serde_bytes` takes both as bytes.
    PNotBytes,
    /// An indefinite-length item: the spec says accept (section 2); ciborium
    /// refuses one as a map key or enum name.
    Indefinite,
    /// Nesting deeper than our limit of 32 (section 2: never overflow the stack);
    /// ciborium allows 256.
    Depth,
    /// An envelope key written as a byte string (`h'76'` for `"v"`): serde's
    /// derived field names accept it, so the reference reads it as the key; we
    /// require text keys in the envelope (section 2: "keys as text strings").
    ByteKey,
    /// Reserved flag bits (`0x10`-`0x80`) with the right meaningful bits on a
    /// CBOR frame: we ignore them (section 1, gen-7 rule); the reference agent
    /// answers `invalid_flags`.
    ReservedFlags,
    /// An enum name outside the spec's list in `CoreErrorKind`, `ExecFailureKind`
    /// or `BootstrapSecurityProfile` (and, for 0.6.14, the two `CoreErrorKind`
    /// names of later generations): kept by our open enums, refused by the
    /// reference's closed ones.
    OpenEnum,
    /// `core.shutdown` with an empty payload: receivers accept it (section 3); the
    /// reference's `()` does not read zero bytes.
    EmptyShutdown,
    /// An envelope error or unknown type is an error of that frame for us
    /// (section 3) and the end of the stream for the reference (section 10.9).
    PerFrame,
    /// 0.6.14 only: a type of generations 8-10 or a raw bulk record, which our
    /// codec knows and refuses at negotiated generation 7
    /// (`unsupported_protocol_generation`, or `invalid_flags` first), and which
    /// 0.6.14 does not know (the end of its stream).
    Newer,
    /// 0.6.14 only: a key that generation 7 does not have and 0.6.14 skips, but
    /// our (generation-10) reader reads at any negotiated generation: a value of
    /// the wrong type there is an error of the payload for us (section 4 defines
    /// the key), and 0.6.14 never reads it. The values are compared with ours
    /// restricted to generation 7.
    LaterField,
    /// 0.6.14 only: a frame with the `BULK` bit and other bits, or a broken
    /// bulk record, loses the stream for us (sections 1 and 7.1, generation 8);
    /// 0.6.14 reads it as a CBOR frame.
    BulkStream,
}

/// The dispatch from a reference type to its payload struct, per version.
macro_rules! payload_table {
    ($name:ident, $krate:ident, { $($variant:ident => $ty:ty,)* }) => {
        /// The reference's typed reading of `p`, written back to CBOR.
        fn $name(t: $krate::message::MessageType, p: &[u8]) -> Result<Vec<u8>, String> {
            use $krate::message::MessageType as T;
            fn typed<R: DeserializeOwned + Serialize>(p: &[u8]) -> Result<Vec<u8>, String> {
                let m = $krate::message::Message::new(T::Ping, 0, p.to_vec());
                let value: R = m.payload().map_err(|e| e.to_string())?;
                let mut out = Vec::new();
                ciborium::into_writer(&value, &mut out).map_err(|e| e.to_string())?;
                Ok(out)
            }
            match t {
                $( T::$variant => typed::<$ty>(p), )*
            }
        }
    };
}

macro_rules! payloads {
    ($name:ident, $k:ident, { $($later:tt)* }) => {
        payload_table!($name, $k, {
            Ready => $k::core::Ready,
            InitResolved => $k::core::InitResolved,
            InitAck => $k::core::InitAck,
            Shutdown => (),
            RelayClientDisconnected => $k::core::RelayClientDisconnected,
            ClockSync => $k::core::ClockSync,
            Ping => $k::core::Ping,
            Pong => $k::core::Pong,
            Touch => $k::core::Touch,
            Touched => $k::core::Touched,
            CoreError => $k::core::CoreError,
            ExecRequest => $k::exec::ExecRequest,
            ExecStarted => $k::exec::ExecStarted,
            ExecStdin => $k::exec::ExecStdin,
            ExecStdinError => $k::exec::ExecStdinError,
            ExecStdout => $k::exec::ExecStdout,
            ExecStderr => $k::exec::ExecStderr,
            ExecExited => $k::exec::ExecExited,
            ExecFailed => $k::exec::ExecFailed,
            ExecResize => $k::exec::ExecResize,
            ExecSignal => $k::exec::ExecSignal,
            FsRequest => $k::fs::FsRequest,
            FsResponse => $k::fs::FsResponse,
            FsData => $k::fs::FsData,
            TcpConnect => $k::tcp::TcpConnect,
            TcpConnected => $k::tcp::TcpConnected,
            TcpData => $k::tcp::TcpData,
            TcpEof => $k::tcp::TcpEof,
            TcpClose => $k::tcp::TcpClose,
            TcpClosed => $k::tcp::TcpClosed,
            TcpFailed => $k::tcp::TcpFailed,
            Bootstrap => $k::bootstrap::GuestBootstrap,
            $($later)*
        });
    };
}
payloads!(payload6, ref6, {});
payloads!(payload7, ref7, {
    WorkloadFreeze => ref7::core::WorkloadFreeze,
    WorkloadFrozen => ref7::core::WorkloadFrozen,
    WorkloadThaw => ref7::core::WorkloadThaw,
    WorkloadThawed => ref7::core::WorkloadThawed,
    WorkloadTransportCredit => ref7::core::WorkloadTransportCredit,
    RootDiskPrepare => ref7::core::RootDiskGrow,
    RootDiskGrow => ref7::core::RootDiskGrow,
    RootDiskState => ref7::core::RootDiskState,
    BulkAccepted => ref7::bulk::BulkAccepted,
    BulkCredit => ref7::bulk::BulkCredit,
    BulkFinish => ref7::bulk::BulkFinish,
    BulkCancel => ref7::bulk::BulkCancel,
    ExecOutputAck => ref7::exec::ExecOutputAck,
    ExecStdinAck => ref7::exec::ExecStdinAck,
});

/// Reads one whole frame (length prefix included) the way the 0.6.14 agent does.
fn reference6(frame: &[u8]) -> Ref {
    let mut buf = frame.to_vec();
    let m = match ref6::codec::try_decode_from_buf(&mut buf) {
        Ok(Some(m)) => m,
        Ok(None) => unreachable!("a whole frame"),
        Err(e) => return Ref::Fatal(e.to_string()),
    };
    if m.flags != m.t.flags() {
        return Ref::Flags;
    }
    match payload6(m.t, &m.p) {
        Ok(p) => Ref::Value { v: m.v, id: m.id, flags: m.flags, t: m.t.as_str(), p },
        Err(e) => Ref::Payload(e),
    }
}

/// Reads one whole frame the way the 0.7.13 agent does.
fn reference7(frame: &[u8]) -> Ref {
    let mut buf = BytesMut::from(frame);
    let m = match ref7::codec::try_decode_frame_from_bytes(&mut buf) {
        Ok(Some(ref7::codec::DecodedFrame::Control(m))) => m,
        Ok(Some(ref7::codec::DecodedFrame::Bulk(r))) => return Ref::Bulk(r),
        Ok(None) => unreachable!("a whole frame"),
        Err(e) => return Ref::Fatal(e.to_string()),
    };
    if m.flags != m.t.flags() {
        return Ref::Flags;
    }
    match payload7(m.t, &m.p) {
        Ok(p) => Ref::Value { v: m.v, id: m.id, flags: m.flags, t: m.t.as_str(), p },
        Err(e) => Ref::Payload(e),
    }
}

/// Whether a frame with the `BULK` bit keeps every rule of spec section 7.1.
fn bulk_record_is_valid(frame: &[u8]) -> bool {
    let len = frame.len() - 4;
    if frame[8] != BULK || len < MIN_BULK_LEN || frame[11..13] != [0, 0] {
        return false;
    }
    let n = len - 5 - 12;
    let offset = u64::from_be_bytes(frame[13..21].try_into().unwrap());
    (1..=2).contains(&frame[9])
        && (1..=2).contains(&frame[10])
        && n <= MAX_BULK_DATA
        && offset.checked_add(n as u64).is_some()
}

/// One CBOR item at the start of `b`, walked without recursion.
struct Walk {
    len: usize,
    indefinite: bool,
    depth: usize,
}

fn walk(b: &[u8]) -> Option<Walk> {
    // Items still to read per open container; `None` for an indefinite one.
    let mut stack: Vec<Option<u64>> = vec![Some(1)];
    let (mut at, mut indefinite, mut depth) = (0usize, false, 0usize);
    loop {
        while let Some(Some(0)) = stack.last() {
            stack.pop();
        }
        let Some(top) = stack.last_mut() else { return Some(Walk { len: at, indefinite, depth }) };
        let initial = *b.get(at)?;
        if top.is_none() && initial == 0xff {
            at += 1;
            stack.pop();
            continue;
        }
        if let Some(n) = top {
            *n -= 1;
        }
        at += 1;
        let (major, info) = (initial >> 5, initial & 0x1f);
        let arg = match info {
            0..=23 => Some(u64::from(info)),
            24..=27 => {
                let width = 1usize << (info - 24);
                let bytes = b.get(at..at + width)?;
                at += width;
                Some(bytes.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
            }
            31 if (2..=5).contains(&major) => None,
            _ => return None,
        };
        match (major, arg) {
            (0 | 1 | 7, _) => {}
            (2 | 3, Some(n)) => at = at.checked_add(usize::try_from(n).ok()?).filter(|&e| e <= b.len())?,
            (6, _) => stack.push(Some(1)),
            (4, Some(n)) => stack.push(Some(n)),
            (5, Some(n)) => stack.push(Some(n.checked_mul(2)?)),
            (_, None) => {
                indefinite = true;
                stack.push(None);
            }
            _ => unreachable!(),
        }
        depth = depth.max(stack.len() - 1);
    }
}

/// The `p` of a frame's envelope as ciborium reads it, if it is a byte string.
fn payload_bytes(frame: &[u8]) -> Option<Vec<u8>> {
    let Ok(Value::Map(entries)) = ciborium::from_reader::<Value, _>(&frame[9..]) else { return None };
    entries.into_iter().find(|(k, _)| k.as_text() == Some("p")).and_then(|(_, v)| v.into_bytes().ok())
}

/// The named reasons that this frame's body and payload give for a difference.
fn reasons(frame: &[u8]) -> Vec<Why> {
    let body = &frame[9..];
    let mut why = Vec::new();
    let Some(w) = walk(body) else { return why };
    if w.len < body.len() {
        why.push(Why::Trailing);
    }
    if w.indefinite {
        why.push(Why::Indefinite);
    }
    if w.depth > OUR_DEPTH {
        why.push(Why::Depth);
    }
    if let Ok(Value::Map(entries)) = ciborium::from_reader::<Value, _>(body) {
        if entries.iter().any(|(k, _)| k.is_bytes()) {
            why.push(Why::ByteKey);
        }
        for (k, v) in entries {
            if k.as_text() != Some("p") {
                continue;
            }
            match v {
                Value::Bytes(p) => match walk(&p) {
                    Some(w) => {
                        if w.len < p.len() {
                            why.push(Why::Trailing);
                        }
                        if w.indefinite {
                            why.push(Why::Indefinite);
                        }
                        if w.depth > OUR_DEPTH {
                            why.push(Why::Depth);
                        }
                    }
                    None if p.is_empty() => why.push(Why::EmptyShutdown),
                    None => {}
                },
                Value::Text(_) | Value::Array(_) => why.push(Why::PNotBytes),
                _ => {}
            }
        }
    }
    why
}

/// Whether our value holds a name only our open enums keep (for a reference of `generation`).
fn open_enum(p: &Payload, generation: u8) -> bool {
    use agentwire::payload::{
        bootstrap::BootstrapSecurityProfile as S, core::CoreErrorKind as C, exec::ExecFailureKind as E,
    };
    match p {
        Payload::Error(e) => match e.kind {
            C::Unknown(_) => true,
            C::InitializationFailed | C::CapabilityUnavailable => generation < 10,
            _ => false,
        },
        Payload::ExecFailed(e) => matches!(e.kind, E::Unknown(_)),
        Payload::Bootstrap(b) => matches!(b.security_profile, S::Unknown(_)),
        _ => false,
    }
}

/// Our value restricted to generation 7: every field added later cleared
/// (`Why::LaterField`), which is what 0.6.14 reads of the same bytes.
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

/// Removes `keys` from a map value.
fn strip(v: &mut Value, keys: &[&str]) {
    if let Value::Map(entries) = v {
        entries.retain(|(k, _)| !k.as_text().is_some_and(|k| keys.contains(&k)));
    }
}

/// The entry `key` of a map value.
fn entry<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    let Value::Map(entries) = v else { return None };
    entries.iter_mut().find(|(k, _)| k.as_text() == Some(key)).map(|(_, v)| v)
}

/// `Why::LaterField`: whether our reader takes the frame's payload once the
/// keys that generation 7 does not have are taken out of it.
fn later_field_explains(frame: &[u8], t: MessageType) -> bool {
    let Some(p) = payload_bytes(frame) else { return false };
    let Ok(mut v) = ciborium::from_reader::<Value, _>(&p[..]) else { return false };
    match t {
        MessageType::Ready => strip(
            &mut v,
            &["bulk_transport", "relay_lease", "local_transport", "workload_transport_barrier_version", "exec_limits"],
        ),
        MessageType::InitAck => strip(&mut v, &["failure"]),
        MessageType::RelayClientDisconnected => strip(&mut v, &["incarnation"]),
        MessageType::Error => strip(&mut v, &["init_failure", "workload_failure"]),
        MessageType::TcpConnect => strip(&mut v, &["bulk"]),
        MessageType::Bootstrap => strip(&mut v, &["init_failure_ack", "exec_limits"]),
        MessageType::FsRequest => {
            strip(&mut v, &["bulk"]);
            if let Some(op) = entry(&mut v, "op") {
                for variant in ["Symlink", "Mkdir"] {
                    if let Some(fields) = entry(op, variant) {
                        strip(fields, &["user"]);
                    }
                }
                if let Some(options) = entry(op, "OpenFile").and_then(|open| entry(open, "options")) {
                    strip(options, &["user"]);
                }
            }
        }
        _ => return false,
    }
    let mut stripped = Vec::new();
    ciborium::into_writer(&v, &mut stripped).is_ok() && t.decode_payload_slice(&stripped).is_ok()
}

fn explained(frame: &[u8], allowed: &[Why], what: &str, reference: &str, ours: &dyn std::fmt::Debug) {
    let why = reasons(frame);
    assert!(
        why.iter().any(|w| allowed.contains(w)),
        "{reference} and we disagree on {what} without a named reason (found {why:?}, allowed {allowed:?})\n \
         frame {frame:02x?}\n ours: {ours:?}"
    );
}

/// Why our reader may refuse an envelope that the reference reads.
const ENVELOPE: &[Why] = &[Why::Trailing, Why::PNotBytes, Why::Depth, Why::ByteKey];

const REF6: &str = "microsandbox-protocol 0.6.14";
const REF7: &str = "microsandbox-protocol 0.7.13";

/// The answers that do not depend on the generation: flags and payload errors.
/// `None` when the pair is not one of them.
fn compare_common(
    frame: &[u8],
    ours: &Result<Message, agentwire::Rejected>,
    theirs: &Ref,
    reference: &str,
    generation: u8,
) -> Option<bool> {
    let flags = frame[8];
    match (theirs, ours) {
        (Ref::Flags, Err(r)) => {
            match r.kind {
                RejectKind::InvalidFlags => {}
                // Why::ReservedFlags: our flags check passed; the frame failed later.
                RejectKind::InvalidPayload => assert_ne!(flags & 0xf0, 0, "{reference}: flags; ours {r:?}"),
                _ => {
                    assert_eq!(r.kind, RejectKind::MalformedMessage, "{reference}: flags; ours {r:?}");
                    explained(frame, ENVELOPE, "flags", reference, r);
                }
            }
            Some(true)
        }
        (Ref::Flags, Ok(m)) => {
            // Why::ReservedFlags: only the reserved bits differ.
            assert_eq!(flags & 0x0f, m.message_type().flags().bits(), "{reference}: we took wrong flags {m:?}");
            assert_ne!(flags & 0xf0, 0);
            Some(true)
        }
        (Ref::Payload(e), Err(r)) => {
            if r.kind != RejectKind::InvalidPayload {
                assert_eq!(r.kind, RejectKind::MalformedMessage, "{reference}: payload {e}; ours {r:?}");
                explained(frame, ENVELOPE, "a payload", reference, r);
            }
            Some(true)
        }
        (Ref::Payload(e), Ok(m)) => {
            if !open_enum(&m.payload, generation) {
                explained(frame, &[Why::Indefinite, Why::EmptyShutdown], "a payload", reference, &(e, m));
            }
            Some(true)
        }
        _ => None,
    }
}

/// Generation 10: our answer for one frame against 0.7.13's; whether 0.7.13 reads on.
fn compare7(frame: &[u8], ours: &Result<Message, agentwire::Rejected>, theirs: Ref) -> bool {
    let flags = frame[8];
    if flags & BULK != 0 {
        // A valid record (a broken one lost both streams before this frame).
        let Ref::Bulk(r) = theirs else {
            panic!("{REF7} does not read the record {frame:02x?} ({theirs:?}); ours {ours:?}")
        };
        let m = ours.as_ref().unwrap_or_else(|e| panic!("we refuse the record {frame:02x?} that {REF7} reads: {e}"));
        let Payload::BulkRecord(record) = &m.payload else { panic!("we read the record {frame:02x?} as {m:?}") };
        assert_eq!(m.flags.bits(), BULK);
        assert_eq!(
            (m.id, record.kind.to_wire(), record.flow.to_wire(), record.offset, &record.data),
            (r.id, r.kind as u8, r.flow as u8, r.offset, &r.payload),
            "{REF7} and we read the record {frame:02x?} differently"
        );
        return true;
    }
    if let Some(read_on) = compare_common(frame, ours, &theirs, REF7, 10) {
        return read_on;
    }
    match (theirs, ours) {
        (Ref::Fatal(e), Err(r)) => {
            // Why::PerFrame: an error of that frame for us, fatal for them.
            if !matches!(r.kind, RejectKind::MalformedMessage | RejectKind::UnsupportedMessageType) {
                // The envelope was fine for us: only our liberal reading explains it.
                explained(frame, &[Why::Indefinite], "an envelope", REF7, &(e, r));
            }
            false
        }
        (Ref::Fatal(e), Ok(m)) => {
            explained(frame, &[Why::Indefinite], "an envelope", REF7, &(e, m));
            false
        }
        (Ref::Value { .. }, Err(r)) => {
            let allowed: &[Why] = match r.kind {
                RejectKind::MalformedMessage => ENVELOPE,
                RejectKind::InvalidPayload => &[Why::Trailing, Why::Depth],
                _ => &[],
            };
            explained(frame, allowed, "a frame the reference accepts", REF7, r);
            true
        }
        (Ref::Value { v, id, flags, t, p }, Ok(m)) => {
            assert_eq!((m.version, m.id, m.flags.bits(), m.message_type().wire_name()), (v, id, flags, t), "{REF7}");
            // The reference's value, written by ciborium, read by us: our value.
            let theirs = m.message_type().decode_payload_slice(&p).unwrap_or_else(|e| {
                panic!("{REF7}'s value {p:02x?} does not read back in our types: {e}\n ours {m:?}")
            });
            assert_eq!(theirs, m.payload, "{REF7} and we decode {frame:02x?} to different values");
            true
        }
        (Ref::Bulk(_), _) | (Ref::Flags | Ref::Payload(_), _) => unreachable!(),
    }
}

/// Generation 7: our answer (negotiated generation 7) against 0.6.14's; whether 0.6.14 reads on.
fn compare6(frame: &[u8], ours: &Result<Message, agentwire::Rejected>, theirs: Ref) -> bool {
    let flags = frame[8];
    if flags & BULK != 0 {
        // Why::Newer: a valid raw record, which generation 7 may not send.
        let r = ours.as_ref().expect_err("a raw record at generation 7");
        assert_eq!(r.kind, RejectKind::UnsupportedProtocolGeneration, "{r:?}");
        assert_eq!(r.type_name, Some(TypeName::Known(MessageType::BulkRecord)));
        return !matches!(theirs, Ref::Fatal(_));
    }
    if let Some(read_on) = compare_common(frame, ours, &theirs, REF6, 7) {
        return read_on;
    }
    match (theirs, ours) {
        (Ref::Fatal(e), Err(r)) => {
            let newer = matches!(&r.type_name, Some(TypeName::Known(t)) if t.generation() > 7);
            if newer {
                // Why::Newer: the type's flags are checked first, then its generation.
                assert!(
                    matches!(r.kind, RejectKind::UnsupportedProtocolGeneration | RejectKind::InvalidFlags),
                    "{r:?}"
                );
            } else if !matches!(r.kind, RejectKind::MalformedMessage | RejectKind::UnsupportedMessageType) {
                // Why::PerFrame covers the rest of the envelope errors.
                explained(frame, &[Why::Indefinite], "an envelope", REF6, &(e, r));
            }
            false
        }
        (Ref::Fatal(e), Ok(m)) => {
            explained(frame, &[Why::Indefinite], "an envelope", REF6, &(e, m));
            false
        }
        (Ref::Value { .. }, Err(r)) => {
            let allowed: &[Why] = match r.kind {
                RejectKind::MalformedMessage => ENVELOPE,
                RejectKind::InvalidPayload => {
                    let t = match &r.type_name {
                        Some(TypeName::Known(t)) => *t,
                        other => panic!("{other:?}"),
                    };
                    if later_field_explains(frame, t) {
                        return true; // Why::LaterField
                    }
                    &[Why::Trailing, Why::Depth]
                }
                _ => &[],
            };
            explained(frame, allowed, "a frame the reference accepts", REF6, r);
            true
        }
        (Ref::Value { v, id, flags, t, p }, Ok(m)) => {
            assert_eq!((m.version, m.id, m.flags.bits(), m.message_type().wire_name()), (v, id, flags, t), "{REF6}");
            // 0.6.14's value read by us: ours restricted to generation 7 (Why::LaterField).
            let theirs = m.message_type().decode_payload_slice(&p).unwrap_or_else(|e| {
                panic!("{REF6}'s value {p:02x?} does not read back in our types: {e}\n ours {m:?}")
            });
            assert_eq!(theirs, gen7_value(&m.payload), "{REF6} and we decode {frame:02x?} to different values");
            true
        }
        (Ref::Bulk(_), _) | (Ref::Flags | Ref::Payload(_), _) => unreachable!(),
    }
}

/// Our items for a stream: one per whole frame, in order, until it ends or is lost.
fn our_items(data: &[u8], peer_generation: Option<u8>) -> Vec<Result<Message, agentwire::Rejected>> {
    let mut codec = MessageCodec::new();
    if let Some(g) = peer_generation {
        codec.set_peer_generation(g);
    }
    let mut src = BytesMut::from(data);
    let mut items = Vec::new();
    while let Ok(Some(item)) = codec.decode_eof(&mut src) {
        items.push(item);
    }
    items
}

fuzz_target!(|data: &[u8]| {
    let ours10 = our_items(data, None);
    let ours7 = our_items(data, Some(7));
    // The frames themselves, split by hand: both sides split by the same `len` rule.
    let mut frames = Vec::new();
    let mut at = 0usize;
    while let Some(head) = data.get(at..at + 4) {
        let len = u32::from_be_bytes(head.try_into().unwrap()) as usize;
        if !(5..=MAX_FRAME_SIZE).contains(&len) || data.len() - at - 4 < len {
            break;
        }
        frames.push(&data[at..at + 4 + len]);
        at += 4 + len;
    }
    // We return one item per whole frame up to the first broken bulk record,
    // which loses the stream (spec 7.1); so does 0.7.13.
    let broken = frames.iter().position(|f| f[8] & BULK != 0 && !bulk_record_is_valid(f));
    let whole = broken.unwrap_or(frames.len());
    assert_eq!(ours10.len(), whole, "we returned one item per whole frame before a broken record");
    assert_eq!(ours7.len(), whole, "the same at negotiated generation 7");
    if let Some(b) = broken {
        if let Ref::Bulk(_) | Ref::Value { .. } = reference7(frames[b]) {
            panic!("{REF7} reads the broken record {:02x?}", frames[b]);
        }
    }
    let (mut read6, mut read7) = (true, true);
    for (i, frame) in frames[..whole].iter().enumerate() {
        // Our two codecs differ only in the generation gate.
        let (o10, o7) = (&ours10[i], &ours7[i]);
        if o10 != o7 {
            let r = o7.as_ref().expect_err("only generation 7 refuses more");
            assert_eq!(r.kind, RejectKind::UnsupportedProtocolGeneration, "{o10:?} / {o7:?}");
        }
        if read6 {
            read6 = compare6(frame, o7, reference6(frame));
        }
        if read7 {
            read7 = compare7(frame, o10, reference7(frame));
        }
        if !read6 && !read7 {
            break;
        }
    }
    // Why::BulkStream: 0.6.14 reads a broken record as a CBOR frame; we have lost
    // the stream there, so nothing of it is compared.
});
