//! One quantization step of a checkpoint: weights read from the mapped shards (FP8 block
//! scales applied), round-to-nearest or GPTQ through the library's quantizer, and the
//! relative weight error of the result.

use super::fp8::{dequantize_fp8_blocks, BlockScales};
use super::model::ModelDir;
use super::plan::{GptqSettings, Member};
use super::st::SafetensorsFile;
use crate::calib::{quantize_experts, ExpertInput, QuantizedLayer};
use crate::numerics::{dequantize, quantize};
use crate::solver::{flushed_in_row, flushed_warning, RowFlushed};
use crate::weights::Fp8Blocks;
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
            LoadedWeight::F32(dequantize_fp8_blocks(bytes, dims.0, dims.1, scale_tensor(model, m)?, block)?)
        }
        other => return Err(ForgeError::Dtype(format!("{other} (tensor {})", m.weight))),
    })
}

/// A member's FP8 block-scale tensor (mapped).
fn scale_tensor<'a>(model: &'a ModelDir, m: &Member) -> Result<BlockScales<'a>> {
    let sname =
        m.scale.as_deref().ok_or_else(|| ForgeError::Config(format!("{} is FP8 without block scales", m.weight)))?;
    let s = model.tensor(sname).ok_or_else(|| ForgeError::MissingTensor {
        tensor: sname.to_string(),
        file: model.path.display().to_string(),
    })?;
    Ok(BlockScales { bytes: model.bytes(s)?, dtype: s.info.dtype, shape: s.info.dims2().unwrap_or((0, 0)) })
}

/// A member's FP8 block scales as the engine reads them (mapped), with blocks of `block`,
/// checked against the weight's shape.
pub fn fp8_blocks<'a>(model: &'a ModelDir, m: &Member, block: (usize, usize)) -> Result<Fp8Blocks<'a>> {
    let bs = scale_tensor(model, m)?;
    let (rows, cols) = m.dims;
    let want = (rows.div_ceil(block.0.max(1)), cols.div_ceil(block.1.max(1)));
    if bs.shape != want {
        return Err(ForgeError::Shape(format!(
            "{}: block scales are {:?}, expected {want:?}",
            m.scale.as_deref().unwrap_or("?"),
            bs.shape
        )));
    }
    bs.blocks(block)
}

/// A member's raw bytes as mapped (FP8 codes, or the stored elements of any dtype).
pub fn raw_weight<'a>(model: &'a ModelDir, m: &Member) -> Result<&'a [u8]> {
    let t = model.tensor(&m.weight).ok_or_else(|| ForgeError::MissingTensor {
        tensor: m.weight.clone(),
        file: model.path.display().to_string(),
    })?;
    model.bytes(t)
}

/// A weight as the host passes after the device read it, row by row: a view (borrowed or
/// copied), or FP8 codes with block scales dequantized row by row with the CPU reference's
/// arithmetic ([`Fp8Blocks::read_row_f32`]), so no f32 copy of the whole weight is made.
pub enum RowSource<'a> {
    /// A weight view.
    View(WeightView<'a>),
    /// Block-scaled FP8 codes, `rows × cols` bytes.
    Fp8 {
        /// The codes.
        q: &'a [u8],
        /// Their scales.
        blocks: Fp8Blocks<'a>,
        /// `(rows, cols)`.
        dims: (usize, usize),
    },
}

impl RowSource<'_> {
    /// `(rows, cols)`.
    pub fn dim(&self) -> (usize, usize) {
        match self {
            RowSource::View(w) => w.dim(),
            RowSource::Fp8 { dims, .. } => *dims,
        }
    }

    /// Row `r` as f32 into `out[..cols]`; a NaN/inf value is [`ForgeError::NonFinite`].
    pub fn read_row_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        match self {
            RowSource::View(w) => w.read_row_f32(r, out),
            RowSource::Fp8 { q, blocks, dims } => {
                blocks.read_row_f32(q, r, dims.1, out)?;
                match out[..dims.1].iter().position(|v| !v.is_finite()) {
                    None => Ok(()),
                    Some(col) => Err(ForgeError::NonFinite { tensor: "weight", row: r, col, value: out[col] }),
                }
            }
        }
    }
}

