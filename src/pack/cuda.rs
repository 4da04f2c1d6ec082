//! Packing on the device: the launcher of `pack_rows` / `pack_rows_transposed`
//! (kernels-gpu/src/pack/pack_rows.rs, docs/kernels.md §5), bit for bit [`super::pack_rows`]
//! (and its transpose for GPTQ's `qweight`).

use super::{check_bits, PackLayout};
use crate::device::{DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::{ForgeError, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};
use forge_kernel_abi::pack::{PackArgs, PackSharedLayout, PACK_THREADS};
use forge_kernel_abi::{DevPtr, DevPtrMut, PackRows, PackRowsDirect, PackRowsTransposed, PackRowsTransposedDirect};
use ndarray::{Array2, ArrayView2};

/// Chunks of 32 codes per tile row the kernel uses for `cols` codes per row: 8 (a tile of
/// 32 rows × 256 codes), fewer for short rows so no thread idles on a missing chunk.
pub fn tile_chunks(cols: usize) -> u32 {
    (cols.div_ceil(32).clamp(1, 8) as u32).next_power_of_two()
}

/// Checks what the kernel's index arithmetic assumes: bits in `2..=8`, both dimensions
/// below 2^31 (32-bit row and column indices with headroom).
fn check_shape(rows: usize, cols: usize, bits: u32) -> Result<()> {
    check_bits(bits)?;
    if rows > i32::MAX as usize || cols > i32::MAX as usize {
        return Err(ForgeError::Shape(format!("{rows}×{cols} codes exceed the packing kernel's 2^31 rows or columns")));
    }
    Ok(())
}

/// Enqueues the packing of `rows × cols` codes on the device's compute stream: `words`
/// receives [`PackLayout::shape`] words, `first_bad` (not cleared here) `!index` of the first
/// code `≥ 2^bits` (then the words are not the reference's).
///
/// # Safety
/// `codes` is the 16-byte aligned device address of `rows·cols` bytes (checked: alignment),
/// `words` of `rows·ceil(cols·bits/32)` u32 and `first_bad` of one u64, and all are ready on
/// the compute stream.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_pack_into(
    dev: &GpuDevice,
    codes: DevPtr<u8>,
    rows: usize,
    cols: usize,
    bits: u32,
    layout: PackLayout,
    words: DevPtrMut<u32>,
    first_bad: DevPtrMut<u64>,
) -> Result<()> {
    check_shape(rows, cols, bits)?;
    if !codes.addr().is_multiple_of(16) {
        return Err(ForgeError::Shape(format!("codes at {:#x} are not 16-byte aligned", codes.addr())));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    if cols.is_multiple_of(32) && words.addr().is_multiple_of(16) {
        // Whole chunks (every real layer): no staging tile, a thread per chunk (the transposed
        // kernel's warps of 8 rows × 4 chunks pad the rows to a multiple of 8).
        let chunks = cols / 32;
        let warp8 = layout == PackLayout::Transposed && chunks.is_multiple_of(4);
        let threads = if warp8 { rows.div_ceil(8) * 8 * chunks } else { rows * chunks };
        let blocks = threads.div_ceil(PACK_THREADS as usize).min(i32::MAX as usize) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (PACK_THREADS, 1, 1), shared_mem_bytes: 0 };
        let args = PackArgs { codes, rows: rows as u32, cols: cols as u32, bits, tile_chunks: 0, words, first_bad };
        // SAFETY: sizes and alignment as the kernel's contract (the caller's part above; cols a
        // multiple of 32 and words 16-byte aligned checked here); no shared memory; the
        // kernel strides over the grid and picks the same mapping.
        return unsafe {
            match layout {
                PackLayout::Rows => dev.launch::<PackRowsDirect>(cfg, &args),
                PackLayout::Transposed => dev.launch::<PackRowsTransposedDirect>(cfg, &args),
            }
        };
    }
    let k = tile_chunks(cols);
    let transposed = layout == PackLayout::Transposed;
    let shared = PackSharedLayout::new(bits, k, transposed);
    let tiles = cols.div_ceil(32).div_ceil(k as usize) * rows.div_ceil(shared.tile_rows as usize);
    let blocks = tiles.min(i32::MAX as usize) as u32;
    let cfg =
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (PACK_THREADS, 1, 1), shared_mem_bytes: shared.total };
    let args = PackArgs { codes, rows: rows as u32, cols: cols as u32, bits, tile_chunks: k, words, first_bad };
    // SAFETY: sizes and alignment as the kernel's contract (the caller's part above); block
    // and shared memory from the same layout function the kernel uses.
    unsafe {
        match layout {
            PackLayout::Rows => dev.launch::<PackRows>(cfg, &args),
            PackLayout::Transposed => dev.launch::<PackRowsTransposed>(cfg, &args),
        }
    }
}

