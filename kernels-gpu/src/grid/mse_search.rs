//! `mse_search_*`: absmax meta, then the MSE / Lᵖ shrink search, fused (docs/design.md §3).
//!
//! Each block owns `gpb` consecutive groups (groups per block, chosen by the host so they fit
//! in shared memory). Thread mapping:
//! 1. load: warp `w` takes groups `w, w+warps, …`: reads each from global memory once,
//!    keeping min/max in registers and the values in shared memory (row stride `gs+4`
//!    floats: rows stay 16-byte aligned and lanes on different groups hit different banks),
//!    then lane 0 encodes the absmax meta;
//! 2. search: the block's `gpb·n_cand` (group, candidate) pairs are dealt round-robin to its
//!    threads. A thread takes the candidate's scale as stored, `s = round_to_dtype(decode(
//!    encode(base·p_k)), scale_dtype)` (docs/design.md §3), and sums `|q − v|^norm` over the
//!    group, with `v = x/s + q0` and `q = clamp(rint(v), 0, maxq)`: the loss in units of `s`
//!    (`|ŷ − x| = s·|q − v|`). Loads are 16-byte shared broadcasts. The candidate's key is
//!    `log2(Σ) + norm·log2(s/base)`, which orders candidates as the loss does without
//!    overflowing for any weight magnitude (f32: `log2 s` is exactly q88/256; f16/bf16:
//!    `lg2(s)`, a function of the stored scale alone, so candidates rounding to the same
//!    stored scale tie exactly). A stored scale of 0 (f16 below 2^-25) dequantizes everything
//!    to 0, key `log2(Σ|x/base|^norm)`; an infinite one (f16 ≥ 65520) gets key +inf, as the
//!    CPU ranks it;
//!    `(ordered key << 32) | k` is folded into the group's best with a shared atomic min, so
//!    equal keys keep the lower `k`;
//! 3. write: thread `i < gpb` encodes the winner into the group's qmeta4 record.
//!
//! `v` is `fma(x, 1/s, q0)`, not `x/s + q0`: the difference can only move a code across a
//! rounding midpoint, where `|q − v|` is 0.5 either way, so a loss changes by < 2^-13·s per
//! such element. The solver, which emits codes, uses the exact division.
//!
//! Candidates live in constant memory (`MSE_CANDIDATES`, ≤ 1024 f32), written by the host.
//! Dynamic shared memory: `forge_kernel_abi::grid::MseSharedLayout::new(gs, gpb).total` bytes.
//!
//! # Safety (upheld by the host launcher)
//! As `range_meta_*`, plus `1 ≤ n_cand ≤ 1024` candidates written to `MSE_CANDIDATES`, and
//! the launch's dynamic shared memory at least the size above.

use crate::device::{
    block_dim_x, block_x, lane, ld_shared_f32x4, ld_shared_u32, ld_shared_u64, log2_approx, note_if_non_finite,
    ordered_bits, red_min_shared_u64, shared_window_base, st_shared_u32, st_shared_u64, sync_threads, thread_x,
    warp_min_max, Elem, WARP,
};
use core::f32::math::mul_add as fma;
use forge_kernel_abi::elem::{Bf16Bits, F16Bits, Fp8E4M3};
use forge_kernel_abi::grid::{MseSearchArgs, MseSharedLayout};
use forge_numerics::quant::reciprocal_is_safe;
use forge_numerics::{abs_pow, decode_log2_q88, encode_log2_q88, range_meta, round_to_dtype, QMetaPacked, ScaleDtype};

core::arch::global_asm!(".const .align 4 .b8 MSE_CANDIDATES[4096];");

/// Candidate `k` from constant memory.
#[inline(always)]
fn candidate(k: u32) -> f32 {
    let v: f32;
    // SAFETY: k < n_cand ≤ 1024 by the launch contract, inside the 4096-byte array.
    unsafe {
        core::arch::asm!(
            "{{ .reg .u64 a; mov.u64 a, MSE_CANDIDATES; add.s64 a, a, {off}; ld.const.f32 {v}, [a]; }}",
            off = in(reg64) (k as u64) * 4,
            v = out(reg32) v,
        );
    }
    v
}

