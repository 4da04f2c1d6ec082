//! GPU packing benchmark: u8 codes → int32 words for 2..=8 bits in both layouts (`rows`:
//! compressed-tensors `weight_packed`; `transposed`: GPTQ `qweight`), for the docs/design.md
//! §8 shapes, beside a device-to-device copy measured in the same run. GB/s counts bytes read
//! plus bytes written (codes in, words out; a copy moves its size twice). Target: packing at
//! ≥ 80 % of the copy's bandwidth.
//!
//! Run on a GPU machine: `cargo bench --bench gpu_pack`.

mod common;

use fourbit_forge::device::{DeviceBuffer, DeviceBufferMut};
use fourbit_forge::pack::{launch_pack_into, PackLayout};
use fourbit_forge::{ForgeError, Result};
use rand::{Rng, SeedableRng};

fn main() -> Result<()> {
    let Some(dev) = common::device_or_explain("gpu_pack") else { return Ok(()) };
    let stream = dev.stream().clone();
    let mut table = Vec::new();
    let mut worst = f64::INFINITY;
    for (rows, cols) in [(4096usize, 4096usize), (2048, 7168), (7168, 2048), (14336, 4096)] {
        let n = rows * cols;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let host: Vec<u8> = (0..n).map(|_| rng.gen_range(0..4)).collect(); // fits every width
        let codes = stream.clone_htod(&host).map_err(ForgeError::driver("upload"))?;
        let mut copy = stream.alloc_zeros::<u8>(n).map_err(ForgeError::driver("alloc"))?;
        let copy_ms = common::median_ms(&dev, 3, 15, 20, || {
            stream.memcpy_dtod(&codes, &mut copy).map_err(ForgeError::driver("copy"))
        })?;
        let copy_gbs = 2.0 * n as f64 / (copy_ms * 1e6);
        let mut words = stream.alloc_zeros::<u32>(n / 4 + 64).map_err(ForgeError::driver("alloc"))?;
        let mut flag = stream.alloc_zeros::<u64>(1).map_err(ForgeError::driver("alloc"))?;
        for bits in 2..=8u32 {
            for layout in [PackLayout::Rows, PackLayout::Transposed] {
                let (a, b) = layout.shape(rows, cols, bits)?;
                let (wp, fp) = (words.dev_ptr_mut(), flag.dev_ptr_mut());
                let cp = codes.dev_ptr();
                let ms = common::median_ms(&dev, 3, 15, 20, || {
                    // SAFETY: codes hold rows·cols bytes (a whole allocation), words ≥ a·b u32,
                    // flag one u64; all on the compute stream.
                    unsafe { launch_pack_into(&dev, cp, rows, cols, bits, layout, wp, fp) }
                })?;
                let bytes = n as f64 + 4.0 * (a * b) as f64;
                let gbs = bytes / (ms * 1e6);
                worst = worst.min(gbs / copy_gbs);
                table.push(vec![
                    format!("{rows}×{cols}"),
                    bits.to_string(),
                    match layout {
                        PackLayout::Rows => "rows".into(),
                        PackLayout::Transposed => "transposed".into(),
                    },
                    format!("{ms:.4}"),
                    format!("{gbs:.0}"),
                    format!("{copy_gbs:.0}"),
                    format!("{:.2}", gbs / copy_gbs),
                ]);
            }
        }
    }
    common::print_table(
        &format!("packing u8 codes → int32 words, {} (median ms, device events; GB/s = read + written)", dev.name()),
        &["rows×cols", "bits", "layout", "ms", "GB/s", "d2d copy GB/s", "pack/copy"],
        &table,
    );
    println!("\nworst pack/copy ratio: {worst:.2} (target ≥ 0.80)");
    Ok(())
}
