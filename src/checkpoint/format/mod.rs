//! Per-Linear checkpoint formats: compressed-tensors `pack-quantized` (default), GPTQ
//! (`gptq` and `gptq_v2`) and our qmeta4-native format (issue 12).
//!
//! The layouts, with links to the library sources they follow, are in `docs/formats.md`.
//!
//! # API
//!
//! * [`QuantSettings`]: format, bits, group size (`None` = one group per output row), symmetry,
//!   [`ScaleDtype`] of the stored scales.
//! * [`encode_linear`]`(settings, module, &`[`LinearQuant`]`)` → the module's tensors as
//!   [`TensorOut`] (name, safetensors dtype, shape, little-endian bytes; a
//!   [`safetensors::View`], so a list of them serialises directly).
//! * [`decode_linear`]`(settings, module, &impl `[`TensorLookup`]`)` → [`DecodedLinear`]
//!   (codes, stored scales, zero points, dequantized weight). `TensorLookup` is implemented for
//!   a loaded [`safetensors::SafeTensors`] and for `[TensorOut]`.
//! * [`quantization_config`]`(settings, ignore)` → the `quantization_config` object of
//!   `config.json`; [`quantize_config_file`] → GPTQ's extra `quantize_config.json`.
//! * [`expected_dequant`]: what a written Linear dequantizes to, `(q − qzero)·stored_scale`.
//! * [`check_runtime_support`]: what vLLM needs (bits, symmetry, group sizes, shapes, fused
//!   projections quantized alike), as a list of [`RuntimeIssue`]s.
//!
//! # Codes, zero points, scales
//!
//! Our codes are `q ∈ 0..=maxq` with a per-group zero point `qzero` (the qmeta4 byte;
//! symmetric grids use `qzero = 2^(bits−1)`), and `w = (q − qzero)·scale`. Every format stores
//! `q` unchanged (compressed-tensors' unsigned storage value `q_signed + 2^(b−1)` is exactly
//! our code, since its signed value and zero point are both offset by `2^(b−1)`). The scale
//! is stored in the settings' [`ScaleDtype`]: the qmeta4 decode rounded to nearest-even
//! ([`stored_scale`]). Dequantizing what was written — here, in compressed-tensors, or in a
//! GPTQ kernel — gives `(q − qzero)·stored_scale` bit for bit (runtimes that compute in the
//! scale dtype round that exact f32 product once more to the scale dtype). The solver
//! quantizes against the same [`stored_scale`] (the grid's [`crate::GridConfig::scale_dtype`],
//! which must be the settings' scale dtype: [`encode_linear`] refuses a mismatch), so the
//! checkpoint dequantizes bit for bit to the weights GPTQ compensated.
//!
//! # Act-order
//!
//! Our solver uses static groups: act-order only changes the order in which columns are
//! solved, never which group a column belongs to. So an act-order result is stored exactly
//! like a plain one — GPTQ `g_idx[c] = c / group_size`, `desc_act: false`; compressed-tensors
//! without `actorder` — and loads in runtimes that refuse act-order checkpoints (vLLM).

mod compressed_tensors;
mod gptq;
mod qmeta4_native;
mod runtime;

pub use runtime::{check_runtime_support, require_loadable, LinearShape, Runtime, RuntimeIssue, Severity};

use crate::pack::{check_bits, PackLayout, PackedCodes};
use crate::{fsio, ForgeError, QuantGrid, Result};
use forge_numerics::{dequantize, f32_to_bf16_bits, f32_to_f16_bits};
pub use forge_numerics::{stored_scale, ScaleDtype};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// The compressed-tensors release whose layout and config we write (dense packing, ≥ 0.18).
pub const COMPRESSED_TENSORS_VERSION: &str = "0.20.1";

/// A checkpoint format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckpointFormat {
    /// compressed-tensors `pack-quantized` (what llm-compressor writes; vLLM's `CompressedTensorsWNA16`).
    CompressedTensors,
    /// GPTQ as AutoGPTQ wrote it: `qzeros` hold `zero − 1`.
    Gptq,
    /// GPTQ v2 (GPTQModel): `qzeros` hold the true zero point.
    GptqV2,
    /// 4Bit Forge's own: dense-packed codes plus the raw 4-byte qmeta4 records.
    Qmeta4Native,
}

