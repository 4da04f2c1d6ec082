//! CPU reference packing: each line is packed 32 elements (= `bits` words) at a time by a
//! kernel specialised on the bit width, so shifts and word indices are compile-time constants;
//! lines run in parallel (rayon).

use super::packed_len;
use crate::{ForgeError, Result};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

/// Packs every row of `codes` (`rows × n`, values `< 2^bits`) into a dense bit stream of
/// `ceil(n·bits/32)` words: the result is `rows × ceil(n·bits/32)`.
///
/// Errors: `bits` outside `2..=8` ([`ForgeError::Bits`]); a code that does not fit in
/// `bits` bits ([`ForgeError::Format`], naming its row and column), since packing it would
/// corrupt its neighbours.
pub fn pack_rows(codes: ArrayView2<'_, u8>, bits: u32) -> Result<Array2<u32>> {
    let (rows, cols) = codes.dim();
    let words = packed_len(cols, bits)?;
    let codes = codes.as_standard_layout();
    let src = contiguous(codes.as_slice())?;
    check_range(src, cols, bits)?;
    let mut out = vec![0u32; rows.checked_mul(words).ok_or_else(|| too_large(rows, words))?];
    if cols > 0 {
        out.par_chunks_mut(words).zip(src.par_chunks(cols)).for_each(|(dst, line)| pack_line(line, dst, bits));
    }
    to_array(out, rows, words)
}

/// Inverse of [`pack_rows`]: `words` is `rows × ceil(cols·bits/32)`; returns `rows × cols`
/// codes. A packed tensor whose width is not exactly `ceil(cols·bits/32)` (truncated or
/// padded) is a [`ForgeError::Format`].
pub fn unpack_rows(words: ArrayView2<'_, u32>, bits: u32, cols: usize) -> Result<Array2<u8>> {
    let (rows, width) = words.dim();
    let expected = packed_len(cols, bits)?;
    if width != expected {
        return Err(ForgeError::Format(format!(
            "packed tensor has {width} words per line, but {cols} elements of {bits} bits take {expected}"
        )));
    }
    let words = words.as_standard_layout();
    let src = contiguous(words.as_slice())?;
    let mut out = vec![0u8; rows.checked_mul(cols).ok_or_else(|| too_large(rows, cols))?];
    if cols > 0 && width > 0 {
        out.par_chunks_mut(cols).zip(src.par_chunks(width)).for_each(|(dst, line)| unpack_line(line, dst, bits));
    }
    to_array(out, rows, cols)
}

/// Packs every column of `values` (`n × cols`) along axis 0: the result is
/// `ceil(n·bits/32) × cols`, word `w` of column `c` at `[w, c]`. Same errors as [`pack_rows`].
pub fn pack_cols(values: ArrayView2<'_, u8>, bits: u32) -> Result<Array2<u32>> {
    let packed = pack_rows(values.t(), bits)?;
    Ok(transpose_array(packed.view()))
}

/// Inverse of [`pack_cols`]: `words` is `ceil(rows·bits/32) × cols`; returns `rows × cols`.
pub fn unpack_cols(words: ArrayView2<'_, u32>, bits: u32, rows: usize) -> Result<Array2<u8>> {
    let lines = unpack_rows(words.t(), bits, rows)?;
    Ok(transpose_array(lines.view()))
}

/// `src` (`rows × cols`, row-major) transposed to `cols × rows`, in 32×32 tiles, tile
/// columns in parallel. `src.len()` must be `rows·cols` (else an empty `Vec`).
pub fn transpose<T: Copy + Default + Send + Sync>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    const TILE: usize = 32;
    if rows.checked_mul(cols) != Some(src.len()) || src.is_empty() {
        return Vec::new();
    }
    let mut dst = vec![T::default(); src.len()];
    // Each task owns TILE output rows (= TILE source columns), all source rows.
    dst.par_chunks_mut(TILE * rows).enumerate().for_each(|(tile, block)| {
        let c0 = tile * TILE;
        let nc = block.len() / rows;
        for r0 in (0..rows).step_by(TILE) {
            let r1 = (r0 + TILE).min(rows);
            for (dr, srow) in src[r0 * cols..r1 * cols].chunks_exact(cols).enumerate() {
                for (c, &v) in srow[c0..c0 + nc].iter().enumerate() {
                    block[c * rows + r0 + dr] = v;
                }
            }
        }
    });
    dst
}

fn transpose_array<T: Copy + Default + Send + Sync>(a: ArrayView2<'_, T>) -> Array2<T> {
    let (rows, cols) = a.dim();
    let a = a.as_standard_layout();
    match a.as_slice() {
        Some(s) if !s.is_empty() => Array2::from_shape_vec((cols, rows), transpose(s, rows, cols))
            .unwrap_or_else(|_| Array2::from_elem((cols, rows), T::default())),
        _ => Array2::from_elem((cols, rows), T::default()),
    }
}

fn contiguous<T>(s: Option<&[T]>) -> Result<&[T]> {
    s.ok_or_else(|| ForgeError::Shape("internal: a standard-layout array is not contiguous".into()))
}

fn too_large(a: usize, b: usize) -> ForgeError {
    ForgeError::Shape(format!("{a}×{b} elements overflow usize"))
}

fn to_array<T>(v: Vec<T>, rows: usize, cols: usize) -> Result<Array2<T>> {
    Array2::from_shape_vec((rows, cols), v).map_err(|e| ForgeError::Shape(e.to_string()))
}

