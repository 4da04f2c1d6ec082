//! CPU side of the W4A16 runtime: the packer (codes + grid → the kernel's tiles), its
//! inverse, the kernel's exact dequantized weight, and the reference matmul.

use super::{check_dims, ActDtype, PackedDims, PackedWeight};
use crate::{ForgeError, QMetaPacked, QuantGrid, Result};
use forge_kernel_abi::runtime::{PACK_K_ALIGN, PACK_N_ALIGN, PACK_TILE_K, PACK_TILE_N};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

/// Words of one packed 4-bit tile (8-bit tiles have twice as many).
const TILE_WORDS: usize = (PACK_TILE_K * PACK_TILE_N / 8) as usize;

/// Words of one packed tile of `bits`-bit codes (4 or 8).
pub(crate) const fn tile_words(bits: u32) -> usize {
    TILE_WORDS * bits as usize / 4
}

/// Where element `(kk, nn)` of a `16 × 64` tile lives: `(word in the tile, nibble in the
/// word)`. The inverse of the kernel's reading (`forge_kernel_abi::runtime` docs): lane
/// `l = 4·(nn mod 8) + (kk mod 8)/2`, word `i = nn/16`, nibble `j + 4h` with
/// `j = 2·((nn/8) mod 2) + (kk/8) mod 2` and `h = kk mod 2`.
#[inline]
fn tile_slot(kk: usize, nn: usize) -> (usize, usize) {
    let (n8, q) = (nn / 8, nn % 8);
    let (i, jhi) = (n8 / 2, n8 % 2);
    let j = 2 * jhi + (kk / 8) % 2;
    let rem = kk % 8;
    let lane = 4 * q + rem / 2;
    (lane * 4 + i, j + 4 * (rem % 2))
}

/// Where element `(kk, nn)` of an 8-bit `16 × 64` tile lives: `(word in the tile, byte in the
/// word)`. The inverse of the 8-bit kernels' reading (`forge_kernel_abi::runtime` docs): half
/// `h = i/2` of the tile (`i = nn/16`), lane `l = 4·(nn mod 8) + (kk mod 8)/2`, word
/// `2·(i mod 2) + (nn/8) mod 2` of the lane's four, byte `2·(kk/8) + kk mod 2`.
#[inline]
fn tile_slot8(kk: usize, nn: usize) -> (usize, usize) {
    let (i, c, g) = (nn / 16, (nn / 8) % 2, nn % 8);
    let lane = 4 * g + (kk % 8) / 2;
    ((i / 2) * TILE_WORDS + lane * 4 + 2 * (i % 2) + c, 2 * (kk / 8) + kk % 2)
}