impl CheckpointFormat {
    /// All formats.
    pub const ALL: [CheckpointFormat; 4] = [
        CheckpointFormat::CompressedTensors,
        CheckpointFormat::Gptq,
        CheckpointFormat::GptqV2,
        CheckpointFormat::Qmeta4Native,
    ];

    /// The name [`CheckpointFormat::parse`] reads back.
    pub fn name(self) -> &'static str {
        match self {
            CheckpointFormat::CompressedTensors => "compressed-tensors",
            CheckpointFormat::Gptq => "gptq",
            CheckpointFormat::GptqV2 => "gptq_v2",
            CheckpointFormat::Qmeta4Native => "qmeta4",
        }
    }

    /// Parses a format name (`compressed-tensors` / `pack-quantized`, `gptq`, `gptq_v2`,
    /// `qmeta4`); anything else is a [`ForgeError::Format`] listing the known names.
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "compressed_tensors" | "pack_quantized" => Ok(CheckpointFormat::CompressedTensors),
            "gptq" | "gptq_v1" => Ok(CheckpointFormat::Gptq),
            "gptq_v2" => Ok(CheckpointFormat::GptqV2),
            "qmeta4" | "qmeta4_native" | "forge_qmeta4" => Ok(CheckpointFormat::Qmeta4Native),
            _ => Err(ForgeError::Format(format!(
                "unknown checkpoint format {name:?}: expected compressed-tensors, gptq, gptq_v2 or qmeta4"
            ))),
        }
    }

    /// The scale dtype used when none is asked for: f16 for GPTQ (its kernels' convention),
    /// bf16 for compressed-tensors (the serving dtype of most models; vLLM casts scales to
    /// the model dtype, so the two should agree), f32 for qmeta4-native.
    pub fn default_scale_dtype(self) -> ScaleDtype {
        match self {
            CheckpointFormat::CompressedTensors => ScaleDtype::BF16,
            CheckpointFormat::Gptq | CheckpointFormat::GptqV2 => ScaleDtype::F16,
            CheckpointFormat::Qmeta4Native => ScaleDtype::F32,
        }
    }

    fn is_gptq(self) -> bool {
        matches!(self, CheckpointFormat::Gptq | CheckpointFormat::GptqV2)
    }
}

impl std::str::FromStr for CheckpointFormat {
    type Err = ForgeError;
    fn from_str(s: &str) -> Result<Self> {
        CheckpointFormat::parse(s)
    }
}

/// How a checkpoint stores its quantized Linears (one setting for the whole checkpoint).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantSettings {
    /// The format.
    pub format: CheckpointFormat,
    /// Bits per code, `2..=8` (GPTQ: 2, 3, 4 or 8).
    pub bits: u32,
    /// Input columns per group; `None` = one group per output row (per-channel).
    pub group_size: Option<usize>,
    /// Symmetric grids (every zero point `2^(bits−1)`, not stored by compressed-tensors).
    pub symmetric: bool,
    /// The dtype scales are stored in (GPTQ: f16 only).
    pub scale_dtype: ScaleDtype,
    /// Whether the solver ran with act-order (metadata only: the layout is the same).
    pub act_order: bool,
}

impl QuantSettings {
    /// Settings with the format's default scale dtype and no act-order.
    pub fn new(format: CheckpointFormat, bits: u32, group_size: Option<usize>, symmetric: bool) -> Self {
        QuantSettings {
            format,
            bits,
            group_size,
            symmetric,
            scale_dtype: format.default_scale_dtype(),
            act_order: false,
        }
    }

    /// Checks the settings on their own (bits, group size, format-specific limits).
    pub fn validate(&self) -> Result<()> {
        check_bits(self.bits)?;
        if self.group_size == Some(0) {
            return Err(ForgeError::GroupSize(0));
        }
        if self.format.is_gptq() {
            gptq::check_settings(self)?;
        }
        Ok(())
    }

    /// `2^bits − 1`.
    pub fn maxq(&self) -> u32 {
        (1u32 << self.bits.min(8)) - 1
    }

    /// The zero point of a symmetric grid, `2^(bits−1)`.
    pub fn symmetric_zero(&self) -> u8 {
        (1u32 << (self.bits.clamp(1, 8) - 1)) as u8
    }

    /// Groups per row for `cols` input columns, and the columns of each group.
    fn groups(&self, cols: usize) -> (usize, usize) {
        match self.group_size {
            Some(gs) if gs > 0 => (cols.div_ceil(gs), gs),
            _ => (1, cols.max(1)),
        }
    }
}

