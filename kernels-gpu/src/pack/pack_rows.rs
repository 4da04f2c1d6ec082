//! `pack_rows` / `pack_rows_transposed`: u8 codes `(rows, cols)` → every row packed as a
//! dense little-endian bit stream (element `i` at stream bits `[i·b, i·b + b)`, stream bit `k`
//! in bit `k mod 32` of word `k / 32`, each row starting a new word, unused high bits 0):
//! `w_row = ceil(cols·b/32)` words per row, bit for bit `src/pack/cpu.rs`'s `pack_rows`.
//! `pack_rows` stores them `(rows, w_row)` (compressed-tensors `weight_packed`, qmeta4-native
//! `qweight_packed`); `pack_rows_transposed` stores `(w_row, rows)` (GPTQ `qweight`, which is
//! `pack_cols(codesᵀ)`: the same streams, output axis contiguous; GPTQ's 3-bit
//! "10 | 1 | 10 | 1 | 10" words are this stream).
//!
//! Thread mapping. 32 codes fill exactly `b` words, so a row is cut into chunks of 32 codes
//! (the last may be short) and a thread packs one chunk. A block of `PACK_THREADS` (256)
//! threads owns a tile of `R = 256 / K` rows × `K` chunks (`K = tile_chunks` ∈ {1, 2, 4, 8},
//! chosen by the host so short rows waste no threads); tiles are dealt to blocks grid-stride.
//! Per tile, three phases separated by barriers, all global traffic coalesced:
//! 1. stage: each tile row's code bytes (`≤ 32·K`, contiguous in global memory) are copied to
//!    shared memory in 16-byte aligned pieces, one 16-byte load per piece (byte loads only for
//!    a piece that crosses the end of the codes); consecutive threads take consecutive pieces;
//! 2. pack: thread `t` = (row `t / K`, chunk `t % K`) reads its 32 codes from shared memory
//!    (two 16-byte loads when the chunk is 16-byte aligned, else nine words and a funnel
//!    shift), zeroes codes past the row's end, checks every code `< 2^b`, and ORs them into
//!    `b` registers with compile-time shifts (the bit width is a const parameter; 7
//!    specialisations per layout). The words go to a shared word tile (one word of padding per
//!    line: conflict-free for b = 2, 4, 8);
//! 3. write: the tile's words leave in the output's order, consecutive threads on consecutive
//!    addresses: `pack_rows` row by row (`b·K` words per tile row), `pack_rows_transposed`
//!    word line by word line (`R ≥ 32` consecutive rows, 128 bytes and more per warp).
//!
//! `pack_rows_direct` / `pack_rows_transposed_direct` (rows a whole number of 32-code chunks,
//! every real layer): no tile and no shared memory. Thread = one chunk, grid-stride. Row
//! layout: chunk fastest (a warp reads 1 KiB and writes `128·b` contiguous bytes, each thread
//! its `b` words in 16- or 8-byte stores where `b` allows). Transposed layout: a warp takes
//! 8 rows × 4 chunks, lane = 4·row + chunk, when the row has a multiple of 4 chunks (it reads
//! eight whole 128-byte lines and writes 32-byte runs of each word line), else row fastest.
//!
//! An out-of-range code is reported through `first_bad` (`!index` under an atomic max: the
//! smallest flat index) and masked to `b` bits, so it cannot corrupt its neighbours.
//!
//! # Safety (upheld by the host launcher)
//! `codes` holds `rows·cols` bytes and is 16-byte aligned (the direct kernels: `cols` is a
//! multiple of 32, so every chunk is 16-byte aligned, and `words` is 16-byte aligned); `words` has room for
//! `rows·ceil(cols·bits/32)` u32; `first_bad` is one u64; `bits ∈ 2..=8`;
//! `tile_chunks ∈ {1, 2, 4, 8}`; the block has `PACK_THREADS` threads and the launch
//! `PackSharedLayout::new(bits, tile_chunks, transposed).total` bytes of dynamic shared memory.

use crate::device::{
    atomic_max_u64_global, block_x, grid_dim_x, ld_shared_u32, ld_shared_u32x4, shared_window_base, st_shared_u32,
    st_shared_u32x4, sync_threads, thread_x,
};
use core::num::NonZeroU64;
use forge_kernel_abi::pack::{PackArgs, PackSharedLayout, PACK_THREADS};

#[repr(C, align(16))]
struct Bytes16([u32; 4]);

#[repr(C, align(8))]
struct Bytes8([u32; 2]);

/// Applies `$body` for each listed `$i` as straight-line code, so register arrays are only
/// ever indexed by constants (a runtime index would move them to local memory).
macro_rules! unroll {
    ($i:ident in [$($n:literal)*] => $body:block) => {
        $( { let $i: u32 = $n; $body } )*
    };
}

