//! Benchmarks (`benches/`) and profiling programs (`examples/`) of the
//! agentwire codec, kept apart so that the codec's tests build no benchmark
//! harness. See BENCHMARKS.md at the repository's root.
#![forbid(unsafe_code)]
