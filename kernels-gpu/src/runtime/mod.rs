//! Runtime kernels: the W4A16 matmul on qmeta4 records decoded in registers, and the dense
//! dequantization for the large-`M` cuBLAS path (docs/kernels.md §6).

/// Repeats a block with `$i` bound to 0, 1, …: register arrays indexed by it stay in
/// registers (a loop LLVM declines to unroll would move them to local memory).
macro_rules! unroll {
    ($i:ident < 2, $b:block) => {{
        {
            let $i: usize = 0;
            $b
        }
        {
            let $i: usize = 1;
            $b
        }
    }};
    ($i:ident < 4, $b:block) => {{
        unroll!($i < 2, $b);
        {
            let $i: usize = 2;
            $b
        }
        {
            let $i: usize = 3;
            $b
        }
    }};
    ($i:ident < 8, $b:block) => {{
        unroll!($i < 4, $b);
        {
            let $i: usize = 4;
            $b
        }
        {
            let $i: usize = 5;
            $b
        }
        {
            let $i: usize = 6;
            $b
        }
        {
            let $i: usize = 7;
            $b
        }
    }};
    ($i:ident < 16, $b:block) => {{
        unroll!($i < 8, $b);
        {
            let $i: usize = 8;
            $b
        }
        {
            let $i: usize = 9;
            $b
        }
        {
            let $i: usize = 10;
            $b
        }
        {
            let $i: usize = 11;
            $b
        }
        {
            let $i: usize = 12;
            $b
        }
        {
            let $i: usize = 13;
            $b
        }
        {
            let $i: usize = 14;
            $b
        }
        {
            let $i: usize = 15;
            $b
        }
    }};
}

/// One sm_90 instruction with no operands, emitted in the Hopper module only (a no-op in the
/// sm_80 one, whose target lacks it); `asm!` without `nomem`, so no memory access moves
/// across it.
macro_rules! hopper_only_instruction {
    ($(#[$doc:meta])* $name:ident, $ptx:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub(crate) fn $name() {
            #[cfg(feature = "hopper")]
            // SAFETY: the callers' contracts say when each instruction may run; it takes no
            // operands and touches no memory by itself.
            unsafe {
                core::arch::asm!($ptx, options(nostack))
            };
        }
    };
}

hopper_only_instruction!(
    /// Programmatic dependent launch, first half: waits until the grids before this one on
    /// the stream have finished and their writes are visible. Everything a kernel reads that
    /// an earlier kernel may write (`X`, the split-K workspace and counters, `Y`) comes after
    /// it; the packed weight may stream before it. A no-op when the launch did not ask for
    /// overlap.
    wait_for_prior_grids,
    "griddepcontrol.wait;"
);

hopper_only_instruction!(
    /// Programmatic dependent launch, second half: the next grid on the stream may start its
    /// blocks (they stream their own weight, then wait in [`wait_for_prior_grids`] until this
    /// grid has finished). A scheduling hint; orders nothing.
    allow_dependent_grids,
    "griddepcontrol.launch_dependents;"
);

hopper_only_instruction!(
    /// Cluster split-K: this thread arrives at the cluster barrier, with release semantics
    /// for its shared-memory writes. Every thread of every block of the cluster executes it
    /// (`.aligned`).
    cluster_arrive,
    "barrier.cluster.arrive.release.aligned;"
);

hopper_only_instruction!(
    /// Waits until every thread of the cluster has arrived ([`cluster_arrive`]); their shared
    /// memory writes before the arrival are then visible. Every thread of the block executes
    /// it (`.aligned`).
    cluster_wait,
    "barrier.cluster.wait.acquire.aligned;"
);

/// Two f32 at shared address `addr` of the cluster's block `rank` (distributed shared
/// memory). Zeros in the sm_80 module, which never calls it.
///
/// # Safety
/// `addr` is 8-byte aligned shared memory of the block layout; block `rank` of the cluster
/// has written it before a [`cluster_arrive`] this thread has waited for, and has not exited.
#[inline(always)]
pub(crate) unsafe fn ld_cluster_f32x2(addr: u32, rank: u32) -> [f32; 2] {
    #[cfg(feature = "hopper")]
    {
        let (a, b): (f32, f32);
        core::arch::asm!(
            "{{ .reg .b32 r; mapa.shared::cluster.u32 r, {p}, {k}; ld.shared::cluster.v2.f32 {{{a}, {b}}}, [r]; }}",
            a = out(reg32) a, b = out(reg32) b, p = in(reg32) addr, k = in(reg32) rank,
            options(readonly, nostack)
        );
        [a, b]
    }
    #[cfg(not(feature = "hopper"))]
    {
        let _ = (addr, rank);
        [0.0, 0.0]
    }
}

