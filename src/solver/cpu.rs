//! CPU reference GPTQ solver (rayon over chunks of rows, register-tiled lazy-batch updates)
//! and the layer-output error.

use super::{first_non_finite, validate_inputs, SolveOutput};
use crate::{budget, ForgeError, QuantGrid, Result, Warning, WeightView};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, Par};
use forge_numerics::{dequantize, quantize};
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;

/// Columns per lazy batch: updates inside a batch are applied eagerly, updates of later
/// columns once per batch (GPTQ's blocking, for cache reuse of `U`).
const BLOCK: usize = 128;
/// Rows per register tile of the trailing update: each loaded piece of `U` serves them all.
const ROW_TILE: usize = 4;
/// Register tiles per rayon task: a `U` tile loaded once stays in L1 for all of them.
const TILES: usize = 4;
/// Rows per rayon task.
const ROW_CHUNK: usize = ROW_TILE * TILES;

/// Solves one layer with GPTQ on the CPU (the reference for the GPU solver, docs/design.md §4).
///
/// For `t` in `0..cols`, `j = perm[t]` (identity without `perm`), every row `r`:
/// `q = quantize(w[r,j], s, q0, maxq)` with the meta of `(r, j / gs)` (static groups on
/// original column indices; `s` the record's scale as stored, [`QuantGrid::scale_zero`]),
/// `deq = (q − q0)·s`, `err = (w[r,j] − deq) / U[t,t]`, and for every `k > t`:
/// `w[r, perm[k]] = w[r, perm[k]] − err·U[t,k]`.
///
/// Numerics, all f32 except the loss: the quantize/dequantize are
/// [`forge_numerics::quantize`] / [`forge_numerics::dequantize`] (shared with the GPU);
/// `err` is a true division; each update is a separate multiply and subtract (never fused),
/// and every working weight receives its updates in increasing `t`. Columns are processed
/// in lazy batches of 128 (a later batch's columns get the whole batch's updates at once,
/// still in increasing `t`), rows in chunks of 16 on rayon, and the batched updates by a
/// SIMD kernel picked for the CPU (AVX-512F, AVX2 or portable). All of that changes only
/// when an update happens, never its operands or order: the result is bit-identical to the
/// straightforward recurrence, whatever the thread count or instruction set. The per-row loss `Σ_t err²/2` is accumulated in
/// f64 in increasing `t` and returned as f32.
///
/// `hinv_factor` is `U` of the permuted Hessian (`H⁻¹ = UᵀU`); its strict lower triangle is
/// never read. Bad shapes, a `perm` that is not a permutation, non-finite inputs, a
/// diagonal of `U` that is not `> 0`, a grid whose records disagree with its `maxq` (see
/// [`super::validate_inputs`]), a dequantized value, working weight or per-row loss that
/// overflows f32, or a solve larger than the host memory budget give a typed error. Groups
/// whose nonzero weights all dequantize to 0 are reported in
/// [`SolveOutput::warnings`] ([`Warning::FlushedGroups`]).
pub fn solve_cpu(
    weight: ArrayView2<'_, f32>,
    hinv_factor: ArrayView2<'_, f32>,
    grid: &QuantGrid,
    perm: Option<&[usize]>,
) -> Result<SolveOutput> {
    // The memory first (it depends only on the shape): the full validation reads every input.
    let (rows, cols) = weight.dim();
    let kernel = TrailingKernel::detect();
    let per_worker = budget::Request::new().array::<f32>(&[ROW_CHUNK, cols]).times(rayon::current_num_threads());
    budget::Request::new()
        .array::<u8>(&[rows, cols])
        .array::<f32>(&[rows, cols])
        .array::<f32>(&[cols, cols])
        .array::<f32>(&[cols, cols])
        .array::<usize>(&[cols, 2])
        .plus(per_worker)
        .check(&format!("the CPU solve of a {rows}×{cols} layer"))?;
    validate_inputs(weight, hinv_factor, grid, perm)?;
    let mut out = solve_validated(weight, hinv_factor, grid, perm, kernel)?;
    out.warnings.extend(flushed_groups(weight, out.dequant.view(), grid.group_size)?);
    Ok(out)
}

