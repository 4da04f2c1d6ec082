//! Kernels for tests and benchmarks only (feature `test-kernels`): never in the production
//! PTX.

pub mod fast_division;
pub mod fma_throughput;
