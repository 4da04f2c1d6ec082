//! The grouped (mixture-of-experts) W4A16 matmul: one launch multiplies each expert's rows of
//! `X` by that expert's packed weight (docs/kernels.md §6, "Grouped launch").
//!
//! The tokens routed to expert `e` are rows `offsets[e] .. offsets[e + 1]` of `X` (sorted by
//! expert, as MoE runtimes gather them) and of `Y`. [`ExpertRouting`] turns the offsets into
//! the launch's row blocks — `(expert, first row, rows)` per block of up to `8·tf` rows, none
//! for an expert without rows — on the host and uploads them once; every matmul with that
//! routing (a layer's gate/up and down projections) reuses them. The block height is chosen
//! for the plan rows ([`ExpertTasks::plan_rows`]: the largest expert's rows, at most 1.5 times
//! an active expert's mean). The kernel is the skinny one with split-K (on compute capability
//! 9.0, the `wgmma` one above 32 plan rows, in blocks of 64 rows, 128 above 64): each row
//! block runs exactly as the ungrouped launch of its rows would, so the grouped result equals
//! per-expert launches with the same split count (and kernel) bit for bit.
//!
//! Two ways to route:
//! * [`ExpertRouting::new`]: offsets on the host. The grid (row blocks × column blocks ×
//!   splits) and the block shape come from the actual rows, so the launch has no idle blocks.
//! * [`ExpertRouting::on_device`] + [`ExpertRouting::build_from`]: offsets on the device (a
//!   router on the GPU; nothing is copied to the host, so the step can be captured in a CUDA
//!   graph). The block shape comes from a hint of a busy expert's rows
//!   ([`ExpertRouting::rows_hint`]: 1.5 times the mean; only speed depends on it) and the grid
//!   from the most row blocks `rows_capacity` rows can make;
//!   `expert_tasks_from_offsets` writes the table on the stream and pads it with empty tasks,
//!   which the kernels skip. Offsets the kernel finds invalid leave every task empty (the
//!   matmul then writes nothing) and a status that [`ExpertRouting::device_status`] turns into
//!   a typed error.

