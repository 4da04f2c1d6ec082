//! The model description (config parsing, names, groups), routers, weight substitution and
//! the KL check on toy cases. Parity with transformers is in `model_cpu_parity.rs`.

use fourbit_forge::calib::model::{
    kl_from_logits, next_token_kl, route, Arch, CpuModel, DecoderLayer, FfnKind, HessianSink, InputGroup,
    MemoryWeights, ModelConfig, RopeScaling, RouterKind, Substituted, WeightSource, SUPPORTED_MODEL_TYPES,
};
use fourbit_forge::ForgeError;
use ndarray::{array, Array2, ArrayD};
use serde_json::json;

fn base(model_type: &str) -> serde_json::Value {
    json!({
        "model_type": model_type, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 40, "intermediate_size": 48, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256
    })
}

fn parse(v: serde_json::Value) -> Result<ModelConfig, ForgeError> {
    ModelConfig::from_json(&v)
}

#[test]
fn unknown_architecture_names_what_is_supported() {
    let mut v = base("gpt2");
    v["architectures"] = json!(["GPT2LMHeadModel"]);
    let err = parse(v).expect_err("gpt2 is not supported");
    let msg = err.to_string();
    assert!(matches!(err, ForgeError::Config(_)));
    for t in SUPPORTED_MODEL_TYPES {
        assert!(msg.contains(t), "{msg} should name {t}");
    }
    assert!(msg.contains("gpt2"), "{msg}");
}

#[test]
fn architecture_from_class_name_when_model_type_is_missing() {
    let mut v = base("x");
    v.as_object_mut().expect("obj").remove("model_type");
    v["architectures"] = json!(["MixtralForCausalLM"]);
    let c = parse(v).expect("parses");
    assert_eq!(c.arch, Arch::Mixtral);
    // MixtralConfig defaults: 8 experts, top 2, rms_norm_eps given.
    let m = c.moe.expect("moe");
    assert_eq!((m.num_experts, m.top_k, m.expert_intermediate_size), (8, 2, 48));
}

