//! The two updater warps (threads 128..192): between the chain's slices they apply each
//! finished slice's errors to the block's later slices (see the panel's module docs). Their
//! barriers: [`UPDATERS_B1_B2`], [`UPDATERS_TAKE_SLICE`], [`UPDATERS_RELEASE_SLICE`].

use super::protocol::{meet, SLICE, SLICES, UPDATERS_B1_B2, UPDATERS_RELEASE_SLICE, UPDATERS_TAKE_SLICE};
use super::Panel;
use crate::device::{for16, for4};
use core::f32::math::mul_add as fma;
use forge_kernel_abi::solver::{SOLVER_BLOCK as BLOCK, SOLVER_UPDATER_THREADS as UPDATERS};

/// The two updater warps: for each slice `sl` the chain finishes, apply its 16 errors to the
/// next slice first (the chain waits for that one), then to the block's later slices.
/// Thread `ut` owns row `ut / (64/RPC)` and `4/(64/RPC)` column quads of every slice, so each
/// working weight receives its updates in increasing column order from one thread.
#[inline(always)]
pub(super) unsafe fn slice_updaters<const RPC: usize>(p: &Panel, ut: u32) {
    let tpr = UPDATERS / RPC as u32; // threads per row
    let qpt = 4 / tpr; // column quads per thread and slice
    let (r, q0) = (ut / tpr, (ut % tpr) * qpt);
    let x_row = p.work_row(r); // errors of finished slices, weights after
    let nb = (p.p1 - p.p0) / BLOCK;
    meet!(UPDATERS_B1_B2); // B1 of block 0
    let mut b = 0;
    while b < nb {
        let u_blk = p.u_block(b % 2);
        let mut sl = 0;
        while sl + 1 < SLICES {
            meet!(UPDATERS_TAKE_SLICE);
            let s0 = SLICE as u32 * sl;
            let e: [[f32; 4]; 4] = core::array::from_fn(|q| x_row.at(s0 + 4 * q as u32).ld4());
            let mut target = sl + 1;
            while target < SLICES {
                let mut q = 0;
                while q < qpt {
                    let col = SLICE as u32 * target + 4 * (q0 + q);
                    let mut v = x_row.at(col).ld4();
                    for16(|k| {
                        let u4 = u_blk.at((s0 + k as u32) * BLOCK + col).ld4();
                        for4(|i| v[i] = fma(-e[k / 4][k % 4], u4[i], v[i]));
                    });
                    x_row.at(col).st4(v);
                    q += 1;
                }
                if target == sl + 1 {
                    meet!(UPDATERS_RELEASE_SLICE);
                }
                target += 1;
            }
            sl += 1;
        }
        meet!(UPDATERS_B1_B2); // B2 of block b
        if b + 1 < nb {
            meet!(UPDATERS_B1_B2); // B1 of block b + 1
        }
        b += 1;
    }
}
