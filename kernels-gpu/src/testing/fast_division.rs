//! `fast_division`: `a[i] / b[i]` through [`crate::device::div_by_recip`], the branch-free
//! division the solver's column chain uses, so tests can compare it with IEEE division on
//! the CPU over the range the solver admits (tests only).
//!
//! Thread mapping: one thread per element.
//!
//! # Safety (upheld by the host launcher)
//! `a`, `b` and `out` have `n` f32.

use crate::device::{div_by_recip, global_x, recip_for_division};

forge_kernel_abi::fast_division_kernel! {
    /// See the module docs.
    FastDivision => fn fast_division(args) {
        let i = global_x();
        if i < args.n {
            let (a, b) = (*args.a.ptr().add(i as usize), *args.b.ptr().add(i as usize));
            *args.out.ptr().add(i as usize) = div_by_recip(a, b, recip_for_division(b));
        }
    }
}
