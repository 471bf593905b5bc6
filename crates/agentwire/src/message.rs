//! The message types of generation 10: one table, and everything derived from it.
//!
//! Each row of the `message_types!` table below names a type once: its wire name, direction,
//! the generation that introduced it, its frame flags and its payload type.
//! [`MessageType`], [`Payload`], the `From` conversions, [`MessageType::ALL`],
//! lookup by wire name and the dispatch to each payload's codec are generated
//! from those rows, so a type cannot be half-added.

use std::fmt;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Deserializer, Serialize};

use crate::frame::Flags;
use crate::payload::bootstrap::GuestBootstrap;
use crate::payload::bulk::{BulkAccepted, BulkCancel, BulkCredit, BulkFinish, BulkRecord};
use crate::payload::core::{
    ClockSync, CoreError, InitAck, InitResolved, Ping, Pong, Ready, RelayClientDisconnected, Shutdown, Touch, Touched,
};
use crate::payload::exec::{
    ExecExited, ExecFailed, ExecOutputAck, ExecRequest, ExecResize, ExecSignal, ExecStarted, ExecStderr, ExecStdin,
    ExecStdinAck, ExecStdinError, ExecStdout,
};
use crate::payload::fs::{FsData, FsRequest, FsResponse};
use crate::payload::tcp::{TcpClose, TcpClosed, TcpConnect, TcpConnected, TcpData, TcpEof, TcpFailed};
use crate::payload::workload::{
    RootDiskGrow, RootDiskPrepare, RootDiskState, TransportCredit, WorkloadFreeze, WorkloadFrozen, WorkloadThaw,
    WorkloadThawed,
};
use crate::payload::{CborPayload, PayloadError};
use crate::version::PROTOCOL_VERSION;

/// Who sends a message type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Direction {
    /// The host sends it to the guest.
    HostToGuest,
    /// The guest sends it to the host.
    GuestToHost,
    /// Either side sends it.
    Both,
    /// A relay sends it to the guest.
    RelayToGuest,
}

/// A payload type and the one message type that carries it.
///
/// ```
/// use agentwire::{MessageType, TypedPayload, payload::core::Ready};
/// assert_eq!(Ready::MESSAGE_TYPE, MessageType::Ready);
/// ```
pub trait TypedPayload: CborPayload + Into<Payload> {
    /// The message type whose payload this is.
    const MESSAGE_TYPE: MessageType;
}

/// How a payload is held in [`Payload`]: `inline`, or `boxed` when it is large,
/// so that every message stays small to move.
macro_rules! held {
    (inline, $t:ty) => { $t };
    (boxed, $t:ty) => { Box<$t> };
}

/// Puts a payload value into its [`Payload`] slot.
macro_rules! hold {
    (inline, $e:expr) => {
        $e
    };
    (boxed, $e:expr) => {
        Box::new($e)
    };
}

