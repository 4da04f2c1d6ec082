//! 4Bit Forge's qmeta4-native format: what our own runtime kernel reads.
//!
//! Per Linear `{m}`:
//! * `{m}.qweight_packed`: int32 `[out, ceil(in·b/32)]`, the same dense bit stream along the
//!   input axis as compressed-tensors' `weight_packed`;
//! * `{m}.qmeta`: uint8 `[out, n_groups, 4]`, the raw qmeta4 records
//!   `[lo(q88), hi(q88), qzero, flags]` (`q88` = `log2(scale)` in signed Q8.8, little-endian;
//!   `flags` bit 0 = symmetric);
//! * `{m}.weight_shape`: int64 `[2]` = `[out, in]`.
//!
//! `scale = stored_scale(q88, scale_dtype)`: the correctly rounded f32 `2^(q88/256)`, rounded
//! to nearest-even into the config's `scale_dtype`; `w = (q − qzero)·scale`. Groups are
//! `ceil(in / group_size)`, the last may be partial.

use super::{
    checked_zeros, dtype_name, expect, fetch, shape_tensor, stored_scales, tensor_name, weight_shape_in, words_in,
    words_out, Codes, DecodedLinear, Dims, QuantSettings, TensorLookup, TensorOut,
};
use crate::pack::PackLayout;
use crate::pack::{pack_rows, packed_len, unpack_rows};
use crate::QuantGrid;
use crate::{ForgeError, Result};
use forge_numerics::{stored_scale, QMetaPacked};
use ndarray::Array2;
use safetensors::Dtype;
use serde_json::{json, Value};

pub(super) fn encode(
    s: &QuantSettings,
    module: &str,
    grid: &QuantGrid,
    codes: Codes<'_>,
    d: &Dims,
) -> Result<Vec<TensorOut>> {
    checked_zeros(s, module, grid)?;
    // The runtime derives the same stored scales; refuse what it could not represent.
    stored_scales(s, module, grid)?;
    let packed = codes.words(module, s.bits, PackLayout::Rows, |c| pack_rows(c, s.bits))?;
    let qmeta = grid.qmeta.as_standard_layout();
    Ok(vec![
        words_out(tensor_name(module, "qweight_packed"), &packed),
        TensorOut {
            name: tensor_name(module, "qmeta"),
            dtype: Dtype::U8,
            shape: vec![d.rows, d.n_groups, 4],
            data: qmeta.iter().copied().collect(),
        },
        shape_tensor(tensor_name(module, "weight_shape"), d.rows, d.cols),
    ])
}

pub(super) fn decode<L: TensorLookup + ?Sized>(s: &QuantSettings, module: &str, src: &L) -> Result<DecodedLinear> {
    let shape_name = tensor_name(module, "weight_shape");
    let (rows, cols) = weight_shape_in(&fetch(src, &shape_name)?, &shape_name)?;
    let (n_groups, group_cols) = s.groups(cols);
    let packed_name = tensor_name(module, "qweight_packed");
    let words = words_in(&fetch(src, &packed_name)?, &packed_name, [rows, packed_len(cols, s.bits)?])?;
    let codes = unpack_rows(words.view(), s.bits, cols)?;

    let qmeta_name = tensor_name(module, "qmeta");
    let qmeta = fetch(src, &qmeta_name)?;
    expect(&qmeta, &qmeta_name, Dtype::U8, &[rows, n_groups, 4])?;
    let records: Vec<QMetaPacked> =
        qmeta.data.chunks_exact(4).map(|b| QMetaPacked::from_bytes([b[0], b[1], b[2], b[3]])).collect();
    let sym = s.symmetric_zero();
    if let Some((i, m)) =
        records.iter().enumerate().find(|(_, m)| if s.symmetric { m.qzero != sym } else { m.qzero as u32 > s.maxq() })
    {
        return Err(ForgeError::Format(format!(
            "{qmeta_name}: zero point {} at row {}, group {} does not fit the settings ({} bits, symmetric {})",
            m.qzero,
            i / n_groups.max(1),
            i % n_groups.max(1),
            s.bits,
            s.symmetric
        )));
    }
    let scales: Vec<f32> = records.iter().map(|m| stored_scale(m.log2_scale_q88, s.scale_dtype)).collect();
    let zeros: Vec<u16> = records.iter().map(|m| m.qzero as u16).collect();
    let shape_err = |e: ndarray::ShapeError| ForgeError::Format(format!("{qmeta_name}: {e}"));
    let scales = Array2::from_shape_vec((rows, n_groups), scales).map_err(shape_err)?;
    let zeros = Array2::from_shape_vec((rows, n_groups), zeros).map_err(shape_err)?;
    let dequant = super::dequantize_groups(codes.view(), scales.view(), zeros.view(), group_cols)?;
    Ok(DecodedLinear { codes, scales, zeros, group_cols, dequant })
}

pub(super) fn config(s: &QuantSettings, ignore: &[String]) -> Value {
    json!({
        "quant_method": "forge-qmeta4",
        "format": "qmeta4-packed",
        "version": 1,
        "bits": s.bits,
        "group_size": s.group_size,
        "symmetric": s.symmetric,
        "scale_dtype": dtype_name(s.scale_dtype),
        "act_order_solved": s.act_order,
        "ignore": ignore,
        "tensors": {
            "qweight_packed": "int32 [out, ceil(in*bits/32)]: per output row, code i at bits [i*bits, i*bits+bits) of a little-endian bit stream",
            "qmeta": "uint8 [out, n_groups, 4]: [lo(q88), hi(q88), qzero, flags]; scale = 2^(q88/256) correctly rounded to f32, then rounded to scale_dtype; flags bit 0 = symmetric",
            "weight_shape": "int64 [2] = [out, in]",
            "dequant": "w = (q - qzero) * scale; groups of group_size input columns, the last may be partial",
        },
    })
}
