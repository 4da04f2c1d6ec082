//! `gptq_panel_r16` / `gptq_panel_r32`: the column-by-column part of the GPTQ solve for one
//! panel of columns `[p0, p1)` (DESIGN §4), f32 throughout. The solver alternates this kernel
//! with `gptq_trailing_update` (the panel's errors applied to all later columns at once).
//!
//! Rows are independent, so each block owns `RPC` rows (16 or 32) and walks the panel in
//! blocks of `BLOCK = 64` permuted columns. Its 224 threads have three roles that work on
//! different blocks at once (warp specialisation), handing over at two block-wide barriers
//! per block (B1: block `b` staged; B2: block `b` solved):
//! * **chain warp** (threads 192..224, lane = row): the recurrence, in slices of 16 columns.
//!   A slice's working weights sit in registers and are run column by column, fully
//!   unrolled: quantize, `err = (x − deq)/U[t,t]`, `x −= err·U[t, ·]` on the slice's later
//!   columns. Both divisions are correctly rounded without a division instruction: the
//!   reciprocal of the divisor is refined once, then each quotient costs three FMAs
//!   (`device::div_by_recip`, the fast path of `div.rn.f32`); operands outside the range
//!   where that is exact send the row's slice through IEEE `/` instead (`column_chain`).
//! * **updater warps** (threads 128..192): after each slice (named barrier 2) they apply its
//!   16 errors to the next slice first, release it to the chain (named barrier 3), then
//!   update the block's later slices.
//! * **worker warps** (threads 0..128): while block `b` is in the chain they write out block
//!   `b − 1` (errors column-major, codes and dequantized values at original column
//!   positions), issue block `b + 1`'s loads (`U[block, block]` by `cp.async`, scales and
//!   zero points, working weights) and multiply its left-looking product
//!   `Err[rows, p0:c0(b)] · U[p0:c0(b), block b+1]` on a `cp.async` pipeline of 32-column
//!   K chunks; after B2 they add block `b`'s own 64 errors, stage
//!   `X = Wwork − product` and release block `b + 1` (B1).
//!
//! Shared memory: `forge_numerics::SolverSharedLayout::new(RPC, p1 − p0).total` bytes
//! (≈ 80 KiB at RPC = 16 and 103 KiB at 32 for 512-column panels, so two blocks share an SM;
//! the launcher raises the block's dynamic limit). `.maxntid 224` / `.minnctapersm 2` cap the
//! registers at 128.
//!
//! # Safety (upheld by the host launcher)
//! `w_work` is `rows_p·cols_p` f32 (permuted working weights); `u` is `cols_p·cols_p` f32,
//! upper triangle of the permuted factor with a positive diagonal (identity past `cols`);
//! `perm` and `group_of` have `cols_p` entries (`perm` a permutation of `0..cols` first,
//! `group_of` from `gptq_expand_meta`); `scale_zero` has `rows·n_groups` records;
//! `p0 < p1 ≤ cols_p` are multiples of 128 with `p1 − p0 ≤ 1024`; `codes`/`deq` hold
//! `rows·cols`, `err_t` `cols_p·rows_p` (rows past `rows` zero), `loss` `rows` (zeroed before
//! the first panel); `rows_p`, `cols_p` multiples of 128; block size `SOLVER_THREADS` (224),
//! grid `ceil(rows/RPC)` blocks, dynamic shared memory as above.

use crate::device::{
    arrive_named, block_x, cp_async_16, cp_async_commit, cp_async_wait, div_by_recip, for16, for4, ld_global_f32x4,
    ld_shared_f32, ld_shared_f32x2, ld_shared_f32x4, ld_shared_f32x4_pure, ld_shared_u32, ld_shared_u32x4,
    recip_for_division, shared_window_base, st_shared_f32x4, st_shared_u32, st_shared_u32x4, sync_named, sync_threads,
    sync_warp, thread_x, vote_all,
};
use crate::gptq_expand_meta::ScaleZero;
use core::f32::math::mul_add as fma;
use forge_numerics::{
    dequantize, quantize, quantize_scaled, SolverSharedLayout, SOLVER_BLOCK as BLOCK, SOLVER_STAGES, SOLVER_THREADS,
    SOLVER_UPDATER_THREADS as UPDATERS, SOLVER_WORKER_THREADS as WORKERS,
};

const KC: u32 = forge_numerics::SOLVER_KCHUNK;
/// Columns of one chain slice, and slices per block.
const SLICE: usize = 16;
const SLICES: u32 = BLOCK / SLICE as u32;
/// Named barriers: 0 is the block's (`sync_threads`), 1 the worker warps'; 2 and 3 pair the
/// chain warp with the updater warps: "slice errors stored" and "next slice updated".
const WORKER_BARRIER: u32 = 1;
const SLICE_ERRORS: u32 = 2;
const SLICE_READY: u32 = 3;
const CHAIN_AND_UPDATERS: u32 = UPDATERS + 32;
const STRIDE: u32 = SolverSharedLayout::TILE_STRIDE;

