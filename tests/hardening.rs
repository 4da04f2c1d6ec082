//! Issue 10: one regression test per case the issue lists (no abort, panic or hang on any
//! input, no silent wrong result, no partial file), on the CPU library API and the
//! `quantize_layer` example. Each test also runs the control next to the failure where one
//! makes sense, so the error is caused by what the test changed.
//!
//! The library tests run under a host budget of [`BUDGET`] (process-wide, the same in every
//! test of this file) so what is "too large" does not depend on the machine.

mod common;

use common::{example_binary, indefinite, randn};
use fourbit_forge::calib::{
    quantize_experts, ActivationView, ExpertInput, GptqLayer, PreStepRoute, PreparedFactor, SharedHessian,
};
use fourbit_forge::fsio::{prepare_output, remove_stale_temps, write_atomic, TEMP_PREFIX};
use fourbit_forge::grid::build_quant_grid;
use fourbit_forge::hessian::{pre_step_cpu, HessianAccumulator, PreStep, PreStepConfig};
use fourbit_forge::solver::{layer_output_error, round_to_nearest, solve_cpu};
use fourbit_forge::weights::{load_layer, synthetic_layer, LayerStats};
use fourbit_forge::{budget, Backend, ForgeError, GridConfig, Warning, WeightView};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::SeedableRng;
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The host budget of every library test here: 1 GiB.
const BUDGET: u64 = 1 << 30;

fn init() {
    budget::set_host_limit(Some(BUDGET));
}

/// `r` is `OutOfMemory` asking for exactly `want` bytes (or more than u64 when `None`), and
/// its message names the bytes and the limit.
fn assert_oom<T: std::fmt::Debug>(r: Result<T, ForgeError>, want: Option<u64>) {
    match &r {
        Err(e @ ForgeError::OutOfMemory { requested, limit, .. }) => {
            assert_eq!(*limit, BUDGET, "{e}");
            if want.is_some() {
                assert_eq!(*requested, want, "{e}");
            }
            let msg = e.to_string();
            if let Some(b) = requested {
                assert!(msg.contains(&b.to_string()), "{msg}");
            }
            assert!(msg.contains(&BUDGET.to_string()), "{msg}");
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
}

/// A safetensors file of f32 tensors `(name, shape, values)` in `dir`.
fn write_st(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, shape, _), b)| (n.to_string(), TensorView::new(Dtype::F32, shape.clone(), b).expect("view")))
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, safetensors::serialize(views, None).expect("serialize")).expect("write");
    path
}

fn cfg() -> GridConfig {
    GridConfig { group_size: 32, ..GridConfig::default() }
}

// ---------------------------------------------------------------------------------------
// Aborts from unbounded allocation
// ---------------------------------------------------------------------------------------

#[test]
fn a_1x200000_layer_file_is_a_budget_error_not_a_160_gb_hessian() {
    init();
    let dir = tempfile::tempdir().expect("tempdir");
    let cols = 200_000usize;
    let path = write_st(
        dir.path(),
        "wide.safetensors",
        &[("weight", vec![1, cols], vec![0.5; cols]), ("inputs", vec![1, cols], vec![1.0; cols])],
    );
    assert!(std::fs::metadata(&path).expect("file").len() < 2_000_000, "a 1.6 MB file");
    let t = Instant::now();
    // The loader asks for the raw weight twice, the raw activations, their f32 copy, H and
    // the XᵀX scratch, all checked before any tensor data is read.
    let c = cols as u64;
    let want = 2 * 4 * c + 4 * c + 4 * c + 2 * 4 * c * c;
    assert_oom(load_layer(&path, None, LayerStats::Activations("inputs")), Some(want));
    assert_oom(HessianAccumulator::new(cols), Some(2 * 4 * c * c));
    assert_oom(SharedHessian::new(cols, &Backend::Cpu), Some(2 * 4 * c * c));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Control: a small layer in the same kind of file loads.
    let ok = write_st(
        dir.path(),
        "small.safetensors",
        &[("weight", vec![2, 64], vec![0.5; 128]), ("inputs", vec![3, 64], vec![1.0; 192])],
    );
    load_layer(&ok, None, LayerStats::Activations("inputs")).expect("small layer loads");
}

#[test]
fn synthetic_layer_with_huge_rows_or_cols_is_a_budget_error_before_any_work() {
    init();
    let t = Instant::now();
    for (rows, cols) in [(1_000_000_000usize, 2048usize), (2048, 1_000_000_000), (1 << 40, 1 << 40)] {
        let r = synthetic_layer(rows, cols, 16, 0);
        assert!(matches!(r, Err(ForgeError::OutOfMemory { .. })), "{rows}×{cols}: {:?}", r.map(|_| ()));
    }
    // rows·cols overflows u64 itself: reported as such, not wrapped.
    assert_oom(synthetic_layer(usize::MAX, usize::MAX, 16, 0), None);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    synthetic_layer(8, 64, 16, 0).expect("control");
}

