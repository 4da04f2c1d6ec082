//! `forge`: quantize a whole Hugging Face checkpoint with 4Bit Forge.
//!
//! ```text
//! forge quantize                                   # built-in demo model, quantized; prints where
//! forge quantize MODEL_DIR -o OUT_DIR              # W4 g128 RTN → compressed-tensors
//! forge quantize MODEL_DIR --method gptq --hessians HESS_DIR --act-order
//! forge inspect MODEL_DIR                          # what would happen, sizes, time estimate
//! forge demo --moe -o DIR                          # write a generated checkpoint
//! ```

use clap::{Args, Parser, Subcommand, ValueEnum};
use fourbit_forge::calib::data::{calibration_samples, load_tokenizer, read_documents, CalibSamples, CalibSettings};
use fourbit_forge::calib::model::{
    calibrate, CalibrationJob, ExpertCoverage, HiddenPlacement, InputGroup, Method as SequentialMethod, ModelConfig,
    Propagation, SequentialConfig,
};
use fourbit_forge::checkpoint::budget::{
    check_gpu_budget, check_host_budget, default_gpu_budget, estimate_memory, CPU_WINDOW, GPU_WINDOW,
};
use fourbit_forge::checkpoint::demo::{
    write_deepseek_demo, write_demo_hessians, write_llama_demo, DeepSeekDemo, LlamaDemo,
};
use fourbit_forge::checkpoint::format::{dtype_name, ScaleDtype};
use fourbit_forge::checkpoint::memory::{default_budget, human_bytes, parse_size, peak_rss};
use fourbit_forge::checkpoint::output::{check_target, ItemStats};
use fourbit_forge::checkpoint::plan::Item;
use fourbit_forge::checkpoint::run::{estimate_seconds, layer_rows, SUMMARY_FILE};
use fourbit_forge::checkpoint::select::TensorKind;
use fourbit_forge::checkpoint::{
    build_plan, quantize_checkpoint, GptqSettings, JobSettings, Method, ModelDir, Observer, Plan, RunOptions,
};
use fourbit_forge::hessian::PreStepConfig;
use fourbit_forge::{Backend, GridConfig, MseSearch, ScaleSearch, ShrinkCandidates};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Quantize Hugging Face checkpoints to 2–8-bit weights with GPTQ or round-to-nearest (4Bit Forge).
#[derive(Parser, Debug)]
#[command(name = "forge", version, about, allow_negative_numbers = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Quantize a model directory (without one: a built-in demo model).
    Quantize(QuantizeArgs),
    /// Show what a model holds and what quantizing it would do.
    Inspect(InspectArgs),
    /// Write a generated demo checkpoint (Llama-shaped, or DeepSeek-shaped FP8 MoE).
    Demo(DemoArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ScaleDtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum MethodArg {
    /// Round to nearest on the grid (data-free).
    Rtn,
    /// GPTQ with Hessians from --hessians.
    Gptq,
}

/// What decides the output.
#[derive(Args, Debug, Clone)]
struct QuantOpts {
    /// rtn (data-free) or gptq (needs --hessians).
    #[arg(long, value_enum, default_value_t = MethodArg::Rtn)]
    method: MethodArg,
    /// Bits per weight (2..=8).
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Input columns per group (a multiple of 32 in 32..=1024).
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Asymmetric grid (a zero point per group).
    #[arg(long)]
    asym: bool,
    /// MSE / Lᵖ scale search instead of absmax.
    #[arg(long)]
    mse: bool,
    /// Loss exponent of the MSE search.
    #[arg(long, default_value_t = 2.4, requires = "mse")]
    norm: f32,
    /// Shrink factors tried by the MSE search, linspace(1, max_shrink, grid_points).
    #[arg(long, default_value_t = 100, requires = "mse")]
    grid_points: usize,
    /// Smallest shrink factor tried.
    #[arg(long, default_value_t = 0.2, requires = "mse")]
    max_shrink: f32,
    /// Directory of <module>.safetensors Hessian files (tensor `hessian`, in×in); fused
    /// modules (q/k/v, gate/up) may share the first member's file.
    #[arg(long, value_name = "DIR")]
    hessians: Option<PathBuf>,
    /// GPTQ damping relative to mean(diag H).
    #[arg(long, default_value_t = 0.01)]
    damp: f32,
    /// GPTQ act-order (columns by decreasing diag H; the stored layout is unchanged).
    #[arg(long)]
    act_order: bool,
    /// GPTQ: quantize a module without a Hessian file by round-to-nearest instead of failing.
    #[arg(long)]
    allow_missing_hessians: bool,
    /// Only quantize Linear weights matching this glob (`*` any run, `?` one character;
    /// matched against the tensor and module name). Repeatable.
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,
    /// Keep Linear weights matching this glob in full precision (fused partners too). Repeatable.
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Output format: compressed-tensors (pack-quantized; vLLM, transformers), gptq,
    /// gptq_v2, or qmeta4 (4Bit Forge's own runtime).
    #[arg(long, default_value = "compressed-tensors")]
    format: String,
    /// dtype the scales are stored in (default: bf16 for compressed-tensors, f16 for GPTQ,
    /// f32 for qmeta4). Round-to-nearest and GPTQ quantize against the stored scale, so the
    /// checkpoint dequantizes exactly to their result.
    #[arg(long, value_enum)]
    scale_dtype: Option<ScaleDtypeArg>,
    /// Largest output shard (e.g. 5GB, 500MB, 2GiB).
    #[arg(long, default_value = "5GB", value_parser = size_arg)]
    max_shard_size: u64,
    /// Run on the CPU even if a GPU is usable.
    #[arg(long)]
    cpu: bool,
}

#[derive(Args, Debug)]
struct QuantizeArgs {
    /// Hugging Face model directory (config.json + safetensors). Without it, a small demo
    /// model is generated in a temporary directory and quantized.
    model: Option<PathBuf>,
    /// Output directory (must not exist, or be empty). Default: <model>-W<bits>A16 beside the model.
    #[arg(short, long, value_name = "DIR")]
    output: Option<PathBuf>,
    #[command(flatten)]
    quant: QuantOpts,
    /// Continue an interrupted run from its partial output (refused if input or settings changed).
    #[arg(long)]
    resume: bool,
    /// Plan and report, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Host-memory budget (default: half of MemAvailable).
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    max_host_memory: Option<u64>,
    /// GPU-memory budget for the device engine's buffers (default: the device's free memory).
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    max_gpu_memory: Option<u64>,
    #[command(flatten)]
    calib: CalibOpts,
}

/// GPTQ calibrated from text.
#[derive(Args, Debug, Clone)]
struct CalibOpts {
    /// GPTQ from text: a calibration file (plain text, or JSONL with a "text" field per line),
    /// tokenized with the model's tokenizer.json. The model runs on it one decoder layer at a
    /// time (on the GPU with bf16 Linears, or the f32 CPU forward with --backend cpu), each
    /// Linear's Hessian is collected from its inputs, and each layer's quantized outputs feed
    /// the next. Needs --method gptq; replaces --hessians.
    #[arg(long, value_name = "FILE", conflicts_with = "hessians")]
    calib: Option<PathBuf>,
    /// Calibration samples (windows of the token stream; no padding).
    #[arg(long, default_value_t = 128, requires = "calib")]
    calib_samples: usize,
    /// Tokens per calibration sample (BOS included).
    #[arg(long, default_value_t = 2048, requires = "calib")]
    seq_len: usize,
    /// Feed each layer the full-precision outputs of the previous one (default: its
    /// quantized outputs, as GPTQModel, llm-compressor and MoE-Quant do).
    #[arg(long, requires = "calib")]
    full_precision_propagation: bool,
    /// MoE experts that fewer than --expert-min-tokens calibration tokens are routed to:
    /// all-tokens (GPTQ with a Hessian from every token's expert input; only routed tokens
    /// still shape the layer's output) or rtn (round-to-nearest, flagged).
    #[arg(long, value_enum, default_value_t = CoverageArg::AllTokens, requires = "calib")]
    expert_coverage: CoverageArg,
    /// The threshold of --expert-coverage (1: experts no token reached).
    #[arg(long, default_value_t = 1, requires = "calib")]
    expert_min_tokens: u64,
    /// Where the calibration's hidden states wait between layers on a GPU: on the device
    /// (fastest), in page-locked host memory streamed through the device (for calibration
    /// sets the device cannot hold; same results bit for bit), or auto (the device when they
    /// take at most half its free memory). A run may resume with another choice.
    #[arg(long, value_enum, default_value_t = PlacementArg::Auto, requires = "calib")]
    hidden_states: PlacementArg,
    /// Save the next layer's inputs for --resume after the first layer that ends this many
    /// minutes after the last save (0: after every layer). Saving costs a download and a
    /// write of every hidden state (4 GiB per layer at 128 × 2048 tokens of a 4096-wide
    /// model); a crash loses at most this much work.
    #[arg(long, default_value_t = 10.0, requires = "calib")]
    calib_checkpoint_minutes: f64,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum PlacementArg {
    /// The device when they fit in half its free memory, else host.
    Auto,
    /// On the device.
    Device,
    /// In page-locked host memory, streamed.
    Host,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum CoverageArg {
    /// Calibrate the expert on all tokens.
    AllTokens,
    /// Round-to-nearest.
    Rtn,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// Hugging Face model directory.
    model: PathBuf,
    #[command(flatten)]
    quant: QuantOpts,
    /// Skip the time estimate (which quantizes a small layer to measure).
    #[arg(long)]
    no_estimate: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Where to write the model (must not exist, or be empty).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// DeepSeek-V3-shaped MoE with block-scaled FP8 weights instead of the Llama-shaped one.
    #[arg(long)]
    moe: bool,
    /// Also write GPTQ Hessian files for every Linear into this directory.
    #[arg(long, value_name = "DIR")]
    hessians: Option<PathBuf>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Decoder layers (default 4 dense, 2 MoE).
    #[arg(long)]
    layers: Option<usize>,
    /// hidden_size (default 256); heads of 64 (128 from 1024 up).
    #[arg(long)]
    hidden: Option<usize>,
    /// intermediate_size (MoE: of the dense layer; experts get a third).
    #[arg(long)]
    intermediate: Option<usize>,
    /// Routed experts (MoE).
    #[arg(long)]
    experts: Option<usize>,
    /// vocab_size.
    #[arg(long)]
    vocab: Option<usize>,
    /// Approximate shard size, e.g. 2GB.
    #[arg(long, value_parser = size_arg)]
    shard_size: Option<u64>,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("{s:?} is not a size (examples: 5GB, 500MB, 2GiB, 1000000)"))
}

/// What `main` prints on failure: the message, then causes it does not already contain.
struct CliError(Box<dyn std::error::Error>);

impl std::fmt::Debug for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        write!(f, "{shown}")?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let msg = c.to_string();
            if !shown.contains(&msg) {
                write!(f, "\n  caused by: {msg}")?;
                shown = msg;
            }
            cause = c.source();
        }
        Ok(())
    }
}

