//! Whole-tensor qmeta4 decode: scales and zero points of every group, on CPU or GPU.
//!
//! The GPU path (`qmeta_decode` kernel) is the end-to-end proof of the Rust → PTX → cudarc
//! pipeline: it must equal the CPU decode bit for bit.

use crate::gpu::{grid_for, GpuDevice};
use crate::{ForgeError, QMetaPacked, Result};
use cudarc::driver::PushKernelArg;
use ndarray::{Array2, ArrayView3};

/// Decoded grid: `(rows, n_groups)` scales and zero points.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedQMeta {
    /// `2^(q88/256)`, correctly rounded.
    pub scale: Array2<f32>,
    /// The u8 zero point as f32.
    pub qzero: Array2<f32>,
}

fn records(qmeta: ArrayView3<'_, u8>) -> Result<(usize, usize, Vec<u32>)> {
    let (rows, groups, four) = qmeta.dim();
    if four != 4 {
        return Err(ForgeError::Shape(format!("qmeta must be (rows, n_groups, 4), got last dim {four}")));
    }
    let recs = qmeta
        .outer_iter()
        .flat_map(|row| row.outer_iter().map(|r| u32::from_le_bytes([r[0], r[1], r[2], r[3]])).collect::<Vec<_>>())
        .collect();
    Ok((rows, groups, recs))
}

/// CPU decode of a `(rows, n_groups, 4)` qmeta tensor.
pub fn decode_qmeta_cpu(qmeta: ArrayView3<'_, u8>) -> Result<DecodedQMeta> {
    let (rows, groups, recs) = records(qmeta)?;
    let metas: Vec<QMetaPacked> = recs.into_iter().map(QMetaPacked::from_u32).collect();
    let scale = metas.iter().map(|m| m.scale()).collect();
    let qzero = metas.iter().map(|m| m.qzero_f32()).collect();
    Ok(DecodedQMeta {
        scale: Array2::from_shape_vec((rows, groups), scale).expect("rows·groups"),
        qzero: Array2::from_shape_vec((rows, groups), qzero).expect("rows·groups"),
    })
}

/// GPU decode of a `(rows, n_groups, 4)` qmeta tensor (upload, one launch, download).
pub fn decode_qmeta_gpu(dev: &GpuDevice, qmeta: ArrayView3<'_, u8>) -> Result<DecodedQMeta> {
    let (rows, groups, recs) = records(qmeta)?;
    let n = recs.len();
    if n == 0 {
        return decode_qmeta_cpu(qmeta);
    }
    if n > u32::MAX as usize {
        return Err(ForgeError::Shape(format!("{n} qmeta records exceed the kernel's u32 index")));
    }
    let stream = dev.stream();
    let d_meta = stream.clone_htod(&recs).map_err(ForgeError::driver("uploading qmeta"))?;
    let mut d_scale = stream.alloc_zeros::<f32>(n).map_err(ForgeError::driver("allocating scales"))?;
    let mut d_zero = stream.alloc_zeros::<f32>(n).map_err(ForgeError::driver("allocating zero points"))?;
    let f = dev.function("qmeta_decode")?;
    let n32 = n as u32;
    let mut launch = stream.launch_builder(&f);
    launch.arg(&d_meta).arg(&n32).arg(&mut d_scale).arg(&mut d_zero);
    // SAFETY: the kernel reads n u32 records and writes n f32 into each output, all sized n.
    unsafe { launch.launch(grid_for(n, 256).into()) }.map_err(ForgeError::driver("launching qmeta_decode"))?;
    let scale = stream.clone_dtoh(&d_scale).map_err(ForgeError::driver("downloading scales"))?;
    let qzero = stream.clone_dtoh(&d_zero).map_err(ForgeError::driver("downloading zero points"))?;
    Ok(DecodedQMeta {
        scale: Array2::from_shape_vec((rows, groups), scale).expect("rows·groups"),
        qzero: Array2::from_shape_vec((rows, groups), qzero).expect("rows·groups"),
    })
}
