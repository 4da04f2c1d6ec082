//! Writes the checkpoints `tools/interop/check.py` loads with the real Python libraries
//! (compressed-tensors, transformers, an independent GPTQ unpacker):
//!
//! * `linear/<case>.safetensors`: one Linear (module `layer`) per format × bits × symmetry ×
//!   group size × scale dtype, with `linear/<case>.expected.safetensors` holding our codes,
//!   zero points, stored scales and dequantized weight `(q − qzero)·stored_scale` (f32), and
//!   `linear/cases.json` describing each case (settings, shapes, `quantization_config`);
//! * `llama_ct_w4g32_sym/`, `llama_ct_w3g64_asym/`: tiny Llama models (config.json with a
//!   compressed-tensors `quantization_config`, model.safetensors with quantized q/k/v/o/gate/
//!   up/down and dense embeddings, norms and lm_head), plus `expected.safetensors`;
//! * `llama_gptq_w4g32/`: the same model in GPTQ v1 with `quantize_config.json`;
//! * `forge_demo_ct/`: a whole output directory of `forge quantize` (the library's
//!   `quantize_checkpoint`, default settings: compressed-tensors W4 g128) on the built-in demo
//!   Llama, in several shards with an index, plus `expected.safetensors`: every quantized
//!   module's weight as our reader (`decode_linear`) dequantizes it and every other tensor as
//!   the output holds it.
//!
//! Weights are random but deterministic; grids come from `grid::build_quant_grid` (absmax;
//! per-channel grids from each row's range) and codes from round-to-nearest against the
//! stored scales. `cargo run --release --example interop_fixtures -- --out DIR`.

use clap::Parser;
use fourbit_forge::checkpoint::format::{
    check_runtime_support, decode_linear, dtype_name, encode_linear, quantization_config, quantize_config_file,
    safetensors_dtype, write_json, write_safetensors, CheckpointFormat, LinearQuant, LinearShape, QuantSettings,
    ScaleDtype, TensorOut,
};
use fourbit_forge::grid::build_quant_grid;
use fourbit_forge::numerics::{f32_to_bf16_bits, f32_to_f16_bits, quantize, range_meta, stored_scale, QMetaPacked};
use fourbit_forge::{ForgeError, GridConfig, QuantGrid, Result, ScaleSearch, WeightView};
use ndarray::{Array2, Array3};
use rand::SeedableRng;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(about = "Write interop fixtures for tools/interop/check.py")]
struct Args {
    /// Output directory (created; existing fixtures are overwritten).
    #[arg(long, default_value = "target/interop-fixtures")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args.out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(out: &Path) -> Result<()> {
    let linear_dir = out.join("linear");
    mkdir(&linear_dir)?;
    let mut cases = Vec::new();
    let mut seed = 1u64;
    for format in [CheckpointFormat::CompressedTensors, CheckpointFormat::Gptq, CheckpointFormat::GptqV2] {
        let gptq = format != CheckpointFormat::CompressedTensors;
        let bit_widths: &[u32] = if gptq { &[2, 3, 4, 8] } else { &[2, 3, 4, 5, 6, 7, 8] };
        for &bits in bit_widths {
            for symmetric in [true, false] {
                for group_size in [None, Some(32usize), Some(128)] {
                    seed += 1;
                    let scale_dtype = if gptq {
                        ScaleDtype::F16
                    } else {
                        [ScaleDtype::BF16, ScaleDtype::F16, ScaleDtype::F32][seed as usize % 3]
                    };
                    let s = QuantSettings { format, bits, group_size, symmetric, scale_dtype, act_order: false };
                    // Rows not a multiple of 32/b (zero-point tails) where the layout allows;
                    // per-channel compressed-tensors gets an input tail too.
                    let (rows, cols) = match (gptq, group_size) {
                        (true, _) => (96, 256),
                        (false, None) => (100, 200),
                        (false, Some(_)) => (100, 256),
                    };
                    cases.push(linear_case(&linear_dir, &s, rows, cols, seed)?);
                }
            }
        }
    }
    // A partial last group (GPTQ stores ceil(in / group_size) groups).
    let s = QuantSettings::new(CheckpointFormat::GptqV2, 4, Some(96), false);
    cases.push(linear_case(&linear_dir, &s, 64, 256, 999)?);
    write_json(&linear_dir.join("cases.json"), &Value::Array(cases.clone()))?;
    println!("wrote {} single-Linear cases to {}", cases.len(), linear_dir.display());

