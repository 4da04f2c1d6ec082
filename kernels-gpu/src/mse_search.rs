//! `mse_search_*`: absmax meta, then the MSE / Lᵖ shrink search, fused (DESIGN §3).
//!
//! Each block owns `gpb` consecutive groups (groups per block, chosen by the host so they fit
//! in shared memory). Thread mapping:
//! 1. load: warp `w` takes groups `w, w+warps, …`: reads them into shared memory (row stride
//!    `gs+1` floats, so lanes working on different groups hit different banks), computes the
//!    absmax meta as `range_meta_*` does;
//! 2. search: the block's `gpb·n_cand` (group, candidate) pairs are dealt round-robin to its
//!    threads; a thread decodes the candidate scale `decode(encode(base·p_k))`, sums the loss
//!    over the group's shared-memory copy (every lane of a warp reads mostly the same address:
//!    a broadcast), and folds `(loss bits << 32) | k` into the group's best with a shared
//!    atomic min, so equal losses keep the lower `k`;
//! 3. write: thread `i < gpb` encodes the winner into the group's qmeta4 record.
//!
//! Candidates live in constant memory (`MSE_CANDIDATES`, ≤ 1024 f32), written by the host.
//! Dynamic shared memory: `gpb·(gs+1)·4 + gpb·16` bytes.
//!
//! # Safety (upheld by the host launcher)
//! As `range_meta_*`, plus `1 ≤ n_cand ≤ 1024` candidates written to `MSE_CANDIDATES`, and
//! the launch's dynamic shared memory at least the size above.

use crate::device::{
    atomic_min_u64_shared, block_dim_x, block_x, dynamic_shared_base, lane, sync_threads, thread_x, Bf16Bits,
    Elem, F16Bits, Fp8E4M3, WARP,
};
use crate::range_meta::group_min_max;
use forge_numerics::quant::reciprocal_is_safe;
use forge_numerics::{
    decode_log2_q88, dequantize, element_loss, encode_log2_q88, quantize_with_reciprocal, range_meta, QMetaPacked,
};

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

/// Σ loss of one candidate over a group's shared copy; `NORM2` selects the square fast path.
#[inline(always)]
unsafe fn group_loss<const NORM2: bool>(xs: *const f32, gs: u32, scale: f32, inv: f32, q0: f32, maxq: f32, norm: f32) -> f32 {
    // Four partial sums: shorter dependency chains, and a smaller rounding bound.
    let mut acc = [0f32; 4];
    let mut e = 0;
    while e < gs {
        let mut j = 0;
        while j < 4 {
            let x = *xs.add((e + j) as usize);
            let y = dequantize(quantize_with_reciprocal(x, scale, inv, q0, maxq), scale, q0);
            let d = y - x;
            acc[j as usize] += if NORM2 { d * d } else { element_loss(d, norm) };
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
    gpb: u32,
    qmeta: *mut u32,
    first_bad: *mut u64,
) {
    // `max(1)` lets the compiler drop the division-by-zero panic path (the host never passes 0).
    let n_groups = n_groups.max(1);
    let total = rows as u64 * n_groups as u64;
    let first = block_x() as u64 * gpb as u64;
    let maxq = forge_numerics::maxq(bits);
    let sym = symmetric != 0;
    let stride = (gs + 1) as usize;
    let base = dynamic_shared_base();
    let xs = base as *mut f32;
    let base_meta = xs.add(gpb as usize * stride) as *mut u32;
    let best = ((base_meta.add(gpb as usize) as usize + 7) & !7) as *mut u64;

    // 1. load + absmax meta
    let warps = block_dim_x() / WARP;
    let mut i = thread_x() / WARP;
    while i < gpb {
        let gid = first + i as u64;
        if gid < total {
            let r = (gid / n_groups as u64) as u32;
            let g = (gid % n_groups as u64) as u32;
            let (lo, hi) = group_min_max(w, r, g, cols, gs, first_bad);
            let row = r as usize * cols as usize;
            let mut e = lane();
            while e < gs {
                let c = g * gs + e;
                let v = if c < cols { T::load_f32(w, row + c as usize) } else { 0.0 };
                *xs.add(i as usize * stride + e as usize) = v;
                e += WARP;
            }
            if lane() == 0 {
                let m = range_meta(lo, hi, maxq, sym);
                *base_meta.add(i as usize) = QMetaPacked::encode(m.scale, m.qzero, sym).to_u32();
                *best.add(i as usize) = u64::MAX;
            }
        }
        i += warps;
    }
    sync_threads();

    // 2. search every (group, candidate) pair
    let n_cand = n_cand.max(1);
    let pairs = gpb * n_cand;
    let mut p = thread_x();
    while p < pairs {
        let i = p / n_cand;
        let k = p - i * n_cand;
        if first + (i as u64) < total {
            let m = QMetaPacked::from_u32(*base_meta.add(i as usize));
            let scale = decode_log2_q88(encode_log2_q88(m.scale() * candidate(k)));
            let inv = 1.0 / scale;
            // A NaN reciprocal sends every element down quantize's exact-division path.
            let inv = if reciprocal_is_safe(inv) { inv } else { f32::NAN };
            let x = xs.add(i as usize * stride);
            let loss = if norm == 2.0 {
                group_loss::<true>(x, gs, scale, inv, m.qzero_f32(), maxq, norm)
            } else {
                group_loss::<false>(x, gs, scale, inv, m.qzero_f32(), maxq, norm)
            };
            // Losses are ≥ 0, so their bit patterns order like the values.
            atomic_min_u64_shared(best.add(i as usize), ((loss.to_bits() as u64) << 32) | k as u64);
        }
        p += block_dim_x();
    }
    sync_threads();

    // 3. write the winners
    let i = thread_x();
    if i < gpb && first + (i as u64) < total {
        let m = QMetaPacked::from_u32(*base_meta.add(i as usize));
        let k = (*best.add(i as usize) & 0xffff_ffff) as u32;
        let q88 = encode_log2_q88(m.scale() * candidate(k));
        *qmeta.add((first + i as u64) as usize) = QMetaPacked { log2_scale_q88: q88, ..m }.to_u32();
    }
}

macro_rules! mse_search_entry {
    ($name:ident, $t:ty) => {
        /// MSE search kernel for one weight dtype; see the module docs.
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(
            w: *const $t,
            rows: u32,
            cols: u32,
            gs: u32,
            n_groups: u32,
            bits: u32,
            symmetric: u32,
            n_cand: u32,
            norm: f32,
            gpb: u32,
            qmeta: *mut u32,
            first_bad: *mut u64,
        ) {
            mse_search_impl::<$t>(w, rows, cols, gs, n_groups, bits, symmetric, n_cand, norm, gpb, qmeta, first_bad)
        }
    };
}

mse_search_entry!(mse_search_f32, f32);
mse_search_entry!(mse_search_f16, F16Bits);
mse_search_entry!(mse_search_bf16, Bf16Bits);
mse_search_entry!(mse_search_fp8, Fp8E4M3);
