//! `w4a16_wg_{bf16,f16}_t{1,2,4,8,16}`: the Hopper W4A16 matmul (module `sm_90a`), `M ≤ 8·tf`
//! rows per block, on `wgmma` with the dequantized weight as the register A operand
//! (docs/kernels.md §6).
//!
//! Thread mapping: 512 threads = four warpgroups on the block's 256 output columns (4 packed
//! `n` tiles) and `8·tf` tokens; warpgroup `a` multiplies tile `a`. Split `p` streams the
//! 64-deep stages `[p·S/splits, (p+1)·S/splits)`. The product is `Yᵀ = dequant(W)·Xᵀ` with
//! one `wgmma.m64n(8·tf)k16` per warpgroup and step: warp `w` of the warpgroup dequantizes
//! packed word `w` of each lane's 16 bytes, which is exactly the A fragment of rows
//! `16w .. 16w + 16` (tile columns `16w + g` and `16w + 8 + g`: the word-to-fragment mapping of
//! the mma.sync kernels, docs/formats.md). B is the step's `X` slice in shared memory, read by
//! the tensor cores through a matrix descriptor. Per warp and step: one 4-byte shared load of
//! codes (4-way bank conflict: the four warps of a warpgroup read the four words of the same
//! 16 bytes), one packed word of dequantization, one `wgmma` of `4·tf` accumulators. Per
//! stage that starts a group, each lane decodes one record and takes its two columns' by
//! shuffles (the four lanes of a quad need the same ones).
//!
//! Why one word per warp: the accumulators stay at `4·tf` registers, so 16–32 warps per SM
//! hide the dequantization's latency (the first version, 4 words and 4 `wgmma`s per warp,
//! held 217 registers at `tf` 8 and ran 2 warps per scheduler); why four warpgroups on 256
//! columns: they share one copy of `X` per stage.
//!
//! Pipeline: a ring of [`WG_DEPTH`] stages, each filled by `cp.async` of all threads (one
//! code chunk each, `X` chunks, the records of the groups the stage starts), with two
//! `mbarrier`s per slot and no block barrier in the loop. Each thread arrives on a slot's
//! "full" barrier when its copies of the stage land (`cp.async.mbarrier.arrive.noinc`); each
//! warp arrives on its "empty" barrier once its warpgroup's `wgmma`s of that stage are done.
//! At stage `s` a warp waits for "full", fences to the async proxy (the tensor cores read
//! shared memory through it), waits for its own `wgmma`s of stage `s − 1` (this stage's
//! dequantization rewrites their A registers: ptxas serializes the `wgmma`s if A registers
//! are written while earlier ones run) and releases that slot, dequantizes its 4 words,
//! fences once and issues 4 `wgmma`s back to back (a fence between two `wgmma`s on the same
//! accumulators makes the second wait for the first). While they run it copies its share of
//! stage `s + WG_LEAD` into the slot of stage `s − 2`, once every warp has released it. Why
//! no block barrier: with one per stage all 16 warps dequantized at the same time while the
//! tensor cores idled, then waited together for the `wgmma`s; with the barriers the
//! warpgroups drift apart and one's dequantization overlaps another's `wgmma`s (H200,
//! 14336×4096: M = 256 97.4 → 76.4 µs, M = 64 42.6 → 35.2).
//!
//! Programmatic dependent launch: the prologue streams the first stages' weight, lets the
//! next grid on the stream start (`allow_dependent_grids`), waits for the previous one
//! (`wait_for_prior_grids`), and only then copies `X`; no-ops unless the launch asked for
//! overlap.
//!
//! End: `Y` (one split) or the split's f32 partial for [`finish_split_k`], straight from the
//! accumulators.
//!
//! # Safety (upheld by the host launcher)
//! As documented on [`forge_kernel_abi::runtime::W4a16Args`], and the launch runs on a
//! compute-capability-9.0 device (the module is `sm_90a`).

