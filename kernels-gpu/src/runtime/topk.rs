//! A mixture-of-experts step from the router's top-k expert ids, on the device: the rows of
//! the grouped W4A16 launch sorted by expert (`topk_route`), the tokens' activations gathered
//! into them (`topk_gather_rows`) and the experts' outputs combined per token with the
//! routing weights (`topk_combine_*`). Nothing goes to the host, so a decode step can be
//! captured in a CUDA graph.
//!
//! **`topk_route`** (one block of [`TOPK_ROUTE_THREADS`], 8 warps). Pair `i = token·top_k +
//! slot` goes to row `offsets[e] + #{i' < i : ids[i'] = e}`: sorted by expert, then pair,
//! which is deterministic and is the CPU reference's order. Warp `w` owns the contiguous
//! pairs `[w·c, (w+1)·c)`, `c = ⌈pairs / 8⌉`:
//! 1. every warp counts its pairs per expert into its own row of shared counts
//!    (`red.shared.add`: the counts do not depend on the order of the adds); an id
//!    `≥ experts` is recorded as the lowest failing pair (`red.shared.min`);
//! 2. thread `t` owns experts `[t·s, (t+1)·s)`, `s = ⌈experts / 256⌉ ≤ 4`: the exclusive scan
//!    of their totals (shuffles, then the warp totals through shared memory) gives
//!    `offsets`, and each warp's count becomes its first row for that expert
//!    (`offsets[e] + Σ_{w' < w} count[w'][e]`);
//! 3. each warp walks its pairs 32 at a time in order: `match.any` finds the lanes with the
//!    same expert, a lane's row is its warp's next row for that expert plus the peers below
//!    it, and the highest peer advances the next row (`bar.warp.sync` between the reads and
//!    the write).
//!
//! 4. after a block barrier (the offsets written by this block are then visible to it), the
//!    grouped launch's task tables from the offsets, by the writer of
//!    `expert_tasks_from_offsets` ([`write_expert_tasks`]): one launch for the whole route.
//!
//! On a bad id it writes `offsets` all 0 (the task tables are then empty and the grouped
//! launch multiplies nothing) and no row; `topk_gather_rows` and `topk_combine_*` read the status and write nothing either.
//! Shared memory: [`topk_route_shared_bytes`]`(experts)` (32 KiB + 40 bytes at 1024 experts).
//!
//! **`topk_gather_rows`**: blocks over tokens (x, grid-stride) and runs of the row's 16-byte
//! chunks (y), a thread per chunk, loaded once and stored to all the token's sorted rows:
//! every hidden row is read once (by sorted row, a token's `top_k` copies were far apart in
//! time and past the L2 re-read it from HBM: 904 µs at 16384 tokens top-8 of K = 7168,
//! against 886 for that traffic, H200). **`topk_combine_*`**: blocks over tokens (x,
//! grid-stride) and column runs (y), a thread per 8 columns when `n % 8 == 0` (16-byte loads
//! of each expert's row and one 16-byte store; else a thread per column); per value `top_k`
//! fused multiply-adds in f32 from 0 in slot order, the slots' loads issued four at a time
//! first, rounded to nearest-even into the 16-bit type by the shared numerics (the
//! reference's conversion). Why: the first versions (a thread per chunk or value of the
//! whole matrix, a 64-bit division each) ran at 2–2.7× their HBM floor at 1024–16384 tokens;
//! a block per token with a thread looping over the columns and one slot's load at a time
//! made one decode token's combine 8.1 µs against 2.0 (H200).
//!
//! # Safety (upheld by the host launcher)
//! As documented on [`forge_kernel_abi::runtime::TopkRouteArgs`], `TopkGatherArgs` and
//! `TopkCombineArgs`.

use super::experts::{write_expert_tasks, TaskTable};
use crate::device::{
    block_x, block_y, for16, for4, for8, grid_dim_x, ld_global_u16x8, ld_shared_u32, ld_shared_u64, match_any,
    red_add_shared_u32, red_min_shared_u64, shared_window_base, st_global_u16x8, st_shared_u32, st_shared_u64,
    sync_threads, sync_warp, thread_x, warp_inclusive_scan,
};
use core::f32::math::mul_add as fma;
use forge_kernel_abi::runtime::{
    topk_route_shared_bytes, TopkCombineArgs, TopkRouteArgs, TOPK_BAD_EXPERT, TOPK_OK, TOPK_ROUTE_MAX_EXPERTS,
    TOPK_ROUTE_THREADS, TOPK_ROWS_THREADS,
};

const WARPS: u32 = TOPK_ROUTE_THREADS / 32;
const _: () = assert!(topk_route_shared_bytes(1) == WARPS * 4 + 4 * WARPS + 8);

