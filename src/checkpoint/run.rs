//! The streaming engine: runs a [`Plan`] into an [`OutputDir`], with progress reported to an
//! [`Observer`].
//!
//! Two threads. The producer (the caller's thread) reads each step's input from the mapped
//! shards and quantizes it: on the CPU with the references, on a GPU through the device
//! engine ([`super::pipeline`]: one job per fused group, two jobs in flight, so staging and
//! uploading step i+1 overlap step i's device work). The writer thread takes finished steps
//! in plan order (a rendezvous channel, so at most one waits), computes what the host
//! computes (relative errors), encodes the format, writes and hashes the bytes, records the
//! step in the manifest and copies unchanged tensors in chunks of
//! [`super::plan::COPY_CHUNK`]. Writing step i−1 thus overlaps step i.
//!
//! Host memory: the inputs are mapped and each step's pages are dropped from the process
//! when it is written; the steps in flight and the engine's page-locked buffers are
//! estimated from the plan and checked against the budget before the run starts
//! ([`super::budget`]), so the peak is bounded by the largest steps, not by the model. A GPU
//! run checks the engine's device memory the same way.

use super::budget::{check_gpu_budget, check_host_budget, default_gpu_budget, estimate_memory, MemoryEstimate};
use super::fp8::{dequantize_fp8_blocks, f32_to_bf16_bytes, BlockScales};
use super::memory::{human_bytes, peak_rss};
use super::model::{ModelDir, INDEX_FILE};
use super::output::{ItemStats, MemberStats, OutputDir, Resumed};
use super::pipeline::{produce_gpu, produce_reference, ProducerArgs};
use super::plan::{Item, Member, Method, Plan, Work};
use super::quant::{
    gptq_result, load_hessian, load_weight, quantize_gptq, quantize_rtn, release_weight, rtn_from_device,
    rtn_from_grid, HostInput, MemberResult,
};
use crate::calib::layers_of;
use crate::quantize::LayerOutcome;
use crate::{Backend, ForgeError, Quantizer, Result, WeightView};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Instant;

/// The summary's file name in the output directory.
pub const SUMMARY_FILE: &str = "forge_summary.json";

/// Progress callbacks (all optional). `item_started` comes from the producer thread,
/// `item_finished` from the writer thread.
pub trait Observer: Sync {
    /// The run starts: `done_items` steps (`done_bytes` input bytes) were finished by an
    /// earlier run.
    fn started(&self, _plan: &Plan, _done_items: usize, _done_bytes: u64) {}
    /// A step starts.
    fn item_started(&self, _index: usize, _item: &Item) {}
    /// A step is finished.
    fn item_finished(&self, _index: usize, _item: &Item, _stats: &ItemStats) {}
    /// Something the user should know.
    fn note(&self, _msg: &str) {}
}

/// An observer that shows nothing.
pub struct Silent;
impl Observer for Silent {}

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The output directory (must not exist, or be empty).
    pub output: PathBuf,
    /// Continue the partial output of an interrupted run.
    pub resume: bool,
    /// Host-memory budget in bytes.
    pub max_host_memory: u64,
    /// GPU-memory budget in bytes (`None`: the device's free memory at the start).
    pub max_gpu_memory: Option<u64>,
    /// Where the grid and the solver run.
    pub backend: Backend,
    /// Time every engine job's stages with device events ([`RunReport::gpu`]).
    pub profile: bool,
    /// Test hook: stop with [`ForgeError::Interrupted`] after this many steps of this run,
    /// without making the last records durable (as a crash would).
    #[doc(hidden)]
    pub fail_after_items: Option<usize>,
    /// Test hook: `abort()` the process after this many steps of this run.
    #[doc(hidden)]
    pub abort_after_items: Option<usize>,
    /// Test hook: with the CPU backend, run the device path's pipeline (engine jobs, two in
    /// flight, the host's finishing) with the CPU references standing in for the engine.
    #[doc(hidden)]
    pub reference_pipeline: bool,
}

