//! CPU reference forward of one decoder layer in f32: the oracle the GPU forward and the
//! calibration engine are checked against. Simple and close to the modelling code it mirrors
//! (transformers v5.24, `models/{llama,mistral,qwen2,qwen3,qwen3_moe,mixtral}/modeling_*.py`):
//! Linears are f32 matrix products; norms, softmaxes and attention dot products accumulate in
//! f64 and round once to f32 (at least as accurate as PyTorch's f32 reductions).

use super::config::{AttentionConfig, FfnKind, GqaConfig, ModelConfig, MoeConfig, RouterKind};
use super::hooks::ActivationSink;
use super::names::{InputGroup, LinearRole, LinearSpec};
use super::rope::Rope;
use super::weights::{matrix, vector, WeightSource};
use crate::{ForgeError, Result};
use ndarray::{s, Array1, Array2, ArrayView2, Axis};
use rayon::prelude::*;

/// `y = x·Wᵀ + b` with `W: (out, in)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// `(out_features, in_features)`.
    pub weight: Array2<f32>,
    /// `(out_features,)`.
    pub bias: Option<Array1<f32>>,
}

impl Linear {
    fn load(src: &dyn WeightSource, spec: &LinearSpec, in_features: usize) -> Result<Self> {
        let weight = matrix(src, &spec.weight, (spec.out_features, in_features))?;
        let bias = spec.bias.as_deref().map(|b| vector(src, b, spec.out_features)).transpose()?;
        Ok(Linear { weight, bias })
    }

    /// `x: (tokens, in)` → `(tokens, out)`.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let mut y = x.dot(&self.weight.t());
        if let Some(b) = &self.bias {
            y += b;
        }
        y
    }
}

/// RMSNorm of each row: `w · x / sqrt(mean(x²) + eps)`, the mean accumulated in f64.
pub fn rms_norm(x: ArrayView2<'_, f32>, weight: &Array1<f32>, eps: f32) -> Array2<f32> {
    let mut out = x.to_owned();
    for mut row in out.rows_mut() {
        let n = row.len().max(1) as f64;
        let mean_sq = (row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n) as f32;
        let inv = (1.0 / (f64::from(mean_sq + eps)).sqrt()) as f32;
        for (v, &w) in row.iter_mut().zip(weight.iter()) {
            *v = w * (*v * inv);
        }
    }
    out
}

/// `silu(x) = x·sigmoid(x)`, in f64, rounded once.
fn silu(x: f32) -> f32 {
    let x = f64::from(x);
    (x / (1.0 + (-x).exp())) as f32
}

/// A SwiGLU MLP (dense, or one expert).
#[derive(Clone, Debug, PartialEq)]
pub struct SwiGlu {
    /// Gate projection (Mixtral `w1`).
    pub gate: Linear,
    /// Up projection (Mixtral `w3`).
    pub up: Linear,
    /// Down projection (Mixtral `w2`).
    pub down: Linear,
}

impl SwiGlu {
    /// `down(silu(gate x)·up x)`, reporting the gate/up input and the down input.
    fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        groups: (InputGroup, InputGroup),
        sink: &mut Option<&mut dyn ActivationSink>,
    ) -> Result<Array2<f32>> {
        if let Some(s) = sink.as_deref_mut() {
            s.record(groups.0, x)?;
        }
        let g = self.gate.forward(x);
        let u = self.up.forward(x);
        let h = ndarray::Zip::from(&g).and(&u).map_collect(|&g, &u| silu(g) * u);
        if let Some(s) = sink.as_deref_mut() {
            s.record(groups.1, h.view())?;
        }
        Ok(self.down.forward(h.view()))
    }
}

/// The feed-forward block of a layer.
#[allow(clippy::large_enum_variant)] // one per loaded layer; boxing buys nothing
#[derive(Clone, Debug, PartialEq)]
pub enum Ffn {
    /// One dense SwiGLU.
    Dense(SwiGlu),
    /// Routed experts.
    Moe {
        /// Router `(experts, hidden)`.
        router: Array2<f32>,
        /// The experts, by index.
        experts: Vec<SwiGlu>,
        /// Routing settings.
        config: MoeConfig,
    },
}

/// Per-token routing: `(expert, weight)` for the `top_k` chosen experts.
pub type Routing = Vec<Vec<(usize, f32)>>;

