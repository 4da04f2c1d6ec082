//! One layer from a safetensors file: its weight (in the dtype it was stored in) and its
//! Hessian, given or built from stored activations. The front end of `quantize_layer`.

use super::{WeightDtype, WeightView};
use crate::hessian::HessianAccumulator;
use crate::{ForgeError, Result};
use forge_numerics::{bf16_bits_to_f32, f16_bits_to_f32, fp8_e4m3_to_f32};
use ndarray::{Array2, ArrayView2};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::path::Path;

/// A weight in the dtype it was stored in.
#[derive(Clone, Debug)]
pub enum OwnedWeight {
    /// f32.
    F32(Array2<f32>),
    /// f16.
    F16(Array2<half::f16>),
    /// bf16.
    BF16(Array2<half::bf16>),
    /// fp8 E4M3 bytes.
    Fp8E4M3(Array2<u8>),
}

impl OwnedWeight {
    /// A borrowed view.
    pub fn view(&self) -> WeightView<'_> {
        match self {
            OwnedWeight::F32(a) => WeightView::F32(a.view()),
            OwnedWeight::F16(a) => WeightView::F16(a.view()),
            OwnedWeight::BF16(a) => WeightView::BF16(a.view()),
            OwnedWeight::Fp8E4M3(a) => WeightView::Fp8E4M3(a.view()),
        }
    }
}

/// Where a layer's input statistics come from in its file.
#[derive(Clone, Copy, Debug)]
pub enum LayerStats<'a> {
    /// Activations `(tokens, in_features)` (or any shape ending in `in_features`):
    /// `H = 2/n·XᵀX` is built from them.
    Activations(&'a str),
    /// A stored `in_features × in_features` Hessian.
    Hessian(&'a str),
}

/// How the Hessian of a [`LayerFile`] was obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HessianSource {
    /// Built from this many activation tokens of the named tensor.
    Activations {
        /// Tensor name.
        name: String,
        /// Tokens.
        tokens: usize,
    },
    /// Read as stored.
    Stored {
        /// Tensor name.
        name: String,
    },
}

/// One layer read from a safetensors file.
#[derive(Clone, Debug)]
pub struct LayerFile {
    /// The weight, `(out_features, in_features)`.
    pub weight: OwnedWeight,
    /// Its tensor name.
    pub weight_name: String,
    /// `H`, `(in_features, in_features)`.
    pub hessian: Array2<f32>,
    /// Where `H` came from.
    pub hessian_source: HessianSource,
}

