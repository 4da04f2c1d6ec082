//! The one contract between 4Bit Forge's host launchers and its GPU kernels, compiled by
//! both (`#![no_std]`, no dependencies): every kernel's launch arguments as one `#[repr(C)]`
//! struct, the table of kernel names, and the shared-memory layouts a kernel and its
//! launcher must agree on (docs/kernels.md §1).
//!
//! A kernel is a marker type implementing [`Kernel`]: its PTX entry name and its argument
//! struct. Each argument struct is declared once with [`kernel_args!`], which also makes the
//! macro that declares the kernel's entry point with exactly those parameters in that order
//! (separate scalar parameters, so the PTX backend knows pointer parameters address global
//! memory; a by-value struct would turn every access generic). The host fills the struct by
//! field name and pushes its fields in declaration order ([`KernelArgs::visit_params`]), so
//! passing an argument twice, forgetting one or swapping two is a compile error. The build
//! checks the compiled PTX against [`KERNELS`]: every name has an entry with the declared
//! parameter kinds, and the PTX has no entry the table lacks.
#![no_std]
#![feature(macro_metavar_expr)]
#![deny(missing_docs)]

// Argument structs name their field types by absolute path (`forge_kernel_abi::DevPtr<f32>`):
// the entry macros they generate expand in the kernels crate, where a bare `DevPtr` is not
// in scope.
extern crate self as forge_kernel_abi;

pub mod calib;
pub mod elem;
pub mod grid;
pub mod hessian;
pub mod pack;
pub mod qmeta;
pub mod runtime;
pub mod solver;
#[cfg(feature = "test-kernels")]
pub mod testing;
pub mod weights;

#[cfg(not(target_arch = "nvptx64"))]
use core::marker::PhantomData;

/// A device address the kernel reads through (`const T*`): an address on the host, a
/// pointer on the device, 8 bytes on both.
#[repr(transparent)]
pub struct DevPtr<T> {
    #[cfg(target_arch = "nvptx64")]
    p: *const T,
    #[cfg(not(target_arch = "nvptx64"))]
    addr: u64,
    #[cfg(not(target_arch = "nvptx64"))]
    _elem: PhantomData<*const T>,
}

/// A device address the kernel writes through (`T*`).
#[repr(transparent)]
pub struct DevPtrMut<T> {
    #[cfg(target_arch = "nvptx64")]
    p: *mut T,
    #[cfg(not(target_arch = "nvptx64"))]
    addr: u64,
    #[cfg(not(target_arch = "nvptx64"))]
    _elem: PhantomData<*mut T>,
}

impl<T> core::fmt::Debug for DevPtr<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        #[cfg(not(target_arch = "nvptx64"))]
        return write!(f, "DevPtr({:#x})", self.addr);
        #[cfg(target_arch = "nvptx64")]
        return write!(f, "DevPtr");
    }
}

impl<T> core::fmt::Debug for DevPtrMut<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        #[cfg(not(target_arch = "nvptx64"))]
        return write!(f, "DevPtrMut({:#x})", self.addr);
        #[cfg(target_arch = "nvptx64")]
        return write!(f, "DevPtrMut");
    }
}

// Manual impls: derives would require `T: Copy`.
impl<T> Clone for DevPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevPtr<T> {}
impl<T> Clone for DevPtrMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevPtrMut<T> {}

#[cfg(not(target_arch = "nvptx64"))]
impl<T> DevPtr<T> {
    /// Wraps a device address (host side).
    pub const fn from_addr(addr: u64) -> Self {
        DevPtr { addr, _elem: PhantomData }
    }

    /// The address.
    pub const fn addr(self) -> u64 {
        self.addr
    }

    /// The same address read as elements of another type (e.g. a byte buffer holding f32).
    pub const fn cast<U>(self) -> DevPtr<U> {
        DevPtr::from_addr(self.addr)
    }
}

#[cfg(not(target_arch = "nvptx64"))]
impl<T> DevPtrMut<T> {
    /// Wraps a device address (host side).
    pub const fn from_addr(addr: u64) -> Self {
        DevPtrMut { addr, _elem: PhantomData }
    }

