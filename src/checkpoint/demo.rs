//! Small checkpoints generated deterministically, for the built-in demo of `forge quantize`
//! and for the tests: a Llama-shaped dense model (BF16) and a DeepSeek-V3-shaped MoE with
//! block-scaled FP8 weights (`weight_scale_inv`, partial edge tiles), both sharded with an
//! index at boundaries that do not follow the layers, plus Hessian files for GPTQ.

use super::fp8::{quantize_fp8_blocks, DEFAULT_BLOCK};
use super::model::INDEX_FILE;
use super::select::{classify, fused_group, module_of};
use super::st::{encode_header, TensorSpec};
use crate::{ForgeError, Result};
use ndarray::Array2;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::io::Write;
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

    /// A weight matrix like a trained one: `std/sqrt(cols)`-scaled, a few outlier input
    /// channels (×6) and rare large elements (×8), so quantization has something to do.
    pub fn weight(&mut self, rows: usize, cols: usize) -> Array2<f32> {
        let scale = 1.0 / (cols as f32).sqrt();
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

/// A tensor to write: spec and bytes.
struct Tensor {
    spec: TensorSpec,
    data: Vec<u8>,
}

fn bf16_tensor(name: &str, a: &Array2<f32>) -> Tensor {
    let data = a.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect();
    Tensor { spec: TensorSpec::new(name, Dtype::BF16, a.shape().to_vec()), data }
}

fn typed_tensor(name: &str, a: &Array2<f32>, dtype: Dtype) -> Tensor {
    match dtype {
        Dtype::F32 => {
            let data = a.iter().flat_map(|v| v.to_le_bytes()).collect();
            Tensor { spec: TensorSpec::new(name, Dtype::F32, a.shape().to_vec()), data }
        }
        Dtype::F16 => {
            let data = a.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect();
            Tensor { spec: TensorSpec::new(name, Dtype::F16, a.shape().to_vec()), data }
        }
        _ => bf16_tensor(name, a),
    }
}

fn norm_tensor(name: &str, n: usize, rng: &mut DemoRng, dtype: Dtype) -> Tensor {
    let a = Array2::from_shape_fn((1, n), |_| 1.0 + 0.1 * rng.normal());
    let mut t = typed_tensor(name, &a, dtype);
    t.spec.shape = vec![n];
    t
}

fn fp8_tensors(name: &str, w: &Array2<f32>) -> [Tensor; 2] {
    let (q, s) = quantize_fp8_blocks(w, DEFAULT_BLOCK);
    let module = module_of(name);
    [
        Tensor { spec: TensorSpec::new(name, Dtype::F8_E4M3, w.shape().to_vec()), data: q },
        Tensor {
            spec: TensorSpec::new(format!("{module}.weight_scale_inv"), Dtype::F32, s.shape().to_vec()),
            data: s.iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
    ]
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ForgeError + '_ {
    move |source| ForgeError::Io { path: path.display().to_string(), source }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-demo");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_vec_pretty(v).map_err(|e| ForgeError::Config(e.to_string()))?;
    s.push(b'\n');
    write_atomic(path, &s)
}

/// Writes `tensors` as shards of about `shard_bytes` (a new file once a file reaches it),
/// in the order given, with an index when there is more than one file.
fn write_shards(dir: &Path, tensors: Vec<Tensor>, shard_bytes: u64) -> Result<Vec<String>> {
    let mut groups: Vec<Vec<Tensor>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in tensors {
        if size >= shard_bytes {
            groups.push(Vec::new());
            size = 0;
        }
        size += t.data.len() as u64;
        if let Some(g) = groups.last_mut() {
            g.push(t);
        }
    }
    let n = groups.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    let mut names = Vec::new();
    for (i, g) in groups.into_iter().enumerate() {
        let file =
            if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
        let specs: Vec<TensorSpec> = g.iter().map(|t| t.spec.clone()).collect();
        let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
        let (header, offsets, data_len) = encode_header(&specs, &meta)?;
        let mut bytes = header.clone();
        bytes.resize(header.len() + data_len, 0);
        for (t, off) in g.iter().zip(offsets) {
            let at = header.len() + off;
            bytes[at..at + t.data.len()].copy_from_slice(&t.data);
            weight_map.insert(t.spec.name.clone(), file.clone());
            total += t.data.len() as u64;
        }
        write_atomic(&dir.join(&file), &bytes)?;
        names.push(file);
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join(INDEX_FILE), &index)?;
    }
    Ok(names)
}

fn write_aux(dir: &Path) -> Result<()> {
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
    /// 4 layers, hidden 256, intermediate 640, GQA 4/2 heads, vocab 1024, BF16, about 7 MB
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
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if d.heads == 0 || d.kv_heads == 0 || !d.hidden.is_multiple_of(d.heads) {
        return Err(ForgeError::Config(format!("hidden {} is not divisible into {} heads", d.hidden, d.heads)));
    }
    let head_dim = d.hidden / d.heads;
    let mut rng = DemoRng::new(d.seed);
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
    let mut tensors = Vec::new();
    let (h, kv) = (d.hidden, d.kv_heads * head_dim);
    tensors.push(typed_tensor("model.embed_tokens.weight", &rng.weight(d.vocab, h), d.dtype));
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        tensors.push(norm_tensor(&format!("{p}.input_layernorm.weight"), h, &mut rng, d.dtype));
        for (name, rows, cols) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
        ] {
            tensors.push(typed_tensor(&format!("{p}.{name}.weight"), &rng.weight(rows, cols), d.dtype));
        }
        tensors.push(norm_tensor(&format!("{p}.post_attention_layernorm.weight"), h, &mut rng, d.dtype));
        for (name, rows, cols) in [
            ("mlp.gate_proj", d.intermediate, h),
            ("mlp.up_proj", d.intermediate, h),
            ("mlp.down_proj", h, d.intermediate),
        ] {
            tensors.push(typed_tensor(&format!("{p}.{name}.weight"), &rng.weight(rows, cols), d.dtype));
        }
    }
    tensors.push(norm_tensor("model.norm.weight", h, &mut rng, d.dtype));
    tensors.push(typed_tensor("lm_head.weight", &rng.weight(d.vocab, h), d.dtype));
    write_shards(dir, tensors, d.shard_bytes)?;
    Ok(())
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
    /// 1.6 MB in five shards, tensors scattered across shards (an FP8 weight and its scales
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
    let mut rng = DemoRng::new(d.seed);
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
    let mut tensors = Vec::new();
    tensors.push(bf16_tensor("model.embed_tokens.weight", &rng.weight(d.vocab, h)));
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        tensors.push(norm_tensor(&format!("{p}.input_layernorm.weight"), h, &mut rng, Dtype::BF16));
        tensors.push(norm_tensor(&format!("{p}.post_attention_layernorm.weight"), h, &mut rng, Dtype::BF16));
        tensors.push(norm_tensor(&format!("{p}.self_attn.q_a_layernorm.weight"), d.q_lora, &mut rng, Dtype::BF16));
        tensors.push(norm_tensor(&format!("{p}.self_attn.kv_a_layernorm.weight"), d.kv_lora, &mut rng, Dtype::BF16));
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
            tensors.push(bf16_tensor(&format!("{p}.mlp.gate.weight"), &rng.weight(d.experts, h)));
            let bias = Array2::from_shape_fn((1, d.experts), |_| 0.01 * rng.normal());
            let mut b = typed_tensor(&format!("{p}.mlp.gate.e_score_correction_bias"), &bias, Dtype::F32);
            b.spec.shape = vec![d.experts];
            tensors.push(b);
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
            tensors.extend(fp8_tensors(&format!("{p}.{name}.weight"), &rng.weight(rows, cols)));
        }
    }
    tensors.push(norm_tensor("model.norm.weight", h, &mut rng, Dtype::BF16));
    tensors.push(bf16_tensor("lm_head.weight", &rng.weight(d.vocab, h)));
    // Scatter tensors across shards, as real checkpoints sometimes do.
    let seed = d.seed;
    tensors.sort_by_key(|t| xxhash_rust::xxh3::xxh3_64_with_seed(t.spec.name.as_bytes(), seed));
    write_shards(dir, tensors, d.shard_bytes)?;
    Ok(())
}

