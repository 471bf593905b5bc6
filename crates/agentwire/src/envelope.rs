//! The body of a frame: the CBOR map `{"v": generation, "t": type, "p": payload}`.
//!
//! Reading accepts the entries in any order, skips keys it does not know, and
//! takes indefinite-length strings and non-shortest heads; the payload comes
//! out as where it lies in the body when it was a definite byte string, so a
//! caller can read it in place or take a [`Bytes`] view of it.
//! Writing produces the canonical form byte for byte: `a3 61 76 <v> 61 74 <t> 61 70 <p>`.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use crate::cbor::{self, CborError, Head, MAX_NESTING_DEPTH, Reader, StrBytes};
use crate::message::{MessageType, TypeName};

const KEY_V: &[u8] = b"\x61v";
const KEY_T: &[u8] = b"\x61t";
const KEY_P: &[u8] = b"\x61p";
/// A map of three entries.
const MAP3: u8 = 0xa3;

/// An envelope as read from a body; it borrows nothing, the payload is where
/// it lies in the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Envelope {
    pub(crate) version: u8,
    pub(crate) type_name: TypeName,
    pub(crate) payload: Payload,
}

/// Where the payload is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Payload {
    /// A definite byte string: this range of the body.
    InBody(Range<usize>),
    /// An indefinite one: its chunks joined.
    Joined(Bytes),
}

impl Payload {
    /// The payload, from the body it was read from.
    pub(crate) fn slice<'a>(&'a self, body: &'a [u8]) -> &'a [u8] {
        match self {
            Payload::InBody(range) => &body[range.clone()],
            Payload::Joined(joined) => joined,
        }
    }

    /// The payload as a view of the body it was read from.
    pub(crate) fn to_bytes(&self, body: &Bytes) -> Bytes {
        match self {
            Payload::InBody(range) => body.slice(range.clone()),
            Payload::Joined(joined) => joined.clone(),
        }
    }
}

/// Size of the envelope up to the payload's byte-string head.
pub(crate) fn prefix_len(version: u8, type_name: &str) -> usize {
    1 + KEY_V.len() + cbor::head_len(u64::from(version)) + KEY_T.len() + cbor::text_len(type_name) + KEY_P.len()
}

/// Size of a body whose payload is `payload_len` bytes.
pub(crate) fn body_len(version: u8, type_name: &str, payload_len: usize) -> usize {
    prefix_len(version, type_name) + cbor::head_len(payload_len as u64) + payload_len
}

/// Writes the envelope up to the payload's byte-string head, which the caller
/// writes next, followed by the payload.
pub(crate) fn put_prefix(dst: &mut BytesMut, version: u8, type_name: &str) {
    dst.put_u8(MAP3);
    dst.put_slice(KEY_V);
    cbor::put_head(dst, cbor::MAJOR_UNSIGNED, u64::from(version));
    dst.put_slice(KEY_T);
    cbor::put_text(dst, type_name);
    dst.put_slice(KEY_P);
}

/// An envelope key, as read.
enum Key {
    V,
    T,
    P,
    Other,
}

/// Reads the envelope of `body`.
#[inline]
pub(crate) fn decode(body: &[u8]) -> Result<Envelope, CborError> {
    match decode_canonical(body) {
        Some(envelope) => Ok(envelope),
        None => decode_liberal(body),
    }
}

/// Reads the canonical form every writer produces, with a few comparisons:
/// `a3 61 76 <v> 61 74 <t> 61 70 <p>`, shortest heads, nothing after `p`.
/// `None` for any other form; the liberal reader then gives the answer, which
/// for canonical input is the same.
fn decode_canonical(body: &[u8]) -> Option<Envelope> {
    let (version, name, payload) = canonical_parts(body)?;
    Some(Envelope { version, type_name: TypeName::from_wire_bytes(name)?, payload: Payload::InBody(payload) })
}

