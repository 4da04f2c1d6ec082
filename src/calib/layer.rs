//! One layer, or several layers that read the same inputs: Hessian, pre-step, quantize.

use super::ActivationView;
use crate::device::GpuDevice;
use crate::hessian::{add_tokens, asymmetry_warning};
use crate::hessian::{pre_step_cpu, GpuHessian, HessianAccumulator, PreStep, PreStepConfig};
use crate::quantize::{cpu, widen, with_engine, HessianInput, LayerJob, PreStepSummary, QuantizedWeight};
use crate::solver::{flushed_groups_codes, validate_factor, DeviceFactor};
use crate::{budget, Backend, ForgeError, GridConfig, QuantGrid, Quantizer, Result, Warning, WeightView};
use forge_numerics::dequantize;
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;
use std::sync::Arc;

/// Where a layer's pre-step ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreStepRoute {
    /// faer on the CPU ([`crate::hessian::pre_step_cpu`]): the CPU backend, or a GPU backend
    /// on a machine where cuSOLVER could not be loaded.
    Cpu,
    /// On the device: cuSOLVER `potrf` and cuBLAS `trsm` in f64 ([`crate::quantize::QuantEngine`]).
    Gpu,
    /// No pre-step: the layer saw no calibration tokens and uses `U = I`.
    NoTokens,
    /// The caller gave the factor `U` (the pre-step ran elsewhere).
    Given,
}

/// What the pre-step had to do for a layer (everything a user should know about its quality).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizeFlags {
    /// Inputs with `diag H == 0`: their weight columns were zeroed before the grid was built.
    pub dead_columns: Vec<usize>,
    /// Factorisations retried with more damping.
    pub retries: u32,
    /// Every factorisation failed: `U = I`, the result is round-to-nearest.
    pub fallback_identity: bool,
    /// The layer saw no calibration tokens: `H = I`, the result is round-to-nearest.
    pub no_tokens: bool,
    /// Absolute damping added to `diag H` by the attempt that was used (0 without tokens).
    pub damping_used: f32,
    /// Where the pre-step ran.
    pub route: PreStepRoute,
}

/// A quantized layer: grid, codes, loss, act-order, flags. The dequantized weight is computed
/// on request ([`QuantizedLayer::dequant`]): it is exactly what the solver produced, and most
/// callers only need the codes and the grid.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedLayer {
    /// qmeta4 records of the (dead-column-zeroed) weight.
    pub grid: QuantGrid,
    /// `(rows, cols)` codes, original column order.
    pub codes: Array2<u8>,
    /// GPTQ loss per row.
    pub loss: Array1<f32>,
    /// Act-order column order used by the solver, if any.
    pub perm: Option<Vec<usize>>,
    /// What the pre-step did.
    pub flags: QuantizeFlags,
    /// Everything legal but surprising about this result, from the pre-step (asymmetric `H`,
    /// dead inputs, retries, identity fallback, no tokens) and the solve (flushed groups).
    pub warnings: Vec<Warning>,
}

impl QuantizedLayer {
    /// The dequantized weight `(q − q0)·s`, bit-identical to the solver's (the same scalar
    /// numerics on the same codes and records), computed on all cores.
    pub fn dequant(&self) -> Array2<f32> {
        dequant_codes(&self.codes, &self.grid)
    }

    /// A result of the device engine for `weight` (the weight it was computed from): the
    /// pre-step's warnings, then the flushed groups, which the device leaves to the host.
    pub(crate) fn from_engine(w: QuantizedWeight, weight: WeightView<'_>, summary: &PreStepSummary) -> Result<Self> {
        let mut warnings = summary.warnings.clone();
        warnings.extend(flushed_groups_codes(weight, w.codes.view(), &w.grid, &summary.dead_columns)?);
        Ok(QuantizedLayer {
            grid: w.grid,
            codes: w.codes,
            loss: w.loss,
            perm: summary.perm.clone(),
            flags: flags_of(summary),
            warnings,
        })
    }
}

