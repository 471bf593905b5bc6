//! Relays (spec section 6): many host clients share one guest connection.
//!
//! Each client owns a disjoint range of correlation ids, so the relay routes a
//! guest frame back by its id alone, without rewriting headers or reading bodies.

use std::ops::Range;

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::Decoder;

use crate::codec::{MessageCodec, Rejected};
use crate::frame::{EncodeError, FRAME_HEADER_SIZE, Frame, FrameCodec, LENGTH_FIELD_SIZE, MAX_FRAME_SIZE, StreamError};
use crate::message::Message;

/// The most clients one relay admits.
pub const AGENT_RELAY_MAX_CLIENTS: usize = 128;

/// Width of each client's id range: `u32::MAX / 128`.
pub const AGENT_RELAY_ID_RANGE_STEP: u32 = u32::MAX / AGENT_RELAY_MAX_CLIENTS as u32;

/// The ids client `client` (0-based) owns: `client * STEP + 1 .. (client + 1) * STEP`
/// (a multiple of the step is never assigned, so neither is id 0).
///
/// ```
/// use agentwire::relay::{client_id_range, client_for_id, AGENT_RELAY_ID_RANGE_STEP as STEP};
/// assert_eq!(client_id_range(1), Some(STEP + 1..2 * STEP));
/// assert_eq!(client_for_id(STEP + 5), Some(1));
/// assert_eq!(client_id_range(128), None);
/// ```
pub fn client_id_range(client: usize) -> Option<Range<u32>> {
    if client >= AGENT_RELAY_MAX_CLIENTS {
        return None;
    }
    // The slot's first id, a multiple of the step, is never assigned (id 0 for slot 0).
    let start = client as u32 * AGENT_RELAY_ID_RANGE_STEP;
    Some(start + 1..start + AGENT_RELAY_ID_RANGE_STEP)
}

/// The client that owns `id`, for routing a guest frame back; `None` for the
/// few ids above the last range.
pub fn client_for_id(id: u32) -> Option<usize> {
    let client = (id / AGENT_RELAY_ID_RANGE_STEP) as usize;
    (client < AGENT_RELAY_MAX_CLIENTS).then_some(client)
}

/// What a relay sends a newly connected client before any frame:
/// `[id_min: u32 BE][id_max: u32 BE]` and the cached `core.ready` frame.
///
/// ```
/// use agentwire::{Frame, Flags, relay::RelayHandshake};
/// use bytes::{Bytes, BytesMut};
///
/// let ready = Frame::new(0, Flags::NONE, Bytes::from_static(b"\xa0"));
/// let hs = RelayHandshake::for_client(0, ready).unwrap();
/// let mut buf = BytesMut::new();
/// hs.encode(&mut buf)?;
/// let back = RelayHandshake::decode(&mut buf)?.unwrap();
/// assert_eq!(back, hs);
/// assert_eq!(back.client_ids().start, 1); // id 0 is for control frames
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayHandshake {
    /// First id of the client's range.
    pub id_min: u32,
    /// End (exclusive) of the client's range.
    pub id_max: u32,
    /// The guest's `core.ready` frame, as the relay cached it.
    pub ready: Frame,
}

/// Size of the id-range prefix.
const PREFIX_LEN: usize = 8;

impl RelayHandshake {
    /// The handshake for client `client` (0-based), or `None` past the last client.
    pub fn for_client(client: usize, ready: Frame) -> Option<RelayHandshake> {
        let range = client_id_range(client)?;
        Some(RelayHandshake { id_min: range.start, id_max: range.end, ready })
    }

    /// The ids the client may use: `max(id_min, 1) .. id_max`.
    pub fn client_ids(&self) -> Range<u32> {
        self.id_min.max(1)..self.id_max
    }

    /// Appends the handshake to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let start = dst.len();
        dst.put_u32(self.id_min);
        dst.put_u32(self.id_max);
        FrameCodec::new().encode_frame(&self.ready, dst).inspect_err(|_| dst.truncate(start))
    }

    /// Takes a handshake off the front of `src` once it is complete; consumes
    /// nothing until then. A ready frame whose length is out of range loses the stream.
    pub fn decode(src: &mut BytesMut) -> Result<Option<RelayHandshake>, StreamError> {
        let header_end = PREFIX_LEN + LENGTH_FIELD_SIZE;
        if src.len() < header_end {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[8], src[9], src[10], src[11]]);
        let offset = PREFIX_LEN as u64;
        if (len as usize) < FRAME_HEADER_SIZE {
            return Err(StreamError::LengthBelowHeader { offset, len });
        }
        if len as usize > MAX_FRAME_SIZE {
            return Err(StreamError::FrameTooLarge { offset, len, limit: MAX_FRAME_SIZE });
        }
        let total = header_end + len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let id_min = src.get_u32();
        let id_max = src.get_u32();
        match FrameCodec::new().decode(src)? {
            Some(Ok(ready)) => Ok(Some(RelayHandshake { id_min, id_max, ready })),
            // The length was checked and the bytes are all present.
            _ => Err(StreamError::Truncated {
                offset,
                received: (total - PREFIX_LEN) as u64,
                expected: Some(total as u64),
            }),
        }
    }

    /// The cached ready frame, decoded.
    pub fn ready_message(&self) -> Result<Message, Rejected> {
        MessageCodec::new().decode_frame(self.ready.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_disjoint_and_cover_clients() {
        assert_eq!(AGENT_RELAY_ID_RANGE_STEP, 33_554_431);
        let last = client_id_range(AGENT_RELAY_MAX_CLIENTS - 1).unwrap();
        assert_eq!(last.end, 128 * 33_554_431);
        for k in [0, 1, 63, 127] {
            let r = client_id_range(k).unwrap();
            assert_eq!(client_for_id(r.start), Some(k));
            assert_eq!(client_for_id(r.end - 1), Some(k));
        }
        assert_eq!(client_for_id(u32::MAX), None);
    }

    #[test]
    fn handshake_waits_for_all_bytes_and_checks_the_length() {
        let hs = RelayHandshake::for_client(3, Frame::new(0, crate::Flags::NONE, bytes::Bytes::from_static(b"xyz")))
            .unwrap();
        let mut wire = BytesMut::new();
        hs.encode(&mut wire).unwrap();
        for cut in 0..wire.len() {
            let mut part = BytesMut::from(&wire[..cut]);
            assert_eq!(RelayHandshake::decode(&mut part).unwrap(), None);
            assert_eq!(part.len(), cut, "nothing consumed");
        }
        let mut bad = BytesMut::from(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2][..]);
        assert!(matches!(RelayHandshake::decode(&mut bad), Err(StreamError::LengthBelowHeader { offset: 8, len: 2 })));
    }
}
