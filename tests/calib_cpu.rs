//! The calibration layer on the CPU backend (docs/design.md §5): MoE-Quant-shaped `GptqLayer`,
//! shared Hessians, experts in bulk, and the documented errors and flags.

mod common;

use common::{indefinite, randn, rtn};

use fourbit_forge::calib::{
    quantize_experts, quantize_with, ActivationView, ExpertInput, GptqLayer, PreStepRoute, QuantizedLayer,
    SharedHessian,
};
use fourbit_forge::grid::build_quant_grid;
use fourbit_forge::hessian::{pre_step_cpu, HessianAccumulator, PreStepConfig, MAX_RETRIES};
use fourbit_forge::solver::{layer_output_error, solve_cpu};
use fourbit_forge::{Backend, ForgeError, GridConfig, Quantizer, WeightView};
use half::{bf16, f16};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// `X = Z·A`: strongly correlated inputs (where GPTQ beats round-to-nearest clearly).
fn correlated_x(tokens: usize, cols: usize, rng: &mut StdRng) -> Array2<f32> {
    let z = randn(tokens, cols, rng);
    let a = randn(cols, cols, rng) / (cols as f32).sqrt();
    z.dot(&a)
}

fn cfg(gs: usize) -> GridConfig {
    GridConfig { group_size: gs, ..GridConfig::default() }
}

