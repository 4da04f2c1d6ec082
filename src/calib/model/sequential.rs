//! Sequential layer-wise quantization (issue 14, item 2): on the CPU the f32 reference (small
//! models), on a GPU the device forward ([`GpuLayer`]) with device Hessians.
//!
//! Embeddings → for each decoder layer: run every calibration sequence through it with the
//! layer's full-precision weights while a [`HessianSink`] accumulates one Hessian per input
//! group (q/k/v, o, gate/up, down, per expert only the tokens routed to it); quantize every
//! Linear of the group with that Hessian (GPTQ) or with `H = I` (round-to-nearest, same
//! grid); then re-run the layer with the dequantized weights to produce the next layer's
//! inputs (quantized propagation, as GPTQModel, llm-compressor and MoE-Quant do), or keep the
//! full-precision outputs. An expert no calibration token reached is quantized
//! round-to-nearest and reported with 0 tokens, never silently.

use super::config::{FfnKind, ModelConfig};
use super::cuda::{
    load_bytes, store_bytes, DeviceSequences, ForwardPrecision, ForwardWorkspace, GpuHessianSink, GpuLayer,
    HessianDownload, HiddenStates, LayerBuffers, StreamedBatches,
};
use super::hooks::HessianSink;
use super::layer::DecoderLayer;
use super::model::CpuModel;
use super::names::InputGroup;
use super::names::LinearGroup;
use super::weights::{MemoryWeights, Substituted, WeightSource};
use crate::calib::{quantize_with, PreparedFactor, QuantizeFlags, SharedHessian};
use crate::device::{DeviceBuf, GpuDevice};
use crate::hessian::PreStepConfig;
use crate::quantize::engine::PinnedBuf;
use crate::{Backend, GridConfig, Quantizer, Result, WeightView};
use ndarray::Array2;
use std::time::Instant;

/// How each group's weights are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GPTQ with the group's calibration Hessian.
    Gptq,
    /// Round-to-nearest on the same grid (`H = I`).
    Rtn,
}

/// Which outputs feed the next layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// The layer re-run with its quantized-dequantized weights (the default of every peer).
    Quantized,
    /// The full-precision layer's outputs.
    FullPrecision,
}

/// What an MoE expert that fewer than `min_tokens` calibration tokens were routed to is
/// quantized with. Never a silent identity Hessian: the choice is in each [`GroupReport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertCoverage {
    /// GPTQ with a Hessian from every calibration token's expert input (the hidden states run
    /// through the expert; only routed tokens contribute to the layer's output). The default,
    /// with `min_tokens = 1`: experts no token reached.
    AllTokens {
        /// Experts with fewer routed tokens than this.
        min_tokens: u64,
    },
    /// Round-to-nearest (`H = I`), flagged as "no calibration tokens".
    RoundToNearest {
        /// Experts with fewer routed tokens than this.
        min_tokens: u64,
    },
}

impl Default for ExpertCoverage {
    fn default() -> Self {
        ExpertCoverage::AllTokens { min_tokens: 1 }
    }
}

impl ExpertCoverage {
    /// The threshold.
    pub fn min_tokens(self) -> u64 {
        match self {
            ExpertCoverage::AllTokens { min_tokens } | ExpertCoverage::RoundToNearest { min_tokens } => min_tokens,
        }
    }
}

/// Settings of a sequential run.
#[derive(Clone, Debug, PartialEq)]
pub struct SequentialConfig {
    /// Grid (bits, group size, symmetric, scale search).
    pub grid: GridConfig,
    /// Damping and act-order.
    pub pre_step: PreStepConfig,
    /// GPTQ or round-to-nearest.
    pub method: Method,
    /// What feeds the next layer.
    pub propagation: Propagation,
    /// Experts few calibration tokens reach.
    pub expert_coverage: ExpertCoverage,
}

/// What happened to one input group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupReport {
    /// Decoder layer.
    pub layer: usize,
    /// Input group.
    pub group: InputGroup,
    /// Calibration tokens the group saw (for an expert: the tokens routed to it).
    pub tokens: u64,
    /// An expert under the coverage threshold whose Hessian came from all tokens
    /// ([`ExpertCoverage::AllTokens`]).
    pub all_tokens: bool,
    /// The pre-step's flags (shared by every Linear of the group).
    pub flags: QuantizeFlags,
}

