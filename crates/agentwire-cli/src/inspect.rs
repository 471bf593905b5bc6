//! `agentwire inspect`: a dissector for captured byte streams.
//!
//! Every frame of generations 3 to 10 is shown, raw bulk records (generation 8,
//! flags `BULK`, a binary body without an envelope) included: in JSON a record
//! has no `v` and its payload is `{"kind", "flow", "offset", "data"}` with the
//! wire integers, the shape of the vectors' `bulk.record` lines and of what
//! `encode` reads.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::process::ExitCode;

use agentwire::payload::as_generation;
use agentwire::payload::bulk::{BulkFlow, BulkKind, BulkRecord};
use agentwire::{Message, MessageCodec, Payload, Rejected, StreamError};
use bytes::BytesMut;
use serde_json::json;
use tokio_util::codec::Decoder;

use crate::{EXIT_USAGE, open_input};

/// How much is read at a time: the capture streams through in bounded memory
/// (this plus at most one frame).
const READ_SIZE: usize = 64 * 1024;
/// Show progress on a terminal for files larger than this.
const PROGRESS_ABOVE: u64 = 64 * 1024 * 1024;

pub(crate) fn run(path: Option<&Path>, json: bool) -> ExitCode {
    let mut input = match open_input(path) {
        Ok(input) => input,
        Err(e) => {
            eprintln!("agentwire: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let size = path.and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.len());
    let progress = size > PROGRESS_ABOVE && std::io::stderr().is_terminal();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut printer = Printer { json, out: &mut out, failed: false, decoded: 0, broken_bulk: false };
    let mut first_bytes: Vec<u8> = Vec::new();
    let mut codec = MessageCodec::new();
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut chunk = vec![0u8; READ_SIZE];
    let mut read_total = 0u64;
    let outcome = loop {
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(item)) => printer.item(&codec, item),
                Ok(None) => break,
                Err(e) => break_fatal(&mut printer, &codec, e),
            }
            if printer.failed {
                break;
            }
        }
        if printer.failed {
            break 1;
        }
        let n = match input.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!(
                    "agentwire: reading {}: {e}",
                    path.map_or("standard input".into(), |p| p.display().to_string())
                );
                break EXIT_USAGE;
            }
        };
        if n == 0 {
            // The end: whatever is left must be whole frames.
            loop {
                match codec.decode_eof(&mut buf) {
                    Ok(Some(item)) => printer.item(&codec, item),
                    Ok(None) => break,
                    Err(e) => {
                        break_fatal(&mut printer, &codec, e);
                        break;
                    }
                }
            }
            break if printer.failed { 1 } else { 0 };
        }
        buf.extend_from_slice(&chunk[..n]);
        if first_bytes.len() < 8 {
            first_bytes.extend(chunk[..n].iter().take(8 - first_bytes.len()));
        }
        read_total += n as u64;
        if progress {
            eprint!("\r{:>5.1}% of {} MiB", read_total as f64 * 100.0 / size as f64, size >> 20);
        }
    };
    let (decoded, broken_bulk) = (printer.decoded, printer.broken_bulk);
    if progress {
        eprintln!();
    }
    let _ = out.flush();
    // A broken bulk record had a frame's length and header: the stream is a
    // capture, one whose record breaks the layout (its line says how).
    if outcome == 1 && decoded == 0 && !broken_bulk {
        let shown: Vec<String> = first_bytes.iter().map(|b| format!("{b:02x}")).collect();
        eprintln!(
            "agentwire: {} does not look like a capture of this protocol: not one frame decoded; it starts {} (a capture starts with a frame's 4-byte big-endian length, at most {})",
            path.filter(|p| p.as_os_str() != "-").map_or("standard input".into(), |p| p.display().to_string()),
            shown.join(" "),
            agentwire::MAX_FRAME_SIZE
        );
    }
    ExitCode::from(outcome)
}

/// Reports a fault that loses the stream (a length out of range, a frame cut
/// short, a bulk record that breaks the layout) at the offset of its frame.
fn break_fatal(printer: &mut Printer<'_>, codec: &MessageCodec, e: StreamError) {
    let offset = e.offset().unwrap_or_else(|| codec.frame_codec().stream_offset());
    printer.broken_bulk |= matches!(e, StreamError::BrokenBulkRecord { .. });
    printer.fatal(offset, &e.to_string());
}

