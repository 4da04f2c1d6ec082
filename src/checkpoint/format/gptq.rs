//! GPTQ (AutoGPTQ / GPTQModel `TorchQuantLinear` layout), `gptq` (v1) and `gptq_v2`.
//!
//! Per Linear `{m}` (`out = rows`, `in = cols`):
//! * `{m}.qweight`: int32 `[in·b/32, out]`: the codes of each output column as a dense bit
//!   stream along the input axis (for 3 bits GPTQ's 10|1|10|1|10 pattern, which is that
//!   stream);
//! * `{m}.qzeros`: int32 `[n_groups, out·b/32]`: each group's zero points packed along the
//!   output axis; v1 stores `zero − 1` per field (so a zero point of 0 is not representable),
//!   v2 the zero point itself;
//! * `{m}.scales`: float16 `[n_groups, out]`;
//! * `{m}.g_idx`: int32 `[in]`, `g_idx[c] = c / group_size` (static groups; 0 per-channel).
//!
//! Groups are `ceil(in / group_size)` (a partial last group is allowed by the layout).
//! The layout defines 2, 3, 4 and 8 bits; 3 bits need `in` and `out` to be multiples of 32,
//! the others multiples of `32 / b`.

use super::{
    checked_zeros, expect, fetch, label, scales_in, scales_out, stored_scales, tensor_name, words_in, words_out,
    CheckpointFormat, Codes, DecodedLinear, Dims, QuantSettings, ScaleDtype, TensorLookup, TensorOut,
};
use crate::pack::PackLayout;
use crate::pack::{pack_cols, pack_rows, unpack_rows};
use crate::QuantGrid;
use crate::{ForgeError, Result};
use ndarray::Array2;
use safetensors::Dtype;
use serde_json::{json, Map, Value};

pub(super) fn check_settings(s: &QuantSettings) -> Result<()> {
    if !matches!(s.bits, 2 | 3 | 4 | 8) {
        return Err(ForgeError::Format(format!(
            "GPTQ stores 2, 3, 4 or 8 bits, not {} (5–7 bits exist only in GPTQModel's planar gptq_p \
             format); use compressed-tensors",
            s.bits
        )));
    }
    if s.scale_dtype != ScaleDtype::F16 {
        return Err(ForgeError::Format(format!(
            "GPTQ checkpoints store float16 scales, not {}",
            super::dtype_name(s.scale_dtype)
        )));
    }
    Ok(())
}

/// Checks that `n` elements along an axis fill whole packed words in the GPTQ layout.
fn check_axis(s: &QuantSettings, module: &str, axis: &str, n: usize) -> Result<()> {
    let multiple = if s.bits == 3 { 32 } else { 32 / s.bits as usize };
    if n.is_multiple_of(multiple) {
        Ok(())
    } else {
        Err(ForgeError::Format(format!(
            "{}: {axis} {n} is not a multiple of {multiple}, which the GPTQ {}-bit layout packs per int32 block",
            label(module),
            s.bits
        )))
    }
}

pub(super) fn encode(
    s: &QuantSettings,
    module: &str,
    grid: &QuantGrid,
    codes: Codes<'_>,
    d: &Dims,
) -> Result<Vec<TensorOut>> {
    check_axis(s, module, "in_features", d.cols)?;
    check_axis(s, module, "out_features", d.rows)?;
    let zeros = checked_zeros(s, module, grid)?;
    let stored_zeros = if s.format == CheckpointFormat::Gptq {
        if let Some(((r, g), _)) = zeros.indexed_iter().find(|(_, &z)| z == 0) {
            return Err(ForgeError::Format(format!(
                "{}: zero point 0 at row {r}, group {g}: GPTQ v1 stores zero − 1 and cannot hold it; \
                 write gptq_v2 instead",
                label(module)
            )));
        }
        zeros.mapv(|z| z - 1)
    } else {
        zeros
    };
    let scales = stored_scales(s, module, grid)?;
    let qweight = codes.words(module, s.bits, PackLayout::Transposed, |c| pack_cols(c.t(), s.bits))?;
    let qzeros = pack_rows(stored_zeros.t(), s.bits)?;
    let g_idx: Vec<u8> = (0..d.cols).flat_map(|c| ((c / d.group_cols) as i32).to_le_bytes()).collect();
    Ok(vec![
        words_out(tensor_name(module, "qweight"), &qweight),
        words_out(tensor_name(module, "qzeros"), &qzeros),
        scales_out(tensor_name(module, "scales"), &scales.t().to_owned(), s.scale_dtype),
        TensorOut { name: tensor_name(module, "g_idx"), dtype: Dtype::I32, shape: vec![d.cols], data: g_idx },
    ])
}

