//! Scalar numerics of 4Bit Forge, compiled by BOTH the host library (CPU reference) and the
//! GPU kernels (`nvptx64-nvidia-cuda`), so the two cannot drift apart (DESIGN §2).
//!
//! Everything here is `#[inline]`: the kernels crate is emitted as PTX straight from its own
//! codegen unit (`--emit=asm`, no linker), so every function it uses must be instantiated
//! inside it.
#![no_std]
#![feature(core_float_math)]
#![cfg_attr(target_arch = "nvptx64", feature(asm_experimental_arch))]
#![deny(missing_docs)]

pub mod dtype;
pub mod loss;
pub mod qmeta;
pub mod quant;
pub mod scale;

pub use dtype::{bf16_bits_to_f32, f16_bits_to_f32, fp8_e4m3_to_f32};
pub use loss::{abs_pow, element_loss};
pub use qmeta::{decode_log2_q88, encode_log2_q88, encode_qzero, log2_f32_rn, QMetaPacked};
pub use quant::{
    dequantize, linspace_f32, maxq, quantize, quantize_scaled, quantize_with_reciprocal, range_meta,
    reciprocal_is_safe, RangeMeta, MIN_SCALE,
};
pub use scale::{f32_to_bf16_bits, f32_to_f16_bits, round_to_dtype, stored_scale, ScaleDtype};

/// Round half to even (torch's `round`, CUDA's `rintf`, PTX `cvt.rni`).
///
/// Rust's `f32::round` rounds half away from zero, which the spec does not use.
#[inline(always)]
pub fn round_ties_even(x: f32) -> f32 {
    core::f32::math::round_ties_even(x)
}

/// Shared-memory layout of one `mse_search` block, used by the kernel and its launcher so the
/// two cannot disagree: `gpb` group rows of `gs + 4` f32 (16-byte aligned rows), then `gpb`
/// u32 base records, then (8-aligned) `gpb` u64 best keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MseSharedLayout {
    /// Bytes per staged group row.
    pub row_bytes: u32,
    /// Offset of the base qmeta records.
    pub base_meta: u32,
    /// Offset of the best (key, k) words.
    pub best: u32,
    /// Total bytes.
    pub total: u32,
}

impl MseSharedLayout {
    /// The layout for `gpb` groups of `gs` elements.
    #[inline]
    pub fn new(gs: u32, gpb: u32) -> Self {
        let row_bytes = (gs + 4) * 4;
        let base_meta = gpb * row_bytes;
        let best = (base_meta + gpb * 4 + 7) & !7;
        MseSharedLayout { row_bytes, base_meta, best, total: best + gpb * 8 }
    }
}

/// Columns the fused GPTQ solver handles per block (its in-block recurrence width).
pub const SOLVER_BLOCK: u32 = 64;
/// K-chunk of the solver's left-looking update (columns of earlier errors per stage).
pub const SOLVER_KCHUNK: u32 = 32;
/// Threads per solver block: four worker warps (loads, products, write-out), two updater
/// warps (updates between the chain's 16-column slices) and one chain warp (the
/// column-by-column recurrence), working concurrently.
pub const SOLVER_THREADS: u32 = SOLVER_WORKER_THREADS + SOLVER_UPDATER_THREADS + 32;
/// Updater threads per solver block.
pub const SOLVER_UPDATER_THREADS: u32 = 64;
/// Worker threads per solver block.
pub const SOLVER_WORKER_THREADS: u32 = 128;

/// Pipeline depth of the trailing update's K staging (16 KiB a stage).
pub const TRAILING_STAGES: u32 = 3;
/// Columns per solver panel: the column-by-column kernel works inside a panel, the trailing
/// update applies a finished panel to all later columns (a multiple of 128).
pub const SOLVER_PANEL: u32 = 512;

/// Pipeline depth of the solver's K-chunk staging (chunks in flight while one is used).
pub const SOLVER_STAGES: u32 = 3;

/// Shared-memory layout of one `gptq_panel` block of `rpc` rows (16 or 32), used by the kernel
/// and its launcher. Offsets in bytes; every tile is 16-byte aligned, and per-row f32 tiles
/// use the bank-skewed stride [`Self::TILE_STRIDE`] (lanes read different rows at once).
/// Tiles marked "×2" are double-buffered by block parity: the chain warp works on block `b`
/// while the workers write out block `b − 1` and prepare block `b + 1`. Kept under ~110 KiB
/// at 32 rows and 512-column panels so two blocks share an SM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SolverSharedLayout {
    /// Rows per block.
    pub rpc: u32,
    /// `SOLVER_STAGES` K-chunk stages, each `[KCHUNK][rpc]` errors then `[KCHUNK][BLOCK]` of `U`.
    pub stages: u32,
    /// Bytes of one stage.
    pub stage_bytes: u32,
    /// Offset of the `U` part inside a stage.
    pub stage_u: u32,
    /// The block's working weights, which the chain overwrites with their errors slice by
    /// slice: `[rpc][TILE_STRIDE]` f32.
    pub work_tile: u32,
    /// `U[block, block]`: `[BLOCK][BLOCK]` f32, ×2 (buffer stride [`Self::U_BLOCK_BYTES`]).
    pub u_block: u32,
    /// Original column of each of the panel's columns: `[panel]` u32.
    pub perm: u32,
    /// Group of each of the panel's columns: `[panel]` u32.
    pub group_of: u32,
    /// Decoded scale of every (row, block column): `[rpc][TILE_STRIDE]` f32, ×2 (buffer
    /// stride [`Self::row_tile_bytes`]).
    pub scale_tile: u32,
    /// Zero point of every (row, block column): `[rpc][BLOCK]` u8, ×2 (buffer stride
    /// [`Self::byte_tile_bytes`]).
    pub zero_tile: u32,
    /// The division reciprocal of `U`'s diagonal in the block: `[BLOCK]` f32.
    pub diag_recip: u32,
    /// Per row, non-zero once a scale left the fast division's range: `[rpc]` u32, then one
    /// u32 for the block (a diagonal of `U` out of range).
    pub slow_flags: u32,
    /// Codes of the block: `[rpc][BLOCK]` u8, ×2.
    pub codes: u32,
    /// Total bytes.
    pub total: u32,
}

