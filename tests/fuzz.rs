//! Issue 10's fuzz harness: proptest strategies driving the real entry points, every outcome
//! counted and printed (`cargo test --release --test fuzz -- --nocapture`).
//!
//! * `fuzz_layer_loader`: random, mutated and truncated safetensors files (and FIFOs,
//!   directories, devices) through `weights::load_layer`, and what loads through the CPU
//!   pipeline (pre-step, grid + solve, layer-output error).
//! * `fuzz_library_api`: adversarial calls to the CPU library API (shapes up to broadcast
//!   views of 2^40 elements, NaN/inf/huge/tiny values, corrupted grids and factors, bad
//!   settings, token counts at u64::MAX).
//! * `fuzz_cli`: the `quantize_layer` binary with random argument combinations (huge,
//!   negative, NaN, empty values; missing, odd and mutated files; odd output targets).
//!
//! A panic, an abort or signal, a hang past the time bound, a partial or changed-on-failure
//! output file, or an `Ok` holding a non-finite number fails the test. Bounded for CI: each
//! harness stops after its case count or `FORGE_FUZZ_SECS` seconds (default 10; the three
//! run in parallel, so the suite pays about 10 s), whichever comes first. `FORGE_FUZZ_SCALE=k` runs k times the cases (with `FORGE_FUZZ_SECS` raised to
//! match), `FORGE_FUZZ_SEED=n` replays a run (the seed is printed).

mod common;

use fourbit_forge::calib::{quantize_experts, ActivationView, ExpertInput, GptqLayer, SharedHessian};
use fourbit_forge::grid::build_quant_grid;
use fourbit_forge::hessian::{pre_step_cpu, PreStepConfig};
use fourbit_forge::quantize::widen;
use fourbit_forge::solver::{layer_output_error, round_to_nearest, solve_cpu};
use fourbit_forge::weights::{load_layer, LayerStats};
use fourbit_forge::{
    budget, Backend, ForgeError, GridConfig, MseSearch, Quantizer, ScaleDtype, ScaleSearch, ShrinkCandidates,
    WeightView,
};
use ndarray::Array2;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Bounds, seeds and the outcome table
// ---------------------------------------------------------------------------------------

fn scale() -> u32 {
    std::env::var("FORGE_FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).filter(|&k| k > 0).unwrap_or(1)
}

/// Wall-time cap of one harness.
fn time_cap() -> Duration {
    let default = 10 * u64::from(scale());
    Duration::from_secs(std::env::var("FORGE_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(default))
}

fn runner(name: &str, cases: u32) -> TestRunner {
    let seed: u64 = std::env::var("FORGE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let cases = cases * scale();
    eprintln!("[{name}] seed {seed} (FORGE_FUZZ_SEED={seed} replays it), up to {cases} cases in {:?}", time_cap());
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config =
        Config { cases, failure_persistence: None, max_shrink_iters: 64, max_shrink_time: 30_000, ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

/// Outcome counts of one harness.
struct Tally {
    name: &'static str,
    counts: Mutex<BTreeMap<String, usize>>,
    started: Instant,
}

impl Tally {
    fn new(name: &'static str) -> Self {
        Tally { name, counts: Mutex::new(BTreeMap::new()), started: Instant::now() }
    }

    fn add(&self, outcome: impl Into<String>) {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()).entry(outcome.into()).or_default() += 1;
    }

    fn out_of_time(&self) -> bool {
        self.started.elapsed() > time_cap()
    }

    fn count(&self, outcome: &str) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).get(outcome).copied().unwrap_or(0)
    }

    fn print(&self) {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        // Pipeline stages and indented detail lines are not separate inputs.
        let tried: usize = counts
            .iter()
            .filter(|(k, _)| !k.starts_with("pipeline") && !k.starts_with("  ") && !k.starts_with("("))
            .map(|(_, v)| v)
            .sum();
        eprintln!("\n[{}] {tried} inputs in {:.1} s", self.name, self.started.elapsed().as_secs_f64());
        for (k, v) in counts.iter() {
            eprintln!("  {k:<48} {v:>6}");
        }
    }
}

/// The outcome name of a library result.
fn kind(e: &ForgeError) -> String {
    let k = match e {
        ForgeError::Config(_) => "Config",
        ForgeError::GroupSize(_) => "GroupSize",
        ForgeError::Bits(_) => "Bits",
        ForgeError::Shape(_) => "Shape",
        ForgeError::NonFinite { .. } => "NonFinite",
        ForgeError::ScaleSearch(_) => "ScaleSearch",
        ForgeError::Dtype(_) => "Dtype",
        ForgeError::Io { .. } => "Io",
        ForgeError::NotRegularFile { .. } => "NotRegularFile",
        ForgeError::Format(_) => "Format",
        ForgeError::Safetensors(_) => "Safetensors",
        ForgeError::OutOfMemory { .. } => "OutOfMemory",
        ForgeError::Overflow(_) => "Overflow",
        ForgeError::Hessian(_) => "Hessian",
        ForgeError::Numeric(_) => "Numeric",
        ForgeError::Internal(_) => "Internal",
        _ => "other",
    };
    format!("error: {k}")
}

/// Runs `f`, turning a panic into an `Err` the harness fails on.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// Longest one case may take before it counts as a hang (generous for a loaded 2-core CI
/// machine: the inputs are small, most cases take milliseconds).
const CASE_LIMIT: Duration = Duration::from_secs(30);

/// Runs `f` on its own thread: a panic becomes `Err("panic: …")`, a call still running after
/// `limit` is reported as a hang at once (its thread is left behind, the test fails).
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(guarded(f));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(p)) => Err(format!("panic: {p}")),
        Err(_) => Err(format!("hang: still running after {limit:?}")),
    }
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

// ---------------------------------------------------------------------------------------
// The layer loader
// ---------------------------------------------------------------------------------------

const NAMES: [&str; 5] = ["weight", "x", "h", "w2", "inputs"];

#[derive(Clone, Debug)]
struct TensorSpec {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    fill: u8,
}

#[derive(Clone, Debug)]
enum Mutation {
    None,
    Truncate(Index),
    Flip(Vec<(Index, u8)>),
    HeaderLen(u64),
    Json { tensor: Index, field: Index, value: Index },
    JsonRoot(Index),
    Append(Vec<u8>),
    Raw(Vec<u8>),
}

#[derive(Clone, Debug)]
enum Special {
    None,
    Fifo,
    Dir,
    DevNull,
    Missing,
}

fn dtype() -> impl Strategy<Value = Dtype> {
    prop::sample::select(vec![
        Dtype::F32,
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F8_E4M3,
        Dtype::I32,
        Dtype::U8,
        Dtype::F64,
        Dtype::BOOL,
    ])
}

/// First byte of the fill pattern: mostly bytes that make moderate floats, sometimes
/// NaN/inf/huge/zero patterns.
fn fill() -> impl Strategy<Value = u8> {
    prop_oneof![4 => prop::sample::select(vec![0x3cu8, 0x3e, 0x40, 0xbe, 0x38]), 1 => any::<u8>()]
}

fn tensor() -> impl Strategy<Value = TensorSpec> {
    let dim = prop_oneof![6 => 1usize..48, 1 => Just(0usize), 1 => Just(64usize), 1 => Just(96usize)];
    (prop::sample::select(NAMES.to_vec()), dtype(), prop::collection::vec(dim, 0..4), fill())
        .prop_map(|(name, dtype, shape, fill)| TensorSpec { name, dtype, shape, fill })
}

/// A file shaped like a layer (weight + activations or Hessian, in random dtypes), plus
/// random extra tensors: most files are valid before mutation.
fn layer_file() -> impl Strategy<Value = (Vec<TensorSpec>, bool)> {
    let cols = prop_oneof![4 => 1usize..100, 1 => prop::sample::select(vec![32usize, 64, 96, 128])];
    let float = || prop_oneof![4 => Just(Dtype::F32), 1 => Just(Dtype::F16), 1 => Just(Dtype::BF16), 1 => Just(Dtype::F8_E4M3), 1 => dtype()];
    (
        1usize..40,
        cols,
        1usize..60,
        float(),
        float(),
        fill(),
        fill(),
        prop::collection::vec(tensor(), 0..3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(rows, cols, tokens, wd, xd, f1, f2, extra, hessian, batched)| {
            let mut t = vec![TensorSpec { name: "weight", dtype: wd, shape: vec![rows, cols], fill: f1 }];
            t.push(match (hessian, batched) {
                (true, _) => TensorSpec { name: "h", dtype: xd, shape: vec![cols, cols], fill: f2 },
                (false, false) => TensorSpec { name: "x", dtype: xd, shape: vec![tokens, cols], fill: f2 },
                (false, true) => TensorSpec { name: "x", dtype: xd, shape: vec![2, tokens, cols], fill: f2 },
            });
            t.extend(extra);
            (t, hessian)
        })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => Just(Mutation::None),
        2 => any::<Index>().prop_map(Mutation::Truncate),
        2 => prop::collection::vec((any::<Index>(), any::<u8>()), 1..8).prop_map(Mutation::Flip),
        1 => prop_oneof![Just(u64::MAX), Just(1u64 << 40), Just(100_000_001u64), any::<u64>(), 0u64..64]
            .prop_map(Mutation::HeaderLen),
        3 => (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(tensor, field, value)| Mutation::Json { tensor, field, value }),
        1 => any::<Index>().prop_map(Mutation::JsonRoot),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Mutation::Raw),
    ]
}

