//! The skinny W4A16 kernel's math (docs/kernels.md §6), apart from its copy pipeline
//! (`runtime/skinny.rs`): the record decoding, the per-step dequantization and mma, and the
//! block end.
//!
//! Thread mapping: `W` warps (8, or 16 in the `_t1_w16` instances and 12 in `_t{1,2}_w12`) on the
//! block's `64·nt` columns, each warp on its own `k` range; lane `(g, t) = (lane / 4,
//! lane % 4)` holds the mma fragments of columns `16q + g`, `16q + 8 + g` and tokens `8f + 2t`,
//! `8f + 2t + 1`.

use super::epilogue::{finish_split_k, store_pair};
use super::mma::{dequant_word, dequant_word8, Half};
use super::{cluster_arrive, cluster_wait, ld_cluster_f32x2};
use crate::device::{ld_shared_f32x2, ld_shared_u32, ld_shared_u32x4, shfl_idx_f32, st_shared_u32, sync_threads};
use forge_kernel_abi::runtime::{W4a16Args, W4a16SkinnyShape};

/// The records of a group for the block's `64·nt` columns, raw at shared address `recs`,
/// decoded into `rec` (this lane's columns `8r + g`). The four lanes of a quad need the same
/// columns, so each decodes a quarter of them (`r ≡ t mod 4`) and the quad trades the rest by
/// shuffles: a quarter of the decoding work.
///
/// # Safety
/// Every lane of the warp runs it; `recs` holds the `64·nt` raw records, `table` the scale
/// table ([`Half::frac_table`]).
#[inline(always)]
pub unsafe fn decode_group<T: Half, const NT: usize, const BITS: usize>(
    recs: u32,
    table: u32,
    lane: u32,
    rec: &mut [u64; 16],
) {
    let (g, t) = (lane / 4, lane % 4);
    let mut own = [0u64; 4];
    unroll!(q < 4, {
        if q < 2 * NT {
            let col = (4 * q as u32 + t) * 8 + g;
            let raw = ld_shared_u32(recs + col * 4);
            own[q] = if BITS == 8 { T::decode_record8_shared(raw, table) } else { T::decode_record_shared(raw, table) };
        }
    });
    trade_records::<NT>(&own, lane, rec);
}

/// [`decode_group`] from this lane's raw records `raw[q]` of columns `(4q + t)·8 + g`
/// (`q < 2·nt`), wherever they were loaded.
///
/// # Safety
/// As [`decode_group`].
#[inline(always)]
pub unsafe fn decode_records<T: Half, const NT: usize>(raw: [u32; 4], table: u32, lane: u32, rec: &mut [u64; 16]) {
    let mut own = [0u64; 4];
    unroll!(q < 4, {
        if q < 2 * NT {
            own[q] = T::decode_record_shared(raw[q], table);
        }
    });
    trade_records::<NT>(&own, lane, rec);
}

