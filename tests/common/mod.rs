//! Helpers shared by the integration tests.
#![allow(dead_code)]

use fourbit_forge::device::GpuDevice;
use std::sync::Arc;

/// The reference vectors generated from the seed spec's PyTorch reference
/// (copied from ../shared/vectors/qmeta4.safetensors; see testdata/README.md).
pub const QMETA4_VECTORS: &[u8] = include_bytes!("../../testdata/qmeta4.safetensors");

/// Device 0, or `None` after printing why GPU checks are skipped on this machine.
pub fn gpu_or_skip(test: &str) -> Option<Arc<GpuDevice>> {
    match GpuDevice::first() {
        Ok(dev) => {
            eprintln!("[{test}] running on {}", dev.name());
            Some(dev)
        }
        Err(e) => {
            eprintln!("[{test}] SKIPPED (no GPU): {e}");
            None
        }
    }
}

/// A little-endian tensor of the vectors file as a typed Vec.
pub fn vector<T: bytemuck::Pod>(name: &str) -> (Vec<T>, Vec<usize>) {
    let st = safetensors::SafeTensors::deserialize(QMETA4_VECTORS).expect("vectors file parses");
    let t = st.tensor(name).unwrap_or_else(|e| panic!("vector {name}: {e}"));
    let data: Vec<T> = t.data().chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect();
    (data, t.shape().to_vec())
}

/// Standard-normal `rows × cols` matrix.
pub fn randn(rows: usize, cols: usize, rng: &mut rand::rngs::StdRng) -> ndarray::Array2<f32> {
    use rand::Rng;
    ndarray::Array2::from_shape_simple_fn((rows, cols), || rng.sample::<f32, _>(rand_distr::StandardNormal))
}

/// Round-to-nearest codes and dequantized values on `grid` (its scales as stored), element by
/// element with the shared numerics (what the solver must return for an identity factor).
pub fn rtn(w: &ndarray::Array2<f32>, g: &fourbit_forge::QuantGrid) -> (ndarray::Array2<u8>, ndarray::Array2<f32>) {
    use fourbit_forge::numerics::{dequantize, quantize};
    let maxq = g.maxq as f32;
    let mut codes = ndarray::Array2::zeros(w.dim());
    let mut deq = ndarray::Array2::zeros(w.dim());
    for ((r, c), &x) in w.indexed_iter() {
        let (s, z) = g.scale_zero(r, c / g.group_size).unwrap();
        let q = quantize(x, s, z, maxq);
        codes[[r, c]] = q as u8;
        deq[[r, c]] = dequantize(q, s, z);
    }
    (codes, deq)
}

/// The identity with one symmetric off-diagonal pair `c` (indefinite for |c| > 1).
pub fn indefinite(cols: usize, c: f32) -> ndarray::Array2<f32> {
    let mut h = ndarray::Array2::<f32>::eye(cols);
    h[[0, 1]] = c;
    h[[1, 0]] = c;
    h
}

/// The `quantize_layer` example binary of this build (`target/<profile>/examples/`), which
/// `cargo test` builds before it runs the tests. Panics with what to run when it is missing
/// (e.g. after `cargo test --test <name>` alone, which builds no examples).
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/examples/<name>
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let bin = profile_dir.join("examples").join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run the whole suite (`cargo test --workspace --release`) or build it first \
         (`cargo build --release --example {name}`)",
        bin.display()
    );
    if let (Ok(b), Ok(t)) = (bin.metadata().and_then(|m| m.modified()), exe.metadata().and_then(|m| m.modified())) {
        if b < t {
            eprintln!("note: {} is older than this test binary; rebuild it if the library changed", bin.display());
        }
    }
    bin
}

/// Nearest fp8 E4M3 byte (saturating at ±448), by search over the finite codes.
pub fn to_fp8(x: f32) -> u8 {
    (0u8..=255)
        .filter(|&b| fourbit_forge::numerics::fp8_e4m3_to_f32(b).is_finite())
        .min_by(|&a, &b| {
            let f = fourbit_forge::numerics::fp8_e4m3_to_f32;
            (f(a) - x).abs().total_cmp(&(f(b) - x).abs())
        })
        .unwrap()
}
