//! Weight tensors as the grid builder and solver read them: `(rows = out_features,
//! cols = in_features)` in one of the supported dtypes, widened exactly to f32; one layer
//! read from a safetensors file ([`load_layer`]) or made up ([`synthetic_layer`]); block-scaled
//! FP8 weights and their device dequantization ([`Fp8Blocks`]).

mod file;
mod fp8;
mod synthetic;

pub use file::{load_layer, HessianSource, LayerFile, LayerStats, OwnedWeight, MAX_HEADER_BYTES};
pub(crate) use fp8::enqueue_fp8_block_dequant;
pub use fp8::{dequantize_fp8_blocks_gpu, dequantize_fp8_blocks_gpu_bf16, BlockScaleDtype, Fp8Blocks, Fp8Output};
pub use synthetic::{synthetic_layer, MAX_SYNTHETIC_TOKENS};

use crate::{ForgeError, Result};
use forge_numerics::{bf16_bits_to_f32, f16_bits_to_f32, fp8_e4m3_to_f32};
use ndarray::ArrayView2;
use std::borrow::Cow;

/// Element types the engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// OCP fp8 E4M3 (`float8_e4m3fn`), as raw bytes.
    Fp8E4M3,
}

impl WeightDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 | WeightDtype::BF16 => 2,
            WeightDtype::Fp8E4M3 => 1,
        }
    }

    /// Parses a safetensors / PyTorch dtype name (`F32`, `float16`, `bf16`, `F8_E4M3`, ...).
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(WeightDtype::F32),
            "f16" | "float16" | "half" => Ok(WeightDtype::F16),
            "bf16" | "bfloat16" => Ok(WeightDtype::BF16),
            "f8_e4m3" | "float8_e4m3fn" | "fp8_e4m3" | "e4m3" => Ok(WeightDtype::Fp8E4M3),
            _ => Err(ForgeError::Dtype(name.to_string())),
        }
    }
}

