//! The `result` layer of our cuBLAS wrapper (cudarc's `cublas::sys` is the FFI, its
//! `cublas::result` has GEMM but no triangular solve): checked `unsafe` calls.

use crate::{ForgeError, Result};
use cudarc::cublas::sys as cb;

/// Every cuBLAS function this module calls (probed before the first call: cudarc panics on a
/// missing symbol).
pub(super) const SYMBOLS: [&str; 5] =
    ["cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2", "cublasDtrsm_v2", "cublasGemmEx"];

pub(super) fn err(op: &'static str) -> impl FnOnce(cudarc::cublas::result::CublasError) -> ForgeError {
    move |source| ForgeError::Cublas { op, source }
}

/// `B ← alpha · R⁻¹ · B` for an upper triangular, non-unit `m × m` f64 matrix `R` (column-major,
/// leading dimension `lda`) and an `m × n` f64 matrix `B` (`ldb`), on the handle's stream.
///
/// # Safety
/// Live handle bound to the stream the buffers are ready on; `a` and `b` device addresses of
/// matrices of those shapes.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn trsm_left_upper(
    handle: cb::cublasHandle_t,
    m: i32,
    n: i32,
    alpha: f64,
    a: u64,
    lda: i32,
    b: u64,
    ldb: i32,
) -> Result<()> {
    cb::cublasDtrsm_v2(
        handle,
        cb::cublasSideMode_t::CUBLAS_SIDE_LEFT,
        cb::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
        cb::cublasOperation_t::CUBLAS_OP_N,
        cb::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
        m,
        n,
        &alpha,
        a as *const f64,
        lda,
        b as *mut f64,
        ldb,
    )
    .result()
    .map_err(err("running trsm"))
}

/// `C ← A · Aᵀ` (column-major `n × n` f32 `C`) for `A` column-major `n × k` of `a_type`
/// elements, f32 accumulation (tensor cores for 16-bit inputs).
///
/// # Safety
/// As [`trsm_left_upper`], `a` holding `n·k` elements of `a_type` and `c` `n²` f32.
pub(super) unsafe fn gemm_aat(
    handle: cb::cublasHandle_t,
    n: i32,
    k: i32,
    a: u64,
    a_type: cb::cudaDataType,
    c: u64,
) -> Result<()> {
    let (alpha, beta) = (1f32, 0f32);
    cudarc::cublas::result::gemm_ex(
        handle,
        cb::cublasOperation_t::CUBLAS_OP_N,
        cb::cublasOperation_t::CUBLAS_OP_T,
        n,
        n,
        k,
        (&alpha) as *const f32 as *const _,
        a as *const _,
        a_type,
        n,
        a as *const _,
        a_type,
        n,
        (&beta) as *const f32 as *const _,
        c as *mut _,
        cb::cudaDataType::CUDA_R_32F,
        n,
        cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .map_err(err("running gemm_ex"))
}

/// `Y = X · Wᵀ` for row-major `X [m, k]`, `W [n, k]`, `Y [m, n]`, all of `t` (f16 or bf16),
/// f32 accumulation (`CUBLAS_COMPUTE_32F`). Column-major view: `Yᶜ [n, m] = op_T(Wᶜ [k, n]) ·
/// Xᶜ [k, m]`.
///
/// # Safety
/// As [`trsm_left_upper`], `x`, `w`, `y` holding `m·k`, `n·k`, `m·n` elements of `t`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_xwt(
    handle: cb::cublasHandle_t,
    m: i32,
    n: i32,
    k: i32,
    x: u64,
    w: u64,
    y: u64,
    t: cb::cudaDataType,
) -> Result<()> {
    let (alpha, beta) = (1f32, 0f32);
    cudarc::cublas::result::gemm_ex(
        handle,
        cb::cublasOperation_t::CUBLAS_OP_T,
        cb::cublasOperation_t::CUBLAS_OP_N,
        n,
        m,
        k,
        (&alpha) as *const f32 as *const _,
        w as *const _,
        t,
        k,
        x as *const _,
        t,
        k,
        (&beta) as *const f32 as *const _,
        y as *mut _,
        t,
        n,
        cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .map_err(err("running gemm_ex (16-bit X·Wᵀ)"))
}
