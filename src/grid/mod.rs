//! The grid: one qmeta4 record per (row, group of `group_size` input columns) (docs/design.md §3).
//!
//! [`build_quant_grid`] is the CPU reference; the GPU builder ([`build_quant_grid_gpu`],
//! [`build_quant_grid_device`]) produces the same records (bit-identical for absmax, same MSE
//! choice up to the documented tolerance, docs/design.md §3).

mod cpu;
mod cuda;

pub use cpu::{build_quant_grid, candidate_loss_f64, decode_qmeta_cpu};
pub use cuda::{
    build_quant_grid_device, build_quant_grid_gpu, decode_qmeta_gpu, launch_grid_into, launch_grid_kernel, DeviceGrid,
    DeviceWeight, GridRef, WeightRef,
};

use crate::{ForgeError, QMetaPacked, Result};
use forge_numerics::stored_scale;
pub use forge_numerics::ScaleDtype;
use ndarray::{Array2, Array3};

/// Decoded grid: `(rows, n_groups)` scales and zero points.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedQMeta {
    /// `2^(q88/256)`, correctly rounded.
    pub scale: Array2<f32>,
    /// The u8 zero point as f32.
    pub qzero: Array2<f32>,
}

/// The most MSE candidates a search may use (the GPU keeps them in constant memory).
pub const MAX_CANDIDATES: usize = 1024;

/// How a group's scale is chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum ScaleSearch {
    /// Range (absmax) meta only.
    Absmax,
    /// Absmax, then the shrink factor minimising `Σ|ŷ−x|^norm`.
    Mse(MseSearch),
}

/// MSE / Lᵖ scale search settings (defaults: linspace(1, 0.2, 100), norm 2.4).
#[derive(Clone, Debug, PartialEq)]
pub struct MseSearch {
    /// The shrink factors `p_k` tried against the absmax scale.
    pub candidates: ShrinkCandidates,
    /// The loss exponent (2 takes a fast path).
    pub norm: f32,
}

impl Default for MseSearch {
    fn default() -> Self {
        MseSearch { candidates: ShrinkCandidates::Linspace { max_shrink: 0.2, n_grid: 100 }, norm: 2.4 }
    }
}

/// Where the shrink factors come from.
#[derive(Clone, Debug, PartialEq)]
pub enum ShrinkCandidates {
    /// `torch.linspace(1.0, max_shrink, n_grid)`.
    Linspace {
        /// Smallest factor, in `(0, 1]`.
        max_shrink: f32,
        /// Number of factors, in `1..=1024`.
        n_grid: usize,
    },
    /// An explicit list (1 to 1024 finite positive factors), tried in order.
    List(Vec<f32>),
}

impl MseSearch {
    /// The validated list of shrink factors, in search order.
    pub fn factors(&self) -> Result<Vec<f32>> {
        if !(self.norm.is_finite() && self.norm > 0.0) {
            return Err(ForgeError::ScaleSearch(format!("norm must be finite and > 0, got {}", self.norm)));
        }
        match &self.candidates {
            ShrinkCandidates::Linspace { max_shrink, n_grid } => {
                if *n_grid == 0 || *n_grid > MAX_CANDIDATES {
                    return Err(ForgeError::ScaleSearch(format!(
                        "n_grid must be in 1..={MAX_CANDIDATES}, got {n_grid}"
                    )));
                }
                if !(*max_shrink > 0.0 && *max_shrink <= 1.0) {
                    return Err(ForgeError::ScaleSearch(format!("max_shrink must be in (0, 1], got {max_shrink}")));
                }
                let n = *n_grid as u32;
                Ok((0..n).map(|i| forge_numerics::linspace_f32(1.0, *max_shrink, n, i)).collect())
            }
            ShrinkCandidates::List(list) => {
                if list.is_empty() || list.len() > MAX_CANDIDATES {
                    return Err(ForgeError::ScaleSearch(format!(
                        "a candidate list needs 1..={MAX_CANDIDATES} factors, got {}",
                        list.len()
                    )));
                }
                if let Some(bad) = list.iter().find(|p| !(p.is_finite() && **p > 0.0)) {
                    return Err(ForgeError::ScaleSearch(format!("candidate factor {bad} is not finite and > 0")));
                }
                Ok(list.clone())
            }
        }
    }
}

/// What to build: the quantization format of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct GridConfig {
    /// Input columns per group: a multiple of 32 in `32..=1024`.
    pub group_size: usize,
    /// Bits per code, `2..=8`.
    pub bits: u32,
    /// Symmetric (`q0 = (maxq+1)/2`) or asymmetric range.
    pub symmetric: bool,
    /// Absmax or MSE / Lᵖ search.
    pub scale_search: ScaleSearch,
    /// The dtype a checkpoint stores the scales in. Every consumer of a record (MSE search,
    /// solver, dequantization) uses its scale as stored, `stored_scale(q88, scale_dtype)`,
    /// so a checkpoint dequantizes to exactly the weights the solver compensated
    /// (docs/design.md §2). The records themselves do not depend on it.
    pub scale_dtype: ScaleDtype,
}

