//! The calibration forward pass's row kernels (issue 14, docs/kernels.md §8). The matrix
//! products (Linears, attention scores and values) are cuBLAS calls; these kernels do what
//! lies between them, each the device twin of a step of the CPU reference
//! (`src/calib/model/layer.rs`).

pub mod elementwise;
pub mod moe_rows;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;

use forge_kernel_abi::calib::ACT_BF16;
use forge_numerics::f32_to_bf16_bits;

/// Stores `v` as element `i` of an activation buffer of `act_dtype`.
#[inline(always)]
pub(crate) unsafe fn store_act(out: *mut u8, act_dtype: u32, i: usize, v: f32) {
    if act_dtype == ACT_BF16 {
        *(out as *mut u16).add(i) = f32_to_bf16_bits(v);
    } else {
        *(out as *mut f32).add(i) = v;
    }
}
