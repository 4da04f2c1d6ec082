//! Device side of the W4A16 runtime: the packed weight on the device, the launch plan
//! (kernel, block shape and split-K factor from `M`, `N`, `K` and the SM count), the fused
//! tensor-core kernels, and the large-`M` path (dense dequantization + cuBLAS).
//!
//! Kernels (docs/kernels.md §6): on a compute-capability-9.0 GPU (H100, H200) from
//! `hopper_min_m` rows (default 33; below 65 rows only on layers of ≥ 2^25 weights) the Hopper
//! `wgmma` kernel (its own sm_90a PTX module, 8–128 rows per block); otherwise up to `skinny_max_m` rows (default 64) the skinny kernel
//! (`Yᵀ = W·Xᵀ`, 8–64 rows per block, per-warp pipelines; on compute capability 9.0 its build
//! in the Hopper module, which can overlap the previous kernel), above it the tiled one (16–64 rows
//! per block); from `gemm_min_m` rows (default 512) dequantization + cuBLAS when cuBLAS loads.
//! On the H200 bench (5 shapes × M 1–64) the skinny kernel was faster than the tiled one in
//! 30 of 35 cases and at most 8 % slower in the other 5.
//!
//! Split-K (small `M`): a 14336×4096 layer at `M = 1` has only 112 column blocks of 128 for
//! 132 SMs; each output tile's `k` range is split so that `tiles × splits` fits the resident
//! block slots (`SMs × blocks per SM`, from the occupancy API) in ONE wave, choosing the
//! smallest split that minimises the `k` per block. A sweep of split factors with the first
//! skinny version on the H200 put this choice within 16 % of the best factor on every bench
//! shape (the best on 2 of 5); more waves cost a memory latency each. Partial f32 tiles go to
//! a workspace and the last block to arrive at a tile (an atomic counter) sums them in split
//! order and writes `Y` — one launch, deterministic, no spin-waiting (a block never waits for
//! another, so residency does not matter), and the counters are left zero for the next
//! launch. Atomic f32 adds into `Y` were rejected: `Y` is 16-bit, they would need a zeroed
//! f32 buffer and a second conversion launch, and the result would depend on arrival order.
//!
//! Two refinements from a split sweep of the Hopper skinny build on the H200 (docs/kernels.md
//! §6):
//! * layers under `hopper_min_weights` (2^25) fill one block per SM instead of every slot,
//!   unless launched overlapping the previous kernel: at `M = 1`, 4096×4096 ran 8.7 µs at 4
//!   splits (128 blocks) against 9.3 at 8 (256), and 7168×2048 at `M = 16` 9.0 µs unsplit
//!   (112 blocks) against 11.1 at 2 splits; the large layers keep two per SM (4096×14336,
//!   `M = 1`: 16.9 µs at 256 blocks, 17.6 at 128). An overlapping launch streams its first
//!   steps while the previous kernel runs, so more splits (shorter `k` ranges) leave it less
//!   to do after the wait: with one block per SM the overlapped 4096×4096 ran 8.5 µs at
//!   `M = 1` against 7.3 with two. The 12-warp blocks that stream their operands into
//!   registers (`W4a16Options::deep_skinny_blocks`) run one per SM on any layer (148
//!   registers at 1–8 rows, 167 at 9–16);
//! * cluster split-K (`W4a16Options::cluster_split_k`): the split blocks of a tile form one
//!   thread-block cluster and add their partials through distributed shared memory in split
//!   order (the same bits), with no workspace round trip; 0.3–1.6 µs per launch where taken (H200 bench).
//!   Taken when the device holds a whole wave of such clusters and the grid either needs two
//!   blocks per SM anyway, or runs one per SM, or has clusters of at most 3: with 4–8 blocks
//!   per cluster on a grid of 112–128 blocks at two per SM, the scheduler doubled blocks up on
//!   some SMs and the launch ran up to 37 % slower (4096×14336, 4 splits: 24.1 µs against
//!   17.6).

use super::{check_dims, check_finite, ActDtype, PackedDims, PackedWeight};
use crate::device::cublas::BlasInput;
use crate::device::{DeviceBuf, DeviceBuffer, DeviceBufferMut, GpuDevice, LaunchAttrs};
use crate::{ForgeError, Result};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, LaunchConfig};
use forge_kernel_abi::runtime::{
    W4DequantArgs, W4a16Args, W4a16Shape, W4a16SkinnyShape, W4a16WgShape, DEQUANT_SHARED_BYTES, PACK_TILE_N,
    W4A16_MAX_SPLITS, W4A16_THREADS, WG_THREADS,
};
use forge_kernel_abi::{
    Kernel, W4DequantBf16, W4DequantF16, W4a16Bf16M1, W4a16Bf16M2, W4a16Bf16M3, W4a16Bf16M4, W4a16F16M1, W4a16F16M2,
    W4a16F16M3, W4a16F16M4, W4a16SkinnyBf16T1, W4a16SkinnyBf16T2, W4a16SkinnyBf16T4, W4a16SkinnyBf16T8,
    W4a16SkinnyF16T1, W4a16SkinnyF16T2, W4a16SkinnyF16T4, W4a16SkinnyF16T8, W4a16SkinnyGroupedBf16T1,
    W4a16SkinnyGroupedBf16T2, W4a16SkinnyGroupedBf16T4, W4a16SkinnyGroupedBf16T8, W4a16SkinnyGroupedF16T1,
    W4a16SkinnyGroupedF16T2, W4a16SkinnyGroupedF16T4, W4a16SkinnyGroupedF16T8, W4a16SkinnySm90Bf16T1,
    W4a16SkinnySm90Bf16T1W12, W4a16SkinnySm90Bf16T1W16, W4a16SkinnySm90Bf16T2, W4a16SkinnySm90Bf16T2L1,
    W4a16SkinnySm90Bf16T2W12, W4a16SkinnySm90Bf16T8, W4a16SkinnySm90F16T1, W4a16SkinnySm90F16T1W12,
    W4a16SkinnySm90F16T1W16, W4a16SkinnySm90F16T2, W4a16SkinnySm90F16T2L1, W4a16SkinnySm90F16T2W12,
    W4a16SkinnySm90F16T8, W4a16SkinnySm90GroupedBf16T1, W4a16SkinnySm90GroupedBf16T2, W4a16SkinnySm90GroupedBf16T8,
    W4a16SkinnySm90GroupedF16T1, W4a16SkinnySm90GroupedF16T2, W4a16SkinnySm90GroupedF16T8, W4a16WgBf16T1,
    W4a16WgBf16T16, W4a16WgBf16T2, W4a16WgBf16T4, W4a16WgBf16T8, W4a16WgF16T1, W4a16WgF16T16, W4a16WgF16T2,
    W4a16WgF16T4, W4a16WgF16T8, W4a16WgGroupedBf16T16, W4a16WgGroupedBf16T8, W4a16WgGroupedF16T16, W4a16WgGroupedF16T8,
    W8DequantBf16, W8DequantF16, W8a16SkinnyBf16T1, W8a16SkinnyBf16T2, W8a16SkinnyBf16T4, W8a16SkinnyBf16T8,
    W8a16SkinnyF16T1, W8a16SkinnyF16T2, W8a16SkinnyF16T4, W8a16SkinnyF16T8, W8a16SkinnyGroupedBf16T1,
    W8a16SkinnyGroupedBf16T2, W8a16SkinnyGroupedBf16T4, W8a16SkinnyGroupedBf16T8, W8a16SkinnyGroupedF16T1,
    W8a16SkinnyGroupedF16T2, W8a16SkinnyGroupedF16T4, W8a16SkinnyGroupedF16T8,
};
use ndarray::{Array2, ArrayView2};

