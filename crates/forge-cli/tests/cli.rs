//! The `forge` binary as a user runs it: the demo job, inspect, quantize, a crash (the
//! process aborts mid-run) and `--resume`, and the messages bad inputs get.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

fn forge(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_forge"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("forge runs")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn ok(args: &[&str]) -> String {
    let o = forge(args, &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "forge {args:?} failed\nstdout:\n{out}\nstderr:\n{err}");
    out
}

fn fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let o = forge(args, env);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "forge {args:?} should fail\nstdout:\n{out}");
    err
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "forge_summary.json")
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn demo_job_without_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    let o = forge(&["quantize", "--cpu"], &[("TMPDIR", s(tmp.path()))]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("no model given: generating the built-in demo model"), "{out}");
    assert!(out.contains("peak RSS"), "{out}");
    let wrote = out.lines().find(|l| l.starts_with("wrote ")).unwrap();
    let path = wrote.trim_start_matches("wrote ").split(" (").next().unwrap();
    assert!(Path::new(path).join("config.json").exists() && Path::new(path).starts_with(tmp.path()), "{wrote}");
}

#[test]
fn inspect_quantize_crash_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("ds");
    ok(&["demo", "--moe", "-o", s(&model)]);
    let out = ok(&["inspect", s(&model), "--cpu"]);
    for want in [
        "architecture: DeepseekV3ForCausalLM (deepseek_v3)",
        "expert linear",
        "F8_E4M3",
        "router",
        "kept in full precision",
        "q_b_proj",
        "estimated time",
    ] {
        assert!(out.contains(want), "inspect output lacks {want:?}:\n{out}");
    }

    let full = tmp.path().join("full");
    let q = ["quantize", s(&model), "--cpu", "--max-shard-size", "300KB", "-o"];
    let out = ok(&[&q[..], &[s(&full)]].concat());
    assert!(out.contains("mean rel err") && out.contains("model.layers.1"), "{out}");

    // A crash: the process aborts after 7 steps; nothing looks complete, --resume finishes it.
    let crashed = tmp.path().join("crashed");
    let args = [&q[..], &[s(&crashed)]].concat();
    let o = forge(&args, &[("FORGE_TEST_ABORT_AFTER", "7")]);
    assert!(!o.status.success());
    assert!(!crashed.exists());
    assert!(tmp.path().join(".crashed.forge-partial").exists());
    let err = fails(&args, &[]);
    assert!(err.contains("--resume"), "{err}");
    let out = ok(&[&args[..], &["--resume"]].concat());
    assert!(out.contains("steps resumed") && out.contains("already done"), "{out}");
    assert_eq!(files(&crashed), files(&full), "a resumed run must write the bytes of an uninterrupted one");

    // Resuming with other settings is refused, the partial output kept.
    let other = tmp.path().join("other");
    let args = [&q[..], &[s(&other)]].concat();
    forge(&args, &[("FORGE_TEST_ABORT_AFTER", "3")]);
    let err = fails(&[&args[..], &["--resume", "--bits", "8"]].concat(), &[]);
    assert!(err.contains("cannot resume") && err.contains("settings changed"), "{err}");
    assert!(tmp.path().join(".other.forge-partial").exists());
}

