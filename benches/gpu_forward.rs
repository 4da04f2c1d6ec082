//! The calibration forward pass on the GPU (issue 14), random weights at real shapes, 128
//! sequences × 2048 tokens, one decoder layer of each of:
//! * Llama-3-8B (hidden 4096, 32 heads / 8 kv heads × 128, MLP 14336), and
//! * Qwen3-30B-A3B (hidden 2048, 32 / 4 heads × 128 with q/k norm, 128 experts × 768, top 8).
//!
//! Tables: the bf16 tensor-core peak cuBLAS reaches on one 8192³ GEMM and on the Llama layer's
//! Linear shapes (device events, median); the layer's forward alone (tokens/s, and the Linears'
//! FLOPs over the whole forward time: a lower bound on their GEMM rate); and one whole
//! `sequential_layer_device` (GPTQ, quantized propagation, weights from a bf16 safetensors
//! file, hidden states on the device as the calibration keeps them) split into weight
//! load/upload, forward with the Hessian hooks, the Hessian download's unhidden part,
//! pre-step, solve and propagation (wall clock; the device is synchronized at each
//! boundary): a steady-state layer, the first layer of a run (buffers growing), a layer with
//! the hidden states streamed from page-locked host memory, and the resume checkpoint's
//! download through pinned memory.
//!
//! Run on a GPU machine: `cargo bench --bench gpu_forward` (cuBLAS/cuSOLVER on LD_LIBRARY_PATH).

mod common;

use fourbit_forge::calib::model::{
    sequential_layer, sequential_layer_device, DecoderLayer, DeviceSequences, ExpertCoverage, ForwardPrecision,
    ForwardWorkspace, GpuLayer, HiddenPlacement, HiddenStates, HostStaging, LayerBuffers, MemoryWeights, Method,
    ModelConfig, Propagation, SafetensorsDir, SequentialConfig, WeightSource,
};
use fourbit_forge::device::cublas::{GemmType, RowGemm, RowMatrix};
use fourbit_forge::device::{DeviceBufferMut, GpuDevice};
use fourbit_forge::hessian::PreStepConfig;
use fourbit_forge::{Backend, GridConfig, Quantizer};
use ndarray::{Array2, ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rayon::prelude::*;
use std::time::Instant;

const SEQS: usize = 128;
const SEQ_LEN: usize = 2048;

const LLAMA3_8B: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
 "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 1,
 "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
 "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
 "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 128000, "eos_token_id": 128001}"#;

const QWEN3_30B_A3B: &str = r#"{"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
 "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
 "num_experts_per_tok": 8, "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
 "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 1,
 "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
 "attention_bias": false, "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 151643,
 "eos_token_id": 151645}"#;

fn randn(shape: &[usize], scale: f32, seed: u64) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .into_par_iter()
        .chunks(1 << 16)
        .flat_map_iter(|c| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (c[0] as u64).wrapping_mul(0x9e37_79b9));
            c.into_iter().map(move |_| rng.sample::<f32, _>(StandardNormal) * scale).collect::<Vec<_>>()
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), v).expect("shape")
}

/// Layer 0's tensors, random: Linears `N(0, 1/in)`, norms `1 + N(0, 0.1²)`.
fn random_layer(cfg: &ModelConfig) -> MemoryWeights {
    let mut w = MemoryWeights::new();
    let names = cfg.layer_tensor_names(0).expect("names");
    let h = cfg.hidden_size;
    let mut seed = 1;
    let mut norm = |w: &mut MemoryWeights, name: &str, n: usize| {
        seed += 1;
        w.insert(name, randn(&[n], 0.1, seed).mapv(|v| 1.0 + v));
    };
    norm(&mut w, &names.input_norm, h);
    norm(&mut w, &names.post_attention_norm, h);
    let hd = cfg.gqa().head_dim;
    for n in [&names.q_norm, &names.k_norm].into_iter().flatten() {
        norm(&mut w, n, hd);
    }
    for (i, g) in cfg.linear_groups(0).expect("groups").iter().enumerate() {
        for (j, l) in g.linears.iter().enumerate() {
            let scale = 1.0 / (g.in_features as f32).sqrt();
            w.insert(l.weight.clone(), randn(&[l.out_features, g.in_features], scale, 1000 + 10 * i as u64 + j as u64));
        }
    }
    if let (Some(r), Some(m)) = (&names.router, &cfg.moe) {
        w.insert(r.clone(), randn(&[m.num_experts, h], 1.0 / (h as f32).sqrt(), 7));
    }
    w
}

