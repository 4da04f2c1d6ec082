//! `w4_dequant_{bf16,f16}`: the dense weight `wd[n, k]` (row-major `[n, k]`) from a packed
//! W4A16 weight, rounded exactly as the matmul rounds it (the same [`dequant_word`]), for the
//! large-`M` path that hands the product to cuBLAS.
//!
//! `w8_dequant_{bf16,f16}`: the same from 8-bit tiles.
//!
//! Thread mapping: block `b` takes packed `n` tile `b / (k_pad/128)` (64 rows of `wd`) and the
//! 8 consecutive `k` tiles `(b mod (k_pad/128))·8 ..` (128 columns); warp `w` dequantizes `k`
//! tile `w`, lane `l` its 16-byte chunk (32 codes: rows `16i + l/4 (+8)`, columns
//! `2·(l mod 4) (+8)`; at 8 bits a 16-byte chunk of each half of the tile, 16 codes each) into
//! 16 pairs, stored to a shared `[64][128]` tile. After one barrier
//! the block writes the tile's 64 rows as 16-byte chunks, 16 lanes per 256-byte row segment.
//! Why the shared tile: a lane's pairs are 4-byte pieces of 8 rows; stored directly, each
//! warp store would touch 8 rows with 16 bytes each (the earlier version, ~1.7 TB/s).
//!
//! # Safety (upheld by the host launcher)
//! As documented on [`forge_kernel_abi::runtime::W4DequantArgs`]; grid
//! `(n_pad/64)·(k_pad/128)` blocks of 256 threads, [`DEQUANT_SHARED_BYTES`] of dynamic
//! shared memory.

use super::mma::{dequant_word, dequant_word8, Bf16, Half, F16};
use crate::device::{block_x, ld_shared_u32x4, shared_window_base, st_shared_u32, sync_threads, thread_x};
use forge_kernel_abi::runtime::{W4DequantArgs, DEQUANT_ROW_BYTES};

#[repr(C, align(16))]
struct Words([u32; 4]);

#[inline(always)]
unsafe fn dequant<T: Half, const BITS: usize>(a: W4DequantArgs) {
    let tid = thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let kb_total = (a.k_pad / 128).max(1);
    let (nt, kb) = (block_x() / kb_total, block_x() % kb_total);
    let kt = kb * 8 + warp;
    let kt_total = a.k_pad / 16;
    let tile_words = 128 * BITS / 4;
    let tile = (nt as usize * kt_total as usize + kt as usize) * tile_words;
    let g = kt * 16 / a.gs.max(1);
    let rec = |c: u32| *a.meta.ptr().add(g as usize * a.n_pad as usize + (nt * 64 + c) as usize);
    let sh = shared_window_base();
    // Shared tile [64 rows][128 columns] of 16-bit values, rows padded (DEQUANT_ROW_BYTES)
    // so the 32 lanes' 4-byte stores (8 rows × 4 column pairs) fall on 32 banks.
    let put = |row: u32, col: u32, pair: u32| st_shared_u32(sh + row * DEQUANT_ROW_BYTES + col * 2, pair);
    let (r0, c0) = (lane / 4, warp * 16 + 2 * (lane % 4));
    if BITS == 8 {
        // Half h of the tile: the lane's word 2u + c is row 16(2h + u) + 8c + r0, at columns
        // c0, c0 + 1 (bytes 0–1) and c0 + 8, c0 + 9 (bytes 2–3).
        unroll!(h < 2, {
            let words = (*(a.w.ptr().add(tile + 128 * h + lane as usize * 4) as *const Words)).0;
            unroll!(u < 2, {
                unroll!(c < 2, {
                    let row = 16 * (2 * h + u) as u32 + 8 * c as u32 + r0;
                    let b = dequant_word8::<T>(words[2 * u + c], T::decode_record8(rec(row)));
                    put(row, c0, b[0]);
                    put(row, c0 + 8, b[1]);
                });
            });
        });
    } else {
        let words = (*(a.w.ptr().add(tile + lane as usize * 4) as *const Words)).0;
        let mut i = 0;
        while i < 4 {
            let b = dequant_word::<T>(
                words[i as usize],
                T::decode_record(rec(16 * i + r0)),
                T::decode_record(rec(16 * i + 8 + r0)),
            );
            put(16 * i + r0, c0, b[0]);
            put(16 * i + r0, c0 + 8, b[1]);
            put(16 * i + 8 + r0, c0, b[2]);
            put(16 * i + 8 + r0, c0 + 8, b[3]);
            i += 1;
        }
    }
    sync_threads();
    // 64 rows × 16 chunks of 16 bytes; chunk `tid + 256j`.
    let mut c = tid;
    while c < 64 * 16 {
        let (row, ch) = (c / 16, c % 16);
        let (n, k) = (nt * 64 + row, kb * 128 + ch * 8);
        if n < a.n && k < a.k {
            let v = ld_shared_u32x4(sh + row * DEQUANT_ROW_BYTES + ch * 16);
            // 16-byte aligned: k % 8 == 0 (the launch contract) and k is a multiple of 8.
            let at = a.wd.ptr().add(n as usize * a.k as usize + k as usize);
            *(at as *mut Words) = Words(v);
        }
        c += 256;
    }
}

forge_kernel_abi::w4_dequant_kernel! {
    /// See the module docs.
    W4DequantBf16 => fn w4_dequant_bf16(args) { dequant::<Bf16, 4>(args) }
}
forge_kernel_abi::w4_dequant_kernel! {
    /// See the module docs.
    W4DequantF16 => fn w4_dequant_f16(args) { dequant::<F16, 4>(args) }
}
forge_kernel_abi::w4_dequant_kernel! {
    /// See the module docs (8-bit tiles).
    W8DequantBf16 => fn w8_dequant_bf16(args) { dequant::<Bf16, 8>(args) }
}
forge_kernel_abi::w4_dequant_kernel! {
    /// See the module docs (8-bit tiles).
    W8DequantF16 => fn w8_dequant_f16(args) { dequant::<F16, 8>(args) }
}
