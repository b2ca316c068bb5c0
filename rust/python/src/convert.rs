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

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Runs `work` without the GIL inside the engine's thread pool, turning engine errors and
/// panics into Python exceptions.
pub fn run<T: Send>(py: Python<'_>, work: impl FnOnce() -> cellmap_engine::Result<T> + Send) -> PyResult<T> {
    let outcome = py.detach(|| catch_unwind(AssertUnwindSafe(|| cellmap_engine::runtime::install(work))));
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(to_pyerr(py, error)),
        Err(payload) => {
            let message = format!("internal engine error (please report): {}", panic_message(payload));
            Err(py
                .import("cellmap_data.exceptions")
                .and_then(|m| m.getattr("CellMapError"))
                .and_then(|cls| cls.call1((message.clone(),)))
                .map(PyErr::from_value)
                .unwrap_or_else(|_| PyRuntimeError::new_err(message)))
        }
    }
}

/// Parses a JSON string coming from the Python layer.
pub fn parse_json(py: Python<'_>, text: &str) -> PyResult<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| to_pyerr(py, Error::invalid(format!("invalid configuration JSON: {e}"))))
}
