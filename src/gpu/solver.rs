//! Host side of the fused GPU solver (`gptq_solve_r16` / `gptq_solve_r32`).
//!
//! Inputs stay on the device: the weight ([`DeviceWeight`], f32), the factor and act-order
//! ([`DeviceFactor`], padded to a multiple of 64 columns), the grid ([`DeviceGrid`], read in
//! place). Device memory beyond inputs and outputs: one `Cp × Rp` f32 error workspace
//! (`Cp`, `Rp`: columns and rows rounded up to 64 and 32).

use super::{DeviceGrid, DeviceWeight, GpuDevice};
use crate::solver::{validate_inputs, SolveOutput};
use crate::{ForgeError, QuantGrid, Result, WeightDtype, WeightView};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use forge_numerics::{SolverSharedLayout, SOLVER_BLOCK, SOLVER_THREADS};
use ndarray::{Array1, Array2, ArrayView2};

/// The factor `U` of the (permuted) inverse Hessian and the column order, on the device,
/// padded to `cols_p = ceil(cols/64)·64` (identity on the padded diagonal, so padded
/// columns never touch real ones).
pub struct DeviceFactor {
    u: CudaSlice<f32>,
    perm: CudaSlice<u32>,
    cols: usize,
    cols_p: usize,
}

impl DeviceFactor {
    /// Uploads `U` (`cols × cols`, upper triangle read) and the optional act-order.
    pub fn upload(dev: &GpuDevice, hinv_factor: ArrayView2<'_, f32>, perm: Option<&[usize]>) -> Result<Self> {
        let cols = hinv_factor.nrows();
        if hinv_factor.ncols() != cols || cols == 0 {
            return Err(ForgeError::Shape(format!("hinv_factor is {:?}, expected a non-empty square matrix", hinv_factor.dim())));
        }
        if let Some(p) = perm {
            crate::solver::check_permutation(p, cols)?;
        }
        let cols_p = cols.div_ceil(SOLVER_BLOCK as usize) * SOLVER_BLOCK as usize;
        let mut u = vec![0f32; cols_p * cols_p];
        for t in 0..cols_p {
            if t < cols {
                for k in t..cols {
                    u[t * cols_p + k] = hinv_factor[[t, k]];
                }
            } else {
                u[t * cols_p + t] = 1.0;
            }
        }
        let perm: Vec<u32> = (0..cols_p).map(|t| if t < cols { perm.map_or(t, |p| p[t]) as u32 } else { 0 }).collect();
        let stream = dev.stream();
        Ok(DeviceFactor {
            u: stream.clone_htod(&u).map_err(ForgeError::driver("uploading the factor"))?,
            perm: stream.clone_htod(&perm).map_err(ForgeError::driver("uploading the column order"))?,
            cols,
            cols_p,
        })
    }
}

/// Solver outputs on the device.
pub struct DeviceSolveOutput {
    /// `(rows, cols)` codes, original column order.
    pub codes: CudaSlice<u8>,
    /// `(rows, cols)` dequantized weight, original column order.
    pub dequant: CudaSlice<f32>,
    /// GPTQ loss per row.
    pub loss: CudaSlice<f32>,
    rows: usize,
    cols: usize,
}

impl DeviceSolveOutput {
    /// Downloads into a host [`SolveOutput`]; a non-finite loss (the working weights
    /// overflowed) is an error, as on the CPU.
    pub fn to_host(&self, dev: &GpuDevice) -> Result<SolveOutput> {
        let s = dev.stream();
        let codes = s.clone_dtoh(&self.codes).map_err(ForgeError::driver("downloading codes"))?;
        let deq = s.clone_dtoh(&self.dequant).map_err(ForgeError::driver("downloading dequant"))?;
        let loss = s.clone_dtoh(&self.loss).map_err(ForgeError::driver("downloading the loss"))?;
        if let Some(row) = loss.iter().position(|l| !l.is_finite()) {
            return Err(ForgeError::NonFinite { tensor: "GPTQ loss (working weights overflowed)", row, col: 0, value: loss[row] });
        }
        let shape = (self.rows, self.cols);
        Ok(SolveOutput {
            qweight: Array2::from_shape_vec(shape, codes).map_err(|e| ForgeError::Shape(e.to_string()))?,
            dequant: Array2::from_shape_vec(shape, deq).map_err(|e| ForgeError::Shape(e.to_string()))?,
            loss: Array1::from(loss),
        })
    }
}

/// Reusable device buffers of one solve shape (outputs and the error workspace), so batches
/// of same-shape layers allocate once.
pub struct SolveWorkspace {
    out: DeviceSolveOutput,
    /// Errors, column-major `(cols_p, rows_p)`; rows past `rows` stay zero.
    err: CudaSlice<f32>,
    cols_p: usize,
    rows_p: usize,
}

