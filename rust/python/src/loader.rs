//! `Collection` (datasets sharing one index space: plans and reads) and `BatchStream` (an epoch
//! read in the background by engine threads).

use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, RecordBatch, StructArray};
use arrow_schema::ArrowError;
use cellmap_engine::pipeline::loader::{BatchStream as EngineStream, Collection as EngineCollection, Next, StreamSettings};
use cellmap_engine::pipeline::read_policy::ReadErrorPolicy;
use cellmap_engine::pipeline::sampler::{class_balanced_plan, shard, uniform_plan, EpochSettings, PlannedSample, StreamKey};
use cellmap_engine::Error;
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;
use pyo3_arrow::ffi::{to_stream_pycapsule, ArrayIterator};
use pyo3_arrow::PyRecordBatch;

use crate::convert::{run, BindResult, BindingError};
use crate::dataset::{struct_field, Batch, Dataset};

type PlanTuple = (usize, usize, u64);

fn to_plan(items: Vec<PlanTuple>) -> Vec<PlannedSample> {
    items
        .into_iter()
        .map(|(dataset, index, stream)| PlannedSample::new(dataset, index, stream))
        .collect()
}

fn from_plan(plan: Vec<PlannedSample>) -> Vec<PlanTuple> {
    plan.into_iter().map(|p| (p.dataset, p.index, p.stream)).collect()
}

/// Several datasets concatenated into one sample index space.
#[pyclass(module = "cellmap_data._engine", frozen)]
pub struct Collection {
    inner: Arc<EngineCollection>,
}

#[pymethods]
impl Collection {
    /// Builds a collection; every dataset must produce the same arrays.
    #[new]
    fn new(datasets: Vec<PyRef<'_, Dataset>>) -> BindResult<Self> {
        let inner = EngineCollection::new(datasets.iter().map(|d| d.engine()).collect())?;
        Ok(Collection { inner: Arc::new(inner) })
    }

    /// Samples per dataset.
    #[getter]
    fn sizes(&self) -> Vec<usize> {
        self.inner.sizes()
    }

    /// `[n_datasets][n_classes]`: whether each dataset annotates each class.
    #[getter]
    fn annotated(&self) -> Vec<Vec<bool>> {
        self.inner.datasets.iter().map(|d| d.annotated_classes()).collect()
    }

    /// Uniform plan: `count` samples (None: all once), shuffled or in order.
    #[pyo3(signature = (count, shuffle, seed, epoch))]
    fn plan_uniform(&self, count: Option<usize>, shuffle: bool, seed: u64, epoch: u64) -> BindResult<Vec<PlanTuple>> {
        uniform_plan(&self.inner.sizes(), count, shuffle, seed, epoch)
            .map(from_plan)
            .map_err(Into::into)
    }

    /// Class-balanced plan of `count` samples.
    fn plan_balanced(&self, count: usize, seed: u64, epoch: u64) -> BindResult<Vec<PlanTuple>> {
        balanced_plan(self.inner.sizes(), self.annotated(), count, seed, epoch)
    }

    /// Shard `part` of `parts` of a plan.
    #[staticmethod]
    fn shard(plan: Vec<PlanTuple>, part: usize, parts: usize) -> BindResult<Vec<PlanTuple>> {
        shard(&to_plan(plan), part, parts).map(from_plan).map_err(Into::into)
    }

    /// Reads one batch of planned samples now.
    #[pyo3(signature = (samples, *, seed=0, epoch=0, augment=false))]
    fn read(&self, py: Python<'_>, samples: Vec<PlanTuple>, seed: u64, epoch: u64, augment: bool) -> BindResult<Batch> {
        let inner = self.inner.clone();
        let key = StreamKey { seed, epoch, rank: 0 };
        let batch = run(py, move || {
            inner.read(&to_plan(samples), key, augment, None, ReadErrorPolicy::Raise)
        })?;
        Batch::from_engine(batch)
    }

    /// The batches of one epoch from its settings (JSON: source, samples, batch_size, drop_last,
    /// iterations, rank, world_size, worker, workers, seed, epoch); every random decision comes
    /// from the keyed streams.
    fn epoch_plan(&self, settings_json: &str) -> BindResult<Vec<Vec<PlanTuple>>> {
        let settings = epoch_settings(settings_json)?;
        let batches = self.inner.epoch_plan(&settings)?;
        Ok(batches.into_iter().map(from_plan).collect())
    }

