//! `range_meta_*`: absmax qmeta4 of every (row, group) of a weight (DESIGN §3).
//!
//! Thread mapping: a group is read by `lpg = min(32, gs/4)` lanes (lanes per group), each
//! taking chunks of 4 consecutive elements (`c = lane, lane+lpg, …`), so a warp reads
//! `32/lpg` whole groups per step with one 16-byte (f32), 8-byte (f16/bf16) or 4-byte (fp8)
//! load per lane and chunk. Min/max reduce by butterfly shuffles inside the lane subgroup;
//! the subgroup's first lane encodes and writes the record. A chunk that crosses `cols` (the
//! zero-padded last group) or a row that is not 4-element aligned (`cols % 4 != 0`) is read
//! element by element. Blocks of any multiple of 32 threads; a grid-stride loop covers any
//! grid size.
//!
//! # Safety (upheld by the host launcher)
//! `w` holds `rows·cols` elements row-major, 16-byte aligned; `qmeta` has room for
//! `rows·n_groups` u32; `first_bad` points to one zeroed u64 (receives `!index` of the first
//! NaN/inf element); `n_groups = ceil(cols/gs)`, `gs` a multiple of 32 in 32..=1024.

use crate::device::{
    block_dim_x, block_x, grid_dim_x, lane, note_if_non_finite, shfl_xor_f32, thread_x, Bf16Bits, Elem, F16Bits,
    Fp8E4M3, WARP,
};
use forge_numerics::{range_meta, QMetaPacked};

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
    // `max(1)` lets the compiler drop the division-by-zero panic paths (the host never passes 0).
    let n_groups = n_groups.max(1);
    let lpg = (gs / 4).clamp(1, WARP);
    let groups_per_warp = WARP / lpg;
    let sub = lane() / lpg; // which group of the warp's step
    let sub_lane = lane() % lpg;
    let aligned = cols % 4 == 0;
    let total = rows as u64 * n_groups as u64;
    let maxq = forge_numerics::maxq(bits);
    let warps = block_dim_x() / WARP;
    let mut step = block_x() as u64 * warps as u64 + (thread_x() / WARP) as u64;
    let stride = grid_dim_x() as u64 * warps as u64;
    while step * (groups_per_warp as u64) < total {
        let gid = step * groups_per_warp as u64 + sub as u64;
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        if gid < total {
            let r = (gid / n_groups as u64) as u32;
            let g = (gid % n_groups as u64) as u32;
            let row = r as usize * cols as usize;
            let mut c = sub_lane;
            while c < gs / 4 {
                let col = g * gs + 4 * c;
                let i = row + col as usize;
                let v = if aligned && col + 4 <= cols {
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
                let mut j = 0;
                while j < 4 {
                    note_if_non_finite(v[j], (i + j) as u64, first_bad);
                    lo = lo.min(v[j]);
                    hi = hi.max(v[j]);
                    j += 1;
                }
                c += lpg;
            }
        }
        // Butterfly inside the subgroup (all 32 lanes take part in every shuffle).
        let mut m = lpg / 2;
        while m > 0 {
            lo = lo.min(shfl_xor_f32(lo, m));
            hi = hi.max(shfl_xor_f32(hi, m));
            m /= 2;
        }
        if sub_lane == 0 && gid < total {
            let meta = range_meta(lo, hi, maxq, symmetric != 0);
            *qmeta.add(gid as usize) = QMetaPacked::encode(meta.scale, meta.qzero, symmetric != 0).to_u32();
        }
        step += stride;
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