/// A member's weight as the device path reads it: a view of the mapped bytes (a copy when
/// they are misaligned), or the FP8 codes with their block scales (dequantized on the device
/// for the engine, row by row on the host for the error).
pub enum HostInput<'a> {
    /// F32 / F16 / BF16.
    Loaded(LoadedWeight<'a>),
    /// Block-scaled FP8-E4M3.
    Fp8 {
        /// The codes, `rows × cols` bytes (mapped).
        q: &'a [u8],
        /// Their scales (mapped).
        blocks: Fp8Blocks<'a>,
        /// `(rows, cols)`.
        dims: (usize, usize),
    },
}

impl<'a> HostInput<'a> {
    /// Reads member `m` of `model` (FP8 with blocks of `block`).
    pub fn open(model: &'a ModelDir, m: &Member, block: (usize, usize)) -> Result<Self> {
        let t = model.tensor(&m.weight).ok_or_else(|| ForgeError::MissingTensor {
            tensor: m.weight.clone(),
            file: model.path.display().to_string(),
        })?;
        if t.info.dtype != Dtype::F8_E4M3 {
            return Ok(HostInput::Loaded(load_weight(model, m, block)?));
        }
        let q = model.bytes(t)?;
        let dims = m.dims;
        if dims.0.checked_mul(dims.1) != Some(q.len()) {
            return Err(ForgeError::Shape(format!("{}: {} bytes for {dims:?} fp8 codes", m.weight, q.len())));
        }
        Ok(HostInput::Fp8 { q, blocks: fp8_blocks(model, m, block)?, dims })
    }

    /// The weight the engine uploads, and its block scales.
    pub fn engine_view(&self) -> Result<(WeightView<'_>, Option<Fp8Blocks<'_>>)> {
        match self {
            HostInput::Loaded(l) => Ok((l.view(), None)),
            HostInput::Fp8 { q, blocks, dims } => {
                let v = ndarray::ArrayView2::from_shape(*dims, q).map_err(|e| ForgeError::Shape(e.to_string()))?;
                Ok((WeightView::Fp8E4M3(v), Some(*blocks)))
            }
        }
    }

    /// The weight row by row, as the reference reads it (f32; FP8 dequantized).
    pub fn rows(&self) -> RowSource<'_> {
        match self {
            HostInput::Loaded(l) => RowSource::View(l.view()),
            HostInput::Fp8 { q, blocks, dims } => RowSource::Fp8 { q, blocks: *blocks, dims: *dims },
        }
    }
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
    /// Codes `(rows, cols)` (empty when `packed` holds them).
    pub codes: Array2<u8>,
    /// The codes packed on the device in the format's layout, instead of `codes`.
    pub packed: Option<crate::pack::PackedCodes>,
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
/// [`rtn_from_grid`].
pub fn quantize_rtn(quantizer: &Quantizer, weight: WeightView<'_>) -> Result<MemberResult> {
    let grid = quantizer.build_quant_grid(weight)?;
    rtn_from_grid(&RowSource::View(weight), grid, None)
}

/// Round to nearest on a built grid: each element with the shared numerics'
/// `quantize`/`dequantize` against the scale as the checkpoint stores it (the grid's
/// `scale_dtype`, set from the format by [`super::plan::Plan::grid_config`]), so the written
/// checkpoint dequantizes to exactly this result, and the relative weight error
/// `‖Q − W‖²/‖W‖²` (f64, per row then rows in order). This is what the GPTQ solver does with
/// `U = I`, so with `codes` given (the device engine's data-free job) they are used as they
/// are and only the error is computed.
pub fn rtn_from_grid(weight: &RowSource<'_>, grid: QuantGrid, codes: Option<Array2<u8>>) -> Result<MemberResult> {
    grid.check_stored_scales()?;
    let (rows, cols) = weight.dim();
    let gs = grid.group_size;
    let maxq = grid.maxq as f32;
    let n_groups = grid.dim().1;
    if grid.dim().0 != rows || n_groups != cols.div_ceil(gs.max(1)) {
        return Err(ForgeError::Shape(format!(
            "a grid of {:?} records for a {rows}×{cols} weight in groups of {gs}",
            grid.dim()
        )));
    }
    let given = codes.is_some();
    let mut codes = match codes {
        // Moved, not copied, when already in row order (the engine's codes are): a copy of a
        // fresh allocation costs more than the error pass itself.
        Some(c) if c.dim() == (rows, cols) && c.is_standard_layout() => c,
        Some(c) if c.dim() == (rows, cols) => c.as_standard_layout().into_owned(),
        Some(c) => return Err(ForgeError::Shape(format!("codes of {:?} for a {rows}×{cols} weight", c.dim()))),
        None => Array2::zeros((rows, cols)),
    };
    let out = codes.as_slice_mut().ok_or_else(|| ForgeError::Internal("codes not contiguous".into()))?;
    let sums: Vec<Result<(f64, f64)>> = out
        .par_chunks_mut(cols.max(1))
        .enumerate()
        .map_init(
            || vec![0f32; cols],
            |buf, (r, out)| {
                weight.read_row_f32(r, buf)?;
                let meta: Vec<(f32, f32)> = (0..n_groups).map(|g| grid.scale_zero(r, g)).collect::<Result<_>>()?;
                // Group by group (no division per element): the codes, then the error in
                // LANES independent f64 sums (the loops vectorize), added up in lane order.
                let (mut err, mut norm) = ([0f64; LANES], [0f64; LANES]);
                for ((o, xs), &(s, z)) in out.chunks_mut(gs.max(1)).zip(buf.chunks(gs.max(1))).zip(&meta) {
                    if !given {
                        for (o, &x) in o.iter_mut().zip(xs) {
                            *o = quantize(x, s, z, maxq) as u8;
                        }
                    }
                    lane_sums(o, xs, s, z, &mut err, &mut norm);
                }
                let (err, norm) = (err.iter().sum::<f64>(), norm.iter().sum::<f64>());
                Ok((err, norm))
            },
        )
        .collect();
    let rows: Vec<(f64, f64)> = sums.into_iter().collect::<Result<_>>()?;
    Ok(MemberResult {
        grid,
        codes,
        packed: None,
        rel_weight_error: relative_error(rows),
        gptq_loss: None,
        method: "rtn",
        flags: Vec::new(),
    })
}

