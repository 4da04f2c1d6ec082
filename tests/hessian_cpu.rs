//! Hessian accumulation and the CPU pre-step (docs/design.md §5).

use fourbit_forge::hessian::{pre_step_cpu, HessianAccumulator, PreStepConfig, MAX_RETRIES};
use fourbit_forge::ForgeError;
use ndarray::{arr2, concatenate, s, Array2, Axis};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rows: usize, cols: usize, rng: &mut StdRng) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || rng.sample::<f32, _>(StandardNormal))
}

/// `XᵀX` in f64.
fn xtx(x: &Array2<f32>) -> Array2<f64> {
    let x = x.mapv(f64::from);
    x.t().dot(&x)
}

/// A random SPD Hessian `XᵀX/n` of correlated inputs `X = Z·A` (n = 3·cols tokens).
fn random_spd(cols: usize, rng: &mut StdRng) -> Array2<f32> {
    let z = randn(3 * cols, cols, rng);
    let a = randn(cols, cols, rng);
    let x = z.dot(&a);
    (xtx(&x) / x.nrows() as f64).mapv(|v| v as f32)
}

/// Gauss–Jordan inverse with partial pivoting, in f64 (an oracle independent of faer).
fn inverse(a: &Array2<f64>) -> Array2<f64> {
    let n = a.nrows();
    let mut m = concatenate![Axis(1), a.clone(), Array2::<f64>::eye(n)];
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| m[[i, c]].abs().total_cmp(&m[[j, c]].abs())).expect("non-empty range");
        if p != c {
            for k in 0..2 * n {
                m.swap([p, k], [c, k]);
            }
        }
        let d = m[[c, c]];
        m.row_mut(c).mapv_inplace(|v| v / d);
        let pivot_row = m.row(c).to_owned();
        for i in 0..n {
            if i != c {
                let f = m[[i, c]];
                m.row_mut(i).scaled_add(-f, &pivot_row);
            }
        }
    }
    m.slice(s![.., n..]).to_owned()
}

/// `‖a − b‖_F / ‖b‖_F`.
fn rel_frobenius(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    ((a - b).mapv(|v| v * v).sum() / b.mapv(|v| v * v).sum()).sqrt()
}

/// `UᵀU` in f64, after checking `U` is upper triangular with a positive diagonal.
fn utu(u: &Array2<f32>) -> Array2<f64> {
    for ((i, j), &v) in u.indexed_iter() {
        if i > j {
            assert_eq!(v, 0.0, "U[{i},{j}] below the diagonal");
        }
        if i == j {
            assert!(v > 0.0, "U[{i},{i}] = {v}");
        }
    }
    let u = u.mapv(f64::from);
    u.t().dot(&u)
}

/// `H + d·I` in f64.
fn damped(h: &Array2<f32>, d: f64) -> Array2<f64> {
    h.mapv(f64::from) + Array2::<f64>::eye(h.nrows()) * d
}

fn mean_diag(h: &Array2<f32>) -> f64 {
    h.diag().iter().map(|&v| f64::from(v)).sum::<f64>() / h.nrows() as f64
}

#[test]
fn update_one_batch_is_two_over_n_xtx() {
    let mut rng = StdRng::seed_from_u64(1);
    let x = randn(50, 20, &mut rng);
    let mut acc = HessianAccumulator::new(20).expect("new");
    acc.update(x.view()).expect("update");
    assert_eq!(acc.tokens(), 50);
    assert_eq!(acc.h(), &acc.h().t(), "H is exactly symmetric");
    let want = xtx(&x) * (2.0 / 50.0);
    let got = acc.h().mapv(f64::from);
    assert!(rel_frobenius(&got, &want) < 1e-6, "{}", rel_frobenius(&got, &want));
}

#[test]
fn update_is_order_independent() {
    let mut rng = StdRng::seed_from_u64(2);
    let x1 = randn(30, 24, &mut rng);
    let x2 = randn(70, 24, &mut rng) * 3.0;
    let mut a = HessianAccumulator::new(24).expect("new");
    a.update(x1.view()).expect("update");
    a.update(x2.view()).expect("update");
    let mut b = HessianAccumulator::new(24).expect("new");
    b.update(x2.view()).expect("update");
    b.update(x1.view()).expect("update");
    let mut c = HessianAccumulator::new(24).expect("new");
    c.update(concatenate![Axis(0), x1, x2].view()).expect("update");
    assert_eq!((a.tokens(), b.tokens(), c.tokens()), (100, 100, 100));
    let want = (xtx(&x1) + xtx(&x2)) * (2.0 / 100.0);
    for acc in [&a, &b, &c] {
        let e = rel_frobenius(&acc.h().mapv(f64::from), &want);
        assert!(e < 1e-6, "relative error {e}");
    }
}