/// A [`PackedWeight`] on the device.
pub struct DevicePackedWeight {
    /// Its dimensions.
    pub dims: PackedDims,
    /// Packed code tiles.
    pub codes: CudaSlice<u32>,
    /// Packed records.
    pub records: CudaSlice<u32>,
    finite_bf16: bool,
    finite_f16: bool,
}

impl DevicePackedWeight {
    /// Uploads a packed weight (checked against its own dimensions first).
    pub fn upload(dev: &GpuDevice, p: &PackedWeight) -> Result<Self> {
        check_dims(p.dims.n, p.dims.k, p.dims.group_size)?;
        if p.codes.len() != p.dims.code_words()?
            || p.records.len() != p.dims.g_pad * p.dims.n_pad
            || p.dims.g_pad != p.dims.k_pad.div_ceil(p.dims.group_size)
        {
            return Err(ForgeError::Shape("packed weight buffers do not match its dimensions".into()));
        }
        let mut codes = dev.alloc::<u32>(p.codes.len(), "W4A16 packed codes")?;
        let mut records = dev.alloc::<u32>(p.records.len(), "W4A16 packed records")?;
        let stream = dev.stream();
        stream.memcpy_htod(&p.codes, &mut codes).map_err(ForgeError::driver("uploading packed codes"))?;
        stream.memcpy_htod(&p.records, &mut records).map_err(ForgeError::driver("uploading packed records"))?;
        Ok(DevicePackedWeight { dims: p.dims, codes, records, finite_bf16: p.finite_bf16, finite_f16: p.finite_f16 })
    }

    /// Bytes one pass over the weight reads (codes + records).
    pub fn bytes(&self) -> usize {
        (self.codes.len() + self.records.len()) * 4
    }
}

/// Which implementation runs the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// The fused kernel below `W4a16Options::gemm_min_m` rows (or without cuBLAS), else
    /// dequantization + cuBLAS.
    Auto,
    /// Always the fused tensor-core kernel.
    Fused,
    /// Always the dense dequantization kernel + cuBLAS (needs cuBLAS).
    DequantGemm,
}

/// Launch options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W4a16Options {
    /// Implementation.
    pub path: MatmulPath,
    /// Split-K factor for the fused kernel (`None`: chosen from the shape and the SM count);
    /// clamped to `1..=W4A16_MAX_SPLITS` (and to the `k` stages for the tiled kernel).
    pub splits: Option<u32>,
    /// Rows from which [`MatmulPath::Auto`] takes the dequantization + cuBLAS path.
    pub gemm_min_m: usize,
    /// The same for 8-bit packed weights (default 65: their only fused kernel, the skinny one,
    /// streams the whole weight again for every 64-row block, where dequantization + cuBLAS
    /// moves about 5 bytes per weight once; an estimate from that traffic, not yet measured:
    /// the bench's 8-bit table times both).
    pub w8_gemm_min_m: usize,
    /// Rows up to which the fused path runs the skinny kernel (0: never; at most 64).
    pub skinny_max_m: usize,
    /// Rows from which the fused path runs the Hopper `wgmma` kernel on a compute-capability
    /// 9.0 device (`usize::MAX`: never). It takes precedence over the skinny kernel.
    pub hopper_min_m: usize,
    /// Up to 64 rows, the `wgmma` kernel runs only on layers of at least this many weights
    /// (`n·k`; default 2^25, between the bench's small layers of ≤ 2^24 weights, where it tied
    /// or lost, and its large ones of 7·2^23, where it won; see [`w4a16_plan`]).
    pub hopper_min_weights: u64,
    /// On a compute-capability-9.0 device, run the skinny kernel's Hopper-module build
    /// (`w4a16_skinny_sm90_*`, the same code; it can overlap the previous kernel, see
    /// `overlap_prior_kernel`) instead of the sm_80 one, except for 17–32 rows (`tf` 4),
    /// where the sm_80 build measured faster.
    pub hopper_skinny: bool,
    /// Launch the Hopper-module kernels (skinny and `wgmma`) with programmatic dependent
    /// launch: their blocks may start while the kernel before them on the stream still runs,
    /// stream their first stages of the packed weight, and read `X` (and write anything) only
    /// once that kernel has finished. Only when the previous kernel on the stream does not
    /// write this packed weight (an inference step: weights fixed, activations from the layer
    /// before). Off by default; no effect on other kernels or devices.
    pub overlap_prior_kernel: bool,
    /// Split-K in thread-block clusters on the Hopper-module skinny kernels: the split blocks
    /// of an output tile (at most 16) run as one cluster and add their partials through
    /// distributed shared memory, instead of through the global workspace with an arrival
    /// counter. Taken only where the device co-schedules such clusters without fewer
    /// resident blocks; the sum and its bits are the same either way.
    pub cluster_split_k: bool,
    /// 1–8 rows on the Hopper skinny build in blocks of 16 warps, one block per SM and no
    /// split-K (`None`: where the plan finds it faster, on layers of at least
    /// `hopper_min_weights` weights and `k ≥ 4096` with more than two thirds as many
    /// 128-column tiles as SMs and at most as many; `Some(on)` forces it on or off for every
    /// layer).
    pub wide_skinny_blocks: Option<bool>,
    /// 1–16 rows on the Hopper skinny build in blocks of 12 warps on one 64-column tile, each
    /// lane loading its operands straight into registers a few steps ahead (no shared-memory
    /// ring), launched one block per SM (`None`: where the plan finds it faster, on layers of
    /// at most one 64-column tile per SM and at most 8192 `k` per block; `Some(on)` forces it
    /// on or off for every layer). Takes precedence over `wide_skinny_blocks`.
    pub deep_skinny_blocks: Option<bool>,
    /// Dequantization + cuBLAS: dequantize and multiply the weight in chunks of whole 64-row
    /// tiles of `W` of at most this many dense bytes, each chunk's GEMM right after its
    /// dequantization, reusing one scratch of that size (0, the default: the whole weight
    /// at once). A bound on the dense scratch (a 14336×4096 weight needs 117 MB whole), not a
    /// speed-up: on the H200 every chunk size ran slower (14336×4096 at M = 1024: 197 µs
    /// whole, 219 in 32 MB chunks, 228 in 16 MB; docs/kernels.md §6).
    pub gemm_chunk_bytes: usize,
}

impl Default for W4a16Options {
    fn default() -> Self {
        W4a16Options {
            path: MatmulPath::Auto,
            splits: None,
            gemm_min_m: 512,
            w8_gemm_min_m: 65,
            skinny_max_m: 64,
            hopper_min_m: 33,
            hopper_min_weights: 1 << 25,
            hopper_skinny: true,
            overlap_prior_kernel: false,
            cluster_split_k: true,
            wide_skinny_blocks: None,
            deep_skinny_blocks: None,
            gemm_chunk_bytes: 0,
        }
    }
}