/// One quantized Linear as the solver returns it.
#[derive(Clone, Copy, Debug)]
pub struct LinearQuant<'a> {
    /// `(out_features, in_features)` codes in `0..=maxq`, original column order.
    pub codes: ArrayView2<'a, u8>,
    /// The grid the codes were solved against: `(out_features, n_groups)` qmeta4 records.
    pub grid: &'a QuantGrid,
}

/// One tensor of a checkpoint: name, safetensors dtype, shape, little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorOut {
    /// Full tensor name (`{module}.{suffix}`).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major little-endian bytes.
    pub data: Vec<u8>,
}

impl safetensors::View for &TensorOut {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A stored tensor as a reader sees it.
#[derive(Clone, Debug)]
pub struct TensorIn<'a> {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major little-endian bytes.
    pub data: &'a [u8],
}

/// Where [`decode_linear`] finds tensors by name.
pub trait TensorLookup {
    /// The tensor called `name`, if present.
    fn tensor(&self, name: &str) -> Option<TensorIn<'_>>;
}

impl TensorLookup for safetensors::SafeTensors<'_> {
    fn tensor(&self, name: &str) -> Option<TensorIn<'_>> {
        let v = safetensors::SafeTensors::tensor(self, name).ok()?;
        Some(TensorIn { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data() })
    }
}

impl TensorLookup for [TensorOut] {
    fn tensor(&self, name: &str) -> Option<TensorIn<'_>> {
        self.iter().find(|t| t.name == name).map(|t| TensorIn { dtype: t.dtype, shape: t.shape.clone(), data: &t.data })
    }
}

impl TensorLookup for Vec<TensorOut> {
    fn tensor(&self, name: &str) -> Option<TensorIn<'_>> {
        self.as_slice().tensor(name)
    }
}

impl TensorLookup for HashMap<String, TensorOut> {
    fn tensor(&self, name: &str) -> Option<TensorIn<'_>> {
        self.get(name).map(|t| TensorIn { dtype: t.dtype, shape: t.shape.clone(), data: &t.data })
    }
}

/// One Linear read back from a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedLinear {
    /// `(out, in)` codes.
    pub codes: Array2<u8>,
    /// `(out, n_groups)` scales as stored, widened to f32.
    pub scales: Array2<f32>,
    /// `(out, n_groups)` zero points (GPTQ v1 can hold `2^bits`, hence u16).
    pub zeros: Array2<u16>,
    /// Input columns per group (`in` for per-channel).
    pub group_cols: usize,
    /// `(out, in)` dequantized weight `(q − zero)·scale`, computed in f32.
    pub dequant: Array2<f32>,
}

/// The tensors of `module` (e.g. `model.layers.0.self_attn.q_proj`) in `settings.format`.
///
/// Errors: settings or shapes that disagree ([`ForgeError::Bits`], [`ForgeError::GroupSize`],
/// [`ForgeError::Shape`]); a grid whose `scale_dtype` is not the settings' (its codes were
/// solved against other scales, [`ForgeError::Format`]); data the format cannot hold ([`ForgeError::Format`]: a code above
/// `maxq`, a zero point that is not `2^(bits−1)` in a symmetric setting, a scale that
/// overflows the scale dtype, a shape the layout cannot pack, a zero point of 0 in GPTQ v1).
pub fn encode_linear(settings: &QuantSettings, module: &str, linear: &LinearQuant<'_>) -> Result<Vec<TensorOut>> {
    encode_codes(settings, module, linear.grid, Codes::Bytes(linear.codes))
}

/// [`encode_linear`] from codes already packed (on the device) in the format's layout
/// ([`crate::pack::PackLayout::for_format`]): the words are written as they are. Packed
/// words of another layout or bit width are a [`ForgeError::Format`] error.
pub fn encode_linear_packed(
    settings: &QuantSettings,
    module: &str,
    grid: &QuantGrid,
    packed: &PackedCodes,
) -> Result<Vec<TensorOut>> {
    encode_codes(settings, module, grid, Codes::Packed(packed))
}

