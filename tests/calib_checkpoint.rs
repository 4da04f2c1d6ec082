//! GPTQ calibrated from text over a model directory (`forge quantize --method gptq --calib`):
//! the checkpoint it writes is the sequential CPU reference's result, weight for weight; a
//! calibration killed after a layer resumes with the exact hidden states and Hessians; a state
//! made from other inputs is refused.

mod ckpt_util;

use fourbit_forge::calib::data::{calibration_samples, load_tokenizer, CalibSamples, CalibSettings};
use fourbit_forge::calib::model::{
    calibrate, quantize_model_cpu, CalibrationJob, ExpertCoverage, HiddenPlacement, Method as SeqMethod, ModelConfig,
    Propagation, SafetensorsDir, SequentialConfig,
};
use fourbit_forge::checkpoint::demo::{write_llama_demo, LlamaDemo};
use fourbit_forge::checkpoint::plan::{GptqSettings, JobSettings, Method};
use fourbit_forge::checkpoint::{build_plan, ModelDir};
use fourbit_forge::hessian::PreStepConfig;
use fourbit_forge::{Backend, ForgeError};
use std::path::Path;

fn text(seed: u64, words: usize) -> String {
    let vocab = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..words)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            vocab[(x >> 33) as usize % vocab.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn samples(model: &Path, seed: u64, n: usize, len: usize) -> CalibSamples {
    let config = ModelConfig::from_dir(model).unwrap();
    let settings = CalibSettings { samples: n, seq_len: len, bos: config.bos_token_id, separator: config.eos_token_id };
    calibration_samples(&load_tokenizer(model).unwrap(), &[text(seed, 3000)], &settings).unwrap()
}

fn seq_config(model: &ModelDir) -> SequentialConfig {
    // The grid the checkpoint run uses (compressed-tensors: bf16 stored scales).
    let settings = JobSettings::default();
    let plan = build_plan(model, &settings).unwrap();
    SequentialConfig {
        grid: plan.grid_config(),
        pre_step: PreStepConfig::default(),
        method: SeqMethod::Gptq,
        propagation: Propagation::Quantized,
        expert_coverage: ExpertCoverage::default(),
    }
}

/// A 3-layer Llama-shaped demo model in `tmp/llama`.
fn demo_model(tmp: &Path) -> (std::path::PathBuf, ModelDir) {
    let dir = tmp.join("llama");
    write_llama_demo(&dir, &LlamaDemo { layers: 3, hidden: 128, intermediate: 256, ..LlamaDemo::default() }).unwrap();
    let model = ModelDir::open(&dir).unwrap();
    (dir, model)
}

/// The Hessian files of two calibration states are the same files, byte for byte.
fn assert_same_hessians(a: &Path, b: &Path) {
    let files = |d: &Path| ckpt_util::dir_files(&d.join("hessians"));
    let (a, b) = (files(a), files(b));
    assert_eq!(a.len(), 3 * 7, "one file per Linear");
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        assert!(b[k] == *v, "{k}: the resumed Hessian differs");
    }
}

fn job<'a>(model: &'a Path, s: &'a CalibSamples, cfg: &SequentialConfig, state: &Path) -> CalibrationJob<'a> {
    CalibrationJob {
        model_dir: model,
        samples: s,
        settings: cfg.clone(),
        backend: Backend::Cpu,
        state: state.to_path_buf(),
        resume: false,
        hidden_placement: HiddenPlacement::Auto,
        checkpoint_every: std::time::Duration::ZERO,
        fail_after_layers: None,
    }
}

fn gptq(hessians: &Path) -> JobSettings {
    JobSettings {
        method: Method::Gptq(GptqSettings {
            hessians: hessians.to_path_buf(),
            pre_step: PreStepConfig::default(),
            allow_missing: false,
        }),
        ..JobSettings::default()
    }
}

