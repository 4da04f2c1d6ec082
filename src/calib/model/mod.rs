//! Model description and the CPU reference forward pass (issue 14): `config.json` → a typed
//! architecture ([`ModelConfig`]), checkpoint names and shared-input groups of every Linear
//! ([`InputGroup`], [`LinearGroup`]), weights by name ([`WeightSource`]), and one decoder
//! layer in f32 ([`DecoderLayer`]) that reports each Linear group's inputs to an
//! [`ActivationSink`] (Hessians: [`HessianSink`]). The full model and the KL check are in
//! [`CpuModel`] and [`next_token_kl`]; the whole sequential pipeline (Hessians per layer,
//! GPTQ or round-to-nearest, quantized propagation) as a CPU reference in
//! [`quantize_model_cpu`]. The GPU forward of a layer is [`GpuLayer`] (cuda.rs).
//!
//! Supported: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Qwen3-MoE, Mixtral. DeepSeek-V3 slots in
//! as a second [`AttentionConfig`] variant (MLA), a new [`RouterKind`] (sigmoid, grouped
//! top-k with the score-correction bias), shared experts in [`MoeConfig`], and the YaRN
//! [`RopeScaling`] that is already here.

mod calibrate;
mod config;
mod cuda;
mod hooks;
mod layer;
#[allow(clippy::module_inception)]
mod model;
mod names;
mod rope;
mod sequential;
mod weights;

pub use calibrate::{calibrate, CalibrationJob, CalibrationReport, STATE_FILE};
pub use config::{
    Arch, AttentionConfig, FfnKind, GqaConfig, LayerSpec, MlpConfig, ModelConfig, MoeConfig, RopeConfig, RopeScaling,
    RouterKind, SUPPORTED_MODEL_TYPES,
};
pub use cuda::{
    DeviceSequences, ForwardPrecision, ForwardWorkspace, GpuHessianSink, GpuLayer, HessianDownload, HessianStaging,
    HiddenPlacement, HiddenStates, HostSequences, HostStaging, LayerBuffers, WeightStaging,
};
pub use hooks::{ActivationSink, HessianSink, RecordingSink, Tee};
pub use layer::{rms_norm, route, DecoderLayer, Ffn, Linear, Routing, SwiGlu};
pub use model::{kl_from_logits, next_token_kl, CpuModel, KlStats};
pub use names::{InputGroup, LayerTensorNames, LinearGroup, LinearRole, LinearSpec};
pub use rope::Rope;
pub use sequential::{
    quantize_model, quantize_model_cpu, sequential_layer, sequential_layer_device, DeviceLayerPass, ExpertCoverage,
    GroupReport, LayerPass, LayerTimings, Method, Propagation, SequentialConfig, SequentialResult,
};
pub use weights::{matrix, vector, MemoryWeights, SafetensorsDir, Substituted, WeightSource};
