//! What file and TCP transfers share when their data goes as raw bulk
//! records (generation 8, spec section 7). The rules themselves (offers,
//! acceptances, credit, finish) are [`agentwire_session::bulk`]'s; this is
//! how the client tells the agent and the application when one is broken.

use agentwire::payload::bulk::{BulkCancel, BulkCancelReason, BulkKind};
use agentwire_session::bulk::BulkViolation;

use crate::client::Session;

/// A cancel reason in words.
pub(crate) fn reason(r: BulkCancelReason) -> &'static str {
    match r {
        BulkCancelReason::CallerCancelled => "cancelled by the caller",
        BulkCancelReason::DestinationIo => "destination I/O failed",
        BulkCancelReason::ResourceLimit => "resource limit",
        BulkCancelReason::TransportFailure => "transport failure",
        BulkCancelReason::ProtocolViolation => "protocol state violated",
    }
}

/// What the agent's `core.bulk.cancel` says, for an error.
pub(crate) fn cancelled(c: &BulkCancel) -> String {
    format!("the agent cancelled the bulk transfer (core.bulk.cancel, {}): {}", reason(c.reason), c.message)
}

/// Sends `core.bulk.cancel` on the operation, best effort: the operation
/// fails whether or not it gets out.
pub(crate) async fn cancel(s: &Session, kind: BulkKind, reason: BulkCancelReason, message: String) {
    if let Err(e) = s.send(BulkCancel { kind, reason, message }).await {
        tracing::debug!(id = s.id(), "core.bulk.cancel could not be sent: {e}");
    }
}

/// The agent broke a bulk rule: unless its frame ended the operation
/// (`terminal`), `core.bulk.cancel` (reason 5, protocol state violated) goes
/// out; what to tell the application.
pub(crate) async fn violated(s: &Session, v: BulkViolation, terminal: bool) -> String {
    let message = format!("the agent broke the bulk rules: {v}");
    if terminal {
        return message;
    }
    cancel(s, v.kind, BulkCancelReason::ProtocolViolation, message.clone()).await;
    format!("{message}; the transfer was cancelled")
}
