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

use clap::Parser;
use fourbit_forge::hessian::{pre_step_cpu, HessianAccumulator, PreStepConfig};
use fourbit_forge::numerics::{bf16_bits_to_f32, dequantize, f16_bits_to_f32, fp8_e4m3_to_f32, quantize};
use fourbit_forge::quantizer::widen;
use fourbit_forge::solver::layer_output_error;
use fourbit_forge::{
    Backend, ForgeError, GridConfig, MseSearch, QuantGrid, Quantizer, ScaleSearch, ShrinkCandidates, WeightDtype,
    WeightView,
};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, ArrayView2};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Quantize one nn.Linear layer with GPTQ (4Bit Forge).
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
    /// Process input columns in order of decreasing diag(H).
    #[arg(long)]
    act_order: bool,
    /// Damping relative to mean(diag H).
    #[arg(long, default_value_t = 0.01)]
    damp: f32,
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
    };
    let prestep_cfg = PreStepConfig { rel_damp: args.damp, act_order: args.act_order };
    if !(args.damp.is_finite() && args.damp >= 0.0) {
        return Err(CliError::usage(format!("--damp must be finite and >= 0, got {}", args.damp)));
    }
    // Settings that fail for every shape fail before any expensive work.
    config.validate(1, 1)?;
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
    } else if args.rows == 0 || args.cols == 0 || args.tokens == Some(0) {
        return Err(CliError::usage("--rows, --cols and --tokens must be > 0".into()));
    }
    if args.out.file_name().is_none() {
        return Err(CliError::usage(format!("--out {} does not name a file", args.out.display())));
    }
    let out_dir = output_dir(&args.out);
    if !out_dir.is_dir() {
        return Err(CliError::usage(format!(
            "--out {}: the directory {} does not exist",
            args.out.display(),
            out_dir.display()
        )));
    }

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
            let loaded = load_layer(path, &args)?;
            sp.finish_and_clear();
            timings.push(("load", t.elapsed()));
            loaded
        }
        None => {
            let tokens = args.tokens.unwrap_or(2 * args.cols);
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

    // Pre-step.
    let t = Instant::now();
    let sp = spinner("pre-step: dead inputs, damping, act-order, Cholesky of H⁻¹".into());
    let pre = pre_step_cpu(h.view(), Some(&mut w32), &prestep_cfg)?;
    sp.finish_and_clear();
    timings.push(("pre-step", t.elapsed()));
    println!(
        "pre-step: {} dead input column(s){}, damping {:.4e}, {} retr{}{}",
        pre.dead_columns.len(),
        if pre.dead_columns.is_empty() {
            String::new()
        } else {
            format!(" {:?} (weights zeroed)", &pre.dead_columns[..pre.dead_columns.len().min(8)])
        },
        pre.damping_used,
        pre.retries,
        if pre.retries == 1 { "y" } else { "ies" },
        if pre.fallback_identity {
            "\nWARNING: the Hessian could not be factorised even with more damping: U = I, the result is round-to-nearest"
        } else {
            ""
        }
    );

    // Grid. Widening is exact, so the native-dtype view gives the same grid as the f32 copy
    // unless the pre-step zeroed dead columns.
    let quantizer = Quantizer::new(config.clone(), backend.clone());
    let t = Instant::now();
    let sp = spinner("grid: qmeta4 per (row, group)".into());
    let grid = if pre.dead_columns.is_empty() {
        quantizer.build_quant_grid(weight.view())?
    } else {
        quantizer.build_quant_grid(WeightView::F32(w32.view()))?
    };
    sp.finish_and_clear();
    timings.push(("grid", t.elapsed()));

    // GPTQ solve.
    let t = Instant::now();
    let sp = spinner("GPTQ solve".into());
    let out = quantizer.solve(w32.view(), pre.hinv_factor.view(), &grid, pre.perm.as_deref())?;
    sp.finish_and_clear();
    timings.push(("solve", t.elapsed()));

    // Scores.
    let t = Instant::now();
    let sp = spinner("scoring: round-to-nearest baseline and layer-output errors".into());
    let rtn = round_to_nearest(w32.view(), &grid);
    let err_rtn = layer_output_error(w_orig.view(), rtn.view(), h.view())?;
    let err_gptq = layer_output_error(w_orig.view(), out.dequant.view(), h.view())?;
    sp.finish_and_clear();
    timings.push(("scoring", t.elapsed()));

    match &backend {
        Backend::Cpu => println!("\nstage times (CPU):"),
        Backend::Gpu(d) => println!(
            "\nstage times ({}; grid and solve include host↔device copies; pre-step and scoring run on the CPU):",
            d.name()
        ),
    }
    for (name, d) in &timings {
        println!("  {name:<16} {:>10}", fmt_dur(*d));
    }
    println!("\nrelative layer-output error ‖(Q−W)Xᵀ‖²/‖WXᵀ‖²:");
    println!("  round-to-nearest  {err_rtn:.6}");
    println!("  GPTQ              {err_gptq:.6}");
    if err_gptq > 0.0 {
        println!("  (GPTQ / RTN = {:.3})", err_gptq / err_rtn);
    }
    let total_loss: f64 = out.loss.iter().map(|&l| f64::from(l)).sum();
    println!("  GPTQ loss Σ_rows  {total_loss:.6e}");

    write_output(&args.out, &out.qweight, &grid, pre.perm.as_deref(), &out.loss.to_vec(), &args, &source, &backend)?;
    let n_groups = grid.dim().1;
    println!(
        "\nwrote {}: codes u8 [{rows}, {cols}], qmeta u8 [{rows}, {n_groups}, 4], pad i64 = {}{}, loss f32 [{rows}]",
        args.out.display(),
        grid.pad,
        if pre.perm.is_some() { format!(", perm i64 [{cols}]") } else { String::new() }
    );
    Ok(())
}

