//! The default path of every payload type: its serde derives run against a
//! CBOR serializer that writes straight into the destination buffer and a
//! deserializer that reads the payload where it lies, instead of ciborium.
//!
//! Both cover only the plain form, the one the deployed implementation writes
//! (definite lengths, no tags, no floats, no undefined). Anything else makes
//! them return an error that the callers in [`super`] answer by taking the serde
//! path through ciborium ([`super::serde_encode`], [`super::serde_decode`]), so
//! the result, and every error message, is always the serde path's. That makes
//! the rule simple: the fast path may refuse anything, but what it accepts it
//! must read to the same value as check-then-ciborium would. Hence it mirrors
//! ciborium 0.2's choice of visitor method for each `deserialize_*` call, and
//! refuses wherever check or ciborium would fail (invalid UTF-8 in any text,
//! strings above ciborium's 4096-byte scratch where ciborium needs it, nesting
//! deeper than [`MAX_NESTING_DEPTH`], leftover bytes).

use std::fmt;

use bytes::{BufMut, BytesMut};
use serde::de::{self, DeserializeSeed, Visitor};
use serde::ser::{self, Serialize};

use crate::cbor::{
    self, MAJOR_ARRAY, MAJOR_BYTES, MAJOR_MAP, MAJOR_NEGATIVE, MAJOR_TEXT, MAJOR_UNSIGNED, MAX_NESTING_DEPTH,
};

/// ciborium reads identifiers, `deserialize_str` and `deserialize_bytes` into a
/// scratch buffer of this size and fails above it; so does this reader.
pub(crate) const CIBORIUM_SCRATCH: u64 = 4096;

/// The fast path declined: the caller takes the serde path, which gives the
/// answer (value or error). Carries no message, so declining costs nothing.
#[derive(Debug)]
pub(crate) struct Declined;

impl fmt::Display for Declined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("declined by the fast CBOR path")
    }
}

impl std::error::Error for Declined {}

impl ser::Error for Declined {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Declined
    }
}

impl de::Error for Declined {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Declined
    }
}

// ---------------------------------------------------------------- writing

/// Where the serializer's bytes go: a buffer, or a counter that sizes one.
pub(crate) trait Sink {
    /// Writes the shortest head of `major` carrying `arg`.
    fn head(&mut self, major: u8, arg: u64);
    /// Writes raw bytes.
    fn bytes(&mut self, b: &[u8]);
}

impl Sink for BytesMut {
    /// Each size writes a fixed-size array: a few stores, where building the
    /// 9-byte head of `cbor::head_bytes` and copying part of it cost a quarter
    /// of a whole `core.exec.request` (measured with callgrind). Not folded
    /// into `cbor::put_head`: tried, the inlining it moved cost 393 more
    /// instructions per `core.exec.request` decode (callgrind_types.sh),
    /// which does not even write. The property tests and the `payload` fuzz
    /// target hold what it writes to ciborium's bytes.
    #[inline]
    fn head(&mut self, major: u8, arg: u64) {
        let m = major << 5;
        if arg < 24 {
            self.put_u8(m | arg as u8);
        } else if arg <= 0xff {
            self.put_slice(&[m | 24, arg as u8]);
        } else if arg <= 0xffff {
            let [a, b] = (arg as u16).to_be_bytes();
            self.put_slice(&[m | 25, a, b]);
        } else if arg <= 0xffff_ffff {
            let [a, b, c, d] = (arg as u32).to_be_bytes();
            self.put_slice(&[m | 26, a, b, c, d]);
        } else {
            let [a, b, c, d, e, f, g, h] = arg.to_be_bytes();
            self.put_slice(&[m | 27, a, b, c, d, e, f, g, h]);
        }
    }
    #[inline]
    fn bytes(&mut self, b: &[u8]) {
        self.put_slice(b);
    }
}

/// Counts what would be written.
pub(crate) struct Counter(pub(crate) usize);

impl Sink for Counter {
    #[inline]
    fn head(&mut self, _major: u8, arg: u64) {
        self.0 += cbor::head_len(arg);
    }
    #[inline]
    fn bytes(&mut self, b: &[u8]) {
        self.0 += b.len();
    }
}

/// Writes canonical CBOR exactly as ciborium 0.2 does for everything it covers.
pub(crate) struct Ser<'a, S: Sink>(pub(crate) &'a mut S);

