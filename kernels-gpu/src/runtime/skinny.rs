//! `w4a16_skinny_{bf16,f16}_t{1,2,4,8}`: the small-`M` W4A16 matmul (`M ≤ 8·tf` rows per
//! block), built to stream the packed weight at HBM speed (docs/kernels.md §6).
//!
//! Thread mapping: 256 threads = 8 warps (512 = 16 in the Hopper build's `_t1_w16`
//! instances, 384 = 12 in its `_t{1,2}_w12` ones, [`skinny_streamed`]), all on the block's
//! `64·nt` output columns (`nt` packed `n` tiles); warp `w` of split `p` streams its own
//! contiguous range of 16-deep `k` steps (`forge_kernel_abi::runtime::W4a16Args` says
//! which). The product is `Yᵀ = dequant(W)·Xᵀ`: the mma's A operand is 16 weight columns ×
//! 16 `k` (one packed word, dequantized: its two n8 halves are the fragment's row halves), B
//! is 16 `k` × 8 tokens of `X`, so `M ≤ 8` wastes no tensor-core rows. Per step a lane makes
//! `nt` 16-byte shared loads of codes, `2·tf` 4-byte loads of `X`, `4·nt` packed words of
//! dequantization and `4·nt·tf` mma; when a step starts a group it decodes the `8·nt` records
//! of its columns into registers (the scale table copied to shared memory once per block: a
//! table read from global memory at a warp's first step would add a memory round trip to
//! every block).
//!
//! Why no block barrier in the main loop: every warp fills a private ring of
//! [`SKINNY_DEPTH`] steps in shared memory with its own `cp.async` and waits only for its own
//! copies (`cp.async.wait_group`, then `bar.warp.sync` because a lane reads `X` bytes another
//! lane copied). A warp never stalls on a slower one, and `depth − 1` steps per warp are in
//! flight (t1: 16 warps per SM, ~80 KB). The `_w12` instances keep no ring at all: each
//! lane loads its own operands straight into registers ([`skinny_streamed`]).
//!
//! The record decoding, the step's dequantization and mma, and the block end (warp partials
//! added in warp order, then `Y` or the split's partial) are in `runtime/skinny_math.rs`.
//!
//! Two builds: `w4a16_skinny_*` in the sm_80 module and `w4a16_skinny_sm90_*` in the Hopper
//! module, where the launch may overlap the kernel before it on the stream (programmatic
//! dependent launch): the prologue streams the first steps' weight, lets the next grid start
//! (`allow_dependent_grids`), waits for the previous one (`wait_for_prior_grids`), and only
//! then copies `X`. In the sm_80 build both calls are no-ops.
//!
//! Each build also has a grouped (mixture-of-experts) instance, `*_grouped_*`: row block `t`
//! is task `t` of the launch's table and runs as the ungrouped launch of that expert's rows
//! (`super::task_view`; docs/kernels.md §6, "Grouped launch").
//!
//! # Safety (upheld by the host launcher)
//! As documented on [`forge_kernel_abi::runtime::W4a16Args`].

use super::mma::{
    cp_async_16, cp_async_16_zfill, cp_async_16_zfill_ca, ld_stream_u32, ld_stream_u32x4, ld_u32_or_zero,
    store_scale_entry, Half,
};
use super::skinny_math::{block_end, decode_group, decode_records, step_mma, warp_steps, words_mma};
use super::{allow_dependent_grids, block_place, task_view, wait_for_prior_grids, GroupCursor};
use crate::device::{
    cp_async_commit, cp_async_wait, ld_shared_u32, shared_window_base, sync_threads, sync_warp, thread_x,
};
use forge_kernel_abi::runtime::{W4a16Args, W4a16SkinnyShape, PACK_TILE_BYTES, PACK_TILE_N, SKINNY_DEPTH};

/// Compile-time ring layout of the `(tf, nt)` instance, the same for any warp count (the
/// block's layout, which depends on it, is `sh` in [`skinny`]).
struct Cfg<const TF: usize, const NT: usize, const BITS: usize>;

