//! The plan of a run, fixed before any work: what happens to every input tensor, every
//! output tensor's shard and offset, the ignore list, the output config, the memory each
//! step needs, and a fingerprint of input and settings (what `--resume` checks).
//!
//! The plan is a pure function of the model directory, the Hessian files and the
//! settings, which is what makes a resumed run byte-identical to an uninterrupted one.

use super::format::{require_loadable, LinearShape, RuntimeIssue, ScaleDtype};
use super::model::{ModelDir, TensorRef};
use super::select::{classify, fused_group, layer_of, module_of, Glob, TensorKind};
use super::st::{encode_header, nbytes, SafetensorsFile, TensorSpec};
use super::writer::WriterFormat;
use crate::hessian::PreStepConfig;
use crate::{ForgeError, GridConfig, Result, ScaleSearch, ShrinkCandidates};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Bytes copied per step when a tensor is copied unchanged.
pub const COPY_CHUNK: usize = 64 * 1024 * 1024;

/// How weights are quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// Round to nearest on the grid (absmax or MSE scales): data-free.
    Rtn,
    /// GPTQ with Hessians read from safetensors files.
    Gptq(GptqSettings),
}

/// GPTQ's inputs beyond the grid.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqSettings {
    /// Directory of `<module>.safetensors` files, each with an `in × in` tensor `hessian`
    /// (or its only 2-D tensor) and optionally the token count as metadata `tokens`.
    /// Modules fused with others (q/k/v, gate/up, w1/w3) may share the first member's file.
    pub hessians: PathBuf,
    /// Damping and act-order.
    pub pre_step: PreStepConfig,
    /// Quantize a module without a Hessian file by round-to-nearest (flagged) instead of
    /// failing.
    pub allow_missing: bool,
}

/// Everything that decides the output, besides the model itself.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSettings {
    /// Bits, group size, symmetry, scale search.
    pub grid: GridConfig,
    /// RTN or GPTQ.
    pub method: Method,
    /// Output format name (see [`super::writer::FORMAT_NAMES`]).
    pub format: String,
    /// The dtype scales are stored in (`None`: the format's default). It overrides
    /// `grid.scale_dtype` ([`Plan::grid_config`]): round-to-nearest and GPTQ quantize against
    /// the stored scale, so the checkpoint dequantizes exactly to their result.
    pub scale_dtype: Option<ScaleDtype>,
    /// Only Linear weights matching one of these globs are quantized (all when empty).
    pub include: Vec<String>,
    /// Linear weights matching one of these globs are kept in full precision.
    pub exclude: Vec<String>,
    /// Largest output shard in bytes (a single tensor larger than this gets a shard alone).
    pub max_shard_size: u64,
    /// Where GPTQ's Hessians came from when they were calibrated from text (file, samples,
    /// sequence length, propagation, the samples' fingerprint): shown in the summary and
    /// hashed into the run's fingerprint.
    pub calibration: Option<serde_json::Value>,
}

impl Default for JobSettings {
    /// W4 g128 symmetric absmax RTN, compressed-tensors, 5 GB shards.
    fn default() -> Self {
        JobSettings {
            grid: GridConfig::default(),
            method: Method::Rtn,
            format: "compressed-tensors".into(),
            scale_dtype: None,
            include: Vec::new(),
            exclude: Vec::new(),
            max_shard_size: 5_000_000_000,
            calibration: None,
        }
    }
}

