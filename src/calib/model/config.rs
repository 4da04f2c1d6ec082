//! `config.json` → a typed architecture description.
//!
//! Hugging Face configs come in two spellings: the Hub's (`rope_theta` + `rope_scaling`) and
//! transformers v5's (`rope_parameters`); both are read. Fields a config may omit take the
//! default of the transformers config class of that architecture (cited per field).

use crate::checkpoint::model::MAX_JSON_BYTES;
use crate::checkpoint::st::read_bounded;
use crate::{ForgeError, Result};
use serde_json::{Map, Value};

/// The architectures the engine runs, by their `model_type`.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"];

/// A decoder-only architecture family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// Llama 2 / 3 (`LlamaForCausalLM`), rope scaling "llama3" included.
    Llama,
    /// Mistral (`MistralForCausalLM`), optionally with a sliding window.
    Mistral,
    /// Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): q/k/v with bias.
    Qwen2,
    /// Qwen3 (`Qwen3ForCausalLM`): per-head RMSNorm on q and k.
    Qwen3,
    /// Qwen3-MoE (`Qwen3MoeForCausalLM`): softmax-then-top-k router, optional dense layers.
    Qwen3Moe,
    /// Mixtral (`MixtralForCausalLM`): `block_sparse_moe` with w1/w3/w2 experts.
    Mixtral,
}

impl Arch {
    /// The `model_type` string of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Mixtral => "mixtral",
        }
    }

    fn from_model_type(t: &str) -> Option<Arch> {
        Some(match t {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "qwen3_moe" => Arch::Qwen3Moe,
            "mixtral" => Arch::Mixtral,
            _ => return None,
        })
    }

    fn from_class(c: &str) -> Option<Arch> {
        Some(match c {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            "Qwen3MoeForCausalLM" => Arch::Qwen3Moe,
            "MixtralForCausalLM" => Arch::Mixtral,
            _ => return None,
        })
    }
}

/// How a layer's attention is built. DeepSeek-V3's multi-head latent attention becomes a
/// second variant (its own projections, ranks and RoPE split); everything that walks layers
/// matches on this.
#[derive(Clone, Debug, PartialEq)]
pub enum AttentionConfig {
    /// Grouped-query attention with separate q/k/v/o projections.
    Gqa(GqaConfig),
}

/// Grouped-query attention (multi-head when `num_kv_heads == num_heads`).
#[derive(Clone, Debug, PartialEq)]
pub struct GqaConfig {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// q/k/v projections carry a bias (Qwen2 always; Llama/Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection carries a bias (Llama/Qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Score scale, `head_dim^-1/2`.
    pub scaling: f32,
}

/// Rotary position embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// `rope_theta`.
    pub theta: f64,
    /// Rotated features per head (all of them for every supported architecture).
    pub rotary_dim: usize,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// RoPE frequency scaling (`rope_scaling.rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (frequencies divided by it).
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.1's band-wise scaling.
    Llama3 {
        /// Scale of the low-frequency band.
        factor: f64,
        /// Wavelength bound of the low band (`original / low_freq_factor`).
        low_freq_factor: f64,
        /// Wavelength bound of the high band (`original / high_freq_factor`).
        high_freq_factor: f64,
        /// Context the model was trained on.
        original_max_position_embeddings: f64,
    },
    /// YaRN (Qwen long-context configs, DeepSeek-V3).
    Yarn {
        /// Scale factor.
        factor: f64,
        /// Context the model was trained on.
        original_max_position_embeddings: f64,
        /// Ramp bound in rotations (default 32).
        beta_fast: f64,
        /// Ramp bound in rotations (default 1).
        beta_slow: f64,
        /// cos/sin multiplier; `None` derives it from `mscale`/`mscale_all_dim`.
        attention_factor: Option<f64>,
        /// DeepSeek's `mscale`.
        mscale: Option<f64>,
        /// DeepSeek's `mscale_all_dim`.
        mscale_all_dim: Option<f64>,
        /// Round the ramp bounds outward (default true).
        truncate: bool,
    },
}

/// A dense SwiGLU MLP: `down(silu(gate x) · up x)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlpConfig {
    /// Inner width.
    pub intermediate_size: usize,
    /// gate/up/down carry a bias (Llama `mlp_bias`).
    pub bias: bool,
}

