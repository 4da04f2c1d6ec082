//! Host side of the GPU solver: `gptq_expand_meta` (decoded scales, column groups) and
//! `gptq_permute_weight_*` once, then per panel of `SOLVER_PANEL` (512) columns
//! `gptq_panel_r16/_r32` (the column-by-column recurrence) and, except after the last,
//! `gptq_trailing_update` (the panel's errors applied to all later columns):
//! 2·⌈C/512⌉ + 1 launches for the whole layer, none per column (docs/kernels.md §4).
//!
//! Inputs stay on the device and are passed by reference ([`WeightRef`] in any stored dtype,
//! widened by the permute kernel; [`FactorRef`], `U` padded to a multiple of 128 columns;
//! [`GridRef`], read in place). Device memory beyond inputs and outputs
//! ([`SolveWorkspace`], grown to the largest layer and reused): the permuted working weights
//! (`Rp × Cp` f32), the errors (`Cp × Rp` f32), 8 bytes per grid record and 4 per column,
//! `Rp`, `Cp` = rows and columns rounded up to 128.

use super::{validate_inputs, SolveOutput};
use crate::device::{grid_for, DeviceBuf, DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::grid::{DeviceGrid, DeviceWeight, GridRef, WeightRef};
use crate::{ForgeError, QuantGrid, Result, WeightDtype, WeightView};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, LaunchConfig};
use forge_kernel_abi::solver::{
    ExpandMetaArgs, PanelArgs, PermuteArgs, RowErrorArgs, ScaleZero, SolverSharedLayout, TrailingArgs,
    ROW_ERROR_THREADS, SOLVER_PANEL, SOLVER_THREADS, TRAILING_STAGES,
};
use forge_kernel_abi::{
    DevPtr, DevPtrMut, GptqExpandMeta, GptqPanelR16, GptqPanelR32, GptqPermuteWeightBf16, GptqPermuteWeightF16,
    GptqPermuteWeightF32, GptqPermuteWeightFp8, GptqRowErrorBf16, GptqRowErrorF16, GptqRowErrorF32, GptqRowErrorFp8,
    GptqTrailingUpdate, Kernel,
};
use ndarray::{Array1, Array2, ArrayView2};

/// Enqueues per-row `(Σ ((q − z)·s − x)², Σ x²)` of a solved weight into `sums` (`2·rows`
/// f64) on the compute stream: the host error pass's sums bit for bit (kernels-gpu
/// `solver/row_error.rs`), so a relative weight error needs neither the codes nor a second
/// read of the weight on the host.
///
/// # Safety
/// `weight` holds `rows·cols` elements of its dtype, `codes` `rows·cols` bytes and `grid`
/// its `rows·n_groups` records, all written before this on the compute stream; `sums` has
/// room for `2·rows` f64.
pub unsafe fn launch_row_error(
    dev: &GpuDevice,
    weight: WeightRef,
    codes: DevPtr<u8>,
    grid: GridRef,
    sums: DevPtrMut<f64>,
) -> Result<()> {
    let (rows, cols, gs) = (weight.rows, weight.cols, grid.group_size);
    if grid.rows != rows || gs == 0 || grid.n_groups != cols.div_ceil(gs) {
        return Err(ForgeError::Shape(format!(
            "row error inputs disagree: weight {rows}×{cols}, grid {}×{} (gs {gs})",
            grid.rows, grid.n_groups
        )));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let too_big = |n: usize| u32::try_from(n).is_err();
    if too_big(rows.saturating_mul(grid.n_groups)) || too_big(rows) || too_big(cols) {
        return Err(ForgeError::Shape(format!("{rows}×{cols} exceeds the row-error kernel's u32 indexing")));
    }
    let rows_per_block = (ROW_ERROR_THREADS / 8) as usize;
    let blocks = rows.div_ceil(rows_per_block).min(65_535) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (ROW_ERROR_THREADS, 1, 1), shared_mem_bytes: 0 };
    let args = RowErrorArgs {
        w: weight.bytes,
        codes,
        qmeta: grid.qmeta,
        rows: rows as u32,
        cols: cols as u32,
        gs: gs as u32,
        n_groups: grid.n_groups as u32,
        scale_dtype: grid.scale_dtype.to_u32(),
        sums,
    };
    // SAFETY: the caller's contract covers the buffers; ROW_ERROR_THREADS per block, the
    // kernel strides over rows.
    unsafe {
        match weight.dtype {
            WeightDtype::F32 => dev.launch::<GptqRowErrorF32>(cfg, &args),
            WeightDtype::F16 => dev.launch::<GptqRowErrorF16>(cfg, &args),
            WeightDtype::BF16 => dev.launch::<GptqRowErrorBf16>(cfg, &args),
            WeightDtype::Fp8E4M3 => dev.launch::<GptqRowErrorFp8>(cfg, &args),
        }
    }
}