    /// The address.
    pub const fn addr(self) -> u64 {
        self.addr
    }

    /// The same address written as elements of another type.
    pub const fn cast<U>(self) -> DevPtrMut<U> {
        DevPtrMut::from_addr(self.addr)
    }

    /// The same address, read-only.
    pub const fn as_const(self) -> DevPtr<T> {
        DevPtr::from_addr(self.addr)
    }
}

#[cfg(target_arch = "nvptx64")]
impl<T> DevPtr<T> {
    /// The pointer (device side).
    #[inline(always)]
    pub fn ptr(self) -> *const T {
        self.p
    }
}

#[cfg(target_arch = "nvptx64")]
impl<T> DevPtrMut<T> {
    /// The pointer (device side).
    #[inline(always)]
    pub fn ptr(self) -> *mut T {
        self.p
    }
}

/// What a kernel parameter is in the PTX (`.param .u64 .ptr`, `.u32`, `.f32`, `.f64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A device pointer.
    Ptr,
    /// A 32-bit unsigned integer.
    U32,
    /// An f32.
    F32,
    /// An f64.
    F64,
}

impl ParamKind {
    /// The PTX parameter type the backend emits for it.
    pub const fn ptx(self) -> &'static str {
        match self {
            ParamKind::Ptr => ".u64 .ptr",
            ParamKind::U32 => ".u32",
            ParamKind::F32 => ".f32",
            ParamKind::F64 => ".f64",
        }
    }
}

/// A reference to one parameter's host value, in the form the launcher pushes.
#[derive(Clone, Copy, Debug)]
pub enum ParamRef<'a> {
    /// A device address.
    Addr(&'a u64),
    /// A u32.
    U32(&'a u32),
    /// An f32.
    F32(&'a f32),
    /// An f64.
    F64(&'a f64),
}

/// A type that can be a kernel parameter: its device-side form and its PTX kind.
pub trait KernelParam: Copy {
    /// The entry point's parameter type.
    type Device;
    /// Its PTX kind.
    const KIND: ParamKind;
    /// The value from the entry point's parameter (device side).
    fn from_device(d: Self::Device) -> Self;
    /// The host value to push.
    fn param_ref(&self) -> ParamRef<'_>;
}

macro_rules! scalar_param {
    ($t:ty, $kind:ident) => {
        impl KernelParam for $t {
            type Device = $t;
            const KIND: ParamKind = ParamKind::$kind;
            #[inline(always)]
            fn from_device(d: $t) -> $t {
                d
            }
            fn param_ref(&self) -> ParamRef<'_> {
                ParamRef::$kind(self)
            }
        }
    };
}
scalar_param!(u32, U32);
scalar_param!(f32, F32);
scalar_param!(f64, F64);

impl<T> KernelParam for DevPtr<T> {
    type Device = *const T;
    const KIND: ParamKind = ParamKind::Ptr;
    #[cfg(target_arch = "nvptx64")]
    #[inline(always)]
    fn from_device(p: *const T) -> Self {
        DevPtr { p }
    }
    #[cfg(not(target_arch = "nvptx64"))]
    fn from_device(p: *const T) -> Self {
        DevPtr::from_addr(p as usize as u64)
    }
    #[cfg(target_arch = "nvptx64")]
    fn param_ref(&self) -> ParamRef<'_> {
        // Never called on the device: the device only receives parameters.
        ParamRef::U32(&0)
    }
    #[cfg(not(target_arch = "nvptx64"))]
    fn param_ref(&self) -> ParamRef<'_> {
        ParamRef::Addr(&self.addr)
    }
}

impl<T> KernelParam for DevPtrMut<T> {
    type Device = *mut T;
    const KIND: ParamKind = ParamKind::Ptr;
    #[cfg(target_arch = "nvptx64")]
    #[inline(always)]
    fn from_device(p: *mut T) -> Self {
        DevPtrMut { p }
    }
    #[cfg(not(target_arch = "nvptx64"))]
    fn from_device(p: *mut T) -> Self {
        DevPtrMut::from_addr(p as usize as u64)
    }
    #[cfg(target_arch = "nvptx64")]
    fn param_ref(&self) -> ParamRef<'_> {
        ParamRef::U32(&0)
    }
    #[cfg(not(target_arch = "nvptx64"))]
    fn param_ref(&self) -> ParamRef<'_> {
        ParamRef::Addr(&self.addr)
    }
}

