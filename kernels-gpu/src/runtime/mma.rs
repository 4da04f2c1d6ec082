//! Tensor-core and packed 16-bit arithmetic for the runtime kernels, as PTX `asm!` (sm_80):
//! `mma.sync.m16n8k16` with f32 accumulation, `ldmatrix`, `cp.async` with zero fill, `lop3`,
//! and the packed `fma.rn.{bf16x2,f16x2}` the dequantization uses. [`Half`] is the 16-bit type
//! of `X`, `Y` and the dequantized weight.

use core::arch::asm;

/// `lop3.b32 d, a, b, c, 0xEA`: `(a & b) | c` in one instruction.
#[inline(always)]
pub fn and_or(a: u32, b: u32, c: u32) -> u32 {
    let d: u32;
    // SAFETY: register-only.
    unsafe {
        asm!("lop3.b32 {d}, {a}, {b}, {c}, 0xEA;", d = out(reg32) d, a = in(reg32) a, b = in(reg32) b,
             c = in(reg32) c, options(pure, nomem, nostack))
    };
    d
}

/// `prmt.b32 d, a, b, sel`: the bytes of `b:a` that `sel` picks
/// ([`forge_numerics::codes8::byte_perm`] is its host model).
#[inline(always)]
pub fn prmt(a: u32, b: u32, sel: u32) -> u32 {
    let d: u32;
    // SAFETY: register-only.
    unsafe {
        asm!("prmt.b32 {d}, {a}, {b}, {s};", d = out(reg32) d, a = in(reg32) a, b = in(reg32) b, s = in(reg32) sel,
             options(pure, nomem, nostack))
    };
    d
}

/// `ldmatrix.sync.aligned.m8n8.x4.shared.b16`: four 8×8 16-bit matrices, lane `8i + r` giving
/// the address of row `r` of matrix `i`; register `i` of each lane holds its part of matrix `i`.
///
/// # Safety
/// Every lane of the warp runs it with a 16-byte aligned address inside dynamic shared memory.
#[inline(always)]
pub unsafe fn ldmatrix_x4(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{a}, {b}, {c}, {d}}}, [{p}];",
         a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d, p = in(reg32) addr,
         options(readonly, nostack));
    [a, b, c, d]
}

/// `cp.async.cg.shared.global` of 16 bytes of which the first `src_bytes` (0 or 16) are read
/// and the rest zero-filled: a tile edge costs no branch and leaves no stale data.
///
/// # Safety
/// `dst` 16-byte aligned in dynamic shared memory; `src` a 16-byte aligned global address that
/// is in bounds for `src_bytes` bytes.
#[inline(always)]
pub unsafe fn cp_async_16_zfill(dst: u32, src: *const u8, src_bytes: u32) {
    asm!("{{ .reg .u64 g; cvta.to.global.u64 g, {s}; cp.async.cg.shared.global [{d}], [g], 16, {n}; }}",
         d = in(reg32) dst, s = in(reg64) src, n = in(reg32) src_bytes, options(nostack));
}

/// [`cp_async_16_zfill`] through L1 (`.ca`): for data other blocks on the SM read too.
///
/// # Safety
/// As [`cp_async_16_zfill`].
#[inline(always)]
pub unsafe fn cp_async_16_zfill_ca(dst: u32, src: *const u8, src_bytes: u32) {
    asm!("{{ .reg .u64 g; cvta.to.global.u64 g, {s}; cp.async.ca.shared.global [{d}], [g], 16, {n}; }}",
         d = in(reg32) dst, s = in(reg64) src, n = in(reg32) src_bytes, options(nostack));
}

/// `cp.async.cg.shared.global` of 16 bytes.
///
/// # Safety
/// As [`cp_async_16_zfill`] with 16 bytes in bounds.
#[inline(always)]
pub unsafe fn cp_async_16(dst: u32, src: *const u8) {
    asm!("{{ .reg .u64 g; cvta.to.global.u64 g, {s}; cp.async.cg.shared.global [{d}], [g], 16; }}",
         d = in(reg32) dst, s = in(reg64) src, options(nostack));
}

