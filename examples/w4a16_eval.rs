//! Runs one quantized layer with the W4A16 kernel against its full-precision layer and prints
//! the relative output error `‖Y_q − Y_fp‖ / ‖Y_fp‖`, so a quantized result can be checked
//! without another runtime.
//!
//! ```text
//! cargo run --release --example w4a16_eval                                  # synthetic 4096×4096, 64 tokens
//! cargo run --release --example w4a16_eval -- --weights layer.safetensors --tensor weight \
//!     --activations inputs --group-size 128 --gptq --mse
//! ```
//!
//! `Y_fp = round_T(X) · Wᵀ` with the weight in full precision (f64 sums); `Y_q` is the kernel's
//! output on the packed weight (`--bits`, 4 by default; the CPU reference where there is no GPU, said so). The
//! weight is quantized here with the library (round-to-nearest, or GPTQ with `--gptq`, whose
//! Hessian `2/n·XᵀX` comes from the same activations). Also printed: the kernel against its
//! own CPU reference (accumulation order and output rounding only) and the launch plan.
//!
//! `--experts E` checks a mixture-of-experts layer the same way through the grouped launch
//! (one launch for all experts): each token is routed to `--top-k` experts at random, the
//! rows sorted by expert; each expert quantized on its own tokens. Synthetic experts, or
//! `--weights F --tensor 'name.{e}.weight' --activations X` with `{e}` the expert index.
//!
//! ```text
//! cargo run --release --example w4a16_eval -- --experts 16 --rows 1536 --cols 2048 --tokens 64 --top-k 4
//! cargo run --release --example w4a16_eval -- --experts 16 --tokens 64 --top-k 4 --device-routing
//! cargo run --release --example w4a16_eval -- --experts 16 --tokens 64 --top-k 4 --topk-step
//! ```
//!
//! `--topk-step` runs the whole step on the device from the router's top-k ids and weights
//! (`TopkRouting`: rows sorted by expert, the tokens gathered, the grouped launch, the
//! outputs combined per token) and compares the combined outputs `Σ_j w_j · Y_j` per token.

use clap::Parser;
use fourbit_forge::hessian::{pre_step_cpu, PreStepConfig};
use fourbit_forge::numerics::quantize;
use fourbit_forge::runtime::{
    expert_offsets, pack_for_kernel, w4a16_grouped_matmul, w4a16_grouped_matmul_cpu, w4a16_matmul_cpu,
    w4a16_matmul_host, ActDtype, DeviceExperts, ExpertRouting, PackedWeight, TopkRouting, W4a16Options, W4a16Workspace,
};
use fourbit_forge::{
    Backend, ForgeError, GridConfig, MseSearch, QuantGrid, Quantizer, Result, ScaleSearch, WeightView,
};
use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// Check a quantized linear layer (2–8 bits) with the W4A16 kernel.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// safetensors file with the weight (out_features × in_features) and the activations.
    #[arg(long, value_name = "FILE", requires_all = ["tensor", "activations"])]
    weights: Option<PathBuf>,
    /// The weight tensor's name (F32, F16 or BF16).
    #[arg(long, value_name = "NAME")]
    tensor: Option<String>,
    /// The activations' name: (tokens, in_features), or any shape ending in in_features.
    #[arg(long, value_name = "NAME")]
    activations: Option<String>,
    /// Synthetic layer: output features.
    #[arg(long, default_value_t = 4096)]
    rows: usize,
    /// Synthetic layer: input features.
    #[arg(long, default_value_t = 4096)]
    cols: usize,
    /// Synthetic layer: tokens.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Input columns per group (a multiple of 32).
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Bits per weight, 2–8 (5–8 run the 8-bit kernels).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=8))]
    bits: u32,
    /// Asymmetric grid (a zero point per group).
    #[arg(long)]
    asym: bool,
    /// MSE scale search instead of absmax.
    #[arg(long)]
    mse: bool,
    /// GPTQ with the activations' Hessian instead of round-to-nearest.
    #[arg(long)]
    gptq: bool,
    /// Activation type: bf16 or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// A mixture-of-experts layer of this many experts (see the module docs).
    #[arg(long, value_name = "E")]
    experts: Option<usize>,
    /// Experts per token (with `--experts`).
    #[arg(long, default_value_t = 8)]
    top_k: usize,
    /// With `--experts`: build the grouped launch's task table on the device from offsets in
    /// device memory (`ExpertRouting::on_device`), as a step whose router runs on the GPU.
    #[arg(long)]
    device_routing: bool,
    /// With `--experts`: the whole step on the device from top-k ids and routing weights
    /// (`TopkRouting`: route, gather, grouped launch, combine); compares the combined outputs.
    #[arg(long)]
    topk_step: bool,
}

