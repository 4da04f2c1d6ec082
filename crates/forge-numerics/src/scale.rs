//! Scales as a checkpoint stores them (issue 12).
//!
//! A qmeta4 record decodes to the correctly rounded f32 `2^(q88/256)`; a checkpoint stores
//! that scale in its `scale_dtype`. Runtimes dequantize with the stored value, so the scale
//! the solver must quantize against is [`stored_scale`]: the f32 decode rounded once more,
//! to nearest-even, into f16 or bf16 (and widened back exactly). Bit manipulation only, so
//! host and kernels agree; the tests check it against the `half` crate on every record.

use crate::{bf16_bits_to_f32, decode_log2_q88, f16_bits_to_f32};

/// The element type a checkpoint stores its scales in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ScaleDtype {
    /// IEEE binary32: the decoded qmeta4 scale unchanged.
    #[default]
    F32,
    /// IEEE binary16 (GPTQ checkpoints; fp16 serving).
    F16,
    /// bfloat16 (bf16 serving; what most compressed-tensors checkpoints use).
    BF16,
}

impl ScaleDtype {
    /// Bytes per stored scale.
    #[inline]
    pub const fn size(self) -> usize {
        match self {
            ScaleDtype::F32 => 4,
            ScaleDtype::F16 | ScaleDtype::BF16 => 2,
        }
    }

    /// The dtype as a kernel argument: 0 = f32, 1 = f16, 2 = bf16.
    #[inline]
    pub const fn to_u32(self) -> u32 {
        match self {
            ScaleDtype::F32 => 0,
            ScaleDtype::F16 => 1,
            ScaleDtype::BF16 => 2,
        }
    }

    /// Inverse of [`ScaleDtype::to_u32`]; any other value is f32 (hosts pass only the three).
    #[inline]
    pub const fn from_u32(code: u32) -> Self {
        match code {
            1 => ScaleDtype::F16,
            2 => ScaleDtype::BF16,
            _ => ScaleDtype::F32,
        }
    }
}

/// `x` rounded to nearest-even into IEEE binary16 bits: subnormals kept, overflow to ±inf,
/// NaN stays NaN (quiet, sign kept).
#[inline]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0xff {
        // inf stays inf; NaN keeps its top payload bits and is forced quiet.
        let nan = if mant != 0 { 0x0200 | (mant >> 13) as u16 } else { 0 };
        return sign | 0x7c00 | nan;
    }
    // Unbiased exponent of x; f16 normals have −14..=15.
    let e = exp - 127;
    if e > 15 {
        return sign | 0x7c00;
    }
    if e >= -14 {
        // Normal f16: keep 10 of the 23 mantissa bits, round the 13 dropped ones.
        let half_exp = ((e + 15) as u32) << 10;
        let kept = mant >> 13;
        let rem = mant & 0x1fff;
        let round_up = rem > 0x1000 || (rem == 0x1000 && kept & 1 == 1);
        // A carry out of the mantissa bumps the exponent, and from 0x7bff gives inf: both exact.
        return sign | (half_exp + kept + round_up as u32) as u16;
    }
    // Subnormal f16 (unit 2^-24) or underflow. Value = m·2^(e−23) with the implicit bit.
    if exp == 0 {
        // f32 zero or subnormal (< 2^-126): far below half of 2^-24.
        return sign;
    }
    let m = mant | 0x80_0000;
    // Shift so the result is in units of 2^-24: drop (−14 − e) + 13 bits.
    let drop = (-14 - e) as u32 + 13;
    if drop > 24 {
        // Below 2^-25 (half the smallest subnormal): rounds to zero.
        return sign;
    }
    let kept = m >> drop;
    let rem = m & ((1u32 << drop) - 1);
    let half = 1u32 << (drop - 1);
    let round_up = rem > half || (rem == half && kept & 1 == 1);
    // A round-up to 0x400 is exactly the smallest normal's bit pattern.
    sign | (kept + round_up as u32) as u16
}

/// `x` rounded to nearest-even into bfloat16 bits (the top half of an f32): overflow to ±inf,
/// NaN stays NaN (quiet, sign kept).
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let kept = bits >> 16;
    let rem = bits & 0xffff;
    let round_up = rem > 0x8000 || (rem == 0x8000 && kept & 1 == 1);
    // A carry propagates into the exponent (and to inf from the largest finite): exact.
    (kept + round_up as u32) as u16
}

/// `x` rounded to nearest-even into `dtype` and widened back to f32 exactly.
#[inline]
pub fn round_to_dtype(x: f32, dtype: ScaleDtype) -> f32 {
    match dtype {
        ScaleDtype::F32 => x,
        ScaleDtype::F16 => f16_bits_to_f32(f32_to_f16_bits(x)),
        ScaleDtype::BF16 => bf16_bits_to_f32(f32_to_bf16_bits(x)),
    }
}