struct Printer<'a> {
    json: bool,
    out: &'a mut dyn Write,
    failed: bool,
    /// Frames that decoded.
    decoded: u64,
    /// The stream was lost on a bulk record that breaks the layout.
    broken_bulk: bool,
}

impl Printer<'_> {
    fn item(&mut self, codec: &MessageCodec, item: Result<Message, Rejected>) {
        // A closed standard output (a pager quit early) ends the output, not the program's health.
        let _ = match item {
            Ok(m) => {
                self.decoded += 1;
                self.message(codec.frame_codec().last_frame_offset(), &m)
            }
            Err(r) => self.rejected(&r),
        };
    }

    fn message(&mut self, offset: u64, m: &Message) -> std::io::Result<()> {
        let message_type = m.message_type();
        let t = message_type.wire_name();
        if self.json {
            // As a writer of the frame's generation renders it (the vectors' `payload`):
            // e.g. the fs `user` keys are absent below generation 10 and `null` from it.
            let payload =
                as_generation(m.version, || serde_json::to_value(&m.payload)).unwrap_or(serde_json::Value::Null);
            let mut record =
                json!({ "offset": offset, "id": m.id, "flags": m.flags.bits(), "t": t, "payload": payload });
            // A raw bulk record has no envelope, so no `v` of its own (its
            // `version` is only the generation the decoder had negotiated).
            if message_type.has_envelope() {
                record["v"] = json!(m.version);
            }
            writeln!(self.out, "{record}")
        } else {
            writeln!(
                self.out,
                "{offset:>10}  id={:<10} {:<24} {t:<32} {}",
                m.id,
                m.flags.to_string(),
                summary(m.version, &m.payload)
            )
        }
    }

    fn rejected(&mut self, r: &Rejected) -> std::io::Result<()> {
        if self.json {
            let mut record = json!({
                "offset": r.offset, "id": r.id, "flags": r.flags.bits(),
                "error": { "kind": r.kind.as_str(), "message": r.reason },
            });
            if let Some(t) = &r.type_name {
                record["t"] = json!(t.as_str());
            }
            writeln!(self.out, "{record}")
        } else {
            let t = r.type_name.as_ref().map_or("?", |t| t.as_str());
            writeln!(
                self.out,
                "{:>10}  id={:<10} {:<24} {t:<32} REJECTED {}: {}",
                r.offset,
                r.id,
                r.flags.to_string(),
                r.kind,
                r.reason
            )
        }
    }

    fn fatal(&mut self, offset: u64, message: &str) {
        self.failed = true;
        let _ = if self.json {
            writeln!(self.out, "{}", json!({ "offset": offset, "fatal": { "message": message } }))
        } else {
            writeln!(self.out, "{offset:>10}  STREAM FAILED: {message}")
        };
    }
}

/// A short description of a payload for a person: size and a printable preview
/// for data, kind, flow, offset and size for a bulk record, the fields (as a
/// writer of generation `version` renders them) for the rest.
fn summary(version: u8, payload: &Payload) -> String {
    let data = match payload {
        Payload::ExecStdin(p) => &p.data,
        Payload::ExecStdout(p) => &p.data,
        Payload::ExecStderr(p) => &p.data,
        Payload::FsData(p) => &p.data,
        Payload::TcpData(p) => &p.data,
        Payload::BulkRecord(r) => return bulk_summary(r),
        _ => {
            let mut text = as_generation(version, || serde_json::to_string(payload)).unwrap_or_default();
            if text.len() > 160 {
                let cut = (0..=157).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
                text.truncate(cut);
                text.push('…');
            }
            return text;
        }
    };
    preview(data)
}

/// `kind=filesystem(1) flow=guest-to-host(2) offset=N 5 bytes "hello"`.
fn bulk_summary(r: &BulkRecord) -> String {
    let kind = match r.kind {
        BulkKind::Filesystem => "filesystem",
        BulkKind::Tcp => "tcp",
    };
    let flow = match r.flow {
        BulkFlow::HostToGuest => "host-to-guest",
        BulkFlow::GuestToHost => "guest-to-host",
    };
    format!(
        "kind={kind}({}) flow={flow}({}) offset={} {}",
        r.kind.to_wire(),
        r.flow.to_wire(),
        r.offset,
        preview(&r.data)
    )
}

/// The size of `data` and its first bytes, printable ones as they are.
fn preview(d: &[u8]) -> String {
    let shown: String =
        d.iter().take(48).map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }).collect();
    let more = if d.len() > 48 { "…" } else { "" };
    format!("{} bytes \"{shown}{more}\"", d.len())
}
