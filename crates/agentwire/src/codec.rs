//! tokio-util codecs for messages, built on [`FrameCodec`].
//!
//! Decoded items are `Result<_, Rejected>`: a frame that cannot be used (not an
//! envelope, an unknown type, flags that disagree with the type, a payload that
//! does not decode, a type above the negotiated generation, a frame above the
//! size limit) is an *item* naming the frame and the problem, and the next frame
//! follows. Only faults that lose the stream are the decoder's `Err`, because an
//! `Err` ends a `FramedRead`.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::cbor;
use crate::envelope;
use crate::frame::{
    self, BufferedFrame, EncodeError, Flags, Frame, FrameCodec, OversizedFrame, ReadFrame, StreamError,
};
use crate::message::{Message, MessageType, Payload, RawMessage, TypeName};
use crate::payload::PayloadError;
use crate::payload::bulk::{BULK_RECORD_HEADER_SIZE, BulkRecord};
use crate::payload::core::{CoreError, CoreErrorKind};
use crate::version::{self, PROTOCOL_VERSION};

/// What was wrong with a rejected frame. The names are those of
/// [`CoreErrorKind`], plus `frame_too_large`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectKind {
    /// `len` above the decoder's limit; the frame was discarded unread.
    FrameTooLarge,
    /// The body is not a valid envelope.
    MalformedMessage,
    /// The type is not one of generation 7; its name and payload are kept.
    UnsupportedMessageType,
    /// The type is above the negotiated generation.
    UnsupportedProtocolGeneration,
    /// The flags disagree with the type.
    InvalidFlags,
    /// The payload does not decode as the type's payload.
    InvalidPayload,
}

impl RejectKind {
    /// The snake_case name: a [`CoreErrorKind`] name or `frame_too_large`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::FrameTooLarge => "frame_too_large",
            RejectKind::MalformedMessage => "malformed_message",
            RejectKind::UnsupportedMessageType => "unsupported_message_type",
            RejectKind::UnsupportedProtocolGeneration => "unsupported_protocol_generation",
            RejectKind::InvalidFlags => "invalid_flags",
            RejectKind::InvalidPayload => "invalid_payload",
        }
    }

    /// The kind of `core.error` to answer with (an oversized frame is malformed).
    pub fn core_error_kind(self) -> CoreErrorKind {
        match self {
            RejectKind::FrameTooLarge | RejectKind::MalformedMessage => CoreErrorKind::MalformedMessage,
            RejectKind::UnsupportedMessageType => CoreErrorKind::UnsupportedMessageType,
            RejectKind::UnsupportedProtocolGeneration => CoreErrorKind::UnsupportedProtocolGeneration,
            RejectKind::InvalidFlags => CoreErrorKind::InvalidFlags,
            RejectKind::InvalidPayload => CoreErrorKind::InvalidPayload,
        }
    }
}

impl fmt::Display for RejectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frame that was read whole but cannot be used. The stream goes on.
///
/// ```
/// use agentwire::{MessageCodec, RejectKind};
/// use bytes::BytesMut;
/// use tokio_util::codec::Decoder;
///
/// // id 1, flags 0, body: the integer 7 (not an envelope)
/// let mut buf = BytesMut::from(&b"\0\0\0\x06\0\0\0\x01\0\x07"[..]);
/// let rejected = MessageCodec::new().decode(&mut buf)?.unwrap().unwrap_err();
/// assert_eq!((rejected.id, rejected.kind), (1, RejectKind::MalformedMessage));
/// assert_eq!(rejected.error_reply().id, 1); // a core.error to send back
/// # Ok::<(), agentwire::StreamError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("frame at offset {offset} (id {id}, flags {flags}{}): {kind}: {reason}", type_name.as_ref().map(|t| format!(", type {t}")).unwrap_or_default())]
pub struct Rejected {
    /// Stream offset of the frame's length prefix.
    pub offset: u64,
    /// Correlation id.
    pub id: u32,
    /// Flags as received.
    pub flags: Flags,
    /// The sender's generation, when the envelope was read.
    pub version: Option<u8>,
    /// The type, when the envelope was read.
    pub type_name: Option<TypeName>,
    /// What was wrong.
    pub kind: RejectKind,
    /// A readable explanation, with the byte offset inside the body or payload where there is one.
    pub reason: String,
    /// The payload bytes, when the envelope was read (an unknown type's payload is kept here).
    pub payload: Bytes,
}

impl Rejected {
    fn new(offset: u64, id: u32, flags: Flags, kind: RejectKind, reason: String) -> Rejected {
        Rejected { offset, id, flags, version: None, type_name: None, kind, reason, payload: Bytes::new() }
    }

    #[cold]
    fn malformed(offset: u64, frame: &impl ReadFrame, e: cbor::CborError) -> Rejected {
        Rejected::new(offset, frame.id(), frame.flags(), RejectKind::MalformedMessage, format!("{e} of the body"))
    }

