//! Payload types of every message, by family, and how they go to and from CBOR.
//!
//! The serde derives on these types *are* the encoding: the deployed
//! implementation wrote the golden vectors by running them through ciborium
//! ([`serde_encode`], [`serde_decode`]: the serde path). [`CborPayload`]'s
//! default methods run the same derives through the crate's own CBOR
//! serializer and plain-form reader ([`fast_encode`], [`fast_decode`]), which
//! give the same bytes and values and defer to the serde path for anything
//! they do not cover. A type may override a method with a
//! faster path (the data-carrying payloads do, to hand out [`Bytes`] views of
//! the frame instead of copies, and `core.exec.request`, whose strings are
//! [`Text`] views); such a path falls back to the serde path for
//! any input it does not recognise, so the two cannot disagree.

pub mod bootstrap;
pub mod bulk;
pub mod core;
pub mod exec;
mod fast;
pub mod fs;
mod serde_fast;
mod tagged;
pub mod tcp;
mod text;
pub mod workload;

pub use text::Text;

use std::cell::Cell;
use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cbor::{self, MAX_NESTING_DEPTH};

/// A payload that did not decode (or, rarely, encode): what was wrong and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}{}", offset.map(|o| format!(" at payload byte {o}")).unwrap_or_default())]
pub struct PayloadError {
    /// Byte offset inside the payload, when known.
    pub offset: Option<usize>,
    /// What was wrong, e.g. `invalid type: string, expected i32`.
    pub reason: String,
}

impl From<cbor::CborError> for PayloadError {
    fn from(e: cbor::CborError) -> Self {
        PayloadError { offset: Some(e.offset), reason: e.reason.to_string() }
    }
}

impl<E: std::fmt::Debug> From<ciborium::de::Error<E>> for PayloadError {
    fn from(e: ciborium::de::Error<E>) -> Self {
        use ciborium::de::Error;
        let (offset, reason) = match e {
            Error::Io(e) => (None, format!("input ended early ({e:?})")),
            Error::Syntax(o) => (Some(o), "malformed CBOR".to_string()),
            Error::Semantic(o, msg) => (o, msg),
            Error::RecursionLimitExceeded => (None, "nesting deeper than the limit".to_string()),
        };
        PayloadError { offset, reason }
    }
}

/// How a payload type is written to and read from the envelope's `p` bytes.
///
/// Every method has a default that goes through the type's serde derives and
/// the crate's own CBOR reader and writer, deferring to ciborium for what they
/// do not cover; the hottest payloads override them (see the module docs). The
/// serde path's decoding first checks the bytes with the crate's own iterative
/// reader: one well-formed item, nothing left over, at most
/// [`MAX_NESTING_DEPTH`] levels, every claimed length backed by bytes that are
/// present. Only then does the serde path see them.
///
/// ```
/// use agentwire::payload::{CborPayload, exec::ExecExited};
/// let mut buf = bytes::BytesMut::new();
/// ExecExited { code: 42 }.encode(&mut buf)?;
/// assert_eq!(&buf[..], b"\xa1\x64code\x18\x2a");
/// assert_eq!(ExecExited::decode(&buf.freeze())?, ExecExited { code: 42 });
/// # Ok::<(), agentwire::payload::PayloadError>(())
/// ```
pub trait CborPayload: Serialize + DeserializeOwned {
    /// The exact size of [`CborPayload::encode`]'s output when it is known
    /// without encoding (the hand-written paths know it); `None` otherwise.
    fn exact_encoded_len(&self) -> Option<usize> {
        None
    }

    /// Exact size of [`CborPayload::encode`]'s output (by counting a
    /// serialization when it is not known otherwise).
    fn encoded_len(&self) -> Result<usize, PayloadError> {
        match self.exact_encoded_len() {
            Some(len) => Ok(len),
            None => fast_encoded_len(self),
        }
    }