/// The layer written as a bf16 `model.safetensors` in `dir` (the calibration reads its
/// weights from a memory-mapped checkpoint, as here), opened.
fn bf16_checkpoint(cfg: &ModelConfig, w: &MemoryWeights, dir: &std::path::Path) -> SafetensorsDir {
    let names = cfg.layer_tensor_names(0).expect("names");
    let mut all: Vec<String> = vec![names.input_norm.clone(), names.post_attention_norm.clone()];
    all.extend([&names.q_norm, &names.k_norm, &names.router].into_iter().flatten().cloned());
    for g in cfg.linear_groups(0).expect("groups") {
        all.extend(g.linears.iter().map(|l| l.weight.clone()));
    }
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = all
        .into_iter()
        .map(|name| {
            let t = w.tensor_f32(&name).expect("tensor");
            let v = t.as_slice().expect("contiguous");
            let mut bytes = vec![0u8; 2 * v.len()];
            bytes
                .par_chunks_mut(2)
                .zip(v.par_iter())
                .for_each(|(b, x)| b.copy_from_slice(&fourbit_forge::numerics::f32_to_bf16_bits(*x).to_le_bytes()));
            (name, t.shape().to_vec(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), b).expect("view"))
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("write");
    SafetensorsDir::open(dir).expect("open")
}

fn hidden_states(h: usize) -> Vec<Array2<f32>> {
    (0..SEQS).map(|s| randn(&[SEQ_LEN, h], 1.0, 50 + s as u64).into_dimensionality().expect("2-D")).collect()
}

/// Median ms of one bf16 `m × n × k` GEMM (row-major `A·Bᵀ`, f32 accumulation, bf16 output).
fn gemm_ms(dev: &GpuDevice, m: usize, n: usize, k: usize) -> fourbit_forge::Result<f64> {
    let mut a = dev.alloc::<u16>(m * k, "A")?;
    let mut b = dev.alloc::<u16>(n * k, "B")?;
    let mut c = dev.alloc::<u16>(m * n, "C")?;
    let g = RowGemm { m, n, k, b_transposed: true, alpha: 1.0, beta: 0.0, batch: 1, tf32: false };
    let rm = |addr: u64, ld: usize| RowMatrix { addr, dtype: GemmType::BF16, row_stride: ld, batch_stride: 0 };
    let (pa, pb, pc) = (a.dev_ptr_mut().addr(), b.dev_ptr_mut().addr(), c.dev_ptr_mut().addr());
    // SAFETY: buffers of exactly these shapes on the device's stream.
    common::median_ms(dev, 3, 7, 5, || {
        dev.with_blas(|blas| unsafe { blas.gemm_rows(&g, &rm(pa, k), &rm(pb, k), &rm(pc, n)) })
    })
}

fn main() -> fourbit_forge::Result<()> {
    let Some(dev) = common::device_or_explain("gpu_forward") else { return Ok(()) };
    let mut rows = Vec::new();
    let peak_ms = gemm_ms(&dev, 8192, 8192, 8192)?;
    let peak = 2.0 * 8192f64.powi(3) / (peak_ms * 1e-3) / 1e12;
    rows.push(vec!["8192×8192×8192 (peak)".into(), format!("{peak_ms:.3}"), format!("{peak:.0}"), "100 %".into()]);
    let chunk = ForwardWorkspace::default().chunk_tokens;
    for (what, n, k) in [("q/k/v", 6144, 4096), ("o", 4096, 4096), ("gate/up", 28672, 4096), ("down", 4096, 14336)] {
        let ms = gemm_ms(&dev, chunk, n, k)?;
        let tf = 2.0 * (chunk * n * k) as f64 / (ms * 1e-3) / 1e12;
        rows.push(vec![
            format!("Llama-3-8B {what}: {chunk}×{n}×{k}"),
            format!("{ms:.3}"),
            format!("{tf:.0}"),
            format!("{:.0} %", 100.0 * tf / peak),
        ]);
    }
    common::print_table("bf16 GEMMs (cuBLAS, f32 accumulation)", &["GEMM", "ms", "TFLOP/s", "of peak"], &rows);
    // The host link, which the layer's Hessian and hidden-state downloads ride on.
    {
        let n = 256usize << 20; // 1 GiB of f32
        let d = dev.alloc::<f32>(n, "link probe")?;
        let mut pageable = vec![0f32; n];
        let mut staging = HostStaging::default();
        let seqs = DeviceSequences::upload(&dev, &[Array2::<f32>::ones((n / 4096, 4096))])?;
        seqs.download_flat(&dev, &mut staging)?;
        let t = Instant::now();
        dev.stream().memcpy_dtoh(&d, &mut pageable).map_err(fourbit_forge::ForgeError::driver("probe"))?;
        dev.synchronize()?;
        let pageable_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        seqs.download_flat(&dev, &mut staging)?;
        let pinned_s = t.elapsed().as_secs_f64();
        println!(
            "\ndevice → host, 1 GiB: pageable {:.1} GB/s, pinned (incl. the finiteness scan) {:.1} GB/s",
            1.073741824 / pageable_s,
            1.073741824 / pinned_s
        );
    }

    let mut fwd_rows = Vec::new();
    let mut layer_rows = Vec::new();
    for (name, json) in [("Llama-3-8B", LLAMA3_8B), ("Qwen3-30B-A3B", QWEN3_30B_A3B)] {
        let cfg = ModelConfig::from_json_str(json)?;
        let weights = random_layer(&cfg);
        let hidden = hidden_states(cfg.hidden_size);
        let tokens = (SEQS * SEQ_LEN) as f64;

        // Forward alone (no hooks), device events.
        let layer = DecoderLayer::load(&cfg, 0, &weights)?;
        let gpu = GpuLayer::upload(&dev, &layer, ForwardPrecision::Bf16)?;
        drop(layer);
        let x = DeviceSequences::upload(&dev, &hidden)?;
        let mut out = x.zeros_like(&dev)?;
        let mut ws = ForwardWorkspace::new(gpu.chunk_tokens_for(2 << 30));
        let ms = common::median_ms(&dev, 1, 3, 1, || gpu.forward(&dev, &x, &mut out, None, None, &mut ws))?;
        let g = cfg.gqa();
        let linear_macs: f64 = cfg
            .linear_groups(0)?
            .iter()
            .map(|grp| grp.linears.iter().map(|l| (l.out_features * grp.in_features) as f64).sum::<f64>())
            .sum::<f64>();
        // MoE: each token reaches top_k experts, not all of them.
        let linear_macs = match &cfg.moe {
            Some(m) => {
                let expert = 3.0 * (m.expert_intermediate_size * cfg.hidden_size) as f64;
                linear_macs - m.num_experts as f64 * expert + m.top_k as f64 * expert
            }
            None => linear_macs,
        };
        let linear_tflop = 2.0 * linear_macs * tokens / 1e12;
        // Scores and P·V over the full t×t squares (the causal half is masked, not skipped).
        let attn_tflop = 2.0 * 2.0 * (SEQS * SEQ_LEN * SEQ_LEN * g.num_heads * g.head_dim) as f64 / 1e12;
        fwd_rows.push(vec![
            name.into(),
            format!("{ms:.1}"),
            format!("{:.0}", tokens / (ms * 1e-3)),
            format!("{linear_tflop:.1}"),
            format!("{:.0} ({:.0} %)", linear_tflop / (ms * 1e-3), 100.0 * linear_tflop / (ms * 1e-3) / peak),
            format!("{attn_tflop:.1}"),
        ]);
        drop((gpu, x, out, ws));

        // One whole sequential layer (GPTQ, quantized propagation).
        let settings = SequentialConfig {
            grid: GridConfig::default(),
            pre_step: PreStepConfig::default(),
            method: Method::Gptq,
            propagation: Propagation::Quantized,
            expert_coverage: ExpertCoverage::default(),
        };
        let quantizer = Quantizer::new(settings.grid.clone(), Backend::Gpu(dev.clone()));
        let dir = tempfile::tempdir().map_err(|e| fourbit_forge::ForgeError::Internal(e.to_string()))?;
        let checkpoint = bf16_checkpoint(&cfg, &weights, dir.path());
        drop(weights);
        // Warm-up on a few sequences (cuBLAS/cuSOLVER handles, kernels, pools).
        sequential_layer(&cfg, 0, &checkpoint, hidden[..2].to_vec(), &settings, &quantizer)?;
        // As the calibration runs it: hidden states already on the device, the next layer's
        // inputs left there, the buffers carried from layer to layer (the first layer of a
        // run grows them: "cold"), and the resume checkpoint downloaded through pinned memory.
        let mut x = HiddenStates::place(&dev, &hidden, HiddenPlacement::Device, 0)?;
        let mut buffers = LayerBuffers::default();
        let clock = Instant::now();
        let pass = sequential_layer_device(&dev, &cfg, 0, &checkpoint, &mut x, &settings, &quantizer, &mut buffers)?;
        let cold_s = clock.elapsed().as_secs_f64();
        drop(pass);
        // (Layer 0 again, now on its own outputs: the same shapes and work.)
        let clock = Instant::now();
        let pass = sequential_layer_device(&dev, &cfg, 0, &checkpoint, &mut x, &settings, &quantizer, &mut buffers)?;
        let layer_s = clock.elapsed().as_secs_f64();
        let mut staging = HostStaging::default();
        x.host_values(&dev, &mut staging)?; // first use allocates the pinned buffer
        let clock = Instant::now();
        x.host_values(&dev, &mut staging)?;
        let checkpoint_s = clock.elapsed().as_secs_f64();
        drop((x, staging));
        // The fallback for calibration sets the device cannot hold: hidden states in
        // page-locked host memory, streamed through the device (second run: buffers grown).
        let mut xh = HiddenStates::place(&dev, &hidden, HiddenPlacement::Host { max_batch_tokens: 0 }, 0)?;
        drop(hidden);
        sequential_layer_device(&dev, &cfg, 0, &checkpoint, &mut xh, &settings, &quantizer, &mut buffers)?;
        let clock = Instant::now();
        sequential_layer_device(&dev, &cfg, 0, &checkpoint, &mut xh, &settings, &quantizer, &mut buffers)?;
        let streamed_s = clock.elapsed().as_secs_f64();
        drop((xh, buffers));
        let t = pass.timings;
        layer_rows.push(vec![
            name.into(),
            format!("{:.2}", t.load),
            format!("{:.2}", t.forward_hessians),
            format!("{:.2}", t.download),
            format!("{:.2}", t.pre_step),
            format!("{:.2}", t.solve),
            format!("{:.2}", t.propagate),
            format!("{layer_s:.2}"),
            format!("{cold_s:.2}"),
            format!("{streamed_s:.2}"),
            format!("{checkpoint_s:.2}"),
        ]);
    }
    common::print_table(
        &format!("Forward of one layer, {SEQS} × {SEQ_LEN} tokens, bf16 Linears (device events, median of 3)"),
        &["layer", "ms", "tokens/s", "Linear TFLOP", "Linear TFLOP/s over the whole forward", "attention TFLOP"],
        &fwd_rows,
    );
    common::print_table(
        &format!(
            "One sequential GPTQ layer on the device, {SEQS} × {SEQ_LEN} tokens, weights from a bf16 safetensors file \
             (s, wall clock; the Hessian download runs beside the pre-steps and solves, its column is what they \
             did not hide plus the host copies)"
        ),
        &[
            "layer",
            "weights load+upload",
            "forward+Hessians",
            "Hessians download (not hidden)",
            "pre-step",
            "solve",
            "propagate",
            "total",
            "first layer of a run (buffers grow)",
            "hidden states streamed from host",
            "resume checkpoint download (pinned)",
        ],
        &layer_rows,
    );
    Ok(())
}
