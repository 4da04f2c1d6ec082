//! The grouped (mixture-of-experts) W4A16 matmul: one launch multiplies each expert's rows of
//! `X` by that expert's packed weight (docs/kernels.md §6, "Grouped launch").
//!
//! The tokens routed to expert `e` are rows `offsets[e] .. offsets[e + 1]` of `X` (sorted by
//! expert, as MoE runtimes gather them) and of `Y`. [`ExpertRouting`] turns the offsets into
//! the launch's row blocks — `(expert, first row, rows)` per block of up to `8·tf` rows, none
//! for an expert without rows — on the host and uploads them once; every matmul with that
//! routing (a layer's gate/up and down projections) reuses them. The kernel is the skinny
//! one with split-K (on compute capability 9.0, the `wgmma` one once an expert has more than
//! 32 rows, in blocks of 64 rows, 128 above 64): each row block runs exactly as the ungrouped
//! launch of its rows would, so the grouped result equals per-expert launches with the same
//! split count (and kernel) bit for bit.
//!
//! Why the routing is on the host: the grid (row blocks × column blocks × splits) and the
//! block shape come from it, so a launch has no idle blocks and no device-side scan. A
//! runtime whose router runs on the GPU would need a device-built task table (not built).

use super::cuda::{launch_fused, plan_layer, FusedLaunch, GroupedRows};
use super::{
    check_dims, check_finite, ActDtype, FusedKernel, PackedDims, PackedWeight, W4a16Options, W4a16Plan, W4a16Workspace,
};
use crate::device::{DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::{ForgeError, Result};
use cudarc::driver::CudaSlice;

/// Rows per row block of the skinny kernel for a grouped launch whose largest expert has
/// `max_rows` rows: `8·tf`, `tf` the power of two covering `max_rows`, at most 8.
fn skinny_rows_per_task(max_rows: usize) -> usize {
    8 * max_rows.clamp(1, 64).div_ceil(8).next_power_of_two()
}

/// Rows per row block of the Hopper `wgmma` kernel's grouped builds, which a grouped launch
/// runs on a compute-capability-9.0 device when an expert has more than 32 rows: 64 (`tf` 8),
/// 128 (`tf` 16) above 64 rows (as the ungrouped plan on large layers).
fn wgmma_rows_per_task(max_rows: usize) -> Option<usize> {
    match max_rows {
        0..=32 => None,
        33..=64 => Some(64),
        _ => Some(128),
    }
}

/// Expert offsets (`[0, r0, r0 + r1, …]`) from the rows routed to each expert.
pub fn expert_offsets(rows_per_expert: &[usize]) -> Vec<usize> {
    let mut offsets = Vec::with_capacity(rows_per_expert.len() + 1);
    let mut end = 0;
    offsets.push(0);
    for &r in rows_per_expert {
        end += r;
        offsets.push(end);
    }
    offsets
}

/// Validated expert offsets and the row blocks they make (host side; see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertTasks {
    /// Experts (`offsets.len() − 1`).
    pub experts: usize,
    /// Rows of `X` and `Y` (`offsets[experts]`).
    pub rows: usize,
    /// Rows of the expert with the most.
    pub max_rows: usize,
    /// Experts with at least one row.
    pub active: usize,
    /// Rows per row block of the skinny kernel (8, 16, 32 or 64).
    pub rows_per_task: usize,
    /// `[expert, first row, rows]` per row block of `rows_per_task`, by expert then row.
    pub tasks: Vec<[u32; 3]>,
    /// Row offsets per expert, as given.
    pub offsets: Vec<usize>,
}

