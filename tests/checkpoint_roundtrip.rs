//! Whole checkpoints through the engine on the CPU, re-read with the `safetensors` crate and
//! checked tensor by tensor: quantized weights dequantize to exactly what the library's
//! quantizer returns for the same input, everything else is byte-identical (FP8 weights
//! kept in full precision: BF16 of the reference dequantization).

mod ckpt_util;

use ckpt_util::{dequant_ct, dir_files, read_all, run};
use fourbit_forge::calib::{quantize_experts, quantize_with, ExpertInput, PreparedFactor};
use fourbit_forge::checkpoint::demo::{
    write_deepseek_demo, write_demo_hessians, write_llama_demo, DeepSeekDemo, LlamaDemo,
};
use fourbit_forge::checkpoint::format::{
    decode_linear, expected_dequant, CheckpointFormat, LinearQuant, QuantSettings, ScaleDtype, TensorOut,
};
use fourbit_forge::checkpoint::fp8::{dequantize_fp8_blocks, BlockScales};
use fourbit_forge::checkpoint::plan::{GptqSettings, JobSettings, Method};
use fourbit_forge::checkpoint::select::{classify, module_of};
use fourbit_forge::checkpoint::ModelDir;
use fourbit_forge::hessian::PreStepConfig;
use fourbit_forge::numerics::{quantize, stored_scale};
use fourbit_forge::{Backend, GridConfig, MseSearch, Quantizer, ScaleSearch, WeightView};
use ndarray::{Array2, ArrayView2};
use std::collections::{BTreeMap, HashMap};

/// The input weight of `name` as f32 (FP8 through the reference dequantization).
fn input_f32(model: &ModelDir, name: &str) -> Array2<f32> {
    let t = model.tensor(name).unwrap();
    let (r, c) = t.info.dims2().unwrap();
    let b = model.bytes(t).unwrap();
    match t.info.dtype.to_string().as_str() {
        "BF16" => Array2::from_shape_fn((r, c), |(i, j)| {
            let k = 2 * (i * c + j);
            half::bf16::from_bits(u16::from_le_bytes([b[k], b[k + 1]])).to_f32()
        }),
        "F8_E4M3" => {
            let s = model.tensor(&format!("{}.weight_scale_inv", module_of(name))).unwrap();
            let scales =
                BlockScales { bytes: model.bytes(s).unwrap(), dtype: s.info.dtype, shape: s.info.dims2().unwrap() };
            dequantize_fp8_blocks(b, r, c, scales, (128, 128)).unwrap()
        }
        other => panic!("unexpected dtype {other}"),
    }
}

/// Round-to-nearest references with scales stored in `scale`: the library's own GPTQ path
/// with `U = I`, checked against an independent computation (the library's grid, each element
/// quantized against the stored scale, the dequantized weight as issue 12's `expected_dequant`
/// defines it).
fn reference_rtn(config: &GridConfig, scale: ScaleDtype, w: ArrayView2<'_, f32>) -> (Vec<u8>, Vec<f32>) {
    let config = GridConfig { scale_dtype: scale, ..config.clone() };
    let q = Quantizer::new(config.clone(), Backend::Cpu);
    let f = PreparedFactor::no_tokens(w.ncols()).unwrap();
    let l = quantize_with(&q, &f, WeightView::F32(w)).unwrap();
    let grid = q.build_quant_grid(WeightView::F32(w)).unwrap();
    let codes = Array2::from_shape_fn(w.dim(), |(r, c)| {
        let m = grid.meta(r, c / config.group_size);
        quantize(w[[r, c]], stored_scale(m.log2_scale_q88, scale), m.qzero_f32(), grid.maxq as f32) as u8
    });
    let mut settings =
        QuantSettings::new(CheckpointFormat::CompressedTensors, config.bits, Some(config.group_size), config.symmetric);
    settings.scale_dtype = scale;
    let deq = expected_dequant(&settings, &LinearQuant { codes: codes.view(), grid: &grid }).unwrap();
    assert_eq!(l.codes, codes, "the solver with U = I is round-to-nearest at the stored scale");
    assert!(l.dequant().iter().zip(deq.iter()).all(|(a, b)| a.to_bits() == b.to_bits()));
    (codes.iter().copied().collect(), deq.iter().copied().collect())
}

/// Issue 12's settings for a job's output.
fn format_settings(job: &JobSettings) -> QuantSettings {
    let format = CheckpointFormat::parse(&job.format).unwrap();
    let mut s = QuantSettings::new(format, job.grid.bits, Some(job.grid.group_size), job.grid.symmetric);
    if let Some(d) = job.scale_dtype {
        s.scale_dtype = d;
    }
    s
}

