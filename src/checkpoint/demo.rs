//! Checkpoints generated deterministically, for the built-in demo of `forge quantize`, the
//! tests and benchmarks: a Llama-shaped dense model and a DeepSeek-V3-shaped MoE with
//! block-scaled FP8 weights (`weight_scale_inv`, partial edge tiles), both sharded with an
//! index at boundaries that do not follow the layers, plus Hessian files for GPTQ.
//!
//! Every tensor has its own generator seeded from its name and the model seed, so shards are
//! generated one at a time (in parallel within a shard) and memory stays bounded by one
//! shard whatever the model size.

use super::fp8::{quantize_fp8_blocks, DEFAULT_BLOCK};
use super::model::INDEX_FILE;
use super::select::{classify, fused_group, module_of};
use super::st::{encode_header, TensorSpec};
use crate::{fsio, ForgeError, Result};
use ndarray::Array2;
use rayon::prelude::*;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

/// A deterministic generator (SplitMix64), so the demo is the same on every machine.
#[derive(Clone, Debug)]
pub struct DemoRng(u64);

impl DemoRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        DemoRng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Approximately standard normal (Irwin–Hall of four uniforms, arithmetic only).
    pub fn normal(&mut self) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum();
        (s - 2.0) * 3f32.sqrt()
    }

    /// A weight matrix like a trained one: `1/sqrt(cols)`-scaled, a few outlier input
    /// channels (×6) and rare large elements (×8), so quantization has something to do.
    pub fn weight(&mut self, rows: usize, cols: usize) -> Array2<f32> {
        let scale = 1.0 / (cols.max(1) as f32).sqrt();
        let outlier: Vec<bool> = (0..cols).map(|_| self.uniform() < 0.01).collect();
        Array2::from_shape_fn((rows, cols), |(_, j)| {
            let mut v = self.normal() * scale;
            if outlier[j] {
                v *= 6.0;
            }
            if self.uniform() < 0.001 {
                v *= 8.0;
            }
            v
        })
    }
}

/// What a generated tensor is.
#[derive(Clone, Debug)]
enum Gen {
    /// A weight matrix in this dtype.
    Weight(Dtype),
    /// A norm weight (near 1) in this dtype, 1-D.
    Norm(Dtype),
    /// A small F32 bias, 1-D.
    Bias,
    /// A block-scaled FP8 weight (the f32 weight quantized DeepSeek's way).
    Fp8Weight,
    /// The block scales of the FP8 weight `weight` of `dims` (regenerated from its seed).
    Fp8Scale { weight: String, dims: (usize, usize) },
}

/// A tensor to generate.
#[derive(Clone, Debug)]
struct GenSpec {
    name: String,
    shape: Vec<usize>,
    kind: Gen,
}

fn seed_of(name: &str, seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), seed)
}

fn encode(a: &Array2<f32>, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => a.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect(),
        _ => a.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect(),
    }
}

impl GenSpec {
    fn new(name: impl Into<String>, shape: Vec<usize>, kind: Gen) -> Self {
        GenSpec { name: name.into(), shape, kind }
    }

    /// An FP8 weight and its scales, as two tensors (they may land in different shards).
    fn fp8(name: String, rows: usize, cols: usize) -> [GenSpec; 2] {
        let scale = format!("{}.weight_scale_inv", module_of(&name));
        let sdims = vec![rows.div_ceil(DEFAULT_BLOCK.0), cols.div_ceil(DEFAULT_BLOCK.1)];
        [
            GenSpec::new(name.clone(), vec![rows, cols], Gen::Fp8Weight),
            GenSpec::new(scale, sdims, Gen::Fp8Scale { weight: name, dims: (rows, cols) }),
        ]
    }

    fn dtype(&self) -> Dtype {
        match &self.kind {
            Gen::Weight(d) | Gen::Norm(d) => *d,
            Gen::Bias | Gen::Fp8Scale { .. } => Dtype::F32,
            Gen::Fp8Weight => Dtype::F8_E4M3,
        }
    }

    fn spec(&self) -> TensorSpec {
        TensorSpec::new(self.name.clone(), self.dtype(), self.shape.clone())
    }

    fn nbytes(&self) -> u64 {
        super::st::nbytes(self.dtype(), &self.shape).unwrap_or(0) as u64
    }