impl JobSettings {
    /// The settings as JSON (the summary shows it; the fingerprint hashes it).
    pub fn to_json(&self) -> serde_json::Value {
        let search = match &self.grid.scale_search {
            ScaleSearch::Absmax => serde_json::json!("absmax"),
            ScaleSearch::Mse(m) => {
                let cands = match &m.candidates {
                    ShrinkCandidates::Linspace { max_shrink, n_grid } => {
                        serde_json::json!({"linspace": {"max_shrink": max_shrink, "n_grid": n_grid}})
                    }
                    ShrinkCandidates::List(l) => serde_json::json!({ "list": l }),
                };
                serde_json::json!({"mse": {"norm": m.norm, "candidates": cands}})
            }
        };
        let method = match &self.method {
            Method::Rtn => serde_json::json!("rtn"),
            Method::Gptq(g) => serde_json::json!({"gptq": {
                "hessians": g.hessians.display().to_string(),
                "rel_damp": g.pre_step.rel_damp,
                "act_order": g.pre_step.act_order,
                "allow_missing": g.allow_missing,
            }}),
        };
        let mut v = serde_json::json!({
            "bits": self.grid.bits,
            "group_size": self.grid.group_size,
            "symmetric": self.grid.symmetric,
            "scale_search": search,
            "method": method,
            "format": self.format,
            "scale_dtype": self.scale_dtype.map(super::format::dtype_name),
            "include": self.include,
            "exclude": self.exclude,
            "max_shard_size": self.max_shard_size,
        });
        if let (Some(c), Some(o)) = (&self.calibration, v.as_object_mut()) {
            o.insert("calibration".into(), c.clone());
        }
        v
    }
}

/// One weight of a quantization step.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// The module (`...q_proj`).
    pub module: String,
    /// The weight tensor (`...q_proj.weight`).
    pub weight: String,
    /// Its FP8 block scales, for an FP8 weight.
    pub scale: Option<String>,
    /// `(rows, cols)`.
    pub dims: (usize, usize),
    /// What it is.
    pub kind: TensorKind,
    /// The Hessian file (GPTQ), `None` for RTN or a module without one.
    pub hessian: Option<PathBuf>,
}

/// What one step does.
#[derive(Clone, Debug, PartialEq)]
pub enum Work {
    /// Copy a tensor bit for bit.
    Copy {
        /// The tensor.
        tensor: String,
    },
    /// An FP8 block-scaled weight kept in full precision: dequantized and stored as BF16
    /// (the output's quantization_config replaces the FP8 one, so the scales go).
    Fp8ToBf16 {
        /// The weight.
        weight: String,
        /// Its scales.
        scale: String,
    },
    /// Quantize a fused group (or a single Linear).
    Quantize {
        /// The group's weights.
        members: Vec<Member>,
    },
}

/// One step of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// What is reported: the group or the tensor.
    pub label: String,
    /// The decoder layer it belongs to, or `"(other)"`.
    pub layer: String,
    /// The work.
    pub work: Work,
    /// Its output tensors: indices into [`Plan::outputs`].
    pub outputs: Vec<usize>,
    /// Input bytes read.
    pub input_bytes: u64,
    /// Estimated peak host memory of the step.
    pub memory: u64,
}

/// An output tensor with its place.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    /// Name, dtype, shape.
    pub spec: TensorSpec,
    /// Index into [`Plan::shards`].
    pub shard: usize,
    /// Offset of its first byte in the shard file (header included).
    pub file_offset: u64,
    /// Size in bytes.
    pub nbytes: u64,
}

/// One output file.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardPlan {
    /// File name in the output directory.
    pub file_name: String,
    /// Header bytes (length prefix included).
    pub header: Vec<u8>,
    /// Its tensors: indices into [`Plan::outputs`].
    pub tensors: Vec<usize>,
    /// File size.
    pub size: u64,
}

/// A Linear weight kept in full precision, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Kept {
    /// The module.
    pub module: String,
    /// Why.
    pub reason: String,
}

