//! The output directory: written in a hidden temporary directory beside the target and
//! renamed into place only when complete, with a manifest that lets `--resume` continue
//! after a crash without redoing finished work.
//!
//! The manifest (`forge-manifest.jsonl` in the temporary directory) is a JSON-lines log:
//! a header with the plan's fingerprint, then one record per finished step (the xxh3-64 of
//! each output tensor it wrote, and its statistics) and one per finished shard. Records are
//! appended only after the shard data they describe has been `fdatasync`ed, in batches.
//! On resume the header must match the new plan's fingerprint, a torn last line is
//! ignored, and a step of a shard not yet finished counts as done only if the bytes in the
//! shard still hash to what the record says.

use super::plan::Plan;
use crate::fsio::{self, open_regular};
use crate::{ForgeError, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The manifest's file name inside the temporary directory.
pub const MANIFEST: &str = "forge-manifest.jsonl";
const LOCK: &str = "forge.lock";
const MANIFEST_VERSION: u32 = 1;

/// Statistics of one quantized weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberStats {
    /// The module.
    pub module: String,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// `"rtn"`, `"gptq"`, or `"rtn (no hessian)"`.
    pub method: String,
    /// `‖Q − W‖² / ‖W‖²` over the weight.
    pub rel_weight_error: f64,
    /// GPTQ's loss `Σ_rows Σ_t err²/2` (GPTQ only).
    pub gptq_loss: Option<f64>,
    /// What the pre-step had to do (dead columns, retries, identity fallback) and the layer's
    /// other warnings (asymmetric Hessian, flushed groups).
    pub flags: Vec<String>,
}

/// Statistics of one finished step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemStats {
    /// The step's label.
    pub label: String,
    /// Its decoder layer.
    pub layer: String,
    /// `"quantize"`, `"copy"` or `"fp8->bf16"`.
    pub action: String,
    /// Wall time.
    pub seconds: f64,
    /// Bytes read.
    pub input_bytes: u64,
    /// Bytes written.
    pub output_bytes: u64,
    /// Quantized weights.
    pub members: Vec<MemberStats>,
}

#[derive(Serialize, Deserialize)]
struct ManifestHeader {
    forge_manifest: u32,
    fingerprint: String,
    items: usize,
    shards: Vec<(String, u64)>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Record {
    Item { item: usize, hashes: Vec<(usize, String)>, stats: ItemStats },
    ShardDone { shard_done: usize },
}

/// An output directory being written.
pub struct OutputDir {
    target: PathBuf,
    tmp: PathBuf,
    shard_files: Vec<Option<File>>,
    dirty: BTreeSet<usize>,
    syncer: Syncer,
    pending: Vec<String>,
    _lock: File,
}

/// One background checkpoint: shard files to `fdatasync`, then manifest lines to append and
/// sync (only after the data they describe is durable).
struct SyncJob {
    files: Vec<File>,
    lines: String,
}

/// The thread that makes checkpoints durable while the writer goes on writing (an
/// `fdatasync` of a layer's output waits for the disk; the pipeline need not). At most one
/// job is in flight: queuing the next waits for the previous one and reports its error.
struct Syncer {
    tx: Option<std::sync::mpsc::SyncSender<SyncJob>>,
    results: std::sync::mpsc::Receiver<Result<()>>,
    in_flight: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Syncer {
    fn new(mut manifest: File, manifest_path: PathBuf, tmp: PathBuf) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<SyncJob>(0);
        let (done_tx, results) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("forge-sync".into())
            .spawn(move || {
                for job in rx {
                    let r = (|| {
                        for f in &job.files {
                            f.sync_data().map_err(io_err(&tmp))?;
                        }
                        if !job.lines.is_empty() {
                            manifest.write_all(job.lines.as_bytes()).map_err(io_err(&manifest_path))?;
                            manifest.sync_data().map_err(io_err(&manifest_path))?;
                        }
                        Ok(())
                    })();
                    if done_tx.send(r).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| ForgeError::Io { path: "the sync thread".into(), source: e })?;
        Ok(Syncer { tx: Some(tx), results, in_flight: false, thread: Some(thread) })
    }

    /// Waits for the job in flight, if any, and returns its outcome.
    fn wait(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.in_flight) {
            return Ok(());
        }
        self.results.recv().map_err(|_| ForgeError::Internal("the sync thread ended early".into()))?
    }

    /// Queues `job` after the one in flight.
    fn queue(&mut self, job: SyncJob) -> Result<()> {
        self.wait()?;
        let tx = self.tx.as_ref().ok_or_else(|| ForgeError::Internal("the sync thread is gone".into()))?;
        tx.send(job).map_err(|_| ForgeError::Internal("the sync thread ended early".into()))?;
        self.in_flight = true;
        Ok(())
    }
}

impl Drop for Syncer {
    /// A sync in flight finishes before the output directory can go away.
    fn drop(&mut self) {
        self.tx = None;
        let _ = self.wait();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a previous run left that is still valid.
#[derive(Debug, Default)]
pub struct Resumed {
    /// Finished steps with their statistics.
    pub items: BTreeMap<usize, ItemStats>,
    /// Finished shards.
    pub shards: BTreeSet<usize>,
    /// Recorded steps whose bytes no longer matched (they are redone).
    pub invalid: usize,
    /// Recorded xxh3-64 (hex) of each output tensor written.
    hashes: BTreeMap<usize, String>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ForgeError + '_ {
    move |source| ForgeError::Io { path: path.display().to_string(), source }
}

/// `.<name>.forge-partial` beside `target`.
pub fn temp_dir_for(target: &Path) -> Result<PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| ForgeError::Config(format!("output path {} does not name a directory", target.display())))?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(".{}.forge-partial", name.to_string_lossy())))
}