/// Rows and columns are padded to the trailing update's 128-wide tiles.
pub fn padded(n: usize) -> usize {
    n.div_ceil(128) * 128
}

/// The factor `U` of the (permuted) inverse Hessian and the column order, on the device,
/// padded to `cols_p = ceil(cols/128)·128` (identity on the padded diagonal, so padded
/// columns never touch real ones).
pub struct DeviceFactor {
    u: CudaSlice<f32>,
    perm: CudaSlice<u32>,
    cols: usize,
    cols_p: usize,
}

/// A factor on the device by address: `u` `cols_p × cols_p` f32 (upper triangle, identity in
/// the padding), `perm` `cols_p` entries (a permutation of `0..cols` first, then zeros).
#[derive(Clone, Copy)]
pub struct FactorRef {
    /// The padded factor.
    pub u: DevPtr<f32>,
    /// The padded column order.
    pub perm: DevPtr<u32>,
    /// Columns.
    pub cols: usize,
    /// Padded columns (`padded(cols)`).
    pub cols_p: usize,
}

impl DeviceFactor {
    /// Uploads `U` (`cols × cols`, upper triangle read) and the optional act-order, padded on
    /// the host row by row.
    pub fn upload(dev: &GpuDevice, hinv_factor: ArrayView2<'_, f32>, perm: Option<&[usize]>) -> Result<Self> {
        let cols = hinv_factor.nrows();
        if hinv_factor.ncols() != cols || cols == 0 {
            return Err(ForgeError::Shape(format!(
                "hinv_factor is {:?}, expected a non-empty square matrix",
                hinv_factor.dim()
            )));
        }
        if let Some(p) = perm {
            super::check_permutation(p, cols)?;
        }
        let cols_p = padded(cols);
        let u = padded_factor(hinv_factor, cols_p)?;
        let perm = padded_perm(perm, cols, cols_p);
        let mut d_u = dev.alloc::<f32>(cols_p * cols_p, "the factor")?;
        let mut d_perm = dev.alloc::<u32>(cols_p, "the column order")?;
        let stream = dev.stream();
        stream.memcpy_htod(&u, &mut d_u).map_err(ForgeError::driver("uploading the factor"))?;
        stream.memcpy_htod(&perm, &mut d_perm).map_err(ForgeError::driver("uploading the column order"))?;
        Ok(DeviceFactor { u: d_u, perm: d_perm, cols, cols_p })
    }

    /// By address.
    pub fn as_ref(&self) -> FactorRef {
        FactorRef { u: self.u.dev_ptr(), perm: self.perm.dev_ptr(), cols: self.cols, cols_p: self.cols_p }
    }

    /// Buffers for a factor of `cols` columns (zeroed: fill them before use), with the column
    /// order `perm` uploaded.
    pub(crate) fn alloc(dev: &GpuDevice, cols: usize, perm: Option<&[usize]>) -> Result<Self> {
        let cols_p = padded(cols);
        let u = dev.alloc::<f32>(cols_p * cols_p, "the factor")?;
        let mut d_perm = dev.alloc::<u32>(cols_p, "the column order")?;
        dev.stream()
            .memcpy_htod(&padded_perm(perm, cols, cols_p), &mut d_perm)
            .map_err(ForgeError::driver("uploading the column order"))?;
        Ok(DeviceFactor { u, perm: d_perm, cols, cols_p })
    }

