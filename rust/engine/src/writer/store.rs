//! Where the writer's bytes go: a zarrs storage adapter over [`FilesystemStore`] that makes
//! every value write atomic, so metadata and chunks go through zarrs' own array and group
//! code and a store with atomic puts (an object store) can take this adapter's place.
//!
//! Each `set` writes a hidden temporary file beside its destination
//! (`.<name>.<pid>-<n>.partial`) and renames it over the destination: a process killed at
//! any moment leaves each value absent, old or new, never torn. With `fsync` the data are
//! flushed to disk before the rename (durability across power loss; off by default, as a
//! flush per chunk costs 3–4× a buffered write here and far more on network filesystems).
//!
//! zarrs' own `AtomicWriteStorageAdapter` is not used: over a [`FilesystemStore`] it always
//! flushes, and it refuses to write while a `<key>.tmp` is left from an interrupted write, which
//! several processes writing one volume (or a re-run after a crash) would hit.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use zarrs::filesystem::FilesystemStore;
use zarrs::storage::byte_range::ByteRangeIterator;
use zarrs::storage::{
    store_set_partial_many, Bytes, ListableStorageTraits, MaybeBytesIterator, OffsetBytesIterator, ReadableStorageTraits, StorageError,
    StoreKey, StoreKeys, StoreKeysPrefixes, StorePrefix, WritableStorageTraits,
};

use crate::error::{Error, Result};

static TEMPORARY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique hidden name beside `path` (process id and a per-process counter).
pub(super) fn temporary_sibling(path: &Path, suffix: &str) -> PathBuf {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("value");
    parent.join(format!(
        ".{name}.{}-{}.{suffix}",
        std::process::id(),
        TEMPORARY_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Writes `bytes` to `path` whole: a hidden temporary file beside it, then a rename (folders
/// are created as needed). Used by the store and by the engine's other small files.
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

/// Whether a store key names zarr metadata rather than a chunk.
fn is_metadata_key(key: &StoreKey) -> bool {
    let name = key.as_str().rsplit('/').next().unwrap_or("");
    matches!(name, "zarr.json" | ".zarray" | ".zgroup" | ".zattrs")
}

/// The filesystem store rooted at one directory, with atomic (and optionally flushed) writes
/// and counters of the chunk values written.
#[derive(Debug)]
pub struct AtomicFileStore {
    inner: FilesystemStore,
    root: PathBuf,
    fsync: bool,
    chunks_written: AtomicU64,
    bytes_written: AtomicU64,
}

impl AtomicFileStore {
    /// A store rooted at `root` (created when missing).
    pub fn new(root: &Path, fsync: bool) -> Result<AtomicFileStore> {
        fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let inner = FilesystemStore::new(root).map_err(|e| Error::metadata(root, e))?;
        Ok(AtomicFileStore {
            inner,
            root: root.to_path_buf(),
            fsync,
            chunks_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        })
    }

    /// The directory the store is rooted at.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Chunk values written so far (metadata files not counted).
    pub fn chunks_written(&self) -> u64 {
        self.chunks_written.load(Ordering::Relaxed)
    }

    /// Bytes of the chunk values written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }
}

impl ReadableStorageTraits for AtomicFileStore {
    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> std::result::Result<MaybeBytesIterator<'a>, StorageError> {
        self.inner.get_partial_many(key, byte_ranges)
    }

    fn size_key(&self, key: &StoreKey) -> std::result::Result<Option<u64>, StorageError> {
        self.inner.size_key(key)
    }

    fn supports_get_partial(&self) -> bool {
        self.inner.supports_get_partial()
    }
}

impl ListableStorageTraits for AtomicFileStore {
    fn list(&self) -> std::result::Result<StoreKeys, StorageError> {
        self.inner.list()
    }

    fn list_prefix(&self, prefix: &StorePrefix) -> std::result::Result<StoreKeys, StorageError> {
        self.inner.list_prefix(prefix)
    }

    fn list_dir(&self, prefix: &StorePrefix) -> std::result::Result<StoreKeysPrefixes, StorageError> {
        self.inner.list_dir(prefix)
    }

    fn size_prefix(&self, prefix: &StorePrefix) -> std::result::Result<u64, StorageError> {
        self.inner.size_prefix(prefix)
    }
}

impl WritableStorageTraits for AtomicFileStore {
    fn set(&self, key: &StoreKey, value: Bytes) -> std::result::Result<(), StorageError> {
        write_atomic(&self.inner.key_to_fspath(key), &value, self.fsync)?;
        if !is_metadata_key(key) {
            self.chunks_written.fetch_add(1, Ordering::Relaxed);
            self.bytes_written.fetch_add(value.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn set_partial_many(&self, key: &StoreKey, offset_values: OffsetBytesIterator) -> std::result::Result<(), StorageError> {
        // Read, patch and write whole: a partial write in place could be torn.
        store_set_partial_many(self, key, offset_values)
    }

    fn erase(&self, key: &StoreKey) -> std::result::Result<(), StorageError> {
        self.inner.erase(key)
    }

    fn erase_prefix(&self, prefix: &StorePrefix) -> std::result::Result<(), StorageError> {
        self.inner.erase_prefix(prefix)
    }

    fn supports_set_partial(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_whole_and_leave_no_temporary() {
        let dir = std::env::temp_dir().join(format!("cellmap-store-test-{}", std::process::id()));
        for fsync in [false, true] {
            let _ = fs::remove_dir_all(&dir);
            let store = AtomicFileStore::new(&dir, fsync).unwrap();
            let key = StoreKey::new("a/0.0.0").unwrap();
            store.set(&key, Bytes::from_static(b"hello")).unwrap();
            store.set(&key, Bytes::from_static(b"world!")).unwrap();
            assert_eq!(fs::read(dir.join("a/0.0.0")).unwrap(), b"world!");
            assert_eq!(store.get(&key).unwrap().unwrap().as_ref(), b"world!");
            let names: Vec<_> = fs::read_dir(dir.join("a")).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names.len(), 1, "{names:?}");
            store.set(&StoreKey::new("a/.zarray").unwrap(), Bytes::from_static(b"{}")).unwrap();
            assert_eq!((store.chunks_written(), store.bytes_written()), (2, 11));
            store.erase(&key).unwrap();
            assert!(!dir.join("a/0.0.0").exists());
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
