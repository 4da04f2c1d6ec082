//! Scalar numerics of `forge-numerics` against independent references (docs/design.md §2, §7):
//! the `half` crate for f16/bf16, the E4M3 formula evaluated in f64, std's f64 `exp2`/`log2`
//! for the qmeta4 tables and encode, and the true-division `quantize` for its fast path.
//!
//! The exhaustive log2 check over every positive finite f32 is `#[ignore]`d because it takes
//! about a minute in release mode; run it with
//! `cargo test --release -p forge-numerics -- --ignored`.

use forge_numerics::qmeta::EXP2_FRAC_Q63;
use forge_numerics::{
    bf16_bits_to_f32, decode_log2_q88, encode_log2_q88, f16_bits_to_f32, fp8_e4m3_to_f32, linspace_f32, log2_f32_rn,
    maxq, quantize, quantize_scaled, quantize_with_reciprocal, reciprocal_is_safe, MIN_SCALE,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// dtype widening
// ---------------------------------------------------------------------------------------------

#[test]
fn f16_widening_equals_half_crate_on_all_65536_patterns() {
    for h in 0..=u16::MAX {
        let ours = f16_bits_to_f32(h);
        let theirs = half::f16::from_bits(h).to_f32();
        if theirs.is_nan() {
            assert!(ours.is_nan(), "f16 {h:#06x}: half gives NaN, ours {ours:e}");
        } else {
            assert_eq!(ours.to_bits(), theirs.to_bits(), "f16 {h:#06x}: ours {ours:e}, half {theirs:e}");
        }
    }
}

#[test]
fn bf16_widening_equals_half_crate_on_all_65536_patterns() {
    for b in 0..=u16::MAX {
        let ours = bf16_bits_to_f32(b);
        let theirs = half::bf16::from_bits(b).to_f32();
        if theirs.is_nan() {
            assert!(ours.is_nan(), "bf16 {b:#06x}: half gives NaN, ours {ours:e}");
        } else {
            assert_eq!(ours.to_bits(), theirs.to_bits(), "bf16 {b:#06x}: ours {ours:e}, half {theirs:e}");
        }
    }
}

/// OCP E4M3 (`float8_e4m3fn`) from its definition, in f64: `None` for NaN (`S.1111.111`).
fn e4m3_formula(v: u8) -> Option<f64> {
    let sign = if v & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((v >> 3) & 0xf) as i32;
    let m = (v & 0x7) as f64;
    if e == 15 && m == 7.0 {
        None
    } else if e >= 1 {
        Some(sign * 2f64.powi(e - 7) * (1.0 + m / 8.0))
    } else {
        Some(sign * 2f64.powi(-6) * (m / 8.0))
    }
}

#[test]
fn fp8_e4m3_widening_equals_the_format_definition_on_all_256_patterns() {
    let mut max_finite = 0f32;
    let mut nans = 0;
    for v in 0..=u8::MAX {
        let ours = fp8_e4m3_to_f32(v);
        match e4m3_formula(v) {
            None => {
                assert!(ours.is_nan(), "e4m3 {v:#04x}: expected NaN, got {ours:e}");
                nans += 1;
            }
            Some(want) => {
                let want32 = want as f32;
                assert_eq!(want32 as f64, want, "every E4M3 value is an f32");
                // Bits, so that the sign of zero (0x80 is -0.0) is checked too.
                assert_eq!(ours.to_bits(), want32.to_bits(), "e4m3 {v:#04x}: ours {ours:e}, definition {want:e}");
                max_finite = max_finite.max(ours);
            }
        }
    }
    assert_eq!(nans, 2, "exactly 0x7f and 0xff are NaN");
    assert_eq!(max_finite, 448.0, "E4M3 max is 1.75·2^8");
    assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0);
    assert_eq!(fp8_e4m3_to_f32(0xfe), -448.0);
}

// ---------------------------------------------------------------------------------------------
// qmeta4 decode table and encode
// ---------------------------------------------------------------------------------------------

