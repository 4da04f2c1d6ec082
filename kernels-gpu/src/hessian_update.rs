//! Hessian accumulation and the GPU pre-step's element-wise passes (DESIGN §5).
//!
//! * `hessian_xtx_{f32,f16,bf16}`: `S = XᵀX` of one token chunk, f32 accumulation. A SYRK:
//!   block `(blockIdx.y, blockIdx.x) = (bi, bj)` computes the 64×64 tile `S[64bi.., 64bj..]`
//!   for `bi ≤ bj` only (blocks below the diagonal exit at once) and writes it twice, at
//!   `(i, j)` and mirrored at `(j, i)`, so `S` is exactly symmetric. Thread
//!   `(ty, tx) = (tid/16, tid%16)` owns rows `4ty..4ty+4` × columns `4tx..4tx+4` of the tile
//!   in registers. Tokens run in chunks of 16 staged in shared memory as two `[16][64]`
//!   panels (`X[t, i0..i0+64]` and `X[t, j0..j0+64]`, both coalesced row slices of `X`);
//!   thread `tid` loads token `tid/16`, columns `4(tid%16)..+4` of each panel, and the next
//!   chunk's loads are issued before the current chunk's FMAs. Every entry written is checked:
//!   the smallest flat index of a NaN/inf lands in `first_bad` (as `!index`), which catches
//!   both non-finite activations (they reach the diagonal) and f32 overflow.
//! * `hessian_blend`: `H ← β·H + α·S`, one thread per element (grid-stride), multiply,
//!   multiply, add in f32, as the CPU accumulator.
//! * `hessian_diag`: `out[i] = H[i, i]`.
//! * `prestep_gather`: the f64 matrix cuSOLVER factors: `A[r][c] = (H[o_r, o_c] + H[o_c, o_r])/2`
//!   with `o_r = order[n−1−r]` (act-order, reversed), a zero diagonal replaced by 1 (dead
//!   input), then `+ damping` on the diagonal: the CPU pre-step's `reversed` matrix, value for
//!   value. Non-finite `H` entries are reported in `first_bad`.
//! * `prestep_extract`: `U[i][j] = f32(A[prestep_factor_source(n, i, j)])` for `i ≤ j`,
//!   0 below; a non-finite value or a diagonal that is not `> 0` is reported in `first_bad`.
//!
//! # Safety (upheld by the host launcher)
//! `hessian_xtx_*`: `x` holds `tokens·cols` elements, row-major, aligned to 4 elements (a
//! whole allocation, or a view starting at a multiple of `cols` tokens with `cols % 4 == 0`
//! when the vector path is taken); `s` holds `cols²` f32; `first_bad` one u64; block 256
//! threads, grid `(ceil(cols/64), ceil(cols/64))`, dynamic shared memory
//! `HessianSharedLayout::new().total` bytes. `hessian_blend`: `h`, `s` hold `cols²` f32.
//! `hessian_diag`: `h` `cols²`, `out` `cols`. `prestep_gather`: `h` `cols²` f32, `order` a
//! permutation of `0..cols`, `a` `cols²` f64. `prestep_extract`: `a` `cols²` f64, `u` `cols²`
//! f32. Element-wise kernels: any 1-D grid (they stride over their range).

use crate::device::{
    block_dim_x, block_x, block_y, global_x, grid_dim_x, ld_shared_f32x4, note_if_non_finite, shared_window_base,
    st_shared_f32x4, sync_threads, thread_x, Bf16Bits, Elem, F16Bits,
};
use core::f32::math::mul_add as fma;
use forge_numerics::{prestep_factor_source, HessianSharedLayout, HESSIAN_KCHUNK as KC, HESSIAN_TILE as TILE};

/// Repeats `$body` with `$i` bound to the literals 0..4, so register arrays indexed by `$i`
/// keep constant indices (a runtime index would demote them to local memory).
macro_rules! unroll4 {
    ($i:ident, $body:block) => {{
        {
            let $i: usize = 0;
            $body
        }
        {
            let $i: usize = 1;
            $body
        }
        {
            let $i: usize = 2;
            $body
        }
        {
            let $i: usize = 3;
            $body
        }
    }};
}

/// Four consecutive columns `c..c+4` of token `t`, widened to f32; zeros past the ends.
#[inline(always)]
unsafe fn load_quad<E: Elem>(x: *const E, tokens: u32, cols: u32, t: u32, c: u32, vec_ok: bool) -> [f32; 4] {
    let mut v = [0f32; 4];
    if t >= tokens {
        return v;
    }
    let row = t as usize * cols as usize;
    if vec_ok && c < cols {
        // cols % 4 == 0 and c % 4 == 0: the quad is whole and 4-element aligned.
        return E::load4_f32(x, row + c as usize);
    }
    unroll4!(q, {
        if c + (q as u32) < cols {
            v[q] = E::load_f32(x, row + c as usize + q);
        }
    });
    v
}

