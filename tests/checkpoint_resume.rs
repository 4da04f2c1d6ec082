//! Crash and resume: a run stopped after N steps (the test hook returns without making its
//! last records durable, as a crash would) and then resumed writes exactly the bytes of an
//! uninterrupted run; nothing that looks complete exists before that; a resume with other
//! settings or a changed input is refused.

mod ckpt_util;

use ckpt_util::dir_files;
use fourbit_forge::checkpoint::demo::{write_deepseek_demo, write_llama_demo, DeepSeekDemo, LlamaDemo};
use fourbit_forge::checkpoint::output::temp_dir_for;
use fourbit_forge::checkpoint::plan::JobSettings;
use fourbit_forge::checkpoint::run::SUMMARY_FILE;
use fourbit_forge::checkpoint::{build_plan, quantize_checkpoint, ModelDir, RunOptions, Silent};
use fourbit_forge::{Backend, ForgeError};
use std::collections::BTreeMap;
use std::path::Path;

fn options(out: &Path, resume: bool, fail_after: Option<usize>) -> RunOptions {
    let mut o = RunOptions::new(out.to_path_buf(), Backend::Cpu);
    o.resume = resume;
    o.fail_after_items = fail_after;
    o
}

/// Output files without the summary (it holds timings).
fn output(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut f = dir_files(dir);
    assert!(f.remove(SUMMARY_FILE).is_some());
    f
}

fn interrupted_then_resumed(
    model_dir: &Path,
    settings: &JobSettings,
    reference: &BTreeMap<String, Vec<u8>>,
    stops: &[usize],
    tag: &str,
) {
    let model = ModelDir::open(model_dir).unwrap();
    let plan = build_plan(&model, settings).unwrap();
    let out = model_dir.parent().unwrap().join(format!("out-{tag}"));
    for (k, &n) in stops.iter().enumerate() {
        let err = quantize_checkpoint(&model, &plan, &options(&out, k > 0, Some(n)), &Silent).unwrap_err();
        assert!(matches!(err, ForgeError::Interrupted(m) if m == n), "{err}");
        assert!(!out.exists(), "an interrupted run must not leave {} looking complete", out.display());
        assert!(temp_dir_for(&out).unwrap().exists());
    }
    let report = quantize_checkpoint(&model, &plan, &options(&out, true, None), &Silent).unwrap();
    assert!(report.resumed_items > 0 || stops.is_empty());
    assert!(!temp_dir_for(&out).unwrap().exists());
    let got = output(&out);
    assert_eq!(got.keys().collect::<Vec<_>>(), reference.keys().collect::<Vec<_>>(), "{tag}: file set");
    for (name, bytes) in reference {
        assert!(got[name] == *bytes, "{tag}: {name} differs from the uninterrupted run");
    }
    // The summary covers every quantized module, including those of the first runs.
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(SUMMARY_FILE)).unwrap()).unwrap();
    assert_eq!(summary["tensors"].as_array().unwrap().len(), plan.quantized_modules());
}

#[test]
fn kill_and_resume_dense_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("llama");
    write_llama_demo(&model_dir, &LlamaDemo { layers: 3, shard_bytes: 800_000, ..LlamaDemo::default() }).unwrap();
    let settings = JobSettings { max_shard_size: 500_000, ..JobSettings::default() };
    let model = ModelDir::open(&model_dir).unwrap();
    let plan = build_plan(&model, &settings).unwrap();
    let n = plan.items.len();
    assert!(plan.shards.len() >= 3, "the test needs several output shards");
    let reference_dir = tmp.path().join("reference");
    quantize_checkpoint(&model, &plan, &options(&reference_dir, false, None), &Silent).unwrap();
    let reference = output(&reference_dir);
    interrupted_then_resumed(&model_dir, &settings, &reference, &[1], "first");
    interrupted_then_resumed(&model_dir, &settings, &reference, &[n / 2], "middle");
    interrupted_then_resumed(&model_dir, &settings, &reference, &[n], "after-last-step");
    interrupted_then_resumed(&model_dir, &settings, &reference, &[3, 4, 5], "repeated");
}

#[test]
fn kill_and_resume_fp8_moe_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("ds");
    write_deepseek_demo(&model_dir, &DeepSeekDemo::default()).unwrap();
    let settings = JobSettings { max_shard_size: 250_000, ..JobSettings::default() };
    let model = ModelDir::open(&model_dir).unwrap();
    let plan = build_plan(&model, &settings).unwrap();
    let reference_dir = tmp.path().join("reference");
    quantize_checkpoint(&model, &plan, &options(&reference_dir, false, None), &Silent).unwrap();
    let reference = output(&reference_dir);
    interrupted_then_resumed(&model_dir, &settings, &reference, &[plan.items.len() / 3], "moe");
}

