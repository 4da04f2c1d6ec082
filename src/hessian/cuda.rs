//! Host side of the GPU Hessian (`hessian_xtx_*`, `hessian_blend`) and of the GPU pre-step
//! (`hessian_diag`, `prestep_gather`, cuSOLVER `Xpotrf` + cuBLAS, `prestep_extract`).
//!
//! Accumulation: `H ← β·H + α·XᵀX` per chunk of at most [`MAX_CHUNK_TOKENS`] tokens, with
//! `α = 2/(n+m)`, `β = n/(n+m)` counted in tokens, so `H = (2/N)·Σ XᵀX` as the CPU
//! [`crate::hessian::HessianAccumulator`]. Each chunk's `S = XᵀX` goes to a scratch buffer
//! first and is checked (a NaN/inf activation or an f32 overflow is a typed error and
//! leaves `H` as it was) before the blend. Device memory: `H` and `S` (`cols²` f32 each) and,
//! for host input, one upload buffer of `MAX_CHUNK_TOKENS·cols` elements.
//!
//! Pre-step: the same policy as [`super::pre_step_cpu`] ([`PreStepPlan`]), in f64 on the
//! device: the reversed, permuted, dead-fixed, damped Hessian is factored by cuSOLVER
//! `potrf(UPPER)` (`R = L̂ᵀ`) and `R⁻¹` come from one block recursion of cuBLAS calls over
//! cuSOLVER-factored diagonal blocks ([`FactorMethod`]), and `U = J L̂⁻¹ J` is read out of `R⁻¹` with
//! [`forge_kernel_abi::hessian::prestep_factor_source`] straight into the solver's padded
//! layout. cuSOLVER and cuBLAS are loaded at run time ([`crate::device`]).

use super::{PreStep, PreStepConfig, PreStepPlan};
use crate::calib::{check_finite_bytes, ActivationDtype, ActivationView};
use crate::device::{view_ptr, DeviceBuf, DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::{ForgeError, Result};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, LaunchConfig};
use forge_kernel_abi::hessian::{
    BlendArgs, BlendSymArgs, DiagArgs, ExtractArgs, FirstFailureArgs, GatherArgs, HessianSharedLayout, IdentityArgs,
    XtxArgs, ZeroColumnsArgs, HESSIAN_THREADS, HESSIAN_TILE,
};
use forge_kernel_abi::{
    DevPtr, DevPtrMut, HessianBlend, HessianBlendSym, HessianDiag, HessianXtxBf16, HessianXtxF16, HessianXtxF32,
    PrestepExtract, PrestepFirstFailure, PrestepGather, PrestepIdentity, PrestepZeroColumns,
};
use ndarray::{Array2, ArrayView2};
use std::sync::Arc;

/// Most tokens one `hessian_xtx` launch (and one host upload) takes: bounds the upload buffer
/// (`8192·cols` elements) and the length of each f32 sum.
pub const MAX_CHUNK_TOKENS: usize = 8192;

/// Largest supported side of `H` (u32 kernel arguments; `cols²` elements must be indexable).
pub const MAX_HESSIAN_COLS: usize = 65_535;

/// Threads per block of the element-wise kernels.
const EW_THREADS: u32 = 256;

fn check_cols(cols: usize) -> Result<()> {
    if cols == 0 || cols > MAX_HESSIAN_COLS {
        return Err(ForgeError::Shape(format!("a Hessian needs 1..={MAX_HESSIAN_COLS} input columns, got {cols}")));
    }
    Ok(())
}