#[test]
fn missing_and_bad_fields_are_typed_errors() {
    let mut v = base("llama");
    v.as_object_mut().expect("obj").remove("hidden_size");
    assert!(matches!(parse(v), Err(ForgeError::Config(m)) if m.contains("hidden_size")));
    let mut v = base("llama");
    v["num_key_value_heads"] = json!(3);
    assert!(matches!(parse(v), Err(ForgeError::Config(m)) if m.contains("multiple")));
    let mut v = base("llama");
    v["hidden_act"] = json!("gelu");
    assert!(matches!(parse(v), Err(ForgeError::Config(m)) if m.contains("gelu")));
    let mut v = base("llama");
    v["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0});
    assert!(matches!(parse(v), Err(ForgeError::Config(m)) if m.contains("dynamic")));
    let mut v = base("qwen3_moe");
    v["num_experts"] = json!(4);
    v["num_experts_per_tok"] = json!(5);
    assert!(matches!(parse(v), Err(ForgeError::Config(m)) if m.contains("exceeds")));
    assert!(matches!(ModelConfig::from_json_str("{"), Err(ForgeError::Config(_))));
    assert!(matches!(ModelConfig::from_json_str("[1]"), Err(ForgeError::Config(_))));
    let c = parse(base("llama")).expect("ok");
    assert!(matches!(c.layer(4), Err(ForgeError::Config(_))));
}

#[test]
fn rope_in_hub_and_v5_spellings_agree() {
    let mut hub = base("llama");
    hub["rope_theta"] = json!(500000.0);
    hub["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let mut v5 = base("llama");
    v5["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let (a, b) = (parse(hub).expect("hub"), parse(v5).expect("v5"));
    assert_eq!(a.rope, b.rope);
    assert_eq!(a.rope.theta, 500000.0);
    // Old configs spell the type as "type".
    let mut old = base("qwen2");
    old["rope_scaling"] = json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768});
    let c = parse(old).expect("yarn");
    assert!(matches!(c.rope.scaling, RopeScaling::Yarn { factor, beta_fast, beta_slow, truncate: true, .. }
        if factor == 4.0 && beta_fast == 32.0 && beta_slow == 1.0));
}

#[test]
fn qwen3_moe_layer_plan_follows_sparse_step_and_dense_layers() {
    let mut v = base("qwen3_moe");
    v["num_experts"] = json!(8);
    v["num_experts_per_tok"] = json!(2);
    v["moe_intermediate_size"] = json!(16);
    v["decoder_sparse_step"] = json!(2);
    v["mlp_only_layers"] = json!([3]);
    v["norm_topk_prob"] = json!(true);
    let c = parse(v).expect("parses");
    // (i+1) % 2 == 0 → layers 1 and 3; layer 3 is dense-only.
    assert_eq!(
        c.layers.iter().map(|l| l.ffn).collect::<Vec<_>>(),
        [FfnKind::Dense, FfnKind::Moe, FfnKind::Dense, FfnKind::Dense]
    );
    assert_eq!(c.moe.as_ref().map(|m| m.router), Some(RouterKind::SoftmaxTopK { renormalize: true }));
    assert_eq!(c.mlp.map(|m| m.intermediate_size), Some(48));
    let groups = c.linear_groups(1).expect("groups");
    assert_eq!(groups.len(), 2 + 2 * 8);
    assert_eq!(groups[2].group, InputGroup::ExpertGateUp(0));
    assert_eq!(groups[2].linears[0].weight, "model.layers.1.mlp.experts.0.gate_proj.weight");
    assert_eq!(groups[3].linears[0].weight, "model.layers.1.mlp.experts.0.down_proj.weight");
    assert_eq!(groups[3].in_features, 16);
    assert_eq!(c.layer_tensor_names(1).expect("names").router.as_deref(), Some("model.layers.1.mlp.gate.weight"));
    assert_eq!(c.layer_tensor_names(0).expect("names").router, None);
}

#[test]
fn names_and_shared_input_groups_per_architecture() {
    let c = parse(base("qwen2")).expect("qwen2");
    let g = c.linear_groups(0).expect("groups");
    assert_eq!(
        g.iter().map(|g| g.group).collect::<Vec<_>>(),
        [InputGroup::Qkv, InputGroup::O, InputGroup::GateUp, InputGroup::Down]
    );
    let names: Vec<(&str, Option<&str>)> =
        g[0].linears.iter().map(|l| (l.weight.as_str(), l.bias.as_deref())).collect();
    assert_eq!(
        names,
        [
            ("model.layers.0.self_attn.q_proj.weight", Some("model.layers.0.self_attn.q_proj.bias")),
            ("model.layers.0.self_attn.k_proj.weight", Some("model.layers.0.self_attn.k_proj.bias")),
            ("model.layers.0.self_attn.v_proj.weight", Some("model.layers.0.self_attn.v_proj.bias")),
        ]
    );
    assert_eq!(g[1].linears[0].bias, None, "Qwen2's o_proj has no bias");
    assert_eq!((g[0].linears[1].out_features, g[1].in_features), (16, 32));

    let mut v = base("mixtral");
    v["num_local_experts"] = json!(2);
    let m = parse(v).expect("mixtral");
    let g = m.linear_groups(2).expect("groups");
    let w: Vec<&str> = g[2].linears.iter().chain(&g[3].linears).map(|l| l.weight.as_str()).collect();
    assert_eq!(
        w,
        [
            "model.layers.2.block_sparse_moe.experts.0.w1.weight",
            "model.layers.2.block_sparse_moe.experts.0.w3.weight",
            "model.layers.2.block_sparse_moe.experts.0.w2.weight"
        ]
    );
    assert_eq!(
        m.layer_tensor_names(2).expect("names").router.as_deref(),
        Some("model.layers.2.block_sparse_moe.gate.weight")
    );

    let q3 = parse(base("qwen3")).expect("qwen3");
    assert_eq!(q3.gqa().head_dim, 128, "Qwen3Config defaults head_dim to 128");
    assert!(q3.layer_tensor_names(0).expect("n").q_norm.is_some());
    let mut v = base("qwen3");
    v["tie_word_embeddings"] = json!(true);
    assert_eq!(parse(v).expect("tied").lm_head_name(), "model.embed_tokens.weight");
}

#[test]
fn sliding_window_rules() {
    let mut v = base("mistral");
    v["sliding_window"] = json!(4096);
    assert!(parse(v).expect("m").layers.iter().all(|l| l.sliding_window == Some(4096)));
    let mut v = base("mistral");
    v["sliding_window"] = serde_json::Value::Null;
    assert!(parse(v).expect("m").layers.iter().all(|l| l.sliding_window.is_none()));
    // Qwen2: only with use_sliding_window, from max_window_layers on.
    let mut v = base("qwen2");
    v["sliding_window"] = json!(64);
    assert!(parse(v.clone()).expect("q").layers.iter().all(|l| l.sliding_window.is_none()));
    v["use_sliding_window"] = json!(true);
    v["max_window_layers"] = json!(2);
    let w: Vec<Option<usize>> = parse(v).expect("q").layers.iter().map(|l| l.sliding_window).collect();
    assert_eq!(w, [None, None, Some(64), Some(64)]);
}

#[test]
fn routers_follow_their_modelling_code() {
    // Probabilities of [2, 1, 0, -1]: softmax; top-2 = experts 0 and 1.
    let logits = array![[2.0f32, 1.0, 0.0, -1.0]];
    let e: Vec<f64> = [2.0f64, 1.0, 0.0, -1.0].iter().map(|v| v.exp()).collect();
    let total: f64 = e.iter().sum();
    let plain = route(logits.view(), 2, RouterKind::SoftmaxTopK { renormalize: false });
    assert_eq!(plain[0], vec![(0, (e[0] / total) as f32), (1, (e[1] / total) as f32)]);
    let renorm = route(logits.view(), 2, RouterKind::SoftmaxTopK { renormalize: true });
    let mixtral = route(logits.view(), 2, RouterKind::TopKSoftmax);
    let expect = vec![(0, (e[0] / (e[0] + e[1])) as f32), (1, (e[1] / (e[0] + e[1])) as f32)];
    assert_eq!(renorm[0], expect);
    assert_eq!(mixtral[0], expect);
    // Ties go to the lower index.
    let tie = route(array![[1.0f32, 3.0, 3.0, 0.0]].view(), 1, RouterKind::TopKSoftmax);
    assert_eq!(tie[0], vec![(1, 1.0)]);
}

/// A random 2-layer Llama-shaped model in memory.
fn toy_model(seed: u64) -> (ModelConfig, MemoryWeights) {
    use rand::{Rng, SeedableRng};
    let mut v = base("llama");
    v["num_hidden_layers"] = json!(2);
    let cfg = parse(v).expect("toy");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = MemoryWeights::new();
    let mut add = |name: &str, shape: &[usize], scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + scale * (rng.gen::<f32>() * 2.0 - 1.0)).collect();
        w.insert(name, ArrayD::from_shape_vec(shape.to_vec(), data).expect("shape"));
    };
    let (h, i, v) = (32, 48, 40);
    add("model.embed_tokens.weight", &[v, h], 1.0, 0.0);
    add("model.norm.weight", &[h], 0.1, 1.0);
    add("lm_head.weight", &[v, h], 0.3, 0.0);
    for l in 0..2 {
        let p = format!("model.layers.{l}.");
        add(&format!("{p}input_layernorm.weight"), &[h], 0.1, 1.0);
        add(&format!("{p}post_attention_layernorm.weight"), &[h], 0.1, 1.0);
        for (n, o) in [("q", 32), ("k", 16), ("v", 16), ("o", 32)] {
            add(&format!("{p}self_attn.{n}_proj.weight"), &[o, h], 0.3, 0.0);
        }
        add(&format!("{p}mlp.gate_proj.weight"), &[i, h], 0.3, 0.0);
        add(&format!("{p}mlp.up_proj.weight"), &[i, h], 0.3, 0.0);
        add(&format!("{p}mlp.down_proj.weight"), &[h, i], 0.25, 0.0);
    }
    (cfg, w)
}

