//! One layer from a safetensors file: its weight (in the dtype it was stored in) and its
//! Hessian, given or built from stored activations. The front end of `quantize_layer`.

use super::{WeightDtype, WeightView};
use crate::hessian::HessianAccumulator;
use crate::{budget, fsio, ForgeError, Result};
use forge_numerics::{bf16_bits_to_f32, f16_bits_to_f32, fp8_e4m3_to_f32};
use ndarray::{Array2, ArrayView2};
use safetensors::tensor::{Metadata, TensorInfo};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
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

/// Largest safetensors header read: the safetensors crate's own limit (100 MB).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Reads weight `weight_name` (default: the file's only 2-D tensor other than the
/// statistics) and the layer's Hessian from `path`.
///
/// The file must be a regular file (a FIFO, a device or a directory is refused without
/// blocking). Reads are bounded by the header: the 8-byte length is bounded by
/// [`MAX_HEADER_BYTES`] and the file size, the header is parsed and validated (offsets
/// contiguous, sizes matching shapes and dtypes), the data size it describes must equal the
/// rest of the file, and the memory the layer needs is checked against the host budget
/// ([`crate::budget`]) before any tensor data is read. Only the two tensors used are read.
pub fn load_layer(path: &Path, weight_name: Option<&str>, stats: LayerStats<'_>) -> Result<LayerFile> {
    let (mut file, file_len) = fsio::open_regular(path)?;
    let header = read_header(&mut file, file_len, path)?;
    let stats_name = match stats {
        LayerStats::Activations(n) | LayerStats::Hessian(n) => n,
    };
    let tensors = header.meta.tensors();
    let name = match weight_name {
        Some(n) => n.to_string(),
        None => {
            let mut candidates: Vec<&String> =
                tensors.iter().filter(|(n, t)| t.shape.len() == 2 && *n != stats_name).map(|(n, _)| n).collect();
            candidates.sort();
            match candidates.as_slice() {
                [one] => (*one).clone(),
                [] => {
                    return Err(ForgeError::Safetensors(format!(
                        "{}: no 2-D weight tensor found; the file holds: {}",
                        path.display(),
                        describe(&header.meta)
                    )))
                }
                many => {
                    let shown: Vec<&str> = many.iter().take(LISTED).map(|s| s.as_str()).collect();
                    return Err(ForgeError::Safetensors(format!(
                        "{}: several 2-D tensors ({}{}); pick the weight by name",
                        path.display(),
                        shown.join(", "),
                        if many.len() > LISTED { format!(", ... {} in all", many.len()) } else { String::new() }
                    )));
                }
            }
        }
    };
    let winfo = get_info(&header.meta, path, &name)?;
    let shape = winfo.shape.clone();
    let (rows, cols) = match shape.as_slice() {
        &[r, c] if r > 0 && c > 0 => (r, c),
        _ => {
            return Err(ForgeError::Shape(format!(
                "weight '{name}' has shape {shape:?}: it must be 2-D (out_features, in_features) and non-empty"
            )))
        }
    };
    let dtype = WeightDtype::parse(&winfo.dtype.to_string())
        .map_err(|_| ForgeError::Dtype(format!("{} (weight '{name}')", winfo.dtype)))?;
    let wbytes = tensor_bytes(winfo);

    // What the layer needs in memory, checked before any data is read: the raw bytes and the
    // typed copy of each tensor, and for activations the f32 widening, H and the XᵀX scratch.
    let mut need = budget::Request::new().bytes(2, &[wbytes]);
    let stats_info = get_info(&header.meta, path, stats_name)?;
    let stats_shape = stats_info.shape.clone();
    let tokens = match stats {
        LayerStats::Activations(xname) => {
            if stats_shape.len() < 2 || stats_shape.last() != Some(&cols) {
                return Err(ForgeError::Shape(format!(
                    "activations '{xname}' have shape {stats_shape:?}: expected (tokens, {cols}) or (..., {cols}) to match the weight's {cols} input columns"
                )));
            }
            let tokens = budget::elements(&stats_shape[..stats_shape.len() - 1], "activations")?;
            if tokens == 0 {
                return Err(ForgeError::Shape(format!("activations '{xname}' hold no tokens (shape {stats_shape:?})")));
            }
            need = need
                .bytes(1, &[tensor_bytes(stats_info)])
                .array::<f32>(&[tokens, cols])
                .array::<f32>(&[cols, cols])
                .array::<f32>(&[cols, cols]);
            tokens
        }
        LayerStats::Hessian(hname) => {
            if stats_shape != [cols, cols] {
                return Err(ForgeError::Shape(format!(
                    "Hessian '{hname}' has shape {stats_shape:?}: expected [{cols}, {cols}] for a weight with {cols} input columns"
                )));
            }
            need = need.bytes(1, &[tensor_bytes(stats_info)]).array::<f32>(&[cols, cols]);
            0
        }
    };
    // The stats dtype is checked before the budget so a bad dtype is reported as such.
    stats_dtype(stats_info, stats_name)?;
    need.check(&format!("loading layer '{name}' ({rows}×{cols}) with '{stats_name}' from {}", path.display()))?;

    let data = read_tensor(&mut file, &header, winfo, path, &name)?;
    let weight = match dtype {
        WeightDtype::F32 => OwnedWeight::F32(Array2::from_shape_vec((rows, cols), le_f32(&data)).map_err(shape_err)?),
        WeightDtype::F16 => OwnedWeight::F16(
            Array2::from_shape_vec((rows, cols), le_u16(&data).into_iter().map(half::f16::from_bits).collect())
                .map_err(shape_err)?,
        ),
        WeightDtype::BF16 => OwnedWeight::BF16(
            Array2::from_shape_vec((rows, cols), le_u16(&data).into_iter().map(half::bf16::from_bits).collect())
                .map_err(shape_err)?,
        ),
        WeightDtype::Fp8E4M3 => OwnedWeight::Fp8E4M3(Array2::from_shape_vec((rows, cols), data).map_err(shape_err)?),
    };

    let stats_data = read_tensor(&mut file, &header, stats_info, path, stats_name)?;
    let (hessian, hessian_source) = match stats {
        LayerStats::Activations(xname) => {
            let x = to_f32(stats_info, &stats_data, xname)?;
            drop(stats_data);
            let x = ArrayView2::from_shape((tokens, cols), &x).map_err(shape_err)?;
            let mut acc = HessianAccumulator::new(cols)?;
            acc.update(x)?;
            (acc.into_h(), HessianSource::Activations { name: xname.to_string(), tokens })
        }
        LayerStats::Hessian(hname) => {
            let h = Array2::from_shape_vec((cols, cols), to_f32(stats_info, &stats_data, hname)?).map_err(shape_err)?;
            (h, HessianSource::Stored { name: hname.to_string() })
        }
    };
    Ok(LayerFile { weight, weight_name: name, hessian, hessian_source })
}