/// `Σ |rint(clamp(v, 0, maxq)) − v|^norm` over a group's shared copy at shared address `xs`
/// (`gs` floats, 16-byte aligned), with `v = to_units(x)`. `NORM2` selects the square.
///
/// Rounding uses the `1.5·2^23` trick (two full-rate adds) instead of `cvt.rni`, which runs
/// at the conversion units' quarter rate; it is exact here because `0 ≤ clamp(v) ≤ 255`.
#[inline(always)]
unsafe fn scaled_loss<const NORM2: bool>(xs: u32, gs: u32, to_units: impl Fn(f32) -> f32, maxq: f32, norm: f32) -> f32 {
    const ROUNDER: f32 = 12_582_912.0; // 1.5·2^23: v + ROUNDER has no fraction bits left
                                       // Four partial sums: independent dependency chains and a smaller rounding bound.
    let mut acc = [0f32; 4];
    let mut e = 0;
    while e < gs {
        let x = ld_shared_f32x4(xs + 4 * e);
        let mut j = 0;
        while j < 4 {
            let v = to_units(x[j]);
            let q = (v.max(0.0).min(maxq) + ROUNDER) - ROUNDER;
            let d = q - v;
            acc[j] = if NORM2 { fma(d, d, acc[j]) } else { acc[j] + abs_pow(d, norm) };
            j += 1;
        }
        e += 4;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

#[inline(always)]
unsafe fn mse_search_impl<T: Elem>(
    w: *const T,
    rows: u32,
    cols: u32,
    gs: u32,
    n_groups: u32,
    bits: u32,
    symmetric: u32,
    n_cand: u32,
    norm: f32,
    scale_dtype: u32,
    gpb: u32,
    qmeta: *mut u32,
    first_bad: *mut u64,
) {
    // `max(1)` lets the compiler drop the division-by-zero panic paths (the host never passes 0).
    let n_groups = n_groups.max(1);
    let n_cand = n_cand.max(1);
    let total = rows as u64 * n_groups as u64;
    let first = block_x() as u64 * gpb as u64;
    let maxq = forge_numerics::maxq(bits);
    let sym = symmetric != 0;
    let dtype = ScaleDtype::from_u32(scale_dtype);
    let layout = MseSharedLayout::new(gs, gpb);
    let row_bytes = layout.row_bytes;
    let xs = shared_window_base();
    let base_meta = xs + layout.base_meta;
    let best = xs + layout.best;

    // 1. load + absmax meta
    let warps = block_dim_x() / WARP;
    let mut i = thread_x() / WARP;
    while i < gpb {
        let gid = first + i as u64;
        if gid < total {
            let r = (gid / n_groups as u64) as u32;
            let g = (gid % n_groups as u64) as u32;
            let row = r as usize * cols as usize;
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            let mut e = lane();
            while e < gs {
                let c = g * gs + e;
                let v = if c < cols { T::load_f32(w, row + c as usize) } else { 0.0 };
                note_if_non_finite(v, (row + c as usize) as u64, first_bad);
                lo = lo.min(v);
                hi = hi.max(v);
                st_shared_u32(xs + i * row_bytes + 4 * e, v.to_bits());
                e += WARP;
            }
            let (lo, hi) = warp_min_max(lo, hi);
            if lane() == 0 {
                let m = range_meta(lo, hi, maxq, sym);
                st_shared_u32(base_meta + 4 * i, QMetaPacked::encode(m.scale, m.qzero, sym).to_u32());
                st_shared_u64(best + 8 * i, u64::MAX);
            }
        }
        i += warps;
    }
    sync_threads();

    // 2. search every (group, candidate) pair
    let pairs = gpb * n_cand;
    let mut p = thread_x();
    while p < pairs {
        let i = p / n_cand;
        let k = p - i * n_cand;
        if first + (i as u64) < total {
            let m = QMetaPacked::from_u32(ld_shared_u32(base_meta + 4 * i));
            let q88 = encode_log2_q88(m.scale() * candidate(k));
            let scale = round_to_dtype(decode_log2_q88(q88), dtype);
            let (x, q0) = (xs + i * row_bytes, m.qzero_f32());
            let key = if scale > 0.0 && scale < f32::INFINITY {
                let inv = 1.0 / scale;
                let sum = match (reciprocal_is_safe(inv), norm == 2.0) {
                    (true, true) => scaled_loss::<true>(x, gs, |v| fma(v, inv, q0), maxq, norm),
                    (true, false) => scaled_loss::<false>(x, gs, |v| fma(v, inv, q0), maxq, norm),
                    // Scales beyond 2^±126 (absurd weights): the exact division keeps precision.
                    (false, _) => scaled_loss::<false>(x, gs, |v| v / scale + q0, maxq, norm),
                };
                // log2(scale / base). f32: exactly the Q8.8 difference. f16/bf16: a function of
                // the stored scale alone, so candidates that round to the same stored scale tie
                // exactly and the lower k wins, as on the CPU.
                let rel_log2_scale = if dtype == ScaleDtype::F32 {
                    (q88 as i32 - m.log2_scale_q88 as i32) as f32 * (1.0 / 256.0)
                } else {
                    log2_approx(scale) - m.log2_scale_q88 as f32 * (1.0 / 256.0)
                };
                log2_approx(sum) + norm * rel_log2_scale
            } else if scale == 0.0 {
                // An f16 scale below 2^-25 is stored as 0: every element dequantizes to 0, the
                // loss is Σ|x|^norm, here in units of the base scale (maxq 0 makes q = 0).
                let inv_base = 1.0 / m.scale();
                let sum = if norm == 2.0 {
                    scaled_loss::<true>(x, gs, |v| v * inv_base, 0.0, norm)
                } else {
                    scaled_loss::<false>(x, gs, |v| v * inv_base, 0.0, norm)
                };
                log2_approx(sum)
            } else {
                f32::INFINITY // an f16 overflow: (q − q0)·inf is no weight; never chosen
            };
            red_min_shared_u64(best + 8 * i, ((ordered_bits(key) as u64) << 32) | k as u64);
        }
        p += block_dim_x();
    }
    sync_threads();

    // 3. write the winners
    let i = thread_x();
    if i < gpb && first + (i as u64) < total {
        let m = QMetaPacked::from_u32(ld_shared_u32(base_meta + 4 * i));
        let k = (ld_shared_u64(best + 8 * i) & 0xffff_ffff) as u32;
        let q88 = encode_log2_q88(m.scale() * candidate(k));
        *qmeta.add((first + i as u64) as usize) = QMetaPacked { log2_scale_q88: q88, ..m }.to_u32();
    }
}

macro_rules! mse_search_entry {
    ($marker:ident, $name:ident, $t:ty) => {
        forge_kernel_abi::mse_search_kernel! {
            /// MSE search kernel for one weight dtype; see the module docs.
            $marker => fn $name(args) {
                let MseSearchArgs {
                    w, rows, cols, gs, n_groups, bits, symmetric, n_cand, norm, scale_dtype, gpb, qmeta, first_bad,
                } = args;
                mse_search_impl::<$t>(
                    w.ptr() as *const $t, rows, cols, gs, n_groups, bits, symmetric, n_cand, norm, scale_dtype, gpb,
                    qmeta.ptr(), first_bad.ptr(),
                )
            }
        }
    };
}

mse_search_entry!(MseSearchF32, mse_search_f32, f32);
mse_search_entry!(MseSearchF16, mse_search_f16, F16Bits);
mse_search_entry!(MseSearchBf16, mse_search_bf16, Bf16Bits);
mse_search_entry!(MseSearchFp8, mse_search_fp8, Fp8E4M3);