/// `(q − q0)·s` of every code with its group's record, `s` as stored in the grid's scale dtype
/// (NaN where a hand-built grid has no record for a code: never silently a number).
pub(crate) fn dequant_codes(codes: &Array2<u8>, grid: &QuantGrid) -> Array2<f32> {
    let (rows, cols) = codes.dim();
    let gs = grid.group_size.max(1);
    let mut out = Array2::<f32>::zeros((rows, cols));
    if let (Some(dst), Some(src)) = (out.as_slice_mut(), codes.as_slice()) {
        dst.par_chunks_mut(cols.max(1)).zip(src.par_chunks(cols.max(1))).enumerate().for_each(|(r, (d, q))| {
            for (c, (d, &q)) in d.iter_mut().zip(q).enumerate() {
                let (s, z) = grid.scale_zero(r, c / gs).unwrap_or((f32::NAN, 0.0));
                *d = dequantize(f32::from(q), s, z);
            }
        });
    }
    out
}

/// A pre-step result ready to quantize any number of weights with the same input columns
/// (one factorisation, then one solve per weight). On a GPU backend `U` stays on the device.
pub struct PreparedFactor {
    summary: PreStepSummary,
    cols: usize,
    data: FactorData,
}

/// Where a prepared factor's `U` is.
enum FactorData {
    /// On the host.
    Host(Array2<f32>),
    /// On this device.
    Device(Arc<GpuDevice>, DeviceFactor),
}

impl std::fmt::Debug for PreparedFactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedFactor")
            .field("cols", &self.cols)
            .field("route", &self.summary.route)
            .field("on_device", &matches!(self.data, FactorData::Device(..)))
            .finish()
    }
}

impl PreparedFactor {
    /// Wraps a pre-step result computed on the host (e.g. by [`crate::hessian::pre_step_cpu`],
    /// or built by the caller). The result is checked like solver input: `U` square, finite,
    /// with a positive diagonal; `perm` a permutation; every dead column in range; the
    /// damping finite.
    pub fn new(pre: PreStep, route: PreStepRoute) -> Result<Self> {
        let (n, c) = pre.hinv_factor.dim();
        if n != c || n == 0 {
            return Err(ForgeError::Shape(format!("hinv_factor is {n}×{c}, expected a non-empty square matrix")));
        }
        validate_factor(pre.hinv_factor.view(), n, pre.perm.as_deref())?;
        if let Some(&j) = pre.dead_columns.iter().find(|&&j| j >= n) {
            return Err(ForgeError::Shape(format!("dead column {j} is out of range for a {n}×{n} factor")));
        }
        if !pre.damping_used.is_finite() {
            return Err(ForgeError::Config(format!("damping_used = {} is not finite", pre.damping_used)));
        }
        let summary = PreStepSummary {
            perm: pre.perm,
            dead_columns: pre.dead_columns,
            damping_used: pre.damping_used,
            retries: pre.retries,
            fallback_identity: pre.fallback_identity,
            route,
            warnings: pre.warnings,
        };
        Ok(PreparedFactor { summary, cols: n, data: FactorData::Host(pre.hinv_factor) })
    }

    /// `U = I`, no act-order, no damping: the factor of a layer that saw no tokens
    /// (round-to-nearest, flagged [`QuantizeFlags::no_tokens`]).
    pub fn no_tokens(cols: usize) -> Result<Self> {
        if cols == 0 {
            return Err(ForgeError::Shape("a layer needs at least one input column".into()));
        }
        budget::Request::new().array::<f32>(&[cols, cols]).check(&format!("the {cols}×{cols} identity factor"))?;
        let pre = PreStep {
            hinv_factor: Array2::eye(cols),
            perm: None,
            dead_columns: Vec::new(),
            damping_used: 0.0,
            retries: 0,
            fallback_identity: false,
            warnings: vec![Warning::NoCalibrationTokens],
        };
        Self::new(pre, PreStepRoute::NoTokens)
    }

    /// What the pre-step did (act-order, dead inputs, damping, retries, route, warnings).
    pub fn summary(&self) -> &PreStepSummary {
        &self.summary
    }

