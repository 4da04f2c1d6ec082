//! The fused GPU solver against the CPU reference solver (docs/design.md §4, §7). Runs on a GPU
//! machine; skips with the reason elsewhere.
//!
//! Both solvers compute in f32 but sum the updates in different orders (the GPU's
//! left-looking product vs the CPU's right-looking recurrence), so a code can flip where a
//! working weight sits within rounding of a quantization midpoint; the flip then feeds the
//! later columns of that row. Parity therefore means: codes differ in a small fraction of
//! places, each by at most 1, and the layer-output error and the per-row GPTQ loss agree
//! within `OBJ_RTOL` (a flipped code changes one element's squared error by at most
//! ~s²/2 against a row total of hundreds of such terms).

mod common;

use fourbit_forge::grid::build_quant_grid;
use fourbit_forge::hessian::{pre_step_cpu, HessianAccumulator, PreStepConfig};
use fourbit_forge::solver::solve_gpu;
use fourbit_forge::solver::{layer_output_error, solve_cpu, SolveOutput};
use fourbit_forge::ScaleDtype::{self, BF16, F16, F32};
use fourbit_forge::{Backend, GridConfig, QuantGrid, Quantizer, ScaleSearch, WeightView};
use ndarray::Array2;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal, StudentT};

const OBJ_RTOL: f64 = 2e-3;
const MAX_DIFF_FRACTION: f64 = 0.02;

struct Layer {
    w: Array2<f32>,
    h: Array2<f32>,
}

/// Heavy-tailed weights and a Hessian from correlated activations.
fn layer(rows: usize, cols: usize, seed: u64) -> Layer {
    let mut rng = StdRng::seed_from_u64(seed);
    let t = StudentT::new(3.0f32).unwrap();
    let w = Array2::from_shape_fn((rows, cols), |_| t.sample(&mut rng) * 0.02);
    let n = Normal::new(0.0f32, 1.0).unwrap();
    let k = cols.min(64);
    let mix = Array2::from_shape_fn((k, cols), |(i, _)| n.sample(&mut rng) / (1.0 + i as f32));
    let tokens = 2 * cols + 64;
    let z = Array2::from_shape_fn((tokens, k), |_| n.sample(&mut rng));
    let noise = Array2::from_shape_fn((tokens, cols), |_| 0.05 * n.sample(&mut rng));
    let x = z.dot(&mix) + noise;
    let mut acc = HessianAccumulator::new(cols).unwrap();
    acc.update(x.view()).unwrap();
    Layer { w, h: acc.into_h() }
}

fn compare(what: &str, l: &Layer, cpu: &SolveOutput, gpu: &SolveOutput) -> f64 {
    let n = cpu.qweight.len();
    let mut differ = 0usize;
    for (a, b) in cpu.qweight.iter().zip(gpu.qweight.iter()) {
        let d = (*a as i32 - *b as i32).abs();
        assert!(d <= 1, "{what}: a code differs by {d}");
        differ += (d != 0) as usize;
    }
    let frac = differ as f64 / n as f64;
    assert!(frac <= MAX_DIFF_FRACTION, "{what}: {differ} of {n} codes differ");
    let ec = layer_output_error(l.w.view(), cpu.dequant.view(), l.h.view()).unwrap();
    let eg = layer_output_error(l.w.view(), gpu.dequant.view(), l.h.view()).unwrap();
    assert!((ec - eg).abs() <= OBJ_RTOL * ec.max(1e-12), "{what}: layer-output error CPU {ec} vs GPU {eg}");
    let (lc, lg) = (cpu.loss.sum() as f64, gpu.loss.sum() as f64);
    assert!((lc - lg).abs() <= OBJ_RTOL * lc.max(1e-12), "{what}: GPTQ loss CPU {lc} vs GPU {lg}");
    // Where the codes agree, so must the dequantized values (same qmeta, same numerics).
    for ((a, b), (x, y)) in cpu.qweight.iter().zip(gpu.qweight.iter()).zip(cpu.dequant.iter().zip(gpu.dequant.iter())) {
        if a == b {
            assert_eq!(x.to_bits(), y.to_bits(), "{what}: equal codes, different dequant");
        }
    }
    eprintln!("{what}: {differ}/{n} codes differ ({:.2e}); layer-output error CPU {ec:.5} GPU {eg:.5}", frac);
    frac
}