/// Serializes `value` into `sink`; `Err` when some part is not covered (the
/// caller then discards what was written and takes the serde path).
#[inline]
pub(crate) fn to_sink<T: Serialize + ?Sized, S: Sink>(value: &T, sink: &mut S) -> Result<(), Declined> {
    value.serialize(&mut Ser(sink))
}

impl<S: Sink> Ser<'_, S> {
    #[inline]
    fn text(&mut self, s: &str) {
        self.0.head(MAJOR_TEXT, s.len() as u64);
        self.0.bytes(s.as_bytes());
    }
}

/// The serializer names ciborium gives a special meaning (its `tag` module).
fn is_ciborium_tag(name: &str) -> bool {
    name == "@@TAG@@"
}

impl<S: Sink> ser::Serializer for &mut Ser<'_, S> {
    type Ok = ();
    type Error = Declined;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn is_human_readable(&self) -> bool {
        false
    }

    #[inline]
    fn serialize_bool(self, v: bool) -> Result<(), Declined> {
        self.0.bytes(&[if v { cbor::TRUE } else { cbor::FALSE }]);
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), Declined> {
        self.serialize_i64(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<(), Declined> {
        self.serialize_i64(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<(), Declined> {
        self.serialize_i64(v.into())
    }
    #[inline]
    fn serialize_i64(self, v: i64) -> Result<(), Declined> {
        // Negative integers are major type 1 carrying -1 - v, as ciborium writes them.
        if v < 0 {
            self.0.head(MAJOR_NEGATIVE, !(v as u64));
        } else {
            self.0.head(MAJOR_UNSIGNED, v as u64);
        }
        Ok(())
    }
    fn serialize_i128(self, v: i128) -> Result<(), Declined> {
        // Beyond 64 bits ciborium writes a bignum tag: left to it.
        match i64::try_from(v) {
            Ok(v) => self.serialize_i64(v),
            Err(_) if v > 0 => self.serialize_u128(v as u128),
            Err(_) => match u64::try_from(!v) {
                Ok(n) => {
                    self.0.head(MAJOR_NEGATIVE, n);
                    Ok(())
                }
                Err(_) => Err(Declined),
            },
        }
    }
    fn serialize_u8(self, v: u8) -> Result<(), Declined> {
        self.serialize_u64(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<(), Declined> {
        self.serialize_u64(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<(), Declined> {
        self.serialize_u64(v.into())
    }
    #[inline]
    fn serialize_u64(self, v: u64) -> Result<(), Declined> {
        self.0.head(MAJOR_UNSIGNED, v);
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> Result<(), Declined> {
        u64::try_from(v).map_err(|_| Declined).and_then(|v| self.serialize_u64(v))
    }
    // ciborium picks the shortest float that keeps the value; not worth copying
    // for types that have no float.
    fn serialize_f32(self, _v: f32) -> Result<(), Declined> {
        Err(Declined)
    }
    fn serialize_f64(self, _v: f64) -> Result<(), Declined> {
        Err(Declined)
    }
    fn serialize_char(self, v: char) -> Result<(), Declined> {
        self.text(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    #[inline]
    fn serialize_str(self, v: &str) -> Result<(), Declined> {
        self.text(v);
        Ok(())
    }
    #[inline]
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Declined> {
        self.0.head(MAJOR_BYTES, v.len() as u64);
        self.0.bytes(v);
        Ok(())
    }
    #[inline]
    fn serialize_none(self) -> Result<(), Declined> {
        self.0.bytes(&[cbor::NULL]);
        Ok(())
    }
    #[inline]
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Declined> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Declined> {
        self.serialize_none()
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Declined> {
        self.serialize_none()
    }
    #[inline]
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<(), Declined> {
        self.text(variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Result<(), Declined> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Declined> {
        if is_ciborium_tag(name) {
            return Err(Declined);
        }
        self.0.head(MAJOR_MAP, 1);
        self.text(variant);
        value.serialize(self)
    }
    #[inline]
    fn serialize_seq(self, len: Option<usize>) -> Result<Self, Declined> {
        // Unknown length: ciborium writes an indefinite array; left to it.
        let len = len.ok_or(Declined)?;
        self.0.head(MAJOR_ARRAY, len as u64);
        Ok(self)
    }
    fn serialize_tuple(self, len: usize) -> Result<Self, Declined> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Self, Declined> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, Declined> {
        if is_ciborium_tag(name) {
            return Err(Declined);
        }
        self.0.head(MAJOR_MAP, 1);
        self.text(variant);
        self.0.head(MAJOR_ARRAY, len as u64);
        Ok(self)
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self, Declined> {
        // `#[serde(flatten)]` asks for a map of unknown length: left to ciborium.
        let len = len.ok_or(Declined)?;
        self.0.head(MAJOR_MAP, len as u64);
        Ok(self)
    }
    #[inline]
    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<Self, Declined> {
        self.0.head(MAJOR_MAP, len as u64);
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, Declined> {
        self.0.head(MAJOR_MAP, 1);
        self.text(variant);
        self.0.head(MAJOR_MAP, len as u64);
        Ok(self)
    }
}

/// The element-by-element compound serializers, which write each element in
/// turn (the head was written when the compound began).
macro_rules! serialize_elements {
    ($($trait:ident :: $method:ident),* $(,)?) => {$(
        impl<S: Sink> ser::$trait for &mut Ser<'_, S> {
            type Ok = ();
            type Error = Declined;
            #[inline]
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Declined> {
                value.serialize(&mut **self)
            }
            #[inline]
            fn end(self) -> Result<(), Declined> {
                Ok(())
            }
        }
    )*};
}
serialize_elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

impl<S: Sink> ser::SerializeMap for &mut Ser<'_, S> {
    type Ok = ();
    type Error = Declined;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Declined> {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Declined> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Declined> {
        Ok(())
    }
}

/// The field-by-field compound serializers: each field's name, then its value.
macro_rules! serialize_fields {
    ($($trait:ident),*) => {$(
        impl<S: Sink> ser::$trait for &mut Ser<'_, S> {
            type Ok = ();
            type Error = Declined;
            #[inline]
            fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Declined> {
                self.text(key);
                value.serialize(&mut **self)
            }
            #[inline]
            fn end(self) -> Result<(), Declined> {
                Ok(())
            }
        }
    )*};
}
serialize_fields!(SerializeStruct, SerializeStructVariant);

// ---------------------------------------------------------------- reading

/// Reads the plain form of one item from a borrowed slice.
pub(crate) struct De<'de> {
    buf: &'de [u8],
    pos: usize,
    /// Arrays and maps entered, counted as `cbor::check_item` counts them
    /// (here empty ones too, which only declines more).
    depth: usize,
}

/// Reads `p` as exactly one plain item of type `T`; `Err` means "ask the serde path".
#[inline]
pub(crate) fn from_slice<'de, T: de::Deserialize<'de>>(p: &'de [u8]) -> Result<T, Declined> {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            READING.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(READING.with(|r| r.replace(true)));
    let mut d = De { buf: p, pos: 0, depth: 0 };
    let value = T::deserialize(&mut d)?;
    if d.pos == p.len() { Ok(value) } else { Err(Declined) }
}

thread_local! {
    /// Whether this thread is inside [`from_slice`], where a `Deserialize` may
    /// take a shortcut that fails on forms it does not cover: the failure
    /// sends the whole payload to the serde path (see `super::tagged`).
    static READING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the value being deserialized is read by [`from_slice`], whose
/// every error is answered again by the serde path.
pub(crate) fn reading() -> bool {
    READING.with(std::cell::Cell::get)
}

/// An 8-aligned copy of a short text, padded with zeros.
///
/// `str::from_utf8` goes word by word only over aligned stretches of 16 bytes
/// and otherwise spends about 9 instructions a byte (it works out the alignment
/// at every ASCII byte); keys and most values are shorter than 32 bytes and lie
/// anywhere. Copied here, they are checked a word at a time. The zeros after
/// the text are ASCII, so the window is UTF-8 exactly when the text is, and the
/// text ends on a character boundary. Measured with callgrind, this takes a
/// `core.exec.request` decode from about 6,300 instructions to about 6,150 (the
/// identifier path below does the rest).
#[repr(align(8))]
struct Window([u8; WINDOW]);

const WINDOW: usize = 32;

impl Window {
    /// `bytes` (at most [`WINDOW`] long) as text when they are UTF-8.
    #[inline]
    fn text(&mut self, bytes: &[u8]) -> Option<&str> {
        self.0[..bytes.len()].copy_from_slice(bytes);
        std::str::from_utf8(&self.0).ok()?.get(..bytes.len())
    }
}

/// Whether `bytes` are UTF-8 (see [`Window`] for why a copy is faster).
#[inline]
fn is_utf8(bytes: &[u8]) -> bool {
    if bytes.len() <= WINDOW { Window([0; WINDOW]).text(bytes).is_some() } else { std::str::from_utf8(bytes).is_ok() }
}

/// The major type and argument of one plain head.
#[derive(Clone, Copy)]
struct PlainHead {
    major: u8,
    arg: u64,
}

/// The arguments of the heads of `false`, `true` and `null`.
const SIMPLE_FALSE: u64 = (cbor::FALSE & 0x1f) as u64;
const SIMPLE_TRUE: u64 = (cbor::TRUE & 0x1f) as u64;
const SIMPLE_NULL: u64 = (cbor::NULL & 0x1f) as u64;

impl<'de> De<'de> {
    /// Reads one head of the plain form: no indefinite length, no tag, and of
    /// the simple values only false, true and null (floats, undefined and the
    /// rest are left to the serde path).
    #[inline]
    fn head(&mut self) -> Result<PlainHead, Declined> {
        let (&initial, rest) = self.buf[self.pos..].split_first().ok_or(Declined)?;
        let major = initial >> 5;
        let info = initial & 0x1f;
        let (arg, used) = match info {
            0..=23 => (u64::from(info), 1),
            24 if major != 7 => (u64::from(*rest.first().ok_or(Declined)?), 2),
            25 if major != 7 => (u64::from(u16::from_be_bytes(*rest.first_chunk().ok_or(Declined)?)), 3),
            26 if major != 7 => (u64::from(u32::from_be_bytes(*rest.first_chunk().ok_or(Declined)?)), 5),
            27 if major != 7 => (u64::from_be_bytes(*rest.first_chunk().ok_or(Declined)?), 9),
            _ => return Err(Declined),
        };
        match major {
            cbor::MAJOR_TAG => return Err(Declined),
            cbor::MAJOR_SIMPLE if !matches!(arg, SIMPLE_FALSE..=SIMPLE_NULL) => return Err(Declined),
            _ => {}
        }
        self.pos += used;
        Ok(PlainHead { major, arg })
    }

    #[inline]
    fn peek(&self) -> Result<PlainHead, Declined> {
        De { buf: self.buf, pos: self.pos, depth: 0 }.head()
    }

    /// The `len` bytes after the head just read.
    #[inline]
    fn take(&mut self, len: u64) -> Result<&'de [u8], Declined> {
        let buf: &'de [u8] = self.buf;
        let rest = &buf[self.pos..];
        if len > rest.len() as u64 {
            return Err(Declined);
        }
        self.pos += len as usize;
        Ok(&rest[..len as usize])
    }

    /// Reads a text string's content, checked to be UTF-8 (the check refuses
    /// any other), and hands it to the visitor: a short one as a copy, which
    /// serde's visitors of owned values take the same way, a long one borrowed.
    #[inline]
    fn visit_text<V: Visitor<'de>>(&mut self, len: u64, visitor: V) -> Result<V::Value, Declined> {
        let bytes = self.take(len)?;
        if bytes.len() <= WINDOW {
            let mut window = Window([0; WINDOW]);
            visitor.visit_str(window.text(bytes).ok_or(Declined)?)
        } else {
            visitor.visit_borrowed_str(std::str::from_utf8(bytes).map_err(|_| Declined)?)
        }
    }

    /// Enters an array or map of `items` items (twice the entries for a map):
    /// refused past the depth limit, or when the count cannot fit in what is left.
    #[inline]
    fn enter(&mut self, items: u64) -> Result<(), Declined> {
        if self.depth >= MAX_NESTING_DEPTH || items > (self.buf.len() - self.pos) as u64 {
            return Err(Declined);
        }
        self.depth += 1;
        Ok(())
    }

    fn seq<V: Visitor<'de>>(&mut self, len: u64, visitor: V) -> Result<V::Value, Declined> {
        self.enter(len)?;
        let mut access = Counted { de: self, left: len };
        let value = visitor.visit_seq(&mut access)?;
        // A visitor that stopped early would leave ciborium elsewhere in the input.
        if access.left != 0 {
            return Err(Declined);
        }
        self.depth -= 1;
        Ok(value)
    }

    fn map<V: Visitor<'de>>(&mut self, len: u64, visitor: V) -> Result<V::Value, Declined> {
        self.enter(len.checked_mul(2).ok_or(Declined)?)?;
        let mut access = Counted { de: self, left: len };
        let value = visitor.visit_map(&mut access)?;
        if access.left != 0 {
            return Err(Declined);
        }
        self.depth -= 1;
        Ok(value)
    }

    /// Moves past one plain item without recursion, checking what the serde
    /// path's check would: UTF-8 of every text, lengths present, the depth.
    fn skip(&mut self) -> Result<(), Declined> {
        let mut stack = [0u64; MAX_NESTING_DEPTH];
        let base = self.depth;
        let mut open = 0usize;
        loop {
            let h = self.head()?;
            let mut done = match h.major {
                MAJOR_BYTES => {
                    self.take(h.arg)?;
                    true
                }
                MAJOR_TEXT => {
                    if !is_utf8(self.take(h.arg)?) {
                        return Err(Declined);
                    }
                    true
                }
                MAJOR_ARRAY | MAJOR_MAP => {
                    let items = if h.major == MAJOR_MAP { h.arg.checked_mul(2).ok_or(Declined)? } else { h.arg };
                    if base + open >= MAX_NESTING_DEPTH || items > (self.buf.len() - self.pos) as u64 {
                        return Err(Declined);
                    }
                    if items == 0 {
                        true
                    } else {
                        stack[open] = items;
                        open += 1;
                        false
                    }
                }
                _ => true,
            };
            while done {
                let Some(top) = open.checked_sub(1) else {
                    return Ok(());
                };
                stack[top] -= 1;
                if stack[top] == 0 {
                    open -= 1;
                } else {
                    done = false;
                }
            }
        }
    }

    #[inline]
    fn unsigned(&mut self) -> Result<u64, Declined> {
        match self.head()? {
            PlainHead { major: MAJOR_UNSIGNED, arg } => Ok(arg),
            _ => Err(Declined),
        }
    }

    #[inline]
    fn signed(&mut self) -> Result<i64, Declined> {
        let h = self.head()?;
        let v = i64::try_from(h.arg).map_err(|_| Declined)?;
        match h.major {
            MAJOR_UNSIGNED => Ok(v),
            MAJOR_NEGATIVE => Ok(-1 - v),
            _ => Err(Declined),
        }
    }
}

/// Elements of an array or entries of a map still to read.
struct Counted<'a, 'de> {
    de: &'a mut De<'de>,
    left: u64,
}

impl<'de> de::SeqAccess<'de> for &mut Counted<'_, 'de> {
    type Error = Declined;
    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Declined> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }
    fn size_hint(&self) -> Option<usize> {
        usize::try_from(self.left).ok()
    }
}

impl<'de> de::MapAccess<'de> for &mut Counted<'_, 'de> {
    type Error = Declined;
    #[inline]
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Declined> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }
    #[inline]
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Declined> {
        seed.deserialize(&mut *self.de)
    }
    fn size_hint(&self) -> Option<usize> {
        usize::try_from(self.left).ok()
    }
}

/// An enum as ciborium reads it: a text (unit variant) or a one-entry map.
struct Enum<'a, 'de> {
    de: &'a mut De<'de>,
    /// The map form, whose value follows the name.
    has_value: bool,
}

impl<'de> de::EnumAccess<'de> for Enum<'_, 'de> {
    type Error = Declined;
    type Variant = Self;
    #[inline]
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Declined> {
        let variant = seed.deserialize(&mut *self.de)?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for Enum<'_, 'de> {
    type Error = Declined;
    // ciborium reads no value for a unit variant and the following item for
    // any other text-form variant: forms it was never written in, left to it.
    fn unit_variant(self) -> Result<(), Declined> {
        if self.has_value { Err(Declined) } else { Ok(()) }
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Declined> {
        if !self.has_value {
            return Err(Declined);
        }
        seed.deserialize(&mut *self.de)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Declined> {
        if !self.has_value {
            return Err(Declined);
        }
        de::Deserializer::deserialize_any(&mut *self.de, visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Declined> {
        if !self.has_value {
            return Err(Declined);
        }
        de::Deserializer::deserialize_any(&mut *self.de, visitor)
    }
}

impl<'de> de::Deserializer<'de> for &mut De<'de> {
    type Error = Declined;

    fn is_human_readable(&self) -> bool {
        false
    }

    /// As ciborium: integers as u64/i64, text as str, null as none; used by
    /// serde's buffering (`flatten`, internally tagged enums).
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        let h = self.head()?;
        match h.major {
            MAJOR_UNSIGNED => visitor.visit_u64(h.arg),
            MAJOR_NEGATIVE => visitor.visit_i64(-1 - i64::try_from(h.arg).map_err(|_| Declined)?),
            MAJOR_BYTES => visitor.visit_borrowed_bytes(self.take(h.arg)?),
            MAJOR_TEXT => self.visit_text(h.arg, visitor),
            MAJOR_ARRAY => self.seq(h.arg, visitor),
            MAJOR_MAP => self.map(h.arg, visitor),
            _ => match h.arg {
                SIMPLE_FALSE => visitor.visit_bool(false),
                SIMPLE_TRUE => visitor.visit_bool(true),
                _ => visitor.visit_none(),
            },
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.head()? {
            PlainHead { major: cbor::MAJOR_SIMPLE, arg: SIMPLE_FALSE } => visitor.visit_bool(false),
            PlainHead { major: cbor::MAJOR_SIMPLE, arg: SIMPLE_TRUE } => visitor.visit_bool(true),
            _ => Err(Declined),
        }
    }

    // ciborium reads every signed size as i64 and every unsigned one as u64.
    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        visitor.visit_i64(self.signed()?)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        visitor.visit_i64(self.signed()?)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        visitor.visit_i64(self.signed()?)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        visitor.visit_i64(self.signed()?)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        visitor.visit_u64(self.unsigned()?)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        visitor.visit_u64(self.unsigned()?)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        visitor.visit_u64(self.unsigned()?)
    }
    #[inline]
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        visitor.visit_u64(self.unsigned()?)
    }
    fn deserialize_i128<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Declined> {
        Err(Declined)
    }
    fn deserialize_u128<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Declined> {
        Err(Declined)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Declined> {
        Err(Declined)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Declined> {
        Err(Declined)
    }
    fn deserialize_char<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Declined> {
        Err(Declined)
    }

    /// ciborium reads `str` through its scratch buffer: longer ones fail there.
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.head()? {
            PlainHead { major: MAJOR_TEXT, arg } if arg <= CIBORIUM_SCRATCH => self.visit_text(arg, visitor),
            _ => Err(Declined),
        }
    }
    #[inline]
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.head()? {
            PlainHead { major: MAJOR_TEXT, arg } => self.visit_text(arg, visitor),
            _ => Err(Declined),
        }
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.head()? {
            PlainHead { major: MAJOR_BYTES, arg } if arg <= CIBORIUM_SCRATCH => {
                visitor.visit_borrowed_bytes(self.take(arg)?)
            }
            PlainHead { major: MAJOR_ARRAY, arg } => self.seq(arg, visitor),
            _ => Err(Declined),
        }
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.head()? {
            PlainHead { major: MAJOR_BYTES, arg } => visitor.visit_borrowed_bytes(self.take(arg)?),
            PlainHead { major: MAJOR_ARRAY, arg } => self.seq(arg, visitor),
            _ => Err(Declined),
        }
    }

    #[inline]
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.peek()? {
            PlainHead { major: cbor::MAJOR_SIMPLE, arg: SIMPLE_NULL } => {
                self.pos += 1;
                visitor.visit_none()
            }
            _ => visitor.visit_some(self),
        }
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.head()? {
            PlainHead { major: cbor::MAJOR_SIMPLE, arg: SIMPLE_NULL } => visitor.visit_unit(),
            _ => Err(Declined),
        }
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Declined> {
        self.deserialize_unit(visitor)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Declined> {
        visitor.visit_newtype_struct(self)
    }

    #[inline]
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.head()? {
            PlainHead { major: MAJOR_ARRAY, arg } => self.seq(arg, visitor),
            _ => Err(Declined),
        }
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Declined> {
        self.deserialize_seq(visitor)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Declined> {
        self.deserialize_seq(visitor)
    }
    #[inline]
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.head()? {
            PlainHead { major: MAJOR_MAP, arg } => self.map(arg, visitor),
            _ => Err(Declined),
        }
    }
    #[inline]
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Declined> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Declined> {
        if is_ciborium_tag(name) {
            return Err(Declined);
        }
        match self.peek()? {
            PlainHead { major: MAJOR_TEXT, .. } => visitor.visit_enum(Enum { de: self, has_value: false }),
            PlainHead { major: MAJOR_MAP, arg: 1 } => {
                self.head()?;
                self.enter(2)?;
                let value = visitor.visit_enum(Enum { de: &mut *self, has_value: true })?;
                self.depth -= 1;
                Ok(value)
            }
            _ => Err(Declined),
        }
    }

    /// Text or bytes, as ciborium reads keys and variant names.
    ///
    /// An ASCII key is handed over as bytes: it is UTF-8 without a check, and
    /// the identifier visitors serde derives (fields, variants, the buffered
    /// keys of `flatten`) match bytes exactly as they match text. A third of
    /// a `core.exec.request` decode was checking its keys.
    #[inline]
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        match self.head()? {
            PlainHead { major: MAJOR_TEXT, arg } if arg <= CIBORIUM_SCRATCH => {
                let at = self.pos;
                let bytes = self.take(arg)?;
                if bytes.is_ascii() {
                    return visitor.visit_borrowed_bytes(bytes);
                }
                self.pos = at;
                self.visit_text(arg, visitor)
            }
            PlainHead { major: MAJOR_BYTES, arg } if arg <= CIBORIUM_SCRATCH => {
                visitor.visit_borrowed_bytes(self.take(arg)?)
            }
            _ => Err(Declined),
        }
    }

    /// Skipped without recursion; ciborium's `deserialize_any` accepts every
    /// plain item, so the visitor (serde's `IgnoredAny`) gets a unit.
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Declined> {
        self.skip()?;
        visitor.visit_unit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn plain_items_read_and_others_decline() {
        assert_eq!(from_slice::<u64>(&hex("1903e8")).unwrap(), 1000);
        assert_eq!(from_slice::<i32>(&hex("3903e7")).unwrap(), -1000);
        assert_eq!(from_slice::<Option<u8>>(&hex("f6")).unwrap(), None);
        assert_eq!(from_slice::<Vec<String>>(&hex("826161626263")).unwrap(), ["a", "bc"]);
        for h in ["c100", "f7", "fa3f800000", "9f00ff", "0000", "62c328", "1c", "f820"] {
            assert!(from_slice::<de::IgnoredAny>(&hex(h)).is_err(), "{h}");
        }
    }

    /// The reader answers, rather than declines, for what the writer writes,
    /// for every type: otherwise the fast path would silently be the slow one.
    #[cfg(feature = "arbitrary")]
    #[test]
    fn the_reader_takes_what_the_writer_writes() {
        use arbitrary::{Arbitrary, Unstructured};
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut read = 0;
        for _ in 0..3000 {
            let entropy: Vec<u8> = (0..300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let Ok(payload) = crate::Payload::arbitrary(&mut Unstructured::new(&entropy)) else { continue };
            let t = payload.message_type();
            if !t.has_envelope() {
                continue;
            }
            let mut p = BytesMut::new();
            to_sink(&payload, &mut p).unwrap_or_else(|_| panic!("writer declined {payload:?}"));
            let mut d = De { buf: &p, pos: 0, depth: 0 };
            let back = t.deserialize_payload(&mut d).unwrap_or_else(|_| panic!("reader declined {payload:?}"));
            assert_eq!((back, d.pos), (payload, p.len()));
            read += 1;
        }
        assert!(read > 1000, "{read}");
    }

    #[test]
    fn skip_is_bounded() {
        let mut deep = vec![0x81u8; 100_000];
        deep.push(0);
        assert!(from_slice::<de::IgnoredAny>(&deep).is_err());
        let mut ok = vec![0x81u8; MAX_NESTING_DEPTH];
        ok.push(0);
        from_slice::<de::IgnoredAny>(&ok).unwrap();
    }
}
