//! The GPU forward pass (`GpuLayer`) against Hugging Face transformers' own modelling code
//! (the fixtures of `tools/parity/gen_fixtures.py`, every supported architecture), per decoder
//! layer, with the Linear-input Hessians it accumulates; and the GPU sequential layer against
//! the CPU reference. Runs on a GPU machine; skips with the reason elsewhere.
//!
//! Tolerances (derived; constants in tests/parity_util):
//! * f32 mode: the same f32 function as the CPU reference in other summation orders, so the
//!   CPU test's bound `R·κ·γ_K` (12 reductions, amplification 8) plus the softmax/SiLU `exp`
//!   (ex2.approx after an f64 range reduction, relative error < 2⁻²¹) in each reduction:
//!   `R·κ·(γ_K + 2⁻²¹)`. Hessians as in the CPU test: `2·tol + γ_n`.
//! * bf16 mode: every Linear input is rounded to bf16 (relative error ≤ u_b = 2⁻⁸ per element;
//!   the fixtures' weights are bf16 already, so exact). A layer's longest chain has 4 rounded
//!   inputs (q/k/v, o, gate/up, down), each amplified at most κ = 8 like any other error, so
//!   per layer `4·κ·u_b` relative to the largest magnitude, on top of the f32 bound. A wrong
//!   head, rope band, route or mask errs by O(1).

mod common;
mod parity_util;

use common::gpu_or_skip;
use fourbit_forge::calib::model::{
    sequential_layer, DecoderLayer, DeviceSequences, ExpertCoverage, ForwardPrecision, ForwardWorkspace,
    GpuHessianSink, GpuLayer, InputGroup, MemoryWeights, Method, ModelConfig, Propagation, SequentialConfig,
};
use fourbit_forge::device::GpuDevice;
use fourbit_forge::hessian::PreStepConfig;
use fourbit_forge::{Backend, GridConfig, Quantizer};
use ndarray::Array2;
use parity_util::*;
use safetensors::SafeTensors;

const U_BF16: f64 = 1.0 / 256.0;
const EXP_ERR: f64 = 1.0 / (1u64 << 21) as f64;

fn run(dev: &GpuDevice, fx: &Fixture, precision: ForwardPrecision) -> Vec<Row> {
    let cfg = ModelConfig::from_json_str(fx.config).expect("config parses");
    let weights = MemoryWeights::from_safetensors_bytes(fx.model).expect("weights load");
    let acts = Acts(SafeTensors::deserialize(fx.activations).expect("activations"));
    let n_seq = (0..).take_while(|s| acts.0.tensor(&format!("s{s}.input_ids")).is_ok()).count();
    let seq_max = (0..n_seq).map(|s| acts.ids(&format!("s{s}.input_ids")).len()).max().unwrap_or(0);
    let mut rows = Vec::new();
    // Two chunks for the two sequences: chunking must not change anything.
    let mut ws = ForwardWorkspace::new(seq_max);
    for l in 0..cfg.num_layers {
        let f32_tol = REDUCTIONS * AMPLIFICATION * (gamma(k_max(&cfg, l, seq_max)) + EXP_ERR);
        let tol = match precision {
            ForwardPrecision::F32 => f32_tol,
            ForwardPrecision::Bf16 => f32_tol + 4.0 * AMPLIFICATION * U_BF16,
        };
        let layer = DecoderLayer::load(&cfg, l, &weights).expect("layer loads");
        let gpu = GpuLayer::upload(dev, &layer, precision).expect("upload");
        let inputs: Vec<Array2<f32>> =
            (0..n_seq).map(|s| acts.f32(&format!("s{s}.hidden.{l}")).expect("layer input")).collect();
        let x = DeviceSequences::upload(dev, &inputs).expect("upload inputs");
        let mut out = x.zeros_like(dev).expect("output");
        let mut sink = GpuHessianSink::new();
        gpu.forward(dev, &x, &mut out, Some(&mut sink), None, &mut ws).expect("forward");
        let outs = out.download(dev).expect("download");
        let mut worst = Row { what: format!("layer {l} output"), tol, ..Row::default() };
        for (s, ours) in outs.iter().enumerate() {
            let expected = acts.f32(&format!("s{s}.hidden.{}", l + 1)).expect("layer output");
            let (mx, mn) = rel_err(ours.view(), expected.view());
            worst.max = worst.max.max(mx);
            worst.mean = worst.mean.max(mn);
        }
        // Hessians vs 2/n·XᵀX of PyTorch's hooked inputs (f64).
        let host = sink.to_host(dev).expect("Hessians");
        let mut worst_h = Row { what: format!("layer {l} Hessians"), ..Row::default() };
        for g in cfg.linear_groups(l).expect("groups").iter().map(|g| g.group) {
            let parts: Vec<Array2<f32>> =
                (0..n_seq).filter_map(|s| acts.f32(&format!("s{s}.in.{l}.{}", group_key(g)))).collect();
            if parts.is_empty() {
                assert_eq!(sink.tokens(g), 0, "{} layer {l} {g:?}: PyTorch routed no token here", fx.name);
                continue;
            }
            let n: usize = parts.iter().map(|p| p.nrows()).sum();
            let cols = parts[0].ncols();
            let mut h = Array2::<f64>::zeros((cols, cols));
            for p in &parts {
                let p64 = p.mapv(f64::from);
                h += &p64.t().dot(&p64);
            }
            h *= 2.0 / n as f64;
            if precision == ForwardPrecision::F32 {
                // bf16 mode may route a near-tie differently; f32 must route exactly as PyTorch.
                assert_eq!(sink.tokens(g), n as u64, "{} layer {l} {g:?}: token count", fx.name);
            }
            let Some(ours) = host.get(g) else { panic!("{} layer {l}: no Hessian for {g:?}", fx.name) };
            if ours.tokens() != n as u64 {
                continue;
            }
            let (mx, mn) = rel_err(ours.h().view(), h.mapv(|v| v as f32).view());
            worst_h.max = worst_h.max.max(mx);
            worst_h.mean = worst_h.mean.max(mn);
            worst_h.tol = worst_h.tol.max(2.0 * tol + gamma(n));
        }
        rows.extend([worst, worst_h]);
    }
    rows
}

