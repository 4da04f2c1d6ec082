//! Runtime kernels: the W4A16 matmul `Y[M, N] = X[M, K] · dequant(W)[N, K]ᵀ` on qmeta4 records
//! decoded on the fly, and the dense dequantization that feeds cuBLAS at large `M`
//! (docs/kernels.md §6, the packed layout in docs/formats.md).
//!
//! The packed weight (made by the host's `runtime::pack_for_kernel`):
//! * codes: tiles of `16 (k) × 64 (n)` 4-bit codes, 512 bytes each, tile `(nt, kt)` at word
//!   offset `(nt·(k_pad/16) + kt)·128`. Inside a tile, lane `l` of a warp owns the 16 bytes at
//!   `l·16`: word `i` (0..4) holds the codes of the mma B fragments of n8-tiles `2i` and
//!   `2i + 1` for that lane, nibble `p` = `j + 4h` (`j` 0..4, `h` 0..2) at bits `4p..4p+4` being
//!   n8-tile `2i + j/2`, column `8·(2i + j/2) + l/4`, row `k = 2·(l mod 4) + 8·(j mod 2) + h`;
//!   so `(w >> 4j) & 0x000f000f` is one bf16x2 / f16x2 register pair of the fragment;
//! * 8-bit codes (5–8-bit grids; the `w8a16_skinny_*` and `w8_dequant_*` kernels): tiles of
//!   the same `16 × 64`, 1024 bytes each, tile `(nt, kt)` at word offset
//!   `(nt·(k_pad/16) + kt)·256`, as two 512-byte halves. Lane `l = 4g + t` owns the 16 bytes
//!   at `l·16` of each half: word `2u + c` of half `h` holds column `16i + 8c + g`,
//!   `i = 2h + u`, at `k` `2t, 2t+1, 2t+8, 2t+9` (bytes 0–3), so bytes 0–1 and 2–3 are the
//!   mma A fragment's register pairs of that column (`forge_numerics::codes8`);
//! * records: raw qmeta4 `u32`s `[g_pad][n_pad]` (group-major, so a block's records of one
//!   group are contiguous), `g_pad = ⌈k_pad / gs⌉`;
//! * `n_pad` a multiple of [`PACK_N_ALIGN`], `k_pad` of [`PACK_K_ALIGN`]; padded codes and
//!   records dequantize to exactly 0.

/// Threads per W4A16 block (8 warps).
pub const W4A16_THREADS: u32 = 256;
/// Rows (`k`) of one packed code tile: one `m16n8k16` step.
pub const PACK_TILE_K: u32 = 16;
/// Columns (`n`) of one packed code tile: one warp's 64 output columns.
pub const PACK_TILE_N: u32 = 64;
/// Bytes of one packed 4-bit tile.
pub const PACK_TILE_BYTES: u32 = PACK_TILE_K * PACK_TILE_N / 2;
/// Bytes of one packed 8-bit tile: two 512-byte halves, each read like a 4-bit tile (lane `l`
/// the 16 bytes at `l·16`).
pub const PACK_TILE_BYTES_W8: u32 = 2 * PACK_TILE_BYTES;
/// `n_pad` is a multiple of this (the widest block's columns).
pub const PACK_N_ALIGN: u32 = 256;
/// `k_pad` is a multiple of this (the longest stage's `k`).
pub const PACK_K_ALIGN: u32 = 128;
/// Pipeline depth (stages in shared memory; `stages − 1` in flight). One value for every shape,
/// because it is a `cp.async.wait_group` immediate in the kernel.
pub const W4A16_STAGES: u32 = 4;
/// u64 slots per lane quad in a decoded-record buffer (8 columns + 2 of padding).
pub const DEC_Q_STRIDE: u32 = 10;
/// The most split-K partitions one launch uses (the final reduction reads them in batches of 8).
pub const W4A16_MAX_SPLITS: u32 = 32;

/// One block shape of the W4A16 kernel: `mb` 16-row blocks of `X`, `wn` warps along `n`
/// (64 columns each) times `wk` warps along `k`, stages of `ksteps` 16-deep steps (each warp
/// takes `ksteps / wk` consecutive ones), `stages` stages in the `cp.async` pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W4a16Shape {
    /// 16-row blocks of `X` per block (1..=4).
    pub mb: u32,
    /// Warps along `n`.
    pub wn: u32,
    /// Warps along `k` (partial sums added in shared memory at the end).
    pub wk: u32,
    /// 16-deep `k` steps per pipeline stage.
    pub ksteps: u32,
    /// Pipeline depth.
    pub stages: u32,
    /// Blocks per SM the launch bounds ask for.
    pub min_blocks: u32,
}

impl W4a16Shape {
    /// The shape for `mb` 16-row blocks: small `M` (1–2 blocks) streams 128 columns × 128 `k`
    /// per stage with two blocks per SM; larger `M` uses 256 × 64 stages and one block per SM
    /// (its 128 accumulators per thread need the registers).
    pub const fn for_mb(mb: u32) -> Self {
        if mb <= 2 {
            W4a16Shape { mb, wn: 2, wk: 4, ksteps: 8, stages: W4A16_STAGES, min_blocks: 2 }
        } else {
            W4a16Shape { mb, wn: 4, wk: 2, ksteps: 4, stages: W4A16_STAGES, min_blocks: 1 }
        }
    }

    /// Output columns per block.
    pub const fn n_block(&self) -> u32 {
        self.wn * PACK_TILE_N
    }

