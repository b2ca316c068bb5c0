//! How remote stores are opened and read: the process-wide options, one typed change form
//! ([`RemoteOptionsUpdate`]) that both the environment and `configure_remote` go through, and
//! one validation of it. A value that cannot be used is an error naming where it came from
//! (the environment variable, or the keyword), never silently replaced by a default.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// How remote stores are opened and read (process-wide).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteOptions {
    /// Requests in flight at most, over all remote stores of the process.
    pub max_in_flight: usize,
    /// Limit of one request (connect, send, receive), each try.
    pub timeout: Duration,
    /// Retries of a failing request (5xx, reset, timeout, a body cut short) before the error
    /// is raised.
    pub max_retries: usize,
    /// S3 endpoint of an S3-compatible store (`AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// `Some(true)`: never sign requests; `Some(false)`: always; `None`: sign only when
    /// credentials are configured.
    pub anonymous: Option<bool>,
    /// Folder and byte budget of the disk cache of fetched values (`CELLMAP_DISK_CACHE`,
    /// `CELLMAP_DISK_CACHE_BYTES`).
    pub disk_cache: Option<(PathBuf, u64)>,
    /// Byte ranges of one object (inner chunks of a shard) less than this many bytes apart go
    /// out as one request; 0 asks for each range on its own (`CELLMAP_REMOTE_RANGE_GAP`).
    pub range_gap: u64,
}

/// Default gap below which byte ranges are merged into one request: object_store's 1 MiB.
pub const DEFAULT_RANGE_GAP: u64 = object_store::OBJECT_STORE_COALESCE_DEFAULT;

/// Default disk cache budget: 20 GiB.
pub const DEFAULT_DISK_CACHE_BYTES: u64 = 20 << 30;

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            max_in_flight: 64,
            timeout: Duration::from_secs(30),
            max_retries: 5,
            endpoint: None,
            anonymous: None,
            disk_cache: None,
            range_gap: DEFAULT_RANGE_GAP,
        }
    }
}

/// A change to the remote options; a field left `None` keeps its value. `endpoint_url: ""` and
/// `disk_cache: ""` clear one, `anonymous: "auto"` signs only with credentials.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteOptionsUpdate {
    /// Requests in flight at most (≥ 1).
    pub max_in_flight: Option<usize>,
    /// Seconds per request try (finite, > 0).
    pub timeout: Option<f64>,
    /// Retries of a failing request.
    pub retries: Option<usize>,
    /// S3-compatible endpoint; `""` clears it.
    pub endpoint_url: Option<String>,
    /// `"true"`, `"false"` or `"auto"` (also `1`/`0`, `yes`/`no`).
    pub anonymous: Option<String>,
    /// Disk cache folder; `""` turns the disk cache off.
    pub disk_cache: Option<String>,
    /// Disk cache budget in bytes.
    pub disk_cache_bytes: Option<u64>,
    /// Bytes between ranges of one object below which they are one request (0: never).
    pub range_gap: Option<u64>,
}

/// The environment variable each update field is read from.
const ENVIRONMENT: [(&str, &str); 8] = [
    ("max_in_flight", "CELLMAP_REMOTE_IN_FLIGHT"),
    ("timeout", "CELLMAP_REMOTE_TIMEOUT"),
    ("retries", "CELLMAP_REMOTE_RETRIES"),
    ("endpoint_url", "AWS_ENDPOINT_URL"),
    ("anonymous", "CELLMAP_REMOTE_ANONYMOUS"),
    ("disk_cache", "CELLMAP_DISK_CACHE"),
    ("disk_cache_bytes", "CELLMAP_DISK_CACHE_BYTES"),
    ("range_gap", "CELLMAP_REMOTE_RANGE_GAP"),
];

fn environment_name(field: &str) -> String {
    ENVIRONMENT.iter().find(|(f, _)| *f == field).map_or(field, |(_, v)| v).to_string()
}

