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
//! output on the packed 4-bit weight (the CPU reference where there is no GPU, said so). The
//! weight is quantized here with the library (round-to-nearest, or GPTQ with `--gptq`, whose
//! Hessian `2/n·XᵀX` comes from the same activations). Also printed: the kernel against its
//! own CPU reference (accumulation order and output rounding only) and the launch plan.

use clap::Parser;
use fourbit_forge::hessian::{pre_step_cpu, PreStepConfig};
use fourbit_forge::numerics::quantize;
use fourbit_forge::runtime::{pack_for_kernel, w4a16_matmul_cpu, w4a16_matmul_host, ActDtype, W4a16Options};
use fourbit_forge::{
    Backend, ForgeError, GridConfig, MseSearch, QuantGrid, Quantizer, Result, ScaleSearch, WeightView,
};
use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// Check a 4-bit quantized linear layer with the W4A16 kernel.
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

/// Heavy-tailed weights and activations with outlier input channels (deterministic).
fn synthetic(n: usize, k: usize, tokens: usize) -> (Array2<f32>, Array2<f32>) {
    use rand_distr::{Distribution, StandardNormal, StudentT};
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
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
fn rtn_codes(w: ArrayView2<'_, f32>, grid: &QuantGrid) -> Array2<u8> {
    Array2::from_shape_fn(w.dim(), |(r, c)| {
        let m = grid.meta(r, c / grid.group_size);
        quantize(w[[r, c]], m.scale(), m.qzero_f32(), grid.maxq as f32) as u8
    })
}

fn rel(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dtype = match args.dtype.as_str() {
        "bf16" => ActDtype::Bf16,
        "f16" => ActDtype::F16,
        other => return Err(ForgeError::Config(format!("--dtype {other}: use bf16 or f16"))),
    };
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
        None => synthetic(args.rows, args.cols, args.tokens),
    };
    let (n, k) = w.dim();
    if x.ncols() != k {
        return Err(ForgeError::Shape(format!("activations have {} features, the weight {k}", x.ncols())));
    }
    let cfg = GridConfig {
        group_size: args.group_size,
        bits: 4,
        symmetric: !args.asym,
        scale_search: if args.mse { ScaleSearch::Mse(MseSearch::default()) } else { ScaleSearch::Absmax },
        ..GridConfig::default()
    };
    let quantizer = Quantizer::new(cfg, Backend::Cpu);
    let grid = quantizer.build_quant_grid(WeightView::F32(w.view()))?;
    let codes = if args.gptq {
        let xt = x.mapv(|v| v as f64);
        let h = (xt.t().dot(&xt) * (2.0 / x.nrows() as f64)).mapv(|v| v as f32);
        let mut wq = w.clone();
        let pre = pre_step_cpu(h.view(), Some(&mut wq), &PreStepConfig::default())?;
        quantizer.solve(wq.view(), pre.hinv_factor.view(), &grid, pre.perm.as_deref())?.qweight
    } else {
        rtn_codes(w.view(), &grid)
    };
    let packed = pack_for_kernel(codes.view(), &grid)?;

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
    println!(
        "layer {n}×{k}, {} tokens, {dtype:?}, 4-bit gs {} {}{}, {}",
        x.nrows(),
        args.group_size,
        if args.asym { "asymmetric" } else { "symmetric" },
        if args.mse { " MSE" } else { "" },
        if args.gptq { "GPTQ" } else { "round-to-nearest" }
    );
    println!("ran on: {how}");
    println!("‖Y_q − Y_fp‖ / ‖Y_fp‖        = {:.6}   (quantization error of the layer)", rel(&y_q, &y_fp));
    println!(
        "‖Y_q − Y_ref‖ / ‖Y_ref‖      = {:.2e} (kernel vs its CPU reference: accumulation order, output rounding)",
        rel(&y_q, &y_ref)
    );
    Ok(())
}
