//! Quantize one linear layer with GPTQ: the job an ML engineer runs.
//!
//! ```text
//! cargo run --release --example quantize_layer                      # synthetic 2048×2048 layer
//! cargo run --release --example quantize_layer -- --rows 4096 --cols 4096 --mse --act-order
//! cargo run --release --example quantize_layer -- \
//!     --weights layer.safetensors --tensor weight --activations inputs --out q.safetensors
//! ```
//!
//! Stages: Hessian `H = 2/n·XᵀX` (from activations, a stored Hessian, or a synthetic
//! calibration set) → pre-step (dead inputs, damping, act-order, `U = chol_upper(H⁻¹)`) →
//! grid (qmeta4 per group of input columns) → GPTQ solve → codes. Round-to-nearest with the
//! same grid is the baseline; both are scored by the relative layer-output error
//! `‖(Q−W)Xᵀ‖²/‖WXᵀ‖²`. The result is written atomically (temp file, then rename) as
//! safetensors: `codes` u8 (rows, cols), `qmeta` u8 (rows, n_groups, 4), `pad` i64 scalar,
//! `perm` i64 (cols) with act-order, `loss` f32 (rows).
//!
//! Without a usable GPU (or with `--cpu`) everything runs on the CPU reference.

use clap::{Parser, ValueEnum};
use fourbit_forge::calib::PreStepRoute;
use fourbit_forge::fsio::prepare_output;
use fourbit_forge::hessian::{asymmetry_warning, pre_step_cpu, PreStepConfig};
use fourbit_forge::quantize::output::{write_layer, LayerOutput};
use fourbit_forge::quantize::{widen, with_engine, HessianInput, LayerJob, PreStepSummary};
use fourbit_forge::solver::{flushed_groups, layer_output_error, round_to_nearest};
use fourbit_forge::weights::{
    load_layer, synthetic_layer, HessianSource, LayerStats, OwnedWeight, MAX_SYNTHETIC_TOKENS,
};
use fourbit_forge::{
    Backend, ForgeError, GridConfig, MseSearch, Quantizer, ScaleDtype, ScaleSearch, ShrinkCandidates, Warning,
    WeightView,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Quantize one nn.Linear layer with GPTQ (4Bit Forge).
/// Scale dtypes `--scale-dtype` accepts.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ScaleDtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Parser, Debug)]
#[command(version, allow_negative_numbers = true)]
struct Args {
    /// safetensors file with the layer's weight (out_features × in_features); without it a
    /// synthetic layer is built.
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Name of the weight tensor in --weights (default: the file's only 2-D tensor other
    /// than the activations / Hessian).
    #[arg(long, value_name = "NAME", requires = "weights")]
    tensor: Option<String>,
    /// Calibration inputs in the same file: (tokens, in_features), or any shape whose last
    /// axis is in_features; H = 2/n·XᵀX is built from them.
    #[arg(long, value_name = "NAME", requires = "weights", conflicts_with = "hessian")]
    activations: Option<String>,
    /// A stored Hessian (in_features × in_features) in the same file.
    #[arg(long, value_name = "NAME", requires = "weights")]
    hessian: Option<String>,
    /// Bits per code (2..=8).
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Input columns per group (a multiple of 32 in 32..=1024).
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Asymmetric range (a zero point per group); symmetric by default.
    #[arg(long)]
    asym: bool,
    /// MSE / Lᵖ scale search instead of absmax.
    #[arg(long)]
    mse: bool,
    /// Loss exponent of the MSE search.
    #[arg(long, default_value_t = 2.4, requires = "mse")]
    norm: f32,
    /// Number of shrink factors tried, linspace(1, max_shrink, grid_points).
    #[arg(long, default_value_t = 100, requires = "mse")]
    grid_points: usize,
    /// Smallest shrink factor tried.
    #[arg(long, default_value_t = 0.2, requires = "mse")]
    max_shrink: f32,
    /// dtype a checkpoint will store the scales in: the MSE search, the solver and the
    /// round-to-nearest baseline all use each scale rounded to it.
    #[arg(long, value_enum, default_value = "f32")]
    scale_dtype: ScaleDtypeArg,
    /// Process input columns in order of decreasing diag(H).
    #[arg(long)]
    act_order: bool,
    /// Damping relative to mean(diag H).
    #[arg(long, default_value_t = 0.01)]
    damp: f32,
    /// Accept a Hessian with negative diagonal entries (not positive semi-definite: no
    /// activations give one) and factor it with raised damping; refused by default.
    #[arg(long)]
    allow_indefinite: bool,
    /// Run on the CPU reference even if a GPU is present.
    #[arg(long)]
    cpu: bool,
    /// Output safetensors file (written atomically).
    #[arg(long, value_name = "FILE", default_value = "quantized.safetensors")]
    out: PathBuf,
    /// Output features of the synthetic layer (on a GPU, larger shapes such as 4096 are fine).
    #[arg(long, default_value_t = 2048, conflicts_with = "weights")]
    rows: usize,
    /// Input features of the synthetic layer.
    #[arg(long, default_value_t = 2048, conflicts_with = "weights")]
    cols: usize,
    /// Calibration tokens of the synthetic layer (default 2·cols).
    #[arg(long, conflicts_with = "weights")]
    tokens: Option<usize>,
    /// Seed of the synthetic layer.
    #[arg(long, default_value_t = 0, conflicts_with = "weights")]
    seed: u64,
}

/// What `main` reports on failure: the error's message, then any cause it does not
/// already quote, one per line (`main` returning `Err` prints it and exits with status 1).
struct CliError(Box<dyn std::error::Error>);

impl CliError {
    /// A usage error (bad combination of options) with its message.
    fn usage(msg: String) -> Self {
        CliError(msg.into())
    }
}

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

type Result<T, E = ForgeError> = std::result::Result<T, E>;

fn main() -> Result<(), CliError> {
    run(Args::parse())
}

fn run(args: Args) -> Result<(), CliError> {
    let config = GridConfig {
        group_size: args.group_size,
        bits: args.bits,
        symmetric: !args.asym,
        scale_search: if args.mse {
            ScaleSearch::Mse(MseSearch {
                candidates: ShrinkCandidates::Linspace { max_shrink: args.max_shrink, n_grid: args.grid_points },
                norm: args.norm,
            })
        } else {
            ScaleSearch::Absmax
        },
        scale_dtype: match args.scale_dtype {
            ScaleDtypeArg::F32 => ScaleDtype::F32,
            ScaleDtypeArg::F16 => ScaleDtype::F16,
            ScaleDtypeArg::Bf16 => ScaleDtype::BF16,
        },
    };
    let prestep_cfg =
        PreStepConfig { rel_damp: args.damp, act_order: args.act_order, allow_indefinite: args.allow_indefinite };
    if !(args.damp.is_finite() && args.damp >= 0.0) {
        return Err(CliError::usage(format!("--damp must be finite and >= 0, got {}", args.damp)));
    }
    // Settings that fail for every shape fail before any expensive work.
    config.validate(1, 1)?;
    prestep_cfg.validate()?;
    let mut synthetic_tokens = 0;
    if let Some(w) = &args.weights {
        if args.activations.is_none() && args.hessian.is_none() {
            return Err(CliError::usage(format!(
                "{}: GPTQ needs the layer's input statistics: pass --activations NAME or --hessian NAME",
                w.display()
            )));
        }
        if same_file(w, &args.out) {
            return Err(CliError::usage(format!(
                "--out {} is the input file; refusing to overwrite it",
                args.out.display()
            )));
        }
    } else {
        if args.rows == 0 || args.cols == 0 || args.tokens == Some(0) {
            return Err(CliError::usage("--rows, --cols and --tokens must be > 0".into()));
        }
        // The synthetic layer's shape is known now: check it against the format before
        // anything is built (the layer checks its own memory and token count).
        config.validate(args.rows, args.cols)?;
        synthetic_tokens = match args.tokens {
            Some(t) => t,
            None => args.cols.checked_mul(2).ok_or_else(|| CliError::usage("--cols is too large".into()))?,
        };
        if synthetic_tokens > MAX_SYNTHETIC_TOKENS {
            let given = if args.tokens.is_some() { "--tokens" } else { "the default 2·--cols tokens," };
            return Err(CliError::usage(format!(
                "{given} {synthetic_tokens} is more than the synthetic layer's maximum of {MAX_SYNTHETIC_TOKENS} \
                 calibration tokens"
            )));
        }
    }
    // The output target is checked (and stale temporary files of ours cleaned) before any
    // compute: a directory, a missing parent or an unwritable directory fail now, not after.
    prepare_output(&args.out).map_err(|e| CliError::usage(format!("--out: {e}")))?;

    // Backend.
    let t = Instant::now();
    let backend = if args.cpu {
        println!("backend: CPU reference (--cpu)");
        Backend::Cpu
    } else {
        match Backend::auto() {
            (Backend::Gpu(dev), _) => {
                // Load (JIT) the kernels now so the stage timings below are the work itself.
                dev.module()?;
                println!("backend: GPU {} (kernels loaded in {})", dev.name(), fmt_dur(t.elapsed()));
                Backend::Gpu(dev)
            }
            (cpu, reason) => {
                let reason = reason.unwrap_or_else(|| "unknown reason".into());
                println!("no GPU ({reason}): running on the CPU reference");
                cpu
            }
        }
    };

    // Layer and Hessian.
    let mut timings: Vec<(&str, Duration)> = Vec::new();
    let (weight, h, source) = match &args.weights {
        Some(path) => {
            let t = Instant::now();
            let sp = spinner(format!("reading {}", path.display()));
            let stats = match (&args.activations, &args.hessian) {
                (Some(x), _) => LayerStats::Activations(x),
                (None, Some(h)) => LayerStats::Hessian(h),
                (None, None) => return Err(CliError::usage("--activations or --hessian is required".into())),
            };
            let layer = load_layer(path, args.tensor.as_deref(), stats)?;
            sp.finish_and_clear();
            timings.push(("load", t.elapsed()));
            match &layer.hessian_source {
                HessianSource::Activations { name, tokens } => {
                    println!("Hessian: from activations '{name}', {tokens} tokens")
                }
                HessianSource::Stored { name } => println!("Hessian: '{name}' from the file"),
            }
            let source = format!("{} : {}", path.display(), layer.weight_name);
            (layer.weight, layer.hessian, source)
        }
        None => {
            let tokens = synthetic_tokens;
            println!(
                "synthetic layer {}×{} (Student-t(3)·0.02 weights, outlier input channels ×10), {} correlated calibration tokens; --rows/--cols set the shape",
                args.rows, args.cols, tokens
            );
            let t = Instant::now();
            let sp = spinner("building the synthetic layer and its Hessian".into());
            let (w, h) = synthetic_layer(args.rows, args.cols, tokens, args.seed)?;
            sp.finish_and_clear();
            timings.push(("calibration (H)", t.elapsed()));
            (OwnedWeight::F32(w), h, format!("synthetic {}×{} seed {}", args.rows, args.cols, args.seed))
        }
    };
    let (rows, cols) = weight.view().dim();
    config.validate(rows, cols)?;
    println!(
        "layer: {rows}×{cols} {:?}, W{} gs{} {}, {}, act-order {}, damp {}",
        weight.view().dtype(),
        config.bits,
        config.group_size,
        if config.symmetric { "sym" } else { "asym" },
        match &config.scale_search {
            ScaleSearch::Absmax => "absmax".to_string(),
            ScaleSearch::Mse(_) =>
                format!("mse (norm {}, {} points, max shrink {})", args.norm, args.grid_points, args.max_shrink),
        },
        if args.act_order { "on" } else { "off" },
        args.damp
    );

    let w_orig = widen(weight.view())?;
    let mut w32 = w_orig.clone();

    // Pre-step, grid and GPTQ solve. On a GPU: the device's engine does all three with the
    // weight uploaded once in its stored dtype and U never leaving the device; on the CPU:
    // the references, pre-step first.
    let t = Instant::now();
    let sp = spinner("pre-step (dead inputs, damping, act-order, U = chol(H⁻¹)), grid and GPTQ solve".into());
    let indefinite_hint = |e: ForgeError| match e {
        ForgeError::Hessian(m) if m.contains("allow_indefinite") => {
            CliError::from(ForgeError::Hessian(format!("{m} (--allow-indefinite on the command line)")))
        }
        e => CliError::from(e),
    };
    let (pre, grid, codes, deq, loss, solve_warnings, device_times) = match &backend {
        Backend::Gpu(dev) => {
            let job = LayerJob {
                weights: vec![weight.view()],
                hessian: HessianInput::Host(h.view()),
                grid: &config,
                pre_step: prestep_cfg.clone(),
                want_dequant: true,
                profile: true,
                pack: None,
                want_row_error: false,
                block_scales: Vec::new(),
            };
            let mut out = with_engine(dev, |e| e.quantize(&job)).map_err(indefinite_hint)?;
            let w = out.weights.pop().ok_or_else(|| CliError::usage("the engine returned no weight".into()))?;
            for &j in &out.pre_step.dead_columns {
                w32.column_mut(j).fill(0.0);
            }
            let deq = w.dequant.ok_or_else(|| CliError::usage("the engine returned no dequantized weight".into()))?;
            let mut pre = out.pre_step;
            // The device symmetrises H without looking: its asymmetry is checked on the host
            // copy; flushed groups are the host's to find too (the CPU solve reports them).
            if pre.route == PreStepRoute::Gpu {
                pre.warnings.splice(0..0, asymmetry_warning(h.view()));
            }
            let flushed: Vec<Warning> =
                flushed_groups(w32.view(), deq.view(), w.grid.group_size)?.into_iter().collect();
            (pre, w.grid, w.codes, deq, w.loss, flushed, out.timings)
        }
        Backend::Cpu => {
            let p = pre_step_cpu(h.view(), Some(&mut w32), &prestep_cfg).map_err(indefinite_hint)?;
            let quantizer = Quantizer::new(config.clone(), backend.clone());
            // Widening is exact: the native-dtype view gives the same grid as the f32 copy
            // unless the pre-step zeroed dead columns.
            let view = if p.dead_columns.is_empty() { weight.view() } else { WeightView::F32(w32.view()) };
            let (grid, out) = quantizer.quantize_from_hinv(view, p.hinv_factor.view(), p.perm.as_deref())?;
            let summary = PreStepSummary {
                perm: p.perm,
                dead_columns: p.dead_columns,
                damping_used: p.damping_used,
                retries: p.retries,
                fallback_identity: p.fallback_identity,
                route: PreStepRoute::Cpu,
                warnings: p.warnings,
            };
            (summary, grid, out.qweight, out.dequant, out.loss, out.warnings, None)
        }
    };
    sp.finish_and_clear();
    timings.push(("quantize", t.elapsed()));
    println!(
        "pre-step ({:?}): {} dead input column(s){}, damping {:.4e}, {} retr{}",
        pre.route,
        pre.dead_columns.len(),
        if pre.dead_columns.is_empty() {
            String::new()
        } else {
            format!(" {:?} (weights zeroed)", &pre.dead_columns[..pre.dead_columns.len().min(8)])
        },
        pre.damping_used,
        pre.retries,
        if pre.retries == 1 { "y" } else { "ies" },
    );
    let mut warnings: Vec<Warning> = pre.warnings.clone();
    warnings.extend(solve_warnings);
    print_warnings(&warnings);

    // Scores.
    let t = Instant::now();
    let sp = spinner("scoring: round-to-nearest baseline and layer-output errors".into());
    let rtn = round_to_nearest(w32.view(), &grid)?;
    // The codes are valid even where the score is undefined (e.g. a weight H does not see):
    // say why and still write them.
    let score = |q: ndarray::ArrayView2<'_, f32>| match layer_output_error(w_orig.view(), q, h.view()) {
        Ok(e) => Ok(Some(e)),
        Err(e @ (ForgeError::Numeric(_) | ForgeError::Hessian(_))) => {
            eprintln!("warning: no layer-output error: {e}");
            Ok(None)
        }
        Err(e) => Err(e),
    };
    let err_rtn = score(rtn.view())?;
    let err_gptq = score(deq.view())?;
    sp.finish_and_clear();
    timings.push(("scoring", t.elapsed()));

    match &backend {
        Backend::Cpu => println!("\nstage times (CPU):"),
        Backend::Gpu(d) => println!(
            "\nstage times ({}; quantize = pre-step + grid + solve with host↔device copies; scoring on the CPU):",
            d.name()
        ),
    }
    for (name, d) in &timings {
        println!("  {name:<16} {:>10}", fmt_dur(*d));
    }
    if let Some(t) = device_times {
        println!(
            "  device events: upload {:.2} ms, grid {:.2} ms, pre-step {:.2} ms, solve {:.2} ms, download {:.2} ms",
            t.upload_ms, t.grid_ms, t.pre_step_ms, t.solve_ms, t.download_ms
        );
    }
    println!("\nrelative layer-output error ‖(Q−W)Xᵀ‖²/‖WXᵀ‖²:");
    let shown = |e: Option<f64>| e.map_or_else(|| "undefined".to_string(), |e| format!("{e:.6}"));
    println!("  round-to-nearest  {}", shown(err_rtn));
    println!("  GPTQ              {}", shown(err_gptq));
    if let (Some(g), Some(r)) = (err_gptq, err_rtn) {
        if g > 0.0 && r > 0.0 {
            println!("  (GPTQ / RTN = {:.3})", g / r);
        }
    }
    let total_loss: f64 = loss.iter().map(|&l| f64::from(l)).sum();
    println!("  GPTQ loss Σ_rows  {total_loss:.6e}");

    let loss = loss.to_vec();
    let layer = LayerOutput {
        codes: &codes,
        grid: &grid,
        perm: pre.perm.as_deref(),
        loss: &loss,
        metadata: settings_metadata(&args, &source, &backend),
    };
    write_layer(&args.out, &layer)?;
    if !warnings.is_empty() {
        println!("\n{} warning(s), printed above", warnings.len());
    }
    let n_groups = grid.dim().1;
    println!(
        "\nwrote {}: codes u8 [{rows}, {cols}], qmeta u8 [{rows}, {n_groups}, 4], pad i64 = {}{}, loss f32 [{rows}]",
        args.out.display(),
        grid.pad,
        if pre.perm.is_some() { format!(", perm i64 [{cols}]") } else { String::new() }
    );
    Ok(())
}

/// The settings and provenance written beside the result.
fn settings_metadata(args: &Args, source: &str, backend: &Backend) -> Vec<(String, String)> {
    let mut meta: Vec<(String, String)> = [
        ("bits", args.bits.to_string()),
        ("group_size", args.group_size.to_string()),
        ("symmetric", (!args.asym).to_string()),
        ("scale_search", if args.mse { "mse" } else { "absmax" }.to_string()),
        ("scale_dtype", format!("{:?}", args.scale_dtype).to_lowercase()),
        ("act_order", args.act_order.to_string()),
        ("damp", args.damp.to_string()),
        ("allow_indefinite", args.allow_indefinite.to_string()),
        ("source", source.to_string()),
        ("backend", backend.name()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if args.mse {
        meta.push(("mse_norm".into(), args.norm.to_string()));
        meta.push(("mse_grid_points".into(), args.grid_points.to_string()));
        meta.push(("mse_max_shrink".into(), args.max_shrink.to_string()));
    }
    meta
}

/// Legal but surprising outcomes, one line each on stderr.
fn print_warnings(warnings: &[Warning]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn spinner(msg: String) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}
