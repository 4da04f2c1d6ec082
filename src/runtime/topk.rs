//! A mixture-of-experts step from the router's top-k expert ids, on the device
//! (docs/kernels.md §6, "Top-k routing"): [`TopkRouting`] sorts the step's `(token, slot)`
//! pairs by expert and builds the grouped launch's routing from them, gathers the tokens'
//! activations into the sorted rows, and combines the experts' outputs per token with the
//! routing weights. With [`w4a16_grouped_matmul`](super::w4a16_grouped_matmul) in between,
//! nothing goes to the host, so a decode step can be captured in a CUDA graph.
//!
//! ```text
//! ids [tokens][top_k] ─route─▶ offsets, pair → row, row → token ─build─▶ task table
//! hidden [tokens][K] ─gather─▶ X [pairs][K] ─grouped W4A16 (…)─▶ Y [pairs][N]
//! Y, weights [tokens][top_k] ─combine─▶ out [tokens][N]
//! ```
//!
//! The order is fixed: pair `token·top_k + slot` goes to row `offsets[e] + (pairs before it
//! routed to e)`, and the combined value is the f32 `fma` sum over the slots in order from 0,
//! rounded once to the 16-bit type. So the results are deterministic and equal
//! [`topk_route_cpu`] and [`topk_combine_cpu`] bit for bit.

use super::{ActDtype, ExpertRouting};
use crate::device::{DeviceBuffer, DeviceBufferMut, GpuDevice};
use crate::{ForgeError, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};
use forge_kernel_abi::runtime::{
    topk_route_shared_bytes, TopkCombineArgs, TopkGatherArgs, TopkRouteArgs, TOPK_BAD_EXPERT, TOPK_OK,
    TOPK_ROUTE_MAX_EXPERTS, TOPK_ROUTE_THREADS, TOPK_ROWS_THREADS,
};
use forge_kernel_abi::{TopkCombineBf16, TopkCombineF16, TopkGatherRows, TopkRoute as RouteKernel};

/// The most experts a top-k routing takes (the route kernel keeps a count per warp and
/// expert in shared memory).
pub const MAX_TOPK_EXPERTS: usize = TOPK_ROUTE_MAX_EXPERTS as usize;

/// The sorted rows of a top-k step (what [`topk_route_cpu`] computes and
/// [`TopkRouting::download`] reads back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopkRoute {
    /// First row of each expert and the end (`experts + 1`; the end is `tokens·top_k`).
    pub offsets: Vec<usize>,
    /// Sorted row of each pair `token·top_k + slot`.
    pub pair_row: Vec<u32>,
    /// Token of each sorted row.
    pub row_token: Vec<u32>,
}

/// The reference of the route: pairs sorted by expert, then by pair index. `ids` holds
/// `tokens·top_k` expert ids, token-major.
pub fn topk_route_cpu(ids: &[u32], top_k: usize, experts: usize) -> Result<TopkRoute> {
    if top_k == 0 || experts == 0 || !ids.len().is_multiple_of(top_k) {
        return Err(ForgeError::Shape(format!(
            "top-k routing: {} ids for top-k {top_k} over {experts} experts (a whole number of tokens, both ≥ 1)",
            ids.len()
        )));
    }
    if let Some(i) = ids.iter().position(|&e| e as usize >= experts) {
        return Err(bad_expert(i, top_k, ids[i], experts));
    }
    let mut counts = vec![0usize; experts];
    ids.iter().for_each(|&e| counts[e as usize] += 1);
    let offsets = super::expert_offsets(&counts);
    let mut next = offsets.clone();
    let mut pair_row = vec![0u32; ids.len()];
    let mut row_token = vec![0u32; ids.len()];
    for (i, &e) in ids.iter().enumerate() {
        let row = next[e as usize];
        next[e as usize] += 1;
        pair_row[i] = row as u32;
        row_token[row] = (i / top_k) as u32;
    }
    Ok(TopkRoute { offsets, pair_row, row_token })
}

