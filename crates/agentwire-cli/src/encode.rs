//! `agentwire encode`: frames from JSON lines, the inverse of `inspect --json`.
//!
//! A line is `{"id", "t", "payload"}` with optional `"v"` (the generation
//! written, 3 to 10; the payload is written as a writer of that generation
//! writes it), `"flags"` and `"offset"` (where `inspect` found the frame; not
//! written). `"t": "bulk.record"` is a raw bulk record (generation 8): its
//! payload is `{"kind", "flow", "offset", "data"}` with the wire integers, and
//! it needs no `v` (the record carries none).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::ExitCode;

use agentwire::payload::bulk::{BulkFlow, BulkKind, BulkRecordError, MAX_BULK_RECORD_PAYLOAD};
use agentwire::{Flags, Message, MessageCodec, MessageType, PROTOCOL_VERSION, Payload};
use bytes::BytesMut;
use serde_json::Value;

use crate::{EXIT_USAGE, open_input};

pub(crate) fn run(path: Option<&Path>, out_path: Option<&Path>) -> ExitCode {
    let input = match open_input(path) {
        Ok(input) => BufReader::new(input),
        Err(e) => {
            eprintln!("agentwire: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut out: Box<dyn Write> = match out_path {
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Box::new(std::io::BufWriter::new(f)),
            Err(e) => {
                eprintln!("agentwire: cannot write {}: {e}", p.display());
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    // A codec that speaks the current generation: every type is let through
    // (each line's `v` says what its frame claims; nothing is negotiated here).
    let mut codec = MessageCodec::new();
    debug_assert_eq!(codec.negotiated_generation(), PROTOCOL_VERSION);
    let mut frame = BytesMut::new();
    let mut bad = 0usize;
    for (number, line) in input.lines().enumerate() {
        let number = number + 1;
        let line = match line {
            Ok(line) => line,
            // A line that is not text is that line's fault; any other read error ends the input.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                eprintln!("agentwire: line {number}: {e}");
                bad += 1;
                continue;
            }
            Err(e) => {
                let name = path.filter(|p| p.as_os_str() != "-");
                eprintln!(
                    "agentwire: cannot read {}: {e}",
                    name.map_or("standard input".into(), |p| p.display().to_string())
                );
                return ExitCode::from(EXIT_USAGE);
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        frame.clear();
        let written = parse(&line).and_then(|m| codec.encode_message(&m, &mut frame).map_err(|e| e.to_string()));
        match written {
            Ok(()) => {
                if let Err(e) = out.write_all(&frame) {
                    eprintln!("agentwire: writing: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
            Err(e) => {
                eprintln!("agentwire: line {number}: {e}");
                bad += 1;
            }
        }
    }
    if let Err(e) = out.flush() {
        eprintln!("agentwire: writing: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    if bad > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// A bulk record's `kind` and `flow`, when they are integers, are those of
/// the layout (anything else is left to the payload's deserializer to refuse).
fn check_bulk_enums(payload: &Value) -> Result<(), String> {
    let given = |key: &str| payload.get(key).and_then(Value::as_u64);
    if let Some(kind) = given("kind").filter(|&k| u8::try_from(k).ok().and_then(BulkKind::from_wire).is_none()) {
        return Err(format!("kind {kind} is neither 1 (filesystem) nor 2 (tcp)"));
    }
    if let Some(flow) = given("flow").filter(|&f| u8::try_from(f).ok().and_then(BulkFlow::from_wire).is_none()) {
        return Err(format!("flow {flow} is neither 1 (host to guest) nor 2 (guest to host)"));
    }
    Ok(())
}

/// The keys of a line: those `inspect --json` writes for a frame.
const LINE_KEYS: [&str; 6] = ["offset", "id", "flags", "v", "t", "payload"];

/// One JSON line to a message: `id`, `t`, `payload`, optional `v`, `flags` and
/// `offset` (ignored: where `inspect` found the frame).
fn parse(line: &str) -> Result<Message, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let int = |key: &str, max: u64| -> Result<Option<u64>, String> {
        match object.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= max)
                .map(Some)
                .ok_or(format!("{key}: expected an integer from 0 to {max}, got {v}")),
        }
    };
    let id = int("id", u32::MAX.into())?.ok_or("id: missing")? as u32;
    let name = object.get("t").ok_or("t: missing")?.as_str().ok_or("t: expected a text")?;
    let t = MessageType::from_name(name).ok_or(format!(
        "t: {name} is neither a message type of generation {PROTOCOL_VERSION} nor {}",
        MessageType::BulkRecord.wire_name()
    ))?;
    if let Some(key) = object.keys().find(|k| !LINE_KEYS.contains(&k.as_str())) {
        return Err(format!("{key:?} is not a key of a line ({})", LINE_KEYS.join(", ")));
    }
    int("offset", u64::MAX)?;
    let payload = object.get("payload").cloned().unwrap_or(Value::Null);
    if t == MessageType::BulkRecord {
        check_bulk_enums(&payload).map_err(|e| format!("payload of {t}: {e}"))?;
    }
    // A key the payload's type does not have is a mistake here (a reader of the
    // wire skips unknown keys; a writer must not invent them).
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let reader = serde_ignored::Deserializer::new(payload, &mut note);
    let payload = t.deserialize_payload(reader).map_err(|e| format!("payload of {t}: {e}"))?;
    if !unknown.is_empty() {
        return Err(format!("payload of {t}: unknown key {}", unknown.join(", ")));
    }
    let mut message = Message::new(id, payload);
    let version = int("v", u8::MAX.into())?;
    let flags = int("flags", u8::MAX.into())?;
    if let Payload::BulkRecord(record) = &message.payload {
        // No envelope: neither `v` nor any flags but BULK reach the wire, and a
        // record that breaks the layout would lose the reader's stream.
        if let Some(v) = version.filter(|&v| !t.is_available_at(v as u8)) {
            return Err(format!("v: a {t} needs generation {} or later, not {v}", t.generation()));
        }
        if let Some(f) = flags.filter(|&f| f != u64::from(Flags::BULK.bits())) {
            return Err(format!("flags: a {t} always has flags {} (BULK alone), not {f}", Flags::BULK.bits()));
        }
        record.check().map_err(|e| match e {
            BulkRecordError::TooShort(_) => {
                format!("payload of {t}: data is empty; a record carries 1 to {MAX_BULK_RECORD_PAYLOAD} bytes")
            }
            e => format!("payload of {t}: {e}"),
        })?;
        return Ok(message);
    }
    if let Some(v) = version {
        message.version = v as u8;
    }
    if let Some(flags) = flags {
        message.flags = Flags::from_bits(flags as u8);
    }
    Ok(message)
}
