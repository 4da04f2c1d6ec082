//! `swiglu`: `silu(gate) · up` of the fused gate/up projection's output, stored as the down
//! projection's input.
//!
//! Thread mapping: one thread per output element `r·inter + c`, grid-stride (coalesced reads
//! of both halves of a row).
//!
//! # Safety (upheld by the host launcher)
//! As documented on `forge_kernel_abi::calib::SwigluArgs`.

use super::store_act;
use crate::device::{block_dim_x, exp_f32, global_x, grid_dim_x};
use forge_kernel_abi::calib::SwigluArgs;

forge_kernel_abi::swiglu_kernel! {
    /// See the module docs.
    Swiglu => fn swiglu(a) {
        let inter = a.inter.max(1) as usize;
        let total = a.rows as usize * inter;
        let step = (block_dim_x() * grid_dim_x()) as usize;
        let mut e = global_x() as usize;
        while e < total {
            let (r, c) = (e / inter, e % inter);
            let row = a.gu.ptr().add(r * 2 * inter);
            let (g, u) = (*row.add(c), *row.add(inter + c));
            let silu = g / (1.0 + exp_f32(-g));
            store_act(a.out.ptr(), a.act_dtype, e, silu * u);
            e += step;
        }
    }
}