/// The reference of the combine: `out[t, c] = round_T(Σ_j weights[t·top_k + j] ·
/// y[pair_row[t·top_k + j], c])`, the sum an f32 fused multiply-add chain from 0 over the
/// slots in order (as the kernel). `y` holds the sorted rows (`n` values of `dtype` each,
/// bit patterns); returns `tokens·n` values.
pub fn topk_combine_cpu(
    y: &[u16],
    n: usize,
    pair_row: &[u32],
    weights: &[f32],
    top_k: usize,
    dtype: ActDtype,
) -> Result<Vec<u16>> {
    if top_k == 0 || !pair_row.len().is_multiple_of(top_k) || weights.len() != pair_row.len() {
        return Err(ForgeError::Shape(format!(
            "top-k combine: {} rows, {} weights for top-k {top_k}",
            pair_row.len(),
            weights.len()
        )));
    }
    if let Some(&r) = pair_row.iter().find(|&&r| (r as usize + 1) * n > y.len()) {
        return Err(ForgeError::Shape(format!("top-k combine: row {r} past the {} values of Y", y.len())));
    }
    let tokens = pair_row.len() / top_k;
    let mut out = Vec::with_capacity(tokens * n);
    for t in 0..tokens {
        for c in 0..n {
            let acc = (0..top_k).fold(0.0f32, |acc, j| {
                let p = t * top_k + j;
                weights[p].mul_add(dtype.value(y[pair_row[p] as usize * n + c]), acc)
            });
            out.push(dtype.bits(acc));
        }
    }
    Ok(out)
}

