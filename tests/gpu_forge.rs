//! `forge quantize` on a GPU (the device engine, two jobs in flight, FP8 dequantized on the
//! device) against the CPU run, and the FP8 block-dequantization kernel against its CPU
//! reference. Skips (printing why) without a GPU.
//!
//! What must agree, and why:
//! * FP8 → f32/bf16 on the device: bit for bit (both compute `forge_numerics::fp8_block_dequant`,
//!   one f32 multiply; bf16 by the shared round-to-nearest-even).
//! * Round to nearest with absmax grids: every output file byte for byte, the summary too
//!   except timings and the backend's name (absmax records are bit-identical on the device,
//!   docs/design.md §3; the codes are the engine's `U = I` solve against the stored scale,
//!   which must equal the CPU's round to nearest in every scale dtype).
//! * MSE grids: the device's choice may differ from the CPU's only where the two candidates'
//!   losses agree within 1e-4 (docs/design.md §9 d, tests/gpu_grid_parity.rs derives it);
//!   every other record, and every code of a group with the same record, is identical.
//! * GPTQ: the device pre-step runs in f64 on cuSOLVER, so codes may flip at rounding
//!   midpoints: at most 2 % per tensor, by one step (tests/gpu_engine.rs, gpu_solver_parity.rs);
//!   the records are identical, and the GPTQ loss and relative error agree within 2e-3.
//! * Kill and resume on the GPU: byte-identical to the uninterrupted run.

mod ckpt_util;
mod common;

use ckpt_util::{dir_files, read_all, Read};
use fourbit_forge::checkpoint::budget::hessian_sets;
use fourbit_forge::checkpoint::demo::{
    write_deepseek_demo, write_demo_hessians, write_llama_demo, DeepSeekDemo, DemoRng, LlamaDemo,
};
use fourbit_forge::checkpoint::fp8::{dequantize_fp8_blocks, f32_to_bf16_bytes, quantize_fp8_blocks, BlockScales};
use fourbit_forge::checkpoint::output::temp_dir_for;
use fourbit_forge::checkpoint::plan::{GptqSettings, JobSettings, Method, Plan, Work};
use fourbit_forge::checkpoint::quant::load_weight;
use fourbit_forge::checkpoint::run::SUMMARY_FILE;
use fourbit_forge::checkpoint::{build_plan, quantize_checkpoint, ModelDir, RunOptions, RunReport, Silent};
use fourbit_forge::grid::candidate_loss_f64;
use fourbit_forge::hessian::PreStepConfig;
use fourbit_forge::numerics::{quantize, QMetaPacked};
use fourbit_forge::quantize::{HessianInput, LayerJob, QuantEngine};
use fourbit_forge::weights::{dequantize_fp8_blocks_gpu, dequantize_fp8_blocks_gpu_bf16, BlockScaleDtype, Fp8Blocks};
use fourbit_forge::{Backend, ForgeError, GridConfig, MseSearch, ScaleSearch, WeightView};
use ndarray::Array2;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

const MSE_LOSS_RTOL: f64 = 1e-4;
const GPTQ_CODE_FRACTION: f64 = 0.02;
const GPTQ_OBJECTIVE_RTOL: f64 = 2e-3;

fn run(model_dir: &Path, out: &Path, settings: &JobSettings, backend: Backend, profile: bool) -> RunReport {
    let model = ModelDir::open(model_dir).unwrap();
    let plan = build_plan(&model, settings).unwrap();
    let mut opts = RunOptions::new(out.to_path_buf(), backend);
    opts.profile = profile;
    quantize_checkpoint(&model, &plan, &opts, &Silent).unwrap()
}

/// Output files without the summary, and the summary without what legitimately differs.
fn output(dir: &Path) -> (BTreeMap<String, Vec<u8>>, serde_json::Value) {
    let mut files = dir_files(dir);
    let mut summary: serde_json::Value = serde_json::from_slice(&files.remove(SUMMARY_FILE).unwrap()).unwrap();
    let obj = summary.as_object_mut().unwrap();
    for k in ["backend", "seconds", "peak_rss_bytes"] {
        obj.remove(k);
    }
    for l in obj["layers"].as_array_mut().unwrap() {
        l.as_object_mut().unwrap().remove("seconds");
    }
    (files, summary)
}

