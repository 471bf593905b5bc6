//! Payloads of the `core.*` control messages: handshake, clock, liveness, errors.

use serde::{Deserialize, Serialize};

use super::{open_enum, serde_payload};

/// `core.ready`: the guest agent is up. Its `v` tells the host the guest's generation.
///
/// ```
/// use agentwire::payload::core::Ready;
/// let ready = Ready { boot_time_ns: 1, init_time_ns: 2, ready_time_ns: 3, agent_version: String::new() };
/// assert_eq!(ready, Ready { ready_time_ns: 3, ..ready.clone() });
/// ```
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// `CLOCK_BOOTTIME` in ns when the agent started.
    pub boot_time_ns: u64,
    /// Nanoseconds spent mounting filesystems.
    pub init_time_ns: u64,
    /// `CLOCK_BOOTTIME` in ns just before sending.
    pub ready_time_ns: u64,
    /// The agent's product version, for diagnostics; empty when unknown (and then not written).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
}

/// `core.clock.sync`: the host's wall clock, for the guest to step to.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockSync {
    /// Host `CLOCK_REALTIME` in ns since the Unix epoch.
    pub unix_time_nanos: u64,
}

/// `core.init.resolved`: the guest's default user, as it resolved it.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitResolved {
    /// The user commands run as unless a request names another.
    pub default_user: ResolvedUser,
}

/// A resolved user.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// `core.init.ack`: the host accepts the guest's init report.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitAck {}

/// `core.shutdown`: power off. CBOR `null` on the wire; an empty payload is accepted too.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown;

/// `core.relay.client.disconnected`: a relay client left; its ids are free again.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayClientDisconnected {
    /// First id of the client's range.
    pub id_start: u32,
    /// One past the last id of the client's range.
    pub id_end_exclusive: u32,
}

/// `core.ping`: are you there?
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {}

/// `core.pong`: the answer to `core.ping`, on its id.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {}

/// `core.touch`: note activity (keeps an idle timer from firing).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touch {}

/// `core.touched`: the answer to `core.touch`.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touched {
    /// The guest's activity counter after the touch.
    pub activity_seq: u64,
}

/// `core.error`: a frame on this id could not be handled. Ends the id.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreError {
    /// What kind of problem.
    pub kind: CoreErrorKind,
    /// A readable explanation.
    pub message: String,
    /// The wire name of the frame's type, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offending_type: Option<String>,
}

open_enum! {
    /// Kinds of `core.error`.
    CoreErrorKind {
        /// The body is not a valid envelope.
        MalformedMessage = "malformed_message",
        /// The type is not known to the receiver.
        UnsupportedMessageType = "unsupported_message_type",
        /// The type is above the negotiated generation.
        UnsupportedProtocolGeneration = "unsupported_protocol_generation",
        /// The flags do not match the type.
        InvalidFlags = "invalid_flags",
        /// The payload does not decode as the type's payload.
        InvalidPayload = "invalid_payload",
        /// The id has no open session.
        InvalidSession = "invalid_session",
    }
}

// Ready has a hand-written path (payload::fast).
serde_payload!(ClockSync, InitResolved, InitAck, RelayClientDisconnected, Ping, Pong, Touch, Touched, CoreError);

impl super::CborPayload for Shutdown {
    fn decode_slice(p: &[u8]) -> Result<Self, super::PayloadError> {
        // Older senders wrote nothing at all.
        if p.is_empty() { Ok(Shutdown) } else { super::serde_decode(p) }
    }
}
