//! Packing on the GPU against the CPU reference (`src/pack/cpu.rs`), bit for bit: random
//! shapes with tails (columns not a multiple of 32, 16 or 4; rows not a multiple of a tile),
//! every bit width 2..=8, both layouts (`Rows`: compressed-tensors `weight_packed`;
//! `Transposed`: GPTQ `qweight`), every tile width the launcher picks, out-of-range codes, and
//! the engine's packed download. Skips (printing why) without a GPU.

mod common;

use fourbit_forge::device::{DeviceBuffer, DeviceBufferMut};
use fourbit_forge::hessian::{HessianAccumulator, PreStepConfig};
use fourbit_forge::pack::{launch_pack_into, pack_device, pack_gpu, tile_chunks, PackLayout};
use fourbit_forge::quantize::{HessianInput, LayerJob, QuantEngine};
use fourbit_forge::{ForgeError, GridConfig, ScaleDtype, WeightView};
use ndarray::Array2;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

const LAYOUTS: [PackLayout; 2] = [PackLayout::Rows, PackLayout::Transposed];

/// Random codes in `0..2^bits`, with all-zero and all-max rows mixed in.
fn codes(rows: usize, cols: usize, bits: u32, seed: u64) -> Array2<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let max = ((1u32 << bits) - 1) as u8;
    Array2::from_shape_fn((rows, cols), |(r, _)| match r % 7 {
        3 => 0,
        5 => max,
        _ => rng.gen_range(0..=max),
    })
}