#[test]
fn update_rejects_bad_input_and_keeps_state() {
    let mut rng = StdRng::seed_from_u64(3);
    assert!(matches!(HessianAccumulator::new(0), Err(ForgeError::Shape(_))));
    let mut acc = HessianAccumulator::new(8).expect("new");
    acc.update(randn(5, 8, &mut rng).view()).expect("update");
    let before = acc.clone();
    assert!(matches!(acc.update(randn(5, 7, &mut rng).view()), Err(ForgeError::Shape(_))));
    let mut bad = randn(5, 8, &mut rng);
    bad[[3, 6]] = f32::NEG_INFINITY;
    assert!(matches!(acc.update(bad.view()), Err(ForgeError::NonFinite { tensor: "activations", row: 3, col: 6, .. })));
    // f32 overflow of XᵀX is an error, not an inf in H.
    let huge = Array2::from_elem((4, 8), 1e30f32);
    assert!(matches!(acc.update(huge.view()), Err(ForgeError::NonFinite { .. })));
    assert_eq!(acc, before);
    // An empty batch is a no-op.
    acc.update(Array2::<f32>::zeros((0, 8)).view()).expect("empty batch");
    assert_eq!(acc, before);
    // A transposed (non-standard layout) view is read correctly.
    let xt = randn(8, 6, &mut rng);
    let mut t1 = HessianAccumulator::new(8).expect("new");
    t1.update(xt.t()).expect("update");
    let mut t2 = HessianAccumulator::new(8).expect("new");
    t2.update(xt.t().to_owned().view()).expect("update");
    assert_eq!(t1, t2);
}

#[test]
fn factor_inverts_damped_hessian() {
    let mut rng = StdRng::seed_from_u64(4);
    let h = random_spd(48, &mut rng);
    let pre = pre_step_cpu(h.view(), None, &PreStepConfig::default()).expect("pre-step");
    let damp = 0.01 * mean_diag(&h);
    assert!((f64::from(pre.damping_used) - damp).abs() <= 1e-6 * damp);
    assert_eq!((pre.retries, pre.fallback_identity, pre.perm.as_ref()), (0, false, None));
    assert!(pre.dead_columns.is_empty());
    let e = rel_frobenius(&utu(&pre.hinv_factor), &inverse(&damped(&h, damp)));
    assert!(e < 1e-4, "relative error {e}");
}

#[test]
fn act_order_permutes_the_hessian() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut h = random_spd(40, &mut rng);
    // Make two diagonal entries tie so the stable order is visible: scale input 7 (S·H·S
    // stays SPD) so its diagonal lands on input 3's, then remove the last ulp of difference.
    let f = (h[[3, 3]] / h[[7, 7]]).sqrt();
    h.row_mut(7).mapv_inplace(|v| v * f);
    h.column_mut(7).mapv_inplace(|v| v * f);
    h[[7, 7]] = h[[3, 3]];
    let cfg = PreStepConfig { act_order: true, ..PreStepConfig::default() };
    let pre = pre_step_cpu(h.view(), None, &cfg).expect("pre-step");
    let perm = pre.perm.clone().expect("act-order gives a perm");
    let mut want: Vec<usize> = (0..40).collect();
    want.sort_by(|&a, &b| h[[b, b]].total_cmp(&h[[a, a]]).then(a.cmp(&b)));
    assert_eq!(perm, want);
    let p3 = perm.iter().position(|&j| j == 3).expect("3 in perm");
    let p7 = perm.iter().position(|&j| j == 7).expect("7 in perm");
    assert_eq!(p7, p3 + 1, "ties keep their original order");
    let hp = Array2::from_shape_fn((40, 40), |(i, j)| h[[perm[i], perm[j]]]);
    let e = rel_frobenius(&utu(&pre.hinv_factor), &inverse(&damped(&hp, 0.01 * mean_diag(&h))));
    assert!(e < 1e-4, "relative error {e}");
}

/// `H⁻¹ = [[4, −2], [−2, 17]]` (the solver test's hand-derived case) has
/// `U = [[2, −1], [0, 4]]`: `UᵀU = [[4, −2], [−2, 1 + 16]]`. Its inverse is
/// `H = [[17, 2], [2, 4]] / 64` (det `H⁻¹` = 68 − 4 = 64); without damping the pre-step
/// must give U back.
#[test]
fn recovers_hand_derived_factor() {
    let h = arr2(&[[17.0f32, 2.0], [2.0, 4.0]]) / 64.0;
    let cfg = PreStepConfig { rel_damp: 0.0, act_order: false, ..PreStepConfig::default() };
    let pre = pre_step_cpu(h.view(), None, &cfg).expect("pre-step");
    let want = arr2(&[[2.0f32, -1.0], [0.0, 4.0]]);
    for (g, w) in pre.hinv_factor.iter().zip(want.iter()) {
        assert!((g - w).abs() < 1e-6, "{} vs {want}", pre.hinv_factor);
    }
    assert_eq!(pre.damping_used, 0.0);
}

