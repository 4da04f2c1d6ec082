//! The chain warp (threads 192..224, lane = row): the column-by-column recurrence of a
//! block, in slices of 16 columns held in registers (see the panel's module docs). Its
//! barriers: [`CHAIN_B1_B2`], [`CHAIN_WAITS_SLICE`], [`CHAIN_STORES_SLICE`].

use super::protocol::{meet, CHAIN_B1_B2, CHAIN_STORES_SLICE, CHAIN_WAITS_SLICE, SLICE, SLICES};
use super::Panel;
use crate::device::{div_by_recip, for4, recip_for_division, sync_warp, vote_all, Smem};
use core::f32::math::mul_add as fma;
use forge_kernel_abi::solver::SOLVER_BLOCK as BLOCK;
use forge_numerics::{dequantize, quantize, quantize_scaled};

/// Range in which the chain's branch-free division equals IEEE division (see
/// [`crate::device::div_by_recip`]): scales in `[2^-60, 2^20]`, `U`'s diagonal in
/// `[2^-40, 2^20]`, working weights zero or of magnitude in `[2^-100, 2^64]`. Then `x/s` and
/// `(x − deq)/d` stay in `[2^-120, 2^124]` (a non-zero `x − deq` with `deq ≠ 0` is at least
/// `2^-84`: `deq` is a non-zero integer times a scale ≥ `2^-60`), and every remainder is exact.
pub(super) const SCALE_MIN: f32 = 8.673617e-19; // 2^-60
pub(super) const SCALE_MAX: f32 = 1_048_576.0; // 2^20
const DIAG_MIN: f32 = 9.094947e-13; // 2^-40
const DIAG_MAX: f32 = 1_048_576.0; // 2^20
const DIVIDEND_MAX: f32 = 1.8446744e19; // 2^64
/// `key(2^-100)`, where `key(x) = 2·bits(|x|) − 1` wraps zero to the maximum, so one unsigned
/// minimum over the keys bounds every non-zero magnitude from below.
const DIVIDEND_MIN_KEY: u32 = (0x0d80_0000u32 << 1) - 1;

/// One lane's row of the block tiles, and the block's `U` and diagonal reciprocals;
/// accesses add compile-time offsets.
struct RowTiles {
    /// Working weights, overwritten by their errors.
    work: Smem<f32>,
    scale: Smem<f32>,
    zero: Smem<u8>,
    u: Smem<f32>,
    diag_recip: Smem<f32>,
    codes: Smem<u8>,
}

impl RowTiles {
    #[inline(always)]
    fn new(p: &Panel, lane: u32, buf: u32) -> Self {
        RowTiles {
            work: p.work_row(lane),
            scale: p.scale_row(buf, lane),
            zero: p.zero_row(buf, lane),
            u: p.u_block(buf),
            diag_recip: p.diag_recip(),
            codes: p.codes_row(buf, lane),
        }
    }

    /// The row's 16 working weights of slice `sl`.
    #[inline(always)]
    unsafe fn load_x(&self, sl: u32) -> [f32; SLICE] {
        let mut x = [0f32; SLICE];
        for4(|q| {
            let v = self.work.at(SLICE as u32 * sl + 4 * q as u32).ld4_pure();
            for4(|i| x[4 * q + i] = v[i]);
        });
        x
    }

    /// Replaces slice `sl`'s working weights by their errors and stores its codes.
    #[inline(always)]
    unsafe fn store_slice(&self, sl: u32, e: &[f32; SLICE], codes: &[u32; 4]) {
        let s0 = SLICE as u32 * sl;
        for4(|q| {
            self.work.at(s0 + 4 * q as u32).st4([e[4 * q], e[4 * q + 1], e[4 * q + 2], e[4 * q + 3]]);
        });
        self.codes.at(s0).st_words4(*codes);
    }
}

/// What one row's chain over a block produced besides its errors.
struct ChainOut {
    /// The slice's codes, four per word, little-endian.
    codes: [u32; 4],
    /// `Σ e²` over the slice.
    loss: f32,
    /// Largest `|x|` quantized (fast chain only).
    max_abs: f32,
    /// Smallest `key(x)` quantized (fast chain only; see [`DIVIDEND_MIN_KEY`]).
    min_key: u32,
}

impl ChainOut {
    /// Whether every working weight stayed where the fast division is exact.
    #[inline(always)]
    fn fast_division_exact(&self) -> bool {
        self.max_abs <= DIVIDEND_MAX && self.min_key >= DIVIDEND_MIN_KEY
    }
}