/// Every Linear the checkpoint holds dequantizes to exactly the weight the sequential CPU
/// reference (`quantize_model_cpu`, same samples, grid and quantized propagation) produced:
/// the Hessians written per module, the propagation and the run's quantization agree bit for
/// bit (layer 1 on matches only if layer 0's quantized outputs fed it).
#[test]
fn calibrated_checkpoint_equals_the_sequential_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, model) = demo_model(tmp.path());
    let s = samples(&dir, 1, 6, 48);
    let cfg = seq_config(&model);
    let report = calibrate(&job(&dir, &s, &cfg, &tmp.path().join("state")), &|_, _| {}).unwrap();
    assert_eq!((report.layers, report.resumed_at), (3, 0));
    assert!(report.reports.iter().all(|r| r.tokens == 6 * 48), "every dense group sees every token");
    let out = tmp.path().join("out");
    ckpt_util::run(&dir, &out, &gptq(&report.hessians)).unwrap();

    let config = ModelConfig::from_dir(&dir).unwrap();
    let reference = quantize_model_cpu(&config, &SafetensorsDir::open(&dir).unwrap(), &s.sequences, &cfg).unwrap();
    let written = ckpt_util::read_all(&out);
    let mut checked = 0;
    for name in reference.dequantized.names() {
        let module = name.strip_suffix(".weight").unwrap();
        let (_, deq, dims) = ckpt_util::dequant_ct(&written, module, 4, 128);
        let want = reference.dequantized.get(name).unwrap();
        assert_eq!(want.shape(), &[dims.0, dims.1], "{module}");
        let same = want.iter().zip(&deq).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{module}: the checkpoint is not the sequential reference's result");
        checked += 1;
    }
    assert_eq!(checked, 3 * 7, "q, k, v, o, gate, up, down in each layer");
}

