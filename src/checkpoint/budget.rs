//! The memory a run needs, estimated from the plan before any work, and checked against the
//! host and GPU budgets (`--max-host-memory`, `--max-gpu-memory`).
//!
//! A run has more than one step in flight ([`super::run`]): on the CPU the step being
//! quantized and the one being written ([`CPU_WINDOW`]); on a GPU the one being written, the
//! one collected and waiting for the writer, and the two on the device ([`GPU_WINDOW`]),
//! plus the engine's page-locked staging buffers. The device engine's buffers grow to the largest job and stay
//! ([`FootprintTracker`]), so the GPU check walks the plan's jobs in order and names the
//! first step at which they would pass the budget.

use super::model::ModelDir;
use super::plan::{Item, Member, Method, Plan, Work};
use crate::device::GpuDevice;
use crate::quantize::{FootprintTracker, JobShape, WeightShape};
use crate::{ForgeError, Result, WeightDtype};
use safetensors::Dtype;
use std::path::PathBuf;

/// Steps in flight on the CPU: one quantized while the previous one is written.
pub const CPU_WINDOW: usize = 2;
/// Quantization steps in flight on a GPU: written, collected and waiting for the writer, and
/// two on the device (the newest one staged while the producer waits).
pub const GPU_WINDOW: usize = 4;

/// What a run is estimated to hold at its peak.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Host bytes: the largest window of steps in flight, plus `pinned`.
    pub host: u64,
    /// The first step of that window.
    pub host_step: String,
    /// Page-locked host bytes of the device engine (GPU runs; part of `host`).
    pub pinned: u64,
    /// Device bytes of the engine after the whole run (GPU runs).
    pub device: Option<u64>,
}

/// The members of a quantization step grouped by the Hessian they share: one engine job
/// each (RTN: one job for the whole fused group).
pub fn hessian_sets<'a>(members: &'a [Member], method: &Method) -> Vec<(Option<&'a PathBuf>, Vec<usize>)> {
    let mut sets: Vec<(Option<&PathBuf>, Vec<usize>)> = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let key = if matches!(method, Method::Gptq(_)) { m.hessian.as_ref() } else { None };
        match sets.iter_mut().find(|(h, _)| *h == key) {
            Some((_, v)) => v.push(i),
            None => sets.push((key, vec![i])),
        }
    }
    sets
}

/// The engine jobs of a quantization step, as shapes.
pub fn engine_jobs(model: &ModelDir, plan: &Plan, members: &[Member]) -> Vec<JobShape> {
    hessian_sets(members, &plan.settings.method)
        .into_iter()
        .map(|(h, idx)| JobShape {
            cols: idx.first().and_then(|&i| members.get(i)).map_or(0, |m| m.dims.1),
            weights: idx
                .iter()
                .filter_map(|&i| members.get(i))
                .map(|m| {
                    let dtype = model.tensor(&m.weight).map_or(Dtype::F32, |t| t.info.dtype);
                    let scale_bytes = m.scale.as_deref().and_then(|s| model.tensor(s)).map(|t| t.info.len);
                    WeightShape {
                        rows: m.dims.0,
                        dtype: match dtype {
                            Dtype::F16 => WeightDtype::F16,
                            Dtype::BF16 => WeightDtype::BF16,
                            Dtype::F8_E4M3 => WeightDtype::Fp8E4M3,
                            _ => WeightDtype::F32,
                        },
                        scale_bytes: if dtype == Dtype::F8_E4M3 { scale_bytes } else { None },
                    }
                })
                .collect(),
            // A Hessian file may turn out to hold no tokens (then U = I); count the factor.
            hessian: h.is_some(),
            want_dequant: false,
        })
        .collect()
}

/// Whether a member's mapped bytes can be read in place (else the host copies them).
fn aligned(model: &ModelDir, m: &Member) -> bool {
    let Some(t) = model.tensor(&m.weight) else { return true };
    let size = match t.info.dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        _ => 1,
    };
    // The address only: no page is touched.
    model.bytes(t).map_or(true, |b| (b.as_ptr() as usize).is_multiple_of(size))
}

