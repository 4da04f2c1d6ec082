//! Grid stage kernels: one qmeta4 record per (row, group of input columns).

pub mod mse_search;
pub mod qmeta_decode;
pub mod range_meta;
