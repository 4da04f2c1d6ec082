//! Scales as stored, end to end (issue 12, docs/design.md §2–§4): GPTQ solves against each
//! record's scale rounded to the checkpoint's scale dtype, so a written checkpoint — every
//! format, every scale dtype it stores — dequantizes to exactly the weight the solver returned,
//! bit for bit. The solve uses a real Hessian (correlated activations, act-order on and off).

use fourbit_forge::checkpoint::format::{
    decode_linear, encode_linear, CheckpointFormat, LinearQuant, QuantSettings, ScaleDtype,
};
use fourbit_forge::hessian::{pre_step_cpu, HessianAccumulator, PreStepConfig};
use fourbit_forge::numerics::{dequantize, stored_scale};
use fourbit_forge::solver::{round_to_nearest, solve_cpu};
use fourbit_forge::{Backend, GridConfig, MseSearch, Quantizer, ScaleSearch, WeightView};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rows: usize, cols: usize, rng: &mut StdRng) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || rng.sample::<f32, _>(StandardNormal))
}

/// `H = 2/n·XᵀX` of correlated activations `X = Z·A + noise`.
fn hessian(cols: usize, rng: &mut StdRng) -> Array2<f32> {
    let tokens = 3 * cols;
    let mix = randn(16, cols, rng);
    let x = randn(tokens, 16, rng).dot(&mix) + randn(tokens, cols, rng).mapv(|v| 0.1 * v);
    let mut acc = HessianAccumulator::new(cols).unwrap();
    acc.update(x.view()).unwrap();
    acc.into_h()
}

/// The scale dtypes a format stores (GPTQ: f16 only).
fn scale_dtypes(format: CheckpointFormat) -> Vec<ScaleDtype> {
    match format {
        CheckpointFormat::Gptq | CheckpointFormat::GptqV2 => vec![ScaleDtype::F16],
        _ => vec![ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16],
    }
}

#[test]
fn dequantizing_the_written_checkpoint_equals_the_solvers_dequantized_weight_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(12);
    // 64 rows and 256 columns fit every layout (GPTQ 3-bit packs 32-code blocks on both axes).
    let (rows, cols) = (64, 256);
    let h = hessian(cols, &mut rng);
    let mut cases = 0;
    for format in CheckpointFormat::ALL {
        let bit_widths: &[u32] = match format {
            CheckpointFormat::Gptq | CheckpointFormat::GptqV2 => &[2, 3, 4, 8],
            _ => &[2, 3, 4, 5, 6, 7, 8],
        };
        for scale_dtype in scale_dtypes(format) {
            for &bits in bit_widths {
                // GPTQ v1 cannot store a zero point of 0, which asymmetric grids produce.
                let symmetries: &[bool] = if format == CheckpointFormat::Gptq { &[true] } else { &[true, false] };
                for &symmetric in symmetries {
                    let (gs, act_order, mse) = match cases % 3 {
                        0 => (32, false, false),
                        1 => (128, true, true),
                        _ => (64, true, false),
                    };
                    let scale_search = if mse { ScaleSearch::Mse(MseSearch::default()) } else { ScaleSearch::Absmax };
                    let cfg = GridConfig { group_size: gs, bits, symmetric, scale_search, scale_dtype };
                    let what = format!(
                        "{} {scale_dtype:?} b{bits} sym {symmetric} gs {gs} act-order {act_order}",
                        format.name()
                    );
                    // Weights with a spread of magnitudes, so groups' scales round differently.
                    let w = randn(rows, cols, &mut rng).mapv(|v| v * 0.02) * &randn(rows, 1, &mut rng).mapv(f32::exp);
                    let pre =
                        pre_step_cpu(h.view(), None, &PreStepConfig { act_order, ..PreStepConfig::default() }).unwrap();
                    let q = Quantizer::new(cfg.clone(), Backend::Cpu);
                    let (grid, out) = q
                        .quantize_from_hinv(WeightView::F32(w.view()), pre.hinv_factor.view(), pre.perm.as_deref())
                        .unwrap();
                    assert_eq!(grid.scale_dtype, scale_dtype, "{what}");

                    let mut settings = QuantSettings::new(format, bits, Some(gs), symmetric);
                    settings.scale_dtype = scale_dtype;
                    settings.act_order = act_order;
                    let module = "model.layers.0.mlp.down_proj";
                    let tensors =
                        encode_linear(&settings, module, &LinearQuant { codes: out.qweight.view(), grid: &grid })
                            .unwrap();
                    let read = decode_linear(&settings, module, &tensors).unwrap();
                    assert_eq!(read.codes, out.qweight, "{what}: codes");
                    let same = read.dequant.iter().zip(out.dequant.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{what}: the checkpoint does not dequantize to the solver's weight");
                    // The solver's dequantized weight is (q − q0)·stored_scale of its own records.
                    for ((r, c), &d) in out.dequant.indexed_iter() {
                        let m = grid.meta(r, c / gs);
                        let s = stored_scale(m.log2_scale_q88, scale_dtype);
                        let want = dequantize(f32::from(out.qweight[[r, c]]), s, m.qzero_f32());
                        assert_eq!(d.to_bits(), want.to_bits(), "{what}: ({r}, {c})");
                    }
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 3 * 7 * 2 + 4 + 4 * 2 + 3 * 7 * 2, "every format, dtype, width and symmetry");
}

/// The test above would also pass if scale dtypes changed nothing: check that they do. With
/// bf16 scales the solve differs from the f32 one, and the f32 solve's codes written with
/// bf16 scales would not dequantize to its weight (what the old workaround got wrong).
#[test]
fn stored_scales_change_the_solve() {
    let mut rng = StdRng::seed_from_u64(3);
    let (rows, cols) = (64, 256);
    let h = hessian(cols, &mut rng);
    let w = randn(rows, cols, &mut rng).mapv(|v| v * 0.02);
    let pre = pre_step_cpu(h.view(), None, &PreStepConfig::default()).unwrap();
    let solve = |scale_dtype| {
        let cfg = GridConfig { scale_dtype, ..GridConfig::default() };
        let grid = fourbit_forge::grid::build_quant_grid(WeightView::F32(w.view()), &cfg).unwrap();
        let out = solve_cpu(w.view(), pre.hinv_factor.view(), &grid, None).unwrap();
        (grid, out)
    };
    let (g32, o32) = solve(ScaleDtype::F32);
    let (gbf, obf) = solve(ScaleDtype::BF16);
    assert_eq!(g32.qmeta, gbf.qmeta, "the records do not depend on the scale dtype");
    assert!(o32.dequant != obf.dequant, "bf16 scales must change the dequantized weight");
    let differ = o32.dequant.iter().zip(obf.dequant.iter()).filter(|(a, b)| a != b).count();
    assert!(differ > rows * cols / 2, "only {differ} values moved: most bf16 scales differ from f32");
    // Round-to-nearest and the solver agree on what a record's scale is.
    let rtn = round_to_nearest(w.view(), &gbf);
    let id = solve_cpu(w.view(), Array2::<f32>::eye(cols).view(), &gbf, None).unwrap();
    assert!(rtn.iter().zip(id.dequant.iter()).all(|(a, b)| a.to_bits() == b.to_bits()));
}
