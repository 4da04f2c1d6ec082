//! Host side of the GPU solver: `gptq_expand_meta` (decoded scales, column groups) and
//! `gptq_permute_weight` once, then per panel of `SOLVER_PANEL` (512) columns
//! `gptq_panel_r16/_r32` (the column-by-column recurrence) and, except after the last,
//! `gptq_trailing_update` (the panel's errors applied to all later columns):
//! 2·⌈C/512⌉ + 1 launches for the whole layer, none per column.
//!
//! Inputs stay on the device: the weight ([`DeviceWeight`], f32), the factor and act-order
//! ([`DeviceFactor`], padded to a multiple of 128 columns), the grid ([`DeviceGrid`], read in
//! place). Device memory beyond inputs and outputs: the permuted working weights (`Rp × Cp`
//! f32), the errors (`Cp × Rp` f32), 8 bytes per grid record and 4 per column, `Rp`, `Cp` =
//! rows and columns rounded up to 128.

use super::{validate_inputs, SolveOutput};
use crate::device::{grid_for, DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::grid::{DeviceGrid, DeviceWeight};
use crate::{ForgeError, QuantGrid, Result, WeightDtype, WeightView};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, LaunchConfig};
use forge_kernel_abi::solver::{
    ExpandMetaArgs, PanelArgs, PermuteArgs, ScaleZero, SolverSharedLayout, TrailingArgs, SOLVER_PANEL, SOLVER_THREADS,
    TRAILING_STAGES,
};
use forge_kernel_abi::{GptqExpandMeta, GptqPanelR16, GptqPanelR32, GptqPermuteWeight, GptqTrailingUpdate, Kernel};
use ndarray::{Array1, Array2, ArrayView2};

/// The factor `U` of the (permuted) inverse Hessian and the column order, on the device,
/// padded to `cols_p = ceil(cols/128)·128` (identity on the padded diagonal, so padded
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
            return Err(ForgeError::Shape(format!(
                "hinv_factor is {:?}, expected a non-empty square matrix",
                hinv_factor.dim()
            )));
        }
        if let Some(p) = perm {
            crate::solver::check_permutation(p, cols)?;
        }
        let cols_p = padded(cols);
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
            return Err(ForgeError::NonFinite {
                tensor: "GPTQ loss (working weights overflowed)",
                row,
                col: 0,
                value: loss[row],
            });
        }
        let shape = (self.rows, self.cols);
        Ok(SolveOutput {
            qweight: Array2::from_shape_vec(shape, codes).map_err(|e| ForgeError::Internal(e.to_string()))?,
            dequant: Array2::from_shape_vec(shape, deq).map_err(|e| ForgeError::Internal(e.to_string()))?,
            loss: Array1::from(loss),
            warnings: Vec::new(),
        })
    }
}

/// Reusable device buffers of one solve shape (outputs and the error workspace), so batches
/// of same-shape layers allocate once.
pub struct SolveWorkspace {
    out: DeviceSolveOutput,
    /// Permuted working weights, `(rows_p, cols_p)`.
    w_work: CudaSlice<f32>,
    /// Errors, column-major `(cols_p, rows_p)`; rows past `rows` stay zero.
    err: CudaSlice<f32>,
    cols_p: usize,
    rows_p: usize,
    panel: u32,
    /// Decoded `(scale, zero)` of every grid record ([`ScaleZero`], two u32 each), room for
    /// the smallest group size (32).
    scale_zero: CudaSlice<u32>,
    /// Group of every permuted column, `cols_p` entries.
    group_of: CudaSlice<u32>,
}

/// The smallest group size a grid may have (validated with the grid).
const MIN_GROUP_SIZE: usize = 32;

/// Rows and columns are padded to the trailing update's 128-wide tiles.
fn padded(n: usize) -> usize {
    n.div_ceil(128) * 128
}

