//! Results that are legal but surprising. They never stop the job; every result that can
//! carry one has a `warnings` list ([`crate::hessian::PreStep`], [`crate::solver::SolveOutput`],
//! [`crate::calib::QuantizedLayer`]) and the command line prints them. Each message says what
//! happened, the threshold, and what the result means.

use std::fmt;

/// Relative asymmetry of `H` above which [`Warning::AsymmetricHessian`] is raised:
/// `|H[i,j] − H[j,i]| > tol · sqrt(|H[i,i]|·|H[j,j]|)` (the Cauchy–Schwarz scale of an entry
/// of a Gram matrix). f32 `XᵀX` products summed in different orders stay near 1e-6.
pub const ASYMMETRY_TOLERANCE: f64 = 1e-4;

/// One surprising-but-legal outcome.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Warning {
    /// `H` was not symmetric within [`ASYMMETRY_TOLERANCE`]; `(H + Hᵀ)/2` was used.
    AsymmetricHessian {
        /// The largest relative difference found.
        max_relative: f64,
        /// Where (row, column).
        at: (usize, usize),
    },
    /// Inputs whose `diag H` is 0 never fired during calibration: their weight columns were
    /// set to 0.
    DeadInputs {
        /// How many.
        count: usize,
        /// Up to eight of them.
        first: Vec<usize>,
    },
    /// The first factorisation failed (`H` + damping not positive definite) and the damping
    /// was raised; the factor is of a more damped `H` than asked.
    DampingRetries {
        /// Retries used.
        retries: u32,
        /// The absolute damping that worked.
        damping: f32,
    },
    /// Every factorisation failed: `U = I`, the result is round-to-nearest.
    FallbackIdentity {
        /// Retries tried.
        retries: u32,
    },
    /// `H` has negative diagonal entries (it cannot be a Gram matrix) and was accepted only
    /// because `PreStepConfig::allow_indefinite` is set.
    IndefiniteAccepted {
        /// Negative diagonal entries.
        count: usize,
        /// The first one (index).
        first: usize,
    },
    /// The layer saw no calibration tokens: `H = I`, the result is round-to-nearest.
    NoCalibrationTokens,
    /// Groups with nonzero weights whose every dequantized value is 0 (relative error 1 for
    /// that group): their magnitudes are below what the qmeta4 scale floor of 1e-12 can
    /// resolve (|w| ≲ 1e-12 · maxq/2), or the scale search picked a scale far above them.
    FlushedGroups {
        /// How many (row, group) pairs.
        groups: usize,
        /// Of how many.
        total: usize,
        /// The first one, (row, group).
        first: (usize, usize),
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::AsymmetricHessian { max_relative, at: (i, j) } => write!(
                f,
                "the Hessian is not symmetric: |H[{i},{j}] − H[{j},{i}]| is {max_relative:.3e} of \
                 sqrt(|H[{i},{i}]·H[{j},{j}]|), above the tolerance {ASYMMETRY_TOLERANCE:e}; (H + Hᵀ)/2 was used"
            ),
            Warning::DeadInputs { count, first } => write!(
                f,
                "{count} input(s) never fired during calibration (diag H = 0), e.g. {first:?}: their weight \
                 columns were set to 0"
            ),
            Warning::DampingRetries { retries, damping } => write!(
                f,
                "H + damping was not positive definite: the factorisation succeeded after {retries} retr{} with \
                 damping {damping:.4e} (10× more each time), so the solver used a more damped H than asked",
                if *retries == 1 { "y" } else { "ies" }
            ),
            Warning::FallbackIdentity { retries } => write!(
                f,
                "H could not be factorised even after {retries} retries with 10× more damping each: U = I was \
                 used, the result is round-to-nearest"
            ),
            Warning::IndefiniteAccepted { count, first } => write!(
                f,
                "H has {count} negative diagonal entr{} (first: {first}), so it is not a Hessian of any \
                 activations; accepted because allow_indefinite is set",
                if *count == 1 { "y" } else { "ies" }
            ),
            Warning::NoCalibrationTokens => {
                write!(f, "the layer saw no calibration tokens: H = I, the result is round-to-nearest")
            }
            Warning::FlushedGroups { groups, total, first: (r, g) } => write!(
                f,
                "{groups} of {total} groups (first: row {r}, group {g}) hold nonzero weights that all dequantize \
                 to 0 (relative error 1 there): their magnitudes are below what the qmeta4 scale floor 1e-12 \
                 resolves (|w| ≲ 1e-12·maxq/2), or the scale search chose a scale far above them"
            ),
        }
    }
}
