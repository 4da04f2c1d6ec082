//! Sequential layer-wise quantization on the CPU: the reference the GPU engine is checked
//! against (issue 14, item 2), small models only.
//!
//! Embeddings → for each decoder layer: run every calibration sequence through it with the
//! layer's full-precision weights while a [`HessianSink`] accumulates one Hessian per input
//! group (q/k/v, o, gate/up, down, per expert only the tokens routed to it); quantize every
//! Linear of the group with that Hessian (GPTQ) or with `H = I` (round-to-nearest, same
//! grid); then re-run the layer with the dequantized weights to produce the next layer's
//! inputs (quantized propagation, as GPTQModel, llm-compressor and MoE-Quant do), or keep the
//! full-precision outputs. An expert no calibration token reached is quantized
//! round-to-nearest and reported with 0 tokens, never silently.

use super::config::ModelConfig;
use super::hooks::HessianSink;
use super::layer::DecoderLayer;
use super::model::CpuModel;
use super::names::InputGroup;
use super::weights::{matrix, MemoryWeights, Substituted, WeightSource};
use crate::calib::{quantize_with, PreparedFactor, QuantizeFlags, SharedHessian};
use crate::hessian::PreStepConfig;
use crate::{Backend, GridConfig, Quantizer, Result, WeightView};
use ndarray::Array2;

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
    let layer = DecoderLayer::load(config, l, weights)?;
    let mut sink = HessianSink::new();
    let mut full_precision = Vec::with_capacity(hidden.len());
    for h in &hidden {
        let positions: Vec<usize> = (0..h.nrows()).collect();
        full_precision.push(layer.forward(h.view(), &positions, Some(&mut sink))?);
    }
    let mut quantized_layer = Substituted::new(weights);
    let mut dequantized = Vec::new();
    let mut reports = Vec::new();
    for group in config.linear_groups(l)? {
        let acc = sink.get(group.group);
        let tokens = acc.map_or(0, |a| a.tokens());
        let factor = match (settings.method, acc) {
            (Method::Gptq, Some(a)) if a.tokens() > 0 => {
                SharedHessian::from_host(a.h().view(), a.tokens(), &quantizer.backend)?.pre_step(&settings.pre_step)?
            }
            _ => PreparedFactor::no_tokens(group.in_features)?,
        };
        for lin in &group.linears {
            let w: Array2<f32> = matrix(weights, &lin.weight, (lin.out_features, group.in_features))?;
            let q = quantize_with(quantizer, &factor, WeightView::F32(w.view()))?;
            let deq = q.dequant().into_dyn();
            quantized_layer.replace(&lin.weight, deq.clone())?;
            dequantized.push((lin.weight.clone(), deq));
        }
        reports.push(GroupReport { layer: l, group: group.group, tokens, flags: factor.flags() });
    }
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
    Ok(LayerPass { hessians: sink, dequantized, reports, next })
}

/// Runs the sequential pipeline over `calibration` (token sequences, no padding) on the CPU.
pub fn quantize_model_cpu(
    config: &ModelConfig,
    weights: &dyn WeightSource,
    calibration: &[Vec<u32>],
    settings: &SequentialConfig,
) -> Result<SequentialResult> {
    let quantizer = Quantizer::new(settings.grid.clone(), Backend::Cpu);
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
