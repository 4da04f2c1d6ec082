//! GPU solver benchmark: the fused solve for the docs/design.md §8 shapes (gs 128, 4-bit,
//! symmetric), beside the fp32 arithmetic floor `R·C² flops / measured f32 FMA rate` (the
//! rate measured in the same run by the `fma_throughput` kernel). One table; device events,
//! warm-up, median of repeats.
//!
//! Run on a GPU machine: `cargo bench --bench gpu_solver` (or the staged `bench-gpu_solver`).

mod common;

use cudarc::driver::LaunchConfig;
use forge_kernel_abi::solver::SOLVER_PANEL;
use forge_kernel_abi::testing::FmaThroughputArgs;
use fourbit_forge::device::{DeviceBufferMut, GpuDevice};
use fourbit_forge::grid::{build_quant_grid_device, DeviceWeight};
use fourbit_forge::solver::{launch_solve, DeviceFactor, SolveWorkspace};
use fourbit_forge::{ForgeError, GridConfig, Result, WeightView};
use ndarray::Array2;
use rand::{Rng, SeedableRng};

/// Measured f32 FMA throughput of the card, in FMA/s.
fn fma_rate(dev: &GpuDevice) -> Result<f64> {
    let (blocks, threads, iters) = (dev.sm_count()? * 32, 256u32, 4096u32);
    let mut out = dev.stream().alloc_zeros::<f32>((blocks * threads) as usize).map_err(ForgeError::driver("alloc"))?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let ms = common::median_ms(dev, 3, 11, 5, || {
        let args = FmaThroughputArgs { iters, seed: 1.0, out: out.dev_ptr_mut() };
        // SAFETY: one output per launched thread.
        unsafe { dev.launch::<forge_kernel_abi::FmaThroughput>(cfg, &args) }
    })?;
    Ok((blocks * threads) as f64 * iters as f64 * 8.0 / (ms * 1e-3))
}

/// A valid upper factor: positive diagonal, small off-diagonal (timing does not depend on
/// the values, and a real pre-step of a 7168² Hessian would dominate the bench's run time).
fn synthetic_factor(cols: usize, seed: u64) -> Array2<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let scale = 0.5 / (cols as f32).sqrt();
    Array2::from_shape_fn((cols, cols), |(t, k)| match t.cmp(&k) {
        std::cmp::Ordering::Equal => 1.0 + rng.gen::<f32>(),
        std::cmp::Ordering::Less => (rng.gen::<f32>() - 0.5) * scale,
        std::cmp::Ordering::Greater => 0.0,
    })
}

fn main() -> Result<()> {
    let Some(dev) = common::device_or_explain("gpu_solver") else { return Ok(()) };
    let rate = fma_rate(&dev)?;
    let mut rows_out = Vec::new();
    // The last two shapes have almost no multiply-adds: their time is the solver's serial
    // column-by-column chain (a row block walks every column).
    // `FORGE_SOLVER_ONLY=ROWSxCOLS` runs one shape at the default panel (for profilers).
    let only = std::env::var("FORGE_SOLVER_ONLY").ok().and_then(|s| {
        let (r, c) = s.split_once('x')?;
        Some((r.parse::<usize>().ok()?, c.parse::<usize>().ok()?))
    });
    let shapes = match only {
        Some(shape) => vec![shape],
        None => vec![(4096, 4096), (2048, 7168), (7168, 2048), (128, 4096), (128, 2048)],
    };
    let panels: &[u32] = if only.is_some() { &[SOLVER_PANEL] } else { &[256, 512, 1024] };
    for &(rows, cols) in &shapes {
        let w = common::heavy_tailed(rows, cols, 2);
        let u = synthetic_factor(cols, 3);
        let dw = DeviceWeight::upload(&dev, WeightView::F32(w.view()))?;
        let grid = build_quant_grid_device(&dev, &dw, &GridConfig::default())?;
        let factor = DeviceFactor::upload(&dev, u.view(), None)?;
        let floor_ms = (rows * cols * cols) as f64 / (2.0 * rate) * 1e3;
        for &panel in panels {
            let mut ws = SolveWorkspace::new(&dev, rows, cols)?;
            ws.set_panel(panel)?;
            let ms = common::median_ms(&dev, 2, 7, 1, || launch_solve(&dev, &dw, &factor, &grid, &mut ws))?;
            ws.output().to_host(&dev)?; // surfaces any asynchronous fault and checks finiteness
            rows_out.push(vec![
                format!("{rows}×{cols}"),
                format!("{panel}{}", if panel == SOLVER_PANEL { " (default)" } else { "" }),
                format!("{ms:.3}"),
                format!("{floor_ms:.3}"),
                format!("{:.2}", ms / floor_ms),
            ]);
        }
    }
    common::print_table(
        &format!(
            "fused GPTQ solve, gs 128, 4-bit, symmetric, {} (median ms, device events; f32 FMA rate {:.1} TFLOP/s measured)",
            dev.name(),
            2.0 * rate / 1e12
        ),
        &["shape", "panel", "solve ms", "fp32 floor ms (R·C² flops)", "solve / floor"],
        &rows_out,
    );
    Ok(())
}
