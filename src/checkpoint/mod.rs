//! Whole Hugging Face checkpoints: read a model directory memory-mapped, decide what is
//! quantized, and stream it tensor by tensor into a new, resumable, atomically committed
//! model directory in a format runtimes load.
//!
//! * [`st`]: safetensors files — bounded header reads, typed errors, mapped data, and the
//!   header encoder the writer uses.
//! * [`model::ModelDir`]: `config.json`, `model.safetensors` or an index with shards, and
//!   the tokenizer/generation files.
//! * [`fp8`]: block-scaled FP8-E4M3 (DeepSeek-V3 `weight_scale_inv`), CPU reference.
//! * [`select`]: tensor kinds, fused groups (q/k/v, gate/up, w1/w3, q_a/kv_a), globs.
//! * [`format`](mod@format) (issue 12): one quantized Linear (u8 codes + qmeta4 grid) as the tensors of
//!   a checkpoint format and back, and the `quantization_config` that goes with them;
//!   [`writer`] adapts it to the streaming writer (tensor layout known up front).
//! * [`plan::build_plan`]: every step, output tensor, shard and offset fixed up front.
//! * [`run::quantize_checkpoint`]: the streaming engine (a producer quantizing, on a GPU
//!   through the device engine with two jobs in flight, and a writer thread);
//!   [`budget`] the host and GPU memory it needs, checked up front; [`output::OutputDir`]
//!   the temporary directory, manifest and resume.
//! * [`demo`]: deterministic Llama- and DeepSeek-shaped checkpoints for the demo and tests.

pub mod budget;
pub mod demo;
pub mod format;
pub mod fp8;
pub mod memory;
pub mod model;
pub mod output;
mod pipeline;
pub mod plan;
pub mod quant;
pub mod run;
pub mod select;
pub mod st;
pub mod writer;

pub use model::ModelDir;
pub use plan::{build_plan, GptqSettings, JobSettings, Method, Plan};
pub use run::{quantize_checkpoint, GpuRunStats, Observer, RunOptions, RunReport, Silent};
