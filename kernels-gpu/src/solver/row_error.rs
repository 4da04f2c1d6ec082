//! `gptq_row_error_{f32,f16,bf16,fp8}`: per row of a solved weight, the squared error of its
//! dequantized codes and its squared norm, `Σ ((q − z)·s − x)²` and `Σ x²` in f64, for the
//! relative weight error the checkpoint summary reports, without downloading the codes and
//! re-reading the weight on the host. The sums are the host error pass's bit for bit
//! (`src/checkpoint/quant.rs`, `lane_sums`): element `i` of a group goes into lane `i mod 8`
//! (groups in order, elements in order within each lane), each lane is one f64 chain of
//! separate multiplies and adds, and the row's value is `((−0 + lane0) + lane1) + … + lane7`.
//! `(s, z)` is the record's scale as the checkpoint stores it (`stored_scale`) and its zero
//! point, `x` the weight widened exactly ([`crate::device::Elem`]).
//!
//! Thread mapping: 8 threads per row (thread `l` = lane `l`), 4 rows per warp, 32 per block;
//! the warp-uniform loop strides over rows by the grid's row count, so every lane of a warp
//! reaches the shuffles that gather a row's 8 lanes in order.
//!
//! # Safety (upheld by the host launcher)
//! `w` is `rows·cols` elements of the kernel's dtype; `codes` `rows·cols` bytes; `qmeta`
//! `rows·n_groups` records, `n_groups = ⌈cols/gs⌉`; `sums` `2·rows` f64; `gs > 0`; the block
//! has `ROW_ERROR_THREADS` threads.

use crate::device::{block_x, grid_dim_x, shfl_idx_f64, thread_x, Elem};
use forge_kernel_abi::elem::{Bf16Bits, F16Bits, Fp8E4M3};
use forge_kernel_abi::solver::{RowErrorArgs, ROW_ERROR_THREADS};
use forge_numerics::{dequantize, stored_scale, QMetaPacked, ScaleDtype};

/// Independent sums per row: the host pass's `LANES`.
const LANES: u32 = 8;

macro_rules! row_error_entry {
    ($marker:ident, $name:ident, $t:ty) => {
        forge_kernel_abi::row_error_kernel! {
            /// Per-row error and norm sums for one weight dtype; see the module docs.
            $marker => fn $name(args) {
                row_error::<$t>(&args)
            }
        }
    };
}

row_error_entry!(GptqRowErrorF32, gptq_row_error_f32, f32);
row_error_entry!(GptqRowErrorF16, gptq_row_error_f16, F16Bits);
row_error_entry!(GptqRowErrorBf16, gptq_row_error_bf16, Bf16Bits);
row_error_entry!(GptqRowErrorFp8, gptq_row_error_fp8, Fp8E4M3);

#[inline(always)]
unsafe fn row_error<T: Elem>(args: &RowErrorArgs) {
    let RowErrorArgs { w, codes, qmeta, rows, cols, gs, n_groups, scale_dtype, sums } = *args;
    let (w, codes, qmeta, sums) = (w.ptr() as *const T, codes.ptr(), qmeta.ptr(), sums.ptr());
    let dtype = ScaleDtype::from_u32(scale_dtype);
    let gs = gs.max(1); // no division-by-zero panic path
    let rows_per_block = ROW_ERROR_THREADS / LANES;
    let lane = thread_x() % LANES;
    let warp_first_lane = thread_x() / 32 * 32;
    let row_lane0 = thread_x() - lane; // this row's lane 0 in the block
    let mut base = block_x() * rows_per_block;
    // Warp-uniform: `base` is the same on every lane, so all 32 reach the shuffles.
    while base < rows {
        let r = base + thread_x() / LANES;
        let (mut err, mut norm) = (0f64, 0f64);
        if r < rows {
            let row = r as usize * cols as usize;
            for g in 0..n_groups {
                let m = QMetaPacked::from_u32(*qmeta.add((r * n_groups + g) as usize));
                let (s, z) = (stored_scale(m.log2_scale_q88, dtype), m.qzero_f32());
                let c0 = g * gs;
                let len = if cols - c0 < gs { cols - c0 } else { gs };
                let mut i = lane;
                while i < len {
                    let c = row + (c0 + i) as usize;
                    let x = f64::from(T::load_f32(w, c));
                    let d = f64::from(dequantize(f32::from(*codes.add(c)), s, z)) - x;
                    err += d * d;
                    norm += x * x;
                    i += LANES;
                }
            }
        }
        // The row's lanes in order, as the host adds its lane array.
        let (mut e, mut n) = (-0.0f64, -0.0f64);
        let first = row_lane0 - warp_first_lane;
        let mut j = 0;
        while j < LANES {
            e += shfl_idx_f64(err, first + j);
            n += shfl_idx_f64(norm, first + j);
            j += 1;
        }
        if r < rows && lane == 0 {
            *sums.add(2 * r as usize) = e;
            *sums.add(2 * r as usize + 1) = n;
        }
        base += grid_dim_x() * rows_per_block;
    }
}