impl<E: std::error::Error + 'static> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(Box::new(e))
    }
}

fn usage(msg: String) -> CliError {
    CliError(msg.into())
}

fn main() -> Result<(), CliError> {
    match Cli::parse().command {
        Command::Quantize(a) => quantize(a),
        Command::Inspect(a) => inspect(a),
        Command::Demo(a) => demo(a),
    }
}

impl QuantOpts {
    fn settings(&self) -> Result<JobSettings, CliError> {
        self.settings_with(None)
    }

    /// [`QuantOpts::settings`]; with `calibrated`, GPTQ reads the Hessians a calibration run
    /// writes into that directory (which need not exist yet).
    fn settings_with(&self, calibrated: Option<&Path>) -> Result<JobSettings, CliError> {
        let grid = GridConfig {
            group_size: self.group_size,
            bits: self.bits,
            symmetric: !self.asym,
            scale_search: if self.mse {
                ScaleSearch::Mse(MseSearch {
                    candidates: ShrinkCandidates::Linspace { max_shrink: self.max_shrink, n_grid: self.grid_points },
                    norm: self.norm,
                })
            } else {
                ScaleSearch::Absmax
            },
            // The plan replaces it with the format's scale dtype (`Plan::grid_config`).
            ..GridConfig::default()
        };
        grid.validate(1, 1)?;
        let hessians = calibrated.map(Path::to_path_buf).or_else(|| self.hessians.clone());
        let method = match (self.method, &hessians) {
            (MethodArg::Rtn, None) => Method::Rtn,
            (MethodArg::Rtn, Some(_)) => {
                return Err(usage("--hessians is for --method gptq (rtn is data-free)".into()));
            }
            (MethodArg::Gptq, None) => {
                return Err(usage(
                    "--method gptq needs --hessians DIR (one <module>.safetensors per Linear) or --calib FILE (text)"
                        .into(),
                ));
            }
            (MethodArg::Gptq, Some(dir)) => {
                if calibrated.is_none() && !dir.is_dir() {
                    return Err(usage(format!("--hessians {} is not a directory", dir.display())));
                }
                if !(self.damp.is_finite() && self.damp >= 0.0) {
                    return Err(usage(format!("--damp must be finite and >= 0, got {}", self.damp)));
                }
                Method::Gptq(GptqSettings {
                    hessians: dir.clone(),
                    pre_step: PreStepConfig {
                        rel_damp: self.damp,
                        act_order: self.act_order,
                        ..PreStepConfig::default()
                    },
                    allow_missing: self.allow_missing_hessians,
                })
            }
        };
        if matches!(method, Method::Rtn) && (self.act_order || self.allow_missing_hessians) {
            return Err(usage("--act-order and --allow-missing-hessians are GPTQ options (--method gptq)".into()));
        }
        Ok(JobSettings {
            grid,
            method,
            format: self.format.clone(),
            scale_dtype: self.scale_dtype.map(|d| match d {
                ScaleDtypeArg::F32 => ScaleDtype::F32,
                ScaleDtypeArg::F16 => ScaleDtype::F16,
                ScaleDtypeArg::Bf16 => ScaleDtype::BF16,
            }),
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            max_shard_size: self.max_shard_size,
            calibration: None,
        })
    }

