//! Helpers of the command's tests: the codec's test helpers, and running the built binary.
#![allow(dead_code)]

#[path = "../../../agentwire/tests/common/mod.rs"]
mod codec;

pub use codec::*;

/// Runs the built `agentwire` command with `args`, feeding it `stdin` (from a
/// thread, so that a command that writes a lot before reading cannot block).
pub fn agentwire(args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentwire"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    output
}
