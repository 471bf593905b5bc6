//! [`Text`]: a payload's string, which can be a view of the frame it came in.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use bytestring::ByteString;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// An immutable UTF-8 string of a payload, stored in [`Bytes`].
///
/// Where the crate's decoder reads it from a frame (the strings of a
/// `core.exec.request`), it is a view of the frame's bytes, checked to be
/// UTF-8 once and never copied: a request with a dozen arguments and variables
/// costs no allocation per string. Such a view keeps the whole allocation the
/// frame was read into alive while it lives (a read buffer of the decoder's,
/// up to a frame's maximum size); [`Text::detached`] makes a copy that does not. Built from a
/// `&str` or `String` it owns its bytes. It dereferences to `str`, and
/// compares with `str` and `String`.
///
/// ```
/// use agentwire::payload::Text;
/// let t = Text::from("PATH=/bin");
/// assert_eq!(t, "PATH=/bin");
/// assert!(t.starts_with("PATH="));
/// assert_eq!(t.as_str().len(), 9);
/// assert_eq!(String::from(t), "PATH=/bin");
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Text(ByteString);

impl Text {
    /// An empty text.
    pub const fn new() -> Text {
        Text(ByteString::new())
    }

    /// A text of a `'static` string, without copying it.
    pub const fn from_static(s: &'static str) -> Text {
        Text(ByteString::from_static(s))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The UTF-8 bytes (a view of the frame when decoded from one).
    pub fn as_bytes(&self) -> &Bytes {
        self.0.as_bytes()
    }

    /// The UTF-8 bytes, given up.
    pub fn into_bytes(self) -> Bytes {
        self.0.into_bytes()
    }

    /// A copy that owns its bytes, so that keeping it does not keep the frame
    /// it was decoded from.
    pub fn detached(&self) -> Text {
        Text::from(self.as_str())
    }
}

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<[u8]> for Text {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl TryFrom<Bytes> for Text {
    type Error = std::str::Utf8Error;

    /// The bytes as text, without copying them, when they are UTF-8.
    fn try_from(b: Bytes) -> Result<Text, Self::Error> {
        ByteString::try_from(b).map(Text)
    }
}

impl AsRef<std::ffi::OsStr> for Text {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.as_str().as_ref()
    }
}

impl AsRef<std::path::Path> for Text {
    fn as_ref(&self) -> &std::path::Path {
        self.as_str().as_ref()
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text(ByteString::from(s))
    }
}

impl From<&String> for Text {
    fn from(s: &String) -> Text {
        Text::from(s.as_str())
    }
}

impl From<String> for Text {
    /// Takes the string's buffer.
    fn from(s: String) -> Text {
        Text(ByteString::from(s))
    }
}

impl From<Box<str>> for Text {
    /// Takes the string's buffer.
    fn from(s: Box<str>) -> Text {
        Text(ByteString::from(s))
    }
}

impl From<std::borrow::Cow<'_, str>> for Text {
    fn from(s: std::borrow::Cow<'_, str>) -> Text {
        match s {
            std::borrow::Cow::Borrowed(s) => Text::from(s),
            std::borrow::Cow::Owned(s) => Text::from(s),
        }
    }
}

impl From<char> for Text {
    fn from(c: char) -> Text {
        Text::from(c.encode_utf8(&mut [0; 4]) as &str)
    }
}

impl From<Text> for String {
    fn from(t: Text) -> String {
        t.0.into()
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<Text> for str {
    fn eq(&self, other: &Text) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Text> for &str {
    fn eq(&self, other: &Text) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Text> for String {
    fn eq(&self, other: &Text) -> bool {
        self == other.as_str()
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Text {
    /// As a `String` deserializes (`deserialize_string`, UTF-8 bytes taken
    /// too), so every format reads it the same way and gives the same errors.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        d.deserialize_string(TextVisitor)
    }
}

struct TextVisitor;

impl Visitor<'_> for TextVisitor {
    type Value = Text;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Text, E> {
        Ok(Text::from(s))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Text, E> {
        Ok(Text::from(s))
    }

    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Text, E> {
        std::str::from_utf8(b).map(Text::from).map_err(|_| E::invalid_value(de::Unexpected::Bytes(b), &self))
    }

    fn visit_byte_buf<E: de::Error>(self, b: Vec<u8>) -> Result<Text, E> {
        String::from_utf8(b).map(Text::from).map_err(|e| E::invalid_value(de::Unexpected::Bytes(e.as_bytes()), &self))
    }
}

#[cfg(feature = "arbitrary")]
impl<'a> arbitrary::Arbitrary<'a> for Text {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Text> {
        <&str as arbitrary::Arbitrary>::arbitrary(u).map(Text::from)
    }

    fn size_hint(depth: usize) -> (usize, Option<usize>) {
        <&str as arbitrary::Arbitrary>::size_hint(depth)
    }
}
