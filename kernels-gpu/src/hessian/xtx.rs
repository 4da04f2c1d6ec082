//! Hessian accumulation (docs/design.md §5): `S = XᵀX` per token chunk, the running blend, the diagonal.
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
//!
//! # Safety (upheld by the host launcher)
//! `hessian_xtx_*`: `x` holds `tokens·cols` elements, row-major, aligned to 4 elements (a
//! whole allocation, or a view starting at a multiple of `cols` tokens with `cols % 4 == 0`
//! when the vector path is taken); `s` holds `cols²` f32; `first_bad` one u64; block 256
//! threads, grid `(ceil(cols/64), ceil(cols/64))`, dynamic shared memory
//! `HessianSharedLayout::new().total` bytes. `hessian_blend`: `h`, `s` hold `cols²` f32.
//! `hessian_diag`: `h` `cols²`, `out` `cols`. Element-wise kernels: any 1-D grid (they stride
//! over their range).

use crate::device::{
    block_dim_x, block_x, block_y, global_x, grid_dim_x, ld_shared_f32x4, note_if_non_finite, shared_window_base,
    st_shared_f32x4, sync_threads, thread_x, thread_y, Elem, Smem,
};
use core::f32::math::mul_add as fma;
use forge_kernel_abi::elem::{Bf16Bits, F16Bits};
use forge_kernel_abi::hessian::{
    BlendArgs, BlendSymArgs, DiagArgs, HessianSharedLayout, XtxArgs, HESSIAN_KCHUNK as KC, HESSIAN_TILE as TILE,
};

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

macro_rules! xtx_entry {
    ($marker:ident, $name:ident, $t:ty) => {
        forge_kernel_abi::xtx_kernel! {
            /// `S = XᵀX` of one token chunk (widened exactly to f32); see the module docs.
            $marker => fn $name(args) {
                let XtxArgs { x, tokens, cols, s, first_bad } = args;
                hessian_xtx_impl::<$t>(x.ptr() as *const $t, tokens, cols, s.ptr(), first_bad.ptr())
            }
        }
    };
}

xtx_entry!(HessianXtxF32, hessian_xtx_f32, f32);
xtx_entry!(HessianXtxF16, hessian_xtx_f16, F16Bits);
xtx_entry!(HessianXtxBf16, hessian_xtx_bf16, Bf16Bits);

/// Grid-stride range of this thread over `0..total`.
#[inline(always)]
pub(crate) fn stride() -> usize {
    (grid_dim_x() * block_dim_x()) as usize
}

forge_kernel_abi::blend_kernel! {
    /// `H ← β·H + α·S` over `cols²` elements (f32 multiply, multiply, add; never fused).
    HessianBlend => fn hessian_blend(args) {
        let BlendArgs { h, s, cols, alpha, beta } = args;
        let (h, s) = (h.ptr(), s.ptr());
        let total = cols as usize * cols as usize;
        let mut idx = global_x() as usize;
        while idx < total {
            let old = *h.add(idx);
            *h.add(idx) = beta * old + alpha * *s.add(idx);
            idx += stride();
        }
    }
}

forge_kernel_abi::diag_kernel! {
    /// `out[i] = H[i, i]` for `i < cols`.
    HessianDiag => fn hessian_diag(args) {
        let DiagArgs { h, cols, out } = args;
        let mut i = global_x() as usize;
        while i < cols as usize {
            *out.ptr().add(i) = *h.ptr().add(i * cols as usize + i);
            i += stride();
        }
    }
}

forge_kernel_abi::blend_sym_kernel! {
    /// `H ← β·H + α·sym(S)` from `S`'s upper triangle, checked; see `BlendSymArgs`. Thread
    /// `(tx, ty)` of a 32×8 block handles rows `ty, ty+8, ty+16, ty+24` × column `tx` of the
    /// tile pair `(bi, bj)`, `bi ≤ bj`: the upper tile reads `S` row-wise (coalesced), the
    /// mirrored tile is written from the transposed shared tile.
    HessianBlendSym => fn hessian_blend_sym(args) {
        let BlendSymArgs { h, out, s, cols, alpha, beta, first_bad } = args;
        let (h, out, s, first_bad) = (h.ptr(), out.ptr(), s.ptr(), first_bad.ptr());
        let (bi, bj) = (block_y(), block_x());
        let (tx, ty) = (thread_x(), thread_y());
        if bi <= bj {
            let n = cols as usize;
            // The 32×33 tile in dynamic shared memory (padded rows: transposed reads hit
            // distinct banks).
            let tile = |r: usize, c: usize| Smem::<f32>::at_byte(shared_window_base()).at((r * 33 + c) as u32);
            let (r0, c0) = (bi * 32, bj * 32);
            let mut k = 0;
            while k < 4 {
                let (li, lj) = (ty + 8 * k, tx);
                let (i, j) = ((r0 + li) as usize, (c0 + lj) as usize);
                let mut v = 0f32;
                if i < n && j < n && i <= j {
                    v = *s.add(i * n + j);
                    note_if_non_finite(v, (i * n + j) as u64, first_bad);
                }
                tile(li as usize, lj as usize).st(v);
                k += 1;
            }
            crate::device::sync_threads();
            let mut k = 0;
            while k < 4 {
                let (li, lj) = ((ty + 8 * k) as usize, tx as usize);
                // Upper tile (bi, bj): on the diagonal tile, entries below it come mirrored.
                let (i, j) = (r0 as usize + li, c0 as usize + lj);
                if i < n && j < n {
                    let v = if bi != bj || li <= lj { tile(li, lj).ld() } else { tile(lj, li).ld() };
                    *out.add(i * n + j) = beta * *h.add(i * n + j) + alpha * v;
                }
                // Mirrored tile (bj, bi): row c0 + li, column r0 + lj holds S[r0 + lj][c0 + li].
                let (i, j) = (c0 as usize + li, r0 as usize + lj);
                if bi != bj && i < n && j < n {
                    *out.add(i * n + j) = beta * *h.add(i * n + j) + alpha * tile(lj, li).ld();
                }
                k += 1;
            }
        }
    }
}
