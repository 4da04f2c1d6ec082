//! The GPU producer of a run: every quantization step through the device engine
//! ([`QuantEngine`]), one job per set of members that share a Hessian (a fused group for
//! RTN), two jobs in flight.
//!
//! ```text
//! producer:  collect j−2 ─ stage+submit j ─ hand j−2 to the writer ─ collect j−1 ─ stage+submit j+1 ─ ...
//! device:    [compute j−1, download j−1 | upload j, compute j ...]
//! writer:    relative errors, encode, hash + write of j−3, then j−2 ...
//! ```
//!
//! A data-free job asks the device for the codes packed in the format's layout and for the
//! per-row error sums (`LayerJob::pack`, `want_row_error`): half the download at 4 bits, and
//! the writer neither re-reads the weight nor packs (its relative error is the host pass's
//! bit for bit). GPTQ jobs download u8 codes: the flushed-group scan reads them with the
//! weight as stored.
//!
//! A job's weights are uploaded in their stored dtype straight from the mapped shards (FP8
//! as codes plus block scales, dequantized on the device); a GPTQ job's Hessian comes from its
//! file ([`HessianInput::Host`]), a data-free job has `U = I` ([`HessianInput::NoTokens`]:
//! the solve then rounds to nearest on the grid, exactly). Copies and FP8→BF16 steps need no
//! device: they wait (holding nothing) until every earlier step is handed over, so the writer
//! sees plan order and the device pipeline never drains for them.

use super::budget::hessian_sets;
use super::model::ModelDir;
use super::plan::{Method, Plan, Work};
use super::quant::{load_hessian, HostInput};
use super::run::{hand_over, prefetch, Done, GpuRunStats, Observer, Stop};
use crate::calib::{quantize_experts, ExpertInput, PreStepRoute};
use crate::device::GpuDevice;
use crate::hessian::{asymmetry_warning, PreStepConfig};
use crate::quantize::{
    widen, with_engine, EngineStats, HessianInput, LayerJob, LayerOutcome, PreStepSummary, QuantEngine,
    QuantizedWeight, Ticket,
};
use crate::{Backend, ForgeError, Result, Warning, WeightView};
use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Instant;

/// Jobs the engine holds at once (its two slots).
const IN_FLIGHT: usize = 2;

