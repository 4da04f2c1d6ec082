//! `gptq_panel_r16` / `gptq_panel_r32`: the column-by-column part of the GPTQ solve for one
//! panel of columns `[p0, p1)` (DESIGN §4), f32 throughout. The solver alternates this kernel
//! with `gptq_trailing_update` (the panel's errors applied to all later columns at once).
//!
//! Rows are independent, so each block owns `RPC` rows (16 or 32) and walks the panel in
//! blocks of `BLOCK = 64` permuted columns (block column `c` is original column `perm[c0+c]`):
//! 1. issue the block's global loads up front (`U[block, block]` by `cp.async`, this lane's
//!    qmeta records, the X tile's working weights, the next block's `perm`) so they land
//!    while the product runs;
//! 2. left-looking update inside the panel: `X = Wwork[rows, block] − Err[rows, p0:c0] ·
//!    U[p0:c0, block]` as a register-tiled product: thread `(rs, cq) = (tid/16, tid%16)` owns
//!    rows `rs·RPC/8 ..` × columns `4cq .. 4cq+4`; K runs in chunks of 32 staged in shared
//!    memory by `cp.async`, `SOLVER_STAGES − 1` chunks in flight while one is multiplied
//!    (errors are kept column-major, so a chunk row is `RPC` contiguous floats), operands of
//!    four K steps loaded ahead of their FMAs;
//! 3. in-block recurrence in slices of 16 columns: warp 0 (lane = row) keeps the slice in
//!    registers and runs it column by column, fully unrolled and without barriers: quantize
//!    (exact division as the CPU reference), `err = (x − deq)/U[t,t]`, `x −= err·U[t, ·]`
//!    on the slice's later columns; then all warps apply the slice's errors to the block's
//!    remaining columns in shared memory (two barriers per slice, not one per column);
//! 4. the block's errors, codes and dequantized values are written (codes and dequant to
//!    original column positions, errors column-major); the row's loss is added to `loss`.
//!
//! Shared memory: `forge_numerics::SolverSharedLayout::new(RPC).total` bytes (66.5 KiB at
//! RPC = 16, 84 KiB at 32; the launcher raises the block's dynamic limit).
//!
//! # Safety (upheld by the host launcher)
//! `w_work` is `rows_p·cols_p` f32 (permuted working weights); `u` is `cols_p·cols_p` f32,
//! upper triangle of the permuted factor with a positive diagonal (identity past `cols`);
//! `perm` has `cols_p` entries, a permutation of `0..cols` then anything; `p0 < p1 ≤ cols_p`
//! are multiples of 64; `qmeta` has `rows·n_groups` records; `codes`/`deq` hold `rows·cols`,
//! `err_t` `cols_p·rows_p` (rows past `rows` zero), `loss` `rows` (zeroed before the first
//! panel); `rows_p`, `cols_p` multiples of 128; block size 128 threads, grid
//! `ceil(rows/RPC)` blocks, dynamic shared memory as above.

use crate::device::{
    block_x, cp_async_16, cp_async_commit, cp_async_wait, div_by_recip, ld_global_f32x4, ld_shared_f32,
    ld_shared_f32x2, ld_shared_f32x4, ld_shared_u32, ld_shared_u8, recip_for_division, shared_generic,
    shared_window_base, st_shared_u32, sync_threads, sync_warp, thread_x, vote_all,
};
use core::f32::math::mul_add as fma;
use forge_numerics::{
    dequantize, quantize, quantize_scaled, QMetaPacked, SolverSharedLayout, SOLVER_BLOCK as BLOCK, SOLVER_STAGES,
    SOLVER_THREADS,
};

const KC: u32 = forge_numerics::SOLVER_KCHUNK;
const STRIDE: u32 = SolverSharedLayout::TILE_STRIDE;

#[inline(always)]
unsafe fn st_f32(addr: u32, v: f32) {
    st_shared_u32(addr, v.to_bits());
}