/// [`Warning::FlushedGroups`] when some `(row, group)` of `weight` holds a nonzero value but
/// every dequantized value of it is 0 (relative error 1 there). Groups of `group_size`
/// columns; `weight` and `dequant` must have the same shape.
pub fn flushed_groups(
    weight: ArrayView2<'_, f32>,
    dequant: ArrayView2<'_, f32>,
    group_size: usize,
) -> Result<Option<Warning>> {
    flushed_groups_of(WeightView::F32(weight), dequant, group_size)
}

/// [`flushed_groups`] of a weight in any stored dtype (zero is zero in every one of them).
pub fn flushed_groups_of(
    weight: WeightView<'_>,
    dequant: ArrayView2<'_, f32>,
    group_size: usize,
) -> Result<Option<Warning>> {
    if weight.dim() != dequant.dim() || group_size == 0 {
        let ((a, b), (c, d)) = (weight.dim(), dequant.dim());
        return Err(ForgeError::Shape(format!(
            "flushed_groups: weight {a}×{b}, dequant {c}×{d}, group size {group_size}"
        )));
    }
    flushed_scan(
        weight.dim(),
        |r, w| weight.read_row_f32(r, w),
        group_size,
        &[],
        |r, c0, c1| dequant.slice(ndarray::s![r, c0..c1]).iter().all(|&q| q == 0.0),
    )
}

/// [`flushed_groups`] of a result given as codes and grid (the dequantized values are
/// evaluated on the fly with the solver's numerics, never stored). `dead_columns` of `weight`
/// count as 0, as the solver saw them.
pub(crate) fn flushed_groups_codes(
    weight: WeightView<'_>,
    codes: ArrayView2<'_, u8>,
    grid: &QuantGrid,
    dead_columns: &[usize],
) -> Result<Option<Warning>> {
    let (rows, cols) = weight.dim();
    let gs = grid.group_size;
    if codes.dim() != (rows, cols) || gs == 0 || grid.dim() != (rows, cols.div_ceil(gs)) {
        let ((a, b), (g0, g1)) = (codes.dim(), grid.dim());
        return Err(ForgeError::Shape(format!(
            "flushed_groups: weight {rows}×{cols}, codes {a}×{b}, grid {g0}×{g1} with group size {gs}"
        )));
    }
    flushed_scan(
        (rows, cols),
        |r, w| weight.read_row_f32(r, w),
        gs,
        dead_columns,
        |r, c0, c1| {
            // The scale as stored, as the solver dequantized with it.
            grid.scale_zero(r, c0 / gs).is_ok_and(|(s, z)| {
                codes.slice(ndarray::s![r, c0..c1]).iter().all(|&q| dequantize(f32::from(q), s, z) == 0.0)
            })
        },
    )
}

/// [`flushed_in_row`] of every row of the `rows × cols` weight `read_row` reads (`zeroed`
/// columns read as 0), `all_zero(row, c0, c1)` per group; rows on all cores.
fn flushed_scan(
    (rows, cols): (usize, usize),
    read_row: impl Fn(usize, &mut [f32]) -> Result<()> + Sync,
    group_size: usize,
    zeroed: &[usize],
    all_zero: impl Fn(usize, usize, usize) -> bool + Sync,
) -> Result<Option<Warning>> {
    let n_groups = cols.div_ceil(group_size);
    let per_row: Vec<Result<RowFlushed>> = (0..rows)
        .into_par_iter()
        .map_init(
            || vec![0f32; cols],
            |w, r| {
                read_row(r, w)?;
                for &j in zeroed {
                    if let Some(v) = w.get_mut(j) {
                        *v = 0.0;
                    }
                }
                Ok(flushed_in_row(w, group_size, |c0, c1| all_zero(r, c0, c1)))
            },
        )
        .collect();
    flushed_warning(per_row, n_groups)
}