#[test]
fn grid_with_u32_max_rows_or_2_pow_31_minus_1_cols_is_a_budget_error() {
    init();
    let one = Array2::<f32>::from_elem((1, 1), 0.5);
    let t = Instant::now();
    // Both shapes pass GridConfig::validate; their records do not fit the budget.
    let rows = u32::MAX as usize;
    let w = one.broadcast((rows, 32)).expect("broadcast");
    GridConfig::default().validate(rows, 32).unwrap_or_else(|e| panic!("{e}"));
    assert_oom(build_quant_grid(WeightView::F32(w), &cfg()), Some(4 * rows as u64));
    let cols = (1usize << 31) - 1;
    let w = one.broadcast((16, cols)).expect("broadcast");
    GridConfig::default().validate(16, cols).unwrap_or_else(|e| panic!("{e}"));
    let n_groups = cols.div_ceil(32) as u64;
    assert_oom(build_quant_grid(WeightView::F32(w), &cfg()), Some(16 * n_groups * 4));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Past the u32 index range: a shape error.
    let w = one.broadcast((rows + 1, 32)).expect("broadcast");
    assert!(matches!(build_quant_grid(WeightView::F32(w), &cfg()), Err(ForgeError::Shape(_))));
    // Control: a broadcast weight of a sane size builds.
    let w = one.broadcast((64, 96)).expect("broadcast");
    build_quant_grid(WeightView::F32(w), &cfg()).expect("control");
}

#[test]
fn solve_pre_step_error_and_widen_are_budget_errors_before_reading_their_inputs() {
    init();
    let one = Array2::<f32>::from_elem((1, 1), 1.0);
    let t = Instant::now();
    let (rows, cols) = (1_000_000usize, 60_000usize);
    let w = one.broadcast((rows, cols)).expect("broadcast");
    let u = one.broadcast((cols, cols)).expect("broadcast");
    let grid = build_quant_grid(WeightView::F32(one.broadcast((1, 32)).expect("b")), &cfg()).expect("grid");
    // The grid does not fit the weight, but the memory check comes first and is cheap.
    assert!(matches!(solve_cpu(w, u, &grid, None), Err(ForgeError::OutOfMemory { .. })));
    assert!(matches!(pre_step_cpu(u, None, &PreStepConfig::default()), Err(ForgeError::OutOfMemory { .. })));
    assert!(matches!(layer_output_error(w, w, u), Err(ForgeError::OutOfMemory { .. })));
    assert!(matches!(GptqLayer::new(WeightView::F32(w), cfg(), Backend::Cpu), Err(ForgeError::OutOfMemory { .. })));
    assert!(matches!(SharedHessian::from_host(u, 1, &Backend::Cpu), Err(ForgeError::OutOfMemory { .. })));
    assert!(matches!(round_to_nearest(w, &grid), Err(ForgeError::Shape(_))), "grid/weight mismatch first");
    assert!(t.elapsed() < Duration::from_secs(2), "every check is O(1): {:?}", t.elapsed());
}

// ---------------------------------------------------------------------------------------
// Panics in public helpers
// ---------------------------------------------------------------------------------------

#[test]
fn read_row_f32_with_a_short_buffer_or_a_row_out_of_range_is_an_error() {
    let w = Array2::from_shape_fn((3, 64), |(r, c)| (r * 64 + c) as f32);
    let v = WeightView::F32(w.view());
    let mut short = vec![0f32; 63];
    assert!(matches!(v.read_row_f32(0, &mut short), Err(ForgeError::Shape(m)) if m.contains("63")));
    let mut buf = vec![0f32; 64];
    assert!(matches!(v.read_row_f32(3, &mut buf), Err(ForgeError::Shape(m)) if m.contains("row 3")));
    assert!(matches!(v.read_row_f32(usize::MAX, &mut buf), Err(ForgeError::Shape(_))));
    assert!(matches!(v.read_f32(0, 60, &mut buf[..5]), Err(ForgeError::Shape(_))));
    assert!(matches!(v.read_f32(0, usize::MAX, &mut buf[..5]), Err(ForgeError::Shape(_))));
    // Control: a longer buffer is fine (the row fills its front).
    let mut long = vec![-1f32; 70];
    v.read_row_f32(2, &mut long).expect("row 2");
    assert_eq!(&long[..64], w.row(2).as_slice().expect("contiguous"));
    assert_eq!(long[64], -1.0);
}

#[test]
fn quant_grid_meta_out_of_range_is_an_error() {
    let w = Array2::<f32>::ones((2, 64));
    let g = build_quant_grid(WeightView::F32(w.view()), &cfg()).expect("grid");
    assert_eq!(g.dim(), (2, 2));
    for (r, c) in [(2usize, 0usize), (0, 2), (usize::MAX, usize::MAX)] {
        assert!(matches!(g.meta(r, c), Err(ForgeError::Shape(_))), "({r}, {c})");
        assert_eq!(g.get(r, c), None);
    }
    assert_eq!(g.meta(1, 1).expect("in range"), g.get(1, 1).expect("in range"));
}

