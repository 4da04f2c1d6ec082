//! cuBLAS, loaded at run time (cudarc, dynamic loading) from the same place as cuSOLVER
//! (see [`super::cusolver`]), in cudarc's layers: its `cublas::sys` FFI, our [`result`]
//! calls, and the safe [`Blas`] handle bound to a stream.

mod result;

use super::GpuDevice;
use crate::{ForgeError, Result};
use cudarc::cublas::sys as cb;
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// `Ok` when cuBLAS loads and has every function this module calls.
pub fn cublas_available() -> Result<()> {
    let hint = "put the directory holding libcublas.so.* (and libcublasLt) on LD_LIBRARY_PATH, e.g. \
                <venv>/lib/python3.12/site-packages/nvidia/cu13/lib or /usr/local/cuda/lib64";
    // SAFETY: only tries to dlopen the library under its usual names.
    if !unsafe { cb::is_culib_present() } {
        return Err(ForgeError::MissingLibrary {
            library: "cuBLAS",
            reason: format!("libcublas could not be loaded; {hint}"),
        });
    }
    // SAFETY: present (checked above); symbols are only looked up.
    let lib = unsafe { cb::culib() };
    for sym in result::SYMBOLS {
        // SAFETY: a lookup; the fn-pointer type is never called through.
        if unsafe { lib.get::<unsafe extern "C" fn()>(sym.as_bytes()) }.is_err() {
            return Err(ForgeError::MissingLibrary {
                library: "cuBLAS",
                reason: format!("the loaded libcublas lacks {sym}"),
            });
        }
    }
    Ok(())
}

/// Element types of a matrix cuBLAS multiplies here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlasInput {
    /// f32.
    F32,
    /// f16 (tensor cores, f32 accumulation).
    F16,
    /// bf16 (tensor cores, f32 accumulation).
    BF16,
}

/// Element types of the row-major GEMM operands ([`RowMatrix`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmType {
    /// f32.
    F32,
    /// bf16.
    BF16,
}

impl GemmType {
    fn cuda(self) -> cb::cudaDataType {
        match self {
            GemmType::F32 => cb::cudaDataType::CUDA_R_32F,
            GemmType::BF16 => cb::cudaDataType::CUDA_R_16BF,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            GemmType::F32 => 4,
            GemmType::BF16 => 2,
        }
    }
}

/// A row-major matrix operand of [`Blas::gemm_rows`]: device address of item 0, element type,
/// elements between rows, elements between batch items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowMatrix {
    /// Device address of batch item 0's first element.
    pub addr: u64,
    /// Element type.
    pub dtype: GemmType,
    /// Elements between consecutive rows.
    pub row_stride: usize,
    /// Elements between consecutive batch items.
    pub batch_stride: usize,
}

/// How [`Blas::gemm_rows`] multiplies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowGemm {
    /// Rows of `A` and `C`.
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// `B` is stored `n × k` (a Linear's weight: `C = A·Bᵀ`) rather than `k × n`.
    pub b_transposed: bool,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of `C`'s old value (0: overwritten, 1: accumulated into).
    pub beta: f32,
    /// Batch items.
    pub batch: usize,
    /// f32 products on the tensor cores with TF32 inputs (10-bit mantissas) instead of full
    /// f32 (only for f32 operands).
    pub tf32: bool,
}

/// A cuBLAS handle on one stream (destroyed on drop).
pub struct Blas {
    handle: cb::cublasHandle_t,
    _stream: Arc<CudaStream>,
}

// SAFETY: a cuBLAS handle may be used from any thread, one call at a time (&mut self).
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by this struct, destroyed once.
        unsafe {
            let _ = cudarc::cublas::result::destroy_handle(self.handle);
        }
    }
}

impl Blas {
    /// Loads cuBLAS and creates a handle on `stream` of `dev`.
    pub fn new(dev: &GpuDevice, stream: &Arc<CudaStream>) -> Result<Self> {
        cublas_available()?;
        dev.context().bind_to_thread().map_err(ForgeError::driver("binding the context"))?;
        let handle = cudarc::cublas::result::create_handle().map_err(result::err("creating a cuBLAS handle"))?;
        let blas = Blas { handle, _stream: stream.clone() };
        // SAFETY: a live handle and a live stream (kept alive by `_stream`).
        unsafe { cudarc::cublas::result::set_stream(blas.handle, stream.cu_stream() as _) }
            .map_err(result::err("setting the cuBLAS stream"))?;
        // Reductions (split-K) in the f32 compute type, never in a 16-bit output type: the
        // W4A16 cuBLAS path's error bound counts f32 accumulation only (on the H200, bf16
        // split-K reductions put an output 6 bf16 ulps off).
        // SAFETY: a live handle.
        unsafe {
            cb::cublasSetMathMode(blas.handle, cb::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)
        }
        .result()
        .map_err(result::err("setting the cuBLAS math mode"))?;
        Ok(blas)
    }