#[test]
fn exp2_table_matches_f64_exp2_and_is_increasing() {
    let two63 = 2f64.powi(63);
    let mut exact_in_f64 = 0;
    for j in 0..256usize {
        let t = EXP2_FRAC_Q63[j];
        // 2^(j/256)·2^63 in f64 is an integer (53 bits scaled by 2^63), exactly a u64.
        let reference = (j as f64 / 256.0).exp2() * two63;
        let diff = (t as i128 - reference as u64 as i128).unsigned_abs() as f64;
        assert!(
            diff <= 2f64.powi(-52) * t as f64,
            "EXP2_FRAC_Q63[{j}] = {t:#x} is {diff} units (of 2^-63) from f64 exp2 {reference:e}"
        );
        exact_in_f64 += (t as f64 == reference) as usize;
        if j > 0 {
            assert!(t > EXP2_FRAC_Q63[j - 1], "table not increasing at {j}");
        }
    }
    assert_eq!(EXP2_FRAC_Q63[0], 1u64 << 63, "2^0 is exactly 2^63 in Q1.63");
    eprintln!("exp2 table: {exact_in_f64} of 256 entries round to exactly the f64 exp2");
}

/// Far tighter than f64 allows: 2^(j/256)·2^((256−j)/256) = 2 and 2^(a/256)·2^(b/256) =
/// 2^((a+b)/256), checked in 128-bit integers, so each entry is right to about 2^-62.
#[test]
fn exp2_table_is_multiplicatively_consistent() {
    let t = |j: usize| EXP2_FRAC_Q63[j] as u128;
    for j in 1..256 {
        // t_j·t_{256−j} ≈ 2·2^126 = 2^127; each entry is within 0.5 of its true value, so the
        // product is within 0.5·(t_j + t_k) + 0.25 < 2^64 + 1 of 2^127.
        let p = t(j) * t(256 - j);
        let d = p.abs_diff(1u128 << 127);
        assert!(d <= (1u128 << 64) + 1, "t[{j}]·t[{}] off by {d}", 256 - j);
    }
    for a in 0..256 {
        for b in 0..(256 - a) {
            // (t_a·t_b) >> 63 ≈ t_{a+b}: same error budget divided by 2^63, plus truncation.
            let p = (t(a) * t(b)) >> 63;
            let d = p.abs_diff(t(a + b));
            assert!(d <= 3, "t[{a}]·t[{b}]/2^63 is {d} from t[{}]", a + b);
        }
    }
}

/// The spec's encode before the i16 conversion, with std's f64 `log2` rounded to f32 (for a
/// positive finite `x`).
fn encode_reference_q(x: f32) -> f32 {
    (((x as f64).log2() as f32) * 256.0).round_ties_even()
}

fn encode_ours_q(x: f32) -> f32 {
    (log2_f32_rn(x) * 256.0).round_ties_even()
}

/// Checks `log2_f32_rn` on the f32 bit patterns yielded by `bits`: the Q8.8 encode must equal
/// the reference's; f32 log2 values that differ (harmless unless the encode differs) are
/// counted. Returns (checked, log2 mismatches, encode mismatches as (bits, ours, reference)).
fn check_log2(bits: impl Iterator<Item = u32>) -> (u64, u64, Vec<(u32, f32, f32)>) {
    let (mut n, mut log2_diff, mut bad) = (0u64, 0u64, Vec::new());
    for b in bits {
        let x = f32::from_bits(b);
        debug_assert!(x > 0.0 && x.is_finite());
        let ours = log2_f32_rn(x);
        let reference = (x as f64).log2() as f32;
        n += 1;
        if ours.to_bits() != reference.to_bits() {
            log2_diff += 1;
            if encode_ours_q(x) != encode_reference_q(x) && bad.len() < 16 {
                bad.push((b, ours, reference));
            }
        }
    }
    (n, log2_diff, bad)
}

