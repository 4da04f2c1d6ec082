//! Host side of the GPU Hessian (`hessian_xtx_*`, `hessian_blend`) and of the GPU pre-step
//! (`hessian_diag`, `prestep_gather`, cuSOLVER `Xpotrf` + `Xtrtri`, `prestep_extract`).
//!
//! Accumulation: `H ← β·H + α·XᵀX` per chunk of at most [`MAX_CHUNK_TOKENS`] tokens, with
//! `α = 2/(n+m)`, `β = n/(n+m)` counted in tokens, so `H = (2/N)·Σ XᵀX` as the CPU
//! [`crate::hessian::HessianAccumulator`]. Each chunk's `S = XᵀX` goes to a scratch buffer
//! first and is checked (a NaN/inf activation or an f32 overflow is a typed error and
//! leaves `H` as it was) before the blend. Device memory: `H` and `S` (`cols²` f32 each) and,
//! for host input, one upload buffer of `MAX_CHUNK_TOKENS·cols` elements.
//!
//! Pre-step: the same math as [`crate::hessian::pre_step_cpu`] (read its docs), in f64 on the
//! device: the reversed, permuted, dead-fixed, damped Hessian is factored by cuSOLVER
//! `potrf(UPPER)` (`R = L̂ᵀ`), inverted in place by `trtri(UPPER)`, and
//! `U = J L̂⁻¹ J` is read out of `R⁻¹` with [`forge_numerics::prestep_factor_source`]. Same
//! retries (10× damping, [`MAX_RETRIES`]) and identity fallback. cuSOLVER is loaded at run
//! time: `libcusolver.so` (and the `libcublas`, `libcublasLt`, `libcusparse`, `libnvJitLink`
//! it links) must be on the loader's path, e.g.
//! `LD_LIBRARY_PATH=$VENV/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64`.
//! Without it [`GpuPreStepper::new`] returns [`ForgeError::MissingLibrary`] (never a panic:
//! presence and every symbol called are probed first).

use super::GpuDevice;
use crate::calib::{check_finite_bytes, ActivationDtype, ActivationView};
use crate::hessian::{PreStep, PreStepConfig, MAX_RETRIES, MIN_RETRY_REL_DAMP};
use crate::{ForgeError, Result};
use cudarc::cusolver::sys as cs;
use cudarc::driver::{CudaSlice, CudaView, DevicePtrMut, LaunchConfig, PushKernelArg};
use forge_numerics::{HessianSharedLayout, HESSIAN_THREADS, HESSIAN_TILE};
use ndarray::{Array2, ArrayView2};

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

/// Scratch of the accumulation: `S` of one chunk, the host-upload buffer, the NaN flag.
struct Scratch {
    s: CudaSlice<f32>,
    upload: Option<CudaSlice<u8>>,
    first_bad: CudaSlice<u64>,
}

/// A running Hessian on the device: `H = (2/N)·Σ XᵀX` over the `N` tokens seen so far,
/// `(cols, cols)` f32, row-major, exactly symmetric.
pub struct GpuHessian {
    h: CudaSlice<f32>,
    cols: usize,
    tokens: u64,
    scratch: Option<Scratch>,
}

