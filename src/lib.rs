//! 4Bit Forge: a GPTQ quantization engine with Rust GPU kernels and a CPU reference.
//!
//! The data path reads like the algorithm (DESIGN.md, README):
//! weights ([`WeightView`]) → grid ([`grid::build_quant_grid`], qmeta4 per group) →
//! solver → u8 codes → packing. Every GPU kernel has a CPU reference here that the tests
//! compare it with; the scalar math both use lives in [`forge_numerics`].
#![deny(missing_docs)]

pub mod calib;
pub mod checkpoint;
pub mod error;
pub mod gpu;
pub mod grid;
pub mod hessian;
pub mod pack;
pub mod qmeta;
pub mod quantizer;
pub mod solver;
pub mod weights;

pub use error::{ForgeError, Result};
pub use forge_numerics as numerics;
pub use forge_numerics::QMetaPacked;
pub use grid::{GridConfig, MseSearch, QuantGrid, ScaleSearch, ShrinkCandidates};
pub use quantizer::{Backend, Quantizer};
pub use weights::{WeightDtype, WeightView};
