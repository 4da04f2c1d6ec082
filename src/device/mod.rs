//! The device runtime on cudarc (driver API, libcuda loaded at run time): one context, its
//! compute stream (non-blocking: it never serialises with other streams implicitly), the
//! kernels module loaded lazily from the PTX that `build.rs` embedded, typed launches
//! ([`GpuDevice::launch`]), counted and checked allocations ([`GpuDevice::alloc`],
//! [`DeviceBuf`]), and the CUDA libraries the stages call ([`cusolver`], [`cublas`]), one
//! handle each per device, bound to the compute stream.
//!
//! No driver, no device and driver failures are typed errors ([`ForgeError::NoDriver`],
//! [`ForgeError::NoDevice`], [`ForgeError::Driver`]); nothing here panics, and the CPU path
//! never touches this module.

pub mod cublas;
pub mod cusolver;
mod launch;

pub use launch::{grid_for, view_ptr, view_ptr_mut, DeviceBuffer, DeviceBufferMut, LaunchAttrs, LaunchDims};

use crate::{ForgeError, Result};
use cudarc::driver::{CudaContext, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The kernels crate compiled to PTX (sm_80 baseline) by `build.rs`.
pub const KERNELS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/forge_kernels.ptx"));
/// The Hopper module (sm_90a: the `wgmma` kernels), loaded only on compute capability 9.0.
pub const KERNELS_HOPPER_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/forge_kernels_hopper.ptx"));

/// One CUDA device with its stream and lazily loaded kernels module.
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Mutex<Option<Arc<CudaModule>>>,
    hopper_module: Mutex<Option<Arc<CudaModule>>>,
    /// `(major, minor)`, read once: the W4A16 plan asks on every launch.
    compute_capability: (u32, u32),
    functions: Mutex<HashMap<&'static str, cudarc::driver::CudaFunction>>,
    /// Resident clusters per [`ClusterShape`], asked once: the W4A16 plan asks on every launch.
    cluster_capacity: Mutex<HashMap<ClusterShape, u32>>,
    constant_memory: Mutex<()>,
    name: String,
    dense: Mutex<Option<cusolver::DenseSolver>>,
    blas: Mutex<Option<cublas::Blas>>,
    allocations: AtomicU64,
    allocated_bytes: AtomicU64,
    /// One per-device object of the layers above (the quantization engine), made on first use.
    extension: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// Kernel name, blocks per cluster, threads per block, dynamic shared bytes.
type ClusterShape = (&'static str, u32, u32, u32);

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
        let compute_capability = {
            use cudarc::driver::sys::CUdevice_attribute as A;
            let read =
                |a| ctx.attribute(a).map(|v| v as u32).map_err(ForgeError::driver("reading the compute capability"));
            (
                read(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                read(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            )
        };
        // A non-blocking stream: work here never waits for the legacy NULL stream, so copies
        // on the engine's other streams overlap with it.
        let stream = ctx.new_stream().map_err(ForgeError::driver("creating the compute stream"))?;
        Ok(Arc::new(GpuDevice {
            ctx,
            stream,
            module: Mutex::new(None),
            hopper_module: Mutex::new(None),
            compute_capability,
            functions: Mutex::new(HashMap::new()),
            cluster_capacity: Mutex::new(HashMap::new()),
            constant_memory: Mutex::new(()),
            name,
            dense: Mutex::new(None),
            blas: Mutex::new(None),
            allocations: AtomicU64::new(0),
            allocated_bytes: AtomicU64::new(0),
            extension: Mutex::new(None),
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
        self.module_of(forge_kernel_abi::PtxModule::Base)
    }

    /// The module `which`, loaded on first use. The Hopper module (sm_90a PTX) loads only on
    /// a compute-capability-9.0 device: anywhere else it is a typed error, not a JIT failure.
    pub fn module_of(&self, which: forge_kernel_abi::PtxModule) -> Result<Arc<CudaModule>> {
        use forge_kernel_abi::PtxModule;
        let (slot, ptx, what) = match which {
            PtxModule::Base => (&self.module, KERNELS_PTX, "loading the kernels PTX"),
            PtxModule::Hopper => {
                if !self.is_hopper() {
                    return Err(ForgeError::Config(format!(
                        "the Hopper kernels need a compute capability 9.0 GPU; {} is {:?}",
                        self.name, self.compute_capability
                    )));
                }
                (&self.hopper_module, KERNELS_HOPPER_PTX, "loading the Hopper kernels PTX")
            }
        };
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let m = self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(ForgeError::driver(what))?;
        *slot = Some(m.clone());
        Ok(m)
    }

    /// `(major, minor)` compute capability.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.compute_capability
    }

    /// Whether the Hopper module runs here (compute capability exactly 9.0: sm_90a code runs
    /// on no other).
    pub fn is_hopper(&self) -> bool {
        self.compute_capability == (9, 0)
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

    /// `len` elements on the compute stream, zeroed, after checking the request against the
    /// device's free memory (a typed error naming both, never a driver abort), counted in
    /// [`GpuDevice::allocation_count`].
    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize, what: &'static str) -> Result<CudaSlice<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or(ForgeError::DeviceMemory {
            what,
            requested: u64::MAX,
            free: 0,
        })?;
        let (free, _) = self.ctx.mem_get_info().map_err(ForgeError::driver("reading free device memory"))?;
        if bytes > free {
            return Err(ForgeError::DeviceMemory { what, requested: bytes as u64, free: free as u64 });
        }
        let s = self.stream.alloc_zeros::<T>(len.max(1)).map_err(ForgeError::driver(what))?;
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.allocated_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(s)
    }

    /// Device allocations made through [`GpuDevice::alloc`] so far (benches show that none
    /// happen per layer after warm-up).
    pub fn allocation_count(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Bytes allocated through [`GpuDevice::alloc`] so far (freed ones included).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_bytes.load(Ordering::Relaxed)
    }

    /// Runs `f` with the device's one object of type `T` (made by `init` on first use): the
    /// per-device engine of the layers above lives here, so every caller shares it. It must
    /// not hold the device strongly (a cycle would keep both alive forever).
    pub fn with_extension<T: std::any::Any + Send, R>(
        &self,
        init: impl FnOnce() -> Result<T>,
        f: impl FnOnce(&mut T) -> Result<R>,
    ) -> Result<R> {
        let mut slot = self.extension.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(Box::new(init()?));
        }
        match slot.as_mut().and_then(|b| b.downcast_mut::<T>()) {
            Some(t) => f(t),
            None => Err(ForgeError::Internal("the device's extension slot holds another type".into())),
        }
    }

    /// Runs `f` with the device's cuSOLVER handle (created on first use, bound to the compute
    /// stream).
    pub fn with_dense_solver<R>(&self, f: impl FnOnce(&mut cusolver::DenseSolver) -> Result<R>) -> Result<R> {
        let mut slot = self.dense.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(cusolver::DenseSolver::new(self)?);
        }
        match slot.as_mut() {
            Some(s) => f(s),
            None => Err(ForgeError::Internal("cuSOLVER handle missing after creation".into())),
        }
    }

    /// Runs `f` with the device's cuBLAS handle (created on first use, bound to the compute
    /// stream).
    pub fn with_blas<R>(&self, f: impl FnOnce(&mut cublas::Blas) -> Result<R>) -> Result<R> {
        let mut slot = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(cublas::Blas::new(self, &self.stream)?);
        }
        match slot.as_mut() {
            Some(b) => f(b),
            None => Err(ForgeError::Internal("cuBLAS handle missing after creation".into())),
        }
    }
}