    /// `U` on the host, when the pre-step ran there.
    pub fn host_factor(&self) -> Option<&Array2<f32>> {
        match &self.data {
            FactorData::Host(u) => Some(u),
            FactorData::Device(..) => None,
        }
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Where the pre-step ran.
    pub fn route(&self) -> PreStepRoute {
        self.summary.route
    }

    /// The flags every layer quantized with this factor reports.
    pub fn flags(&self) -> QuantizeFlags {
        flags_of(&self.summary)
    }
}

/// The flags of a pre-step summary.
pub(crate) fn flags_of(s: &PreStepSummary) -> QuantizeFlags {
    QuantizeFlags {
        dead_columns: s.dead_columns.clone(),
        retries: s.retries,
        fallback_identity: s.fallback_identity,
        no_tokens: s.route == PreStepRoute::NoTokens,
        damping_used: s.damping_used,
        route: s.route,
    }
}

/// Where a Hessian lives.
enum HessianState {
    /// The CPU reference accumulator.
    Cpu(HessianAccumulator),
    /// A Hessian given on the host (not accumulated here), with its token count.
    CpuGiven { h: Array2<f32>, tokens: u64 },
    /// On the device.
    Gpu(Box<GpuHessian>),
}

/// A running Hessian on the quantizer's backend, shareable by every layer that reads the
/// same inputs (e.g. an expert's gate and up projections).
pub struct SharedHessian {
    state: HessianState,
    backend: Backend,
    /// The asymmetry of a host `H` uploaded to the device (the GPU pre-step symmetrises
    /// without looking, so it is checked on the host copy).
    asymmetry: Option<Warning>,
}

impl std::fmt::Debug for SharedHessian {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedHessian")
            .field("cols", &self.cols())
            .field("tokens", &self.tokens())
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl SharedHessian {
    /// `H = 0`, no tokens, for `cols` input features.
    pub fn new(cols: usize, backend: &Backend) -> Result<Self> {
        let state = match backend {
            Backend::Cpu => HessianState::Cpu(HessianAccumulator::new(cols)?),
            Backend::Gpu(dev) => HessianState::Gpu(Box::new(GpuHessian::new(dev, cols)?)),
        };
        Ok(SharedHessian { state, backend: backend.clone(), asymmetry: None })
    }

    /// A Hessian accumulated elsewhere over `tokens` tokens (0 marks a layer without
    /// calibration data: its pre-step is `U = I`, flagged). Must be square and finite; the
    /// copy is checked against the host budget.
    pub fn from_host(h: ArrayView2<'_, f32>, tokens: u64, backend: &Backend) -> Result<Self> {
        let state = match backend {
            Backend::Cpu => {
                let (n, c) = h.dim();
                if n != c || n == 0 {
                    return Err(ForgeError::Shape(format!("the Hessian must be square and non-empty, got {n}×{c}")));
                }
                budget::Request::new().array::<f32>(&[n, n]).check(&format!("a copy of a {n}×{n} Hessian"))?;
                if let Some(((row, col), &value)) = h.indexed_iter().find(|(_, v)| !v.is_finite()) {
                    return Err(ForgeError::NonFinite { tensor: "hessian", row, col, value });
                }
                HessianState::CpuGiven { h: h.to_owned(), tokens }
            }
            Backend::Gpu(dev) => HessianState::Gpu(Box::new(GpuHessian::from_host(dev, h, tokens)?)),
        };
        let asymmetry = match backend {
            Backend::Gpu(_) => asymmetry_warning(h),
            Backend::Cpu => None,
        };
        Ok(SharedHessian { state, backend: backend.clone(), asymmetry })
    }

    /// A Hessian accumulated on the device (the calibration forward's hooks): used in place,
    /// exactly symmetric by construction.
    pub fn from_device(h: GpuHessian, backend: &Backend) -> Result<Self> {
        if !matches!(backend, Backend::Gpu(_)) {
            return Err(ForgeError::Config("a device Hessian needs the GPU backend".into()));
        }
        Ok(SharedHessian { state: HessianState::Gpu(Box::new(h)), backend: backend.clone(), asymmetry: None })
    }

    /// Input features (the side of `H`).
    pub fn cols(&self) -> usize {
        match &self.state {
            HessianState::Cpu(a) => a.cols(),
            HessianState::CpuGiven { h, .. } => h.nrows(),
            HessianState::Gpu(g) => g.cols(),
        }
    }

    /// Tokens seen so far.
    pub fn tokens(&self) -> u64 {
        match &self.state {
            HessianState::Cpu(a) => a.tokens(),
            HessianState::CpuGiven { tokens, .. } => *tokens,
            HessianState::Gpu(g) => g.tokens(),
        }
    }

    /// Adds a batch of activations `(tokens, cols)`: `H ← β·H + α·XᵀX`, `α = 2/(n+m)`,
    /// `β = n/(n+m)` (docs/design.md §5). f16/bf16 are widened exactly to f32. NaN/inf
    /// activations, f32 overflow and a token count that overflows u64 are typed errors; a
    /// failed update leaves the Hessian as it was (on the CPU backend; on the GPU see
    /// [`GpuHessian::update`]).
    pub fn update(&mut self, x: ActivationView<'_>) -> Result<()> {
        match &mut self.state {
            HessianState::Cpu(acc) => match x {
                ActivationView::F32(v) => acc.update(v),
                _ => acc.update(x.to_f32()?.view()),
            },
            HessianState::CpuGiven { h, tokens } => {
                let (m, cols) = x.dim();
                if cols != h.nrows() {
                    return Err(ForgeError::Shape(format!(
                        "activations have {cols} columns, the Hessian has {}",
                        h.nrows()
                    )));
                }
                if m == 0 {
                    return Ok(());
                }
                let total_tokens = add_tokens(*tokens, m)?;
                // The batch's own Hessian Hb = 2/m·XᵀX, blended as the running mean:
                // H ← n/(n+m)·H + m/(n+m)·Hb (the same average, rounded once more).
                let mut batch = HessianAccumulator::new(h.nrows())?;
                match x {
                    ActivationView::F32(v) => batch.update(v)?,
                    _ => batch.update(x.to_f32()?.view())?,
                }
                let total = total_tokens as f64;
                let (a, b) = ((m as f64 / total) as f32, (*tokens as f64 / total) as f32);
                let blend = |hv: f32, bv: f32| b * hv + a * bv;
                // Checked before anything is written, so an overflow leaves H as it was.
                if let Some(((row, col), &hv)) =
                    h.indexed_iter().find(|&((i, j), &hv)| !blend(hv, batch.h()[[i, j]]).is_finite())
                {
                    let value = blend(hv, batch.h()[[row, col]]);
                    return Err(ForgeError::NonFinite { tensor: "H (f32 overflow in the blend)", row, col, value });
                }
                h.zip_mut_with(batch.h(), |hv, &bv| *hv = blend(*hv, bv));
                *tokens = total_tokens;
                Ok(())
            }
            HessianState::Gpu(g) => match &self.backend {
                Backend::Gpu(dev) => g.update(dev, x),
                Backend::Cpu => Err(ForgeError::Internal("a device Hessian without a device".into())),
            },
        }
    }

    /// `H` on the host.
    pub fn to_host(&self) -> Result<Array2<f32>> {
        match (&self.state, &self.backend) {
            (HessianState::Cpu(a), _) => Ok(a.h().clone()),
            (HessianState::CpuGiven { h, .. }, _) => Ok(h.clone()),
            (HessianState::Gpu(g), Backend::Gpu(dev)) => g.to_host(dev),
            (HessianState::Gpu(_), Backend::Cpu) => {
                Err(ForgeError::Internal("a device Hessian without a device".into()))
            }
        }
    }

    /// The device Hessian, on a GPU backend.
    pub fn device(&self) -> Option<&GpuHessian> {
        match &self.state {
            HessianState::Gpu(g) => Some(g),
            _ => None,
        }
    }

    /// The pre-step (docs/design.md §5) on this Hessian's backend: on the GPU through the
    /// device's engine (`U` stays on the device; on the CPU when cuSOLVER/cuBLAS cannot be
    /// loaded, as the result's [`PreparedFactor::route`] says), else on the CPU. A Hessian
    /// without tokens gives `U = I` ([`PreStepRoute::NoTokens`]). Settings are checked even
    /// where they end up unused (no tokens): a bad setting is a bug in the caller either way.
    pub fn pre_step(&self, cfg: &PreStepConfig) -> Result<PreparedFactor> {
        cfg.validate()?;
        if self.tokens() == 0 {
            return PreparedFactor::no_tokens(self.cols());
        }
        let host = match &self.state {
            HessianState::Cpu(a) => Some(a.h().view()),
            HessianState::CpuGiven { h, .. } => Some(h.view()),
            HessianState::Gpu(_) => None,
        };
        match (&self.backend, host, &self.state) {
            (Backend::Cpu, Some(h), _) => PreparedFactor::new(pre_step_cpu(h, None, cfg)?, PreStepRoute::Cpu),
            (Backend::Gpu(dev), Some(h), _) => {
                prepare_on_device(dev, HessianInput::Host(h), cfg, || asymmetry_warning(h))
            }
            (Backend::Gpu(dev), None, HessianState::Gpu(g)) => {
                prepare_on_device(dev, HessianInput::Device(g), cfg, || self.asymmetry.clone())
            }
            _ => Err(ForgeError::Internal("a device Hessian without a device".into())),
        }
    }
}

/// The engine's pre-step into a prepared factor (device-resident unless it ran on the CPU).
/// `asymmetry` is asked for when the pre-step ran on the device, which symmetrises `H`
/// without looking (the CPU pre-step reports it itself).
fn prepare_on_device(
    dev: &Arc<GpuDevice>,
    h: HessianInput<'_>,
    cfg: &PreStepConfig,
    asymmetry: impl FnOnce() -> Option<Warning>,
) -> Result<PreparedFactor> {
    let (factor, mut summary) = with_engine(dev, |e| e.prepare_factor(h, cfg))?;
    if summary.route == PreStepRoute::Gpu {
        summary.warnings.splice(0..0, asymmetry());
    }
    Ok(PreparedFactor { cols: factor.cols(), summary, data: FactorData::Device(dev.clone(), factor) })
}

/// Quantizes `weight` with a prepared factor of its Hessian: dead input columns zeroed, grid
/// built from the zeroed weight, GPTQ solve with `U` and the act-order, all on the
/// quantizer's backend (on a GPU: the device's engine, the weight uploaded once in its stored
/// dtype). Several weights that read the same inputs share one factor.
pub fn quantize_with(quantizer: &Quantizer, factor: &PreparedFactor, weight: WeightView<'_>) -> Result<QuantizedLayer> {
    let (rows, cols) = weight.dim();
    quantizer.config.validate(rows, cols)?;
    if cols != factor.cols() {
        return Err(ForgeError::Shape(format!("weight has {cols} columns, the factor is {0}×{0}", factor.cols())));
    }
    let perm = factor.summary.perm.clone();
    let flags = factor.flags();
    match (&quantizer.backend, &factor.data) {
        (Backend::Cpu, FactorData::Host(u)) => {
            let mut w = widen(weight)?;
            for &j in &factor.summary.dead_columns {
                w.column_mut(j).fill(0.0);
            }
            let (grid, out) =
                cpu::grid_and_solve(&quantizer.config, WeightView::F32(w.view()), u.view(), perm.as_deref())?;
            // The pre-step's warnings, then the solve's (flushed groups).
            let mut warnings = factor.summary.warnings.clone();
            warnings.extend(out.warnings);
            Ok(QuantizedLayer { grid, codes: out.qweight, loss: out.loss, perm, flags, warnings })
        }
        (Backend::Gpu(dev), data) => {
            let uploaded;
            let f = match data {
                FactorData::Device(d, f) if Arc::ptr_eq(d, dev) => f,
                FactorData::Device(..) => {
                    return Err(ForgeError::Config("the factor was prepared on another device".into()))
                }
                FactorData::Host(u) => {
                    uploaded = DeviceFactor::upload(dev, u.view(), perm.as_deref())?;
                    &uploaded
                }
            };
            let hessian = HessianInput::Prepared { factor: f, summary: &factor.summary };
            let job = LayerJob::new(weight.reborrow(), hessian, &quantizer.config);
            let mut out = with_engine(dev, |e| e.quantize(&job))?;
            let w = out.weights.pop().ok_or_else(|| ForgeError::Internal("engine returned no weight".into()))?;
            QuantizedLayer::from_engine(w, weight, &factor.summary)
        }
        (Backend::Cpu, FactorData::Device(..)) => {
            Err(ForgeError::Config("a factor prepared on a device cannot be used on the CPU backend".into()))
        }
    }
}

/// One linear layer in MoE-Quant's `GPTQ` shape: `new`, `update` with calibration inputs,
/// `quantization_pre_step`, `quantize`.
#[derive(Debug)]
pub struct GptqLayer {
    weight: Array2<f32>,
    quantizer: Quantizer,
    hessian: SharedHessian,
    factor: Option<PreparedFactor>,
}

impl GptqLayer {
    /// A layer for `weight` (`(out_features, in_features)`, any supported dtype, widened to
    /// f32; NaN/inf is an error) in format `config` on `backend`.
    pub fn new(weight: WeightView<'_>, config: GridConfig, backend: Backend) -> Result<Self> {
        let (rows, cols) = weight.dim();
        config.validate(rows, cols)?;
        let weight = widen(weight)?;
        let hessian = SharedHessian::new(cols, &backend)?;
        Ok(GptqLayer { weight, quantizer: Quantizer::new(config, backend), hessian, factor: None })
    }