/// `fence.acq_rel.gpu`: orders this thread's global accesses before and after it, GPU-wide.
#[inline(always)]
pub fn fence_gpu() {
    // SAFETY: a fence; clobbers memory so the compiler keeps accesses on their side.
    unsafe { asm!("fence.acq_rel.gpu;", options(nostack)) };
}

/// `atom.global.add.u32`, returning the old value.
///
/// # Safety
/// `p` a live, 4-byte aligned u32 in global memory.
#[inline(always)]
pub unsafe fn atomic_add_u32(p: *mut u32, v: u32) -> u32 {
    let old: u32;
    asm!("atom.global.add.u32 {o}, [{p}], {v};", o = out(reg32) old, p = in(reg64) p, v = in(reg32) v,
         options(nostack));
    old
}

/// `ld.global.cg.v4.f32`: four floats read at L2 (never a stale L1 line), for data other
/// blocks wrote in this launch.
///
/// # Safety
/// `p` 16-byte aligned, in bounds for four floats.
#[inline(always)]
pub unsafe fn ld_cg_f32x4(p: *const f32) -> [f32; 4] {
    let (a, b, c, d): (f32, f32, f32, f32);
    asm!("ld.global.cg.v4.f32 {{{a}, {b}, {c}, {d}}}, [{p}];",
         a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d, p = in(reg64) p,
         options(readonly, nostack));
    [a, b, c, d]
}

/// `ld.global.nc.L1::no_allocate.v4.u32`: 16 bytes of data read once (the packed weight)
/// through the read-only path, without displacing L1 lines.
///
/// # Safety
/// `p` 16-byte aligned, in bounds, and not written while the kernel runs.
#[inline(always)]
pub unsafe fn ld_stream_u32x4(p: *const u8) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ld.global.nc.L1::no_allocate.v4.u32 {{{a}, {b}, {c}, {d}}}, [{p}];",
         a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d, p = in(reg64) p,
         options(readonly, nostack));
    [a, b, c, d]
}

/// `ld.global.nc.L1::no_allocate.u32`: as [`ld_stream_u32x4`], 4 bytes.
///
/// # Safety
/// `p` 4-byte aligned, in bounds, and not written while the kernel runs.
#[inline(always)]
pub unsafe fn ld_stream_u32(p: *const u8) -> u32 {
    let a: u32;
    asm!("ld.global.nc.L1::no_allocate.u32 {a}, [{p}];", a = out(reg32) a, p = in(reg64) p,
         options(readonly, nostack));
    a
}

/// `ld.global.u32` where `valid`, else 0 (a predicated load: no branch).
///
/// # Safety
/// `p` 4-byte aligned and in bounds where `valid`.
#[inline(always)]
pub unsafe fn ld_u32_or_zero(p: *const u8, valid: bool) -> u32 {
    let a: u32;
    asm!("{{ .reg .pred q; setp.ne.u32 q, {v}, 0; mov.u32 {a}, 0; @q ld.global.u32 {a}, [{p}]; }}",
         a = out(reg32) a, p = in(reg64) p, v = in(reg32) valid as u32, options(readonly, nostack));
    a
}

/// The 16-bit float type of a W4A16 matmul (bf16 or f16): how codes become values exactly,
/// how scales are rounded, and its tensor-core instruction.
pub trait Half: Copy {
    /// `(MAGIC, MAGIC)` bits: `MAGIC | q` is exactly `MAGIC + q` for every code `q < 128`
    /// (bf16: 128.0, ulp 1 on [128, 256); f16: 1024.0, ulp 1 on [1024, 2048)).
    const MAGIC2: u32;
    /// Bits of `MAGIC` alone.
    const MAGIC: u32;
    /// `(1.0, 1.0)` bits.
    const ONE2: u32;
    /// Bits of [`forge_numerics::stored_scale`]`(q88, T)`.
    fn scale_bits(q88: i16) -> u16;
    /// [`Half::scale_bits`] with its 256-entry table read through `frac`.
    fn scale_bits_with(q88: i16, frac: impl Fn(usize) -> u16) -> u16;
    /// The table `scale_bits` reads (a static, so it has a global address to copy from).
    fn frac_table() -> &'static [u16; 256];
    /// Packed `a·b + c`, one rounding per half.
    fn fma2(a: u32, b: u32, c: u32) -> u32;
    /// `(lo, hi)` rounded to nearest-even into a packed pair (`lo` in the low half).
    fn pack2(lo: f32, hi: f32) -> u32;
    /// `acc += A·B` for one `m16n8k16` tile (row-major A fragment, column-major B fragment).
    ///
    /// # Safety
    /// Every lane of the warp runs it (`.sync.aligned`).
    unsafe fn mma(acc: &mut [f32; 4], a: &[u32; 4], b0: u32, b1: u32);

