//! The same bytes to this codec's `MessageCodec` and to the deployed reference
//! decoders (`microsandbox-protocol` 0.6.14, generation 7, and 0.7.13,
//! generation 10), frame by frame: both must accept the same frames, decode
//! them to the same values, and reject the same frames, except where the spec
//! makes us differ on purpose. Each such exception is a [`Why`] below, named in
//! FUZZING.md ("Known differences"); anything else is a finding.
//!
//! The reference model is what its agent does with a frame: its codec splits
//! the frame and decodes the envelope into its closed list of types (a failure
//! there ends the agent loop), the agent compares the whole flags byte with the
//! type's flags (section 10.9), then decodes the payload into the type's struct.

#![no_main]

use agentwire::{MAX_FRAME_SIZE, Message, MessageCodec, Payload, RejectKind};
use bytes::BytesMut;
use ciborium::Value;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::Decoder;

/// Our nesting limit (`agentwire::MAX_NESTING_DEPTH`); ciborium's is 256.
const OUR_DEPTH: usize = agentwire::MAX_NESTING_DEPTH;

/// What the reference does with one frame.
#[derive(Debug)]
enum Ref {
    /// The envelope does not decode (unknown type, not an envelope, ...): the agent stops.
    Fatal(String),
    /// 0.7.13: a raw bulk record (flags exactly `0x08`), decoded.
    Bulk,
    /// 0.7.13: a type of generation 8 or later.
    Newer(&'static str),
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
    /// Reserved flag bits (`0x10`-`0x80`, and `0x08`, which generation 7 does not
    /// know) with the right meaningful bits: we ignore them (section 1, gen-7
    /// rule); the reference agent answers `invalid_flags`.
    ReservedFlags,
    /// An enum name outside the spec's list in `CoreErrorKind`, `ExecFailureKind`
    /// or `BootstrapSecurityProfile`: kept as `Unknown` by our open enums, refused
    /// by the reference's closed ones.
    OpenEnum,
    /// `core.shutdown` with an empty payload: receivers accept it (section 3); the
    /// reference's `()` does not read zero bytes.
    EmptyShutdown,
    /// An envelope error or unknown type is an error of that frame for us
    /// (section 3) and the end of the stream for the reference (section 10.9).
    PerFrame,
    /// 0.7.13 only: types of generations 8-10 and raw bulk records (`0x08`), which
    /// our generation-7 codec does not know.
    Newer,
}

/// The dispatch from a reference type to its payload struct, per version.
macro_rules! payload_table {
    ($name:ident, $krate:ident, { $($variant:ident => $ty:ty,)* }) => {
        /// The reference's typed reading of `p`, written back to CBOR; `None` for
        /// a type that generation 7 does not have.
        fn $name(t: $krate::message::MessageType, p: &[u8]) -> Option<Result<Vec<u8>, String>> {
            use $krate::message::MessageType as T;
            fn typed<R: DeserializeOwned + Serialize>(p: &[u8]) -> Result<Vec<u8>, String> {
                let m = $krate::message::Message::new(T::Ping, 0, p.to_vec());
                let value: R = m.payload().map_err(|e| e.to_string())?;
                let mut out = Vec::new();
                ciborium::into_writer(&value, &mut out).map_err(|e| e.to_string())?;
                Ok(out)
            }
            match t {
                $( T::$variant => Some(typed::<$ty>(p)), )*
                #[allow(unreachable_patterns)]
                _ => None,
            }
        }
    };
}

macro_rules! gen7_payloads {
    ($name:ident, $k:ident) => {
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
        });
    };
}
gen7_payloads!(payload6, ref6);
gen7_payloads!(payload7, ref7);

/// Reads one whole frame (length prefix included) the way the agent does.
fn reference6(frame: &[u8]) -> Ref {
    let mut buf = frame.to_vec();
    let m = match ref6::codec::try_decode_from_buf(&mut buf) {
        Ok(Some(m)) => m,
        Ok(None) => unreachable!("a whole frame"),
        Err(e) => return Ref::Fatal(e.to_string()),
    };
    let t = m.t.as_str();
    if m.flags != m.t.flags() {
        return Ref::Flags;
    }
    match payload6(m.t, &m.p).expect("every 0.6.14 type is a generation-7 type") {
        Ok(p) => Ref::Value { v: m.v, id: m.id, flags: m.flags, t, p },
        Err(e) => Ref::Payload(e),
    }
}