macro_rules! message_types {
    ($(
        $(#[$doc:meta])*
        $variant:ident = $wire:literal, $dir:ident, gen $gen:literal, $flags:ident, $payload:ty, $store:ident;
    )*) => {
        /// A message type of generation 10 (`t` in the envelope), or the raw
        /// bulk record, the one body without an envelope.
        ///
        /// ```
        /// use agentwire::{Flags, MessageType};
        /// let t = MessageType::from_wire_name("core.tcp.connect").unwrap();
        /// assert_eq!((t, t.generation(), t.flags()), (MessageType::TcpConnect, 4, Flags::SESSION_START));
        /// assert!(!t.is_available_at(3));
        /// assert_eq!(MessageType::ALL.iter().filter(|t| t.has_envelope()).count(), 46);
        /// assert_eq!(MessageType::from_wire_name("bulk.record"), None);
        /// assert_eq!(MessageType::from_name("bulk.record"), Some(MessageType::BulkRecord));
        /// ```
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        #[non_exhaustive]
        pub enum MessageType {
            $( $(#[$doc])* $variant, )*
        }

        impl MessageType {
            /// Every type, in table order.
            pub const ALL: [MessageType; [$(MessageType::$variant),*].len()] = [$(MessageType::$variant),*];

            /// The wire name, e.g. `core.exec.request`.
            pub const fn wire_name(self) -> &'static str {
                match self { $( MessageType::$variant => $wire, )* }
            }

            /// The generation that introduced the type.
            pub const fn generation(self) -> u8 {
                match self { $( MessageType::$variant => $gen, )* }
            }

            /// The flags every frame of this type carries.
            pub const fn flags(self) -> Flags {
                match self { $( MessageType::$variant => Flags::$flags, )* }
            }

            /// Who sends it.
            pub const fn direction(self) -> Direction {
                match self { $( MessageType::$variant => Direction::$dir, )* }
            }

            /// The type with this wire name, if generation 10 has one (never
            /// [`MessageType::BulkRecord`], which no envelope names).
            pub fn from_wire_name(name: &str) -> Option<MessageType> {
                MessageType::from_wire_bytes(name.as_bytes())
            }

            /// The type with this name as renderings write it: a wire name, or
            /// `bulk.record` for a raw bulk record.
            pub fn from_name(name: &str) -> Option<MessageType> {
                MessageType::from_wire_name(name)
                    .or_else(|| MessageType::ALL.into_iter().find(|t| !t.has_envelope() && t.wire_name() == name))
            }

            /// Whether the body is an envelope (every type but the raw bulk record).
            pub const fn has_envelope(self) -> bool {
                self.flags().bits() != Flags::BULK.bits()
            }

            /// Reads a payload of this type from JSON or any other serde format,
            /// e.g. a test vector's `payload`.
            pub fn deserialize_payload<'de, D: Deserializer<'de>>(self, d: D) -> Result<Payload, D::Error> {
                Ok(match self { $( MessageType::$variant => Payload::$variant(hold!($store, <$payload>::deserialize(d)?)), )* })
            }

            /// Decodes a payload of this type from the envelope's `p` bytes;
            /// the data of the data messages is a view of `p`.
            pub fn decode_payload(self, p: &Bytes) -> Result<Payload, PayloadError> {
                Ok(match self { $( MessageType::$variant => Payload::$variant(hold!($store, <$payload>::decode(p)?)), )* })
            }

            /// Decodes a payload of this type from a borrowed slice of `p`
            /// bytes (see [`CborPayload::decode_slice`]).
            ///
            /// ```
            /// use agentwire::{MessageType, Payload, payload::exec::ExecExited};
            /// let p = MessageType::ExecExited.decode_payload_slice(b"\xa1\x64code\x18\x2a")?;
            /// assert_eq!(p, Payload::ExecExited(ExecExited { code: 42 }));
            /// # Ok::<(), agentwire::payload::PayloadError>(())
            /// ```
            pub fn decode_payload_slice(self, p: &[u8]) -> Result<Payload, PayloadError> {
                Ok(match self { $( MessageType::$variant => Payload::$variant(hold!($store, <$payload>::decode_slice(p)?)), )* })
            }

            /// Decodes a payload of this type by the serde path alone
            /// ([`crate::payload::serde_decode`]: ciborium after the check),
            /// which every faster decoder must agree with, value for value and
            /// error for error; for differential tests and fuzzing.
            pub fn decode_payload_serde(self, p: &[u8]) -> Result<Payload, PayloadError> {
                Ok(match self { $( MessageType::$variant => Payload::$variant(hold!($store, crate::payload::serde_decode::<$payload>(p)?)), )* })
            }

            /// Whether a decoded payload of this type holds views of the
            /// payload bytes ([`CborPayload::HOLDS_VIEWS`]).
            ///
            /// ```
            /// use agentwire::MessageType;
            /// assert!(MessageType::FsData.holds_views());
            /// assert!(!MessageType::Ready.holds_views());
            /// assert_eq!(MessageType::ALL.iter().filter(|t| t.holds_views()).count(), 7);
            /// ```
            pub const fn holds_views(self) -> bool {
                match self { $( MessageType::$variant => <$payload as CborPayload>::HOLDS_VIEWS, )* }
            }
        }

        /// A decoded payload of any type: match on it to get the typed value.
        ///
        /// Serializes as the inner payload (the rendering the golden vectors use).
        ///
        /// ```
        /// use agentwire::{MessageType, Payload, payload::exec::ExecExited};
        /// let p: Payload = ExecExited { code: 3 }.into();
        /// assert_eq!(p.message_type(), MessageType::ExecExited);
        /// if let Payload::ExecExited(e) = p { assert_eq!(e.code, 3) }
        /// ```
        #[derive(Clone, Debug, PartialEq, Eq, Serialize)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        #[serde(untagged)]
        #[non_exhaustive]
        pub enum Payload {
            $( $(#[$doc])* $variant(held!($store, $payload)), )*
        }

        impl Payload {
            /// The message type that carries this payload.
            pub fn message_type(&self) -> MessageType {
                match self { $( Payload::$variant(_) => MessageType::$variant, )* }
            }

            /// Exact size of the encoded payload when known without encoding it.
            pub fn exact_encoded_len(&self) -> Option<usize> {
                match self { $( Payload::$variant(p) => p.exact_encoded_len(), )* }
            }

            /// Exact size of the encoded payload.
            pub fn encoded_len(&self) -> Result<usize, PayloadError> {
                match self { $( Payload::$variant(p) => p.encoded_len(), )* }
            }

            /// Appends the canonical encoding to `dst`.
            pub fn encode(&self, dst: &mut BytesMut) -> Result<(), PayloadError> {
                match self { $( Payload::$variant(p) => p.encode(dst), )* }
            }

            /// Exact size of the encoded payload in a frame whose `v` is `generation`.
            pub fn encoded_len_at(&self, generation: u8) -> Result<usize, PayloadError> {
                match self { $( Payload::$variant(p) => p.encoded_len_at(generation), )* }
            }

            /// Appends the encoding for a frame whose `v` is `generation`
            /// (see [`crate::payload::as_generation`]).
            pub fn encode_at(&self, generation: u8, dst: &mut BytesMut) -> Result<(), PayloadError> {
                match self { $( Payload::$variant(p) => p.encode_at(generation, dst), )* }
            }
        }

        $(
            impl From<$payload> for Payload {
                fn from(p: $payload) -> Payload { Payload::$variant(hold!($store, p)) }
            }

            impl TypedPayload for $payload {
                const MESSAGE_TYPE: MessageType = MessageType::$variant;
            }
        )*
    };
}

message_types! {
    /// `core.ready`: the agent is up.
    Ready = "core.ready", GuestToHost, gen 1, NONE, Ready, inline;
    /// `core.init.resolved`: the guest's default user.
    InitResolved = "core.init.resolved", GuestToHost, gen 1, NONE, InitResolved, inline;
    /// `core.init.ack`: the host accepts.
    InitAck = "core.init.ack", HostToGuest, gen 1, NONE, InitAck, inline;
    /// `core.shutdown`: power off.
    Shutdown = "core.shutdown", HostToGuest, gen 1, SHUTDOWN, Shutdown, inline;
    /// `core.relay.client.disconnected`: a relay client's ids are free.
    RelayClientDisconnected = "core.relay.client.disconnected", RelayToGuest, gen 1, NONE, RelayClientDisconnected, inline;
    /// `core.clock.sync`: the host's wall clock.
    ClockSync = "core.clock.sync", HostToGuest, gen 1, NONE, ClockSync, inline;
    /// `core.ping`.
    Ping = "core.ping", HostToGuest, gen 6, NONE, Ping, inline;
    /// `core.pong`.
    Pong = "core.pong", GuestToHost, gen 6, TERMINAL, Pong, inline;
    /// `core.touch`.
    Touch = "core.touch", HostToGuest, gen 6, NONE, Touch, inline;
    /// `core.touched`.
    Touched = "core.touched", GuestToHost, gen 6, TERMINAL, Touched, inline;
    /// `core.workload.freeze`: pause the workload.
    WorkloadFreeze = "core.workload.freeze", HostToGuest, gen 9, NONE, WorkloadFreeze, boxed;
    /// `core.workload.frozen`.
    WorkloadFrozen = "core.workload.frozen", GuestToHost, gen 9, TERMINAL, WorkloadFrozen, boxed;
    /// `core.workload.thaw`: resume the workload.
    WorkloadThaw = "core.workload.thaw", HostToGuest, gen 9, NONE, WorkloadThaw, inline;
    /// `core.workload.thawed`.
    WorkloadThawed = "core.workload.thawed", GuestToHost, gen 9, TERMINAL, WorkloadThawed, inline;
    /// `core.workload.transport.credit`: the host input the agent accepts.
    TransportCredit = "core.workload.transport.credit", GuestToHost, gen 9, NONE, TransportCredit, inline;
    /// `core.root_disk.prepare`.
    RootDiskPrepare = "core.root_disk.prepare", HostToGuest, gen 9, NONE, RootDiskPrepare, inline;
    /// `core.root_disk.grow`.
    RootDiskGrow = "core.root_disk.grow", HostToGuest, gen 9, NONE, RootDiskGrow, inline;
    /// `core.root_disk.state`.
    RootDiskState = "core.root_disk.state", GuestToHost, gen 9, TERMINAL, RootDiskState, inline;
    /// `core.error`: a frame could not be handled.
    Error = "core.error", Both, gen 5, TERMINAL, CoreError, boxed;
    /// `core.bulk.accepted`: the guest takes a bulk offer.
    BulkAccepted = "core.bulk.accepted", GuestToHost, gen 8, NONE, BulkAccepted, inline;
    /// `core.bulk.credit`: a flow's receiver moves its credit limit.
    BulkCredit = "core.bulk.credit", Both, gen 8, NONE, BulkCredit, inline;
    /// `core.bulk.finish`: a flow is complete.
    BulkFinish = "core.bulk.finish", Both, gen 8, NONE, BulkFinish, inline;
    /// `core.bulk.cancel`: stop a bulk correlation.
    BulkCancel = "core.bulk.cancel", Both, gen 8, NONE, BulkCancel, inline;
    /// `core.exec.request`: run a command.
    ExecRequest = "core.exec.request", HostToGuest, gen 1, SESSION_START, ExecRequest, boxed;
    /// `core.exec.started`.
    ExecStarted = "core.exec.started", GuestToHost, gen 1, NONE, ExecStarted, inline;
    /// `core.exec.stdin`.
    ExecStdin = "core.exec.stdin", HostToGuest, gen 1, NONE, ExecStdin, inline;
    /// `core.exec.stdin.error`.
    ExecStdinError = "core.exec.stdin.error", GuestToHost, gen 1, NONE, ExecStdinError, inline;
    /// `core.exec.stdout`.
    ExecStdout = "core.exec.stdout", GuestToHost, gen 1, NONE, ExecStdout, inline;
    /// `core.exec.stderr`.
    ExecStderr = "core.exec.stderr", GuestToHost, gen 1, NONE, ExecStderr, inline;
    /// `core.exec.exited`.
    ExecExited = "core.exec.exited", GuestToHost, gen 1, TERMINAL, ExecExited, inline;
    /// `core.exec.failed`.
    ExecFailed = "core.exec.failed", GuestToHost, gen 1, TERMINAL, ExecFailed, boxed;
    /// `core.exec.resize`.
    ExecResize = "core.exec.resize", HostToGuest, gen 1, NONE, ExecResize, inline;
    /// `core.exec.signal`.
    ExecSignal = "core.exec.signal", HostToGuest, gen 1, NONE, ExecSignal, inline;
    /// `core.exec.output.ack`: the host consumed output (generation 10).
    ExecOutputAck = "core.exec.output.ack", HostToGuest, gen 10, NONE, ExecOutputAck, inline;
    /// `core.exec.stdin.ack`: the guest wrote stdin into the child (generation 10).
    ExecStdinAck = "core.exec.stdin.ack", GuestToHost, gen 10, NONE, ExecStdinAck, inline;
    /// `core.fs.request`: a file operation.
    FsRequest = "core.fs.request", HostToGuest, gen 2, SESSION_START, FsRequest, boxed;
    /// `core.fs.response`.
    FsResponse = "core.fs.response", GuestToHost, gen 2, TERMINAL, FsResponse, boxed;
    /// `core.fs.data`.
    FsData = "core.fs.data", Both, gen 2, NONE, FsData, inline;
    /// `core.tcp.connect`: open a TCP connection from the guest.
    TcpConnect = "core.tcp.connect", HostToGuest, gen 4, SESSION_START, TcpConnect, boxed;
    /// `core.tcp.connected`.
    TcpConnected = "core.tcp.connected", GuestToHost, gen 4, NONE, TcpConnected, inline;
    /// `core.tcp.data`.
    TcpData = "core.tcp.data", Both, gen 4, NONE, TcpData, inline;
    /// `core.tcp.eof`.
    TcpEof = "core.tcp.eof", Both, gen 4, NONE, TcpEof, inline;
    /// `core.tcp.close`.
    TcpClose = "core.tcp.close", HostToGuest, gen 4, NONE, TcpClose, inline;
    /// `core.tcp.closed`.
    TcpClosed = "core.tcp.closed", GuestToHost, gen 4, TERMINAL, TcpClosed, inline;
    /// `core.tcp.failed`.
    TcpFailed = "core.tcp.failed", GuestToHost, gen 4, TERMINAL, TcpFailed, inline;
    /// `core.bootstrap`: the guest's configuration, before the handshake.
    Bootstrap = "core.bootstrap", HostToGuest, gen 7, NONE, GuestBootstrap, boxed;
    /// A raw bulk record (generation 8): a frame with the `BULK` flag whose body
    /// is a binary header and opaque data, not an envelope. `bulk.record` is
    /// not a wire name (no envelope carries it) but the name renderings use.
    BulkRecord = "bulk.record", Both, gen 8, BULK, BulkRecord, inline;
}

impl MessageType {
    /// Whether a peer of generation `generation` knows this type.
    #[inline]
    pub const fn is_available_at(self, generation: u8) -> bool {
        self.generation() <= generation
    }

    /// The type with this wire name, compared as bytes: a known name needs no
    /// UTF-8 check, and finding it costs a hash of three bytes and one compare.
    ///
    /// ```
    /// use agentwire::MessageType;
    /// assert_eq!(MessageType::from_wire_bytes(b"core.exec.stdout"), Some(MessageType::ExecStdout));
    /// assert_eq!(MessageType::from_wire_bytes(b"core.exec.stdout2"), None);
    /// assert_eq!(MessageType::from_wire_bytes(b"\xff"), None);
    /// ```
    #[inline]
    pub fn from_wire_bytes(name: &[u8]) -> Option<MessageType> {
        let mut slot = name_hash(name);
        // Open addressing: probe until the name or an empty slot.
        loop {
            let t = NAME_SLOTS[slot]?;
            if same_name(t.wire_name().as_bytes(), name) {
                return Some(t);
            }
            slot = (slot + 1) % SLOT_COUNT;
        }
    }
}

/// `a == b` for names of 8 bytes or more, in 8-byte words (the last one
/// overlapping the one before): a few compares inline instead of a call to
/// `memcmp`, which is most of the cost of a lookup otherwise.
#[inline]
fn same_name(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() || n < 8 {
        return a == b;
    }
    let word = |s: &[u8], at: usize| s.get(at..at + 8).map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()));
    let mut at = 0;
    while at + 8 < n {
        if word(a, at) != word(b, at) {
            return false;
        }
        at += 8;
    }
    word(a, n - 8) == word(b, n - 8)
}

/// Where a wire name starts looking in [`NAME_SLOTS`]: its length and three of
/// its bytes, which between them tell the wire names mostly apart
/// (collisions only cost a probe).
const fn name_hash(name: &[u8]) -> usize {
    let n = name.len();
    let (last, before, sixth) = match n {
        0 => (0, 0, 0),
        1..=5 => (name[n - 1], 0, 0),
        _ => (name[n - 1], name[n - 2], name[5]),
    };
    (n.wrapping_mul(31) ^ (last as usize).wrapping_mul(7) ^ (before as usize).wrapping_mul(13) ^ (sixth as usize))
        % SLOT_COUNT
}

/// Twice as many slots as types, so that a probe always ends at an empty slot.
const SLOT_COUNT: usize = 2 * MessageType::ALL.len();

/// Every type with an envelope at the slot of its name's hash, or the next
/// free one: built by the compiler from the table.
const NAME_SLOTS: [Option<MessageType>; SLOT_COUNT] = {
    let mut slots = [None; SLOT_COUNT];
    let mut i = 0;
    while i < MessageType::ALL.len() {
        let t = MessageType::ALL[i];
        i += 1;
        if !t.has_envelope() {
            continue;
        }
        let mut slot = name_hash(t.wire_name().as_bytes());
        while slots[slot].is_some() {
            slot = (slot + 1) % SLOT_COUNT;
        }
        slots[slot] = Some(t);
    }
    slots
};

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.wire_name())
    }
}