    /// `k` per stage.
    pub const fn k_stage(&self) -> u32 {
        self.ksteps * PACK_TILE_K
    }

    /// Rows of `X` per block.
    pub const fn m_block(&self) -> u32 {
        self.mb * 16
    }

    /// The most groups a stage spans (group sizes are multiples of 32).
    pub const fn max_groups_per_stage(&self) -> u32 {
        self.k_stage() / 32
    }

    /// Bytes of one stage's codes.
    pub const fn b_stage_bytes(&self) -> u32 {
        self.wn * self.ksteps * PACK_TILE_BYTES
    }

    /// Bytes of one stage's `X` tile (`m_block × k_stage` 16-bit values).
    pub const fn a_stage_bytes(&self) -> u32 {
        self.m_block() * self.k_stage() * 2
    }

    /// Bytes of one stage's raw records (`max_groups_per_stage × n_block` u32).
    pub const fn raw_stage_bytes(&self) -> u32 {
        self.max_groups_per_stage() * self.n_block() * 4
    }

    /// Bytes of one buffer of decoded records: per group and `n` warp, the u64 record of
    /// column `8t + q` at `q·DEC_Q_STRIDE + t` (a lane's 8 columns contiguous; the padded
    /// stride keeps the 16-byte reads of the 8 lane quads on distinct banks).
    pub const fn dec_bytes(&self) -> u32 {
        self.max_groups_per_stage() * self.wn * 8 * DEC_Q_STRIDE * 8
    }

    /// Bytes the warps along `k` need to add their partial sums (reuses the pipeline).
    pub const fn reduce_bytes(&self) -> u32 {
        (self.wk - 1) * self.wn * self.mb * 32 * 32 * 4
    }

    /// The shared-memory layout.
    pub const fn layout(&self) -> W4a16SharedLayout {
        let stage_bytes = self.b_stage_bytes() + self.a_stage_bytes() + self.raw_stage_bytes();
        let b = 0;
        let a = b + self.b_stage_bytes();
        let raw = a + self.a_stage_bytes();
        let pipeline = self.stages * stage_bytes;
        // `stages` raw slots ride in the stages; one more holds stage 0's records.
        let raw0 = pipeline;
        let dec = raw0 + self.raw_stage_bytes();
        let flag = dec + 2 * self.dec_bytes();
        let total = flag + 16;
        W4a16SharedLayout { stage_bytes, b, a, raw, raw0, dec, flag, total }
    }
}

/// Byte offsets in a W4A16 block's dynamic shared memory. Stage `s` of the pipeline starts
/// at `(s mod stages)·stage_bytes` and holds codes (`b`), the `X` tile (`a`) and the raw
/// records of stage `s + 1` (`raw`); `raw0` holds stage 0's records, `dec` two buffers of
/// decoded records, `flag` the split-K arrival result. The `k`-warp reduction reuses the
/// pipeline (`reduce_bytes ≤ stages·stage_bytes`, checked below).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W4a16SharedLayout {
    /// Bytes per stage.
    pub stage_bytes: u32,
    /// Codes inside a stage.
    pub b: u32,
    /// `X` tile inside a stage.
    pub a: u32,
    /// Raw records (of the next stage) inside a stage.
    pub raw: u32,
    /// Raw records of stage 0.
    pub raw0: u32,
    /// Decoded records, two buffers of `dec_bytes`.
    pub dec: u32,
    /// Split-K arrival flag (u32).
    pub flag: u32,
    /// Total bytes.
    pub total: u32,
}

const _: () = {
    let mut mb = 1;
    while mb <= 4 {
        let s = W4a16Shape::for_mb(mb);
        assert!(s.reduce_bytes() <= s.stages * s.layout().stage_bytes);
        // The kernel unrolls a warp's steps of a stage by two.
        assert!(s.ksteps / s.wk == 2 && s.ksteps.is_multiple_of(s.wk));
        assert!(s.wn * s.wk * 32 == W4A16_THREADS);
        assert!(s.b_stage_bytes() / 16 == 2 * W4A16_THREADS);
        assert!(s.raw_stage_bytes() / 16 <= W4A16_THREADS);
        assert!(s.max_groups_per_stage() * s.n_block() <= 2 * W4A16_THREADS);
        assert!(PACK_K_ALIGN.is_multiple_of(s.k_stage()) && PACK_N_ALIGN.is_multiple_of(s.n_block()));
        mb += 1;
    }
};

/// Warps of a skinny W4A16 block (`w4a16_skinny_*`): all on the block's columns, each
/// streaming its own contiguous part of the block's `k` range.
pub const SKINNY_WARPS: u32 = W4A16_THREADS / 32;
/// Steps in each warp's private `cp.async` pipeline (`depth − 1` in flight). A
/// `cp.async.wait_group` immediate, so one value for every ring instance (the 12-warp
/// [`W4a16SkinnyShape::deep`] blocks have no ring).
pub const SKINNY_DEPTH: u32 = 6;

