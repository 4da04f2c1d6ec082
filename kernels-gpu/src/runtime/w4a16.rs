//! `w4a16_{bf16,f16}_m{1,2,3,4}`: `Y[M, N] = X[M, K] · dequant(W)[N, K]ᵀ` on tensor cores,
//! qmeta4 records decoded on the fly (docs/kernels.md §6; the packed layout is
//! `forge_kernel_abi::runtime`'s module docs).
//!
//! Block: 256 threads = `wn` warps along `n` (64 output columns each) × `wk` warps along `k`,
//! an output tile of `16·mb` rows × `64·wn` columns, and a contiguous range of `k` stages (its
//! split). Per stage, one `cp.async` group brings the codes (`wn·ksteps` packed tiles, two
//! 16-byte copies per thread), the `X` tile (rows past `M` and columns past `K` zero-filled,
//! 16-byte chunks XOR-swizzled by row so `ldmatrix` is conflict-free) and the raw records of
//! the NEXT stage; `stages − 1` stages are in flight. One barrier per stage, after which every
//! thread (a) issues the stage `stages − 1` ahead, (b) decodes the next stage's records
//! (scale → 16-bit via the shared numerics' table, `−(MAGIC + zero)`) into the other of two
//! decoded buffers, and (c) runs its warp's `ksteps / wk` consecutive 16-deep steps: one
//! 16-byte shared load of codes per step (32 codes, the B fragments of 8 n8-tiles), an
//! `ldmatrix.x4` of `X` per 16 rows, dequantization in packed 16-bit FMAs, `8·mb` mma.
//!
//! End: the `wk` warps of a column add their accumulators in shared memory in a fixed order.
//! With one split the block writes `Y`; with several, each writes its f32 partial tile (rows
//! `< M`) to `ws[split]` and [`finish_split_k`] lets the last block to arrive add them in split
//! order. No block waits for another, so any residency works.
//!
//! # Safety (upheld by the host launcher)
//! As documented on [`forge_kernel_abi::runtime::W4a16Args`].

use super::epilogue::{finish_split_k, store_pair};
use super::{block_place, GroupCursor};
use super::mma::{cp_async_16, cp_async_16_zfill, dequant_word, ldmatrix_x4, Half};
use crate::device::{
    cp_async_commit, cp_async_wait, ld_shared_u32, ld_shared_u32x4, shared_window_base, st_shared_u32,
    st_shared_u64, sync_threads, thread_x,
};
use forge_kernel_abi::runtime::{W4a16Args, W4a16Shape, DEC_Q_STRIDE, PACK_TILE_BYTES, W4A16_STAGES, W4A16_THREADS};

/// Compile-time shape of the `mb` instance.
struct Cfg<const MB: usize>;

impl<const MB: usize> Cfg<MB> {
    const SH: W4a16Shape = W4a16Shape::for_mb(MB as u32);
    const WN: u32 = Self::SH.wn;
    const KSTEPS: u32 = Self::SH.ksteps;
    const STAGES: u32 = Self::SH.stages;
    const NB: u32 = Self::SH.n_block();
    const KS: u32 = Self::SH.k_stage();
    const GMAX: u32 = Self::SH.max_groups_per_stage();
    /// Consecutive 16-deep steps of a stage per warp.
    const SPW: u32 = Self::SH.ksteps / Self::SH.wk;
    /// 16-byte chunks per row of the `X` tile.
    const CPR: u32 = Self::KS / 8;
    const ROW_BYTES: u32 = Self::KS * 2;
    const A_CHUNKS: u32 = Self::SH.m_block() * Self::CPR;
}

