//! The quantized-layer file `quantize_layer` writes: codes, qmeta4 records, the act-order
//! and the GPTQ loss as one safetensors file, with the settings as metadata (docs/design.md
//! §2 for the record layout). Written through [`crate::fsio::write_atomic`], so a reader never
//! sees a partial file.

use crate::{budget, fsio, ForgeError, QuantGrid, Result};
use ndarray::Array2;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// What goes into the file.
pub struct LayerOutput<'a> {
    /// `(rows, cols)` codes, original column order.
    pub codes: &'a Array2<u8>,
    /// The grid the codes index.
    pub grid: &'a QuantGrid,
    /// Act-order column order, if used.
    pub perm: Option<&'a [usize]>,
    /// GPTQ loss per row.
    pub loss: &'a [f32],
    /// Settings and provenance, written as safetensors metadata (string pairs).
    pub metadata: Vec<(String, String)>,
}

pub use crate::fsio::output_dir;

/// Writes `layer` to `out` atomically ([`crate::fsio::write_atomic`]: a temporary file in
/// the same directory, `fsync`, rename, directory `fsync`): a reader, or a crash, sees the old
/// file or the whole new one. Call [`crate::fsio::prepare_output`] before the compute to catch
/// an unusable target early.
pub fn write_layer(out: &Path, layer: &LayerOutput<'_>) -> Result<()> {
    let st_err = |e: safetensors::SafeTensorError| ForgeError::Safetensors(format!("{}: {e}", out.display()));
    let (rows, cols) = layer.codes.dim();
    let (grows, n_groups) = layer.grid.dim();
    if grows != rows || layer.loss.len() != rows || layer.perm.is_some_and(|p| p.len() != cols) {
        return Err(ForgeError::Shape(format!(
            "layer output: codes {rows}×{cols}, grid {grows}×{n_groups}, loss {}, perm {:?}",
            layer.loss.len(),
            layer.perm.map(<[usize]>::len)
        )));
    }
    // The serialized file is built in memory (safetensors writes a header first): about the
    // codes, twice over with the copies below.
    budget::Request::new()
        .array::<u8>(&[rows, cols])
        .array::<u32>(&[rows, n_groups])
        .array::<i64>(&[cols])
        .array::<f32>(&[rows])
        .times(2)
        .check(&format!("serializing a {rows}×{cols} quantized layer"))?;
    let codes = layer.codes.as_standard_layout();
    let qmeta = layer.grid.qmeta.as_standard_layout();
    let pad = (layer.grid.pad as i64).to_le_bytes();
    let perm_bytes: Option<Vec<u8>> = layer.perm.map(|p| p.iter().flat_map(|&j| (j as i64).to_le_bytes()).collect());
    let loss_bytes: Vec<u8> = layer.loss.iter().flat_map(|l| l.to_le_bytes()).collect();
    let contiguous = || ForgeError::Internal("standard layout is not contiguous".into());

    let mut tensors = vec![
        (
            "codes".to_string(),
            TensorView::new(Dtype::U8, vec![rows, cols], codes.as_slice().ok_or_else(contiguous)?).map_err(st_err)?,
        ),
        (
            "qmeta".to_string(),
            TensorView::new(Dtype::U8, vec![rows, n_groups, 4], qmeta.as_slice().ok_or_else(contiguous)?)
                .map_err(st_err)?,
        ),
        ("pad".to_string(), TensorView::new(Dtype::I64, vec![], &pad).map_err(st_err)?),
        ("loss".to_string(), TensorView::new(Dtype::F32, vec![rows], &loss_bytes).map_err(st_err)?),
    ];
    if let Some(p) = &perm_bytes {
        tensors.push(("perm".to_string(), TensorView::new(Dtype::I64, vec![cols], p).map_err(st_err)?));
    }
    let mut meta: HashMap<String, String> = layer.metadata.iter().cloned().collect();
    meta.insert(
        "format".into(),
        "4bit-forge qmeta4: codes (rows, cols) in original column order; qmeta (rows, n_groups, 4) = \
         [lo(log2_q88), hi(log2_q88), qzero, flags]; groups along input columns"
            .into(),
    );
    let bytes = safetensors::serialize(tensors, Some(meta)).map_err(st_err)?;
    fsio::write_file_atomic(out, &bytes)
}
