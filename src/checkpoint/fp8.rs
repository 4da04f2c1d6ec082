//! FP8-E4M3 weights with 2-D block scales (DeepSeek-V3 / Kimi-K2 style): the CPU reference
//! dequantization, the one definition every other implementation is checked against.
//!
//! Convention (DeepSeek-V3 `inference/kernel.py::weight_dequant`, transformers'
//! `FP8Linear` / `Fp8Dequantize`, vLLM's block-quant loaders): a weight `q` of shape
//! `(M, N)` in `float8_e4m3fn` comes with `<name>.weight_scale_inv` of shape
//! `(ceil(M/bm), ceil(N/bn))` (`bm × bn` is `quantization_config.weight_block_size`,
//! `[128, 128]` in every released checkpoint), and
//!
//! ```text
//! w[i, j] = f32(q[i, j]) · scale_inv[i / bm, j / bn]        (one f32 multiply)
//! ```
//!
//! Edge tiles are partial (DeepSeek's `kv_a_proj_with_mqa` has 576 rows): the last tile
//! row/column covers whatever is left. Despite its name, `weight_scale_inv` is multiplied.

use super::st::TensorInfo;
use crate::numerics::{f32_to_bf16_bits, fp8_e4m3_to_f32};
use crate::weights::{BlockScaleDtype, Fp8Blocks};
use crate::{ForgeError, Result};
use ndarray::Array2;
use rayon::prelude::*;
use safetensors::Dtype;

/// The block size every released block-scaled FP8 checkpoint uses.
pub const DEFAULT_BLOCK: (usize, usize) = (128, 128);

/// The scale tensor of a block-scaled FP8 weight, as stored.
#[derive(Clone, Copy, Debug)]
pub struct BlockScales<'a> {
    /// Raw little-endian bytes, row-major.
    pub bytes: &'a [u8],
    /// F32, BF16 or F16.
    pub dtype: Dtype,
    /// `(ceil(M/bm), ceil(N/bn))`.
    pub shape: (usize, usize),
}

impl<'a> BlockScales<'a> {
    /// The scales as the engine reads them, for blocks of `block` (F32, BF16 or F16).
    pub fn blocks(&self, block: (usize, usize)) -> Result<Fp8Blocks<'a>> {
        let dtype = match self.dtype {
            Dtype::F32 => BlockScaleDtype::F32,
            Dtype::BF16 => BlockScaleDtype::BF16,
            Dtype::F16 => BlockScaleDtype::F16,
            other => return Err(ForgeError::Dtype(format!("{other} (block scales; expected F32, BF16 or F16)"))),
        };
        Ok(Fp8Blocks { scales: self.bytes, dtype, block })
    }
}

/// Checks that `scale` is the block-scale tensor of an `(rows, cols)` FP8 weight with
/// blocks `block` and returns the expected `(ceil(rows/bm), ceil(cols/bn))`.
pub fn check_scale_shape(weight: &TensorInfo, scale: &TensorInfo, block: (usize, usize)) -> Result<(usize, usize)> {
    let (rows, cols) = weight.dims2().ok_or_else(|| {
        ForgeError::Shape(format!("fp8 weight {} has shape {:?}, expected 2-D", weight.name, weight.shape))
    })?;
    if block.0 == 0 || block.1 == 0 {
        return Err(ForgeError::Config(format!("weight_block_size {block:?} must be positive")));
    }
    let want = (rows.div_ceil(block.0), cols.div_ceil(block.1));
    if scale.dims2() != Some(want) {
        return Err(ForgeError::Shape(format!(
            "{} has shape {:?}, expected [{}, {}] for the {rows}×{cols} weight {} with {}×{} blocks",
            scale.name, scale.shape, want.0, want.1, weight.name, block.0, block.1
        )));
    }
    if !matches!(scale.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        return Err(ForgeError::Dtype(format!(
            "{} (block scale {}; expected F32, BF16 or F16)",
            scale.dtype, scale.name
        )));
    }
    Ok(want)
}

