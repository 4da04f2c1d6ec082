//! Compiles `kernels-gpu` to PTX for `nvptx64-nvidia-cuda` twice (baseline sm_80, and the
//! Hopper module for sm_90a with the `hopper` feature), checks each against
//! forge-kernel-abi's kernel table (names, parameter kinds, no strays), applies the table's
//! launch bounds, and places it in OUT_DIR for `include_str!`. No PTX is committed; a kernels
//! build failure or a table mismatch fails this build.

use forge_kernel_abi::PtxModule;
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for dir in [
        "kernels-gpu/src",
        "kernels-gpu/Cargo.toml",
        "crates/forge-numerics/src",
        "crates/forge-numerics/Cargo.toml",
        "crates/forge-kernel-abi/src",
        "crates/forge-kernel-abi/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    // The baseline module (sm_80, every kernel) and the Hopper module (sm_90a: the `wgmma`
    // kernels and a second build of the skinny one), each checked against its rows of the table.
    let test_kernels = std::env::var_os("CARGO_FEATURE_TEST_KERNELS").is_some();
    for (module, arch, file, target) in [
        (PtxModule::Base, "sm_80", "forge_kernels.ptx", "kernels-target"),
        (PtxModule::Hopper, "sm_90a", "forge_kernels_hopper.ptx", "kernels-target-hopper"),
    ] {
        let mut builder = forge_ptx_build::PtxBuilder::new(root.join("kernels-gpu")).arch(arch);
        // The build dependency sees the same feature set as the library (cargo unifies it).
        if module == PtxModule::Base && test_kernels {
            builder = builder.feature("test-kernels");
        }
        if module == PtxModule::Hopper {
            builder = builder.feature("hopper");
        }
        let rows: Vec<_> = forge_kernel_abi::KERNELS.iter().filter(|k| k.module == module).collect();
        for k in &rows {
            if let Some((threads, blocks)) = k.launch_bounds {
                builder = builder.launch_bounds(k.name, threads, blocks);
            }
        }
        let expected: Vec<(&str, Vec<&str>)> =
            rows.iter().map(|k| (k.name, k.params.iter().map(|p| p.ptx()).collect())).collect();
        let ptx = builder
            .build(&out.join(target))
            .and_then(|ptx| forge_ptx_build::check_entries(&ptx, &expected).map(|()| ptx));
        match ptx {
            Ok(ptx) => std::fs::write(out.join(file), ptx).expect("writing the PTX into OUT_DIR"),
            // A build script reports a hard error by panicking; the message says what is missing.
            Err(msg) => panic!("\n\n4Bit Forge: {msg}\n\n"),
        }
    }
}