impl RunOptions {
    /// Options with the default budgets, no profiling and no test hooks.
    pub fn new(output: PathBuf, backend: Backend) -> Self {
        RunOptions {
            output,
            resume: false,
            max_host_memory: super::memory::default_budget(),
            max_gpu_memory: None,
            backend,
            profile: false,
            fail_after_items: None,
            abort_after_items: None,
            reference_pipeline: false,
        }
    }
}

/// What the device did during a GPU run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuRunStats {
    /// The device.
    pub device: String,
    /// Engine jobs run.
    pub jobs: u64,
    /// Sum of the jobs' compute-stream times (FP8 dequantization, grid, pre-step, solve),
    /// device events, ms (with [`RunOptions::profile`]; else 0).
    pub kernel_ms: f64,
    /// Sum of the jobs' upload times, ms (profiled).
    pub upload_ms: f64,
    /// Sum of the jobs' download times, ms (profiled).
    pub download_ms: f64,
    /// Host wall time the producer spent submitting jobs (reading the mapped input into
    /// page-locked staging, enqueueing), ms.
    pub submit_ms: f64,
    /// Host wall time the producer spent collecting jobs (waiting for the device, copying the
    /// results out of page-locked memory), ms.
    pub collect_ms: f64,
    /// Host wall time the producer waited for the writer to take finished steps, ms.
    pub handover_ms: f64,
    /// Bytes uploaded.
    pub upload_bytes: u64,
    /// Bytes downloaded.
    pub download_bytes: u64,
    /// Device allocations made during the run.
    pub device_allocations: u64,
    /// The GPU budget checked.
    pub budget: u64,
    /// The engine's estimated device bytes after the run.
    pub estimate: u64,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The output directory.
    pub output: PathBuf,
    /// Every step's statistics, by step index.
    pub items: BTreeMap<usize, ItemStats>,
    /// Steps taken over from an interrupted run.
    pub resumed_items: usize,
    /// Wall time of this run.
    pub seconds: f64,
    /// Peak resident set of the process, if known.
    pub peak_rss: Option<u64>,
    /// The memory estimated before the run.
    pub memory: MemoryEstimate,
    /// Device statistics of a GPU run.
    pub gpu: Option<GpuRunStats>,
    /// The summary JSON (also in the output directory as [`SUMMARY_FILE`]).
    pub summary: serde_json::Value,
}

/// Checks every step's own estimated memory against the budget (the run checks the steps in
/// flight together: [`super::budget::estimate_memory`]).
pub fn check_budget(plan: &Plan, budget: u64) -> Result<()> {
    match plan.items.iter().find(|i| i.memory > budget) {
        Some(i) => Err(ForgeError::OutOfMemory {
            what: format!("step {}", i.label),
            requested: Some(i.memory),
            limit: budget,
            origin: crate::budget::RUN_BUDGET_ORIGIN.into(),
        }),
        None => Ok(()),
    }
}

/// A finished step, from the producer to the writer.
pub(super) enum Done {
    /// A copy or FP8→BF16 step: the writer does the work.
    Plain { k: usize, started: Instant },
    /// Quantized on the CPU: results per member, in order.
    Cpu { k: usize, started: Instant, results: Vec<MemberResult> },
    /// Quantized by the device engine: per job, its members (indices) and its outcome.
    Engine { k: usize, started: Instant, jobs: Vec<(Vec<usize>, LayerOutcome)> },
}

/// Why the producer stopped early.
pub(super) enum Stop {
    /// The writer stopped (its error is the run's).
    Writer,
    /// The producer's own error.
    Err(ForgeError),
}

impl From<ForgeError> for Stop {
    fn from(e: ForgeError) -> Self {
        Stop::Err(e)
    }
}

/// Hands a finished step to the writer (blocks until it takes it).
pub(super) fn hand_over(tx: &SyncSender<Done>, d: Done) -> std::result::Result<(), Stop> {
    tx.send(d).map_err(|_| Stop::Writer)
}