/// What the producer needs of an engine: jobs submitted and collected in order, at most
/// [`IN_FLIGHT`] at once.
pub(super) trait JobEngine {
    /// A submitted job.
    type Ticket;
    /// Stages and enqueues a job.
    fn submit(&mut self, job: &LayerJob<'_>) -> Result<Self::Ticket>;
    /// Waits for a job and returns its results.
    fn collect(&mut self, ticket: Self::Ticket) -> Result<LayerOutcome>;
    /// Counters (bytes moved, device allocations).
    fn counters(&self) -> EngineStats;
}

impl JobEngine for QuantEngine {
    type Ticket = Ticket;
    fn submit(&mut self, job: &LayerJob<'_>) -> Result<Ticket> {
        QuantEngine::submit(self, job)
    }
    fn collect(&mut self, ticket: Ticket) -> Result<LayerOutcome> {
        QuantEngine::collect(self, ticket)
    }
    fn counters(&self) -> EngineStats {
        self.stats()
    }
}

/// The CPU references standing in for the device engine (a test hook: the device path's
/// pipeline and host logic run in CI without a GPU). A job is computed at submit: weights
/// widened to f32 (FP8 blocks with the CPU reference), then the calibration layer's CPU path
/// with its Hessian, or `U = I` without one, exactly as the engine's jobs are defined.
pub(super) struct ReferenceEngine;

impl JobEngine for ReferenceEngine {
    type Ticket = LayerOutcome;
    fn submit(&mut self, job: &LayerJob<'_>) -> Result<LayerOutcome> {
        let mut f32s = Vec::with_capacity(job.weights.len());
        for (i, w) in job.weights.iter().enumerate() {
            match (job.block_scales.get(i).copied().flatten(), w) {
                (Some(b), WeightView::Fp8E4M3(q)) => {
                    let (rows, cols) = q.dim();
                    let bytes = w.contiguous_bytes().ok_or_else(|| ForgeError::Internal("fp8 view".into()))?;
                    b.validate(rows, cols)?;
                    let mut a = ndarray::Array2::<f32>::zeros((rows, cols));
                    for (r, mut row) in a.rows_mut().into_iter().enumerate() {
                        let out = row.as_slice_mut().ok_or_else(|| ForgeError::Internal("row".into()))?;
                        b.read_row_f32(bytes, r, cols, out)?;
                    }
                    f32s.push(a);
                }
                _ => f32s.push(widen(*w)?),
            }
        }
        // Owned, so the input's one lifetime is this function's (a test hook: the copy is fine).
        let hessian = match job.hessian {
            HessianInput::Host(h) => Some(h.to_owned()),
            HessianInput::NoTokens => None,
            _ => return Err(ForgeError::Config("the reference engine takes host Hessians only".into())),
        };
        let input = ExpertInput {
            weights: f32s.iter().map(|a| WeightView::F32(a.view())).collect(),
            hessian: hessian.as_ref().map(|h| h.view()),
        };
        let layers = quantize_experts(&Backend::Cpu, job.grid, &job.pre_step, &[input])?;
        let layers = layers.into_iter().next().unwrap_or_default();
        let summary = match layers.first() {
            Some(l) => PreStepSummary {
                perm: l.perm.clone(),
                dead_columns: l.flags.dead_columns.clone(),
                damping_used: l.flags.damping_used,
                retries: l.flags.retries,
                fallback_identity: l.flags.fallback_identity,
                route: l.flags.route,
                // The device engine's summary holds the pre-step's own warnings only: the
                // producer adds the Hessian's asymmetry, the host the flushed groups per weight.
                warnings: l
                    .warnings
                    .iter()
                    .filter(|w| !matches!(w, Warning::AsymmetricHessian { .. } | Warning::FlushedGroups { .. }))
                    .cloned()
                    .collect(),
            },
            None => PreStepSummary {
                perm: None,
                dead_columns: Vec::new(),
                damping_used: 0.0,
                retries: 0,
                fallback_identity: false,
                route: PreStepRoute::NoTokens,
                warnings: Vec::new(),
            },
        };
        let weights = layers
            .into_iter()
            .map(|l| QuantizedWeight {
                grid: l.grid,
                codes: l.codes,
                packed: None,
                loss: l.loss,
                dequant: None,
                row_error: None,
            })
            .collect();
        Ok(LayerOutcome { weights, pre_step: summary, timings: None })
    }
    fn collect(&mut self, ticket: LayerOutcome) -> Result<LayerOutcome> {
        Ok(ticket)
    }
    fn counters(&self) -> EngineStats {
        EngineStats::default()
    }
}

/// A submitted job.
struct Flight<T> {
    /// Its step.
    k: usize,
    /// Its members (indices into the step's members).
    members: Vec<usize>,
    ticket: T,
    /// Its Hessian's asymmetry, scanned on the host before submit (the engine does not).
    asymmetry: Option<Warning>,
}

/// A step whose jobs are not all collected yet.
struct Partial {
    started: Instant,
    jobs_left: usize,
    jobs: Vec<(Vec<usize>, LayerOutcome)>,
}

/// The producer's inputs.
pub(super) struct ProducerArgs<'a> {
    pub model: &'a ModelDir,
    pub plan: &'a Plan,
    pub todo: &'a [usize],
    pub block: (usize, usize),
    pub profile: bool,
    pub obs: &'a dyn Observer,
    pub tx: &'a SyncSender<Done>,
}

/// Runs the `todo` steps of `plan` on `dev`'s engine, handing each finished step to the
/// writer through `tx`. Returns what the device did.
pub(super) fn produce_gpu(dev: &Arc<GpuDevice>, a: ProducerArgs<'_>) -> std::result::Result<Option<GpuRunStats>, Stop> {
    match with_engine(dev, |engine| Ok(produce_with(engine, a))) {
        Ok(r) => r.map(Some),
        Err(e) => Err(Stop::Err(e)),
    }
}

