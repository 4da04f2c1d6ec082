//! Host memory: the default budget (from `/proc/meminfo`) and the process's peak resident
//! set (`VmHWM` from `/proc/self/status`).

/// A `kB` field of a `/proc` file, in bytes.
fn proc_kb(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        kb.checked_mul(1024)
    })
}

/// `MemAvailable` in bytes (Linux), if known.
pub fn mem_available() -> Option<u64> {
    proc_kb("/proc/meminfo", "MemAvailable")
}

/// `MemTotal` in bytes (Linux), if known.
pub fn mem_total() -> Option<u64> {
    proc_kb("/proc/meminfo", "MemTotal")
}

/// The process's peak resident set (`VmHWM`) in bytes (Linux), if known.
pub fn peak_rss() -> Option<u64> {
    proc_kb("/proc/self/status", "VmHWM")
}

/// The default host-memory budget: half of `MemAvailable` (the rest is left to the page
/// cache that streams the checkpoint), or 8 GiB when it is unknown.
pub fn default_budget() -> u64 {
    mem_available().map_or(8 << 30, |a| a / 2)
}

/// Parses a size such as `5GB`, `512MiB`, `1.5G`, `1000000` (bytes). Decimal units are
/// powers of 1000 (`GB`), binary ones powers of 1024 (`GiB`); a bare `G`/`M`/`K` is binary.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = value * mult;
    (bytes.is_finite() && (0.0..1.8e19).contains(&bytes)).then_some(bytes as u64)
}

/// `1.23 GB` style (powers of 1000, as disk sizes are quoted).
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e12 {
        format!("{:.2} TB", b / 1e12)
    } else if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("64G"), Some(64 << 30));
        assert_eq!(parse_size("64GiB"), Some(64 << 30));
        assert_eq!(parse_size("64GB"), Some(64_000_000_000));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("5MB"), Some(5_000_000));
        assert_eq!(parse_size(" 2k "), Some(2048));
        assert_eq!(parse_size("1.5g"), Some(3 << 29));
        assert_eq!(parse_size("8B"), Some(8));
        for bad in ["", "abc", "-1", "G", "1e999", "NaN", "99999999999T", "1.5.2G", "5XB"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }
}
