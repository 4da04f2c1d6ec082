//! [`QuantEngine`]: the persistent per-device engine that quantizes layers with everything
//! from the Hessian to the codes on the device.
//!
//! It owns three streams (upload, the device's compute stream, download) linked by events,
//! pinned staging buffers filled by several host threads, and two job slots of device buffers
//! grown to the largest job seen, plus one solver workspace and the pre-step buffers: after
//! the largest job has been seen, no job allocates device memory
//! ([`EngineStats::device_allocations`]). A job is one Hessian and the weights that read its
//! inputs (an MoE expert's gate and up projections: one factorisation, two solves). It goes
//!
//! ```text
//! upload stream:   weight (stored dtype) and Hessian (or factor) → slot buffers   ─ event ──────────┐
//! compute stream:  dead columns → grid → gather, potrf, trsm, extract (U, padded) → solve (→ pack) ◄┘ ─ event ─┐
//! download stream: codes or packed words, qmeta, loss, status word (and the dequantized weight on request) ◄───┘
//! ```
//!
//! so [`QuantEngine::submit`] of the next layer overlaps its upload with this layer's compute
//! and download. The pre-step runs optimistically (first damping); the input checks of the
//! grid, the gather, cuSOLVER and the factor extraction land in one status word read once per
//! layer by [`QuantEngine::collect`], which only then retries a failed factorisation with more
//! damping (docs/design.md §5) and re-solves. cuSOLVER/cuBLAS missing: the pre-step runs on
//! the CPU (route [`PreStepRoute::Cpu`]) and the rest stays on the device.

use crate::calib::PreStepRoute;
use crate::device::{DeviceBuf, DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::grid::{launch_grid_into, GridConfig, GridRef, QuantGrid, WeightRef};
use crate::hessian::cuda::{enqueue_identity, enqueue_zero_columns, factor_checked, FactorStatus, FactorWork};
use crate::hessian::{pre_step_cpu, GpuHessian, PreStepConfig, PreStepPlan};
use crate::pack::{PackLayout, PackedCodes};
use crate::solver::{self, padded, DeviceFactor, FactorRef, SolveOutputs, SolveWorkspace};
use crate::weights::{enqueue_fp8_block_dequant, Fp8Blocks, Fp8Output};
use crate::{ForgeError, Result, Warning, WeightDtype, WeightView};
use cudarc::driver::sys::{CUevent_flags, CU_MEMHOSTALLOC_WRITECOMBINED};
use cudarc::driver::{CudaEvent, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
use forge_kernel_abi::DevPtrMut;
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;
use std::sync::{Arc, Weak};

/// Where a job's Hessian (or factor) comes from.
#[derive(Clone, Copy)]
pub enum HessianInput<'a> {
    /// `H` on the host, `(cols, cols)` f32.
    Host(ArrayView2<'a, f32>),
    /// `H` on this engine's device (copied into the job's slot at submit).
    Device(&'a GpuHessian),
    /// A pre-step done elsewhere: `U` `(cols, cols)` (upper triangle read) and the act-order.
    Factor {
        /// `U`.
        u: ArrayView2<'a, f32>,
        /// Act-order column order.
        perm: Option<&'a [usize]>,
    },
    /// A factor already on the device (from [`QuantEngine::prepare_factor`]) and what its
    /// pre-step did: several jobs reuse one factorisation.
    Prepared {
        /// The padded factor and column order.
        factor: &'a DeviceFactor,
        /// Its pre-step's summary (dead columns are zeroed in the weights).
        summary: &'a PreStepSummary,
    },
    /// No calibration data: `U = I` (round-to-nearest), flagged.
    NoTokens,
}

/// One Hessian and the weights that read its inputs (same input columns).
#[derive(Clone)]
pub struct LayerJob<'a> {
    /// The weights, `(out_features, in_features)` each, in their stored dtypes (uploaded as is).
    pub weights: Vec<WeightView<'a>>,
    /// Their Hessian or factor.
    pub hessian: HessianInput<'a>,
    /// Grid format and scale search.
    pub grid: &'a GridConfig,
    /// Pre-step settings (ignored for [`HessianInput::Factor`] and [`HessianInput::NoTokens`]).
    pub pre_step: PreStepConfig,
    /// Download the dequantized weights too (`rows·cols` f32 each; off by default).
    pub want_dequant: bool,
    /// Time the stages with device events ([`LayerOutcome::timings`]).
    pub profile: bool,
    /// Pack the codes into int32 words on the device and download those instead of the u8
    /// codes (`8/bits`× fewer bytes: 2× at 4 bits; [`QuantizedWeight::packed`]). `None` (the
    /// default): u8 codes.
    pub pack: Option<PackLayout>,
    /// Compute each weight's per-row squared error and norm on the device
    /// ([`QuantizedWeight::row_error`]): the relative weight error without the codes on the
    /// host (what a packed download leaves it without).
    pub want_row_error: bool,
    /// Block scales of FP8-E4M3 weights (DeepSeek-V3 `weight_scale_inv`): empty when no
    /// weight has any, else one entry per weight (`None` for the others). Such a weight is
    /// uploaded as its FP8 bytes and scales, dequantized to f32 on the device
    /// (`kernels-gpu/src/weights/fp8_dequant.rs`, bit for bit the CPU reference), and
    /// quantized as that f32 weight.
    pub block_scales: Vec<Option<Fp8Blocks<'a>>>,
}

impl<'a> LayerJob<'a> {
    /// One weight with default pre-step settings, no dequantized weight, no profiling.
    pub fn new(weight: WeightView<'a>, hessian: HessianInput<'a>, grid: &'a GridConfig) -> Self {
        LayerJob {
            weights: vec![weight],
            hessian,
            grid,
            pre_step: PreStepConfig::default(),
            want_dequant: false,
            profile: false,
            pack: None,
            want_row_error: false,
            block_scales: Vec::new(),
        }
    }

    /// Block scales of weight `i`, if it has any.
    fn blocks(&self, i: usize) -> Option<&Fp8Blocks<'a>> {
        self.block_scales.get(i).and_then(|b| b.as_ref())
    }
}

/// What the pre-step of a job did.
#[derive(Clone, Debug, PartialEq)]
pub struct PreStepSummary {
    /// Act-order column order, if used.
    pub perm: Option<Vec<usize>>,
    /// Inputs with `diag H == 0` (their weight columns were zeroed before the grid).
    pub dead_columns: Vec<usize>,
    /// Absolute damping of the attempt used (0 without a Hessian).
    pub damping_used: f32,
    /// Factorisations retried with more damping.
    pub retries: u32,
    /// Every factorisation failed: `U = I`, round-to-nearest.
    pub fallback_identity: bool,
    /// Where the pre-step ran.
    pub route: PreStepRoute,
    /// What was legal but surprising (dead inputs, retries, the identity fallback, no tokens,
    /// an indefinite `H` accepted on request; an asymmetric `H` only where the pre-step ran on
    /// the CPU: the device symmetrises without looking).
    pub warnings: Vec<Warning>,
}

/// Device-event times of a job's stages, in ms (with [`LayerJob::profile`]; without retries).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerTimings {
    /// Host → device copies (upload stream).
    pub upload_ms: f32,
    /// FP8 block dequantization, dead columns and grid kernels.
    pub grid_ms: f32,
    /// Gather, potrf, trsm, extract.
    pub pre_step_ms: f32,
    /// The fused solves.
    pub solve_ms: f32,
    /// Device → host copies (download stream).
    pub download_ms: f32,
}

impl LayerTimings {
    /// Grid + pre-step + solve: the compute stream's busy time.
    pub fn kernel_ms(&self) -> f32 {
        self.grid_ms + self.pre_step_ms + self.solve_ms
    }
}

/// One quantized weight.
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    /// The qmeta4 grid.
    pub grid: QuantGrid,
    /// `(rows, cols)` codes, original column order; empty (`0 × 0`) when the job asked for
    /// packed words instead ([`LayerJob::pack`]).
    pub codes: Array2<u8>,
    /// The codes packed on the device, when the job asked for them ([`LayerJob::pack`]).
    pub packed: Option<PackedCodes>,
    /// GPTQ loss per row.
    pub loss: Array1<f32>,
    /// The dequantized weight, when asked for.
    pub dequant: Option<Array2<f32>>,
    /// Per row `(Σ ((q − z)·s − x)², Σ x²)` as `(rows, 2)` f64, when asked for
    /// ([`LayerJob::want_row_error`]): the host error pass's sums bit for bit.
    pub row_error: Option<Array2<f64>>,
}