/// Values a header field is overwritten with.
fn json_values() -> Vec<serde_json::Value> {
    use serde_json::json;
    let deep = (0..200).fold(json!(1), |v, _| json!([v]));
    vec![
        json!(-1),
        json!(u64::MAX),
        json!(1e300),
        json!("F4"),
        json!("F8_E5M2"),
        json!("I64"),
        json!(null),
        json!([]),
        json!([u64::MAX, u64::MAX]),
        json!([4_294_967_295u64, 32]),
        json!([32, 2_147_483_647u64]),
        json!([200_000, 200_000]),
        json!([0, 9_223_372_036_854_775_807u64]),
        json!([1, 0]),
        json!({"a": 1}),
        json!("x".repeat(10_000)),
        deep,
    ]
}

/// A valid file of `tensors`, then `m` applied.
fn file_bytes(tensors: &[TensorSpec], m: &Mutation) -> Vec<u8> {
    let mut seen = std::collections::HashSet::new();
    let specs: Vec<&TensorSpec> = tensors.iter().filter(|t| seen.insert(t.name)).collect();
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|t| {
            let n: usize = t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
            // A fill byte pattern: 0x7f/0xff make NaN/inf in the float types.
            (0..n).map(|k| t.fill.wrapping_add((k % 7) as u8)).collect()
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = specs
        .iter()
        .zip(&data)
        .filter_map(|(t, d)| TensorView::new(t.dtype, t.shape.clone(), d).ok().map(|v| (t.name.to_string(), v)))
        .collect();
    let mut bytes = safetensors::serialize(views, None).unwrap_or_default();
    match m {
        Mutation::None => {}
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
        Mutation::Flip(flips) => {
            if !bytes.is_empty() {
                for (i, b) in flips {
                    let k = i.index(bytes.len());
                    bytes[k] ^= b | 1;
                }
            }
        }
        Mutation::HeaderLen(n) => {
            if bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&n.to_le_bytes());
            }
        }
        Mutation::Json { tensor, field, value } => {
            if bytes.len() >= 8 {
                let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8])) as usize;
                let (head, rest) = bytes[8..].split_at(n.min(bytes.len() - 8));
                if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(head) {
                    if let Some(obj) = v.as_object_mut() {
                        let keys: Vec<String> = obj.keys().cloned().collect();
                        if !keys.is_empty() {
                            let key = &keys[tensor.index(keys.len())];
                            let fields = ["dtype", "shape", "data_offsets", "extra"];
                            let values = json_values();
                            if let Some(t) = obj.get_mut(key).and_then(|t| t.as_object_mut()) {
                                t.insert(
                                    fields[field.index(fields.len())].into(),
                                    values[value.index(values.len())].clone(),
                                );
                            }
                        }
                    }
                    let new_head = serde_json::to_vec(&v).unwrap_or_default();
                    let rest = rest.to_vec();
                    bytes = (new_head.len() as u64).to_le_bytes().to_vec();
                    bytes.extend(new_head);
                    bytes.extend(rest);
                }
            }
        }
        Mutation::JsonRoot(i) => {
            let values = json_values();
            let head = serde_json::to_vec(&values[i.index(values.len())]).unwrap_or_default();
            bytes = (head.len() as u64).to_le_bytes().to_vec();
            bytes.extend(head);
        }
        Mutation::Append(extra) => bytes.extend(extra),
        Mutation::Raw(raw) => bytes = raw.clone(),
    }
    bytes
}

