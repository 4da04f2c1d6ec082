//! End-to-end proof of the Rust → PTX → cudarc pipeline: the `qmeta_decode` kernel against
//! the CPU decode, bit for bit, over every Q8.8 value. Skips (printing why) without a GPU.

mod common;

use fourbit_forge::grid::{decode_qmeta_cpu, decode_qmeta_gpu};
use ndarray::Array3;

#[test]
fn gpu_qmeta_decode_matches_cpu_on_every_q88() {
    let Some(dev) = common::gpu_or_skip("gpu_qmeta_decode_matches_cpu_on_every_q88") else { return };
    // All 65536 log2 scales, with zero points and flags varying independently of them.
    let bytes: Vec<u8> = (0..65536u32)
        .flat_map(|i| {
            let q = (i as u16).to_le_bytes();
            [q[0], q[1], (i.wrapping_mul(2_654_435_761) >> 24) as u8, (i & 1) as u8]
        })
        .collect();
    let qmeta = Array3::from_shape_vec((256, 256, 4), bytes).unwrap();
    let cpu = decode_qmeta_cpu(qmeta.view()).unwrap();
    let gpu = decode_qmeta_gpu(&dev, qmeta.view()).unwrap();
    let mismatches = cpu.scale.iter().zip(gpu.scale.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(mismatches, 0, "GPU decode differs from CPU in {mismatches} of 65536 scales");
    assert_eq!(cpu.qzero, gpu.qzero);
}

#[test]
fn the_embedded_ptx_targets_sm80_and_is_self_contained() {
    let ptx = fourbit_forge::device::KERNELS_PTX;
    assert!(ptx.contains(".target sm_80"), "PTX must run on sm_80 and newer");
    assert!(!ptx.lines().any(|l| l.starts_with(".extern .func")), "PTX has unresolved functions");
}

/// Every kernel of forge-kernel-abi's table is in its module's PTX with the parameter kinds
/// of its argument struct, and neither module has another entry (the build checks the same;
/// a test keeps it visible). The tests build with the `test-kernels` feature, so those are in
/// the baseline module too.
#[test]
fn every_kernel_in_the_abi_table_is_in_the_ptx_with_its_parameters() {
    use forge_kernel_abi::PtxModule;
    for (module, ptx) in [
        (PtxModule::Base, fourbit_forge::device::KERNELS_PTX),
        (PtxModule::Hopper, fourbit_forge::device::KERNELS_HOPPER_PTX),
    ] {
        let rows: Vec<_> = forge_kernel_abi::KERNELS.iter().filter(|k| k.module == module).collect();
        let expected: Vec<(&str, Vec<&str>)> =
            rows.iter().map(|k| (k.name, k.params.iter().map(|p| p.ptx()).collect())).collect();
        assert!(!expected.is_empty(), "{module:?}: no kernels");
        forge_ptx_build::check_entries(ptx, &expected).unwrap();
        // Launch bounds from the table made it into the PTX.
        for k in rows {
            if let Some((threads, blocks)) = k.launch_bounds {
                let at = ptx.find(&format!(".entry {}(", k.name)).unwrap();
                let tail = &ptx[at..];
                let body = tail.find('{').unwrap();
                assert!(tail[..body].contains(&format!(".maxntid {threads}, 1, 1")), "{}", k.name);
                assert!(tail[..body].contains(&format!(".minnctapersm {blocks}")), "{}", k.name);
            }
        }
    }
    assert!(
        forge_kernel_abi::KERNELS.iter().any(|k| k.name == "fast_division" && k.module == PtxModule::Base),
        "tests build with the test kernels"
    );
}

#[test]
fn the_hopper_ptx_targets_sm90a_and_is_self_contained() {
    let ptx = fourbit_forge::device::KERNELS_HOPPER_PTX;
    assert!(ptx.contains(".target sm_90a"), "wgmma needs sm_90a");
    assert!(ptx.contains("wgmma.mma_async"), "the Hopper module is the wgmma kernels");
    assert!(!ptx.lines().any(|l| l.starts_with(".extern .func")), "PTX has unresolved functions");
}