/// A finished job: one result per weight, in order, and what the pre-step did.
#[derive(Clone, Debug)]
pub struct LayerOutcome {
    /// The weights' results.
    pub weights: Vec<QuantizedWeight>,
    /// What the pre-step did.
    pub pre_step: PreStepSummary,
    /// Stage times, when profiled.
    pub timings: Option<LayerTimings>,
}

/// Counters of an engine's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Jobs collected.
    pub jobs: u64,
    /// Weights quantized.
    pub weights: u64,
    /// Device allocations the device has made so far (all users).
    pub device_allocations: u64,
    /// Bytes uploaded by the engine.
    pub upload_bytes: u64,
    /// Bytes downloaded by the engine.
    pub download_bytes: u64,
    /// Host nanoseconds spent inside `submit`, summed over jobs, by phase: checks and the
    /// Hessian or factor (staging, plan), the weights' staging, the index copies and status
    /// word, the pre-step's launches, the grid, solve and download launches. Shows where the
    /// host waits.
    pub submit_host_ns: [u64; 5],
    /// Pre-step recursions replayed from a captured CUDA graph.
    pub pre_step_graph_replays: u64,
    /// CUDA graphs of the pre-step recursion captured.
    pub pre_step_graph_captures: u64,
}

/// A submitted job; pass it to [`QuantEngine::collect`].
#[derive(Debug)]
#[must_use = "a submitted job must be collected"]
pub struct Ticket {
    slot: usize,
    seq: u64,
}

/// Page-locked host memory that grows to the largest size asked for.
pub(crate) struct PinnedBuf<T> {
    slice: Option<PinnedHostSlice<T>>,
    flags: u32,
}

impl<T: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync> PinnedBuf<T> {
    pub(crate) fn new(write_combined: bool) -> Self {
        PinnedBuf { slice: None, flags: if write_combined { CU_MEMHOSTALLOC_WRITECOMBINED } else { 0 } }
    }

    /// The first `len` elements, growing first if needed. The caller guarantees no copy
    /// still uses the buffer (the slot's events).
    pub(crate) fn get(&mut self, dev: &GpuDevice, len: usize) -> Result<&mut [T]> {
        if !self.slice.as_ref().is_some_and(|s| s.len() >= len) {
            self.slice = None;
            // SAFETY: page-locked allocation; the engine reads only elements a copy wrote.
            let s = unsafe { dev.context().alloc_pinned_with_flags::<T>(len.max(1), self.flags) }
                .map_err(ForgeError::driver("allocating pinned host memory"))?;
            self.slice = Some(s);
        }
        let s = self.slice.as_mut().ok_or_else(|| ForgeError::Internal("pinned buffer missing".into()))?;
        // The slice's own event is never recorded (the engine orders copies with the slots'
        // events), so this does not wait.
        let all = s.as_mut_slice().map_err(ForgeError::driver("mapping pinned host memory"))?;
        all.get_mut(..len).ok_or_else(|| ForgeError::Internal("pinned buffer too small".into()))
    }

    /// The first `len` elements as they are (an error when fewer were ever allocated).
    pub(crate) fn slice(&self, len: usize) -> Result<&[T]> {
        match &self.slice {
            Some(s) => {
                let all = s.as_slice().map_err(ForgeError::driver("mapping pinned host memory"))?;
                all.get(..len).ok_or_else(|| ForgeError::Internal("pinned buffer too small".into()))
            }
            None if len == 0 => Ok(&[]),
            None => Err(ForgeError::Internal("pinned buffer never allocated".into())),
        }
    }
}

/// Copies `src` into `dst` on several threads (one thread copies ~10 GB/s; staging a layer
/// must not be the pipeline's bottleneck).
pub(crate) fn parallel_copy<T: Copy + Send + Sync>(dst: &mut [T], src: &[T]) {
    const CHUNK_BYTES: usize = 64 << 10;
    let chunk = (CHUNK_BYTES / std::mem::size_of::<T>().max(1)).max(1);
    dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
}

/// Stages `src` into the pinned `staged` and enqueues its upload to device address `dst`, in
/// pieces: the DMA of one piece runs while the host copies the next, so staging and the
/// transfer overlap instead of adding up.
///
/// # Safety
/// `dst` holds `src.len()` elements on the device; `staged` (at least as long) is not touched
/// by anything else until the uploads complete.
unsafe fn stage_and_upload<T: Copy + Send + Sync>(
    staged: &mut [T],
    src: &[T],
    dst: u64,
    stream: &CudaStream,
) -> Result<()> {
    const PIECE_BYTES: usize = 16 << 20;
    let piece = (PIECE_BYTES / std::mem::size_of::<T>().max(1)).max(1);
    for (k, (d, s)) in staged[..src.len()].chunks_mut(piece).zip(src.chunks(piece)).enumerate() {
        parallel_copy(d, s);
        let at = dst + (k * piece * std::mem::size_of::<T>()) as u64;
        cudarc::driver::result::memcpy_htod_async(at, d, stream.cu_stream())
            .map_err(ForgeError::driver("uploading to the device"))?;
    }
    Ok(())
}

/// Device-event marks of a profiled job.
struct Profile {
    up0: CudaEvent,
    up1: CudaEvent,
    c0: CudaEvent,
    c_w: CudaEvent,
    c_grid: CudaEvent,
    c_pre: CudaEvent,
    c_solve: CudaEvent,
    d0: CudaEvent,
    d1: CudaEvent,
}

/// One weight's buffers in a slot.
struct WeightBufs {
    weight: DeviceBuf<u8>,
    /// FP8 block scales as stored, and the f32 weight dequantized from them.
    scales: DeviceBuf<u8>,
    widened: DeviceBuf<u8>,
    staged_scales: PinnedBuf<u8>,
    qmeta: DeviceBuf<u32>,
    codes: DeviceBuf<u8>,
    packed: DeviceBuf<u32>,
    dequant: DeviceBuf<f32>,
    loss: DeviceBuf<f32>,
    row_error: DeviceBuf<f64>,
    staged: PinnedBuf<u8>,
    out_codes: PinnedBuf<u8>,
    out_packed: PinnedBuf<u32>,
    out_qmeta: PinnedBuf<u32>,
    out_loss: PinnedBuf<f32>,
    out_dequant: PinnedBuf<f32>,
    out_row_error: PinnedBuf<f64>,
}

impl WeightBufs {
    fn new() -> Self {
        WeightBufs {
            weight: DeviceBuf::default(),
            scales: DeviceBuf::default(),
            widened: DeviceBuf::default(),
            staged_scales: PinnedBuf::new(true),
            qmeta: DeviceBuf::default(),
            codes: DeviceBuf::default(),
            packed: DeviceBuf::default(),
            dequant: DeviceBuf::default(),
            loss: DeviceBuf::default(),
            row_error: DeviceBuf::default(),
            staged: PinnedBuf::new(true),
            out_codes: PinnedBuf::new(false),
            out_packed: PinnedBuf::new(false),
            out_qmeta: PinnedBuf::new(false),
            out_loss: PinnedBuf::new(false),
            out_dequant: PinnedBuf::new(false),
            out_row_error: PinnedBuf::new(false),
        }
    }
}

impl WeightBufs {
    /// The weight the grid and the solver read: the upload itself, or for a block-scaled
    /// FP8 weight its dequantized f32 copy.
    fn weight_ref(&self, rows: usize, cols: usize, dtype: WeightDtype, widened: bool) -> Result<WeightRef> {
        let buf = if widened { &self.widened } else { &self.weight };
        Ok(WeightRef { bytes: buf.get(rows * cols * dtype.size())?.dev_ptr(), dtype, rows, cols })
    }
}

/// A job's shapes and settings, kept in its slot from submit to collect.
struct Pending {
    seq: u64,
    rows: Vec<usize>,
    /// The dtypes the kernels read (f32 for a block-scaled FP8 weight).
    dtypes: Vec<WeightDtype>,
    /// The dtypes as uploaded (for error messages).
    staged_dtypes: Vec<WeightDtype>,
    /// Whether each weight was dequantized from FP8 blocks on the device.
    widened: Vec<bool>,
    cols: usize,
    grid: GridConfig,
    want_dequant: bool,
    want_row_error: bool,
    profile: bool,
    pack: Option<PackLayout>,
    /// The plan, when the factorisation runs on the device (for retries at collect).
    plan: Option<PreStepPlan>,
    summary: PreStepSummary,
}