#[inline(always)]
unsafe fn st_f32(addr: u32, v: f32) {
    st_shared_u32(addr, v.to_bits());
}

/// Issues the asynchronous copies of K-chunk `s0` into stage `st`: `U[s0.., block]` and, when
/// `with_errors`, the chunk's errors (`err_t` is column-major, so chunk row `k` is `RPC`
/// contiguous floats; the last two chunks of a product take theirs from the work tile).
#[inline(always)]
unsafe fn issue_chunk<const RPC: usize>(p: &Panel, c0: u32, s0: u32, st: u32, with_errors: bool, tid: u32) {
    let stage = p.base + p.l.stages + st * p.l.stage_bytes;
    if with_errors {
        // KC·RPC floats = KC·RPC/4 16-byte pieces
        let mut piece = tid;
        while piece < KC * RPC as u32 / 4 {
            let (k, r4) = (piece / (RPC as u32 / 4), (piece % (RPC as u32 / 4)) * 4);
            let src = p.err_t.add(((s0 + k) * p.rows_p + p.row0 + r4) as usize);
            cp_async_16(stage + (k * RPC as u32 + r4) * 4, src);
            piece += WORKERS;
        }
    }
    // U: KC·64 floats = 512 pieces, 4 per worker
    let mut piece = tid;
    while piece < KC * BLOCK / 4 {
        let (k, c4) = (piece / (BLOCK / 4), (piece % (BLOCK / 4)) * 4);
        cp_async_16(stage + p.l.stage_u + (k * BLOCK + c4) * 4, p.u.add(((s0 + k) * p.cols_p + c0 + c4) as usize));
        piece += WORKERS;
    }
}

/// Range in which the chain's branch-free division equals IEEE division (see
/// [`crate::device::div_by_recip`]): scales in `[2^-60, 2^20]`, `U`'s diagonal in
/// `[2^-40, 2^20]`, working weights zero or of magnitude in `[2^-100, 2^64]`. Then `x/s` and
/// `(x − deq)/d` stay in `[2^-120, 2^124]` (a non-zero `x − deq` with `deq ≠ 0` is at least
/// `2^-84`: `deq` is a non-zero integer times a scale ≥ `2^-60`), and every remainder is exact.
const SCALE_MIN: f32 = 8.673617e-19; // 2^-60
const SCALE_MAX: f32 = 1_048_576.0; // 2^20
const DIAG_MIN: f32 = 9.094947e-13; // 2^-40
const DIAG_MAX: f32 = 1_048_576.0; // 2^20
const DIVIDEND_MAX: f32 = 1.8446744e19; // 2^64
/// `key(2^-100)`, where `key(x) = 2·bits(|x|) − 1` wraps zero to the maximum, so one unsigned
/// minimum over the keys bounds every non-zero magnitude from below.
const DIVIDEND_MIN_KEY: u32 = (0x0d80_0000u32 << 1) - 1;

/// One lane's row of the block tiles, and the block's `U` and diagonal reciprocals, as
/// shared addresses; accesses add compile-time offsets.
struct RowTiles {
    /// Working weights, overwritten by their errors.
    work: u32,
    scale: u32,
    zero: u32,
    u: u32,
    diag_recip: u32,
    codes: u32,
}

impl RowTiles {
    #[inline(always)]
    fn new(l: &SolverSharedLayout, base: u32, lane: u32, buf: u32) -> Self {
        let bytes = buf * l.byte_tile_bytes() + lane * BLOCK;
        RowTiles {
            work: base + l.work_tile + lane * STRIDE * 4,
            scale: base + l.scale_tile + buf * l.row_tile_bytes() + lane * STRIDE * 4,
            zero: base + l.zero_tile + bytes,
            u: base + l.u_block + buf * SolverSharedLayout::U_BLOCK_BYTES,
            diag_recip: base + l.diag_recip,
            codes: base + l.codes + bytes,
        }
    }

    /// The row's 16 working weights of slice `sl`.
    #[inline(always)]
    unsafe fn load_x(&self, sl: u32) -> [f32; SLICE] {
        let mut x = [0f32; SLICE];
        for4(|q| {
            let v = ld_shared_f32x4_pure(self.work + (SLICE as u32 * sl + 4 * q as u32) * 4);
            for4(|i| x[4 * q + i] = v[i]);
        });
        x
    }

