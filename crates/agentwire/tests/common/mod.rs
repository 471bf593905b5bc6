//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod pieces;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory whose name carries `tag`.
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("agentwire-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads one of the copied vector files as JSON lines.
pub fn vectors(name: &str) -> Vec<Value> {
    let path = vector_path(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn vector_path(name: &str) -> PathBuf {
    // From either crate of the workspace that includes this file.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agentwire/tests/vectors").join(name)
}

pub fn hex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A frame with the given envelope fields, written by hand (so that tests can
/// build any envelope, valid or not); `p` is written as a definite byte string.
pub fn frame(id: u32, flags: u8, t: &str, p: &[u8]) -> Vec<u8> {
    let mut body = vec![0xa3, 0x61, b'v', 0x07, 0x61, b't'];
    push_head(&mut body, 3, t.len() as u64);
    body.extend_from_slice(t.as_bytes());
    body.extend_from_slice(&[0x61, b'p']);
    push_head(&mut body, 2, p.len() as u64);
    body.extend_from_slice(p);
    raw_frame(id, flags, &body)
}

pub fn raw_frame(id: u32, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = ((body.len() + 5) as u32).to_be_bytes().to_vec();
    f.extend(id.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(body);
    f
}

pub fn push_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    match arg {
        0..=23 => out.push(m | arg as u8),
        24..=0xff => out.extend([m | 24, arg as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend((arg as u16).to_be_bytes())
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend((arg as u32).to_be_bytes())
        }
        _ => {
            out.push(m | 27);
            out.extend(arg.to_be_bytes())
        }
    }
}
