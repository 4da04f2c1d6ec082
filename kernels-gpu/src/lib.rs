//! 4Bit Forge GPU kernels: `#![no_std]` Rust compiled to PTX by rustc's
//! `nvptx64-nvidia-cuda` target (docs/design.md §6). One folder per stage of the data path
//! (weights → grid → hessian → solver → pack), one kernel per file; each file's rustdoc states the thread
//! mapping and the safety contract the host launcher upholds.
//!
//! Every kernel takes one by-value argument struct from `forge-kernel-abi` (its marker type
//! there names it), so host and device cannot disagree on argument order; the build checks
//! the PTX against the ABI crate's kernel table.
//!
//! Kernels never panic: indexing goes through raw pointers with explicit bounds logic, and
//! the panic handler (required by `no_std`) is unreachable by construction.
#![no_std]
#![feature(abi_ptx, stdarch_nvptx, asm_experimental_arch, core_float_math)]
#![allow(clippy::missing_safety_doc)]
// Inlined kernel bodies take every buffer and size as a parameter.
#![allow(clippy::too_many_arguments)]
// The Hopper module uses a subset of the shared device helpers.
#![cfg_attr(feature = "hopper", allow(dead_code, unused_imports))]

pub mod device;

// The `hopper` feature builds the second module (sm_90a): only the kernels that need Hopper
// instructions, so the driver does not JIT the baseline kernels twice.
#[cfg(not(feature = "hopper"))]
pub mod calib;
#[cfg(not(feature = "hopper"))]
pub mod grid;
#[cfg(not(feature = "hopper"))]
pub mod hessian;
#[cfg(not(feature = "hopper"))]
pub mod pack;
pub mod runtime;
#[cfg(not(feature = "hopper"))]
pub mod solver;
#[cfg(all(feature = "test-kernels", not(feature = "hopper")))]
pub mod testing;
#[cfg(not(feature = "hopper"))]
pub mod weights;

#[panic_handler]
fn unreachable_panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY-NET only: kernel code has no panicking paths. `trap` aborts the launch, which
    // the host sees as a launch error instead of a hang.
    unsafe { core::arch::nvptx::trap() }
}