#[test]
fn dead_columns_are_fixed_and_zeroed() {
    let mut rng = StdRng::seed_from_u64(6);
    let mut x = randn(60, 12, &mut rng);
    x.column_mut(4).fill(0.0);
    x.column_mut(9).fill(0.0);
    let h = (xtx(&x) / 60.0).mapv(|v| v as f32);
    let w0 = randn(3, 12, &mut rng);
    let mut w = w0.clone();
    let pre = pre_step_cpu(h.view(), Some(&mut w), &PreStepConfig::default()).expect("pre-step");
    assert_eq!(pre.dead_columns, vec![4, 9]);
    for c in 0..12 {
        if c == 4 || c == 9 {
            assert!(w.column(c).iter().all(|&v| v == 0.0), "column {c} zeroed");
        } else {
            assert_eq!(w.column(c), w0.column(c));
        }
    }
    let mut fixed = h.clone();
    fixed[[4, 4]] = 1.0;
    fixed[[9, 9]] = 1.0;
    let damp = 0.01 * mean_diag(&fixed);
    assert!((f64::from(pre.damping_used) - damp).abs() <= 1e-6 * damp);
    let e = rel_frobenius(&utu(&pre.hinv_factor), &inverse(&damped(&fixed, damp)));
    assert!(e < 1e-4, "relative error {e}");

    // A Hessian with no signal at all (every input dead) would zero the whole weight: refused
    // (issue 10), with the weight untouched.
    let mut w = w0.clone();
    let r = pre_step_cpu(Array2::<f32>::zeros((12, 12)).view(), Some(&mut w), &PreStepConfig::default());
    assert!(matches!(&r, Err(ForgeError::Hessian(m)) if m.contains("every diagonal entry of H is 0")), "{r:?}");
    assert_eq!(w, w0);
}

#[test]
fn singular_hessian_without_damping_retries() {
    // Rank 1: the undamped Cholesky meets a zero pivot; retry 1 uses 10·1e-3 = 1% damping.
    let h = arr2(&[[1.0f32, 1.0], [1.0, 1.0]]);
    let cfg = PreStepConfig { rel_damp: 0.0, act_order: false, ..PreStepConfig::default() };
    let pre = pre_step_cpu(h.view(), None, &cfg).expect("pre-step");
    assert_eq!((pre.retries, pre.fallback_identity), (1, false));
    assert!((pre.damping_used - 0.01).abs() < 1e-9);
    let e = rel_frobenius(&utu(&pre.hinv_factor), &inverse(&damped(&h, 0.01)));
    assert!(e < 1e-4, "relative error {e}");
}

#[test]
fn indefinite_hessian_retries_until_positive_definite() {
    // Eigenvalues 4 and −2; damping 0.01, 0.1, 1 leave it indefinite, 10 (retry 3) does not.
    let h = arr2(&[[1.0f32, 3.0], [3.0, 1.0]]);
    let pre = pre_step_cpu(h.view(), None, &PreStepConfig::default()).expect("pre-step");
    assert_eq!((pre.retries, pre.fallback_identity), (3, false));
    assert!((pre.damping_used - 10.0).abs() < 1e-5);
    let e = rel_frobenius(&utu(&pre.hinv_factor), &inverse(&damped(&h, 10.0)));
    assert!(e < 1e-4, "relative error {e}");
}

#[test]
fn hopeless_hessian_falls_back_to_identity_flagged() {
    // Eigenvalue −99: even 10 (the last retry) cannot make it positive definite.
    let h = arr2(&[[1.0f32, 100.0], [100.0, 1.0]]);
    let pre = pre_step_cpu(h.view(), None, &PreStepConfig::default()).expect("pre-step");
    assert!(pre.fallback_identity);
    assert_eq!(pre.retries, MAX_RETRIES);
    assert_eq!(pre.hinv_factor, Array2::<f32>::eye(2));
    assert!((pre.damping_used - 10.0).abs() < 1e-5);
}

#[test]
fn pre_step_errors_are_typed() {
    let cfg = PreStepConfig::default();
    let shape = |r: Result<_, ForgeError>| matches!(r, Err(ForgeError::Shape(_)));
    assert!(shape(pre_step_cpu(Array2::<f32>::zeros((3, 4)).view(), None, &cfg)));
    assert!(shape(pre_step_cpu(Array2::<f32>::zeros((0, 0)).view(), None, &cfg)));
    let mut h = Array2::<f32>::eye(4);
    let mut w = Array2::<f32>::ones((2, 3));
    assert!(shape(pre_step_cpu(h.view(), Some(&mut w), &cfg)));
    for rel_damp in [-0.1f32, f32::NAN, f32::INFINITY] {
        let bad = PreStepConfig { rel_damp, ..PreStepConfig::default() };
        let r = pre_step_cpu(h.view(), None, &bad);
        assert!(matches!(r, Err(ForgeError::Config(_))), "rel_damp {rel_damp}: {r:?}");
    }
    h[[1, 2]] = f32::NAN;
    h[[0, 0]] = 0.0; // dead column 0, but the NaN must stop the pre-step before any change
    let mut w = Array2::<f32>::ones((2, 4));
    assert!(matches!(
        pre_step_cpu(h.view(), Some(&mut w), &cfg),
        Err(ForgeError::NonFinite { tensor: "hessian", row: 1, col: 2, .. })
    ));
    assert_eq!(w, Array2::<f32>::ones((2, 4)));
}