    /// Write address of the padded `U`.
    pub(crate) fn u_mut(&mut self) -> DevPtrMut<f32> {
        self.u.dev_ptr_mut()
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `U` (`cols × cols`, the padding dropped) on the host.
    pub fn to_host(&self, dev: &GpuDevice) -> Result<Array2<f32>> {
        let all = dev.stream().clone_dtoh(&self.u).map_err(ForgeError::driver("downloading the factor"))?;
        let (n, np) = (self.cols, self.cols_p);
        Ok(Array2::from_shape_fn((n, n), |(i, j)| all[i * np + j]))
    }
}

/// `U` (`cols × cols`, upper triangle read) in the solver's `cols_p × cols_p` layout, identity
/// in the padding; rows copied as slices in parallel.
pub(crate) fn padded_factor(hinv_factor: ArrayView2<'_, f32>, cols_p: usize) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    let cols = hinv_factor.nrows();
    let std = hinv_factor.as_standard_layout();
    let src = std.as_slice().ok_or_else(|| ForgeError::Internal("standard layout is not contiguous".into()))?;
    let mut u = vec![0f32; cols_p * cols_p];
    u.par_chunks_mut(cols_p).enumerate().for_each(|(t, row)| {
        if t < cols {
            row[t..cols].copy_from_slice(&src[t * cols + t..(t + 1) * cols]);
        } else {
            row[t] = 1.0;
        }
    });
    Ok(u)
}

/// The column order padded to `cols_p` entries (identity without act-order, zeros past `cols`).
pub(crate) fn padded_perm(perm: Option<&[usize]>, cols: usize, cols_p: usize) -> Vec<u32> {
    (0..cols_p).map(|t| if t < cols { perm.map_or(t, |p| p[t]) as u32 } else { 0 }).collect()
}

/// Where a solve writes its results (device addresses): `codes` and `dequant` `rows·cols`
/// (original column order), `loss` `rows`.
#[derive(Clone, Copy)]
pub struct SolveOutputs {
    /// Codes.
    pub codes: DevPtrMut<u8>,
    /// Dequantized weight.
    pub dequant: DevPtrMut<f32>,
    /// GPTQ loss per row.
    pub loss: DevPtrMut<f32>,
}

/// Solver outputs on the device.
pub struct DeviceSolveOutput<'a> {
    ws: &'a SolveWorkspace,
}

impl DeviceSolveOutput<'_> {
    /// Downloads into a host [`SolveOutput`]; a non-finite loss (the working weights
    /// overflowed) is an error, as on the CPU.
    pub fn to_host(&self, dev: &GpuDevice) -> Result<SolveOutput> {
        let (rows, cols) = (self.ws.rows, self.ws.cols);
        let s = dev.stream();
        let n = rows * cols;
        let codes =
            s.clone_dtoh(&self.ws.codes.get(n)?.slice(0..n)).map_err(ForgeError::driver("downloading codes"))?;
        let deq =
            s.clone_dtoh(&self.ws.dequant.get(n)?.slice(0..n)).map_err(ForgeError::driver("downloading dequant"))?;
        let loss = s
            .clone_dtoh(&self.ws.loss.get(rows)?.slice(0..rows))
            .map_err(ForgeError::driver("downloading the loss"))?;
        solve_output_from_host(rows, cols, codes, deq, loss)
    }
}

/// A device solve's per-row loss, checked: a non-finite entry means the working weights
/// overflowed, a [`ForgeError::NonFinite`] naming the row.
pub(crate) fn check_loss_finite(loss: &[f32]) -> Result<()> {
    match loss.iter().position(|l| !l.is_finite()) {
        None => Ok(()),
        Some(row) => Err(ForgeError::NonFinite {
            tensor: "GPTQ loss (working weights overflowed)",
            row,
            col: 0,
            value: loss[row],
        }),
    }
}

