//! The device-resident pipeline (`QuantEngine`), one run, tables:
//! 1. copy bandwidth measured here: pinned host→device, device→host, device→device;
//! 2. per layer, host weight (f32 and bf16) and host Hessian → host codes, qmeta and loss,
//!    for 4096×4096, 2048×7168, 7168×2048 (gs 128, 4-bit, symmetric absmax, act-order off):
//!    the wall time of one layer at a time (median), beside the kernel sum from device events
//!    (grid + pre-step + solve) and the transfer floor (inputs at the host→device rate,
//!    outputs at the device→host rate, both measured above), and the time per layer of 8
//!    layers back to back (two in flight);
//! 3. DeepSeek-like experts (gate and up 2048×7168 sharing one factor, down 7168×2048), 64
//!    back to back: with Hessians given on the device, and with Hessians from 8192 bf16
//!    tokens per expert (activations on the device, tensor-core accumulation); experts/s and
//!    the device allocations made during the 64;
//!
//! 1b. the GPU pre-step's parts (gather, factor, `R⁻¹`, extract; device events) for
//!    C = 2048, 4096, 7168 and each factor method, beside the f64 dgemm rate measured here;
//! 4. Hessian accumulation rate, tokens·C² multiply-adds per second, bf16 (tensor cores) and
//!    f32 (SYRK kernel), 8192 tokens on the device.
//!
//! Run on a GPU machine: `cargo bench --bench gpu_pipeline` (cuSOLVER and cuBLAS on
//! LD_LIBRARY_PATH).

mod common;

use cudarc::driver::sys::CUevent_flags;
use fourbit_forge::calib::ActivationView;
use fourbit_forge::device::{DeviceBuffer, DeviceBufferMut, GpuDevice};
use fourbit_forge::hessian::{
    DeviceActivations, FactorMethod, GpuHessian, GpuPreStepper, HessianAccumulator, PreStepConfig,
};
use fourbit_forge::quantize::{HessianInput, LayerJob, QuantEngine, Ticket};
use fourbit_forge::{ForgeError, GridConfig, Result, WeightView};
use half::bf16;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rayon::prelude::*;
use std::time::Instant;

fn randn(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Array2::from_shape_simple_fn((rows, cols), || rng.sample::<f32, _>(StandardNormal))
}

/// A realistic Hessian: `2/n·XᵀX` of `2·cols` correlated tokens (damped well enough that the
/// first factorisation succeeds, as for real layers).
fn hessian(cols: usize, seed: u64) -> Array2<f32> {
    let x = randn(2 * cols, cols, seed);
    let mut acc = HessianAccumulator::new(cols).expect("cols > 0");
    acc.update(x.view()).expect("finite");
    acc.into_h()
}

/// GB/s of `bytes` copied by `f`, device events, median of 9 after 2 warm-ups.
fn copy_rate(dev: &GpuDevice, bytes: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    Ok(bytes as f64 / (common::median_ms(dev, 2, 9, 1, &mut f)? * 1e-3) / 1e9)
}

/// The two jobs of a DeepSeek-like expert: gate and up sharing one factor, then down.
fn expert_jobs<'a>(
    gate: &'a Array2<f32>,
    up: &'a Array2<f32>,
    down: &'a Array2<f32>,
    h_in: &'a GpuHessian,
    h_down: &'a GpuHessian,
    cfg: &'a GridConfig,
    pcfg: &PreStepConfig,
) -> [LayerJob<'a>; 2] {
    let mut a = LayerJob::new(WeightView::F32(gate.view()), HessianInput::Device(h_in), cfg);
    a.weights.push(WeightView::F32(up.view()));
    a.pre_step = pcfg.clone();
    let mut b = LayerJob::new(WeightView::F32(down.view()), HessianInput::Device(h_down), cfg);
    b.pre_step = pcfg.clone();
    [a, b]
}