/// The `t` of an envelope: a type of this generation, or a name it does not know.
/// (A raw bulk record, which has no `t`, is `Known(MessageType::BulkRecord)`.)
///
/// An unknown name is not an error of the stream: a newer peer may send it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TypeName {
    /// A type of generation 10.
    Known(MessageType),
    /// A name generation 10 does not have, kept as received.
    Unknown(String),
}

impl TypeName {
    /// Looks a wire name up in the table; allocates only for an unknown name.
    pub fn from_wire_name(name: &str) -> TypeName {
        match MessageType::from_wire_name(name) {
            Some(t) => TypeName::Known(t),
            None => TypeName::Unknown(name.to_string()),
        }
    }

    /// Looks a name as received up in the table: UTF-8 is checked only for a
    /// name the table does not have (`None` when it is not UTF-8).
    #[inline]
    pub(crate) fn from_wire_bytes(name: &[u8]) -> Option<TypeName> {
        match MessageType::from_wire_bytes(name) {
            Some(t) => Some(TypeName::Known(t)),
            None => std::str::from_utf8(name).ok().map(|name| TypeName::Unknown(name.to_string())),
        }
    }

    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            TypeName::Known(t) => t.wire_name(),
            TypeName::Unknown(name) => name,
        }
    }
}

impl fmt::Display for TypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message whose envelope was read but whose payload was not: what a relay
/// or a logger needs, and what a newer peer's unknown types arrive as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawMessage {
    /// Correlation id.
    pub id: u32,
    /// Flags as received.
    pub flags: Flags,
    /// The sender's generation (`v`); for a raw bulk record, which carries
    /// none, the generation the decoder had negotiated.
    pub version: u8,
    /// The type (`t`).
    pub type_name: TypeName,
    /// The payload bytes (`p`), or the whole body of a raw bulk record: a view of the frame.
    pub payload: Bytes,
}