    /// Plans the epoch of `settings_json` ([`Collection::epoch_plan`]) and starts reading it in
    /// the background from batch `start` (a resumed epoch): one call, the plan never crosses to
    /// Python.
    #[pyo3(signature = (settings_json, *, threads, prefetch, augment=false, start=0))]
    fn epoch_stream(&self, settings_json: &str, threads: usize, prefetch: usize, augment: bool, start: usize) -> BindResult<BatchStream> {
        let settings = epoch_settings(settings_json)?;
        let mut plan = self.inner.epoch_plan(&settings)?;
        plan.drain(..start.min(plan.len()));
        let stream_settings = StreamSettings {
            threads,
            prefetch,
            key: StreamKey {
                seed: settings.seed,
                epoch: settings.epoch,
                rank: 0,
            },
            augment,
            on_read_error: settings.on_read_error,
        };
        let stream = EngineStream::start((*self.inner).clone(), plan, stream_settings)?;
        Ok(BatchStream {
            inner: std::sync::Mutex::new(Some(stream)),
            pid: std::process::id(),
        })
    }

    /// The shape of the epoch of `settings_json` on this rank, without planning it: `planned`
    /// (samples, all ranks), `per_rank`, `padding` (repeats added so the ranks' shares are
    /// equal), `dropped` (cut with `drop_last`), `batches` (per rank) and `worker_batches`.
    fn epoch_shape(&self, settings_json: &str) -> BindResult<std::collections::HashMap<&'static str, usize>> {
        let settings = epoch_settings(settings_json)?;
        let shape = self.inner.epoch_shape(&settings)?;
        Ok(std::collections::HashMap::from([
            ("planned", shape.planned),
            ("per_rank", shape.per_rank),
            ("padding", shape.padding),
            ("dropped", shape.dropped),
            ("batches", shape.batches),
            ("worker_batches", shape.worker_batches),
            ("worker_samples", shape.worker_samples),
        ]))
    }

    /// The sample metadata of the epoch of `settings_json`, read from its plan alone: the
    /// columns every batch's record batch carries, after a `batch` column.
    #[pyo3(signature = (settings_json, *, augment=false))]
    fn epoch_metadata(&self, py: Python<'_>, settings_json: &str, augment: bool) -> BindResult<PyRecordBatch> {
        let settings = epoch_settings(settings_json)?;
        let inner = self.inner.clone();
        let table = run(py, move || {
            let plan = inner.epoch_plan(&settings)?;
            inner.plan_metadata(
                &plan,
                StreamKey {
                    seed: settings.seed,
                    epoch: settings.epoch,
                    rank: 0,
                },
                augment,
            )
        })?;
        Ok(PyRecordBatch::new(table))
    }

    /// Starts reading `batches` in the background on `threads` engine threads, keeping at most
    /// `prefetch` batches ahead.
    #[pyo3(signature = (batches, *, threads, prefetch, seed=0, epoch=0, augment=false))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        batches: Vec<Vec<PlanTuple>>,
        threads: usize,
        prefetch: usize,
        seed: u64,
        epoch: u64,
        augment: bool,
    ) -> BindResult<BatchStream> {
        let settings = StreamSettings {
            threads,
            prefetch,
            key: StreamKey { seed, epoch, rank: 0 },
            augment,
            on_read_error: ReadErrorPolicy::Raise,
        };
        let collection = (*self.inner).clone();
        let plan = batches.into_iter().map(to_plan).collect();
        let stream = EngineStream::start(collection, plan, settings)?;
        Ok(BatchStream {
            inner: std::sync::Mutex::new(Some(stream)),
            pid: std::process::id(),
        })
    }
}

/// The class-balanced plan of `count` samples over datasets of `sizes` samples, where
/// `annotated[d][c]` says whether dataset (row) `d` annotates class `c`: `(row, index in row,
/// stream)` per sample. For any dataset that reports its crop-class matrix.
#[pyfunction]
pub fn balanced_plan(sizes: Vec<usize>, annotated: Vec<Vec<bool>>, count: usize, seed: u64, epoch: u64) -> BindResult<Vec<PlanTuple>> {
    class_balanced_plan(&sizes, &annotated, count, seed, epoch)
        .map(from_plan)
        .map_err(Into::into)
}

