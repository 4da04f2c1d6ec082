//! The GPU forward of one decoder layer (issue 14): the CPU reference ([`DecoderLayer`]) on
//! the device, reporting every Linear group's inputs to per-group device Hessians
//! ([`GpuHessianSink`]).
//!
//! Data path per chunk of whole sequences (at most [`ForwardWorkspace::chunk_tokens`] tokens,
//! so the workspace is bounded whatever the calibration size): the residual stream stays in
//! f32; every Linear input is stored in the [`ForwardPrecision`]'s type (bf16 by default,
//! the checkpoints' own) and multiplied by cuBLAS with f32 accumulation; q/k/v and gate/up
//! are one GEMM each (their weights stacked); the o and down projections accumulate into the
//! residual (`beta = 1`). Attention runs per sequence: scores `Q·Kᵀ` as strided batched f32
//! GEMMs (one batch per query head of a key/value group), a causal softmax kernel, then `P·V`.
//! MoE routing is computed on the host from f32 router logits with the CPU reference's
//! [`route`] (the routing is discrete: it must be exactly the reference's), then per expert:
//! gather its tokens, gate/up GEMM, SwiGLU, down GEMM, scatter-add with the routing weights,
//! in expert order.
//!
//! Attention memory: the scores of one sequence, `heads · t² · 4` bytes: 2 GiB for 32 heads
//! at seq-len 4096 (512 MiB at 2048).

use super::config::{GqaConfig, MoeConfig};
use super::hooks::HessianSink;
use super::layer::{route, DecoderLayer, Ffn, Linear, SwiGlu};
use super::names::{InputGroup, LinearRole};
use super::rope::Rope;
use crate::calib::ActivationDtype;
use crate::device::cublas::{GemmType, RowGemm, RowMatrix};
use crate::device::{grid_for, DeviceBuf, DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::hessian::{GpuHessian, HessianAccumulator};
use crate::quantize::engine::{parallel_copy, PinnedBuf};
use crate::{ForgeError, Result};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, LaunchConfig};
use forge_kernel_abi::calib::{
    AddArgs, BiasArgs, CastArgs, GatherArgs, RmsNormArgs, RopeArgs, ScatterAddArgs, SoftmaxArgs, SwigluArgs, ACT_BF16,
    ACT_F32, FORWARD_THREADS,
};
use forge_kernel_abi::{
    AddBiasRows, AddF32, CastF32, CausalSoftmax, DevPtr, DevPtrMut, GatherRows, RmsNormRows, RopeRows, ScatterAddRows,
    Swiglu,
};
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// The type Linear inputs and weights are stored and multiplied in (f32 accumulation either
/// way; the residual stream, norms, attention and routing are f32 in both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardPrecision {
    /// bf16 tensor-core GEMMs (the checkpoints' type; Hessians from bf16 inputs).
    Bf16,
    /// Full f32 GEMMs: the parity mode, as close to the CPU reference as summation order allows.
    F32,
}

impl ForwardPrecision {
    fn gemm(self) -> GemmType {
        match self {
            ForwardPrecision::Bf16 => GemmType::BF16,
            ForwardPrecision::F32 => GemmType::F32,
        }
    }

    fn act(self) -> u32 {
        match self {
            ForwardPrecision::Bf16 => ACT_BF16,
            ForwardPrecision::F32 => ACT_F32,
        }
    }

    /// The Hessian input type of the Linear inputs.
    pub fn activation_dtype(self) -> ActivationDtype {
        match self {
            ForwardPrecision::Bf16 => ActivationDtype::BF16,
            ForwardPrecision::F32 => ActivationDtype::F32,
        }
    }

    /// Bytes per stored element.
    pub fn size(self) -> usize {
        self.gemm().size()
    }
}

/// Calibration sequences on the device: f32 `(tokens, hidden)` rows of every sequence, one
/// after another (at the front of a buffer that may hold more: a streamed batch's).
pub struct DeviceSequences {
    data: CudaSlice<f32>,
    lens: Vec<usize>,
    hidden: usize,
}

impl DeviceSequences {
    /// Uploads `(tokens, hidden)` arrays (all of one width, none empty), one copy per
    /// sequence straight from its array.
    pub fn upload(dev: &GpuDevice, seqs: &[Array2<f32>]) -> Result<Self> {
        let hidden = check_sequences(seqs)?;
        let total: usize = seqs.iter().map(|s| s.len()).sum();
        let mut data = dev.alloc::<f32>(total, "hidden states")?;
        let mut at = 0;
        for s in seqs {
            let rows = s.as_standard_layout();
            let src = rows.as_slice().ok_or_else(|| ForgeError::Internal("standard layout is contiguous".into()))?;
            let mut dst = data.slice_mut(at..at + src.len());
            dev.stream().memcpy_htod(src, &mut dst).map_err(ForgeError::driver("uploading hidden states"))?;
            at += src.len();
        }
        Ok(DeviceSequences { data, lens: seqs.iter().map(|s| s.nrows()).collect(), hidden })
    }

    /// Room for `values` f32 of width `hidden`, no sequences yet (a streamed batch's buffer).
    pub fn with_capacity(dev: &GpuDevice, values: usize, hidden: usize) -> Result<Self> {
        Ok(DeviceSequences { data: dev.alloc::<f32>(values, "hidden states")?, lens: Vec::new(), hidden })
    }

    /// Same shapes, zero values.
    pub fn zeros_like(&self, dev: &GpuDevice) -> Result<Self> {
        Ok(DeviceSequences {
            data: dev.alloc::<f32>(self.values(), "hidden states")?,
            lens: self.lens.clone(),
            hidden: self.hidden,
        })
    }

    /// Values held (`Σ tokens · hidden`).
    pub fn values(&self) -> usize {
        self.lens.iter().sum::<usize>() * self.hidden
    }

    /// Replaces the contents with sequences `range` of `host` (synchronous: returns when the
    /// copy is done).
    pub(crate) fn load(&mut self, dev: &GpuDevice, host: &HostSequences, range: std::ops::Range<usize>) -> Result<()> {
        let (start, end) = host.span(range.clone())?;
        let src = host.values()?.get(start..end).ok_or_else(|| ForgeError::Internal("host sequence range".into()))?;
        if src.len() > self.data.len() || host.hidden != self.hidden {
            return Err(ForgeError::Internal("a streamed batch larger than its device buffer".into()));
        }
        let mut dst = self.data.slice_mut(0..src.len());
        dev.stream().memcpy_htod(src, &mut dst).map_err(ForgeError::driver("uploading hidden states"))?;
        dev.synchronize()?;
        self.lens = host.lens.get(range).map(<[usize]>::to_vec).unwrap_or_default();
        Ok(())
    }

    /// Copies the contents into sequences `range` of `host` (same lengths), checked finite.
    pub(crate) fn store(&self, dev: &GpuDevice, host: &mut HostSequences, range: std::ops::Range<usize>) -> Result<()> {
        let (start, end) = host.span(range.clone())?;
        if host.lens.get(range) != Some(&self.lens[..]) || host.hidden != self.hidden {
            return Err(ForgeError::Internal("a streamed batch stored over other sequences".into()));
        }
        let dst = host.data.get(dev, host.len)?.get_mut(start..end);
        let dst = dst.ok_or_else(|| ForgeError::Internal("host sequence range".into()))?;
        dev.stream()
            .memcpy_dtoh(&self.data.slice(0..dst.len()), dst)
            .map_err(ForgeError::driver("downloading hidden states"))?;
        dev.synchronize()?;
        check_finite_values(dst, self.hidden, start)
    }

    /// Downloads the sequences into one array each (through [`DeviceSequences::download_flat`]
    /// with its own staging), checking every value is finite.
    pub fn download(&self, dev: &GpuDevice) -> Result<Vec<Array2<f32>>> {
        let mut staging = HostStaging::default();
        let flat = self.download_flat(dev, &mut staging)?;
        split_sequences(flat, &self.lens, self.hidden)
    }

    /// Every value, sequence after sequence, through page-locked `staging` (grown as needed;
    /// a device-to-pinned copy runs at the link's speed), checked finite.
    pub fn download_flat<'a>(&self, dev: &GpuDevice, staging: &'a mut HostStaging) -> Result<&'a [f32]> {
        let n = self.values();
        let host = staging.0.get(dev, n)?;
        dev.stream()
            .memcpy_dtoh(&self.data.slice(0..n), host)
            .map_err(ForgeError::driver("downloading hidden states"))?;
        dev.synchronize()?;
        check_finite_values(host, self.hidden, 0)?;
        Ok(host)
    }

    /// Tokens of each sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Features per token.
    pub fn hidden(&self) -> usize {
        self.hidden
    }
}

/// The common width of non-empty sequences.
fn check_sequences(seqs: &[Array2<f32>]) -> Result<usize> {
    let hidden = seqs.first().map_or(0, |s| s.ncols());
    if hidden == 0 || seqs.iter().any(|s| s.ncols() != hidden || s.nrows() == 0) {
        return Err(ForgeError::Shape("sequences must be non-empty and share one non-zero width".into()));
    }
    Ok(hidden)
}

