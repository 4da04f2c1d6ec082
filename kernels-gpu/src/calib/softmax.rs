//! `causal_softmax`: the causal (optionally sliding-window) softmax of attention scores, in
//! place, masked keys set to 0 so the following `P·V` product can run over whole rows.
//!
//! Thread mapping: one warp per score row `(h, i)`, rows grid-stride over `gridDim.x · 8`
//! warps; lane `l` takes keys `l, l + 32, …`. Three passes over the row (max, sum of
//! exponentials, write), the reductions by butterfly, so every lane holds the same max and
//! sum.
//!
//! # Safety (upheld by the host launcher)
//! As documented on `forge_kernel_abi::calib::SoftmaxArgs`.

use crate::device::{block_dim_x, block_x, exp_f32, grid_dim_x, lane, thread_x, warp_max_f32, warp_sum_f32, WARP};
use forge_kernel_abi::calib::SoftmaxArgs;

forge_kernel_abi::softmax_kernel! {
    /// See the module docs.
    CausalSoftmax => fn causal_softmax(a) {
        let warps = block_dim_x() / WARP;
        let t = a.t.max(1);
        let rows = a.heads * t;
        let l = lane();
        let mut r = block_x() * warps + thread_x() / WARP;
        while r < rows {
            let i = r % t;
            let first = if a.window > 0 { (i + 1).saturating_sub(a.window) } else { 0 };
            let row = a.s.ptr().add(r as usize * t as usize);
            let mut m = f32::NEG_INFINITY;
            let mut j = first + l;
            while j <= i {
                m = m.max(*row.add(j as usize));
                j += WARP;
            }
            let m = warp_max_f32(m);
            let mut sum = 0f32;
            let mut j = first + l;
            while j <= i {
                sum += exp_f32(*row.add(j as usize) - m);
                j += WARP;
            }
            let inv = 1.0 / warp_sum_f32(sum);
            let mut j = l;
            while j < t {
                let p = if j >= first && j <= i { exp_f32(*row.add(j as usize) - m) * inv } else { 0.0 };
                *row.add(j as usize) = p;
                j += WARP;
            }
            r += grid_dim_x() * warps;
        }
    }
}