fn epoch_settings(settings_json: &str) -> BindResult<EpochSettings> {
    serde_json::from_str(settings_json).map_err(|e| BindingError::from(Error::invalid(format!("epoch settings: {e}"))))
}

/// An epoch being read by engine threads; iterate it to get `Batch`es in plan order.
#[pyclass(module = "cellmap_data._engine")]
pub struct BatchStream {
    inner: std::sync::Mutex<Option<EngineStream>>,
    pid: u32,
}

#[pymethods]
impl BatchStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> BindResult<Batch> {
        self.check_process()?;
        loop {
            let next = py.detach(|| {
                let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_mut() {
                    Some(stream) => stream.next(Duration::from_millis(50)),
                    None => Next::Done,
                }
            });
            match next {
                Next::Batch(Ok(batch)) => return Batch::from_engine(batch),
                Next::Batch(Err(error)) => {
                    self.close(py);
                    return Err(BindingError::from(error));
                }
                Next::Done => {
                    self.close(py);
                    return Err(PyStopIteration::new_err(()).into());
                }
                Next::Pending => {
                    // Ctrl-C while waiting: stop the engine threads, then raise.
                    if let Err(interrupt) = py.check_signals() {
                        self.close(py);
                        return Err(interrupt.into());
                    }
                }
            }
        }
    }

    /// Arrow PyCapsule interface: the rest of the epoch as a stream of record batches (each
    /// batch one struct array of its columns), for `pyarrow.RecordBatchReader.from_stream`,
    /// `polars` and DuckDB. The stream takes over the engine's reads: this object is then spent.
    /// The first batch is awaited here (its schema is the stream's).
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyCapsule>>,
    ) -> BindResult<Bound<'py, PyCapsule>> {
        self.check_process()?;
        let taken = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut stream = taken.ok_or_else(|| Error::invalid("this batch stream was read to its end or closed"))?;
        let first = py.detach(|| next_record_batch(&mut stream)).transpose()?;
        let Some(first) = first else {
            return Err(Error::invalid("this batch stream has no batches left to export").into());
        };
        let schema = first.schema();
        let field = struct_field(&schema);
        let rest = std::iter::from_fn(move || {
            next_record_batch(&mut stream).map(|result| result.map_err(|e| ArrowError::ExternalError(Box::new(e))))
        });
        let arrays = std::iter::once(Ok(first))
            .chain(rest)
            .map(|batch| batch.map(|b| Arc::new(StructArray::from(b)) as ArrayRef));
        Ok(to_stream_pycapsule(
            py,
            Box::new(ArrayIterator::new(arrays, field)),
            requested_schema,
        )?)
    }

    /// Stops the background reads and frees queued batches.
    fn close(&self, py: Python<'_>) {
        let stream = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut s) = stream {
            if std::process::id() != self.pid {
                // A forked child inherited the stream but not its threads: nothing to stop or
                // join here (joining would fail), and the memory is the parent's copy.
                std::mem::forget(s);
                return;
            }
            py.detach(move || s.stop());
        }
    }
}

impl BatchStream {
    /// A forked child inherits the stream but not the engine threads reading it.
    fn check_process(&self) -> BindResult<()> {
        if std::process::id() != self.pid {
            return Err(Error::invalid("this batch stream belongs to the parent process; iterate the loader again in this process").into());
        }
        Ok(())
    }
}

/// The stream's next batch as a record batch, waiting for it; `None` at the end.
fn next_record_batch(stream: &mut EngineStream) -> Option<cellmap_engine::Result<RecordBatch>> {
    loop {
        match stream.next(Duration::from_millis(50)) {
            Next::Batch(batch) => return Some(batch.and_then(|b| b.into_record_batch())),
            Next::Done => return None,
            Next::Pending => {}
        }
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            let inherited = self.inner.get_mut().unwrap_or_else(|e| e.into_inner()).take();
            std::mem::forget(inherited);
        }
    }
}