/// A typed error at the first non-finite value (`first_value` = the index of `values[0]`).
fn check_finite_values(values: &[f32], hidden: usize, first_value: usize) -> Result<()> {
    match values.par_iter().position_first(|v| !v.is_finite()) {
        Some(i) => Err(ForgeError::NonFinite {
            tensor: "layer output",
            row: (first_value + i) / hidden.max(1),
            col: (first_value + i) % hidden.max(1),
            value: values[i],
        }),
        None => Ok(()),
    }
}

/// Flat values → one `(tokens, hidden)` array per sequence.
fn split_sequences(flat: &[f32], lens: &[usize], hidden: usize) -> Result<Vec<Array2<f32>>> {
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &t in lens {
        let v = flat.get(at..at + t * hidden).ok_or_else(|| ForgeError::Internal("short hidden states".into()))?;
        out.push(Array2::from_shape_vec((t, hidden), v.to_vec()).map_err(|e| ForgeError::Shape(e.to_string()))?);
        at += t * hidden;
    }
    Ok(out)
}

/// Calibration sequences in page-locked host memory, for calibration sets larger than the
/// device holds: streamed through it in batches ([`HiddenStates::Host`]).
pub struct HostSequences {
    data: PinnedBuf<f32>,
    len: usize,
    lens: Vec<usize>,
    hidden: usize,
}

impl HostSequences {
    /// Copies `(tokens, hidden)` arrays (all of one width, none empty) into page-locked memory.
    pub fn from_arrays(dev: &GpuDevice, seqs: &[Array2<f32>]) -> Result<Self> {
        let hidden = check_sequences(seqs)?;
        let len: usize = seqs.iter().map(|s| s.len()).sum();
        crate::budget::Request::new().bytes(4, &[len]).check("the hidden states in page-locked memory")?;
        let mut data = PinnedBuf::new(false);
        let dst = data.get(dev, len)?;
        let mut at = 0;
        for s in seqs {
            let rows = s.as_standard_layout();
            let src = rows.as_slice().ok_or_else(|| ForgeError::Internal("standard layout is contiguous".into()))?;
            dst[at..at + src.len()].copy_from_slice(src);
            at += src.len();
        }
        Ok(HostSequences { data, len, lens: seqs.iter().map(|s| s.nrows()).collect(), hidden })
    }

    /// Every value, sequence after sequence.
    pub fn values(&self) -> Result<&[f32]> {
        self.data.slice(self.len)
    }

    /// Same shapes, contents undefined, in `reuse`'s memory when it is large enough.
    pub(crate) fn like(&self, dev: &GpuDevice, reuse: Option<PinnedBuf<f32>>) -> Result<Self> {
        let mut data = reuse.unwrap_or_else(|| PinnedBuf::new(false));
        data.get(dev, self.len)?;
        Ok(HostSequences { data, len: self.len, lens: self.lens.clone(), hidden: self.hidden })
    }

    /// Tokens of each sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Features per token.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// The value range of sequences `range`.
    fn span(&self, range: std::ops::Range<usize>) -> Result<(usize, usize)> {
        let inside = self.lens.get(range.clone()).ok_or_else(|| ForgeError::Internal("sequence range".into()))?;
        let start = self.lens[..range.start].iter().sum::<usize>() * self.hidden;
        Ok((start, start + inside.iter().sum::<usize>() * self.hidden))
    }
}

/// Where the calibration keeps the hidden states between layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HiddenPlacement {
    /// On the device when they (inputs and outputs, plus the kept feed-forward inputs of an
    /// MoE layer) take at most half its free memory, else in page-locked host memory.
    #[default]
    Auto,
    /// On the device.
    Device,
    /// In page-locked host memory, streamed through the device in batches of whole forward
    /// chunks of at most `max_batch_tokens` tokens (0: a quarter of the free device memory).
    Host {
        /// Tokens per streamed batch (0: sized from the free device memory).
        max_batch_tokens: usize,
    },
}

/// A layer's calibration inputs: on the device, or in page-locked host memory and streamed.
pub enum HiddenStates {
    /// Kept on the device from layer to layer.
    Device(DeviceSequences),
    /// In page-locked host memory; `max_batch_tokens` as [`HiddenPlacement::Host`] says.
    Host(HostSequences, usize),
}

impl HiddenStates {
    /// `seqs` placed as `placement` says; `ffn_bytes_per_value`: the feed-forward inputs an
    /// MoE layer keeps per hidden value (0 for dense models).
    pub fn place(
        dev: &GpuDevice,
        seqs: &[Array2<f32>],
        placement: HiddenPlacement,
        ffn_bytes_per_value: usize,
    ) -> Result<Self> {
        let max_batch_tokens = match placement {
            HiddenPlacement::Device => return Ok(HiddenStates::Device(DeviceSequences::upload(dev, seqs)?)),
            HiddenPlacement::Host { max_batch_tokens } => max_batch_tokens,
            HiddenPlacement::Auto => {
                let values: usize = seqs.iter().map(|s| s.len()).sum();
                let need = values.saturating_mul(8 + ffn_bytes_per_value);
                let (free, _) =
                    dev.context().mem_get_info().map_err(ForgeError::driver("reading free device memory"))?;
                if need <= free / 2 {
                    return Ok(HiddenStates::Device(DeviceSequences::upload(dev, seqs)?));
                }
                0
            }
        };
        Ok(HiddenStates::Host(HostSequences::from_arrays(dev, seqs)?, max_batch_tokens))
    }

    /// Tokens of each sequence.
    pub fn lens(&self) -> &[usize] {
        match self {
            HiddenStates::Device(d) => d.lens(),
            HiddenStates::Host(h, _) => h.lens(),
        }
    }

    /// Every value on the host, sequence after sequence (from the device through `staging`),
    /// checked finite.
    pub fn host_values<'a>(&'a self, dev: &GpuDevice, staging: &'a mut HostStaging) -> Result<&'a [f32]> {
        match self {
            HiddenStates::Device(d) => d.download_flat(dev, staging),
            HiddenStates::Host(h, _) => h.values(),
        }
    }

    /// One array per sequence.
    pub fn download(&self, dev: &GpuDevice) -> Result<Vec<Array2<f32>>> {
        match self {
            HiddenStates::Device(d) => d.download(dev),
            HiddenStates::Host(h, _) => split_sequences(h.values()?, &h.lens, h.hidden),
        }
    }
}

/// Page-locked host memory for [`DeviceSequences::download_flat`], grown to the largest
/// download and reused.
pub struct HostStaging(PinnedBuf<f32>);

impl Default for HostStaging {
    fn default() -> Self {
        HostStaging(PinnedBuf::new(false))
    }
}

/// One device Hessian per Linear input group, fed by [`GpuLayer::forward`].
#[derive(Default)]
pub struct GpuHessianSink {
    hessians: BTreeMap<InputGroup, GpuHessian>,
}

impl GpuHessianSink {
    /// No groups yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn record(&mut self, dev: &GpuDevice, group: InputGroup, x: Act<'_>) -> Result<()> {
        if x.tokens == 0 {
            return Ok(());
        }
        let h = match self.hessians.entry(group) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(GpuHessian::new(dev, x.cols)?),
        };
        let view = x.buf.slice(x.offset..x.offset + x.tokens * x.cols * x.dtype.size());
        h.update_device_view(dev, &view, x.dtype, x.tokens, x.cols)
    }

    /// Whether `group` has a Hessian (it saw tokens, or one was put in).
    pub fn has(&self, group: InputGroup) -> bool {
        self.hessians.contains_key(&group)
    }

    /// Tokens `group` saw (0: none, e.g. an expert no token was routed to).
    pub fn tokens(&self, group: InputGroup) -> u64 {
        self.hessians.get(&group).map_or(0, GpuHessian::tokens)
    }

    /// Takes `group`'s Hessian out.
    pub fn remove(&mut self, group: InputGroup) -> Option<GpuHessian> {
        self.hessians.remove(&group)
    }

    /// Puts `h` in place of `group`'s Hessian.
    pub fn replace(&mut self, group: InputGroup, h: GpuHessian) {
        self.hessians.insert(group, h);
    }

    /// Downloads every Hessian into a host sink (through page-locked memory of its own).
    pub fn to_host(&self, dev: &GpuDevice) -> Result<HessianSink> {
        self.start_download(dev, &mut HessianStaging::default())?.finish()
    }

    /// Enqueues every Hessian's download into `staging` on its copy stream, after the work
    /// queued so far on the compute stream: the copies run beside whatever the compute stream
    /// does next. Before changing or freeing a Hessian, order the compute stream after its
    /// copy ([`HessianDownload::guard`]).
    pub fn start_download<'s>(&self, dev: &GpuDevice, staging: &'s mut HessianStaging) -> Result<HessianDownload<'s>> {
        let total = self.hessians.values().try_fold(0usize, |a, h| a.checked_add(h.cols() * h.cols()));
        let total = total.ok_or_else(|| ForgeError::Shape("Hessian sizes overflow".into()))?;
        crate::budget::Request::new().bytes(4, &[total]).check("the Hessians' page-locked staging")?;
        let copy = match &staging.copy {
            Some(c) => c.clone(),
            None => {
                let c = dev.context().new_stream().map_err(ForgeError::driver("creating the Hessian copy stream"))?;
                staging.copy = Some(c.clone());
                c
            }
        };
        let ready = dev.stream().record_event(None).map_err(ForgeError::driver("marking the Hessians ready"))?;
        copy.wait(&ready).map_err(ForgeError::driver("ordering the Hessian download"))?;
        let host = staging.host.get(dev, total)?;
        let mut groups = Vec::with_capacity(self.hessians.len());
        let mut at = 0;
        for (&g, h) in &self.hessians {
            let n = h.cols();
            let mine = host.get_mut(at..at + n * n).ok_or_else(|| ForgeError::Internal("Hessian staging".into()))?;
            // SAFETY: the device Hessian holds n² values and is not changed or freed before the
            // compute stream waits for this copy (`guard`/`guard_all`, or the download's drop);
            // `mine` stays borrowed by the download, which reads it only after synchronizing.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(mine, h.h().dev_ptr().addr(), copy.cu_stream()) }
                .map_err(ForgeError::driver("downloading a Hessian"))?;
            let done = copy.record_event(None).map_err(ForgeError::driver("marking a Hessian downloaded"))?;
            groups.push((g, n, h.tokens(), done));
            at += n * n;
        }
        Ok(HessianDownload { compute: dev.stream().clone(), copy, host, groups })
    }

    /// Takes the Hessians out.
    pub fn into_map(self) -> BTreeMap<InputGroup, GpuHessian> {
        self.hessians
    }
}