/// Routes each row of `logits: (tokens, experts)`.
///
/// * Qwen3-MoE (`Qwen3MoeTopKRouter`, modeling_qwen3_moe.py): softmax over all experts, top-k
///   of the probabilities, divided by their sum when `norm_topk_prob`.
/// * Mixtral (`MixtralTopKRouter`, modeling_mixtral.py): softmax over all experts, top-k,
///   always divided by their sum (= the softmax of the top-k logits).
///
/// Probabilities are computed in f64; ties go to the lower expert index.
pub fn route(logits: ArrayView2<'_, f32>, top_k: usize, kind: RouterKind) -> Routing {
    let rows: Vec<_> = logits.rows().into_iter().collect();
    rows.into_par_iter()
        .map(|row| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let exps: Vec<f64> = row.iter().map(|&v| (f64::from(v) - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            let mut order: Vec<usize> = (0..exps.len()).collect();
            order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
            order.truncate(top_k);
            let renormalize = match kind {
                RouterKind::SoftmaxTopK { renormalize } => renormalize,
                RouterKind::TopKSoftmax => true,
            };
            let chosen: f64 = order.iter().map(|&e| exps[e]).sum();
            let denom = if renormalize { chosen } else { total };
            order.into_iter().map(|e| (e, (exps[e] / denom) as f32)).collect()
        })
        .collect()
}

/// One decoder layer's weights, loaded once and run on any number of sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderLayer {
    /// Layer index.
    pub index: usize,
    pub(super) input_norm: Array1<f32>,
    pub(super) post_attention_norm: Array1<f32>,
    pub(super) q: Linear,
    pub(super) k: Linear,
    pub(super) v: Linear,
    pub(super) o: Linear,
    pub(super) q_norm: Option<Array1<f32>>,
    pub(super) k_norm: Option<Array1<f32>>,
    /// Feed-forward block.
    pub ffn: Ffn,
    pub(super) gqa: GqaConfig,
    pub(super) sliding_window: Option<usize>,
    pub(super) eps: f32,
    pub(super) rope: Rope,
    pub(super) hidden: usize,
}

