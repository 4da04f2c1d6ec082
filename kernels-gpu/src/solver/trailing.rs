//! `gptq_trailing_update`: applies a finished panel's errors to every later column,
//! `Wwork[:, p1:] −= Err[:, p0:p1] · U[p0:p1, p1:]` (the right-looking step of blocked GPTQ;
//! the bulk of the solve's R·C²/2 multiply-adds).
//!
//! Thread mapping: a block computes a 128×128 tile of `Wwork` (rows `128·blockIdx.y ..`,
//! columns `p1 + 128·blockIdx.x ..`) with 256 threads; thread `(ty, tx) = (tid/16, tid%16)`
//! owns rows `{4ty .. 4ty+4, 64+4ty .. 64+4ty+4}` × columns `{4tx .., 64+4tx ..}` (8×8 f32
//! accumulators). K (the panel's columns) runs in steps of 16, staged by `cp.async` in
//! `TRAILING_STAGES` shared-memory buffers (`[16][128]` errors, which are column-major in
//! global memory, and `[16][128]` of `U`), two steps in flight while one is multiplied.
//!
//! # Safety (upheld by the host launcher)
//! `w_work` is `rows_p·cols_p` f32, `err_t` `cols_p·rows_p`, `u` `cols_p·cols_p`; `rows_p`,
//! `cols_p`, `p0`, `p1` multiples of 128 with `p0 < p1 < cols_p`; grid
//! `((cols_p − p1)/128, rows_p/128)`, 256 threads, dynamic shared memory
//! `TRAILING_STAGES · 16 KiB`.

use crate::device::{
    block_x, block_y, cp_async_16, cp_async_commit, cp_async_wait, for16, ld_global_f32x4, ld_shared_f32x4_pure,
    shared_window_base, sync_threads, thread_x,
};
use core::f32::math::mul_add as fma;
use forge_kernel_abi::solver::{TrailingArgs, TRAILING_STAGES};

const TILE: u32 = 128;
const KSTEP: u32 = 16;
const STAGE_BYTES: u32 = 2 * KSTEP * TILE * 4;

/// Issues stage `st` ← K rows `k0 .. k0+16` of the error tile and of the factor tile.
#[inline(always)]
unsafe fn issue(
    base: u32,
    st: u32,
    err_t: *const f32,
    u: *const f32,
    rows_p: u32,
    cols_p: u32,
    m0: u32,
    n0: u32,
    k0: u32,
    tid: u32,
) {
    let stage = base + st * STAGE_BYTES;
    // 16 rows × 128 floats = 512 16-byte pieces per operand: 2 per thread each.
    let mut q = 0;
    while q < 2 {
        let piece = tid + q * 256;
        let (k, c4) = (piece / 32, (piece % 32) * 4);
        cp_async_16(stage + (k * TILE + c4) * 4, err_t.add(((k0 + k) * rows_p + m0 + c4) as usize));
        cp_async_16(stage + (KSTEP * TILE + k * TILE + c4) * 4, u.add(((k0 + k) * cols_p + n0 + c4) as usize));
        q += 1;
    }
}