/// Which fused kernel a plan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedKernel {
    /// `w4a16_skinny_*`: `8·tf` rows per block, `Yᵀ = W·Xᵀ`, per-warp pipelines.
    Skinny {
        /// 8-token fragments (1, 2, 4 or 8).
        tf: u32,
    },
    /// `w4a16_*_m{mb}`: `16·mb` rows per block, block-wide pipeline.
    Tiled {
        /// 16-row blocks of `X` (1–4).
        mb: u32,
    },
    /// `w4a16_wg_*` (Hopper module): `8·tf` rows and 256 columns per block of four
    /// warpgroups, `wgmma`.
    Wgmma {
        /// 8-token fragments (1, 2, 4, 8 or 16).
        tf: u32,
    },
    /// `w8a16_skinny_*`: the skinny kernel on 8-bit packed codes (5–8-bit grids; sm_80
    /// module, one 64-column tile per block), the only fused kernel for them, at any `M` and
    /// in grouped launches (`w8a16_skinny_grouped_*`).
    SkinnyW8 {
        /// 8-token fragments (1, 2, 4 or 8).
        tf: u32,
    },
    /// `w4a16_skinny_sm90_*`: the skinny kernel built in the Hopper module (same code and
    /// block shape, or blocks of 16 warps at `tf` 1; may overlap the previous kernel).
    SkinnySm90 {
        /// 8-token fragments (1, 2 or 8: the plan keeps the sm_80 build for 4).
        tf: u32,
        /// Warps per block: 8, or 16 at `tf` 1 (`w4a16_skinny_sm90_*_t1_w16`), or 12 at `tf` 1
        /// and 2 (one 64-column tile, operands loaded straight into registers,
        /// `w4a16_skinny_sm90_*_t{1,2}_w12`).
        warps: u32,
        /// `X` copied through L1 (`tf` 2 unsplit only, `w4a16_skinny_sm90_*_t2_l1`).
        x_l1: bool,
    },
}

impl FusedKernel {
    /// Whether the kernel lives in the Hopper (sm_90a) module, the only one that can be
    /// launched overlapping the kernel before it (`W4a16Options::overlap_prior_kernel`).
    pub fn in_hopper_module(&self) -> bool {
        matches!(self, FusedKernel::Wgmma { .. } | FusedKernel::SkinnySm90 { .. })
    }
}

/// What a launch will do (printed by the bench).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W4a16Plan {
    /// Fused or dequantization + cuBLAS.
    pub path: MatmulPath,
    /// The fused kernel (also planned for the cuBLAS path, which does not run it).
    pub kernel: FusedKernel,
    /// Row blocks.
    pub m_blocks: u32,
    /// Column blocks.
    pub col_blocks: u32,
    /// Split-K factor.
    pub splits: u32,
    /// Blocks per thread-block cluster (`splits` with cluster split-K, else 1).
    pub cluster: u32,
    /// Blocks launched.
    pub blocks: u32,
    /// Resident block slots (SMs × blocks per SM).
    pub resident: u32,
    /// Dynamic shared memory per block.
    pub shared_bytes: u32,
    /// Threads per block.
    pub threads: u32,
}

/// Device scratch of the runtime (grow-only): split-K partials and counters, the dense weight
/// of the cuBLAS path. One per stream: launches sharing it must be ordered.
#[derive(Default)]
pub struct W4a16Workspace {
    partials: DeviceBuf<f32>,
    counters: DeviceBuf<u32>,
    dense: DeviceBuf<u16>,
}

