//! Generation 8: raw bulk records and the `core.bulk.*` payloads that
//! negotiate, meter, finish and cancel them (spec section 7).
//!
//! A bulk record is a frame with the [`BULK`](crate::Flags::BULK) flag whose
//! body is a fixed 12-byte binary header and opaque data, never CBOR:
//!
//! | body offset | size | field |
//! |---|---|---|
//! | 0 | 1 | [`BulkKind`] |
//! | 1 | 1 | [`BulkFlow`] |
//! | 2 | 2 | reserved, zero |
//! | 4 | 8 | `offset`, u64 BE: where the data starts in its flow |
//! | 12 | n | data, `1 <= n <=` [`MAX_BULK_RECORD_PAYLOAD`] |
//!
//! The frame decoder checks every rule of that layout before a record leaves
//! it (a record that breaks one loses the stream), so a decoded
//! [`BulkRecord`] is always well formed.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::{CborPayload, PayloadError, serde_payload};

/// Size of a bulk record's body header (kind, flow, reserved, offset).
pub const BULK_RECORD_HEADER_SIZE: usize = 12;

/// The smallest `len` of a bulk record frame: header, body header and one data byte.
pub const MIN_BULK_RECORD_LEN: usize = crate::FRAME_HEADER_SIZE + BULK_RECORD_HEADER_SIZE + 1;

/// The most data one record may carry (3 MiB).
pub const MAX_BULK_RECORD_PAYLOAD: usize = 3 * 1024 * 1024;

/// The least per-record maximum a negotiation may settle on.
pub const MIN_BULK_RECORD_PAYLOAD: usize = 16 * 1024;

/// The per-record maximum the reference agent allows for TCP.
pub const DEFAULT_TCP_BULK_RECORD_PAYLOAD: usize = 256 * 1024;

/// The per-record maximum the reference agent allows for files.
pub const DEFAULT_FS_BULK_RECORD_PAYLOAD: usize = MAX_BULK_RECORD_PAYLOAD;

/// The only record format (`format` in offers and acceptances).
pub const BULK_RECORD_FORMAT: u8 = 1;

/// The credit window a receiver grants ahead of what it consumed (8 MiB).
pub const DEFAULT_BULK_WINDOW: u64 = 8 * 1024 * 1024;

/// The largest credit a receiver may grant ahead of what it consumed (32 MiB).
pub const MAX_BULK_WINDOW: u64 = 32 * 1024 * 1024;

/// Flow mask bit of [`BulkAccepted::flows`]: host → guest.
pub const FLOW_HOST_TO_GUEST: u8 = 0x01;

/// Flow mask bit of [`BulkAccepted::flows`]: guest → host.
pub const FLOW_GUEST_TO_HOST: u8 = 0x02;

/// Defines an enum that is a CBOR unsigned integer on the wire; any other
/// value is a decode error (spec section 4, *integer enum*).
macro_rules! int_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $value:literal, )* }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        #[repr(u8)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )*
        }

        impl $name {
            /// Every value, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The wire integer.
            pub const fn to_wire(self) -> u8 {
                self as u8
            }

            /// The value with this wire integer, if there is one.
            pub const fn from_wire(v: u8) -> Option<$name> {
                match v {
                    $( $value => Some($name::$variant), )*
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_u8(self.to_wire())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let v = u64::deserialize(d)?;
                u8::try_from(v).ok().and_then($name::from_wire).ok_or_else(|| {
                    serde::de::Error::custom(format_args!(concat!("{} is not a ", stringify!($name)), v))
                })
            }
        }
    };
}

int_enum! {
    /// What a bulk correlation carries.
    BulkKind {
        /// File data (`core.fs.request` `Read` or `Write`).
        Filesystem = 1,
        /// Socket data (`core.tcp.connect`).
        Tcp = 2,
    }
}

int_enum! {
    /// Which way a bulk flow goes.
    BulkFlow {
        /// Host to guest.
        HostToGuest = 1,
        /// Guest to host.
        GuestToHost = 2,
    }
}

