//! Remote-store options and checks (`cellmap_data.remote` in Python), and the description of a
//! zarr node at a path or URL (`cellmap_data.describe`).

use pyo3::prelude::*;
use pyo3::types::PyDict;

use cellmap_engine::format::zarr_node;
use cellmap_engine::io::location::Location;
use cellmap_engine::io::remote::{self, RemoteOptionsUpdate};
use cellmap_engine::io::store::Store;

use crate::convert::{self, BindResult};

/// The options in effect for remote stores, as a dict.
#[pyfunction]
pub fn remote_options(py: Python<'_>) -> BindResult<Bound<'_, PyDict>> {
    let o = remote::options()?;
    let d = PyDict::new(py);
    d.set_item("max_in_flight", o.max_in_flight)?;
    d.set_item("timeout", o.timeout.as_secs_f64())?;
    d.set_item("retries", o.max_retries)?;
    d.set_item("endpoint_url", o.endpoint)?;
    d.set_item("anonymous", o.anonymous)?;
    d.set_item("disk_cache", o.disk_cache.as_ref().map(|(p, _)| p.display().to_string()))?;
    d.set_item("disk_cache_bytes", o.disk_cache.as_ref().map(|(_, b)| *b))?;
    d.set_item("range_gap", o.range_gap)?;
    Ok(d)
}

/// Replaces the remote options (stores opened afterwards use them). `None` keeps a value;
/// `endpoint_url=""`, `disk_cache=""` and `anonymous="auto"` clear one. The engine checks them.
#[pyfunction]
#[pyo3(signature = (*, max_in_flight=None, timeout=None, retries=None, endpoint_url=None, anonymous=None, disk_cache=None, disk_cache_bytes=None, range_gap=None))]
#[allow(clippy::too_many_arguments)]
pub fn set_remote_options(
    max_in_flight: Option<usize>,
    timeout: Option<f64>,
    retries: Option<usize>,
    endpoint_url: Option<String>,
    anonymous: Option<&Bound<'_, PyAny>>,
    disk_cache: Option<String>,
    disk_cache_bytes: Option<u64>,
    range_gap: Option<u64>,
) -> BindResult<()> {
    // A Python bool or string, as the engine reads it ("true"/"false"/"auto").
    let anonymous = anonymous
        .map(|a| match a.extract::<bool>() {
            Ok(flag) => Ok(flag.to_string()),
            Err(_) => a.str().map(|s| s.to_string()),
        })
        .transpose()?;
    let update = RemoteOptionsUpdate {
        max_in_flight,
        timeout,
        retries,
        endpoint_url,
        anonymous,
        disk_cache,
        disk_cache_bytes,
        range_gap,
    };
    remote::update_options(&update)?;
    Ok(())
}

/// Whether a zarr group or array exists at each of `locations` (paths or URLs); remote ones
/// are asked in one round trip, without listing.
#[pyfunction]
pub fn nodes_exist(py: Python<'_>, locations: Vec<String>) -> BindResult<Vec<bool>> {
    convert::run(py, move || remote::nodes_exist(&locations))
}

/// Whether `location` is an object-store URL (`s3://`, `gs://`, `http(s)://`).
#[pyfunction]
pub fn is_remote(location: &str) -> bool {
    Location::parse(location).is_remote()
}

/// The engine's description of the zarr node at `location` (a path or URL), as JSON: kind,
/// zarr format, attributes, the parsed multiscale of an image group, an array's layout and
/// codecs. A location without zarr metadata has kind `null`.
#[pyfunction]
pub fn describe(py: Python<'_>, location: String) -> BindResult<String> {
    convert::run(py, move || {
        let described = zarr_node::describe(&Store::open(&Location::parse(&location))?, "")?;
        serde_json::to_string(&described).map_err(|e| cellmap_engine::Error::Internal(format!("{location}: {e}")))
    })
}
