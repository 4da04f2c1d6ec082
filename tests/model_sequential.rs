//! The CPU sequential pipeline on the transformers fixtures: GPTQ beats round-to-nearest in
//! next-token KL on held-out tokens, expert token counts are reported, propagation modes differ.

use fourbit_forge::calib::model::{
    next_token_kl, quantize_model_cpu, ExpertCoverage, InputGroup, MemoryWeights, Method, ModelConfig, Propagation,
    SequentialConfig, Substituted,
};
use fourbit_forge::hessian::PreStepConfig;
use fourbit_forge::GridConfig;
use rand::{Rng, SeedableRng};

fn fixture(name: &str) -> (ModelConfig, MemoryWeights) {
    let (config, model) = match name {
        "llama" => (
            include_str!("../testdata/parity/llama/config.json"),
            include_bytes!("../testdata/parity/llama/model.safetensors").as_slice(),
        ),
        "qwen3_moe" => (
            include_str!("../testdata/parity/qwen3_moe/config.json"),
            include_bytes!("../testdata/parity/qwen3_moe/model.safetensors").as_slice(),
        ),
        other => panic!("no fixture {other}"),
    };
    (
        ModelConfig::from_json_str(config).expect("config"),
        MemoryWeights::from_safetensors_bytes(model).expect("weights"),
    )
}

fn tokens(n: usize, len: usize, vocab: u32, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| (0..len).map(|_| rng.gen_range(3..vocab)).collect()).collect()
}

fn settings(method: Method, propagation: Propagation) -> SequentialConfig {
    SequentialConfig {
        grid: GridConfig { group_size: 32, bits: 3, ..GridConfig::default() },
        pre_step: PreStepConfig::default(),
        method,
        propagation,
        expert_coverage: ExpertCoverage::default(),
    }
}

#[test]
fn gptq_has_lower_kl_than_round_to_nearest_on_held_out_tokens() {
    for name in ["llama", "qwen3_moe"] {
        let (cfg, w) = fixture(name);
        let calib = tokens(16, 32, cfg.vocab_size as u32, 1);
        let held_out = tokens(8, 32, cfg.vocab_size as u32, 2);
        let kl = |method| {
            let r = quantize_model_cpu(&cfg, &w, &calib, &settings(method, Propagation::Quantized)).expect("quantize");
            let q = Substituted::from_memory(&w, &r.dequantized).expect("substitute");
            (next_token_kl(&cfg, &w, &q, &held_out).expect("kl").mean, r)
        };
        let (gptq, report) = kl(Method::Gptq);
        let (rtn, _) = kl(Method::Rtn);
        eprintln!("{name}: mean KL on held-out tokens, 3-bit gs32: GPTQ {gptq:.4e}, RTN {rtn:.4e}");
        assert!(gptq > 0.0 && gptq < rtn, "{name}: GPTQ {gptq} should beat RTN {rtn}");
        // Every Linear of the checkpoint was quantized.
        let linears: usize = (0..cfg.num_layers)
            .map(|l| cfg.linear_groups(l).expect("g").iter().map(|g| g.linears.len()).sum::<usize>())
            .sum();
        assert_eq!(report.dequantized.names().len(), linears);
        // Dense groups see every token; experts together see top_k per token.
        let all = 16 * 32;
        for r in &report.reports {
            match r.group {
                InputGroup::ExpertGateUp(_) | InputGroup::ExpertDown(_) => {}
                _ => assert_eq!(r.tokens, all as u64, "{name} {:?}", r.group),
            }
            assert_eq!(r.flags.no_tokens, r.tokens == 0);
        }
        if let Some(moe) = &cfg.moe {
            let routed: u64 = report
                .reports
                .iter()
                .filter(|r| matches!(r.group, InputGroup::ExpertGateUp(_)))
                .map(|r| r.tokens)
                .sum();
            assert_eq!(routed, (all * moe.top_k) as u64);
        }
    }
}

#[test]
fn propagation_mode_changes_later_layers_only() {
    let (cfg, w) = fixture("llama");
    let calib = tokens(8, 32, cfg.vocab_size as u32, 3);
    let q = quantize_model_cpu(&cfg, &w, &calib, &settings(Method::Gptq, Propagation::Quantized)).expect("q");
    let f = quantize_model_cpu(&cfg, &w, &calib, &settings(Method::Gptq, Propagation::FullPrecision)).expect("f");
    let same = |name: &str| q.dequantized.get(name) == f.dequantized.get(name);
    // Layer 0 sees the same inputs either way; layer 1 does not.
    assert!(same("model.layers.0.mlp.down_proj.weight"));
    assert!(!same("model.layers.1.self_attn.q_proj.weight"));
}

