//! The layer above the solver (docs/design.md §5): the Hessian `H = 2/n·XᵀX` accumulated over
//! calibration batches, and the pre-step that turns it into what the solver consumes
//! (dead inputs, damping, act-order permutation, `U = chol_upper(H⁻¹)`).
//!
//! The CPU reference ([`cpu`], faer) and the device path ([`cuda`]: tiled `XᵀX` kernels,
//! cuSOLVER) follow one pre-step policy ([`PreStepPlan`]): the factorisation is done in f64
//! and returned as f32.

mod cpu;
pub(crate) mod cuda;

pub(crate) use cpu::add_tokens;
pub use cpu::{asymmetry_warning, pre_step_cpu};
pub use cuda::{
    pre_step_gpu, DeviceActivations, FactorMethod, GpuHessian, GpuPreStepper, MAX_CHUNK_TOKENS, MAX_HESSIAN_COLS,
};

/// Factorisations retried with 10× the damping before falling back to `U = I`.
pub const MAX_RETRIES: u32 = 3;

/// Relative damping the retries start from when `rel_damp` is 0 (10× of nothing would
/// retry the same failing matrix).
pub const MIN_RETRY_REL_DAMP: f64 = 1e-3;

use crate::{ForgeError, Result, Warning};
use ndarray::Array2;

/// Running Hessian of one linear layer over its input features: after batches of
/// `m_1, m_2, …` tokens, `H = (2/n)·Σ XᵀX` with `n = Σ m_i` (GPTQ's running average).
#[derive(Clone, Debug, PartialEq)]
pub struct HessianAccumulator {
    /// `(cols, cols)`, f32 as the GPTQ reference keeps it.
    h: Array2<f32>,
    /// Tokens seen so far.
    tokens: u64,
}

impl HessianAccumulator {
    /// An accumulator holding `h` over `tokens` tokens (a Hessian accumulated on the device
    /// and downloaded); `h` must be square.
    pub fn from_parts(h: Array2<f32>, tokens: u64) -> Result<Self> {
        if h.nrows() != h.ncols() || h.nrows() == 0 {
            return Err(ForgeError::Shape(format!("a Hessian must be square and non-empty, got {:?}", h.dim())));
        }
        Ok(HessianAccumulator { h, tokens })
    }
}

impl HessianAccumulator {
    /// The Hessian as accumulated so far (all zeros before the first token).
    pub fn h(&self) -> &Array2<f32> {
        &self.h
    }

    /// Tokens seen so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Input features (the side of `H`).
    pub fn cols(&self) -> usize {
        self.h.nrows()
    }

    /// Takes the Hessian out.
    pub fn into_h(self) -> Array2<f32> {
        self.h
    }
}

/// Settings of the pre-step.
#[derive(Clone, Debug, PartialEq)]
pub struct PreStepConfig {
    /// Damping relative to the mean of `diag H` (finite, `≥ 0`; default 0.01).
    pub rel_damp: f32,
    /// Process columns in order of decreasing `diag H` (default false).
    pub act_order: bool,
    /// Accept a Hessian with negative diagonal entries (default false: an error). No
    /// activations give one (`diag(2/n·XᵀX) ≥ 0`), so it is negative-definite or indefinite,
    /// typically a bug upstream; with this set it is factored with raised damping as far as
    /// that goes, and [`Warning::IndefiniteAccepted`] is reported.
    pub allow_indefinite: bool,
}

impl PreStepConfig {
    /// `rel_damp` finite and `≥ 0`.
    pub fn validate(&self) -> Result<()> {
        if !(self.rel_damp.is_finite() && self.rel_damp >= 0.0) {
            return Err(ForgeError::Config(format!("rel_damp must be finite and >= 0, got {}", self.rel_damp)));
        }
        Ok(())
    }
}

impl Default for PreStepConfig {
    /// `rel_damp = 0.01`, no act-order: the GPTQ reference's defaults.
    fn default() -> Self {
        PreStepConfig { rel_damp: 0.01, act_order: false, allow_indefinite: false }
    }
}

/// What the pre-step hands the solver, and what it had to do to get there.
#[derive(Clone, Debug, PartialEq)]
pub struct PreStep {
    /// `U`: upper triangular, positive diagonal, `(P H Pᵀ + damping·I)⁻¹ = UᵀU` for the
    /// permuted, dead-fixed Hessian (or the identity when `fallback_identity`).
    pub hinv_factor: Array2<f32>,
    /// Act-order column order (`perm[t]` = original column processed at step `t`), or
    /// `None` without act-order.
    pub perm: Option<Vec<usize>>,
    /// Original indices of inputs with `diag H == 0` (their weight columns were zeroed).
    pub dead_columns: Vec<usize>,
    /// Absolute damping added to the diagonal by the attempt that succeeded (the last one
    /// tried when `fallback_identity`).
    pub damping_used: f32,
    /// Factorisations retried with more damping (0 when the first one succeeded).
    pub retries: u32,
    /// Every attempt failed and `U = I` (round-to-nearest) was returned instead.
    pub fallback_identity: bool,
    /// Legal but surprising outcomes: an asymmetric `H` symmetrised, dead inputs, damping
    /// retries, the identity fallback, an indefinite `H` accepted on request.
    pub warnings: Vec<Warning>,
}