#[test]
fn activation_rows_past_the_end_is_an_error() {
    let x = Array2::<f32>::ones((5, 8));
    let v = ActivationView::F32(x.view());
    for (t0, t1) in [(0usize, 6usize), (3, 2), (6, 6), (0, usize::MAX)] {
        assert!(matches!(v.rows(t0, t1), Err(ForgeError::Shape(_))), "{t0}..{t1}");
    }
    assert_eq!(v.rows(1, 5).expect("in range").dim(), (4, 8));
    assert_eq!(v.rows(5, 5).expect("empty at the end").dim(), (0, 8));
}

#[test]
fn a_user_built_pre_step_with_a_dead_column_out_of_range_is_an_error() {
    let cols = 64;
    let good = || PreStep {
        hinv_factor: Array2::eye(cols),
        perm: None,
        dead_columns: vec![3],
        damping_used: 0.0,
        retries: 0,
        fallback_identity: false,
        warnings: vec![],
    };
    let bad = [
        PreStep { dead_columns: vec![cols], ..good() },
        PreStep { dead_columns: vec![usize::MAX], ..good() },
        PreStep { perm: Some((0..cols).rev().skip(1).collect()), ..good() },
        PreStep { perm: Some(vec![0; cols]), ..good() },
        PreStep { hinv_factor: Array2::zeros((cols, cols)), ..good() },
        PreStep { hinv_factor: Array2::from_elem((cols, cols), f32::NAN), ..good() },
        PreStep { damping_used: f32::NAN, ..good() },
    ];
    for pre in bad {
        let what = format!("{:?} {:?}", pre.dead_columns, pre.perm.as_ref().map(Vec::len));
        let r = PreparedFactor::new(pre, PreStepRoute::Cpu);
        assert!(r.is_err(), "{what}: accepted");
    }
    // Control: the good one quantizes, its dead column zeroed.
    let f = PreparedFactor::new(good(), PreStepRoute::Cpu).expect("good pre-step");
    let w = Array2::<f32>::ones((2, cols));
    let quantizer = fourbit_forge::Quantizer::new(cfg(), Backend::Cpu);
    let q = fourbit_forge::calib::quantize_with(&quantizer, &f, WeightView::F32(w.view())).expect("quantizes");
    assert!(q.dequant().column(3).iter().all(|&v| v == 0.0));
    // A factor of another width is refused by the quantize call, not indexed past its end.
    let wide = PreStep { hinv_factor: Array2::eye(cols + 1), ..good() };
    let f = PreparedFactor::new(wide, PreStepRoute::Cpu).expect("valid on its own");
    let r = fourbit_forge::calib::quantize_with(&quantizer, &f, WeightView::F32(w.view()));
    assert!(matches!(r, Err(ForgeError::Shape(_))));
}

// ---------------------------------------------------------------------------------------
// Hangs
// ---------------------------------------------------------------------------------------

#[cfg(unix)]
#[test]
fn a_fifo_as_the_weights_file_is_refused_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("weights.safetensors");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let (tx, rx) = std::sync::mpsc::channel();
    let p = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(load_layer(&p, None, LayerStats::Activations("x")).map(|_| ()));
    });
    let r = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(r) => r,
        Err(_) => {
            // Unblock the stuck reader before failing, so the test process can exit.
            let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
            panic!("load_layer blocked on a FIFO");
        }
    };
    assert!(matches!(&r, Err(ForgeError::NotRegularFile { kind, .. }) if kind == "a FIFO"), "{r:?}");
    for (p, want) in [(Path::new("/dev/null"), "a device"), (dir.path(), "a directory")] {
        let r = load_layer(p, None, LayerStats::Activations("x"));
        assert!(matches!(&r, Err(ForgeError::NotRegularFile { kind, .. }) if kind == want), "{r:?}");
        assert!(r.is_err_and(|e| e.to_string().contains("not a regular file")));
    }
}

// ---------------------------------------------------------------------------------------
// Silent wrong results
// ---------------------------------------------------------------------------------------

fn spd(cols: usize, seed: u64) -> Array2<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = randn(4 * cols, cols, &mut rng);
    x.t().dot(&x) * (2.0 / (4 * cols) as f32)
}

#[test]
fn a_non_symmetric_hessian_is_symmetrised_with_a_warning_beyond_the_tolerance() {
    let mut h = spd(32, 1);
    // Within the tolerance (1e-4 of sqrt(H_ii·H_jj)): rounding, no warning.
    let scale = (h[[2, 2]] * h[[5, 5]]).sqrt();
    h[[2, 5]] += 1e-6 * scale;
    let pre = pre_step_cpu(h.view(), None, &PreStepConfig::default()).expect("pre-step");
    assert!(!pre.warnings.iter().any(|w| matches!(w, Warning::AsymmetricHessian { .. })), "{:?}", pre.warnings);
    // Beyond it: symmetrised as before, and said.
    h[[7, 3]] += 0.3 * (h[[7, 7]] * h[[3, 3]]).sqrt();
    let pre = pre_step_cpu(h.view(), None, &PreStepConfig::default()).expect("pre-step");
    match pre.warnings.first() {
        Some(w @ Warning::AsymmetricHessian { max_relative, at }) => {
            assert_eq!(*at, (3, 7));
            assert!((max_relative - 0.3).abs() < 1e-3, "{max_relative}");
            assert!(w.to_string().contains("(H + Hᵀ)/2 was used"), "{w}");
        }
        other => panic!("expected an asymmetry warning, got {other:?}"),
    }
    // The same through the layer API.
    let shared = SharedHessian::from_host(h.view(), 100, &Backend::Cpu).expect("shared");
    let f = shared.pre_step(&PreStepConfig::default()).expect("pre-step");
    assert!(matches!(f.summary().warnings.first(), Some(Warning::AsymmetricHessian { .. })));
}

