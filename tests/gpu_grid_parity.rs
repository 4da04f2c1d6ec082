//! GPU grid builder against the CPU reference (docs/design.md §7). Runs on a GPU machine; skips with
//! the reason elsewhere.
//!
//! * absmax: qmeta4 bit-identical, every dtype, bits, group size, sym/asym, ragged shapes;
//! * MSE: the same record, except where the two choices' losses (both re-evaluated on the
//!   CPU in f64) agree within `MSE_LOSS_RTOL`. Why 1e-4: the GPU sums ≤ 1024 terms in f32 over
//!   4 interleaved accumulators (≤ 256·2^-24 ≈ 1.5e-5 relative) and, for norm ≠ 2, uses the
//!   hardware lg2/ex2 (≤ 2^-21·(1 + norm·|log2 e|) ≈ 5e-5 relative for errors near 2^-40).

mod common;

use fourbit_forge::device::GpuDevice;
use fourbit_forge::grid::build_quant_grid_gpu;
use fourbit_forge::grid::{build_quant_grid, candidate_loss_f64};
use fourbit_forge::numerics::stored_scale;
use fourbit_forge::{
    ForgeError, GridConfig, MseSearch, QMetaPacked, QuantGrid, ScaleDtype, ScaleSearch, ShrinkCandidates, WeightView,
};
use half::{bf16, f16};
use ndarray::Array2;
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, StudentT};

const MSE_LOSS_RTOL: f64 = 1e-4;

/// Heavy-tailed weights (Student-t, 3 dof) with a few adversarial groups mixed in.
fn weights(rows: usize, cols: usize, seed: u64, scale: f32) -> Array2<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let t = StudentT::new(3.0f32).unwrap();
    let mut w = Array2::from_shape_fn((rows, cols), |_| t.sample(&mut rng) * scale);
    for r in 0..rows {
        match rng.gen_range(0..12) {
            0 => w.row_mut(r).fill(0.0),
            1 => w.row_mut(r).fill(0.37),
            2 => w.row_mut(r).iter_mut().enumerate().for_each(|(i, v)| *v = if i % 2 == 0 { 0.0 } else { -0.0 }),
            3 => w.row_mut(r).iter_mut().for_each(|v| *v *= 1e-39), // f32 subnormals
            4 => w.row_mut(r).iter_mut().for_each(|v| *v *= 1e30),
            5 => w.row_mut(r).iter_mut().for_each(|v| *v *= 1e-30),
            _ => {}
        }
    }
    w
}

#[derive(Clone, Copy, Debug)]
enum Dt {
    F32,
    F16,
    Bf16,
    Fp8,
}