/// A weight in the dtype it was stored in.
enum OwnedWeight {
    F32(Array2<f32>),
    F16(Array2<half::f16>),
    BF16(Array2<half::bf16>),
    Fp8E4M3(Array2<u8>),
}

impl OwnedWeight {
    fn view(&self) -> WeightView<'_> {
        match self {
            OwnedWeight::F32(a) => WeightView::F32(a.view()),
            OwnedWeight::F16(a) => WeightView::F16(a.view()),
            OwnedWeight::BF16(a) => WeightView::BF16(a.view()),
            OwnedWeight::Fp8E4M3(a) => WeightView::Fp8E4M3(a.view()),
        }
    }
}

/// The weight, the Hessian and a description of where they came from, from a safetensors file.
fn load_layer(path: &Path, args: &Args) -> Result<(OwnedWeight, Array2<f32>, String)> {
    let bytes = std::fs::read(path).map_err(|source| ForgeError::Io { path: path.display().to_string(), source })?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ForgeError::Safetensors(format!("{}: not a valid safetensors file: {e}", path.display())))?;
    let others = [args.activations.as_deref(), args.hessian.as_deref()];
    let name = match &args.tensor {
        Some(n) => n.clone(),
        None => {
            let mut candidates: Vec<String> = st
                .tensors()
                .into_iter()
                .filter(|(n, t)| t.shape().len() == 2 && !others.contains(&Some(n.as_str())))
                .map(|(n, _)| n)
                .collect();
            candidates.sort();
            match candidates.len() {
                1 => candidates.remove(0),
                0 => {
                    return Err(ForgeError::Safetensors(format!(
                        "{}: no 2-D weight tensor found; the file holds: {}",
                        path.display(),
                        describe(&st)
                    )))
                }
                _ => {
                    return Err(ForgeError::Safetensors(format!(
                        "{}: several 2-D tensors ({}); pick the weight with --tensor NAME",
                        path.display(),
                        candidates.join(", ")
                    )))
                }
            }
        }
    };
    let tv = get_tensor(&st, path, &name)?;
    let shape = tv.shape().to_vec();
    if shape.len() != 2 || shape[0] == 0 || shape[1] == 0 {
        return Err(ForgeError::Shape(format!(
            "weight '{name}' has shape {shape:?}: it must be 2-D (out_features, in_features) and non-empty"
        )));
    }
    let (rows, cols) = (shape[0], shape[1]);
    let dtype = WeightDtype::parse(&tv.dtype().to_string())
        .map_err(|_| ForgeError::Dtype(format!("{} (weight '{name}')", tv.dtype())))?;
    let data = tv.data();
    let weight = match dtype {
        WeightDtype::F32 => OwnedWeight::F32(Array2::from_shape_vec((rows, cols), le_f32(data)).map_err(shape_err)?),
        WeightDtype::F16 => OwnedWeight::F16(
            Array2::from_shape_vec((rows, cols), le_u16(data).into_iter().map(half::f16::from_bits).collect())
                .map_err(shape_err)?,
        ),
        WeightDtype::BF16 => OwnedWeight::BF16(
            Array2::from_shape_vec((rows, cols), le_u16(data).into_iter().map(half::bf16::from_bits).collect())
                .map_err(shape_err)?,
        ),
        WeightDtype::Fp8E4M3 => {
            OwnedWeight::Fp8E4M3(Array2::from_shape_vec((rows, cols), data.to_vec()).map_err(shape_err)?)
        }
    };

    let h = if let Some(xname) = &args.activations {
        let xv = get_tensor(&st, path, xname)?;
        let xshape = xv.shape().to_vec();
        if xshape.len() < 2 || *xshape.last().unwrap_or(&0) != cols {
            return Err(ForgeError::Shape(format!(
                "activations '{xname}' have shape {xshape:?}: expected (tokens, {cols}) or (..., {cols}) to match the weight's {cols} input columns"
            )));
        }
        let tokens: usize = xshape[..xshape.len() - 1].iter().product();
        if tokens == 0 {
            return Err(ForgeError::Shape(format!("activations '{xname}' hold no tokens (shape {xshape:?})")));
        }
        let x = to_f32(&xv, xname)?;
        let x = ArrayView2::from_shape((tokens, cols), &x).map_err(shape_err)?;
        let mut acc = HessianAccumulator::new(cols)?;
        acc.update(x)?;
        println!("Hessian: from activations '{xname}', {tokens} tokens");
        acc.into_h()
    } else {
        let hname = args.hessian.as_deref().unwrap_or_default();
        let hv = get_tensor(&st, path, hname)?;
        if hv.shape() != [cols, cols] {
            return Err(ForgeError::Shape(format!(
                "Hessian '{hname}' has shape {:?}: expected [{cols}, {cols}] for a weight with {cols} input columns",
                hv.shape()
            )));
        }
        let h = Array2::from_shape_vec((cols, cols), to_f32(&hv, hname)?).map_err(shape_err)?;
        println!("Hessian: '{hname}' from the file");
        h
    };
    Ok((weight, h, format!("{} : {name}", path.display())))
}