/// What a run of sequential layers on a GPU reuses from layer to layer: the page-locked
/// staging of weight uploads and Hessian downloads, and the forward's workspace.
#[derive(Default)]
pub struct LayerBuffers {
    pub(crate) weights: WeightStaging,
    pub(crate) hessians: HessianStaging,
    pub(crate) workspace: ForwardWorkspace,
    /// Streamed hidden states ([`HiddenStates::Host`]): the next layer's inputs are written
    /// here and swapped in, and an MoE layer's feed-forward inputs wait here.
    pub(crate) host_spare: Option<PinnedBuf<f32>>,
    pub(crate) ffn_host: Option<PinnedBuf<u8>>,
}

/// The device side of a streamed pass over [`HiddenStates::Host`]: batches of whole forward
/// chunks and the buffers each moves through (synchronous copies: this is the fallback for
/// calibration sets the device cannot hold).
pub(crate) struct StreamedBatches {
    pub(crate) plan: Vec<std::ops::Range<usize>>,
    pub(crate) x: DeviceSequences,
    pub(crate) out: DeviceSequences,
}

impl StreamedBatches {
    /// Batches of at most `max_tokens` tokens (0: a quarter of the free device memory at
    /// `bytes_per_token`).
    pub(crate) fn new(
        dev: &GpuDevice,
        host: &HostSequences,
        chunk_tokens: usize,
        max_tokens: usize,
        bytes_per_token: usize,
    ) -> Result<Self> {
        let max_tokens = match max_tokens {
            0 => {
                let (free, _) =
                    dev.context().mem_get_info().map_err(ForgeError::driver("reading free device memory"))?;
                free / 4 / bytes_per_token.max(1)
            }
            n => n,
        };
        let plan = batch_plan(&host.lens, chunk_tokens, max_tokens);
        let widest = plan.iter().map(|r| host.lens[r.clone()].iter().sum::<usize>()).max().unwrap_or(0);
        Ok(StreamedBatches {
            plan,
            x: DeviceSequences::with_capacity(dev, widest * host.hidden, host.hidden)?,
            out: DeviceSequences::with_capacity(dev, widest * host.hidden, host.hidden)?,
        })
    }
}

impl HostSequences {
    /// Gives the memory back for reuse.
    pub(crate) fn into_buffer(self) -> PinnedBuf<f32> {
        self.data
    }

    /// The tokens before sequence `first`.
    pub(crate) fn tokens_before(&self, first: usize) -> usize {
        self.lens[..first.min(self.lens.len())].iter().sum()
    }
}

/// `bytes` bytes of a device buffer → `host` at byte `at` (synchronous).
pub(crate) fn store_bytes(
    dev: &GpuDevice,
    src: &DeviceBuf<u8>,
    host: &mut PinnedBuf<u8>,
    at: usize,
    bytes: usize,
    total: usize,
) -> Result<()> {
    let dst =
        host.get(dev, total)?.get_mut(at..at + bytes).ok_or_else(|| ForgeError::Internal("ffn staging".into()))?;
    dev.stream()
        .memcpy_dtoh(&src.get(bytes)?.slice(0..bytes), dst)
        .map_err(ForgeError::driver("downloading feed-forward inputs"))?;
    dev.synchronize()
}

/// `bytes` bytes of `host` from byte `at` → the front of a device buffer (synchronous).
pub(crate) fn load_bytes(
    dev: &GpuDevice,
    host: &PinnedBuf<u8>,
    at: usize,
    bytes: usize,
    dst: &mut DeviceBuf<u8>,
) -> Result<()> {
    let src = host.slice(at + bytes)?.get(at..at + bytes).ok_or_else(|| ForgeError::Internal("ffn staging".into()))?;
    let d = dst.ensure(dev, bytes, "feed-forward inputs")?;
    dev.stream()
        .memcpy_htod(src, &mut d.slice_mut(0..bytes))
        .map_err(ForgeError::driver("uploading feed-forward inputs"))?;
    dev.synchronize()
}

/// Page-locked host memory a layer's Hessians download into (grown to the largest layer and
/// reused) and the stream the copies ride on, beside the compute stream.
pub struct HessianStaging {
    host: PinnedBuf<f32>,
    copy: Option<std::sync::Arc<CudaStream>>,
}

impl Default for HessianStaging {
    fn default() -> Self {
        HessianStaging { host: PinnedBuf::new(false), copy: None }
    }
}

/// Hessian copies in flight ([`GpuHessianSink::start_download`]).
pub struct HessianDownload<'s> {
    compute: std::sync::Arc<CudaStream>,
    copy: std::sync::Arc<CudaStream>,
    host: &'s mut [f32],
    /// Group, columns, tokens, the event after its copy.
    groups: Vec<(InputGroup, usize, u64, CudaEvent)>,
}

impl HessianDownload<'_> {
    /// Orders the compute stream after `group`'s copy: call before anything changes or frees
    /// its device Hessian (the pre-step works in place).
    pub fn guard(&self, group: InputGroup) -> Result<()> {
        match self.groups.iter().find(|g| g.0 == group) {
            Some(g) => self.compute.wait(&g.3).map_err(ForgeError::driver("ordering a pre-step after its download")),
            None => Ok(()),
        }
    }

    /// Orders the compute stream after every copy (before the device Hessians are dropped).
    pub fn guard_all(&self) -> Result<()> {
        self.compute.join(&self.copy).map_err(ForgeError::driver("ordering after the Hessian downloads"))
    }

    /// Waits for the copies and builds the host sink.
    pub fn finish(self) -> Result<HessianSink> {
        self.copy.synchronize().map_err(ForgeError::driver("waiting for the Hessian downloads"))?;
        let mut sink = HessianSink::new();
        let mut at = 0;
        for (g, n, tokens, _) in &self.groups {
            let (n, len) = (*n, n * n);
            let src = self.host.get(at..at + len).ok_or_else(|| ForgeError::Internal("Hessian staging".into()))?;
            let mut a = Array2::<f32>::zeros((n, n));
            let dst = a.as_slice_mut().ok_or_else(|| ForgeError::Internal("fresh arrays are contiguous".into()))?;
            parallel_copy(dst, src);
            sink.replace(*g, HessianAccumulator::from_parts(a, *tokens)?);
            at += len;
        }
        Ok(sink)
    }
}

impl Drop for HessianDownload<'_> {
    /// Copies still in flight (an error path) finish before the staging or the device
    /// Hessians can be reused or freed.
    fn drop(&mut self) {
        let _ = self.copy.synchronize();
    }
}

/// Linear inputs in a workspace buffer, as the Hessian sink reads them.
struct Act<'a> {
    buf: &'a CudaSlice<u8>,
    offset: usize,
    tokens: usize,
    cols: usize,
    dtype: ActivationDtype,
}

/// A SwiGLU on the device: gate and up stacked (`[2·inter, hidden]`), down `[hidden, inter]`.
struct GpuMlp {
    gate_up: CudaSlice<u8>,
    down: CudaSlice<u8>,
    inter: usize,
}

enum GpuFfn {
    Dense(GpuMlp),
    Moe { router: CudaSlice<f32>, experts: Vec<GpuMlp>, config: MoeConfig },
}

/// One decoder layer's weights on the device (see the module docs).
pub struct GpuLayer {
    index: usize,
    hidden: usize,
    precision: ForwardPrecision,
    gqa: GqaConfig,
    eps: f32,
    rope: Rope,
    sliding_window: Option<usize>,
    input_norm: CudaSlice<f32>,
    post_norm: CudaSlice<f32>,
    qkv: CudaSlice<u8>,
    qkv_bias: Option<CudaSlice<f32>>,
    o: CudaSlice<u8>,
    o_bias: Option<CudaSlice<f32>>,
    q_norm: Option<CudaSlice<f32>>,
    k_norm: Option<CudaSlice<f32>>,
    ffn: GpuFfn,
}

