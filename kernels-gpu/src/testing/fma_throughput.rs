//! `fma_throughput`: measures the card's f32 FMA rate, the denominator of the solver's
//! arithmetic floor (benchmarks only).
//!
//! Thread mapping: every thread runs `iters` rounds of 8 independent FMA chains (enough to
//! cover the FMA latency) and writes one sum, so the work cannot be optimised away.
//!
//! # Safety (upheld by the host launcher)
//! `out` has one f32 per launched thread.

use crate::device::global_x;
use core::f32::math::mul_add as fma;

forge_kernel_abi::fma_throughput_kernel! {
    /// See the module docs.
    FmaThroughput => fn fma_throughput(args) {
        fma_chains(args.iters, args.seed, args.out.ptr())
    }
}

#[inline(always)]
unsafe fn fma_chains(iters: u32, seed: f32, out: *mut f32) {
    let mut a = [0f32; 8];
    let mut k = 0;
    while k < 8 {
        a[k] = seed + k as f32;
        k += 1;
    }
    let (m, c) = (0.999_999f32, 1e-7f32);
    let mut i = 0;
    while i < iters {
        let mut k = 0;
        while k < 8 {
            a[k] = fma(a[k], m, c);
            k += 1;
        }
        i += 1;
    }
    *out.add(global_x() as usize) = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}
