//! CPU reference forward vs Hugging Face transformers' own modelling code (fixtures from
//! `tools/parity/gen_fixtures.py`, provenance in `testdata/parity/README.md`), per
//! architecture and per decoder layer, plus the Linear inputs the forward reports and the
//! Hessians accumulated from them.
//!
//! Tolerance (derived, not fitted). Both sides compute the same f32 function in different
//! summation orders. A length-K f32 reduction in any order errs by at most
//! `γ_K·Σ|terms|`, `γ_K = K·u/(1−K·u)`, `u = 2⁻²⁴` (Higham, Accuracy and Stability, §3.1).
//! A decoder layer's longest dependency chain has at most `R = 12` reductions (norm, q/k/v,
//! q/k norm, scores, softmax sum, probabilities·V, o, norm, router, gate/up, down, residual
//! adds), and we allow each to amplify an incoming relative error by `κ = 8`: RMSNorm by at
//! most max|x|/rms(x) ≤ √n ≤ 8 (n ≤ 64 here); softmax turns an absolute score error δ into a
//! relative probability error ≤ 2δ, and the scores of these unit-variance fixtures are O(1).
//! This is a worst-case bound; the errors seen are about 1000× smaller (README table), and a
//! wrong rope band, router rule or mask shows up 100–1000× above it. Errors are measured
//! relative to the largest magnitude of the reference tensor, so per layer
//! `tol = R·κ·γ_{K_max}`, `K_max` the longest reduction of that layer (width, heads·head_dim,
//! intermediate or sequence length). Chained through the model, layer `l` (1-based) gets
//! `l·tol` and the logits `(L+1)·tol`. A Hessian built from inputs with relative error `e`
//! differs from `2/n·XᵀX` by at most `2e + γ_n` relative to its largest entry.
//! The routing is discrete: the experts each token reaches must be exactly PyTorch's.

use fourbit_forge::calib::model::{
    CpuModel, DecoderLayer, HessianSink, InputGroup, MemoryWeights, ModelConfig, RecordingSink, WeightSource,
};
use ndarray::Array2;
use safetensors::SafeTensors;

mod parity_util;
use parity_util::*;