/// A module's tensors as issue 12's reader takes them.
fn module_tensors(out: &BTreeMap<String, ckpt_util::Read>, module: &str) -> HashMap<String, TensorOut> {
    out.iter()
        .filter(|(n, _)| n.starts_with(&format!("{module}.")))
        .map(|(n, r)| {
            let dtype = fourbit_forge::checkpoint::st::parse_dtype(&r.dtype).unwrap();
            (n.clone(), TensorOut { name: n.clone(), dtype, shape: r.shape.clone(), data: r.data.clone() })
        })
        .collect()
}

fn check_rtn_model(model_dir: &std::path::Path, out_dir: &std::path::Path, settings: &JobSettings) -> usize {
    let report = run(model_dir, out_dir, settings).unwrap();
    let model = ModelDir::open(model_dir).unwrap();
    let out = read_all(out_dir);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("config.json")).unwrap()).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    let ignore: Vec<String> =
        qc["ignore"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert!(ignore.contains(&"lm_head".to_string()));
    let (bits, gs) = (settings.grid.bits, settings.grid.group_size);
    let mut quantized = 0;
    for (name, t) in &model.tensors {
        let kind = classify(name, &t.info.shape);
        let module = module_of(name);
        if name.ends_with(".weight_scale_inv") {
            assert!(!out.contains_key(name.as_str()), "{name}: FP8 scales must not be written");
            continue;
        }
        if out.contains_key(&format!("{module}.weight_packed")) {
            assert!(kind.is_linear(), "{name} ({kind:?}) must never be quantized");
            assert!(!out.contains_key(name.as_str()));
            assert!(!ignore.contains(&module.to_string()));
            let w = input_f32(&model, name);
            let (codes, deq, dims) = dequant_ct(&out, module, bits, gs);
            assert_eq!(dims, w.dim());
            let scale = settings.scale_dtype.unwrap_or(ScaleDtype::BF16);
            let (ref_codes, ref_deq) = reference_rtn(&settings.grid, scale, w.view());
            assert_eq!(codes, ref_codes, "{module}: codes differ from the quantizer's");
            assert!(
                deq.iter().zip(&ref_deq).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{module}: dequantized checkpoint differs from the quantizer's dequantized weight"
            );
            // Issue 12's reader agrees with the independent unpacker.
            let decoded = decode_linear(&format_settings(settings), module, &module_tensors(&out, module)).unwrap();
            assert_eq!(decoded.codes.iter().copied().collect::<Vec<_>>(), codes, "{module}");
            quantized += 1;
            continue;
        }
        let got = &out[name.as_str()];
        if t.info.dtype.to_string() == "F8_E4M3" {
            // Kept in full precision: BF16 of the reference dequantization, listed in ignore.
            assert_eq!(got.dtype, "BF16");
            assert!(ignore.contains(&module.to_string()), "{module} kept but not in the ignore list");
            let w = input_f32(&model, name);
            let want: Vec<u8> = w.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect();
            assert_eq!(got.data, want, "{name}");
            continue;
        }
        assert_eq!(got.dtype, t.info.dtype.to_string(), "{name}");
        assert_eq!(got.shape, t.info.shape, "{name}");
        assert_eq!(got.data, model.bytes(t).unwrap(), "{name} must be copied bit for bit");
        if kind.is_linear() {
            assert!(ignore.contains(&module.to_string()), "{module} kept but not in the ignore list");
        }
    }
    // Auxiliary files copied unchanged; the summary lists every quantized module.
    let out_files = dir_files(out_dir);
    for f in &model.aux_files {
        assert_eq!(out_files[f], std::fs::read(model_dir.join(f)).unwrap(), "{f}");
    }
    let tensors = report.summary["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), quantized);
    for s in out_files.keys().filter(|f| f.ends_with(".safetensors")) {
        let size = std::fs::metadata(out_dir.join(s)).unwrap().len();
        assert!(size <= settings.max_shard_size + 4096, "{s} is {size} bytes");
    }
    quantized
}

#[test]
fn dense_llama_rtn_sharded_roundtrip() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("llama");
    // 704 = 5.5 groups of 128: down_proj does not fit and stays BF16.
    write_llama_demo(&model, &LlamaDemo { intermediate: 704, shard_bytes: 900_000, layers: 3, ..LlamaDemo::default() })
        .unwrap();
    let settings =
        JobSettings { max_shard_size: 600_000, scale_dtype: Some(ScaleDtype::F32), ..JobSettings::default() };
    let out = tmp.path().join("out");
    let n = check_rtn_model(&model, &out, &settings);
    assert_eq!(n, 3 * 6, "q/k/v/o/gate/up of every layer; down_proj does not fit");
    let files = dir_files(&out);
    assert!(files.keys().filter(|f| f.ends_with(".safetensors")).count() > 1, "output must be sharded");
    assert!(!tmp.path().join(".out.forge-partial").exists(), "no temporary directory left");
}

