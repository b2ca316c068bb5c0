//! `ImageWriter`: one output image written tile by tile by the engine (used by
//! `cellmap_data.ImageWriter` and `cellmap_data.CellMapDatasetWriter`).

use std::ptr::NonNull;
use std::sync::Arc;

use arrow_buffer::Buffer;
use cellmap_engine::writer::{finish_ranks as finish_ranks_in_engine, ImageWriter as EngineWriter, WriterConfig};
use cellmap_engine::Error;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{parse_json, run, ArrayMemory, BindResult, BindingError};
use crate::tensor::Tensor;

/// An output image being written (zarr v2 + OME-NGFF 0.4 or zarr v3 + OME-NGFF 0.5).
#[pyclass(module = "cellmap_data._engine", frozen)]
pub struct ImageWriter {
    inner: Arc<EngineWriter>,
}

/// A read-only view of a C-contiguous float32 numpy array, usable without the GIL.
struct Values(NonNull<[f32]>);
// SAFETY: the array is kept alive by the reference the caller holds for the whole call; the
// engine only reads it.
unsafe impl Send for Values {}
unsafe impl Sync for Values {}

impl Values {
    fn of(array: &Bound<'_, PyAny>) -> BindResult<Values> {
        let memory = ArrayMemory::of(array, "<f4", "prediction data")
            .map_err(|e| BindingError::from(Error::invalid(format!("must be a C-contiguous float32 array ({e})"))))?;
        let slice = std::ptr::slice_from_raw_parts_mut(memory.address as *mut f32, memory.len);
        NonNull::new(slice)
            .map(Values)
            .ok_or_else(|| BindingError::from(Error::invalid("prediction data is a null array")))
    }

    fn slice(&self) -> &[f32] {
        // SAFETY: see the Send/Sync note above.
        unsafe { self.0.as_ref() }
    }
}

fn parse_config(config_json: &str) -> BindResult<WriterConfig> {
    let value = parse_json(config_json)?;
    WriterConfig::from_json(&value).map_err(Into::into)
}

#[pymethods]
impl ImageWriter {
    /// Creates the output image described by `config_json` (built by `cellmap_data.writer`).
    #[new]
    fn new(py: Python<'_>, config_json: &str) -> BindResult<Self> {
        let config = parse_config(config_json)?;
        let inner = run(py, move || EngineWriter::create(config))?;
        Ok(ImageWriter { inner: Arc::new(inner) })
    }

    /// Checks a configuration (values, existing output, write permission) without writing.
    #[staticmethod]
    fn validate(py: Python<'_>, config_json: &str) -> BindResult<()> {
        let config = parse_config(config_json)?;
        run(py, move || EngineWriter::validate(&config))
    }

    /// Removes an existing image at the configured path (checked as `overwrite` checks it);
    /// returns whether one was there.
    #[staticmethod]
    fn clear(py: Python<'_>, config_json: &str) -> BindResult<bool> {
        let config = parse_config(config_json)?;
        run(py, move || EngineWriter::clear(&config))
    }

    /// The image group path.
    #[getter]
    fn path(&self) -> String {
        self.inner.config().path.to_string()
    }

    /// Array shape of the first level (z, y, x voxels).
    #[getter]
    fn shape(&self) -> [u64; 3] {
        self.inner.shape()
    }

    /// Chunk shape (z, y, x voxels).
    #[getter]
    fn chunks(&self) -> [usize; 3] {
        self.inner.config().chunk_shape
    }

    /// Shape of one write (z, y, x voxels).
    #[getter]
    fn write_shape(&self) -> [usize; 3] {
        self.inner.config().write_shape
    }

    /// World coordinate (nm) of the centre of voxel 0 (the metadata's translation).
    #[getter]
    fn translation(&self) -> [f64; 3] {
        self.inner.translation()
    }

