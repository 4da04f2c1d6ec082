//! The checkpoint format (issue 12's [`super::format`]) as the streaming writer uses it.
//!
//! The writer places every tensor before it is computed (shards of bounded size, resumable
//! at any point), so it needs each quantized Linear's tensor names, dtypes and shapes up
//! front. [`WriterFormat::specs`] gets them by encoding a placeholder Linear of the same
//! shape once per distinct shape (a model has a handful) and [`WriterFormat::encode`]
//! checks that the real encoding matches them.

use super::format::{
    check_runtime_support, encode_linear, encode_linear_packed, quantization_config, quantize_config_file,
    CheckpointFormat, LinearQuant, LinearShape, QuantSettings, RuntimeIssue, ScaleDtype, Severity,
};
use super::st::TensorSpec;
use crate::pack::PackedCodes;
use crate::{ForgeError, GridConfig, QMetaPacked, QuantGrid, Result};
use ndarray::{Array2, Array3, ArrayView2};
use std::collections::HashMap;
use std::sync::Mutex;

/// One quantized Linear, as the engine hands it to the writer.
#[derive(Clone, Copy, Debug)]
pub struct QuantizedLinear<'a> {
    /// The module (`model.layers.0.self_attn.q_proj`).
    pub module: &'a str,
    /// qmeta4 records `(rows, n_groups)`.
    pub grid: &'a QuantGrid,
    /// Codes `(rows, cols)` in `0..=maxq`, original column order (ignored when `packed`).
    pub codes: ArrayView2<'a, u8>,
    /// The codes packed on the device in this format's layout
    /// ([`crate::pack::PackLayout::for_format`]), written as they are.
    pub packed: Option<&'a PackedCodes>,
}

/// A shape's tensor layout, or why the format cannot store that shape.
type Template = std::result::Result<Vec<TensorSpec>, String>;

/// Names `--format` accepts.
pub const FORMAT_NAMES: &[&str] = &["compressed-tensors", "gptq", "gptq_v2", "qmeta4"];

/// A checkpoint format with its settings, for the writer.
pub struct WriterFormat {
    settings: QuantSettings,
    grid: GridConfig,
    /// Tensor suffixes, dtypes and shapes per `(rows, cols)`, or why that shape cannot be
    /// stored.
    templates: Mutex<HashMap<(usize, usize), Template>>,
}

impl std::fmt::Debug for WriterFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterFormat").field("settings", &self.settings).finish()
    }
}

impl WriterFormat {
    /// `format` (a [`CheckpointFormat`] name) for grids built with `grid`; `scale_dtype`
    /// defaults to the format's.
    pub fn new(format: &str, grid: &GridConfig, scale_dtype: Option<ScaleDtype>, act_order: bool) -> Result<Self> {
        let format = CheckpointFormat::parse(format)?;
        let mut settings = QuantSettings::new(format, grid.bits, Some(grid.group_size), grid.symmetric);
        if let Some(d) = scale_dtype {
            settings.scale_dtype = d;
        }
        settings.act_order = act_order;
        settings.validate()?;
        Ok(WriterFormat { settings, grid: grid.clone(), templates: Mutex::new(HashMap::new()) })
    }

    /// The format's settings.
    pub fn settings(&self) -> &QuantSettings {
        &self.settings
    }

    /// The layout of the format's packed weight (what the device packs into for it).
    pub fn pack_layout(&self) -> crate::pack::PackLayout {
        crate::pack::PackLayout::for_format(self.settings.format)
    }