#[test]
fn an_all_zero_hessian_is_an_error_not_a_zeroed_weight() {
    let w = randn(4, 64, &mut StdRng::seed_from_u64(2));
    let mut layer = GptqLayer::new(WeightView::F32(w.view()), cfg(), Backend::Cpu).expect("layer");
    layer.update(ActivationView::F32(Array2::<f32>::zeros((10, 64)).view())).expect("zeros are valid input");
    let r = layer.quantize();
    assert!(matches!(&r, Err(ForgeError::Hessian(m)) if m.contains("every diagonal entry of H is 0")), "{r:?}");
    let r = pre_step_cpu(Array2::<f32>::zeros((64, 64)).view(), None, &PreStepConfig::default());
    assert!(matches!(r, Err(ForgeError::Hessian(_))));
    // Control: one live input is enough.
    let mut h = Array2::<f32>::zeros((64, 64));
    h[[5, 5]] = 1.0;
    let pre = pre_step_cpu(h.view(), None, &PreStepConfig::default()).expect("one live input");
    assert_eq!(pre.dead_columns.len(), 63);
    assert!(matches!(&pre.warnings[..], [Warning::DeadInputs { count: 63, .. }]), "{:?}", pre.warnings);
}

#[test]
fn a_negative_definite_hessian_is_an_error_unless_the_user_opts_in() {
    let h = -spd(16, 3);
    let r = pre_step_cpu(h.view(), None, &PreStepConfig::default());
    assert!(matches!(&r, Err(ForgeError::Hessian(m)) if m.contains("allow_indefinite")), "{r:?}");
    let shared = SharedHessian::from_host(h.view(), 10, &Backend::Cpu).expect("stored");
    assert!(matches!(shared.pre_step(&PreStepConfig::default()), Err(ForgeError::Hessian(_))));
    // Opted in: the old behaviour (raised damping), with the warnings that say so.
    let cfg = PreStepConfig { allow_indefinite: true, ..PreStepConfig::default() };
    let pre = pre_step_cpu(h.view(), None, &cfg).expect("opted in");
    assert!(
        matches!(pre.warnings.first(), Some(Warning::IndefiniteAccepted { count: 16, first: 0 })),
        "{:?}",
        pre.warnings
    );
    assert!(pre
        .warnings
        .iter()
        .any(|w| matches!(w, Warning::DampingRetries { .. } | Warning::FallbackIdentity { .. })));
}

#[test]
fn damping_retries_and_the_identity_fallback_are_warnings() {
    // Positive diagonal, indefinite: legal input, retried (eigenvalues 4 and −2 → retry 3).
    let pre = pre_step_cpu(indefinite(64, 3.0).view(), None, &PreStepConfig::default()).expect("retried");
    assert_eq!(pre.retries, 3);
    assert!(matches!(&pre.warnings[..], [Warning::DampingRetries { retries: 3, .. }]), "{:?}", pre.warnings);
    let pre = pre_step_cpu(indefinite(64, 30.0).view(), None, &PreStepConfig::default()).expect("fallback");
    assert!(pre.fallback_identity);
    assert!(matches!(&pre.warnings[..], [Warning::FallbackIdentity { .. }]), "{:?}", pre.warnings);
    // And they reach the quantized layer.
    let w = randn(2, 64, &mut StdRng::seed_from_u64(4));
    let out = quantize_experts(
        &Backend::Cpu,
        &cfg(),
        &PreStepConfig::default(),
        &[
            ExpertInput::single(WeightView::F32(w.view()), Some(indefinite(64, 3.0).view())),
            ExpertInput::single(WeightView::F32(w.view()), None),
        ],
    )
    .expect("experts");
    assert!(matches!(&out[0][0].warnings[..], [Warning::DampingRetries { .. }]), "{:?}", out[0][0].warnings);
    assert!(matches!(&out[1][0].warnings[..], [Warning::NoCalibrationTokens]), "{:?}", out[1][0].warnings);
    // Control: a healthy Hessian has no warnings.
    let pre = pre_step_cpu(spd(64, 5).view(), None, &PreStepConfig::default()).expect("healthy");
    assert!(pre.warnings.is_empty(), "{:?}", pre.warnings);
}

