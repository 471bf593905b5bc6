//! Conformance tests of the agentwire crates, kept apart so that the codec's
//! own tests build none of their dependencies (a CDDL validator, a runtime,
//! sockets). Everything is in `tests/`.
#![forbid(unsafe_code)]

/// The README's examples, compiled and run as doctests here, where the
/// codec, the session core, the client and the agent are all at hand.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
