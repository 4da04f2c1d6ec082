//! Exact 8-bit codes → packed 16-bit `(q − z)` pairs, the first half of the W8A16 kernels'
//! dequantization (the scale multiply follows in packed 16-bit FMAs, as at 4 bits). The
//! kernels run these byte permutations as PTX `prmt` with the selectors below; the functions
//! here are the same sequence on the host ([`byte_perm`] is `prmt`'s default mode), so the
//! tests prove the selectors and the exactness without a GPU.
//!
//! Why two routes: 4-bit codes become `MAGIC + q` by or-ing a 16-bit exponent in, but
//! `MAGIC + q` for `q < 256` needs 9 significant bits past an offset. f16 has 11, so its
//! magic 1024 still works (`0x6400 | q`). bf16 has 8, so a byte goes through f32 instead:
//! `2^23 + q` (`0x4B00_0000 | q`) minus `2^23 + z` is `q − z` exactly, and an integer of at
//! most 8 bits is exact in bf16, whose bits are then the f32's upper half.

/// `prmt.b32 d, a, b, sel` (default mode): byte `i` of the result is byte `sel >> 4i & 7` of
/// the eight bytes `b:a` (`a` bytes 0–3, `b` bytes 4–7). Selector nibbles here never set bit
/// 3 (sign replication), which this does not model.
#[inline]
pub const fn byte_perm(a: u32, b: u32, sel: u32) -> u32 {
    let bytes = ((b as u64) << 32) | a as u64;
    let mut d = 0u32;
    let mut i = 0;
    while i < 4 {
        let s = (sel >> (4 * i)) & 7;
        d |= (((bytes >> (8 * s)) & 0xff) as u32) << (8 * i);
        i += 1;
    }
    d
}

/// f16 `(1024, 1024)`: the magic pair the f16 route permutes codes into.
pub const F16_MAGIC2: u32 = 0x6400_6400;
/// Selectors of the f16 route: pair `p` of a word is `(1024 + byte 2p, 1024 + byte 2p+1)`, its
/// halves' low bytes the code bytes and their high bytes `0x64` (byte 5 and 7 of
/// `F16_MAGIC2:word`).
pub const F16_PAIR_SEL: [u32; 2] = [0x7150, 0x7352];
/// f32 `2^23`: the bf16 route's magic.
pub const F32_MAGIC: u32 = 0x4B00_0000;
/// Selectors of the bf16 route: byte `b` of a word into `F32_MAGIC`'s low byte, `2^23 + q`.
pub const F32_BYTE_SEL: [u32; 4] = [0x7540, 0x7541, 0x7542, 0x7543];
/// The upper halves of two f32 (`a`'s into the low half): an exact f32 → bf16 pair where both
/// have zero low halves.
pub const HIGH_HALVES_SEL: u32 = 0x7632;

/// The bf16 route's per-record constant: f32 bits of `−(2^23 + z)`.
#[inline]
pub const fn bf16_route_neg_zero(z: u32) -> u32 {
    0x8000_0000 | (F32_MAGIC + z)
}

/// The f16 route's per-record constant: f16 bits of `−(1024 + z)` in both halves (what the
/// kernel's 4-bit records hold for f16, valid up to `z = 255` too).
#[inline]
pub const fn f16_route_neg_zero2(z: u32) -> u32 {
    let h = 0x8000 | (0x6400 + z);
    h | (h << 16)
}

/// bf16 pairs `(q_{2p} − z, q_{2p+1} − z)` of the word `w` of four code bytes, `p = 0, 1`, by
/// the kernel's sequence: four permutes into `2^23 + q`, four f32 additions of
/// [`bf16_route_neg_zero`] (exact: both operands and the result are integers below `2^24`),
/// two permutes of the upper halves.
#[inline]
pub fn centered_pairs_bf16(w: u32, neg_zero: u32) -> [u32; 2] {
    let nz = f32::from_bits(neg_zero);
    let f = |b: usize| (f32::from_bits(byte_perm(w, F32_MAGIC, F32_BYTE_SEL[b])) + nz).to_bits();
    [byte_perm(f(0), f(1), HIGH_HALVES_SEL), byte_perm(f(2), f(3), HIGH_HALVES_SEL)]
}

