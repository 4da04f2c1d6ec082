//! Experts of an MoE layer in bulk: one pre-step per Hessian, one solve per weight. On a GPU
//! each expert is one job of the device's engine (its weights share one factorisation), two
//! experts in flight so one uploads while the other computes; on the CPU the references run
//! expert by expert.

use super::layer::flags_of;
use super::layer::{quantize_with, PreparedFactor, QuantizedLayer};
use crate::hessian::{asymmetry_warning, pre_step_cpu, PreStepConfig};
use crate::quantize::{with_engine, HessianInput, LayerJob, LayerOutcome, Ticket};
use crate::{Backend, ForgeError, GridConfig, Quantizer, Result, WeightView};
use ndarray::ArrayView2;

use super::PreStepRoute;

/// The weights of one expert that read the same inputs, with their Hessian.
#[derive(Clone, Debug)]
pub struct ExpertInput<'a> {
    /// Weights with the same input columns (e.g. the expert's gate and up projections, or
    /// its down projection alone): one pre-step for all, one solve each.
    pub weights: Vec<WeightView<'a>>,
    /// Their Hessian `(cols, cols)`, or `None` when the expert saw no calibration tokens
    /// (then `H = I`: round-to-nearest, flagged [`super::QuantizeFlags::no_tokens`]).
    pub hessian: Option<ArrayView2<'a, f32>>,
}

impl<'a> ExpertInput<'a> {
    /// One weight with its Hessian.
    pub fn single(weight: WeightView<'a>, hessian: Option<ArrayView2<'a, f32>>) -> Self {
        ExpertInput { weights: vec![weight], hessian }
    }
}

/// Checks an expert input: at least one weight, one column count, a Hessian of that size.
fn check(e: usize, expert: &ExpertInput<'_>) -> Result<usize> {
    let Some(first) = expert.weights.first() else {
        return Err(ForgeError::Shape(format!("expert input {e} has no weights")));
    };
    let cols = first.dim().1;
    if let Some(w) = expert.weights.iter().find(|w| w.dim().1 != cols) {
        return Err(ForgeError::Shape(format!(
            "expert input {e}: weights with {} and {cols} columns share a Hessian",
            w.dim().1
        )));
    }
    if let Some(h) = expert.hessian {
        if h.dim() != (cols, cols) {
            let (a, b) = h.dim();
            return Err(ForgeError::Shape(format!(
                "expert input {e}: Hessian is {a}×{b}, weights have {cols} columns"
            )));
        }
    }
    Ok(cols)
}

/// Quantizes experts in bulk: for each input, the pre-step of its Hessian (identity without
/// tokens), then every weight with that factor. Returns, per input, one [`QuantizedLayer`]
/// per weight, in order. Results equal quantizing each expert on its own with
/// [`super::SharedHessian`] and [`super::quantize_with`]. The first error stops the batch.
pub fn quantize_experts(
    backend: &Backend,
    config: &GridConfig,
    pre_step: &PreStepConfig,
    experts: &[ExpertInput<'_>],
) -> Result<Vec<Vec<QuantizedLayer>>> {
    for (e, expert) in experts.iter().enumerate() {
        check(e, expert)?;
    }
    pre_step.validate()?;
    match backend {
        Backend::Cpu => {
            let quantizer = Quantizer::new(config.clone(), backend.clone());
            experts
                .iter()
                .map(|expert| {
                    let cols = expert.weights.first().map_or(0, |w| w.dim().1);
                    let factor = match expert.hessian {
                        Some(h) => PreparedFactor::new(pre_step_cpu(h, None, pre_step)?, PreStepRoute::Cpu)?,
                        None => PreparedFactor::no_tokens(cols)?,
                    };
                    expert.weights.iter().map(|&w| quantize_with(&quantizer, &factor, w)).collect()
                })
                .collect()
        }
        Backend::Gpu(dev) => with_engine(dev, |engine| {
            let finish = |mut outcome: LayerOutcome, expert: &ExpertInput<'_>| -> Result<Vec<QuantizedLayer>> {
                // The device symmetrises H without looking: its asymmetry is checked on the
                // host copy (the CPU fallback reported it itself).
                if let (Some(h), PreStepRoute::Gpu) = (expert.hessian, outcome.pre_step.route) {
                    outcome.pre_step.warnings.splice(0..0, asymmetry_warning(h));
                }
                let summary = &outcome.pre_step;
                outcome
                    .weights
                    .into_iter()
                    .zip(&expert.weights)
                    .map(|(w, &weight)| QuantizedLayer::from_engine(w, weight, summary))
                    .collect()
            };
            // Two experts in flight: the next one uploads while this one computes.
            let mut out = Vec::with_capacity(experts.len());
            let mut in_flight: Option<(Ticket, &ExpertInput<'_>)> = None;
            let result = (|| {
                for expert in experts {
                    let t = engine.submit(&expert_job(expert, config, pre_step))?;
                    if let Some((prev, prev_expert)) = in_flight.replace((t, expert)) {
                        out.push(finish(engine.collect(prev)?, prev_expert)?);
                    }
                }
                if let Some((prev, prev_expert)) = in_flight.take() {
                    out.push(finish(engine.collect(prev)?, prev_expert)?);
                }
                Ok(())
            })();
            // A job left in flight by an error is drained, so the device's shared engine
            // stays usable for the next caller.
            if let Some((t, _)) = in_flight.take() {
                let _ = engine.collect(t);
            }
            result.map(|()| out)
        }),
    }
}

/// An engine job's results as layers (one per weight, in order), with its pre-step's flags and
/// warnings; the caller adds the per-weight flushed-group scan, which needs the weight (see
/// [`QuantizedLayer::from_engine`] and the checkpoint run's `finish_engine`).
pub(crate) fn layers_of(outcome: LayerOutcome) -> Vec<QuantizedLayer> {
    let flags = flags_of(&outcome.pre_step);
    let perm = outcome.pre_step.perm.clone();
    outcome
        .weights
        .into_iter()
        .map(|w| QuantizedLayer {
            grid: w.grid,
            codes: w.codes,
            loss: w.loss,
            perm: perm.clone(),
            flags: flags.clone(),
            warnings: outcome.pre_step.warnings.clone(),
        })
        .collect()
}

/// The engine job of one expert: its weights, its Hessian (or none: `U = I`).
fn expert_job<'b>(expert: &'b ExpertInput<'_>, config: &'b GridConfig, pre_step: &PreStepConfig) -> LayerJob<'b> {
    let weights: Vec<WeightView<'b>> = expert.weights.iter().map(|w| w.reborrow()).collect();
    let hessian = expert.hessian.as_ref().map_or(HessianInput::NoTokens, |h| HessianInput::Host(h.view()));
    LayerJob {
        weights,
        hessian,
        grid: config,
        pre_step: pre_step.clone(),
        want_dequant: false,
        profile: false,
        pack: None,
        want_row_error: false,
        block_scales: Vec::new(),
    }
}
