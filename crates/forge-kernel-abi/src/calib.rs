//! The calibration forward pass's element-wise and row kernels (issue 14, docs/kernels.md §8):
//! RMSNorm, bias, RoPE, causal softmax, SwiGLU, casts, and the MoE row gather/scatter. The
//! matrix products around them are cuBLAS calls.

/// Threads per block of every forward kernel (warp-per-row kernels: 8 rows per block).
pub const FORWARD_THREADS: u32 = 256;

/// `act_dtype`: activations stored as f32.
pub const ACT_F32: u32 = 0;
/// `act_dtype`: activations stored as bf16 bits (round to nearest-even).
pub const ACT_BF16: u32 = 1;

crate::kernel_args! {
    /// `rms_norm_rows`: for each row `r < rows` (token `t = r / heads`, head `h = r % heads`)
    /// the `n` f32 values at `x + t·stride + h·n` become `weight · (x · inv)` with
    /// `inv = f32(1 / sqrt(f64(f32(Σx²/n) + eps)))`, the sum of squares in f64 (the CPU
    /// reference's formula). Written to `out_f32` (same addressing as `x`; may be `x`) when it
    /// is not null, and to `out_act` (row-major `[rows, n]`, `act_dtype`) when it is not null.
    /// Safety: every addressed row lies in its buffer; `weight` holds `n` f32; `heads ≥ 1`.
    /// One warp per row, grid-stride, blocks of [`FORWARD_THREADS`].
    pub struct RmsNormArgs in calib => rms_norm_kernel {
        /// Input rows.
        pub x: forge_kernel_abi::DevPtr<f32>,
        /// The norm's weight, `n` values.
        pub weight: forge_kernel_abi::DevPtr<f32>,
        /// Rows (tokens · heads).
        pub rows: u32,
        /// Values per row.
        pub n: u32,
        /// Rows per token (1, or the heads of a per-head norm).
        pub heads: u32,
        /// Elements between tokens.
        pub stride: u32,
        /// Added to the mean square.
        pub eps: f32,
        /// f32 output (x's addressing), or null.
        pub out_f32: forge_kernel_abi::DevPtrMut<f32>,
        /// Activation output `[rows, n]`, or null.
        pub out_act: forge_kernel_abi::DevPtrMut<u8>,
        /// [`ACT_F32`] or [`ACT_BF16`].
        pub act_dtype: u32,
    }
}

crate::kernel_args! {
    /// `add_bias_rows`: `y[t·stride + c] += bias[c]` for `t < rows`, `c < n`. Grid-stride over
    /// `rows·n`. Safety: `y` holds `rows` rows of `stride ≥ n` f32, `bias` `n` f32.
    pub struct BiasArgs in calib => bias_kernel {
        /// Rows to add to.
        pub y: forge_kernel_abi::DevPtrMut<f32>,
        /// `n` values.
        pub bias: forge_kernel_abi::DevPtr<f32>,
        /// Rows.
        pub rows: u32,
        /// Columns.
        pub n: u32,
        /// Elements between rows.
        pub stride: u32,
    }
}

crate::kernel_args! {
    /// `rope_rows`: rotates the `heads` heads of `head_dim` f32 at `y + t·stride + h·head_dim`
    /// (`t < rows`) in place: for `i < half`, `(a, b) = (x[i], x[half + i])` becomes
    /// `(a·cos − b·sin, b·cos + a·sin)` with `cos`/`sin` at `[t·half + i]` (the CPU reference's
    /// `Rope::apply`, same f32 operations). One thread per `(t, h, i)`, grid-stride.
    /// Safety: the addressed heads lie in `y`; `cos`, `sin` hold `rows·half` f32;
    /// `2·half ≤ head_dim`.
    pub struct RopeArgs in calib => rope_kernel {
        /// The first token's first head.
        pub y: forge_kernel_abi::DevPtrMut<f32>,
        /// `cos` table `[rows][half]` (attention factor included).
        pub cos: forge_kernel_abi::DevPtr<f32>,
        /// `sin` table `[rows][half]`.
        pub sin: forge_kernel_abi::DevPtr<f32>,
        /// Tokens.
        pub rows: u32,
        /// Heads per token.
        pub heads: u32,
        /// Features per head.
        pub head_dim: u32,
        /// Rotated pairs per head (`rotary_dim / 2`).
        pub half: u32,
        /// Elements between tokens.
        pub stride: u32,
    }
}