fn assert_same_output(cpu: &Path, gpu: &Path, what: &str) {
    let (fc, sc) = output(cpu);
    let (fg, sg) = output(gpu);
    assert_eq!(fc.keys().collect::<Vec<_>>(), fg.keys().collect::<Vec<_>>(), "{what}: file set");
    for (name, bytes) in &fc {
        assert!(fg[name] == *bytes, "{what}: {name} differs between the CPU and the GPU run");
    }
    assert_eq!(sc, sg, "{what}: summary");
}

fn quantize_steps(plan: &Plan) -> usize {
    plan.items.iter().filter(|i| matches!(i.work, Work::Quantize { .. })).count()
}

fn engine_jobs(plan: &Plan) -> u64 {
    plan.items
        .iter()
        .map(|i| match &i.work {
            Work::Quantize { members } => hessian_sets(members, &plan.settings.method).len() as u64,
            _ => 0,
        })
        .sum()
}

/// A scale tensor of `s` in `dtype`, as stored.
fn scale_bytes(s: &Array2<f32>, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => s.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => s.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        _ => s.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
    }
}

#[test]
fn fp8_kernel_equals_the_cpu_reference_on_odd_shapes() {
    let Some(dev) = common::gpu_or_skip("fp8_kernel_equals_the_cpu_reference_on_odd_shapes") else { return };
    let mut rng = DemoRng::new(11);
    let mut checked = 0usize;
    for (rows, cols, block) in [
        (1, 1, (128, 128)),
        (130, 259, (128, 128)),
        (576, 300, (128, 128)),
        (7, 5, (2, 4)),
        (257, 1000, (64, 96)),
        (3, 70_001, (128, 128)),
    ] {
        // Codes from a weight quantized DeepSeek's way, then adversarial codes mixed in:
        // subnormals, ±0, the largest finite, both signs (no NaN code: that is an error).
        let w = rng.weight(rows, cols).mapv(|v| v * 40.0);
        let (mut q, s) = quantize_fp8_blocks(&w, block);
        for (i, c) in q.iter_mut().enumerate() {
            match i % 97 {
                0 => *c = 0x01,
                1 => *c = 0x80,
                2 => *c = 0x7e,
                3 => *c = 0xfe,
                4 => *c = 0x87,
                _ => {}
            }
        }
        // Scales across the range (tiny, huge, f32 subnormal) so products round, underflow
        // and overflow to inf; f16 scales keep to its range (a scale that becomes inf in f16
        // is an error, tested below).
        let wide = s.mapv(|v| v);
        let mut s = s;
        for (k, v) in s.iter_mut().enumerate() {
            *v = match k % 5 {
                0 => *v,
                1 => *v * 1e-30,
                2 => 3.0e36,
                3 => f32::from_bits(0x0000_1234),
                _ => -*v,
            };
        }
        for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            let s = if dtype == Dtype::F16 { wide.mapv(|v| v * 0.5) } else { s.clone() };
            let bytes = scale_bytes(&s, dtype);
            let bs = BlockScales { bytes: &bytes, dtype, shape: s.dim() };
            let what = format!("{rows}×{cols} blocks {block:?} {dtype:?}");
            let cpu = dequantize_fp8_blocks(&q, rows, cols, bs, block).unwrap();
            let blocks = bs.blocks(block).unwrap();
            let gpu = dequantize_fp8_blocks_gpu(&dev, &q, rows, cols, &blocks).unwrap();
            assert_eq!(gpu.dim(), cpu.dim(), "{what}");
            for (k, (a, b)) in gpu.iter().zip(cpu.iter()).enumerate() {
                assert!(a.to_bits() == b.to_bits(), "{what}: element {k}: gpu {a:e} cpu {b:e}");
            }
            let bf = dequantize_fp8_blocks_gpu_bf16(&dev, &q, rows, cols, &blocks).unwrap();
            assert!(bf == f32_to_bf16_bytes(cpu.as_slice().unwrap()), "{what}: bf16 output");
            checked += cpu.len();
        }
    }
    // Errors as the reference reports them: a NaN code at its place, a non-finite scale.
    let (rows, cols) = (40, 300);
    let mut q = vec![0x38u8; rows * cols];
    q[17 * cols + 299] = 0x7f;
    let s = Array2::<f32>::ones((1, 3));
    let b = scale_bytes(&s, Dtype::F32);
    let blocks = Fp8Blocks { scales: &b, dtype: BlockScaleDtype::F32, block: (128, 128) };
    for r in [
        dequantize_fp8_blocks_gpu(&dev, &q, rows, cols, &blocks).map(|_| ()),
        dequantize_fp8_blocks(&q, rows, cols, BlockScales { bytes: &b, dtype: Dtype::F32, shape: (1, 3) }, (128, 128))
            .map(|_| ()),
    ] {
        assert!(matches!(r, Err(ForgeError::NonFinite { tensor: "fp8 weight", row: 17, col: 299, .. })), "{r:?}");
    }
    let bad = scale_bytes(&Array2::from_elem((1, 3), f32::INFINITY), Dtype::F32);
    let blocks = Fp8Blocks { scales: &bad, ..blocks };
    assert!(matches!(
        dequantize_fp8_blocks_gpu(&dev, &q, rows, cols, &blocks),
        Err(ForgeError::NonFinite { tensor: "weight_scale_inv", row: 0, col: 0, .. })
    ));
    eprintln!("fp8 dequantization: {checked} elements bit-identical to the CPU reference");
}

