//! Compiles `kernels-gpu` to PTX for `nvptx64-nvidia-cuda` (baseline sm_80), checks it against
//! forge-kernel-abi's kernel table (names, parameter kinds, no strays), applies the table's
//! launch bounds, and places it in OUT_DIR for `include_str!`. No PTX is committed; a kernels
//! build failure or a table mismatch fails this build.

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
    let mut builder = forge_ptx_build::PtxBuilder::new(root.join("kernels-gpu")).arch("sm_80");
    // The build dependency sees the same feature set as the library (cargo unifies it).
    if std::env::var_os("CARGO_FEATURE_TEST_KERNELS").is_some() {
        builder = builder.feature("test-kernels");
    }
    for k in forge_kernel_abi::KERNELS {
        if let Some((threads, blocks)) = k.launch_bounds {
            builder = builder.launch_bounds(k.name, threads, blocks);
        }
    }
    let expected: Vec<(&str, Vec<&str>)> =
        forge_kernel_abi::KERNELS.iter().map(|k| (k.name, k.params.iter().map(|p| p.ptx()).collect())).collect();
    let ptx = builder
        .build(&out.join("kernels-target"))
        .and_then(|ptx| forge_ptx_build::check_entries(&ptx, &expected).map(|()| ptx));
    match ptx {
        Ok(ptx) => std::fs::write(out.join("forge_kernels.ptx"), ptx).expect("writing the PTX into OUT_DIR"),
        // A build script reports a hard error by panicking; the message says what is missing.
        Err(msg) => panic!("\n\n4Bit Forge: {msg}\n\n"),
    }
}