#[cfg(unix)]
fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    let _ = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
}

#[cfg(not(unix))]
fn mkfifo(_: &Path) {}

/// Pushes a loaded layer through the CPU pipeline; every `Ok` must be finite.
fn pipeline(layer: &fourbit_forge::weights::LayerFile, tally: &Tally) -> Result<(), String> {
    let w = match widen(layer.weight.view()) {
        Ok(w) => w,
        Err(e) => {
            tally.add(format!("pipeline {}", kind(&e)));
            return Ok(());
        }
    };
    let mut w32 = w.clone();
    let pre = match pre_step_cpu(layer.hessian.view(), Some(&mut w32), &PreStepConfig::default()) {
        Ok(p) => p,
        Err(e) => {
            tally.add(format!("pipeline {}", kind(&e)));
            return Ok(());
        }
    };
    let q = Quantizer::new(GridConfig { group_size: 32, ..GridConfig::default() }, Backend::Cpu);
    match q.quantize_from_hinv(WeightView::F32(w32.view()), pre.hinv_factor.view(), pre.perm.as_deref()) {
        Ok((_, out)) => {
            check_solve(&out, 15)?;
            match layer_output_error(w.view(), out.dequant.view(), layer.hessian.view()) {
                Ok(e) if !e.is_finite() || e < 0.0 => return Err(format!("layer_output_error Ok({e})")),
                Ok(_) => tally.add(if out.warnings.is_empty() && pre.warnings.is_empty() {
                    "pipeline ok"
                } else {
                    "pipeline ok with warnings"
                }),
                Err(e) => tally.add(format!("pipeline score {}", kind(&e))),
            }
        }
        Err(e) => tally.add(format!("pipeline {}", kind(&e))),
    }
    Ok(())
}

fn check_solve(out: &fourbit_forge::solver::SolveOutput, maxq: u8) -> Result<(), String> {
    if let Some(l) = out.loss.iter().find(|l| !l.is_finite()) {
        return Err(format!("Ok with loss {l}"));
    }
    if let Some(v) = out.dequant.iter().find(|v| !v.is_finite()) {
        return Err(format!("Ok with dequant {v}"));
    }
    if let Some(c) = out.qweight.iter().find(|&&c| c > maxq) {
        return Err(format!("Ok with code {c} > maxq {maxq}"));
    }
    Ok(())
}

/// [`check_solve`] of a calibration layer's result (its dequantized weight computed from the
/// codes and the grid).
fn check_layer(q: &fourbit_forge::calib::QuantizedLayer, maxq: u8) -> Result<(), String> {
    let out = fourbit_forge::solver::SolveOutput {
        qweight: q.codes.clone(),
        dequant: q.dequant(),
        loss: q.loss.clone(),
        warnings: q.warnings.clone(),
    };
    check_solve(&out, maxq)
}

#[test]
fn fuzz_layer_loader() {
    budget::set_host_limit(Some(256 << 20));
    let dir = tempfile::tempdir().expect("tempdir");
    let tally = std::sync::Arc::new(Tally::new("layer loader"));
    let special = prop_oneof![
        20 => Just(Special::None),
        1 => Just(Special::Fifo),
        1 => Just(Special::Dir),
        1 => Just(Special::DevNull),
        1 => Just(Special::Missing),
    ];
    let name = prop_oneof![3 => Just(None), 1 => Just(Some("weight")), 1 => prop::sample::select(NAMES.to_vec()).prop_map(Some)];
    // Mostly the stats the file holds, sometimes any name in either role.
    let stats = prop_oneof![4 => Just(None), 1 => (any::<bool>(), prop::sample::select(NAMES.to_vec())).prop_map(Some)];
    let files = prop_oneof![3 => layer_file(), 1 => prop::collection::vec(tensor(), 0..5).prop_map(|t| (t, false))];
    let strategy = (files, mutation(), special, name, stats);
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let result = runner("layer loader", 3000).run(&strategy, |((tensors, hessian), m, special, weight_name, stats)| {
        let (acts, sname) = stats.unwrap_or((!hessian, if hessian { "h" } else { "x" }));
        if tally.out_of_time() {
            tally.add("(skipped: time cap)");
            return Ok(());
        }
        let k = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.path().join(format!("case{k}.safetensors"));
        match special {
            Special::None => std::fs::write(&path, file_bytes(&tensors, &m)).map_err(|e| fail(e.to_string()))?,
            Special::Fifo => mkfifo(&path),
            Special::Dir => std::fs::create_dir(&path).map_err(|e| fail(e.to_string()))?,
            Special::DevNull => {}
            Special::Missing => {}
        }
        let target = if matches!(special, Special::DevNull) { PathBuf::from("/dev/null") } else { path.clone() };
        let stats = if acts { LayerStats::Activations(sname) } else { LayerStats::Hessian(sname) };
        let t2 = tally.clone();
        bounded(CASE_LIMIT, move || -> Result<(), String> {
            match load_layer(&target, weight_name, stats) {
                Ok(layer) => {
                    let (rows, cols) = layer.weight.view().dim();
                    if rows == 0 || cols == 0 || layer.hessian.dim() != (cols, cols) {
                        return Err(format!("loaded {rows}×{cols} with H {:?}", layer.hessian.dim()));
                    }
                    t2.add("ok");
                    pipeline(&layer, &t2)
                }
                Err(e) => {
                    t2.add(kind(&e));
                    Ok(())
                }
            }
        })
        .and_then(|r| r)
        .map_err(|e| {
            tally.add(if e.starts_with("hang") { "HANG" } else { "PANIC/VIOLATION" });
            fail(e)
        })?;
        if path.is_dir() {
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    });
    tally.print();
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(tally.count("ok") > 0, "no valid file in the sample: the strategy is broken");
}

// ---------------------------------------------------------------------------------------
// The library API
// ---------------------------------------------------------------------------------------

/// Interesting f32 values.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -3.0f32..3.0,
        1 => prop::sample::select(vec![
            0.0, -0.0, 1e-40, -1e-40, 1e-14, 1e-30, 1e20, -1e30, 3.3e38, f32::MAX, f32::MIN,
            f32::NAN, f32::INFINITY, f32::NEG_INFINITY,
        ]),
    ]
}