#[test]
fn engine_quantizes_block_scaled_fp8_as_its_cpu_dequantized_weight() {
    let Some(dev) = common::gpu_or_skip("engine_quantizes_block_scaled_fp8_as_its_cpu_dequantized_weight") else {
        return;
    };
    let mut engine = QuantEngine::new(dev.clone()).unwrap();
    let mut rng = DemoRng::new(12);
    let mse = GridConfig { scale_search: ScaleSearch::Mse(MseSearch::default()), ..GridConfig::default() };
    for (rows, cols, cfg) in [(576, 384, GridConfig::default()), (200, 640, mse)] {
        let w = rng.weight(rows, cols);
        let (q, s) = quantize_fp8_blocks(&w, (128, 128));
        let sb = scale_bytes(&s, Dtype::BF16);
        let bs = BlockScales { bytes: &sb, dtype: Dtype::BF16, shape: s.dim() };
        let deq = dequantize_fp8_blocks(&q, rows, cols, bs, (128, 128)).unwrap();
        let other = rng.weight(96, cols).mapv(half::bf16::from_f32);
        let qv = ndarray::ArrayView2::from_shape((rows, cols), &q[..]).unwrap();
        let u = Array2::<f32>::eye(cols) * 0.5 + Array2::from_elem((cols, cols), 0.001);
        let u = Array2::from_shape_fn((cols, cols), |(i, j)| if j >= i { u[[i, j]] } else { 0.0 });
        for hessian in [HessianInput::NoTokens, HessianInput::Factor { u: u.view(), perm: None }] {
            // FP8 with scales beside a bf16 weight in one job, against the CPU-dequantized f32.
            let mut fp8_job = LayerJob::new(WeightView::Fp8E4M3(qv), hessian, &cfg);
            fp8_job.weights.push(WeightView::BF16(other.view()));
            fp8_job.block_scales = vec![Some(bs.blocks((128, 128)).unwrap()), None];
            fp8_job.want_dequant = true;
            let mut f32_job = LayerJob::new(WeightView::F32(deq.view()), hessian, &cfg);
            f32_job.weights.push(WeightView::BF16(other.view()));
            f32_job.want_dequant = true;
            let a = engine.quantize(&fp8_job).unwrap();
            let b = engine.quantize(&f32_job).unwrap();
            for (x, y) in a.weights.iter().zip(&b.weights) {
                assert_eq!(x.grid, y.grid, "{rows}×{cols}: grid");
                assert_eq!(x.codes, y.codes, "{rows}×{cols}: codes");
                assert!(x.loss.iter().zip(&y.loss).all(|(p, q)| p.to_bits() == q.to_bits()));
                let (dx, dy) = (x.dequant.as_ref().unwrap(), y.dequant.as_ref().unwrap());
                assert!(dx.iter().zip(dy.iter()).all(|(p, q)| p.to_bits() == q.to_bits()));
            }
        }
    }
    // A NaN code is a typed error at its place, and the engine recovers.
    let (rows, cols) = (8, 256);
    let mut q = vec![0x38u8; rows * cols];
    q[3 * cols + 200] = 0xff;
    let sb = scale_bytes(&Array2::ones((1, 2)), Dtype::F32);
    let blocks = Fp8Blocks { scales: &sb, dtype: BlockScaleDtype::F32, block: (128, 128) };
    let cfg = GridConfig::default();
    let qv = ndarray::ArrayView2::from_shape((rows, cols), &q[..]).unwrap();
    let mut job = LayerJob::new(WeightView::Fp8E4M3(qv), HessianInput::NoTokens, &cfg);
    job.block_scales = vec![Some(blocks)];
    match engine.quantize(&job) {
        Err(ForgeError::NonFinite { tensor: "weight", row: 3, col: 200, value }) => assert!(value.is_nan()),
        other => panic!("expected NonFinite at (3, 200), got {other:?}"),
    }
    // Mismatched block scales are refused before any device work.
    job.block_scales = vec![Some(blocks), None];
    assert!(matches!(engine.quantize(&job), Err(ForgeError::Config(_))));
    q[3 * cols + 200] = 0x38;
    let qv = ndarray::ArrayView2::from_shape((rows, cols), &q[..]).unwrap();
    let mut job = LayerJob::new(WeightView::Fp8E4M3(qv), HessianInput::NoTokens, &cfg);
    job.block_scales = vec![Some(blocks)];
    let ok = engine.quantize(&job).unwrap();
    assert!(ok.weights[0].codes.iter().all(|&c| c == ok.weights[0].codes[[0, 0]]));
}

