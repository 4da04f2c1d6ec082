//! Bad inputs give typed errors and leave nothing that looks complete; selection rules
//! (what is never quantized, fused groups treated alike, --include/--exclude).

mod ckpt_util;

use ckpt_util::{read_all, run};
use fourbit_forge::checkpoint::demo::{write_deepseek_demo, write_llama_demo, DeepSeekDemo, LlamaDemo};
use fourbit_forge::checkpoint::output::temp_dir_for;
use fourbit_forge::checkpoint::plan::{JobSettings, Work};
use fourbit_forge::checkpoint::select::{classify, fused_group, layer_of, Glob, TensorKind};
use fourbit_forge::checkpoint::st::{encode_header, SafetensorsFile, TensorSpec, MAX_HEADER_BYTES};
use fourbit_forge::checkpoint::{build_plan, ModelDir};
use fourbit_forge::ForgeError;
use safetensors::Dtype;
use std::path::Path;

fn llama(dir: &Path) {
    write_llama_demo(dir, &LlamaDemo { layers: 2, shard_bytes: 600_000, ..LlamaDemo::default() }).unwrap();
}

fn index(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap()).unwrap()
}

fn write_index(dir: &Path, v: &serde_json::Value) {
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec(v).unwrap()).unwrap();
}

fn single_file(dir: &Path, specs: &[(TensorSpec, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#)
        .unwrap();
    let list: Vec<TensorSpec> = specs.iter().map(|(s, _)| s.clone()).collect();
    let (header, offsets, len) = encode_header(&list, &Default::default()).unwrap();
    let mut bytes = header.clone();
    bytes.resize(header.len() + len, 0);
    for ((_, data), off) in specs.iter().zip(offsets) {
        bytes[header.len() + off..header.len() + off + data.len()].copy_from_slice(data);
    }
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

#[test]
fn missing_shard_is_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    llama(&dir);
    let shard = index(&dir)["weight_map"]["lm_head.weight"].as_str().unwrap().to_string();
    std::fs::remove_file(dir.join(&shard)).unwrap();
    let err = ModelDir::open(&dir).unwrap_err();
    assert!(matches!(err, ForgeError::MissingShard { shard: ref s, .. } if *s == shard), "{err}");
}

#[test]
fn index_naming_a_missing_tensor_is_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    llama(&dir);
    let mut v = index(&dir);
    let shard = v["weight_map"]["lm_head.weight"].clone();
    v["weight_map"]["model.layers.0.self_attn.q_norm.weight"] = shard;
    write_index(&dir, &v);
    let err = ModelDir::open(&dir).unwrap_err();
    assert!(
        matches!(err, ForgeError::MissingTensor { ref tensor, .. } if tensor == "model.layers.0.self_attn.q_norm.weight"),
        "{err}"
    );
    // A shard name that leaves the directory is refused too.
    v["weight_map"]["lm_head.weight"] = serde_json::json!("../elsewhere.safetensors");
    write_index(&dir, &v);
    assert!(matches!(ModelDir::open(&dir).unwrap_err(), ForgeError::Config(_)));
}

#[test]
fn unsupported_dtypes_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // A dtype name safetensors does not define.
    let dir = tmp.path().join("unknown");
    single_file(&dir, &[(TensorSpec::new("model.norm.weight", Dtype::F32, vec![4]), vec![0; 16])]);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let text = String::from_utf8_lossy(&bytes).replace("\"F32\"", "\"F33\"");
    std::fs::write(&path, text.as_bytes()).unwrap();
    let err = ModelDir::open(&dir).unwrap_err();
    assert!(matches!(err, ForgeError::Dtype(ref m) if m.contains("F33")), "{err}");

    // A Linear weight stored as I8: a clear error naming the tensor (or --exclude it).
    let dir = tmp.path().join("int8");
    single_file(
        &dir,
        &[(TensorSpec::new("model.layers.0.mlp.down_proj.weight", Dtype::I8, vec![128, 128]), vec![1; 128 * 128])],
    );
    let model = ModelDir::open(&dir).unwrap();
    let err = build_plan(&model, &JobSettings::default()).unwrap_err();
    assert!(matches!(err, ForgeError::Dtype(ref m) if m.contains("down_proj")), "{err}");
    let excluded = JobSettings { exclude: vec!["*down_proj".into()], ..JobSettings::default() };
    let plan = build_plan(&model, &excluded).unwrap();
    assert!(matches!(plan.items[0].work, Work::Copy { .. }));

    // FP8 without block scales.
    let dir = tmp.path().join("fp8");
    single_file(
        &dir,
        &[(
            TensorSpec::new("model.layers.0.mlp.up_proj.weight", Dtype::F8_E4M3, vec![128, 128]),
            vec![0x38; 128 * 128],
        )],
    );
    let err = build_plan(&ModelDir::open(&dir).unwrap(), &JobSettings::default()).unwrap_err();
    assert!(matches!(err, ForgeError::Config(ref m) if m.contains("weight_scale_inv")), "{err}");
}

