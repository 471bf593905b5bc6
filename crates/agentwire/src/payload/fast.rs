//! Hand-written paths for the hottest payloads: the data frames
//! (`core.exec.stdin/stdout/stderr`, `core.fs.data`, `core.tcp.data`),
//! `core.ready`, `core.exec.exited` and `core.exec.request` (its strings views
//! of the frame).
//!
//! Each writer (all but `core.exec.request`'s, which has none of its own)
//! writes exactly what the serde derive writes through ciborium, and each
//! reader reads only the plain form of its payload: a definite map with definite text keys
//! and untagged values of the expected type, unknown keys skipped. Anything else
//! (tags, indefinite lengths, a duplicate or missing key, a value of another
//! type, malformed input) makes the reader return `None`, and the caller asks
//! the serde path, which gives the one answer. Tests hold both paths to the same
//! bytes and values.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use super::core::Ready;
use super::exec::{ExecExited, ExecRequest, ExecRlimit, ExecStderr, ExecStdin, ExecStdout};
use super::fs::FsData;
use super::tcp::TcpData;
use super::{CborPayload, PayloadError, Text, fast_decode, serde_fast};
use crate::cbor::{self, Head, MAX_NESTING_DEPTH, Reader};

/// Calls `field` with the raw bytes of each key of a plain map and a reader at
/// its value; the callback consumes the value (an unknown key's through
/// [`skip_unknown`]). `None` when the map is not plain.
fn walk_map<'a>(p: &'a [u8], mut field: impl FnMut(&[u8], &mut Reader<'a>) -> Option<()>) -> Option<()> {
    let mut r = Reader::new(p);
    let Head::Map(Some(entries)) = r.head().ok()? else {
        return None;
    };
    for _ in 0..entries {
        let key = r.plain_text_bytes().ok()??;
        field(key, &mut r)?;
    }
    r.is_at_end().then_some(())
}

/// Stores a field's value, refusing a second one (serde calls that a duplicate field).
fn set_once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    slot.replace(value).is_none().then_some(())
}

/// Passes over an unknown key's value, after checking that the key is UTF-8
/// (known keys are ASCII and were compared as bytes) and no longer than
/// ciborium reads a key (its scratch buffer; a longer one fails there).
fn skip_unknown(key: &[u8], r: &mut Reader<'_>) -> Option<()> {
    if key.len() as u64 > serde_fast::CIBORIUM_SCRATCH {
        return None;
    }
    std::str::from_utf8(key).ok()?;
    // The map itself is one level of nesting.
    r.skip_item(MAX_NESTING_DEPTH - 1).ok().map(drop)
}

fn plain_u64(r: &mut Reader<'_>) -> Option<u64> {
    match r.head().ok()? {
        Head::Unsigned(v) => Some(v),
        _ => None,
    }
}

fn plain_i32(r: &mut Reader<'_>) -> Option<i32> {
    match r.head().ok()? {
        Head::Unsigned(v) => i32::try_from(v).ok(),
        // -1 - n, for n up to i32::MAX.
        Head::Negative(n) => i32::try_from(n).ok().map(|n| -1 - n),
        _ => None,
    }
}

fn plain_text<'a>(r: &mut Reader<'a>) -> Option<&'a str> {
    std::str::from_utf8(r.plain_text_bytes().ok()??).ok()
}

fn plain_bytes(r: &mut Reader<'_>) -> Option<Range<usize>> {
    let Head::Bytes(Some(_)) = r.peek_head().ok()? else {
        return None;
    };
    match r.bytes("bytes").ok()? {
        cbor::StrBytes::Slice(range) => Some(range),
        cbor::StrBytes::Owned(_) => None,
    }
}

/// Size of an integer item.
fn int_len(v: i64) -> usize {
    cbor::head_len(if v < 0 { !v as u64 } else { v as u64 })
}

