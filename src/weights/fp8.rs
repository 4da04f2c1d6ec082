//! Block-scaled FP8-E4M3 weights (DeepSeek-V3 / Kimi-K2 `weight_scale_inv`): the block
//! scales as the engine and the checkpoint reader see them ([`Fp8Blocks`]), the per-row CPU
//! reference dequantization ([`Fp8Blocks::read_row_f32`], which
//! `checkpoint::fp8::dequantize_fp8_blocks` runs), and the device kernels' launcher
//! (`kernels-gpu/src/weights/fp8_dequant.rs`). Both sides compute every element with
//! `forge_numerics::fp8_block_dequant` (`f32(q) · scale`, one multiply), so they agree bit for
//! bit; bf16 output is `forge_numerics::f32_to_bf16_bits` (round to nearest-even).
//!
//! Convention: a weight of `(rows, cols)` codes has `(ceil(rows/bm), ceil(cols/bn))` scales,
//! row-major; edge tiles are partial; element `(r, c)` uses scale `(r/bm, c/bn)`.

use crate::device::{DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::{ForgeError, Result};
use cudarc::driver::{CudaStream, LaunchConfig};
use forge_kernel_abi::weights::{Fp8BlockDequantArgs, BLOCK_SCALE_BF16, BLOCK_SCALE_F16, BLOCK_SCALE_F32};
use forge_kernel_abi::{DevPtr, DevPtrMut, Fp8BlockDequantBf16, Fp8BlockDequantF32};
use forge_numerics::{bf16_bits_to_f32, f16_bits_to_f32, fp8_block_dequant};
use ndarray::Array2;
use rayon::prelude::*;

/// The element type block scales are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockScaleDtype {
    /// f32 (DeepSeek-V3, Kimi-K2).
    F32,
    /// bfloat16.
    BF16,
    /// IEEE binary16.
    F16,
}

impl BlockScaleDtype {
    /// Bytes per scale.
    pub fn size(self) -> usize {
        match self {
            BlockScaleDtype::F32 => 4,
            BlockScaleDtype::BF16 | BlockScaleDtype::F16 => 2,
        }
    }

    fn abi(self) -> u32 {
        match self {
            BlockScaleDtype::F32 => BLOCK_SCALE_F32,
            BlockScaleDtype::BF16 => BLOCK_SCALE_BF16,
            BlockScaleDtype::F16 => BLOCK_SCALE_F16,
        }
    }
}

/// The block scales of one FP8-E4M3 weight, as stored.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Blocks<'a> {
    /// Raw little-endian scales, row-major `(ceil(rows/bm), ceil(cols/bn))`.
    pub scales: &'a [u8],
    /// Their element type.
    pub dtype: BlockScaleDtype,
    /// `(bm, bn)`: rows and columns per scale (`quantization_config.weight_block_size`).
    pub block: (usize, usize),
}