/// Runs `plan` on `model` into `opts.output`.
pub fn quantize_checkpoint(model: &ModelDir, plan: &Plan, opts: &RunOptions, obs: &dyn Observer) -> Result<RunReport> {
    let t0 = Instant::now();
    let gpu_dev = match &opts.backend {
        Backend::Gpu(d) => Some(d.clone()),
        Backend::Cpu => None,
    };
    let memory = estimate_memory(model, plan, gpu_dev.is_some() || opts.reference_pipeline);
    check_host_budget(&memory, opts.max_host_memory)?;
    let mut gpu_stats = match &gpu_dev {
        Some(dev) => {
            let budget = match opts.max_gpu_memory {
                Some(b) => b,
                None => default_gpu_budget(dev)?,
            };
            let estimate = check_gpu_budget(model, plan, budget)?;
            Some(GpuRunStats { device: dev.name().to_string(), budget, estimate, ..GpuRunStats::default() })
        }
        None => None,
    };
    let block = model.fp8_block()?;
    let (mut out, resumed) = OutputDir::open(&opts.output, plan, opts.resume)?;
    let Resumed { items: stats, shards: done_shards, invalid, .. } = resumed;
    let resumed_items = stats.len();
    if resumed_items > 0 || invalid > 0 {
        obs.note(&format!(
            "resuming {}: {resumed_items} of {} steps already done{}",
            out.temp_path().display(),
            plan.items.len(),
            if invalid > 0 {
                format!(", {invalid} recorded steps no longer matched and are redone")
            } else {
                String::new()
            }
        ));
    }
    let done_bytes: u64 = stats.keys().filter_map(|&k| plan.items.get(k)).map(|i| i.input_bytes).sum();
    obs.started(plan, resumed_items, done_bytes);

    // Steps left per shard, to finish each shard when its last step is written.
    let mut left = vec![0usize; plan.shards.len()];
    for (k, item) in plan.items.iter().enumerate() {
        if let Some(s) = shard_of(plan, item) {
            if !stats.contains_key(&k) {
                left[s] += 1;
            }
        }
    }
    for (s, &n) in left.iter().enumerate() {
        if n == 0 && !done_shards.contains(&s) {
            out.finish_shard(plan, s)?;
        }
    }
    let todo: Vec<usize> = (0..plan.items.len()).filter(|k| !stats.contains_key(k)).collect();

    let writer = Writer { model, plan, opts, obs, block, out, stats, left, ran: 0 };
    let (produced, written) = std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Done>(0);
        let handle = scope.spawn(move || writer.run(rx));
        let args = ProducerArgs { model, plan, todo: &todo, block, profile: opts.profile, obs, tx: &tx };
        let produced = match &gpu_dev {
            Some(dev) => produce_gpu(dev, args),
            None if opts.reference_pipeline => produce_reference(args),
            None => produce_cpu(model, plan, &todo, block, &opts.backend, obs, &tx).map(|()| None),
        };
        drop(tx);
        let written = handle.join().unwrap_or_else(|_| Err(ForgeError::Internal("the writer thread panicked".into())));
        (produced, written)
    });
    let (mut out, stats) = match (produced, written) {
        (Ok(device), Ok(w)) => {
            if let (Some(g), Some(d)) = (gpu_stats.as_mut(), device) {
                *g = GpuRunStats { device: g.device.clone(), budget: g.budget, estimate: g.estimate, ..d };
            }
            (w.out, w.stats)
        }
        (Err(Stop::Err(e)), _) => return Err(e),
        (_, Err(e)) => return Err(e),
        (Err(Stop::Writer), Ok(_)) => {
            return Err(ForgeError::Internal("the writer stopped without an error".into()));
        }
    };
    out.checkpoint()?;

    // The small files, then the rename.
    if plan.shards.len() > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": plan.total_tensor_bytes()},
            "weight_map": plan.weight_map(),
        });
        out.write_file(INDEX_FILE, &pretty(&index)?)?;
    }
    out.write_file("config.json", &pretty(&plan.config_json)?)?;
    for (name, value) in plan.format.extra_files(&plan.ignore)? {
        out.write_file(name, &pretty(&value)?)?;
    }
    for f in &model.aux_files {
        out.copy_file(&model.path.join(f), f)?;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let summary = summary_json(model, plan, &stats, &opts.backend, seconds, peak_rss());
    out.write_file(SUMMARY_FILE, &pretty(&summary)?)?;
    let output = out.commit()?;
    Ok(RunReport {
        output,
        items: stats,
        resumed_items,
        seconds,
        peak_rss: peak_rss(),
        memory,
        gpu: gpu_stats,
        summary,
    })
}