    /// Appends the canonical encoding to `dst`.
    fn encode(&self, dst: &mut BytesMut) -> Result<(), PayloadError> {
        fast_encode(self, dst)
    }

    /// [`CborPayload::encoded_len`] for a frame whose `v` is `generation`.
    fn encoded_len_at(&self, generation: u8) -> Result<usize, PayloadError> {
        let _ = generation;
        self.encoded_len()
    }

    /// [`CborPayload::encode`] for a frame whose `v` is `generation`: the same
    /// bytes except where a generation writes a payload differently (the fs
    /// `user` keys, see [`as_generation`]).
    fn encode_at(&self, generation: u8, dst: &mut BytesMut) -> Result<(), PayloadError> {
        let _ = generation;
        self.encode(dst)
    }

    /// `true` when a decoded value holds [`Bytes`] views of the payload (the
    /// data messages' `data`, `core.exec.request`'s strings). The message decoder then cuts the frame out of
    /// its read buffer and calls [`CborPayload::decode`]; for every other type
    /// it reads the payload where it lies, with [`CborPayload::decode_slice`],
    /// and nothing is cut out or reference-counted.
    const HOLDS_VIEWS: bool = false;

    /// Decodes `p`, which must be exactly one CBOR item; a type that
    /// [holds views](CborPayload::HOLDS_VIEWS) hands out slices of `p`.
    fn decode(p: &Bytes) -> Result<Self, PayloadError> {
        Self::decode_slice(p)
    }

    /// Decodes `p`, which must be exactly one CBOR item, into an owned value
    /// (a type that [holds views](CborPayload::HOLDS_VIEWS) copies what it keeps).
    ///
    /// ```
    /// use agentwire::payload::{CborPayload, core::Ready};
    /// let ready = Ready::decode_slice(b"\xa3\x6cboot_time_ns\x01\x6cinit_time_ns\x02\x6dready_time_ns\x03")?;
    /// assert_eq!((ready.boot_time_ns, ready.init_time_ns, ready.ready_time_ns), (1, 2, 3));
    /// # Ok::<(), agentwire::payload::PayloadError>(())
    /// ```
    fn decode_slice(p: &[u8]) -> Result<Self, PayloadError> {
        fast_decode(p)
    }
}

/// A boxed payload (the large `core.bootstrap` one, so that [`crate::Payload`]
/// stays small) goes on the wire exactly as the payload itself.
impl<T: CborPayload> CborPayload for Box<T> {
    fn exact_encoded_len(&self) -> Option<usize> {
        (**self).exact_encoded_len()
    }

    fn encoded_len(&self) -> Result<usize, PayloadError> {
        (**self).encoded_len()
    }

    fn encode(&self, dst: &mut BytesMut) -> Result<(), PayloadError> {
        (**self).encode(dst)
    }

    fn encoded_len_at(&self, generation: u8) -> Result<usize, PayloadError> {
        (**self).encoded_len_at(generation)
    }

    fn encode_at(&self, generation: u8, dst: &mut BytesMut) -> Result<(), PayloadError> {
        (**self).encode_at(generation, dst)
    }

    const HOLDS_VIEWS: bool = T::HOLDS_VIEWS;

    fn decode(p: &Bytes) -> Result<Self, PayloadError> {
        T::decode(p).map(Box::new)
    }

    fn decode_slice(p: &[u8]) -> Result<Self, PayloadError> {
        T::decode_slice(p).map(Box::new)
    }
}

thread_local! {
    /// The generation whose writer serialization imitates (see [`as_generation`]).
    static WRITER_GENERATION: Cell<u8> = const { Cell::new(crate::PROTOCOL_VERSION) };
}

