//! Typed kernel launches (docs/kernels.md §1): a kernel is a `forge_kernel_abi` marker type,
//! its arguments one struct filled by field name; [`GpuDevice::launch`] pushes the fields in
//! the order the kernel declares them. Device buffers become [`DevPtr`]s through
//! [`DeviceBuffer`].

use super::GpuDevice;
use crate::{ForgeError, Result};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use forge_kernel_abi::{DevPtr, DevPtrMut, Kernel, KernelArgs, ParamRef};

/// Grid and block sizes plus dynamic shared memory of a 1-D launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks along x.
    pub blocks: u32,
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
}

impl From<LaunchDims> for LaunchConfig {
    fn from(d: LaunchDims) -> Self {
        LaunchConfig { grid_dim: (d.blocks, 1, 1), block_dim: (d.threads, 1, 1), shared_mem_bytes: d.shared_bytes }
    }
}

/// Enough `threads`-wide blocks to cover `items` (at least one block, at most 2^31 − 1).
pub fn grid_for(items: usize, threads: u32) -> LaunchDims {
    let blocks = items.div_ceil(threads as usize).clamp(1, i32::MAX as usize) as u32;
    LaunchDims { blocks, threads, shared_bytes: 0 }
}

/// A device buffer a kernel may read: its address as a typed [`DevPtr`].
///
/// The device's context runs without cudarc's per-buffer event tracking (the engine orders
/// its streams with explicit events), so taking an address records nothing.
pub trait DeviceBuffer<T> {
    /// The buffer's start address.
    fn dev_ptr(&self) -> DevPtr<T>;
}

/// A device buffer a kernel may write.
pub trait DeviceBufferMut<T> {
    /// The buffer's start address, for writing.
    fn dev_ptr_mut(&mut self) -> DevPtrMut<T>;
}

impl<T> DeviceBuffer<T> for CudaSlice<T> {
    fn dev_ptr(&self) -> DevPtr<T> {
        let (p, _no_event) = self.device_ptr(self.stream());
        DevPtr::from_addr(p)
    }
}

/// The address of a sub-view (views do not expose their stream; with event tracking off
/// the stream passed here records nothing).
pub fn view_ptr<T>(view: &CudaView<'_, T>, stream: &CudaStream) -> DevPtr<T> {
    let (p, _no_event) = view.device_ptr(stream);
    DevPtr::from_addr(p)
}

impl<T> DeviceBufferMut<T> for CudaSlice<T> {
    fn dev_ptr_mut(&mut self) -> DevPtrMut<T> {
        let stream = self.stream().clone();
        let (p, _no_event) = self.device_ptr_mut(&stream);
        DevPtrMut::from_addr(p)
    }
}

/// The address of a mutable sub-view (see [`view_ptr`]).
pub fn view_ptr_mut<T>(view: &mut CudaViewMut<'_, T>, stream: &CudaStream) -> DevPtrMut<T> {
    let (p, _no_event) = view.device_ptr_mut(stream);
    DevPtrMut::from_addr(p)
}

impl GpuDevice {
    /// The compiled kernel `K` (looked up once, then cached).
    pub fn kernel<K: Kernel>(&self) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(K::NAME) {
            return Ok(f.clone());
        }
        let f = self
            .module_of(K::MODULE)?
            .load_function(K::NAME)
            .map_err(|source| ForgeError::Launch { kernel: K::NAME, source })?;
        cache.insert(K::NAME, f.clone());
        Ok(f)
    }

    /// Enqueues kernel `K` on the device's compute stream.
    ///
    /// # Safety
    /// `args` and `cfg` satisfy `K`'s contract (documented on its argument struct in
    /// `forge_kernel_abi`): buffer sizes, alignment, block shape, shared memory.
    pub unsafe fn launch<K: Kernel>(&self, cfg: impl Into<LaunchConfig>, args: &K::Args) -> Result<()> {
        self.launch_on::<K>(&self.stream, cfg, args)
    }

    /// Enqueues kernel `K` on the device's compute stream with programmatic dependent launch
    /// (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`): its blocks may start before
    /// the kernel ahead of it on the stream has finished. cudarc's launch builder has no
    /// launch attributes, so this calls `cuLaunchKernelEx` itself.
    ///
    /// # Safety
    /// As [`GpuDevice::launch`], and `K` executes `griddepcontrol.wait` before it reads
    /// anything the previous kernel may write and before it writes anything; what it reads
    /// before that wait, no kernel still running writes.
    pub unsafe fn launch_overlapping<K: Kernel>(&self, cfg: LaunchConfig, args: &K::Args) -> Result<()> {
        use cudarc::driver::sys;
        let f = self.kernel::<K>()?;
        // Pointers to the argument fields, in the kernel's parameter order; they outlive the
        // call (`args` is borrowed for it).
        let mut params: Vec<*mut core::ffi::c_void> = Vec::with_capacity(K::Args::PARAMS.len());
        args.visit_params(&mut |p| {
            params.push(match p {
                ParamRef::Addr(a) => a as *const u64 as *mut _,
                ParamRef::U32(v) => v as *const u32 as *mut _,
                ParamRef::F32(v) => v as *const f32 as *mut _,
                ParamRef::F64(v) => v as *const f64 as *mut _,
            })
        });
        // SAFETY: a plain-data union; every bit pattern is valid, and the one field set below
        // is the one the attribute id names.
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut launch = || -> std::result::Result<(), cudarc::driver::DriverError> {
            self.stream.context().bind_to_thread()?;
            // SAFETY: `config` and `params` are live for the call; the caller upholds `K`'s
            // contract and the overlap rule above.
            sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result()
        };
        launch().map_err(|source| ForgeError::Launch { kernel: K::NAME, source })
    }

    /// Enqueues kernel `K` on `stream`.
    ///
    /// # Safety
    /// As [`GpuDevice::launch`], and every buffer in `args` is ready on `stream` (written by
    /// work ordered before this launch on it).
    pub unsafe fn launch_on<K: Kernel>(
        &self,
        stream: &CudaStream,
        cfg: impl Into<LaunchConfig>,
        args: &K::Args,
    ) -> Result<()> {
        let f = self.kernel::<K>()?;
        let mut builder = stream.launch_builder(&f);
        args.visit_params(&mut |p| {
            match p {
                ParamRef::Addr(a) => builder.arg(a),
                ParamRef::U32(v) => builder.arg(v),
                ParamRef::F32(v) => builder.arg(v),
                ParamRef::F64(v) => builder.arg(v),
            };
        });
        builder.launch(cfg.into()).map(|_| ()).map_err(|source| ForgeError::Launch { kernel: K::NAME, source })
    }
}
