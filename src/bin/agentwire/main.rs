//! The `agentwire` command: inspect and craft captured byte streams of the
//! protocol. Built with the `cli` feature, so that users of the library never
//! build its dependencies:
//!
//! ```text
//! cargo run --features cli -- inspect capture.bin
//! cargo run --features cli -- encode frames.jsonl -o capture.bin
//! ```

mod encode;
mod inspect;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Inspect and craft byte streams of the microVM host <-> guest agent protocol (generation 7).
#[derive(Parser)]
#[command(name = "agentwire", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode a captured byte stream: one line a frame.
    ///
    /// Exit status: 0 when the stream ends at a frame boundary (even if some
    /// frames were rejected), 1 when it fails (length out of range, or it ends
    /// inside a frame), 2 for usage errors and unreadable files.
    Inspect {
        /// The capture; standard input when `-` or absent.
        file: Option<PathBuf>,
        /// One JSON object a line instead of text for a person.
        #[arg(long)]
        json: bool,
    },
    /// Write frames from JSON lines `{"id": N, "t": "wire.name", "payload": VALUE}`
    /// (optional `"v"`, default the current generation, and `"flags"`, default the type's).
    ///
    /// Exit status 1 if any line was bad (each is reported with its number and nothing is
    /// written for it), 2 for unreadable or unwritable files.
    Encode {
        /// The JSON lines; standard input when `-` or absent.
        file: Option<PathBuf>,
        /// Where the frames go; standard output when absent.
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Inspect { file, json } => inspect::run(file.as_deref(), json),
        Command::Encode { file, out } => encode::run(file.as_deref(), out.as_deref()),
    }
}

/// Opens `path` for reading, standard input for `-` or none.
fn open_input(path: Option<&std::path::Path>) -> Result<Box<dyn std::io::Read>, String> {
    match path {
        None => Ok(Box::new(std::io::stdin().lock())),
        Some(p) if p.as_os_str() == "-" => Ok(Box::new(std::io::stdin().lock())),
        Some(p) => std::fs::File::open(p)
            .map(|f| Box::new(f) as Box<dyn std::io::Read>)
            .map_err(|e| format!("cannot read {}: {e}", p.display())),
    }
}

/// Exit status for usage errors and unreadable or unwritable files.
const EXIT_USAGE: u8 = 2;