/// As [`produce_gpu`] with the CPU references standing in for the device ([`ReferenceEngine`]).
pub(super) fn produce_reference(a: ProducerArgs<'_>) -> std::result::Result<Option<GpuRunStats>, Stop> {
    produce_with(&mut ReferenceEngine, a).map(Some)
}

fn produce_with<E: JobEngine>(engine: &mut E, a: ProducerArgs<'_>) -> std::result::Result<GpuRunStats, Stop> {
    let before = engine.counters();
    let mut p = Producer {
        engine,
        model: a.model,
        plan: a.plan,
        grid: a.plan.grid_config(),
        block: a.block,
        profile: a.profile,
        tx: a.tx,
        flights: VecDeque::new(),
        partial: BTreeMap::new(),
        plain: VecDeque::new(),
        outbox: VecDeque::new(),
        stats: GpuRunStats::default(),
    };
    let r = p.run(a.todo, a.obs);
    // After an error the jobs still in flight are collected (and dropped), so the device's
    // shared engine is left with no slot occupied.
    while let Some(f) = p.flights.pop_front() {
        let _ = p.engine.collect(f.ticket);
    }
    let after = p.engine.counters();
    let mut stats = p.stats;
    stats.upload_bytes = after.upload_bytes.saturating_sub(before.upload_bytes);
    stats.download_bytes = after.download_bytes.saturating_sub(before.download_bytes);
    stats.device_allocations = after.device_allocations.saturating_sub(before.device_allocations);
    r.map(|()| stats)
}

struct Producer<'a, 'e, E: JobEngine> {
    engine: &'e mut E,
    model: &'a ModelDir,
    plan: &'a Plan,
    /// The plan's grid with the format's scale dtype ([`Plan::grid_config`]).
    grid: crate::GridConfig,
    block: (usize, usize),
    profile: bool,
    tx: &'a SyncSender<Done>,
    flights: VecDeque<Flight<E::Ticket>>,
    partial: BTreeMap<usize, Partial>,
    /// Copy and FP8→BF16 steps waiting for earlier quantization steps (plan order).
    plain: VecDeque<(usize, Instant)>,
    /// Finished steps in plan order, handed to the writer once the next job is submitted.
    outbox: VecDeque<Done>,
    stats: GpuRunStats,
}

impl<E: JobEngine> Producer<'_, '_, E> {
    /// Moves the waiting plain steps before step `limit` (all with `None`) to the outbox.
    fn release_plain(&mut self, limit: Option<usize>) {
        while let Some(&(k, started)) = self.plain.front() {
            if limit.is_some_and(|l| k >= l) {
                break;
            }
            self.plain.pop_front();
            self.outbox.push_back(Done::Plain { k, started });
        }
    }

    /// Hands the outbox to the writer (blocks while it is busy: the device meanwhile works
    /// on the jobs in flight).
    fn deliver(&mut self) -> std::result::Result<(), Stop> {
        while let Some(d) = self.outbox.pop_front() {
            let t = Instant::now();
            hand_over(self.tx, d)?;
            self.stats.handover_ms += t.elapsed().as_secs_f64() * 1e3;
        }
        Ok(())
    }