fn dense(dir: &Path) {
    write_llama_demo(dir, &LlamaDemo { layers: 3, shard_bytes: 900_000, ..LlamaDemo::default() }).unwrap();
}

#[test]
fn forge_rtn_absmax_on_gpu_equals_the_cpu_run_byte_for_byte() {
    let Some(dev) = common::gpu_or_skip("forge_rtn_absmax_on_gpu_equals_the_cpu_run_byte_for_byte") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dense_dir = tmp.path().join("llama");
    dense(&dense_dir);
    let moe_dir = tmp.path().join("ds");
    write_deepseek_demo(&moe_dir, &DeepSeekDemo::default()).unwrap();
    // Scales stored as bf16, f32, f16 (GPTQ format), and an asymmetric g64 grid.
    let cases = [
        ("ct-bf16", JobSettings { max_shard_size: 600_000, ..JobSettings::default() }),
        ("qmeta4-f32", JobSettings { format: "qmeta4".into(), ..JobSettings::default() }),
        ("gptq-f16", JobSettings { format: "gptq".into(), ..JobSettings::default() }),
        (
            "ct-asym4-g64",
            JobSettings {
                grid: GridConfig { bits: 4, group_size: 64, symmetric: false, ..GridConfig::default() },
                ..JobSettings::default()
            },
        ),
    ];
    for (model_dir, model) in [(&dense_dir, "dense"), (&moe_dir, "fp8-moe")] {
        for (tag, settings) in &cases {
            let what = format!("{model} {tag}");
            let cpu = tmp.path().join(format!("cpu-{model}-{tag}"));
            let gpu = tmp.path().join(format!("gpu-{model}-{tag}"));
            run(model_dir, &cpu, settings, Backend::Cpu, false);
            let report = run(model_dir, &gpu, settings, Backend::Gpu(dev.clone()), true);
            assert_same_output(&cpu, &gpu, &what);
            let plan = build_plan(&ModelDir::open(model_dir).unwrap(), settings).unwrap();
            let g = report.gpu.as_ref().expect("a GPU run reports its device work");
            assert_eq!(g.jobs, engine_jobs(&plan), "{what}: one job per fused group");
            assert!(g.kernel_ms > 0.0 && g.upload_bytes > 0 && g.download_bytes > 0, "{what}: {g:?}");
            assert!(g.estimate <= g.budget, "{what}");
            assert_eq!(report.items.len(), plan.items.len());
            assert!(quantize_steps(&plan) > 5);
        }
    }
    // The engine has grown to this model's largest job: a second run allocates nothing.
    let again = run(&dense_dir, &tmp.path().join("again"), &cases[0].1, Backend::Gpu(dev.clone()), false);
    assert_eq!(again.gpu.unwrap().device_allocations, 0, "no device allocation once the engine has grown");
}