    /// Adds a batch of the layer's inputs `(tokens, in_features)` to its Hessian (and drops
    /// a pre-step computed before it). A batch rejected on the CPU backend changes nothing:
    /// the Hessian and the pre-step stay as they were.
    pub fn update(&mut self, x: ActivationView<'_>) -> Result<()> {
        let before = self.hessian.tokens();
        let result = self.hessian.update(x);
        // A device update that failed part-way keeps the chunks before the failure (see
        // GpuHessian::update): H changed, so the old pre-step no longer fits it.
        if self.hessian.tokens() != before {
            self.factor = None;
        }
        result
    }

    /// Tokens seen so far.
    pub fn tokens(&self) -> u64 {
        self.hessian.tokens()
    }

    /// The layer's Hessian.
    pub fn hessian(&self) -> &SharedHessian {
        &self.hessian
    }

    /// The (f32) weight being quantized.
    pub fn weight(&self) -> &Array2<f32> {
        &self.weight
    }

    /// Format and backend.
    pub fn quantizer(&self) -> &Quantizer {
        &self.quantizer
    }

    /// Dead inputs, damping, act-order and `U` (see [`SharedHessian::pre_step`]); kept for
    /// [`GptqLayer::quantize`].
    pub fn quantization_pre_step(&mut self, cfg: &PreStepConfig) -> Result<&PreparedFactor> {
        let f = self.hessian.pre_step(cfg)?;
        Ok(self.factor.insert(f))
    }

    /// Quantizes the layer (running the pre-step with [`PreStepConfig::default`] first if
    /// [`GptqLayer::quantization_pre_step`] was not called since the last update).
    pub fn quantize(&mut self) -> Result<QuantizedLayer> {
        if self.factor.is_none() {
            self.quantization_pre_step(&PreStepConfig::default())?;
        }
        let factor =
            self.factor.as_ref().ok_or_else(|| ForgeError::Internal("pre-step missing after running it".into()))?;
        quantize_with(&self.quantizer, factor, WeightView::F32(self.weight.view()))
    }
}