fn shard_of(plan: &Plan, item: &Item) -> Option<usize> {
    item.outputs.first().and_then(|&o| plan.outputs.get(o)).map(|t| t.shard)
}

/// The CPU producer: each step quantized with the references, in plan order.
fn produce_cpu(
    model: &ModelDir,
    plan: &Plan,
    todo: &[usize],
    block: (usize, usize),
    backend: &Backend,
    obs: &dyn Observer,
    tx: &SyncSender<Done>,
) -> std::result::Result<(), Stop> {
    let quantizer = Quantizer::new(plan.grid_config(), backend.clone());
    for (n, &k) in todo.iter().enumerate() {
        let item = &plan.items[k];
        // Let the kernel read the next step's input while this one is quantized.
        if let Some(next) = todo.get(n + 1).and_then(|&j| plan.items.get(j)) {
            prefetch(model, next);
        }
        obs.item_started(k, item);
        let started = Instant::now();
        let done = match &item.work {
            Work::Quantize { members } => {
                Done::Cpu { k, started, results: quantize_cpu(model, plan, item, members, &quantizer, block)? }
            }
            Work::Copy { .. } | Work::Fp8ToBf16 { .. } => Done::Plain { k, started },
        };
        hand_over(tx, done)?;
    }
    Ok(())
}

/// One quantization step on the CPU: RTN member by member, or GPTQ per shared Hessian.
fn quantize_cpu(
    model: &ModelDir,
    plan: &Plan,
    item: &Item,
    members: &[Member],
    quantizer: &Quantizer,
    block: (usize, usize),
) -> Result<Vec<MemberResult>> {
    let mut results: Vec<MemberResult> = Vec::with_capacity(members.len());
    match &plan.settings.method {
        Method::Rtn => {
            for m in members {
                let w = load_weight(model, m, block)?;
                results.push(quantize_rtn(quantizer, w.view())?);
                drop(w);
                release_weight(model, m);
            }
        }
        Method::Gptq(g) => {
            let mut by_member: Vec<Option<MemberResult>> = (0..members.len()).map(|_| None).collect();
            for (h, idx) in super::budget::hessian_sets(members, &plan.settings.method) {
                let cols = members[idx[0]].dims.1;
                let hess = match h {
                    Some(p) => Some(load_hessian(p, cols)?),
                    None => None,
                };
                let hview = hess.as_ref().filter(|(_, tokens)| *tokens > 0).map(|(a, _)| a.view());
                let loaded = idx.iter().map(|&i| load_weight(model, &members[i], block)).collect::<Result<Vec<_>>>()?;
                let views: Vec<WeightView<'_>> = loaded.iter().map(|l| l.view()).collect();
                let res = quantize_gptq(quantizer, g, &views, hview)?;
                drop(loaded);
                for (&i, r) in idx.iter().zip(res) {
                    release_weight(model, &members[i]);
                    by_member[i] = Some(r);
                }
            }
            for r in by_member {
                results
                    .push(r.ok_or_else(|| ForgeError::Config(format!("{}: a member was not quantized", item.label)))?);
            }
        }
    }
    Ok(results)
}

