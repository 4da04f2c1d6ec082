//! The W4A16 kernel against the CPU reference (issue 15). GPU tests skip with the reason
//! when there is no GPU; the packing tests run everywhere.
//!
//! What is checked, and why the tolerances are what they are:
//! * packing: `unpack_for_kernel(pack_for_kernel(codes, grid))` gives back every code and
//!   record; bad input is a typed error.
//! * dequantization, bit for bit: the device's dense weight (the same `dequant_word` the
//!   matmul uses) equals `dequant_for_kernel`, which equals an independent evaluation with
//!   the `half` crate, for EVERY supported group size (multiples of 32 in 32..=1024), both
//!   types, records over the whole Q8.8 range (the fast table decode and its fallback).
//! * matmul, bit for bit: with integer activations, power-of-two scales and integer
//!   `q − z`, every partial sum is a multiple of `2^(e_min)` below `2^22` of it, so f32
//!   accumulation is exact in ANY order (tensor-core truncation included) and the device
//!   must return `round_T(exact)` exactly. Shapes with `n`/`k` tails, partial last groups,
//!   M in {1, 2, 7, 16, 33, 128, 257}, each fused kernel forced (the Hopper `wgmma` one, the
//!   skinny one in both builds, the tiled one), forced split-K factors, large (×2^40) and small
//!   (×2^-40) magnitudes, all codes 0 / all 15, zero activations.
//! * dequantization + cuBLAS in column chunks: exact inputs, bit for bit, chunks of 1–3
//!   tiles over `n` with tails.
//! * overlapping launches (programmatic dependent launch, Hopper): a two-layer chain whose
//!   second layer starts early must equal the serial chain bit for bit, with a NaN-filled
//!   intermediate buffer that exposes any early read.
//! * grouped (mixture-of-experts) launch: each row block equals the ungrouped launch of its
//!   rows bit for bit (same splits); random routings (empty experts, several row blocks per
//!   expert) exact against the reference; mismatched inputs are typed errors.
//! * device-built routing (offsets on the device): the task table equals the host's cut plus
//!   empty slots; the launch is exact on random routings, capacities and row bounds (also
//!   below an expert's rows); invalid offsets multiply nothing and report a typed error; the
//!   build and the launch replay in a CUDA graph with new offsets.
//! * top-k step (router ids on the device: route, gather, grouped launch, combine): the
//!   sorted rows equal the CPU route, the gathered `X`, the experts' outputs and the
//!   combined outputs equal the CPU step bit for bit (the combine is the same f32 fma chain
//!   in slot order, so no tolerance is needed), 1–1024 experts; a bad id writes nothing and
//!   is reported by token and slot; the whole step replays in a CUDA graph.
//! * matmul, realistic: heavy-tailed weights quantized on a real grid (absmax and MSE,
//!   symmetric and asymmetric; 4, 6 and 8 bits), Gaussian activations with outlier columns;
//!   against the f64 reference with the bound derived in [`tolerance`].
//! * 8-bit codes (5–8-bit grids, 8-bit tiles): packing round trips and bad input as above;
//!   the dequantization bit for bit for every group size; exactly summable cases (`|q − z| ≤
//!   255`, so smaller scales and activations keep every partial sum exact, see
//!   [`exact_case`]) bit for bit on every path, fixed shapes, adversarial magnitudes and
//!   codes, and a proptest up to 300 rows; every option set must reach the 8-bit kernel; the
//!   grouped launch of 8-bit experts exact on random routings (the grouped proptest draws 4-
//!   or 5–8-bit experts), and one launch of mixed widths refused.

mod common;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaSlice;
use fourbit_forge::device::GpuDevice;
use fourbit_forge::runtime::{
    dequant_for_kernel, dequant_gpu, expert_offsets, max_tasks, pack_for_kernel, round_to_act, unpack_for_kernel,
    w4a16_grouped_matmul, w4a16_grouped_matmul_cpu, w4a16_matmul, w4a16_matmul_cpu, w4a16_matmul_host, ActDtype,
    DeviceExperts, DevicePackedWeight, ExpertRouting, ExpertTasks, FusedKernel, MatmulPath, PackedWeight, TopkRouting,
    W4a16Options, W4a16Plan, W4a16Workspace,
};
use fourbit_forge::{ForgeError, GridConfig, MseSearch, QMetaPacked, QuantGrid, ScaleDtype, ScaleSearch, WeightView};
use ndarray::Array2;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal, StudentT};

const MS: [usize; 7] = [1, 2, 7, 16, 33, 128, 257];

/// A grid from explicit records `[n][n_groups]`.
fn grid_of(records: &[QMetaPacked], n: usize, k: usize, gs: usize, maxq: u32) -> QuantGrid {
    let n_groups = k.div_ceil(gs);
    let r: Vec<u32> = records.iter().map(|m| m.to_u32()).collect();
    QuantGrid::from_u32(&r, n, n_groups, maxq, n_groups * gs - k, gs, ScaleDtype::F32).unwrap()
}

/// Random 4-bit codes and records: scales `2^(q88/256)` with `q88` drawn by `q88`, zero points
/// in `0..=15`.
fn random_layer(
    n: usize,
    k: usize,
    gs: usize,
    rng: &mut StdRng,
    q88: impl FnMut(&mut StdRng) -> i16,
) -> (Array2<u8>, QuantGrid) {
    random_layer_bits(n, k, gs, 4, rng, q88)
}

/// [`random_layer`] for `bits`-bit codes (2–8): codes and zero points in `0..=2^bits − 1`.
fn random_layer_bits(
    n: usize,
    k: usize,
    gs: usize,
    bits: u32,
    rng: &mut StdRng,
    mut q88: impl FnMut(&mut StdRng) -> i16,
) -> (Array2<u8>, QuantGrid) {
    let maxq = (1u32 << bits) - 1;
    let codes = Array2::from_shape_fn((n, k), |_| rng.gen_range(0..=maxq) as u8);
    let recs: Vec<QMetaPacked> = (0..n * k.div_ceil(gs))
        .map(|_| QMetaPacked { log2_scale_q88: q88(rng), qzero: rng.gen_range(0..=maxq) as u8, flags: 0 })
        .collect();
    let grid = grid_of(&recs, n, k, gs, maxq);
    (codes, grid)
}

#[test]
fn packing_round_trips_codes_and_records() {
    let mut rng = StdRng::seed_from_u64(1);
    let shapes = [(1, 8, 32), (64, 128, 32), (100, 200, 96), (257, 1000, 160), (300, 64, 1024), (8, 2056, 512)];
    for (i, &(n, k, gs)) in shapes.iter().enumerate() {
        // 2–4-bit grids pack 4-bit tiles, 5–8-bit ones 8-bit tiles.
        for bits in [2 + i as u32 % 3, 4, 5 + i as u32 % 3, 8] {
            let (codes, grid) = random_layer_bits(n, k, gs, bits, &mut rng, |r| r.gen());
            let p = pack_for_kernel(codes.view(), &grid).unwrap();
            assert_eq!((p.dims.n_pad % 256, p.dims.k_pad % 128), (0, 0));
            assert_eq!(p.dims.bits, if bits <= 4 { 4 } else { 8 }, "{bits}-bit grid");
            assert_eq!(p.codes.len(), (p.dims.n_pad / 64) * (p.dims.k_pad / 16) * 32 * p.dims.bits as usize);
            let (c2, r2) = unpack_for_kernel(&p).unwrap();
            assert_eq!(c2, codes, "{n}×{k} gs {gs} {bits} bits: codes");
            assert_eq!(r2, grid.to_u32_vec(), "{n}×{k} gs {gs} {bits} bits: records");
        }
    }
}

#[test]
fn packing_rejects_what_the_kernel_cannot_run() {
    let mut rng = StdRng::seed_from_u64(2);
    let (codes, grid) = random_layer(16, 64, 32, &mut rng, |_| 0);
    // 5-bit codes go to 8-bit tiles; wider grids than 8 bits have no kernel
    let g5 = QuantGrid { maxq: 31, ..grid.clone() };
    assert_eq!(pack_for_kernel(codes.view(), &g5).unwrap().dims.bits, 8);
    let g9 = QuantGrid { maxq: 511, ..grid.clone() };
    match pack_for_kernel(codes.view(), &g9) {
        Err(ForgeError::Config(m)) => assert!(m.contains("at most 8 bits"), "{m}"),
        other => panic!("a 9-bit grid: {:?}", other.map(|p| p.dims)),
    }
    // a zero point above a 6-bit grid's maxq (in range for the 8-bit tiles it packs into)
    let (c6, g6) = random_layer_bits(16, 64, 32, 6, &mut rng, |_| 0);
    let mut recs6: Vec<QMetaPacked> = g6.to_u32_vec().into_iter().map(QMetaPacked::from_u32).collect();
    recs6[5].qzero = 64;
    assert!(matches!(pack_for_kernel(c6.view(), &grid_of(&recs6, 16, 64, 32, 63)), Err(ForgeError::Config(_))));
    // a zero point above maxq (4-bit data on a 3-bit grid)
    let g3 = QuantGrid { maxq: 7, ..grid.clone() };
    let small = codes.mapv(|c| c & 7);
    let mut recs: Vec<QMetaPacked> = g3.to_u32_vec().into_iter().map(QMetaPacked::from_u32).collect();
    recs[3].qzero = 9;
    assert!(matches!(pack_for_kernel(small.view(), &grid_of(&recs, 16, 64, 32, 7)), Err(ForgeError::Config(_))));
    // a code above maxq
    assert!(matches!(pack_for_kernel(codes.view(), &g3), Err(ForgeError::Config(_))));
    // K not a multiple of 8, a group size that is not a multiple of 32
    let (c, g) = random_layer(4, 36, 32, &mut rng, |_| 0);
    assert!(matches!(pack_for_kernel(c.view(), &g), Err(ForgeError::Shape(_))));
    let (c, g) = random_layer(4, 96, 48, &mut rng, |_| 0);
    assert!(matches!(pack_for_kernel(c.view(), &g), Err(ForgeError::GroupSize(48))));
    // grid of another shape
    let (c, _) = random_layer(4, 64, 32, &mut rng, |_| 0);
    assert!(matches!(pack_for_kernel(c.view(), &grid), Err(ForgeError::Shape(_))));
    // a scale whose dequantized values overflow f16 is refused in f16, fine in bf16
    let (c, g) = random_layer(4, 64, 32, &mut rng, |_| 20 * 256);
    let p = pack_for_kernel(c.view(), &g).unwrap();
    assert!(p.check_for(ActDtype::Bf16).is_ok() && p.check_for(ActDtype::F16).is_err());
}

/// The reference weight is `round_T((q − z)·round_T(decode(q88)))`, evaluated here with the
/// `half` crate instead of the shared numerics.
#[test]
fn cpu_dequant_equals_an_independent_evaluation() {
    let mut rng = StdRng::seed_from_u64(3);
    for bits in [4, 8] {
        let (codes, grid) =
            random_layer_bits(70, 200, 64, bits, &mut rng, |r| r.gen_range(-40 * 256..(20 - bits as i32) * 256) as i16);
        let p = pack_for_kernel(codes.view(), &grid).unwrap();
        for dt in [ActDtype::Bf16, ActDtype::F16] {
            let w = dequant_for_kernel(&p, dt).unwrap();
            for ((r, c), &v) in w.indexed_iter() {
                let m = grid.meta(r, c / 64).unwrap();
                let s = forge_numerics::decode_log2_q88(m.log2_scale_q88);
                let d = codes[[r, c]] as f32 - m.qzero as f32;
                let want = match dt {
                    ActDtype::Bf16 => half::bf16::from_f32(d * half::bf16::from_f32(s).to_f32()).to_f32(),
                    ActDtype::F16 => half::f16::from_f32(d * half::f16::from_f32(s).to_f32()).to_f32(),
                };
                assert_eq!(v.to_bits(), want.to_bits(), "{bits} bits {dt:?} ({r}, {c})");
            }
        }
    }
}

