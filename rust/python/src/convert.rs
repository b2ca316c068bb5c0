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

/// The memory of a C-contiguous numpy array, read from its `__array_interface__` (the buffer
/// protocol is not part of Python 3.10's stable ABI, which this extension is built for).
pub struct ArrayMemory {
    /// Address of element 0.
    pub address: usize,
    /// Number of elements.
    pub len: usize,
    /// Whether the array may be written.
    pub writable: bool,
}

impl ArrayMemory {
    /// The memory of `array`, which must be a C-contiguous numpy array of element type
    /// `typestr` (e.g. `"<f4"`, `"|u1"`). The caller keeps `array` alive while it uses the memory.
    pub fn of(array: &Bound<'_, PyAny>, typestr: &str, what: &str) -> PyResult<ArrayMemory> {
        let invalid = |detail: String| PyErr::from(pyo3::exceptions::PyValueError::new_err(format!("{what}: {detail}")));
        let interface = array.getattr("__array_interface__").map_err(|_| {
            invalid(format!(
                "expected a numpy array, not {}",
                array.get_type().name().map_or_else(|_| "?".into(), |n| n.to_string())
            ))
        })?;
        let found: String = interface.get_item("typestr")?.extract()?;
        if found != typestr {
            return Err(invalid(format!("expected elements of type {typestr}, not {found}")));
        }
        let shape: Vec<usize> = interface.get_item("shape")?.extract()?;
        let strides = interface.get_item("strides").ok().filter(|s| !s.is_none());
        if let Some(strides) = strides {
            let strides: Vec<isize> = strides.extract()?;
            let size = typestr[2..].parse::<isize>().unwrap_or(1);
            let mut expected = size;
            for (&n, &stride) in shape.iter().zip(&strides).rev() {
                if n > 1 && stride != expected {
                    return Err(invalid("the array must be C-contiguous".into()));
                }
                expected *= n as isize;
            }
        }
        let (address, readonly): (usize, bool) = interface.get_item("data")?.extract()?;
        Ok(ArrayMemory {
            address,
            len: shape.iter().product(),
            writable: !readonly,
        })
    }
}