/// The small-`M` ("skinny") W4A16 kernel for `8·tf` rows of `X` (`tf` 8-token fragments:
/// 1, 2, 4 or 8) and `64·nt` columns per block (`nt` packed `n` tiles per warp: 1 or 2). It
/// computes `Yᵀ = dequant(W)·Xᵀ`: the weight is the mma's A operand (16 columns of `W` per
/// fragment, straight from the packed tiles) and `X` its B operand (8 tokens per fragment),
/// so `M ≤ 8` wastes no tensor-core rows or accumulators.
///
/// Per warp and step (16 `k`) of a ring: `nt` packed tiles, the `X` slice (per fragment two
/// 8×8 matrices, `k` 0..8 and 8..16, 16-byte rows) and, when the step starts a group, the
/// block's raw records. After the warps' rings (none in [`W4a16SkinnyShape::deep`]): the
/// qmeta4 scale table (256 × u16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W4a16SkinnyShape {
    /// 8-token fragments.
    pub tf: u32,
    /// Packed `n` tiles per warp (and block).
    pub nt: u32,
    /// Warps of the block, each on its own part of the block's `k` range.
    pub warps: u32,
    /// 16-deep steps a warp loads and computes at a time, the unit of its `k` range: 1 in the
    /// ring instances, 2 in [`W4a16SkinnyShape::deep`] (whole groups per slot).
    pub steps: u32,
    /// Steps in each warp's `cp.async` ring (`depth − 1` in flight; 0: no ring).
    pub depth: u32,
    /// Bits per packed code: 4, or 8 in the `w8a16_skinny_*` instances ([`PACK_TILE_BYTES_W8`]
    /// tiles).
    pub bits: u32,
}

impl W4a16SkinnyShape {
    /// The instance for `tf` fragments: two `n` tiles per warp, except `tf = 2`, whose
    /// 64 accumulators with two tiles do not fit the 128 registers of two blocks per SM
    /// (ptxas spilled them; one tile halves them), and `tf = 8` (256 accumulators with two).
    pub const fn for_tf(tf: u32) -> Self {
        W4a16SkinnyShape {
            tf,
            nt: if tf == 2 || tf == 8 { 1 } else { 2 },
            warps: SKINNY_WARPS,
            steps: 1,
            depth: SKINNY_DEPTH,
            bits: 4,
        }
    }

    /// The 8-bit instance for `tf` fragments (`w8a16_skinny_*_t{tf}`, sm_80 module): one
    /// 64-column tile per block (its step already streams the bytes of two 4-bit tiles), 8
    /// warps, the same ring.
    pub const fn w8(tf: u32) -> Self {
        W4a16SkinnyShape { nt: 1, bits: 8, ..Self::for_tf(tf) }
    }

    /// The instance for `tf` fragments in blocks of 16 warps: the Hopper build's
    /// `w4a16_skinny_sm90_*_t1_w16` (126 registers and 172 KB at `tf` 1: one block per SM
    /// with as many warps as two blocks of 8, so a layer of one tile per SM needs no split-K).
    pub const fn wide(tf: u32) -> Self {
        W4a16SkinnyShape { warps: 2 * SKINNY_WARPS, ..Self::for_tf(tf) }
    }

    /// The Hopper build's `w4a16_skinny_sm90_*_t{tf}_w12` (`tf` 1 or 2: 1–16 rows): blocks of
    /// 12 warps on one 64-column tile, each warp streaming slots of two steps with its
    /// operands loaded straight into registers a few slots ahead: no ring (`depth` 0), so the
    /// shared memory holds only the scale table, then the warps' reduction over it at the
    /// block end. One block per SM (up to 168 registers).
    pub const fn deep(tf: u32) -> Self {
        W4a16SkinnyShape { tf, nt: 1, warps: 12, steps: 2, depth: 0, bits: 4 }
    }

    /// Threads per block.
    pub const fn threads(&self) -> u32 {
        32 * self.warps
    }

    /// Rows of `X` per block.
    pub const fn m_block(&self) -> u32 {
        8 * self.tf
    }

    /// Output columns per block.
    pub const fn n_block(&self) -> u32 {
        self.nt * PACK_TILE_N
    }

    /// Bytes of one step's codes.
    pub const fn codes_bytes(&self) -> u32 {
        self.nt * PACK_TILE_BYTES * self.bits / 4
    }

    /// Bytes of one step's `X` slice.
    pub const fn x_bytes(&self) -> u32 {
        self.tf * 2 * 8 * 16
    }

    /// Bytes of one step in a warp's pipeline: codes, `X`, raw records.
    pub const fn step_bytes(&self) -> u32 {
        self.codes_bytes() + self.x_bytes() + self.n_block() * 4
    }

    /// Bytes of one warp's pipeline.
    pub const fn warp_bytes(&self) -> u32 {
        self.depth * self.step_bytes()
    }

    /// f32 row stride (columns + 4) of the reduction buffer: the pad puts a warp's 32 stores
    /// on 32 banks.
    pub const fn red_stride(&self) -> u32 {
        self.n_block() + 4
    }

    /// Bytes of the reduction over the block's warps (reuses the pipelines and the table).
    pub const fn reduce_bytes(&self) -> u32 {
        self.warps * self.m_block() * self.red_stride() * 4
    }

    /// Offset of the scale table.
    pub const fn table(&self) -> u32 {
        self.warps * self.warp_bytes()
    }

    /// Offset of the block's f32 partial `[m_block][n_block]` that the other blocks of a
    /// cluster read (cluster split-K), after the reduction buffer.
    pub const fn partial(&self) -> u32 {
        self.reduce_bytes()
    }

    /// Offset of the split-K arrival flag (u32).
    pub const fn flag(&self) -> u32 {
        let p = self.table() + 512;
        let r = self.partial() + self.m_block() * self.n_block() * 4;
        if p > r {
            p
        } else {
            r
        }
    }

    /// Dynamic shared memory per block.
    pub const fn total(&self) -> u32 {
        self.flag() + 16
    }
}

