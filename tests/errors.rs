//! Every bad input gives its typed `ForgeError`, whose message names the offending value
//! (docs/design.md §3: "a typed error, never a panic and never silent garbage"). Each case also has a
//! control: the same call with the value fixed succeeds, so the error is caused by that value.

use fourbit_forge::grid::build_quant_grid;
use fourbit_forge::{ForgeError, GridConfig, MseSearch, ScaleSearch, ShrinkCandidates, WeightDtype, WeightView};
use ndarray::Array2;

/// A 3×96 weight of small finite values.
fn weight() -> Array2<f32> {
    Array2::from_shape_fn((3, 96), |(r, c)| ((r * 96 + c) as f32 * 0.37).sin())
}

fn cfg(group_size: usize, bits: u32) -> GridConfig {
    GridConfig { group_size, bits, symmetric: true, scale_search: ScaleSearch::Absmax, ..GridConfig::default() }
}

fn build(w: &Array2<f32>, cfg: &GridConfig) -> Result<(), ForgeError> {
    build_quant_grid(WeightView::F32(w.view()), cfg).map(|_| ())
}

#[test]
fn group_size_out_of_range_or_not_a_multiple_of_32() {
    let w = weight();
    for gs in [0usize, 16, 48, 1056] {
        let err = build(&w, &cfg(gs, 4)).expect_err("bad group size accepted");
        assert!(matches!(err, ForgeError::GroupSize(v) if v == gs), "gs {gs}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("group_size {gs} ")), "{msg}");
    }
    for gs in [32usize, 64, 96, 1024] {
        build(&w, &cfg(gs, 4)).unwrap_or_else(|e| panic!("gs {gs}: {e}"));
    }
}

#[test]
fn bits_out_of_range() {
    let w = weight();
    for bits in [0u32, 1, 9, 32] {
        let err = build(&w, &cfg(32, bits)).expect_err("bad bits accepted");
        assert!(matches!(err, ForgeError::Bits(b) if b == bits), "bits {bits}: {err:?}");
        assert!(err.to_string().contains(&format!("bits = {bits} ")), "{err}");
    }
    for bits in [2u32, 8] {
        build(&w, &cfg(32, bits)).unwrap_or_else(|e| panic!("bits {bits}: {e}"));
    }
}

#[test]
fn empty_weight() {
    for (rows, cols) in [(0usize, 64usize), (4, 0), (0, 0)] {
        let w = Array2::<f32>::zeros((rows, cols));
        let err = build(&w, &cfg(32, 4)).expect_err("empty weight accepted");
        assert!(matches!(err, ForgeError::Shape(_)), "{rows}×{cols}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("{rows}×{cols}")), "{msg}");
    }
}

#[test]
fn non_finite_weights_report_row_and_column() {
    for (value, r, c) in [(f32::NAN, 1usize, 70usize), (f32::INFINITY, 2, 0), (f32::NEG_INFINITY, 0, 95)] {
        let mut w = weight();
        w[[r, c]] = value;
        let err = build(&w, &cfg(32, 4)).expect_err("non-finite weight accepted");
        match &err {
            ForgeError::NonFinite { tensor, row, col, value: v } => {
                assert_eq!(*tensor, "weight");
                assert_eq!((*row, *col), (r, c), "{err}");
                assert_eq!(v.is_nan(), value.is_nan());
                if !value.is_nan() {
                    assert_eq!(*v, value);
                }
            }
            other => panic!("{value}: expected NonFinite, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&format!("({value})")), "{msg}");
        assert!(msg.contains(&format!("row {r}, column {c}")), "{msg}");
    }
    // With several bad values, the first in row-major order is reported.
    let mut w = weight();
    w[[2, 3]] = f32::NAN;
    w[[1, 50]] = f32::INFINITY;
    w[[1, 60]] = f32::NAN;
    match build(&w, &cfg(32, 4)) {
        Err(ForgeError::NonFinite { row: 1, col: 50, .. }) => {}
        other => panic!("expected NonFinite at (1, 50), got {other:?}"),
    }
}

#[test]
fn fp8_nan_bytes_are_rejected() {
    // E4M3 has no infinities: S.1111.111 (0x7f, 0xff) is NaN; 0x7e (448) is finite.
    for byte in [0x7fu8, 0xff] {
        let mut q = Array2::<u8>::from_elem((2, 64), 0x38); // 1.0
        q[[1, 33]] = byte;
        let err = build_quant_grid(WeightView::Fp8E4M3(q.view()), &cfg(32, 4)).expect_err("fp8 NaN accepted");
        match &err {
            ForgeError::NonFinite { row, col, value, .. } => {
                assert_eq!((*row, *col), (1, 33));
                assert!(value.is_nan(), "{err}");
            }
            other => panic!("{byte:#x}: expected NonFinite, got {other:?}"),
        }
        assert!(err.to_string().contains("NaN"), "{err}");
        assert!(err.to_string().contains("row 1, column 33"), "{err}");
        q[[1, 33]] = 0x7e;
        build_quant_grid(WeightView::Fp8E4M3(q.view()), &cfg(32, 4)).unwrap();
    }
}

fn mse_cfg(search: MseSearch) -> GridConfig {
    GridConfig {
        group_size: 32,
        bits: 4,
        symmetric: false,
        scale_search: ScaleSearch::Mse(search),
        ..GridConfig::default()
    }
}

/// The search fails validation with `ScaleSearch(msg)`, `msg` containing `needle`, both from
/// `MseSearch::factors` and from the grid builder.
fn assert_search_error(search: MseSearch, needle: &str) {
    let err = search.factors().expect_err("bad search accepted by factors()");
    assert!(matches!(err, ForgeError::ScaleSearch(_)), "{err:?}");
    assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
    let err = build(&weight(), &mse_cfg(search)).expect_err("bad search accepted by the builder");
    assert!(matches!(err, ForgeError::ScaleSearch(_)), "{err:?}");
    assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
}

fn linspace(max_shrink: f32, n_grid: usize) -> MseSearch {
    MseSearch { candidates: ShrinkCandidates::Linspace { max_shrink, n_grid }, norm: 2.4 }
}

fn list(v: Vec<f32>) -> MseSearch {
    MseSearch { candidates: ShrinkCandidates::List(v), norm: 2.4 }
}

#[test]
fn mse_linspace_settings_out_of_range() {
    assert_search_error(linspace(0.2, 0), "n_grid must be in 1..=1024, got 0");
    assert_search_error(linspace(0.2, 1025), "got 1025");
    assert_search_error(linspace(0.0, 100), "max_shrink must be in (0, 1], got 0");
    assert_search_error(linspace(-0.5, 100), "got -0.5");
    assert_search_error(linspace(1.5, 100), "got 1.5");
    assert_search_error(linspace(f32::NAN, 100), "got NaN");
    for (max_shrink, n_grid) in [(0.2, 1), (0.2, 1024), (1.0, 100), (1e-3, 100)] {
        let s = linspace(max_shrink, n_grid);
        assert_eq!(s.factors().unwrap().len(), n_grid);
        build(&weight(), &mse_cfg(s)).unwrap();
    }
}

#[test]
fn mse_candidate_lists_out_of_range() {
    assert_search_error(list(vec![]), "got 0");
    assert_search_error(list(vec![0.5; 1025]), "got 1025");
    assert_search_error(list(vec![1.0, 0.0, 0.5]), "candidate factor 0 is");
    assert_search_error(list(vec![1.0, f32::NAN]), "candidate factor NaN is");
    assert_search_error(list(vec![f32::INFINITY]), "candidate factor inf is");
    assert_search_error(list(vec![0.9, -0.25]), "candidate factor -0.25 is");
    for ok in [vec![1.0], vec![0.5; 1024], vec![1.5, 0.75, 1e-3]] {
        let s = list(ok.clone());
        assert_eq!(s.factors().unwrap(), ok);
        build(&weight(), &mse_cfg(s)).unwrap();
    }
}

#[test]
fn mse_norm_out_of_range() {
    for (norm, shown) in [(0.0f32, "got 0"), (f32::NAN, "got NaN"), (-2.0, "got -2"), (f32::INFINITY, "got inf")] {
        assert_search_error(
            MseSearch { norm, ..MseSearch::default() },
            &format!("norm must be finite and > 0, {shown}"),
        );
    }
    for norm in [2.0f32, 2.4, 1.0, 0.5] {
        build(&weight(), &mse_cfg(MseSearch { norm, ..MseSearch::default() })).unwrap();
    }
}

#[test]
fn unsupported_dtype_names() {
    for name in ["F8_E5M2", "int8", "", "F64"] {
        match WeightDtype::parse(name) {
            Err(ForgeError::Dtype(n)) => assert_eq!(n, name),
            other => panic!("{name:?}: expected ForgeError::Dtype, got {other:?}"),
        }
        let msg = WeightDtype::parse(name).unwrap_err().to_string();
        assert!(msg.contains(&format!("dtype {name}:")), "{msg}");
    }
    for (name, dt) in [
        ("F32", WeightDtype::F32),
        ("float16", WeightDtype::F16),
        ("BF16", WeightDtype::BF16),
        ("F8_E4M3", WeightDtype::Fp8E4M3),
    ] {
        assert_eq!(WeightDtype::parse(name).unwrap(), dt);
    }
}
