//! What a tensor is (by its Hugging Face name and shape), which Linear weights are
//! quantized, and which of them must be treated alike because runtimes fuse them.

/// What a tensor of a checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TensorKind {
    /// Token embeddings (never quantized).
    Embedding,
    /// The output head, `lm_head` or DeepSeek's MTP `shared_head.head` (never quantized).
    LmHead,
    /// A normalisation weight (never quantized).
    Norm,
    /// A bias (never quantized).
    Bias,
    /// An MoE router: `mlp.gate`, `router`, `shared_expert_gate` (never quantized).
    Router,
    /// A router's score-correction bias (`e_score_correction_bias`).
    RouterBias,
    /// A 2-D Linear weight of an attention block.
    Attention,
    /// A 2-D Linear weight of a dense MLP.
    Mlp,
    /// A 2-D Linear weight of a routed expert.
    Expert,
    /// A 2-D Linear weight of a shared expert.
    SharedExpert,
    /// The block scales of an FP8 weight (`weight_scale_inv`), consumed with their weight.
    Fp8Scale,
    /// Anything else (kept as it is).
    Other,
}

impl TensorKind {
    /// A Linear weight of a decoder layer: what is quantized by default.
    pub fn is_linear(self) -> bool {
        matches!(self, TensorKind::Attention | TensorKind::Mlp | TensorKind::Expert | TensorKind::SharedExpert)
    }

    /// Lower-case label for reports.
    pub fn label(self) -> &'static str {
        match self {
            TensorKind::Embedding => "embedding",
            TensorKind::LmHead => "lm_head",
            TensorKind::Norm => "norm",
            TensorKind::Bias => "bias",
            TensorKind::Router => "router",
            TensorKind::RouterBias => "router bias",
            TensorKind::Attention => "attention linear",
            TensorKind::Mlp => "mlp linear",
            TensorKind::Expert => "expert linear",
            TensorKind::SharedExpert => "shared-expert linear",
            TensorKind::Fp8Scale => "fp8 block scale",
            TensorKind::Other => "other",
        }
    }
}

/// The module a `<module>.weight` tensor belongs to.
pub fn module_of(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

/// The decoder layer a tensor belongs to (`model.layers.7` of `model.layers.7.mlp...`):
/// a `layers`, `h` or `blocks` segment followed by a number.
pub fn layer_of(name: &str) -> Option<&str> {
    let mut end = 0usize;
    let mut prev: Option<&str> = None;
    for seg in name.split('.') {
        let seg_end = end + seg.len();
        if matches!(prev, Some("layers" | "h" | "blocks")) && !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit())
        {
            return Some(&name[..seg_end]);
        }
        prev = Some(seg);
        end = seg_end + 1;
    }
    None
}

/// The layer index of [`layer_of`].
pub fn layer_index(name: &str) -> Option<usize> {
    layer_of(name).and_then(|l| l.rsplit('.').next()).and_then(|n| n.parse().ok())
}

/// Classifies a tensor by name and shape.
pub fn classify(name: &str, shape: &[usize]) -> TensorKind {
    let lower = name.to_ascii_lowercase();
    let module = module_of(&lower);
    let last = module.rsplit('.').next().unwrap_or(module);
    let parent_last = module.rsplit('.').nth(1).unwrap_or("");
    if lower.ends_with(".weight_scale_inv") {
        return TensorKind::Fp8Scale;
    }
    if lower.ends_with("e_score_correction_bias") {
        return TensorKind::RouterBias;
    }
    if lower.ends_with(".bias") {
        return TensorKind::Bias;
    }
    if lower.contains("embed") || last == "wte" || last == "wpe" {
        return TensorKind::Embedding;
    }
    if lower.starts_with("lm_head") || module.ends_with("shared_head.head") {
        return TensorKind::LmHead;
    }
    if last.contains("norm") || last.starts_with("ln_") || last == "ln" {
        return TensorKind::Norm;
    }
    let router = (last == "gate" && matches!(parent_last, "mlp" | "block_sparse_moe" | "moe" | "feed_forward"))
        || last == "router"
        || last == "shared_expert_gate";
    if router {
        return TensorKind::Router;
    }
    if shape.len() == 2 && lower.ends_with(".weight") && layer_of(&lower).is_some() {
        let in_layer = &lower[layer_of(&lower).map_or(0, str::len)..];
        return if in_layer.contains(".shared_expert") {
            TensorKind::SharedExpert
        } else if in_layer.contains(".experts.") {
            TensorKind::Expert
        } else if in_layer.contains("attn") || in_layer.contains("attention") {
            TensorKind::Attention
        } else {
            TensorKind::Mlp
        };
    }
    TensorKind::Other
}

/// The fused group a Linear module belongs to: runtimes fuse q/k/v, gate/up, Mixtral's
/// experts' w1/w3 and DeepSeek's q_a/kv_a (vLLM's `fused_qkv_a_proj`) into one matrix,
/// so they must be quantized alike. Returns the group key (`<parent>.{qkv,gate_up,...}`)
/// or the module itself when it is not fused.
pub fn fused_group(module: &str) -> String {
    let (parent, last) = match module.rsplit_once('.') {
        Some((p, l)) => (p, l),
        None => ("", module),
    };
    let family = match last {
        "q_proj" | "k_proj" | "v_proj" => "qkv",
        "gate_proj" | "up_proj" => "gate_up",
        "w1" | "w3" => "w1_w3",
        "q_a_proj" | "kv_a_proj_with_mqa" => "qkv_a",
        _ => return module.to_string(),
    };
    format!("{parent}.{{{family}}}")
}

/// A glob over tensor or module names: `*` matches any run of characters (dots included),
/// `?` one character; everything else matches itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// A glob from its pattern.
    pub fn new(pattern: &str) -> Self {
        Glob(pattern.to_string())
    }

    /// The pattern.
    pub fn pattern(&self) -> &str {
        &self.0
    }

    /// Whether the whole of `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        let p: Vec<char> = self.0.chars().collect();
        let t: Vec<char> = text.chars().collect();
        // Iterative matcher with single-star backtracking: linear in practice, O(|p|·|t|)
        // at worst.
        let (mut pi, mut ti) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            match p.get(pi) {
                Some('*') => {
                    star = Some((pi, ti));
                    pi += 1;
                }
                Some(&c) if c == '?' || c == t[ti] => {
                    pi += 1;
                    ti += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        pi = sp + 1;
                        ti = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }

    /// Whether the tensor `name` or its module matches.
    pub fn matches_tensor(&self, name: &str) -> bool {
        self.matches(name) || self.matches(module_of(name))
    }
}