const _: () = {
    let mut tf = 1;
    while tf <= 8 {
        let mut nt = 1;
        while nt <= 2 {
            let mut warps = SKINNY_WARPS;
            while warps <= 2 * SKINNY_WARPS {
                let s = W4a16SkinnyShape { warps, nt, ..W4a16SkinnyShape::for_tf(tf) };
                // One 16-byte cp.async per lane and tile; records and X in at most two per lane.
                assert!(s.n_block() * 4 <= 32 * 16 && s.x_bytes() / 16 <= 128);
                assert!(PACK_N_ALIGN.is_multiple_of(s.n_block()));
                // The ring holds one step per slot.
                assert!(s.steps == 1 && s.step_bytes().is_multiple_of(16) && s.table().is_multiple_of(16));
                // The scale table is filled by the first 256 threads.
                assert!(s.threads() >= 256 && s.threads() <= 1024);
                warps *= 2;
            }
            nt += 1;
        }
        tf *= 2;
    }
    let mut tf = 1;
    while tf <= 8 {
        let s = W4a16SkinnyShape::w8(tf);
        // Two 16-byte copies per lane (the tile's halves), as a 4-bit step of two tiles.
        assert!(s.codes_bytes() == 2 * 32 * 16 && s.n_block() * 4 <= 32 * 16 && s.x_bytes() / 16 <= 128);
        assert!(s.steps == 1 && s.step_bytes().is_multiple_of(16) && s.table().is_multiple_of(16));
        assert!(s.total() + 1024 <= 228 * 1024 && s.threads() == W4A16_THREADS);
        tf *= 2;
    }
    let mut tf = 1;
    while tf <= 2 {
        let d = W4a16SkinnyShape::deep(tf);
        // No ring: the table at 0, which the block end's reduction (after a barrier)
        // overwrites; whole groups per slot (group sizes are multiples of 32).
        assert!(d.depth == 0 && d.table() == 0 && d.nt == 1 && 32 % (16 * d.steps) == 0);
        assert!(PACK_K_ALIGN.is_multiple_of(16 * d.steps));
        assert!(d.total() + 1024 <= 228 * 1024);
        assert!(d.threads() >= 256 && d.threads() <= 1024);
        tf += 1;
    }
};

/// Threads of a Hopper W4A16 block (`w4a16_wg_*`): four warpgroups (the unit `wgmma` runs
/// on), one per packed `n` tile of the block.
pub const WG_THREADS: u32 = 512;
/// Packed `n` tiles (and warpgroups) per Hopper block: warpgroup `a` multiplies tile `a`,
/// its warp `w` dequantizing word `w` of each lane's 16 bytes (16 of the tile's columns).
pub const WG_TILES: u32 = 4;
/// 16-deep steps per stage of a Hopper block (64 `k`): one barrier per 4 steps.
pub const WG_STAGE_STEPS: u32 = 4;
/// Groups whose records a stage may need: group sizes are multiples of 32, so a stage of 64
/// `k` starts at most two (its first step's and one more).
pub const WG_STAGE_GROUPS: u32 = 2;
/// Stages in a Hopper block's `cp.async` ring: `depth − 2` in flight, the one being read, and
/// the one whose `wgmma`s may still run.
pub const WG_DEPTH: u32 = 7;

/// The Hopper W4A16 kernel for `8·tf` rows of `X` (`tf` 1, 2, 4, 8 or 16: the `wgmma` is
/// `m64n(8·tf)k16`) and 256 columns per block. Per stage (64 `k`): the four tiles' codes of
/// the 4 steps (`[tile][step]`), the `X` slice as `wgmma` core matrices (per step: 8 tokens ×
/// 8 `k` with 16-byte rows, the `k` halves 128 bytes apart, token octets 256), and the raw
/// records of up to [`WG_STAGE_GROUPS`] groups. After the ring: the qmeta4 scale table, the
/// split-K flag, then the ring's `mbarrier`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W4a16WgShape {
    /// 8-token fragments.
    pub tf: u32,
}

impl W4a16WgShape {
    /// Rows of `X` per block (the `wgmma`'s `n`).
    pub const fn m_block(&self) -> u32 {
        8 * self.tf
    }

    /// Output columns per block.
    pub const fn n_block(&self) -> u32 {
        WG_TILES * PACK_TILE_N
    }

    /// `k` per stage.
    pub const fn k_stage(&self) -> u32 {
        WG_STAGE_STEPS * PACK_TILE_K
    }

    /// Bytes of one stage's codes.
    pub const fn codes_bytes(&self) -> u32 {
        WG_STAGE_STEPS * WG_TILES * PACK_TILE_BYTES
    }

    /// Bytes of one step's `X` slice.
    pub const fn x_step_bytes(&self) -> u32 {
        self.m_block() * PACK_TILE_K * 2
    }

    /// 16-byte `X` chunks of one stage.
    pub const fn x_chunks(&self) -> u32 {
        WG_STAGE_STEPS * self.x_step_bytes() / 16
    }

    /// Bytes of one group's raw records for the block.
    pub const fn group_rec_bytes(&self) -> u32 {
        self.n_block() * 4
    }

    /// Bytes of one stage: codes, `X`, raw records.
    pub const fn stage_bytes(&self) -> u32 {
        self.codes_bytes() + WG_STAGE_STEPS * self.x_step_bytes() + WG_STAGE_GROUPS * self.group_rec_bytes()
    }

    /// Offset of the `X` slice in a stage.
    pub const fn x_off(&self) -> u32 {
        self.codes_bytes()
    }

