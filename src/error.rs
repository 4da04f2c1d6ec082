//! The crate's one error type: every bad input and every driver failure is a typed variant.

use thiserror::Error;

/// Result with [`ForgeError`].
pub type Result<T, E = ForgeError> = std::result::Result<T, E>;

/// Everything that can go wrong, with a message a user can act on.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ForgeError {
    /// A setting is out of range or settings contradict each other (independent of the
    /// data), or a model configuration, tokenizer or calibration setting the engine cannot
    /// use (unknown architecture, missing or inconsistent field, unreadable tokenizer).
    #[error("bad configuration: {0}")]
    Config(String),
    /// An invariant of the engine itself broke: a bug, never the user's input. The message
    /// says which.
    #[error("internal error (please report): {0}")]
    Internal(String),
    /// A device allocation would not fit in the device's free memory.
    #[error("not enough device memory for {what}: {requested} bytes requested, {free} bytes free")]
    DeviceMemory {
        /// What the buffer is for.
        what: &'static str,
        /// Bytes asked for (`u64::MAX` when the size overflowed).
        requested: u64,
        /// Free device memory.
        free: u64,
    },
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
    /// A checkpoint format cannot hold this data, or a stored checkpoint disagrees with its
    /// format (missing or misshapen tensors, values out of range, unknown format names).
    #[error("checkpoint format: {0}")]
    Format(String),
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
    /// A cuBLAS call failed.
    #[error("cuBLAS error while {op}: {source}")]
    Cublas {
        /// What the engine was doing.
        op: &'static str,
        /// cuBLAS's status.
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    /// An allocation whose size comes from the input would exceed the host memory budget
    /// ([`crate::budget`]), or its size does not even fit the address space; or a checkpoint
    /// step's estimate exceeds the run's budget (origin [`crate::budget::RUN_BUDGET_ORIGIN`]).
    /// Nothing was allocated.
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
    /// A model directory's index names a shard file that is not there.
    #[error("{index} names the shard {shard}, which does not exist in the model directory")]
    MissingShard {
        /// The index file.
        index: String,
        /// The missing shard's file name.
        shard: String,
    },
    /// A tensor the index (or a caller) names is not in the file it should be in.
    #[error("tensor {tensor} is not in {file}")]
    MissingTensor {
        /// The tensor's name.
        tensor: String,
        /// Where it was looked for.
        file: String,
    },
    /// An input path is not a regular file (a FIFO, a device, a directory, ...).
    #[error("{path} is not a regular file ({kind}); refusing to read it")]
    NotRegularFile {
        /// The path.
        path: String,
        /// What it is instead.
        kind: String,
    },
    /// `--resume` cannot continue the partial output it found.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// The device engine's buffers would grow past the GPU memory budget at a step (checked
    /// before any work).
    #[error("{what} needs about {needed} bytes of GPU memory (the engine's buffers for two jobs in flight, grown to the largest step so far), over the budget of {budget} bytes (raise --max-gpu-memory, free device memory, or exclude it)")]
    GpuMemoryBudget {
        /// The step (tensor or fused group).
        what: String,
        /// Estimated device bytes.
        needed: u64,
        /// The budget.
        budget: u64,
    },
    /// The run was stopped on purpose (a test hook standing in for a crash).
    #[error("interrupted after {0} work items (test hook)")]
    Interrupted(usize),
}

impl ForgeError {
    /// Wraps a driver error with what the engine was doing.
    pub fn driver(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> ForgeError {
        move |source| ForgeError::Driver { op, source }
    }
}