/// The codes as an encoder gets them: one per byte, or packed already.
#[derive(Clone, Copy)]
pub(crate) enum Codes<'a> {
    Bytes(ArrayView2<'a, u8>),
    Packed(&'a PackedCodes),
}

impl Codes<'_> {
    fn dim(&self) -> (usize, usize) {
        match self {
            Codes::Bytes(c) => c.dim(),
            Codes::Packed(p) => (p.rows, p.cols),
        }
    }

    /// The format's packed words: packed here (`pack` on the codes), or the given words after
    /// checking they are what `pack` would have made of codes of this shape.
    pub(crate) fn words(
        &self,
        module: &str,
        bits: u32,
        layout: PackLayout,
        pack: impl FnOnce(ArrayView2<'_, u8>) -> Result<Array2<u32>>,
    ) -> Result<Cow<'_, Array2<u32>>> {
        match self {
            Codes::Bytes(c) => Ok(Cow::Owned(pack(*c)?)),
            Codes::Packed(p) => {
                let shape = layout.shape(p.rows, p.cols, bits)?;
                if p.layout != layout || p.bits != bits || p.words.dim() != shape {
                    return Err(ForgeError::Format(format!(
                        "{}: packed words ({:?}, {} bits, {:?}) are not this format's ({layout:?}, {bits} bits, {shape:?})",
                        label(module),
                        p.layout,
                        p.bits,
                        p.words.dim()
                    )));
                }
                Ok(Cow::Borrowed(&p.words))
            }
        }
    }
}

fn encode_codes(settings: &QuantSettings, module: &str, grid: &QuantGrid, codes: Codes<'_>) -> Result<Vec<TensorOut>> {
    let dims = check_linear(settings, codes.dim(), grid)?;
    match settings.format {
        CheckpointFormat::CompressedTensors => compressed_tensors::encode(settings, module, grid, codes, &dims),
        CheckpointFormat::Gptq | CheckpointFormat::GptqV2 => gptq::encode(settings, module, grid, codes, &dims),
        CheckpointFormat::Qmeta4Native => qmeta4_native::encode(settings, module, grid, codes, &dims),
    }
}

/// Reads `module` back from `tensors` (written by [`encode_linear`] or by another tool in the
/// same format). Missing tensors, wrong dtypes, shapes that disagree with the settings or
/// with each other, truncated packed tensors and out-of-range values are
/// [`ForgeError::Format`] errors naming the tensor.
pub fn decode_linear<L: TensorLookup + ?Sized>(
    settings: &QuantSettings,
    module: &str,
    tensors: &L,
) -> Result<DecodedLinear> {
    settings.validate()?;
    match settings.format {
        CheckpointFormat::CompressedTensors => compressed_tensors::decode(settings, module, tensors),
        CheckpointFormat::Gptq | CheckpointFormat::GptqV2 => gptq::decode(settings, module, tensors),
        CheckpointFormat::Qmeta4Native => qmeta4_native::decode(settings, module, tensors),
    }
}

/// What the Linear written by [`encode_linear`] dequantizes to: `(q − qzero)·stored_scale`
/// in f32, `stored_scale` being the qmeta4 scale rounded to the settings' scale dtype.
pub fn expected_dequant(settings: &QuantSettings, linear: &LinearQuant<'_>) -> Result<Array2<f32>> {
    let dims = check_linear(settings, linear.codes.dim(), linear.grid)?;
    let scales = stored_scales(settings, "", linear.grid)?;
    let zeros = linear.grid.qmeta.map_axis(ndarray::Axis(2), |r| r[2] as u16);
    dequantize_groups(linear.codes, scales.view(), zeros.view(), dims.group_cols)
}