/// The quantized model: dequantized Linear weights by name, and a report per input group.
#[derive(Clone, Debug)]
pub struct SequentialResult {
    /// Every quantized Linear's dequantized weight, under its checkpoint name.
    pub dequantized: MemoryWeights,
    /// One entry per input group, in layer and forward order.
    pub reports: Vec<GroupReport>,
}

/// The device workspace's budget for a chunk's widest f32 intermediate.
const FORWARD_CHUNK_BYTES: usize = 2 << 30;

/// One decoder layer of the sequential pipeline (see the module docs): what it produced.
#[derive(Clone, Debug)]
pub struct LayerPass {
    /// The Hessian of every input group that saw tokens (full-precision inputs of this layer).
    pub hessians: HessianSink,
    /// Every quantized Linear's dequantized weight, under its checkpoint name.
    pub dequantized: Vec<(String, ndarray::ArrayD<f32>)>,
    /// One entry per input group, in forward order.
    pub reports: Vec<GroupReport>,
    /// The next layer's inputs (one array per sequence), as `settings.propagation` says.
    pub next: Vec<Array2<f32>>,
    /// Where the time went.
    pub timings: LayerTimings,
}

/// Wall-clock seconds of a [`sequential_layer`]'s phases (the device is synchronized at each
/// phase boundary, so device work is counted in its phase).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerTimings {
    /// Reading the layer's weights and (GPU) uploading them and the hidden states.
    pub load: f64,
    /// The full-precision forward with the Hessian hooks (incl. the all-tokens expert pass).
    pub forward_hessians: f64,
    /// Pre-steps of every group (damping, act-order, Cholesky factor).
    pub pre_step: f64,
    /// Solves (GPTQ or round-to-nearest) of every Linear, results on the host.
    pub solve: f64,
    /// The next layer's inputs: the quantized layer's upload and forward (or nothing).
    pub propagate: f64,
    /// Downloading Hessians and hidden states (GPU).
    pub download: f64,
}

/// Layer `l` of the sequential pipeline: `hidden` (its inputs, one `(tokens, hidden)` array
/// per sequence) through the full-precision layer while the Hessians accumulate, every Linear
/// group quantized with `quantizer`, and the next layer's inputs.
pub fn sequential_layer(
    config: &ModelConfig,
    l: usize,
    weights: &dyn WeightSource,
    hidden: Vec<Array2<f32>>,
    settings: &SequentialConfig,
    quantizer: &Quantizer,
) -> Result<LayerPass> {
    if let Backend::Gpu(dev) = &quantizer.backend {
        // Hidden states up, the device pass, the next layer's inputs down.
        let clock = Instant::now();
        let mut x = HiddenStates::Device(DeviceSequences::upload(dev, &hidden)?);
        drop(hidden);
        let upload = clock.elapsed().as_secs_f64();
        let pass = sequential_layer_device(
            dev,
            config,
            l,
            weights,
            &mut x,
            settings,
            quantizer,
            &mut LayerBuffers::default(),
        )?;
        let clock = Instant::now();
        let next = x.download(dev)?;
        drop(x);
        let mut timings = pass.timings;
        timings.load += upload;
        timings.download += clock.elapsed().as_secs_f64();
        return Ok(LayerPass {
            hessians: pass.hessians,
            dequantized: pass.dequantized,
            reports: pass.reports,
            next,
            timings,
        });
    }
    let clock = Instant::now();
    let layer = DecoderLayer::load(config, l, weights)?;
    let load = clock.elapsed().as_secs_f64();
    // The feed-forward inputs are kept only where the all-tokens coverage may need them.
    let keep_ffn_input =
        config.layer(l)?.ffn == FfnKind::Moe && matches!(settings.expert_coverage, ExpertCoverage::AllTokens { .. });
    let clock = Instant::now();
    let mut sink = HessianSink::new();
    let mut full_precision = Vec::with_capacity(hidden.len());
    let mut ffn_inputs = Vec::new();
    for h in &hidden {
        let positions: Vec<usize> = (0..h.nrows()).collect();
        let (out, ffn_input) = layer.forward_with_ffn_input(h.view(), &positions, Some(&mut sink))?;
        full_precision.push(out);
        if keep_ffn_input {
            ffn_inputs.push(ffn_input);
        }
    }
    let groups = config.linear_groups(l)?;
    let routed: Vec<(InputGroup, u64)> = groups.iter().map(|g| (g.group, sink.tokens(g.group))).collect();
    let under = under_covered(&groups, &routed, settings);
    if !under.is_empty() {
        for &e in &under {
            sink.remove(InputGroup::ExpertGateUp(e));
            sink.remove(InputGroup::ExpertDown(e));
        }
        if let ExpertCoverage::AllTokens { .. } = settings.expert_coverage {
            let mut all = HessianSink::new();
            for x in &ffn_inputs {
                layer.record_experts(x.view(), &under, &mut all)?;
            }
            for (group, acc) in all.into_map() {
                sink.replace(group, acc);
            }
        }
    }
    let forward_hessians = clock.elapsed().as_secs_f64();
    let mut timings = LayerTimings { load, forward_hessians, ..LayerTimings::default() };
    let (quantized_layer, dequantized, reports) = quantize_groups(
        config,
        &layer,
        weights,
        Hessians::Host(&sink),
        (&routed, &under),
        settings,
        quantizer,
        &mut timings,
    )?;
    let clock = Instant::now();
    let next = match settings.propagation {
        Propagation::FullPrecision => full_precision,
        Propagation::Quantized => {
            let q = DecoderLayer::load(config, l, &quantized_layer)?;
            hidden
                .iter()
                .map(|h| {
                    let positions: Vec<usize> = (0..h.nrows()).collect();
                    q.forward(h.view(), &positions, None)
                })
                .collect::<Result<Vec<_>>>()?
        }
    };
    timings.propagate = clock.elapsed().as_secs_f64();
    Ok(LayerPass { hessians: sink, dequantized, reports, next, timings })
}

