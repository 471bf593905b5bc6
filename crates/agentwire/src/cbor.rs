//! Just enough CBOR (RFC 8949) for the envelope and for checking payloads.
//!
//! Reading is liberal the way the spec asks (non-shortest heads, indefinite
//! lengths, tags are skipped) and strict about what cannot be meant (reserved
//! encodings, stray breaks, invalid UTF-8, truncation). Nothing here recurses:
//! nesting is tracked on a fixed array, so no input can overflow the stack, and
//! every claimed length is compared with the bytes actually present before it
//! is believed, so no input can make us allocate what it has not sent.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{BufMut, BytesMut};

/// The deepest nesting of arrays, maps and tags a payload may use.
///
/// The deepest payload of generation 7 (`core.bootstrap`, `core.fs.response`)
/// nests four levels; the rest leaves room for fields a newer peer adds.
pub const MAX_NESTING_DEPTH: usize = 32;

pub(crate) const MAJOR_UNSIGNED: u8 = 0;
pub(crate) const MAJOR_NEGATIVE: u8 = 1;
pub(crate) const MAJOR_BYTES: u8 = 2;
pub(crate) const MAJOR_TEXT: u8 = 3;
pub(crate) const MAJOR_ARRAY: u8 = 4;
pub(crate) const MAJOR_MAP: u8 = 5;
pub(crate) const MAJOR_TAG: u8 = 6;
pub(crate) const MAJOR_SIMPLE: u8 = 7;

/// The whole items `false`, `true` and `null` (major type 7, 20 to 22).
pub(crate) const FALSE: u8 = 0xf4;
pub(crate) const TRUE: u8 = 0xf5;
pub(crate) const NULL: u8 = 0xf6;

/// Malformed CBOR: where, and what was wrong there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} at byte {offset}")]
pub struct CborError {
    /// Offset of the offending head, relative to the start of the item read.
    pub offset: usize,
    /// What was wrong.
    pub reason: &'static str,
}

/// One decoded head: a major type and its argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Head {
    Unsigned(u64),
    Negative(u64),
    /// `None`: indefinite length.
    Bytes(Option<u64>),
    Text(Option<u64>),
    Array(Option<u64>),
    Map(Option<u64>),
    Tag(u64),
    /// Simple values and floats: nothing follows the head.
    Simple,
    Break,
}

/// A cursor over one buffer of CBOR.
#[derive(Clone, Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Bytes of a string: a range of the reader's buffer when it was definite,
/// the concatenated chunks when it was indefinite.
pub(crate) enum StrBytes {
    Slice(Range<usize>),
    Owned(Vec<u8>),
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn is_at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn error(&self, offset: usize, reason: &'static str) -> CborError {
        CborError { offset, reason }
    }

    fn take(&mut self, n: u64, at: usize) -> Result<Range<usize>, CborError> {
        if n > self.remaining() as u64 {
            return Err(self.error(at, "length runs past the end of the input"));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(start..self.pos)
    }

    /// Reads one head.
    #[inline]
    pub(crate) fn head(&mut self) -> Result<Head, CborError> {
        let at = self.pos;
        let Some(&initial) = self.buf.get(at) else {
            return Err(self.error(at, "input ends where an item was expected"));
        };
        let major = initial >> 5;
        let info = initial & 0x1f;
        // The common case, an argument inside the initial byte, needs nothing more.
        let arg = if info < 24 {
            self.pos += 1;
            Some(u64::from(info))
        } else {
            self.long_argument(at, info)?
        };
        Ok(match (major, arg) {
            (MAJOR_UNSIGNED, Some(v)) => Head::Unsigned(v),
            (MAJOR_NEGATIVE, Some(v)) => Head::Negative(v),
            (MAJOR_BYTES, len) => Head::Bytes(len),
            (MAJOR_TEXT, len) => Head::Text(len),
            (MAJOR_ARRAY, len) => Head::Array(len),
            (MAJOR_MAP, len) => Head::Map(len),
            (MAJOR_TAG, Some(v)) => Head::Tag(v),
            (MAJOR_SIMPLE, None) => Head::Break,
            (MAJOR_SIMPLE, Some(v)) if info == 24 && v < 32 => {
                return Err(self.error(at, "simple value below 32 in two-byte form"));
            }
            // false, true, null, undefined, and half, single and double floats.
            (MAJOR_SIMPLE, Some(_)) if matches!(info, 20..=23 | 25..=27) => Head::Simple,
            // Unassigned simple values mean nothing to any reader (the serde path
            // refuses them too), so they are refused here, wherever they stand.
            (MAJOR_SIMPLE, Some(_)) => return Err(self.error(at, "unassigned simple value")),
            _ => return Err(self.error(at, "indefinite length on an integer or tag")),
        })
    }

    /// The argument of a head whose additional information is 24 or more
    /// (`None` for 31, indefinite length); moves past the head.
    fn long_argument(&mut self, at: usize, info: u8) -> Result<Option<u64>, CborError> {
        let width = match info {
            24..=27 => 1usize << (info - 24),
            31 => {
                self.pos += 1;
                return Ok(None);
            }
            _ => return Err(self.error(at, "reserved additional information")),
        };
        let Some(bytes) = self.buf.get(at + 1..at + 1 + width) else {
            return Err(self.error(at, "head runs past the end of the input"));
        };
        let mut be = [0u8; 8];
        be[8 - width..].copy_from_slice(bytes);
        self.pos = at + 1 + width;
        Ok(Some(u64::from_be_bytes(be)))
    }

    /// Reads a definite text string that stands plainly (no tag) at the cursor,
    /// as raw bytes for comparing with known ASCII names: `None`, with nothing
    /// consumed, for anything else. The caller checks UTF-8 of what it does not recognise.
    pub(crate) fn plain_text_bytes(&mut self) -> Result<Option<&'a [u8]>, CborError> {
        let buf: &'a [u8] = self.buf;
        Ok(self.plain_text_range()?.map(|range| &buf[range]))
    }

