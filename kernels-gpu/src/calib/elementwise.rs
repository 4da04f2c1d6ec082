//! `add_bias_rows`, `cast_f32`, `add_f32`: element-wise steps of the forward pass.
//!
//! Thread mapping: one thread per element, grid-stride.
//!
//! # Safety (upheld by the host launcher)
//! As documented on `forge_kernel_abi::calib::{BiasArgs, CastArgs, AddArgs}`.

use super::store_act;
use crate::device::{block_dim_x, global_x, grid_dim_x};
use forge_kernel_abi::calib::{AddArgs, BiasArgs, CastArgs};

#[inline(always)]
fn step() -> usize {
    (block_dim_x() * grid_dim_x()) as usize
}

forge_kernel_abi::bias_kernel! {
    /// See the module docs.
    AddBiasRows => fn add_bias_rows(a) {
        let n = a.n.max(1) as usize;
        let total = a.rows as usize * n;
        let mut e = global_x() as usize;
        while e < total {
            let (t, c) = (e / n, e % n);
            *a.y.ptr().add(t * a.stride as usize + c) += *a.bias.ptr().add(c);
            e += step();
        }
    }
}

forge_kernel_abi::cast_kernel! {
    /// See the module docs.
    CastF32 => fn cast_f32(a) {
        let mut e = global_x() as usize;
        while e < a.len as usize {
            store_act(a.out.ptr(), a.act_dtype, e, *a.x.ptr().add(e));
            e += step();
        }
    }
}

forge_kernel_abi::add_kernel! {
    /// See the module docs.
    AddF32 => fn add_f32(a) {
        let mut e = global_x() as usize;
        while e < a.len as usize {
            *a.dst.ptr().add(e) += *a.x.ptr().add(e);
            e += step();
        }
    }
}