/// The gather's and the combine's grid: blocks of [`TOPK_ROWS_THREADS`] over tokens (x, at
/// most 2^16; the kernels stride over the rest) and over runs of `units` per token (y: a
/// thread per unit, so a decode step's few tokens still fill the GPU). `None` past the
/// grid's y limit.
fn token_grid(tokens: usize, units: usize) -> Option<LaunchConfig> {
    let runs = units.div_ceil(TOPK_ROWS_THREADS as usize);
    (runs <= 65_535).then(|| LaunchConfig {
        grid_dim: (tokens.clamp(1, 1 << 16) as u32, runs.max(1) as u32, 1),
        block_dim: (TOPK_ROWS_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn bad_expert(pair: usize, top_k: usize, id: u32, experts: usize) -> ForgeError {
    ForgeError::Shape(format!(
        "top-k routing: token {} slot {} names expert {id} of {experts}",
        pair / top_k,
        pair % top_k
    ))
}

/// A top-k routing on the device (module docs): the step's sorted rows and the grouped
/// launch's [`ExpertRouting`] over them, for up to `tokens_capacity` tokens of `top_k`
/// experts each. Buffers are allocated once; [`TopkRouting::route`] rewrites them on the
/// stream for each step.
pub struct TopkRouting {
    experts: usize,
    top_k: usize,
    tokens_capacity: usize,
    /// Tokens of the last [`TopkRouting::route`] (`None`: not routed yet).
    tokens: Option<usize>,
    offsets: CudaSlice<u32>,
    pair_row: CudaSlice<u32>,
    row_token: CudaSlice<u32>,
    /// `[code, pair]` of the route kernel.
    status: CudaSlice<u32>,
    routing: ExpertRouting,
}

impl TopkRouting {
    /// A routing for `experts` experts (at most [`MAX_TOPK_EXPERTS`]) and steps of up to
    /// `tokens_capacity` tokens of `top_k` experts each. `rows_hint` is the grouped launch's
    /// hint of a busy expert's rows (`None`: [`ExpertRouting::rows_hint`] of the capacity's
    /// pairs; only speed depends on it).
    pub fn new(
        dev: &GpuDevice,
        experts: usize,
        tokens_capacity: usize,
        top_k: usize,
        rows_hint: Option<usize>,
    ) -> Result<Self> {
        if experts == 0 || experts > MAX_TOPK_EXPERTS || top_k == 0 || top_k > experts || tokens_capacity == 0 {
            return Err(ForgeError::Shape(format!(
                "top-k routing: {experts} experts (1 to {MAX_TOPK_EXPERTS}), top-k {top_k} (1 to the experts), \
                 {tokens_capacity} tokens (≥ 1)"
            )));
        }
        let pairs = tokens_capacity.checked_mul(top_k).filter(|&p| p <= i32::MAX as usize).ok_or_else(|| {
            ForgeError::Shape(format!("top-k routing: {tokens_capacity}×{top_k} pairs exceed the launch limits"))
        })?;
        let hint = rows_hint.unwrap_or_else(|| ExpertRouting::rows_hint(pairs, experts));
        let routing = ExpertRouting::on_device(dev, experts, pairs, hint)?;
        Ok(TopkRouting {
            experts,
            top_k,
            tokens_capacity,
            tokens: None,
            offsets: dev.alloc::<u32>(experts + 1, "top-k offsets")?,
            pair_row: dev.alloc::<u32>(pairs, "top-k pair rows")?,
            row_token: dev.alloc::<u32>(pairs, "top-k row tokens")?,
            status: dev.alloc::<u32>(2, "top-k status")?,
            routing,
        })
    }

    /// Sorts `tokens` tokens' pairs (`ids`: `tokens·top_k` u32 expert ids on the device,
    /// token-major, as a router's top-k leaves them) by expert and builds the grouped
    /// launch's task tables from them, on the stream (one kernel of one block; capturable in
    /// a CUDA graph). An id `≥ experts` is found on the device: the step then multiplies,
    /// gathers and combines nothing, and [`TopkRouting::device_status`] names it.
    pub fn route(&mut self, dev: &GpuDevice, ids: &CudaSlice<u32>, tokens: usize) -> Result<()> {
        let pairs = tokens * self.top_k;
        if tokens > self.tokens_capacity || ids.len() < pairs {
            return Err(ForgeError::Shape(format!(
                "top-k routing: {tokens} tokens (capacity {}), {} ids for {pairs} pairs",
                self.tokens_capacity,
                ids.len()
            )));
        }
        let t = self.routing.device_tables()?;
        let args = TopkRouteArgs {
            ids: ids.dev_ptr(),
            offsets: self.offsets.dev_ptr_mut(),
            pair_row: self.pair_row.dev_ptr_mut(),
            row_token: self.row_token.dev_ptr_mut(),
            status: self.status.dev_ptr_mut(),
            pairs: pairs as u32,
            top_k: self.top_k as u32,
            experts: self.experts as u32,
            tasks: t.tasks,
            height: t.height,
            capacity: t.capacity,
            tasks_b: t.tasks_b,
            height_b: t.height_b,
            capacity_b: t.capacity_b,
            rows_limit: t.rows_limit,
            routing_status: t.status,
        };
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (TOPK_ROUTE_THREADS, 1, 1),
            shared_mem_bytes: topk_route_shared_bytes(self.experts as u32),
        };
        // SAFETY: ids ≥ pairs u32 (checked), offsets experts + 1, pair_row and row_token
        // tokens_capacity·top_k ≥ pairs, status 2 (allocated so); 1 ≤ experts ≤ the kernel's
        // maximum, top_k ≥ 1 (new); the routing's tables 3·slots u32 each, heights ≥ 8, its
        // status 2 u32, its rows bound the capacity's pairs ≥ pairs (device_tables); one
        // block of TOPK_ROUTE_THREADS with its shared memory.
        unsafe { dev.launch::<RouteKernel>(cfg, &args) }?;
        self.routing.mark_built();
        self.tokens = Some(tokens);
        Ok(())
    }

    /// The routed tokens (errors before the first [`TopkRouting::route`]).
    fn routed(&self) -> Result<usize> {
        self.tokens.ok_or_else(|| ForgeError::Shape("top-k routing: no ids routed yet (route)".into()))
    }

    /// `x[r, :] = hidden[row_token[r], :]`: the routed tokens' activations (`hidden`, `k`
    /// 16-bit values per token, `k` a multiple of 8) in sorted rows, the `X` of the grouped
    /// launch (`tokens·top_k` rows of `k`). Writes nothing if the route found a bad id.
    pub fn gather(&self, dev: &GpuDevice, hidden: &CudaSlice<u16>, k: usize, x: &mut CudaSlice<u16>) -> Result<()> {
        let tokens = self.routed()?;
        let rows = tokens * self.top_k;
        let fits = |len: usize, r: usize| r.checked_mul(k).is_some_and(|need| len >= need);
        if k == 0 || !k.is_multiple_of(8) || !fits(hidden.len(), tokens) || !fits(x.len(), rows) {
            return Err(ForgeError::Shape(format!(
                "top-k gather: K = {k} (a multiple of 8), hidden {} values for {tokens}×{k}, X {} for {rows}×{k}",
                hidden.len(),
                x.len()
            )));
        }
        let chunks = k / 8;
        // A thread per 16-byte chunk of a row.
        let Some(cfg) = token_grid(tokens, chunks) else {
            return Err(ForgeError::Shape(format!("top-k gather: K = {k} exceeds the launch limits")));
        };
        let args = TopkGatherArgs {
            hidden: hidden.dev_ptr(),
            pair_row: self.pair_row.dev_ptr(),
            status: self.status.dev_ptr(),
            x: x.dev_ptr_mut(),
            tokens: tokens as u32,
            top_k: self.top_k as u32,
            chunks: chunks as u32,
        };
        // SAFETY: device allocations are 256-byte aligned and rows are k·2 = 16·chunks bytes,
        // so every chunk is 16-byte aligned; x ≥ rows·k, hidden ≥ tokens·k (checked);
        // pair_row holds rows < rows for this step's pairs (written by the route kernel of
        // this step, which runs before on the stream, or nothing is read: the status gates it).
        unsafe { dev.launch::<TopkGatherRows>(cfg, &args) }
    }

    /// `out[t, :] = round_T(Σ_j weights[t·top_k + j] · y[pair_row[t·top_k + j], :])`: the
    /// experts' outputs (`y`, the grouped launch's `Y`, `n` values of `dtype` per sorted row)
    /// combined per token with the routing weights (`tokens·top_k` f32, token-major) into
    /// `out` (`tokens·n`). Writes nothing if the route found a bad id.
    pub fn combine(
        &self,
        dev: &GpuDevice,
        y: &CudaSlice<u16>,
        n: usize,
        weights: &CudaSlice<f32>,
        out: &mut CudaSlice<u16>,
        dtype: ActDtype,
    ) -> Result<()> {
        let tokens = self.routed()?;
        let pairs = tokens * self.top_k;
        let fits = |len: usize, r: usize| r.checked_mul(n).is_some_and(|need| len >= need);
        if n == 0 || !fits(y.len(), pairs) || weights.len() < pairs || !fits(out.len(), tokens) {
            return Err(ForgeError::Shape(format!(
                "top-k combine: N = {n}, Y {} values for {pairs}×{n}, {} weights for {pairs} pairs, out {} for {tokens}×{n}",
                y.len(),
                weights.len(),
                out.len()
            )));
        }
        let args = TopkCombineArgs {
            y: y.dev_ptr(),
            pair_row: self.pair_row.dev_ptr(),
            weight: weights.dev_ptr(),
            status: self.status.dev_ptr(),
            out: out.dev_ptr_mut(),
            tokens: tokens as u32,
            top_k: self.top_k as u32,
            n: n as u32,
        };
        // A thread per 8 columns when n % 8 == 0 (16-byte accesses), else per column.
        let Some(cfg) = token_grid(tokens, if n.is_multiple_of(8) { n / 8 } else { n }) else {
            return Err(ForgeError::Shape(format!("top-k combine: N = {n} exceeds the launch limits")));
        };
        // SAFETY: y ≥ pairs·n, weights ≥ pairs, out ≥ tokens·n (checked), both whole
        // allocations (256-byte aligned), so with n % 8 == 0 every 8-column chunk is 16-byte
        // aligned; pair_row holds rows < pairs for this step's pairs (the route kernel, before
        // on the stream; gated by the status).
        match dtype {
            ActDtype::Bf16 => unsafe { dev.launch::<TopkCombineBf16>(cfg, &args) },
            ActDtype::F16 => unsafe { dev.launch::<TopkCombineF16>(cfg, &args) },
        }
    }

    /// The last route's result: `Ok` if every id named an expert, else the typed error
    /// (waits for the stream).
    pub fn device_status(&self, dev: &GpuDevice) -> Result<()> {
        self.routed()?;
        let s = dev.stream().clone_dtoh(&self.status).map_err(ForgeError::driver("downloading the top-k status"))?;
        dev.synchronize()?;
        match s[0] {
            TOPK_OK => self.routing.device_status(dev),
            TOPK_BAD_EXPERT => {
                let pair = s[1] as usize;
                Err(ForgeError::Shape(format!(
                    "top-k routing: token {} slot {} names an expert ≥ {} (nothing was gathered, multiplied or \
                     combined)",
                    pair / self.top_k,
                    pair % self.top_k,
                    self.experts
                )))
            }
            other => Err(ForgeError::Internal(format!("top-k routing: unknown status {other}"))),
        }
    }

    /// The last route's sorted rows as the device holds them (waits for the stream).
    pub fn download(&self, dev: &GpuDevice) -> Result<TopkRoute> {
        let pairs = self.routed()? * self.top_k;
        let stream = dev.stream();
        let get = |d: &CudaSlice<u32>, len: usize| -> Result<Vec<u32>> {
            let mut v = stream.clone_dtoh(d).map_err(ForgeError::driver("downloading the top-k route"))?;
            v.truncate(len);
            Ok(v)
        };
        let offsets = get(&self.offsets, self.experts + 1)?.into_iter().map(|o| o as usize).collect();
        let pair_row = get(&self.pair_row, pairs)?;
        let row_token = get(&self.row_token, pairs)?;
        dev.synchronize()?;
        Ok(TopkRoute { offsets, pair_row, row_token })
    }

    /// The grouped launch's routing over the sorted rows (rows: the capacity's pairs).
    pub fn expert_routing(&self) -> &ExpertRouting {
        &self.routing
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// The most tokens a step may route.
    pub fn tokens_capacity(&self) -> usize {
        self.tokens_capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_sorts_pairs_by_expert_then_pair() {
        // 3 tokens, top-2, 4 experts: pairs (0: 2, 0), (1: 0, 3), (2: 2, 1).
        let r = topk_route_cpu(&[2, 0, 0, 3, 2, 1], 2, 4).unwrap();
        assert_eq!(r.offsets, vec![0, 2, 3, 5, 6]);
        // Expert 0: pairs 1 (token 0), 2 (token 1); expert 1: pair 5; expert 2: pairs 0, 4; expert 3: pair 3.
        assert_eq!(r.row_token, vec![0, 1, 2, 0, 2, 1]);
        assert_eq!(r.pair_row, vec![3, 0, 1, 5, 4, 2]);
        for (i, &row) in r.pair_row.iter().enumerate() {
            assert_eq!(r.row_token[row as usize] as usize, i / 2);
        }
        let empty = topk_route_cpu(&[], 4, 8).unwrap();
        assert_eq!((empty.offsets, empty.pair_row.len()), (vec![0; 9], 0));
    }

    #[test]
    fn the_combine_is_an_fma_chain_over_the_slots_in_order() {
        let dt = ActDtype::Bf16;
        // Two sorted rows of two values, one token of top-2 reading rows 1 then 0.
        let y: Vec<u16> = [1.0f32, 3.0, 0.5, -2.0].iter().map(|&v| dt.bits(v)).collect();
        let out = topk_combine_cpu(&y, 2, &[1, 0], &[0.25, 0.75], 2, dt).unwrap();
        assert_eq!(out, vec![dt.bits(0.25 * 0.5 + 0.75), dt.bits(0.25 * -2.0 + 0.75 * 3.0)]);
        // One rounding at the end: 1 + 3·2^-10 + 3·2^-10 is past half a bf16 ulp of 1 and rounds
        // up to 1 + 2^-7, where rounding after each term would stay at 1.
        let ones: Vec<u16> = [1.0f32; 3].iter().map(|&v| dt.bits(v)).collect();
        let small = 3.0 * 2f32.powi(-10);
        let once = topk_combine_cpu(&ones, 1, &[0, 1, 2], &[1.0, small, small], 3, dt).unwrap();
        assert_eq!(once, vec![dt.bits(1.0 + 2f32.powi(-7))]);
    }

    #[test]
    fn bad_routes_are_typed_errors() {
        for (ids, top_k, experts, says) in [
            (&[0u32, 1, 2][..], 2, 4, "3 ids for top-k 2"),
            (&[0, 1][..], 0, 4, "top-k 0"),
            (&[0, 1, 3, 4][..], 2, 4, "token 1 slot 1 names expert 4 of 4"),
        ] {
            match topk_route_cpu(ids, top_k, experts) {
                Err(ForgeError::Shape(m)) => assert!(m.contains(says), "{ids:?}: {m}"),
                other => panic!("{ids:?}: {other:?}"),
            }
        }
        assert!(topk_combine_cpu(&[0; 4], 2, &[0, 2], &[1.0, 1.0], 2, ActDtype::F16).is_err());
        assert!(topk_combine_cpu(&[0; 4], 2, &[0, 1], &[1.0], 2, ActDtype::F16).is_err());
    }
}
