//! What the serving runtimes need from a checkpoint, checked at write time.
//!
//! The constraints are vLLM 0.33.0's (CUDA), read from its sources (`docs/formats.md` links
//! them): compressed-tensors checkpoints go through `CompressedTensorsWNA16` and
//! `choose_mp_linear_kernel` (Marlin, Machete, Triton W4A16, Exllama, optional Humming), GPTQ
//! checkpoints through `AutoGPTQConfig` (Marlin). Tensor parallelism adds one more rule that
//! depends on the launch, not the checkpoint: each rank's slice of a row-parallel layer must
//! hold whole groups.

use super::{CheckpointFormat, QuantSettings};
use crate::{ForgeError, Result};
use std::collections::BTreeMap;
use std::fmt;

/// A Linear of the model being written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearShape {
    /// Module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// `out_features` (rows).
    pub out_features: usize,
    /// `in_features` (columns).
    pub in_features: usize,
    /// Whether it is quantized (false: in the `ignore` list, stored dense).
    pub quantized: bool,
}

/// Which runtime a constraint belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// vLLM 0.33.0 on CUDA.
    Vllm,
    /// 4Bit Forge's own runtime kernel.
    Forge,
}

/// How bad a violated constraint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Loads, but slower (e.g. padding on every forward).
    Degraded,
    /// Loads only on some hardware or with an optional kernel package.
    Conditional,
    /// The runtime refuses to load it.
    Blocking,
}

/// One violated runtime constraint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeIssue {
    /// The runtime.
    pub runtime: Runtime,
    /// How bad it is.
    pub severity: Severity,
    /// The module concerned (None: the whole checkpoint).
    pub module: Option<String>,
    /// The constraint, named as the runtime's source names it, and what breaks.
    pub constraint: String,
}

impl fmt::Display for RuntimeIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rt = match self.runtime {
            Runtime::Vllm => "vLLM",
            Runtime::Forge => "4Bit Forge",
        };
        let sev = match self.severity {
            Severity::Degraded => "slower",
            Severity::Conditional => "conditional",
            Severity::Blocking => "will not load",
        };
        match &self.module {
            Some(m) => write!(f, "{rt} ({sev}) {m}: {}", self.constraint),
            None => write!(f, "{rt} ({sev}): {}", self.constraint),
        }
    }
}

/// Marlin's group sizes (`MARLIN_SUPPORTED_GROUP_SIZES`; −1 = per-channel).
const MARLIN_GROUP_SIZES: [i64; 4] = [-1, 32, 64, 128];
/// vLLM fuses these sibling projections into one layer (`packed_modules_mapping`).
const FUSED: [(&str, &[&str]); 2] =
    [("qkv_proj", &["q_proj", "k_proj", "v_proj"]), ("gate_up_proj", &["gate_proj", "up_proj"])];

