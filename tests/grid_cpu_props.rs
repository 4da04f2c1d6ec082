//! Properties of the CPU grid builder (docs/design.md §1, §3, §7), each checked against a quantity
//! computed independently of the builder: the group range in f64, brute-force candidate
//! losses, the zero-padded and truncated weights, other dtypes widened by the `half` crate or
//! by the E4M3 definition.

use forge_numerics::{abs_pow, decode_log2_q88, dequantize, element_loss, encode_log2_q88, quantize};
use fourbit_forge::grid::{build_quant_grid, candidate_loss_f64};
use fourbit_forge::{
    GridConfig, MseSearch, QMetaPacked, QuantGrid, ScaleDtype, ScaleSearch, ShrinkCandidates, WeightView,
};
use ndarray::{s, Array2};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A random weight and the format to quantize it in.
#[derive(Clone, Debug)]
struct Case {
    w: Array2<f32>,
    gs: usize,
    bits: u32,
    sym: bool,
}

impl Case {
    fn cfg(&self, scale_search: ScaleSearch) -> GridConfig {
        GridConfig { group_size: self.gs, bits: self.bits, symmetric: self.sym, scale_search, ..GridConfig::default() }
    }
    fn maxq(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }
}

/// Values: mostly in `(-1, 1)`, some outliers and exact zeros, shifted by `offset` (so some
/// groups are one-signed) and scaled by `2^mag`.
fn values(n: usize, mag: i32, offset: f32) -> impl Strategy<Value = Vec<f32>> {
    let scale = 2f32.powi(mag);
    let elem = prop_oneof![
        8 => -1f32..1f32,
        1 => -8f32..8f32,
        1 => Just(0.0f32),
    ];
    prop::collection::vec(elem, n).prop_map(move |v| v.into_iter().map(|x| (x + offset) * scale).collect())
}

/// Rows 1..=4, 1..=3 groups of 32/64/128 with a short last group when `rem < gs`.
fn case_with(mags: std::ops::RangeInclusive<i32>) -> impl Strategy<Value = Case> {
    (
        1usize..=4,
        prop::sample::select(vec![32usize, 64, 128]),
        1usize..=3,
        0.0f64..1.0,
        2u32..=8,
        any::<bool>(),
        mags,
        prop_oneof![3 => Just(0.0f32), 1 => -2f32..2f32],
    )
        .prop_flat_map(|(rows, gs, n_groups, frac, bits, sym, mag, offset)| {
            let rem = 1 + ((gs as f64 * frac) as usize).min(gs - 1);
            let cols = (n_groups - 1) * gs + rem;
            values(rows * cols, mag, offset).prop_map(move |v| Case {
                w: Array2::from_shape_vec((rows, cols), v).unwrap(),
                gs,
                bits,
                sym,
            })
        })
}

fn case() -> impl Strategy<Value = Case> {
    case_with(-20..=20)
}

fn grid(w: WeightView<'_>, cfg: &GridConfig) -> QuantGrid {
    build_quant_grid(w, cfg).unwrap_or_else(|e| panic!("grid failed: {e}"))
}

/// Row `r`, group `g` of `w` with the short last group padded with zeros (docs/design.md §1).
fn padded_group(w: &Array2<f32>, gs: usize, r: usize, g: usize) -> Vec<f32> {
    let cols = w.ncols();
    (g * gs..(g + 1) * gs).map(|c| if c < cols { w[[r, c]] } else { 0.0 }).collect()
}

fn mse(norm: f32) -> ScaleSearch {
    ScaleSearch::Mse(MseSearch { norm, ..MseSearch::default() })
}

/// `Σ |dequant(quant(x)) − x|^norm` through the f32 `abs_pow` of the shared numerics (the GPU's
/// element loss; never a norm-2 fast path), summed in f64.
fn abs_pow_loss(group: &[f32], scale: f32, q0: f32, maxq: f32, norm: f32) -> f64 {
    group
        .iter()
        .map(|&x| {
            let y = dequantize(quantize(x, scale, q0, maxq), scale, q0);
            abs_pow(y - x, norm) as f64
        })
        .sum()
}