    fn backend(&self) -> (Backend, String) {
        if self.cpu {
            return (Backend::Cpu, "CPU reference (--cpu)".into());
        }
        match Backend::auto() {
            (Backend::Gpu(dev), _) => {
                let name = dev.name().to_string();
                (Backend::Gpu(dev), format!("GPU {name}"))
            }
            (cpu, reason) => (cpu, format!("CPU (no GPU: {})", reason.unwrap_or_else(|| "unknown".into()))),
        }
    }

    fn describe(&self, plan: &Plan) -> String {
        format!(
            "W{} g{} {} {}, {}, {} with {} scales",
            self.bits,
            self.group_size,
            if self.asym { "asym" } else { "sym" },
            if self.mse { "mse" } else { "absmax" },
            match self.method {
                MethodArg::Rtn => "rtn".to_string(),
                MethodArg::Gptq =>
                    format!("gptq (damp {}{})", self.damp, if self.act_order { ", act-order" } else { "" }),
            },
            plan.format.id(),
            dtype_name(plan.format.scale_dtype())
        )
    }
}

fn quantize(a: QuantizeArgs) -> Result<(), CliError> {
    if a.calib.calib.is_some() && !matches!(a.quant.method, MethodArg::Gptq) {
        return Err(usage("--calib collects GPTQ Hessians: add --method gptq".into()));
    }
    let (model_dir, output) = match &a.model {
        Some(m) => {
            let out = a.output.clone().unwrap_or_else(|| default_output(m, a.quant.bits));
            (m.clone(), out)
        }
        None => {
            let base = std::env::temp_dir().join(format!("forge-demo-{}", std::process::id()));
            let model = base.join("llama-demo");
            println!(
                "no model given: generating the built-in demo model (Llama-shaped, 4 layers, BF16, sharded) in {}",
                model.display()
            );
            write_llama_demo(&model, &LlamaDemo::default())?;
            let out = a.output.clone().unwrap_or_else(|| base.join(format!("llama-demo-W{}A16", a.quant.bits)));
            (model, out)
        }
    };
    if same_path(&model_dir, &output) {
        return Err(usage(format!("the output {} is the model directory itself", output.display())));
    }
    // A calibration run keeps its state (Hessians, hidden states for resume) beside the output.
    let calib_state = a.calib.calib.as_ref().map(|_| calibration_state_dir(&output));
    let mut settings = a.quant.settings_with(calib_state.as_ref().map(|s| s.join("hessians")).as_deref())?;
    if let (Some(_), Method::Gptq(g)) = (&calib_state, &mut settings.method) {
        // Planned before the calibration has written the Hessians (re-planned after it).
        g.allow_missing = true;
    }
    let model = ModelDir::open(&model_dir)?;
    let mut plan = build_plan(&model, &settings)?;
    print_model_line(&model);
    print_plan(&model, &plan, &a.quant);
    let (backend, bname) = a.quant.backend();
    let budget = a.max_host_memory.unwrap_or_else(default_budget);
    let est = estimate_memory(&model, &plan, matches!(backend, Backend::Gpu(_)));
    let window = if matches!(backend, Backend::Gpu(_)) {
        format!(
            "{GPU_WINDOW} quantization steps in flight from {}, engine staging {}",
            est.host_step,
            human_bytes(est.pinned)
        )
    } else {
        format!("{CPU_WINDOW} steps in flight from {}", est.host_step)
    };
    println!(
        "host memory: budget {} (--max-host-memory), estimated peak ≈ {} ({window})",
        human_bytes(budget),
        human_bytes(est.host)
    );
    check_host_budget(&est, budget)?;
    if let Backend::Gpu(dev) = &backend {
        let gpu_budget = match a.max_gpu_memory {
            Some(b) => b,
            None => default_gpu_budget(dev)?,
        };
        let need = check_gpu_budget(&model, &plan, gpu_budget)?;
        println!(
            "GPU memory: budget {} (--max-gpu-memory; default: free now), device engine ≈ {}",
            human_bytes(gpu_budget),
            human_bytes(need)
        );
    }
    let samples = match &a.calib.calib {
        Some(file) => Some(calibration_samples_for(&model_dir, file, &a.calib)?),
        None => None,
    };
    if a.dry_run {
        check_target(&output)?;
        println!("dry run: nothing written (output would be {})", output.display());
        return Ok(());
    }
    println!("backend: {bname}");
    if let (Some(samples), Some(state), Some(file)) = (&samples, &calib_state, &a.calib.calib) {
        let propagation =
            if a.calib.full_precision_propagation { Propagation::FullPrecision } else { Propagation::Quantized };
        let Method::Gptq(g) = &settings.method else {
            return Err(usage("--calib collects GPTQ Hessians: add --method gptq".into()));
        };
        let job = CalibrationJob {
            model_dir: &model_dir,
            samples,
            // The checkpoint's grid (its stored scale dtype): the propagation quantizes exactly
            // as the run below will.
            settings: SequentialConfig {
                grid: plan.grid_config(),
                pre_step: g.pre_step.clone(),
                method: SequentialMethod::Gptq,
                propagation,
                expert_coverage: match a.calib.expert_coverage {
                    CoverageArg::AllTokens => ExpertCoverage::AllTokens { min_tokens: a.calib.expert_min_tokens },
                    CoverageArg::Rtn => ExpertCoverage::RoundToNearest { min_tokens: a.calib.expert_min_tokens },
                },
            },
            backend: backend.clone(),
            state: state.clone(),
            resume: a.resume,
            hidden_placement: match a.calib.hidden_states {
                PlacementArg::Auto => HiddenPlacement::Auto,
                PlacementArg::Device => HiddenPlacement::Device,
                PlacementArg::Host => HiddenPlacement::Host { max_batch_tokens: 0 },
            },
            checkpoint_every: std::time::Duration::try_from_secs_f64(60.0 * a.calib.calib_checkpoint_minutes)
                .map_err(|_| usage("--calib-checkpoint-minutes must be a non-negative number".into()))?,
            fail_after_layers: env_count("FORGE_TEST_CALIB_FAIL_AFTER"),
        };
        let t = Instant::now();
        let report = calibrate(&job, &|done, total| {
            println!("calibration: layer {done}/{total} done ({:.1} s)", t.elapsed().as_secs_f64())
        })
        .map_err(|e| {
            usage(format!(
                "{e}\nthe calibration state stays in {}; rerun with --resume to continue it",
                state.display()
            ))
        })?;
        if report.resumed_at > 0 {
            println!("calibration: resumed at layer {} of {}", report.resumed_at, report.layers);
        }
        let under: Vec<&fourbit_forge::calib::model::GroupReport> = report
            .reports
            .iter()
            .filter(|r| matches!(r.group, InputGroup::ExpertGateUp(_)) && r.tokens < a.calib.expert_min_tokens)
            .collect();
        if !under.is_empty() {
            let how = match a.calib.expert_coverage {
                CoverageArg::AllTokens => "calibrated on all tokens",
                CoverageArg::Rtn => "quantized round-to-nearest (flagged)",
            };
            let names: Vec<String> = under
                .iter()
                .take(8)
                .map(|r| format!("layer {} {:?} ({} tokens)", r.layer, r.group, r.tokens))
                .collect();
            println!(
                "calibration: {} expert(s) under {} routed token(s), {how}: {}{}",
                under.len(),
                a.calib.expert_min_tokens,
                names.join(", "),
                if under.len() > 8 { ", ..." } else { "" }
            );
        }
        settings = a.quant.settings_with(Some(&report.hessians))?;
        settings.calibration = Some(serde_json::json!({
            "file": file.display().to_string(),
            "samples": samples.sequences.len(),
            "seq_len": a.calib.seq_len,
            "documents": samples.documents,
            "stream_tokens": samples.stream_tokens,
            "propagation": match propagation {
                Propagation::Quantized => "quantized",
                Propagation::FullPrecision => "full-precision",
            },
            "expert_coverage": format!("{:?}", a.calib.expert_coverage).to_lowercase(),
            "expert_min_tokens": a.calib.expert_min_tokens,
            "samples_sha256": samples.fingerprint,
            "state_sha256": report.fingerprint,
        }));
        plan = build_plan(&model, &settings)?;
    }
    let mut opts = RunOptions::new(output.clone(), backend);
    // After a crash during calibration there is no partial output to resume yet.
    opts.resume = a.resume
        && (calib_state.is_none()
            || fourbit_forge::checkpoint::output::temp_dir_for(&output).is_ok_and(|p| p.exists()));
    opts.max_host_memory = budget;
    opts.max_gpu_memory = a.max_gpu_memory;
    opts.profile = true;
    opts.fail_after_items = env_count("FORGE_TEST_FAIL_AFTER");
    opts.abort_after_items = env_count("FORGE_TEST_ABORT_AFTER");
    let progress = Progress::new();
    let t = Instant::now();
    let report = quantize_checkpoint(&model, &plan, &opts, &progress);
    progress.bar.finish_and_clear();
    let report = report.map_err(|e| {
        let tmp = fourbit_forge::checkpoint::output::temp_dir_for(&output).ok();
        match tmp.filter(|p| p.exists() && !e.to_string().contains("--resume")) {
            Some(p) => usage(format!(
                "{e}\nthe partial output stays in {} (nothing is at {}); rerun with --resume to continue",
                p.display(),
                output.display()
            )),
            None => CliError(Box::new(e)),
        }
    })?;
    print_summary(&report.items, &plan);
    let rss = report.peak_rss.or_else(peak_rss);
    println!(
        "\nwrote {} ({} in {} file{}) in {:.2} s{}; peak RSS {} (budget {})",
        report.output.display(),
        human_bytes(plan.output_bytes()),
        plan.shards.len(),
        if plan.shards.len() == 1 { "" } else { "s" },
        t.elapsed().as_secs_f64(),
        if report.resumed_items > 0 { format!(", {} steps resumed", report.resumed_items) } else { String::new() },
        rss.map_or("unknown".into(), human_bytes),
        human_bytes(budget)
    );
    if let Some(g) = &report.gpu {
        println!(
            "GPU {}: {} jobs, kernels {:.2} s of {:.2} s wall ({:.0} % busy), {} up / {} down",
            g.device,
            g.jobs,
            g.kernel_ms / 1e3,
            report.seconds,
            100.0 * g.kernel_ms / 1e3 / report.seconds.max(1e-9),
            human_bytes(g.upload_bytes),
            human_bytes(g.download_bytes)
        );
    }
    println!("summary: {}", report.output.join(SUMMARY_FILE).display());
    if let Some(state) = &calib_state {
        // The output is complete: the calibration state is no longer needed.
        let _ = std::fs::remove_dir_all(state);
    }
    Ok(())
}

