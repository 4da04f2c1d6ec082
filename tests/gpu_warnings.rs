//! The warnings of the device paths (issue 10) equal the CPU reference's, exactly: the engine
//! and the CPU pre-step follow one plan (same dead inputs, same damping per attempt, so the
//! same `f32` damping in `DampingRetries`), the asymmetry of a host `H` and the flushed groups
//! are computed on the host from the same inputs. Skips (printing why) without a GPU.
//!
//! Inputs are chosen so the outcome does not hinge on rounding: `1 ± 3` off the diagonal
//! needs the third retry and `1 ± 30` never factors (tests/gpu_engine.rs), a dead input is
//! an exact zero row and column of `H`, and a flushed row holds only values ~1e-30, far below
//! what the 1e-12 scale floor resolves, so its codes are the zero point whatever `U` is (the
//! rows of GPTQ are independent).

mod common;

use common::{indefinite, randn};
use fourbit_forge::calib::{quantize_experts, quantize_with, ExpertInput, QuantizedLayer, SharedHessian};
use fourbit_forge::hessian::{pre_step_cpu, HessianAccumulator, PreStepConfig, MAX_RETRIES};
use fourbit_forge::quantize::{with_engine, HessianInput, LayerJob};
use fourbit_forge::{Backend, GridConfig, Quantizer, Warning, WeightView};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn hessian(cols: usize, tokens: usize, rng: &mut StdRng) -> Array2<f32> {
    let x = randn(tokens, cols, rng);
    let mut acc = HessianAccumulator::new(cols).unwrap();
    acc.update(x.view()).unwrap();
    acc.into_h()
}

/// Quantizes `w` with `h` (or no tokens) through the layer API on `backend`.
fn layer(backend: &Backend, w: &Array2<f32>, h: Option<&Array2<f32>>, cfg: &PreStepConfig) -> QuantizedLayer {
    let cols = w.ncols();
    let shared = match h {
        Some(h) => SharedHessian::from_host(h.view(), 1000, backend).unwrap(),
        None => SharedHessian::new(cols, backend).unwrap(),
    };
    let factor = shared.pre_step(cfg).unwrap();
    let q = Quantizer::new(GridConfig::default(), backend.clone());
    quantize_with(&q, &factor, WeightView::F32(w.view())).unwrap()
}

fn kinds(w: &[Warning]) -> Vec<&'static str> {
    w.iter()
        .map(|w| match w {
            Warning::AsymmetricHessian { .. } => "asymmetric",
            Warning::DeadInputs { .. } => "dead",
            Warning::DampingRetries { .. } => "retries",
            Warning::FallbackIdentity { .. } => "fallback",
            Warning::IndefiniteAccepted { .. } => "indefinite",
            Warning::NoCalibrationTokens => "no tokens",
            Warning::FlushedGroups { .. } => "flushed",
            _ => "other",
        })
        .collect()
}

