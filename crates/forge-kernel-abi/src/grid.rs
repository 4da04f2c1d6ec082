//! Grid kernels: absmax range meta and the MSE / Lᵖ scale search (docs/kernels.md §2).

crate::kernel_args! {
    /// `range_meta_*`: one qmeta4 record per (row, group) of a weight; `w` holds the bytes of the element type the kernel name says.
    /// Safety: `w` holds `rows·cols` elements (16-byte aligned allocation), `qmeta`
    /// `rows·n_groups` records, `first_bad` one u64 (zeroed; receives `!index` of a NaN/inf).
    pub struct RangeMetaArgs in grid => range_meta_kernel {
        /// Weight, row-major.
        pub w: forge_kernel_abi::DevPtr<u8>,
        /// Rows.
        pub rows: u32,
        /// Columns.
        pub cols: u32,
        /// Group size (a multiple of 32 in 32..=1024).
        pub gs: u32,
        /// `ceil(cols / gs)`.
        pub n_groups: u32,
        /// Bits per code, 2..=8.
        pub bits: u32,
        /// 1 for a symmetric range.
        pub symmetric: u32,
        /// Output records.
        pub qmeta: forge_kernel_abi::DevPtrMut<u32>,
        /// NaN/inf report.
        pub first_bad: forge_kernel_abi::DevPtrMut<u64>,
    }
}

crate::kernel_args! {
    /// `mse_search_*`: the absmax record refined by the shrink factor (constant memory
    /// `MSE_CANDIDATES`, `n_cand ≤ 1024`) that minimises `Σ|ŷ − x|^norm` at the candidate's
    /// scale as stored in `scale_dtype`. Safety: as
    /// [`RangeMetaArgs`], plus `n_cand` candidates written and [`MseSharedLayout::new`]`(gs,
    /// gpb).total` bytes of dynamic shared memory.
    pub struct MseSearchArgs in grid => mse_search_kernel {
        /// Weight, row-major.
        pub w: forge_kernel_abi::DevPtr<u8>,
        /// Rows.
        pub rows: u32,
        /// Columns.
        pub cols: u32,
        /// Group size.
        pub gs: u32,
        /// `ceil(cols / gs)`.
        pub n_groups: u32,
        /// Bits per code.
        pub bits: u32,
        /// 1 for a symmetric range.
        pub symmetric: u32,
        /// Candidates in constant memory.
        pub n_cand: u32,
        /// Loss exponent.
        pub norm: f32,
        /// The dtype scales are stored in (`forge_numerics::ScaleDtype::to_u32`): each
        /// candidate's loss is taken at its stored scale.
        pub scale_dtype: u32,
        /// Groups per block.
        pub gpb: u32,
        /// Output records.
        pub qmeta: forge_kernel_abi::DevPtrMut<u32>,
        /// NaN/inf report.
        pub first_bad: forge_kernel_abi::DevPtrMut<u64>,
    }
}

/// Shared-memory layout of one `mse_search` block: `gpb` group rows of `gs + 4` f32
/// (16-byte aligned rows), then `gpb` u32 base records, then (8-aligned) `gpb` u64 best keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MseSharedLayout {
    /// Bytes per staged group row.
    pub row_bytes: u32,
    /// Offset of the base qmeta records.
    pub base_meta: u32,
    /// Offset of the best (key, k) words.
    pub best: u32,
    /// Total bytes.
    pub total: u32,
}

impl MseSharedLayout {
    /// The layout for `gpb` groups of `gs` elements.
    #[inline]
    pub const fn new(gs: u32, gpb: u32) -> Self {
        let row_bytes = (gs + 4) * 4;
        let base_meta = gpb * row_bytes;
        let best = (base_meta + gpb * 4 + 7) & !7;
        MseSharedLayout { row_bytes, base_meta, best, total: best + gpb * 8 }
    }
}