fn shape_err(e: ndarray::ShapeError) -> ForgeError {
    ForgeError::Shape(e.to_string())
}

fn get_tensor<'a>(st: &SafeTensors<'a>, path: &Path, name: &str) -> Result<TensorView<'a>> {
    st.tensor(name).map_err(|_| {
        ForgeError::Safetensors(format!(
            "{}: no tensor named '{name}'; the file holds: {}",
            path.display(),
            describe(st)
        ))
    })
}

/// "name dtype [shape], ..." of every tensor in the file, sorted by name.
fn describe(st: &SafeTensors<'_>) -> String {
    let mut all: Vec<String> =
        st.tensors().into_iter().map(|(n, t)| format!("{n} {} {:?}", t.dtype(), t.shape())).collect();
    all.sort();
    if all.is_empty() {
        "no tensors".into()
    } else {
        all.join(", ")
    }
}

fn le_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn le_u16(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// Any supported float tensor, widened exactly to f32.
fn to_f32(t: &TensorView<'_>, name: &str) -> Result<Vec<f32>> {
    let dtype = WeightDtype::parse(&t.dtype().to_string())
        .map_err(|_| ForgeError::Dtype(format!("{} (tensor '{name}')", t.dtype())))?;
    Ok(match dtype {
        WeightDtype::F32 => le_f32(t.data()),
        WeightDtype::F16 => le_u16(t.data()).into_iter().map(f16_bits_to_f32).collect(),
        WeightDtype::BF16 => le_u16(t.data()).into_iter().map(bf16_bits_to_f32).collect(),
        WeightDtype::Fp8E4M3 => t.data().iter().map(|&b| fp8_e4m3_to_f32(b)).collect(),
    })
}

/// A realistic stand-in for one layer and its calibration set: heavy-tailed weights
/// (Student-t, 3 dof, ×0.02) with a few outlier input channels ×10, and correlated
/// activations `X = Z·A` (Z standard normal, A a random mixing with a decaying spectrum and
/// log-normal per-channel scales), fed to the Hessian in batches as calibration would be.
fn synthetic_layer(rows: usize, cols: usize, tokens: usize, seed: u64) -> Result<(Array2<f32>, Array2<f32>)> {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, MatMut, MatRef, Par};
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, LogNormal, StandardNormal, StudentT};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t3 = StudentT::new(3.0f32).expect("3 dof is valid");
    let mut w = Array2::from_shape_fn((rows, cols), |_| t3.sample(&mut rng) * 0.02);
    let n_outliers = (cols / 512).clamp(1, 16);
    for _ in 0..n_outliers {
        let c = rng.gen_range(0..cols);
        w.column_mut(c).mapv_inplace(|v| v * 10.0);
    }

    let k = cols;
    let channel = LogNormal::new(0.0f32, 0.5).expect("valid log-normal");
    let chan_scale: Vec<f32> = (0..cols).map(|_| channel.sample(&mut rng)).collect();
    let inv_sqrt_k = 1.0 / (k as f32).sqrt();
    // Row-major (k, cols): row i of the mixing carries singular-value weight (1 + i)^-1/2.
    let mut a = Vec::with_capacity(k * cols);
    for i in 0..k {
        let decay = inv_sqrt_k * (1.0 + i as f32).powf(-0.5);
        for &c in &chan_scale {
            let g: f32 = StandardNormal.sample(&mut rng);
            a.push(g * decay * c);
        }
    }
    let mut acc = HessianAccumulator::new(cols)?;
    const BATCH: usize = 2048;
    let mut z = Vec::with_capacity(BATCH * k);
    let mut x = vec![0f32; BATCH * cols];
    let mut done = 0;
    while done < tokens {
        let m = BATCH.min(tokens - done);
        z.clear();
        z.extend((0..m * k).map(|_| -> f32 { StandardNormal.sample(&mut rng) }));
        // X = Z·A on all cores (faer), then one calibration batch for the accumulator.
        matmul(
            MatMut::from_row_major_slice_mut(&mut x[..m * cols], m, cols),
            Accum::Replace,
            MatRef::from_row_major_slice(&z, m, k),
            MatRef::from_row_major_slice(&a, k, cols),
            1.0f32,
            Par::rayon(0),
        );
        acc.update(ArrayView2::from_shape((m, cols), &x[..m * cols]).map_err(shape_err)?)?;
        done += m;
    }
    Ok((w, acc.into_h()))
}