/// Packs `codes` `[n, k]` (original column order, as the solver returns them) and their grid
/// for the W4A16 kernel: codes in `16 × 64` tiles (docs/formats.md), 4-bit for grids of at
/// most 4 bits (`maxq ≤ 15`) and 8-bit for 5–8 bits (the `w8a16` kernels), records
/// group-major `[g_pad][n_pad]`, `n` padded to 256 and `k` to 128 with codes equal to the
/// group's zero point (or 0 with a unit record past the last group), so padding dequantizes
/// to exactly 0.
///
/// Errors: codes wider than 8 bits (`maxq > 255`), a code above `maxq`, a zero point above
/// `maxq`, a grid of another shape, and the kernel's shape rules ([`check_dims`]).
pub fn pack_for_kernel(codes: ArrayView2<'_, u8>, grid: &QuantGrid) -> Result<PackedWeight> {
    let (n, k) = codes.dim();
    let gs = grid.group_size;
    check_dims(n, k, gs)?;
    if grid.maxq > 255 {
        return Err(ForgeError::Config(format!(
            "the W4A16 kernel packs codes of at most 8 bits; this grid has maxq {}",
            grid.maxq
        )));
    }
    let bits: u32 = if grid.maxq <= 15 { 4 } else { 8 };
    let n_groups = k.div_ceil(gs);
    if grid.dim() != (n, n_groups) {
        return Err(ForgeError::Shape(format!(
            "grid {:?} does not match codes {n}×{k} at group size {gs} ({n}×{n_groups} records expected)",
            grid.dim()
        )));
    }
    if let Some(((r, c), &q)) = codes.indexed_iter().find(|(_, &q)| q as u32 > grid.maxq) {
        return Err(ForgeError::Config(format!("code {q} at ({r}, {c}) exceeds maxq {}", grid.maxq)));
    }
    let recs: Vec<QMetaPacked> = grid.to_u32_vec().into_iter().map(QMetaPacked::from_u32).collect();
    if let Some((i, m)) = recs.iter().enumerate().find(|(_, m)| m.qzero as u32 > grid.maxq) {
        return Err(ForgeError::Config(format!(
            "zero point {} of row {}, group {} exceeds maxq {}: the kernel's exact 16-bit dequantization needs it in range",
            m.qzero,
            i / n_groups,
            i % n_groups,
            grid.maxq
        )));
    }
    let finite = |dt: ActDtype| {
        recs.iter().all(|m| {
            let worst = (m.qzero as u32).max(grid.maxq - m.qzero as u32) as f32;
            dt.round(worst * dt.scale(m.log2_scale_q88)).is_finite()
        })
    };
    let (finite_bf16, finite_f16) = (finite(ActDtype::Bf16), finite(ActDtype::F16));

    let n_pad = n.div_ceil(PACK_N_ALIGN as usize) * PACK_N_ALIGN as usize;
    let k_pad = k.div_ceil(PACK_K_ALIGN as usize) * PACK_K_ALIGN as usize;
    let g_pad = k_pad.div_ceil(gs);
    let kt_total = k_pad / PACK_TILE_K as usize;
    let tw = tile_words(bits);
    let row_words = kt_total * tw; // one 64-column strip
    let mut words = vec![0u32; (n_pad / PACK_TILE_N as usize) * row_words];
    let zero_of = |r: usize, c: usize| -> u32 {
        let g = c / gs;
        if g < n_groups {
            recs[r * n_groups + g].qzero as u32
        } else {
            0
        }
    };
    words.par_chunks_mut(row_words).enumerate().for_each(|(nt, strip)| {
        for nn in 0..PACK_TILE_N as usize {
            let r = nt * PACK_TILE_N as usize + nn;
            if r >= n {
                break; // rows past n stay code 0 with a unit record: 0
            }
            for c in 0..k_pad {
                let q = if c < k { codes[[r, c]] as u32 } else { zero_of(r, c) };
                let (kt, kk) = (c / PACK_TILE_K as usize, c % PACK_TILE_K as usize);
                let (w, shift) = if bits == 8 {
                    let (w, byte) = tile_slot8(kk, nn);
                    (w, 8 * byte)
                } else {
                    let (w, nib) = tile_slot(kk, nn);
                    (w, 4 * nib)
                };
                strip[kt * tw + w] |= q << shift;
            }
        }
    });
    let mut records = vec![0u32; g_pad * n_pad];
    for r in 0..n {
        for g in 0..n_groups {
            records[g * n_pad + r] = recs[r * n_groups + g].to_u32();
        }
    }
    Ok(PackedWeight {
        dims: PackedDims { n, k, n_pad, k_pad, group_size: gs, g_pad, bits },
        codes: words,
        records,
        finite_bf16,
        finite_f16,
    })
}

