//! CPU reference GPTQ solver (docs/design.md §4): exactness against round-to-nearest and the
//! straightforward recurrence, a hand-derived case, act-order bookkeeping, typed errors,
//! and the GPTQ objective against round-to-nearest on correlated activations.

mod common;

use common::rtn;

use fourbit_forge::grid::build_quant_grid;
use fourbit_forge::hessian::{pre_step_cpu, HessianAccumulator, PreStepConfig};
use fourbit_forge::numerics::{dequantize, quantize, stored_scale};
use fourbit_forge::solver::{layer_output_error, solve_cpu};
use fourbit_forge::{ForgeError, GridConfig, QMetaPacked, QuantGrid, ScaleDtype, ScaleSearch, WeightView};
use ndarray::{s, Array2, Array3, Axis};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rows: usize, cols: usize, rng: &mut StdRng) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || rng.sample::<f32, _>(StandardNormal))
}

fn grid(w: &Array2<f32>, bits: u32, gs: usize, symmetric: bool) -> QuantGrid {
    let cfg =
        GridConfig { group_size: gs, bits, symmetric, scale_search: ScaleSearch::Absmax, ..GridConfig::default() };
    build_quant_grid(WeightView::F32(w.view()), &cfg).expect("grid builds")
}

/// The recurrence of docs/design.md §4 written as plainly as possible (one row, one column at a
/// time, every update applied immediately).
fn naive_solve(w: &Array2<f32>, u: &Array2<f32>, g: &QuantGrid, perm: &[usize]) -> (Array2<u8>, Array2<f32>, Vec<f32>) {
    let (rows, cols) = w.dim();
    let maxq = g.maxq as f32;
    let mut codes = Array2::zeros((rows, cols));
    let mut deq = Array2::zeros((rows, cols));
    let mut loss = vec![0f32; rows];
    for r in 0..rows {
        let mut row = w.row(r).to_owned();
        let mut acc = 0f64;
        for t in 0..cols {
            let j = perm[t];
            let m = g.meta(r, j / g.group_size);
            // The scale a checkpoint stores: the decode rounded to the grid's scale dtype.
            let scale = stored_scale(m.log2_scale_q88, g.scale_dtype);
            let q = quantize(row[j], scale, m.qzero_f32(), maxq);
            let y = dequantize(q, scale, m.qzero_f32());
            let err = (row[j] - y) / u[[t, t]];
            codes[[r, j]] = q as u8;
            deq[[r, j]] = y;
            acc += f64::from(err) * f64::from(err);
            for k in t + 1..cols {
                row[perm[k]] -= err * u[[t, k]];
            }
        }
        loss[r] = (acc / 2.0) as f32;
    }
    (codes, deq, loss)
}

/// `X = Z·A` (tokens × cols) with Gaussian `Z` and `A`: strongly correlated inputs.
fn correlated_x(tokens: usize, cols: usize, rng: &mut StdRng) -> Array2<f64> {
    let z = randn(tokens, cols, rng).mapv(f64::from);
    let a = randn(cols, cols, rng).mapv(f64::from);
    z.dot(&a)
}

/// `H = XᵀX / n` in f64, rounded to f32.
fn hessian_of(x: &Array2<f64>) -> Array2<f32> {
    (x.t().dot(x) / x.nrows() as f64).mapv(|v| v as f32)
}

fn assert_bits_eq(a: &Array2<f32>, b: &Array2<f32>, what: &str) {
    for ((idx, x), y) in a.indexed_iter().zip(b.iter()) {
        assert_eq!(x.to_bits(), y.to_bits(), "{what} differs at {idx:?}: {x} vs {y}");
    }
}

#[test]
fn identity_factor_gives_round_to_nearest() {
    let mut rng = StdRng::seed_from_u64(1);
    // 200 columns in groups of 64: four groups, the last one padded; 7 rows: a partial tile.
    let w = randn(7, 200, &mut rng);
    for (bits, symmetric) in [(2, true), (3, false), (4, true), (4, false), (8, true)] {
        let g = grid(&w, bits, 64, symmetric);
        let (codes, deq) = rtn(&w, &g);
        // U = I and U = 3·I: off-diagonal zeros never move a weight, whatever the diagonal.
        for d in [1.0f32, 3.0] {
            let u = Array2::eye(200) * d;
            let out = solve_cpu(w.view(), u.view(), &g, None).expect("solves");
            assert_eq!(out.qweight, codes, "bits {bits} sym {symmetric} d {d}");
            assert_bits_eq(&out.dequant, &deq, "dequant");
            for r in 0..7 {
                let want: f64 = (0..200).map(|c| f64::from((w[[r, c]] - deq[[r, c]]) / d).powi(2)).sum::<f64>() / 2.0;
                assert!((f64::from(out.loss[r]) - want).abs() <= 1e-6 * want, "row {r} loss {} vs {want}", out.loss[r]);
            }
        }
    }
}