/// A grid-stride launch over `items` elements (at most 64 blocks per SM: enough to fill it).
fn ew_config(dev: &GpuDevice, items: usize) -> Result<LaunchConfig> {
    let cap = (dev.sm_count()? as usize * 64).max(1);
    let blocks = items.div_ceil(EW_THREADS as usize).clamp(1, cap) as u32;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (EW_THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// Activations resident on the device (`tokens × cols`, row-major, in their own dtype), e.g.
/// captured from a model's forward pass, so accumulation needs no host round trip.
pub struct DeviceActivations {
    bytes: CudaSlice<u8>,
    dtype: ActivationDtype,
    tokens: usize,
    cols: usize,
}

impl DeviceActivations {
    /// Uploads host activations.
    pub fn upload(dev: &GpuDevice, x: ActivationView<'_>) -> Result<Self> {
        let (tokens, cols) = x.dim();
        let bytes = dev.stream().clone_htod(&x.to_bytes()[..]).map_err(ForgeError::driver("uploading activations"))?;
        Ok(DeviceActivations { bytes, dtype: x.dtype(), tokens, cols })
    }

    /// Wraps bytes already on the device (`tokens·cols` elements of `dtype`; a `CudaSlice` is
    /// a whole allocation, so it has the alignment the kernels' vector loads need).
    pub fn from_device(bytes: CudaSlice<u8>, dtype: ActivationDtype, tokens: usize, cols: usize) -> Result<Self> {
        if bytes.len() != tokens * cols * dtype.size() {
            return Err(ForgeError::Shape(format!(
                "{} device bytes for {tokens}×{cols} {dtype:?} activations",
                bytes.len()
            )));
        }
        Ok(DeviceActivations { bytes, dtype, tokens, cols })
    }

    /// `(tokens, cols)`.
    pub fn dim(&self) -> (usize, usize) {
        (self.tokens, self.cols)
    }

    /// Element type.
    pub fn dtype(&self) -> ActivationDtype {
        self.dtype
    }
}

/// Scratch of the accumulation: `S` of one chunk, the host-upload buffer, the NaN flag, and
/// (tensor-core path) the blended `H` before it replaces the old one.
struct Scratch {
    s: CudaSlice<f32>,
    upload: Option<CudaSlice<u8>>,
    first_bad: CudaSlice<u64>,
    next_h: Option<CudaSlice<f32>>,
}

/// A running Hessian on the device: `H = (2/N)·Σ XᵀX` over the `N` tokens seen so far,
/// `(cols, cols)` f32, row-major, exactly symmetric.
pub struct GpuHessian {
    h: CudaSlice<f32>,
    cols: usize,
    tokens: u64,
    scratch: Option<Scratch>,
    /// Recorded on the compute stream after every change of `H`: the device engine copies
    /// `H` on a side stream that waits only for this, not for the jobs queued before it.
    ready: Option<CudaEvent>,
}

impl GpuHessian {
    /// `H = 0`, no tokens, for a layer with `cols` input features.
    pub fn new(dev: &GpuDevice, cols: usize) -> Result<Self> {
        check_cols(cols)?;
        let h = dev.stream().alloc_zeros::<f32>(cols * cols).map_err(ForgeError::driver("allocating the Hessian"))?;
        let mut g = GpuHessian { h, cols, tokens: 0, scratch: None, ready: None };
        g.mark_ready(dev)?;
        Ok(g)
    }

    /// Uploads a Hessian accumulated elsewhere over `tokens` tokens (later updates weight it
    /// by that count). Must be square and finite.
    pub fn from_host(dev: &GpuDevice, h: ArrayView2<'_, f32>, tokens: u64) -> Result<Self> {
        let (n, c) = h.dim();
        if n != c {
            return Err(ForgeError::Shape(format!("the Hessian must be square, got {n}×{c}")));
        }
        check_cols(n)?;
        if let Some(((row, col), &value)) = h.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(ForgeError::NonFinite { tensor: "hessian", row, col, value });
        }
        let data = h.as_standard_layout();
        let slice = data.as_slice().ok_or_else(|| ForgeError::Shape("non-contiguous Hessian".into()))?;
        let h = dev.stream().clone_htod(slice).map_err(ForgeError::driver("uploading the Hessian"))?;
        let mut g = GpuHessian { h, cols: n, tokens, scratch: None, ready: None };
        g.mark_ready(dev)?;
        Ok(g)
    }

    /// Records [`GpuHessian::ready`] on the compute stream (after the work that changed `H`).
    fn mark_ready(&mut self, dev: &GpuDevice) -> Result<()> {
        if self.ready.is_none() {
            self.ready = Some(dev.context().new_event(None).map_err(ForgeError::driver("creating an event"))?);
        }
        match &self.ready {
            Some(e) => e.record(dev.stream()).map_err(ForgeError::driver("recording the Hessian's event")),
            None => Ok(()),
        }
    }

    /// The event after the last change of `H` (on the compute stream).
    pub(crate) fn ready(&self) -> Option<&CudaEvent> {
        self.ready.as_ref()
    }

    /// Input features (the side of `H`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Tokens seen so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The device buffer of `H` (`cols²` f32, row-major).
    pub fn h(&self) -> &CudaSlice<f32> {
        &self.h
    }

    /// Downloads `H`.
    pub fn to_host(&self, dev: &GpuDevice) -> Result<Array2<f32>> {
        let v = dev.stream().clone_dtoh(&self.h).map_err(ForgeError::driver("downloading the Hessian"))?;
        Array2::from_shape_vec((self.cols, self.cols), v).map_err(|e| ForgeError::Shape(e.to_string()))
    }

    /// Back to `H = 0` with no tokens, keeping every buffer (a calibration loop reuses one
    /// Hessian per shape instead of allocating one per layer or expert).
    pub fn reset(&mut self, dev: &GpuDevice) -> Result<()> {
        dev.stream().memset_zeros(&mut self.h).map_err(ForgeError::driver("clearing the Hessian"))?;
        self.tokens = 0;
        self.mark_ready(dev)
    }

    /// Frees the scratch buffers (`S` and the upload buffer); the next update allocates them again.
    pub fn release_scratch(&mut self) {
        self.scratch = None;
    }

    fn scratch(&mut self, dev: &GpuDevice) -> Result<&mut Scratch> {
        if self.scratch.is_none() {
            let s = dev.stream();
            self.scratch = Some(Scratch {
                s: s.alloc_zeros::<f32>(self.cols * self.cols)
                    .map_err(ForgeError::driver("allocating Hessian scratch"))?,
                upload: None,
                first_bad: s.alloc_zeros::<u64>(1).map_err(ForgeError::driver("allocating the NaN flag"))?,
                next_h: None,
            });
        }
        self.scratch.as_mut().ok_or_else(|| ForgeError::Internal("Hessian scratch missing".into()))
    }

    /// Adds host activations `x: (tokens, cols)` in chunks of at most [`MAX_CHUNK_TOKENS`]
    /// tokens. An empty batch is a no-op. Wrong column count, a NaN/inf activation or an f32
    /// overflow of `XᵀX` is a typed error; chunks before the failing one stay accumulated
    /// (the error's row says where it stopped), the failing chunk leaves `H` unchanged.
    pub fn update(&mut self, dev: &GpuDevice, x: ActivationView<'_>) -> Result<()> {
        let r = self.update_host_chunks(dev, x);
        // Also after an error: the chunks before it changed `H`.
        self.mark_ready(dev).and(r)
    }

    fn update_host_chunks(&mut self, dev: &GpuDevice, x: ActivationView<'_>) -> Result<()> {
        let (m, cols) = x.dim();
        self.check_batch_cols(cols)?;
        super::cpu::add_tokens(self.tokens, m)?;
        let size = x.dtype().size();
        let stream = dev.stream().clone();
        let mut t0 = 0;
        while t0 < m {
            let t1 = (t0 + MAX_CHUNK_TOKENS).min(m);
            let chunk = x.rows(t0, t1)?;
            let bytes = chunk.to_bytes();
            let need = MAX_CHUNK_TOKENS.min(m) * cols * size;
            let sc = self.scratch(dev)?;
            if sc.upload.as_ref().is_none_or(|u| u.len() < need) {
                sc.upload = None; // free the old buffer before allocating the larger one
                                  // SAFETY: every byte the kernel reads is written by the copy below first.
                sc.upload = Some(
                    unsafe { stream.alloc::<u8>(need) }.map_err(ForgeError::driver("allocating the upload buffer"))?,
                );
            }
            let up = sc.upload.as_mut().ok_or_else(|| ForgeError::Internal("upload buffer missing".into()))?;
            let mut dst = up.slice_mut(0..bytes.len());
            stream.memcpy_htod(&bytes[..], &mut dst).map_err(ForgeError::driver("uploading activations"))?;
            if tensor_core_input(x.dtype()).is_some() {
                // 16-bit activations: the same tensor-core accumulation as device input.
                let addr = up.dev_ptr().addr();
                if let Err(e) = self.tensor_core_chunk(dev, addr, x.dtype(), t1 - t0) {
                    chunk.check_finite(t0)?;
                    return Err(e);
                }
                t0 = t1;
                continue;
            }
            let view = up.slice(0..bytes.len());
            let bad = launch_xtx_checked(dev, &view, x.dtype(), t1 - t0, cols, &mut sc.s, &mut sc.first_bad)?;
            if let Some(idx) = bad {
                chunk.check_finite(t0)?;
                return Err(overflow_error(dev, &sc.s, idx, cols));
            }
            self.blend(dev, (t1 - t0) as u64)?;
            t0 = t1;
        }
        Ok(())
    }

    /// As [`GpuHessian::update`] for activations already on the device. f16/bf16 activations
    /// go through the tensor cores when cuBLAS loads (exact products, f32 accumulation; see
    /// [`GpuHessian::tensor_core_chunk`]), f32 ones through the tiled SYRK kernel.
    pub fn update_device(&mut self, dev: &GpuDevice, x: &DeviceActivations) -> Result<()> {
        let (m, cols) = x.dim();
        self.update_device_view(dev, &x.bytes.as_view(), x.dtype, m, cols)
    }

    /// As [`GpuHessian::update_device`] for `tokens × cols` activations of `dtype` that are
    /// part of a larger device buffer (the forward pass's Linear inputs). `x` starts at a
    /// 16-byte aligned address (the kernels' vector loads) and holds exactly those elements.
    pub fn update_device_view(
        &mut self,
        dev: &GpuDevice,
        x: &CudaView<'_, u8>,
        dtype: ActivationDtype,
        tokens: usize,
        cols: usize,
    ) -> Result<()> {
        if x.len() != tokens * cols * dtype.size() {
            return Err(ForgeError::Shape(format!(
                "{} device bytes for {tokens}×{cols} {dtype:?} activations",
                x.len()
            )));
        }
        if !view_ptr(x, dev.stream()).addr().is_multiple_of(16) {
            return Err(ForgeError::Internal("device activations must start 16-byte aligned".into()));
        }
        let r = self.update_device_chunks(dev, x, dtype, tokens, cols);
        self.mark_ready(dev).and(r)
    }

    fn update_device_chunks(
        &mut self,
        dev: &GpuDevice,
        x: &CudaView<'_, u8>,
        dtype: ActivationDtype,
        m: usize,
        cols: usize,
    ) -> Result<()> {
        self.check_batch_cols(cols)?;
        super::cpu::add_tokens(self.tokens, m)?;
        let size = dtype.size();
        let mut t0 = 0;
        while t0 < m {
            let t1 = (t0 + MAX_CHUNK_TOKENS).min(m);
            // Chunks start at multiples of `cols` elements: the alignment the kernels need.
            let view = x.slice(t0 * cols * size..t1 * cols * size);
            if tensor_core_input(dtype).is_some() {
                let addr = view_ptr(&view, dev.stream()).addr();
                if let Err(e) = self.tensor_core_chunk(dev, addr, dtype, t1 - t0) {
                    let host = dev.stream().clone_dtoh(&view).map_err(ForgeError::driver("downloading activations"))?;
                    check_finite_bytes(&host, dtype, cols, t0)?;
                    return Err(e);
                }
                t0 = t1;
                continue;
            }
            let sc = self.scratch(dev)?;
            let bad = launch_xtx_checked(dev, &view, dtype, t1 - t0, cols, &mut sc.s, &mut sc.first_bad)?;
            if let Some(idx) = bad {
                let host = dev.stream().clone_dtoh(&view).map_err(ForgeError::driver("downloading activations"))?;
                check_finite_bytes(&host, dtype, cols, t0)?;
                return Err(overflow_error(dev, &sc.s, idx, cols));
            }
            self.blend(dev, (t1 - t0) as u64)?;
            t0 = t1;
        }
        Ok(())
    }

    /// One chunk of `m ≤ MAX_CHUNK_TOKENS` 16-bit tokens at device address `x` on the tensor
    /// cores: `S = XᵀX` by cuBLAS (bf16/f16 products are exact in f32; the sums are f32 on the
    /// tensor cores), then one kernel forms `β·H + α·S` from `S`'s upper triangle into a second
    /// buffer, exactly symmetric and checked for NaN/inf; only a clean chunk replaces `H`, so a
    /// failing chunk (an error naming the first bad entry of `S`) leaves it as it was.
    fn tensor_core_chunk(&mut self, dev: &GpuDevice, x: u64, dtype: ActivationDtype, m: usize) -> Result<()> {
        let input = tensor_core_input(dtype)
            .ok_or_else(|| ForgeError::Internal("f32 activations have no exact tensor-core product".into()))?;
        let cols = self.cols;
        let stream = dev.stream().clone();
        let nt = cols.div_ceil(32) as u32;
        let cfg = LaunchConfig {
            grid_dim: (nt, nt, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: forge_kernel_abi::hessian::BLEND_SYM_SHARED_BYTES,
        };
        let (h_now, n) = (self.h.dev_ptr(), self.tokens as f64);
        self.scratch(dev)?;
        let Some(sc) = self.scratch.as_mut() else {
            return Err(ForgeError::Internal("Hessian scratch missing".into()));
        };
        let s_addr = sc.s.dev_ptr_mut().addr();
        // SAFETY: x holds m·cols elements of dtype from its address; s cols² f32.
        dev.with_blas(|b| unsafe { b.gemm_aat(input, cols, m, x, s_addr) })?;
        if sc.next_h.is_none() {
            sc.next_h = Some(dev.alloc::<f32>(cols * cols, "Hessian blend buffer")?);
        }
        stream.memset_zeros(&mut sc.first_bad).map_err(ForgeError::driver("resetting the NaN flag"))?;
        let total = n + m as f64;
        let next = sc.next_h.as_mut().ok_or_else(|| ForgeError::Internal("blend buffer missing".into()))?;
        let args = BlendSymArgs {
            h: h_now,
            out: next.dev_ptr_mut(),
            s: sc.s.dev_ptr(),
            cols: cols as u32,
            alpha: (2.0 / total) as f32,
            beta: (n / total) as f32,
            first_bad: sc.first_bad.dev_ptr_mut(),
        };
        // SAFETY: h, out, s hold cols² f32 (out distinct); grid and shared memory as the
        // kernel's contract.
        unsafe { dev.launch::<HessianBlendSym>(cfg, &args) }?;
        let flag = stream.clone_dtoh(&sc.first_bad).map_err(ForgeError::driver("reading the NaN flag"))?;
        if let Some(&f) = flag.first().filter(|&&f| f != 0) {
            return Err(overflow_error(dev, &sc.s, !f as usize, cols));
        }
        if let Some(next) = sc.next_h.as_mut() {
            std::mem::swap(&mut self.h, next);
        }
        self.tokens += m as u64;
        Ok(())
    }

    fn check_batch_cols(&self, cols: usize) -> Result<()> {
        if cols != self.cols {
            return Err(ForgeError::Shape(format!("activations have {cols} columns, the Hessian has {}", self.cols)));
        }
        Ok(())
    }

    /// `H ← β·H + α·S` for a chunk of `m` tokens (α, β rounded from f64, as on the CPU).
    fn blend(&mut self, dev: &GpuDevice, m: u64) -> Result<()> {
        let n = self.tokens as f64;
        let total = n + m as f64;
        let (alpha, beta) = ((2.0 / total) as f32, (n / total) as f32);
        let cfg = ew_config(dev, self.cols * self.cols)?;
        let sc = self.scratch.as_ref().ok_or_else(|| ForgeError::Internal("Hessian scratch missing".into()))?;
        let args = BlendArgs { h: self.h.dev_ptr_mut(), s: sc.s.dev_ptr(), cols: self.cols as u32, alpha, beta };
        // SAFETY: h and s hold cols² f32 each.
        unsafe { dev.launch::<HessianBlend>(cfg, &args) }?;
        self.tokens += m;
        Ok(())
    }
}

/// The cuBLAS input type of activations that accumulate on the tensor cores (16-bit ones,
/// when cuBLAS loads); `None` for f32 or without cuBLAS.
fn tensor_core_input(dtype: ActivationDtype) -> Option<crate::device::cublas::BlasInput> {
    let input = match dtype {
        ActivationDtype::F16 => crate::device::cublas::BlasInput::F16,
        ActivationDtype::BF16 => crate::device::cublas::BlasInput::BF16,
        ActivationDtype::F32 => return None,
    };
    crate::device::cublas::cublas_available().is_ok().then_some(input)
}

/// Enqueues `S = XᵀX` of `tokens` rows of `x` and waits for it; `Some(flat index)` of the
/// first non-finite entry of `S`, if any.
fn launch_xtx_checked(
    dev: &GpuDevice,
    x: &CudaView<'_, u8>,
    dtype: ActivationDtype,
    tokens: usize,
    cols: usize,
    s: &mut CudaSlice<f32>,
    first_bad: &mut CudaSlice<u64>,
) -> Result<Option<usize>> {
    let stream = dev.stream();
    stream.memset_zeros(first_bad).map_err(ForgeError::driver("resetting the NaN flag"))?;
    let nt = cols.div_ceil(HESSIAN_TILE as usize) as u32;
    let cfg = LaunchConfig {
        grid_dim: (nt, nt, 1),
        block_dim: (HESSIAN_THREADS, 1, 1),
        shared_mem_bytes: HessianSharedLayout::new().total,
    };
    let args = XtxArgs {
        x: view_ptr(x, stream),
        tokens: tokens as u32,
        cols: cols as u32,
        s: s.dev_ptr_mut(),
        first_bad: first_bad.dev_ptr_mut(),
    };
    // SAFETY: x holds tokens·cols elements of dtype starting at a multiple of cols elements
    // of a device allocation; s holds cols² f32 (cols ≤ MAX_HESSIAN_COLS so nt ≤ 65535 fits
    // gridDim.y); block and shared memory as the kernel's contract.
    unsafe {
        match dtype {
            ActivationDtype::F32 => dev.launch::<HessianXtxF32>(cfg, &args),
            ActivationDtype::F16 => dev.launch::<HessianXtxF16>(cfg, &args),
            ActivationDtype::BF16 => dev.launch::<HessianXtxBf16>(cfg, &args),
        }
    }?;
    let flag = stream.clone_dtoh(&*first_bad).map_err(ForgeError::driver("reading the NaN flag"))?;
    Ok(flag.first().filter(|&&f| f != 0).map(|&f| !f as usize))
}

/// The error for a non-finite `S` entry whose activations were all finite: f32 overflow.
fn overflow_error(dev: &GpuDevice, s: &CudaSlice<f32>, idx: usize, cols: usize) -> ForgeError {
    let value =
        dev.stream().clone_dtoh(&s.slice(idx..idx + 1)).ok().and_then(|v| v.first().copied()).unwrap_or(f32::INFINITY);
    ForgeError::NonFinite { tensor: "XᵀX (f32 overflow)", row: idx / cols, col: idx % cols, value }
}

// ---------------------------------------------------------------------------------------
// Pre-step on the GPU: gather (f64), cuSOLVER potrf (f64), cuBLAS trsm (f64), extract (f32)
// ---------------------------------------------------------------------------------------

/// Device addresses a factorisation attempt reports to (slots of a status word the caller
/// zeroes first): `!index` of the first non-finite Hessian entry, `!index` of the first bad
/// factor entry, and cuSOLVER's i32 `info`.
#[derive(Clone, Copy)]
pub(crate) struct FactorStatus {
    pub hessian_bad: DevPtrMut<u64>,
    pub factor_bad: DevPtrMut<u64>,
    pub info: u64,
}

/// Device buffers of the GPU pre-step, grown to the largest side seen and then reused.
/// Where f64 is used and why (docs/design.md §5): the gathered, damped matrix and its
/// Cholesky factor `R` and inverse `R⁻¹` are f64 (a damped Hessian's condition number can
/// reach 1e8, which f32 cannot factor reliably); `U` comes out in f32, the solver's precision.
#[derive(Default)]
pub(crate) struct FactorWork {
    a: DeviceBuf<f64>,
    inv: DeviceBuf<f64>,
    diag: DeviceBuf<f32>,
    order: DeviceBuf<u32>,
    pub(crate) method: FactorMethod,
    infos: DeviceBuf<i32>,
    pub(crate) graphs: RecursionGraphs,
}

/// Everything a captured blocked recursion's kernels name: a graph replays only where all
/// of it is unchanged (buffers grow and move; the side and method change the calls).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct RecursionKey {
    n: usize,
    leaf: usize,
    gemm: bool,
    buffers: [u64; 5],
}

/// The blocked recursion ([`FactorMethod::Blocked`], [`FactorMethod::BlockedGemm`]) captured
/// into CUDA graphs, one per side: its ~4·n/leaf cuSOLVER and cuBLAS calls cost the host
/// 2–7 ms per layer to enqueue one by one (H200, `gpu_pipeline`), one graph launch a few µs.
/// A side is captured on its second use (the first, run directly, sizes the workspaces, which
/// must not move during a capture); a failed capture turns capturing off for good and says why.
pub(crate) struct RecursionGraphs {
    /// Capture and replay (else every recursion is enqueued call by call).
    pub(crate) enabled: bool,
    captured: Vec<(RecursionKey, SendGraph, usize)>,
    seen: Vec<RecursionKey>,
    /// Why capturing stopped, once it failed.
    pub(crate) failed: Option<String>,
    /// Recursions replayed from a graph, and captures made.
    pub(crate) replays: u64,
    pub(crate) captures: u64,
}

impl Default for RecursionGraphs {
    fn default() -> Self {
        RecursionGraphs { enabled: true, captured: Vec::new(), seen: Vec::new(), failed: None, replays: 0, captures: 0 }
    }
}

/// A captured graph that may move to another thread with the engine that owns it.
struct SendGraph(cudarc::driver::CudaGraph);

// SAFETY: CUDA graph and executable-graph handles are not tied to a thread; the driver calls
// on them bind the context first (cudarc), and `&mut` access makes them one at a time.
unsafe impl Send for SendGraph {}

/// Graphs kept at once: the sides of an expert (gate/up and down) and of a dense layer.
const MAX_GRAPHS: usize = 4;

impl FactorWork {
    /// `diag H` of a device Hessian on the host (one small copy that waits for `H`).
    pub(crate) fn diag_to_host(&mut self, dev: &GpuDevice, h: DevPtr<f32>, n: usize) -> Result<Vec<f64>> {
        let stream = dev.stream().clone();
        self.diag_to_host_on(dev, &stream, h, n)
    }

    /// [`FactorWork::diag_to_host`] on `stream` (`h` ready there); waits for that stream only.
    pub(crate) fn diag_to_host_on(
        &mut self,
        dev: &GpuDevice,
        stream: &Arc<CudaStream>,
        h: DevPtr<f32>,
        n: usize,
    ) -> Result<Vec<f64>> {
        let diag = self.diag.ensure(dev, n, "pre-step diagonal")?;
        let args = DiagArgs { h, cols: n as u32, out: diag.dev_ptr_mut() };
        // SAFETY: h holds n² f32 ready on `stream` (caller), diag at least n (only this
        // function uses it, and it waits for its copy below).
        unsafe { dev.launch_on::<HessianDiag>(stream, ew_config(dev, n)?, &args) }?;
        let d = stream.clone_dtoh(&diag.slice(0..n)).map_err(ForgeError::driver("downloading diag(H)"))?;
        Ok(d.into_iter().map(f64::from).collect())
    }

    /// Uploads the processing order of a plan (`n` entries).
    pub(crate) fn set_order(&mut self, dev: &GpuDevice, plan: &PreStepPlan, n: usize) -> Result<()> {
        let order: Vec<u32> = plan.order(n).iter().map(|&j| j as u32).collect();
        let buf = self.order.ensure(dev, n, "pre-step column order")?;
        dev.stream()
            .memcpy_htod(&order, &mut buf.slice_mut(0..n))
            .map_err(ForgeError::driver("uploading the column order"))
    }

    /// Enqueues one factorisation with `damping` on the compute stream, without waiting:
    /// gather (reversed, permuted, dead-fixed, damped, symmetrised f64 matrix, and the
    /// identity), `R` and `R⁻¹` ([`FactorMethod`]), and `U` extracted into `u`,
    /// a `cols_p × cols_p` f32 buffer (identity in the padding). Failures land in `status`.
    ///
    /// # Safety
    /// `h` is the device address of `n²` f32 ready on the compute stream, `u` of at least
    /// `cols_p²` f32, `cols_p ≥ n`; the order was set for this `n`; `status` points to live
    /// device memory.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn enqueue_attempt(
        &mut self,
        dev: &GpuDevice,
        h: DevPtr<f32>,
        n: usize,
        damping: f64,
        u: DevPtrMut<f32>,
        cols_p: usize,
        status: FactorStatus,
    ) -> Result<()> {
        self.enqueue_attempt_marked(dev, h, n, damping, (u, cols_p), status, &mut |_| Ok(()))
    }

    /// [`Self::enqueue_attempt`], calling `mark(k)` on the compute stream before the gather
    /// (0) and after the gather, potrf, inverse and extract (1–4): the profile's events.
    #[allow(clippy::too_many_arguments)]
    unsafe fn enqueue_attempt_marked(
        &mut self,
        dev: &GpuDevice,
        h: DevPtr<f32>,
        n: usize,
        damping: f64,
        (u, cols_p): (DevPtrMut<f32>, usize),
        status: FactorStatus,
        mark: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        let nn = n.checked_mul(n).ok_or_else(|| ForgeError::Shape(format!("a {n}×{n} Hessian is too large")))?;
        let a = self.a.ensure(dev, nn, "pre-step matrix")?.dev_ptr_mut();
        let inv = self.inv.ensure(dev, nn, "pre-step inverse factor")?.dev_ptr_mut();
        let order = self.order.get(n)?.dev_ptr();
        let args = GatherArgs { h, cols: n as u32, order, damping, a, inv, first_bad: status.hessian_bad };
        mark(0)?;
        dev.launch::<PrestepGather>(ew_config(dev, nn)?, &args)?;
        mark(1)?;
        let (r, x) = (a.addr(), inv.addr());
        match self.method {
            FactorMethod::Blocked { leaf } | FactorMethod::BlockedGemm { leaf } => {
                let (leaf, gemm) = (leaf.max(1), matches!(self.method, FactorMethod::BlockedGemm { .. }));
                let infos = self.infos.ensure(dev, n, "pre-step block infos")?.dev_ptr_mut().addr();
                let leaves = self.blocked_recursion(dev, (n, r, x), (leaf, gemm), infos)?;
                mark(2)?;
                let args = FirstFailureArgs {
                    infos: DevPtr::from_addr(infos),
                    count: leaves as u32,
                    info: DevPtrMut::from_addr(status.info),
                };
                dev.launch::<PrestepFirstFailure>(LaunchConfig::for_num_elems(1), &args)?;
            }
            FactorMethod::PotrfTrsm { block } => {
                dev.with_dense_solver(|s| s.potrf_upper_async(dev, r, n, status.info))?;
                mark(2)?;
                dev.with_blas(|b| invert_by_trsm(b, n, r, x, block))?;
            }
            FactorMethod::PotrfRecursiveInverse { leaf, gemm } => {
                dev.with_dense_solver(|s| s.potrf_upper_async(dev, r, n, status.info))?;
                mark(2)?;
                dev.with_blas(|b| invert_recursive(b, n, r, x, (0, n), leaf.max(1), gemm))?;
            }
        }
        mark(3)?;
        let args =
            ExtractArgs { a: inv.as_const(), cols: n as u32, cols_p: cols_p as u32, u, first_bad: status.factor_bad };
        dev.launch::<PrestepExtract>(ew_config(dev, cols_p * cols_p)?, &args)?;
        mark(4)
    }
}

