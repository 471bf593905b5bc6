//! `agentwire encode`: frames from JSON lines, the inverse of `inspect --json`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::ExitCode;

use agentwire::{Flags, Message, MessageCodec, MessageType, PROTOCOL_VERSION};
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
    let mut codec = MessageCodec::new();
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

/// One JSON line to a message: `id`, `t`, `payload`, optional `v` and `flags`.
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
    let t = MessageType::from_wire_name(name)
        .ok_or(format!("t: {name} is not a message type of generation {PROTOCOL_VERSION}"))?;
    if let Some(key) = object.keys().find(|k| !["id", "t", "payload", "v", "flags"].contains(&k.as_str())) {
        return Err(format!("{key:?} is not a key of a line (id, t, payload, v, flags)"));
    }
    let payload = object.get("payload").cloned().unwrap_or(Value::Null);
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
    if let Some(v) = int("v", u8::MAX.into())? {
        message.version = v as u8;
    }
    if let Some(flags) = int("flags", u8::MAX.into())? {
        message.flags = Flags::from_bits(flags as u8);
    }
    Ok(message)
}