#[test]
fn engine_pre_step_warnings_equal_the_cpu_pre_steps() {
    let Some(dev) = common::gpu_or_skip("engine_pre_step_warnings_equal_the_cpu_pre_steps") else { return };
    let mut rng = StdRng::seed_from_u64(1);
    let w = randn(32, 64, &mut rng);
    let grid = GridConfig::default();
    let cfg = PreStepConfig::default();
    for (c, want) in [(3.0f32, "retries"), (30.0, "fallback")] {
        let h = indefinite(64, c);
        let cpu = pre_step_cpu(h.view(), None, &cfg).unwrap();
        assert_eq!(kinds(&cpu.warnings), [want], "c = {c}");
        let job = LayerJob::new(WeightView::F32(w.view()), HessianInput::Host(h.view()), &grid);
        let out = with_engine(&dev, |e| e.quantize(&job)).unwrap();
        assert_eq!(out.pre_step.warnings, cpu.warnings, "c = {c}");
        if want == "fallback" {
            assert_eq!(cpu.warnings, [Warning::FallbackIdentity { retries: MAX_RETRIES }]);
        }
    }
    // Dead inputs (the plan's, on the device's first attempt) and no tokens.
    let mut h = hessian(64, 300, &mut rng);
    for j in [5, 40] {
        h.row_mut(j).fill(0.0);
        h.column_mut(j).fill(0.0);
    }
    let cpu = pre_step_cpu(h.view(), None, &cfg).unwrap();
    assert_eq!(cpu.warnings, [Warning::DeadInputs { count: 2, first: vec![5, 40] }]);
    let job = LayerJob::new(WeightView::F32(w.view()), HessianInput::Host(h.view()), &grid);
    assert_eq!(with_engine(&dev, |e| e.quantize(&job)).unwrap().pre_step.warnings, cpu.warnings);
    let job = LayerJob::new(WeightView::F32(w.view()), HessianInput::NoTokens, &grid);
    assert_eq!(with_engine(&dev, |e| e.quantize(&job)).unwrap().pre_step.warnings, [Warning::NoCalibrationTokens]);
}

#[test]
fn layer_api_and_expert_warnings_equal_the_cpu_backends() {
    let Some(dev) = common::gpu_or_skip("layer_api_and_expert_warnings_equal_the_cpu_backends") else { return };
    let gpu = Backend::Gpu(dev);
    let mut rng = StdRng::seed_from_u64(2);
    let (rows, cols) = (24, 256);
    let mut w = randn(rows, cols, &mut rng);
    // Row 3 is far below the scale floor: every one of its groups flushes to zero.
    w.row_mut(3).mapv_inplace(|v| v * 1e-30);
    // A dead input and an asymmetric pair well beyond the tolerance.
    let mut h = hessian(cols, 600, &mut rng);
    h.row_mut(17).fill(0.0);
    h.column_mut(17).fill(0.0);
    h[[9, 2]] += 0.25 * (h[[9, 9]] * h[[2, 2]]).sqrt();
    let cases = [
        ("asymmetric, dead, flushed", Some(h.clone()), &["asymmetric", "dead", "flushed"][..]),
        ("indefinite, retried", Some(indefinite(cols, 3.0)), &["retries", "flushed"][..]),
        ("no tokens", None, &["no tokens", "flushed"][..]),
    ];
    for act_order in [false, true] {
        let cfg = PreStepConfig { act_order, ..PreStepConfig::default() };
        for (what, h, want) in &cases {
            let cpu = layer(&Backend::Cpu, &w, h.as_ref(), &cfg);
            assert_eq!(kinds(&cpu.warnings), *want, "{what}, act_order {act_order}");
            let dev = layer(&gpu, &w, h.as_ref(), &cfg);
            assert_eq!(dev.warnings, cpu.warnings, "{what}, act_order {act_order}: layer API");
            let input = [ExpertInput::single(WeightView::F32(w.view()), h.as_ref().map(|h| h.view()))];
            let e_cpu = quantize_experts(&Backend::Cpu, &GridConfig::default(), &cfg, &input).unwrap();
            let e_gpu = quantize_experts(&gpu, &GridConfig::default(), &cfg, &input).unwrap();
            assert_eq!(e_cpu[0][0].warnings, cpu.warnings, "{what}, act_order {act_order}: experts (CPU)");
            assert_eq!(e_gpu[0][0].warnings, cpu.warnings, "{what}, act_order {act_order}: experts (GPU)");
        }
    }
    // The flushed row is row 3, all of its groups.
    let cpu = layer(&Backend::Cpu, &w, Some(&h), &PreStepConfig::default());
    let n_groups = cols / GridConfig::default().group_size;
    let flushed = cpu.warnings.iter().find(|w| matches!(w, Warning::FlushedGroups { .. }));
    assert_eq!(flushed, Some(&Warning::FlushedGroups { groups: n_groups, total: rows * n_groups, first: (3, 0) }));
}
