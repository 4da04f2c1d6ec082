//! Criterion bench of the CPU reference packing: 4096×4096 codes into int32 words along the
//! input axis (compressed-tensors, `pack_rows`) and stored transposed (GPTQ, `pack_cols` of
//! the transposed codes), and back. Throughput counts the u8 codes read or written.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fourbit_forge::pack::{pack_cols, pack_rows, unpack_rows};
use ndarray::Array2;

fn pack_cpu(c: &mut Criterion) {
    let (rows, cols) = (4096usize, 4096usize);
    let mut g = c.benchmark_group("pack_cpu_4096x4096");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((rows * cols) as u64));
    for bits in [3u32, 4] {
        let codes = Array2::from_shape_fn((rows, cols), |(r, c)| ((r * 31 + c * 7) % (1 << bits)) as u8);
        let packed = pack_rows(codes.view(), bits).expect("codes fit");
        g.bench_function(format!("pack_rows_{bits}bit"), |b| b.iter(|| pack_rows(codes.view(), bits).expect("fit")));
        g.bench_function(format!("unpack_rows_{bits}bit"), |b| {
            b.iter(|| unpack_rows(packed.view(), bits, cols).expect("shape"))
        });
        g.bench_function(format!("gptq_qweight_{bits}bit"), |b| b.iter(|| pack_cols(codes.t(), bits).expect("fit")));
    }
    g.finish();
}

criterion_group!(benches, pack_cpu);
criterion_main!(benches);
