//! `gather_rows`, `scatter_add_rows`: the MoE block's token routing. An expert's tokens are
//! gathered into a dense matrix for its GEMMs, and its outputs, scaled by the routing
//! weights, added back to their tokens' rows (experts one after another, in expert order:
//! the CPU reference's order of additions).
//!
//! Thread mapping: one thread per element of the gathered matrix (`k·width + c`),
//! grid-stride; a launch's destination rows are distinct, so no two threads add to one
//! element.
//!
//! # Safety (upheld by the host launcher)
//! As documented on `forge_kernel_abi::calib::{GatherArgs, ScatterAddArgs}`.

use crate::device::{block_dim_x, global_x, grid_dim_x};
use forge_kernel_abi::calib::{GatherArgs, ScatterAddArgs};

forge_kernel_abi::gather_rows_kernel! {
    /// See the module docs.
    GatherRows => fn gather_rows(a) {
        let w = a.words.max(1) as usize;
        let total = a.rows as usize * w;
        let step = (block_dim_x() * grid_dim_x()) as usize;
        let mut e = global_x() as usize;
        while e < total {
            let (k, c) = (e / w, e % w);
            let src = *a.idx.ptr().add(k) as usize;
            *a.out.ptr().add(e) = *a.src.ptr().add(src * w + c);
            e += step;
        }
    }
}

forge_kernel_abi::scatter_add_kernel! {
    /// See the module docs.
    ScatterAddRows => fn scatter_add_rows(a) {
        let n = a.n.max(1) as usize;
        let total = a.rows as usize * n;
        let step = (block_dim_x() * grid_dim_x()) as usize;
        let mut e = global_x() as usize;
        while e < total {
            let (k, c) = (e / n, e % n);
            let dst = *a.idx.ptr().add(k) as usize;
            *a.dst.ptr().add(dst * n + c) += *a.weight.ptr().add(k) * *a.y.ptr().add(e);
            e += step;
        }
    }
}
