//! `rope_rows`: rotary position embedding of q or k heads in place, the CPU reference's
//! `Rope::apply` with the same f32 operations (no FMA contraction: bit-identical).
//!
//! Thread mapping: one thread per `(token, head, pair)`, flat index
//! `(t·heads + h)·half + i`, grid-stride; a thread reads and writes its own pair only.
//!
//! # Safety (upheld by the host launcher)
//! As documented on `forge_kernel_abi::calib::RopeArgs`.

use crate::device::{block_dim_x, global_x, grid_dim_x};
use forge_kernel_abi::calib::RopeArgs;

forge_kernel_abi::rope_kernel! {
    /// See the module docs.
    RopeRows => fn rope_rows(a) {
        let half = a.half.max(1) as usize;
        let heads = a.heads.max(1) as usize;
        let total = a.rows as usize * heads * half;
        let step = (block_dim_x() * grid_dim_x()) as usize;
        let mut e = global_x() as usize;
        while e < total {
            let (th, i) = (e / half, e % half);
            let (t, h) = (th / heads, th % heads);
            let head = a.y.ptr().add(t * a.stride as usize + h * a.head_dim as usize);
            let (c, s) = (*a.cos.ptr().add(t * half + i), *a.sin.ptr().add(t * half + i));
            let (x1, x2) = (head.add(i), head.add(half + i));
            let (p, q) = (*x1, *x2);
            *x1 = p * c - q * s;
            *x2 = q * c + p * s;
            e += step;
        }
    }
}
