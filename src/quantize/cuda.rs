//! The device side of the orchestration path: weight upload, grid, solve with a factor
//! already on the device, download. One function, used by [`super::Quantizer`], the
//! calibration layer and the expert batches.

use crate::device::GpuDevice;
use crate::grid::{self, DeviceWeight, GridConfig, QuantGrid};
use crate::solver::{self, DeviceFactor, SolveOutput, SolveWorkspace};
use crate::{Result, WeightView};
use ndarray::ArrayView2;

/// Device solve buffers kept across same-shape layers of a batch.
#[derive(Default)]
pub struct WorkspaceCache {
    slots: Vec<((usize, usize), SolveWorkspace)>,
}

impl WorkspaceCache {
    /// The workspace of shape `rows × cols`, made on first use.
    pub(crate) fn get(&mut self, dev: &GpuDevice, rows: usize, cols: usize) -> Result<&mut SolveWorkspace> {
        let k = match self.slots.iter().position(|(s, _)| *s == (rows, cols)) {
            Some(k) => k,
            None => {
                self.slots.push(((rows, cols), SolveWorkspace::new(dev, rows, cols)?));
                self.slots.len() - 1
            }
        };
        Ok(&mut self.slots[k].1)
    }
}

/// Grid and solve on the device: the weight is uploaded once, the grid kernel rejects a
/// non-finite weight, the solve reads the grid records in place, and codes, dequantized
/// weight, loss and the grid come back. `factor` comes from a checked pre-step or upload,
/// so only shapes are checked here (by `launch_solve`).
pub(crate) fn grid_and_solve(
    dev: &GpuDevice,
    config: &GridConfig,
    w: ArrayView2<'_, f32>,
    factor: &DeviceFactor,
    cache: &mut WorkspaceCache,
) -> Result<(QuantGrid, SolveOutput)> {
    let (rows, cols) = w.dim();
    let dw = DeviceWeight::upload(dev, WeightView::F32(w))?;
    let dgrid = grid::build_quant_grid_device(dev, &dw, config)?;
    let ws = cache.get(dev, rows, cols)?;
    solver::launch_solve(dev, &dw, factor, &dgrid, ws)?;
    let grid = dgrid.to_host(dev)?;
    Ok((grid, ws.output().to_host(dev)?))
}