/// Writes a Hessian file `<module>.safetensors` (`hessian` F32 `cols × cols`, metadata
/// `tokens`) for every Linear weight of the model in `model_dir` that is 2-D: `H = 2/n·XᵀX`
/// of `tokens` random correlated inputs. With `share_fused`, only the first member of each
/// fused group (q/k/v, gate/up, ...) gets a file, which the others then share.
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
        // One Hessian per input width, reused: the tests only need valid inputs.
        let hm = by_cols
            .entry(cols)
            .or_insert_with(|| {
                let mix = Array2::from_shape_fn((cols, cols), |(i, j)| {
                    if i == j {
                        1.0
                    } else {
                        0.3 * rng.normal() / (cols as f32).sqrt()
                    }
                });
                let z = Array2::from_shape_fn((tokens, cols), |_| rng.normal());
                let x = z.dot(&mix);
                x.t().dot(&x) * (2.0 / tokens as f32)
            })
            .clone();
        let data: Vec<u8> = hm.iter().flat_map(|v| v.to_le_bytes()).collect();
        let spec = TensorSpec::new("hessian", Dtype::F32, vec![cols, cols]);
        let meta = [("tokens".to_string(), tokens.to_string())].into_iter().collect();
        let (header, _, _) = encode_header(std::slice::from_ref(&spec), &meta)?;
        let mut bytes = header;
        bytes.extend_from_slice(&data);
        write_atomic(&out_dir.join(format!("{module}.safetensors")), &bytes)?;
    }
    Ok(())
}