#[test]
fn weights_near_1e38_are_an_error_not_an_inf_loss() {
    let h = spd(64, 6);
    let pre = pre_step_cpu(h.view(), None, &PreStepConfig::default()).expect("pre-step");
    for big in [3.3e38f32, 1e30, 1e20] {
        let mut w = randn(4, 64, &mut StdRng::seed_from_u64(7));
        w.mapv_inplace(|v| v.clamp(-3.0, 3.0) * (big / 4.0));
        w[[1, 0]] = -big;
        let grid = build_quant_grid(WeightView::F32(w.view()), &cfg()).expect("grid");
        match solve_cpu(w.view(), pre.hinv_factor.view(), &grid, None) {
            Err(ForgeError::NonFinite { .. }) | Err(ForgeError::Numeric(_)) => {}
            Ok(out) => {
                assert!(out.loss.iter().all(|l| l.is_finite()), "{big}: Ok with loss {:?}", out.loss);
                assert!(out.dequant.iter().all(|v| v.is_finite()), "{big}: Ok with a non-finite dequant");
            }
            Err(e) => panic!("{big}: unexpected {e}"),
        }
    }
    // 1e30: every step is finite but Σ err² does not fit f32.
    let w = Array2::from_shape_fn((4, 64), |(r, c)| if (r + c) % 3 == 0 { 1e30 } else { -7e29 });
    let grid = build_quant_grid(WeightView::F32(w.view()), &cfg()).expect("grid");
    let r = solve_cpu(w.view(), pre.hinv_factor.view(), &grid, None);
    assert!(matches!(&r, Err(ForgeError::Numeric(m)) if m.contains("GPTQ loss")), "{:?}", r.map(|o| o.loss));
}

#[test]
fn a_dequantized_overflow_at_the_first_column_is_not_called_an_overflow_during_updates() {
    // Group (0, 0) with scale 4.3e37 and w[0, 0] = −7.6·scale: the code is 0, and
    // (0 − 8)·scale = −3.44e38 overflows f32 in the very first step of the solve.
    let mut w = Array2::<f32>::from_elem((2, 64), 1.0);
    w[[0, 0]] = -7.6 * 4.3e37;
    let mut grid = build_quant_grid(WeightView::F32(w.view()), &cfg()).expect("grid");
    let rec = fourbit_forge::QMetaPacked::encode(4.3e37, 8.0, true).to_bytes();
    for (k, b) in rec.into_iter().enumerate() {
        grid.qmeta[[0, 0, k]] = b;
    }
    let r = solve_cpu(w.view(), Array2::eye(64).view(), &grid, None);
    match &r {
        Err(e @ ForgeError::NonFinite { tensor, row: 0, col: 0, .. }) => {
            assert!(tensor.contains("dequantized"), "{e}");
            assert!(!tensor.contains("during"), "{e}");
        }
        other => panic!("expected a dequantization overflow at (0, 0), got {:?}", other.as_ref().map(|o| &o.loss)),
    }
}

#[test]
fn weights_below_the_scale_floor_are_flushed_with_a_warning() {
    let mut w = randn(3, 96, &mut StdRng::seed_from_u64(8));
    // Row 1, group 2 (columns 64..96): magnitudes far below 1e-12·maxq/2.
    for c in 64..96 {
        w[[1, c]] = 1e-14 * (1.0 + c as f32 / 96.0);
    }
    let grid = build_quant_grid(WeightView::F32(w.view()), &cfg()).expect("grid");
    let out = solve_cpu(w.view(), Array2::eye(96).view(), &grid, None).expect("solves");
    assert!(out.dequant.slice(ndarray::s![1, 64..96]).iter().all(|&v| v == 0.0));
    match &out.warnings[..] {
        [w @ Warning::FlushedGroups { groups: 1, total: 9, first: (1, 2) }] => {
            assert!(w.to_string().contains("1e-12"), "{w}")
        }
        other => panic!("{other:?}"),
    }
    // Through the layer API too (uncorrelated inputs: no error feedback reaches the group).
    let eye = Array2::<f32>::eye(96);
    let input = [ExpertInput::single(WeightView::F32(w.view()), Some(eye.view()))];
    let q = quantize_experts(&Backend::Cpu, &cfg(), &PreStepConfig::default(), &input).expect("quantizes");
    assert!(q[0][0].warnings.iter().any(|w| matches!(w, Warning::FlushedGroups { .. })), "{:?}", q[0][0].warnings);
    // Control: an all-zero group is represented exactly, no warning.
    let mut z = w.clone();
    z.slice_mut(ndarray::s![1, 64..96]).fill(0.0);
    let grid = build_quant_grid(WeightView::F32(z.view()), &cfg()).expect("grid");
    let out = solve_cpu(z.view(), Array2::eye(96).view(), &grid, None).expect("solves");
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
}

