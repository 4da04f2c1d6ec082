//! The CPU sequential pipeline on the transformers fixtures: GPTQ beats round-to-nearest in
//! next-token KL on held-out tokens, expert token counts are reported, propagation modes differ.

use fourbit_forge::calib::model::{
    next_token_kl, quantize_model_cpu, InputGroup, MemoryWeights, Method, ModelConfig, Propagation, SequentialConfig,
    Substituted,
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