/// The canonical form of a type of this generation: its version, type and
/// where the payload lies, without building an [`Envelope`]. `None` for
/// anything else, which [`decode`] then reads.
#[inline]
pub(crate) fn decode_known(body: &[u8]) -> Option<(u8, MessageType, Range<usize>)> {
    let (version, name, payload) = canonical_parts(body)?;
    Some((version, MessageType::from_wire_bytes(name)?, payload))
}

/// The version, the type name's bytes (unchecked) and the payload's range of a
/// canonical envelope.
#[inline(always)]
fn canonical_parts(body: &[u8]) -> Option<(u8, &[u8], Range<usize>)> {
    // `a3 61 76 <v> 61 74` in one compare: every generation so far is below
    // 24, a one-byte head. (A larger `v` is read by the liberal reader.)
    let (&[MAP3, 0x61, b'v', version @ 0..=23, 0x61, b't'], rest) = body.split_first_chunk::<6>()? else {
        return None;
    };
    let (name_len, used) = cbor::shortest_head(rest, cbor::MAJOR_TEXT)?;
    let (name, rest) = rest[used..].split_at_checked(usize::try_from(name_len).ok()?)?;
    let payload = cbor::shortest_string_to_end(rest.strip_prefix(KEY_P)?, cbor::MAJOR_BYTES)?;
    Some((version, name, body.len() - payload.len()..body.len()))
}

