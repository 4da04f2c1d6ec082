//! The host memory budget: every allocation whose size comes from the input (shapes, token
//! counts, file headers) is checked here before it is made, so a huge or hostile input is a
//! typed [`ForgeError::OutOfMemory`] naming the bytes and the limit instead of an abort or an
//! OOM kill.
//!
//! The limit, first match wins:
//! 1. [`set_host_limit`] (the caller; process-wide),
//! 2. the environment variable [`ENV_VAR`] (`FORGE_MAX_HOST_MEMORY=64G`: a size as
//!    [`crate::checkpoint::memory::parse_size`] reads it, `64GiB`/`64G` binary, `64GB` decimal, or plain bytes),
//! 3. [`SAFETY_FRACTION`] of the memory this process can still get: `MemAvailable` from
//!    `/proc/meminfo` (`MemTotal` when the kernel has no `MemAvailable`), lowered to what the
//!    cgroup allows (`memory.max − memory.current`, v2 or v1) in a container,
//! 4. [`FALLBACK_LIMIT`] where none of that can be read (not Linux).
//!
//! The machine's figure is read at every check, so it follows what is already in use. A
//! check covers one operation's buffers together (their sum), since memory from `calloc` is
//! not counted as used until it is touched.

use crate::checkpoint::memory::{human_bytes, mem_available, mem_total, parse_size};
use crate::{ForgeError, Result};
use std::sync::Mutex;

/// Environment variable that sets the budget in bytes (`8G`, `512M`, `1073741824`).
pub const ENV_VAR: &str = "FORGE_MAX_HOST_MEMORY";

/// Fraction of the available memory one operation may ask for: the rest is headroom for the
/// allocator, the page cache and other processes.
pub const SAFETY_FRACTION: f64 = 0.8;

/// The budget where the machine's memory cannot be read: 8 GiB.
pub const FALLBACK_LIMIT: u64 = 8 << 30;

static OVERRIDE: Mutex<Option<u64>> = Mutex::new(None);

/// The budget in force and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLimit {
    /// Bytes one operation may allocate.
    pub bytes: u64,
    /// Where the figure came from, for messages.
    pub origin: String,
}

/// Sets the budget for the whole process (`None`: back to the environment / machine).
pub fn set_host_limit(bytes: Option<u64>) {
    // A poisoned lock only means another thread panicked while holding it; the value is a
    // plain Option and still valid.
    let mut guard = OVERRIDE.lock().unwrap_or_else(|p| p.into_inner());
    *guard = bytes;
}

/// The budget now (see the module documentation). An unparsable [`ENV_VAR`] is an error.
pub fn host_limit() -> Result<HostLimit> {
    let set = *OVERRIDE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bytes) = set {
        return Ok(HostLimit { bytes, origin: "set by the caller (budget::set_host_limit)".into() });
    }
    if let Ok(v) = std::env::var(ENV_VAR) {
        let bytes = parse_size(&v).ok_or_else(|| {
            ForgeError::Config(format!(
                "{ENV_VAR}={v:?} is not a size: give bytes, optionally with a unit (e.g. 64G or 64GiB, 64GB = 64·10⁹)"
            ))
        })?;
        return Ok(HostLimit { bytes, origin: format!("{ENV_VAR}={v}") });
    }
    Ok(machine_limit())
}

/// `Ok` when `requested` bytes (`None`: the size overflowed) fit the budget, else
/// [`ForgeError::OutOfMemory`] naming `what`, the bytes and the limit.
pub fn check(requested: Option<u64>, what: &str) -> Result<()> {
    let limit = host_limit()?;
    match requested {
        Some(b) if b <= limit.bytes => Ok(()),
        _ => {
            Err(ForgeError::OutOfMemory { what: what.to_string(), requested, limit: limit.bytes, origin: limit.origin })
        }
    }
}

/// The sum of the buffers of one operation, each a product of dimensions, with overflow
/// tracked (an overflowing size is reported as such, never wrapped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    total: Option<u64>,
}

impl Request {
    /// Nothing yet.
    pub fn new() -> Self {
        Request { total: Some(0) }
    }

    /// Adds a buffer of `T` with the given dimensions (`Π dims` elements).
    pub fn array<T>(self, dims: &[usize]) -> Self {
        self.bytes(std::mem::size_of::<T>(), dims)
    }