    /// A frame whose envelope was read: the payload is kept, cut out of the frame.
    #[cold]
    fn of_envelope(
        offset: u64,
        frame: impl ReadFrame,
        env: envelope::Envelope,
        kind: RejectKind,
        reason: String,
    ) -> Rejected {
        let (id, flags) = (frame.id(), frame.flags());
        Rejected {
            offset,
            id,
            flags,
            version: Some(env.version),
            type_name: Some(env.type_name),
            kind,
            reason,
            payload: env.payload.to_bytes(&frame.into_body()),
        }
    }

    #[cold]
    fn oversized(o: OversizedFrame) -> Rejected {
        let reason = format!("length {} exceeds the limit of {}; the frame was discarded", o.len, o.limit);
        Rejected::new(o.offset, o.id, o.flags, RejectKind::FrameTooLarge, reason)
    }

    /// The `core.error` that answers this frame, on its id.
    pub fn error_reply(&self) -> Message {
        let mut error = CoreError::new(self.kind.core_error_kind(), self.reason.clone());
        error.offending_type = self.type_name.as_ref().map(|t| t.as_str().to_string());
        Message::new(self.id, error)
    }
}

/// An oversized frame that a [`FrameCodec`] skipped, as the rejection a message
/// codec reports for it (kind `frame_too_large`): for readers that split frames
/// themselves and decode them with `decode_frame`.
///
/// ```
/// use agentwire::{Flags, OversizedFrame, RejectKind, Rejected};
/// let skipped = OversizedFrame { offset: 10, id: 4, flags: Flags::NONE, len: 99, limit: 64 };
/// let r = Rejected::from(skipped);
/// assert_eq!((r.offset, r.id, r.kind), (10, 4, RejectKind::FrameTooLarge));
/// ```
impl From<OversizedFrame> for Rejected {
    fn from(o: OversizedFrame) -> Rejected {
        Rejected::oversized(o)
    }
}

/// A payload whose size is not known in advance is written after a byte-string
/// head sized for this many bytes (2 bytes of head, for 24 to 255 bytes of
/// payload), then moved if it came out another size: one memmove of a small
/// payload instead of serializing it twice.
const PAYLOAD_LEN_GUESS: usize = 255;

/// Length prefix, id and flags.
const FRAME_HEAD: usize = frame::LENGTH_FIELD_SIZE + frame::FRAME_HEADER_SIZE;

/// Writes one frame in a single pass: header, envelope, then the payload
/// straight into `dst`. `exact_len` is the payload's size when known in
/// advance; otherwise its length head and the frame length are filled in after.
/// On failure `dst` is left as it was.
fn encode_frame(
    dst: &mut BytesMut,
    limit: usize,
    (id, flags, version): (u32, Flags, u8),
    type_name: &str,
    exact_len: Option<usize>,
    write_payload: impl FnOnce(&mut BytesMut) -> Result<(), PayloadError>,
) -> Result<(), EncodeError> {
    if let Some(len) = exact_len {
        return encode_frame_of_size(dst, limit, (id, flags, version), type_name, len, write_payload);
    }
    let guessed_head = cbor::head_len(PAYLOAD_LEN_GUESS as u64);
    let start = dst.len();
    dst.reserve(FRAME_HEAD + envelope::prefix_len(version, type_name) + guessed_head + PAYLOAD_LEN_GUESS);
    dst.put_bytes(0, FRAME_HEAD);
    envelope::put_prefix(dst, version, type_name);
    let head_at = dst.len();
    dst.put_bytes(0, guessed_head);
    let payload_at = dst.len();
    if let Err(e) = write_payload(dst) {
        return Err(refuse(dst, start, type_name, e.reason));
    }
    let len = dst.len() - payload_at;
    let (head, head_len) = cbor::head_bytes(cbor::MAJOR_BYTES, len as u64);
    if head_len != guessed_head {
        let moved_to = head_at + head_len;
        if head_len > guessed_head {
            dst.put_bytes(0, head_len - guessed_head);
        }
        dst.copy_within(payload_at..payload_at + len, moved_to);
        dst.truncate(moved_to + len);
    }
    dst[head_at..head_at + head_len].copy_from_slice(&head[..head_len]);
    let body_len = dst.len() - start - FRAME_HEAD;
    if let Err(e) = frame::check_body_len(body_len, limit) {
        dst.truncate(start);
        return Err(e);
    }
    dst[start..start + FRAME_HEAD].copy_from_slice(&frame::header_bytes(body_len, id, flags));
    Ok(())
}

