//! Launch-shape helpers shared by the kernel wrappers.

use cudarc::driver::LaunchConfig;

/// Grid and block sizes plus dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks along x.
    pub blocks: u32,
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
}

impl From<LaunchDims> for LaunchConfig {
    fn from(d: LaunchDims) -> Self {
        LaunchConfig { grid_dim: (d.blocks, 1, 1), block_dim: (d.threads, 1, 1), shared_mem_bytes: d.shared_bytes }
    }
}

/// Enough `threads`-wide blocks to cover `items` (at least one block, at most 2^31 − 1).
pub fn grid_for(items: usize, threads: u32) -> LaunchDims {
    let blocks = items.div_ceil(threads as usize).clamp(1, i32::MAX as usize) as u32;
    LaunchDims { blocks, threads, shared_bytes: 0 }
}