    /// Offset of the raw records in a stage.
    pub const fn rec_off(&self) -> u32 {
        self.codes_bytes() + WG_STAGE_STEPS * self.x_step_bytes()
    }

    /// Offset of the scale table.
    pub const fn table(&self) -> u32 {
        WG_DEPTH * self.stage_bytes()
    }

    /// Offset of the split-K arrival flag (u32).
    pub const fn flag(&self) -> u32 {
        self.table() + 512
    }

    /// Offset of the ring's `mbarrier`s: per slot a "full" one (every thread's copies have
    /// landed), then per slot an "empty" one (every warp's `wgmma`s have read it).
    pub const fn mbar(&self) -> u32 {
        self.flag() + 16
    }

    /// Dynamic shared memory per block.
    pub const fn total(&self) -> u32 {
        self.mbar() + 2 * WG_DEPTH * 8
    }
}

const _: () = {
    let mut tf = 1;
    while tf <= 16 {
        let s = W4a16WgShape { tf };
        // One code chunk per thread per stage, at most two `X` chunks, the records of both
        // groups in the first 128 threads.
        assert!(s.codes_bytes() / 16 == WG_THREADS);
        assert!(s.x_chunks() <= 2 * WG_THREADS);
        assert!(WG_STAGE_GROUPS * s.group_rec_bytes() / 16 <= WG_THREADS);
        assert!(s.stage_bytes().is_multiple_of(128) && PACK_N_ALIGN.is_multiple_of(s.n_block()));
        assert!(PACK_K_ALIGN.is_multiple_of(s.k_stage()));
        // Two groups per stage at most: group sizes are multiples of 32 = k_stage / 2.
        assert!(s.k_stage() / 32 == WG_STAGE_GROUPS);
        assert!(WG_THREADS == 128 * WG_TILES);
        tf *= 2;
    }
};

crate::kernel_args! {
    /// `w4a16_{bf16,f16}_m{1..4}`: `Y = X · dequant(W)ᵀ` for the rows of `X` in
    /// `m_blocks` blocks of `16·mb`. Grid: `m_blocks · col_blocks · splits` blocks of
    /// [`W4A16_THREADS`], dynamic shared memory `W4a16Shape::for_mb(mb).layout().total`.
    /// Block `b` takes `m = b mod m_blocks`, `col = (b / m_blocks) mod col_blocks`,
    /// `split = b / (m_blocks·col_blocks)`, and split `p` the stages
    /// `[p·S/splits, (p+1)·S/splits)` of the `S = k_pad / k_stage` stages.
    /// Safety: `x` `m·k` 16-bit values, `k % 8 == 0`; `w` and `meta` a packed weight of
    /// `n_pad × k_pad`, group size `gs` (multiple of 32), `g_pad` groups; `y` `m·n` 16-bit
    /// values; when `splits > 1`, `ws` `splits·m·n_pad` f32 and `counters`
    /// `m_blocks·col_blocks` u32, zero before the first launch (the kernel leaves them zero);
    /// `col_blocks = n_pad / n_block`, `1 ≤ splits ≤ min(S, W4A16_MAX_SPLITS)`.
    ///
    /// The skinny kernels `w4a16_skinny_{bf16,f16}_t{1,2,4,8}` take the same arguments with
    /// row blocks of `8·tf`, `col_blocks = n_pad / (64·nt)`, shared memory
    /// `W4a16SkinnyShape::for_tf(tf).total()` (`wide(1)` for the `_w16` instances), its
    /// `threads()`, and split `p`'s warp `w` of the shape's `W` warps streaming the 16-deep steps
    /// `[q·S/P, (q+1)·S/P)`, `q = p·W + w`, `P = splits·W`,
    /// `S = k_pad / 16`; `1 ≤ splits ≤ W4A16_MAX_SPLITS`.
    ///
    /// The skinny kernels of the Hopper module, `w4a16_skinny_sm90_{bf16,f16}_t{1,2,8}`,
    /// `w4a16_skinny_sm90_{bf16,f16}_t1_w16` and `w4a16_skinny_sm90_{bf16,f16}_t2_l1`
    /// (the same source built for `sm_90a`, which adds programmatic dependent launch and
    /// cluster split-K), take the same arguments as the sm_80 ones; with `cluster = 1` they
    /// must be launched in clusters of `splits × 1 × 1` blocks. So do
    /// `w4a16_skinny_sm90_{bf16,f16}_t{1,2}_w12`, with shared memory `deep(tf).total()` and warp
    /// `q` streaming the steps `2·[q·S/P, (q+1)·S/P)`, `S = k_pad / 32`.
    ///
    /// The 8-bit skinny kernels `w8a16_skinny_{bf16,f16}_t{1,2,4,8}` (sm_80 module) take the
    /// same arguments for a packed weight of 8-bit tiles, with `col_blocks = n_pad / 64`,
    /// shared memory `W4a16SkinnyShape::w8(tf).total()` and its `threads()`.
    ///
    /// The Hopper kernels `w4a16_wg_{bf16,f16}_t{1,2,4,8,16}` (module `sm_90a`, blocks of
    /// [`WG_THREADS`]) take them with row blocks of `8·tf`, `col_blocks = n_pad / 256`,
    /// shared memory `W4a16WgShape { tf }.total()`, and split `p` the 64-deep stages
    /// `[p·S/splits, (p+1)·S/splits)`, `S = k_pad / 64`; `1 ≤ splits ≤ W4A16_MAX_SPLITS`.
    pub struct W4a16Args in runtime => w4a16_kernel {
        /// Activations, row-major `[m, k]`.
        pub x: forge_kernel_abi::DevPtr<u16>,
        /// Packed codes.
        pub w: forge_kernel_abi::DevPtr<u32>,
        /// Packed records `[g_pad][n_pad]`.
        pub meta: forge_kernel_abi::DevPtr<u32>,
        /// Output, row-major `[m, n]`.
        pub y: forge_kernel_abi::DevPtrMut<u16>,
        /// Split-K partial sums `[splits][m][n_pad]`.
        pub ws: forge_kernel_abi::DevPtrMut<f32>,
        /// Split-K arrival counters, one per output tile.
        pub counters: forge_kernel_abi::DevPtrMut<u32>,
        /// Rows of `X` and `Y`.
        pub m: u32,
        /// Output columns.
        pub n: u32,
        /// Input columns.
        pub k: u32,
        /// Padded output columns (row stride of `meta` and `ws`).
        pub n_pad: u32,
        /// Padded input columns.
        pub k_pad: u32,
        /// Group size.
        pub gs: u32,
        /// Groups in the packed records.
        pub g_pad: u32,
        /// Row blocks of `16·mb`.
        pub m_blocks: u32,
        /// Column blocks.
        pub col_blocks: u32,
        /// Split-K partitions.
        pub splits: u32,
        /// 1 when the launch may overlap the kernel before it on the stream (programmatic
        /// dependent launch; Hopper-module kernels only): the prologue then streams the
        /// weight first and copies `X` after `griddepcontrol.wait`. 0: one copy group per
        /// step or stage, as without overlap.
        pub overlap: u32,
        /// 1 when the `splits` blocks of each output tile are one thread-block cluster
        /// (Hopper-module skinny kernels only, `splits ≤ 16`): block `b` is split
        /// `b mod splits` of tile `b / splits` (row block `tile mod m_blocks`, column block
        /// `tile / m_blocks`), and the blocks add their partials through distributed shared
        /// memory in split order; `ws` and `counters` are not used. 0: the grid order above.
        pub cluster: u32,
        /// Grouped (mixture-of-experts) launches only, by the `w4a16_skinny_*grouped_*` and
        /// `w4a16_wg_grouped_*` kernels, never overlapping. Row block `t < m_blocks` is task
        /// `t`: `tasks[3t..3t+3] = [expert, row0, rows]` (`rows ≤ 8·tf`, tasks' row ranges
        /// disjoint, inside `m`; a task of 0 rows does nothing), which multiplies rows `row0 .. row0 + rows` of `X` by expert
        /// `expert`'s weight (codes at `w + expert·expert_codes`, records at
        /// `meta + expert·expert_records`) into the same rows of `Y`, as an ungrouped launch of
        /// those rows would; its split-K partials are `ws[row0·splits·n_pad ..]` as
        /// `[splits][rows][n_pad]`, its counters `counters[t·col_blocks ..]` (so `ws` holds
        /// `splits·m·n_pad` and `counters` `m_blocks·col_blocks` values, as ungrouped).
        /// Other kernels do not read `tasks` and the strides. The task table (`3·m_blocks` u32).
        pub tasks: forge_kernel_abi::DevPtr<u32>,
        /// u32 words of one expert's packed codes.
        pub expert_codes: u32,
        /// Records of one expert (`g_pad·n_pad`).
        pub expert_records: u32,
    }
}

