//! 4Bit Forge: a GPTQ quantization engine with Rust GPU kernels and a CPU reference.
//!
//! The modules follow the data path (docs/design.md): [`weights`] → [`grid`] (qmeta4 per
//! group) → [`hessian`] (accumulation and pre-step) → [`solver`] (GPTQ) → u8 codes, with
//! [`quantize`] running grid + factor + solve as one job and [`calib`] the MoE-Quant-shaped
//! layer API beside it. Each stage holds its CPU reference (`cpu.rs`) and its device
//! launcher (`cuda.rs`); its kernels live in `kernels-gpu/src/<stage>/`, their launch
//! arguments in `forge-kernel-abi`, and the scalar math both sides use in
//! [`forge_numerics`]. [`device`] is the CUDA runtime.
#![deny(missing_docs)]

pub mod calib;
pub mod checkpoint;
pub mod device;
pub mod error;
pub mod grid;
pub mod hessian;
pub mod pack;
pub mod quantize;
pub mod runtime;
pub mod solver;
pub mod weights;

pub use error::{ForgeError, Result};
pub use forge_numerics as numerics;
pub use forge_numerics::QMetaPacked;
pub use grid::{GridConfig, MseSearch, QuantGrid, ScaleDtype, ScaleSearch, ShrinkCandidates};
pub use quantize::{Backend, Quantizer};
pub use weights::{WeightDtype, WeightView};
