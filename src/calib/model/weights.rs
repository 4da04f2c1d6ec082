//! Where a model's tensors come from: a trait (name → f32 array) with a safetensors model
//! directory, an in-memory map (test fixtures, quantized copies) and an overlay that
//! substitutes some tensors (dequantized weights) over another source.

use crate::checkpoint::model::MAX_JSON_BYTES;
use crate::checkpoint::st::read_bounded;
use crate::{ForgeError, Result};
use forge_numerics::{bf16_bits_to_f32, f16_bits_to_f32};
use memmap2::Mmap;
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use rayon::prelude::*;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A source of named tensors, widened exactly to f32.
pub trait WeightSource: Sync {
    /// The tensor `name` in f32, or a typed error when it is missing or unreadable.
    fn tensor_f32(&self, name: &str) -> Result<ArrayD<f32>>;

    /// Whether `name` exists.
    fn contains(&self, name: &str) -> bool;
}

/// A 2-D tensor of exactly `shape`.
pub fn matrix(src: &dyn WeightSource, name: &str, shape: (usize, usize)) -> Result<Array2<f32>> {
    let t = src.tensor_f32(name)?;
    if t.shape() != [shape.0, shape.1] {
        return Err(ForgeError::Shape(format!(
            "{name} has shape {:?}, expected [{}, {}]",
            t.shape(),
            shape.0,
            shape.1
        )));
    }
    t.into_dimensionality().map_err(|e| ForgeError::Shape(format!("{name}: {e}")))
}

/// A 1-D tensor of exactly `len` elements.
pub fn vector(src: &dyn WeightSource, name: &str, len: usize) -> Result<Array1<f32>> {
    let t = src.tensor_f32(name)?;
    if t.shape() != [len] {
        return Err(ForgeError::Shape(format!("{name} has shape {:?}, expected [{len}]", t.shape())));
    }
    t.into_dimensionality().map_err(|e| ForgeError::Shape(format!("{name}: {e}")))
}

/// Widens raw little-endian tensor bytes to f32 (F32, F16, BF16).
fn widen(name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) -> Result<ArrayD<f32>> {
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| ForgeError::Shape(format!("{name}: shape {shape:?} overflows")))?;
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => return Err(ForgeError::Dtype(format!("{other:?} (tensor {name})"))),
    };
    if count.checked_mul(width) != Some(data.len()) {
        return Err(ForgeError::Safetensors(format!("{name}: {} bytes for shape {shape:?} of {dtype:?}", data.len())));
    }
    // On all cores: a layer's weights are hundreds of millions of values.
    const CHUNK: usize = 1 << 16;
    let mut values = vec![0f32; count];
    values.par_chunks_mut(CHUNK).zip(data.par_chunks(CHUNK * width)).for_each(|(d, s)| match dtype {
        Dtype::F32 => {
            d.iter_mut().zip(s.chunks_exact(4)).for_each(|(d, c)| *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        }
        Dtype::F16 => d
            .iter_mut()
            .zip(s.chunks_exact(2))
            .for_each(|(d, c)| *d = f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))),
        _ => d
            .iter_mut()
            .zip(s.chunks_exact(2))
            .for_each(|(d, c)| *d = bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))),
    });
    ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|e| ForgeError::Shape(format!("{name}: {e}")))
}

/// One memory-mapped safetensors file with its parsed header.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    meta: Metadata,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let io = |source| ForgeError::Io { path: path.display().to_string(), source };
        let (file, _) = crate::fsio::open_regular(path)?;
        // SAFETY: the map is read-only; a checkpoint modified by another process while we read
        // it is outside what any loader can guard against (safetensors' own docs map the same way).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (header_len, meta) = SafeTensors::read_metadata(&map)
            .map_err(|e| ForgeError::Safetensors(format!("{}: {e}", path.display())))?;
        Ok(MappedFile { path: path.to_path_buf(), map, header_len, meta })
    }

    fn read(&self, name: &str) -> Result<ArrayD<f32>> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| ForgeError::Safetensors(format!("{} has no tensor {name}", self.path.display())))?;
        // read_metadata validated every offset against the buffer length.
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        let data = self
            .map
            .get(start..end)
            .ok_or_else(|| ForgeError::Safetensors(format!("{}: {name} lies outside the file", self.path.display())))?;
        widen(name, info.dtype, &info.shape, data)
    }
}