/// Writes an integer item (major type 1 for negatives, as serde and ciborium do).
fn put_int(dst: &mut BytesMut, v: i64) {
    if v < 0 {
        cbor::put_head(dst, cbor::MAJOR_NEGATIVE, !v as u64);
    } else {
        cbor::put_head(dst, cbor::MAJOR_UNSIGNED, v as u64);
    }
}

/// The hand-written answer when there is one, else the general path's (which
/// in turn defers to the serde path for what it does not cover).
fn fast_or_serde<P: AsRef<[u8]> + ?Sized, T: CborPayload>(
    p: &P,
    fast: impl FnOnce(&P) -> Option<T>,
) -> Result<T, PayloadError> {
    match fast(p) {
        Some(value) => Ok(value),
        None => fast_decode(p.as_ref()),
    }
}

/// `{"data": ` — a map of one entry and the key with its text head.
const DATA_PREFIX: &[u8; 6] = b"\xa1\x64data";
const DATA_KEY: &[u8] = DATA_PREFIX.split_at(2).1;

/// Size of a `{data: bytes}` payload carrying `len` bytes.
pub(crate) fn data_encoded_len(len: usize) -> usize {
    DATA_PREFIX.len() + cbor::head_len(len as u64) + len
}

/// Reads the `data` of a `{data: bytes}` payload as a view of `p`, without a copy.
pub(crate) fn data_decode(p: &Bytes) -> Option<Bytes> {
    // The canonical form, `a1 64 "data" <bstr>`, in a few comparisons.
    if let Some(data) = strip(p, DATA_PREFIX).and_then(|rest| cbor::shortest_string_to_end(rest, cbor::MAJOR_BYTES)) {
        return Some(p.slice_ref(data));
    }
    let mut data = None;
    walk_map(p, |key, r| match key {
        DATA_KEY => set_once(&mut data, p.slice(plain_bytes(r)?)),
        _ => skip_unknown(key, r),
    })?;
    data
}

/// `{data: bytes}` payloads: written with one copy of the data, read as a view of the frame.
macro_rules! data_payload {
    ($($ty:ty),* $(,)?) => {$(
        impl CborPayload for $ty {
            fn exact_encoded_len(&self) -> Option<usize> {
                Some(data_encoded_len(self.data.len()))
            }
            fn encode(&self, dst: &mut BytesMut) -> Result<(), PayloadError> {
                dst.reserve(data_encoded_len(self.data.len()));
                dst.put_slice(DATA_PREFIX);
                cbor::put_head(dst, cbor::MAJOR_BYTES, self.data.len() as u64);
                dst.put_slice(&self.data);
                Ok(())
            }
            const HOLDS_VIEWS: bool = true;

            fn decode(p: &Bytes) -> Result<Self, PayloadError> {
                fast_or_serde(p, |p| data_decode(p).map(|data| Self { data }))
            }
        }
    )*};
}

data_payload!(ExecStdin, ExecStdout, ExecStderr, FsData, TcpData);

impl CborPayload for Ready {
    fn exact_encoded_len(&self) -> Option<usize> {
        // Capabilities (generation 8+, once per connection) take the serde path.
        if self.capabilities.is_some() {
            return None;
        }
        let version =
            if self.agent_version.is_empty() { 0 } else { AGENT_ENTRY.len() + cbor::text_len(&self.agent_version) };
        Some(
            1 + BOOT_ENTRY.len()
                + cbor::head_len(self.boot_time_ns)
                + INIT_ENTRY.len()
                + cbor::head_len(self.init_time_ns)
                + READY_ENTRY.len()
                + cbor::head_len(self.ready_time_ns)
                + version,
        )
    }