/// The same loss with the error and its power in f64 through `powf` (the general formula, never
/// a norm-2 fast path).
fn powf_loss_f64(group: &[f32], scale: f32, q0: f32, maxq: f32, norm: f32) -> f64 {
    group
        .iter()
        .map(|&x| {
            let y = dequantize(quantize(x, scale, q0, maxq), scale, q0);
            (y as f64 - x as f64).abs().powf(norm as f64)
        })
        .sum()
}

/// Whether a decoded scale is within half a Q8.8 step of `want`: `|log2(got/want)| ≤ 1/512`,
/// plus the f32 rounding of log2 before the Q8.8 rounding (half an ulp of `|log2 want|`), plus
/// 2^-20 for the f32 arithmetic of the scale and the decode (4 roundings of 2^-24 relative).
/// Below `|log2 s| < 16` this is the factor `2^(±1/512)·(1 + 1e-6)`.
fn within_half_step(got: f64, want: f64) -> bool {
    let l = want.log2();
    let half_ulp_of_log2 = 2f64.powi(l.abs().log2().floor() as i32 - 24);
    (got.log2() - l).abs() <= 1.0 / 512.0 + half_ulp_of_log2 + 2f64.powi(-20)
}

// ---------------------------------------------------------------------------------------------
// absmax meta
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn absmax_meta_reproduces_the_group_range(c in case()) {
        let g = grid(WeightView::F32(c.w.view()), &c.cfg(ScaleSearch::Absmax));
        let (rows, n_groups) = g.dim();
        prop_assert_eq!(rows, c.w.nrows());
        prop_assert_eq!(n_groups, c.w.ncols().div_ceil(c.gs));
        prop_assert_eq!(g.pad, n_groups * c.gs - c.w.ncols());
        let maxq = c.maxq();
        for r in 0..rows {
            for gi in 0..n_groups {
                let grp = padded_group(&c.w, c.gs, r, gi);
                let meta = g.meta(r, gi);
                let d = meta.scale() as f64;
                let q0 = meta.qzero_f32();
                let min = grp.iter().fold(f64::INFINITY, |m, &x| m.min(x as f64));
                let max = grp.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                let at = format!("row {r} group {gi}: min {min:e} max {max:e} scale {d:e} q0 {q0}");
                if c.sym {
                    prop_assert!(meta.is_symmetric());
                    prop_assert_eq!(meta.flags, 1);
                    prop_assert_eq!(q0, (maxq + 1.0) / 2.0);
                    let amax = min.abs().max(max.abs());
                    let want = 2.0 / maxq as f64 * amax + 1e-12;
                    prop_assert!(within_half_step(d, want), "{}: want {:e}", at, want);
                    // The element of largest |x| lands at an end of the code range.
                    let &x = grp.iter().max_by(|a, b| a.abs().total_cmp(&b.abs())).unwrap();
                    let code = quantize(x, d as f32, q0, maxq);
                    // Only where the + 1e-12 is negligible (≤ 1e-4 of the scale): a range of a
                    // few 1e-12 cannot span the code range.
                    if 2.0 * amax / (maxq as f64) < 1e-8 {
                        continue;
                    }
                    if x > 0.0 {
                        prop_assert!(code >= maxq - 1.0, "{}: max |x| {:e} → {}", at, x, code);
                    } else if x < 0.0 {
                        prop_assert!(code <= 1.0, "{}: max |x| {:e} → {}", at, x, code);
                    }
                } else {
                    prop_assert!(!meta.is_symmetric());
                    prop_assert_eq!(meta.flags, 0);
                    let want = (max - min) / maxq as f64 + 1e-12;
                    prop_assert!(within_half_step(d, want), "{}: want {:e}", at, want);
                    // q0 = clamp(round_half_even(−min / s_unrounded)); the builder divides in
                    // f32 (≈ 2^-22 relative), so accept either neighbour within 1e-4 of a tie.
                    let z = -min / want;
                    let lo = z.floor();
                    let cands: Vec<f64> = if (z - lo - 0.5).abs() < 1e-4 + 1e-6 * z.abs() {
                        vec![lo, lo + 1.0]
                    } else {
                        vec![z.round_ties_even()]
                    };
                    let ok = cands.iter().any(|&q| q.clamp(0.0, maxq as f64) == q0 as f64);
                    prop_assert!(ok, "{}: -min/s = {}", at, z);
                    if min <= 0.0 && max >= 0.0 && (max - min) / (maxq as f64) >= 1e-8 {
                        let cmin = quantize(min as f32, d as f32, q0, maxq);
                        let cmax = quantize(max as f32, d as f32, q0, maxq);
                        prop_assert!(cmin <= 1.0, "{}: min → {}", at, cmin);
                        prop_assert!(cmax >= maxq - 1.0, "{}: max → {}", at, cmax);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MSE search
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// The default grid starts at 1.0, whose candidate is the absmax scale itself, so the MSE
    /// winner can never be worse on its own loss; q0 and flags stay the absmax ones.
    #[test]
    fn mse_loss_is_never_worse_than_absmax(c in case(), norm in prop::sample::select(vec![2.4f32, 2.0])) {
        let w = WeightView::F32(c.w.view());
        let abs = grid(w, &c.cfg(ScaleSearch::Absmax));
        let ms = grid(w, &c.cfg(mse(norm)));
        prop_assert_eq!(ms.dim(), abs.dim());
        let maxq = c.maxq();
        let (rows, n_groups) = abs.dim();
        for r in 0..rows {
            for gi in 0..n_groups {
                let grp = padded_group(&c.w, c.gs, r, gi);
                let (a, m) = (abs.meta(r, gi), ms.meta(r, gi));
                prop_assert_eq!(m.qzero, a.qzero);
                prop_assert_eq!(m.flags, a.flags);
                prop_assert!(m.log2_scale_q88 <= a.log2_scale_q88, "shrink factors are ≤ 1");
                let la = candidate_loss_f64(&grp, a.scale(), a.qzero_f32(), maxq, norm);
                let lm = candidate_loss_f64(&grp, m.scale(), m.qzero_f32(), maxq, norm);
                prop_assert!(lm <= la, "row {} group {}: mse loss {:e} > absmax loss {:e}", r, gi, lm, la);
            }
        }
    }
}

#[test]
fn element_loss_fast_path_equals_abs_pow_at_norm_2() {
    // Every 4099th f32 pattern of both signs (≈ 2.1 million), plus the extremes.
    let mut differ = Vec::new();
    let mut n = 0u64;
    let patterns = (0..=u32::MAX).step_by(4099).chain([0, 1, 0x0080_0000, 0x7f7f_ffff, 0x5f80_0000]);
    for b in patterns {
        let e = f32::from_bits(b);
        if !e.is_finite() {
            continue;
        }
        n += 1;
        let (fast, general) = (element_loss(e, 2.0), abs_pow(e, 2.0));
        if fast.to_bits() != general.to_bits() {
            differ.push((e, fast, general));
        }
    }
    assert!(
        differ.is_empty(),
        "{} of {n} differ; first (e, e·e, powf(|e|, 2)): {:?}",
        differ.len(),
        &differ[..differ.len().min(8)]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn element_loss_equals_abs_pow_at_norm_2_on_random_errors(e in {
        use proptest::num::f32::*;
        POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
    }) {
        prop_assert_eq!(element_loss(e, 2.0).to_bits(), abs_pow(e, 2.0).to_bits(), "e = {:e}", e);
    }
}

/// The shrink factors a test run uses: the default linspace or a random explicit list.
fn shrink_candidates() -> impl Strategy<Value = ShrinkCandidates> {
    prop_oneof![
        Just(MseSearch::default().candidates),
        (0.05f32..1.0, 1usize..=160).prop_map(|(max_shrink, n_grid)| ShrinkCandidates::Linspace { max_shrink, n_grid }),
        prop::collection::vec(0.05f32..1.5, 1..=40).prop_map(ShrinkCandidates::List),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Brute force over every candidate with the general (powf) loss: the builder's norm-2
    /// winner has the minimum loss, and is the first candidate reaching it unless another
    /// scale is within f64 rounding of it. Also with the f32 `abs_pow` loss the kernels use:
    /// the winner is within f32 rounding of that minimum.
    #[test]
    fn mse_norm_2_picks_the_first_minimum_of_the_general_loss(
        c in case(),
        candidates in shrink_candidates(),
    ) {
        let search = MseSearch { candidates, norm: 2.0 };
        let factors = search.factors().unwrap();
        let w = WeightView::F32(c.w.view());
        let abs = grid(w, &c.cfg(ScaleSearch::Absmax));
        let ms = grid(w, &c.cfg(ScaleSearch::Mse(search)));
        let maxq = c.maxq();
        let (rows, n_groups) = abs.dim();
        for r in 0..rows {
            for gi in 0..n_groups {
                let grp = padded_group(&c.w, c.gs, r, gi);
                let base = abs.meta(r, gi);
                let q0 = base.qzero_f32();
                let cands: Vec<(i16, f64, f64)> = factors
                    .iter()
                    .map(|&p| {
                        let q88 = encode_log2_q88(base.scale() * p);
                        let s = decode_log2_q88(q88);
                        (q88, powf_loss_f64(&grp, s, q0, maxq, 2.0), abs_pow_loss(&grp, s, q0, maxq, 2.0))
                    })
                    .collect();
                let min = cands.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
                let min32 = cands.iter().map(|c| c.2).fold(f64::INFINITY, f64::min);
                let chosen = ms.meta(r, gi);
                let at = format!("row {r} group {gi}: chosen {}, candidates {cands:?}", chosen.log2_scale_q88);
                let lc = powf_loss_f64(&grp, chosen.scale(), q0, maxq, 2.0);
                prop_assert!(lc <= min * (1.0 + 1e-12), "{}: loss {:e} > min {:e}", at, lc, min);
                let near: Vec<i16> = cands.iter().filter(|c| c.1 <= min * (1.0 + 1e-12)).map(|c| c.0).collect();
                prop_assert!(near.contains(&chosen.log2_scale_q88), "{}", at);
                if near.iter().all(|&q| q == near[0]) {
                    prop_assert_eq!(chosen.log2_scale_q88, near[0], "{}", at);
                }
                let lc32 = abs_pow_loss(&grp, chosen.scale(), q0, maxq, 2.0);
                prop_assert!(lc32 <= min32 * (1.0 + 2f64.powi(-21)), "{}: abs_pow loss {:e} > {:e}", at, lc32, min32);
                prop_assert_eq!(chosen.qzero, base.qzero);
            }
        }
    }

    /// The loss's norm-2 fast path against the general formula (f64 `powf(2)`) on the same
    /// group and scale.
    #[test]
    fn candidate_loss_norm_2_fast_path_equals_general_formula(c in case(), shrink in 0.3f32..1.0) {
        let abs = grid(WeightView::F32(c.w.view()), &c.cfg(ScaleSearch::Absmax));
        let maxq = c.maxq();
        let (rows, n_groups) = abs.dim();
        for r in 0..rows {
            for gi in 0..n_groups {
                let grp = padded_group(&c.w, c.gs, r, gi);
                let m = abs.meta(r, gi);
                let s = decode_log2_q88(encode_log2_q88(m.scale() * shrink));
                let fast = candidate_loss_f64(&grp, s, m.qzero_f32(), maxq, 2.0);
                let general = powf_loss_f64(&grp, s, m.qzero_f32(), maxq, 2.0);
                prop_assert!((fast - general).abs() <= 1e-14 * general, "{:e} vs {:e}", fast, general);
                // And the other norms follow the same definition.
                let l24 = candidate_loss_f64(&grp, s, m.qzero_f32(), maxq, 2.4);
                let g24 = powf_loss_f64(&grp, s, m.qzero_f32(), maxq, 2.4);
                prop_assert!((l24 - g24).abs() <= 1e-14 * g24, "{:e} vs {:e}", l24, g24);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MSE at the stored scale (f16 / bf16 scales)
// ---------------------------------------------------------------------------------------------

/// A decoded scale as a checkpoint stores it, through the `half` crate (independent of the
/// builder's own rounding).
fn stored_by_half(decoded: f32, dtype: ScaleDtype) -> f32 {
    match dtype {
        ScaleDtype::F32 => decoded,
        ScaleDtype::F16 => half::f16::from_f32(decoded).to_f32(),
        ScaleDtype::BF16 => half::bf16::from_f32(decoded).to_f32(),
    }
}

/// The general loss at a stored scale; an infinite scale (f16 overflow) dequantizes to NaN
/// and ranks last.
fn stored_loss(group: &[f32], stored: f32, q0: f32, maxq: f32, norm: f32) -> f64 {
    let l = powf_loss_f64(group, stored, q0, maxq, norm);
    if l.is_nan() {
        f64::INFINITY
    } else {
        l
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// With f16 / bf16 scales the search ranks every candidate by its loss at the scale a
    /// checkpoint stores (brute force in f64): the winner has the minimum and is the first
    /// candidate reaching it, unless another scale is within f64 rounding of it. Magnitudes
    /// from 2^-34 to 2^22 reach f16's zero scales (below 2^-25) and its overflow (65520).
    #[test]
    fn mse_picks_the_first_minimum_of_the_loss_at_the_stored_scale(
        c in case_with(-34..=22),
        candidates in shrink_candidates(),
        norm in prop_oneof![Just(2.0f32), Just(2.4f32)],
        dtype in prop_oneof![Just(ScaleDtype::BF16), Just(ScaleDtype::F16)],
    ) {
        let search = MseSearch { candidates, norm };
        let factors = search.factors().unwrap();
        let w = WeightView::F32(c.w.view());
        let abs = grid(w, &c.cfg(ScaleSearch::Absmax));
        let cfg = GridConfig { scale_dtype: dtype, ..c.cfg(ScaleSearch::Mse(search)) };
        let ms = grid(w, &cfg);
        prop_assert_eq!(ms.scale_dtype, dtype);
        let maxq = c.maxq();
        let (rows, n_groups) = abs.dim();
        for r in 0..rows {
            for gi in 0..n_groups {
                let grp = padded_group(&c.w, c.gs, r, gi);
                let base = abs.meta(r, gi);
                let q0 = base.qzero_f32();
                let cands: Vec<(i16, f64)> = factors
                    .iter()
                    .map(|&p| {
                        let q88 = encode_log2_q88(base.scale() * p);
                        (q88, stored_loss(&grp, stored_by_half(decode_log2_q88(q88), dtype), q0, maxq, norm))
                    })
                    .collect();
                let min = cands.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
                let chosen = ms.meta(r, gi);
                let at = format!("row {r} group {gi} {dtype:?}: chosen {}, candidates {cands:?}", chosen.log2_scale_q88);
                let lc = stored_loss(&grp, stored_by_half(chosen.scale(), dtype), q0, maxq, norm);
                if min.is_infinite() {
                    // Every candidate overflows: the first one is kept.
                    prop_assert_eq!(chosen.log2_scale_q88, cands[0].0, "{}", at);
                    continue;
                }
                prop_assert!(lc <= min * (1.0 + 1e-12), "{}: loss {:e} > min {:e}", at, lc, min);
                let near: Vec<i16> = cands.iter().filter(|c| c.1 <= min * (1.0 + 1e-12)).map(|c| c.0).collect();
                prop_assert!(near.contains(&chosen.log2_scale_q88), "{}", at);
                if near.iter().all(|&q| q == near[0]) {
                    prop_assert_eq!(chosen.log2_scale_q88, near[0], "{}", at);
                }
                prop_assert_eq!(chosen.qzero, base.qzero);
            }
        }
    }
}

/// The stored scale changes the choice: on a realistic weight, bf16 scales pick another
/// candidate than f32 scales in some groups, and there the bf16 choice is the better one at
/// the bf16 scales (what the checkpoint will dequantize with).
#[test]
fn mse_with_bf16_scales_chooses_by_the_bf16_loss() {
    let w = Array2::from_shape_fn((64, 1024), |(r, c)| {
        (((r * 1031 + c * 97) % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (c % 7) as f32)
    });
    let base =
        GridConfig { group_size: 128, scale_search: ScaleSearch::Mse(MseSearch::default()), ..GridConfig::default() };
    let g32 = grid(WeightView::F32(w.view()), &base);
    let gbf = grid(WeightView::F32(w.view()), &GridConfig { scale_dtype: ScaleDtype::BF16, ..base.clone() });
    let (rows, n_groups) = g32.dim();
    let mut differ = 0;
    for r in 0..rows {
        for gi in 0..n_groups {
            let (a, b) = (g32.meta(r, gi), gbf.meta(r, gi));
            assert_eq!(a.qzero, b.qzero);
            if a == b {
                continue;
            }
            differ += 1;
            let grp = padded_group(&w, 128, r, gi);
            let loss = |m: QMetaPacked| {
                stored_loss(&grp, stored_by_half(m.scale(), ScaleDtype::BF16), m.qzero_f32(), 15.0, 2.4)
            };
            assert!(loss(b) <= loss(a), "({r}, {gi}): the bf16 choice must be at least as good at bf16 scales");
        }
    }
    assert!(differ > 0, "bf16 rounding never changed a choice: the test would prove nothing");
    eprintln!("{differ} of {} groups choose another scale with bf16 scales", rows * n_groups);
}

/// Equal losses keep the lower candidate index. Exact ties: a zero group has loss 0 under
/// every scale, and a 2-bit symmetric group under scales ≥ 4× its absmax scale quantizes
/// every element to q0 (|x|/s ≤ 1.5/4 < ½), so each candidate's loss is Σ|x|^norm.
#[test]
fn mse_ties_keep_the_lower_candidate_index() {
    let mut w = Array2::<f32>::zeros((2, 64));
    for c in 0..64 {
        w[[1, c]] = ((c as f32) * 0.7).sin() * 3.0;
    }
    for norm in [2.0f32, 2.4, 1.0] {
        for list in [vec![1.0f32, 2.0, 4.0], vec![8.0, 4.0, 16.0], vec![4.0, 0.5, 8.0]] {
            let mk = |search| GridConfig {
                group_size: 32,
                bits: 2,
                symmetric: true,
                scale_search: search,
                ..GridConfig::default()
            };
            let abs = grid(WeightView::F32(w.view()), &mk(ScaleSearch::Absmax));
            let ms = grid(
                WeightView::F32(w.view()),
                &mk(ScaleSearch::Mse(MseSearch { candidates: ShrinkCandidates::List(list.clone()), norm })),
            );
            for gi in 0..2 {
                // Zero group: every candidate ties; the first one wins.
                let base = abs.meta(0, gi);
                let want = encode_log2_q88(base.scale() * list[0]);
                assert_ne!(want, encode_log2_q88(base.scale() * list[1]), "distinct scales");
                assert_eq!(ms.meta(0, gi).log2_scale_q88, want, "zeros, {list:?} norm {norm}");
                // Non-zero group: candidates ≥ 4 tie; the first of them wins unless a smaller
                // factor (0.5, 1.0, 2.0) is strictly better.
                let base = abs.meta(1, gi);
                let grp = padded_group(&w, 32, 1, gi);
                let losses: Vec<f64> = list
                    .iter()
                    .map(|&p| {
                        let s = decode_log2_q88(encode_log2_q88(base.scale() * p));
                        powf_loss_f64(&grp, s, base.qzero_f32(), 3.0, norm)
                    })
                    .collect();
                let ge4: Vec<usize> = (0..list.len()).filter(|&k| list[k] >= 4.0).collect();
                let all_q0: f64 = grp.iter().map(|&x| (x.abs() as f64).powf(norm as f64)).sum();
                for &k in &ge4 {
                    assert_eq!(losses[k], all_q0, "p = {} quantizes everything to q0", list[k]);
                }
                let min = losses.iter().copied().fold(f64::INFINITY, f64::min);
                let first = (0..list.len()).find(|&k| losses[k] == min).unwrap();
                let want = encode_log2_q88(base.scale() * list[first]);
                assert_eq!(
                    ms.meta(1, gi).log2_scale_q88,
                    want,
                    "sin group {gi}, {list:?} norm {norm}: losses {losses:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// padding and dtypes
// ---------------------------------------------------------------------------------------------

fn any_search() -> impl Strategy<Value = ScaleSearch> {
    prop_oneof![Just(ScaleSearch::Absmax), Just(mse(2.4)), Just(mse(2.0))]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn padding_only_affects_the_last_group(c in case(), search in any_search()) {
        let cfg = c.cfg(search);
        let (rows, cols) = c.w.dim();
        let n = cols.div_ceil(c.gs);
        let g = grid(WeightView::F32(c.w.view()), &cfg);
        prop_assert_eq!(g.pad, n * c.gs - cols);

        // Zero-padding explicitly gives the same records and no pad.
        let mut padded = Array2::<f32>::zeros((rows, n * c.gs));
        padded.slice_mut(s![.., ..cols]).assign(&c.w);
        let gp = grid(WeightView::F32(padded.view()), &cfg);
        prop_assert_eq!(gp.pad, 0);
        prop_assert_eq!(&g.qmeta, &gp.qmeta);

        // The full groups alone (a strided view, not a copy) give the same leading records.
        if n >= 2 {
            let full = c.w.slice(s![.., ..(n - 1) * c.gs]);
            let gf = grid(WeightView::F32(full), &cfg);
            prop_assert_eq!(gf.pad, 0);
            prop_assert_eq!(gf.qmeta.view(), g.qmeta.slice(s![.., ..n - 1, ..]));
        }
    }

    #[test]
    fn f16_grid_equals_grid_of_widened_values(c in case_with(-12..=10), search in any_search()) {
        let cfg = c.cfg(search);
        let h = c.w.mapv(half::f16::from_f32);
        let widened = h.mapv(half::f16::to_f32);
        prop_assert!(widened.iter().all(|v| v.is_finite()));
        prop_assert_eq!(
            grid(WeightView::F16(h.view()), &cfg),
            grid(WeightView::F32(widened.view()), &cfg)
        );
    }

    #[test]
    fn bf16_grid_equals_grid_of_widened_values(c in case_with(-60..=60), search in any_search()) {
        let cfg = c.cfg(search);
        let b = c.w.mapv(half::bf16::from_f32);
        let widened = b.mapv(half::bf16::to_f32);
        prop_assert_eq!(
            grid(WeightView::BF16(b.view()), &cfg),
            grid(WeightView::F32(widened.view()), &cfg)
        );
    }

    #[test]
    fn fp8_grid_equals_grid_of_widened_values(
        c in case(),
        bytes in prop::collection::vec(any::<u8>().prop_filter("NaN", |b| b & 0x7f != 0x7f), 4 * 3 * 128),
        search in any_search(),
    ) {
        let cfg = c.cfg(search);
        let (rows, cols) = c.w.dim();
        let q = Array2::from_shape_fn((rows, cols), |(r, k)| bytes[r * cols + k]);
        let widened = q.mapv(e4m3_definition);
        prop_assert_eq!(
            grid(WeightView::Fp8E4M3(q.view()), &cfg),
            grid(WeightView::F32(widened.view()), &cfg)
        );
    }
}

/// OCP E4M3 from its definition (finite bytes only): sign·2^(e−7)·(1+m/8), or sign·2^−6·m/8.
fn e4m3_definition(v: u8) -> f32 {
    let sign = if v & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((v >> 3) & 0xf) as i32;
    let m = (v & 7) as f64;
    let x = if e >= 1 { 2f64.powi(e - 7) * (1.0 + m / 8.0) } else { 2f64.powi(-6) * m / 8.0 };
    (sign * x) as f32
}

// ---------------------------------------------------------------------------------------------
// adversarial groups
// ---------------------------------------------------------------------------------------------

/// One 64-column row (two groups of 32) per pattern.
fn adversarial_rows() -> Vec<(&'static str, Vec<f32>)> {
    let sub = |k: u32| f32::from_bits(k);
    let alt = |a: f32, b: f32| (0..64).map(|i| if i % 2 == 0 { a } else { b }).collect();
    let ramp = |m: f32| (0..64).map(|i| (i as f32 - 31.5) * m).collect();
    vec![
        ("zeros", vec![0.0; 64]),
        ("negative zeros", vec![-0.0; 64]),
        ("±0", alt(0.0, -0.0)),
        ("constant 1.5", vec![1.5; 64]),
        ("constant -3.25e-5", vec![-3.25e-5; 64]),
        ("constant 7e20", vec![7e20; 64]),
        ("smallest subnormal", vec![sub(1); 64]),
        ("±subnormals", (0..64).map(|i| if i % 3 == 0 { -sub(i * 977 + 1) } else { sub(i * 131_071 + 5) }).collect()),
        ("subnormal and zero", alt(sub(0x7f_ffff), 0.0)),
        ("huge ramp", ramp(1e30 / 32.0)),
        ("±1e30", alt(1e30, -1e30)),
        ("±f32::MAX", alt(f32::MAX, -f32::MAX)),
        ("f32::MAX and 0", alt(f32::MAX, 0.0)),
        ("tiny ramp", ramp(1e-30 / 32.0)),
        ("±1e-30", alt(1e-30, -1e-30)),
        ("one huge, rest tiny", (0..64).map(|i| if i == 17 { 1e30 } else { 1e-30 }).collect()),
        ("one tiny, rest zero", (0..64).map(|i| if i == 40 { -1e-30 } else { 0.0 }).collect()),
    ]
}

#[test]
fn adversarial_groups_give_finite_scales_and_no_errors() {
    let rows = adversarial_rows();
    let names: Vec<_> = rows.iter().map(|r| r.0).collect();
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.1.iter().copied()).collect();
    let w = Array2::from_shape_vec((rows.len(), 64), flat).unwrap();
    // The all-zero group's scale is the 1e-12 clamp: encode(1e-12) derived from f64 log2.
    let q88_min = (((1e-12f32 as f64).log2() as f32) * 256.0).round_ties_even() as i16;
    for bits in 2..=8u32 {
        let maxq = (1u32 << bits) - 1;
        for sym in [true, false] {
            for search in [ScaleSearch::Absmax, mse(2.4), mse(2.0)] {
                let cfg = GridConfig {
                    group_size: 32,
                    bits,
                    symmetric: sym,
                    scale_search: search.clone(),
                    ..GridConfig::default()
                };
                let g = build_quant_grid(WeightView::F32(w.view()), &cfg)
                    .unwrap_or_else(|e| panic!("bits {bits} sym {sym} {search:?}: {e}"));
                let absmax = build_quant_grid(
                    WeightView::F32(w.view()),
                    &GridConfig { scale_search: ScaleSearch::Absmax, ..cfg.clone() },
                )
                .unwrap();
                assert_eq!(g.dim(), (names.len(), 2));
                for (r, name) in names.iter().enumerate() {
                    for gi in 0..2 {
                        let m: QMetaPacked = g.meta(r, gi);
                        let at = format!("{name} group {gi}, bits {bits} sym {sym} {search:?}: {m:?}");
                        let scale = m.scale();
                        assert!(scale.is_finite() && scale > 0.0, "{at}: scale {scale:e}");
                        assert_eq!(m.is_symmetric(), sym, "{at}");
                        if sym {
                            // (maxq + 1) / 2 = 2^(bits − 1)
                            assert_eq!(m.qzero as u32, 1 << (bits - 1), "{at}");
                        } else {
                            assert!(m.qzero as u32 <= maxq, "{at}");
                        }
                        if name.ends_with("zeros") || *name == "±0" {
                            assert_eq!(m.log2_scale_q88, q88_min, "{at}");
                            if !sym {
                                assert_eq!(m.qzero, 0, "{at}");
                            }
                        }
                        // MSE: the first candidate reaching the minimum loss (ties keep the
                        // lower k); q0 stays the absmax one.
                        if let ScaleSearch::Mse(search) = &search {
                            let base = absmax.meta(r, gi);
                            let grp = &w.row(r).to_vec()[gi * 32..(gi + 1) * 32];
                            let losses: Vec<(f64, i16)> = search
                                .factors()
                                .unwrap()
                                .iter()
                                .map(|&p| {
                                    let q88 = encode_log2_q88(base.scale() * p);
                                    let l = candidate_loss_f64(
                                        grp,
                                        decode_log2_q88(q88),
                                        base.qzero_f32(),
                                        maxq as f32,
                                        search.norm,
                                    );
                                    (l, q88)
                                })
                                .collect();
                            let min = losses.iter().map(|l| l.0).fold(f64::INFINITY, f64::min);
                            let first = losses.iter().find(|l| l.0 == min).unwrap().1;
                            assert_eq!(m.log2_scale_q88, first, "{at}: losses {losses:?}");
                            assert_eq!(m.qzero, base.qzero, "{at}");
                        }
                    }
                }
            }
        }
    }
}