/// The quad's decoded records by shuffles: `own[q]` is this lane's column `(4q + t)·8 + g`,
/// `rec[4q + u]` becomes column `(4q + u)·8 + g`.
///
/// # Safety
/// Every lane of the warp runs it.
#[inline(always)]
unsafe fn trade_records<const NT: usize>(own: &[u64; 4], lane: u32, rec: &mut [u64; 16]) {
    let g = lane / 4;
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

/// One 16-deep step: per packed word of the `nt` tiles (the lane's 16 bytes of tile `j` at
/// `codes + j·tile_stride`; at 8 bits, of the one tile's half `j`), its dequantization and
/// `tf` mma against the `X` fragments `xb` (token `8f + g`: `k` `2t, 2t+1` and `2t+8, 2t+9`).
///
/// # Safety
/// Every lane of the warp runs it (`mma.sync`); the code addresses are 16-byte aligned shared
/// memory.
#[inline(always)]
pub unsafe fn step_mma<T: Half, const TF: usize, const NT: usize, const BITS: usize>(
    codes: u32,
    tile_stride: u32,
    xb: &[[u32; 2]; TF],
    acc: &mut [[[f32; 4]; TF]; 8],
    rec: &[u64; 16],
) {
    unroll!(j < 2, {
        if BITS == 8 {
            half_tile_mma8::<T, TF>(j, ld_shared_u32x4(codes + j as u32 * tile_stride), xb, acc, rec);
        } else if j < NT {
            words_mma::<T, TF, NT>(j, ld_shared_u32x4(codes + j as u32 * tile_stride), xb, acc, rec);
        }
    });
}

/// [`words_mma`] for half `h` of an 8-bit tile (one tile per warp): the lane's word `2u + c`
/// is column `16i + 8c + g`, `i = 2h + u`, its bytes 0–1 the A fragment's pair at `k` `2t,
/// 2t+1` and bytes 2–3 at `2t+8, 2t+9` (`forge_kernel_abi::runtime` docs).
///
/// # Safety
/// Every lane of the warp runs it (`mma.sync`).
#[inline(always)]
pub unsafe fn half_tile_mma8<T: Half, const TF: usize>(
    h: usize,
    words: [u32; 4],
    xb: &[[u32; 2]; TF],
    acc: &mut [[[f32; 4]; TF]; 8],
    rec: &[u64; 16],
) {
    unroll!(u < 2, {
        let i = 2 * h + u;
        // Rows g and g + 8 of the mma are columns 16i + g (rec[2i]) and 16i + 8 + g.
        let lo = dequant_word8::<T>(words[2 * u], rec[2 * i]);
        let hi = dequant_word8::<T>(words[2 * u + 1], rec[2 * i + 1]);
        mma_tokens::<T, TF>(&mut acc[i], &[lo[0], hi[0], lo[1], hi[1]], xb);
    });
}

/// [`step_mma`] for tile `j` from this lane's 16 bytes `words` of it, wherever they were
/// loaded.
///
/// # Safety
/// Every lane of the warp runs it (`mma.sync`).
#[inline(always)]
pub unsafe fn words_mma<T: Half, const TF: usize, const NT: usize>(
    j: usize,
    words: [u32; 4],
    xb: &[[u32; 2]; TF],
    acc: &mut [[[f32; 4]; TF]; 8],
    rec: &[u64; 16],
) {
    unroll!(i < 4, {
        // Word i: columns 16i + g (n8 half 2i) and 16i + 8 + g (half 2i + 1).
        let d = dequant_word::<T>(words[i], rec[8 * j + 2 * i], rec[8 * j + 2 * i + 1]);
        mma_tokens::<T, TF>(&mut acc[4 * j + i], &[d[0], d[2], d[1], d[3]], xb);
    });
}

/// One A fragment (16 columns × 16 `k`) against the `tf` token fragments `xb`, into the
/// columns' accumulators `acc[f]`.
///
/// # Safety
/// Every lane of the warp runs it (`mma.sync`).
#[inline(always)]
unsafe fn mma_tokens<T: Half, const TF: usize>(acc: &mut [[f32; 4]; TF], afrag: &[u32; 4], xb: &[[u32; 2]; TF]) {
    unroll!(f < 8, {
        if f < TF {
            T::mma(&mut acc[f], afrag, xb[f][0], xb[f][1]);
        }
    });
}

/// The block end: the warps' partials through shared memory at `red` (the rings, free
/// again), every thread adding one output pair's `W` warp partials in warp order, then `Y` (one
/// split), the split's f32 partial for [`finish_split_k`] (arrival flag at `flag`), or, in
/// cluster split-K, the block's partial at `red + partial()` for [`cluster_split_k`].
///
/// # Safety
/// Every thread of the block runs it after its last read of the rings and with no copy into
/// them in flight; `red` is the block's shared base, with [`W4a16SkinnyShape::reduce_bytes`]
/// bytes and then the partial, neither overlapping `flag`; the [`W4a16Args`] contract holds
/// for block `(mblk, cb, split)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block_end<T: Half, const TF: usize, const NT: usize, const W: usize>(
    a: &W4a16Args,
    red: u32,
    flag: u32,
    acc: &[[[f32; 4]; TF]; 8],
    (mblk, cb, split): (u32, u32, u32),
    tid: u32,
) {
    // The reduction's layout does not depend on the ring (slot steps, depth).
    let sh = W4a16SkinnyShape { tf: TF as u32, nt: NT as u32, warps: W as u32, ..W4a16SkinnyShape::for_tf(TF as u32) };
    let threads = sh.threads();
    let (m_block, nb, stride) = (sh.m_block(), sh.n_block(), sh.red_stride());
    let clustered = cfg!(feature = "hopper") && a.cluster != 0;
    let part = red + sh.partial();
    let red_warp = m_block * stride * 4;
    let (warp, lane) = (tid / 32, tid % 32);
    let (g, t) = (lane / 4, lane % 4);
    sync_threads();
    // acc[q][f] is columns 16q + g (c0, c1) and 16q + 8 + g (c2, c3), tokens 8f + 2t (c0, c2)
    // and 8f + 2t + 1 (c1, c3).
    let mine = red + warp * red_warp;
    unroll!(q < 8, {
        unroll!(f < 8, {
            if f < TF && q < 4 * NT {
                let (col, tok) = (16 * q as u32 + g, 8 * f as u32 + 2 * t);
                let at = |tk: u32, c: u32| mine + (tk * stride + c) * 4;
                st_shared_u32(at(tok, col), acc[q][f][0].to_bits());
                st_shared_u32(at(tok + 1, col), acc[q][f][1].to_bits());
                st_shared_u32(at(tok, col + 8), acc[q][f][2].to_bits());
                st_shared_u32(at(tok + 1, col + 8), acc[q][f][3].to_bits());
            }
        });
    });
    sync_threads();

    let (m, n) = (a.m, a.n);
    let m0 = mblk * m_block;
    let rows = (m - m0).min(m_block);
    let col0 = cb * nb;
    let pairs = nb / 2;
    let mut it = tid;
    while it < rows * pairs {
        let (row, c) = (it / pairs, (it % pairs) * 2);
        let mut sum = [0f32; 2];
        unroll!(w < 16, {
            if w < W {
                let v = ld_shared_f32x2(red + w as u32 * red_warp + (row * stride + c) * 4);
                sum[0] += v[0];
                sum[1] += v[1];
            }
        });
        if a.splits == 1 {
            store_pair::<T>(a.y.ptr(), m0 + row, col0 + c, m, n, sum[0], sum[1]);
        } else if clustered {
            let at = part + (row * nb + c) * 4;
            st_shared_u32(at, sum[0].to_bits());
            st_shared_u32(at + 4, sum[1].to_bits());
        } else {
            let at = (split as usize * m as usize + (m0 + row) as usize) * a.n_pad as usize + (col0 + c) as usize;
            *(a.ws.ptr().add(at) as *mut [f32; 2]) = sum;
        }
        it += threads;
    }
    if a.splits > 1 && clustered {
        cluster_split_k::<T>(a, part, split, m0, rows, col0, nb, tid, threads);
    } else if a.splits > 1 {
        finish_split_k::<T>(a, flag, mblk * a.col_blocks + cb, m0, rows, col0, nb, tid, threads);
    }
}

