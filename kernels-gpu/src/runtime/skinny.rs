//! `w4a16_skinny_{bf16,f16}_t{1,2,4,8}`: the small-`M` W4A16 matmul (`M ≤ 8·tf` rows per
//! block), built to stream the packed weight at HBM speed (docs/kernels.md §6).
//!
//! Thread mapping: 256 threads = 8 warps, all on the block's `64·nt` output columns (`nt`
//! packed `n` tiles); warp `w` of split `p` streams its own contiguous range of
//! 16-deep `k` steps (`forge_kernel_abi::runtime::W4a16Args` says which). The product is
//! `Yᵀ = dequant(W)·Xᵀ`: the mma's A operand is 16 weight columns × 16 `k` (one packed word,
//! dequantized: its two n8 halves are the fragment's row halves), B is 16 `k` × 8 tokens of
//! `X`, so `M ≤ 8` wastes no tensor-core rows. Per step a lane makes `nt` 16-byte shared
//! loads of codes, `2·tf` 4-byte loads of `X`, `4·nt` packed words of dequantization and
//! `4·nt·tf` mma; when a step starts a group it decodes the `8·nt` records of its columns into
//! registers (the scale table copied to shared memory once per block: a table read from
//! global memory at a warp's first step would add a memory round trip to every block).
//!
//! Why no block barrier in the main loop: every warp fills a private ring of
//! [`SKINNY_DEPTH`] steps in shared memory with its own `cp.async` and waits only for its own
//! copies (`cp.async.wait_group`, then `bar.warp.sync` because a lane reads `X` bytes another
//! lane copied). A warp never stalls on a slower one, and `depth − 1` steps per warp are in
//! flight (t1: 16 warps per SM, ~80 KB).
//!
//! End: the warps store their accumulators in shared memory, every thread adds one output
//! pair's 8 warp partials in warp order, and writes `Y` (one split) or its split's f32 partial
//! for [`finish_split_k`].
//!
//! # Safety (upheld by the host launcher)
//! As documented on [`forge_kernel_abi::runtime::W4a16Args`].

use super::epilogue::{finish_split_k, store_pair};
use super::{block_place, GroupCursor};
use super::mma::{cp_async_16, cp_async_16_zfill, dequant_word, Half};
use crate::device::{
    shfl_idx_f32, st_shared_u16, cp_async_commit, cp_async_wait, ld_shared_f32x2, ld_shared_u32, ld_shared_u32x4, shared_window_base,
    st_shared_u32, sync_threads, sync_warp, thread_x,
};
use forge_kernel_abi::runtime::{W4a16Args, W4a16SkinnyShape, PACK_TILE_BYTES, SKINNY_DEPTH, SKINNY_WARPS, W4A16_THREADS};

/// Compile-time shape of the `(tf, nt)` instance.
struct Cfg<const TF: usize, const NT: usize>;

impl<const TF: usize, const NT: usize> Cfg<TF, NT> {
    const SH: W4a16SkinnyShape = W4a16SkinnyShape { tf: TF as u32, nt: NT as u32 };
    const STEP: u32 = Self::SH.step_bytes();
    const X_OFF: u32 = Self::SH.codes_bytes();
    const REC_OFF: u32 = Self::SH.codes_bytes() + Self::SH.x_bytes();
    /// 16-byte chunks of one step's `X` slice: per fragment, two 8×8 matrices of 8 rows.
    const X_CHUNKS: u32 = 16 * TF as u32;
    /// Bytes of one warp's partial in the reduction buffer.
    const RED_WARP: u32 = Self::SH.m_block() * Self::SH.red_stride() * 4;
    const RED_STRIDE: u32 = Self::SH.red_stride();
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
    unsafe fn at<const TF: usize, const NT: usize>(a: &W4a16Args, s: u32, cb: u32, m0: u32, lane: u32) -> Self {
        let kt_total = a.k_pad as usize / 16;
        let w = a.w.ptr() as *const u8;
        let tile = |j: u32| ((cb * NT as u32 + j.min(NT as u32 - 1)) as usize * kt_total + s as usize) * PACK_TILE_BYTES as usize;
        let x = a.x.ptr() as *const u8;
        let chunk = |c: u32| {
            let (tok, h) = (m0 + (c / 16) * 8 + c % 8, (c / 8) % 2);
            let row = tok < a.m && c < Cfg::<TF, NT>::X_CHUNKS;
            let p = if row { x.add((tok as usize * a.k as usize + (s * 16 + h * 8) as usize) * 2) } else { x };
            (p, row)
        };
        let (x0, r0) = chunk(lane);
        let (x1, r1) = chunk(lane + 32);
        let (x2, r2) = chunk(lane + 64);
        let (x3, r3) = chunk(lane + 96);
        Sources {
            codes: [w.add(tile(0) + lane as usize * 16), w.add(tile(1) + lane as usize * 16)],
            x: [x0, x1, x2, x3],
            x_row: [r0, r1, r2, r3],
            kk: s * 16 + ((lane / 8) % 2) * 8,
        }
    }