/// Round-to-nearest with the grid's own (decoded) scales: the baseline GPTQ must beat.
fn round_to_nearest(w: ArrayView2<'_, f32>, grid: &QuantGrid) -> Array2<f32> {
    let maxq = grid.maxq as f32;
    Array2::from_shape_fn(w.dim(), |(r, c)| {
        let m = grid.meta(r, c / grid.group_size);
        let (s, q0) = (m.scale(), m.qzero_f32());
        dequantize(quantize(w[[r, c]], s, q0, maxq), s, q0)
    })
}

/// Writes the result to a temp file next to `out`, then renames it into place.
#[allow(clippy::too_many_arguments)]
fn write_output(
    out: &Path,
    codes: &Array2<u8>,
    grid: &QuantGrid,
    perm: Option<&[usize]>,
    loss: &[f32],
    args: &Args,
    source: &str,
    backend: &Backend,
) -> Result<()> {
    let st_err = |e: safetensors::SafeTensorError| ForgeError::Safetensors(format!("{}: {e}", out.display()));
    let (rows, cols) = codes.dim();
    let (_, n_groups) = grid.dim();
    let codes = codes.as_standard_layout();
    let qmeta = grid.qmeta.as_standard_layout();
    let pad = (grid.pad as i64).to_le_bytes();
    let perm_bytes: Option<Vec<u8>> = perm.map(|p| p.iter().flat_map(|&j| (j as i64).to_le_bytes()).collect());
    let loss_bytes: Vec<u8> = loss.iter().flat_map(|l| l.to_le_bytes()).collect();

    let mut tensors = vec![
        (
            "codes".to_string(),
            TensorView::new(Dtype::U8, vec![rows, cols], codes.as_slice().unwrap_or_default()).map_err(st_err)?,
        ),
        (
            "qmeta".to_string(),
            TensorView::new(Dtype::U8, vec![rows, n_groups, 4], qmeta.as_slice().unwrap_or_default())
                .map_err(st_err)?,
        ),
        ("pad".to_string(), TensorView::new(Dtype::I64, vec![], &pad).map_err(st_err)?),
        ("loss".to_string(), TensorView::new(Dtype::F32, vec![rows], &loss_bytes).map_err(st_err)?),
    ];
    if let Some(p) = &perm_bytes {
        tensors.push(("perm".to_string(), TensorView::new(Dtype::I64, vec![cols], p).map_err(st_err)?));
    }
    let meta: HashMap<String, String> = [
        ("format", "4bit-forge qmeta4: codes (rows, cols) in original column order; qmeta (rows, n_groups, 4) = [lo(log2_q88), hi(log2_q88), qzero, flags]; groups along input columns"),
        ("bits", &args.bits.to_string()),
        ("group_size", &args.group_size.to_string()),
        ("symmetric", &(!args.asym).to_string()),
        ("scale_search", if args.mse { "mse" } else { "absmax" }),
        ("act_order", &args.act_order.to_string()),
        ("damp", &args.damp.to_string()),
        ("source", source),
        ("backend", &backend.name()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let meta = if args.mse {
        let mut m = meta;
        m.insert("mse_norm".into(), args.norm.to_string());
        m.insert("mse_grid_points".into(), args.grid_points.to_string());
        m.insert("mse_max_shrink".into(), args.max_shrink.to_string());
        m
    } else {
        meta
    };

    let dir = output_dir(out);
    let file_name = out.file_name().unwrap_or_default();
    let tmp = dir.join(format!(".{}.{}.tmp", file_name.to_string_lossy(), std::process::id()));
    let result = safetensors::serialize_to_file(tensors, Some(meta), &tmp)
        .map_err(|e| match e {
            safetensors::SafeTensorError::IoError(source) => ForgeError::Io { path: tmp.display().to_string(), source },
            e => st_err(e),
        })
        .and_then(|()| {
            std::fs::rename(&tmp, out).map_err(|source| ForgeError::Io { path: out.display().to_string(), source })
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The directory `out` goes to (its temp file is created there too, so the rename is atomic).
fn output_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
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
