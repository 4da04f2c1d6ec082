//! How a quantized Linear is stored: the small interface the checkpoint writer needs from
//! an output format (tensor layout known before the data exists, encoding, the config's
//! `quantization_config`), and the formats available.
//!
//! The writer places every tensor before it is computed (shards of bounded size, resumable
//! at any point), so a format states its tensors' names, dtypes and shapes up front
//! ([`LinearFormat::specs`]) and [`LinearFormat::encode`] must produce exactly those.

use super::st::TensorSpec;
use crate::{ForgeError, GridConfig, QuantGrid, Result};
use ndarray::ArrayView2;
use safetensors::Dtype;

/// One quantized Linear, as the engine hands it to a format.
#[derive(Clone, Copy, Debug)]
pub struct QuantizedLinear<'a> {
    /// The module (`model.layers.0.self_attn.q_proj`).
    pub module: &'a str,
    /// qmeta4 records `(rows, n_groups)`.
    pub grid: &'a QuantGrid,
    /// Codes `(rows, cols)` in `0..=maxq`, original column order.
    pub codes: ArrayView2<'a, u8>,
    /// The format settings the grid was built with.
    pub config: &'a GridConfig,
}

/// An output format for quantized Linear weights.
pub trait LinearFormat: Send + Sync {
    /// The name used by `--format` and in reports.
    fn id(&self) -> &'static str;

    /// Rejects settings the format cannot store at all (before any work).
    fn check_settings(&self, config: &GridConfig) -> Result<()>;

    /// Why a `rows × cols` weight cannot be stored in this format with `config` (it is then
    /// kept in full precision and listed in the ignore list), or `Ok` when it can.
    fn check_fit(&self, rows: usize, cols: usize, config: &GridConfig) -> std::result::Result<(), String>;

    /// The tensors that replace `<module>.weight`, in the order [`LinearFormat::encode`]
    /// returns their bytes.
    fn specs(&self, module: &str, rows: usize, cols: usize, config: &GridConfig) -> Vec<TensorSpec>;

    /// The bytes of each tensor of [`LinearFormat::specs`], little-endian, row-major.
    fn encode(&self, q: QuantizedLinear<'_>) -> Result<Vec<Vec<u8>>>;

    /// The `quantization_config` for `config.json`; `ignore` lists the Linear modules kept in
    /// full precision.
    fn quantization_config(&self, config: &GridConfig, ignore: &[String]) -> Result<serde_json::Value>;
}

/// The formats `--format` accepts.
pub const FORMAT_NAMES: &[&str] = &["compressed-tensors"];

/// The format called `name`.
pub fn format_by_name(name: &str) -> Result<Box<dyn LinearFormat>> {
    match name {
        "compressed-tensors" | "pack-quantized" => Ok(Box::new(CompressedTensorsPacked)),
        other => {
            Err(ForgeError::Config(format!("unknown output format {other:?}; available: {}", FORMAT_NAMES.join(", "))))
        }
    }
}

/// compressed-tensors `pack-quantized` (what llm-compressor writes and vLLM loads as
/// W4A16): per Linear `weight_packed` I32 `[rows, cols·bits/32]` (element `j` of a row at
/// bits `[j·b, j·b+b)` of the row's little-endian bit stream), `weight_scale`
/// `[rows, n_groups]` and `weight_shape` I64 `[2]`. Stored values are the unsigned codes
/// (`q_signed + 2^(b−1)`, which is our code for a symmetric grid). Symmetric only here; the
/// scales are stored as f32, exactly the decoded qmeta4 scales the codes were solved with.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompressedTensorsPacked;

impl LinearFormat for CompressedTensorsPacked {
    fn id(&self) -> &'static str {
        "compressed-tensors"
    }

    fn check_settings(&self, config: &GridConfig) -> Result<()> {
        if !config.symmetric {
            return Err(ForgeError::Config(
                "the compressed-tensors writer stores symmetric grids only (asymmetric zero points are not written yet)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn check_fit(&self, rows: usize, cols: usize, config: &GridConfig) -> std::result::Result<(), String> {
        if rows == 0 || cols == 0 {
            return Err("empty weight".into());
        }
        if !cols.is_multiple_of(config.group_size) {
            return Err(format!("{cols} input columns are not a multiple of the group size {}", config.group_size));
        }
        if !(cols * config.bits as usize).is_multiple_of(32) {
            return Err(format!("{cols} input columns of {} bits do not fill whole 32-bit words", config.bits));
        }
        Ok(())
    }

    fn specs(&self, module: &str, rows: usize, cols: usize, config: &GridConfig) -> Vec<TensorSpec> {
        vec![
            TensorSpec::new(
                format!("{module}.weight_packed"),
                Dtype::I32,
                vec![rows, cols * config.bits as usize / 32],
            ),
            TensorSpec::new(format!("{module}.weight_scale"), Dtype::F32, vec![rows, config.n_groups(cols)]),
            TensorSpec::new(format!("{module}.weight_shape"), Dtype::I64, vec![2]),
        ]
    }

    fn encode(&self, q: QuantizedLinear<'_>) -> Result<Vec<Vec<u8>>> {
        let (rows, cols) = q.codes.dim();
        let bits = q.config.bits;
        self.check_fit(rows, cols, q.config).map_err(|why| ForgeError::Shape(format!("{}: {why}", q.module)))?;
        if q.grid.dim() != (rows, q.config.n_groups(cols)) {
            return Err(ForgeError::Shape(format!("{}: grid {:?} for codes {rows}×{cols}", q.module, q.grid.dim())));
        }
        let words_per_row = cols * bits as usize / 32;
        let mut packed = Vec::with_capacity(rows * words_per_row * 4);
        for row in q.codes.rows() {
            let (mut acc, mut nbits) = (0u64, 0u32);
            for &c in row {
                acc |= u64::from(c) << nbits;
                nbits += bits;
                if nbits >= 32 {
                    packed.extend_from_slice(&(acc as u32).to_le_bytes());
                    acc >>= 32;
                    nbits -= 32;
                }
            }
        }
        let (_, n_groups) = q.grid.dim();
        let mut scales = Vec::with_capacity(rows * n_groups * 4);
        for r in 0..rows {
            for g in 0..n_groups {
                scales.extend_from_slice(&q.grid.meta(r, g).scale().to_le_bytes());
            }
        }
        let shape: Vec<u8> = [rows as i64, cols as i64].iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(vec![packed, scales, shape])
    }

    fn quantization_config(&self, config: &GridConfig, ignore: &[String]) -> Result<serde_json::Value> {
        let weights = serde_json::json!({
            "num_bits": config.bits,
            "type": "int",
            "symmetric": config.symmetric,
            "group_size": config.group_size,
            "strategy": "group",
            "dynamic": false,
            "actorder": null,
            "observer": match config.scale_search { crate::ScaleSearch::Absmax => "minmax", _ => "mse" },
            "observer_kwargs": {},
        });
        Ok(serde_json::json!({
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": null,
                    "output_activations": null,
                    "format": "pack-quantized",
                }
            },
            "ignore": ignore,
            "kv_cache_scheme": null,
            "global_compression_ratio": null,
        }))
    }
}