/// 2^e as an f32 built from its bits, for e in -149..=127 (subnormals included).
fn pow2(e: i32) -> f32 {
    if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        f32::from_bits(1u32 << (e + 149))
    }
}

const POS_FINITE: std::ops::Range<u32> = 1..0x7f80_0000;

/// Every positive finite f32 (2^31 − 2^23 − 1 patterns). Long: about a minute in release mode.
/// Run with `cargo test --release -p forge-numerics -- --ignored`.
#[test]
#[ignore = "exhaustive over 2^31 f32 patterns; run with `cargo test --release -p forge-numerics -- --ignored`"]
fn log2_encode_equals_f64_log2_on_every_positive_f32() {
    let start = std::time::Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let chunk = POS_FINITE.end.div_ceil(threads);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let lo = (t * chunk).max(POS_FINITE.start);
                let hi = ((t + 1) * chunk).min(POS_FINITE.end);
                s.spawn(move || check_log2(lo..hi))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let n: u64 = results.iter().map(|r| r.0).sum();
    let log2_diff: u64 = results.iter().map(|r| r.1).sum();
    let bad: Vec<_> = results.iter().flat_map(|r| r.2.iter().copied()).collect();
    eprintln!(
        "log2 exhaustive: {n} patterns in {:.1?} on {threads} threads; f32 log2 differs from \
         f64-log2-rounded on {log2_diff}, encode differs on {}",
        start.elapsed(),
        bad.len()
    );
    assert_eq!(n, (1u64 << 31) - (1 << 23) - 1);
    assert!(bad.is_empty(), "encode differs (bits, ours, reference): {bad:?}");
}

/// A fast subset of the exhaustive check: every 97th pattern, every power of two (subnormal
/// ones included), and ±16 ulp around every Q8.8 midpoint 2^((k+0.5)/256) in the f32 range,
/// where a wrong last bit of log2 would flip the encode.
#[test]
fn log2_encode_equals_f64_log2_on_strided_powers_and_midpoints() {
    let strided = check_log2(POS_FINITE.step_by(97));
    assert!(strided.2.is_empty(), "strided: encode differs: {:?}", strided.2);

    let powers = check_log2((0..254u32).map(|e| (e + 1) << 23).chain((0..23).map(|k| 1u32 << k)));
    assert_eq!(powers.0, 254 + 23);
    assert!(powers.2.is_empty(), "powers of two: encode differs: {:?}", powers.2);
    for e in -149i32..128 {
        let x = pow2(e);
        assert_eq!((x as f64).log2(), e as f64);
        assert_eq!(log2_f32_rn(x), e as f32, "log2(2^{e}) is exact");
    }

    let mut near = Vec::new();
    for k in (-149 * 256)..(128 * 256) {
        let mid = ((k as f64 + 0.5) / 256.0).exp2() as f32;
        if !(mid > 0.0 && mid.is_finite()) {
            continue;
        }
        let b = mid.to_bits();
        near.extend((b.saturating_sub(16)..=b + 16).filter(|b| POS_FINITE.contains(b)));
    }
    let mids = check_log2(near.iter().copied());
    assert!(mids.2.is_empty(), "midpoints: encode differs: {:?}", mids.2);
    // The full encode (clamp + saturation) agrees with the reference there as well.
    for &b in &near {
        let x = f32::from_bits(b);
        let want = encode_reference_q(x.max(MIN_SCALE)) as i16; // `as` saturates like the spec
        assert_eq!(encode_log2_q88(x), want, "encode({x:e})");
    }
    eprintln!(
        "log2: {} strided + {} powers + {} near-midpoint patterns; f32 log2 differs on {}",
        strided.0,
        powers.0,
        mids.0,
        strided.1 + powers.1 + mids.1
    );
}

