//! Enums tagged by a key inside their own map (`#[serde(tag = "kind")]`),
//! read without serde's buffering when the tag is the first key.
//!
//! serde reads such an enum by buffering the whole map into a tree of its own
//! and reading the variant back out of it, because the tag may come anywhere.
//! Every writer puts it first, and then the variant's fields can be read
//! straight from the map. The fast reader (`serde_fast`) does that; any other
//! form, and any error, declines there, and the serde path reads the payload
//! again with the derive's own buffering, so values and errors are the
//! derive's. Measured on `core.bootstrap` (two such enums): see BENCHMARKS.md.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::serde_fast;

/// An enum tagged by a key inside its map, with a reading for the tag first.
pub(crate) trait TagFirst<'de>: Sized {
    /// The tag's key.
    const TAG: &'static str;
    /// The tag's value, read as serde reads a variant name
    /// (`#[serde(variant_identifier)]`).
    type Kind: Deserialize<'de>;
    /// Reads the fields of variant `kind` from the rest of the map.
    fn rest<A: MapAccess<'de>>(kind: Self::Kind, rest: A) -> Result<Self, A::Error>;
    /// The derive's reading, which buffers the map (`#[serde(remote)]`).
    fn derived<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
}

/// `T`'s `Deserialize`: straight from the map inside the fast reader, the
/// derive's reading everywhere else.
pub(crate) fn deserialize<'de, T: TagFirst<'de>, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    if serde_fast::reading() { d.deserialize_map(TagFirstVisitor(PhantomData)) } else { T::derived(d) }
}

/// The variant's fields from the rest of the map, refusing a second tag (which
/// the derive refuses as a duplicate field).
pub(crate) fn fields<'de, F: Deserialize<'de> + HasRepeatedTag, A: MapAccess<'de>>(rest: A) -> Result<F, A::Error> {
    let fields = F::deserialize(de::value::MapAccessDeserializer::new(rest))?;
    if fields.has_repeated_tag() {
        return Err(de::Error::custom("the tag key appears twice"));
    }
    Ok(fields)
}

/// A variant's fields read with a catch for a repeated tag key.
pub(crate) trait HasRepeatedTag {
    /// Whether the tag's key came again among the fields.
    fn has_repeated_tag(&self) -> bool;
}

/// The catch for a repeated tag key among a variant's fields.
pub(crate) type RepeatedTag = Option<IgnoredAny>;

/// Implements [`HasRepeatedTag`] for field structs with a `repeated_tag` field.
macro_rules! repeated_tag {
    ($($fields:ty),* $(,)?) => {$(
        impl $crate::payload::tagged::HasRepeatedTag for $fields {
            fn has_repeated_tag(&self) -> bool {
                self.repeated_tag.is_some()
            }
        }
    )*};
}
pub(crate) use repeated_tag;

struct TagFirstVisitor<T>(PhantomData<T>);

impl<'de, T: TagFirst<'de>> Visitor<'de> for TagFirstVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a map whose first key is `{}`", T::TAG)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        match map.next_key_seed(IsKey(T::TAG))? {
            Some(true) => {}
            _ => return Err(de::Error::custom(format_args!("`{}` is not the first key", T::TAG))),
        }
        let kind = map.next_value::<T::Kind>()?;
        T::rest(kind, map)
    }
}

/// Reads a map key as serde reads identifiers, answering whether it is this one.
struct IsKey(&'static str);

impl<'de> de::DeserializeSeed<'de> for IsKey {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl Visitor<'_> for IsKey {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
    fn visit_bytes<E: de::Error>(self, key: &[u8]) -> Result<bool, E> {
        Ok(key == self.0.as_bytes())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
}