/// Expands `$then!(Marker)` with the kernel marker of `($dtype, $kernel)`, or of its grouped
/// build when `$grouped` (skinny kernels and `wgmma` `tf` 8 and 16; `$no_grouped` for the others): the one place
/// that maps a plan to a kernel, for looking it up and for launching it.
macro_rules! with_fused_kernel {
    ($dtype:expr, $kernel:expr, $grouped:expr, $then:ident, $no_grouped:expr) => {{
        use FusedKernel::{Skinny, SkinnySm90, SkinnyW8, Tiled, Wgmma};
        match ($dtype, $kernel, $grouped) {
            (ActDtype::Bf16, SkinnyW8 { tf: 1 }, false) => $then!(W8a16SkinnyBf16T1),
            (ActDtype::Bf16, SkinnyW8 { tf: 2 }, false) => $then!(W8a16SkinnyBf16T2),
            (ActDtype::Bf16, SkinnyW8 { tf: 4 }, false) => $then!(W8a16SkinnyBf16T4),
            (ActDtype::Bf16, SkinnyW8 { .. }, false) => $then!(W8a16SkinnyBf16T8),
            (ActDtype::F16, SkinnyW8 { tf: 1 }, false) => $then!(W8a16SkinnyF16T1),
            (ActDtype::F16, SkinnyW8 { tf: 2 }, false) => $then!(W8a16SkinnyF16T2),
            (ActDtype::F16, SkinnyW8 { tf: 4 }, false) => $then!(W8a16SkinnyF16T4),
            (ActDtype::F16, SkinnyW8 { .. }, false) => $then!(W8a16SkinnyF16T8),
            (ActDtype::Bf16, SkinnyW8 { tf: 1 }, true) => $then!(W8a16SkinnyGroupedBf16T1),
            (ActDtype::Bf16, SkinnyW8 { tf: 2 }, true) => $then!(W8a16SkinnyGroupedBf16T2),
            (ActDtype::Bf16, SkinnyW8 { tf: 4 }, true) => $then!(W8a16SkinnyGroupedBf16T4),
            (ActDtype::Bf16, SkinnyW8 { .. }, true) => $then!(W8a16SkinnyGroupedBf16T8),
            (ActDtype::F16, SkinnyW8 { tf: 1 }, true) => $then!(W8a16SkinnyGroupedF16T1),
            (ActDtype::F16, SkinnyW8 { tf: 2 }, true) => $then!(W8a16SkinnyGroupedF16T2),
            (ActDtype::F16, SkinnyW8 { tf: 4 }, true) => $then!(W8a16SkinnyGroupedF16T4),
            (ActDtype::F16, SkinnyW8 { .. }, true) => $then!(W8a16SkinnyGroupedF16T8),
            (ActDtype::Bf16, Skinny { tf: 1 }, false) => $then!(W4a16SkinnyBf16T1),
            (ActDtype::Bf16, Skinny { tf: 2 }, false) => $then!(W4a16SkinnyBf16T2),
            (ActDtype::Bf16, Skinny { tf: 4 }, false) => $then!(W4a16SkinnyBf16T4),
            (ActDtype::Bf16, Skinny { .. }, false) => $then!(W4a16SkinnyBf16T8),
            (ActDtype::F16, Skinny { tf: 1 }, false) => $then!(W4a16SkinnyF16T1),
            (ActDtype::F16, Skinny { tf: 2 }, false) => $then!(W4a16SkinnyF16T2),
            (ActDtype::F16, Skinny { tf: 4 }, false) => $then!(W4a16SkinnyF16T4),
            (ActDtype::F16, Skinny { .. }, false) => $then!(W4a16SkinnyF16T8),
            (ActDtype::Bf16, Skinny { tf: 1 }, true) => $then!(W4a16SkinnyGroupedBf16T1),
            (ActDtype::Bf16, Skinny { tf: 2 }, true) => $then!(W4a16SkinnyGroupedBf16T2),
            (ActDtype::Bf16, Skinny { tf: 4 }, true) => $then!(W4a16SkinnyGroupedBf16T4),
            (ActDtype::Bf16, Skinny { .. }, true) => $then!(W4a16SkinnyGroupedBf16T8),
            (ActDtype::F16, Skinny { tf: 1 }, true) => $then!(W4a16SkinnyGroupedF16T1),
            (ActDtype::F16, Skinny { tf: 2 }, true) => $then!(W4a16SkinnyGroupedF16T2),
            (ActDtype::F16, Skinny { tf: 4 }, true) => $then!(W4a16SkinnyGroupedF16T4),
            (ActDtype::F16, Skinny { .. }, true) => $then!(W4a16SkinnyGroupedF16T8),
            (ActDtype::Bf16, Tiled { mb: 1 }, false) => $then!(W4a16Bf16M1),
            (ActDtype::Bf16, Tiled { mb: 2 }, false) => $then!(W4a16Bf16M2),
            (ActDtype::Bf16, Tiled { mb: 3 }, false) => $then!(W4a16Bf16M3),
            (ActDtype::Bf16, Tiled { .. }, false) => $then!(W4a16Bf16M4),
            (ActDtype::F16, Tiled { mb: 1 }, false) => $then!(W4a16F16M1),
            (ActDtype::F16, Tiled { mb: 2 }, false) => $then!(W4a16F16M2),
            (ActDtype::F16, Tiled { mb: 3 }, false) => $then!(W4a16F16M3),
            (ActDtype::F16, Tiled { .. }, false) => $then!(W4a16F16M4),
            (ActDtype::Bf16, Wgmma { tf: 1 }, false) => $then!(W4a16WgBf16T1),
            (ActDtype::Bf16, Wgmma { tf: 2 }, false) => $then!(W4a16WgBf16T2),
            (ActDtype::Bf16, Wgmma { tf: 4 }, false) => $then!(W4a16WgBf16T4),
            (ActDtype::Bf16, Wgmma { tf: 8 }, false) => $then!(W4a16WgBf16T8),
            (ActDtype::Bf16, Wgmma { .. }, false) => $then!(W4a16WgBf16T16),
            (ActDtype::F16, Wgmma { tf: 1 }, false) => $then!(W4a16WgF16T1),
            (ActDtype::F16, Wgmma { tf: 2 }, false) => $then!(W4a16WgF16T2),
            (ActDtype::F16, Wgmma { tf: 4 }, false) => $then!(W4a16WgF16T4),
            (ActDtype::F16, Wgmma { tf: 8 }, false) => $then!(W4a16WgF16T8),
            (ActDtype::F16, Wgmma { .. }, false) => $then!(W4a16WgF16T16),
            (ActDtype::Bf16, SkinnySm90 { tf: 1, warps: 16, .. }, false) => $then!(W4a16SkinnySm90Bf16T1W16),
            (ActDtype::F16, SkinnySm90 { tf: 1, warps: 16, .. }, false) => $then!(W4a16SkinnySm90F16T1W16),
            (ActDtype::Bf16, SkinnySm90 { tf: 1, warps: 12, .. }, false) => $then!(W4a16SkinnySm90Bf16T1W12),
            (ActDtype::F16, SkinnySm90 { tf: 1, warps: 12, .. }, false) => $then!(W4a16SkinnySm90F16T1W12),
            (ActDtype::Bf16, SkinnySm90 { tf: 2, warps: 12, .. }, false) => $then!(W4a16SkinnySm90Bf16T2W12),
            (ActDtype::F16, SkinnySm90 { tf: 2, warps: 12, .. }, false) => $then!(W4a16SkinnySm90F16T2W12),
            (ActDtype::Bf16, SkinnySm90 { tf: 2, x_l1: true, .. }, false) => $then!(W4a16SkinnySm90Bf16T2L1),
            (ActDtype::F16, SkinnySm90 { tf: 2, x_l1: true, .. }, false) => $then!(W4a16SkinnySm90F16T2L1),
            (ActDtype::Bf16, SkinnySm90 { tf: 1, .. }, false) => $then!(W4a16SkinnySm90Bf16T1),
            (ActDtype::Bf16, SkinnySm90 { tf: 2, .. }, false) => $then!(W4a16SkinnySm90Bf16T2),
            (ActDtype::Bf16, SkinnySm90 { .. }, false) => $then!(W4a16SkinnySm90Bf16T8),
            (ActDtype::F16, SkinnySm90 { tf: 1, .. }, false) => $then!(W4a16SkinnySm90F16T1),
            (ActDtype::F16, SkinnySm90 { tf: 2, .. }, false) => $then!(W4a16SkinnySm90F16T2),
            (ActDtype::F16, SkinnySm90 { .. }, false) => $then!(W4a16SkinnySm90F16T8),
            (ActDtype::Bf16, SkinnySm90 { tf: 1, .. }, true) => $then!(W4a16SkinnySm90GroupedBf16T1),
            (ActDtype::Bf16, SkinnySm90 { tf: 2, .. }, true) => $then!(W4a16SkinnySm90GroupedBf16T2),
            (ActDtype::Bf16, SkinnySm90 { .. }, true) => $then!(W4a16SkinnySm90GroupedBf16T8),
            (ActDtype::F16, SkinnySm90 { tf: 1, .. }, true) => $then!(W4a16SkinnySm90GroupedF16T1),
            (ActDtype::F16, SkinnySm90 { tf: 2, .. }, true) => $then!(W4a16SkinnySm90GroupedF16T2),
            (ActDtype::F16, SkinnySm90 { .. }, true) => $then!(W4a16SkinnySm90GroupedF16T8),
            (ActDtype::Bf16, Wgmma { tf: 8 }, true) => $then!(W4a16WgGroupedBf16T8),
            (ActDtype::Bf16, Wgmma { tf: 16 }, true) => $then!(W4a16WgGroupedBf16T16),
            (ActDtype::F16, Wgmma { tf: 8 }, true) => $then!(W4a16WgGroupedF16T8),
            (ActDtype::F16, Wgmma { tf: 16 }, true) => $then!(W4a16WgGroupedF16T16),
            (_, Tiled { .. } | Wgmma { .. }, true) => $no_grouped,
        }
    }};
}

/// The error for a grouped plan on a kernel without a grouped build (plan_layer never makes one).
fn no_grouped_build(kernel: FusedKernel) -> ForgeError {
    ForgeError::Internal(format!("grouped W4A16 launch planned on {kernel:?}, which has no grouped build"))
}

/// The fused kernel `kernel` of `dtype` (its grouped build if `grouped`), with its name.
fn fused_kernel(
    dev: &GpuDevice,
    dtype: ActDtype,
    kernel: FusedKernel,
    grouped: bool,
) -> Result<(cudarc::driver::CudaFunction, &'static str)> {
    macro_rules! k {
        ($m:ty) => {
            (dev.kernel::<$m>()?, <$m as Kernel>::NAME)
        };
    }
    Ok(with_fused_kernel!(dtype, kernel, grouped, k, return Err(no_grouped_build(kernel))))
}

