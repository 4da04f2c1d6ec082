//! CPU reference grid builder (ndarray + rayon over rows).

use super::{DecodedQMeta, GridConfig, QuantGrid, ScaleSearch};
use crate::{ForgeError, QMetaPacked, Result, WeightView};
use forge_numerics::{dequantize, encode_log2_q88, quantize, range_meta, stored_scale, ScaleDtype};
use ndarray::{Array2, Array3, ArrayView3};
use rayon::prelude::*;

/// Builds the qmeta4 grid of `weight` on the CPU (the reference for the GPU builder).
///
/// Groups run along the last axis (input columns); the last group is zero-padded and the
/// pad takes part in min/max and in the MSE loss, as in the seed spec.
pub fn build_quant_grid(weight: WeightView<'_>, config: &GridConfig) -> Result<QuantGrid> {
    let (rows, cols) = weight.dim();
    config.validate(rows, cols)?;
    let gs = config.group_size;
    let n_groups = config.n_groups(cols);
    let maxq = config.maxq() as f32;
    let factors = match &config.scale_search {
        ScaleSearch::Absmax => Vec::new(),
        ScaleSearch::Mse(m) => m.factors()?,
    };
    let norm = match &config.scale_search {
        ScaleSearch::Mse(m) => m.norm,
        ScaleSearch::Absmax => 2.0,
    };
    let per_row: Vec<Result<Vec<u32>>> = (0..rows)
        .into_par_iter()
        .map_init(
            || vec![0f32; n_groups * gs],
            |buf, r| {
                weight.read_row_f32(r, buf)?;
                buf[cols..].fill(0.0);
                Ok(buf
                    .chunks_exact(gs)
                    .map(|group| {
                        let meta = absmax_meta(group, maxq, config.symmetric);
                        let meta = if factors.is_empty() {
                            meta
                        } else {
                            mse_refine(group, meta, &factors, norm, maxq, config.scale_dtype)
                        };
                        meta.to_u32()
                    })
                    .collect())
            },
        )
        .collect();
    let mut records = Vec::with_capacity(rows * n_groups);
    for row in per_row {
        records.extend(row?);
    }
    let qmeta: Vec<u8> = records.iter().flat_map(|r| r.to_le_bytes()).collect();
    Ok(QuantGrid {
        qmeta: Array3::from_shape_vec((rows, n_groups, 4), qmeta).expect("rows·n_groups·4 bytes"),
        maxq: config.maxq(),
        pad: n_groups * gs - cols,
        group_size: gs,
        scale_dtype: config.scale_dtype,
    })
}

/// Range meta of one group, encoded.
fn absmax_meta(group: &[f32], maxq: f32, symmetric: bool) -> QMetaPacked {
    let (lo, hi) = group.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let m = range_meta(lo, hi, maxq, symmetric);
    QMetaPacked::encode(m.scale, m.qzero, symmetric)
}

/// Tries every shrink factor against the decoded absmax scale; keeps the first minimum. A
/// candidate's loss is evaluated at its scale as stored (`stored_scale(q88, dtype)`), the
/// scale the solver and every runtime use; a stored scale that overflows (f16) never wins.
fn mse_refine(
    group: &[f32],
    base: QMetaPacked,
    factors: &[f32],
    norm: f32,
    maxq: f32,
    dtype: ScaleDtype,
) -> QMetaPacked {
    let base_scale = base.scale();
    let q0 = base.qzero_f32();
    let mut best: Option<(f64, i16)> = None;
    for &p in factors {
        let q88 = encode_log2_q88(base_scale * p);
        let loss = candidate_loss_f64(group, stored_scale(q88, dtype), q0, maxq, norm);
        // An infinite scale dequantizes to NaN (0·inf): rank it last.
        let loss = if loss.is_nan() { f64::INFINITY } else { loss };
        // Strictly smaller wins: equal losses keep the lower index.
        if best.is_none_or(|(b, _)| loss < b) {
            best = Some((loss, q88));
        }
    }
    QMetaPacked { log2_scale_q88: best.map_or(base.log2_scale_q88, |b| b.1), ..base }
}

/// `Σ |dequant(quant(x)) − x|^norm` over a group: codes and dequantized values exactly as the
/// shared numerics make them, the error and its power in f64 (no overflow for any f32 weight;
/// the reference the GPU's f32 sums are checked against).
pub fn candidate_loss_f64(group: &[f32], scale: f32, qzero: f32, maxq: f32, norm: f32) -> f64 {
    let norm = norm as f64;
    group
        .iter()
        .map(|&x| {
            let y = dequantize(quantize(x, scale, qzero, maxq), scale, qzero);
            let e = (y as f64 - x as f64).abs();
            if norm == 2.0 {
                e * e
            } else {
                e.powf(norm)
            }
        })
        .sum()
}

pub(crate) fn qmeta_records(qmeta: ArrayView3<'_, u8>) -> Result<(usize, usize, Vec<u32>)> {
    let (rows, groups, four) = qmeta.dim();
    if four != 4 {
        return Err(ForgeError::Shape(format!("qmeta must be (rows, n_groups, 4), got last dim {four}")));
    }
    let recs = qmeta
        .outer_iter()
        .flat_map(|row| row.outer_iter().map(|r| u32::from_le_bytes([r[0], r[1], r[2], r[3]])).collect::<Vec<_>>())
        .collect();
    Ok((rows, groups, recs))
}

/// CPU decode of a `(rows, n_groups, 4)` qmeta tensor.
pub fn decode_qmeta_cpu(qmeta: ArrayView3<'_, u8>) -> Result<DecodedQMeta> {
    let (rows, groups, recs) = qmeta_records(qmeta)?;
    let metas: Vec<QMetaPacked> = recs.into_iter().map(QMetaPacked::from_u32).collect();
    let scale = metas.iter().map(|m| m.scale()).collect();
    let qzero = metas.iter().map(|m| m.qzero_f32()).collect();
    Ok(DecodedQMeta {
        scale: Array2::from_shape_vec((rows, groups), scale).map_err(|e| ForgeError::Internal(e.to_string()))?,
        qzero: Array2::from_shape_vec((rows, groups), qzero).map_err(|e| ForgeError::Internal(e.to_string()))?,
    })
}