    /// A record as the kernel keeps it: low word the scale in both halves, high word
    /// `−(MAGIC + zero)` in both halves (exact: zero points are `< 128` in packed weights).
    #[inline(always)]
    fn decode_record(rec: u32) -> u64 {
        Self::pair_record(rec, Self::scale_bits(rec as u16 as i16))
    }

    /// [`Half::decode_record`] with the scale table at `table` in shared memory (a copy of
    /// [`Half::frac_table`]).
    ///
    /// # Safety
    /// `table` holds the 256 entries.
    #[inline(always)]
    unsafe fn decode_record_shared(rec: u32, table: u32) -> u64 {
        Self::pair_record(rec, Self::scale_bits_shared(rec, table))
    }

    /// [`Half::scale_bits`] of record `rec` through the scale table at `table` in shared
    /// memory.
    ///
    /// # Safety
    /// As [`Half::decode_record_shared`].
    #[inline(always)]
    unsafe fn scale_bits_shared(rec: u32, table: u32) -> u16 {
        Self::scale_bits_with(rec as u16 as i16, |j| crate::device::ld_shared_u16(table + 2 * j as u32))
    }

    /// The decoded record from the record and its scale's bits.
    #[inline(always)]
    fn pair_record(rec: u32, s: u16) -> u64 {
        let s = s as u32;
        let nz = (Self::MAGIC + ((rec >> 16) & 0xff)) | 0x8000;
        ((s | (s << 16)) as u64) | (((nz | (nz << 16)) as u64) << 32)
    }

    /// A record as the 8-bit kernels keep it: low word the scale in both halves, high word
    /// the type's route constant for zero points up to 255 ([`forge_numerics::codes8`]).
    fn pair_record8(rec: u32, s: u16) -> u64;

    /// `(q − z)` pairs, exact, of a word of four code bytes (bytes 0–1, then 2–3), from the
    /// high word `nz` of [`Half::pair_record8`].
    fn centered_pairs8(w: u32, nz: u32) -> [u32; 2];

    /// [`Half::decode_record`] for 8-bit codes.
    #[inline(always)]
    fn decode_record8(rec: u32) -> u64 {
        Self::pair_record8(rec, Self::scale_bits(rec as u16 as i16))
    }

    /// [`Half::decode_record_shared`] for 8-bit codes.
    ///
    /// # Safety
    /// As [`Half::decode_record_shared`].
    #[inline(always)]
    unsafe fn decode_record8_shared(rec: u32, table: u32) -> u64 {
        Self::pair_record8(rec, Self::scale_bits_shared(rec, table))
    }
}

/// Thread `tid`'s entry (`tid mod 256`) of `T`'s scale table ([`Half::frac_table`]) into
/// its copy in shared memory at `table`: the first 256 threads of a block fill it.
///
/// # Safety
/// `table` holds 512 bytes of dynamic shared memory, read only after a barrier.
#[inline(always)]
pub unsafe fn store_scale_entry<T: Half>(table: u32, tid: u32) {
    crate::device::st_shared_u16(table + 2 * tid, T::frac_table()[tid as usize % 256]);
}

use forge_numerics::codes8;

static FRAC_BF16: [u16; 256] = forge_numerics::STORED_FRAC_BF16;
static FRAC_F16: [u16; 256] = forge_numerics::STORED_FRAC_F16;

/// bfloat16.
#[derive(Clone, Copy)]
pub struct Bf16;
/// IEEE binary16.
#[derive(Clone, Copy)]
pub struct F16;

impl Half for Bf16 {
    const MAGIC2: u32 = 0x4300_4300;
    const MAGIC: u32 = 0x4300;
    const ONE2: u32 = 0x3f80_3f80;