/// Bytes of one row of the dense dequantization's shared tile: 128 16-bit columns plus 16
/// bytes, so a warp's 4-byte stores (8 rows × 4 column pairs) fall on 32 banks.
pub const DEQUANT_ROW_BYTES: u32 = 128 * 2 + 16;
/// Dynamic shared memory of `w4_dequant_*`: a `[64][128]` tile.
pub const DEQUANT_SHARED_BYTES: u32 = 64 * DEQUANT_ROW_BYTES;

crate::kernel_args! {
    /// `w4_dequant_{bf16,f16}`: the dense weight `wd[n, k] = dequant(W)` (row-major
    /// `[n, k]`, the kernel's own rounding) for cuBLAS. Grid `⌈n/64⌉·(k_pad/128)` blocks
    /// of 256 threads, [`DEQUANT_SHARED_BYTES`] of dynamic shared memory; block `b` writes
    /// rows `64·(b / (k_pad/128)) ..` × columns `128·(b mod (k_pad/128)) ..` (rows `< n`).
    /// Safety: `w`/`meta` a packed weight as for [`W4a16Args`], `k % 8 == 0`, or the rows of
    /// one from a whole 64-row tile on (`w` at that tile, `meta` at its first column, `n_pad`
    /// the full weight's record row stride); `wd` `n·k` 16-bit values. `w8_dequant_{bf16,f16}`
    /// take the same for a packed weight of 8-bit tiles.
    pub struct W4DequantArgs in runtime => w4_dequant_kernel {
        /// Packed codes.
        pub w: forge_kernel_abi::DevPtr<u32>,
        /// Packed records.
        pub meta: forge_kernel_abi::DevPtr<u32>,
        /// Dense output `[n, k]`.
        pub wd: forge_kernel_abi::DevPtrMut<u16>,
        /// Rows.
        pub n: u32,
        /// Columns.
        pub k: u32,
        /// Padded rows.
        pub n_pad: u32,
        /// Padded columns.
        pub k_pad: u32,
        /// Group size.
        pub gs: u32,
    }
}

