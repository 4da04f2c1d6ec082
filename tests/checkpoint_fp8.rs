//! The CPU reference of block-scaled FP8-E4M3 dequantization (DeepSeek-V3 `weight_dequant`:
//! `w[i,j] = fp8(q[i,j]) · scale_inv[i/128, j/128]`, partial edge tiles) against values
//! derived by hand, and the FP8 encoder used to build test checkpoints.

use fourbit_forge::checkpoint::fp8::{check_scale_shape, dequantize_fp8_blocks, f32_to_fp8_e4m3, BlockScales};
use fourbit_forge::checkpoint::st::TensorInfo;
use fourbit_forge::numerics::fp8_e4m3_to_f32;
use fourbit_forge::ForgeError;
use proptest::prelude::*;
use safetensors::Dtype;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// 130 × 259 with 128 × 128 blocks: scales 2 × 3, the last tile row holds 2 rows, the last
/// tile column 3 columns.
fn odd_weight() -> (Vec<u8>, usize, usize) {
    let (rows, cols) = (130usize, 259usize);
    let mut q = vec![0u8; rows * cols];
    let mut set = |r: usize, c: usize, code: u8| q[r * cols + c] = code;
    set(0, 0, 0x38); // +1.0  (exponent 0111 = bias, mantissa 000)
    set(127, 127, 0x40); // +2.0  (last element of tile (0,0))
    set(127, 128, 0x40); // +2.0  (first column of tile (0,1))
    set(128, 0, 0xb8); // −1.0  (first row of tile (1,0))
    set(0, 256, 0x7e); // +448  (largest finite, tile (0,2))
    set(129, 200, 0x3c); // +1.5  (mantissa 100, tile (1,1))
    set(129, 258, 0x01); // +2^-9 (smallest subnormal, last element, tile (1,2))
    set(5, 130, 0x80); // −0.0
    (q, rows, cols)
}

const SCALES: [f32; 6] = [0.5, 2.0, 0.25, 3.0, 1.5, 0.125];

fn expected_hand() -> Vec<((usize, usize), f32)> {
    vec![
        ((0, 0), 0.5),              // 1.0 · s[0][0] = 0.5
        ((127, 127), 1.0),          // 2.0 · 0.5
        ((127, 128), 4.0),          // 2.0 · s[0][1] = 2.0
        ((128, 0), -3.0),           // −1.0 · s[1][0] = 3.0
        ((0, 256), 112.0),          // 448 · s[0][2] = 0.25
        ((129, 200), 2.25),         // 1.5 · s[1][1] = 1.5
        ((129, 258), 1.0 / 4096.0), // 2^-9 · 2^-3
        ((1, 1), 0.0),
    ]
}

#[test]
fn odd_shape_matches_hand_derivation_for_every_scale_dtype() {
    let (q, rows, cols) = odd_weight();
    let f32s = f32_bytes(&SCALES);
    let bf16s: Vec<u8> = SCALES.iter().flat_map(|&s| half::bf16::from_f32(s).to_le_bytes()).collect();
    let f16s: Vec<u8> = SCALES.iter().flat_map(|&s| half::f16::from_f32(s).to_le_bytes()).collect();
    for (bytes, dtype) in [(&f32s, Dtype::F32), (&bf16s, Dtype::BF16), (&f16s, Dtype::F16)] {
        let scales = BlockScales { bytes, dtype, shape: (2, 3) };
        let w = dequantize_fp8_blocks(&q, rows, cols, scales, (128, 128)).unwrap();
        assert_eq!(w.dim(), (rows, cols));
        for ((r, c), want) in expected_hand() {
            assert_eq!(w[[r, c]], want, "({r}, {c}) with {dtype:?} scales");
        }
        assert!(w[[5, 130]] == 0.0 && w[[5, 130]].is_sign_negative(), "−0 stays −0");
        // Everything else is a zero code.
        let nonzero = w.iter().filter(|v| **v != 0.0).count();
        assert_eq!(nonzero, 7);
    }
}

