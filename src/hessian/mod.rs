//! The layer above the solver (DESIGN §5): the Hessian `H = 2/n·XᵀX` accumulated over
//! calibration batches, and the pre-step that turns it into what the solver consumes
//! (dead inputs, damping, act-order permutation, `U = chol_upper(H⁻¹)`).
//!
//! Both run on the CPU with faer; the factorisation is done in f64 and returned as f32.

mod cpu;

pub use cpu::{pre_step_cpu, MAX_RETRIES, MIN_RETRY_REL_DAMP};

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
}

impl Default for PreStepConfig {
    /// `rel_damp = 0.01`, no act-order: the GPTQ reference's defaults.
    fn default() -> Self {
        PreStepConfig { rel_damp: 0.01, act_order: false }
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
}
