//! qmeta4: the 4-byte per-group record `[lo(q88), hi(q88), qzero, flags]` (docs/design.md §2).
//!
//! * encode: `q88 = round_half_even(RN_f32(log2(max(scale, 1e-12))) * 256)`, saturating to
//!   i16. The f32 rounding of log2 is part of the spec (it decides ties at Q8.8 midpoints),
//!   so we compute log2 in f64 (error below 2^-46) and round that to f32: the correctly
//!   rounded f32 log2 the PyTorch reference matches.
//! * decode: the correctly rounded f32 of `2^(q88/256)`, from a 256-entry table of
//!   `2^(j/256)` in 1.63 fixed point. Integer-only, so CPU and GPU give identical bits.

use crate::round_ties_even;

/// One qmeta4 record. `#[repr(C)]`, 4 bytes, little-endian on every supported target.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "bytemuck", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct QMetaPacked {
    /// `log2(scale)` in Q8.8 fixed point.
    pub log2_scale_q88: i16,
    /// Zero point, already rounded and clamped to `0..=255`.
    pub qzero: u8,
    /// bit 0: symmetric; bits 1..7 reserved (0).
    pub flags: u8,
}

/// `flags` bit 0: the group was quantized symmetrically.
pub const FLAG_SYMMETRIC: u8 = 1;

impl QMetaPacked {
    /// Encodes a scale and (unrounded) zero point exactly as the spec's encode path.
    #[inline]
    pub fn encode(scale: f32, qzero: f32, symmetric: bool) -> Self {
        QMetaPacked {
            log2_scale_q88: encode_log2_q88(scale),
            qzero: encode_qzero(qzero),
            flags: if symmetric { FLAG_SYMMETRIC } else { 0 },
        }
    }

    /// The decoded scale (correctly rounded `2^(q88/256)`).
    #[inline]
    pub fn scale(self) -> f32 {
        decode_log2_q88(self.log2_scale_q88)
    }

    /// The zero point as f32 (what quantize/dequantize use).
    #[inline]
    pub fn qzero_f32(self) -> f32 {
        self.qzero as f32
    }

    /// Whether the symmetric flag is set.
    #[inline]
    pub fn is_symmetric(self) -> bool {
        self.flags & FLAG_SYMMETRIC != 0
    }

    /// The record as its 4 bytes `[lo, hi, qzero, flags]`.
    #[inline]
    pub fn to_bytes(self) -> [u8; 4] {
        let q = self.log2_scale_q88.to_le_bytes();
        [q[0], q[1], self.qzero, self.flags]
    }

    /// The record from its 4 bytes `[lo, hi, qzero, flags]`.
    #[inline]
    pub fn from_bytes(b: [u8; 4]) -> Self {
        QMetaPacked { log2_scale_q88: i16::from_le_bytes([b[0], b[1]]), qzero: b[2], flags: b[3] }
    }

    /// The record as one little-endian u32 (how the kernels load and store it).
    #[inline]
    pub fn to_u32(self) -> u32 {
        u32::from_le_bytes(self.to_bytes())
    }

    /// The record from one little-endian u32.
    #[inline]
    pub fn from_u32(v: u32) -> Self {
        Self::from_bytes(v.to_le_bytes())
    }
}

/// `round_half_even(z).clamp(0, 255)`; NaN maps to 0.
#[inline]
pub fn encode_qzero(z: f32) -> u8 {
    let r = round_ties_even(z);
    if r >= 255.0 {
        255
    } else if r > 0.0 {
        r as u8
    } else {
        0
    }
}

/// Q8.8 encode of a scale: `round_half_even(log2_f32(max(scale, 1e-12)) * 256)`, saturating.
#[inline]
pub fn encode_log2_q88(scale: f32) -> i16 {
    // f32::max ignores a NaN operand, so NaN encodes like 0 (callers reject NaN earlier).
    let s = scale.max(crate::MIN_SCALE);
    if s >= f32::INFINITY {
        return i16::MAX;
    }
    let q = round_ties_even(log2_f32_rn(s) * 256.0);
    if q >= i16::MAX as f32 {
        i16::MAX
    } else if q <= i16::MIN as f32 {
        i16::MIN
    } else {
        q as i16
    }
}

/// `log2(x)` rounded to f32, for finite `x > 0`.
///
/// Evaluated in f64 as `k + 2·atanh((m−1)/(m+1))·log2(e)` with `m ∈ [√½, √2)`; the f64 error
/// stays below 2^-46 absolute for every f32 input, far inside the f32 rounding we need.
/// The test suite checks it against glibc's f64 log2 on every positive f32.
#[inline]
pub fn log2_f32_rn(x: f32) -> f32 {
    log2_f64_of_f32(x) as f32
}

