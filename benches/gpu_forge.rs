//! `forge quantize` end to end on a GPU, through the library entry point
//! (`checkpoint::quantize_checkpoint`), data-free W4 g128 MSE (norm 2.4, 100 candidates),
//! compressed-tensors with bf16 scales:
//!
//! 1. a Llama-shaped BF16 checkpoint (hidden 4096, intermediate 14336, GQA 32/8, vocab
//!    32000; 12 layers ≈ 5.8 GB), and
//! 2. a DeepSeek-V3-shaped MoE with block-scaled FP8 weights (hidden 7168, MLA ranks 1536/512,
//!    128 heads, routed experts of 2048; 4 layers, the first dense, 24 experts ≈ 5.4 GB),
//!
//! generated deterministically with the library's demo generators (once; kept between runs
//! in `FORGE_BENCH_DIR`, default `target/tmp/forge-bench`: about 11 GB of input plus up to
//! 2 GB of output at a time, so the bench needs ~14 GB of free disk there; on a tmpfs that is
//! RAM). Generating them takes a few minutes the first time (the FP8 encoder is scalar).
//! Each input is read once to warm the page cache, a small model is quantized first so the
//! PTX module is loaded (the JIT is not timed), then one run per model is timed, wall clock,
//! with device-event timings of every job (`profile`). One table: input GB, seconds, GB/s of
//! input (and of the bf16 equivalent), GPU busy = Σ job kernel times / wall, copy-engine busy
//! = Σ (upload + download) / wall, peak host RSS of the run (VmHWM reset before it) against
//! the estimate and the budget, and the device engine's estimate against its budget. Then a
//! second table of the host stages on one 14336×4096 bf16 weight (staging copy, RTN on the
//! host (the CPU path), relative error only (the GPU path), packing, xxh3, write), the throughputs the run is bounded
//! by besides the device. Targets (H200): ≥ 2 GB/s of bf16 input, GPU busy ≥ 70 %.
//!
//! Run: `cargo bench --bench gpu_forge` (sizes: `FORGE_BENCH_LAYERS`, `FORGE_BENCH_MOE_LAYERS`,
//! `FORGE_BENCH_EXPERTS`; `FORGE_BENCH_ONLY=dense|moe`).

mod common;

use fourbit_forge::checkpoint::demo::{write_deepseek_demo, write_llama_demo, DeepSeekDemo, DemoRng, LlamaDemo};
use fourbit_forge::checkpoint::memory::human_bytes;
use fourbit_forge::checkpoint::plan::JobSettings;
use fourbit_forge::checkpoint::quant::{rtn_from_grid, RowSource};
use fourbit_forge::checkpoint::writer::{QuantizedLinear, WriterFormat};
use fourbit_forge::checkpoint::{build_plan, quantize_checkpoint, ModelDir, RunOptions, RunReport, Silent};
use fourbit_forge::numerics::ScaleDtype;
use fourbit_forge::{Backend, GridConfig, MseSearch, ScaleSearch, WeightView};
use safetensors::Dtype;
use std::io::Read as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bench_dir() -> PathBuf {
    std::env::var_os("FORGE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("forge-bench"))
}

/// Generates the model into `dir` unless a previous run finished the same one (a marker
/// holding the parameters is written last).
fn ensure_model(dir: &Path, params: &str, write: impl FnOnce(&Path) -> fourbit_forge::Result<()>) -> f64 {
    let marker = dir.join("forge-bench.txt");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == params) {
        return 0.0;
    }
    let _ = std::fs::remove_dir_all(dir);
    let t = Instant::now();
    write(dir).expect("generating the benchmark checkpoint");
    std::fs::write(&marker, params).expect("writing the marker");
    t.elapsed().as_secs_f64()
}

/// Reads every file of `dir` once (page cache warm-up); bytes read.
fn warm(dir: &Path) -> u64 {
    let mut buf = vec![0u8; 16 << 20];
    let mut total = 0u64;
    for e in std::fs::read_dir(dir).expect("model dir").flatten() {
        let Ok(mut f) = std::fs::File::open(e.path()) else { continue };
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    total
}

/// Resets the peak resident set (VmHWM) so the timed run's own peak is measured.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn settings() -> JobSettings {
    JobSettings {
        grid: GridConfig { scale_search: ScaleSearch::Mse(MseSearch::default()), ..GridConfig::default() },
        max_shard_size: 2_000_000_000,
        ..JobSettings::default()
    }
}

struct Row {
    name: String,
    input: u64,
    bf16_equivalent: u64,
    report: RunReport,
    rss_reset: bool,
    budget: u64,
    /// Bytes of the output directory.
    output: u64,
}

