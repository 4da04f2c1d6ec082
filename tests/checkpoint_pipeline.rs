//! The pieces of the streaming run that do not need a GPU: the memory estimates and budget
//! checks (host window, the device engine's grow-only buffers), the host's half of a step the
//! device quantized (round to nearest from a given grid, with or without the engine's codes),
//! FP8 rows read without a whole-weight copy, and the shared bf16 rounding.

mod ckpt_util;

use fourbit_forge::checkpoint::budget::{check_gpu_budget, engine_jobs, estimate_memory, CPU_WINDOW};
use fourbit_forge::checkpoint::demo::{
    write_deepseek_demo, write_demo_hessians, write_llama_demo, DeepSeekDemo, LlamaDemo,
};
use fourbit_forge::checkpoint::fp8::{dequantize_fp8_blocks, f32_to_bf16_bytes, BlockScales};
use fourbit_forge::checkpoint::plan::{GptqSettings, JobSettings, Method, Work};
use fourbit_forge::checkpoint::quant::{quantize_rtn, rtn_from_grid, HostInput, RowSource};
use fourbit_forge::checkpoint::{build_plan, quantize_checkpoint, ModelDir, RunOptions, Silent};
use fourbit_forge::hessian::PreStepConfig;
use fourbit_forge::numerics::ScaleDtype;
use fourbit_forge::quantize::{FootprintTracker, JobShape, WeightShape, DEVICE_RESERVE};
use fourbit_forge::{Backend, ForgeError, GridConfig, MseSearch, Quantizer, ScaleSearch, WeightDtype, WeightView};
use ndarray::Array2;
use proptest::prelude::*;
use safetensors::Dtype;

fn shape(cols: usize, rows: &[usize], hessian: bool) -> JobShape {
    JobShape {
        cols,
        weights: rows.iter().map(|&r| WeightShape { rows: r, dtype: WeightDtype::BF16, scale_bytes: None }).collect(),
        hessian,
        want_dequant: false,
    }
}

#[test]
fn engine_footprint_grows_to_the_maxima_and_never_shrinks() {
    let g = GridConfig::default();
    let mut t = FootprintTracker::new();
    assert_eq!(t.total().device, DEVICE_RESERVE, "an engine that ran nothing holds only the reserve");
    t.add(&shape(512, &[1024], false), &g);
    let one = t.total();
    // Weight bytes (bf16) + codes + records + loss + row-error sums per slot, two slots;
    // staging likewise.
    let (r, c, ng) = (1024u64, 512u64, 4u64);
    let per_weight_pinned = 2 * r * c + r * c + 4 * r * ng + 4 * r + 16 * r;
    assert_eq!(one.pinned, 2 * (per_weight_pinned + 8 * 4), "pinned: staged weight, results, status, two slots");
    assert!(one.device > 2 * per_weight_pinned + DEVICE_RESERVE);
    // A smaller job changes nothing.
    t.add(&shape(256, &[512], false), &g);
    assert_eq!(t.total(), one);
    // A second weight position adds its own buffers; a Hessian adds the factor's.
    t.add(&shape(512, &[1024, 1024], false), &g);
    let two = t.total();
    assert!(two.pinned > one.pinned && two.device > one.device);
    t.add(&shape(512, &[16], true), &g);
    let gptq = t.total();
    // The Hessian buffer in both slots (each slot's status word is 8 bytes shorter: one weight).
    assert!(gptq.device >= two.device + 2 * (4 * 512 * 512 - 8), "the Hessian buffer in both slots");
    assert!(gptq.pinned > two.pinned, "a staged Hessian");
    // FP8 with block scales: codes, scales, and the f32 weight dequantized on the device.
    let mut f = FootprintTracker::new();
    let fp8 = JobShape {
        cols: 512,
        weights: vec![WeightShape { rows: 1024, dtype: WeightDtype::Fp8E4M3, scale_bytes: Some(8 * 4 * 4) }],
        hessian: false,
        want_dequant: false,
    };
    f.add(&fp8, &g);
    let mut b = FootprintTracker::new();
    b.add(&shape(512, &[1024], false), &g);
    assert_eq!(f.total().pinned + 2 * (r * c), b.total().pinned + 2 * 8 * 4 * 4, "fp8: 1 byte staged, plus scales");
    assert_eq!(f.total().device, b.total().device - 2 * (2 * r * c) + 2 * (r * c + 128 + 4 * r * c));
}