/// A message with its payload decoded.
///
/// ```
/// use agentwire::{Flags, Message, MessageType, PROTOCOL_VERSION, payload::exec::ExecExited};
/// let m = Message::new(9, ExecExited { code: 42 });
/// assert_eq!((m.message_type(), m.flags, m.version), (MessageType::ExecExited, Flags::TERMINAL, PROTOCOL_VERSION));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Correlation id.
    pub id: u32,
    /// Flags; [`Message::new`] sets the type's.
    pub flags: Flags,
    /// The sender's generation (`v`). A raw bulk record carries none: the
    /// decoder fills in the generation it had negotiated and encoders ignore it.
    pub version: u8,
    /// The payload, which also says the type.
    pub payload: Payload,
}

impl Message {
    /// A message of the current generation with the flags of the payload's type.
    pub fn new(id: u32, payload: impl Into<Payload>) -> Message {
        let payload = payload.into();
        Message { id, flags: payload.message_type().flags(), version: PROTOCOL_VERSION, payload }
    }

    /// The same message with `v` set to `version` (to speak as an older peer).
    pub fn with_version(mut self, version: u8) -> Message {
        self.version = version;
        self
    }

    /// The type, from the payload.
    pub fn message_type(&self) -> MessageType {
        self.payload.message_type()
    }