impl GpuHessian {
    /// `H = 0`, no tokens, for a layer with `cols` input features.
    pub fn new(dev: &GpuDevice, cols: usize) -> Result<Self> {
        check_cols(cols)?;
        let h = dev.stream().alloc_zeros::<f32>(cols * cols).map_err(ForgeError::driver("allocating the Hessian"))?;
        Ok(GpuHessian { h, cols, tokens: 0, scratch: None })
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
        Ok(GpuHessian { h, cols: n, tokens, scratch: None })
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
            });
        }
        self.scratch.as_mut().ok_or_else(|| ForgeError::Shape("Hessian scratch missing".into()))
    }

    /// Adds host activations `x: (tokens, cols)` in chunks of at most [`MAX_CHUNK_TOKENS`]
    /// tokens. An empty batch is a no-op. Wrong column count, a NaN/inf activation or an f32
    /// overflow of `XᵀX` is a typed error; chunks before the failing one stay accumulated
    /// (the error's row says where it stopped), the failing chunk leaves `H` unchanged.
    pub fn update(&mut self, dev: &GpuDevice, x: ActivationView<'_>) -> Result<()> {
        let (m, cols) = x.dim();
        self.check_batch_cols(cols)?;
        let size = x.dtype().size();
        let stream = dev.stream().clone();
        let mut t0 = 0;
        while t0 < m {
            let t1 = (t0 + MAX_CHUNK_TOKENS).min(m);
            let chunk = x.rows(t0, t1);
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
            let up = sc.upload.as_mut().ok_or_else(|| ForgeError::Shape("upload buffer missing".into()))?;
            let mut dst = up.slice_mut(0..bytes.len());
            stream.memcpy_htod(&bytes[..], &mut dst).map_err(ForgeError::driver("uploading activations"))?;
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

    /// As [`GpuHessian::update`] for activations already on the device.
    pub fn update_device(&mut self, dev: &GpuDevice, x: &DeviceActivations) -> Result<()> {
        let (m, cols) = x.dim();
        self.check_batch_cols(cols)?;
        let size = x.dtype.size();
        let mut t0 = 0;
        while t0 < m {
            let t1 = (t0 + MAX_CHUNK_TOKENS).min(m);
            // Chunks start at multiples of `cols` elements: the alignment the kernel needs.
            let view = x.bytes.slice(t0 * cols * size..t1 * cols * size);
            let sc = self.scratch(dev)?;
            let bad = launch_xtx_checked(dev, &view, x.dtype, t1 - t0, cols, &mut sc.s, &mut sc.first_bad)?;
            if let Some(idx) = bad {
                let host = dev.stream().clone_dtoh(&view).map_err(ForgeError::driver("downloading activations"))?;
                check_finite_bytes(&host, x.dtype, cols, t0)?;
                return Err(overflow_error(dev, &sc.s, idx, cols));
            }
            self.blend(dev, (t1 - t0) as u64)?;
            t0 = t1;
        }
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
        let cols32 = self.cols as u32;
        let cfg = ew_config(dev, self.cols * self.cols)?;
        let f = dev.function("hessian_blend")?;
        let sc = self.scratch.as_ref().ok_or_else(|| ForgeError::Shape("Hessian scratch missing".into()))?;
        let stream = dev.stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&mut self.h).arg(&sc.s).arg(&cols32).arg(&alpha).arg(&beta);
        // SAFETY: h and s hold cols² f32 each.
        unsafe { l.launch(cfg) }.map_err(ForgeError::driver("launching hessian_blend"))?;
        self.tokens += m;
        Ok(())
    }
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
    let name = match dtype {
        ActivationDtype::F32 => "hessian_xtx_f32",
        ActivationDtype::F16 => "hessian_xtx_f16",
        ActivationDtype::BF16 => "hessian_xtx_bf16",
    };
    let f = dev.function(name)?;
    let nt = cols.div_ceil(HESSIAN_TILE as usize) as u32;
    let cfg = LaunchConfig {
        grid_dim: (nt, nt, 1),
        block_dim: (HESSIAN_THREADS, 1, 1),
        shared_mem_bytes: HessianSharedLayout::new().total,
    };
    let (t32, c32) = (tokens as u32, cols as u32);
    let mut l = stream.launch_builder(&f);
    l.arg(x).arg(&t32).arg(&c32).arg(&mut *s).arg(&mut *first_bad);
    // SAFETY: x holds tokens·cols elements of dtype starting at a multiple of cols elements
    // of a device allocation; s holds cols² f32 (cols ≤ MAX_HESSIAN_COLS so nt ≤ 65535 fits
    // gridDim.y); block and shared memory as the kernel's contract.
    unsafe { l.launch(cfg) }.map_err(ForgeError::driver("launching hessian_xtx"))?;
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
// Pre-step on the GPU (cuSOLVER)
// ---------------------------------------------------------------------------------------

/// Every cuSOLVER function the pre-step calls: probed before the first call, since cudarc
/// panics on a missing symbol.
const CUSOLVER_SYMBOLS: [&str; 9] = [
    "cusolverDnCreate",
    "cusolverDnDestroy",
    "cusolverDnSetStream",
    "cusolverDnCreateParams",
    "cusolverDnDestroyParams",
    "cusolverDnXpotrf_bufferSize",
    "cusolverDnXpotrf",
    "cusolverDnXtrtri_bufferSize",
    "cusolverDnXtrtri",
];

/// `Ok` when cuSOLVER (with the libraries it links) loads and has every function the GPU
/// pre-step calls; else [`ForgeError::MissingLibrary`] saying what to put on `LD_LIBRARY_PATH`.
pub fn cusolver_available() -> Result<()> {
    let hint = "put the directory holding libcusolver.so.* (and libcublas, libcublasLt, libcusparse, libnvJitLink) \
                on LD_LIBRARY_PATH, e.g. <venv>/lib/python3.12/site-packages/nvidia/cu13/lib or /usr/local/cuda/lib64";
    // SAFETY: only tries to dlopen the library under its usual names.
    if !unsafe { cs::is_culib_present() } {
        return Err(ForgeError::MissingLibrary {
            library: "cuSOLVER",
            reason: format!("libcusolver could not be loaded; {hint}"),
        });
    }
    // SAFETY: the library is present (checked above), so culib() loads it instead of panicking;
    // symbols are only looked up, never called here.
    let lib = unsafe { cs::culib() };
    for sym in CUSOLVER_SYMBOLS {
        // SAFETY: a lookup; the fn-pointer type is never called through.
        if unsafe { lib.get::<unsafe extern "C" fn()>(sym.as_bytes()) }.is_err() {
            return Err(ForgeError::MissingLibrary {
                library: "cuSOLVER",
                reason: format!("the loaded libcusolver lacks {sym} (CUDA ≥ 11.4 needed)"),
            });
        }
    }
    Ok(())
}

fn cusolver(op: &'static str) -> impl FnOnce(cudarc::cusolver::result::CusolverError) -> ForgeError {
    move |source| ForgeError::Cusolver { op, source }
}

/// Owned cuSOLVER dense handle and 64-bit-API parameters (destroyed on drop, errors ignored:
/// nothing can be done about a failing destroy).
struct Dn {
    handle: cs::cusolverDnHandle_t,
    params: cs::cusolverDnParams_t,
}

impl Drop for Dn {
    fn drop(&mut self) {
        // SAFETY: both were created by this struct and are destroyed once.
        unsafe {
            if !self.params.is_null() {
                let _ = cudarc::cusolver::result::dn_destroy_params(self.params);
            }
            if !self.handle.is_null() {
                let _ = cudarc::cusolver::result::dn_destroy(self.handle);
            }
        }
    }
}

// SAFETY: cuSOLVER handles may be used from any thread, one call at a time (&mut self).
unsafe impl Send for Dn {}

/// Device buffers of one pre-step size `n`.
struct PreStepBuffers {
    n: usize,
    a: CudaSlice<f64>,
    u: CudaSlice<f32>,
    h_upload: Option<CudaSlice<f32>>,
    diag: CudaSlice<f32>,
    order: CudaSlice<u32>,
    first_bad: CudaSlice<u64>,
    info: CudaSlice<i32>,
    potrf_dev: CudaSlice<u8>,
    potrf_host: Vec<u8>,
    trtri_dev: CudaSlice<u8>,
    trtri_host: Vec<u8>,
}

/// The GPU pre-step: a cuSOLVER handle and device buffers reused across calls of the same
/// size (one per process or per expert batch is enough).
pub struct GpuPreStepper {
    dn: Dn,
    bufs: Option<PreStepBuffers>,
}

const UPPER: cs::cublasFillMode_t = cs::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER;
const F64: cs::cudaDataType = cs::cudaDataType::CUDA_R_64F;

impl GpuPreStepper {
    /// Loads cuSOLVER ([`cusolver_available`]) and creates a handle on `dev`'s stream.
    pub fn new(dev: &GpuDevice) -> Result<Self> {
        cusolver_available()?;
        dev.context().bind_to_thread().map_err(ForgeError::driver("binding the context"))?;
        let handle = cudarc::cusolver::result::dn_create().map_err(cusolver("creating a cuSOLVER handle"))?;
        let mut dn = Dn { handle, params: std::ptr::null_mut() };
        dn.params = cudarc::cusolver::result::dn_create_params().map_err(cusolver("creating cuSOLVER params"))?;
        // SAFETY: a live handle and the device's live stream (outlives the stepper's calls).
        unsafe { cudarc::cusolver::result::dn_set_stream(dn.handle, dev.stream().cu_stream() as _) }
            .map_err(cusolver("setting the cuSOLVER stream"))?;
        Ok(GpuPreStepper { dn, bufs: None })
    }

    /// The pre-step of a Hessian already on the device (`h`: `cols²` f32, row-major).
    /// Semantics, flags and errors as [`crate::hessian::pre_step_cpu`] without a weight
    /// (zero the weight's `dead_columns` yourself); `U` comes back to the host.
    pub fn run(&mut self, dev: &GpuDevice, h: &CudaSlice<f32>, cols: usize, cfg: &PreStepConfig) -> Result<PreStep> {
        check_cols(cols)?;
        if h.len() != cols * cols {
            return Err(ForgeError::Shape(format!("{} Hessian elements on the device for {cols}×{cols}", h.len())));
        }
        if !(cfg.rel_damp.is_finite() && cfg.rel_damp >= 0.0) {
            return Err(ForgeError::Shape(format!("rel_damp must be finite and >= 0, got {}", cfg.rel_damp)));
        }
        let b = buffers(&self.dn, &mut self.bufs, dev, cols)?;
        run_prestep(dev, &self.dn, b, h, cols, cfg)
    }

    /// The pre-step of a host Hessian (uploaded into a buffer the stepper keeps).
    pub fn run_host(&mut self, dev: &GpuDevice, h: ArrayView2<'_, f32>, cfg: &PreStepConfig) -> Result<PreStep> {
        let (n, c) = h.dim();
        if n != c || n == 0 {
            return Err(ForgeError::Shape(format!("the Hessian must be square and non-empty, got {n}×{c}")));
        }
        check_cols(n)?;
        let data = h.as_standard_layout();
        let slice = data.as_slice().ok_or_else(|| ForgeError::Shape("non-contiguous Hessian".into()))?;
        let stream = dev.stream().clone();
        let b = buffers(&self.dn, &mut self.bufs, dev, n)?;
        let mut up = match b.h_upload.take() {
            Some(u) => u,
            // SAFETY: fully written by the copy below before any read.
            None => {
                unsafe { stream.alloc::<f32>(n * n) }.map_err(ForgeError::driver("allocating the Hessian upload"))?
            }
        };
        stream.memcpy_htod(slice, &mut up).map_err(ForgeError::driver("uploading the Hessian"))?;
        let r = self.run(dev, &up, n, cfg);
        if let Some(b) = self.bufs.as_mut() {
            b.h_upload = Some(up);
        }
        r
    }
}

/// The buffers for size `n`, (re)allocated when the size changes.
fn buffers<'b>(
    dn: &Dn,
    bufs: &'b mut Option<PreStepBuffers>,
    dev: &GpuDevice,
    n: usize,
) -> Result<&'b mut PreStepBuffers> {
    if bufs.as_ref().is_some_and(|b| b.n == n) {
        return bufs.as_mut().ok_or_else(|| ForgeError::Shape("pre-step buffers missing".into()));
    }
    *bufs = None; // free the old size first
    let s = dev.stream();
    let alloc = ForgeError::driver("allocating pre-step buffers");
    let mut a = s.alloc_zeros::<f64>(n * n).map_err(alloc)?;
    let (mut pd, mut ph, mut td, mut th) = (0usize, 0usize, 0usize, 0usize);
    {
        let (a_ptr, _g) = a.device_ptr_mut(s);
        // SAFETY: size queries on a live handle with a valid n×n f64 matrix pointer.
        unsafe {
            cs::cusolverDnXpotrf_bufferSize(
                dn.handle,
                dn.params,
                UPPER,
                n as i64,
                F64,
                a_ptr as *const _,
                n as i64,
                F64,
                &mut pd,
                &mut ph,
            )
            .result()
            .map_err(cusolver("sizing potrf"))?;
            cs::cusolverDnXtrtri_bufferSize(
                dn.handle,
                UPPER,
                cs::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                n as i64,
                F64,
                a_ptr as *mut _,
                n as i64,
                &mut td,
                &mut th,
            )
            .result()
            .map_err(cusolver("sizing trtri"))?;
        }
    }
    let alloc = || ForgeError::driver("allocating pre-step buffers");
    *bufs = Some(PreStepBuffers {
        n,
        a,
        u: s.alloc_zeros::<f32>(n * n).map_err(alloc())?,
        h_upload: None,
        diag: s.alloc_zeros::<f32>(n).map_err(alloc())?,
        order: s.alloc_zeros::<u32>(n).map_err(alloc())?,
        first_bad: s.alloc_zeros::<u64>(1).map_err(alloc())?,
        info: s.alloc_zeros::<i32>(1).map_err(alloc())?,
        potrf_dev: s.alloc_zeros::<u8>(pd.max(1)).map_err(alloc())?,
        potrf_host: vec![0u8; ph.max(1)],
        trtri_dev: s.alloc_zeros::<u8>(td.max(1)).map_err(alloc())?,
        trtri_host: vec![0u8; th.max(1)],
    });
    bufs.as_mut().ok_or_else(|| ForgeError::Shape("pre-step buffers missing".into()))
}