#[test]
fn kl_is_zero_for_identical_weights_and_grows_with_the_perturbation() {
    let (cfg, w) = toy_model(7);
    let seqs = vec![vec![1u32, 5, 9, 3, 3, 17, 39, 0], vec![4u32, 8, 15, 16, 23]];
    let same = next_token_kl(&cfg, &w, &w, &seqs).expect("kl");
    assert_eq!(same.positions, 13);
    assert_eq!(same.mean, 0.0);
    let perturbed = |eps: f32| {
        let mut s = Substituted::new(&w);
        let name = "model.layers.1.mlp.down_proj.weight";
        let t = w.tensor_f32(name).expect("t");
        let noise = t.mapv(|x| x * (1.0 + eps * (x * 1000.0).sin()));
        s.replace(name, noise).expect("replace");
        next_token_kl(&cfg, &w, &s, &seqs).expect("kl").mean
    };
    let (small, large) = (perturbed(0.01), perturbed(0.1));
    assert!(small > 0.0 && large > 4.0 * small, "KL {small} then {large}: should grow ~quadratically");
}

#[test]
fn kl_from_logits_matches_a_hand_computed_case() {
    // P = softmax([0, ln 3]) = [1/4, 3/4], Q = uniform: KL = 1/4 ln(1/2) + 3/4 ln(3/2).
    let kl = kl_from_logits(&[0.0, 3f32.ln()], &[0.0, 0.0]).expect("kl");
    let expect = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
    assert!((kl - expect).abs() < 1e-7, "{kl} vs {expect}");
    assert!(kl_from_logits(&[0.0], &[0.0, 1.0]).is_err());
}