/// A borrowed 2-D weight in any supported dtype.
#[derive(Clone, Copy, Debug)]
pub enum WeightView<'a> {
    /// f32 weights.
    F32(ArrayView2<'a, f32>),
    /// f16 weights.
    F16(ArrayView2<'a, half::f16>),
    /// bf16 weights.
    BF16(ArrayView2<'a, half::bf16>),
    /// fp8 E4M3 weights as raw bytes.
    Fp8E4M3(ArrayView2<'a, u8>),
}

impl<'a> WeightView<'a> {
    /// `(rows, cols)`.
    pub fn dim(&self) -> (usize, usize) {
        match self {
            WeightView::F32(a) => a.dim(),
            WeightView::F16(a) => a.dim(),
            WeightView::BF16(a) => a.dim(),
            WeightView::Fp8E4M3(a) => a.dim(),
        }
    }

    /// The same view with a shorter lifetime.
    pub fn reborrow(&self) -> WeightView<'_> {
        match self {
            WeightView::F32(a) => WeightView::F32(a.view()),
            WeightView::F16(a) => WeightView::F16(a.view()),
            WeightView::BF16(a) => WeightView::BF16(a.view()),
            WeightView::Fp8E4M3(a) => WeightView::Fp8E4M3(a.view()),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> WeightDtype {
        match self {
            WeightView::F32(_) => WeightDtype::F32,
            WeightView::F16(_) => WeightDtype::F16,
            WeightView::BF16(_) => WeightDtype::BF16,
            WeightView::Fp8E4M3(_) => WeightDtype::Fp8E4M3,
        }
    }

    /// Reads row `r` widened to f32 into `out[..cols]`; errors on the first NaN/inf, on a row
    /// out of range and on an `out` shorter than a row.
    pub fn read_row_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.dim().1;
        let len = out.len();
        let out = out.get_mut(..cols).ok_or_else(|| {
            ForgeError::Shape(format!("read_row_f32: the output holds {len} values, a row has {cols}"))
        })?;
        self.read_f32(r, 0, out)
    }

    /// Reads `out.len()` values of row `r` from column `c0` on, widened to f32; errors on the
    /// first NaN/inf (reported with its row and column), a row out of range or columns past
    /// the end.
    pub fn read_f32(&self, r: usize, c0: usize, out: &mut [f32]) -> Result<()> {
        let (rows, cols) = self.dim();
        let c1 = c0.checked_add(out.len()).filter(|&c1| c1 <= cols);
        let Some(c1) = c1.filter(|_| r < rows) else {
            return Err(ForgeError::Shape(format!(
                "reading row {r}, columns {c0}..+{} of a {rows}×{cols} weight: out of range",
                out.len()
            )));
        };
        fn fill<T: Copy>(row: ndarray::ArrayView1<T>, out: &mut [f32], f: impl Fn(T) -> f32) {
            // A contiguous row as a slice: the loop vectorizes (the host passes of a checkpoint
            // run read every weight through here).
            match row.as_slice() {
                Some(s) => {
                    for (o, &v) in out.iter_mut().zip(s) {
                        *o = f(v);
                    }
                }
                None => {
                    for (o, &v) in out.iter_mut().zip(row.iter()) {
                        *o = f(v);
                    }
                }
            }
        }
        let s = ndarray::s![r, c0..c1];
        match self {
            WeightView::F32(a) => fill(a.slice(s), out, |v| v),
            WeightView::F16(a) => fill(a.slice(s), out, |v| f16_bits_to_f32(v.to_bits())),
            WeightView::BF16(a) => fill(a.slice(s), out, |v| bf16_bits_to_f32(v.to_bits())),
            WeightView::Fp8E4M3(a) => fill(a.slice(s), out, fp8_e4m3_to_f32),
        }
        // A branch-free pass first; the position only on the rare bad row.
        if out.iter().fold(true, |ok, v| ok & v.is_finite()) {
            return Ok(());
        }
        match out.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(k) => Err(ForgeError::NonFinite { tensor: "weight", row: r, col: c0 + k, value: out[k] }),
        }
    }

    /// The raw bytes of a standard-layout (row-major, contiguous) view, for upload.
    pub fn contiguous_bytes(&self) -> Option<&'a [u8]> {
        match *self {
            WeightView::F32(a) => a.to_slice().map(bytemuck::cast_slice),
            WeightView::F16(a) => a.to_slice().map(bytemuck::cast_slice),
            WeightView::BF16(a) => a.to_slice().map(bytemuck::cast_slice),
            WeightView::Fp8E4M3(a) => a.to_slice(),
        }
    }

    /// The raw bytes in row-major order: borrowed when the view is contiguous, else a copy.
    pub fn row_major_bytes(&self) -> Cow<'a, [u8]> {
        if let Some(b) = self.contiguous_bytes() {
            return Cow::Borrowed(b);
        }
        Cow::Owned(match *self {
            WeightView::F32(a) => a.iter().flat_map(|v| v.to_ne_bytes()).collect(),
            WeightView::F16(a) => a.iter().flat_map(|v| v.to_bits().to_ne_bytes()).collect(),
            WeightView::BF16(a) => a.iter().flat_map(|v| v.to_bits().to_ne_bytes()).collect(),
            WeightView::Fp8E4M3(a) => a.iter().copied().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    /// A transposed (non-contiguous) view gives the bytes of its row-major copy; a contiguous
    /// one is borrowed.
    #[test]
    fn row_major_bytes_of_strided_views_equal_a_row_major_copy() {
        let a = ndarray::Array2::from_shape_fn((3, 5), |(r, c)| (r * 5 + c) as f32 - 6.5);
        let t = a.t();
        let want: Vec<u8> = t.as_standard_layout().iter().flat_map(|v| v.to_ne_bytes()).collect();
        assert!(matches!(WeightView::F32(t).row_major_bytes(), Cow::Owned(ref b) if *b == want));
        assert!(matches!(WeightView::F32(a.view()).row_major_bytes(), Cow::Borrowed(_)));
        let h = a.mapv(half::bf16::from_f32);
        let want: Vec<u8> = h.t().as_standard_layout().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
        assert_eq!(&WeightView::BF16(h.t()).row_major_bytes()[..], &want[..]);
        let q = ndarray::Array2::from_shape_fn((2, 4), |(r, c)| (r * 4 + c) as u8);
        assert_eq!(&WeightView::Fp8E4M3(q.t()).row_major_bytes()[..], &[0, 4, 1, 5, 2, 6, 3, 7]);
    }
}