    fn encode(&self, dst: &mut BytesMut) -> Result<(), PayloadError> {
        if self.capabilities.is_some() {
            return super::fast_encode(self, dst);
        }
        // agent_version is skipped when empty, as the derive says.
        dst.put_u8(if self.agent_version.is_empty() { MAP3 } else { MAP4 });
        dst.put_slice(BOOT_ENTRY);
        cbor::put_head(dst, cbor::MAJOR_UNSIGNED, self.boot_time_ns);
        dst.put_slice(INIT_ENTRY);
        cbor::put_head(dst, cbor::MAJOR_UNSIGNED, self.init_time_ns);
        dst.put_slice(READY_ENTRY);
        cbor::put_head(dst, cbor::MAJOR_UNSIGNED, self.ready_time_ns);
        if !self.agent_version.is_empty() {
            dst.put_slice(AGENT_ENTRY);
            cbor::put_text(dst, &self.agent_version);
        }
        Ok(())
    }

    fn decode_slice(p: &[u8]) -> Result<Self, PayloadError> {
        // The canonical form first, on its own, so the rest stays out of its way.
        if let Some(ready) = ready_canonical(p) {
            return Ok(ready);
        }
        fast_or_serde(p, |p| {
            let (mut boot, mut init, mut ready, mut agent) = (None, None, None, None);
            walk_map(p, |key, r| match key {
                BOOT_KEY => set_once(&mut boot, plain_u64(r)?),
                INIT_KEY => set_once(&mut init, plain_u64(r)?),
                READY_KEY => set_once(&mut ready, plain_u64(r)?),
                AGENT_KEY => set_once(&mut agent, plain_text(r)?),
                // A capability: the serde path reads those.
                _ if CAPABILITY_KEYS.contains(&key) => None,
                _ => skip_unknown(key, r),
            })?;
            Some(Ready {
                boot_time_ns: boot?,
                init_time_ns: init?,
                ready_time_ns: ready?,
                agent_version: agent.map(String::from).unwrap_or_default(),
                capabilities: None,
            })
        })
    }
}

/// The last `len` bytes of `p` as a `String`, if they are UTF-8.
///
/// `str::from_utf8` checks 16 bytes at a time only from an 8-byte boundary
/// with 16 bytes to go, and byte by byte otherwise (about 9 instructions a
/// byte). So a short text is checked as part of the 16 or 32 bytes of `p`
/// that end with it, copied to an aligned buffer: if those are UTF-8 and the
/// text starts on a character boundary, the text is UTF-8. The bytes before a
/// `core.ready` version of up to 32 bytes are its key and head, ASCII, so the
/// window is UTF-8 exactly when the text is; for other bytes before it, a
/// `None` only sends the caller to the general path. Measured with callgrind:
/// checking a 15-byte version in place costs 132 instructions, in the window 46.
fn suffix_string(p: &[u8], len: usize) -> Option<String> {
    let text = p.get(p.len().checked_sub(len)?..)?;
    match len {
        0..=16 if p.len() >= 16 => checked_window::<16>(p, len),
        17..=32 if p.len() >= 32 => checked_window::<32>(p, len),
        _ => std::str::from_utf8(text).ok().map(str::to_owned),
    }
}

/// The last `len` bytes of the last `N` of `p`, checked in an aligned copy.
#[inline(always)]
fn checked_window<const N: usize>(p: &[u8], len: usize) -> Option<String> {
    #[repr(align(8))]
    struct Aligned<const N: usize>([u8; N]);
    let copy = Aligned(*p.last_chunk::<N>()?);
    Some(std::str::from_utf8(&copy.0).ok()?.get(N.checked_sub(len)?..)?.to_owned())
}

/// An unsigned integer in shortest form at the start of `buf`, and what follows it.
fn canonical_u64(buf: &[u8]) -> Option<(u64, &[u8])> {
    let (v, used) = cbor::shortest_head(buf, cbor::MAJOR_UNSIGNED)?;
    Some((v, &buf[used..]))
}

/// `buf` without the fixed `prefix`; comparing arrays of a known size compiles
/// to a few integer compares instead of a call.
#[inline]
fn strip<'a, const N: usize>(buf: &'a [u8], prefix: &[u8; N]) -> Option<&'a [u8]> {
    let (head, rest) = buf.split_first_chunk::<N>()?;
    (head == prefix).then_some(rest)
}

