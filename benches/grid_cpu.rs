//! Criterion bench of the CPU reference grid builder (absmax and MSE) on one mid-size layer.

use criterion::{criterion_group, criterion_main, Criterion};
use fourbit_forge::grid::build_quant_grid;
use fourbit_forge::{GridConfig, MseSearch, ScaleSearch, WeightView};

mod common;

fn grid_cpu(c: &mut Criterion) {
    let w = common::heavy_tailed(512, 2048, 3);
    let mut g = c.benchmark_group("grid_cpu_512x2048_gs128");
    g.sample_size(10);
    for (name, search) in [("absmax", ScaleSearch::Absmax), ("mse_p2.4", ScaleSearch::Mse(MseSearch::default()))] {
        let cfg = GridConfig { scale_search: search, ..GridConfig::default() };
        g.bench_function(name, |b| b.iter(|| build_quant_grid(WeightView::F32(w.view()), &cfg).expect("valid grid")));
    }
    g.finish();
}

criterion_group!(benches, grid_cpu);
criterion_main!(benches);
