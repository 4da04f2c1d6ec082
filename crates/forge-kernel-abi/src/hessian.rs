//! Hessian kernels: `S = XᵀX` tiles, the running blend, and the GPU pre-step's gather and
//! extract around cuSOLVER (docs/kernels.md §3).

/// Output tile side of the `hessian_xtx_*` kernels (a 64×64 tile of `XᵀX` per block).
pub const HESSIAN_TILE: u32 = 64;
/// Tokens staged in shared memory per step of the `hessian_xtx_*` kernels.
pub const HESSIAN_KCHUNK: u32 = 16;
/// Threads per `hessian_xtx_*` block: 16×16 threads, each a 4×4 register tile.
pub const HESSIAN_THREADS: u32 = 256;

crate::kernel_args! {
    /// `hessian_xtx_*`: `s = XᵀX` of `tokens` rows of `x` (element type per kernel name, widened exactly to
    /// f32). Grid `(⌈cols/64⌉, ⌈cols/64⌉)`, [`HESSIAN_THREADS`] threads, shared memory
    /// [`HessianSharedLayout::new`]`().total`. Safety: `x` holds `tokens·cols` elements starting
    /// at a multiple of `cols` elements of an allocation; `s` holds `cols²` f32; `first_bad` one
    /// u64 (receives `!index` of the first non-finite entry of `s`).
    pub struct XtxArgs in hessian => xtx_kernel {
        /// Activations, `(tokens, cols)` row-major.
        pub x: forge_kernel_abi::DevPtr<u8>,
        /// Tokens.
        pub tokens: u32,
        /// Columns (input features).
        pub cols: u32,
        /// `XᵀX`, `(cols, cols)` row-major.
        pub s: forge_kernel_abi::DevPtrMut<f32>,
        /// Non-finite report.
        pub first_bad: forge_kernel_abi::DevPtrMut<u64>,
    }
}

crate::kernel_args! {
    /// `hessian_blend`: `h ← beta·h + alpha·s` elementwise, grid-stride. Safety: `h`, `s` hold
    /// `cols²` f32.
    pub struct BlendArgs in hessian => blend_kernel {
        /// Running Hessian.
        pub h: forge_kernel_abi::DevPtrMut<f32>,
        /// This chunk's `XᵀX`.
        pub s: forge_kernel_abi::DevPtr<f32>,
        /// Side.
        pub cols: u32,
        /// `2/(n+m)`.
        pub alpha: f32,
        /// `n/(n+m)`.
        pub beta: f32,
    }
}

crate::kernel_args! {
    /// `hessian_diag`: `out[i] = h[i, i]`. Safety: `h` `cols²` f32, `out` `cols` f32.
    pub struct DiagArgs in hessian => diag_kernel {
        /// Hessian, row-major.
        pub h: forge_kernel_abi::DevPtr<f32>,
        /// Side.
        pub cols: u32,
        /// Diagonal.
        pub out: forge_kernel_abi::DevPtrMut<f32>,
    }
}

crate::kernel_args! {
    /// `prestep_gather`: the reversed, permuted, dead-fixed, damped, symmetrised f64 matrix the
    /// Cholesky factors. Safety: `h` `cols²` f32, `order` a permutation of `0..cols`, `a` `cols²`
    /// f64, `first_bad` one u64.
    pub struct GatherArgs in hessian => gather_kernel {
        /// Hessian, row-major f32.
        pub h: forge_kernel_abi::DevPtr<f32>,
        /// Side.
        pub cols: u32,
        /// Processing order (act-order permutation or identity).
        pub order: forge_kernel_abi::DevPtr<u32>,
        /// Absolute damping added to the diagonal.
        pub damping: f64,
        /// Work matrix.
        pub a: forge_kernel_abi::DevPtrMut<f64>,
        /// Set to the `cols × cols` identity: the right-hand side the triangular solve turns
        /// into the inverse factor.
        pub inv: forge_kernel_abi::DevPtrMut<f64>,
        /// Non-finite report.
        pub first_bad: forge_kernel_abi::DevPtrMut<u64>,
    }
}

crate::kernel_args! {
    /// `prestep_first_failure`: `info ← infos[k]` for the first `k < count` with
    /// `infos[k] ≠ 0` (untouched when there is none) — the cuSOLVER `info` of the first failed
    /// diagonal block of a blocked factorisation. One thread does it (at most a few hundred
    /// entries); launch one block of one thread. Safety: `infos` holds `count` i32, `info` one.
    pub struct FirstFailureArgs in hessian => first_failure_kernel {
        /// Per-block cuSOLVER `info`s.
        pub infos: forge_kernel_abi::DevPtr<i32>,
        /// Entries of `infos`.
        pub count: u32,
        /// The factorisation's `info`.
        pub info: forge_kernel_abi::DevPtrMut<i32>,
    }
}

