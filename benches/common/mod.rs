//! Shared by the GPU benchmark binaries: event timing (warm-up, batches, median) and a table.
#![allow(dead_code)]

use cudarc::driver::sys::CUevent_flags;
use fourbit_forge::device::GpuDevice;
use fourbit_forge::{ForgeError, Result};

/// Median milliseconds per call of `f`, timed with device events: `warmup` calls, then
/// `samples` batches of `batch` back-to-back calls each (a batch keeps the GPU busy while the
/// host enqueues, so launch latency stays out of the number).
pub fn median_ms(
    dev: &GpuDevice,
    warmup: usize,
    samples: usize,
    batch: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let stream = dev.stream();
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(ForgeError::driver("recording an event"))?;
        for _ in 0..batch {
            f()?;
        }
        let end = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(ForgeError::driver("recording an event"))?;
        end.synchronize().map_err(ForgeError::driver("waiting for an event"))?;
        times.push(start.elapsed_ms(&end).map_err(ForgeError::driver("reading an event"))? as f64 / batch as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Prints a markdown table.
pub fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    println!("\n### {title}\n");
    println!("| {} |", header.join(" | "));
    println!("|{}|", header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for r in rows {
        println!("| {} |", r.join(" | "));
    }
}

/// The device, or `None` after printing why the benchmark does not run here.
pub fn device_or_explain(bench: &str) -> Option<std::sync::Arc<GpuDevice>> {
    match GpuDevice::first() {
        Ok(d) => {
            println!("{bench}: {}", d.name());
            Some(d)
        }
        Err(e) => {
            println!("{bench}: no GPU here ({e}); nothing to time");
            None
        }
    }
}

/// Heavy-tailed (Student-t, 3 dof) weights, deterministic for a seed.
pub fn heavy_tailed(rows: usize, cols: usize, seed: u64) -> ndarray::Array2<f32> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StudentT};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t = StudentT::new(3.0f32).expect("valid dof");
    ndarray::Array2::from_shape_fn((rows, cols), |_| t.sample(&mut rng) * 0.02)
}