/// [`unroll!`] over 0..32.
macro_rules! unroll32 {
    ($i:ident => $body:block) => {
        unroll!($i in [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31] => $body)
    };
}

/// 32 codes (four per word, lowest byte first) → `B` words of the dense stream.
#[inline(always)]
fn pack32<const B: u32>(v: &[u32; 8]) -> [u32; 8] {
    let mut out = [0u32; 8];
    unroll32!(i => {
        let code = (v[(i / 4) as usize] >> (8 * (i % 4))) & 0xff;
        let bit = i * B;
        let (w, sh) = ((bit / 32) as usize, bit % 32);
        out[w] |= code << sh;
        if sh + B > 32 {
            // The code straddles into the next word (3, 5, 6, 7 bits).
            out[w + 1] |= code >> (32 - sh);
        }
    });
    out
}

/// Bytes `[start, end)` of the codes into shared memory at `dst`, which receives the 16-byte
/// aligned pieces covering the range (`start mod 16` bytes of lead-in). Pieces `p` of this
/// row are taken by the caller's thread subset; `n_total` bounds every global read.
#[inline(always)]
unsafe fn stage_piece(codes: *const u8, n_total: u64, aligned_start: u64, p: u32, dst: u32) {
    let g = aligned_start + 16 * p as u64;
    let v = if g + 16 <= n_total {
        (*(codes.add(g as usize) as *const Bytes16)).0
    } else {
        // The last piece of the whole tensor: byte by byte, zero past the end.
        let mut v = [0u32; 4];
        let mut b = 0u64;
        while b < 16 {
            if g + b < n_total {
                v[(b / 4) as usize] |= (*codes.add((g + b) as usize) as u32) << (8 * (b % 4));
            }
            b += 1;
        }
        v
    };
    st_shared_u32x4(dst + 16 * p, v);
}

/// The 32 code bytes at shared address `a` (any alignment; the staging row has room for the
/// 36-byte window an unaligned read touches).
#[inline(always)]
unsafe fn load_chunk(a: u32) -> [u32; 8] {
    let mut v = [0u32; 8];
    if a.is_multiple_of(16) {
        let lo = ld_shared_u32x4(a);
        let hi = ld_shared_u32x4(a + 16);
        v = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
    } else {
        let base = a & !3;
        let sh = 8 * (a & 3);
        let mut x = [0u32; 9];
        let mut m = 0;
        while m < 9 {
            x[m] = ld_shared_u32(base + 4 * m as u32);
            m += 1;
        }
        let mut m = 0;
        while m < 8 {
            v[m] = (((x[m + 1] as u64) << 32 | x[m] as u64) >> sh) as u32;
            m += 1;
        }
    }
    v
}

