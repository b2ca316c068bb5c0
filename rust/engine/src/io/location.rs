//! Where data lives: a local folder or an object-store URL, told apart once, when the text a
//! user gave is parsed, and carried as a [`Location`] from there on.

use std::fmt;
use std::path::{Path, PathBuf};

/// The URL schemes of object stores the engine reads and writes.
const REMOTE_SCHEMES: [&str; 4] = ["s3", "gs", "http", "https"];

/// A local folder (a path, or a `file://` URL) or an object-store URL (`s3://`, `gs://`,
/// `http(s)://`, kept without a trailing slash).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(from = "String")]
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

    /// The location this one is directly below (`None` at a root: `/`, or a URL's bucket or host).
    pub fn parent(&self) -> Option<Location> {
        match self {
            Location::Local(path) => path.parent().map(|p| Location::Local(p.to_path_buf())),
            Location::Remote(url) => {
                let (root, key) = split_remote(url);
                let key = key.trim_end_matches('/');
                if key.is_empty() {
                    return None;
                }
                Some(match key.rfind('/') {
                    Some(cut) => Location::Remote(format!("{root}/{}", &key[..cut])),
                    None => Location::Remote(root.to_string()),
                })
            }
        }
    }

    /// The last part of the location (a folder's name, a URL's last key segment).
    pub fn name(&self) -> Option<&str> {
        match self {
            Location::Local(path) => path.file_name().and_then(|n| n.to_str()),
            Location::Remote(url) => {
                let (_, key) = split_remote(url);
                key.rsplit('/').next().filter(|n| !n.is_empty())
            }
        }
    }

    /// The slash-separated key of this location below `root` (`""` for `root` itself);
    /// `None` when it is not below `root`.
    pub fn relative_to(&self, root: &Location) -> Option<String> {
        match (self, root) {
            (Location::Local(path), Location::Local(root)) => path.strip_prefix(root).ok().map(|rest| {
                rest.components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/")
            }),
            (Location::Remote(url), Location::Remote(root)) => match url.strip_prefix(root.as_str()) {
                Some("") => Some(String::new()),
                Some(rest) if rest.starts_with('/') => Some(rest.trim_matches('/').to_string()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether this location is `other` or lies below it.
    pub fn starts_with(&self, other: &Location) -> bool {
        self.relative_to(other).is_some()
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

/// The location `text` names (see [`Location::parse`]).
impl From<&str> for Location {
    fn from(text: &str) -> Location {
        Location::parse(text)
    }
}

/// Configuration names locations as text (a path or a URL).
impl From<String> for Location {
    fn from(text: String) -> Location {
        Location::parse(&text)
    }
}

impl From<&Path> for Location {
    fn from(path: &Path) -> Location {
        Location::of_path(path)
    }
}

impl From<&PathBuf> for Location {
    fn from(path: &PathBuf) -> Location {
        Location::of_path(path)
    }
}

impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Location {
        Location::of_path(&path)
    }
}

impl From<&Location> for Location {
    fn from(location: &Location) -> Location {
        location.clone()
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

/// A URL split after its bucket or host: (`scheme://authority`, the key path).
fn split_remote(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => (&url[..after_scheme + i], &url[after_scheme + i + 1..]),
        None => (url, ""),
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
    fn parents_names_and_relative_keys_of_paths_and_urls() {
        let url = Location::parse("s3://bucket/out/pred.zarr/mito");
        assert_eq!(url.parent(), Some(Location::parse("s3://bucket/out/pred.zarr")));
        assert_eq!(url.name(), Some("mito"));
        assert_eq!(Location::parse("s3://bucket/out").parent(), Some(Location::parse("s3://bucket")));
        assert_eq!(Location::parse("s3://bucket").parent(), None, "a bucket has no parent");
        assert_eq!(Location::parse("http://h:8/a").name(), Some("a"));
        let root = Location::parse("s3://bucket/out/pred.zarr");
        assert_eq!(url.relative_to(&root).as_deref(), Some("mito"));
        assert_eq!(root.relative_to(&root).as_deref(), Some(""));
        assert_eq!(
            Location::parse("s3://bucket/out/pred.zarr2").relative_to(&root),
            None,
            "a sibling with a longer name"
        );
        assert!(url.starts_with(&root) && !root.starts_with(&url));
        let local = Location::parse("/data/pred.zarr/mito/s0");
        assert_eq!(local.relative_to(&Location::parse("/data/pred.zarr")).as_deref(), Some("mito/s0"));
        assert_eq!(local.parent(), Some(Location::parse("/data/pred.zarr/mito")));
        assert_eq!(local.name(), Some("s0"));
        assert!(!local.starts_with(&Location::parse("s3://data")), "a path is never below a URL");
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
