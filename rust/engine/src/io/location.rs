//! Where data lives: a local folder or an object-store URL, told apart once, when the text a
//! user gave is parsed, and carried as a [`Location`] from there on.

use std::fmt;
use std::path::{Path, PathBuf};

/// The URL schemes of object stores the engine reads and writes.
const REMOTE_SCHEMES: [&str; 4] = ["s3", "gs", "http", "https"];

/// A local folder (a path, or a `file://` URL) or an object-store URL (`s3://`, `gs://`,
/// `http(s)://`, kept without a trailing slash).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A local path.
    Local(PathBuf),
    /// An object-store URL.
    Remote(String),
}

impl Location {
    /// The location `text` names.
    pub fn parse(text: &str) -> Location {
        match scheme_of(text) {
            Some("file") => Location::Local(local_path(text)),
            Some(_) => Location::Remote(text.trim_end_matches('/').to_string()),
            None => Location::Local(PathBuf::from(text)),
        }
    }

    /// The location of a path that may hold a URL (configuration read as paths).
    pub fn of_path(path: &Path) -> Location {
        match path.to_str() {
            Some(text) => Location::parse(text),
            None => Location::Local(path.to_path_buf()),
        }
    }

    /// Whether this is an object-store URL.
    pub fn is_remote(&self) -> bool {
        matches!(self, Location::Remote(_))
    }

    /// The local path, if local.
    pub fn local(&self) -> Option<&Path> {
        match self {
            Location::Local(path) => Some(path),
            Location::Remote(_) => None,
        }
    }

    /// The URL, if remote.
    pub fn url(&self) -> Option<&str> {
        match self {
            Location::Local(_) => None,
            Location::Remote(url) => Some(url),
        }
    }

    /// The location of `relative` (slash-separated) below this one.
    pub fn join(&self, relative: &str) -> Location {
        let relative = relative.trim_matches('/');
        if relative.is_empty() {
            return self.clone();
        }
        match self {
            Location::Local(path) => Location::Local(path.join(relative)),
            Location::Remote(url) => Location::Remote(format!("{url}/{relative}")),
        }
    }

    /// The name messages and errors use: the path, or the URL.
    pub fn display_path(&self) -> PathBuf {
        match self {
            Location::Local(path) => path.clone(),
            Location::Remote(url) => PathBuf::from(url),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(path) => write!(f, "{}", path.display()),
            Location::Remote(url) => f.write_str(url),
        }
    }
}

/// Errors name locations by their path or URL.
impl AsRef<Path> for Location {
    fn as_ref(&self) -> &Path {
        match self {
            Location::Local(path) => path,
            Location::Remote(url) => Path::new(url),
        }
    }
}

/// Whether `location` is a URL of an object store (not a local path or `file://` URL).
pub fn is_remote(location: &str) -> bool {
    scheme_of(location).is_some_and(|s| s != "file")
}

pub(crate) fn scheme_of(location: &str) -> Option<&str> {
    let (scheme, _) = location.split_once("://")?;
    (scheme == "file" || REMOTE_SCHEMES.contains(&scheme)).then_some(scheme)
}

/// A `file://` URL as a local path; anything else unchanged.
pub fn local_path(location: &str) -> PathBuf {
    match location.strip_prefix("file://") {
        Some(rest) => PathBuf::from(rest),
        None => PathBuf::from(location),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_are_told_apart_once() {
        assert_eq!(Location::parse("/data/a.zarr"), Location::Local("/data/a.zarr".into()));
        assert_eq!(Location::parse("file:///data/a.zarr"), Location::Local("/data/a.zarr".into()));
        assert_eq!(
            Location::parse("s3://bucket/a.zarr/"),
            Location::Remote("s3://bucket/a.zarr".into())
        );
        assert_eq!(
            Location::parse("ftp://host/a"),
            Location::Local("ftp://host/a".into()),
            "not a scheme we read"
        );
        for url in ["s3://b/k", "gs://b/k", "http://h:1/k", "https://h/k"] {
            assert!(Location::parse(url).is_remote(), "{url}");
            assert!(is_remote(url));
        }
        assert!(!is_remote("file:///a") && !is_remote("relative/a.zarr"));
    }

    #[test]
    fn join_keeps_the_kind_and_one_separator() {
        let remote = Location::parse("http://h/root");
        assert_eq!(remote.join("/raw/s0/").to_string(), "http://h/root/raw/s0");
        assert_eq!(remote.join(""), remote);
        let local = Location::parse("/tmp/x.zarr");
        assert_eq!(local.join("raw/s0").local(), Some(Path::new("/tmp/x.zarr/raw/s0")));
        assert_eq!(remote.display_path(), PathBuf::from("http://h/root"));
    }
}