#[test]
fn encode_clamps_tiny_and_saturates_huge() {
    let at_min = encode_log2_q88(MIN_SCALE);
    // Derived independently: round_half_even(RN_f32(log2(1e-12)) · 256).
    assert_eq!(at_min as f32, encode_reference_q(1e-12));
    for tiny in [0.0, -0.0, 1e-30, 1e-13, f32::from_bits(1), -1.0, f32::NEG_INFINITY] {
        assert_eq!(encode_log2_q88(tiny), at_min, "encode({tiny:e}) takes the 1e-12 clamp");
    }
    // Just above the clamp, the encode is no longer the clamp's (unless equal after rounding).
    assert_eq!(encode_log2_q88(2e-12), encode_reference_q(2e-12) as i16);
    assert!(encode_log2_q88(2e-12) > at_min);
    // log2(f32::MAX) rounds to 128 in f32, 128·256 = 32768 does not fit an i16.
    assert_eq!(encode_reference_q(f32::MAX), 32768.0);
    assert_eq!(encode_log2_q88(f32::MAX), i16::MAX);
    assert_eq!(encode_log2_q88(f32::INFINITY), i16::MAX);
    assert_eq!(encode_log2_q88(pow2(127)), 127 * 256);
    assert_eq!(encode_log2_q88(pow2(-39)), -39 * 256);
}

