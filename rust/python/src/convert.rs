//! Error mapping and the one entry helper every heavy call goes through.

use std::panic::{catch_unwind, AssertUnwindSafe};

use cellmap_engine::{Error, ErrorKind};
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;

pyo3::import_exception!(cellmap_data.exceptions, CellMapError);
pyo3::import_exception!(cellmap_data.exceptions, NotFoundError);
pyo3::import_exception!(cellmap_data.exceptions, MetadataError);
pyo3::import_exception!(cellmap_data.exceptions, ChunkDecodeError);
pyo3::import_exception!(cellmap_data.exceptions, ConfigError);
pyo3::import_exception!(cellmap_data.exceptions, PermissionDeniedError);
pyo3::import_exception!(cellmap_data.exceptions, StorageError);
pyo3::import_exception!(cellmap_data.exceptions, OutputExistsError);
pyo3::import_exception!(cellmap_data.exceptions, WaitTimeoutError);

/// An error on its way out of a binding function: the engine's, or one raised by Python while
/// converting arguments or results. Binding functions return [`BindResult`] and use `?` on both;
/// this is the one place an engine error becomes a `cellmap_data.exceptions` class.
pub enum BindingError {
    /// An engine error, mapped by its kind.
    Engine(Error),
    /// A Python exception, passed through.
    Python(PyErr),
}

/// The result type of binding functions.
pub type BindResult<T> = Result<T, BindingError>;

impl From<Error> for BindingError {
    fn from(error: Error) -> Self {
        BindingError::Engine(error)
    }
}

impl From<PyErr> for BindingError {
    fn from(error: PyErr) -> Self {
        BindingError::Python(error)
    }
}

impl From<pyo3_arrow::error::PyArrowError> for BindingError {
    fn from(error: pyo3_arrow::error::PyArrowError) -> Self {
        BindingError::Python(error.into())
    }
}

impl From<BindingError> for PyErr {
    fn from(error: BindingError) -> PyErr {
        let error = match error {
            BindingError::Python(error) => return error,
            BindingError::Engine(error) => error,
        };
        let message = error.to_string();
        match error.kind() {
            ErrorKind::NotFound => NotFoundError::new_err(message),
            ErrorKind::Metadata => MetadataError::new_err(message),
            ErrorKind::Decode => ChunkDecodeError::new_err(message),
            ErrorKind::InvalidArgument => ConfigError::new_err(message),
            ErrorKind::PermissionDenied => PermissionDeniedError::new_err(message),
            ErrorKind::AlreadyExists => OutputExistsError::new_err(message),
            ErrorKind::Io => StorageError::new_err(message),
            ErrorKind::TimedOut => WaitTimeoutError::new_err(message),
            ErrorKind::Interrupted => PyKeyboardInterrupt::new_err(message),
            ErrorKind::Internal => CellMapError::new_err(message),
        }
    }
}

/// Runs `work` without the GIL inside the engine's thread pool, turning engine errors and
/// panics into Python exceptions.
pub fn run<T: Send>(py: Python<'_>, work: impl FnOnce() -> cellmap_engine::Result<T> + Send) -> BindResult<T> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(|| cellmap_engine::runtime::install(work)))) {
        Ok(outcome) => Ok(outcome?),
        Err(payload) => Err(Error::from_panic(payload).into()),
    }
}

/// Parses a JSON string coming from the Python layer.
pub fn parse_json(text: &str) -> cellmap_engine::Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| Error::invalid(format!("invalid configuration JSON: {e}")))
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
        let invalid = |detail: String| pyo3::exceptions::PyValueError::new_err(format!("{what}: {detail}"));
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