/// `(q − zero)·scale` for `(out, in)` codes with `(out, n_groups)` scales and zero points,
/// groups of `group_cols` consecutive columns (the last may be shorter).
pub fn dequantize_groups(
    codes: ArrayView2<'_, u8>,
    scales: ArrayView2<'_, f32>,
    zeros: ArrayView2<'_, u16>,
    group_cols: usize,
) -> Result<Array2<f32>> {
    let (rows, cols) = codes.dim();
    let n_groups = if group_cols == 0 { 0 } else { cols.div_ceil(group_cols) };
    if scales.dim() != (rows, n_groups) || zeros.dim() != (rows, n_groups) {
        return Err(ForgeError::Shape(format!(
            "scales {:?} / zeros {:?} do not fit {rows}×{cols} codes in groups of {group_cols}",
            scales.dim(),
            zeros.dim()
        )));
    }
    let codes = codes.as_standard_layout();
    let scales = scales.as_standard_layout();
    let zeros = zeros.as_standard_layout();
    let (Some(c), Some(s), Some(z)) = (codes.as_slice(), scales.as_slice(), zeros.as_slice()) else {
        return Err(ForgeError::Shape("internal: standard-layout arrays are not contiguous".into()));
    };
    let mut out = vec![0f32; rows * cols];
    if cols > 0 {
        out.par_chunks_mut(cols)
            .zip(c.par_chunks(cols))
            .zip(s.par_chunks(n_groups).zip(z.par_chunks(n_groups)))
            .for_each(|((dst, q), (s, z))| {
                for (((dst, q), &s), &z) in dst.chunks_mut(group_cols).zip(q.chunks(group_cols)).zip(s).zip(z) {
                    let z = z as f32;
                    for (d, &q) in dst.iter_mut().zip(q) {
                        *d = dequantize(q as f32, s, z);
                    }
                }
            });
    }
    Array2::from_shape_vec((rows, cols), out).map_err(|e| ForgeError::Shape(e.to_string()))
}

/// The `quantization_config` object for `config.json`. `ignore` lists the modules left
/// unquantized (compressed-tensors: its `ignore` list; GPTQ: negative `dynamic` rules;
/// qmeta4: `ignore`).
pub fn quantization_config(settings: &QuantSettings, ignore: &[String]) -> Result<Value> {
    settings.validate()?;
    Ok(match settings.format {
        CheckpointFormat::CompressedTensors => compressed_tensors::config(settings, ignore),
        CheckpointFormat::Gptq | CheckpointFormat::GptqV2 => gptq::config(settings, ignore),
        CheckpointFormat::Qmeta4Native => qmeta4_native::config(settings, ignore),
    })
}

/// A further config file the format expects beside `config.json`: GPTQ's
/// `quantize_config.json` (read by AutoGPTQ, GPTQModel and vLLM), the same object as its
/// `quantization_config`.
pub fn quantize_config_file(settings: &QuantSettings, ignore: &[String]) -> Result<Option<(&'static str, Value)>> {
    if settings.format.is_gptq() {
        Ok(Some(("quantize_config.json", quantization_config(settings, ignore)?)))
    } else {
        Ok(None)
    }
}

/// Writes `tensors` (and `metadata`) as one safetensors file atomically
/// ([`crate::fsio::write_atomic`]: a temporary file next to `path`, fsynced, renamed over it,
/// the directory fsynced), so a crash never leaves half a file.
pub fn write_safetensors(path: &Path, tensors: &[TensorOut], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|t| (t.name.clone(), t)), metadata)
        .map_err(|e| ForgeError::Safetensors(format!("{}: {e}", path.display())))?;
    fsio::write_file_atomic(path, &bytes)
}