/// The f16 route's pairs before the subtraction: `(1024 + q_{2p}, 1024 + q_{2p+1})`.
#[inline]
pub const fn magic_pairs_f16(w: u32) -> [u32; 2] {
    [byte_perm(w, F16_MAGIC2, F16_PAIR_SEL[0]), byte_perm(w, F16_MAGIC2, F16_PAIR_SEL[1])]
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{bf16_bits_to_f32, f16_bits_to_f32};

    #[test]
    fn byte_perm_follows_the_ptx_definition() {
        // PTX ISA, prmt: {b7..b4} = b, {b3..b0} = a; selector 0x3210 is a, 0x7654 is b.
        let (a, b) = (0x4433_2211, 0x8877_6655);
        assert_eq!(byte_perm(a, b, 0x3210), a);
        assert_eq!(byte_perm(a, b, 0x7654), b);
        assert_eq!(byte_perm(a, b, 0x0123), 0x1122_3344);
        assert_eq!(byte_perm(a, b, 0x7150), 0x8822_6611);
    }

    /// Every pair of code bytes and every zero point: the bf16 route gives `q − z` exactly,
    /// in both halves, for both pairs of the word.
    #[test]
    fn bf16_route_is_exact_for_every_code_and_zero() {
        for z in 0..256u32 {
            let nz = bf16_route_neg_zero(z);
            assert_eq!(f32::from_bits(nz), -(8_388_608.0 + z as f32));
            for q0 in 0..256u32 {
                for q1 in (0..256u32).step_by(if z % 17 == 0 { 1 } else { 15 }) {
                    let w = q0 | (q1 << 8) | (q1 << 16) | (q0 << 24);
                    let [lo, hi] = centered_pairs_bf16(w, nz);
                    let want = [q0 as f32 - z as f32, q1 as f32 - z as f32];
                    let got = [bf16_bits_to_f32(lo as u16), bf16_bits_to_f32((lo >> 16) as u16)];
                    assert_eq!(got, want, "q = ({q0}, {q1}), z = {z}");
                    let got = [bf16_bits_to_f32(hi as u16), bf16_bits_to_f32((hi >> 16) as u16)];
                    assert_eq!(got, [want[1], want[0]], "q = ({q1}, {q0}), z = {z}");
                }
            }
        }
    }

    /// The f16 route: every code byte lands as `1024 + q` in its half, and `−(1024 + z)` is
    /// an exact f16 for every zero point, so the kernel's packed `x·1 + nz` is `q − z` exactly.
    #[test]
    fn f16_route_is_exact_for_every_code_and_zero() {
        for q in 0..256u32 {
            for (p, shift) in [(0usize, 0), (0, 8), (1, 16), (1, 24)] {
                let pairs = magic_pairs_f16(q << shift);
                let half = if shift % 16 == 0 { pairs[p] as u16 } else { (pairs[p] >> 16) as u16 };
                assert_eq!(f16_bits_to_f32(half), 1024.0 + q as f32, "byte at {shift}, q = {q}");
            }
        }
        for z in 0..256u32 {
            let nz = f16_route_neg_zero2(z);
            assert_eq!(nz >> 16, nz & 0xffff);
            assert_eq!(f16_bits_to_f32(nz as u16), -(1024.0 + z as f32));
            // 1024 + q and −(1024 + z) are f16 integers of one binade; their sum, |q − z| ≤ 255,
            // is exact in f16 (11 significant bits), so the FMA's one rounding does nothing.
            for q in 0..256u32 {
                let s = f16_bits_to_f32(0x6400 + q as u16) + f16_bits_to_f32(nz as u16);
                assert_eq!(f16_bits_to_f32(crate::f32_to_f16_bits(s)), q as f32 - z as f32);
            }
        }
    }
}