impl SolveWorkspace {
    /// Buffers for a `rows × cols` layer.
    pub fn new(dev: &GpuDevice, rows: usize, cols: usize) -> Result<Self> {
        let s = dev.stream();
        let cols_p = cols.div_ceil(SOLVER_BLOCK as usize) * SOLVER_BLOCK as usize;
        let rows_p = rows.div_ceil(32) * 32;
        let alloc = ForgeError::driver("allocating solver buffers");
        Ok(SolveWorkspace {
            out: DeviceSolveOutput {
                codes: s.alloc_zeros::<u8>(rows * cols).map_err(alloc)?,
                dequant: s.alloc_zeros::<f32>(rows * cols).map_err(ForgeError::driver("allocating solver buffers"))?,
                loss: s.alloc_zeros::<f32>(rows).map_err(ForgeError::driver("allocating solver buffers"))?,
                rows,
                cols,
            },
            err: s.alloc_zeros::<f32>(rows_p * cols_p).map_err(ForgeError::driver("allocating solver buffers"))?,
            cols_p,
            rows_p,
        })
    }

    /// The outputs of the last solve.
    pub fn output(&self) -> &DeviceSolveOutput {
        &self.out
    }

    /// Takes the outputs, dropping the workspace.
    pub fn into_output(self) -> DeviceSolveOutput {
        self.out
    }
}

/// Rows per solver block: 32 (half the factor traffic per row) once that gives the SMs
/// 1.5 blocks each, else 16 (more blocks to hide latency). Measured on an H200: 32 rows won
/// at 7168×2048, 16 at 4096×4096 (see the issue notes).
fn rows_per_block(dev: &GpuDevice, rows: usize) -> Result<u32> {
    let sms = dev.sm_count()? as usize;
    Ok(if 2 * rows.div_ceil(32) >= 3 * sms { 32 } else { 16 })
}

/// Enqueues the fused solve of `weight` (f32) with `factor` and the device-resident `grid`
/// into `ws`. Shapes are checked here; value checks (finite inputs, positive diagonal) are
/// the callers' (see [`solve_gpu`]).
pub fn launch_solve(dev: &GpuDevice, weight: &DeviceWeight, factor: &DeviceFactor, grid: &DeviceGrid, ws: &mut SolveWorkspace) -> Result<()> {
    let (rows, cols) = weight.dim();
    if weight.dtype() != WeightDtype::F32 {
        return Err(ForgeError::Dtype(format!("{:?} weights for the solver (it works on f32)", weight.dtype())));
    }
    let gs = grid.group_size;
    if factor.cols != cols || grid.rows != rows || grid.n_groups != cols.div_ceil(gs) || ws.out.rows != rows || ws.out.cols != cols || ws.cols_p != factor.cols_p {
        return Err(ForgeError::Shape(format!(
            "solver inputs disagree: weight {rows}×{cols}, factor {}, grid {}×{} (gs {gs}), workspace {}×{}",
            factor.cols, grid.rows, grid.n_groups, ws.out.rows, ws.out.cols
        )));
    }
    if ws.rows_p > u32::MAX as usize / factor.cols_p.max(1) {
        return Err(ForgeError::Shape(format!("{rows}×{cols} exceeds the solver's u32 indexing")));
    }
    let rpc = rows_per_block(dev, rows)?;
    let f = dev.function(if rpc == 32 { "gptq_solve_r32" } else { "gptq_solve_r16" })?;
    let shared = SolverSharedLayout::new(rpc).total;
    // Above the 48 KiB default the block's dynamic shared-memory limit must be raised.
    f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32)
        .map_err(ForgeError::driver("raising the solver's shared-memory limit"))?;
    let cfg = LaunchConfig { grid_dim: (rows.div_ceil(rpc as usize) as u32, 1, 1), block_dim: (SOLVER_THREADS, 1, 1), shared_mem_bytes: shared };
    let (r, c, cp, gs32, ng, bits) = (rows as u32, cols as u32, factor.cols_p as u32, gs as u32, grid.n_groups as u32, grid.maxq.count_ones());
    let rp = ws.rows_p as u32;
    let stream = dev.stream();
    let mut l = stream.launch_builder(&f);
    l.arg(weight.bytes()).arg(&factor.u).arg(&factor.perm).arg(&grid.qmeta);
    l.arg(&r).arg(&c).arg(&cp).arg(&gs32).arg(&ng).arg(&bits).arg(&rp);
    l.arg(&mut ws.out.codes).arg(&mut ws.out.dequant).arg(&mut ws.err).arg(&mut ws.out.loss);
    // SAFETY: buffer sizes checked above against the kernel's contract; the factor was padded
    // with an identity diagonal by DeviceFactor::upload; shared memory sized by the shared
    // layout function the kernel uses.
    unsafe { l.launch(cfg) }.map_err(ForgeError::driver("launching gptq_solve"))?;
    Ok(())
}

/// Solves one layer on the GPU from host arrays (validated exactly as [`crate::solver::solve_cpu`]).
pub fn solve_gpu(dev: &GpuDevice, weight: ArrayView2<'_, f32>, hinv_factor: ArrayView2<'_, f32>, grid: &QuantGrid, perm: Option<&[usize]>) -> Result<SolveOutput> {
    validate_inputs(weight, hinv_factor, grid, perm)?;
    let (rows, cols) = weight.dim();
    let w = DeviceWeight::upload(dev, WeightView::F32(weight))?;
    let factor = DeviceFactor::upload(dev, hinv_factor, perm)?;
    let dgrid = DeviceGrid::upload(dev, grid)?;
    let mut ws = SolveWorkspace::new(dev, rows, cols)?;
    launch_solve(dev, &w, &factor, &dgrid, &mut ws)?;
    ws.output().to_host(dev)
}