/// How a router turns logits into expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterKind {
    /// Qwen3-MoE: softmax over all experts, top-k, renormalised to sum 1 when `renormalize`
    /// (`norm_topk_prob`).
    SoftmaxTopK {
        /// Divide the chosen probabilities by their sum.
        renormalize: bool,
    },
    /// Mixtral: softmax over all experts, top-k, always renormalised — the softmax of the
    /// top-k logits.
    TopKSoftmax,
}

/// A mixture-of-experts block. DeepSeek-V3 adds a sigmoid, group-limited router with a score
/// correction bias and shared experts: new [`RouterKind`] variant, `shared_experts > 0`.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Routed experts.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Each expert's inner width.
    pub expert_intermediate_size: usize,
    /// Routing rule.
    pub router: RouterKind,
}

/// What a decoder layer's feed-forward block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnKind {
    /// The dense MLP ([`ModelConfig::mlp`]).
    Dense,
    /// The MoE block ([`ModelConfig::moe`]).
    Moe,
}

/// Per-layer structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerSpec {
    /// Dense MLP or MoE.
    pub ffn: FfnKind,
    /// Keys older than this many positions are masked (`None`: full causal attention).
    pub sliding_window: Option<usize>,
}

/// A model's architecture, enough to run and name every decoder layer.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Residual width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Vocabulary (rows of the embedding and lm_head).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// lm_head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Attention shape.
    pub attention: AttentionConfig,
    /// RoPE.
    pub rope: RopeConfig,
    /// Dense MLP of layers that have one (`None` when every layer is MoE).
    pub mlp: Option<MlpConfig>,
    /// MoE block of layers that have one.
    pub moe: Option<MoeConfig>,
    /// One entry per decoder layer.
    pub layers: Vec<LayerSpec>,
    /// `bos_token_id`, when the config names one.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (the first, when a list).
    pub eos_token_id: Option<u32>,
}

/// Reads typed fields of a JSON object with errors that name the field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    what: &'a str,
}

impl<'a> Fields<'a> {
    fn present(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, want: &str, v: &Value) -> ForgeError {
        ForgeError::Config(format!("{}: `{key}` must be {want}, got {v}", self.what))
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.bad(key, "a non-negative integer", v)),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| ForgeError::Config(format!("{}: `{key}` is missing", self.what)))
    }

    fn positive(&self, key: &str, default: Option<usize>) -> Result<usize> {
        let v = match default {
            Some(d) => self.usize_opt(key)?.unwrap_or(d),
            None => self.usize_req(key)?,
        };
        if v == 0 {
            return Err(ForgeError::Config(format!("{}: `{key}` must be positive", self.what)));
        }
        Ok(v)
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().filter(|x| x.is_finite()).map(Some).ok_or_else(|| self.bad(key, "a finite number", v))
            }
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, "true or false", v)),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.bad(key, "a string", v)),
        }
    }

    /// A token id, or the first of a list of them (`eos_token_id` may be either).
    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        let v = match self.present(key) {
            None => return Ok(None),
            Some(Value::Array(a)) => match a.first() {
                None => return Ok(None),
                Some(v) => v,
            },
            Some(v) => v,
        };
        v.as_u64().and_then(|x| u32::try_from(x).ok()).map(Some).ok_or_else(|| self.bad(key, "a token id", v))
    }

    fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.present(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| usize::try_from(x).ok())
                        .ok_or_else(|| self.bad(key, "a list of integers", v))
                })
                .collect(),
            Some(v) => Err(self.bad(key, "a list of integers", v)),
        }
    }
}