impl RemoteOptions {
    /// The defaults, overridden by `CELLMAP_REMOTE_IN_FLIGHT`, `CELLMAP_REMOTE_TIMEOUT`
    /// (seconds), `CELLMAP_REMOTE_RETRIES`, `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`,
    /// `CELLMAP_REMOTE_ANONYMOUS`, `CELLMAP_DISK_CACHE` / `CELLMAP_DISK_CACHE_BYTES` and
    /// `CELLMAP_REMOTE_RANGE_GAP` (bytes). A value
    /// that cannot be used is an error naming its variable.
    pub fn from_env() -> Result<RemoteOptions> {
        Self::from_variables(|name| std::env::var(name).ok())
    }

    /// [`RemoteOptions::from_env`] over any source of variables (tests pass a map).
    pub fn from_variables(get: impl Fn(&str) -> Option<String>) -> Result<RemoteOptions> {
        let var = |name: &str| get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        fn number<T: std::str::FromStr>(name: &str, text: Option<String>) -> Result<Option<T>> {
            text.map(|t| {
                t.parse::<T>()
                    .map_err(|_| Error::invalid(format!("environment variable {name}={t:?} is not a valid number here")))
            })
            .transpose()
        }
        let update = RemoteOptionsUpdate {
            max_in_flight: number("CELLMAP_REMOTE_IN_FLIGHT", var("CELLMAP_REMOTE_IN_FLIGHT"))?,
            timeout: number("CELLMAP_REMOTE_TIMEOUT", var("CELLMAP_REMOTE_TIMEOUT"))?,
            retries: number("CELLMAP_REMOTE_RETRIES", var("CELLMAP_REMOTE_RETRIES"))?,
            endpoint_url: var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL")),
            anonymous: var("CELLMAP_REMOTE_ANONYMOUS"),
            disk_cache: var("CELLMAP_DISK_CACHE"),
            disk_cache_bytes: number("CELLMAP_DISK_CACHE_BYTES", var("CELLMAP_DISK_CACHE_BYTES"))?,
            range_gap: number("CELLMAP_REMOTE_RANGE_GAP", var("CELLMAP_REMOTE_RANGE_GAP"))?,
        };
        RemoteOptions::default().updated(&update, |field| format!("environment variable {}", environment_name(field)))
    }

