//! safetensors files, read memory-mapped and written with a precomputed header.
//!
//! Reading: the file must be a regular file ([`crate::fsio::open_regular`]: a FIFO or device
//! is refused before it is opened for reading, so the open cannot block), the header is read with bounded reads
//! (at most [`MAX_HEADER_BYTES`]), every tensor's dtype, shape and byte range is checked
//! against the file, and the data section is memory-mapped. Writing: [`encode_header`]
//! gives the exact header bytes for a list of tensors, so a writer can place every tensor
//! at its final offset before the data exists.

use crate::fsio::open_regular;
use crate::{ForgeError, Result};
use memmap2::{Advice, Mmap, UncheckedAdvice};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The largest header accepted (the safetensors library's own limit).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// One tensor of a file: name, dtype, shape and where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Offset of its first byte from the start of the data section.
    pub offset: usize,
    /// Its size in bytes.
    pub len: usize,
}

impl TensorInfo {
    /// `(rows, cols)` of a 2-D tensor.
    pub fn dims2(&self) -> Option<(usize, usize)> {
        match self.shape.as_slice() {
            [r, c] => Some((*r, *c)),
            _ => None,
        }
    }
}

/// Bytes of `shape` elements of `dtype`, or `None` on overflow or a bit size that does not
/// fill whole bytes.
pub fn nbytes(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let bits = numel.checked_mul(dtype.bitsize())?;
    if !bits.is_multiple_of(8) {
        return None;
    }
    Some(bits / 8)
}

/// The safetensors name of a dtype (`BF16`, `F8_E4M3`, ...).
pub fn dtype_name(dtype: Dtype) -> String {
    dtype.to_string()
}

/// A whole small file (JSON, tokenizer), refused past `max` bytes.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let io = |source| ForgeError::Io { path: path.display().to_string(), source };
    let (file, len) = open_regular(path)?;
    if len > max {
        return Err(ForgeError::Config(format!(
            "{} is {len} bytes, more than the {max} bytes allowed",
            path.display()
        )));
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(max + 1).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 > max {
        return Err(ForgeError::Config(format!("{} grew past {max} bytes while being read", path.display())));
    }
    Ok(buf)
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// A memory-mapped safetensors file with its checked tensor table.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Option<Mmap>,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
    header_hash: u64,
    file_len: u64,
    mtime_ns: i128,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

impl SafetensorsFile {
    /// Opens and checks `path` (see the module docs); the data is mapped, not read.
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let io = |source| ForgeError::Io { path: shown.clone(), source };
        let bad = |msg: String| ForgeError::Safetensors(format!("{shown}: {msg}"));
        let (mut file, _) = open_regular(path)?;
        let meta = file.metadata().map_err(io)?;
        let file_len = meta.len();
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        if file_len < 8 {
            return Err(bad(format!("{file_len} bytes is too short for a safetensors header")));
        }
        let mut len8 = [0u8; 8];
        file.read_exact(&mut len8).map_err(io)?;
        let header_len = u64::from_le_bytes(len8);
        if header_len > MAX_HEADER_BYTES {
            return Err(bad(format!("header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")));
        }
        if 8 + header_len > file_len {
            return Err(bad(format!("header of {header_len} bytes runs past the end of the {file_len}-byte file")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let header_hash = xxhash_rust::xxh3::xxh3_64(&header);
        let raw: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let data_start = 8 + header_len as usize;
        let data_len = usize::try_from(file_len - 8 - header_len).map_err(|_| bad("file too large".into()))?;
        let mut metadata = BTreeMap::new();
        let mut tensors = BTreeMap::new();
        for (name, value) in raw {
            if name == "__metadata__" {
                metadata = serde_json::from_value(value)
                    .map_err(|e| bad(format!("__metadata__ must map strings to strings: {e}")))?;
                continue;
            }
            let e: RawEntry =
                serde_json::from_value(value).map_err(|e| bad(format!("tensor {name}: bad header entry: {e}")))?;
            let dtype = parse_dtype(&e.dtype)
                .ok_or_else(|| ForgeError::Dtype(format!("{} (tensor {name} in {shown})", e.dtype)))?;
            let [b, end] = e.data_offsets;
            let expected = nbytes(dtype, &e.shape)
                .ok_or_else(|| bad(format!("tensor {name}: shape {:?} of {} overflows", e.shape, e.dtype)))?;
            if end < b || end - b != expected {
                return Err(bad(format!(
                    "tensor {name}: data_offsets [{b}, {end}] hold {} bytes, but {:?} {} needs {expected}",
                    end.saturating_sub(b),
                    e.shape,
                    e.dtype
                )));
            }
            if end > data_len {
                return Err(bad(format!(
                    "tensor {name}: data_offsets end {end} is past the data section's {data_len} bytes (truncated file?)"
                )));
            }
            tensors.insert(name.clone(), TensorInfo { name, dtype, shape: e.shape, offset: b, len: expected });
        }
        // The format allows neither holes nor overlaps, and the data ends with the file.
        let mut ranges: Vec<(usize, usize, &str)> =
            tensors.values().map(|t| (t.offset, t.offset + t.len, t.name.as_str())).collect();
        ranges.sort_unstable();
        let mut pos = 0usize;
        for (b, e, name) in &ranges {
            if *b != pos {
                return Err(bad(format!(
                    "tensor {name} starts at {b}, expected {pos}: tensors overlap or leave a hole"
                )));
            }
            pos = *e;
        }
        if pos != data_len {
            return Err(bad(format!("tensors cover {pos} bytes of a {data_len}-byte data section")));
        }
        // SAFETY: the mapping is read-only and private to this process's view; a file
        // modified by another process while mapped is outside what the engine supports
        // (as for every safetensors reader that maps its input).
        let mmap = if file_len > 0 { Some(unsafe { Mmap::map(&file) }.map_err(io)?) } else { None };
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
            metadata,
            header_hash,
            file_len,
            mtime_ns,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// One tensor's entry.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The header's `__metadata__`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// `(size, mtime in ns, xxh3 of the header)`: what identifies this input for resuming.
    pub fn identity(&self) -> (u64, i128, u64) {
        (self.file_len, self.mtime_ns, self.header_hash)
    }

    /// The bytes of a tensor of this file (mapped: pages are read on first touch).
    pub fn bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let start = self.data_start + t.offset;
        self.mmap.as_deref().and_then(|m| m.get(start..start + t.len)).ok_or_else(|| {
            ForgeError::Safetensors(format!("{}: tensor {} is outside the mapped file", self.path.display(), t.name))
        })
    }

    /// Asks the kernel to read a tensor ahead.
    pub fn prefetch(&self, t: &TensorInfo) {
        if let Some(m) = &self.mmap {
            // Advisory only: a failure changes nothing but speed.
            let _ = m.advise_range(Advice::WillNeed, self.data_start + t.offset, t.len);
        }
    }

    /// Drops the mapped pages of bytes `[offset, offset + len)` of a tensor from this
    /// process (they stay in the page cache), so memory stays bounded by what is in use.
    pub fn release(&self, t: &TensorInfo, offset: usize, len: usize) {
        if let Some(m) = &self.mmap {
            let start = self.data_start + t.offset + offset.min(t.len);
            let len = len.min(t.len - offset.min(t.len));
            if len == 0 {
                return;
            }
            // SAFETY: the map is a read-only shared file mapping; MADV_DONTNEED only drops
            // this process's page-table entries and a later access reads the same file
            // bytes again, so no slice handed out changes.
            let _ = unsafe { m.unchecked_advise_range(UncheckedAdvice::DontNeed, start, len) };
        }
    }
}

/// Parses a safetensors dtype name; `None` for a name the format does not define.
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
}

#[derive(Serialize)]
struct HeaderEntry<'a> {
    dtype: String,
    shape: &'a [usize],
    data_offsets: [usize; 2],
}

/// One tensor of a file to be written: name, dtype, shape (its size follows).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Name in the file.
    pub name: String,
    /// Element type (safetensors name, e.g. `I32`).
    #[serde(with = "dtype_serde")]
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A spec.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        TensorSpec { name: name.into(), dtype, shape }
    }

    /// Its size in bytes.
    pub fn nbytes(&self) -> Result<usize> {
        nbytes(self.dtype, &self.shape)
            .ok_or_else(|| ForgeError::Shape(format!("tensor {}: shape {:?} overflows", self.name, self.shape)))
    }
}

