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