impl FactorWork {
    /// Enqueues the blocked recursion over the `n × n` f64 matrices `r` (damped matrix in,
    /// `R` out) and `x` (identity in, `R⁻¹` out), each leaf's `info` to the i32s at `infos`
    /// (cleared first); returns the leaf count. From a captured graph when it can.
    ///
    /// # Safety
    /// As [`factor_blocked`]; `infos` holds `n` i32.
    unsafe fn blocked_recursion(
        &mut self,
        dev: &GpuDevice,
        (n, r, x): (usize, u64, u64),
        (leaf, gemm): (usize, bool),
        infos: u64,
    ) -> Result<usize> {
        let stream = dev.stream().clone();
        let enqueue = |leaves: &mut usize| -> Result<()> {
            cudarc::driver::result::memset_d8_async(infos, 0, 4 * n, stream.cu_stream())
                .map_err(ForgeError::driver("clearing the block infos"))?;
            dev.with_blas(|b| {
                dev.with_dense_solver(|sol| {
                    factor_blocked((b, sol), dev, (n, r, x), (0, n), (leaf, gemm), (infos, leaves))
                })
            })
        };
        let key = |dev: &GpuDevice| -> Result<RecursionKey> {
            let (wd, wh) = dev.with_dense_solver(|s| Ok(s.workspace_addrs()))?;
            Ok(RecursionKey { n, leaf, gemm, buffers: [r, x, infos, wd, wh] })
        };
        let g = &mut self.graphs;
        let mut leaves = 0usize;
        if !g.enabled || g.failed.is_some() {
            enqueue(&mut leaves)?;
            return Ok(leaves);
        }
        let before = key(dev)?;
        if let Some((_, graph, count)) = g.captured.iter().find(|(k, _, _)| *k == before) {
            graph.0.launch().map_err(ForgeError::driver("launching the pre-step graph"))?;
            g.replays += 1;
            return Ok(*count);
        }
        if !g.seen.contains(&before) {
            enqueue(&mut leaves)?;
            let after = key(dev)?;
            g.seen.retain(|k| k.n != n);
            g.seen.push(after);
            return Ok(leaves);
        }
        // Thread-local capture: other threads' CUDA calls (the upload stream's copies) go on.
        stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(ForgeError::driver("starting the pre-step capture"))?;
        let recorded = enqueue(&mut leaves);
        let ended = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        let graph = match (recorded, ended) {
            (Ok(()), Ok(Some(graph))) => graph,
            (recorded, ended) => {
                // Nothing of the capture ran: enqueue the recursion directly, now and from now on.
                let why = match (recorded, ended) {
                    (Err(e), _) => e.to_string(),
                    (_, Err(e)) => e.to_string(),
                    _ => "the capture recorded nothing".to_string(),
                };
                g.failed = Some(why);
                leaves = 0;
                enqueue(&mut leaves)?;
                return Ok(leaves);
            }
        };
        graph.launch().map_err(ForgeError::driver("launching the pre-step graph"))?;
        g.captures += 1;
        let after = key(dev)?;
        if after == before {
            if g.captured.len() >= MAX_GRAPHS {
                g.captured.remove(0);
            }
            g.captured.push((before, SendGraph(graph), leaves));
        }
        Ok(leaves)
    }
}

