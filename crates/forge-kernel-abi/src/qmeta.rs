//! Whole-tensor qmeta4 decode (the end-to-end check of the Rust → PTX → launch path).

crate::kernel_args! {
    /// `qmeta_decode`: `scale[i], qzero[i]` of record `i < n`. One thread per record,
    /// grid-stride. Safety: `qmeta`, `scale`, `qzero` hold `n` elements each.
    pub struct QmetaDecodeArgs in qmeta => qmeta_decode_kernel {
        /// Little-endian qmeta4 records.
        pub qmeta: forge_kernel_abi::DevPtr<u32>,
        /// Records.
        pub n: u32,
        /// Decoded scales.
        pub scale: forge_kernel_abi::DevPtrMut<f32>,
        /// Zero points as f32.
        pub qzero: forge_kernel_abi::DevPtrMut<f32>,
    }
}