#[test]
fn gpu_dequant_is_bit_exact_for_every_group_size() {
    let Some(dev) = common::gpu_or_skip("gpu_dequant_is_bit_exact_for_every_group_size") else { return };
    let mut rng = StdRng::seed_from_u64(4);
    for gs in (32..=1024).step_by(32) {
        let k = [gs * 2 + 8, 1000, 2056][gs % 3];
        let n = 64 + gs % 200;
        for (dt, bits) in [(ActDtype::Bf16, 4), (ActDtype::F16, 4), (ActDtype::Bf16, 8), (ActDtype::F16, 8)] {
            // Records over the type's whole finite range: both the table decode and the
            // fallback (subnormal scales, the edges of the exponent range; |q − z| up to 255
            // at 8 bits, so f16 scales stop 4 octaves lower).
            let (lo, hi) = match (dt, bits) {
                (ActDtype::Bf16, 4) => (i16::MIN as i32, 120 * 256),
                (ActDtype::Bf16, _) => (i16::MIN as i32, 119 * 256),
                (ActDtype::F16, 4) => (-30 * 256, 11 * 256),
                (ActDtype::F16, _) => (-30 * 256, 7 * 256),
            };
            let bits = if bits == 8 { 5 + (gs / 32) as u32 % 4 } else { bits }; // 5–8-bit grids
            let (codes, grid) = random_layer_bits(n, k, gs, bits, &mut rng, |r| r.gen_range(lo..hi) as i16);
            let p = pack_for_kernel(codes.view(), &grid).unwrap();
            let want = dequant_for_kernel(&p, dt).unwrap();
            let got = dequant_gpu(&dev, &p, dt).unwrap();
            for ((r, c), &v) in got.indexed_iter() {
                assert_eq!(v.to_bits(), want[[r, c]].to_bits(), "gs {gs} {bits} bits {dt:?} {n}×{k}: ({r}, {c})");
            }
        }
    }
}

/// Integer activations and power-of-two scales: exact sums (module docs). At 4 bits scales
/// `2^(e0 + {0..3})` and activations in `−3..=3`; above, `|q − z| ≤ 255`, so scales
/// `2^(e0 + {0, 1})` and activations in `−1..=1`: a product is at most `510·2^e0`, and a sum
/// over `k_pad ≤ 8192` of them stays below `2^22·2^e0`, exact in any order.
#[allow(clippy::too_many_arguments)]
fn exact_case(
    m: usize,
    n: usize,
    k: usize,
    gs: usize,
    e0: i32,
    x_scale: f32,
    codes_mode: u8,
    bits: u32,
    rng: &mut StdRng,
) -> (Array2<f32>, PackedWeight) {
    let maxq = (1u32 << bits) - 1;
    let (mut codes, _) = random_layer_bits(n, k, gs, bits, rng, |_| 0);
    match codes_mode {
        1 => codes.fill(0),
        2 => codes.fill(maxq as u8),
        _ => {}
    }
    let (octaves, x_max) = if bits > 4 { (2, 1) } else { (4, 3) };
    let recs: Vec<QMetaPacked> = (0..n * k.div_ceil(gs))
        .map(|_| QMetaPacked {
            log2_scale_q88: (256 * (e0 + rng.gen_range(0..octaves))) as i16,
            qzero: rng.gen_range(0..=maxq) as u8,
            flags: 0,
        })
        .collect();
    let p = pack_for_kernel(codes.view(), &grid_of(&recs, n, k, gs, maxq)).unwrap();
    let x = Array2::from_shape_fn((m, k), |_| rng.gen_range(-x_max..=x_max) as f32 * x_scale);
    (x, p)
}

fn assert_bits_equal(got: &Array2<f32>, want: &Array2<f32>, what: &str) {
    assert_eq!(got.dim(), want.dim(), "{what}: shape");
    for ((r, c), &v) in got.indexed_iter() {
        let w = want[[r, c]];
        assert!(v.to_bits() == w.to_bits(), "{what}: Y[{r}, {c}] = {v:e}, expected {w:e} exactly");
    }
}

/// Which fused kernel a case forces (each runs every row count: the skinny and tiled ones
/// are the paths of non-Hopper GPUs, the `wgmma` one and the skinny one's Hopper-module build
/// run on compute capability 9.0, launched with programmatic dependent launch).
#[derive(Clone, Copy, Debug)]
enum KernelChoice {
    /// Every row count, blocks of up to 128 rows (the plan's choice on large layers).
    Wgmma,
    /// The plan's choice on small layers: above 64 rows only, in blocks of up to 64.
    WgmmaSmallLayer,
    /// The skinny kernel's Hopper-module build (up to 64 rows), split-K in clusters where
    /// the plan takes them.
    SkinnySm90,
    /// The same with the global split-K (workspace and arrival counters).
    SkinnySm90GlobalSplitK,
    /// The Hopper skinny build in blocks of 16 warps for 1–8 rows (forced: the plan takes
    /// them only on large layers).
    SkinnySm90Wide,
    /// The Hopper skinny build in blocks of 12 warps on one 64-column tile that load their
    /// operands straight into registers, for 1–16 rows (forced).
    SkinnySm90Deep,
    Skinny,
    Tiled,
}

impl KernelChoice {
    const ALL: [KernelChoice; 8] = [
        KernelChoice::Wgmma,
        KernelChoice::WgmmaSmallLayer,
        KernelChoice::SkinnySm90,
        KernelChoice::SkinnySm90GlobalSplitK,
        KernelChoice::SkinnySm90Wide,
        KernelChoice::SkinnySm90Deep,
        KernelChoice::Skinny,
        KernelChoice::Tiled,
    ];

    /// The choices that run the skinny kernel's Hopper-module build.
    fn hopper_skinny(self) -> bool {
        matches!(
            self,
            KernelChoice::SkinnySm90
                | KernelChoice::SkinnySm90GlobalSplitK
                | KernelChoice::SkinnySm90Wide
                | KernelChoice::SkinnySm90Deep
        )
    }

    fn options(self, splits: Option<u32>) -> W4a16Options {
        let (hopper_min_m, hopper_min_weights, skinny_max_m) = match self {
            KernelChoice::Wgmma => (1, 0, 64),
            KernelChoice::WgmmaSmallLayer => (1, u64::MAX, 64),
            KernelChoice::Tiled => (usize::MAX, 0, 0),
            _ => (usize::MAX, 0, 64),
        };
        W4a16Options {
            path: MatmulPath::Fused,
            splits,
            hopper_min_m,
            hopper_min_weights,
            skinny_max_m,
            hopper_skinny: self.hopper_skinny(),
            cluster_split_k: !matches!(self, KernelChoice::SkinnySm90GlobalSplitK),
            wide_skinny_blocks: Some(matches!(self, KernelChoice::SkinnySm90Wide)),
            deep_skinny_blocks: Some(matches!(self, KernelChoice::SkinnySm90Deep)),
            // The Hopper-module kernels with both prologues: the overlapping launch (after a
            // copy, so nothing to overlap: the launch path, the wait and the split prologue
            // run) with odd forced splits, the plain one otherwise.
            overlap_prior_kernel: (self.hopper_skinny() || matches!(self, KernelChoice::Wgmma))
                && splits.is_some_and(|s| s % 2 == 1),
            ..Default::default()
        }
    }

    /// The plan for `m` rows ran the kernel asked for (the Hopper ones wherever the device
    /// has them; the skinny one serves at most 64 rows, the tiled one above).
    fn check_plan(self, dev: &GpuDevice, m: usize, plan: &W4a16Plan) {
        let hopper = dev.is_hopper();
        let sm80 = if m <= 64 { "Skinny" } else { "Tiled" };
        let want = match self {
            KernelChoice::Wgmma if hopper => "Wgmma",
            KernelChoice::WgmmaSmallLayer if hopper && m > 64 => "Wgmma",
            // 17–32 rows keep the sm_80 build (see `W4a16Options::hopper_skinny`).
            k if k.hopper_skinny() && hopper && m <= 64 && !(17..=32).contains(&m) => "SkinnySm90",
            KernelChoice::Tiled => "Tiled",
            _ => sm80,
        };
        let got = match plan.kernel {
            FusedKernel::Wgmma { tf } => {
                // Small layers: blocks of at most 64 rows.
                assert!(!matches!(self, KernelChoice::WgmmaSmallLayer) || tf <= 8, "{plan:?}");
                "Wgmma"
            }
            FusedKernel::SkinnySm90 { tf, warps, x_l1 } => {
                // 16 warps exactly where asked for at 1–8 rows, 12 at 1–16; X through L1 exactly
                // at 9–16 rows unsplit in 8-warp blocks.
                let want_warps = match self {
                    KernelChoice::SkinnySm90Wide if tf == 1 => 16,
                    KernelChoice::SkinnySm90Deep if tf <= 2 => 12,
                    _ => 8,
                };
                assert_eq!(warps, want_warps, "{self:?} m {m}: {plan:?}");
                assert_eq!(x_l1, tf == 2 && warps == 8 && plan.splits == 1, "{self:?} m {m}: {plan:?}");
                "SkinnySm90"
            }
            FusedKernel::Skinny { .. } => "Skinny",
            FusedKernel::Tiled { .. } => "Tiled",
            FusedKernel::SkinnyW8 { .. } => "SkinnyW8",
        };
        assert_eq!(got, want, "{self:?} m {m}: {plan:?}");
        // Clusters only for the Hopper skinny build with splits, never when turned off.
        let may_cluster = self.hopper_skinny()
            && !matches!(self, KernelChoice::SkinnySm90GlobalSplitK)
            && got == "SkinnySm90"
            && plan.splits > 1;
        assert!(plan.cluster == 1 || (may_cluster && plan.cluster == plan.splits), "{self:?} m {m}: {plan:?}");
    }
}

