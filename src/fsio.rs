//! Files in and out, safely.
//!
//! Output: [`write_atomic`] writes to a temporary file in the target's own directory
//! (`.forge-tmp.<pid>.<n>.<name>`), `fsync`s it, renames it over the target and `fsync`s the
//! directory, so a reader (or a crash) sees the old file or the whole new one, never part of
//! it. [`prepare_output`] checks a target before any compute starts (a directory, a missing
//! parent, an unwritable directory are errors up front) and removes stale temporary files of
//! ours there: only regular files named with [`TEMP_PREFIX`] whose process is gone and which
//! were not modified for [`STALE_AGE`]. Nothing else is ever deleted.
//!
//! Input: [`open_regular`] refuses FIFOs, devices, sockets and directories without blocking
//! ([`ForgeError::NotRegularFile`]): the path is `stat`ed before it is opened, the open is
//! non-blocking, and the open descriptor is `fstat`ed again.

use crate::{ForgeError, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Every temporary file this crate creates starts with this (hidden on Unix).
pub const TEMP_PREFIX: &str = ".forge-tmp.";

/// A temporary file of a dead process is removed only once it has not been modified for
/// this long (a process in another PID namespace may look dead from here while it writes).
pub const STALE_AGE: Duration = Duration::from_secs(120);

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ForgeError + '_ {
    move |source| ForgeError::Io { path: path.display().to_string(), source }
}

fn invalid(path: &Path, msg: String) -> ForgeError {
    ForgeError::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, msg),
    }
}

/// What kind of file `m` describes, for messages.
fn kind(m: &std::fs::Metadata) -> &'static str {
    let ft = m.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() || ft.is_block_device() {
            return "a device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// The directory a target file goes to (its temporary file is created there too, so the
/// rename is atomic).
pub fn output_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Opens `path` for reading if it is a regular file (symbolic links followed, as in a
/// Hugging Face cache); FIFOs, devices, sockets and directories are refused with
/// [`ForgeError::NotRegularFile`] without blocking. The path is checked before the open, the
/// open is non-blocking, and the check is repeated on the open descriptor, so a file swapped
/// for a FIFO in between is still refused. Returns the file and its length.
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let not_regular = |m: &std::fs::Metadata| ForgeError::NotRegularFile {
        path: path.display().to_string(),
        kind: kind(m).to_string(),
    };
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    let mut opts = OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO for reading blocks until a writer appears; non-blocking it returns
        // at once and fstat below refuses it. Regular files ignore the flag.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    Ok((file, meta.len()))
}

/// Checks that `target` can be written before any work is done, and removes stale temporary
/// files of ours from its directory. Errors: `target` does not name a file, its directory is
/// missing or not a directory or not writable, or `target` exists and is not a regular file
/// (a directory, a FIFO, a device, a symbolic link: replacing those would surprise).
pub fn prepare_output(target: &Path) -> Result<()> {
    let name = target.file_name().ok_or_else(|| invalid(target, "does not name a file".into()))?;
    if name.to_string_lossy().starts_with(TEMP_PREFIX) {
        return Err(invalid(target, format!("names start with {TEMP_PREFIX} are reserved for temporary files")));
    }
    let dir = output_dir(target);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(m) => return Err(invalid(target, format!("its directory {} is {}", dir.display(), kind(&m)))),
        Err(e) => {
            return Err(ForgeError::Io {
                path: target.display().to_string(),
                source: std::io::Error::new(e.kind(), format!("its directory {} is not usable: {e}", dir.display())),
            })
        }
    }
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_file() => {}
        Ok(m) => return Err(invalid(target, format!("exists and is {}; refusing to replace it", kind(&m)))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(target)(e)),
    }
    remove_stale_temps(&dir)?;
    // The only reliable writability test (permissions, read-only mounts, ACLs, quotas):
    // create a temporary file of ours and remove it.
    let probe = temp_path(&dir, "probe");
    OpenOptions::new().write(true).create_new(true).open(&probe).map_err(|e| ForgeError::Io {
        path: target.display().to_string(),
        source: std::io::Error::new(e.kind(), format!("cannot create files in {}: {e}", dir.display())),
    })?;
    std::fs::remove_file(&probe).map_err(io_err(&probe))?;
    Ok(())
}

