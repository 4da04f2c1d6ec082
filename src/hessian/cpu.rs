//! CPU Hessian accumulation and pre-step (faer).

use super::{HessianAccumulator, PreStep, PreStepConfig, PreStepPlan};
use crate::solver::first_non_finite;
use crate::warning::ASYMMETRY_TOLERANCE;
use crate::{budget, ForgeError, Result, Warning};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Accum, Mat, MatRef, Par, Side};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

impl HessianAccumulator {
    /// An empty accumulator (`H = 0`, no tokens) for a layer with `cols` input features.
    /// `H` and the scratch an update needs (`2·cols²` f32) are checked against the host
    /// budget first.
    pub fn new(cols: usize) -> Result<Self> {
        if cols == 0 {
            return Err(ForgeError::Shape("a Hessian needs at least one input column".into()));
        }
        budget::Request::new()
            .array::<f32>(&[cols, cols])
            .times(2)
            .check(&format!("a {cols}×{cols} Hessian and its update scratch"))?;
        Ok(HessianAccumulator { h: Array2::zeros((cols, cols)), tokens: 0 })
    }

    /// Adds a batch `x: (tokens, cols)`: `H ← β·H + α·XᵀX`, `α = 2/(n+m)`, `β = n/(n+m)`
    /// (`n` tokens so far, `m` new), so `H` stays `2/N·Σ XᵀX` over all `N` tokens.
    ///
    /// `XᵀX` is an f32 faer matmul (as the GPTQ reference's), lower triangle only and
    /// mirrored, so `H` is exactly symmetric; the blend is f32 with α, β rounded from f64.
    /// An empty batch is a no-op. Wrong column count, a non-finite activation, a product or
    /// blend that overflows f32, a token count that overflows u64 and scratch beyond the host
    /// budget are typed errors; on any error the accumulator is left unchanged.
    pub fn update(&mut self, x: ArrayView2<'_, f32>) -> Result<()> {
        let (m, cols) = x.dim();
        if cols != self.cols() {
            return Err(ForgeError::Shape(format!("activations have {cols} columns, the Hessian has {}", self.cols())));
        }
        if m == 0 {
            return Ok(());
        }
        let tokens = add_tokens(self.tokens, m)?;
        first_non_finite(x, "activations")?;
        let copy = if x.is_standard_layout() { 0 } else { m };
        budget::Request::new()
            .array::<f32>(&[cols, cols])
            .array::<f32>(&[copy, cols])
            .check(&format!("the XᵀX scratch of a {m}-token batch ({cols} columns)"))?;
        let xs = x.as_standard_layout();
        let slice = xs.as_slice().ok_or_else(|| ForgeError::Shape("activations are not contiguous".into()))?;
        let xf = MatRef::from_row_major_slice(slice, m, cols);
        // Only the lower triangle is computed (half the work) and mirrored below, so H stays
        // exactly symmetric.
        let mut xtx = Mat::<f32>::zeros(cols, cols);
        triangular::matmul(
            xtx.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Replace,
            xf.transpose(),
            BlockStructure::Rectangular,
            xf,
            BlockStructure::Rectangular,
            1.0,
            Par::rayon(0),
        );
        // Check before blending so an overflow leaves the accumulator as it was.
        for j in 0..cols {
            for i in j..cols {
                let value = xtx[(i, j)];
                if !value.is_finite() {
                    return Err(ForgeError::NonFinite { tensor: "XᵀX (f32 overflow)", row: i, col: j, value });
                }
            }
        }
        let n = self.tokens as f64;
        let total = n + m as f64;
        let alpha = (2.0 / total) as f32;
        let beta = (n / total) as f32;
        let blend = |(i, j): (usize, usize), hv: f32| beta * hv + alpha * xtx[(i.max(j), i.min(j))];
        // Checked before anything is written, so an overflow leaves H as it was.
        if let Some(((i, j), &hv)) = self.h.indexed_iter().find(|&(ix, &hv)| !blend(ix, hv).is_finite()) {
            return Err(ForgeError::NonFinite {
                tensor: "H (f32 overflow in the blend)",
                row: i,
                col: j,
                value: blend((i, j), hv),
            });
        }
        for (ix, hv) in self.h.indexed_iter_mut() {
            *hv = blend(ix, *hv);
        }
        self.tokens = tokens;
        Ok(())
    }
}