/// The pre-step proper, on a sized buffer set.
fn run_prestep(
    dev: &GpuDevice,
    dn: &Dn,
    b: &mut PreStepBuffers,
    h: &CudaSlice<f32>,
    n: usize,
    cfg: &PreStepConfig,
) -> Result<PreStep> {
    let stream = dev.stream().clone();
    let n32 = n as u32;
    let ew = ew_config(dev, n * n)?;

    // diag(H) to the host: dead inputs, damping scale and act-order exactly as pre_step_cpu
    // (its `a` is the f64 symmetrisation, whose diagonal is the f32 diagonal exactly).
    {
        let f = dev.function("hessian_diag")?;
        let mut l = stream.launch_builder(&f);
        l.arg(h).arg(&n32).arg(&mut b.diag);
        // SAFETY: h holds n² f32, diag n.
        unsafe { l.launch(ew_config(dev, n)?) }.map_err(ForgeError::driver("launching hessian_diag"))?;
    }
    let diag32 = stream.clone_dtoh(&b.diag).map_err(ForgeError::driver("downloading diag(H)"))?;
    let mut diag: Vec<f64> = diag32.iter().map(|&d| f64::from(d)).collect();
    let mut dead_columns = Vec::new();
    for (j, d) in diag.iter_mut().enumerate() {
        if *d == 0.0 {
            *d = 1.0;
            dead_columns.push(j);
        }
    }
    let mean_abs_diag = diag.iter().map(|d| d.abs()).sum::<f64>() / n as f64;
    let perm = cfg.act_order.then(|| {
        let mut p: Vec<usize> = (0..n).collect();
        p.sort_by(|&x, &y| diag[y].total_cmp(&diag[x]));
        p
    });
    let order: Vec<u32> = match &perm {
        Some(p) => p.iter().map(|&j| j as u32).collect(),
        None => (0..n32).collect(),
    };
    stream.memcpy_htod(&order, &mut b.order).map_err(ForgeError::driver("uploading the column order"))?;

    let rel_damp = f64::from(cfg.rel_damp);
    let retry_base = rel_damp.max(MIN_RETRY_REL_DAMP);
    let mut damping = rel_damp * mean_abs_diag;
    let mut attempt = 0u32;
    let ok = loop {
        if factor_attempt(dev, dn, b, h, n, damping, attempt == 0, &ew)? {
            break true;
        }
        if attempt == MAX_RETRIES {
            break false;
        }
        attempt += 1;
        damping = retry_base * 10f64.powi(attempt as i32) * mean_abs_diag;
    };
    let hinv_factor = if ok {
        let u = stream.clone_dtoh(&b.u).map_err(ForgeError::driver("downloading the factor"))?;
        Array2::from_shape_vec((n, n), u).map_err(|e| ForgeError::Shape(e.to_string()))?
    } else {
        Array2::eye(n)
    };
    Ok(PreStep {
        hinv_factor,
        perm,
        dead_columns,
        damping_used: damping as f32,
        retries: attempt,
        fallback_identity: !ok,
    })
}