/// Host bytes of one quantization step on a GPU run: its mapped input, a copy of a
/// misaligned weight, the codes (twice while they are copied out of the engine's staging),
/// the grid and loss, the encoded output, and for GPTQ the Hessian read from its file with
/// room for the pre-step on the CPU when cuSOLVER is missing.
fn gpu_item_memory(model: &ModelDir, plan: &Plan, item: &Item, members: &[Member]) -> u64 {
    let gptq = matches!(plan.settings.method, Method::Gptq(_));
    let mut total = item.input_bytes;
    for m in members {
        let (r, c) = (m.dims.0 as u64, m.dims.1 as u64);
        if !aligned(model, m) {
            total += model.tensor(&m.weight).map_or(0, |t| t.info.len as u64);
        }
        let ng = plan.settings.grid.n_groups(m.dims.1) as u64;
        total += 2 * r * c + 8 * r * ng + 4 * r;
        if gptq {
            total += 28 * c * c;
        }
    }
    total + item.outputs.iter().filter_map(|&o| plan.outputs.get(o)).map(|t| t.nbytes).sum::<u64>()
}

/// The run's memory (see the module docs); `gpu` selects the device path's windows.
pub fn estimate_memory(model: &ModelDir, plan: &Plan, gpu: bool) -> MemoryEstimate {
    let mut best = (0u64, String::new());
    if !gpu {
        for (k, item) in plan.items.iter().enumerate() {
            let window: u64 = plan.items.iter().skip(k).take(CPU_WINDOW).map(|i| i.memory).sum();
            if window > best.0 {
                best = (window, item.label.clone());
            }
        }
        return MemoryEstimate { host: best.0, host_step: best.1, pinned: 0, device: None };
    }
    let mut tracker = FootprintTracker::new();
    let mut quantized: Vec<(u64, &str)> = Vec::new();
    let mut other = 0u64;
    for item in &plan.items {
        match &item.work {
            Work::Quantize { members } => {
                for job in engine_jobs(model, plan, members) {
                    tracker.add(&job, &plan.settings.grid);
                }
                quantized.push((gpu_item_memory(model, plan, item, members), &item.label));
            }
            _ => other = other.max(item.memory),
        }
    }
    for k in 0..quantized.len() {
        let window: u64 = quantized.iter().skip(k).take(GPU_WINDOW).map(|q| q.0).sum();
        if window > best.0 {
            best = (window, quantized[k].1.to_string());
        }
    }
    let fp = tracker.total();
    MemoryEstimate { host: best.0 + other + fp.pinned, host_step: best.1, pinned: fp.pinned, device: Some(fp.device) }
}

/// The host budget against an estimate: [`ForgeError::OutOfMemory`] naming the step (with the
/// steps in flight beside it) and the run's budget as its origin.
pub fn check_host_budget(est: &MemoryEstimate, budget: u64) -> Result<()> {
    if est.host > budget {
        return Err(ForgeError::OutOfMemory {
            what: format!("step {} (with the steps in flight beside it)", est.host_step),
            requested: Some(est.host),
            limit: budget,
            origin: crate::budget::RUN_BUDGET_ORIGIN.into(),
        });
    }
    Ok(())
}

/// The default GPU budget: the device's free memory now (buffers the engine already holds
/// count as used, so this errs on the safe side).
pub fn default_gpu_budget(dev: &GpuDevice) -> Result<u64> {
    let (free, _) = dev.context().mem_get_info().map_err(ForgeError::driver("reading free device memory"))?;
    Ok(free as u64)
}

/// Walks the plan's engine jobs in order and fails at the first step whose job would grow
/// the engine past `budget` ([`ForgeError::GpuMemoryBudget`] with the step and the bytes).
pub fn check_gpu_budget(model: &ModelDir, plan: &Plan, budget: u64) -> Result<u64> {
    let mut tracker = FootprintTracker::new();
    for item in &plan.items {
        if let Work::Quantize { members } = &item.work {
            for job in engine_jobs(model, plan, members) {
                tracker.add(&job, &plan.settings.grid);
            }
            let needed = tracker.total().device;
            if needed > budget {
                return Err(ForgeError::GpuMemoryBudget { what: item.label.clone(), needed, budget });
            }
        }
    }
    Ok(tracker.total().device)
}