forge_kernel_abi::topk_route_kernel! {
    /// See the module docs.
    TopkRoute => fn topk_route(a) {
        let t = thread_x();
        let (warp, lane) = (t / 32, t % 32);
        let sh = shared_window_base();
        let experts = a.experts.clamp(1, TOPK_ROUTE_MAX_EXPERTS);
        let top_k = a.top_k.max(1);
        let pairs = a.pairs;
        // Shared layout: counts [WARPS][experts] u32, the warp totals, the failing pair.
        let count_at = |w: u32, e: u32| sh + 4 * (w * experts + e);
        let totals = sh + 4 * WARPS * experts;
        let fail_at = totals + 4 * WARPS;

        let mut i = t;
        while i < WARPS * experts {
            st_shared_u32(sh + 4 * i, 0);
            i += TOPK_ROUTE_THREADS;
        }
        if t == 0 {
            st_shared_u64(fail_at, u64::MAX);
        }
        sync_threads();

        // 1. Counts per warp and expert.
        let chunk = pairs.div_ceil(WARPS);
        let p0 = (warp * chunk).min(pairs);
        let p1 = (p0 + chunk).min(pairs);
        let mut fail = u64::MAX;
        // 16 rounds of the warp's pairs per pass, their loads issued first: a round's count
        // waits on its load, so one round at a time would serialize the loads' latency.
        let mut base = p0;
        while base < p1 {
            let mut e = [u32::MAX; 16];
            for16(|u| {
                let i = base + lane + 32 * u as u32;
                if i < p1 {
                    e[u] = *a.ids.ptr().add(i as usize);
                }
            });
            for16(|u| {
                let i = base + lane + 32 * u as u32;
                if i < p1 {
                    if e[u] < experts {
                        red_add_shared_u32(count_at(warp, e[u]), 1);
                    } else {
                        fail = fail.min(i as u64);
                    }
                }
            });
            base += 32 * 16;
        }
        if fail != u64::MAX {
            red_min_shared_u64(fail_at, fail);
        }
        sync_threads();
        let fail = ld_shared_u64(fail_at);
        if fail != u64::MAX {
            // The same branch for every thread (the barriers of the other one are skipped by all).
            let mut e = t;
            while e <= experts {
                *a.offsets.ptr().add(e as usize) = 0;
                e += TOPK_ROUTE_THREADS;
            }
            if t == 0 {
                *a.status.ptr() = TOPK_BAD_EXPERT;
                *a.status.ptr().add(1) = fail as u32;
            }
        } else {
            place_pairs(&a, sh, experts, top_k, p0, p1);
        }
        // The offsets (written by this block) are visible after the barrier; the writer
        // reuses the shared memory.
        sync_threads();
        let tables = [
            TaskTable { tasks: a.tasks.ptr(), height: a.height, capacity: a.capacity },
            TaskTable { tasks: a.tasks_b.ptr(), height: a.height_b, capacity: a.capacity_b },
        ];
        write_expert_tasks(a.offsets.ptr(), experts, a.rows_limit, tables, a.routing_status.ptr(), sh);
    }
}

/// Steps 2 and 3 of `topk_route` (module docs): the offsets and each warp's first rows, then
/// the rows of this warp's pairs `[p0, p1)`, and the OK status. Every thread of the block
/// calls it.
#[inline(always)]
unsafe fn place_pairs(a: &TopkRouteArgs, sh: u32, experts: u32, top_k: u32, p0: u32, p1: u32) {
    let t = thread_x();
    let (warp, lane) = (t / 32, t % 32);
    let pairs = a.pairs;
    let count_at = |w: u32, e: u32| sh + 4 * (w * experts + e);
    let totals = sh + 4 * WARPS * experts;
    // 2. Offsets, and each warp's first row per expert.
    let seg = experts.div_ceil(TOPK_ROUTE_THREADS);
    let e0 = (t * seg).min(experts);
    let e1 = (e0 + seg).min(experts);
    let mut count = 0u32;
    let mut e = e0;
    while e < e1 {
        let mut w = 0;
        while w < WARPS {
            count += ld_shared_u32(count_at(w, e));
            w += 1;
        }
        e += 1;
    }
    let inclusive = warp_inclusive_scan(count, lane);
    if lane == 31 {
        st_shared_u32(totals + 4 * warp, inclusive);
    }
    sync_threads();
    let mut row = inclusive - count;
    let mut w = 0;
    while w < warp {
        row += ld_shared_u32(totals + 4 * w);
        w += 1;
    }
    let mut e = e0;
    while e < e1 {
        *a.offsets.ptr().add(e as usize) = row;
        let mut w = 0;
        while w < WARPS {
            let c = ld_shared_u32(count_at(w, e));
            st_shared_u32(count_at(w, e), row);
            row += c;
            w += 1;
        }
        e += 1;
    }
    if t == 0 {
        *a.offsets.ptr().add(experts as usize) = pairs;
    }
    sync_threads();

    // 3. Rows, in pair order within each expert.
    let below = (1u32 << lane) - 1;
    let mut base = p0;
    while base < p1 {
        // The ids of 4 rounds loaded first (as in step 1). Branch-free up to the match, so
        // every lane runs the same `match.any` (lanes past the warp's pairs read its last one
        // and match as u32::MAX, no expert).
        let mut ids = [0u32; 4];
        for4(|u| {
            let i = base + lane + 32 * u as u32;
            ids[u] = *a.ids.ptr().add(i.min(p1 - 1) as usize) | (!(i < p1) as u32).wrapping_neg();
        });
        for4(|u| {
            let i = base + lane + 32 * u as u32;
            let valid = i < p1;
            let e = ids[u];
            let peers = match_any(e);
            let at = count_at(warp, e.min(experts - 1));
            let next = if valid { ld_shared_u32(at) } else { 0 };
            if valid {
                let row = next + (peers & below).count_ones();
                *a.pair_row.ptr().add(i as usize) = row;
                *a.row_token.ptr().add(row as usize) = i / top_k;
            }
            sync_warp();
            if valid && peers >> lane == 1 {
                st_shared_u32(at, next + peers.count_ones());
            }
            sync_warp();
        });
        base += 32 * 4;
    }
    if t == 0 {
        *a.status.ptr() = TOPK_OK;
        *a.status.ptr().add(1) = 0;
    }
}

