//! GPU grid benchmark: absmax and MSE (100 candidates, norm 2.4 and 2) for the docs/design.md §8
//! shapes in f32 and bf16, beside a device-to-device copy of the same bytes, one table.
//!
//! Run on a GPU machine: `cargo bench --bench gpu_grid` (or the staged `bench-gpu_grid`).

mod common;

use fourbit_forge::grid::{launch_grid_kernel, DeviceWeight};
use fourbit_forge::{ForgeError, GridConfig, MseSearch, ScaleSearch, WeightView};

fn main() -> fourbit_forge::Result<()> {
    let Some(dev) = common::device_or_explain("gpu_grid") else { return Ok(()) };
    let stream = dev.stream().clone();
    let mut rows_out = Vec::new();
    for (rows, cols) in [(4096usize, 4096usize), (2048, 7168), (7168, 2048)] {
        let w = common::heavy_tailed(rows, cols, 1);
        let wb = w.mapv(half::bf16::from_f32);
        for (dtype, view) in [("f32", WeightView::F32(w.view())), ("bf16", WeightView::BF16(wb.view()))] {
            let dw = DeviceWeight::upload(&dev, view)?;
            let bytes = dw.bytes().len();
            let mut copy = stream.alloc_zeros::<u8>(bytes).map_err(ForgeError::driver("alloc"))?;
            let copy_ms = common::median_ms(&dev, 3, 15, 20, || {
                stream.memcpy_dtod(dw.bytes(), &mut copy).map_err(ForgeError::driver("copy"))
            })?;
            let n_groups = cols.div_ceil(128);
            let mut qmeta = stream.alloc_zeros::<u32>(rows * n_groups).map_err(ForgeError::driver("alloc"))?;
            let mut flag = stream.alloc_zeros::<u64>(1).map_err(ForgeError::driver("alloc"))?;
            let mut time = |search: ScaleSearch, batch: usize| {
                let cfg = GridConfig {
                    group_size: 128,
                    bits: 4,
                    symmetric: true,
                    scale_search: search,
                    ..GridConfig::default()
                };
                common::median_ms(&dev, 3, 15, batch, || launch_grid_kernel(&dev, &dw, &cfg, &mut qmeta, &mut flag))
            };
            let absmax = time(ScaleSearch::Absmax, 20)?;
            let mse24 = time(ScaleSearch::Mse(MseSearch::default()), 3)?;
            let mse2 = time(ScaleSearch::Mse(MseSearch { norm: 2.0, ..MseSearch::default() }), 3)?;
            let evals = (rows * n_groups * 128 * 100) as f64;
            rows_out.push(vec![
                format!("{rows}×{cols}"),
                dtype.into(),
                format!("{:.1}", bytes as f64 / 1e6),
                format!("{copy_ms:.4}"),
                format!("{absmax:.4}"),
                format!("{:.2}", absmax / copy_ms),
                format!("{mse24:.3}"),
                format!("{:.0}", evals / (mse24 * 1e-3) / 1e9),
                format!("{mse2:.3}"),
                format!("{:.0}", evals / (mse2 * 1e-3) / 1e9),
            ]);
        }
    }
    common::print_table(
        &format!("grid builder, gs 128, 4-bit, symmetric, {} (median ms, device events)", dev.name()),
        &[
            "shape",
            "dtype",
            "MB",
            "d2d copy ms",
            "absmax ms",
            "absmax/copy",
            "MSE p=2.4 ms",
            "G evals/s",
            "MSE p=2 ms",
            "G evals/s",
        ],
        &rows_out,
    );
    Ok(())
}