/// Threads of `expert_tasks_from_offsets` (one block).
pub const EXPERT_TASKS_THREADS: u32 = 256;
/// Dynamic shared memory of `expert_tasks_from_offsets`: its 8 warp totals (u32) and its
/// failure key (u64, 8-byte aligned at 32).
pub const EXPERT_TASKS_SHARED_BYTES: u32 = 48;
/// Experts `expert_tasks_from_offsets` takes: 16 per thread.
pub const EXPERT_TASKS_MAX_EXPERTS: u32 = 16 * EXPERT_TASKS_THREADS;

/// `status[0]` of `expert_tasks_from_offsets`: the offsets were valid.
pub const ROUTING_OK: u32 = 0;
/// `status[0]`: `offsets[0] ≠ 0`.
pub const ROUTING_FIRST_NOT_ZERO: u32 = 1;
/// `status[0]`: expert `status[1]` ends before it starts.
pub const ROUTING_DECREASING: u32 = 2;
/// `status[0]`: `offsets[experts]` exceeds `rows_limit`.
pub const ROUTING_PAST_ROWS: u32 = 3;
/// `status[0]`: the row blocks exceed `capacity` (cannot happen when the other checks pass
/// and `capacity` is the host's bound).
pub const ROUTING_OVER_CAPACITY: u32 = 4;

crate::kernel_args! {
    /// `expert_tasks_from_offsets`: a grouped W4A16 launch's task table from expert row
    /// offsets that live on the device (a router on the GPU), the device half of the
    /// host's `ExpertTasks::tasks_of`. One block of [`EXPERT_TASKS_THREADS`].
    /// `tasks[3t..3t+3] = [expert, row0, rows]` for the row blocks of at most `height` rows of
    /// each expert, by expert then row, then empty tasks (`[0, 0, 0]`) up to `capacity`; the
    /// same in `tasks_b` for `height_b` when `capacity_b > 0` (a routing's second block
    /// height, in the same launch); on invalid offsets every slot is empty. `status[0]` = a
    /// `ROUTING_*` code, `status[1]` the expert it names (the lowest such). Safety: `offsets`
    /// `experts + 1` u32, `1 ≤ experts ≤ EXPERT_TASKS_MAX_EXPERTS`, `tasks` `3·capacity` u32,
    /// `tasks_b` `3·capacity_b`, `status` 2 u32, heights ≥ 1.
    pub struct ExpertTasksArgs in runtime => expert_tasks_kernel {
        /// Row offsets per expert and the end, `[experts + 1]`.
        pub offsets: forge_kernel_abi::DevPtr<u32>,
        /// The task table, `[capacity][3]`.
        pub tasks: forge_kernel_abi::DevPtrMut<u32>,
        /// `[code, expert]`.
        pub status: forge_kernel_abi::DevPtrMut<u32>,
        /// Experts.
        pub experts: u32,
        /// Rows of `X` and `Y` the launch may touch.
        pub rows_limit: u32,
        /// Rows per task.
        pub height: u32,
        /// Task slots.
        pub capacity: u32,
        /// The second table, `[capacity_b][3]` (any address when `capacity_b` is 0).
        pub tasks_b: forge_kernel_abi::DevPtrMut<u32>,
        /// Rows per task of the second table.
        pub height_b: u32,
        /// Task slots of the second table (0: none).
        pub capacity_b: u32,
    }
}

/// Threads of `topk_route` (one block, 8 warps).
pub const TOPK_ROUTE_THREADS: u32 = 256;
/// Experts `topk_route` takes: its shared memory holds a count per warp and expert (u32).
pub const TOPK_ROUTE_MAX_EXPERTS: u32 = 1024;
/// Dynamic shared memory of `topk_route` for `experts` experts: the per-warp counts
/// `[8][experts]` (u32), then the 8 warp totals of its scan (u32) and the lowest failing
/// pair (u64, 8-byte aligned).
pub const fn topk_route_shared_bytes(experts: u32) -> u32 {
    (TOPK_ROUTE_THREADS / 32) * experts * 4 + 32 + 8
}
// The task tables' writer reuses the same shared memory.
const _: () = assert!(topk_route_shared_bytes(1) >= EXPERT_TASKS_SHARED_BYTES);
/// Threads per block of `topk_gather_rows` and `topk_combine_*`.
pub const TOPK_ROWS_THREADS: u32 = 256;

/// `status[0]` of `topk_route`: every expert id was below `experts`.
pub const TOPK_OK: u32 = 0;
/// `status[0]`: pair `status[1]` (`token·top_k + slot`, the lowest such) names an expert
/// `≥ experts`.
pub const TOPK_BAD_EXPERT: u32 = 1;