    let mut ct4 = QuantSettings::new(CheckpointFormat::CompressedTensors, 4, Some(32), true);
    ct4.scale_dtype = ScaleDtype::BF16;
    llama(&out.join("llama_ct_w4g32_sym"), &ct4, ScaleDtype::BF16, 7)?;
    let mut ct3 = QuantSettings::new(CheckpointFormat::CompressedTensors, 3, Some(64), false);
    ct3.scale_dtype = ScaleDtype::F32;
    llama(&out.join("llama_ct_w3g64_asym"), &ct3, ScaleDtype::F32, 8)?;
    let gptq = QuantSettings::new(CheckpointFormat::Gptq, 4, Some(32), true);
    llama(&out.join("llama_gptq_w4g32"), &gptq, ScaleDtype::F16, 9)?;
    forge_output(out)
}

/// A whole `forge quantize` output directory (demo Llama, default settings, small shards)
/// and the weights our own reader decodes from it.
fn forge_output(out: &Path) -> Result<()> {
    use fourbit_forge::checkpoint::demo::{write_llama_demo, LlamaDemo};
    use fourbit_forge::checkpoint::plan::JobSettings;
    use fourbit_forge::checkpoint::{build_plan, quantize_checkpoint, ModelDir, RunOptions, Silent};
    use std::collections::HashMap;
    let input = out.join("forge_demo_input");
    let dir = out.join("forge_demo_ct");
    for d in [&input, &dir] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|source| ForgeError::Io { path: d.display().to_string(), source })?;
        }
    }
    write_llama_demo(&input, &LlamaDemo::default())?;
    let model = ModelDir::open(&input)?;
    let job = JobSettings { max_shard_size: 2_000_000, ..JobSettings::default() };
    let plan = build_plan(&model, &job)?;
    let settings = plan.format.settings().clone();
    quantize_checkpoint(&model, &plan, &RunOptions::new(dir.clone(), fourbit_forge::Backend::Cpu), &Silent)?;
    // Every tensor of every shard.
    let mut all: HashMap<String, TensorOut> = HashMap::new();
    let mut shards = 0;
    for entry in std::fs::read_dir(&dir).map_err(|source| ForgeError::Io { path: dir.display().to_string(), source })? {
        let path = entry.map_err(|source| ForgeError::Io { path: dir.display().to_string(), source })?.path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        shards += 1;
        let bytes =
            std::fs::read(&path).map_err(|source| ForgeError::Io { path: path.display().to_string(), source })?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ForgeError::Format(e.to_string()))?;
        for (name, t) in st.tensors() {
            let t = tensor(&name, t.dtype(), t.shape(), t.data().to_vec());
            all.insert(name, t);
        }
    }
    let modules: Vec<String> = all
        .keys()
        .filter_map(|k| k.strip_suffix(".weight_packed").map(str::to_string))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut expected = Vec::new();
    for m in &modules {
        let own: HashMap<String, TensorOut> =
            all.iter().filter(|(k, _)| k.starts_with(&format!("{m}."))).map(|(k, v)| (k.clone(), v.clone())).collect();
        let dec = decode_linear(&settings, m, &own)?;
        expected.push(f32_tensor(&format!("{m}.weight"), &dec.dequant));
    }
    let mut dense: Vec<&TensorOut> =
        all.values().filter(|t| !modules.iter().any(|m| t.name.starts_with(&format!("{m}.")))).collect();
    dense.sort_by(|a, b| a.name.cmp(&b.name));
    expected.extend(dense.into_iter().cloned());
    write_safetensors(&dir.join("expected.safetensors"), &expected, None)?;
    println!(
        "wrote {} (forge quantize on the demo Llama: {} quantized modules, {} shards)",
        dir.display(),
        modules.len(),
        shards
    );
    Ok(())
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|source| ForgeError::Io { path: p.display().to_string(), source })
}

/// Standard-normal weights with a few larger columns (outliers), deterministic in `seed`.
fn weights(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    use rand::Rng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = Array2::from_shape_simple_fn((rows, cols), || rng.sample::<f32, _>(rand_distr::StandardNormal) * 0.05);
    for c in (0..cols).step_by(37) {
        w.column_mut(c).mapv_inplace(|x| x * 4.0);
    }
    w
}