#[test]
fn a_rejected_update_keeps_the_pre_step_and_the_hessian() {
    let mut rng = StdRng::seed_from_u64(10);
    let w = randn(4, 64, &mut rng);
    let mut layer = GptqLayer::new(WeightView::F32(w.view()), cfg(), Backend::Cpu).expect("layer");
    layer.update(ActivationView::F32(randn(100, 64, &mut rng).view())).expect("update");
    let act = PreStepConfig { act_order: true, ..PreStepConfig::default() };
    layer.quantization_pre_step(&act).expect("pre-step");
    let h0 = layer.hessian().to_host().expect("H");
    let mut bad = randn(5, 64, &mut rng);
    bad[[2, 9]] = f32::NAN;
    assert!(layer.update(ActivationView::F32(bad.view())).is_err());
    assert!(layer.update(ActivationView::F32(randn(5, 63, &mut rng).view())).is_err());
    assert_eq!(layer.tokens(), 100);
    assert_eq!(layer.hessian().to_host().expect("H"), h0);
    // quantize() uses the kept act-order pre-step (the default would have no perm).
    assert!(layer.quantize().expect("quantizes").perm.is_some(), "the pre-step was dropped");
}

#[test]
fn a_token_count_at_u64_max_does_not_wrap() {
    let h = spd(32, 11);
    let mut shared = SharedHessian::from_host(h.view(), u64::MAX, &Backend::Cpu).expect("stored");
    let x = randn(3, 32, &mut StdRng::seed_from_u64(12));
    let r = shared.update(ActivationView::F32(x.view()));
    assert!(matches!(&r, Err(ForgeError::Overflow(m)) if m.contains("token count")), "{r:?}");
    assert_eq!(shared.tokens(), u64::MAX);
    assert_eq!(shared.to_host().expect("H"), h, "H must be unchanged");
    // Control: with room left, the blend weights are right (H ≈ unchanged for n ≫ m).
    let mut shared = SharedHessian::from_host(h.view(), u64::MAX - 3, &Backend::Cpu).expect("stored");
    shared.update(ActivationView::F32(x.view())).expect("fits");
    assert_eq!(shared.tokens(), u64::MAX);
}

#[test]
fn rel_damp_nan_is_rejected_even_without_tokens() {
    let w = Array2::<f32>::ones((2, 64));
    let mut layer = GptqLayer::new(WeightView::F32(w.view()), cfg(), Backend::Cpu).expect("layer");
    for rel_damp in [f32::NAN, -1.0, f32::INFINITY] {
        let bad = PreStepConfig { rel_damp, ..PreStepConfig::default() };
        assert!(matches!(layer.quantization_pre_step(&bad), Err(ForgeError::Config(_))), "{rel_damp}");
        let r = quantize_experts(&Backend::Cpu, &cfg(), &bad, &[ExpertInput::single(WeightView::F32(w.view()), None)]);
        assert!(matches!(r, Err(ForgeError::Config(_))), "{rel_damp}: experts");
    }
    // Control: a valid setting without tokens is the flagged identity.
    let f = layer.quantization_pre_step(&PreStepConfig::default()).expect("no tokens");
    assert_eq!(f.route(), PreStepRoute::NoTokens);
}

#[test]
fn grids_with_reserved_flag_bits_or_a_maxq_that_disagrees_with_the_records_are_rejected() {
    let w = randn(3, 64, &mut StdRng::seed_from_u64(13));
    let u = Array2::<f32>::eye(64);
    let grid = build_quant_grid(WeightView::F32(w.view()), &cfg()).expect("grid");
    solve_cpu(w.view(), u.view(), &grid, None).expect("control");
    for bit in 1..8 {
        let mut g = grid.clone();
        g.qmeta[[2, 1, 3]] |= 1 << bit;
        let r = solve_cpu(w.view(), u.view(), &g, None);
        assert!(matches!(&r, Err(ForgeError::Shape(m)) if m.contains("reserved")), "bit {bit}: {:?}", r.map(|_| ()));
    }
    // A 4-bit symmetric grid relabelled 8-bit: zero points 8, not 128.
    let mut g = grid.clone();
    g.maxq = 255;
    let r = solve_cpu(w.view(), u.view(), &g, None);
    assert!(matches!(&r, Err(ForgeError::Shape(m)) if m.contains("disagree")), "{:?}", r.map(|_| ()));
    // An asymmetric record with a zero point above maxq.
    let asym = GridConfig { symmetric: false, ..cfg() };
    let mut g = build_quant_grid(WeightView::F32(w.view()), &asym).expect("asym grid");
    g.qmeta[[0, 0, 2]] = 16;
    assert!(matches!(solve_cpu(w.view(), u.view(), &g, None), Err(ForgeError::Shape(_))));
}

#[test]
fn layer_output_error_refuses_undefined_ratios_and_negative_definite_h() {
    let w = Array2::from_shape_fn((2, 64), |(r, c)| if c == 1 { 1.0 + r as f32 } else { 0.0 });
    let mut q = w.clone();
    q[[0, 0]] = 0.5;
    // H sees only input 0: W H Wᵀ = 0 but (Q−W) H (Q−W)ᵀ > 0 — was Ok(inf).
    let mut h = Array2::<f32>::zeros((64, 64));
    h[[0, 0]] = 1.0;
    let r = layer_output_error(w.view(), q.view(), h.view());
    assert!(matches!(&r, Err(ForgeError::Numeric(m)) if m.contains("undefined")), "{r:?}");
    // 0/0 stays 0 (Q = W where H sees anything).
    assert_eq!(layer_output_error(w.view(), w.view(), h.view()).expect("0/0"), 0.0);
    // Negative-definite H.
    let spd = spd(64, 14);
    let neg = -&spd;
    assert!(matches!(layer_output_error(w.view(), q.view(), neg.view()), Err(ForgeError::Hessian(_))));
    // Indefinite with a positive diagonal, along a negative direction.
    let ind = indefinite(64, 3.0);
    let d = Array2::from_shape_fn((1, 64), |(_, c)| match c {
        0 => 1.0f32,
        1 => -1.0,
        _ => 0.0,
    });
    let z = Array2::<f32>::zeros((1, 64));
    assert!(matches!(layer_output_error(d.view(), z.view(), ind.view()), Err(ForgeError::Hessian(_))));
    // Control.
    let e = layer_output_error(w.view(), q.view(), spd.view()).expect("defined");
    assert!(e.is_finite() && e > 0.0);
}

