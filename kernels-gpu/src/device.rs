//! Device support (the role Rust-CUDA's `cuda_std` plays): thread indices, barriers, warp
//! shuffles and reductions. Thin wrappers over `core::arch::nvptx` and PTX `asm!`.

use core::arch::asm;
use core::arch::nvptx;

/// Threads per warp.
pub const WARP: u32 = 32;
const FULL_MASK: u32 = 0xffff_ffff;

/// `threadIdx.x`.
#[inline(always)]
pub fn thread_x() -> u32 {
    unsafe { nvptx::_thread_idx_x() as u32 }
}

/// `blockIdx.x`.
#[inline(always)]
pub fn block_x() -> u32 {
    unsafe { nvptx::_block_idx_x() as u32 }
}

/// `blockIdx.y`.
#[inline(always)]
pub fn block_y() -> u32 {
    unsafe { nvptx::_block_idx_y() as u32 }
}

/// `blockDim.x`.
#[inline(always)]
pub fn block_dim_x() -> u32 {
    unsafe { nvptx::_block_dim_x() as u32 }
}

/// `gridDim.x`.
#[inline(always)]
pub fn grid_dim_x() -> u32 {
    unsafe { nvptx::_grid_dim_x() as u32 }
}

/// Global thread index along x.
#[inline(always)]
pub fn global_x() -> u32 {
    block_x() * block_dim_x() + thread_x()
}

/// Lane within the warp.
#[inline(always)]
pub fn lane() -> u32 {
    thread_x() & (WARP - 1)
}

/// `__syncthreads()`.
///
/// # Safety
/// Every thread of the block must reach the same barrier.
#[inline(always)]
pub unsafe fn sync_threads() {
    nvptx::_syncthreads()
}

/// `__shfl_xor_sync(full, v, mask)` on an f32.
#[inline(always)]
pub fn shfl_xor_f32(v: f32, mask: u32) -> f32 {
    let r: f32;
    // SAFETY: register-only; all 32 lanes participate (callers run warp-uniform code).
    unsafe {
        asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 31, {f};",
             r = out(reg32) r, v = in(reg32) v, m = in(reg32) mask, f = in(reg32) FULL_MASK);
    }
    r
}

/// `__shfl_xor_sync(full, v, mask)` on a u32.
#[inline(always)]
pub fn shfl_xor_u32(v: u32, mask: u32) -> u32 {
    let r: u32;
    // SAFETY: as `shfl_xor_f32`.
    unsafe {
        asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 31, {f};",
             r = out(reg32) r, v = in(reg32) v, m = in(reg32) mask, f = in(reg32) FULL_MASK);
    }
    r
}

/// `__shfl_sync(full, v, src_lane)` on an f32.
#[inline(always)]
pub fn shfl_idx_f32(v: f32, src: u32) -> f32 {
    let r: f32;
    // SAFETY: as `shfl_xor_f32`.
    unsafe {
        asm!("shfl.sync.idx.b32 {r}, {v}, {s}, 31, {f};",
             r = out(reg32) r, v = in(reg32) v, s = in(reg32) src, f = in(reg32) FULL_MASK);
    }
    r
}

/// Warp-wide min and max (every lane gets the result).
#[inline(always)]
pub fn warp_min_max(mut lo: f32, mut hi: f32) -> (f32, f32) {
    let mut m = 16;
    while m > 0 {
        lo = lo.min(shfl_xor_f32(lo, m));
        hi = hi.max(shfl_xor_f32(hi, m));
        m >>= 1;
    }
    (lo, hi)
}

/// Warp-wide sum (butterfly: every lane gets the same bits).
#[inline(always)]
pub fn warp_sum(mut v: f32) -> f32 {
    let mut m = 16;
    while m > 0 {
        v += shfl_xor_f32(v, m);
        m >>= 1;
    }
    v
}

/// A weight element type the kernels read, widened exactly to f32 by the shared numerics.
pub trait Elem: Copy {
    /// Loads element `i` of `p` as f32.
    ///
    /// # Safety
    /// `p.add(i)` must be in bounds of a live device allocation.
    unsafe fn load_f32(p: *const Self, i: usize) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load_f32(p: *const f32, i: usize) -> f32 {
        *p.add(i)
    }
}

/// IEEE binary16 bits.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct F16Bits(pub u16);
impl Elem for F16Bits {
    #[inline(always)]
    unsafe fn load_f32(p: *const F16Bits, i: usize) -> f32 {
        forge_numerics::f16_bits_to_f32((*p.add(i)).0)
    }
}

/// bfloat16 bits.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Bf16Bits(pub u16);
impl Elem for Bf16Bits {
    #[inline(always)]
    unsafe fn load_f32(p: *const Bf16Bits, i: usize) -> f32 {
        forge_numerics::bf16_bits_to_f32((*p.add(i)).0)
    }
}

/// fp8 E4M3 byte.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Fp8E4M3(pub u8);
impl Elem for Fp8E4M3 {
    #[inline(always)]
    unsafe fn load_f32(p: *const Fp8E4M3, i: usize) -> f32 {
        forge_numerics::fp8_e4m3_to_f32((*p.add(i)).0)
    }
}

/// `atomicMax` on a u64 in global memory.
///
/// # Safety
/// `p` must point to a live, 8-byte aligned u64 in global memory.
#[inline(always)]
pub unsafe fn atomic_max_u64_global(p: *mut u64, v: u64) {
    asm!("red.global.max.u64 [{p}], {v};", p = in(reg64) p, v = in(reg64) v);
}

/// `atomicMin` on a u64 in shared memory (generic address of a shared variable).
///
/// # Safety
/// `p` must point to a live, 8-byte aligned u64 in this block's shared memory.
#[inline(always)]
pub unsafe fn atomic_min_u64_shared(p: *mut u64, v: u64) {
    asm!("{{ .reg .u64 s; cvta.to.shared.u64 s, {p}; red.shared.min.u64 [s], {v}; }}",
         p = in(reg64) p, v = in(reg64) v);
}

/// Base of this block's dynamic shared memory (`extern __shared__`), as a generic pointer.
#[inline(always)]
pub fn dynamic_shared_base() -> *mut u8 {
    let p: u64;
    // SAFETY: reads the address of the module-level `.extern .shared` array declared below.
    unsafe {
        asm!("{{ .reg .u64 s; mov.u64 s, forge_dynamic_shared; cvta.shared.u64 {p}, s; }}", p = out(reg64) p);
    }
    p as *mut u8
}

// The dynamic shared-memory window every kernel that needs one indexes from
// `dynamic_shared_base` (its size is the launch's `shared_mem_bytes`).
core::arch::global_asm!(".extern .shared .align 16 .b8 forge_dynamic_shared[];");

/// Finiteness check that records the smallest flat index of a NaN/inf element as `!index`
/// under an atomic max, so a zeroed flag (a plain memset) means "all finite".
///
/// # Safety
/// `first_bad` as for [`atomic_max_u64_global`].
#[inline(always)]
pub unsafe fn note_if_non_finite(v: f32, flat_index: u64, first_bad: *mut u64) {
    if !(v.abs() <= f32::MAX) {
        atomic_max_u64_global(first_bad, !flat_index);
    }
}
