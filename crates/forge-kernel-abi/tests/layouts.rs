//! The shared-memory layouts the kernels and their launchers share.

/// The solver's shared-memory layout: every f32 and vector-accessed tile 16-byte aligned,
/// regions disjoint and in order, and two blocks per SM for 512-column panels (the launch
/// bounds assume it; an H100/H200 SM has 228 KiB, 1 KiB of it reserved per block).
#[test]
fn solver_shared_layout_is_aligned_and_fits_two_blocks_per_sm() {
    use forge_kernel_abi::solver::SolverSharedLayout;
    for rpc in [16u32, 32] {
        for panel in [128u32, 256, 512, 1024] {
            let l = SolverSharedLayout::new(rpc, panel);
            let starts = [
                l.stages,
                l.work_tile,
                l.u_block,
                l.perm,
                l.group_of,
                l.scale_tile,
                l.zero_tile,
                l.diag_recip,
                l.slow_flags,
                l.codes,
                l.total,
            ];
            assert!(starts.windows(2).all(|w| w[0] < w[1]), "rpc {rpc} panel {panel}: {l:?}");
            for (i, off) in starts.iter().enumerate() {
                assert_eq!(off % 16, 0, "rpc {rpc} panel {panel}: region {i} at {off}");
            }
            assert_eq!(l.stage_bytes % 16, 0);
            if panel <= 512 {
                assert!(2 * (l.total + 1024) <= 228 * 1024, "rpc {rpc}: {} bytes per block", l.total);
            }
        }
    }
}

/// The packing kernel's shared memory: code rows and the word tile 16-byte aligned and
/// disjoint, every index the kernel forms inside its region, and within the 48 KiB a launch
/// gets without opting in (so eight blocks of 256 threads fit an SM).
#[test]
fn pack_shared_layout_holds_every_index_the_kernel_forms() {
    use forge_kernel_abi::pack::{PackSharedLayout, PACK_THREADS};
    for bits in 2..=8u32 {
        for k in [1u32, 2, 4, 8] {
            for transposed in [false, true] {
                let l = PackSharedLayout::new(bits, k, transposed);
                let what = format!("bits {bits} k {k} transposed {transposed}: {l:?}");
                assert_eq!(l.tile_rows * k, PACK_THREADS, "{what}");
                assert_eq!(l.codes_row_bytes % 16, 0, "{what}");
                assert_eq!(l.words % 16, 0, "{what}");
                assert_eq!(l.words, l.tile_rows * l.codes_row_bytes, "{what}");
                // The unaligned chunk reader's last byte: lead 15, chunk k − 1, a 36-byte window.
                assert!(15 + 32 * (k - 1) + 36 <= l.codes_row_bytes, "{what}");
                // The 16-byte staging pieces: up to 2k + 1 of them per row.
                assert!(16 * (2 * k + 1) <= l.codes_row_bytes, "{what}");
                // The largest word index a thread writes or reads.
                let last = (l.tile_rows - 1) * l.row_stride + (bits * k - 1) * l.word_stride;
                assert!(l.words + 4 * (last + 1) <= l.total, "{what}");
                assert!(l.total <= 48 * 1024, "{what}");
            }
        }
    }
}