/// [`encode_frame`] for a payload whose size is known in advance: refused
/// before a byte is written when too large, then every head written once, in
/// order, with nothing to fill in or move afterwards.
fn encode_frame_of_size(
    dst: &mut BytesMut,
    limit: usize,
    (id, flags, version): (u32, Flags, u8),
    type_name: &str,
    payload_len: usize,
    write_payload: impl FnOnce(&mut BytesMut) -> Result<(), PayloadError>,
) -> Result<(), EncodeError> {
    let body_len = envelope::body_len(version, type_name, payload_len);
    frame::check_body_len(body_len, limit)?;
    let start = dst.len();
    dst.reserve(FRAME_HEAD + body_len);
    frame::put_header(dst, body_len, id, flags);
    envelope::put_prefix(dst, version, type_name);
    cbor::put_head(dst, cbor::MAJOR_BYTES, payload_len as u64);
    let payload_at = dst.len();
    let written = write_payload(dst).map(|()| dst.len() - payload_at);
    match written {
        Ok(len) if len == payload_len => Ok(()),
        // The frame would not say what it holds: refuse rather than send it.
        Ok(len) => {
            Err(refuse(dst, start, type_name, format!("payload wrote {len} bytes but was sized at {payload_len}")))
        }
        Err(e) => Err(refuse(dst, start, type_name, e.reason)),
    }
}

/// Writes a raw bulk record: frame header, record header, data (one copy of
/// the data; [`bulk_record_header`] is for writers that send the data from
/// where it is). Its flags are always `BULK` alone.
fn encode_bulk_record(dst: &mut BytesMut, limit: usize, id: u32, record: &BulkRecord) -> Result<(), EncodeError> {
    let header = bulk_record_header(id, record, limit)?;
    dst.reserve(header.len() + record.data.len());
    dst.put_slice(&header);
    dst.put_slice(&record.data);
    Ok(())
}

/// The 21 bytes that precede a bulk record's data on the wire (length, id,
/// `BULK`, kind, flow, reserved, offset), after checking the record: with the
/// data, a whole record for a vectored write that copies nothing.
///
/// ```
/// use agentwire::codec::bulk_record_header;
/// use agentwire::payload::bulk::{BulkFlow, BulkKind, BulkRecord};
/// let record = BulkRecord::new(BulkKind::Tcp, BulkFlow::HostToGuest, 5, bytes::Bytes::from_static(b"abc"));
/// let header = bulk_record_header(9, &record, agentwire::MAX_FRAME_SIZE)?;
/// assert_eq!(header, *b"\0\0\0\x14\0\0\0\x09\x08\x02\x01\0\0\0\0\0\0\0\0\0\x05");
/// # Ok::<(), agentwire::EncodeError>(())
/// ```
pub fn bulk_record_header(id: u32, record: &BulkRecord, limit: usize) -> Result<[u8; BULK_WIRE_HEADER], EncodeError> {
    record.check().map_err(bulk_refused)?;
    wire_header(id, record.header(), record.data.len(), limit)
}

/// [`bulk_record_header`] for a record whose data waits in a pipe.
#[cfg(unix)]
pub fn piped_record_header(
    id: u32,
    record: &crate::payload::bulk::PipedRecord,
    limit: usize,
) -> Result<[u8; BULK_WIRE_HEADER], EncodeError> {
    record.check().map_err(bulk_refused)?;
    wire_header(id, record.header(), record.data.len(), limit)
}

fn bulk_refused(e: crate::payload::bulk::BulkRecordError) -> EncodeError {
    EncodeError::Payload { message_type: "bulk.record", reason: e.to_string() }
}

/// The frame header and body header of a record of `data_len` bytes.
fn wire_header(
    id: u32,
    body_header: [u8; BULK_RECORD_HEADER_SIZE],
    data_len: usize,
    limit: usize,
) -> Result<[u8; BULK_WIRE_HEADER], EncodeError> {
    let body_len = BULK_RECORD_HEADER_SIZE + data_len;
    frame::check_body_len(body_len, limit)?;
    let mut header = [0; BULK_WIRE_HEADER];
    header[..FRAME_HEAD].copy_from_slice(&frame::header_bytes(body_len, id, Flags::BULK));
    header[FRAME_HEAD..].copy_from_slice(&body_header);
    Ok(header)
}

/// Size of everything before a bulk record's data on the wire.
pub const BULK_WIRE_HEADER: usize = FRAME_HEAD + BULK_RECORD_HEADER_SIZE;

/// Takes back what a failed encode wrote, and names the type in the error.
#[cold]
fn refuse(dst: &mut BytesMut, start: usize, type_name: &str, reason: String) -> EncodeError {
    dst.truncate(start);
    let message_type = MessageType::from_wire_name(type_name).map_or("an unknown type", |t| t.wire_name());
    EncodeError::Payload { message_type, reason }
}

/// A codec of [`RawMessage`]s: envelopes read, payloads left as bytes.
///
/// For relays and loggers that need the type but not the payload, and for
/// forwarding a newer peer's types unchanged. Frames whose body is not an
/// envelope, and oversized frames, are [`Rejected`] items.
#[derive(Debug, Default)]
pub struct RawMessageCodec {
    frames: FrameCodec,
}

