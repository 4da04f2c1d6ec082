//! One layer, or several layers that read the same inputs: Hessian, pre-step, quantize.

use super::ActivationView;
use crate::device::GpuDevice;
use crate::hessian::{pre_step_cpu, GpuHessian, GpuPreStepper, HessianAccumulator, PreStep, PreStepConfig};
use crate::quantize::{cpu, cuda, widen, WorkspaceCache};
use crate::solver::{flushed_groups, validate_factor, DeviceFactor, SolveOutput};
use crate::{budget, Backend, ForgeError, GridConfig, QuantGrid, Quantizer, Result, Warning, WeightView};
use ndarray::{Array2, ArrayView2};
use std::sync::Arc;

/// Where a layer's pre-step ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreStepRoute {
    /// faer on the CPU ([`crate::hessian::pre_step_cpu`]): the CPU backend, or a GPU backend
    /// on a machine where cuSOLVER could not be loaded.
    Cpu,
    /// cuSOLVER on the device ([`crate::hessian::GpuPreStepper`]).
    Gpu,
    /// No pre-step: the layer saw no calibration tokens and uses `U = I`.
    NoTokens,
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

/// A quantized layer: grid, codes and dequantized weight, act-order, flags.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedLayer {
    /// qmeta4 records of the (dead-column-zeroed) weight.
    pub grid: QuantGrid,
    /// Codes, dequantized weight and per-row GPTQ loss, original column order.
    pub out: SolveOutput,
    /// Act-order column order used by the solver, if any.
    pub perm: Option<Vec<usize>>,
    /// What the pre-step did.
    pub flags: QuantizeFlags,
    /// Everything legal but surprising about this result, from the pre-step (asymmetric `H`,
    /// dead inputs, retries, identity fallback, no tokens) and the solve (flushed groups).
    pub warnings: Vec<Warning>,
}

/// A pre-step result ready to quantize any number of weights with the same input columns
/// (one Cholesky and inversion, then one solve per weight). On a GPU backend the factor is
/// also kept on the device.
pub struct PreparedFactor {
    pre: PreStep,
    route: PreStepRoute,
    device: Option<(Arc<GpuDevice>, DeviceFactor)>,
}

impl std::fmt::Debug for PreparedFactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedFactor")
            .field("cols", &self.cols())
            .field("route", &self.route)
            .field("on_device", &self.device.is_some())
            .finish()
    }
}

impl PreparedFactor {
    /// Wraps a pre-step result (e.g. from [`crate::hessian::pre_step_cpu`], or built by the
    /// caller); on a GPU backend the factor is uploaded once here. The result is checked like
    /// solver input: `U` square, finite, with a positive diagonal; `perm` a permutation;
    /// every dead column in range; the damping finite.
    pub fn new(pre: PreStep, route: PreStepRoute, backend: &Backend) -> Result<Self> {
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
        let device = match backend {
            Backend::Cpu => None,
            Backend::Gpu(dev) => {
                Some((dev.clone(), DeviceFactor::upload(dev, pre.hinv_factor.view(), pre.perm.as_deref())?))
            }
        };
        Ok(PreparedFactor { pre, route, device })
    }

    /// `U = I`, no act-order, no damping: the factor of a layer that saw no tokens
    /// (round-to-nearest, flagged [`QuantizeFlags::no_tokens`]).
    pub fn no_tokens(cols: usize, backend: &Backend) -> Result<Self> {
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
        Self::new(pre, PreStepRoute::NoTokens, backend)
    }

    /// The pre-step result (`U`, act-order, dead inputs, retries).
    pub fn pre_step(&self) -> &PreStep {
        &self.pre
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.pre.hinv_factor.nrows()
    }

    /// Where the pre-step ran.
    pub fn route(&self) -> PreStepRoute {
        self.route
    }

    /// The flags every layer quantized with this factor reports.
    pub fn flags(&self) -> QuantizeFlags {
        QuantizeFlags {
            dead_columns: self.pre.dead_columns.clone(),
            retries: self.pre.retries,
            fallback_identity: self.pre.fallback_identity,
            no_tokens: self.route == PreStepRoute::NoTokens,
            damping_used: self.pre.damping_used,
            route: self.route,
        }
    }
}