/// One parity case: shape, format, act-order, seed.
struct Case {
    rows: usize,
    cols: usize,
    gs: usize,
    bits: u32,
    sym: bool,
    act_order: bool,
    seed: u64,
    /// The dtype the scales are stored in (both solvers quantize against the stored scale).
    scale_dtype: ScaleDtype,
}

fn run_case(dev: &fourbit_forge::device::GpuDevice, case: Case) {
    let Case { rows, cols, gs, bits, sym, act_order, seed, scale_dtype } = case;
    let l = layer(rows, cols, seed);
    let pre = pre_step_cpu(l.h.view(), None, &PreStepConfig { act_order, ..PreStepConfig::default() }).unwrap();
    let cfg = GridConfig { group_size: gs, bits, symmetric: sym, scale_search: ScaleSearch::Absmax, scale_dtype };
    let grid = build_quant_grid(WeightView::F32(l.w.view()), &cfg).unwrap();
    let perm = pre.perm.as_deref();
    let cpu = solve_cpu(l.w.view(), pre.hinv_factor.view(), &grid, perm).unwrap();
    let gpu = solve_gpu(dev, l.w.view(), pre.hinv_factor.view(), &grid, perm).unwrap();
    compare(&format!("{rows}x{cols} gs{gs} b{bits} sym={sym} act_order={act_order} {scale_dtype:?}"), &l, &cpu, &gpu);
}

#[test]
fn gpu_solver_matches_cpu_on_awkward_shapes() {
    let Some(dev) = common::gpu_or_skip("gpu_solver_matches_cpu_on_awkward_shapes") else { return };
    // cols not a multiple of the 64-column block, a single row, gs = cols, act-order,
    // fewer rows than one 16-row block, and enough rows for the 32-row kernel.
    run_case(
        &dev,
        Case { rows: 37, cols: 200, gs: 32, bits: 4, sym: true, act_order: false, seed: 1, scale_dtype: F32 },
    );
    run_case(
        &dev,
        Case { rows: 1, cols: 130, gs: 64, bits: 3, sym: false, act_order: true, seed: 2, scale_dtype: F32 },
    );
    run_case(
        &dev,
        Case { rows: 24, cols: 256, gs: 256, bits: 4, sym: true, act_order: true, seed: 3, scale_dtype: F32 },
    );
    run_case(
        &dev,
        Case { rows: 5, cols: 64, gs: 32, bits: 8, sym: false, act_order: false, seed: 4, scale_dtype: F32 },
    );
    run_case(
        &dev,
        Case { rows: 300, cols: 512, gs: 128, bits: 4, sym: true, act_order: true, seed: 5, scale_dtype: F32 },
    );
    run_case(
        &dev,
        Case { rows: 4400, cols: 96, gs: 32, bits: 2, sym: true, act_order: false, seed: 6, scale_dtype: F32 },
    );
    // More columns than one 512-column panel: the trailing update between panels.
    run_case(
        &dev,
        Case { rows: 70, cols: 1300, gs: 128, bits: 4, sym: true, act_order: true, seed: 7, scale_dtype: F32 },
    );
    run_case(
        &dev,
        Case { rows: 33, cols: 700, gs: 64, bits: 3, sym: false, act_order: false, seed: 8, scale_dtype: F32 },
    );
    // Scales as a checkpoint stores them: the same shapes with bf16 and f16 scales.
    run_case(
        &dev,
        Case { rows: 37, cols: 200, gs: 32, bits: 4, sym: true, act_order: false, seed: 1, scale_dtype: BF16 },
    );
    run_case(
        &dev,
        Case { rows: 300, cols: 512, gs: 128, bits: 4, sym: true, act_order: true, seed: 5, scale_dtype: BF16 },
    );
    run_case(
        &dev,
        Case { rows: 70, cols: 1300, gs: 128, bits: 4, sym: true, act_order: true, seed: 7, scale_dtype: F16 },
    );
    run_case(
        &dev,
        Case { rows: 33, cols: 700, gs: 64, bits: 3, sym: false, act_order: false, seed: 8, scale_dtype: F16 },
    );
}