    /// Adds `elem_size · Π dims` bytes.
    pub fn bytes(self, elem_size: usize, dims: &[usize]) -> Self {
        let add = dims.iter().try_fold(elem_size as u64, |acc, &d| acc.checked_mul(d as u64));
        Request { total: self.total.zip(add).and_then(|(t, a)| t.checked_add(a)) }
    }

    /// This request and `other` together.
    pub fn plus(self, other: Request) -> Self {
        Request { total: self.total.zip(other.total).and_then(|(a, b)| a.checked_add(b)) }
    }

    /// Every buffer `k` times (e.g. one per worker thread).
    pub fn times(self, k: usize) -> Self {
        Request { total: self.total.and_then(|t| t.checked_mul(k as u64)) }
    }

    /// The total in bytes, `None` if it overflowed `u64`.
    pub fn total(self) -> Option<u64> {
        self.total
    }

    /// [`check`]s the total against the budget.
    pub fn check(self, what: &str) -> Result<()> {
        check(self.total, what)
    }
}

/// `Π dims` as a `usize` element count, or [`ForgeError::Overflow`] naming `what`.
pub fn elements(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| ForgeError::Overflow(format!("{what}: {dims:?} has more elements than usize can count")))
}

/// `origin` of a checkpoint run's budget (`RunOptions::max_host_memory`, which the `forge`
/// command's `--max-host-memory` sets): its steps' estimates are checked against it up front.
pub const RUN_BUDGET_ORIGIN: &str = "the run's budget, --max-host-memory";

/// The message of [`ForgeError::OutOfMemory`].
pub(crate) fn describe_oom(what: &str, requested: Option<u64>, limit: u64, origin: &str) -> String {
    let asked = match requested {
        Some(b) => format!("needs {}", human(b)),
        None => "needs more than 2^64 bytes (the size computation overflows)".to_string(),
    };
    let advice = if origin == RUN_BUDGET_ORIGIN {
        "Raise --max-host-memory if the machine really has the memory, or exclude it from quantization".to_string()
    } else {
        format!("Use a smaller input, or set {ENV_VAR} (e.g. {ENV_VAR}=64G) if the machine really has the memory")
    };
    format!(
        "{what} {asked} of host memory, more than the budget of {} ({origin}); nothing was allocated. {advice}",
        human(limit)
    )
}

/// "1234567 bytes (1.23 MB)": the exact figure, and a readable one.
fn human(b: u64) -> String {
    if b < 1000 {
        format!("{b} bytes")
    } else {
        format!("{b} bytes ({})", human_bytes(b))
    }
}

/// [`SAFETY_FRACTION`] of what this process can still get, or [`FALLBACK_LIMIT`].
fn machine_limit() -> HostLimit {
    let (mut avail, mut origin) = match (mem_available(), mem_total()) {
        (Some(a), _) => (a, "MemAvailable"),
        (None, Some(t)) => (t, "MemTotal"),
        (None, None) => {
            return HostLimit {
                bytes: FALLBACK_LIMIT,
                origin: format!("the default {FALLBACK_LIMIT} bytes: this machine's memory could not be read"),
            }
        }
    };
    if let Some(room) = cgroup_room() {
        if room < avail {
            avail = room;
            origin = "the cgroup's memory.max − memory.current";
        }
    }
    let bytes = (avail as f64 * SAFETY_FRACTION) as u64;
    HostLimit { bytes, origin: format!("{SAFETY_FRACTION} × {origin} ({})", human_bytes(avail)) }
}

/// Memory left to this process's cgroup (v2, else v1), if it has a limit.
fn cgroup_room() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let v2 = read("/sys/fs/cgroup/memory.max").zip(read("/sys/fs/cgroup/memory.current"));
    let v1 =
        || read("/sys/fs/cgroup/memory/memory.limit_in_bytes").zip(read("/sys/fs/cgroup/memory/memory.usage_in_bytes"));
    let (max, current) = v2.or_else(v1)?;
    // v1 reports "no limit" as a number near i64::MAX.
    (max < (1u64 << 62)).then(|| max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_sum_and_overflow() {
        let r = Request::new().array::<f32>(&[3, 5]).bytes(1, &[7]).times(2);
        assert_eq!(r.total(), Some(2 * (60 + 7)));
        assert_eq!(Request::new().array::<f64>(&[1 << 32, 1 << 32]).total(), None);
        assert_eq!(Request::new().array::<u8>(&[usize::MAX]).times(2).total(), None);
    }
}