#[test]
fn decode_is_increasing_and_encode_inverts_it_above_the_clamp() {
    let at_min = encode_log2_q88(MIN_SCALE);
    let mut prev = 0f32;
    for q in i16::MIN..=i16::MAX {
        let d = decode_log2_q88(q);
        assert!(d > prev && d.is_finite(), "decode({q}) = {d:e} after {prev:e}");
        prev = d;
        if d >= MIN_SCALE {
            assert_eq!(encode_log2_q88(d), q, "encode(decode({q}) = {d:e})");
        } else {
            assert_eq!(encode_log2_q88(d), at_min);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// decode(encode(s)) is s to within the Q8.8 step: |log2 ratio| ≤ 1/512, plus f32's
    /// rounding of log2 (half an ulp of |log2 s| < 128: 2^-18) and the decode's (2^-24).
    #[test]
    fn decode_encode_round_trip_is_within_half_a_q88_step(u in -12.0f64..30.0) {
        let s = 10f64.powf(u) as f32;
        prop_assume!(s >= MIN_SCALE);
        let d = decode_log2_q88(encode_log2_q88(s));
        let err = ((d as f64).log2() - (s as f64).log2()).abs();
        prop_assert!(err <= 1.0 / 512.0 + 2f64.powi(-17), "s {s:e} → {d:e}: |log2 ratio| {err}");
    }

    #[test]
    fn encode_is_monotonic(a in 0f32..1e38, b in 0f32..1e38) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        prop_assert!(encode_log2_q88(lo) <= encode_log2_q88(hi));
    }
}

// ---------------------------------------------------------------------------------------------
// quantize: reciprocal fast path vs true division
// ---------------------------------------------------------------------------------------------

/// Finite f32 of every class: normal (uniform over bit patterns: huge and tiny), subnormal, ±0.
fn any_finite_f32() -> impl Strategy<Value = f32> {
    use proptest::num::f32::*;
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
}

/// `x` moved by `ulps` f32 steps (towards +inf for positive `ulps`), staying finite.
fn step_ulps(x: f32, ulps: i32) -> f32 {
    let mut y = x;
    for _ in 0..ulps.unsigned_abs() {
        y = if ulps > 0 { y.next_up() } else { y.next_down() };
    }
    if y.is_finite() {
        y
    } else {
        x
    }
}

fn check_reciprocal(x: f32, scale: f32, qzero: f32, maxq: f32) -> Result<(), TestCaseError> {
    let inv = 1.0 / scale;
    if !reciprocal_is_safe(inv) {
        return Ok(());
    }
    let slow = quantize(x, scale, qzero, maxq);
    let fast = quantize_with_reciprocal(x, scale, inv, qzero, maxq);
    prop_assert_eq!(
        fast.to_bits(),
        slow.to_bits(),
        "x {:e} scale {:e} q0 {} maxq {}: reciprocal {} vs division {}",
        x,
        scale,
        qzero,
        maxq,
        fast,
        slow
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn reciprocal_quantize_equals_division_on_any_x(
        x in any_finite_f32(),
        q88 in any::<i16>(),
        qzero in 0u32..=255,
        maxq in prop::sample::select(vec![3.0f32, 7.0, 15.0, 255.0]),
    ) {
        let scale = decode_log2_q88(q88);
        prop_assume!(reciprocal_is_safe(1.0 / scale));
        check_reciprocal(x, scale, qzero as f32, maxq)?;
    }

    /// x near `(k + 0.5 − q0)·s`, a few ulps either side: the codes the fast path must not
    /// round differently.
    #[test]
    fn reciprocal_quantize_equals_division_near_half_integers(
        k in -300i32..300,
        ulps in -40i32..=40,
        q88 in any::<i16>(),
        qzero in 0u32..=255,
        maxq in prop::sample::select(vec![3.0f32, 7.0, 15.0, 255.0]),
    ) {
        let scale = decode_log2_q88(q88);
        prop_assume!(reciprocal_is_safe(1.0 / scale));
        let x = ((k as f64 + 0.5 - qzero as f64) * scale as f64) as f32;
        check_reciprocal(step_ulps(x, ulps), scale, qzero as f32, maxq)?;
    }
}

/// Exact ties: `x = (c − q0)·s` with `c` a half-integer. Where the product is an f32, `x / s`
/// is exactly `c − q0`, so the spec's code is `clamp(round_half_even(c))`, derived here
/// without the library; the reciprocal path must agree with the division there and on the
/// 2 ulps either side. Scales: every 7th decoded Q8.8 scale (24-bit mantissas: exact only for
/// `c − q0 = ±½`, otherwise the nearest f32 to the tie) and `m·2^e` with an 11-bit `m`, whose
/// products with every half-integer code are exact.
#[test]
fn reciprocal_quantize_equals_division_on_exact_ties() {
    let mut scales: Vec<f32> = (i16::MIN..=i16::MAX).step_by(7).map(decode_log2_q88).collect();
    let n_decoded = scales.len();
    for e in [-140, -126, -60, -20, -9, -1, 0, 7, 40, 100] {
        for m in (1..2048u32).step_by(6) {
            scales.push(m as f32 * pow2(e));
        }
    }
    let configs = [(3u32, 2u32), (15, 8), (15, 0), (255, 128), (255, 0)];
    let (mut exact_ties, mut small_mantissa_cases, mut checked) = (0u64, 0u64, 0u64);
    for (i, &s) in scales.iter().enumerate() {
        let safe = reciprocal_is_safe(1.0 / s);
        for (maxq, q0) in configs {
            let (maxq, q0) = (maxq as f32, q0 as f32);
            for h in -1..=(maxq as i32 + 1) {
                let c = h as f64 + 0.5;
                let x_exact = (c - q0 as f64) * s as f64; // ≤ 10 + 24 bits: exact in f64
                let x = x_exact as f32;
                small_mantissa_cases += (i >= n_decoded) as u64;
                if x as f64 == x_exact {
                    let want = (c as f32).round_ties_even().clamp(0.0, maxq);
                    let got = quantize(x, s, q0, maxq);
                    assert_eq!(got, want, "quantize({x:e}, {s:e}, {q0}, {maxq}) at the exact tie {c}");
                    exact_ties += 1;
                }
                if !safe {
                    continue;
                }
                for d in -2..=2 {
                    let xd = step_ulps(x, d);
                    let slow = quantize(xd, s, q0, maxq);
                    let fast = quantize_with_reciprocal(xd, s, 1.0 / s, q0, maxq);
                    assert_eq!(
                        fast.to_bits(),
                        slow.to_bits(),
                        "x {xd:e} scale {s:e} q0 {q0} maxq {maxq}: reciprocal {fast} vs \
                         division {slow}"
                    );
                    checked += 1;
                }
            }
        }
    }
    // Every small-mantissa product is exact (≤ 21 bits, within the f32 range): the test must
    // have exercised at least those ties.
    assert!(
        exact_ties >= small_mantissa_cases,
        "only {exact_ties} exact ties of {small_mantissa_cases} small-mantissa cases"
    );
    eprintln!(
        "exact ties: {exact_ties} ({small_mantissa_cases} from small-mantissa scales); \
         reciprocal comparisons: {checked}"
    );
}

// ---------------------------------------------------------------------------------------------
// linspace
// ---------------------------------------------------------------------------------------------

#[test]
fn default_linspace_runs_from_one_to_point_two() {
    let v: Vec<f32> = (0..100).map(|i| linspace_f32(1.0, 0.2, 100, i)).collect();
    assert_eq!(v[0], 1.0);
    assert_eq!(v[99], 0.2);
    for i in 0..100 {
        let exact = 1.0 - 0.8 * i as f64 / 99.0;
        assert!((v[i] as f64 - exact).abs() <= 1e-6, "linspace[{i}] = {} vs {exact}", v[i]);
        if i > 0 {
            assert!(v[i] < v[i - 1], "not strictly decreasing at {i}");
        }
    }
}

proptest! {
    #[test]
    fn linspace_endpoints_monotonic_and_accurate(end in 0.01f32..0.9, steps in 2u32..=1024) {
        let v: Vec<f32> = (0..steps).map(|i| linspace_f32(1.0, end, steps, i)).collect();
        prop_assert_eq!(v[0], 1.0);
        prop_assert_eq!(v[steps as usize - 1], end);
        for i in 0..steps as usize {
            let exact = 1.0 + (end as f64 - 1.0) * i as f64 / (steps - 1) as f64;
            prop_assert!((v[i] as f64 - exact).abs() <= 1e-6, "[{}] {} vs {}", i, v[i], exact);
            if i > 0 {
                prop_assert!(v[i] < v[i - 1], "not decreasing at {}", i);
            }
        }
    }
}

/// The clamp the spec applies after rounding (`torch.clamp`, lower bound first, NaN → 0).
fn spec_clamp(q: f32, maxq: f32) -> f32 {
    let q = if q > 0.0 { q } else { 0.0 };
    if q < maxq {
        q
    } else {
        maxq
    }
}

/// `quantize_scaled` rounds with two adds instead of a round; the clamped code must equal
/// the spec's `clamp(round_half_even(t + q0))` for every f32 `t`, midpoints and huge values
/// included.
#[test]
fn quantize_scaled_equals_round_half_even_then_clamp() {
    let mut cases: Vec<f32> = vec![
        0.0,
        -0.0,
        0.5,
        -0.5,
        1.5,
        2.5,
        -1.5,
        254.5,
        255.5,
        256.5,
        4_194_304.5,
        8_388_607.5,
        8_388_608.0,
        12_582_912.0,
        -12_582_912.0,
        16_777_216.0,
        -8_388_609.0,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        1e-45,
        -1e-45,
    ];
    // Every half-integer and its neighbours up to 2^12, and a sweep of raw bit patterns.
    for k in -8192i32..8192 {
        let m = k as f32 + 0.5;
        cases.extend([m, m.next_up(), m.next_down()]);
    }
    let mut bits = 0x1234_5678u32;
    for _ in 0..400_000 {
        bits = bits.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        cases.push(f32::from_bits(bits));
    }
    for &t in &cases {
        for bits in [2u32, 3, 4, 8] {
            let maxq = maxq(bits);
            for q0 in [0.0f32, 1.0, (maxq + 1.0) / 2.0, maxq] {
                let want = spec_clamp((t + q0).round_ties_even(), maxq);
                let got = quantize_scaled(t, q0, maxq);
                assert_eq!(got.to_bits(), want.to_bits(), "t = {t:e} ({:#x}), q0 = {q0}, bits = {bits}", t.to_bits());
            }
        }
    }
}