/// Issues one stage's codes and `X` tile into pipeline slot `stage_base`.
#[inline(always)]
unsafe fn issue_stage<const MB: usize>(
    a: &W4a16Args,
    stage_base: u32,
    s: u32,
    cb: u32,
    m0: u32,
    tid: u32,
    kt_total: u32,
) {
    let w = a.w.ptr() as *const u8;
    // Codes: per `wn`, `ksteps` consecutive tiles are contiguous in the packed layout.
    let per_wn = Cfg::<MB>::KSTEPS * 32;
    let mut r = 0;
    while r < 2 {
        let c = tid + r * W4A16_THREADS;
        let (wnc, rem) = (c / per_wn, c % per_wn);
        let nt = cb * Cfg::<MB>::WN + wnc;
        let tile = nt as usize * kt_total as usize + (s * Cfg::<MB>::KSTEPS) as usize;
        let src = w.add(tile * PACK_TILE_BYTES as usize + rem as usize * 16);
        cp_async_16(stage_base + c * 16, src);
        r += 1;
    }
    // X tile: 16-byte chunks (8 values), zero-filled past M and K (K is a multiple of 8).
    let x = a.x.ptr() as *const u8;
    let a_base = stage_base + Cfg::<MB>::SH.layout().a;
    let mut c = tid;
    while c < Cfg::<MB>::A_CHUNKS {
        let (row, ch) = (c / Cfg::<MB>::CPR, c % Cfg::<MB>::CPR);
        let m = m0 + row;
        let kk = s * Cfg::<MB>::KS + ch * 8;
        let valid = m < a.m && kk < a.k;
        let src = if valid { x.add((m as usize * a.k as usize + kk as usize) * 2) } else { x };
        let dst = a_base + row * Cfg::<MB>::ROW_BYTES + ((ch ^ (row & 7)) * 16);
        cp_async_16_zfill(dst, src, if valid { 16 } else { 0 });
        c += W4A16_THREADS;
    }
}

/// Issues the raw records of the stage at cursor `cur` (its `groups` groups × the block's
/// columns) to `dst`.
#[inline(always)]
unsafe fn issue_records<const MB: usize>(a: &W4a16Args, dst: u32, cur: GroupCursor, groups: u32, cb: u32, tid: u32) {
    let chunks_per_group = Cfg::<MB>::NB / 4;
    if tid < Cfg::<MB>::GMAX * chunks_per_group {
        let (gi, cc) = (tid / chunks_per_group, tid % chunks_per_group);
        if gi < groups {
            let rec = (cur.g + gi) as usize * a.n_pad as usize + (cb * Cfg::<MB>::NB + cc * 4) as usize;
            cp_async_16(dst + (gi * Cfg::<MB>::NB + cc * 4) * 4, a.meta.ptr().add(rec) as *const u8);
        }
    }
}

/// Decodes `groups × NB` raw records at `raw` into `dec` (see [`Half::decode_record`]), column
/// `wn·64 + 8t + q` of group slot `gi` at u64 `(gi·WN + wn)·8·DEC_Q_STRIDE + q·DEC_Q_STRIDE + t`.
#[inline(always)]
unsafe fn decode_records<T: Half, const MB: usize>(raw: u32, dec: u32, groups: u32, tid: u32) {
    let n = groups * Cfg::<MB>::NB;
    let mut e = tid;
    while e < n {
        let (gi, col) = (e / Cfg::<MB>::NB, e % Cfg::<MB>::NB);
        let (wn, t, q) = (col / 64, (col / 8) % 8, col % 8);
        let at = ((gi * Cfg::<MB>::WN + wn) * 8 + q) * DEC_Q_STRIDE + t;
        st_shared_u64(dec + at * 8, T::decode_record(ld_shared_u32(raw + e * 4)));
        e += W4A16_THREADS;
    }
}

