//! One quantization step of a checkpoint: weights read from the mapped shards (FP8 block
//! scales applied), round-to-nearest or GPTQ through the library's quantizer, and the
//! relative weight error of the result.

use super::fp8::{dequantize_fp8_blocks, BlockScales};
use super::model::ModelDir;
use super::plan::{GptqSettings, Member};
use super::st::SafetensorsFile;
use crate::calib::{quantize_experts, ExpertInput, QuantizedLayer};
use crate::numerics::{dequantize, quantize};
use crate::{ForgeError, QuantGrid, Quantizer, Result, Warning, WeightView};
use half::{bf16, f16};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use safetensors::Dtype;
use std::path::Path;

/// A weight as the quantizer reads it: the mapped bytes when they are aligned, else an
/// owned copy; FP8 weights dequantized to f32.
pub enum LoadedWeight<'a> {
    /// Borrowed from the mapped shard.
    View(WeightView<'a>),
    /// f32 (copied, or dequantized from FP8).
    F32(Array2<f32>),
    /// f16 copy.
    F16(Array2<f16>),
    /// bf16 copy.
    BF16(Array2<bf16>),
}

impl LoadedWeight<'_> {
    /// The weight.
    pub fn view(&self) -> WeightView<'_> {
        match self {
            LoadedWeight::View(WeightView::F32(a)) => WeightView::F32(a.reborrow()),
            LoadedWeight::View(WeightView::F16(a)) => WeightView::F16(a.reborrow()),
            LoadedWeight::View(WeightView::BF16(a)) => WeightView::BF16(a.reborrow()),
            LoadedWeight::View(WeightView::Fp8E4M3(a)) => WeightView::Fp8E4M3(a.reborrow()),
            LoadedWeight::F32(a) => WeightView::F32(a.view()),
            LoadedWeight::F16(a) => WeightView::F16(a.view()),
            LoadedWeight::BF16(a) => WeightView::BF16(a.view()),
        }
    }
}

fn typed<'a, T: bytemuck::Pod>(
    bytes: &'a [u8],
    dims: (usize, usize),
) -> Result<std::result::Result<ArrayView2<'a, T>, Array2<T>>> {
    let shape_err = |e: ndarray::ShapeError| ForgeError::Shape(e.to_string());
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(s) => Ok(Ok(ArrayView2::from_shape(dims, s).map_err(shape_err)?)),
        Err(_) => {
            let v: Vec<T> = bytes.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect();
            Ok(Err(Array2::from_shape_vec(dims, v).map_err(shape_err)?))
        }
    }
}

/// Reads a member's weight (see [`LoadedWeight`]).
pub fn load_weight<'a>(model: &'a ModelDir, m: &Member, block: (usize, usize)) -> Result<LoadedWeight<'a>> {
    let t = model.tensor(&m.weight).ok_or_else(|| ForgeError::MissingTensor {
        tensor: m.weight.clone(),
        file: model.path.display().to_string(),
    })?;
    let bytes = model.bytes(t)?;
    let dims = m.dims;
    Ok(match t.info.dtype {
        Dtype::F32 => match typed::<f32>(bytes, dims)? {
            Ok(v) => LoadedWeight::View(WeightView::F32(v)),
            Err(a) => LoadedWeight::F32(a),
        },
        Dtype::F16 => match typed::<f16>(bytes, dims)? {
            Ok(v) => LoadedWeight::View(WeightView::F16(v)),
            Err(a) => LoadedWeight::F16(a),
        },
        Dtype::BF16 => match typed::<bf16>(bytes, dims)? {
            Ok(v) => LoadedWeight::View(WeightView::BF16(v)),
            Err(a) => LoadedWeight::BF16(a),
        },
        Dtype::F8_E4M3 => {
            let sname = m
                .scale
                .as_deref()
                .ok_or_else(|| ForgeError::Config(format!("{} is FP8 without block scales", m.weight)))?;
            let s = model.tensor(sname).ok_or_else(|| ForgeError::MissingTensor {
                tensor: sname.to_string(),
                file: model.path.display().to_string(),
            })?;
            let scales =
                BlockScales { bytes: model.bytes(s)?, dtype: s.info.dtype, shape: s.info.dims2().unwrap_or((0, 0)) };
            LoadedWeight::F32(dequantize_fp8_blocks(bytes, dims.0, dims.1, scales, block)?)
        }
        other => return Err(ForgeError::Dtype(format!("{other} (tensor {})", m.weight))),
    })
}