/// One row's flushed groups: how many, and the first ([`flushed_in_row`]).
pub(crate) type RowFlushed = (usize, Option<usize>);

/// The flushed groups of one row `w` (dead columns already read as 0): groups holding a
/// nonzero value for which `all_zero(c0, c1)` (every dequantized value of columns `c0..c1` is
/// 0); their count and the first one.
pub(crate) fn flushed_in_row(
    w: &[f32],
    group_size: usize,
    all_zero: impl Fn(usize, usize) -> bool,
) -> (usize, Option<usize>) {
    let (mut count, mut first) = (0, None);
    for (g, group) in w.chunks(group_size.max(1)).enumerate() {
        let c0 = g * group_size;
        if group.iter().any(|&v| v != 0.0) && all_zero(c0, c0 + group.len()) {
            count += 1;
            first.get_or_insert(g);
        }
    }
    (count, first)
}

/// [`Warning::FlushedGroups`] from each row's [`flushed_in_row`], rows in order.
pub(crate) fn flushed_warning(per_row: Vec<Result<RowFlushed>>, n_groups: usize) -> Result<Option<Warning>> {
    let rows = per_row.len();
    let (mut groups, mut first) = (0, None);
    for (r, p) in per_row.into_iter().enumerate() {
        let (count, g) = p?;
        groups += count;
        if first.is_none() {
            first = g.map(|g| (r, g));
        }
    }
    Ok(first.map(|first| Warning::FlushedGroups { groups, total: rows * n_groups, first }))
}

/// [`solve_cpu`] after validation, with the trailing-update kernel chosen by the caller.
fn solve_validated(
    weight: ArrayView2<'_, f32>,
    hinv_factor: ArrayView2<'_, f32>,
    grid: &QuantGrid,
    perm: Option<&[usize]>,
    kernel: TrailingKernel,
) -> Result<SolveOutput> {
    let (rows, cols) = weight.dim();
    let order: Vec<usize> = match perm {
        Some(p) => p.to_vec(),
        None => (0..cols).collect(),
    };
    let groups: Vec<usize> = order.iter().map(|&j| j / grid.group_size).collect();
    // Row-major copy of U: the trailing update streams its rows.
    let u: Vec<f32> = hinv_factor.iter().copied().collect();
    let panels = Panels::pack(&u, cols, kernel.lanes());
    let ctx = SolveCtx {
        weight: weight.view(),
        u: &u,
        panels: &panels,
        order: &order,
        groups: &groups,
        grid,
        cols,
        maxq: grid.maxq as f32,
        kernel,
    };

    let mut codes = vec![0u8; rows * cols];
    let mut deq = vec![0f32; rows * cols];
    let mut loss = vec![0f32; rows];
    codes
        .par_chunks_mut(ROW_CHUNK * cols)
        .zip(deq.par_chunks_mut(ROW_CHUNK * cols))
        .zip(loss.par_chunks_mut(ROW_CHUNK))
        .enumerate()
        .try_for_each(|(chunk, ((c, d), l))| ctx.solve_chunk(chunk * ROW_CHUNK, c, d, l))?;

    let shape_err = |e: ndarray::ShapeError| ForgeError::Shape(e.to_string());
    Ok(SolveOutput {
        qweight: Array2::from_shape_vec((rows, cols), codes).map_err(shape_err)?,
        dequant: Array2::from_shape_vec((rows, cols), deq).map_err(shape_err)?,
        loss: Array1::from_vec(loss),
        warnings: Vec::new(),
    })
}

/// Everything a chunk of rows reads.
struct SolveCtx<'a> {
    weight: ArrayView2<'a, f32>,
    /// `U`, row-major `cols × cols`.
    u: &'a [f32],
    /// `U`'s lazy-batch updates packed for the kernel.
    panels: &'a Panels,
    /// Column processed at step `t` (original index).
    order: &'a [usize],
    /// Group of `order[t]`.
    groups: &'a [usize],
    grid: &'a QuantGrid,
    cols: usize,
    maxq: f32,
    kernel: TrailingKernel,
}