/// `log2(x)` in f64 for a finite positive f32 `x` (see [`log2_f32_rn`]).
#[inline]
pub fn log2_f64_of_f32(x: f32) -> f64 {
    const SQRT_2: f64 = core::f64::consts::SQRT_2;
    const LOG2_E: f64 = core::f64::consts::LOG2_E;
    let bits = x.to_bits() & 0x7fff_ffff;
    let mut exp = ((bits >> 23) & 0xff) as i32;
    let mut mant = bits & 0x7f_ffff;
    if exp == 0 {
        // Subnormal input: normalise the mantissa so the implicit bit sits at bit 23.
        if mant == 0 {
            return f64::NEG_INFINITY;
        }
        let shift = mant.leading_zeros() - 8;
        mant = (mant << shift) & 0x7f_ffff;
        exp = 1 - shift as i32;
    }
    let mut m = f64::from_bits(((mant as u64) << 29) | (1023u64 << 52));
    let mut k = exp - 127;
    if m > SQRT_2 {
        m *= 0.5;
        k += 1;
    }
    // m has at most 24 significant bits, so m−1 and m+1 are exact in f64.
    let u = (m - 1.0) / (m + 1.0);
    let u2 = u * u;
    // 2·atanh(u) = 2u·Σ u^(2n)/(2n+1); |u| ≤ 0.1716 so 12 terms leave < 2^-60 relative.
    let mut p = 1.0 / 23.0;
    p = p * u2 + 1.0 / 21.0;
    p = p * u2 + 1.0 / 19.0;
    p = p * u2 + 1.0 / 17.0;
    p = p * u2 + 1.0 / 15.0;
    p = p * u2 + 1.0 / 13.0;
    p = p * u2 + 1.0 / 11.0;
    p = p * u2 + 1.0 / 9.0;
    p = p * u2 + 1.0 / 7.0;
    p = p * u2 + 1.0 / 5.0;
    p = p * u2 + 1.0 / 3.0;
    let two_u = u + u;
    let ln_m = two_u + two_u * (u2 * p);
    k as f64 + ln_m * LOG2_E
}

/// Correctly rounded f32 of `2^(q88/256)` (subnormal results included).
#[inline]
pub fn decode_log2_q88(q88: i16) -> f32 {
    let e = (q88 as i32) >> 8; // floor(q88 / 256), in -128..=127
    let m = EXP2_FRAC_Q63[(q88 as i32 & 0xff) as usize]; // 2^(j/256)·2^63, in [2^63, 2^64)
                                                         // value = m · 2^(e−63). A normal f32 keeps 24 bits of m; a subnormal one (e < −126)
                                                         // keeps fewer: its unit is 2^-149.
    let drop = if e >= -126 { 40 } else { (40 - 126 - e) as u32 };
    let kept = m >> drop;
    let rem = m & ((1u64 << drop) - 1);
    let half = 1u64 << (drop - 1);
    let round_up = rem > half || (rem == half && kept & 1 == 1);
    let r = kept + round_up as u64;
    if e >= -126 {
        let (r, e) = if r == 1 << 24 { (1u64 << 23, e + 1) } else { (r, e) };
        f32::from_bits((((e + 127) as u32) << 23) | (r as u32 & 0x7f_ffff))
    } else {
        // Subnormal (a round-up to 2^23 is exactly the smallest normal's bit pattern).
        f32::from_bits(r as u32)
    }
}