impl<const TF: usize, const NT: usize, const BITS: usize> Cfg<TF, NT, BITS> {
    const SH: W4a16SkinnyShape =
        W4a16SkinnyShape { nt: NT as u32, warps: 1, bits: BITS as u32, ..W4a16SkinnyShape::for_tf(TF as u32) };
    /// Bytes of one packed tile.
    const TILE_BYTES: u32 = PACK_TILE_BYTES * BITS as u32 / 4;
    /// A lane's 16-byte code copies per step: one per tile, or the two halves of an 8-bit one.
    const CHUNKS: usize = if BITS == 8 { 2 } else { NT };
    const STEP: u32 = Self::SH.step_bytes();
    const X_OFF: u32 = Self::SH.codes_bytes();
    const REC_OFF: u32 = Self::SH.codes_bytes() + Self::SH.x_bytes();
    /// 16-byte chunks of one step's `X` slice: per fragment, two 8×8 matrices of 8 rows.
    const X_CHUNKS: u32 = 16 * TF as u32;
    const NB: u32 = Self::SH.n_block();
}

/// This lane's copy sources, advanced by additions from step to step (address arithmetic
/// per step would cost a quarter of the step's dequantization).
struct Sources {
    /// The lane's 16 bytes of each code tile of the next step.
    codes: [*const u8; 2],
    /// The lane's `X` chunks (chunk `lane + 32c` of a step: token `8f + r`, `k` half `h`),
    /// and whether the token is a row of `X`.
    x: [*const u8; 4],
    x_row: [bool; 4],
    /// `k` of the lane's first `X` chunk in the next step.
    kk: u32,
}

impl Sources {
    #[inline(always)]
    unsafe fn at<const TF: usize, const NT: usize, const BITS: usize>(
        a: &W4a16Args,
        s: u32,
        cb: u32,
        m0: u32,
        lane: u32,
    ) -> Self {
        let kt_total = a.k_pad as usize / 16;
        let w = a.w.ptr() as *const u8;
        let tile_bytes = Cfg::<TF, NT, BITS>::TILE_BYTES as usize;
        let tile = |j: u32| ((cb * NT as u32 + j.min(NT as u32 - 1)) as usize * kt_total + s as usize) * tile_bytes;
        // Code copy `c`: tile `c`, or half `c` of the one 8-bit tile.
        let code_at = |c: u32| if BITS == 8 { tile(0) + c as usize * PACK_TILE_BYTES as usize } else { tile(c) };
        let x = a.x.ptr() as *const u8;
        let chunk = |c: u32| {
            let (tok, h) = (m0 + (c / 16) * 8 + c % 8, (c / 8) % 2);
            let row = tok < a.m && c < Cfg::<TF, NT, BITS>::X_CHUNKS;
            let p = if row { x.add((tok as usize * a.k as usize + (s * 16 + h * 8) as usize) * 2) } else { x };
            (p, row)
        };
        let (x0, r0) = chunk(lane);
        let (x1, r1) = chunk(lane + 32);
        let (x2, r2) = chunk(lane + 64);
        let (x3, r3) = chunk(lane + 96);
        Sources {
            codes: [w.add(code_at(0) + lane as usize * 16), w.add(code_at(1) + lane as usize * 16)],
            x: [x0, x1, x2, x3],
            x_row: [r0, r1, r2, r3],
            kk: s * 16 + ((lane / 8) % 2) * 8,
        }
    }

    /// Copies the next step into ring slot `slot` (see [`Sources::copy_weights`] and
    /// [`Sources::copy_x`]) as one `cp.async` group and moves on one step.
    #[inline(always)]
    unsafe fn issue<const TF: usize, const NT: usize, const BITS: usize, const X_L1: bool>(
        &mut self,
        a: &W4a16Args,
        slot: u32,
        cb: u32,
        lane: u32,
        group: Option<u32>,
    ) {
        self.copy_weights::<TF, NT, BITS>(a, slot, cb, lane, group);
        self.copy_x::<TF, NT, BITS, X_L1>(a, slot, lane);
        cp_async_commit();
    }

    /// The next step's codes, and the raw records of `group` if set, into ring slot `slot`;
    /// moves the codes on one step.
    #[inline(always)]
    unsafe fn copy_weights<const TF: usize, const NT: usize, const BITS: usize>(
        &mut self,
        a: &W4a16Args,
        slot: u32,
        cb: u32,
        lane: u32,
        group: Option<u32>,
    ) {
        unroll!(j < 2, {
            if j < Cfg::<TF, NT, BITS>::CHUNKS {
                cp_async_16(slot + j as u32 * PACK_TILE_BYTES + lane * 16, self.codes[j]);
                self.codes[j] = self.codes[j].add(Cfg::<TF, NT, BITS>::TILE_BYTES as usize);
            }
        });
        if let Some(g) = group {
            if lane * 4 < Cfg::<TF, NT, BITS>::NB {
                let rec = g as usize * a.n_pad as usize + (cb * Cfg::<TF, NT, BITS>::NB + lane * 4) as usize;
                cp_async_16(slot + Cfg::<TF, NT, BITS>::REC_OFF + lane * 16, a.meta.ptr().add(rec) as *const u8);
            }
        }
    }