/// Checks that `target` can receive the output: absent, or an empty directory.
pub fn check_target(target: &Path) -> Result<()> {
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(target)(e)),
        Ok(m) if m.is_dir() => {
            let mut entries = std::fs::read_dir(target).map_err(io_err(target))?;
            if entries.next().is_some() {
                Err(ForgeError::Config(format!(
                    "output directory {} already exists and is not empty; choose another path or remove it",
                    target.display()
                )))
            } else {
                Ok(())
            }
        }
        Ok(_) => Err(ForgeError::Config(format!(
            "output path {} exists and is not a directory; choose another path",
            target.display()
        ))),
    }
}

impl OutputDir {
    /// Starts (or with `resume`, continues) writing `plan` to `target`. Returns the directory
    /// and what a previous run already finished.
    pub fn open(target: &Path, plan: &Plan, resume: bool) -> Result<(OutputDir, Resumed)> {
        check_target(target)?;
        let tmp = temp_dir_for(target)?;
        if let Some(parent) = tmp.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let exists = tmp.exists();
        if exists && !resume {
            return Err(ForgeError::Config(format!(
                "an interrupted run left its partial output at {}: pass --resume to continue it, or delete it to start over",
                tmp.display()
            )));
        }
        if !exists {
            std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        }
        let lock_path = tmp.join(LOCK);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(ForgeError::Config(format!(
                "another forge process is writing {} (its lock {} is held)",
                target.display(),
                lock_path.display()
            )));
        }
        let manifest_path = tmp.join(MANIFEST);
        let header = ManifestHeader {
            forge_manifest: MANIFEST_VERSION,
            fingerprint: plan.fingerprint.clone(),
            items: plan.items.len(),
            shards: plan.shards.iter().map(|s| (s.file_name.clone(), s.size)).collect(),
        };
        let mut resumed = Resumed::default();
        let fresh = !manifest_path.exists();
        if !fresh {
            resumed = read_manifest(&manifest_path, &header)?;
        }
        let mut manifest = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&manifest_path)
            .map_err(io_err(&manifest_path))?;
        if fresh {
            let line = serde_json::to_string(&header).map_err(|e| ForgeError::Config(e.to_string()))?;
            manifest.write_all(format!("{line}\n").as_bytes()).map_err(io_err(&manifest_path))?;
            manifest.sync_all().map_err(io_err(&manifest_path))?;
            fsio::sync_dir(&tmp)?;
        } else {
            // A torn last line from a crash: end it so new records start on their own line.
            manifest.write_all(b"\n").map_err(io_err(&manifest_path))?;
        }
        let syncer = Syncer::new(manifest, manifest_path.clone(), tmp.clone())?;
        let mut out = OutputDir {
            target: target.to_path_buf(),
            tmp,
            shard_files: (0..plan.shards.len()).map(|_| None).collect(),
            dirty: BTreeSet::new(),
            syncer,
            pending: Vec::new(),
            _lock: lock,
        };
        if !fresh {
            out.verify(plan, &mut resumed)?;
        }
        Ok((out, resumed))
    }

    /// The temporary directory.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Drops recorded steps of unfinished shards whose bytes no longer hash as recorded.
    fn verify(&mut self, plan: &Plan, resumed: &mut Resumed) -> Result<()> {
        // A finished shard must still be there at its full size.
        let gone: Vec<usize> = resumed
            .shards
            .iter()
            .copied()
            .filter(|&s| {
                plan.shards.get(s).is_none_or(|sp| {
                    std::fs::metadata(self.tmp.join(&sp.file_name)).map(|m| m.len() != sp.size).unwrap_or(true)
                })
            })
            .collect();
        for s in gone {
            resumed.shards.remove(&s);
        }
        let mut bad = Vec::new();
        for &item in resumed.items.keys() {
            let Some(it) = plan.items.get(item) else {
                bad.push(item);
                continue;
            };
            let shard = it.outputs.first().and_then(|&o| plan.outputs.get(o)).map(|t| t.shard);
            if shard.is_some_and(|s| resumed.shards.contains(&s)) {
                continue;
            }
            let mut ok = true;
            for &o in &it.outputs {
                let t = &plan.outputs[o];
                let path = self.tmp.join(&plan.shards[t.shard].file_name);
                match hash_region(&path, t.file_offset, t.nbytes) {
                    Ok(h) if Some(&h) == resumed.hashes.get(&o) => {}
                    _ => ok = false,
                }
            }
            if !ok {
                bad.push(item);
            }
        }
        resumed.invalid = bad.len();
        for b in bad {
            resumed.items.remove(&b);
        }
        Ok(())
    }

    /// The shard file, created at its full size with its header on first use.
    fn shard_file(&mut self, plan: &Plan, shard: usize) -> Result<&File> {
        let slot = self
            .shard_files
            .get_mut(shard)
            .ok_or_else(|| ForgeError::Config(format!("shard {shard} is not in the plan")))?;
        if slot.is_none() {
            let sp = &plan.shards[shard];
            let path = self.tmp.join(&sp.file_name);
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            f.set_len(sp.size).map_err(io_err(&path))?;
            f.write_all_at(&sp.header, 0).map_err(io_err(&path))?;
            *slot = Some(f);
        }
        slot.as_ref().ok_or_else(|| ForgeError::Config("shard file not open".into()))
    }

    /// Writes `bytes` at `offset` of output tensor `o` (pieces of a tensor may come in
    /// several calls).
    pub fn write(&mut self, plan: &Plan, o: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        let t = plan.outputs.get(o).ok_or_else(|| ForgeError::Config(format!("output tensor {o} not planned")))?;
        if offset + bytes.len() as u64 > t.nbytes {
            return Err(ForgeError::Shape(format!(
                "{}: {} bytes at {offset} overrun its planned {} bytes",
                t.spec.name,
                bytes.len(),
                t.nbytes
            )));
        }
        let (shard, at) = (t.shard, t.file_offset + offset);
        let path = self.tmp.join(&plan.shards[shard].file_name);
        let f = self.shard_file(plan, shard)?;
        // Large tensors in parallel pieces: one thread copies into the page cache at a few
        // GB/s, less than the rest of the pipeline delivers.
        const PIECE: usize = 8 << 20;
        if bytes.len() > PIECE {
            use rayon::prelude::*;
            bytes
                .par_chunks(PIECE)
                .enumerate()
                .try_for_each(|(i, c)| f.write_all_at(c, at + (i * PIECE) as u64))
                .map_err(io_err(&path))?;
        } else {
            f.write_all_at(bytes, at).map_err(io_err(&path))?;
        }
        start_writeback(f, at, bytes.len());
        self.dirty.insert(shard);
        Ok(())
    }

    /// Records a finished step (made durable by the next [`OutputDir::checkpoint`]).
    pub fn record_item(&mut self, item: usize, hashes: Vec<(usize, String)>, stats: ItemStats) -> Result<()> {
        let line = serde_json::to_string(&Record::Item { item, hashes, stats })
            .map_err(|e| ForgeError::Config(e.to_string()))?;
        self.pending.push(line);
        Ok(())
    }

    /// Finishes a shard: its data is synced and the fact recorded.
    pub fn finish_shard(&mut self, plan: &Plan, shard: usize) -> Result<()> {
        self.shard_file(plan, shard)?;
        self.checkpoint()?;
        if let Some(Some(f)) = self.shard_files.get_mut(shard) {
            let path = self.tmp.join(&plan.shards[shard].file_name);
            f.sync_all().map_err(io_err(&path))?;
        }
        if let Some(slot) = self.shard_files.get_mut(shard) {
            *slot = None;
        }
        let line = serde_json::to_string(&Record::ShardDone { shard_done: shard })
            .map_err(|e| ForgeError::Config(e.to_string()))?;
        self.pending.push(line);
        self.checkpoint()
    }

    /// Makes everything written so far durable: shard data first, then the records that
    /// describe it. Returns when they are.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.checkpoint_in_background()?;
        self.syncer.wait()
    }

    /// [`OutputDir::checkpoint`] on the sync thread: returns at once (after the previous
    /// background checkpoint, whose error it reports), the writer goes on writing while the
    /// disk catches up. A crash before it completes loses only records not yet appended:
    /// their steps are redone on resume.
    pub fn checkpoint_in_background(&mut self) -> Result<()> {
        let mut files = Vec::with_capacity(self.dirty.len());
        for &s in &self.dirty {
            if let Some(Some(f)) = self.shard_files.get(s) {
                files.push(f.try_clone().map_err(io_err(&self.tmp))?);
            }
        }
        if files.is_empty() && self.pending.is_empty() {
            return Ok(());
        }
        let mut lines = self.pending.join("\n");
        if !lines.is_empty() {
            lines.push('\n');
        }
        self.syncer.queue(SyncJob { files, lines })?;
        self.dirty.clear();
        self.pending.clear();
        Ok(())
    }

    /// Writes a small file (index, config, summary) into the temporary directory, synced.
    /// Not through [`fsio::write_atomic`]: the whole directory is renamed into place at the
    /// commit, and a resumed run rewrites these files (a stray temporary file of a crashed
    /// write would end up in the output).
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.tmp.join(name);
        let mut f = File::create(&path).map_err(io_err(&path))?;
        f.write_all(bytes).map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))
    }

    /// Copies a file from the model directory (regular files only), synced.
    pub fn copy_file(&self, from: &Path, name: &str) -> Result<()> {
        let (mut src, _) = open_regular(from)?;
        let path = self.tmp.join(name);
        let mut f = File::create(&path).map_err(io_err(&path))?;
        std::io::copy(&mut src, &mut f).map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))
    }

    /// Removes the manifest and lock, syncs, and renames the directory into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        self.checkpoint()?;
        for f in self.shard_files.iter().flatten() {
            f.sync_all().map_err(io_err(&self.tmp))?;
        }
        self.shard_files.clear();
        for name in [MANIFEST, LOCK] {
            let p = self.tmp.join(name);
            std::fs::remove_file(&p).map_err(io_err(&p))?;
        }
        fsio::sync_dir(&self.tmp)?;
        check_target(&self.target)?;
        fsio::rename_durable(&self.tmp, &self.target)?;
        Ok(self.target.clone())
    }
}

