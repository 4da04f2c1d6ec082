//! The device-resident engine (`QuantEngine`) against today's GPU path and the CPU reference.
//! Skips (printing why) without a GPU.
//!
//! Tolerances: with the same factor the engine runs the same kernels on the same bits, so its
//! codes, records, loss and dequantized weight equal the per-call GPU path bit for bit. With
//! its own pre-step, `U` equals the CPU pre-step's within `U_RTOL` (both factor the same f64
//! matrix; see tests/gpu_calib_parity.rs for the derivation), so codes may flip where a
//! working weight sits on a rounding midpoint: at most 2 % of codes, by one step, and the
//! layer-output error within 2e-3 relative (the solver parity tolerance,
//! tests/gpu_solver_parity.rs).

mod common;

use common::{indefinite, randn, rtn, to_fp8};
use fourbit_forge::calib::PreStepRoute;
use fourbit_forge::grid::build_quant_grid_gpu;
use fourbit_forge::hessian::{pre_step_cpu, HessianAccumulator, PreStepConfig, MAX_RETRIES};
use fourbit_forge::quantize::{HessianInput, LayerJob, QuantEngine};
use fourbit_forge::solver::{layer_output_error, solve_cpu, solve_gpu};
use fourbit_forge::{ForgeError, GridConfig, MseSearch, ScaleDtype, ScaleSearch, WeightView};
use half::bf16;
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::SeedableRng;

const U_RTOL: f64 = 1e-6;

fn hessian(cols: usize, tokens: usize, rng: &mut StdRng) -> Array2<f32> {
    let x = randn(tokens, cols, rng);
    let mut acc = HessianAccumulator::new(cols).unwrap();
    acc.update(x.view()).unwrap();
    acc.into_h()
}