/// Writes `value` as pretty JSON atomically (see [`write_safetensors`]).
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| ForgeError::Format(e.to_string()))?;
    text.push('\n');
    fsio::write_file_atomic(path, text.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Shared helpers of the format modules
// ---------------------------------------------------------------------------------------------

/// Shapes of a checked Linear.
pub(crate) struct Dims {
    pub rows: usize,
    pub cols: usize,
    pub n_groups: usize,
    pub group_cols: usize,
}

/// Checks the settings, the codes and the grid against each other.
fn check_linear(settings: &QuantSettings, (rows, cols): (usize, usize), grid: &QuantGrid) -> Result<Dims> {
    settings.validate()?;
    if rows == 0 || cols == 0 {
        return Err(ForgeError::Shape(format!("codes are empty ({rows}×{cols})")));
    }
    if grid.scale_dtype != settings.scale_dtype {
        return Err(ForgeError::Format(format!(
            "the grid's scales are {} but the checkpoint stores {}: the codes were solved against other \
             scales than the ones written; build the grid with scale_dtype {}",
            dtype_name(grid.scale_dtype),
            dtype_name(settings.scale_dtype),
            dtype_name(settings.scale_dtype)
        )));
    }
    let (grows, ggroups, four) = grid.qmeta.dim();
    if four != 4 {
        return Err(ForgeError::Shape(format!("grid qmeta has {four} bytes per record, expected 4")));
    }
    if grows != rows {
        return Err(ForgeError::Shape(format!("grid has {grows} rows, codes have {rows}")));
    }
    if grid.maxq != settings.maxq() {
        return Err(ForgeError::Shape(format!(
            "grid maxq {} does not match {} bits (maxq {})",
            grid.maxq,
            settings.bits,
            settings.maxq()
        )));
    }
    let (n_groups, group_cols) = settings.groups(cols);
    match settings.group_size {
        Some(gs) if grid.group_size != gs => {
            return Err(ForgeError::Shape(format!("grid group size {} but settings say {gs}", grid.group_size)));
        }
        None if ggroups != 1 => {
            return Err(ForgeError::Shape(format!(
                "per-channel settings need one group per row; the grid has {ggroups}"
            )));
        }
        _ => {}
    }
    if ggroups != n_groups {
        return Err(ForgeError::Shape(format!(
            "grid has {ggroups} groups per row; {cols} columns in groups of {group_cols} need {n_groups}"
        )));
    }
    Ok(Dims { rows, cols, n_groups, group_cols })
}

/// `(rows, n_groups)` zero points of the grid, checked against the settings: symmetric grids
/// must use `2^(bits−1)` everywhere, asymmetric ones must fit in `bits` bits.
fn checked_zeros(settings: &QuantSettings, module: &str, grid: &QuantGrid) -> Result<Array2<u8>> {
    let zeros = grid.qmeta.map_axis(ndarray::Axis(2), |r| r[2]);
    let sym = settings.symmetric_zero();
    let maxq = settings.maxq();
    let bad = zeros.indexed_iter().find(|(_, &z)| if settings.symmetric { z != sym } else { z as u32 > maxq });
    if let Some(((r, g), &z)) = bad {
        let want = if settings.symmetric {
            format!("a symmetric format needs {sym} (2^(bits−1)) everywhere")
        } else {
            format!("{} bits hold at most {maxq}", settings.bits)
        };
        return Err(ForgeError::Format(format!("{}: zero point {z} at row {r}, group {g}: {want}", label(module))));
    }
    Ok(zeros)
}

/// `(rows, n_groups)` stored scales; a scale the dtype cannot hold (+inf) is an error.
fn stored_scales(settings: &QuantSettings, module: &str, grid: &QuantGrid) -> Result<Array2<f32>> {
    let dtype = settings.scale_dtype;
    let scales = grid.qmeta.map_axis(ndarray::Axis(2), |r| stored_scale(i16::from_le_bytes([r[0], r[1]]), dtype));
    if let Some(((r, g), s)) = scales.indexed_iter().find(|(_, s)| !s.is_finite()) {
        return Err(ForgeError::Format(format!(
            "{}: the scale at row {r}, group {g} overflows {} ({s}); store scales as bf16 or f32",
            label(module),
            dtype_name(dtype)
        )));
    }
    Ok(scales)
}

/// Little-endian bytes of `values` in `dtype`.
fn scale_bytes(values: &[f32], dtype: ScaleDtype) -> Vec<u8> {
    match dtype {
        ScaleDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ScaleDtype::F16 => values.iter().flat_map(|&v| f32_to_f16_bits(v).to_le_bytes()).collect(),
        ScaleDtype::BF16 => values.iter().flat_map(|&v| f32_to_bf16_bits(v).to_le_bytes()).collect(),
    }
}

/// The safetensors dtype of a scale dtype.
pub fn safetensors_dtype(dtype: ScaleDtype) -> Dtype {
    match dtype {
        ScaleDtype::F32 => Dtype::F32,
        ScaleDtype::F16 => Dtype::F16,
        ScaleDtype::BF16 => Dtype::BF16,
    }
}

/// The torch name of a scale dtype (`float16`, ...), as configs spell it.
pub fn dtype_name(dtype: ScaleDtype) -> &'static str {
    match dtype {
        ScaleDtype::F32 => "float32",
        ScaleDtype::F16 => "float16",
        ScaleDtype::BF16 => "bfloat16",
    }
}

fn tensor_name(module: &str, suffix: &str) -> String {
    if module.is_empty() {
        suffix.to_string()
    } else {
        format!("{module}.{suffix}")
    }
}

fn label(module: &str) -> &str {
    if module.is_empty() {
        "linear"
    } else {
        module
    }
}

