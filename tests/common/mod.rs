//! Helpers shared by the integration tests.
#![allow(dead_code)]

use fourbit_forge::gpu::GpuDevice;
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