    /// [`Reader::plain_text_bytes`] as the range of the content in the buffer
    /// (for a `Bytes` view of it).
    #[inline]
    pub(crate) fn plain_text_range(&mut self) -> Result<Option<Range<usize>>, CborError> {
        let mut ahead = self.clone();
        let Head::Text(Some(len)) = ahead.head()? else {
            return Ok(None);
        };
        let range = ahead.take(len, self.pos)?;
        *self = ahead;
        Ok(Some(range))
    }

    /// Moves past `bytes` when they come next, as in a payload written in a
    /// known order; a comparison of a known size is a few integer compares.
    #[inline]
    pub(crate) fn expect<const N: usize>(&mut self, bytes: &[u8; N]) -> Option<()> {
        let next = self.buf.get(self.pos..)?.first_chunk::<N>()?;
        (next == bytes).then(|| self.pos += N)
    }

    /// Reads the next head without moving.
    pub(crate) fn peek_head(&self) -> Result<Head, CborError> {
        self.clone().head()
    }

    /// Reads a head, passing over any tags in front of it.
    pub(crate) fn head_skipping_tags(&mut self) -> Result<Head, CborError> {
        loop {
            match self.head()? {
                Head::Tag(_) => continue,
                head => return Ok(head),
            }
        }
    }

    /// Reads the content of a string whose head (`Bytes` or `Text`, `major`) was just read.
    pub(crate) fn string_body(&mut self, major: u8, len: Option<u64>, at: usize) -> Result<StrBytes, CborError> {
        if let Some(len) = len {
            let range = self.take(len, at)?;
            if major == MAJOR_TEXT {
                check_utf8(&self.buf[range.clone()], at)?;
            }
            return Ok(StrBytes::Slice(range));
        }
        // Indefinite: definite chunks of the same major type until a break.
        // The buffer grows only by bytes that are present.
        let mut joined = Vec::new();
        loop {
            let chunk_at = self.pos;
            match self.head()? {
                Head::Break => return Ok(StrBytes::Owned(joined)),
                Head::Bytes(Some(n)) if major == MAJOR_BYTES => {
                    let r = self.take(n, chunk_at)?;
                    joined.extend_from_slice(&self.buf[r]);
                }
                Head::Text(Some(n)) if major == MAJOR_TEXT => {
                    let r = self.take(n, chunk_at)?;
                    check_utf8(&self.buf[r.clone()], chunk_at)?;
                    joined.extend_from_slice(&self.buf[r]);
                }
                _ => {
                    return Err(
                        self.error(chunk_at, "chunk of an indefinite string is not a definite string of its type")
                    );
                }
            }
        }
    }