/// Drops a member's mapped pages (weight and scales) once it is done.
pub fn release_weight(model: &ModelDir, m: &Member) {
    for name in std::iter::once(&m.weight).chain(m.scale.as_ref()) {
        if let Some(t) = model.tensor(name) {
            if let Ok(shard) = model.shard(t) {
                shard.release(&t.info, 0, t.info.len);
            }
        }
    }
}

/// A quantized weight: grid, codes and its relative weight error.
pub struct MemberResult {
    /// qmeta4 records.
    pub grid: QuantGrid,
    /// Codes `(rows, cols)`.
    pub codes: Array2<u8>,
    /// `‖Q − W‖² / ‖W‖²`.
    pub rel_weight_error: f64,
    /// GPTQ loss (sum over rows), for GPTQ.
    pub gptq_loss: Option<f64>,
    /// `"rtn"`, `"gptq"` or `"rtn (no hessian)"`.
    pub method: &'static str,
    /// Pre-step notes and the layer's other warnings.
    pub flags: Vec<String>,
}

/// Round to nearest on the quantizer's grid: the grid from the quantizer's backend, then
/// each element with the shared numerics' `quantize`/`dequantize` against the scale as the
/// checkpoint stores it (the grid's `scale_dtype`, set from the format by
/// [`super::plan::Plan::grid_config`]), so the written checkpoint dequantizes to exactly this
/// result: what the GPTQ solver does with `U = I`, without its O(rows·cols²) update work.
pub fn quantize_rtn(quantizer: &Quantizer, weight: WeightView<'_>) -> Result<MemberResult> {
    let (rows, cols) = weight.dim();
    let grid = quantizer.build_quant_grid(weight)?;
    grid.check_stored_scales()?;
    let gs = grid.group_size;
    let maxq = grid.maxq as f32;
    let n_groups = grid.dim().1;
    let mut codes = vec![0u8; rows * cols];
    let sums: Vec<Result<(f64, f64)>> = codes
        .par_chunks_mut(cols.max(1))
        .enumerate()
        .map_init(
            || vec![0f32; cols],
            |buf, (r, out)| {
                weight.read_row_f32(r, buf)?;
                let meta: Vec<(f32, f32)> = (0..n_groups).map(|g| grid.scale_zero(r, g)).collect::<Result<_>>()?;
                let (mut err, mut norm) = (0f64, 0f64);
                for (c, (o, &x)) in out.iter_mut().zip(buf.iter()).enumerate() {
                    let (s, z) = meta[c / gs];
                    let q = quantize(x, s, z, maxq);
                    *o = q as u8;
                    let d = f64::from(dequantize(q, s, z)) - f64::from(x);
                    err += d * d;
                    norm += f64::from(x) * f64::from(x);
                }
                Ok((err, norm))
            },
        )
        .collect();
    let (mut err, mut norm) = (0f64, 0f64);
    for s in sums {
        let (e, n) = s?;
        err += e;
        norm += n;
    }
    let codes = Array2::from_shape_vec((rows, cols), codes).map_err(|e| ForgeError::Shape(e.to_string()))?;
    Ok(MemberResult {
        grid,
        codes,
        rel_weight_error: if norm > 0.0 { err / norm } else { 0.0 },
        gptq_loss: None,
        method: "rtn",
        flags: Vec::new(),
    })
}

