//! `gptq_panel_r16` / `gptq_panel_r32`: the column-by-column part of the GPTQ solve for one
//! panel of columns `[p0, p1)` (docs/design.md §4), f32 throughout. The solver alternates this kernel
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
//! Each role is its own file (`chain.rs`, `updaters.rs`, `workers.rs`); `protocol.rs` holds
//! the barrier protocol as a table the roles name their barriers through, checked at compile
//! time (docs/kernels.md §4).
//!
//! Shared memory: `forge_kernel_abi::solver::SolverSharedLayout::new(RPC, p1 − p0).total` bytes
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

mod chain;
mod protocol;
mod updaters;
mod workers;

use crate::device::{block_x, shared_window_base, sync_threads, thread_x, Smem};
use forge_kernel_abi::solver::{
    ScaleZero, SolverSharedLayout, SOLVER_BLOCK as BLOCK, SOLVER_THREADS, SOLVER_UPDATER_THREADS as UPDATERS,
    SOLVER_WORKER_THREADS as WORKERS,
};

/// Row stride of the per-row f32 tiles, in floats.
const STRIDE: u32 = SolverSharedLayout::TILE_STRIDE;

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

/// Typed views of the block's shared-memory tiles ([`SolverSharedLayout`] gives the byte
/// offsets; "×2" tiles are double-buffered by block parity `buf`).
impl Panel {
    /// Row `r` of the work tile (working weights, overwritten by their errors).
    #[inline(always)]
    fn work_row(&self, r: u32) -> Smem<f32> {
        Smem::at_byte(self.base + self.l.work_tile).at(r * STRIDE)
    }

    /// `U[block, block]` of buffer `buf`, row-major `[BLOCK][BLOCK]`.
    #[inline(always)]
    fn u_block(&self, buf: u32) -> Smem<f32> {
        Smem::at_byte(self.base + self.l.u_block + buf * SolverSharedLayout::U_BLOCK_BYTES)
    }

    /// Row `r` of buffer `buf`'s decoded scales.
    #[inline(always)]
    fn scale_row(&self, buf: u32, r: u32) -> Smem<f32> {
        Smem::at_byte(self.base + self.l.scale_tile + buf * self.l.row_tile_bytes()).at(r * STRIDE)
    }

    /// Row `r` of buffer `buf`'s zero points (`[BLOCK]` bytes).
    #[inline(always)]
    fn zero_row(&self, buf: u32, r: u32) -> Smem<u8> {
        Smem::at_byte(self.base + self.l.zero_tile + buf * self.l.byte_tile_bytes()).at(r * BLOCK)
    }

    /// Row `r` of buffer `buf`'s codes (`[BLOCK]` bytes).
    #[inline(always)]
    fn codes_row(&self, buf: u32, r: u32) -> Smem<u8> {
        Smem::at_byte(self.base + self.l.codes + buf * self.l.byte_tile_bytes()).at(r * BLOCK)
    }

    /// Reciprocals of the block's `U` diagonal (`[BLOCK]`).
    #[inline(always)]
    fn diag_recip(&self) -> Smem<f32> {
        Smem::at_byte(self.base + self.l.diag_recip)
    }

    /// Per-row slow-division flags (`[rpc]`), then the block's flag.
    #[inline(always)]
    fn slow_flags(&self) -> Smem<u32> {
        Smem::at_byte(self.base + self.l.slow_flags)
    }

    /// The panel's original column of each of its columns.
    #[inline(always)]
    fn perm_tile(&self) -> Smem<u32> {
        Smem::at_byte(self.base + self.l.perm)
    }

    /// The panel's group of each of its columns.
    #[inline(always)]
    fn group_tile(&self) -> Smem<u32> {
        Smem::at_byte(self.base + self.l.group_of)
    }

    /// The error part of product stage `st` (`[KCHUNK][rpc]`, k-major).
    #[inline(always)]
    fn stage_errors(&self, st: u32) -> Smem<f32> {
        Smem::at_byte(self.base + self.l.stages + st * self.l.stage_bytes)
    }
}

/// Loads the panel's column tables and dispatches the three roles (see the module docs).
/// `perm` and `group_of` are the kernel arguments of those names.
#[inline(always)]
unsafe fn gptq_panel_impl<const RPC: usize, const RT: usize>(p: &Panel, perm: *const u32, group_of: *const u32) {
    let tid = thread_x();
    if tid <= RPC as u32 {
        p.slow_flags().at(tid).st(0); // visible after barrier B1 of block 0
    }
    // The panel's column order and groups, read by every block step.
    let mut t = tid;
    while t < p.p1 - p.p0 {
        p.perm_tile().at(t).st(*perm.add((p.p0 + t) as usize));
        p.group_tile().at(t).st(*group_of.add((p.p0 + t) as usize));
        t += SOLVER_THREADS;
    }
    sync_threads();
    if tid < WORKERS {
        workers::workers::<RPC, RT>(p, tid);
    } else if tid < WORKERS + UPDATERS {
        updaters::slice_updaters::<RPC>(p, tid - WORKERS);
    } else {
        chain::chain_warp::<RPC>(p, tid - WORKERS - UPDATERS);
    }
}

macro_rules! gptq_panel_entry {
    ($marker:ident, $name:ident, $rpc:literal, $rt:literal) => {
        forge_kernel_abi::panel_kernel! {
            /// Panel solve for blocks of this many rows; see the module docs.
            $marker => fn $name(args) {
                let p = Panel {
                    w_work: args.w_work.ptr(),
                    p0: args.p0,
                    p1: args.p1,
                    u: args.u.ptr(),
                    scale_zero: args.scale_zero.ptr(),
                    rows: args.rows,
                    cols: args.cols,
                    cols_p: args.cols_p,
                    n_groups: args.n_groups,
                    maxq: forge_numerics::maxq(args.bits),
                    rows_p: args.rows_p,
                    codes: args.codes.ptr(),
                    deq: args.deq.ptr(),
                    err_t: args.err_t.ptr(),
                    loss: args.loss.ptr(),
                    row0: block_x() * $rpc,
                    base: shared_window_base(),
                    l: SolverSharedLayout::new($rpc, args.p1 - args.p0),
                };
                gptq_panel_impl::<$rpc, $rt>(&p, args.perm.ptr(), args.group_of.ptr())
            }
        }
    };
}

gptq_panel_entry!(GptqPanelR16, gptq_panel_r16, 16, 2);
gptq_panel_entry!(GptqPanelR32, gptq_panel_r32, 32, 4);
