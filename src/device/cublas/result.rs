//! The `result` layer of our cuBLAS wrapper (cudarc's `cublas::sys` is the FFI, its
//! `cublas::result` has GEMM but no triangular solve): checked `unsafe` calls.

use crate::{ForgeError, Result};
use cudarc::cublas::sys as cb;

/// Every cuBLAS function this module calls (probed before the first call: cudarc panics on a
/// missing symbol).
pub(super) const SYMBOLS: [&str; 10] = [
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetMathMode",
    "cublasDtrsm_v2",
    "cublasDtrmm_v2",
    "cublasDsyrk_v2",
    "cublasDgemm_v2",
    "cublasGemmEx",
    "cublasGemmStridedBatchedEx",
];

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

/// `C ← alpha · op(R) · B` (`left`) or `C ← alpha · B · op(R)` (`op(R) = Rᵀ` when `trans`) for
/// an upper triangular, non-unit f64 `R` (`lda`) and an `m × n` f64 `B` (`ldb`) into `C` (`ldc`; `C = B` is in place, cuBLAS's
/// out-of-place trmm allows exactly that overlap).
///
/// # Safety
/// As [`trsm_left_upper`]; `c` holds an `m × n` matrix and overlaps `b` only as `c == b`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn trmm_upper(
    handle: cb::cublasHandle_t,
    (left, trans): (bool, bool),
    m: i32,
    n: i32,
    alpha: f64,
    a: u64,
    lda: i32,
    b: u64,
    ldb: i32,
    c: u64,
    ldc: i32,
) -> Result<()> {
    let side = if left { cb::cublasSideMode_t::CUBLAS_SIDE_LEFT } else { cb::cublasSideMode_t::CUBLAS_SIDE_RIGHT };
    cb::cublasDtrmm_v2(
        handle,
        side,
        cb::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
        if trans { cb::cublasOperation_t::CUBLAS_OP_T } else { cb::cublasOperation_t::CUBLAS_OP_N },
        cb::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
        m,
        n,
        &alpha,
        a as *const f64,
        lda,
        b as *const f64,
        ldb,
        c as *mut f64,
        ldc,
    )
    .result()
    .map_err(err("running trmm"))
}

/// `C ← alpha · AᵀA + beta · C`, upper triangle of the `n × n` f64 `C` only (`ldc`), `A`
/// `k × n` (`lda`).
///
/// # Safety
/// As [`trsm_left_upper`], the buffers of those shapes, `C` not overlapping `A`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn syrk_upper_t(
    handle: cb::cublasHandle_t,
    (n, k): (i32, i32),
    alpha: f64,
    (a, lda): (u64, i32),
    beta: f64,
    (c, ldc): (u64, i32),
) -> Result<()> {
    cb::cublasDsyrk_v2(
        handle,
        cb::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
        cb::cublasOperation_t::CUBLAS_OP_T,
        n,
        k,
        &alpha,
        a as *const f64,
        lda,
        &beta,
        c as *mut f64,
        ldc,
    )
    .result()
    .map_err(err("running syrk"))
}

/// `C ← alpha · op(A) · op(B) + beta · C` for column-major f64 `op(A)` `m × k`, `op(B)`
/// `k × n`, `C` `m × n` (`op` transposes when its flag is set; `C` overlaps neither input).
///
/// # Safety
/// As [`trsm_left_upper`], the buffers of those shapes.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dgemm(
    handle: cb::cublasHandle_t,
    (ta, tb): (bool, bool),
    (m, n, k): (i32, i32, i32),
    alpha: f64,
    (a, lda): (u64, i32),
    (b, ldb): (u64, i32),
    beta: f64,
    (c, ldc): (u64, i32),
) -> Result<()> {
    let op = |t: bool| if t { cb::cublasOperation_t::CUBLAS_OP_T } else { cb::cublasOperation_t::CUBLAS_OP_N };
    cb::cublasDgemm_v2(
        handle,
        op(ta),
        op(tb),
        m,
        n,
        k,
        &alpha,
        a as *const f64,
        lda,
        b as *const f64,
        ldb,
        &beta,
        c as *mut f64,
        ldc,
    )
    .result()
    .map_err(err("running dgemm"))
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
/// Row `i` of `Y` starts `i·ldy` elements after `y` (`ldy ≥ n`: a column range of a wider `Y`).
///
/// # Safety
/// As [`trsm_left_upper`], `x`, `w` holding `m·k`, `n·k` elements of `t`, `y`
/// `(m − 1)·ldy + n`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_xwt(
    handle: cb::cublasHandle_t,
    m: i32,
    n: i32,
    k: i32,
    x: u64,
    w: u64,
    y: u64,
    ldy: i32,
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
        ldy,
        cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .map_err(err("running gemm_ex (16-bit X·Wᵀ)"))
}

/// One column-major operand of [`gemm_batched`]: address, element type, leading dimension,
/// elements between batch items.
pub(super) struct Operand {
    pub addr: u64,
    pub dtype: cb::cudaDataType,
    pub ld: i32,
    pub stride: i64,
}

/// `C_b ← alpha · op(A_b) · op(B_b) + beta · C_b` for `b < batch` (column-major, `m × n`
/// output, inner dimension `k`), computed in `compute` with f32 scalars.
///
/// # Safety
/// Live handle bound to the stream the buffers are ready on; every batch item's matrices lie
/// in their buffers; `C` overlaps neither input.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_batched(
    handle: cb::cublasHandle_t,
    (ta, tb): (bool, bool),
    (m, n, k): (i32, i32, i32),
    alpha: f32,
    a: &Operand,
    b: &Operand,
    beta: f32,
    c: &Operand,
    batch: i32,
    compute: cb::cublasComputeType_t,
) -> Result<()> {
    let op = |t: bool| if t { cb::cublasOperation_t::CUBLAS_OP_T } else { cb::cublasOperation_t::CUBLAS_OP_N };
    cudarc::cublas::result::gemm_strided_batched_ex(
        handle,
        op(ta),
        op(tb),
        m,
        n,
        k,
        (&alpha) as *const f32 as *const _,
        a.addr as *const _,
        a.dtype,
        a.ld,
        a.stride,
        b.addr as *const _,
        b.dtype,
        b.ld,
        b.stride,
        (&beta) as *const f32 as *const _,
        c.addr as *mut _,
        c.dtype,
        c.ld,
        c.stride,
        batch,
        compute,
        cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .map_err(err("running gemm_strided_batched_ex"))
}
