//! Remote-store options and checks (`cellmap_data.remote` in Python).

use std::path::PathBuf;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use cellmap_engine::remote::{self, RemoteOptions};

use crate::convert;

/// The options in effect for remote stores, as a dict.
#[pyfunction]
pub fn remote_options(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let o = remote::options();
    let d = PyDict::new(py);
    d.set_item("max_in_flight", o.max_in_flight)?;
    d.set_item("timeout", o.timeout.as_secs_f64())?;
    d.set_item("retries", o.max_retries)?;
    d.set_item("endpoint_url", o.endpoint)?;
    d.set_item("anonymous", o.anonymous)?;
    d.set_item("disk_cache", o.disk_cache.as_ref().map(|(p, _)| p.display().to_string()))?;
    d.set_item("disk_cache_bytes", o.disk_cache.as_ref().map(|(_, b)| *b))?;
    Ok(d)
}

/// Replaces the remote options (stores opened afterwards use them). `None` keeps a value;
/// `endpoint_url=""`, `disk_cache=""` and `anonymous="auto"` clear one.
#[pyfunction]
#[pyo3(signature = (*, max_in_flight=None, timeout=None, retries=None, endpoint_url=None, anonymous=None, disk_cache=None, disk_cache_bytes=None))]
#[allow(clippy::too_many_arguments)]
pub fn set_remote_options(
    py: Python<'_>,
    max_in_flight: Option<usize>,
    timeout: Option<f64>,
    retries: Option<usize>,
    endpoint_url: Option<String>,
    anonymous: Option<&Bound<'_, PyAny>>,
    disk_cache: Option<String>,
    disk_cache_bytes: Option<u64>,
) -> PyResult<()> {
    let bad = |m: String| convert::to_pyerr(py, cellmap_engine::Error::invalid(m));
    let mut o: RemoteOptions = remote::options();
    if let Some(n) = max_in_flight {
        if n == 0 {
            return Err(bad("max_in_flight must be at least 1".into()));
        }
        o.max_in_flight = n;
    }
    if let Some(t) = timeout {
        if !(t.is_finite() && t > 0.0) {
            return Err(bad(format!("timeout must be a positive number of seconds, not {t}")));
        }
        o.timeout = Duration::from_secs_f64(t);
    }
    if let Some(r) = retries {
        o.max_retries = r;
    }
    if let Some(e) = endpoint_url {
        o.endpoint = (!e.is_empty()).then_some(e);
    }
    if let Some(a) = anonymous {
        o.anonymous = if a.extract::<String>().is_ok_and(|s| s == "auto") {
            None
        } else {
            Some(
                a.extract::<bool>()
                    .map_err(|_| bad("anonymous must be True, False or 'auto'".into()))?,
            )
        };
    }
    let budget = disk_cache_bytes
        .or(o.disk_cache.as_ref().map(|(_, b)| *b))
        .unwrap_or(remote::DEFAULT_DISK_CACHE_BYTES);
    match disk_cache {
        Some(dir) if dir.is_empty() => o.disk_cache = None,
        Some(dir) => o.disk_cache = Some((PathBuf::from(dir), budget)),
        None => {
            if let Some((_, b)) = o.disk_cache.as_mut() {
                *b = budget;
            }
        }
    }
    remote::set_options(o);
    Ok(())
}

/// Whether a zarr group or array exists at each of `locations` (paths or URLs); remote ones
/// are asked in one round trip, without listing.
#[pyfunction]
pub fn nodes_exist(py: Python<'_>, locations: Vec<String>) -> PyResult<Vec<bool>> {
    convert::run(py, move || remote::nodes_exist(&locations))
}

/// Whether `location` is an object-store URL (`s3://`, `gs://`, `http(s)://`).
#[pyfunction]
pub fn is_remote(location: &str) -> bool {
    remote::is_remote(location)
}

/// The text of the metadata document `name` (`zarr.json`, `.zattrs` ...) of the zarr node at
/// `location` (a path or URL); `None` when absent.
#[pyfunction]
pub fn read_node_text(py: Python<'_>, location: String, name: String) -> PyResult<Option<String>> {
    convert::run(py, move || {
        let node = std::path::PathBuf::from(&location);
        cellmap_engine::ngff::read_node_text(&node, &name)
    })
}
