//! `Dataset` and `Batch`: one raw volume + one crop, read a batch at a time.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt64Type, UInt8Type};
use arrow_array::{Array, RecordBatch};
use arrow_array::{ArrayRef, StructArray};
use arrow_buffer::Buffer;
use arrow_schema::{Field, FieldRef, Schema};
use cellmap_engine::pipeline::batch::Batch as EngineBatch;
use cellmap_engine::pipeline::dataset::{Dataset as EngineDataset, DatasetConfig};
use cellmap_engine::pipeline::read_policy::ReadIncident;
use cellmap_engine::pipeline::sampler::{centred_requests, requests, StreamKey};
use cellmap_engine::source::cache::ChunkCache;
use cellmap_engine::Error;
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyTuple};
use pyo3_arrow::ffi::{to_array_pycapsules, to_schema_pycapsule, to_stream_pycapsule, ArrayIterator};
use pyo3_arrow::PyRecordBatch;

use crate::convert::{parse_json, run, ArrayMemory, BindResult, BindingError};
use crate::tensor::{Element, Tensor};

/// One raw volume with one crop's labels, as configured by `CellMapDataset`.
#[pyclass(module = "cellmap_data._engine", frozen)]
pub struct Dataset {
    inner: Arc<EngineDataset>,
}

type BoxTuple = (Vec<f64>, Vec<f64>);

impl Dataset {
    /// The engine dataset.
    pub fn engine(&self) -> Arc<EngineDataset> {
        self.inner.clone()
    }
}

#[pymethods]
impl Dataset {
    /// Opens a dataset from its JSON configuration (built by `cellmap_data._config`).
    #[new]
    fn new(py: Python<'_>, config_json: &str) -> BindResult<Self> {
        let value = parse_json(config_json)?;
        let inner = run(py, move || {
            let config = DatasetConfig::from_json(&value)?;
            EngineDataset::open(config, ChunkCache::global())
        })?;
        Ok(Dataset { inner: Arc::new(inner) })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// World centre (z, y, x nm) of grid sample `index`.
    fn centre(&self, index: usize) -> BindResult<[f64; 3]> {
        self.inner.centre(index).map_err(Into::into)
    }

    /// Intersection of the raw and annotated label boxes, as (lo, hi).
    #[getter]
    fn bounding_box(&self) -> BoxTuple {
        let b = self.inner.bounding_box;
        (b.lo.to_vec(), b.hi.to_vec())
    }

    /// Box of valid sample centres, or None when no patch fits.
    #[getter]
    fn sampling_box(&self) -> Option<BoxTuple> {
        self.inner.sampling_box.map(|b| (b.lo.to_vec(), b.hi.to_vec()))
    }

    /// Samples per axis of the sample grid.
    #[getter]
    fn grid(&self) -> [usize; 3] {
        self.inner.grid
    }

    /// Indices of the samples stepping by `step` grid positions per axis, the last on each axis
    /// at the far end (validation tiles covering the whole grid).
    fn tile_indices(&self, step: [usize; 3]) -> Vec<u64> {
        self.inner.tile_indices(step)
    }

    /// Raw level read by each input array.
    #[getter]
    fn input_levels(&self) -> Vec<usize> {
        self.inner.input_levels.clone()
    }

    /// Per target array, per class, the label level read (None: unannotated).
    #[getter]
    fn target_levels(&self) -> Vec<Vec<Option<usize>>> {
        self.inner.target_levels.clone()
    }

    /// Per-sample tensor shape of each array, in output order.
    #[getter]
    fn sample_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.inner.sample_shapes()
    }

    /// Singleton axis shared by all arrays (2D patches), if any.
    #[getter]
    fn planar_axis(&self) -> Option<usize> {
        self.inner.planar_axis
    }

    /// Reads the grid samples `indices` as one batch. With `augment`, each sample's spatial
    /// draw comes from the stream keyed by (seed, epoch, rank, stream index), where the stream
    /// index is `stream_indices[i]` when given, else the sample index.
    #[pyo3(signature = (indices, *, seed=0, epoch=0, rank=0, augment=false, stream_indices=None))]
    #[allow(clippy::too_many_arguments)]
    fn read_batch(
        &self,
        py: Python<'_>,
        indices: Vec<usize>,
        seed: u64,
        epoch: u64,
        rank: u64,
        augment: bool,
        stream_indices: Option<Vec<u64>>,
    ) -> BindResult<Batch> {
        let inner = self.inner.clone();
        let key = StreamKey { seed, epoch, rank };
        let batch = run(py, move || {
            let requests = requests(&inner, &indices, stream_indices.as_deref(), key, augment)?;
            EngineBatch::read(&inner, &requests)
        })?;
        Batch::from_engine(batch)
    }
    /// Reads patches centred at arbitrary world `centres` (z, y, x nm) without augmentation;
    /// `indices` label the samples in the batch's `idx` column.
    fn read_centres(&self, py: Python<'_>, centres: Vec<[f64; 3]>, indices: Vec<u64>) -> BindResult<Batch> {
        let inner = self.inner.clone();
        let batch = run(py, move || EngineBatch::read(&inner, &centred_requests(&centres, &indices)?))?;
        Batch::from_engine(batch)
    }
}

