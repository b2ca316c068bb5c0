//! A folder of fetched remote values, shared by processes: each value is one file named after
//! its URL, written whole (temporary file, then rename), so a reader sees a complete value or
//! none. A read refreshes the file's time; past the byte budget the least recently used files
//! are deleted (by whichever process notices).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use zarrs::storage::Bytes;

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;

/// The disk cache of one process (see the module documentation).
#[derive(Debug)]
pub struct DiskCache {
    root: PathBuf,
    budget: u64,
    /// Bytes held, as this process last counted (other processes add files too).
    used: AtomicU64,
    trimming: Mutex<()>,
}

fn files_under(dir: &Path, out: &mut Vec<(PathBuf, u64, SystemTime)>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            files_under(&entry.path(), out);
        } else if !entry.file_name().to_string_lossy().starts_with('.') {
            out.push((entry.path(), meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
        }
    }
}

impl DiskCache {
    /// Opens (creating) the cache folder `root` with a budget of `budget` bytes.
    pub fn open(root: &Path, budget: u64) -> Result<DiskCache> {
        fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let mut files = Vec::new();
        files_under(root, &mut files);
        Ok(DiskCache {
            root: root.to_path_buf(),
            budget,
            used: AtomicU64::new(files.iter().map(|f| f.1).sum()),
            trimming: Mutex::new(()),
        })
    }

    /// The file of `url`: `<root>/<scheme>/<host or bucket>/<path>`; `None` for a URL that
    /// does not map to a safe relative path.
    fn file_for(&self, url: &str) -> Option<PathBuf> {
        let (scheme, rest) = url.split_once("://")?;
        let mut path = self.root.join(scheme);
        for part in rest.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return None;
            }
            path.push(part);
        }
        Some(path)
    }

    /// The cached value of `url`, if any.
    pub fn get(&self, url: &str) -> Option<Bytes> {
        let file = self.file_for(url)?;
        let bytes = fs::read(&file).ok()?;
        // Recently used: moved to the back of the eviction order (best effort).
        if let Ok(f) = fs::File::options().write(true).open(&file) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(Bytes::from(bytes))
    }

    /// Stores the value of `url` (best effort: a full disk only means no caching).
    pub fn put(&self, url: &str, bytes: &[u8]) {
        let Some(file) = self.file_for(url) else { return };
        if bytes.len() as u64 > self.budget / 4 || write_atomic(&file, bytes, false).is_err() {
            return;
        }
        if self.used.fetch_add(bytes.len() as u64, Ordering::Relaxed) + bytes.len() as u64 > self.budget {
            self.trim();
        }
    }

    /// Deletes the least recently used files until the cache holds at most 90 % of its
    /// budget (counted afresh: other processes share the folder).
    pub fn trim(&self) {
        let Ok(_one) = self.trimming.try_lock() else { return };
        let mut files = Vec::new();
        files_under(&self.root, &mut files);
        files.sort_by_key(|f| f.2);
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        let target = self.budget / 10 * 9;
        for (path, size, _) in files {
            if total <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
        self.used.store(total, Ordering::Relaxed);
    }

    /// Bytes held now (walks the folder).
    pub fn size(&self) -> u64 {
        let mut files = Vec::new();
        files_under(&self.root, &mut files);
        files.iter().map(|f| f.1).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_the_least_recently_used_go_first() {
        let tmp = crate::test_fixtures::TempDir::new("disk-cache");
        let dir = tmp.join("cache");
        let cache = DiskCache::open(&dir, 1000).unwrap();
        assert!(cache.get("s3://b/k/0.0.0").is_none());
        cache.put("s3://b/k/0.0.0", &[1u8; 200]);
        assert_eq!(cache.get("s3://b/k/0.0.0").unwrap().len(), 200);
        assert!(cache.file_for("s3://b/../x").is_none(), "no escape from the folder");
        let old = SystemTime::now() - std::time::Duration::from_secs(100);
        fs::File::options()
            .write(true)
            .open(dir.join("s3/b/k/0.0.0"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        for i in 1..5 {
            cache.put(&format!("s3://b/k/0.0.{i}"), &[i as u8; 200]);
        }
        // 1000 bytes written with a budget of 1000: nothing evicted yet; one more trims to 900.
        cache.put("s3://b/k/0.0.5", &[5u8; 200]);
        assert!(cache.size() <= 900, "{}", cache.size());
        assert!(cache.get("s3://b/k/0.0.0").is_none(), "the oldest was evicted");
        assert_eq!(cache.get("s3://b/k/0.0.5").unwrap()[0], 5);
    }
}