/// qmeta4 records and codes of every quantized module of a qmeta4-format output.
fn qmeta4_modules(dir: &Path, plan: &Plan) -> BTreeMap<String, (Vec<QMetaPacked>, Array2<u8>)> {
    let all = read_all(dir);
    let mut out = BTreeMap::new();
    for item in &plan.items {
        let Work::Quantize { members } = &item.work else { continue };
        for m in members {
            let qm: &Read = &all[&format!("{}.qmeta", m.module)];
            let recs = qm.data.chunks_exact(4).map(|b| QMetaPacked::from_bytes([b[0], b[1], b[2], b[3]])).collect();
            let packed = &all[&format!("{}.qweight_packed", m.module)];
            let words: Vec<u32> =
                packed.data.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let words = Array2::from_shape_vec((packed.shape[0], packed.shape[1]), words).unwrap();
            let codes = fourbit_forge::pack::unpack_rows(words.view(), plan.settings.grid.bits, m.dims.1).unwrap();
            out.insert(m.module.clone(), (recs, codes));
        }
    }
    out
}

#[test]
fn forge_mse_on_gpu_matches_the_cpu_run_up_to_equally_good_scales() {
    let Some(dev) = common::gpu_or_skip("forge_mse_on_gpu_matches_the_cpu_run_up_to_equally_good_scales") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dense_dir = tmp.path().join("llama");
    dense(&dense_dir);
    let moe_dir = tmp.path().join("ds");
    write_deepseek_demo(&moe_dir, &DeepSeekDemo::default()).unwrap();
    for (model_dir, name) in [(&dense_dir, "dense"), (&moe_dir, "fp8-moe")] {
        for norm in [2.0f32, 2.4] {
            let grid = GridConfig {
                scale_search: ScaleSearch::Mse(MseSearch { norm, ..MseSearch::default() }),
                ..GridConfig::default()
            };
            let settings = JobSettings { grid, format: "qmeta4".into(), ..JobSettings::default() };
            let what = format!("{name} mse norm {norm}");
            let (cpu, gpu) =
                (tmp.path().join(format!("cpu-{name}-{norm}")), tmp.path().join(format!("gpu-{name}-{norm}")));
            run(model_dir, &cpu, &settings, Backend::Cpu, false);
            run(model_dir, &gpu, &settings, Backend::Gpu(dev.clone()), false);
            let model = ModelDir::open(model_dir).unwrap();
            let plan = build_plan(&model, &settings).unwrap();
            let block = model.fp8_block().unwrap();
            let (c, g) = (qmeta4_modules(&cpu, &plan), qmeta4_modules(&gpu, &plan));
            let (gs, maxq) = (settings.grid.group_size, settings.grid.maxq() as f32);
            let (mut groups, mut differ) = (0usize, 0usize);
            for item in &plan.items {
                let Work::Quantize { members } = &item.work else { continue };
                for m in members {
                    let (rc, cc) = &c[&m.module];
                    let (rg, cg) = &g[&m.module];
                    let w = load_weight(&model, m, block).unwrap();
                    let (rows, cols) = m.dims;
                    let n_groups = cols.div_ceil(gs);
                    let mut row = vec![0f32; cols];
                    for r in 0..rows {
                        w.view().read_row_f32(r, &mut row).unwrap();
                        for gi in 0..n_groups {
                            groups += 1;
                            let (a, b) = (rc[r * n_groups + gi], rg[r * n_groups + gi]);
                            let span = gi * gs..((gi + 1) * gs).min(cols);
                            if a == b {
                                assert!(
                                    cc.row(r).slice(ndarray::s![span.clone()]) == cg.row(r).slice(ndarray::s![span]),
                                    "{what}: {} ({r}, {gi}): same record, other codes",
                                    m.module
                                );
                                continue;
                            }
                            differ += 1;
                            let mut x = row[span.clone()].to_vec();
                            x.resize(gs, 0.0);
                            let lc = candidate_loss_f64(&x, a.scale(), a.qzero_f32(), maxq, norm);
                            let lg = candidate_loss_f64(&x, b.scale(), b.qzero_f32(), maxq, norm);
                            assert!(
                                lg - lc <= MSE_LOSS_RTOL * lc.max(f64::MIN_POSITIVE),
                                "{what}: {} ({r}, {gi}) loss {lg} vs {lc}",
                                m.module
                            );
                            for (j, &xv) in row[span.clone()].iter().enumerate() {
                                let want = quantize(xv, b.scale(), b.qzero_f32(), maxq) as u8;
                                assert_eq!(cg[[r, gi * gs + j]], want, "{what}: codes of the device's record");
                            }
                        }
                    }
                }
            }
            eprintln!("{what}: {differ} of {groups} groups chose another, equally good (within 1e-4) scale");
            if differ == 0 {
                assert_same_output(&cpu, &gpu, &what);
            }
        }
    }
}

