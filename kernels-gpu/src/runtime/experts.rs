//! `expert_tasks_from_offsets`: the grouped W4A16 launch's task table from expert row offsets
//! on the device, so a step whose router runs on the GPU needs no copy to the host (and can be
//! captured in a CUDA graph). The same table as the host's `ExpertTasks::tasks_of`, then
//! empty tasks up to the launch's fixed task count (the grouped kernels skip them).
//!
//! Thread mapping: one block of [`EXPERT_TASKS_THREADS`]; thread `t` owns the contiguous
//! experts `[t·seg, (t+1)·seg)`, `seg = ⌈experts / threads⌉ ≤ 16`. It checks their offsets
//! and counts their row blocks; an exclusive scan of the counts (shuffles within a warp,
//! the 8 warp totals through shared memory) gives each thread its first task slot, where it
//! writes its experts' tasks; then all threads fill the slots after the last task with empty
//! ones. Counts add with saturation: a sum past `u32::MAX` is over the capacity anyway.
//! Shared memory: the 8 warp totals (u32) and the lowest failure key (u64, `expert << 8 |
//! code`, by `red.shared.min`), 48 bytes.
//!
//! # Safety (upheld by the host launcher)
//! As documented on [`forge_kernel_abi::runtime::ExpertTasksArgs`]; one block of
//! [`EXPERT_TASKS_THREADS`], [`EXPERT_TASKS_SHARED_BYTES`] of dynamic shared memory.

use crate::device::{
    ld_shared_u32, ld_shared_u64, red_min_shared_u64, shared_window_base, shfl_idx_f32, st_shared_u32, st_shared_u64,
    sync_threads, thread_x,
};
use forge_kernel_abi::runtime::{
    EXPERT_TASKS_MAX_EXPERTS, EXPERT_TASKS_SHARED_BYTES, EXPERT_TASKS_THREADS, ROUTING_DECREASING, ROUTING_FIRST_NOT_ZERO, ROUTING_OK,
    ROUTING_OVER_CAPACITY, ROUTING_PAST_ROWS,
};

const WARPS: u32 = EXPERT_TASKS_THREADS / 32;
/// Shared memory: the warp totals at 0, the failure key at 32.
const FAIL_AT: u32 = 32;
const _: () = assert!(4 * WARPS <= FAIL_AT && FAIL_AT + 8 <= EXPERT_TASKS_SHARED_BYTES);

/// Inclusive prefix sum (saturating) of `v` over the warp's lanes.
#[inline(always)]
fn warp_inclusive_scan(mut v: u32, lane: u32) -> u32 {
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

forge_kernel_abi::expert_tasks_kernel! {
    /// See the module docs.
    ExpertTasksFromOffsets => fn expert_tasks_from_offsets(a) {
        let t = thread_x();
        let (warp, lane) = (t / 32, t % 32);
        let sh = shared_window_base();
        let experts = a.experts.clamp(1, EXPERT_TASKS_MAX_EXPERTS);
        let height = a.height.max(1);
        let off = |e: u32| *a.offsets.ptr().add(e as usize);
        if t == 0 {
            st_shared_u64(sh + FAIL_AT, u64::MAX);
        }
        sync_threads();

        let seg = experts.div_ceil(EXPERT_TASKS_THREADS);
        let e0 = (t * seg).min(experts);
        let e1 = (e0 + seg).min(experts);
        let mut count = 0u32;
        let mut fail = u64::MAX;
        let mut e = e0;
        while e < e1 {
            let (lo, hi) = (off(e), off(e + 1));
            if hi < lo {
                fail = fail.min(((e as u64) << 8) | ROUTING_DECREASING as u64);
            } else {
                count = count.saturating_add((hi - lo).div_ceil(height));
            }
            e += 1;
        }
        if t == 0 && off(0) != 0 {
            fail = fail.min(ROUTING_FIRST_NOT_ZERO as u64);
        }
        if t == EXPERT_TASKS_THREADS - 1 && off(experts) > a.rows_limit {
            fail = fail.min(((experts as u64) << 8) | ROUTING_PAST_ROWS as u64);
        }
        if fail != u64::MAX {
            red_min_shared_u64(sh + FAIL_AT, fail);
        }

        // Exclusive scan of the counts in thread order (= expert order).
        let inclusive = warp_inclusive_scan(count, lane);
        if lane == 31 {
            st_shared_u32(sh + 4 * warp, inclusive);
        }
        sync_threads();
        let mut before = 0u32;
        let mut total = 0u32;
        let mut w = 0;
        while w < WARPS {
            let s = ld_shared_u32(sh + 4 * w);
            if w < warp {
                before = before.saturating_add(s);
            }
            total = total.saturating_add(s);
            w += 1;
        }
        let first = before.saturating_add(inclusive - count);
        let mut fail = ld_shared_u64(sh + FAIL_AT);
        if fail == u64::MAX && total > a.capacity {
            fail = ((experts as u64) << 8) | ROUTING_OVER_CAPACITY as u64;
        }
        let ok = fail == u64::MAX;

        if ok {
            let mut slot = first as usize;
            let mut e = e0;
            while e < e1 {
                let (lo, hi) = (off(e), off(e + 1));
                let mut r = lo;
                while r < hi {
                    let rows = height.min(hi - r);
                    let p = a.tasks.ptr().add(3 * slot);
                    *p = e;
                    *p.add(1) = r;
                    *p.add(2) = rows;
                    slot += 1;
                    r += rows;
                }
                e += 1;
            }
        }
        let mut slot = if ok { total } else { 0 } + t;
        while slot < a.capacity {
            let p = a.tasks.ptr().add(3 * slot as usize);
            *p = 0;
            *p.add(1) = 0;
            *p.add(2) = 0;
            slot += EXPERT_TASKS_THREADS;
        }
        if t == 0 {
            let (code, expert) = if ok { (ROUTING_OK, 0) } else { ((fail & 0xff) as u32, (fail >> 8) as u32) };
            *a.status.ptr() = code;
            *a.status.ptr().add(1) = expert;
        }
    }
}
