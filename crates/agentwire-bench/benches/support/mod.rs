//! Code shared by the benchmarks and the profiling example.

pub mod baseline;