/// `tokens + m`, or [`ForgeError::Overflow`] (a running count must never wrap: the blend
/// weights `n/(n+m)` would be garbage).
pub(crate) fn add_tokens(tokens: u64, m: usize) -> Result<u64> {
    u64::try_from(m).ok().and_then(|m| tokens.checked_add(m)).ok_or_else(|| {
        ForgeError::Overflow(format!("the Hessian's token count {tokens} + {m} new tokens overflows u64"))
    })
}

/// [`Warning::AsymmetricHessian`] when `h` is not symmetric within [`ASYMMETRY_TOLERANCE`]:
/// the largest `|H[i,j] − H[j,i]|` relative to `sqrt(|H[i,i]·H[j,j]|)` (the first such
/// `(i, j)`, `i < j`, in row-major order among equal maxima). The pre-steps symmetrise `H`
/// as `(H + Hᵀ)/2` without complaint; this says when that hid something. Rows on all cores,
/// in square tiles so `H[j,i]` is read from cache.
pub fn asymmetry_warning(h: ArrayView2<'_, f32>) -> Option<Warning> {
    const TILE: usize = 64;
    let n = h.nrows().min(h.ncols());
    let rel_at = |i: usize, j: usize| -> f64 {
        let diff = (f64::from(h[[i, j]]) - f64::from(h[[j, i]])).abs();
        if diff == 0.0 {
            return 0.0;
        }
        let scale = (f64::from(h[[i, i]]) * f64::from(h[[j, j]])).abs().sqrt();
        if scale > 0.0 {
            diff / scale
        } else {
            f64::INFINITY
        }
    };
    // Larger relative asymmetry wins; among equal ones the earlier (i, j).
    let better = |a: &(f64, (usize, usize)), b: &(f64, (usize, usize))| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1);
    let worst = (0..n.div_ceil(TILE))
        .into_par_iter()
        .filter_map(|bi| {
            let (i0, i1) = (bi * TILE, ((bi + 1) * TILE).min(n));
            let mut worst: Option<(f64, (usize, usize))> = None;
            for j0 in (i0..n).step_by(TILE) {
                let j1 = (j0 + TILE).min(n);
                for i in i0..i1 {
                    for j in j0.max(i + 1)..j1 {
                        let cand = (rel_at(i, j), (i, j));
                        if cand.0 > ASYMMETRY_TOLERANCE && worst.as_ref().is_none_or(|w| better(&cand, w)) {
                            worst = Some(cand);
                        }
                    }
                }
            }
            worst
        })
        .reduce_with(|a, b| if better(&b, &a) { b } else { a });
    worst.map(|(max_relative, at)| Warning::AsymmetricHessian { max_relative, at })
}