/// How the GPU pre-step factors the damped matrix (`A = RᵀR`) and inverts `R` (f64
/// throughout; the methods differ only in rounding and speed — `gpu_pipeline` prints each
/// one's time, and a GPU test holds each to the CPU pre-step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactorMethod {
    /// One block recursion producing `R` and `R⁻¹` together: `R₁₁, R₁₁⁻¹` of the leading
    /// block, `R₁₂ = R₁₁⁻ᵀ·A₁₂` (trmm), `A₂₂ − R₁₂ᵀR₁₂` (syrk), `R₂₂, R₂₂⁻¹` of that, then
    /// `(R⁻¹)₁₂ = −R₁₁⁻¹·R₁₂·R₂₂⁻¹` (two trmm); cuSOLVER potrf and a trsm on `leaf`-sized
    /// diagonal blocks. Large cuBLAS calls do the work where cuSOLVER's potrf alone ran at a
    /// fifth of dgemm's rate on the H200 (docs/design.md §5).
    Blocked {
        /// Side of the diagonal blocks factored by cuSOLVER.
        leaf: usize,
    },
    /// The recursion of [`FactorMethod::Blocked`] with every off-diagonal step a full dgemm
    /// (the f64 tensor-core path): `R₁₂ᵀ = A₁₂ᵀ·R₁₁⁻¹` is written into the free lower block
    /// `A₂₁`, `A₂₂ −= R₁₂ᵀR₁₂`, then `T = R₁₁⁻¹·R₁₂` into `A₁₂` (no longer needed) and
    /// `(R⁻¹)₁₂ = −T·R₂₂⁻¹`. Twice the triangular flop count, at dgemm's rate; no scratch
    /// (the exact zeros below the diagonals of `R⁻¹`'s blocks make full products right).
    BlockedGemm {
        /// Side of the diagonal blocks factored by cuSOLVER.
        leaf: usize,
    },
    /// cuSOLVER potrf of the whole matrix, then cuBLAS trsm against the identity, `block`
    /// columns per solve (0: all at once; column block `[j0, j1)` of `R⁻¹` is zero below row
    /// `j1`, so blocks cost n³/3 instead of n³).
    PotrfTrsm {
        /// Columns per solve; 0 solves all at once.
        block: usize,
    },
    /// cuSOLVER potrf of the whole matrix, then `[[A, B], [0, C]]⁻¹ = [[A⁻¹, −A⁻¹·B·C⁻¹],
    /// [0, C⁻¹]]` recursively down to `leaf`-sized diagonal blocks (trsm), `B·C⁻¹` by a dgemm
    /// (`gemm`) or a trmm, then `−A⁻¹·(…)` by an in-place trmm.
    PotrfRecursiveInverse {
        /// Side of the diagonal blocks inverted by trsm.
        leaf: usize,
        /// `B·C⁻¹` by dgemm (else by trmm).
        gemm: bool,
    },
}