    /// Copies the next step into ring slot `slot` (the `X` chunks past `K` or `M` zero-filled,
    /// the raw records of `group` if set) and moves on one step.
    #[inline(always)]
    unsafe fn issue<const TF: usize, const NT: usize>(&mut self, a: &W4a16Args, slot: u32, cb: u32, lane: u32, group: Option<u32>) {
        unroll!(j < 2, {
            if j < NT {
                cp_async_16(slot + j as u32 * PACK_TILE_BYTES + lane * 16, self.codes[j]);
                self.codes[j] = self.codes[j].add(PACK_TILE_BYTES as usize);
            }
        });
        // Chunk lane + 32c has the same k half as chunk lane (32 is a multiple of 16).
        let in_k = self.kk < a.k;
        unroll!(c < 4, {
            if (lane + 32 * c as u32) < Cfg::<TF, NT>::X_CHUNKS {
                let valid = self.x_row[c] && in_k;
                cp_async_16_zfill(
                    slot + Cfg::<TF, NT>::X_OFF + (lane + 32 * c as u32) * 16,
                    self.x[c],
                    if valid { 16 } else { 0 },
                );
                self.x[c] = self.x[c].add(if self.x_row[c] { 32 } else { 0 });
            }
        });
        self.kk += 16;
        if let Some(g) = group {
            if lane * 4 < Cfg::<TF, NT>::NB {
                let rec = g as usize * a.n_pad as usize + (cb * Cfg::<TF, NT>::NB + lane * 4) as usize;
                cp_async_16(slot + Cfg::<TF, NT>::REC_OFF + lane * 16, a.meta.ptr().add(rec) as *const u8);
            }
        }
        cp_async_commit();
    }
}

/// The records of a group from ring slot `sb` into `rec` (this lane's columns `8r + g`). The
/// four lanes of a quad need the same columns, so each decodes a quarter of them (`r ≡ t mod
/// 4`) and the quad trades the rest by shuffles: a quarter of the decoding work.
#[inline(always)]
unsafe fn decode_group<T: Half, const TF: usize, const NT: usize>(sb: u32, table: u32, lane: u32, rec: &mut [u64; 16]) {
    let (g, t) = (lane / 4, lane % 4);
    let mut own = [0u64; 4];
    unroll!(q < 4, {
        if q < 2 * NT {
            let col = (4 * q as u32 + t) * 8 + g;
            own[q] = T::decode_record_shared(ld_shared_u32(sb + Cfg::<TF, NT>::REC_OFF + col * 4), table);
        }
    });
    unroll!(q < 4, {
        if q < 2 * NT {
            unroll!(u < 4, {
                let from = 4 * g + u as u32;
                let lo = shfl_idx_f32(f32::from_bits(own[q] as u32), from).to_bits();
                let hi = shfl_idx_f32(f32::from_bits((own[q] >> 32) as u32), from).to_bits();
                rec[4 * q + u] = lo as u64 | ((hi as u64) << 32);
            });
        }
    });
}

