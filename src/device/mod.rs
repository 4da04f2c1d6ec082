//! The device runtime on cudarc (driver API, libcuda loaded at run time): one context, its
//! stream, the kernels module loaded lazily from the PTX that `build.rs` embedded, typed
//! launches ([`GpuDevice::launch`]) and the CUDA libraries the stages call (cuSOLVER,
//! [`cusolver`]).
//!
//! No driver, no device and driver failures are typed errors ([`ForgeError::NoDriver`],
//! [`ForgeError::NoDevice`], [`ForgeError::Driver`]); nothing here panics, and the CPU path
//! never touches this module.

pub mod cusolver;
mod launch;

pub use launch::{grid_for, view_ptr, view_ptr_mut, DeviceBuffer, DeviceBufferMut, LaunchDims};

use crate::{ForgeError, Result};
use cudarc::driver::{CudaContext, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The kernels crate compiled to PTX (sm_80 baseline) by `build.rs`.
pub const KERNELS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/forge_kernels.ptx"));

/// One CUDA device with its stream and lazily loaded kernels module.
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Mutex<Option<Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, cudarc::driver::CudaFunction>>,
    constant_memory: Mutex<()>,
    name: String,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice").field("name", &self.name).field("ordinal", &self.ctx.ordinal()).finish()
    }
}

impl GpuDevice {
    /// Opens device `ordinal`. Checks for libcuda first: without it cudarc would panic.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(ForgeError::NoDriver);
        }
        let count = CudaContext::device_count().map_err(ForgeError::driver("counting devices"))?;
        if ordinal >= count.max(0) as usize {
            return Err(ForgeError::NoDevice { ordinal, count: count.max(0) as usize });
        }
        let ctx = CudaContext::new(ordinal).map_err(ForgeError::driver("creating a context"))?;
        // SAFETY: called before this context allocates anything. The engine orders its
        // streams itself (events between copy and compute streams), so cudarc's per-buffer
        // events would only add work.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(ForgeError::driver("reading the device name"))?;
        let stream = ctx.default_stream();
        Ok(Arc::new(GpuDevice {
            ctx,
            stream,
            module: Mutex::new(None),
            functions: Mutex::new(HashMap::new()),
            constant_memory: Mutex::new(()),
            name,
        }))
    }

    /// Device 0, or why there is none (the usual entry point).
    pub fn first() -> Result<Arc<Self>> {
        Self::new(0)
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch and copy of this device goes through.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The kernels module, loaded (JIT-compiled from PTX by the driver) on first use.
    pub fn module(&self) -> Result<Arc<CudaModule>> {
        let mut slot = self.module.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let m = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(KERNELS_PTX))
            .map_err(ForgeError::driver("loading the kernels PTX"))?;
        *slot = Some(m.clone());
        Ok(m)
    }

    /// Number of streaming multiprocessors (for sizing persistent grids).
    pub fn sm_count(&self) -> Result<u32> {
        use cudarc::driver::sys::CUdevice_attribute;
        self.ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map(|v| v as u32)
            .map_err(ForgeError::driver("reading the SM count"))
    }

    /// Serialises writers of the module's constant memory (write, then launch, under it).
    pub(crate) fn constant_memory_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.constant_memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for all queued work; surfaces asynchronous kernel faults as errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(ForgeError::driver("synchronizing the stream"))
    }
}

#[cfg(test)]
mod tests {
    /// Every kernel the host can launch is in the embedded PTX with the parameter kinds its
    /// argument struct declares (the build checks this too; this keeps the check visible).
    #[test]
    fn every_kernel_in_the_table_is_in_the_ptx() {
        let expected: Vec<(&str, Vec<&str>)> =
            forge_kernel_abi::KERNELS.iter().map(|k| (k.name, k.params.iter().map(|p| p.ptx()).collect())).collect();
        assert!(expected.len() >= 21);
        forge_ptx_build::check_entries(super::KERNELS_PTX, &expected).unwrap();
    }
}