impl SolveCtx<'_> {
    /// Solves rows `r0 .. r0 + loss.len()` (at most [`ROW_CHUNK`]) into their output slices.
    fn solve_chunk(&self, r0: usize, codes: &mut [u8], deq: &mut [f32], loss: &mut [f32]) -> Result<()> {
        let cols = self.cols;
        let nrows = loss.len();
        // Private working copy in processing order; rows past `nrows` stay zero and get
        // zero errors, so the trailing update always works on full tiles.
        let mut work = vec![0f32; ROW_CHUNK * cols];
        for (i, row) in work.chunks_exact_mut(cols).take(nrows).enumerate() {
            for (w, &j) in row.iter_mut().zip(self.order) {
                *w = self.weight[[r0 + i, j]];
            }
        }
        // (scale as stored, qzero) per (row, group), decoded once instead of per element.
        let n_groups = self.grid.dim().1;
        let mut meta = Vec::with_capacity(nrows * n_groups);
        for i in 0..nrows {
            for g in 0..n_groups {
                meta.push(self.grid.scale_zero(r0 + i, g)?);
            }
        }
        // errs[t − b0][tile][row in tile]: the layout the trailing kernel reads.
        let mut errs = vec![[[0f32; ROW_TILE]; TILES]; BLOCK];
        let mut loss_acc = [0f64; ROW_CHUNK];

        for b0 in (0..cols).step_by(BLOCK) {
            let b1 = (b0 + BLOCK).min(cols);
            for t in b0..b1 {
                let urow = &self.u[t * cols..(t + 1) * cols];
                let d = urow[t];
                let j = self.order[t];
                for i in 0..nrows {
                    let row = &mut work[i * cols..(i + 1) * cols];
                    let x = row[t];
                    let (s, z) = meta[i * n_groups + self.groups[t]];
                    let q = quantize(x, s, z, self.maxq);
                    let y = dequantize(q, s, z);
                    let err = (x - y) / d;
                    if !err.is_finite() {
                        // Inputs are finite: say which step overflowed.
                        let (tensor, value) = if !y.is_finite() {
                            (
                                "dequantized weight (q − q0)·scale (f32 overflow: the group's scale is too large, \
                                 weights this close to f32::MAX cannot be represented in this format)",
                                y,
                            )
                        } else if !x.is_finite() {
                            ("solver working weight (f32 overflow during the updates of earlier columns)", x)
                        } else if t == 0 {
                            ("quantization error (w − deq)/U[t,t] at the first column (f32 overflow)", err)
                        } else {
                            ("quantization error (w − deq)/U[t,t] (f32 overflow)", err)
                        };
                        return Err(ForgeError::NonFinite { tensor, row: r0 + i, col: j, value });
                    }
                    codes[i * cols + j] = q as u8;
                    deq[i * cols + j] = y;
                    loss_acc[i] += f64::from(err) * f64::from(err);
                    errs[t - b0][i / ROW_TILE][i % ROW_TILE] = err;
                    for (w, &ut) in row[t + 1..b1].iter_mut().zip(&urow[t + 1..b1]) {
                        *w -= err * ut;
                    }
                }
            }
            let batch = Batch {
                errs: &errs[..b1 - b0],
                panel: self.panels.block(b0 / BLOCK),
                u_rows: &self.u[b0 * cols..b1 * cols],
                cols,
                k0: b1,
            };
            self.kernel.run(&mut work, batch);
        }
        for (i, (l, acc)) in loss.iter_mut().zip(loss_acc).enumerate() {
            *l = (acc / 2.0) as f32;
            if !l.is_finite() {
                return Err(ForgeError::Numeric(format!(
                    "the GPTQ loss of row {} is {:.3e}, beyond f32: the weights (or 1/U[t,t]) are too large for \
                     a meaningful result; rescale the layer",
                    r0 + i,
                    acc / 2.0
                )));
            }
        }
        Ok(())
    }
}