/// `<output>.calibration`, beside the output directory.
fn calibration_state_dir(output: &Path) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "output".into());
    output.with_file_name(format!("{name}.calibration"))
}

/// The calibration samples of `file` for the model in `model_dir` (its tokenizer and its BOS
/// and EOS ids), with a line saying what they are.
fn calibration_samples_for(model_dir: &Path, file: &Path, c: &CalibOpts) -> Result<CalibSamples, CliError> {
    let config = ModelConfig::from_dir(model_dir)?;
    let tokenizer = load_tokenizer(model_dir)?;
    let documents = read_documents(file)?;
    let settings = CalibSettings {
        samples: c.calib_samples,
        seq_len: c.seq_len,
        bos: config.bos_token_id,
        separator: config.eos_token_id,
    };
    let samples = calibration_samples(&tokenizer, &documents, &settings)?;
    println!(
        "calibration: {} samples × {} tokens from {} ({} documents, {} tokens), {:?}, CPU forward",
        samples.sequences.len(),
        c.seq_len,
        file.display(),
        samples.documents,
        samples.stream_tokens,
        config.arch
    );
    Ok(samples)
}

fn env_count(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn default_output(model: &Path, bits: u32) -> PathBuf {
    let name = model.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    model.with_file_name(format!("{name}-W{bits}A16"))
}

fn same_path(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

fn cfg_num(model: &ModelDir, key: &str) -> Option<u64> {
    model.config.get(key).and_then(|v| v.as_u64())
}

fn print_model_line(model: &ModelDir) {
    let mut parts = vec![model.architecture()];
    if let Some(t) = model.config.get("model_type").and_then(|v| v.as_str()) {
        parts[0] = format!("{} ({t})", parts[0]);
    }
    for (key, label) in [("num_hidden_layers", "layers"), ("hidden_size", "hidden"), ("vocab_size", "vocab")] {
        if let Some(v) = cfg_num(model, key) {
            parts.push(format!("{label} {v}"));
        }
    }
    for key in ["n_routed_experts", "num_local_experts", "num_experts"] {
        if let Some(v) = cfg_num(model, key) {
            parts.push(format!("{v} routed experts"));
        }
    }
    if let Some(v) = cfg_num(model, "n_shared_experts") {
        parts.push(format!("{v} shared"));
    }
    println!("model: {}", model.path.display());
    println!("architecture: {}", parts.join(", "));
    println!(
        "weights: {} safetensors file{}{}, {} tensors, {}",
        model.shards.len(),
        if model.shards.len() == 1 { "" } else { "s" },
        if model.indexed { " (indexed)" } else { "" },
        model.tensors.len(),
        human_bytes(model.total_bytes())
    );
}

fn print_plan(model: &ModelDir, plan: &Plan, q: &QuantOpts) {
    let groups =
        plan.items.iter().filter(|i| matches!(i.work, fourbit_forge::checkpoint::plan::Work::Quantize { .. })).count();
    println!(
        "plan ({}): quantize {} Linear weights in {groups} step{}, keep {} in full precision, {} tensors unchanged",
        q.describe(plan),
        plan.quantized_modules(),
        if groups == 1 { "" } else { "s" },
        plan.kept.len(),
        plan.items.iter().filter(|i| matches!(i.work, fourbit_forge::checkpoint::plan::Work::Copy { .. })).count()
    );
    if !plan.kept.is_empty() {
        println!("kept in full precision (listed in the quantization config's ignore list):");
        for k in plan.kept.iter().take(12) {
            println!("  {}: {}", k.module, k.reason);
        }
        if plan.kept.len() > 12 {
            println!("  ... and {} more", plan.kept.len() - 12);
        }
    }
    let fp8 =
        plan.items.iter().filter(|i| matches!(i.work, fourbit_forge::checkpoint::plan::Work::Fp8ToBf16 { .. })).count();
    if fp8 > 0 {
        println!("{fp8} FP8 block-scaled weight(s) kept in full precision are written as BF16 (dequantized)");
    }
    for issue in &plan.runtime_issues {
        println!("warning: {issue}");
    }
    let before = model.total_bytes();
    let after = plan.total_tensor_bytes();
    println!(
        "size: {} → {} ({:.2}× smaller) in {} shard{} of at most {}",
        human_bytes(before),
        human_bytes(after),
        before as f64 / after.max(1) as f64,
        plan.shards.len(),
        if plan.shards.len() == 1 { "" } else { "s" },
        human_bytes(plan.settings.max_shard_size)
    );
}

fn print_summary(items: &std::collections::BTreeMap<usize, ItemStats>, plan: &Plan) {
    let rows = layer_rows(items);
    let gptq = matches!(plan.settings.method, Method::Gptq(_));
    println!(
        "\n{:<28} {:>9} {:>14} {:>14} {:>14} {:>9}",
        "layer",
        "quantized",
        "mean rel err",
        "max rel err",
        if gptq { "GPTQ loss" } else { "" },
        "time"
    );
    for (layer, n, mean, max, loss, secs) in rows {
        let err = |v: f64| if n > 0 { format!("{v:.3e}") } else { "-".into() };
        println!(
            "{:<28} {:>9} {:>14} {:>14} {:>14} {:>8.2}s",
            layer,
            n,
            err(mean),
            err(max),
            loss.map_or(String::new(), |l| format!("{l:.3e}")),
            secs
        );
    }
    let flagged: Vec<_> = items.values().flat_map(|s| &s.members).filter(|m| !m.flags.is_empty()).collect();
    for m in flagged.iter().take(10) {
        println!("note: {}: {}", m.module, m.flags.join("; "));
    }
    if flagged.len() > 10 {
        println!("note: ... {} more modules with notes in the summary JSON", flagged.len() - 10);
    }
}

/// Progress on stderr (hidden when it is not a terminal).
struct Progress {
    bar: ProgressBar,
    done: AtomicUsize,
    total: AtomicUsize,
}

impl Progress {
    fn new() -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Progress { bar, done: AtomicUsize::new(0), total: AtomicUsize::new(0) }
    }

    fn message(&self, label: &str) {
        let (d, t) = (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed));
        self.bar.set_message(format!("{d}/{t} steps · {label}"));
    }
}