fn check_fixture(fx: &Fixture) -> Vec<Row> {
    let cfg = ModelConfig::from_json_str(fx.config).expect("config parses");
    let weights = MemoryWeights::from_safetensors_bytes(fx.model).expect("weights load");
    let acts = Acts(SafeTensors::deserialize(fx.activations).expect("activations"));
    let model = CpuModel::new(&cfg, &weights);
    let n_seq = (0..).take_while(|s| acts.0.tensor(&format!("s{s}.input_ids")).is_ok()).count();
    assert!(n_seq >= 2, "{}: fixtures hold at least two sequences", fx.name);
    let seq_max = (0..n_seq).map(|s| acts.ids(&format!("s{s}.input_ids")).len()).max().unwrap_or(0);
    let mut rows = Vec::new();

    let tol_layer: Vec<f64> =
        (0..cfg.num_layers).map(|l| REDUCTIONS * AMPLIFICATION * gamma(k_max(&cfg, l, seq_max))).collect();
    let tol_max = tol_layer.iter().copied().fold(0.0, f64::max);

    // Embedding lookup: exact.
    for s in 0..n_seq {
        let ids = acts.ids(&format!("s{s}.input_ids"));
        let ours = model.embed(&ids).expect("embed");
        let theirs = acts.f32(&format!("s{s}.hidden.0")).expect("hidden.0");
        assert_eq!(ours, theirs, "{}: embedding rows of sequence {s}", fx.name);
    }

    for (l, &tol) in tol_layer.iter().enumerate() {
        let layer = DecoderLayer::load(&cfg, l, &weights).expect("layer loads");
        let mut hessians = HessianSink::new();
        let mut worst = Row { what: format!("layer {l} output"), tol, ..Row::default() };
        let mut worst_in = Row { what: format!("layer {l} Linear inputs"), tol, ..Row::default() };
        let mut torch_inputs: std::collections::BTreeMap<InputGroup, Vec<Array2<f32>>> = Default::default();
        for s in 0..n_seq {
            // Per layer: our layer on PyTorch's input, so each layer is checked on its own.
            let input = acts.f32(&format!("s{s}.hidden.{l}")).expect("layer input");
            let expected = acts.f32(&format!("s{s}.hidden.{}", l + 1)).expect("layer output");
            let positions: Vec<usize> = (0..input.nrows()).collect();
            let mut rec = RecordingSink::new();
            let mut tee = fourbit_forge::calib::model::Tee(vec![&mut rec, &mut hessians]);
            let out = layer.forward(input.view(), &positions, Some(&mut tee)).expect("forward");
            let (mx, mn) = rel_err(out.view(), expected.view());
            worst.max = worst.max.max(mx);
            worst.mean = worst.mean.max(mn);

            // Every group PyTorch recorded must be ours too, with the same rows (routing).
            let groups = cfg.linear_groups(l).expect("groups");
            for g in groups.iter().map(|g| g.group) {
                let theirs = acts.f32(&format!("s{s}.in.{l}.{}", group_key(g)));
                let ours = rec.rows(g).expect("rows");
                match (&ours, &theirs) {
                    (None, None) => {}
                    (Some(a), Some(b)) => {
                        assert_eq!(a.dim(), b.dim(), "{} layer {l} seq {s} {g:?}: rows routed differ", fx.name);
                        // transformers visits an expert's tokens grouped by top-k slot, we in
                        // token order: pair rows by nearest neighbour (a bijection is asserted).
                        let b = &match_rows(a.view(), b.view());
                        let (mx, mn) = rel_err(a.view(), b.view());
                        worst_in.max = worst_in.max.max(mx);
                        worst_in.mean = worst_in.mean.max(mn);
                        torch_inputs.entry(g).or_default().push(b.clone());
                    }
                    _ => panic!(
                        "{} layer {l} seq {s} {g:?}: ours {:?} rows, PyTorch {:?}",
                        fx.name,
                        ours.as_ref().map(|a| a.nrows()),
                        theirs.as_ref().map(|a| a.nrows())
                    ),
                }
            }
            assert!(
                rec.groups().all(|g| acts.0.tensor(&format!("s{s}.in.{l}.{}", group_key(*g))).is_ok()),
                "{} layer {l}: we reported a group PyTorch did not",
                fx.name
            );
        }

        // Hessians: ours (accumulated by the sink over every sequence) vs 2/n·XᵀX of PyTorch's
        // hooked inputs, in f64.
        let mut worst_h = Row { what: format!("layer {l} Hessians"), ..Row::default() };
        for (g, parts) in &torch_inputs {
            let n: usize = parts.iter().map(|p| p.nrows()).sum();
            let cols = parts[0].ncols();
            let mut h = Array2::<f64>::zeros((cols, cols));
            for p in parts {
                let p64 = p.mapv(f64::from);
                h += &p64.t().dot(&p64);
            }
            h *= 2.0 / n as f64;
            let ours = hessians.get(*g).unwrap_or_else(|| panic!("{} layer {l}: no Hessian for {g:?}", fx.name));
            assert_eq!(ours.tokens(), n as u64, "{} layer {l} {g:?}: token count", fx.name);
            let (mx, mn) = rel_err(ours.h().view(), h.mapv(|v| v as f32).view());
            worst_h.max = worst_h.max.max(mx);
            worst_h.mean = worst_h.mean.max(mn);
            worst_h.tol = worst_h.tol.max(2.0 * tol + gamma(n));
        }
        // Experts without tokens: no Hessian, token count 0, on both sides.
        for g in cfg.linear_groups(l).expect("groups").iter().map(|g| g.group) {
            if !torch_inputs.contains_key(&g) {
                assert_eq!(hessians.tokens(g), 0, "{} layer {l} {g:?}: PyTorch routed no token here", fx.name);
            }
        }
        rows.extend([worst, worst_in, worst_h]);
    }

    // The whole model chained (our own hidden states all the way) against PyTorch's logits.
    let sequences: Vec<Vec<u32>> = (0..n_seq).map(|s| acts.ids(&format!("s{s}.input_ids"))).collect();
    let logits = model.forward_logits(&sequences).expect("forward_logits");
    let tol = (cfg.num_layers + 1) as f64 * tol_max;
    let mut row = Row { what: "logits (chained)".into(), tol, ..Row::default() };
    for (s, ours) in logits.iter().enumerate() {
        let theirs = acts.f32(&format!("s{s}.logits")).expect("logits");
        let (mx, mn) = rel_err(ours.view(), theirs.view());
        row.max = row.max.max(mx);
        row.mean = row.mean.max(mn);
    }
    rows.push(row);
    rows
}

