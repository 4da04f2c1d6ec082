//! The quantized-layer file `quantize_layer` writes: codes, qmeta4 records, the act-order
//! and the GPTQ loss as one safetensors file, with the settings as metadata (docs/design.md
//! §2 for the record layout). Written to a temporary file beside the target, then renamed,
//! so a reader never sees a partial file.

use crate::{ForgeError, QuantGrid, Result};
use ndarray::Array2;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

/// The directory `out` goes to (its temp file is created there too, so the rename is atomic).
pub fn output_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `layer` to `out` through a temporary file in the same directory and a rename.
pub fn write_layer(out: &Path, layer: &LayerOutput<'_>) -> Result<()> {
    let st_err = |e: safetensors::SafeTensorError| ForgeError::Safetensors(format!("{}: {e}", out.display()));
    let (rows, cols) = layer.codes.dim();
    let (_, n_groups) = layer.grid.dim();
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

    let dir = output_dir(out);
    let file_name =
        out.file_name().ok_or_else(|| ForgeError::Config(format!("{} does not name a file", out.display())))?;
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