impl ModelConfig {
    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ForgeError::Config(format!("config.json is not valid JSON: {e}")))?;
        Self::from_json(&value)
    }

    /// Reads `config.json` from a model directory.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("config.json");
        let bytes = read_bounded(&path, MAX_JSON_BYTES)?;
        let text = String::from_utf8(bytes)
            .map_err(|e| ForgeError::Config(format!("{} is not UTF-8: {e}", path.display())))?;
        Self::from_json_str(&text)
    }

    /// Builds the description from a parsed `config.json`.
    pub fn from_json(value: &Value) -> Result<Self> {
        let map = value.as_object().ok_or_else(|| ForgeError::Config("config.json is not a JSON object".into()))?;
        let f = Fields { map, what: "config.json" };
        let arch = detect_arch(&f)?;

        let hidden_size = f.positive("hidden_size", None)?;
        let num_layers = f.positive("num_hidden_layers", None)?;
        let vocab_size = f.positive("vocab_size", None)?;
        let num_heads = f.positive("num_attention_heads", None)?;
        let num_kv_heads = f.positive("num_key_value_heads", Some(num_heads))?;
        if num_heads % num_kv_heads != 0 {
            return Err(ForgeError::Config(format!(
                "config.json: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        // Qwen3Config defaults head_dim to 128; the others (Qwen3-MoE's attention included)
        // to hidden/heads.
        let default_head_dim = match arch {
            Arch::Qwen3 => 128,
            _ => hidden_size / num_heads,
        };
        let head_dim = f.positive("head_dim", Some(default_head_dim))?;
        // MixtralConfig defaults rms_norm_eps to 1e-5, the other config classes to 1e-6.
        let rms_norm_eps = f.f64_opt("rms_norm_eps")?.unwrap_or(if arch == Arch::Mixtral { 1e-5 } else { 1e-6 });
        if rms_norm_eps <= 0.0 {
            return Err(ForgeError::Config("config.json: rms_norm_eps must be positive".into()));
        }
        let act = f.str_opt("hidden_act")?.unwrap_or("silu");
        if act != "silu" {
            return Err(ForgeError::Config(format!(
                "config.json: hidden_act `{act}` is not supported (only silu, the SwiGLU of every supported architecture)"
            )));
        }

        let attention_bias = f.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias) = match arch {
            // Qwen2Attention hard-codes bias=True on q/k/v and bias=False on o.
            Arch::Qwen2 => (true, false),
            Arch::Llama | Arch::Qwen3 | Arch::Qwen3Moe => (attention_bias, attention_bias),
            Arch::Mistral | Arch::Mixtral => (false, false),
        };
        let attention = AttentionConfig::Gqa(GqaConfig {
            num_heads,
            num_kv_heads,
            head_dim,
            qkv_bias,
            o_bias,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe),
            scaling: (head_dim as f64).powf(-0.5) as f32,
        });
        let rope = parse_rope(&f, head_dim)?;

        let mlp_bias = arch == Arch::Llama && f.bool_or("mlp_bias", false)?;
        let intermediate = f.usize_opt("intermediate_size")?;
        let (mlp, moe, ffn) = match arch {
            Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Qwen3 => {
                let intermediate_size = f.positive("intermediate_size", None)?;
                (Some(MlpConfig { intermediate_size, bias: mlp_bias }), None, vec![FfnKind::Dense; num_layers])
            }
            Arch::Mixtral => {
                let moe = MoeConfig {
                    num_experts: f.positive("num_local_experts", Some(8))?,
                    top_k: f.positive("num_experts_per_tok", Some(2))?,
                    expert_intermediate_size: f.positive("intermediate_size", None)?,
                    router: RouterKind::TopKSoftmax,
                };
                (None, Some(moe), vec![FfnKind::Moe; num_layers])
            }
            Arch::Qwen3Moe => {
                let num_experts = f.usize_opt("num_experts")?.unwrap_or(128);
                let step = f.positive("decoder_sparse_step", Some(1))?;
                let dense_only = f.usize_list("mlp_only_layers")?;
                // Qwen3MoeDecoderLayer: sparse iff not in mlp_only_layers, num_experts > 0 and
                // (layer_idx + 1) % decoder_sparse_step == 0.
                let ffn: Vec<FfnKind> = (0..num_layers)
                    .map(|i| {
                        if !dense_only.contains(&i) && num_experts > 0 && (i + 1) % step == 0 {
                            FfnKind::Moe
                        } else {
                            FfnKind::Dense
                        }
                    })
                    .collect();
                let moe = (num_experts > 0)
                    .then(|| -> Result<MoeConfig> {
                        Ok(MoeConfig {
                            num_experts,
                            top_k: f.positive("num_experts_per_tok", Some(8))?,
                            expert_intermediate_size: f.positive("moe_intermediate_size", Some(768))?,
                            router: RouterKind::SoftmaxTopK { renormalize: f.bool_or("norm_topk_prob", false)? },
                        })
                    })
                    .transpose()?;
                let mlp = match (ffn.contains(&FfnKind::Dense), intermediate) {
                    (false, _) => None,
                    (true, Some(n)) if n > 0 => Some(MlpConfig { intermediate_size: n, bias: false }),
                    (true, _) => {
                        return Err(ForgeError::Config(
                            "config.json: dense layers (mlp_only_layers / decoder_sparse_step) need a positive intermediate_size".into(),
                        ))
                    }
                };
                (mlp, moe, ffn)
            }
        };
        if let Some(m) = &moe {
            if m.top_k > m.num_experts {
                return Err(ForgeError::Config(format!(
                    "config.json: num_experts_per_tok {} exceeds the {} experts",
                    m.top_k, m.num_experts
                )));
            }
        }

        let windows = sliding_windows(&f, arch, num_layers)?;
        let layers =
            ffn.into_iter().zip(windows).map(|(ffn, sliding_window)| LayerSpec { ffn, sliding_window }).collect();
        // LlamaConfig, MistralConfig, MixtralConfig and the Qwen configs all default to untied.
        let tie_word_embeddings = f.bool_or("tie_word_embeddings", false)?;
        Ok(ModelConfig {
            arch,
            hidden_size,
            num_layers,
            vocab_size,
            rms_norm_eps: rms_norm_eps as f32,
            tie_word_embeddings,
            attention,
            rope,
            mlp,
            moe,
            layers,
            bos_token_id: f.token_id("bos_token_id")?,
            eos_token_id: f.token_id("eos_token_id")?,
        })
    }

    /// The GQA shape (every supported architecture has one).
    pub fn gqa(&self) -> &GqaConfig {
        match &self.attention {
            AttentionConfig::Gqa(g) => g,
        }
    }

    /// Structure of decoder layer `layer`, or a typed error past the last one.
    pub fn layer(&self, layer: usize) -> Result<&LayerSpec> {
        self.layers.get(layer).ok_or_else(|| {
            ForgeError::Config(format!("layer {layer} does not exist: the model has {} layers", self.num_layers))
        })
    }
}

fn detect_arch(f: &Fields<'_>) -> Result<Arch> {
    let model_type = f.str_opt("model_type")?;
    if let Some(arch) = model_type.and_then(Arch::from_model_type) {
        return Ok(arch);
    }
    let classes: Vec<&str> = match f.present("architectures") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if let Some(arch) = classes.iter().find_map(|c| Arch::from_class(c)) {
        return Ok(arch);
    }
    Err(ForgeError::Config(format!(
        "unsupported architecture (model_type {:?}, architectures {:?}); supported model types: {}",
        model_type.unwrap_or("missing"),
        classes,
        SUPPORTED_MODEL_TYPES.join(", ")
    )))
}

/// RoPE settings from either `rope_parameters` (transformers v5) or `rope_theta` +
/// `rope_scaling` (the Hub's configs).
fn parse_rope(f: &Fields<'_>, head_dim: usize) -> Result<RopeConfig> {
    let params = match f.present("rope_parameters") {
        Some(Value::Object(m)) => Some(m),
        Some(v) => return Err(f.bad("rope_parameters", "an object", v)),
        None => None,
    };
    let scaling_obj = match (params, f.present("rope_scaling")) {
        (Some(p), _) => Some(p),
        (None, Some(Value::Object(m))) => Some(m),
        (None, Some(v)) => return Err(f.bad("rope_scaling", "an object", v)),
        (None, None) => None,
    };
    let theta = match params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64) {
        Some(t) => t,
        None => f.f64_opt("rope_theta")?.unwrap_or(10000.0),
    };
    if theta <= 1.0 {
        return Err(ForgeError::Config(format!("config.json: rope_theta must be > 1, got {theta}")));
    }
    let partial = f.f64_opt("partial_rotary_factor")?.unwrap_or(1.0);
    if partial != 1.0 {
        return Err(ForgeError::Config(format!(
            "config.json: partial_rotary_factor {partial} is not supported (only 1.0)"
        )));
    }
    let scaling = match scaling_obj {
        None => RopeScaling::Default,
        Some(m) => {
            let s = Fields { map: m, what: "rope scaling" };
            let kind = match s.str_opt("rope_type")? {
                Some(k) => k,
                None => s.str_opt("type")?.unwrap_or("default"),
            };
            let factor = || -> Result<f64> {
                let v = s
                    .f64_opt("factor")?
                    .ok_or_else(|| ForgeError::Config(format!("rope scaling `{kind}` needs `factor`")))?;
                if v <= 0.0 {
                    return Err(ForgeError::Config(format!("rope scaling `{kind}`: factor must be positive, got {v}")));
                }
                Ok(v)
            };
            // A top-level original_max_position_embeddings wins over the scaling dict's
            // (standardize_rope_params in modeling_rope_utils.py).
            let original = || -> Result<f64> {
                if let Some(v) = f.f64_opt("original_max_position_embeddings")? {
                    return Ok(v);
                }
                match s.f64_opt("original_max_position_embeddings")? {
                    Some(v) => Ok(v),
                    None => f.f64_opt("max_position_embeddings")?.ok_or_else(|| {
                        ForgeError::Config(format!("rope scaling `{kind}` needs original_max_position_embeddings"))
                    }),
                }
            };
            match kind {
                "default" => RopeScaling::Default,
                "linear" => RopeScaling::Linear { factor: factor()? },
                "llama3" => {
                    let low = s.f64_opt("low_freq_factor")?.unwrap_or(1.0);
                    let high = s.f64_opt("high_freq_factor")?.unwrap_or(4.0);
                    if !(high > low && low > 0.0) {
                        return Err(ForgeError::Config(format!(
                            "rope scaling llama3: need high_freq_factor > low_freq_factor > 0, got {high} and {low}"
                        )));
                    }
                    RopeScaling::Llama3 {
                        factor: factor()?,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_position_embeddings: original()?,
                    }
                }
                "yarn" => RopeScaling::Yarn {
                    // DeepSeek-V3 style configs may omit `factor`: then it is
                    // max_position_embeddings / original (modeling_rope_utils.py).
                    factor: match s.f64_opt("factor")? {
                        Some(_) => factor()?,
                        None => {
                            let max = f.f64_opt("max_position_embeddings")?.ok_or_else(|| {
                                ForgeError::Config("rope scaling yarn needs factor or max_position_embeddings".into())
                            })?;
                            max / original()?
                        }
                    },
                    original_max_position_embeddings: original()?,
                    beta_fast: s.f64_opt("beta_fast")?.unwrap_or(32.0),
                    beta_slow: s.f64_opt("beta_slow")?.unwrap_or(1.0),
                    attention_factor: s.f64_opt("attention_factor")?,
                    mscale: s.f64_opt("mscale")?,
                    mscale_all_dim: s.f64_opt("mscale_all_dim")?,
                    truncate: s.bool_or("truncate", true)?,
                },
                other => {
                    return Err(ForgeError::Config(format!(
                        "rope scaling `{other}` is not supported (default, linear, llama3, yarn)"
                    )))
                }
            }
        }
    };
    Ok(RopeConfig { theta, rotary_dim: head_dim, scaling })
}