    /// One dict per level: path, shape, voxel_size, translation.
    #[getter]
    fn levels<'py>(&self, py: Python<'py>) -> BindResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .levels()
            .into_iter()
            .map(|(path, shape, voxel, translation)| {
                let d = PyDict::new(py);
                d.set_item("path", path)?;
                d.set_item("shape", shape.to_vec())?;
                d.set_item("voxel_size", voxel.to_vec())?;
                d.set_item("translation", translation.to_vec())?;
                Ok(d)
            })
            .collect()
    }

    /// Number of planned tiles (0 without a plan).
    fn __len__(&self) -> usize {
        self.inner.plan().map_or(0, |p| p.len())
    }

    /// Per-axis tile starts of the plan (array voxels), or None without a plan.
    #[getter]
    fn tile_starts(&self) -> Option<[Vec<i64>; 3]> {
        self.inner.plan().map(|p| p.starts.clone())
    }

    /// World centres (z, y, x nm) of planned tiles `indices`.
    fn tile_centres(&self, indices: Vec<usize>) -> BindResult<Vec<[f64; 3]>> {
        indices.iter().map(|&i| self.inner.tile_centre(i).map_err(Into::into)).collect()
    }

    /// The planned tiles this process has to write, ascending (its rank's share; without the
    /// chunks already complete when it opened).
    fn tiles_to_write(&self, py: Python<'_>) -> BindResult<Vec<usize>> {
        let inner = self.inner.clone();
        run(py, move || inner.tiles_to_write())
    }

    /// Completion of the first level, read from disk: `(complete chunks per rank that wrote
    /// them, total chunks)`, or None without a tiling plan.
    fn progress(&self, py: Python<'_>) -> BindResult<Option<(std::collections::BTreeMap<usize, u64>, u64)>> {
        let inner = self.inner.clone();
        run(py, move || inner.progress())
    }

    /// `(built, total)` chunks of the second level (counted on disk), or None without
    /// downsampled levels or a tiling plan.
    fn levels_done(&self, py: Python<'_>) -> BindResult<Option<(u64, u64)>> {
        let inner = self.inner.clone();
        run(py, move || inner.levels_done())
    }

    /// Writes planned tiles `indices`: `data` is a C-contiguous float32 numpy array holding one
    /// tile after another.
    fn write_tiles(&self, py: Python<'_>, indices: Vec<usize>, data: &Bound<'_, PyAny>) -> BindResult<()> {
        let values = Values::of(data)?;
        let inner = self.inner.clone();
        run(py, move || inner.write_tiles(&indices, values.slice()))
    }

    /// Writes boxes of the write shape at `starts` (array voxels; clipped to the array).
    fn write_boxes(&self, py: Python<'_>, starts: Vec<[i64; 3]>, data: &Bound<'_, PyAny>) -> BindResult<()> {
        let values = Values::of(data)?;
        let inner = self.inner.clone();
        run(py, move || inner.write_boxes(&starts, values.slice()))
    }

    /// Reads back `shape` voxels starting at `start` (pending data included).
    fn read_box(&self, py: Python<'_>, start: [i64; 3], shape: [usize; 3]) -> BindResult<Tensor> {
        let inner = self.inner.clone();
        let values = run(py, move || inner.read_box(start, shape))?;
        Tensor::new(Buffer::from_vec(values), shape.to_vec())
    }

    /// Writes every pending chunk.
    fn flush(&self, py: Python<'_>) -> BindResult<()> {
        let inner = self.inner.clone();
        run(py, move || inner.flush())
    }

    /// Flushes, writes the downsampled levels, and refuses further writes.
    fn close(&self, py: Python<'_>) -> BindResult<()> {
        let inner = self.inner.clone();
        run(py, move || inner.close())
    }

    /// Whether `close` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Counters: chunks_written, bytes_written, pending_chunks, complete_chunks.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> BindResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("chunks_written", s.chunks_written)?;
        d.set_item("bytes_written", s.bytes_written)?;
        d.set_item("pending_chunks", s.pending_chunks)?;
        d.set_item("complete_chunks", s.complete_chunks)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("ImageWriter('{}', shape={:?})", self.inner.config().path, self.inner.shape())
    }
}

/// Rank 0's close of a job written by several ranks (`CellMapDatasetWriter.close`): flushes
/// `writers`, builds rank 0's shares of their second levels, and waits (up to `timeout`
/// seconds, Ctrl-C ends it) until every rank's chunks are there. Returns
/// `{"done", "total", "by_rank"}`; raises `TimeoutError` naming `job` and what is missing.
#[pyfunction]
pub fn finish_ranks<'py>(
    py: Python<'py>,
    writers: Vec<PyRef<'py, ImageWriter>>,
    job: &str,
    timeout: f64,
) -> BindResult<Bound<'py, PyDict>> {
    let engines: Vec<Arc<EngineWriter>> = writers.iter().map(|w| w.inner.clone()).collect();
    let job = job.to_string();
    let outcome = py.detach(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let refs: Vec<&EngineWriter> = engines.iter().map(|w| w.as_ref()).collect();
            // Signals are seen on the main thread, which waits here.
            let interrupted = || Python::attach(|py| py.check_signals().is_err());
            finish_ranks_in_engine(&refs, &job, timeout, &interrupted)
        }))
    });
    let done = match outcome {
        Ok(result) => result?,
        Err(payload) => return Err(Error::from_panic(payload).into()),
    };
    let d = PyDict::new(py);
    d.set_item("done", done.done)?;
    d.set_item("total", done.total)?;
    d.set_item("by_rank", done.by_rank.into_iter().collect::<Vec<_>>())?;
    Ok(d)
}