/// `core.ready` exactly as the serde derive writes it, keys in declaration order.
fn ready_canonical(p: &[u8]) -> Option<Ready> {
    let (&entries, rest) = p.split_first()?;
    let (boot_time_ns, rest) = canonical_u64(strip(rest, BOOT_ENTRY)?)?;
    let (init_time_ns, rest) = canonical_u64(strip(rest, INIT_ENTRY)?)?;
    let (ready_time_ns, rest) = canonical_u64(strip(rest, READY_ENTRY)?)?;
    let agent_version = match entries {
        MAP3 if rest.is_empty() => String::new(),
        MAP4 => {
            let text = cbor::shortest_string_to_end(strip(rest, AGENT_ENTRY)?, cbor::MAJOR_TEXT)?;
            // The text is the end of the payload.
            suffix_string(p, text.len())?
        }
        _ => return None,
    };
    Some(Ready { boot_time_ns, init_time_ns, ready_time_ns, agent_version, capabilities: None })
}

/// Map heads of three and four entries.
const MAP3: u8 = 0xa3;
const MAP4: u8 = 0xa4;

/// The keys of `core.ready` with their text heads, as the canonical form has them.
const BOOT_ENTRY: &[u8; 13] = b"\x6cboot_time_ns";
const INIT_ENTRY: &[u8; 13] = b"\x6cinit_time_ns";
const READY_ENTRY: &[u8; 14] = b"\x6dready_time_ns";
const AGENT_ENTRY: &[u8; 14] = b"\x6dagent_version";
/// The keys themselves, as the general reader compares them.
const BOOT_KEY: &[u8] = BOOT_ENTRY.split_at(1).1;
const INIT_KEY: &[u8] = INIT_ENTRY.split_at(1).1;
const READY_KEY: &[u8] = READY_ENTRY.split_at(1).1;
const AGENT_KEY: &[u8] = AGENT_ENTRY.split_at(1).1;

/// The keys of [`ReadyCapabilities`](super::core::ReadyCapabilities), which the general
/// reader leaves to the serde path.
const CAPABILITY_KEYS: [&[u8]; 5] =
    [b"bulk_transport", b"relay_lease", b"local_transport", b"workload_transport_barrier_version", b"exec_limits"];

/// `{"code": ` — a map of one entry and the key with its text head.
const CODE_PREFIX: &[u8; 6] = b"\xa1\x64code";
const CODE_KEY: &[u8] = CODE_PREFIX.split_at(2).1;

/// `core.exec.exited` exactly as the serde derive writes it.
fn exited_canonical(p: &[u8]) -> Option<ExecExited> {
    let rest = strip(p, CODE_PREFIX)?;
    let (code, used) = match cbor::shortest_head(rest, cbor::MAJOR_UNSIGNED) {
        Some((v, used)) => (i32::try_from(v).ok()?, used),
        None => {
            let (n, used) = cbor::shortest_head(rest, cbor::MAJOR_NEGATIVE)?;
            (-1 - i32::try_from(n).ok()?, used)
        }
    };
    (used == rest.len()).then_some(ExecExited { code })
}

impl CborPayload for ExecExited {
    fn exact_encoded_len(&self) -> Option<usize> {
        Some(CODE_PREFIX.len() + int_len(self.code.into()))
    }

    fn encode(&self, dst: &mut BytesMut) -> Result<(), PayloadError> {
        dst.put_slice(CODE_PREFIX);
        put_int(dst, self.code.into());
        Ok(())
    }

    fn decode_slice(p: &[u8]) -> Result<Self, PayloadError> {
        fast_or_serde(p, |p| {
            if let Some(exited) = exited_canonical(p) {
                return Some(exited);
            }
            let mut code = None;
            walk_map(p, |key, r| match key {
                CODE_KEY => set_once(&mut code, plain_i32(r)?),
                _ => skip_unknown(key, r),
            })?;
            Some(ExecExited { code: code? })
        })
    }
}