/// One row `w = [0.4, 0.35]`, scale 1, q0 8, maxq 15 (a hand-made 4-bit asymmetric grid),
/// `U = [[2, −1], [0, 4]]` (so `H⁻¹ = UᵀU = [[4, −2], [−2, 17]]`):
///
/// * t = 0: q = round(0.4 + 8) = 8, deq = 0, err = (0.4 − 0)/2 = 0.2;
///   w1 ← 0.35 − 0.2·(−1) = 0.55.
/// * t = 1: q = round(0.55 + 8) = 9, deq = 1, err = (0.55 − 1)/4 = −0.1125.
/// * loss = (0.2² + 0.1125²)/2 = (0.04 + 0.01265625)/2 = 0.026328125.
///
/// Round-to-nearest would give codes [8, 8]: the update moves the second code.
#[test]
fn hand_derived_two_column_case() {
    let w = ndarray::arr2(&[[0.4f32, 0.35]]);
    let u = ndarray::arr2(&[[2.0f32, -1.0], [0.0, 4.0]]);
    let meta = QMetaPacked::encode(1.0, 8.0, false);
    assert_eq!(meta.scale(), 1.0);
    let g = QuantGrid {
        qmeta: Array3::from_shape_vec((1, 1, 4), meta.to_bytes().to_vec()).expect("1 record"),
        maxq: 15,
        pad: 30,
        group_size: 32,
        scale_dtype: fourbit_forge::ScaleDtype::F32,
    };
    let out = solve_cpu(w.view(), u.view(), &g, None).expect("solves");
    assert_eq!(out.qweight, ndarray::arr2(&[[8u8, 9]]));
    assert_eq!(out.dequant, ndarray::arr2(&[[0.0f32, 1.0]]));
    assert!((out.loss[0] - 0.026328125).abs() < 1e-6, "loss {}", out.loss[0]);
    // The same problem in the other order: perm [1, 0] needs U of the permuted H⁻¹ (a
    // different matrix), so only check that round-to-nearest is what U = I gives.
    let rtn_out = solve_cpu(w.view(), Array2::eye(2).view(), &g, Some(&[1, 0])).expect("solves");
    assert_eq!(rtn_out.qweight, ndarray::arr2(&[[8u8, 8]]));
}

#[test]
fn blocked_solver_equals_straightforward_recurrence() {
    let mut rng = StdRng::seed_from_u64(2);
    // 300 columns: two full lazy batches of 128 and a short one; 7 rows: a partial tile.
    let (rows, cols) = (7, 300);
    let w = randn(rows, cols, &mut rng);
    let h = hessian_of(&correlated_x(2 * cols, cols, &mut rng));
    for act_order in [false, true] {
        let cfg = PreStepConfig { act_order, ..PreStepConfig::default() };
        let pre = pre_step_cpu(h.view(), None, &cfg).expect("pre-step");
        assert!(!pre.fallback_identity);
        let perm: Vec<usize> = pre.perm.clone().unwrap_or_else(|| (0..cols).collect());
        for (bits, symmetric, gs, scale_dtype) in [
            (4, true, 64, ScaleDtype::F32),
            (3, false, 32, ScaleDtype::F32),
            (2, true, 128, ScaleDtype::F32),
            (4, true, 64, ScaleDtype::BF16),
            (3, false, 32, ScaleDtype::F16),
        ] {
            let g = QuantGrid { scale_dtype, ..grid(&w, bits, gs, symmetric) };
            let out = solve_cpu(w.view(), pre.hinv_factor.view(), &g, pre.perm.as_deref()).expect("solves");
            let (codes, deq, loss) = naive_solve(&w, &pre.hinv_factor, &g, &perm);
            assert_eq!(out.qweight, codes, "act_order {act_order} bits {bits} {scale_dtype:?}");
            assert_bits_eq(&out.dequant, &deq, "dequant");
            assert_eq!(out.loss.to_vec(), loss);
        }
    }
}

