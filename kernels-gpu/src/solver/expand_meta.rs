//! `gptq_expand_meta`: the solver's per-solve lookup tables, so its blocks read a group's
//! scale and zero point with one load and no decode: `scale_zero[i] = (scale, qzero)` of
//! every qmeta4 record, and `group_of[t] = perm[t] / gs` for every permuted column
//! (0 past `cols`). `scale` is the record's scale as the checkpoint stores it,
//! `stored_scale(q88, scale_dtype)`: the one place every panel's scales come from, so the
//! solver quantizes against exactly what runtimes dequantize with (docs/design.md §4).
//!
//! Thread mapping: one thread per record and per column, grid-stride.
//!
//! # Safety (upheld by the host launcher)
//! `qmeta` has `n_records` records and `scale_zero` room for as many; `perm` and `group_of`
//! have `cols_p` entries; `gs > 0`.

use crate::device::{block_dim_x, global_x, grid_dim_x};
use forge_kernel_abi::solver::{ExpandMetaArgs, ScaleZero};
use forge_numerics::{stored_scale, QMetaPacked, ScaleDtype};

forge_kernel_abi::expand_meta_kernel! {
    /// See the module docs.
    GptqExpandMeta => fn gptq_expand_meta(args) {
        let ExpandMetaArgs { qmeta, n_records, scale_dtype, perm, cols, cols_p, gs, scale_zero, group_of } = args;
        let dtype = ScaleDtype::from_u32(scale_dtype);
        expand(qmeta.ptr(), n_records, dtype, perm.ptr(), cols, cols_p, gs, scale_zero.ptr(), group_of.ptr())
    }
}

#[inline(always)]
unsafe fn expand(
    qmeta: *const u32,
    n_records: u32,
    dtype: ScaleDtype,
    perm: *const u32,
    cols: u32,
    cols_p: u32,
    gs: u32,
    scale_zero: *mut ScaleZero,
    group_of: *mut u32,
) {
    let gs = gs.max(1); // no division-by-zero panic path
    let stride = block_dim_x() * grid_dim_x();
    let mut i = global_x();
    while i < n_records.max(cols_p) {
        if i < n_records {
            let m = QMetaPacked::from_u32(*qmeta.add(i as usize));
            let scale = stored_scale(m.log2_scale_q88, dtype);
            *scale_zero.add(i as usize) = ScaleZero { scale, zero: m.qzero as u32 };
        }
        if i < cols_p {
            *group_of.add(i as usize) = if i < cols { *perm.add(i as usize) / gs } else { 0 };
        }
        i += stride;
    }
}