/// Host vectors of a finished solve as a [`SolveOutput`]; a non-finite loss is an error.
pub(crate) fn solve_output_from_host(
    rows: usize,
    cols: usize,
    codes: Vec<u8>,
    dequant: Vec<f32>,
    loss: Vec<f32>,
) -> Result<SolveOutput> {
    check_loss_finite(&loss)?;
    let shape = (rows, cols);
    Ok(SolveOutput {
        qweight: Array2::from_shape_vec(shape, codes).map_err(|e| ForgeError::Internal(e.to_string()))?,
        dequant: Array2::from_shape_vec(shape, dequant).map_err(|e| ForgeError::Internal(e.to_string()))?,
        loss: Array1::from(loss),
        warnings: Vec::new(),
    })
}

/// Device buffers of the solve, grown to the largest layer asked for and reused (batches
/// and the engine allocate once): its own outputs (for [`launch_solve`]) and the internal
/// working weights, errors and tables.
pub struct SolveWorkspace {
    codes: DeviceBuf<u8>,
    dequant: DeviceBuf<f32>,
    loss: DeviceBuf<f32>,
    /// Permuted working weights, `(rows_p, cols_p)`.
    w_work: DeviceBuf<f32>,
    /// Errors, column-major `(cols_p, rows_p)`; rows past `rows` stay zero.
    err: DeviceBuf<f32>,
    /// Decoded `(scale, zero)` of every grid record ([`ScaleZero`], two u32 each).
    scale_zero: DeviceBuf<u32>,
    /// Group of every permuted column, `cols_p` entries.
    group_of: DeviceBuf<u32>,
    rows: usize,
    cols: usize,
    panel: u32,
}

/// The smallest group size a grid may have (validated with the grid).
const MIN_GROUP_SIZE: usize = 32;

impl SolveWorkspace {
    /// Buffers for a `rows × cols` layer.
    pub fn new(dev: &GpuDevice, rows: usize, cols: usize) -> Result<Self> {
        let mut ws = SolveWorkspace::empty();
        ws.ensure(dev, rows, cols)?;
        Ok(ws)
    }

    /// No buffers yet (the first [`SolveWorkspace::ensure`] makes them).
    pub fn empty() -> Self {
        SolveWorkspace {
            codes: DeviceBuf::default(),
            dequant: DeviceBuf::default(),
            loss: DeviceBuf::default(),
            w_work: DeviceBuf::default(),
            err: DeviceBuf::default(),
            scale_zero: DeviceBuf::default(),
            group_of: DeviceBuf::default(),
            rows: 0,
            cols: 0,
            panel: SOLVER_PANEL,
        }
    }

    /// Makes room for a `rows × cols` layer (growing buffers only when this is the largest
    /// seen) and sets it as the current shape. The caller guarantees no queued work on
    /// another stream still reads a buffer that grows.
    pub fn ensure(&mut self, dev: &GpuDevice, rows: usize, cols: usize) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Err(ForgeError::Shape(format!("a {rows}×{cols} layer has nothing to solve")));
        }
        let (rows_p, cols_p) = (padded(rows), padded(cols));
        let big = |a: usize, b: usize| {
            a.checked_mul(b).ok_or_else(|| ForgeError::Shape(format!("a {rows}×{cols} layer is too large")))
        };
        let (n, np) = (big(rows, cols)?, big(rows_p, cols_p)?);
        let records = big(2 * rows, cols.div_ceil(MIN_GROUP_SIZE))?;
        self.codes.ensure(dev, n, "solver codes")?;
        self.dequant.ensure(dev, n, "solver dequantized weight")?;
        self.loss.ensure(dev, rows, "solver loss")?;
        self.w_work.ensure(dev, np, "solver working weights")?;
        self.err.ensure(dev, np, "solver errors")?;
        self.scale_zero.ensure(dev, records, "solver decoded grid")?;
        self.group_of.ensure(dev, cols_p, "solver column groups")?;
        self.rows = rows;
        self.cols = cols;
        Ok(())
    }

    /// Sets the panel width (a multiple of 128 up to 1024; default `SOLVER_PANEL`): wider
    /// panels move work from the trailing update into the column-by-column kernel. For tuning.
    pub fn set_panel(&mut self, panel: u32) -> Result<()> {
        if panel == 0 || panel > 1024 || !panel.is_multiple_of(128) {
            return Err(ForgeError::Config(format!("solver panel {panel} is not a multiple of 128 in 128..=1024")));
        }
        self.panel = panel;
        Ok(())
    }

    /// The outputs of the last [`launch_solve`].
    pub fn output(&self) -> DeviceSolveOutput<'_> {
        DeviceSolveOutput { ws: self }
    }

    /// The workspace's own dequantized-weight buffer (the solve always writes one; callers
    /// that do not want it point the solve here).
    pub fn dequant_scratch(&self) -> Result<DevPtrMut<f32>> {
        Ok(self.dequant.get(self.rows * self.cols)?.clone_ptr_mut())
    }

    /// The workspace's own output buffers for the current shape.
    fn own_outputs(&mut self) -> Result<SolveOutputs> {
        let (n, rows) = (self.rows * self.cols, self.rows);
        Ok(SolveOutputs {
            codes: self.codes.get(n)?.clone_ptr_mut(),
            dequant: self.dequant.get(n)?.clone_ptr_mut(),
            loss: self.loss.get(rows)?.clone_ptr_mut(),
        })
    }
}