fn words_out(name: String, words: &Array2<u32>) -> TensorOut {
    let (r, c) = words.dim();
    let w = words.as_standard_layout();
    // Packed weights are the bulk of a checkpoint: converted in parallel chunks (a byte-wise
    // iterator runs at about 1 GB/s on one thread, a third of the whole run's budget).
    let data = match w.as_slice() {
        Some(src) => {
            const WORDS: usize = 1 << 18;
            let mut data = vec![0u8; src.len() * 4];
            data.par_chunks_mut(4 * WORDS).zip(src.par_chunks(WORDS)).for_each(|(d, s)| {
                for (o, x) in d.chunks_exact_mut(4).zip(s) {
                    o.copy_from_slice(&x.to_le_bytes());
                }
            });
            data
        }
        None => w.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    TensorOut { name, dtype: Dtype::I32, shape: vec![r, c], data }
}

fn scales_out(name: String, scales: &Array2<f32>, dtype: ScaleDtype) -> TensorOut {
    let (r, c) = scales.dim();
    let s = scales.as_standard_layout();
    let values: Vec<f32> = s.iter().copied().collect();
    TensorOut { name, dtype: safetensors_dtype(dtype), shape: vec![r, c], data: scale_bytes(&values, dtype) }
}

/// The tensor `name`, or a [`ForgeError::Format`] saying it is missing.
fn fetch<'a, L: TensorLookup + ?Sized>(src: &'a L, name: &str) -> Result<TensorIn<'a>> {
    src.tensor(name).ok_or_else(|| ForgeError::Format(format!("missing tensor {name}")))
}

/// Checks dtype, shape and byte length of a stored tensor.
fn expect(t: &TensorIn<'_>, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
    if t.dtype != dtype {
        return Err(ForgeError::Format(format!("{name} is {:?}, expected {dtype:?}", t.dtype)));
    }
    if t.shape != shape {
        return Err(ForgeError::Format(format!("{name} has shape {:?}, expected {shape:?}", t.shape)));
    }
    let elems = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let want = elems.and_then(|e| e.checked_mul(dtype.bitsize() / 8));
    if want != Some(t.data.len()) {
        return Err(ForgeError::Format(format!(
            "{name} holds {} bytes, its shape {shape:?} of {dtype:?} needs {want:?}",
            t.data.len()
        )));
    }
    Ok(())
}

/// A checked 2-D int32 tensor as `u32` words.
fn words_in(t: &TensorIn<'_>, name: &str, shape: [usize; 2]) -> Result<Array2<u32>> {
    expect(t, name, Dtype::I32, &shape)?;
    let words = t.data.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Array2::from_shape_vec((shape[0], shape[1]), words).map_err(|e| ForgeError::Format(format!("{name}: {e}")))
}

/// A checked 2-D scale tensor widened to f32.
fn scales_in(t: &TensorIn<'_>, name: &str, dtype: ScaleDtype, shape: [usize; 2]) -> Result<Array2<f32>> {
    expect(t, name, safetensors_dtype(dtype), &shape)?;
    let values: Vec<f32> = match dtype {
        ScaleDtype::F32 => t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        ScaleDtype::F16 => {
            t.data.chunks_exact(2).map(|b| forge_numerics::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect()
        }
        ScaleDtype::BF16 => {
            t.data.chunks_exact(2).map(|b| forge_numerics::bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect()
        }
    };
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(ForgeError::Format(format!("{name} holds a non-finite scale ({v}) at flat index {i}")));
    }
    Array2::from_shape_vec((shape[0], shape[1]), values).map_err(|e| ForgeError::Format(format!("{name}: {e}")))
}

/// A checked int64 `[2]` shape tensor `[out, in]`.
fn weight_shape_in(t: &TensorIn<'_>, name: &str) -> Result<(usize, usize)> {
    expect(t, name, Dtype::I64, &[2])?;
    let v: Vec<i64> = t.data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect();
    match v.as_slice() {
        &[r, c] if r > 0 && c > 0 && r <= u32::MAX as i64 && c <= u32::MAX as i64 => Ok((r as usize, c as usize)),
        _ => Err(ForgeError::Format(format!("{name} = {v:?} is not a positive [out, in] shape"))),
    }
}

fn shape_tensor(name: String, rows: usize, cols: usize) -> TensorOut {
    let data = [rows as i64, cols as i64].iter().flat_map(|v| v.to_le_bytes()).collect();
    TensorOut { name, dtype: Dtype::I64, shape: vec![2], data }
}