#[test]
fn act_order_result_unpermutes() {
    let mut rng = StdRng::seed_from_u64(3);
    let (rows, cols, gs) = (5, 256, 64);
    let w = randn(rows, cols, &mut rng);
    let g = grid(&w, 4, gs, false);
    let h = hessian_of(&correlated_x(2 * cols, cols, &mut rng));
    // A permutation that moves whole groups and shuffles inside each, so the explicitly
    // permuted problem still has one group per `gs` consecutive columns.
    let n_groups = cols / gs;
    let mut gperm: Vec<usize> = (0..n_groups).collect();
    gperm.shuffle(&mut rng);
    let mut perm = Vec::with_capacity(cols);
    for &gi in &gperm {
        let mut inner: Vec<usize> = (gi * gs..(gi + 1) * gs).collect();
        inner.shuffle(&mut rng);
        perm.extend(inner);
    }
    assert_ne!(perm, (0..cols).collect::<Vec<_>>());
    // U of the permuted Hessian.
    let hp = Array2::from_shape_fn((cols, cols), |(i, j)| h[[perm[i], perm[j]]]);
    let pre = pre_step_cpu(hp.view(), None, &PreStepConfig::default()).expect("pre-step");
    let u = pre.hinv_factor;

    let out = solve_cpu(w.view(), u.view(), &g, Some(&perm)).expect("solves");

    let wp = w.select(Axis(1), &perm);
    let mut qmeta_p = Array3::zeros(g.qmeta.dim());
    for (gp, &gi) in gperm.iter().enumerate() {
        qmeta_p.slice_mut(s![.., gp, ..]).assign(&g.qmeta.slice(s![.., gi, ..]));
    }
    let gp = QuantGrid { qmeta: qmeta_p, ..g.clone() };
    let outp = solve_cpu(wp.view(), u.view(), &gp, None).expect("solves");
    let mut codes = Array2::zeros((rows, cols));
    let mut deq = Array2::zeros((rows, cols));
    for (t, &j) in perm.iter().enumerate() {
        codes.column_mut(j).assign(&outp.qweight.column(t));
        deq.column_mut(j).assign(&outp.dequant.column(t));
    }
    assert_eq!(out.qweight, codes);
    assert_bits_eq(&out.dequant, &deq, "dequant");
    assert_eq!(out.loss, outp.loss);
    // And the order matters: without perm (same U) the result is a different solve.
    let plain = solve_cpu(w.view(), u.view(), &g, None).expect("solves");
    assert_ne!(plain.qweight, out.qweight);
}

#[test]
fn diagonal_normalised_factor_gives_nearly_the_same_codes() {
    let mut rng = StdRng::seed_from_u64(4);
    let (rows, cols) = (16, 192);
    let w = randn(rows, cols, &mut rng);
    let g = grid(&w, 4, 64, true);
    let h = hessian_of(&correlated_x(2 * cols, cols, &mut rng));
    let u = pre_step_cpu(h.view(), None, &PreStepConfig::default()).expect("pre-step").hinv_factor;
    let un = Array2::from_shape_fn((cols, cols), |(i, j)| u[[i, j]] / u[[i, i]]);
    let a = solve_cpu(w.view(), u.view(), &g, None).expect("solves");
    let b = solve_cpu(w.view(), un.view(), &g, None).expect("solves");
    // Same math, different f32 rounding of err·U[t,k]: codes may differ only rarely.
    let differ = a.qweight.iter().zip(b.qweight.iter()).filter(|(x, y)| x != y).count();
    assert!(differ * 100 <= rows * cols, "{differ} of {} codes differ", rows * cols);
}

fn is_shape<T>(r: Result<T, ForgeError>) -> bool {
    matches!(r, Err(ForgeError::Shape(_)))
}

