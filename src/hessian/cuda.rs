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
//! Pre-step: the same policy as [`super::pre_step_cpu`] ([`PreStepPlan`]), in f64 on the
//! device: the reversed, permuted, dead-fixed, damped Hessian is factored by cuSOLVER
//! `potrf(UPPER)` (`R = L̂ᵀ`), inverted in place by `trtri(UPPER)`, and `U = J L̂⁻¹ J` is
//! read out of `R⁻¹` with [`forge_kernel_abi::hessian::prestep_factor_source`]. cuSOLVER is
//! loaded at run time ([`crate::device::cusolver`]).

use super::{PreStep, PreStepConfig, PreStepPlan};
use crate::calib::{check_finite_bytes, ActivationDtype, ActivationView};
use crate::device::cusolver::DenseSolver;
use crate::device::{view_ptr, DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::{ForgeError, Result};
use cudarc::driver::{CudaSlice, CudaView, LaunchConfig};
use forge_kernel_abi::hessian::{
    BlendArgs, DiagArgs, ExtractArgs, GatherArgs, HessianSharedLayout, XtxArgs, HESSIAN_THREADS, HESSIAN_TILE,
};
use forge_kernel_abi::{
    HessianBlend, HessianDiag, HessianXtxBf16, HessianXtxF16, HessianXtxF32, PrestepExtract, PrestepGather,
};
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
        self.scratch.as_mut().ok_or_else(|| ForgeError::Internal("Hessian scratch missing".into()))
    }

    /// Adds host activations `x: (tokens, cols)` in chunks of at most [`MAX_CHUNK_TOKENS`]
    /// tokens. An empty batch is a no-op. Wrong column count, a NaN/inf activation or an f32
    /// overflow of `XᵀX` is a typed error; chunks before the failing one stay accumulated
    /// (the error's row says where it stopped), the failing chunk leaves `H` unchanged.
    pub fn update(&mut self, dev: &GpuDevice, x: ActivationView<'_>) -> Result<()> {
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
        super::cpu::add_tokens(self.tokens, m)?;
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
        let cfg = ew_config(dev, self.cols * self.cols)?;
        let sc = self.scratch.as_ref().ok_or_else(|| ForgeError::Internal("Hessian scratch missing".into()))?;
        let args = BlendArgs { h: self.h.dev_ptr_mut(), s: sc.s.dev_ptr(), cols: self.cols as u32, alpha, beta };
        // SAFETY: h and s hold cols² f32 each.
        unsafe { dev.launch::<HessianBlend>(cfg, &args) }?;
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
// Pre-step on the GPU (cuSOLVER)
// ---------------------------------------------------------------------------------------

/// Device buffers of one pre-step size `n`.
struct PreStepBuffers {
    n: usize,
    a: CudaSlice<f64>,
    u: CudaSlice<f32>,
    h_upload: Option<CudaSlice<f32>>,
    diag: CudaSlice<f32>,
    order: CudaSlice<u32>,
    first_bad: CudaSlice<u64>,
}

/// The GPU pre-step: a cuSOLVER handle and device buffers reused across calls of the same
/// size (one per process or per expert batch is enough).
pub struct GpuPreStepper {
    solver: DenseSolver,
    bufs: Option<PreStepBuffers>,
}

impl GpuPreStepper {
    /// Loads cuSOLVER and creates a handle on `dev`'s stream.
    pub fn new(dev: &GpuDevice) -> Result<Self> {
        Ok(GpuPreStepper { solver: DenseSolver::new(dev)?, bufs: None })
    }

    /// The pre-step of a Hessian already on the device (`h`: `cols²` f32, row-major).
    /// Semantics, flags and errors as [`super::pre_step_cpu`] without a weight (zero the
    /// weight's `dead_columns` yourself); `U` comes back to the host.
    pub fn run(&mut self, dev: &GpuDevice, h: &CudaSlice<f32>, cols: usize, cfg: &PreStepConfig) -> Result<PreStep> {
        cfg.validate()?;
        check_cols(cols)?;
        if h.len() != cols * cols {
            return Err(ForgeError::Shape(format!("{} Hessian elements on the device for {cols}×{cols}", h.len())));
        }
        let b = buffers(&mut self.bufs, dev, cols)?;
        run_prestep(dev, &mut self.solver, b, h, cols, cfg)
    }

    /// The pre-step of a host Hessian (uploaded into a buffer the stepper keeps).
    pub fn run_host(&mut self, dev: &GpuDevice, h: ArrayView2<'_, f32>, cfg: &PreStepConfig) -> Result<PreStep> {
        cfg.validate()?;
        let (n, c) = h.dim();
        if n != c || n == 0 {
            return Err(ForgeError::Shape(format!("the Hessian must be square and non-empty, got {n}×{c}")));
        }
        check_cols(n)?;
        let data = h.as_standard_layout();
        let slice = data.as_slice().ok_or_else(|| ForgeError::Internal("standard layout is not contiguous".into()))?;
        let stream = dev.stream().clone();
        let b = buffers(&mut self.bufs, dev, n)?;
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
fn buffers<'b>(bufs: &'b mut Option<PreStepBuffers>, dev: &GpuDevice, n: usize) -> Result<&'b mut PreStepBuffers> {
    if !bufs.as_ref().is_some_and(|b| b.n == n) {
        *bufs = None; // free the old size first
        let s = dev.stream();
        let alloc = || ForgeError::driver("allocating pre-step buffers");
        *bufs = Some(PreStepBuffers {
            n,
            a: s.alloc_zeros::<f64>(n * n).map_err(alloc())?,
            u: s.alloc_zeros::<f32>(n * n).map_err(alloc())?,
            h_upload: None,
            diag: s.alloc_zeros::<f32>(n).map_err(alloc())?,
            order: s.alloc_zeros::<u32>(n).map_err(alloc())?,
            first_bad: s.alloc_zeros::<u64>(1).map_err(alloc())?,
        });
    }
    bufs.as_mut().ok_or_else(|| ForgeError::Internal("pre-step buffers missing after sizing".into()))
}

/// The pre-step proper, on a sized buffer set.
fn run_prestep(
    dev: &GpuDevice,
    solver: &mut DenseSolver,
    b: &mut PreStepBuffers,
    h: &CudaSlice<f32>,
    n: usize,
    cfg: &PreStepConfig,
) -> Result<PreStep> {
    let stream = dev.stream().clone();
    // diag(H) to the host: the plan needs only it (the f64 symmetrisation's diagonal is the
    // f32 diagonal exactly).
    let args = DiagArgs { h: h.dev_ptr(), cols: n as u32, out: b.diag.dev_ptr_mut() };
    // SAFETY: h holds n² f32, diag n.
    unsafe { dev.launch::<HessianDiag>(ew_config(dev, n)?, &args) }?;
    let diag32 = stream.clone_dtoh(&b.diag).map_err(ForgeError::driver("downloading diag(H)"))?;
    let plan = PreStepPlan::new(diag32.iter().map(|&d| f64::from(d)).collect(), cfg)?;
    let order: Vec<u32> = plan.order(n).iter().map(|&j| j as u32).collect();
    stream.memcpy_htod(&order, &mut b.order).map_err(ForgeError::driver("uploading the column order"))?;

    let (ok, damping, retries) = plan.factor_with_retries(|damping, attempt| {
        Ok(factor_attempt(dev, solver, b, h, n, damping, attempt == 0)?.then_some(()))
    })?;
    let hinv_factor = if ok.is_some() {
        let u = stream.clone_dtoh(&b.u).map_err(ForgeError::driver("downloading the factor"))?;
        Array2::from_shape_vec((n, n), u).map_err(|e| ForgeError::Internal(e.to_string()))?
    } else {
        Array2::eye(n)
    };
    let warnings = plan.warnings(retries, ok.is_none(), damping);
    Ok(PreStep {
        hinv_factor,
        perm: plan.perm,
        dead_columns: plan.dead_columns,
        damping_used: damping as f32,
        retries,
        fallback_identity: ok.is_none(),
        warnings,
    })
}

/// One factorisation with `damping`: gather, potrf, trtri, extract. `Ok(false)` when the
/// matrix is not positive definite or `U` does not fit f32 with a positive diagonal (retry);
/// errors for a non-finite `H` (checked on the first attempt) and for cuSOLVER failures.
fn factor_attempt(
    dev: &GpuDevice,
    solver: &mut DenseSolver,
    b: &mut PreStepBuffers,
    h: &CudaSlice<f32>,
    n: usize,
    damping: f64,
    check_h: bool,
) -> Result<bool> {
    let stream = dev.stream().clone();
    let ew = ew_config(dev, n * n)?;
    stream.memset_zeros(&mut b.first_bad).map_err(ForgeError::driver("resetting the NaN flag"))?;
    let args = GatherArgs {
        h: h.dev_ptr(),
        cols: n as u32,
        order: b.order.dev_ptr(),
        damping,
        a: b.a.dev_ptr_mut(),
        first_bad: b.first_bad.dev_ptr_mut(),
    };
    // SAFETY: h n² f32, order a permutation of 0..n, a n² f64.
    unsafe { dev.launch::<PrestepGather>(ew, &args) }?;
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
    if !solver.potrf_upper(&mut b.a, n)? {
        return Ok(false); // a leading minor is not positive definite
    }
    if !solver.trtri_upper(&mut b.a, n)? {
        return Ok(false); // a zero pivot: cannot follow a successful potrf, but never trust it
    }
    stream.memset_zeros(&mut b.first_bad).map_err(ForgeError::driver("resetting the NaN flag"))?;
    let args =
        ExtractArgs { a: b.a.dev_ptr(), cols: n as u32, u: b.u.dev_ptr_mut(), first_bad: b.first_bad.dev_ptr_mut() };
    // SAFETY: a n² f64, u n² f32.
    unsafe { dev.launch::<PrestepExtract>(ew, &args) }?;
    let flag = stream.clone_dtoh(&b.first_bad).map_err(ForgeError::driver("reading the factor check"))?;
    Ok(flag.first().is_none_or(|&f| f == 0))
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