crate::kernel_args! {
    /// `prestep_identity`: `u = I` (`cols_p × cols_p` f32), the factor of a layer without
    /// calibration data or whose every factorisation failed (round-to-nearest). Grid-stride.
    /// Safety: `u` holds `cols_p²` f32.
    pub struct IdentityArgs in hessian => identity_kernel {
        /// The factor.
        pub u: forge_kernel_abi::DevPtrMut<f32>,
        /// Side.
        pub cols_p: u32,
    }
}

crate::kernel_args! {
    /// `hessian_blend_sym`: `out = beta·H + alpha·S` where only `S`'s upper triangle is read
    /// and mirrored (a GEMM's `XᵀX` is symmetric only up to rounding; the result is exactly
    /// symmetric), every `S` entry read checked for NaN/inf (`first_bad` ← `!index` of the
    /// smallest). Out of place, so a failed check leaves `H` as it was. Blocks of 32×8 threads own a 32×32 tile pair `(bi, bj)`, `bi ≤ bj`, grid
    /// `(⌈cols/32⌉, ⌈cols/32⌉)`, [`BLEND_SYM_SHARED_BYTES`] of dynamic shared memory. Safety: `h`, `s`,
    /// `out` hold `cols²` f32 (`out` distinct from both), `first_bad` one u64.
    pub struct BlendSymArgs in hessian => blend_sym_kernel {
        /// Running Hessian.
        pub h: forge_kernel_abi::DevPtr<f32>,
        /// The blended Hessian.
        pub out: forge_kernel_abi::DevPtrMut<f32>,
        /// This chunk's `XᵀX` (upper triangle read).
        pub s: forge_kernel_abi::DevPtr<f32>,
        /// Side.
        pub cols: u32,
        /// `2/(n+m)`.
        pub alpha: f32,
        /// `n/(n+m)`.
        pub beta: f32,
        /// Non-finite report.
        pub first_bad: forge_kernel_abi::DevPtrMut<u64>,
    }
}

crate::kernel_args! {
    /// `prestep_extract`: `U` (f32, row-major, upper) read out of the inverted factor with
    /// [`prestep_factor_source`], written into a `cols_p × cols_p` layout whose padding is the
    /// identity (the solver's layout, `cols_p ≥ cols`); a non-finite entry or a diagonal `≤ 0`
    /// is reported. Safety: `a` `cols²` f64, `u` `cols_p²` f32, `first_bad` one u64.
    pub struct ExtractArgs in hessian => extract_kernel {
        /// `R⁻¹`, column-major f64.
        pub a: forge_kernel_abi::DevPtr<f64>,
        /// Side.
        pub cols: u32,
        /// Side of the padded output.
        pub cols_p: u32,
        /// The factor.
        pub u: forge_kernel_abi::DevPtrMut<f32>,
        /// Bad-entry report.
        pub first_bad: forge_kernel_abi::DevPtrMut<u64>,
    }
}

crate::kernel_args! {
    /// `prestep_zero_columns`: zeroes columns `dead[0..n_dead]` of a `rows × cols` weight of
    /// `elem_bytes`-byte elements (zero bits are +0 in every supported dtype): the dead inputs
    /// of the pre-step. One thread per (row, dead column), grid-stride. Safety: `w` holds
    /// `rows·cols·elem_bytes` bytes, `dead` `n_dead` column indices `< cols`.
    pub struct ZeroColumnsArgs in hessian => zero_columns_kernel {
        /// Weight bytes.
        pub w: forge_kernel_abi::DevPtrMut<u8>,
        /// Rows.
        pub rows: u32,
        /// Columns.
        pub cols: u32,
        /// Bytes per element (1, 2 or 4).
        pub elem_bytes: u32,
        /// Columns to zero.
        pub dead: forge_kernel_abi::DevPtr<u32>,
        /// How many.
        pub n_dead: u32,
    }
}

/// Dynamic shared memory of a `hessian_blend_sym` block: one 32×33 f32 tile.
pub const BLEND_SYM_SHARED_BYTES: u32 = 32 * 33 * 4;

/// Shared-memory layout of one `hessian_xtx_*` block: the two `[KCHUNK][TILE]` f32 panels
/// `X[t0.., i0..i0+64]` and `X[t0.., j0..j0+64]`.
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
/// `R⁻¹` from `potrf(UPPER)` then the triangular inverse of the reversed Hessian), of the
/// value that becomes `U[i][j]` (`i ≤ j`): `U = J L̂⁻¹ J` with `L̂ = Rᵀ`, so
/// `U[i][j] = L̂⁻¹[n−1−i][n−1−j] = R⁻¹[n−1−j][n−1−i]`, stored at column `n−1−i`, row `n−1−j`.
#[inline(always)]
pub fn prestep_factor_source(n: usize, i: usize, j: usize) -> usize {
    (n - 1 - i) * n + (n - 1 - j)
}
