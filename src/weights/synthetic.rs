//! A realistic stand-in for one layer and its calibration set, for demos and benchmarks
//! when no checkpoint is given.

use crate::hessian::HessianAccumulator;
use crate::{budget, ForgeError, Result};
use ndarray::{Array2, ArrayView2};

/// The most calibration tokens [`synthetic_layer`] makes: 2^24, above the largest real
/// calibration sets (8192 sequences × 2048 tokens), so a mistyped count fails at once instead
/// of running for years.
pub const MAX_SYNTHETIC_TOKENS: usize = 1 << 24;

/// Tokens per calibration batch.
const BATCH: usize = 2048;

/// Heavy-tailed weights (Student-t, 3 dof, ×0.02) with a few outlier input channels ×10,
/// and the Hessian of `tokens` correlated activations `X = Z·A` (Z standard normal, A a
/// random mixing with a decaying spectrum and log-normal per-channel scales), fed to the
/// accumulator in batches as calibration would be. Deterministic in `seed`.
///
/// Everything is checked before any work: `rows`, `cols`, `tokens` > 0, `tokens` at most
/// [`MAX_SYNTHETIC_TOKENS`], and the memory (weight, `cols × cols` mixing matrix, Hessian and
/// its scratch, one batch) against the host budget ([`crate::budget`]).
pub fn synthetic_layer(rows: usize, cols: usize, tokens: usize, seed: u64) -> Result<(Array2<f32>, Array2<f32>)> {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, MatMut, MatRef, Par};
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, LogNormal, StandardNormal, StudentT};
    if rows == 0 || cols == 0 || tokens == 0 {
        return Err(ForgeError::Config(format!(
            "a synthetic layer needs rows, cols and tokens > 0, got {rows}×{cols} with {tokens} tokens"
        )));
    }
    if tokens > MAX_SYNTHETIC_TOKENS {
        return Err(ForgeError::Config(format!(
            "{tokens} calibration tokens is more than the synthetic layer's maximum of {MAX_SYNTHETIC_TOKENS} \
             (2^24: real calibration sets are 128–8192 sequences of at most 2048 tokens)"
        )));
    }
    budget::Request::new()
        .array::<f32>(&[rows, cols])
        .array::<f32>(&[cols, cols])
        .array::<f32>(&[cols, cols])
        .array::<f32>(&[cols, cols])
        .array::<f32>(&[BATCH, cols])
        .array::<f32>(&[BATCH, cols])
        .check(&format!("a synthetic {rows}×{cols} layer with its Hessian"))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t3 = StudentT::new(3.0f32).map_err(|e| ForgeError::Internal(format!("Student-t(3): {e}")))?;
    let mut w = Array2::from_shape_fn((rows, cols), |_| t3.sample(&mut rng) * 0.02);
    let n_outliers = (cols / 512).clamp(1, 16);
    for _ in 0..n_outliers {
        let c = rng.gen_range(0..cols);
        w.column_mut(c).mapv_inplace(|v| v * 10.0);
    }

    let k = cols;
    let channel = LogNormal::new(0.0f32, 0.5).map_err(|e| ForgeError::Internal(format!("log-normal: {e}")))?;
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
        acc.update(
            ArrayView2::from_shape((m, cols), &x[..m * cols]).map_err(|e| ForgeError::Internal(e.to_string()))?,
        )?;
        done += m;
    }
    Ok((w, acc.into_h()))
}
