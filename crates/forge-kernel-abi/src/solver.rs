//! Solver kernels: per-solve tables, the permuted working weights, the column-by-column
//! panel and the trailing update (docs/kernels.md §4).

/// A decoded qmeta4 record as the panels read it: the scale and the zero point (an integer
/// in `0..=255`), 8 bytes so one load fetches both.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleZero {
    /// The record's scale as stored (the decode rounded to the grid's scale dtype).
    pub scale: f32,
    /// Zero point.
    pub zero: u32,
}

crate::kernel_args! {
    /// `gptq_expand_meta`: `scale_zero[i]` of every record (its scale as stored in
    /// `scale_dtype`) and `group_of[t] = perm[t] / gs` of every permuted column (0 past
    /// `cols`), one thread per record and column, grid-stride. Safety: `qmeta` has
    /// `n_records` records and `scale_zero` room for as many; `perm` and `group_of` have
    /// `cols_p` entries; `gs > 0`.
    pub struct ExpandMetaArgs in solver => expand_meta_kernel {
        /// Grid records.
        pub qmeta: forge_kernel_abi::DevPtr<u32>,
        /// `rows·n_groups`.
        pub n_records: u32,
        /// The dtype scales are stored in (`forge_numerics::ScaleDtype::to_u32`).
        pub scale_dtype: u32,
        /// Column order (`cols_p` entries).
        pub perm: forge_kernel_abi::DevPtr<u32>,
        /// Columns.
        pub cols: u32,
        /// Padded columns.
        pub cols_p: u32,
        /// Group size.
        pub gs: u32,
        /// Decoded records.
        pub scale_zero: forge_kernel_abi::DevPtrMut<forge_kernel_abi::solver::ScaleZero>,
        /// Group of each permuted column.
        pub group_of: forge_kernel_abi::DevPtrMut<u32>,
    }
}

crate::kernel_args! {
    /// `gptq_row_error_*`: per row `r`, `sums[2r] = Σ ((q − z)·s − x)²` and
    /// `sums[2r + 1] = Σ x²` in f64 over the row's columns, summed in exactly the order of the
    /// host's error pass (`checkpoint::quant`'s `lane_sums`: element `i` of a group into lane
    /// `i mod 8`, lanes added 0..8), so the relative weight error is the CPU path's bit for
    /// bit. `x` is the weight widened exactly from the kernel's dtype, `(s, z)` the record's
    /// stored scale and zero point. Block [`ROW_ERROR_THREADS`], 8 threads per row,
    /// grid-stride over rows. Safety: `w` `rows·cols` elements of the kernel's dtype; `codes`
    /// `rows·cols` bytes; `qmeta` `rows·n_groups` records with `n_groups = ⌈cols/gs⌉`;
    /// `sums` `2·rows` f64; `gs > 0`.
    pub struct RowErrorArgs in solver => row_error_kernel {
        /// Weight bytes, original order.
        pub w: forge_kernel_abi::DevPtr<u8>,
        /// Codes, row-major.
        pub codes: forge_kernel_abi::DevPtr<u8>,
        /// Grid records, row-major.
        pub qmeta: forge_kernel_abi::DevPtr<u32>,
        /// Rows.
        pub rows: u32,
        /// Columns.
        pub cols: u32,
        /// Group size.
        pub gs: u32,
        /// Groups per row.
        pub n_groups: u32,
        /// The dtype scales are stored in (`forge_numerics::ScaleDtype::to_u32`).
        pub scale_dtype: u32,
        /// Per row: squared error, squared norm.
        pub sums: forge_kernel_abi::DevPtrMut<f64>,
    }
}

/// Threads per `gptq_row_error` block (32 rows of 8 threads).
pub const ROW_ERROR_THREADS: u32 = 256;