    /// The next step's `X` chunks into ring slot `slot` (zero-filled past `K` or `M`; through
    /// L1 with `X_L1`, see [`instance!`]); moves `X` on one step.
    #[inline(always)]
    unsafe fn copy_x<const TF: usize, const NT: usize, const BITS: usize, const X_L1: bool>(
        &mut self,
        a: &W4a16Args,
        slot: u32,
        lane: u32,
    ) {
        // Chunk lane + 32c has the same k half as chunk lane (32 is a multiple of 16).
        let in_k = self.kk < a.k;
        unroll!(c < 4, {
            if (lane + 32 * c as u32) < Cfg::<TF, NT, BITS>::X_CHUNKS {
                let valid = self.x_row[c] && in_k;
                let (dst, n) =
                    (slot + Cfg::<TF, NT, BITS>::X_OFF + (lane + 32 * c as u32) * 16, if valid { 16 } else { 0 });
                if X_L1 {
                    cp_async_16_zfill_ca(dst, self.x[c], n);
                } else {
                    cp_async_16_zfill(dst, self.x[c], n);
                }
                self.x[c] = self.x[c].add(if self.x_row[c] { 32 } else { 0 });
            }
        });
        self.kk += 16;
    }
}

/// The `X` fragments of the step in ring slot `sb`: token `8f + g`, `k` `2t, 2t+1` (b0) and
/// `2t+8, 2t+9` (b1); the 16-byte rows of the two 8×8 matrices put the 32 lanes on 32 banks.
#[inline(always)]
unsafe fn x_fragments<const TF: usize, const NT: usize, const BITS: usize>(sb: u32, lane: u32) -> [[u32; 2]; TF] {
    let (g, t) = (lane / 4, lane % 4);
    let mut xb = [[0u32; 2]; TF];
    unroll!(f < 8, {
        if f < TF {
            let at = sb + Cfg::<TF, NT, BITS>::X_OFF + ((2 * f as u32) * 8 + g) * 16 + 4 * t;
            xb[f] = [ld_shared_u32(at), ld_shared_u32(at + 128)];
        }
    });
    xb
}

/// See the module docs.
#[inline(always)]
pub unsafe fn skinny<
    T: Half,
    const TF: usize,
    const NT: usize,
    const W: usize,
    const GROUPED: bool,
    const X_L1: bool,
    const BITS: usize,