impl Observer for Progress {
    fn started(&self, plan: &Plan, done_items: usize, done_bytes: u64) {
        self.total.store(plan.items.len(), Ordering::Relaxed);
        self.done.store(done_items, Ordering::Relaxed);
        self.bar.set_length(plan.input_bytes());
        self.bar.set_position(done_bytes);
        self.bar.reset_eta();
        self.bar.enable_steady_tick(std::time::Duration::from_millis(200));
    }

    fn item_started(&self, _index: usize, item: &Item) {
        self.message(&item.label);
    }

    fn item_finished(&self, _index: usize, item: &Item, _stats: &ItemStats) {
        self.done.fetch_add(1, Ordering::Relaxed);
        self.bar.inc(item.input_bytes);
    }

    fn note(&self, msg: &str) {
        // Shown with or without a terminal (the bar itself hides when stderr is not one).
        self.bar.suspend(|| println!("{msg}"));
    }
}

fn inspect(a: InspectArgs) -> Result<(), CliError> {
    let settings = a.quant.settings()?;
    let model = ModelDir::open(&a.model)?;
    let plan = build_plan(&model, &settings)?;
    print_model_line(&model);
    println!("\ntensors by kind and dtype:");
    println!("  {:<22} {:<8} {:>7} {:>12}", "kind", "dtype", "count", "bytes");
    for ((kind, dtype), (n, bytes)) in &plan.census {
        println!("  {:<22} {:<8} {:>7} {:>12}", kind.label(), dtype, n, human_bytes(*bytes));
    }
    let linears: usize = plan.census.iter().filter(|((k, _), _)| k.is_linear()).map(|(_, (n, _))| n).sum();
    let routers: usize = plan
        .census
        .iter()
        .filter(|((k, _), _)| matches!(k, TensorKind::Router | TensorKind::RouterBias))
        .map(|(_, (n, _))| n)
        .sum();
    println!("\n{linears} decoder Linear weights; never quantized: embeddings, lm_head, norms, biases, {routers} router tensors");
    print_plan(&model, &plan, &a.quant);
    let examples: Vec<&str> = plan
        .items
        .iter()
        .filter(|i| matches!(i.work, fourbit_forge::checkpoint::plan::Work::Quantize { .. }))
        .take(4)
        .map(|i| i.label.as_str())
        .collect();
    if !examples.is_empty() {
        println!("first quantization steps: {}", examples.join(", "));
    }
    println!("ignore list ({}): {}", plan.ignore.len(), abbreviate(&plan.ignore, 8));
    let (label, peak) = plan.peak_item_memory();
    println!(
        "largest step: ≈ {} of host memory ({label}); default budget {}",
        human_bytes(peak),
        human_bytes(default_budget())
    );
    if !a.no_estimate {
        let (backend, bname) = a.quant.backend();
        let secs = estimate_seconds(&plan, &backend)?;
        println!("estimated time on {bname}: ≈ {} (from a measured 256×1024 layer; copies at 1 GB/s)", fmt_secs(secs));
    }
    Ok(())
}