fn check(test: &str, name: &str) {
    let Some(dev) = gpu_or_skip(test) else { return };
    let fx = FIXTURES.iter().find(|f| f.name == name).expect("fixture");
    for precision in [ForwardPrecision::F32, ForwardPrecision::Bf16] {
        let rows = run(&dev, fx, precision);
        for r in &rows {
            eprintln!(
                "{:<10} {:<5} {:<20} max {:>9.2e}  mean {:>9.2e}  tol {:>9.2e}",
                fx.name,
                format!("{precision:?}"),
                r.what,
                r.max,
                r.mean,
                r.tol
            );
        }
        for r in &rows {
            assert!(
                r.max <= r.tol,
                "{} {precision:?}: {} max relative error {:.3e} > tolerance {:.3e}",
                fx.name,
                r.what,
                r.max,
                r.tol
            );
        }
    }
}

#[test]
fn gpu_forward_llama_matches_transformers() {
    check("gpu_forward_llama_matches_transformers", "llama");
}

#[test]
fn gpu_forward_mistral_matches_transformers() {
    check("gpu_forward_mistral_matches_transformers", "mistral");
}

#[test]
fn gpu_forward_qwen2_matches_transformers() {
    check("gpu_forward_qwen2_matches_transformers", "qwen2");
}

#[test]
fn gpu_forward_qwen3_matches_transformers() {
    check("gpu_forward_qwen3_matches_transformers", "qwen3");
}

#[test]
fn gpu_forward_qwen3_moe_matches_transformers() {
    check("gpu_forward_qwen3_moe_matches_transformers", "qwen3_moe");
}

#[test]
fn gpu_forward_mixtral_matches_transformers() {
    check("gpu_forward_mixtral_matches_transformers", "mixtral");
}