    #[inline(always)]
    fn pair_record8(rec: u32, s: u16) -> u64 {
        let s = s as u32;
        ((s | (s << 16)) as u64) | ((codes8::bf16_route_neg_zero((rec >> 16) & 0xff) as u64) << 32)
    }

    /// Through f32: `2^23 + q` by a permute, `+ (−(2^23 + z))` exact, the upper halves.
    #[inline(always)]
    fn centered_pairs8(w: u32, nz: u32) -> [u32; 2] {
        let f = |b: usize| {
            (f32::from_bits(prmt(w, codes8::F32_MAGIC, codes8::F32_BYTE_SEL[b])) + f32::from_bits(nz)).to_bits()
        };
        [prmt(f(0), f(1), codes8::HIGH_HALVES_SEL), prmt(f(2), f(3), codes8::HIGH_HALVES_SEL)]
    }

    #[inline(always)]
    fn scale_bits(q88: i16) -> u16 {
        forge_numerics::stored_scale_bits_bf16(q88)
    }

    #[inline(always)]
    fn scale_bits_with(q88: i16, frac: impl Fn(usize) -> u16) -> u16 {
        forge_numerics::stored_scale_bits_bf16_with(q88, frac)
    }

    #[inline(always)]
    fn frac_table() -> &'static [u16; 256] {
        &FRAC_BF16
    }

    #[inline(always)]
    fn fma2(a: u32, b: u32, c: u32) -> u32 {
        let d: u32;
        // SAFETY: register-only.
        unsafe {
            asm!("fma.rn.bf16x2 {d}, {a}, {b}, {c};", d = out(reg32) d, a = in(reg32) a, b = in(reg32) b,
                 c = in(reg32) c, options(pure, nomem, nostack))
        };
        d
    }

    #[inline(always)]
    fn pack2(lo: f32, hi: f32) -> u32 {
        let d: u32;
        // SAFETY: register-only.
        unsafe {
            asm!("cvt.rn.bf16x2.f32 {d}, {h}, {l};", d = out(reg32) d, h = in(reg32) hi, l = in(reg32) lo,
                 options(pure, nomem, nostack))
        };
        d
    }

    #[inline(always)]
    unsafe fn mma(acc: &mut [f32; 4], a: &[u32; 4], b0: u32, b1: u32) {
        asm!("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{d0}, {d1}, {d2}, {d3}}}, \
              {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{d0}, {d1}, {d2}, {d3}}};",
             d0 = inout(reg32) acc[0], d1 = inout(reg32) acc[1], d2 = inout(reg32) acc[2], d3 = inout(reg32) acc[3],
             a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
             b0 = in(reg32) b0, b1 = in(reg32) b1, options(nomem, nostack));
    }
}

impl Half for F16 {
    const MAGIC2: u32 = 0x6400_6400;
    const MAGIC: u32 = 0x6400;
    const ONE2: u32 = 0x3c00_3c00;

    /// The 4-bit record: `1024 + z` is exact in f16 up to `z = 1023`.
    #[inline(always)]
    fn pair_record8(rec: u32, s: u16) -> u64 {
        Self::pair_record(rec, s)
    }

    /// `(1024 + q)` pairs by a permute, then `x·1 + (−(1024 + z))`, exact.
    #[inline(always)]
    fn centered_pairs8(w: u32, nz: u32) -> [u32; 2] {
        let x = [
            prmt(w, codes8::F16_MAGIC2, codes8::F16_PAIR_SEL[0]),
            prmt(w, codes8::F16_MAGIC2, codes8::F16_PAIR_SEL[1]),
        ];
        [Self::fma2(x[0], Self::ONE2, nz), Self::fma2(x[1], Self::ONE2, nz)]
    }

    #[inline(always)]
    fn scale_bits(q88: i16) -> u16 {
        forge_numerics::stored_scale_bits_f16(q88)
    }

    #[inline(always)]
    fn scale_bits_with(q88: i16, frac: impl Fn(usize) -> u16) -> u16 {
        forge_numerics::stored_scale_bits_f16_with(q88, frac)
    }