impl SolveWorkspace {
    /// Buffers for a `rows × cols` layer.
    pub fn new(dev: &GpuDevice, rows: usize, cols: usize) -> Result<Self> {
        let s = dev.stream();
        let (cols_p, rows_p) = (padded(cols), padded(rows));
        let alloc = ForgeError::driver("allocating solver buffers");
        Ok(SolveWorkspace {
            out: DeviceSolveOutput {
                codes: s.alloc_zeros::<u8>(rows * cols).map_err(alloc)?,
                dequant: s.alloc_zeros::<f32>(rows * cols).map_err(ForgeError::driver("allocating solver buffers"))?,
                loss: s.alloc_zeros::<f32>(rows).map_err(ForgeError::driver("allocating solver buffers"))?,
                rows,
                cols,
            },
            w_work: s.alloc_zeros::<f32>(rows_p * cols_p).map_err(ForgeError::driver("allocating solver buffers"))?,
            err: s.alloc_zeros::<f32>(rows_p * cols_p).map_err(ForgeError::driver("allocating solver buffers"))?,
            cols_p,
            rows_p,
            panel: SOLVER_PANEL,
            scale_zero: s
                .alloc_zeros::<u32>(2 * rows * cols.div_ceil(MIN_GROUP_SIZE))
                .map_err(ForgeError::driver("allocating solver buffers"))?,
            group_of: s.alloc_zeros::<u32>(cols_p).map_err(ForgeError::driver("allocating solver buffers"))?,
        })
    }