/// A plain text string as a view of `p`, the buffer `r` reads: checked once, not copied.
#[inline]
fn plain_text_view(p: &Bytes, r: &mut Reader<'_>) -> Option<Text> {
    Text::try_from(p.slice(r.plain_text_range().ok()??)).ok()
}

/// A plain text string or null (an `Option` with serde's `default`).
fn plain_optional_text(p: &Bytes, r: &mut Reader<'_>) -> Option<Option<Text>> {
    match r.peek_head().ok()? {
        Head::Simple => (plain_simple(p, r)? == cbor::NULL).then_some(None),
        _ => plain_text_view(p, r).map(Some),
    }
}

/// The byte of a plain simple value (`false`, `true`, `null`, ...).
fn plain_simple(p: &[u8], r: &mut Reader<'_>) -> Option<u8> {
    let at = r.position();
    matches!(r.head().ok()?, Head::Simple).then(|| p[at])
}

fn plain_bool(p: &[u8], r: &mut Reader<'_>) -> Option<bool> {
    match plain_simple(p, r)? {
        cbor::FALSE => Some(false),
        cbor::TRUE => Some(true),
        _ => None,
    }
}

/// `rows` or `cols`: an unsigned integer that fits 16 bits.
fn plain_u16(r: &mut Reader<'_>) -> Option<u16> {
    u16::try_from(plain_u64(r)?).ok()
}

/// Most bytes [`plain_array`] reserves ahead of the items it has read, as
/// serde's own `Vec` reader does: a claimed length is only a claim.
const PREALLOCATED_BYTES: usize = 1 << 20;

/// A plain array of `item`s: refused when it claims more items than bytes are
/// left (each item takes at least one), and reserved for at most
/// [`PREALLOCATED_BYTES`] ahead, so a claim costs no more than that.
fn plain_array<'a, T>(r: &mut Reader<'a>, mut item: impl FnMut(&mut Reader<'a>) -> Option<T>) -> Option<Vec<T>> {
    let Head::Array(Some(n)) = r.head().ok()? else {
        return None;
    };
    if n > r.remaining() as u64 {
        return None;
    }
    let mut items = Vec::with_capacity((n as usize).min(PREALLOCATED_BYTES / size_of::<T>().max(1)));
    for _ in 0..n {
        items.push(item(r)?);
    }
    Some(items)
}

fn plain_texts(p: &Bytes, r: &mut Reader<'_>) -> Option<Vec<Text>> {
    plain_array(r, |r| plain_text_view(p, r))
}

/// One `{resource, soft, hard}` of `rlimits`, in that order or any other. An
/// unknown key sends the whole payload to the general path, which knows how
/// deep it may skip.
fn plain_rlimit(p: &Bytes, r: &mut Reader<'_>) -> Option<ExecRlimit> {
    if r.expect(b"\xa3\x68resource").is_some() {
        let resource = plain_text_view(p, r)?;
        r.expect(b"\x64soft")?;
        let soft = plain_u64(r)?;
        r.expect(b"\x64hard")?;
        return Some(ExecRlimit { resource, soft, hard: plain_u64(r)? });
    }
    let Head::Map(Some(entries)) = r.head().ok()? else {
        return None;
    };
    let (mut resource, mut soft, mut hard) = (None, None, None);
    for _ in 0..entries {
        match r.plain_text_bytes().ok()?? {
            b"resource" => set_once(&mut resource, plain_text_view(p, r)?)?,
            b"soft" => set_once(&mut soft, plain_u64(r)?)?,
            b"hard" => set_once(&mut hard, plain_u64(r)?)?,
            _ => return None,
        }
    }
    Some(ExecRlimit { resource: resource?, soft: soft?, hard: hard? })
}

fn plain_rlimits(p: &Bytes, r: &mut Reader<'_>) -> Option<Vec<ExecRlimit>> {
    plain_array(r, |r| plain_rlimit(p, r))
}