#[test]
fn forge_gptq_on_gpu_follows_the_solver_parity_rules() {
    let Some(dev) = common::gpu_or_skip("forge_gptq_on_gpu_follows_the_solver_parity_rules") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dense_dir = tmp.path().join("llama");
    dense(&dense_dir);
    let moe_dir = tmp.path().join("ds");
    write_deepseek_demo(&moe_dir, &DeepSeekDemo::default()).unwrap();
    for (model_dir, name) in [(&dense_dir, "dense"), (&moe_dir, "fp8-moe")] {
        let hess = tmp.path().join(format!("hess-{name}"));
        write_demo_hessians(model_dir, &hess, 512, 3, true).unwrap();
        for act_order in [false, true] {
            let method = Method::Gptq(GptqSettings {
                hessians: hess.clone(),
                pre_step: PreStepConfig { act_order, ..PreStepConfig::default() },
                allow_missing: false,
            });
            let settings = JobSettings { method, format: "qmeta4".into(), ..JobSettings::default() };
            let what = format!("{name} gptq act_order {act_order}");
            let (cpu, gpu) =
                (tmp.path().join(format!("c-{name}-{act_order}")), tmp.path().join(format!("g-{name}-{act_order}")));
            let rc = run(model_dir, &cpu, &settings, Backend::Cpu, false);
            let rg = run(model_dir, &gpu, &settings, Backend::Gpu(dev.clone()), false);
            let model = ModelDir::open(model_dir).unwrap();
            let plan = build_plan(&model, &settings).unwrap();
            let (c, g) = (qmeta4_modules(&cpu, &plan), qmeta4_modules(&gpu, &plan));
            for (module, (rec_c, codes_c)) in &c {
                let (rec_g, codes_g) = &g[module];
                assert!(rec_c == rec_g, "{what}: {module}: grid records");
                let n = codes_c.len();
                let differ = codes_c.iter().zip(codes_g.iter()).filter(|(a, b)| a != b).count();
                let worst =
                    codes_c.iter().zip(codes_g.iter()).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
                assert!(
                    differ as f64 <= GPTQ_CODE_FRACTION * n as f64 && worst <= 1,
                    "{what}: {module}: {differ} of {n} codes differ (max {worst})"
                );
            }
            let tensors = |r: &RunReport| -> BTreeMap<String, fourbit_forge::checkpoint::output::MemberStats> {
                r.items.values().flat_map(|s| s.members.iter().map(|m| (m.module.clone(), m.clone()))).collect()
            };
            let (tc, tg) = (tensors(&rc), tensors(&rg));
            assert_eq!(tc.len(), tg.len());
            for (module, a) in &tc {
                let b = &tg[module];
                assert_eq!((&a.method, &a.flags), (&b.method, &b.flags), "{what}: {module}");
                let close = |x: f64, y: f64| (x - y).abs() <= GPTQ_OBJECTIVE_RTOL * x.abs().max(y.abs());
                assert!(
                    close(a.rel_weight_error, b.rel_weight_error),
                    "{what}: {module}: rel error {} vs {}",
                    a.rel_weight_error,
                    b.rel_weight_error
                );
                assert!(
                    close(a.gptq_loss.unwrap(), b.gptq_loss.unwrap()),
                    "{what}: {module}: loss {:?} vs {:?}",
                    a.gptq_loss,
                    b.gptq_loss
                );
            }
            // Everything not quantized is the same bytes.
            let (fa, fb) = (read_all(&cpu), read_all(&gpu));
            for (name, t) in &fa {
                if !name.ends_with(".qmeta") && !name.ends_with(".qweight_packed") {
                    assert!(fb[name] == *t, "{what}: {name}");
                }
            }
        }
    }
}