    /// These options with `update` applied, every value checked; errors name the field as
    /// `name(field)` gives it (a keyword, or an environment variable).
    pub fn updated(mut self, update: &RemoteOptionsUpdate, name: impl Fn(&str) -> String) -> Result<RemoteOptions> {
        if let Some(n) = update.max_in_flight {
            if n == 0 {
                return Err(Error::invalid(format!("{} must be at least 1", name("max_in_flight"))));
            }
            self.max_in_flight = n;
        }
        if let Some(t) = update.timeout {
            if !(t.is_finite() && t > 0.0) {
                return Err(Error::invalid(format!(
                    "{} must be a positive number of seconds, not {t}",
                    name("timeout")
                )));
            }
            self.timeout = Duration::from_secs_f64(t);
        }
        if let Some(r) = update.retries {
            self.max_retries = r;
        }
        if let Some(gap) = update.range_gap {
            self.range_gap = gap;
        }
        if let Some(e) = &update.endpoint_url {
            self.endpoint = (!e.is_empty()).then(|| e.clone());
        }
        if let Some(a) = &update.anonymous {
            self.anonymous = match a.trim().to_ascii_lowercase().as_str() {
                "auto" => None,
                "true" | "1" | "yes" => Some(true),
                "false" | "0" | "no" => Some(false),
                _ => {
                    return Err(Error::invalid(format!(
                        "{} must be True, False or 'auto', not {a:?}",
                        name("anonymous")
                    )))
                }
            };
        }
        let budget = update
            .disk_cache_bytes
            .or(self.disk_cache.as_ref().map(|(_, b)| *b))
            .unwrap_or(DEFAULT_DISK_CACHE_BYTES);
        match update.disk_cache.as_deref() {
            Some("") => self.disk_cache = None,
            Some(dir) => self.disk_cache = Some((PathBuf::from(dir), budget)),
            None => {
                if let Some((_, b)) = self.disk_cache.as_mut() {
                    *b = budget;
                }
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<RemoteOptions> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        RemoteOptions::from_variables(|name| map.get(name).cloned())
    }

    #[test]
    fn the_environment_sets_each_option() {
        assert_eq!(from(&[]).unwrap(), RemoteOptions::default());
        let o = from(&[
            ("CELLMAP_REMOTE_IN_FLIGHT", "8"),
            ("CELLMAP_REMOTE_TIMEOUT", "2.5"),
            ("CELLMAP_REMOTE_RETRIES", "0"),
            ("AWS_ENDPOINT_URL", "http://localhost:9000"),
            ("CELLMAP_REMOTE_ANONYMOUS", "yes"),
            ("CELLMAP_DISK_CACHE", "/tmp/c"),
            ("CELLMAP_DISK_CACHE_BYTES", "1000"),
            ("CELLMAP_REMOTE_RANGE_GAP", "0"),
        ])
        .unwrap();
        assert_eq!(o.range_gap, 0);
        assert_eq!(o.max_in_flight, 8);
        assert_eq!(o.timeout, Duration::from_millis(2500));
        assert_eq!(o.max_retries, 0);
        assert_eq!(o.endpoint.as_deref(), Some("http://localhost:9000"));
        assert_eq!(o.anonymous, Some(true));
        assert_eq!(o.disk_cache, Some((PathBuf::from("/tmp/c"), 1000)));
        // The S3-specific endpoint wins over the general one.
        let o = from(&[("AWS_ENDPOINT_URL", "http://a"), ("AWS_ENDPOINT_URL_S3", "http://b")]).unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("http://b"));
    }

    #[test]
    fn a_bad_environment_value_is_an_error_naming_its_variable() {
        for (var, value) in [
            ("CELLMAP_REMOTE_IN_FLIGHT", "many"),
            ("CELLMAP_REMOTE_IN_FLIGHT", "0"),
            ("CELLMAP_REMOTE_TIMEOUT", "-1"),
            ("CELLMAP_REMOTE_TIMEOUT", "nan"),
            ("CELLMAP_REMOTE_RETRIES", "2.5"),
            ("CELLMAP_REMOTE_ANONYMOUS", "maybe"),
            ("CELLMAP_DISK_CACHE_BYTES", "20GB"),
            ("CELLMAP_REMOTE_RANGE_GAP", "-1"),
        ] {
            let message = from(&[(var, value)]).unwrap_err().to_string();
            assert!(message.contains(var), "{var}={value}: {message}");
        }
    }

    #[test]
    fn updates_are_checked_and_name_the_keyword() {
        let o = RemoteOptions::default();
        let keyword = |f: &str| f.to_string();
        let refused = |update: RemoteOptionsUpdate| o.clone().updated(&update, keyword).unwrap_err().to_string();
        assert!(refused(RemoteOptionsUpdate {
            timeout: Some(0.0),
            ..Default::default()
        })
        .contains("timeout must be a positive"));
        assert!(refused(RemoteOptionsUpdate {
            anonymous: Some("perhaps".into()),
            ..Default::default()
        })
        .contains("anonymous must be"));
        let set = RemoteOptionsUpdate {
            disk_cache: Some("/tmp/d".into()),
            ..Default::default()
        };
        let o = o.updated(&set, keyword).unwrap();
        assert_eq!(o.disk_cache, Some((PathBuf::from("/tmp/d"), DEFAULT_DISK_CACHE_BYTES)));
        let budget = RemoteOptionsUpdate {
            disk_cache_bytes: Some(5),
            ..Default::default()
        };
        let o = o.updated(&budget, keyword).unwrap();
        assert_eq!(
            o.disk_cache,
            Some((PathBuf::from("/tmp/d"), 5)),
            "the folder kept, its budget changed"
        );
        let clear = RemoteOptionsUpdate {
            disk_cache: Some(String::new()),
            endpoint_url: Some(String::new()),
            ..Default::default()
        };
        let o = o.updated(&clear, keyword).unwrap();
        assert_eq!((o.disk_cache, o.endpoint), (None, None));
    }
}