/// Runs `f` with every payload serialized as a writer of `generation` writes
/// it, then restores the previous setting (also when `f` panics).
///
/// One payload difference between generations has no value of its own: the
/// `user` key of `FsOp::Symlink`, `FsOp::Mkdir` and `FsOpenOptions` is left out
/// when `None` below generation 10 and written as `null` from 10 on. The
/// codec encodes each frame at its `v` this way; a JSON rendering of a frame
/// (`inspect --json`, the vectors) does the same through this function, and
/// serde's derives, which have no place to pass a generation, read it here.
///
/// ```
/// use agentwire::payload::{as_generation, fs::{FsOp, FsRequest}};
/// let req = FsRequest::new(FsOp::Mkdir { path: "/d".into(), mode: None, user: None });
/// let json = |g| as_generation(g, || serde_json::to_string(&req).unwrap());
/// assert_eq!(json(7), r#"{"op":{"Mkdir":{"path":"/d","mode":null}}}"#);
/// assert_eq!(json(10), r#"{"op":{"Mkdir":{"path":"/d","mode":null,"user":null}}}"#);
/// ```
pub fn as_generation<T>(generation: u8, f: impl FnOnce() -> T) -> T {
    struct Restore(u8);
    impl Drop for Restore {
        fn drop(&mut self) {
            WRITER_GENERATION.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(WRITER_GENERATION.with(|g| g.replace(generation)));
    f()
}

/// The generation serialization imitates now (see [`as_generation`]).
pub(crate) fn writer_generation() -> u8 {
    WRITER_GENERATION.with(Cell::get)
}

/// Counts bytes instead of storing them, to size a payload before writing it.
struct CountingWriter(usize);

impl io::Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn encode_error(e: ciborium::ser::Error<io::Error>) -> PayloadError {
    PayloadError { offset: None, reason: format!("{e:?}") }
}

/// Size of `value` as ciborium writes it (the serde path).
pub fn serde_encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, PayloadError> {
    let mut counter = CountingWriter(0);
    ciborium::into_writer(value, &mut counter).map_err(encode_error)?;
    Ok(counter.0)
}

/// Appends `value` as ciborium writes it, shortest heads and definite lengths:
/// the serde path, which the hand-written paths are held to.
pub fn serde_encode<T: Serialize + ?Sized>(value: &T, dst: &mut BytesMut) -> Result<(), PayloadError> {
    let start = dst.len();
    ciborium::into_writer(value, dst.writer()).map_err(|e| {
        dst.truncate(start);
        encode_error(e)
    })
}

/// Appends `value` as [`serde_encode`] does, through the type's serde derive and
/// the crate's own CBOR serializer, which writes straight into `dst`; a value
/// it does not cover (a float, a map of unknown length) is written by
/// [`serde_encode`] instead. The default of [`CborPayload::encode`].
pub fn fast_encode<T: Serialize + ?Sized>(value: &T, dst: &mut BytesMut) -> Result<(), PayloadError> {
    let start = dst.len();
    match serde_fast::to_sink(value, dst) {
        Ok(()) => Ok(()),
        Err(serde_fast::Declined) => {
            dst.truncate(start);
            serde_encode(value, dst)
        }
    }
}

/// Size of [`fast_encode`]'s output, counted without writing it.
pub fn fast_encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, PayloadError> {
    let mut counter = serde_fast::Counter(0);
    match serde_fast::to_sink(value, &mut counter) {
        Ok(()) => Ok(counter.0),
        Err(serde_fast::Declined) => serde_encoded_len(value),
    }
}

/// Decodes `p` as [`serde_decode`] does, through the type's serde derive and the
/// crate's own reader of the plain CBOR form (definite lengths, no tags, no
/// floats), borrowing strings from `p`. Whatever that reader declines (another
/// form, or an error of any kind) is answered by [`serde_decode`], so values and
/// error messages are always the serde path's. The default of
/// [`CborPayload::decode_slice`].
pub fn fast_decode<T: DeserializeOwned>(p: &[u8]) -> Result<T, PayloadError> {
    match serde_fast::from_slice(p) {
        Ok(value) => Ok(value),
        Err(serde_fast::Declined) => serde_decode(p),
    }
}

/// Decodes `p` through the type's serde derive and ciborium after checking it:
/// the serde path, which the hand-written paths are held to.
pub fn serde_decode<T: DeserializeOwned>(p: &[u8]) -> Result<T, PayloadError> {
    let checked = cbor::check_item(p, MAX_NESTING_DEPTH)?;
    if !checked.indefinite {
        return Ok(ciborium::from_reader(p)?);
    }
    // ciborium takes indefinite-length strings as values but not as map keys or
    // enum names, which the spec says a reader must accept. Rewrite the item with
    // definite lengths first: the slower path the spec allows for such input.
    // The check above bounds every length by the bytes present and the depth.
    let value: ciborium::Value = ciborium::from_reader(p)?;
    let mut definite = Vec::with_capacity(p.len());
    ciborium::into_writer(&value, &mut definite).map_err(encode_error)?;
    Ok(ciborium::from_reader(&definite[..])?)
}

/// Builds arbitrary `Bytes` for fuzzing and property tests.
#[cfg(feature = "arbitrary")]
pub(crate) fn arbitrary_bytes(u: &mut arbitrary::Unstructured<'_>) -> arbitrary::Result<Bytes> {
    Ok(Bytes::from(<Vec<u8> as arbitrary::Arbitrary>::arbitrary(u)?))
}

/// Implements [`CborPayload`] with the serde path for each listed type.
macro_rules! serde_payload {
    ($($ty:ty),* $(,)?) => {$( impl $crate::payload::CborPayload for $ty {} )*};
}
pub(crate) use serde_payload;

/// Display and serde of a text enum (its `as_str` and `from_wire`): the one
/// implementation behind [`open_enum`] and [`catch_all_enum`].
macro_rules! text_enum_serde {
    ($name:ident) => {
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str(concat!("a ", stringify!($name), " name"))
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$name, E> {
                        Ok($name::from_wire(s))
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}
pub(crate) use text_enum_serde;

/// Defines a unit-only enum that is a text string on the wire and keeps a value
/// it does not know (a newer peer's) instead of failing.
macro_rules! open_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )* }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A name this generation does not know, kept as received.
            Unknown(String),
        }

        impl $name {
            /// Every value this generation knows.
            pub const KNOWN: &'static [$name] = &[$($name::$variant),*];

            /// The wire name.
            pub fn as_str(&self) -> &str {
                match self {
                    $( $name::$variant => $wire, )*
                    $name::Unknown(s) => s,
                }
            }

            /// Reads a wire name; a name not known here becomes `Unknown`.
            pub fn from_wire(s: &str) -> Self {
                match s {
                    $( $wire => $name::$variant, )*
                    other => $name::Unknown(other.to_string()),
                }
            }
        }

        /// A known value, or a name that is not one (as a newer peer would send).
        #[cfg(feature = "arbitrary")]
        impl<'a> arbitrary::Arbitrary<'a> for $name {
            fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
                let pick = u.choose_index(Self::KNOWN.len() + 1)?;
                match Self::KNOWN.get(pick) {
                    Some(known) => Ok(known.clone()),
                    // from_wire keeps an accidental known name known, so the value round-trips.
                    None => Ok($name::from_wire(&String::arbitrary(u)?)),
                }
            }
        }

        $crate::payload::text_enum_serde!($name);
    };
}
pub(crate) use open_enum;