/// Grid (absmax) and round-to-nearest codes against the stored scales.
fn rtn(w: &Array2<f32>, s: &QuantSettings) -> Result<(QuantGrid, Array2<u8>)> {
    let (rows, cols) = w.dim();
    let grid = match s.group_size {
        Some(gs) => build_quant_grid(
            WeightView::F32(w.view()),
            &GridConfig {
                group_size: gs,
                bits: s.bits,
                symmetric: s.symmetric,
                scale_search: ScaleSearch::Absmax,
                scale_dtype: s.scale_dtype,
            },
        )?,
        None => {
            // One group per row: the grid builder's groups are at most 1024 columns.
            let mut qmeta = Array3::<u8>::zeros((rows, 1, 4));
            for (r, row) in w.outer_iter().enumerate() {
                let (lo, hi) = row.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
                let m = range_meta(lo, hi, s.maxq() as f32, s.symmetric);
                for (k, b) in QMetaPacked::encode(m.scale, m.qzero, s.symmetric).to_bytes().into_iter().enumerate() {
                    qmeta[[r, 0, k]] = b;
                }
            }
            QuantGrid { qmeta, maxq: s.maxq(), pad: 0, group_size: cols, scale_dtype: s.scale_dtype }
        }
    };
    let maxq = s.maxq() as f32;
    let mut codes = Array2::<u8>::zeros((rows, cols));
    for ((r, c), q) in codes.indexed_iter_mut() {
        let m = grid.meta(r, c / grid.group_size)?;
        *q = quantize(w[[r, c]], stored_scale(m.log2_scale_q88, s.scale_dtype), m.qzero_f32(), maxq) as u8;
    }
    Ok((grid, codes))
}

fn case_id(s: &QuantSettings, rows: usize, cols: usize) -> String {
    let gs = s.group_size.map_or("ch".to_string(), |g| format!("g{g}"));
    let sym = if s.symmetric { "sym" } else { "asym" };
    format!("{}_w{}_{gs}_{sym}_{}_{rows}x{cols}", s.format.name(), s.bits, dtype_name(s.scale_dtype))
}

fn linear_case(dir: &Path, s: &QuantSettings, rows: usize, cols: usize, seed: u64) -> Result<Value> {
    let id = case_id(s, rows, cols);
    // GPTQ v1 cannot store a zero point of 0 (it stores zero − 1; `encode_linear` refuses it,
    // see tests/pack_formats.rs). Where a group's minimum is near 0 the asymmetric grid has
    // one, so v1 retries draw weights shifted below zero until no group does.
    let mut attempt = 0;
    let (codes, tensors) = loop {
        let w = weights(rows, cols, seed + 1000 * attempt);
        let w = if attempt == 0 { w } else { w.mapv(|x| x.min(0.1) - 0.05) };
        let (grid, codes) = rtn(&w, s)?;
        match encode_linear(s, "layer", &LinearQuant { codes: codes.view(), grid: &grid }) {
            Err(ForgeError::Format(m)) if m.contains("zero point 0") && attempt < 50 => attempt += 1,
            other => break (codes, other?),
        }
    };
    debug_assert_eq!(codes.dim(), (rows, cols));
    // The expectation is what our reader decodes: it equals (q − qzero)·stored_scale (tests).
    let dec = decode_linear(s, "layer", &tensors)?;
    write_safetensors(&dir.join(format!("{id}.safetensors")), &tensors, None)?;
    let expected = vec![
        tensor("codes", Dtype::U8, &[rows, cols], dec.codes.iter().copied().collect()),
        tensor(
            "zeros",
            Dtype::U16,
            &[rows, dec.zeros.ncols()],
            dec.zeros.iter().flat_map(|z| z.to_le_bytes()).collect(),
        ),
        f32_tensor("scales", &dec.scales),
        f32_tensor("dequant", &dec.dequant),
    ];
    write_safetensors(&dir.join(format!("{id}.expected.safetensors")), &expected, None)?;
    Ok(json!({
        "id": id,
        "format": s.format.name(),
        "bits": s.bits,
        "group_size": s.group_size,
        "symmetric": s.symmetric,
        "scale_dtype": dtype_name(s.scale_dtype),
        "rows": rows,
        "cols": cols,
        "module": "layer",
        "file": format!("{id}.safetensors"),
        "expected": format!("{id}.expected.safetensors"),
        "quantization_config": quantization_config(s, &[])?,
    }))
}

