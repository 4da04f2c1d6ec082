//! The GPTQ solver with static groups (docs/design.md §4).
//!
//! Inputs are the weight in `nn.Linear` layout `(rows, cols)`, `U` (the upper Cholesky
//! factor of `H⁻¹` of the permuted Hessian, raw or diagonal-normalised), a built
//! [`QuantGrid`] and an optional act-order column order. [`solve_cpu`] is the reference
//! the GPU solver ([`launch_solve`], docs/kernels.md §4) is checked against;
//! [`validate_inputs`] is the one place the input contract is checked, so every backend
//! reports the same typed errors.

mod cpu;
mod cuda;

pub use cpu::{flushed_groups, flushed_groups_of, layer_output_error, round_to_nearest, solve_cpu};
pub(crate) use cpu::{flushed_groups_codes, flushed_in_row, flushed_warning, RowFlushed};
pub(crate) use cuda::{check_loss_finite, padded_factor, padded_perm};
pub use cuda::{
    launch_row_error, launch_solve, launch_solve_into, padded, solve_gpu, DeviceFactor, DeviceSolveOutput, FactorRef,
    SolveOutputs, SolveWorkspace,
};

use crate::{ForgeError, QuantGrid, Result, Warning};
use ndarray::{Array1, Array2, ArrayView2};

/// What the solver returns for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct SolveOutput {
    /// `(rows, cols)` codes in `0..=maxq`, in the ORIGINAL column order.
    pub qweight: Array2<u8>,
    /// `(rows, cols)` dequantized weight `(q − q0)·s`, `s` the record's scale as stored in the
    /// grid's scale dtype, in the original column order.
    pub dequant: Array2<f32>,
    /// GPTQ loss per row: `Σ_t ((w − deq)/U[t,t])² / 2`, accumulated in f64.
    pub loss: Array1<f32>,
    /// Legal but surprising outcomes (e.g. [`Warning::FlushedGroups`]).
    pub warnings: Vec<Warning>,
}

/// Checks the solver's input contract (docs/design.md §4) and returns the typed error of the first
/// violation found.
///
/// * `weight` is `(rows, cols)`, non-empty, all finite;
/// * `hinv_factor` is `(cols, cols)`, all finite, with a diagonal that is `> 0`;
/// * `grid` has `(rows, ceil(cols/gs))` records of 4 bytes, a group size that is a multiple
///   of 32 in `32..=1024`, `pad = n_groups·gs − cols`, `maxq = 2^bits − 1`, bits in 2..=8,
///   records that agree with `maxq` ([`QuantGrid::check_records`]: no reserved flag bits,
///   zero points in range, symmetric zero points at `(maxq + 1)/2`), and every scale finite
///   as stored in its scale dtype (f16 overflows at 65520);
/// * `perm`, when given, is a permutation of `0..cols`.
pub fn validate_inputs(
    weight: ArrayView2<'_, f32>,
    hinv_factor: ArrayView2<'_, f32>,
    grid: &QuantGrid,
    perm: Option<&[usize]>,
) -> Result<()> {
    let (rows, cols) = weight.dim();
    if rows == 0 || cols == 0 {
        return Err(ForgeError::Shape(format!("weight is empty ({rows}×{cols})")));
    }
    if hinv_factor.dim() != (cols, cols) {
        let (a, b) = hinv_factor.dim();
        return Err(ForgeError::Shape(format!(
            "hinv_factor is {a}×{b}, expected {cols}×{cols} for a weight with {cols} columns"
        )));
    }
    let gs = grid.group_size;
    if !gs.is_multiple_of(32) || !(32..=1024).contains(&gs) {
        return Err(ForgeError::GroupSize(gs));
    }
    let n_groups = cols.div_ceil(gs);
    let (gr, gg, gb) = grid.qmeta.dim();
    if (gr, gg, gb) != (rows, n_groups, 4) {
        return Err(ForgeError::Shape(format!(
            "grid qmeta is {gr}×{gg}×{gb}, expected {rows}×{n_groups}×4 for a {rows}×{cols} \
             weight with group size {gs}"
        )));
    }
    if Some(grid.pad) != (n_groups * gs).checked_sub(cols) {
        return Err(ForgeError::Shape(format!(
            "grid pad {} does not match {cols} columns in {n_groups} groups of {gs}",
            grid.pad
        )));
    }
    let maxq = grid.maxq;
    if !(3..=255).contains(&maxq) || !(maxq + 1).is_power_of_two() {
        return Err(ForgeError::Shape(format!("grid maxq {maxq} is not 2^bits − 1 with bits in 2..=8")));
    }
    grid.check_records()?;
    grid.check_stored_scales()?;
    first_non_finite(weight, "weight")?;
    validate_factor(hinv_factor, cols, perm)
}

/// The factor's part of the contract: `(cols, cols)`, finite, a diagonal `> 0`, and `perm`
/// (when given) a permutation of `0..cols`.
pub fn validate_factor(hinv_factor: ArrayView2<'_, f32>, cols: usize, perm: Option<&[usize]>) -> Result<()> {
    if hinv_factor.dim() != (cols, cols) {
        let (a, b) = hinv_factor.dim();
        return Err(ForgeError::Shape(format!(
            "hinv_factor is {a}×{b}, expected {cols}×{cols} for a weight with {cols} columns"
        )));
    }
    if let Some(p) = perm {
        check_permutation(p, cols)?;
    }
    first_non_finite(hinv_factor, "hinv_factor")?;
    for t in 0..cols {
        let d = hinv_factor[[t, t]];
        // A zero or negative pivot cannot come from a Cholesky factor, and dividing by it
        // would silently produce inf/NaN errors.
        if d <= 0.0 {
            return Err(ForgeError::Shape(format!(
                "hinv_factor[{t},{t}] = {d}: the diagonal of a Cholesky factor must be > 0"
            )));
        }
    }
    Ok(())
}

/// Checks that `perm` holds every index of `0..cols` exactly once.
pub fn check_permutation(perm: &[usize], cols: usize) -> Result<()> {
    if perm.len() != cols {
        return Err(ForgeError::Shape(format!("perm has {} entries, expected {cols}", perm.len())));
    }
    let mut seen = vec![false; cols];
    for (t, &j) in perm.iter().enumerate() {
        match seen.get_mut(j) {
            None => return Err(ForgeError::Shape(format!("perm[{t}] = {j} is out of range for {cols} columns"))),
            Some(true) => {
                return Err(ForgeError::Shape(format!(
                    "perm[{t}] = {j} repeats an earlier entry: perm is not a permutation"
                )))
            }
            Some(s) => *s = true,
        }
    }
    Ok(())
}

/// The first NaN / ±inf of `a` in row-major order, as a typed error.
pub(crate) fn first_non_finite(a: ArrayView2<'_, f32>, tensor: &'static str) -> Result<()> {
    match a.indexed_iter().find(|(_, v)| !v.is_finite()) {
        Some(((row, col), &value)) => Err(ForgeError::NonFinite { tensor, row, col, value }),
        None => Ok(()),
    }
}