fn small_dim() -> impl Strategy<Value = usize> {
    prop_oneof![6 => 1usize..80, 1 => prop::sample::select(vec![0usize, 31, 32, 33, 127, 128, 129])]
}

fn huge_dim() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![u32::MAX as usize, (1 << 31) - 1, 1 << 31, 1 << 40, usize::MAX / 2, usize::MAX])
}

#[derive(Clone, Debug)]
enum HKind {
    Spd,
    Zero,
    NegDef,
    Indefinite(f32),
    Asym(f32),
    Poison(Index, f32),
    Dead(Index),
    Scaled(f32),
}

fn hkind() -> impl Strategy<Value = HKind> {
    prop_oneof![
        4 => Just(HKind::Spd),
        1 => Just(HKind::Zero),
        1 => Just(HKind::NegDef),
        1 => prop::sample::select(vec![0.5f32, 3.0, 30.0, 1e30]).prop_map(HKind::Indefinite),
        1 => prop::sample::select(vec![1e-7f32, 1e-3, 0.5, 10.0]).prop_map(HKind::Asym),
        1 => (any::<Index>(), value()).prop_map(|(i, v)| HKind::Poison(i, v)),
        1 => any::<Index>().prop_map(HKind::Dead),
        1 => prop::sample::select(vec![1e-38f32, 1e-20, 1e20, 1e38]).prop_map(HKind::Scaled),
    ]
}

fn make_h(n: usize, k: &HKind, seed: u64) -> Array2<f32> {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let x = common::randn(2 * n.max(1), n, &mut rng);
    let spd = x.t().dot(&x) / (n.max(1) as f32);
    match k {
        HKind::Spd => spd,
        HKind::Zero => Array2::zeros((n, n)),
        HKind::NegDef => -spd,
        HKind::Indefinite(c) => {
            let mut h = Array2::eye(n);
            if n > 1 {
                h[[0, 1]] = *c;
                h[[1, 0]] = *c;
            }
            h
        }
        HKind::Asym(a) => {
            let mut h = spd;
            if n > 1 {
                h[[n - 1, 0]] += a * h[[0, 0]];
            }
            h
        }
        HKind::Poison(i, v) => {
            let mut h = spd;
            if n > 0 {
                let k = i.index(n * n);
                h[[k / n, k % n]] = *v;
            }
            h
        }
        HKind::Dead(i) => {
            let mut h = spd;
            if n > 0 {
                let j = i.index(n);
                h.row_mut(j).fill(0.0);
                h.column_mut(j).fill(0.0);
            }
            h
        }
        HKind::Scaled(s) => spd.mapv(|v| v * s),
    }
}

/// One calibration batch of a layer call: tokens, column offset from the layer's, a poison.
type Batch = (usize, i8, Option<(Index, f32)>);

#[derive(Clone, Debug)]
enum Call {
    Grid {
        rows: usize,
        cols: usize,
        gs: usize,
        bits: u32,
        sym: bool,
        mse: Option<(f32, usize, f32)>,
        poison: (Index, f32),
        dtype: u8,
        scale: ScaleDtype,
    },
    GridHuge {
        rows: usize,
        cols: usize,
        gs: usize,
    },
    PreStep {
        n: usize,
        h: HKind,
        rel_damp: f32,
        act_order: bool,
        allow: bool,
        wcols: usize,
    },
    Solve {
        rows: usize,
        cols: usize,
        scale: f32,
        corrupt: (u8, Index, u8),
        u: u8,
        perm: u8,
        maxq: u32,
    },
    Error {
        rows: usize,
        cols: usize,
        h: HKind,
        q: u8,
    },
    Layer {
        rows: usize,
        cols: usize,
        batches: Vec<Batch>,
        tokens: Option<u64>,
        rel_damp: f32,
        act_order: bool,
    },
    Views {
        r: usize,
        len: usize,
        row: usize,
        group: usize,
        t0: usize,
        t1: usize,
    },
    Huge {
        which: u8,
        rows: usize,
        cols: usize,
    },
}