impl Pending {
    fn n_groups(&self) -> usize {
        self.grid.n_groups(self.cols)
    }
    fn cols_p(&self) -> usize {
        padded(self.cols)
    }
    /// Packed words of a weight of `rows` rows (0 without packing).
    fn packed_len(&self, rows: usize) -> Result<usize> {
        match self.pack {
            Some(layout) => layout.shape(rows, self.cols, self.grid.bits).map(|(a, b)| a * b),
            None => Ok(0),
        }
    }
}

/// Byte offsets in a slot's status word: `!index` of the first non-finite Hessian entry and
/// factor entry, cuSOLVER's i32 `info`, then per weight `!index` of its first non-finite
/// element, then per weight `!index` of its first code the packer found out of range (never
/// set by a correct solve; checked all the same). `3 + 2·weights` u64 in all.
const ST_HESSIAN: u64 = 0;
const ST_FACTOR: u64 = 8;
const ST_INFO: u64 = 16;
const ST_WEIGHTS: u64 = 24;

/// u64 entries of the status word of a job with `n_weights` weights.
fn status_len(n_weights: usize) -> usize {
    3 + 2 * n_weights
}

/// One job's device buffers, pinned staging and events.
struct Slot {
    weights: Vec<WeightBufs>,
    hessian: DeviceBuf<f32>,
    u: DeviceBuf<f32>,
    perm: DeviceBuf<u32>,
    status: DeviceBuf<u64>,
    staged_matrix: PinnedBuf<f32>,
    out_status: PinnedBuf<u64>,
    /// The Hessian or factor is on the device (the pre-step may start).
    factor_uploaded: CudaEvent,
    /// Everything, the weights included, is on the device.
    uploaded: CudaEvent,
    computed: CudaEvent,
    downloaded: CudaEvent,
    profile: Profile,
    pending: Option<Pending>,
}

impl Slot {
    fn new(dev: &GpuDevice) -> Result<Self> {
        let ctx = dev.context();
        let ev = || ctx.new_event(None).map_err(ForgeError::driver("creating an event"));
        let timed =
            || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(ForgeError::driver("creating an event"));
        Ok(Slot {
            weights: Vec::new(),
            hessian: DeviceBuf::default(),
            u: DeviceBuf::default(),
            perm: DeviceBuf::default(),
            status: DeviceBuf::default(),
            staged_matrix: PinnedBuf::new(true),
            out_status: PinnedBuf::new(false),
            factor_uploaded: ev()?,
            uploaded: ev()?,
            computed: ev()?,
            downloaded: ev()?,
            profile: Profile {
                up0: timed()?,
                up1: timed()?,
                c0: timed()?,
                c_w: timed()?,
                c_grid: timed()?,
                c_pre: timed()?,
                c_solve: timed()?,
                d0: timed()?,
                d1: timed()?,
            },
            pending: None,
        })
    }

    /// The status word ([`status_len`] u64), its base address, and the pre-step's slots in it.
    fn status(&mut self, dev: &GpuDevice, n_weights: usize) -> Result<(u64, FactorStatus)> {
        let base = self.status.ensure(dev, status_len(n_weights), "status word")?.dev_ptr_mut().addr();
        let st = FactorStatus {
            hessian_bad: DevPtrMut::from_addr(base + ST_HESSIAN),
            factor_bad: DevPtrMut::from_addr(base + ST_FACTOR),
            info: base + ST_INFO,
        };
        Ok((base, st))
    }
}

/// How an engine holds its device: strongly when made by the caller, weakly when the device
/// itself keeps it ([`with_engine`]; a strong reference back would keep both alive forever).
enum DevRef {
    Strong(Arc<GpuDevice>),
    Weak(Weak<GpuDevice>),
}

fn record(ev: &CudaEvent, s: &CudaStream) -> Result<()> {
    ev.record(s).map_err(ForgeError::driver("recording an event"))
}

/// The persistent per-device engine (see the module docs).
pub struct QuantEngine {
    dev: DevRef,
    upload: Arc<CudaStream>,
    download: Arc<CudaStream>,
    /// Device Hessians are copied into a slot here, waiting only for their last update.
    side: Arc<CudaStream>,
    slots: [Slot; 2],
    seq: u64,
    ws: SolveWorkspace,
    factor_work: FactorWork,
    dead_list: DeviceBuf<u32>,
    /// Host Hessians of [`QuantEngine::prepare_factor`] and its status word.
    prep_hessian: DeviceBuf<f32>,
    prep_status: DeviceBuf<u64>,
    stats: EngineStats,
    /// Why the pre-step cannot run on the device (cuSOLVER or cuBLAS missing).
    no_device_pre_step: Option<String>,
    /// Recorded on the compute stream after buffers grew ([`after_growth`]), and the device's
    /// allocation count when it last was.
    grown: CudaEvent,
    allocations_seen: u64,
}

/// Buffers grow with `alloc_zeros` on the compute stream: the allocation and its zeroing are
/// ordered there, behind the work already queued. Before the upload and side streams copy into
/// a buffer grown since the last call, they wait for the compute stream to reach that point
/// (else the zeroing can land on the copied data); in steady state nothing grows and nothing
/// waits.
fn after_growth(
    dev: &GpuDevice,
    cs: &CudaStream,
    copiers: [&CudaStream; 2],
    grown: &CudaEvent,
    seen: &mut u64,
) -> Result<()> {
    let now = dev.allocation_count();
    if now != *seen {
        record(grown, cs)?;
        for s in copiers {
            s.wait(grown).map_err(ForgeError::driver("ordering copies after the buffers grew"))?;
        }
        *seen = now;
    }
    Ok(())
}

impl QuantEngine {
    /// An engine on `dev` (streams, events; buffers come with the first jobs). It keeps the
    /// device alive; [`with_engine`] gives the device's shared one instead.
    pub fn new(dev: Arc<GpuDevice>) -> Result<Self> {
        let mut e = Self::build(&dev)?;
        e.dev = DevRef::Strong(dev);
        Ok(e)
    }

    fn build(dev: &Arc<GpuDevice>) -> Result<Self> {
        let ctx = dev.context();
        let upload = ctx.new_stream().map_err(ForgeError::driver("creating the upload stream"))?;
        let download = ctx.new_stream().map_err(ForgeError::driver("creating the download stream"))?;
        let side = ctx.new_stream().map_err(ForgeError::driver("creating the Hessian side stream"))?;
        let slots = [Slot::new(dev)?, Slot::new(dev)?];
        let no_device_pre_step =
            dev.with_dense_solver(|_| Ok(())).and_then(|()| dev.with_blas(|_| Ok(()))).err().map(|e| e.to_string());
        Ok(QuantEngine {
            dev: DevRef::Weak(Arc::downgrade(dev)),
            upload,
            download,
            side,
            slots,
            seq: 0,
            ws: SolveWorkspace::empty(),
            factor_work: FactorWork::default(),
            dead_list: DeviceBuf::default(),
            prep_hessian: DeviceBuf::default(),
            prep_status: DeviceBuf::default(),
            stats: EngineStats::default(),
            no_device_pre_step,
            grown: ctx.new_event(None).map_err(ForgeError::driver("creating an event"))?,
            allocations_seen: dev.allocation_count(),
        })
    }