    /// Reads a text string (tags before it are passed over); anything else is `expected`.
    pub(crate) fn text(&mut self, expected: &'static str) -> Result<Cow<'a, str>, CborError> {
        let at = self.pos;
        match self.head_skipping_tags()? {
            Head::Text(Some(len)) => {
                let r = self.take(len, at)?;
                let buf: &'a [u8] = self.buf;
                std::str::from_utf8(&buf[r]).map(Cow::Borrowed).map_err(|_| self.error(at, UTF8_REASON))
            }
            // Chunks were checked one by one; the join is checked again, off the hot path.
            Head::Text(None) => match self.string_body(MAJOR_TEXT, None, at)? {
                StrBytes::Owned(v) => String::from_utf8(v).map(Cow::Owned).map_err(|_| self.error(at, UTF8_REASON)),
                StrBytes::Slice(_) => Err(self.error(at, expected)),
            },
            _ => Err(self.error(at, expected)),
        }
    }

    /// Reads a byte string (tags before it are passed over); anything else is `expected`.
    pub(crate) fn bytes(&mut self, expected: &'static str) -> Result<StrBytes, CborError> {
        let at = self.pos;
        match self.head_skipping_tags()? {
            Head::Bytes(len) => self.string_body(MAJOR_BYTES, len, at),
            _ => Err(self.error(at, expected)),
        }
    }

    /// Reads an unsigned integer (tags before it are passed over); anything else is `expected`.
    pub(crate) fn unsigned(&mut self, expected: &'static str) -> Result<u64, CborError> {
        let at = self.pos;
        match self.head_skipping_tags()? {
            Head::Unsigned(v) => Ok(v),
            _ => Err(self.error(at, expected)),
        }
    }

    /// Moves past one complete item, checking that it is well formed and nests
    /// at most `max_depth` levels. Returns whether it used indefinite lengths.
    pub(crate) fn skip_item(&mut self, max_depth: usize) -> Result<bool, CborError> {
        /// Items still owed by an open container.
        #[derive(Clone, Copy)]
        enum Open {
            /// A definite array, map (two items per entry) or tag.
            Counted(u64),
            /// An indefinite array or map; for a map, `items` must be even at the break.
            Indefinite { is_map: bool, items: u64 },
        }
        let max_depth = max_depth.min(MAX_NESTING_DEPTH);
        let mut stack = [Open::Counted(0); MAX_NESTING_DEPTH];
        let mut depth = 0usize;
        let mut indefinite = false;
        loop {
            let at = self.pos;
            let head = self.head()?;
            let mut open = |reader: &Self, o: Open| {
                if depth == max_depth {
                    return Err(reader.error(at, "nesting deeper than the limit"));
                }
                stack[depth] = o;
                depth += 1;
                Ok(())
            };
            let mut completed = match head {
                Head::Unsigned(_) | Head::Negative(_) | Head::Simple => true,
                Head::Bytes(len) | Head::Text(len) => {
                    let major = if matches!(head, Head::Bytes(_)) { MAJOR_BYTES } else { MAJOR_TEXT };
                    indefinite |= len.is_none();
                    self.string_body(major, len, at)?;
                    true
                }
                Head::Array(Some(n)) | Head::Map(Some(n)) => {
                    let items = if matches!(head, Head::Map(_)) { n.checked_mul(2) } else { Some(n) };
                    // Every item takes at least one byte: a count above what is
                    // left is a lie, refused before anyone sizes anything by it.
                    match items {
                        Some(0) => true,
                        Some(items) if items <= self.remaining() as u64 => {
                            open(self, Open::Counted(items))?;
                            false
                        }
                        _ => {
                            return Err(self.error(at, "item count runs past the end of the input"));
                        }
                    }
                }
                Head::Array(None) | Head::Map(None) => {
                    indefinite = true;
                    open(self, Open::Indefinite { is_map: matches!(head, Head::Map(_)), items: 0 })?;
                    false
                }
                Head::Tag(_) => {
                    open(self, Open::Counted(1))?;
                    false
                }
                Head::Break => match depth.checked_sub(1).map(|top| stack[top]) {
                    Some(Open::Indefinite { is_map, items }) => {
                        if is_map && items % 2 == 1 {
                            return Err(self.error(at, "break after a map key with no value"));
                        }
                        depth -= 1;
                        true
                    }
                    _ => return Err(self.error(at, "break outside an indefinite-length item")),
                },
            };
            // Credit the finished item to its container, closing containers that are full.
            while completed {
                let Some(top) = depth.checked_sub(1) else {
                    return Ok(indefinite);
                };
                match &mut stack[top] {
                    Open::Counted(n) => {
                        *n -= 1;
                        if *n == 0 {
                            depth -= 1;
                        } else {
                            completed = false;
                        }
                    }
                    Open::Indefinite { items, .. } => {
                        *items += 1;
                        completed = false;
                    }
                }
            }
        }
    }
}

const UTF8_REASON: &str = "text string is not valid UTF-8";

/// Checks that a text string's bytes, read at `at`, are UTF-8.
pub(crate) fn check_utf8(bytes: &[u8], at: usize) -> Result<(), CborError> {
    std::str::from_utf8(bytes).map(drop).map_err(|_| CborError { offset: at, reason: UTF8_REASON })
}

/// Facts about one checked item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Checked {
    /// The item used indefinite lengths somewhere.
    pub(crate) indefinite: bool,
}