#[test]
fn malformed_safetensors_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    single_file(&dir, &[(TensorSpec::new("a", Dtype::F32, vec![8]), vec![0; 32])]);
    let path = dir.join("model.safetensors");
    let good = std::fs::read(&path).unwrap();
    // Truncated data.
    std::fs::write(&path, &good[..good.len() - 4]).unwrap();
    assert!(matches!(SafetensorsFile::open(&path).unwrap_err(), ForgeError::Safetensors(ref m) if m.contains("past")));
    // A header length past the bound is refused before anything is allocated.
    let mut huge = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
    huge.extend_from_slice(&[b' '; 64]);
    std::fs::write(&path, &huge).unwrap();
    assert!(matches!(SafetensorsFile::open(&path).unwrap_err(), ForgeError::Safetensors(ref m) if m.contains("limit")));
    // Too short, and not JSON.
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    assert!(matches!(SafetensorsFile::open(&path).unwrap_err(), ForgeError::Safetensors(_)));
    let mut junk = 8u64.to_le_bytes().to_vec();
    junk.extend_from_slice(b"not json");
    std::fs::write(&path, &junk).unwrap();
    assert!(matches!(SafetensorsFile::open(&path).unwrap_err(), ForgeError::Safetensors(ref m) if m.contains("JSON")));
    // Overlapping tensors.
    let json = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json);
    bytes.extend_from_slice(&[0u8; 12]);
    std::fs::write(&path, &bytes).unwrap();
    assert!(
        matches!(SafetensorsFile::open(&path).unwrap_err(), ForgeError::Safetensors(ref m) if m.contains("overlap"))
    );
    // A shape that does not match its byte range.
    let json = br#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json);
    bytes.extend_from_slice(&[0u8; 8]);
    std::fs::write(&path, &bytes).unwrap();
    assert!(
        matches!(SafetensorsFile::open(&path).unwrap_err(), ForgeError::Safetensors(ref m) if m.contains("needs 12"))
    );
    std::fs::write(&path, &good).unwrap();
    assert_eq!(SafetensorsFile::open(&path).unwrap().tensors().len(), 1);
}

#[test]
fn fifo_input_is_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), b"{}").unwrap();
    let fifo = dir.join("model.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a fresh path in a private temporary directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Opening a FIFO for reading would block until a writer appears: the check must come first.
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dir.clone();
    std::thread::spawn(move || {
        let _ = tx.send(ModelDir::open(&d).map(|_| ()));
    });
    let res = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("opening a FIFO input blocked");
    assert!(matches!(res, Err(ForgeError::NotRegularFile { ref kind, .. }) if kind == "a FIFO"), "{res:?}");
}

#[test]
fn output_path_problems_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    llama(&dir);
    // The output path is a file.
    let file = tmp.path().join("out-file");
    std::fs::write(&file, b"keep me").unwrap();
    let err = run(&dir, &file, &JobSettings::default()).unwrap_err();
    assert!(matches!(err, ForgeError::Config(ref m) if m.contains("not a directory")), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert!(!temp_dir_for(&file).unwrap().exists());
    // A non-empty directory.
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"").unwrap();
    assert!(matches!(run(&dir, &full, &JobSettings::default()).unwrap_err(), ForgeError::Config(_)));
    // An empty directory is fine.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    run(&dir, &empty, &JobSettings::default()).unwrap();
    assert!(empty.join("config.json").exists());
    // The model directory is not a model.
    assert!(matches!(ModelDir::open(tmp.path()).unwrap_err(), ForgeError::Config(ref m) if m.contains("config.json")));
    assert!(matches!(ModelDir::open(&file).unwrap_err(), ForgeError::Config(_)));
}

#[test]
fn memory_budget_is_checked_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    llama(&dir);
    let model = ModelDir::open(&dir).unwrap();
    let plan = build_plan(&model, &JobSettings::default()).unwrap();
    let out = tmp.path().join("out");
    let mut opts = fourbit_forge::checkpoint::RunOptions::new(out.clone(), fourbit_forge::Backend::Cpu);
    opts.max_host_memory = 100_000;
    let err = fourbit_forge::checkpoint::quantize_checkpoint(&model, &plan, &opts, &fourbit_forge::checkpoint::Silent)
        .unwrap_err();
    assert!(matches!(err, ForgeError::OutOfMemory { limit: 100_000, .. }), "{err}");
    assert!(err.to_string().contains("--max-host-memory"), "{err}");
    assert!(!out.exists() && !temp_dir_for(&out).unwrap().exists());
}

