//! Weight conversion kernels: block-scaled FP8-E4M3 checkpoints (DeepSeek-V3, Kimi-K2)
//! dequantized on the device.

pub mod fp8_dequant;
