//! The four worker warps (threads 0..128): global loads, the left-looking product of the
//! next block, staging, and the write-out of the previous block (see the panel's module
//! docs). Their barriers: [`WORKERS_B1_B2`], [`WORKERS_PIPELINE`].

use super::chain::{SCALE_MAX, SCALE_MIN};
use super::protocol::{meet, WORKERS_B1_B2, WORKERS_PIPELINE};
use super::Panel;
use crate::device::{
    cp_async_16, cp_async_commit, cp_async_wait, for16, for4, ld_global_f32x4, ld_shared_f32x2, ld_shared_f32x4,
};
use core::f32::math::mul_add as fma;
use forge_kernel_abi::solver::{
    ScaleZero, SolverSharedLayout, SOLVER_BLOCK as BLOCK, SOLVER_KCHUNK as KC, SOLVER_STAGES,
    SOLVER_WORKER_THREADS as WORKERS,
};
use forge_numerics::dequantize;

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
    let u_blk = p.u_block(buf);
    let mut q = 0;
    while q < 8 {
        let idx = tid * 8 + q; // float4 index in the 64×64 block
        let (r, c4) = (idx / 16, (idx % 16) * 4);
        cp_async_16(u_blk.at(r * BLOCK + c4).addr(), p.u.add(((c0 + r) * p.cols_p + c0 + c4) as usize));
        q += 1;
    }
    cp_async_commit();
    let mut metas = [ScaleZero { scale: 1.0, zero: 0 }; 16];
    let grow = p.row0 + lane;
    if (lane as usize) < RPC && grow < p.rows {
        for16(|c| {
            let t = c0 + 16 * warp + c as u32;
            if t < p.cols {
                let g = p.group_tile().at(t - p.p0).ld();
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
        let scales = p.scale_row(buf, lane).at(16 * warp);
        for16(|c| {
            let s = metas[c].scale;
            scales.at(c as u32).st(s);
            zeros[c / 4] |= (metas[c].zero & 0xff) << (8 * (c % 4));
            in_range &= (SCALE_MIN..=SCALE_MAX).contains(&s);
        });
        if !in_range {
            p.slow_flags().at(lane).st(1); // sticky for the panel
        }
        p.zero_row(buf, lane).at(16 * warp).st_words4(zeros);
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
    let (c0, buf) = (p.p0 + wb * BLOCK, wb % 2);
    let from_stages = c0 + BLOCK < p.p1;
    // Errors: thread → 4 consecutive rows of one column (a 16-byte run of err_t).
    let mut idx = tid;
    while idx < RPC as u32 / 4 * BLOCK {
        let (r, c) = ((idx % (RPC as u32 / 4)) * 4, idx / (RPC as u32 / 4));
        let e = if from_stages {
            // chunks 2wb and 2wb + 1 of block wb + 1's product, k-major
            let stage = (2 * wb + c / KC) % SOLVER_STAGES;
            p.stage_errors(stage).at((c % KC) * RPC as u32 + r).ld4()
        } else {
            core::array::from_fn(|i| p.work_row(r + i as u32).at(c).ld())
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
            let j = p.perm_tile().at(c0 - p.p0 + c).ld4();
            let (q4, z4) = (p.codes_row(buf, r).at(c).ld_word(), p.zero_row(buf, r).at(c).ld_word());
            let s4 = p.scale_row(buf, r).at(c).ld4();
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
pub(super) unsafe fn workers<const RPC: usize, const RT: usize>(p: &Panel, tid: u32) {
    let l = &p.l;
    let (rs, cq) = product_tile(tid);
    let nb = (p.p1 - p.p0) / BLOCK;
    // Block 0 has no product inside the panel: X = Wwork.
    let (metas, wv) = stage_block_loads::<RPC, RT>(p, p.p0, 0, tid);
    cp_async_wait::<0>();
    store_block_meta::<RPC>(p, &metas, 0, tid);
    store_x::<RT>(p, &wv, &[[0f32; 4]; RT], rs, cq);
    meet!(WORKERS_B1_B2); // B1 of block 0
    let mut b = 0;
    while b < nb {
        if b > 0 {
            write_block::<RPC>(p, b - 1, tid);
        }
        meet!(WORKERS_PIPELINE); // buffers of block b − 1 are free for block b + 1
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
                meet!(WORKERS_PIPELINE); // chunk ch visible to all workers; stage (ch−1) no longer read
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
        meet!(WORKERS_B1_B2); // B2 of block b: its errors and codes are in buffer b % 2
        if has_next {
            // Block b's errors into the error parts of the last two stages (k-major).
            let mut idx = tid;
            while idx < BLOCK * RPC as u32 {
                let (r, k) = (idx % RPC as u32, idx / RPC as u32);
                let ch = n - 2 + k / KC;
                p.stage_errors(ch % SOLVER_STAGES).at((k % KC) * RPC as u32 + r).st(p.work_row(r).at(k).ld());
                idx += WORKERS;
            }
            cp_async_wait::<0>(); // the last chunks' U and block b + 1's U[block, block]
            meet!(WORKERS_PIPELINE);
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
            meet!(WORKERS_B1_B2); // B1 of block b + 1
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
        let x = p.work_row(rs * RT as u32 + i as u32).at(4 * cq);
        let mut j = 0;
        while j < 4 {
            x.at(j as u32).st(wv[i][j] - acc[i][j]);
            j += 1;
        }
        i += 1;
    }
}
