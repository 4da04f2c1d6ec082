//! Quantizing one layer, the job every front end runs: a [`Quantizer`] holds the format
//! ([`GridConfig`]) and a [`Backend`]; `build_quant_grid`, `solve` and `quantize_from_hinv`
//! run on either. [`quantize_from_hinv`](Quantizer::quantize_from_hinv) is the one
//! orchestration path of grid + factor + solve: on the CPU the references ([`cpu`]), on the
//! device the per-device [`QuantEngine`] (weight uploaded once in its stored dtype, pre-step,
//! grid and solve on the device, only codes, qmeta and loss back), which the calibration layer
//! and the example use too.

pub(crate) mod cpu;
pub(crate) mod engine;
pub mod output;

pub use engine::{
    with_engine, EngineFootprint, EngineStats, FootprintTracker, HessianInput, JobShape, LayerJob, LayerOutcome,
    LayerTimings, PreStepSummary, QuantEngine, QuantizedWeight, Ticket, WeightShape, DEVICE_RESERVE,
};

use crate::device::GpuDevice;
use crate::grid::{self, GridConfig, QuantGrid};
use crate::solver::{self, SolveOutput};
use crate::{budget, Result, WeightView};
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
            Backend::Gpu(dev) => grid::build_quant_grid_gpu(dev, weight, &self.config),
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
            Backend::Cpu => solver::solve_cpu(weight, hinv_factor, grid, perm),
            Backend::Gpu(dev) => {
                let mut out = solver::solve_gpu(dev, weight, hinv_factor, grid, perm)?;
                // solve_cpu reports these itself; the device solve leaves them to the host.
                out.warnings.extend(solver::flushed_groups(weight, out.dequant.view(), grid.group_size)?);
                Ok(out)
            }
        }
    }

    /// Grid, then solve (the one orchestration path). On the GPU the weight is uploaded once
    /// and the grid never leaves the device until the end.
    pub fn quantize_from_hinv(
        &self,
        weight: WeightView<'_>,
        hinv_factor: ArrayView2<'_, f32>,
        perm: Option<&[usize]>,
    ) -> Result<(QuantGrid, SolveOutput)> {
        let (rows, cols) = weight.dim();
        self.config.validate(rows, cols)?;
        match &self.backend {
            Backend::Cpu => cpu::grid_and_solve(&self.config, weight, hinv_factor, perm),
            Backend::Gpu(dev) => {
                // The device engine: the weight uploaded once in its stored dtype (checked by
                // the grid kernel), the factor checked on the host before any device work.
                let u = hinv_factor.view();
                let mut job = LayerJob::new(weight.reborrow(), HessianInput::Factor { u, perm }, &self.config);
                job.want_dequant = true;
                let mut out = with_engine(dev, |e| e.quantize(&job))?;
                let w =
                    out.weights.pop().ok_or_else(|| crate::ForgeError::Internal("engine returned no weight".into()))?;
                let dequant = w.dequant.ok_or_else(|| crate::ForgeError::Internal("dequant not downloaded".into()))?;
                let _ = cols;
                // The device solve leaves flushed groups to the host (solve_cpu reports them).
                let warnings =
                    solver::flushed_groups_of(weight, dequant.view(), w.grid.group_size)?.into_iter().collect();
                Ok((w.grid, SolveOutput { qweight: w.codes, dequant, loss: w.loss, warnings }))
            }
        }
    }
}

/// The weight as f32 (the solver's working precision), NaN/inf rejected; the copy is checked
/// against the host budget first.
pub fn widen(weight: WeightView<'_>) -> Result<Array2<f32>> {
    let (rows, cols) = weight.dim();
    budget::Request::new().array::<f32>(&[rows, cols]).check(&format!("an f32 copy of a {rows}×{cols} weight"))?;
    let mut out = Array2::zeros((rows, cols));
    for r in 0..rows {
        let mut row = out.row_mut(r);
        let slice =
            row.as_slice_mut().ok_or_else(|| crate::ForgeError::Internal("non-contiguous f32 buffer".into()))?;
        weight.read_row_f32(r, slice)?;
    }
    Ok(out)
}