/// A Hessian file: `hessian` (or the only 2-D tensor), F32/F16/BF16, `cols × cols`, and
/// the token count from the metadata key `tokens` (1 when absent; 0 marks a module that
/// saw no calibration tokens).
pub fn load_hessian(path: &Path, cols: usize) -> Result<(Array2<f32>, u64)> {
    let f = SafetensorsFile::open(path)?;
    let t = match f.tensor("hessian") {
        Some(t) => t,
        None => {
            let two_d: Vec<_> = f.tensors().values().filter(|t| t.shape.len() == 2).collect();
            match two_d.as_slice() {
                [t] => *t,
                _ => {
                    return Err(ForgeError::MissingTensor {
                        tensor: "hessian".into(),
                        file: path.display().to_string(),
                    })
                }
            }
        }
    };
    if t.dims2() != Some((cols, cols)) {
        return Err(ForgeError::Shape(format!(
            "{}: Hessian {} has shape {:?}, expected [{cols}, {cols}]",
            path.display(),
            t.name,
            t.shape
        )));
    }
    let bytes = f.bytes(t)?;
    let values: Vec<f32> = match t.dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => {
            bytes.chunks_exact(2).map(|c| crate::numerics::f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
        }
        Dtype::BF16 => {
            bytes.chunks_exact(2).map(|c| crate::numerics::bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
        }
        other => return Err(ForgeError::Dtype(format!("{other} (Hessian in {})", path.display()))),
    };
    let tokens = match f.metadata().get("tokens") {
        Some(s) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| ForgeError::Config(format!("{}: metadata tokens = {s:?} is not a count", path.display())))?,
        None => 1,
    };
    let h = Array2::from_shape_vec((cols, cols), values).map_err(|e| ForgeError::Shape(e.to_string()))?;
    Ok((h, tokens))
}

/// GPTQ for weights that share one Hessian (`None`: no file, or no tokens → `U = I`,
/// flagged). One pre-step, one solve per weight.
pub fn quantize_gptq<'a>(
    quantizer: &Quantizer,
    gptq: &GptqSettings,
    weights: &[WeightView<'a>],
    hessian: Option<ArrayView2<'a, f32>>,
) -> Result<Vec<MemberResult>> {
    let input = ExpertInput { weights: weights.to_vec(), hessian };
    let layers = quantize_experts(&quantizer.backend, &quantizer.config, &gptq.pre_step, &[input])?;
    let layers = layers.into_iter().next().unwrap_or_default();
    if layers.len() != weights.len() {
        return Err(ForgeError::Shape(format!("GPTQ returned {} results for {} weights", layers.len(), weights.len())));
    }
    layers.into_iter().zip(weights).map(|(l, w)| gptq_result(l, *w)).collect()
}

fn gptq_result(l: QuantizedLayer, w: WeightView<'_>) -> Result<MemberResult> {
    let (rows, cols) = w.dim();
    let mut buf = vec![0f32; cols];
    let (mut err, mut norm) = (0f64, 0f64);
    let dequant = l.dequant();
    for r in 0..rows {
        w.read_row_f32(r, &mut buf)?;
        for (&x, &d) in buf.iter().zip(dequant.row(r)) {
            let e = f64::from(d) - f64::from(x);
            err += e * e;
            norm += f64::from(x) * f64::from(x);
        }
    }
    let f = &l.flags;
    let mut flags = Vec::new();
    if !f.dead_columns.is_empty() {
        flags.push(format!("{} dead input columns zeroed", f.dead_columns.len()));
    }
    if f.retries > 0 {
        flags.push(format!("factorisation retried {} times (damping {:.3e})", f.retries, f.damping_used));
    }
    if f.fallback_identity {
        flags.push("Hessian not factorisable: round-to-nearest".into());
    }
    let no_h = f.no_tokens;
    if no_h {
        flags.push("no calibration tokens: round-to-nearest".into());
    }
    // The rest of the layer's warnings (asymmetric H, flushed groups, ...), in their words.
    for w in &l.warnings {
        let covered = matches!(
            w,
            Warning::DeadInputs { .. }
                | Warning::DampingRetries { .. }
                | Warning::FallbackIdentity { .. }
                | Warning::NoCalibrationTokens
        );
        if !covered {
            flags.push(w.to_string());
        }
    }
    Ok(MemberResult {
        grid: l.grid,
        codes: l.codes,
        rel_weight_error: if norm > 0.0 { err / norm } else { 0.0 },
        gptq_loss: Some(l.loss.iter().map(|&v| f64::from(v)).sum()),
        method: if no_h { "rtn (no hessian)" } else { "gptq" },
        flags,
    })
}