/// This block's place in a W4A16 grid (`W4a16Args`: block `b` is row block `b mod m_blocks`,
/// column block `(b / m_blocks) mod col_blocks`, split `b / (m_blocks·col_blocks)`; in
/// cluster split-K, split `b mod splits` of tile `b / splits`), with the split count:
/// `(mblk, cb, split, splits)`.
#[inline(always)]
pub(crate) fn block_place(a: &forge_kernel_abi::runtime::W4a16Args) -> (u32, u32, u32, u32) {
    // `max(1)`: no division-by-zero panic path (the launcher never passes 0).
    let (m_blocks, col_blocks, splits) = (a.m_blocks.max(1), a.col_blocks.max(1), a.splits.max(1));
    let bid = crate::device::block_x();
    if cfg!(feature = "hopper") && a.cluster != 0 {
        let tile = bid / splits;
        return (tile % m_blocks, (tile / m_blocks) % col_blocks, bid % splits, splits);
    }
    let rest = bid / m_blocks;
    (bid % m_blocks, rest % col_blocks, rest / col_blocks, splits)
}

/// A grouped launch's row block `task` as the ungrouped launch of its rows: its expert's
/// weight, its rows of `X` and `Y`, its own split-K partials and counters (the
/// `W4a16Args::grouped` contract). The block then runs as row block 0 of that launch.
///
/// # Safety
/// The [`forge_kernel_abi::runtime::W4a16Args`] contract of a grouped launch holds;
/// `task < a.m_blocks`.
#[inline(always)]
pub(crate) unsafe fn task_view(a: &forge_kernel_abi::runtime::W4a16Args, task: u32) -> forge_kernel_abi::runtime::W4a16Args {
    use forge_kernel_abi::{DevPtr, DevPtrMut, KernelParam};
    let t = a.tasks.ptr().add(3 * task as usize);
    let (expert, row0, rows) = (*t as usize, *t.add(1) as usize, *t.add(2));
    let (k, n, n_pad) = (a.k as usize, a.n as usize, a.n_pad as usize);
    let mut v = *a;
    v.x = DevPtr::from_device(a.x.ptr().add(row0 * k));
    v.y = DevPtrMut::from_device(a.y.ptr().add(row0 * n));
    v.w = DevPtr::from_device(a.w.ptr().add(expert * a.expert_codes as usize));
    v.meta = DevPtr::from_device(a.meta.ptr().add(expert * a.expert_records as usize));
    v.ws = DevPtrMut::from_device(a.ws.ptr().add(row0 * a.splits.max(1) as usize * n_pad));
    v.counters = DevPtrMut::from_device(a.counters.ptr().add(task as usize * a.col_blocks as usize));
    v.m = rows;
    v.m_blocks = 1;
    v
}

/// Position `k = g·gs + r` (`r < gs`) kept by additions: a division per stage or step would
/// cost as much as a step's dequantization.
#[derive(Clone, Copy)]
pub(crate) struct GroupCursor {
    pub(crate) g: u32,
    pub(crate) r: u32,
}

impl GroupCursor {
    #[inline(always)]
    pub(crate) fn at(k: u32, gs: u32) -> Self {
        GroupCursor { g: k / gs, r: k % gs }
    }

    #[inline(always)]
    pub(crate) fn advance(&mut self, d: u32, gs: u32) {
        self.r += d;
        while self.r >= gs {
            self.r -= gs;
            self.g += 1;
        }
    }

    /// [`GroupCursor::advance`] by `d ≤ gs` (at most one wrap): no loop in the hot path.
    #[inline(always)]
    pub(crate) fn advance_within(&mut self, d: u32, gs: u32) {
        self.r += d;
        if self.r >= gs {
            self.r -= gs;
            self.g += 1;
        }
    }

    /// Groups that `[k, k + len)` touches, at most `g_pad − g`.
    #[inline(always)]
    pub(crate) fn groups_in(self, len: u32, gs: u32, g_pad: u32) -> u32 {
        let mut cnt = 1;
        let mut o = self.r + len - 1;
        while o >= gs {
            o -= gs;
            cnt += 1;
        }
        cnt.min(g_pad.saturating_sub(self.g))
    }
}

#[cfg(not(feature = "hopper"))]
pub mod dequant;
pub mod epilogue;
#[cfg(not(feature = "hopper"))]
pub mod experts;
pub mod mma;
pub mod skinny;
pub mod skinny_math;
#[cfg(not(feature = "hopper"))]
pub mod topk;
#[cfg(not(feature = "hopper"))]
pub mod w4a16;
#[cfg(feature = "hopper")]
pub mod wgmma;
