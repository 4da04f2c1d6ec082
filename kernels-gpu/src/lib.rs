//! 4Bit Forge GPU kernels: `#![no_std]` Rust compiled to PTX by rustc's
//! `nvptx64-nvidia-cuda` target (DESIGN §6). One kernel per file; each file's rustdoc states
//! the thread mapping and the safety contract the host launcher upholds.
//!
//! Kernels never panic: indexing goes through raw pointers with explicit bounds logic, and
//! the panic handler (required by `no_std`) is unreachable by construction.
#![no_std]
#![feature(abi_ptx, stdarch_nvptx, asm_experimental_arch, core_float_math)]
#![allow(clippy::missing_safety_doc)]
// Kernel entry points and their inlined bodies take every buffer and size as a parameter.
#![allow(clippy::too_many_arguments)]

pub mod device;

pub mod fast_division;
pub mod fma_throughput;

pub mod gptq_expand_meta;
pub mod gptq_panel;
pub mod gptq_permute;
pub mod gptq_trailing;
pub mod hessian_update;
pub mod mse_search;
pub mod qmeta_decode;
pub mod range_meta;

#[panic_handler]
fn unreachable_panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY-NET only: kernel code has no panicking paths. `trap` aborts the launch, which
    // the host sees as a launch error instead of a hang.
    unsafe { core::arch::nvptx::trap() }
}