/// Checks that `buf` holds exactly one well-formed item nesting at most `max_depth` levels.
pub(crate) fn check_item(buf: &[u8], max_depth: usize) -> Result<Checked, CborError> {
    let mut reader = Reader::new(buf);
    let indefinite = reader.skip_item(max_depth)?;
    if !reader.is_at_end() {
        return Err(reader.error(reader.position(), "bytes left over after the item"));
    }
    Ok(Checked { indefinite })
}

/// Reads a shortest-form head of major type `major` at the start of `buf`:
/// its argument and size. `None` for another major type, a non-shortest or
/// indefinite head, or too few bytes (the caller then takes the general path).
#[inline(always)]
pub(crate) fn shortest_head(buf: &[u8], major: u8) -> Option<(u64, usize)> {
    let (&initial, rest) = buf.split_first()?;
    if initial >> 5 != major {
        return None;
    }
    // Each size is shortest only above the largest value of the size below.
    match initial & 0x1f {
        info @ 0..=23 => Some((u64::from(info), 1)),
        24 => {
            let v = *rest.first()?;
            (v > 23).then_some((u64::from(v), 2))
        }
        25 => {
            let v = u16::from_be_bytes(*rest.first_chunk()?);
            (v > 0xff).then_some((u64::from(v), 3))
        }
        26 => {
            let v = u32::from_be_bytes(*rest.first_chunk()?);
            (v > 0xffff).then_some((u64::from(v), 5))
        }
        27 => {
            let v = u64::from_be_bytes(*rest.first_chunk()?);
            (v > 0xffff_ffff).then_some((v, 9))
        }
        _ => None,
    }
}

/// The content of a string of major type `major` (bytes or text) that is all of
/// `buf`, head in shortest form: `None` for anything else (the caller then takes
/// the general path). Text is returned unchecked; the caller checks UTF-8.
#[inline(always)]
pub(crate) fn shortest_string_to_end(buf: &[u8], major: u8) -> Option<&[u8]> {
    let (len, used) = shortest_head(buf, major)?;
    let content = &buf[used..];
    (content.len() as u64 == len).then_some(content)
}

