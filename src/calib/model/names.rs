//! Checkpoint tensor names per architecture, and which Linears read the same input (one
//! Hessian per input group).

use super::config::{Arch, AttentionConfig, FfnKind, ModelConfig};
use crate::Result;

/// A set of Linears that read the same activations, so they share one Hessian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InputGroup {
    /// q/k/v projections: the attention norm's output.
    Qkv,
    /// The attention output projection: the attention's per-head outputs, concatenated.
    O,
    /// Dense MLP gate/up: the post-attention norm's output.
    GateUp,
    /// Dense MLP down: `silu(gate)·up`.
    Down,
    /// Expert `e`'s gate/up: the post-attention norm's output of the tokens routed to `e`.
    ExpertGateUp(usize),
    /// Expert `e`'s down: its `silu(gate)·up` over the tokens routed to it.
    ExpertDown(usize),
}

/// What one Linear is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinearRole {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// SwiGLU gate (Mixtral `w1`).
    Gate,
    /// SwiGLU up (Mixtral `w3`).
    Up,
    /// SwiGLU down (Mixtral `w2`).
    Down,
}

/// One quantizable Linear of a decoder layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearSpec {
    /// Its role.
    pub role: LinearRole,
    /// Weight tensor name, `(out_features, in_features)`.
    pub weight: String,
    /// Bias tensor name, when it has one.
    pub bias: Option<String>,
    /// Output features (weight rows).
    pub out_features: usize,
}

/// Linears that share an input, with the input width (the Hessian's side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearGroup {
    /// Which input.
    pub group: InputGroup,
    /// Input features.
    pub in_features: usize,
    /// The Linears, in checkpoint order.
    pub linears: Vec<LinearSpec>,
}

/// Names of one decoder layer's tensors (quantizable or not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerTensorNames {
    /// `model.layers.{i}.` prefix.
    pub prefix: String,
    /// Pre-attention RMSNorm weight.
    pub input_norm: String,
    /// Pre-MLP RMSNorm weight.
    pub post_attention_norm: String,
    /// Per-head q RMSNorm weight (Qwen3 families).
    pub q_norm: Option<String>,
    /// Per-head k RMSNorm weight (Qwen3 families).
    pub k_norm: Option<String>,
    /// MoE router weight `(experts, hidden)`; kept at full precision.
    pub router: Option<String>,
}

impl ModelConfig {
    /// Token embedding `(vocab, hidden)`.
    pub fn embed_name(&self) -> &'static str {
        "model.embed_tokens.weight"
    }

    /// Final RMSNorm weight.
    pub fn final_norm_name(&self) -> &'static str {
        "model.norm.weight"
    }

    /// Output projection `(vocab, hidden)`: the embedding when tied.
    pub fn lm_head_name(&self) -> &'static str {
        if self.tie_word_embeddings {
            self.embed_name()
        } else {
            "lm_head.weight"
        }
    }

    /// Non-Linear tensor names of decoder layer `layer`.
    pub fn layer_tensor_names(&self, layer: usize) -> Result<LayerTensorNames> {
        let spec = self.layer(layer)?;
        let p = format!("model.layers.{layer}.");
        let qk = match &self.attention {
            AttentionConfig::Gqa(g) => g.qk_norm,
        };
        let router = match (spec.ffn, self.arch) {
            (FfnKind::Dense, _) => None,
            (FfnKind::Moe, Arch::Mixtral) => Some(format!("{p}block_sparse_moe.gate.weight")),
            (FfnKind::Moe, _) => Some(format!("{p}mlp.gate.weight")),
        };
        Ok(LayerTensorNames {
            input_norm: format!("{p}input_layernorm.weight"),
            post_attention_norm: format!("{p}post_attention_layernorm.weight"),
            q_norm: qk.then(|| format!("{p}self_attn.q_norm.weight")),
            k_norm: qk.then(|| format!("{p}self_attn.k_norm.weight")),
            router,
            prefix: p,
        })
    }

    /// The quantizable Linears of decoder layer `layer`, grouped by shared input, in the
    /// order the forward pass reaches them (experts in index order).
    pub fn linear_groups(&self, layer: usize) -> Result<Vec<LinearGroup>> {
        let spec = self.layer(layer)?;
        let p = format!("model.layers.{layer}.");
        let h = self.hidden_size;
        let lin = |role, name: String, bias: bool, out_features| LinearSpec {
            role,
            weight: format!("{name}.weight"),
            bias: bias.then(|| format!("{name}.bias")),
            out_features,
        };
        let mut groups = Vec::new();
        match &self.attention {
            AttentionConfig::Gqa(g) => {
                let q_out = g.num_heads * g.head_dim;
                let kv_out = g.num_kv_heads * g.head_dim;
                let a = format!("{p}self_attn.");
                groups.push(LinearGroup {
                    group: InputGroup::Qkv,
                    in_features: h,
                    linears: vec![
                        lin(LinearRole::Q, format!("{a}q_proj"), g.qkv_bias, q_out),
                        lin(LinearRole::K, format!("{a}k_proj"), g.qkv_bias, kv_out),
                        lin(LinearRole::V, format!("{a}v_proj"), g.qkv_bias, kv_out),
                    ],
                });
                groups.push(LinearGroup {
                    group: InputGroup::O,
                    in_features: q_out,
                    linears: vec![lin(LinearRole::O, format!("{a}o_proj"), g.o_bias, h)],
                });
            }
        }
        match spec.ffn {
            FfnKind::Dense => {
                let m =
                    self.mlp.ok_or_else(|| crate::ForgeError::Config("dense layer without an MLP config".into()))?;
                let mp = format!("{p}mlp.");
                groups.push(LinearGroup {
                    group: InputGroup::GateUp,
                    in_features: h,
                    linears: vec![
                        lin(LinearRole::Gate, format!("{mp}gate_proj"), m.bias, m.intermediate_size),
                        lin(LinearRole::Up, format!("{mp}up_proj"), m.bias, m.intermediate_size),
                    ],
                });
                groups.push(LinearGroup {
                    group: InputGroup::Down,
                    in_features: m.intermediate_size,
                    linears: vec![lin(LinearRole::Down, format!("{mp}down_proj"), m.bias, h)],
                });
            }
            FfnKind::Moe => {
                let moe = self
                    .moe
                    .as_ref()
                    .ok_or_else(|| crate::ForgeError::Config("MoE layer without an MoE config".into()))?;
                let n = moe.expert_intermediate_size;
                for e in 0..moe.num_experts {
                    let (gate, up, down) = match self.arch {
                        Arch::Mixtral => {
                            let x = format!("{p}block_sparse_moe.experts.{e}.");
                            (format!("{x}w1"), format!("{x}w3"), format!("{x}w2"))
                        }
                        _ => {
                            let x = format!("{p}mlp.experts.{e}.");
                            (format!("{x}gate_proj"), format!("{x}up_proj"), format!("{x}down_proj"))
                        }
                    };
                    groups.push(LinearGroup {
                        group: InputGroup::ExpertGateUp(e),
                        in_features: h,
                        linears: vec![lin(LinearRole::Gate, gate, false, n), lin(LinearRole::Up, up, false, n)],
                    });
                    groups.push(LinearGroup {
                        group: InputGroup::ExpertDown(e),
                        in_features: n,
                        linears: vec![lin(LinearRole::Down, down, false, h)],
                    });
                }
            }
        }
        Ok(groups)
    }
}