fn llama(dir: &std::path::Path) {
    write_llama_demo(dir, &LlamaDemo { layers: 3, shard_bytes: 900_000, ..LlamaDemo::default() }).unwrap();
}

#[test]
fn gpu_budget_names_the_first_step_the_engine_outgrows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    llama(&dir);
    let model = ModelDir::open(&dir).unwrap();
    let plan = build_plan(&model, &JobSettings::default()).unwrap();
    let full = check_gpu_budget(&model, &plan, u64::MAX).unwrap();
    // The footprint after each step, walked as the check walks it.
    let mut t = FootprintTracker::new();
    let mut after: Vec<(String, u64)> = Vec::new();
    for item in &plan.items {
        if let Work::Quantize { members } = &item.work {
            for j in engine_jobs(&model, &plan, members) {
                t.add(&j, &plan.settings.grid);
            }
            after.push((item.label.clone(), t.total().device));
        }
    }
    assert_eq!(after.last().unwrap().1, full);
    // A budget just below the growth at some step: that step is named, with the bytes.
    let k = after.windows(2).position(|w| w[1].1 > w[0].1).expect("the engine grows at some step") + 1;
    let (label, needed) = after[k].clone();
    match check_gpu_budget(&model, &plan, needed - 1) {
        Err(ForgeError::GpuMemoryBudget { what, needed: n, budget }) => {
            assert_eq!((what.as_str(), n, budget), (label.as_str(), needed, needed - 1));
        }
        other => panic!("expected GpuMemoryBudget at {label}, got {other:?}"),
    }
    assert!(check_gpu_budget(&model, &plan, full).is_ok());
}