/// The inverse of [`pack_for_kernel`]: codes `[n, k]` and the records `[n, n_groups]` (row-major
/// u32), for checking the packing.
pub fn unpack_for_kernel(p: &PackedWeight) -> Result<(Array2<u8>, Vec<u32>)> {
    let n_groups = p.dims.k.div_ceil(p.dims.group_size);
    let kt_total = p.dims.k_pad / PACK_TILE_K as usize;
    let tw = p.dims.tile_words()?;
    if p.codes.len() != p.dims.code_words()?
        || p.records.len() != p.dims.g_pad * p.dims.n_pad
        || p.dims.g_pad < n_groups
    {
        return Err(ForgeError::Shape("packed weight buffers do not match its dimensions".into()));
    }
    let codes = Array2::from_shape_fn((p.dims.n, p.dims.k), |(r, c)| {
        let (nt, nn) = (r / PACK_TILE_N as usize, r % PACK_TILE_N as usize);
        let (kt, kk) = (c / PACK_TILE_K as usize, c % PACK_TILE_K as usize);
        let tile = (nt * kt_total + kt) * tw;
        if p.dims.bits == 8 {
            let (w, byte) = tile_slot8(kk, nn);
            (p.codes[tile + w] >> (8 * byte)) as u8
        } else {
            let (w, nib) = tile_slot(kk, nn);
            ((p.codes[tile + w] >> (4 * nib)) & 0xf) as u8
        }
    });
    let mut recs = Vec::with_capacity(p.dims.n * n_groups);
    for r in 0..p.dims.n {
        for g in 0..n_groups {
            recs.push(p.records[g * p.dims.n_pad + r]);
        }
    }
    Ok((codes, recs))
}

/// The weight the kernel multiplies by, `[n, k]`: `round_T((q − z)·stored_scale(q88, T))`
/// (exact in f32 before the one rounding; see the module docs of `runtime`).
pub fn dequant_for_kernel(p: &PackedWeight, dtype: ActDtype) -> Result<Array2<f32>> {
    let (codes, recs) = unpack_for_kernel(p)?;
    let n_groups = p.dims.k.div_ceil(p.dims.group_size);
    let mut out = Array2::zeros((p.dims.n, p.dims.k));
    out.axis_iter_mut(ndarray::Axis(0)).into_par_iter().enumerate().for_each(|(r, mut row)| {
        for (c, v) in row.iter_mut().enumerate() {
            let m = QMetaPacked::from_u32(recs[r * n_groups + c / p.dims.group_size]);
            let d = codes[[r, c]] as f32 - m.qzero as f32;
            *v = dtype.round(d * dtype.scale(m.log2_scale_q88));
        }
    });
    Ok(out)
}

/// The reference `Y = round_T(X) · dequant_for_kernel(W)ᵀ`, `[m, n]`, unrounded: the products
/// of two 16-bit values are exact in f64 and summed in f64 (error `≤ k·2^-53·Σ|x·w|`, far
/// below the kernel's f32 accumulation), so the kernel's result differs from this by its own
/// f32 accumulation order and the final rounding to `T` ([`round_to_act`]).
pub fn w4a16_matmul_cpu(x: ArrayView2<'_, f32>, p: &PackedWeight, dtype: ActDtype) -> Result<Array2<f64>> {
    if x.ncols() != p.dims.k {
        return Err(ForgeError::Shape(format!("X has {} columns, the weight {} inputs", x.ncols(), p.dims.k)));
    }
    let w = dequant_for_kernel(p, dtype)?.mapv(|v| v as f64);
    let x = x.mapv(|v| dtype.round(v) as f64);
    Ok(x.dot(&w.t()))
}

/// The grouped reference: rows `offsets[e] .. offsets[e + 1]` of `x` times expert `e`'s
/// weight ([`w4a16_matmul_cpu`] per expert), `[offsets[E], n]`, unrounded.
pub fn w4a16_grouped_matmul_cpu(
    x: ArrayView2<'_, f32>,
    offsets: &[usize],
    experts: &[PackedWeight],
    dtype: ActDtype,
) -> Result<Array2<f64>> {
    let tasks = super::ExpertTasks::new(offsets)?;
    let Some(first) = experts.first() else {
        return Err(ForgeError::Shape("a grouped weight needs at least one expert".into()));
    };
    if tasks.experts != experts.len() || x.nrows() != tasks.rows {
        return Err(ForgeError::Shape(format!(
            "{} offsets and {} rows of X for {} experts",
            offsets.len(),
            x.nrows(),
            experts.len()
        )));
    }
    let mut y = Array2::zeros((tasks.rows, first.dims.n));
    for (e, p) in experts.iter().enumerate() {
        if p.dims.n != first.dims.n {
            return Err(ForgeError::Shape(format!("expert {e} has {} outputs, expert 0 {}", p.dims.n, first.dims.n)));
        }
        let rows = offsets[e]..offsets[e + 1];
        if !rows.is_empty() {
            let ye = w4a16_matmul_cpu(x.slice(ndarray::s![rows.clone(), ..]), p, dtype)?;
            y.slice_mut(ndarray::s![rows, ..]).assign(&ye);
        }
    }
    Ok(y)
}