/// A 2-D tensor of a safetensors file as f32, with its leading axes flattened.
fn read_2d(st: &safetensors::SafeTensors<'_>, name: &str) -> Result<Array2<f32>> {
    let t = st.tensor(name).map_err(|e| ForgeError::Safetensors(format!("{name}: {e}")))?;
    let shape = t.shape();
    let cols = *shape.last().ok_or_else(|| ForgeError::Shape(format!("{name} is a scalar")))?;
    let rows = shape[..shape.len() - 1].iter().product::<usize>();
    let d = t.data();
    let vals: Vec<f32> = match t.dtype() {
        safetensors::Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        safetensors::Dtype::F16 => {
            d.chunks_exact(2).map(|b| forge_numerics::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect()
        }
        safetensors::Dtype::BF16 => {
            d.chunks_exact(2).map(|b| forge_numerics::bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect()
        }
        other => return Err(ForgeError::Dtype(format!("{other} ({name})"))),
    };
    Array2::from_shape_vec((rows, cols), vals).map_err(|e| ForgeError::Shape(format!("{name}: {e}")))
}

/// Heavy-tailed weights and activations with outlier input channels (deterministic per seed).
fn synthetic(n: usize, k: usize, tokens: usize, seed: u64) -> (Array2<f32>, Array2<f32>) {
    use rand_distr::{Distribution, StandardNormal, StudentT};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t3 = StudentT::new(3.0f32).expect("valid dof");
    let w = Array2::from_shape_fn((n, k), |_| t3.sample(&mut rng) * 0.02);
    let mut x = Array2::from_shape_fn((tokens, k), |_| rng.sample::<f32, _>(StandardNormal));
    for _ in 0..(k / 512).max(1) {
        let c = rng.gen_range(0..k);
        x.column_mut(c).mapv_inplace(|v| v * 20.0);
    }
    (w, x)
}

/// Round-to-nearest codes on `grid`.
fn rtn_codes(w: ArrayView2<'_, f32>, grid: &QuantGrid) -> Result<Array2<u8>> {
    let mut codes = Array2::<u8>::zeros(w.dim());
    for ((r, c), q) in codes.indexed_iter_mut() {
        let m = grid.meta(r, c / grid.group_size)?;
        *q = quantize(w[[r, c]], m.scale(), m.qzero_f32(), grid.maxq as f32) as u8;
    }
    Ok(codes)
}

/// The two error lines every check prints, after what ran.
fn print_errors(how: &str, y_q: &Array2<f64>, y_fp: &Array2<f64>, y_ref: &Array2<f64>) {
    println!("ran on: {how}");
    println!("‖Y_q − Y_fp‖ / ‖Y_fp‖        = {:.6}   (quantization error of the layer)", rel(y_q, y_fp));
    println!(
        "‖Y_q − Y_ref‖ / ‖Y_ref‖      = {:.2e} (kernel vs its CPU reference: accumulation order, output rounding)",
        rel(y_q, y_ref)
    );
}

fn rel(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// The grid of the command line.
fn grid_config(args: &Args) -> GridConfig {
    GridConfig {
        group_size: args.group_size,
        bits: args.bits,
        symmetric: !args.asym,
        scale_search: if args.mse { ScaleSearch::Mse(MseSearch::default()) } else { ScaleSearch::Absmax },
        ..GridConfig::default()
    }
}

/// `w` quantized as the command line says (GPTQ with the Hessian of `x`, round-to-nearest
/// without `--gptq` or without tokens) and packed for the kernel.
fn quantize_and_pack(args: &Args, w: &Array2<f32>, x: ArrayView2<'_, f32>) -> Result<PackedWeight> {
    let quantizer = Quantizer::new(grid_config(args), Backend::Cpu);
    let grid = quantizer.build_quant_grid(WeightView::F32(w.view()))?;
    let codes = if args.gptq && x.nrows() > 0 {
        let xt = x.mapv(|v| v as f64);
        let h = (xt.t().dot(&xt) * (2.0 / x.nrows() as f64)).mapv(|v| v as f32);
        let mut wq = w.clone();
        let pre = pre_step_cpu(h.view(), Some(&mut wq), &PreStepConfig::default())?;
        quantizer.solve(wq.view(), pre.hinv_factor.view(), &grid, pre.perm.as_deref())?.qweight
    } else {
        rtn_codes(w.view(), &grid)?
    };
    pack_for_kernel(codes.view(), &grid)
}

/// What the run quantized, for the first output line.
fn describe(args: &Args, dtype: ActDtype) -> String {
    format!(
        "{dtype:?}, {}-bit gs {} {}{}, {}",
        args.bits,
        args.group_size,
        if args.asym { "asymmetric" } else { "symmetric" },
        if args.mse { " MSE" } else { "" },
        if args.gptq { "GPTQ" } else { "round-to-nearest" }
    )
}

/// The grouped (mixture-of-experts) check of `--experts`.
fn eval_experts(args: &Args, dtype: ActDtype, experts: usize) -> Result<()> {
    if experts == 0 || args.top_k == 0 || args.top_k > experts {
        return Err(ForgeError::Config(format!(
            "--experts {experts} --top-k {}: need 1 ≤ top-k ≤ experts",
            args.top_k
        )));
    }
    let (weights, x): (Vec<Array2<f32>>, Array2<f32>) = match &args.weights {
        Some(path) => {
            let bytes =
                std::fs::read(path).map_err(|source| ForgeError::Io { path: path.display().to_string(), source })?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| ForgeError::Safetensors(format!("{}: {e}", path.display())))?;
            let pattern = args.tensor.as_deref().unwrap_or("experts.{e}.weight");
            if !pattern.contains("{e}") {
                return Err(ForgeError::Config(format!("--tensor {pattern}: name the expert index as {{e}}")));
            }
            let w =
                (0..experts).map(|e| read_2d(&st, &pattern.replace("{e}", &e.to_string()))).collect::<Result<_>>()?;
            (w, read_2d(&st, args.activations.as_deref().unwrap_or("inputs"))?)
        }
        None => {
            let w = (0..experts).map(|e| synthetic(args.rows, args.cols, 0, 100 + e as u64).0).collect();
            (w, synthetic(1, args.cols, args.tokens, 15).1)
        }
    };
    let (n, k) = weights[0].dim();
    if weights.iter().any(|w| w.dim() != (n, k)) || x.ncols() != k {
        return Err(ForgeError::Shape(format!("experts must all be {n}×{k} and the activations have {k} features")));
    }
    // Top-k routing at random, then the rows grouped by expert (token order kept within one).
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let mut routed: Vec<Vec<usize>> = vec![Vec::new(); experts];
    let mut picks: Vec<u32> = Vec::with_capacity(x.nrows() * args.top_k);
    for t in 0..x.nrows() {
        let mut picked = Vec::with_capacity(args.top_k);
        while picked.len() < args.top_k {
            let e = rng.gen_range(0..experts);
            if !picked.contains(&e) {
                picked.push(e);
                routed[e].push(t);
            }
        }
        picks.extend(picked.iter().map(|&e| e as u32));
    }
    let offsets = expert_offsets(&routed.iter().map(Vec::len).collect::<Vec<_>>());
    let order: Vec<usize> = routed.iter().flatten().copied().collect();
    let xs = x.select(ndarray::Axis(0), &order);
    let packed: Vec<PackedWeight> = weights
        .iter()
        .enumerate()
        .map(|(e, w)| quantize_and_pack(args, w, xs.slice(ndarray::s![offsets[e]..offsets[e + 1], ..])))
        .collect::<Result<_>>()?;
    let xr = xs.mapv(|v| dtype.round(v) as f64);
    let mut y_fp = Array2::<f64>::zeros((xs.nrows(), n));
    for (e, w) in weights.iter().enumerate() {
        let rows = offsets[e]..offsets[e + 1];
        let ye = xr.slice(ndarray::s![rows.clone(), ..]).dot(&w.mapv(|v| v as f64).t());
        y_fp.slice_mut(ndarray::s![rows, ..]).assign(&ye);
    }
    let y_ref = w4a16_grouped_matmul_cpu(xs.view(), &offsets, &packed, dtype)?;
    if args.topk_step {
        return eval_topk_step(args, dtype, &x, &picks, &packed, &offsets, (&y_fp, &y_ref));
    }
    let (y_q, how) = match fourbit_forge::device::GpuDevice::first() {
        Ok(dev) => {
            let w = DeviceExperts::upload(&dev, &packed)?;
            let stream = dev.stream();
            let routing = if args.device_routing {
                // As a router on the GPU leaves them: u32 offsets in device memory; the task
                // table is built there (no host copy).
                let o: Vec<u32> = offsets.iter().map(|&v| v as u32).collect();
                let mut od = dev.alloc::<u32>(o.len(), "eval offsets")?;
                stream.memcpy_htod(&o, &mut od).map_err(ForgeError::driver("uploading offsets"))?;
                let hint = ExpertRouting::rows_hint(xs.nrows(), experts);
                let mut r = ExpertRouting::on_device(&dev, experts, xs.nrows(), hint)?;
                r.build_from(&dev, &od)?;
                r
            } else {
                ExpertRouting::new(&dev, &offsets)?
            };
            let xb: Vec<u16> = xs.iter().map(|&v| dtype.bits(v)).collect();
            let mut xd = dev.alloc::<u16>(xb.len().max(1), "eval X")?;
            stream.memcpy_htod(&xb, &mut xd).map_err(ForgeError::driver("uploading X"))?;
            let mut yd = dev.alloc::<u16>((xs.nrows() * n).max(1), "eval Y")?;
            let mut ws = W4a16Workspace::default();
            let plan =
                w4a16_grouped_matmul(&dev, &xd, &routing, &w, &mut yd, dtype, &W4a16Options::default(), &mut ws)?;
            routing.device_status(&dev)?;
            let yb = stream.clone_dtoh(&yd).map_err(ForgeError::driver("downloading Y"))?;
            let y = Array2::from_shape_vec(
                (xs.nrows(), n),
                yb[..xs.nrows() * n].iter().map(|&b| dtype.value(b) as f64).collect(),
            )
            .map_err(|e| ForgeError::Internal(format!("Y shape: {e}")))?;
            let routed_on = if args.device_routing { "routing built on the device" } else { "host routing" };
            (y, format!("{} (grouped launch, {routed_on}, {plan:?})", dev.name()))
        }
        Err(e) => {
            (fourbit_forge::runtime::round_to_act(&y_ref, dtype).mapv(|v| v as f64), format!("CPU reference ({e})"))
        }
    };
    let active = routed.iter().filter(|r| !r.is_empty()).count();
    println!(
        "MoE layer: {experts} experts of {n}×{k}, {} tokens × top-{} = {} rows on {active} experts, {}",
        x.nrows(),
        args.top_k,
        xs.nrows(),
        describe(args, dtype)
    );
    print_errors(&how, &y_q, &y_fp, &y_ref);
    Ok(())
}

/// `--topk-step`: the step from top-k ids on the device, checked on the combined outputs.
/// `picks` are the ids (token-major); the sorted rows of `offsets` are the device route's
/// (by expert, then token), so `y_fp`/`y_ref` (sorted rows) combine with the same weights.
fn eval_topk_step(
    args: &Args,
    dtype: ActDtype,
    x: &Array2<f32>,
    picks: &[u32],
    packed: &[PackedWeight],
    offsets: &[usize],
    (y_fp, y_ref): (&Array2<f64>, &Array2<f64>),
) -> Result<()> {
    let (tokens, top_k, n, k) = (x.nrows(), args.top_k, y_fp.ncols(), x.ncols());
    let experts = packed.len();
    // Routing weights as a router's softmax over its top-k leaves them: positive, sum 1.
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut weights: Vec<f32> = (0..tokens * top_k).map(|_| rng.gen_range(0.1f32..1.0)).collect();
    for w in weights.chunks_mut(top_k) {
        let sum: f32 = w.iter().sum();
        w.iter_mut().for_each(|v| *v /= sum);
    }
    let route = fourbit_forge::runtime::topk_route_cpu(picks, top_k, experts)?;
    if route.offsets != offsets {
        return Err(ForgeError::Internal("the top-k route disagrees with the example's grouping".into()));
    }
    let combine = |y: &Array2<f64>| {
        Array2::from_shape_fn((tokens, n), |(t, c)| {
            (0..top_k).map(|j| weights[t * top_k + j] as f64 * y[[route.pair_row[t * top_k + j] as usize, c]]).sum()
        })
    };
    let (c_fp, c_ref) = (combine(y_fp), combine(y_ref));
    let (c_q, how) = match fourbit_forge::device::GpuDevice::first() {
        Ok(dev) => {
            let w = DeviceExperts::upload(&dev, packed)?;
            let stream = dev.stream();
            let up16 = |v: Vec<u16>, what| -> Result<_> {
                let mut d = dev.alloc::<u16>(v.len().max(1), what)?;
                stream.memcpy_htod(&v, &mut d.slice_mut(0..v.len())).map_err(ForgeError::driver("uploading"))?;
                Ok(d)
            };
            let hidden = up16(x.iter().map(|&v| dtype.bits(v)).collect(), "eval hidden")?;
            let mut ids = dev.alloc::<u32>(picks.len().max(1), "eval ids")?;
            stream.memcpy_htod(picks, &mut ids.slice_mut(0..picks.len())).map_err(ForgeError::driver("uploading"))?;
            let mut wd = dev.alloc::<f32>(weights.len().max(1), "eval weights")?;
            stream
                .memcpy_htod(&weights, &mut wd.slice_mut(0..weights.len()))
                .map_err(ForgeError::driver("uploading"))?;
            let mut xs = dev.alloc::<u16>((tokens * top_k * k).max(1), "eval sorted X")?;
            let mut ys = dev.alloc::<u16>((tokens * top_k * n).max(1), "eval sorted Y")?;
            let mut out = dev.alloc::<u16>((tokens * n).max(1), "eval out")?;
            let mut routing = TopkRouting::new(&dev, experts, tokens.max(1), top_k, None)?;
            let mut ws = W4a16Workspace::default();
            routing.route(&dev, &ids, tokens)?;
            routing.gather(&dev, &hidden, k, &mut xs)?;
            let opts = W4a16Options::default();
            let plan = w4a16_grouped_matmul(&dev, &xs, routing.expert_routing(), &w, &mut ys, dtype, &opts, &mut ws)?;
            routing.combine(&dev, &ys, n, &wd, &mut out, dtype)?;
            routing.device_status(&dev)?;
            let ob = stream.clone_dtoh(&out).map_err(ForgeError::driver("downloading the outputs"))?;
            let c =
                Array2::from_shape_vec((tokens, n), ob[..tokens * n].iter().map(|&b| dtype.value(b) as f64).collect())
                    .map_err(|e| ForgeError::Internal(format!("output shape: {e}")))?;
            (c, format!("{} (top-k step on the device: route, gather, grouped launch {plan:?}, combine)", dev.name()))
        }
        Err(e) => (c_ref.mapv(|v| dtype.round(v as f32) as f64), format!("CPU reference ({e})")),
    };
    println!(
        "MoE layer: {experts} experts of {n}×{k}, {tokens} tokens × top-{top_k}, outputs combined per token, {}",
        describe(args, dtype)
    );
    print_errors(&how, &c_q, &c_fp, &c_ref);
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dtype = match args.dtype.as_str() {
        "bf16" => ActDtype::Bf16,
        "f16" => ActDtype::F16,
        other => return Err(ForgeError::Config(format!("--dtype {other}: use bf16 or f16"))),
    };
    if let Some(experts) = args.experts {
        return eval_experts(&args, dtype, experts);
    }
    let (w, x) = match &args.weights {
        Some(path) => {
            let bytes =
                std::fs::read(path).map_err(|source| ForgeError::Io { path: path.display().to_string(), source })?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| ForgeError::Safetensors(format!("{}: {e}", path.display())))?;
            let (wn, xn) =
                (args.tensor.as_deref().unwrap_or("weight"), args.activations.as_deref().unwrap_or("inputs"));
            (read_2d(&st, wn)?, read_2d(&st, xn)?)
        }
        None => synthetic(args.rows, args.cols, args.tokens, 15),
    };
    let (n, k) = w.dim();
    if x.ncols() != k {
        return Err(ForgeError::Shape(format!("activations have {} features, the weight {k}", x.ncols())));
    }
    let packed = quantize_and_pack(&args, &w, x.view())?;

    let xr = x.mapv(|v| dtype.round(v) as f64);
    let y_fp = xr.dot(&w.mapv(|v| v as f64).t());
    let y_ref = w4a16_matmul_cpu(x.view(), &packed, dtype)?;
    let (y_q, how) = match fourbit_forge::device::GpuDevice::first() {
        Ok(dev) => {
            let (y, plan) = w4a16_matmul_host(&dev, x.view(), &packed, dtype, &W4a16Options::default())?;
            (y.mapv(|v| v as f64), format!("{} ({plan:?})", dev.name()))
        }
        Err(e) => {
            (fourbit_forge::runtime::round_to_act(&y_ref, dtype).mapv(|v| v as f64), format!("CPU reference ({e})"))
        }
    };
    println!("layer {n}×{k}, {} tokens, {}", x.nrows(), describe(&args, dtype));
    print_errors(&how, &y_q, &y_fp, &y_ref);
    Ok(())
}
