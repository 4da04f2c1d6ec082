//! The PTX build step (the role Rust-CUDA's `cuda_builder` plays, docs/design.md §6).
//!
//! Called from a `build.rs`: runs the pinned nightly's `cargo rustc` on a `#![no_std]`
//! kernels crate for `nvptx64-nvidia-cuda` with `-Zbuild-std=core` and `--emit=asm`, which
//! makes rustc's LLVM NVPTX backend write PTX directly (no linker involved). Every failure is
//! returned as a message that says what is missing, for the build script to turn into a
//! build error; nothing is skipped silently.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles a kernels crate to one PTX module.
pub struct PtxBuilder {
    crate_dir: PathBuf,
    arch: String,
    launch_bounds: Vec<(String, u32, u32)>,
    features: Vec<String>,
}

impl PtxBuilder {
    /// `crate_dir` holds the kernels crate's `Cargo.toml`.
    pub fn new(crate_dir: impl Into<PathBuf>) -> Self {
        PtxBuilder {
            crate_dir: crate_dir.into(),
            arch: "sm_80".into(),
            launch_bounds: Vec::new(),
            features: Vec::new(),
        }
    }

    /// Enables a cargo feature of the kernels crate.
    pub fn feature(mut self, name: &str) -> Self {
        self.features.push(name.into());
        self
    }

    /// Declares CUDA's `__launch_bounds__(max_threads, min_blocks)` for kernel `entry`
    /// (PTX `.maxntid` / `.minnctapersm`, which rustc cannot emit): the assembler then keeps
    /// the kernel's registers within what `min_blocks` resident blocks per SM allow.
    pub fn launch_bounds(mut self, entry: &str, max_threads: u32, min_blocks: u32) -> Self {
        self.launch_bounds.push((entry.into(), max_threads, min_blocks));
        self
    }

    /// The PTX target (`sm_80` by default: runs on A100, H100, H200, Ada, Blackwell via JIT).
    pub fn arch(mut self, arch: &str) -> Self {
        self.arch = arch.into();
        self
    }

    /// Builds the crate under `target_dir` and returns the PTX text.
    pub fn build(&self, target_dir: &Path) -> Result<String, String> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = self.crate_dir.join("Cargo.toml");
        let mut cmd = Command::new(&cargo);
        cmd.arg("rustc")
            .arg("--release")
            .arg("--target=nvptx64-nvidia-cuda")
            .arg("-Zbuild-std=core")
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target_dir);
        if !self.features.is_empty() {
            cmd.arg("--features").arg(self.features.join(","));
        }
        cmd.arg("--").arg(format!("-Ctarget-cpu={}", self.arch)).arg("--emit=asm");
        // The host build's flags (coverage, sanitizers, target features) must not leak into
        // the device build.
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_BUILD_RUSTFLAGS",
            "RUSTC_WORKSPACE_WRAPPER",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
        ] {
            cmd.env_remove(var);
        }
        let out = cmd.output().map_err(|e| format!("could not run `{cargo}` to build the GPU kernels: {e}"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let hint = if stderr.contains("rust-src") || stderr.contains("build-std") {
                "\nhint: the pinned nightly needs the rust-src component \
                 (`rustup toolchain install` in the project root installs it from rust-toolchain.toml)"
            } else if stderr.contains("-Z") || stderr.contains("nightly") {
                "\nhint: the kernels need the pinned nightly toolchain from rust-toolchain.toml"
            } else {
                ""
            };
            return Err(format!(
                "building the GPU kernels ({}) for nvptx64-nvidia-cuda failed:\n{stderr}{hint}",
                manifest.display()
            ));
        }
        let ptx_path = find_ptx(&target_dir.join("nvptx64-nvidia-cuda/release/deps"), &self.crate_name()?)?;
        let ptx = std::fs::read_to_string(&ptx_path).map_err(|e| format!("reading {}: {e}", ptx_path.display()))?;
        check_self_contained(&ptx)?;
        self.launch_bounds
            .iter()
            .try_fold(ptx, |ptx, (entry, threads, blocks)| with_launch_bounds(&ptx, entry, *threads, *blocks))
    }

    fn crate_name(&self) -> Result<String, String> {
        let manifest = self.crate_dir.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).map_err(|e| format!("reading {}: {e}", manifest.display()))?;
        text.lines()
            .find_map(|l| {
                let l = l.trim();
                let rest = l.strip_prefix("name")?.trim_start().strip_prefix('=')?;
                Some(rest.trim().trim_matches('"').replace('-', "_"))
            })
            .ok_or_else(|| format!("no package name in {}", manifest.display()))
    }
}

/// The newest `<crate>-<hash>.s` in `deps` (stale hashes from older builds may remain).
fn find_ptx(deps: &Path, crate_name: &str) -> Result<PathBuf, String> {
    let prefix = format!("{crate_name}-");
    let entries = std::fs::read_dir(deps).map_err(|e| format!("reading {}: {e}", deps.display()))?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(&prefix) && name.ends_with(".s")
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .ok_or_else(|| format!("the kernels build wrote no PTX ({prefix}*.s) in {}", deps.display()))
}