#[test]
fn host_estimate_counts_the_steps_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    llama(&dir);
    let model = ModelDir::open(&dir).unwrap();
    let plan = build_plan(&model, &JobSettings::default()).unwrap();
    let cpu = estimate_memory(&model, &plan, false);
    let want = (0..plan.items.len())
        .map(|k| plan.items[k..].iter().take(CPU_WINDOW).map(|i| i.memory).sum::<u64>())
        .max()
        .unwrap();
    assert_eq!(cpu.host, want);
    assert!(cpu.device.is_none() && cpu.pinned == 0);
    let single = plan.items.iter().map(|i| i.memory).max().unwrap();
    assert!(cpu.host > single, "two steps are in flight");
    let gpu = estimate_memory(&model, &plan, true);
    assert!(gpu.pinned > 0 && gpu.device.is_some() && gpu.host > gpu.pinned);
    // The run refuses a budget between one step and the window, before writing anything.
    let out = tmp.path().join("out");
    let mut opts = RunOptions::new(out.clone(), Backend::Cpu);
    opts.max_host_memory = single;
    match quantize_checkpoint(&model, &plan, &opts, &Silent) {
        Err(ForgeError::OutOfMemory { requested, limit, .. }) => {
            assert_eq!((requested, limit), (Some(cpu.host), single))
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    assert!(!out.exists());
}

#[test]
fn rtn_from_given_codes_equals_rtn_computed_on_the_host() {
    let mut rng = fourbit_forge::checkpoint::demo::DemoRng::new(5);
    let w = rng.weight(67, 300);
    let wb = w.mapv(half::bf16::from_f32);
    for search in [ScaleSearch::Absmax, ScaleSearch::Mse(MseSearch::default())] {
        for sd in [ScaleDtype::F32, ScaleDtype::BF16, ScaleDtype::F16] {
            let cfg =
                GridConfig { group_size: 64, bits: 3, symmetric: false, scale_search: search.clone(), scale_dtype: sd };
            let q = Quantizer::new(cfg, Backend::Cpu);
            let view = WeightView::BF16(wb.view());
            let host = quantize_rtn(&q, view).unwrap();
            assert_eq!(host.grid.scale_dtype, sd);
            let given = rtn_from_grid(&RowSource::View(view), host.grid.clone(), Some(host.codes.clone())).unwrap();
            assert_eq!(given.codes, host.codes);
            assert_eq!(given.grid, host.grid);
            assert_eq!(given.rel_weight_error.to_bits(), host.rel_weight_error.to_bits(), "{sd:?}");
            assert!(host.rel_weight_error > 0.0 && host.rel_weight_error < 0.1);
        }
    }
    let view = WeightView::F32(w.view());
    let g = fourbit_forge::grid::build_quant_grid(view, &GridConfig::default()).unwrap();
    let bad = rtn_from_grid(&RowSource::View(view), g.clone(), Some(Array2::zeros((3, 3))));
    assert!(matches!(bad, Err(ForgeError::Shape(_))));
    let small = w.slice(ndarray::s![..10, ..]).to_owned();
    let bad = rtn_from_grid(&RowSource::View(WeightView::F32(small.view())), g, None);
    assert!(matches!(bad, Err(ForgeError::Shape(_))), "a grid of another weight");
}

#[test]
fn fp8_rows_read_in_place_equal_the_whole_weight_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    write_deepseek_demo(&dir, &DeepSeekDemo::default()).unwrap();
    let model = ModelDir::open(&dir).unwrap();
    let plan = build_plan(&model, &JobSettings::default()).unwrap();
    let block = model.fp8_block().unwrap();
    let mut seen = 0;
    for item in &plan.items {
        let Work::Quantize { members } = &item.work else { continue };
        for m in members {
            let input = HostInput::open(&model, m, block).unwrap();
            let HostInput::Fp8 { q, .. } = &input else { panic!("{} is FP8 in the demo", m.weight) };
            let s = model.tensor(m.scale.as_ref().unwrap()).unwrap();
            let scales =
                BlockScales { bytes: model.bytes(s).unwrap(), dtype: s.info.dtype, shape: s.info.dims2().unwrap() };
            let whole = dequantize_fp8_blocks(q, m.dims.0, m.dims.1, scales, block).unwrap();
            let rows = input.rows();
            let mut buf = vec![0f32; m.dims.1];
            for r in 0..m.dims.0 {
                rows.read_row_f32(r, &mut buf).unwrap();
                assert!(buf.iter().zip(whole.row(r)).all(|(a, b)| a.to_bits() == b.to_bits()), "{} row {r}", m.weight);
            }
            let (view, blocks) = input.engine_view().unwrap();
            assert_eq!((view.dtype(), view.dim()), (WeightDtype::Fp8E4M3, m.dims));
            assert_eq!(blocks.unwrap().block, block);
            seen += 1;
        }
    }
    assert!(seen > 10, "the demo quantizes its FP8 Linears");
    // A NaN code is reported at its place, as the whole-weight reference does.
    let q = vec![0x38u8, 0x7f, 0x38, 0x38];
    let s = 1f32.to_le_bytes();
    let blocks = BlockScales { bytes: &s, dtype: Dtype::F32, shape: (1, 1) }.blocks((128, 128)).unwrap();
    let src = RowSource::Fp8 { q: &q, blocks, dims: (2, 2) };
    let mut buf = [0f32; 2];
    assert!(matches!(src.read_row_f32(0, &mut buf), Err(ForgeError::NonFinite { row: 0, col: 1, .. })));
    src.read_row_f32(1, &mut buf).unwrap();
    assert_eq!(buf, [1.0, 1.0]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The shared bf16 rounding (what the device kernel uses) equals the `half` crate's on any
    /// finite f32 and on the boundaries (ties, overflow to inf, subnormals).
    #[test]
    fn bf16_rounding_matches_half(bits in proptest::collection::vec(any::<u32>(), 1..200)) {
        let mut v: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).filter(|x| !x.is_nan()).collect();
        v.extend([0.0, -0.0, f32::MAX, f32::MIN_POSITIVE, 1.0 + f32::EPSILON * 64.0, f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000), f32::from_bits(1)]);
        let got = f32_to_bf16_bytes(&v);
        let want: Vec<u8> = v.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn writer_thread_run_is_byte_identical_for_every_format() {
    // The writer thread writes steps as they come; the bytes are those of the plan whatever
    // the order. Two runs of the same plan agree byte for byte (timings aside).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    llama(&dir);
    for format in ["compressed-tensors", "gptq", "qmeta4"] {
        let settings = JobSettings { format: format.into(), max_shard_size: 700_000, ..JobSettings::default() };
        let a = tmp.path().join(format!("a-{format}"));
        let b = tmp.path().join(format!("b-{format}"));
        ckpt_util::run(&dir, &a, &settings).unwrap();
        ckpt_util::run(&dir, &b, &settings).unwrap();
        let (mut fa, mut fb) = (ckpt_util::dir_files(&a), ckpt_util::dir_files(&b));
        fa.remove("forge_summary.json");
        fb.remove("forge_summary.json");
        assert!(fa.len() > 3, "{format}: shards, index, config, aux files");
        assert!(fa == fb, "{format}: two runs differ");
    }
}

/// Runs `settings` on `model_dir` into `out`: the CPU path, or the device path's pipeline with
/// the CPU references standing in for the engine.
fn run_with(model_dir: &std::path::Path, out: &std::path::Path, settings: &JobSettings, pipeline: bool) {
    let model = ModelDir::open(model_dir).unwrap();
    let plan = build_plan(&model, settings).unwrap();
    let mut opts = RunOptions::new(out.to_path_buf(), Backend::Cpu);
    opts.reference_pipeline = pipeline;
    quantize_checkpoint(&model, &plan, &opts, &Silent).unwrap();
}

/// Every file (the summary without its timings) of an output directory.
fn files_without_timings(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut f = ckpt_util::dir_files(dir);
    let mut s: serde_json::Value = serde_json::from_slice(&f.remove("forge_summary.json").unwrap()).unwrap();
    let o = s.as_object_mut().unwrap();
    o.remove("seconds");
    o.remove("peak_rss_bytes");
    for l in o["layers"].as_array_mut().unwrap() {
        l.as_object_mut().unwrap().remove("seconds");
    }
    f.insert("summary".into(), serde_json::to_vec(&s).unwrap());
    f
}

/// The device path's host logic (one engine job per Hessian set, two in flight, plain steps
/// held back to plan order, the writer's finishing: stored-scale codes, the engine's codes for
/// f32 scales, errors from the mapped input, FP8 rows) gives exactly the CPU path's bytes when
/// the engine computes what the CPU does.
#[test]
fn device_pipeline_with_reference_engine_writes_the_cpu_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dense_dir = tmp.path().join("llama");
    write_llama_demo(&dense_dir, &LlamaDemo { layers: 2, shard_bytes: 900_000, ..LlamaDemo::default() }).unwrap();
    let moe_dir = tmp.path().join("ds");
    write_deepseek_demo(&moe_dir, &DeepSeekDemo::default()).unwrap();
    let mse = GridConfig { scale_search: ScaleSearch::Mse(MseSearch::default()), ..GridConfig::default() };
    let mut cases: Vec<(String, std::path::PathBuf, JobSettings)> = Vec::new();
    for (name, dir) in [("dense", &dense_dir), ("moe", &moe_dir)] {
        cases.push((
            format!("{name}-ct"),
            dir.clone(),
            JobSettings { max_shard_size: 500_000, ..JobSettings::default() },
        ));
        cases.push((
            format!("{name}-qmeta4"),
            dir.clone(),
            JobSettings { format: "qmeta4".into(), ..JobSettings::default() },
        ));
        cases.push((
            format!("{name}-mse-gptqfmt"),
            dir.clone(),
            JobSettings { grid: mse.clone(), format: "gptq".into(), ..JobSettings::default() },
        ));
        for (share, act_order) in [(true, true), (false, false)] {
            let hess = tmp.path().join(format!("hess-{name}-{share}"));
            if !hess.exists() {
                write_demo_hessians(dir, &hess, 300, 2, share).unwrap();
            }
            let method = Method::Gptq(GptqSettings {
                hessians: hess,
                pre_step: PreStepConfig { act_order, ..PreStepConfig::default() },
                allow_missing: false,
            });
            cases.push((
                format!("{name}-gptq-share{share}"),
                dir.clone(),
                JobSettings { method, format: "qmeta4".into(), ..JobSettings::default() },
            ));
        }
    }
    for (tag, dir, settings) in &cases {
        let (a, b) = (tmp.path().join(format!("cpu-{tag}")), tmp.path().join(format!("pipe-{tag}")));
        run_with(dir, &a, settings, false);
        run_with(dir, &b, settings, true);
        let (fa, fb) = (files_without_timings(&a), files_without_timings(&b));
        assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>(), "{tag}");
        for (k, v) in &fa {
            assert!(fb[k] == *v, "{tag}: {k} differs between the CPU path and the device pipeline");
        }
    }
    // Several jobs per step (members with their own Hessians) really happened.
    let (_, dir, settings) = cases.iter().find(|c| c.0 == "dense-gptq-sharefalse").unwrap();
    let plan = build_plan(&ModelDir::open(dir).unwrap(), settings).unwrap();
    let most = plan
        .items
        .iter()
        .map(|i| match &i.work {
            Work::Quantize { members } => {
                fourbit_forge::checkpoint::budget::hessian_sets(members, &plan.settings.method).len()
            }
            _ => 0,
        })
        .max()
        .unwrap();
    assert_eq!(most, 3, "q/k/v with their own Hessian files: three jobs in one step");
}

