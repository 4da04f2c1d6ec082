//! `range_meta_*`: absmax qmeta4 of every (row, group) of a weight (docs/design.md §3).
//!
//! Thread mapping: a warp owns a tile of 32 consecutive groups (grid-stride over tiles) and
//! finishes with lane `l` holding group `l`'s min/max, so all 32 lanes encode and write at
//! once (one coalesced 128-byte store; the f64 encode is not serialised on one lane).
//! A group is read by `lpg` lanes (lanes per group: the largest power of two ≤ min(32, gs/4)),
//! each taking chunks of 4 consecutive elements (`c = sub_lane, sub_lane+lpg, …`) with one
//! 16-byte (f32), 8-byte (f16/bf16) or 4-byte (fp8) load, so a step reads `32/lpg` groups and a
//! tile takes `lpg` steps, four at a time to keep loads in flight. Min/max reduce by
//! butterfly shuffles inside each lane subgroup. A chunk that crosses `cols` (the
//! zero-padded last group) or a row that is not 4-element aligned (`cols % 4 != 0`) is read
//! element by element.
//!
//! # Safety (upheld by the host launcher)
//! `w` holds `rows·cols` elements row-major, 16-byte aligned; `qmeta` has room for
//! `rows·n_groups` u32; `first_bad` points to one zeroed u64 (receives `!index` of the first
//! NaN/inf element); `n_groups = ceil(cols/gs)`, `gs` a multiple of 32 in 32..=1024.

use crate::device::{
    block_dim_x, block_x, grid_dim_x, lane, note_if_non_finite, shfl_idx_f32, shfl_xor_f32, thread_x, Elem, WARP,
};
use forge_kernel_abi::elem::{Bf16Bits, F16Bits, Fp8E4M3};
use forge_kernel_abi::grid::RangeMetaArgs;
use forge_numerics::{range_meta, QMetaPacked};

/// Chunk `c` (elements `4c..4c+4`) of group `gid`, widened; the zero pad past `cols`.
/// Returns the flat index of its first element too.
#[inline(always)]
unsafe fn load_chunk<T: Elem>(w: *const T, gid: u64, c: u32, cols: u32, gs: u32, n_groups: u32) -> ([f32; 4], usize) {
    let n_groups = n_groups.max(1); // no division-by-zero panic path
    let r = (gid / n_groups as u64) as u32;
    let g = (gid % n_groups as u64) as u32;
    let col = g * gs + 4 * c;
    let i = r as usize * cols as usize + col as usize;
    let v = if cols.is_multiple_of(4) && col + 4 <= cols {
        T::load4_f32(w, i)
    } else {
        let mut v = [0f32; 4];
        let mut j = 0;
        while j < 4 {
            if col + j < cols {
                v[j as usize] = T::load_f32(w, i + j as usize);
            }
            j += 1;
        }
        v
    };
    (v, i)
}

/// Folds a chunk into (min, max, all finite so far).
#[inline(always)]
fn fold(acc: (f32, f32, bool), v: [f32; 4]) -> (f32, f32, bool) {
    let finite = v[0].abs() <= f32::MAX && v[1].abs() <= f32::MAX && v[2].abs() <= f32::MAX && v[3].abs() <= f32::MAX;
    (acc.0.min(v[0]).min(v[1]).min(v[2].min(v[3])), acc.1.max(v[0]).max(v[1]).max(v[2].max(v[3])), acc.2 & finite)
}

/// Rare path: reports this lane's first non-finite element of group `gid`.
#[inline(never)]
unsafe fn report_non_finite<T: Elem>(
    w: *const T,
    gid: u64,
    cols: u32,
    gs: u32,
    n_groups: u32,
    lpg: u32,
    sub_lane: u32,
    first_bad: *mut u64,
) {
    let mut c = sub_lane;
    while c < gs / 4 {
        let (v, i) = load_chunk(w, gid, c, cols, gs, n_groups);
        let mut j = 0;
        while j < 4 {
            note_if_non_finite(v[j], (i + j) as u64, first_bad);
            j += 1;
        }
        c += lpg;
    }
}

/// Butterfly min/max inside aligned subgroups of `lpg` lanes (every lane takes part).
#[inline(always)]
fn subgroup_min_max(mut lo: f32, mut hi: f32, lpg: u32) -> (f32, f32) {
    let mut m = lpg / 2;
    while m > 0 {
        lo = lo.min(shfl_xor_f32(lo, m));
        hi = hi.max(shfl_xor_f32(hi, m));
        m /= 2;
    }
    (lo, hi)
}