/// Checks `settings` and the model's Linears against what vLLM 0.33.0 loads, returning every
/// violated constraint (empty: loads everywhere Marlin runs, i.e. CUDA sm75+).
pub fn check_runtime_support(settings: &QuantSettings, linears: &[LinearShape]) -> Vec<RuntimeIssue> {
    let mut issues = Vec::new();
    let mut push = |severity, module: Option<&str>, constraint: String| {
        issues.push(RuntimeIssue { runtime: Runtime::Vllm, severity, module: module.map(str::to_string), constraint })
    };
    let gs = settings.group_size.map_or(-1i64, |g| g as i64);
    let bits = settings.bits;
    match settings.format {
        CheckpointFormat::Qmeta4Native => {
            issues.push(RuntimeIssue {
                runtime: Runtime::Forge,
                severity: Severity::Conditional,
                module: None,
                constraint:
                    "qmeta4-native checkpoints are read only by 4Bit Forge's runtime; vLLM and transformers do \
                             not know the format (write compressed-tensors for them)"
                        .into(),
            });
            return issues;
        }
        CheckpointFormat::Gptq | CheckpointFormat::GptqV2 => {
            if !matches!(bits, 4 | 8) || !settings.symmetric {
                push(
                    Severity::Blocking,
                    None,
                    format!(
                        "AutoGPTQConfig.TYPE_MAP has only symmetric 4- and 8-bit GPTQ (uint4b8, uint8b128); \
                         {bits}-bit {} is refused (\"Unsupported quantization config\"); write compressed-tensors",
                        if settings.symmetric { "symmetric" } else { "asymmetric" }
                    ),
                );
            }
            if !MARLIN_GROUP_SIZES.contains(&gs) {
                push(
                    Severity::Blocking,
                    None,
                    format!("verify_marlin_supported: group_size {gs} is not in MARLIN_SUPPORTED_GROUP_SIZES {MARLIN_GROUP_SIZES:?}"),
                );
            }
        }
        CheckpointFormat::CompressedTensors => {
            let kernel_types = match (settings.symmetric, bits) {
                (true, 4 | 8) | (false, 4) => None,
                (false, 8) => Some(
                    "asymmetric 8-bit (uint8) runs only on Machete, i.e. Hopper (sm90); Marlin has no uint8 with zero \
                     points, so other GPUs find no kernel"
                        .to_string(),
                ),
                _ => Some(format!(
                    "CompressedTensorsWNA16 accepts {bits}-bit, but Marlin/Machete run only 4- and 8-bit: without the \
                     optional `humming` kernel package choose_mp_linear_kernel finds no kernel"
                )),
            };
            if let Some(c) = kernel_types {
                push(Severity::Conditional, None, c);
            }
            if !MARLIN_GROUP_SIZES.contains(&gs) {
                let c = if bits == 4 && gs == 256 {
                    format!("group_size {gs} is not in MARLIN_SUPPORTED_GROUP_SIZES {MARLIN_GROUP_SIZES:?}; only the slower Triton W4A16 kernel (or `humming`) runs it")
                } else {
                    format!("group_size {gs} is not in MARLIN_SUPPORTED_GROUP_SIZES {MARLIN_GROUP_SIZES:?} (Machete: -1, 64, 128); only the optional `humming` kernel runs it")
                };
                push(Severity::Conditional, None, c);
            }
        }
    }

    // Per module (fused siblings are checked as the one layer vLLM builds).
    let mut fused: BTreeMap<(String, &str), Vec<&LinearShape>> = BTreeMap::new();
    for lin in linears {
        let leaf = lin.name.rsplit('.').next().unwrap_or(&lin.name);
        let prefix = lin.name.strip_suffix(leaf).unwrap_or("").to_string();
        match FUSED.iter().find(|(_, parts)| parts.contains(&leaf)) {
            Some((name, _)) => fused.entry((prefix, name)).or_default().push(lin),
            None => {
                if lin.quantized {
                    check_shape(&mut push, settings, &lin.name, lin.out_features, lin.in_features);
                }
            }
        }
    }
    for ((prefix, name), parts) in &fused {
        let fused_name = format!("{prefix}{name}");
        let quantized: Vec<&str> = parts.iter().filter(|l| l.quantized).map(|l| l.name.as_str()).collect();
        if !quantized.is_empty() && quantized.len() != parts.len() {
            let ignored: Vec<&str> = parts.iter().filter(|l| !l.quantized).map(|l| l.name.as_str()).collect();
            push(
                Severity::Blocking,
                Some(&fused_name),
                format!(
                    "vLLM fuses {} into one layer and requires all shards to use the same scheme (\"Found different \
                     quantization schemes for the shards\"); quantized: {quantized:?}, unquantized: {ignored:?}",
                    parts.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
                ),
            );
            continue;
        }
        if quantized.is_empty() {
            continue;
        }
        let ins: Vec<usize> = parts.iter().map(|l| l.in_features).collect();
        if ins.windows(2).any(|w| w[0] != w[1]) {
            push(Severity::Blocking, Some(&fused_name), format!("fused shards have different in_features {ins:?}"));
            continue;
        }
        for lin in parts {
            check_group_divides(&mut push, settings, &lin.name, lin.in_features);
        }
        let out: usize = parts.iter().map(|l| l.out_features).sum();
        check_tile(&mut push, settings, &fused_name, out, ins.first().copied().unwrap_or(0));
    }
    issues
}

/// Fails with a [`ForgeError::Format`] listing the blocking issues, if any.
pub fn require_loadable(issues: &[RuntimeIssue]) -> Result<()> {
    let blocking: Vec<String> =
        issues.iter().filter(|i| i.severity == Severity::Blocking).map(|i| i.to_string()).collect();
    if blocking.is_empty() {
        Ok(())
    } else {
        Err(ForgeError::Format(format!("the checkpoint would not load: {}", blocking.join("; "))))
    }
}

fn check_shape(
    push: &mut impl FnMut(Severity, Option<&str>, String),
    s: &QuantSettings,
    name: &str,
    out: usize,
    inp: usize,
) {
    check_group_divides(push, s, name, inp);
    check_tile(push, s, name, out, inp);
}

fn check_group_divides(
    push: &mut impl FnMut(Severity, Option<&str>, String),
    s: &QuantSettings,
    name: &str,
    inp: usize,
) {
    if let Some(gs) = s.group_size {
        if gs > 0 && !inp.is_multiple_of(gs) {
            push(
                Severity::Blocking,
                Some(name),
                format!(
                    "in_features {inp} is not a multiple of group_size {gs}: vLLM sizes scales as \
                     input_size // group_size and Marlin requires whole groups"
                ),
            );
        }
    }
}

fn check_tile(
    push: &mut impl FnMut(Severity, Option<&str>, String),
    s: &QuantSettings,
    name: &str,
    out: usize,
    inp: usize,
) {
    // marlin_padded_nk: Marlin runs (n % 64, k % 128) or (n % 128, k % 64) tiles; other
    // shapes are zero-padded at load and the activations padded on every forward.
    let fits =
        (out.is_multiple_of(64) && inp.is_multiple_of(128)) || (out.is_multiple_of(128) && inp.is_multiple_of(64));
    if !fits && s.format != CheckpointFormat::Qmeta4Native {
        push(
            Severity::Degraded,
            Some(name),
            format!(
                "{out}×{inp} (out×in) fits neither Marlin tile family (n%64, k%128) nor (n%128, k%64): vLLM pads it \
                 (marlin_padded_nk) and pads activations on every forward"
            ),
        );
    }
}