/// `--emit=asm` links nothing: a function or static of another crate that was not inlined
/// into the kernels crate stays an unresolved `.extern` and would fail only when the driver
/// loads the module.
fn check_self_contained(ptx: &str) -> Result<(), String> {
    let externs: Vec<&str> = ptx
        .lines()
        .filter(|l| {
            // `.extern .shared` is how a kernel declares its dynamic shared memory; anything
            // else extern is a symbol the driver would have to resolve.
            let l = l.trim_start();
            l.starts_with(".extern") && !l.starts_with(".extern .shared")
        })
        .collect();
    if externs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the kernels PTX refers to symbols it does not contain (use #[inline] functions and \
             `const` tables in the shared crates): {externs:?}"
        ))
    }
}

/// Every `.entry` of a PTX module with its parameter types in order (`.u64 .ptr`, `.u32`,
/// `.f32`, `.f64`, …: the text between `.param` and the parameter name, alignment dropped).
pub fn entries(ptx: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = ptx;
    while let Some(at) = rest.find(".entry ") {
        let after = &rest[at + ".entry ".len()..];
        let Some(open) = after.find('(') else { break };
        let name = after[..open].trim().to_string();
        let Some(close) = after[open..].find(')') else { break };
        let params = after[open + 1..open + close]
            .split(',')
            .filter_map(|p| {
                let words: Vec<&str> =
                    p.split_whitespace().filter(|w| *w != ".align" && w.parse::<u32>().is_err()).collect();
                // [".param", type words..., name]
                (words.len() >= 3 && words[0] == ".param").then(|| words[1..words.len() - 1].join(" "))
            })
            .collect();
        out.push((name, params));
        rest = &after[open + close..];
    }
    out
}

/// Checks a PTX module against the table of kernels the host launches: every expected entry
/// exists with exactly the expected parameter types, and the module has no other entry.
pub fn check_entries(ptx: &str, expected: &[(&str, Vec<&str>)]) -> Result<(), String> {
    let found = entries(ptx);
    let mut problems = Vec::new();
    for (name, params) in expected {
        match found.iter().find(|(n, _)| n == name) {
            None => problems.push(format!("kernel `{name}` is in the table but not in the PTX")),
            Some((_, got)) if got != params => {
                problems.push(format!("kernel `{name}`: the PTX has parameters {got:?}, the table says {params:?}"))
            }
            Some(_) => {}
        }
    }
    for (name, _) in &found {
        if !expected.iter().any(|(n, _)| n == name) {
            problems.push(format!("the PTX has an entry `{name}` that the kernel table lacks"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("the kernels PTX does not match forge-kernel-abi's table:\n  {}", problems.join("\n  ")))
    }
}

/// Inserts `.maxntid` / `.minnctapersm` after the parameter list of `.entry name(`.
fn with_launch_bounds(ptx: &str, entry: &str, threads: u32, blocks: u32) -> Result<String, String> {
    let header = format!(".entry {entry}(");
    let start = ptx.find(&header).ok_or_else(|| format!("no kernel `{entry}` in the PTX for its launch bounds"))?;
    // The parameter list ends at the first line that is just `)`.
    let close = ptx[start..]
        .find("\n)\n")
        .map(|i| start + i + 3)
        .ok_or_else(|| format!("unexpected PTX layout after `.entry {entry}(`"))?;
    Ok(format!("{}.maxntid {threads}, 1, 1\n.minnctapersm {blocks}\n{}", &ptx[..close], &ptx[close..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_bounds_go_between_the_parameters_and_the_body() {
        let ptx = ".visible .entry k(\n\t.param .u32 k_param_0\n)\n{\n\tret;\n}\n";
        let out = with_launch_bounds(ptx, "k", 160, 2).unwrap();
        assert_eq!(
            out,
            ".visible .entry k(\n\t.param .u32 k_param_0\n)\n.maxntid 160, 1, 1\n.minnctapersm 2\n{\n\tret;\n}\n"
        );
        assert!(with_launch_bounds(ptx, "other", 1, 1).is_err());
    }

    #[test]
    fn entries_are_checked_against_the_table() {
        let ptx = ".visible .entry k(\n\t.param .u64 .ptr .align 1 k_param_0,\n\t.param .u32 k_param_1\n)\n{\n}\n\
                   .visible .entry j(\n\t.param .f64 j_param_0\n)\n{\n}\n";
        assert_eq!(
            entries(ptx),
            vec![
                ("k".to_string(), vec![".u64 .ptr".to_string(), ".u32".to_string()]),
                ("j".to_string(), vec![".f64".to_string()])
            ]
        );
        assert!(check_entries(ptx, &[("k", vec![".u64 .ptr", ".u32"]), ("j", vec![".f64"])]).is_ok());
        // A swapped parameter kind, a missing entry and an extra entry are all reported.
        assert!(check_entries(ptx, &[("k", vec![".u32", ".u64 .ptr"]), ("j", vec![".f64"])]).is_err());
        assert!(check_entries(ptx, &[("k", vec![".u64 .ptr", ".u32"])]).is_err());
        assert!(check_entries(ptx, &[("k", vec![".u64 .ptr", ".u32"]), ("j", vec![".f64"]), ("x", vec![])]).is_err());
    }
}