#[test]
fn resume_redoes_steps_whose_bytes_were_damaged() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("llama");
    write_llama_demo(&model_dir, &LlamaDemo { layers: 2, ..LlamaDemo::default() }).unwrap();
    let settings = JobSettings::default();
    let model = ModelDir::open(&model_dir).unwrap();
    let plan = build_plan(&model, &settings).unwrap();
    assert_eq!(plan.shards.len(), 1);
    let reference_dir = tmp.path().join("reference");
    quantize_checkpoint(&model, &plan, &options(&reference_dir, false, None), &Silent).unwrap();
    let out = tmp.path().join("out");
    // Stop after a layer boundary so some records are durable, then damage every written
    // byte of the partial shard: the resumed run must notice and redo those steps.
    let stop = plan.items.iter().position(|i| i.layer == "model.layers.1").unwrap() + 2;
    quantize_checkpoint(&model, &plan, &options(&out, false, Some(stop)), &Silent).unwrap_err();
    let tmpdir = temp_dir_for(&out).unwrap();
    let shard = tmpdir.join("model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let header_len = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for b in &mut bytes[header_len..] {
        *b ^= 0x5a;
    }
    std::fs::write(&shard, &bytes).unwrap();
    let report = quantize_checkpoint(&model, &plan, &options(&out, true, None), &Silent).unwrap();
    assert_eq!(report.resumed_items, 0, "every recorded step was damaged and must be redone");
    let (got, want) = (output(&out), output(&reference_dir));
    assert!(got == want, "a damaged partial output must be repaired, not kept");
}

#[test]
fn resume_refuses_changed_settings_or_input() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("llama");
    write_llama_demo(&model_dir, &LlamaDemo { layers: 2, ..LlamaDemo::default() }).unwrap();
    let settings = JobSettings::default();
    let out = tmp.path().join("out");
    let model = ModelDir::open(&model_dir).unwrap();
    let plan = build_plan(&model, &settings).unwrap();
    quantize_checkpoint(&model, &plan, &options(&out, false, Some(5)), &Silent).unwrap_err();

    // Without --resume the partial output is not silently reused or overwritten.
    let err = quantize_checkpoint(&model, &plan, &options(&out, false, None), &Silent).unwrap_err();
    assert!(matches!(err, ForgeError::Config(ref m) if m.contains("--resume")), "{err}");

    // Other settings.
    let bits3 =
        JobSettings { grid: fourbit_forge::GridConfig { bits: 3, ..settings.grid.clone() }, ..settings.clone() };
    let plan3 = build_plan(&model, &bits3).unwrap();
    let err = quantize_checkpoint(&model, &plan3, &options(&out, true, None), &Silent).unwrap_err();
    assert!(matches!(err, ForgeError::Resume(ref m) if m.contains("settings changed")), "{err}");
    let excl = JobSettings { exclude: vec!["*.o_proj".into()], ..settings.clone() };
    let err = quantize_checkpoint(&model, &build_plan(&model, &excl).unwrap(), &options(&out, true, None), &Silent)
        .unwrap_err();
    assert!(matches!(err, ForgeError::Resume(_)), "{err}");

    // A changed input (same shapes, new weights: only the data and mtime differ).
    drop(model);
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_llama_demo(&model_dir, &LlamaDemo { layers: 2, seed: 9, ..LlamaDemo::default() }).unwrap();
    let model = ModelDir::open(&model_dir).unwrap();
    let plan = build_plan(&model, &settings).unwrap();
    let err = quantize_checkpoint(&model, &plan, &options(&out, true, None), &Silent).unwrap_err();
    assert!(matches!(err, ForgeError::Resume(_)), "{err}");
    assert!(!out.exists());
    assert!(temp_dir_for(&out).unwrap().join("forge-manifest.jsonl").exists(), "the partial output is kept");
}

#[test]
fn resume_without_partial_output_starts_fresh() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("llama");
    write_llama_demo(&model_dir, &LlamaDemo { layers: 1, ..LlamaDemo::default() }).unwrap();
    let model = ModelDir::open(&model_dir).unwrap();
    let plan = build_plan(&model, &JobSettings::default()).unwrap();
    let out = tmp.path().join("out");
    let report = quantize_checkpoint(&model, &plan, &options(&out, true, None), &Silent).unwrap();
    assert_eq!(report.resumed_items, 0);
    assert!(out.join("model.safetensors").exists());
}
