//! Helpers shared by the checkpoint tests: an independent reader of the output (the
//! `safetensors` crate, not the engine's reader) and an unpacker of compressed-tensors
//! pack-quantized weights written from the format's definition.
#![allow(dead_code)]

use fourbit_forge::checkpoint::plan::JobSettings;
use fourbit_forge::checkpoint::{build_plan, quantize_checkpoint, ModelDir, RunOptions, RunReport, Silent};
use fourbit_forge::{Backend, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// One tensor as read back: dtype name, shape, bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Read {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Every tensor of a model directory (single file or index), by name, read with the
/// `safetensors` crate. Also checks that the index names exactly the tensors in the files.
pub fn read_all(dir: &Path) -> BTreeMap<String, Read> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<String> = if index.exists() {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        let mut f: Vec<String> =
            v["weight_map"].as_object().unwrap().values().map(|s| s.as_str().unwrap().to_string()).collect();
        f.sort();
        f.dedup();
        f
    } else {
        vec!["model.safetensors".to_string()]
    };
    let mut out = BTreeMap::new();
    let mut located = BTreeMap::new();
    for f in &files {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{f}: {e}"));
        for (name, t) in st.tensors() {
            located.insert(name.clone(), f.clone());
            let prev = out.insert(
                name.clone(),
                Read { dtype: t.dtype().to_string(), shape: t.shape().to_vec(), data: t.data().to_vec() },
            );
            assert!(prev.is_none(), "{name} is in two files");
        }
    }
    if index.exists() {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        let map: BTreeMap<String, String> = v["weight_map"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        assert_eq!(map, located, "the index must name exactly the tensors of the files");
        let total: u64 = out.values().map(|r| r.data.len() as u64).sum();
        assert_eq!(v["metadata"]["total_size"].as_u64(), Some(total));
    }
    out
}

/// Unpacks `weight_packed` (I32 `[rows, cols·b/32]`, element j of a row at bits
/// `[j·b, j·b+b)` of the row's little-endian bit stream) into codes.
pub fn unpack_codes(packed: &Read, rows: usize, cols: usize, bits: u32) -> Vec<u8> {
    assert_eq!(packed.dtype, "I32");
    let wpr = cols * bits as usize / 32;
    assert_eq!(packed.shape, vec![rows, wpr]);
    let words: Vec<u32> = packed.data.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let mut codes = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for j in 0..cols {
            let bit = j * bits as usize;
            let (w, off) = (r * wpr + bit / 32, bit % 32);
            let mut v = (words[w] as u64) >> off;
            if off + bits as usize > 32 {
                v |= (words[w + 1] as u64) << (32 - off);
            }
            codes.push((v & ((1u64 << bits) - 1)) as u8);
        }
    }
    codes
}

pub fn f32s(r: &Read) -> Vec<f32> {
    assert_eq!(r.dtype, "F32");
    r.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The dequantized weight of a compressed-tensors symmetric module: `(code − 2^(b−1))·scale`.
pub fn dequant_ct(
    out: &BTreeMap<String, Read>,
    module: &str,
    bits: u32,
    group: usize,
) -> (Vec<u8>, Vec<f32>, (usize, usize)) {
    let shape = &out[&format!("{module}.weight_shape")];
    let dims: Vec<i64> = shape.data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let (rows, cols) = (dims[0] as usize, dims[1] as usize);
    let codes = unpack_codes(&out[&format!("{module}.weight_packed")], rows, cols, bits);
    let scale_t = &out[&format!("{module}.weight_scale")];
    let n_groups = cols.div_ceil(group);
    assert_eq!(scale_t.shape, vec![rows, n_groups]);
    let scales: Vec<f32> = match scale_t.dtype.as_str() {
        "F32" => f32s(scale_t),
        "BF16" => scale_t.data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        "F16" => scale_t.data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => panic!("scale dtype {other}"),
    };
    let zero = (1u32 << (bits - 1)) as f32;
    let deq = (0..rows * cols)
        .map(|k| (codes[k] as f32 - zero) * scales[(k / cols) * n_groups + (k % cols) / group])
        .collect();
    (codes, deq, (rows, cols))
}

/// Plans and runs `settings` on `model` into `out` on the CPU.
pub fn run(model: &Path, out: &Path, settings: &JobSettings) -> Result<RunReport> {
    let m = ModelDir::open(model)?;
    let plan = build_plan(&m, settings)?;
    quantize_checkpoint(&m, &plan, &RunOptions::new(out.to_path_buf(), Backend::Cpu), &Silent)
}

/// Every regular file of a directory with its bytes (sorted by name).
pub fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).unwrap()))
        .collect()
}