fn call() -> impl Strategy<Value = Call> {
    let bits = prop_oneof![6 => 2u32..=8, 1 => prop::sample::select(vec![0u32, 1, 9, 32, u32::MAX])];
    let gs = || {
        prop_oneof![
            6 => prop::sample::select(vec![32usize, 64, 128]),
            1 => prop::sample::select(vec![0usize, 16, 48, 1024, 1056, usize::MAX]),
        ]
    };
    let damp = || {
        prop_oneof![
            6 => prop::sample::select(vec![0.0f32, 0.01, 0.1]),
            1 => prop::sample::select(vec![-1.0f32, f32::NAN, f32::INFINITY, 1e38]),
        ]
    };
    let mse = prop::option::of((
        prop::sample::select(vec![2.0f32, 2.4, 0.5, 0.0, -1.0, f32::NAN]),
        prop::sample::select(vec![1usize, 10, 100, 0, 1025]),
        prop::sample::select(vec![0.2f32, 1.0, 0.0, 1.5, f32::NAN]),
    ));
    prop_oneof![
        3 => (small_dim(), small_dim(), gs(), bits, any::<bool>(), mse, (any::<Index>(), value()), 0u8..4,
              prop::sample::select(vec![ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16]))
            .prop_map(|(rows, cols, gs, bits, sym, mse, poison, dtype, scale)| Call::Grid { rows, cols, gs, bits, sym, mse, poison, dtype, scale }),
        1 => (huge_dim(), prop_oneof![Just(32usize), huge_dim()], gs()).prop_map(|(rows, cols, gs)| Call::GridHuge { rows, cols, gs }),
        3 => (small_dim(), hkind(), damp(), any::<bool>(), any::<bool>(), prop_oneof![4 => Just(0usize), 1 => small_dim()])
            .prop_map(|(n, h, rel_damp, act_order, allow, wcols)| Call::PreStep { n, h, rel_damp, act_order, allow, wcols }),
        3 => (small_dim(), small_dim(), prop::sample::select(vec![1.0f32, 1e-14, 1e20, 1e30, 3e38]), (0u8..10, any::<Index>(), any::<u8>()), 0u8..8, 0u8..6, prop::sample::select(vec![15u32, 3, 255, 0, 16, 7]))
            .prop_map(|(rows, cols, scale, corrupt, u, perm, maxq)| Call::Solve { rows, cols, scale, corrupt, u, perm, maxq }),
        2 => (small_dim(), small_dim(), hkind(), 0u8..4).prop_map(|(rows, cols, h, q)| Call::Error { rows, cols, h, q }),
        2 => (small_dim(), small_dim(), prop::collection::vec((0usize..40, -1i8..=1, prop::option::of((any::<Index>(), value()))), 0..4),
              prop::option::of(prop::sample::select(vec![0u64, 1, u64::MAX, u64::MAX - 1])), damp(), any::<bool>())
            .prop_map(|(rows, cols, batches, tokens, rel_damp, act_order)| Call::Layer { rows, cols, batches, tokens, rel_damp, act_order }),
        1 => (0usize..10, 0usize..100, 0usize..10, 0usize..10, 0usize..20, 0usize..20)
            .prop_map(|(r, len, row, group, t0, t1)| Call::Views { r, len, row, group, t0, t1 }),
        1 => (
            0u8..6,
            prop_oneof![1 => prop::sample::select(vec![1usize, 1000]), 2 => huge_dim()],
            // Every column count here is past the 256 MiB budget for every call below, so
            // each case is an O(1) refusal (smaller ones would be legitimate minutes of work).
            prop::sample::select(vec![60_000usize, 200_000, (1 << 31) - 1, u32::MAX as usize]),
        )
            .prop_map(|(which, rows, cols)| Call::Huge { which, rows, cols }),
    ]
}

fn weight(rows: usize, cols: usize, seed: u64, scale: f32) -> Array2<f32> {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    common::randn(rows, cols, &mut rng).mapv(|v| v.clamp(-3.0, 3.0) * (scale / 3.0))
}