/// A fresh temporary path in `dir` for `name`: `.forge-tmp.<pid>.<n>.<name>`.
fn temp_path(dir: &Path, name: &str) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{TEMP_PREFIX}{}.{n}.{name}", std::process::id()))
}

/// The pid in a name made by [`temp_path`].
fn temp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    let (pid, rest) = rest.split_once('.')?;
    let (n, _) = rest.split_once('.')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Whether process `pid` may still be running (when in doubt: yes).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(unix)]
    {
        let Ok(p) = libc::pid_t::try_from(pid) else { return true };
        if p <= 0 {
            return true;
        }
        // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
        let r = unsafe { libc::kill(p, 0) };
        // EPERM: it exists but belongs to someone else.
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// Removes temporary files of ours in `dir` left by processes that are gone (regular files
/// named `.forge-tmp.<pid>.<n>.*`, pid not running, unmodified for [`STALE_AGE`]); returns
/// what was removed. Anything else, and anything in doubt, is left alone.
pub fn remove_stale_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_pid) else { continue };
        let path = entry.path();
        // symlink_metadata: never follow a link out of the directory.
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if !meta.is_file() || process_alive(pid) {
            continue;
        }
        let old = meta.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age >= STALE_AGE);
        if old && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Removes the temporary file unless the write was committed.
struct TempGuard {
    path: PathBuf,
    committed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `target` atomically: `write` fills a temporary file in the same directory, which is
/// then flushed, `fsync`ed and renamed over `target`, and the directory is `fsync`ed. On any
/// error (including one from `write`) the temporary file is removed and `target` is as it
/// was.
pub fn write_atomic(target: &Path, write: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let name = target.file_name().ok_or_else(|| invalid(target, "does not name a file".into()))?;
    if let Ok(m) = std::fs::symlink_metadata(target) {
        if !m.is_file() {
            return Err(invalid(target, format!("exists and is {}; refusing to replace it", kind(&m))));
        }
    }
    let dir = output_dir(target);
    let tmp = temp_path(&dir, &name.to_string_lossy());
    let file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io_err(&tmp))?;
    let mut guard = TempGuard { path: tmp.clone(), committed: false };
    let mut w = BufWriter::new(file);
    write(&mut w)?;
    w.flush().map_err(io_err(&tmp))?;
    let file = w.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    rename_durable(&tmp, target)?;
    guard.committed = true;
    Ok(())
}

/// [`write_atomic`] of bytes already in memory.
pub fn write_file_atomic(target: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(target, |w| w.write_all(bytes).map_err(io_err(target)))
}

/// Renames `from` (a file or a directory whose contents are already synced) to `to` and
/// `fsync`s the directory of `to`, so the rename itself survives a crash: the commit step of
/// [`write_atomic`] and of the checkpoint writer's output directory.
pub fn rename_durable(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(io_err(to))?;
    sync_dir(&output_dir(to))
}

/// `fsync` of a directory, so a rename in it (or a file created in it) survives a crash.
/// Filesystems that cannot sync a directory (EINVAL) are accepted.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(io_err(dir))?;
        match d.sync_all() {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            Err(e) => Err(io_err(dir)(e)),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_round_trip_and_foreign_names_do_not_parse() {
        let p = temp_path(Path::new("/x"), "a.safetensors");
        let name = p.file_name().and_then(|n| n.to_str()).map(str::to_owned).unwrap_or_default();
        assert_eq!(temp_pid(&name), Some(std::process::id()));
        for foreign in [".forge-tmp.", ".forge-tmp.abc.1.x", ".forge-tmp.12", ".forge-tmp.12.x.y", "a.12.3.b", ".x.tmp"]
        {
            assert_eq!(temp_pid(foreign), None, "{foreign}");
        }
    }
}