/// Issues the asynchronous copies of K-chunk `s0` into stage `st`: the chunk's errors
/// (`err_t` is column-major, so chunk row `k` is `RPC` contiguous floats) and `U[s0.., block]`.
#[inline(always)]
unsafe fn issue_chunk<const RPC: usize>(
    l: &SolverSharedLayout,
    base: u32,
    err_t: *const f32,
    u: *const f32,
    rows_p: u32,
    row0: u32,
    cols_p: u32,
    c0: u32,
    s0: u32,
    st: u32,
    tid: u32,
) {
    let stage = base + l.stages + st * l.stage_bytes;
    // errors: KC·RPC floats = KC·RPC/4 16-byte pieces
    let mut piece = tid;
    while piece < KC * RPC as u32 / 4 {
        let (k, r4) = (piece / (RPC as u32 / 4), (piece % (RPC as u32 / 4)) * 4);
        cp_async_16(stage + (k * RPC as u32 + r4) * 4, err_t.add(((s0 + k) * rows_p + row0 + r4) as usize));
        piece += SOLVER_THREADS;
    }
    // U: KC·64 floats = 512 pieces, 4 per thread
    let mut piece = tid;
    while piece < KC * BLOCK / 4 {
        let (k, c4) = (piece / (BLOCK / 4), (piece % (BLOCK / 4)) * 4);
        cp_async_16(stage + l.stage_u + (k * BLOCK + c4) * 4, u.add(((s0 + k) * cols_p + c0 + c4) as usize));
        piece += SOLVER_THREADS;
    }
}

/// A generic pointer to the f32 at a shared-memory address.
#[inline(always)]
fn shared_f32(addr: u32) -> *mut f32 {
    shared_generic(addr) as *mut f32
}

/// Calls `f(0) … f(15)` written out, so register arrays indexed by `c` stay in registers
/// (a loop LLVM declines to unroll would move them to local memory).
#[inline(always)]
fn for16(mut f: impl FnMut(usize)) {
    f(0);
    f(1);
    f(2);
    f(3);
    f(4);
    f(5);
    f(6);
    f(7);
    f(8);
    f(9);
    f(10);
    f(11);
    f(12);
    f(13);
    f(14);
    f(15);
}

