//! # agentwire-session
//!
//! The session rules of the agent wire protocol as a sans-IO state machine,
//! shaped like `quinn-proto`: a [`Connection`] is fed bytes and time, and
//! hands out [`Event`]s and bytes to write. It owns what both a host and an
//! agent must get right and neither should write twice:
//!
//! - the connection lifecycle of either [`Role`] as the deployed peers run it:
//!   `core.bootstrap` → `core.init.resolved` → `core.init.ack` → `core.ready`
//!   (or a relay's prologue), with a time limit;
//! - the negotiated generation, used by the decoder and by every send;
//! - ids ([`IdAllocator`], relay ranges included) and the table of open
//!   sessions: opened by SESSION_START, closed by the TERMINAL frame;
//! - direction and flag rules, and the answers owed without the application:
//!   `core.pong`, `core.touched`, `core.error` for a frame that cannot be used,
//!   the deployed agent's replies to input on an unknown id;
//! - byte accounting of what each session has buffered in the application,
//!   so that a driver reads no faster than the application consumes
//!   ([`Connection::wants_input`]);
//! - a host's metering of what it writes against the transport credit of an
//!   agent that grants it (generation 9, [`meter::InputMeter`]).
//!
//! With the `tokio` feature, [`driver`] runs a connection over any tokio
//! byte stream; the async host client (`agentwire-client`) and the agent's
//! services (`agentwire-agent`) are built on it.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bulk;
mod connection;
#[cfg(feature = "tokio")]
pub mod driver;
pub mod ids;
pub mod meter;
pub mod table;

pub use connection::{Config, Connection, ConnectionError, Event, Phase, Role, SendError};
pub use ids::IdAllocator;
pub use table::{Family, SessionTable};

#[cfg(test)]
mod tests;