mod dtype_serde {
    use safetensors::Dtype;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Dtype, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::dtype_name(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Dtype, D::Error> {
        let name = String::deserialize(d)?;
        super::parse_dtype(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown dtype {name}")))
    }
}

/// The layout of a file to be written: the header bytes (length prefix included, padded
/// with spaces to a multiple of 8 as the safetensors library does) and each tensor's data
/// offset, in the order given. Data is ordered by element size (largest first, then the
/// given order) so every tensor is aligned to its element size.
pub fn encode_header(
    tensors: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<usize>, usize)> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tensors[i].dtype.bitsize()));
    let mut offsets = vec![0usize; tensors.len()];
    let mut pos = 0usize;
    for &i in &order {
        offsets[i] = pos;
        pos = pos
            .checked_add(tensors[i].nbytes()?)
            .ok_or_else(|| ForgeError::Shape("output file size overflows".into()))?;
    }
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), serde_json::to_value(metadata).map_err(json_err)?);
    }
    // Entries in data order, as the safetensors library writes them.
    for &i in &order {
        let t = &tensors[i];
        if t.name == "__metadata__" || map.contains_key(&t.name) {
            return Err(ForgeError::Config(format!("tensor name {} is used twice in one output file", t.name)));
        }
        let entry = HeaderEntry {
            dtype: dtype_name(t.dtype),
            shape: &t.shape,
            data_offsets: [offsets[i], offsets[i] + t.nbytes()?],
        };
        map.insert(t.name.clone(), serde_json::to_value(entry).map_err(json_err)?);
    }
    let mut json = serde_json::to_vec(&map).map_err(json_err)?;
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(&json);
    Ok((header, offsets, pos))
}

fn json_err(e: serde_json::Error) -> ForgeError {
    ForgeError::Config(format!("JSON encoding failed: {e}"))
}
