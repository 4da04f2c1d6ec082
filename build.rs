//! Compiles `kernels-gpu` to PTX for `nvptx64-nvidia-cuda` (baseline sm_80) and places it in
//! OUT_DIR for `include_str!`. No PTX is committed; a kernels build failure fails this build.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for dir in
        ["kernels-gpu/src", "kernels-gpu/Cargo.toml", "crates/forge-numerics/src", "crates/forge-numerics/Cargo.toml"]
    {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    // Both solver panels run two blocks per SM (their shared memory is sized for it), so
    // their registers are capped to fit.
    let threads = forge_numerics::SOLVER_THREADS;
    let builder = forge_ptx_build::PtxBuilder::new(root.join("kernels-gpu"))
        .arch("sm_80")
        .launch_bounds("gptq_panel_r16", threads, 2)
        .launch_bounds("gptq_panel_r32", threads, 2);
    match builder.build(&out.join("kernels-target")) {
        Ok(ptx) => {
            std::fs::write(out.join("forge_kernels.ptx"), ptx).expect("writing the PTX into OUT_DIR");
        }
        Err(msg) => {
            // A build script reports a hard error by panicking; the message says what is missing.
            panic!("\n\n4Bit Forge: {msg}\n\n");
        }
    }
}