    /// The device (an error once a device-owned engine's device has been dropped).
    pub fn device(&self) -> Result<Arc<GpuDevice>> {
        match &self.dev {
            DevRef::Strong(d) => Ok(d.clone()),
            DevRef::Weak(w) => w.upgrade().ok_or_else(|| ForgeError::Config("the engine's device was dropped".into())),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> EngineStats {
        let device_allocations = self.device().map_or(0, |d| d.allocation_count());
        let g = &self.factor_work.graphs;
        EngineStats {
            device_allocations,
            pre_step_graph_replays: g.replays,
            pre_step_graph_captures: g.captures,
            ..self.stats
        }
    }

    /// Captures the GPU pre-step's block recursion into CUDA graphs and replays them (`true`,
    /// the default), or enqueues it call by call; the results are the same bits either way.
    pub fn set_pre_step_graphs(&mut self, on: bool) {
        self.factor_work.graphs.enabled = on;
    }

    /// Why capturing the pre-step into a graph failed (it then stays off), if it did.
    pub fn pre_step_graph_failure(&self) -> Option<&str> {
        self.factor_work.graphs.failed.as_deref()
    }

    /// Why the pre-step runs on the CPU, if it does (cuSOLVER or cuBLAS could not be loaded).
    pub fn cpu_pre_step_reason(&self) -> Option<&str> {
        self.no_device_pre_step.as_deref()
    }

    /// Quantizes one job: [`QuantEngine::submit`] then [`QuantEngine::collect`].
    pub fn quantize(&mut self, job: &LayerJob<'_>) -> Result<LayerOutcome> {
        let t = self.submit(job)?;
        self.collect(t)
    }

    /// Validates `job`, stages its inputs and enqueues upload, compute and download without
    /// waiting for the device (except to read `diag H` of a device Hessian). At most two jobs
    /// are in flight; collect them in submission order. On an error nothing of the job stays
    /// queued and its slot is free again.
    pub fn submit(&mut self, job: &LayerJob<'_>) -> Result<Ticket> {
        let k = (self.seq % 2) as usize;
        if self.slots[k].pending.is_some() {
            return Err(ForgeError::Config("two jobs are in flight: collect the oldest before submitting".into()));
        }
        let r = self.submit_into(k, job);
        if r.is_err() {
            // Whatever was enqueued finishes before the slot is reused.
            if let Ok(dev) = self.device() {
                let _ = dev.synchronize();
            }
            let _ = self.upload.synchronize();
            let _ = self.download.synchronize();
            self.slots[k].pending = None;
        }
        r
    }

    fn submit_into(&mut self, k: usize, job: &LayerJob<'_>) -> Result<Ticket> {
        // Host time by phase (stats: Hessian, weights, index copies, pre-step, the rest).
        let mut phase = [std::time::Duration::ZERO; 5];
        let mut lap_start = std::time::Instant::now();
        let mut lap = |i: usize| {
            let now = std::time::Instant::now();
            phase[i] += now - lap_start;
            lap_start = now;
        };
        let Some(first) = job.weights.first() else {
            return Err(ForgeError::Config("a job needs at least one weight".into()));
        };
        let cols = first.dim().1;
        for w in &job.weights {
            let (rows, c) = w.dim();
            if c != cols {
                return Err(ForgeError::Shape(format!("weights with {c} and {cols} columns cannot share a Hessian")));
            }
            job.grid.validate(rows, cols)?;
        }
        if !job.block_scales.is_empty() {
            if job.block_scales.len() != job.weights.len() {
                return Err(ForgeError::Config(format!(
                    "block_scales has {} entries for {} weights (one per weight, or none)",
                    job.block_scales.len(),
                    job.weights.len()
                )));
            }
            for (w, b) in job.weights.iter().zip(&job.block_scales) {
                if let Some(b) = b {
                    if w.dtype() != WeightDtype::Fp8E4M3 {
                        return Err(ForgeError::Config(format!(
                            "block scales belong to FP8-E4M3 weights, not {:?}",
                            w.dtype()
                        )));
                    }
                    let (r, c) = w.dim();
                    b.validate(r, c)?;
                }
            }
        }
        match job.hessian {
            HessianInput::Host(h) if h.dim() != (cols, cols) => {
                return Err(ForgeError::Shape(format!("the Hessian is {:?}, the weights have {cols} columns", h.dim())))
            }
            HessianInput::Device(g) if g.cols() != cols => {
                return Err(ForgeError::Shape(format!(
                    "the Hessian is {0}×{0}, the weights have {cols} columns",
                    g.cols()
                )))
            }
            HessianInput::Factor { u, perm } => solver::validate_factor(u, cols, perm)?,
            HessianInput::Prepared { factor, .. } if factor.cols() != cols => {
                return Err(ForgeError::Shape(format!("the factor has {} columns, the weights {cols}", factor.cols())))
            }
            HessianInput::Host(_) | HessianInput::Device(_) => job.pre_step.validate()?,
            HessianInput::Prepared { .. } | HessianInput::NoTokens => {}
        }
        let n_weights = job.weights.len();
        let cols_p = padded(cols);
        let dev = self.device()?;
        let cs = dev.stream().clone();
        let up = self.upload.clone();
        let slot = &mut self.slots[k];
        while slot.weights.len() < n_weights {
            slot.weights.push(WeightBufs::new());
        }
        if job.profile {
            record(&slot.profile.up0, &up)?;
        }

        // --- upload stream: the Hessian or factor first (the pre-step needs only it and
        // starts while the weights are still on their way), then the weights.
        let mut summary = PreStepSummary {
            perm: None,
            dead_columns: Vec::new(),
            damping_used: 0.0,
            retries: 0,
            fallback_identity: false,
            route: PreStepRoute::Gpu,
            warnings: Vec::new(),
        };
        let mut plan = None;
        // A factor made on the host (given, or the CPU pre-step) is uploaded padded.
        let mut host_factor: Option<Array2<f32>> = None;
        match job.hessian {
            HessianInput::Host(h) if self.no_device_pre_step.is_none() => {
                let p = PreStepPlan::new((0..cols).map(|j| f64::from(h[[j, j]])).collect(), &job.pre_step)?;
                let dst = slot.hessian.ensure(&dev, cols * cols, "Hessian upload")?.dev_ptr_mut();
                let staged = slot.staged_matrix.get(&dev, cols * cols)?;
                let std = h.as_standard_layout();
                let src = std.as_slice().ok_or_else(|| ForgeError::Internal("non-contiguous Hessian".into()))?;
                after_growth(&dev, &cs, [&up, &self.side], &self.grown, &mut self.allocations_seen)?;
                // SAFETY: as the weights' copies.
                unsafe { stage_and_upload(staged, src, dst.addr(), &up) }?;
                self.stats.upload_bytes += (cols * cols * 4) as u64;
                plan = Some(p);
            }
            HessianInput::Device(g) if self.no_device_pre_step.is_none() => {
                // Copied into the slot on the side stream, which waits for the Hessian's last
                // update only (not for the jobs already queued on the compute stream), and
                // finished before this returns: the caller's Hessian may change or go then.
                // The slot's previous job was collected, so nothing reads its buffer.
                let side = self.side.clone();
                let ready =
                    g.ready().ok_or_else(|| ForgeError::Internal("a device Hessian without its event".into()))?;
                side.wait(ready).map_err(ForgeError::driver("ordering the Hessian copy"))?;
                let dst = slot.hessian.ensure(&dev, cols * cols, "Hessian copy")?.dev_ptr_mut();
                after_growth(&dev, &cs, [&up, &side], &self.grown, &mut self.allocations_seen)?;
                // SAFETY: both hold cols² f32; the side stream waits for the last update.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        dst.addr(),
                        g.h().dev_ptr().addr(),
                        cols * cols * 4,
                        side.cu_stream(),
                    )
                }
                .map_err(ForgeError::driver("copying the Hessian"))?;
                // Waits for the side stream: the copy is complete once the diagonal is here.
                let diag = self.factor_work.diag_to_host_on(&dev, &side, dst.as_const(), cols)?;
                plan = Some(PreStepPlan::new(diag, &job.pre_step)?);
            }
            HessianInput::Host(h) => {
                let pre = pre_step_cpu(h, None, &job.pre_step)?;
                summary = cpu_summary(&pre);
                host_factor = Some(pre.hinv_factor);
            }
            HessianInput::Device(g) => {
                let pre = pre_step_cpu(g.to_host(&dev)?.view(), None, &job.pre_step)?;
                summary = cpu_summary(&pre);
                host_factor = Some(pre.hinv_factor);
            }
            HessianInput::Factor { u, perm } => {
                summary.route = PreStepRoute::Given;
                summary.perm = perm.map(|p| p.to_vec());
                host_factor = Some(u.to_owned());
            }
            HessianInput::Prepared { factor, summary: s } => {
                summary = s.clone();
                let f = factor.as_ref();
                let u = slot.u.ensure(&dev, cols_p * cols_p, "factor")?.dev_ptr_mut();
                // SAFETY: both factors hold cols_p² f32 (same cols); stream order puts the copy
                // after the factor was made, and the caller's factor may go once this returns.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(u.addr(), f.u.addr(), cols_p * cols_p * 4, cs.cu_stream())
                }
                .map_err(ForgeError::driver("copying the factor"))?;
            }
            HessianInput::NoTokens => {
                summary.route = PreStepRoute::NoTokens;
                summary.warnings = vec![Warning::NoCalibrationTokens];
            }
        }
        if let Some(p) = &plan {
            summary.perm = p.perm.clone();
            summary.dead_columns = p.dead_columns.clone();
            summary.damping_used = p.damping(0) as f32;
            // The first attempt's; collect redoes them if it has to retry.
            summary.warnings = p.warnings(0, false, p.damping(0));
        }
        let slot = &mut self.slots[k];
        let u_dev = slot.u.ensure(&dev, cols_p * cols_p, "factor")?.dev_ptr_mut();
        if let Some(u) = &host_factor {
            let staged = slot.staged_matrix.get(&dev, cols_p * cols_p)?;
            after_growth(&dev, &cs, [&up, &self.side], &self.grown, &mut self.allocations_seen)?;
            // SAFETY: as the weights' copies; u holds cols_p² f32.
            unsafe { stage_and_upload(staged, &solver::padded_factor(u.view(), cols_p)?, u_dev.addr(), &up) }?;
            self.stats.upload_bytes += (cols_p * cols_p * 4) as u64;
        }
        let slot = &mut self.slots[k];
        record(&slot.factor_uploaded, &up)?;
        lap(0);
        // --- compute stream: the pre-step (after the Hessian's upload) is enqueued before
        // the weights are staged, so the GPU factors while the host stages; then dead columns
        // and grids (after the weights' upload), then the solves.
        cs.wait(&slot.factor_uploaded).map_err(ForgeError::driver("ordering compute after the upload"))?;
        if job.profile {
            record(&slot.profile.c0, &cs)?;
        }
        let perm_host = solver::padded_perm(summary.perm.as_deref(), cols, cols_p);
        let perm_buf = slot.perm.ensure(&dev, cols_p, "column order")?;
        cs.memcpy_htod(&perm_host, &mut perm_buf.slice_mut(0..cols_p))
            .map_err(ForgeError::driver("uploading the column order"))?;
        let (status_base, status) = slot.status(&dev, n_weights)?;
        cs.memset_zeros(slot.status.ensure(&dev, status_len(n_weights), "status word")?)
            .map_err(ForgeError::driver("clearing the status word"))?;
        lap(2);
        match (&plan, job.hessian) {
            (Some(p), _) => {
                self.factor_work.set_order(&dev, p, cols)?;
                let h = self.slots[k].hessian.get(cols * cols)?.dev_ptr();
                // SAFETY: h cols², u cols_p², status live; the order was set above.
                unsafe { self.factor_work.enqueue_attempt(&dev, h, cols, p.damping(0), u_dev, cols_p, status) }?;
            }
            // SAFETY: u holds cols_p² f32.
            (None, HessianInput::NoTokens) => unsafe { enqueue_identity(&dev, u_dev, cols_p) }?,
            (None, _) => {} // the factor was uploaded or copied
        }
        if job.profile {
            record(&self.slots[k].profile.c_pre, &cs)?;
        }
        lap(3);
        // The weights in their stored dtypes.
        let slot = &mut self.slots[k];
        let mut rows = Vec::with_capacity(n_weights);
        let mut dtypes = Vec::with_capacity(n_weights);
        let mut staged_dtypes = Vec::with_capacity(n_weights);
        let mut widened = Vec::with_capacity(n_weights);
        for (i, (w, b)) in job.weights.iter().zip(slot.weights.iter_mut()).enumerate() {
            let r = w.dim().0;
            let bytes = r
                .checked_mul(cols)
                .and_then(|n| n.checked_mul(w.dtype().size()))
                .ok_or_else(|| ForgeError::Shape(format!("a {r}×{cols} weight is too large")))?;
            let dst = b.weight.ensure(&dev, bytes, "weight upload")?.dev_ptr_mut();
            // FP8 block scales (validated above: their byte count matches the weight), and
            // room for the f32 weight the compute stream dequantizes into; every buffer grows
            // before the wait below.
            let scales_dst = match job.blocks(i) {
                Some(blocks) => {
                    b.widened.ensure(&dev, r * cols * 4, "dequantized fp8 weight")?;
                    Some(b.scales.ensure(&dev, blocks.scales.len().max(1), "fp8 block scales")?.dev_ptr_mut())
                }
                None => None,
            };
            after_growth(&dev, &cs, [&up, &self.side], &self.grown, &mut self.allocations_seen)?;
            let staged = b.staged.get(&dev, bytes)?;
            let src = w.row_major_bytes();
            // SAFETY: the pinned bytes stay untouched until this slot is collected (its
            // events); the device buffer holds `bytes`.
            unsafe { stage_and_upload(staged, &src, dst.addr(), &up) }?;
            self.stats.upload_bytes += bytes as u64;
            if let (Some(blocks), Some(sdst)) = (job.blocks(i), scales_dst) {
                let n = blocks.scales.len();
                let sstaged = b.staged_scales.get(&dev, n)?;
                sstaged.copy_from_slice(blocks.scales);
                // SAFETY: as the weight's copy.
                unsafe { cudarc::driver::result::memcpy_htod_async(sdst.addr(), sstaged, up.cu_stream()) }
                    .map_err(ForgeError::driver("uploading fp8 block scales"))?;
                self.stats.upload_bytes += n as u64;
                dtypes.push(WeightDtype::F32);
                widened.push(true);
            } else {
                dtypes.push(w.dtype());
                widened.push(false);
            }
            rows.push(r);
            staged_dtypes.push(w.dtype());
        }
        let slot = &mut self.slots[k];
        record(&slot.uploaded, &up)?;
        lap(1);
        if job.profile {
            record(&slot.profile.up1, &up)?;
        }