/// The GPU sequential layer (device forward, bf16) against the CPU reference, round-to-nearest
/// so both quantize the same weights to the same codes: the same groups with the same routed
/// token counts, and the next layer's inputs within the bf16 bound.
#[test]
fn gpu_sequential_layer_matches_the_cpu_reference() {
    let Some(dev) = gpu_or_skip("gpu_sequential_layer_matches_the_cpu_reference") else { return };
    for name in ["llama", "qwen3_moe"] {
        let fx = FIXTURES.iter().find(|f| f.name == name).expect("fixture");
        let cfg = ModelConfig::from_json_str(fx.config).expect("config");
        let weights = MemoryWeights::from_safetensors_bytes(fx.model).expect("weights");
        let acts = Acts(SafeTensors::deserialize(fx.activations).expect("activations"));
        let hidden: Vec<Array2<f32>> = (0..2).map(|s| acts.f32(&format!("s{s}.hidden.0")).expect("input")).collect();
        let settings = SequentialConfig {
            grid: GridConfig { group_size: 32, ..GridConfig::default() },
            pre_step: PreStepConfig::default(),
            method: Method::Rtn,
            propagation: Propagation::Quantized,
            expert_coverage: ExpertCoverage::default(),
        };
        let seq = 16;
        for l in 0..cfg.num_layers {
            let cpu = Quantizer::new(settings.grid.clone(), Backend::Cpu);
            let gpu = Quantizer::new(settings.grid.clone(), Backend::Gpu(dev.clone()));
            let a = sequential_layer(&cfg, l, &weights, hidden.clone(), &settings, &cpu).expect("cpu layer");
            let b = sequential_layer(&cfg, l, &weights, hidden.clone(), &settings, &gpu).expect("gpu layer");
            let tokens = |r: &[fourbit_forge::calib::model::GroupReport]| -> Vec<(InputGroup, u64)> {
                r.iter().map(|g| (g.group, g.tokens)).collect()
            };
            if name == "llama" {
                assert_eq!(tokens(&a.reports), tokens(&b.reports), "{name} layer {l}: groups and token counts");
            } else {
                assert_eq!(a.reports.len(), b.reports.len(), "{name} layer {l}: groups");
            }
            for ((na, wa), (nb, wb)) in a.dequantized.iter().zip(&b.dequantized) {
                assert_eq!(na, nb);
                assert!(wa == wb, "{name} layer {l} {na}: round-to-nearest codes differ between backends");
            }
            let tol =
                REDUCTIONS * AMPLIFICATION * (gamma(k_max(&cfg, l, seq)) + EXP_ERR) + 4.0 * AMPLIFICATION * U_BF16;
            for (x, y) in a.next.iter().zip(&b.next) {
                let (mx, _) = rel_err(y.view(), x.view());
                eprintln!("{name} layer {l}: next-layer inputs GPU vs CPU max rel {mx:.2e} (tol {tol:.2e})");
                assert!(mx <= tol, "{name} layer {l}: {mx:.3e} > {tol:.3e}");
            }
        }
    }
}

/// The whole sequential pipeline on the GPU, every architecture: 3-bit GPTQ gives a lower
/// next-token KL divergence from the full-precision model on held-out tokens than
/// round-to-nearest on the same grid (KL evaluated by the CPU reference forward).
#[test]
fn gpu_gptq_has_lower_kl_than_round_to_nearest() {
    use fourbit_forge::calib::model::{next_token_kl, quantize_model, Substituted};
    use rand::{Rng, SeedableRng};
    let Some(dev) = gpu_or_skip("gpu_gptq_has_lower_kl_than_round_to_nearest") else { return };
    let tokens = |n: usize, len: usize, vocab: u32, seed: u64| -> Vec<Vec<u32>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| (0..len).map(|_| rng.gen_range(3..vocab)).collect()).collect()
    };
    for fx in &FIXTURES {
        let cfg = ModelConfig::from_json_str(fx.config).expect("config");
        let w = MemoryWeights::from_safetensors_bytes(fx.model).expect("weights");
        let calib = tokens(16, 32, cfg.vocab_size as u32, 1);
        let held_out = tokens(8, 32, cfg.vocab_size as u32, 2);
        let kl = |method| {
            let settings = SequentialConfig {
                grid: GridConfig { group_size: 32, bits: 3, ..GridConfig::default() },
                pre_step: PreStepConfig::default(),
                method,
                propagation: Propagation::Quantized,
                expert_coverage: ExpertCoverage::default(),
            };
            let r = quantize_model(&cfg, &w, &calib, &settings, Backend::Gpu(dev.clone())).expect("quantize");
            let q = Substituted::from_memory(&w, &r.dequantized).expect("substitute");
            next_token_kl(&cfg, &w, &q, &held_out).expect("kl").mean
        };
        let (gptq, rtn) = (kl(Method::Gptq), kl(Method::Rtn));
        eprintln!(
            "{:<10} GPU pipeline, mean KL on held-out tokens, 3-bit gs32: GPTQ {gptq:.4e}, RTN {rtn:.4e}",
            fx.name
        );
        assert!(gptq > 0.0 && gptq < rtn, "{}: GPTQ {gptq} should beat RTN {rtn}", fx.name);
    }
}
