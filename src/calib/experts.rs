//! Experts of an MoE layer in bulk: one pre-step per Hessian, one solve per weight, device
//! buffers (cuSOLVER handle and workspaces, solver workspaces, the identity factor of
//! token-less experts) reused across experts of the same shape.

use super::layer::{prepare, quantize_prepared, HSource, PreparedFactor, QuantizedLayer, StepperSlot};
use crate::hessian::PreStepConfig;
use crate::quantize::WorkspaceCache;
use crate::{Backend, ForgeError, GridConfig, Quantizer, Result, WeightView};
use ndarray::ArrayView2;

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

/// Quantizes experts in bulk: for each input, the pre-step of its Hessian (GPU through
/// cuSOLVER when available, else CPU; identity without tokens), then every weight with that
/// factor. Returns, per input, one [`QuantizedLayer`] per weight, in order. Results equal
/// quantizing each expert on its own with [`super::SharedHessian`] and
/// [`super::quantize_with`]. The first error stops the batch.
pub fn quantize_experts(
    backend: &Backend,
    config: &GridConfig,
    pre_step: &PreStepConfig,
    experts: &[ExpertInput<'_>],
) -> Result<Vec<Vec<QuantizedLayer>>> {
    // Checked up front: experts without tokens never reach the pre-step that checks it.
    pre_step.validate()?;
    let quantizer = Quantizer::new(config.clone(), backend.clone());
    let mut slot = StepperSlot::default();
    let mut cache = WorkspaceCache::default();
    let mut identity: Vec<PreparedFactor> = Vec::new();
    let mut out = Vec::with_capacity(experts.len());
    for (e, expert) in experts.iter().enumerate() {
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
        let owned;
        let factor = match expert.hessian {
            Some(h) => {
                if h.dim() != (cols, cols) {
                    let (a, b) = h.dim();
                    return Err(ForgeError::Shape(format!(
                        "expert input {e}: Hessian is {a}×{b}, weights have {cols} columns"
                    )));
                }
                owned = prepare(backend, HSource::Host(h), pre_step, &mut slot)?;
                &owned
            }
            None => {
                let k = match identity.iter().position(|f| f.cols() == cols) {
                    Some(k) => k,
                    None => {
                        identity.push(PreparedFactor::no_tokens(cols, backend)?);
                        identity.len() - 1
                    }
                };
                &identity[k]
            }
        };
        let layers = expert
            .weights
            .iter()
            .map(|&w| quantize_prepared(&quantizer, factor, w, &mut cache))
            .collect::<Result<Vec<_>>>()?;
        out.push(layers);
    }
    Ok(out)
}
