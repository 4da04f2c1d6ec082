//! Shared by the parity tests (CPU reference and GPU forward) against Hugging Face
//! transformers' fixtures (`tools/parity/gen_fixtures.py`): the embedded fixtures, their
//! activations, the error measure and the derived tolerance's constants (derivation in
//! tests/model_cpu_parity.rs).
#![allow(dead_code)]

use fourbit_forge::calib::model::{InputGroup, ModelConfig};
use ndarray::{Array2, ArrayView2};
use safetensors::{Dtype, SafeTensors};

pub struct Fixture {
    pub name: &'static str,
    pub config: &'static str,
    pub model: &'static [u8],
    pub activations: &'static [u8],
}

macro_rules! fixture {
    ($name:literal) => {
        Fixture {
            name: $name,
            config: include_str!(concat!("../../testdata/parity/", $name, "/config.json")),
            model: include_bytes!(concat!("../../testdata/parity/", $name, "/model.safetensors")),
            activations: include_bytes!(concat!("../../testdata/parity/", $name, "/activations.safetensors")),
        }
    };
}

pub const FIXTURES: [Fixture; 6] = [
    fixture!("llama"),
    fixture!("mistral"),
    fixture!("qwen2"),
    fixture!("qwen3"),
    fixture!("qwen3_moe"),
    fixture!("mixtral"),
];

pub const U: f64 = 1.0 / (1u64 << 24) as f64;
pub const REDUCTIONS: f64 = 12.0;
pub const AMPLIFICATION: f64 = 8.0;

pub fn gamma(k: usize) -> f64 {
    let ku = k as f64 * U;
    ku / (1.0 - ku)
}

/// `max|a−b| / max|b|` and `mean|a−b| / mean|b|`.
pub fn rel_err(ours: ArrayView2<'_, f32>, reference: ArrayView2<'_, f32>) -> (f64, f64) {
    assert_eq!(ours.dim(), reference.dim(), "shapes differ");
    let (mut max_d, mut max_r, mut sum_d, mut sum_r) = (0f64, 0f64, 0f64, 0f64);
    for (&a, &b) in ours.iter().zip(reference.iter()) {
        let d = (f64::from(a) - f64::from(b)).abs();
        max_d = max_d.max(d);
        max_r = max_r.max(f64::from(b).abs());
        sum_d += d;
        sum_r += f64::from(b).abs();
    }
    (max_d / max_r.max(f64::MIN_POSITIVE), sum_d / sum_r.max(f64::MIN_POSITIVE))
}

/// `theirs` with its rows reordered to pair with `ours` row by row (nearest row, each used
/// once): the same set of tokens in another order.
pub fn match_rows(ours: ArrayView2<'_, f32>, theirs: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut used = vec![false; theirs.nrows()];
    let mut out = Array2::<f32>::zeros(theirs.dim());
    for (i, a) in ours.rows().into_iter().enumerate() {
        let dist = |j: usize| -> f64 {
            a.iter().zip(theirs.row(j)).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum()
        };
        let j = (0..theirs.nrows())
            .filter(|&j| !used[j])
            .min_by(|&x, &y| dist(x).total_cmp(&dist(y)))
            .expect("as many rows on both sides");
        used[j] = true;
        out.row_mut(i).assign(&theirs.row(j));
    }
    out
}

pub struct Acts<'a>(pub SafeTensors<'a>);

impl<'a> Acts<'a> {
    pub fn f32(&self, name: &str) -> Option<Array2<f32>> {
        let t = self.0.tensor(name).ok()?;
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let shape = t.shape();
        Some(Array2::from_shape_vec((shape[0], shape[1]), v).expect("2-D activation"))
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        let t = self.0.tensor(name).expect(name);
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32).collect()
    }
}

pub fn group_key(g: InputGroup) -> String {
    match g {
        InputGroup::Qkv => "qkv".into(),
        InputGroup::O => "o".into(),
        InputGroup::GateUp => "gate_up".into(),
        InputGroup::Down => "down".into(),
        InputGroup::ExpertGateUp(e) => format!("e{e}.gate_up"),
        InputGroup::ExpertDown(e) => format!("e{e}.down"),
    }
}

/// The longest reduction of layer `l` (f32 dot products and sums).
pub fn k_max(cfg: &ModelConfig, layer: usize, seq: usize) -> usize {
    let g = cfg.gqa();
    let mut k = cfg.hidden_size.max(g.num_heads * g.head_dim).max(seq);
    let groups = cfg.linear_groups(layer).expect("groups");
    for grp in &groups {
        k = k.max(grp.in_features);
    }
    if let Some(m) = &cfg.moe {
        k = k.max(m.num_experts);
    }
    k
}

#[derive(Default)]
pub struct Row {
    pub what: String,
    pub max: f64,
    pub mean: f64,
    pub tol: f64,
}
