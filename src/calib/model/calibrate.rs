//! Calibration from text for a checkpoint run (`forge quantize --method gptq --calib FILE`):
//! the sequential pipeline ([`sequential_layer`]) over a model directory, one decoder layer
//! at a time, writing every Linear's Hessian file in the layout `--hessians` reads, then the
//! checkpoint run quantizes with them (the same grid, so its codes are the ones the
//! propagation used).
//!
//! Resume: after a layer (every one, or the first one a [`CalibrationJob::checkpoint_every`]
//! after the last save) the next layer's inputs are written (`hidden-{l}.bin`, f32
//! little-endian, sequences × tokens × hidden, with its xxh3 in `calibration.json`), so a
//! killed run restarts at the first unsaved layer with exactly the hidden states it needs,
//! never with full-precision stand-ins. A state made from other text, samples, settings,
//! backend or model files is refused. Every file is written atomically (temporary file,
//! rename), `calibration.json` last.
//!
//! The forward pass runs where the job's backend is: on a GPU the device forward
//! ([`super::GpuLayer`], bf16 Linears), on the CPU the f32 reference ([`super::DecoderLayer`]);
//! the backend is part of the fingerprint, so a state is resumed only on its own kind.

use super::config::ModelConfig;
use super::cuda::{ForwardPrecision, HiddenPlacement, HiddenStates, HostStaging, LayerBuffers};
use super::model::CpuModel;
use super::names::LinearGroup;
use super::sequential::{sequential_layer, sequential_layer_device, GroupReport, SequentialConfig};
use super::weights::SafetensorsDir;
use crate::calib::data::CalibSamples;
use crate::checkpoint::quant::write_hessian_file;
use crate::checkpoint::select::module_of;
use crate::fsio::io_err;
use crate::{Backend, ForgeError, Quantizer, Result};
use ndarray::Array2;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The state file's name in the state directory.
pub const STATE_FILE: &str = "calibration.json";

/// One calibration run over a model directory.
pub struct CalibrationJob<'a> {
    /// The Hugging Face model directory.
    pub model_dir: &'a Path,
    /// The tokenized samples.
    pub samples: &'a CalibSamples,
    /// Grid (the checkpoint's, stored scale dtype included), pre-step, method, propagation.
    pub settings: SequentialConfig,
    /// Where the quantization inside the propagation runs.
    pub backend: Backend,
    /// The state directory (Hessian files in `hessians/`).
    pub state: PathBuf,
    /// Continue the state found in `state` (refused when it was made from other inputs).
    pub resume: bool,
    /// Where the hidden states wait between layers on a GPU (not part of the fingerprint: both
    /// places give the same bits, so a run that ran out of device memory resumes streamed).
    pub hidden_placement: HiddenPlacement,
    /// How often the next layer's inputs are saved for resume: after every layer (zero), or
    /// after the first layer that ends this long after the last save. Every layer's Hessian
    /// files are written either way; a resumed run redoes the layers after the last save
    /// (their files come out the same), so a crash costs at most this much work.
    pub checkpoint_every: std::time::Duration,
    /// Test hook: stop with an error after this many layers of this call.
    pub fail_after_layers: Option<usize>,
}

/// What a calibration run did.
#[derive(Clone, Debug)]
pub struct CalibrationReport {
    /// The Hessian directory to quantize with.
    pub hessians: PathBuf,
    /// Decoder layers in the model.
    pub layers: usize,
    /// The first layer this call ran (0 unless resumed).
    pub resumed_at: usize,
    /// Tokens per input group of the layers this call ran.
    pub reports: Vec<GroupReport>,
    /// Hex SHA-256 of the samples, settings, backend and model files.
    pub fingerprint: String,
}