/// [`fused_kernel`] with its dynamic shared-memory limit raised to `shared_bytes` (the plan's
/// block size; the launch then needs nothing more).
fn fused_kernel_sized(
    dev: &GpuDevice,
    dtype: ActDtype,
    kernel: FusedKernel,
    grouped: bool,
    shared_bytes: u32,
) -> Result<(cudarc::driver::CudaFunction, &'static str)> {
    let (func, name) = fused_kernel(dev, dtype, kernel, grouped)?;
    func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes as i32)
        .map_err(|source| ForgeError::Launch { kernel: name, source })?;
    Ok((func, name))
}

/// Most blocks per cluster on Hopper (16 needs the non-portable cluster attribute).
const MAX_CLUSTER_SPLITS: u32 = 16;

/// Clusters of `cluster` blocks of the fused kernel that can be resident at once with
/// `cfg`'s block size and shared memory.
fn cluster_capacity(
    dev: &GpuDevice,
    dtype: ActDtype,
    kernel: FusedKernel,
    grouped: bool,
    cfg: LaunchConfig,
    cluster: u32,
) -> Result<u32> {
    macro_rules! query {
        ($m:ty) => {
            dev.max_active_clusters::<$m>(cfg, cluster)?
        };
    }
    Ok(with_fused_kernel!(dtype, kernel, grouped, query, return Err(no_grouped_build(kernel))))
}

/// The plan for `m` rows (see the module docs for the split-K choice).
pub fn w4a16_plan(
    dev: &GpuDevice,
    m: usize,
    w: &DevicePackedWeight,
    dtype: ActDtype,
    opts: &W4a16Options,
) -> Result<W4a16Plan> {
    plan_layer(dev, m, w.dims, dtype, opts, None)
}

/// A grouped (mixture-of-experts) launch, for the plan: its row blocks for the skinny kernel
/// and for the `wgmma` one (0: no such table), and the weights the skinny launch reads.
#[derive(Clone, Copy)]
pub(crate) struct GroupedRows {
    pub(crate) skinny_tasks: u32,
    pub(crate) wgmma_tasks: u32,
    pub(crate) weights_read: u64,
}