/// See the module docs.
#[inline(always)]
pub unsafe fn w4a16<T: Half, const MB: usize>(a: W4a16Args) {
    let lay = Cfg::<MB>::SH.layout();
    let (nb, ks_len, stages) = (Cfg::<MB>::NB, Cfg::<MB>::KS, Cfg::<MB>::STAGES);
    let tid = thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let (wn, kw) = (warp % Cfg::<MB>::WN, warp / Cfg::<MB>::WN);

    let (mblk, cb, split, splits) = block_place(&a);
    let m0 = mblk * 16 * MB as u32;
    let total_stages = a.k_pad / ks_len;
    let s_begin = split * total_stages / splits;
    let s_end = (split + 1) * total_stages / splits;
    let kt_total = a.k_pad / 16;
    let gs = a.gs.max(1);

    let base = shared_window_base();
    let slot_base = |s: u32| base + ((s - s_begin) % stages) * lay.stage_bytes;
    let dec_base = |s: u32| base + lay.dec + ((s - s_begin) & 1) * Cfg::<MB>::SH.dec_bytes();

    // Cursors: stage being computed, next stage to issue (its records go with the stage
    // before it), next stage to decode.
    let mut cur = GroupCursor::at(s_begin * ks_len, gs);
    let mut dec_cur = cur;

    // Prologue: stage s_begin's records alone, then stages s_begin .. s_begin + stages − 1
    // (each with the records of the stage after it).
    // (An empty split issues nothing: its first stage may lie past the last group.)
    let first_groups = if s_begin < s_end { cur.groups_in(ks_len, gs, a.g_pad) } else { 0 };
    issue_records::<MB>(&a, base + lay.raw0, cur, first_groups, cb, tid);
    cp_async_commit();
    let mut issue_cur = cur; // cursor of the stage whose records the next issue carries, minus one
    let mut s_issue = s_begin;
    let mut i = 0;
    while i < stages - 1 {
        if s_issue < s_end {
            let sb = slot_base(s_issue);
            issue_stage::<MB>(&a, sb, s_issue, cb, m0, tid, kt_total);
            issue_cur.advance(ks_len, gs);
            if s_issue + 1 < s_end {
                issue_records::<MB>(&a, sb + lay.raw, issue_cur, issue_cur.groups_in(ks_len, gs, a.g_pad), cb, tid);
            }
        }
        cp_async_commit();
        s_issue += 1;
        i += 1;
    }
    cp_async_wait::<{ W4A16_STAGES - 1 }>();
    sync_threads();
    decode_records::<T, MB>(base + lay.raw0, dec_base(s_begin), first_groups, tid);

    let mut acc = [[[0f32; 4]; 8]; MB];
    let mut s = s_begin;
    while s < s_end {
        cp_async_wait::<{ W4A16_STAGES - 2 }>();
        sync_threads();
        // (a) the stage `stages − 1` ahead, into the slot stage s − 1 freed.
        if s_issue < s_end {
            let sb = slot_base(s_issue);
            issue_stage::<MB>(&a, sb, s_issue, cb, m0, tid, kt_total);
            issue_cur.advance(ks_len, gs);
            if s_issue + 1 < s_end {
                issue_records::<MB>(&a, sb + lay.raw, issue_cur, issue_cur.groups_in(ks_len, gs, a.g_pad), cb, tid);
            }
        }
        cp_async_commit();
        s_issue += 1;
        // (b) records of stage s + 1 (they came with stage s) into the other decoded buffer.
        if s + 1 < s_end {
            dec_cur.advance(ks_len, gs);
            let groups = dec_cur.groups_in(ks_len, gs, a.g_pad);
            decode_records::<T, MB>(slot_base(s) + lay.raw, dec_base(s + 1), groups, tid);
        }
        // (c) this warp's steps of stage s.
        let sb = slot_base(s);
        let dec = dec_base(s);
        unroll!(step < 2, {
            if (step as u32) < Cfg::<MB>::SPW {
                let ks = kw * Cfg::<MB>::SPW + step as u32;
                // Group of this step, relative to the stage's first group.
                let mut o = cur.r + ks * 16;
                let mut gslot = 0;
                while o >= gs {
                    o -= gs;
                    gslot += 1;
                }
                // This lane's 8 columns' records, two per 16-byte load.
                let recs = dec + ((gslot * Cfg::<MB>::WN + wn) * 8 + lane / 4) * DEC_Q_STRIDE * 8;
                let words = ld_shared_u32x4(sb + lay.b + (wn * Cfg::<MB>::KSTEPS + ks) * PACK_TILE_BYTES + lane * 16);
                let mut afrag = [[0u32; 4]; MB];
                unroll!(mb < 4, {
                    if mb < MB {
                        let row = mb as u32 * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
                        let ch = ks * 2 + (lane >> 4);
                        afrag[mb] = ldmatrix_x4(sb + lay.a + row * Cfg::<MB>::ROW_BYTES + ((ch ^ (row & 7)) * 16));
                    }
                });
                unroll!(wi < 4, {
                    let sz = ld_shared_u32x4(recs + 16 * wi as u32);
                    let sz0 = sz[0] as u64 | ((sz[1] as u64) << 32);
                    let sz1 = sz[2] as u64 | ((sz[3] as u64) << 32);
                    let b = dequant_word::<T>(words[wi], sz0, sz1);
                    unroll!(mb < 4, {
                        if mb < MB {
                            T::mma(&mut acc[mb][2 * wi], &afrag[mb], b[0], b[1]);
                            T::mma(&mut acc[mb][2 * wi + 1], &afrag[mb], b[2], b[3]);
                        }
                    });
                });
            }
        });
        cur.advance(ks_len, gs);
        s += 1;
    }
    cp_async_wait::<0>();
    sync_threads();

    // The k-warps of each column add up in shared memory, in kw order.
    let regs = (MB * 32) as u32;
    let red = |kwi: u32| base + ((kwi - 1) * Cfg::<MB>::WN + wn) * regs * 32 * 4;
    if kw > 0 {
        let at = red(kw);
        unroll!(mb < 4, {
            if mb < MB {
                unroll!(t < 8, {
                    unroll!(c < 4, {
                        let r = ((mb * 8 + t) * 4 + c) as u32;
                        st_shared_u32(at + (r * 32 + lane) * 4, acc[mb][t][c].to_bits());
                    });
                });
            }
        });
    }
    sync_threads();
    if kw == 0 {
        let mut kwi = 1;
        while kwi < Cfg::<MB>::SH.wk {
            let at = red(kwi);
            unroll!(mb < 4, {
                if mb < MB {
                    unroll!(t < 8, {
                        unroll!(c < 4, {
                            let r = ((mb * 8 + t) * 4 + c) as u32;
                            acc[mb][t][c] += f32::from_bits(ld_shared_u32(at + (r * 32 + lane) * 4));
                        });
                    });
                }
            });
            kwi += 1;
        }
    }

    let (m, n) = (a.m, a.n);
    let y = a.y.ptr();
    let col_base = cb * nb + wn * 64 + 2 * (lane % 4);
    if a.splits == 1 {
        if kw == 0 {
            unroll!(mb < 4, {
                if mb < MB {
                    unroll!(t < 8, {
                        let col = col_base + 8 * t as u32;
                        unroll!(h < 2, {
                            let row = m0 + mb as u32 * 16 + lane / 4 + 8 * h as u32;
                            store_pair::<T>(y, row, col, m, n, acc[mb][t][2 * h], acc[mb][t][2 * h + 1]);
                        });
                    });
                }
            });
        }
        return;
    }

    // Split-K: partial tile to ws[split], then the last block to arrive reduces.
    let ws = a.ws.ptr();
    if kw == 0 {
        unroll!(mb < 4, {
            if mb < MB {
                unroll!(t < 8, {
                    let col = col_base + 8 * t as u32;
                    unroll!(h < 2, {
                        let row = m0 + mb as u32 * 16 + lane / 4 + 8 * h as u32;
                        if row < m {
                            let at =
                                ws.add((split as usize * m as usize + row as usize) * a.n_pad as usize + col as usize);
                            *(at as *mut [f32; 2]) = [acc[mb][t][2 * h], acc[mb][t][2 * h + 1]];
                        }
                    });
                });
            }
        });
    }
    let rows = (m - m0).min(16 * MB as u32);
    finish_split_k::<T>(&a, base + lay.flag, mblk * a.col_blocks + cb, m0, rows, cb * nb, nb, tid, W4A16_THREADS);
}

macro_rules! instance {
    ($marker:ident, $name:ident, $t:ty, $mb:literal) => {
        forge_kernel_abi::w4a16_kernel! {
            /// See the module docs.
            $marker => fn $name(args) { w4a16::<$t, $mb>(args) }
        }
    };
}

use super::mma::{Bf16, F16};
instance!(W4a16Bf16M1, w4a16_bf16_m1, Bf16, 1);
instance!(W4a16Bf16M2, w4a16_bf16_m2, Bf16, 2);
instance!(W4a16Bf16M3, w4a16_bf16_m3, Bf16, 3);
instance!(W4a16Bf16M4, w4a16_bf16_m4, Bf16, 4);
instance!(W4a16F16M1, w4a16_f16_m1, F16, 1);
instance!(W4a16F16M2, w4a16_f16_m2, F16, 2);
instance!(W4a16F16M3, w4a16_f16_m3, F16, 3);
instance!(W4a16F16M4, w4a16_f16_m4, F16, 4);