/// Asks the kernel to read a step's input tensors ahead (advisory).
pub(super) fn prefetch(model: &ModelDir, item: &Item) {
    let names: Vec<&String> = match &item.work {
        Work::Copy { tensor } => vec![tensor],
        Work::Fp8ToBf16 { weight, scale } => vec![weight, scale],
        Work::Quantize { members } => members.iter().flat_map(|m| std::iter::once(&m.weight).chain(&m.scale)).collect(),
    };
    for n in names {
        if let Some(t) = model.tensor(n) {
            if let Ok(shard) = model.shard(t) {
                shard.prefetch(&t.info);
            }
        }
    }
}

fn pretty(v: &serde_json::Value) -> Result<Vec<u8>> {
    let mut s = serde_json::to_vec_pretty(v).map_err(|e| ForgeError::Config(e.to_string()))?;
    s.push(b'\n');
    Ok(s)
}

/// xxh3-64, hex.
fn hex_hash(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

type ItemOutcome = (Vec<(usize, String)>, Vec<MemberStats>);

/// The writer thread's state: the output directory and what is finished.
struct Writer<'a> {
    model: &'a ModelDir,
    plan: &'a Plan,
    opts: &'a RunOptions,
    obs: &'a dyn Observer,
    block: (usize, usize),
    out: OutputDir,
    stats: BTreeMap<usize, ItemStats>,
    left: Vec<usize>,
    ran: usize,
}