    fn run(&mut self, todo: &[usize], obs: &dyn Observer) -> std::result::Result<(), Stop> {
        let plan = self.plan;
        for (n, &k) in todo.iter().enumerate() {
            let item = plan.items.get(k).ok_or_else(|| ForgeError::Internal(format!("step {k} is not planned")))?;
            if let Some(next) = todo.get(n + 1).and_then(|&j| plan.items.get(j)) {
                prefetch(self.model, next);
            }
            obs.item_started(k, item);
            let started = Instant::now();
            let Work::Quantize { members } = &item.work else {
                self.plain.push_back((k, started));
                let first_open = self.partial.keys().next().copied();
                self.release_plain(first_open);
                self.deliver()?;
                continue;
            };
            let sets = hessian_sets(members, &plan.settings.method);
            self.partial.insert(k, Partial { started, jobs_left: sets.len(), jobs: Vec::new() });
            for (hessian, idx) in sets {
                while self.flights.len() >= IN_FLIGHT {
                    self.collect_oldest()?;
                }
                let inputs = idx
                    .iter()
                    .map(|&i| {
                        let m = members.get(i).ok_or_else(|| ForgeError::Internal("member index".into()))?;
                        HostInput::open(self.model, m, self.block)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let cols = idx.first().and_then(|&i| members.get(i)).map_or(0, |m| m.dims.1);
                // The Hessian lives until submit has staged it.
                let hess = match hessian {
                    Some(p) => Some(load_hessian(p, cols)?),
                    None => None,
                };
                let (h, asymmetry) = match hess.as_ref().filter(|(_, tokens)| *tokens > 0) {
                    Some((a, _)) => (HessianInput::Host(a.view()), asymmetry_warning(a.view())),
                    None => (HessianInput::NoTokens, None),
                };
                let views = inputs.iter().map(|i| i.engine_view()).collect::<Result<Vec<_>>>()?;
                let data_free = matches!(plan.settings.method, Method::Rtn);
                let job = LayerJob {
                    weights: views.iter().map(|(w, _)| *w).collect(),
                    hessian: h,
                    grid: &self.grid,
                    pre_step: match &plan.settings.method {
                        Method::Gptq(g) => g.pre_step.clone(),
                        Method::Rtn => PreStepConfig::default(),
                    },
                    want_dequant: false,
                    profile: self.profile,
                    // Data-free: the device packs the codes in the format's layout and sums the
                    // relative error, so the host neither re-reads the weight nor packs (GPTQ
                    // keeps the codes: its flushed-group scan reads them with the weight).
                    pack: data_free.then(|| plan.format.pack_layout()),
                    want_row_error: data_free,
                    block_scales: if views.iter().any(|(_, b)| b.is_some()) {
                        views.iter().map(|(_, b)| *b).collect()
                    } else {
                        Vec::new()
                    },
                };
                let t = Instant::now();
                let ticket = self.engine.submit(&job)?;
                self.stats.submit_ms += t.elapsed().as_secs_f64() * 1e3;
                self.flights.push_back(Flight { k, members: idx, ticket, asymmetry });
                // The device has the next job queued before the writer is waited for.
                self.deliver()?;
            }
        }
        while !self.flights.is_empty() {
            self.collect_oldest()?;
        }
        self.release_plain(None);
        self.deliver()
    }

    /// Waits for the oldest job; puts its step in the outbox once all its jobs are in.
    fn collect_oldest(&mut self) -> std::result::Result<(), Stop> {
        let Some(f) = self.flights.pop_front() else { return Ok(()) };
        let t = Instant::now();
        let mut outcome = self.engine.collect(f.ticket)?;
        self.stats.collect_ms += t.elapsed().as_secs_f64() * 1e3;
        // First, as the CPU pre-step lists it.
        outcome.pre_step.warnings.splice(0..0, f.asymmetry);
        self.stats.jobs += 1;
        if let Some(t) = &outcome.timings {
            self.stats.kernel_ms += f64::from(t.kernel_ms());
            self.stats.upload_ms += f64::from(t.upload_ms);
            self.stats.download_ms += f64::from(t.download_ms);
        }
        let p =
            self.partial.get_mut(&f.k).ok_or_else(|| ForgeError::Internal(format!("step {} collected twice", f.k)))?;
        p.jobs.push((f.members, outcome));
        p.jobs_left -= 1;
        if p.jobs_left == 0 {
            if let Some(p) = self.partial.remove(&f.k) {
                // Plan order: the plain steps before this one first, then it, then those up
                // to the next step still on the device.
                self.release_plain(Some(f.k));
                self.outbox.push_back(Done::Engine { k: f.k, started: p.started, jobs: p.jobs });
                let first_open = self.partial.keys().next().copied();
                self.release_plain(first_open);
            }
        }
        Ok(())
    }
}