/// Experts under the coverage threshold (routed-token counts in `routed`).
fn under_covered(groups: &[LinearGroup], routed: &[(InputGroup, u64)], settings: &SequentialConfig) -> Vec<usize> {
    let min_tokens = settings.expert_coverage.min_tokens();
    let tokens = |g: InputGroup| routed.iter().find(|(x, _)| *x == g).map_or(0, |&(_, t)| t);
    groups
        .iter()
        .filter_map(|g| match g.group {
            InputGroup::ExpertGateUp(e) if tokens(g.group) < min_tokens => Some(e),
            _ => None,
        })
        .collect()
}

/// The dequantized weights of a layer's quantized Linears, as a weight source over the rest.
type Quantized<'a> = (Substituted<'a>, Vec<(String, ndarray::ArrayD<f32>)>, Vec<GroupReport>);

/// Where a layer's Hessians are: on the host (the CPU forward), or on the device with their
/// download in flight (the pre-step works on the device copy in place, after its download).
enum Hessians<'h, 's> {
    Host(&'h HessianSink),
    Device(&'h mut GpuHessianSink, &'h HessianDownload<'s>),
}

impl Hessians<'_, '_> {
    /// Tokens `group` saw, `None` when it has no Hessian.
    fn tokens(&self, group: InputGroup) -> Option<u64> {
        match self {
            Hessians::Host(sink) => sink.get(group).map(|a| a.tokens()),
            Hessians::Device(sink, _) => sink.has(group).then(|| sink.tokens(group)),
        }
    }

    /// `group`'s pre-step (its Hessian has tokens).
    fn pre_step(
        &mut self,
        group: InputGroup,
        settings: &SequentialConfig,
        backend: &Backend,
    ) -> Result<PreparedFactor> {
        let missing = || crate::ForgeError::Internal(format!("{group:?} has no Hessian"));
        match self {
            Hessians::Host(sink) => {
                let a = sink.get(group).ok_or_else(missing)?;
                SharedHessian::from_host(a.h().view(), a.tokens(), backend)?.pre_step(&settings.pre_step)
            }
            Hessians::Device(sink, download) => {
                download.guard(group)?;
                let h = sink.remove(group).ok_or_else(missing)?;
                SharedHessian::from_device(h, backend)?.pre_step(&settings.pre_step)
            }
        }
    }
}

/// Quantizes every Linear group of layer `l` with its Hessian (GPTQ) or `H = I`.
#[allow(clippy::too_many_arguments)]
fn quantize_groups<'a>(
    config: &ModelConfig,
    layer: &DecoderLayer,
    weights: &'a dyn WeightSource,
    mut hessians: Hessians<'_, '_>,
    (routed, under): (&[(InputGroup, u64)], &[usize]),
    settings: &SequentialConfig,
    quantizer: &Quantizer,
    timings: &mut LayerTimings,
) -> Result<Quantized<'a>> {
    let on_host = matches!(hessians, Hessians::Host(_));
    let mut quantized_layer = Substituted::new(weights);
    let mut dequantized = Vec::new();
    let mut reports = Vec::new();
    let l = layer.index;
    for group in config.linear_groups(l)? {
        let seen = hessians.tokens(group.group);
        let tokens = routed.iter().find(|(g, _)| *g == group.group).map_or(0, |&(_, t)| t);
        let all_tokens = matches!(group.group, InputGroup::ExpertGateUp(e) | InputGroup::ExpertDown(e) if under.contains(&e))
            && seen.is_some();
        let clock = Instant::now();
        let factor = match (settings.method, seen) {
            (Method::Gptq, Some(t)) if t > 0 => hessians.pre_step(group.group, settings, &quantizer.backend)?,
            _ => PreparedFactor::no_tokens(group.in_features)?,
        };
        timings.pre_step += clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        for lin in &group.linears {
            // The weights the forward loaded, not a second read of the checkpoint.
            let w = &layer.linear(group.group, lin.role)?.weight;
            let q = quantize_with(quantizer, &factor, WeightView::F32(w.view()))?;
            let deq = q.dequant().into_dyn();
            // The device path replaces weights in its own layer: no host copy needed.
            if on_host {
                quantized_layer.replace(&lin.weight, deq.clone())?;
            }
            dequantized.push((lin.weight.clone(), deq));
        }
        timings.solve += clock.elapsed().as_secs_f64();
        reports.push(GroupReport { layer: l, group: group.group, tokens, all_tokens, flags: factor.flags() });
    }
    Ok((quantized_layer, dequantized, reports))
}

