//! The CPU reference of the orchestration path: grid, then solve.

use crate::grid::{self, GridConfig, QuantGrid};
use crate::solver::{solve_cpu, SolveOutput};
use crate::{Result, WeightView};
use ndarray::ArrayView2;

/// The grid of `weight`, then its GPTQ solve with `U` and the act-order, on the CPU.
pub(crate) fn grid_and_solve(
    config: &GridConfig,
    weight: WeightView<'_>,
    hinv_factor: ArrayView2<'_, f32>,
    perm: Option<&[usize]>,
) -> Result<(QuantGrid, SolveOutput)> {
    let w32 = super::widen(weight)?;
    let grid = grid::build_quant_grid(weight, config)?;
    let out = solve_cpu(w32.view(), hinv_factor, &grid, perm)?;
    Ok((grid, out))
}