/// Cluster split-K adds the same partials in the same order as the global split-K, so the
/// two must agree bit for bit on any input, here realistic (non-exactly-summable) ones with
/// `Y` NaN-filled before every launch. The plan takes clusters only where the device holds a
/// whole wave of them (one cluster must fit a GPC), so a split count it declines is reported;
/// but at every row block it must take them for some split counts (a silent fallback
/// everywhere would pass the equality). Repeats give a missing cluster barrier a chance to
/// show.
#[test]
fn gpu_cluster_split_k_equals_the_global_one() {
    let Some(dev) = common::gpu_or_skip("gpu_cluster_split_k_equals_the_global_one") else { return };
    if !dev.is_hopper() {
        eprintln!("[gpu_cluster_split_k_equals_the_global_one] skipped: clusters run on compute capability 9.0 only");
        return;
    }
    let mut rng = StdRng::seed_from_u64(12);
    // n tails. Up to 16 rows (two blocks per SM), 4000 columns: enough column blocks that
    // most split counts need more blocks than SMs, where the plan takes clusters of any size.
    // At 64 rows (one block per SM) 1000 columns, so that a wave of clusters fits.
    let (k, gs) = (4096, 128);
    let mut layer = |n: usize| {
        let (codes, grid) = random_layer(n, k, gs, &mut rng, |r| r.gen_range(-2560..-1024));
        (n, DevicePackedWeight::upload(&dev, &pack_for_kernel(codes.view(), &grid).unwrap()).unwrap())
    };
    let (wide, narrow) = (layer(4000), layer(1000));
    let stream = dev.stream().clone();
    let mut ws = W4a16Workspace::default();
    let cases = [
        (1, ActDtype::Bf16, &wide),
        (5, ActDtype::F16, &wide),
        (16, ActDtype::Bf16, &wide),
        (64, ActDtype::F16, &narrow),
    ];
    for (m, dt, (n, w)) in cases {
        let n = *n;
        let xh: Vec<u16> = (0..m * k).map(|_| dt.bits(rng.sample::<f32, _>(StandardNormal))).collect();
        let mut x = dev.alloc::<u16>(m * k, "test X").unwrap();
        stream.memcpy_htod(&xh, &mut x).unwrap();
        let mut y = dev.alloc::<u16>(m * n, "test Y").unwrap();
        let nan = vec![0xffffu16; m * n];
        let mut run = |opts: &W4a16Options| {
            stream.memcpy_htod(&nan, &mut y).unwrap();
            let plan = w4a16_matmul(&dev, &x, m, w, &mut y, dt, opts, &mut ws).unwrap();
            (stream.clone_dtoh(&y).unwrap(), plan)
        };
        let mut clustered_runs = 0;
        for splits in [2, 3, 4, 7, 8, 12, 16] {
            let clustered = KernelChoice::SkinnySm90.options(Some(splits));
            let global = KernelChoice::SkinnySm90GlobalSplitK.options(Some(splits));
            let (want, gplan) = run(&global);
            assert_eq!((gplan.splits, gplan.cluster), (splits, 1), "{gplan:?}");
            assert!(want.iter().all(|&b| dt.value(b).is_finite()), "m {m} splits {splits}: not finite");
            for rep in 0..5 {
                let (got, plan) = run(&clustered);
                assert_eq!((plan.kernel, plan.splits), (gplan.kernel, splits), "{plan:?}");
                if plan.cluster == splits {
                    clustered_runs += 1;
                } else {
                    assert_eq!(plan.cluster, 1, "m {m}: {plan:?}");
                    if rep == 0 {
                        eprintln!("m {m} splits {splits}: no clusters of {splits} here ({plan:?})");
                    }
                }
                assert!(got == want, "m {m} {dt:?} splits {splits} repeat {rep}: cluster split-K differs ({plan:?})");
            }
        }
        assert!(clustered_runs >= 10, "m {m}: only {clustered_runs} clustered launches");
    }
}

#[test]
fn gpu_matmul_is_exact_on_exactly_summable_inputs() {
    let Some(dev) = common::gpu_or_skip("gpu_matmul_is_exact_on_exactly_summable_inputs") else { return };
    let mut rng = StdRng::seed_from_u64(5);
    // (n, k, gs): aligned, n tail, k tail (multiple of 8, not of 128), partial last group,
    // long k (many split-K stages), one tile.
    let shapes = [(256, 256, 128), (200, 392, 32), (576, 1000, 96), (130, 4104, 1024), (64, 128, 64), (520, 2048, 256)];
    for (si, &(n, k, gs)) in shapes.iter().enumerate() {
        for (mi, &m) in MS.iter().enumerate() {
            let dt = if (si + mi) % 2 == 0 { ActDtype::Bf16 } else { ActDtype::F16 };
            let (x, p) = exact_case(m, n, k, gs, -2, 1.0, 0, 4, &mut rng);
            let want = round_to_act(&w4a16_matmul_cpu(x.view(), &p, dt).unwrap(), dt);
            for splits in [None, Some(1), Some(3), Some(32)] {
                for kernel in KernelChoice::ALL {
                    let opts = kernel.options(splits);
                    let (got, plan) = w4a16_matmul_host(&dev, x.view(), &p, dt, &opts).unwrap();
                    kernel.check_plan(&dev, m, &plan);
                    assert_bits_equal(&got, &want, &format!("{dt:?} m {m} {n}×{k} gs {gs} {plan:?}"));
                }
            }
        }
    }
}

/// Dequantization + cuBLAS in column chunks (`gemm_chunk_bytes`): each chunk's rows of the
/// dense weight start at their own tile of codes and record column, and its GEMM writes its
/// columns of `Y` with the row stride `n`. On exactly summable inputs cuBLAS's f32 sums are
/// exact in any order, so every chunking must give `round_T(exact)` bit for bit: chunks of
/// one, two and three 64-row tiles and a size that is not a multiple of a tile (rounded down
/// to one), over `n` with tails (the last chunk shorter) and `k` tails.
#[test]
fn gpu_chunked_dequant_gemm_is_exact() {
    let Some(dev) = common::gpu_or_skip("gpu_chunked_dequant_gemm_is_exact") else { return };
    if let Err(e) = fourbit_forge::device::cublas::cublas_available() {
        eprintln!("SKIPPED (cuBLAS not loadable: {e})");
        return;
    }
    let mut rng = StdRng::seed_from_u64(11);
    for (ci, &(m, n, k, gs)) in
        [(33usize, 200usize, 392usize, 32usize), (130, 520, 2048, 256), (7, 64, 1000, 96)].iter().enumerate()
    {
        let dt = if ci % 2 == 0 { ActDtype::Bf16 } else { ActDtype::F16 };
        let (x, p) = exact_case(m, n, k, gs, -2, 1.0, 0, 4, &mut rng);
        let want = round_to_act(&w4a16_matmul_cpu(x.view(), &p, dt).unwrap(), dt);
        for chunk_bytes in [0, 64 * k * 2, 128 * k * 2, 192 * k * 2, 100 * k * 2 + 1, 1] {
            let opts =
                W4a16Options { path: MatmulPath::DequantGemm, gemm_chunk_bytes: chunk_bytes, ..Default::default() };
            let (got, plan) = w4a16_matmul_host(&dev, x.view(), &p, dt, &opts).unwrap();
            assert_eq!(plan.path, MatmulPath::DequantGemm);
            assert_bits_equal(&got, &want, &format!("{dt:?} m {m} {n}×{k} gs {gs} chunk {chunk_bytes} bytes"));
        }
    }
}

/// Two layers back to back on one stream, both launched overlapping the kernel before them
/// (`overlap_prior_kernel`): the second one's blocks start while the first runs and must
/// still read its output. Before every chain the intermediate buffer is filled with NaN, so
/// a read before the first layer's write would show; the split-K workspace the two share
/// must come through intact too. The result must equal the same chain launched in order, bit
/// for bit (the kernels are deterministic); 20 repeats per row count give a race many
/// chances. Row counts cover the skinny kernel (1–40) and the `wgmma` one (100).
#[test]
fn gpu_overlapped_launch_reads_the_previous_layers_output() {
    let Some(dev) = common::gpu_or_skip("gpu_overlapped_launch_reads_the_previous_layers_output") else { return };
    if !dev.is_hopper() {
        eprintln!("[gpu_overlapped_launch_reads_the_previous_layers_output] skipped: overlapping launches run on compute capability 9.0 only");
        return;
    }
    let mut rng = StdRng::seed_from_u64(11);
    let (k, n1, n2, gs, dt) = (2048, 1024, 768, 128, ActDtype::Bf16);
    let mut layer = |n: usize, k: usize| {
        let (codes, grid) = random_layer(n, k, gs, &mut rng, |r| r.gen_range(-2048..-1024));
        pack_for_kernel(codes.view(), &grid).unwrap()
    };
    let (p1, p2) = (layer(n1, k), layer(n2, n1));
    let (w1, w2) = (DevicePackedWeight::upload(&dev, &p1).unwrap(), DevicePackedWeight::upload(&dev, &p2).unwrap());
    let stream = dev.stream().clone();
    let serial = W4a16Options { path: MatmulPath::Fused, ..Default::default() };
    let overlapped = W4a16Options { overlap_prior_kernel: true, ..serial };
    for m in [1, 7, 16, 40, 100] {
        let xh: Vec<u16> = (0..m * k).map(|_| dt.bits(rng.gen_range(-1.0f32..1.0))).collect();
        let mut x = dev.alloc::<u16>(m * k, "test X").unwrap();
        stream.memcpy_htod(&xh, &mut x).unwrap();
        let mut y1 = dev.alloc::<u16>(m * n1, "test Y1").unwrap();
        let mut y2 = dev.alloc::<u16>(m * n2, "test Y2").unwrap();
        let nan = vec![0xffffu16; m * n1];
        let mut ws = W4a16Workspace::default();
        let mut chain = |opts: &W4a16Options| {
            stream.memcpy_htod(&nan, &mut y1).unwrap();
            let first = w4a16_matmul(&dev, &x, m, &w1, &mut y1, dt, opts, &mut ws).unwrap();
            let second = w4a16_matmul(&dev, &y1, m, &w2, &mut y2, dt, opts, &mut ws).unwrap();
            (stream.clone_dtoh(&y2).unwrap(), first, second)
        };
        let (want, _, _) = chain(&serial);
        assert!(want.iter().all(|&b| dt.value(b).is_finite()), "m {m}: the serial chain is not finite");
        for rep in 0..20 {
            let (got, first, second) = chain(&overlapped);
            for plan in [first, second] {
                assert!(matches!(plan.kernel, FusedKernel::SkinnySm90 { .. } | FusedKernel::Wgmma { .. }), "{plan:?}");
            }
            assert!(got == want, "m {m} repeat {rep}: the overlapped chain differs ({first:?}, {second:?})");
        }
    }
}

#[test]
fn gpu_matmul_exact_adversarial_inputs() {
    let Some(dev) = common::gpu_or_skip("gpu_matmul_exact_adversarial_inputs") else { return };
    let mut rng = StdRng::seed_from_u64(6);
    let fused = W4a16Options { path: MatmulPath::Fused, ..Default::default() };
    for m in [1, 16, 33] {
        // Large and small magnitudes (bf16 only: f16 has no such range); all codes 0, all 15.
        for (e0, xs, mode, dt) in [
            (40, 2f32.powi(40), 0, ActDtype::Bf16),
            (-40, 2f32.powi(-40), 0, ActDtype::Bf16),
            (-2, 1.0, 1, ActDtype::Bf16),
            (-2, 1.0, 2, ActDtype::F16),
            (0, 1.0, 2, ActDtype::Bf16),
        ] {
            let (x, p) = exact_case(m, 192, 520, 32, e0, xs, mode, 4, &mut rng);
            let want = round_to_act(&w4a16_matmul_cpu(x.view(), &p, dt).unwrap(), dt);
            let (got, plan) = w4a16_matmul_host(&dev, x.view(), &p, dt, &fused).unwrap();
            assert_bits_equal(&got, &want, &format!("e0 {e0} mode {mode} {dt:?} m {m} {plan:?}"));
        }
        // Zero activations: every output is +0.
        let (x, p) = exact_case(m, 192, 520, 32, 0, 0.0, 0, 4, &mut rng);
        let (got, _) = w4a16_matmul_host(&dev, x.view(), &p, ActDtype::Bf16, &fused).unwrap();
        assert!(got.iter().all(|v| v.to_bits() == 0), "zero X must give +0");
    }
}

