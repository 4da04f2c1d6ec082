//! The whole model on the CPU: embedding lookup, decoder layers one at a time, final norm and
//! lm_head, and the KL divergence of next-token distributions between two weight sets.

use super::config::ModelConfig;
use super::layer::{rms_norm, DecoderLayer};
use super::weights::{matrix, vector, WeightSource};
use crate::{ForgeError, Result};
use ndarray::{Array2, ArrayView2, Axis};

/// A model's config and a weight source, run on the CPU.
pub struct CpuModel<'a> {
    /// Architecture.
    pub config: &'a ModelConfig,
    /// Weights.
    pub weights: &'a dyn WeightSource,
}

impl<'a> CpuModel<'a> {
    /// Pairs a config with weights.
    pub fn new(config: &'a ModelConfig, weights: &'a dyn WeightSource) -> Self {
        CpuModel { config, weights }
    }

    /// Embedding rows of `tokens`, `(seq, hidden)`; an id outside the vocabulary is a typed error.
    pub fn embed(&self, tokens: &[u32]) -> Result<Array2<f32>> {
        let mut v = self.embed_sequences(std::slice::from_ref(&tokens.to_vec()))?;
        v.pop().ok_or_else(|| ForgeError::Internal("one sequence in, none out".into()))
    }

    /// Embedding rows of every sequence (the table is read once).
    pub fn embed_sequences(&self, sequences: &[Vec<u32>]) -> Result<Vec<Array2<f32>>> {
        let c = self.config;
        let table = matrix(self.weights, c.embed_name(), (c.vocab_size, c.hidden_size))?;
        sequences
            .iter()
            .map(|tokens| {
                let rows = tokens
                    .iter()
                    .map(|&t| {
                        let t = t as usize;
                        if t < c.vocab_size {
                            Ok(t)
                        } else {
                            Err(ForgeError::Config(format!(
                                "token id {t} is outside the vocabulary of {}",
                                c.vocab_size
                            )))
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(table.select(Axis(0), &rows))
            })
            .collect()
    }

    /// Final RMSNorm and lm_head: `(seq, hidden)` → logits `(seq, vocab)`.
    pub fn logits(&self, hidden: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        let mut v = self.logits_sequences(&[hidden.to_owned()])?;
        v.pop().ok_or_else(|| ForgeError::Internal("one sequence in, none out".into()))
    }

    /// Logits of every sequence's last hidden states (norm and lm_head read once).
    pub fn logits_sequences(&self, hidden: &[Array2<f32>]) -> Result<Vec<Array2<f32>>> {
        let c = self.config;
        let norm = vector(self.weights, c.final_norm_name(), c.hidden_size)?;
        let head = matrix(self.weights, c.lm_head_name(), (c.vocab_size, c.hidden_size))?;
        hidden
            .iter()
            .map(|h| {
                if h.ncols() != c.hidden_size {
                    return Err(ForgeError::Shape(format!(
                        "hidden states have {} features, expected {}",
                        h.ncols(),
                        c.hidden_size
                    )));
                }
                Ok(rms_norm(h.view(), &norm, c.rms_norm_eps).dot(&head.t()))
            })
            .collect()
    }

    /// Logits of every sequence (each at positions `0..len`), layers loaded one at a time.
    pub fn forward_logits(&self, sequences: &[Vec<u32>]) -> Result<Vec<Array2<f32>>> {
        let mut hidden = self.embed_sequences(sequences)?;
        for layer in 0..self.config.num_layers {
            let l = DecoderLayer::load(self.config, layer, self.weights)?;
            for h in hidden.iter_mut() {
                let positions: Vec<usize> = (0..h.nrows()).collect();
                *h = l.forward(h.view(), &positions, None)?;
            }
        }
        self.logits_sequences(&hidden)
    }
}

/// KL divergence of next-token distributions, `KL(P ‖ Q)` per position, `P` the reference.
#[derive(Clone, Debug, PartialEq)]
pub struct KlStats {
    /// Mean over all positions (nats).
    pub mean: f64,
    /// Largest at any position.
    pub max: f64,
    /// Positions compared.
    pub positions: usize,
}

/// `Σ_v p_v (log p_v − log q_v)` from two logit rows, log-softmax in f64.
pub fn kl_from_logits(p_logits: &[f32], q_logits: &[f32]) -> Result<f64> {
    if p_logits.len() != q_logits.len() || p_logits.is_empty() {
        return Err(ForgeError::Shape(format!("logit rows of {} and {} entries", p_logits.len(), q_logits.len())));
    }
    let log_softmax = |l: &[f32]| -> Vec<f64> {
        let max = l.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        let lse = max + l.iter().map(|&v| (f64::from(v) - max).exp()).sum::<f64>().ln();
        l.iter().map(|&v| f64::from(v) - lse).collect()
    };
    let lp = log_softmax(p_logits);
    let lq = log_softmax(q_logits);
    let kl: f64 = lp.iter().zip(&lq).map(|(&a, &b)| a.exp() * (a - b)).sum();
    if !kl.is_finite() {
        return Err(ForgeError::NonFinite { tensor: "KL divergence", row: 0, col: 0, value: kl as f32 });
    }
    // Rounding can leave a tiny negative value for identical distributions.
    Ok(kl.max(0.0))
}

/// `KL(P ‖ Q)` over every position of `sequences`, P from `reference` weights, Q from
/// `candidate` (e.g. full precision vs quantized), both with `config`.
pub fn next_token_kl(
    config: &ModelConfig,
    reference: &dyn WeightSource,
    candidate: &dyn WeightSource,
    sequences: &[Vec<u32>],
) -> Result<KlStats> {
    let p = CpuModel::new(config, reference).forward_logits(sequences)?;
    let q = CpuModel::new(config, candidate).forward_logits(sequences)?;
    let mut sum = 0.0;
    let mut max = 0.0f64;
    let mut positions = 0usize;
    for (a, b) in p.iter().zip(&q) {
        for (ra, rb) in a.rows().into_iter().zip(b.rows()) {
            let (ra, rb) = (ra.to_vec(), rb.to_vec());
            let kl = kl_from_logits(&ra, &rb)?;
            sum += kl;
            max = max.max(kl);
            positions += 1;
        }
    }
    if positions == 0 {
        return Err(ForgeError::Shape("no positions to compare".into()));
    }
    Ok(KlStats { mean: sum / positions as f64, max, positions })
}