fn frob(a: &Array2<f64>) -> f64 {
    a.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn engine_or_skip(test: &str) -> Option<QuantEngine> {
    let dev = common::gpu_or_skip(test)?;
    // The engine keeps the device alive (QuantEngine::new holds it).
    let e = QuantEngine::new(dev).unwrap();
    if let Some(why) = e.cpu_pre_step_reason() {
        assert!(std::env::var_os("FORGE_REQUIRE_CUSOLVER").is_none(), "cuSOLVER/cuBLAS required: {why}");
        eprintln!("[{test}] the pre-step runs on the CPU here: {why}");
    }
    Some(e)
}

#[test]
fn engine_with_a_given_factor_equals_the_per_call_gpu_path_bit_for_bit() {
    let Some(mut engine) = engine_or_skip("engine_with_a_given_factor_equals_the_per_call_gpu_path_bit_for_bit") else {
        return;
    };
    let dev = engine.device().unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let mse = GridConfig { scale_search: ScaleSearch::Mse(MseSearch::default()), ..GridConfig::default() };
    let mse_bf16 = GridConfig { scale_dtype: ScaleDtype::BF16, ..mse.clone() };
    let f16 =
        GridConfig { group_size: 64, bits: 3, symmetric: false, scale_dtype: ScaleDtype::F16, ..GridConfig::default() };
    for (rows, cols, act_order, cfg) in [
        (64, 256, false, GridConfig::default()),
        (100, 700, true, GridConfig { group_size: 64, bits: 3, symmetric: false, ..GridConfig::default() }),
        (257, 1000, true, mse),
        (100, 700, true, f16),
        (130, 600, false, mse_bf16),
    ] {
        let what = format!("{rows}×{cols} act_order {act_order}");
        let w = randn(rows, cols, &mut rng);
        let wb = w.mapv(bf16::from_f32);
        let h = hessian(cols, 2 * cols, &mut rng);
        let pre = pre_step_cpu(h.view(), None, &PreStepConfig { act_order, ..PreStepConfig::default() }).unwrap();
        for view in [WeightView::F32(w.view()), WeightView::BF16(wb.view())] {
            let w32 = fourbit_forge::quantize::widen(view).unwrap();
            let grid = build_quant_grid_gpu(&dev, view, &cfg).unwrap();
            let old = solve_gpu(&dev, w32.view(), pre.hinv_factor.view(), &grid, pre.perm.as_deref()).unwrap();
            let hessian = HessianInput::Factor { u: pre.hinv_factor.view(), perm: pre.perm.as_deref() };
            let mut job = LayerJob::new(view, hessian, &cfg);
            job.want_dequant = true;
            let out = engine.quantize(&job).unwrap();
            let q = &out.weights[0];
            assert_eq!(q.grid, grid, "{what} {:?}: grid", view.dtype());
            assert_eq!(q.grid.scale_dtype, cfg.scale_dtype, "{what}: the grid says which scales it was solved with");
            assert_eq!(q.codes, old.qweight, "{what} {:?}: codes", view.dtype());
            assert_eq!(q.loss, old.loss, "{what}: loss");
            let deq = q.dequant.as_ref().unwrap();
            assert!(deq.iter().zip(old.dequant.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: dequant");
            assert_eq!(out.pre_step.route, PreStepRoute::Given);
        }
    }
}

#[test]
fn engine_pre_step_matches_the_cpu_and_its_layers_have_cpu_quality() {
    let Some(mut engine) = engine_or_skip("engine_pre_step_matches_the_cpu_and_its_layers_have_cpu_quality") else {
        return;
    };
    let dev = engine.device().unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let cfg = GridConfig::default();
    for (rows, cols, act_order, dead) in [(96, 384, false, vec![]), (128, 515, true, vec![0usize, 200, 514])] {
        let what = format!("{rows}×{cols} act_order {act_order} dead {dead:?}");
        let w = randn(rows, cols, &mut rng);
        let mut h = hessian(cols, 3 * cols, &mut rng);
        for &j in &dead {
            h.row_mut(j).fill(0.0);
            h.column_mut(j).fill(0.0);
        }
        let pcfg = PreStepConfig { act_order, ..PreStepConfig::default() };
        let cpu_pre = pre_step_cpu(h.view(), None, &pcfg).unwrap();
        // The factor itself.
        let (factor, summary) = engine.prepare_factor(HessianInput::Host(h.view()), &pcfg).unwrap();
        let u = factor.to_host(&dev).unwrap();
        let d = u.mapv(f64::from) - cpu_pre.hinv_factor.mapv(f64::from);
        let rel = frob(&d) / frob(&cpu_pre.hinv_factor.mapv(f64::from));
        assert!(rel <= U_RTOL, "{what}: ‖U_gpu − U_cpu‖/‖U_cpu‖ = {rel:e}");
        assert_eq!(summary.perm, cpu_pre.perm, "{what}");
        assert_eq!(summary.dead_columns, dead, "{what}");
        assert_eq!(summary.damping_used.to_bits(), cpu_pre.damping_used.to_bits(), "{what}");
        // A whole layer through the optimistic path against the CPU reference.
        let mut job = LayerJob::new(WeightView::F32(w.view()), HessianInput::Host(h.view()), &cfg);
        job.pre_step = pcfg.clone();
        job.want_dequant = true;
        let out = engine.quantize(&job).unwrap();
        assert_eq!(out.pre_step.route, PreStepRoute::Gpu);
        assert_eq!(out.pre_step.perm, cpu_pre.perm, "{what}");
        assert_eq!(out.pre_step.dead_columns, dead, "{what}");
        let mut w0 = w.clone();
        for &j in &dead {
            w0.column_mut(j).fill(0.0);
        }
        let grid = fourbit_forge::grid::build_quant_grid(WeightView::F32(w0.view()), &cfg).unwrap();
        let cpu = solve_cpu(w0.view(), cpu_pre.hinv_factor.view(), &grid, cpu_pre.perm.as_deref()).unwrap();
        let q = &out.weights[0];
        assert_eq!(q.grid, grid, "{what}: the grid of the dead-zeroed weight");
        let differ = q.codes.iter().zip(cpu.qweight.iter()).filter(|(a, b)| a != b).count();
        let worst = q.codes.iter().zip(cpu.qweight.iter()).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
        assert!(
            differ as f64 <= 0.02 * (rows * cols) as f64 && worst <= 1,
            "{what}: {differ} codes differ (max {worst})"
        );
        let e_gpu = layer_output_error(w0.view(), q.dequant.as_ref().unwrap().view(), h.view()).unwrap();
        let e_cpu = layer_output_error(w0.view(), cpu.dequant.view(), h.view()).unwrap();
        assert!((e_gpu - e_cpu).abs() <= 2e-3 * e_cpu, "{what}: output error {e_gpu} vs {e_cpu}");
        for &j in &dead {
            assert!(q.dequant.as_ref().unwrap().column(j).iter().all(|&v| v == 0.0), "{what}: dead column {j}");
        }
    }
}

#[test]
fn engine_retries_falls_back_and_reports_bad_inputs_from_the_status_word() {
    let Some(mut engine) = engine_or_skip("engine_retries_falls_back_and_reports_bad_inputs_from_the_status_word")
    else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(3);
    let cfg = GridConfig::default();
    let w = randn(32, 64, &mut rng);
    // 1 ± 3 needs the third retry; 1 ± 30 never becomes definite (U = I, round-to-nearest).
    for (c, retries, fallback) in [(3.0f32, 3u32, false), (30.0, MAX_RETRIES, true)] {
        let h = indefinite(64, c);
        let cpu = pre_step_cpu(h.view(), None, &PreStepConfig::default()).unwrap();
        let out =
            engine.quantize(&LayerJob::new(WeightView::F32(w.view()), HessianInput::Host(h.view()), &cfg)).unwrap();
        assert_eq!((out.pre_step.retries, out.pre_step.fallback_identity), (retries, fallback), "c = {c}");
        assert_eq!(out.pre_step.damping_used, cpu.damping_used, "c = {c}");
        if fallback {
            let (codes, _) = rtn(&w, &out.weights[0].grid);
            assert_eq!(out.weights[0].codes, codes, "the fallback is round-to-nearest");
        }
    }
    // No calibration tokens: U = I.
    let out = engine.quantize(&LayerJob::new(WeightView::F32(w.view()), HessianInput::NoTokens, &cfg)).unwrap();
    assert_eq!(out.pre_step.route, PreStepRoute::NoTokens);
    assert_eq!(out.weights[0].codes, rtn(&w, &out.weights[0].grid).0);
    // A NaN weight and a NaN Hessian entry: typed errors at their exact place.
    let h = hessian(64, 200, &mut rng);
    let mut bad = w.clone();
    bad[[7, 33]] = f32::NAN;
    bad[[9, 1]] = f32::INFINITY;
    match engine.quantize(&LayerJob::new(WeightView::F32(bad.view()), HessianInput::Host(h.view()), &cfg)) {
        Err(ForgeError::NonFinite { tensor: "weight", row: 7, col: 33, value }) => assert!(value.is_nan()),
        other => panic!("expected NonFinite weight at (7, 33), got {other:?}"),
    }
    let mut hb = h.clone();
    hb[[5, 6]] = f32::NAN;
    hb[[6, 5]] = f32::NAN;
    match engine.quantize(&LayerJob::new(WeightView::F32(w.view()), HessianInput::Host(hb.view()), &cfg)) {
        Err(ForgeError::NonFinite { tensor: "hessian", row: 5, col: 6, .. }) => {}
        other => panic!("expected NonFinite hessian at (5, 6), got {other:?}"),
    }
    // The engine recovers: the next good job is the same as before the errors.
    let a = engine.quantize(&LayerJob::new(WeightView::F32(w.view()), HessianInput::Host(h.view()), &cfg)).unwrap();
    let b = engine.quantize(&LayerJob::new(WeightView::F32(w.view()), HessianInput::Host(h.view()), &cfg)).unwrap();
    assert_eq!(a.weights[0].codes, b.weights[0].codes);
}

#[test]
fn engine_pipelines_groups_and_allocates_nothing_after_warm_up() {
    let Some(mut engine) = engine_or_skip("engine_pipelines_groups_and_allocates_nothing_after_warm_up") else {
        return;
    };
    let dev = engine.device().unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let cfg = GridConfig::default();
    let (cols, rows) = (512, [128usize, 256, 96]);
    let ws: Vec<Array2<f32>> = rows.iter().map(|&r| randn(r, cols, &mut rng)).collect();
    let hs: Vec<Array2<f32>> = (0..4).map(|_| hessian(cols, 2 * cols, &mut rng)).collect();
    // One at a time.
    let single: Vec<_> = hs
        .iter()
        .map(|h| {
            let views: Vec<_> = ws.iter().map(|w| WeightView::F32(w.view())).collect();
            let job = fourbit_forge::quantize::LayerJob {
                weights: views,
                ..LayerJob::new(WeightView::F32(ws[0].view()), HessianInput::Host(h.view()), &cfg)
            };
            engine.quantize(&job).unwrap()
        })
        .collect();
    // A group equals its weights quantized alone with the same Hessian.
    for (i, w) in ws.iter().enumerate() {
        let alone =
            engine.quantize(&LayerJob::new(WeightView::F32(w.view()), HessianInput::Host(hs[0].view()), &cfg)).unwrap();
        assert_eq!(alone.weights[0].codes, single[0].weights[i].codes, "weight {i}");
    }
    let allocs = dev.allocation_count();
    // Pipelined: two in flight, collected in order.
    let mut got = Vec::new();
    let mut pending = None;
    for h in &hs {
        let views: Vec<_> = ws.iter().map(|w| WeightView::F32(w.view())).collect();
        let job = LayerJob {
            weights: views,
            ..LayerJob::new(WeightView::F32(ws[0].view()), HessianInput::Host(h.view()), &cfg)
        };
        let t = engine.submit(&job).unwrap();
        if let Some(p) = pending.replace(t) {
            got.push(engine.collect(p).unwrap());
        }
    }
    got.push(engine.collect(pending.unwrap()).unwrap());
    for (a, b) in got.iter().zip(&single) {
        for (x, y) in a.weights.iter().zip(&b.weights) {
            assert_eq!(x.codes, y.codes);
            assert_eq!(x.grid, y.grid);
        }
    }
    assert_eq!(dev.allocation_count(), allocs, "no device allocation after warm-up");
    // Three in flight is refused, and the refusal changes nothing.
    let job = LayerJob::new(WeightView::F32(ws[0].view()), HessianInput::Host(hs[0].view()), &cfg);
    let t1 = engine.submit(&job).unwrap();
    let t2 = engine.submit(&job).unwrap();
    assert!(matches!(engine.submit(&job), Err(ForgeError::Config(_))));
    let (a, b) = (engine.collect(t1).unwrap(), engine.collect(t2).unwrap());
    assert_eq!(a.weights[0].codes, b.weights[0].codes);
}

/// With scales stored in f16 or bf16 the engine's own pre-step and solve keep CPU quality, and
/// what it returns dequantizes exactly as a checkpoint would: the downloaded dequantized weight
/// equals `(q − q0)·stored_scale` of its codes and records, bit for bit.
#[test]
fn engine_with_stored_f16_and_bf16_scales_matches_the_cpu() {
    let Some(mut engine) = engine_or_skip("engine_with_stored_f16_and_bf16_scales_matches_the_cpu") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(5);
    let (rows, cols) = (96, 448);
    let w = randn(rows, cols, &mut rng);
    let h = hessian(cols, 3 * cols, &mut rng);
    for scale_dtype in [ScaleDtype::F16, ScaleDtype::BF16] {
        let cfg = GridConfig { group_size: 64, bits: 4, scale_dtype, ..GridConfig::default() };
        let pcfg = PreStepConfig { act_order: true, ..PreStepConfig::default() };
        let mut job = LayerJob::new(WeightView::F32(w.view()), HessianInput::Host(h.view()), &cfg);
        job.pre_step = pcfg.clone();
        job.want_dequant = true;
        let out = engine.quantize(&job).unwrap();
        let q = &out.weights[0];
        let grid = fourbit_forge::grid::build_quant_grid(WeightView::F32(w.view()), &cfg).unwrap();
        assert_eq!(q.grid, grid, "{scale_dtype:?}: absmax records are the CPU's");
        let deq = q.dequant.as_ref().unwrap();
        assert!(q.codes.iter().all(|&c| u32::from(c) <= cfg.maxq()));
        for ((r, c), &d) in deq.indexed_iter() {
            let (s, z) = q.grid.scale_zero(r, c / cfg.group_size).unwrap();
            let want = fourbit_forge::numerics::dequantize(f32::from(q.codes[[r, c]]), s, z);
            assert_eq!(d.to_bits(), want.to_bits(), "{scale_dtype:?}: ({r}, {c}) dequantizes at the stored scale");
        }
        let cpu_pre = pre_step_cpu(h.view(), None, &pcfg).unwrap();
        let cpu = solve_cpu(w.view(), cpu_pre.hinv_factor.view(), &grid, cpu_pre.perm.as_deref()).unwrap();
        let differ = q.codes.iter().zip(cpu.qweight.iter()).filter(|(a, b)| a != b).count();
        let worst = q.codes.iter().zip(cpu.qweight.iter()).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
        assert!(
            differ as f64 <= 0.02 * (rows * cols) as f64 && worst <= 1,
            "{scale_dtype:?}: {differ} codes differ (max {worst})"
        );
        let e_gpu = layer_output_error(w.view(), deq.view(), h.view()).unwrap();
        let e_cpu = layer_output_error(w.view(), cpu.dequant.view(), h.view()).unwrap();
        assert!((e_gpu - e_cpu).abs() <= 2e-3 * e_cpu, "{scale_dtype:?}: output error {e_gpu} vs {e_cpu}");
    }
}

#[test]
fn engine_pre_step_graphs_give_the_bits_of_call_by_call_launches() {
    // The captured recursion replays the same cuSOLVER/cuBLAS calls on the same buffers, so
    // everything downstream is equal bit for bit; sides alternate (as an expert's gate/up and
    // down do) so graphs are captured, replayed and told apart; the indefinite Hessian's
    // retries factor again with the graph of their side.
    let Some(mut graphs) = engine_or_skip("engine_pre_step_graphs_give_the_bits_of_call_by_call_launches") else {
        return;
    };
    if graphs.cpu_pre_step_reason().is_some() {
        return; // no GPU pre-step here (said above)
    }
    let dev = graphs.device().unwrap();
    let mut direct = QuantEngine::new(dev).unwrap();
    direct.set_pre_step_graphs(false);
    let mut rng = StdRng::seed_from_u64(9);
    let cfg = GridConfig { group_size: 64, ..GridConfig::default() };
    let mut cases: Vec<(Array2<f32>, Array2<f32>, bool)> =
        [(96usize, 700usize, true), (64, 1100, false), (80, 300, true)]
            .into_iter()
            .map(|(rows, cols, act_order)| (randn(rows, cols, &mut rng), hessian(cols, 2 * cols, &mut rng), act_order))
            .collect();
    cases.push((randn(32, 64, &mut rng), indefinite(64, 3.0), false));
    for round in 0..3 {
        for (w, h, act_order) in &cases {
            let what = format!("round {round}, {:?}, act_order {act_order}", w.dim());
            let mut job = LayerJob::new(WeightView::F32(w.view()), HessianInput::Host(h.view()), &cfg);
            job.pre_step = PreStepConfig { act_order: *act_order, ..PreStepConfig::default() };
            job.want_dequant = true;
            let a = graphs.quantize(&job).unwrap();
            let b = direct.quantize(&job).unwrap();
            assert_eq!(a.pre_step.retries, b.pre_step.retries, "{what}: retries");
            let (qa, qb) = (&a.weights[0], &b.weights[0]);
            assert_eq!(qa.grid, qb.grid, "{what}: grid");
            assert_eq!(qa.codes, qb.codes, "{what}: codes");
            assert!(qa.loss.iter().zip(&qb.loss).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: loss");
            let (da, db) = (qa.dequant.as_ref().unwrap(), qb.dequant.as_ref().unwrap());
            assert!(da.iter().zip(db.iter()).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: dequant");
        }
    }
    assert_eq!(graphs.pre_step_graph_failure(), None, "capturing the pre-step failed");
    let (s, d) = (graphs.stats(), direct.stats());
    assert!(s.pre_step_graph_captures >= 3 && s.pre_step_graph_replays >= 6, "graph use: {s:?}");
    assert_eq!((d.pre_step_graph_captures, d.pre_step_graph_replays), (0, 0), "graphs off: {d:?}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..proptest::prelude::ProptestConfig::default() })]

    /// A data-free job with the codes packed and the relative error summed on the device
    /// (what `forge quantize` runs) gives the host pass's relative weight error bit for bit
    /// (`rtn_from_device` vs `rtn_from_grid` over the unpacked job's codes: the sums must be
    /// the same f64 operations in the same order, so no tolerance), and the packed words are
    /// the host packer's of those codes. Random shapes with tails (rows, columns, group
    /// sizes 32–1024, 2–8 bits, symmetric or not, every weight and scale dtype, both
    /// layouts) and adversarial rows: all zero (norm 0), one huge outlier, constant.
    #[test]
    fn engine_row_errors_and_packed_words_equal_the_host_pass(
        rows in 1usize..70,
        cols in 1usize..1100,
        gs_units in proptest::prop_oneof![1usize..=4, proptest::strategy::Just(32usize)],
        bits in 2u32..=8,
        sym in proptest::bool::ANY,
        dt in 0u8..4,
        scale_dtype in proptest::prop_oneof![
            proptest::strategy::Just(ScaleDtype::F32),
            proptest::strategy::Just(ScaleDtype::BF16),
            proptest::strategy::Just(ScaleDtype::F16)
        ],
        transposed in proptest::bool::ANY,
        seed in proptest::num::u64::ANY,
    ) {
        use fourbit_forge::checkpoint::quant::{rtn_from_device, rtn_from_grid, RowSource};
        use fourbit_forge::pack::{pack_cols, pack_rows, PackLayout};
        let Some(mut engine) = engine_or_skip("engine_row_errors_and_packed_words_equal_the_host_pass") else {
            return Ok(());
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let mut w = randn(rows, cols, &mut rng);
        w.row_mut(0).fill(0.0);
        if rows > 1 {
            w[[1, cols / 2]] = 300.0;
        }
        if rows > 2 {
            w.row_mut(2).fill(0.75);
        }
        let (f16w, bf16w, fp8w) = (
            w.mapv(half::f16::from_f32),
            w.mapv(bf16::from_f32),
            w.mapv(to_fp8),
        );
        let view = match dt {
            0 => WeightView::F32(w.view()),
            1 => WeightView::F16(f16w.view()),
            2 => WeightView::BF16(bf16w.view()),
            _ => WeightView::Fp8E4M3(fp8w.view()),
        };
        let cfg = GridConfig { group_size: 32 * gs_units, bits, symmetric: sym, scale_dtype, ..GridConfig::default() };
        let layout = if transposed { PackLayout::Transposed } else { PackLayout::Rows };
        let plain = engine.quantize(&LayerJob::new(view, HessianInput::NoTokens, &cfg)).unwrap();
        let mut job = LayerJob::new(view, HessianInput::NoTokens, &cfg);
        job.pack = Some(layout);
        job.want_row_error = true;
        let mut packed = engine.quantize(&job).unwrap();
        let (p, q) = (packed.weights.remove(0), &plain.weights[0]);
        let what = format!("{rows}×{cols} gs {} {bits}-bit sym {sym} dtype {dt} {scale_dtype:?} {layout:?}", cfg.group_size);
        proptest::prop_assert_eq!(&p.grid, &q.grid, "{}: same records", what);
        let words = p.packed.clone().unwrap();
        let host_words = if transposed { pack_cols(q.codes.t(), bits) } else { pack_rows(q.codes.view(), bits) }.unwrap();
        proptest::prop_assert!(words.words == host_words, "{}: packed words", what);
        let sums = p.row_error.clone().unwrap();
        proptest::prop_assert!(sums.iter().all(|v| v.is_finite() && *v >= 0.0), "{}: sums {:?}", what, sums);
        let device = rtn_from_device(p.grid.clone(), words, sums.view()).unwrap();
        let host = rtn_from_grid(&RowSource::View(view), q.grid.clone(), Some(q.codes.clone())).unwrap();
        proptest::prop_assert_eq!(
            device.rel_weight_error.to_bits(),
            host.rel_weight_error.to_bits(),
            "{}: relative error {} vs {}",
            what,
            device.rel_weight_error,
            host.rel_weight_error
        );
    }
}