/// `y` rounded as the kernel writes it if its f32 sum were exact: to f32, then to `T`.
pub fn round_to_act(y: &Array2<f64>, dtype: ActDtype) -> Array2<f32> {
    y.mapv(|v| dtype.round(v as f32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tile_slot` is a bijection onto the 128 words × 8 nibbles of a tile.
    #[test]
    fn tile_slot_is_a_bijection() {
        let mut seen = vec![false; TILE_WORDS * 8];
        for kk in 0..16 {
            for nn in 0..64 {
                let (w, nib) = tile_slot(kk, nn);
                assert!(!seen[w * 8 + nib], "({kk}, {nn}) collides");
                seen[w * 8 + nib] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    /// `tile_slot8` is a bijection onto the 256 words × 4 bytes of an 8-bit tile.
    #[test]
    fn tile_slot8_is_a_bijection() {
        let mut seen = vec![false; 2 * TILE_WORDS * 4];
        for kk in 0..16 {
            for nn in 0..64 {
                let (w, byte) = tile_slot8(kk, nn);
                assert!(!seen[w * 4 + byte], "({kk}, {nn}) collides");
                seen[w * 4 + byte] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    /// The 8-bit kernels' reading, written out from the mma.m16n8k16 A fragment (PTX ISA:
    /// lane `4g + t` holds `a0, a1` at row `g`, `k` `2t, 2t+1`; `a2, a3` at row `g + 8`; `a4,
    /// a5` at row `g`, `k` `2t+8, 2t+9`; `a6, a7` at row `g + 8`): lane `l` loads the 16 bytes
    /// at `l·16` of half `h`; `half_tile_mma8` takes words `2u` and `2u + 1` as mma rows `g`
    /// and `g + 8`, columns `16(2h + u) + g (+8)` of the tile, each word's bytes 0–1 at `k`
    /// `2t, 2t+1` and 2–3 at `2t+8, 2t+9`.
    #[test]
    fn tile_slot8_matches_the_fragment_the_kernel_reads() {
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for h in 0..2 {
                for u in 0..2 {
                    for row8 in 0..2 {
                        for (byte, kk) in [(0, 2 * t), (1, 2 * t + 1), (2, 2 * t + 8), (3, 2 * t + 9)] {
                            let nn = 16 * (2 * h + u) + 8 * row8 + g;
                            let word = h * TILE_WORDS + lane * 4 + 2 * u + row8;
                            assert_eq!(tile_slot8(kk, nn), (word, byte), "lane {lane}, half {h}, u {u}");
                        }
                    }
                }
            }
        }
    }

    /// The kernel reads pair `j` of word `i` of lane `l` as the B fragment of n8-tile
    /// `2i + j/2`: rows `2·(l mod 4) + 8·(j mod 2) + {0, 1}` (low, high half) of column
    /// `8·(2i + j/2) + l/4` (PTX ISA, mma.m16n8k16 B fragment).
    #[test]
    fn tile_slot_matches_the_fragment_the_kernel_reads() {
        for lane in 0..32 {
            for i in 0..4 {
                for j in 0..4 {
                    for h in 0..2 {
                        let n8 = 2 * i + j / 2;
                        let (kk, nn) = (2 * (lane % 4) + 8 * (j % 2) + h, 8 * n8 + lane / 4);
                        assert_eq!(tile_slot(kk, nn), (lane * 4 + i, j + 4 * h));
                    }
                }
            }
        }
    }
}