/// [`w4a16_plan`] for a layer, or for a grouped launch planned for `m` rows per expert:
/// the skinny kernel (blocks of up to 64 rows), or on compute capability 9.0 with more than
/// 32 rows (and from `hopper_min_m`) the `wgmma` one in blocks of 64 rows (128 above 64);
/// never overlapping, never cuBLAS, its row blocks the grouped launch's tasks.
pub(crate) fn plan_layer(
    dev: &GpuDevice,
    m: usize,
    w: PackedDims,
    dtype: ActDtype,
    opts: &W4a16Options,
    grouped: Option<GroupedRows>,
) -> Result<W4a16Plan> {
    if m == 0 || m > i32::MAX as usize {
        return Err(ForgeError::Shape(format!("W4A16: M = {m} rows is out of range")));
    }
    // 8-bit codes have one fused kernel, the skinny one, at any M (row blocks of up to 64;
    // grouped too).
    let w8 = w.bits == 8;
    let gemm_min_m = if w8 { opts.w8_gemm_min_m } else { opts.gemm_min_m };
    let gemm = grouped.is_none()
        && match opts.path {
            MatmulPath::Fused => false,
            MatmulPath::DequantGemm => true,
            MatmulPath::Auto => m >= gemm_min_m && crate::device::cublas::cublas_available().is_ok(),
        };
    let overlap = opts.overlap_prior_kernel && grouped.is_none();
    // Hopper: rows per block 8–128; skinny: 8, 16, 32 or 64; tiled: 16·mb, mb from M up to
    // 64 rows (several row blocks above). From 33 to 64 rows the wgmma kernel wins only on large layers (H200: 14336×4096 and
    // 4096×14336 at M = 64 took 45 and 43 µs against the skinny kernel's 64 and 59; on
    // layers of 2^24 weights or fewer it tied or lost by up to 18 %); above 64 rows it beat
    // the tiled kernel on every bench shape.
    let weights_read = grouped.map_or(w.n as u64 * w.k as u64, |g| g.weights_read);
    let large = weights_read >= opts.hopper_min_weights;
    let sm_count = dev.sm_count()?;
    let sms = sm_count as u64;
    let hopper = !w8
        && match grouped {
            Some(g) => g.wgmma_tasks > 0 && m > 32 && m >= opts.hopper_min_m && dev.is_hopper(),
            None => m >= opts.hopper_min_m && (m > 64 || large) && !gemm && dev.is_hopper(),
        };
    let skinny = !hopper && (grouped.is_some() || w8 || m <= opts.skinny_max_m.min(64));
    let (kernel, rows_per_block, cols_per_block, k_unit, shared_bytes, threads) = if hopper {
        // Above 64 rows on large layers, blocks of 128 rows dequantize the weight once for
        // twice the tokens of two 64-row blocks (H200, M = 256: 14336×4096 102 µs against
        // 144); on small layers they need twice the splits to fill the GPU, and the split-K
        // end of 128 rows cost more than it saved (2048×7168, M = 128: 37 µs against 27).
        // Grouped: the routing's wgmma table, 64-row blocks up to 64 rows, 128 above.
        let rows = if large || (grouped.is_some() && m > 64) { 128 } else { 64 };
        let shape = W4a16WgShape { tf: m.min(rows).div_ceil(8).next_power_of_two() as u32 };
        (
            FusedKernel::Wgmma { tf: shape.tf },
            shape.m_block(),
            shape.n_block(),
            shape.k_stage(),
            shape.total(),
            WG_THREADS,
        )
    } else if skinny {
        let tf = m.min(64).div_ceil(8).next_power_of_two() as u32;
        // The Hopper-module build (which can overlap the previous kernel) except at tf 4,
        // where its code ran 5–10 % slower than the sm_80 module's on the large bench layers
        // (H200, M = 32: 14336×4096 26.9 µs against 24.5); at tf 8 it ran 8–14 % faster.
        let narrow = W4a16SkinnyShape::for_tf(tf);
        let (kernel, shape) = if w8 {
            (FusedKernel::SkinnyW8 { tf }, W4a16SkinnyShape::w8(tf))
        } else if opts.hopper_skinny && tf != 4 && dev.is_hopper() {
            // Blocks of 16 warps (one per SM, 1–8 rows, no split-K) where a large layer has
            // more 8-warp tiles than a third of the 8-warp blocks' slots (two per SM) and at
            // most one per SM: there those took two splits, leaving as many slots idle, and
            // paid the split-K end (H200, M = 1: 14336×4096 15.9 µs against 16.7, 12288×4096
            // 15.6 against 16.4). With three splits they fill the GPU and won (11008×4096,
            // 86 tiles: 14.4 against 15.4); on small layers 16 warps lost 7–9 % (4096×4096:
            // 9.4 against 8.7, one block per SM either way). Measured with k = 4096, so at
            // least 16 steps per warp: only there.
            let wide = tf == 1
                && grouped.is_none()
                && match opts.wide_skinny_blocks {
                    Some(on) => on,
                    None => {
                        let tiles = (w.n_pad / narrow.n_block() as usize) as u64;
                        large && w.k_pad >= 4096 && 3 * tiles > 2 * sms && tiles <= sms
                    }
                };
            // Blocks of 12 warps on one 64-column tile streaming their operands into registers,
            // one per SM, for 1–16 rows where the layer's 64-column tiles fit one per SM and a
            // block's `k` range (at the splits that keep one block per SM) is at most 8192, plain
            // or overlapped. H200, against the plan without them (8-warp blocks) in the same run,
            // M = 1 / 8: 4096×4096 7.9 / 7.9 µs against 8.7 / 9.2, 2048×7168 7.6 / 7.9 against 8.7 /
            // 9.2, 7168×2048 6.6 / 6.8 against 8.0 / 8.6, 4096×14336 15.7 / 16.1 against 16.9 /
            // 17.6, 8192×8192 16.2 / 16.8 against 17.6 / 18.2, 5120×5120 11.2 / 11.2 against 14.0 /
            // 14.8, 4096×512 3.5 / 3.7 against 5.1 / 5.7; overlapped 4096×512 2.0 against 3.9,
            // 2048×7168 (M = 8) 6.6 against 8.7. Past 8192 per block they lost (M = 1: 8192×28672
            // 46.4 against 44.1, 5120×13824 23.9 against 19.1 on 80 SMs; 3584×18944 tied, 18.7
            // against 18.5), and so did 14336×4096, with more tiles than SMs (17.9 against the
            // 16-warp blocks' 15.9). At 9–16 rows (`tf` 2, another run, M = 12 / 16): 4096×4096
            // 9.5 / 9.7 against 9.9 / 10.0, 7168×2048 8.1 / 8.4 against 8.5 / 8.8, 4096×14336
            // 18.7 / 19.3 against 19.3 / 19.8, 8192×8192 19.3 / 20.3 against 21.2 / 22.3,
            // 5120×5120 13.1 / 13.7 against 15.3 / 15.7; 1024×4096 tied (6.4 / 6.6 against 6.4
            // / 6.7).
            let deep = tf <= 2
                && grouped.is_none()
                && match opts.deep_skinny_blocks {
                    Some(on) => on,
                    None => {
                        let tiles = (w.n_pad / PACK_TILE_N as usize) as u64;
                        // The splits that keep one block per SM, and so each block's `k` range.
                        let splits = (sms / tiles.max(1)).max(1);
                        tiles <= sms && w.k_pad as u64 <= 8192 * splits
                    }
                };
            let shape = if deep {
                W4a16SkinnyShape::deep(tf)
            } else if wide {
                W4a16SkinnyShape::wide(tf)
            } else {
                narrow
            };
            (FusedKernel::SkinnySm90 { tf, warps: shape.warps, x_l1: false }, shape)
        } else {
            (FusedKernel::Skinny { tf }, narrow)
        };
        (kernel, shape.m_block(), shape.n_block(), 16 * shape.steps, shape.total(), shape.threads())
    } else {
        let shape = W4a16Shape::for_mb(m.min(64).div_ceil(16) as u32);
        let (mb, total) = (shape.mb, shape.layout().total);
        (FusedKernel::Tiled { mb }, shape.m_block(), shape.n_block(), shape.k_stage(), total, W4A16_THREADS)
    };
    let m_blocks = match grouped {
        Some(g) if hopper => g.wgmma_tasks,
        Some(g) => g.skinny_tasks,
        None => m.div_ceil(rows_per_block as usize) as u32,
    };
    let col_blocks = (w.n_pad / cols_per_block as usize) as u32;
    // The tiled and wgmma kernels split whole stages; the skinny ones whole slots among their
    // warps.
    let units = (w.k_pad / k_unit as usize) as u32;
    let (func, name) = fused_kernel_sized(dev, dtype, kernel, grouped.is_some(), shared_bytes)?;
    let per_sm = func
        .occupancy_max_active_blocks_per_multiprocessor(threads, shared_bytes as usize, None)
        .map_err(|source| ForgeError::Launch { kernel: name, source })?
        .max(1);
    let resident = per_sm * sm_count;
    let tiles = m_blocks as u64 * col_blocks as u64;
    let max_splits = if skinny {
        // At least two slots per warp.
        (units / (2 * (threads / 32))).clamp(1, W4A16_MAX_SPLITS)
    } else if hopper {
        // At least two stages per block.
        (units / 2).clamp(1, W4A16_MAX_SPLITS)
    } else {
        units.clamp(1, W4A16_MAX_SPLITS)
    };
    let splits = match opts.splits {
        Some(s) => s.clamp(1, max_splits),
        None => {
            // The most splits that still fit one wave, then the smallest split reaching the
            // same stages (steps) per block: fewer partial tiles to add.
            // Small layers on the Hopper skinny build, and the 12-warp blocks on any, launched
            // in order: one block per SM (module docs).
            let deep = matches!(kernel, FusedKernel::SkinnySm90 { warps: 12, .. });
            let one_per_sm = matches!(kernel, FusedKernel::SkinnySm90 { .. }) && (!large || deep) && !overlap;
            let slots = if one_per_sm { sm_count } else { resident };
            let fit = ((slots as u64 / tiles.max(1)) as u32).clamp(1, max_splits);
            let best = units.div_ceil(fit);
            (1..=fit).find(|s| units.div_ceil(*s) == best).unwrap_or(fit)
        }
    };
    // Unsplit 16-row launches copy X through L1 (kernels-gpu/src/runtime/skinny.rs says why);
    // the same shape, so the occupancy above holds.
    let kernel = match kernel {
        FusedKernel::SkinnySm90 { tf: 2, warps: 8, .. } if splits == 1 && grouped.is_none() => {
            let l1 = FusedKernel::SkinnySm90 { tf: 2, warps: 8, x_l1: true };
            fused_kernel_sized(dev, dtype, l1, false, shared_bytes)?;
            l1
        }
        k => k,
    };
    let blocks = tiles * splits as u64;
    if blocks > i32::MAX as u64 {
        return Err(ForgeError::Shape(format!("W4A16: {blocks} blocks exceed the grid limit")));
    }
    let clustered = opts.cluster_split_k
        && matches!(kernel, FusedKernel::SkinnySm90 { .. })
        && (2..=MAX_CLUSTER_SPLITS).contains(&splits)
        // Where the scheduler's cluster placement cannot unbalance the SMs (module docs).
        && (splits <= 3 || blocks > sm_count as u64 || per_sm == 1)
        && {
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: shared_bytes,
            };
            // Clusters only where they keep every resident block slot the plan counted on (a
            // cluster must fit one GPC); a failed query means no clusters, not a failed matmul.
            cluster_capacity(dev, dtype, kernel, grouped.is_some(), cfg, splits)
                .is_ok_and(|c| c as u64 * splits as u64 >= blocks.min(resident as u64))
        };
    Ok(W4a16Plan {
        path: if gemm { MatmulPath::DequantGemm } else { MatmulPath::Fused },
        kernel,
        m_blocks,
        col_blocks,
        splits,
        cluster: if clustered { splits } else { 1 },
        blocks: blocks as u32,
        resident,
        shared_bytes,
        threads,
    })
}