/// Runs one call; `Ok(outcome)` or `Err(violation)`.
fn run_call(c: &Call) -> Result<String, String> {
    let label = |r: Result<bool, ForgeError>| match r {
        Ok(false) => "ok".to_string(),
        Ok(true) => "ok with warnings".to_string(),
        Err(e) => kind(&e),
    };
    let one = Array2::<f32>::from_elem((1, 1), 1.0);
    Ok(match c {
        Call::Grid { rows, cols, gs, bits, sym, mse, poison, dtype, scale } => {
            let mut w = weight(*rows, *cols, 1, 2.0);
            if rows * cols > 0 {
                let k = poison.0.index(rows * cols);
                w[[k / cols, k % cols]] = poison.1;
            }
            let scale_search = match mse {
                None => ScaleSearch::Absmax,
                Some((norm, n_grid, max_shrink)) => ScaleSearch::Mse(MseSearch {
                    candidates: ShrinkCandidates::Linspace { max_shrink: *max_shrink, n_grid: *n_grid },
                    norm: *norm,
                }),
            };
            let config =
                GridConfig { group_size: *gs, bits: *bits, symmetric: *sym, scale_search, scale_dtype: *scale };
            let h16 = w.mapv(half::f16::from_f32);
            let b16 = w.mapv(half::bf16::from_f32);
            let f8 = w.mapv(|v| (v.abs().min(448.0) as u8) & 0x7e);
            let view = match dtype {
                0 => WeightView::F32(w.view()),
                1 => WeightView::F16(h16.view()),
                2 => WeightView::BF16(b16.view()),
                _ => WeightView::Fp8E4M3(f8.view()),
            };
            match build_quant_grid(view, &config) {
                Ok(g) => {
                    if g.dim() != (*rows, cols.div_ceil(*gs)) {
                        return Err(format!("grid dims {:?}", g.dim()));
                    }
                    g.check_records().map_err(|e| format!("builder made bad records: {e}"))?;
                    "ok".into()
                }
                Err(e) => kind(&e),
            }
        }
        Call::GridHuge { rows, cols, gs } => match one.broadcast((*rows, *cols)) {
            Some(v) => label(
                build_quant_grid(WeightView::F32(v), &GridConfig { group_size: *gs, ..GridConfig::default() })
                    .map(|_| false),
            ),
            None => "not viewable".into(),
        },
        Call::PreStep { n, h, rel_damp, act_order, allow, wcols } => {
            let hm = make_h(*n, h, 2);
            let mut w = Array2::<f32>::ones((2, if *wcols == 0 { *n } else { *wcols }));
            let w0 = w.clone();
            let cfg = PreStepConfig { rel_damp: *rel_damp, act_order: *act_order, allow_indefinite: *allow };
            match pre_step_cpu(hm.view(), Some(&mut w), &cfg) {
                Ok(p) => {
                    if p.hinv_factor.iter().any(|v| !v.is_finite()) || (0..*n).any(|t| p.hinv_factor[[t, t]] <= 0.0) {
                        return Err("pre-step Ok with a bad factor".into());
                    }
                    if (p.retries > 0 || p.fallback_identity) && p.warnings.is_empty() {
                        return Err("retries without a warning".into());
                    }
                    label(Ok(!p.warnings.is_empty()))
                }
                Err(e) => {
                    if w != w0 {
                        return Err(format!("failed pre-step changed the weight ({e})"));
                    }
                    kind(&e)
                }
            }
        }
        Call::Solve { rows, cols, scale, corrupt, u, perm, maxq } => {
            let (u, perm) = (u.saturating_sub(3), perm.saturating_sub(2));
            let w = weight(*rows, *cols, 3, *scale);
            let mut grid = match build_quant_grid(
                WeightView::F32(w.view()),
                &GridConfig { group_size: 32, ..GridConfig::default() },
            ) {
                Ok(g) => g,
                Err(e) => return Ok(format!("grid {}", kind(&e))),
            };
            let (what, at, byte) = corrupt;
            let n = grid.qmeta.len();
            match what {
                0 => grid.maxq = *maxq,
                1 if n > 0 => {
                    let k = at.index(n);
                    if let Some(b) = grid.qmeta.iter_mut().nth(k) {
                        *b = *byte;
                    }
                }
                2 => grid.pad += 1,
                3 => grid.group_size = 48,
                _ => {}
            }
            let um = match u {
                0 => Array2::eye(*cols),
                1 => Array2::zeros((*cols, *cols)),
                2 => -Array2::<f32>::eye(*cols),
                3 => Array2::from_elem((*cols, *cols), 1e-30),
                _ => Array2::eye(cols + 1),
            };
            let p: Option<Vec<usize>> = match perm {
                0 => None,
                1 => Some((0..*cols).rev().collect()),
                2 => Some(vec![0; *cols]),
                _ => Some((0..cols + 1).collect()),
            };
            match solve_cpu(w.view(), um.view(), &grid, p.as_deref()) {
                Ok(out) => {
                    check_solve(&out, grid.maxq.min(255) as u8)?;
                    let _ = round_to_nearest(w.view(), &grid);
                    label(Ok(!out.warnings.is_empty()))
                }
                Err(e) => kind(&e),
            }
        }
        Call::Error { rows, cols, h, q } => {
            let w = weight(*rows, *cols, 4, 1.0);
            let qm = match q {
                0 => w.clone(),
                1 => w.mapv(|v| v + 0.1),
                2 => Array2::zeros(w.dim()),
                _ => Array2::zeros((*rows, cols + 1)),
            };
            let hm = make_h(*cols, h, 5);
            match layer_output_error(w.view(), qm.view(), hm.view()) {
                Ok(e) if !e.is_finite() || e < 0.0 => return Err(format!("layer_output_error Ok({e})")),
                Ok(_) => "ok".into(),
                Err(e) => kind(&e),
            }
        }
        Call::Layer { rows, cols, batches, tokens, rel_damp, act_order } => {
            let w = weight(*rows, *cols, 6, 1.0);
            let config = GridConfig { group_size: 32, ..GridConfig::default() };
            let r: Result<bool, ForgeError> = (|| {
                let mut layer = GptqLayer::new(WeightView::F32(w.view()), config.clone(), Backend::Cpu)?;
                let mut shared = match tokens {
                    Some(t) => Some(SharedHessian::from_host(make_h(*cols, &HKind::Spd, 7).view(), *t, &Backend::Cpu)?),
                    None => None,
                };
                for (m, delta, poison) in batches {
                    let c = (*cols as isize + *delta as isize).max(0) as usize;
                    let mut x = weight(*m, c, 8, 1.0);
                    if let Some((i, v)) = poison {
                        if m * c > 0 {
                            let k = i.index(m * c);
                            x[[k / c, k % c]] = *v;
                        }
                    }
                    let before = layer.tokens();
                    if layer.update(ActivationView::F32(x.view())).is_err() && layer.tokens() != before {
                        return Err(ForgeError::Internal("a failed update changed the token count".into()));
                    }
                    if let Some(s) = shared.as_mut() {
                        let (tb, hb) = (s.tokens(), s.to_host()?);
                        if s.update(ActivationView::F32(x.view())).is_err() && (s.tokens() != tb || s.to_host()? != hb)
                        {
                            return Err(ForgeError::Internal("a failed shared update changed H".into()));
                        }
                    }
                }
                let cfg = PreStepConfig { rel_damp: *rel_damp, act_order: *act_order, ..PreStepConfig::default() };
                layer.quantization_pre_step(&cfg)?;
                let q = layer.quantize()?;
                check_layer(&q, 15).map_err(ForgeError::Internal)?;
                if let Some(s) = shared {
                    let e = quantize_experts(
                        &Backend::Cpu,
                        &config,
                        &cfg,
                        &[ExpertInput::single(WeightView::F32(w.view()), Some(s.to_host()?.view()))],
                    )?;
                    check_layer(&e[0][0], 15).map_err(ForgeError::Internal)?;
                }
                Ok(!q.warnings.is_empty())
            })();
            if let Err(ForgeError::Internal(m)) = &r {
                return Err(m.clone());
            }
            label(r)
        }
        Call::Views { r, len, row, group, t0, t1 } => {
            let w = weight(4, 64, 9, 1.0);
            let mut buf = vec![0f32; *len];
            let a = WeightView::F32(w.view()).read_row_f32(*r, &mut buf);
            let g =
                build_quant_grid(WeightView::F32(w.view()), &GridConfig { group_size: 32, ..GridConfig::default() })
                    .map_err(|e| e.to_string())?;
            let b = g.meta(*row, *group);
            let x = Array2::<f32>::ones((10, 8));
            let c = ActivationView::F32(x.view()).rows(*t0, *t1);
            format!("views {}/{}/{}", a.is_ok(), b.is_ok(), c.is_ok())
        }
        Call::Huge { which, rows, cols } => {
            let (Some(w), Some(u)) = (one.broadcast((*rows, *cols)), one.broadcast((*cols, *cols))) else {
                return Ok("not viewable".into());
            };
            let grid = build_quant_grid(
                WeightView::F32(one.broadcast((1, 32)).ok_or("b")?),
                &GridConfig { group_size: 32, ..GridConfig::default() },
            )
            .map_err(|e| e.to_string())?;
            label(match which {
                0 => solve_cpu(w, u, &grid, None).map(|_| false),
                1 => pre_step_cpu(u, None, &PreStepConfig::default()).map(|_| false),
                2 => layer_output_error(w, w, u).map(|_| false),
                3 => GptqLayer::new(WeightView::F32(w), GridConfig::default(), Backend::Cpu).map(|_| false),
                4 => SharedHessian::new(*cols, &Backend::Cpu).map(|_| false),
                _ => SharedHessian::from_host(u, 1, &Backend::Cpu).map(|_| false),
            })
        }
    })
}