/// The bound on `|Y_gpu − Y|` for one output, `Y` the exact sum (the f64 reference), `a` the
/// f64 sum of `|x·w|`:
/// * products of two 16-bit values are exact in f32;
/// * a tensor-core step adds 16 products to the f32 accumulator, aligning the 17 addends to
///   the largest and truncating, so it errs by < 1 ulp (2^-23 relative) of the largest
///   magnitude per addend: ≤ 17·2^-23·a per step (a conservative model of the hardware);
/// * at most `⌈k_pad/16⌉` such steps in a chain, then ≤ 8 warp partials (the skinny
///   kernel's 8 warps; the tiled one has 2 or 4) and ≤ 32 split partials added in f32
///   (≤ 2^-24·a each): γ = (17·k_pad/16 + 40)·2^-23;
/// * the output is rounded to `T`: `|round_T(f) − Y| ≤ u_T·(|Y| + γ·a) + γ·a`, plus half the
///   smallest subnormal of `T` for results in its subnormal range.
fn tolerance(y: f64, a: f64, k_pad: usize, dt: ActDtype) -> f64 {
    let gamma = (17.0 * (k_pad as f64 / 16.0) + 40.0) * 2f64.powi(-23);
    let u = dt.unit_roundoff();
    let tiny = match dt {
        ActDtype::Bf16 => 2f64.powi(-134),
        ActDtype::F16 => 2f64.powi(-25),
    };
    u * (y.abs() + gamma * a) + gamma * a + tiny
}

#[test]
fn gpu_matmul_matches_the_reference_on_quantized_layers() {
    let Some(dev) = common::gpu_or_skip("gpu_matmul_matches_the_reference_on_quantized_layers") else { return };
    let mut rng = StdRng::seed_from_u64(7);
    let t = StudentT::new(3.0f32).unwrap();
    // (n, k, gs, symmetric, MSE grid, bits): 4-bit tiles, and 8-bit ones for 6- and 8-bit grids.
    let cases = [
        (384usize, 1024usize, 128usize, true, false, 4u32),
        (200, 776, 32, false, false, 4),
        (1100, 2048, 64, true, true, 4),
        (520, 1024, 128, false, false, 8),
        (320, 776, 64, true, true, 6),
    ];
    for (ci, &(n, k, gs, symmetric, mse, bits)) in cases.iter().enumerate() {
        let w = Array2::from_shape_fn((n, k), |_| t.sample(&mut rng) * 0.02);
        let cfg = GridConfig {
            group_size: gs,
            bits,
            symmetric,
            scale_search: if mse { ScaleSearch::Mse(MseSearch::default()) } else { ScaleSearch::Absmax },
            ..GridConfig::default()
        };
        let grid = fourbit_forge::grid::build_quant_grid(WeightView::F32(w.view()), &cfg).unwrap();
        let (codes, _) = common::rtn(&w, &grid);
        let p = pack_for_kernel(codes.view(), &grid).unwrap();
        for (mi, &m) in MS.iter().enumerate() {
            let dt = if (ci + mi) % 2 == 0 { ActDtype::Bf16 } else { ActDtype::F16 };
            let mut x = Array2::from_shape_fn((m, k), |_| rng.sample::<f32, _>(StandardNormal));
            for c in (0..k).step_by(97) {
                x.column_mut(c).mapv_inplace(|v| v * 30.0); // outlier input channels
            }
            let xr = x.mapv(|v| dt.round(v));
            let want = w4a16_matmul_cpu(xr.view(), &p, dt).unwrap();
            let wq = dequant_for_kernel(&p, dt).unwrap().mapv(|v| v.abs() as f64);
            let abs_sum = xr.mapv(|v| v.abs() as f64).dot(&wq.t());
            // The fused kernel, and dequantization + cuBLAS where cuBLAS loads (same f32
            // accumulation model, so the same bound).
            let mut paths = vec![MatmulPath::Fused];
            if fourbit_forge::device::cublas::cublas_available().is_ok() {
                paths.push(MatmulPath::DequantGemm);
            } else if mi == 0 {
                eprintln!("cuBLAS not loadable: the dequantization + cuBLAS path is not checked");
            }
            for path in paths {
                let opts = W4a16Options { path, ..Default::default() };
                let (got, plan) = w4a16_matmul_host(&dev, xr.view(), &p, dt, &opts).unwrap();
                let mut worst = 0f64;
                for ((r, c), &v) in got.indexed_iter() {
                    let (y, a) = (want[[r, c]], abs_sum[[r, c]]);
                    let tol = tolerance(y, a, p.dims.k_pad, dt);
                    let err = (v as f64 - y).abs();
                    assert!(err <= tol, "{dt:?} m {m} {n}×{k} gs {gs} {plan:?}: Y[{r}, {c}] = {v}, ref {y}, tol {tol}");
                    worst = worst.max(err / tol);
                }
                eprintln!(
                    "{dt:?} m {m} {n}×{k} gs {gs} {bits} bits {:?} {:?} splits {}: worst err/tol {worst:.3}",
                    plan.path, plan.kernel, plan.splits
                );
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..proptest::prelude::ProptestConfig::default() })]

    /// The fused kernels on random exactly summable cases (module docs: any f32 order is
    /// exact, so the device must return `round_T(exact)` bit for bit): rows 1–80 (the
    /// Hopper kernel's 8–64-row blocks, the skinny kernel's, and the tiled kernel, each
    /// forced at every row count it can run), random `n`
    /// (tails) and `k` (multiples of 8), group sizes 32–1024 with partial last groups, both
    /// types, random split-K factors (warps or splits with no steps included), random codes,
    /// zero points and power-of-two scales.
    #[test]
    fn gpu_fused_kernels_are_exact_on_random_shapes(
        m in 1usize..=80,
        n in 1usize..700,
        k8 in 1usize..400,
        gs_units in proptest::prop_oneof![1usize..=8, proptest::strategy::Just(32usize)],
        f16 in proptest::bool::ANY,
        splits in proptest::option::of(1u32..=32),
        kernel in proptest::sample::select(KernelChoice::ALL.to_vec()),
        seed in proptest::num::u64::ANY,
    ) {
        let Some(dev) = common::gpu_or_skip("gpu_fused_kernels_are_exact_on_random_shapes") else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let (k, gs) = (8 * k8, 32 * gs_units);
        let dt = if f16 { ActDtype::F16 } else { ActDtype::Bf16 };
        let (x, p) = exact_case(m, n, k, gs, -2, 1.0, 0, 4, &mut rng);
        let want = round_to_act(&w4a16_matmul_cpu(x.view(), &p, dt).unwrap(), dt);
        let opts = kernel.options(splits);
        let (got, plan) = w4a16_matmul_host(&dev, x.view(), &p, dt, &opts).unwrap();
        kernel.check_plan(&dev, m, &plan);
        assert_bits_equal(&got, &want, &format!("{dt:?} m {m} {n}×{k} gs {gs} {plan:?}"));
    }
}

/// The 8-token fragments of the 8-bit skinny kernel's row blocks for `m` rows.
fn w8_tf(m: usize) -> u32 {
    m.min(64).div_ceil(8).next_power_of_two() as u32
}

/// Runs an 8-bit packed weight on every path and checks each against `want` bit for bit: the
/// fused path under every kernel choice's options (8-bit codes have one fused kernel, which
/// every option set must reach: `w8a16_skinny_*`, row blocks of up to 64 rows, never in
/// clusters) with `splits`, and dequantization + cuBLAS (the 8-bit dequantization kernel)
/// whole and in two-tile chunks where cuBLAS loads, and the default plan.
fn check_w8_paths(
    dev: &GpuDevice,
    x: &Array2<f32>,
    p: &PackedWeight,
    dt: ActDtype,
    want: &Array2<f32>,
    splits: &[Option<u32>],
) {
    let m = x.nrows();
    assert_eq!(p.dims.bits, 8);
    for &split in splits {
        for kernel in KernelChoice::ALL {
            let (got, plan) = w4a16_matmul_host(dev, x.view(), p, dt, &kernel.options(split)).unwrap();
            assert_eq!(plan.kernel, FusedKernel::SkinnyW8 { tf: w8_tf(m) }, "{kernel:?} m {m}: {plan:?}");
            assert_eq!(plan.cluster, 1, "{plan:?}");
            assert_bits_equal(&got, want, &format!("8-bit {dt:?} m {m} {}×{} {plan:?}", p.dims.n, p.dims.k));
        }
    }
    // The default plan: the fused kernel up to 64 rows, dequantization + cuBLAS above where
    // cuBLAS loads (`w8_gemm_min_m`).
    let cublas = fourbit_forge::device::cublas::cublas_available().is_ok();
    let (got, plan) = w4a16_matmul_host(dev, x.view(), p, dt, &W4a16Options::default()).unwrap();
    let want_path = if cublas && m > 64 { MatmulPath::DequantGemm } else { MatmulPath::Fused };
    assert_eq!(plan.path, want_path, "8-bit default plan, m {m}: {plan:?}");
    assert_bits_equal(&got, want, &format!("8-bit {dt:?} m {m} default plan {plan:?}"));
    if cublas {
        for chunk_bytes in [0, 128 * p.dims.k * 2] {
            let opts =
                W4a16Options { path: MatmulPath::DequantGemm, gemm_chunk_bytes: chunk_bytes, ..Default::default() };
            let (got, plan) = w4a16_matmul_host(dev, x.view(), p, dt, &opts).unwrap();
            assert_eq!(plan.path, MatmulPath::DequantGemm);
            assert_bits_equal(&got, want, &format!("8-bit {dt:?} m {m} dequant + cuBLAS, chunk {chunk_bytes}"));
        }
    }
}

/// 8-bit packed weights (5–8-bit grids) on exactly summable inputs ([`exact_case_bits`]):
/// `n`/`k` tails, partial last groups, group sizes 32–1024, every row count of [`MS`]
/// (above 64 rows several row blocks), forced split-K factors, both types, every path.
#[test]
fn gpu_w8_matmul_is_exact_on_exactly_summable_inputs() {
    let Some(dev) = common::gpu_or_skip("gpu_w8_matmul_is_exact_on_exactly_summable_inputs") else { return };
    let mut rng = StdRng::seed_from_u64(31);
    let shapes = [
        (256, 256, 128, 8),
        (200, 392, 32, 5),
        (576, 1000, 96, 6),
        (130, 4104, 1024, 8),
        (64, 128, 64, 7),
        (520, 2048, 256, 8),
    ];
    for (si, &(n, k, gs, bits)) in shapes.iter().enumerate() {
        for (mi, &m) in MS.iter().enumerate() {
            let dt = if (si + mi) % 2 == 0 { ActDtype::Bf16 } else { ActDtype::F16 };
            let (x, p) = exact_case(m, n, k, gs, -2, 1.0, 0, bits, &mut rng);
            let want = round_to_act(&w4a16_matmul_cpu(x.view(), &p, dt).unwrap(), dt);
            check_w8_paths(&dev, &x, &p, dt, &want, &[None, Some(1), Some(3), Some(32)]);
        }
    }
}