    /// Replaces slice `sl`'s working weights by their errors and stores its codes.
    #[inline(always)]
    unsafe fn store_slice(&self, sl: u32, e: &[f32; SLICE], codes: &[u32; 4]) {
        let s0 = SLICE as u32 * sl;
        for4(|q| {
            st_shared_f32x4(self.work + (s0 + 4 * q as u32) * 4, [e[4 * q], e[4 * q + 1], e[4 * q + 2], e[4 * q + 3]]);
        });
        st_shared_u32x4(self.codes + s0, *codes);
    }
}

/// What one row's chain over a block produced besides its errors.
struct ChainOut {
    /// The slice's codes, four per word, little-endian.
    codes: [u32; 4],
    /// `Σ e²` over the slice.
    loss: f32,
    /// Largest `|x|` quantized (fast chain only).
    max_abs: f32,
    /// Smallest `key(x)` quantized (fast chain only; see [`DIVIDEND_MIN_KEY`]).
    min_key: u32,
}

impl ChainOut {
    /// Whether every working weight stayed where the fast division is exact.
    #[inline(always)]
    fn fast_division_exact(&self) -> bool {
        self.max_abs <= DIVIDEND_MAX && self.min_key >= DIVIDEND_MIN_KEY
    }
}

/// One row's recurrence over slice `sl` (16 columns) of the block, unrolled on registers:
/// quantize `x[c]`, `e = (x[c] − deq)/U[c,c]`, `x[j] −= e·U[c,j]` for the slice's later
/// columns (fused; the CPU reference rounds the product first, one of the rounding-order
/// differences the parity tests allow). `x[c]` then holds the error. With `EXACT` the
/// divisions are IEEE `/` (the fallback); otherwise [`div_by_recip`], whose range the
/// returned [`ChainOut`] reports. Nothing is stored, so the fallback can start over.
#[inline(always)]
unsafe fn column_chain<const EXACT: bool>(t: &RowTiles, sl: u32, x: &mut [f32; SLICE], maxq: f32) -> ChainOut {
    let mut out = ChainOut { codes: [0; 4], loss: 0.0, max_abs: 0.0, min_key: u32::MAX };
    let s0 = SLICE as u32 * sl;
    // The slice's scales and their reciprocals up front: independent of the chain, so their
    // loads and the reciprocal's latency stay off its critical path.
    let scales: [[f32; 4]; 4] = core::array::from_fn(|q| ld_shared_f32x4_pure(t.scale + (s0 + 4 * q as u32) * 4));
    let recips: [[f32; 4]; 4] = core::array::from_fn(|q| core::array::from_fn(|i| recip_for_division(scales[q][i])));
    for4(
        #[inline(always)]
        |cq| {
            let q16 = (s0 + 4 * cq as u32) * 4;
            let (s4, yd4) = (scales[cq], ld_shared_f32x4_pure(t.diag_recip + q16));
            let zeros = ld_shared_u32(t.zero + s0 + 4 * cq as u32);
            for4(
                #[inline(always)]
                |ci| {
                    let c = 4 * cq + ci;
                    let xc = x[c];
                    let urow = t.u + (s0 + c as u32) * BLOCK * 4 + s0 * 4; // U[s0 + c, s0 ..]
                    let own = ld_shared_f32x4_pure(urow + 16 * cq as u32); // holds the diagonal
                    let (s, z, d) = (s4[ci], ((zeros >> (8 * ci)) & 0xff) as f32, own[ci]);
                    let (q, e) = if EXACT {
                        let q = quantize(xc, s, z, maxq);
                        (q, (xc - dequantize(q, s, z)) / d)
                    } else {
                        out.max_abs = out.max_abs.max(xc.abs());
                        out.min_key = out.min_key.min((xc.to_bits() << 1).wrapping_sub(1));
                        let q = quantize_scaled(div_by_recip(xc, s, recips[cq][ci]), z, maxq);
                        (q, div_by_recip(xc - dequantize(q, s, z), d, yd4[ci]))
                    };
                    out.codes[cq] |= (q as u32) << (8 * ci);
                    x[c] = e;
                    out.loss = fma(e, e, out.loss);
                    for4(
                        #[inline(always)]
                        |ji| {
                            if ji > ci {
                                x[4 * cq + ji] = fma(-e, own[ji], x[4 * cq + ji]);
                            }
                        },
                    );
                    for4(
                        #[inline(always)]
                        |jq| {
                            if jq > cq {
                                let u4 = ld_shared_f32x4_pure(urow + 16 * jq as u32);
                                for4(
                                    #[inline(always)]
                                    |ji| x[4 * jq + ji] = fma(-e, u4[ji], x[4 * jq + ji]),
                                );
                            }
                        },
                    );
                },
            );
        },
    );
    out
}