/// Starts writing `len` bytes at `offset` of `f` back to the disk without waiting (Linux
/// `sync_file_range`), so the next checkpoint's `fdatasync` finds little left to write and
/// the disk works while the next steps compute. Advisory: errors change nothing but speed.
fn start_writeback(f: &File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) {
            // SAFETY: a plain syscall on an open descriptor; it reads no memory of ours.
            let _ = unsafe { libc::sync_file_range(f.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, offset, len);
}

/// xxh3-64 of `len` bytes at `offset` of `path`, hex.
fn hash_region(path: &Path, offset: u64, len: u64) -> Result<String> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; (len.min(8 << 20)) as usize];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], offset + done).map_err(io_err(path))?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(format!("{:016x}", h.digest()))
}

fn read_manifest(path: &Path, want: &ManifestHeader) -> Result<Resumed> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut lines = std::io::BufReader::new(f).lines();
    let first = lines.next().transpose().map_err(io_err(path))?.unwrap_or_default();
    let header: ManifestHeader = serde_json::from_str(&first)
        .map_err(|e| ForgeError::Resume(format!("{}: unreadable manifest header ({e})", path.display())))?;
    if header.forge_manifest != MANIFEST_VERSION {
        return Err(ForgeError::Resume(format!(
            "{} was written by another version of forge (manifest v{})",
            path.display(),
            header.forge_manifest
        )));
    }
    if header.fingerprint != want.fingerprint || header.shards != want.shards || header.items != want.items {
        return Err(ForgeError::Resume(format!(
            "the input model, the Hessians or the settings changed since the interrupted run (fingerprint {} then, {} now); \
             rerun with the same input and options, or delete {} to start over",
            header.fingerprint,
            want.fingerprint,
            path.parent().unwrap_or(path).display()
        )));
    }
    let mut r = Resumed::default();
    for line in lines {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        // A torn record (the crash came mid-write) is skipped: its step is redone.
        match serde_json::from_str::<Record>(&line) {
            Ok(Record::Item { item, hashes, stats }) => {
                for (o, h) in hashes {
                    r.hashes.insert(o, h);
                }
                r.items.insert(item, stats);
            }
            Ok(Record::ShardDone { shard_done }) => {
                r.shards.insert(shard_done);
            }
            Err(_) => continue,
        }
    }
    Ok(r)
}
