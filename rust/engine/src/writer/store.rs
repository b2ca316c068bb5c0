//! Where the writer's bytes go: [`OutputStore`], a zarrs storage adapter over a folder
//! ([`FilesystemStore`], every value write made atomic) or an object store (one PUT per value,
//! atomic by the store's guarantee), so metadata and chunks go through zarrs' own array and
//! group code either way.
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

use std::sync::atomic::{AtomicU64, Ordering};

use zarrs::filesystem::FilesystemStore;
use zarrs::storage::byte_range::ByteRangeIterator;
use zarrs::storage::{
    store_set_partial_many, Bytes, ListableStorageTraits, MaybeBytes, MaybeBytesIterator, OffsetBytesIterator, ReadableStorageTraits,
    StorageError, StoreKey, StoreKeys, StoreKeysPrefixes, StorePrefix, WritableStorageTraits,
};

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::location::Location;
use crate::io::remote::RemoteStore;
use std::sync::Arc;

/// Whether a store key names zarr metadata rather than a chunk.
fn is_metadata_key(key: &StoreKey) -> bool {
    let name = key.as_str().rsplit('/').next().unwrap_or("");
    matches!(name, "zarr.json" | ".zarray" | ".zgroup" | ".zattrs")
}

/// Where an image's values go: a folder (each value written whole through a temporary file
/// and a rename) or an object store (each value one PUT, whole by the store's own guarantee),
/// with counters of the chunk values written.
#[derive(Debug)]
pub struct OutputStore {
    backend: Backend,
    /// The folder or URL the store is rooted at (for messages).
    root: Location,
    chunks_written: AtomicU64,
    bytes_written: AtomicU64,
}

#[derive(Debug)]
enum Backend {
    Local { inner: FilesystemStore, fsync: bool },
    Remote(Arc<RemoteStore>),
}

impl OutputStore {
    /// A store rooted at `root`: a folder (created when missing), or an object-store URL.
    pub fn new(root: &Location, fsync: bool) -> Result<OutputStore> {
        let backend = match root {
            Location::Remote(url) => Backend::Remote(RemoteStore::open(url)?),
            Location::Local(dir) => {
                fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                Backend::Local {
                    inner: FilesystemStore::new(dir).map_err(|e| Error::metadata(dir, e))?,
                    fsync,
                }
            }
        };
        Ok(OutputStore {
            backend,
            root: root.clone(),
            chunks_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        })
    }

    /// The folder or URL the store is rooted at.
    pub fn root(&self) -> &Location {
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

    /// Where `key` is, for messages.
    pub fn describe(&self, key: &str) -> Location {
        self.root.join(key)
    }

    fn store_key(&self, key: &str) -> Result<StoreKey> {
        StoreKey::new(key.trim_start_matches('/')).map_err(|e| Error::invalid(format!("{}: {e}", self.describe(key))))
    }

    fn error(&self, key: &str, e: StorageError) -> Error {
        match e {
            StorageError::IOError(io) => Error::io(self.describe(key), std::io::Error::new(io.kind(), io.to_string())),
            other => Error::metadata(self.describe(key), other),
        }
    }

    /// The value at `key` as text (`None` when absent).
    pub fn read_text(&self, key: &str) -> Result<Option<String>> {
        let store_key = self.store_key(key)?;
        match ReadableStorageTraits::get(self, &store_key).map_err(|e| self.error(key, e))? {
            Some(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            None => Ok(None),
        }
    }

    /// Writes `bytes` at `key` whole (bookkeeping such as completion marks: not counted as a
    /// chunk value).
    pub fn write_value(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let store_key = self.store_key(key)?;
        match &self.backend {
            Backend::Local { inner, fsync } => {
                let path = inner.key_to_fspath(&store_key);
                write_atomic(&path, bytes, *fsync).map_err(|e| Error::io(&path, e))
            }
            Backend::Remote(remote) => remote.write(store_key.as_str(), Bytes::copy_from_slice(bytes)),
        }
    }

    /// The keys below `prefix` (a folder-like key ending without `/`); none when absent.
    pub fn keys_below(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = format!("{}/", prefix.trim_matches('/'));
        match &self.backend {
            Backend::Local { .. } => {
                let dir = self.root.join(&prefix);
                let entries = match fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(Error::io(&dir, e)),
                };
                let mut out = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(|e| Error::io(&dir, e))?;
                    out.push(format!("{prefix}{}", entry.file_name().to_string_lossy()));
                }
                Ok(out)
            }
            Backend::Remote(remote) => remote.list_keys(&prefix),
        }
    }