/// What [`sequential_layer_device`] produced (the next layer's inputs replaced its inputs).
pub struct DeviceLayerPass {
    /// The Hessian of every input group that saw tokens (downloaded).
    pub hessians: HessianSink,
    /// Every quantized Linear's dequantized weight, under its checkpoint name.
    pub dequantized: Vec<(String, ndarray::ArrayD<f32>)>,
    /// One entry per input group, in forward order.
    pub reports: Vec<GroupReport>,
    /// Where the time went.
    pub timings: LayerTimings,
}

/// [`sequential_layer`] with the forward pass on the device ([`GpuLayer`], bf16 Linears):
/// `x` runs through the full-precision layer while the device Hessians accumulate; their
/// download to the host starts on a copy stream and runs beside the pre-steps and solves
/// (each pre-step waits only for its own group's copy, then works on the device Hessian in
/// place); every group is quantized, and (quantized propagation) the quantized weights
/// replace the full-precision ones in place for a second forward that produces the next
/// layer's inputs, which replace `x` when the layer succeeded (on an error `x` is unchanged).
///
/// Hidden states on the device run as one pass; host-resident ones ([`HiddenStates::Host`])
/// are streamed through the device in batches of whole forward chunks, which gives the same
/// Hessians and outputs bit for bit. `bufs` carries page-locked staging, the forward
/// workspace and the streamed buffers from layer to layer.
#[allow(clippy::too_many_arguments)]
pub fn sequential_layer_device(
    dev: &GpuDevice,
    config: &ModelConfig,
    l: usize,
    weights: &dyn WeightSource,
    x: &mut HiddenStates,
    settings: &SequentialConfig,
    quantizer: &Quantizer,
    bufs: &mut LayerBuffers,
) -> Result<DeviceLayerPass> {
    let precision = ForwardPrecision::Bf16;
    let mut timings = LayerTimings::default();
    let mut clock = Instant::now();
    let mut lap = |dev: &GpuDevice| -> Result<f64> {
        dev.synchronize()?;
        let t = clock.elapsed().as_secs_f64();
        clock = Instant::now();
        Ok(t)
    };
    let keep_ffn_input =
        config.layer(l)?.ffn == FfnKind::Moe && matches!(settings.expert_coverage, ExpertCoverage::AllTokens { .. });
    let layer = DecoderLayer::load(config, l, weights)?;
    let mut gpu = GpuLayer::upload_staged(dev, &layer, precision, &mut bufs.weights)?;
    let chunk = gpu.chunk_tokens_for(FORWARD_CHUNK_BYTES);
    if bufs.workspace.chunk_tokens != chunk {
        bufs.workspace = ForwardWorkspace::new(chunk);
    }
    let hidden = config.hidden_size;
    let ffn_bytes = if keep_ffn_input { hidden * precision.size() } else { 0 };
    // The next layer's inputs, and (streamed) the device buffers the batches move through.
    let (mut next, mut batches) = match &*x {
        HiddenStates::Device(d) => (HiddenStates::Device(d.zeros_like(dev)?), None),
        HiddenStates::Host(h, max_tokens) => {
            let spare = h.like(dev, bufs.host_spare.take())?;
            let b = StreamedBatches::new(dev, h, chunk, *max_tokens, 8 * hidden + ffn_bytes)?;
            (HiddenStates::Host(spare, *max_tokens), Some(b))
        }
    };
    let mut sink = GpuHessianSink::new();
    let mut ffn_inputs = DeviceBuf::default();
    let mut ffn_host = bufs.ffn_host.take().unwrap_or_else(|| PinnedBuf::new(false));
    timings.load = lap(dev)?;
    let fp_outputs = settings.propagation == Propagation::FullPrecision;
    let ffn =
        keep_ffn_input.then_some(KeptFfn { device: &mut ffn_inputs, host: &mut ffn_host, bytes_per_token: ffn_bytes });
    let io = PassIo { x, next: &mut next, batches: batches.as_mut() };
    forward_pass(dev, &gpu, io, Some(&mut sink), ffn, fp_outputs, &mut bufs.workspace)?;
    let groups = config.linear_groups(l)?;
    let routed: Vec<(InputGroup, u64)> = groups.iter().map(|g| (g.group, sink.tokens(g.group))).collect();
    let under = under_covered(&groups, &routed, settings);
    for &e in &under {
        sink.remove(InputGroup::ExpertGateUp(e));
        sink.remove(InputGroup::ExpertDown(e));
    }
    if !under.is_empty() && keep_ffn_input {
        match (&*x, &batches) {
            (HiddenStates::Host(xh, _), Some(b)) => {
                for r in &b.plan {
                    let lens = &xh.lens()[r.clone()];
                    let at = xh.tokens_before(r.start) * ffn_bytes;
                    let bytes = lens.iter().sum::<usize>() * ffn_bytes;
                    load_bytes(dev, &ffn_host, at, bytes, &mut ffn_inputs)?;
                    gpu.record_experts(dev, &ffn_inputs, lens, &under, &mut sink, &mut bufs.workspace)?;
                }
            }
            _ => gpu.record_experts(dev, &ffn_inputs, x.lens(), &under, &mut sink, &mut bufs.workspace)?,
        }
    }
    drop(ffn_inputs);
    bufs.ffn_host = Some(ffn_host);
    timings.forward_hessians = lap(dev)?;
    let download = sink.start_download(dev, &mut bufs.hessians)?;
    let (quantized_layer, dequantized, reports) = quantize_groups(
        config,
        &layer,
        weights,
        Hessians::Device(&mut sink, &download),
        (&routed, &under),
        settings,
        quantizer,
        &mut timings,
    )?;
    // The device Hessians no pre-step consumed are freed only after their copies.
    download.guard_all()?;
    drop((sink, quantized_layer, layer));
    lap(dev)?;
    // What of the download the pre-steps and solves did not hide, and the host copies.
    let hessians = download.finish()?;
    timings.download = lap(dev)?;
    if settings.propagation == Propagation::Quantized {
        // `dequantized` is in group and Linear order, as quantize_groups walked them.
        let linears = groups.iter().flat_map(|g| g.linears.iter().map(move |lin| (g.group, lin)));
        let mut replaced = Vec::with_capacity(dequantized.len());
        for ((group, lin), (name, deq)) in linears.zip(&dequantized) {
            if *name != lin.weight {
                return Err(crate::ForgeError::Internal(format!("{name} quantized in place of {}", lin.weight)));
            }
            let w = deq.view().into_dimensionality().map_err(|e| crate::ForgeError::Shape(e.to_string()))?;
            replaced.push((group, lin.role, w));
        }
        gpu.replace_weights(dev, &replaced, &mut bufs.weights)?;
        let io = PassIo { x, next: &mut next, batches: batches.as_mut() };
        forward_pass(dev, &gpu, io, None, None, true, &mut bufs.workspace)?;
        timings.propagate = lap(dev)?;
    }
    if let HiddenStates::Host(old, _) = std::mem::replace(x, next) {
        bufs.host_spare = Some(old.into_buffer());
    }
    Ok(DeviceLayerPass { hessians, dequantized, reports, timings })
}