#[test]
fn dense_llama_mse_grid_three_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("llama");
    write_llama_demo(&model, &LlamaDemo { layers: 1, ..LlamaDemo::default() }).unwrap();
    let grid = GridConfig {
        bits: 3,
        group_size: 64,
        scale_search: ScaleSearch::Mse(MseSearch::default()),
        ..GridConfig::default()
    };
    let settings = JobSettings { grid, ..JobSettings::default() };
    assert_eq!(check_rtn_model(&model, &tmp.path().join("out"), &settings), 7);
}

#[test]
fn deepseek_fp8_moe_rtn_roundtrip() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("ds");
    write_deepseek_demo(&model_dir, &DeepSeekDemo::default()).unwrap();
    let model = ModelDir::open(&model_dir).unwrap();
    // The demo scatters tensors: some FP8 weight and its scales live in different shards.
    let split = model.tensors.iter().any(|(n, t)| {
        n.ends_with(".weight_scale_inv")
            && model.tensor(&format!("{}.weight", n.trim_end_matches(".weight_scale_inv"))).unwrap().shard != t.shard
    });
    assert!(split && model.shards.len() > 2);
    let settings = JobSettings { max_shard_size: 300_000, ..JobSettings::default() };
    let out = tmp.path().join("out");
    let n = check_rtn_model(&model_dir, &out, &settings);
    // Per layer: q_a, kv_a, kv_b, o (q_b has 192 input columns: kept); dense MLP 3;
    // MoE: 4 experts × 3 + shared 3.
    assert_eq!(n, 4 + 3 + 4 + 12 + 3);
    let read = read_all(&out);
    for l in 0..2 {
        assert_eq!(read[&format!("model.layers.{l}.self_attn.q_b_proj.weight")].dtype, "BF16");
    }
    assert_eq!(read["model.layers.1.mlp.gate.weight"].dtype, "BF16");
    assert_eq!(read["model.layers.1.mlp.gate.e_score_correction_bias"].dtype, "F32");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert!(config["quantization_config"]["ignore"].as_array().unwrap().iter().any(|v| v == "model.layers.1.mlp.gate"));
}