#[test]
fn gpu_solver_matches_cpu_on_random_layers() {
    let Some(dev) = common::gpu_or_skip("gpu_solver_matches_cpu_on_random_layers") else { return };
    let mut rng = StdRng::seed_from_u64(99);
    for case in 0..12 {
        let rows = rng.gen_range(1..200);
        let cols = rng.gen_range(1..400);
        let gs = 32 * rng.gen_range(1..=8);
        let bits = rng.gen_range(2..=8);
        let scale_dtype = [F32, F16, BF16][case as usize % 3];
        run_case(
            &dev,
            Case { rows, cols, gs, bits, sym: rng.gen(), act_order: rng.gen(), seed: 1000 + case, scale_dtype },
        );
    }
}

#[test]
fn gpu_identity_factor_is_exactly_round_to_nearest() {
    let Some(dev) = common::gpu_or_skip("gpu_identity_factor_is_exactly_round_to_nearest") else { return };
    let l = layer(70, 300, 11);
    let u = Array2::<f32>::eye(300);
    for scale_dtype in [F32, F16, BF16] {
        let cfg = GridConfig { group_size: 64, scale_dtype, ..GridConfig::default() };
        let grid = build_quant_grid(WeightView::F32(l.w.view()), &cfg).unwrap();
        let cpu = solve_cpu(l.w.view(), u.view(), &grid, None).unwrap();
        let gpu = solve_gpu(&dev, l.w.view(), u.view(), &grid, None).unwrap();
        assert_eq!(cpu.qweight, gpu.qweight, "{scale_dtype:?}: no updates, the codes must be identical");
        assert!(cpu.dequant.iter().zip(gpu.dequant.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{scale_dtype:?}");
        // And round-to-nearest against the stored scales (tests/common::rtn).
        let (codes, deq) = common::rtn(&l.w, &grid);
        assert_eq!(gpu.qweight, codes, "{scale_dtype:?}: round-to-nearest at the stored scale");
        assert!(gpu.dequant.iter().zip(deq.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{scale_dtype:?}");
    }
}

/// Stored f16 scales of 0 (groups below 2^-25) and f16 subnormal scales take the panel's IEEE
/// path; an identity factor makes the result exactly round-to-nearest, so it must equal the
/// CPU bit for bit, and GPTQ with a real factor keeps the usual parity.
#[test]
fn gpu_solver_with_f16_zero_and_subnormal_scales() {
    let Some(dev) = common::gpu_or_skip("gpu_solver_with_f16_zero_and_subnormal_scales") else { return };
    let mut l = layer(48, 256, 51);
    let mult = [1e-9f32, 1e-6, 3e-5, 1.0, 0.0, 1e-4];
    for r in 0..48 {
        l.w.row_mut(r).mapv_inplace(|v| v * mult[r % mult.len()]);
    }
    let cfg = GridConfig { group_size: 64, scale_dtype: F16, ..GridConfig::default() };
    let grid: QuantGrid = build_quant_grid(WeightView::F32(l.w.view()), &cfg).unwrap();
    let zero = (0..48).filter(|&r| grid.scale_zero(r, 0).0 == 0.0).count();
    assert!(zero > 0, "some stored scales must be 0");
    let u = Array2::<f32>::eye(256);
    let cpu = solve_cpu(l.w.view(), u.view(), &grid, None).unwrap();
    let gpu = solve_gpu(&dev, l.w.view(), u.view(), &grid, None).unwrap();
    assert_eq!(cpu.qweight, gpu.qweight);
    assert!(cpu.dequant.iter().zip(gpu.dequant.iter()).all(|(a, b)| a.to_bits() == b.to_bits()));
    let pre = pre_step_cpu(l.h.view(), None, &PreStepConfig::default()).unwrap();
    let cpu = solve_cpu(l.w.view(), pre.hinv_factor.view(), &grid, None).unwrap();
    let gpu = solve_gpu(&dev, l.w.view(), pre.hinv_factor.view(), &grid, None).unwrap();
    compare("f16 zero/subnormal scales", &l, &cpu, &gpu);
}

#[test]
fn gpu_quantize_from_hinv_keeps_data_on_device_and_matches_the_two_step_path() {
    let Some(dev) = common::gpu_or_skip("gpu_quantize_from_hinv_keeps_data_on_device_and_matches_the_two_step_path")
    else {
        return;
    };
    let l = layer(128, 384, 21);
    let pre = pre_step_cpu(l.h.view(), None, &PreStepConfig { act_order: true, ..PreStepConfig::default() }).unwrap();
    let cfg = GridConfig { scale_search: ScaleSearch::Mse(Default::default()), ..GridConfig::default() };
    let q = Quantizer::new(cfg.clone(), Backend::Gpu(dev.clone()));
    let (grid, fused) =
        q.quantize_from_hinv(WeightView::F32(l.w.view()), pre.hinv_factor.view(), pre.perm.as_deref()).unwrap();
    let two_step = solve_gpu(&dev, l.w.view(), pre.hinv_factor.view(), &grid, pre.perm.as_deref()).unwrap();
    assert_eq!(fused, two_step);
    let cpu = Quantizer::new(cfg, Backend::Cpu)
        .solve(l.w.view(), pre.hinv_factor.view(), &grid, pre.perm.as_deref())
        .unwrap();
    compare("quantize_from_hinv", &l, &cpu, &fused);
    let rtn = solve_cpu(l.w.view(), Array2::<f32>::eye(384).view(), &grid, None).unwrap();
    let e_rtn = layer_output_error(l.w.view(), rtn.dequant.view(), l.h.view()).unwrap();
    let e_gptq = layer_output_error(l.w.view(), fused.dequant.view(), l.h.view()).unwrap();
    assert!(e_gptq < e_rtn, "GPU GPTQ ({e_gptq}) must beat round-to-nearest ({e_rtn})");
}

#[test]
fn gpu_solver_panel_width_does_not_change_the_result() {
    use fourbit_forge::grid::{DeviceGrid, DeviceWeight};
    use fourbit_forge::solver::{launch_solve, DeviceFactor, SolveWorkspace};
    let Some(dev) = common::gpu_or_skip("gpu_solver_panel_width_does_not_change_the_result") else { return };
    let l = layer(48, 900, 31);
    let pre = pre_step_cpu(l.h.view(), None, &PreStepConfig { act_order: true, ..PreStepConfig::default() }).unwrap();
    let grid = build_quant_grid(WeightView::F32(l.w.view()), &GridConfig::default()).unwrap();
    let cpu = solve_cpu(l.w.view(), pre.hinv_factor.view(), &grid, pre.perm.as_deref()).unwrap();
    let dw = DeviceWeight::upload(&dev, WeightView::F32(l.w.view())).unwrap();
    let factor = DeviceFactor::upload(&dev, pre.hinv_factor.view(), pre.perm.as_deref()).unwrap();
    let dgrid = DeviceGrid::upload(&dev, &grid).unwrap();
    for panel in [128u32, 256, 1024] {
        let mut ws = SolveWorkspace::new(&dev, 48, 900).unwrap();
        ws.set_panel(panel).unwrap();
        launch_solve(&dev, &dw, &factor, &dgrid, &mut ws).unwrap();
        let gpu = ws.output().to_host(&dev).unwrap();
        compare(&format!("panel {panel}"), &l, &cpu, &gpu);
    }
    assert!(SolveWorkspace::new(&dev, 4, 4).unwrap().set_panel(100).is_err());
}

/// A random f32 of magnitude `2^e`, `e` uniform in `lo..hi`, random mantissa and sign.
fn random_magnitude(rng: &mut StdRng, lo: i32, hi: i32) -> f32 {
    let e = rng.gen_range(lo..hi);
    let m = f32::from_bits(0x3f80_0000 | (rng.gen::<u32>() & 0x007f_ffff)); // [1, 2)
    let v = m * 2f32.powi(e);
    if rng.gen() {
        -v
    } else {
        v
    }
}

#[test]
fn gpu_fast_division_equals_ieee_division_in_the_solver_range() {
    use cudarc::driver::LaunchConfig;
    use forge_kernel_abi::testing::FastDivisionArgs;
    use fourbit_forge::device::{DeviceBuffer, DeviceBufferMut};
    let Some(dev) = common::gpu_or_skip("gpu_fast_division_equals_ieee_division_in_the_solver_range") else { return };
    // The chain divides working weights (zero, or |x| in [2^-100, 2^64]; `x − deq` up to
    // ~2^65) by scales in [2^-60, 2^20] and by U's diagonal in [2^-40, 2^20].
    let mut rng = StdRng::seed_from_u64(7);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..1 << 22 {
        let d = if i % 2 == 0 {
            random_magnitude(&mut rng, -60, 20).abs()
        } else {
            random_magnitude(&mut rng, -40, 20).abs()
        };
        let n = match i % 8 {
            0 => 0.0,
            // Quotients at or next to a rounding midpoint of a random quotient: the
            // correction step's hard cases.
            1..=3 => {
                let q = random_magnitude(&mut rng, -20, 20);
                let mid = (q as f64 + (q.next_up() as f64 - q as f64) / 2.0) * d as f64;
                let m = mid as f32;
                [m, m.next_up(), m.next_down()][(i / 8) % 3]
            }
            _ => random_magnitude(&mut rng, -100, 65),
        };
        a.push(n);
        b.push(d);
    }
    // Exact boundaries of the admitted range.
    for (n, d) in [(2f32.powi(-100), 2f32.powi(20)), (2f32.powi(64), 2f32.powi(-60)), (-1.0, 3.0), (-0.0, 0.75)] {
        a.push(n);
        b.push(d);
    }
    let s = dev.stream();
    let (da, db) = (s.clone_htod(&a).unwrap(), s.clone_htod(&b).unwrap());
    let mut out = s.alloc_zeros::<f32>(a.len()).unwrap();
    let n = a.len() as u32;
    let args = FastDivisionArgs { a: da.dev_ptr(), b: db.dev_ptr(), n, out: out.dev_ptr_mut() };
    // SAFETY: a, b, out have n f32 each.
    unsafe { dev.launch::<forge_kernel_abi::FastDivision>(LaunchConfig::for_num_elems(n), &args) }.unwrap();
    let got = s.clone_dtoh(&out).unwrap();
    let mut bad = 0;
    for ((x, y), g) in a.iter().zip(&b).zip(&got) {
        let want = x / y;
        if want.to_bits() != g.to_bits() {
            if bad < 5 {
                eprintln!("{x:e} / {y:e}: IEEE {want:e}, fast {g:e}");
            }
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{bad} of {} quotients differ from IEEE division", a.len());
}

#[test]
fn gpu_solver_falls_back_to_ieee_division_outside_the_fast_range() {
    let Some(dev) = common::gpu_or_skip("gpu_solver_falls_back_to_ieee_division_outside_the_fast_range") else {
        return;
    };
    // Rows whose scales exceed 2^20 and rows of weights below 2^-100; then a Hessian so
    // large that U's diagonal falls below 2^-40. Each takes the IEEE fallback.
    let mut l = layer(40, 300, 41);
    for r in 0..40 {
        let k = [1e10, 1e-31, 1.0, 1.0][r % 4];
        l.w.row_mut(r).mapv_inplace(|v| v * k);
    }
    let big_h = layer(40, 300, 42);
    let big_h = Layer { w: big_h.w, h: big_h.h.mapv(|v| v * 1e30) };
    for (what, l) in [("out-of-range weights and scales", &l), ("U's diagonal below 2^-40", &big_h)] {
        let cfg = GridConfig { group_size: 64, ..GridConfig::default() };
        let grid = build_quant_grid(WeightView::F32(l.w.view()), &cfg).unwrap();
        let pre = pre_step_cpu(l.h.view(), None, &PreStepConfig::default()).unwrap();
        let cpu = solve_cpu(l.w.view(), pre.hinv_factor.view(), &grid, None).unwrap();
        let gpu = solve_gpu(&dev, l.w.view(), pre.hinv_factor.view(), &grid, None).unwrap();
        compare(what, l, &cpu, &gpu);
    }
}