/// `(position, action, dataset, index, centre, message)` of a read incident, as Python sees it.
type IncidentTuple = (usize, &'static str, String, u64, [f64; 3], String);

/// A batch read by the engine: an Arrow record batch whose tensor columns can be taken as
/// zero-copy DLPack tensors.
#[pyclass(module = "cellmap_data._engine", frozen)]
pub struct Batch {
    record_batch: RecordBatch,
    shapes: Vec<(String, Vec<usize>)>,
    positions: Vec<usize>,
    incidents: Vec<ReadIncident>,
}

impl Batch {
    /// Converts an engine batch (into Arrow, without copying tensors).
    pub fn from_engine(batch: EngineBatch) -> BindResult<Batch> {
        let shapes = batch.columns.iter().map(|c| (c.name.clone(), c.sample_shape.clone())).collect();
        let positions = batch.positions.clone();
        let incidents = batch.incidents.clone();
        let record_batch = batch.into_record_batch()?;
        Ok(Batch {
            record_batch,
            shapes,
            positions,
            incidents,
        })
    }
}

impl Batch {
    /// The values buffer of tensor column `name`, its `[batch, *sample_shape]` shape and its
    /// element type.
    fn column(&self, name: &str) -> BindResult<(Buffer, Vec<usize>, Element)> {
        let (_, sample_shape) = self
            .shapes
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| PyKeyError::new_err(format!("no tensor column '{name}'")))?;
        let column = self.record_batch.column_by_name(name).expect("tensor column exists");
        let values = column.as_fixed_size_list().values();
        let mut shape = vec![self.record_batch.num_rows()];
        shape.extend(sample_shape);
        Ok(match values.data_type() {
            arrow_schema::DataType::UInt8 => (values.as_primitive::<UInt8Type>().values().inner().clone(), shape, Element::U8),
            _ => (values.as_primitive::<Float32Type>().values().inner().clone(), shape, Element::F32),
        })
    }
}

#[pymethods]
impl Batch {
    fn __len__(&self) -> usize {
        self.record_batch.num_rows()
    }