crate::kernel_args! {
    /// `gptq_permute_weight_*`: `w_work[r, t] = f32(w[r, perm[t]])`, zero in the padding
    /// (the weight's own dtype widened exactly, so a bf16 weight needs no separate widening
    /// pass). Grid `(⌈cols_p/256⌉, ≤ rows_p)`, 256 threads. Safety: `w` `rows·cols` elements
    /// of the kernel's dtype, `perm` `cols_p` entries, `w_work` `rows_p·cols_p` f32.
    pub struct PermuteArgs in solver => permute_kernel {
        /// Weight bytes, original order.
        pub w: forge_kernel_abi::DevPtr<u8>,
        /// Column order.
        pub perm: forge_kernel_abi::DevPtr<u32>,
        /// Rows.
        pub rows: u32,
        /// Columns.
        pub cols: u32,
        /// Padded rows.
        pub rows_p: u32,
        /// Padded columns.
        pub cols_p: u32,
        /// Permuted working weights.
        pub w_work: forge_kernel_abi::DevPtrMut<f32>,
    }
}

crate::kernel_args! {
    /// `gptq_panel_r16` / `gptq_panel_r32`: the recurrence over panel `[p0, p1)`. Safety (the
    /// kernel's module docs): `w_work` `rows_p·cols_p` f32; `u` `cols_p·cols_p` f32, upper
    /// triangle of the permuted factor with a positive diagonal (identity past `cols`); `perm`
    /// and `group_of` `cols_p` entries; `scale_zero` `rows·n_groups` records; `p0 < p1 ≤ cols_p`
    /// multiples of 128 with `p1 − p0 ≤ 1024`; `codes`/`deq` `rows·cols`; `err_t`
    /// `cols_p·rows_p` (rows past `rows` zero); `loss` `rows` (zeroed before the first panel);
    /// block [`SOLVER_THREADS`], grid `⌈rows/RPC⌉`, shared memory
    /// [`SolverSharedLayout::new`]`(RPC, p1 − p0).total`.
    pub struct PanelArgs in solver => panel_kernel {
        /// Permuted working weights (read; earlier panels' updates applied).
        pub w_work: forge_kernel_abi::DevPtr<f32>,
        /// First column of the panel.
        pub p0: u32,
        /// One past its last column.
        pub p1: u32,
        /// Padded factor.
        pub u: forge_kernel_abi::DevPtr<f32>,
        /// Column order.
        pub perm: forge_kernel_abi::DevPtr<u32>,
        /// Group of each permuted column.
        pub group_of: forge_kernel_abi::DevPtr<u32>,
        /// Decoded grid records.
        pub scale_zero: forge_kernel_abi::DevPtr<forge_kernel_abi::solver::ScaleZero>,
        /// Rows.
        pub rows: u32,
        /// Columns.
        pub cols: u32,
        /// Padded columns.
        pub cols_p: u32,
        /// Groups per row.
        pub n_groups: u32,
        /// Bits per code.
        pub bits: u32,
        /// Padded rows.
        pub rows_p: u32,
        /// Codes, original column order.
        pub codes: forge_kernel_abi::DevPtrMut<u8>,
        /// Dequantized weight, original column order.
        pub deq: forge_kernel_abi::DevPtrMut<f32>,
        /// Errors, column-major.
        pub err_t: forge_kernel_abi::DevPtrMut<f32>,
        /// GPTQ loss per row (panels add up).
        pub loss: forge_kernel_abi::DevPtrMut<f32>,
    }
}

crate::kernel_args! {
    /// `gptq_trailing_update`: `w_work[:, p1..] −= err_t[p0..p1]ᵀ · u[p0..p1, p1..]`, 128×128
    /// tiles. Grid `((cols_p − p1)/128, rows_p/128)`, 256 threads, `TRAILING_STAGES·16` KiB of
    /// shared memory. Safety: `w_work` `rows_p·cols_p`, `err_t` `cols_p·rows_p`, `u`
    /// `cols_p·cols_p`, all multiples of 128.
    pub struct TrailingArgs in solver => trailing_kernel {
        /// Permuted working weights.
        pub w_work: forge_kernel_abi::DevPtrMut<f32>,
        /// Errors, column-major.
        pub err_t: forge_kernel_abi::DevPtr<f32>,
        /// Padded factor.
        pub u: forge_kernel_abi::DevPtr<f32>,
        /// Padded rows.
        pub rows_p: u32,
        /// Padded columns.
        pub cols_p: u32,
        /// Panel start.
        pub p0: u32,
        /// Panel end.
        pub p1: u32,
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
    pub const fn new(rpc: u32, panel: u32) -> Self {
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
