//! Files written whole: a hidden temporary file beside the destination
//! (`.<name>.<pid>-<n>.partial`), then a rename over it, so a process killed at any moment
//! leaves the value absent, old or new, never torn. The writer's folder store, the remote disk
//! cache and the class-count cache all write through here.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static TEMPORARY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique hidden name beside `path` (process id and a per-process counter).
pub(crate) fn temporary_sibling(path: &Path, suffix: &str) -> PathBuf {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("value");
    parent.join(format!(
        ".{name}.{}-{}.{suffix}",
        std::process::id(),
        TEMPORARY_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Writes `bytes` to `path` whole: a hidden temporary file beside it, then a rename (folders
/// are created as needed). Used by the writer's store, the disk cache and the class-count cache.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], fsync: bool) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let tmp = temporary_sibling(path, "partial");
    let attempt = || -> std::io::Result<()> {
        let mut file = match fs::File::create(&tmp) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(parent)?;
                fs::File::create(&tmp)?
            }
            other => other?,
        };
        file.write_all(bytes)?;
        if fsync {
            file.sync_all()?;
        }
        drop(file);
        fs::rename(&tmp, path)
    };
    attempt().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}