/// Where a Hessian lives.
enum HessianState {
    /// The CPU reference accumulator.
    Cpu(HessianAccumulator),
    /// A Hessian given on the host (not accumulated here), with its token count.
    CpuGiven { h: Array2<f32>, tokens: u64 },
    /// On the device.
    Gpu(GpuHessian),
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
            Backend::Gpu(dev) => HessianState::Gpu(GpuHessian::new(dev, cols)?),
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
            Backend::Gpu(dev) => HessianState::Gpu(GpuHessian::from_host(dev, h, tokens)?),
        };
        let asymmetry = match backend {
            Backend::Gpu(_) => crate::hessian::asymmetry_warning(h),
            Backend::Cpu => None,
        };
        Ok(SharedHessian { state, backend: backend.clone(), asymmetry })
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
                let total_tokens = crate::hessian::add_tokens(*tokens, m)?;
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

    /// The pre-step (docs/design.md §5) on this Hessian's backend: on the GPU through cuSOLVER when
    /// it loads, else on the CPU (the result's [`PreparedFactor::route`] says which). A
    /// Hessian without tokens gives `U = I` ([`PreStepRoute::NoTokens`]).
    pub fn pre_step(&self, cfg: &PreStepConfig) -> Result<PreparedFactor> {
        let mut stepper = StepperSlot::default();
        self.pre_step_with(cfg, &mut stepper)
    }

    pub(crate) fn pre_step_with(&self, cfg: &PreStepConfig, stepper: &mut StepperSlot) -> Result<PreparedFactor> {
        // Settings are checked even where they end up unused (no tokens): a bad setting is a
        // bug in the caller either way.
        cfg.validate()?;
        if self.tokens() == 0 {
            return PreparedFactor::no_tokens(self.cols(), &self.backend);
        }
        match &self.state {
            HessianState::Cpu(a) => prepare(&self.backend, HSource::Host(a.h().view()), cfg, stepper),
            HessianState::CpuGiven { h, .. } => prepare(&self.backend, HSource::Host(h.view()), cfg, stepper),
            HessianState::Gpu(g) => {
                let mut f = prepare(&self.backend, HSource::Device(g), cfg, stepper)?;
                // The CPU fallback saw the downloaded H itself; the GPU pre-step did not.
                if f.route == PreStepRoute::Gpu {
                    f.pre.warnings.splice(0..0, self.asymmetry.iter().cloned());
                }
                Ok(f)
            }
        }
    }
}