        cs.wait(&self.slots[k].uploaded).map_err(ForgeError::driver("ordering compute after the upload"))?;
        if job.profile {
            record(&self.slots[k].profile.c_w, &cs)?;
        }
        let n_groups = job.grid.n_groups(cols);
        for (i, (&r, &dtype)) in rows.iter().zip(&dtypes).enumerate() {
            let b = &mut self.slots[k].weights[i];
            if let (Some(blocks), true) = (job.blocks(i), widened[i]) {
                let q = b.weight.get(r * cols)?.dev_ptr();
                let scales = b.scales.get(blocks.scales.len().max(1))?.dev_ptr();
                let out = b.widened.get(r * cols * 4)?.dev_ptr().addr();
                // A NaN code lands in the weight's status slot, as the grid would report it.
                let bad = DevPtrMut::from_addr(status_base + ST_WEIGHTS + 8 * i as u64);
                // SAFETY: q holds r·cols codes, scales the validated scales, out r·cols f32,
                // all uploaded/allocated above and ordered by the `uploaded` event.
                unsafe {
                    enqueue_fp8_block_dequant(
                        &dev,
                        &cs,
                        q,
                        scales,
                        blocks,
                        r,
                        cols,
                        Fp8Output::F32,
                        DevPtrMut::from_addr(out),
                        bad,
                    )
                }?;
            }
            let w_dev = b.weight_ref(r, cols, dtype, widened[i])?.bytes.addr();
            let qmeta = b.qmeta.ensure(&dev, r * n_groups, "grid records")?.dev_ptr_mut();
            // SAFETY: the weight buffer holds r·cols elements of its dtype; qmeta r·n_groups
            // records; the status word 3 + n_weights u64.
            unsafe {
                enqueue_zero_columns(
                    &dev,
                    &mut self.dead_list,
                    DevPtrMut::from_addr(w_dev),
                    r,
                    cols,
                    dtype.size(),
                    &summary.dead_columns,
                )?;
                let wref = WeightRef { bytes: DevPtrMut::<u8>::from_addr(w_dev).as_const(), dtype, rows: r, cols };
                let bad = DevPtrMut::from_addr(status_base + ST_WEIGHTS + 8 * i as u64);
                launch_grid_into(&dev, wref, job.grid, qmeta, bad)?;
            }
        }
        if job.profile {
            record(&self.slots[k].profile.c_grid, &cs)?;
        }
        let pending = Pending {
            seq: self.seq,
            rows,
            dtypes,
            staged_dtypes,
            widened,
            cols,
            grid: job.grid.clone(),
            want_dequant: job.want_dequant,
            want_row_error: job.want_row_error,
            profile: job.profile,
            pack: job.pack,
            plan,
            summary,
        };
        self.enqueue_solves(k, &pending)?;
        let slot = &mut self.slots[k];
        if job.profile {
            record(&slot.profile.c_solve, &cs)?;
        }
        record(&slot.computed, &cs)?;

