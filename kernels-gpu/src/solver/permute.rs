//! `gptq_permute_weight`: the solver's working weights `Wwork[r, t] = W[r, perm[t]]`, zero
//! past the real rows and columns, so later kernels read panels contiguously.
//!
//! Thread mapping: block `(x, y)` covers columns `256·x ..` of rows `y, y + gridDim.y, …`;
//! one thread per column, so a warp reads `perm` and writes `Wwork` in 128-byte runs (and,
//! without act-order, reads `W` in runs too).
//!
//! # Safety (upheld by the host launcher)
//! `w` is `rows·cols` f32; `perm` has `cols_p` entries, a permutation of `0..cols` first;
//! `w_work` holds `rows_p·cols_p` f32; 256 threads per block, `gridDim.x·256 ≥ cols_p`.

use crate::device::{block_x, block_y, grid_dim_y, thread_x};
use forge_kernel_abi::solver::PermuteArgs;

forge_kernel_abi::permute_kernel! {
    /// See the module docs.
    GptqPermuteWeight => fn gptq_permute_weight(args) {
        let PermuteArgs { w, perm, rows, cols, rows_p, cols_p, w_work } = args;
        permute(w.ptr(), perm.ptr(), rows, cols, rows_p, cols_p, w_work.ptr())
    }
}

#[inline(always)]
unsafe fn permute(w: *const f32, perm: *const u32, rows: u32, cols: u32, rows_p: u32, cols_p: u32, w_work: *mut f32) {
    let t = block_x() * 256 + thread_x();
    if t >= cols_p {
        return;
    }
    let j = if t < cols { *perm.add(t as usize) } else { 0 };
    let mut r = block_y();
    while r < rows_p {
        *w_work.add(r as usize * cols_p as usize + t as usize) =
            if r < rows && t < cols { *w.add(r as usize * cols as usize + j as usize) } else { 0.0 };
        r += grid_dim_y();
    }
}