>(
    a: W4a16Args,
) {
    let sh =
        W4a16SkinnyShape { nt: NT as u32, warps: W as u32, bits: BITS as u32, ..W4a16SkinnyShape::for_tf(TF as u32) };
    let tid = thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let (g, t) = (lane / 4, lane % 4);
    let (mblk, cb, split, splits) = block_place(&a);
    // A grouped launch's row block is its task's whole (ungrouped) row block 0. A separate
    // build: the view's addresses live in registers, where the plain kernel reads its
    // arguments from the constant bank (the shared build ran the plain t8 kernel 8 % slower).
    let (a, mblk) = if GROUPED { (task_view(&a, mblk), 0) } else { (a, mblk) };
    // An empty task (a device-built table's unused slot): nothing to do. Before any barrier,
    // and every block of a cluster shares the task, so they all leave together.
    if GROUPED && a.m == 0 {
        return;
    }
    let m0 = mblk * Cfg::<TF, NT, BITS>::SH.m_block();
    let (s_begin, s_end) = warp_steps(a.k_pad, split, splits, warp, W as u32, 1);
    let gs = a.gs.max(16);

    let block_base = shared_window_base();
    let ring = block_base + warp * sh.warp_bytes();
    let first = GroupCursor::at(s_begin * 16, gs);

    let mut issue_cur = first;
    let mut src = Sources::at::<TF, NT, BITS>(&a, s_begin, cb, m0, lane);
    let mut s_issue = s_begin;
    let table = block_base + sh.table();
    // Ring slot of prologue step `s`.
    let slot_of = |s: u32| ring + (s - s_begin) * Cfg::<TF, NT, BITS>::STEP;
    if cfg!(feature = "hopper") && a.overlap != 0 {
        // Overlapping launch: the weight of the first depth − 1 steps, which no earlier kernel
        // writes, streams while the kernel before this one may still run; their X once that
        // kernel is done. The prologue is then waited for whole: the loop's waits, counting
        // the groups it issues, then still find each step's group complete when it is read.
        while s_issue < s_begin + SKINNY_DEPTH - 1 && s_issue < s_end {
            let group = if s_issue == s_begin || issue_cur.r == 0 { Some(issue_cur.g) } else { None };
            src.copy_weights::<TF, NT, BITS>(&a, slot_of(s_issue), cb, lane, group);
            issue_cur.advance_within(16, gs);
            s_issue += 1;
        }
        allow_dependent_grids();
        if W <= 8 || tid < 256 {
            store_scale_entry::<T>(table, tid);
        }
        wait_for_prior_grids();
        let mut s_x = s_begin;
        while s_x < s_issue {
            src.copy_x::<TF, NT, BITS, X_L1>(&a, slot_of(s_x), lane);
            s_x += 1;
        }
        cp_async_commit();
        cp_async_wait::<0>();
    } else {
        // The first depth − 1 steps, one group each (empty groups past the end keep the
        // count), so step s_begin is computed as soon as it lands.
        while s_issue < s_begin + SKINNY_DEPTH - 1 {
            if s_issue < s_end {
                let group = if s_issue == s_begin || issue_cur.r == 0 { Some(issue_cur.g) } else { None };
                src.issue::<TF, NT, BITS, X_L1>(&a, slot_of(s_issue), cb, lane, group);
                issue_cur.advance_within(16, gs);
            } else {
                cp_async_commit();
            }
            s_issue += 1;
        }
        // The scale table, while the first steps are in flight.
        if W <= 8 || tid < 256 {
            store_scale_entry::<T>(table, tid);
        }
    }
    sync_threads();
    let mut slot_issue = (s_issue - s_begin) % SKINNY_DEPTH;

    let mut acc = [[[0f32; 4]; TF]; 8];
    // Decoded records of this lane's columns `8r + g` (r = 0..8·nt), see `Half::decode_record`.
    let mut rec = [0u64; 16];
    let mut cur = first;
    let mut slot = 0;
    let mut s = s_begin;
    while s < s_end {
        cp_async_wait::<{ SKINNY_DEPTH - 2 }>();
        sync_warp();
        // The slot step s − 1 used is free (every lane passed the warp barrier above).
        if s_issue < s_end {
            let group = if issue_cur.r == 0 { Some(issue_cur.g) } else { None };
            src.issue::<TF, NT, BITS, X_L1>(&a, ring + slot_issue * Cfg::<TF, NT, BITS>::STEP, cb, lane, group);
            issue_cur.advance_within(16, gs);
        } else {
            cp_async_commit();
        }
        s_issue += 1;
        slot_issue = if slot_issue + 1 == SKINNY_DEPTH { 0 } else { slot_issue + 1 };
        let sb = ring + slot * Cfg::<TF, NT, BITS>::STEP;
        if s == s_begin || cur.r == 0 {
            decode_group::<T, NT, BITS>(sb + Cfg::<TF, NT, BITS>::REC_OFF, table, lane, &mut rec);
        }
        let xb = x_fragments::<TF, NT, BITS>(sb, lane);
        step_mma::<T, TF, NT, BITS>(sb + lane * 16, PACK_TILE_BYTES, &xb, &mut acc, &rec);
        cur.advance_within(16, gs);
        slot = if slot + 1 == SKINNY_DEPTH { 0 } else { slot + 1 };
        s += 1;
    }
    // Nothing in flight into the rings the block end reuses.
    cp_async_wait::<0>();
    block_end::<T, TF, NT, W>(&a, block_base, block_base + sh.flag(), &acc, (mblk, cb, split), tid);
}

/// One slot of two 16-deep steps of one 64-column tile, in registers ([`skinny_streamed`]).
#[derive(Clone, Copy)]
struct SlotRegs<const TF: usize> {
    /// Step `j`'s 16 bytes of the tile (this lane's 4 packed words).
    codes: [[u32; 4]; 2],
    /// Step `j`'s `X` fragments of tokens `8f + g`: `k` `2t, 2t+1` and `2t+8, 2t+9`.
    x: [[[u32; 2]; TF]; 2],
    /// Raw records of columns `(4q + t)·8 + g` when the slot starts a group.
    rec: [u32; 4],
}