/// K steps per software-pipelined operand group.
const GROUP: u32 = 4;

/// Operands of steps `kk .. kk+GROUP` of the chunk in `stage`.
#[inline(always)]
unsafe fn load_group<const RPC: usize, const RT: usize>(
    l: &SolverSharedLayout,
    stage: u32,
    kk: u32,
    rs: u32,
    cq: u32,
) -> ([[f32; RT]; GROUP as usize], [[f32; 4]; GROUP as usize]) {
    let (a0, b0) = load_operands::<RPC, RT>(l, stage, kk, rs, cq);
    let (a1, b1) = load_operands::<RPC, RT>(l, stage, kk + 1, rs, cq);
    let (a2, b2) = load_operands::<RPC, RT>(l, stage, kk + 2, rs, cq);
    let (a3, b3) = load_operands::<RPC, RT>(l, stage, kk + 3, rs, cq);
    ([a0, a1, a2, a3], [b0, b1, b2, b3])
}

/// Step `kk` of the chunk in `stage`: this thread's `RT` error rows and 4 factor columns.
#[inline(always)]
unsafe fn load_operands<const RPC: usize, const RT: usize>(
    l: &SolverSharedLayout,
    stage: u32,
    kk: u32,
    rs: u32,
    cq: u32,
) -> ([f32; RT], [f32; 4]) {
    let a_addr = stage + (kk * RPC as u32 + rs * RT as u32) * 4;
    let a: [f32; RT] = if RT == 4 {
        let v = ld_shared_f32x4(a_addr);
        core::array::from_fn(|i| v[i])
    } else {
        let v = ld_shared_f32x2(a_addr);
        core::array::from_fn(|i| v[i])
    };
    (a, ld_shared_f32x4(stage + l.stage_u + (kk * BLOCK + 4 * cq) * 4))
}

/// The kernel's arguments and per-block constants.
struct Panel {
    w_work: *const f32,
    p0: u32,
    p1: u32,
    u: *const f32,
    scale_zero: *const ScaleZero,
    rows: u32,
    cols: u32,
    cols_p: u32,
    n_groups: u32,
    maxq: f32,
    rows_p: u32,
    codes: *mut u8,
    deq: *mut f32,
    err_t: *mut f32,
    loss: *mut f32,
    row0: u32,
    base: u32,
    l: SolverSharedLayout,
}

/// The chain warp: for each block of the panel, once the workers have staged its working
/// weights and tiles (barrier B1), every lane runs its row's recurrence slice by slice,
/// handing each slice's errors to the updater warps and waiting for the next slice to carry
/// them; barrier B2 hands the block's errors and codes back.
#[inline(always)]
unsafe fn chain_warp<const RPC: usize>(p: &Panel, lane: u32) {
    let (l, base) = (&p.l, p.base);
    let row_ok = (lane as usize) < RPC && p.row0 + lane < p.rows;
    let mut loss_acc = 0f32;
    let nb = (p.p1 - p.p0) / BLOCK;
    sync_threads(); // B1 of block 0
    let mut b = 0;
    while b < nb {
        let buf = b % 2;
        // Reciprocals of U's diagonal, one per column, shared by every row.
        let u_blk = base + l.u_block + buf * SolverSharedLayout::U_BLOCK_BYTES;
        let mut diag_ok = true;
        let mut h = 0;
        while h < 2 {
            let c = lane + 32 * h;
            let d = ld_shared_f32(u_blk + (c * BLOCK + c) * 4);
            st_f32(base + l.diag_recip + c * 4, recip_for_division(d));
            diag_ok &= (DIAG_MIN..=DIAG_MAX).contains(&d);
            h += 1;
        }
        if !vote_all(diag_ok) && lane == 0 {
            st_shared_u32(base + l.slow_flags + RPC as u32 * 4, 1); // sticky for the panel
        }
        sync_warp();
        let slow = if (lane as usize) < RPC {
            ld_shared_u32(base + l.slow_flags + lane * 4) | ld_shared_u32(base + l.slow_flags + RPC as u32 * 4)
        } else {
            0
        };
        let rows = RowTiles::new(l, base, lane, buf);
        let mut sl = 0;
        while sl < SLICES {
            if sl > 0 {
                sync_named::<SLICE_READY, CHAIN_AND_UPDATERS>(); // slice sl has every earlier update
            }
            if (lane as usize) < RPC {
                let mut x = rows.load_x(sl);
                let mut out = column_chain::<false>(&rows, sl, &mut x, p.maxq);
                if slow != 0 || !out.fast_division_exact() {
                    // Rare: an operand outside the fast division's range; redo with IEEE `/`.
                    x = rows.load_x(sl);
                    out = column_chain::<true>(&rows, sl, &mut x, p.maxq);
                }
                rows.store_slice(sl, &x, &out.codes);
                if row_ok {
                    loss_acc += out.loss;
                }
            }
            if sl + 1 < SLICES {
                arrive_named::<SLICE_ERRORS, CHAIN_AND_UPDATERS>(); // slice sl's errors are stored
            }
            sl += 1;
        }
        sync_threads(); // B2 of block b
        if b + 1 < nb {
            sync_threads(); // B1 of block b + 1
        }
        b += 1;
    }
    if row_ok {
        *p.loss.add((p.row0 + lane) as usize) += 0.5 * loss_acc; // panels add up
    }
}

