//! qmeta4 against the reference vectors of the seed spec's own PyTorch reference.

mod common;

use common::vector;
use forge_numerics::decode_log2_q88;
use fourbit_forge::grid::build_quant_grid;
use fourbit_forge::{GridConfig, QMetaPacked, ScaleSearch, WeightView};
use ndarray::ArrayView2;

#[test]
fn encode_is_bit_exact_on_every_vector() {
    let (scale, _) = vector::<f32>("encode.scale");
    let (qzero, _) = vector::<f32>("encode.qzero");
    let (expected, shape) = vector::<u8>("encode.expected");
    assert_eq!(shape, vec![scale.len(), 4]);
    let mut bad = Vec::new();
    for (i, (&s, &z)) in scale.iter().zip(&qzero).enumerate() {
        let got = QMetaPacked::encode(s, z, false).to_bytes();
        if got[..] != expected[4 * i..4 * i + 4] {
            bad.push((i, s, z, got, expected[4 * i..4 * i + 4].to_vec()));
        }
    }
    assert!(bad.is_empty(), "{} of {} encodes differ, first: {:?}", bad.len(), scale.len(), &bad[..bad.len().min(5)]);
}

/// Correctly rounded f32 of 2^(q/256) from f64 exp2, or None where the f64 value is too close
/// to an f32 rounding boundary to decide (never seen, but the test must not assume it).
fn exp2_correctly_rounded(q: i16) -> Option<f32> {
    let v = (q as f64 / 256.0).exp2();
    let r = v as f32;
    let (lo, hi) = (f32::from_bits(r.to_bits().wrapping_sub(1)) as f64, f32::from_bits(r.to_bits() + 1) as f64);
    let half_gap = ((r as f64 - lo).min(hi - r as f64)) / 2.0;
    let from_boundary = half_gap - (v - r as f64).abs();
    (from_boundary > v * 1e-15).then_some(r)
}

#[test]
fn decode_is_correctly_rounded_and_within_one_ulp_of_the_vectors() {
    let (q88, _) = vector::<i16>("decode.q88");
    let (torch, _) = vector::<f32>("decode.scale");
    assert_eq!(q88.len(), 65536);
    let (mut undecided, mut differ_from_torch) = (0, 0);
    for (&q, &t) in q88.iter().zip(&torch) {
        let ours = decode_log2_q88(q);
        match exp2_correctly_rounded(q) {
            Some(cr) => assert_eq!(ours.to_bits(), cr.to_bits(), "q88 {q}: ours {ours:e}, correctly rounded {cr:e}"),
            None => undecided += 1,
        }
        let ulps = (ours.to_bits() as i64 - t.to_bits() as i64).abs();
        assert!(ulps <= 1, "q88 {q}: ours {ours:e} is {ulps} ulp from torch {t:e}");
        differ_from_torch += (ulps == 1) as usize;
    }
    assert!(undecided < 4, "{undecided} decodes could not be checked against f64 exp2");
    eprintln!("decode: {differ_from_torch} of 65536 differ from torch.exp2 by 1 ulp (torch is not correctly rounded)");
}

#[test]
fn absmax_grid_is_bit_exact_for_every_bits_sym_gs() {
    let mut checked = 0;
    for gs in [32usize, 64, 128] {
        let (x, shape) = vector::<f32>(&format!("grid.gs{gs}.x"));
        let x = ArrayView2::from_shape((shape[0], shape[1]), &x).unwrap();
        for bits in [2u32, 3, 4, 8] {
            for sym in [true, false] {
                let name = format!("grid.gs{gs}.b{bits}.{}.qmeta", if sym { "sym" } else { "asym" });
                let (expected, _) = vector::<u8>(&name);
                let cfg = GridConfig {
                    group_size: gs,
                    bits,
                    symmetric: sym,
                    scale_search: ScaleSearch::Absmax,
                    ..GridConfig::default()
                };
                let grid = build_quant_grid(WeightView::F32(x), &cfg).unwrap();
                assert_eq!(grid.qmeta.dim(), (shape[0], 1, 4));
                let got = grid.qmeta.as_slice().unwrap();
                let diff = got.chunks(4).zip(expected.chunks(4)).position(|(a, b)| a != b);
                assert_eq!(diff, None, "{name}: first differing row {diff:?}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 24);
}