/// One row's recurrence over slice `sl` (16 columns) of the block, unrolled on registers:
/// quantize `x[c]`, `e = (x[c] − deq)/U[c,c]`, `x[j] −= e·U[c,j]` for the slice's later
/// columns (fused; the CPU reference rounds the product first, one of the rounding-order
/// differences the parity tests allow). `x[c]` then holds the error. With `EXACT` the
/// divisions are IEEE `/` (the fallback); otherwise [`div_by_recip`], whose range the
/// returned [`ChainOut`] reports. Nothing is stored, so the fallback can start over.
#[inline(always)]
unsafe fn column_chain<const EXACT: bool>(t: &RowTiles, sl: u32, x: &mut [f32; SLICE], maxq: f32) -> ChainOut {
    let mut out = ChainOut { codes: [0; 4], loss: 0.0, max_abs: 0.0, min_key: u32::MAX };
    let s0 = SLICE as u32 * sl;
    // The slice's scales and their reciprocals up front: independent of the chain, so their
    // loads and the reciprocal's latency stay off its critical path.
    let scales: [[f32; 4]; 4] = core::array::from_fn(|q| t.scale.at(s0 + 4 * q as u32).ld4_pure());
    let recips: [[f32; 4]; 4] = core::array::from_fn(|q| core::array::from_fn(|i| recip_for_division(scales[q][i])));
    for4(
        #[inline(always)]
        |cq| {
            let (s4, yd4) = (scales[cq], t.diag_recip.at(s0 + 4 * cq as u32).ld4_pure());
            let zeros = t.zero.at(s0 + 4 * cq as u32).ld_word();
            for4(
                #[inline(always)]
                |ci| {
                    let c = 4 * cq + ci;
                    let xc = x[c];
                    let urow = t.u.at((s0 + c as u32) * BLOCK + s0); // U[s0 + c, s0 ..]
                    let own = urow.at(4 * cq as u32).ld4_pure(); // holds the diagonal
                    let (s, z, d) = (s4[ci], ((zeros >> (8 * ci)) & 0xff) as f32, own[ci]);
                    let (q, e) = if EXACT {
                        let q = quantize(xc, s, z, maxq);
                        (q, (xc - dequantize(q, s, z)) / d)
                    } else {
                        out.max_abs = out.max_abs.max(xc.abs());
                        out.min_key = out.min_key.min((xc.to_bits() << 1).wrapping_sub(1));
                        let q = quantize_scaled(div_by_recip(xc, s, recips[cq][ci]), z, maxq);
                        (q, div_by_recip(xc - dequantize(q, s, z), d, yd4[ci]))
                    };
                    out.codes[cq] |= (q as u32) << (8 * ci);
                    x[c] = e;
                    out.loss = fma(e, e, out.loss);
                    for4(
                        #[inline(always)]
                        |ji| {
                            if ji > ci {
                                x[4 * cq + ji] = fma(-e, own[ji], x[4 * cq + ji]);
                            }
                        },
                    );
                    for4(
                        #[inline(always)]
                        |jq| {
                            if jq > cq {
                                let u4 = urow.at(4 * jq as u32).ld4_pure();
                                for4(
                                    #[inline(always)]
                                    |ji| x[4 * jq + ji] = fma(-e, u4[ji], x[4 * jq + ji]),
                                );
                            }
                        },
                    );
                },
            );
        },
    );
    out
}

/// The chain warp: for each block of the panel, once the workers have staged its working
/// weights and tiles (barrier B1), every lane runs its row's recurrence slice by slice,
/// handing each slice's errors to the updater warps and waiting for the next slice to carry
/// them; barrier B2 hands the block's errors and codes back.
#[inline(always)]
pub(super) unsafe fn chain_warp<const RPC: usize>(p: &Panel, lane: u32) {
    let row_ok = (lane as usize) < RPC && p.row0 + lane < p.rows;
    let mut loss_acc = 0f32;
    let nb = (p.p1 - p.p0) / BLOCK;
    meet!(CHAIN_B1_B2); // B1 of block 0
    let mut b = 0;
    while b < nb {
        let buf = b % 2;
        // Reciprocals of U's diagonal, one per column, shared by every row.
        let u_blk = p.u_block(buf);
        let mut diag_ok = true;
        let mut h = 0;
        while h < 2 {
            let c = lane + 32 * h;
            let d = u_blk.at(c * BLOCK + c).ld();
            p.diag_recip().at(c).st(recip_for_division(d));
            diag_ok &= (DIAG_MIN..=DIAG_MAX).contains(&d);
            h += 1;
        }
        let flags = p.slow_flags();
        if !vote_all(diag_ok) && lane == 0 {
            flags.at(RPC as u32).st(1); // sticky for the panel
        }
        sync_warp();
        let slow = if (lane as usize) < RPC { flags.at(lane).ld() | flags.at(RPC as u32).ld() } else { 0 };
        let rows = RowTiles::new(p, lane, buf);
        let mut sl = 0;
        while sl < SLICES {
            if sl > 0 {
                meet!(CHAIN_WAITS_SLICE); // slice sl has every earlier update
            }
            if (lane as usize) < RPC {
                let mut x = rows.load_x(sl);
                let mut out = column_chain::<false>(&rows, sl, &mut x, p.maxq);
                if slow != 0 || !out.fast_division_exact() {
                    // Rare: an operand outside the fast division's range; redo with IEEE `/`.
                    x = rows.load_x(sl);
                    out = column_chain::<true>(&rows, sl, &mut x, p.maxq);
                }
                rows.store_slice(sl, &x, &out.codes);
                if row_ok {
                    loss_acc += out.loss;
                }
            }
            if sl + 1 < SLICES {
                meet!(CHAIN_STORES_SLICE); // slice sl's errors are stored
            }
            sl += 1;
        }
        meet!(CHAIN_B1_B2); // B2 of block b
        if b + 1 < nb {
            meet!(CHAIN_B1_B2); // B1 of block b + 1
        }
        b += 1;
    }
    if row_ok {
        *p.loss.add((p.row0 + lane) as usize) += 0.5 * loss_acc; // panels add up
    }
}