impl<const TF: usize> SlotRegs<TF> {
    const ZERO: Self = SlotRegs { codes: [[0; 4]; 2], x: [[[0; 2]; TF]; 2], rec: [0; 4] };
}

/// This lane's load positions in [`skinny_streamed`], advanced by additions slot by slot.
struct Stream<const TF: usize> {
    /// The lane's 16 bytes of the next slot's first step.
    codes: *const u8,
    /// The next slot's records of the lane's first column (`cb·64 + 8t + g`) in group `cur.g`.
    meta_col: *const u8,
    /// `X[m0 + 8f + g][k + 2t]` of the next slot (the base of `X` if that token is not a row).
    x: [*const u8; TF],
    row: [bool; TF],
    /// `k` of the next slot, and its group.
    k: u32,
    cur: GroupCursor,
    first: bool,
}

impl<const TF: usize> Stream<TF> {
    #[inline(always)]
    unsafe fn at(a: &W4a16Args, s: u32, cb: u32, m0: u32, lane: u32, gs: u32) -> Self {
        let (g, t) = (lane / 4, lane % 4);
        let tile = (cb as usize * (a.k_pad as usize / 16) + s as usize) * PACK_TILE_BYTES as usize;
        let base = a.x.ptr() as *const u8;
        let mut x = [base; TF];
        let mut row = [false; TF];
        unroll!(f < 2, {
            if f < TF {
                let tok = m0 + 8 * f as u32 + g;
                row[f] = tok < a.m;
                if row[f] {
                    x[f] = base.add((tok as usize * a.k as usize + (s * 16 + 2 * t) as usize) * 2);
                }
            }
        });
        Stream {
            codes: (a.w.ptr() as *const u8).add(tile + lane as usize * 16),
            meta_col: a.meta.ptr().add((cb * PACK_TILE_N + 8 * t + g) as usize) as *const u8,
            x,
            row,
            k: s * 16,
            cur: GroupCursor::at(s * 16, gs),
            first: true,
        }
    }

    /// The next slot's codes, and its raw records if it starts a group (or is the warp's
    /// first); moves on one slot.
    #[inline(always)]
    unsafe fn weights(&mut self, a: &W4a16Args, gs: u32, r: &mut SlotRegs<TF>) {
        r.codes = [ld_stream_u32x4(self.codes), ld_stream_u32x4(self.codes.add(PACK_TILE_BYTES as usize))];
        self.codes = self.codes.add(2 * PACK_TILE_BYTES as usize);
        if self.first || self.cur.r == 0 {
            let at = self.meta_col.add(self.cur.g as usize * a.n_pad as usize * 4);
            r.rec = [ld_stream_u32(at), ld_stream_u32(at.add(32 * 4)), 0, 0];
        }
        self.first = false;
        self.cur.advance_within(32, gs);
    }

    /// The next slot's `X` fragments (zero past `K` or `M`: `K % 8 == 0`, so a fragment's
    /// 8-wide half is all in or all out); moves on one slot.
    #[inline(always)]
    unsafe fn x(&mut self, a: &W4a16Args, r: &mut SlotRegs<TF>) {
        unroll!(f < 2, {
            if f < TF {
                unroll!(j < 2, {
                    unroll!(h < 2, {
                        let kc = self.k + (16 * j + 8 * h) as u32;
                        let valid = self.row[f] && kc < a.k;
                        r.x[j][f][h] = ld_u32_or_zero(self.x[f].add(32 * j + 16 * h), valid);
                    });
                });
                self.x[f] = self.x[f].add(if self.row[f] { 64 } else { 0 });
            }
        });
        self.k += 32;
    }
}