use super::epilogue::finish_split_k;
use super::mma::{cp_async_16, cp_async_16_zfill, dequant_word, store_scale_entry, Half};
use super::{allow_dependent_grids, block_place, task_view, wait_for_prior_grids, GroupCursor};
use crate::device::{
    cp_async_mbarrier_arrive, cp_async_wait_all, ld_shared_u32, mbarrier_arrive, mbarrier_init, mbarrier_wait,
    shared_window_base, shfl_idx_f64, sync_threads, thread_x,
};
use core::arch::asm;
use forge_kernel_abi::runtime::{
    W4a16Args, W4a16WgShape, PACK_TILE_BYTES, PACK_TILE_K, PACK_TILE_N, WG_DEPTH, WG_STAGE_GROUPS, WG_STAGE_STEPS,
    WG_THREADS, WG_TILES,
};

/// `fence.proxy.async.shared::cta`: this thread's completed shared-memory writes (here its
/// `cp.async` copies) become visible to the async proxy the tensor cores read through.
#[inline(always)]
fn fence_proxy_async() {
    // SAFETY: a fence; clobbers memory so the compiler keeps accesses on their side.
    unsafe { asm!("fence.proxy.async.shared::cta;", options(nostack)) };
}

/// `wgmma.fence` with a stage's four A fragments passing through it: the registers the
/// `wgmma`s read are written before the fence (the data dependence keeps the compiler from
/// moving the dequantization below it). One fence per stage, not per step: a fence between
/// two `wgmma`s on the same accumulators makes the second wait for the first to finish.
///
/// # Safety
/// Every thread of the warpgroup runs it.
#[inline(always)]
unsafe fn wgmma_fence(a: &mut [[u32; 4]; 4]) {
    // The operands are named in a comment: the fence only orders them.
    asm!("wgmma.fence.sync.aligned; /* {0} {1} {2} {3} {4} {5} {6} {7} {8} {9} {10} {11} {12} {13} {14} {15} */",
         inout(reg32) a[0][0], inout(reg32) a[0][1], inout(reg32) a[0][2], inout(reg32) a[0][3],
         inout(reg32) a[1][0], inout(reg32) a[1][1], inout(reg32) a[1][2], inout(reg32) a[1][3],
         inout(reg32) a[2][0], inout(reg32) a[2][1], inout(reg32) a[2][2], inout(reg32) a[2][3],
         inout(reg32) a[3][0], inout(reg32) a[3][1], inout(reg32) a[3][2], inout(reg32) a[3][3],
         options(nostack));
}

/// `wgmma.commit_group`: the `wgmma`s issued since the last commit form one group.
///
/// # Safety
/// Every thread of the warpgroup runs it.
#[inline(always)]
unsafe fn wgmma_commit() {
    asm!("wgmma.commit_group.sync.aligned;", options(nostack));
}

/// `wgmma.wait_group N`: waits until at most `N` of the warpgroup's groups are pending.
///
/// # Safety
/// Every thread of the warpgroup runs it.
#[inline(always)]
unsafe fn wgmma_wait<const N: u32>() {
    asm!("wgmma.wait_group.sync.aligned {n};", n = const N, options(nostack));
}

/// Matrix descriptor of a K-major B operand without swizzle at shared address `addr`: core
/// matrices of 8 tokens × 16 bytes, the two `k` halves 128 bytes apart (leading byte offset),
/// token octets 256 bytes apart (stride byte offset). The address field is `addr >> 4` (14
/// bits: shared addresses are below 256 KB), so a later step's descriptor is this one plus
/// its byte offset `>> 4`.
#[inline(always)]
fn b_desc(addr: u32) -> u64 {
    (addr as u64 >> 4) | ((128u64 >> 4) << 16) | ((256u64 >> 4) << 32)
}