/// Dequantizes a block-scaled FP8-E4M3 weight (`q`: `rows × cols` bytes, row-major) to f32
/// with the convention in the module docs. A NaN code or a non-finite scale is an error.
pub fn dequantize_fp8_blocks(
    q: &[u8],
    rows: usize,
    cols: usize,
    scales: BlockScales<'_>,
    block: (usize, usize),
) -> Result<Array2<f32>> {
    let (bm, bn) = block;
    if bm == 0 || bn == 0 {
        return Err(ForgeError::Config(format!("weight_block_size {block:?} must be positive")));
    }
    let numel = rows.checked_mul(cols).ok_or_else(|| ForgeError::Shape(format!("{rows}×{cols} overflows")))?;
    if q.len() != numel {
        return Err(ForgeError::Shape(format!("fp8 weight has {} bytes, expected {rows}×{cols}", q.len())));
    }
    let want = (rows.div_ceil(bm), cols.div_ceil(bn));
    let esize = if scales.dtype == Dtype::F32 { 4 } else { 2 };
    if scales.shape != want || scales.bytes.len() != want.0 * want.1 * esize {
        return Err(ForgeError::Shape(format!(
            "block scales are {:?} ({} bytes), expected {want:?} {}",
            scales.shape,
            scales.bytes.len(),
            scales.dtype
        )));
    }
    if !matches!(scales.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        return Err(ForgeError::Dtype(format!("{} (block scales; expected F32, BF16 or F16)", scales.dtype)));
    }
    let blocks = scales.blocks(block)?;
    blocks.validate(rows, cols)?;
    let mut out = vec![0f32; numel];
    if numel > 0 {
        out.par_chunks_mut(cols).enumerate().try_for_each(|(i, o)| blocks.read_row_f32(q, i, cols, o))?;
    }
    Array2::from_shape_vec((rows, cols), out).map_err(|e| ForgeError::Shape(e.to_string()))
}

/// f32 → bf16 bits, round to nearest even (what `tensor.to(torch.bfloat16)` does), for FP8
/// weights that are kept in full precision: the shared numerics' rounding, which the device
/// kernel uses too.
pub fn f32_to_bf16_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 2];
    out.par_chunks_mut(2)
        .zip(values.par_iter())
        .for_each(|(o, &v)| o.copy_from_slice(&f32_to_bf16_bits(v).to_le_bytes()));
    out
}

/// f32 → nearest FP8-E4M3 code (ties to the even code, saturating at ±448, NaN → NaN):
/// what `tensor.to(torch.float8_e4m3fn)` does after clamping. Used to build test and demo
/// checkpoints.
pub fn f32_to_fp8_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    // Codes 0x00..=0x7e are the non-negative finite values in increasing order.
    let (mut lo, mut hi) = (0u8, 0x7eu8);
    if a >= fp8_e4m3_to_f32(hi) {
        return sign | hi;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fp8_e4m3_to_f32(mid) <= a {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (dl, dh) = (a - fp8_e4m3_to_f32(lo), fp8_e4m3_to_f32(hi) - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) { lo } else { hi };
    sign | code
}

/// Quantizes an f32 weight to block-scaled FP8 the way DeepSeek's `weight_quant` does
/// (`s = absmax/448` per block, `q = fp8(w/s)`), returning codes and f32 scales. For
/// building test and demo checkpoints.
pub fn quantize_fp8_blocks(w: &Array2<f32>, block: (usize, usize)) -> (Vec<u8>, Array2<f32>) {
    let (rows, cols) = w.dim();
    let (bm, bn) = block;
    let mut scales = Array2::<f32>::zeros((rows.div_ceil(bm), cols.div_ceil(bn)));
    for ((br, bc), s) in scales.indexed_iter_mut() {
        let mut amax = 0f32;
        for i in br * bm..((br + 1) * bm).min(rows) {
            for j in bc * bn..((bc + 1) * bn).min(cols) {
                amax = amax.max(w[[i, j]].abs());
            }
        }
        *s = if amax > 0.0 { amax / 448.0 } else { 1.0 };
    }
    let q = w.indexed_iter().map(|((i, j), &v)| f32_to_fp8_e4m3(v / scales[[i / bm, j / bn]])).collect();
    (q, scales)
}