/// Submits `job` and collects the one before it (two in flight).
fn submit(engine: &mut QuantEngine, pending: &mut Option<Ticket>, job: &LayerJob<'_>) -> Result<()> {
    let t = engine.submit(job)?;
    if let Some(p) = pending.replace(t) {
        engine.collect(p)?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let Some(dev) = common::device_or_explain("gpu_pipeline") else { return Ok(()) };
    let mut engine = QuantEngine::new(dev.clone())?;
    if let Some(why) = engine.cpu_pre_step_reason() {
        println!("note: the pre-step runs on the CPU here ({why})");
    }
    let stream = dev.stream().clone();

    // 1. Copy bandwidth.
    let n = 256 << 20;
    // SAFETY: pinned buffers fully written by the copies timed below before any host read.
    let mut pinned = unsafe { dev.context().alloc_pinned::<u8>(n) }.map_err(ForgeError::driver("pinned"))?;
    let mut d = dev.alloc::<u8>(n, "bench buffer")?;
    let mut d2 = dev.alloc::<u8>(n, "bench buffer")?;
    let h2d = copy_rate(&dev, n, || stream.memcpy_htod(&pinned, &mut d).map_err(ForgeError::driver("h2d")))?;
    let d2h = copy_rate(&dev, n, || stream.memcpy_dtoh(&d, &mut pinned).map_err(ForgeError::driver("d2h")))?;
    let d2d = copy_rate(&dev, 2 * n, || stream.memcpy_dtod(&d, &mut d2).map_err(ForgeError::driver("d2d")))?;
    drop((d, d2, pinned));
    // 1a. Host staging: pageable → pinned copies on all cores, as the engine stages a layer
    // (1 MiB chunks), into write-combined and into plain pinned memory.
    let stage_bytes = 64 << 20;
    let src: Vec<u8> = (0..stage_bytes).map(|i| (i * 7 + 3) as u8).collect();
    let mut stage_rows = Vec::new();
    for (name, flags) in [("write-combined", cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED), ("plain", 0u32)] {
        // SAFETY: fully written by the copies below before anything reads it.
        let mut dst = unsafe { dev.context().alloc_pinned_with_flags::<u8>(stage_bytes, flags) }
            .map_err(ForgeError::driver("pinned"))?;
        let d = dst.as_mut_slice().map_err(ForgeError::driver("pinned slice"))?;
        for (chunk_name, chunk) in
            [("1 MiB chunks", 1usize << 20), ("64 KiB chunks", 1 << 16), ("one thread", stage_bytes)]
        {
            let mut times = Vec::new();
            for _ in 0..7 {
                let t = Instant::now();
                d.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
                times.push(t.elapsed().as_secs_f64());
            }
            let gbs = stage_bytes as f64 / median(times) / 1e9;
            stage_rows.push(vec![name.to_string(), chunk_name.to_string(), format!("{gbs:.1}")]);
        }
    }
    common::print_table(
        &format!(
            "host staging, 64 MiB pageable → pinned on {} threads (wall clock, median of 7)",
            rayon::current_num_threads()
        ),
        &["pinned memory", "copy", "GB/s"],
        &stage_rows,
    );
    common::print_table(
        &format!("copy bandwidth, {} (256 MiB, pinned host memory, device events)", dev.name()),
        &["copy", "GB/s"],
        &[
            vec!["host → device".into(), format!("{h2d:.1}")],
            vec!["device → host".into(), format!("{d2h:.1}")],
            vec!["device → device (read + write)".into(), format!("{d2d:.0}")],
        ],
    );

    // 1b. The pre-step's parts, per R⁻¹ method, beside the f64 dgemm rate.
    let side = 4096usize;
    let mut mats = (0..3).map(|_| dev.alloc::<f64>(side * side, "dgemm")).collect::<Result<Vec<_>>>()?;
    for m in &mut mats {
        stream.memset_zeros(m).map_err(ForgeError::driver("clearing a matrix"))?;
    }
    let (a, b, c) = (mats[0].dev_ptr().addr(), mats[1].dev_ptr().addr(), mats[2].dev_ptr_mut().addr());
    let dgemm_ms = common::median_ms(&dev, 2, 7, 1, || {
        // SAFETY: three live side² f64 buffers on the compute stream.
        dev.with_blas(|bl| unsafe {
            bl.dgemm((false, false), (side, side, side), 1.0, (a, side), (b, side), 0.0, (c, side))
        })
    })?;
    drop(mats);
    let dgemm_tflops = 2.0 * (side as f64).powi(3) / (dgemm_ms * 1e-3) / 1e12;
    // (name, method, the blocked recursion replayed from a captured CUDA graph)
    let methods = [
        ("potrf; trsm, all columns", FactorMethod::PotrfTrsm { block: 0 }, false),
        (
            "potrf; recursive inverse, dgemm, leaf 512",
            FactorMethod::PotrfRecursiveInverse { leaf: 512, gemm: true },
            false,
        ),
        ("blocked R and R⁻¹ (trmm/syrk), leaf 512", FactorMethod::Blocked { leaf: 512 }, false),
        ("blocked R and R⁻¹ (dgemm), leaf 128", FactorMethod::BlockedGemm { leaf: 128 }, false),
        ("blocked R and R⁻¹ (dgemm), leaf 128, CUDA graph", FactorMethod::BlockedGemm { leaf: 128 }, true),
        ("blocked R and R⁻¹ (dgemm), leaf 256, call by call", FactorMethod::default(), false),
        ("blocked R and R⁻¹ (dgemm), leaf 256, CUDA graph (default)", FactorMethod::default(), true),
        ("blocked R and R⁻¹ (dgemm), leaf 512", FactorMethod::BlockedGemm { leaf: 512 }, false),
        ("blocked R and R⁻¹ (dgemm), leaf 512, CUDA graph", FactorMethod::BlockedGemm { leaf: 512 }, true),
        ("blocked R and R⁻¹ (dgemm), leaf 1024", FactorMethod::BlockedGemm { leaf: 1024 }, false),
    ];
    let mut stepper = GpuPreStepper::new(&dev)?;
    let mut rows_pre = Vec::new();
    for c in [2048usize, 4096, 7168] {
        let h = GpuHessian::from_host(&dev, hessian(c, c as u64 + 1).view(), 1)?;
        let flops = (c as f64).powi(3) / 3.0;
        for (name, m, graph) in methods {
            stepper.set_graphs(graph);
            let mut parts: Vec<[f32; 4]> = Vec::new();
            for k in 0..7 {
                let t = stepper.profile(&dev, h.h(), c, &PreStepConfig::default(), m)?;
                if k > 1 {
                    parts.push(t); // the first grows the buffers, the second captures
                }
            }
            let med = |i: usize| median(parts.iter().map(|p| f64::from(p[i])).collect());
            let (g, p, inv, e) = (med(0), med(1), med(2), med(3));
            rows_pre.push(vec![
                format!("C={c}"),
                name.into(),
                format!("{g:.2}"),
                format!("{p:.2} ({:.1} TF/s)", flops / (p * 1e-3) / 1e12),
                format!("{inv:.2} ({:.1} TF/s)", flops / (inv * 1e-3) / 1e12),
                format!("{e:.2}"),
                format!("{:.2}", g + p + inv + e),
            ]);
        }
    }
    if let Some(why) = stepper.graph_failure() {
        println!("note: capturing the pre-step into a CUDA graph failed, so it ran call by call: {why}");
    }
    drop(stepper);
    common::print_table(
        &format!(
            "GPU pre-step parts, {} (ms, device events, median of 5; f64; rates count n³/3 flops each; \
             blocked: R and R⁻¹ together in the potrf column, the info reduction in the R⁻¹ column; \
             dgemm 4096³ f64 measured here: {dgemm_tflops:.1} TF/s)",
            dev.name()
        ),
        &["side", "method", "gather", "potrf", "R⁻¹", "extract", "total"],
        &rows_pre,
    );

    // 2. Per layer.
    let cfg = GridConfig::default();
    let mut rows_out = Vec::new();
    for (r, c) in [(4096usize, 4096usize), (2048, 7168), (7168, 2048)] {
        let w = common::heavy_tailed(r, c, (r + c) as u64);
        let wb = w.mapv(bf16::from_f32);
        let h = hessian(c, c as u64);
        for (name, view, graphs) in [
            ("f32, pre-step call by call", WeightView::F32(w.view()), false),
            ("f32", WeightView::F32(w.view()), true),
            ("bf16", WeightView::BF16(wb.view()), true),
        ] {
            engine.set_pre_step_graphs(graphs);
            let mut job = LayerJob::new(view, HessianInput::Host(h.view()), &cfg);
            job.profile = true;
            engine.quantize(&job)?; // warm-up: buffers grow, kernels load
            let mut walls = Vec::new();
            let mut kernels = Vec::new();
            let mut retries = 0;
            for _ in 0..7 {
                let t = Instant::now();
                let out = engine.quantize(&job)?;
                walls.push(t.elapsed().as_secs_f64() * 1e3);
                kernels.push(out.timings.map_or(f64::NAN, |t| t.kernel_ms() as f64));
                retries += out.pre_step.retries;
            }
            let (wall, kernel) = (median(walls), median(kernels));
            let in_bytes = r * c * view.dtype().size() + c * c * 4;
            let out_bytes = r * c + r * cfg.n_groups(c) * 4 + r * 4;
            let floor = in_bytes as f64 / (h2d * 1e9) * 1e3 + out_bytes as f64 / (d2h * 1e9) * 1e3;
            // Back to back, two in flight: uploads overlap the previous layer's compute.
            // The host's time inside submit and inside collect, per layer: where the host
            // waits shows which side bounds the stream.
            let phases0 = engine.stats().submit_host_ns;
            let t = Instant::now();
            let mut pending = None;
            let (mut in_submit, mut in_collect) = (0.0, 0.0);
            for _ in 0..8 {
                let ts = Instant::now();
                let tk = engine.submit(&LayerJob { profile: false, ..job.clone() })?;
                in_submit += ts.elapsed().as_secs_f64() * 1e3;
                if let Some(p) = pending.replace(tk) {
                    let tc = Instant::now();
                    engine.collect(p)?;
                    in_collect += tc.elapsed().as_secs_f64() * 1e3;
                }
            }
            if let Some(p) = pending {
                let tc = Instant::now();
                engine.collect(p)?;
                in_collect += tc.elapsed().as_secs_f64() * 1e3;
            }
            let streamed = t.elapsed().as_secs_f64() * 1e3 / 8.0;
            let phases: Vec<String> = engine
                .stats()
                .submit_host_ns
                .iter()
                .zip(&phases0)
                .map(|(a, b)| format!("{:.2}", (a - b) as f64 / 8.0 / 1e6))
                .collect();
            rows_out.push(vec![
                format!("{r}×{c}"),
                name.into(),
                format!("{wall:.2}"),
                format!("{kernel:.2}"),
                format!("{floor:.2}"),
                format!("{:.2}", wall / (kernel + floor)),
                format!("{streamed:.2}"),
                format!("{:.2} / {:.2}", in_submit / 8.0, in_collect / 8.0),
                phases.join(" / "),
                format!("{retries}"),
            ]);
        }
    }
    common::print_table(
        &format!(
            "per layer, host weight + host Hessian → host codes + qmeta + loss, gs 128, 4-bit, {} (ms; kernel sum from device events; floor = transfers at the rates above)",
            dev.name()
        ),
        &["shape", "weight", "wall", "kernel sum", "transfer floor", "wall / (kernels + floor)", "back to back, per layer", "host in submit / collect", "submit: H / W / index / pre-step / rest", "retries (7 runs)"],
        &rows_out,
    );

    // 3. Experts.
    let (gate, up, down) =
        (common::heavy_tailed(2048, 7168, 1), common::heavy_tailed(2048, 7168, 2), common::heavy_tailed(7168, 2048, 3));
    let pcfg = PreStepConfig::default();
    let distinct = 4;
    let h_in: Vec<GpuHessian> = (0..distinct)
        .map(|i| GpuHessian::from_host(&dev, hessian(7168, 10 + i as u64).view(), 1))
        .collect::<Result<_>>()?;
    let h_down: Vec<GpuHessian> = (0..distinct)
        .map(|i| GpuHessian::from_host(&dev, hessian(2048, 20 + i as u64).view(), 1))
        .collect::<Result<_>>()?;
    // Warm-up (buffers grow to the largest job), then 64 experts, two jobs in flight.
    let mut pending = None;
    let mut given = (0.0, 0);
    let mut given_direct = (0.0, 0);
    for (count, timed, graphs) in [(2usize, false, false), (64, true, false), (2, false, true), (64, true, true)] {
        engine.set_pre_step_graphs(graphs);
        let allocs = dev.allocation_count();
        let t = Instant::now();
        for e in 0..count {
            let [a, b] = expert_jobs(&gate, &up, &down, &h_in[e % distinct], &h_down[e % distinct], &cfg, &pcfg);
            submit(&mut engine, &mut pending, &a)?;
            submit(&mut engine, &mut pending, &b)?;
        }
        if let Some(p) = pending.take() {
            engine.collect(p)?;
        }
        let rate = (count as f64 / t.elapsed().as_secs_f64(), dev.allocation_count() - allocs);
        match (timed, graphs) {
            (true, true) => given = rate,
            (true, false) => given_direct = rate,
            _ => {}
        }
    }

    // Hessians from 8192 bf16 tokens per expert, activations on the device.
    let tokens = 8192;
    let x_in =
        DeviceActivations::upload(&dev, ActivationView::BF16(randn(tokens, 7168, 5).mapv(bf16::from_f32).view()))?;
    let x_down =
        DeviceActivations::upload(&dev, ActivationView::BF16(randn(tokens, 2048, 6).mapv(bf16::from_f32).view()))?;
    let mut acc_in = GpuHessian::new(&dev, 7168)?;
    let mut acc_down = GpuHessian::new(&dev, 2048)?;
    let mut from_tokens = (0.0, 0);
    for (count, timed) in [(2usize, false), (64, true)] {
        let allocs = dev.allocation_count();
        let t = Instant::now();
        for _ in 0..count {
            acc_in.reset(&dev)?;
            acc_down.reset(&dev)?;
            acc_in.update_device(&dev, &x_in)?;
            acc_down.update_device(&dev, &x_down)?;
            // The engine copies a device Hessian into its slot at submit: the accumulators
            // are free again once both jobs are submitted.
            let [a, b] = expert_jobs(&gate, &up, &down, &acc_in, &acc_down, &cfg, &pcfg);
            submit(&mut engine, &mut pending, &a)?;
            submit(&mut engine, &mut pending, &b)?;
        }
        if let Some(p) = pending.take() {
            engine.collect(p)?;
        }
        if timed {
            from_tokens = (count as f64 / t.elapsed().as_secs_f64(), dev.allocation_count() - allocs);
        }
    }
    common::print_table(
        &format!("DeepSeek-like experts, 64 back to back, f32 weights, gs 128, 4-bit, {}", dev.name()),
        &["Hessians", "experts/s", "ms per expert", "device allocations during the 64"],
        &[
            vec![
                "given on the device, pre-step call by call".into(),
                format!("{:.1}", given_direct.0),
                format!("{:.1}", 1e3 / given_direct.0),
                given_direct.1.to_string(),
            ],
            vec![
                "given on the device".into(),
                format!("{:.1}", given.0),
                format!("{:.1}", 1e3 / given.0),
                given.1.to_string(),
            ],
            vec![
                format!("from {tokens} bf16 tokens per expert (tensor cores)"),
                format!("{:.1}", from_tokens.0),
                format!("{:.1}", 1e3 / from_tokens.0),
                from_tokens.1.to_string(),
            ],
        ],
    );

    if let Some(why) = engine.pre_step_graph_failure() {
        println!("note: the engine's pre-step graphs failed, so it ran call by call: {why}");
    }
    let st = engine.stats();
    println!("engine pre-step graphs: {} captured, {} replays", st.pre_step_graph_captures, st.pre_step_graph_replays);

    // 4. Hessian accumulation rate.
    let mut rows = Vec::new();
    for c in [2048usize, 4096, 7168] {
        let x = randn(tokens, c, c as u64);
        let macs = (tokens * c * c) as f64;
        let mut h = GpuHessian::new(&dev, c)?;
        for (name, view) in [
            ("bf16 (tensor cores)", ActivationView::BF16(x.mapv(bf16::from_f32).view())),
            ("f32 (SYRK)", ActivationView::F32(x.view())),
        ] {
            let dx = DeviceActivations::upload(&dev, view)?;
            let ms = common::median_ms(&dev, 2, 7, 3, || h.update_device(&dev, &dx))?;
            rows.push(vec![
                format!("C={c}"),
                name.into(),
                format!("{ms:.3}"),
                format!("{:.0}", macs / (ms * 1e-3) / 1e12),
            ]);
        }
    }
    common::print_table(
        &format!("Hessian update, {tokens} tokens on the device, {} (device events, median)", dev.name()),
        &["shape", "activations", "ms", "T MAC/s (tokens·C²)"],
        &rows,
    );
    let _ = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
    Ok(())
}