/// A Hessian to run the pre-step on.
pub(crate) enum HSource<'a> {
    Host(ArrayView2<'a, f32>),
    Device(&'a GpuHessian),
}

/// A lazily created [`GpuPreStepper`], or the reason there is none (cuSOLVER missing), so a
/// batch of experts loads cuSOLVER once and falls back to the CPU once.
#[derive(Default)]
pub(crate) struct StepperSlot {
    stepper: Option<GpuPreStepper>,
    unavailable: bool,
}

impl StepperSlot {
    fn get(&mut self, dev: &GpuDevice) -> Result<Option<&mut GpuPreStepper>> {
        if self.stepper.is_none() && !self.unavailable {
            match GpuPreStepper::new(dev) {
                Ok(s) => self.stepper = Some(s),
                Err(ForgeError::MissingLibrary { .. }) => self.unavailable = true,
                Err(e) => return Err(e),
            }
        }
        Ok(self.stepper.as_mut())
    }
}

/// The pre-step of `h` on `backend` (GPU through cuSOLVER when available), as a factor ready
/// for the solver.
pub(crate) fn prepare(
    backend: &Backend,
    h: HSource<'_>,
    cfg: &PreStepConfig,
    slot: &mut StepperSlot,
) -> Result<PreparedFactor> {
    match backend {
        Backend::Cpu => {
            let pre = match h {
                HSource::Host(h) => pre_step_cpu(h, None, cfg)?,
                HSource::Device(_) => return Err(ForgeError::Internal("a device Hessian without a device".into())),
            };
            PreparedFactor::new(pre, PreStepRoute::Cpu, backend)
        }
        Backend::Gpu(dev) => {
            let (pre, route) = match slot.get(dev)? {
                Some(stepper) => {
                    let pre = match h {
                        HSource::Host(h) => {
                            let mut pre = stepper.run_host(dev, h, cfg)?;
                            // The device symmetrises without looking: check on the host copy.
                            pre.warnings.splice(0..0, crate::hessian::asymmetry_warning(h));
                            pre
                        }
                        HSource::Device(g) => stepper.run(dev, g.h(), g.cols(), cfg)?,
                    };
                    (pre, PreStepRoute::Gpu)
                }
                None => {
                    let pre = match h {
                        HSource::Host(h) => pre_step_cpu(h, None, cfg)?,
                        HSource::Device(g) => pre_step_cpu(g.to_host(dev)?.view(), None, cfg)?,
                    };
                    (pre, PreStepRoute::Cpu)
                }
            };
            PreparedFactor::new(pre, route, backend)
        }
    }
}

/// Quantizes `weight` with a prepared factor of its Hessian: dead input columns zeroed, grid
/// built from the zeroed weight, GPTQ solve with `U` and the act-order, all on the
/// quantizer's backend. Several weights that read the same inputs share one factor.
pub fn quantize_with(quantizer: &Quantizer, factor: &PreparedFactor, weight: WeightView<'_>) -> Result<QuantizedLayer> {
    quantize_prepared(quantizer, factor, weight, &mut WorkspaceCache::default())
}

pub(crate) fn quantize_prepared(
    quantizer: &Quantizer,
    factor: &PreparedFactor,
    weight: WeightView<'_>,
    cache: &mut WorkspaceCache,
) -> Result<QuantizedLayer> {
    let (rows, cols) = weight.dim();
    quantizer.config.validate(rows, cols)?;
    if cols != factor.cols() {
        return Err(ForgeError::Shape(format!("weight has {cols} columns, the factor is {0}×{0}", factor.cols())));
    }
    // An f32 weight without dead inputs is used as it is (a copy costs more than the solve
    // on the GPU); NaN/inf is then caught by the grid builder, with the same typed error.
    let owned;
    let w = match weight {
        WeightView::F32(v) if factor.pre.dead_columns.is_empty() => v.reborrow(),
        _ => {
            let mut w = widen(weight)?;
            for &j in &factor.pre.dead_columns {
                w.column_mut(j).fill(0.0);
            }
            owned = w;
            owned.view()
        }
    };
    let perm = factor.pre.perm.as_deref();
    let (grid, out) = match &quantizer.backend {
        Backend::Cpu => {
            cpu::grid_and_solve(&quantizer.config, WeightView::F32(w), factor.pre.hinv_factor.view(), perm)?
        }
        Backend::Gpu(dev) => {
            let (grid, mut out) = solve_on_device(dev, &quantizer.config, factor, w, cache)?;
            // solve_cpu reports these itself; the device solve leaves them to the host.
            out.warnings.extend(flushed_groups(w, out.dequant.view(), grid.group_size)?);
            (grid, out)
        }
    };
    let mut warnings = factor.pre.warnings.clone();
    warnings.extend(out.warnings.iter().cloned());
    Ok(QuantizedLayer { grid, out, perm: factor.pre.perm.clone(), flags: factor.flags(), warnings })
}

/// Grid and solve on the device with the factor already there (uploaded now if it was
/// prepared for another backend), through the one orchestration path.
fn solve_on_device(
    dev: &Arc<GpuDevice>,
    config: &GridConfig,
    factor: &PreparedFactor,
    w: ArrayView2<'_, f32>,
    cache: &mut WorkspaceCache,
) -> Result<(QuantGrid, SolveOutput)> {
    let temp;
    let dfactor = match &factor.device {
        Some((d, f)) if Arc::ptr_eq(d, dev) => f,
        _ => {
            temp = DeviceFactor::upload(dev, factor.pre.hinv_factor.view(), factor.pre.perm.as_deref())?;
            &temp
        }
    };
    cuda::grid_and_solve(dev, config, w, dfactor, cache)
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
