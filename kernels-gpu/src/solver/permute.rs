//! `gptq_permute_weight_{f32,f16,bf16,fp8}`: the solver's working weights
//! `Wwork[r, t] = f32(W[r, perm[t]])`, zero past the real rows and columns, so later kernels
//! read panels contiguously. Widening is exact ([`crate::device::Elem`]), so a weight can stay
//! in its stored dtype on the device.
//!
//! Thread mapping: block `(x, y)` covers columns `256·x ..` of rows `y, y + gridDim.y, …`;
//! one thread per column, so a warp reads `perm` and writes `Wwork` in 128-byte runs (and,
//! without act-order, reads `W` in runs too).
//!
//! # Safety (upheld by the host launcher)
//! `w` is `rows·cols` elements of the kernel's dtype; `perm` has `cols_p` entries, a permutation of `0..cols` first;
//! `w_work` holds `rows_p·cols_p` f32; 256 threads per block, `gridDim.x·256 ≥ cols_p`.

use crate::device::{block_x, block_y, grid_dim_y, thread_x, Elem};
use forge_kernel_abi::elem::{Bf16Bits, F16Bits, Fp8E4M3};
use forge_kernel_abi::solver::PermuteArgs;

macro_rules! permute_entry {
    ($marker:ident, $name:ident, $t:ty) => {
        forge_kernel_abi::permute_kernel! {
            /// Permuted, widened working weights for one weight dtype; see the module docs.
            $marker => fn $name(args) {
                let PermuteArgs { w, perm, rows, cols, rows_p, cols_p, w_work } = args;
                permute::<$t>(w.ptr() as *const $t, perm.ptr(), rows, cols, rows_p, cols_p, w_work.ptr())
            }
        }
    };
}

permute_entry!(GptqPermuteWeightF32, gptq_permute_weight_f32, f32);
permute_entry!(GptqPermuteWeightF16, gptq_permute_weight_f16, F16Bits);
permute_entry!(GptqPermuteWeightBf16, gptq_permute_weight_bf16, Bf16Bits);
permute_entry!(GptqPermuteWeightFp8, gptq_permute_weight_fp8, Fp8E4M3);

#[inline(always)]
unsafe fn permute<T: Elem>(
    w: *const T,
    perm: *const u32,
    rows: u32,
    cols: u32,
    rows_p: u32,
    cols_p: u32,
    w_work: *mut f32,
) {
    let t = block_x() * 256 + thread_x();
    if t >= cols_p {
        return;
    }
    let j = if t < cols { *perm.add(t as usize) } else { 0 };
    let mut r = block_y();
    while r < rows_p {
        *w_work.add(r as usize * cols_p as usize + t as usize) =
            if r < rows && t < cols { T::load_f32(w, r as usize * cols as usize + j as usize) } else { 0.0 };
        r += grid_dim_y();
    }
}
