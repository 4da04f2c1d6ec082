//! `w4_dequant_{bf16,f16}`: the dense weight `wd[n, k]` (row-major `[n, k]`) from a packed
//! W4A16 weight, rounded exactly as the matmul rounds it (the same [`dequant_word`]), for the
//! large-`M` path that hands the product to cuBLAS.
//!
//! Thread mapping: one thread per 16-byte lane chunk of a packed tile (32 codes: rows
//! `2·(l mod 4) + {0, 1, 8, 9}` of columns `8t + l/4`, `t` 0..8), grid-stride; eight records
//! decoded per thread (one per column), pairs of adjacent `k` stored as one 32-bit word.
//!
//! # Safety (upheld by the host launcher)
//! As documented on [`forge_kernel_abi::runtime::W4DequantArgs`].

use super::mma::{dequant_word, Bf16, Half, F16};
use crate::device::{block_dim_x, global_x, grid_dim_x};
use forge_kernel_abi::runtime::W4DequantArgs;

#[repr(C, align(16))]
struct Words([u32; 4]);

#[inline(always)]
unsafe fn dequant<T: Half>(a: W4DequantArgs) {
    let kt_total = ((a.k_pad / 16) as usize).max(1);
    let chunks = (a.n_pad / 64) as usize * kt_total * 32;
    let stride = (block_dim_x() * grid_dim_x()) as usize;
    let mut c = global_x() as usize;
    while c < chunks {
        let lane = (c % 32) as u32;
        let tile = c / 32;
        let (nt, kt) = ((tile / kt_total) as u32, (tile % kt_total) as u32);
        let words = (*(a.w.ptr().add(c * 4) as *const Words)).0;
        let k0 = kt * 16 + 2 * (lane % 4);
        let g = kt * 16 / a.gs.max(1);
        let rec = |t: u32| *a.meta.ptr().add(g as usize * a.n_pad as usize + (nt * 64 + 8 * t + lane / 4) as usize);
        // Written out so `words` stays in registers.
        let word = |i: u32, w: u32| {
            let b = dequant_word::<T>(w, T::decode_record(rec(2 * i)), T::decode_record(rec(2 * i + 1)));
            let n0 = nt * 64 + 16 * i + lane / 4;
            store(&a, n0, k0, b[0]);
            store(&a, n0, k0 + 8, b[1]);
            store(&a, n0 + 8, k0, b[2]);
            store(&a, n0 + 8, k0 + 8, b[3]);
        };
        word(0, words[0]);
        word(1, words[1]);
        word(2, words[2]);
        word(3, words[3]);
        c += stride;
    }
}

/// `wd[n, k..k+2]`, the parts inside `n × k`.
#[inline(always)]
unsafe fn store(a: &W4DequantArgs, n: u32, k: u32, pair: u32) {
    if n >= a.n || k >= a.k {
        return;
    }
    let at = a.wd.ptr().add(n as usize * a.k as usize + k as usize);
    if k + 1 < a.k && a.k.is_multiple_of(2) {
        *(at as *mut u32) = pair;
    } else {
        *at = pair as u16;
        if k + 1 < a.k {
            *at.add(1) = (pair >> 16) as u16;
        }
    }
}

forge_kernel_abi::w4_dequant_kernel! {
    /// See the module docs.
    W4DequantBf16 => fn w4_dequant_bf16(args) { dequant::<Bf16>(args) }
}
forge_kernel_abi::w4_dequant_kernel! {
    /// See the module docs.
    W4DequantF16 => fn w4_dequant_f16(args) { dequant::<F16>(args) }
}