    /// Names of the tensor columns (inputs then targets).
    #[getter]
    fn tensor_names(&self) -> Vec<String> {
        self.shapes.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The tensor column `name` as a `[batch, *sample_shape]` DLPack tensor (no copy).
    fn tensor(&self, name: &str) -> BindResult<Tensor> {
        let (values, shape, element) = self.column(name)?;
        Tensor::with_element(values, shape, element)
    }

    /// Copies the tensor column `name` into `out`, a writable C-contiguous uint8 numpy array of
    /// exactly its size in bytes (e.g. a view of a pinned torch tensor), on the engine's threads
    /// without the GIL.
    fn copy_tensor_into(&self, py: Python<'_>, name: &str, out: &Bound<'_, PyAny>) -> BindResult<()> {
        let (source, _, _) = self.column(name)?;
        let memory = ArrayMemory::of(out, "|u1", "copy_tensor_into")?;
        if !memory.writable {
            return Err(PyValueError::new_err("copy_tensor_into needs a writable, C-contiguous uint8 array").into());
        }
        if memory.len != source.len() {
            return Err(PyValueError::new_err(format!(
                "tensor '{name}' holds {} bytes but the destination has {}",
                source.len(),
                memory.len
            ))
            .into());
        }
        let address = memory.address;
        run(py, move || {
            // SAFETY: the array is writable, C-contiguous and exactly this long (checked above),
            // and `out` (held by this call) keeps it alive until the call returns.
            let dst = unsafe { std::slice::from_raw_parts_mut(address as *mut u8, source.len()) };
            cellmap_engine::pipeline::batch::copy_parallel(source.as_slice(), dst);
            Ok(())
        })
    }

    /// The whole batch as an Arrow record batch (Arrow PyCapsule interface).
    fn record_batch(&self) -> PyRecordBatch {
        PyRecordBatch::new(self.record_batch.clone())
    }

    /// The per-sample metadata columns only (no tensor column), as a record batch.
    fn metadata(&self) -> BindResult<PyRecordBatch> {
        let keep: Vec<usize> = (0..self.record_batch.num_columns())
            .filter(|&i| !self.shapes.iter().any(|(n, _)| n == self.record_batch.schema().field(i).name()))
            .collect();
        let projected = self
            .record_batch
            .project(&keep)
            .map_err(|e| BindingError::from(Error::invalid(format!("selecting metadata columns: {e}"))))?;
        Ok(PyRecordBatch::new(projected))
    }

    /// The per-class counts of the delivered targets only (`foreground_*`, `fraction_*`,
    /// `unknown_*` columns), as a record batch.
    fn class_tallies(&self) -> BindResult<PyRecordBatch> {
        let schema = self.record_batch.schema();
        let keep: Vec<usize> = (0..self.record_batch.num_columns())
            .filter(|&i| {
                let name = schema.field(i).name();
                ["foreground_", "fraction_", "unknown_"].iter().any(|p| name.starts_with(p))
            })
            .collect();
        let projected = self
            .record_batch
            .project(&keep)
            .map_err(|e| BindingError::from(Error::invalid(format!("selecting the class columns: {e}"))))?;
        Ok(PyRecordBatch::new(projected))
    }

    /// Each sample's index within its dataset.
    #[getter]
    fn indices(&self) -> Vec<u64> {
        let column = self.record_batch.column_by_name("idx").expect("every batch has idx");
        column.as_primitive::<UInt64Type>().values().to_vec()
    }

    /// Each sample's dataset position in the collection it was read from (empty for a batch
    /// read from one dataset).
    #[getter]
    fn positions(&self) -> Vec<usize> {
        self.positions.clone()
    }

    /// Reads retried or samples replaced while reading this batch, per the loader's
    /// `on_read_error`: `(position, action, dataset, index, (z, y, x) centre, message)` with
    /// action `retried` or `skipped` (the sample at `position` is then its replacement).
    #[getter]
    fn incidents(&self) -> Vec<IncidentTuple> {
        self.incidents
            .iter()
            .map(|i| (i.position, i.action, i.dataset.clone(), i.index, i.centre, i.message.clone()))
            .collect()
    }

    /// Each sample's `value_seed` (read from the batch without converting it).
    #[getter]
    fn value_seeds(&self) -> Vec<u64> {
        let column = self.record_batch.column_by_name("value_seed").expect("every batch has value_seed");
        column.as_primitive::<UInt64Type>().values().to_vec()
    }

    /// Arrow PyCapsule interface: the batch as one Arrow array (a struct of its columns), so
    /// `polars.from_arrow`, `pyarrow.record_batch` and DuckDB take it directly. Tensor columns
    /// keep their fixed-shape-tensor extension type. Exported from the batch itself, no copy.
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_array__<'py>(&self, py: Python<'py>, requested_schema: Option<Bound<'py, PyCapsule>>) -> BindResult<Bound<'py, PyTuple>> {
        let array = StructArray::from(self.record_batch.clone());
        Ok(to_array_pycapsules(py, self.struct_field(), &array, requested_schema)?)
    }

    /// Arrow PyCapsule interface: the batch's schema.
    fn __arrow_c_schema__<'py>(&self, py: Python<'py>) -> BindResult<Bound<'py, PyCapsule>> {
        Ok(to_schema_pycapsule(py, self.record_batch.schema().as_ref())?)
    }

    /// Arrow PyCapsule interface: the batch as a stream of one record batch.
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyCapsule>>,
    ) -> BindResult<Bound<'py, PyCapsule>> {
        let array: ArrayRef = Arc::new(StructArray::from(self.record_batch.clone()));
        let reader = ArrayIterator::new(std::iter::once(Ok(array)), self.struct_field());
        Ok(to_stream_pycapsule(py, Box::new(reader), requested_schema)?)
    }
}

impl Batch {
    fn struct_field(&self) -> FieldRef {
        struct_field(&self.record_batch.schema())
    }
}

/// A record batch's columns as the fields of one struct (with the schema's metadata): the
/// field every Arrow export of batches names.
pub(crate) fn struct_field(schema: &Schema) -> FieldRef {
    Arc::new(Field::new_struct("", schema.fields().clone(), false).with_metadata(schema.metadata().clone()))
}
