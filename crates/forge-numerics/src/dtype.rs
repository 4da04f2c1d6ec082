//! Exact widening of the supported weight dtypes to f32, bit manipulation only, so the CPU
//! reference and the kernels read the same values. (The `half` crate does this on the host,
//! but the kernels cannot depend on registry crates; the tests check both agree.)

/// IEEE binary16 bits → f32 (exact; subnormals, ±inf and NaN preserved).
#[inline]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = if exp == 0x1f {
        sign | 0x7f80_0000 | (mant << 13)
    } else if exp != 0 {
        sign | ((exp + 112) << 23) | (mant << 13)
    } else if mant == 0 {
        sign
    } else {
        // Subnormal half: value = mant · 2^-24; normalise into an f32.
        let shift = mant.leading_zeros() - 21; // bring the leading 1 to bit 10
        let m = (mant << shift) & 0x3ff;
        sign | ((113 - shift) << 23) | (m << 13)
    };
    f32::from_bits(bits)
}

/// bfloat16 bits → f32 (bf16 is the top half of an f32).
#[inline]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// OCP fp8 E4M3 (`float8_e4m3fn`: bias 7, no infinities, `S.1111.111` is NaN, max 448) → f32.
#[inline]
pub fn fp8_e4m3_to_f32(v: u8) -> f32 {
    let sign = ((v as u32) & 0x80) << 24;
    let exp = ((v >> 3) & 0xf) as u32;
    let mant = (v & 0x7) as u32;
    let bits = if exp == 0xf && mant == 0x7 {
        sign | 0x7fc0_0000
    } else if exp != 0 {
        sign | ((exp + 120) << 23) | (mant << 20)
    } else if mant == 0 {
        sign
    } else {
        // Subnormal: value = mant · 2^-9.
        let shift = mant.leading_zeros() - 29; // bring the leading 1 to bit 2
        let m = (mant << shift) & 0x3;
        sign | ((120 - shift) << 23) | (m << 21)
    };
    f32::from_bits(bits)
}

/// One element of a block-scaled FP8-E4M3 weight (DeepSeek-V3 `weight_scale_inv`):
/// `f32(q) · scale`, one f32 multiply (no fused rounding), the arithmetic of DeepSeek's
/// `weight_dequant`. The CPU reference and the kernel both call this.
#[inline]
pub fn fp8_block_dequant(q: u8, scale: f32) -> f32 {
    fp8_e4m3_to_f32(q) * scale
}