fn abbreviate(list: &[String], n: usize) -> String {
    if list.len() <= n {
        list.join(", ")
    } else {
        format!("{}, ... ({} more)", list[..n].join(", "), list.len() - n)
    }
}

fn fmt_secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

fn demo(a: DemoArgs) -> Result<(), CliError> {
    check_target(&a.output)?;
    let t = Instant::now();
    if a.moe {
        let mut d = DeepSeekDemo { seed: a.seed.wrapping_add(1), ..DeepSeekDemo::default() };
        d.layers = a.layers.unwrap_or(d.layers);
        d.experts = a.experts.unwrap_or(d.experts);
        d.vocab = a.vocab.unwrap_or(d.vocab);
        d.shard_bytes = a.shard_size.unwrap_or(d.shard_bytes);
        if let Some(h) = a.hidden {
            d.hidden = h;
            d.heads = (h / 128).max(1);
        }
        if let Some(i) = a.intermediate {
            d.intermediate = i;
            d.moe_intermediate = (i / 3).max(1);
        }
        write_deepseek_demo(&a.output, &d)?;
    } else {
        let mut d = LlamaDemo { seed: a.seed, ..LlamaDemo::default() };
        d.layers = a.layers.unwrap_or(d.layers);
        d.vocab = a.vocab.unwrap_or(d.vocab);
        d.intermediate = a.intermediate.unwrap_or(d.intermediate);
        d.shard_bytes = a.shard_size.unwrap_or(d.shard_bytes);
        if let Some(h) = a.hidden {
            d.hidden = h;
            d.heads = if h >= 1024 { (h / 128).max(1) } else { (h / 64).max(1) };
            d.kv_heads = (d.heads / 4).max(1);
        }
        write_llama_demo(&a.output, &d)?;
    }
    let bytes = ModelDir::open(&a.output)?.total_bytes();
    println!(
        "wrote {} demo model to {} ({}, {:.1} s)",
        if a.moe { "a DeepSeek-shaped FP8 MoE" } else { "a Llama-shaped" },
        a.output.display(),
        human_bytes(bytes),
        t.elapsed().as_secs_f64()
    );
    if let Some(h) = &a.hessians {
        write_demo_hessians(&a.output, h, 512, a.seed, true)?;
        println!("wrote GPTQ Hessians to {} (fused modules share the first member's file)", h.display());
    }
    Ok(())
}