/// Runs (or resumes) the calibration; `progress(done, total)` after each layer.
pub fn calibrate(job: &CalibrationJob<'_>, progress: &dyn Fn(usize, usize)) -> Result<CalibrationReport> {
    let config = ModelConfig::from_dir(job.model_dir)?;
    let weights = SafetensorsDir::open(job.model_dir)?;
    let fingerprint = fingerprint(job)?;
    let hessians = job.state.join("hessians");
    let state_path = job.state.join(STATE_FILE);
    let layers = config.num_layers;
    let done = read_state(&state_path)?;
    match &done {
        Some(s) if !job.resume => {
            return Err(ForgeError::Config(format!(
                "a calibration state ({} of {layers} layers done) exists in {}: rerun with --resume to continue it, or delete it",
                s.done,
                job.state.display()
            )))
        }
        Some(s) if s.fingerprint != fingerprint => {
            return Err(ForgeError::Config(format!(
                "refusing to resume the calibration in {}: the calibration text, samples, settings, backend or model \
                 files changed since it was made (delete it to start over)",
                job.state.display()
            )))
        }
        _ => {}
    }
    std::fs::create_dir_all(&hessians).map_err(io_err(&hessians))?;
    let (start, mut hidden) = match &done {
        Some(s) if s.done >= layers => (layers, Vec::new()),
        Some(s) if s.done > 0 => (s.done, read_hidden(&job.state, s, job.samples, config.hidden_size)?),
        _ => (0, CpuModel::new(&config, &weights).embed_sequences(&job.samples.sequences)?),
    };
    let quantizer = Quantizer::new(job.settings.grid.clone(), job.backend.clone());
    // On a GPU the hidden states stay on the device from layer to layer (or, when they do not
    // fit, in page-locked host memory, streamed); only the resume checkpoint comes down.
    let ffn_bytes_per_value = if config.moe.is_some() { ForwardPrecision::Bf16.size() } else { 0 };
    let mut on_device = match (&job.backend, start < layers) {
        (Backend::Gpu(dev), true) => {
            Some((dev.clone(), HiddenStates::place(dev, &hidden, job.hidden_placement, ffn_bytes_per_value)?))
        }
        _ => None,
    };
    if on_device.is_some() {
        hidden = Vec::new();
    }
    let mut staging = HostStaging::default();
    let mut buffers = LayerBuffers::default();
    let mut reports = Vec::new();
    let mut saved = start;
    let mut last_save = std::time::Instant::now();
    for l in start..layers {
        if job.fail_after_layers.is_some_and(|n| l - start >= n) {
            return Err(ForgeError::Config(format!("test hook: calibration stopped before layer {l}")));
        }
        let groups = config.linear_groups(l)?;
        let next = l + 1;
        let save = next == layers || last_save.elapsed() >= job.checkpoint_every;
        let name = format!("hidden-{next}.bin");
        let (layer_hessians, hash) = match &mut on_device {
            Some((dev, x)) => {
                let pass =
                    sequential_layer_device(dev, &config, l, &weights, x, &job.settings, &quantizer, &mut buffers)?;
                reports.extend(pass.reports);
                let hash = if save && next < layers {
                    Some(write_hidden_values(&job.state.join(&name), x.host_values(dev, &mut staging)?)?)
                } else {
                    None
                };
                (pass.hessians, hash)
            }
            None => {
                let pass =
                    sequential_layer(&config, l, &weights, std::mem::take(&mut hidden), &job.settings, &quantizer)?;
                hidden = pass.next;
                reports.extend(pass.reports);
                let hash =
                    if save && next < layers { Some(write_hidden(&job.state.join(&name), &hidden)?) } else { None };
                (pass.hessians, hash)
            }
        };
        for g in &groups {
            write_group_hessians(&hessians, g, &layer_hessians)?;
        }
        if save {
            let file = hash.as_ref().map(|_| name.clone());
            let state = State { fingerprint: fingerprint.clone(), done: next, hidden: file, hidden_xxh3: hash };
            write_state(&state_path, &state)?;
            // The inputs of the last save are no longer needed once the state names the next.
            let _ = std::fs::remove_file(job.state.join(format!("hidden-{saved}.bin")));
            saved = next;
            last_save = std::time::Instant::now();
        }
        progress(next, layers);
    }
    Ok(CalibrationReport { hessians, layers, resumed_at: start, reports, fingerprint })
}

