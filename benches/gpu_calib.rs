//! GPU calibration benchmark, one table:
//! * Hessian accumulation (`GpuHessian::update_device`, 8192 tokens already on the device,
//!   and `update` from host f32, upload included) for C = 2048, 4096, 7168: median ms with
//!   device events; rate in tokens·C² multiply-adds per second (the SYRK computes half of them);
//! * the pre-step (dead inputs, damping, act-order, `U`) for the same C: the GPU route
//!   (cuSOLVER, `U` downloaded to the host) and the CPU route (faer), wall clock;
//! * experts per second for a DeepSeek-like expert (gate and up 2048×7168 sharing one
//!   factor, down 7168×2048; gs 128, 4-bit, symmetric absmax; Hessians given on the host)
//!   through `quantize_experts` on the GPU, wall clock, results downloaded.
//!
//! Run on a GPU machine: `cargo bench --bench gpu_calib` (cuSOLVER on LD_LIBRARY_PATH for the
//! GPU pre-step; see src/gpu/hessian.rs).

mod common;

use fourbit_forge::calib::{quantize_experts, ActivationView, ExpertInput, PreStepRoute};
use fourbit_forge::hessian::{pre_step_cpu, PreStepConfig};
use fourbit_forge::hessian::{DeviceActivations, GpuHessian, GpuPreStepper};
use fourbit_forge::{Backend, GridConfig, WeightView};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::time::Instant;

fn randn(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Array2::from_shape_simple_fn((rows, cols), || rng.sample::<f32, _>(StandardNormal))
}

/// Median wall-clock milliseconds of `runs` calls after one warm-up.
fn wall_ms(runs: usize, mut f: impl FnMut() -> fourbit_forge::Result<()>) -> fourbit_forge::Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn main() -> fourbit_forge::Result<()> {
    let Some(dev) = common::device_or_explain("gpu_calib") else { return Ok(()) };
    let tokens = 8192;
    let mut rows = Vec::new();
    let pcfg = PreStepConfig { act_order: true, ..PreStepConfig::default() };
    let mut stepper = match GpuPreStepper::new(&dev) {
        Ok(s) => Some(s),
        Err(e) => {
            println!("GPU pre-step unavailable ({e}); timing the CPU route only");
            None
        }
    };
    let mut hessians = Vec::new();
    for c in [2048usize, 4096, 7168] {
        let x = randn(tokens, c, c as u64);
        let macs = (tokens * c * c) as f64;
        let mut h = GpuHessian::new(&dev, c)?;
        for (dtype, view) in [
            ("f32", ActivationView::F32(x.view())),
            ("bf16", ActivationView::BF16(x.mapv(half::bf16::from_f32).view())),
        ] {
            let dx = DeviceActivations::upload(&dev, view)?;
            let ms = common::median_ms(&dev, 2, 7, 3, || h.update_device(&dev, &dx))?;
            rows.push(vec![
                "Hessian update (device X)".into(),
                format!("C={c}, {tokens} tokens"),
                dtype.into(),
                format!("{ms:.3}"),
                format!("{:.1} T MAC/s", macs / (ms * 1e-3) / 1e12),
            ]);
        }
        let ms = common::median_ms(&dev, 1, 5, 1, || h.update(&dev, ActivationView::F32(x.view())))?;
        rows.push(vec![
            "Hessian update (host X, upload incl.)".into(),
            format!("C={c}, {tokens} tokens"),
            "f32".into(),
            format!("{ms:.3}"),
            format!("{:.1} T MAC/s", macs / (ms * 1e-3) / 1e12),
        ]);

        if let Some(st) = stepper.as_mut() {
            let ms = wall_ms(5, || st.run(&dev, h.h(), c, &pcfg).map(|_| ()))?;
            rows.push(vec![
                "pre-step GPU (cuSOLVER f64, U to host)".into(),
                format!("C={c}"),
                "f32 H".into(),
                format!("{ms:.1}"),
                "wall clock".into(),
            ]);
        }
        let hh = h.to_host(&dev)?;
        let runs = if c >= 7168 { 1 } else { 3 };
        let ms = wall_ms(runs, || pre_step_cpu(hh.view(), None, &pcfg).map(|_| ()))?;
        rows.push(vec![
            "pre-step CPU (faer f64)".into(),
            format!("C={c}"),
            "f32 H".into(),
            format!("{ms:.1}"),
            format!("wall clock, {runs} run(s)"),
        ]);
        hessians.push(hh);
    }
    drop(stepper);

    // DeepSeek-like expert: hidden 7168, moe_intermediate 2048.
    let (h_in, h_mid) = (&hessians[2], &hessians[0]);
    let gate = common::heavy_tailed(2048, 7168, 1);
    let up = common::heavy_tailed(2048, 7168, 2);
    let down = common::heavy_tailed(7168, 2048, 3);
    let config = GridConfig::default();
    let n_experts = 4;
    let mut experts = Vec::new();
    for _ in 0..n_experts {
        experts.push(ExpertInput {
            weights: vec![WeightView::F32(gate.view()), WeightView::F32(up.view())],
            hessian: Some(h_in.view()),
        });
        experts.push(ExpertInput::single(WeightView::F32(down.view()), Some(h_mid.view())));
    }
    let backend = Backend::Gpu(dev.clone());
    let mut route = PreStepRoute::Cpu;
    let ms = wall_ms(2, || {
        let out = quantize_experts(&backend, &config, &pcfg, &experts)?;
        route = out[0][0].flags.route;
        Ok(())
    })?;
    rows.push(vec![
        format!("experts end to end ({n_experts} per call, pre-step {route:?})"),
        "gate+up 2048×7168 (1 factor), down 7168×2048".into(),
        "f32 W, gs 128, 4-bit".into(),
        format!("{:.1} per expert", ms / n_experts as f64),
        format!("{:.2} experts/s", n_experts as f64 / (ms * 1e-3)),
    ]);

    common::print_table(
        &format!("calibration on {} (median; device events for updates, wall clock otherwise)", dev.name()),
        &["measure", "shape", "dtype", "ms", "rate"],
        &rows,
    );
    Ok(())
}
