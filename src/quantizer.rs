//! One API for CPU and GPU (the seed spec's target interface, §6.3): a [`Quantizer`] holds
//! the format ([`GridConfig`]) and a [`Backend`]; `build_quant_grid`, `solve` and
//! `quantize_from_hinv` run on either, and on the GPU `quantize_from_hinv` keeps the weight,
//! the grid and the factor on the device from grid to codes.

use crate::gpu::{self, DeviceFactor, DeviceWeight, GpuDevice, SolveWorkspace};
use crate::solver::{solve_cpu, validate_inputs, SolveOutput};
use crate::{grid, GridConfig, QuantGrid, Result, WeightView};
use ndarray::{Array2, ArrayView2};
use std::sync::Arc;

/// Where the work runs.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The ndarray CPU reference.
    Cpu,
    /// A CUDA device.
    Gpu(Arc<GpuDevice>),
}

impl Backend {
    /// The first GPU if one is usable, else the CPU together with the reason there is no GPU.
    pub fn auto() -> (Backend, Option<String>) {
        match GpuDevice::first() {
            Ok(dev) => (Backend::Gpu(dev), None),
            Err(e) => (Backend::Cpu, Some(e.to_string())),
        }
    }

    /// "CPU" or the device's name.
    pub fn name(&self) -> String {
        match self {
            Backend::Cpu => "CPU".into(),
            Backend::Gpu(d) => d.name().into(),
        }
    }
}

/// A layer quantizer: format plus backend.
#[derive(Clone, Debug)]
pub struct Quantizer {
    /// Group size, bits, symmetry, scale search.
    pub config: GridConfig,
    /// CPU or GPU.
    pub backend: Backend,
}

impl Quantizer {
    /// A quantizer for `config` on `backend`.
    pub fn new(config: GridConfig, backend: Backend) -> Self {
        Quantizer { config, backend }
    }

    /// The qmeta4 grid of `weight` (groups along the input columns).
    pub fn build_quant_grid(&self, weight: WeightView<'_>) -> Result<QuantGrid> {
        match &self.backend {
            Backend::Cpu => grid::build_quant_grid(weight, &self.config),
            Backend::Gpu(dev) => gpu::build_quant_grid_gpu(dev, weight, &self.config),
        }
    }

    /// GPTQ with a given grid: `hinv_factor` is `U` of the (permuted) inverse Hessian,
    /// `perm` the act-order column order if any.
    pub fn solve(
        &self,
        weight: ArrayView2<'_, f32>,
        hinv_factor: ArrayView2<'_, f32>,
        grid: &QuantGrid,
        perm: Option<&[usize]>,
    ) -> Result<SolveOutput> {
        match &self.backend {
            Backend::Cpu => solve_cpu(weight, hinv_factor, grid, perm),
            Backend::Gpu(dev) => gpu::solve_gpu(dev, weight, hinv_factor, grid, perm),
        }
    }

    /// Grid, then solve. On the GPU the weight is uploaded once and the grid never leaves
    /// the device.
    pub fn quantize_from_hinv(
        &self,
        weight: WeightView<'_>,
        hinv_factor: ArrayView2<'_, f32>,
        perm: Option<&[usize]>,
    ) -> Result<(QuantGrid, SolveOutput)> {
        let (rows, cols) = weight.dim();
        self.config.validate(rows, cols)?;
        let w32 = widen(weight)?;
        match &self.backend {
            Backend::Cpu => {
                let grid = grid::build_quant_grid(weight, &self.config)?;
                let out = solve_cpu(w32.view(), hinv_factor, &grid, perm)?;
                Ok((grid, out))
            }
            Backend::Gpu(dev) => {
                let dw = DeviceWeight::upload(dev, WeightView::F32(w32.view()))?;
                let dgrid = gpu::build_quant_grid_device(dev, &dw, &self.config)?;
                let grid = dgrid.to_host(dev)?;
                validate_inputs(w32.view(), hinv_factor, &grid, perm)?;
                let factor = DeviceFactor::upload(dev, hinv_factor, perm)?;
                let mut ws = SolveWorkspace::new(dev, rows, cols)?;
                gpu::launch_solve(dev, &dw, &factor, &dgrid, &mut ws)?;
                Ok((grid, ws.output().to_host(dev)?))
            }
        }
    }
}

/// The weight as f32 (the solver's working precision), NaN/inf rejected.
pub fn widen(weight: WeightView<'_>) -> Result<Array2<f32>> {
    let (rows, cols) = weight.dim();
    let mut out = Array2::zeros((rows, cols));
    for r in 0..rows {
        let mut row = out.row_mut(r);
        let slice = row.as_slice_mut().ok_or_else(|| crate::ForgeError::Shape("non-contiguous f32 buffer".into()))?;
        weight.read_row_f32(r, slice)?;
    }
    Ok(out)
}