impl ExpertTasks {
    /// The row blocks of `offsets` (`experts + 1` non-decreasing row offsets from 0).
    pub fn new(offsets: &[usize]) -> Result<Self> {
        let bad = |why: String| Err(ForgeError::Shape(format!("expert offsets: {why}")));
        let Some((&last, _)) = offsets.split_last() else {
            return bad("empty (one offset per expert and the end)".into());
        };
        if offsets.len() < 2 {
            return bad("no expert (one offset per expert and the end)".into());
        }
        if offsets[0] != 0 {
            return bad(format!("the first offset is {}, not 0", offsets[0]));
        }
        if let Some(e) = offsets.windows(2).position(|w| w[1] < w[0]) {
            return bad(format!("expert {e} ends at {} before it starts at {}", offsets[e + 1], offsets[e]));
        }
        // Every row and task index must fit the kernel's u32 arguments and the grid.
        if last > i32::MAX as usize || offsets.len() - 1 > i32::MAX as usize {
            return bad(format!("{last} rows over {} experts exceed the launch limits", offsets.len() - 1));
        }
        let counts = || offsets.windows(2).map(|w| w[1] - w[0]);
        let max_rows = counts().max().unwrap_or(0);
        let mut t = ExpertTasks {
            experts: offsets.len() - 1,
            rows: last,
            max_rows,
            active: counts().filter(|&c| c > 0).count(),
            rows_per_task: skinny_rows_per_task(max_rows),
            tasks: Vec::new(),
            offsets: offsets.to_vec(),
        };
        t.tasks = t.tasks_of(t.rows_per_task);
        Ok(t)
    }

    /// The row blocks of at most `height` rows: `[expert, first row, rows]`, by expert then row.
    pub fn tasks_of(&self, height: usize) -> Vec<[u32; 3]> {
        let mut tasks = Vec::new();
        for (e, w) in self.offsets.windows(2).enumerate() {
            let mut r = w[0];
            while r < w[1] {
                let rows = height.min(w[1] - r);
                tasks.push([e as u32, r as u32, rows as u32]);
                r += rows;
            }
        }
        tasks
    }
}

/// [`ExpertTasks`] with its task tables on the device, for [`w4a16_grouped_matmul`].
pub struct ExpertRouting {
    /// The host side.
    pub tasks: ExpertTasks,
    /// The device table for each block height a plan may pick: the skinny kernel's, and the
    /// `wgmma` kernel's where the device has it and an expert has more than 32 rows.
    tables: Vec<(usize, u32, CudaSlice<u32>)>,
    /// The `wgmma` kernel's block height, where it has a table.
    wgmma_rows: Option<usize>,
}

impl ExpertRouting {
    /// Validates `offsets` and uploads the row blocks (ordered copies on the device's stream;
    /// not inside a graph capture, which cannot copy from pageable memory).
    pub fn new(dev: &GpuDevice, offsets: &[usize]) -> Result<Self> {
        let tasks = ExpertTasks::new(offsets)?;
        let wgmma_rows = wgmma_rows_per_task(tasks.max_rows).filter(|_| dev.is_hopper());
        let mut heights = vec![tasks.rows_per_task];
        heights.extend(wgmma_rows.filter(|&h| h != tasks.rows_per_task));
        let mut tables = Vec::new();
        for height in heights {
            let cut = tasks.tasks_of(height);
            if cut.is_empty() {
                continue;
            }
            let flat: Vec<u32> = cut.iter().flatten().copied().collect();
            let mut d = dev.alloc::<u32>(flat.len(), "W4A16 expert tasks")?;
            dev.stream().memcpy_htod(&flat, &mut d).map_err(ForgeError::driver("uploading the expert tasks"))?;
            tables.push((height, cut.len() as u32, d));
        }
        Ok(ExpertRouting { tasks, tables, wgmma_rows })
    }

    /// The device table of row blocks of `height` rows, with its task count.
    fn table(&self, height: usize) -> Result<(&CudaSlice<u32>, u32)> {
        self.tables
            .iter()
            .find(|t| t.0 == height)
            .map(|t| (&t.2, t.1))
            .ok_or_else(|| ForgeError::Internal(format!("grouped W4A16: no task table of {height} rows")))
    }
}

/// The packed weights of a layer's experts on the device, in one allocation (each expert's
/// codes, then each expert's records).
pub struct DeviceExperts {
    /// Experts.
    pub experts: usize,
    /// The dimensions of each.
    pub dims: PackedDims,
    codes: CudaSlice<u32>,
    records: CudaSlice<u32>,
    /// u32 words of one expert's codes and records.
    codes_per_expert: usize,
    records_per_expert: usize,
    finite_bf16: bool,
    finite_f16: bool,
}