impl RawMessageCodec {
    /// With the default [`FrameCodec`].
    pub fn new() -> RawMessageCodec {
        RawMessageCodec::default()
    }

    /// On a frame codec built with other limits.
    pub fn with_frame_codec(frames: FrameCodec) -> RawMessageCodec {
        RawMessageCodec { frames }
    }

    /// The frame codec underneath.
    pub fn frame_codec(&self) -> &FrameCodec {
        &self.frames
    }

    /// Stream offset of the frame most recently decoded.
    pub fn last_frame_offset(&self) -> u64 {
        self.frames.last_frame_offset()
    }

    /// Reads the envelope of a frame obtained elsewhere (a [`Rejected`] then has offset 0).
    pub fn decode_frame(&self, frame: Frame) -> Result<RawMessage, Rejected> {
        read_envelope(Ok(frame), 0)
    }
}

fn read_envelope(item: Result<Frame, OversizedFrame>, offset: u64) -> Result<RawMessage, Rejected> {
    let frame = item.map_err(Rejected::oversized)?;
    if frame.flags == Flags::BULK {
        // A raw record has no envelope: its whole body is the payload.
        return Ok(RawMessage {
            id: frame.id,
            flags: frame.flags,
            version: PROTOCOL_VERSION,
            type_name: TypeName::Known(MessageType::BulkRecord),
            payload: frame.body,
        });
    }
    let env = envelope::decode(&frame.body).map_err(|e| Rejected::malformed(offset, &frame, e))?;
    Ok(RawMessage {
        id: frame.id,
        flags: frame.flags,
        version: env.version,
        type_name: env.type_name,
        payload: env.payload.to_bytes(&frame.body),
    })
}

impl Decoder for RawMessageCodec {
    type Item = Result<RawMessage, Rejected>;
    type Error = StreamError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, StreamError> {
        Ok(self.frames.decode(src)?.map(|item| read_envelope(item, self.frames.last_frame_offset())))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, StreamError> {
        Ok(self.frames.decode_eof(src)?.map(|item| read_envelope(item, self.frames.last_frame_offset())))
    }
}

impl RawMessageCodec {
    /// Writes `m` without taking it: the payload bytes are copied once, into `dst`.
    pub fn encode_raw(&mut self, m: &RawMessage, dst: &mut BytesMut) -> Result<(), EncodeError> {
        if m.type_name == TypeName::Known(MessageType::BulkRecord) {
            let frame = Frame::new(m.id, Flags::BULK, m.payload.clone());
            return self.frames.encode_frame(&frame, dst);
        }
        let header = (m.id, m.flags, m.version);
        encode_frame(dst, self.frames.max_frame_len(), header, m.type_name.as_str(), Some(m.payload.len()), |dst| {
            dst.extend_from_slice(&m.payload);
            Ok(())
        })
    }
}

impl Encoder<RawMessage> for RawMessageCodec {
    type Error = EncodeError;

    fn encode(&mut self, m: RawMessage, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_raw(&m, dst)
    }
}

/// A codec of typed [`Message`]s, with the send gate of the negotiated generation.
///
/// ```
/// use agentwire::{Message, MessageCodec, payload::exec::ExecStdout};
/// use bytes::{Bytes, BytesMut};
/// use tokio_util::codec::{Decoder, Encoder};
///
/// let mut codec = MessageCodec::new();
/// let mut buf = BytesMut::new();
/// codec.encode(Message::new(4, ExecStdout { data: Bytes::from_static(b"hi\n") }), &mut buf)?;
/// let msg = codec.decode(&mut buf)?.unwrap()?;
/// assert_eq!(msg, Message::new(4, ExecStdout { data: Bytes::from_static(b"hi\n") }));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct MessageCodec {
    frames: FrameCodec,
    negotiated: u8,
}

impl Default for MessageCodec {
    fn default() -> Self {
        MessageCodec::new()
    }
}

impl MessageCodec {
    /// With the default [`FrameCodec`], speaking to a peer of the current generation.
    pub fn new() -> MessageCodec {
        MessageCodec::with_frame_codec(FrameCodec::new())
    }

    /// On a frame codec built with other limits.
    pub fn with_frame_codec(frames: FrameCodec) -> MessageCodec {
        MessageCodec { frames, negotiated: PROTOCOL_VERSION }
    }

    /// Records the peer's generation (from its `core.ready`, or the `v` of its
    /// frames); the codec then uses the lower of the two, both ways.
    ///
    /// ```
    /// use agentwire::{Message, MessageCodec, payload::tcp::TcpConnect};
    /// use tokio_util::codec::Encoder;
    /// let mut codec = MessageCodec::new();
    /// codec.set_peer_generation(3);
    /// let mut buf = bytes::BytesMut::new();
    /// let err = codec.encode(Message::new(1, TcpConnect::new("db", 5432)), &mut buf).unwrap_err();
    /// assert_eq!(err.to_string(), "the peer speaks generation 3; core.tcp.connect needs 4");
    /// assert!(buf.is_empty());
    /// ```
    pub fn set_peer_generation(&mut self, peer: u8) {
        self.negotiated = version::negotiate(PROTOCOL_VERSION, peer);
    }