impl Writer<'_> {
    /// Writes every step it is handed, then returns itself (the caller commits).
    fn run(mut self, rx: Receiver<Done>) -> Result<Self> {
        let mut since_sync = (Instant::now(), 0u64);
        let mut last_layer: Option<String> = None;
        for done in rx {
            let (k, started) = match &done {
                Done::Plain { k, started } | Done::Cpu { k, started, .. } | Done::Engine { k, started, .. } => {
                    (*k, *started)
                }
            };
            let plan = self.plan;
            let item = plan.items.get(k).ok_or_else(|| ForgeError::Internal(format!("step {k} is not planned")))?;
            // Durable progress at layer boundaries (steps arrive in plan order), and at least
            // every 30 s or 1 GB.
            if last_layer.as_deref().is_some_and(|l| l != item.layer)
                || since_sync.0.elapsed().as_secs() >= 30
                || since_sync.1 >= 1 << 30
            {
                // On the sync thread: the next layer is written while this one reaches the disk.
                self.out.checkpoint_in_background()?;
                since_sync = (Instant::now(), 0);
            }
            last_layer = Some(item.layer.clone());
            let (hashes, members) = self.write_item(item, done)?;
            let output_bytes: u64 = item.outputs.iter().filter_map(|&o| plan.outputs.get(o)).map(|t| t.nbytes).sum();
            let st = ItemStats {
                label: item.label.clone(),
                layer: item.layer.clone(),
                action: match item.work {
                    Work::Copy { .. } => "copy",
                    Work::Fp8ToBf16 { .. } => "fp8->bf16",
                    Work::Quantize { .. } => "quantize",
                }
                .into(),
                seconds: started.elapsed().as_secs_f64(),
                input_bytes: item.input_bytes,
                output_bytes,
                members,
            };
            self.out.record_item(k, hashes, st.clone())?;
            since_sync.1 += output_bytes;
            self.obs.item_finished(k, item, &st);
            self.stats.insert(k, st);
            if let Some(s) = shard_of(plan, item) {
                if let Some(n) = self.left.get_mut(s) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.out.finish_shard(plan, s)?;
                    }
                }
            }
            self.ran += 1;
            if self.opts.fail_after_items == Some(self.ran) {
                return Err(ForgeError::Interrupted(self.ran));
            }
            if self.opts.abort_after_items == Some(self.ran) {
                std::process::abort();
            }
        }
        Ok(self)
    }

    /// Writes one step's output tensors and returns their hashes and the members' statistics.
    fn write_item(&mut self, item: &Item, done: Done) -> Result<ItemOutcome> {
        let (model, plan, block) = (self.model, self.plan, self.block);
        let first_out =
            *item.outputs.first().ok_or_else(|| ForgeError::Config(format!("{} has no output", item.label)))?;
        let results = match (&item.work, done) {
            (Work::Copy { tensor }, Done::Plain { .. }) => {
                let t = model.tensor(tensor).ok_or_else(|| ForgeError::MissingTensor {
                    tensor: tensor.clone(),
                    file: model.path.display().to_string(),
                })?;
                let shard = model.shard(t)?;
                let bytes = shard.bytes(&t.info)?;
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                let mut pos = 0usize;
                for chunk in bytes.chunks(super::plan::COPY_CHUNK) {
                    let out = &mut self.out;
                    let (w, ()) = rayon::join(|| out.write(plan, first_out, pos as u64, chunk), || h.update(chunk));
                    w?;
                    shard.release(&t.info, pos, chunk.len());
                    pos += chunk.len();
                }
                return Ok((vec![(first_out, format!("{:016x}", h.digest()))], Vec::new()));
            }
            (Work::Fp8ToBf16 { weight, scale }, Done::Plain { .. }) => {
                let missing = |n: &String| ForgeError::MissingTensor {
                    tensor: n.clone(),
                    file: model.path.display().to_string(),
                };
                let w = model.tensor(weight).ok_or_else(|| missing(weight))?;
                let s = model.tensor(scale).ok_or_else(|| missing(scale))?;
                let (rows, cols) = w.info.dims2().unwrap_or((0, 0));
                let scales = BlockScales {
                    bytes: model.bytes(s)?,
                    dtype: s.info.dtype,
                    shape: s.info.dims2().unwrap_or((0, 0)),
                };
                let f = dequantize_fp8_blocks(model.bytes(w)?, rows, cols, scales, block)?;
                let bytes = f32_to_bf16_bytes(f.as_slice().unwrap_or_default());
                drop(f);
                let out = &mut self.out;
                let (wr, hash) = rayon::join(|| out.write(plan, first_out, 0, &bytes), || hex_hash(&bytes));
                wr?;
                for t in [w, s] {
                    model.shard(t)?.release(&t.info, 0, t.info.len);
                }
                return Ok((vec![(first_out, hash)], Vec::new()));
            }
            (Work::Quantize { .. }, Done::Cpu { results, .. }) => results,
            (Work::Quantize { members }, Done::Engine { jobs, .. }) => self.finish_engine(item, members, jobs)?,
            _ => {
                return Err(ForgeError::Internal(format!("{}: the producer sent the wrong kind of result", item.label)))
            }
        };
        let Work::Quantize { members } = &item.work else {
            return Err(ForgeError::Internal(format!("{} is not a quantization step", item.label)));
        };
        let mut hashes = Vec::new();
        let mut stats = Vec::new();
        let mut outs = item.outputs.iter();
        for (m, r) in members.iter().zip(&results) {
            let encoded = plan.format.encode(super::writer::QuantizedLinear {
                module: &m.module,
                grid: &r.grid,
                codes: r.codes.view(),
                packed: r.packed.as_ref(),
            })?;
            for bytes in encoded {
                let o = *outs.next().ok_or_else(|| {
                    ForgeError::Shape(format!(
                        "format {} wrote more tensors for {} than planned",
                        plan.format.id(),
                        m.module
                    ))
                })?;
                let planned = plan.outputs.get(o).map(|t| t.nbytes).unwrap_or(0);
                if bytes.len() as u64 != planned {
                    return Err(ForgeError::Shape(format!(
                        "format {} wrote {} bytes for {}, planned {planned}",
                        plan.format.id(),
                        bytes.len(),
                        plan.outputs.get(o).map(|t| t.spec.name.as_str()).unwrap_or("?")
                    )));
                }
                // Hashing runs beside the write (both only read the bytes).
                let out = &mut self.out;
                let (w, hash) = rayon::join(|| out.write(plan, o, 0, &bytes), || hex_hash(&bytes));
                w?;
                hashes.push((o, hash));
            }
            stats.push(MemberStats {
                module: m.module.clone(),
                rows: m.dims.0,
                cols: m.dims.1,
                method: r.method.into(),
                rel_weight_error: r.rel_weight_error,
                gptq_loss: r.gptq_loss,
                flags: r.flags.clone(),
            });
        }
        if outs.next().is_some() {
            return Err(ForgeError::Shape(format!(
                "format {} wrote fewer tensors for {} than planned",
                plan.format.id(),
                item.label
            )));
        }
        Ok((hashes, stats))
    }

    /// The host's part of a step the device engine quantized: per member, the relative error
    /// against the input (read again from the mapped shards, FP8 dequantized row by row with
    /// the CPU reference's arithmetic), with the engine's codes (its data-free jobs round to
    /// nearest against the stored scale, as [`rtn_from_grid`] does). Then the member's pages go.
    fn finish_engine(
        &self,
        item: &Item,
        members: &[Member],
        jobs: Vec<(Vec<usize>, LayerOutcome)>,
    ) -> Result<Vec<MemberResult>> {
        let (model, plan) = (self.model, self.plan);
        let mut by_member: Vec<Option<MemberResult>> = (0..members.len()).map(|_| None).collect();
        for (idx, outcome) in jobs {
            let gptq = matches!(plan.settings.method, Method::Gptq(_));
            let per_weight: Vec<Result<MemberResult>> = if gptq {
                let layers = layers_of(outcome);
                idx.iter()
                    .zip(layers)
                    .map(|(&i, l)| {
                        let m = members.get(i).ok_or_else(|| ForgeError::Internal("member index".into()))?;
                        let input = HostInput::open(model, m, self.block)?;
                        // The device leaves the flushed-group scan to the host: it runs in the
                        // error pass, on the weight as stored (FP8 with its scales).
                        gptq_result(l, &input.rows(), true)
                    })
                    .collect()
            } else {
                idx.iter()
                    .zip(outcome.weights)
                    .map(|(&i, w)| {
                        let m = members.get(i).ok_or_else(|| ForgeError::Internal("member index".into()))?;
                        match (w.packed, w.row_error) {
                            // The device packed the codes and summed the error: nothing to read.
                            (Some(p), Some(e)) => rtn_from_device(w.grid, p, e.view()),
                            _ => {
                                let input = HostInput::open(model, m, self.block)?;
                                rtn_from_grid(&input.rows(), w.grid, Some(w.codes))
                            }
                        }
                    })
                    .collect()
            };
            if per_weight.len() != idx.len() {
                return Err(ForgeError::Internal(format!("{}: the engine returned too few weights", item.label)));
            }
            for (&i, r) in idx.iter().zip(per_weight) {
                let r = r?;
                if let (Some(slot), Some(m)) = (by_member.get_mut(i), members.get(i)) {
                    release_weight(model, m);
                    *slot = Some(r);
                }
            }
        }
        by_member
            .into_iter()
            .map(|r| r.ok_or_else(|| ForgeError::Config(format!("{}: a member was not quantized", item.label))))
            .collect()
    }
}