/// The device buffers of a forward pass, grown to the largest chunk seen and reused.
pub struct ForwardWorkspace {
    /// Tokens per chunk (whole sequences; a longer sequence runs alone).
    pub chunk_tokens: usize,
    act: DeviceBuf<u8>,
    qkv: DeviceBuf<u8>,
    attn: DeviceBuf<u8>,
    scores: DeviceBuf<u8>,
    gate_up: DeviceBuf<u8>,
    mid: DeviceBuf<u8>,
    normed32: DeviceBuf<u8>,
    logits: DeviceBuf<u8>,
    moe_out: DeviceBuf<u8>,
    gathered: DeviceBuf<u8>,
    expert_out: DeviceBuf<u8>,
    rope_tables: Option<(Rope, usize, CudaSlice<f32>, CudaSlice<f32>)>,
}

impl Default for ForwardWorkspace {
    fn default() -> Self {
        ForwardWorkspace::new(DEFAULT_CHUNK_TOKENS)
    }
}

/// Tokens per chunk when the caller does not choose ([`GpuLayer::chunk_tokens_for`] sizes it
/// per layer).
pub const DEFAULT_CHUNK_TOKENS: usize = 16_384;

impl ForwardWorkspace {
    /// A workspace running chunks of up to `chunk_tokens` tokens.
    pub fn new(chunk_tokens: usize) -> Self {
        ForwardWorkspace {
            chunk_tokens: chunk_tokens.max(1),
            act: DeviceBuf::default(),
            qkv: DeviceBuf::default(),
            attn: DeviceBuf::default(),
            scores: DeviceBuf::default(),
            gate_up: DeviceBuf::default(),
            mid: DeviceBuf::default(),
            normed32: DeviceBuf::default(),
            logits: DeviceBuf::default(),
            moe_out: DeviceBuf::default(),
            gathered: DeviceBuf::default(),
            expert_out: DeviceBuf::default(),
            rope_tables: None,
        }
    }
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| ForgeError::Shape(format!("{what} ({v}) exceeds the forward kernels' 32-bit range")))
}

/// Grown workspace buffer's address.
fn addr(buf: &mut DeviceBuf<u8>, dev: &GpuDevice, bytes: usize, what: &'static str) -> Result<u64> {
    Ok(buf.ensure(dev, bytes.max(16), what)?.dev_ptr_mut().addr())
}