    fn generate(&self, seed: u64) -> Vec<u8> {
        let weight = |name: &str, r: usize, c: usize| DemoRng::new(seed_of(name, seed)).weight(r, c);
        let (rows, cols) = match self.shape.as_slice() {
            [r, c] => (*r, *c),
            [n] => (1, *n),
            _ => (0, 0),
        };
        let mut rng = DemoRng::new(seed_of(&self.name, seed));
        match &self.kind {
            Gen::Weight(d) => encode(&weight(&self.name, rows, cols), *d),
            Gen::Norm(d) => encode(&Array2::from_shape_fn((1, cols), |_| 1.0 + 0.1 * rng.normal()), *d),
            Gen::Bias => encode(&Array2::from_shape_fn((1, cols), |_| 0.01 * rng.normal()), Dtype::F32),
            Gen::Fp8Weight => quantize_fp8_blocks(&weight(&self.name, rows, cols), DEFAULT_BLOCK).0,
            Gen::Fp8Scale { weight: w, dims } => {
                encode(&quantize_fp8_blocks(&weight(w, dims.0, dims.1), DEFAULT_BLOCK).1, Dtype::F32)
            }
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ForgeError + '_ {
    move |source| ForgeError::Io { path: path.display().to_string(), source }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_vec_pretty(v).map_err(|e| ForgeError::Config(e.to_string()))?;
    s.push(b'\n');
    fsio::write_file_atomic(path, &s)
}

/// Writes the tensors as shards of about `shard_bytes` (a new file once a file reaches it),
/// in the order given, one shard in memory at a time, with an index when there is more
/// than one file.
fn write_shards(dir: &Path, specs: Vec<GenSpec>, shard_bytes: u64, seed: u64) -> Result<()> {
    let mut groups: Vec<Vec<GenSpec>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in specs {
        if size >= shard_bytes {
            groups.push(Vec::new());
            size = 0;
        }
        size += t.nbytes();
        if let Some(g) = groups.last_mut() {
            g.push(t);
        }
    }
    let n = groups.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (i, g) in groups.into_iter().enumerate() {
        let file =
            if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
        let specs: Vec<TensorSpec> = g.iter().map(GenSpec::spec).collect();
        let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
        let (header, offsets, data_len) = encode_header(&specs, &meta)?;
        let data: Vec<Vec<u8>> = g.par_iter().map(|t| t.generate(seed)).collect();
        let mut bytes = header.clone();
        bytes.resize(header.len() + data_len, 0);
        for ((t, d), off) in g.iter().zip(&data).zip(offsets) {
            let at = header.len() + off;
            let dst = bytes
                .get_mut(at..at + d.len())
                .ok_or_else(|| ForgeError::Shape(format!("demo tensor {} does not fit its file", t.name)))?;
            dst.copy_from_slice(d);
            weight_map.insert(t.name.clone(), file.clone());
            total += d.len() as u64;
        }
        fsio::write_file_atomic(&dir.join(&file), &bytes)?;
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join(INDEX_FILE), &index)?;
    }
    Ok(())
}

/// A byte-level BPE tokenizer (320 ids: `<unk>`, `<s>`, `</s>`, the 256 bytes, 61 merges),
/// trained and saved by Hugging Face `tokenizers` (tools/parity/gen_fixtures.py), so the demo
/// models can be calibrated from text (`forge quantize --method gptq --calib FILE`).
const DEMO_TOKENIZER: &str = include_str!("../../testdata/parity/tokenizer/tokenizer.json");

fn write_aux(dir: &Path) -> Result<()> {
    fsio::write_file_atomic(&dir.join("tokenizer.json"), DEMO_TOKENIZER.as_bytes())?;
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::json!({"bos_token_id": 1, "eos_token_id": 2, "do_sample": true, "temperature": 0.6, "top_p": 0.9}),
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"}),
    )?;
    write_json(&dir.join("special_tokens_map.json"), &serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"}))
}

/// A Llama-shaped dense model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaDemo {
    /// `hidden_size`.
    pub hidden: usize,
    /// `intermediate_size`.
    pub intermediate: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_key_value_heads`.
    pub kv_heads: usize,
    /// `vocab_size`.
    pub vocab: usize,
    /// Element type of every tensor (BF16, F16 or F32).
    pub dtype: Dtype,
    /// Approximate shard size (files are cut mid-layer).
    pub shard_bytes: u64,
    /// Seed.
    pub seed: u64,
}

impl Default for LlamaDemo {
    /// 4 layers, hidden 256, intermediate 640, GQA 4/2 heads, vocab 1024, BF16, about 6.6 MB
    /// in three shards.
    fn default() -> Self {
        LlamaDemo {
            hidden: 256,
            intermediate: 640,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            vocab: 1024,
            dtype: Dtype::BF16,
            shard_bytes: 2_500_000,
            seed: 0,
        }
    }
}

/// Writes the Llama-shaped demo model into `dir` (created if needed).
pub fn write_llama_demo(dir: &Path, d: &LlamaDemo) -> Result<()> {
    if d.heads == 0 || d.kv_heads == 0 || !d.hidden.is_multiple_of(d.heads) {
        return Err(ForgeError::Config(format!("hidden {} is not divisible into {} heads", d.hidden, d.heads)));
    }
    if !matches!(d.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
        return Err(ForgeError::Dtype(format!("{} (demo weights are BF16, F16 or F32)", d.dtype)));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let head_dim = d.hidden / d.heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": head_dim,
        "vocab_size": d.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": match d.dtype { Dtype::F32 => "float32", Dtype::F16 => "float16", _ => "bfloat16" },
    });
    write_json(&dir.join("config.json"), &config)?;
    write_aux(dir)?;
    let (h, kv, w) = (d.hidden, d.kv_heads * head_dim, Gen::Weight(d.dtype));
    let mut specs = vec![GenSpec::new("model.embed_tokens.weight", vec![d.vocab, h], w.clone())];
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        specs.push(GenSpec::new(format!("{p}.input_layernorm.weight"), vec![h], Gen::Norm(d.dtype)));
        for (name, rows, cols) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
        ] {
            specs.push(GenSpec::new(format!("{p}.{name}.weight"), vec![rows, cols], w.clone()));
        }
        specs.push(GenSpec::new(format!("{p}.post_attention_layernorm.weight"), vec![h], Gen::Norm(d.dtype)));
        for (name, rows, cols) in [
            ("mlp.gate_proj", d.intermediate, h),
            ("mlp.up_proj", d.intermediate, h),
            ("mlp.down_proj", h, d.intermediate),
        ] {
            specs.push(GenSpec::new(format!("{p}.{name}.weight"), vec![rows, cols], w.clone()));
        }
    }
    specs.push(GenSpec::new("model.norm.weight", vec![h], Gen::Norm(d.dtype)));
    specs.push(GenSpec::new("lm_head.weight", vec![d.vocab, h], w));
    write_shards(dir, specs, d.shard_bytes, d.seed)
}

/// A DeepSeek-V3-shaped MoE with block-scaled FP8 Linear weights.
#[derive(Clone, Debug, PartialEq)]
pub struct DeepSeekDemo {
    /// `hidden_size`.
    pub hidden: usize,
    /// `num_hidden_layers` (the first `first_dense` are dense).
    pub layers: usize,
    /// `first_k_dense_replace`.
    pub first_dense: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `q_lora_rank` (192 makes `q_b_proj` a partial column tile and unfit for group 128).
    pub q_lora: usize,
    /// `kv_lora_rank`.
    pub kv_lora: usize,
    /// `qk_rope_head_dim` (with `kv_lora` it makes `kv_a_proj_with_mqa` a partial row tile).
    pub rope: usize,
    /// `qk_nope_head_dim`.
    pub nope: usize,
    /// `v_head_dim`.
    pub v_dim: usize,
    /// Dense `intermediate_size`.
    pub intermediate: usize,
    /// `moe_intermediate_size`.
    pub moe_intermediate: usize,
    /// `n_routed_experts`.
    pub experts: usize,
    /// `n_shared_experts`.
    pub shared: usize,
    /// `vocab_size`.
    pub vocab: usize,
    /// Approximate shard size.
    pub shard_bytes: u64,
    /// Seed (also scrambles which tensors share a shard).
    pub seed: u64,
}

impl Default for DeepSeekDemo {
    /// 2 layers (one dense, one MoE with 4 routed and 1 shared expert), hidden 256, about
    /// 1.7 MB in five shards, tensors scattered across shards (an FP8 weight and its scales
    /// often in different files).
    fn default() -> Self {
        DeepSeekDemo {
            hidden: 256,
            layers: 2,
            first_dense: 1,
            heads: 2,
            q_lora: 192,
            kv_lora: 128,
            rope: 32,
            nope: 64,
            v_dim: 64,
            intermediate: 384,
            moe_intermediate: 128,
            experts: 4,
            shared: 1,
            vocab: 512,
            shard_bytes: 350_000,
            seed: 1,
        }
    }
}

/// Writes the DeepSeek-shaped demo model into `dir` (created if needed).
pub fn write_deepseek_demo(dir: &Path, d: &DeepSeekDemo) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config = serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "moe_intermediate_size": d.moe_intermediate,
        "num_hidden_layers": d.layers,
        "first_k_dense_replace": d.first_dense,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.heads,
        "q_lora_rank": d.q_lora,
        "kv_lora_rank": d.kv_lora,
        "qk_rope_head_dim": d.rope,
        "qk_nope_head_dim": d.nope,
        "v_head_dim": d.v_dim,
        "n_routed_experts": d.experts,
        "n_shared_experts": d.shared,
        "num_experts_per_tok": 2.min(d.experts),
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": true,
        "routed_scaling_factor": 2.5,
        "vocab_size": d.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [DEFAULT_BLOCK.0, DEFAULT_BLOCK.1],
        },
    });
    write_json(&dir.join("config.json"), &config)?;
    write_aux(dir)?;
    let h = d.hidden;
    let bf16 = Gen::Weight(Dtype::BF16);
    let norm = Gen::Norm(Dtype::BF16);
    let mut specs = vec![GenSpec::new("model.embed_tokens.weight", vec![d.vocab, h], bf16.clone())];
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        specs.push(GenSpec::new(format!("{p}.input_layernorm.weight"), vec![h], norm.clone()));
        specs.push(GenSpec::new(format!("{p}.post_attention_layernorm.weight"), vec![h], norm.clone()));
        specs.push(GenSpec::new(format!("{p}.self_attn.q_a_layernorm.weight"), vec![d.q_lora], norm.clone()));
        specs.push(GenSpec::new(format!("{p}.self_attn.kv_a_layernorm.weight"), vec![d.kv_lora], norm.clone()));
        let qk = d.nope + d.rope;
        let mut linears = vec![
            ("self_attn.q_a_proj".to_string(), d.q_lora, h),
            ("self_attn.q_b_proj".to_string(), d.heads * qk, d.q_lora),
            ("self_attn.kv_a_proj_with_mqa".to_string(), d.kv_lora + d.rope, h),
            ("self_attn.kv_b_proj".to_string(), d.heads * (d.nope + d.v_dim), d.kv_lora),
            ("self_attn.o_proj".to_string(), h, d.heads * d.v_dim),
        ];
        if l < d.first_dense {
            linears.push(("mlp.gate_proj".into(), d.intermediate, h));
            linears.push(("mlp.up_proj".into(), d.intermediate, h));
            linears.push(("mlp.down_proj".into(), h, d.intermediate));
        } else {
            specs.push(GenSpec::new(format!("{p}.mlp.gate.weight"), vec![d.experts, h], bf16.clone()));
            specs.push(GenSpec::new(format!("{p}.mlp.gate.e_score_correction_bias"), vec![d.experts], Gen::Bias));
            for e in 0..d.experts {
                linears.push((format!("mlp.experts.{e}.gate_proj"), d.moe_intermediate, h));
                linears.push((format!("mlp.experts.{e}.up_proj"), d.moe_intermediate, h));
                linears.push((format!("mlp.experts.{e}.down_proj"), h, d.moe_intermediate));
            }
            let si = d.moe_intermediate * d.shared;
            linears.push(("mlp.shared_experts.gate_proj".into(), si, h));
            linears.push(("mlp.shared_experts.up_proj".into(), si, h));
            linears.push(("mlp.shared_experts.down_proj".into(), h, si));
        }
        for (name, rows, cols) in linears {
            specs.extend(GenSpec::fp8(format!("{p}.{name}.weight"), rows, cols));
        }
    }
    specs.push(GenSpec::new("model.norm.weight", vec![h], norm));
    specs.push(GenSpec::new("lm_head.weight", vec![d.vocab, h], bf16));
    // Scatter tensors across shards, as real checkpoints sometimes do.
    specs.sort_by_key(|t| seed_of(&t.name, d.seed));
    write_shards(dir, specs, d.shard_bytes, d.seed)
}

/// Writes a Hessian file `<module>.safetensors` (`hessian` F32 `cols × cols`, metadata
/// `tokens`) for every Linear weight of the model in `model_dir`: `H = 2/n·XᵀX` of `tokens`
/// random correlated inputs (one per input width, reused). With `share_fused`, only the
/// first member (by name) of each fused group (q/k/v, gate/up, ...) gets a file, which the
/// others then share.
pub fn write_demo_hessians(
    model_dir: &Path,
    out_dir: &Path,
    tokens: usize,
    seed: u64,
    share_fused: bool,
) -> Result<()> {
    let model = super::model::ModelDir::open(model_dir)?;
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let mut rng = DemoRng::new(seed);
    let mut seen_groups = std::collections::HashSet::new();
    let mut by_cols: BTreeMap<usize, Array2<f32>> = BTreeMap::new();
    for (name, t) in &model.tensors {
        let Some((_, cols)) = t.info.dims2() else { continue };
        if !classify(name, &t.info.shape).is_linear() || !name.ends_with(".weight") {
            continue;
        }
        let module = module_of(name);
        if share_fused && !seen_groups.insert(fused_group(module)) {
            continue;
        }
        let data = by_cols.entry(cols).or_insert_with(|| {
            let mix = Array2::from_shape_fn((cols, cols), |(i, j)| {
                if i == j {
                    1.0
                } else {
                    0.3 * rng.normal() / (cols as f32).sqrt()
                }
            });
            let z = Array2::from_shape_fn((tokens.max(1), cols), |_| rng.normal());
            let x = z.dot(&mix);
            x.t().dot(&x) * (2.0 / tokens.max(1) as f32)
        });
        super::quant::write_hessian_file(&out_dir.join(format!("{module}.safetensors")), data.view(), tokens as u64)?;
    }
    Ok(())
}
