//! Generations (spec section 5): the one version number, negotiation, the
//! send gate, and the surface of each generation as a schema snapshot.

use std::fmt::Write as _;

use crate::frame::{FRAME_HEADER_SIZE, Flags, LENGTH_FIELD_SIZE, MAX_FRAME_SIZE};
use crate::message::MessageType;

/// The generation this crate speaks.
pub const PROTOCOL_VERSION: u8 = 10;

/// The oldest generation whose peers this crate is tested against (with the
/// reference implementation's generation-3 frames).
pub const OLDEST_TESTED_GENERATION: u8 = 3;

/// The generation both sides use: the lower of the two.
///
/// ```
/// use agentwire::version::negotiate;
/// assert_eq!(negotiate(10, 3), 3);
/// assert_eq!(negotiate(7, 9), 7);
/// ```
pub const fn negotiate(own: u8, peer: u8) -> u8 {
    if own < peer { own } else { peer }
}

/// A type was about to be sent to a peer whose generation does not have it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the peer speaks generation {peer}; {message_type} needs {needs}")]
pub struct GenerationError {
    /// The refused type.
    pub message_type: MessageType,
    /// The generation that introduced it.
    pub needs: u8,
    /// The negotiated generation.
    pub peer: u8,
}

/// Refuses a type above the negotiated generation. Both directions use this predicate.
///
/// ```
/// use agentwire::{MessageType, version::check_available};
/// let err = check_available(MessageType::TcpConnect, 3).unwrap_err();
/// assert_eq!(err.to_string(), "the peer speaks generation 3; core.tcp.connect needs 4");
/// assert!(check_available(MessageType::ExecRequest, 3).is_ok());
/// ```
pub fn check_available(message_type: MessageType, negotiated: u8) -> Result<(), GenerationError> {
    if message_type.is_available_at(negotiated) {
        Ok(())
    } else {
        Err(GenerationError { message_type, needs: message_type.generation(), peer: negotiated })
    }
}

/// The surface of generation `generation` as deterministic JSON: the generation
/// number, the frame constants, the flag bits, and every wire name the
/// generation has with the generation that introduced it and its flags,
/// sorted by name. `schema/gen-N.json` holds these snapshots; a generation's
/// surface only ever grows.
///
/// ```
/// let json = agentwire::version::surface_json(3);
/// assert!(json.contains("\"core.exec.request\""));
/// assert!(!json.contains("core.tcp.connect"));
/// ```
pub fn surface_json(generation: u8) -> String {
    use crate::payload::bulk;
    let mut types: Vec<MessageType> =
        MessageType::ALL.into_iter().filter(|t| t.is_available_at(generation) && t.has_envelope()).collect();
    types.sort_by_key(|t| t.wire_name());
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "{{\n  \"generation\": {generation},\n  \"frame\": {{\n    \"length_field_size\": {LENGTH_FIELD_SIZE},\n    \"frame_header_size\": {FRAME_HEADER_SIZE},\n    \"max_frame_size\": {MAX_FRAME_SIZE}\n  }},\n  \"flags\": {{\n    \"TERMINAL\": {},\n    \"SESSION_START\": {},\n    \"SHUTDOWN\": {}",
        Flags::TERMINAL.bits(),
        Flags::SESSION_START.bits(),
        Flags::SHUTDOWN.bits(),
    );
    // The raw bulk record and its constants arrived with generation 8.
    if MessageType::BulkRecord.is_available_at(generation) {
        let _ = write!(
            out,
            ",\n    \"BULK\": {}\n  }},\n  \"bulk\": {{\n    \"record_header_size\": {},\n    \"record_format\": {},\n    \"min_record_payload\": {},\n    \"max_record_payload\": {},\n    \"default_window\": {},\n    \"max_window\": {}\n  }}",
            Flags::BULK.bits(),
            bulk::BULK_RECORD_HEADER_SIZE,
            bulk::BULK_RECORD_FORMAT,
            bulk::MIN_BULK_RECORD_PAYLOAD,
            bulk::MAX_BULK_RECORD_PAYLOAD,
            bulk::DEFAULT_BULK_WINDOW,
            bulk::MAX_BULK_WINDOW,
        );
    } else {
        out.push_str("\n  }");
    }
    out.push_str(",\n  \"types\": [\n");
    for (i, t) in types.iter().enumerate() {
        let sep = if i + 1 == types.len() { "" } else { "," };
        let _ = writeln!(
            out,
            "    {{ \"name\": \"{}\", \"gen\": {}, \"flags\": {} }}{sep}",
            t.wire_name(),
            t.generation(),
            t.flags().bits()
        );
    }
    out.push_str("  ]\n}\n");
    out
}