    /// Negotiates from the peer's `core.ready`: its `v` is the peer's generation.
    /// Returns the generation now in use, or `None` (and changes nothing) when
    /// `ready` is not a `core.ready`.
    ///
    /// ```
    /// use agentwire::{Message, MessageCodec, payload::core::Ready};
    /// let mut codec = MessageCodec::new();
    /// let ready = Message::new(0, Ready::default()).with_version(5);
    /// assert_eq!(codec.negotiate_with(&ready), Some(5));
    /// ```
    pub fn negotiate_with(&mut self, ready: &Message) -> Option<u8> {
        if !matches!(ready.payload, crate::message::Payload::Ready(_)) {
            return None;
        }
        self.set_peer_generation(ready.version);
        Some(self.negotiated)
    }

    /// The generation in use with this peer.
    pub fn negotiated_generation(&self) -> u8 {
        self.negotiated
    }

    /// The frame codec underneath.
    pub fn frame_codec(&self) -> &FrameCodec {
        &self.frames
    }

    /// Decodes a frame obtained elsewhere (a [`Rejected`] then has offset 0).
    pub fn decode_frame(&self, frame: Frame) -> Result<Message, Rejected> {
        read_message(self.negotiated, frame, 0)
    }
}

/// Frame to message. The common case in one pass: a canonical envelope of a
/// known type with that type's flags, available at the negotiated generation,
/// and a payload that decodes, read where it lies in the read buffer (cut out
/// of it only for a type that keeps views of it); no intermediate envelope is
/// built. Anything else goes to [`read_message_in_full`], which gives the
/// answer, the same one for what the common case accepts.
#[inline(always)]
fn read_message(negotiated: u8, frame: impl ReadFrame, offset: u64) -> Result<Message, Rejected> {
    if frame.flags() == Flags::BULK {
        return read_bulk_record(negotiated, frame, offset);
    }
    let Some((version, message_type, payload)) = envelope::decode_known(frame.body()) else {
        return read_message_in_full(negotiated, frame, offset);
    };
    let (id, flags) = (frame.id(), frame.flags());
    if flags.known() != message_type.flags() || !message_type.is_available_at(negotiated) {
        return read_message_in_full(negotiated, frame, offset);
    }
    // The same two ways to a payload as `read_message_in_full`'s, kept apart:
    // here a failure only sends the frame on, and folding the two into one
    // helper that returns the frame with the error costs 26 instructions a
    // `core.ready` decode (3%, measured with benches/callgrind.sh).
    if message_type.holds_views() {
        let body = frame.into_body();
        return match message_type.decode_payload(&body.slice(payload)) {
            Ok(payload) => Ok(Message { id, flags, version, payload }),
            Err(_) => read_message_in_full(negotiated, Frame { id, flags, body }, offset),
        };
    }
    match message_type.decode_payload_slice(&frame.body()[payload]) {
        Ok(payload) => Ok(Message { id, flags, version, payload }),
        Err(_) => read_message_in_full(negotiated, frame, offset),
    }
}

/// A raw bulk record to a message: its data a view of the frame, its `version`
/// the negotiated generation (a record carries none). Refused below generation
/// 8, where no peer may send one; a body that breaks the layout (possible only
/// in a frame that did not come through a [`FrameCodec`]) is malformed.
fn read_bulk_record(negotiated: u8, frame: impl ReadFrame, offset: u64) -> Result<Message, Rejected> {
    let (id, flags) = (frame.id(), frame.flags());
    let message_type = MessageType::BulkRecord;
    if let Err(e) = version::check_available(message_type, negotiated) {
        let mut rejected = Rejected::new(offset, id, flags, RejectKind::UnsupportedProtocolGeneration, e.to_string());
        rejected.type_name = Some(TypeName::Known(message_type));
        return Err(rejected);
    }
    match message_type.decode_payload(&frame.into_body()) {
        Ok(payload) => Ok(Message { id, flags, version: negotiated, payload }),
        Err(e) => Err(Rejected::new(offset, id, flags, RejectKind::MalformedMessage, format!("bulk record: {e}"))),
    }
}