    /// `B ← R⁻¹ · B` in place: `R` upper triangular non-unit `m × m` (column-major, `lda`),
    /// `B` `m × n` (`ldb`), f64.
    ///
    /// # Safety
    /// `a` and `b` are device addresses of live buffers of those shapes, ready on the
    /// handle's stream.
    pub unsafe fn trsm_upper_left(&mut self, m: usize, n: usize, a: u64, lda: usize, b: u64, ldb: usize) -> Result<()> {
        let c = |v: usize| i32::try_from(v).map_err(|_| ForgeError::Internal(format!("{v} exceeds cuBLAS's int")));
        result::trsm_left_upper(self.handle, c(m)?, c(n)?, 1.0, a, c(lda)?, b, c(ldb)?)
    }

    /// `C ← alpha · op(R) · B` (`left`) or `C ← alpha · B · op(R)`, `op(R) = Rᵀ` when `trans`:
    /// `R` upper triangular non-unit (`lda`), `B` and `C` `m × n` (`ldb`, `ldc`), f64;
    /// `c == b` is in place.
    ///
    /// # Safety
    /// Live buffers of those shapes ready on the handle's stream; `c` overlaps `b` only as
    /// `c == b` (with the same leading dimension).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn trmm_upper(
        &mut self,
        (left, trans): (bool, bool),
        (m, n): (usize, usize),
        alpha: f64,
        (a, lda): (u64, usize),
        (b, ldb): (u64, usize),
        (c, ldc): (u64, usize),
    ) -> Result<()> {
        let i = |v: usize| i32::try_from(v).map_err(|_| ForgeError::Internal(format!("{v} exceeds cuBLAS's int")));
        result::trmm_upper(self.handle, (left, trans), i(m)?, i(n)?, alpha, a, i(lda)?, b, i(ldb)?, c, i(ldc)?)
    }

    /// `C ← alpha · AᵀA + beta · C` on the upper triangle of the `n × n` f64 `C`; `A` `k × n`.
    ///
    /// # Safety
    /// Live buffers of those shapes ready on the handle's stream; `C` does not overlap `A`.
    pub unsafe fn syrk_upper_t(
        &mut self,
        (n, k): (usize, usize),
        alpha: f64,
        (a, lda): (u64, usize),
        beta: f64,
        (c, ldc): (u64, usize),
    ) -> Result<()> {
        let i = |v: usize| i32::try_from(v).map_err(|_| ForgeError::Internal(format!("{v} exceeds cuBLAS's int")));
        result::syrk_upper_t(self.handle, (i(n)?, i(k)?), alpha, (a, i(lda)?), beta, (c, i(ldc)?))
    }

    /// `C ← alpha · op(A) · op(B) + beta · C`, f64 column-major, `op(A)` `m × k`, `op(B)`
    /// `k × n`, `C` `m × n`; `op` transposes when `(ta, tb)` says so.
    ///
    /// # Safety
    /// Live buffers of those shapes ready on the handle's stream; `C` overlaps neither input.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dgemm(
        &mut self,
        trans: (bool, bool),
        (m, n, k): (usize, usize, usize),
        alpha: f64,
        (a, lda): (u64, usize),
        (b, ldb): (u64, usize),
        beta: f64,
        (c, ldc): (u64, usize),
    ) -> Result<()> {
        let i = |v: usize| i32::try_from(v).map_err(|_| ForgeError::Internal(format!("{v} exceeds cuBLAS's int")));
        result::dgemm(self.handle, trans, (i(m)?, i(n)?, i(k)?), alpha, (a, i(lda)?), (b, i(ldb)?), beta, (c, i(ldc)?))
    }

    /// `C = A·Aᵀ` for `A` column-major `n × k` (a row-major `k × n` activation matrix `X`,
    /// so `C = XᵀX`), f32 output `n × n`.
    ///
    /// # Safety
    /// `a` holds `n·k` elements of `input`, `c` `n²` f32, both ready on the handle's stream.
    pub unsafe fn gemm_aat(&mut self, input: BlasInput, n: usize, k: usize, a: u64, c: u64) -> Result<()> {
        let cv = |v: usize| i32::try_from(v).map_err(|_| ForgeError::Internal(format!("{v} exceeds cuBLAS's int")));
        let t = match input {
            BlasInput::F32 => cb::cudaDataType::CUDA_R_32F,
            BlasInput::F16 => cb::cudaDataType::CUDA_R_16F,
            BlasInput::BF16 => cb::cudaDataType::CUDA_R_16BF,
        };
        result::gemm_aat(self.handle, cv(n)?, cv(k)?, a, t, c)
    }

    /// `C_b = alpha · A_b · op(B_b) + beta · C_b` on row-major matrices (`A` `m × k`, `B`
    /// `n × k` when `b_transposed` else `k × n`, `C` `m × n`), f32 accumulation: the forward
    /// pass's Linears (bf16 or f32 inputs, f32 output) and attention products (f32).
    ///
    /// # Safety
    /// Every batch item's matrices lie in live buffers ready on the handle's stream; `C`
    /// overlaps neither input.
    pub unsafe fn gemm_rows(&mut self, g: &RowGemm, a: &RowMatrix, b: &RowMatrix, c: &RowMatrix) -> Result<()> {
        let i = |v: usize| i32::try_from(v).map_err(|_| ForgeError::Internal(format!("{v} exceeds cuBLAS's int")));
        let l = |v: usize| i64::try_from(v).map_err(|_| ForgeError::Internal(format!("{v} exceeds cuBLAS's stride")));
        let operand = |x: &RowMatrix| -> Result<result::Operand> {
            Ok(result::Operand {
                addr: x.addr,
                dtype: x.dtype.cuda(),
                ld: i(x.row_stride)?,
                stride: l(x.batch_stride)?,
            })
        };
        let compute = if g.tf32 && a.dtype == GemmType::F32 {
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        // Row-major C = A·op(B) is column-major Cᵀ = op(B)ᵀ·Aᵀ: cuBLAS's "A" is our B.
        result::gemm_batched(
            self.handle,
            (g.b_transposed, false),
            (i(g.n)?, i(g.m)?, i(g.k)?),
            g.alpha,
            &operand(b)?,
            &operand(a)?,
            g.beta,
            &operand(c)?,
            i(g.batch)?,
            compute,
        )
    }

    /// `Y = X · Wᵀ` in 16-bit (`BF16` or `F16`; f32 accumulation): row-major `X [m, k]`,
    /// `W [n, k]`, `Y [m, n]` — the dense baseline of the W4A16 kernel and its large-`M` path.
    ///
    /// # Safety
    /// `x`, `w`, `y` are device addresses of live buffers of `m·k`, `n·k`, `m·n` elements of
    /// `input`, ready on the handle's stream.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_xwt(
        &mut self,
        input: BlasInput,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        w: u64,
        y: u64,
    ) -> Result<()> {
        self.gemm_xwt_strided(input, m, n, k, x, w, y, n)
    }

    /// [`Blas::gemm_xwt`] into a column range of a wider `Y`: row `i` of the `m × n` result
    /// starts `i·ldy` elements after `y` (`ldy ≥ n`).
    ///
    /// # Safety
    /// `x`, `w` are device addresses of live buffers of `m·k`, `n·k` elements of `input`, `y`
    /// of `(m − 1)·ldy + n`, ready on the handle's stream.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_xwt_strided(
        &mut self,
        input: BlasInput,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        w: u64,
        y: u64,
        ldy: usize,
    ) -> Result<()> {
        let cv = |v: usize| i32::try_from(v).map_err(|_| ForgeError::Internal(format!("{v} exceeds cuBLAS's int")));
        let t = match input {
            BlasInput::F16 => cb::cudaDataType::CUDA_R_16F,
            BlasInput::BF16 => cb::cudaDataType::CUDA_R_16BF,
            BlasInput::F32 => return Err(ForgeError::Internal("gemm_xwt takes 16-bit inputs".into())),
        };
        if ldy < n {
            return Err(ForgeError::Internal(format!("gemm_xwt: ldy {ldy} < n {n}")));
        }
        result::gemm_xwt(self.handle, cv(m)?, cv(n)?, cv(k)?, x, w, y, cv(ldy)?, t)
    }
}