/// A kernel's argument struct (made by [`kernel_args!`]).
pub trait KernelArgs: Copy {
    /// The PTX parameter kinds, in order.
    const PARAMS: &'static [ParamKind];
    /// Calls `f` with every field, in declaration order (the entry point's parameter order).
    fn visit_params<'a>(&'a self, f: &mut dyn FnMut(ParamRef<'a>));
}

/// Declares a kernel argument struct and the macro `$entry` that declares a kernel entry
/// point taking exactly its fields as parameters, in order:
///
/// ```ignore
/// kernel_args! {
///     /// docs
///     pub struct PanelArgs in solver => panel_entry { pub w_work: DevPtr<f32>, pub p0: u32, }
/// }
/// // in the kernels crate:
/// forge_kernel_abi::panel_entry!(GptqPanelR16 => fn gptq_panel_r16(args) { ... });
/// ```
/// The entry macro also checks at compile time that the function's name is the marker's
/// [`Kernel::NAME`] and that the marker's `Args` is this struct.
#[macro_export]
macro_rules! kernel_args {
    (
        $(#[$meta:meta])*
        pub struct $name:ident in $module:ident => $entry:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $crate::KernelArgs for $name {
            const PARAMS: &'static [$crate::ParamKind] = &[$( <$ty as $crate::KernelParam>::KIND, )*];
            fn visit_params<'a>(&'a self, f: &mut dyn FnMut($crate::ParamRef<'a>)) {
                $( f($crate::KernelParam::param_ref(&self.$field)); )*
            }
        }

        #[doc = concat!("Declares a kernel entry point taking [`", stringify!($name), "`]'s fields.")]
        #[macro_export]
        macro_rules! $entry {
            ($$(#[$$attr:meta])* $$marker:ident => fn $$fname:ident($$args:ident) $$body:block) => {
                const _: () = assert!(
                    $crate::str_eq(stringify!($$fname), <$crate::$$marker as $crate::Kernel>::NAME),
                    concat!("kernel entry `", stringify!($$fname), "` is not the name its marker declares")
                );
                const _: fn(<$crate::$$marker as $crate::Kernel>::Args) -> $crate::$module::$name = |a| a;
                $$(#[$$attr])*
                #[no_mangle]
                pub unsafe extern "ptx-kernel" fn $$fname(
                    $( $field: <$ty as $crate::KernelParam>::Device, )*
                ) {
                    let $$args = $crate::$module::$name {
                        $( $field: <$ty as $crate::KernelParam>::from_device($field), )*
                    };
                    $$body
                }
            };
        }
    };
}

/// Which PTX module holds a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PtxModule {
    /// The baseline module (`sm_80`: A100, H100/H200, Ada and newer through the driver's JIT).
    Base,
    /// The Hopper module (`sm_90a`: `wgmma`), loaded only on compute capability 9.0.
    Hopper,
}

/// A GPU kernel: its PTX entry name and its argument struct.
pub trait Kernel {
    /// The `#[no_mangle]` entry name in the PTX.
    const NAME: &'static str;
    /// The launch arguments.
    type Args: KernelArgs;
    /// The module it is compiled into.
    const MODULE: PtxModule;
}

/// One row of [`KERNELS`]: what the build checks in the PTX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// Entry name.
    pub name: &'static str,
    /// Its parameters' kinds, in order.
    pub params: &'static [ParamKind],
    /// CUDA's `__launch_bounds__(max_threads, min_blocks_per_sm)`, which the PTX build
    /// writes as `.maxntid` / `.minnctapersm` (rustc cannot emit them).
    pub launch_bounds: Option<(u32, u32)>,
    /// The module it is compiled into.
    pub module: PtxModule,
}

/// Declares the kernel marker types and the name table in one place, so a kernel cannot
/// be added to one and not the other.
macro_rules! kernels {
    ($( $(#[$attr:meta])* $marker:ident = $name:literal ($args:ty) $(in $module:ident)? $(bounds($threads:expr, $blocks:expr))?; )*) => {
        $(
            $(#[$attr])*
            #[doc = concat!("The `", $name, "` kernel.")]
            pub enum $marker {}
            $(#[$attr])*
            impl Kernel for $marker {
                const NAME: &'static str = $name;
                type Args = $args;
                const MODULE: PtxModule = kernels!(@module $($module)?);
            }
        )*
        /// Every kernel of the PTX modules with its parameter kinds and module (the test-only
        /// kernels only with the `test-kernels` feature).
        pub const KERNELS: &[KernelInfo] = &[
            $(
                $(#[$attr])*
                KernelInfo {
                    name: $name,
                    params: <$args as KernelArgs>::PARAMS,
                    launch_bounds: kernels!(@bounds $(($threads, $blocks))?),
                    module: kernels!(@module $($module)?),
                },
            )*
        ];
    };
    (@module) => { PtxModule::Base };
    (@module Hopper) => { PtxModule::Hopper };
    (@bounds) => { None };
    (@bounds ($threads:expr, $blocks:expr)) => { Some(($threads, $blocks)) };
}

kernels! {
    // grid: absmax range meta, MSE / Lp scale search (docs/kernels.md §2)
    RangeMetaF32 = "range_meta_f32" (grid::RangeMetaArgs);
    RangeMetaF16 = "range_meta_f16" (grid::RangeMetaArgs);
    RangeMetaBf16 = "range_meta_bf16" (grid::RangeMetaArgs);
    RangeMetaFp8 = "range_meta_fp8" (grid::RangeMetaArgs);
    MseSearchF32 = "mse_search_f32" (grid::MseSearchArgs);
    MseSearchF16 = "mse_search_f16" (grid::MseSearchArgs);
    MseSearchBf16 = "mse_search_bf16" (grid::MseSearchArgs);
    MseSearchFp8 = "mse_search_fp8" (grid::MseSearchArgs);
    QmetaDecode = "qmeta_decode" (qmeta::QmetaDecodeArgs);
    // hessian: accumulation and pre-step (docs/kernels.md §3)
    HessianXtxF32 = "hessian_xtx_f32" (hessian::XtxArgs);
    HessianXtxF16 = "hessian_xtx_f16" (hessian::XtxArgs);
    HessianXtxBf16 = "hessian_xtx_bf16" (hessian::XtxArgs);
    HessianBlend = "hessian_blend" (hessian::BlendArgs);
    HessianDiag = "hessian_diag" (hessian::DiagArgs);
    PrestepGather = "prestep_gather" (hessian::GatherArgs);
    PrestepExtract = "prestep_extract" (hessian::ExtractArgs);
    PrestepZeroColumns = "prestep_zero_columns" (hessian::ZeroColumnsArgs);
    PrestepIdentity = "prestep_identity" (hessian::IdentityArgs);
    PrestepFirstFailure = "prestep_first_failure" (hessian::FirstFailureArgs);
    HessianBlendSym = "hessian_blend_sym" (hessian::BlendSymArgs);
    // solver (docs/kernels.md §4)
    GptqExpandMeta = "gptq_expand_meta" (solver::ExpandMetaArgs);
    GptqPermuteWeightF32 = "gptq_permute_weight_f32" (solver::PermuteArgs);
    GptqPermuteWeightF16 = "gptq_permute_weight_f16" (solver::PermuteArgs);
    GptqPermuteWeightBf16 = "gptq_permute_weight_bf16" (solver::PermuteArgs);
    GptqPermuteWeightFp8 = "gptq_permute_weight_fp8" (solver::PermuteArgs);
    GptqRowErrorF32 = "gptq_row_error_f32" (solver::RowErrorArgs);
    GptqRowErrorF16 = "gptq_row_error_f16" (solver::RowErrorArgs);
    GptqRowErrorBf16 = "gptq_row_error_bf16" (solver::RowErrorArgs);
    GptqRowErrorFp8 = "gptq_row_error_fp8" (solver::RowErrorArgs);
    // Both panels run two blocks per SM (their shared memory is sized for it), so their
    // registers are capped to fit.
    GptqPanelR16 = "gptq_panel_r16" (solver::PanelArgs) bounds(solver::SOLVER_THREADS, 2);
    GptqPanelR32 = "gptq_panel_r32" (solver::PanelArgs) bounds(solver::SOLVER_THREADS, 2);
    GptqTrailingUpdate = "gptq_trailing_update" (solver::TrailingArgs);
    // runtime: W4A16 matmul on qmeta4 (docs/kernels.md §6). Small-M shapes run two blocks per
    // SM, so their registers are capped to fit; the 3–4 block ones take the whole file.
    W4a16Bf16M1 = "w4a16_bf16_m1" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16Bf16M2 = "w4a16_bf16_m2" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16Bf16M3 = "w4a16_bf16_m3" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W4a16Bf16M4 = "w4a16_bf16_m4" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W4a16F16M1 = "w4a16_f16_m1" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16F16M2 = "w4a16_f16_m2" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16F16M3 = "w4a16_f16_m3" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W4a16F16M4 = "w4a16_f16_m4" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    // The skinny (small-M) kernels: `tf` 8-token fragments; t1/t2 fit two blocks per SM.
    W4a16SkinnyBf16T1 = "w4a16_skinny_bf16_t1" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnyBf16T2 = "w4a16_skinny_bf16_t2" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnyBf16T4 = "w4a16_skinny_bf16_t4" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W4a16SkinnyBf16T8 = "w4a16_skinny_bf16_t8" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W4a16SkinnyF16T1 = "w4a16_skinny_f16_t1" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnyF16T2 = "w4a16_skinny_f16_t2" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnyF16T4 = "w4a16_skinny_f16_t4" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W4a16SkinnyF16T8 = "w4a16_skinny_f16_t8" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    // The skinny kernels on 8-bit packed codes (5–8-bit grids): one 64-column tile per block.
    W8a16SkinnyBf16T1 = "w8a16_skinny_bf16_t1" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W8a16SkinnyBf16T2 = "w8a16_skinny_bf16_t2" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W8a16SkinnyBf16T4 = "w8a16_skinny_bf16_t4" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W8a16SkinnyBf16T8 = "w8a16_skinny_bf16_t8" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W8a16SkinnyF16T1 = "w8a16_skinny_f16_t1" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W8a16SkinnyF16T2 = "w8a16_skinny_f16_t2" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W8a16SkinnyF16T4 = "w8a16_skinny_f16_t4" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W8a16SkinnyF16T8 = "w8a16_skinny_f16_t8" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    // Their grouped (mixture-of-experts) builds.
    W8a16SkinnyGroupedBf16T1 = "w8a16_skinny_grouped_bf16_t1" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W8a16SkinnyGroupedBf16T2 = "w8a16_skinny_grouped_bf16_t2" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W8a16SkinnyGroupedBf16T4 = "w8a16_skinny_grouped_bf16_t4" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W8a16SkinnyGroupedBf16T8 = "w8a16_skinny_grouped_bf16_t8" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W8a16SkinnyGroupedF16T1 = "w8a16_skinny_grouped_f16_t1" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W8a16SkinnyGroupedF16T2 = "w8a16_skinny_grouped_f16_t2" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W8a16SkinnyGroupedF16T4 = "w8a16_skinny_grouped_f16_t4" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W8a16SkinnyGroupedF16T8 = "w8a16_skinny_grouped_f16_t8" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    // The same kernels for grouped (mixture-of-experts) launches: row block t is task t.
    W4a16SkinnyGroupedBf16T1 = "w4a16_skinny_grouped_bf16_t1" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnyGroupedBf16T2 = "w4a16_skinny_grouped_bf16_t2" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnyGroupedBf16T4 = "w4a16_skinny_grouped_bf16_t4" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W4a16SkinnyGroupedBf16T8 = "w4a16_skinny_grouped_bf16_t8" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W4a16SkinnyGroupedF16T1 = "w4a16_skinny_grouped_f16_t1" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnyGroupedF16T2 = "w4a16_skinny_grouped_f16_t2" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnyGroupedF16T4 = "w4a16_skinny_grouped_f16_t4" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    W4a16SkinnyGroupedF16T8 = "w4a16_skinny_grouped_f16_t8" (runtime::W4a16Args) bounds(runtime::W4A16_THREADS, 1);
    // The Hopper (sm_90a) W4A16 kernels: four warpgroups per block, `wgmma` with the
    // dequantized weight as the register A operand; up to 32 rows two blocks fit per SM.
    W4a16WgBf16T1 = "w4a16_wg_bf16_t1" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 2);
    W4a16WgBf16T2 = "w4a16_wg_bf16_t2" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 2);
    W4a16WgBf16T4 = "w4a16_wg_bf16_t4" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 2);
    W4a16WgBf16T8 = "w4a16_wg_bf16_t8" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 1);
    W4a16WgBf16T16 = "w4a16_wg_bf16_t16" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 1);
    W4a16WgF16T1 = "w4a16_wg_f16_t1" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 2);
    W4a16WgF16T2 = "w4a16_wg_f16_t2" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 2);
    W4a16WgF16T4 = "w4a16_wg_f16_t4" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 2);
    W4a16WgF16T8 = "w4a16_wg_f16_t8" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 1);
    W4a16WgF16T16 = "w4a16_wg_f16_t16" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 1);
    // Grouped (mixture-of-experts) builds for experts of more than 32 rows: 64-row blocks,
    // 128-row ones above 64.
    W4a16WgGroupedBf16T8 = "w4a16_wg_grouped_bf16_t8" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 1);
    W4a16WgGroupedF16T8 = "w4a16_wg_grouped_f16_t8" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 1);
    W4a16WgGroupedBf16T16 = "w4a16_wg_grouped_bf16_t16" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 1);
    W4a16WgGroupedF16T16 = "w4a16_wg_grouped_f16_t16" (runtime::W4a16Args) in Hopper bounds(runtime::WG_THREADS, 1);
    // The skinny kernels again in the Hopper module: the same source, able to overlap the
    // kernel before them on the stream (programmatic dependent launch needs sm_90). No t4:
    // the plan keeps the sm_80 build there (it measured faster).
    W4a16SkinnySm90Bf16T1 = "w4a16_skinny_sm90_bf16_t1" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnySm90Bf16T2 = "w4a16_skinny_sm90_bf16_t2" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnySm90Bf16T8 = "w4a16_skinny_sm90_bf16_t8" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 1);
    W4a16SkinnySm90F16T1 = "w4a16_skinny_sm90_f16_t1" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnySm90F16T2 = "w4a16_skinny_sm90_f16_t2" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnySm90F16T8 = "w4a16_skinny_sm90_f16_t8" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 1);
    W4a16SkinnySm90Bf16T1W16 = "w4a16_skinny_sm90_bf16_t1_w16" (runtime::W4a16Args) in Hopper bounds(2 * runtime::W4A16_THREADS, 1);
    W4a16SkinnySm90F16T1W16 = "w4a16_skinny_sm90_f16_t1_w16" (runtime::W4a16Args) in Hopper bounds(2 * runtime::W4A16_THREADS, 1);
    W4a16SkinnySm90Bf16T1W12 = "w4a16_skinny_sm90_bf16_t1_w12" (runtime::W4a16Args) in Hopper bounds(runtime::W4a16SkinnyShape::deep(1).threads(), 1);
    W4a16SkinnySm90F16T1W12 = "w4a16_skinny_sm90_f16_t1_w12" (runtime::W4a16Args) in Hopper bounds(runtime::W4a16SkinnyShape::deep(1).threads(), 1);
    W4a16SkinnySm90Bf16T2W12 = "w4a16_skinny_sm90_bf16_t2_w12" (runtime::W4a16Args) in Hopper bounds(runtime::W4a16SkinnyShape::deep(2).threads(), 1);
    W4a16SkinnySm90F16T2W12 = "w4a16_skinny_sm90_f16_t2_w12" (runtime::W4a16Args) in Hopper bounds(runtime::W4a16SkinnyShape::deep(2).threads(), 1);
    W4a16SkinnySm90Bf16T2L1 = "w4a16_skinny_sm90_bf16_t2_l1" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnySm90F16T2L1 = "w4a16_skinny_sm90_f16_t2_l1" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 2);
    // Grouped builds of the Hopper-module skinny kernels.
    W4a16SkinnySm90GroupedBf16T1 = "w4a16_skinny_sm90_grouped_bf16_t1" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnySm90GroupedBf16T2 = "w4a16_skinny_sm90_grouped_bf16_t2" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnySm90GroupedBf16T8 = "w4a16_skinny_sm90_grouped_bf16_t8" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 1);
    W4a16SkinnySm90GroupedF16T1 = "w4a16_skinny_sm90_grouped_f16_t1" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnySm90GroupedF16T2 = "w4a16_skinny_sm90_grouped_f16_t2" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 2);
    W4a16SkinnySm90GroupedF16T8 = "w4a16_skinny_sm90_grouped_f16_t8" (runtime::W4a16Args) in Hopper bounds(runtime::W4A16_THREADS, 1);
    W4DequantBf16 = "w4_dequant_bf16" (runtime::W4DequantArgs);
    W4DequantF16 = "w4_dequant_f16" (runtime::W4DequantArgs);
    W8DequantBf16 = "w8_dequant_bf16" (runtime::W4DequantArgs);
    W8DequantF16 = "w8_dequant_f16" (runtime::W4DequantArgs);
    // The grouped launch's task table from device-side expert offsets (one block).
    ExpertTasksFromOffsets = "expert_tasks_from_offsets" (runtime::ExpertTasksArgs) bounds(runtime::EXPERT_TASKS_THREADS, 1);
    // A mixture-of-experts step from the router's top-k ids: rows sorted by expert (one
    // block), the tokens gathered into them, the experts' outputs combined per token.
    TopkRoute = "topk_route" (runtime::TopkRouteArgs) bounds(runtime::TOPK_ROUTE_THREADS, 1);
    TopkGatherRows = "topk_gather_rows" (runtime::TopkGatherArgs);
    TopkCombineBf16 = "topk_combine_bf16" (runtime::TopkCombineArgs);
    TopkCombineF16 = "topk_combine_f16" (runtime::TopkCombineArgs);
    // pack: codes → int32 words (docs/kernels.md §5). Memory-bound: at least four 256-thread
    // blocks per SM keep enough loads in flight, so registers are capped to allow them.
    PackRows = "pack_rows" (pack::PackArgs) bounds(pack::PACK_THREADS, 4);
    PackRowsTransposed = "pack_rows_transposed" (pack::PackArgs) bounds(pack::PACK_THREADS, 4);
    PackRowsDirect = "pack_rows_direct" (pack::PackArgs) bounds(pack::PACK_THREADS, 4);
    PackRowsTransposedDirect = "pack_rows_transposed_direct" (pack::PackArgs) bounds(pack::PACK_THREADS, 4);
    // weights: block-scaled FP8 checkpoints (docs/kernels.md §7)
    Fp8BlockDequantF32 = "fp8_block_dequant_f32" (weights::Fp8BlockDequantArgs);
    Fp8BlockDequantBf16 = "fp8_block_dequant_bf16" (weights::Fp8BlockDequantArgs);
    // calib: the calibration forward pass's row kernels (docs/kernels.md §8)
    RmsNormRows = "rms_norm_rows" (calib::RmsNormArgs);
    AddBiasRows = "add_bias_rows" (calib::BiasArgs);
    RopeRows = "rope_rows" (calib::RopeArgs);
    CausalSoftmax = "causal_softmax" (calib::SoftmaxArgs);
    Swiglu = "swiglu" (calib::SwigluArgs);
    CastF32 = "cast_f32" (calib::CastArgs);
    AddF32 = "add_f32" (calib::AddArgs);
    GatherRows = "gather_rows" (calib::GatherArgs);
    ScatterAddRows = "scatter_add_rows" (calib::ScatterAddArgs);
    // test-only
    #[cfg(feature = "test-kernels")]
    FastDivision = "fast_division" (testing::FastDivisionArgs);
    #[cfg(feature = "test-kernels")]
    FmaThroughput = "fma_throughput" (testing::FmaThroughputArgs);
}

/// `a == b` in a const context (for the kernels' compile-time check that an entry point's
/// name is its marker's [`Kernel::NAME`]).
pub const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