fn timed(dev: &std::sync::Arc<fourbit_forge::device::GpuDevice>, name: &str, model_dir: &Path, out: &Path) -> Row {
    let model = ModelDir::open(model_dir).expect("open");
    let plan = build_plan(&model, &settings()).expect("plan");
    let bf16_equivalent: u64 = model
        .tensors
        .values()
        .map(|t| if t.info.dtype == Dtype::F8_E4M3 { 2 * t.info.len as u64 } else { t.info.len as u64 })
        .sum();
    let _ = std::fs::remove_dir_all(out);
    let mut opts = RunOptions::new(out.to_path_buf(), Backend::Gpu(dev.clone()));
    opts.profile = true;
    let budget = opts.max_host_memory;
    let rss_reset = reset_peak_rss();
    let report = quantize_checkpoint(&model, &plan, &opts, &Silent).expect("quantize");
    let output =
        std::fs::read_dir(out).map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(out);
    Row { name: name.into(), input: plan.input_bytes(), bf16_equivalent, report, rss_reset, budget, output }
}

fn gbps(bytes: u64, s: f64) -> String {
    format!("{:.2}", bytes as f64 / s.max(1e-9) / 1e9)
}

/// Host stages on one `rows × cols` bf16 weight, GB/s of its bf16 bytes.
fn host_stages(dir: &Path) -> Vec<Vec<String>> {
    let (rows, cols) = (14336usize, 4096usize);
    let w = DemoRng::new(3).weight(rows, cols).mapv(half::bf16::from_f32);
    let bytes = (rows * cols * 2) as u64;
    let view = WeightView::BF16(w.view());
    let cfg = GridConfig { scale_dtype: ScaleDtype::BF16, ..GridConfig::default() };
    let grid = fourbit_forge::grid::build_quant_grid(view, &cfg).expect("grid");
    let mut out = Vec::new();
    let mut time = |name: &str, f: &mut dyn FnMut()| {
        f(); // warm
        let t = Instant::now();
        f();
        out.push(vec![name.to_string(), gbps(bytes, t.elapsed().as_secs_f64())]);
    };
    let src: &[u8] = bytemuck::cast_slice(w.as_slice().expect("contiguous"));
    let mut staging = vec![0u8; src.len()];
    time("staging copy (16 threads, 1 MiB chunks)", &mut || {
        use rayon::prelude::*;
        staging.par_chunks_mut(1 << 20).zip(src.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s));
    });
    let mut codes = None;
    time("host RTN against bf16 stored scales (codes + error)", &mut || {
        codes = Some(rtn_from_grid(&RowSource::View(view), grid.clone(), None).expect("rtn").codes);
    });
    let codes = codes.expect("codes");
    // The engine hands its codes over by value: the copies are made before the clock starts.
    let mut given = vec![codes.clone(), codes.clone()];
    time("relative error only (the engine's codes)", &mut || {
        let c = given.pop().expect("a copy per call");
        std::hint::black_box(rtn_from_grid(&RowSource::View(view), grid.clone(), Some(c)).expect("rtn"));
    });
    let format = WriterFormat::new("compressed-tensors", &cfg, None, false).expect("format");
    let mut encoded = Vec::new();
    time("encode (pack-quantized, scales)", &mut || {
        encoded = format
            .encode(QuantizedLinear { module: "m", grid: &grid, codes: codes.view(), packed: None })
            .expect("encode")
            .concat();
    });
    let packed = fourbit_forge::pack::PackedCodes {
        layout: fourbit_forge::pack::PackLayout::Rows,
        bits: cfg.bits,
        rows,
        cols,
        words: fourbit_forge::pack::pack_rows(codes.view(), cfg.bits).expect("pack"),
    };
    time("encode from device-packed words (the GPU data-free path)", &mut || {
        std::hint::black_box(
            format
                .encode(QuantizedLinear { module: "m", grid: &grid, codes: codes.view(), packed: Some(&packed) })
                .expect("encode"),
        );
    });
    time("xxh3 of the encoded output", &mut || {
        std::hint::black_box(xxhash_rust::xxh3::xxh3_64(&encoded));
    });
    let path = dir.join("write-test.bin");
    let f = std::fs::File::create(&path).expect("create");
    time("pwrite of the encoded output (page cache)", &mut || {
        f.write_all_at(&encoded, 0).expect("write");
    });
    drop(f);
    let _ = std::fs::remove_file(&path);
    out
}

/// GB/s at which 1 GiB written with pwrite reaches the disk (`fdatasync`): the rate a run's
/// durable output is bounded by.
fn disk_write_gbps(dir: &Path) -> f64 {
    let path = dir.join("disk-test.bin");
    let data = vec![0x5au8; 1 << 30];
    let f = std::fs::File::create(&path).expect("create");
    let t = Instant::now();
    for (i, c) in data.chunks(64 << 20).enumerate() {
        f.write_all_at(c, (i * (64 << 20)) as u64).expect("write");
    }
    f.sync_data().expect("sync");
    let s = t.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    data.len() as f64 / s / 1e9
}