/// The whole run, decided up front.
pub struct Plan {
    /// The steps, in order.
    pub items: Vec<Item>,
    /// Every output tensor.
    pub outputs: Vec<PlannedTensor>,
    /// Output files.
    pub shards: Vec<ShardPlan>,
    /// Linear modules left unquantized (the quantization_config's ignore list).
    pub ignore: Vec<String>,
    /// Decoder Linear weights kept in full precision, with the reason.
    pub kept: Vec<Kept>,
    /// The output `config.json`.
    pub config_json: serde_json::Value,
    /// The format.
    pub format: WriterFormat,
    /// What vLLM thinks of the checkpoint (none blocking: those are errors).
    pub runtime_issues: Vec<RuntimeIssue>,
    /// The settings.
    pub settings: JobSettings,
    /// Hex xxh3-128 of input identity and settings.
    pub fingerprint: String,
    /// Tensor counts by (kind, dtype) of the input.
    pub census: BTreeMap<(TensorKind, String), (usize, u64)>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("items", &self.items.len())
            .field("outputs", &self.outputs.len())
            .field("shards", &self.shards.len())
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Plan {
    /// The grid every quantized weight is built with: the job's, with the format's scale
    /// dtype, so the solver quantizes against the scales exactly as the checkpoint stores them.
    pub fn grid_config(&self) -> GridConfig {
        GridConfig { scale_dtype: self.format.scale_dtype(), ..self.settings.grid.clone() }
    }

    /// Total bytes written (shards only).
    pub fn output_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.size).sum()
    }

    /// Total tensor bytes read.
    pub fn input_bytes(&self) -> u64 {
        self.items.iter().map(|i| i.input_bytes).sum()
    }

    /// Linear weights quantized.
    pub fn quantized_modules(&self) -> usize {
        self.items.iter().map(|i| if let Work::Quantize { members } = &i.work { members.len() } else { 0 }).sum()
    }

    /// The step needing the most host memory: `(label, bytes)`.
    pub fn peak_item_memory(&self) -> (String, u64) {
        self.items.iter().max_by_key(|i| i.memory).map(|i| (i.label.clone(), i.memory)).unwrap_or_default()
    }

    /// The weight map of the output index (`tensor → file`).
    pub fn weight_map(&self) -> BTreeMap<String, String> {
        self.outputs
            .iter()
            .filter_map(|t| self.shards.get(t.shard).map(|s| (t.spec.name.clone(), s.file_name.clone())))
            .collect()
    }

    /// Sum of tensor bytes (the index's `total_size`).
    pub fn total_tensor_bytes(&self) -> u64 {
        self.outputs.iter().map(|t| t.nbytes).sum()
    }
}

/// Whether the engine can read a weight of this dtype for quantization.
fn readable(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F8_E4M3)
}

/// Names compared with their digit runs as numbers (`layers.2` before `layers.10`).
fn natural_key(name: &str) -> Vec<(u8, u64, String)> {
    let mut out = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            let (d, r) = rest.split_at(digits);
            out.push((0, d.parse().unwrap_or(u64::MAX), d.to_string()));
            rest = r;
        } else {
            let n = rest.bytes().take_while(|b| !b.is_ascii_digit()).count();
            let (s, r) = rest.split_at(n);
            out.push((1, 0, s.to_string()));
            rest = r;
        }
    }
    out
}

