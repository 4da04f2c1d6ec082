//! Stored scales (issue 12) against the `half` crate: every qmeta4 record in every scale
//! dtype, and the f32 → f16 / bf16 rounding itself on edge cases and random bit patterns.

use forge_numerics::{decode_log2_q88, f32_to_bf16_bits, f32_to_f16_bits, round_to_dtype, stored_scale, ScaleDtype};
use proptest::prelude::*;

#[test]
fn stored_scale_equals_half_crate_on_all_65536_records() {
    let mut f16_zero = 0;
    let mut f16_inf = 0;
    for q in i16::MIN..=i16::MAX {
        let decoded = decode_log2_q88(q);
        assert_eq!(stored_scale(q, ScaleDtype::F32).to_bits(), decoded.to_bits(), "q88 {q}: f32 must be the decode");
        let h = half::f16::from_f32(decoded).to_f32();
        let ours = stored_scale(q, ScaleDtype::F16);
        assert_eq!(ours.to_bits(), h.to_bits(), "q88 {q}: f16 ours {ours:e}, half {h:e} (decoded {decoded:e})");
        let b = half::bf16::from_f32(decoded).to_f32();
        let ours = stored_scale(q, ScaleDtype::BF16);
        assert_eq!(ours.to_bits(), b.to_bits(), "q88 {q}: bf16 ours {ours:e}, half {b:e} (decoded {decoded:e})");
        f16_zero += (h == 0.0) as u32;
        f16_inf += h.is_infinite() as u32;
    }
    // The sweep covers f16's underflow and overflow, not only its normal range.
    assert!(f16_zero > 0 && f16_inf > 0, "f16 zero {f16_zero}, inf {f16_inf}");
}

fn check_bits(x: f32) {
    let h = half::f16::from_f32(x);
    let ours = f32_to_f16_bits(x);
    if h.is_nan() {
        assert!(half::f16::from_bits(ours).is_nan(), "{x:e} ({:#010x}): half NaN, ours {ours:#06x}", x.to_bits());
    } else {
        assert_eq!(ours, h.to_bits(), "{x:e} ({:#010x}) → f16", x.to_bits());
    }
    let b = half::bf16::from_f32(x);
    let ours = f32_to_bf16_bits(x);
    if b.is_nan() {
        assert!(half::bf16::from_bits(ours).is_nan(), "{x:e}: half NaN, ours {ours:#06x}");
    } else {
        assert_eq!(ours, b.to_bits(), "{x:e} ({:#010x}) → bf16", x.to_bits());
    }
}

#[test]
fn rounding_edge_cases_equal_half_crate() {
    let mut cases = vec![
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        f32::MAX,
        65504.0,
        65519.99,
        65520.0,
        5.960_464_5e-8, // 2^-24, the smallest f16 subnormal
        2.980_232_2e-8, // 2^-25: a tie that rounds to zero
        6.103_515_6e-5, // 2^-14, the smallest f16 normal
    ];
    // Every half-way point between adjacent f16 values near powers of two and subnormals.
    for e in -30i32..=17 {
        let p = 2f32.powi(e);
        for k in 0..=1100u32 {
            cases.push(p * (1.0 + k as f32 / 1024.0));
            cases.push(p * (1.0 + (k as f32 + 0.5) / 1024.0));
            cases.push(-p * (1.0 + (k as f32 + 0.5) / 128.0));
        }
    }
    for x in cases {
        check_bits(x);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]
    #[test]
    fn rounding_random_bit_patterns_equal_half_crate(bits in any::<u32>()) {
        check_bits(f32::from_bits(bits));
    }

    #[test]
    fn round_to_dtype_is_idempotent(bits in any::<u32>()) {
        let x = f32::from_bits(bits);
        prop_assume!(x.is_finite());
        for d in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16] {
            let once = round_to_dtype(x, d);
            prop_assert_eq!(round_to_dtype(once, d).to_bits(), once.to_bits());
        }
    }
}

/// The W4A16 kernel's fast scale decode (table + exponent add, full decode outside the normal
/// range) is `stored_scale` in bf16 / f16 on every record, and both paths are exercised.
#[test]
fn fast_stored_scale_bits_equal_stored_scale_on_all_65536_records() {
    let (mut fast, mut slow) = (0u32, 0u32);
    for q in i16::MIN..=i16::MAX {
        let b = forge_numerics::stored_scale_bits_bf16(q);
        assert_eq!((b as u32) << 16, stored_scale(q, ScaleDtype::BF16).to_bits(), "q88 {q}: bf16 fast decode");
        let h = forge_numerics::stored_scale_bits_f16(q);
        let want = f32_to_f16_bits(stored_scale(q, ScaleDtype::F16));
        assert_eq!(h, want, "q88 {q}: f16 fast decode");
        let e = (q as i32) >> 8;
        if (-14..=14).contains(&e) {
            fast += 1
        } else {
            slow += 1
        }
    }
    assert!(fast > 0 && slow > 0);
}

/// The kernel argument code round-trips, and an unknown code means f32 (the decode as is).
#[test]
fn scale_dtype_kernel_codes_round_trip() {
    for d in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16] {
        assert_eq!(ScaleDtype::from_u32(d.to_u32()), d);
    }
    assert_eq!(ScaleDtype::from_u32(7), ScaleDtype::F32);
    assert_eq!(ScaleDtype::default(), ScaleDtype::F32);
}