impl BulkFlow {
    /// This flow's bit in [`BulkAccepted::flows`].
    pub const fn mask(self) -> u8 {
        match self {
            BulkFlow::HostToGuest => FLOW_HOST_TO_GUEST,
            BulkFlow::GuestToHost => FLOW_GUEST_TO_HOST,
        }
    }
}

int_enum! {
    /// Why a bulk correlation was cancelled.
    BulkCancelReason {
        /// The caller asked.
        CallerCancelled = 1,
        /// Writing to the file or socket failed.
        DestinationIo = 2,
        /// A resource limit was reached.
        ResourceLimit = 3,
        /// The transport (the dedicated bulk lane) failed.
        TransportFailure = 4,
        /// The peer broke the bulk rules.
        ProtocolViolation = 5,
    }
}

/// What a host offers in `core.fs.request` (`Read`/`Write`) or `core.tcp.connect`
/// to move the operation's data as raw records.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkOffer {
    /// Record format; [`BULK_RECORD_FORMAT`].
    pub format: u8,
    /// The largest record the host wants, within
    /// [`MIN_BULK_RECORD_PAYLOAD`]`..=`[`MAX_BULK_RECORD_PAYLOAD`].
    pub max_record_payload: u32,
    /// The guest → host credit the host grants up front (nonzero for a read
    /// and TCP, zero for a write).
    pub guest_to_host_credit_limit: u64,
}

/// `core.bulk.accepted`: the guest takes the offer, with the flows and credits it grants.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkAccepted {
    /// What the correlation carries.
    pub kind: BulkKind,
    /// The enabled flows ([`FLOW_HOST_TO_GUEST`], [`FLOW_GUEST_TO_HOST`]).
    pub flows: u8,
    /// Record format, echoed.
    pub format: u8,
    /// The largest record either side sends.
    pub max_record_payload: u32,
    /// The host → guest credit limit the guest grants.
    pub host_to_guest_credit_limit: u64,
    /// The guest → host credit limit, echoed from the offer.
    pub guest_to_host_credit_limit: u64,
}

/// `core.bulk.credit`: the receiver of a flow moves its credit limit (absolute offsets).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkCredit {
    /// What the correlation carries.
    pub kind: BulkKind,
    /// The flow the credit is for.
    pub flow: BulkFlow,
    /// Bytes of the flow the receiver has handed on.
    pub consumed_offset: u64,
    /// The exclusive offset the sender's records may not pass.
    pub credit_limit: u64,
}

/// `core.bulk.finish`: a flow is complete.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkFinish {
    /// What the correlation carries.
    pub kind: BulkKind,
    /// The flow that ends.
    pub flow: BulkFlow,
    /// The number of bytes sent in the flow.
    pub final_offset: u64,
}

/// `core.bulk.cancel`: stop the whole correlation.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkCancel {
    /// What the correlation carries.
    pub kind: BulkKind,
    /// Why.
    pub reason: BulkCancelReason,
    /// A readable explanation.
    pub message: String,
}

serde_payload!(BulkAccepted, BulkCredit, BulkFinish, BulkCancel);

/// A raw bulk record: the body of a frame with the `BULK` flag. It has no
/// envelope and no `v`; its data is decoded as a view of the frame.
///
/// Renders (JSON, the vectors' `payload`) as `{"kind", "flow", "offset", "data"}`
/// with the wire integers.
///
/// ```
/// use agentwire::payload::{CborPayload, bulk::{BulkFlow, BulkKind, BulkRecord}};
/// let record = BulkRecord::new(BulkKind::Filesystem, BulkFlow::GuestToHost, 0, bytes::Bytes::from_static(b"hi"));
/// let mut body = bytes::BytesMut::new();
/// record.encode(&mut body)?;
/// assert_eq!(&body[..], b"\x01\x02\0\0\0\0\0\0\0\0\0\0hi");
/// assert_eq!(BulkRecord::decode(&body.freeze())?, record);
/// # Ok::<(), agentwire::payload::PayloadError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkRecord {
    /// What the correlation carries.
    pub kind: BulkKind,
    /// Which way the record goes.
    pub flow: BulkFlow,
    /// Offset of the first data byte in its flow.
    pub offset: u64,
    /// The data; 1 to [`MAX_BULK_RECORD_PAYLOAD`] bytes on the wire.
    pub data: Bytes,
}