/// 8-bit weights at the edges: magnitudes ×2^±40 (bf16), all codes 0 and all 255 (the zero
/// point's full range on both sides), zero activations (every output +0).
#[test]
fn gpu_w8_matmul_exact_adversarial_inputs() {
    let Some(dev) = common::gpu_or_skip("gpu_w8_matmul_exact_adversarial_inputs") else { return };
    let mut rng = StdRng::seed_from_u64(32);
    for m in [1, 16, 33, 70] {
        for (e0, xs, mode, dt) in [
            (40, 2f32.powi(40), 0, ActDtype::Bf16),
            (-40, 2f32.powi(-40), 0, ActDtype::Bf16),
            (-2, 1.0, 1, ActDtype::Bf16),
            (-2, 1.0, 2, ActDtype::F16),
            (0, 1.0, 2, ActDtype::Bf16),
            (0, 1.0, 1, ActDtype::F16),
        ] {
            let (x, p) = exact_case(m, 192, 520, 32, e0, xs, mode, 8, &mut rng);
            let want = round_to_act(&w4a16_matmul_cpu(x.view(), &p, dt).unwrap(), dt);
            check_w8_paths(&dev, &x, &p, dt, &want, &[None]);
        }
        let (x, p) = exact_case(m, 192, 520, 32, 0, 0.0, 0, 8, &mut rng);
        let fused = W4a16Options { path: MatmulPath::Fused, ..Default::default() };
        let (got, _) = w4a16_matmul_host(&dev, x.view(), &p, ActDtype::Bf16, &fused).unwrap();
        assert!(got.iter().all(|v| v.to_bits() == 0), "zero X must give +0");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..proptest::prelude::ProptestConfig::default() })]

    /// The 8-bit kernel on random exactly summable cases: rows 1–300 (several row blocks above
    /// 64), random `n` and `k` tails, group sizes 32–1024, 5–8-bit grids, both types, random
    /// split-K factors, random codes, zero points and power-of-two scales; bit for bit.
    #[test]
    fn gpu_w8_kernel_is_exact_on_random_shapes(
        m in proptest::prop_oneof![1usize..=80, 81usize..=300],
        n in 1usize..700,
        k8 in 1usize..400,
        gs_units in proptest::prop_oneof![1usize..=8, proptest::strategy::Just(32usize)],
        bits in 5u32..=8,
        f16 in proptest::bool::ANY,
        splits in proptest::option::of(1u32..=32),
        seed in proptest::num::u64::ANY,
    ) {
        let Some(dev) = common::gpu_or_skip("gpu_w8_kernel_is_exact_on_random_shapes") else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let (k, gs) = (8 * k8, 32 * gs_units);
        let dt = if f16 { ActDtype::F16 } else { ActDtype::Bf16 };
        let (x, p) = exact_case(m, n, k, gs, -2, 1.0, 0, bits, &mut rng);
        let want = round_to_act(&w4a16_matmul_cpu(x.view(), &p, dt).unwrap(), dt);
        let opts = W4a16Options { path: MatmulPath::Fused, splits, ..Default::default() };
        let (got, plan) = w4a16_matmul_host(&dev, x.view(), &p, dt, &opts).unwrap();
        proptest::prop_assert_eq!(plan.kernel, FusedKernel::SkinnyW8 { tf: w8_tf(m) });
        assert_bits_equal(&got, &want, &format!("{bits} bits {dt:?} m {m} {n}×{k} gs {gs} {plan:?}"));
    }
}

/// The kernels a grouped launch can run (every skinny build; `wgmma` where an expert has
/// more than 32 plan rows on compute capability 9.0).
const GROUPED_KERNELS: [KernelChoice; 4] =
    [KernelChoice::SkinnySm90, KernelChoice::SkinnySm90GlobalSplitK, KernelChoice::Skinny, KernelChoice::Wgmma];

/// An exactly summable grouped case: offsets of `rows` per expert, the row count, one exact
/// `n × k` expert each, integer activations.
fn exact_grouped_case(
    rows: &[usize],
    n: usize,
    k: usize,
    gs: usize,
    bits: u32,
    rng: &mut StdRng,
) -> (Vec<usize>, usize, Vec<PackedWeight>, Array2<f32>) {
    let offsets = expert_offsets(rows);
    let m = offsets[rows.len()];
    let packed: Vec<PackedWeight> = rows.iter().map(|_| exact_case(0, n, k, gs, -2, 1.0, 0, bits, rng).1).collect();
    // The activations of `exact_case` at this width.
    let x_max = if bits > 4 { 1 } else { 3 };
    let x = Array2::from_shape_fn((m, k), |_| rng.gen_range(-x_max..=x_max) as f32);
    (offsets, m, packed, x)
}

/// The grouped (mixture-of-experts) launch on the host's data: uploads the experts, the
/// routing and `X`, fills `Y` with NaN (a row the launch skips shows), runs one launch.
fn grouped_host(
    dev: &GpuDevice,
    x: &Array2<f32>,
    offsets: &[usize],
    experts: &DeviceExperts,
    dt: ActDtype,
    opts: &W4a16Options,
) -> (Array2<f32>, Option<W4a16Plan>) {
    let (m, n) = (x.nrows(), experts.dims.n);
    let routing = ExpertRouting::new(dev, offsets).unwrap();
    let stream = dev.stream().clone();
    let xh: Vec<u16> = x.iter().map(|&v| dt.bits(v)).collect();
    let mut xd = dev.alloc::<u16>(xh.len().max(1), "test X").unwrap();
    stream.memcpy_htod(&xh, &mut xd.slice_mut(0..xh.len())).unwrap();
    let mut yd = dev.alloc::<u16>((m * n).max(1), "test Y").unwrap();
    stream.memcpy_htod(&vec![0xffffu16; (m * n).max(1)], &mut yd).unwrap();
    let mut ws = W4a16Workspace::default();
    let plan = w4a16_grouped_matmul(dev, &xd, &routing, experts, &mut yd, dt, opts, &mut ws).unwrap();
    let yb = stream.clone_dtoh(&yd).unwrap();
    let y = Array2::from_shape_vec((m, n), yb[..m * n].iter().map(|&b| dt.value(b)).collect()).unwrap();
    (y, plan)
}

/// The grouped launch runs each row block exactly as the ungrouped launch of those rows with
/// the same split count (same warps' `k` ranges, same split order; a row's sums do not
/// depend on the block height), so the two agree bit for bit on realistic (non-exactly-summable) inputs: experts with no rows, one with more rows
/// than a block (several row blocks, the last partial), `n` and `k` tails, every skinny build,
/// forced splits with both split-K ends. With the plan's own splits it is checked against the
/// f64 reference with the bound of [`tolerance`].
#[test]
fn gpu_grouped_matmul_equals_per_row_block_launches() {
    let Some(dev) = common::gpu_or_skip("gpu_grouped_matmul_equals_per_row_block_launches") else { return };
    let mut rng = StdRng::seed_from_u64(21);
    let (n, k, gs) = (700, 1032, 64);
    let packed: Vec<PackedWeight> = (0..5)
        .map(|_| {
            let (codes, grid) = random_layer(n, k, gs, &mut rng, |r| r.gen_range(-2560..-1024));
            pack_for_kernel(codes.view(), &grid).unwrap()
        })
        .collect();
    let experts = DeviceExperts::upload(&dev, &packed).unwrap();
    // Plan rows (largest expert, capped at 1.5× the mean): 2, 43 (wgmma 64-row blocks), 5, 40
    // (wgmma 64), 69 (wgmma 128-row blocks).
    let routings = [[1usize, 0, 2, 1, 0], [0, 70, 3, 0, 12], [5, 5, 5, 5, 5], [40, 0, 36, 0, 0], [90, 0, 0, 0, 1]];
    for (ci, rows) in routings.iter().enumerate() {
        let offsets = expert_offsets(rows);
        let m = offsets[5];
        let dt = if ci % 2 == 0 { ActDtype::Bf16 } else { ActDtype::F16 };
        let x = Array2::from_shape_fn((m, k), |_| dt.round(rng.sample::<f32, _>(StandardNormal)));
        let tasks = ExpertTasks::new(&offsets).unwrap();
        let want_ref = w4a16_grouped_matmul_cpu(x.view(), &offsets, &packed, dt).unwrap();
        let abs_sum: Vec<Array2<f64>> = (0..5)
            .map(|e| {
                let wq = dequant_for_kernel(&packed[e], dt).unwrap().mapv(|v| v.abs() as f64);
                x.slice(ndarray::s![offsets[e]..offsets[e + 1], ..]).mapv(|v| v.abs() as f64).dot(&wq.t())
            })
            .collect();
        // Rows `rows` of expert `e` against the f64 reference; the worst error / tolerance.
        let check_rows = |got: &Array2<f32>, e: usize, rows: std::ops::Range<usize>, what: &str| {
            let mut worst = 0f64;
            for r in rows {
                for c in 0..n {
                    let (v, y) = (got[[r, c]] as f64, want_ref[[r, c]]);
                    let tol = tolerance(y, abs_sum[e][[r - offsets[e], c]], packed[e].dims.k_pad, dt);
                    assert!((v - y).abs() <= tol, "{what}: Y[{r}, {c}] = {v}, ref {y}, tol {tol}");
                    worst = worst.max((v - y).abs() / tol);
                }
            }
            worst
        };
        // The Hopper kernel runs the grouped launch above 32 plan rows.
        for kernel in GROUPED_KERNELS {
            for splits in [1, 3, 8] {
                let opts = kernel.options(Some(splits));
                let opts = W4a16Options { overlap_prior_kernel: false, ..opts };
                let (got, plan) = grouped_host(&dev, &x, &offsets, &experts, dt, &opts);
                let plan = plan.unwrap();
                let what = format!("rows {rows:?} {kernel:?} {dt:?} {plan:?}");
                let height = match plan.kernel {
                    FusedKernel::Wgmma { tf } => {
                        let want = if tasks.plan_rows > 64 { 16 } else { 8 };
                        assert!(dev.is_hopper() && tf == want && tasks.plan_rows > 32, "{what}");
                        8 * tf as usize
                    }
                    _ => tasks.rows_per_task,
                };
                let cut = tasks.tasks_of(height);
                assert_eq!(plan.m_blocks as usize, cut.len(), "{what}");
                // The ungrouped launches of the same kernel family.
                let task_opts = match plan.kernel {
                    FusedKernel::Wgmma { .. } => opts,
                    _ => W4a16Options { hopper_min_m: usize::MAX, ..opts },
                };
                let mut bit_equal_rows = 0;
                for &[e, row0, r] in &cut {
                    let rows = row0 as usize..(row0 + r) as usize;
                    let xs = x.slice(ndarray::s![rows.clone(), ..]).to_owned();
                    let (y, p) = w4a16_matmul_host(&dev, xs.view(), &packed[e as usize], dt, &task_opts).unwrap();
                    assert_eq!(p.splits, plan.splits, "task {e} {row0} {r}: {p:?}");
                    // The skinny kernel's sums of a row do not depend on its block height (the
                    // other rows of its mma), only on the splits: bit for bit. The `wgmma`
                    // kernel is compared so where the ungrouped launch picks the same height.
                    let same = !matches!(plan.kernel, FusedKernel::Wgmma { .. }) || p.kernel == plan.kernel;
                    if same {
                        let g = got.slice(ndarray::s![rows.clone(), ..]).to_owned();
                        assert_bits_equal(&g, &y, &format!("{what}, task {e} {row0} {r}"));
                        bit_equal_rows += r as usize;
                    } else {
                        check_rows(&got, e as usize, rows, &what);
                    }
                }
                assert!(bit_equal_rows > 0, "{what}: no task compared bit for bit");
            }
        }
        // The plan's own choice against the reference.
        let (got, plan) = grouped_host(&dev, &x, &offsets, &experts, dt, &W4a16Options::default());
        let what = format!("rows {rows:?} {dt:?} {plan:?}");
        let worst = (0..5).map(|e| check_rows(&got, e, offsets[e]..offsets[e + 1], &what)).fold(0f64, f64::max);
        eprintln!("grouped rows {rows:?} {dt:?} {plan:?}: worst err/tol {worst:.3}");
    }
}

