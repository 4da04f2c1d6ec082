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