#[test]
fn dense_llama_gptq_with_shared_hessians() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("llama");
    write_llama_demo(&model_dir, &LlamaDemo { layers: 2, ..LlamaDemo::default() }).unwrap();
    let hess = tmp.path().join("hess");
    write_demo_hessians(&model_dir, &hess, 300, 7, true).unwrap();
    // One file per fused group (its first member by name: k_proj, gate_proj), shared.
    assert!(hess.join("model.layers.0.self_attn.k_proj.safetensors").exists());
    assert!(!hess.join("model.layers.0.self_attn.q_proj.safetensors").exists());
    assert!(!hess.join("model.layers.0.mlp.up_proj.safetensors").exists());
    let pre_step = PreStepConfig { rel_damp: 0.01, act_order: true };
    // GPTQ solves against the scales as stored, so with f32 scales and with the format's
    // default (bf16) the checkpoint dequantizes to exactly the weights GPTQ compensated.
    for (scale_dtype, stored) in [(Some(ScaleDtype::F32), ScaleDtype::F32), (None, ScaleDtype::BF16)] {
        let settings = JobSettings {
            method: Method::Gptq(GptqSettings {
                hessians: hess.clone(),
                pre_step: pre_step.clone(),
                allow_missing: false,
            }),
            scale_dtype,
            ..JobSettings::default()
        };
        let out = tmp.path().join(format!("out-{stored:?}"));
        let report = run(&model_dir, &out, &settings).unwrap();
        let model = ModelDir::open(&model_dir).unwrap();
        let read = read_all(&out);
        let mut checked = 0;
        for (name, t) in &model.tensors {
            let module = module_of(name);
            if !read.contains_key(&format!("{module}.weight_packed")) {
                continue;
            }
            let (parent, last) = module.rsplit_once('.').unwrap();
            let siblings: &[&str] = match last {
                "q_proj" | "k_proj" | "v_proj" => &["k_proj", "q_proj", "v_proj"],
                "gate_proj" | "up_proj" => &["gate_proj", "up_proj"],
                _ => &[last],
            };
            let first = siblings
                .iter()
                .map(|s| format!("{parent}.{s}"))
                .find(|m| hess.join(format!("{m}.safetensors")).exists())
                .unwrap();
            let hfile =
                fourbit_forge::checkpoint::st::SafetensorsFile::open(&hess.join(format!("{first}.safetensors")))
                    .unwrap();
            let ht = hfile.tensor("hessian").unwrap();
            let hb = hfile.bytes(ht).unwrap();
            let c = t.info.dims2().unwrap().1;
            let h = Array2::from_shape_vec(
                (c, c),
                hb.chunks_exact(4).map(|x| f32::from_le_bytes(x.try_into().unwrap())).collect(),
            )
            .unwrap();
            let w = input_f32(&model, name);
            let want = quantize_experts(
                &Backend::Cpu,
                &GridConfig { scale_dtype: stored, ..settings.grid.clone() },
                &pre_step,
                &[ExpertInput::single(WeightView::F32(w.view()), Some(h.view()))],
            )
            .unwrap();
            let (codes, deq, _) = dequant_ct(&read, module, 4, 128);
            let l = &want[0][0];
            assert_eq!(codes, l.codes.iter().copied().collect::<Vec<_>>(), "{module}");
            assert!(deq.iter().zip(l.dequant().iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{module}");
            checked += 1;
        }
        assert_eq!(checked, 2 * 7);
        let tensors = report.summary["tensors"].as_array().unwrap();
        assert!(tensors.iter().all(|t| t["method"] == "gptq" && t["gptq_loss"].as_f64().unwrap() > 0.0));
        let scales = &read["model.layers.0.mlp.down_proj.weight_scale"];
        assert_eq!(scales.dtype, if stored == ScaleDtype::F32 { "F32" } else { "BF16" });
    }
}

#[test]
fn gptq_without_hessian_is_refused_or_flagged() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("llama");
    write_llama_demo(&model_dir, &LlamaDemo { layers: 1, ..LlamaDemo::default() }).unwrap();
    let hess = tmp.path().join("hess");
    std::fs::create_dir(&hess).unwrap();
    let gptq = |allow_missing| JobSettings {
        method: Method::Gptq(GptqSettings {
            hessians: hess.clone(),
            pre_step: PreStepConfig::default(),
            allow_missing,
        }),
        ..JobSettings::default()
    };
    let model = ModelDir::open(&model_dir).unwrap();
    let err = fourbit_forge::checkpoint::build_plan(&model, &gptq(false)).unwrap_err();
    assert!(err.to_string().contains("no Hessian for model.layers.0"), "{err}");
    let report = run(&model_dir, &tmp.path().join("out"), &gptq(true)).unwrap();
    let methods: BTreeMap<String, String> = report.summary["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["module"].as_str().unwrap().to_string(), t["method"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(methods.len(), 7);
    assert!(methods.values().all(|m| m == "rtn (no hessian)"));
}

#[test]
fn dense_llama_gptq_format_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("llama");
    write_llama_demo(&model_dir, &LlamaDemo { layers: 1, ..LlamaDemo::default() }).unwrap();
    let settings = JobSettings { format: "gptq".into(), ..JobSettings::default() };
    let out = tmp.path().join("out");
    run(&model_dir, &out, &settings).unwrap();
    let read = read_all(&out);
    let model = ModelDir::open(&model_dir).unwrap();
    let fs = format_settings(&settings);
    assert_eq!(fs.scale_dtype, ScaleDtype::F16);
    let mut n = 0;
    for (name, t) in &model.tensors {
        let module = module_of(name);
        if !read.contains_key(&format!("{module}.qweight")) {
            continue;
        }
        let w = input_f32(&model, name);
        let (codes, deq) = reference_rtn(&settings.grid, ScaleDtype::F16, w.view());
        let decoded = decode_linear(&fs, module, &module_tensors(&read, module)).unwrap();
        assert_eq!(decoded.codes.iter().copied().collect::<Vec<_>>(), codes, "{module}");
        assert!(decoded.dequant.iter().zip(&deq).all(|(a, b)| a.to_bits() == b.to_bits()), "{module}");
        assert_eq!(t.info.dims2().unwrap(), decoded.codes.dim());
        n += 1;
    }
    assert_eq!(n, 7);
    assert!(out.join("quantize_config.json").exists(), "GPTQ checkpoints carry quantize_config.json");
}