impl DeviceExperts {
    /// Uploads `experts` (all of the same dimensions and group size; checked first).
    pub fn upload<P: std::borrow::Borrow<PackedWeight>>(dev: &GpuDevice, experts: &[P]) -> Result<Self> {
        let experts: Vec<&PackedWeight> = experts.iter().map(|p| p.borrow()).collect();
        let Some(&first) = experts.first() else {
            return Err(ForgeError::Shape("a grouped weight needs at least one expert".into()));
        };
        let d = first.dims;
        check_dims(d.n, d.k, d.group_size)?;
        let codes_per_expert = (d.n_pad / 64) * (d.k_pad / 16) * 128;
        let records_per_expert = d.g_pad * d.n_pad;
        for (e, p) in experts.iter().enumerate() {
            if (p.dims.n, p.dims.k, p.dims.group_size) != (d.n, d.k, d.group_size) {
                return Err(ForgeError::Shape(format!(
                    "expert {e} is {}×{} with group size {}, expert 0 {}×{} with {}",
                    p.dims.n, p.dims.k, p.dims.group_size, d.n, d.k, d.group_size
                )));
            }
            if p.dims != d || p.codes.len() != codes_per_expert || p.records.len() != records_per_expert {
                return Err(ForgeError::Shape(format!("expert {e}'s packed buffers do not match its dimensions")));
            }
        }
        // The kernel takes the per-expert strides as u32.
        if codes_per_expert > u32::MAX as usize || records_per_expert > u32::MAX as usize {
            return Err(ForgeError::Shape(format!("one expert of {}×{} is too large for a grouped launch", d.n, d.k)));
        }
        let total = |per: usize| {
            per.checked_mul(experts.len())
                .ok_or_else(|| ForgeError::Shape(format!("{} experts overflow the address space", experts.len())))
        };
        let mut codes = dev.alloc::<u32>(total(codes_per_expert)?, "W4A16 expert codes")?;
        let mut records = dev.alloc::<u32>(total(records_per_expert)?, "W4A16 expert records")?;
        let stream = dev.stream();
        for (e, p) in experts.iter().enumerate() {
            let mut c = codes.slice_mut(e * codes_per_expert..(e + 1) * codes_per_expert);
            stream.memcpy_htod(&p.codes, &mut c).map_err(ForgeError::driver("uploading expert codes"))?;
            let mut r = records.slice_mut(e * records_per_expert..(e + 1) * records_per_expert);
            stream.memcpy_htod(&p.records, &mut r).map_err(ForgeError::driver("uploading expert records"))?;
        }
        Ok(DeviceExperts {
            experts: experts.len(),
            dims: d,
            codes,
            records,
            codes_per_expert,
            records_per_expert,
            finite_bf16: experts.iter().all(|p| p.finite_bf16),
            finite_f16: experts.iter().all(|p| p.finite_f16),
        })
    }

    /// Bytes of one expert's weight (codes + records).
    pub fn expert_bytes(&self) -> usize {
        (self.codes_per_expert + self.records_per_expert) * 4
    }
}

/// The plan of [`w4a16_grouped_matmul`] (`None`: no rows, nothing to launch).
pub fn w4a16_grouped_plan(
    dev: &GpuDevice,
    routing: &ExpertRouting,
    w: &DeviceExperts,
    dtype: ActDtype,
    opts: &W4a16Options,
) -> Result<Option<W4a16Plan>> {
    let t = &routing.tasks;
    if t.experts != w.experts {
        return Err(ForgeError::Shape(format!("the routing has {} experts, the weight {}", t.experts, w.experts)));
    }
    if t.tasks.is_empty() {
        return Ok(None);
    }
    let grouped = GroupedRows {
        skinny_tasks: t.tasks.len() as u32,
        wgmma_tasks: routing.wgmma_rows.and_then(|h| routing.table(h).ok()).map_or(0, |(_, n)| n),
        weights_read: t.tasks.len() as u64 * w.dims.n as u64 * w.dims.k as u64,
    };
    plan_layer(dev, t.max_rows, w.dims, dtype, opts, Some(grouped)).map(Some)
}

/// The block height of a grouped plan (the task table it runs).
fn plan_rows(plan: &W4a16Plan) -> usize {
    match plan.kernel {
        FusedKernel::Skinny { tf } | FusedKernel::SkinnySm90 { tf } | FusedKernel::Wgmma { tf } => 8 * tf as usize,
        FusedKernel::Tiled { mb } => 16 * mb as usize,
    }
}