/// Size of the shortest head carrying `arg`.
pub(crate) const fn head_len(arg: u64) -> usize {
    match arg {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// The shortest head of major type `major` carrying `arg`: bytes and their count.
pub(crate) fn head_bytes(major: u8, arg: u64) -> ([u8; 9], usize) {
    let mut head = [0u8; 9];
    let len = head_len(arg);
    head[0] = major << 5
        | match len {
            1 => arg as u8,
            2 => 24,
            3 => 25,
            5 => 26,
            _ => 27,
        };
    head[1..len].copy_from_slice(&arg.to_be_bytes()[8 - (len - 1)..]);
    (head, len)
}

/// Writes the shortest head of major type `major` carrying `arg`.
///
/// Each arm copies a fixed number of bytes of [`head_bytes`], which compiles
/// to a few stores instead of a call to `memcpy` with a variable length.
#[inline(always)]
pub(crate) fn put_head(dst: &mut BytesMut, major: u8, arg: u64) {
    let (head, len) = head_bytes(major, arg);
    match len {
        1 => dst.put_u8(head[0]),
        2 => dst.put_slice(&head[..2]),
        3 => dst.put_slice(&head[..3]),
        5 => dst.put_slice(&head[..5]),
        _ => dst.put_slice(&head),
    }
}

/// Size of a text string item.
pub(crate) const fn text_len(s: &str) -> usize {
    head_len(s.len() as u64) + s.len()
}

/// Writes a text string item.
#[inline]
pub(crate) fn put_text(dst: &mut BytesMut, s: &str) {
    put_head(dst, MAJOR_TEXT, s.len() as u64);
    dst.put_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn shortest_heads() {
        for (arg, want) in [
            (0u64, "00"),
            (23, "17"),
            (24, "1818"),
            (255, "18ff"),
            (256, "190100"),
            (65536, "1a00010000"),
            (u64::MAX, "1bffffffffffffffff"),
        ] {
            let mut b = BytesMut::new();
            put_head(&mut b, MAJOR_UNSIGNED, arg);
            assert_eq!(b[..], hex(want)[..], "{arg}");
            assert_eq!(head_len(arg), b.len());
        }
        // Both writers, at every boundary of every head size.
        for arg in [0u64, 23, 24, 0xff, 0x100, 0xffff, 0x1_0000, 0xffff_ffff, 0x1_0000_0000, u64::MAX] {
            for major in [MAJOR_UNSIGNED, MAJOR_NEGATIVE, MAJOR_BYTES, MAJOR_TEXT] {
                let mut b = BytesMut::new();
                put_head(&mut b, major, arg);
                let (head, len) = head_bytes(major, arg);
                assert_eq!(b[..], head[..len], "{major} {arg}");
                assert_eq!(shortest_head(&b, major), Some((arg, len)));
            }
        }
        // Not shortest, cut short, another major type, indefinite or reserved: declined.
        for h in [
            "1817",
            "1900ff",
            "1a0000ffff",
            "1b00000000ffffffff",
            "18",
            "1901",
            "1a000100",
            "1b01",
            "1c",
            "1f",
            "",
            "38ff",
        ] {
            assert_eq!(shortest_head(&hex(h), MAJOR_UNSIGNED), None, "{h}");
        }
    }

    #[test]
    fn well_formed_items_pass() {
        for h in [
            "a0",
            "80",
            "f6",
            "1bffffffffffffffff",
            "3b0000000000000000",
            "5f41614162ff",
            "7f6161ff",
            "9f01029f03ffff",
            "bf6161a0ff",
            "c1c2c3a0",
            "f93c00",
            "fa3f800000",
            "fb3ff0000000000000",
            "84f4f5f6f7",
            "a1616180",
            "1800",
        ] {
            check_item(&hex(h), MAX_NESTING_DEPTH).unwrap_or_else(|e| panic!("{h}: {e}"));
        }
        assert!(check_item(&hex("5f41614162ff"), 8).unwrap().indefinite);
        assert!(!check_item(&hex("a1616180"), 8).unwrap().indefinite);
    }

    #[test]
    fn malformed_items_fail_with_a_reason() {
        for (h, reason) in [
            ("", "input ends where an item was expected"),
            ("1c", "reserved additional information"),
            ("1f", "indefinite length on an integer or tag"),
            ("ff", "break outside an indefinite-length item"),
            ("f801", "simple value below 32 in two-byte form"),
            ("f820", "unassigned simple value"),
            ("e0", "unassigned simple value"),
            ("5b4000000000000000", "length runs past the end of the input"),
            ("9bffffffffffffffff", "item count runs past the end of the input"),
            ("bbffffffffffffffff", "item count runs past the end of the input"),
            ("5f6161ff", "chunk of an indefinite string is not a definite string of its type"),
            ("62c328", "text string is not valid UTF-8"),
            ("bf6161", "input ends where an item was expected"),
            ("bf61ff", "text string is not valid UTF-8"),
            ("bf6161ff", "break after a map key with no value"),
            ("0000", "bytes left over after the item"),
            ("1a0000", "head runs past the end of the input"),
        ] {
            let err = check_item(&hex(h), MAX_NESTING_DEPTH).unwrap_err();
            assert_eq!(err.reason, reason, "{h}");
        }
    }

    #[test]
    fn depth_is_bounded_without_recursion() {
        let mut deep = vec![0x81u8; 1_000_000];
        deep.push(0);
        let err = check_item(&deep, MAX_NESTING_DEPTH).unwrap_err();
        assert_eq!((err.reason, err.offset), ("nesting deeper than the limit", MAX_NESTING_DEPTH));
        let mut tags = vec![0xc1u8; 100];
        tags.push(0);
        assert!(check_item(&tags, MAX_NESTING_DEPTH).is_err());
        let mut ok = vec![0x81u8; MAX_NESTING_DEPTH];
        ok.push(0);
        check_item(&ok, MAX_NESTING_DEPTH).unwrap();
    }
}