#[inline(always)]
unsafe fn pack_impl<const B: u32, const TRANSPOSED: bool>(a: &PackArgs) {
    let (rows, cols) = (a.rows, a.cols);
    let codes = a.codes.ptr();
    let words = a.words.ptr();
    // A power of two in 1..=8 whatever the host passed, so tiles divide the block exactly.
    let k: u32 = match a.tile_chunks {
        2 => 2,
        4 => 4,
        8 => 8,
        _ => 1,
    };
    let k_shift = k.trailing_zeros();
    let layout = PackSharedLayout::new(B, k, TRANSPOSED);
    let r_tile = layout.tile_rows; // 256 / k
    let r_shift = r_tile.trailing_zeros();
    let crow = layout.codes_row_bytes;
    let smem = shared_window_base();
    let wtile = smem + layout.words;

    let n_total = rows as u64 * cols as u64;
    let chunks = cols.div_ceil(32); // chunks per row
    let w_row = ((cols as u64 * B as u64).div_ceil(32)) as u32; // words per row
    let tiles_x = chunks.div_ceil(k).max(1);
    let tiles_y = rows.div_ceil(r_tile);
    let n_tiles = tiles_x as u64 * tiles_y as u64;
    let pieces = 2 * k + 1; // 16-byte pieces a tile row can span
    let maxq_bytes = ((1u32 << B) - 1) * 0x0101_0101;
    let t = thread_x();

    let mut tile = block_x() as u64;
    while tile < n_tiles {
        let r0 = (tile / tiles_x as u64) as u32 * r_tile;
        let k0 = (tile % tiles_x as u64) as u32 * k;
        let seg_cols = cols.min(32 * (k0 + k)) - 32 * k0; // codes of each tile row

        // 1. stage every tile row's codes.
        let mut idx = t;
        while idx < r_tile * pieces {
            let i = idx / pieces;
            let p = idx - i * pieces;
            let r = r0 + i;
            if r < rows {
                let start = r as u64 * cols as u64 + 32 * k0 as u64;
                let aligned = start & !15;
                let span = (start + seg_cols as u64 - aligned).div_ceil(16);
                if (p as u64) < span {
                    stage_piece(codes, n_total, aligned, p, smem + i * crow);
                }
            }
            idx += PACK_THREADS;
        }
        sync_threads();

        // 2. pack one chunk per thread.
        let i = t >> k_shift;
        let j = t & (k - 1);
        let (r, kc) = (r0 + i, k0 + j);
        if r < rows && kc < chunks {
            let start = r as u64 * cols as u64 + 32 * k0 as u64;
            let lead = (start & 15) as u32;
            let mut v = load_chunk(smem + i * crow + lead + 32 * j);
            let n_codes = (cols - 32 * kc).min(32);
            let mut m = 0;
            while m < 8 {
                // Keep the codes of this row only (the staged bytes run on into the next).
                let keep = n_codes.saturating_sub(4 * m as u32).min(4);
                let mask = if keep == 4 { u32::MAX } else { (1u32 << (8 * keep)) - 1 };
                v[m] &= mask;
                let bad = v[m] & !maxq_bytes;
                if bad != 0 {
                    let col = 32 * kc as u64 + 4 * m as u64 + (bad.trailing_zeros() / 8) as u64;
                    atomic_max_u64_global(a.first_bad.ptr(), !(r as u64 * cols as u64 + col));
                    v[m] &= maxq_bytes;
                }
                m += 1;
            }
            let out = pack32::<B>(&v);
            let n_words = (w_row - B * kc).min(B);
            unroll!(q in [0 1 2 3 4 5 6 7] => {
                if q < n_words {
                    let wi = B * j + q;
                    st_shared_u32(wtile + 4 * (i * layout.row_stride + wi * layout.word_stride), out[q as usize]);
                }
            });
        }
        sync_threads();

        // 3. write the tile's words in the output's order.
        let tile_words = (w_row - B * k0).min(B * k); // words of each tile row
        let mut idx = t;
        while idx < r_tile * B * k {
            let (i, wi) = if TRANSPOSED {
                (idx & (r_tile - 1), idx >> r_shift)
            } else {
                let i = (idx >> k_shift) / B; // idx / (B·k), B a constant
                (i, idx - i * B * k)
            };
            let r = r0 + i;
            if r < rows && wi < tile_words {
                let v = ld_shared_u32(wtile + 4 * (i * layout.row_stride + wi * layout.word_stride));
                let col = (B * k0 + wi) as u64;
                let at = if TRANSPOSED { col * rows as u64 + r as u64 } else { r as u64 * w_row as u64 + col };
                *words.add(at as usize) = v;
            }
            idx += PACK_THREADS;
        }
        sync_threads(); // the next tile reuses the shared buffers
        tile += grid_dim_x() as u64;
    }
}

/// One chunk per thread, straight from global memory to global memory (module docs). `WARP8`
/// (transposed layout, chunks per row a multiple of 4): a warp takes 8 rows × 4 chunks,
/// lane = 4·row + chunk.
#[inline(always)]
unsafe fn pack_direct<const B: u32, const TRANSPOSED: bool, const WARP8: bool>(a: &PackArgs) {
    let (rows, cols) = (a.rows as u64, a.cols as u64);
    let chunks = cols / 32;
    let w_row = chunks * B as u64;
    let rows8 = rows.div_ceil(8) * 8;
    let n = if WARP8 { rows8 * chunks } else { rows * chunks };
    // Non-zero divisors as types: the divisions carry no panic branch.
    let (Some(rows_nz), Some(chunks_nz), Some(tiles_r)) =
        (NonZeroU64::new(rows), NonZeroU64::new(chunks), NonZeroU64::new(rows8 / 8))
    else {
        return;
    };
    let maxq_bytes = ((1u32 << B) - 1) * 0x0101_0101;
    let stride = grid_dim_x() as u64 * PACK_THREADS as u64;
    let mut idx = block_x() as u64 * PACK_THREADS as u64 + thread_x() as u64;
    while idx < n {
        let (r, kc) = if WARP8 {
            let (tile, lane) = (idx / 32, idx % 32);
            ((tile % tiles_r) * 8 + lane / 4, (tile / tiles_r) * 4 + lane % 4)
        } else if TRANSPOSED {
            (idx % rows_nz, idx / rows_nz)
        } else {
            (idx / chunks_nz, idx % chunks_nz)
        };
        idx += stride;
        if r >= rows {
            continue; // WARP8's padding rows
        }
        let src = a.codes.ptr().add((r * cols + 32 * kc) as usize) as *const Bytes16;
        let (lo, hi) = ((*src).0, (*src.add(1)).0);
        let mut v = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
        unroll!(m in [0 1 2 3 4 5 6 7] => {
            let bad = v[m as usize] & !maxq_bytes;
            if bad != 0 {
                let col = 32 * kc + 4 * m as u64 + (bad.trailing_zeros() / 8) as u64;
                atomic_max_u64_global(a.first_bad.ptr(), !(r * cols + col));
                v[m as usize] &= maxq_bytes;
            }
        });
        let out = pack32::<B>(&v);
        let words = a.words.ptr();
        if TRANSPOSED {
            // Word line `kc·B + q`, consecutive rows side by side.
            unroll!(q in [0 1 2 3 4 5 6 7] => {
                if q < B {
                    *words.add(((kc * B as u64 + q as u64) * rows + r) as usize) = out[q as usize];
                }
            });
        } else {
            // The row's `B` words at `r·w_row + kc·B`, in stores as wide as their alignment
            // allows (scalar stores at a 32-byte stride halve the 8-bit bandwidth).
            let at = words.add((r * w_row + kc * B as u64) as usize);
            if B % 4 == 0 {
                unroll!(q in [0 1] => {
                    if 4 * q < B {
                        let o = (4 * q) as usize;
                        *(at.add(o) as *mut Bytes16) = Bytes16([out[o], out[o + 1], out[o + 2], out[o + 3]]);
                    }
                });
            } else if B % 2 == 0 {
                unroll!(q in [0 1 2] => {
                    if 2 * q < B {
                        let o = (2 * q) as usize;
                        *(at.add(o) as *mut Bytes8) = Bytes8([out[o], out[o + 1]]);
                    }
                });
            } else {
                unroll!(q in [0 1 2 3 4 5 6] => {
                    if q < B {
                        *at.add(q as usize) = out[q as usize];
                    }
                });
            }
        }
    }
}