/// Killed after one layer, the calibration resumes at the next with the hidden states it
/// saved, and every Hessian file equals an uninterrupted run's byte for byte. A state made from
/// other samples is refused, and so is a state found without `resume`.
#[test]
fn calibration_resumes_after_a_kill_and_refuses_other_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, model) = demo_model(tmp.path());
    let s = samples(&dir, 2, 4, 40);
    let cfg = seq_config(&model);
    let whole = tmp.path().join("whole");
    calibrate(&job(&dir, &s, &cfg, &whole), &|_, _| {}).unwrap();

    let state = tmp.path().join("killed");
    let mut killed = job(&dir, &s, &cfg, &state);
    killed.fail_after_layers = Some(1);
    assert!(calibrate(&killed, &|_, _| {}).is_err(), "the test hook stops it after one layer");
    assert!(state.join("hidden-1.bin").exists(), "layer 1's inputs are saved");
    // Without resume the state is refused, not overwritten.
    match calibrate(&job(&dir, &s, &cfg, &state), &|_, _| {}) {
        Err(ForgeError::Config(m)) => assert!(m.contains("--resume"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Other samples: refused.
    let other = samples(&dir, 3, 4, 40);
    let mut changed = job(&dir, &other, &cfg, &state);
    changed.resume = true;
    match calibrate(&changed, &|_, _| {}) {
        Err(ForgeError::Config(m)) => assert!(m.contains("refusing to resume"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut resumed = job(&dir, &s, &cfg, &state);
    resumed.resume = true;
    let r = calibrate(&resumed, &|_, _| {}).unwrap();
    assert_eq!(r.resumed_at, 1);
    assert_same_hessians(&whole, &state);
    // A damaged hidden-state file is caught, not used.
    let state2 = tmp.path().join("damaged");
    let mut k2 = job(&dir, &s, &cfg, &state2);
    k2.fail_after_layers = Some(1);
    let _ = calibrate(&k2, &|_, _| {});
    let h = state2.join("hidden-1.bin");
    let mut bytes = std::fs::read(&h).unwrap();
    bytes[10] ^= 0x40;
    std::fs::write(&h, bytes).unwrap();
    k2.fail_after_layers = None;
    k2.resume = true;
    match calibrate(&k2, &|_, _| {}) {
        Err(ForgeError::Config(m)) => assert!(m.contains("damaged"), "{m}"),
        other => panic!("expected a damaged-state error, got {other:?}"),
    }
}

/// On the GPU (forward pass on the device): a calibration killed after one layer and resumed
/// writes every Hessian file byte for byte as an uninterrupted GPU run (the device forward is
/// deterministic: fixed cuBLAS calls on one stream, kernels without atomics on shared outputs).
#[test]
fn gpu_calibration_resumes_bit_for_bit() {
    let Ok(dev) = fourbit_forge::device::GpuDevice::first() else {
        eprintln!("[gpu_calibration_resumes_bit_for_bit] SKIPPED (no GPU)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (dir, model) = demo_model(tmp.path());
    let s = samples(&dir, 2, 4, 40);
    let cfg = seq_config(&model);
    let gpu_job = |state: &Path| CalibrationJob { backend: Backend::Gpu(dev.clone()), ..job(&dir, &s, &cfg, state) };
    let whole = tmp.path().join("whole");
    calibrate(&gpu_job(&whole), &|_, _| {}).unwrap();
    let state = tmp.path().join("killed");
    let mut killed = gpu_job(&state);
    killed.fail_after_layers = Some(1);
    assert!(calibrate(&killed, &|_, _| {}).is_err(), "the test hook stops it after one layer");
    let mut resumed = gpu_job(&state);
    resumed.resume = true;
    assert_eq!(calibrate(&resumed, &|_, _| {}).unwrap().resumed_at, 1);
    assert_same_hessians(&whole, &state);
}

/// A word-level tokenizer over the test text's words: ids below the fixtures' vocabulary of 64.
fn word_tokenizer() -> Vec<u8> {
    let words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"];
    let mut vocab = serde_json::json!({"<unk>": 0, "<s>": 1, "</s>": 2});
    for (i, w) in words.iter().enumerate() {
        vocab[*w] = serde_json::json!(3 + i);
    }
    serde_json::to_vec(&serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    }))
    .unwrap()
}

/// Hidden states streamed from page-locked host memory in batches (one forward chunk each)
/// give the same Hessians, byte for byte, as hidden states kept on the device: a dense model
/// (3 layers, 3 chunks of 16 sequences) and an MoE one (the Qwen3-MoE fixture, every expert
/// below the coverage threshold so the kept feed-forward inputs stream back for the
/// all-tokens pass).
#[test]
fn gpu_streamed_hidden_states_match_device_resident() {
    let Ok(dev) = fourbit_forge::device::GpuDevice::first() else {
        eprintln!("[gpu_streamed_hidden_states_match_device_resident] SKIPPED (no GPU)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (llama, model) = demo_model(tmp.path());
    let moe = tmp.path().join("qwen3_moe");
    std::fs::create_dir_all(&moe).unwrap();
    std::fs::write(moe.join("config.json"), include_str!("../testdata/parity/qwen3_moe/config.json")).unwrap();
    std::fs::write(moe.join("model.safetensors"), include_bytes!("../testdata/parity/qwen3_moe/model.safetensors"))
        .unwrap();
    std::fs::write(moe.join("tokenizer.json"), word_tokenizer()).unwrap();
    let moe_model = ModelDir::open(&moe).unwrap();
    let grid32 = fourbit_forge::GridConfig { group_size: 32, ..JobSettings::default().grid };
    let moe_plan = build_plan(&moe_model, &JobSettings { grid: grid32, ..JobSettings::default() }).unwrap();
    let cases = [
        (llama.clone(), seq_config(&model)),
        (
            moe.clone(),
            SequentialConfig {
                grid: moe_plan.grid_config(),
                expert_coverage: ExpertCoverage::AllTokens { min_tokens: u64::MAX },
                ..seq_config(&moe_model)
            },
        ),
    ];
    for (dir, cfg) in cases {
        // 48 × 128 tokens: three 2048-token forward chunks.
        let config = ModelConfig::from_dir(&dir).unwrap();
        let settings =
            CalibSettings { samples: 48, seq_len: 128, bos: config.bos_token_id, separator: config.eos_token_id };
        let s = calibration_samples(&load_tokenizer(&dir).unwrap(), &[text(5, 12_000)], &settings).unwrap();
        let run = |name: &str, placement: HiddenPlacement| {
            let state = tmp.path().join(format!("{}-{name}", dir.file_name().unwrap().to_string_lossy()));
            let j = CalibrationJob {
                backend: Backend::Gpu(dev.clone()),
                hidden_placement: placement,
                ..job(&dir, &s, &cfg, &state)
            };
            calibrate(&j, &|_, _| {}).unwrap_or_else(|e| panic!("{} {name}: {e}", dir.display()));
            ckpt_util::dir_files(&state.join("hessians"))
        };
        let on_device = run("device", HiddenPlacement::Device);
        let streamed = run("host", HiddenPlacement::Host { max_batch_tokens: 1 });
        assert!(!on_device.is_empty());
        assert_eq!(on_device.keys().collect::<Vec<_>>(), streamed.keys().collect::<Vec<_>>());
        for (k, v) in &on_device {
            assert!(streamed[k] == *v, "{}: {k} differs when streamed", dir.display());
        }
    }
}

/// `forge quantize --method gptq --calib` end to end on a generated checkpoint of every
/// supported architecture (the transformers fixtures as model directories with the test
/// tokenizer, gs 32 to fit their width 32): calibration from text, then the checkpoint run
/// with its Hessians; every Linear whose width fits the group size is written quantized. On
/// the CPU always, and on the GPU (device forward) where there is one.
#[test]
fn calibrated_checkpoint_of_every_architecture() {
    macro_rules! fx {
        ($n:literal) => {
            (
                $n,
                include_str!(concat!("../testdata/parity/", $n, "/config.json")),
                include_bytes!(concat!("../testdata/parity/", $n, "/model.safetensors")).as_slice(),
            )
        };
    }
    let fixtures = [fx!("llama"), fx!("mistral"), fx!("qwen2"), fx!("qwen3"), fx!("qwen3_moe"), fx!("mixtral")];
    let tokenizer = word_tokenizer();
    let mut backends = vec![Backend::Cpu];
    if let Ok(dev) = fourbit_forge::device::GpuDevice::first() {
        backends.push(Backend::Gpu(dev));
    }
    let grid = fourbit_forge::GridConfig { group_size: 32, ..JobSettings::default().grid };
    for (name, config, weights) in fixtures {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        std::fs::write(dir.join("model.safetensors"), weights).unwrap();
        std::fs::write(dir.join("tokenizer.json"), &tokenizer).unwrap();
        let model = ModelDir::open(&dir).unwrap();
        let plan = build_plan(&model, &JobSettings { grid: grid.clone(), ..JobSettings::default() }).unwrap();
        let cfg = SequentialConfig { grid: plan.grid_config(), ..seq_config(&model) };
        let s = samples(&dir, 1, 4, 24);
        let mc = ModelConfig::from_dir(&dir).unwrap();
        // Linears whose input width is not a multiple of the group size (the fixture experts'
        // down projections, 16 wide) are kept in full precision by design.
        let linears: usize = (0..mc.num_layers)
            .map(|l| {
                let groups = mc.linear_groups(l).unwrap();
                groups.iter().filter(|g| g.in_features.is_multiple_of(32)).map(|g| g.linears.len()).sum::<usize>()
            })
            .sum();
        for backend in &backends {
            let state = tmp.path().join(format!("state-{}", backend.name()));
            let report =
                calibrate(&CalibrationJob { backend: backend.clone(), ..job(&dir, &s, &cfg, &state) }, &|_, _| {})
                    .unwrap_or_else(|e| panic!("{name} on {}: {e}", backend.name()));
            let out = tmp.path().join(format!("out-{}", backend.name()));
            let settings = JobSettings { grid: grid.clone(), ..gptq(&report.hessians) };
            ckpt_util::run(&dir, &out, &settings).unwrap_or_else(|e| panic!("{name} on {}: {e}", backend.name()));
            let written = ckpt_util::read_all(&out);
            let packed = written.keys().filter(|k| k.ends_with(".weight_packed")).count();
            assert_eq!(packed, linears, "{name} on {}: every Linear quantized", backend.name());
        }
    }
}