forge_kernel_abi::topk_gather_kernel! {
    /// See the module docs.
    TopkGatherRows => fn topk_gather_rows(a) {
        if *a.status.ptr() != TOPK_OK {
            return;
        }
        let (chunks, top_k) = (a.chunks as usize, a.top_k as usize);
        let c = block_y() as usize * TOPK_ROWS_THREADS as usize + thread_x() as usize;
        if c >= chunks {
            return;
        }
        let mut t = block_x() as usize;
        while t < a.tokens as usize {
            // One chunk of the token's row, loaded once, stored to each of its sorted rows.
            let v = ld_global_u16x8(a.hidden.ptr().add(8 * (t * chunks + c)));
            let mut j = 0;
            while j < top_k {
                let row = *a.pair_row.ptr().add(t * top_k + j) as usize;
                st_global_u16x8(a.x.ptr().add(8 * (row * chunks + c)), v);
                j += 1;
            }
            t += grid_dim_x() as usize;
        }
    }
}

/// `topk_combine_*` for a 16-bit type given by its widening and its rounding: block `(bx, by)`
/// takes tokens `bx, bx + grid_x, …` and its thread the `by`-th run of the columns' chunks
/// (8 columns when `n % 8 == 0`, else 1).
#[inline(always)]
unsafe fn combine(a: TopkCombineArgs, widen: impl Fn(u16) -> f32, round: impl Fn(f32) -> u16) {
    if *a.status.ptr() != TOPK_OK {
        return;
    }
    let (n, top_k) = (a.n as usize, a.top_k as usize);
    let wide = n % 8 == 0;
    let width = if wide { 8 } else { 1 };
    let c = width * (block_y() as usize * TOPK_ROWS_THREADS as usize + thread_x() as usize);
    if c >= n {
        return;
    }
    let mut t = block_x() as usize;
    while t < a.tokens as usize {
        let pairs = t * top_k;
        let mut acc = [0.0f32; 8];
        // Slots four at a time: their rows and weights, then their values, are loaded before
        // the multiply-adds (in slot order) use them. (Eight at a time took 95 registers and
        // ran 1024 and 16384 tokens 1.6–1.7× slower, H200.)
        let mut j0 = 0;
        while j0 < top_k {
            let mut rows = [0usize; 4];
            let mut w = [0.0f32; 4];
            for4(|u| {
                if j0 + u < top_k {
                    rows[u] = *a.pair_row.ptr().add(pairs + j0 + u) as usize;
                    w[u] = *a.weight.ptr().add(pairs + j0 + u);
                }
            });
            let mut y = [[0u16; 8]; 4];
            for4(|u| {
                if j0 + u < top_k {
                    let p = a.y.ptr().add(rows[u] * n + c);
                    y[u] = if wide { ld_global_u16x8(p) } else { [*p, 0, 0, 0, 0, 0, 0, 0] };
                }
            });
            for4(|u| {
                if j0 + u < top_k {
                    for8(|i| acc[i] = fma(w[u], widen(y[u][i]), acc[i]));
                }
            });
            j0 += 4;
        }
        let out = a.out.ptr().add(t * n + c);
        if wide {
            let mut v = [0u16; 8];
            for8(|i| v[i] = round(acc[i]));
            st_global_u16x8(out, v);
        } else {
            *out = round(acc[0]);
        }
        t += grid_dim_x() as usize;
    }
}

forge_kernel_abi::topk_combine_kernel! {
    /// See the module docs.
    TopkCombineBf16 => fn topk_combine_bf16(a) {
        combine(a, forge_numerics::bf16_bits_to_f32, forge_numerics::f32_to_bf16_bits)
    }
}

forge_kernel_abi::topk_combine_kernel! {
    /// See the module docs.
    TopkCombineF16 => fn topk_combine_f16(a) {
        combine(a, forge_numerics::f16_bits_to_f32, forge_numerics::f32_to_f16_bits)
    }
}