impl Fp8Blocks<'_> {
    /// `(ceil(rows/bm), ceil(cols/bn))`; a zero block size is an error.
    pub fn scale_dims(&self, rows: usize, cols: usize) -> Result<(usize, usize)> {
        let (bm, bn) = self.block;
        if bm == 0 || bn == 0 {
            return Err(ForgeError::Config(format!("weight_block_size {:?} must be positive", self.block)));
        }
        Ok((rows.div_ceil(bm), cols.div_ceil(bn)))
    }

    /// Checks the scales against a `rows × cols` weight: their byte count, and every scale
    /// finite ([`ForgeError::NonFinite`] `weight_scale_inv` at the scale's block position).
    pub fn validate(&self, rows: usize, cols: usize) -> Result<()> {
        let (sr, sc) = self.scale_dims(rows, cols)?;
        let want = sr.checked_mul(sc).and_then(|n| n.checked_mul(self.dtype.size()));
        if want != Some(self.scales.len()) {
            return Err(ForgeError::Shape(format!(
                "block scales hold {} bytes, expected [{sr}, {sc}] {:?} for a {rows}×{cols} weight with {}×{} blocks",
                self.scales.len(),
                self.dtype,
                self.block.0,
                self.block.1
            )));
        }
        for br in 0..sr {
            for bc in 0..sc {
                let s = self.scale(br * sc + bc);
                if !s.is_finite() {
                    return Err(ForgeError::NonFinite { tensor: "weight_scale_inv", row: br, col: bc, value: s });
                }
            }
        }
        Ok(())
    }

    /// Scale number `k` (row-major), widened exactly; NaN past the end (callers validate).
    fn scale(&self, k: usize) -> f32 {
        let size = self.dtype.size();
        let Some(b) = self.scales.get(k * size..(k + 1) * size) else { return f32::NAN };
        match (self.dtype, b) {
            (BlockScaleDtype::F32, &[a, b, c, d]) => f32::from_le_bytes([a, b, c, d]),
            (BlockScaleDtype::BF16, &[a, b]) => bf16_bits_to_f32(u16::from_le_bytes([a, b])),
            (BlockScaleDtype::F16, &[a, b]) => f16_bits_to_f32(u16::from_le_bytes([a, b])),
            _ => f32::NAN,
        }
    }

    /// Row `r` of the weight whose codes are `q` (`rows × cols` bytes, row-major), dequantized
    /// into `out[..cols]`: the CPU reference. A NaN code is [`ForgeError::NonFinite`]
    /// (`fp8 weight`) at its place. The scales must have been validated.
    pub fn read_row_f32(&self, q: &[u8], r: usize, cols: usize, out: &mut [f32]) -> Result<()> {
        let (bm, bn) = self.block;
        if bm == 0 || bn == 0 {
            return Err(ForgeError::Config(format!("weight_block_size {:?} must be positive", self.block)));
        }
        let row = r
            .checked_mul(cols)
            .and_then(|s| q.get(s..s + cols))
            .ok_or_else(|| ForgeError::Shape(format!("fp8 row {r} is past the {} code bytes", q.len())))?;
        let have = out.len();
        let out = out
            .get_mut(..cols)
            .ok_or_else(|| ForgeError::Shape(format!("an output row of {have} for {cols} columns")))?;
        let (br, sc) = (r / bm, cols.div_ceil(bn));
        for (bc, (o, qs)) in out.chunks_mut(bn).zip(row.chunks(bn)).enumerate() {
            let s = self.scale(br * sc + bc);
            for (o, &b) in o.iter_mut().zip(qs) {
                *o = fp8_block_dequant(b, s);
            }
        }
        match out.iter().position(|v| v.is_nan()) {
            None => Ok(()),
            Some(col) => Err(ForgeError::NonFinite { tensor: "fp8 weight", row: r, col, value: f32::NAN }),
        }
    }
}

/// What the device dequantization writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Output {
    /// f32 (what the grid and solver read).
    F32,
    /// bf16, rounded to nearest-even (an FP8 weight kept in full precision).
    BF16,
}

/// Threads per block of the dequantization kernel.
const THREADS: u32 = 256;

