//! A read-only view of a float32 batch buffer exported through DLPack, so `torch.from_dlpack`
//! (and numpy) take it without copying. The view keeps the Arrow buffer alive; the memory is
//! freed when the last consumer lets go.

use std::ffi::c_void;

use arrow_buffer::Buffer;
use dlpark::ffi::{DLDataType, DLDevice, DLManagedTensor, DLManagedTensorVersioned};
use dlpark::metadata::Dynamic;
use dlpark::python::{export_dlpack, DlpackExporter, ExportRequest};
use dlpark::{DlpackFlags, Managed, ManagedTensorBase};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::BindResult;

/// Element types a batch tensor can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// float32
    F32,
    /// uint8 (compact targets)
    U8,
}

impl Element {
    fn size(self) -> usize {
        match self {
            Element::F32 => 4,
            Element::U8 => 1,
        }
    }

    fn dlpack(self) -> DLDataType {
        match self {
            Element::F32 => DLDataType::of::<f32>(),
            Element::U8 => DLDataType::of::<u8>(),
        }
    }
}

/// A CPU tensor sharing memory with an engine batch.
#[pyclass(module = "cellmap_data._engine", frozen)]
pub struct Tensor {
    buffer: Buffer,
    shape: Vec<i64>,
    element: Element,
}

impl Tensor {
    /// A float32 tensor of `shape` over `buffer`.
    pub fn new(buffer: Buffer, shape: Vec<usize>) -> BindResult<Tensor> {
        Tensor::with_element(buffer, shape, Element::F32)
    }

    /// A tensor of `shape` and `element` type over `buffer` (which must hold exactly that many values).
    pub fn with_element(buffer: Buffer, shape: Vec<usize>, element: Element) -> BindResult<Tensor> {
        let n: usize = shape.iter().product();
        if n * element.size() != buffer.len() {
            return Err(PyValueError::new_err(format!("tensor shape {shape:?} does not match a buffer of {} bytes", buffer.len())).into());
        }
        Ok(Tensor {
            buffer,
            shape: shape.into_iter().map(|s| s as i64).collect(),
            element,
        })
    }

    fn export<M: ManagedTensorBase>(&self) -> PyResult<Managed<M>> {
        let prepared = Dynamic::compact(self.shape.clone())
            .prepare_as::<M>()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        // The DLPack context owns a clone of the buffer, keeping the memory alive.
        let owner = Box::new(self.buffer.clone());
        let data = owner.as_ptr() as *mut c_void;
        let mut initialized = prepared.initialize(owner);
        initialized.set_data(data);
        initialized.set_dtype(self.element.dlpack());
        initialized.set_device(DLDevice::CPU);
        // SAFETY: data, shape and dtype describe the live buffer owned by the context.
        Ok(unsafe { initialized.finish() })
    }
}

impl DlpackExporter for Tensor {
    fn device(&self) -> DLDevice {
        DLDevice::CPU
    }

    fn flags(&self) -> DlpackFlags {
        DlpackFlags::empty()
    }

    fn prepare_export(&self, _py: Python<'_>, _request: &ExportRequest<'_>) -> PyResult<()> {
        Ok(())
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        self.export()
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        self.export()
    }
}

#[pymethods]
impl Tensor {
    /// DLPack export (zero copy).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let request = ExportRequest::parse(stream.as_ref(), max_version, dl_device, copy)?;
        export_dlpack(self, py, request)
    }

    /// DLPack device: always CPU (device type 1, id 0).
    fn __dlpack_device__(&self) -> (i32, i32) {
        (1, 0)
    }

    /// Shape of the tensor.
    #[getter]
    fn shape(&self) -> Vec<i64> {
        self.shape.clone()
    }

    /// Element type name (`float32` or `uint8`).
    #[getter]
    fn dtype(&self) -> &'static str {
        match self.element {
            Element::F32 => "float32",
            Element::U8 => "uint8",
        }
    }

    /// Address of the first element (to check sharing).
    #[getter]
    fn data_ptr(&self) -> usize {
        self.buffer.as_ptr() as usize
    }
}
