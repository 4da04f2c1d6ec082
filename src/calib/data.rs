//! Tokenized calibration data: `--calib FILE` (plain text or JSONL with a `"text"` field),
//! `N` samples of `L` tokens, tokenized with the model's `tokenizer.json`.
//!
//! No padding, ever: every document is tokenized without special tokens, the token streams
//! are concatenated (with the EOS id between documents when the model has one), and the
//! samples are `N` contiguous, non-overlapping windows of that stream, spread evenly over it
//! (window `i` starts at `i·⌊S/N⌋` of the `S` usable tokens). With a BOS id each window is
//! `[BOS] + L−1` stream tokens, the way the model sees the start of any text. Too little text
//! is a typed error that says how many tokens there were; nothing is ever padded or repeated.
//! Deterministic (no random sampling), so the fingerprint pins the samples down.

use crate::checkpoint::model::MAX_JSON_BYTES;
use crate::checkpoint::st::read_bounded;
use crate::{ForgeError, Result};
use sha2::{Digest, Sha256};
use std::path::Path;
use tokenizers::Tokenizer;

/// How to read a calibration file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalibFormat {
    /// The whole file is one document.
    Text,
    /// One JSON object per non-empty line, its `"text"` string a document.
    Jsonl,
}

impl CalibFormat {
    /// `.jsonl` / `.json` files are JSONL, anything else plain text.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("jsonl") | Some("json") => CalibFormat::Jsonl,
            _ => CalibFormat::Text,
        }
    }
}

/// Documents of a calibration file's text.
pub fn parse_documents(text: &str, format: CalibFormat) -> Result<Vec<String>> {
    match format {
        CalibFormat::Text => Ok(if text.trim().is_empty() { Vec::new() } else { vec![text.to_owned()] }),
        CalibFormat::Jsonl => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| ForgeError::Config(format!("calibration JSONL line {}: {e}", i + 1)))?;
                v.get("text").and_then(|t| t.as_str()).map(str::to_owned).ok_or_else(|| {
                    ForgeError::Config(format!("calibration JSONL line {} has no \"text\" string", i + 1))
                })
            })
            .collect(),
    }
}

/// Reads the documents of a calibration file (format from its extension).
/// The file must be a regular file; it is read whole, so it is checked against the host
/// budget first (the text and the documents split from it).
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let (_, len) = crate::fsio::open_regular(path)?;
    crate::budget::Request::new()
        .bytes(1, &[usize::try_from(len).unwrap_or(usize::MAX)])
        .times(2)
        .check(&format!("the calibration text {}", path.display()))?;
    let bytes = read_bounded(path, len)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| ForgeError::Config(format!("calibration file {} is not UTF-8: {e}", path.display())))?;
    parse_documents(&text, CalibFormat::from_path(path))
}

/// Loads `tokenizer.json` from a model directory.
pub fn load_tokenizer(model_dir: &Path) -> Result<Tokenizer> {
    let path = model_dir.join("tokenizer.json");
    // Read here (a regular file, bounded) rather than by the tokenizers crate, which would
    // block on a FIFO.
    let bytes = read_bounded(&path, MAX_JSON_BYTES)?;
    Tokenizer::from_bytes(bytes).map_err(|e| ForgeError::Config(format!("{}: {e}", path.display())))
}

/// How many samples of what length, and the special tokens that frame them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalibSettings {
    /// Samples (`--calib-samples`).
    pub samples: usize,
    /// Tokens per sample (`--seq-len`), BOS included.
    pub seq_len: usize,
    /// Token placed first in every sample (the model's `bos_token_id`), if any.
    pub bos: Option<u32>,
    /// Token placed between documents in the stream (the model's `eos_token_id`), if any.
    pub separator: Option<u32>,
}

/// The calibration samples and their fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalibSamples {
    /// `samples` sequences of exactly `seq_len` token ids.
    pub sequences: Vec<Vec<u32>>,
    /// Hex SHA-256 of the settings and every token id (for the output manifest).
    pub fingerprint: String,
    /// Tokens in the concatenated stream the windows were taken from.
    pub stream_tokens: usize,
    /// Documents read.
    pub documents: usize,
}

/// Concatenated token ids of `documents` (no special tokens; `separator` between documents).
pub fn tokenize_stream(tokenizer: &Tokenizer, documents: &[String], separator: Option<u32>) -> Result<Vec<u32>> {
    let mut stream = Vec::new();
    for (i, doc) in documents.iter().enumerate() {
        let enc = tokenizer
            .encode(doc.as_str(), false)
            .map_err(|e| ForgeError::Config(format!("tokenizing calibration document {}: {e}", i + 1)))?;
        if i > 0 {
            stream.extend(separator);
        }
        stream.extend_from_slice(enc.get_ids());
    }
    Ok(stream)
}

/// `settings.samples` windows of the stream (see the module docs for the rule).
pub fn take_windows(stream: &[u32], settings: &CalibSettings) -> Result<Vec<Vec<u32>>> {
    let n = settings.samples;
    let body = settings.seq_len.saturating_sub(usize::from(settings.bos.is_some()));
    if n == 0 || body == 0 {
        return Err(ForgeError::Config(format!(
            "need at least one sample with at least one text token (samples {n}, seq_len {}{})",
            settings.seq_len,
            if settings.bos.is_some() { ", BOS included" } else { "" }
        )));
    }
    let needed =
        n.checked_mul(body).ok_or_else(|| ForgeError::Config(format!("{n} samples of {body} tokens overflow")))?;
    if stream.len() < needed {
        return Err(ForgeError::Config(format!(
            "the calibration text has {} tokens, {n} samples of {} need {needed}: add text or lower --calib-samples/--seq-len",
            stream.len(),
            settings.seq_len
        )));
    }
    let stride = stream.len() / n;
    (0..n)
        .map(|i| {
            let start = i * stride;
            let window = stream
                .get(start..start + body)
                .ok_or_else(|| ForgeError::Internal(format!("window {i} past the stream end")))?;
            let mut s = Vec::with_capacity(settings.seq_len);
            s.extend(settings.bos);
            s.extend_from_slice(window);
            Ok(s)
        })
        .collect()
}

/// Hex SHA-256 over a version tag, the settings and every token id (little-endian u32).
pub fn fingerprint(sequences: &[Vec<u32>], settings: &CalibSettings) -> String {
    let mut h = Sha256::new();
    h.update(b"fourbit-forge calibration samples v1\0");
    for v in [settings.samples as u64, settings.seq_len as u64] {
        h.update(v.to_le_bytes());
    }
    for t in [settings.bos, settings.separator] {
        match t {
            Some(id) => {
                h.update([1u8]);
                h.update(id.to_le_bytes());
            }
            None => h.update([0u8]),
        }
    }
    for s in sequences {
        h.update((s.len() as u64).to_le_bytes());
        for &t in s {
            h.update(t.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Documents → stream → windows → fingerprint.
pub fn calibration_samples(
    tokenizer: &Tokenizer,
    documents: &[String],
    settings: &CalibSettings,
) -> Result<CalibSamples> {
    let stream = tokenize_stream(tokenizer, documents, settings.separator)?;
    let sequences = take_windows(&stream, settings)?;
    let fingerprint = fingerprint(&sequences, settings);
    Ok(CalibSamples { sequences, fingerprint, stream_tokens: stream.len(), documents: documents.len() })
}