/// Enqueues the device dequantization of `rows × cols` codes at `q` with the scales at
/// `scales` into `out` on `stream`.
///
/// # Safety
/// `q` holds `rows·cols` bytes, `scales` the validated scales of `blocks` (a whole
/// allocation, so aligned), `out` `rows·cols` elements of `output`, `first_nan` one u64; all
/// ready on `stream`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn enqueue_fp8_block_dequant(
    dev: &GpuDevice,
    stream: &CudaStream,
    q: DevPtr<u8>,
    scales: DevPtr<u8>,
    blocks: &Fp8Blocks<'_>,
    rows: usize,
    cols: usize,
    output: Fp8Output,
    out: DevPtrMut<u8>,
    first_nan: DevPtrMut<u64>,
) -> Result<()> {
    let (_, sc) = blocks.scale_dims(rows, cols)?;
    // Half the u32 range: the kernel's grid-stride indices (`+ stride`) cannot wrap.
    let fits = |v: usize| u32::try_from(v).ok().filter(|&v| v <= u32::MAX / 2);
    let (Some(r32), Some(c32), Some(bm), Some(bn), Some(sc32)) =
        (fits(rows), fits(cols), fits(blocks.block.0), fits(blocks.block.1), fits(sc))
    else {
        return Err(ForgeError::Shape(format!("a {rows}×{cols} fp8 weight is too large for the kernel")));
    };
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let args = Fp8BlockDequantArgs {
        q,
        scales,
        scale_dtype: blocks.dtype.abi(),
        rows: r32,
        cols: c32,
        block_rows: bm,
        block_cols: bn,
        scale_cols: sc32,
        out,
        first_nan,
    };
    // Columns over x (up to 64 blocks of 256), rows over y (grid-stride past 65535).
    let gx = cols.div_ceil(THREADS as usize).min(64) as u32;
    let gy = rows.min(65_535) as u32;
    let cfg = LaunchConfig { grid_dim: (gx, gy, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    match output {
        Fp8Output::F32 => dev.launch_on::<Fp8BlockDequantF32>(stream, cfg, &args),
        Fp8Output::BF16 => dev.launch_on::<Fp8BlockDequantBf16>(stream, cfg, &args),
    }
}

/// The raw device output of [`dequantize_fp8_blocks_gpu_raw`], checked for NaN codes.
fn dequantize_raw(
    dev: &GpuDevice,
    q: &[u8],
    rows: usize,
    cols: usize,
    blocks: &Fp8Blocks<'_>,
    output: Fp8Output,
) -> Result<Vec<u8>> {
    let n = rows.checked_mul(cols).ok_or_else(|| ForgeError::Shape(format!("{rows}×{cols} overflows")))?;
    if q.len() != n {
        return Err(ForgeError::Shape(format!("fp8 weight has {} bytes, expected {rows}×{cols}", q.len())));
    }
    blocks.validate(rows, cols)?;
    let esize = match output {
        Fp8Output::F32 => 4,
        Fp8Output::BF16 => 2,
    };
    let stream = dev.stream();
    let q_dev = stream
        .clone_htod(if q.is_empty() { &[0u8][..] } else { q })
        .map_err(ForgeError::driver("uploading fp8 codes"))?;
    let s_dev = stream
        .clone_htod(if blocks.scales.is_empty() { &[0u8][..] } else { blocks.scales })
        .map_err(ForgeError::driver("uploading block scales"))?;
    let mut out = dev.alloc::<u8>(n * esize, "dequantized fp8 weight")?;
    let mut flag = dev.alloc::<u64>(1, "fp8 NaN flag")?;
    // SAFETY: sizes as allocated above; the scales were validated; one stream orders all.
    unsafe {
        enqueue_fp8_block_dequant(
            dev,
            stream,
            q_dev.dev_ptr(),
            s_dev.dev_ptr(),
            blocks,
            rows,
            cols,
            output,
            out.dev_ptr_mut(),
            flag.dev_ptr_mut(),
        )
    }?;
    let bad = stream.clone_dtoh(&flag).map_err(ForgeError::driver("reading the fp8 NaN flag"))?;
    if let Some(&f) = bad.first().filter(|&&f| f != 0) {
        let idx = !f as usize;
        return Err(ForgeError::NonFinite { tensor: "fp8 weight", row: idx / cols, col: idx % cols, value: f32::NAN });
    }
    let mut bytes = stream.clone_dtoh(&out).map_err(ForgeError::driver("downloading the dequantized weight"))?;
    bytes.truncate(n * esize);
    Ok(bytes)
}

/// Dequantizes a block-scaled FP8 weight on the device to f32 (upload, kernel, download;
/// synchronous): the same values as the CPU reference, bit for bit, and the same errors.
pub fn dequantize_fp8_blocks_gpu(
    dev: &GpuDevice,
    q: &[u8],
    rows: usize,
    cols: usize,
    blocks: &Fp8Blocks<'_>,
) -> Result<Array2<f32>> {
    let bytes = dequantize_raw(dev, q, rows, cols, blocks, Fp8Output::F32)?;
    let v: Vec<f32> = bytes.par_chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Array2::from_shape_vec((rows, cols), v).map_err(|e| ForgeError::Shape(e.to_string()))
}

/// As [`dequantize_fp8_blocks_gpu`], rounded to bf16 on the device: little-endian bf16 bytes,
/// row-major (what a kept FP8 weight is written as).
pub fn dequantize_fp8_blocks_gpu_bf16(
    dev: &GpuDevice,
    q: &[u8],
    rows: usize,
    cols: usize,
    blocks: &Fp8Blocks<'_>,
) -> Result<Vec<u8>> {
    dequantize_raw(dev, q, rows, cols, blocks, Fp8Output::BF16)
}