#[allow(clippy::too_many_arguments)]
/// `Y[m, n] = X[m, k] · dequant(W)ᵀ` on the device: `x` holds `m·k` and `y` `m·n` values of
/// `dtype` (bit patterns), row-major. Returns the plan it ran.
pub fn w4a16_matmul(
    dev: &GpuDevice,
    x: &CudaSlice<u16>,
    m: usize,
    w: &DevicePackedWeight,
    y: &mut CudaSlice<u16>,
    dtype: ActDtype,
    opts: &W4a16Options,
    ws: &mut W4a16Workspace,
) -> Result<W4a16Plan> {
    check_finite(w.finite_bf16, w.finite_f16, dtype, "the packed weight has")?;
    let (n, k) = (w.dims.n, w.dims.k);
    if x.len() < m * k || y.len() < m * n {
        return Err(ForgeError::Shape(format!(
            "W4A16: X has {} elements for {m}×{k}, Y {} for {m}×{n}",
            x.len(),
            y.len()
        )));
    }
    let plan = w4a16_plan(dev, m, w, dtype, opts)?;
    if plan.path == MatmulPath::DequantGemm {
        let chunk = gemm_chunk_rows(n, k, opts.gemm_chunk_bytes);
        let dense = ws.dense.ensure(dev, chunk * k, "W4A16 dense weight")?;
        let input = match dtype {
            ActDtype::Bf16 => BlasInput::BF16,
            ActDtype::F16 => BlasInput::F16,
        };
        for n0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - n0);
            dequant_rows(dev, w, n0, rows, dense, dtype)?;
            let (xa, wa) = (x.dev_ptr().addr(), dense.dev_ptr().addr());
            let ya = y.dev_ptr_mut().addr() + 2 * n0 as u64;
            // SAFETY: x holds m·k, the dense chunk rows·k values of `dtype`; y m·n, so its
            // columns n0..n0 + rows of every row (stride n) are inside it; all on the
            // device's stream, which the cuBLAS handle is bound to.
            dev.with_blas(|b| unsafe { b.gemm_xwt_strided(input, m, rows, k, xa, wa, ya, n) })?;
        }
        return Ok(plan);
    }
    // Programmatic launch only for the Hopper-module kernels, which wait for the previous
    // grid before reading X or writing anything.
    let overlap = opts.overlap_prior_kernel && plan.kernel.in_hopper_module();
    let launch = FusedLaunch {
        x: x.dev_ptr(),
        w: w.codes.dev_ptr(),
        meta: w.records.dev_ptr(),
        y: y.dev_ptr_mut(),
        m,
        dims: w.dims,
        overlap,
        grouped: None,
    };
    // SAFETY: x m·k and y m·n values (checked above), w/meta a packed weight of these
    // dimensions (checked at upload), the plan made for them; with overlap, the caller's
    // promise that the previous kernel on the stream does not write the weight
    // (`overlap_prior_kernel`).
    unsafe { launch_fused(dev, &plan, &launch, dtype, ws) }?;
    Ok(plan)
}

/// What [`launch_fused`] multiplies: device addresses and the layer's dimensions.
pub(crate) struct FusedLaunch {
    pub(crate) x: forge_kernel_abi::DevPtr<u16>,
    pub(crate) w: forge_kernel_abi::DevPtr<u32>,
    pub(crate) meta: forge_kernel_abi::DevPtr<u32>,
    pub(crate) y: forge_kernel_abi::DevPtrMut<u16>,
    /// Rows of `X` and `Y`.
    pub(crate) m: usize,
    pub(crate) dims: PackedDims,
    pub(crate) overlap: bool,
    /// Grouped launch: the task table (`3·plan.m_blocks` u32) and the u32 words of one
    /// expert's codes and records.
    pub(crate) grouped: Option<(forge_kernel_abi::DevPtr<u32>, u32, u32)>,
}

/// Launches the fused kernel of `plan` (split-K scratch from `ws`).
///
/// # Safety
/// `l` describes device buffers as the `W4a16Args` contract asks (`x` `m·k`, `y` `m·n`
/// values, a packed weight or `experts` of `dims`, the grouped task table), `plan` was made
/// by [`plan_layer`] for them, and with `l.overlap` the previous kernel on the stream does not
/// write the weight.
pub(crate) unsafe fn launch_fused(
    dev: &GpuDevice,
    plan: &W4a16Plan,
    l: &FusedLaunch,
    dtype: ActDtype,
    ws: &mut W4a16Workspace,
) -> Result<()> {
    let (m, d) = (l.m, l.dims);
    let clustered = plan.cluster > 1;
    let (ws_ptr, counters_ptr) = if plan.splits > 1 && !clustered {
        let partials = ws.partials.ensure(dev, plan.splits as usize * m * d.n_pad, "W4A16 split-K partials")?;
        let p = partials.dev_ptr_mut();
        // Zeroed when allocated; every launch leaves them zero again.
        let counters = ws.counters.ensure(dev, (plan.m_blocks * plan.col_blocks) as usize, "W4A16 split-K counters")?;
        (p, counters.dev_ptr_mut())
    } else {
        // Not read with one split or in clusters; any valid address.
        (l.y.cast::<f32>(), l.y.cast::<u32>())
    };
    let (tasks, expert_codes, expert_records) = l.grouped.unwrap_or((l.w, 0, 0));
    let args = W4a16Args {
        x: l.x,
        w: l.w,
        meta: l.meta,
        y: l.y,
        ws: ws_ptr,
        counters: counters_ptr,
        m: m as u32,
        n: d.n as u32,
        k: d.k as u32,
        n_pad: d.n_pad as u32,
        k_pad: d.k_pad as u32,
        gs: d.group_size as u32,
        g_pad: d.g_pad as u32,
        m_blocks: plan.m_blocks,
        col_blocks: plan.col_blocks,
        splits: plan.splits,
        overlap: l.overlap as u32,
        cluster: clustered as u32,
        tasks,
        expert_codes,
        expert_records,
    };
    let overlap = l.overlap;
    let cfg = LaunchConfig {
        grid_dim: (plan.blocks, 1, 1),
        block_dim: (plan.threads, 1, 1),
        shared_mem_bytes: plan.shared_bytes,
    };
    macro_rules! launch {
        ($m:ty) => {
            if overlap || clustered {
                dev.launch_with::<$m>(cfg, &args, LaunchAttrs { overlap, cluster: plan.cluster })
            } else {
                dev.launch::<$m>(cfg, &args)
            }
        };
    }
    // SAFETY: the W4a16Args contract: x, y, w/meta and the task table as the caller promises,
    // k % 8 == 0 and gs a multiple of 32 (check_dims at upload), ws splits·m·n_pad f32 and
    // counters m_blocks·col_blocks u32 zeroed (ensured above), col_blocks = n_pad / n_block
    // and 1 ≤ splits ≤ min(stages, MAX) (plan); a Wgmma or SkinnySm90 plan only on a
    // compute-capability-9.0 device (plan); clusters of `splits ≤ 16` blocks only for
    // SkinnySm90, whose grid is tiles·splits (plan); grouped only on a skinny plan, never
    // overlapping (plan_layer).
    unsafe { with_fused_kernel!(dtype, plan.kernel, l.grouped.is_some(), launch, Err(no_grouped_build(plan.kernel))) }
}

/// Rows of `W` per dequantization + cuBLAS chunk: whole 64-row tiles of at most `bytes` dense
/// bytes (at least one tile), or all `n` rows when `bytes` is 0 or covers them.
fn gemm_chunk_rows(n: usize, k: usize, bytes: usize) -> usize {
    if bytes == 0 {
        return n;
    }
    (bytes / (2 * k.max(1)) / 64 * 64).max(64).min(n)
}