    #[inline(always)]
    fn frac_table() -> &'static [u16; 256] {
        &FRAC_F16
    }

    #[inline(always)]
    fn fma2(a: u32, b: u32, c: u32) -> u32 {
        let d: u32;
        // SAFETY: register-only.
        unsafe {
            asm!("fma.rn.f16x2 {d}, {a}, {b}, {c};", d = out(reg32) d, a = in(reg32) a, b = in(reg32) b,
                 c = in(reg32) c, options(pure, nomem, nostack))
        };
        d
    }

    #[inline(always)]
    fn pack2(lo: f32, hi: f32) -> u32 {
        let d: u32;
        // SAFETY: register-only.
        unsafe {
            asm!("cvt.rn.f16x2.f32 {d}, {h}, {l};", d = out(reg32) d, h = in(reg32) hi, l = in(reg32) lo,
                 options(pure, nomem, nostack))
        };
        d
    }

    #[inline(always)]
    unsafe fn mma(acc: &mut [f32; 4], a: &[u32; 4], b0: u32, b1: u32) {
        asm!("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{d0}, {d1}, {d2}, {d3}}}, \
              {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{d0}, {d1}, {d2}, {d3}}};",
             d0 = inout(reg32) acc[0], d1 = inout(reg32) acc[1], d2 = inout(reg32) acc[2], d3 = inout(reg32) acc[3],
             a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
             b0 = in(reg32) b0, b1 = in(reg32) b1, options(nomem, nostack));
    }
}

/// Dequantizes the 8 codes of one packed word into the B-fragment registers of its two n8
/// tiles: pair `j` is `(w >> 4j) & 0x000f000f`, made `MAGIC + q` by or-ing the exponent in,
/// then `(MAGIC + q) − (MAGIC + z)` (exact) and `·scale` (one rounding) in packed 16-bit FMAs.
/// `sz0`/`sz1` are the decoded records ([`Half::decode_record`]) of the two tiles' columns.
/// Returns `[tile 2i b0, tile 2i b1, tile 2i+1 b0, tile 2i+1 b1]`.
#[inline(always)]
pub fn dequant_word<T: Half>(w: u32, sz0: u64, sz1: u64) -> [u32; 4] {
    let (s0, nz0) = (sz0 as u32, (sz0 >> 32) as u32);
    let (s1, nz1) = (sz1 as u32, (sz1 >> 32) as u32);
    let x0 = and_or(w, 0x000f_000f, T::MAGIC2);
    let x1 = and_or(w >> 4, 0x000f_000f, T::MAGIC2);
    let x2 = and_or(w >> 8, 0x000f_000f, T::MAGIC2);
    let x3 = and_or(w >> 12, 0x000f_000f, T::MAGIC2);
    // `x·1 + (−c)` and `d·s + (−0)`: a subtraction and a multiplication with one rounding each
    // (sm_80 has packed FMA but not packed sub/mul for bf16); −0 keeps the sign of a zero product.
    [
        T::fma2(T::fma2(x0, T::ONE2, nz0), s0, NEG_ZERO2),
        T::fma2(T::fma2(x1, T::ONE2, nz0), s0, NEG_ZERO2),
        T::fma2(T::fma2(x2, T::ONE2, nz1), s1, NEG_ZERO2),
        T::fma2(T::fma2(x3, T::ONE2, nz1), s1, NEG_ZERO2),
    ]
}

/// One word of an 8-bit tile (four codes of one column: `k` `2t, 2t+1` in bytes 0–1, `2t+8,
/// 2t+9` in bytes 2–3), dequantized with its decoded record `sz` ([`Half::pair_record8`]):
/// the exact `(q − z)` pairs, then `·scale` with one rounding, as [`dequant_word`].
#[inline(always)]
pub fn dequant_word8<T: Half>(w: u32, sz: u64) -> [u32; 2] {
    let d = T::centered_pairs8(w, (sz >> 32) as u32);
    [T::fma2(d[0], sz as u32, NEG_ZERO2), T::fma2(d[1], sz as u32, NEG_ZERO2)]
}

/// `(−0, −0)`: the addend of a packed multiply by FMA that keeps the sign of a zero product.
const NEG_ZERO2: u32 = 0x8000_8000;