#[test]
fn substituted_weights_change_the_layer_and_shapes_are_checked() {
    let (cfg, w) = toy_model(11);
    let model = CpuModel::new(&cfg, &w);
    let x = model.embed(&[1, 2, 3, 4]).expect("embed");
    let pos = [0usize, 1, 2, 3];
    let full = DecoderLayer::load(&cfg, 0, &w).expect("layer").forward(x.view(), &pos, None).expect("fwd");
    let mut sub = Substituted::new(&w);
    let name = "model.layers.0.self_attn.o_proj.weight";
    assert!(sub.replace(name, ArrayD::zeros(vec![3, 3])).is_err(), "wrong shape is refused");
    sub.replace(name, ArrayD::zeros(vec![32, 32])).expect("replace");
    let mut sink = HessianSink::new();
    let quant =
        DecoderLayer::load(&cfg, 0, &sub).expect("layer").forward(x.view(), &pos, Some(&mut sink)).expect("fwd");
    assert_ne!(full, quant);
    // Hooks saw every group with all 4 tokens; Hessians are symmetric and the right size.
    for (g, cols) in [(InputGroup::Qkv, 32), (InputGroup::O, 32), (InputGroup::GateUp, 32), (InputGroup::Down, 48)] {
        let h = sink.get(g).expect("group recorded");
        assert_eq!((h.tokens(), h.cols()), (4, cols));
        assert_eq!(h.h(), &h.h().t().to_owned());
    }
    // Token ids outside the vocabulary and malformed inputs are typed errors.
    assert!(matches!(model.embed(&[40]), Err(ForgeError::Config(_))));
    let layer = DecoderLayer::load(&cfg, 0, &w).expect("layer");
    assert!(matches!(layer.forward(x.view(), &pos[..3], None), Err(ForgeError::Shape(_))));
    assert!(matches!(layer.forward(Array2::zeros((2, 31)).view(), &pos[..2], None), Err(ForgeError::Shape(_))));
    let mut bad = x.clone();
    bad[[1, 1]] = f32::NAN;
    assert!(matches!(layer.forward(bad.view(), &pos, None), Err(ForgeError::NonFinite { .. })));
    // A missing tensor names itself.
    let mut partial = MemoryWeights::new();
    partial.insert("model.layers.0.input_layernorm.weight", ArrayD::zeros(vec![32]));
    let err = DecoderLayer::load(&cfg, 0, &partial).expect_err("missing");
    assert!(err.to_string().contains("model.layers.0"), "{err}");
}

#[test]
fn causal_attention_ignores_later_tokens() {
    // A prefix's hidden states do not depend on the tokens after it (no padding, causal).
    let (cfg, w) = toy_model(3);
    let model = CpuModel::new(&cfg, &w);
    let long = model.forward_logits(&[vec![3, 1, 4, 1, 5, 9, 2, 6]]).expect("long");
    let short = model.forward_logits(&[vec![3, 1, 4, 1, 5]]).expect("short");
    let a = long[0].slice(ndarray::s![..5, ..]);
    let max = a.iter().zip(short[0].iter()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(max <= 1e-5, "prefix logits moved by {max}");
}
