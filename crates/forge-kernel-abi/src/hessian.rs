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
        /// Non-finite report.
        pub first_bad: forge_kernel_abi::DevPtrMut<u64>,
    }
}

crate::kernel_args! {
    /// `prestep_extract`: `U` (f32, row-major, upper) read out of the inverted factor with
    /// [`prestep_factor_source`]; a non-finite entry or a diagonal `≤ 0` is reported. Safety:
    /// `a` `cols²` f64, `u` `cols²` f32, `first_bad` one u64.
    pub struct ExtractArgs in hessian => extract_kernel {
        /// `R⁻¹`, column-major f64.
        pub a: forge_kernel_abi::DevPtr<f64>,
        /// Side.
        pub cols: u32,
        /// The factor.
        pub u: forge_kernel_abi::DevPtrMut<f32>,
        /// Bad-entry report.
        pub first_bad: forge_kernel_abi::DevPtrMut<u64>,
    }
}

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