    /// Sets the panel width (a multiple of 128 up to 1024; default `SOLVER_PANEL`): wider
    /// panels move work from the trailing update into the column-by-column kernel. For tuning.
    pub fn set_panel(&mut self, panel: u32) -> Result<()> {
        if panel == 0 || panel > 1024 || !panel.is_multiple_of(128) {
            return Err(ForgeError::Shape(format!("solver panel {panel} is not a multiple of 128 in 128..=1024")));
        }
        self.panel = panel;
        Ok(())
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

/// Rows per solver block: 16 while two blocks per SM cover the rows in one wave, else 32
/// (half the blocks; the same two per SM).
fn rows_per_block(dev: &GpuDevice, rows: usize) -> Result<u32> {
    let sms = dev.sm_count()? as usize;
    Ok(if rows.div_ceil(16) <= 2 * sms { 16 } else { 32 })
}

/// Enqueues the fused solve of `weight` (f32) with `factor` and the device-resident `grid`
/// into `ws`. Shapes are checked here; value checks (finite inputs, positive diagonal) are
/// the callers' (see [`solve_gpu`]).
pub fn launch_solve(
    dev: &GpuDevice,
    weight: &DeviceWeight,
    factor: &DeviceFactor,
    grid: &DeviceGrid,
    ws: &mut SolveWorkspace,
) -> Result<()> {
    let (rows, cols) = weight.dim();
    if weight.dtype() != WeightDtype::F32 {
        return Err(ForgeError::Dtype(format!("{:?} weights for the solver (it works on f32)", weight.dtype())));
    }
    let gs = grid.group_size;
    if factor.cols != cols
        || grid.rows != rows
        || grid.n_groups != cols.div_ceil(gs)
        || ws.out.rows != rows
        || ws.out.cols != cols
        || ws.cols_p != factor.cols_p
    {
        return Err(ForgeError::Shape(format!(
            "solver inputs disagree: weight {rows}×{cols}, factor {}, grid {}×{} (gs {gs}), workspace {}×{}",
            factor.cols, grid.rows, grid.n_groups, ws.out.rows, ws.out.cols
        )));
    }
    if ws.rows_p > u32::MAX as usize / factor.cols_p.max(1) {
        return Err(ForgeError::Shape(format!("{rows}×{cols} exceeds the solver's u32 indexing")));
    }
    let stream = dev.stream();
    let (r, c, cp, rp) = (rows as u32, cols as u32, factor.cols_p as u32, ws.rows_p as u32);
    stream.memset_zeros(&mut ws.out.loss).map_err(ForgeError::driver("clearing the loss"))?;

    // Decoded grid records and the group of every permuted column, read by the panels.
    let n_records = rows * grid.n_groups;
    if 2 * n_records > ws.scale_zero.len() {
        return Err(ForgeError::Shape(format!("group size {gs} is below the solver's minimum of {MIN_GROUP_SIZE}")));
    }
    let args = ExpandMetaArgs {
        qmeta: grid.qmeta.dev_ptr(),
        n_records: n_records as u32,
        perm: factor.perm.dev_ptr(),
        cols: c,
        cols_p: cp,
        gs: gs as u32,
        scale_zero: ws.scale_zero.dev_ptr_mut().cast::<ScaleZero>(),
        group_of: ws.group_of.dev_ptr_mut(),
    };
    // SAFETY: qmeta has rows·n_groups records and scale_zero room for as many; perm and
    // group_of have cols_p entries; gs > 0 (validated grid).
    unsafe { dev.launch::<GptqExpandMeta>(grid_for(n_records.max(factor.cols_p), 256), &args) }?;

    // Permuted working weights.
    let args = PermuteArgs {
        w: weight.bytes().dev_ptr().cast::<f32>(),
        perm: factor.perm.dev_ptr(),
        rows: r,
        cols: c,
        rows_p: rp,
        cols_p: cp,
        w_work: ws.w_work.dev_ptr_mut(),
    };
    let permute_cfg =
        LaunchConfig { grid_dim: (cp.div_ceil(256), rp.min(4096), 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: w is rows·cols f32 (dtype checked above), perm cols_p entries, w_work
    // rows_p·cols_p; 256 threads per block and gridDim.x·256 ≥ cols_p.
    unsafe { dev.launch::<GptqPermuteWeight>(permute_cfg, &args) }?;

    let rpc = rows_per_block(dev, rows)?;
    let shared = SolverSharedLayout::new(rpc, ws.panel).total;
    // Above the 48 KiB default the block's dynamic shared-memory limit must be raised.
    let panel_kernel = if rpc == 32 { dev.kernel::<GptqPanelR32>()? } else { dev.kernel::<GptqPanelR16>()? };
    panel_kernel
        .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32)
        .map_err(|source| ForgeError::Launch { kernel: GptqPanelR16::NAME, source })?;
    let panel_cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(rpc as usize) as u32, 1, 1),
        block_dim: (SOLVER_THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    let trailing_shared = TRAILING_STAGES * 16 * 1024;
    dev.kernel::<GptqTrailingUpdate>()?
        .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, trailing_shared as i32)
        .map_err(|source| ForgeError::Launch { kernel: GptqTrailingUpdate::NAME, source })?;

    let mut p0 = 0u32;
    while p0 < cp {
        let p1 = (p0 + ws.panel).min(cp);
        let args = PanelArgs {
            w_work: ws.w_work.dev_ptr(),
            p0,
            p1,
            u: factor.u.dev_ptr(),
            perm: factor.perm.dev_ptr(),
            group_of: ws.group_of.dev_ptr(),
            scale_zero: ws.scale_zero.dev_ptr().cast::<ScaleZero>(),
            rows: r,
            cols: c,
            cols_p: cp,
            n_groups: grid.n_groups as u32,
            bits: grid.maxq.count_ones(),
            rows_p: rp,
            codes: ws.out.codes.dev_ptr_mut(),
            deq: ws.out.dequant.dev_ptr_mut(),
            err_t: ws.err.dev_ptr_mut(),
            loss: ws.out.loss.dev_ptr_mut(),
        };
        // SAFETY: buffer sizes checked above against the kernel's contract; p0 < p1 ≤ cols_p,
        // multiples of 128; the factor was padded with an identity diagonal by
        // DeviceFactor::upload; shared memory sized by the layout function the kernel uses.
        unsafe {
            if rpc == 32 {
                dev.launch::<GptqPanelR32>(panel_cfg, &args)
            } else {
                dev.launch::<GptqPanelR16>(panel_cfg, &args)
            }
        }?;
        if p1 < cp {
            let cfg = LaunchConfig {
                grid_dim: ((cp - p1) / 128, rp / 128, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: trailing_shared,
            };
            let args = TrailingArgs {
                w_work: ws.w_work.dev_ptr_mut(),
                err_t: ws.err.dev_ptr(),
                u: factor.u.dev_ptr(),
                rows_p: rp,
                cols_p: cp,
                p0,
                p1,
            };
            // SAFETY: w_work rows_p·cols_p, err cols_p·rows_p, u cols_p·cols_p; all multiples
            // of 128; the grid covers columns p1..cols_p and rows 0..rows_p.
            unsafe { dev.launch::<GptqTrailingUpdate>(cfg, &args) }?;
        }
        p0 = p1;
    }
    Ok(())
}

/// Solves one layer on the GPU from host arrays (validated exactly as [`crate::solver::solve_cpu`]).
pub fn solve_gpu(
    dev: &GpuDevice,
    weight: ArrayView2<'_, f32>,
    hinv_factor: ArrayView2<'_, f32>,
    grid: &QuantGrid,
    perm: Option<&[usize]>,
) -> Result<SolveOutput> {
    validate_inputs(weight, hinv_factor, grid, perm)?;
    let (rows, cols) = weight.dim();
    let w = DeviceWeight::upload(dev, WeightView::F32(weight))?;
    let factor = DeviceFactor::upload(dev, hinv_factor, perm)?;
    let dgrid = DeviceGrid::upload(dev, grid)?;
    let mut ws = SolveWorkspace::new(dev, rows, cols)?;
    launch_solve(dev, &w, &factor, &dgrid, &mut ws)?;
    ws.output().to_host(dev)
}
