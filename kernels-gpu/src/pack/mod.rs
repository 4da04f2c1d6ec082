//! Pack stage kernels: u8 codes → dense little-endian int32 words (issue 12).

pub mod pack_rows;
