//! The end both W4A16 kernels share: storing `Y` pairs, and the split-K hand-off where the
//! last block to finish an output tile adds every split's partial in split order.

use super::mma::{atomic_add_u32, fence_gpu, ld_cg_f32x4, Half};
use crate::device::{ld_shared_u32, st_shared_u32, sync_threads};
use forge_kernel_abi::runtime::W4a16Args;

/// Writes `Y[row, col..col+2]` (rounded to `T`), the parts inside `m × n`.
///
/// # Safety
/// `y` holds `m·n` values.
#[inline(always)]
pub unsafe fn store_pair<T: Half>(y: *mut u16, row: u32, col: u32, m: u32, n: u32, v0: f32, v1: f32) {
    if row >= m || col >= n {
        return;
    }
    let p = T::pack2(v0, v1);
    let at = y.add(row as usize * n as usize + col as usize);
    if col + 1 < n && n.is_multiple_of(2) {
        *(at as *mut u32) = p;
    } else {
        *at = p as u16;
        if col + 1 < n {
            *at.add(1) = (p >> 16) as u16;
        }
    }
}

/// The block has written its f32 partial of rows `m0 .. m0 + rows`, columns
/// `col0 .. col0 + cols` (a multiple of 4) to `ws[split]`. It counts itself in at the tile's
/// counter; the block that arrives last sums the partials in split order (deterministic),
/// writes `Y` and leaves the counter 0 for the next launch. No block waits for another.
///
/// # Safety
/// Every thread of the block (`threads` of them) calls it; `flag` is a u32 of dynamic shared memory no thread
/// still reads; the [`W4a16Args`] contract holds and `tile < m_blocks·col_blocks`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn finish_split_k<T: Half>(
    a: &W4a16Args,
    flag: u32,
    tile: u32,
    m0: u32,
    rows: u32,
    col0: u32,
    cols: u32,
    tid: u32,
    threads: u32,
) {
    fence_gpu();
    sync_threads();
    let counter = a.counters.ptr().add(tile as usize);
    if tid == 0 {
        let old = atomic_add_u32(counter, 1);
        let last = old == a.splits - 1;
        if last {
            // Every split has arrived: leave the counter zero for the next launch.
            *counter = 0;
        }
        st_shared_u32(flag, last as u32);
    }
    sync_threads();
    if ld_shared_u32(flag) == 0 {
        return;
    }
    fence_gpu();
    let (m, ws) = (a.m, a.ws.ptr());
    let items = rows * (cols / 4);
    let mut it = tid;
    while it < items {
        let (row, col) = (m0 + it / (cols / 4), col0 + (it % (cols / 4)) * 4);
        let mut sum = [0f32; 4];
        let mut p0 = 0;
        while p0 < a.splits {
            // Eight loads in flight, then the additions in split order.
            let mut v = [[0f32; 4]; 8];
            unroll!(j < 8, {
                let p = p0 + j as u32;
                if p < a.splits {
                    v[j] = ld_cg_f32x4(ws.add((p as usize * m as usize + row as usize) * a.n_pad as usize + col as usize));
                }
            });
            unroll!(j < 8, {
                if p0 + (j as u32) < a.splits {
                    unroll!(c < 4, {
                        sum[c] += v[j][c];
                    });
                }
            });
            p0 += 8;
        }
        store_pair::<T>(a.y.ptr(), row, col, m, a.n, sum[0], sum[1]);
        store_pair::<T>(a.y.ptr(), row, col + 2, m, a.n, sum[2], sum[3]);
        it += threads;
    }
}