/// Warp-per-row launch: 8 rows per block, grid-stride past 2²⁰ blocks.
fn rows_launch(rows: usize) -> LaunchConfig {
    let blocks = rows.div_ceil((FORWARD_THREADS / 32) as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (FORWARD_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Element-wise launch, grid-stride past 2²⁰ blocks.
fn items_launch(items: usize) -> LaunchConfig {
    let mut d = grid_for(items, FORWARD_THREADS);
    d.blocks = d.blocks.min(1 << 20);
    d.into()
}

/// `src` → the precision's little-endian bytes in `dst` (exactly `src.len() · size` bytes),
/// on all cores: a layer's weights are hundreds of millions of values.
fn convert_into(dst: &mut [u8], src: &[f32], precision: ForwardPrecision) {
    const CHUNK: usize = 1 << 16;
    let es = precision.size();
    dst.par_chunks_mut(CHUNK * es).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| match precision {
        ForwardPrecision::F32 => {
            for (d, v) in d.chunks_exact_mut(4).zip(s) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        ForwardPrecision::Bf16 => {
            for (d, v) in d.chunks_exact_mut(2).zip(s) {
                d.copy_from_slice(&forge_numerics::f32_to_bf16_bits(*v).to_le_bytes());
            }
        }
    });
}

/// Page-locked, write-combined host memory that weight uploads are converted into (grown to
/// the largest layer and reused): a pinned upload runs at the link's speed, a pageable one
/// is staged by the driver at a fraction of it.
pub struct WeightStaging(PinnedBuf<u8>);

impl Default for WeightStaging {
    fn default() -> Self {
        WeightStaging(PinnedBuf::new(true))
    }
}

/// Converts `parts` (one after another) into `staging` and enqueues their upload to device
/// address `dst` on the compute stream, in pieces: a piece's DMA runs while the next one is
/// converted.
///
/// # Safety
/// `dst` holds `Σ len · size` bytes; `staging` (at least as long) is not touched again until
/// the compute stream has passed these copies.
unsafe fn stage_upload(
    dev: &GpuDevice,
    staging: &mut [u8],
    parts: &[ArrayView2<'_, f32>],
    precision: ForwardPrecision,
    dst: u64,
) -> Result<()> {
    const PIECE_VALUES: usize = 4 << 20;
    let es = precision.size();
    let mut at = 0usize;
    for p in parts {
        let owned;
        let src = match p.as_slice() {
            Some(s) => s,
            None => {
                owned = p.as_standard_layout().to_owned();
                owned.as_slice().unwrap_or(&[])
            }
        };
        for piece in src.chunks(PIECE_VALUES) {
            let bytes = piece.len() * es;
            let d = staging
                .get_mut(at..at + bytes)
                .ok_or_else(|| ForgeError::Internal("weight staging smaller than the upload".into()))?;
            convert_into(d, piece, precision);
            // SAFETY (caller): `dst + at` lies in the destination; `d` outlives the copy.
            cudarc::driver::result::memcpy_htod_async(dst + at as u64, d, dev.stream().cu_stream())
                .map_err(ForgeError::driver("uploading layer weights"))?;
            at += bytes;
        }
    }
    Ok(())
}

fn upload_f32(dev: &GpuDevice, values: &[f32]) -> Result<CudaSlice<f32>> {
    dev.stream().clone_htod(values).map_err(ForgeError::driver("uploading layer weights"))
}

fn upload_vec(dev: &GpuDevice, v: &Array1<f32>) -> Result<CudaSlice<f32>> {
    upload_f32(dev, &v.to_vec())
}

/// Stacks the Linears' weights row-wise (`[Σ out, in]`) into a device buffer of the
/// precision's type, converted through `staging` (the front of it; the rest is returned).
fn stacked<'s>(
    dev: &GpuDevice,
    linears: &[&Linear],
    precision: ForwardPrecision,
    staging: &'s mut [u8],
) -> Result<(CudaSlice<u8>, &'s mut [u8])> {
    let views: Vec<ArrayView2<'_, f32>> = linears.iter().map(|l| l.weight.view()).collect();
    let bytes = views.iter().map(|v| v.len()).sum::<usize>() * precision.size();
    let mut buf = dev.alloc::<u8>(bytes, "layer weights")?;
    if bytes > staging.len() {
        return Err(ForgeError::Internal("weight staging smaller than the layer".into()));
    }
    let (mine, rest) = staging.split_at_mut(bytes);
    // SAFETY: `buf` holds exactly these bytes; the staging is not reused before the upload
    // synchronizes (GpuLayer::upload_staged).
    unsafe { stage_upload(dev, mine, &views, precision, buf.dev_ptr_mut().addr()) }?;
    Ok((buf, rest))
}

fn no_bias(l: &Linear, what: &str) -> Result<()> {
    if l.bias.is_some() {
        return Err(ForgeError::Config(format!(
            "the GPU forward has no {what} bias (none of the supported models has one)"
        )));
    }
    Ok(())
}

/// The stacked buffer holding `role`'s rows in an MLP, the rows before them, its input width.
fn mlp_slot(m: &mut GpuMlp, role: LinearRole, hidden: usize) -> Result<(&mut CudaSlice<u8>, usize, usize)> {
    let inter = m.inter;
    match role {
        LinearRole::Gate => Ok((&mut m.gate_up, 0, hidden)),
        LinearRole::Up => Ok((&mut m.gate_up, inter, hidden)),
        LinearRole::Down => Ok((&mut m.down, 0, inter)),
        r => Err(ForgeError::Internal(format!("{r:?} is not an MLP Linear"))),
    }
}

impl GpuMlp {
    fn upload<'s>(
        dev: &GpuDevice,
        mlp: &SwiGlu,
        precision: ForwardPrecision,
        staging: &'s mut [u8],
    ) -> Result<(Self, &'s mut [u8])> {
        for (l, what) in [(&mlp.gate, "gate"), (&mlp.up, "up"), (&mlp.down, "down")] {
            no_bias(l, what)?;
        }
        let (gate_up, staging) = stacked(dev, &[&mlp.gate, &mlp.up], precision, staging)?;
        let (down, staging) = stacked(dev, &[&mlp.down], precision, staging)?;
        Ok((GpuMlp { gate_up, down, inter: mlp.gate.weight.nrows() }, staging))
    }
}

/// Every Linear weight of `layer`.
fn linear_weights(layer: &DecoderLayer) -> Vec<&Array2<f32>> {
    let mut all = vec![&layer.q.weight, &layer.k.weight, &layer.v.weight, &layer.o.weight];
    let mlps: Vec<&SwiGlu> = match &layer.ffn {
        Ffn::Dense(m) => vec![m],
        Ffn::Moe { experts, .. } => experts.iter().collect(),
    };
    for m in mlps {
        all.extend([&m.gate.weight, &m.up.weight, &m.down.weight]);
    }
    all
}

impl GpuLayer {
    /// Uploads a loaded layer's weights (Linear weights in `precision`; norms, biases and the
    /// router in f32), converting through a page-locked buffer of its own.
    pub fn upload(dev: &GpuDevice, layer: &DecoderLayer, precision: ForwardPrecision) -> Result<Self> {
        Self::upload_staged(dev, layer, precision, &mut WeightStaging::default())
    }

    /// [`GpuLayer::upload`] converting through `staging` (reused from layer to layer; grown to
    /// the layer's Linear bytes). Returns when the uploads are done.
    pub fn upload_staged(
        dev: &GpuDevice,
        layer: &DecoderLayer,
        precision: ForwardPrecision,
        staging: &mut WeightStaging,
    ) -> Result<Self> {
        let gpu = Self::enqueue_upload(dev, layer, precision, staging);
        // The staging is free again only once its copies are done (on success or failure).
        dev.synchronize()?;
        gpu
    }

    fn enqueue_upload(
        dev: &GpuDevice,
        layer: &DecoderLayer,
        precision: ForwardPrecision,
        staging: &mut WeightStaging,
    ) -> Result<Self> {
        let values = linear_weights(layer).iter().try_fold(0usize, |a, w| a.checked_add(w.len()));
        let bytes = values
            .and_then(|v| v.checked_mul(precision.size()))
            .ok_or_else(|| ForgeError::Shape(format!("layer {}: Linear weights overflow", layer.index)))?;
        crate::budget::Request::new().bytes(1, &[bytes]).check("the layer's weight staging")?;
        let rest = staging.0.get(dev, bytes)?;
        let qkv_bias = match (&layer.q.bias, &layer.k.bias, &layer.v.bias) {
            (Some(q), Some(k), Some(v)) => {
                let all: Vec<f32> = q.iter().chain(k.iter()).chain(v.iter()).copied().collect();
                Some(upload_f32(dev, &all)?)
            }
            (None, None, None) => None,
            _ => return Err(ForgeError::Config("q/k/v biases must be all present or all absent".into())),
        };
        let (qkv, rest) = stacked(dev, &[&layer.q, &layer.k, &layer.v], precision, rest)?;
        let (o, mut rest) = stacked(dev, &[&layer.o], precision, rest)?;
        let ffn = match &layer.ffn {
            Ffn::Dense(mlp) => GpuFfn::Dense(GpuMlp::upload(dev, mlp, precision, rest)?.0),
            Ffn::Moe { router, experts, config } => {
                let mut gpu_experts = Vec::with_capacity(experts.len());
                for e in experts {
                    let (m, r) = GpuMlp::upload(dev, e, precision, rest)?;
                    gpu_experts.push(m);
                    rest = r;
                }
                GpuFfn::Moe {
                    router: upload_f32(dev, &router.iter().copied().collect::<Vec<_>>())?,
                    experts: gpu_experts,
                    config: config.clone(),
                }
            }
        };
        Ok(GpuLayer {
            index: layer.index,
            hidden: layer.hidden,
            precision,
            gqa: layer.gqa.clone(),
            eps: layer.eps,
            rope: layer.rope.clone(),
            sliding_window: layer.sliding_window,
            input_norm: upload_vec(dev, &layer.input_norm)?,
            post_norm: upload_vec(dev, &layer.post_attention_norm)?,
            qkv,
            qkv_bias,
            o,
            o_bias: layer.o.bias.as_ref().map(|b| upload_vec(dev, b)).transpose()?,
            q_norm: layer.q_norm.as_ref().map(|b| upload_vec(dev, b)).transpose()?,
            k_norm: layer.k_norm.as_ref().map(|b| upload_vec(dev, b)).transpose()?,
            ffn,
        })
    }

    /// Tokens per chunk that keep the widest f32 intermediate of the layer (q/k/v, gate/up,
    /// router logits) within `bytes`, between 2048 and [`DEFAULT_CHUNK_TOKENS`] (on the H200
    /// a Qwen3-30B-A3B layer ran 12 % slower with 65536-token chunks than with 16384).
    pub fn chunk_tokens_for(&self, bytes: usize) -> usize {
        let g = &self.gqa;
        let width = (g.num_heads + 2 * g.num_kv_heads) * g.head_dim;
        let widest = width.max(self.ffn_width()).max(self.hidden).max(1);
        (bytes / (4 * widest)).clamp(2048, DEFAULT_CHUNK_TOKENS)
    }

    /// Overwrites Linear weights in place (the quantized-dequantized weights for the
    /// propagation pass): each `(group, role, w)` names one Linear, `w` is `(out, in)` as
    /// loaded. Converted through `staging`; returns when the uploads are done.
    pub fn replace_weights(
        &mut self,
        dev: &GpuDevice,
        weights: &[(InputGroup, LinearRole, ArrayView2<'_, f32>)],
        staging: &mut WeightStaging,
    ) -> Result<()> {
        let mut slots = Vec::with_capacity(weights.len());
        let mut total = 0usize;
        for (group, role, w) in weights {
            let (addr, capacity) = self.weight_slot(*group, *role, w.dim())?;
            slots.push((addr, w.view()));
            total = total
                .checked_add(capacity)
                .ok_or_else(|| ForgeError::Shape("quantized weights overflow the staging size".into()))?;
        }
        crate::budget::Request::new().bytes(1, &[total]).check("the quantized weights' staging")?;
        let mut rest = staging.0.get(dev, total)?;
        let mut enqueue = || -> Result<()> {
            for (addr, w) in &slots {
                let (mine, r) = std::mem::take(&mut rest).split_at_mut(w.len() * self.precision.size());
                // SAFETY: `weight_slot` checked the slot holds the weight; the staging is not
                // reused before the synchronization below.
                unsafe { stage_upload(dev, mine, std::slice::from_ref(w), self.precision, *addr) }?;
                rest = r;
            }
            Ok(())
        };
        let done = enqueue();
        dev.synchronize()?;
        done
    }

    /// The device address of `(group, role)`'s rows and their byte count, after checking a
    /// weight of `dim` fits them.
    fn weight_slot(&mut self, group: InputGroup, role: LinearRole, dim: (usize, usize)) -> Result<(u64, usize)> {
        let g = &self.gqa;
        let (q_out, kv_out) = (g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim);
        let (hidden, index) = (self.hidden, self.index);
        let (buf, rows_before, in_features) = match (group, role) {
            (InputGroup::Qkv, LinearRole::Q) => (&mut self.qkv, 0, hidden),
            (InputGroup::Qkv, LinearRole::K) => (&mut self.qkv, q_out, hidden),
            (InputGroup::Qkv, LinearRole::V) => (&mut self.qkv, q_out + kv_out, hidden),
            (InputGroup::O, LinearRole::O) => (&mut self.o, 0, q_out),
            (InputGroup::GateUp | InputGroup::Down, _) => match &mut self.ffn {
                GpuFfn::Dense(m) => mlp_slot(m, role, hidden)?,
                GpuFfn::Moe { .. } => return Err(ForgeError::Config(format!("layer {index} has no dense MLP"))),
            },
            (InputGroup::ExpertGateUp(e) | InputGroup::ExpertDown(e), _) => match &mut self.ffn {
                GpuFfn::Moe { experts, .. } => {
                    let n = experts.len();
                    let m = experts.get_mut(e).ok_or_else(|| ForgeError::Shape(format!("expert {e} of {n}")))?;
                    mlp_slot(m, role, hidden)?
                }
                GpuFfn::Dense(_) => return Err(ForgeError::Config(format!("layer {index} has no experts"))),
            },
            _ => return Err(ForgeError::Internal(format!("{role:?} is not in {group:?}"))),
        };
        let es = self.precision.size();
        let (start, end) = (rows_before * in_features * es, (rows_before + dim.0) * in_features * es);
        if dim.1 != in_features || end > buf.len() {
            return Err(ForgeError::Shape(format!("layer {index} {role:?}: a {dim:?} weight does not fit its slot")));
        }
        Ok((buf.dev_ptr_mut().addr() + start as u64, end - start))
    }

    /// The Linear precision.
    pub fn precision(&self) -> ForwardPrecision {
        self.precision
    }

    fn gemm(
        dev: &GpuDevice,
        (m, n, k): (usize, usize, usize),
        a: RowMatrix,
        b: RowMatrix,
        b_transposed: bool,
        (c, beta): (RowMatrix, f32),
    ) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        let g = RowGemm { m, n, k, b_transposed, alpha: 1.0, beta, batch: 1, tf32: false };
        // SAFETY: the callers pass workspace and weight buffers sized for these shapes, all on
        // the device's stream, which the handle is bound to.
        dev.with_blas(|blas| unsafe { blas.gemm_rows(&g, &a, &b, &c) })
    }

    fn rms_norm(
        &self,
        dev: &GpuDevice,
        (x, rows, n, heads, stride): (u64, usize, usize, usize, usize),
        weight: &CudaSlice<f32>,
        out_f32: u64,
        out_act: u64,
    ) -> Result<()> {
        let args = RmsNormArgs {
            x: DevPtr::from_addr(x),
            weight: weight.dev_ptr(),
            rows: u32_of(rows, "norm rows")?,
            n: u32_of(n, "norm width")?,
            heads: u32_of(heads, "heads")?,
            stride: u32_of(stride, "row stride")?,
            eps: self.eps,
            out_f32: DevPtrMut::from_addr(out_f32),
            out_act: DevPtrMut::from_addr(out_act),
            act_dtype: self.precision.act(),
        };
        // SAFETY: every addressed row lies in the buffers the caller sized (RmsNormArgs).
        unsafe { dev.launch::<RmsNormRows>(rows_launch(rows), &args) }
    }

    /// Runs every sequence of `x` through the layer into `out` (same shapes), reporting each
    /// Linear group's inputs to `sink`. When `ffn_inputs` is given it receives the
    /// feed-forward block's input (the post-attention norm's output, in the precision's type)
    /// of every token, for [`GpuLayer::record_experts`].
    pub fn forward(
        &self,
        dev: &GpuDevice,
        x: &DeviceSequences,
        out: &mut DeviceSequences,
        mut sink: Option<&mut GpuHessianSink>,
        ffn_inputs: Option<&mut DeviceBuf<u8>>,
        ws: &mut ForwardWorkspace,
    ) -> Result<()> {
        let h = self.hidden;
        if x.hidden != h || out.hidden != h || out.data.len() < x.values() {
            return Err(ForgeError::Shape(format!(
                "layer {}: hidden states of width {} (output {}, room for {} values) for a layer of width {h}",
                self.index,
                x.hidden,
                out.hidden,
                out.data.len()
            )));
        }
        let total: usize = x.lens.iter().sum();
        let ffn_base = match ffn_inputs {
            Some(buf) => Some(addr(buf, dev, total * h * self.precision.size(), "feed-forward inputs")?),
            None => None,
        };
        // The residual stream: out = x, then every block adds to it.
        out.lens = x.lens.clone();
        copy_bytes(dev, x.data.dev_ptr().addr(), out.data.dev_ptr_mut().addr(), 4 * x.values())?;
        let max_len = x.lens.iter().copied().max().unwrap_or(0);
        self.ensure_rope_tables(dev, ws, max_len)?;
        let out_base = out.data.dev_ptr_mut().addr();
        let mut start_token = 0;
        for (first, last, tokens) in chunk_plan(&x.lens, ws.chunk_tokens) {
            let hid = out_base + (start_token * h * 4) as u64;
            let ffn_dst = ffn_base.map(|b| b + (start_token * h * self.precision.size()) as u64);
            self.chunk(dev, hid, &x.lens[first..last], tokens, sink.as_deref_mut(), ffn_dst, ws)?;
            start_token += tokens;
        }
        Ok(())
    }

    fn ffn_width(&self) -> usize {
        match &self.ffn {
            GpuFfn::Dense(m) => 2 * m.inter,
            GpuFfn::Moe { experts, config, .. } => {
                experts.iter().map(|e| 2 * e.inter).max().unwrap_or(0).max(config.num_experts)
            }
        }
    }

    fn ensure_rope_tables(&self, dev: &GpuDevice, ws: &mut ForwardWorkspace, len: usize) -> Result<()> {
        // Positions 0..len of this layer's rotation (every layer of a model shares one).
        if matches!(&ws.rope_tables, Some((rope, n, _, _)) if *rope == self.rope && *n >= len) {
            return Ok(());
        }
        let half = self.rope.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(len * half), Vec::with_capacity(len * half));
        for p in 0..len {
            let (c, s) = self.rope.cos_sin(p);
            cos.extend(c);
            sin.extend(s);
        }
        ws.rope_tables = Some((self.rope.clone(), len, upload_f32(dev, &cos)?, upload_f32(dev, &sin)?));
        Ok(())
    }

    /// One chunk of whole sequences (`lens`, `tokens` in all) whose residual rows start at
    /// device address `hid`.
    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &self,
        dev: &GpuDevice,
        hid: u64,
        lens: &[usize],
        tokens: usize,
        mut sink: Option<&mut GpuHessianSink>,
        ffn_dst: Option<u64>,
        ws: &mut ForwardWorkspace,
    ) -> Result<()> {
        let h = self.hidden;
        let g = &self.gqa;
        let (nh, nkv, hd) = (g.num_heads, g.num_kv_heads, g.head_dim);
        let (q_w, kv_w) = (nh * hd, nkv * hd);
        let width = q_w + 2 * kv_w;
        let p = self.precision;
        let es = p.size();
        let gt = p.gemm();
        let rm = |addr: u64, dtype: GemmType, row_stride: usize| RowMatrix { addr, dtype, row_stride, batch_stride: 0 };
        // The kernels index a chunk's elements in 32 bits.
        u32_of(tokens * h.max(width).max(self.ffn_width()), "a chunk's tokens × width")?;

        // Attention input: norm → act (and the q/k/v Hessian).
        let act = addr(&mut ws.act, dev, tokens * h.max(q_w) * es, "Linear inputs")?;
        self.rms_norm(dev, (hid, tokens, h, 1, h), &self.input_norm, 0, act)?;
        if let Some(s) = sink.as_deref_mut() {
            let buf = ws.act.get(1)?;
            s.record(dev, InputGroup::Qkv, Act { buf, offset: 0, tokens, cols: h, dtype: p.activation_dtype() })?;
        }
        let qkv = addr(&mut ws.qkv, dev, tokens * width * 4, "q/k/v")?;
        Self::gemm(
            dev,
            (tokens, width, h),
            rm(act, gt, h),
            rm(self.qkv.dev_ptr().addr(), gt, h),
            true,
            (rm(qkv, GemmType::F32, width), 0.0),
        )?;
        if let Some(b) = &self.qkv_bias {
            let args = BiasArgs {
                y: DevPtrMut::from_addr(qkv),
                bias: b.dev_ptr(),
                rows: u32_of(tokens, "tokens")?,
                n: u32_of(width, "q/k/v width")?,
                stride: u32_of(width, "q/k/v width")?,
            };
            // SAFETY: qkv holds tokens rows of `width` f32; the bias `width` f32.
            unsafe { dev.launch::<AddBiasRows>(items_launch(tokens * width), &args)? };
        }
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            self.rms_norm(dev, (qkv, tokens * nh, hd, nh, width), qn, qkv, 0)?;
            self.rms_norm(dev, (qkv + (q_w * 4) as u64, tokens * nkv, hd, nkv, width), kn, qkv + (q_w * 4) as u64, 0)?;
        }
        // Attention per sequence into `attn` (f32 [tokens, q_w]).
        let attn = addr(&mut ws.attn, dev, tokens * q_w * 4, "attention output")?;
        let max_len = lens.iter().copied().max().unwrap_or(0);
        let scores = addr(&mut ws.scores, dev, nh * max_len * max_len * 4, "attention scores")?;
        let (cos, sin) = match &ws.rope_tables {
            Some((_, _, c, s)) => (c.dev_ptr(), s.dev_ptr()),
            None => return Err(ForgeError::Internal("RoPE tables missing".into())),
        };
        let half = self.rope.inv_freq.len();
        let group = nh / nkv.max(1);
        let mut row0 = 0;
        for &t in lens {
            let base = qkv + (row0 * width * 4) as u64;
            for (off, heads) in [(0, nh), (q_w, nkv)] {
                let args = RopeArgs {
                    y: DevPtrMut::from_addr(base + (off * 4) as u64),
                    cos,
                    sin,
                    rows: u32_of(t, "tokens")?,
                    heads: u32_of(heads, "heads")?,
                    head_dim: u32_of(hd, "head_dim")?,
                    half: u32_of(half, "rotary pairs")?,
                    stride: u32_of(width, "q/k/v width")?,
                };
                // SAFETY: t rows of `width` f32 from base; tables of ≥ t·half f32.
                unsafe { dev.launch::<RopeRows>(items_launch(t * heads * half), &args)? };
            }
            for j in 0..group {
                // Query head kv·group + j against key head kv, batched over kv (HF's
                // repeat_kv order: query head h reads key head h / group); scores slot h.
                let gemm = RowGemm {
                    m: t,
                    n: t,
                    k: hd,
                    b_transposed: true,
                    alpha: g.scaling,
                    beta: 0.0,
                    batch: nkv,
                    tf32: p == ForwardPrecision::Bf16,
                };
                let q = RowMatrix {
                    addr: base + (j * hd * 4) as u64,
                    dtype: GemmType::F32,
                    row_stride: width,
                    batch_stride: group * hd,
                };
                let k = RowMatrix {
                    addr: base + (q_w * 4) as u64,
                    dtype: GemmType::F32,
                    row_stride: width,
                    batch_stride: hd,
                };
                let s = RowMatrix {
                    addr: scores + (j * t * t * 4) as u64,
                    dtype: GemmType::F32,
                    row_stride: t,
                    batch_stride: group * t * t,
                };
                // SAFETY: every batch item lies in qkv / scores (sized above); one stream.
                dev.with_blas(|b| unsafe { b.gemm_rows(&gemm, &q, &k, &s) })?;
            }
            let args = SoftmaxArgs {
                s: DevPtrMut::from_addr(scores),
                heads: u32_of(nh, "heads")?,
                t: u32_of(t, "tokens")?,
                window: u32_of(self.sliding_window.unwrap_or(0), "sliding window")?,
            };
            // SAFETY: scores holds nh·t·t f32.
            unsafe { dev.launch::<CausalSoftmax>(rows_launch(nh * t), &args)? };
            for j in 0..group {
                let gemm = RowGemm {
                    m: t,
                    n: hd,
                    k: t,
                    b_transposed: false,
                    alpha: 1.0,
                    beta: 0.0,
                    batch: nkv,
                    tf32: p == ForwardPrecision::Bf16,
                };
                let pm = RowMatrix {
                    addr: scores + (j * t * t * 4) as u64,
                    dtype: GemmType::F32,
                    row_stride: t,
                    batch_stride: group * t * t,
                };
                let v = RowMatrix {
                    addr: base + ((q_w + kv_w) * 4) as u64,
                    dtype: GemmType::F32,
                    row_stride: width,
                    batch_stride: hd,
                };
                let o = RowMatrix {
                    addr: attn + ((row0 * q_w + j * hd) * 4) as u64,
                    dtype: GemmType::F32,
                    row_stride: q_w,
                    batch_stride: group * hd,
                };
                // SAFETY: as above; attn holds tokens·q_w f32.
                dev.with_blas(|b| unsafe { b.gemm_rows(&gemm, &pm, &v, &o) })?;
            }
            row0 += t;
        }
        // The o projection's input in the precision's type, its Hessian, then hid += attn·Woᵀ.
        let o_in = match p {
            ForwardPrecision::F32 => attn,
            ForwardPrecision::Bf16 => {
                let args = CastArgs {
                    x: DevPtr::from_addr(attn),
                    len: u32_of(tokens * q_w, "attention outputs")?,
                    out: DevPtrMut::from_addr(act),
                    act_dtype: ACT_BF16,
                };
                // SAFETY: attn tokens·q_w f32; act room for tokens·max(h, q_w) bf16.
                unsafe { dev.launch::<CastF32>(items_launch(tokens * q_w), &args)? };
                act
            }
        };
        if let Some(s) = sink.as_deref_mut() {
            let buf = match p {
                ForwardPrecision::F32 => ws.attn.get(1)?,
                ForwardPrecision::Bf16 => ws.act.get(1)?,
            };
            s.record(dev, InputGroup::O, Act { buf, offset: 0, tokens, cols: q_w, dtype: p.activation_dtype() })?;
        }
        Self::gemm(
            dev,
            (tokens, h, q_w),
            rm(o_in, gt, q_w),
            rm(self.o.dev_ptr().addr(), gt, q_w),
            true,
            (rm(hid, GemmType::F32, h), 1.0),
        )?;
        if let Some(b) = &self.o_bias {
            let args = BiasArgs {
                y: DevPtrMut::from_addr(hid),
                bias: b.dev_ptr(),
                rows: u32_of(tokens, "tokens")?,
                n: u32_of(h, "hidden")?,
                stride: u32_of(h, "hidden")?,
            };
            // SAFETY: hid holds tokens rows of h f32.
            unsafe { dev.launch::<AddBiasRows>(items_launch(tokens * h), &args)? };
        }

        // Feed-forward block.
        let normed32 = match &self.ffn {
            GpuFfn::Moe { .. } => addr(&mut ws.normed32, dev, tokens * h * 4, "router input")?,
            GpuFfn::Dense(_) => 0,
        };
        self.rms_norm(dev, (hid, tokens, h, 1, h), &self.post_norm, normed32, act)?;
        if let Some(dst) = ffn_dst {
            copy_bytes(dev, act, dst, tokens * h * es)?;
        }
        match &self.ffn {
            GpuFfn::Dense(mlp) => {
                if let Some(s) = sink.as_deref_mut() {
                    let buf = ws.act.get(1)?;
                    s.record(
                        dev,
                        InputGroup::GateUp,
                        Act { buf, offset: 0, tokens, cols: h, dtype: p.activation_dtype() },
                    )?;
                }
                self.mlp(dev, mlp, act, tokens, (InputGroup::Down, sink), ws, (hid, 1.0))?;
            }
            GpuFfn::Moe { router, experts, config } => {
                self.moe(dev, (router, experts, config), (act, normed32, hid), tokens, sink, ws)?;
            }
        }
        Ok(())
    }

    /// `dst (+)= down(silu(gate x)·up x)` for `rows` inputs at `x` (precision type): the
    /// down input's Hessian goes to `group` of the sink.
    #[allow(clippy::too_many_arguments)]
    fn mlp(
        &self,
        dev: &GpuDevice,
        mlp: &GpuMlp,
        x: u64,
        rows: usize,
        (group, sink): (InputGroup, Option<&mut GpuHessianSink>),
        ws: &mut ForwardWorkspace,
        (dst, beta): (u64, f32),
    ) -> Result<()> {
        let (h, inter) = (self.hidden, mlp.inter);
        let p = self.precision;
        let gt = p.gemm();
        let rm = |addr: u64, dtype: GemmType, row_stride: usize| RowMatrix { addr, dtype, row_stride, batch_stride: 0 };
        let gu = addr(&mut ws.gate_up, dev, rows * 2 * inter * 4, "gate/up outputs")?;
        Self::gemm(
            dev,
            (rows, 2 * inter, h),
            rm(x, gt, h),
            rm(mlp.gate_up.dev_ptr().addr(), gt, h),
            true,
            (rm(gu, GemmType::F32, 2 * inter), 0.0),
        )?;
        let mid = addr(&mut ws.mid, dev, rows * inter * p.size(), "down inputs")?;
        let args = SwigluArgs {
            gu: DevPtr::from_addr(gu),
            rows: u32_of(rows, "tokens")?,
            inter: u32_of(inter, "intermediate size")?,
            out: DevPtrMut::from_addr(mid),
            act_dtype: p.act(),
        };
        // SAFETY: gu rows·2·inter f32; mid rows·inter elements.
        unsafe { dev.launch::<Swiglu>(items_launch(rows * inter), &args)? };
        if let Some(s) = sink {
            let buf = ws.mid.get(1)?;
            s.record(dev, group, Act { buf, offset: 0, tokens: rows, cols: inter, dtype: p.activation_dtype() })?;
        }
        Self::gemm(
            dev,
            (rows, h, inter),
            rm(mid, gt, inter),
            rm(mlp.down.dev_ptr().addr(), gt, inter),
            true,
            (rm(dst, GemmType::F32, h), beta),
        )
    }
}

