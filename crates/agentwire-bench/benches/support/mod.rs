//! Code shared by the benchmarks and the profiling examples.

pub mod baseline;
pub mod reference;
pub mod samples;