/// Reads weight `weight_name` (default: the file's only 2-D tensor other than the
/// statistics) and the layer's Hessian from `path`. The file must be a regular file.
pub fn load_layer(path: &Path, weight_name: Option<&str>, stats: LayerStats<'_>) -> Result<LayerFile> {
    let io = |source| ForgeError::Io { path: path.display().to_string(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(ForgeError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ForgeError::Safetensors(format!("{}: not a valid safetensors file: {e}", path.display())))?;
    let stats_name = match stats {
        LayerStats::Activations(n) | LayerStats::Hessian(n) => n,
    };
    let name = match weight_name {
        Some(n) => n.to_string(),
        None => {
            let mut candidates: Vec<String> = st
                .tensors()
                .into_iter()
                .filter(|(n, t)| t.shape().len() == 2 && n != stats_name)
                .map(|(n, _)| n)
                .collect();
            candidates.sort();
            match candidates.len() {
                1 => candidates.remove(0),
                0 => {
                    return Err(ForgeError::Safetensors(format!(
                        "{}: no 2-D weight tensor found; the file holds: {}",
                        path.display(),
                        describe(&st)
                    )))
                }
                _ => {
                    return Err(ForgeError::Safetensors(format!(
                        "{}: several 2-D tensors ({}); pick the weight by name",
                        path.display(),
                        candidates.join(", ")
                    )))
                }
            }
        }
    };
    let tv = get_tensor(&st, path, &name)?;
    let shape = tv.shape().to_vec();
    if shape.len() != 2 || shape[0] == 0 || shape[1] == 0 {
        return Err(ForgeError::Shape(format!(
            "weight '{name}' has shape {shape:?}: it must be 2-D (out_features, in_features) and non-empty"
        )));
    }
    let (rows, cols) = (shape[0], shape[1]);
    let dtype = WeightDtype::parse(&tv.dtype().to_string())
        .map_err(|_| ForgeError::Dtype(format!("{} (weight '{name}')", tv.dtype())))?;
    let data = tv.data();
    let weight = match dtype {
        WeightDtype::F32 => OwnedWeight::F32(Array2::from_shape_vec((rows, cols), le_f32(data)).map_err(shape_err)?),
        WeightDtype::F16 => OwnedWeight::F16(
            Array2::from_shape_vec((rows, cols), le_u16(data).into_iter().map(half::f16::from_bits).collect())
                .map_err(shape_err)?,
        ),
        WeightDtype::BF16 => OwnedWeight::BF16(
            Array2::from_shape_vec((rows, cols), le_u16(data).into_iter().map(half::bf16::from_bits).collect())
                .map_err(shape_err)?,
        ),
        WeightDtype::Fp8E4M3 => {
            OwnedWeight::Fp8E4M3(Array2::from_shape_vec((rows, cols), data.to_vec()).map_err(shape_err)?)
        }
    };

    let (hessian, hessian_source) = match stats {
        LayerStats::Activations(xname) => {
            let xv = get_tensor(&st, path, xname)?;
            let xshape = xv.shape().to_vec();
            if xshape.len() < 2 || xshape.last() != Some(&cols) {
                return Err(ForgeError::Shape(format!(
                    "activations '{xname}' have shape {xshape:?}: expected (tokens, {cols}) or (..., {cols}) to match the weight's {cols} input columns"
                )));
            }
            let tokens: usize = xshape[..xshape.len() - 1].iter().product();
            if tokens == 0 {
                return Err(ForgeError::Shape(format!("activations '{xname}' hold no tokens (shape {xshape:?})")));
            }
            let x = to_f32(&xv, xname)?;
            let x = ArrayView2::from_shape((tokens, cols), &x).map_err(shape_err)?;
            let mut acc = HessianAccumulator::new(cols)?;
            acc.update(x)?;
            (acc.into_h(), HessianSource::Activations { name: xname.to_string(), tokens })
        }
        LayerStats::Hessian(hname) => {
            let hv = get_tensor(&st, path, hname)?;
            if hv.shape() != [cols, cols] {
                return Err(ForgeError::Shape(format!(
                    "Hessian '{hname}' has shape {:?}: expected [{cols}, {cols}] for a weight with {cols} input columns",
                    hv.shape()
                )));
            }
            let h = Array2::from_shape_vec((cols, cols), to_f32(&hv, hname)?).map_err(shape_err)?;
            (h, HessianSource::Stored { name: hname.to_string() })
        }
    };
    Ok(LayerFile { weight, weight_name: name, hessian, hessian_source })
}

fn shape_err(e: ndarray::ShapeError) -> ForgeError {
    ForgeError::Shape(e.to_string())
}

fn get_tensor<'a>(st: &SafeTensors<'a>, path: &Path, name: &str) -> Result<TensorView<'a>> {
    st.tensor(name).map_err(|_| {
        ForgeError::Safetensors(format!(
            "{}: no tensor named '{name}'; the file holds: {}",
            path.display(),
            describe(st)
        ))
    })
}

/// "name dtype [shape], ..." of every tensor in the file, sorted by name.
fn describe(st: &SafeTensors<'_>) -> String {
    let mut all: Vec<String> =
        st.tensors().into_iter().map(|(n, t)| format!("{n} {} {:?}", t.dtype(), t.shape())).collect();
    all.sort();
    if all.is_empty() {
        "no tensors".into()
    } else {
        all.join(", ")
    }
}

fn le_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn le_u16(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// Any supported float tensor, widened exactly to f32.
fn to_f32(t: &TensorView<'_>, name: &str) -> Result<Vec<f32>> {
    let dtype = WeightDtype::parse(&t.dtype().to_string())
        .map_err(|_| ForgeError::Dtype(format!("{} (tensor '{name}')", t.dtype())))?;
    Ok(match dtype {
        WeightDtype::F32 => le_f32(t.data()),
        WeightDtype::F16 => le_u16(t.data()).into_iter().map(f16_bits_to_f32).collect(),
        WeightDtype::BF16 => le_u16(t.data()).into_iter().map(bf16_bits_to_f32).collect(),
        WeightDtype::Fp8E4M3 => t.data().iter().map(|&b| fp8_e4m3_to_f32(b)).collect(),
    })
}