#[test]
fn errors_are_typed() {
    let mut rng = StdRng::seed_from_u64(5);
    let w = randn(3, 64, &mut rng);
    let g = grid(&w, 4, 32, true);
    let u = Array2::<f32>::eye(64);

    assert!(solve_cpu(w.view(), u.view(), &g, None).is_ok());
    assert!(is_shape(solve_cpu(w.view(), Array2::eye(63).view(), &g, None)));
    assert!(is_shape(solve_cpu(w.view(), Array2::zeros((64, 63)).view(), &g, None)));
    assert!(is_shape(solve_cpu(w.slice(s![.., ..63]).view(), Array2::eye(63).view(), &g, None)));
    assert!(is_shape(solve_cpu(w.slice(s![..2, ..]).view(), u.view(), &g, None)));
    assert!(is_shape(solve_cpu(Array2::<f32>::zeros((0, 0)).view(), Array2::zeros((0, 0)).view(), &g, None)));
    let bad_gs = QuantGrid { group_size: 48, ..g.clone() };
    assert!(matches!(solve_cpu(w.view(), u.view(), &bad_gs, None), Err(ForgeError::GroupSize(48))));
    let bad_maxq = QuantGrid { maxq: 10, ..g.clone() };
    assert!(is_shape(solve_cpu(w.view(), u.view(), &bad_maxq, None)));
    // Scales of 65520 and more overflow f16: nothing can be quantized against +inf.
    let big = w.mapv(|v| v * 1e6);
    let g_big = grid(&big, 4, 32, true);
    assert!(solve_cpu(big.view(), u.view(), &g_big, None).is_ok(), "f32 holds the scale");
    let g_f16 = QuantGrid { scale_dtype: ScaleDtype::F16, ..g_big };
    assert!(matches!(solve_cpu(big.view(), u.view(), &g_f16, None), Err(ForgeError::Format(_))));

    let mut p: Vec<usize> = (0..64).collect();
    assert!(is_shape(solve_cpu(w.view(), u.view(), &g, Some(&p[..63]))));
    p[5] = 7;
    assert!(is_shape(solve_cpu(w.view(), u.view(), &g, Some(&p))));
    p[5] = 64;
    assert!(is_shape(solve_cpu(w.view(), u.view(), &g, Some(&p))));

    let mut wn = w.clone();
    wn[[2, 9]] = f32::NAN;
    match solve_cpu(wn.view(), u.view(), &g, None) {
        Err(ForgeError::NonFinite { tensor: "weight", row: 2, col: 9, value }) => assert!(value.is_nan()),
        other => panic!("expected NonFinite weight, got {other:?}"),
    }
    let mut ui = u.clone();
    ui[[3, 40]] = f32::INFINITY;
    assert!(matches!(
        solve_cpu(w.view(), ui.view(), &g, None),
        Err(ForgeError::NonFinite { tensor: "hinv_factor", row: 3, col: 40, .. })
    ));
    for d in [0.0f32, -1.0] {
        let mut uz = u.clone();
        uz[[10, 10]] = d;
        assert!(is_shape(solve_cpu(w.view(), uz.view(), &g, None)), "diagonal {d}");
    }
    // An update large enough to overflow the working weight is reported, not propagated.
    let mut ub = u.clone();
    ub.row_mut(0).slice_mut(s![1..]).fill(f32::MAX);
    ub[[0, 0]] = 1e-30;
    assert!(matches!(solve_cpu(w.view(), ub.view(), &g, None), Err(ForgeError::NonFinite { .. })));

    assert!(is_shape(layer_output_error(w.view(), w.slice(s![.., ..63]), u.view())));
    assert!(is_shape(layer_output_error(w.view(), w.view(), Array2::eye(63).view())));
    assert!(matches!(
        layer_output_error(w.view(), wn.view(), u.view()),
        Err(ForgeError::NonFinite { tensor: "q", .. })
    ));
}

/// With small integers and dyadic weights every quantity below is exact in f64, so the
/// trace formula and the direct `‖(Q−W)Xᵀ‖²/‖WXᵀ‖²` must agree to rounding.
#[test]
fn layer_output_error_matches_direct_formula() {
    let mut rng = StdRng::seed_from_u64(6);
    let (rows, cols, tokens) = (9, 40, 25);
    let x = Array2::from_shape_simple_fn((tokens, cols), || f64::from(rng.gen_range(-3i32..=3)));
    let w = Array2::from_shape_simple_fn((rows, cols), || rng.gen_range(-16i32..=16) as f32 / 8.0);
    let q = w.mapv(|v| v + rng.gen_range(-2i32..=2) as f32 / 16.0);
    let h = x.t().dot(&x).mapv(|v| v as f32);
    let w64 = w.mapv(f64::from);
    let d64 = q.mapv(f64::from) - &w64;
    let num = d64.dot(&x.t()).mapv(|v| v * v).sum();
    let den = w64.dot(&x.t()).mapv(|v| v * v).sum();
    let got = layer_output_error(w.view(), q.view(), h.view()).expect("computes");
    assert!((got - num / den).abs() <= 1e-12 * (num / den), "{got} vs {}", num / den);
    assert_eq!(layer_output_error(w.view(), w.view(), h.view()).expect("computes"), 0.0);
}