/// Every Linear of `group` gets its Hessian file: written once for the first, hard-linked
/// (or copied) for the others. A group no token reached (an expert) gets a zero Hessian with
/// `tokens = 0`, which the checkpoint run quantizes round-to-nearest and flags.
fn write_group_hessians(dir: &Path, group: &LinearGroup, sink: &super::hooks::HessianSink) -> Result<()> {
    let Some(first) = group.linears.first() else { return Ok(()) };
    let first_path = dir.join(format!("{}.safetensors", module_of(&first.weight)));
    match sink.get(group.group) {
        Some(acc) if acc.tokens() > 0 => write_hessian_file(&first_path, acc.h().view(), acc.tokens())?,
        _ => {
            let n = group.in_features;
            crate::budget::Request::new().bytes(4, &[n, n]).check("an empty expert Hessian")?;
            write_hessian_file(&first_path, Array2::<f32>::zeros((n, n)).view(), 0)?
        }
    }
    for lin in group.linears.iter().skip(1) {
        let path = dir.join(format!("{}.safetensors", module_of(&lin.weight)));
        let _ = std::fs::remove_file(&path);
        if std::fs::hard_link(&first_path, &path).is_err() {
            std::fs::copy(&first_path, &path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// `calibration.json`.
#[derive(Clone, Debug, PartialEq)]
struct State {
    fingerprint: String,
    done: usize,
    hidden: Option<String>,
    hidden_xxh3: Option<String>,
}

fn read_state(path: &Path) -> Result<Option<State>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = crate::checkpoint::st::read_bounded(path, 1 << 20)?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| ForgeError::Config(format!("{}: {e}", path.display())))?;
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let fingerprint = text("fingerprint")
        .ok_or_else(|| ForgeError::Config(format!("{}: no fingerprint (not a calibration state)", path.display())))?;
    let done = v
        .get("layers_done")
        .and_then(|x| x.as_u64())
        .ok_or_else(|| ForgeError::Config(format!("{}: no layers_done", path.display())))? as usize;
    Ok(Some(State { fingerprint, done, hidden: text("hidden"), hidden_xxh3: text("hidden_xxh3") }))
}

fn write_state(path: &Path, s: &State) -> Result<()> {
    let v = serde_json::json!({
        "fingerprint": s.fingerprint,
        "layers_done": s.done,
        "hidden": s.hidden,
        "hidden_xxh3": s.hidden_xxh3,
    });
    let text = serde_json::to_vec_pretty(&v).map_err(|e| ForgeError::Internal(e.to_string()))?;
    crate::fsio::write_file_atomic(path, &text)
}

/// Writes the hidden states (f32 little-endian, in order); returns their xxh3.
fn write_hidden(path: &Path, hidden: &[Array2<f32>]) -> Result<String> {
    let n: usize = hidden.iter().map(|h| h.len()).sum();
    crate::budget::Request::new().bytes(4, &[n]).check("the hidden states written for resume")?;
    let mut values = Vec::with_capacity(n);
    for h in hidden {
        values.extend(h.iter().copied());
    }
    write_hidden_values(path, &values)
}

/// Writes `values` as f32 little-endian; returns their xxh3.
fn write_hidden_values(path: &Path, values: &[f32]) -> Result<String> {
    let le;
    let bytes: &[u8] = if cfg!(target_endian = "little") {
        bytemuck::cast_slice(values)
    } else {
        crate::budget::Request::new().bytes(4, &[values.len()]).check("the hidden states written for resume")?;
        le = values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        &le
    };
    let hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes));
    crate::fsio::write_file_atomic(path, bytes)?;
    Ok(hash)
}

/// The hidden states a state names, checked against its hash and the samples' shape.
fn read_hidden(dir: &Path, s: &State, samples: &CalibSamples, hidden_size: usize) -> Result<Vec<Array2<f32>>> {
    let name =
        s.hidden.as_deref().ok_or_else(|| ForgeError::Config("the calibration state names no hidden states".into()))?;
    let path = dir.join(name);
    let shapes: Vec<usize> = samples.sequences.iter().map(Vec::len).collect();
    let total: usize = shapes.iter().map(|t| t * hidden_size).sum();
    crate::budget::Request::new().bytes(4, &[total]).check("the hidden states read for resume")?;
    let bytes = crate::checkpoint::st::read_bounded(&path, (4 * total) as u64)?;
    let hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes));
    if bytes.len() != 4 * total || s.hidden_xxh3.as_deref() != Some(hash.as_str()) {
        return Err(ForgeError::Config(format!(
            "{} is damaged (size or checksum differs from {STATE_FILE}): delete the calibration state to start over",
            path.display()
        )));
    }
    let mut values = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    shapes
        .iter()
        .map(|&t| {
            let v: Vec<f32> = values.by_ref().take(t * hidden_size).collect();
            Array2::from_shape_vec((t, hidden_size), v).map_err(|e| ForgeError::Shape(e.to_string()))
        })
        .collect()
}

/// SHA-256 over the samples' fingerprint, the settings, the backend kind and the model's
/// identity ([`crate::checkpoint::ModelDir::identity_lines`]).
fn fingerprint(job: &CalibrationJob<'_>) -> Result<String> {
    let model = crate::checkpoint::ModelDir::open(job.model_dir)?;
    let mut h = Sha256::new();
    h.update(b"fourbit-forge calibration state v1\0");
    h.update(job.samples.fingerprint.as_bytes());
    h.update(format!("{:?}", job.settings).as_bytes());
    h.update(if matches!(job.backend, Backend::Cpu) { b"cpu".as_slice() } else { b"gpu".as_slice() });
    for line in model.identity_lines() {
        h.update((line.len() as u64).to_le_bytes());
        h.update(line.as_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