impl GpuLayer {
    /// The MoE block of a chunk: router logits (f32) → host routing → per expert, in expert
    /// order, gather → SwiGLU → scatter-add into a zeroed sum, then `hid += sum`.
    fn moe(
        &self,
        dev: &GpuDevice,
        (router, experts, config): (&CudaSlice<f32>, &[GpuMlp], &MoeConfig),
        (act, normed32, hid): (u64, u64, u64),
        tokens: usize,
        mut sink: Option<&mut GpuHessianSink>,
        ws: &mut ForwardWorkspace,
    ) -> Result<()> {
        let h = self.hidden;
        let ne = config.num_experts;
        let es = self.precision.size();
        let rm = |addr: u64, row_stride: usize| RowMatrix { addr, dtype: GemmType::F32, row_stride, batch_stride: 0 };
        let logits = addr(&mut ws.logits, dev, tokens * ne * 4, "router logits")?;
        Self::gemm(dev, (tokens, ne, h), rm(normed32, h), rm(router.dev_ptr().addr(), h), true, (rm(logits, ne), 0.0))?;
        let bytes = dev
            .stream()
            .clone_dtoh(&ws.logits.get(1)?.slice(0..tokens * ne * 4))
            .map_err(ForgeError::driver("downloading router logits"))?;
        let values: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let logits_host = Array2::from_shape_vec((tokens, ne), values).map_err(|e| ForgeError::Shape(e.to_string()))?;
        if let Some(((row, col), &value)) = logits_host.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(ForgeError::NonFinite { tensor: "router logits", row, col, value });
        }
        let routing = route(logits_host.view(), config.top_k, config.router);
        // Each expert's tokens in token order with their weights (the reference's order).
        let mut lists: Vec<Vec<(u32, f32)>> = vec![Vec::new(); ne];
        for (t, r) in routing.iter().enumerate() {
            for &(e, w) in r {
                let list = lists.get_mut(e).ok_or_else(|| ForgeError::Internal(format!("routed to expert {e}")))?;
                list.push((t as u32, w));
            }
        }
        let idx: Vec<u32> = lists.iter().flatten().map(|&(t, _)| t).collect();
        let weights: Vec<f32> = lists.iter().flatten().map(|&(_, w)| w).collect();
        if idx.is_empty() {
            return Ok(());
        }
        let idx_dev = dev.stream().clone_htod(&idx).map_err(ForgeError::driver("uploading routing"))?;
        let w_dev = dev.stream().clone_htod(&weights).map_err(ForgeError::driver("uploading routing"))?;
        let (idx_base, w_base) = (idx_dev.dev_ptr().addr(), w_dev.dev_ptr().addr());
        let sum = addr(&mut ws.moe_out, dev, tokens * h * 4, "expert outputs")?;
        zero_bytes(dev, sum, tokens * h * 4)?;
        let mut at = 0usize;
        for (e, list) in lists.iter().enumerate() {
            let n = list.len();
            if n == 0 {
                continue;
            }
            let gathered = addr(&mut ws.gathered, dev, n * h * es, "expert inputs")?;
            let args = GatherArgs {
                src: DevPtr::from_addr(act),
                idx: DevPtr::from_addr(idx_base + (at * 4) as u64),
                rows: u32_of(n, "expert tokens")?,
                words: u32_of(h * es / 2, "row width")?,
                out: DevPtrMut::from_addr(gathered),
            };
            // SAFETY: indices < tokens (rows of act); gathered room for n rows.
            unsafe { dev.launch::<GatherRows>(items_launch(n * h * es / 2), &args)? };
            if let Some(s) = sink.as_deref_mut() {
                let buf = ws.gathered.get(1)?;
                let x = Act { buf, offset: 0, tokens: n, cols: h, dtype: self.precision.activation_dtype() };
                s.record(dev, InputGroup::ExpertGateUp(e), x)?;
            }
            let y = addr(&mut ws.expert_out, dev, n * h * 4, "expert outputs")?;
            let mlp = experts.get(e).ok_or_else(|| ForgeError::Internal(format!("expert {e} missing")))?;
            self.mlp(dev, mlp, gathered, n, (InputGroup::ExpertDown(e), sink.as_deref_mut()), ws, (y, 0.0))?;
            let args = ScatterAddArgs {
                y: DevPtr::from_addr(y),
                idx: DevPtr::from_addr(idx_base + (at * 4) as u64),
                weight: DevPtr::from_addr(w_base + (at * 4) as u64),
                rows: u32_of(n, "expert tokens")?,
                n: u32_of(h, "hidden")?,
                dst: DevPtrMut::from_addr(sum),
            };
            // SAFETY: distinct token rows of `sum` (tokens·h f32); y n·h f32.
            unsafe { dev.launch::<ScatterAddRows>(items_launch(n * h), &args)? };
            at += n;
        }
        let args =
            AddArgs { dst: DevPtrMut::from_addr(hid), x: DevPtr::from_addr(sum), len: u32_of(tokens * h, "hidden")? };
        // SAFETY: both hold tokens·h f32.
        unsafe { dev.launch::<AddF32>(items_launch(tokens * h), &args)? };
        // The routing uploads are freed stream-ordered after the launches that read them.
        drop((idx_dev, w_dev));
        Ok(())
    }

    /// What `experts` would see if every token were routed to them (the all-tokens coverage
    /// policy): their gate/up and down inputs over the `tokens` feed-forward inputs in
    /// `ffn_inputs` (from [`GpuLayer::forward`]) go to `sink`. Nothing else is computed.
    pub fn record_experts(
        &self,
        dev: &GpuDevice,
        ffn_inputs: &DeviceBuf<u8>,
        lens: &[usize],
        experts: &[usize],
        sink: &mut GpuHessianSink,
        ws: &mut ForwardWorkspace,
    ) -> Result<()> {
        let GpuFfn::Moe { experts: all, .. } = &self.ffn else {
            return Err(ForgeError::Config(format!("layer {} has no experts", self.index)));
        };
        let (h, es) = (self.hidden, self.precision.size());
        let tokens: usize = lens.iter().sum();
        let buf = ffn_inputs.get(tokens * h * es)?;
        let base = buf.dev_ptr().addr();
        // The forward's chunks: a streamed run (batches of whole chunks) sums the same pieces.
        let plan = chunk_plan(lens, ws.chunk_tokens);
        for &e in experts {
            let mlp = all.get(e).ok_or_else(|| ForgeError::Shape(format!("expert {e} of {}", all.len())))?;
            let mut t0 = 0;
            for &(_, _, n) in &plan {
                let x = Act { buf, offset: t0 * h * es, tokens: n, cols: h, dtype: self.precision.activation_dtype() };
                sink.record(dev, InputGroup::ExpertGateUp(e), x)?;
                let y = addr(&mut ws.expert_out, dev, n * h * 4, "expert outputs")?;
                let x_addr = base + (t0 * h * es) as u64;
                self.mlp(dev, mlp, x_addr, n, (InputGroup::ExpertDown(e), Some(&mut *sink)), ws, (y, 0.0))?;
                t0 += n;
            }
        }
        Ok(())
    }
}