/// Packs `rows × cols` codes held on the device into a new device buffer of
/// [`PackLayout::shape`] words, checked: a code `≥ 2^bits` is a [`ForgeError::Format`]
/// naming its row and column, as [`super::pack_rows`] reports it (this reads back one u64,
/// so it synchronises the stream).
pub fn pack_device(
    dev: &GpuDevice,
    codes: &CudaSlice<u8>,
    rows: usize,
    cols: usize,
    bits: u32,
    layout: PackLayout,
) -> Result<CudaSlice<u32>> {
    check_shape(rows, cols, bits)?;
    let n = rows.checked_mul(cols).ok_or_else(|| ForgeError::Shape(format!("{rows}×{cols} codes overflow usize")))?;
    if codes.len() < n {
        return Err(ForgeError::Shape(format!("{} device bytes hold no {rows}×{cols} codes", codes.len())));
    }
    let (a, b) = layout.shape(rows, cols, bits)?;
    let mut words = dev.alloc::<u32>(a * b, "packed words")?;
    let mut flag = dev.alloc::<u64>(1, "the out-of-range flag")?;
    // SAFETY: `codes` holds rows·cols bytes in its own (256-byte aligned) allocation, `words`
    // the layout's word count, `flag` one zeroed u64; all on the compute stream.
    unsafe {
        launch_pack_into(dev, codes.dev_ptr(), rows, cols, bits, layout, words.dev_ptr_mut(), flag.dev_ptr_mut())
    }?;
    let stream = dev.stream();
    let bad = stream.clone_dtoh(&flag).map_err(ForgeError::driver("reading the out-of-range flag"))?;
    if let Some(&f) = bad.first().filter(|&&f| f != 0) {
        let idx = !f as usize;
        let value = stream
            .clone_dtoh(&codes.slice(idx..idx + 1))
            .map_err(ForgeError::driver("reading an out-of-range code"))?
            .first()
            .copied()
            .unwrap_or(0);
        return Err(ForgeError::Format(format!(
            "value {value} at row {}, column {} does not fit in {bits} bits (max {})",
            idx / cols,
            idx % cols,
            (1u32 << bits) - 1
        )));
    }
    Ok(words)
}

/// Uploads `codes`, packs them on the device and downloads the words: the GPU twin of
/// [`PackLayout::pack_cpu`] (bit-identical), with the same errors.
pub fn pack_gpu(dev: &GpuDevice, codes: ArrayView2<'_, u8>, bits: u32, layout: PackLayout) -> Result<Array2<u32>> {
    let (rows, cols) = codes.dim();
    check_shape(rows, cols, bits)?;
    let shape = layout.shape(rows, cols, bits)?;
    if rows == 0 || cols == 0 {
        return Ok(Array2::zeros(shape));
    }
    let std = codes.as_standard_layout();
    let src = std.as_slice().ok_or_else(|| ForgeError::Internal("standard layout is not contiguous".into()))?;
    let d_codes = dev.stream().clone_htod(src).map_err(ForgeError::driver("uploading codes"))?;
    let words = pack_device(dev, &d_codes, rows, cols, bits, layout)?;
    let host = dev.stream().clone_dtoh(&words).map_err(ForgeError::driver("downloading packed words"))?;
    Array2::from_shape_vec(shape, host).map_err(|e| ForgeError::Internal(e.to_string()))
}
