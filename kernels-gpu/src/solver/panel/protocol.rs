//! The panel block's barrier protocol as data: which role meets at which barrier, how (waits
//! with `bar.sync` or only counts itself with `bar.arrive`) and how often per 64-column block.
//! Role code names its barrier through [`meet!`] with an entry of this table, so the barrier
//! id and thread count come from one place, and the `const` check below rejects a table in
//! which a barrier's participants do not add up to its thread count, or meet a different
//! number of times per block (a mismatch would deadlock or release a barrier early).

use forge_kernel_abi::solver::{
    SOLVER_BLOCK, SOLVER_THREADS, SOLVER_UPDATER_THREADS as UPDATERS, SOLVER_WORKER_THREADS as WORKERS,
};

/// Columns of one chain slice.
pub(super) const SLICE: usize = 16;
/// Slices per 64-column block.
pub(super) const SLICES: u32 = SOLVER_BLOCK / SLICE as u32;

/// The three roles of a block's threads (threads `0..128`, `128..192`, `192..224`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Loads, products, write-out.
    Workers,
    /// Updates between the chain's slices.
    Updaters,
    /// The column-by-column recurrence.
    Chain,
}

impl Role {
    pub(super) const fn threads(self) -> u32 {
        match self {
            Role::Workers => WORKERS,
            Role::Updaters => UPDATERS,
            Role::Chain => 32,
        }
    }
}

/// How a role takes part in a barrier.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// `bar.sync`: count and wait.
    Sync,
    /// `bar.arrive`: count without waiting (earlier shared writes become visible to the
    /// waiters).
    Arrive,
}

/// A hardware barrier: its id and the threads that complete it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Barrier {
    pub id: u32,
    pub threads: u32,
}

/// Barrier 0 (`__syncthreads`): B1 "block b staged" and B2 "block b solved".
pub(super) const BLOCK: Barrier = Barrier { id: 0, threads: SOLVER_THREADS };
/// Barrier 1: the worker warps among themselves (product pipeline stages, buffer reuse).
pub(super) const WORKERS_ONLY: Barrier = Barrier { id: 1, threads: WORKERS };
/// Barrier 2: "slice errors stored", chain → updaters.
pub(super) const SLICE_ERRORS: Barrier = Barrier { id: 2, threads: UPDATERS + 32 };
/// Barrier 3: "next slice updated", updaters → chain.
pub(super) const SLICE_READY: Barrier = Barrier { id: 3, threads: UPDATERS + 32 };

/// How often a role meets a barrier for one block that has a successor in the panel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Count {
    /// A fixed number of times.
    Fixed(u32),
    /// Depends on the block (the workers' product chunks); allowed only for a barrier that
    /// one role meets alone.
    PerChunk,
}

/// One row of the protocol.
#[derive(Clone, Copy)]
pub(super) struct Use {
    pub barrier: Barrier,
    pub role: Role,
    pub op: Op,
    pub per_block: Count,
}

pub(super) const WORKERS_B1_B2: Use =
    Use { barrier: BLOCK, role: Role::Workers, op: Op::Sync, per_block: Count::Fixed(2) };
pub(super) const UPDATERS_B1_B2: Use =
    Use { barrier: BLOCK, role: Role::Updaters, op: Op::Sync, per_block: Count::Fixed(2) };
pub(super) const CHAIN_B1_B2: Use = Use { barrier: BLOCK, role: Role::Chain, op: Op::Sync, per_block: Count::Fixed(2) };
pub(super) const WORKERS_PIPELINE: Use =
    Use { barrier: WORKERS_ONLY, role: Role::Workers, op: Op::Sync, per_block: Count::PerChunk };
pub(super) const CHAIN_STORES_SLICE: Use =
    Use { barrier: SLICE_ERRORS, role: Role::Chain, op: Op::Arrive, per_block: Count::Fixed(SLICES - 1) };
pub(super) const UPDATERS_TAKE_SLICE: Use =
    Use { barrier: SLICE_ERRORS, role: Role::Updaters, op: Op::Sync, per_block: Count::Fixed(SLICES - 1) };
pub(super) const UPDATERS_RELEASE_SLICE: Use =
    Use { barrier: SLICE_READY, role: Role::Updaters, op: Op::Arrive, per_block: Count::Fixed(SLICES - 1) };
pub(super) const CHAIN_WAITS_SLICE: Use =
    Use { barrier: SLICE_READY, role: Role::Chain, op: Op::Sync, per_block: Count::Fixed(SLICES - 1) };

/// The whole protocol.
pub(super) const PROTOCOL: [Use; 8] = [
    WORKERS_B1_B2,
    UPDATERS_B1_B2,
    CHAIN_B1_B2,
    WORKERS_PIPELINE,
    CHAIN_STORES_SLICE,
    UPDATERS_TAKE_SLICE,
    UPDATERS_RELEASE_SLICE,
    CHAIN_WAITS_SLICE,
];

/// Per barrier: the participating roles' threads add up to its thread count, every
/// participant meets it equally often per block, some participant waits, and a role-varying
/// count only where one role meets alone. The block barrier must see every role wait.
const fn check(protocol: &[Use]) -> bool {
    let mut i = 0;
    while i < protocol.len() {
        let b = protocol[i].barrier;
        let (mut threads, mut waits, mut roles) = (0, false, 0);
        let mut j = 0;
        while j < protocol.len() {
            let u = protocol[j];
            if u.barrier.id == b.id {
                if u.barrier.threads != b.threads {
                    return false;
                }
                threads += u.role.threads();
                roles += 1;
                waits |= matches!(u.op, Op::Sync);
                match (u.per_block, protocol[i].per_block) {
                    (Count::Fixed(x), Count::Fixed(y)) if x == y => {}
                    (Count::PerChunk, Count::PerChunk) => {}
                    _ => return false,
                }
                if b.id == BLOCK.id && !matches!(u.op, Op::Sync) {
                    return false;
                }
            }
            j += 1;
        }
        if threads != b.threads || !waits {
            return false;
        }
        if matches!(protocol[i].per_block, Count::PerChunk) && roles != 1 {
            return false;
        }
        i += 1;
    }
    true
}

const _: () = assert!(check(&PROTOCOL), "the panel's barrier protocol is inconsistent");
// Named barriers need whole warps, and the hardware has 16 of them.
const _: () =
    assert!(SLICE_ERRORS.threads.is_multiple_of(32) && WORKERS_ONLY.threads.is_multiple_of(32) && SLICE_READY.id < 16);

/// Meets the barrier of protocol entry `$use` (a `const` of this module): `bar.sync` or
/// `bar.arrive` with the table's id and thread count (barrier 0 is `__syncthreads`).
macro_rules! meet {
    ($use:expr) => {{
        const U: $crate::solver::panel::protocol::Use = $use;
        if U.barrier.id == 0 {
            $crate::device::sync_threads()
        } else if matches!(U.op, $crate::solver::panel::protocol::Op::Sync) {
            $crate::device::sync_named::<{ U.barrier.id }, { U.barrier.threads }>()
        } else {
            $crate::device::arrive_named::<{ U.barrier.id }, { U.barrier.threads }>()
        }
    }};
}
pub(super) use meet;