/// Builds the plan of quantizing `model` with `settings`.
pub fn build_plan(model: &ModelDir, settings: &JobSettings) -> Result<Plan> {
    settings.grid.validate(1, 1)?;
    let act_order = matches!(&settings.method, Method::Gptq(g) if g.pre_step.act_order);
    let format = WriterFormat::new(&settings.format, &settings.grid, settings.scale_dtype, act_order)?;
    if settings.max_shard_size == 0 {
        return Err(ForgeError::Config("--max-shard-size must be > 0".into()));
    }
    let include: Vec<Glob> = settings.include.iter().map(|p| Glob::new(p)).collect();
    let exclude: Vec<Glob> = settings.exclude.iter().map(|p| Glob::new(p)).collect();
    let block = model.fp8_block()?;

    let mut names: Vec<&String> = model.tensors.keys().collect();
    names.sort_by_cached_key(|n| natural_key(n));
    let kinds: HashMap<&str, TensorKind> =
        names.iter().map(|n| (n.as_str(), classify(n, &model.tensors[*n].info.shape))).collect();
    let kind_of = |n: &str| kinds.get(n).copied().unwrap_or(TensorKind::Other);

    let mut census: BTreeMap<(TensorKind, String), (usize, u64)> = BTreeMap::new();
    for n in &names {
        let t = &model.tensors[*n];
        let e = census.entry((kind_of(n), t.info.dtype.to_string())).or_default();
        e.0 += 1;
        e.1 += t.info.len as u64;
    }

    // FP8 weights and their scales.
    let scale_of = |weight: &str| -> Option<String> {
        let s = format!("{}.weight_scale_inv", module_of(weight));
        model.tensors.contains_key(&s).then_some(s)
    };
    for n in &names {
        let t = &model.tensors[*n];
        if t.info.dtype == Dtype::F8_E4M3 && t.info.shape.len() == 2 && scale_of(n).is_none() {
            return Err(ForgeError::Config(format!(
                "{n} is FP8 without {}.weight_scale_inv: only block-scaled FP8 (DeepSeek-V3 style) is supported",
                module_of(n)
            )));
        }
    }

    // Decide each fused group: quantized only when every member is wanted and fits.
    let linears: Vec<&str> =
        names.iter().map(|n| n.as_str()).filter(|n| kind_of(n).is_linear() && n.ends_with(".weight")).collect();
    let mut groups: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for n in &linears {
        groups.entry(fused_group(module_of(n))).or_default().push(n);
    }
    let mut quantized: HashMap<&str, String> = HashMap::new(); // weight → group key
    let mut kept: Vec<Kept> = Vec::new();
    for (key, members) in &groups {
        let mut why: Vec<(usize, String)> = Vec::new();
        for (i, n) in members.iter().enumerate() {
            let t = &model.tensors[*n];
            if let Some(p) = exclude.iter().find(|g| g.matches_tensor(n)) {
                why.push((i, format!("excluded by --exclude {}", p.pattern())));
                continue;
            }
            if !include.is_empty() && !include.iter().any(|g| g.matches_tensor(n)) {
                why.push((i, "not matched by --include".into()));
                continue;
            }
            if !readable(t.info.dtype) {
                return Err(ForgeError::Dtype(format!(
                    "{} (Linear weight {n}; quantizable weights are F32, F16, BF16 or block-scaled F8_E4M3; --exclude it to keep it as it is)",
                    t.info.dtype
                )));
            }
            let (rows, cols) = t.info.dims2().unwrap_or((0, 0));
            if let Err(reason) = format.check_fit(rows, cols) {
                why.push((i, format!("shape {rows}×{cols} does not fit the format: {reason}")));
            }
        }
        if why.is_empty() {
            for n in members {
                quantized.insert(n, key.clone());
            }
            continue;
        }
        for (i, n) in members.iter().enumerate() {
            let reason = match why.iter().find(|(k, _)| *k == i) {
                Some((_, r)) => r.clone(),
                None => {
                    let (k, r) = &why[0];
                    format!("fused with {} ({r})", module_of(members[*k]))
                }
            };
            kept.push(Kept { module: module_of(n).to_string(), reason });
        }
    }

    // Hessian files (GPTQ).
    let hessian_for = |members: &[&str]| -> Result<Vec<Option<PathBuf>>> {
        let Method::Gptq(g) = &settings.method else { return Ok(vec![None; members.len()]) };
        let own: Vec<Option<PathBuf>> = members
            .iter()
            .map(|n| {
                let p = g.hessians.join(format!("{}.safetensors", module_of(n)));
                p.exists().then_some(p)
            })
            .collect();
        // Fused members read the same inputs: the first member's Hessian serves them all.
        let shared = own.iter().flatten().next().cloned();
        members
            .iter()
            .zip(own)
            .map(|(n, p)| match p.or_else(|| shared.clone()) {
                Some(p) => Ok(Some(p)),
                None if g.allow_missing => Ok(None),
                None => Err(ForgeError::Config(format!(
                    "GPTQ: no Hessian for {} (looked for {}); pass --allow-missing-hessians to quantize it by round-to-nearest",
                    module_of(n),
                    g.hessians.join(format!("{}.safetensors", module_of(n))).display()
                ))),
            })
            .collect()
    };

    // Steps in natural name order; a group's step stands where its first member is.
    let mut items: Vec<Item> = Vec::new();
    let mut specs: Vec<Vec<TensorSpec>> = Vec::new();
    let mut emitted: std::collections::HashSet<String> = std::collections::HashSet::new();
    let fp8_bytes = |t: &TensorRef| t.info.len as u64;
    for n in &names {
        let t = &model.tensors[*n];
        let kind = kind_of(n);
        let layer = layer_of(n).unwrap_or("(other)").to_string();
        if kind == TensorKind::Fp8Scale {
            let weight = format!("{}.weight", n.trim_end_matches(".weight_scale_inv"));
            let consumed = model.tensors.get(&weight).is_some_and(|w| w.info.dtype == Dtype::F8_E4M3);
            if consumed {
                continue;
            }
        }
        if let Some(key) = quantized.get(n.as_str()) {
            if !emitted.insert(key.clone()) {
                continue;
            }
            let member_names: Vec<&str> = groups.get(key).map(|v| v.to_vec()).unwrap_or_default();
            let hessians = hessian_for(&member_names)?;
            let mut members = Vec::new();
            let mut out_specs = Vec::new();
            let mut input_bytes = 0u64;
            for (m, h) in member_names.iter().zip(hessians) {
                let mt = &model.tensors[*m];
                let dims = mt.info.dims2().unwrap_or((0, 0));
                let scale = (mt.info.dtype == Dtype::F8_E4M3).then(|| scale_of(m)).flatten();
                if let Some(s) = &scale {
                    super::fp8::check_scale_shape(&mt.info, &model.tensors[s].info, block)?;
                    input_bytes += model.tensors[s].info.len as u64;
                }
                input_bytes += mt.info.len as u64;
                out_specs.extend(format.specs(module_of(m), dims.0, dims.1)?);
                members.push(Member {
                    module: module_of(m).to_string(),
                    weight: m.to_string(),
                    scale,
                    dims,
                    kind: kind_of(m),
                    hessian: h,
                });
            }
            let label = if members.len() == 1 { members[0].module.clone() } else { key.clone() };
            let memory = quantize_memory(&members, model, &out_specs, &settings.method)?;
            items.push(Item { label, layer, work: Work::Quantize { members }, outputs: vec![], input_bytes, memory });
            specs.push(out_specs);
            continue;
        }
        if t.info.dtype == Dtype::F8_E4M3 && t.info.shape.len() == 2 {
            let scale = scale_of(n).unwrap_or_default();
            let st = &model.tensors[&scale];
            super::fp8::check_scale_shape(&t.info, &st.info, block)?;
            let numel = (t.info.len) as u64;
            items.push(Item {
                label: n.to_string(),
                layer,
                work: Work::Fp8ToBf16 { weight: n.to_string(), scale: scale.clone() },
                outputs: vec![],
                input_bytes: fp8_bytes(t) + st.info.len as u64,
                memory: numel * (1 + 4 + 2),
            });
            specs.push(vec![TensorSpec::new(n.to_string(), Dtype::BF16, t.info.shape.clone())]);
            continue;
        }
        let len = t.info.len as u64;
        items.push(Item {
            label: n.to_string(),
            layer,
            work: Work::Copy { tensor: n.to_string() },
            outputs: vec![],
            input_bytes: len,
            memory: len.min(COPY_CHUNK as u64) * 2,
        });
        specs.push(vec![TensorSpec::new(n.to_string(), t.info.dtype, t.info.shape.clone())]);
    }

    // Shards: steps in order, a new file when the next step's outputs would overflow it.
    let mut shard_of_item: Vec<usize> = Vec::with_capacity(items.len());
    let mut cur = 0usize;
    let mut cur_bytes = 0u64;
    for s in &specs {
        let bytes: u64 = s.iter().map(|t| t.nbytes().map(|b| b as u64)).sum::<Result<u64>>()?;
        if cur_bytes > 0 && cur_bytes + bytes > settings.max_shard_size {
            cur += 1;
            cur_bytes = 0;
        }
        cur_bytes += bytes;
        shard_of_item.push(cur);
    }
    let n_shards = cur + 1;
    let file_name = |i: usize| {
        if n_shards == 1 {
            super::model::SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards)
        }
    };
    let mut outputs: Vec<PlannedTensor> = Vec::new();
    let mut shard_specs: Vec<Vec<(usize, TensorSpec)>> = vec![Vec::new(); n_shards];
    for (i, (item, s)) in items.iter_mut().zip(specs).enumerate() {
        let shard = shard_of_item[i];
        for spec in s {
            let nb = spec.nbytes()? as u64;
            item.outputs.push(outputs.len());
            shard_specs[shard].push((outputs.len(), spec.clone()));
            outputs.push(PlannedTensor { spec, shard, file_offset: 0, nbytes: nb });
        }
    }
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let mut shards = Vec::with_capacity(n_shards);
    for (i, list) in shard_specs.into_iter().enumerate() {
        let just_specs: Vec<TensorSpec> = list.iter().map(|(_, s)| s.clone()).collect();
        let (header, offsets, data_len) = encode_header(&just_specs, &meta)?;
        for ((k, _), off) in list.iter().zip(offsets) {
            outputs[*k].file_offset = (header.len() + off) as u64;
        }
        let size = (header.len() + data_len) as u64;
        shards.push(ShardPlan {
            file_name: file_name(i),
            header,
            tensors: list.iter().map(|(k, _)| *k).collect(),
            size,
        });
    }

    // The ignore list: every Linear-like 2-D weight that stays in full precision.
    let mut ignore: Vec<String> = names
        .iter()
        .filter(|n| n.ends_with(".weight") && model.tensors[**n].info.shape.len() == 2)
        .filter(|n| {
            let k = kind_of(n);
            (k.is_linear() && !quantized.contains_key(n.as_str()))
                || matches!(k, TensorKind::LmHead | TensorKind::Router)
        })
        .map(|n| module_of(n).to_string())
        .collect();
    ignore.sort_by_cached_key(|n| natural_key(n));
    let mut config_json = model.config.clone();
    if let Some(obj) = config_json.as_object_mut() {
        obj.insert("quantization_config".into(), format.quantization_config(&ignore)?);
    }
    let linear_shapes: Vec<LinearShape> = linears
        .iter()
        .map(|n| {
            let (out_features, in_features) = model.tensors[*n].info.dims2().unwrap_or((0, 0));
            LinearShape {
                name: module_of(n).to_string(),
                out_features,
                in_features,
                quantized: quantized.contains_key(n),
            }
        })
        .collect();
    let runtime_issues = format.runtime_issues(&linear_shapes);
    require_loadable(&runtime_issues)?;
    let fingerprint = fingerprint(model, settings, format.id(), &items)?;
    Ok(Plan {
        items,
        outputs,
        shards,
        ignore,
        kept,
        config_json,
        format,
        runtime_issues,
        settings: settings.clone(),
        fingerprint,
        census,
    })
}