/// The forward's chunks over sequences of `lens`: `(first, last, tokens)` of whole sequences
/// up to `chunk_tokens` tokens (at least one sequence each).
pub(crate) fn chunk_plan(lens: &[usize], chunk_tokens: usize) -> Vec<(usize, usize, usize)> {
    let mut plan = Vec::new();
    let mut first = 0;
    while first < lens.len() {
        let mut last = first + 1;
        let mut tokens = lens[first];
        while last < lens.len() && tokens + lens[last] <= chunk_tokens {
            tokens += lens[last];
            last += 1;
        }
        plan.push((first, last, tokens));
        first = last;
    }
    plan
}

/// Batches of whole forward chunks (sequence ranges) of at most `max_tokens` tokens each (at
/// least one chunk): streamed through the device, they run exactly the chunks of one pass
/// over everything, so the Hessians and outputs are bit for bit the same.
pub(crate) fn batch_plan(lens: &[usize], chunk_tokens: usize, max_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut batches: Vec<(std::ops::Range<usize>, usize)> = Vec::new();
    for (first, last, tokens) in chunk_plan(lens, chunk_tokens) {
        match batches.last_mut() {
            Some((r, t)) if *t + tokens <= max_tokens => {
                r.end = last;
                *t += tokens;
            }
            _ => batches.push((first..last, tokens)),
        }
    }
    batches.into_iter().map(|(r, _)| r).collect()
}