#[allow(clippy::too_many_arguments)]
/// `Y[r] = X[r] · dequant(W_e)ᵀ` for every row `r` of every expert `e` of `routing`, in one
/// launch: `x` holds `rows·k` and `y` `rows·n` values of `dtype` (bit patterns), row-major,
/// rows sorted by expert. Returns the plan it ran (`None`: no rows). `opts.path`,
/// `skinny_max_m`, `hopper_min_weights` and `overlap_prior_kernel` do not apply: the skinny
/// kernel, or on compute capability 9.0 the `wgmma` one once an expert has more than 32 rows
/// (and at least `hopper_min_m`), launched in order.
pub fn w4a16_grouped_matmul(
    dev: &GpuDevice,
    x: &CudaSlice<u16>,
    routing: &ExpertRouting,
    w: &DeviceExperts,
    y: &mut CudaSlice<u16>,
    dtype: ActDtype,
    opts: &W4a16Options,
    ws: &mut W4a16Workspace,
) -> Result<Option<W4a16Plan>> {
    check_finite(w.finite_bf16, w.finite_f16, dtype, "an expert has")?;
    let (m, n, k) = (routing.tasks.rows, w.dims.n, w.dims.k);
    if x.len() < m * k || y.len() < m * n {
        return Err(ForgeError::Shape(format!(
            "grouped W4A16: X has {} elements for {m}×{k}, Y {} for {m}×{n}",
            x.len(),
            y.len()
        )));
    }
    let Some(plan) = w4a16_grouped_plan(dev, routing, w, dtype, opts)? else { return Ok(None) };
    let (table, count) = routing.table(plan_rows(&plan))?;
    if count != plan.m_blocks {
        return Err(ForgeError::Internal(format!("grouped plan of {} row blocks for {count} tasks", plan.m_blocks)));
    }
    let launch = FusedLaunch {
        x: x.dev_ptr(),
        w: w.codes.dev_ptr(),
        meta: w.records.dev_ptr(),
        y: y.dev_ptr_mut(),
        m,
        dims: w.dims,
        overlap: false,
        grouped: Some((table.dev_ptr(), w.codes_per_expert as u32, w.records_per_expert as u32)),
    };
    // SAFETY: x rows·k and y rows·n values (checked above); the experts' packed weights of
    // these dimensions at the strides given (checked at upload, strides ≤ u32::MAX); the task
    // table of the plan's block height (3 u32 per row block, plan.m_blocks of them, checked
    // above) from validated offsets: experts < w.experts (checked in the plan), disjoint row
    // ranges inside `rows`, at most the block height each.
    unsafe { launch_fused(dev, &plan, &launch, dtype, ws) }?;
    Ok(Some(plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_cover_every_row_once_in_blocks_of_the_planned_height() {
        let offsets = [0, 0, 3, 3, 70, 71];
        assert_eq!(expert_offsets(&[0, 3, 0, 67, 1]), offsets);
        let t = ExpertTasks::new(&offsets).unwrap();
        assert_eq!((t.experts, t.rows, t.max_rows, t.active, t.rows_per_task), (5, 71, 67, 3, 64));
        assert_eq!(t.tasks, vec![[1, 0, 3], [3, 3, 64], [3, 67, 3], [4, 70, 1]]);
        assert_eq!(t.tasks_of(128), vec![[1, 0, 3], [3, 3, 67], [4, 70, 1]]);
        let decode = ExpertTasks::new(&[0, 1, 1, 2, 3]).unwrap();
        assert_eq!((decode.rows_per_task, decode.tasks.len()), (8, 3));
        assert_eq!(ExpertTasks::new(&[0, 9]).unwrap().rows_per_task, 16);
        let empty = ExpertTasks::new(&[0, 0, 0]).unwrap();
        assert!(empty.tasks.is_empty() && empty.rows == 0);
    }

    #[test]
    fn bad_offsets_are_typed_errors() {
        for (offsets, says) in [
            (&[][..], "empty"),
            (&[0][..], "no expert"),
            (&[1, 2][..], "first offset is 1"),
            (&[0, 5, 4][..], "expert 1 ends at 4"),
        ] {
            match ExpertTasks::new(offsets) {
                Err(ForgeError::Shape(m)) => assert!(m.contains(says), "{offsets:?}: {m}"),
                other => panic!("{offsets:?}: {other:?}"),
            }
        }
    }
}