/// `core.exec.request` with all nine keys in the order the derive writes them
/// (the deployed host's and ours): one comparison per key.
fn exec_request_canonical(p: &Bytes) -> Option<ExecRequest> {
    let r = &mut Reader::new(p);
    r.expect(b"\xa9\x63cmd")?;
    let cmd = plain_text_view(p, r)?;
    r.expect(b"\x64args")?;
    let args = plain_texts(p, r)?;
    r.expect(b"\x63env")?;
    let env = plain_texts(p, r)?;
    r.expect(b"\x63cwd")?;
    let cwd = plain_optional_text(p, r)?;
    r.expect(b"\x64user")?;
    let user = plain_optional_text(p, r)?;
    r.expect(b"\x63tty")?;
    let tty = plain_bool(p, r)?;
    r.expect(b"\x64rows")?;
    let rows = plain_u16(r)?;
    r.expect(b"\x64cols")?;
    let cols = plain_u16(r)?;
    r.expect(b"\x67rlimits")?;
    let rlimits = plain_rlimits(p, r)?;
    r.is_at_end().then_some(ExecRequest { cmd, args, env, cwd, user, tty, rows, cols, rlimits })
}

/// `core.exec.request` in its plain form, every string a view of `p`.
///
/// Hand-written because the general path (serde's derive over the crate's
/// reader, each string copied) costs about 10,600 instructions per decode of
/// the benchmark's request, a third of the reference's, and this one 5,500, a
/// 5.6th (callgrind_types.sh). Defaults and refusals are the derive's: a missing
/// `cmd`, a duplicate key or a value of another type sends the payload to the
/// general path, which gives the answer.
fn exec_request_plain(p: &Bytes) -> Option<ExecRequest> {
    if let Some(req) = exec_request_canonical(p) {
        return Some(req);
    }
    let mut cmd = None;
    let (mut args, mut env, mut cwd, mut user) = (None, None, None, None);
    let (mut tty, mut rows, mut cols, mut rlimits) = (None, None, None, None);
    walk_map(p, |key, r| match key {
        b"cmd" => set_once(&mut cmd, plain_text_view(p, r)?),
        b"args" => set_once(&mut args, plain_texts(p, r)?),
        b"env" => set_once(&mut env, plain_texts(p, r)?),
        b"cwd" => set_once(&mut cwd, plain_optional_text(p, r)?),
        b"user" => set_once(&mut user, plain_optional_text(p, r)?),
        b"tty" => set_once(&mut tty, plain_bool(p, r)?),
        b"rows" => set_once(&mut rows, plain_u16(r)?),
        b"cols" => set_once(&mut cols, plain_u16(r)?),
        b"rlimits" => set_once(&mut rlimits, plain_rlimits(p, r)?),
        _ => skip_unknown(key, r),
    })?;
    let defaults = ExecRequest::new(cmd?);
    Some(ExecRequest {
        args: args.unwrap_or_default(),
        env: env.unwrap_or_default(),
        cwd: cwd.flatten(),
        user: user.flatten(),
        tty: tty.unwrap_or(defaults.tty),
        rows: rows.unwrap_or(defaults.rows),
        cols: cols.unwrap_or(defaults.cols),
        rlimits: rlimits.unwrap_or_default(),
        ..defaults
    })
}

impl CborPayload for ExecRequest {
    const HOLDS_VIEWS: bool = true;

    fn decode(p: &Bytes) -> Result<Self, PayloadError> {
        fast_or_serde(p, exec_request_plain)
    }