#[test]
fn device_pipeline_kill_and_resume_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("llama");
    write_llama_demo(&dir, &LlamaDemo { layers: 3, shard_bytes: 900_000, ..LlamaDemo::default() }).unwrap();
    let settings = JobSettings { max_shard_size: 400_000, ..JobSettings::default() };
    let reference = tmp.path().join("reference");
    run_with(&dir, &reference, &settings, false);
    let want = files_without_timings(&reference);
    let model = ModelDir::open(&dir).unwrap();
    let plan = build_plan(&model, &settings).unwrap();
    let n = plan.items.len();
    for stops in [vec![n / 2], vec![2, 3, n / 3]] {
        let out = tmp.path().join(format!("out-{stops:?}"));
        for (k, &stop) in stops.iter().enumerate() {
            let mut opts = RunOptions::new(out.clone(), Backend::Cpu);
            opts.reference_pipeline = true;
            opts.resume = k > 0;
            opts.fail_after_items = Some(stop);
            let err = quantize_checkpoint(&model, &plan, &opts, &Silent).unwrap_err();
            assert!(matches!(err, ForgeError::Interrupted(m) if m == stop), "{err}");
            assert!(!out.exists());
        }
        let mut opts = RunOptions::new(out.clone(), Backend::Cpu);
        opts.reference_pipeline = true;
        opts.resume = true;
        let report = quantize_checkpoint(&model, &plan, &opts, &Silent).unwrap();
        assert!(report.resumed_items > 0, "{stops:?}");
        assert!(files_without_timings(&out) == want, "{stops:?}: resumed through the pipeline");
    }
    // A NaN weight: the typed error comes through the pipeline, nothing looks complete.
    let t = model.tensor("model.layers.1.mlp.up_proj.weight").unwrap().clone();
    let path = model.shards[t.shard].path().to_path_buf();
    drop(model);
    let mut bytes = std::fs::read(&path).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = header + t.info.offset + 2 * (5 * t.info.shape[1] + 7);
    bytes[at..at + 2].copy_from_slice(&0x7fc0u16.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let model = ModelDir::open(&dir).unwrap();
    let plan = build_plan(&model, &settings).unwrap();
    for pipeline in [false, true] {
        let out = tmp.path().join(format!("nan-{pipeline}"));
        let mut opts = RunOptions::new(out.clone(), Backend::Cpu);
        opts.reference_pipeline = pipeline;
        let err = quantize_checkpoint(&model, &plan, &opts, &Silent).unwrap_err();
        assert!(matches!(err, ForgeError::NonFinite { row: 5, col: 7, .. }), "pipeline {pipeline}: {err}");
        assert!(!out.exists());
    }
}