#[test]
fn dry_run_and_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("llama");
    ok(&["demo", "-o", s(&model)]);
    let out_dir = tmp.path().join("out");
    let out = ok(&["quantize", s(&model), "-o", s(&out_dir), "--dry-run", "--mse"]);
    assert!(out.contains("dry run") && !out_dir.exists(), "{out}");

    // Output path is a file.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = fails(&["quantize", s(&model), "-o", s(&file), "--cpu"], &[]);
    assert!(err.contains("not a directory"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    // GPTQ without Hessians, and a missing Hessian directory.
    let err = fails(&["quantize", s(&model), "--method", "gptq"], &[]);
    assert!(err.contains("--hessians"), "{err}");

    // A missing shard.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("model.safetensors.index.json")).unwrap()).unwrap();
    let shard = index["weight_map"]["lm_head.weight"].as_str().unwrap();
    std::fs::remove_file(model.join(shard)).unwrap();
    let err = fails(&["inspect", s(&model)], &[]);
    assert!(err.contains(shard) && err.contains("does not exist"), "{err}");
}

#[test]
fn gptq_from_hessian_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("llama");
    let hess = tmp.path().join("hess");
    ok(&["demo", "-o", s(&model), "--hessians", s(&hess)]);
    let out_dir = tmp.path().join("out");
    let out = ok(&[
        "quantize",
        s(&model),
        "-o",
        s(&out_dir),
        "--cpu",
        "--method",
        "gptq",
        "--hessians",
        s(&hess),
        "--act-order",
        "--scale-dtype",
        "f32",
    ]);
    assert!(out.contains("GPTQ loss"), "{out}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("forge_summary.json")).unwrap()).unwrap();
    assert!(summary["tensors"].as_array().unwrap().iter().all(|t| t["method"] == "gptq"));
}

#[test]
fn gptq_calibrated_from_text_crash_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("llama");
    ok(&["demo", "-o", s(&model), "--layers", "3", "--hidden", "128"]);
    let calib = tmp.path().join("calib.jsonl");
    let words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"];
    let lines: Vec<String> = (0..60)
        .map(|i| {
            let t: Vec<&str> = (0..40).map(|k| words[(i * 7 + k * 3 + k * k) % words.len()]).collect();
            serde_json::json!({ "text": t.join(" ") }).to_string()
        })
        .collect();
    std::fs::write(&calib, lines.join("\n")).unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "quantize",
            s(&model),
            "-o",
            s(out),
            "--cpu",
            "--method",
            "gptq",
            "--calib",
            s(&calib),
            "--calib-samples",
            "4",
            "--seq-len",
            "64",
            "--calib-checkpoint-minutes",
            "0",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let whole = tmp.path().join("whole");
    let a = args(&whole);
    let out = ok(&strs(&a));
    assert!(out.contains("calibration: 4 samples × 64 tokens") && out.contains("layer 3/3 done"), "{out}");
    assert!(!tmp.path().join("whole.calibration").exists(), "the state goes once the output is complete");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(whole.join("forge_summary.json")).unwrap()).unwrap();
    assert_eq!(summary["settings"]["calibration"]["samples"], 4, "{summary}");
    assert!(summary["tensors"].as_array().unwrap().iter().all(|t| t["method"] == "gptq"));

    // Killed after two layers of calibration: the state stays, --resume finishes the job with
    // the same bytes as the uninterrupted run.
    let killed = tmp.path().join("killed");
    let k = args(&killed);
    let err = fails(&strs(&k), &[("FORGE_TEST_CALIB_FAIL_AFTER", "2")]);
    assert!(err.contains("--resume"), "{err}");
    assert!(tmp.path().join("killed.calibration").join("calibration.json").exists());
    let mut r = k.clone();
    r.push("--resume".into());
    let out = ok(&strs(&r));
    assert!(out.contains("resumed at layer 2 of 3"), "{out}");
    assert_eq!(files(&whole), files(&killed), "resumed output differs from the uninterrupted one");

    // With the default save interval (10 minutes) nothing was saved before the kill: the
    // resumed run redoes every layer and still writes the same bytes.
    let late = tmp.path().join("late");
    let mut k = args(&late);
    k.truncate(k.len() - 2);
    let err = fails(&strs(&k), &[("FORGE_TEST_CALIB_FAIL_AFTER", "2")]);
    assert!(err.contains("--resume"), "{err}");
    k.push("--resume".into());
    let out = ok(&strs(&k));
    assert!(!out.contains("resumed at layer"), "{out}");
    assert_eq!(files(&whole), files(&late), "redone output differs from the uninterrupted one");

    // Bad combinations.
    let mut rtn = args(&tmp.path().join("rtn"));
    rtn.retain(|x| x != "gptq" && x != "--method");
    let err = fails(&strs(&rtn), &[]);
    assert!(err.contains("--method gptq"), "{err}");
    let mut both = args(&tmp.path().join("both"));
    both.extend(["--hessians".to_string(), s(tmp.path()).to_string()]);
    let err = fails(&strs(&both), &[]);
    assert!(err.contains("cannot be used with"), "{err}");
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