fn reference7(frame: &[u8]) -> Ref {
    let mut buf = BytesMut::from(frame);
    let m = match ref7::codec::try_decode_frame_from_bytes(&mut buf) {
        Ok(Some(ref7::codec::DecodedFrame::Control(m))) => m,
        Ok(Some(ref7::codec::DecodedFrame::Bulk(_))) => return Ref::Bulk,
        Ok(None) => unreachable!("a whole frame"),
        Err(e) => return Ref::Fatal(e.to_string()),
    };
    let t = m.t.as_str();
    let Some(payload) = payload7(m.t, &m.p) else { return Ref::Newer(t) };
    if m.flags != m.t.flags() {
        return Ref::Flags;
    }
    match payload {
        Ok(p) => Ref::Value { v: m.v, id: m.id, flags: m.flags, t, p },
        Err(e) => Ref::Payload(e),
    }
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

/// Whether our value holds a name only our open enums keep.
fn open_enum(p: &Payload) -> bool {
    use agentwire::payload::{
        bootstrap::BootstrapSecurityProfile as S, core::CoreErrorKind as C, exec::ExecFailureKind as E,
    };
    match p {
        Payload::Error(e) => matches!(e.kind, C::Unknown(_)),
        Payload::ExecFailed(e) => matches!(e.kind, E::Unknown(_)),
        Payload::Bootstrap(b) => matches!(b.security_profile, S::Unknown(_)),
        _ => false,
    }
}

fn explained(frame: &[u8], allowed: &[Why], what: &str, reference: &str, ours: &dyn std::fmt::Debug) {
    let why = reasons(frame);
    assert!(
        why.iter().any(|w| allowed.contains(w)),
        "{reference} and we disagree on {what} without a named reason (found {why:?}, allowed {allowed:?})\n \
         frame {frame:02x?}\n ours: {ours:?}"
    );
}

/// Compares our answer for one frame with the reference's; whether the reference reads on.
fn compare(frame: &[u8], ours: &Result<Message, agentwire::Rejected>, theirs: Ref, reference: &str) -> bool {
    // Why our reader may refuse an envelope that the reference reads.
    const ENVELOPE: &[Why] = &[Why::Trailing, Why::PNotBytes, Why::Depth, Why::ByteKey];
    let flags = frame[8];
    match (theirs, ours) {
        (Ref::Fatal(e), Err(r)) => {
            // Per-frame for us, fatal for them (Why::PerFrame).
            let envelope = matches!(r.kind, RejectKind::MalformedMessage | RejectKind::UnsupportedMessageType);
            if !envelope {
                // The envelope was fine for us: only our liberal reading (or bulk) explains it.
                if flags & 0x08 == 0 || reference.contains("0.6.14") {
                    explained(frame, &[Why::Indefinite], "an envelope", reference, &(e, r));
                }
            }
            false
        }
        (Ref::Fatal(e), Ok(m)) => {
            if flags & 0x08 != 0 && reference.contains("0.7.13") {
                return false; // Why::Newer: a broken bulk record for 0.7.13.
            }
            explained(frame, &[Why::Indefinite], "an envelope", reference, &(e, m));
            false
        }
        (Ref::Bulk, _) => true,          // Why::Newer
        (Ref::Newer(_), Err(_)) => true, // Why::Newer: unknown to us, an error of that frame
        (Ref::Newer(t), Ok(m)) => panic!("we decoded {t}, a type of a later generation, as {m:?}"),
        (Ref::Flags, Err(r)) => {
            match r.kind {
                RejectKind::InvalidFlags => {}
                // Why::ReservedFlags: our flags check passed; the frame failed later.
                RejectKind::InvalidPayload => assert_ne!(flags & 0xf8, 0, "{reference}: flags; ours {r:?}"),
                _ => {
                    assert_eq!(r.kind, RejectKind::MalformedMessage, "{reference}: flags; ours {r:?}");
                    explained(frame, ENVELOPE, "flags", reference, r);
                }
            }
            true
        }
        (Ref::Flags, Ok(m)) => {
            // Why::ReservedFlags: only bits that generation 7 does not define differ.
            assert_eq!(flags & 0x07, m.message_type().flags().bits(), "{reference}: we took wrong flags {m:?}");
            assert_ne!(flags & 0xf8, 0);
            true
        }
        (Ref::Payload(e), Err(r)) => {
            if r.kind != RejectKind::InvalidPayload {
                assert_eq!(r.kind, RejectKind::MalformedMessage, "{reference}: payload {e}; ours {r:?}");
                explained(frame, ENVELOPE, "a payload", reference, r);
            }
            true
        }
        (Ref::Payload(e), Ok(m)) => {
            if !open_enum(&m.payload) {
                explained(frame, &[Why::Indefinite, Why::EmptyShutdown], "a payload", reference, &(e, m));
            }
            true
        }
        (Ref::Value { .. }, Err(r)) => {
            let allowed: &[Why] = match r.kind {
                RejectKind::MalformedMessage => ENVELOPE,
                RejectKind::InvalidPayload => &[Why::Trailing, Why::Depth],
                _ => &[],
            };
            explained(frame, allowed, "a frame the reference accepts", reference, r);
            true
        }
        (Ref::Value { v, id, flags, t, p }, Ok(m)) => {
            assert_eq!(
                (m.version, m.id, m.flags.bits(), m.message_type().wire_name()),
                (v, id, flags, t),
                "{reference}"
            );
            // The reference's value, written by ciborium, read by us: our value.
            let theirs = m.message_type().decode_payload_slice(&p).unwrap_or_else(|e| {
                panic!("{reference}'s value {p:02x?} does not read back in our types: {e}\n ours {m:?}")
            });
            assert_eq!(theirs, m.payload, "{reference} and we decode {frame:02x?} to different values");
            true
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Ours: one item per whole frame, in order, until the stream ends or is lost.
    let mut codec = MessageCodec::new();
    let mut src = BytesMut::from(data);
    let mut ours = Vec::new();
    while let Ok(Some(item)) = codec.decode_eof(&mut src) {
        ours.push(item);
    }
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
    assert_eq!(ours.len(), frames.len(), "we returned one item per whole frame");
    let (mut read6, mut read7) = (true, true);
    for (frame, ours) in frames.iter().zip(&ours) {
        if read6 {
            read6 = compare(frame, ours, reference6(frame), "microsandbox-protocol 0.6.14");
        }
        if read7 {
            read7 = compare(frame, ours, reference7(frame), "microsandbox-protocol 0.7.13");
        }
        if !read6 && !read7 {
            break;
        }
    }
});