/// Experts under the coverage threshold: with `AllTokens` their Hessians come from every
/// token's expert input (equal across experts for gate/up, one per token), they are quantized
/// by GPTQ and reported as such; with `RoundToNearest` they are flagged as having no tokens.
/// Experts above the threshold and the dense groups are the same either way.
#[test]
fn experts_under_the_coverage_threshold_use_all_tokens_or_round_to_nearest() {
    use fourbit_forge::calib::model::{sequential_layer, CpuModel};
    use fourbit_forge::{Backend, Quantizer};
    let (cfg, w) = fixture("qwen3_moe");
    let n_experts = cfg.moe.as_ref().expect("moe").num_experts;
    // One token: top-2 of 4 experts see it, two see nothing.
    let calib = tokens(1, 1, cfg.vocab_size as u32, 5);
    let run = |coverage| {
        let s = SequentialConfig { expert_coverage: coverage, ..settings(Method::Gptq, Propagation::FullPrecision) };
        quantize_model_cpu(&cfg, &w, &calib, &s).expect("quantize")
    };
    let all = run(ExpertCoverage::AllTokens { min_tokens: 1 });
    let rtn = run(ExpertCoverage::RoundToNearest { min_tokens: 1 });
    let mut unreached = 0;
    for (a, r) in all.reports.iter().zip(&rtn.reports) {
        assert_eq!((a.layer, a.group, a.tokens), (r.layer, r.group, r.tokens));
        let expert = matches!(a.group, InputGroup::ExpertGateUp(_) | InputGroup::ExpertDown(_));
        if expert && a.tokens == 0 {
            unreached += 1;
            assert!(a.all_tokens && !a.flags.no_tokens, "{:?}: calibrated on all tokens", a.group);
            assert!(!r.all_tokens && r.flags.no_tokens, "{:?}: round-to-nearest, flagged", r.group);
        } else {
            assert!(!a.all_tokens && !r.all_tokens && !a.flags.no_tokens, "{:?}", a.group);
        }
    }
    assert!(unreached >= 2, "the single token left some experts unreached");
    // What the policy does not touch is the same; what it does differs.
    let mut differ = 0;
    for name in all.dequantized.names() {
        let e = (0..n_experts).find(|e| name.contains(&format!(".experts.{e}.")));
        let reached =
            e.is_none_or(|e| all.reports.iter().any(|r| r.group == InputGroup::ExpertGateUp(e) && r.tokens > 0));
        let same = all.dequantized.get(name) == rtn.dequantized.get(name);
        if reached {
            assert!(same, "{name}");
        } else if !same {
            differ += 1;
        }
    }
    assert!(differ > 0, "all-tokens GPTQ and round-to-nearest differ on the unreached experts");
    // With the threshold above every count, every expert's gate/up Hessian is the same
    // all-tokens one.
    let settings_all = SequentialConfig {
        expert_coverage: ExpertCoverage::AllTokens { min_tokens: u64::MAX },
        ..settings(Method::Gptq, Propagation::FullPrecision)
    };
    let quantizer = Quantizer::new(settings_all.grid.clone(), Backend::Cpu);
    let calib = tokens(2, 5, cfg.vocab_size as u32, 6);
    let hidden = CpuModel::new(&cfg, &w).embed_sequences(&calib).expect("embed");
    let layer0 = sequential_layer(&cfg, 0, &w, hidden, &settings_all, &quantizer).expect("layer 0");
    let layer1 = sequential_layer(&cfg, 1, &w, layer0.next, &settings_all, &quantizer).expect("layer 1");
    let first = layer1.hessians.get(InputGroup::ExpertGateUp(0)).expect("expert 0");
    assert_eq!(first.tokens(), 10, "every token");
    for e in 1..n_experts {
        let h = layer1.hessians.get(InputGroup::ExpertGateUp(e)).expect("expert");
        assert_eq!(h.h(), first.h(), "expert {e}: the same all-tokens input as expert 0");
    }
    assert!(layer1.reports.iter().filter(|r| matches!(r.group, InputGroup::ExpertGateUp(_))).all(|r| r.all_tokens));
}