/// The dense weight `[n, k]` as the kernel rounds it, into `dense` (at least `n·k` values).
pub fn launch_dequant(
    dev: &GpuDevice,
    w: &DevicePackedWeight,
    dense: &mut CudaSlice<u16>,
    dtype: ActDtype,
) -> Result<()> {
    dequant_rows(dev, w, 0, w.dims.n, dense, dtype)
}

/// Rows `n0 .. n0 + rows` of the dense weight (`n0` a multiple of 64), into `dense` as a
/// `[rows, k]` matrix (at least `rows·k` values).
fn dequant_rows(
    dev: &GpuDevice,
    w: &DevicePackedWeight,
    n0: usize,
    rows: usize,
    dense: &mut CudaSlice<u16>,
    dtype: ActDtype,
) -> Result<()> {
    let d = w.dims;
    if !n0.is_multiple_of(64) || n0 + rows > d.n {
        return Err(ForgeError::Internal(format!("dequantizing rows {n0}..{} of {}", n0 + rows, d.n)));
    }
    if dense.len() < rows * d.k {
        return Err(ForgeError::Shape(format!("dense weight buffer {} < {rows}×{}", dense.len(), d.k)));
    }
    if rows == 0 {
        return Ok(());
    }
    // Codes are whole 64-row tiles of `k_pad/16` steps of 128 words (256 at 8 bits); records `[group][n_pad]`,
    // so a row range starts `n0` records in with the same row stride (n_pad).
    let args = W4DequantArgs {
        w: forge_kernel_abi::DevPtr::from_addr(
            w.codes.dev_ptr().addr() + 4 * ((n0 / 64) * (d.k_pad / 16) * d.tile_words()?) as u64,
        ),
        meta: forge_kernel_abi::DevPtr::from_addr(w.records.dev_ptr().addr() + 4 * n0 as u64),
        wd: dense.dev_ptr_mut(),
        n: rows as u32,
        k: d.k as u32,
        n_pad: d.n_pad as u32,
        k_pad: d.k_pad as u32,
        gs: d.group_size as u32,
    };
    let blocks = rows.div_ceil(64) * (d.k_pad / 128);
    if blocks > i32::MAX as usize {
        return Err(ForgeError::Shape(format!("W4A16 dequantization: {blocks} blocks exceed the grid limit")));
    }
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: DEQUANT_SHARED_BYTES,
    };
    // SAFETY: w/meta a packed weight of these dimensions (checked at upload, k % 8 == 0 by
    // check_dims), offset to whole tiles n0/64.. of it (n0 % 64 == 0, n0 + rows ≤ n, checked
    // above) with the records' row stride n_pad; wd rows·k values (checked above); one block
    // per 64×128 tile of those rows, which writes only rows < `rows`.
    unsafe {
        match (dtype, d.bits == 8) {
            (ActDtype::Bf16, false) => dev.launch::<W4DequantBf16>(cfg, &args),
            (ActDtype::F16, false) => dev.launch::<W4DequantF16>(cfg, &args),
            (ActDtype::Bf16, true) => dev.launch::<W8DequantBf16>(cfg, &args),
            (ActDtype::F16, true) => dev.launch::<W8DequantF16>(cfg, &args),
        }
    }
}

/// Host convenience: rounds `x` to `dtype`, uploads it and the packed weight, runs
/// [`w4a16_matmul`], and returns `Y` as f32 values (each exactly a `dtype` value) with the plan.
pub fn w4a16_matmul_host(
    dev: &GpuDevice,
    x: ArrayView2<'_, f32>,
    p: &PackedWeight,
    dtype: ActDtype,
    opts: &W4a16Options,
) -> Result<(Array2<f32>, W4a16Plan)> {
    let m = x.nrows();
    if x.ncols() != p.dims.k {
        return Err(ForgeError::Shape(format!("X has {} columns, the weight {} inputs", x.ncols(), p.dims.k)));
    }
    p.check_for(dtype)?;
    let w = DevicePackedWeight::upload(dev, p)?;
    let xb: Vec<u16> = x.iter().map(|&v| dtype.bits(v)).collect();
    let stream = dev.stream();
    let mut xd = dev.alloc::<u16>(xb.len(), "W4A16 X")?;
    stream.memcpy_htod(&xb, &mut xd).map_err(ForgeError::driver("uploading X"))?;
    let mut yd = dev.alloc::<u16>(m * p.dims.n, "W4A16 Y")?;
    let mut ws = W4a16Workspace::default();
    let plan = w4a16_matmul(dev, &xd, m, &w, &mut yd, dtype, opts, &mut ws)?;
    let yb = stream.clone_dtoh(&yd).map_err(ForgeError::driver("downloading Y"))?;
    dev.synchronize()?;
    let y = Array2::from_shape_vec((m, p.dims.n), yb.iter().take(m * p.dims.n).map(|&b| dtype.value(b)).collect())
        .map_err(|e| ForgeError::Internal(format!("Y shape: {e}")))?;
    Ok((y, plan))
}

/// Host convenience for tests: the dense weight the device dequantizes, as f32 values.
pub fn dequant_gpu(dev: &GpuDevice, p: &PackedWeight, dtype: ActDtype) -> Result<Array2<f32>> {
    let w = DevicePackedWeight::upload(dev, p)?;
    let mut dense = dev.alloc::<u16>(p.dims.n * p.dims.k, "W4A16 dense weight")?;
    launch_dequant(dev, &w, &mut dense, dtype)?;
    let b = dev.stream().clone_dtoh(&dense).map_err(ForgeError::driver("downloading the dense weight"))?;
    dev.synchronize()?;
    Array2::from_shape_vec((p.dims.n, p.dims.k), b.iter().take(p.dims.n * p.dims.k).map(|&v| dtype.value(v)).collect())
        .map_err(|e| ForgeError::Internal(format!("dense shape: {e}")))
}

#[cfg(test)]
mod tests {
    use super::gemm_chunk_rows;

    #[test]
    fn gemm_chunks_are_whole_tiles_within_the_byte_budget() {
        // 0: the whole weight; budgets round down to whole 64-row tiles, at least one.
        assert_eq!(gemm_chunk_rows(14336, 4096, 0), 14336);
        assert_eq!(gemm_chunk_rows(14336, 4096, 16 << 20), 2048);
        assert_eq!(gemm_chunk_rows(14336, 4096, (16 << 20) - 1), 1984);
        assert_eq!(gemm_chunk_rows(14336, 4096, 1), 64);
        assert_eq!(gemm_chunk_rows(200, 392, 1 << 30), 200);
        assert_eq!(gemm_chunk_rows(40, 392, 1), 40);
        for (n, k, bytes) in [(520, 2048, 300_000), (4096, 14336, 24 << 20), (64, 8, 3)] {
            let rows = gemm_chunk_rows(n, k, bytes);
            assert!(rows.is_multiple_of(64) || rows == n, "{n}×{k} {bytes}: {rows}");
            assert!(rows * k * 2 <= bytes.max(64 * k * 2) && rows >= 1 && rows <= n);
        }
    }
}
