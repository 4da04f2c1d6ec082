//! Kernels for tests and benchmarks only (feature `test-kernels`).

crate::kernel_args! {
    /// `fast_division`: `out[i] = a[i] / b[i]` through the solver's branch-free division.
    /// Safety: `a`, `b`, `out` hold `n` f32.
    pub struct FastDivisionArgs in testing => fast_division_kernel {
        /// Dividends.
        pub a: forge_kernel_abi::DevPtr<f32>,
        /// Divisors.
        pub b: forge_kernel_abi::DevPtr<f32>,
        /// Elements.
        pub n: u32,
        /// Quotients.
        pub out: forge_kernel_abi::DevPtrMut<f32>,
    }
}

crate::kernel_args! {
    /// `fma_throughput`: `iters` × 8 dependent-chain FMAs per thread (the f32 FMA floor).
    /// Safety: `out` holds one f32 per launched thread.
    pub struct FmaThroughputArgs in testing => fma_throughput_kernel {
        /// Loop trips.
        pub iters: u32,
        /// Start value (defeats constant folding).
        pub seed: f32,
        /// One result per thread.
        pub out: forge_kernel_abi::DevPtrMut<f32>,
    }
}
