//! The runtime half of qmeta4 (issue 15): a W4A16 matmul `Y[M, N] = X[M, K] · dequant(W)[N, K]ᵀ`
//! that reads packed 4-bit codes and raw qmeta4 records and decodes them on the fly.
//!
//! * [`pack_for_kernel`] (CPU) reorders codes into the kernel's tiles and pads; the layout is
//!   in docs/formats.md ("W4A16 kernel layout") and `forge_kernel_abi::runtime`.
//! * [`w4a16_matmul_cpu`] is the reference: the kernel's exact weights
//!   ([`dequant_for_kernel`]) times `X`, summed in f64.
//! * `cuda.rs`: [`DevicePackedWeight`], [`w4a16_matmul`] (the skinny or tiled tensor-core
//!   kernel with split-K, or dequantization + cuBLAS for large `M`), [`w4a16_matmul_host`].
//! * `experts.rs`: the grouped (mixture-of-experts) launch, [`w4a16_grouped_matmul`] over
//!   [`DeviceExperts`] with an [`ExpertRouting`]; [`w4a16_grouped_matmul_cpu`] its reference.
//! * `topk.rs`: a mixture-of-experts step from the router's top-k ids on the device
//!   ([`TopkRouting`]: sorted rows, gather, combine); [`topk_route_cpu`] and
//!   [`topk_combine_cpu`] its reference.
//!
//! **The kernel's weight** (what "dequant" means here, bit for bit on CPU and GPU): with `T`
//! the activation type (bf16 or f16), `s_T = stored_scale(q88, T)` (the correctly rounded f32
//! `2^(q88/256)` rounded to nearest-even into `T`, as a checkpoint with `scale_dtype = T`
//! stores it), `w = round_T((q − z) · s_T)`. The product `(q − z)·s_T` is exact in f32
//! (`|q − z| ≤ 255` has at most 8 bits, `s_T` at most 11), so there is exactly one rounding after the
//! scale's own: the one any 16-bit GEMM input needs. Why the scale is rounded to `T` first:
//! the tensor cores take 16-bit operands, and packed 16-bit FMAs (`(q + M) − (z + M)` exact,
//! then `·s_T`) dequantize two weights per instruction, where an f32 product would need an
//! f32 → 16-bit conversion per pair, a 16/clk/SM instruction that alone cannot keep up with
//! HBM at batch 1. The extra error is the scale's rounding, `≤ 2^-9` relative in bf16, once
//! per group.

mod cpu;
mod cuda;
mod experts;
mod topk;

pub use cpu::{
    dequant_for_kernel, pack_for_kernel, round_to_act, unpack_for_kernel, w4a16_grouped_matmul_cpu, w4a16_matmul_cpu,
};
pub use cuda::{
    dequant_gpu, launch_dequant, w4a16_matmul, w4a16_matmul_host, w4a16_plan, DevicePackedWeight, FusedKernel,
    MatmulPath, W4a16Options, W4a16Plan, W4a16Workspace,
};
pub use experts::{
    expert_offsets, max_tasks, plan_rows_cap, w4a16_grouped_matmul, w4a16_grouped_plan, DeviceExperts, ExpertRouting,
    ExpertTasks, MAX_DEVICE_ROUTING_EXPERTS,
};
pub use topk::{topk_combine_cpu, topk_route_cpu, TopkRoute, TopkRouting, MAX_TOPK_EXPERTS};

use crate::{ForgeError, Result};
pub use forge_kernel_abi::runtime::{PACK_K_ALIGN, PACK_N_ALIGN};

/// The 16-bit type of `X`, `Y` and the dequantized weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActDtype {
    /// bfloat16.
    Bf16,
    /// IEEE binary16.
    F16,
}

impl ActDtype {
    /// `x` rounded to nearest-even into this type, widened back exactly.
    pub fn round(self, x: f32) -> f32 {
        match self {
            ActDtype::Bf16 => forge_numerics::bf16_bits_to_f32(forge_numerics::f32_to_bf16_bits(x)),
            ActDtype::F16 => forge_numerics::f16_bits_to_f32(forge_numerics::f32_to_f16_bits(x)),
        }
    }

    /// The bits of `x` rounded to nearest-even into this type.
    pub fn bits(self, x: f32) -> u16 {
        match self {
            ActDtype::Bf16 => forge_numerics::f32_to_bf16_bits(x),
            ActDtype::F16 => forge_numerics::f32_to_f16_bits(x),
        }
    }

    /// The value of 16-bit pattern `b`.
    pub fn value(self, b: u16) -> f32 {
        match self {
            ActDtype::Bf16 => forge_numerics::bf16_bits_to_f32(b),
            ActDtype::F16 => forge_numerics::f16_bits_to_f32(b),
        }
    }

