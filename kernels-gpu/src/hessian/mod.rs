//! Hessian stage kernels: `XᵀX` accumulation and the pre-step around cuSOLVER.

pub mod prestep;
pub mod xtx;