/// Calls `f(0) … f(3)` written out (see [`for16`]).
#[inline(always)]
fn for4(mut f: impl FnMut(usize)) {
    f(0);
    f(1);
    f(2);
    f(3);
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

/// 16-byte aligned view of four floats, for vector shared-memory accesses through generic
/// pointers (the compiler schedules those freely; `asm!` accesses it would not move).
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct F4([f32; 4]);

#[inline(always)]
unsafe fn ld4(p: *const f32) -> [f32; 4] {
    (*(p as *const F4)).0
}

/// One lane's row of the block tiles, and the block's `U` and diagonal reciprocals, as
/// generic pointers at compile-time offsets from per-lane bases.
struct RowTiles {
    x: *mut f32,
    scale: *const f32,
    zero: *const f32,
    scale_recip: *const f32,
    u: *const f32,
    diag_recip: *const f32,
    codes: *mut [u32; 4],
}

impl RowTiles {
    #[inline(always)]
    fn new(l: &SolverSharedLayout, base: u32, lane: u32) -> Self {
        let row = lane * STRIDE * 4;
        RowTiles {
            x: shared_f32(base + l.x_tile + row),
            scale: shared_f32(base + l.scale_tile + row),
            zero: shared_f32(base + l.zero_tile + row),
            scale_recip: shared_f32(base + l.scale_recip_tile + row),
            u: shared_f32(base + l.u_block),
            diag_recip: shared_f32(base + l.diag_recip),
            codes: shared_generic(base + l.codes + lane * BLOCK) as *mut [u32; 4],
        }
    }

    /// The row's 64 working weights.
    #[inline(always)]
    unsafe fn load_x(&self) -> [f32; 64] {
        let mut x = [0f32; 64];
        for16(|q| {
            let v = ld4(self.x.add(4 * q));
            for4(|i| x[4 * q + i] = v[i]);
        });
        x
    }

    /// The row's errors (over its working weights) and codes.
    #[inline(always)]
    unsafe fn store(&self, e: &[f32; 64], codes: &[u32; 16]) {
        for16(|q| *(self.x.add(4 * q) as *mut F4) = F4([e[4 * q], e[4 * q + 1], e[4 * q + 2], e[4 * q + 3]]));
        for4(|w| *self.codes.add(w) = [codes[4 * w], codes[4 * w + 1], codes[4 * w + 2], codes[4 * w + 3]]);
    }
}

/// What one row's chain over a block produced besides its errors.
struct ChainOut {
    /// Codes, four per word, little-endian.
    codes: [u32; 16],
    /// `Σ e²` over the block.
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

/// One row's in-block recurrence, column by column, fully unrolled on registers: quantize
/// `x[c]`, `e = (x[c] − deq)/U[c,c]`, `x[j] −= e·U[c,j]` for the later columns (fused; the
/// CPU reference rounds the product first, one of the rounding-order differences the parity
/// tests allow). `x[c]` then holds `e`. With `EXACT` the divisions are IEEE `/` (the
/// fallback); otherwise [`div_by_recip`], whose range the returned [`ChainOut`] reports.
/// The only stores are the caller's, after the chain, so every shared load may run early.
#[inline(always)]
unsafe fn column_chain<const EXACT: bool>(t: &RowTiles, x: &mut [f32; 64], maxq: f32) -> ChainOut {
    let mut out = ChainOut { codes: [0; 16], loss: 0.0, max_abs: 0.0, min_key: u32::MAX };
    for16(
        #[inline(always)]
        |cq| {
            let (s4, z4, ys4) = (ld4(t.scale.add(4 * cq)), ld4(t.zero.add(4 * cq)), ld4(t.scale_recip.add(4 * cq)));
            let yd4 = ld4(t.diag_recip.add(4 * cq));
            for4(
                #[inline(always)]
                |ci| {
                    let c = 4 * cq + ci;
                    let xc = x[c];
                    let urow = t.u.add(c * BLOCK as usize);
                    let own = ld4(urow.add(4 * cq)); // U[c, 4cq ..], holding the diagonal
                    let (s, z, d) = (s4[ci], z4[ci], own[ci]);
                    let e = if EXACT {
                        let q = quantize(xc, s, z, maxq);
                        out.codes[cq] |= (q as u32) << (8 * ci);
                        (xc - dequantize(q, s, z)) / d
                    } else {
                        out.max_abs = out.max_abs.max(xc.abs());
                        out.min_key = out.min_key.min((xc.to_bits() << 1).wrapping_sub(1));
                        let q = quantize_scaled(div_by_recip(xc, s, ys4[ci]), z, maxq);
                        out.codes[cq] |= (q as u32) << (8 * ci);
                        div_by_recip(xc - dequantize(q, s, z), d, yd4[ci])
                    };
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
                    for16(
                        #[inline(always)]
                        |jq| {
                            if jq > cq {
                                let u4 = ld4(urow.add(4 * jq));
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

#[inline(always)]
unsafe fn gptq_panel_impl<const RPC: usize, const RT: usize>(
    w_work: *const f32,
    p0: u32,
    p1: u32,
    u: *const f32,
    perm: *const u32,
    qmeta: *const u32,
    rows: u32,
    cols: u32,
    cols_p: u32,
    gs: u32,
    n_groups: u32,
    bits: u32,
    rows_p: u32,
    codes: *mut u8,
    deq: *mut f32,
    err_t: *mut f32,
    loss: *mut f32,
) {
    let l = SolverSharedLayout::new(RPC as u32);
    let base = shared_window_base();
    let tid = thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let row0 = block_x() * RPC as u32;
    let maxq = forge_numerics::maxq(bits);
    let gs = gs.max(1); // no division-by-zero panic path
    let (rs, cq) = (tid / 16, tid % 16);
    let grow = row0 + lane;
    let row_ok = (lane as usize) < RPC && grow < rows;
    let mut loss_acc = 0f32;
    if tid <= RPC as u32 {
        st_shared_u32(base + l.slow_flags + tid * 4, 0); // visible after the first block's barrier
    }

    // Original columns of the first block, for the qmeta loads (later blocks get theirs one
    // block ahead) and for the write-out's `perm` tile.
    let mut pj = [0u32; 16];
    for16(|c| pj[c] = *perm.add((p0 + 16 * warp + c as u32) as usize));
    let mut perm_next = if tid < BLOCK { *perm.add((p0 + tid) as usize) } else { 0 };

    let mut c0 = p0;
    while c0 < p1 {
        // 1. issue every global load of this block up front, so their latency hides behind
        //    the product: U[block, block] by cp.async (its own group, older than the product's),
        //    this lane's qmeta records, the working weights of the X tile, next block's perm.
        sync_threads(); // the previous block's tiles are no longer read
        let mut q = 0;
        while q < 8 {
            let idx = tid * 8 + q; // float4 index in the 64×64 block
            let (r, c4) = (idx / 16, (idx % 16) * 4);
            cp_async_16(base + l.u_block + (r * BLOCK + c4) * 4, u.add(((c0 + r) * cols_p + c0 + c4) as usize));
            q += 1;
        }
        cp_async_commit();
        let mut metas = [0u32; 16];
        if row_ok {
            for16(|c| {
                if c0 + 16 * warp + (c as u32) < cols {
                    metas[c] = *qmeta.add((grow * n_groups + pj[c] / gs) as usize);
                }
            });
        }
        let mut wv = [[0f32; 4]; RT];
        let mut i = 0;
        while i < RT {
            let r = rs * RT as u32 + i as u32;
            // The working weights are already permuted and carry every earlier panel's update.
            wv[i] = ld_global_f32x4(w_work.add(((row0 + r) * cols_p + c0 + 4 * cq) as usize));
            i += 1;
        }
        if tid < BLOCK {
            st_shared_u32(base + l.perm + tid * 4, perm_next);
        }
        if c0 + BLOCK < p1 {
            for16(|c| pj[c] = *perm.add((c0 + BLOCK + 16 * warp + c as u32) as usize));
            if tid < BLOCK {
                perm_next = *perm.add((c0 + BLOCK + tid) as usize);
            }
        }

        // 2. X = Wwork[rows, block] − Err[rows, p0:c0] · U[p0:c0, block]
        let mut acc = [[0f32; 4]; RT];
        let chunks = (c0 - p0) / KC; // left-looking inside the panel only
                                     // Pipeline: STAGES−1 chunks in flight while one is multiplied; a commit per step
                                     // (empty or not) keeps the wait count uniform.
        let mut ch = 0;
        while ch < SOLVER_STAGES - 1 {
            if ch < chunks {
                issue_chunk::<RPC>(&l, base, err_t, u, rows_p, row0, cols_p, c0, p0 + ch * KC, ch, tid);
            }
            cp_async_commit();
            ch += 1;
        }
        let mut ch = 0;
        while ch < chunks {
            cp_async_wait::<{ SOLVER_STAGES - 2 }>();
            sync_threads(); // chunk ch visible to all; stage (ch−1) no longer read
            let next = ch + SOLVER_STAGES - 1;
            if next < chunks {
                issue_chunk::<RPC>(
                    &l,
                    base,
                    err_t,
                    u,
                    rows_p,
                    row0,
                    cols_p,
                    c0,
                    p0 + next * KC,
                    next % SOLVER_STAGES,
                    tid,
                );
            }
            cp_async_commit();
            let stage = base + l.stages + (ch % SOLVER_STAGES) * l.stage_bytes;
            // Operands of steps kk+4..kk+8 are loaded before the FMAs of steps kk..kk+4: with
            // few warps per SM, 4·RT·4 FMAs must cover the shared-memory latency.
            let mut cur = load_group::<RPC, RT>(&l, stage, 0, rs, cq);
            let mut kk = 0;
            while kk < KC {
                let next = load_group::<RPC, RT>(&l, stage, (kk + GROUP) % KC, rs, cq);
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
            ch += 1;
        }
        cp_async_wait::<0>(); // the product's chunks and U[block, block]

        // The scale, zero point and division reciprocal of this lane's row for its warp's
        // 16 columns. Rows past the end, and columns past `cols` (their record reads as 0),
        // get scale 1 and zero 0: their zero working weights give zero errors.
        if (lane as usize) < RPC {
            for16(|c| {
                let col = 16 * warp + c as u32;
                let m = if row_ok { QMetaPacked::from_u32(metas[c]) } else { QMetaPacked::encode(1.0, 0.0, false) };
                let s = m.scale();
                let at = (lane * STRIDE + col) * 4;
                st_f32(base + l.scale_tile + at, s);
                st_f32(base + l.zero_tile + at, m.qzero_f32());
                st_f32(base + l.scale_recip_tile + at, recip_for_division(s));
                if !(SCALE_MIN..=SCALE_MAX).contains(&s) {
                    st_shared_u32(base + l.slow_flags + lane * 4, 1); // sticky for the panel
                }
            });
        }
        let mut i = 0;
        while i < RT {
            let r = rs * RT as u32 + i as u32;
            let mut j = 0;
            while j < 4 {
                st_f32(base + l.x_tile + (r * STRIDE + 4 * cq + j as u32) * 4, wv[i][j] - acc[i][j]);
                j += 1;
            }
            i += 1;
        }
        sync_threads();

        // 3. the in-block recurrence: warp 0, lane = row, runs all 64 columns in registers.
        if warp == 0 {
            // Reciprocals of U's diagonal, one per column, shared by every row.
            let mut diag_ok = true;
            let mut h = 0;
            while h < 2 {
                let c = lane + 32 * h;
                let d = ld_shared_f32(base + l.u_block + (c * BLOCK + c) * 4);
                st_f32(base + l.diag_recip + c * 4, recip_for_division(d));
                diag_ok &= (DIAG_MIN..=DIAG_MAX).contains(&d);
                h += 1;
            }
            if !vote_all(diag_ok) && lane == 0 {
                st_shared_u32(base + l.slow_flags + RPC as u32 * 4, 1); // sticky for the panel
            }
            sync_warp();
            if (lane as usize) < RPC {
                let slow =
                    ld_shared_u32(base + l.slow_flags + lane * 4) | ld_shared_u32(base + l.slow_flags + RPC as u32 * 4);
                let rows = RowTiles::new(&l, base, lane);
                let mut x = rows.load_x();
                let mut out = column_chain::<false>(&rows, &mut x, maxq);
                if slow != 0 || !out.fast_division_exact() {
                    // Rare: an operand outside the fast division's range; redo with IEEE `/`.
                    x = rows.load_x();
                    out = column_chain::<true>(&rows, &mut x, maxq);
                }
                rows.store(&x, &out.codes);
                if row_ok {
                    loss_acc += out.loss;
                }
            }
        }
        sync_threads();

        // 4. write the block's errors (permuted order), codes and dequant (original order)
        let mut idx = tid;
        while idx < RPC as u32 * BLOCK {
            // Rows fastest: the column-major error workspace is written in runs of RPC floats.
            let (r, c) = (idx % RPC as u32, idx / RPC as u32);
            if row0 + r < rows && c0 + c < cols {
                let gr = (row0 + r) as usize;
                let j = ld_shared_u32(base + l.perm + c * 4) as usize;
                let at = (r * STRIDE + c) * 4;
                *err_t.add((c0 + c) as usize * rows_p as usize + gr) = ld_shared_f32(base + l.x_tile + at);
                let q = ld_shared_u8(base + l.codes + r * BLOCK + c);
                *deq.add(gr * cols as usize + j) = dequantize(
                    q as f32,
                    ld_shared_f32(base + l.scale_tile + at),
                    ld_shared_f32(base + l.zero_tile + at),
                );
                *codes.add(gr * cols as usize + j) = q;
            }
            idx += SOLVER_THREADS;
        }
        c0 += BLOCK;
    }

    // Per-row loss: warp 0's lanes summed their row's errors.
    if warp == 0 && row_ok {
        *loss.add(grow as usize) += 0.5 * loss_acc; // panels add up
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
            qmeta: *const u32,
            rows: u32,
            cols: u32,
            cols_p: u32,
            gs: u32,
            n_groups: u32,
            bits: u32,
            rows_p: u32,
            codes: *mut u8,
            deq: *mut f32,
            err_t: *mut f32,
            loss: *mut f32,
        ) {
            gptq_panel_impl::<$rpc, $rt>(
                w_work, p0, p1, u, perm, qmeta, rows, cols, cols_p, gs, n_groups, bits, rows_p, codes, deq, err_t, loss,
            )
        }
    };
}

gptq_panel_entry!(gptq_panel_r16, 16, 2);
gptq_panel_entry!(gptq_panel_r32, 32, 4);
