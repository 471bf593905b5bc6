//! # agentwire
//!
//! The wire codec of the protocol a microVM host and the agent inside its guest
//! speak over one byte stream (virtio-vsock, virtio-console, a Unix socket):
//! generation 7, byte-compatible with the deployed implementation, and able to
//! talk to peers back to generation 3.
//!
//! Layers, each usable on its own:
//!
//! - [`frame`]: `[len: u32 BE][id: u32 BE][flags: u8][body]`. [`FrameCodec`] never
//!   looks at a body, so relays route on [`Frame::id`] and [`Frame::flags`].
//! - envelope and [`message`] types: the body is the CBOR map `{v, t, p}`;
//!   [`MessageType`] is the table of the 32 types. [`RawMessageCodec`] reads the
//!   envelope and leaves the payload as bytes.
//! - [`payload`]: the payload types by family, with serde derives that give
//!   exactly the wire encoding. [`MessageCodec`] decodes them into [`Payload`].
//! - [`version`]: generations, negotiation and the send gate.
//! - [`relay`]: id ranges and the relay handshake.
//!
//! ```
//! use agentwire::{Message, MessageCodec, Payload, payload::core::Ping};
//! use bytes::BytesMut;
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let mut codec = MessageCodec::new();
//! let mut wire = BytesMut::new();
//! codec.encode(Message::new(5, Ping {}), &mut wire)?;
//! match codec.decode(&mut wire)? {
//!     Some(Ok(Message { id: 5, payload: Payload::Ping(_), .. })) => {}
//!     other => panic!("{other:?}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Per-frame problems (a body that is not an envelope, an unknown type, flags
//! that disagree with the type, a payload that does not decode, a frame above
//! the size limit) are decoded *items* of type [`Rejected`], so a
//! `tokio_util::codec::FramedRead` keeps going; only faults that lose the stream
//! are [`StreamError`]s.
//!
//! ## Limits
//!
//! - A frame's `len` is at most [`MAX_FRAME_SIZE`] (configurable lower with
//!   [`FrameCodec::builder`]). An oversized frame is skipped as it arrives and
//!   reported. The read buffer grows with the bytes that arrive: a header
//!   that claims 4 MiB and a body that trickles in hold what arrived plus at
//!   most 64 KiB.
//! - Payloads nest at most [`MAX_NESTING_DEPTH`] levels; deeper input is
//!   rejected by a reader that does not recurse.
//! - Every length and item count in the CBOR is compared with the bytes present
//!   before anything is sized by it.
//! - One connection's decoder holds at most one frame: `4 + limit` bytes of read
//!   buffer plus what the transport delivered in one read.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cbor;
pub mod codec;
mod envelope;
pub mod frame;
pub mod message;
pub mod payload;
pub mod relay;
pub mod version;
pub mod write;

pub use cbor::MAX_NESTING_DEPTH;
pub use codec::{MessageCodec, RawMessageCodec, RejectKind, Rejected};
pub use frame::{
    EncodeError, FRAME_HEADER_SIZE, Flags, Frame, FrameCodec, FrameCodecBuilder, LENGTH_FIELD_SIZE, MAX_FRAME_SIZE,
    OversizedFrame, StreamError,
};
pub use message::{Direction, Message, MessageType, Payload, RawMessage, TypeName, TypedPayload};
pub use payload::fs::FS_CHUNK_SIZE;
pub use version::PROTOCOL_VERSION;
#[cfg(unix)]
pub use write::PipedData;
pub use write::{MessageSink, WriteQueue};