/// `bytes` bytes from device address `src` to `dst` on the device's stream.
fn copy_bytes(dev: &GpuDevice, src: u64, dst: u64, bytes: usize) -> Result<()> {
    // SAFETY: the callers pass addresses of live device buffers holding `bytes` bytes.
    unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, dev.stream().cu_stream()) }
        .map_err(ForgeError::driver("copying device rows"))
}

/// Zeroes `bytes` bytes at device address `dst` on the device's stream.
fn zero_bytes(dev: &GpuDevice, dst: u64, bytes: usize) -> Result<()> {
    // SAFETY: the callers pass the address of a live device buffer of at least `bytes` bytes.
    unsafe { cudarc::driver::result::memset_d8_async(dst, 0, bytes, dev.stream().cu_stream()) }
        .map_err(ForgeError::driver("zeroing device rows"))
}

#[cfg(test)]
mod tests {
    use super::{batch_plan, chunk_plan};
    use proptest::prelude::*;

    proptest! {
        /// Streamed batches are unions of whole forward chunks, in order, covering every
        /// sequence once, each within the token budget unless it is a single chunk: the
        /// property that makes a streamed pass sum the same pieces as a device-resident one.
        #[test]
        fn batches_are_whole_chunks_within_the_budget(
            lens in proptest::collection::vec(1usize..3000, 1..60),
            chunk_tokens in 1usize..5000,
            max_tokens in 0usize..20_000,
        ) {
            let chunks = chunk_plan(&lens, chunk_tokens);
            let mut next = 0;
            for &(first, last, tokens) in &chunks {
                prop_assert_eq!(first, next);
                prop_assert!(last > first);
                prop_assert_eq!(tokens, lens[first..last].iter().sum::<usize>());
                prop_assert!(tokens <= chunk_tokens || last == first + 1, "a chunk over budget holds one sequence");
                next = last;
            }
            prop_assert_eq!(next, lens.len());
            let starts: Vec<usize> = chunks.iter().map(|c| c.0).collect();
            let batches = batch_plan(&lens, chunk_tokens, max_tokens);
            let mut next = 0;
            for b in &batches {
                prop_assert_eq!(b.start, next);
                prop_assert!(starts.contains(&b.start), "a batch starts at a chunk");
                prop_assert!(b.end == lens.len() || starts.contains(&b.end), "and ends at one");
                let tokens: usize = lens[b.clone()].iter().sum();
                let one_chunk = chunks.iter().any(|c| c.0 == b.start && c.1 == b.end);
                prop_assert!(tokens <= max_tokens || one_chunk, "{:?}: {} tokens over {}", b, tokens, max_tokens);
                // The forward run over the batch alone cuts the same chunks.
                let inner: Vec<(usize, usize, usize)> = chunk_plan(&lens[b.clone()], chunk_tokens)
                    .into_iter()
                    .map(|(f, l, t)| (f + b.start, l + b.start, t))
                    .collect();
                let global: Vec<(usize, usize, usize)> =
                    chunks.iter().copied().filter(|c| c.0 >= b.start && c.1 <= b.end).collect();
                prop_assert_eq!(inner, global);
                next = b.end;
            }
            prop_assert_eq!(next, lens.len());
        }
    }
}
