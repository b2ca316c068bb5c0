//! Error mapping and the one entry helper every heavy call goes through.

use std::panic::{catch_unwind, AssertUnwindSafe};

use cellmap_engine::{Error, ErrorKind};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// Maps an engine error onto the `cellmap_data.exceptions` hierarchy.
pub fn to_pyerr(py: Python<'_>, error: Error) -> PyErr {
    let class = match error.kind() {
        ErrorKind::NotFound => "NotFoundError",
        ErrorKind::Metadata => "MetadataError",
        ErrorKind::Decode => "ChunkDecodeError",
        ErrorKind::InvalidArgument => "ConfigError",
        ErrorKind::PermissionDenied => "PermissionDeniedError",
        ErrorKind::Io => "StorageError",
        ErrorKind::Interrupted => return pyo3::exceptions::PyKeyboardInterrupt::new_err(error.to_string()),
        ErrorKind::Internal => "CellMapError",
    };
    let message = error.to_string();
    match py
        .import("cellmap_data.exceptions")
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1((message.clone(),)))
    {
        Ok(instance) => PyErr::from_value(instance),
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// Runs `work` without the GIL inside the engine's thread pool, turning engine errors and
/// panics into Python exceptions.
pub fn run<T: Send>(py: Python<'_>, work: impl FnOnce() -> cellmap_engine::Result<T> + Send) -> PyResult<T> {
    let outcome = py.detach(|| catch_unwind(AssertUnwindSafe(|| cellmap_engine::runtime::install(work))));
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(to_pyerr(py, error)),
        Err(payload) => Err(to_pyerr(py, Error::from_panic(payload))),
    }
}

/// Parses a JSON string coming from the Python layer.
pub fn parse_json(py: Python<'_>, text: &str) -> PyResult<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| to_pyerr(py, Error::invalid(format!("invalid configuration JSON: {e}"))))
}