/// Per-layer sliding windows, as transformers v5 applies them: Mistral and Mixtral mask every
/// layer with `sliding_window` (their models ignore `layer_types`); Qwen3-MoE every layer when
/// `use_sliding_window`; Qwen2/Qwen3 (`use_sliding_window` only) the layers `layer_types`
/// marks `sliding_attention`, by default those from `max_window_layers` on
/// (configuration_qwen2.py / configuration_qwen3.py).
fn sliding_windows(f: &Fields<'_>, arch: Arch, num_layers: usize) -> Result<Vec<Option<usize>>> {
    let window = f.usize_opt("sliding_window")?.filter(|&w| w > 0);
    let qwen_window = if f.bool_or("use_sliding_window", false)? { window } else { None };
    Ok(match arch {
        Arch::Llama => vec![None; num_layers],
        Arch::Mistral | Arch::Mixtral => vec![window; num_layers],
        Arch::Qwen3Moe => vec![qwen_window; num_layers],
        Arch::Qwen2 | Arch::Qwen3 => match (qwen_window, f.present("layer_types")) {
            (None, _) => vec![None; num_layers],
            (Some(_), Some(Value::Array(types))) => {
                if types.len() != num_layers {
                    return Err(ForgeError::Config(format!(
                        "config.json: layer_types has {} entries for {num_layers} layers",
                        types.len()
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("full_attention") => Ok(None),
                        Some("sliding_attention") => Ok(qwen_window),
                        _ => Err(f.bad("layer_types", "full_attention or sliding_attention entries", t)),
                    })
                    .collect::<Result<_>>()?
            }
            (Some(_), Some(v)) => return Err(f.bad("layer_types", "a list", v)),
            (Some(_), None) => {
                let from = f.usize_opt("max_window_layers")?.unwrap_or(28);
                (0..num_layers).map(|i| if i >= from { qwen_window } else { None }).collect()
            }
        },
    })
}