    /// Copies the payload once; the strings are views of the copy when the
    /// hand-written reader takes it, copies of their own otherwise.
    fn decode_slice(p: &[u8]) -> Result<Self, PayloadError> {
        Self::decode(&Bytes::copy_from_slice(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded<T: CborPayload>(value: &T) -> Bytes {
        let mut b = BytesMut::new();
        value.encode(&mut b).unwrap();
        b.freeze()
    }

    /// The canonical readers must recognise what the writers write, or the hot
    /// paths silently fall back to the slow ones.
    #[test]
    fn canonical_readers_take_what_the_writers_write() {
        for agent_version in ["", "agentwire 0.1.0", &"x".repeat(300)] {
            for t in [0, 23, 24, 255, 65536, u64::MAX] {
                let r = Ready {
                    boot_time_ns: t,
                    init_time_ns: t / 3,
                    ready_time_ns: 7,
                    agent_version: agent_version.into(),
                    capabilities: None,
                };
                assert_eq!(ready_canonical(&encoded(&r)), Some(r));
            }
        }
        for code in [0, 1, -1, 23, 24, -24, -25, 255, -256, i32::MAX, i32::MIN] {
            assert_eq!(exited_canonical(&encoded(&ExecExited { code })), Some(ExecExited { code }));
        }
        for len in [0, 23, 24, 255, 256, 65535, 65536] {
            let p = encoded(&ExecStdout { data: Bytes::from(vec![1u8; len]) });
            assert_eq!(p.strip_prefix(DATA_PREFIX).map(|r| r.len() - cbor::head_len(len as u64)), Some(len));
            assert_eq!(data_decode(&p).map(|d| d.len()), Some(len));
        }
        assert_eq!(BOOT_ENTRY[1..], *b"boot_time_ns");
        assert_eq!(INIT_ENTRY[1..], *b"init_time_ns");
        assert_eq!(READY_ENTRY[1..], *b"ready_time_ns");
        assert_eq!(AGENT_ENTRY[1..], *b"agent_version");
        for (entry, key) in
            [(&BOOT_ENTRY[..], BOOT_KEY), (INIT_ENTRY, INIT_KEY), (READY_ENTRY, READY_KEY), (AGENT_ENTRY, AGENT_KEY)]
        {
            assert_eq!(usize::from(entry[0] - 0x60), key.len(), "text head of {key:?}");
        }
        assert_eq!((DATA_KEY, CODE_KEY), (&b"data"[..], &b"code"[..]));
    }

    /// Every length around the windows, every kind of character and of broken
    /// sequence at every position: with ASCII before the text the answer is
    /// `from_utf8`'s; with anything else before it, that or `None`.
    #[test]
    fn suffix_string_agrees_with_from_utf8() {
        let pieces: [&[u8]; 7] =
            [b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\x80", b"\xe2\x82", b"\xff", b"\xc0\x80"];
        let mut texts = Vec::new();
        for len in 0..=40 {
            texts.push(vec![b'a'; len]);
            for at in 0..len {
                for piece in pieces {
                    let mut text = vec![b'a'; len];
                    let end = (at + piece.len()).min(len);
                    text[at..end].copy_from_slice(&piece[..end - at]);
                    texts.push(text);
                }
            }
        }
        for before in [0, 1, 14, 15, 16, 17, 31, 32, 40] {
            let ascii = vec![b'k'; before];
            let other: Vec<u8> = "é".repeat(before).into_bytes().split_off(before);
            for text in &texts {
                let expected = std::str::from_utf8(text).ok().map(str::to_owned);
                let got = suffix_string(&[&ascii[..], text].concat(), text.len());
                assert_eq!(got, expected, "{text:x?} after {before} ASCII bytes");
                let got = suffix_string(&[&other[..], text].concat(), text.len());
                assert!(got.is_none() || got == expected, "{text:x?} after {other:x?}");
            }
        }
        assert_eq!(suffix_string(b"abc", 4), None);
    }

    #[test]
    fn canonical_readers_decline_other_forms() {
        // Out of order, non-shortest, trailing byte, i32 overflow.
        assert_eq!(exited_canonical(b"\xa1\x64code\x18\x05"), None);
        assert_eq!(exited_canonical(b"\xa1\x64code\x05\x00"), None);
        assert_eq!(exited_canonical(b"\xa1\x64code\x1a\x80\x00\x00\x00"), None);
        let r = encoded(&Ready { agent_version: String::new(), ..Ready::default() });
        let mut longer = r.to_vec();
        longer.push(0);
        assert_eq!(ready_canonical(&longer), None);
    }
}