/// First code `≥ 2^bits` as a typed error.
fn check_range(src: &[u8], cols: usize, bits: u32) -> Result<()> {
    let limit = 1u32 << bits;
    if bits >= 8 || cols == 0 {
        return Ok(());
    }
    let bad = src
        .par_chunks(cols)
        .enumerate()
        .find_first(|(_, line)| line.iter().fold(0u8, |m, &c| m.max(c)) as u32 >= limit);
    match bad {
        None => Ok(()),
        Some((row, line)) => {
            let (col, value) =
                line.iter().enumerate().find(|(_, &c)| c as u32 >= limit).map_or((0, 0), |(c, &v)| (c, v));
            Err(ForgeError::Format(format!(
                "value {value} at row {row}, column {col} does not fit in {bits} bits (max {})",
                limit - 1
            )))
        }
    }
}

fn pack_line(line: &[u8], dst: &mut [u32], bits: u32) {
    match bits {
        2 => pack_line_b::<2>(line, dst),
        3 => pack_line_b::<3>(line, dst),
        4 => pack_line_b::<4>(line, dst),
        5 => pack_line_b::<5>(line, dst),
        6 => pack_line_b::<6>(line, dst),
        7 => pack_line_b::<7>(line, dst),
        _ => pack_line_b::<8>(line, dst),
    }
}

fn unpack_line(line: &[u32], dst: &mut [u8], bits: u32) {
    match bits {
        2 => unpack_line_b::<2>(line, dst),
        3 => unpack_line_b::<3>(line, dst),
        4 => unpack_line_b::<4>(line, dst),
        5 => unpack_line_b::<5>(line, dst),
        6 => unpack_line_b::<6>(line, dst),
        7 => unpack_line_b::<7>(line, dst),
        _ => unpack_line_b::<8>(line, dst),
    }
}

/// 32 codes → `B` words per step (the loop unrolls to constant shifts), then the tail.
#[inline]
fn pack_line_b<const B: usize>(line: &[u8], dst: &mut [u32]) {
    let (codes32, tail) = line.as_chunks::<32>();
    // Split by the codes, not by `dst.len()`: a tail of up to 31 codes can fill B words too.
    let Some((full, tail_words)) = dst.split_at_mut_checked(codes32.len() * B) else { return };
    let (words_b, _) = full.as_chunks_mut::<B>();
    for (c, w) in codes32.iter().zip(words_b.iter_mut()) {
        pack32::<B>(c, w);
    }
    // Tail: fewer than 32 codes into the last ceil(tail·B/32) words.
    let mut acc = 0u64;
    let mut n = 0usize;
    let mut out = tail_words.iter_mut();
    for &code in tail {
        acc |= (code as u64) << n;
        n += B;
        if n >= 32 {
            if let Some(w) = out.next() {
                *w = acc as u32;
            }
            acc >>= 32;
            n -= 32;
        }
    }
    if n > 0 {
        if let Some(w) = out.next() {
            *w = acc as u32;
        }
    }
}

/// `B` words → 32 codes per step, then the tail.
#[inline]
fn unpack_line_b<const B: usize>(line: &[u32], dst: &mut [u8]) {
    let mask = (1u64 << B) - 1;
    let (codes32, tail) = dst.as_chunks_mut::<32>();
    let Some((full, tail_words)) = line.split_at_checked(codes32.len() * B) else { return };
    let (words_b, _) = full.as_chunks::<B>();
    for (w, c) in words_b.iter().zip(codes32.iter_mut()) {
        unpack32::<B>(w, c);
    }
    let mut acc = 0u64;
    let mut n = 0usize;
    let mut words = tail_words.iter();
    for code in tail.iter_mut() {
        if n < B {
            if let Some(&w) = words.next() {
                acc |= (w as u64) << n;
            }
            n += 32;
        }
        *code = (acc & mask) as u8;
        acc >>= B;
        n -= B;
    }
}

/// 32 codes → `B` words. Each word gathers the codes overlapping its 32 bits; every index and
/// shift is a constant once `B` is, so this compiles to straight-line shifts and ors.
#[inline(always)]
fn pack32<const B: usize>(c: &[u8; 32], w: &mut [u32; B]) {
    for (k, word) in w.iter_mut().enumerate() {
        let lo = 32 * k;
        let mut acc = 0u64;
        for (i, &code) in c.iter().enumerate().take((lo + 32).div_ceil(B)).skip(lo / B) {
            // Code i starts at stream bit i·B; relative to this word's first bit it may start
            // up to B−1 bits earlier (its high bits land here) or later.
            let start = i * B;
            acc |= if start >= lo { (code as u64) << (start - lo) } else { (code as u64) >> (lo - start) };
        }
        *word = acc as u32;
    }
}

/// Repeats `$body` for `$i` = 0..32 as straight-line code (LLVM does not always unroll a
/// 32-step loop whose shifts depend on the step, and then keeps the bounds checks).
macro_rules! unroll32 {
    ($i:ident => $body:block) => {
        unroll32!(@ $i $body; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31)
    };
    (@ $i:ident $body:block; $($n:literal)*) => {
        $( { let $i: usize = $n; $body } )*
    };
}

/// `B` words → 32 codes: each code reads the (at most two) words its bits span.
#[inline(always)]
fn unpack32<const B: usize>(w: &[u32; B], c: &mut [u8; 32]) {
    let mask = (1u64 << B) - 1;
    unroll32!(i => {
        let start = i * B;
        let k = start / 32;
        // The next word, or this one again for the last word (whose codes never straddle).
        let k1 = if k + 1 < B { k + 1 } else { k };
        let v = ((w[k] as u64) | ((w[k1] as u64) << 32)) >> (start % 32);
        c[i] = (v & mask) as u8;
    });
}