/// A device buffer that grows to the largest size asked for and is then reused: the
/// engine's workspaces, so that after the largest layer has been seen no layer allocates.
pub struct DeviceBuf<T> {
    slice: Option<CudaSlice<T>>,
}

impl<T> Default for DeviceBuf<T> {
    fn default() -> Self {
        DeviceBuf { slice: None }
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> DeviceBuf<T> {
    /// The buffer with room for at least `len` elements (grown, zeroed, if smaller). The
    /// caller guarantees no queued work still uses the old buffer on another stream.
    pub fn ensure(&mut self, dev: &GpuDevice, len: usize, what: &'static str) -> Result<&mut CudaSlice<T>> {
        if !self.slice.as_ref().is_some_and(|s| s.len() >= len) {
            self.slice = None; // free the old one first
            self.slice = Some(dev.alloc::<T>(len, what)?);
        }
        self.slice.as_mut().ok_or_else(|| ForgeError::Internal(format!("{what}: buffer missing after growing")))
    }

    /// The buffer, if it has room for `len` elements.
    pub fn get(&self, len: usize) -> Result<&CudaSlice<T>> {
        match self.slice.as_ref() {
            Some(s) if s.len() >= len => Ok(s),
            _ => Err(ForgeError::Internal(format!("device buffer smaller than {len} elements"))),
        }
    }

    /// Capacity in elements (0 before the first `ensure`).
    pub fn capacity(&self) -> usize {
        self.slice.as_ref().map_or(0, |s| s.len())
    }
}

#[cfg(test)]
mod tests {
    use forge_kernel_abi::PtxModule;

    /// Every kernel the host can launch is in its module's embedded PTX with the parameter
    /// kinds its argument struct declares, and neither module has another entry (the build
    /// checks this too; this keeps the check visible).
    #[test]
    fn every_kernel_in_the_table_is_in_the_ptx() {
        for (module, ptx, at_least) in
            [(PtxModule::Base, super::KERNELS_PTX, 21), (PtxModule::Hopper, super::KERNELS_HOPPER_PTX, 10)]
        {
            let expected: Vec<(&str, Vec<&str>)> = forge_kernel_abi::KERNELS
                .iter()
                .filter(|k| k.module == module)
                .map(|k| (k.name, k.params.iter().map(|p| p.ptx()).collect()))
                .collect();
            assert!(expected.len() >= at_least, "{module:?}");
            forge_ptx_build::check_entries(ptx, &expected).unwrap();
        }
    }
}