        // --- download stream.
        self.enqueue_download(k, &pending)?;
        let seq = pending.seq;
        self.slots[k].pending = Some(pending);
        self.seq += 1;
        lap(4);
        for (acc, p) in self.stats.submit_host_ns.iter_mut().zip(&phase) {
            *acc += p.as_nanos() as u64;
        }
        Ok(Ticket { slot: k, seq })
    }

    /// Enqueues the solves of slot `k`'s weights with its factor into the slot's outputs.
    fn enqueue_solves(&mut self, k: usize, job: &Pending) -> Result<()> {
        let dev = self.device()?;
        let (cols, cols_p, n_groups) = (job.cols, job.cols_p(), job.n_groups());
        let fref = {
            let slot = &self.slots[k];
            FactorRef {
                u: slot.u.get(cols_p * cols_p)?.dev_ptr(),
                perm: slot.perm.get(cols_p)?.dev_ptr(),
                cols,
                cols_p,
            }
        };
        for (i, (&rows, &dtype)) in job.rows.iter().zip(&job.dtypes).enumerate() {
            self.ws.ensure(&dev, rows, cols)?;
            let b = &mut self.slots[k].weights[i];
            let codes = b.codes.ensure(&dev, rows * cols, "codes")?.dev_ptr_mut();
            let loss = b.loss.ensure(&dev, rows, "loss")?.dev_ptr_mut();
            let dequant = if job.want_dequant {
                b.dequant.ensure(&dev, rows * cols, "dequantized weight")?.dev_ptr_mut()
            } else {
                self.ws.dequant_scratch()?
            };
            let wref = b.weight_ref(rows, cols, dtype, job.widened.get(i).copied().unwrap_or(false))?;
            let gref = GridRef {
                qmeta: b.qmeta.get(rows * n_groups)?.dev_ptr(),
                rows,
                n_groups,
                maxq: job.grid.maxq(),
                pad: n_groups * job.grid.group_size - cols,
                group_size: job.grid.group_size,
                scale_dtype: job.grid.scale_dtype,
            };
            solver::launch_solve_into(&dev, wref, fref, gref, &mut self.ws, SolveOutputs { codes, dequant, loss })?;
            if let Some(layout) = job.pack {
                let n = job.packed_len(rows)?;
                let b = &mut self.slots[k].weights[i];
                let words = b.packed.ensure(&dev, n, "packed words")?.dev_ptr_mut();
                let status = self.slots[k].status.get(status_len(job.rows.len()))?.dev_ptr().addr();
                let bad = DevPtrMut::from_addr(status + 8 * (3 + job.rows.len() + i) as u64);
                // SAFETY: the codes buffer (a whole allocation) holds rows·cols codes the solve
                // just wrote on this stream, `words` the layout's word count, the status word
                // 3 + 2·weights u64.
                unsafe {
                    crate::pack::launch_pack_into(&dev, codes.as_const(), rows, cols, job.grid.bits, layout, words, bad)
                }?;
            }
            if job.want_row_error {
                let b = &mut self.slots[k].weights[i];
                let sums = b.row_error.ensure(&dev, 2 * rows, "row error sums")?.dev_ptr_mut();
                // SAFETY: the weight, codes and records were written on this stream (upload,
                // grid, solve above); `sums` holds 2·rows f64.
                unsafe { solver::launch_row_error(&dev, wref, codes.as_const(), gref, sums) }?;
            }
        }
        Ok(())
    }

    /// Enqueues slot `k`'s results to its pinned buffers on the download stream.
    fn enqueue_download(&mut self, k: usize, job: &Pending) -> Result<()> {
        let dev = self.device()?;
        let down = self.download.clone();
        let (cols, n_groups) = (job.cols, job.n_groups());
        let slot = &mut self.slots[k];
        down.wait(&slot.computed).map_err(ForgeError::driver("ordering the download after compute"))?;
        if job.profile {
            record(&slot.profile.d0, &down)?;
        }
        let s = down.cu_stream();
        use cudarc::driver::result::memcpy_dtoh_async as dtoh;
        let mut bytes = 8 * status_len(job.rows.len());
        for (b, &rows) in slot.weights.iter_mut().zip(&job.rows) {
            let n_packed = job.packed_len(rows)?;
            // SAFETY: every source holds at least the elements copied (ensured at submit); the
            // pinned destinations are not read before `downloaded` completes.
            unsafe {
                if job.pack.is_some() {
                    dtoh(b.out_packed.get(&dev, n_packed)?, b.packed.get(n_packed)?.dev_ptr().addr(), s)
                        .map_err(ForgeError::driver("downloading packed words"))?;
                    bytes += n_packed * 4;
                } else {
                    dtoh(b.out_codes.get(&dev, rows * cols)?, b.codes.get(rows * cols)?.dev_ptr().addr(), s)
                        .map_err(ForgeError::driver("downloading codes"))?;
                    bytes += rows * cols;
                }
                dtoh(b.out_qmeta.get(&dev, rows * n_groups)?, b.qmeta.get(rows * n_groups)?.dev_ptr().addr(), s)
                    .map_err(ForgeError::driver("downloading the grid"))?;
                dtoh(b.out_loss.get(&dev, rows)?, b.loss.get(rows)?.dev_ptr().addr(), s)
                    .map_err(ForgeError::driver("downloading the loss"))?;
                if job.want_dequant {
                    dtoh(b.out_dequant.get(&dev, rows * cols)?, b.dequant.get(rows * cols)?.dev_ptr().addr(), s)
                        .map_err(ForgeError::driver("downloading the dequantized weight"))?;
                    bytes += rows * cols * 4;
                }
                if job.want_row_error {
                    dtoh(b.out_row_error.get(&dev, 2 * rows)?, b.row_error.get(2 * rows)?.dev_ptr().addr(), s)
                        .map_err(ForgeError::driver("downloading the row errors"))?;
                    bytes += rows * 16;
                }
            }
            bytes += rows * n_groups * 4 + rows * 4;
        }
        let n_status = status_len(job.rows.len());
        // SAFETY: as above.
        unsafe { dtoh(slot.out_status.get(&dev, n_status)?, slot.status.get(n_status)?.dev_ptr().addr(), s) }
            .map_err(ForgeError::driver("downloading the status word"))?;
        self.stats.download_bytes += bytes as u64;
        if job.profile {
            record(&slot.profile.d1, &down)?;
        }
        record(&slot.downloaded, &down)
    }

    /// Waits for a submitted job and returns it: reads the status word once, retries a failed
    /// factorisation with more damping (re-solving on the device), reports bad inputs as typed
    /// errors. The slot is free again afterwards, whatever the outcome.
    pub fn collect(&mut self, ticket: Ticket) -> Result<LayerOutcome> {
        let k = ticket.slot;
        let job = match self.slots.get_mut(k).and_then(|s| s.pending.take()) {
            Some(p) if p.seq == ticket.seq => p,
            other => {
                if let (Some(p), Some(s)) = (other, self.slots.get_mut(k)) {
                    s.pending = Some(p);
                }
                return Err(ForgeError::Config("this ticket's job was already collected".into()));
            }
        };
        let r = self.finish(k, job);
        self.stats.jobs += 1;
        r
    }

    fn finish(&mut self, k: usize, mut job: Pending) -> Result<LayerOutcome> {
        let dev = self.device()?;
        self.slots[k].downloaded.synchronize().map_err(ForgeError::driver("waiting for the job"))?;
        let cols = job.cols;
        let n_weights = job.rows.len();
        let status: Vec<u64> = self.slots[k].out_status.get(&dev, status_len(n_weights))?.to_vec();
        for (i, &bad) in status[3..3 + n_weights].iter().enumerate() {
            if bad != 0 {
                let idx = !bad as usize;
                let value = self.staged_weight_value(k, &job, i, idx)?;
                return Err(ForgeError::NonFinite { tensor: "weight", row: idx / cols, col: idx % cols, value });
            }
        }
        if status[0] != 0 {
            let idx = !status[0] as usize;
            let h = self.slots[k].hessian.get(cols * cols)?;
            let value = dev.stream().clone_dtoh(&h.slice(idx..idx + 1)).ok().and_then(|v| v.first().copied());
            return Err(ForgeError::NonFinite {
                tensor: "hessian",
                row: idx / cols,
                col: idx % cols,
                value: value.unwrap_or(f32::NAN),
            });
        }
        let info = status[2] as u32 as i32;
        if info < 0 {
            return Err(ForgeError::Internal(format!("cuSOLVER potrf rejected argument {} (info {info})", -info)));
        }
        let timings = if job.profile { Some(self.timings(k)?) } else { None };
        if job.plan.is_some() && (info > 0 || status[1] != 0) {
            self.retry_factor(k, &mut job)?;
        }
        if let Some(i) = status[3 + n_weights..].iter().position(|&f| f != 0) {
            return Err(ForgeError::Internal(format!("weight {i}: the packer found a code out of range")));
        }
        let n_groups = job.n_groups();
        let gs = job.grid.group_size;
        let mut weights = Vec::with_capacity(n_weights);
        for (i, &rows) in job.rows.iter().enumerate() {
            let b = &mut self.slots[k].weights[i];
            let qmeta = b.out_qmeta.get(&dev, rows * n_groups)?.to_vec();
            let grid = QuantGrid::from_u32(
                &qmeta,
                rows,
                n_groups,
                job.grid.maxq(),
                n_groups * gs - cols,
                gs,
                job.grid.scale_dtype,
            )?;
            // An f16 overflow makes the solve non-finite: name the cause before the symptom.
            grid.check_stored_scales()?;
            let loss = b.out_loss.get(&dev, rows)?.to_vec();
            solver::check_loss_finite(&loss)?;
            let (codes, packed) = match job.pack {
                Some(layout) => {
                    let n = job.packed_len(rows)?;
                    let mut words = vec![0u32; n];
                    parallel_copy(&mut words, b.out_packed.get(&dev, n)?);
                    let words = Array2::from_shape_vec(layout.shape(rows, cols, job.grid.bits)?, words)
                        .map_err(|e| ForgeError::Internal(e.to_string()))?;
                    let p = PackedCodes { layout, bits: job.grid.bits, rows, cols, words };
                    (Array2::zeros((0, 0)), Some(p))
                }
                None => {
                    let mut codes = vec![0u8; rows * cols];
                    parallel_copy(&mut codes, b.out_codes.get(&dev, rows * cols)?);
                    let codes =
                        Array2::from_shape_vec((rows, cols), codes).map_err(|e| ForgeError::Internal(e.to_string()))?;
                    (codes, None)
                }
            };
            let dequant = if job.want_dequant {
                let mut d = vec![0f32; rows * cols];
                parallel_copy(&mut d, b.out_dequant.get(&dev, rows * cols)?);
                Some(Array2::from_shape_vec((rows, cols), d).map_err(|e| ForgeError::Internal(e.to_string()))?)
            } else {
                None
            };
            let row_error = if job.want_row_error {
                let sums = b.out_row_error.get(&dev, 2 * rows)?.to_vec();
                Some(Array2::from_shape_vec((rows, 2), sums).map_err(|e| ForgeError::Internal(e.to_string()))?)
            } else {
                None
            };
            weights.push(QuantizedWeight { grid, codes, packed, loss: Array1::from(loss), dequant, row_error });
        }
        self.stats.weights += n_weights as u64;
        Ok(LayerOutcome { weights, pre_step: job.summary, timings })
    }

    /// Element `idx` of weight `i`'s staged copy in slot `k`, widened (for error messages).
    fn staged_weight_value(&mut self, k: usize, job: &Pending, i: usize, idx: usize) -> Result<f32> {
        let dtype = job.staged_dtypes[i];
        let size = dtype.size();
        let dev = self.device()?;
        let bytes = self.slots[k].weights[i].staged.get(&dev, job.rows[i] * job.cols * size)?;
        let b = bytes
            .get(idx * size..(idx + 1) * size)
            .ok_or_else(|| ForgeError::Internal("reported index past the weight".into()))?;
        Ok(match dtype {
            WeightDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            WeightDtype::F16 => forge_numerics::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
            WeightDtype::BF16 => forge_numerics::bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
            WeightDtype::Fp8E4M3 => forge_numerics::fp8_e4m3_to_f32(b[0]),
        })
    }

    /// The rare path: the optimistic factorisation failed. Attempts `1..=MAX_RETRIES` with
    /// more damping, each checked before the next; then `U = I` (flagged). Re-solves and
    /// re-downloads the slot. Runs when the slot's first pass has finished.
    fn retry_factor(&mut self, k: usize, job: &mut Pending) -> Result<()> {
        let dev = self.device()?;
        let plan = job.plan.clone().ok_or_else(|| ForgeError::Internal("retry without a plan".into()))?;
        let (cols, cols_p) = (job.cols, job.cols_p());
        self.factor_work.set_order(&dev, &plan, cols)?;
        let status = self.prep_status.ensure(&dev, 3, "pre-step status")?;
        let slot = &mut self.slots[k];
        let h = slot.hessian.get(cols * cols)?.dev_ptr();
        let u = slot.u.ensure(&dev, cols_p * cols_p, "factor")?.dev_ptr_mut();
        // SAFETY: as at submit; the slot's first pass has finished (collect waited for it).
        let (ok, damping, retries) =
            unsafe { factor_checked(&dev, &mut self.factor_work, status, h, cols, &plan, u, cols_p, 1) }?;
        job.summary.damping_used = damping as f32;
        job.summary.retries = retries;
        job.summary.warnings = plan.warnings(retries, !ok, damping);
        if !ok {
            job.summary.fallback_identity = true;
            // SAFETY: u holds cols_p² f32.
            unsafe { enqueue_identity(&dev, u, cols_p) }?;
        }
        self.enqueue_solves(k, job)?;
        record(&self.slots[k].computed, dev.stream())?;
        self.enqueue_download(k, job)?;
        self.slots[k].downloaded.synchronize().map_err(ForgeError::driver("waiting for the re-solved job"))
    }

    /// The pre-step alone, checked before returning (retries included), into a factor kept on
    /// the device for any number of later jobs ([`HessianInput::Prepared`]): an expert's gate
    /// and up projections, or a layer whose weight comes later. Allocates the factor.
    pub fn prepare_factor(
        &mut self,
        hessian: HessianInput<'_>,
        cfg: &PreStepConfig,
    ) -> Result<(DeviceFactor, PreStepSummary)> {
        let dev = self.device()?;
        let summary_of = |plan: &PreStepPlan, ok: bool, damping: f64, retries: u32| PreStepSummary {
            perm: plan.perm.clone(),
            dead_columns: plan.dead_columns.clone(),
            damping_used: damping as f32,
            retries,
            fallback_identity: !ok,
            route: PreStepRoute::Gpu,
            warnings: plan.warnings(retries, !ok, damping),
        };
        let cpu = |pre: crate::hessian::PreStep| -> Result<(DeviceFactor, PreStepSummary)> {
            let f = DeviceFactor::upload(&dev, pre.hinv_factor.view(), pre.perm.as_deref())?;
            Ok((f, cpu_summary(&pre)))
        };
        match hessian {
            HessianInput::Host(h) if self.no_device_pre_step.is_some() => cpu(pre_step_cpu(h, None, cfg)?),
            HessianInput::Device(g) if self.no_device_pre_step.is_some() => {
                cpu(pre_step_cpu(g.to_host(&dev)?.view(), None, cfg)?)
            }
            HessianInput::Host(h) => {
                cfg.validate()?;
                let n = h.nrows();
                if h.dim() != (n, n) || n == 0 {
                    return Err(ForgeError::Shape(format!(
                        "the Hessian must be square and non-empty, got {:?}",
                        h.dim()
                    )));
                }
                let plan = PreStepPlan::new((0..n).map(|j| f64::from(h[[j, j]])).collect(), cfg)?;
                let std = h.as_standard_layout();
                let src = std.as_slice().ok_or_else(|| ForgeError::Internal("non-contiguous Hessian".into()))?;
                let buf = self.prep_hessian.ensure(&dev, n * n, "Hessian upload")?;
                dev.stream()
                    .memcpy_htod(src, &mut buf.slice_mut(0..n * n))
                    .map_err(ForgeError::driver("uploading the Hessian"))?;
                let hp = buf.dev_ptr();
                self.prepare_on_device(&dev, hp, n, plan, summary_of)
            }
            HessianInput::Device(g) => {
                cfg.validate()?;
                let n = g.cols();
                let plan = PreStepPlan::new(self.factor_work.diag_to_host(&dev, g.h().dev_ptr(), n)?, cfg)?;
                self.prepare_on_device(&dev, g.h().dev_ptr(), n, plan, summary_of)
            }
            HessianInput::Factor { u, perm } => {
                solver::validate_factor(u, u.nrows(), perm)?;
                let f = DeviceFactor::upload(&dev, u, perm)?;
                let s = PreStepSummary {
                    perm: perm.map(|p| p.to_vec()),
                    dead_columns: Vec::new(),
                    damping_used: 0.0,
                    retries: 0,
                    fallback_identity: false,
                    route: PreStepRoute::Given,
                    warnings: Vec::new(),
                };
                Ok((f, s))
            }
            HessianInput::Prepared { .. } => {
                Err(ForgeError::Config("this factor is prepared already: use it in a job".into()))
            }
            HessianInput::NoTokens => Err(ForgeError::Config(
                "a layer without calibration tokens needs no factor: submit it with HessianInput::NoTokens".into(),
            )),
        }
    }

    fn prepare_on_device(
        &mut self,
        dev: &GpuDevice,
        h: forge_kernel_abi::DevPtr<f32>,
        n: usize,
        plan: PreStepPlan,
        summary_of: impl Fn(&PreStepPlan, bool, f64, u32) -> PreStepSummary,
    ) -> Result<(DeviceFactor, PreStepSummary)> {
        self.factor_work.set_order(dev, &plan, n)?;
        let mut f = DeviceFactor::alloc(dev, n, plan.perm.as_deref())?;
        let cols_p = padded(n);
        let status = self.prep_status.ensure(dev, 3, "pre-step status")?;
        // SAFETY: h holds n² f32 on the device; the factor cols_p² f32; the order was set.
        let (ok, damping, retries) =
            unsafe { factor_checked(dev, &mut self.factor_work, status, h, n, &plan, f.u_mut(), cols_p, 0) }?;
        if !ok {
            // SAFETY: the factor holds cols_p² f32.
            unsafe { enqueue_identity(dev, f.u_mut(), cols_p) }?;
        }
        Ok((f, summary_of(&plan, ok, damping, retries)))
    }

    /// Stage times of slot `k`'s profiled job.
    fn timings(&self, k: usize) -> Result<LayerTimings> {
        let p = &self.slots[k].profile;
        let ms = |a: &CudaEvent, b: &CudaEvent| a.elapsed_ms(b).map_err(ForgeError::driver("reading event times"));
        Ok(LayerTimings {
            upload_ms: ms(&p.up0, &p.up1)?,
            // The wait for the weights' upload (c_pre → c_w) is in none of them.
            pre_step_ms: ms(&p.c0, &p.c_pre)?,
            grid_ms: ms(&p.c_w, &p.c_grid)?,
            solve_ms: ms(&p.c_grid, &p.c_solve)?,
            download_ms: ms(&p.d0, &p.d1)?,
        })
    }
}

