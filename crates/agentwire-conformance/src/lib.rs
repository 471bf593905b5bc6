//! Conformance tests of the agentwire crates, kept apart so that the codec's
//! own tests build none of their dependencies (a CDDL validator, a runtime,
//! sockets). Everything is in `tests/`.
#![forbid(unsafe_code)]