/// The two updater warps: for each slice `sl` the chain finishes, apply its 16 errors to the
/// next slice first (the chain waits for that one), then to the block's later slices.
/// Thread `ut` owns row `ut / (64/RPC)` and `4/(64/RPC)` column quads of every slice, so each
/// working weight receives its updates in increasing column order from one thread.
#[inline(always)]
unsafe fn slice_updaters<const RPC: usize>(p: &Panel, ut: u32) {
    let (l, base) = (&p.l, p.base);
    let tpr = UPDATERS / RPC as u32; // threads per row
    let qpt = 4 / tpr; // column quads per thread and slice
    let (r, q0) = (ut / tpr, (ut % tpr) * qpt);
    let x_row = base + l.work_tile + r * STRIDE * 4; // errors of finished slices, weights after
    let nb = (p.p1 - p.p0) / BLOCK;
    sync_threads(); // B1 of block 0
    let mut b = 0;
    while b < nb {
        let buf = b % 2;
        let u_blk = base + l.u_block + buf * SolverSharedLayout::U_BLOCK_BYTES;
        let mut sl = 0;
        while sl + 1 < SLICES {
            sync_named::<SLICE_ERRORS, CHAIN_AND_UPDATERS>();
            let s0 = SLICE as u32 * sl;
            let e: [[f32; 4]; 4] = core::array::from_fn(|q| ld_shared_f32x4(x_row + (s0 + 4 * q as u32) * 4));
            let mut target = sl + 1;
            while target < SLICES {
                let mut q = 0;
                while q < qpt {
                    let col = SLICE as u32 * target + 4 * (q0 + q);
                    let mut v = ld_shared_f32x4(x_row + col * 4);
                    for16(|k| {
                        let u4 = ld_shared_f32x4(u_blk + ((s0 + k as u32) * BLOCK + col) * 4);
                        for4(|i| v[i] = fma(-e[k / 4][k % 4], u4[i], v[i]));
                    });
                    st_shared_f32x4(x_row + col * 4, v);
                    q += 1;
                }
                if target == sl + 1 {
                    arrive_named::<SLICE_READY, CHAIN_AND_UPDATERS>();
                }
                target += 1;
            }
            sl += 1;
        }
        sync_threads(); // B2 of block b
        if b + 1 < nb {
            sync_threads(); // B1 of block b + 1
        }
        b += 1;
    }
}

/// Issues the global loads a block needs before its chain: `U[block, block]` (cp.async, its
/// own group), the block's `perm` tile, this lane's scales and zero points for its warp's 16
/// columns and the working weights of this thread's X tile. Rows past the end and columns
/// past `cols` get scale 1 and zero 0 (their zero working weights then give zero errors).
#[inline(always)]
unsafe fn stage_block_loads<const RPC: usize, const RT: usize>(
    p: &Panel,
    c0: u32,
    buf: u32,
    tid: u32,
) -> ([ScaleZero; 16], [[f32; 4]; RT]) {
    let (warp, lane) = (tid / 32, tid % 32);
    let u_blk = p.base + p.l.u_block + buf * SolverSharedLayout::U_BLOCK_BYTES;
    let mut q = 0;
    while q < 8 {
        let idx = tid * 8 + q; // float4 index in the 64×64 block
        let (r, c4) = (idx / 16, (idx % 16) * 4);
        cp_async_16(u_blk + (r * BLOCK + c4) * 4, p.u.add(((c0 + r) * p.cols_p + c0 + c4) as usize));
        q += 1;
    }
    cp_async_commit();
    let mut metas = [ScaleZero { scale: 1.0, zero: 0 }; 16];
    let grow = p.row0 + lane;
    if (lane as usize) < RPC && grow < p.rows {
        for16(|c| {
            let t = c0 + 16 * warp + c as u32;
            if t < p.cols {
                let g = ld_shared_u32(p.base + p.l.group_of + (t - p.p0) * 4);
                metas[c] = *p.scale_zero.add((grow * p.n_groups + g) as usize);
            }
        });
    }
    let (rs, cq) = product_tile(tid);
    let mut wv = [[0f32; 4]; RT];
    let mut i = 0;
    while i < RT {
        let r = rs * RT as u32 + i as u32;
        // The working weights are already permuted and carry every earlier panel's update.
        wv[i] = ld_global_f32x4(p.w_work.add(((p.row0 + r) * p.cols_p + c0 + 4 * cq) as usize));
        i += 1;
    }
    (metas, wv)
}