/// A Hugging Face model directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`, memory-mapped.
pub struct SafetensorsDir {
    files: Vec<MappedFile>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsDir").field("files", &self.files.len()).field("tensors", &self.index.len()).finish()
    }
}

impl SafetensorsDir {
    /// Opens the checkpoint files of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let shard_names: Vec<String> = if index_path.exists() {
            let text = read_bounded(&index_path, MAX_JSON_BYTES)?;
            let v: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| ForgeError::Safetensors(format!("{}: {e}", index_path.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ForgeError::Safetensors(format!("{} has no weight_map object", index_path.display())))?;
            let mut names: Vec<String> = map.values().filter_map(|s| s.as_str().map(str::to_owned)).collect();
            names.sort();
            names.dedup();
            names
        } else if single.exists() {
            vec!["model.safetensors".to_owned()]
        } else {
            return Err(ForgeError::Safetensors(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )));
        };
        let mut files = Vec::with_capacity(shard_names.len());
        let mut index = HashMap::new();
        for name in shard_names {
            // Shard names come from the index; refuse paths that leave the directory.
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                return Err(ForgeError::Safetensors(format!("shard name {name:?} is not a plain file name")));
            }
            let file = MappedFile::open(&dir.join(&name))?;
            for t in file.meta.tensors().keys() {
                index.insert(t.clone(), files.len());
            }
            files.push(file);
        }
        Ok(SafetensorsDir { files, index })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

impl WeightSource for SafetensorsDir {
    fn tensor_f32(&self, name: &str) -> Result<ArrayD<f32>> {
        let file = self
            .index
            .get(name)
            .and_then(|&i| self.files.get(i))
            .ok_or_else(|| ForgeError::Safetensors(format!("the checkpoint has no tensor {name}")))?;
        file.read(name)
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// Tensors held in memory (test fixtures, quantized-dequantized copies).
#[derive(Clone, Debug, Default)]
pub struct MemoryWeights {
    tensors: HashMap<String, ArrayD<f32>>,
}

impl MemoryWeights {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every tensor of a safetensors buffer, widened to f32.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| ForgeError::Safetensors(e.to_string()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let t = widen(&name, view.dtype(), view.shape(), view.data())?;
            tensors.insert(name, t);
        }
        Ok(MemoryWeights { tensors })
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: ArrayD<f32>) {
        self.tensors.insert(name.into(), tensor);
    }

    /// The tensor, if present.
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.tensors.get(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

impl WeightSource for MemoryWeights {
    fn tensor_f32(&self, name: &str) -> Result<ArrayD<f32>> {
        self.tensors.get(name).cloned().ok_or_else(|| ForgeError::Safetensors(format!("no tensor {name}")))
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// `base` with some tensors replaced (e.g. quantized-dequantized Linears), without copying
/// the rest.
pub struct Substituted<'a> {
    base: &'a dyn WeightSource,
    replaced: MemoryWeights,
}

impl<'a> Substituted<'a> {
    /// `base` with nothing replaced yet.
    pub fn new(base: &'a dyn WeightSource) -> Self {
        Substituted { base, replaced: MemoryWeights::new() }
    }

    /// `base` with every tensor of `replaced` substituted (each checked like [`Self::replace`]).
    pub fn from_memory(base: &'a dyn WeightSource, replaced: &MemoryWeights) -> Result<Self> {
        let mut s = Substituted::new(base);
        for name in replaced.names() {
            if let Some(t) = replaced.get(name) {
                s.replace(name, t.clone())?;
            }
        }
        Ok(s)
    }

    /// Replaces `name` (which must exist in `base` with the same shape).
    pub fn replace(&mut self, name: &str, tensor: ArrayD<f32>) -> Result<()> {
        let old = self.base.tensor_f32(name)?;
        if old.shape() != tensor.shape() {
            return Err(ForgeError::Shape(format!(
                "substitute for {name} has shape {:?}, the original {:?}",
                tensor.shape(),
                old.shape()
            )));
        }
        self.replaced.insert(name, tensor);
        Ok(())
    }
}

impl WeightSource for Substituted<'_> {
    fn tensor_f32(&self, name: &str) -> Result<ArrayD<f32>> {
        match self.replaced.get(name) {
            Some(t) => Ok(t.clone()),
            None => self.base.tensor_f32(name),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.replaced.contains(name) || self.base.contains(name)
    }
}