fn cpu_summary(pre: &crate::hessian::PreStep) -> PreStepSummary {
    PreStepSummary {
        perm: pre.perm.clone(),
        dead_columns: pre.dead_columns.clone(),
        damping_used: pre.damping_used,
        retries: pre.retries,
        fallback_identity: pre.fallback_identity,
        route: PreStepRoute::Cpu,
        warnings: pre.warnings.clone(),
    }
}

/// Runs `f` with `dev`'s shared engine (made on first use; one per device, reused by every
/// caller: [`crate::Quantizer`], the calibration layer, expert batches).
pub fn with_engine<R>(dev: &Arc<GpuDevice>, f: impl FnOnce(&mut QuantEngine) -> Result<R>) -> Result<R> {
    dev.with_extension(|| QuantEngine::build(dev), f)
}

/// One weight of a job, for memory estimates ([`FootprintTracker`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightShape {
    /// Output features.
    pub rows: usize,
    /// The dtype uploaded.
    pub dtype: WeightDtype,
    /// Bytes of its FP8 block scales, for a block-scaled FP8 weight.
    pub scale_bytes: Option<usize>,
}

/// The shape of one engine job, for memory estimates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobShape {
    /// Input features (shared by the weights).
    pub cols: usize,
    /// The weights, in job order.
    pub weights: Vec<WeightShape>,
    /// A Hessian is factored (GPTQ with calibration data), not `U = I`.
    pub hessian: bool,
    /// The dequantized weights are downloaded too.
    pub want_dequant: bool,
}

