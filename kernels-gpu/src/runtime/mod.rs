//! Runtime kernels: the W4A16 matmul on qmeta4 records decoded in registers, and the dense
//! dequantization for the large-`M` cuBLAS path (docs/kernels.md §6).

pub mod dequant;
pub mod mma;
pub mod w4a16;