crate::kernel_args! {
    /// `topk_route`: a mixture-of-experts step's rows sorted by expert, from the router's
    /// top-k expert ids, on the device. Pair `i = token·top_k + slot` (`i < pairs`) goes to
    /// row `pair_row[i] = offsets[e] + #{i' < i : ids[i'] = e}` of the sorted matrices
    /// (`e = ids[i]`: stable by expert, then token, then slot), whose token is
    /// `row_token[pair_row[i]] = token`; `offsets[e]` is the first row of expert `e`,
    /// `offsets[experts] = pairs`. On an id `≥ experts` it writes `offsets` all 0 and nothing
    /// else, and `status = [TOPK_BAD_EXPERT, lowest such pair]`, else `[TOPK_OK, 0]`. Then,
    /// in the same launch, the grouped launch's task tables from those offsets as
    /// `expert_tasks_from_offsets` writes them (`tasks`/`tasks_b`, `height*`, `capacity*`,
    /// `rows_limit`, `routing_status`: its fields). One block of [`TOPK_ROUTE_THREADS`],
    /// [`topk_route_shared_bytes`]`(experts)` of dynamic shared memory. Safety: `ids` `pairs`
    /// u32, `offsets` `experts + 1`, `pair_row` and `row_token` `pairs` each, `status` and
    /// `routing_status` 2; `1 ≤ experts ≤ TOPK_ROUTE_MAX_EXPERTS`, `top_k ≥ 1`; the tables as
    /// for [`ExpertTasksArgs`].
    pub struct TopkRouteArgs in runtime => topk_route_kernel {
        /// Expert of each pair, `[tokens][top_k]`.
        pub ids: forge_kernel_abi::DevPtr<u32>,
        /// Row offsets per expert and the end, `[experts + 1]`.
        pub offsets: forge_kernel_abi::DevPtrMut<u32>,
        /// Sorted row of each pair, `[pairs]`.
        pub pair_row: forge_kernel_abi::DevPtrMut<u32>,
        /// Token of each sorted row, `[pairs]`.
        pub row_token: forge_kernel_abi::DevPtrMut<u32>,
        /// `[code, pair]`.
        pub status: forge_kernel_abi::DevPtrMut<u32>,
        /// Pairs (`tokens·top_k`).
        pub pairs: u32,
        /// Experts per token.
        pub top_k: u32,
        /// Experts.
        pub experts: u32,
        /// The grouped launch's first task table.
        pub tasks: forge_kernel_abi::DevPtrMut<u32>,
        /// Its rows per task.
        pub height: u32,
        /// Its slots.
        pub capacity: u32,
        /// The second task table (any address when `capacity_b` is 0).
        pub tasks_b: forge_kernel_abi::DevPtrMut<u32>,
        /// Its rows per task.
        pub height_b: u32,
        /// Its slots (0: none).
        pub capacity_b: u32,
        /// Rows of `X` and `Y` the grouped launch may touch.
        pub rows_limit: u32,
        /// The task tables' `[code, expert]` (`ROUTING_*`).
        pub routing_status: forge_kernel_abi::DevPtrMut<u32>,
    }
}

crate::kernel_args! {
    /// `topk_gather_rows`: `x[pair_row[t·top_k + j], :] = hidden[t, :]` for `t < tokens`,
    /// `j < top_k`: each token's activations into its sorted rows, rows of `chunks` 16-byte
    /// chunks (8 16-bit values); blocks of [`TOPK_ROWS_THREADS`], block `(x, y)` takes tokens
    /// `x, x + grid_x, …` and its thread `i` chunk `y·threads + i` (the grid's y covers the
    /// row); nothing when `status[0] ≠ TOPK_OK` (the route failed). Safety:
    /// `hidden` and `x` 16-byte aligned, `hidden` `tokens·chunks` chunks, `pair_row`
    /// `tokens·top_k` rows inside `x` (`chunks` chunks each), `status` 1 u32.
    pub struct TopkGatherArgs in runtime => topk_gather_kernel {
        /// The tokens' activations, `[tokens][8·chunks]`.
        pub hidden: forge_kernel_abi::DevPtr<u16>,
        /// Sorted row of each pair.
        pub pair_row: forge_kernel_abi::DevPtr<u32>,
        /// The route's status.
        pub status: forge_kernel_abi::DevPtr<u32>,
        /// Sorted rows, `[pairs][8·chunks]`.
        pub x: forge_kernel_abi::DevPtrMut<u16>,
        /// Tokens.
        pub tokens: u32,
        /// Experts per token.
        pub top_k: u32,
        /// 16-byte chunks per row.
        pub chunks: u32,
    }
}

crate::kernel_args! {
    /// `topk_combine_{bf16,f16}`: `out[t, c] = round_T(Σ_{j < top_k} weight[t·top_k + j] ·
    /// y[pair_row[t·top_k + j], c])`, the sum in f32 by `fma` from 0 in slot order (the CPU
    /// reference's order), for `t < tokens`, `c < n`; blocks of [`TOPK_ROWS_THREADS`], block
    /// `(x, y)` takes tokens `x, x + grid_x, …` and its thread `i` the columns of chunk
    /// `y·threads + i` (8 columns when `n % 8 == 0`, with 16-byte accesses: `y` and `out`
    /// 16-byte aligned then; else 1); the grid's y covers `n`. Nothing when
    /// `status[0] ≠ TOPK_OK`. Safety: `y` holds the rows
    /// `pair_row` names (`n` values each), `pair_row` and `weight` `tokens·top_k`, `out`
    /// `tokens·n` values, `status` 1 u32.
    pub struct TopkCombineArgs in runtime => topk_combine_kernel {
        /// The experts' outputs in sorted rows, `[rows][n]`.
        pub y: forge_kernel_abi::DevPtr<u16>,
        /// Sorted row of each pair.
        pub pair_row: forge_kernel_abi::DevPtr<u32>,
        /// Routing weight of each pair (f32).
        pub weight: forge_kernel_abi::DevPtr<f32>,
        /// The route's status.
        pub status: forge_kernel_abi::DevPtr<u32>,
        /// The combined outputs, `[tokens][n]`.
        pub out: forge_kernel_abi::DevPtrMut<u16>,
        /// Tokens.
        pub tokens: u32,
        /// Experts per token.
        pub top_k: u32,
        /// Columns.
        pub n: u32,
    }
}