/// A pass's inputs, the next layer's inputs it writes, and (streamed) the device buffers the
/// batches move through.
struct PassIo<'a> {
    x: &'a HiddenStates,
    next: &'a mut HiddenStates,
    batches: Option<&'a mut StreamedBatches>,
}

/// The feed-forward inputs an MoE layer keeps for the all-tokens expert pass: on the device,
/// and (streamed) collected batch by batch in page-locked host memory.
struct KeptFfn<'a> {
    device: &'a mut DeviceBuf<u8>,
    host: &'a mut PinnedBuf<u8>,
    bytes_per_token: usize,
}

/// One forward pass of `gpu` over `io.x`: at once on the device, or batch by batch from host
/// memory; the outputs go to `io.next` when `store_outputs` (a device pass always writes them).
fn forward_pass(
    dev: &GpuDevice,
    gpu: &GpuLayer,
    io: PassIo<'_>,
    mut sink: Option<&mut GpuHessianSink>,
    mut ffn: Option<KeptFfn<'_>>,
    store_outputs: bool,
    ws: &mut ForwardWorkspace,
) -> Result<()> {
    match (io.x, io.next, io.batches) {
        (HiddenStates::Device(xd), HiddenStates::Device(out), _) => {
            gpu.forward(dev, xd, out, sink, ffn.map(|f| f.device), ws)
        }
        (HiddenStates::Host(xh, _), HiddenStates::Host(out, _), Some(b)) => {
            let total_tokens: usize = xh.lens().iter().sum();
            for r in &b.plan {
                b.x.load(dev, xh, r.clone())?;
                let device_ffn = ffn.as_mut().map(|f| &mut *f.device);
                gpu.forward(dev, &b.x, &mut b.out, sink.as_deref_mut(), device_ffn, ws)?;
                if store_outputs {
                    b.out.store(dev, out, r.clone())?;
                }
                if let Some(f) = ffn.as_mut() {
                    let at = xh.tokens_before(r.start) * f.bytes_per_token;
                    let bytes = b.x.values() / xh.hidden() * f.bytes_per_token;
                    store_bytes(dev, f.device, f.host, at, bytes, total_tokens * f.bytes_per_token)?;
                }
            }
            Ok(())
        }
        _ => Err(crate::ForgeError::Internal("hidden states and their batches disagree".into())),
    }
}