#[inline(always)]
unsafe fn range_meta_impl<T: Elem>(
    w: *const T,
    rows: u32,
    cols: u32,
    gs: u32,
    n_groups: u32,
    bits: u32,
    symmetric: u32,
    qmeta: *mut u32,
    first_bad: *mut u64,
) {
    const UNROLL: u32 = 4;
    // `max(1)` lets the compiler drop the division-by-zero panic paths (the host never passes 0).
    let n_groups = n_groups.max(1);
    let lpg = 1u32 << (31 - (gs / 4).clamp(UNROLL, WARP).leading_zeros()); // 8, 16 or 32
    let gps = WARP / lpg; // groups per step
    let (sub, sub_lane) = (lane() / lpg, lane() % lpg);
    let total = rows as u64 * n_groups as u64;
    let maxq = forge_numerics::maxq(bits);
    let warps = block_dim_x() / WARP;
    let mut tile = block_x() as u64 * warps as u64 + (thread_x() / WARP) as u64;
    let stride = grid_dim_x() as u64 * warps as u64;
    while tile * (WARP as u64) < total {
        let base = tile * WARP as u64;
        let (mut my_lo, mut my_hi) = (f32::INFINITY, f32::NEG_INFINITY);
        let mut s = 0;
        while s < lpg {
            // Four groups at a time, each chunk's four loads issued before any is used. A group
            // past the end reads the last group instead (its result is never written).
            let gid = |u: u32| (base + ((s + u) * gps + sub) as u64).min(total - 1);
            let (g0, g1, g2, g3) = (gid(0), gid(1), gid(2), gid(3));
            let empty = (f32::INFINITY, f32::NEG_INFINITY, true);
            let (mut p0, mut p1, mut p2, mut p3) = (empty, empty, empty, empty);
            let mut c = sub_lane;
            while c < gs / 4 {
                let v0 = load_chunk(w, g0, c, cols, gs, n_groups).0;
                let v1 = load_chunk(w, g1, c, cols, gs, n_groups).0;
                let v2 = load_chunk(w, g2, c, cols, gs, n_groups).0;
                let v3 = load_chunk(w, g3, c, cols, gs, n_groups).0;
                p0 = fold(p0, v0);
                p1 = fold(p1, v1);
                p2 = fold(p2, v2);
                p3 = fold(p3, v3);
                c += lpg;
            }
            if !(p0.2 & p1.2 & p2.2 & p3.2) {
                report_non_finite(w, g0, cols, gs, n_groups, lpg, sub_lane, first_bad);
                report_non_finite(w, g1, cols, gs, n_groups, lpg, sub_lane, first_bad);
                report_non_finite(w, g2, cols, gs, n_groups, lpg, sub_lane, first_bad);
                report_non_finite(w, g3, cols, gs, n_groups, lpg, sub_lane, first_bad);
            }
            let mut keep = |u: u32, (lo, hi, _): (f32, f32, bool)| {
                let (lo, hi) = subgroup_min_max(lo, hi, lpg);
                // Lane l keeps group l: it sits in step l/gps, subgroup l%gps.
                let src = (lane() % gps) * lpg;
                let (lo, hi) = (shfl_idx_f32(lo, src), shfl_idx_f32(hi, src));
                if lane() / gps == s + u {
                    my_lo = lo;
                    my_hi = hi;
                }
            };
            keep(0, p0);
            keep(1, p1);
            keep(2, p2);
            keep(3, p3);
            s += UNROLL;
        }
        let gid = base + lane() as u64;
        if gid < total {
            let meta = range_meta(my_lo, my_hi, maxq, symmetric != 0);
            *qmeta.add(gid as usize) = QMetaPacked::encode(meta.scale, meta.qzero, symmetric != 0).to_u32();
        }
        tile += stride;
    }
}

macro_rules! range_meta_entry {
    ($marker:ident, $name:ident, $t:ty) => {
        forge_kernel_abi::range_meta_kernel! {
            /// Range-meta kernel for one weight dtype; see the module docs.
            $marker => fn $name(args) {
                let RangeMetaArgs { w, rows, cols, gs, n_groups, bits, symmetric, qmeta, first_bad } = args;
                range_meta_impl::<$t>(w.ptr() as *const $t, rows, cols, gs, n_groups, bits, symmetric, qmeta.ptr(), first_bad.ptr())
            }
        }
    };
}

range_meta_entry!(RangeMetaF32, range_meta_f32, f32);
range_meta_entry!(RangeMetaF16, range_meta_f16, F16Bits);
range_meta_entry!(RangeMetaBf16, range_meta_bf16, Bf16Bits);
range_meta_entry!(RangeMetaFp8, range_meta_fp8, Fp8E4M3);