impl Default for FactorMethod {
    fn default() -> Self {
        FactorMethod::BlockedGemm { leaf: 256 }
    }
}

/// Where a recursion splits a block of side `m > leaf`: a multiple of `leaf` near the middle,
/// so the leaves stay full-sized.
fn split(m: usize, leaf: usize) -> usize {
    ((m / 2).div_ceil(leaf).max(1) * leaf).min(m - 1)
}

/// `R` (upper triangle of `r`) and `R⁻¹` (in `x`) of the diagonal block `[s, e)` of the
/// symmetric `n × n` matrix in `r` ([`FactorMethod::Blocked`]); `x` holds the identity on
/// entry. Each leaf's cuSOLVER `info` goes to its own i32 at `infos.0`, `infos.1` counting them.
///
/// # Safety
/// `r` and `x` are live column-major `n × n` f64 device matrices and `infos.0` holds one i32
/// per leaf (at most `n`), all ready on the stream both handles run on.
unsafe fn factor_blocked(
    (b, sol): (&mut crate::device::cublas::Blas, &mut crate::device::cusolver::DenseSolver),
    dev: &GpuDevice,
    (n, r, x): (usize, u64, u64),
    (s, e): (usize, usize),
    (leaf, gemm): (usize, bool),
    infos: (u64, &mut usize),
) -> Result<()> {
    let m = e - s;
    if m <= leaf {
        let slot = infos.0 + 4 * *infos.1 as u64;
        *infos.1 += 1;
        sol.potrf_upper_block_async(dev, (at(r, n, s, s), n), m, slot)?;
        return b.trsm_upper_left(m, m, at(r, n, s, s), n, at(x, n, s, s), n);
    }
    let mid = s + split(m, leaf);
    let (m1, m2) = (mid - s, e - mid);
    let (a12, a21, a22) = (at(r, n, s, mid), at(r, n, mid, s), at(r, n, mid, mid));
    let (x11, x12, x22) = (at(x, n, s, s), at(x, n, s, mid), at(x, n, mid, mid));
    factor_blocked((b, sol), dev, (n, r, x), (s, mid), (leaf, gemm), (infos.0, infos.1))?;
    if gemm {
        b.dgemm((true, false), (m2, m1, m1), 1.0, (a12, n), (x11, n), 0.0, (a21, n))?;
        b.dgemm((false, true), (m2, m2, m1), -1.0, (a21, n), (a21, n), 1.0, (a22, n))?;
    } else {
        b.trmm_upper((true, true), (m1, m2), 1.0, (x11, n), (a12, n), (a12, n))?;
        b.syrk_upper_t((m2, m1), -1.0, (a12, n), 1.0, (a22, n))?;
    }
    factor_blocked((b, sol), dev, (n, r, x), (mid, e), (leaf, gemm), (infos.0, infos.1))?;
    if gemm {
        b.dgemm((false, true), (m1, m2, m1), 1.0, (x11, n), (a21, n), 0.0, (a12, n))?;
        b.dgemm((false, false), (m1, m2, m2), -1.0, (a12, n), (x22, n), 0.0, (x12, n))
    } else {
        b.trmm_upper((false, false), (m1, m2), 1.0, (x22, n), (a12, n), (x12, n))?;
        b.trmm_upper((true, false), (m1, m2), -1.0, (x11, n), (x12, n), (x12, n))
    }
}

