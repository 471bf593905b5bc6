//! Payloads of the `core.*` control messages: handshake, clock, liveness, errors.

use serde::{Deserialize, Serialize};

use super::exec::ExecLimits;
use super::{catch_all_enum, open_enum, serde_payload};

/// `core.ready`: the guest agent is up. Its `v` tells the host the guest's generation.
///
/// ```
/// use agentwire::payload::core::Ready;
/// let ready = Ready { boot_time_ns: 1, init_time_ns: 2, ready_time_ns: 3, ..Ready::default() };
/// assert_eq!(ready, Ready { ready_time_ns: 3, ..ready.clone() });
/// assert!(ready.capabilities().exec_limits.is_none());
/// ```
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "ReadyFields")]
pub struct Ready {
    /// `CLOCK_BOOTTIME` in ns when the agent started.
    pub boot_time_ns: u64,
    /// Nanoseconds spent mounting filesystems.
    pub init_time_ns: u64,
    /// `CLOCK_BOOTTIME` in ns just before sending.
    pub ready_time_ns: u64,
    /// The agent's product version, for diagnostics; empty when unknown (and then not written).
    pub agent_version: String,
    /// What a generation-8+ agent advertises; `None` when it advertises nothing
    /// (every generation-7 agent). Boxed, so that the common `core.ready` stays
    /// small and costs no allocation; never `Some` of an empty set (decoding
    /// gives `None` then, and [`Ready::set_capabilities`] keeps it so).
    #[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_capabilities))]
    pub capabilities: Option<Box<ReadyCapabilities>>,
}

impl Ready {
    /// The advertised capabilities (all absent for a generation-7 agent).
    pub fn capabilities(&self) -> &ReadyCapabilities {
        const NONE: &ReadyCapabilities = &ReadyCapabilities::NONE;
        self.capabilities.as_deref().unwrap_or(NONE)
    }

    /// Sets the capabilities, keeping `None` for an empty set.
    pub fn set_capabilities(&mut self, capabilities: ReadyCapabilities) {
        self.capabilities = (!capabilities.is_empty()).then(|| Box::new(capabilities));
    }
}

/// The optional capabilities of `core.ready` (generations 8 to 10), each left
/// out of the payload when absent.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyCapabilities {
    /// The dedicated bulk lane, when the agent bound one (spec 7.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk_transport: Option<BulkTransportReady>,
    /// Relay range leases the agent understands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_lease: Option<RelayLeaseReady>,
    /// Added by a local relay for its own clients; never sent by an agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_transport: Option<LocalTransportReady>,
    /// Generation 9: how the agent meters host input (2: section 9.1's transport credit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_transport_barrier_version: Option<u8>,
    /// Generation 10: the execution flow-control policy (spec section 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_limits: Option<ExecLimits>,
}

impl ReadyCapabilities {
    /// No capability at all.
    pub const NONE: ReadyCapabilities = ReadyCapabilities {
        bulk_transport: None,
        relay_lease: None,
        local_transport: None,
        workload_transport_barrier_version: None,
        exec_limits: None,
    };

    /// Whether nothing is advertised.
    pub fn is_empty(&self) -> bool {
        *self == ReadyCapabilities::NONE
    }
}

/// `core.ready` as it is on the wire: one flat map, capabilities included.
#[derive(Deserialize)]
struct ReadyFields {
    boot_time_ns: u64,
    init_time_ns: u64,
    ready_time_ns: u64,
    #[serde(default)]
    agent_version: String,
    #[serde(flatten)]
    capabilities: ReadyCapabilities,
}

impl From<ReadyFields> for Ready {
    fn from(f: ReadyFields) -> Ready {
        let mut ready = Ready {
            boot_time_ns: f.boot_time_ns,
            init_time_ns: f.init_time_ns,
            ready_time_ns: f.ready_time_ns,
            agent_version: f.agent_version,
            capabilities: None,
        };
        ready.set_capabilities(f.capabilities);
        ready
    }
}

/// Writes the flat map with a known entry count (serde's `flatten` would make
/// ciborium write an indefinite-length map, which is not canonical).
impl Serialize for Ready {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let c = self.capabilities();
        let present = [
            !self.agent_version.is_empty(),
            c.bulk_transport.is_some(),
            c.relay_lease.is_some(),
            c.local_transport.is_some(),
            c.workload_transport_barrier_version.is_some(),
            c.exec_limits.is_some(),
        ];
        let mut m = s.serialize_struct("Ready", 3 + present.iter().filter(|p| **p).count())?;
        m.serialize_field("boot_time_ns", &self.boot_time_ns)?;
        m.serialize_field("init_time_ns", &self.init_time_ns)?;
        m.serialize_field("ready_time_ns", &self.ready_time_ns)?;
        if !self.agent_version.is_empty() {
            m.serialize_field("agent_version", &self.agent_version)?;
        }
        if let Some(v) = &c.bulk_transport {
            m.serialize_field("bulk_transport", v)?;
        }
        if let Some(v) = &c.relay_lease {
            m.serialize_field("relay_lease", v)?;
        }
        if let Some(v) = &c.local_transport {
            m.serialize_field("local_transport", v)?;
        }
        if let Some(v) = &c.workload_transport_barrier_version {
            m.serialize_field("workload_transport_barrier_version", v)?;
        }
        if let Some(v) = &c.exec_limits {
            m.serialize_field("exec_limits", v)?;
        }
        m.end()
    }
}