/// Names listed in an error message at most.
const LISTED: usize = 16;

/// A parsed, validated header: where the data starts and what it holds.
struct Header {
    data_start: u64,
    meta: Metadata,
}

fn st_err(path: &Path, msg: String) -> ForgeError {
    ForgeError::Safetensors(format!("{}: not a valid safetensors file: {msg}", path.display()))
}

/// Reads and validates the header; the data it describes must fill the rest of the file.
fn read_header(file: &mut File, file_len: u64, path: &Path) -> Result<Header> {
    let io = |source| ForgeError::Io { path: path.display().to_string(), source };
    if file_len < 8 {
        return Err(st_err(path, format!("{file_len} bytes, too short for the 8-byte header length")));
    }
    let mut len8 = [0u8; 8];
    file.read_exact(&mut len8).map_err(io)?;
    let n = u64::from_le_bytes(len8);
    if n > MAX_HEADER_BYTES {
        return Err(st_err(path, format!("header length {n} bytes exceeds the limit of {MAX_HEADER_BYTES}")));
    }
    if n > file_len - 8 {
        return Err(st_err(path, format!("header length {n} bytes, but the file has only {} after it", file_len - 8)));
    }
    let mut text = Vec::new();
    text.try_reserve_exact(n as usize).map_err(|_| ForgeError::OutOfMemory {
        what: "the safetensors header".into(),
        requested: Some(n),
        limit: 0,
        origin: "the allocator refused".into(),
    })?;
    file.by_ref().take(n).read_to_end(&mut text).map_err(io)?;
    if text.len() as u64 != n {
        return Err(st_err(path, "the file ended inside the header (did it change while being read?)".into()));
    }
    let text = std::str::from_utf8(&text).map_err(|e| st_err(path, format!("header is not UTF-8: {e}")))?;
    let meta: Metadata = serde_json::from_str(text).map_err(|e| st_err(path, format!("header: {e}")))?;
    let data_start = 8 + n;
    let described = meta.data_len() as u64;
    let present = file_len - data_start;
    if described != present {
        return Err(st_err(
            path,
            format!("the header describes {described} bytes of tensor data, the file holds {present}"),
        ));
    }
    Ok(Header { data_start, meta })
}