/// Column-major element address of an f64 `n × n` matrix at `base`.
fn at(base: u64, n: usize, row: usize, col: usize) -> u64 {
    base + ((col * n + row) * 8) as u64
}

/// `x ← R⁻¹` by column-blocked trsm; `x` holds the identity on entry.
///
/// # Safety
/// `r` and `x` are live `n × n` f64 device matrices ready on the handle's stream.
unsafe fn invert_by_trsm(b: &mut crate::device::cublas::Blas, n: usize, r: u64, x: u64, block: usize) -> Result<()> {
    let block = if block == 0 { n } else { block };
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + block).min(n);
        b.trsm_upper_left(j1, j1 - j0, r, n, at(x, n, 0, j0), n)?;
        j0 = j1;
    }
    Ok(())
}

/// `x[s..e, s..e] ← R[s..e, s..e]⁻¹` by block recursion; `x` holds the identity on entry (so
/// a leaf is one trsm in place, and blocks below the diagonal stay exactly zero, which lets
/// the dgemm treat `C⁻¹` as a full matrix).
///
/// # Safety
/// As [`invert_by_trsm`].
unsafe fn invert_recursive(
    b: &mut crate::device::cublas::Blas,
    n: usize,
    r: u64,
    x: u64,
    (s, e): (usize, usize),
    leaf: usize,
    gemm: bool,
) -> Result<()> {
    let m = e - s;
    if m <= leaf {
        return b.trsm_upper_left(m, m, at(r, n, s, s), n, at(x, n, s, s), n);
    }
    // Split at a multiple of the leaf near the middle, so leaves stay full-sized.
    let mid = s + split(m, leaf);
    let m1 = mid - s;
    invert_recursive(b, n, r, x, (s, mid), leaf, gemm)?;
    invert_recursive(b, n, r, x, (mid, e), leaf, gemm)?;
    let m2 = e - mid;
    let (b12, x12) = (at(r, n, s, mid), at(x, n, s, mid));
    let (a_inv, c_inv) = (at(x, n, s, s), at(x, n, mid, mid));
    if gemm {
        b.dgemm((false, false), (m1, m2, m2), 1.0, (b12, n), (c_inv, n), 0.0, (x12, n))?;
    } else {
        b.trmm_upper((false, false), (m1, m2), 1.0, (c_inv, n), (b12, n), (x12, n))?;
    }
    b.trmm_upper((true, false), (m1, m2), -1.0, (a_inv, n), (x12, n), (x12, n))
}

