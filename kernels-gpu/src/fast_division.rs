//! `fast_division`: `a[i] / b[i]` through [`crate::device::div_by_recip`], the branch-free
//! division the solver's column chain uses, so tests can compare it with IEEE division on
//! the CPU over the range the solver admits (tests only).
//!
//! Thread mapping: one thread per element.
//!
//! # Safety (upheld by the host launcher)
//! `a`, `b` and `out` have `n` f32.

use crate::device::{div_by_recip, global_x, recip_for_division};

/// See the module docs.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn fast_division(a: *const f32, b: *const f32, n: u32, out: *mut f32) {
    let i = global_x();
    if i < n {
        let (a, b) = (*a.add(i as usize), *b.add(i as usize));
        *out.add(i as usize) = div_by_recip(a, b, recip_for_division(b));
    }
}
