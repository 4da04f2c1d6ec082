//! W4A16 matmul benchmark (issue 15): our kernel against cuBLAS bf16 GEMM on the dequantized
//! weight and against the HBM floor, for the layer shapes of the issue and M from 1 to 4096.
//!
//! Timing: each measurement is a CUDA graph of back-to-back launches that cycle over enough
//! distinct weight copies (> 4× the 50 MB L2) that every launch reads its weight from HBM,
//! for our kernel and cuBLAS alike; device events around graph launches, median of 7, divided
//! by the launches per graph. The floor is (packed codes + records + X + Y bytes) at the
//! device-to-device copy bandwidth measured in the same run (bytes read + written per second:
//! the HBM traffic a copy sustains, which a read-mostly kernel can use for reading).
//!
//! Run on a GPU machine: `cargo bench --bench gpu_w4a16` (cuBLAS from LD_LIBRARY_PATH, see the
//! README). `W4A16_BENCH_QUICK=1` times only M ∈ {1, 16, 64, 1024} on two shapes;
//! `W4A16_BENCH_SPLITS=1` also sweeps the split-K factor at M 1, 16 and 64;
//! `W4A16_BENCH_ONLY=NxK:M` times one case (for a profiler), `W4A16_BENCH_MS=1024,4096` only
//! those row counts; `W4A16_BENCH_CHUNKS=1` also times dequantization + cuBLAS in column
//! chunks of 4–48 MB (`gemm_chunk_bytes`). On a Hopper GPU the table also
//! times the `wgmma` kernel where the plan picks another fused kernel, the sm_80 kernel where
//! it picks a Hopper-module one, and the Hopper-module kernels launched overlapping
//! (`overlap_prior_kernel`: each launch's blocks start while the previous one finishes and
//! stream their weight, then wait for it before reading `X`, as in a chain of layers), and,
//! where the plan adds the split-K partials in thread-block clusters, the same plan with the
//! global split-K (workspace and arrival counters), and, where it runs one block per tile
//! (16-warp blocks at 1–8 rows), the plan without them (`wide_skinny_blocks: Some(false)`),
//! and at 1–16 rows the launch with the 12-warp blocks (operands in registers) toggled
//! (`deep_skinny_blocks: Some(on)`, on where the plan runs another kernel), plain and
//! overlapped.
//!
//! Then 8-bit codes (`W4A16_BENCH_W8=only` times only those, `=skip` leaves them out): the
//! five shapes at M 1–4096, the plan's launch against the 4-bit plan, cuBLAS bf16 and the
//! 8-bit floor.
//!
//! Then the grouped mixture-of-experts launch (`W4A16_BENCH_MOE=only` times only that,
//! `W4A16_BENCH_MOE=skip` leaves it out) on
//! Qwen3-30B-A3B and DeepSeek-V3 expert layers, 1–1024 tokens routed top-8 at random, against
//! a loop of per-expert launches, a loop of cuBLAS bf16 GEMMs per expert on the dequantized
//! experts (the layer unquantized) and the floor of the active experts' weights; "device-routed"
//! builds the task table on the device from device offsets before each launch (a GPU router's
//! step: no host copy, fixed grid), with `ExpertRouting::rows_hint` and with the tokens as the
//! hint; "top-k step" is the whole step from the router's top-k ids on the device
//! (`TopkRouting`: the route and task table, the gather of `X` from the tokens' hidden states,
//! the launch, the combine of `Y` per token with the routing weights).

mod common;

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaSlice;
use fourbit_forge::device::cublas::BlasInput;
use fourbit_forge::device::{DeviceBuffer, DeviceBufferMut, GpuDevice};
use fourbit_forge::runtime::{
    expert_offsets, launch_dequant, pack_for_kernel, w4a16_grouped_matmul, w4a16_matmul, ActDtype, DeviceExperts,
    DevicePackedWeight, ExpertRouting, FusedKernel, MatmulPath, TopkRouting, W4a16Options, W4a16Plan, W4a16Workspace,
};
use fourbit_forge::{ForgeError, QMetaPacked, QuantGrid, Result, ScaleDtype};
use rand::{rngs::StdRng, Rng, SeedableRng};

const SHAPES: [(usize, usize); 5] = [(4096, 4096), (14336, 4096), (4096, 14336), (2048, 7168), (7168, 2048)];
const MS: [usize; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096];
const GS: usize = 128;
/// Bytes of weights one graph cycles through (the H200's L2 is 50 MB).
const CYCLE_BYTES: usize = 200 << 20;