/// One `wgmma.mma_async.m64nNk16` with A from registers, f32 accumulators `acc[0..N/2]`,
/// `D += A·B` (scale-d true, no negation, B not transposed).
macro_rules! wgmma_rs {
    ($ty:literal, $n:literal, $acc:ident, $a:ident, $desc:ident, $d0:literal $(, $d:literal)*) => {
        asm!(
            concat!(
                "{{ .reg .pred p; setp.ne.b32 p, {one}, 0; wgmma.mma_async.sync.aligned.m64n", $n, "k16.f32.",
                $ty, ".", $ty, " {{{", stringify!($d0), "}" $(, ", {", stringify!($d), "}")*,
                "}}, {{{a0}, {a1}, {a2}, {a3}}}, {desc}, p, 1, 1, 0; }}"
            ),
            inout(reg32) $acc[$d0], $(inout(reg32) $acc[$d],)*
            a0 = in(reg32) $a[0], a1 = in(reg32) $a[1], a2 = in(reg32) $a[2], a3 = in(reg32) $a[3],
            desc = in(reg64) $desc, one = in(reg32) 1u32,
            options(nostack)
        )
    };
}

/// Dispatches [`wgmma_rs!`] on `tf` for one element type.
macro_rules! wgmma_tf {
    ($ty:literal, $tf:expr, $acc:ident, $a:ident, $desc:ident) => {
        match $tf {
            1 => wgmma_rs!($ty, "8", $acc, $a, $desc, 0, 1, 2, 3),
            2 => wgmma_rs!($ty, "16", $acc, $a, $desc, 0, 1, 2, 3, 4, 5, 6, 7),
            4 => wgmma_rs!($ty, "32", $acc, $a, $desc, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            8 => wgmma_rs!($ty, "64", $acc, $a, $desc, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31),
            _ => wgmma_rs!($ty, "128", $acc, $a, $desc, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63),
        }
    };
}

/// Accumulator slots of the widest instance (`tf` 16: `m64n128k16`, 64 f32 per thread); an
/// instance uses the first `4·tf`.
const ACC: usize = 64;

/// The element type's `wgmma`.
pub trait WgmmaHalf: Half {
    /// `acc[0..4·tf] += A·B` for `m64n(8·tf)k16` (`tf` 1, 2, 4, 8 or 16); `a` this thread's A fragment, `desc` B's
    /// matrix descriptor.
    ///
    /// # Safety
    /// Every thread of the warpgroup runs it after a [`wgmma_fence`]; `desc` describes
    /// `8·tf × 16` values in shared memory that stay unchanged until the group is waited for.
    unsafe fn wgmma<const TF: usize>(acc: &mut [f32; ACC], a: &[u32; 4], desc: u64);
}

impl WgmmaHalf for super::mma::Bf16 {
    #[inline(always)]
    unsafe fn wgmma<const TF: usize>(acc: &mut [f32; ACC], a: &[u32; 4], desc: u64) {
        wgmma_tf!("bf16", TF, acc, a, desc)
    }
}

impl WgmmaHalf for super::mma::F16 {
    #[inline(always)]
    unsafe fn wgmma<const TF: usize>(acc: &mut [f32; ACC], a: &[u32; 4], desc: u64) {
        wgmma_tf!("f16", TF, acc, a, desc)
    }
}

/// `$insn` with the listed accumulators passing through it (named in a comment: the
/// instruction only orders them).
macro_rules! with_acc {
    ($insn:literal, $r:ident $(, $d:literal)*) => {
        asm!(concat!($insn, " /*" $(, " {", stringify!($d), "}")*, " */"), $(inout(reg32) $r[$d],)* options(nostack))
    };
}

/// `$insn` (a `wgmma` fence or wait) with this instance's accumulators `acc[0..4·tf]`
/// passing through it, so the compiler keeps their other uses on the right side of it (the
/// unused ones stay out of registers).
macro_rules! acc_barrier {
    ($insn:literal, $tf:expr, $r:ident) => {
        match $tf {
            1 => with_acc!($insn, $r, 0, 1, 2, 3),
            2 => with_acc!($insn, $r, 0, 1, 2, 3, 4, 5, 6, 7),
            4 => with_acc!($insn, $r, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            8 => with_acc!($insn, $r, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31),
            _ => with_acc!($insn, $r, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63),
        }
    };
}

/// `wgmma.fence` before the first `wgmma`, after the accumulators are zeroed.
///
/// # Safety
/// Every thread of the warpgroup runs it.
#[inline(always)]
unsafe fn wgmma_fence_acc<const TF: usize>(acc: &mut [f32; ACC]) {
    acc_barrier!("wgmma.fence.sync.aligned;", TF, acc);
}

/// `wgmma.wait_group 0` before the accumulators are read.
///
/// # Safety
/// Every thread of the warpgroup runs it.
#[inline(always)]
unsafe fn wgmma_wait_all_acc<const TF: usize>(acc: &mut [f32; ACC]) {
    acc_barrier!("wgmma.wait_group.sync.aligned 0;", TF, acc);
}

/// This thread's copy sources, advanced by additions from stage to stage.
struct Sources {
    /// Its code chunk (tile `tid / 128`, step `(tid / 32) mod 4`, 16 bytes of lane `tid mod 32`).
    codes: *const u8,
    /// Its `X` chunks `tid` and `tid + 512` (those below `64·tf`), whether their tokens are
    /// rows of `X`, and their `k` (at `tf` 16 the second chunk is two steps further).
    x: [*const u8; 2],
    x_row: [bool; 2],
    x_k: [u32; 2],
    /// Position of the next stage's first `k` in its group.
    cur: GroupCursor,
}

impl Sources {
    #[inline(always)]
    unsafe fn at<const TF: usize>(a: &W4a16Args, q: u32, cb: u32, m0: u32, tid: u32, gs: u32) -> Self {
        let sh = W4a16WgShape { tf: TF as u32 };
        let kt_total = (a.k_pad / PACK_TILE_K) as usize;
        let (tile, step, lane) = (tid / 128, (tid / 32) % WG_STAGE_STEPS, tid % 32);
        let t = (cb * WG_TILES + tile) as usize * kt_total + (q * WG_STAGE_STEPS + step) as usize;
        let codes = (a.w.ptr() as *const u8).add(t * PACK_TILE_BYTES as usize + lane as usize * 16);
        // X chunk c: step c / (16·tf), token octet f, k half h, row r.
        let chunk = |c: u32| {
            let (j, cc) = (c / (16 * TF as u32), c % (16 * TF as u32));
            let (f, h, r) = (cc / 16, (cc / 8) % 2, cc % 8);
            let (tok, kk) = (m0 + 8 * f + r, q * sh.k_stage() + 16 * j + 8 * h);
            let row = tok < a.m && c < sh.x_chunks();
            let p = if row { (a.x.ptr() as *const u8).add((tok as usize * a.k as usize + kk as usize) * 2) } else { a.x.ptr() as *const u8 };
            (p, row, kk)
        };
        let (x0, r0, k0) = chunk(tid);
        let (x1, r1, k1) = chunk(tid + WG_THREADS);
        Sources { codes, x: [x0, x1], x_row: [r0, r1], x_k: [k0, k1], cur: GroupCursor::at(q * sh.k_stage(), gs) }
    }

    /// The stage's weight into ring slot `slot`: the thread's code chunk and the block's
    /// records of the groups the stage needs (its first step's when it starts that group or
    /// is the block's first stage, the next group's when it starts inside the stage); moves
    /// the codes and the group cursor on one stage.
    #[inline(always)]
    unsafe fn copy_weights<const TF: usize>(&mut self, a: &W4a16Args, slot: u32, cb: u32, tid: u32, gs: u32, first: bool) {
        let sh = W4a16WgShape { tf: TF as u32 };
        cp_async_16(slot + tid * 16, self.codes);
        self.codes = self.codes.add((WG_STAGE_STEPS * PACK_TILE_BYTES) as usize);
        let u = tid / 64;
        let wanted = if u == 0 { first || self.cur.r == 0 } else { self.cur.r + sh.k_stage() > gs };
        if tid < 64 * WG_STAGE_GROUPS && wanted {
            let rec = (self.cur.g + u) as usize * a.n_pad as usize + (cb * sh.n_block() + (tid % 64) * 4) as usize;
            cp_async_16(slot + sh.rec_off() + tid * 16, a.meta.ptr().add(rec) as *const u8);
        }
        self.cur.advance(sh.k_stage(), gs);
    }

    /// The stage's `X` chunks of this thread into ring slot `slot` (zero-filled past `M` or
    /// `K`); moves `X` on one stage.
    #[inline(always)]
    unsafe fn copy_x<const TF: usize>(&mut self, a: &W4a16Args, slot: u32, tid: u32) {
        let sh = W4a16WgShape { tf: TF as u32 };
        unroll!(u < 2, {
            let c = tid + u as u32 * WG_THREADS;
            if c < sh.x_chunks() {
                let valid = self.x_row[u] && self.x_k[u] < a.k;
                cp_async_16_zfill(slot + sh.x_off() + c * 16, self.x[u], if valid { 16 } else { 0 });
                if self.x_row[u] {
                    self.x[u] = self.x[u].add(2 * sh.k_stage() as usize);
                }
                self.x_k[u] += sh.k_stage();
            }
        });
    }
}

/// Stages copied ahead of the one being computed: the slot refilled at stage `s` is that of
/// stage `s + WG_LEAD − WG_DEPTH`, released by every warp `WG_DEPTH − WG_LEAD − 1` stages
/// before (the drift the warpgroups may have between them). One more stage of drift
/// (`WG_DEPTH − 3`) ran within ±4 % of this on the bench shapes (H200), faster on some and
/// slower on others, so the deeper lead stays.
const WG_LEAD: u32 = WG_DEPTH - 2;

/// Moves a stage's ring slot and the parity of that slot's use (its barriers' phase) on by
/// one stage, by increments so the loop has no division.
#[inline(always)]
fn next_ring_slot(slot: &mut u32, phase: &mut u32) {
    *slot += 1;
    if *slot == WG_DEPTH {
        *slot = 0;
        *phase ^= 1;
    }
}

// The stage loop unrolls its steps by four.
const _: () = assert!(WG_STAGE_STEPS == 4);

/// See the module docs.
#[inline(always)]
pub unsafe fn wg<T: WgmmaHalf, const TF: usize, const GROUPED: bool>(a: W4a16Args) {
    let sh = W4a16WgShape { tf: TF as u32 };
    let tid = thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let (tile, w) = (warp / 4, warp % 4);
    let (g, t) = (lane / 4, lane % 4);
    let (mblk, cb, split, splits) = block_place(&a);
    // A grouped launch's row block is its task's whole (ungrouped) row block 0 (a separate
    // build, as for the skinny kernel).
    let (a, mblk) = if GROUPED { (task_view(&a, mblk), 0) } else { (a, mblk) };
    // An empty task (a device-built table's unused slot): nothing to do. Before any barrier,
    // and every block of a cluster shares the task, so they all leave together.
    if GROUPED && a.m == 0 {
        return;
    }
    let m0 = mblk * sh.m_block();
    let stages = a.k_pad / sh.k_stage();
    let s_begin = (split as u64 * stages as u64 / splits as u64) as u32;
    let s_end = ((split as u64 + 1) * stages as u64 / splits as u64) as u32;
    let gs = a.gs.max(32);

    let base = shared_window_base();
    let table = base + sh.table();
    // The ring is indexed from the split's first stage: stage s_begin + i is in slot
    // i mod depth, and a slot's n-th use is phase n of its barriers.
    let slot_at = |j: u32| base + j * sh.stage_bytes();
    let full = |j: u32| base + sh.mbar() + 8 * j;
    let empty = |j: u32| base + sh.mbar() + 8 * (WG_DEPTH + j);

    if tid == 0 {
        let mut j = 0;
        while j < WG_DEPTH {
            mbarrier_init(full(j), WG_THREADS);
            mbarrier_init(empty(j), WG_THREADS / 32);
            j += 1;
        }
    }
    // The scale table.
    if tid < 256 {
        store_scale_entry::<T>(table, tid);
    }
    // The barriers and the table are seen by every thread from here.
    sync_threads();

    // Prologue: stages s_begin .. s_begin + WG_LEAD − 1, each thread arriving on a stage's "full"
    // barrier once its copies of it have landed. An overlapping launch copies only their
    // weight now (no earlier kernel writes it), and their X once the kernel before this one
    // is done.
    let overlap = a.overlap != 0;
    let mut src = Sources::at::<TF>(&a, s_begin, cb, m0, tid, gs);
    let mut q = s_begin;
    while q < s_begin + WG_LEAD {
        if q < s_end {
            src.copy_weights::<TF>(&a, slot_at(q - s_begin), cb, tid, gs, q == s_begin);
            if !overlap {
                src.copy_x::<TF>(&a, slot_at(q - s_begin), tid);
                cp_async_mbarrier_arrive(full(q - s_begin));
            }
        }
        q += 1;
    }
    if overlap {
        allow_dependent_grids();
        wait_for_prior_grids();
        let mut q_x = s_begin;
        while q_x < q.min(s_end) {
            src.copy_x::<TF>(&a, slot_at(q_x - s_begin), tid);
            cp_async_mbarrier_arrive(full(q_x - s_begin));
            q_x += 1;
        }
    }
    // Slots and phase parities of stages s and q, advanced by one stage per iteration.
    let (mut slot_s, mut phase_s) = (0u32, 0u32);
    let (mut slot_q, mut phase_q) = (WG_LEAD, 0u32);

    let mut acc = [0f32; ACC];
    wgmma_fence_acc::<TF>(&mut acc);
    // This lane's decoded records: columns 16w + g and 16w + 8 + g of tile `tile`.
    let mut rec = [0u64; 2];
    let col = tile * PACK_TILE_N + 16 * w + g;
    let mut cur = GroupCursor::at(s_begin * sh.k_stage(), gs);
    let mut s = s_begin;
    while s < s_end {
        // Every thread's copies of stage s have landed; the tensor cores read them through
        // the async proxy.
        mbarrier_wait(full(slot_s), phase_s);
        fence_proxy_async();
        // This warpgroup's wgmmas of stage s − 1 are done (the dequantization below rewrites
        // their A registers), so its warps release that slot.
        wgmma_wait::<0>();
        if s > s_begin && lane == 0 {
            mbarrier_arrive(empty(if slot_s == 0 { WG_DEPTH - 1 } else { slot_s - 1 }));
        }
        let sb = slot_at(slot_s);
        let g_stage = cur.g;
        // Records of the groups starting at steps 0 and 2 (groups start at multiples of 32
        // `k`, as group sizes are, so nowhere else): lane L decodes column 16w + L mod 16 of
        // the one at step 2·(L / 16), and each lane takes its two columns' by shuffles (the
        // four lanes of a quad need the same ones).
        let mut at2 = cur;
        at2.advance_within(2 * PACK_TILE_K, gs);
        let (start0, start2) = (s == s_begin || cur.r == 0, at2.r == 0);
        let mut rec_first = rec;
        if start0 || start2 {
            let group = if lane < 16 { cur.g } else { at2.g } - g_stage;
            let raw = sb + sh.rec_off() + group * sh.group_rec_bytes() + (tile * PACK_TILE_N + 16 * w + lane % 16) * 4;
            let mine = f64::from_bits(T::decode_record_shared(ld_shared_u32(raw), table));
            let take = |src: u32| shfl_idx_f64(mine, src).to_bits();
            if start0 {
                rec = [take(g), take(8 + g)];
            }
            rec_first = rec;
            if start2 {
                rec = [take(16 + g), take(24 + g)];
            }
        }
        let recs = [rec_first, rec];
        at2.advance_within(2 * PACK_TILE_K, gs);
        cur = at2;
        // The stage's four A fragments, then one fence and four back-to-back wgmmas.
        let mut afrag = [[0u32; 4]; 4];
        unroll!(j < 4, {
            let word = ld_shared_u32(sb + (tile * WG_STAGE_STEPS + j as u32) * PACK_TILE_BYTES + lane * 16 + 4 * w);
            let d = dequant_word::<T>(word, recs[j / 2][0], recs[j / 2][1]);
            afrag[j] = [d[0], d[2], d[1], d[3]];
        });
        wgmma_fence(&mut afrag);
        let desc = b_desc(sb + sh.x_off());
        unroll!(j < 4, {
            T::wgmma::<TF>(&mut acc, &afrag[j], desc + (j as u32 * sh.x_step_bytes() / 16) as u64);
        });
        wgmma_commit();
        // While they run: stage s + WG_LEAD into the slot of stage s + WG_LEAD − depth, once
        // every warp has released it.
        if q < s_end {
            if q - s_begin >= WG_DEPTH {
                mbarrier_wait(empty(slot_q), phase_q ^ 1);
            }
            src.copy_weights::<TF>(&a, slot_at(slot_q), cb, tid, gs, false);
            src.copy_x::<TF>(&a, slot_at(slot_q), tid);
            cp_async_mbarrier_arrive(full(slot_q));
        }
        q += 1;
        s += 1;
        next_ring_slot(&mut slot_q, &mut phase_q);
        next_ring_slot(&mut slot_s, &mut phase_s);
    }
    wgmma_wait_all_acc::<TF>(&mut acc);
    cp_async_wait_all();

    // acc[4f + e]: column 16w + g (+ 8 for e ≥ 2) of tile `tile`, token 8f + 2t (+ 1 for odd e).
    let (m, n) = (a.m, a.n);
    let col0 = cb * sh.n_block();
    unroll!(f < 16, {
        if f < TF {
            unroll!(e < 4, {
                let c = col0 + col + 8 * (e as u32 / 2);
                let tok = m0 + 8 * f as u32 + 2 * t + e as u32 % 2;
                let v = acc[4 * f + e];
                if tok < m {
                    if a.splits == 1 {
                        if c < n {
                            *a.y.ptr().add(tok as usize * n as usize + c as usize) = T::pack2(v, 0.0) as u16;
                        }
                    } else {
                        *a.ws.ptr().add((split as usize * m as usize + tok as usize) * a.n_pad as usize + c as usize) = v;
                    }
                }
            });
        }
    });
    if a.splits > 1 {
        let rows = (m - m0).min(sh.m_block());
        finish_split_k::<T>(&a, base + sh.flag(), mblk * a.col_blocks + cb, m0, rows, col0, sh.n_block(), tid, WG_THREADS);
    }
}

macro_rules! instance {
    ($marker:ident, $name:ident, $t:ty, $tf:literal) => {
        instance!($marker, $name, $t, $tf, false);
    };
    ($marker:ident, $name:ident, $t:ty, $tf:literal, $grouped:literal) => {
        forge_kernel_abi::w4a16_kernel! {
            /// See the module docs.
            $marker => fn $name(args) {
                wg::<$t, $tf, $grouped>(args)
            }
        }
    };
}

use super::mma::{Bf16, F16};
instance!(W4a16WgBf16T1, w4a16_wg_bf16_t1, Bf16, 1);
instance!(W4a16WgBf16T2, w4a16_wg_bf16_t2, Bf16, 2);
instance!(W4a16WgBf16T4, w4a16_wg_bf16_t4, Bf16, 4);
instance!(W4a16WgBf16T8, w4a16_wg_bf16_t8, Bf16, 8);
instance!(W4a16WgBf16T16, w4a16_wg_bf16_t16, Bf16, 16);
instance!(W4a16WgF16T1, w4a16_wg_f16_t1, F16, 1);
instance!(W4a16WgF16T2, w4a16_wg_f16_t2, F16, 2);
instance!(W4a16WgF16T4, w4a16_wg_f16_t4, F16, 4);
instance!(W4a16WgF16T8, w4a16_wg_f16_t8, F16, 8);
instance!(W4a16WgF16T16, w4a16_wg_f16_t16, F16, 16);
// Grouped (mixture-of-experts) launches of more than 32 rows per expert: blocks of 64 rows,
// of 128 above 64.
instance!(W4a16WgGroupedBf16T8, w4a16_wg_grouped_bf16_t8, Bf16, 8, true);
instance!(W4a16WgGroupedBf16T16, w4a16_wg_grouped_bf16_t16, Bf16, 16, true);
instance!(W4a16WgGroupedF16T8, w4a16_wg_grouped_f16_t8, F16, 8, true);
instance!(W4a16WgGroupedF16T16, w4a16_wg_grouped_f16_t16, F16, 16, true);
