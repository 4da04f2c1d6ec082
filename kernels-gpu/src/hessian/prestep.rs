//! The GPU pre-step's element-wise passes around cuSOLVER (docs/design.md §5).
//!
//! * `prestep_identity`: `U = I` in the padded layout (no calibration data, or every
//!   factorisation failed).
//! * `prestep_gather`: the f64 matrix cuSOLVER factors (and the identity the triangular solve
//!   inverts against): `A[r][c] = (H[o_r, o_c] + H[o_c, o_r])/2`
//!   with `o_r = order[n−1−r]` (act-order, reversed), a zero diagonal replaced by 1 (dead
//!   input), then `+ damping` on the diagonal: the CPU pre-step's `reversed` matrix, value for
//!   value. Non-finite `H` entries are reported in `first_bad`.
//! * `prestep_extract`: `U[i][j] = f32(A[prestep_factor_source(n, i, j)])` for `i ≤ j`,
//!   0 below, into the solver's `cols_p × cols_p` layout with an identity in the padding; a
//!   non-finite value or a diagonal that is not `> 0` is reported in `first_bad`.
//! * `prestep_zero_columns`: the dead inputs' weight columns set to +0 on the device.
//! * `prestep_first_failure`: the first non-zero cuSOLVER `info` of a blocked
//!   factorisation's diagonal blocks (one thread: a few hundred entries at most).
//!
//! Thread mapping: one thread per element of the `n × n` matrix, grid-stride (any 1-D grid);
//! `prestep_first_failure` runs on thread 0 only (others return).
//!
//! # Safety (upheld by the host launcher)
//! `prestep_gather`: `h` `cols²` f32, `order` a permutation of `0..cols`, `a` `cols²` f64,
//! `first_bad` one u64. `prestep_extract`: `a` `cols²` f64, `u` `cols_p²` f32, `first_bad` one
//! u64. `prestep_zero_columns`, `prestep_first_failure`: as their argument structs say.

use super::xtx::stride;
use crate::device::{global_x, note_if_non_finite};
use forge_kernel_abi::hessian::{prestep_factor_source, ExtractArgs, FirstFailureArgs, GatherArgs, ZeroColumnsArgs};

forge_kernel_abi::gather_kernel! {
    /// The damped, dead-fixed, act-order-reversed f64 matrix of the pre-step; see the module docs.
    PrestepGather => fn prestep_gather(args) {
        let GatherArgs { h, cols, order, damping, a, inv, first_bad } = args;
        gather(h.ptr(), cols, order.ptr(), damping, a.ptr(), inv.ptr(), first_bad.ptr())
    }
}

forge_kernel_abi::first_failure_kernel! {
    /// The first non-zero per-block `info`; see the module docs.
    PrestepFirstFailure => fn prestep_first_failure(args) {
        let FirstFailureArgs { infos, count, info } = args;
        if global_x() != 0 {
            return;
        }
        let mut k = 0;
        while k < count as usize {
            let v = *infos.ptr().add(k);
            if v != 0 {
                *info.ptr() = v;
                return;
            }
            k += 1;
        }
    }
}

forge_kernel_abi::identity_kernel! {
    /// `u = I`; see the module docs.
    PrestepIdentity => fn prestep_identity(args) {
        let (u, np) = (args.u.ptr(), args.cols_p as usize);
        let total = np * np;
        let mut idx = global_x() as usize;
        while idx < total {
            *u.add(idx) = if idx.is_multiple_of(np + 1) { 1.0 } else { 0.0 };
            idx += stride();
        }
    }
}

#[inline(always)]
unsafe fn gather(
    h: *const f32,
    cols: u32,
    order: *const u32,
    damping: f64,
    a: *mut f64,
    inv: *mut f64,
    first_bad: *mut u64,
) {
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
        *inv.add(idx) = if r == c { 1.0 } else { 0.0 };
        idx += stride();
    }
}

forge_kernel_abi::extract_kernel! {
    /// `U` (row-major f32, zero below the diagonal) from the inverted factor; see the module docs.
    PrestepExtract => fn prestep_extract(args) {
        let ExtractArgs { a, cols, cols_p, u, first_bad } = args;
        extract(a.ptr(), cols, cols_p, u.ptr(), first_bad.ptr())
    }
}

#[inline(always)]
unsafe fn extract(a: *const f64, cols: u32, cols_p: u32, u: *mut f32, first_bad: *mut u64) {
    let (n, np) = (cols as usize, cols_p as usize);
    if np == 0 {
        return; // also proves the divisions below are by a non-zero np
    }
    let total = np * np;
    let mut idx = global_x() as usize;
    while idx < total {
        let (i, j) = (idx / np, idx % np);
        let mut v = 0f32;
        if i < n && j < n {
            if j >= i {
                v = *a.add(prestep_factor_source(n, i, j)) as f32;
                if !v.is_finite() || (i == j && v <= 0.0) {
                    // Reported as an index of the unpadded n × n factor.
                    crate::device::atomic_max_u64_global(first_bad, !((i * n + j) as u64));
                }
            }
        } else if i == j {
            v = 1.0; // padded columns never touch real ones
        }
        *u.add(idx) = v;
        idx += stride();
    }
}

forge_kernel_abi::zero_columns_kernel! {
    /// Dead input columns of the weight set to +0; see the module docs.
    PrestepZeroColumns => fn prestep_zero_columns(args) {
        let ZeroColumnsArgs { w, rows, cols, elem_bytes, dead, n_dead } = args;
        let (w, dead) = (w.ptr(), dead.ptr());
        let total = rows as usize * n_dead as usize;
        let mut idx = global_x() as usize;
        while idx < total {
            let (r, k) = (idx / n_dead.max(1) as usize, idx % n_dead.max(1) as usize);
            let col = *dead.add(k);
            if col < cols {
                let at = (r * cols as usize + col as usize) * elem_bytes as usize;
                let mut b = 0;
                while b < elem_bytes as usize {
                    *w.add(at + b) = 0;
                    b += 1;
                }
            }
            idx += stride();
        }
    }
}
