//! `gptq_permute_weight`: the solver's working weights `Wwork[r, t] = W[r, perm[t]]`, zero
//! past the real rows and columns, so later kernels read panels contiguously.
//!
//! Thread mapping: one thread per working element, grid-stride over `rows_p·cols_p`.
//!
//! # Safety (upheld by the host launcher)
//! `w` is `rows·cols` f32; `perm` has `cols_p` entries, a permutation of `0..cols` first;
//! `w_work` holds `rows_p·cols_p` f32.

use crate::device::{block_dim_x, global_x, grid_dim_x};

/// See the module docs.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn gptq_permute_weight(
    w: *const f32,
    perm: *const u32,
    rows: u32,
    cols: u32,
    rows_p: u32,
    cols_p: u32,
    w_work: *mut f32,
) {
    let total = rows_p as u64 * cols_p as u64;
    let cols_p = cols_p.max(1); // no division-by-zero panic path
    let stride = (block_dim_x() * grid_dim_x()) as u64;
    let mut i = global_x() as u64;
    while i < total {
        let (r, t) = ((i / cols_p as u64) as u32, (i % cols_p as u64) as u32);
        *w_work.add(i as usize) = if r < rows && t < cols {
            *w.add((r as u64 * cols as u64 + *perm.add(t as usize) as u64) as usize)
        } else {
            0.0
        };
        i += stride;
    }
}