fn call_name(c: &Call) -> &'static str {
    match c {
        Call::Grid { .. } => "grid",
        Call::GridHuge { .. } => "grid (huge)",
        Call::PreStep { .. } => "pre-step",
        Call::Solve { .. } => "solve",
        Call::Error { .. } => "layer_output_error",
        Call::Layer { .. } => "GptqLayer/SharedHessian/experts",
        Call::Views { .. } => "views",
        Call::Huge { .. } => "huge shapes",
    }
}

#[test]
fn fuzz_library_api() {
    budget::set_host_limit(Some(256 << 20));
    let tally = Tally::new("library API (CPU)");
    let result = runner("library API", 2000).run(&call(), |c| {
        if tally.out_of_time() {
            tally.add("(skipped: time cap)");
            return Ok(());
        }
        let call = c.clone();
        let outcome = bounded(CASE_LIMIT, move || run_call(&call)).and_then(|r| r).map_err(|e| {
            tally.add(if e.starts_with("hang") { "HANG" } else { "PANIC/VIOLATION" });
            fail(format!("{}: {e}", call_name(&c)))
        })?;
        let outcome = if outcome.starts_with("views") { "views (typed results)".to_string() } else { outcome };
        tally.add(format!("{:<32} {outcome}", call_name(&c)));
        Ok(())
    });
    tally.print();
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------------------

fn pool(valid: std::ops::RangeInclusive<u32>, odd: &[&'static str]) -> BoxedStrategy<String> {
    let odd: Vec<String> = odd.iter().map(|s| s.to_string()).collect();
    prop_oneof![7 => valid.prop_map(|v| v.to_string()), 1 => prop::sample::select(odd)].boxed()
}

const HUGE: [&str; 12] = [
    "0",
    "-1",
    "1e9",
    "NaN",
    "",
    "abc",
    "1000000000",
    "2147483647",
    "4294967296",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
];

#[derive(Clone, Debug)]
struct CliCase {
    args: Vec<String>,
    out: Option<String>,
}

fn cli_case() -> impl Strategy<Value = CliCase> {
    let float = |valid: &'static [&'static str]| {
        let odd = vec!["NaN", "inf", "-inf", "-1", "", "1e39", "1e-45", "0"];
        prop_oneof![3 => prop::sample::select(valid.to_vec()), 1 => prop::sample::select(odd)]
    };
    let flag = |name: &'static str, value: BoxedStrategy<String>, p: f64| {
        prop::option::weighted(p, value).prop_map(move |v| v.map(|v| vec![format!("--{name}"), v]).unwrap_or_default())
    };
    let synthetic = (
        flag("rows", pool(1..=200, &HUGE), 0.95),
        flag("cols", pool(1..=300, &HUGE), 0.95),
        flag("tokens", pool(1..=1000, &HUGE), 0.7),
        flag(
            "seed",
            prop::sample::select(vec!["0", "7", "18446744073709551615", "-1", "x"]).prop_map(String::from).boxed(),
            0.2,
        ),
    )
        .prop_map(|(a, b, c, d)| [a, b, c, d].concat());
    let file = (
        prop::sample::select(vec![
            "layer.safetensors",
            "mutated.safetensors",
            "fifo",
            "subdir",
            "/dev/null",
            "missing.safetensors",
            "empty",
            "",
        ]),
        prop::option::of(prop::sample::select(vec!["weight", "x", "h", "missing", ""])),
        prop_oneof![
            Just(vec!["--activations", "x"]),
            Just(vec!["--hessian", "h"]),
            Just(vec!["--hessian", "neg"]),
            Just(vec!["--activations", "weight"]),
            Just(vec!["--activations", "missing"]),
            Just(vec![]),
            Just(vec!["--activations", "x", "--hessian", "h"]),
        ],
    )
        .prop_map(|(w, t, stats)| {
            let mut a = vec!["--weights".to_string(), w.to_string()];
            if let Some(t) = t {
                a.extend(["--tensor".to_string(), t.to_string()]);
            }
            a.extend(stats.into_iter().map(String::from));
            a
        });
    let common = (
        flag("bits", pool(2..=8, &["0", "1", "9", "-1", "4294967296", "NaN", ""]), 0.5),
        flag(
            "group-size",
            prop_oneof![
                4 => prop::sample::select(vec!["32", "64", "128", "1024"]),
                1 => prop::sample::select(vec!["0", "16", "48", "1056", "-32", "18446744073709551615"]),
            ]
            .prop_map(String::from)
            .boxed(),
            0.5,
        ),
        flag("damp", float(&["0.01", "0", "1", "1e30"]).prop_map(String::from).boxed(), 0.3),
        flag("norm", float(&["2", "2.4", "0.5"]).prop_map(String::from).boxed(), 0.15),
        flag("grid-points", pool(1..=200, &["0", "1024", "1025", "-1", "18446744073709551615"]), 0.15),
        flag("max-shrink", float(&["0.2", "1", "1.5"]).prop_map(String::from).boxed(), 0.15),
        prop::collection::vec(
            prop_oneof![
                20 => prop::sample::select(vec!["--asym", "--mse", "--act-order", "--allow-indefinite"]),
                1 => prop::sample::select(vec!["--bogus", "--help", "--cpu", "--rows"]),
            ],
            0..3,
        ),
        prop::option::weighted(
            0.7,
            prop_oneof![
                4 => prop::sample::select(vec!["out.safetensors", "existing.safetensors"]),
                1 => prop::sample::select(vec!["subdir", "missing/x.safetensors", "fifo_out", "", "/", ".forge-tmp.1.2.x"]),
            ],
        ),
    );
    (prop_oneof![3 => synthetic, 2 => file], common).prop_map(|(mode, (a, b, c, d, e, f, flags, out))| {
        let mut args = mode;
        for x in [a, b, c, d, e, f] {
            args.extend(x);
        }
        // --help prints and exits 0: rare enough to keep.
        args.extend(flags.into_iter().map(String::from));
        // The MSE settings need --mse; leave it out now and then to exercise that rule.
        let mse_settings = args.iter().any(|a| matches!(a.as_str(), "--norm" | "--grid-points" | "--max-shrink"));
        if mse_settings && !args.iter().any(|a| a == "--mse") && args.len() % 5 != 0 {
            args.push("--mse".into());
        }
        if let Some(o) = out {
            args.extend(["--out".to_string(), o.to_string()]);
        }
        CliCase { out: out_target(&args), args }
    })
}

