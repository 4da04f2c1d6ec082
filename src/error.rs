//! The crate's one error type: every bad input and every driver failure is a typed variant.

use thiserror::Error;

/// Result with [`ForgeError`].
pub type Result<T, E = ForgeError> = std::result::Result<T, E>;

/// Everything that can go wrong, with a message a user can act on.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ForgeError {
    /// A setting is out of range or settings contradict each other (independent of the data).
    #[error("bad configuration: {0}")]
    Config(String),
    /// An invariant of the engine itself broke: a bug, never the user's input. The message
    /// says which.
    #[error("internal error (please report): {0}")]
    Internal(String),
    /// A kernel could not be found in the module or launched.
    #[error("CUDA driver error while launching kernel {kernel}: {source}")]
    Launch {
        /// The kernel's entry name.
        kernel: &'static str,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// `group_size` is not a multiple of 32 in `32..=1024`.
    #[error("group_size {0} is not supported: it must be a multiple of 32 between 32 and 1024")]
    GroupSize(usize),
    /// `bits` is outside `2..=8`.
    #[error("bits = {0} is not supported: it must be between 2 and 8")]
    Bits(u32),
    /// Shapes are empty or do not match each other.
    #[error("bad shape: {0}")]
    Shape(String),
    /// A NaN or infinite value in an input tensor.
    #[error("{tensor} has a non-finite value ({value}) at row {row}, column {col}")]
    NonFinite {
        /// Which input.
        tensor: &'static str,
        /// Row of the first offending element found.
        row: usize,
        /// Column of that element.
        col: usize,
        /// The value (NaN or ±inf).
        value: f32,
    },
    /// A scale-search setting is out of range.
    #[error("bad scale search: {0}")]
    ScaleSearch(String),
    /// An input dtype the engine does not read.
    #[error("unsupported dtype {0}: supported are F32, F16, BF16 and F8_E4M3")]
    Dtype(String),
    /// No CUDA driver library (libcuda) could be loaded.
    #[error("no CUDA driver: libcuda could not be loaded on this machine")]
    NoDriver,
    /// The driver loaded but reports no device with this ordinal.
    #[error("no CUDA device {ordinal} (the driver reports {count})")]
    NoDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error while {op}: {source}")]
    Driver {
        /// What the engine was doing.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is malformed or lacks a tensor.
    #[error("safetensors: {0}")]
    Safetensors(String),
    /// A CUDA library an operation needs (e.g. cuSOLVER for the GPU pre-step) could not be
    /// loaded, or lacks a function the engine calls.
    #[error("CUDA library {library} is not usable: {reason}")]
    MissingLibrary {
        /// The library, e.g. "cuSOLVER".
        library: &'static str,
        /// What was missing and how to provide it.
        reason: String,
    },
    /// An allocation whose size comes from the input would exceed the host memory budget
    /// ([`crate::budget`]), or its size does not even fit the address space. Nothing was
    /// allocated.
    #[error("{}", crate::budget::describe_oom(what, *requested, *limit, origin))]
    OutOfMemory {
        /// What the memory was for.
        what: String,
        /// Bytes requested; `None` when the size computation itself overflows `u64`.
        requested: Option<u64>,
        /// The budget in bytes.
        limit: u64,
        /// Where the budget came from (`FORGE_MAX_HOST_MEMORY`, MemAvailable, ...).
        origin: String,
    },
    /// A count or size computed from the input overflows its integer type (e.g. the running
    /// token count of a Hessian).
    #[error("arithmetic overflow: {0}")]
    Overflow(String),
    /// A Hessian the pre-step or the error metric refuses: it cannot come from calibration
    /// data (all zero, a negative diagonal entry) and would give a meaningless result. The
    /// message says what was found and how to opt in where that is possible.
    #[error("Hessian rejected: {0}")]
    Hessian(String),
    /// A result that would be numerically meaningless (an f32 overflow in the loss, a relative
    /// error with a zero reference): refused rather than returned as inf/NaN.
    #[error("numerically meaningless result: {0}")]
    Numeric(String),
    /// A cuSOLVER call failed (not a factorisation failure: those are retried and flagged).
    #[error("cuSOLVER error while {op}: {source}")]
    Cusolver {
        /// What the engine was doing.
        op: &'static str,
        /// cuSOLVER's status.
        #[source]
        source: cudarc::cusolver::result::CusolverError,
    },
}

impl ForgeError {
    /// Wraps a driver error with what the engine was doing.
    pub fn driver(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> ForgeError {
        move |source| ForgeError::Driver { op, source }
    }
}
