//! The GPU producer of a run: every quantization step through the device engine
//! ([`QuantEngine`]), one job per set of members that share a Hessian (a fused group for
//! RTN), two jobs in flight.
//!
//! ```text
//! producer:  stage+submit j ─ collect j−1 ─ hand j−1 to the writer ─ stage+submit j+1 ─ ...
//! device:            [upload j | compute j−1 | download j−2 ...]
//! writer:    host error / stored-scale codes, encode, hash + write of j−2 ...
//! ```
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
use crate::device::GpuDevice;
use crate::hessian::PreStepConfig;
use crate::quantize::{with_engine, HessianInput, LayerJob, LayerOutcome, QuantEngine, Ticket};
use crate::{ForgeError, Result};
use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Instant;

/// Jobs the engine holds at once (its two slots).
const IN_FLIGHT: usize = 2;

/// A submitted job.
struct Flight {
    /// Its step.
    k: usize,
    /// Its members (indices into the step's members).
    members: Vec<usize>,
    ticket: Ticket,
}

/// A step whose jobs are not all collected yet.
struct Partial {
    started: Instant,
    jobs_left: usize,
    jobs: Vec<(Vec<usize>, LayerOutcome)>,
}

/// Runs the `todo` steps of `plan` on `dev`'s engine, handing each finished step to the
/// writer through `tx`. Returns what the device did.
#[allow(clippy::too_many_arguments)]
pub(super) fn produce_gpu(
    dev: &Arc<GpuDevice>,
    model: &ModelDir,
    plan: &Plan,
    todo: &[usize],
    block: (usize, usize),
    profile: bool,
    obs: &dyn Observer,
    tx: &SyncSender<Done>,
) -> std::result::Result<Option<GpuRunStats>, Stop> {
    let out = with_engine(dev, |engine| {
        let before = engine.stats();
        let mut p = Producer {
            engine,
            model,
            plan,
            block,
            profile,
            tx,
            flights: VecDeque::new(),
            partial: BTreeMap::new(),
            plain: VecDeque::new(),
            stats: GpuRunStats::default(),
        };
        let r = p.run(todo, obs);
        // After an error the jobs still in flight are collected (and dropped), so the
        // device's shared engine is left with no slot occupied.
        while let Some(f) = p.flights.pop_front() {
            let _ = p.engine.collect(f.ticket);
        }
        let after = p.engine.stats();
        let mut stats = p.stats;
        stats.upload_bytes = after.upload_bytes - before.upload_bytes;
        stats.download_bytes = after.download_bytes - before.download_bytes;
        stats.device_allocations = after.device_allocations - before.device_allocations;
        Ok(r.map(|()| stats))
    });
    match out {
        Ok(r) => r.map(Some),
        Err(e) => Err(Stop::Err(e)),
    }
}

struct Producer<'a, 'e> {
    engine: &'e mut QuantEngine,
    model: &'a ModelDir,
    plan: &'a Plan,
    block: (usize, usize),
    profile: bool,
    tx: &'a SyncSender<Done>,
    flights: VecDeque<Flight>,
    partial: BTreeMap<usize, Partial>,
    /// Copy and FP8→BF16 steps waiting for earlier quantization steps (plan order).
    plain: VecDeque<(usize, Instant)>,
    stats: GpuRunStats,
}

impl Producer<'_, '_> {
    /// Hands over the waiting plain steps before step `limit` (all with `None`).
    fn flush_plain(&mut self, limit: Option<usize>) -> std::result::Result<(), Stop> {
        while let Some(&(k, started)) = self.plain.front() {
            if limit.is_some_and(|l| k >= l) {
                break;
            }
            self.plain.pop_front();
            hand_over(self.tx, Done::Plain { k, started })?;
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
                self.flush_plain(first_open)?;
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
                let h = match hess.as_ref().filter(|(_, tokens)| *tokens > 0) {
                    Some((a, _)) => HessianInput::Host(a.view()),
                    None => HessianInput::NoTokens,
                };
                let views = inputs.iter().map(|i| i.engine_view()).collect::<Result<Vec<_>>>()?;
                let job = LayerJob {
                    weights: views.iter().map(|(w, _)| *w).collect(),
                    hessian: h,
                    grid: &plan.settings.grid,
                    pre_step: match &plan.settings.method {
                        Method::Gptq(g) => g.pre_step.clone(),
                        Method::Rtn => PreStepConfig::default(),
                    },
                    want_dequant: false,
                    profile: self.profile,
                    block_scales: if views.iter().any(|(_, b)| b.is_some()) {
                        views.iter().map(|(_, b)| *b).collect()
                    } else {
                        Vec::new()
                    },
                };
                let ticket = self.engine.submit(&job)?;
                self.flights.push_back(Flight { k, members: idx, ticket });
            }
        }
        while !self.flights.is_empty() {
            self.collect_oldest()?;
        }
        self.flush_plain(None)
    }

    /// Waits for the oldest job; hands its step to the writer once all its jobs are in.
    fn collect_oldest(&mut self) -> std::result::Result<(), Stop> {
        let Some(f) = self.flights.pop_front() else { return Ok(()) };
        let outcome = self.engine.collect(f.ticket)?;
        self.stats.jobs += 1;
        if let Some(t) = &outcome.timings {
            self.stats.kernel_ms += f64::from(t.kernel_ms());
            self.stats.upload_ms += f64::from(t.upload_ms);
            self.stats.download_ms += f64::from(t.download_ms);
        }
        let p = self
            .partial
            .get_mut(&f.k)
            .ok_or_else(|| ForgeError::Internal(format!("step {} collected twice", f.k)))?;
        p.jobs.push((f.members, outcome));
        p.jobs_left -= 1;
        if p.jobs_left == 0 {
            if let Some(p) = self.partial.remove(&f.k) {
                // Plan order: the plain steps before this one first, then it, then those up
                // to the next step still on the device.
                self.flush_plain(Some(f.k))?;
                hand_over(self.tx, Done::Engine { k: f.k, started: p.started, jobs: p.jobs })?;
                let first_open = self.partial.keys().next().copied();
                self.flush_plain(first_open)?;
            }
        }
        Ok(())
    }
}