/// `U`'s pending updates packed once per solve so the kernel streams contiguous memory:
/// for lazy batch `b` (rows `b0..b1`) and each full `lanes`-wide column tile `k` of
/// `b1..cols`, the `(b1 − b0) × lanes` piece `U[b0..b1, k..k + lanes]`, row by row.
struct Panels {
    data: Vec<f32>,
    /// Start of each batch's panels in `data`, plus the end.
    offsets: Vec<usize>,
}

impl Panels {
    fn pack(u: &[f32], cols: usize, lanes: usize) -> Self {
        let mut data = Vec::new();
        let mut offsets = vec![0];
        for b0 in (0..cols).step_by(BLOCK) {
            let b1 = (b0 + BLOCK).min(cols);
            for k in (b1..cols).step_by(lanes).take((cols - b1) / lanes) {
                for t in b0..b1 {
                    data.extend_from_slice(&u[t * cols + k..t * cols + k + lanes]);
                }
            }
            offsets.push(data.len());
        }
        Panels { data, offsets }
    }

    /// The panels of lazy batch `b`.
    fn block(&self, b: usize) -> &[f32] {
        &self.data[self.offsets[b]..self.offsets[b + 1]]
    }
}

/// A batch's errors, `[t − b0][tile][row in tile]`.
type Errs = [[[f32; ROW_TILE]; TILES]];

/// One lazy batch's pending updates (rows `b0..b1` of `U`) and the batch's errors.
#[derive(Clone, Copy)]
struct Batch<'a> {
    /// `errs[t − b0][tile][row in tile]`.
    errs: &'a Errs,
    /// The batch's packed full column tiles (see [`Panels`]).
    panel: &'a [f32],
    /// Rows `b0..b1` of `U`, row-major, `cols` wide (for the last, partial column tile).
    u_rows: &'a [f32],
    cols: usize,
    /// First column the batch has not updated yet (`b1`).
    k0: usize,
}

/// The trailing-update kernel for this CPU, picked once per solve. Every variant computes
/// the same thing with the same operations in the same order (wider registers only).
#[derive(Clone, Copy, Debug)]
enum TrailingKernel {
    /// Baseline x86-64 / other targets: 8 columns per row tile.
    Portable,
    /// x86-64 AVX2: 16 columns per row tile.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// x86-64 AVX-512F: 32 columns per row tile.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl TrailingKernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return TrailingKernel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return TrailingKernel::Avx2;
            }
        }
        TrailingKernel::Portable
    }

    /// Columns per register tile (the panel width).
    fn lanes(self) -> usize {
        match self {
            TrailingKernel::Portable => 8,
            #[cfg(target_arch = "x86_64")]
            TrailingKernel::Avx2 => 16,
            #[cfg(target_arch = "x86_64")]
            TrailingKernel::Avx512 => 32,
        }
    }

    fn run(self, work: &mut [f32], b: Batch<'_>) {
        match self {
            TrailingKernel::Portable => trailing_update::<8>(work, b.errs, b.panel, b.u_rows, b.cols, b.k0),
            // SAFETY: `detect` chose this variant only after the CPU reported the feature.
            #[cfg(target_arch = "x86_64")]
            TrailingKernel::Avx2 => unsafe { trailing_update_avx2(work, b.errs, b.panel, b.u_rows, b.cols, b.k0) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            TrailingKernel::Avx512 => unsafe { trailing_update_avx512(work, b.errs, b.panel, b.u_rows, b.cols, b.k0) },
        }
    }
}

// The slices are separate arguments (not fields of `Batch`) so the compiler knows `work`
// aliases none of the inputs, which it needs to keep the tile in vector registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn trailing_update_avx2(work: &mut [f32], errs: &Errs, panel: &[f32], u_rows: &[f32], cols: usize, k0: usize) {
    trailing_update::<16>(work, errs, panel, u_rows, cols, k0)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn trailing_update_avx512(work: &mut [f32], errs: &Errs, panel: &[f32], u_rows: &[f32], cols: usize, k0: usize) {
    trailing_update::<32>(work, errs, panel, u_rows, cols, k0)
}

