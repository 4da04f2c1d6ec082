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
//! the sources. The `cpu` module holds the reference implementation (rayon over lines).

mod cpu;

pub use cpu::{pack_cols, pack_rows, transpose, unpack_cols, unpack_rows};

use crate::{ForgeError, Result};

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
