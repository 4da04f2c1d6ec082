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

/// Launch attributes of [`GpuDevice::launch_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchAttrs {
    /// Programmatic dependent launch (may overlap the kernel before it on the stream).
    pub overlap: bool,
    /// Blocks per thread-block cluster along x (0 or 1: no clusters).
    pub cluster: u32,
}

impl LaunchAttrs {
    /// The attributes as the driver takes them (at most two).
    fn to_sys(self) -> Vec<cudarc::driver::sys::CUlaunchAttribute> {
        use cudarc::driver::sys;
        let mut list = Vec::with_capacity(2);
        if self.overlap {
            // SAFETY: a plain-data union; every bit pattern is valid, and the one field set
            // is the one the attribute id names.
            let mut a: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            a.value.programmaticStreamSerializationAllowed = 1;
            list.push(a);
        }
        if self.cluster > 1 {
            // SAFETY: as above.
            let mut a: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            a.value.clusterDim.x = self.cluster;
            a.value.clusterDim.y = 1;
            a.value.clusterDim.z = 1;
            list.push(a);
        }
        list
    }
}

/// `cfg` on `stream` with the attributes in `list` (which must outlive the returned value's use).
fn sys_config(
    cfg: LaunchConfig,
    stream: cudarc::driver::sys::CUstream,
    list: &mut [cudarc::driver::sys::CUlaunchAttribute],
) -> cudarc::driver::sys::CUlaunchConfig {
    cudarc::driver::sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream,
        attrs: if list.is_empty() { std::ptr::null_mut() } else { list.as_mut_ptr() },
        numAttrs: list.len() as u32,
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

    /// Enqueues kernel `K` on the device's compute stream with launch attributes that
    /// cudarc's launch builder cannot set, so this calls `cuLaunchKernelEx` itself:
    /// * `attrs.overlap`: programmatic dependent launch
    ///   (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`), its blocks may start
    ///   before the kernel ahead of it on the stream has finished;
    /// * `attrs.cluster > 1`: thread-block clusters of `cluster × 1 × 1` blocks
    ///   (`CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION`; sizes above 8 need
    ///   [`GpuDevice::max_active_clusters`] asked first).
    ///
    /// # Safety
    /// As [`GpuDevice::launch`]; with `overlap`, `K` executes `griddepcontrol.wait` before it
    /// reads anything the previous kernel may write and before it writes anything, and what
    /// it reads before that wait, no kernel still running writes; with `cluster`, the grid
    /// is a multiple of it and `K` expects that cluster shape.
    pub unsafe fn launch_with<K: Kernel>(&self, cfg: LaunchConfig, args: &K::Args, attrs: LaunchAttrs) -> Result<()> {
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
        let mut list = attrs.to_sys();
        let config = sys_config(cfg, self.stream.cu_stream(), &mut list);
        let mut launch = || -> std::result::Result<(), cudarc::driver::DriverError> {
            self.stream.context().bind_to_thread()?;
            // SAFETY: `config`, the attributes it points to and `params` are live for the
            // call; the caller upholds `K`'s contract and the rules above.
            sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result()
        };
        launch().map_err(|source| ForgeError::Launch { kernel: K::NAME, source })
    }

    /// How many clusters of `cluster × 1 × 1` blocks of kernel `K` with `cfg`'s block size
    /// and shared memory can be resident at once (0: such a cluster cannot be scheduled);
    /// asked once per shape. Above 8 blocks it first lets `K` run in such clusters (CUDA's
    /// non-portable sizes, up to 16 on Hopper), which launching them needs too. cudarc's own
    /// query passes no cluster shape.
    pub fn max_active_clusters<K: Kernel>(&self, cfg: LaunchConfig, cluster: u32) -> Result<u32> {
        use cudarc::driver::sys;
        let key = (K::NAME, cluster, cfg.block_dim.0, cfg.shared_mem_bytes);
        if let Some(&c) = self.cluster_capacity.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(c);
        }
        let f = self.kernel::<K>()?;
        if cluster > 8 {
            use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED;
            f.set_attribute(CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1)
                .map_err(|source| ForgeError::Launch { kernel: K::NAME, source })?;
        }
        let mut list = LaunchAttrs { overlap: false, cluster }.to_sys();
        let config = sys_config(cfg, self.stream.cu_stream(), &mut list);
        let mut clusters: std::ffi::c_int = 0;
        let mut query = || -> std::result::Result<(), cudarc::driver::DriverError> {
            self.stream.context().bind_to_thread()?;
            // SAFETY: `config` and its attributes are live for the call; a query.
            unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, f.cu_function(), &config).result() }
        };
        query().map_err(|source| ForgeError::Launch { kernel: K::NAME, source })?;
        let c = clusters.max(0) as u32;
        self.cluster_capacity.lock().unwrap_or_else(|p| p.into_inner()).insert(key, c);
        Ok(c)
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