/// Stores this lane's scales and zero points into the tiles of buffer `buf`.
#[inline(always)]
unsafe fn store_block_meta<const RPC: usize>(p: &Panel, metas: &[ScaleZero; 16], buf: u32, tid: u32) {
    let (warp, lane) = (tid / 32, tid % 32);
    if (lane as usize) < RPC {
        let mut zeros = [0u32; 4];
        let mut in_range = true;
        for16(|c| {
            let s = metas[c].scale;
            st_f32(
                p.base + p.l.scale_tile + buf * p.l.row_tile_bytes() + (lane * STRIDE + 16 * warp + c as u32) * 4,
                s,
            );
            zeros[c / 4] |= (metas[c].zero & 0xff) << (8 * (c % 4));
            in_range &= (SCALE_MIN..=SCALE_MAX).contains(&s);
        });
        if !in_range {
            st_shared_u32(p.base + p.l.slow_flags + lane * 4, 1); // sticky for the panel
        }
        st_shared_u32x4(p.base + p.l.zero_tile + buf * p.l.byte_tile_bytes() + lane * BLOCK + 16 * warp, zeros);
    }
}

/// This worker's product tile: rows `rs·RT ..` and column quad `cq`. Warp `w` covers the
/// block's 16 columns `16w ..` over all rows (8 row groups × 4 quads), so a K step loads
/// 8 error groups and 4 factor quads per warp: two shared-memory wavefronts.
#[inline(always)]
fn product_tile(tid: u32) -> (u32, u32) {
    let lane = tid % 32;
    (lane / 4, (tid / 32) * 4 + lane % 4)
}

/// `acc += Err[rows, chunk] · U[chunk, block]` for the chunk in `stage`.
#[inline(always)]
unsafe fn multiply_chunk<const RPC: usize, const RT: usize>(
    l: &SolverSharedLayout,
    stage: u32,
    rs: u32,
    cq: u32,
    acc: &mut [[f32; 4]; RT],
) {
    // Operands of steps kk+4..kk+8 are loaded before the FMAs of steps kk..kk+4: with few
    // warps per SM, 4·RT·4 FMAs must cover the shared-memory latency.
    let mut cur = load_group::<RPC, RT>(l, stage, 0, rs, cq);
    let mut kk = 0;
    while kk < KC {
        let next = load_group::<RPC, RT>(l, stage, (kk + GROUP) % KC, rs, cq);
        let mut g = 0;
        while g < GROUP as usize {
            let (a, b) = (cur.0[g], cur.1[g]);
            let mut i = 0;
            while i < RT {
                let mut j = 0;
                while j < 4 {
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
                    j += 1;
                }
                i += 1;
            }
            g += 1;
        }
        cur = next;
        kk += GROUP;
    }
}

