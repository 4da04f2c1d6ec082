//! A Hugging Face model directory: `config.json`, the weights (`model.safetensors`, or
//! shards listed by `model.safetensors.index.json`), and the small files that travel with
//! them (tokenizer, generation config, chat template, custom modeling code).

use super::fp8::DEFAULT_BLOCK;
use super::st::{read_bounded, SafetensorsFile, TensorInfo};
use crate::{ForgeError, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Largest `config.json` / index accepted (real ones are kilobytes / a few megabytes).
pub(crate) const MAX_JSON_BYTES: u64 = 256 * 1024 * 1024;
/// The index file's name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single-file weights' name.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Where a tensor of the model is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    /// Index into [`ModelDir::shards`].
    pub shard: usize,
    /// Its entry in that shard.
    pub info: TensorInfo,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// An opened model directory: every shard mapped and every tensor located.
#[derive(Debug)]
pub struct ModelDir {
    /// The directory.
    pub path: PathBuf,
    /// `config.json`, key order kept.
    pub config: serde_json::Value,
    /// The weight files, in file-name order.
    pub shards: Vec<SafetensorsFile>,
    /// Every tensor, by name.
    pub tensors: BTreeMap<String, TensorRef>,
    /// Other top-level files copied to the output (tokenizer, generation config, ...).
    pub aux_files: Vec<String>,
    /// Whether the weights came with an index.
    pub indexed: bool,
}

impl ModelDir {
    /// What identifies the input, one line each: `config.json`, every shard's name, size,
    /// mtime and header hash, every auxiliary file's size. Resume fingerprints hash it (the
    /// checkpoint run's, the calibration's).
    pub fn identity_lines(&self) -> Vec<String> {
        let mut lines = vec![self.config.to_string()];
        for s in &self.shards {
            let (size, mtime, header) = s.identity();
            let name = s.path().file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            lines.push(format!("{name} {size} {mtime} {header:016x}"));
        }
        for f in &self.aux_files {
            let len = std::fs::metadata(self.path.join(f)).map(|m| m.len()).unwrap_or(0);
            lines.push(format!("aux {f} {len}"));
        }
        lines
    }

    /// Opens `dir`: reads `config.json`, the index if there is one, and maps every shard.
    /// A shard the index names that is missing, and a tensor the index places in a shard
    /// that lacks it, are typed errors.
    pub fn open(dir: &Path) -> Result<Self> {
        let shown = dir.display().to_string();
        let meta = std::fs::metadata(dir).map_err(|source| ForgeError::Io { path: shown.clone(), source })?;
        if !meta.is_dir() {
            return Err(ForgeError::Config(format!(
                "{shown} is not a directory: a model is a Hugging Face model directory"
            )));
        }
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(ForgeError::Config(format!("{shown} has no config.json: not a Hugging Face model directory")));
        }
        let config: serde_json::Value = serde_json::from_slice(&read_bounded(&config_path, MAX_JSON_BYTES)?)
            .map_err(|e| ForgeError::Config(format!("{}: not valid JSON: {e}", config_path.display())))?;
        if !config.is_object() {
            return Err(ForgeError::Config(format!("{}: expected a JSON object", config_path.display())));
        }

        let index_path = dir.join(INDEX_FILE);
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        let indexed = index_path.exists();
        if indexed {
            let index: IndexFile = serde_json::from_slice(&read_bounded(&index_path, MAX_JSON_BYTES)?)
                .map_err(|e| ForgeError::Config(format!("{}: not a safetensors index: {e}", index_path.display())))?;
            let mut files: Vec<&String> = index.weight_map.values().collect();
            files.sort();
            files.dedup();
            let mut shard_of: HashMap<&str, usize> = HashMap::new();
            for f in files {
                if f.is_empty() || f.contains('/') || f.contains('\\') || f == ".." || f == "." {
                    return Err(ForgeError::Config(format!(
                        "{}: shard name {f:?} is not a file name in the model directory",
                        index_path.display()
                    )));
                }
                let p = dir.join(f);
                if !p.exists() {
                    return Err(ForgeError::MissingShard { index: index_path.display().to_string(), shard: f.clone() });
                }
                shard_of.insert(f.as_str(), shards.len());
                shards.push(SafetensorsFile::open(&p)?);
            }
            for (name, f) in &index.weight_map {
                let k = shard_of[f.as_str()];
                let info = shards[k].tensor(name).cloned().ok_or_else(|| ForgeError::MissingTensor {
                    tensor: name.clone(),
                    file: shards[k].path().display().to_string(),
                })?;
                tensors.insert(name.clone(), TensorRef { shard: k, info });
            }
        } else {
            let single = dir.join(SINGLE_FILE);
            if !single.exists() {
                let bin = dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists();
                return Err(ForgeError::Config(if bin {
                    format!("{shown} holds PyTorch .bin weights only; convert them to safetensors first")
                } else {
                    format!("{shown} has neither {SINGLE_FILE} nor {INDEX_FILE}")
                }));
            }
            let f = SafetensorsFile::open(&single)?;
            for (name, info) in f.tensors() {
                tensors.insert(name.clone(), TensorRef { shard: 0, info: info.clone() });
            }
            shards.push(f);
        }
        if tensors.is_empty() {
            return Err(ForgeError::Config(format!("{shown}: the checkpoint holds no tensors")));
        }
        let aux_files = list_aux_files(dir)?;
        Ok(ModelDir { path: dir.to_path_buf(), config, shards, tensors, aux_files, indexed })
    }

    /// A tensor's entry.
    pub fn tensor(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.get(name)
    }

    /// The bytes of a tensor (mapped).
    pub fn bytes(&self, t: &TensorRef) -> Result<&[u8]> {
        self.shard(t)?.bytes(&t.info)
    }

    /// The shard a tensor is in.
    pub fn shard(&self, t: &TensorRef) -> Result<&SafetensorsFile> {
        self.shards.get(t.shard).ok_or_else(|| ForgeError::Config(format!("tensor {} has no shard", t.info.name)))
    }

    /// `architectures[0]` or `model_type` from the config.
    pub fn architecture(&self) -> String {
        self.config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| self.config.get("model_type").and_then(|m| m.as_str()))
            .unwrap_or("unknown")
            .to_string()
    }

    /// The FP8 block size: `quantization_config.weight_block_size` when the config has one,
    /// else 128×128.
    pub fn fp8_block(&self) -> Result<(usize, usize)> {
        let Some(bs) = self.config.get("quantization_config").and_then(|q| q.get("weight_block_size")) else {
            return Ok(DEFAULT_BLOCK);
        };
        match bs.as_array().map(|a| a.iter().map(|v| v.as_u64()).collect::<Vec<_>>()).as_deref() {
            Some([Some(m), Some(n)]) if *m > 0 && *n > 0 => Ok((*m as usize, *n as usize)),
            _ => Err(ForgeError::Config(format!("config.json: weight_block_size {bs} is not two positive integers"))),
        }
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.info.len as u64).sum()
    }
}

/// Top-level regular files that are neither weights nor `config.json`, sorted.
fn list_aux_files(dir: &Path) -> Result<Vec<String>> {
    let io = |source| ForgeError::Io { path: dir.display().to_string(), source };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        let weights = [".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json"];
        if name.starts_with('.') || name == "config.json" || weights.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        // Follows symlinks (Hugging Face caches link to blobs); skips directories and FIFOs.
        if std::fs::metadata(entry.path()).map(|m| m.is_file()).unwrap_or(false) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}
