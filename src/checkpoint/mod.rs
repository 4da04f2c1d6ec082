//! Checkpoints that runtimes load (issue 12; model directories follow in issue 13).
//!
//! [`format`](mod@format) turns one quantized Linear (u8 codes + qmeta4 grid) into the tensors of a
//! checkpoint format and back, and writes the `quantization_config` that goes with them.

pub mod format;