    /// Size of the whole frame on the wire, length prefix included, without encoding it.
    ///
    /// ```
    /// use agentwire::{Message, payload::exec::ExecExited};
    /// assert_eq!(Message::new(9, ExecExited { code: 42 }).wire_len()?, 43);
    /// # Ok::<(), agentwire::payload::PayloadError>(())
    /// ```
    pub fn wire_len(&self) -> Result<usize, PayloadError> {
        let t = self.message_type();
        let payload = self.payload.encoded_len_at(self.version)?;
        let body =
            if t.has_envelope() { crate::envelope::body_len(self.version, t.wire_name(), payload) } else { payload };
        Ok(crate::frame::LENGTH_FIELD_SIZE + crate::frame::FRAME_HEADER_SIZE + body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_stays_small_enough_to_move_around() {
        // The large control payloads are boxed; data frames, bulk records and core.ready
        // (its generation-8+ capabilities boxed) are held inline: one cache line.
        assert!(std::mem::size_of::<Payload>() <= 64, "{}", std::mem::size_of::<Payload>());
    }

    #[test]
    fn table_is_consistent() {
        let mut names = std::collections::HashSet::new();
        for t in MessageType::ALL {
            assert!(names.insert(t.wire_name()), "duplicate {t}");
            assert_eq!(MessageType::from_name(t.wire_name()), Some(t));
            assert_eq!(MessageType::from_wire_name(t.wire_name()), t.has_envelope().then_some(t));
            assert!((1..=PROTOCOL_VERSION).contains(&t.generation()));
            assert_eq!(t.flags().known(), t.flags());
        }
        assert_eq!(MessageType::ALL.iter().filter(|t| !t.has_envelope()).count(), 1);
        assert_eq!(MessageType::ALL.iter().filter(|t| t.is_available_at(7) && t.has_envelope()).count(), 32);
        assert_eq!(MessageType::ALL.iter().filter(|t| t.is_available_at(3)).count(), 19);
        assert_eq!(MessageType::from_wire_name("core.future"), None);
        // The hashed lookup against a plain search of the table, on every name
        // and every near miss (cut short, one byte changed, one byte longer).
        let search =
            |name: &[u8]| MessageType::ALL.into_iter().find(|t| t.has_envelope() && t.wire_name().as_bytes() == name);
        for t in MessageType::ALL.into_iter().filter(|t| t.has_envelope()) {
            let name = t.wire_name().as_bytes();
            assert_eq!(MessageType::from_wire_bytes(name), Some(t));
            for cut in 0..name.len() {
                assert_eq!(MessageType::from_wire_bytes(&name[..cut]), search(&name[..cut]), "{t} cut at {cut}");
                let mut changed = name.to_vec();
                changed[cut] ^= 0x20;
                assert_eq!(MessageType::from_wire_bytes(&changed), None, "{t} changed at {cut}");
            }
            assert_eq!(MessageType::from_wire_bytes(&[name, b"x"].concat()), None);
        }
        assert_eq!(NAME_SLOTS.iter().flatten().count(), MessageType::ALL.len() - 1);
        // The word-wise compare against `==`, at every length and every place a byte can differ.
        for n in 0..40usize {
            let a: Vec<u8> = (0..n as u8).collect();
            assert!(same_name(&a, &a.clone()));
            assert!(!same_name(&a, &[&a[..], b"x"].concat()));
            for i in 0..n {
                let mut b = a.clone();
                b[i] ^= 1;
                assert!(!same_name(&a, &b), "{n} {i}");
            }
        }
        assert_eq!(TypeName::from_wire_name("core.future").as_str(), "core.future");
    }
}
