//! `rms_norm_rows`: RMSNorm of rows (the layer norms, and Qwen3's per-head q/k norm).
//!
//! Thread mapping: one warp per row, rows grid-stride over `gridDim.x · 8` warps; lane `l`
//! takes columns `l, l + 32, …` (coalesced). The sum of squares is accumulated per lane in
//! f64 and added across the warp by a butterfly, then every lane scales its columns.
//! In place (`out_f32 == x`) is safe: each lane reads a column before it writes it.
//!
//! # Safety (upheld by the host launcher)
//! As documented on `forge_kernel_abi::calib::RmsNormArgs`.

use super::store_act;
use crate::device::{block_dim_x, block_x, grid_dim_x, lane, thread_x, warp_sum_f64, WARP};
use forge_kernel_abi::calib::RmsNormArgs;

forge_kernel_abi::rms_norm_kernel! {
    /// See the module docs.
    RmsNormRows => fn rms_norm_rows(a) {
        let warps = block_dim_x() / WARP;
        let mut r = block_x() * warps + thread_x() / WARP;
        let (n, heads) = (a.n, a.heads.max(1));
        let l = lane();
        while r < a.rows {
            let (t, h) = (r / heads, r % heads);
            let base = t as usize * a.stride as usize + h as usize * n as usize;
            let x = a.x.ptr().add(base);
            let mut ss = 0f64;
            let mut c = l;
            while c < n {
                let v = *x.add(c as usize) as f64;
                ss += v * v;
                c += WARP;
            }
            let ss = warp_sum_f64(ss);
            let mean = (ss / n as f64) as f32;
            let inv = (1.0 / core::f64::math::sqrt((mean + a.eps) as f64)) as f32;
            let out_f32 = a.out_f32.ptr();
            let out_act = a.out_act.ptr();
            let mut c = l;
            while c < n {
                let v = *a.weight.ptr().add(c as usize) * (*x.add(c as usize) * inv);
                if !out_f32.is_null() {
                    *out_f32.add(base + c as usize) = v;
                }
                if !out_act.is_null() {
                    store_act(out_act, a.act_dtype, r as usize * n as usize + c as usize, v);
                }
                c += WARP;
            }
            r += grid_dim_x() * warps;
        }
    }
}