// ---------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------

/// The pid of a process that has exited (spawned and waited for).
#[cfg(unix)]
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().expect("wait");
    pid
}

#[cfg(unix)]
fn age(path: &Path, secs: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open");
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(secs)).expect("set mtime");
}

#[cfg(unix)]
#[test]
fn stale_temp_files_of_ours_are_removed_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let dead = dead_pid();
    let me = std::process::id();
    let stale = d.join(format!("{TEMP_PREFIX}{dead}.0.out.safetensors"));
    let keep = [
        d.join(format!("{TEMP_PREFIX}{me}.0.mine.safetensors")), // our own, alive
        d.join(format!("{TEMP_PREFIX}{dead}.1.fresh.safetensors")), // dead but just written
        d.join(format!("{TEMP_PREFIX}1.2.init.safetensors")),    // pid 1 is alive
        d.join(format!("{TEMP_PREFIX}{dead}.x.safetensors")),    // not our pattern
        d.join(format!(".out.safetensors.{dead}.tmp")),          // the old naming, not ours
        d.join("model.safetensors"),
        d.join("notes.tmp"),
    ];
    for p in std::iter::once(&stale).chain(&keep) {
        std::fs::write(p, b"x").expect("write");
    }
    for p in std::iter::once(&stale).chain(&keep).filter(|p| !p.to_string_lossy().contains("fresh")) {
        age(p, 3600);
    }
    let sub = d.join(format!("{TEMP_PREFIX}{dead}.3.dir"));
    std::fs::create_dir(&sub).expect("dir");
    let link = d.join(format!("{TEMP_PREFIX}{dead}.4.link"));
    std::os::unix::fs::symlink(d.join("model.safetensors"), &link).expect("symlink");

    let removed = remove_stale_temps(d).expect("scan");
    assert_eq!(removed, vec![stale.clone()]);
    assert!(!stale.exists());
    for p in keep.iter().chain([&sub, &link]) {
        assert!(std::fs::symlink_metadata(p).is_ok(), "{} was deleted", p.display());
    }
    // prepare_output runs the same cleanup.
    let stale2 = d.join(format!("{TEMP_PREFIX}{dead}.5.out.safetensors"));
    std::fs::write(&stale2, b"x").expect("write");
    age(&stale2, 3600);
    prepare_output(&d.join("out.safetensors")).expect("target ok");
    assert!(!stale2.exists());
}

#[test]
fn atomic_writes_leave_the_old_file_or_the_whole_new_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("out.bin");
    std::fs::write(&target, b"old").expect("old");
    // A writer that fails half-way: the target is untouched and no temporary file is left.
    let r = write_atomic(&target, |w| {
        use std::io::Write;
        w.write_all(&[7u8; 100_000]).map_err(|e| ForgeError::Internal(e.to_string()))?;
        Err(ForgeError::Internal("interrupted".into()))
    });
    assert!(r.is_err());
    assert_eq!(std::fs::read(&target).expect("read"), b"old");
    let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").flatten().map(|e| e.file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("out.bin")], "a temporary file was left behind");
    // Success replaces it whole.
    write_atomic(&target, |w| {
        use std::io::Write;
        w.write_all(b"new").map_err(|e| ForgeError::Internal(e.to_string()))
    })
    .expect("write");
    assert_eq!(std::fs::read(&target).expect("read"), b"new");
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
}

#[test]
fn output_targets_are_checked_before_any_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let sub = d.join("sub");
    std::fs::create_dir(&sub).expect("dir");
    for (target, needle) in [
        (sub.clone(), "directory"),
        (d.join("missing").join("x.safetensors"), "not usable"),
        (d.join("file").join("x.safetensors"), "is a regular file"),
        (d.join(format!("{TEMP_PREFIX}1.2.x")), "reserved"),
        (PathBuf::from("/"), "does not name a file"),
    ] {
        if target.ends_with("file/x.safetensors") {
            std::fs::write(d.join("file"), b"x").expect("file");
        }
        let r = prepare_output(&target);
        assert!(matches!(&r, Err(e) if e.to_string().contains(needle)), "{}: {r:?}", target.display());
    }
    prepare_output(&d.join("ok.safetensors")).expect("control");
    assert_eq!(std::fs::read_dir(&sub).expect("ls").count(), 0);
}