impl Default for GridConfig {
    /// W4, group size 128, symmetric, absmax, f32 scales: the common W4A16 checkpoint format.
    fn default() -> Self {
        GridConfig {
            group_size: 128,
            bits: 4,
            symmetric: true,
            scale_search: ScaleSearch::Absmax,
            scale_dtype: ScaleDtype::F32,
        }
    }
}

impl GridConfig {
    /// Checks group size, bits and search settings against a weight of `rows × cols`.
    pub fn validate(&self, rows: usize, cols: usize) -> Result<()> {
        if !self.group_size.is_multiple_of(32) || !(32..=1024).contains(&self.group_size) {
            return Err(ForgeError::GroupSize(self.group_size));
        }
        if !(2..=8).contains(&self.bits) {
            return Err(ForgeError::Bits(self.bits));
        }
        if rows == 0 || cols == 0 {
            return Err(ForgeError::Shape(format!("weight is empty ({rows}×{cols})")));
        }
        if rows > u32::MAX as usize || cols > u32::MAX as usize / 2 {
            return Err(ForgeError::Shape(format!("weight {rows}×{cols} is too large")));
        }
        if let ScaleSearch::Mse(m) = &self.scale_search {
            m.factors()?;
        }
        Ok(())
    }

    /// `ceil(cols / group_size)`.
    pub fn n_groups(&self, cols: usize) -> usize {
        cols.div_ceil(self.group_size)
    }

    /// `2^bits − 1`.
    pub fn maxq(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
}

/// A built grid: qmeta4 records `(rows, n_groups, 4)` plus what a consumer needs to use them.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantGrid {
    /// `(rows, n_groups, 4)` bytes `[lo(q88), hi(q88), qzero, flags]`, row-major.
    pub qmeta: Array3<u8>,
    /// `2^bits − 1`.
    pub maxq: u32,
    /// Zero columns appended to the last group: `n_groups·group_size − cols`.
    pub pad: usize,
    /// Columns per group.
    pub group_size: usize,
    /// The dtype the scales are stored in: a record's scale is
    /// `stored_scale(q88, scale_dtype)` ([`QuantGrid::scale_zero`]).
    pub scale_dtype: ScaleDtype,
}

impl QuantGrid {
    /// `(rows, n_groups)`.
    pub fn dim(&self) -> (usize, usize) {
        let (r, g, _) = self.qmeta.dim();
        (r, g)
    }

    /// The scale and zero point every consumer uses for `(row, group)`: the record's scale
    /// as stored in [`QuantGrid::scale_dtype`], and its zero point as f32.
    pub fn scale_zero(&self, row: usize, group: usize) -> (f32, f32) {
        let m = self.meta(row, group);
        (stored_scale(m.log2_scale_q88, self.scale_dtype), m.qzero_f32())
    }

    /// The first record whose stored scale is not finite (f16 holds scales below 65520, i.e.
    /// `q88 < 4096`), as a typed error: nothing can be quantized against it or stored.
    pub fn check_stored_scales(&self) -> Result<()> {
        if self.scale_dtype != ScaleDtype::F16 {
            return Ok(()); // f32 and bf16 hold every decoded qmeta4 scale
        }
        let (rows, groups) = self.dim();
        for r in 0..rows {
            for g in 0..groups {
                let m = self.meta(r, g);
                let s = stored_scale(m.log2_scale_q88, self.scale_dtype);
                if !s.is_finite() {
                    return Err(ForgeError::Format(format!(
                        "the scale of row {r}, group {g} ({}) overflows float16; use bf16 or f32 scales",
                        m.scale()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The record of `(row, group)`.
    pub fn meta(&self, row: usize, group: usize) -> QMetaPacked {
        let m = &self.qmeta;
        QMetaPacked::from_bytes([m[[row, group, 0]], m[[row, group, 1]], m[[row, group, 2]], m[[row, group, 3]]])
    }

    /// All records as little-endian u32s, row-major (the kernels' layout).
    pub fn to_u32_vec(&self) -> Vec<u32> {
        let bytes = self.qmeta.as_standard_layout();
        bytes
            .as_slice()
            .expect("standard layout is contiguous")
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// A grid from u32 records (the kernels' layout).
    pub fn from_u32(
        records: &[u32],
        rows: usize,
        n_groups: usize,
        maxq: u32,
        pad: usize,
        group_size: usize,
        scale_dtype: ScaleDtype,
    ) -> Result<Self> {
        if records.len() != rows * n_groups {
            return Err(ForgeError::Shape(format!("{} qmeta records for a {rows}×{n_groups} grid", records.len())));
        }
        let bytes: Vec<u8> = records.iter().flat_map(|r| r.to_le_bytes()).collect();
        let qmeta = Array3::from_shape_vec((rows, n_groups, 4), bytes).map_err(|e| ForgeError::Shape(e.to_string()))?;
        Ok(QuantGrid { qmeta, maxq, pad, group_size, scale_dtype })
    }
}