/// Prepares `U` for the solver from a Hessian (docs/design.md §5), in f64 with faer:
///
/// 1. `H` is symmetrised as `(H + Hᵀ)/2` (exact for a symmetric input).
/// 2. Dead inputs, `diag H == 0`: the diagonal entry becomes 1 and, when `weight` is given,
///    that weight column is zeroed (the input never fires, so its weights are free).
/// 3. Act-order (`cfg.act_order`): `perm` = stable argsort of `diag H` descending.
/// 4. Damping `rel_damp · mean(|diag H|)` is added to the diagonal (`|·|` equals GPTQ's
///    `mean(diag H)` for every valid Hessian, and keeps a broken one's damping positive).
/// 5. `U = chol_upper((P H Pᵀ)⁻¹)`, without forming the inverse: with `J` the exchange
///    matrix, `J (PHPᵀ) J = L̂ L̂ᵀ` gives `PHPᵀ = M Mᵀ` with upper `M = J L̂ J`, so
///    `(PHPᵀ)⁻¹ = M⁻ᵀ M⁻¹` and `U = M⁻¹ = J L̂⁻¹ J` (one Cholesky and one triangular
///    inverse, against GPTQ's Cholesky, `cholesky_inverse` and second Cholesky).
///
/// If the Cholesky fails (not positive definite) or `U` does not fit f32 with a positive
/// diagonal, retry `k` (1 to [`super::MAX_RETRIES`]) uses the relative damping
/// `10^k · max(rel_damp, MIN_RETRY_REL_DAMP)`; after that `U = I` is returned
/// with `fallback_identity = true` (round-to-nearest, flagged, never silent). Steps 2–4 and
/// the retries are [`PreStepPlan`], which the GPU pre-step follows too.
///
/// Errors: `h` not square or empty, a non-finite entry of `h`, `weight` with a column count
/// other than `h`'s, `rel_damp` not finite and `≥ 0`, an all-zero diagonal, a negative
/// diagonal entry without `cfg.allow_indefinite` (see [`PreStepPlan`]), or buffers beyond
/// the host budget. On error `weight` is untouched. What was legal but surprising is in
/// [`PreStep::warnings`] (an asymmetric `H` beyond [`ASYMMETRY_TOLERANCE`], dead inputs,
/// retries, the identity fallback).
pub fn pre_step_cpu(h: ArrayView2<'_, f32>, weight: Option<&mut Array2<f32>>, cfg: &PreStepConfig) -> Result<PreStep> {
    cfg.validate()?;
    let (n, c) = h.dim();
    if n != c || n == 0 {
        return Err(ForgeError::Shape(format!("the Hessian must be square and non-empty, got {n}×{c}")));
    }
    if let Some(w) = weight.as_deref() {
        if w.ncols() != n {
            return Err(ForgeError::Shape(format!("weight has {} columns, the Hessian is {n}×{n}", w.ncols())));
        }
    }
    // The symmetrised and reversed copies, and per attempt the damped copy, its Cholesky
    // factor, the inverse and U (checked first: it depends only on the shape).
    budget::Request::new()
        .array::<f64>(&[n, n])
        .times(5)
        .array::<f32>(&[n, n])
        .check(&format!("the pre-step of a {n}×{n} Hessian"))?;
    first_non_finite(h, "hessian")?;
    // The diagonal of the f64 symmetrisation is the f32 diagonal exactly.
    let plan = PreStepPlan::new((0..n).map(|j| f64::from(h[[j, j]])).collect(), cfg)?;
    let asymmetry = asymmetry_warning(h);

    let mut a = Mat::<f64>::from_fn(n, n, |i, j| 0.5 * (f64::from(h[[i, j]]) + f64::from(h[[j, i]])));
    for &j in &plan.dead_columns {
        a[(j, j)] = 1.0;
    }
    // Processing order t → original column, reversed for the exchange-matrix trick.
    let order = plan.order(n);
    let reversed = Mat::<f64>::from_fn(n, n, |i, j| a[(order[n - 1 - i], order[n - 1 - j])]);
    let (factor, damping, retries) = plan.factor_with_retries(|damping, _| Ok(factor_attempt(&reversed, damping)))?;

    if let Some(w) = weight {
        for &j in &plan.dead_columns {
            w.column_mut(j).fill(0.0);
        }
    }
    let fallback_identity = factor.is_none();
    let mut warnings: Vec<Warning> = asymmetry.into_iter().collect();
    warnings.extend(plan.warnings(retries, fallback_identity, damping));
    Ok(PreStep {
        hinv_factor: factor.unwrap_or_else(|| Array2::eye(n)),
        perm: plan.perm,
        dead_columns: plan.dead_columns,
        damping_used: damping as f32,
        retries,
        fallback_identity,
        warnings,
    })
}

/// `U = J L̂⁻¹ J` from the reversed Hessian `J H J + damping·I = L̂ L̂ᵀ`, or `None` if the
/// Cholesky fails or `U` has a non-finite entry or a diagonal that is not `> 0` in f32.
fn factor_attempt(reversed: &Mat<f64>, damping: f64) -> Option<Array2<f32>> {
    let n = reversed.nrows();
    let mut m = reversed.clone();
    for i in 0..n {
        m[(i, i)] += damping;
    }
    let llt = m.llt(Side::Lower).ok()?;
    let mut linv = Mat::<f64>::zeros(n, n);
    invert_lower_triangular(linv.as_mut(), llt.L(), Par::rayon(0));
    let mut u = Array2::<f32>::zeros((n, n));
    for i in 0..n {
        for j in i..n {
            let v = linv[(n - 1 - i, n - 1 - j)] as f32;
            if !v.is_finite() || (i == j && v <= 0.0) {
                return None;
            }
            u[[i, j]] = v;
        }
    }
    Some(u)
}