pub(super) fn decode<L: TensorLookup + ?Sized>(s: &QuantSettings, module: &str, src: &L) -> Result<DecodedLinear> {
    let bits = s.bits as usize;
    let qweight_name = tensor_name(module, "qweight");
    let qweight = fetch(src, &qweight_name)?;
    let (words_in_rows, rows) = match qweight.shape.as_slice() {
        &[k, n] if k > 0 && n > 0 => (k, n),
        other => {
            return Err(ForgeError::Format(format!("{qweight_name} has shape {other:?}, expected [in·b/32, out]")))
        }
    };
    if !(words_in_rows * 32).is_multiple_of(bits) {
        return Err(ForgeError::Format(format!(
            "{qweight_name} has {words_in_rows} rows, not a whole number of {bits}-bit codes per column"
        )));
    }
    let cols = words_in_rows * 32 / bits;
    let qweight = words_in(&qweight, &qweight_name, [words_in_rows, rows])?;
    let codes = unpack_rows(qweight.t(), s.bits, cols)?;

    let (n_groups, group_cols) = s.groups(cols);
    let g_idx_name = tensor_name(module, "g_idx");
    let g_idx = fetch(src, &g_idx_name)?;
    expect(&g_idx, &g_idx_name, Dtype::I32, &[cols])?;
    let bad = g_idx
        .data
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .enumerate()
        .find(|&(c, g)| g as i64 != (c / group_cols) as i64);
    if let Some((c, g)) = bad {
        return Err(ForgeError::Format(format!(
            "{g_idx_name}[{c}] = {g}, expected {} (column / group_size): act-order (desc_act) g_idx \
             checkpoints are not read",
            c / group_cols
        )));
    }

    let scales_name = tensor_name(module, "scales");
    let scales = scales_in(&fetch(src, &scales_name)?, &scales_name, s.scale_dtype, [n_groups, rows])?;
    let qzeros_name = tensor_name(module, "qzeros");
    if !(rows * bits).is_multiple_of(32) {
        return Err(ForgeError::Format(format!("{qzeros_name}: {rows} output columns do not fill whole int32 words")));
    }
    let qzeros = words_in(&fetch(src, &qzeros_name)?, &qzeros_name, [n_groups, rows * bits / 32])?;
    let stored = unpack_rows(qzeros.view(), s.bits, rows)?;
    let v1 = s.format == CheckpointFormat::Gptq;
    let zeros: Array2<u16> = stored.t().mapv(|z| z as u16 + v1 as u16);
    if s.symmetric {
        let want = s.symmetric_zero() as u16;
        if let Some(((r, g), &z)) = zeros.indexed_iter().find(|(_, &z)| z != want) {
            return Err(ForgeError::Format(format!(
                "{qzeros_name}: zero point {z} at row {r}, group {g} in a symmetric checkpoint (expected {want})"
            )));
        }
    }
    let scales = scales.t().to_owned();
    let dequant = super::dequantize_groups(codes.view(), scales.view(), zeros.view(), group_cols)?;
    Ok(DecodedLinear { codes, scales, zeros, group_cols, dequant })
}

/// `quantization_config` / `quantize_config.json` as GPTQModel writes them: `format` is what
/// transformers ≥ 5 reads, `checkpoint_format` what AutoGPTQ, optimum and GPTQModel read;
/// vLLM reads `bits`, `group_size`, `desc_act`, `sym`, `lm_head`, `dynamic`. Unquantized
/// modules become negative `dynamic` rules (`"-:<regex>": {}`), GPTQModel's way to skip them.
pub(super) fn config(s: &QuantSettings, ignore: &[String]) -> Value {
    let mut v = json!({
        "quant_method": "gptq",
        "bits": s.bits,
        "group_size": s.group_size.map_or(-1i64, |g| g as i64),
        "desc_act": false,
        "sym": s.symmetric,
        "lm_head": false,
        "format": s.format.name(),
        "checkpoint_format": s.format.name(),
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [format!("4bit-forge:{}", env!("CARGO_PKG_VERSION"))],
            "static_groups": true,
            "act_order_solved": s.act_order,
        },
    });
    let rules: Map<String, Value> = ignore
        .iter()
        .filter(|m| m.as_str() != "lm_head")
        .map(|m| (format!("-:^{}$", regex_escape(m)), json!({})))
        .collect();
    if !rules.is_empty() {
        if let Some(obj) = v.as_object_mut() {
            obj.insert("dynamic".into(), Value::Object(rules));
        }
    }
    v
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if "\\.+*?()|[]{}^$".contains(ch) {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}