/// Device and page-locked host bytes an engine holds after a sequence of jobs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineFootprint {
    /// Device memory: both slots' buffers, the solver workspace, the pre-step buffers and
    /// [`DEVICE_RESERVE`].
    pub device: u64,
    /// Page-locked host memory: both slots' staging and result buffers.
    pub pinned: u64,
}

/// Device memory the estimate adds for what the engine does not size itself: the kernels
/// module, the cuBLAS/cuSOLVER handles and their default workspaces.
pub const DEVICE_RESERVE: u64 = 256 << 20;

/// Bytes the cuSOLVER `potrf` workspace is estimated at per matrix column (a panel of 512
/// f64 columns; the library sizes it at run time).
const POTRF_BYTES_PER_COL: u64 = 8 * 512;

/// The engine's buffers grow to the largest job seen, per slot and per weight position, and
/// never shrink ([`QuantEngine`] module docs). This tracks that growth over a sequence of jobs
/// without a device, so a run can check its memory before starting: any job may land in
/// either slot, so both slots are counted at the maxima.
#[derive(Clone, Debug, Default)]
pub struct FootprintTracker {
    /// Per weight position: (device, pinned) maxima.
    per_weight: Vec<(u64, u64)>,
    /// Per slot, besides the weights: (device, pinned) maxima.
    fixed: (u64, u64),
    /// Solver workspace and pre-step buffers (one for both slots).
    shared: u64,
}

impl FootprintTracker {
    /// An engine that has run nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one more job with `grid`.
    pub fn add(&mut self, job: &JobShape, grid: &GridConfig) {
        let c = job.cols as u64;
        let cp = padded(job.cols) as u64;
        let ng = grid.n_groups(job.cols) as u64;
        for (i, w) in job.weights.iter().enumerate() {
            let r = w.rows as u64;
            let rc = r.saturating_mul(c);
            let stored = rc.saturating_mul(w.dtype.size() as u64);
            let scales = w.scale_bytes.map_or(0, |n| n as u64);
            let widened = if w.scale_bytes.is_some() { 4 * rc } else { 0 };
            let dequant = if job.want_dequant { 4 * rc } else { 0 };
            // Codes, records, loss, row-error sums; packed words only on the device (the
            // pinned download holds them or the codes, never both).
            let results = rc + 4 * r * ng + 4 * r + 16 * r;
            let packed = r.saturating_mul((c.saturating_mul(u64::from(grid.bits))).div_ceil(32) * 4);
            let device = stored + scales + widened + results + packed + dequant;
            let pinned = stored + scales + results + dequant;
            if self.per_weight.len() <= i {
                self.per_weight.push((0, 0));
            }
            let m = &mut self.per_weight[i];
            *m = (m.0.max(device), m.1.max(pinned));
            // The solver workspace: codes, dequantized weight, loss, working weights and
            // errors (padded), decoded grid, column groups.
            let rp = padded(w.rows) as u64;
            let ws = rc + 4 * rc + 4 * r + 8 * rp * cp + 8 * r * c.div_ceil(32) + 4 * cp;
            self.shared =
                self.shared.max(ws + if job.hessian { 16 * c * c + 12 * c + POTRF_BYTES_PER_COL * c } else { 0 });
        }
        let n = job.weights.len() as u64;
        let hessian_dev = if job.hessian { 4 * c * c } else { 0 };
        let fixed_dev = hessian_dev + 4 * cp * cp + 4 * cp + 8 * (3 + n) + 4 * c;
        // A Hessian is staged as `c²` f32; with the pre-step on the CPU the factor as `cp²`.
        let fixed_pinned = if job.hessian { 4 * cp * cp } else { 0 } + 8 * (3 + n);
        self.fixed = (self.fixed.0.max(fixed_dev), self.fixed.1.max(fixed_pinned));
    }

    /// What the engine holds after the jobs added so far.
    pub fn total(&self) -> EngineFootprint {
        let (wd, wp) = self.per_weight.iter().fold((0u64, 0u64), |a, w| (a.0 + w.0, a.1 + w.1));
        EngineFootprint {
            device: 2 * (wd + self.fixed.0) + self.shared + DEVICE_RESERVE,
            pinned: 2 * (wp + self.fixed.1),
        }
    }
}