/// The pre-step policy both backends follow (docs/design.md §5), from `diag H` alone:
/// dead inputs (`diag H == 0` becomes 1), the damping scale `mean(|diag H|)`, and the
/// act-order permutation (stable argsort of the diagonal, descending). The factorisation is
/// then tried with [`PreStepPlan::damping`] for attempts `0..=MAX_RETRIES` by
/// [`PreStepPlan::factor_with_retries`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PreStepPlan {
    /// Original indices of inputs with `diag H == 0`.
    pub dead_columns: Vec<usize>,
    /// `mean(|diag H|)` after the dead fix.
    pub mean_abs_diag: f64,
    /// Act-order permutation, if asked for.
    pub perm: Option<Vec<usize>>,
    rel_damp: f64,
    /// Negative diagonal entries (count, first), accepted with `allow_indefinite`.
    negative: Option<(usize, usize)>,
}

impl PreStepPlan {
    /// The plan for a Hessian with diagonal `diag` (in f64, exactly the f32 diagonal).
    ///
    /// Errors, each because the result would be meaningless: a bad `cfg`; an all-zero
    /// diagonal (every input dead: the whole weight would be zeroed); a negative diagonal
    /// entry unless `cfg.allow_indefinite`; a damping that overflows f32.
    pub fn new(mut diag: Vec<f64>, cfg: &PreStepConfig) -> Result<Self> {
        cfg.validate()?;
        let n = diag.len();
        let negatives = diag.iter().filter(|&&d| d < 0.0).count();
        let negative = diag.iter().position(|&d| d < 0.0).map(|first| (negatives, first));
        if let Some((count, first)) = negative {
            if !cfg.allow_indefinite {
                return Err(ForgeError::Hessian(format!(
                    "H[{first},{first}] = {} is negative ({count} of {n} diagonal entries are): H is not positive \
                     semi-definite (negative-definite or indefinite), which no activations give (diag(2/n·XᵀX) ≥ 0). \
                     Check how it was computed; set PreStepConfig::allow_indefinite to factor it anyway with \
                     raised damping",
                    diag[first]
                )));
            }
        }
        if n > 0 && diag.iter().all(|&d| d == 0.0) {
            return Err(ForgeError::Hessian(format!(
                "every diagonal entry of H is 0 ({n} of {n} inputs never fired): quantizing would zero the whole \
                 weight. The calibration activations are all zero; give real calibration data, or quantize \
                 without a Hessian (round-to-nearest) on purpose"
            )));
        }
        let mut dead_columns = Vec::new();
        for (j, d) in diag.iter_mut().enumerate() {
            if *d == 0.0 {
                *d = 1.0;
                dead_columns.push(j);
            }
        }
        let mean_abs_diag = diag.iter().map(|d| d.abs()).sum::<f64>() / n.max(1) as f64;
        let perm = cfg.act_order.then(|| {
            let mut p: Vec<usize> = (0..n).collect();
            // sort_by is stable: equal diagonals keep their original order.
            p.sort_by(|&x, &y| diag[y].total_cmp(&diag[x]));
            p
        });
        let plan = PreStepPlan { dead_columns, mean_abs_diag, perm, rel_damp: f64::from(cfg.rel_damp), negative };
        let first = plan.damping(0);
        if !(first as f32).is_finite() {
            return Err(ForgeError::Config(format!(
                "the damping rel_damp·mean(|diag H|) = {} · {mean_abs_diag:e} = {first:e} overflows f32",
                cfg.rel_damp
            )));
        }
        Ok(plan)
    }

    /// The warnings of a pre-step that followed this plan and ended with `retries` retries,
    /// the last damping `damping`, and the identity fallback if `fallback`.
    pub fn warnings(&self, retries: u32, fallback: bool, damping: f64) -> Vec<Warning> {
        let mut w = Vec::new();
        if let Some((count, first)) = self.negative {
            w.push(Warning::IndefiniteAccepted { count, first });
        }
        if !self.dead_columns.is_empty() {
            w.push(Warning::DeadInputs {
                count: self.dead_columns.len(),
                first: self.dead_columns.iter().take(8).copied().collect(),
            });
        }
        if fallback {
            w.push(Warning::FallbackIdentity { retries });
        } else if retries > 0 {
            w.push(Warning::DampingRetries { retries, damping: damping as f32 });
        }
        w
    }

    /// Processing order `t → original column` (the permutation, or the identity).
    pub fn order(&self, n: usize) -> Vec<usize> {
        self.perm.clone().unwrap_or_else(|| (0..n).collect())
    }

    /// Absolute damping of attempt `k`: `rel_damp · mean(|diag H|)` first, then
    /// `10^k · max(rel_damp, MIN_RETRY_REL_DAMP) · mean(|diag H|)`.
    pub fn damping(&self, attempt: u32) -> f64 {
        if attempt == 0 {
            self.rel_damp * self.mean_abs_diag
        } else {
            self.rel_damp.max(MIN_RETRY_REL_DAMP) * 10f64.powi(attempt as i32) * self.mean_abs_diag
        }
    }

    /// Runs `attempt(damping, k)` for `k = 0..=MAX_RETRIES` until one returns a factor;
    /// returns it (or `None`: every attempt failed), the damping of the last attempt and the
    /// retries used. Errors from `attempt` stop the loop.
    pub fn factor_with_retries<U>(
        &self,
        mut attempt: impl FnMut(f64, u32) -> Result<Option<U>>,
    ) -> Result<(Option<U>, f64, u32)> {
        let mut k = 0;
        loop {
            let damping = self.damping(k);
            if let Some(u) = attempt(damping, k)? {
                return Ok((Some(u), damping, k));
            }
            if k == MAX_RETRIES {
                return Ok((None, damping, k));
            }
            k += 1;
        }
    }
}