/// A write address of a buffer the caller holds by shared reference (the workspace's own
/// outputs, written only by kernels this module enqueues).
trait ClonePtrMut<T> {
    fn clone_ptr_mut(&self) -> DevPtrMut<T>;
}

impl<T> ClonePtrMut<T> for CudaSlice<T> {
    fn clone_ptr_mut(&self) -> DevPtrMut<T> {
        DevPtrMut::from_addr(self.dev_ptr().addr())
    }
}

/// Rows per solver block: 16 while two blocks per SM cover the rows in one wave, else 32
/// (half the blocks; the same two per SM).
fn rows_per_block(dev: &GpuDevice, rows: usize) -> Result<u32> {
    let sms = dev.sm_count()? as usize;
    Ok(if rows.div_ceil(16) <= 2 * sms { 16 } else { 32 })
}

/// Enqueues the fused solve of `weight` with `factor` and the device-resident `grid` into the
/// workspace's own outputs ([`SolveWorkspace::output`]). Shapes are checked here; value
/// checks (finite inputs, positive diagonal) are the callers' (see [`solve_gpu`]).
pub fn launch_solve(
    dev: &GpuDevice,
    weight: &DeviceWeight,
    factor: &DeviceFactor,
    grid: &DeviceGrid,
    ws: &mut SolveWorkspace,
) -> Result<()> {
    let (rows, cols) = weight.dim();
    ws.ensure(dev, rows, cols)?;
    let out = ws.own_outputs()?;
    launch_solve_into(dev, weight.as_ref(), factor.as_ref(), grid.as_ref(), ws, out)
}

