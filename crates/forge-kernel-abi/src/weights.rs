//! Weight conversion kernels: block-scaled FP8-E4M3 checkpoints dequantized on the device.

/// `scale_dtype` of [`Fp8BlockDequantArgs`]: the scales are f32.
pub const BLOCK_SCALE_F32: u32 = 0;
/// `scale_dtype`: the scales are bfloat16 bits.
pub const BLOCK_SCALE_BF16: u32 = 1;
/// `scale_dtype`: the scales are IEEE binary16 bits.
pub const BLOCK_SCALE_F16: u32 = 2;

crate::kernel_args! {
    /// `fp8_block_dequant_f32` / `fp8_block_dequant_bf16`: `out[r, c] = f32(q[r, c]) ·
    /// scale[r / block_rows, c / block_cols]` (`forge_numerics::fp8_block_dequant`), stored as
    /// f32 or rounded to nearest-even into bf16. A NaN code is written through (NaN) and its
    /// flat index noted as `!index` under an atomic max in `first_nan` (0 = none).
    ///
    /// Safety: `q` holds `rows·cols` bytes; `scales` `scale_rows·scale_cols` elements of
    /// `scale_dtype` (2-byte aligned for bf16/f16, 4-byte for f32) with
    /// `scale_rows = ceil(rows/block_rows)`, `scale_cols = ceil(cols/block_cols)`; `out`
    /// `rows·cols` f32 (4-byte aligned) or bf16 (2-byte aligned); `first_nan` one u64 (8-byte
    /// aligned); `block_rows`, `block_cols` ≥ 1. Any 1-D block shape and 2-D grid.
    pub struct Fp8BlockDequantArgs in weights => fp8_block_dequant_kernel {
        /// FP8-E4M3 codes, row-major `(rows, cols)`.
        pub q: forge_kernel_abi::DevPtr<u8>,
        /// The block scales as stored (raw little-endian bits), row-major.
        pub scales: forge_kernel_abi::DevPtr<u8>,
        /// [`BLOCK_SCALE_F32`], [`BLOCK_SCALE_BF16`] or [`BLOCK_SCALE_F16`].
        pub scale_dtype: u32,
        /// Rows of the weight.
        pub rows: u32,
        /// Columns of the weight.
        pub cols: u32,
        /// Rows per scale block (128 in every released checkpoint).
        pub block_rows: u32,
        /// Columns per scale block.
        pub block_cols: u32,
        /// Columns of the scale tensor, `ceil(cols / block_cols)`.
        pub scale_cols: u32,
        /// The dequantized weight, row-major, f32 or bf16 by entry point.
        pub out: forge_kernel_abi::DevPtrMut<u8>,
        /// `!index` of the first NaN code (atomic max; zeroed by the host).
        pub first_nan: forge_kernel_abi::DevPtrMut<u64>,
    }
}
