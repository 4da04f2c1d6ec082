//! The GPU pre-step's element-wise passes around cuSOLVER (docs/design.md §5).
//!
//! * `prestep_gather`: the f64 matrix cuSOLVER factors: `A[r][c] = (H[o_r, o_c] + H[o_c, o_r])/2`
//!   with `o_r = order[n−1−r]` (act-order, reversed), a zero diagonal replaced by 1 (dead
//!   input), then `+ damping` on the diagonal: the CPU pre-step's `reversed` matrix, value for
//!   value. Non-finite `H` entries are reported in `first_bad`.
//! * `prestep_extract`: `U[i][j] = f32(A[prestep_factor_source(n, i, j)])` for `i ≤ j`,
//!   0 below; a non-finite value or a diagonal that is not `> 0` is reported in `first_bad`.
//!
//! Thread mapping: one thread per element of the `n × n` matrix, grid-stride (any 1-D grid).
//!
//! # Safety (upheld by the host launcher)
//! `prestep_gather`: `h` `cols²` f32, `order` a permutation of `0..cols`, `a` `cols²` f64,
//! `first_bad` one u64. `prestep_extract`: `a` `cols²` f64, `u` `cols²` f32, `first_bad` one u64.

use super::xtx::stride;
use crate::device::{global_x, note_if_non_finite};
use forge_kernel_abi::hessian::{prestep_factor_source, ExtractArgs, GatherArgs};

forge_kernel_abi::gather_kernel! {
    /// The damped, dead-fixed, act-order-reversed f64 matrix of the pre-step; see the module docs.
    PrestepGather => fn prestep_gather(args) {
        let GatherArgs { h, cols, order, damping, a, first_bad } = args;
        gather(h.ptr(), cols, order.ptr(), damping, a.ptr(), first_bad.ptr())
    }
}

#[inline(always)]
unsafe fn gather(h: *const f32, cols: u32, order: *const u32, damping: f64, a: *mut f64, first_bad: *mut u64) {
    let n = cols as usize;
    if n == 0 {
        return; // also proves the divisions below are by a non-zero n
    }
    let total = n * n;
    let mut idx = global_x() as usize;
    while idx < total {
        let (r, c) = (idx / n, idx % n);
        let oi = *order.add(n - 1 - r) as usize;
        let oj = *order.add(n - 1 - c) as usize;
        let (x, y) = (*h.add(oi * n + oj), *h.add(oj * n + oi));
        note_if_non_finite(x, (oi * n + oj) as u64, first_bad);
        note_if_non_finite(y, (oj * n + oi) as u64, first_bad);
        let mut v = 0.5 * (x as f64 + y as f64);
        if r == c {
            if v == 0.0 {
                v = 1.0;
            }
            v += damping;
        }
        *a.add(idx) = v;
        idx += stride();
    }
}

forge_kernel_abi::extract_kernel! {
    /// `U` (row-major f32, zero below the diagonal) from the inverted factor; see the module docs.
    PrestepExtract => fn prestep_extract(args) {
        let ExtractArgs { a, cols, u, first_bad } = args;
        extract(a.ptr(), cols, u.ptr(), first_bad.ptr())
    }
}

#[inline(always)]
unsafe fn extract(a: *const f64, cols: u32, u: *mut f32, first_bad: *mut u64) {
    let n = cols as usize;
    if n == 0 {
        return; // also proves the divisions below are by a non-zero n
    }
    let total = n * n;
    let mut idx = global_x() as usize;
    while idx < total {
        let (i, j) = (idx / n, idx % n);
        let mut v = 0f32;
        if j >= i {
            v = *a.add(prestep_factor_source(n, i, j)) as f32;
            if !v.is_finite() || (i == j && v <= 0.0) {
                crate::device::atomic_max_u64_global(first_bad, !(idx as u64));
            }
        }
        *u.add(idx) = v;
        idx += stride();
    }
}