/// Defines a unit-only enum that is a text string on the wire and reads any
/// name it does not know as its catch-all variant (spec section 4,
/// *catch-all*): re-encoded, an unknown name becomes the catch-all's, as the
/// deployed implementation writes it.
macro_rules! catch_all_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )* }
        catch_all $(#[$cmeta:meta])* $catch:ident = $catch_wire:literal
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            $(#[$cmeta])*
            $catch,
        }

        impl $name {
            /// The wire name.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $( $name::$variant => $wire, )*
                    $name::$catch => $catch_wire,
                }
            }

            /// Reads a wire name; one not known here is the catch-all.
            pub fn from_wire(s: &str) -> Self {
                match s {
                    $( $wire => $name::$variant, )*
                    _ => $name::$catch,
                }
            }
        }

        $crate::payload::text_enum_serde!($name);
    };
}
pub(crate) use catch_all_enum;

#[cfg(test)]
mod tests {
    use super::exec::ExecStdout;
    use super::fast::data_decode as data_decode_fast;
    use super::*;

    fn stdout_serde(p: &[u8]) -> Result<ExecStdout, PayloadError> {
        serde_decode(p)
    }

    #[test]
    fn data_fast_path_is_a_view_and_agrees_with_serde() {
        let mut buf = BytesMut::new();
        ExecStdout { data: Bytes::from_static(b"hello") }.encode(&mut buf).unwrap();
        let p = buf.freeze();
        let fast = data_decode_fast(&p).unwrap();
        assert_eq!(fast.as_ptr(), p[7..].as_ptr(), "a view of p, not a copy");
        assert_eq!(ExecStdout { data: fast }, stdout_serde(&p).unwrap());
    }