/// The file a run would write.
fn out_target(args: &[String]) -> Option<String> {
    let k = args.iter().rposition(|a| a == "--out");
    Some(k.and_then(|k| args.get(k + 1).cloned()).unwrap_or_else(|| "quantized.safetensors".into()))
}

/// The files the CLI cases refer to.
fn cli_fixtures(d: &Path) {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(21);
    let w = common::randn(16, 64, &mut rng);
    let x = common::randn(100, 64, &mut rng);
    let h = x.t().dot(&x) / 100.0;
    let neg = -&h;
    let f32b = |a: &Array2<f32>| a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let (wb, xb, hb, nb) = (f32b(&w), f32b(&x), f32b(&h), f32b(&neg));
    let views = vec![
        ("weight", TensorView::new(Dtype::F32, vec![16, 64], &wb).expect("w")),
        ("x", TensorView::new(Dtype::F32, vec![100, 64], &xb).expect("x")),
        ("h", TensorView::new(Dtype::F32, vec![64, 64], &hb).expect("h")),
        ("neg", TensorView::new(Dtype::F32, vec![64, 64], &nb).expect("neg")),
    ];
    let bytes = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(d.join("layer.safetensors"), &bytes).expect("layer");
    let mut m = bytes.clone();
    m.truncate(bytes.len() - 17);
    std::fs::write(d.join("mutated.safetensors"), &m).expect("mutated");
    std::fs::write(d.join("empty"), b"").expect("empty");
    std::fs::write(d.join("existing.safetensors"), b"previous contents").expect("existing");
    let _ = std::fs::create_dir(d.join("subdir"));
    mkfifo(&d.join("fifo"));
    mkfifo(&d.join("fifo_out"));
}

fn snapshot(p: &Path) -> Option<Vec<u8>> {
    std::fs::symlink_metadata(p).ok().filter(|m| m.is_file()).and_then(|_| std::fs::read(p).ok())
}

#[test]
fn fuzz_cli() {
    let bin = common::example_binary("quantize_layer");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    cli_fixtures(&d);
    let tally = Tally::new("quantize_layer CLI");
    let per_run = Duration::from_secs(60);
    let result = runner("CLI", 300).run(&cli_case(), |case| {
        if tally.out_of_time() {
            tally.add("(skipped: time cap)");
            return Ok(());
        }
        cli_fixtures(&d);
        let target = case.out.as_ref().map(|o| d.join(o));
        let before = target.as_ref().and_then(|t| snapshot(t));
        let t = Instant::now();
        let mut child = Command::new(&bin)
            .current_dir(&d)
            .arg("--cpu")
            .args(&case.args)
            .env(budget::ENV_VAR, "512M")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(e.to_string()))?;
        let pid = child.id();
        // Drain the pipes on threads so a chatty child never blocks on a full pipe.
        let mut so = child.stdout.take().ok_or_else(|| fail("stdout".into()))?;
        let mut se = child.stderr.take().ok_or_else(|| fail("stderr".into()))?;
        let ho = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut so, &mut s);
            s
        });
        let he = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut se, &mut s);
            s
        });
        let status = loop {
            if let Some(s) = child.try_wait().map_err(|e| fail(e.to_string()))? {
                break s;
            }
            if t.elapsed() > per_run {
                let _ = child.kill();
                let _ = child.wait();
                tally.add("HANG");
                return Err(fail(format!("hang: {:?} ran past {per_run:?}", case.args)));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let (stdout, stderr) = (ho.join().unwrap_or_default(), he.join().unwrap_or_default());
        let shown = || format!("{:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", case.args);
        if stderr.contains("panicked") {
            tally.add("PANIC");
            return Err(fail(format!("panic: {}", shown())));
        }
        let outcome = match status.code() {
            Some(0) => "exit 0 (done, or --help)",
            Some(1) if !stderr.trim().is_empty() => "exit 1 (typed error, message)",
            Some(2) if !stderr.trim().is_empty() => "exit 2 (usage error, message)",
            Some(c) => {
                tally.add(format!("EXIT {c}"));
                return Err(fail(format!("exit {c} without a message or unexpected: {}", shown())));
            }
            None => {
                tally.add("SIGNAL/ABORT");
                return Err(fail(format!("killed by a signal ({status:?}): {}", shown())));
            }
        };
        tally.add(outcome);
        if std::env::var_os("FORGE_FUZZ_VERBOSE").is_some() && status.code() != Some(0) {
            let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            tally.add(format!("  {}", first.chars().take(70).collect::<String>()));
        }
        if status.code() == Some(0) && stderr.contains("warning:") {
            tally.add("  of which: warnings printed");
        }
        // Files: a temporary file of this run must be gone, the target whole or unchanged.
        let prefix = format!("{}{pid}.", fourbit_forge::fsio::TEMP_PREFIX);
        for e in std::fs::read_dir(&d).map_err(|e| fail(e.to_string()))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                tally.add("PARTIAL FILE");
                return Err(fail(format!("temporary file {:?} left behind: {}", e.file_name(), shown())));
            }
        }
        if let Some(t) = &target {
            let after = snapshot(t);
            if status.code() == Some(0) && !case.args.iter().any(|a| a == "--help") {
                let ok = after.as_deref().is_some_and(|b| {
                    safetensors::SafeTensors::deserialize(b).is_ok_and(|st| st.tensor("codes").is_ok())
                });
                if !ok {
                    tally.add("PARTIAL FILE");
                    return Err(fail(format!("exit 0 but {} is not a whole output file: {}", t.display(), shown())));
                }
            } else if after != before {
                tally.add("PARTIAL FILE");
                return Err(fail(format!("a failed run changed {}: {}", t.display(), shown())));
            }
        }
        Ok(())
    });
    tally.print();
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(tally.count("exit 0 (done, or --help)") > 0, "no successful run in the sample: the strategy is broken");
}