/// One 16-deep step from ring slot `sb`: the `X` fragments, then per packed word its
/// dequantization and `tf` mma.
#[inline(always)]
unsafe fn compute_step<T: Half, const TF: usize, const NT: usize>(
    sb: u32,
    lane: u32,
    acc: &mut [[[f32; 4]; TF]; 8],
    rec: &[u64; 16],
) {
    let (g, t) = (lane / 4, lane % 4);
    // B fragments: token g of each fragment, k 2t, 2t+1 (b0) and 2t+8, 2t+9 (b1); the 16-byte
    // rows of the two 8×8 matrices put the 32 lanes on 32 banks.
    let mut xb = [[0u32; 2]; TF];
    unroll!(f < 8, {
        if f < TF {
            let at = sb + Cfg::<TF, NT>::X_OFF + ((2 * f as u32) * 8 + g) * 16 + 4 * t;
            xb[f] = [ld_shared_u32(at), ld_shared_u32(at + 128)];
        }
    });
    unroll!(j < 2, {
        if j < NT {
            let words = ld_shared_u32x4(sb + j as u32 * PACK_TILE_BYTES + lane * 16);
            unroll!(i < 4, {
                // Word i: columns 16i + g (n8 half 2i) and 16i + 8 + g (half 2i + 1).
                let d = dequant_word::<T>(words[i], rec[8 * j + 2 * i], rec[8 * j + 2 * i + 1]);
                let afrag = [d[0], d[2], d[1], d[3]];
                unroll!(f < 8, {
                    if f < TF {
                        T::mma(&mut acc[4 * j + i][f], &afrag, xb[f][0], xb[f][1]);
                    }
                });
            });
        }
    });
}