impl SolverSharedLayout {
    /// Row stride of the per-row f32 tiles, in floats (16-byte aligned, bank-skewed).
    pub const TILE_STRIDE: u32 = SOLVER_BLOCK + 4;
    /// Bytes of one `U[block, block]` buffer.
    pub const U_BLOCK_BYTES: u32 = SOLVER_BLOCK * SOLVER_BLOCK * 4;

    /// Bytes of one `[rpc][TILE_STRIDE]` f32 tile.
    #[inline]
    pub const fn row_tile_bytes(&self) -> u32 {
        self.rpc * Self::TILE_STRIDE * 4
    }

    /// Bytes of one `[rpc][BLOCK]` u8 tile (codes, zero points).
    #[inline]
    pub const fn byte_tile_bytes(&self) -> u32 {
        self.rpc * SOLVER_BLOCK
    }

    /// The layout for `rpc` rows per block and panels of at most `panel` columns.
    #[inline]
    pub fn new(rpc: u32, panel: u32) -> Self {
        let row_tile = rpc * Self::TILE_STRIDE * 4;
        let byte_tile = rpc * SOLVER_BLOCK;
        let stage_u = SOLVER_KCHUNK * rpc * 4;
        let stage_bytes = stage_u + SOLVER_KCHUNK * SOLVER_BLOCK * 4;
        let stages = 0;
        let work_tile = stages + SOLVER_STAGES * stage_bytes;
        let u_block = work_tile + row_tile;
        let perm = u_block + 2 * Self::U_BLOCK_BYTES;
        let group_of = perm + panel * 4;
        let scale_tile = group_of + panel * 4;
        let zero_tile = scale_tile + 2 * row_tile;
        let diag_recip = zero_tile + 2 * byte_tile;
        let slow_flags = diag_recip + SOLVER_BLOCK * 4;
        let codes = slow_flags + (rpc + 4) * 4;
        let total = codes + 2 * byte_tile;
        SolverSharedLayout {
            rpc,
            stages,
            stage_bytes,
            stage_u,
            work_tile,
            u_block,
            perm,
            group_of,
            scale_tile,
            zero_tile,
            diag_recip,
            slow_flags,
            codes,
            total,
        }
    }
}

/// Output tile side of the `hessian_xtx_*` kernels (a 64×64 tile of `XᵀX` per block).
pub const HESSIAN_TILE: u32 = 64;
/// Tokens staged in shared memory per step of the `hessian_xtx_*` kernels.
pub const HESSIAN_KCHUNK: u32 = 16;
/// Threads per `hessian_xtx_*` block: 16×16 threads, each a 4×4 register tile.
pub const HESSIAN_THREADS: u32 = 256;

/// Shared-memory layout of one `hessian_xtx_*` block, used by the kernel and its launcher:
/// the two `[KCHUNK][TILE]` f32 panels `X[t0.., i0..i0+64]` and `X[t0.., j0..j0+64]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HessianSharedLayout {
    /// Offset of the row panel (columns `i0..i0+64` of the chunk's tokens).
    pub a: u32,
    /// Offset of the column panel (columns `j0..j0+64`).
    pub b: u32,
    /// Total bytes.
    pub total: u32,
}

impl HessianSharedLayout {
    /// The layout (it has no parameters; a function so kernel and host share one formula).
    #[inline]
    pub const fn new() -> Self {
        let panel = HESSIAN_KCHUNK * HESSIAN_TILE * 4;
        HessianSharedLayout { a: 0, b: panel, total: 2 * panel }
    }
}

impl Default for HessianSharedLayout {
    fn default() -> Self {
        Self::new()
    }
}

/// Flat index, in the GPU pre-step's f64 work matrix (`n × n`, column-major, holding
/// `R⁻¹` from `potrf(UPPER)` then `trtri(UPPER)` of the reversed Hessian), of the value that
/// becomes `U[i][j]` (`i ≤ j`): `U = J L̂⁻¹ J` with `L̂ = Rᵀ`, so
/// `U[i][j] = L̂⁻¹[n−1−i][n−1−j] = R⁻¹[n−1−j][n−1−i]`, stored at column `n−1−i`, row `n−1−j`.
#[inline(always)]
pub fn prestep_factor_source(n: usize, i: usize, j: usize) -> usize {
    (n - 1 - i) * n + (n - 1 - j)
}