/// `w[i, k] −= Σ_t err[i, t]·U[t, k]` for every row of the chunk and every `k ≥ k0`, one
/// multiply and one subtract per term, in increasing `t` (the recurrence's order, so the
/// result does not depend on `LANES` or on the batching). Full `LANES`-wide column tiles
/// come from the packed `panel`, the last partial one from `u_rows`.
#[inline(always)]
fn trailing_update<const LANES: usize>(
    work: &mut [f32],
    errs: &Errs,
    panel: &[f32],
    u_rows: &[f32],
    cols: usize,
    k0: usize,
) {
    let nb = errs.len();
    if nb == 0 {
        return;
    }
    let (pieces, _) = panel.as_chunks::<LANES>();
    let mut k = k0;
    for ktile in pieces.chunks_exact(nb) {
        // The (batch × LANES) piece of U is read once from memory, then from L1 per tile.
        for tile in 0..TILES {
            let mut acc = [[0f32; LANES]; ROW_TILE];
            for (r, a) in acc.iter_mut().enumerate() {
                let at = (tile * ROW_TILE + r) * cols + k;
                a.copy_from_slice(&work[at..at + LANES]);
            }
            for (ut, e) in ktile.iter().zip(errs) {
                for (a, &er) in acc.iter_mut().zip(&e[tile]) {
                    for (x, &v) in a.iter_mut().zip(ut) {
                        *x -= er * v;
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let at = (tile * ROW_TILE + r) * cols + k;
                work[at..at + LANES].copy_from_slice(a);
            }
        }
        k += LANES;
    }
    for k in k..cols {
        for i in 0..ROW_CHUNK {
            let mut x = work[i * cols + k];
            for (urow, e) in u_rows.chunks_exact(cols).zip(errs) {
                x -= e[i / ROW_TILE][i % ROW_TILE] * urow[k];
            }
            work[i * cols + k] = x;
        }
    }
}

/// Rows of `W` and `Q − W` per matmul in [`layer_output_error`] (bounds its memory).
const ERROR_ROW_CHUNK: usize = 512;

/// Relative layer-output error `‖(Q−W)Xᵀ‖² / ‖WXᵀ‖²` written with `H = XᵀX`:
/// `trace((Q−W) H (Q−W)ᵀ) / trace(W H Wᵀ)`, in f64 (faer triangular matmul over row chunks).
///
/// f64 matters: GPTQ drives `Q−W` towards the small-eigenvalue directions of `H`, where an
/// f32 product would lose the value to cancellation. Any scale of `H` cancels out (`XᵀX`,
/// `XᵀX/n` or the accumulator's `2XᵀX/n` give the same ratio). `0/0` (both zero: `Q = W`
/// where `H` sees anything) is 0.
///
/// Errors: mismatched shapes, non-finite inputs, an `H` with a negative diagonal entry or a
/// quadratic form below `−`[`PSD_TOLERANCE`] of its bound (`H` is not positive
/// semi-definite: the "error" would be meaningless), a zero reference `trace(W H Wᵀ)` with a
/// nonzero numerator (the ratio is undefined), and a buffer set beyond the host budget.
pub fn layer_output_error(w: ArrayView2<'_, f32>, q: ArrayView2<'_, f32>, h: ArrayView2<'_, f32>) -> Result<f64> {
    let (rows, cols) = w.dim();
    if q.dim() != (rows, cols) {
        let (a, b) = q.dim();
        return Err(ForgeError::Shape(format!("q is {a}×{b}, w is {rows}×{cols}")));
    }
    if h.dim() != (cols, cols) {
        let (a, b) = h.dim();
        return Err(ForgeError::Shape(format!("h is {a}×{b}, expected {cols}×{cols}")));
    }
    let chunk = rows.min(ERROR_ROW_CHUNK);
    budget::Request::new()
        .array::<f64>(&[cols, cols])
        .array::<f64>(&[2 * chunk, cols])
        .array::<f64>(&[2 * chunk, cols])
        .check(&format!("the layer-output error of a {rows}×{cols} layer"))?;
    first_non_finite(w, "w")?;
    first_non_finite(q, "q")?;
    first_non_finite(h, "h")?;
    if let Some(j) = (0..cols).find(|&j| h[[j, j]] < 0.0) {
        return Err(ForgeError::Hessian(format!(
            "H[{j},{j}] = {} is negative: H is not positive semi-definite (no activations give it), so the \
             layer-output error ‖(Q−W)Xᵀ‖²/‖WXᵀ‖² is meaningless",
            h[[j, j]]
        )));
    }
    // A quadratic form sees only the symmetric part of H: dᵀHd = 2·dᵀTd with T the upper
    // triangle of (H + Hᵀ)/2 and its diagonal halved, which halves the matmul's work.
    let t = Mat::<f64>::from_fn(cols, cols, |i, j| match i.cmp(&j) {
        std::cmp::Ordering::Less => 0.5 * (f64::from(h[[i, j]]) + f64::from(h[[j, i]])),
        std::cmp::Ordering::Equal => 0.5 * f64::from(h[[i, i]]),
        std::cmp::Ordering::Greater => 0.0,
    });
    // |dᵀHd| ≤ (Σ_j |d_j|·sqrt(H_jj))² for a PSD H (Cauchy–Schwarz): the scale a negative
    // quadratic form is judged against.
    let sqrt_diag: Vec<f64> = (0..cols).map(|j| f64::from(h[[j, j]]).sqrt()).collect();
    let (mut num, mut den, mut num_bound, mut den_bound) = (0f64, 0f64, 0f64, 0f64);
    for r0 in (0..rows).step_by(ERROR_ROW_CHUNK) {
        let n = (rows - r0).min(ERROR_ROW_CHUNK);
        // Stack [Q−W; W] so one matmul serves numerator and denominator.
        let s = Mat::<f64>::from_fn(2 * n, cols, |i, j| {
            if i < n {
                f64::from(q[[r0 + i, j]]) - f64::from(w[[r0 + i, j]])
            } else {
                f64::from(w[[r0 + i - n, j]])
            }
        });
        let mut p = Mat::<f64>::zeros(2 * n, cols);
        triangular::matmul(
            p.as_mut(),
            BlockStructure::Rectangular,
            Accum::Replace,
            s.as_ref(),
            BlockStructure::Rectangular,
            t.as_ref(),
            BlockStructure::TriangularUpper,
            2.0,
            Par::rayon(0),
        );
        for j in 0..cols {
            for i in 0..2 * n {
                let v = p[(i, j)] * s[(i, j)];
                if i < n {
                    num += v;
                } else {
                    den += v;
                }
            }
        }
        for i in 0..2 * n {
            let b: f64 = (0..cols).map(|j| s[(i, j)].abs() * sqrt_diag[j]).sum();
            if i < n {
                num_bound += b * b;
            } else {
                den_bound += b * b;
            }
        }
    }
    let num = psd_form(num, num_bound, "trace((Q−W) H (Q−W)ᵀ)")?;
    let den = psd_form(den, den_bound, "trace(W H Wᵀ)")?;
    if den == 0.0 {
        if num == 0.0 {
            return Ok(0.0);
        }
        return Err(ForgeError::Numeric(format!(
            "the reference output ‖WXᵀ‖² = trace(W H Wᵀ) is 0 (W is zero where H sees anything) while the \
             quantization error is {num:.3e}: the relative layer-output error is undefined"
        )));
    }
    let ratio = num / den;
    if !ratio.is_finite() {
        return Err(ForgeError::Numeric(format!("the relative layer-output error {num:.3e} / {den:.3e} overflows")));
    }
    Ok(ratio)
}

/// A quadratic form `dᵀHd` more negative than this fraction of its bound
/// `(Σ|d_j|·sqrt(H_jj))²` proves `H` is not positive semi-definite; smaller negative values
/// are rounding (of `H` in f32 and of the sums) and count as 0.
pub const PSD_TOLERANCE: f64 = 1e-4;

/// `value` if it is a plausible PSD quadratic form (tiny negatives rounded to 0), else an
/// error naming `what`.
fn psd_form(value: f64, bound: f64, what: &str) -> Result<f64> {
    if value >= 0.0 {
        return Ok(value);
    }
    if -value <= PSD_TOLERANCE * bound {
        return Ok(0.0);
    }
    Err(ForgeError::Hessian(format!(
        "{what} = {value:.3e} is negative (beyond the rounding bound {:.3e}): H is not positive \
         semi-definite, so the layer-output error is meaningless",
        PSD_TOLERANCE * bound
    )))
}

/// Round-to-nearest with the grid's own scales (as stored in its scale dtype): the baseline
/// GPTQ must beat, and what a layer without calibration data gets. The grid must fit `w` (records for
/// `(rows, ceil(cols/group_size))`, a valid group size and `maxq`), else a typed error.
pub fn round_to_nearest(w: ArrayView2<'_, f32>, grid: &QuantGrid) -> Result<Array2<f32>> {
    let (rows, cols) = w.dim();
    let gs = grid.group_size;
    if !gs.is_multiple_of(32) || !(32..=1024).contains(&gs) {
        return Err(ForgeError::GroupSize(gs));
    }
    if grid.dim() != (rows, cols.div_ceil(gs)) {
        let (a, b) = grid.dim();
        return Err(ForgeError::Shape(format!(
            "the grid has {a}×{b} records, a {rows}×{cols} weight with group size {gs} needs {rows}×{}",
            cols.div_ceil(gs)
        )));
    }
    if !(3..=255).contains(&grid.maxq) || !(grid.maxq + 1).is_power_of_two() {
        return Err(ForgeError::Shape(format!("grid maxq {} is not 2^bits − 1 with bits in 2..=8", grid.maxq)));
    }
    budget::Request::new().array::<f32>(&[rows, cols]).check(&format!("round-to-nearest of a {rows}×{cols} layer"))?;
    let maxq = grid.maxq as f32;
    let mut out = Array2::zeros((rows, cols));
    for ((r, c), o) in out.indexed_iter_mut() {
        let (s, q0) = grid.scale_zero(r, c / gs)?;
        *o = dequantize(quantize(w[[r, c]], s, q0, maxq), s, q0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::build_quant_grid;
    use crate::{GridConfig, WeightView};

    /// Every kernel this CPU can run gives bit-identical results (the integration tests
    /// only see the one `detect` picks).
    #[test]
    fn all_kernels_agree_bitwise() {
        let (rows, cols) = (37, 331);
        // A deterministic pseudo-random weight and an upper factor with a dominant diagonal.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let w = Array2::from_shape_fn((rows, cols), |_| next());
        let u = Array2::from_shape_fn((cols, cols), |(i, j)| match i.cmp(&j) {
            std::cmp::Ordering::Less => 0.2 * next(),
            std::cmp::Ordering::Equal => 1.0 + next().abs(),
            std::cmp::Ordering::Greater => 0.0,
        });
        let grid = build_quant_grid(WeightView::F32(w.view()), &GridConfig::default()).expect("grid");
        let perm: Vec<usize> = (0..cols).rev().collect();
        let mut kernels = vec![TrailingKernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                kernels.push(TrailingKernel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(TrailingKernel::Avx512);
            }
        }
        let solve = |k| solve_validated(w.view(), u.view(), &grid, Some(&perm), k).expect("solves");
        let reference = solve(TrailingKernel::Portable);
        for k in kernels {
            let out = solve(k);
            assert_eq!(out.qweight, reference.qweight, "{k:?}");
            let same = out.dequant.iter().zip(reference.dequant.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{k:?} dequant");
            assert_eq!(out.loss, reference.loss, "{k:?}");
        }
    }
}