/// Writes block `wb`'s errors (permuted order, column-major), codes and dequantized values
/// (original column order), four elements per access. The errors come from the last two
/// product stages, where the workers copied them for block `wb + 1`'s product, or, for the
/// panel's last block, from the work tile. Errors of padded rows and columns are exactly
/// zero, so the padded error workspace is written whole.
#[inline(always)]
unsafe fn write_block<const RPC: usize>(p: &Panel, wb: u32, tid: u32) {
    let (l, base) = (&p.l, p.base);
    let (c0, buf) = (p.p0 + wb * BLOCK, wb % 2);
    let from_stages = c0 + BLOCK < p.p1;
    // Errors: thread → 4 consecutive rows of one column (a 16-byte run of err_t).
    let mut idx = tid;
    while idx < RPC as u32 / 4 * BLOCK {
        let (r, c) = ((idx % (RPC as u32 / 4)) * 4, idx / (RPC as u32 / 4));
        let e = if from_stages {
            // chunks 2wb and 2wb + 1 of block wb + 1's product, k-major
            let stage = (2 * wb + c / KC) % SOLVER_STAGES;
            ld_shared_f32x4(base + l.stages + stage * l.stage_bytes + ((c % KC) * RPC as u32 + r) * 4)
        } else {
            core::array::from_fn(|i| ld_shared_f32(base + l.work_tile + ((r + i as u32) * STRIDE + c) * 4))
        };
        *(p.err_t.add(((c0 + c) * p.rows_p + p.row0 + r) as usize) as *mut [f32; 4]) = e;
        idx += WORKERS;
    }
    // Codes and dequantized values: thread → 4 consecutive block columns of one row.
    let live_rows = p.rows.saturating_sub(p.row0).min(RPC as u32);
    let live_cols = p.cols.saturating_sub(c0).min(BLOCK);
    let mut idx = tid;
    while idx < RPC as u32 * BLOCK / 4 {
        let (r, c) = (idx / (BLOCK / 4), (idx % (BLOCK / 4)) * 4);
        if r < live_rows && c < live_cols {
            let j = ld_shared_u32x4(base + l.perm + (c0 - p.p0 + c) * 4);
            let at = buf * l.byte_tile_bytes() + r * BLOCK + c;
            let (q4, z4) = (ld_shared_u32(base + l.codes + at), ld_shared_u32(base + l.zero_tile + at));
            let s4 = ld_shared_f32x4(base + l.scale_tile + buf * l.row_tile_bytes() + (r * STRIDE + c) * 4);
            let deq: [f32; 4] = core::array::from_fn(|i| {
                let byte = |w: u32| ((w >> (8 * i)) & 0xff) as f32;
                dequantize(byte(q4), s4[i], byte(z4))
            });
            let row = ((p.row0 + r) * p.cols) as usize;
            // Without act-order the four columns are one aligned run: one vector store each.
            let run = c + 4 <= live_cols
                && j[0].is_multiple_of(4)
                && j[1] == j[0] + 1
                && j[2] == j[0] + 2
                && j[3] == j[0] + 3;
            if run && p.cols.is_multiple_of(4) {
                *(p.deq.add(row + j[0] as usize) as *mut [f32; 4]) = deq;
                *(p.codes.add(row + j[0] as usize) as *mut u32) = q4;
            } else {
                for4(|i| {
                    if c + (i as u32) < live_cols {
                        *p.deq.add(row + j[i] as usize) = deq[i];
                        *p.codes.add(row + j[i] as usize) = (q4 >> (8 * i)) as u8;
                    }
                });
            }
        }
        idx += WORKERS;
    }
}

/// The four worker warps. While the chain warp runs block `b`, they write out block `b − 1`,
/// issue block `b + 1`'s loads and multiply its left-looking product over every error that is
/// already final (`K = p0 .. c0(b)`); after the chain (barrier B2) they add block `b`'s own 64
/// errors from shared memory, stage `X = Wwork − Err·U` and release block `b + 1` (B1).
#[inline(always)]
unsafe fn workers<const RPC: usize, const RT: usize>(p: &Panel, tid: u32) {
    let l = &p.l;
    let (rs, cq) = product_tile(tid);
    let nb = (p.p1 - p.p0) / BLOCK;
    // Block 0 has no product inside the panel: X = Wwork.
    let (metas, wv) = stage_block_loads::<RPC, RT>(p, p.p0, 0, tid);
    cp_async_wait::<0>();
    store_block_meta::<RPC>(p, &metas, 0, tid);
    store_x::<RT>(p, &wv, &[[0f32; 4]; RT], rs, cq);
    sync_threads(); // B1 of block 0
    let mut b = 0;
    while b < nb {
        if b > 0 {
            write_block::<RPC>(p, b - 1, tid);
        }
        sync_named::<WORKER_BARRIER, WORKERS>(); // buffers of block b − 1 are free for block b + 1
        let has_next = b + 1 < nb;
        let c1 = p.p0 + (b + 1) * BLOCK;
        let nbuf = (b + 1) % 2;
        let mut acc = [[0f32; 4]; RT];
        let mut wv = [[0f32; 4]; RT];
        // Chunks of block b + 1's product: all but the last two have their errors in global
        // memory already; the last two are block b's, still being computed.
        let n = (c1 - p.p0) / KC;
        if has_next {
            let metas;
            (metas, wv) = stage_block_loads::<RPC, RT>(p, c1, nbuf, tid);
            let mut ch = 0;
            while ch < SOLVER_STAGES - 1 {
                if ch < n {
                    issue_chunk::<RPC>(p, c1, p.p0 + ch * KC, ch, ch + 2 < n, tid);
                }
                cp_async_commit();
                ch += 1;
            }
            let mut ch = 0;
            while ch + 2 < n {
                cp_async_wait::<{ SOLVER_STAGES - 2 }>();
                sync_named::<WORKER_BARRIER, WORKERS>(); // chunk ch visible to all workers; stage (ch−1) no longer read
                let next = ch + SOLVER_STAGES - 1;
                if next < n {
                    issue_chunk::<RPC>(p, c1, p.p0 + next * KC, next % SOLVER_STAGES, next + 2 < n, tid);
                }
                cp_async_commit();
                multiply_chunk::<RPC, RT>(
                    l,
                    p.base + l.stages + (ch % SOLVER_STAGES) * l.stage_bytes,
                    rs,
                    cq,
                    &mut acc,
                );
                ch += 1;
            }
            store_block_meta::<RPC>(p, &metas, nbuf, tid);
        }
        sync_threads(); // B2 of block b: its errors and codes are in buffer b % 2
        if has_next {
            // Block b's errors into the error parts of the last two stages (k-major).
            let err = p.base + l.work_tile;
            let mut idx = tid;
            while idx < BLOCK * RPC as u32 {
                let (r, k) = (idx % RPC as u32, idx / RPC as u32);
                let ch = n - 2 + k / KC;
                let stage = p.base + l.stages + (ch % SOLVER_STAGES) * l.stage_bytes;
                st_f32(stage + ((k % KC) * RPC as u32 + r) * 4, ld_shared_f32(err + (r * STRIDE + k) * 4));
                idx += WORKERS;
            }
            cp_async_wait::<0>(); // the last chunks' U and block b + 1's U[block, block]
            sync_named::<WORKER_BARRIER, WORKERS>();
            let mut ch = n - 2;
            while ch < n {
                multiply_chunk::<RPC, RT>(
                    l,
                    p.base + l.stages + (ch % SOLVER_STAGES) * l.stage_bytes,
                    rs,
                    cq,
                    &mut acc,
                );
                ch += 1;
            }
            store_x::<RT>(p, &wv, &acc, rs, cq);
            sync_threads(); // B1 of block b + 1
        }
        b += 1;
    }
    write_block::<RPC>(p, nb - 1, tid);
}

