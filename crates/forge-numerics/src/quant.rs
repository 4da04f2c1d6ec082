//! Quantize / dequantize and the range (absmax) meta of one group (docs/design.md §2–3).

use crate::round_ties_even;

/// Scales are clamped to at least this before encoding (the spec's `1e-12`).
pub const MIN_SCALE: f32 = 1e-12;

/// `2^bits − 1` as f32 (bits in 2..=8 are validated by the host API).
#[inline]
pub fn maxq(bits: u32) -> f32 {
    ((1u32 << bits) - 1) as f32
}

/// `clamp(round_half_even(x / scale + qzero), 0, maxq)` with a true f32 division.
#[inline]
pub fn quantize(x: f32, scale: f32, qzero: f32, maxq: f32) -> f32 {
    quantize_scaled(x / scale, qzero, maxq)
}

/// [`quantize`] after its division: `clamp(round_half_even(x_over_scale + qzero), 0, maxq)`.
/// The GPU solver divides its own way (the same correctly rounded quotient) and shares the rest.
#[inline]
pub fn quantize_scaled(x_over_scale: f32, qzero: f32, maxq: f32) -> f32 {
    clamp_code(round_for_code(x_over_scale + qzero), maxq)
}

/// `round_half_even(v)` as far as [`clamp_code`] can tell: `(v + 1.5·2^23) − 1.5·2^23` rounds
/// ties to even exactly for `|v| ≤ 2^23`; beyond that it stays within 1 of `v` (same sign,
/// far outside `0..=maxq`), and NaN and ±inf pass through, so the clamped code is the same.
/// Two adds: on the GPU a dependent chain of fixed-latency ops instead of a round, whose
/// variable latency sits on the solver's critical path.
#[inline(always)]
fn round_for_code(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23
    (v + MAGIC) - MAGIC
}

#[inline(always)]
fn clamp_code(q: f32, maxq: f32) -> f32 {
    // torch.clamp order: lower bound first; a NaN code (never produced from finite data) → 0,
    // and −0 → +0 (the select, unlike a min/max, fixes the zero's sign on every target).
    // Then q ≥ +0 and maxq ≥ 1, where `min` is exact: one instruction on the GPU.
    let q = if q > 0.0 { q } else { 0.0 };
    q.min(maxq)
}

/// The same code as [`quantize`], computed with a multiply by `inv_scale = 1/scale` and an
/// exact fallback to the division when the product lands near a rounding midpoint.
///
/// Why it is exact: `x·RN(1/s)` is within `2^-23·|x/s|` of `x/s`, and the reference's
/// `RN(x/s) + q0` is within `2^-24·|t|` of its own exact value; any disagreement needs
/// `t = x·inv + q0` within `2·(2^-23·|x/s| + 2^-24·|t|) < 2^-20·(|t| + |q0| + 1)` of a
/// half-integer, which takes the slow path. A non-finite `t` (0·inf, overflow) also does.
/// `inv_scale` must be `RN(1/scale)` and a normal f32 (see [`reciprocal_is_safe`]).
#[inline]
pub fn quantize_with_reciprocal(x: f32, scale: f32, inv_scale: f32, qzero: f32, maxq: f32) -> f32 {
    let t = x * inv_scale + qzero;
    let r = round_ties_even(t);
    let dist = ((t - r).abs() - 0.5).abs();
    if dist > (t.abs() + qzero.abs() + 1.0) * (1.0 / 1_048_576.0) {
        clamp_code(r, maxq)
    } else {
        quantize(x, scale, qzero, maxq)
    }
}

/// Whether `1/scale` may be used by [`quantize_with_reciprocal`]: it must be a normal f32
/// (a subnormal or infinite reciprocal loses the relative accuracy the proof needs).
#[inline]
pub fn reciprocal_is_safe(inv_scale: f32) -> bool {
    (f32::MIN_POSITIVE..=f32::MAX).contains(&inv_scale)
}

/// `(q − qzero) · scale`.
#[inline]
pub fn dequantize(q: f32, scale: f32, qzero: f32) -> f32 {
    (q - qzero) * scale
}

/// Unencoded range meta of one group: the scale and zero point before qmeta4 encoding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RangeMeta {
    /// Scale before encoding (`+ 1e-12` included, as the spec).
    pub scale: f32,
    /// Zero point before rounding to u8.
    pub qzero: f32,
}

/// Range (absmax) meta from a group's min and max, as the seed's CUDA kernel (docs/design.md §3):
/// symmetric `s = (2/maxq)·max(|min|,|max|) + 1e-12, q0 = (maxq+1)/2`;
/// asymmetric `s = (max−min)/maxq + 1e-12, q0 = clamp(round(−min/s), 0, maxq)`.
#[inline]
pub fn range_meta(xmin: f32, xmax: f32, maxq: f32, symmetric: bool) -> RangeMeta {
    if symmetric {
        let amax = xmin.abs().max(xmax.abs());
        RangeMeta { scale: (2.0 / maxq) * amax + MIN_SCALE, qzero: (maxq + 1.0) * 0.5 }
    } else {
        let scale = (xmax - xmin) / maxq + MIN_SCALE;
        RangeMeta { scale, qzero: clamp_code(round_ties_even(-xmin / scale), maxq) }
    }
}

/// Element `i` of `torch.linspace(start, end, steps)` in f32, with torch's symmetric
/// formula (the first half counts up from `start`, the second half down from `end`), so
/// default MSE candidates equal the PyTorch peers' bit for bit.
#[inline]
pub fn linspace_f32(start: f32, end: f32, steps: u32, i: u32) -> f32 {
    if steps <= 1 {
        return start;
    }
    let step = (end - start) / (steps - 1) as f32;
    if i < steps / 2 {
        start + step * i as f32
    } else {
        end - step * (steps - 1 - i) as f32
    }
}