use super::cuda::{launch_fused, plan_layer, FusedLaunch, GroupedRows};
use super::{
    check_dims, check_finite, ActDtype, FusedKernel, PackedDims, PackedWeight, W4a16Options, W4a16Plan, W4a16Workspace,
};
use crate::device::{DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::{ForgeError, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};
use forge_kernel_abi::runtime::{
    ExpertTasksArgs, EXPERT_TASKS_MAX_EXPERTS, EXPERT_TASKS_SHARED_BYTES, EXPERT_TASKS_THREADS, ROUTING_DECREASING,
    ROUTING_FIRST_NOT_ZERO, ROUTING_OK, ROUTING_OVER_CAPACITY, ROUTING_PAST_ROWS,
};
use forge_kernel_abi::DevPtrMut;
use forge_kernel_abi::ExpertTasksFromOffsets;

/// Rows per row block of the skinny kernel for a grouped launch planned for `plan_rows`
/// rows: `8·tf`, `tf` the power of two covering them, at most 8.
fn skinny_rows_per_task(plan_rows: usize) -> usize {
    8 * plan_rows.clamp(1, 64).div_ceil(8).next_power_of_two()
}

/// Rows per row block of the Hopper `wgmma` kernel's grouped builds, which a grouped launch
/// runs on a compute-capability-9.0 device above 32 plan rows: 64 (`tf` 8), 128 (`tf` 16)
/// above 64 (as the ungrouped plan on large layers).
fn wgmma_rows_per_task(plan_rows: usize) -> Option<usize> {
    match plan_rows {
        0..=32 => None,
        33..=64 => Some(64),
        _ => Some(128),
    }
}

/// The most rows a grouped plan sizes its blocks for: 1.5 times the mean rows of an active
/// expert, `⌈3·rows / (2·active)⌉` (at least 1). Smaller blocks for a few busier experts cost
/// them more row blocks, which measured cheaper than bigger blocks for all
/// ([`ExpertTasks::plan_rows`]).
pub fn plan_rows_cap(rows: usize, active: usize) -> usize {
    (3 * rows).div_ceil(2 * active.max(1)).max(1)
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
    /// The rows the block height is chosen for: the largest expert's, at most 1.5 times the
    /// mean of an active expert's ([`plan_rows_cap`]). Why not the largest expert's alone: at
    /// 64 tokens top-8 on Qwen3-30B-A3B (≤ ~12 rows per expert, 4 on average) 8-row blocks ran
    /// 84 µs (gate_up) and 61 (down) against 105 and 80 in the 16-row blocks the largest
    /// expert asked for (H200); a busier expert gets more row blocks instead. Twice the mean
    /// (9 rows there) still took 16-row blocks.
    pub plan_rows: usize,
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
        let active = counts().filter(|&c| c > 0).count();
        let plan_rows = max_rows.min(plan_rows_cap(last, active));
        let mut t = ExpertTasks {
            experts: offsets.len() - 1,
            rows: last,
            max_rows,
            active,
            plan_rows,
            rows_per_task: skinny_rows_per_task(plan_rows),
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

/// The most experts a device-built routing takes (`expert_tasks_from_offsets`: 16 per thread).
pub const MAX_DEVICE_ROUTING_EXPERTS: usize = EXPERT_TASKS_MAX_EXPERTS as usize;

/// The most row blocks of at most `height` rows that `rows` rows over `experts` experts can
/// make: `Σ ⌈r_e/h⌉ ≤ Σ_{r_e > 0} (r_e + h − 1)/h ≤ (rows + min(experts, rows)·(h − 1))/h`.
pub fn max_tasks(rows: usize, experts: usize, height: usize) -> usize {
    let h = height.max(1);
    (rows + experts.min(rows) * (h - 1)) / h
}

/// The block heights a grouped plan for `plan_rows` may pick, the skinny kernel's first, and
/// the `wgmma` kernel's where the device runs it.
fn block_heights(dev: &GpuDevice, plan_rows: usize) -> (Vec<usize>, Option<usize>) {
    let skinny = skinny_rows_per_task(plan_rows);
    let wgmma_rows = wgmma_rows_per_task(plan_rows).filter(|_| dev.is_hopper());
    let mut heights = vec![skinny];
    heights.extend(wgmma_rows.filter(|&h| h != skinny));
    (heights, wgmma_rows)
}

/// Where a routing's row blocks come from.
enum Source {
    /// Offsets given on the host.
    Host(ExpertTasks),
    /// Offsets on the device: `expert_tasks_from_offsets` writes the tables
    /// ([`ExpertRouting::build_from`]); `status` its `[code, expert]`.
    Device { status: CudaSlice<u32>, built: bool },
}

/// What a kernel that writes a device routing's task tables needs: the first table, the
/// second (0 slots when the routing has one only), the rows bound and the status words (the
/// fields of `ExpertTasksArgs` and `TopkRouteArgs`).
pub(crate) struct DeviceTables {
    pub(crate) tasks: DevPtrMut<u32>,
    pub(crate) height: u32,
    pub(crate) capacity: u32,
    pub(crate) tasks_b: DevPtrMut<u32>,
    pub(crate) height_b: u32,
    pub(crate) capacity_b: u32,
    pub(crate) rows_limit: u32,
    pub(crate) status: DevPtrMut<u32>,
}

/// The row blocks of a grouped launch, on the device, for [`w4a16_grouped_matmul`]
/// (module docs: from host or device offsets).
pub struct ExpertRouting {
    experts: usize,
    /// Rows of `X` and `Y`: the routed rows (host), or the most there may be (device).
    rows: usize,
    /// The rows the block height is chosen for: [`ExpertTasks::plan_rows`] (host), the hint
    /// (device).
    plan_rows: usize,
    source: Source,
    /// The device table for each block height a plan may pick, with its task count (device
    /// routing: the slots, empty ones included): the skinny kernel's, and the `wgmma`
    /// kernel's where the device has it and the plan rows exceed 32.
    tables: Vec<(usize, u32, CudaSlice<u32>)>,
    /// The `wgmma` kernel's block height, where it has a table.
    wgmma_rows: Option<usize>,
}

impl ExpertRouting {
    /// Validates `offsets` and uploads the row blocks (ordered copies on the device's stream;
    /// not inside a graph capture, which cannot copy from pageable memory).
    pub fn new(dev: &GpuDevice, offsets: &[usize]) -> Result<Self> {
        let tasks = ExpertTasks::new(offsets)?;
        let (heights, wgmma_rows) = block_heights(dev, tasks.plan_rows);
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
        Ok(ExpertRouting {
            experts: tasks.experts,
            rows: tasks.rows,
            plan_rows: tasks.plan_rows,
            source: Source::Host(tasks),
            tables,
            wgmma_rows,
        })
    }

    /// A routing whose offsets will come from the device ([`ExpertRouting::build_from`]):
    /// `experts` experts and at most `rows_capacity` rows in all (the rows of `X` and `Y`).
    /// `rows_hint` stands for the host plan's [`ExpertTasks::plan_rows`]: it picks the block
    /// height (blocks of `8·tf ≥ rows_hint` rows on the skinny kernel, of 64 or 128 on
    /// `wgmma` above 32). Only speed depends on it: an expert with more rows gets more row
    /// blocks. [`ExpertRouting::rows_hint`] is a default. Allocates the tables for the most
    /// row blocks `rows_capacity` rows can make ([`max_tasks`]).
    pub fn on_device(dev: &GpuDevice, experts: usize, rows_capacity: usize, rows_hint: usize) -> Result<Self> {
        let bad = |why: String| Err(ForgeError::Shape(format!("device expert routing: {why}")));
        if experts == 0 || experts > MAX_DEVICE_ROUTING_EXPERTS {
            return bad(format!("{experts} experts (1 to {MAX_DEVICE_ROUTING_EXPERTS})"));
        }
        if rows_capacity == 0 || rows_hint == 0 {
            return bad(format!("{rows_capacity} rows, a hint of {rows_hint} per expert (both must be ≥ 1)"));
        }
        if rows_capacity > i32::MAX as usize {
            return bad(format!("{rows_capacity} rows exceed the launch limits"));
        }
        let plan_rows = rows_hint.min(rows_capacity);
        let (heights, wgmma_rows) = block_heights(dev, plan_rows);
        let mut tables = Vec::new();
        for height in heights {
            let slots = max_tasks(rows_capacity, experts, height);
            let d = dev.alloc::<u32>(3 * slots, "W4A16 expert tasks")?;
            tables.push((height, slots as u32, d));
        }
        let status = dev.alloc::<u32>(2, "W4A16 routing status")?;
        Ok(ExpertRouting {
            experts,
            rows: rows_capacity,
            plan_rows,
            source: Source::Device { status, built: false },
            tables,
            wgmma_rows,
        })
    }

    /// A default `rows_hint` for [`ExpertRouting::on_device`]: [`plan_rows_cap`] with every
    /// expert that can have rows counted as active (`min(experts, rows)`). On the bench's top-8 routings of Qwen3-30B-A3B and DeepSeek-V3
    /// layers (1–1024 tokens) it gave the host plan's block height; the tokens themselves (a
    /// hard bound on an expert's rows under top-k routing) gave up to 2.2× slower launches
    /// (README).
    pub fn rows_hint(rows: usize, experts: usize) -> usize {
        plan_rows_cap(rows, experts.min(rows))
    }

    /// Writes the task tables from `offsets` (`experts + 1` row offsets as u32, on the
    /// device) on the device's stream: no host copy, so it may be captured in a CUDA graph
    /// and replayed with new offsets. Validity is checked on the device
    /// ([`ExpertRouting::device_status`]). Host routings refuse.
    pub fn build_from(&mut self, dev: &GpuDevice, offsets: &CudaSlice<u32>) -> Result<()> {
        let t = self.device_tables()?;
        if offsets.len() < self.experts + 1 {
            return Err(ForgeError::Shape(format!(
                "device expert routing: {} offsets for {} experts (needs experts + 1)",
                offsets.len(),
                self.experts
            )));
        }
        let args = ExpertTasksArgs {
            offsets: offsets.dev_ptr(),
            tasks: t.tasks,
            status: t.status,
            experts: self.experts as u32,
            rows_limit: t.rows_limit,
            height: t.height,
            capacity: t.capacity,
            tasks_b: t.tasks_b,
            height_b: t.height_b,
            capacity_b: t.capacity_b,
        };
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (EXPERT_TASKS_THREADS, 1, 1),
            shared_mem_bytes: EXPERT_TASKS_SHARED_BYTES,
        };
        // SAFETY: offsets ≥ experts + 1 u32 (checked above), 1 ≤ experts ≤ the kernel's
        // maximum (on_device), the tables 3·slots u32 each and status 2 u32 (device_tables),
        // heights ≥ 8; one block of EXPERT_TASKS_THREADS.
        unsafe { dev.launch::<ExpertTasksFromOffsets>(cfg, &args) }?;
        self.mark_built();
        Ok(())
    }

    /// A device routing's tables for a build kernel ([`DeviceTables`]). Host routings refuse.
    pub(crate) fn device_tables(&mut self) -> Result<DeviceTables> {
        let Source::Device { status, .. } = &mut self.source else {
            return Err(ForgeError::Shape("build_from: this routing's offsets are on the host".into()));
        };
        let mut cut = self.tables.iter_mut().map(|(h, slots, t)| (t.dev_ptr_mut(), *h as u32, *slots));
        let (tasks, height, capacity) =
            cut.next().ok_or_else(|| ForgeError::Internal("device routing without a task table".into()))?;
        let (tasks_b, height_b, capacity_b) = cut.next().unwrap_or((tasks, 1, 0));
        if cut.next().is_some() {
            return Err(ForgeError::Internal("device routing with more than two task tables".into()));
        }
        Ok(DeviceTables {
            tasks,
            height,
            capacity,
            tasks_b,
            height_b,
            capacity_b,
            rows_limit: self.rows as u32,
            status: status.dev_ptr_mut(),
        })
    }

    /// Records that a build of the tables is enqueued (after its launch succeeded).
    pub(crate) fn mark_built(&mut self) {
        if let Source::Device { built, .. } = &mut self.source {
            *built = true;
        }
    }

    /// A device routing's last [`ExpertRouting::build_from`]: `Ok` if its offsets were valid,
    /// else the typed error (waits for the stream). `Ok` for host routings (checked on
    /// upload).
    pub fn device_status(&self, dev: &GpuDevice) -> Result<()> {
        let Source::Device { status, built } = &self.source else { return Ok(()) };
        if !built {
            return Err(ForgeError::Shape("device expert routing: no offsets built yet".into()));
        }
        let s = dev.stream().clone_dtoh(status).map_err(ForgeError::driver("downloading the routing status"))?;
        dev.synchronize()?;
        let (code, e) = (s[0], s[1]);
        let why = match code {
            ROUTING_OK => return Ok(()),
            ROUTING_FIRST_NOT_ZERO => "the first offset is not 0".to_string(),
            ROUTING_DECREASING => format!("expert {e} ends before it starts"),
            ROUTING_PAST_ROWS => format!("the offsets end past the {} rows of X and Y", self.rows),
            ROUTING_OVER_CAPACITY => format!("more row blocks than the {} slots", self.tables[0].1),
            other => format!("unknown status {other}"),
        };
        Err(ForgeError::Shape(format!("device expert routing: {why} (nothing was multiplied)")))
    }

    /// The skinny kernel's task table as the device holds it, every slot (a device routing's
    /// empty ones included): `[expert, first row, rows]` (waits for the stream).
    pub fn download_tasks(&self, dev: &GpuDevice) -> Result<Vec<[u32; 3]>> {
        let Some((_, slots, table)) = self.tables.first() else { return Ok(Vec::new()) };
        let flat = dev.stream().clone_dtoh(table).map_err(ForgeError::driver("downloading the expert tasks"))?;
        dev.synchronize()?;
        Ok(flat.chunks_exact(3).take(*slots as usize).map(|t| [t[0], t[1], t[2]]).collect())
    }

    /// The host side of a routing made from host offsets (`None` for device routings).
    pub fn tasks(&self) -> Option<&ExpertTasks> {
        match &self.source {
            Source::Host(t) => Some(t),
            Source::Device { .. } => None,
        }
    }

    /// Experts.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Rows of `X` and `Y` (device routing: the capacity).
    pub fn rows(&self) -> usize {
        self.rows
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
        let codes_per_expert = d.code_words()?;
        let records_per_expert = d.g_pad * d.n_pad;
        for (e, p) in experts.iter().enumerate() {
            if p.dims.bits != d.bits {
                return Err(ForgeError::Config(format!(
                    "grouped W4A16 launch: expert {e} has {}-bit packed codes, expert 0 {}-bit (grids of 2–4 bits pack \
                     4-bit codes, 5–8 bits 8-bit ones); one launch takes one width",
                    p.dims.bits, d.bits
                )));
            }
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
    if routing.experts != w.experts {
        return Err(ForgeError::Shape(format!(
            "the routing has {} experts, the weight {}",
            routing.experts, w.experts
        )));
    }
    let count = |h: Option<usize>| h.and_then(|h| routing.table(h).ok()).map_or(0, |(_, n)| n);
    let skinny_tasks = count(Some(skinny_rows_per_task(routing.plan_rows)));
    if skinny_tasks == 0 {
        return Ok(None);
    }
    let grouped = GroupedRows {
        skinny_tasks,
        wgmma_tasks: count(routing.wgmma_rows),
        weights_read: skinny_tasks as u64 * w.dims.n as u64 * w.dims.k as u64,
    };
    plan_layer(dev, routing.plan_rows, w.dims, dtype, opts, Some(grouped)).map(Some)
}

/// The block height of a grouped plan (the task table it runs).
fn plan_rows(plan: &W4a16Plan) -> usize {
    match plan.kernel {
        FusedKernel::Skinny { tf }
        | FusedKernel::SkinnySm90 { tf, .. }
        | FusedKernel::Wgmma { tf }
        | FusedKernel::SkinnyW8 { tf } => 8 * tf as usize,
        FusedKernel::Tiled { mb } => 16 * mb as usize,
    }
}

#[allow(clippy::too_many_arguments)]
/// `Y[r] = X[r] · dequant(W_e)ᵀ` for every row `r` of every expert `e` of `routing`, in one
/// launch: `x` holds `rows·k` and `y` `rows·n` values of `dtype` (bit patterns), row-major,
/// rows sorted by expert. Returns the plan it ran (`None`: no rows). `opts.path`,
/// `skinny_max_m`, `hopper_min_weights` and `overlap_prior_kernel` do not apply: the skinny
/// kernel, or on compute capability 9.0 the `wgmma` one above 32 plan rows (and from
/// `hopper_min_m`), launched in order.
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
    if let Source::Device { built: false, .. } = routing.source {
        return Err(ForgeError::Shape("grouped W4A16: the device routing has no offsets yet (build_from)".into()));
    }
    let (m, n, k) = (routing.rows, w.dims.n, w.dims.k);
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
    // above) from validated offsets (host: ExpertTasks::new; device: the build kernel writes
    // tasks only from offsets it validated against `rows`, else empty ones): experts <
    // w.experts (checked in the plan), disjoint row ranges inside `rows`, at most the block
    // height each.
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
        // 71 rows on 3 experts: blocks for at most ⌈213/6⌉ = 36 rows (64), not the 67 of expert 3.
        assert_eq!((t.experts, t.rows, t.max_rows, t.active, t.plan_rows, t.rows_per_task), (5, 71, 67, 3, 36, 64));
        assert_eq!(t.tasks, vec![[1, 0, 3], [3, 3, 64], [3, 67, 3], [4, 70, 1]]);
        assert_eq!(t.tasks_of(128), vec![[1, 0, 3], [3, 3, 67], [4, 70, 1]]);
        // One busy expert among light ones: 8-row blocks (the mean is 4), the busy one in two.
        let skewed = ExpertTasks::new(&expert_offsets(&[10, 2, 2, 2])).unwrap();
        assert_eq!((skewed.max_rows, skewed.plan_rows, skewed.rows_per_task), (10, 6, 8));
        assert_eq!(&skewed.tasks[..2], &[[0, 0, 8], [0, 8, 2]]);
        let decode = ExpertTasks::new(&[0, 1, 1, 2, 3]).unwrap();
        assert_eq!((decode.rows_per_task, decode.tasks.len()), (8, 3));
        assert_eq!(ExpertTasks::new(&[0, 9]).unwrap().rows_per_task, 16);
        let empty = ExpertTasks::new(&[0, 0, 0]).unwrap();
        assert!(empty.tasks.is_empty() && empty.rows == 0);
    }

    #[test]
    fn max_tasks_bounds_every_routing_of_the_rows() {
        // Exhaustive over small cases: no split of `rows` rows among `experts` experts makes
        // more row blocks than the bound, and the bound is reached (a device table needs no
        // more slots than that).
        fn splits(rows: usize, experts: usize, out: &mut Vec<Vec<usize>>, cur: &mut Vec<usize>) {
            if cur.len() + 1 == experts {
                cur.push(rows);
                out.push(cur.clone());
                cur.pop();
                return;
            }
            for r in 0..=rows {
                cur.push(r);
                splits(rows - r, experts, out, cur);
                cur.pop();
            }
        }
        for experts in 1..=4 {
            for rows in 0..=20 {
                let mut all = Vec::new();
                splits(rows, experts, &mut all, &mut Vec::new());
                for h in [1, 3, 8, 16] {
                    let most = all.iter().map(|s| s.iter().map(|r| r.div_ceil(h)).sum::<usize>()).max().unwrap();
                    assert!(most <= max_tasks(rows, experts, h), "{rows} rows, {experts} experts, h {h}");
                    let tight = max_tasks(rows, experts, h) == most;
                    assert!(tight, "{rows} rows, {experts} experts, h {h}: {most} < bound");
                }
            }
        }
    }

    #[test]
    fn rows_hint_is_one_and_a_half_times_the_mean_rows_of_an_active_expert() {
        // Decode (8 rows over 128 experts: 8 active), prefill (8192 rows), no rows.
        assert_eq!(ExpertRouting::rows_hint(8, 128), 2);
        assert_eq!(ExpertRouting::rows_hint(8192, 128), 96);
        assert_eq!(ExpertRouting::rows_hint(8192, 256), 48);
        assert_eq!(ExpertRouting::rows_hint(512, 128), 6);
        assert_eq!(ExpertRouting::rows_hint(0, 4), 1);
        assert_eq!(plan_rows_cap(512, 126), 7);
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
