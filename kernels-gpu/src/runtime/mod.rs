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
}

pub mod dequant;
pub mod epilogue;
pub mod mma;
pub mod skinny;
pub mod w4a16;