/// Frame to message in one go: envelope, type, flags, generation, payload.
/// Every way out but the last is a rejection, built out of line. The frame is
/// cut out of the read buffer only when the payload keeps views of it.
#[inline(never)]
fn read_message_in_full(negotiated: u8, frame: impl ReadFrame, offset: u64) -> Result<Message, Rejected> {
    let env = envelope::decode(frame.body()).map_err(|e| Rejected::malformed(offset, &frame, e))?;
    let message_type = match env.type_name {
        TypeName::Known(t) => t,
        TypeName::Unknown(ref name) => {
            let reason = format!("{name} is not a message type of generation {PROTOCOL_VERSION}");
            return Err(Rejected::of_envelope(offset, frame, env, RejectKind::UnsupportedMessageType, reason));
        }
    };
    let flags = frame.flags();
    if flags.known() != message_type.flags() {
        let reason = format!("flags {flags} on {message_type}, which carries {}", message_type.flags());
        return Err(Rejected::of_envelope(offset, frame, env, RejectKind::InvalidFlags, reason));
    }
    if let Err(e) = version::check_available(message_type, negotiated) {
        let kind = RejectKind::UnsupportedProtocolGeneration;
        return Err(Rejected::of_envelope(offset, frame, env, kind, e.to_string()));
    }
    let (id, version) = (frame.id(), env.version);
    let decoded = if message_type.holds_views() {
        let body = frame.into_body();
        let payload = env.payload.to_bytes(&body);
        message_type.decode_payload(&payload).map_err(|e| (e, Frame { id, flags, body }))
    } else {
        // Read in place; the frame is cut out only to keep a rejected payload.
        match message_type.decode_payload_slice(env.payload.slice(frame.body())) {
            Ok(payload) => Ok(payload),
            Err(e) => Err((e, Frame { id, flags, body: frame.into_body() })),
        }
    };
    match decoded {
        Ok(payload) => Ok(Message { id, flags, version, payload }),
        Err((e, frame)) => {
            let reason = format!("payload of {message_type}: {e}");
            Err(Rejected::of_envelope(offset, frame, env, RejectKind::InvalidPayload, reason))
        }
    }
}

impl Decoder for MessageCodec {
    type Item = Result<Message, Rejected>;
    type Error = StreamError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, StreamError> {
        let negotiated = self.negotiated;
        let read = |frame: BufferedFrame<'_>| {
            let offset = frame.offset();
            read_message(negotiated, frame, offset)
        };
        self.frames.decode_with(src, read, |skipped| Err(Rejected::oversized(skipped)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, StreamError> {
        let negotiated = self.negotiated;
        let read = |frame: BufferedFrame<'_>| {
            let offset = frame.offset();
            read_message(negotiated, frame, offset)
        };
        self.frames.decode_eof_with(src, read, |skipped| Err(Rejected::oversized(skipped)))
    }
}

impl MessageCodec {
    /// Writes `m` without taking it, in one pass into `dst`. A type above the
    /// negotiated generation or a frame above the limit writes nothing and is an error.
    pub fn encode_message(&mut self, m: &Message, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let message_type = m.message_type();
        version::check_available(message_type, self.negotiated)?;
        let limit = self.frames.max_frame_len();
        if let Payload::BulkRecord(record) = &m.payload {
            return encode_bulk_record(dst, limit, m.id, record);
        }
        let exact_len = m.payload.exact_encoded_len();
        encode_frame(dst, limit, (m.id, m.flags, m.version), message_type.wire_name(), exact_len, |dst| {
            m.payload.encode_at(m.version, dst)
        })
    }
}

impl MessageCodec {
    /// The bytes that precede a piped record's data on the wire
    /// ([`piped_record_header`]), refused below generation 8 as any record is.
    #[cfg(unix)]
    pub fn piped_record_header(
        &self,
        id: u32,
        record: &crate::payload::bulk::PipedRecord,
    ) -> Result<[u8; BULK_WIRE_HEADER], EncodeError> {
        version::check_available(MessageType::BulkRecord, self.negotiated)?;
        piped_record_header(id, record, self.frames.max_frame_len())
    }