#[test]
fn gpu_grouped_matmul_rejects_mismatched_inputs() {
    let Some(dev) = common::gpu_or_skip("gpu_grouped_matmul_rejects_mismatched_inputs") else { return };
    let mut rng = StdRng::seed_from_u64(22);
    let layer = |n: usize, k: usize, rng: &mut StdRng| {
        let (codes, grid) = random_layer(n, k, 128, rng, |r| r.gen_range(-2560..-1024));
        pack_for_kernel(codes.view(), &grid).unwrap()
    };
    let (a, b) = (layer(64, 256, &mut rng), layer(128, 256, &mut rng));
    match DeviceExperts::upload(&dev, &[a.clone(), b]) {
        Err(ForgeError::Shape(m)) => assert!(m.contains("expert 1 is 128×256"), "{m}"),
        other => panic!("mixed expert shapes: {:?}", other.err()),
    }
    assert!(matches!(DeviceExperts::upload::<PackedWeight>(&dev, &[]), Err(ForgeError::Shape(_))));
    // One launch, one code width: an 8-bit expert after 4-bit ones.
    let (c8, g8) = random_layer_bits(64, 256, 128, 8, &mut rng, |r| r.gen_range(-2560..-1024));
    let w8 = pack_for_kernel(c8.view(), &g8).unwrap();
    match DeviceExperts::upload(&dev, &[a.clone(), w8]) {
        Err(ForgeError::Config(m)) => assert!(m.contains("expert 1 has 8-bit packed codes, expert 0 4-bit"), "{m}"),
        other => panic!("an 8-bit expert after a 4-bit one: {:?}", other.err()),
    }
    let experts = DeviceExperts::upload(&dev, &[a.clone(), a]).unwrap();
    let routing = ExpertRouting::new(&dev, &[0, 1, 2, 3]).unwrap();
    let x = dev.alloc::<u16>(3 * 256, "test X").unwrap();
    let mut y = dev.alloc::<u16>(3 * 64, "test Y").unwrap();
    let mut ws = W4a16Workspace::default();
    let opts = W4a16Options::default();
    match w4a16_grouped_matmul(&dev, &x, &routing, &experts, &mut y, ActDtype::Bf16, &opts, &mut ws) {
        Err(ForgeError::Shape(m)) => assert!(m.contains("3 experts, the weight 2"), "{m}"),
        other => panic!("routing for 3 experts: {other:?}"),
    }
    let routing = ExpertRouting::new(&dev, &[0, 2, 4]).unwrap();
    match w4a16_grouped_matmul(&dev, &x, &routing, &experts, &mut y, ActDtype::Bf16, &opts, &mut ws) {
        Err(ForgeError::Shape(m)) => assert!(m.contains("Y 192 for 4×64"), "{m}"),
        other => panic!("Y too short: {other:?}"),
    }
    // No rows: nothing to launch.
    let routing = ExpertRouting::new(&dev, &[0, 0, 0]).unwrap();
    assert_eq!(
        w4a16_grouped_matmul(&dev, &x, &routing, &experts, &mut y, ActDtype::Bf16, &opts, &mut ws).unwrap(),
        None
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..proptest::prelude::ProptestConfig::default() })]

    /// The grouped launch on random exactly summable cases (any f32 order is exact, so it must
    /// return `round_T(exact)` bit for bit): 1–9 experts of 0–150 rows each (empty experts,
    /// several row blocks per expert), random `n` and `k` tails, group sizes 32–1024, both
    /// types, random split-K factors, every skinny build and (experts of more than 64 rows,
    /// compute capability 9.0) the `wgmma` kernel; 4-bit experts, or 5–8-bit ones, which
    /// every option set must run on the 8-bit skinny kernel's grouped build.
    #[test]
    fn gpu_grouped_matmul_is_exact_on_random_routings(
        rows in proptest::collection::vec(proptest::prop_oneof![proptest::strategy::Just(0usize), 1usize..=150], 1..=9),
        n in 1usize..400,
        k8 in 1usize..200,
        gs_units in proptest::prop_oneof![1usize..=8, proptest::strategy::Just(32usize)],
        bits in proptest::prop_oneof![proptest::strategy::Just(4u32), 5u32..=8],
        f16 in proptest::bool::ANY,
        splits in proptest::option::of(1u32..=32),
        kernel in proptest::sample::select(GROUPED_KERNELS.to_vec()),
        seed in proptest::num::u64::ANY,
    ) {
        let Some(dev) = common::gpu_or_skip("gpu_grouped_matmul_is_exact_on_random_routings") else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let (k, gs) = (8 * k8, 32 * gs_units);
        let dt = if f16 { ActDtype::F16 } else { ActDtype::Bf16 };
        let (offsets, m, packed, x) = exact_grouped_case(&rows, n, k, gs, bits, &mut rng);
        let experts = DeviceExperts::upload(&dev, &packed).unwrap();
        let opts = W4a16Options { overlap_prior_kernel: false, ..kernel.options(splits) };
        let (got, plan) = grouped_host(&dev, &x, &offsets, &experts, dt, &opts);
        let want = round_to_act(&w4a16_grouped_matmul_cpu(x.view(), &offsets, &packed, dt).unwrap(), dt);
        proptest::prop_assert_eq!(plan.is_none(), m == 0);
        if let (Some(plan), true) = (plan, bits > 4) {
            let tf = ExpertTasks::new(&offsets).unwrap().rows_per_task as u32 / 8;
            proptest::prop_assert_eq!(plan.kernel, FusedKernel::SkinnyW8 { tf });
        }
        assert_bits_equal(&got, &want, &format!("{bits} bits rows {rows:?} {dt:?} {n}×{k} gs {gs} {plan:?}"));
    }
}

/// Uploads `offsets` as the u32 a GPU router would leave.
fn device_offsets(dev: &GpuDevice, offsets: &[usize]) -> CudaSlice<u32> {
    let o: Vec<u32> = offsets.iter().map(|&v| v as u32).collect();
    let mut d = dev.alloc::<u32>(o.len(), "test offsets").unwrap();
    dev.stream().memcpy_htod(&o, &mut d).unwrap();
    d
}

/// `X` of `dt` on the device and a `Y` of `rows × n` filled with 0xffff (NaN), for the
/// device-routing tests: rows past the routed ones must stay so.
fn device_xy(
    dev: &GpuDevice,
    x: &Array2<f32>,
    rows: usize,
    n: usize,
    dt: ActDtype,
) -> (CudaSlice<u16>, CudaSlice<u16>) {
    let stream = dev.stream();
    let mut xh: Vec<u16> = x.iter().map(|&v| dt.bits(v)).collect();
    xh.resize(rows * x.ncols(), dt.bits(0.0));
    let mut xd = dev.alloc::<u16>(xh.len().max(1), "test X").unwrap();
    stream.memcpy_htod(&xh, &mut xd.slice_mut(0..xh.len())).unwrap();
    let mut yd = dev.alloc::<u16>((rows * n).max(1), "test Y").unwrap();
    stream.memcpy_htod(&vec![0xffffu16; (rows * n).max(1)], &mut yd).unwrap();
    (xd, yd)
}

/// `Y`'s first `m` rows as values, and whether every element after them is still 0xffff.
fn download_y(dev: &GpuDevice, y: &CudaSlice<u16>, m: usize, n: usize, dt: ActDtype) -> (Array2<f32>, bool) {
    let yb = dev.stream().clone_dtoh(y).unwrap();
    dev.synchronize().unwrap();
    let got = Array2::from_shape_vec((m, n), yb[..m * n].iter().map(|&b| dt.value(b)).collect()).unwrap();
    (got, yb[m * n..].iter().all(|&b| b == 0xffff))
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..proptest::prelude::ProptestConfig::default() })]

    /// A routing built on the device from offsets on the device: its skinny table is the
    /// host's cut of the same offsets (by expert, then row) followed by empty slots up to
    /// [`max_tasks`]; the launch over it (capacity up to 40 rows more than routed, a row
    /// hint from a quarter of the largest expert's rows to twice them: below them, an expert
    /// takes more row blocks) returns `round_T(exact)` bit for bit on exactly summable inputs, every skinny
    /// build and `wgmma`, random splits, and leaves the rows past the routed ones untouched.
    #[test]
    fn gpu_device_routing_is_exact_and_builds_the_host_table(
        rows in proptest::collection::vec(proptest::prop_oneof![proptest::strategy::Just(0usize), 1usize..=80], 1..=9),
        extra in 0usize..40,
        hint_num in 1usize..=8,
        n in 1usize..300,
        k8 in 1usize..150,
        gs_units in proptest::prop_oneof![1usize..=8, proptest::strategy::Just(32usize)],
        f16 in proptest::bool::ANY,
        splits in proptest::option::of(1u32..=16),
        kernel in proptest::sample::select(GROUPED_KERNELS.to_vec()),
        seed in proptest::num::u64::ANY,
    ) {
        let Some(dev) = common::gpu_or_skip("gpu_device_routing_is_exact_and_builds_the_host_table") else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        let (k, gs) = (8 * k8, 32 * gs_units);
        let dt = if f16 { ActDtype::F16 } else { ActDtype::Bf16 };
        let (offsets, m, packed, x) = exact_grouped_case(&rows, n, k, gs, 4, &mut rng);
        let capacity = (m + extra).max(1);
        let largest = rows.iter().copied().max().unwrap_or(0).max(1);
        let hint = (largest * hint_num / 4).max(1);
        let experts = DeviceExperts::upload(&dev, &packed).unwrap();
        let mut routing = ExpertRouting::on_device(&dev, rows.len(), capacity, hint).unwrap();
        routing.build_from(&dev, &device_offsets(&dev, &offsets)).unwrap();
        routing.device_status(&dev).unwrap();
        let table = routing.download_tasks(&dev).unwrap();
        let height = 8 * hint.min(capacity).clamp(1, 64).div_ceil(8).next_power_of_two();
        let cut = ExpertTasks::new(&offsets).unwrap().tasks_of(height);
        proptest::prop_assert_eq!(table.len(), max_tasks(capacity, rows.len(), height));
        proptest::prop_assert_eq!(&table[..cut.len()], &cut[..]);
        proptest::prop_assert!(table[cut.len()..].iter().all(|t| *t == [0, 0, 0]));

        let (xd, mut yd) = device_xy(&dev, &x, capacity, n, dt);
        let opts = W4a16Options { overlap_prior_kernel: false, ..kernel.options(splits) };
        let mut ws = W4a16Workspace::default();
        let plan = w4a16_grouped_matmul(&dev, &xd, &routing, &experts, &mut yd, dt, &opts, &mut ws).unwrap().unwrap();
        let (got, untouched) = download_y(&dev, &yd, m, n, dt);
        let want = round_to_act(&w4a16_grouped_matmul_cpu(x.view(), &offsets, &packed, dt).unwrap(), dt);
        let what = format!("rows {rows:?} capacity {capacity} hint {hint} {dt:?} {n}×{k} gs {gs} {plan:?}");
        assert_bits_equal(&got, &want, &what);
        proptest::prop_assert!(untouched, "{}: a row past the routed ones was written", what);
    }
}

