//! Bit packing of quantized codes into 32-bit words (issue 12).
//!
//! One layout serves every checkpoint format we write: a **dense little-endian bit stream**.
//! Element `i` of a packed line occupies bits `[i·b, i·b + b)` of the line's stream, lowest
//! bits first; stream bit `k` is bit `k mod 32` of word `k / 32`, so a line of `n` elements
//! fills exactly `ceil(n·b/32)` words and a `b`-bit code may straddle two words (3, 5, 6, 7
//! bits). The unused high bits of a line's last word are zero. Each line starts a new word.
//!
//! * compressed-tensors ≥ 0.18 (`pack_to_int32`): `weight_packed` is [`pack_rows`] of the
//!   codes (lines = output rows, packed along the input axis); `weight_zero_point` is
//!   [`pack_cols`] of the `(out, n_groups)` zero points (packed along the output axis).
//! * GPTQ (AutoGPTQ / GPTQModel, bits 2, 3, 4, 8): `qweight` is [`pack_cols`] of the
//!   transposed codes — the same stream along the input axis, stored `[in·b/32, out]` — and
//!   `qzeros` is [`pack_rows`] of the `(n_groups, out)` zero points. GPTQ's 3-bit
//!   "10 | 1 | 10 | 1 | 10" word pattern is this stream for 32 elements in 3 words.
//!
//! Words are `u32` here; checkpoints store the same bits as `int32`. `docs/formats.md` cites
//! the sources. The `cpu` module holds the reference implementation (rayon over lines); the
//! `cuda` module packs codes already on the device into either [`PackLayout`], bit for bit the
//! reference ([`pack_gpu`], [`pack_device`], [`launch_pack_into`]; the engine's
//! `LayerJob::pack` downloads packed words instead of codes). Zero points stay on the host:
//! they are `rows·n_groups` bytes (at most 1/32 of the codes), arrive with the qmeta4 records
//! anyway, and [`pack_cols`] / [`pack_rows`] pack them in microseconds.

mod cpu;
mod cuda;

pub use cpu::{pack_cols, pack_rows, transpose, unpack_cols, unpack_rows};
pub use cuda::{launch_pack_into, pack_device, pack_gpu, tile_chunks};

use crate::checkpoint::format::CheckpointFormat;
use crate::{ForgeError, Result};
use ndarray::{Array2, ArrayView2};

/// Bits per packed word.
pub const WORD_BITS: usize = 32;

/// Checks `bits` is one of the widths the engine quantizes to (`2..=8`).
pub fn check_bits(bits: u32) -> Result<()> {
    if (2..=8).contains(&bits) {
        Ok(())
    } else {
        Err(ForgeError::Bits(bits))
    }
}

/// Words one packed line of `n` `bits`-bit elements takes: `ceil(n·bits/32)`.
pub fn packed_len(n: usize, bits: u32) -> Result<usize> {
    check_bits(bits)?;
    n.checked_mul(bits as usize)
        .map(|total| total.div_ceil(WORD_BITS))
        .ok_or_else(|| ForgeError::Shape(format!("{n} elements of {bits} bits overflow usize")))
}

/// How a `(rows, cols)` matrix of codes is laid out as packed words. Both layouts pack each
/// row (an output channel's codes along the input axis) into the same dense stream of
/// `ceil(cols·bits/32)` words; they differ in which axis is contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PackLayout {
    /// `(rows, ceil(cols·bits/32))`, [`pack_rows`]: compressed-tensors `weight_packed`,
    /// qmeta4-native `qweight_packed`.
    Rows,
    /// `(ceil(cols·bits/32), rows)`, [`pack_cols`] of the transposed codes: GPTQ `qweight`
    /// (packed along the input axis, output axis contiguous).
    Transposed,
}

impl PackLayout {
    /// The layout of `format`'s packed weight.
    pub fn for_format(format: CheckpointFormat) -> Self {
        match format {
            CheckpointFormat::Gptq | CheckpointFormat::GptqV2 => PackLayout::Transposed,
            CheckpointFormat::CompressedTensors | CheckpointFormat::Qmeta4Native => PackLayout::Rows,
        }
    }

    /// The words' shape for `rows × cols` codes of `bits` bits.
    pub fn shape(self, rows: usize, cols: usize, bits: u32) -> Result<(usize, usize)> {
        let w = packed_len(cols, bits)?;
        Ok(match self {
            PackLayout::Rows => (rows, w),
            PackLayout::Transposed => (w, rows),
        })
    }

    /// The CPU reference: [`pack_rows`] of the codes, transposed for [`PackLayout::Transposed`].
    pub fn pack_cpu(self, codes: ArrayView2<'_, u8>, bits: u32) -> Result<Array2<u32>> {
        match self {
            PackLayout::Rows => pack_rows(codes, bits),
            PackLayout::Transposed => pack_cols(codes.t(), bits),
        }
    }
}

/// Codes packed into words: what the engine returns for a job with `LayerJob::pack` set.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedCodes {
    /// The layout of `words`.
    pub layout: PackLayout,
    /// Bits per code.
    pub bits: u32,
    /// Rows of the codes (output features).
    pub rows: usize,
    /// Codes per row (input features).
    pub cols: usize,
    /// The words, shaped by [`PackLayout::shape`].
    pub words: Array2<u32>,
}

impl PackedCodes {
    /// The `(rows, cols)` codes back (the CPU unpacker).
    pub fn unpack(&self) -> Result<Array2<u8>> {
        match self.layout {
            PackLayout::Rows => unpack_rows(self.words.view(), self.bits, self.cols),
            PackLayout::Transposed => {
                Ok(unpack_cols(self.words.view(), self.bits, self.cols)?.t().as_standard_layout().into_owned())
            }
        }
    }
}
