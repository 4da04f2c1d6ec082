//! `qmeta_decode`: decode a whole qmeta4 tensor into f32 scales and zero points.
//!
//! The smallest kernel that exercises the whole pipeline (Rust → PTX → cudarc launch) on the
//! shared numerics: its output must equal the CPU decode bit for bit.
//!
//! Thread mapping: one thread per qmeta record, grid-stride loop over `n` records.
//!
//! # Safety (upheld by the host launcher)
//! `qmeta` points to `n` u32 records; `scale` and `qzero` each to `n` writable f32.

use crate::device::{block_dim_x, global_x, grid_dim_x};
use forge_numerics::QMetaPacked;

forge_kernel_abi::qmeta_decode_kernel! {
    /// See the module docs.
    QmetaDecode => fn qmeta_decode(args) {
        let stride = block_dim_x() * grid_dim_x();
        let mut i = global_x();
        while i < args.n {
            let m = QMetaPacked::from_u32(*args.qmeta.ptr().add(i as usize));
            *args.scale.ptr().add(i as usize) = m.scale();
            *args.qzero.ptr().add(i as usize) = m.qzero_f32();
            i += stride;
        }
    }
}
