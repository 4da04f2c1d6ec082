//! The `result` layer of our cuSOLVER wrapper (cudarc's own `cusolver::sys` is the raw FFI):
//! thin `unsafe` calls of the 64-bit dense API that turn status codes into typed errors.
//! cudarc's `cusolver::result` lacks `Xpotrf`, which is why these exist.

use crate::{ForgeError, Result};
use cudarc::cusolver::sys as cs;

pub(super) const UPPER: cs::cublasFillMode_t = cs::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER;
pub(super) const F64: cs::cudaDataType = cs::cudaDataType::CUDA_R_64F;

/// Every cuSOLVER function this module calls: probed before the first call, since cudarc
/// panics on a missing symbol.
pub(super) const SYMBOLS: [&str; 7] = [
    "cusolverDnCreate",
    "cusolverDnDestroy",
    "cusolverDnSetStream",
    "cusolverDnCreateParams",
    "cusolverDnDestroyParams",
    "cusolverDnXpotrf_bufferSize",
    "cusolverDnXpotrf",
];

pub(super) fn err(op: &'static str) -> impl FnOnce(cudarc::cusolver::result::CusolverError) -> ForgeError {
    move |source| ForgeError::Cusolver { op, source }
}

/// `(device bytes, host bytes)` of workspace `Xpotrf(UPPER)` needs for an `n × n` f64 matrix.
///
/// # Safety
/// Live `handle` and `params`; `a` the address of an `n × n` f64 device matrix.
pub(super) unsafe fn potrf_buffer_size(
    handle: cs::cusolverDnHandle_t,
    params: cs::cusolverDnParams_t,
    n: i64,
    (a, lda): (u64, i64),
) -> Result<(usize, usize)> {
    let (mut dev, mut host) = (0usize, 0usize);
    cs::cusolverDnXpotrf_bufferSize(handle, params, UPPER, n, F64, a as *const _, lda, F64, &mut dev, &mut host)
        .result()
        .map_err(err("sizing potrf"))?;
    Ok((dev, host))
}

/// Enqueues the Cholesky factorisation `A = RᵀR` (upper `R` in place) on the handle's stream;
/// `info` (device i32) receives the first non-positive leading minor, or 0.
///
/// # Safety
/// Live handle/params bound to the stream the buffers are ready on; `a` an `n × n` f64
/// device matrix (leading dimension `lda ≥ n`); workspaces of the sizes [`potrf_buffer_size`] returned; `info` one i32.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn potrf(
    handle: cs::cusolverDnHandle_t,
    params: cs::cusolverDnParams_t,
    n: i64,
    (a, lda): (u64, i64),
    work_dev: (u64, usize),
    work_host: &mut [u8],
    info: u64,
) -> Result<()> {
    cs::cusolverDnXpotrf(
        handle,
        params,
        UPPER,
        n,
        F64,
        a as *mut _,
        lda,
        F64,
        work_dev.0 as *mut _,
        work_dev.1,
        work_host.as_mut_ptr() as *mut _,
        work_host.len(),
        info as *mut _,
    )
    .result()
    .map_err(err("running potrf"))
}