fn run(name: &str) {
    let fx = FIXTURES.iter().find(|f| f.name == name).expect("fixture");
    let rows = check_fixture(fx);
    for r in &rows {
        eprintln!("{:<10} {:<26} max {:>9.2e}  mean {:>9.2e}  tol {:>9.2e}", fx.name, r.what, r.max, r.mean, r.tol);
    }
    for r in &rows {
        assert!(r.max <= r.tol, "{}: {} max relative error {:.3e} > tolerance {:.3e}", fx.name, r.what, r.max, r.tol);
    }
}

#[test]
fn llama_matches_transformers() {
    run("llama");
}

#[test]
fn mistral_matches_transformers() {
    run("mistral");
}

#[test]
fn qwen2_matches_transformers() {
    run("qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    run("qwen3");
}

#[test]
fn qwen3_moe_matches_transformers() {
    run("qwen3_moe");
}

#[test]
fn mixtral_matches_transformers() {
    run("mixtral");
}

/// The fixtures exercise what they claim to (so a fixture regenerated with other settings
/// cannot silently drop a code path).
#[test]
fn fixtures_cover_the_architecture_features() {
    use fourbit_forge::calib::model::{Arch, FfnKind, RopeScaling, RouterKind};
    let cfg =
        |n: &str| ModelConfig::from_json_str(FIXTURES.iter().find(|f| f.name == n).expect("fx").config).expect("cfg");
    assert!(matches!(cfg("llama").rope.scaling, RopeScaling::Llama3 { .. }));
    assert!(cfg("mistral").layers.iter().all(|l| l.sliding_window == Some(6)));
    let q2 = cfg("qwen2");
    assert!(q2.gqa().qkv_bias && !q2.gqa().o_bias && q2.tie_word_embeddings);
    let q3 = cfg("qwen3");
    assert!(q3.gqa().qk_norm && q3.gqa().head_dim * q3.gqa().num_heads != q3.hidden_size);
    assert!(matches!(q3.rope.scaling, RopeScaling::Yarn { .. }));
    let qm = cfg("qwen3_moe");
    assert_eq!(qm.arch, Arch::Qwen3Moe);
    assert_eq!(qm.layers.iter().map(|l| l.ffn).collect::<Vec<_>>(), vec![FfnKind::Dense, FfnKind::Moe]);
    assert_eq!(qm.moe.as_ref().map(|m| m.router), Some(RouterKind::SoftmaxTopK { renormalize: false }));
    let mx = cfg("mixtral");
    assert_eq!(mx.moe.as_ref().map(|m| m.router), Some(RouterKind::TopKSoftmax));
    // Every tensor of every fixture is used by the forward (no stray or misnamed tensor).
    for fx in &FIXTURES {
        let c = ModelConfig::from_json_str(fx.config).expect("cfg");
        let w = MemoryWeights::from_safetensors_bytes(fx.model).expect("weights");
        let mut used: Vec<String> = vec![c.embed_name().into(), c.final_norm_name().into(), c.lm_head_name().into()];
        for l in 0..c.num_layers {
            let n = c.layer_tensor_names(l).expect("names");
            used.extend([n.input_norm, n.post_attention_norm]);
            used.extend(n.q_norm.into_iter().chain(n.k_norm).chain(n.router));
            for g in c.linear_groups(l).expect("groups") {
                for lin in g.linears {
                    used.push(lin.weight);
                    used.extend(lin.bias);
                }
            }
        }
        for name in w.names() {
            assert!(used.iter().any(|u| u == name), "{}: tensor {name} is not read by the forward", fx.name);
        }
        for u in &used {
            assert!(w.contains(u), "{}: the forward reads {u}, absent from the checkpoint", fx.name);
        }
    }
}

/// A model directory on disk (single file and sharded index) gives the same logits as the
/// in-memory weights, and the KL check runs on it with substituted weights.
#[test]
fn model_directory_loads_and_feeds_the_kl_check() {
    use fourbit_forge::calib::model::{next_token_kl, SafetensorsDir, Substituted};
    let fx = &FIXTURES[4];
    let dir = std::env::temp_dir().join(format!("forge-model-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("config.json"), fx.config).expect("config");
    std::fs::write(dir.join("model.safetensors"), fx.model).expect("model");
    let cfg = ModelConfig::from_dir(&dir).expect("config from dir");
    let on_disk = SafetensorsDir::open(&dir).expect("open dir");
    let in_memory = MemoryWeights::from_safetensors_bytes(fx.model).expect("memory");
    assert_eq!(on_disk.names(), in_memory.names());
    let seqs = vec![vec![1u32, 7, 9, 30, 2, 5, 5, 11], vec![1u32, 3, 4]];
    let a = CpuModel::new(&cfg, &on_disk).forward_logits(&seqs).expect("disk");
    let b = CpuModel::new(&cfg, &in_memory).forward_logits(&seqs).expect("memory");
    assert_eq!(a, b);

    // Sharded layout: the index maps names to shard files.
    let index: serde_json::Map<String, serde_json::Value> = in_memory
        .names()
        .iter()
        .map(|n| (n.to_string(), serde_json::Value::String("model-00001-of-00001.safetensors".into())))
        .collect();
    std::fs::rename(dir.join("model.safetensors"), dir.join("model-00001-of-00001.safetensors")).expect("rename");
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": index}).to_string(),
    )
    .expect("index");
    let sharded = SafetensorsDir::open(&dir).expect("open sharded");
    assert_eq!(CpuModel::new(&cfg, &sharded).forward_logits(&seqs).expect("sharded"), a);

    // KL of a perturbed copy (one expert's down projection halved) against the original.
    let name = "model.layers.1.mlp.experts.0.down_proj.weight";
    let mut sub = Substituted::new(&sharded);
    sub.replace(name, sharded.tensor_f32(name).expect("t").mapv(|v| 0.5 * v)).expect("replace");
    let kl = next_token_kl(&cfg, &sharded, &sub, &seqs).expect("kl");
    assert_eq!(kl.positions, 11);
    assert!(kl.mean > 0.0 && kl.max >= kl.mean);
    assert_eq!(next_token_kl(&cfg, &sharded, &sharded, &seqs).expect("kl").mean, 0.0);

    // A shard name that leaves the directory is refused; a directory without weights too.
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": {"x": "../evil.safetensors"}}).to_string(),
    )
    .expect("index");
    assert!(matches!(SafetensorsDir::open(&dir), Err(fourbit_forge::ForgeError::Safetensors(_))));
    std::fs::remove_file(dir.join("model.safetensors.index.json")).expect("rm");
    std::fs::remove_file(dir.join("model-00001-of-00001.safetensors")).expect("rm");
    assert!(matches!(SafetensorsDir::open(&dir), Err(fourbit_forge::ForgeError::Safetensors(_))));
    let _ = std::fs::remove_dir_all(&dir);
}