impl BulkRecord {
    /// A record of `data` at `offset` in its flow.
    pub fn new(kind: BulkKind, flow: BulkFlow, offset: u64, data: Bytes) -> BulkRecord {
        BulkRecord { kind, flow, offset, data }
    }

    /// The 12-byte body header that precedes the data: with the frame header,
    /// everything a vectored write needs besides the data itself.
    pub fn header(&self) -> [u8; BULK_RECORD_HEADER_SIZE] {
        record_header(self.kind, self.flow, self.offset)
    }

    /// The offset just past this record's data.
    pub fn end_offset(&self) -> Option<u64> {
        self.offset.checked_add(self.data.len() as u64)
    }

    /// Checks the rules of the layout that a writer can break: 1 to
    /// [`MAX_BULK_RECORD_PAYLOAD`] bytes of data, and an end offset that fits.
    pub fn check(&self) -> Result<(), BulkRecordError> {
        check_data(self.data.len(), self.offset)
    }
}

/// A bulk record whose data is not in memory but waits in a pipe
/// ([`PipedData`](crate::PipedData)), for a writer that moves it on with `splice`
/// ([`WriteQueue::push_piped`](crate::WriteQueue::push_piped)): on the wire
/// it is the same record as a [`BulkRecord`] of those bytes.
#[cfg(unix)]
#[derive(Debug)]
pub struct PipedRecord {
    /// What the correlation carries.
    pub kind: BulkKind,
    /// Which way the record goes.
    pub flow: BulkFlow,
    /// Offset of the first data byte in its flow.
    pub offset: u64,
    /// The data, 1 to [`MAX_BULK_RECORD_PAYLOAD`] bytes.
    pub data: crate::write::PipedData,
}

#[cfg(unix)]
impl PipedRecord {
    /// The 12-byte body header, as [`BulkRecord::header`].
    pub fn header(&self) -> [u8; BULK_RECORD_HEADER_SIZE] {
        record_header(self.kind, self.flow, self.offset)
    }

    /// Checks the layout's rules, as [`BulkRecord::check`].
    pub fn check(&self) -> Result<(), BulkRecordError> {
        check_data(self.data.len(), self.offset)
    }
}

fn record_header(kind: BulkKind, flow: BulkFlow, offset: u64) -> [u8; BULK_RECORD_HEADER_SIZE] {
    let o = offset.to_be_bytes();
    [kind.to_wire(), flow.to_wire(), 0, 0, o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]]
}

/// A bulk record body that breaks the layout (spec section 7.1). On the wire
/// that loses the stream; in [`BulkRecord::check`] it refuses one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BulkRecordError {
    /// `BULK` together with another flag bit.
    #[error("flags {0:#04x}: BULK (0x08) must stand alone")]
    MixedFlags(u8),
    /// Fewer bytes than the header and one data byte.
    #[error("length {0} is below the {MIN_BULK_RECORD_LEN} of a record with one data byte")]
    TooShort(usize),
    /// More data than one record may carry.
    #[error("{0} bytes of data exceed the record limit of {MAX_BULK_RECORD_PAYLOAD}")]
    TooLong(usize),
    /// The reserved bytes are not zero.
    #[error("reserved bytes {0:#06x} are not zero")]
    Reserved(u16),
    /// An unknown kind.
    #[error("kind {0} is neither 1 (filesystem) nor 2 (tcp)")]
    Kind(u8),
    /// An unknown flow.
    #[error("flow {0} is neither 1 (host to guest) nor 2 (guest to host)")]
    Flow(u8),
    /// `offset + n` does not fit in 64 bits.
    #[error("offset {0} plus the data passes 2^64 - 1")]
    OffsetOverflow(u64),
}