#[test]
fn non_square_blocks_and_single_tile() {
    // 3 × 5 with 2 × 4 blocks: scales 2 × 2; element (2, 4) is in tile (1, 1).
    let q: Vec<u8> = vec![0x38; 15];
    let s = f32_bytes(&[1.0, 10.0, 100.0, 1000.0]);
    let w =
        dequantize_fp8_blocks(&q, 3, 5, BlockScales { bytes: &s, dtype: Dtype::F32, shape: (2, 2) }, (2, 4)).unwrap();
    let want = [[1.0, 1.0, 1.0, 1.0, 10.0], [1.0, 1.0, 1.0, 1.0, 10.0], [100.0, 100.0, 100.0, 100.0, 1000.0]];
    for r in 0..3 {
        for c in 0..5 {
            assert_eq!(w[[r, c]], want[r][c], "({r}, {c})");
        }
    }
    // A weight smaller than one block has a single scale.
    let s = f32_bytes(&[0.25]);
    let w = dequantize_fp8_blocks(
        &[0x40, 0xc0],
        1,
        2,
        BlockScales { bytes: &s, dtype: Dtype::F32, shape: (1, 1) },
        (128, 128),
    )
    .unwrap();
    assert_eq!(w.as_slice().unwrap(), &[0.5, -0.5]);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (mut q, rows, cols) = odd_weight();
    let s = f32_bytes(&SCALES);
    let scales = BlockScales { bytes: &s, dtype: Dtype::F32, shape: (2, 3) };
    // Scales of the wrong shape (the full-tile count 1 × 2 instead of the ceil 2 × 3).
    let short = f32_bytes(&SCALES[..2]);
    let err = dequantize_fp8_blocks(
        &q,
        rows,
        cols,
        BlockScales { bytes: &short, dtype: Dtype::F32, shape: (1, 2) },
        (128, 128),
    )
    .unwrap_err();
    assert!(matches!(err, ForgeError::Shape(_)), "{err}");
    // Weight bytes that disagree with the shape.
    assert!(matches!(dequantize_fp8_blocks(&q[1..], rows, cols, scales, (128, 128)), Err(ForgeError::Shape(_))));
    // A NaN code (S.1111.111).
    q[7] = 0x7f;
    let err = dequantize_fp8_blocks(&q, rows, cols, scales, (128, 128)).unwrap_err();
    assert!(matches!(err, ForgeError::NonFinite { row: 0, col: 7, .. }), "{err}");
    // A non-finite scale.
    let (q, ..) = odd_weight();
    let mut bad = SCALES;
    bad[4] = f32::INFINITY;
    let b = f32_bytes(&bad);
    let err =
        dequantize_fp8_blocks(&q, rows, cols, BlockScales { bytes: &b, dtype: Dtype::F32, shape: (2, 3) }, (128, 128))
            .unwrap_err();
    assert!(matches!(err, ForgeError::NonFinite { row: 1, col: 1, .. }), "{err}");
    // Unsupported scale dtype and zero block size.
    assert!(matches!(
        dequantize_fp8_blocks(&q, rows, cols, BlockScales { bytes: &s, dtype: Dtype::F64, shape: (2, 3) }, (128, 128)),
        Err(ForgeError::Shape(_) | ForgeError::Dtype(_))
    ));
    assert!(matches!(dequantize_fp8_blocks(&q, rows, cols, scales, (0, 128)), Err(ForgeError::Config(_))));
    // The header-level check used when planning.
    let w = TensorInfo { name: "w".into(), dtype: Dtype::F8_E4M3, shape: vec![576, 7168], offset: 0, len: 576 * 7168 };
    let ok = TensorInfo { name: "s".into(), dtype: Dtype::F32, shape: vec![5, 56], offset: 0, len: 5 * 56 * 4 };
    assert_eq!(
        check_scale_shape(&w, &ok, (128, 128)).unwrap(),
        (5, 56),
        "DeepSeek's kv_a_proj_with_mqa: 4.5 row tiles"
    );
    let floor = TensorInfo { shape: vec![4, 56], len: 4 * 56 * 4, ..ok.clone() };
    assert!(check_scale_shape(&w, &floor, (128, 128)).is_err());
}

#[test]
fn fp8_encoder_round_trips_every_code_and_rounds_ties_to_even() {
    for c in 0u8..=255 {
        if c & 0x7f == 0x7f {
            assert!(fp8_e4m3_to_f32(c).is_nan());
            continue;
        }
        assert_eq!(f32_to_fp8_e4m3(fp8_e4m3_to_f32(c)), c, "code {c:#04x}");
    }
    assert_eq!(f32_to_fp8_e4m3(1.0625), 0x38, "halfway 1.0/1.125 → even code 0x38");
    assert_eq!(f32_to_fp8_e4m3(1.1875), 0x3a, "halfway 1.125/1.25 → even code 0x3a");
    assert_eq!(f32_to_fp8_e4m3(1e6), 0x7e, "saturates at 448");
    assert_eq!(f32_to_fp8_e4m3(-1e6), 0xfe);
    assert_eq!(f32_to_fp8_e4m3(2f32.powi(-11)), 0x00, "below half the smallest subnormal 2^-9: zero");
    assert_eq!(f32_to_fp8_e4m3(2f32.powi(-10)), 0x00, "exactly half of 2^-9: ties to the even code 0");
    assert_eq!(f32_to_fp8_e4m3(1.5 * 2f32.powi(-9)), 0x02, "halfway 2^-9/2^-8 → even code 0x02");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Random shapes and blocks: every element is its code times its tile's scale.
    #[test]
    fn any_shape_any_block(rows in 1usize..200, cols in 1usize..200, bm in 1usize..70, bn in 1usize..70, seed in any::<u64>()) {
        let mut state = seed | 1;
        let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state };
        let q: Vec<u8> = (0..rows * cols).map(|_| { let c = (next() % 256) as u8; if c & 0x7f == 0x7f { 0x30 } else { c } }).collect();
        let (sr, sc) = (rows.div_ceil(bm), cols.div_ceil(bn));
        let s: Vec<f32> = (0..sr * sc).map(|_| ((next() % 1000) as f32 + 1.0) / 256.0).collect();
        let b = f32_bytes(&s);
        let w = dequantize_fp8_blocks(&q, rows, cols, BlockScales { bytes: &b, dtype: Dtype::F32, shape: (sr, sc) }, (bm, bn)).unwrap();
        for r in 0..rows {
            for c in 0..cols {
                let want = fp8_e4m3_to_f32(q[r * cols + c]) * s[(r / bm) * sc + c / bn];
                prop_assert_eq!(w[[r, c]].to_bits(), want.to_bits());
            }
        }
    }
}
