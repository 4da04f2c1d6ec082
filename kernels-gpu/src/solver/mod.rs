//! Solver stage kernels: per-solve tables, the permuted working weights, the
//! column-by-column panel and the trailing update (docs/kernels.md §4).

pub mod expand_meta;
pub mod panel;
pub mod permute;
pub mod row_error;
pub mod trailing;