fn assert_rtn(layer: &QuantizedLayer, w: &Array2<f32>, what: &str) {
    let (codes, deq) = rtn(w, &layer.grid);
    assert_eq!(layer.codes, codes, "{what}: codes differ from round-to-nearest");
    let same = layer.dequant().iter().zip(deq.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{what}: dequant differs from round-to-nearest");
}

#[test]
fn gptq_layer_end_to_end_matches_the_composed_reference_and_beats_rtn() {
    let mut rng = StdRng::seed_from_u64(11);
    let (rows, cols) = (32, 256);
    let w = randn(rows, cols, &mut rng);
    let batches: Vec<Array2<f32>> = [200, 1, 399].iter().map(|&m| correlated_x(m, cols, &mut rng)).collect();
    for act_order in [false, true] {
        let mut layer = GptqLayer::new(WeightView::F32(w.view()), cfg(128), Backend::Cpu).unwrap();
        let mut acc = HessianAccumulator::new(cols).unwrap();
        for x in &batches {
            layer.update(ActivationView::F32(x.view())).unwrap();
            acc.update(x.view()).unwrap();
        }
        assert_eq!(layer.tokens(), 600);
        // The CPU backend IS the reference accumulator.
        assert_eq!(&layer.hessian().to_host().unwrap(), acc.h());

        let pcfg = PreStepConfig { act_order, ..PreStepConfig::default() };
        let route = layer.quantization_pre_step(&pcfg).unwrap().route();
        assert_eq!(route, PreStepRoute::Cpu);
        let q = layer.quantize().unwrap();

        // Composition: pre_step_cpu → grid → solve_cpu, by hand.
        let pre = pre_step_cpu(acc.h().view(), None, &pcfg).unwrap();
        let grid = build_quant_grid(WeightView::F32(w.view()), &cfg(128)).unwrap();
        let out = solve_cpu(w.view(), pre.hinv_factor.view(), &grid, pre.perm.as_deref()).unwrap();
        assert_eq!(q.grid, grid);
        assert_eq!(q.codes, out.qweight);
        assert_eq!(q.loss, out.loss);
        // The dequantized weight the layer hands out is the solver's, bit for bit.
        assert!(q.dequant().iter().zip(out.dequant.iter()).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(q.perm, pre.perm);
        assert_eq!(q.perm.is_some(), act_order);
        let f = &q.flags;
        assert!(f.dead_columns.is_empty() && f.retries == 0 && !f.fallback_identity && !f.no_tokens, "{f:?}");
        assert_eq!(f.damping_used, pre.damping_used);

        let (_, rtn_deq) = rtn(&w, &grid);
        let e_gptq = layer_output_error(w.view(), q.dequant().view(), acc.h().view()).unwrap();
        let e_rtn = layer_output_error(w.view(), rtn_deq.view(), acc.h().view()).unwrap();
        // GPTQ minimises this objective column by column; round-to-nearest ignores H.
        assert!(e_gptq < e_rtn, "act_order {act_order}: gptq {e_gptq} vs rtn {e_rtn}");
    }
}

#[test]
fn half_precision_activations_accumulate_their_widened_values() {
    let mut rng = StdRng::seed_from_u64(12);
    let x = correlated_x(77, 96, &mut rng);
    let xh = x.mapv(f16::from_f32);
    let xb = x.mapv(bf16::from_f32);
    for (view, widened) in
        [(ActivationView::F16(xh.view()), xh.mapv(f32::from)), (ActivationView::BF16(xb.view()), xb.mapv(f32::from))]
    {
        let mut h = SharedHessian::new(96, &Backend::Cpu).unwrap();
        h.update(view).unwrap();
        let mut acc = HessianAccumulator::new(96).unwrap();
        acc.update(widened.view()).unwrap();
        assert_eq!(&h.to_host().unwrap(), acc.h(), "{:?}", view.dtype());
        assert_eq!(h.tokens(), 77);
    }
}

#[test]
fn non_finite_activations_are_typed_errors_and_leave_the_hessian_unchanged() {
    let mut rng = StdRng::seed_from_u64(13);
    let w = randn(8, 64, &mut rng);
    let mut layer = GptqLayer::new(WeightView::F32(w.view()), cfg(32), Backend::Cpu).unwrap();
    layer.update(ActivationView::F32(correlated_x(50, 64, &mut rng).view())).unwrap();
    let before = layer.hessian().to_host().unwrap();

    let mut x = correlated_x(20, 64, &mut rng);
    x[[5, 7]] = f32::NAN;
    match layer.update(ActivationView::F32(x.view())) {
        Err(ForgeError::NonFinite { tensor: "activations", row: 5, col: 7, value }) => assert!(value.is_nan()),
        other => panic!("expected NonFinite at (5, 7), got {other:?}"),
    }
    let mut xh = correlated_x(20, 64, &mut rng).mapv(f16::from_f32);
    xh[[3, 60]] = f16::INFINITY;
    match layer.update(ActivationView::F16(xh.view())) {
        Err(ForgeError::NonFinite { tensor: "activations", row: 3, col: 60, value }) => {
            assert_eq!(value, f32::INFINITY)
        }
        other => panic!("expected NonFinite at (3, 60), got {other:?}"),
    }
    assert_eq!(layer.tokens(), 50);
    assert_eq!(layer.hessian().to_host().unwrap(), before);

    // A weight handed straight to quantize_with is checked too (f32 as is, f16 widened).
    let factor = layer.hessian().pre_step(&PreStepConfig::default()).unwrap();
    let q = Quantizer::new(cfg(32), Backend::Cpu);
    let mut nan_w = w.clone();
    nan_w[[2, 40]] = f32::NAN;
    assert!(matches!(
        quantize_with(&q, &factor, WeightView::F32(nan_w.view())),
        Err(ForgeError::NonFinite { tensor: "weight", row: 2, col: 40, .. })
    ));
    let half_w = nan_w.mapv(f16::from_f32);
    assert!(matches!(
        quantize_with(&q, &factor, WeightView::F16(half_w.view())),
        Err(ForgeError::NonFinite { tensor: "weight", row: 2, col: 40, .. })
    ));

    let wrong = Array2::<f32>::zeros((4, 63));
    assert!(matches!(layer.update(ActivationView::F32(wrong.view())), Err(ForgeError::Shape(_))));
    let mut bad_w = w.clone();
    bad_w[[1, 2]] = f32::INFINITY;
    assert!(matches!(
        GptqLayer::new(WeightView::F32(bad_w.view()), cfg(32), Backend::Cpu),
        Err(ForgeError::NonFinite { tensor: "weight", row: 1, col: 2, .. })
    ));
}

#[test]
fn non_finite_hessians_are_typed_errors() {
    let mut h = Array2::<f32>::eye(64);
    h[[10, 3]] = f32::NAN;
    assert!(matches!(
        SharedHessian::from_host(h.view(), 100, &Backend::Cpu),
        Err(ForgeError::NonFinite { tensor: "hessian", row: 10, col: 3, .. })
    ));
    let w = Array2::<f32>::ones((4, 64));
    let experts = [ExpertInput::single(WeightView::F32(w.view()), Some(h.view()))];
    assert!(matches!(
        quantize_experts(&Backend::Cpu, &cfg(32), &PreStepConfig::default(), &experts),
        Err(ForgeError::NonFinite { tensor: "hessian", row: 10, col: 3, .. })
    ));
}

#[test]
fn indefinite_hessians_retry_with_more_damping_then_fall_back_to_identity() {
    let mut rng = StdRng::seed_from_u64(14);
    let w = randn(6, 64, &mut rng);
    let q = Quantizer::new(cfg(32), Backend::Cpu);
    let pcfg = PreStepConfig::default(); // damping 0.01, retries at 0.1, 1, 10 (× mean diag = 1)

    // 1 ± 3: needs damping > 2, so the third retry (10) succeeds.
    let shared = SharedHessian::from_host(indefinite(64, 3.0).view(), 10, &Backend::Cpu).unwrap();
    let f = shared.pre_step(&pcfg).unwrap();
    let flags = f.flags();
    assert_eq!((flags.retries, flags.fallback_identity), (3, false), "{flags:?}");
    assert!((flags.damping_used - 10.0).abs() < 1e-5);
    quantize_with(&q, &f, WeightView::F32(w.view())).unwrap();

    // 1 ± 30: no damping tried helps; U = I, flagged, and the result is round-to-nearest.
    let shared = SharedHessian::from_host(indefinite(64, 30.0).view(), 10, &Backend::Cpu).unwrap();
    let f = shared.pre_step(&pcfg).unwrap();
    let layer = quantize_with(&q, &f, WeightView::F32(w.view())).unwrap();
    assert_eq!((layer.flags.retries, layer.flags.fallback_identity), (MAX_RETRIES, true), "{:?}", layer.flags);
    assert!(!layer.flags.no_tokens);
    assert_rtn(&layer, &w, "identity fallback");
}

#[test]
fn rank_deficient_inputs_and_dead_columns() {
    let mut rng = StdRng::seed_from_u64(15);
    let (rows, cols) = (16, 128);
    let w = randn(rows, cols, &mut rng);
    // Fewer tokens than columns: H is singular; damping makes it definite. Column 5 never fires.
    let mut x = correlated_x(40, cols, &mut rng);
    x.column_mut(5).fill(0.0);
    let mut layer = GptqLayer::new(WeightView::F32(w.view()), cfg(64), Backend::Cpu).unwrap();
    layer.update(ActivationView::F32(x.view())).unwrap();
    let q = layer.quantize().unwrap();
    assert_eq!(q.flags.dead_columns, vec![5]);
    assert_eq!((q.flags.retries, q.flags.fallback_identity), (0, false));
    assert!(q.dequant().column(5).iter().all(|&v| v == 0.0), "a dead input's weights are zeroed");

    let h = layer.hessian().to_host().unwrap();
    let mut w0 = w.clone();
    w0.column_mut(5).fill(0.0);
    let (_, rtn_deq) = rtn(&w0, &q.grid);
    let e_gptq = layer_output_error(w0.view(), q.dequant().view(), h.view()).unwrap();
    let e_rtn = layer_output_error(w0.view(), rtn_deq.view(), h.view()).unwrap();
    assert!(e_gptq <= e_rtn, "gptq {e_gptq} vs rtn {e_rtn}");
}

#[test]
fn a_shared_hessian_gives_the_same_results_as_separate_layers() {
    let mut rng = StdRng::seed_from_u64(16);
    let cols = 192;
    let gate = randn(24, cols, &mut rng);
    let up = randn(40, cols, &mut rng);
    let batches: Vec<Array2<f32>> = [300, 90].iter().map(|&m| correlated_x(m, cols, &mut rng)).collect();
    let pcfg = PreStepConfig { act_order: true, ..PreStepConfig::default() };

    let mut shared = SharedHessian::new(cols, &Backend::Cpu).unwrap();
    for x in &batches {
        shared.update(ActivationView::F32(x.view())).unwrap();
    }
    let factor = shared.pre_step(&pcfg).unwrap();
    let q = Quantizer::new(cfg(64), Backend::Cpu);
    let shared_gate = quantize_with(&q, &factor, WeightView::F32(gate.view())).unwrap();
    let shared_up = quantize_with(&q, &factor, WeightView::F32(up.view())).unwrap();

    for (w, got) in [(&gate, &shared_gate), (&up, &shared_up)] {
        let mut layer = GptqLayer::new(WeightView::F32(w.view()), cfg(64), Backend::Cpu).unwrap();
        for x in &batches {
            layer.update(ActivationView::F32(x.view())).unwrap();
        }
        layer.quantization_pre_step(&pcfg).unwrap();
        assert_eq!(&layer.quantize().unwrap(), got);
    }
}

#[test]
fn a_zero_token_expert_is_flagged_and_equals_round_to_nearest() {
    let mut rng = StdRng::seed_from_u64(17);
    let w = randn(12, 160, &mut rng);
    for act_order in [false, true] {
        let pcfg = PreStepConfig { act_order, ..PreStepConfig::default() };
        let experts = [ExpertInput::single(WeightView::F32(w.view()), None)];
        let bulk = quantize_experts(&Backend::Cpu, &cfg(32), &pcfg, &experts).unwrap();
        let layer = &bulk[0][0];
        assert!(layer.flags.no_tokens && layer.flags.route == PreStepRoute::NoTokens, "{:?}", layer.flags);
        assert!(!layer.flags.fallback_identity && layer.flags.dead_columns.is_empty() && layer.perm.is_none());
        assert_rtn(layer, &w, "no tokens (bulk)");

        let mut single = GptqLayer::new(WeightView::F32(w.view()), cfg(32), Backend::Cpu).unwrap();
        single.quantization_pre_step(&pcfg).unwrap();
        let q = single.quantize().unwrap();
        assert_eq!(&q, layer);
    }
}

#[test]
fn experts_in_bulk_equal_one_by_one() {
    let mut rng = StdRng::seed_from_u64(18);
    let (hidden, inter) = (128, 64);
    let pcfg = PreStepConfig { act_order: true, ..PreStepConfig::default() };
    let config = cfg(32);
    let mut weights = Vec::new();
    let mut hessians = Vec::new();
    for _ in 0..3 {
        let (gate, up, down) =
            (randn(inter, hidden, &mut rng), randn(inter, hidden, &mut rng), randn(hidden, inter, &mut rng));
        let mut h_in = HessianAccumulator::new(hidden).unwrap();
        h_in.update(correlated_x(150, hidden, &mut rng).view()).unwrap();
        let mut h_mid = HessianAccumulator::new(inter).unwrap();
        h_mid.update(correlated_x(150, inter, &mut rng).view()).unwrap();
        weights.push((gate, up, down));
        hessians.push((h_in.into_h(), h_mid.into_h()));
    }
    let mut experts = Vec::new();
    for (e, ((gate, up, down), (h_in, h_mid))) in weights.iter().zip(&hessians).enumerate() {
        // Expert 1 saw no tokens.
        let (hi, hm) = if e == 1 { (None, None) } else { (Some(h_in.view()), Some(h_mid.view())) };
        experts
            .push(ExpertInput { weights: vec![WeightView::F32(gate.view()), WeightView::F32(up.view())], hessian: hi });
        experts.push(ExpertInput::single(WeightView::F32(down.view()), hm));
    }
    let bulk = quantize_experts(&Backend::Cpu, &config, &pcfg, &experts).unwrap();
    assert_eq!(bulk.len(), 6);
    let q = Quantizer::new(config.clone(), Backend::Cpu);
    for (k, input) in experts.iter().enumerate() {
        assert_eq!(bulk[k].len(), input.weights.len());
        let factor = match input.hessian {
            Some(h) => SharedHessian::from_host(h, 150, &Backend::Cpu).unwrap().pre_step(&pcfg).unwrap(),
            None => SharedHessian::new(input.weights[0].dim().1, &Backend::Cpu).unwrap().pre_step(&pcfg).unwrap(),
        };
        for (w, got) in input.weights.iter().zip(&bulk[k]) {
            let want = quantize_with(&q, &factor, *w).unwrap();
            assert_eq!(got, &want, "expert input {k}");
            assert_eq!(got.flags.no_tokens, input.hessian.is_none());
        }
    }

    // Shape errors: mismatched Hessian, weights of different widths, no weights.
    let (gate, down) = (&weights[0].0, &weights[0].2);
    let bad = [ExpertInput::single(WeightView::F32(gate.view()), Some(hessians[0].1.view()))];
    assert!(matches!(quantize_experts(&Backend::Cpu, &config, &pcfg, &bad), Err(ForgeError::Shape(_))));
    let bad =
        [ExpertInput { weights: vec![WeightView::F32(gate.view()), WeightView::F32(down.view())], hessian: None }];
    assert!(matches!(quantize_experts(&Backend::Cpu, &config, &pcfg, &bad), Err(ForgeError::Shape(_))));
    let bad = [ExpertInput { weights: vec![], hessian: None }];
    assert!(matches!(quantize_experts(&Backend::Cpu, &config, &pcfg, &bad), Err(ForgeError::Shape(_))));
}

#[test]
fn a_given_hessian_keeps_averaging_over_tokens() {
    // from_host(H over n tokens) + update(X over m tokens) is the running mean over n + m.
    let mut rng = StdRng::seed_from_u64(19);
    let (x1, x2) = (correlated_x(120, 64, &mut rng), correlated_x(40, 64, &mut rng));
    let mut acc = HessianAccumulator::new(64).unwrap();
    acc.update(x1.view()).unwrap();
    let mut given = SharedHessian::from_host(acc.h().view(), 120, &Backend::Cpu).unwrap();
    given.update(ActivationView::F32(x2.view())).unwrap();
    acc.update(x2.view()).unwrap();
    assert_eq!(given.tokens(), 160);
    let (a, b) = (given.to_host().unwrap(), acc.h().clone());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = (&a - &b).iter().fold(0f32, |m, v| m.max(v.abs()));
    // Two blends rounded differently: a few f32 ulps of the largest entry.
    assert!(diff <= 8.0 * f32::EPSILON * scale, "max diff {diff} (scale {scale})");
}

#[test]
fn the_cusolver_probe_answers_without_panicking() {
    // On a machine without libcusolver this must be a typed error, never a panic (cudarc
    // panics on a missing library or symbol, so the probe runs first).
    match fourbit_forge::device::cusolver::cusolver_available() {
        Ok(()) => eprintln!("cuSOLVER is loadable here"),
        Err(ForgeError::MissingLibrary { library: "cuSOLVER", reason }) => eprintln!("cuSOLVER missing: {reason}"),
        Err(e) => panic!("unexpected error from the probe: {e}"),
    }
}