fn assert_same(dev: &fourbit_forge::device::GpuDevice, c: &Array2<u8>, bits: u32, layout: PackLayout, what: &str) {
    let cpu = layout.pack_cpu(c.view(), bits).unwrap();
    let gpu = pack_gpu(dev, c.view(), bits, layout).unwrap();
    assert_eq!(gpu.dim(), cpu.dim(), "{what}: shape");
    if let Some(((i, j), (g, w))) =
        gpu.indexed_iter().zip(cpu.iter()).map(|((ij, g), w)| (ij, (*g, *w))).find(|(_, (g, w))| g != w)
    {
        panic!("{what}: word ({i}, {j}) is {g:#010x}, the reference {w:#010x}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn gpu_packing_is_bit_identical_to_the_cpu_reference(
        rows in 1usize..300,
        cols in 1usize..700,
        whole_chunks in any::<bool>(),
        bits in 2u32..=8,
        seed in any::<u64>(),
    ) {
        let Some(dev) = common::gpu_or_skip("gpu_packing_is_bit_identical_to_the_cpu_reference") else { return Ok(()) };
        // Half the cases in whole 32-code chunks: the launcher's direct kernels.
        let cols = if whole_chunks { cols.div_ceil(32) * 32 } else { cols };
        let c = codes(rows, cols, bits, seed);
        for layout in LAYOUTS {
            assert_same(&dev, &c, bits, layout, &format!("{rows}x{cols} b{bits} {layout:?}"));
        }
    }
}

/// Shapes chosen for the kernels' paths (columns a multiple of 32 take the direct kernels,
/// the rest the tiled ones): every tile width (1, 2, 4, 8 chunks), rows aligned
/// and unaligned to 16 bytes (cols % 16 ≠ 0 takes the unaligned chunk reads), a row shorter
/// than a word, a tail chunk of each length class, and tensors of many tiles (grid-stride).
#[test]
fn gpu_packing_on_the_kernels_edge_shapes() {
    let Some(dev) = common::gpu_or_skip("gpu_packing_on_the_kernels_edge_shapes") else { return };
    let shapes = [
        (1, 1),
        (1, 3),
        (3, 31),
        (2, 32),
        (257, 33),
        (5, 48),
        (33, 64),
        (7, 65),
        (300, 100),
        (64, 128),
        (31, 129),
        (9, 255),
        (129, 256),
        (40, 257),
        (256, 4096),
        (17, 4100),
        (1000, 1030),
        (4100, 96),
    ];
    for &(rows, cols) in &shapes {
        for bits in 2..=8 {
            let c = codes(rows, cols, bits, (rows * 7919 + cols) as u64 ^ bits as u64);
            for layout in LAYOUTS {
                assert_same(
                    &dev,
                    &c,
                    bits,
                    layout,
                    &format!("{rows}x{cols} b{bits} {layout:?} K{}", tile_chunks(cols)),
                );
            }
        }
    }
}

/// A layer-sized tensor (many blocks per SM, the grid-stride loop) for each layout.
#[test]
fn gpu_packing_of_a_full_size_layer() {
    let Some(dev) = common::gpu_or_skip("gpu_packing_of_a_full_size_layer") else { return };
    for bits in [3u32, 4] {
        let c = codes(4096, 11008, bits, 5);
        for layout in LAYOUTS {
            assert_same(&dev, &c, bits, layout, &format!("4096x11008 b{bits} {layout:?}"));
        }
    }
}

/// A code that does not fit is the CPU's typed error, naming the same row, column and value
/// (the smallest flat index when there are several); a misaligned codes address is refused.
#[test]
fn gpu_packing_reports_out_of_range_codes_like_the_cpu() {
    let Some(dev) = common::gpu_or_skip("gpu_packing_reports_out_of_range_codes_like_the_cpu") else { return };
    // 300 columns: the tiled kernels; 320: the direct ones.
    for (bits, cols) in (2..=7u32).flat_map(|b| [(b, 300usize), (b, 320)]) {
        let mut c = codes(70, cols, bits, 9);
        c[[41, cols - 1]] = 1 << bits;
        c[[12, 77]] = 255;
        c[[12, 200]] = (1 << bits) + 1;
        for layout in LAYOUTS {
            let cpu = match layout.pack_cpu(c.view(), bits) {
                Err(ForgeError::Format(m)) => m,
                other => panic!("b{bits}: the CPU reference must refuse, got {other:?}"),
            };
            assert!(cpu.contains("value 255 at row 12, column 77"), "{cpu}");
            match pack_gpu(&dev, c.view(), bits, layout) {
                Err(ForgeError::Format(m)) => assert_eq!(m, cpu, "b{bits} {layout:?}"),
                other => panic!("b{bits} {layout:?}: expected the CPU's Format error {cpu}, got {other:?}"),
            }
        }
    }
    let c = codes(8, 64, 4, 1);
    let s = dev.stream();
    let d = s.clone_htod(c.as_slice().unwrap()).unwrap();
    let mut words = s.alloc_zeros::<u32>(8 * 8).unwrap();
    let mut flag = s.alloc_zeros::<u64>(1).unwrap();
    let misaligned = forge_kernel_abi::DevPtr::<u8>::from_addr(d.dev_ptr().addr() + 1);
    // SAFETY: refused before any launch (the address is not 16-byte aligned).
    let r = unsafe {
        launch_pack_into(&dev, misaligned, 8, 63, 4, PackLayout::Rows, words.dev_ptr_mut(), flag.dev_ptr_mut())
    };
    assert!(matches!(r, Err(ForgeError::Shape(_))), "{r:?}");
    // The checked device entry point packs what is already there.
    let w = pack_device(&dev, &d, 8, 64, 4, PackLayout::Transposed).unwrap();
    let host = s.clone_dtoh(&w).unwrap();
    let want = PackLayout::Transposed.pack_cpu(c.view(), 4).unwrap();
    assert_eq!(host, want.iter().copied().collect::<Vec<_>>());
}

/// The engine packs on the device when a job asks: the words equal the CPU packing of the
/// codes the same job returns unpacked, for both layouts and scale dtypes, and the download
/// shrinks accordingly.
#[test]
fn engine_returns_packed_words_equal_to_the_cpu_packing_of_its_codes() {
    let Some(dev) = common::gpu_or_skip("engine_returns_packed_words_equal_to_the_cpu_packing_of_its_codes") else {
        return;
    };
    let mut engine = QuantEngine::new(dev).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let (rows, cols) = (192, 640);
    let w = common::randn(rows, cols, &mut rng);
    let x = common::randn(2 * cols, cols, &mut rng);
    let mut acc = HessianAccumulator::new(cols).unwrap();
    acc.update(x.view()).unwrap();
    let h = acc.into_h();
    for (bits, scale_dtype) in
        [(4u32, ScaleDtype::BF16), (3, ScaleDtype::F16), (8, ScaleDtype::F32), (2, ScaleDtype::BF16)]
    {
        let cfg = GridConfig { bits, group_size: 64, scale_dtype, ..GridConfig::default() };
        let mut job = LayerJob::new(WeightView::F32(w.view()), HessianInput::Host(h.view()), &cfg);
        job.pre_step = PreStepConfig { act_order: true, ..PreStepConfig::default() };
        let before = engine.stats().download_bytes;
        let plain = engine.quantize(&job).unwrap();
        let plain_bytes = engine.stats().download_bytes - before;
        let codes = &plain.weights[0].codes;
        assert_eq!(codes.dim(), (rows, cols));
        assert!(plain.weights[0].packed.is_none());
        for layout in LAYOUTS {
            job.pack = Some(layout);
            let before = engine.stats().download_bytes;
            let out = engine.quantize(&job).unwrap();
            let packed_bytes = engine.stats().download_bytes - before;
            let q = &out.weights[0];
            assert_eq!(q.codes.dim(), (0, 0), "packed jobs return no u8 codes");
            assert_eq!(q.grid, plain.weights[0].grid);
            let p = q.packed.as_ref().unwrap();
            assert_eq!((p.layout, p.bits, p.rows, p.cols), (layout, bits, rows, cols));
            assert_eq!(p.words, layout.pack_cpu(codes.view(), bits).unwrap(), "b{bits} {layout:?}");
            assert_eq!(&p.unpack().unwrap(), codes);
            let saved = (rows * cols) as u64 - (p.words.len() * 4) as u64;
            assert_eq!(plain_bytes - packed_bytes, saved, "b{bits} {layout:?}: download bytes");
        }
        job.pack = None;
    }
}
