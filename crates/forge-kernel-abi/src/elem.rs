//! Element types of device buffers that Rust has no device type for: raw bits, widened to
//! f32 by `forge-numerics` on both sides.

/// IEEE binary16 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16Bits(pub u16);

/// bfloat16 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16Bits(pub u16);

/// OCP fp8 E4M3 (`float8_e4m3fn`) byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Fp8E4M3(pub u8);
