//! Rotary position embedding: inverse frequencies per scaling type, as transformers'
//! `modeling_rope_utils.py` (v5.24) computes them, in the same f32 steps where it matters
//! (`inv_freq` is an f32 tensor there; the angle is the f32 product `pos · inv_freq`).

use super::config::{RopeConfig, RopeScaling};
use crate::{ForgeError, Result};

/// Inverse frequencies and the cos/sin multiplier of one model's RoPE.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// `rotary_dim / 2` inverse frequencies.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_factor: f32,
}

/// `base^(2i/dim)` for `i < dim/2` as `_compute_default_rope_parameters` forms it: the exponent
/// is an f32 tensor (`arange(0, dim, 2).float() / dim`), the power an f32 `pow`.
fn pos_freqs(theta: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim as f32;
            theta.powf(f64::from(exponent)) as f32
        })
        .collect()
}

impl Rope {
    /// Frequencies for `cfg` (the scaling rules of `_compute_{default,linear_scaling,llama3,yarn}_parameters`).
    pub fn new(cfg: &RopeConfig) -> Result<Self> {
        let dim = cfg.rotary_dim;
        if dim == 0 || !dim.is_multiple_of(2) {
            return Err(ForgeError::Config(format!("rotary dimension {dim} must be even and positive")));
        }
        let base = pos_freqs(cfg.theta, dim);
        let default: Vec<f32> = base.iter().map(|p| 1.0 / p).collect();
        Ok(match &cfg.scaling {
            RopeScaling::Default => Rope { inv_freq: default, attention_factor: 1.0 },
            RopeScaling::Linear { factor } => {
                let f = *factor as f32;
                Rope { inv_freq: default.iter().map(|v| v / f).collect(), attention_factor: 1.0 }
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = *original_max_position_embeddings;
                let low_wavelen = (old / low_freq_factor) as f32;
                let high_wavelen = (old / high_freq_factor) as f32;
                let factor32 = *factor as f32;
                let inv_freq = default
                    .iter()
                    .map(|&inv| {
                        let wavelen = (2.0 * std::f64::consts::PI) as f32 / inv;
                        // wavelen < high: unchanged; > low: divided by factor; between: smooth.
                        let scaled = if wavelen > low_wavelen { inv / factor32 } else { inv };
                        // `~(wavelen < high) * ~(wavelen > low)` in the reference; wavelengths are finite here.
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = ((old as f32) / wavelen - *low_freq_factor as f32)
                                / (*high_freq_factor as f32 - *low_freq_factor as f32);
                            (1.0 - smooth) * scaled / factor32 + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect();
                Rope { inv_freq, attention_factor: 1.0 }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                let attention = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    // Python truthiness: a zero mscale counts as absent.
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                    }
                    _ => get_mscale(*factor, 1.0),
                };
                let d = dim as f64;
                let correction_dim = |rotations: f64| {
                    d * (original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * cfg.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(d - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                let factor32 = *factor as f32;
                let inv_freq = base
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        let extrapolation = 1.0 / p;
                        let interpolation = 1.0 / (factor32 * p);
                        interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                    })
                    .collect();
                Rope { inv_freq, attention_factor: attention as f32 }
            }
        })
    }

    /// `(cos, sin)` of every frequency at `position`, times the attention factor.
    pub fn cos_sin(&self, position: usize) -> (Vec<f32>, Vec<f32>) {
        let p = position as f32;
        self.inv_freq
            .iter()
            .map(|&f| {
                let angle = f64::from(p * f);
                ((angle.cos() as f32) * self.attention_factor, (angle.sin() as f32) * self.attention_factor)
            })
            .unzip()
    }

    /// Rotates one head in place: `x·cos + rotate_half(x)·sin` with
    /// `rotate_half(x) = [-x₂, x₁]` (halves of the rotary dimension).
    pub fn apply(&self, head: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.inv_freq.len();
        let (x1, x2) = head.split_at_mut(half);
        for i in 0..half.min(x2.len()) {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
        }
    }
}
