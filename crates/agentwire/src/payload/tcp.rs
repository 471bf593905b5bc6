//! Payloads of `core.tcp.*`: a TCP connection opened by the guest for the host.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::bulk::BulkOffer;
use super::serde_payload;

/// `core.tcp.connect`: open a connection from inside the guest. Starts a session.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnect {
    /// Host name or address, as the guest resolves it.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Generation 8: move the connection's data as raw bulk records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk: Option<BulkOffer>,
}

impl TcpConnect {
    /// A connection to `host:port` without a bulk offer.
    pub fn new(host: impl Into<String>, port: u16) -> TcpConnect {
        TcpConnect { host: host.into(), port, bulk: None }
    }
}

/// `core.tcp.connected`: the connection is open.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnected {}

/// `core.tcp.data`: bytes of the connection, either way.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpData {
    /// The bytes; decoded as a view of the frame, not a copy.
    #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::payload::arbitrary_bytes))]
    pub data: Bytes,
}

/// `core.tcp.eof`: this side will send no more (half close).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpEof {}

/// `core.tcp.close`: the host asks to close the connection.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpClose {}

/// `core.tcp.closed`: the connection is closed. Ends the session.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpClosed {}

/// `core.tcp.failed`: the connection could not be opened or broke. Ends the session.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpFailed {
    /// What went wrong.
    pub error: String,
}

// TcpData has a hand-written path (payload::fast).
serde_payload!(TcpConnect, TcpConnected, TcpEof, TcpClose, TcpClosed, TcpFailed);