    /// The format's id (`compressed-tensors`, ...).
    pub fn id(&self) -> &'static str {
        self.settings.format.name()
    }

    /// The dtype scales are stored in (what round-to-nearest quantizes against).
    pub fn scale_dtype(&self) -> ScaleDtype {
        self.settings.scale_dtype
    }

    fn template(&self, rows: usize, cols: usize) -> std::result::Result<Vec<TensorSpec>, String> {
        let mut cache = self.templates.lock().map_err(|_| "format template cache poisoned".to_string())?;
        if let Some(t) = cache.get(&(rows, cols)) {
            return t.clone();
        }
        let t = self.build_template(rows, cols);
        cache.insert((rows, cols), t.clone());
        t
    }

    /// Encodes a placeholder Linear (every code at the zero point, scale 1) of this shape.
    fn build_template(&self, rows: usize, cols: usize) -> std::result::Result<Vec<TensorSpec>, String> {
        self.grid.validate(rows, cols).map_err(|e| e.to_string())?;
        let zero = if self.settings.symmetric { self.settings.symmetric_zero() } else { 0 };
        let n_groups = self.grid.n_groups(cols);
        let record = QMetaPacked::encode(1.0, f32::from(zero), self.settings.symmetric).to_bytes();
        let qmeta = Array3::from_shape_fn((rows, n_groups, 4), |(_, _, k)| record[k]);
        let grid = QuantGrid {
            qmeta,
            maxq: self.grid.maxq(),
            pad: n_groups * self.grid.group_size - cols,
            group_size: self.grid.group_size,
            scale_dtype: self.settings.scale_dtype,
        };
        let codes = Array2::from_elem((rows, cols), zero);
        let out = encode_linear(&self.settings, "", &LinearQuant { codes: codes.view(), grid: &grid }).map_err(
            |e| match e {
                // The placeholder's module name is empty; the caller names the module.
                ForgeError::Format(m) => m.trim_start_matches("linear: ").to_string(),
                e => e.to_string(),
            },
        )?;
        Ok(out.into_iter().map(|t| TensorSpec::new(t.name, t.dtype, t.shape)).collect())
    }

    /// Why a `rows × cols` weight cannot be stored (then it is kept in full precision and
    /// listed in the ignore list): the format cannot lay it out, or vLLM would refuse it.
    pub fn check_fit(&self, rows: usize, cols: usize) -> std::result::Result<(), String> {
        self.template(rows, cols)?;
        let lin = LinearShape { name: "linear".into(), out_features: rows, in_features: cols, quantized: true };
        let blocking: Vec<String> = check_runtime_support(&self.settings, &[lin])
            .into_iter()
            .filter(|i| i.severity == Severity::Blocking && i.module.is_some())
            .map(|i| i.constraint)
            .collect();
        if blocking.is_empty() {
            Ok(())
        } else {
            Err(blocking.join("; "))
        }
    }

    /// The tensors that replace `<module>.weight`, in the order [`WriterFormat::encode`]
    /// returns them.
    pub fn specs(&self, module: &str, rows: usize, cols: usize) -> Result<Vec<TensorSpec>> {
        let t = self.template(rows, cols).map_err(|why| ForgeError::Format(format!("{module}: {why}")))?;
        Ok(t.into_iter().map(|s| TensorSpec::new(format!("{module}.{}", s.name), s.dtype, s.shape)).collect())
    }

    /// The bytes of each tensor of [`WriterFormat::specs`], checked against them.
    pub fn encode(&self, q: QuantizedLinear<'_>) -> Result<Vec<Vec<u8>>> {
        let (rows, cols) = q.packed.map_or(q.codes.dim(), |p| (p.rows, p.cols));
        let specs = self.specs(q.module, rows, cols)?;
        let out = match q.packed {
            Some(p) => encode_linear_packed(&self.settings, q.module, q.grid, p)?,
            None => encode_linear(&self.settings, q.module, &LinearQuant { codes: q.codes, grid: q.grid })?,
        };
        if out.len() != specs.len()
            || out.iter().zip(&specs).any(|(t, s)| t.name != s.name || t.dtype != s.dtype || t.shape != s.shape)
        {
            return Err(ForgeError::Format(format!(
                "{}: the {} encoder returned tensors that differ from its planned layout",
                q.module,
                self.id()
            )));
        }
        Ok(out.into_iter().map(|t| t.data).collect())
    }

    /// The `quantization_config` for `config.json`.
    pub fn quantization_config(&self, ignore: &[String]) -> Result<serde_json::Value> {
        quantization_config(&self.settings, ignore)
    }

    /// Further config files the format expects (GPTQ's `quantize_config.json`).
    pub fn extra_files(&self, ignore: &[String]) -> Result<Vec<(&'static str, serde_json::Value)>> {
        Ok(quantize_config_file(&self.settings, ignore)?.into_iter().collect())
    }

    /// What vLLM thinks of the whole checkpoint.
    pub fn runtime_issues(&self, linears: &[LinearShape]) -> Vec<RuntimeIssue> {
        check_runtime_support(&self.settings, linears)
    }
}