/// One factorisation with `damping`: gather, potrf, trtri, extract. `Ok(false)` when the
/// matrix is not positive definite or `U` does not fit f32 with a positive diagonal (retry);
/// errors for a non-finite `H` (checked on the first attempt) and for cuSOLVER failures.
#[allow(clippy::too_many_arguments)]
fn factor_attempt(
    dev: &GpuDevice,
    dn: &Dn,
    b: &mut PreStepBuffers,
    h: &CudaSlice<f32>,
    n: usize,
    damping: f64,
    check_h: bool,
    ew: &LaunchConfig,
) -> Result<bool> {
    let stream = dev.stream().clone();
    let n32 = n as u32;
    let (potrf_dev_len, potrf_host_len) = (b.potrf_dev.len(), b.potrf_host.len());
    let (trtri_dev_len, trtri_host_len) = (b.trtri_dev.len(), b.trtri_host.len());
    stream.memset_zeros(&mut b.first_bad).map_err(ForgeError::driver("resetting the NaN flag"))?;
    {
        let f = dev.function("prestep_gather")?;
        let mut l = stream.launch_builder(&f);
        l.arg(h).arg(&n32).arg(&b.order).arg(&damping).arg(&mut b.a).arg(&mut b.first_bad);
        // SAFETY: h n² f32, order a permutation of 0..n, a n² f64.
        unsafe { l.launch(*ew) }.map_err(ForgeError::driver("launching prestep_gather"))?;
    }
    if check_h {
        let flag = stream.clone_dtoh(&b.first_bad).map_err(ForgeError::driver("reading the NaN flag"))?;
        if let Some(&f) = flag.first().filter(|&&f| f != 0) {
            let idx = !f as usize;
            let value = stream
                .clone_dtoh(&h.slice(idx..idx + 1))
                .map_err(ForgeError::driver("reading a Hessian element"))?
                .first()
                .copied()
                .unwrap_or(f32::NAN);
            return Err(ForgeError::NonFinite { tensor: "hessian", row: idx / n, col: idx % n, value });
        }
    }
    dev.context().bind_to_thread().map_err(ForgeError::driver("binding the context"))?;
    {
        let (a_ptr, _ga) = b.a.device_ptr_mut(&stream);
        let (w_ptr, _gw) = b.potrf_dev.device_ptr_mut(&stream);
        let (i_ptr, _gi) = b.info.device_ptr_mut(&stream);
        // SAFETY: a is n×n f64 (lda n), workspaces sized by the bufferSize queries for this n,
        // info one i32; all on the handle's stream.
        unsafe {
            cs::cusolverDnXpotrf(
                dn.handle,
                dn.params,
                UPPER,
                n as i64,
                F64,
                a_ptr as *mut _,
                n as i64,
                F64,
                w_ptr as *mut _,
                potrf_dev_len,
                b.potrf_host.as_mut_ptr() as *mut _,
                potrf_host_len,
                i_ptr as *mut _,
            )
            .result()
            .map_err(cusolver("running potrf"))?;
        }
    }
    let info = read_info(dev, b, "potrf")?;
    if info > 0 {
        return Ok(false); // leading minor `info` is not positive definite
    }
    {
        let (a_ptr, _ga) = b.a.device_ptr_mut(&stream);
        let (w_ptr, _gw) = b.trtri_dev.device_ptr_mut(&stream);
        let (i_ptr, _gi) = b.info.device_ptr_mut(&stream);
        // SAFETY: as for potrf; trtri works in place on the upper triangle.
        unsafe {
            cs::cusolverDnXtrtri(
                dn.handle,
                UPPER,
                cs::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                n as i64,
                F64,
                a_ptr as *mut _,
                n as i64,
                w_ptr as *mut _,
                trtri_dev_len,
                b.trtri_host.as_mut_ptr() as *mut _,
                trtri_host_len,
                i_ptr as *mut _,
            )
            .result()
            .map_err(cusolver("running trtri"))?;
        }
    }
    if read_info(dev, b, "trtri")? > 0 {
        return Ok(false); // a zero pivot: cannot follow a successful potrf, but never trust it
    }
    stream.memset_zeros(&mut b.first_bad).map_err(ForgeError::driver("resetting the NaN flag"))?;
    {
        let f = dev.function("prestep_extract")?;
        let mut l = stream.launch_builder(&f);
        l.arg(&b.a).arg(&n32).arg(&mut b.u).arg(&mut b.first_bad);
        // SAFETY: a n² f64, u n² f32.
        unsafe { l.launch(*ew) }.map_err(ForgeError::driver("launching prestep_extract"))?;
    }
    let flag = stream.clone_dtoh(&b.first_bad).map_err(ForgeError::driver("reading the factor check"))?;
    Ok(flag.first().is_none_or(|&f| f == 0))
}

/// cuSOLVER's `info` after a call; a negative value (a bad argument) is an error.
fn read_info(dev: &GpuDevice, b: &PreStepBuffers, op: &'static str) -> Result<i32> {
    let info = dev.stream().clone_dtoh(&b.info).map_err(ForgeError::driver("reading cuSOLVER info"))?;
    let v = info.first().copied().unwrap_or(0);
    if v < 0 {
        return Err(ForgeError::Shape(format!("cuSOLVER {op} rejected argument {} (info {v})", -v)));
    }
    Ok(v)
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
    use forge_numerics::prestep_factor_source;
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
            let cfg = PreStepConfig { rel_damp: 0.01, act_order };
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