/// See the module docs.
#[inline(always)]
pub unsafe fn skinny<T: Half, const TF: usize, const NT: usize>(a: W4a16Args) {
    let tid = thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let (g, t) = (lane / 4, lane % 4);
    let (mblk, cb, split, splits) = block_place(&a);
    let m0 = mblk * Cfg::<TF, NT>::SH.m_block();
    let kt_total = a.k_pad / 16;
    let parts = splits as u64 * SKINNY_WARPS as u64;
    let part = split as u64 * SKINNY_WARPS as u64 + warp as u64;
    let s_begin = (part * kt_total as u64 / parts) as u32;
    let s_end = ((part + 1) * kt_total as u64 / parts) as u32;
    let gs = a.gs.max(16);

    let block_base = shared_window_base();
    let ring = block_base + warp * SKINNY_DEPTH * Cfg::<TF, NT>::STEP;
    let first = GroupCursor::at(s_begin * 16, gs);

    // Prologue: the first depth − 1 steps (empty groups past the end keep the count).
    let mut issue_cur = first;
    let mut src = Sources::at::<TF, NT>(&a, s_begin, cb, m0, lane);
    let mut s_issue = s_begin;
    let mut slot_issue = 0;
    while slot_issue < SKINNY_DEPTH - 1 {
        if s_issue < s_end {
            let group = if s_issue == s_begin || issue_cur.r == 0 { Some(issue_cur.g) } else { None };
            src.issue::<TF, NT>(&a, ring + slot_issue * Cfg::<TF, NT>::STEP, cb, lane, group);
            issue_cur.advance_within(16, gs);
        } else {
            cp_async_commit();
        }
        s_issue += 1;
        slot_issue += 1;
    }

    // The scale table, while the first steps are in flight.
    let table = block_base + Cfg::<TF, NT>::SH.table();
    st_shared_u16(table + 2 * tid, T::frac_table()[tid as usize % 256]);
    sync_threads();

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
            src.issue::<TF, NT>(&a, ring + slot_issue * Cfg::<TF, NT>::STEP, cb, lane, group);
            issue_cur.advance_within(16, gs);
        } else {
            cp_async_commit();
        }
        s_issue += 1;
        slot_issue = if slot_issue + 1 == SKINNY_DEPTH { 0 } else { slot_issue + 1 };
        let sb = ring + slot * Cfg::<TF, NT>::STEP;
        if s == s_begin || cur.r == 0 {
            decode_group::<T, TF, NT>(sb, table, lane, &mut rec);
        }
        compute_step::<T, TF, NT>(sb, lane, &mut acc, &rec);
        cur.advance_within(16, gs);
        slot = if slot + 1 == SKINNY_DEPTH { 0 } else { slot + 1 };
        s += 1;
    }
    cp_async_wait::<0>();
    sync_threads();

    // Warp partials → shared: acc[q][f] is columns 16q + g (c0, c1) and 16q + 8 + g (c2, c3),
    // tokens 8f + 2t (c0, c2) and 8f + 2t + 1 (c1, c3).
    let red = block_base + warp * Cfg::<TF, NT>::RED_WARP;
    unroll!(q < 8, {
        unroll!(f < 8, {
            if f < TF && q < 4 * NT {
                let (col, tok) = (16 * q as u32 + g, 8 * f as u32 + 2 * t);
                let at = |tk: u32, c: u32| red + (tk * Cfg::<TF, NT>::RED_STRIDE + c) * 4;
                st_shared_u32(at(tok, col), acc[q][f][0].to_bits());
                st_shared_u32(at(tok + 1, col), acc[q][f][1].to_bits());
                st_shared_u32(at(tok, col + 8), acc[q][f][2].to_bits());
                st_shared_u32(at(tok + 1, col + 8), acc[q][f][3].to_bits());
            }
        });
    });
    sync_threads();

    let (m, n) = (a.m, a.n);
    let rows = (m - m0).min(Cfg::<TF, NT>::SH.m_block());
    let col0 = cb * Cfg::<TF, NT>::NB;
    let pairs = Cfg::<TF, NT>::NB / 2;
    let mut it = tid;
    while it < rows * pairs {
        let (row, c) = (it / pairs, (it % pairs) * 2);
        let mut sum = [0f32; 2];
        unroll!(w < 8, {
            let v = ld_shared_f32x2(block_base + w as u32 * Cfg::<TF, NT>::RED_WARP + (row * Cfg::<TF, NT>::RED_STRIDE + c) * 4);
            sum[0] += v[0];
            sum[1] += v[1];
        });
        if a.splits == 1 {
            store_pair::<T>(a.y.ptr(), m0 + row, col0 + c, m, n, sum[0], sum[1]);
        } else {
            let at = (split as usize * m as usize + (m0 + row) as usize) * a.n_pad as usize + (col0 + c) as usize;
            *(a.ws.ptr().add(at) as *mut [f32; 2]) = sum;
        }
        it += W4A16_THREADS;
    }
    if a.splits > 1 {
        finish_split_k::<T>(&a, block_base + Cfg::<TF, NT>::SH.flag(), mblk * a.col_blocks + cb, m0, rows, col0, Cfg::<TF, NT>::NB, tid, W4A16_THREADS);
    }
}

macro_rules! instance {
    ($marker:ident, $name:ident, $t:ty, $tf:literal) => {
        forge_kernel_abi::w4a16_kernel! {
            /// See the module docs.
            $marker => fn $name(args) {
                skinny::<$t, $tf, { W4a16SkinnyShape::for_tf($tf).nt as usize }>(args)
            }
        }
    };
}

use super::mma::{Bf16, F16};
instance!(W4a16SkinnyBf16T1, w4a16_skinny_bf16_t1, Bf16, 1);
instance!(W4a16SkinnyBf16T2, w4a16_skinny_bf16_t2, Bf16, 2);
instance!(W4a16SkinnyBf16T4, w4a16_skinny_bf16_t4, Bf16, 4);
instance!(W4a16SkinnyBf16T8, w4a16_skinny_bf16_t8, Bf16, 8);
instance!(W4a16SkinnyF16T1, w4a16_skinny_f16_t1, F16, 1);
instance!(W4a16SkinnyF16T2, w4a16_skinny_f16_t2, F16, 2);
instance!(W4a16SkinnyF16T4, w4a16_skinny_f16_t4, F16, 4);
instance!(W4a16SkinnyF16T8, w4a16_skinny_f16_t8, F16, 8);