#[inline(always)]
unsafe fn hessian_xtx_impl<E: Elem>(x: *const E, tokens: u32, cols: u32, s: *mut f32, first_bad: *mut u64) {
    let (bi, bj) = (block_y(), block_x());
    let nt = cols.div_ceil(TILE);
    // Uniform for the whole block, before any barrier: lower-triangle tiles come from the
    // mirror writes of their upper partners.
    if bi > bj || bj >= nt {
        return;
    }
    let l = HessianSharedLayout::new();
    let base = shared_window_base();
    let tid = thread_x();
    let (ty, tx) = (tid / 16, tid % 16);
    let (i0, j0) = (bi * TILE, bj * TILE);
    let (lk, lc) = (tid / 16, (tid % 16) * 4);
    let vec_ok = cols.is_multiple_of(4);
    let mut acc = [[0f32; 4]; 4];

    let chunks = tokens.div_ceil(KC);
    let mut a = load_quad(x, tokens, cols, lk, i0 + lc, vec_ok);
    let mut b = load_quad(x, tokens, cols, lk, j0 + lc, vec_ok);
    let mut ch = 0;
    while ch < chunks {
        sync_threads(); // the previous chunk's reads are done
        st_shared_f32x4(base + l.a + (lk * TILE + lc) * 4, a);
        st_shared_f32x4(base + l.b + (lk * TILE + lc) * 4, b);
        sync_threads();
        if ch + 1 < chunks {
            let t = (ch + 1) * KC + lk;
            a = load_quad(x, tokens, cols, t, i0 + lc, vec_ok);
            b = load_quad(x, tokens, cols, t, j0 + lc, vec_ok);
        }
        let mut k = 0;
        while k < KC {
            let av = ld_shared_f32x4(base + l.a + (k * TILE + 4 * ty) * 4);
            let bv = ld_shared_f32x4(base + l.b + (k * TILE + 4 * tx) * 4);
            unroll4!(p, {
                unroll4!(q, {
                    acc[p][q] = fma(av[p], bv[q], acc[p][q]);
                });
            });
            k += 1;
        }
        ch += 1;
    }

    let n = cols as usize;
    unroll4!(p, {
        let i = i0 + 4 * ty + p as u32;
        unroll4!(q, {
            let j = j0 + 4 * tx + q as u32;
            if i < cols && j < cols {
                let v = acc[p][q];
                let (iu, ju) = (i as usize, j as usize);
                note_if_non_finite(v, (iu * n + ju) as u64, first_bad);
                *s.add(iu * n + ju) = v;
                // Diagonal tiles hold both halves themselves; no mirror write there.
                if bi != bj {
                    *s.add(ju * n + iu) = v;
                }
            }
        });
    });
}

/// `S = XᵀX` of `tokens` f32 activations (`tokens × cols`, row-major); see the module docs.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hessian_xtx_f32(
    x: *const f32,
    tokens: u32,
    cols: u32,
    s: *mut f32,
    first_bad: *mut u64,
) {
    hessian_xtx_impl::<f32>(x, tokens, cols, s, first_bad)
}

/// `S = XᵀX` of f16 activations (widened exactly to f32); see the module docs.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hessian_xtx_f16(
    x: *const F16Bits,
    tokens: u32,
    cols: u32,
    s: *mut f32,
    first_bad: *mut u64,
) {
    hessian_xtx_impl::<F16Bits>(x, tokens, cols, s, first_bad)
}

/// `S = XᵀX` of bf16 activations (widened exactly to f32); see the module docs.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hessian_xtx_bf16(
    x: *const Bf16Bits,
    tokens: u32,
    cols: u32,
    s: *mut f32,
    first_bad: *mut u64,
) {
    hessian_xtx_impl::<Bf16Bits>(x, tokens, cols, s, first_bad)
}

/// Grid-stride range of this thread over `0..total`.
#[inline(always)]
fn stride() -> usize {
    (grid_dim_x() * block_dim_x()) as usize
}

/// `H ← β·H + α·S` over `cols²` elements (f32 multiply, multiply, add; never fused).
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hessian_blend(h: *mut f32, s: *const f32, cols: u32, alpha: f32, beta: f32) {
    let total = cols as usize * cols as usize;
    let mut idx = global_x() as usize;
    while idx < total {
        let old = *h.add(idx);
        *h.add(idx) = beta * old + alpha * *s.add(idx);
        idx += stride();
    }
}

/// `out[i] = H[i, i]` for `i < cols`.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hessian_diag(h: *const f32, cols: u32, out: *mut f32) {
    let mut i = global_x() as usize;
    while i < cols as usize {
        *out.add(i) = *h.add(i * cols as usize + i);
        i += stride();
    }
}

/// The damped, dead-fixed, act-order-reversed f64 matrix of the pre-step; see the module docs.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn prestep_gather(
    h: *const f32,
    cols: u32,
    order: *const u32,
    damping: f64,
    a: *mut f64,
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
        idx += stride();
    }
}

/// `U` (row-major f32, zero below the diagonal) from the inverted factor; see the module docs.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn prestep_extract(a: *const f64, cols: u32, u: *mut f32, first_bad: *mut u64) {
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