fn main() {
    let Some(dev) = common::device_or_explain("gpu_forge") else { return };
    let base = bench_dir();
    std::fs::create_dir_all(&base).expect("bench dir");
    let only = std::env::var("FORGE_BENCH_ONLY").unwrap_or_default();
    println!("checkpoints in {} (FORGE_BENCH_DIR)", base.display());

    // PTX module load and engine creation, untimed.
    let small = base.join("warm-up");
    ensure_model(&small, "llama-default", |d| write_llama_demo(d, &LlamaDemo::default()));
    let _ = timed(&dev, "warm-up", &small, &base.join("warm-up-out"));

    let mut rows = Vec::new();
    if only.is_empty() || only == "dense" {
        let layers = env_usize("FORGE_BENCH_LAYERS", 12);
        let d = LlamaDemo {
            hidden: 4096,
            intermediate: 14336,
            layers,
            heads: 32,
            kv_heads: 8,
            vocab: 32000,
            dtype: Dtype::BF16,
            shard_bytes: 2_000_000_000,
            seed: 7,
        };
        let dir = base.join("llama");
        let gen = ensure_model(&dir, &format!("{d:?}"), |p| write_llama_demo(p, &d));
        if gen > 0.0 {
            println!("generated the Llama-shaped checkpoint in {gen:.0} s");
        }
        println!("page cache: read {}", human_bytes(warm(&dir)));
        rows.push(timed(&dev, &format!("Llama-shaped bf16, {layers} layers"), &dir, &base.join("llama-out")));
    }
    if only.is_empty() || only == "moe" {
        let layers = env_usize("FORGE_BENCH_MOE_LAYERS", 4);
        let experts = env_usize("FORGE_BENCH_EXPERTS", 24);
        let d = DeepSeekDemo {
            hidden: 7168,
            layers,
            first_dense: 1,
            heads: 128,
            q_lora: 1536,
            kv_lora: 512,
            rope: 64,
            nope: 128,
            v_dim: 128,
            intermediate: 18432,
            moe_intermediate: 2048,
            experts,
            shared: 1,
            vocab: 32000,
            shard_bytes: 2_000_000_000,
            seed: 8,
        };
        let dir = base.join("deepseek");
        let gen = ensure_model(&dir, &format!("{d:?}"), |p| write_deepseek_demo(p, &d));
        if gen > 0.0 {
            println!("generated the DeepSeek-shaped FP8 checkpoint in {gen:.0} s");
        }
        println!("page cache: read {}", human_bytes(warm(&dir)));
        rows.push(timed(
            &dev,
            &format!("DeepSeek-shaped FP8 MoE, {layers} layers, {experts} experts"),
            &dir,
            &base.join("deepseek-out"),
        ));
    }

    let disk = disk_write_gbps(&base);
    println!("\ndisk: 1 GiB pwrite + fdatasync at {disk:.2} GB/s (the run syncs its output at layer boundaries)");
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let s = r.report.seconds;
            let g = r.report.gpu.clone().unwrap_or_default();
            vec![
                r.name.clone(),
                format!("{:.2}", r.input as f64 / 1e9),
                format!("{s:.2}"),
                gbps(r.input, s),
                gbps(r.bf16_equivalent, s),
                format!("{:.0} %", 100.0 * g.kernel_ms / 1e3 / s),
                format!("{:.0} %", 100.0 * (g.upload_ms + g.download_ms) / 1e3 / s),
                format!(
                    "{}{}",
                    r.report.peak_rss.map_or("?".into(), human_bytes),
                    if r.rss_reset { "" } else { " (whole process)" }
                ),
                human_bytes(r.report.memory.host),
                human_bytes(r.budget),
                format!("{} / {}", human_bytes(g.estimate), human_bytes(g.budget)),
                g.jobs.to_string(),
            ]
        })
        .collect();
    common::print_table(
        &format!(
            "forge quantize, W4 g128 MSE (norm 2.4), compressed-tensors, {} (target: ≥ 2 GB/s bf16, GPU busy ≥ 70 %)",
            dev.name()
        ),
        &[
            "checkpoint",
            "input GB",
            "s",
            "GB/s input",
            "GB/s bf16-eq",
            "GPU busy",
            "copy busy",
            "peak RSS",
            "host estimate",
            "host budget",
            "device est. / budget",
            "jobs",
        ],
        &table,
    );
    let producer: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let g = r.report.gpu.clone().unwrap_or_default();
            let s = r.report.seconds;
            let pct = |ms: f64| format!("{:.2} s ({:.0} %)", ms / 1e3, 100.0 * ms / 1e3 / s);
            vec![
                r.name.clone(),
                pct(g.submit_ms),
                pct(g.collect_ms),
                pct(g.handover_ms),
                pct(g.kernel_ms),
                pct(g.upload_ms),
                pct(g.download_ms),
                format!(
                    "{:.2} GB: {:.2} s ({:.0} %)",
                    r.output as f64 / 1e9,
                    r.output as f64 / 1e9 / disk,
                    100.0 * r.output as f64 / 1e9 / disk / s
                ),
            ]
        })
        .collect();
    common::print_table(
        "where the wall time went (producer thread: submit = read into page-locked staging + enqueue, collect = wait for \
         the device + copy results out, hand-over = wait for the writer; device: Σ kernel, upload and download times)",
        &["checkpoint", "submit", "collect", "hand-over", "kernels", "uploads", "downloads", "output to disk at the disk's rate"],
        &producer,
    );
    common::print_table(
        "host stages on one 14336×4096 bf16 weight (GB/s of its bf16 bytes; one thread pool)",
        &["stage", "GB/s"],
        &host_stages(&base),
    );
}