/// `round(2^(j/256) · 2^63)` for j in 0..256, generated by `tools/gen_exp2_table.py`
/// (60-digit decimal arithmetic) and checked against f64 `exp2` by the tests. A `const`, not
/// a `static`: each crate that decodes (the kernels too) then carries its own copy.
pub const EXP2_FRAC_Q63: [u64; 256] = [
    0x8000000000000000,
    0x8058d7d2d5e5f6b1,
    0x80b1ed4fd999ab6c,
    0x810b40a1d81406d4,
    0x8164d1f3bc030773,
    0x81bea1708dde6056,
    0x8218af4373fc25ec,
    0x8272fb97b2a5894c,
    0x82cd8698ac2ba1d7,
    0x83285071e0fc4547,
    0x8383594eefb6ee37,
    0x83dea15b9541b132,
    0x843a28c3acde4046,
    0x8495efb3303efd30,
    0x84f1f656379c1a29,
    0x854e3cd8f9c8c95d,
    0x85aac367cc487b15,
    0x86078a2f23642a9f,
    0x8664915b923fba04,
    0x86c1d919caef5c88,
    0x871f61969e8d1010,
    0x877d2afefd4e256c,
    0x87db357ff698d792,
    0x88398146b919f1d4,
    0x88980e8092da8527,
    0x88f6dd5af155ac6b,
    0x8955ee03618e5fdd,
    0x89b540a7902557a4,
    0x8a14d575496efd9a,
    0x8a74ac9a79896e47,
    0x8ad4c6452c728924,
    0x8b3522a38e1e1032,
    0x8b95c1e3ea8bd6e7,
    0x8bf6a434adde0085,
    0x8c57c9c4646f4dde,
    0x8cb932c1bae97a95,
    0x8d1adf5b7e5ba9e6,
    0x8d7ccfc09c50e2f8,
    0x8ddf042022e69cd6,
    0x8e417ca940e35a01,
    0x8ea4398b45cd53c0,
    0x8f073af5a2013520,
    0x8f6a8117e6c8e5c4,
    0x8fce0c21c6726481,
    0x9031dc431466b1dc,
    0x9095f1abc540ca6b,
    0x90fa4c8beee4b12b,
    0x915eed13c89689d3,
    0x91c3d373ab11c336,
    0x9228ffdc10a051ad,
    0x928e727d9531f9ac,
    0x92f42b88f673aa7c,
    0x935a2b2f13e6e92c,
    0x93c071a0eef94bc1,
    0x9426ff0fab1c04b6,
    0x948dd3ac8ddb7ed3,
    0x94f4efa8fef70961,
    0x955c5336887894d5,
    0x95c3fe86d6cc7fef,
    0x962bf1cbb8d97560,
    0x96942d3720185a00,
    0x96fcb0fb20ac4ba3,
    0x97657d49f17ab08e,
    0x97ce9255ec4357ab,
    0x9837f0518db8a96f,
    0x98a1976f7597e996,
    0x990b87e266c189aa,
    0x9975c1dd47518c77,
    0x99e0459320b7fa65,
    0x9a4b13371fd166ca,
    0x9ab62afc94ff864a,
    0x9b218d16f441d63d,
    0x9b8d39b9d54e5539,
    0x9bf93118f3aa4cc1,
    0x9c6573682ec32c2d,
    0x9cd200db8a0774cb,
    0x9d3ed9a72cffb751,
    0x9dabfdff6367a2aa,
    0x9e196e189d472420,
    0x9e872a276f0b98ff,
    0x9ef5326091a111ae,
    0x9f6386f8e28ba651,
    0x9fd228256400dd06,
    0xa041161b3d0121be,
    0xa0b0510fb9714fc2,
    0xa11fd9384a344cf7,
    0xa18faeca8544b6e4,
    0xa1ffd1fc25cea188,
    0xa27043030c496819,
    0xa2e102153e918f9e,
    0xa3520f68e802bb93,
    0xa3c36b345991b47c,
    0xa43515ae09e6809e,
    0xa4a70f0c95768ec5,
    0xa5195786be9ef339,
    0xa58bef536dbeb6ee,
    0xa5fed6a9b15138ea,
    0xa6720dc0be08a20c,
    0xa6e594cfeee86b1e,
    0xa7596c0ec55ff55b,
    0xa7cd93b4e965356a,
    0xa8420bfa298f70d1,
    0xa8b6d5167b320e09,
    0xa92bef41fa77771b,
    0xa9a15ab4ea7c0ef8,
    0xaa1717a7b5693979,
    0xaa8d2652ec907629,
    0xab0386ef48868de1,
    0xab7a39b5a93ed337,
    0xabf13edf162675e9,
    0xac6896a4be3fe929,
    0xace0413ff83e5d04,
    0xad583eea42a14ac6,
    0xadd08fdd43d01491,
    0xae493452ca35b80e,
    0xaec22c84cc5c9465,
    0xaf3b78ad690a4375,
    0xafb51906e75b8661,
    0xb02f0dcbb6e04584,
    0xb0a957366fb7a3c9,
    0xb123f581d2ac2590,
    0xb19ee8e8c94feb09,
    0xb21a31a66618fe3b,
    0xb295cff5e47db4a4,
    0xb311c412a9112489,
    0xb38e0e38419fae18,
    0xb40aaea2654b9841,
    0xb487a58cf4a9c180,
    0xb504f333f9de6484,
    0xb58297d3a8b9f0d2,
    0xb60093a85ed5f76c,
    0xb67ee6eea3b22b8f,
    0xb6fd91e328d17791,
    0xb77c94c2c9d725e9,
    0xb7fbefca8ca41e7c,
    0xb87ba337a1743834,
    0xb8fbaf4762fb9ee9,
    0xb97c143756844dbf,
    0xb9fcd2452c0b9deb,
    0xba7de9aebe5fea09,
    0xbaff5ab2133e45fb,
    0xbb81258d5b704b6f,
    0xbc034a7ef2e9fb0d,
    0xbc85c9c560e7b269,
    0xbd08a39f580c36bf,
    0xbd8bd84bb67ed483,
    0xbe0f6809860993e2,
    0xbe935317fc378238,
    0xbf1799b67a731083,
    0xbf9c3c248e2486f8,
    0xc0213aa1f0d08db0,
    0xc0a6956e8836ca8d,
    0xc12c4cca66709456,
    0xc1b260f5ca0fbb33,
    0xc238d2311e3d6673,
    0xc2bfa0bcfad907c9,
    0xc346ccda24976407,
    0xc3ce56c98d21b15d,
    0xc4563ecc5334cb33,
    0xc4de8523c2c07baa,
    0xc5672a115506dadd,
    0xc5f02dd6b0bbc3d9,
    0xc67990b5aa245f79,
    0xc70352f04336c51e,
    0xc78d74c8abb9b15d,
    0xc817f681416452b2,
    0xc8a2d85c8ffe2c45,
    0xc92e1a9d517f0ecc,
    0xc9b9bd866e2f27a3,
    0xca45c15afcc72624,
    0xcad2265e4290774e,
    0xcb5eecd3b38597c9,
    0xcbec14fef2727c5d,
    0xcc799f23d11510e5,
    0xcd078b86503dcdd2,
    0xcd95da6a9ff06445,
    0xce248c151f8480e4,
    0xceb3a0ca5dc6a55d,
    0xcf4318cf191918c1,
    0xcfd2f4683f94eeb5,
    0xd06333daef2b2595,
    0xd0f3d76c75c5db8d,
    0xd184df6251699ac6,
    0xd2164c023056bcab,
    0xd2a81d91f12ae45a,
    0xd33a5457a3029054,
    0xd3ccf099859ac379,
    0xd45ff29e0972c561,
    0xd4f35aabcfedfa1f,
    0xd5872909ab75d18a,
    0xd61b5dfe9f9bce07,
    0xd6aff9d1e13ba2fe,
    0xd744fccad69d6af4,
    0xd7da67311797f56a,
    0xd870394c6db32c84,
    0xd9067364d44a929c,
    0xd99d15c278afd7b6,
    0xda3420adba4d8704,
    0xdacb946f2ac9cc72,
    0xdb63714f8e295255,
    0xdbfbb797daf23755,
    0xdc9467913a4f1c92,
    0xdd2d818508324c20,
    0xddc705bcd378f7f0,
    0xde60f4825e0e9124,
    0xdefb4e1f9d1037f2,
    0xdf9612deb8f04420,
    0xe031430a0d99e627,
    0xe0ccdeec2a94e111,
    0xe168e6cfd3295d23,
    0xe2055afffe83d369,
    0xe2a23bc7d7d91226,
    0xe33f8972be8a5a51,
    0xe3dd444c46499619,
    0xe47b6ca0373da88d,
    0xe51a02ba8e26d681,
    0xe5b906e77c8348a8,
    0xe658797368b3a717,
    0xe6f85aaaee1fce22,
    0xe798aadadd5b9cbf,
    0xe8396a503c4bdc68,
    0xe8da9958464b42ab,
    0xe97c38406c4f8c57,
    0xea1e4756550eb27b,
    0xeac0c6e7dd24392f,
    0xeb63b74317369840,
    0xec0718b64c1cbddc,
    0xecaaeb8ffb03ab41,
    0xed4f301ed9942b84,
    0xedf3e6b1d418a491,
    0xee990f980da3025b,
    0xef3eab20e032bc6b,
    0xefe4b99bdcdaf5cb,
    0xf08b3b58cbe8b76a,
    0xf13230a7ad094509,
    0xf1d999d8b7708cc1,
    0xf281773c59ffb13a,
    0xf329c9233b6bae9c,
    0xf3d28fde3a641a5b,
    0xf47bcbbe6db9fddf,
    0xf5257d152486cc2c,
    0xf5cfa433e6537290,
    0xf67a416c733f846e,
    0xf7255510c4288239,
    0xf7d0df730ad13bb9,
    0xf87ce0e5b2094d9c,
    0xf92959bb5dd4ba74,
    0xf9d64a46eb939f35,
    0xfa83b2db722a033a,
    0xfb3193cc4227c3f4,
    0xfbdfed6ce5f09c49,
    0xfc8ec01121e447bb,
    0xfd3e0c0cf486c175,
    0xfdedd1b496a89f35,
    0xfe9e115c7b8f884c,
    0xff4ecb59511ec8a5,
];