/// Runs the sequential pipeline over `calibration` (token sequences, no padding) on the CPU.
pub fn quantize_model_cpu(
    config: &ModelConfig,
    weights: &dyn WeightSource,
    calibration: &[Vec<u32>],
    settings: &SequentialConfig,
) -> Result<SequentialResult> {
    quantize_model(config, weights, calibration, settings, Backend::Cpu)
}

/// [`quantize_model_cpu`] on `backend` (on a GPU: the device forward of every layer, the
/// hidden states in host memory between layers; the checkpoint path keeps them on the device).
pub fn quantize_model(
    config: &ModelConfig,
    weights: &dyn WeightSource,
    calibration: &[Vec<u32>],
    settings: &SequentialConfig,
    backend: Backend,
) -> Result<SequentialResult> {
    let quantizer = Quantizer::new(settings.grid.clone(), backend);
    let mut hidden = CpuModel::new(config, weights).embed_sequences(calibration)?;
    let mut dequantized = MemoryWeights::new();
    let mut reports = Vec::new();
    for l in 0..config.num_layers {
        let pass = sequential_layer(config, l, weights, hidden, settings, &quantizer)?;
        for (name, deq) in pass.dequantized {
            dequantized.insert(name, deq);
        }
        reports.extend(pass.reports);
        hidden = pass.next;
    }
    Ok(SequentialResult { dequantized, reports })
}