/// Reads any form the spec allows: entries in any order, unknown keys,
/// non-shortest heads, indefinite lengths, tags.
#[inline(never)]
fn decode_liberal(body: &[u8]) -> Result<Envelope, CborError> {
    let mut r = Reader::new(body);
    let at = r.position();
    let entries = match r.head_skipping_tags()? {
        Head::Map(n) => n,
        _ => return Err(r.error(at, "body is not a CBOR map")),
    };
    let (mut version, mut type_name, mut payload) = (None, None, None);
    let mut seen = 0u64;
    loop {
        match entries {
            Some(n) if seen == n => break,
            None if r.peek_head()? == Head::Break => {
                r.head()?;
                break;
            }
            _ => {}
        }
        seen += 1;
        let key_at = r.position();
        // The three known keys are one ASCII letter: compare bytes, and check
        // UTF-8 only for keys that are not them.
        let key = match r.plain_text_bytes()? {
            Some(b"v") => Key::V,
            Some(b"t") => Key::T,
            Some(b"p") => Key::P,
            Some(other) => {
                cbor::check_utf8(other, key_at)?;
                Key::Other
            }
            // A tagged or indefinite-length key: the general reader.
            None => match &*r.text("envelope key is not a text string")? {
                "v" => Key::V,
                "t" => Key::T,
                "p" => Key::P,
                _ => Key::Other,
            },
        };
        let duplicate = |r: &Reader<'_>| r.error(key_at, "duplicate envelope key");
        match key {
            Key::V => {
                let value_at = r.position();
                let v = r.unsigned("v is not an unsigned integer")?;
                let v = u8::try_from(v).map_err(|_| r.error(value_at, "v does not fit in a u8"))?;
                if version.replace(v).is_some() {
                    return Err(duplicate(&r));
                }
            }
            Key::T => {
                let t = r.text("t is not a text string")?;
                if type_name.replace(TypeName::from_wire_name(&t)).is_some() {
                    return Err(duplicate(&r));
                }
            }
            Key::P => {
                let p = match r.bytes("p is not a byte string")? {
                    StrBytes::Slice(range) => Payload::InBody(range),
                    StrBytes::Owned(joined) => Payload::Joined(Bytes::from(joined)),
                };
                if payload.replace(p).is_some() {
                    return Err(duplicate(&r));
                }
            }
            // A newer peer's key: skip its value, however it is shaped.
            Key::Other => {
                r.skip_item(MAX_NESTING_DEPTH)?;
            }
        }
    }
    if !r.is_at_end() {
        return Err(r.error(r.position(), "bytes left over after the envelope"));
    }
    let end = r.position();
    Ok(Envelope {
        version: version.ok_or_else(|| r.error(end, "envelope has no v"))?,
        type_name: type_name.ok_or_else(|| r.error(end, "envelope has no t"))?,
        payload: payload.ok_or_else(|| r.error(end, "envelope has no p"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageType;

    fn hex(s: &str) -> Bytes {
        Bytes::from((0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect::<Vec<_>>())
    }

    #[test]
    fn canonical_head_matches_the_spec_example() {
        let mut b = BytesMut::new();
        put_prefix(&mut b, 7, "core.ready");
        cbor::put_head(&mut b, cbor::MAJOR_BYTES, 0);
        assert_eq!(&b[..], &hex("a36176076174 6a636f72652e7265616479 617040".replace(' ', "").as_str())[..]);
        assert_eq!(b.len(), body_len(7, "core.ready", 0));
    }

    #[test]
    fn payload_is_a_view_of_the_body() {
        let body = hex("a3617607617470636f72652e657865632e657869746564617048a164636f6465182a");
        let env = decode(&body).unwrap();
        assert_eq!(env.type_name, TypeName::Known(MessageType::ExecExited));
        assert_eq!(env.payload, Payload::InBody(body.len() - 8..body.len()));
        assert_eq!(env.payload.to_bytes(&body).as_ptr(), body[body.len() - 8..].as_ptr());
    }

    #[test]
    fn canonical_and_liberal_readers_agree_on_canonical_input() {
        let body = hex("a3617607617470636f72652e657865632e657869746564617048a164636f6465182a");
        assert_eq!(decode_canonical(&body), Some(decode_liberal(&body).unwrap()));
        // Non-shortest v, an unknown type, trailing bytes: the canonical reader declines or agrees.
        for h in [
            "a36176180761747000000000000000000000000000000000617040",
            "a361760761746178617040",
            "a361760761746178617040ff",
            "a3617607617461786170420000",
        ] {
            let body = hex(h);
            if let Some(env) = decode_canonical(&body) {
                assert_eq!(Ok(env), decode_liberal(&body), "{h}");
            }
        }
        assert_eq!(decode_canonical(&hex("a361760761746178617040ff")), None);
    }

    #[test]
    fn liberal_forms_are_read() {
        // Indefinite maps with the keys out of order and an unknown key whose
        // value is nested, but a value of the wrong kind: read up to it, then refused.
        for (h, reason) in [
            // {_ "p": h'a0', "z": [{}, null], "t": 7 (non-shortest head)
            ("bf617041a0617a82a0f661741b0000000000000007", "t is not a text string"),
            // {_ "p": 0 (non-shortest head), ...
            ("bf61701800617a82a0f66174", "p is not a byte string"),
        ] {
            let err = decode(&hex(h)).unwrap_err();
            assert_eq!(err.reason, reason, "{h}");
        }
        let body =
            hex(&format!("bf617041a0617a82a0f66176180761747f64{}6c{}ffff", "636f7265", "2e657865632e657869746564"));
        let env = decode(&body).unwrap();
        assert_eq!((env.version, env.type_name.as_str()), (7, "core.exec.exited"));
    }

    #[test]
    fn strict_about_what_cannot_be_meant() {
        for (h, reason) in [
            ("07", "body is not a CBOR map"),
            ("ff", "body is not a CBOR map"),
            ("bf617607ff", "envelope has no t"),
            ("a3617619010061746161617040", "v does not fit in a u8"),
            ("a36176076174016170 40", "t is not a text string"),
            ("a361760761746161617001", "p is not a byte string"),
            ("a4617607617607617461616170 40", "duplicate envelope key"),
            ("a3617607617461616170 40 00", "bytes left over after the envelope"),
            ("a261760761746161", "envelope has no p"),
            ("a30107617461616170 40", "envelope key is not a text string"),
            ("a361760761746161617041", "length runs past the end of the input"),
        ] {
            let err = decode(&hex(&h.replace(' ', ""))).unwrap_err();
            assert_eq!(err.reason, reason, "{h}");
        }
    }
}