/// Peak host memory of a quantization step: raw input, widened f32 copy, codes, dequantized
/// weight (GPTQ), grid, encoded output, and for GPTQ the Hessian, its factor and the
/// pre-step's f64 workspace.
fn quantize_memory(members: &[Member], model: &ModelDir, out: &[TensorSpec], method: &Method) -> Result<u64> {
    let mut total = 0u64;
    for m in members {
        let (r, c) = (m.dims.0 as u64, m.dims.1 as u64);
        let raw = model.tensors.get(&m.weight).map_or(0, |t| t.info.len as u64);
        total += raw + 4 * r * c + r * c + 4 * r * c.div_ceil(32);
        if matches!(method, Method::Gptq(_)) {
            total += 4 * r * c + 28 * c * c;
        }
    }
    let out: u64 = out.iter().map(|s| s.nbytes().map(|b| b as u64)).sum::<Result<u64>>()?;
    Ok(total + out)
}

/// xxh3-128 over the input's identity (every shard's size, mtime and header; config.json;
/// the Hessian files used) and the settings: what `--resume` compares.
fn fingerprint(model: &ModelDir, settings: &JobSettings, format: &str, items: &[Item]) -> Result<String> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut put = |s: &str| {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    put(concat!("fourbit-forge ", env!("CARGO_PKG_VERSION")));
    put(&settings.to_json().to_string());
    put(format);
    for line in model.identity_lines() {
        put(&line);
    }
    let mut hessians: Vec<&Path> = items
        .iter()
        .flat_map(|i| match &i.work {
            Work::Quantize { members } => members.iter().filter_map(|m| m.hessian.as_deref()).collect(),
            _ => Vec::new(),
        })
        .collect();
    hessians.sort();
    hessians.dedup();
    for p in hessians {
        let (size, mtime, header) = SafetensorsFile::open(p)?.identity();
        put(&format!("hessian {} {size} {mtime} {header:016x}", p.display()));
    }
    Ok(format!("{:032x}", h.digest128()))
}

/// Bytes of an F32 tensor of `shape`, for estimates.
pub fn f32_bytes(shape: &[usize]) -> u64 {
    nbytes(Dtype::F32, shape).unwrap_or(0) as u64
}