/// The scale a checkpoint with `dtype` scales stores for the record `q88`, as f32: the
/// correctly rounded `2^(q88/256)` rounded to nearest-even into `dtype`. In f16 scales below
/// 2^-25 become 0 and scales of 65520 and above become +inf; callers that write checkpoints
/// check for the latter.
#[inline]
pub fn stored_scale(q88: i16, dtype: ScaleDtype) -> f32 {
    round_to_dtype(decode_log2_q88(q88), dtype)
}

/// `2^(j/256)` for `j` in `0..256` as the runtime kernel reads it: the correctly rounded f32,
/// rounded once more to nearest-even into a 16-bit float with `mant_bits` stored mantissa
/// bits (7: bf16, 10: f16), as that format's bits with exponent field `bias` (the value is in
/// `[1, 2]`, so 2.0 where the second rounding carries). Integer-only, so it runs in `const`.
const fn frac_table_16(mant_bits: u32, bias: u32) -> [u16; 256] {
    let mut out = [0u16; 256];
    let mut j = 0;
    while j < 256 {
        let m = crate::qmeta::EXP2_FRAC_Q63[j]; // 2^(j/256)·2^63, in [2^63, 2^64)
                                                // f32: keep 24 of the 64 bits, ties to even (a carry to 2^24 is exactly 2.0).
        let kept = m >> 40;
        let rem = m & ((1u64 << 40) - 1);
        let up = rem > (1u64 << 39) || (rem == (1u64 << 39) && kept & 1 == 1);
        let f = kept + up as u64; // in [2^23, 2^24]
                                  // The 16-bit format: keep 1 + mant_bits of the 24, ties to even.
        let drop = 23 - mant_bits;
        let kept = f >> drop;
        let rem = f & ((1u64 << drop) - 1);
        let half = 1u64 << (drop - 1);
        let up = rem > half || (rem == half && kept & 1 == 1);
        let r = kept + up as u64; // in [2^mant_bits, 2^(mant_bits+1)]
        out[j] = if r == 1u64 << (mant_bits + 1) {
            ((bias + 1) << mant_bits) as u16
        } else {
            ((bias << mant_bits) as u64 | (r & ((1u64 << mant_bits) - 1))) as u16
        };
        j += 1;
    }
    out
}

/// bf16 bits of `round_bf16(2^(j/256))` (see [`stored_scale_bits_bf16`]).
pub const STORED_FRAC_BF16: [u16; 256] = frac_table_16(7, 127);
/// f16 bits of `round_f16(2^(j/256))` (see [`stored_scale_bits_f16`]).
pub const STORED_FRAC_F16: [u16; 256] = frac_table_16(10, 15);

/// bf16 bits of [`stored_scale`]`(q88, BF16)` (the scale the W4A16 kernel multiplies by),
/// fast: for `e = ⌊q88/256⌋ ∈ [−126, 126]` the result is normal, and scaling by `2^e` commutes
/// with both roundings, so it is the table entry of `q88 mod 256` with `e` added to its
/// exponent; outside that range it falls back to the full decode. Equal to `stored_scale`
/// on all 65 536 records (tested).
#[inline(always)]
pub fn stored_scale_bits_bf16(q88: i16) -> u16 {
    stored_scale_bits_bf16_with(q88, |j| STORED_FRAC_BF16[j])
}

/// [`stored_scale_bits_bf16`] with the table read through `frac` (index `q88 mod 256`): a
/// kernel passes a copy of [`STORED_FRAC_BF16`] in shared memory.
#[inline(always)]
pub fn stored_scale_bits_bf16_with(q88: i16, frac: impl Fn(usize) -> u16) -> u16 {
    let e = (q88 as i32) >> 8;
    if (-126..=126).contains(&e) {
        (frac((q88 as i32 & 0xff) as usize) as i32 + (e << 7)) as u16
    } else {
        f32_to_bf16_bits(decode_log2_q88(q88))
    }
}

/// f16 bits of [`stored_scale`]`(q88, F16)`, as [`stored_scale_bits_bf16`] with the f16
/// normal range (`e ∈ [−14, 14]` on the fast path).
#[inline(always)]
pub fn stored_scale_bits_f16(q88: i16) -> u16 {
    stored_scale_bits_f16_with(q88, |j| STORED_FRAC_F16[j])
}

/// [`stored_scale_bits_f16`] with the table read through `frac` (see
/// [`stored_scale_bits_bf16_with`]).
#[inline(always)]
pub fn stored_scale_bits_f16_with(q88: i16, frac: impl Fn(usize) -> u16) -> u16 {
    let e = (q88 as i32) >> 8;
    if (-14..=14).contains(&e) {
        (frac((q88 as i32 & 0xff) as usize) as i32 + (e << 10)) as u16
    } else {
        f32_to_f16_bits(decode_log2_q88(q88))
    }
}