    #[test]
    fn data_fast_path_declines_what_it_does_not_handle() {
        for hex in [
            "a26464617461416164646174614162", // duplicate key: serde says duplicate field
            "a0",                             // missing: serde says missing field
            "a164646174615f4161ff",           // indefinite bytes
            "a16464617461836161",             // array for bytes (serde path decides)
            "c0a1646461746140",               // tag in front
            "a1646461746140ff",               // trailing byte
            "a1646461746145616263",           // truncated
        ] {
            let p = Bytes::from(
                (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect::<Vec<_>>(),
            );
            assert_eq!(data_decode_fast(&p), None, "{hex}");
            let _ = ExecStdout::decode(&p); // never panics, whichever path answers
        }
    }

    #[test]
    fn unknown_keys_are_skipped_by_both_paths() {
        // {"x": [1, {"y": null}], "data": h'6869'}
        let p = Bytes::from_static(b"\xa2\x61x\x82\x01\xa1\x61y\xf6\x64data\x42hi");
        assert_eq!(data_decode_fast(&p).unwrap(), Bytes::from_static(b"hi"));
        assert_eq!(stdout_serde(&p).unwrap().data, Bytes::from_static(b"hi"));
    }

    /// Whenever the fast path answers, the serde path gives the same value:
    /// checked on damaged variants of real data payloads.
    #[test]
    fn fast_path_never_disagrees_with_serde_on_damaged_input() {
        let mut x = 0x853c_49e6_748f_ea9bu64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut base = BytesMut::new();
        ExecStdout { data: Bytes::from_static(b"hello, world") }.encode(&mut base).unwrap();
        let extra = b"\xa2\x61x\x82\x01\xf6\x64data\x43abc";
        let (mut answered, mut agreed_errors) = (0, 0);
        for _ in 0..50_000 {
            let mut p = if next() % 2 == 0 { base.to_vec() } else { extra.to_vec() };
            for _ in 0..1 + next() % 3 {
                let at = (next() % p.len() as u64) as usize;
                p[at] = next() as u8;
            }
            let p = Bytes::from(p);
            match data_decode_fast(&p) {
                Some(data) => {
                    answered += 1;
                    assert_eq!(stdout_serde(&p), Ok(ExecStdout { data }), "{p:02x?}");
                }
                None => agreed_errors += stdout_serde(&p).is_err() as usize,
            }
        }
        assert!(answered > 1_000 && agreed_errors > 1_000, "{answered} {agreed_errors}");
    }

    #[test]
    fn indefinite_keys_take_the_slow_path() {
        // {(_ "da", "ta"): (_ h'68', h'69')}
        let p = Bytes::from_static(b"\xa1\x7f\x62da\x62ta\xff\x5f\x41h\x41i\xff");
        assert_eq!(ExecStdout::decode(&p).unwrap().data, Bytes::from_static(b"hi"));
    }
}