/// Per-layer rows of the summary: `(layer, quantized weights, mean / max relative weight
/// error, summed GPTQ loss, seconds)`.
pub fn layer_rows(stats: &BTreeMap<usize, ItemStats>) -> Vec<(String, usize, f64, f64, Option<f64>, f64)> {
    let mut rows: Vec<(String, usize, f64, f64, Option<f64>, f64)> = Vec::new();
    for s in stats.values() {
        let k = match rows.iter().position(|r| r.0 == s.layer) {
            Some(k) => k,
            None => {
                rows.push((s.layer.clone(), 0, 0.0, 0.0, None, 0.0));
                rows.len() - 1
            }
        };
        let r = &mut rows[k];
        for m in &s.members {
            r.1 += 1;
            r.2 += m.rel_weight_error;
            r.3 = r.3.max(m.rel_weight_error);
            if let Some(l) = m.gptq_loss {
                r.4 = Some(r.4.unwrap_or(0.0) + l);
            }
        }
        r.5 += s.seconds;
    }
    for r in &mut rows {
        if r.1 > 0 {
            r.2 /= r.1 as f64;
        }
    }
    // Decoder layers in order, tensors outside them last.
    rows.sort_by_key(|r| (super::select::layer_index(&r.0).is_none(), super::select::layer_index(&r.0)));
    rows
}