    /// Writes `m` for a vectored write: everything up to its data into `dst`,
    /// and the data itself, when it is at least [`VECTORED_DATA_MIN`] bytes
    /// and ends the frame, returned as it is, to be written after `dst`'s new
    /// bytes. That is a bulk record's data and the `data` of the `{data: bytes}`
    /// payloads (`core.exec.stdin/stdout/stderr`, `core.fs.data`,
    /// `core.tcp.data`): sent this way, the data is never copied by the codec.
    /// Anything else is written whole into `dst`, as by
    /// [`MessageCodec::encode_message`], and `None` is returned.
    ///
    /// ```
    /// use agentwire::{Message, MessageCodec, payload::exec::ExecStdout};
    /// use bytes::{Bytes, BytesMut};
    /// let data = Bytes::from(vec![7u8; 64 * 1024]);
    /// let m = Message::new(3, ExecStdout { data: data.clone() });
    /// let (mut head, mut whole) = (BytesMut::new(), BytesMut::new());
    /// let tail = MessageCodec::new().encode_vectored(&m, &mut head)?.expect("large data is not copied");
    /// assert_eq!(tail.as_ptr(), data.as_ptr());
    /// MessageCodec::new().encode_message(&m, &mut whole)?;
    /// assert_eq!([&head[..], &tail[..]].concat(), whole);
    /// # Ok::<(), agentwire::EncodeError>(())
    /// ```
    pub fn encode_vectored(&mut self, m: &Message, dst: &mut BytesMut) -> Result<Option<Bytes>, EncodeError> {
        let data = match &m.payload {
            Payload::BulkRecord(record) => &record.data,
            Payload::ExecStdin(p) => &p.data,
            Payload::ExecStdout(p) => &p.data,
            Payload::ExecStderr(p) => &p.data,
            Payload::FsData(p) => &p.data,
            Payload::TcpData(p) => &p.data,
            _ => return self.encode_message(m, dst).map(|()| None),
        };
        if data.len() < VECTORED_DATA_MIN {
            return self.encode_message(m, dst).map(|()| None);
        }
        let message_type = m.message_type();
        version::check_available(message_type, self.negotiated)?;
        let limit = self.frames.max_frame_len();
        if let Payload::BulkRecord(record) = &m.payload {
            dst.put_slice(&bulk_record_header(m.id, record, limit)?);
            return Ok(Some(data.clone()));
        }
        put_data_frame_head(dst, (m.id, m.flags, m.version), message_type, data.len(), limit)?;
        Ok(Some(data.clone()))
    }

    /// Writes into `dst` everything of a `{data: bytes}` frame of type
    /// `message_type` (`core.exec.stdin/stdout/stderr`, `core.fs.data`,
    /// `core.tcp.data`) on `id` up to its `data_len` bytes of data, which
    /// the caller writes after them (as [`MessageCodec::encode_vectored`]
    /// splits a frame): for data that is not in memory, such as a pipe's
    /// ([`WriteQueue::push_piped_data`](crate::WriteQueue::push_piped_data)).
    /// Another type, or one above the negotiated generation, writes nothing
    /// and is an error.
    pub fn encode_data_head(
        &self,
        id: u32,
        message_type: MessageType,
        data_len: usize,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        use MessageType::{ExecStderr, ExecStdin, ExecStdout, FsData, TcpData};
        if !matches!(message_type, ExecStdin | ExecStdout | ExecStderr | FsData | TcpData) {
            let message_type = message_type.wire_name();
            return Err(EncodeError::Payload { message_type, reason: "not a {data: bytes} payload".into() });
        }
        version::check_available(message_type, self.negotiated)?;
        let (flags, limit) = (message_type.flags(), self.frames.max_frame_len());
        put_data_frame_head(dst, (id, flags, PROTOCOL_VERSION), message_type, data_len, limit)
    }
}

/// The head of a `{"data": h'…'}` frame with `data_len` bytes of data, as
/// the payload's own encoder writes it; nothing when the frame is too long.
fn put_data_frame_head(
    dst: &mut BytesMut,
    (id, flags, version): (u32, Flags, u8),
    message_type: MessageType,
    data_len: usize,
    limit: usize,
) -> Result<(), EncodeError> {
    let data_head = cbor::head_len(data_len as u64);
    let payload_len = DATA_KEY_PREFIX.len() + data_head + data_len;
    let type_name = message_type.wire_name();
    let body_len = envelope::body_len(version, type_name, payload_len);
    frame::check_body_len(body_len, limit)?;
    dst.reserve(FRAME_HEAD + body_len - data_len);
    frame::put_header(dst, body_len, id, flags);
    envelope::put_prefix(dst, version, type_name);
    cbor::put_head(dst, cbor::MAJOR_BYTES, payload_len as u64);
    dst.put_slice(DATA_KEY_PREFIX);
    cbor::put_head(dst, cbor::MAJOR_BYTES, data_len as u64);
    Ok(())
}

/// The smallest data [`MessageCodec::encode_vectored`] leaves where it is:
/// below it, copying costs less than one more slice for the kernel to walk.
pub const VECTORED_DATA_MIN: usize = 4096;

/// A one-entry map's head and the text key `data`.
const DATA_KEY_PREFIX: &[u8] = b"\xa1\x64data";

impl Encoder<Message> for MessageCodec {
    type Error = EncodeError;

