//! `range_meta_*`: absmax qmeta4 of every (row, group) of a weight (DESIGN §3).
//!
//! Thread mapping: one warp per group; lane `l` reads columns `l, l+32, …` of the group
//! (coalesced 32-wide loads), min/max by butterfly shuffles, lane 0 encodes and writes the
//! record. Blocks of any multiple of 32 threads; groups are `blockIdx.x·warps + warp`, and a
//! grid-stride loop covers any grid size. Columns past `cols` read as the zero pad.
//!
//! # Safety (upheld by the host launcher)
//! `w` holds `rows·cols` elements row-major; `qmeta` has room for `rows·n_groups` u32;
//! `first_bad` points to one zeroed u64 (receives `!index` of the first NaN/inf element); `n_groups = ceil(cols/gs)`, `gs` a multiple of 32.

use crate::device::{
    block_dim_x, block_x, grid_dim_x, lane, note_if_non_finite, thread_x, warp_min_max, Bf16Bits, Elem,
    F16Bits, Fp8E4M3, WARP,
};
use forge_numerics::{range_meta, QMetaPacked};

/// Min and max of group `g` of row `r` (pad included), every lane gets them.
///
/// # Safety
/// As the module's contract.
#[inline(always)]
pub unsafe fn group_min_max<T: Elem>(
    w: *const T,
    r: u32,
    g: u32,
    cols: u32,
    gs: u32,
    first_bad: *mut u64,
) -> (f32, f32) {
    let row = r as usize * cols as usize;
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    let mut e = lane();
    while e < gs {
        let c = g * gs + e;
        let v = if c < cols { T::load_f32(w, row + c as usize) } else { 0.0 };
        note_if_non_finite(v, (row + c as usize) as u64, first_bad);
        lo = lo.min(v);
        hi = hi.max(v);
        e += WARP;
    }
    warp_min_max(lo, hi)
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
    let warps = block_dim_x() / WARP;
    // `max(1)` lets the compiler drop the division-by-zero panic path (the host never passes 0).
    let n_groups = n_groups.max(1);
    let total = rows as u64 * n_groups as u64;
    let maxq = forge_numerics::maxq(bits);
    let mut gid = block_x() as u64 * warps as u64 + (thread_x() / WARP) as u64;
    let stride = grid_dim_x() as u64 * warps as u64;
    while gid < total {
        let r = (gid / n_groups as u64) as u32;
        let g = (gid % n_groups as u64) as u32;
        let (lo, hi) = group_min_max(w, r, g, cols, gs, first_bad);
        if lane() == 0 {
            let m = range_meta(lo, hi, maxq, symmetric != 0);
            *qmeta.add(gid as usize) = QMetaPacked::encode(m.scale, m.qzero, symmetric != 0).to_u32();
        }
        gid += stride;
    }
}

macro_rules! range_meta_entry {
    ($name:ident, $t:ty) => {
        /// Range-meta kernel for one weight dtype; see the module docs.
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(
            w: *const $t,
            rows: u32,
            cols: u32,
            gs: u32,
            n_groups: u32,
            bits: u32,
            symmetric: u32,
            qmeta: *mut u32,
            first_bad: *mut u64,
        ) {
            range_meta_impl::<$t>(w, rows, cols, gs, n_groups, bits, symmetric, qmeta, first_bad)
        }
    };
}

range_meta_entry!(range_meta_f32, f32);
range_meta_entry!(range_meta_f16, F16Bits);
range_meta_entry!(range_meta_bf16, Bf16Bits);
range_meta_entry!(range_meta_fp8, Fp8E4M3);