/// `u = I` (`cols_p × cols_p`): the factor of a layer without calibration data or whose
/// factorisations all failed.
///
/// # Safety
/// `u` is the device address of at least `cols_p²` f32.
pub(crate) unsafe fn enqueue_identity(dev: &GpuDevice, u: DevPtrMut<f32>, cols_p: usize) -> Result<()> {
    let args = IdentityArgs { u, cols_p: cols_p as u32 };
    dev.launch::<PrestepIdentity>(ew_config(dev, cols_p * cols_p)?, &args)
}

/// Zeroes the dead input columns `dead` of a `rows × cols` device weight of `elem_bytes`
/// bytes per element (uploading the list through `list`).
///
/// # Safety
/// `w` is the device address of `rows·cols·elem_bytes` bytes ready on the compute stream.
pub(crate) unsafe fn enqueue_zero_columns(
    dev: &GpuDevice,
    list: &mut DeviceBuf<u32>,
    w: DevPtrMut<u8>,
    rows: usize,
    cols: usize,
    elem_bytes: usize,
    dead: &[usize],
) -> Result<()> {
    if dead.is_empty() {
        return Ok(());
    }
    let idx: Vec<u32> = dead.iter().map(|&j| j as u32).collect();
    let buf = list.ensure(dev, idx.len(), "dead-column list")?;
    dev.stream()
        .memcpy_htod(&idx, &mut buf.slice_mut(0..idx.len()))
        .map_err(ForgeError::driver("uploading dead columns"))?;
    let args = ZeroColumnsArgs {
        w,
        rows: rows as u32,
        cols: cols as u32,
        elem_bytes: elem_bytes as u32,
        dead: buf.dev_ptr(),
        n_dead: idx.len() as u32,
    };
    dev.launch::<PrestepZeroColumns>(ew_config(dev, rows * idx.len())?, &args)
}

/// Runs factorisation attempts `first..=MAX_RETRIES` of `plan` on `h` (`n²` f32 on the
/// device) into `u` (`cols_p²` f32), each checked before the next (one small status read
/// each): `(succeeded, damping of the last attempt, its index)`. A non-finite Hessian entry
/// is an error on the first attempt. `status` is 3 u64 of scratch.
///
/// # Safety
/// `h` holds `n²` f32 and `u` at least `cols_p²` f32, both on the device, ready on the compute
/// stream; the plan's order was set in `work` for this `n`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn factor_checked(
    dev: &GpuDevice,
    work: &mut FactorWork,
    status_buf: &mut CudaSlice<u64>,
    h: DevPtr<f32>,
    n: usize,
    plan: &PreStepPlan,
    u: DevPtrMut<f32>,
    cols_p: usize,
    first: u32,
) -> Result<(bool, f64, u32)> {
    let stream = dev.stream().clone();
    let mut k = first;
    loop {
        let damping = plan.damping(k);
        stream.memset_zeros(status_buf).map_err(ForgeError::driver("clearing the pre-step status"))?;
        let base = status_buf.dev_ptr_mut().addr();
        let status = FactorStatus {
            hessian_bad: DevPtrMut::from_addr(base),
            factor_bad: DevPtrMut::from_addr(base + 8),
            info: base + 16,
        };
        work.enqueue_attempt(dev, h, n, damping, u, cols_p, status)?;
        let st =
            stream.clone_dtoh(&status_buf.slice(0..3)).map_err(ForgeError::driver("reading the pre-step status"))?;
        if k == first && st[0] != 0 {
            let idx = !st[0] as usize;
            let mut one = [f32::NAN];
            let _ = cudarc::driver::result::memcpy_dtoh_async(&mut one, h.addr() + 4 * idx as u64, stream.cu_stream())
                .and_then(|()| stream.synchronize());
            return Err(ForgeError::NonFinite { tensor: "hessian", row: idx / n, col: idx % n, value: one[0] });
        }
        let info = st[2] as u32 as i32;
        if info < 0 {
            return Err(ForgeError::Internal(format!("cuSOLVER potrf rejected argument {} (info {info})", -info)));
        }
        if info == 0 && st[1] == 0 {
            return Ok((true, damping, k));
        }
        if k >= super::MAX_RETRIES {
            return Ok((false, damping, k));
        }
        k += 1;
    }
}

/// The GPU pre-step as a host-facing call (tests, benches, layers on the CPU side): plan from
/// `diag H`, attempts with retries checked one by one, `U` back to the host. The engine
/// ([`crate::quantize::QuantEngine`]) runs the same attempts, optimistically, and keeps `U` on
/// the device.
pub struct GpuPreStepper {
    work: FactorWork,
    status: Option<CudaSlice<u64>>,
    u: DeviceBuf<f32>,
}

impl GpuPreStepper {
    /// Loads cuSOLVER and cuBLAS (typed errors when they are missing).
    pub fn new(dev: &GpuDevice) -> Result<Self> {
        dev.with_dense_solver(|_| Ok(()))?;
        dev.with_blas(|_| Ok(()))?;
        Ok(GpuPreStepper { work: FactorWork::default(), status: None, u: DeviceBuf::default() })
    }

    /// Checks the input, plans the pre-step from `diag H`, sets its column order and makes
    /// sure the status words exist: what [`GpuPreStepper::run`] and
    /// [`GpuPreStepper::profile`] both start with.
    fn begin(&mut self, dev: &GpuDevice, h: &CudaSlice<f32>, cols: usize, cfg: &PreStepConfig) -> Result<PreStepPlan> {
        cfg.validate()?;
        check_cols(cols)?;
        if h.len() != cols * cols {
            return Err(ForgeError::Shape(format!("{} Hessian elements on the device for {cols}×{cols}", h.len())));
        }
        let plan = PreStepPlan::new(self.work.diag_to_host(dev, h.dev_ptr(), cols)?, cfg)?;
        self.work.set_order(dev, &plan, cols)?;
        if self.status.is_none() {
            self.status = Some(dev.alloc::<u64>(3, "pre-step status")?);
        }
        Ok(plan)
    }

    /// Replays the block recursion from captured CUDA graphs (`true`, the default) or
    /// enqueues it call by call; the same bits either way.
    pub fn set_graphs(&mut self, on: bool) {
        self.work.graphs.enabled = on;
    }

    /// Why capturing the recursion into a graph failed (it then stays off), if it did.
    pub fn graph_failure(&self) -> Option<&str> {
        self.work.graphs.failed.as_deref()
    }

