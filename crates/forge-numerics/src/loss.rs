//! The MSE / Lᵖ scale-search loss of one element: `|ŷ − x|^norm` (docs/design.md §3).
//!
//! `norm == 2` is a plain square on both sides. For other norms the host uses libm's `powf`
//! (accurate to < 1 ulp) and the GPU uses the hardware `lg2.approx` / `ex2.approx`
//! units: relative error below 2^-21·(1 + norm·|log2|e||) per element, which the MSE parity
//! tests budget for (they re-evaluate the two best candidates on the CPU).

/// `|x|^p` for `p > 0` (0 for `x == 0`).
#[inline]
pub fn abs_pow(x: f32, p: f32) -> f32 {
    let a = x.abs();
    #[cfg(target_arch = "nvptx64")]
    {
        let l: f32;
        let r: f32;
        // SAFETY: pure register arithmetic; lg2(0) = -inf and ex2(-inf) = 0 give |0|^p = 0.
        // `.ftz` is the native unit's mode: subnormal |x|^p are < 2^-126, far below any sum.
        unsafe {
            core::arch::asm!("lg2.approx.ftz.f32 {l}, {a};", l = out(reg32) l, a = in(reg32) a, options(pure, nomem, nostack));
            let y = l * p;
            core::arch::asm!("ex2.approx.ftz.f32 {r}, {y};", r = out(reg32) r, y = in(reg32) y, options(pure, nomem, nostack));
        }
        r
    }
    #[cfg(not(target_arch = "nvptx64"))]
    {
        libm::powf(a, p)
    }
}

/// Loss of one element's error `e = ŷ − x` under `norm` (fast path for 2).
#[inline]
pub fn element_loss(err: f32, norm: f32) -> f32 {
    if norm == 2.0 {
        err * err
    } else {
        abs_pow(err, norm)
    }
}
