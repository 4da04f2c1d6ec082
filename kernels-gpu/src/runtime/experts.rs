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
//! ones. Counts add with saturation: a sum past `u32::MAX` is over the capacity anyway. A
//! routing with two block heights (skinny and `wgmma`) gets both tables from one launch, one
//! after the other; `topk_route` calls the same writer ([`write_expert_tasks`]) after it
//! sorts the pairs, so a top-k step builds its tables without a launch of its own.
//! Shared memory: the 8 warp totals (u32) and the lowest failure key (u64, `expert << 8 |
//! code`, by `red.shared.min`), 48 bytes.
//!
//! # Safety (upheld by the host launcher)
//! As documented on [`forge_kernel_abi::runtime::ExpertTasksArgs`]; one block of
//! [`EXPERT_TASKS_THREADS`], [`EXPERT_TASKS_SHARED_BYTES`] of dynamic shared memory.

use crate::device::{
    ld_shared_u32, ld_shared_u64, red_min_shared_u64, shared_window_base, st_shared_u32, st_shared_u64, sync_threads,
    thread_x, warp_inclusive_scan,
};
use forge_kernel_abi::runtime::{
    EXPERT_TASKS_MAX_EXPERTS, EXPERT_TASKS_SHARED_BYTES, EXPERT_TASKS_THREADS, ROUTING_DECREASING, ROUTING_FIRST_NOT_ZERO, ROUTING_OK,
    ROUTING_OVER_CAPACITY, ROUTING_PAST_ROWS,
};

const WARPS: u32 = EXPERT_TASKS_THREADS / 32;
/// Shared memory: the warp totals at 0, the failure key at 32.
const FAIL_AT: u32 = 32;
const _: () = assert!(4 * WARPS <= FAIL_AT && FAIL_AT + 8 <= EXPERT_TASKS_SHARED_BYTES);

/// One task table to write: `[capacity][3]` u32 at `tasks`, row blocks of `height` rows.
#[derive(Clone, Copy)]
pub struct TaskTable {
    /// The table.
    pub tasks: *mut u32,
    /// Rows per task (≥ 1).
    pub height: u32,
    /// Task slots (0: no table).
    pub capacity: u32,
}

/// Writes `tables` from `offsets` (the module docs' algorithm, once per table with
/// `capacity > 0`) and `status = [code, expert]`. Every thread of a block of
/// [`EXPERT_TASKS_THREADS`] must call it; `sh` is [`EXPERT_TASKS_SHARED_BYTES`] of shared
/// memory no other thread uses during the call.
///
/// # Safety
/// `offsets` `experts + 1` u32 readable by this block (written before a block barrier if by
/// this block), `1 ≤ experts ≤ EXPERT_TASKS_MAX_EXPERTS`, each table `3·capacity` u32,
/// `status` 2 u32.
pub unsafe fn write_expert_tasks(
    offsets: *const u32,
    experts: u32,
    rows_limit: u32,
    tables: [TaskTable; 2],
    status: *mut u32,
    sh: u32,
) {
    let experts = experts.clamp(1, EXPERT_TASKS_MAX_EXPERTS);
    // The offsets are the same for both tables; only the capacity check could differ.
    let fail = write_table(offsets, experts, rows_limit, tables[0], sh).min(write_table(
        offsets,
        experts,
        rows_limit,
        tables[1],
        sh,
    ));
    if thread_x() == 0 {
        let (code, expert) =
            if fail == u64::MAX { (ROUTING_OK, 0) } else { ((fail & 0xff) as u32, (fail >> 8) as u32) };
        *status = code;
        *status.add(1) = expert;
    }
}

/// One table of [`write_expert_tasks`]; returns its failure key (`u64::MAX`: none; then the
/// table holds the tasks, else only empty slots). Nothing for a table of no slots.
#[inline(always)]
unsafe fn write_table(offsets: *const u32, experts: u32, rows_limit: u32, table: TaskTable, sh: u32) -> u64 {
    if table.capacity == 0 {
        return u64::MAX;
    }
    let t = thread_x();
    let (warp, lane) = (t / 32, t % 32);
    let off = |e: u32| *offsets.add(e as usize);
    let seg = experts.div_ceil(EXPERT_TASKS_THREADS);
    let e0 = (t * seg).min(experts);
    let e1 = (e0 + seg).min(experts);
    let height = table.height.max(1);
    if t == 0 {
        st_shared_u64(sh + FAIL_AT, u64::MAX);
    }
    sync_threads();

    let mut count = 0u32;
    let mut bad = u64::MAX;
    let mut e = e0;
    while e < e1 {
        let (lo, hi) = (off(e), off(e + 1));
        if hi < lo {
            bad = bad.min(((e as u64) << 8) | ROUTING_DECREASING as u64);
        } else {
            count = count.saturating_add((hi - lo).div_ceil(height));
        }
        e += 1;
    }
    if t == 0 && off(0) != 0 {
        bad = bad.min(ROUTING_FIRST_NOT_ZERO as u64);
    }
    if t == EXPERT_TASKS_THREADS - 1 && off(experts) > rows_limit {
        bad = bad.min(((experts as u64) << 8) | ROUTING_PAST_ROWS as u64);
    }
    if bad != u64::MAX {
        red_min_shared_u64(sh + FAIL_AT, bad);
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
    if fail == u64::MAX && total > table.capacity {
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
                let p = table.tasks.add(3 * slot);
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
    while slot < table.capacity {
        let p = table.tasks.add(3 * slot as usize);
        *p = 0;
        *p.add(1) = 0;
        *p.add(2) = 0;
        slot += EXPERT_TASKS_THREADS;
    }
    // The shared words are reused by the next table.
    sync_threads();
    fail
}

forge_kernel_abi::expert_tasks_kernel! {
    /// See the module docs.
    ExpertTasksFromOffsets => fn expert_tasks_from_offsets(a) {
        let tables = [
            TaskTable { tasks: a.tasks.ptr(), height: a.height, capacity: a.capacity },
            TaskTable { tasks: a.tasks_b.ptr(), height: a.height_b, capacity: a.capacity_b },
        ];
        write_expert_tasks(a.offsets.ptr(), a.experts, a.rows_limit, tables, a.status.ptr(), shared_window_base());
    }
}