crate::kernel_args! {
    /// `causal_softmax`: the scores `s` `[heads][t][t]` (f32, row `(h, i)` over keys `j`) become
    /// probabilities in place: keys `first(i) ≤ j ≤ i` (`first = i + 1 − window` when
    /// `window > 0`, else 0) get `exp(s − max) / Σ`, the others 0. `exp` by range reduction
    /// in f64 and `ex2.approx` on the fraction (relative error < 2⁻²¹). One warp per row,
    /// grid-stride. Safety: `s` holds `heads·t·t` f32.
    pub struct SoftmaxArgs in calib => softmax_kernel {
        /// Scores, overwritten with probabilities.
        pub s: forge_kernel_abi::DevPtrMut<f32>,
        /// Heads.
        pub heads: u32,
        /// Tokens of the sequence.
        pub t: u32,
        /// Sliding window (0: full causal).
        pub window: u32,
    }
}

crate::kernel_args! {
    /// `swiglu`: `out[r, c] = silu(gu[r, c]) · gu[r, inter + c]` (`r < rows`, `c < inter`),
    /// `silu(x) = x / (1 + exp(−x))` in f32 with the softmax's `exp`, stored in `act_dtype`.
    /// Grid-stride. Safety: `gu` holds `rows·2·inter` f32, `out` `rows·inter` elements.
    pub struct SwigluArgs in calib => swiglu_kernel {
        /// Gate (columns `0..inter`) and up (`inter..2·inter`) outputs, row-major.
        pub gu: forge_kernel_abi::DevPtr<f32>,
        /// Rows.
        pub rows: u32,
        /// Inner width.
        pub inter: u32,
        /// `[rows, inter]` in `act_dtype`.
        pub out: forge_kernel_abi::DevPtrMut<u8>,
        /// [`ACT_F32`] or [`ACT_BF16`].
        pub act_dtype: u32,
    }
}

crate::kernel_args! {
    /// `cast_f32`: `out[i] = act(x[i])` for `i < len` (bf16: round to nearest-even). Grid-stride.
    /// Safety: `x` holds `len` f32, `out` `len` elements of `act_dtype`.
    pub struct CastArgs in calib => cast_kernel {
        /// f32 input.
        pub x: forge_kernel_abi::DevPtr<f32>,
        /// Elements.
        pub len: u32,
        /// Output in `act_dtype`.
        pub out: forge_kernel_abi::DevPtrMut<u8>,
        /// [`ACT_F32`] or [`ACT_BF16`].
        pub act_dtype: u32,
    }
}

crate::kernel_args! {
    /// `add_f32`: `dst[i] += x[i]` for `i < len`. Grid-stride. Safety: both hold `len` f32.
    pub struct AddArgs in calib => add_kernel {
        /// Accumulated into.
        pub dst: forge_kernel_abi::DevPtrMut<f32>,
        /// Added.
        pub x: forge_kernel_abi::DevPtr<f32>,
        /// Elements.
        pub len: u32,
    }
}

crate::kernel_args! {
    /// `gather_rows`: `out[k, :] = src[idx[k], :]` for `k < rows`, rows of `words` 16-bit
    /// units (an f32 row is two units per value). Grid-stride. Safety: `idx` holds `rows`
    /// indices of rows inside `src`; `out` `rows·words` units; both 2-byte aligned.
    pub struct GatherArgs in calib => gather_rows_kernel {
        /// Source rows.
        pub src: forge_kernel_abi::DevPtr<u16>,
        /// Source row of each output row.
        pub idx: forge_kernel_abi::DevPtr<u32>,
        /// Output rows.
        pub rows: u32,
        /// 16-bit units per row.
        pub words: u32,
        /// Gathered rows.
        pub out: forge_kernel_abi::DevPtrMut<u16>,
    }
}

crate::kernel_args! {
    /// `scatter_add_rows`: `dst[idx[k], c] += weight[k] · y[k, c]` for `k < rows`, `c < n`
    /// (f32; the indices of one launch are distinct, so no two threads add to one element).
    /// Grid-stride. Safety: `idx` distinct rows of `dst` (`n` f32 each); `y` `rows·n` f32;
    /// `weight` `rows` f32.
    pub struct ScatterAddArgs in calib => scatter_add_kernel {
        /// Rows to add.
        pub y: forge_kernel_abi::DevPtr<f32>,
        /// Destination row of each.
        pub idx: forge_kernel_abi::DevPtr<u32>,
        /// Scale of each.
        pub weight: forge_kernel_abi::DevPtr<f32>,
        /// Rows.
        pub rows: u32,
        /// Columns.
        pub n: u32,
        /// Accumulated into.
        pub dst: forge_kernel_abi::DevPtrMut<f32>,
    }
}