    /// The pre-step of a Hessian already on the device (`h`: `cols²` f32, row-major).
    /// Semantics, flags and errors as [`super::pre_step_cpu`] without a weight (zero the
    /// weight's `dead_columns` yourself); `U` comes back to the host.
    pub fn run(&mut self, dev: &GpuDevice, h: &CudaSlice<f32>, cols: usize, cfg: &PreStepConfig) -> Result<PreStep> {
        let plan = self.begin(dev, h, cols, cfg)?;
        let n = cols;
        let status = self.status.as_mut().ok_or_else(|| ForgeError::Internal("status missing".into()))?;
        let u = self.u.ensure(dev, n * n, "pre-step factor")?.dev_ptr_mut();
        // SAFETY: h holds n² f32 (checked), u n²; the order was set above.
        let (ok, damping, retries) =
            unsafe { factor_checked(dev, &mut self.work, status, h.dev_ptr(), n, &plan, u, n, 0) }?;
        let hinv_factor = if ok {
            let v = dev
                .stream()
                .clone_dtoh(&self.u.get(n * n)?.slice(0..n * n))
                .map_err(ForgeError::driver("downloading the factor"))?;
            Array2::from_shape_vec((n, n), v).map_err(|e| ForgeError::Internal(e.to_string()))?
        } else {
            Array2::eye(n)
        };
        let warnings = plan.warnings(retries, !ok, damping);
        Ok(PreStep {
            hinv_factor,
            perm: plan.perm,
            dead_columns: plan.dead_columns,
            damping_used: damping as f32,
            retries,
            fallback_identity: !ok,
            warnings,
        })
    }

    /// Chooses how the matrix is factored and `R` inverted (tests and benches compare the
    /// methods).
    pub fn set_method(&mut self, method: FactorMethod) {
        self.work.method = method;
    }

    /// Device-event times (ms) of the parts of one factorisation of a device Hessian without
    /// retries — `[gather, potrf, R⁻¹, extract]` (for [`FactorMethod::Blocked`]: `R` and
    /// `R⁻¹` together, then the `info` reduction) — with `method`; the benches' breakdown.
    pub fn profile(
        &mut self,
        dev: &GpuDevice,
        h: &CudaSlice<f32>,
        cols: usize,
        cfg: &PreStepConfig,
        method: FactorMethod,
    ) -> Result<[f32; 4]> {
        let plan = self.begin(dev, h, cols, cfg)?;
        let n = cols;
        let status_buf = self.status.as_mut().ok_or_else(|| ForgeError::Internal("status missing".into()))?;
        let stream = dev.stream().clone();
        stream.memset_zeros(status_buf).map_err(ForgeError::driver("clearing the pre-step status"))?;
        let base = status_buf.dev_ptr_mut().addr();
        let status = FactorStatus {
            hessian_bad: DevPtrMut::from_addr(base),
            factor_bad: DevPtrMut::from_addr(base + 8),
            info: base + 16,
        };
        let u = self.u.ensure(dev, n * n, "pre-step factor")?.dev_ptr_mut();
        let ctx = dev.context();
        let events = (0..5)
            .map(|_| {
                ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(ForgeError::driver("creating an event"))
            })
            .collect::<Result<Vec<_>>>()?;
        let saved = std::mem::replace(&mut self.work.method, method);
        // SAFETY: h holds n² f32 (checked), u n²; the order was set above.
        let enqueued = unsafe {
            self.work.enqueue_attempt_marked(dev, h.dev_ptr(), n, plan.damping(0), (u, n), status, &mut |k| {
                events[k].record(&stream).map_err(ForgeError::driver("recording an event"))
            })
        };
        self.work.method = saved;
        enqueued?;
        stream.synchronize().map_err(ForgeError::driver("waiting for the pre-step"))?;
        let mut t = [0f32; 4];
        for (k, slot) in t.iter_mut().enumerate() {
            *slot = events[k].elapsed_ms(&events[k + 1]).map_err(ForgeError::driver("reading event times"))?;
        }
        Ok(t)
    }

    /// The pre-step of a host Hessian (uploaded first).
    pub fn run_host(&mut self, dev: &GpuDevice, h: ArrayView2<'_, f32>, cfg: &PreStepConfig) -> Result<PreStep> {
        cfg.validate()?;
        let (n, c) = h.dim();
        if n != c || n == 0 {
            return Err(ForgeError::Shape(format!("the Hessian must be square and non-empty, got {n}×{c}")));
        }
        check_cols(n)?;
        let data = h.as_standard_layout();
        let slice = data.as_slice().ok_or_else(|| ForgeError::Internal("standard layout is not contiguous".into()))?;
        let up = dev.stream().clone_htod(slice).map_err(ForgeError::driver("uploading the Hessian"))?;
        self.run(dev, &up, n, cfg)
    }
}

/// The pre-step of a device Hessian with a one-off [`GpuPreStepper`].
pub fn pre_step_gpu(dev: &GpuDevice, h: &GpuHessian, cfg: &PreStepConfig) -> Result<PreStep> {
    GpuPreStepper::new(dev)?.run(dev, h.h(), h.cols(), cfg)
}

#[cfg(test)]
mod tests {
    //! The index algebra of the GPU pre-step, checked on the CPU with faer: factor the
    //! reversed matrix as `RᵀR` (what `potrf(UPPER)` returns), invert `R`, store `R⁻¹`
    //! column-major as cuSOLVER leaves it, read `U` through `prestep_factor_source`, and
    //! compare with `pre_step_cpu`.
    use crate::hessian::{pre_step_cpu, PreStepConfig};
    use faer::linalg::triangular_inverse::invert_upper_triangular;
    use faer::{Mat, Par, Side};
    use forge_kernel_abi::hessian::prestep_factor_source;
    use ndarray::Array2;

    #[test]
    fn reading_u_out_of_the_inverted_upper_factor_matches_the_cpu_pre_step() {
        let n = 23;
        // A deterministic SPD matrix with distinct diagonals (so act-order matters).
        let x = Array2::from_shape_fn((3 * n, n), |(t, j)| {
            (((t * 31 + j * 17) % 29) as f32 - 14.0) / 7.0 + if t % n == j { 3.0 } else { 0.0 }
        });
        let h = x.t().dot(&x) / (3 * n) as f32;
        for act_order in [false, true] {
            let cfg = PreStepConfig { rel_damp: 0.01, act_order, ..PreStepConfig::default() };
            let cpu = pre_step_cpu(h.view(), None, &cfg).expect("cpu pre-step");
            let order: Vec<usize> = cpu.perm.clone().unwrap_or_else(|| (0..n).collect());
            let mean = (0..n).map(|j| f64::from(h[[j, j]]).abs()).sum::<f64>() / n as f64;
            // What prestep_gather writes (symmetric: row- or column-major alike).
            let a = Mat::<f64>::from_fn(n, n, |r, c| {
                let (oi, oj) = (order[n - 1 - r], order[n - 1 - c]);
                let v = 0.5 * (f64::from(h[[oi, oj]]) + f64::from(h[[oj, oi]]));
                if r == c {
                    v + 0.01 * mean
                } else {
                    v
                }
            });
            let l = a.llt(Side::Lower).expect("spd").L().to_owned();
            let r = l.transpose().to_owned(); // potrf(UPPER): A = RᵀR
            let mut rinv = Mat::<f64>::zeros(n, n);
            invert_upper_triangular(rinv.as_mut(), r.as_ref(), Par::Seq);
            // Column-major storage, as cuSOLVER leaves it: element (row, col) at col·n + row.
            let mut store = vec![0f64; n * n];
            for col in 0..n {
                for row in 0..=col {
                    store[col * n + row] = rinv[(row, col)];
                }
            }
            for i in 0..n {
                for j in i..n {
                    let got = store[prestep_factor_source(n, i, j)] as f32;
                    let want = cpu.hinv_factor[[i, j]];
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1e-3),
                        "act_order {act_order} U[{i},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