/// GPTQ (1% damping, with and without act-order) against round-to-nearest on the same grid,
/// measured with the undamped `H`; returns (gptq, rtn).
fn gptq_and_rtn_error(
    seed: u64,
    rows: usize,
    cols: usize,
    bits: u32,
    gs: usize,
    symmetric: bool,
    act_order: bool,
) -> (f64, f64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = randn(rows, cols, &mut rng);
    let h = hessian_of(&correlated_x(2 * cols, cols, &mut rng));
    let g = grid(&w, bits, gs, symmetric);
    let cfg = PreStepConfig { act_order, ..PreStepConfig::default() };
    let pre = pre_step_cpu(h.view(), None, &cfg).expect("pre-step");
    assert!(!pre.fallback_identity);
    let out = solve_cpu(w.view(), pre.hinv_factor.view(), &g, pre.perm.as_deref()).expect("solves");
    let (_, rtn_deq) = rtn(&w, &g);
    let e_gptq = layer_output_error(w.view(), out.dequant.view(), h.view()).expect("error");
    let e_rtn = layer_output_error(w.view(), rtn_deq.view(), h.view()).expect("error");
    (e_gptq, e_rtn)
}

#[test]
fn gptq_beats_round_to_nearest_on_fixed_seeds() {
    for seed in 0..4 {
        for act_order in [false, true] {
            let (e_gptq, e_rtn) = gptq_and_rtn_error(100 + seed, 32, 256, 4, 128, true, act_order);
            // On strongly correlated inputs GPTQ removes most of the output error.
            assert!(e_gptq < 0.5 * e_rtn, "seed {seed} act_order {act_order}: gptq {e_gptq} rtn {e_rtn}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn gptq_objective_never_exceeds_round_to_nearest(
        seed in any::<u64>(),
        rows in 4usize..20,
        cols_groups in 2usize..6,
        bits in 2u32..=4,
        gs_small in any::<bool>(),
        symmetric in any::<bool>(),
        act_order in any::<bool>(),
    ) {
        let gs = if gs_small { 32 } else { 64 };
        // Not always a whole number of groups: the last group may be short (padded).
        let cols = cols_groups * gs - (seed % 7) as usize;
        let (e_gptq, e_rtn) = gptq_and_rtn_error(seed, rows, cols, bits, gs, symmetric, act_order);
        prop_assert!(e_gptq <= e_rtn, "gptq {} > rtn {}", e_gptq, e_rtn);
    }
}

/// Wall times of the CPU path on a 4096×4096 layer (8192 tokens): run with
/// `cargo test --test solver_cpu -- --ignored --nocapture` (use an optimised profile).
#[test]
#[ignore]
fn cpu_reference_timing_4096() {
    let n = 4096;
    let mut rng = StdRng::seed_from_u64(9);
    let w = randn(n, n, &mut rng);
    let x = randn(2 * n, n, &mut rng);
    let t = std::time::Instant::now();
    let mut acc = HessianAccumulator::new(n).expect("new");
    acc.update(x.view()).expect("update");
    eprintln!("update {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let pre = pre_step_cpu(acc.h().view(), None, &PreStepConfig::default()).expect("pre-step");
    eprintln!("pre-step {:?}", t.elapsed());
    let g = grid(&w, 4, 128, true);
    let t = std::time::Instant::now();
    let out = solve_cpu(w.view(), pre.hinv_factor.view(), &g, None).expect("solves");
    eprintln!("solve {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let e = layer_output_error(w.view(), out.dequant.view(), acc.h().view()).expect("error");
    eprintln!("layer_output_error {:?} = {e}", t.elapsed());
}
