//! Bit packing of codes into int32 words on the device (issue 12, docs/kernels.md §5).

crate::kernel_args! {
    /// `pack_rows` / `pack_rows_transposed`: u8 codes `(rows, cols)` → each row packed as a
    /// dense little-endian bit stream of `bits`-bit elements, `w_row = ceil(cols·bits/32)`
    /// words (`src/pack`'s `pack_rows`). `pack_rows` writes `words` as `(rows, w_row)`
    /// (compressed-tensors `weight_packed`), `pack_rows_transposed` as `(w_row, rows)` (GPTQ
    /// `qweight`). A block packs a tile of `PACK_THREADS / tile_chunks` rows × `tile_chunks`
    /// chunks of 32 codes. Safety: `codes` holds `rows·cols` bytes from a 16-byte aligned
    /// address; `words` `rows·w_row` u32; `first_bad` one u64 (zeroed by the caller; receives
    /// `!index` of the first code `≥ 2^bits`); `bits` in 2..=8; `tile_chunks` in {1, 2, 4, 8};
    /// block `PACK_THREADS` threads; dynamic shared memory
    /// [`PackSharedLayout::new`]`(bits, tile_chunks, transposed).total` bytes.
    pub struct PackArgs in pack => pack_kernel {
        /// Codes, row-major, one per byte.
        pub codes: forge_kernel_abi::DevPtr<u8>,
        /// Rows.
        pub rows: u32,
        /// Codes per row.
        pub cols: u32,
        /// Bits per code, 2..=8.
        pub bits: u32,
        /// Chunks of 32 codes per tile row: 1, 2, 4 or 8.
        pub tile_chunks: u32,
        /// Packed words.
        pub words: forge_kernel_abi::DevPtrMut<u32>,
        /// Out-of-range code report.
        pub first_bad: forge_kernel_abi::DevPtrMut<u64>,
    }
}

/// Threads per packing block.
pub const PACK_THREADS: u32 = 256;

/// Shared-memory layout of one packing block, in bytes: the tile's codes, one row of
/// [`PackSharedLayout::codes_row_bytes`] per tile row (each row's bytes start at its
/// offset mod 16, so 16-byte loads stay aligned, with room for the unaligned readers' 36-byte
/// window), then the packed words, padded by one word per line so neither the writers
/// (stride `bits` words) nor the readers (consecutive words) conflict on banks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackSharedLayout {
    /// Rows per tile, `PACK_THREADS / tile_chunks`.
    pub tile_rows: u32,
    /// Bytes per staged code row: `32·tile_chunks + 32`.
    pub codes_row_bytes: u32,
    /// Offset of the packed words.
    pub words: u32,
    /// Word offset between tile rows in the word tile (1 for the transposed layout).
    pub row_stride: u32,
    /// Word offset between a row's words in the word tile (1 for the row layout).
    pub word_stride: u32,
    /// Total bytes.
    pub total: u32,
}

impl PackSharedLayout {
    /// The layout for `bits`-bit codes, `tile_chunks` chunks per tile row, row or transposed
    /// output.
    #[inline]
    pub const fn new(bits: u32, tile_chunks: u32, transposed: bool) -> Self {
        let tile_chunks = if tile_chunks == 0 { 1 } else { tile_chunks };
        let tile_rows = PACK_THREADS / tile_chunks;
        let codes_row_bytes = 32 * tile_chunks + 32;
        let words = tile_rows * codes_row_bytes; // a multiple of 16
        let tile_words = bits * tile_chunks;
        let (row_stride, word_stride, n_words) = if transposed {
            (1, tile_rows + 1, tile_words * (tile_rows + 1))
        } else {
            (tile_words + 1, 1, tile_rows * (tile_words + 1))
        };
        PackSharedLayout { tile_rows, codes_row_bytes, words, row_stride, word_stride, total: words + 4 * n_words }
    }
}