/// A data-free result the device finished: the codes packed in the format's layout and per
/// row `(Σ ((q − z)·s − x)², Σ x²)` (`QuantizedWeight::row_error`, the sums of
/// [`rtn_from_grid`]'s pass bit for bit), added rows in order as that pass adds them, so the
/// relative weight error is the CPU path's exactly.
pub fn rtn_from_device(
    grid: QuantGrid,
    packed: crate::pack::PackedCodes,
    row_error: ndarray::ArrayView2<'_, f64>,
) -> Result<MemberResult> {
    grid.check_stored_scales()?;
    if row_error.dim() != (packed.rows, 2) || grid.dim().0 != packed.rows {
        return Err(ForgeError::Shape(format!(
            "device results disagree: {} packed rows, {:?} row sums, a grid of {} rows",
            packed.rows,
            row_error.dim(),
            grid.dim().0
        )));
    }
    let rows = row_error.rows().into_iter().map(|r| (r[0], r[1]));
    Ok(MemberResult {
        grid,
        codes: Array2::zeros((0, 0)),
        packed: Some(packed),
        rel_weight_error: relative_error(rows),
        gptq_loss: None,
        method: "rtn",
        flags: Vec::new(),
    })
}

/// `‖Q − W‖² / ‖W‖²` from per-row `(Σ err², Σ x²)`, added rows in order in f64 (0 for an
/// all-zero weight): every error pass, host or device, ends here, so they agree bit for bit.
fn relative_error(rows: impl IntoIterator<Item = (f64, f64)>) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for (e, n) in rows {
        err += e;
        norm += n;
    }
    if norm > 0.0 {
        err / norm
    } else {
        0.0
    }
}

/// Independent f64 partial sums of the host's error passes (enough to hide the add latency).
const LANES: usize = 8;

/// Adds `((q − z)·s − x)²` and `x²` of a group's codes `qs` and values `xs` into `LANES`
/// partial sums, element `i` into lane `i % LANES`.
#[inline]
fn lane_sums(qs: &[u8], xs: &[f32], s: f32, z: f32, err: &mut [f64; LANES], norm: &mut [f64; LANES]) {
    let mut qc = qs.chunks_exact(LANES);
    let mut xc = xs.chunks_exact(LANES);
    for (q8, x8) in (&mut qc).zip(&mut xc) {
        for l in 0..LANES {
            let x = f64::from(x8[l]);
            let d = f64::from(dequantize(f32::from(q8[l]), s, z)) - x;
            err[l] += d * d;
            norm[l] += x * x;
        }
    }
    for (l, (&q, &x)) in qc.remainder().iter().zip(xc.remainder()).enumerate() {
        let x = f64::from(x);
        let d = f64::from(dequantize(f32::from(q), s, z)) - x;
        err[l] += d * d;
        norm[l] += x * x;
    }
}