#[test]
fn forge_kill_and_resume_on_gpu_is_byte_identical() {
    let Some(dev) = common::gpu_or_skip("forge_kill_and_resume_on_gpu_is_byte_identical") else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (name, write) in [
        ("dense", Box::new(|d: &Path| dense(d)) as Box<dyn Fn(&Path)>),
        ("fp8-moe", Box::new(|d: &Path| write_deepseek_demo(d, &DeepSeekDemo::default()).unwrap())),
    ] {
        let model_dir = tmp.path().join(name);
        write(&model_dir);
        let settings = JobSettings { max_shard_size: 300_000, ..JobSettings::default() };
        let model = ModelDir::open(&model_dir).unwrap();
        let plan = build_plan(&model, &settings).unwrap();
        assert!(plan.shards.len() >= 3, "{name}: several output shards");
        let reference = tmp.path().join(format!("ref-{name}"));
        run(&model_dir, &reference, &settings, Backend::Gpu(dev.clone()), false);
        let cpu = tmp.path().join(format!("cpu-{name}"));
        run(&model_dir, &cpu, &settings, Backend::Cpu, false);
        assert_same_output(&cpu, &reference, name);
        let (want, _) = output(&reference);
        let n = plan.items.len();
        for stops in [vec![1], vec![n / 2], vec![n - 1], vec![3, 4, 5]] {
            let out = tmp.path().join(format!("out-{name}-{stops:?}"));
            for (k, &stop) in stops.iter().enumerate() {
                let mut opts = RunOptions::new(out.clone(), Backend::Gpu(dev.clone()));
                opts.resume = k > 0;
                opts.fail_after_items = Some(stop);
                let err = quantize_checkpoint(&model, &plan, &opts, &Silent).unwrap_err();
                assert!(matches!(err, ForgeError::Interrupted(m) if m == stop), "{err}");
                assert!(!out.exists() && temp_dir_for(&out).unwrap().exists());
            }
            let mut opts = RunOptions::new(out.clone(), Backend::Gpu(dev.clone()));
            opts.resume = true;
            let report = quantize_checkpoint(&model, &plan, &opts, &Silent).unwrap();
            assert!(report.resumed_items > 0 || stops == vec![1], "{name} {stops:?}");
            let (got, summary) = output(&out);
            assert!(got == want, "{name} {stops:?}: resumed output differs");
            assert_eq!(summary["tensors"].as_array().unwrap().len(), plan.quantized_modules());
        }
    }
}

#[test]
fn forge_gpu_memory_budget_is_checked_before_any_work() {
    let Some(dev) = common::gpu_or_skip("forge_gpu_memory_budget_is_checked_before_any_work") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("llama");
    dense(&model_dir);
    let model = ModelDir::open(&model_dir).unwrap();
    let plan = build_plan(&model, &JobSettings::default()).unwrap();
    let out = tmp.path().join("out");
    let mut opts = RunOptions::new(out.clone(), Backend::Gpu(dev.clone()));
    opts.max_gpu_memory = Some(64 << 20);
    match quantize_checkpoint(&model, &plan, &opts, &Silent) {
        Err(ForgeError::GpuMemoryBudget { what, needed, budget }) => {
            assert_eq!(budget, 64 << 20);
            assert!(needed > budget && plan.items.iter().any(|i| i.label == what), "{what} {needed}");
        }
        other => panic!("expected GpuMemoryBudget, got {other:?}"),
    }
    assert!(!out.exists() && !temp_dir_for(&out).unwrap().exists(), "nothing written");
    // The default budget is the device's free memory, which this small model fits.
    let ok = run(&model_dir, &out, &JobSettings::default(), Backend::Gpu(dev.clone()), false);
    let g = ok.gpu.unwrap();
    assert!(g.estimate < g.budget, "{g:?}");
}
