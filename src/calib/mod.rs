//! Calibration and layer quantization in the shape of MoE-Quant's `GPTQ` class (docs/design.md §5):
//! feed a layer's input activations with `update`, run the `quantization_pre_step`, then
//! `quantize`.
//!
//! * [`GptqLayer`]: one weight with its own Hessian (`new`, `update`, `quantization_pre_step`,
//!   `quantize`).
//! * [`SharedHessian`] + [`PreparedFactor`] + [`quantize_with`]: layers that see the same
//!   inputs (an expert's gate and up projections) accumulate one Hessian and factor it once,
//!   then each weight is solved with that factor.
//! * [`quantize_experts`]: many experts in one call, device buffers reused across experts
//!   of the same shape; an expert without calibration tokens gets `H = I`
//!   (round-to-nearest) and is flagged.
//!
//! What runs where: on [`crate::Backend::Cpu`] everything is the ndarray/faer reference
//! ([`crate::hessian::HessianAccumulator`], [`crate::hessian::pre_step_cpu`],
//! [`crate::solver::solve_cpu`]). On [`crate::Backend::Gpu`] the Hessian is accumulated on the
//! device ([`crate::hessian::GpuHessian`]), the pre-step runs on the device through cuSOLVER
//! ([`crate::hessian::GpuPreStepper`], f64 like the CPU) when cuSOLVER can be loaded and on the
//! CPU otherwise (reported as [`PreStepRoute::Cpu`] in the result), and grid and solve run
//! on the device.

pub mod data;
mod experts;
mod layer;
pub mod model;

pub(crate) use experts::layers_of;
pub use experts::{quantize_experts, ExpertInput};
pub use layer::{quantize_with, GptqLayer, PreStepRoute, PreparedFactor, QuantizeFlags, QuantizedLayer, SharedHessian};

use crate::{ForgeError, Result};
use half::{bf16, f16};
use ndarray::{s, Array2, ArrayView2};

/// Element types of calibration activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActivationDtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl ActivationDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ActivationDtype::F32 => 4,
            ActivationDtype::F16 | ActivationDtype::BF16 => 2,
        }
    }
}

/// A borrowed batch of a layer's input activations, `(tokens, cols)` with `cols` the
/// layer's input features (any leading batch/sequence axes flattened into `tokens`).
#[derive(Clone, Copy, Debug)]
pub enum ActivationView<'a> {
    /// f32 activations.
    F32(ArrayView2<'a, f32>),
    /// f16 activations.
    F16(ArrayView2<'a, f16>),
    /// bf16 activations.
    BF16(ArrayView2<'a, bf16>),
}

impl<'a> ActivationView<'a> {
    /// `(tokens, cols)`.
    pub fn dim(&self) -> (usize, usize) {
        match self {
            ActivationView::F32(a) => a.dim(),
            ActivationView::F16(a) => a.dim(),
            ActivationView::BF16(a) => a.dim(),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> ActivationDtype {
        match self {
            ActivationView::F32(_) => ActivationDtype::F32,
            ActivationView::F16(_) => ActivationDtype::F16,
            ActivationView::BF16(_) => ActivationDtype::BF16,
        }
    }

    /// Tokens `t0..t1` (a view, no copy); `t0 > t1` or `t1` past the last token is a
    /// [`ForgeError::Shape`].
    pub fn rows(&self, t0: usize, t1: usize) -> Result<ActivationView<'a>> {
        let tokens = self.dim().0;
        if t0 > t1 || t1 > tokens {
            return Err(ForgeError::Shape(format!("tokens {t0}..{t1} of a batch of {tokens}")));
        }
        Ok(match *self {
            ActivationView::F32(a) => ActivationView::F32(a.slice_move(s![t0..t1, ..])),
            ActivationView::F16(a) => ActivationView::F16(a.slice_move(s![t0..t1, ..])),
            ActivationView::BF16(a) => ActivationView::BF16(a.slice_move(s![t0..t1, ..])),
        })
    }

    /// The raw little-endian bytes of a standard-layout (row-major, contiguous) view.
    pub fn contiguous_bytes(&self) -> Option<&'a [u8]> {
        match *self {
            ActivationView::F32(a) => a.to_slice().map(bytemuck::cast_slice),
            ActivationView::F16(a) => a.to_slice().map(bytemuck::cast_slice),
            ActivationView::BF16(a) => a.to_slice().map(bytemuck::cast_slice),
        }
    }

    /// Row-major bytes: borrowed when the view is contiguous, else a copy.
    pub fn to_bytes(&self) -> std::borrow::Cow<'a, [u8]> {
        if let Some(b) = self.contiguous_bytes() {
            return std::borrow::Cow::Borrowed(b);
        }
        let bytes = match *self {
            ActivationView::F32(a) => bytemuck::cast_slice(&a.iter().copied().collect::<Vec<_>>()).to_vec(),
            ActivationView::F16(a) => bytemuck::cast_slice(&a.iter().copied().collect::<Vec<_>>()).to_vec(),
            ActivationView::BF16(a) => bytemuck::cast_slice(&a.iter().copied().collect::<Vec<_>>()).to_vec(),
        };
        std::borrow::Cow::Owned(bytes)
    }

    /// The activations widened exactly to f32 (the copy is checked against the host budget).
    pub fn to_f32(&self) -> Result<Array2<f32>> {
        let (m, cols) = self.dim();
        crate::budget::Request::new()
            .array::<f32>(&[m, cols])
            .check(&format!("widening {m}×{cols} activations to f32"))?;
        Ok(match *self {
            ActivationView::F32(a) => a.to_owned(),
            ActivationView::F16(a) => a.mapv(|v| forge_numerics::f16_bits_to_f32(v.to_bits())),
            ActivationView::BF16(a) => a.mapv(|v| forge_numerics::bf16_bits_to_f32(v.to_bits())),
        })
    }

    /// The first NaN/inf in row-major order as a typed error (`row` counted from
    /// `row_offset`, for chunks of a larger batch).
    pub fn check_finite(&self, row_offset: usize) -> Result<()> {
        fn find<T: Copy>(a: ArrayView2<'_, T>, f: impl Fn(T) -> f32) -> Option<((usize, usize), f32)> {
            a.indexed_iter().map(|(ix, &v)| (ix, f(v))).find(|(_, v)| !v.is_finite())
        }
        let bad = match *self {
            ActivationView::F32(a) => find(a, |v| v),
            ActivationView::F16(a) => find(a, |v| forge_numerics::f16_bits_to_f32(v.to_bits())),
            ActivationView::BF16(a) => find(a, |v| forge_numerics::bf16_bits_to_f32(v.to_bits())),
        };
        match bad {
            Some(((row, col), value)) => {
                Err(ForgeError::NonFinite { tensor: "activations", row: row_offset + row, col, value })
            }
            None => Ok(()),
        }
    }
}

/// Activation bytes (`tokens × cols`, row-major) as a typed view, for error reports on data
/// that came back from the device.
pub(crate) fn check_finite_bytes(bytes: &[u8], dtype: ActivationDtype, cols: usize, row_offset: usize) -> Result<()> {
    let size = dtype.size();
    for (k, c) in bytes.chunks_exact(size).enumerate() {
        let value = match dtype {
            ActivationDtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            ActivationDtype::F16 => forge_numerics::f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])),
            ActivationDtype::BF16 => forge_numerics::bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])),
        };
        if !value.is_finite() {
            return Err(ForgeError::NonFinite {
                tensor: "activations",
                row: row_offset + k / cols.max(1),
                col: k % cols.max(1),
                value,
            });
        }
    }
    Ok(())
}