#[test]
fn classification_of_real_names() {
    let cases: &[(&str, &[usize], TensorKind)] = &[
        ("model.embed_tokens.weight", &[10, 4], TensorKind::Embedding),
        ("lm_head.weight", &[10, 4], TensorKind::LmHead),
        ("model.layers.61.shared_head.head.weight", &[10, 4], TensorKind::LmHead),
        ("model.norm.weight", &[4], TensorKind::Norm),
        ("model.layers.0.self_attn.kv_a_layernorm.weight", &[4], TensorKind::Norm),
        ("model.layers.0.self_attn.q_proj.bias", &[4], TensorKind::Bias),
        ("model.layers.3.mlp.gate.weight", &[8, 4], TensorKind::Router),
        ("model.layers.3.mlp.gate.e_score_correction_bias", &[8], TensorKind::RouterBias),
        ("model.layers.3.block_sparse_moe.gate.weight", &[8, 4], TensorKind::Router),
        ("model.layers.3.mlp.shared_expert_gate.weight", &[1, 4], TensorKind::Router),
        ("model.layers.3.mlp.gate_proj.weight", &[8, 4], TensorKind::Mlp),
        ("model.layers.3.mlp.experts.17.down_proj.weight", &[4, 8], TensorKind::Expert),
        ("model.layers.3.block_sparse_moe.experts.1.w3.weight", &[8, 4], TensorKind::Expert),
        ("model.layers.3.mlp.shared_experts.up_proj.weight", &[8, 4], TensorKind::SharedExpert),
        ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", &[8, 4], TensorKind::Attention),
        ("model.layers.0.self_attn.o_proj.weight_scale_inv", &[1, 1], TensorKind::Fp8Scale),
        ("model.layers.0.mlp.experts.gate_up_proj", &[2, 8, 4], TensorKind::Other),
        ("vision_tower.proj.weight", &[8, 4], TensorKind::Other),
    ];
    for (name, shape, kind) in cases {
        assert_eq!(classify(name, shape), *kind, "{name}");
    }
    assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some("model.layers.12"));
    assert_eq!(layer_of("transformer.h.3.attn.c_attn.weight"), Some("transformer.h.3"));
    assert_eq!(layer_of("model.norm.weight"), None);
    assert_eq!(fused_group("m.layers.0.self_attn.k_proj"), fused_group("m.layers.0.self_attn.v_proj"));
    assert_eq!(fused_group("m.layers.0.mlp.experts.3.w1"), fused_group("m.layers.0.mlp.experts.3.w3"));
    assert_ne!(fused_group("m.layers.0.mlp.experts.3.w1"), fused_group("m.layers.0.mlp.experts.4.w1"));
    assert_eq!(fused_group("m.layers.0.self_attn.q_a_proj"), fused_group("m.layers.0.self_attn.kv_a_proj_with_mqa"));
    assert_eq!(fused_group("m.layers.0.self_attn.o_proj"), "m.layers.0.self_attn.o_proj");
}

#[test]
fn globs() {
    let g = Glob::new("model.layers.*.mlp.experts.*");
    assert!(g.matches("model.layers.3.mlp.experts.17.down_proj"));
    assert!(!g.matches("model.layers.3.mlp.shared_experts.down_proj"));
    assert!(Glob::new("*.?_proj").matches("a.b.q_proj"));
    assert!(!Glob::new("*.?_proj").matches("a.b.up_proj"));
    assert!(Glob::new("*").matches(""));
    assert!(Glob::new("a*b*c").matches("aXbYbZc"));
    assert!(!Glob::new("a*b*c").matches("aXbYbZ"));
    assert!(Glob::new("*down_proj").matches_tensor("model.layers.0.mlp.down_proj.weight"));
}

#[test]
fn fused_groups_are_excluded_together_and_never_quantized_kinds_stay() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    llama(&dir);
    let settings = JobSettings { exclude: vec!["model.layers.1.self_attn.k_proj".into()], ..JobSettings::default() };
    let model = ModelDir::open(&dir).unwrap();
    let plan = build_plan(&model, &settings).unwrap();
    let kept: Vec<&str> = plan.kept.iter().map(|k| k.module.as_str()).collect();
    for m in ["q_proj", "k_proj", "v_proj"] {
        let module = format!("model.layers.1.self_attn.{m}");
        assert!(kept.contains(&module.as_str()), "{module} must be kept with its fused partner");
        assert!(plan.ignore.contains(&module));
    }
    assert!(plan.kept.iter().any(|k| k.reason.contains("fused with model.layers.1.self_attn.k_proj")));
    assert!(!kept.contains(&"model.layers.0.self_attn.k_proj"));
    assert_eq!(plan.quantized_modules(), 2 * 7 - 3);

    // --include narrows to matching groups; partners of a match outside the pattern stay out too.
    let only_mlp = JobSettings { include: vec!["*.mlp.*".into()], ..JobSettings::default() };
    let plan = build_plan(&model, &only_mlp).unwrap();
    assert_eq!(plan.quantized_modules(), 2 * 3);
    let only_up = JobSettings { include: vec!["*.up_proj".into()], ..JobSettings::default() };
    let plan = build_plan(&model, &only_up).unwrap();
    assert_eq!(plan.quantized_modules(), 0, "gate_proj is not included, so its fused partner up_proj stays too");

    // Routers, their bias, norms, embeddings and lm_head are never quantized, whatever --include says.
    let ds = tmp.path().join("ds");
    write_deepseek_demo(&ds, &DeepSeekDemo::default()).unwrap();
    let out = tmp.path().join("ds-out");
    run(&ds, &out, &JobSettings { include: vec!["*".into()], ..JobSettings::default() }).unwrap();
    let read = read_all(&out);
    for name in [
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
    ] {
        assert!(read.contains_key(name), "{name} must be kept as it is");
    }
}