// ---------------------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------------------

/// Runs the example in `dir` with `args` (CPU, small budget), within `limit`.
fn cli(dir: &Path, args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Output, Duration) {
    let mut cmd = Command::new(example_binary("quantize_layer"));
    cmd.current_dir(dir).arg("--cpu").args(args).env_remove(budget::ENV_VAR);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t = Instant::now();
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("spawn");
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("quantize_layer {args:?} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (child.wait_with_output().expect("output"), t.elapsed())
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn cli_huge_shapes_and_token_counts_fail_fast_with_a_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fast = Duration::from_secs(20);
    for (args, needle) in [
        (&["--cols", "9223372036854775808"][..], "too large"),
        (&["--cols", "1000000000", "--tokens", "16"], "needs"),
        (&["--rows", "1000000000"], "needs"),
        (&["--tokens", "18446744073709551615"], "maximum"),
        (&["--rows", "64", "--cols", "64", "--out", "."], "does not name a file"),
        (&["--rows", "64", "--cols", "64", "--out", "/"], "does not name a file"),
        (&["--rows", "64", "--cols", "64", "--out", "/tmp"], "is a directory"),
        (&["--rows", "64", "--cols", "64", "--out", "nope/x.safetensors"], "not usable"),
        (&["--weights", "/dev/zero", "--activations", "x"], "not a regular file"),
    ] {
        let (o, took) = cli(dir.path(), args, &[], fast);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(needle), "{args:?}: {}", text(&o));
        assert!(took < fast, "{args:?} took {took:?}");
    }
    // The budget comes from the environment, named in the message.
    let (o, _) = cli(dir.path(), &["--rows", "64", "--cols", "256"], &[(budget::ENV_VAR, "64K")], fast);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("FORGE_MAX_HOST_MEMORY=64K"), "{}", text(&o));
    let (o, _) = cli(dir.path(), &["--rows", "64", "--cols", "256"], &[(budget::ENV_VAR, "lots")], fast);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // No output file was made by any failing run.
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    // Control: the same binary quantizes a small synthetic layer and writes the file.
    let (o, _) = cli(dir.path(), &["--rows", "64", "--cols", "256", "--tokens", "300"], &[], Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let bytes = std::fs::read(dir.path().join("quantized.safetensors")).expect("written");
    safetensors::SafeTensors::deserialize(&bytes).expect("a whole safetensors file");
}

#[test]
fn cli_prints_warnings_and_refuses_a_negative_definite_hessian_unless_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cols = 64;
    let w = randn(8, cols, &mut StdRng::seed_from_u64(15));
    let h = -spd(cols, 16);
    let mut asym = spd(cols, 17);
    asym[[0, 1]] *= 3.0;
    let path = write_st(
        dir.path(),
        "layer.safetensors",
        &[
            ("weight", vec![8, cols], w.iter().copied().collect()),
            ("neg", vec![cols, cols], h.iter().copied().collect()),
            ("asym", vec![cols, cols], asym.iter().copied().collect()),
        ],
    );
    let p = path.to_str().expect("utf-8 path");
    let limit = Duration::from_secs(60);
    let (o, _) =
        cli(dir.path(), &["--weights", p, "--tensor", "weight", "--hessian", "neg", "--group-size", "32"], &[], limit);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("--allow-indefinite") || text(&o).contains("allow_indefinite"), "{}", text(&o));
    let (o, _) = cli(
        dir.path(),
        &["--weights", p, "--tensor", "weight", "--hessian", "neg", "--group-size", "32", "--allow-indefinite"],
        &[],
        limit,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning: H has 64 negative diagonal entries"), "{}", text(&o));
    let (o, _) =
        cli(dir.path(), &["--weights", p, "--tensor", "weight", "--hessian", "asym", "--group-size", "32"], &[], limit);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning: the Hessian is not symmetric"), "{}", text(&o));
}

/// Kills the example at several points of a run: the target is then absent or a whole file,
/// and the temporary file a kill leaves behind is removed by the next run once stale.
#[cfg(unix)]
#[test]
fn cli_killed_mid_run_leaves_no_partial_file_and_the_next_run_cleans_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let args = ["--cpu", "--rows", "512", "--cols", "512", "--tokens", "1024"];
    let bin = example_binary("quantize_layer");
    for delay_ms in [5u64, 50, 150, 300, 600, 1000] {
        let _ = std::fs::remove_file(d.join("quantized.safetensors"));
        let mut child = Command::new(&bin)
            .current_dir(d)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        if let Ok(bytes) = std::fs::read(d.join("quantized.safetensors")) {
            safetensors::SafeTensors::deserialize(&bytes).expect("a killed run left a partial target");
        }
    }
    // Whatever temporary files the kills left: age them past STALE_AGE, then a run removes them.
    for e in std::fs::read_dir(d).expect("ls").flatten() {
        if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            age(&e.path(), 3600);
        }
    }
    let (o, _) = cli(d, &["--rows", "64", "--cols", "64", "--tokens", "100"], &[], Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let left: Vec<_> = std::fs::read_dir(d)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(TEMP_PREFIX))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
