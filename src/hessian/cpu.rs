//! CPU Hessian accumulation and pre-step (faer).

use super::{HessianAccumulator, PreStep, PreStepConfig, PreStepPlan};
use crate::solver::first_non_finite;
use crate::{ForgeError, Result};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Accum, Mat, MatRef, Par, Side};
use ndarray::{Array2, ArrayView2};

impl HessianAccumulator {
    /// An empty accumulator (`H = 0`, no tokens) for a layer with `cols` input features.
    pub fn new(cols: usize) -> Result<Self> {
        if cols == 0 {
            return Err(ForgeError::Shape("a Hessian needs at least one input column".into()));
        }
        Ok(HessianAccumulator { h: Array2::zeros((cols, cols)), tokens: 0 })
    }

    /// Adds a batch `x: (tokens, cols)`: `H ← β·H + α·XᵀX`, `α = 2/(n+m)`, `β = n/(n+m)`
    /// (`n` tokens so far, `m` new), so `H` stays `2/N·Σ XᵀX` over all `N` tokens.
    ///
    /// `XᵀX` is an f32 faer matmul (as the GPTQ reference's), lower triangle only and
    /// mirrored, so `H` is exactly symmetric; the blend is f32 with α, β rounded from f64. An empty batch is a no-op. Wrong column count or a non-finite
    /// activation is a typed error, as is a product that overflows f32; on any error the
    /// accumulator is left unchanged.
    pub fn update(&mut self, x: ArrayView2<'_, f32>) -> Result<()> {
        let (m, cols) = x.dim();
        if cols != self.cols() {
            return Err(ForgeError::Shape(format!("activations have {cols} columns, the Hessian has {}", self.cols())));
        }
        if m == 0 {
            return Ok(());
        }
        first_non_finite(x, "activations")?;
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
        for ((i, j), hv) in self.h.indexed_iter_mut() {
            *hv = beta * *hv + alpha * xtx[(i.max(j), i.min(j))];
        }
        self.tokens += m as u64;
        Ok(())
    }
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
/// other than `h`'s, or `rel_damp` not finite and `≥ 0`. On error `weight` is untouched.
pub fn pre_step_cpu(h: ArrayView2<'_, f32>, weight: Option<&mut Array2<f32>>, cfg: &PreStepConfig) -> Result<PreStep> {
    let (n, c) = h.dim();
    if n != c || n == 0 {
        return Err(ForgeError::Shape(format!("the Hessian must be square and non-empty, got {n}×{c}")));
    }
    if let Some(w) = weight.as_deref() {
        if w.ncols() != n {
            return Err(ForgeError::Shape(format!("weight has {} columns, the Hessian is {n}×{n}", w.ncols())));
        }
    }
    first_non_finite(h, "hessian")?;
    // The diagonal of the f64 symmetrisation is the f32 diagonal exactly.
    let plan = PreStepPlan::new((0..n).map(|j| f64::from(h[[j, j]])).collect(), cfg)?;

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
    Ok(PreStep {
        hinv_factor: factor.unwrap_or_else(|| Array2::eye(n)),
        perm: plan.perm,
        dead_columns: plan.dead_columns,
        damping_used: damping as f32,
        retries,
        fallback_identity,
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