impl DecoderLayer {
    /// Loads layer `index` of `cfg` from `src` (a checkpoint, a fixture, or a copy with
    /// substituted, quantized-dequantized weights).
    pub fn load(cfg: &ModelConfig, index: usize, src: &dyn WeightSource) -> Result<Self> {
        let spec = *cfg.layer(index)?;
        let names = cfg.layer_tensor_names(index)?;
        let h = cfg.hidden_size;
        let gqa = match &cfg.attention {
            AttentionConfig::Gqa(g) => g.clone(),
        };
        let groups = cfg.linear_groups(index)?;
        let find = |role: LinearRole, group: InputGroup| -> Result<Linear> {
            let g = groups
                .iter()
                .find(|g| g.group == group)
                .ok_or_else(|| ForgeError::Config(format!("layer {index} has no {group:?} group")))?;
            let l = g
                .linears
                .iter()
                .find(|l| l.role == role)
                .ok_or_else(|| ForgeError::Config(format!("layer {index} has no {role:?} in {group:?}")))?;
            Linear::load(src, l, g.in_features)
        };
        let ffn = match spec.ffn {
            FfnKind::Dense => Ffn::Dense(SwiGlu {
                gate: find(LinearRole::Gate, InputGroup::GateUp)?,
                up: find(LinearRole::Up, InputGroup::GateUp)?,
                down: find(LinearRole::Down, InputGroup::Down)?,
            }),
            FfnKind::Moe => {
                let config =
                    cfg.moe.clone().ok_or_else(|| ForgeError::Config("MoE layer without MoE config".into()))?;
                let router_name =
                    names.router.as_deref().ok_or_else(|| ForgeError::Config("MoE without router".into()))?;
                let router = matrix(src, router_name, (config.num_experts, h))?;
                let experts = (0..config.num_experts)
                    .map(|e| {
                        Ok(SwiGlu {
                            gate: find(LinearRole::Gate, InputGroup::ExpertGateUp(e))?,
                            up: find(LinearRole::Up, InputGroup::ExpertGateUp(e))?,
                            down: find(LinearRole::Down, InputGroup::ExpertDown(e))?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ffn::Moe { router, experts, config }
            }
        };
        Ok(DecoderLayer {
            index,
            input_norm: vector(src, &names.input_norm, h)?,
            post_attention_norm: vector(src, &names.post_attention_norm, h)?,
            q: find(LinearRole::Q, InputGroup::Qkv)?,
            k: find(LinearRole::K, InputGroup::Qkv)?,
            v: find(LinearRole::V, InputGroup::Qkv)?,
            o: find(LinearRole::O, InputGroup::O)?,
            q_norm: names.q_norm.as_deref().map(|n| vector(src, n, gqa.head_dim)).transpose()?,
            k_norm: names.k_norm.as_deref().map(|n| vector(src, n, gqa.head_dim)).transpose()?,
            ffn,
            sliding_window: spec.sliding_window,
            eps: cfg.rms_norm_eps,
            rope: Rope::new(&cfg.rope)?,
            hidden: h,
            gqa,
        })
    }

    /// The loaded Linear of `role` in input group `group`.
    pub fn linear(&self, group: InputGroup, role: LinearRole) -> Result<&Linear> {
        let mlp = match (group, &self.ffn) {
            (InputGroup::GateUp | InputGroup::Down, Ffn::Dense(m)) => Some(m),
            (InputGroup::ExpertGateUp(e) | InputGroup::ExpertDown(e), Ffn::Moe { experts, .. }) => experts.get(e),
            _ => None,
        };
        match (group, role, mlp) {
            (InputGroup::Qkv, LinearRole::Q, _) => Ok(&self.q),
            (InputGroup::Qkv, LinearRole::K, _) => Ok(&self.k),
            (InputGroup::Qkv, LinearRole::V, _) => Ok(&self.v),
            (InputGroup::O, LinearRole::O, _) => Ok(&self.o),
            (_, LinearRole::Gate, Some(m)) => Ok(&m.gate),
            (_, LinearRole::Up, Some(m)) => Ok(&m.up),
            (_, LinearRole::Down, Some(m)) => Ok(&m.down),
            _ => Err(ForgeError::Config(format!("layer {} has no {role:?} in {group:?}", self.index))),
        }
    }

    /// Runs one sequence `x: (seq, hidden)` whose tokens sit at `positions` (one per row;
    /// causal order is row order). Every Linear group's input goes to `sink`.
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        positions: &[usize],
        sink: Option<&mut dyn ActivationSink>,
    ) -> Result<Array2<f32>> {
        Ok(self.forward_with_ffn_input(x, positions, sink)?.0)
    }

    /// [`DecoderLayer::forward`], also returning the feed-forward block's input (the
    /// post-attention norm's output), which [`DecoderLayer::record_experts`] takes.
    pub fn forward_with_ffn_input(
        &self,
        x: ArrayView2<'_, f32>,
        positions: &[usize],
        mut sink: Option<&mut dyn ActivationSink>,
    ) -> Result<(Array2<f32>, Array2<f32>)> {
        let (seq, width) = x.dim();
        if width != self.hidden {
            return Err(ForgeError::Shape(format!(
                "layer {}: input has {width} features, expected {}",
                self.index, self.hidden
            )));
        }
        if positions.len() != seq {
            return Err(ForgeError::Shape(format!("{} positions for {seq} tokens", positions.len())));
        }
        let (mut hidden, normed) = self.attention_block(x, positions, &mut sink)?;
        let ffn_out = match &self.ffn {
            Ffn::Dense(mlp) => mlp.forward(normed.view(), (InputGroup::GateUp, InputGroup::Down), &mut sink)?,
            Ffn::Moe { router, experts, config } => {
                let logits = normed.dot(&router.t());
                let routing = route(logits.view(), config.top_k, config.router);
                let mut out = Array2::<f32>::zeros((seq, self.hidden));
                for (e, expert) in experts.iter().enumerate() {
                    // Tokens routed to e, in token order, with their routing weights.
                    let picked: Vec<(usize, f32)> = routing
                        .iter()
                        .enumerate()
                        .filter_map(|(t, r)| r.iter().find(|(x, _)| *x == e).map(|&(_, w)| (t, w)))
                        .collect();
                    if picked.is_empty() {
                        continue;
                    }
                    let rows: Vec<usize> = picked.iter().map(|&(t, _)| t).collect();
                    let xe = normed.select(Axis(0), &rows);
                    let ye = expert.forward(
                        xe.view(),
                        (InputGroup::ExpertGateUp(e), InputGroup::ExpertDown(e)),
                        &mut sink,
                    )?;
                    for (k, &(t, w)) in picked.iter().enumerate() {
                        let mut dst = out.row_mut(t);
                        dst.scaled_add(w, &ye.row(k));
                    }
                }
                out
            }
        };
        hidden += &ffn_out;
        crate::solver::first_non_finite(hidden.view(), "layer output")?;
        Ok((hidden, normed))
    }

    /// The attention half of [`DecoderLayer::forward`] (inputs checked by the caller): the
    /// residual stream after attention and its post-attention norm (the feed-forward input).
    fn attention_block(
        &self,
        x: ArrayView2<'_, f32>,
        positions: &[usize],
        sink: &mut Option<&mut dyn ActivationSink>,
    ) -> Result<(Array2<f32>, Array2<f32>)> {
        crate::solver::first_non_finite(x, "hidden states")?;
        let normed = rms_norm(x, &self.input_norm, self.eps);
        if let Some(s) = sink.as_deref_mut() {
            s.record(InputGroup::Qkv, normed.view())?;
        }
        let attn = self.attention(normed.view(), positions)?;
        if let Some(s) = sink.as_deref_mut() {
            s.record(InputGroup::O, attn.view())?;
        }
        let hidden = x.to_owned() + self.o.forward(attn.view());
        let normed = rms_norm(hidden.view(), &self.post_attention_norm, self.eps);
        Ok((hidden, normed))
    }

    /// Reports what experts `experts` would see if every token were routed to them (the
    /// all-tokens coverage policy for experts few calibration tokens reach): their gate/up and
    /// down inputs over all rows of `ffn_input` (from [`DecoderLayer::forward_with_ffn_input`])
    /// go to `sink`. Nothing else is computed.
    pub fn record_experts(
        &self,
        ffn_input: ArrayView2<'_, f32>,
        experts: &[usize],
        sink: &mut dyn ActivationSink,
    ) -> Result<()> {
        let Ffn::Moe { experts: all, .. } = &self.ffn else {
            return Err(ForgeError::Config(format!("layer {} has no experts", self.index)));
        };
        if ffn_input.ncols() != self.hidden {
            return Err(ForgeError::Shape(format!(
                "layer {}: feed-forward input has {} features, expected {}",
                self.index,
                ffn_input.ncols(),
                self.hidden
            )));
        }
        let mut sink = Some(sink);
        for &e in experts {
            let expert = all.get(e).ok_or_else(|| ForgeError::Shape(format!("expert {e} of {}", all.len())))?;
            expert.forward(ffn_input, (InputGroup::ExpertGateUp(e), InputGroup::ExpertDown(e)), &mut sink)?;
        }
        Ok(())
    }

    /// Causal grouped-query attention with RoPE (and the per-head q/k norm of Qwen3) for one
    /// sequence; returns the heads' outputs concatenated, `(seq, heads·head_dim)`.
    fn attention(&self, x: ArrayView2<'_, f32>, positions: &[usize]) -> Result<Array2<f32>> {
        let g = &self.gqa;
        let (hd, nh, nkv) = (g.head_dim, g.num_heads, g.num_kv_heads);
        let seq = x.nrows();
        let mut q = self.q.forward(x);
        let mut k = self.k.forward(x);
        let v = self.v.forward(x);
        let per_head_norm = |m: &mut Array2<f32>, heads: usize, w: &Option<Array1<f32>>| {
            if let Some(w) = w {
                for h in 0..heads {
                    let normed = rms_norm(m.slice(s![.., h * hd..(h + 1) * hd]), w, self.eps);
                    m.slice_mut(s![.., h * hd..(h + 1) * hd]).assign(&normed);
                }
            }
        };
        per_head_norm(&mut q, nh, &self.q_norm);
        per_head_norm(&mut k, nkv, &self.k_norm);
        for (t, &pos) in positions.iter().enumerate() {
            let (cos, sin) = self.rope.cos_sin(pos);
            for (m, heads) in [(&mut q, nh), (&mut k, nkv)] {
                let mut row = m.row_mut(t);
                let row = row.as_slice_mut().ok_or_else(|| ForgeError::Internal("q/k rows are contiguous".into()))?;
                for head in row.chunks_exact_mut(hd).take(heads) {
                    self.rope.apply(head, &cos, &sin);
                }
            }
        }
        let group = nh / nkv;
        let scale = f64::from(g.scaling);
        let heads: Vec<Array2<f32>> = (0..nh)
            .into_par_iter()
            .map(|h| {
                let kv = h / group;
                let qh = q.slice(s![.., h * hd..(h + 1) * hd]);
                let kh = k.slice(s![.., kv * hd..(kv + 1) * hd]);
                let vh = v.slice(s![.., kv * hd..(kv + 1) * hd]);
                let mut out = Array2::<f32>::zeros((seq, hd));
                for i in 0..seq {
                    // Keys j ≤ i, and within the sliding window when there is one
                    // (masking_utils: kv_idx > q_idx - sliding_window).
                    let first = match self.sliding_window {
                        Some(w) => (i + 1).saturating_sub(w),
                        None => 0,
                    };
                    let scores: Vec<f64> = (first..=i)
                        .map(|j| {
                            qh.row(i).iter().zip(kh.row(j)).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = exps.iter().sum();
                    for d in 0..hd {
                        let acc: f64 = exps.iter().zip(first..=i).map(|(p, j)| p * f64::from(vh[[j, d]])).sum();
                        out[[i, d]] = (acc / total) as f32;
                    }
                }
                out
            })
            .collect();
        let mut cat = Array2::<f32>::zeros((seq, nh * hd));
        for (h, o) in heads.iter().enumerate() {
            cat.slice_mut(s![.., h * hd..(h + 1) * hd]).assign(o);
        }
        Ok(cat)
    }
}
