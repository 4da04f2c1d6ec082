//! `fp8_block_dequant_{f32,bf16}`: a block-scaled FP8-E4M3 weight (DeepSeek-V3
//! `weight_scale_inv`, partial edge tiles) to f32 or bf16, element for element the CPU
//! reference `checkpoint::fp8::dequantize_fp8_blocks`: both call
//! `forge_numerics::fp8_block_dequant` (`f32(q) · scale`, one multiply), and bf16 is
//! `forge_numerics::f32_to_bf16_bits` (round to nearest-even).
//!
//! Thread mapping: a 2-D grid-stride loop. Block row `blockIdx.y` (stride `gridDim.y`) walks
//! the weight's rows; along a row, thread `blockIdx.x·blockDim.x + threadIdx.x` (stride
//! `blockDim.x·gridDim.x`) takes one column per step, so a warp loads 32 consecutive code
//! bytes and stores 32 consecutive outputs. A row's scales (one per `block_cols` columns) are
//! re-read per element from L1. Memory-bound: 1 byte in, 4 (or 2) out per element.
//!
//! # Safety (upheld by the host launcher)
//! As documented on `forge_kernel_abi::weights::Fp8BlockDequantArgs`.

use crate::device::{block_dim_x, block_y, global_x, grid_dim_x, grid_dim_y};
use forge_kernel_abi::weights::{Fp8BlockDequantArgs, BLOCK_SCALE_BF16, BLOCK_SCALE_F16};
use forge_numerics::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, fp8_block_dequant};

/// Scale `(br, bc)` widened to f32.
#[inline(always)]
unsafe fn scale_at(args: &Fp8BlockDequantArgs, br: u32, bc: u32) -> f32 {
    let k = br as usize * args.scale_cols as usize + bc as usize;
    match args.scale_dtype {
        BLOCK_SCALE_BF16 => bf16_bits_to_f32(*(args.scales.ptr() as *const u16).add(k)),
        BLOCK_SCALE_F16 => f16_bits_to_f32(*(args.scales.ptr() as *const u16).add(k)),
        _ => *(args.scales.ptr() as *const f32).add(k),
    }
}

/// The loop of both entries; `store(i, v)` writes element `i`.
#[inline(always)]
unsafe fn dequant(args: &Fp8BlockDequantArgs, store: impl Fn(usize, f32)) {
    let stride = block_dim_x() * grid_dim_x();
    // `max(1)` lets the compiler drop the division-by-zero panic paths (the host never passes 0).
    let (bm, bn) = (args.block_rows.max(1), args.block_cols.max(1));
    let mut r = block_y();
    while r < args.rows {
        let br = r / bm;
        let row = r as usize * args.cols as usize;
        let mut c = global_x();
        while c < args.cols {
            let i = row + c as usize;
            let v = fp8_block_dequant(*args.q.ptr().add(i), scale_at(args, br, c / bn));
            if v.is_nan() {
                crate::device::atomic_max_u64_global(args.first_nan.ptr(), !(i as u64));
            }
            store(i, v);
            c += stride;
        }
        r += grid_dim_y();
    }
}

forge_kernel_abi::fp8_block_dequant_kernel! {
    /// See the module docs: f32 output.
    Fp8BlockDequantF32 => fn fp8_block_dequant_f32(args) {
        let out = args.out.ptr() as *mut f32;
        dequant(&args, |i, v| *out.add(i) = v);
    }
}

forge_kernel_abi::fp8_block_dequant_kernel! {
    /// See the module docs: bf16 output (round to nearest-even).
    Fp8BlockDequantBf16 => fn fp8_block_dequant_bf16(args) {
        let out = args.out.ptr() as *mut u16;
        dequant(&args, |i, v| *out.add(i) = f32_to_bf16_bits(v));
    }
}