/// The 12-warp skinny kernel (`tf` 1 or 2, one 64-column tile, slots of two steps, the
/// warps' `k` split of [`warp_steps`]) with its operands loaded straight into registers, `P`
/// slots ahead of the mma: no shared-memory ring, no `cp.async` bookkeeping, no per-slot
/// warp barrier. Each lane loads exactly the bytes it feeds to its own mma (the packed
/// layout gives lane `l` the 16 bytes `16l..16l+16` of a tile), so no other lane waits on
/// them.
#[inline(always)]
pub unsafe fn skinny_streamed<T: Half, const TF: usize, const W: usize, const P: usize>(a: W4a16Args) {
    const { assert!(P >= 2 && P <= 4, "2 to 4 slots in flight") };
    const { assert!(W4a16SkinnyShape::deep(TF as u32).steps == 2, "SlotRegs holds two steps") };
    let sh = W4a16SkinnyShape::deep(TF as u32);
    let tid = thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let (mblk, cb, split, splits) = block_place(&a);
    let m0 = mblk * sh.m_block();
    let (s_begin, s_end) = warp_steps(a.k_pad, split, splits, warp, W as u32, 2);
    let gs = a.gs.max(16);
    let block_base = shared_window_base();
    let table = block_base + sh.table();
    let first = GroupCursor::at(s_begin * 16, gs);
    let mut src = Stream::<TF>::at(&a, s_begin, cb, m0, lane, gs);
    let mut bufs = [SlotRegs::<TF>::ZERO; P];
    // Slot i of the prologue is loaded where the warp has it.
    let mut s_load = s_begin;
    if cfg!(feature = "hopper") && a.overlap != 0 {
        // Overlapping launch: the weight, which no earlier kernel writes, before the wait.
        unroll!(i < 4, {
            if i < P && s_load < s_end {
                src.weights(&a, gs, &mut bufs[i]);
                s_load += 2;
            }
        });
        allow_dependent_grids();
        if W <= 8 || tid < 256 {
            store_scale_entry::<T>(table, tid);
        }
        wait_for_prior_grids();
        unroll!(i < 4, {
            if i < P && s_begin + ((2 * i) as u32) < s_end {
                src.x(&a, &mut bufs[i]);
            }
        });
    } else {
        unroll!(i < 4, {
            if i < P && s_load < s_end {
                src.weights(&a, gs, &mut bufs[i]);
                src.x(&a, &mut bufs[i]);
                s_load += 2;
            }
        });
        if W <= 8 || tid < 256 {
            store_scale_entry::<T>(table, tid);
        }
    }
    sync_threads();

    let mut acc = [[[0f32; 4]; TF]; 8];
    let mut rec = [0u64; 16];
    let mut cur = first;
    let mut s = s_begin;
    'run: loop {
        // Slot (s − s_begin)/2 is in bufs[i]: the loop is unrolled by P, so each buffer
        // stays in fixed registers.
        unroll!(i < 4, {
            if i < P {
                if s >= s_end {
                    break 'run;
                }
                if s == s_begin || cur.r == 0 {
                    decode_records::<T, 1>(bufs[i].rec, table, lane, &mut rec);
                }
                unroll!(j < 2, {
                    words_mma::<T, TF, 1>(0, bufs[i].codes[j], &bufs[i].x[j], &mut acc, &rec);
                });
                if s_load < s_end {
                    src.weights(&a, gs, &mut bufs[i]);
                    src.x(&a, &mut bufs[i]);
                    s_load += 2;
                }
                cur.advance_within(32, gs);
                s += 2;
            }
        });
    }
    block_end::<T, TF, 1, W>(&a, block_base, block_base + sh.flag(), &acc, (mblk, cb, split), tid);
}

macro_rules! instance {
    ($marker:ident, $name:ident, $t:ty, $tf:literal, $grouped:literal) => {
        instance!($marker, $name, $t, $tf, $grouped, W4a16SkinnyShape::for_tf($tf), false);
    };
    ($marker:ident, $name:ident, $t:ty, $tf:literal, $grouped:literal, $shape:expr, $x_l1:literal) => {
        forge_kernel_abi::w4a16_kernel! {
            /// See the module docs.
            $marker => fn $name(args) {
                skinny::<$t, $tf, { $shape.nt as usize }, { $shape.warps as usize }, $grouped, $x_l1, { $shape.bits as usize }>(args)
            }
        }
    };
}

use super::mma::{Bf16, F16};