/// Cluster split-K: the `splits` blocks of the tile (one cluster, block rank = split) have
/// each put their partial at shared offset `part` (`[rows][nb]` f32); split `p` adds the
/// partials of its share of the output pairs in split order, from 0 (the order, and so the
/// bits, of [`finish_split_k`]), and writes `Y`. No workspace, no counter, no global round
/// trip. The last barrier keeps every block's shared memory alive until all have read it.
///
/// # Safety
/// Every thread of every block of the cluster calls it, after its block's stores to `part`;
/// the [`W4a16Args`] contract holds with `cluster = 1` and `splits ≤ 16`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn cluster_split_k<T: Half>(
    a: &W4a16Args,
    part: u32,
    split: u32,
    m0: u32,
    rows: u32,
    col0: u32,
    nb: u32,
    tid: u32,
    threads: u32,
) {
    cluster_arrive();
    cluster_wait();
    let pairs = nb / 2;
    let items = rows * pairs;
    let share = items.div_ceil(a.splits);
    let end = items.min((split + 1) * share);
    let mut it = split * share + tid;
    while it < end {
        let (row, c) = (it / pairs, (it % pairs) * 2);
        let at = part + (row * nb + c) * 4;
        // All loads in flight, then the additions in split order.
        let mut v = [[0f32; 2]; 16];
        unroll!(p < 16, {
            if (p as u32) < a.splits {
                v[p] = ld_cluster_f32x2(at, p as u32);
            }
        });
        let mut sum = [0f32; 2];
        unroll!(p < 16, {
            if (p as u32) < a.splits {
                sum[0] += v[p][0];
                sum[1] += v[p][1];
            }
        });
        store_pair::<T>(a.y.ptr(), m0 + row, col0 + c, a.m, a.n, sum[0], sum[1]);
        it += threads;
    }
    cluster_arrive();
    cluster_wait();
}

/// Warp `warp` (of `warps`) of split `split`'s contiguous range of 16-deep steps `[begin, end)`,
/// in whole slots of `steps` steps (`k_pad` is a multiple of `16·steps`).
#[inline(always)]
pub fn warp_steps(k_pad: u32, split: u32, splits: u32, warp: u32, warps: u32, steps: u32) -> (u32, u32) {
    let slots = k_pad / (16 * steps);
    let parts = splits as u64 * warps as u64;
    let part = split as u64 * warps as u64 + warp as u64;
    // Two-step slots: 32-bit division where the products fit (every real layer), as the
    // 64-bit one is a subroutine call on the path to the warp's first load (H200, M = 1, two
    // runs of the 12-warp ring version: 0.6–4.6 % faster; in the other instances it moved ptxas's
    // register allocation and ran up to 2.6 % slower, `t8` at M = 64, so they keep the
    // 64-bit path).
    if steps > 1 && parts * slots as u64 <= u32::MAX as u64 {
        let at = |p: u32| p * slots / (parts as u32).max(1) * steps;
        return (at(part as u32), at(part as u32 + 1));
    }
    let at = |p: u64| (p * slots as u64 / parts) as u32 * steps;
    (at(part), at(part + 1))
}