/// Offsets the build kernel finds invalid leave every task empty: the launch writes nothing,
/// and `device_status` names the fault. Bad arguments are typed errors on the host.
#[test]
fn gpu_device_routing_rejects_bad_offsets() {
    let Some(dev) = common::gpu_or_skip("gpu_device_routing_rejects_bad_offsets") else { return };
    let mut rng = StdRng::seed_from_u64(23);
    let (n, k) = (64, 256);
    let packed: Vec<PackedWeight> = (0..3).map(|_| exact_case(0, n, k, 128, -2, 1.0, 0, 4, &mut rng).1).collect();
    let experts = DeviceExperts::upload(&dev, &packed).unwrap();
    let x = Array2::from_shape_fn((12, k), |_| rng.gen_range(-3i32..=3) as f32);
    let opts = W4a16Options::default();
    let mut ws = W4a16Workspace::default();
    for (offsets, says) in [
        (vec![1usize, 4, 8, 12], "the first offset is not 0"),
        (vec![0, 6, 5, 12], "expert 1 ends before it starts"),
        (vec![0, 4, 8, 13], "end past the 12 rows"),
    ] {
        let mut routing = ExpertRouting::on_device(&dev, 3, 12, 12).unwrap();
        routing.build_from(&dev, &device_offsets(&dev, &offsets)).unwrap();
        let (xd, mut yd) = device_xy(&dev, &x, 12, n, ActDtype::Bf16);
        w4a16_grouped_matmul(&dev, &xd, &routing, &experts, &mut yd, ActDtype::Bf16, &opts, &mut ws).unwrap();
        let (_, untouched) = download_y(&dev, &yd, 0, n, ActDtype::Bf16);
        assert!(untouched, "{offsets:?}: the launch wrote Y");
        match routing.device_status(&dev) {
            Err(ForgeError::Shape(m)) => assert!(m.contains(says), "{offsets:?}: {m}"),
            other => panic!("{offsets:?}: {other:?}"),
        }
        assert!(routing.download_tasks(&dev).unwrap().iter().all(|t| *t == [0, 0, 0]));
    }
    for (experts, capacity, bound) in
        [(0, 8, 8), (fourbit_forge::runtime::MAX_DEVICE_ROUTING_EXPERTS + 1, 8, 8), (3, 0, 8), (3, 8, 0)]
    {
        assert!(
            matches!(ExpertRouting::on_device(&dev, experts, capacity, bound), Err(ForgeError::Shape(_))),
            "{experts} experts, {capacity} rows, bound {bound}"
        );
    }
    let mut routing = ExpertRouting::on_device(&dev, 3, 12, 12).unwrap();
    let (xd, mut yd) = device_xy(&dev, &x, 12, n, ActDtype::Bf16);
    match w4a16_grouped_matmul(&dev, &xd, &routing, &experts, &mut yd, ActDtype::Bf16, &opts, &mut ws) {
        Err(ForgeError::Shape(m)) => assert!(m.contains("no offsets yet"), "{m}"),
        other => panic!("unbuilt routing: {other:?}"),
    }
    match routing.build_from(&dev, &device_offsets(&dev, &[0, 4, 8])) {
        Err(ForgeError::Shape(m)) => assert!(m.contains("3 offsets for 3 experts"), "{m}"),
        other => panic!("short offsets: {other:?}"),
    }
    let mut host = ExpertRouting::new(&dev, &[0, 4, 8, 12]).unwrap();
    assert!(matches!(host.build_from(&dev, &device_offsets(&dev, &[0, 4, 8, 12])), Err(ForgeError::Shape(_))));
}

/// The decode step a GPU router runs: the table build and the grouped launch captured once
/// in a CUDA graph, replayed after each new routing is written into the same offsets buffer
/// (as a router kernel would). Each replay must equal `round_T(exact)` for its routing.
#[test]
fn gpu_device_routing_replays_in_a_graph() {
    let Some(dev) = common::gpu_or_skip("gpu_device_routing_replays_in_a_graph") else { return };
    let mut rng = StdRng::seed_from_u64(24);
    let (e_count, tokens, top_k, n, k) = (16, 4, 4, 320, 512);
    let dt = ActDtype::Bf16;
    let packed: Vec<PackedWeight> = (0..e_count).map(|_| exact_case(0, n, k, 64, -2, 1.0, 0, 4, &mut rng).1).collect();
    let experts = DeviceExperts::upload(&dev, &packed).unwrap();
    let rows = tokens * top_k;
    let x = Array2::from_shape_fn((rows, k), |_| rng.gen_range(-3i32..=3) as f32);
    let (xd, mut yd) = device_xy(&dev, &x, rows, n, dt);
    let mut offsets_d = dev.alloc::<u32>(e_count + 1, "test offsets").unwrap();
    let mut routing = ExpertRouting::on_device(&dev, e_count, rows, tokens).unwrap();
    let opts = W4a16Options::default();
    let mut ws = W4a16Workspace::default();
    let routings: Vec<Vec<usize>> = (0..4)
        .map(|_| {
            let mut per = vec![0usize; e_count];
            for _ in 0..tokens {
                let mut picked: Vec<usize> = Vec::new();
                while picked.len() < top_k {
                    let e = rng.gen_range(0..e_count);
                    if !picked.contains(&e) {
                        picked.push(e);
                    }
                }
                picked.iter().for_each(|&e| per[e] += 1);
            }
            expert_offsets(&per)
        })
        .collect();
    let upload = |o: &[usize], d: &mut CudaSlice<u32>| {
        let v: Vec<u32> = o.iter().map(|&r| r as u32).collect();
        dev.stream().memcpy_htod(&v, d).unwrap();
    };
    // Once outside the capture: the workspace grows here.
    upload(&routings[0], &mut offsets_d);
    routing.build_from(&dev, &offsets_d).unwrap();
    w4a16_grouped_matmul(&dev, &xd, &routing, &experts, &mut yd, dt, &opts, &mut ws).unwrap();
    dev.synchronize().unwrap();
    let stream = dev.stream().clone();
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).unwrap();
    routing.build_from(&dev, &offsets_d).unwrap();
    let plan = w4a16_grouped_matmul(&dev, &xd, &routing, &experts, &mut yd, dt, &opts, &mut ws).unwrap();
    let graph = stream.end_capture(CUgraphInstantiate_flags(0)).unwrap().unwrap();
    for (i, o) in routings.iter().enumerate() {
        upload(o, &mut offsets_d);
        stream.memcpy_htod(&vec![0xffffu16; rows * n], &mut yd).unwrap();
        graph.launch().unwrap();
        routing.device_status(&dev).unwrap();
        let (got, _) = download_y(&dev, &yd, rows, n, dt);
        let want = round_to_act(&w4a16_grouped_matmul_cpu(x.view(), o, &packed, dt).unwrap(), dt);
        assert_bits_equal(&got, &want, &format!("replay {i}, offsets {o:?}, {plan:?}"));
    }
}

/// Top-k ids for `tokens` tokens over `experts`: distinct per token (as a router's top-k),
/// or drawn with repeats; `skew` sends most picks to the first few experts (one busy
/// expert over several row blocks).
fn random_topk_ids(
    tokens: usize,
    top_k: usize,
    experts: usize,
    distinct: bool,
    skew: bool,
    rng: &mut StdRng,
) -> Vec<u32> {
    let mut ids = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let mut picked: Vec<u32> = Vec::with_capacity(top_k);
        while picked.len() < top_k {
            let e =
                if skew && rng.gen_bool(0.7) { rng.gen_range(0..experts.min(3)) } else { rng.gen_range(0..experts) };
            if !distinct || !picked.contains(&(e as u32)) {
                picked.push(e as u32);
            }
        }
        ids.extend(picked);
    }
    ids
}

/// A top-k step on the host: the route, the gathered rows, the experts' outputs
/// (`round_T(exact)`) and the combined outputs, as bit patterns.
struct TopkStepCpu {
    route: fourbit_forge::runtime::TopkRoute,
    x: Vec<u16>,
    y: Vec<u16>,
    out: Vec<u16>,
}

fn topk_step_cpu(
    hidden: &Array2<f32>,
    ids: &[u32],
    weights: &[f32],
    top_k: usize,
    packed: &[PackedWeight],
    dt: ActDtype,
) -> TopkStepCpu {
    let (k, n) = (hidden.ncols(), packed[0].dims.n);
    let route = fourbit_forge::runtime::topk_route_cpu(ids, top_k, packed.len()).unwrap();
    let pairs = ids.len();
    let xs = Array2::from_shape_fn((pairs, k), |(r, c)| hidden[[route.row_token[r] as usize, c]]);
    let y = round_to_act(&w4a16_grouped_matmul_cpu(xs.view(), &route.offsets, packed, dt).unwrap(), dt);
    let y: Vec<u16> = y.iter().map(|&v| dt.bits(v)).collect();
    let out = fourbit_forge::runtime::topk_combine_cpu(&y, n, &route.pair_row, weights, top_k, dt).unwrap();
    let x = xs.iter().map(|&v| dt.bits(v)).collect();
    TopkStepCpu { route, x, y, out }
}

/// Device buffers of one top-k step: hidden states, ids, weights, and the sorted `X`, `Y`
/// and the output filled with 0xffff (a value the step should not write shows).
struct TopkBuffers {
    hidden: CudaSlice<u16>,
    ids: CudaSlice<u32>,
    weights: CudaSlice<f32>,
    x: CudaSlice<u16>,
    y: CudaSlice<u16>,
    out: CudaSlice<u16>,
}

impl TopkBuffers {
    fn new(dev: &GpuDevice, capacity: usize, top_k: usize, k: usize, n: usize) -> Self {
        let pairs = (capacity * top_k).max(1);
        let nan = |len: usize| {
            let mut d = dev.alloc::<u16>(len, "test buffer").unwrap();
            dev.stream().memcpy_htod(&vec![0xffffu16; len], &mut d).unwrap();
            d
        };
        TopkBuffers {
            hidden: nan(capacity.max(1) * k),
            ids: dev.alloc::<u32>(pairs, "test ids").unwrap(),
            weights: dev.alloc::<f32>(pairs, "test weights").unwrap(),
            x: nan(pairs * k),
            y: nan(pairs * n),
            out: nan(capacity.max(1) * n),
        }
    }

    fn upload(&mut self, dev: &GpuDevice, hidden: &Array2<f32>, ids: &[u32], weights: &[f32], dt: ActDtype) {
        let s = dev.stream();
        let h: Vec<u16> = hidden.iter().map(|&v| dt.bits(v)).collect();
        if !h.is_empty() {
            s.memcpy_htod(&h, &mut self.hidden.slice_mut(0..h.len())).unwrap();
            s.memcpy_htod(ids, &mut self.ids.slice_mut(0..ids.len())).unwrap();
            s.memcpy_htod(weights, &mut self.weights.slice_mut(0..weights.len())).unwrap();
        }
    }

    /// The first `len` values of `d`, and whether the rest is still 0xffff.
    fn head(dev: &GpuDevice, d: &CudaSlice<u16>, len: usize) -> (Vec<u16>, bool) {
        let v = dev.stream().clone_dtoh(d).unwrap();
        dev.synchronize().unwrap();
        (v[..len].to_vec(), v[len..].iter().all(|&b| b == 0xffff))
    }
}