#[inline(always)]
unsafe fn dispatch<const TRANSPOSED: bool>(a: &PackArgs) {
    match a.bits {
        2 => pack_impl::<2, TRANSPOSED>(a),
        3 => pack_impl::<3, TRANSPOSED>(a),
        4 => pack_impl::<4, TRANSPOSED>(a),
        5 => pack_impl::<5, TRANSPOSED>(a),
        6 => pack_impl::<6, TRANSPOSED>(a),
        7 => pack_impl::<7, TRANSPOSED>(a),
        8 => pack_impl::<8, TRANSPOSED>(a),
        _ => {} // the host validates bits
    }
}

/// The transposed layout in warps of 8 rows × 4 chunks when the row has a multiple of four
/// chunks (a warp reads 8 whole 128-byte lines and writes 32-byte row runs of each word line).
#[inline(always)]
unsafe fn dispatch_direct<const TRANSPOSED: bool>(a: &PackArgs) {
    if TRANSPOSED && (a.cols / 32).is_multiple_of(4) {
        dispatch_direct_ch::<TRANSPOSED, true>(a)
    } else {
        dispatch_direct_ch::<TRANSPOSED, false>(a)
    }
}

#[inline(always)]
unsafe fn dispatch_direct_ch<const TRANSPOSED: bool, const WARP8: bool>(a: &PackArgs) {
    match a.bits {
        2 => pack_direct::<2, TRANSPOSED, WARP8>(a),
        3 => pack_direct::<3, TRANSPOSED, WARP8>(a),
        4 => pack_direct::<4, TRANSPOSED, WARP8>(a),
        5 => pack_direct::<5, TRANSPOSED, WARP8>(a),
        6 => pack_direct::<6, TRANSPOSED, WARP8>(a),
        7 => pack_direct::<7, TRANSPOSED, WARP8>(a),
        8 => pack_direct::<8, TRANSPOSED, WARP8>(a),
        _ => {} // the host validates bits
    }
}

forge_kernel_abi::pack_kernel! {
    /// Codes → words `(rows, w_row)`; see the module docs.
    PackRows => fn pack_rows(args) {
        dispatch::<false>(&args)
    }
}

forge_kernel_abi::pack_kernel! {
    /// Codes → words `(w_row, rows)` (GPTQ `qweight`); see the module docs.
    PackRowsTransposed => fn pack_rows_transposed(args) {
        dispatch::<true>(&args)
    }
}

forge_kernel_abi::pack_kernel! {
    /// Codes → words `(rows, w_row)`, `cols` a multiple of 32; see the module docs.
    PackRowsDirect => fn pack_rows_direct(args) {
        dispatch_direct::<false>(&args)
    }
}

forge_kernel_abi::pack_kernel! {
    /// Codes → words `(w_row, rows)`, `cols` a multiple of 32; see the module docs.
    PackRowsTransposedDirect => fn pack_rows_transposed_direct(args) {
        dispatch_direct::<true>(&args)
    }
}