/// Enqueues the fused solve on the compute stream, writing `out`: the engine's entry point
/// (inputs and outputs by address, workspace grown to fit). The weight may be in any stored
/// dtype (the permute kernel widens it exactly).
pub fn launch_solve_into(
    dev: &GpuDevice,
    weight: WeightRef,
    factor: FactorRef,
    grid: GridRef,
    ws: &mut SolveWorkspace,
    out: SolveOutputs,
) -> Result<()> {
    let (rows, cols) = (weight.rows, weight.cols);
    let gs = grid.group_size;
    if factor.cols != cols || factor.cols_p != padded(cols) || grid.rows != rows || grid.n_groups != cols.div_ceil(gs) {
        return Err(ForgeError::Shape(format!(
            "solver inputs disagree: weight {rows}×{cols}, factor {} (padded {}), grid {}×{} (gs {gs})",
            factor.cols, factor.cols_p, grid.rows, grid.n_groups
        )));
    }
    if gs < MIN_GROUP_SIZE {
        return Err(ForgeError::GroupSize(gs));
    }
    ws.ensure(dev, rows, cols)?;
    let (cols_p, rows_p) = (factor.cols_p, padded(rows));
    if rows_p > u32::MAX as usize / cols_p.max(1) {
        return Err(ForgeError::Shape(format!("{rows}×{cols} exceeds the solver's u32 indexing")));
    }
    let stream = dev.stream();
    let (r, c, cp, rp) = (rows as u32, cols as u32, cols_p as u32, rows_p as u32);
    // SAFETY: `out.loss` holds `rows` f32 (the caller's contract).
    unsafe { cudarc::driver::result::memset_d8_async(out.loss.addr(), 0, rows * 4, stream.cu_stream()) }
        .map_err(ForgeError::driver("clearing the loss"))?;

    // Decoded grid records and the group of every permuted column, read by the panels.
    let n_records = rows * grid.n_groups;
    let args = ExpandMetaArgs {
        qmeta: grid.qmeta,
        n_records: n_records as u32,
        scale_dtype: grid.scale_dtype.to_u32(),
        perm: factor.perm,
        cols: c,
        cols_p: cp,
        gs: gs as u32,
        scale_zero: ws.scale_zero.get(2 * n_records)?.clone_ptr_mut().cast::<ScaleZero>(),
        group_of: ws.group_of.get(cols_p)?.clone_ptr_mut(),
    };
    // SAFETY: qmeta has rows·n_groups records and scale_zero room for as many (ensured for
    // the smallest group size); perm and group_of have cols_p entries; gs > 0.
    unsafe { dev.launch::<GptqExpandMeta>(grid_for(n_records.max(cols_p), 256), &args) }?;

    // Permuted working weights, widened from the stored dtype.
    let w_work = ws.w_work.get(rows_p * cols_p)?.clone_ptr_mut();
    let args = PermuteArgs { w: weight.bytes, perm: factor.perm, rows: r, cols: c, rows_p: rp, cols_p: cp, w_work };
    let permute_cfg =
        LaunchConfig { grid_dim: (cp.div_ceil(256), rp.min(4096), 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: w is rows·cols elements of its dtype, perm cols_p entries, w_work rows_p·cols_p;
    // 256 threads per block and gridDim.x·256 ≥ cols_p.
    unsafe {
        match weight.dtype {
            WeightDtype::F32 => dev.launch::<GptqPermuteWeightF32>(permute_cfg, &args),
            WeightDtype::F16 => dev.launch::<GptqPermuteWeightF16>(permute_cfg, &args),
            WeightDtype::BF16 => dev.launch::<GptqPermuteWeightBf16>(permute_cfg, &args),
            WeightDtype::Fp8E4M3 => dev.launch::<GptqPermuteWeightFp8>(permute_cfg, &args),
        }
    }?;

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

    let err_t = ws.err.get(rows_p * cols_p)?.clone_ptr_mut();
    let (scale_zero, group_of) = (args_scale_zero(ws, n_records)?, ws.group_of.get(cols_p)?.dev_ptr());
    let mut p0 = 0u32;
    while p0 < cp {
        let p1 = (p0 + ws.panel).min(cp);
        let args = PanelArgs {
            w_work: w_work.as_const(),
            p0,
            p1,
            u: factor.u,
            perm: factor.perm,
            group_of,
            scale_zero,
            rows: r,
            cols: c,
            cols_p: cp,
            n_groups: grid.n_groups as u32,
            bits: grid.maxq.count_ones(),
            rows_p: rp,
            codes: out.codes,
            deq: out.dequant,
            err_t,
            loss: out.loss,
        };
        // SAFETY: buffer sizes checked above against the kernel's contract; p0 < p1 ≤ cols_p,
        // multiples of 128; the factor is padded with an identity diagonal (FactorRef's
        // contract); shared memory sized by the layout function the kernel uses.
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
            let args = TrailingArgs { w_work, err_t: err_t.as_const(), u: factor.u, rows_p: rp, cols_p: cp, p0, p1 };
            // SAFETY: w_work rows_p·cols_p, err cols_p·rows_p, u cols_p·cols_p; all multiples
            // of 128; the grid covers columns p1..cols_p and rows 0..rows_p.
            unsafe { dev.launch::<GptqTrailingUpdate>(cfg, &args) }?;
        }
        p0 = p1;
    }
    Ok(())
}

fn args_scale_zero(ws: &SolveWorkspace, n_records: usize) -> Result<DevPtr<ScaleZero>> {
    Ok(ws.scale_zero.get(2 * n_records)?.dev_ptr().cast::<ScaleZero>())
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