#[cfg(feature = "arbitrary")]
fn arbitrary_capabilities(u: &mut arbitrary::Unstructured<'_>) -> arbitrary::Result<Option<Box<ReadyCapabilities>>> {
    let c: ReadyCapabilities = u.arbitrary()?;
    Ok((!c.is_empty()).then(|| Box::new(c)))
}

/// `Ready.bulk_transport`: the dedicated bulk lane the agent bound.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkTransportReady {
    /// `"dual-port-v1"`.
    pub profile: String,
    /// The lane's port name, `"agent-bulk"`.
    pub port: String,
    /// The identity both ends exchanged in the lane's hello.
    pub connection_id: [u8; 16],
}

/// `Ready.relay_lease`: relay range leases the agent understands.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayLeaseReady {
    /// The highest lease record format (1).
    pub max_format: u8,
}

/// `Ready.local_transport`: what a local relay adds for its clients.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalTransportReady {
    /// The highest format (1).
    pub max_format: u8,
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
pub struct InitAck {
    /// `true` acknowledges a startup failure (`core.error` `initialization_failed`);
    /// left out when false, which is the empty map of earlier generations.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failure: bool,
}

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
    /// The incarnation of the client's range lease, under leases (spec 7.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<[u8; 16]>,
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
    /// Why a startup failed, with kind `initialization_failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_failure: Option<InitFailureReason>,
    /// The attempt a failed freeze or thaw was (generation 9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_failure: Option<WorkloadFailure>,
}

impl CoreError {
    /// An error of `kind` with a message and nothing else.
    ///
    /// ```
    /// use agentwire::payload::core::{CoreError, CoreErrorKind};
    /// let e = CoreError::new(CoreErrorKind::InvalidSession, "no such id");
    /// assert_eq!((e.kind, e.offending_type), (CoreErrorKind::InvalidSession, None));
    /// ```
    pub fn new(kind: CoreErrorKind, message: impl Into<String>) -> CoreError {
        CoreError { kind, message: message.into(), offending_type: None, init_failure: None, workload_failure: None }
    }

    /// The same error naming the type of the frame it answers.
    pub fn with_offending_type(mut self, t: impl Into<String>) -> CoreError {
        self.offending_type = Some(t.into());
        self
    }
}

catch_all_enum! {
    /// Why a startup failed (`CoreError::init_failure`).
    ///
    /// ```
    /// use agentwire::payload::core::InitFailureReason;
    /// assert_eq!(InitFailureReason::from_wire("disk_full"), InitFailureReason::Other);
    /// assert_eq!(InitFailureReason::Other.as_str(), "unknown");
    /// ```
    InitFailureReason {
        /// The default user does not exist.
        UserNotFound = "user_not_found",
        /// Its group does not exist.
        GroupNotFound = "group_not_found",
    }
    catch_all
    /// Another cause (`unknown`), and any name this generation does not know.
    Other = "unknown"
}

/// The workload attempt a `core.error` is about (generation 9).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadFailure {
    /// The freeze or thaw attempt.
    pub attempt_id: String,
    /// What the caller may assume.
    pub disposition: WorkloadFailureDisposition,
}

catch_all_enum! {
    /// What a failed freeze or thaw leaves behind.
    WorkloadFailureDisposition {
        /// No freezer exists; nothing changed.
        Unavailable = "unavailable",
        /// A successful thaw is needed before the workload can be trusted to run.
        RecoveryRequired = "recovery_required",
    }
    catch_all
    /// Another state (`unknown`), and any name this generation does not know.
    Other = "unknown"
}

open_enum! {
    /// Kinds of `core.error`.
    CoreErrorKind {
        /// The guest could not start (startup `core.error` on id 0).
        InitializationFailed = "initialization_failed",
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
        /// The guest lacks what the request needs (a freezer, a growable root disk).
        CapabilityUnavailable = "capability_unavailable",
    }
}

// Ready has a hand-written path (payload::fast).
serde_payload!(ClockSync, InitResolved, InitAck, RelayClientDisconnected, Ping, Pong, Touch, Touched, CoreError);

impl super::CborPayload for Shutdown {
    fn decode_slice(p: &[u8]) -> Result<Self, super::PayloadError> {
        // Older senders wrote nothing at all.
        if p.is_empty() { Ok(Shutdown) } else { super::fast_decode(p) }
    }
}