/// One whole step on the device: route, gather, grouped launch, combine.
#[allow(clippy::too_many_arguments)]
fn topk_step_gpu(
    dev: &GpuDevice,
    routing: &mut TopkRouting,
    b: &mut TopkBuffers,
    tokens: usize,
    experts: &DeviceExperts,
    dt: ActDtype,
    opts: &W4a16Options,
    ws: &mut W4a16Workspace,
) -> Option<W4a16Plan> {
    let (k, n) = (experts.dims.k, experts.dims.n);
    routing.route(dev, &b.ids, tokens).unwrap();
    routing.gather(dev, &b.hidden, k, &mut b.x).unwrap();
    let plan = w4a16_grouped_matmul(dev, &b.x, routing.expert_routing(), experts, &mut b.y, dt, opts, ws).unwrap();
    routing.combine(dev, &b.y, n, &b.weights, &mut b.out, dt).unwrap();
    plan
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..proptest::prelude::ProptestConfig::default() })]

    /// A mixture-of-experts step from top-k ids on the device: the sorted rows equal the CPU
    /// route (by expert, then token, then slot), the gathered `X` the host's gather, the
    /// experts' outputs `round_T(exact)` on exactly summable inputs, the combined outputs the
    /// CPU's f32 fma chain, all bit for bit; nothing past the routed rows or tokens is
    /// written. 1–1024 experts (1024: the route kernel's most, several experts per thread),
    /// 0–70 tokens below a capacity, top-k 1–8, ids distinct or repeated, skewed to a few
    /// experts or spread, outputs up to 2111 columns (both combine paths, several chunks per
    /// thread), every grouped kernel.
    #[test]
    fn gpu_topk_step_is_exact(
        experts_n in proptest::prop_oneof![1usize..=40, 250usize..=300, proptest::strategy::Just(1024usize)],
        top_k_want in 1usize..=8,
        tokens in 0usize..=70,
        extra in 0usize..5,
        distinct in proptest::bool::ANY,
        skew in proptest::bool::ANY,
        n_small in 1usize..64,
        n_wide in proptest::bool::weighted(0.25),
        k8 in 1usize..=8,
        gs_units in 1usize..=4,
        f16 in proptest::bool::ANY,
        kernel in proptest::sample::select(GROUPED_KERNELS.to_vec()),
        seed in proptest::num::u64::ANY,
    ) {
        let Some(dev) = common::gpu_or_skip("gpu_topk_step_is_exact") else { return Ok(()) };
        let mut rng = StdRng::seed_from_u64(seed);
        // Wide outputs (more than 8 columns per combine thread: a second pass) on few experts.
        let n = if n_wide && experts_n <= 40 { 2048 + n_small } else { n_small };
        let (k, gs) = (8 * k8, 32 * gs_units);
        let dt = if f16 { ActDtype::F16 } else { ActDtype::Bf16 };
        let top_k = top_k_want.min(experts_n);
        let capacity = (tokens + extra).max(1);
        let packed: Vec<PackedWeight> = (0..experts_n).map(|_| exact_case(0, n, k, gs, -2, 1.0, 0, 4, &mut rng).1).collect();
        let experts = DeviceExperts::upload(&dev, &packed).unwrap();
        let hidden = Array2::from_shape_fn((tokens, k), |_| rng.gen_range(-3i32..=3) as f32);
        let ids = random_topk_ids(tokens, top_k, experts_n, distinct, skew, &mut rng);
        let weights: Vec<f32> = (0..tokens * top_k).map(|_| StandardNormal.sample(&mut rng)).collect();
        let want = topk_step_cpu(&hidden, &ids, &weights, top_k, &packed, dt);

        let mut routing = TopkRouting::new(&dev, experts_n, capacity, top_k, None).unwrap();
        let mut b = TopkBuffers::new(&dev, capacity, top_k, k, n);
        b.upload(&dev, &hidden, &ids, &weights, dt);
        let opts = W4a16Options { overlap_prior_kernel: false, ..kernel.options(None) };
        let mut ws = W4a16Workspace::default();
        let plan = topk_step_gpu(&dev, &mut routing, &mut b, tokens, &experts, dt, &opts, &mut ws);
        routing.device_status(&dev).unwrap();
        let what = format!("{experts_n} experts top-{top_k}, {tokens} tokens (capacity {capacity}), {dt:?} {n}×{k} gs {gs} {plan:?}");
        proptest::prop_assert_eq!(&routing.download(&dev).unwrap(), &want.route, "{}", what);
        let pairs = tokens * top_k;
        for (name, d, len, host) in [("X", &b.x, pairs * k, &want.x), ("Y", &b.y, pairs * n, &want.y), ("out", &b.out, tokens * n, &want.out)] {
            let (got, untouched) = TopkBuffers::head(&dev, d, len);
            if let Some(i) = got.iter().zip(host.iter()).position(|(g, h)| g != h) {
                proptest::prop_assert!(false, "{}: {} value {} is {:#06x}, expected {:#06x}", what, name, i, got[i], host[i]);
            }
            proptest::prop_assert!(untouched, "{}: {} was written past its {} values", what, name, len);
        }
    }
}

/// An id naming no expert is found on the device: the step gathers, multiplies and combines
/// nothing, the offsets are all 0, and `device_status` names the token and slot. Bad
/// arguments are typed errors on the host.
#[test]
fn gpu_topk_routing_rejects_bad_ids() {
    let Some(dev) = common::gpu_or_skip("gpu_topk_routing_rejects_bad_ids") else { return };
    let mut rng = StdRng::seed_from_u64(25);
    let (e_count, tokens, top_k, n, k) = (6, 4, 2, 64, 128);
    let dt = ActDtype::Bf16;
    let packed: Vec<PackedWeight> = (0..e_count).map(|_| exact_case(0, n, k, 64, -2, 1.0, 0, 4, &mut rng).1).collect();
    let experts = DeviceExperts::upload(&dev, &packed).unwrap();
    let hidden = Array2::from_shape_fn((tokens, k), |_| rng.gen_range(-3i32..=3) as f32);
    let mut ids = random_topk_ids(tokens, top_k, e_count, true, false, &mut rng);
    ids[2 * top_k + 1] = e_count as u32;
    ids[3 * top_k] = 1000;
    let weights = vec![0.5f32; tokens * top_k];
    let mut routing = TopkRouting::new(&dev, e_count, tokens, top_k, None).unwrap();
    let mut b = TopkBuffers::new(&dev, tokens, top_k, k, n);
    b.upload(&dev, &hidden, &ids, &weights, dt);
    let mut ws = W4a16Workspace::default();
    topk_step_gpu(&dev, &mut routing, &mut b, tokens, &experts, dt, &W4a16Options::default(), &mut ws);
    match routing.device_status(&dev) {
        Err(ForgeError::Shape(m)) => assert!(m.contains("token 2 slot 1 names an expert ≥ 6"), "{m}"),
        other => panic!("bad id: {other:?}"),
    }
    assert!(routing.download(&dev).unwrap().offsets.iter().all(|&o| o == 0));
    for (name, d) in [("X", &b.x), ("Y", &b.y), ("out", &b.out)] {
        assert!(TopkBuffers::head(&dev, d, 0).1, "{name} was written");
    }

    for (e, cap, kk) in
        [(0, 4, 1), (fourbit_forge::runtime::MAX_TOPK_EXPERTS + 1, 4, 1), (4, 4, 5), (4, 0, 1), (4, 4, 0)]
    {
        assert!(matches!(TopkRouting::new(&dev, e, cap, kk, None), Err(ForgeError::Shape(_))), "{e} {cap} {kk}");
    }
    let mut fresh = TopkRouting::new(&dev, e_count, tokens, top_k, None).unwrap();
    match fresh.gather(&dev, &b.hidden, k, &mut b.x) {
        Err(ForgeError::Shape(m)) => assert!(m.contains("no ids routed yet"), "{m}"),
        other => panic!("gather before route: {other:?}"),
    }
    assert!(matches!(fresh.route(&dev, &b.ids, tokens + 1), Err(ForgeError::Shape(_))));
    fresh.route(&dev, &b.ids, tokens).unwrap();
    assert!(matches!(fresh.gather(&dev, &b.hidden, 12, &mut b.x), Err(ForgeError::Shape(_))));
    let short = dev.alloc::<f32>(tokens * top_k - 1, "short weights").unwrap();
    assert!(matches!(fresh.combine(&dev, &b.y, n, &short, &mut b.out, dt), Err(ForgeError::Shape(_))));
}

/// The decode step a GPU router runs, captured once in a CUDA graph (route, table build,
/// gather, grouped launch, combine) and replayed after new ids, weights and hidden states
/// are written into the same buffers: each replay equals the CPU step bit for bit.
#[test]
fn gpu_topk_step_replays_in_a_graph() {
    let Some(dev) = common::gpu_or_skip("gpu_topk_step_replays_in_a_graph") else { return };
    let mut rng = StdRng::seed_from_u64(26);
    let (e_count, tokens, top_k, n, k) = (32, 5, 4, 2056, 256);
    let dt = ActDtype::F16;
    let packed: Vec<PackedWeight> = (0..e_count).map(|_| exact_case(0, n, k, 128, -2, 1.0, 0, 4, &mut rng).1).collect();
    let experts = DeviceExperts::upload(&dev, &packed).unwrap();
    let mut routing = TopkRouting::new(&dev, e_count, tokens, top_k, None).unwrap();
    let mut b = TopkBuffers::new(&dev, tokens, top_k, k, n);
    let opts = W4a16Options::default();
    let mut ws = W4a16Workspace::default();
    let steps: Vec<(Array2<f32>, Vec<u32>, Vec<f32>)> = (0..4)
        .map(|i| {
            let hidden = Array2::from_shape_fn((tokens, k), |_| rng.gen_range(-3i32..=3) as f32);
            let ids = random_topk_ids(tokens, top_k, e_count, true, i % 2 == 1, &mut rng);
            let weights = (0..tokens * top_k).map(|_| rng.gen_range(0.0f32..1.0)).collect();
            (hidden, ids, weights)
        })
        .collect();
    // Once outside the capture: the workspace grows here.
    b.upload(&dev, &steps[0].0, &steps[0].1, &steps[0].2, dt);
    topk_step_gpu(&dev, &mut routing, &mut b, tokens, &experts, dt, &opts, &mut ws);
    dev.synchronize().unwrap();
    let stream = dev.stream().clone();
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).unwrap();
    let plan = topk_step_gpu(&dev, &mut routing, &mut b, tokens, &experts, dt, &opts, &mut ws);
    let graph = stream.end_capture(CUgraphInstantiate_flags(0)).unwrap().unwrap();
    for (i, (hidden, ids, weights)) in steps.iter().enumerate() {
        b.upload(&dev, hidden, ids, weights, dt);
        stream.memcpy_htod(&vec![0xffffu16; tokens * n], &mut b.out).unwrap();
        graph.launch().unwrap();
        routing.device_status(&dev).unwrap();
        let want = topk_step_cpu(hidden, ids, weights, top_k, &packed, dt);
        let (got, _) = TopkBuffers::head(&dev, &b.out, tokens * n);
        assert!(got == want.out, "replay {i}, ids {ids:?}, {plan:?}: the combined outputs differ");
    }
}