/// Patches tensor `name` of the safetensors file `path` in place (`edit` gets its bytes).
fn patch_tensor(path: &std::path::Path, name: &str, edit: impl FnOnce(&mut [u8])) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offsets = header[name]["data_offsets"].as_array().unwrap();
    let (a, b) = (offsets[0].as_u64().unwrap() as usize, offsets[1].as_u64().unwrap() as usize);
    edit(&mut bytes[8 + n + a..8 + n + b]);
    std::fs::write(path, bytes).unwrap();
}

/// The file of the model directory holding tensor `name`.
fn shard_of(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return dir.join("model.safetensors");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(index).unwrap()).unwrap();
    dir.join(v["weight_map"][name].as_str().unwrap())
}

/// The device path reports what the CPU path reports when a Hessian is asymmetric (scanned on
/// the host before submit) and a group of a weight is flushed to zero (scanned on the host
/// after the device returns the codes): the summaries, with their flags, are equal.
#[test]
fn device_pipeline_reports_asymmetric_hessians_and_flushed_groups_as_the_cpu_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("llama");
    write_llama_demo(&dir, &LlamaDemo { layers: 1, ..LlamaDemo::default() }).unwrap();
    let hess = tmp.path().join("hess");
    write_demo_hessians(&dir, &hess, 300, 3, true).unwrap();
    // q/k/v's shared Hessian (named by the first of them) loses its symmetry at (0, 1).
    let qkv = std::fs::read_dir(&hess)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("self_attn") && !p.to_string_lossy().contains("o_proj"))
        .unwrap();
    patch_tensor(&qkv, "hessian", |b| {
        let v = f32::from_le_bytes(b[4..8].try_into().unwrap()) * 1.5 + 0.5;
        b[4..8].copy_from_slice(&v.to_le_bytes());
    });
    // The first group of o_proj's first row holds values far below the f16 scales' range.
    let o = "model.layers.0.self_attn.o_proj.weight";
    patch_tensor(&shard_of(&dir, o), o, |b| {
        for v in b[..2 * 128].chunks_exact_mut(2) {
            v.copy_from_slice(&half::bf16::from_f32(1e-12).to_le_bytes());
        }
    });
    let settings = JobSettings {
        method: Method::Gptq(GptqSettings { hessians: hess, pre_step: PreStepConfig::default(), allow_missing: false }),
        format: "gptq".into(),
        ..JobSettings::default()
    };
    let (a, b) = (tmp.path().join("cpu"), tmp.path().join("pipe"));
    run_with(&dir, &a, &settings, false);
    run_with(&dir, &b, &settings, true);
    let summary = |d: &std::path::Path| files_without_timings(d).remove("summary").unwrap();
    let (sa, sb) = (summary(&a), summary(&b));
    let text = String::from_utf8(sa.clone()).unwrap();
    assert!(text.contains("is not symmetric"), "the CPU path flags the Hessian: {text}");
    assert!(text.contains("dequantize to 0"), "the CPU path flags the group: {text}");
    assert_eq!(String::from_utf8(sb).unwrap(), text, "the device path's summary");
}