    /// Unit roundoff `2^-p` (half an ulp at 1): bf16 `2^-8`, f16 `2^-11`.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            ActDtype::Bf16 => 2f64.powi(-8),
            ActDtype::F16 => 2f64.powi(-11),
        }
    }

    /// The scale as the kernel uses it (`stored_scale(q88, T)`), as f32.
    pub fn scale(self, q88: i16) -> f32 {
        match self {
            ActDtype::Bf16 => forge_numerics::bf16_bits_to_f32(forge_numerics::stored_scale_bits_bf16(q88)),
            ActDtype::F16 => forge_numerics::f16_bits_to_f32(forge_numerics::stored_scale_bits_f16(q88)),
        }
    }
}

/// The dimensions of a packed weight (one expert's, in a grouped launch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedDims {
    /// Output features (rows of `W`).
    pub n: usize,
    /// Input features (columns of `W`).
    pub k: usize,
    /// `n` padded to [`PACK_N_ALIGN`].
    pub n_pad: usize,
    /// `k` padded to [`PACK_K_ALIGN`].
    pub k_pad: usize,
    /// Group size (a multiple of 32).
    pub group_size: usize,
    /// Groups of the packed records, `⌈k_pad / group_size⌉`.
    pub g_pad: usize,
    /// Bits per packed code: 4 (grids of 2–4 bits) or 8 (5–8 bits; the `w8a16` kernels).
    pub bits: u32,
}

impl PackedDims {
    /// u32 words of one packed `16 × 64` tile of these codes.
    pub(crate) fn tile_words(&self) -> Result<usize> {
        match self.bits {
            4 | 8 => Ok(cpu::tile_words(self.bits)),
            b => Err(ForgeError::Shape(format!("packed codes of {b} bits (4 or 8 expected)"))),
        }
    }

    /// u32 words of the packed codes: `(n_pad/64)·(k_pad/16)` tiles.
    pub(crate) fn code_words(&self) -> Result<usize> {
        Ok((self.n_pad / 64) * (self.k_pad / 16) * self.tile_words()?)
    }
}

/// A weight packed for the W4A16 kernel (see docs/formats.md, "W4A16 kernel layout").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedWeight {
    /// Its dimensions.
    pub dims: PackedDims,
    /// `16 × 64` code tiles, 128 words each (256 at 8 bits), tile `(nt, kt)` at
    /// `(nt·k_pad/16 + kt)·128` (`·256`).
    pub codes: Vec<u32>,
    /// Raw qmeta4 records `[g_pad][n_pad]` (little-endian u32).
    pub records: Vec<u32>,
    /// Whether every dequantized weight is finite in bf16 / in f16 (checked when packing;
    /// a launch in a type where it is not is refused).
    pub finite_bf16: bool,
    /// See `finite_bf16`.
    pub finite_f16: bool,
}

/// Refuses activations `dtype` for a weight (`who`: "the packed weight has", "an expert
/// has") whose dequantized values are not all finite in it (`finite_*`, from packing).
pub(crate) fn check_finite(finite_bf16: bool, finite_f16: bool, dtype: ActDtype, who: &str) -> Result<()> {
    let finite = match dtype {
        ActDtype::Bf16 => finite_bf16,
        ActDtype::F16 => finite_f16,
    };
    if finite {
        return Ok(());
    }
    Err(ForgeError::Config(format!("{who} scales whose dequantized values overflow {dtype:?}; run it in bf16")))
}

impl PackedWeight {
    /// Bytes the kernel streams per pass over the weight (codes + records).
    pub fn bytes(&self) -> usize {
        (self.codes.len() + self.records.len()) * 4
    }

    /// Checks the launch constraints that do not depend on `X`'s rows, for activations `dtype`.
    pub fn check_for(&self, dtype: ActDtype) -> Result<()> {
        check_dims(self.dims.n, self.dims.k, self.dims.group_size)?;
        check_finite(self.finite_bf16, self.finite_f16, dtype, "the packed weight has")
    }
}

/// The shape rules of the kernel: `n ≥ 1`; `k ≥ 8` and a multiple of 8 (rows of `X` are
/// copied in 16-byte chunks); group size a multiple of 32, at least 32. `M` is free; `n` and
/// `k` tails are padded by the packer.
pub fn check_dims(n: usize, k: usize, group_size: usize) -> Result<()> {
    if n == 0 || k == 0 {
        return Err(ForgeError::Shape(format!("W4A16 weight {n}×{k} is empty")));
    }
    if !k.is_multiple_of(8) {
        return Err(ForgeError::Shape(format!(
            "W4A16 kernel: in_features K = {k} must be a multiple of 8 (rows of X are read in 16-byte chunks)"
        )));
    }
    if group_size < 32 || !group_size.is_multiple_of(32) {
        return Err(ForgeError::GroupSize(group_size));
    }
    if n.max(k) > (i32::MAX as usize) - PACK_N_ALIGN as usize {
        return Err(ForgeError::Shape(format!("W4A16 weight {n}×{k} is too large for 32-bit indexing")));
    }
    Ok(())
}
