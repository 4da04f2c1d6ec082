//! compressed-tensors `pack-quantized` (`PackedQuantizationCompressor`, ≥ 0.18 dense packing).
//!
//! Per Linear `{m}`:
//! * `{m}.weight_packed`: int32 `[out, ceil(in·b/32)]`, the codes of each output row as a
//!   dense bit stream along the input axis ([`pack_rows`]);
//! * `{m}.weight_scale`: scale dtype `[out, n_groups]` (`[out, 1]` per-channel);
//! * `{m}.weight_shape`: int64 `[2]` = `[out, in]`;
//! * `{m}.weight_zero_point`: int32 `[ceil(out·b/32), n_groups]`, zero points packed along
//!   the output axis ([`pack_cols`]), only when asymmetric.
//!
//! compressed-tensors dequantizes grouped weights by reshaping the input axis into
//! `(n_groups, group_size)`, so `in` must be a multiple of the group size.

use super::{
    checked_zeros, fetch, label, scales_in, scales_out, shape_tensor, stored_scales, tensor_name, weight_shape_in,
    words_in, words_out, Codes, DecodedLinear, Dims, QuantSettings, TensorLookup, TensorOut,
    COMPRESSED_TENSORS_VERSION,
};
use crate::pack::PackLayout;
use crate::pack::{pack_cols, pack_rows, packed_len, unpack_cols, unpack_rows};
use crate::QuantGrid;
use crate::{ForgeError, Result};
use serde_json::{json, Value};

pub(super) fn encode(
    s: &QuantSettings,
    module: &str,
    grid: &QuantGrid,
    codes: Codes<'_>,
    d: &Dims,
) -> Result<Vec<TensorOut>> {
    check_divisible(s, module, d.cols)?;
    let zeros = checked_zeros(s, module, grid)?;
    let scales = stored_scales(s, module, grid)?;
    let packed = codes.words(module, s.bits, PackLayout::Rows, |c| pack_rows(c, s.bits))?;
    let mut out = vec![
        words_out(tensor_name(module, "weight_packed"), &packed),
        scales_out(tensor_name(module, "weight_scale"), &scales, s.scale_dtype),
        shape_tensor(tensor_name(module, "weight_shape"), d.rows, d.cols),
    ];
    if !s.symmetric {
        out.push(words_out(tensor_name(module, "weight_zero_point"), &pack_cols(zeros.view(), s.bits)?));
    }
    Ok(out)
}

pub(super) fn decode<L: TensorLookup + ?Sized>(s: &QuantSettings, module: &str, src: &L) -> Result<DecodedLinear> {
    let shape_name = tensor_name(module, "weight_shape");
    let (rows, cols) = weight_shape_in(&fetch(src, &shape_name)?, &shape_name)?;
    check_divisible(s, &shape_name, cols)?;
    let (n_groups, group_cols) = s.groups(cols);

    let packed_name = tensor_name(module, "weight_packed");
    let packed = fetch(src, &packed_name)?;
    let words = words_in(&packed, &packed_name, [rows, packed_len(cols, s.bits)?])?;
    let codes = unpack_rows(words.view(), s.bits, cols)?;

    let scale_name = tensor_name(module, "weight_scale");
    let scales = scales_in(&fetch(src, &scale_name)?, &scale_name, s.scale_dtype, [rows, n_groups])?;

    let zeros = if s.symmetric {
        ndarray::Array2::from_elem((rows, n_groups), s.symmetric_zero() as u16)
    } else {
        let zp_name = tensor_name(module, "weight_zero_point");
        let zp = fetch(src, &zp_name)?;
        let words = words_in(&zp, &zp_name, [packed_len(rows, s.bits)?, n_groups])?;
        unpack_cols(words.view(), s.bits, rows)?.mapv(u16::from)
    };
    let dequant = super::dequantize_groups(codes.view(), scales.view(), zeros.view(), group_cols)?;
    Ok(DecodedLinear { codes, scales, zeros, group_cols, dequant })
}

/// The `quantization_config` llm-compressor writes (`ModelCompressor.update_config`): one
/// config group targeting every `Linear`, weights only, no activation quantization. Only keys
/// that `QuantizationArgs` / `QuantizationScheme` (pydantic, `extra="forbid"`) know since
/// 0.17 are used; `scale_dtype` is left out (the stored tensor's dtype says it).
pub(super) fn config(s: &QuantSettings, ignore: &[String]) -> Value {
    let (strategy, group_size) = match s.group_size {
        Some(gs) => ("group", json!(gs)),
        None => ("channel", Value::Null),
    };
    json!({
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": s.bits,
                    "type": "int",
                    "symmetric": s.symmetric,
                    "group_size": group_size,
                    "strategy": strategy,
                    "dynamic": false,
                },
                "input_activations": null,
                "output_activations": null,
                "format": "pack-quantized",
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": null,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    })
}

fn check_divisible(s: &QuantSettings, module: &str, cols: usize) -> Result<()> {
    match s.group_size {
        Some(gs) if !cols.is_multiple_of(gs) => Err(ForgeError::Format(format!(
            "{}: in_features {cols} is not a multiple of group_size {gs}; compressed-tensors dequantizes \
             groups by reshaping the input axis and refuses a partial last group",
            label(module)
        ))),
        _ => Ok(()),
    }
}