/// Writes the Hessian file [`load_hessian`] reads: tensor `hessian`, F32 `cols × cols`, and
/// the metadata `tokens` (0: the module saw no calibration tokens). Atomic: a crash leaves
/// the old file or the whole new one.
pub fn write_hessian_file(path: &Path, h: ArrayView2<'_, f32>, tokens: u64) -> Result<()> {
    let (rows, cols) = h.dim();
    if rows != cols {
        return Err(ForgeError::Shape(format!("a Hessian is square, not {rows}×{cols}")));
    }
    let spec = super::st::TensorSpec::new("hessian", Dtype::F32, vec![cols, cols]);
    let meta = [("tokens".to_string(), tokens.to_string())].into_iter().collect();
    let (mut bytes, _, _) = super::st::encode_header(std::slice::from_ref(&spec), &meta)?;
    crate::budget::Request::new().bytes(4, &[cols, cols]).check(&format!("the Hessian file {}", path.display()))?;
    bytes.reserve(4 * cols * cols);
    for v in h.iter() {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    crate::fsio::write_file_atomic(path, &bytes)
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
    layers.into_iter().zip(weights).map(|(l, w)| gptq_result(l, &RowSource::View(*w), false)).collect()
}

/// A GPTQ result with its relative weight error against `w`: per row (the dequantized
/// weight `(q − q0)·s` with the stored scale, as the solver used it), then rows in order, in
/// f64. With `scan_flushed` the same pass also finds the flushed groups
/// ([`Warning::FlushedGroups`], dead columns read as 0), which a device-quantized layer
/// does not carry yet; a CPU-solved one already has them from its solver.
pub fn gptq_result(mut l: QuantizedLayer, w: &RowSource<'_>, scan_flushed: bool) -> Result<MemberResult> {
    let (rows, cols) = w.dim();
    if l.codes.dim() != (rows, cols) || l.grid.dim().0 != rows {
        return Err(ForgeError::Shape(format!("GPTQ result {:?} for a {rows}×{cols} weight", l.codes.dim())));
    }
    let gs = l.grid.group_size.max(1);
    let dead = &l.flags.dead_columns;
    let sums: Vec<Result<(f64, f64, RowFlushed)>> = (0..rows)
        .into_par_iter()
        .map_init(
            || vec![0f32; cols],
            |buf, r| {
                w.read_row_f32(r, buf)?;
                let meta: Vec<(f32, f32)> =
                    (0..l.grid.dim().1).map(|g| l.grid.scale_zero(r, g)).collect::<Result<_>>()?;
                let row = l.codes.row(r);
                let owned;
                let codes = match row.as_slice() {
                    Some(c) => c,
                    None => {
                        owned = row.to_vec();
                        &owned
                    }
                };
                // Group by group (no division per element), as in `rtn_from_grid`.
                let (mut err, mut norm) = ([0f64; LANES], [0f64; LANES]);
                for ((xs, qs), &(s, z)) in buf.chunks(gs).zip(codes.chunks(gs)).zip(&meta) {
                    lane_sums(qs, xs, s, z, &mut err, &mut norm);
                }
                let (err, norm) = (err.iter().sum::<f64>(), norm.iter().sum::<f64>());
                let flushed = if scan_flushed {
                    for &j in dead {
                        if let Some(v) = buf.get_mut(j) {
                            *v = 0.0;
                        }
                    }
                    flushed_in_row(&buf[..cols], gs, |c0, c1| {
                        let (s, z) = meta.get(c0 / gs).copied().unwrap_or((f32::NAN, 0.0));
                        codes[c0..c1].iter().all(|&q| dequantize(f32::from(q), s, z) == 0.0)
                    })
                } else {
                    (0, None)
                };
                Ok((err, norm, flushed))
            },
        )
        .collect();
    let mut err_norm = Vec::with_capacity(rows);
    let mut per_row = Vec::with_capacity(if scan_flushed { rows } else { 0 });
    for s in sums {
        let (e, n, flushed) = s?;
        err_norm.push((e, n));
        if scan_flushed {
            per_row.push(Ok(flushed));
        }
    }
    if scan_flushed {
        l.warnings.extend(flushed_warning(per_row, l.grid.dim().1)?);
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
        packed: None,
        rel_weight_error: relative_error(err_norm),
        gptq_loss: Some(l.loss.iter().map(|&v| f64::from(v)).sum()),
        method: if no_h { "rtn (no hessian)" } else { "gptq" },
        flags,
    })
}