    /// Deletes everything below `prefix`.
    pub fn erase_below(&self, prefix: &str) -> Result<()> {
        let prefix = prefix.trim_matches('/');
        match &self.backend {
            Backend::Local { .. } => {
                let dir = self.root.join(prefix);
                match fs::remove_dir_all(&dir) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(Error::io(&dir, e)),
                }
            }
            Backend::Remote(remote) => {
                for key in remote.list_keys(&format!("{prefix}/"))? {
                    remote.delete(&key)?;
                }
                Ok(())
            }
        }
    }
}

impl ReadableStorageTraits for OutputStore {
    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> std::result::Result<MaybeBytesIterator<'a>, StorageError> {
        match &self.backend {
            Backend::Local { inner, .. } => inner.get_partial_many(key, byte_ranges),
            Backend::Remote(remote) => remote.get_partial_many(key, byte_ranges),
        }
    }

    fn get(&self, key: &StoreKey) -> std::result::Result<MaybeBytes, StorageError> {
        match &self.backend {
            Backend::Local { inner, .. } => inner.get(key),
            Backend::Remote(remote) => ReadableStorageTraits::get(&**remote, key),
        }
    }

    fn size_key(&self, key: &StoreKey) -> std::result::Result<Option<u64>, StorageError> {
        match &self.backend {
            Backend::Local { inner, .. } => inner.size_key(key),
            Backend::Remote(remote) => remote.size_key(key),
        }
    }

    fn supports_get_partial(&self) -> bool {
        true
    }
}

impl ListableStorageTraits for OutputStore {
    fn list(&self) -> std::result::Result<StoreKeys, StorageError> {
        match &self.backend {
            Backend::Local { inner, .. } => inner.list(),
            Backend::Remote(remote) => ListableStorageTraits::list(&**remote),
        }
    }

    fn list_prefix(&self, prefix: &StorePrefix) -> std::result::Result<StoreKeys, StorageError> {
        match &self.backend {
            Backend::Local { inner, .. } => inner.list_prefix(prefix),
            Backend::Remote(remote) => remote.list_prefix(prefix),
        }
    }

    fn list_dir(&self, prefix: &StorePrefix) -> std::result::Result<StoreKeysPrefixes, StorageError> {
        match &self.backend {
            Backend::Local { inner, .. } => inner.list_dir(prefix),
            Backend::Remote(remote) => remote.list_dir(prefix),
        }
    }

    fn size_prefix(&self, prefix: &StorePrefix) -> std::result::Result<u64, StorageError> {
        match &self.backend {
            Backend::Local { inner, .. } => inner.size_prefix(prefix),
            Backend::Remote(remote) => remote.size_prefix(prefix),
        }
    }
}

impl WritableStorageTraits for OutputStore {
    fn set(&self, key: &StoreKey, value: Bytes) -> std::result::Result<(), StorageError> {
        let len = value.len() as u64;
        match &self.backend {
            Backend::Local { inner, fsync } => write_atomic(&inner.key_to_fspath(key), &value, *fsync)?,
            Backend::Remote(remote) => remote.set(key, value)?,
        }
        if !is_metadata_key(key) {
            self.chunks_written.fetch_add(1, Ordering::Relaxed);
            self.bytes_written.fetch_add(len, Ordering::Relaxed);
        }
        Ok(())
    }

    fn set_partial_many(&self, key: &StoreKey, offset_values: OffsetBytesIterator) -> std::result::Result<(), StorageError> {
        // Read, patch and write whole: a partial write in place could be torn.
        store_set_partial_many(self, key, offset_values)
    }

    fn erase(&self, key: &StoreKey) -> std::result::Result<(), StorageError> {
        match &self.backend {
            Backend::Local { inner, .. } => inner.erase(key),
            Backend::Remote(remote) => remote.erase(key),
        }
    }

    fn erase_prefix(&self, prefix: &StorePrefix) -> std::result::Result<(), StorageError> {
        match &self.backend {
            Backend::Local { inner, .. } => inner.erase_prefix(prefix),
            Backend::Remote(remote) => remote.erase_prefix(prefix),
        }
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
            let store = OutputStore::new(&Location::Local(dir.clone()), fsync).unwrap();
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