fn summary_json(
    model: &ModelDir,
    plan: &Plan,
    stats: &BTreeMap<usize, ItemStats>,
    backend: &Backend,
    seconds: f64,
    rss: Option<u64>,
) -> serde_json::Value {
    let layers: Vec<serde_json::Value> = layer_rows(stats)
        .into_iter()
        .map(|(layer, n, mean, max, loss, secs)| {
            serde_json::json!({
                "layer": layer, "quantized": n, "mean_rel_weight_error": mean,
                "max_rel_weight_error": max, "gptq_loss": loss, "seconds": secs,
            })
        })
        .collect();
    let tensors: Vec<&MemberStats> = stats.values().flat_map(|s| &s.members).collect();
    serde_json::json!({
        "forge_version": env!("CARGO_PKG_VERSION"),
        "model": model.path.display().to_string(),
        "architecture": model.architecture(),
        "backend": backend.name(),
        "settings": plan.settings.to_json(),
        "format": plan.format.id(),
        "quantized_modules": plan.quantized_modules(),
        "kept_in_full_precision": plan.kept.iter().map(|k| serde_json::json!({"module": k.module, "reason": k.reason})).collect::<Vec<_>>(),
        "ignore": plan.ignore,
        "input_bytes": plan.input_bytes(),
        "output_bytes": plan.output_bytes(),
        "shards": plan.shards.len(),
        "seconds": seconds,
        "peak_rss_bytes": rss,
        "layers": layers,
        "tensors": tensors,
        "fingerprint": plan.fingerprint,
    })
}

/// A rough time estimate for `plan` on `backend`: a small layer is quantized once to
/// measure the per-element cost (RTN: `rows·cols`; GPTQ: `rows·cols²` for the solve plus
/// `cols³` for the pre-step), and copies are assumed to run at 1 GB/s.
pub fn estimate_seconds(plan: &Plan, backend: &Backend) -> Result<f64> {
    let (r, c) = (256usize, 1024usize);
    let w = ndarray::Array2::from_shape_fn((r, c), |(i, j)| (((i * 31 + j * 17) % 97) as f32 - 48.0) / 97.0);
    let quantizer = Quantizer::new(plan.grid_config(), backend.clone());
    let gptq = matches!(plan.settings.method, Method::Gptq(_));
    let h = ndarray::Array2::<f32>::from_shape_fn((c, c), |(i, j)| if i == j { 2.0 } else { 0.01 });
    let measure = || -> Result<f64> {
        let t = Instant::now();
        match &plan.settings.method {
            Method::Rtn => {
                quantize_rtn(&quantizer, WeightView::F32(w.view()))?;
            }
            Method::Gptq(g) => {
                quantize_gptq(&quantizer, g, &[WeightView::F32(w.view())], Some(h.view()))?;
            }
        }
        Ok(t.elapsed().as_secs_f64())
    };
    measure()?; // warm-up (kernel load, thread pool)
    let per = measure()?;
    let unit = if gptq { (r * c * c + c * c * c) as f64 } else { (r * c) as f64 };
    let mut total = 0f64;
    for item in &plan.items {
        match &item.work {
            Work::Quantize { members } => {
                for m in members {
                    let (mr, mc) = (m.dims.0 as f64, m.dims.1 as f64);
                    let work = if gptq { mr * mc * mc + mc * mc * mc } else { mr * mc };
                    total += per * work / unit;
                }
            }
            _ => total += item.input_bytes as f64 / 1e9,
        }
    }
    Ok(total)
}

/// One line per step kind for reports: `"N steps, X in, Y out"`.
pub fn describe_sizes(plan: &Plan) -> String {
    format!(
        "{} steps, {} in, {} out",
        plan.items.len(),
        human_bytes(plan.input_bytes()),
        human_bytes(plan.output_bytes())
    )
}