/// Median seconds per call of `enqueue(i)` (i = call index), as a graph of `reps` calls.
fn time_graph(dev: &GpuDevice, reps: usize, mut enqueue: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    let stream = dev.stream().clone();
    for i in 0..reps.min(4) {
        enqueue(i)?; // warm-up outside the capture: workspaces grow here, never inside it
    }
    dev.synchronize()?;
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(ForgeError::driver("beginning a graph capture"))?;
    let captured = (0..reps).try_for_each(&mut enqueue);
    let graph =
        stream.end_capture(CUgraphInstantiate_flags(0)).map_err(ForgeError::driver("ending a graph capture"))?;
    captured?;
    let graph = graph.ok_or_else(|| ForgeError::Internal("empty graph".into()))?;
    graph.upload().map_err(ForgeError::driver("uploading a graph"))?;
    graph.launch().map_err(ForgeError::driver("launching a graph"))?;
    dev.synchronize()?;
    let mut times = Vec::new();
    for _ in 0..7 {
        let ev = |s: &std::sync::Arc<cudarc::driver::CudaStream>| {
            s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(ForgeError::driver("recording an event"))
        };
        let start = ev(&stream)?;
        graph.launch().map_err(ForgeError::driver("launching a graph"))?;
        let end = ev(&stream)?;
        end.synchronize().map_err(ForgeError::driver("waiting for an event"))?;
        times.push(start.elapsed_ms(&end).map_err(ForgeError::driver("reading an event"))? as f64 * 1e-3 / reps as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Device-to-device copy bandwidth, (read + written bytes) per second, on a 1 GiB buffer.
fn copy_bandwidth(dev: &GpuDevice) -> Result<f64> {
    let bytes = 1usize << 30;
    let src = dev.alloc::<u8>(bytes, "bench copy source")?;
    let mut dst = dev.alloc::<u8>(bytes, "bench copy target")?;
    let stream = dev.stream().clone();
    let t = common::median_ms(dev, 2, 7, 5, || stream.memcpy_dtod(&src, &mut dst).map_err(ForgeError::driver("copy")))?;
    Ok(2.0 * bytes as f64 / (t * 1e-3))
}

/// A synthetic 4-bit layer: random codes, symmetric records with scales around 2^-7.
fn packed_layer(n: usize, k: usize, seed: u64) -> Result<fourbit_forge::runtime::PackedWeight> {
    packed_layer_bits(n, k, 4, seed)
}

/// [`packed_layer`] of `bits`-bit codes (4 or 8; scales 2^-4 lower at 8 bits, so the weights'
/// magnitudes match).
fn packed_layer_bits(n: usize, k: usize, bits: u32, seed: u64) -> Result<fourbit_forge::runtime::PackedWeight> {
    let mut rng = StdRng::seed_from_u64(seed);
    let maxq = (1u32 << bits) - 1;
    let codes = ndarray::Array2::from_shape_simple_fn((n, k), || rng.gen_range(0..=maxq) as u8);
    let n_groups = k.div_ceil(GS);
    let (zero, lo) = (1u32 << (bits - 1), -256 * (4 + bits as i32));
    let recs: Vec<u32> = (0..n * n_groups)
        .map(|_| {
            QMetaPacked { log2_scale_q88: rng.gen_range(lo..lo + 512) as i16, qzero: zero as u8, flags: 1 }.to_u32()
        })
        .collect();
    let grid = QuantGrid::from_u32(&recs, n, n_groups, maxq, n_groups * GS - k, GS, ScaleDtype::F32)?;
    pack_for_kernel(codes.view(), &grid)
}

/// cuBLAS's weight: the kernel's own dequantization of `w`, in enough copies to cycle over
/// more than L2 holds.
fn dense_copies(dev: &GpuDevice, w: &DevicePackedWeight) -> Result<Vec<CudaSlice<u16>>> {
    let (n, k) = (w.dims.n, w.dims.k);
    (0..CYCLE_BYTES.div_ceil(n * k * 2).max(2))
        .map(|_| {
            let mut d = dev.alloc::<u16>(n * k, "bench dense weight")?;
            launch_dequant(dev, w, &mut d, ActDtype::Bf16)?;
            Ok(d)
        })
        .collect()
}

/// `X` (`m × k` bf16, uniform in [−1, 1), seeded by `m`) and a `Y` of `m × n` on the device.
fn bench_xy(dev: &GpuDevice, m: usize, k: usize, n: usize) -> Result<(CudaSlice<u16>, CudaSlice<u16>)> {
    let mut rng = StdRng::seed_from_u64(m as u64);
    let xh: Vec<u16> = (0..m * k).map(|_| ActDtype::Bf16.bits(rng.gen_range(-1.0f32..1.0))).collect();
    let mut x = dev.alloc::<u16>(m * k, "bench X")?;
    dev.stream().memcpy_htod(&xh, &mut x).map_err(ForgeError::driver("uploading X"))?;
    Ok((x, dev.alloc::<u16>(m * n, "bench Y")?))
}

/// cuBLAS bf16 `Y = X·Wᵀ` per launch, cycling over the `dense` weight copies (`[n, k]` each;
/// `x` `m·k`, `y` `m·n` values).
fn time_blas(
    dev: &GpuDevice,
    x: &CudaSlice<u16>,
    dense: &[CudaSlice<u16>],
    y: &mut CudaSlice<u16>,
    (m, n, k): (usize, usize, usize),
) -> Result<f64> {
    time_graph(dev, dense.len().max(24), |i| {
        let (xa, wa, ya) = (x.dev_ptr().addr(), dense[i % dense.len()].dev_ptr().addr(), y.dev_ptr_mut().addr());
        // SAFETY: x m·k, the dense weight n·k, y m·n bf16 values on the device's stream.
        dev.with_blas(|b| unsafe { b.gemm_xwt(BlasInput::BF16, m, n, k, xa, wa, ya) })
    })
}

/// Row counts of the 8-bit table.
const W8_MS: [usize; 7] = [1, 4, 16, 64, 256, 1024, 4096];

/// The 8-bit table (5–8-bit grids run 8-bit tiles): per bench shape and row count, the plan's
/// launch (the 8-bit skinny kernel, or dequantization + cuBLAS from `gemm_min_m`), the 8-bit
/// skinny kernel where the plan takes cuBLAS, the 4-bit plan on the same shape, cuBLAS bf16
/// and the 8-bit HBM floor, timed as the main table times them.
fn bench_w8(dev: &GpuDevice, bw: f64) -> Result<()> {
    let blas = fourbit_forge::device::cublas::cublas_available().is_ok();
    let mut rows = Vec::new();
    for (si, &(n, k)) in SHAPES.iter().enumerate() {
        let upload = |bits: u32| -> Result<(Vec<DevicePackedWeight>, usize)> {
            let packed = packed_layer_bits(n, k, bits, 50 + si as u64)?;
            let copies = CYCLE_BYTES.div_ceil(packed.bytes()).max(2);
            let w = (0..copies).map(|_| DevicePackedWeight::upload(dev, &packed)).collect::<Result<_>>()?;
            Ok((w, packed.bytes()))
        };
        let (w8, bytes8) = upload(8)?;
        let (w4, _) = upload(4)?;
        let dense = if blas { dense_copies(dev, &w8[0])? } else { Vec::new() };
        for &m in &W8_MS {
            let (x, mut y) = bench_xy(dev, m, k, n)?;
            let mut ws = W4a16Workspace::default();
            let floor = (bytes8 + 2 * m * k + 2 * m * n) as f64 / bw;
            let mut run = |w: &[DevicePackedWeight], opts: W4a16Options| -> Result<(f64, W4a16Plan)> {
                let mut plan = None;
                let t = time_graph(dev, w.len().max(24), |i| {
                    plan = Some(w4a16_matmul(dev, &x, m, &w[i % w.len()], &mut y, ActDtype::Bf16, &opts, &mut ws)?);
                    Ok(())
                })?;
                Ok((t, plan.ok_or_else(|| ForgeError::Internal("no launch".into()))?))
            };
            let (t8, plan) = run(&w8, W4a16Options::default())?;
            let t8_fused = if plan.path == MatmulPath::DequantGemm {
                Some(run(&w8, W4a16Options { path: MatmulPath::Fused, ..Default::default() })?.0)
            } else {
                None
            };
            let (t4, _) = run(&w4, W4a16Options::default())?;
            let t_blas = if blas { Some(time_blas(dev, &x, &dense, &mut y, (m, n, k))?) } else { None };
            let us = |t: f64| format!("{:.2}", t * 1e6);
            let plan_s = match (plan.path, plan.kernel) {
                (MatmulPath::DequantGemm, _) => "dequant+cuBLAS".to_string(),
                (_, k) => format!("{k:?} s{}", plan.splits),
            };
            rows.push(vec![
                format!("{n}×{k}"),
                m.to_string(),
                plan_s,
                us(t8),
                t8_fused.map_or("=".into(), us),
                us(t4),
                t_blas.map_or("–".into(), us),
                us(floor),
                t_blas.map_or("–".into(), |t| format!("{:.2}×", t / t8)),
                format!("{:.0}%", 100.0 * floor / t8),
            ]);
        }
    }
    common::print_table(
        &format!(
            "W8A16 (bf16, 8-bit, gs {GS}, symmetric) on {}, copy {:.0} GB/s (µs per launch)",
            dev.name(),
            bw / 1e9
        ),
        &[
            "N×K",
            "M",
            "8-bit plan",
            "8-bit µs",
            "8-bit skinny µs",
            "4-bit µs",
            "cuBLAS bf16 µs",
            "8-bit HBM floor µs",
            "vs cuBLAS",
            "% of floor",
        ],
        &rows,
    );
    Ok(())
}

/// Mixture-of-experts layers for the grouped launch: (name, experts, N, K, experts per
/// token). Qwen3-30B-A3B (128 experts of 768, hidden 2048) and DeepSeek-V3 / Kimi K2 (256
/// of 2048, hidden 7168): the fused gate/up projection and the down projection.
const MOE_LAYERS: [(&str, usize, usize, usize, usize); 4] = [
    ("Qwen3-30B-A3B gate_up", 128, 1536, 2048, 8),
    ("Qwen3-30B-A3B down", 128, 2048, 768, 8),
    ("DeepSeek-V3 gate_up", 256, 4096, 7168, 8),
    ("DeepSeek-V3 down", 256, 7168, 2048, 8),
];
/// Tokens per step of the grouped bench.
const MOE_TOKENS: [usize; 5] = [1, 4, 16, 64, 1024];
/// Distinct packed experts per layer (copied to fill the layer: packing 256 large experts on
/// the host would dominate the run).
const MOE_DISTINCT: usize = 8;
/// Routings one graph cycles through, so consecutive launches read different experts.
const MOE_ROUTINGS: usize = 16;

/// Random top-`top_k` routings of `tokens` tokens over `experts`: the ids (token-major, as a
/// router's top-k leaves them) and the offsets of the rows sorted by expert.
fn random_routing(experts: usize, tokens: usize, top_k: usize, rng: &mut StdRng) -> (Vec<u32>, Vec<usize>) {
    let mut rows = vec![0usize; experts];
    let mut ids = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let mut picked = Vec::with_capacity(top_k);
        while picked.len() < top_k.min(experts) {
            let e = rng.gen_range(0..experts);
            if !picked.contains(&e) {
                picked.push(e);
            }
        }
        picked.iter().for_each(|&e| rows[e] += 1);
        ids.extend(picked.iter().map(|&e| e as u32));
    }
    (ids, expert_offsets(&rows))
}

/// Median seconds per grouped launch cycling over `routings` (each run once first, so the
/// workspace grows outside the capture), with the last plan.
#[allow(clippy::too_many_arguments)]
fn time_grouped(
    dev: &GpuDevice,
    x: &CudaSlice<u16>,
    routings: &[ExpertRouting],
    w: &DeviceExperts,
    y: &mut CudaSlice<u16>,
    opts: &W4a16Options,
    ws: &mut W4a16Workspace,
) -> Result<(f64, Option<W4a16Plan>)> {
    for r in routings {
        w4a16_grouped_matmul(dev, x, r, w, y, ActDtype::Bf16, opts, ws)?;
    }
    let mut plan = None;
    let t = time_graph(dev, routings.len().max(24), |i| {
        plan = w4a16_grouped_matmul(dev, x, &routings[i % routings.len()], w, y, ActDtype::Bf16, opts, ws)?;
        Ok(())
    })?;
    Ok((t, plan))
}

/// The grouped (MoE) launch against a loop of per-expert launches and the HBM floor.
fn bench_moe(dev: &GpuDevice, bw: f64) -> Result<()> {
    let stream = dev.stream().clone();
    let mut rows_out = Vec::new();
    for (li, &(name, experts, n, k, top_k)) in MOE_LAYERS.iter().enumerate() {
        let distinct: Vec<_> = (0..MOE_DISTINCT)
            .map(|i| packed_layer(n, k, 100 + (li * MOE_DISTINCT + i) as u64))
            .collect::<Result<_>>()?;
        let layer: Vec<&fourbit_forge::runtime::PackedWeight> =
            (0..experts).map(|e| &distinct[e % MOE_DISTINCT]).collect();
        let grouped_w = DeviceExperts::upload(dev, &layer)?;
        let single: Vec<DevicePackedWeight> =
            layer.iter().map(|p| DevicePackedWeight::upload(dev, p)).collect::<Result<_>>()?;
        // The bf16 layer cuBLAS multiplies: every expert dequantized (the kernel's own weights),
        // one allocation each (DeepSeek-V3's 256 gate_up experts: 15 GB).
        let dense: Vec<CudaSlice<u16>> = if fourbit_forge::device::cublas::cublas_available().is_ok() {
            single
                .iter()
                .map(|w| {
                    let mut d = dev.alloc::<u16>(n * k, "bench dense expert")?;
                    launch_dequant(dev, w, &mut d, ActDtype::Bf16)?;
                    Ok(d)
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let mut rng = StdRng::seed_from_u64(li as u64);
        for &tokens in &MOE_TOKENS {
            let rows = tokens * top_k;
            let (ids, offsets): (Vec<Vec<u32>>, Vec<Vec<usize>>) =
                (0..MOE_ROUTINGS).map(|_| random_routing(experts, tokens, top_k, &mut rng)).unzip();
            let routings: Vec<ExpertRouting> =
                offsets.iter().map(|o| ExpertRouting::new(dev, o)).collect::<Result<_>>()?;
            let xh: Vec<u16> = (0..rows * k).map(|_| ActDtype::Bf16.bits(rng.gen_range(-1.0f32..1.0))).collect();
            let mut x = dev.alloc::<u16>(rows * k, "bench X")?;
            stream.memcpy_htod(&xh, &mut x).map_err(ForgeError::driver("uploading X"))?;
            let mut y = dev.alloc::<u16>(rows * n, "bench Y")?;
            let mut ws = W4a16Workspace::default();
            let opts = W4a16Options::default();
            // What a caller without the grouped launch does: one launch per expert with rows
            // (each reading the first rows of X: the same bytes).
            let mut per_expert = |o: &[usize]| -> Result<()> {
                for (e, w) in single.iter().enumerate() {
                    let m = o[e + 1] - o[e];
                    if m > 0 {
                        w4a16_matmul(dev, &x, m, w, &mut y, ActDtype::Bf16, &opts, &mut ws)?;
                    }
                }
                Ok(())
            };
            // Every routing once before the captures: the workspace grows outside them.
            offsets.iter().try_for_each(|o| per_expert(o))?;
            let t_loop = time_graph(dev, MOE_ROUTINGS, |i| per_expert(&offsets[i % MOE_ROUTINGS]))?;
            // A bf16 layer without quantization: one cuBLAS GEMM per expert with rows, on its
            // rows of X and Y.
            let t_blas = if dense.is_empty() {
                None
            } else {
                let (xa, ya) = (x.dev_ptr().addr(), y.dev_ptr_mut().addr());
                Some(time_graph(dev, MOE_ROUTINGS, |i| {
                    let o = &offsets[i % MOE_ROUTINGS];
                    dense.iter().enumerate().try_for_each(|(e, w)| {
                        let m = o[e + 1] - o[e];
                        if m == 0 {
                            return Ok(());
                        }
                        let (xe, ye) = (xa + (2 * o[e] * k) as u64, ya + (2 * o[e] * n) as u64);
                        // SAFETY: rows o[e]..o[e+1] of X (k values each) and Y (n each) lie
                        // inside their rows·k and rows·n allocations; the expert n·k; bf16.
                        dev.with_blas(|b| unsafe { b.gemm_xwt(BlasInput::BF16, m, n, k, xe, w.dev_ptr().addr(), ye) })
                    })
                })?)
            };
            let (t_grouped, plan) = time_grouped(dev, &x, &routings, &grouped_w, &mut y, &opts, &mut ws)?;
            // Where the plan runs the wgmma kernel, the skinny one in the same run.
            let t_skinny = if plan.is_some_and(|p| matches!(p.kernel, FusedKernel::Wgmma { .. })) {
                let o = W4a16Options { hopper_min_m: usize::MAX, ..opts };
                Some(time_grouped(dev, &x, &routings, &grouped_w, &mut y, &o, &mut ws)?.0)
            } else {
                None
            };
            // The same step routed on the device: the table built from device offsets (a GPU
            // router's), then the launch over its fixed task count.
            let offsets_d: Vec<CudaSlice<u32>> = offsets
                .iter()
                .map(|o| {
                    let v: Vec<u32> = o.iter().map(|&r| r as u32).collect();
                    let mut d = dev.alloc::<u32>(v.len(), "bench offsets")?;
                    stream.memcpy_htod(&v, &mut d).map_err(ForgeError::driver("uploading offsets"))?;
                    Ok(d)
                })
                .collect::<Result<_>>()?;
            // With the default hint, and with the tokens as the hint (the hard bound on an
            // expert's rows under top-k routing).
            let mut time_device = |hint: usize| -> Result<(f64, Option<W4a16Plan>)> {
                let mut on_device = ExpertRouting::on_device(dev, experts, rows, hint)?;
                let mut device_plan = None;
                let t = time_graph(dev, MOE_ROUTINGS.max(24), |i| {
                    on_device.build_from(dev, &offsets_d[i % MOE_ROUTINGS])?;
                    device_plan =
                        w4a16_grouped_matmul(dev, &x, &on_device, &grouped_w, &mut y, ActDtype::Bf16, &opts, &mut ws)?;
                    Ok(())
                })?;
                on_device.device_status(dev)?;
                Ok((t, device_plan))
            };
            let (t_device, device_plan) = time_device(ExpertRouting::rows_hint(rows, experts))?;
            let (t_device_tokens, _) = time_device(tokens)?;
            // The whole step from the router's top-k ids on the device: route (sorted rows and
            // the task table), gather X from the tokens' hidden states, the launch, and the
            // combine of Y per token with the routing weights.
            let t_topk = {
                let ids_d: Vec<CudaSlice<u32>> = ids
                    .iter()
                    .map(|v| {
                        let mut d = dev.alloc::<u32>(v.len(), "bench ids")?;
                        stream.memcpy_htod(v, &mut d).map_err(ForgeError::driver("uploading ids"))?;
                        Ok(d)
                    })
                    .collect::<Result<_>>()?;
                let hidden = dev.alloc::<u16>(tokens * k, "bench hidden")?;
                let mut weights = dev.alloc::<f32>(rows, "bench weights")?;
                stream
                    .memcpy_htod(&vec![1.0f32 / top_k as f32; rows], &mut weights)
                    .map_err(ForgeError::driver("uploading weights"))?;
                let mut out = dev.alloc::<u16>(tokens * n, "bench out")?;
                let mut topk = TopkRouting::new(dev, experts, tokens, top_k, None)?;
                let t = time_graph(dev, MOE_ROUTINGS.max(24), |i| {
                    topk.route(dev, &ids_d[i % MOE_ROUTINGS], tokens)?;
                    topk.gather(dev, &hidden, k, &mut x)?;
                    w4a16_grouped_matmul(
                        dev,
                        &x,
                        topk.expert_routing(),
                        &grouped_w,
                        &mut y,
                        ActDtype::Bf16,
                        &opts,
                        &mut ws,
                    )?;
                    topk.combine(dev, &y, n, &weights, &mut out, ActDtype::Bf16)
                })?;
                topk.device_status(dev)?;
                t
            };
            if std::env::var_os("W4A16_BENCH_SPLITS").is_some() {
                let mut line = format!("grouped splits sweep {name} tokens {tokens}:");
                for sp in [1u32, 2, 3, 4, 8] {
                    let o = W4a16Options { splits: Some(sp), ..opts };
                    let (t, p) = time_grouped(dev, &x, &routings, &grouped_w, &mut y, &o, &mut ws)?;
                    let c = if p.is_some_and(|p| p.cluster > 1) { "c" } else { "" };
                    line += &format!(" s{}{c}={:.2}", p.map_or(0, |p| p.splits), t * 1e6);
                }
                println!("{line}");
            }
            let active: f64 =
                routings.iter().map(|r| r.tasks().map_or(0, |t| t.active) as f64).sum::<f64>() / MOE_ROUTINGS as f64;
            let bytes = active * grouped_w.expert_bytes() as f64 + (2 * rows * k + 2 * rows * n) as f64;
            let floor = bytes / bw;
            let us = |t: f64| format!("{:.2}", t * 1e6);
            let plan_s = plan.map_or("–".to_string(), |p| {
                let c = if p.cluster > 1 { " cluster" } else { "" };
                format!("{:?} s{}{c} b{}/{}", p.kernel, p.splits, p.blocks, p.resident)
            });
            rows_out.push(vec![
                name.to_string(),
                format!("{experts}×{n}×{k}"),
                tokens.to_string(),
                rows.to_string(),
                format!("{active:.1}"),
                plan_s,
                us(t_grouped),
                t_skinny.map_or("–".into(), us),
                format!(
                    "{} ({})",
                    us(t_device),
                    device_plan.map_or("–".to_string(), |p| format!("{:?} s{} b{}", p.kernel, p.splits, p.blocks))
                ),
                us(t_device_tokens),
                us(t_topk),
                us(t_loop),
                t_blas.map_or("–".into(), us),
                format!("{:.2}×", t_loop / t_grouped),
                us(floor),
                format!("{:.0}%", 100.0 * floor / t_grouped),
            ]);
        }
    }
    common::print_table(
        &format!(
            "Grouped MoE W4A16 (bf16, 4-bit, gs {GS}, top-k routing, {MOE_ROUTINGS} routings per graph) on {}, copy {:.0} GB/s",
            dev.name(),
            bw / 1e9
        ),
        &[
            "layer",
            "E×N×K",
            "tokens",
            "rows",
            "active experts",
            "grouped plan",
            "grouped µs",
            "grouped, skinny kernel µs",
            "device-routed µs (table build + launch; plan)",
            "device-routed, hint = tokens µs",
            "top-k step µs (route + gather + launch + combine)",
            "per-expert launches µs",
            "cuBLAS bf16 per expert µs",
            "speed-up",
            "HBM floor µs",
            "% of floor",
        ],
        &rows_out,
    );
    Ok(())
}

/// The top-k step's own kernels alone, DeepSeek-V3-shaped (256 experts, top-8, hidden 7168):
/// the route (sorted rows + task tables, one block), the gather of `X`, the combine of `Y`,
/// up to a 16384-token prefill.
fn bench_topk_parts(dev: &GpuDevice, bw: f64) -> Result<()> {
    let (experts, top_k, k, n) = (256usize, 8usize, 7168usize, 7168usize);
    let stream = dev.stream().clone();
    let mut out_rows = Vec::new();
    for tokens in [1usize, 64, 1024, 16384] {
        let pairs = tokens * top_k;
        let mut rng = StdRng::seed_from_u64(tokens as u64);
        let ids_d: Vec<CudaSlice<u32>> = (0..4)
            .map(|_| {
                let (ids, _) = random_routing(experts, tokens, top_k, &mut rng);
                let mut d = dev.alloc::<u32>(pairs, "bench ids")?;
                stream.memcpy_htod(&ids, &mut d).map_err(ForgeError::driver("uploading ids"))?;
                Ok(d)
            })
            .collect::<Result<_>>()?;
        let hidden = dev.alloc::<u16>(tokens * k, "bench hidden")?;
        let mut x = dev.alloc::<u16>(pairs * k, "bench sorted X")?;
        let y = dev.alloc::<u16>(pairs * n, "bench sorted Y")?;
        let weights = dev.alloc::<f32>(pairs, "bench weights")?;
        let mut out = dev.alloc::<u16>(tokens * n, "bench out")?;
        let mut topk = TopkRouting::new(dev, experts, tokens, top_k, None)?;
        let t_route = time_graph(dev, 24, |i| topk.route(dev, &ids_d[i % 4], tokens))?;
        topk.device_status(dev)?;
        let t_gather = time_graph(dev, 24, |_| topk.gather(dev, &hidden, k, &mut x))?;
        let t_combine = time_graph(dev, 24, |_| topk.combine(dev, &y, n, &weights, &mut out, ActDtype::Bf16))?;
        // Bytes each moves at least: X written (its reads are of `tokens` rows, L2-resident
        // when a token's rows are copied together); Y read and the output written.
        let (gather_bytes, combine_bytes) = ((2 * pairs * k) as f64, (2 * pairs * n + 2 * tokens * n) as f64);
        let us = |t: f64| format!("{:.2}", t * 1e6);
        out_rows.push(vec![
            tokens.to_string(),
            pairs.to_string(),
            us(t_route),
            us(t_gather),
            us(gather_bytes / bw),
            us(t_combine),
            us(combine_bytes / bw),
        ]);
    }
    common::print_table(
        &format!("Top-k step kernels (256 experts, top-8, K = N = 7168, bf16) on {}", dev.name()),
        &["tokens", "pairs", "route µs", "gather µs", "gather floor µs", "combine µs", "combine floor µs"],
        &out_rows,
    );
    Ok(())
}

fn main() -> Result<()> {
    let Some(dev) = common::device_or_explain("gpu_w4a16") else { return Ok(()) };
    if std::env::var("W4A16_BENCH_W8").is_ok_and(|v| v == "only") {
        let bw = copy_bandwidth(&dev)?;
        println!("device-to-device copy: {:.0} GB/s (read + written); SMs: {}", bw / 1e9, dev.sm_count()?);
        return bench_w8(&dev, bw);
    }
    if std::env::var("W4A16_BENCH_MOE").is_ok_and(|v| v == "only") {
        let bw = copy_bandwidth(&dev)?;
        println!("device-to-device copy: {:.0} GB/s (read + written); SMs: {}", bw / 1e9, dev.sm_count()?);
        bench_topk_parts(&dev, bw)?;
        return bench_moe(&dev, bw);
    }
    let quick = std::env::var_os("W4A16_BENCH_QUICK").is_some();
    let sweep = std::env::var_os("W4A16_BENCH_SPLITS").is_some();
    let blas = fourbit_forge::device::cublas::cublas_available();
    if let Err(e) = &blas {
        println!("cuBLAS unavailable ({e}): its columns and the dequant+cuBLAS path are skipped");
    }
    let hopper = dev.is_hopper();
    let bw = copy_bandwidth(&dev)?;
    println!("device-to-device copy: {:.0} GB/s (read + written); SMs: {}", bw / 1e9, dev.sm_count()?);
    let mut rows = Vec::new();
    // `W4A16_BENCH_ONLY=NxK:M` times one case (for a profiler).
    let only: Option<(usize, usize, usize)> = std::env::var("W4A16_BENCH_ONLY").ok().and_then(|v| {
        let (nk, m) = v.split_once(':')?;
        let (n, k) = nk.split_once('x')?;
        Some((n.parse().ok()?, k.parse().ok()?, m.parse().ok()?))
    });
    let shapes: Vec<(usize, usize)> = match only {
        Some((n, k, _)) => vec![(n, k)],
        None if quick => vec![SHAPES[0], SHAPES[1]],
        None => SHAPES.to_vec(),
    };
    for (si, &(n, k)) in shapes.iter().enumerate() {
        let packed = packed_layer(n, k, si as u64)?;
        let qbytes = packed.bytes();
        let copies = CYCLE_BYTES.div_ceil(qbytes).max(2);
        let weights: Vec<DevicePackedWeight> =
            (0..copies).map(|_| DevicePackedWeight::upload(&dev, &packed)).collect::<Result<_>>()?;
        // cuBLAS's weight: the kernel's own dequantization, in as many copies.
        let dense = if blas.is_ok() { dense_copies(&dev, &weights[0])? } else { Vec::new() };
        // `W4A16_BENCH_MS=1024,4096` times only those row counts.
        let listed: Option<Vec<usize>> =
            std::env::var("W4A16_BENCH_MS").ok().map(|v| v.split(',').filter_map(|m| m.trim().parse().ok()).collect());
        let ms: Vec<usize> = match (only, listed) {
            (Some((_, _, m)), _) => vec![m],
            (None, Some(ms)) => ms,
            (None, None) if quick => vec![1, 16, 64, 1024],
            (None, None) => MS.to_vec(),
        };
        for &m in &ms {
            let (x, mut y) = bench_xy(&dev, m, k, n)?;
            let mut ws = W4a16Workspace::default();
            let flops = 2.0 * m as f64 * n as f64 * k as f64;
            let bytes = (qbytes + 2 * m * k + 2 * m * n) as f64;
            // The copy's rate counts each byte read and written: HBM moves `bw` bytes/s in
            // all, so a kernel that reads its weight once needs `bytes / bw` (cuBLAS at M = 1
            // reads its bf16 weight at about that rate).
            let floor = bytes / bw;
            let reps = copies.max(24);
            let mut run = |opts: W4a16Options| -> Result<(f64, W4a16Plan)> {
                let mut plan = None;
                let t = time_graph(&dev, reps, |i| {
                    plan =
                        Some(w4a16_matmul(&dev, &x, m, &weights[i % copies], &mut y, ActDtype::Bf16, &opts, &mut ws)?);
                    Ok(())
                })?;
                Ok((t, plan.ok_or_else(|| ForgeError::Internal("no launch".into()))?))
            };
            let (t_auto, plan) = run(W4a16Options::default())?;
            let (t_fused, fplan) = if plan.path == MatmulPath::Fused {
                (t_auto, plan)
            } else {
                run(W4a16Options { path: MatmulPath::Fused, ..Default::default() })?
            };
            // In the same run: the baseline (sm_80) kernel where the Hopper one runs, and the
            // Hopper one where the plan picks another fused kernel (on a Hopper device).
            let t_sm80 = if fplan.kernel.in_hopper_module() {
                Some(run(W4a16Options {
                    path: MatmulPath::Fused,
                    hopper_min_m: usize::MAX,
                    hopper_skinny: false,
                    ..Default::default()
                })?)
            } else {
                None
            };
            let t_hopper = if hopper && !matches!(fplan.kernel, FusedKernel::Wgmma { .. }) && m <= 256 {
                Some(run(W4a16Options {
                    path: MatmulPath::Fused,
                    hopper_min_m: 1,
                    hopper_min_weights: 0,
                    ..Default::default()
                })?)
            } else {
                None
            };
            // The same launches overlapping each other (programmatic dependent launch): a chain
            // of layers, each waiting for the one before to finish before it reads X.
            let t_overlap = if plan.kernel.in_hopper_module() && plan.path == MatmulPath::Fused {
                Some(run(W4a16Options { overlap_prior_kernel: true, ..Default::default() })?.0)
            } else {
                None
            };
            // The same plan with the global split-K where it takes clusters.
            let t_global = if plan.cluster > 1 && plan.path == MatmulPath::Fused {
                Some(run(W4a16Options { cluster_split_k: false, ..Default::default() })?.0)
            } else {
                None
            };
            // Blocks of 8 warps where the plan takes 16.
            let t_narrow = if matches!(plan.kernel, FusedKernel::SkinnySm90 { warps: 16, .. }) {
                Some(run(W4a16Options { wide_skinny_blocks: Some(false), ..Default::default() })?)
            } else {
                None
            };
            // A 1–16-row launch with the 12-warp blocks toggled: on where the plan runs another
            // kernel, off where it runs them; plain and overlapped.
            let t_deep =
                if matches!(plan.kernel, FusedKernel::SkinnySm90 { tf: 1 | 2, .. }) && plan.path == MatmulPath::Fused {
                    let on = !matches!(plan.kernel, FusedKernel::SkinnySm90 { warps: 12, .. });
                    let opts = W4a16Options { deep_skinny_blocks: Some(on), ..Default::default() };
                    let (t, p) = run(opts)?;
                    let (t_over, _) = run(W4a16Options { overlap_prior_kernel: true, ..opts })?;
                    Some((t, t_over, p))
                } else {
                    None
                };
            if sweep && !matches!(fplan.kernel, FusedKernel::Tiled { .. }) && matches!(m, 1 | 16 | 64) {
                // Each split count with clusters where the plan takes them ("c"), then with
                // the global split-K.
                let mut line = format!("splits sweep {n}×{k} M {m} (auto {}):", fplan.splits);
                for sp in [1u32, 2, 3, 4, 6, 7, 8, 12, 16, 24, 32] {
                    let opts = W4a16Options { path: MatmulPath::Fused, splits: Some(sp), ..Default::default() };
                    let (t, p) = run(opts)?;
                    let c = if p.cluster > 1 { "c" } else { "" };
                    line += &format!(" s{}{c}={:.2}", p.splits, t * 1e6);
                    if p.cluster > 1 {
                        let (t, _) = run(W4a16Options { cluster_split_k: false, ..opts })?;
                        line += &format!("/{:.2}", t * 1e6);
                    }
                }
                println!("{line}");
                if t_deep.is_some() && m == 1 {
                    // The same for the 12-warp blocks.
                    let mut line = format!("12-warp splits sweep {n}×{k} M {m}:");
                    for sp in [1u32, 2, 3, 4, 6, 8] {
                        let opts = W4a16Options {
                            path: MatmulPath::Fused,
                            splits: Some(sp),
                            deep_skinny_blocks: Some(true),
                            ..Default::default()
                        };
                        let (t, p) = run(opts)?;
                        let c = if p.cluster > 1 { "c" } else { "" };
                        line += &format!(" s{}{c}={:.2}", p.splits, t * 1e6);
                    }
                    println!("{line}");
                }
            }
            if std::env::var_os("W4A16_BENCH_CHUNKS").is_some() && plan.path == MatmulPath::DequantGemm {
                // Dequantization + cuBLAS in column chunks of each size (MB of dense weight).
                let mut line = format!("gemm chunks {n}×{k} M {m}: whole={:.2}", t_auto * 1e6);
                for mb in [4usize, 8, 12, 16, 24, 32, 48] {
                    let (t, _) = run(W4a16Options { gemm_chunk_bytes: mb << 20, ..Default::default() })?;
                    line += &format!(" {mb}MB={:.2}", t * 1e6);
                }
                println!("{line}");
            }
            let t_blas = if blas.is_ok() { Some(time_blas(&dev, &x, &dense, &mut y, (m, n, k))?) } else { None };
            let us = |t: f64| format!("{:.2}", t * 1e6);
            let plan_s = |p: &W4a16Plan| match (p.path, p.kernel) {
                (MatmulPath::DequantGemm, _) => "dequant+cuBLAS".to_string(),
                (_, FusedKernel::Skinny { tf }) => format!("skinny t{tf} s{} b{}/{}", p.splits, p.blocks, p.resident),
                (_, FusedKernel::SkinnyW8 { tf }) => {
                    format!("skinny w8 t{tf} s{} b{}/{}", p.splits, p.blocks, p.resident)
                }
                (_, FusedKernel::Tiled { mb }) => format!("tiled mb{mb} s{} b{}/{}", p.splits, p.blocks, p.resident),
                (_, FusedKernel::Wgmma { tf }) => format!("wgmma t{tf} s{} b{}/{}", p.splits, p.blocks, p.resident),
                (_, FusedKernel::SkinnySm90 { tf, warps, x_l1 }) => {
                    let c = if p.cluster > 1 { " cluster" } else { "" };
                    let w = if warps == 16 {
                        " w16"
                    } else if warps == 12 {
                        " w12"
                    } else if x_l1 {
                        " l1"
                    } else {
                        ""
                    };
                    format!("skinny90 t{tf}{w} s{}{c} b{}/{}", p.splits, p.blocks, p.resident)
                }
            };
            rows.push(vec![
                format!("{n}×{k}"),
                m.to_string(),
                plan_s(&plan),
                us(t_auto),
                format!("{:.0}", bytes / t_auto / 1e9),
                format!("{:.1}", flops / t_auto / 1e12),
                if fplan.path == plan.path { "=".into() } else { format!("{} ({})", us(t_fused), plan_s(&fplan)) },
                t_sm80.map_or("=".into(), |(t, p)| format!("{} ({})", us(t), plan_s(&p))),
                t_hopper.map_or("–".into(), |(t, p)| format!("{} ({})", us(t), plan_s(&p))),
                t_blas.map_or("–".into(), us),
                t_blas.map_or("–".into(), |t| format!("{:.1}", flops / t / 1e12)),
                us(floor),
                t_blas.map_or("–".into(), |t| format!("{:.2}×", t / t_auto)),
                format!("{:.0}%", 100.0 * floor / t_auto),
                t_overlap.map_or("–".into(), us),
                match (t_overlap, t_blas) {
                    (Some(t), Some(b)) => format!("{:.2}×", b / t),
                    _ => "–".into(),
                },
                t_global.map_or("–".into(), us),
                t_narrow.map_or("–".into(), |(t, p)| format!("{} ({})", us(t), plan_s(&p))),
                t_deep.map_or("–".into(), |(t, t_over, p)| format!("{} / {} ({})", us(t), us(t_over), plan_s(&p))),
            ]);
        }
    }
    common::print_table(
        &format!(
            "W4A16 (bf16, 4-bit, gs {GS}, symmetric) on {}, copy {:.0} GB/s (µs: median per launch, graphs over > 200 MB of weights)",
            dev.name(),
            bw / 1e9
        ),
        &[
            "N×K",
            "M",
            "plan",
            "ours µs",
            "ours GB/s",
            "ours TFLOP/s",
            "fused-only µs",
            "sm_80 kernel µs",
            "wgmma kernel µs",
            "cuBLAS bf16 µs",
            "cuBLAS TFLOP/s",
            "HBM floor µs",
            "speed-up vs cuBLAS",
            "% of floor",
            "overlapped µs",
            "overlapped vs cuBLAS",
            "global split-K µs",
            "8-warp blocks µs",
            "12-warp blocks toggled µs / overlapped",
        ],
        &rows,
    );
    if only.is_none() && std::env::var("W4A16_BENCH_W8").map_or(true, |v| v != "skip") {
        bench_w8(&dev, bw)?;
    }
    if only.is_none() && std::env::var("W4A16_BENCH_MOE").map_or(true, |v| v != "skip") {
        bench_topk_parts(&dev, bw)?;
        bench_moe(&dev, bw)?;
    }
    Ok(())
}