/// The listed instances, compiled only where `$cfg` holds.
macro_rules! instances_if {
    ($cfg:meta; $($marker:ident, $name:ident, $t:ty, $tf:literal, $grouped:literal;)*) => {
        $(#[cfg($cfg)] instance!($marker, $name, $t, $tf, $grouped);)*
    };
}

// The sm_80 module's instances, and the same kernels in the Hopper module, where
// `wait_for_prior_grids` / `allow_dependent_grids` are live (no t4 there: the plan keeps the
// sm_80 build for 17–32 rows).
instances_if! { not(feature = "hopper");
    W4a16SkinnyBf16T1, w4a16_skinny_bf16_t1, Bf16, 1, false;
    W4a16SkinnyBf16T2, w4a16_skinny_bf16_t2, Bf16, 2, false;
    W4a16SkinnyBf16T4, w4a16_skinny_bf16_t4, Bf16, 4, false;
    W4a16SkinnyBf16T8, w4a16_skinny_bf16_t8, Bf16, 8, false;
    W4a16SkinnyF16T1, w4a16_skinny_f16_t1, F16, 1, false;
    W4a16SkinnyF16T2, w4a16_skinny_f16_t2, F16, 2, false;
    W4a16SkinnyF16T4, w4a16_skinny_f16_t4, F16, 4, false;
    W4a16SkinnyF16T8, w4a16_skinny_f16_t8, F16, 8, false;
    W4a16SkinnyGroupedBf16T1, w4a16_skinny_grouped_bf16_t1, Bf16, 1, true;
    W4a16SkinnyGroupedBf16T2, w4a16_skinny_grouped_bf16_t2, Bf16, 2, true;
    W4a16SkinnyGroupedBf16T4, w4a16_skinny_grouped_bf16_t4, Bf16, 4, true;
    W4a16SkinnyGroupedBf16T8, w4a16_skinny_grouped_bf16_t8, Bf16, 8, true;
    W4a16SkinnyGroupedF16T1, w4a16_skinny_grouped_f16_t1, F16, 1, true;
    W4a16SkinnyGroupedF16T2, w4a16_skinny_grouped_f16_t2, F16, 2, true;
    W4a16SkinnyGroupedF16T4, w4a16_skinny_grouped_f16_t4, F16, 4, true;
    W4a16SkinnyGroupedF16T8, w4a16_skinny_grouped_f16_t8, F16, 8, true;
}
// 8-bit codes (5–8-bit grids), sm_80 module only: one tile per block, any M by row blocks,
// and their grouped builds.
macro_rules! w8_instance {
    ($marker:ident, $name:ident, $t:ty, $tf:literal, $grouped:literal) => {
        #[cfg(not(feature = "hopper"))]
        instance!($marker, $name, $t, $tf, $grouped, W4a16SkinnyShape::w8($tf), false);
    };
}
w8_instance!(W8a16SkinnyBf16T1, w8a16_skinny_bf16_t1, Bf16, 1, false);
w8_instance!(W8a16SkinnyBf16T2, w8a16_skinny_bf16_t2, Bf16, 2, false);
w8_instance!(W8a16SkinnyBf16T4, w8a16_skinny_bf16_t4, Bf16, 4, false);
w8_instance!(W8a16SkinnyBf16T8, w8a16_skinny_bf16_t8, Bf16, 8, false);
w8_instance!(W8a16SkinnyF16T1, w8a16_skinny_f16_t1, F16, 1, false);
w8_instance!(W8a16SkinnyF16T2, w8a16_skinny_f16_t2, F16, 2, false);
w8_instance!(W8a16SkinnyF16T4, w8a16_skinny_f16_t4, F16, 4, false);
w8_instance!(W8a16SkinnyF16T8, w8a16_skinny_f16_t8, F16, 8, false);
w8_instance!(W8a16SkinnyGroupedBf16T1, w8a16_skinny_grouped_bf16_t1, Bf16, 1, true);
w8_instance!(W8a16SkinnyGroupedBf16T2, w8a16_skinny_grouped_bf16_t2, Bf16, 2, true);
w8_instance!(W8a16SkinnyGroupedBf16T4, w8a16_skinny_grouped_bf16_t4, Bf16, 4, true);
w8_instance!(W8a16SkinnyGroupedBf16T8, w8a16_skinny_grouped_bf16_t8, Bf16, 8, true);
w8_instance!(W8a16SkinnyGroupedF16T1, w8a16_skinny_grouped_f16_t1, F16, 1, true);
w8_instance!(W8a16SkinnyGroupedF16T2, w8a16_skinny_grouped_f16_t2, F16, 2, true);
w8_instance!(W8a16SkinnyGroupedF16T4, w8a16_skinny_grouped_f16_t4, F16, 4, true);
w8_instance!(W8a16SkinnyGroupedF16T8, w8a16_skinny_grouped_f16_t8, F16, 8, true);
instances_if! { feature = "hopper";
    W4a16SkinnySm90Bf16T1, w4a16_skinny_sm90_bf16_t1, Bf16, 1, false;
    W4a16SkinnySm90Bf16T2, w4a16_skinny_sm90_bf16_t2, Bf16, 2, false;
    W4a16SkinnySm90Bf16T8, w4a16_skinny_sm90_bf16_t8, Bf16, 8, false;
    W4a16SkinnySm90F16T1, w4a16_skinny_sm90_f16_t1, F16, 1, false;
    W4a16SkinnySm90F16T2, w4a16_skinny_sm90_f16_t2, F16, 2, false;
    W4a16SkinnySm90F16T8, w4a16_skinny_sm90_f16_t8, F16, 8, false;
    W4a16SkinnySm90GroupedBf16T1, w4a16_skinny_sm90_grouped_bf16_t1, Bf16, 1, true;
    W4a16SkinnySm90GroupedBf16T2, w4a16_skinny_sm90_grouped_bf16_t2, Bf16, 2, true;
    W4a16SkinnySm90GroupedBf16T8, w4a16_skinny_sm90_grouped_bf16_t8, Bf16, 8, true;
    W4a16SkinnySm90GroupedF16T1, w4a16_skinny_sm90_grouped_f16_t1, F16, 1, true;
    W4a16SkinnySm90GroupedF16T2, w4a16_skinny_sm90_grouped_f16_t2, F16, 2, true;
    W4a16SkinnySm90GroupedF16T8, w4a16_skinny_sm90_grouped_f16_t8, F16, 8, true;
}
// Blocks of 16 warps for 1–8 rows (the plan's choice where a layer has about one tile per SM).
#[cfg(feature = "hopper")]
instance!(W4a16SkinnySm90Bf16T1W16, w4a16_skinny_sm90_bf16_t1_w16, Bf16, 1, false, W4a16SkinnyShape::wide(1), false);
#[cfg(feature = "hopper")]
instance!(W4a16SkinnySm90F16T1W16, w4a16_skinny_sm90_f16_t1_w16, F16, 1, false, W4a16SkinnyShape::wide(1), false);
// Blocks of 12 warps on one 64-column tile, operands in registers (W4a16SkinnyShape::deep):
// one per SM.
macro_rules! streamed_instance {
    ($marker:ident, $name:ident, $t:ty, $tf:literal, $slots:literal) => {
        #[cfg(feature = "hopper")]
        forge_kernel_abi::w4a16_kernel! {
            /// See [`skinny_streamed`].
            $marker => fn $name(args) {
                skinny_streamed::<$t, $tf, { W4a16SkinnyShape::deep($tf).warps as usize }, $slots>(args)
            }
        }
    };
}
// Slots in flight per warp: 3 at tf 1 (152 registers; H200, M = 1–4, against 2 and 4 in the
// same run: 2 was 1–5 % slower on every bench shape, 4 2.4 % faster on 4096×14336 and up to
// 3.6 % slower on the smaller layers).
streamed_instance!(W4a16SkinnySm90Bf16T1W12, w4a16_skinny_sm90_bf16_t1_w12, Bf16, 1, 3);
streamed_instance!(W4a16SkinnySm90F16T1W12, w4a16_skinny_sm90_f16_t1_w12, F16, 1, 3);
streamed_instance!(W4a16SkinnySm90Bf16T2W12, w4a16_skinny_sm90_bf16_t2_w12, Bf16, 2, 3);
streamed_instance!(W4a16SkinnySm90F16T2W12, w4a16_skinny_sm90_f16_t2_w12, F16, 2, 3);
// 9–16 rows with X copied through L1, for unsplit launches: every block re-reads X for its k
// range (once per column block in all), and unsplit the two blocks on an SM (neighbouring
// column blocks) stream the same k range in step, so one block's X lines serve the other
// (H200, M = 16: 14336×4096 24.5 → 20.7 µs, 28672×4096 45.8 → 39.5). Split, or one block per
// SM, L1 only cost (the t2 blocks at 4 splits on 4096×14336 20.0 → 21.2 µs; the
// one-block-per-SM t4 and t8 4–10 % slower); one kernel choosing per launch ran the split
// launches 1–3.5 % slower, so it is a separate build.
#[cfg(feature = "hopper")]
instance!(W4a16SkinnySm90Bf16T2L1, w4a16_skinny_sm90_bf16_t2_l1, Bf16, 2, false, W4a16SkinnyShape::for_tf(2), true);
#[cfg(feature = "hopper")]
instance!(W4a16SkinnySm90F16T2L1, w4a16_skinny_sm90_f16_t2_l1, F16, 2, false, W4a16SkinnyShape::for_tf(2), true);
