//! Scalar numerics of 4Bit Forge, compiled by BOTH the host library (CPU reference) and the
//! GPU kernels (`nvptx64-nvidia-cuda`), so the two cannot drift apart (docs/design.md §2).
//!
//! Everything here is `#[inline]`: the kernels crate is emitted as PTX straight from its own
//! codegen unit (`--emit=asm`, no linker), so every function it uses must be instantiated
//! inside it.
#![no_std]
#![feature(core_float_math)]
#![cfg_attr(target_arch = "nvptx64", feature(asm_experimental_arch))]
#![deny(missing_docs)]

pub mod codes8;
pub mod dtype;
pub mod loss;
pub mod qmeta;
pub mod quant;
pub mod scale;

pub use dtype::{bf16_bits_to_f32, f16_bits_to_f32, fp8_block_dequant, fp8_e4m3_to_f32};
pub use loss::{abs_pow, element_loss};
pub use qmeta::{decode_log2_q88, encode_log2_q88, encode_qzero, log2_f32_rn, QMetaPacked};
pub use quant::{
    dequantize, linspace_f32, maxq, quantize, quantize_scaled, quantize_with_reciprocal, range_meta,
    reciprocal_is_safe, RangeMeta, MIN_SCALE,
};
pub use scale::{
    f32_to_bf16_bits, f32_to_f16_bits, round_to_dtype, stored_scale, stored_scale_bits_bf16,
    stored_scale_bits_bf16_with, stored_scale_bits_f16, stored_scale_bits_f16_with, ScaleDtype, STORED_FRAC_BF16,
    STORED_FRAC_F16,
};

/// Round half to even (torch's `round`, CUDA's `rintf`, PTX `cvt.rni`).
///
/// Rust's `f32::round` rounds half away from zero, which the spec does not use.
#[inline(always)]
pub fn round_ties_even(x: f32) -> f32 {
    core::f32::math::round_ties_even(x)
}
