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

/// See the module docs.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn qmeta_decode(qmeta: *const u32, n: u32, scale: *mut f32, qzero: *mut f32) {
    let stride = block_dim_x() * grid_dim_x();
    let mut i = global_x();
    while i < n {
        let m = QMetaPacked::from_u32(*qmeta.add(i as usize));
        *scale.add(i as usize) = m.scale();
        *qzero.add(i as usize) = m.qzero_f32();
        i += stride;
    }
}