forge_kernel_abi::trailing_kernel! {
    /// See the module docs.
    GptqTrailingUpdate => fn gptq_trailing_update(args) {
        let TrailingArgs { w_work, err_t, u, rows_p, cols_p, p0, p1 } = args;
        let (w_work, err_t, u) = (w_work.ptr(), err_t.ptr(), u.ptr());
        let base = shared_window_base();
        let tid = thread_x();
        let (ty, tx) = (tid / 16, tid % 16);
        let (m0, n0) = (block_y() * TILE, p1 + block_x() * TILE);
        let mut acc = [[0f32; 8]; 8];
        let steps = (p1 - p0) / KSTEP;
        let mut s = 0;
        while s < TRAILING_STAGES - 1 {
            if s < steps {
                issue(base, s, err_t, u, rows_p, cols_p, m0, n0, p0 + s * KSTEP, tid);
            }
            cp_async_commit();
            s += 1;
        }
        let mut s = 0;
        while s < steps {
            cp_async_wait::<{ TRAILING_STAGES - 2 }>();
            sync_threads(); // step s visible to all; the stage it replaces is no longer read
            let next = s + TRAILING_STAGES - 1;
            if next < steps {
                issue(base, next % TRAILING_STAGES, err_t, u, rows_p, cols_p, m0, n0, p0 + next * KSTEP, tid);
            }
            cp_async_commit();
            let a_base = base + (s % TRAILING_STAGES) * STAGE_BYTES;
            // Fragments of step k + 1 are loaded before the 64 FMAs of step k, so the
            // shared-memory latency hides behind this warp's own arithmetic.
            let mut frag = load_fragments(a_base, 0, ty, tx);
            for16(
                #[inline(always)]
                |k| {
                    let next = if k + 1 < KSTEP as usize { load_fragments(a_base, k as u32 + 1, ty, tx) } else { frag };
                    outer_product(&mut acc, &frag);
                    frag = next;
                },
            );
            s += 1;
        }
        cp_async_wait::<0>();
        // Wwork −= acc, 16-byte read-modify-writes; each half's eight loads are issued together
        // so their latency is paid once, not once per row.
        write_back::<0>(w_work, &acc, m0, n0, ty, tx, cols_p);
        write_back::<1>(w_work, &acc, m0, n0, ty, tx, cols_p);
    }
}

/// `acc += a ⊗ b`.
#[inline(always)]
fn outer_product(acc: &mut [[f32; 8]; 8], (a, b): &([f32; 8], [f32; 8])) {
    let mut i = 0;
    while i < 8 {
        let mut j = 0;
        while j < 8 {
            acc[i][j] = fma(a[i], b[j], acc[i][j]);
            j += 1;
        }
        i += 1;
    }
}

/// Step `k`'s operands: this thread's 8 error rows and 8 factor columns.
#[inline(always)]
unsafe fn load_fragments(a_base: u32, k: u32, ty: u32, tx: u32) -> ([f32; 8], [f32; 8]) {
    let b_base = a_base + KSTEP * TILE * 4;
    let ld = |addr: u32| ld_shared_f32x4_pure(addr);
    let a0 = ld(a_base + (k * TILE + 4 * ty) * 4);
    let a1 = ld(a_base + (k * TILE + 64 + 4 * ty) * 4);
    let b0 = ld(b_base + (k * TILE + 4 * tx) * 4);
    let b1 = ld(b_base + (k * TILE + 64 + 4 * tx) * 4);
    ([a0[0], a0[1], a0[2], a0[3], a1[0], a1[1], a1[2], a1[3]], [b0[0], b0[1], b0[2], b0[3], b1[0], b1[1], b1[2], b1[3]])
}

/// Rows `4·HALF .. 4·HALF + 4` of this thread's accumulator block subtracted from `Wwork`.
#[inline(always)]
unsafe fn write_back<const HALF: usize>(
    w_work: *mut f32,
    acc: &[[f32; 8]; 8],
    m0: u32,
    n0: u32,
    ty: u32,
    tx: u32,
    cols_p: u32,
) {
    let v: [[f32; 4]; 8] = core::array::from_fn(|q| {
        ld_global_f32x4(w_work.add(tile_offset(m0, n0, HALF * 4 + q / 2, q % 2, ty, tx, cols_p)))
    });
    let mut q = 0;
    while q < 8 {
        let (i, o) = (HALF * 4 + q / 2, 4 * (q % 2));
        let out = [v[q][0] - acc[i][o], v[q][1] - acc[i][o + 1], v[q][2] - acc[i][o + 2], v[q][3] - acc[i][o + 3]];
        *(w_work.add(tile_offset(m0, n0, i, q % 2, ty, tx, cols_p)) as *mut [f32; 4]) = out;
        q += 1;
    }
}

/// Row `i` (0..8) and column half `h` of this thread's 8×8 accumulator block, as an offset
/// into `Wwork`.
#[inline(always)]
fn tile_offset(m0: u32, n0: u32, i: usize, h: usize, ty: u32, tx: u32, cols_p: u32) -> usize {
    let r = m0 + if i < 4 { 4 * ty + i as u32 } else { 64 + 4 * ty + i as u32 - 4 };
    (r * cols_p + n0 + 64 * h as u32 + 4 * tx) as usize
}