/// Bytes of a validated tensor.
fn tensor_bytes(info: &TensorInfo) -> usize {
    info.data_offsets.1 - info.data_offsets.0
}

/// Reads one tensor's bytes (bounded by the validated header).
fn read_tensor(file: &mut File, header: &Header, info: &TensorInfo, path: &Path, name: &str) -> Result<Vec<u8>> {
    let io = |source| ForgeError::Io { path: path.display().to_string(), source };
    let len = tensor_bytes(info);
    file.seek(SeekFrom::Start(header.data_start + info.data_offsets.0 as u64)).map_err(io)?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len).map_err(|_| ForgeError::OutOfMemory {
        what: format!("tensor '{name}'"),
        requested: Some(len as u64),
        limit: 0,
        origin: "the allocator refused".into(),
    })?;
    file.by_ref().take(len as u64).read_to_end(&mut buf).map_err(io)?;
    if buf.len() != len {
        return Err(st_err(path, format!("the file ended inside tensor '{name}' (did it change while being read?)")));
    }
    Ok(buf)
}

fn shape_err(e: ndarray::ShapeError) -> ForgeError {
    ForgeError::Shape(e.to_string())
}

fn get_info<'m>(meta: &'m Metadata, path: &Path, name: &str) -> Result<&'m TensorInfo> {
    meta.info(name).ok_or_else(|| {
        ForgeError::Safetensors(format!(
            "{}: no tensor named '{name}'; the file holds: {}",
            path.display(),
            describe(meta)
        ))
    })
}

/// "name dtype [shape], ..." of the file's tensors, sorted by name (at most [`LISTED`]).
fn describe(meta: &Metadata) -> String {
    let mut all: Vec<String> =
        meta.tensors().into_iter().map(|(n, t)| format!("{n} {} {:?}", t.dtype, t.shape)).collect();
    all.sort();
    match all.len() {
        0 => "no tensors".into(),
        n if n > LISTED => format!("{}, ... {n} tensors in all", all[..LISTED].join(", ")),
        _ => all.join(", "),
    }
}

fn le_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn le_u16(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

fn stats_dtype(info: &TensorInfo, name: &str) -> Result<WeightDtype> {
    WeightDtype::parse(&info.dtype.to_string())
        .map_err(|_| ForgeError::Dtype(format!("{} (tensor '{name}')", info.dtype)))
}

/// Any supported float tensor, widened exactly to f32.
fn to_f32(info: &TensorInfo, data: &[u8], name: &str) -> Result<Vec<f32>> {
    Ok(match stats_dtype(info, name)? {
        WeightDtype::F32 => le_f32(data),
        WeightDtype::F16 => le_u16(data).into_iter().map(f16_bits_to_f32).collect(),
        WeightDtype::BF16 => le_u16(data).into_iter().map(bf16_bits_to_f32).collect(),
        WeightDtype::Fp8E4M3 => data.iter().map(|&b| fp8_e4m3_to_f32(b)).collect(),
    })
}