/// The checks of a record's frame header alone: flags and `len` (which
/// counts the 5-byte frame header), made before any body byte is buffered.
pub(crate) fn check_frame_header(len: usize, flags: u8) -> Result<(), BulkRecordError> {
    if flags != crate::Flags::BULK.bits() {
        return Err(BulkRecordError::MixedFlags(flags));
    }
    if len < MIN_BULK_RECORD_LEN {
        return Err(BulkRecordError::TooShort(len));
    }
    let data = len - crate::FRAME_HEADER_SIZE - BULK_RECORD_HEADER_SIZE;
    if data > MAX_BULK_RECORD_PAYLOAD {
        return Err(BulkRecordError::TooLong(data));
    }
    Ok(())
}

fn check_data(n: usize, offset: u64) -> Result<(), BulkRecordError> {
    if n == 0 {
        return Err(BulkRecordError::TooShort(crate::FRAME_HEADER_SIZE + BULK_RECORD_HEADER_SIZE));
    }
    if n > MAX_BULK_RECORD_PAYLOAD {
        return Err(BulkRecordError::TooLong(n));
    }
    offset.checked_add(n as u64).map(drop).ok_or(BulkRecordError::OffsetOverflow(offset))
}

/// Reads a record body: kind, flow, offset and the data's place in `body`.
pub(crate) fn parse_body(body: &[u8]) -> Result<(BulkKind, BulkFlow, u64, usize), BulkRecordError> {
    let Some((head, data)) = body.split_first_chunk::<BULK_RECORD_HEADER_SIZE>() else {
        return Err(BulkRecordError::TooShort(crate::FRAME_HEADER_SIZE + body.len()));
    };
    let reserved = u16::from_be_bytes([head[2], head[3]]);
    if reserved != 0 {
        return Err(BulkRecordError::Reserved(reserved));
    }
    let kind = BulkKind::from_wire(head[0]).ok_or(BulkRecordError::Kind(head[0]))?;
    let flow = BulkFlow::from_wire(head[1]).ok_or(BulkRecordError::Flow(head[1]))?;
    let offset = u64::from_be_bytes([head[4], head[5], head[6], head[7], head[8], head[9], head[10], head[11]]);
    check_data(data.len(), offset)?;
    Ok((kind, flow, offset, BULK_RECORD_HEADER_SIZE))
}

impl CborPayload for BulkRecord {
    fn exact_encoded_len(&self) -> Option<usize> {
        Some(BULK_RECORD_HEADER_SIZE + self.data.len())
    }

    /// Writes the body header and the data (one copy; the codec's vectored
    /// path writes the data from where it is instead).
    fn encode(&self, dst: &mut BytesMut) -> Result<(), PayloadError> {
        self.check().map_err(|e| PayloadError { offset: None, reason: e.to_string() })?;
        dst.reserve(BULK_RECORD_HEADER_SIZE + self.data.len());
        dst.put_slice(&self.header());
        dst.put_slice(&self.data);
        Ok(())
    }

    const HOLDS_VIEWS: bool = true;

    fn decode(p: &Bytes) -> Result<Self, PayloadError> {
        let (kind, flow, offset, at) =
            parse_body(p).map_err(|e| PayloadError { offset: Some(0), reason: e.to_string() })?;
        Ok(BulkRecord { kind, flow, offset, data: p.slice(at..) })
    }

    fn decode_slice(p: &[u8]) -> Result<Self, PayloadError> {
        let (kind, flow, offset, at) =
            parse_body(p).map_err(|e| PayloadError { offset: Some(0), reason: e.to_string() })?;
        Ok(BulkRecord { kind, flow, offset, data: Bytes::copy_from_slice(&p[at..]) })
    }
}

/// A record the codec accepts: 1 to 64 bytes at an offset that leaves room for them.
#[cfg(feature = "arbitrary")]
impl<'a> arbitrary::Arbitrary<'a> for BulkRecord {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = u.int_in_range(1..=64usize)?;
        let data = Bytes::from(u.bytes(n).map(<[u8]>::to_vec).unwrap_or_else(|_| vec![0; n]));
        let offset = u.int_in_range(0..=u64::MAX - 64)?;
        Ok(BulkRecord { kind: u.arbitrary()?, flow: u.arbitrary()?, offset, data })
    }
}