fn tensor(name: &str, dtype: Dtype, shape: &[usize], data: Vec<u8>) -> TensorOut {
    TensorOut { name: name.to_string(), dtype, shape: shape.to_vec(), data }
}

fn f32_tensor(name: &str, a: &Array2<f32>) -> TensorOut {
    tensor(name, Dtype::F32, &[a.nrows(), a.ncols()], a.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// A dense tensor in the model dtype.
fn dense(name: &str, a: &Array2<f32>, dtype: ScaleDtype) -> TensorOut {
    let data = match dtype {
        ScaleDtype::F32 => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ScaleDtype::F16 => a.iter().flat_map(|&v| f32_to_f16_bits(v).to_le_bytes()).collect(),
        ScaleDtype::BF16 => a.iter().flat_map(|&v| f32_to_bf16_bits(v).to_le_bytes()).collect(),
    };
    let shape = if a.nrows() == 1 { vec![a.ncols()] } else { vec![a.nrows(), a.ncols()] };
    TensorOut { name: name.to_string(), dtype: safetensors_dtype(dtype), shape, data }
}

const HIDDEN: usize = 64;
const INTER: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const VOCAB: usize = 128;

/// A tiny Llama in `s`'s format; unquantized tensors and the model run in `model_dtype`.
fn llama(dir: &Path, s: &QuantSettings, model_dtype: ScaleDtype, seed: u64) -> Result<()> {
    mkdir(dir)?;
    let mut tensors = Vec::new();
    let mut expected = Vec::new();
    let mut shapes = Vec::new();
    let mut seed = seed * 1000;
    let mut next = || {
        seed += 1;
        seed
    };
    let mut add_dense = |name: &str, rows: usize, cols: usize, base: f32, seed: u64| {
        let w = weights(rows, cols, seed).mapv(|x| base + x);
        tensors.push(dense(name, &w, model_dtype));
        expected.push(dense(name, &w, model_dtype));
    };
    add_dense("model.embed_tokens.weight", VOCAB, HIDDEN, 0.0, next());
    add_dense("lm_head.weight", VOCAB, HIDDEN, 0.0, next());
    add_dense("model.norm.weight", 1, HIDDEN, 1.0, next());
    for l in 0..LAYERS {
        add_dense(&format!("model.layers.{l}.input_layernorm.weight"), 1, HIDDEN, 1.0, next());
        add_dense(&format!("model.layers.{l}.post_attention_layernorm.weight"), 1, HIDDEN, 1.0, next());
    }
    for l in 0..LAYERS {
        for (leaf, rows, cols) in [
            ("self_attn.q_proj", HEADS * HEAD_DIM, HIDDEN),
            ("self_attn.k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
            ("self_attn.v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HEADS * HEAD_DIM),
            ("mlp.gate_proj", INTER, HIDDEN),
            ("mlp.up_proj", INTER, HIDDEN),
            ("mlp.down_proj", HIDDEN, INTER),
        ] {
            let module = format!("model.layers.{l}.{leaf}");
            let w = weights(rows, cols, next());
            let (grid, codes) = rtn(&w, s)?;
            let written = encode_linear(s, &module, &LinearQuant { codes: codes.view(), grid: &grid })?;
            let dec = decode_linear(s, &module, &written)?;
            tensors.extend(written);
            expected.push(f32_tensor(&format!("{module}.weight"), &dec.dequant));
            shapes.push(LinearShape { name: module, out_features: rows, in_features: cols, quantized: true });
        }
    }
    let ignore = vec!["lm_head".to_string()];
    let qcfg = quantization_config(s, &ignore)?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": dtype_name(model_dtype),
        "quantization_config": qcfg,
    });
    write_safetensors(
        &dir.join("model.safetensors"),
        &tensors,
        Some([("format".to_string(), "pt".to_string())].into_iter().collect()),
    )?;
    write_safetensors(&dir.join("expected.safetensors"), &expected, None)?;
    write_json(&dir.join("config.json"), &config)?;
    if let Some((name, file)) = quantize_config_file(s, &ignore)? {
        write_json(&dir.join(name), &file)?;
    }
    let issues = check_runtime_support(s, &shapes);
    println!("wrote {} ({} tensors); vLLM notes: {}", dir.display(), tensors.len(), issues.len());
    for i in issues.iter().filter(|i| i.module.is_none()) {
        println!("  {i}");
    }
    Ok(())
}
