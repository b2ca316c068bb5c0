//! One store per opened hierarchy: the zarrs storage over a [`Location`] (a folder through
//! zarrs' filesystem store, or a URL through [`RemoteStore`]), opened once and shared by the
//! metadata reads and the arrays of that location.

use std::path::Path;
use std::sync::Arc;

use zarrs::filesystem::FilesystemStore;
use zarrs::storage::{ReadableStorageTraits, StorageError};

use super::location::Location;
use super::remote::RemoteStore;
use crate::error::{Error, Result};

/// The storage of one location, local or remote.
#[derive(Clone)]
pub struct Store {
    location: Location,
    storage: Arc<dyn ReadableStorageTraits>,
    remote: Option<Arc<RemoteStore>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("location", &self.location).finish()
    }
}

impl Store {
    /// Opens `location` (a local folder need not exist yet: its documents then read as absent).
    pub fn open(location: &Location) -> Result<Store> {
        match location {
            Location::Remote(url) => {
                let remote = RemoteStore::open(url)?;
                // The store's own URL (normalised) names the location from here on.
                let location = Location::Remote(remote.url().to_string());
                Ok(Store {
                    location,
                    storage: remote.clone(),
                    remote: Some(remote),
                })
            }
            Location::Local(path) => {
                let storage = FilesystemStore::new(path).map_err(|e| Error::metadata(path, e))?;
                Ok(Store {
                    location: location.clone(),
                    storage: Arc::new(storage),
                    remote: None,
                })
            }
        }
    }

    /// Where the store is rooted.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The zarrs storage, for opening arrays and groups.
    pub fn storage(&self) -> Arc<dyn ReadableStorageTraits> {
        self.storage.clone()
    }

    /// The object store, if remote (requests started ahead go through it).
    pub fn remote(&self) -> Option<&Arc<RemoteStore>> {
        self.remote.as_ref()
    }

    /// Starts fetching `keys` (relative to the root) now, if remote; local reads need no head start.
    pub fn prefetch(&self, keys: impl IntoIterator<Item = String>) {
        if let Some(remote) = &self.remote {
            remote.prefetch(keys);
        }
    }

    /// The text of the document at `key` (relative to the root); `None` when absent.
    pub fn read_text(&self, key: &str) -> Result<Option<String>> {
        let key = key.trim_start_matches('/');
        match &self.remote {
            Some(remote) => match remote.read(key)? {
                Some(bytes) => String::from_utf8(bytes.to_vec())
                    .map(Some)
                    .map_err(|_| Error::metadata(remote.key_url(key), "not UTF-8 text")),
                None => Ok(None),
            },
            None => {
                let path = self.location.join(key).display_path();
                match std::fs::read_to_string(&path) {
                    Ok(text) => Ok(Some(text)),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::IsADirectory | std::io::ErrorKind::NotADirectory
                        ) =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(Error::io(&path, e)),
                }
            }
        }
    }
}

/// A read's error from the store at `place`: an I/O error keeps its kind (permission denied,
/// EIO...), so it maps onto the matching exception and can be retried; anything else is a
/// decode error.
pub fn storage_read_error(place: impl AsRef<Path>, error: StorageError) -> Error {
    match &error {
        StorageError::IOError(io) => store_io_error(place, io),
        _ => Error::decode(place, error),
    }
}

/// An I/O error of the store (shared, so rebuilt) with its kind and OS code kept.
pub fn store_io_error(place: impl AsRef<Path>, io: &std::io::Error) -> Error {
    let io = match io.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(io.kind(), io.to_string()),
    };
    Error::io(place, io)
}