/// `X = Wwork − acc` into the x tile (this thread's `RT` rows × 4 columns).
#[inline(always)]
unsafe fn store_x<const RT: usize>(p: &Panel, wv: &[[f32; 4]; RT], acc: &[[f32; 4]; RT], rs: u32, cq: u32) {
    let mut i = 0;
    while i < RT {
        let r = rs * RT as u32 + i as u32;
        let mut j = 0;
        while j < 4 {
            st_f32(p.base + p.l.work_tile + (r * STRIDE + 4 * cq + j as u32) * 4, wv[i][j] - acc[i][j]);
            j += 1;
        }
        i += 1;
    }
}

/// Loads the panel's column tables and dispatches the three roles (see the module docs).
/// `perm` and `group_of` are the kernel arguments of those names.
#[inline(always)]
unsafe fn gptq_panel_impl<const RPC: usize, const RT: usize>(p: &Panel, perm: *const u32, group_of: *const u32) {
    let tid = thread_x();
    if tid <= RPC as u32 {
        st_shared_u32(p.base + p.l.slow_flags + tid * 4, 0); // visible after barrier B1 of block 0
    }
    // The panel's column order and groups, read by every block step.
    let mut t = tid;
    while t < p.p1 - p.p0 {
        st_shared_u32(p.base + p.l.perm + t * 4, *perm.add((p.p0 + t) as usize));
        st_shared_u32(p.base + p.l.group_of + t * 4, *group_of.add((p.p0 + t) as usize));
        t += SOLVER_THREADS;
    }
    sync_threads();
    if tid < WORKERS {
        workers::<RPC, RT>(p, tid);
    } else if tid < WORKERS + UPDATERS {
        slice_updaters::<RPC>(p, tid - WORKERS);
    } else {
        chain_warp::<RPC>(p, tid - WORKERS - UPDATERS);
    }
}

macro_rules! gptq_panel_entry {
    ($name:ident, $rpc:literal, $rt:literal) => {
        /// Panel solve for blocks of this many rows; see the module docs.
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(
            w_work: *const f32,
            p0: u32,
            p1: u32,
            u: *const f32,
            perm: *const u32,
            group_of: *const u32,
            scale_zero: *const ScaleZero,
            rows: u32,
            cols: u32,
            cols_p: u32,
            n_groups: u32,
            bits: u32,
            rows_p: u32,
            codes: *mut u8,
            deq: *mut f32,
            err_t: *mut f32,
            loss: *mut f32,
        ) {
            let p = Panel {
                w_work,
                p0,
                p1,
                u,
                scale_zero,
                rows,
                cols,
                cols_p,
                n_groups,
                maxq: forge_numerics::maxq(bits),
                rows_p,
                codes,
                deq,
                err_t,
                loss,
                row0: block_x() * $rpc,
                base: shared_window_base(),
                l: SolverSharedLayout::new($rpc, p1 - p0),
            };
            gptq_panel_impl::<$rpc, $rt>(&p, perm, group_of)
        }
    };
}

gptq_panel_entry!(gptq_panel_r16, 16, 2);
gptq_panel_entry!(gptq_panel_r32, 32, 4);