/// Runs `f` on the weight converted to `dt` (fp8 via round-to-nearest of the f32 value; f16
/// saturated to its finite range, since an overflow to inf is, rightly, a NonFinite error).
fn with_dtype<R>(w: &Array2<f32>, dt: Dt, f: impl FnOnce(WeightView<'_>) -> R) -> R {
    match dt {
        Dt::F32 => f(WeightView::F32(w.view())),
        Dt::F16 => f(WeightView::F16(w.mapv(|v| f16::from_f32(v.clamp(-65504.0, 65504.0))).view())),
        Dt::Bf16 => f(WeightView::BF16(w.mapv(bf16::from_f32).view())),
        Dt::Fp8 => f(WeightView::Fp8E4M3(w.mapv(common::to_fp8).view())),
    }
}

fn assert_bit_identical(cpu: &QuantGrid, gpu: &QuantGrid, what: &str) {
    assert_eq!(cpu.dim(), gpu.dim(), "{what}: shapes");
    assert_eq!((cpu.maxq, cpu.pad), (gpu.maxq, gpu.pad), "{what}: maxq/pad");
    let (rows, groups) = cpu.dim();
    for r in 0..rows {
        for g in 0..groups {
            assert_eq!(cpu.meta(r, g).unwrap(), gpu.meta(r, g).unwrap(), "{what}: record ({r}, {g})");
        }
    }
}

/// Checks the MSE grids; returns (groups, groups where the GPU chose another scale).
fn assert_mse_parity(
    w: &Array2<f32>,
    cfg: &GridConfig,
    cpu: &QuantGrid,
    gpu: &QuantGrid,
    what: &str,
) -> (usize, usize) {
    let ScaleSearch::Mse(m) = &cfg.scale_search else { unreachable!() };
    let (rows, groups) = cpu.dim();
    let gs = cfg.group_size;
    let maxq = cfg.maxq() as f32;
    let mut differ = 0;
    let mut group = vec![0f32; gs];
    for r in 0..rows {
        for g in 0..groups {
            let (c, q) = (cpu.meta(r, g).unwrap(), gpu.meta(r, g).unwrap());
            assert_eq!((c.qzero, c.flags), (q.qzero, q.flags), "{what}: zero point/flags of ({r}, {g})");
            if c == q {
                continue;
            }
            differ += 1;
            group.fill(0.0);
            for (i, v) in group.iter_mut().enumerate() {
                if g * gs + i < w.ncols() {
                    *v = w[[r, g * gs + i]];
                }
            }
            // Each choice's loss at its scale as stored (an f16 overflow's NaN ranks last).
            let loss = |r: QMetaPacked| {
                let s = stored_scale(r.log2_scale_q88, cfg.scale_dtype);
                let l = candidate_loss_f64(&group, s, r.qzero_f32(), maxq, m.norm);
                if l.is_nan() {
                    f64::INFINITY
                } else {
                    l
                }
            };
            let (lc, lg) = (loss(c), loss(q));
            assert!(lc <= lg, "{what}: ({r}, {g}) CPU choice is not the CPU minimum ({lc} > {lg})");
            assert!(
                lg == lc || lg - lc <= MSE_LOSS_RTOL * lc.max(f64::MIN_POSITIVE),
                "{what}: ({r}, {g}) GPU chose q88 {} (loss {lg}) over CPU's {} (loss {lc})",
                q.log2_scale_q88,
                c.log2_scale_q88
            );
        }
    }
    (rows * groups, differ)
}

fn scale_dtypes() -> impl Strategy<Value = ScaleDtype> {
    prop_oneof![Just(ScaleDtype::F32), Just(ScaleDtype::F16), Just(ScaleDtype::BF16)]
}

fn dev_or_skip(name: &str) -> Option<std::sync::Arc<GpuDevice>> {
    common::gpu_or_skip(name)
}

#[test]
fn gpu_absmax_matches_the_reference_vectors() {
    let Some(dev) = dev_or_skip("gpu_absmax_matches_the_reference_vectors") else { return };
    for gs in [32usize, 64, 128] {
        let (x, shape) = common::vector::<f32>(&format!("grid.gs{gs}.x"));
        let x = Array2::from_shape_vec((shape[0], shape[1]), x).unwrap();
        for bits in [2u32, 3, 4, 8] {
            for sym in [true, false] {
                let name = format!("grid.gs{gs}.b{bits}.{}.qmeta", if sym { "sym" } else { "asym" });
                let (expected, _) = common::vector::<u8>(&name);
                let cfg = GridConfig {
                    group_size: gs,
                    bits,
                    symmetric: sym,
                    scale_search: ScaleSearch::Absmax,
                    ..GridConfig::default()
                };
                let grid = build_quant_grid_gpu(&dev, WeightView::F32(x.view()), &cfg).unwrap();
                assert_eq!(grid.qmeta.as_slice().unwrap(), &expected[..], "{name}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn gpu_absmax_is_bit_identical_to_cpu(
        rows in 1usize..40,
        cols in 1usize..700,
        gs_units in 1usize..=32,
        bits in 2u32..=8,
        sym in any::<bool>(),
        dt in prop_oneof![Just(Dt::F32), Just(Dt::F16), Just(Dt::Bf16), Just(Dt::Fp8)],
        scale_dtype in scale_dtypes(),
        seed in any::<u64>(),
    ) {
        let Some(dev) = dev_or_skip("gpu_absmax_is_bit_identical_to_cpu") else { return Ok(()) };
        let w = weights(rows, cols, seed, 0.02);
        // Absmax records do not depend on the scale dtype (a record is a log2 scale).
        let cfg = GridConfig { group_size: 32 * gs_units, bits, symmetric: sym, scale_search: ScaleSearch::Absmax, scale_dtype };
        let (cpu, gpu) = with_dtype(&w, dt, |v| (build_quant_grid(v, &cfg).unwrap(), build_quant_grid_gpu(&dev, v, &cfg).unwrap()));
        assert_bit_identical(&cpu, &gpu, &format!("{dt:?} {rows}x{cols} {cfg:?}"));
    }

    #[test]
    fn gpu_mse_choice_matches_cpu(
        rows in 1usize..24,
        cols in 1usize..600,
        gs_units in 1usize..=8,
        bits in 2u32..=8,
        sym in any::<bool>(),
        norm in prop_oneof![Just(2.0f32), Just(2.4f32), 1.0f32..4.0],
        list in proptest::option::of(proptest::collection::vec(0.05f32..1.5, 1..200)),
        dt in prop_oneof![Just(Dt::F32), Just(Dt::Bf16), Just(Dt::Fp8)],
        scale_dtype in scale_dtypes(),
        seed in any::<u64>(),
    ) {
        let Some(dev) = dev_or_skip("gpu_mse_choice_matches_cpu") else { return Ok(()) };
        let w = weights(rows, cols, seed, 0.02);
        let candidates = match list {
            Some(l) => ShrinkCandidates::List(l),
            None => ShrinkCandidates::Linspace { max_shrink: 0.2, n_grid: 100 },
        };
        let cfg = GridConfig { group_size: 32 * gs_units, bits, symmetric: sym, scale_search: ScaleSearch::Mse(MseSearch { candidates, norm }), scale_dtype };
        // Compare on the values the GPU saw (the dtype's, widened).
        let (cpu, gpu, seen) = with_dtype(&w, dt, |v| {
            let mut seen = Array2::zeros(v.dim());
            for r in 0..v.dim().0 { v.read_row_f32(r, seen.row_mut(r).as_slice_mut().unwrap()).unwrap(); }
            (build_quant_grid(v, &cfg).unwrap(), build_quant_grid_gpu(&dev, v, &cfg).unwrap(), seen)
        });
        assert_mse_parity(&seen, &cfg, &cpu, &gpu, &format!("{dt:?} {rows}x{cols} {cfg:?}"));
    }
}

#[test]
fn gpu_mse_on_a_full_size_layer() {
    let Some(dev) = dev_or_skip("gpu_mse_on_a_full_size_layer") else { return };
    let w = weights(512, 2048, 7, 0.02);
    let mut total = (0, 0);
    for (norm, scale_dtype) in
        [(2.0f32, ScaleDtype::F32), (2.4, ScaleDtype::F32), (2.4, ScaleDtype::BF16), (2.0, ScaleDtype::F16)]
    {
        let cfg = GridConfig {
            group_size: 128,
            bits: 4,
            symmetric: true,
            scale_search: ScaleSearch::Mse(MseSearch { norm, ..MseSearch::default() }),
            scale_dtype,
        };
        let cpu = build_quant_grid(WeightView::F32(w.view()), &cfg).unwrap();
        let gpu = build_quant_grid_gpu(&dev, WeightView::F32(w.view()), &cfg).unwrap();
        let (n, d) = assert_mse_parity(&w, &cfg, &cpu, &gpu, &format!("512x2048 norm {norm} {scale_dtype:?}"));
        total = (total.0 + n, total.1 + d);
    }
    eprintln!("MSE parity: {} of {} groups chose another (equally good within 1e-4) scale", total.1, total.0);
}

#[test]
fn gpu_non_finite_weights_are_a_typed_error() {
    let Some(dev) = dev_or_skip("gpu_non_finite_weights_are_a_typed_error") else { return };
    for search in [ScaleSearch::Absmax, ScaleSearch::Mse(MseSearch::default())] {
        let cfg = GridConfig { scale_search: search, ..GridConfig::default() };
        let mut w = weights(8, 300, 1, 1.0);
        w[[5, 257]] = f32::NAN;
        w[[6, 3]] = f32::INFINITY;
        match build_quant_grid_gpu(&dev, WeightView::F32(w.view()), &cfg) {
            Err(ForgeError::NonFinite { row: 5, col: 257, value, .. }) => assert!(value.is_nan()),
            other => panic!("expected NonFinite at (5, 257), got {other:?}"),
        }
        let fp8 = Array2::from_shape_fn((4, 64), |(r, c)| if (r, c) == (2, 40) { 0x7f } else { 0x38 });
        match build_quant_grid_gpu(&dev, WeightView::Fp8E4M3(fp8.view()), &cfg) {
            Err(ForgeError::NonFinite { row: 2, col: 40, .. }) => {}
            other => panic!("expected NonFinite at (2, 40) for fp8 NaN, got {other:?}"),
        }
    }
}

#[test]
fn gpu_fp8_extremes_match_cpu() {
    let Some(dev) = dev_or_skip("gpu_fp8_extremes_match_cpu") else { return };
    // Every finite fp8 code, max (±448) and subnormals included, in ragged groups.
    let codes: Vec<u8> = (0u8..=255).filter(|&b| forge_numerics::fp8_e4m3_to_f32(b).is_finite()).collect();
    let w = Array2::from_shape_fn((7, 254), |(r, c)| codes[(c * 7 + r * 31) % codes.len()]);
    for cfg in
        [GridConfig::default(), GridConfig { symmetric: false, bits: 3, group_size: 64, ..GridConfig::default() }]
    {
        let cpu = build_quant_grid(WeightView::Fp8E4M3(w.view()), &cfg).unwrap();
        let gpu = build_quant_grid_gpu(&dev, WeightView::Fp8E4M3(w.view()), &cfg).unwrap();
        assert_bit_identical(&cpu, &gpu, "fp8 extremes");
    }
}

/// Rows whose stored f16 scales fall below 2^-25 (stored as 0: the zero-scale loss), into the
/// f16 subnormals, around 1, and past 65520 (overflow: never chosen, unless every candidate
/// overflows), plus all-zero and bf16 rows: the MSE choice at the stored scale matches the CPU.
#[test]
fn gpu_mse_at_the_stored_scale_limits_matches_cpu() {
    let Some(dev) = dev_or_skip("gpu_mse_at_the_stored_scale_limits_matches_cpu") else { return };
    let base = weights(64, 320, 11, 1.0);
    let mult = [1e-7f32, 3e-7, 1e-6, 3e-6, 3e-5, 1e-3, 1.0, 3e4, 1e5, 4e5, 1e6, 0.0];
    let w = ndarray::Array2::from_shape_fn((64, 320), |(r, c)| base[[r, c]] * 0.05 * mult[r % mult.len()]);
    for scale_dtype in [ScaleDtype::F16, ScaleDtype::BF16] {
        for (bits, sym, norm) in [(4u32, true, 2.0f32), (3, false, 2.4), (8, true, 2.4), (2, false, 2.0)] {
            let cfg = GridConfig {
                group_size: 64,
                bits,
                symmetric: sym,
                scale_search: ScaleSearch::Mse(MseSearch { norm, ..MseSearch::default() }),
                scale_dtype,
            };
            let cpu = build_quant_grid(WeightView::F32(w.view()), &cfg).unwrap();
            let gpu = build_quant_grid_gpu(&dev, WeightView::F32(w.view()), &cfg).unwrap();
            let (n, d) = assert_mse_parity(&w, &cfg, &cpu, &gpu, &format!("limits {scale_dtype:?} b{bits} sym {sym}"));
            eprintln!("{scale_dtype:?} b{bits} sym {sym} p {norm}: {d} of {n} groups chose another scale");
        }
    }
}
