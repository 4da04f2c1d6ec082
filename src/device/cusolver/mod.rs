//! cuSOLVER, loaded at run time (cudarc, dynamic loading), wrapped in the layers cudarc
//! uses: cudarc's `cusolver::sys` is the FFI, [`result`] our checked calls, and this module
//! the safe layer: a [`DenseSolver`] owns a handle bound to a stream and its workspaces.
//!
//! `libcusolver.so` (and the `libcublas`, `libcublasLt`, `libcusparse`, `libnvJitLink` it
//! links) must be on the loader's path, e.g.
//! `LD_LIBRARY_PATH=$VENV/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64`.
//! Without it [`DenseSolver::new`] returns [`ForgeError::MissingLibrary`] (never a panic:
//! presence and every symbol called are probed first).

mod result;

use super::{DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::{ForgeError, Result};
use cudarc::cusolver::sys as cs;
use cudarc::driver::{CudaSlice, CudaStream};

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
    for sym in result::SYMBOLS {
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

/// Owned cuSOLVER dense handle and 64-bit-API parameters (destroyed on drop, errors ignored:
/// nothing can be done about a failing destroy).
struct Handle {
    handle: cs::cusolverDnHandle_t,
    params: cs::cusolverDnParams_t,
}

impl Drop for Handle {
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

/// Workspaces of one `(side, leading dimension)`.
struct Workspace {
    n: (usize, usize),
    potrf_dev: CudaSlice<u8>,
    potrf_host: Vec<u8>,
}

/// A cuSOLVER dense handle on one stream with the workspace for the last matrix side
/// (reused across calls of the same size).
pub struct DenseSolver {
    handle: Handle,
    stream: std::sync::Arc<CudaStream>,
    work: Option<Workspace>,
}

// SAFETY: cuSOLVER handles may be used from any thread, one call at a time (&mut self).
unsafe impl Send for DenseSolver {}

impl DenseSolver {
    /// Loads cuSOLVER ([`cusolver_available`]) and creates a handle on `dev`'s stream.
    pub fn new(dev: &GpuDevice) -> Result<Self> {
        cusolver_available()?;
        dev.context().bind_to_thread().map_err(ForgeError::driver("binding the context"))?;
        let h = cudarc::cusolver::result::dn_create().map_err(result::err("creating a cuSOLVER handle"))?;
        let mut handle = Handle { handle: h, params: std::ptr::null_mut() };
        handle.params =
            cudarc::cusolver::result::dn_create_params().map_err(result::err("creating cuSOLVER params"))?;
        let stream = dev.stream().clone();
        // SAFETY: a live handle and the device's live stream (kept alive by `self.stream`).
        unsafe { cudarc::cusolver::result::dn_set_stream(handle.handle, stream.cu_stream() as _) }
            .map_err(result::err("setting the cuSOLVER stream"))?;
        Ok(DenseSolver { handle, stream, work: None })
    }

    /// Enqueues the Cholesky factorisation `A = RᵀR` in place (upper `R`; `A` an `n × n` f64
    /// matrix, column-major or symmetric) on the compute stream, without waiting: `info`
    /// (a device i32) receives 0, or the first leading minor that is not positive definite.
    /// The workspace is (re)made when `n` changes, through `dev`'s checked allocation.
    ///
    /// # Safety
    /// `a` is the device address of a live `n × n` f64 matrix and `info` of a live i32, both
    /// ready on the device's compute stream.
    pub unsafe fn potrf_upper_async(&mut self, dev: &GpuDevice, a: u64, n: usize, info: u64) -> Result<()> {
        self.potrf_upper_block_async(dev, (a, n), n, info)
    }

    /// [`Self::potrf_upper_async`] of the `n × n` block at `a` of a column-major matrix with
    /// leading dimension `lda ≥ n` (a diagonal block of a larger matrix).
    ///
    /// # Safety
    /// As [`Self::potrf_upper_async`], the block inside a live buffer.
    pub unsafe fn potrf_upper_block_async(
        &mut self,
        dev: &GpuDevice,
        (a, lda): (u64, usize),
        n: usize,
        info: u64,
    ) -> Result<()> {
        if n == 0 || lda < n {
            return Err(ForgeError::Internal(format!("potrf of a {n}×{n} block with leading dimension {lda}")));
        }
        let (h, p) = (self.handle.handle, self.handle.params);
        if !self.work.as_ref().is_some_and(|w| w.n == (n, lda)) {
            // Grow-only: a layer of another size reuses a workspace that is large enough, so
            // alternating sizes (an expert's gate/up and down) allocate nothing.
            let (pd, ph) = result::potrf_buffer_size(h, p, n as i64, (a, lda as i64))?;
            let fits =
                self.work.as_ref().is_some_and(|w| w.potrf_dev.len() >= pd.max(1) && w.potrf_host.len() >= ph.max(1));
            if fits {
                if let Some(w) = self.work.as_mut() {
                    w.n = (n, lda);
                }
            } else {
                self.work = None; // free the old size first
                self.work = Some(Workspace {
                    n: (n, lda),
                    potrf_dev: dev.alloc::<u8>(pd.max(1), "cuSOLVER potrf workspace")?,
                    potrf_host: vec![0u8; ph.max(1)],
                });
            }
        }
        let w = self.work.as_mut().ok_or_else(|| ForgeError::Internal("cuSOLVER workspace missing".into()))?;
        let work = (w.potrf_dev.dev_ptr_mut().addr(), w.potrf_dev.len());
        result::potrf(h, p, n as i64, (a, lda as i64), work, &mut w.potrf_host, info)
    }

    /// Addresses of the potrf workspaces (device, host), `(0, 0)` before the first potrf:
    /// a captured graph names them, so it is valid only while they stay where they are.
    pub fn workspace_addrs(&self) -> (u64, u64) {
        self.work.as_ref().map_or((0, 0), |w| (w.potrf_dev.dev_ptr().addr(), w.potrf_host.as_ptr() as u64))
    }

    /// The stream the handle runs on.
    pub fn stream(&self) -> &std::sync::Arc<CudaStream> {
        &self.stream
    }
}
