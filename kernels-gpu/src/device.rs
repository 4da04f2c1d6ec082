//! Device support (the role Rust-CUDA's `cuda_std` plays): thread indices, barriers, warp
//! shuffles and reductions. Thin wrappers over `core::arch::nvptx` and PTX `asm!`.

use core::arch::asm;
use core::arch::nvptx;
use core::f32::math::mul_add as fma;
use forge_kernel_abi::elem::{Bf16Bits, F16Bits, Fp8E4M3};

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

/// `threadIdx.y`.
#[inline(always)]
pub fn thread_y() -> u32 {
    unsafe { nvptx::_thread_idx_y() as u32 }
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

/// `gridDim.y`.
#[inline(always)]
pub fn grid_dim_y() -> u32 {
    unsafe { nvptx::_grid_dim_y() as u32 }
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

// Shuffles are `nomem` (loads may move around them) but never `pure`: a pure asm may be sunk
// into a branch, and a shuffle must run on every lane of the warp together.

/// `__shfl_xor_sync(full, v, mask)` on an f32.
#[inline(always)]
pub fn shfl_xor_f32(v: f32, mask: u32) -> f32 {
    let r: f32;
    // SAFETY: register-only; all 32 lanes participate (callers run warp-uniform code).
    unsafe {
        asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 31, {f};",
             r = out(reg32) r, v = in(reg32) v, m = in(reg32) mask, f = in(reg32) FULL_MASK,
             options(nomem, nostack));
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
             r = out(reg32) r, v = in(reg32) v, s = in(reg32) src, f = in(reg32) FULL_MASK,
             options(nomem, nostack));
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

/// A weight element type the kernels read, widened exactly to f32 by the shared numerics.
pub trait Elem: Copy {
    /// Loads element `i` of `p` as f32.
    ///
    /// # Safety
    /// `p.add(i)` must be in bounds of a live device allocation.
    unsafe fn load_f32(p: *const Self, i: usize) -> f32;

    /// Loads elements `i..i+4` as f32 with one vector load.
    ///
    /// # Safety
    /// As [`Elem::load_f32`] for all four, and `p.add(i)` aligned to four elements.
    unsafe fn load4_f32(p: *const Self, i: usize) -> [f32; 4];
}

#[repr(C, align(16))]
struct Align16([u32; 4]);
#[repr(C, align(8))]
struct Align8([u16; 4]);

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load_f32(p: *const f32, i: usize) -> f32 {
        *p.add(i)
    }
    #[inline(always)]
    unsafe fn load4_f32(p: *const f32, i: usize) -> [f32; 4] {
        let v = (*(p.add(i) as *const Align16)).0;
        [f32::from_bits(v[0]), f32::from_bits(v[1]), f32::from_bits(v[2]), f32::from_bits(v[3])]
    }
}

impl Elem for F16Bits {
    #[inline(always)]
    unsafe fn load_f32(p: *const F16Bits, i: usize) -> f32 {
        forge_numerics::f16_bits_to_f32((*p.add(i)).0)
    }
    #[inline(always)]
    unsafe fn load4_f32(p: *const F16Bits, i: usize) -> [f32; 4] {
        let v = (*(p.add(i) as *const Align8)).0;
        v.map(forge_numerics::f16_bits_to_f32)
    }
}

impl Elem for Bf16Bits {
    #[inline(always)]
    unsafe fn load_f32(p: *const Bf16Bits, i: usize) -> f32 {
        forge_numerics::bf16_bits_to_f32((*p.add(i)).0)
    }
    #[inline(always)]
    unsafe fn load4_f32(p: *const Bf16Bits, i: usize) -> [f32; 4] {
        let v = (*(p.add(i) as *const Align8)).0;
        v.map(forge_numerics::bf16_bits_to_f32)
    }
}

impl Elem for Fp8E4M3 {
    #[inline(always)]
    unsafe fn load_f32(p: *const Fp8E4M3, i: usize) -> f32 {
        forge_numerics::fp8_e4m3_to_f32((*p.add(i)).0)
    }
    #[inline(always)]
    unsafe fn load4_f32(p: *const Fp8E4M3, i: usize) -> [f32; 4] {
        let v = *(p.add(i) as *const u32);
        v.to_le_bytes().map(forge_numerics::fp8_e4m3_to_f32)
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

// The dynamic shared-memory window that kernels index from `shared_window_base` (its size
// is the launch's `shared_mem_bytes`).
core::arch::global_asm!(".extern .shared .align 16 .b8 forge_dynamic_shared[];");

/// Finiteness check that records the smallest flat index of a NaN/inf element as `!index`
/// under an atomic max, so a zeroed flag (a plain memset) means "all finite".
///
/// # Safety
/// `first_bad` as for [`atomic_max_u64_global`].
#[inline(always)]
pub unsafe fn note_if_non_finite(v: f32, flat_index: u64, first_bad: *mut u64) {
    if !v.is_finite() {
        atomic_max_u64_global(first_bad, !flat_index);
    }
}

/// Shared-memory address (in the `.shared` window) of the dynamic shared memory's first byte.
#[inline(always)]
pub fn shared_window_base() -> u32 {
    let a: u32;
    // SAFETY: takes the address of the module's `.extern .shared` array.
    unsafe { asm!("mov.u32 {a}, forge_dynamic_shared;", a = out(reg32) a, options(pure, nomem, nostack)) };
    a
}

/// `ld.shared.v4.f32` at a 16-byte aligned shared address.
///
/// # Safety
/// `addr` must be 16-byte aligned and inside the launch's dynamic shared memory.
#[inline(always)]
pub unsafe fn ld_shared_f32x4(addr: u32) -> [f32; 4] {
    let (a, b, c, d): (f32, f32, f32, f32);
    asm!("ld.shared.v4.f32 {{{a}, {b}, {c}, {d}}}, [{p}];",
         a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d, p = in(reg32) addr,
         options(readonly, nostack));
    [a, b, c, d]
}

/// `ld.shared.u32`.
///
/// # Safety
/// `addr` must be 4-byte aligned and inside the launch's dynamic shared memory.
#[inline(always)]
pub unsafe fn ld_shared_u32(addr: u32) -> u32 {
    let v: u32;
    asm!("ld.shared.u32 {v}, [{p}];", v = out(reg32) v, p = in(reg32) addr);
    v
}

/// `ld.shared.u64`.
///
/// # Safety
/// `addr` must be 8-byte aligned and inside the launch's dynamic shared memory.
#[inline(always)]
pub unsafe fn ld_shared_u64(addr: u32) -> u64 {
    let v: u64;
    asm!("ld.shared.u64 {v}, [{p}];", v = out(reg64) v, p = in(reg32) addr);
    v
}

/// `st.shared.u32` (f32 values go through `to_bits`).
///
/// # Safety
/// As [`ld_shared_u32`].
#[inline(always)]
pub unsafe fn st_shared_u32(addr: u32, v: u32) {
    asm!("st.shared.u32 [{p}], {v};", p = in(reg32) addr, v = in(reg32) v);
}

/// `st.shared.u64`.
///
/// # Safety
/// As [`ld_shared_u64`].
#[inline(always)]
pub unsafe fn st_shared_u64(addr: u32, v: u64) {
    asm!("st.shared.u64 [{p}], {v};", p = in(reg32) addr, v = in(reg64) v);
}

/// `atomicMin` on a u64 at a shared address.
///
/// # Safety
/// As [`ld_shared_u64`].
#[inline(always)]
pub unsafe fn red_min_shared_u64(addr: u32, v: u64) {
    asm!("red.shared.min.u64 [{p}], {v};", p = in(reg32) addr, v = in(reg64) v);
}

/// Hardware `lg2.approx.f32` (about 2^-22 absolute error; lg2(0) = -inf).
#[inline(always)]
pub fn log2_approx(x: f32) -> f32 {
    let r: f32;
    // SAFETY: register-only.
    unsafe { asm!("lg2.approx.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) };
    r
}

/// Maps an f32 to a u32 whose unsigned order is the float order (-inf lowest), so floats of
/// any sign can be compared by integer atomics.
#[inline(always)]
pub fn ordered_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// `st.shared.v4.f32` at a 16-byte aligned shared address.
///
/// # Safety
/// `addr` must be 16-byte aligned and inside the launch's dynamic shared memory.
#[inline(always)]
pub unsafe fn st_shared_f32x4(addr: u32, v: [f32; 4]) {
    asm!("st.shared.v4.f32 [{p}], {{{a}, {b}, {c}, {d}}};",
         p = in(reg32) addr, a = in(reg32) v[0], b = in(reg32) v[1], c = in(reg32) v[2], d = in(reg32) v[3],
         options(nostack));
}

/// `ld.shared.v2.f32` at an 8-byte aligned shared address.
///
/// # Safety
/// `addr` must be 8-byte aligned and inside the launch's dynamic shared memory.
#[inline(always)]
pub unsafe fn ld_shared_f32x2(addr: u32) -> [f32; 2] {
    let (a, b): (f32, f32);
    asm!("ld.shared.v2.f32 {{{a}, {b}}}, [{p}];", a = out(reg32) a, b = out(reg32) b, p = in(reg32) addr,
         options(readonly, nostack));
    [a, b]
}

/// `ld.shared.f32`.
///
/// # Safety
/// As [`ld_shared_u32`].
#[inline(always)]
pub unsafe fn ld_shared_f32(addr: u32) -> f32 {
    f32::from_bits(ld_shared_u32(addr))
}

/// Inclusive prefix sum (saturating) of `v` over the warp's lanes.
#[inline(always)]
pub fn warp_inclusive_scan(mut v: u32, lane: u32) -> u32 {
    let mut d = 1;
    while d < 32 {
        // Every lane shuffles (the lanes below d read their own value and ignore it).
        let up = shfl_idx_f32(f32::from_bits(v), lane.saturating_sub(d)).to_bits();
        if lane >= d {
            v = v.saturating_add(up);
        }
        d *= 2;
    }
    v
}

/// Eight consecutive 16-bit values from global memory with one 16-byte load.
///
/// # Safety
/// `p` 16-byte aligned and in bounds for 8 values.
#[inline(always)]
pub unsafe fn ld_global_u16x8(p: *const u16) -> [u16; 8] {
    let v = (*(p as *const Align16)).0;
    let lo = |i: usize| v[i / 2] as u16;
    let hi = |i: usize| (v[i / 2] >> 16) as u16;
    [lo(0), hi(1), lo(2), hi(3), lo(4), hi(5), lo(6), hi(7)]
}

/// Eight 16-bit values to global memory with one 16-byte store.
///
/// # Safety
/// `p` 16-byte aligned and in bounds for 8 values.
#[inline(always)]
pub unsafe fn st_global_u16x8(p: *mut u16, v: [u16; 8]) {
    let w = |i: usize| v[2 * i] as u32 | (v[2 * i + 1] as u32) << 16;
    *(p as *mut Align16) = Align16([w(0), w(1), w(2), w(3)]);
}

/// `match.any.sync.b32` over the whole warp: the lanes whose `v` equals this lane's.
///
/// # Safety
/// Every lane of the warp must execute it together.
#[inline(always)]
pub unsafe fn match_any(v: u32) -> u32 {
    let m: u32;
    asm!("match.any.sync.b32 {m}, {v}, {full};", m = out(reg32) m, v = in(reg32) v, full = in(reg32) FULL_MASK,
         options(nostack));
    m
}

/// `atomicAdd` without a result on a u32 at a shared address.
///
/// # Safety
/// `addr` a 4-byte aligned address in dynamic shared memory.
#[inline(always)]
pub unsafe fn red_add_shared_u32(addr: u32, v: u32) {
    asm!("red.shared.add.u32 [{p}], {v};", p = in(reg32) addr, v = in(reg32) v);
}

/// Four consecutive f32 from global memory with one 16-byte load.
///
/// # Safety
/// `p` must be 16-byte aligned, in bounds for 4 floats.
#[inline(always)]
pub unsafe fn ld_global_f32x4(p: *const f32) -> [f32; 4] {
    let v = (*(p as *const Align16)).0;
    [f32::from_bits(v[0]), f32::from_bits(v[1]), f32::from_bits(v[2]), f32::from_bits(v[3])]
}

/// `cp.async.cg.shared.global` of 16 bytes: an asynchronous global → shared copy (sm_80+),
/// completed by [`cp_async_commit`] / [`cp_async_wait`].
///
/// # Safety
/// `dst` is a 16-byte aligned shared address and `src` a 16-byte aligned global pointer, both
/// in bounds; nothing reads `dst` before the matching wait and a barrier.
#[inline(always)]
pub unsafe fn cp_async_16(dst: u32, src: *const f32) {
    asm!("{{ .reg .u64 g; cvta.to.global.u64 g, {s}; cp.async.cg.shared.global [{d}], [g], 16; }}",
         d = in(reg32) dst, s = in(reg64) src, options(nostack));
}

/// `cp.async.commit_group`: closes the group of copies issued since the last commit.
#[inline(always)]
pub fn cp_async_commit() {
    // SAFETY: bookkeeping of this thread's asynchronous copies only.
    unsafe { asm!("cp.async.commit_group;", options(nostack)) };
}

/// `cp.async.wait_group N`: waits until at most `N` of this thread's groups are in flight.
#[inline(always)]
pub fn cp_async_wait<const N: u32>() {
    // SAFETY: as `cp_async_commit`.
    unsafe { asm!("cp.async.wait_group {n};", n = const N, options(nostack)) };
}

/// `cp.async.wait_all`: waits until every `cp.async` of this thread, committed or not, has
/// landed.
#[inline(always)]
pub fn cp_async_wait_all() {
    // SAFETY: as `cp_async_commit`.
    unsafe { asm!("cp.async.wait_all;", options(nostack)) };
}

/// `mbarrier.init.shared::cta.b64`: the barrier at `addr` completes a phase after `count`
/// arrivals.
///
/// # Safety
/// `addr` is an 8-byte aligned shared address; no thread uses the barrier before a block
/// barrier that follows the init.
#[inline(always)]
pub unsafe fn mbarrier_init(addr: u32, count: u32) {
    asm!("mbarrier.init.shared::cta.b64 [{a}], {c};", a = in(reg32) addr, c = in(reg32) count, options(nostack));
}

/// `mbarrier.arrive.shared::cta.b64` (release, CTA scope): one arrival on the current phase.
///
/// # Safety
/// `addr` is an initialised barrier whose current phase still expects this arrival.
#[inline(always)]
pub unsafe fn mbarrier_arrive(addr: u32) {
    asm!("{{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [{a}]; }}", a = in(reg32) addr, options(nostack));
}

/// `cp.async.mbarrier.arrive.noinc.shared::cta.b64`: one arrival on the barrier once every
/// earlier `cp.async` of this thread has landed (counted in the barrier's `count`).
///
/// # Safety
/// As [`mbarrier_arrive`].
#[inline(always)]
pub unsafe fn cp_async_mbarrier_arrive(addr: u32) {
    asm!("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [{a}];", a = in(reg32) addr, options(nostack));
}

/// Waits (`mbarrier.try_wait.parity`, acquire, CTA scope) until the barrier's phase of
/// parity `parity` has completed.
///
/// # Safety
/// `addr` is an initialised barrier that completes that phase.
#[inline(always)]
pub unsafe fn mbarrier_wait(addr: u32, parity: u32) {
    loop {
        let done: u32;
        asm!("{{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [{a}], {ph}; selp.u32 {d}, 1, 0, p; }}",
             a = in(reg32) addr, ph = in(reg32) parity, d = out(reg32) done, options(nostack));
        if done != 0 {
            break;
        }
    }
}

/// `rcp.approx.ftz.f32`: the hardware reciprocal (about 1 ulp; subnormals flush to zero).
#[inline(always)]
fn rcp_approx(x: f32) -> f32 {
    let r: f32;
    // SAFETY: pure arithmetic.
    unsafe { asm!("rcp.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) };
    r
}

/// The reciprocal `div.rn.f32`'s fast path multiplies by: the hardware reciprocal after one
/// Newton step. Computed once per divisor so a chain of divisions by it costs three FMAs.
#[inline(always)]
pub fn recip_for_division(b: f32) -> f32 {
    let y0 = rcp_approx(b);
    fma(y0, fma(-b, y0, 1.0), y0)
}

/// `a / b` correctly rounded, given `y = recip_for_division(b)`: the quotient, its exact
/// remainder and one correction (Markstein), which is `div.rn.f32`'s fast path without its
/// range check and branch. The caller guarantees the range that makes it exact:
/// `b ∈ [2^-126, 2^126]`, `a = 0` or `|a| ≥ 2^-100`, and `|a/b| ∈ [2^-125, 2^126]` (no
/// intermediate is subnormal or overflows, so the remainder is exact). The remainder is
/// formed as `b·q − a` so a zero quotient keeps the sign IEEE division gives it.
#[inline(always)]
pub fn div_by_recip(a: f32, b: f32, y: f32) -> f32 {
    let q = a * y;
    let r = fma(b, q, -a);
    fma(-r, y, q)
}

/// `vote.sync.all` over the full warp.
///
/// # Safety
/// Every lane of the warp must reach it.
#[inline(always)]
pub unsafe fn vote_all(p: bool) -> bool {
    let r: u32;
    asm!("{{ .reg .pred p, q; setp.ne.u32 p, {v}, 0; vote.sync.all.pred q, p, {m}; selp.u32 {r}, 1, 0, q; }}",
         v = in(reg32) p as u32, m = in(reg32) FULL_MASK, r = out(reg32) r, options(nostack));
    r != 0
}

/// `ld.shared.u16`.
///
/// # Safety
/// `addr` a 2-byte aligned address in dynamic shared memory.
#[inline(always)]
pub unsafe fn ld_shared_u16(addr: u32) -> u16 {
    let v: u16;
    asm!("ld.shared.u16 {v}, [{a}];", v = out(reg16) v, a = in(reg32) addr, options(readonly, nostack));
    v
}

/// `st.shared.u16`.
///
/// # Safety
/// `addr` a 2-byte aligned address in dynamic shared memory.
#[inline(always)]
pub unsafe fn st_shared_u16(addr: u32, v: u16) {
    asm!("st.shared.u16 [{a}], {v};", v = in(reg16) v, a = in(reg32) addr, options(nostack));
}

/// `__syncwarp()`: orders the warp's shared-memory accesses.
///
/// # Safety
/// Every lane of the warp must reach it.
#[inline(always)]
pub unsafe fn sync_warp() {
    asm!("bar.warp.sync {m};", m = in(reg32) FULL_MASK, options(nostack));
}

/// `bar.sync ID, N`: waits at named barrier `ID` until `N` threads (whole warps) arrived or
/// synced there.
///
/// # Safety
/// Exactly `N` threads must arrive at or sync on barrier `ID` per use.
#[inline(always)]
pub unsafe fn sync_named<const ID: u32, const N: u32>() {
    asm!("bar.sync {id}, {n};", id = const ID, n = const N, options(nostack));
}

/// `bar.arrive ID, N`: counts this warp at named barrier `ID` without waiting (its earlier
/// shared-memory writes are visible to the threads that `sync_named` there).
///
/// # Safety
/// As [`sync_named`].
#[inline(always)]
pub unsafe fn arrive_named<const ID: u32, const N: u32>() {
    asm!("bar.arrive {id}, {n};", id = const ID, n = const N, options(nostack));
}

/// `ld.shared.v4.f32` the compiler may schedule and merge like a plain load (it is ordered
/// only against `asm!` that may write memory).
///
/// # Safety
/// As [`ld_shared_f32x4`].
#[inline(always)]
pub unsafe fn ld_shared_f32x4_pure(addr: u32) -> [f32; 4] {
    let (a, b, c, d): (f32, f32, f32, f32);
    asm!("ld.shared.v4.f32 {{{a}, {b}, {c}, {d}}}, [{p}];",
         a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d, p = in(reg32) addr,
         options(pure, readonly, nostack));
    [a, b, c, d]
}

/// `st.shared.v4.u32` at a 16-byte aligned shared address.
///
/// # Safety
/// `addr` must be 16-byte aligned and inside the launch's dynamic shared memory.
#[inline(always)]
pub unsafe fn st_shared_u32x4(addr: u32, v: [u32; 4]) {
    asm!("st.shared.v4.u32 [{p}], {{{a}, {b}, {c}, {d}}};",
         p = in(reg32) addr, a = in(reg32) v[0], b = in(reg32) v[1], c = in(reg32) v[2], d = in(reg32) v[3],
         options(nostack));
}

/// `ld.shared.v4.u32` at a 16-byte aligned shared address.
///
/// # Safety
/// `addr` must be 16-byte aligned and inside the launch's dynamic shared memory.
#[inline(always)]
pub unsafe fn ld_shared_u32x4(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ld.shared.v4.u32 {{{a}, {b}, {c}, {d}}}, [{p}];",
         a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d, p = in(reg32) addr,
         options(readonly, nostack));
    [a, b, c, d]
}

/// Calls `f(0) … f(15)` written out, so register arrays indexed by `c` stay in registers
/// (a loop LLVM declines to unroll would move them to local memory).
#[inline(always)]
pub fn for16(mut f: impl FnMut(usize)) {
    f(0);
    f(1);
    f(2);
    f(3);
    f(4);
    f(5);
    f(6);
    f(7);
    f(8);
    f(9);
    f(10);
    f(11);
    f(12);
    f(13);
    f(14);
    f(15);
}

/// Calls `f(0) … f(7)` written out (see [`for16`]).
#[inline(always)]
pub fn for8(mut f: impl FnMut(usize)) {
    for4(&mut f);
    for4(|i| f(4 + i));
}

/// Calls `f(0) … f(3)` written out (see [`for16`]).
#[inline(always)]
pub fn for4(mut f: impl FnMut(usize)) {
    f(0);
    f(1);
    f(2);
    f(3);
}

/// A typed address in the block's dynamic shared memory: offsets count elements of `T`, and
/// the loads and stores below pick the PTX access from `T`, so tile code reads as indexing
/// instead of byte arithmetic. A view adds nothing at run time (one `u32` address).
#[derive(Clone, Copy)]
pub struct Smem<T> {
    addr: u32,
    _elem: core::marker::PhantomData<T>,
}

impl<T> Smem<T> {
    /// The view at byte address `addr` of the shared window.
    #[inline(always)]
    pub const fn at_byte(addr: u32) -> Self {
        Smem { addr, _elem: core::marker::PhantomData }
    }

    /// Element `n` past this one.
    #[inline(always)]
    pub const fn at(self, n: u32) -> Self {
        Smem::at_byte(self.addr + n * core::mem::size_of::<T>() as u32)
    }

    /// The byte address (for `cp.async` and other raw PTX).
    #[inline(always)]
    pub const fn addr(self) -> u32 {
        self.addr
    }
}

impl Smem<f32> {
    /// Loads this element.
    ///
    /// # Safety
    /// Inside the launch's dynamic shared memory.
    #[inline(always)]
    pub unsafe fn ld(self) -> f32 {
        ld_shared_f32(self.addr)
    }

    /// Stores this element.
    ///
    /// # Safety
    /// As [`Smem::ld`].
    #[inline(always)]
    pub unsafe fn st(self, v: f32) {
        st_shared_u32(self.addr, v.to_bits())
    }

    /// Loads this element and the next three (one 16-byte access, ordered against other
    /// shared-memory `asm!`).
    ///
    /// # Safety
    /// 16-byte aligned, inside the launch's dynamic shared memory.
    #[inline(always)]
    pub unsafe fn ld4(self) -> [f32; 4] {
        ld_shared_f32x4(self.addr)
    }

    /// As [`Smem::ld4`], but a load the compiler may schedule and merge like a plain one.
    ///
    /// # Safety
    /// As [`Smem::ld4`], and no write to these bytes may be pending in this thread's program
    /// order without an intervening barrier or `asm!` that writes memory.
    #[inline(always)]
    pub unsafe fn ld4_pure(self) -> [f32; 4] {
        ld_shared_f32x4_pure(self.addr)
    }

    /// Stores four elements (one 16-byte access).
    ///
    /// # Safety
    /// As [`Smem::ld4`].
    #[inline(always)]
    pub unsafe fn st4(self, v: [f32; 4]) {
        st_shared_f32x4(self.addr, v)
    }
}

impl Smem<u32> {
    /// Loads this element.
    ///
    /// # Safety
    /// Inside the launch's dynamic shared memory, 4-byte aligned.
    #[inline(always)]
    pub unsafe fn ld(self) -> u32 {
        ld_shared_u32(self.addr)
    }

    /// Stores this element.
    ///
    /// # Safety
    /// As [`Smem::ld`].
    #[inline(always)]
    pub unsafe fn st(self, v: u32) {
        st_shared_u32(self.addr, v)
    }

    /// Loads four elements (one 16-byte access).
    ///
    /// # Safety
    /// 16-byte aligned, inside the launch's dynamic shared memory.
    #[inline(always)]
    pub unsafe fn ld4(self) -> [u32; 4] {
        ld_shared_u32x4(self.addr)
    }

    /// Stores four elements (one 16-byte access).
    ///
    /// # Safety
    /// As [`Smem::ld4`].
    #[inline(always)]
    pub unsafe fn st4(self, v: [u32; 4]) {
        st_shared_u32x4(self.addr, v)
    }
}

impl Smem<u8> {
    /// Loads this byte and the next three as one little-endian word.
    ///
    /// # Safety
    /// 4-byte aligned, inside the launch's dynamic shared memory.
    #[inline(always)]
    pub unsafe fn ld_word(self) -> u32 {
        ld_shared_u32(self.addr)
    }

    /// Stores 16 bytes given as four little-endian words.
    ///
    /// # Safety
    /// 16-byte aligned, inside the launch's dynamic shared memory.
    #[inline(always)]
    pub unsafe fn st_words4(self, v: [u32; 4]) {
        st_shared_u32x4(self.addr, v)
    }
}

/// `__shfl_xor_sync(full, v, mask)` on an f64 (two 32-bit shuffles).
#[inline(always)]
pub fn shfl_xor_f64(v: f64, mask: u32) -> f64 {
    let bits = v.to_bits();
    let (lo, hi) = (bits as u32, (bits >> 32) as u32);
    let (rlo, rhi): (u32, u32);
    // SAFETY: as `shfl_xor_f32`.
    unsafe {
        asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 31, {f};",
             r = out(reg32) rlo, v = in(reg32) lo, m = in(reg32) mask, f = in(reg32) FULL_MASK,
             options(nomem, nostack));
        asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 31, {f};",
             r = out(reg32) rhi, v = in(reg32) hi, m = in(reg32) mask, f = in(reg32) FULL_MASK,
             options(nomem, nostack));
    }
    f64::from_bits((rlo as u64) | ((rhi as u64) << 32))
}

/// `__shfl_sync(full, v, src_lane)` on an f64: its two halves through [`shfl_idx_f32`] (a
/// shuffle moves bits; no float operation touches them).
#[inline(always)]
pub fn shfl_idx_f64(v: f64, src: u32) -> f64 {
    let bits = v.to_bits();
    let lo = shfl_idx_f32(f32::from_bits(bits as u32), src).to_bits();
    let hi = shfl_idx_f32(f32::from_bits((bits >> 32) as u32), src).to_bits();
    f64::from_bits(u64::from(lo) | (u64::from(hi) << 32))
}

/// Warp-wide sum of an f64 (every lane gets it; butterfly order, the same on every lane).
#[inline(always)]
pub fn warp_sum_f64(mut v: f64) -> f64 {
    let mut m = 16;
    while m > 0 {
        v += shfl_xor_f64(v, m);
        m /= 2;
    }
    v
}

/// Warp-wide sum of an f32 (butterfly order).
#[inline(always)]
pub fn warp_sum_f32(mut v: f32) -> f32 {
    let mut m = 16;
    while m > 0 {
        v += shfl_xor_f32(v, m);
        m /= 2;
    }
    v
}

/// Warp-wide maximum of an f32.
#[inline(always)]
pub fn warp_max_f32(mut v: f32) -> f32 {
    let mut m = 16;
    while m > 0 {
        v = v.max(shfl_xor_f32(v, m));
        m /= 2;
    }
    v
}

/// `e^x` in f32 with relative error below 2⁻²¹: `x·log2(e) = n + f` split in f64 (exact
/// enough that the split adds no error), `2^f` by the `ex2.approx` unit on `f ∈ [0, 1)`
/// (≤ 2 ulp), `2^n` exactly by the exponent bits. `ex2.approx(x·log2 e)` alone would err by
/// `|x|·2⁻²⁴` (the rounding of the product), 100× more for softmax-sized arguments.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let y = x as f64 * core::f64::consts::LOG2_E;
    let n = core::f64::math::floor(y);
    if n >= 128.0 {
        return f32::INFINITY;
    }
    if n < -126.0 || x.is_nan() {
        // Below f32's normal range (the softmax and SiLU add such terms to values ≥ 1).
        return if x.is_nan() { x } else { 0.0 };
    }
    let f = (y - n) as f32;
    let p: f32;
    // SAFETY: pure register arithmetic.
    unsafe { asm!("ex2.approx.f32 {p}, {f};", p = out(reg32) p, f = in(reg32) f, options(pure, nomem, nostack)) };
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}
