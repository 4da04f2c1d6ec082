//! GPU grid builder: the launchers of the `range_meta_*` and `mse_search_*` kernels, and the
//! whole-tensor qmeta4 decode.
//!
//! Same semantics as [`crate::grid::build_quant_grid`] (the CPU reference): absmax records
//! are bit-identical; the MSE choice is identical except where the two best candidates'
//! losses agree within float tolerance (see `tests/gpu_grid_parity.rs`).

use super::{DecodedQMeta, GridConfig, QuantGrid, ScaleDtype, ScaleSearch};
use crate::device::{grid_for, DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::{ForgeError, Result, WeightDtype, WeightView};
use cudarc::driver::{CudaSlice, LaunchConfig};
use forge_kernel_abi::grid::{MseSearchArgs, MseSharedLayout, RangeMetaArgs};
use forge_kernel_abi::qmeta::QmetaDecodeArgs;
use forge_kernel_abi::{DevPtr, DevPtrMut};
use forge_kernel_abi::{
    MseSearchBf16, MseSearchF16, MseSearchF32, MseSearchFp8, QmetaDecode, RangeMetaBf16, RangeMetaF16, RangeMetaF32,
    RangeMetaFp8,
};
use ndarray::{Array2, ArrayView3};

/// Weights resident on the device, row-major, in their own dtype.
pub struct DeviceWeight {
    bytes: CudaSlice<u8>,
    dtype: WeightDtype,
    rows: usize,
    cols: usize,
}

impl DeviceWeight {
    /// Uploads a host weight (a non-contiguous view is made contiguous first).
    pub fn upload(dev: &GpuDevice, weight: WeightView<'_>) -> Result<Self> {
        let (rows, cols) = weight.dim();
        let bytes =
            dev.stream().clone_htod(&weight.row_major_bytes()[..]).map_err(ForgeError::driver("uploading weights"))?;
        Ok(DeviceWeight { bytes, dtype: weight.dtype(), rows, cols })
    }

    /// Wraps bytes already on the device (`rows·cols` elements of `dtype`, row-major; a
    /// `CudaSlice` is a whole allocation, so it has the 16-byte alignment the kernels' vector
    /// loads need).
    pub fn from_device(bytes: CudaSlice<u8>, dtype: WeightDtype, rows: usize, cols: usize) -> Result<Self> {
        if bytes.len() != rows * cols * dtype.size() {
            return Err(ForgeError::Shape(format!(
                "{} device bytes for a {rows}×{cols} {dtype:?} weight",
                bytes.len()
            )));
        }
        Ok(DeviceWeight { bytes, dtype, rows, cols })
    }

    /// `(rows, cols)`.
    pub fn dim(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Element type.
    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    /// The raw device bytes.
    pub fn bytes(&self) -> &CudaSlice<u8> {
        &self.bytes
    }

    /// By address.
    pub fn as_ref(&self) -> WeightRef {
        WeightRef { bytes: self.bytes.dev_ptr(), dtype: self.dtype, rows: self.rows, cols: self.cols }
    }
}

/// A weight on the device by address: `rows·cols` elements of `dtype`, row-major, in an
/// allocation aligned for the kernels' vector loads.
#[derive(Clone, Copy, Debug)]
pub struct WeightRef {
    /// Start address.
    pub bytes: DevPtr<u8>,
    /// Element type.
    pub dtype: WeightDtype,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

/// A grid on the device by address: `rows·n_groups` qmeta4 records, row-major.
#[derive(Clone, Copy, Debug)]
pub struct GridRef {
    /// Start address.
    pub qmeta: DevPtr<u32>,
    /// Weight rows.
    pub rows: usize,
    /// Groups per row.
    pub n_groups: usize,
    /// `2^bits − 1`.
    pub maxq: u32,
    /// Zero columns in the last group.
    pub pad: usize,
    /// Columns per group.
    pub group_size: usize,
    /// The dtype the scales are stored in (what the solver quantizes against).
    pub scale_dtype: ScaleDtype,
}

/// A grid whose qmeta4 records stay on the device (the solver consumes them in place).
pub struct DeviceGrid {
    /// `rows·n_groups` little-endian records, row-major.
    pub qmeta: CudaSlice<u32>,
    /// Weight rows.
    pub rows: usize,
    /// Groups per row.
    pub n_groups: usize,
    /// `2^bits − 1`.
    pub maxq: u32,
    /// Zero columns in the last group.
    pub pad: usize,
    /// Columns per group.
    pub group_size: usize,
    /// The dtype the scales are stored in.
    pub scale_dtype: ScaleDtype,
}

impl DeviceGrid {
    /// Uploads a host grid (e.g. one built on the CPU or loaded from a checkpoint).
    pub fn upload(dev: &GpuDevice, grid: &QuantGrid) -> Result<Self> {
        let (rows, n_groups) = grid.dim();
        let qmeta = dev.stream().clone_htod(&grid.to_u32_vec()).map_err(ForgeError::driver("uploading qmeta"))?;
        Ok(DeviceGrid {
            qmeta,
            rows,
            n_groups,
            maxq: grid.maxq,
            pad: grid.pad,
            group_size: grid.group_size,
            scale_dtype: grid.scale_dtype,
        })
    }

    /// By address.
    pub fn as_ref(&self) -> GridRef {
        GridRef {
            qmeta: self.qmeta.dev_ptr(),
            rows: self.rows,
            n_groups: self.n_groups,
            maxq: self.maxq,
            pad: self.pad,
            group_size: self.group_size,
            scale_dtype: self.scale_dtype,
        }
    }

    /// Downloads the records into a host [`QuantGrid`].
    pub fn to_host(&self, dev: &GpuDevice) -> Result<QuantGrid> {
        let recs = dev.stream().clone_dtoh(&self.qmeta).map_err(ForgeError::driver("downloading qmeta"))?;
        QuantGrid::from_u32(&recs, self.rows, self.n_groups, self.maxq, self.pad, self.group_size, self.scale_dtype)
    }
}

/// Threads per block of the range-meta kernel.
const THREADS: u32 = 256;
/// Shared-memory floats one MSE block may stage (≈ 16 KiB: many small blocks per SM).
const MSE_STAGED_FLOATS: usize = 4096;

/// Groups per block and threads per block for the MSE search. The block's `gpb·n_cand`
/// pairs are dealt round-robin to its threads, so the best shape wastes no lanes in the
/// last round (`pairs % threads == 0`) with at least 4 rounds to amortise the load phase,
/// and among those has the fewest groups, for many small blocks and a short tail.
pub(crate) fn mse_block_shape(gs: usize, n_cand: usize) -> (usize, u32) {
    let max_gpb = (MSE_STAGED_FLOATS / gs).max(1);
    let mut best = (0.0f64, 1usize, 256u32);
    for gpb in 1..=max_gpb {
        for threads in (64..=256).step_by(32) {
            let pairs = gpb * n_cand;
            let rounds = pairs.div_ceil(threads as usize);
            let used = pairs as f64 / (rounds * threads as usize) as f64;
            // Fewer than 4 rounds: the load phase is not amortised; count it as waste.
            let score = used * (rounds.min(4) as f64 / 4.0);
            if score > best.0 + 1e-9 {
                best = (score, gpb, threads);
            }
        }
    }
    (best.1, best.2)
}

/// Builds the grid on the device and leaves the records there. Reports NaN/inf weights as
/// [`ForgeError::NonFinite`] (this reads back one u64, so it synchronises the stream).
pub fn build_quant_grid_device(dev: &GpuDevice, weight: &DeviceWeight, config: &GridConfig) -> Result<DeviceGrid> {
    let (rows, cols) = weight.dim();
    config.validate(rows, cols)?;
    let n_groups = config.n_groups(cols);
    let stream = dev.stream();
    let mut qmeta = stream.alloc_zeros::<u32>(rows * n_groups).map_err(ForgeError::driver("allocating qmeta"))?;
    let mut first_bad = stream.alloc_zeros::<u64>(1).map_err(ForgeError::driver("allocating the NaN flag"))?;
    launch_grid_kernel(dev, weight, config, &mut qmeta, &mut first_bad)?;
    let bad = stream.clone_dtoh(&first_bad).map_err(ForgeError::driver("reading the NaN flag"))?;
    if let Some(&flag) = bad.first().filter(|&&f| f != 0) {
        let idx = !flag as usize;
        let value = read_element(dev, weight, idx)?;
        return Err(ForgeError::NonFinite { tensor: "weight", row: idx / cols, col: idx % cols, value });
    }
    let gs = config.group_size;
    Ok(DeviceGrid {
        qmeta,
        rows,
        n_groups,
        maxq: config.maxq(),
        pad: n_groups * gs - cols,
        group_size: gs,
        scale_dtype: config.scale_dtype,
    })
}

/// Enqueues the grid kernel for `weight` into caller-owned buffers, without synchronising:
/// `qmeta` gets `rows·n_groups` records and `first_bad` (zeroed here) `!index` of the first
/// NaN/inf weight, or stays 0. For callers that reuse buffers (benchmarks,
/// expert batches); [`build_quant_grid_device`] is the checked entry point.
pub fn launch_grid_kernel(
    dev: &GpuDevice,
    weight: &DeviceWeight,
    config: &GridConfig,
    qmeta: &mut CudaSlice<u32>,
    first_bad: &mut CudaSlice<u64>,
) -> Result<()> {
    let (rows, cols) = weight.dim();
    config.validate(rows, cols)?;
    let total = rows * config.n_groups(cols);
    if qmeta.len() < total || first_bad.is_empty() {
        return Err(ForgeError::Shape(format!("qmeta buffer of {} for {total} groups", qmeta.len())));
    }
    dev.stream().memset_zeros(first_bad).map_err(ForgeError::driver("resetting the NaN flag"))?;
    // SAFETY: qmeta holds rows·n_groups records and first_bad one u64 (checked above).
    unsafe { launch_grid_into(dev, weight.as_ref(), config, qmeta.dev_ptr_mut(), first_bad.dev_ptr_mut()) }
}

/// Enqueues the grid kernel for `weight` by address (the engine's entry point): `qmeta`
/// receives `rows·n_groups` records and `first_bad` (not cleared here) `!index` of the first
/// NaN/inf weight.
///
/// # Safety
/// `qmeta` is the device address of at least `rows·n_groups` u32 and `first_bad` of one u64.
pub unsafe fn launch_grid_into(
    dev: &GpuDevice,
    weight: WeightRef,
    config: &GridConfig,
    qmeta: DevPtrMut<u32>,
    first_bad: DevPtrMut<u64>,
) -> Result<()> {
    let (rows, cols) = (weight.rows, weight.cols);
    config.validate(rows, cols)?;
    let gs = config.group_size;
    let n_groups = config.n_groups(cols);
    let total = rows * n_groups;
    let (rows, cols, gs, n_groups, bits, symmetric) =
        (rows as u32, cols as u32, gs as u32, n_groups as u32, config.bits, config.symmetric as u32);
    let w = weight.bytes;
    let stream = dev.stream();
    match &config.scale_search {
        ScaleSearch::Absmax => {
            // The kernel reads a group with min(32, gs/4) lanes: 32/that groups per warp.
            let groups_per_block = (THREADS / 32) as usize * (32 / (gs as usize / 4).min(32));
            let blocks = total.div_ceil(groups_per_block).min(1 << 30) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            let args = RangeMetaArgs { w, rows, cols, gs, n_groups, bits, symmetric, qmeta, first_bad };
            // SAFETY: sizes as the kernel's contract: rows·cols elements, rows·n_groups records.
            unsafe {
                match weight.dtype {
                    WeightDtype::F32 => dev.launch::<RangeMetaF32>(cfg, &args),
                    WeightDtype::F16 => dev.launch::<RangeMetaF16>(cfg, &args),
                    WeightDtype::BF16 => dev.launch::<RangeMetaBf16>(cfg, &args),
                    WeightDtype::Fp8E4M3 => dev.launch::<RangeMetaFp8>(cfg, &args),
                }
            }?;
        }
        ScaleSearch::Mse(m) => {
            let factors = m.factors()?;
            let (gpb, threads) = mse_block_shape(gs as usize, factors.len());
            let shared = MseSharedLayout::new(gs, gpb as u32).total as usize;
            // Constant memory is per module: hold the lock from the write to the launch so a
            // concurrent search with other candidates cannot interleave.
            let _guard = dev.constant_memory_lock();
            let module = dev.module()?;
            let mut symbol =
                module.get_global("MSE_CANDIDATES", stream).map_err(ForgeError::driver("finding MSE_CANDIDATES"))?;
            // SAFETY: the symbol is 4096 bytes of f32s; transmute_mut checks the length.
            let mut cand = unsafe { symbol.transmute_mut::<f32>(factors.len()) }.ok_or_else(|| {
                ForgeError::ScaleSearch(format!("{} candidates exceed constant memory", factors.len()))
            })?;
            stream.memcpy_htod(&factors, &mut cand).map_err(ForgeError::driver("writing MSE candidates"))?;
            let blocks = total.div_ceil(gpb) as u32;
            let cfg =
                LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared as u32 };
            let args = MseSearchArgs {
                w,
                rows,
                cols,
                gs,
                n_groups,
                bits,
                symmetric,
                n_cand: factors.len() as u32,
                norm: m.norm,
                scale_dtype: config.scale_dtype.to_u32(),
                gpb: gpb as u32,
                qmeta,
                first_bad,
            };
            // SAFETY: as above, plus n_cand ≤ 1024 candidates written and `shared` bytes sized
            // by the kernel's formula.
            unsafe {
                match weight.dtype {
                    WeightDtype::F32 => dev.launch::<MseSearchF32>(cfg, &args),
                    WeightDtype::F16 => dev.launch::<MseSearchF16>(cfg, &args),
                    WeightDtype::BF16 => dev.launch::<MseSearchBf16>(cfg, &args),
                    WeightDtype::Fp8E4M3 => dev.launch::<MseSearchFp8>(cfg, &args),
                }
            }?;
        }
    }
    Ok(())
}

/// One element of a device weight, widened to f32 (for error messages).
fn read_element(dev: &GpuDevice, weight: &DeviceWeight, idx: usize) -> Result<f32> {
    let size = weight.dtype.size();
    let view = weight.bytes.slice(idx * size..(idx + 1) * size);
    let b = dev.stream().clone_dtoh(&view).map_err(ForgeError::driver("reading a weight element"))?;
    Ok(match weight.dtype {
        WeightDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        WeightDtype::F16 => forge_numerics::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
        WeightDtype::BF16 => forge_numerics::bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
        WeightDtype::Fp8E4M3 => forge_numerics::fp8_e4m3_to_f32(b[0]),
    })
}

/// Uploads `weight`, builds its grid on the GPU, and downloads the records.
pub fn build_quant_grid_gpu(dev: &GpuDevice, weight: WeightView<'_>, config: &GridConfig) -> Result<QuantGrid> {
    let (rows, cols) = weight.dim();
    config.validate(rows, cols)?;
    let w = DeviceWeight::upload(dev, weight)?;
    build_quant_grid_device(dev, &w, config)?.to_host(dev)
}

/// GPU decode of a `(rows, n_groups, 4)` qmeta tensor (upload, one launch, download).
pub fn decode_qmeta_gpu(dev: &GpuDevice, qmeta: ArrayView3<'_, u8>) -> Result<DecodedQMeta> {
    let (rows, groups, recs) = super::cpu::qmeta_records(qmeta)?;
    let n = recs.len();
    if n == 0 {
        return super::decode_qmeta_cpu(qmeta);
    }
    if n > u32::MAX as usize {
        return Err(ForgeError::Shape(format!("{n} qmeta records exceed the kernel's u32 index")));
    }
    let stream = dev.stream();
    let d_meta = stream.clone_htod(&recs).map_err(ForgeError::driver("uploading qmeta"))?;
    let mut d_scale = stream.alloc_zeros::<f32>(n).map_err(ForgeError::driver("allocating scales"))?;
    let mut d_zero = stream.alloc_zeros::<f32>(n).map_err(ForgeError::driver("allocating zero points"))?;
    let args = QmetaDecodeArgs {
        qmeta: d_meta.dev_ptr(),
        n: n as u32,
        scale: d_scale.dev_ptr_mut(),
        qzero: d_zero.dev_ptr_mut(),
    };
    // SAFETY: the kernel reads n u32 records and writes n f32 into each output, all sized n.
    unsafe { dev.launch::<QmetaDecode>(grid_for(n, 256), &args) }?;
    let scale = stream.clone_dtoh(&d_scale).map_err(ForgeError::driver("downloading scales"))?;
    let qzero = stream.clone_dtoh(&d_zero).map_err(ForgeError::driver("downloading zero points"))?;
    Ok(DecodedQMeta {
        scale: Array2::from_shape_vec((rows, groups), scale).map_err(|e| ForgeError::Internal(e.to_string()))?,
        qzero: Array2::from_shape_vec((rows, groups), qzero).map_err(|e| ForgeError::Internal(e.to_string()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::mse_block_shape;

    #[test]
    fn mse_block_shape_wastes_no_lanes_for_the_default_grid() {
        let (gpb, threads) = mse_block_shape(128, 100);
        assert_eq!((gpb * 100) % threads as usize, 0, "gpb {gpb}, threads {threads}");
        assert!((gpb * 100) / threads as usize >= 4);
        for (gs, n) in [(32, 1), (1024, 1024), (96, 7), (128, 1000)] {
            let (gpb, threads) = mse_block_shape(gs, n);
            assert!(gpb >= 1 && gpb * gs <= 4096.max(gs) && threads % 32 == 0, "{gs} {n}: {gpb} {threads}");
        }
    }
}