    fn encode(&mut self, m: Message, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_message(&m, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::core::{Ping, Ready};
    use crate::payload::tcp::TcpConnect;

    fn wire(m: Message) -> BytesMut {
        let mut buf = BytesMut::new();
        MessageCodec::new().encode(m, &mut buf).unwrap();
        buf
    }

    #[test]
    fn receiving_a_type_above_the_negotiated_generation_is_rejected_and_the_stream_goes_on() {
        let mut codec = MessageCodec::new();
        assert_eq!(codec.negotiate_with(&Message::new(0, Ready::default()).with_version(3)), Some(3));
        assert_eq!(codec.negotiate_with(&Message::new(0, Ping {})), None);
        let mut buf = wire(Message::new(4, Ping {}));
        buf.extend_from_slice(&wire(Message::new(5, TcpConnect::new("h", 1))));
        buf.extend_from_slice(&wire(Message::new(6, Ready::default())));
        for (id, kind) in
            [(4, RejectKind::UnsupportedProtocolGeneration), (5, RejectKind::UnsupportedProtocolGeneration)]
        {
            let r = codec.decode(&mut buf).unwrap().unwrap().unwrap_err();
            assert_eq!((r.id, r.kind), (id, kind));
            assert!(r.reason.starts_with("the peer speaks generation 3;"), "{}", r.reason);
            assert_eq!(r.error_reply().payload.message_type(), crate::MessageType::Error);
        }
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().unwrap().id, 6);
    }

    #[test]
    fn a_rejected_payload_is_kept_whether_its_type_is_read_in_place_or_as_views() {
        // A core.ready (read in place) and a core.exec.stdout (views of the
        // frame) whose payloads do not decode, each followed by a good frame.
        let bad_payload = b"\xa1\x64data\x05";
        let mut buf = BytesMut::new();
        for t in [MessageType::Ready, MessageType::ExecStdout] {
            let body_len = envelope::body_len(7, t.wire_name(), bad_payload.len());
            frame::put_header(&mut buf, body_len, 3, t.flags());
            envelope::put_prefix(&mut buf, 7, t.wire_name());
            cbor::put_head(&mut buf, cbor::MAJOR_BYTES, bad_payload.len() as u64);
            buf.extend_from_slice(bad_payload);
            buf.extend_from_slice(&wire(Message::new(4, Ping {})));
        }
        let mut codec = MessageCodec::new();
        for t in [MessageType::Ready, MessageType::ExecStdout] {
            let r = codec.decode(&mut buf).unwrap().unwrap().unwrap_err();
            assert_eq!((r.id, r.kind, r.type_name), (3, RejectKind::InvalidPayload, Some(TypeName::Known(t))));
            assert_eq!(&r.payload[..], bad_payload);
            assert_eq!(codec.decode(&mut buf).unwrap().unwrap().unwrap(), Message::new(4, Ping {}));
        }
        assert!(buf.is_empty());
    }

    /// The one-pass path must give what the full path gives, for every frame: every golden and malformed vector, at the current and at an
    /// older negotiated generation, and each with its flags changed.
    #[test]
    fn the_one_pass_path_agrees_with_the_full_path() {
        let mut frames = Vec::new();
        for file in ["golden", "malformed"] {
            let path = format!("{}/tests/vectors/{file}.jsonl", env!("CARGO_MANIFEST_DIR"));
            for line in std::fs::read_to_string(path).unwrap().lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let hex = v["frame"].as_str().or(v["hex"].as_str()).unwrap();
                let bytes: Vec<u8> =
                    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
                let Ok(Some(Ok(frame))) = FrameCodec::new().decode(&mut BytesMut::from(&bytes[..])) else { continue };
                frames.push(Frame { flags: Flags::from_bits(frame.flags.bits() ^ 1), ..frame.clone() });
                frames.push(frame);
            }
        }
        assert!(frames.len() > 300, "{}", frames.len());
        let mut one_pass = 0;
        for frame in &frames {
            for negotiated in [PROTOCOL_VERSION, 3] {
                let full = read_message_in_full(negotiated, frame.clone(), 0);
                assert_eq!(read_message(negotiated, frame.clone(), 0), full, "{frame:?}");
                one_pass += usize::from(envelope::decode_known(&frame.body).is_some() && full.is_ok());
            }
        }
        assert!(one_pass > 200, "the common case was {one_pass} frames");
    }

    #[test]
    fn a_payload_that_encodes_to_other_than_its_size_is_refused_and_nothing_is_written() {
        let mut dst = BytesMut::from(&b"kept"[..]);
        let err = encode_frame(&mut dst, crate::MAX_FRAME_SIZE, (1, Flags::NONE, 7), "core.ping", Some(3), |d| {
            d.extend_from_slice(b"\xa0");
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("wrote 1 bytes but was sized at 3"), "{err}");
        assert_eq!(&dst[..], b"kept");
    }

    #[test]
    fn an_encoder_limit_below_the_frame_refuses_it() {
        let frames = FrameCodec::builder().max_frame_len(64).build();
        let mut codec = MessageCodec::with_frame_codec(frames);
        let mut dst = BytesMut::new();
        let big = crate::payload::exec::ExecStdout { data: Bytes::from(vec![0u8; 100]) };
        assert!(matches!(
            codec.encode(Message::new(1, big), &mut dst),
            Err(EncodeError::FrameTooLarge { limit: 64, .. })
        ));
        assert!(dst.is_empty());
    }
}
