//! Class counts and Polars statistics: `label_counts`, `class_stats` and the
//! `CountProgress` handle a progress bar polls while a count runs with the GIL released.

use std::path::PathBuf;

use cellmap_engine::io::location::Location;
use std::sync::Arc;

use cellmap_engine::pipeline::labels::{self, ClassCounts, CountCache, CountOptions, Progress};
use cellmap_engine::pipeline::stats::{self, StatsEntry};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3_arrow::PyRecordBatch;

use crate::convert::{run, BindResult};

/// Progress of a running count (chunks scanned / announced), shared with the engine threads;
/// `cancel()` makes the count stop with `KeyboardInterrupt`.
#[pyclass(module = "cellmap_data._engine", frozen)]
pub struct CountProgress {
    inner: Arc<Progress>,
}

#[pymethods]
impl CountProgress {
    #[new]
    fn new() -> Self {
        CountProgress {
            inner: Arc::new(Progress::new()),
        }
    }

    /// Chunks scanned so far.
    #[getter]
    fn done(&self) -> u64 {
        self.inner.done()
    }

    /// Chunks announced so far (grows as scans start).
    #[getter]
    fn total(&self) -> u64 {
        self.inner.total()
    }

    /// Asks the running count to stop.
    fn cancel(&self) {
        self.inner.cancel()
    }

    /// Whether `cancel()` was called.
    #[getter]
    fn cancelled(&self) -> bool {
        self.inner.is_cancelled()
    }
}

fn options(cache_dir: Option<PathBuf>, use_cache: bool, use_metadata: bool) -> CountOptions {
    let cache = if use_cache {
        CountCache::resolve(cache_dir)
    } else {
        CountCache::Disabled
    };
    CountOptions { cache, use_metadata }
}

fn counts_dict<'py>(py: Python<'py>, c: &ClassCounts) -> BindResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", c.path.to_string())?;
    d.set_item("level", c.level)?;
    d.set_item("level_path", c.level_path.to_string())?;
    d.set_item("voxel_size", c.voxel_size.to_vec())?;
    d.set_item("shape", c.shape.to_vec())?;
    d.set_item("world_box", (c.world_box.lo.to_vec(), c.world_box.hi.to_vec()))?;
    d.set_item("level_foreground", c.level_foreground)?;
    d.set_item("level_unknown", c.level_unknown)?;
    d.set_item("training_voxel_size", c.training_voxel_size.to_vec())?;
    d.set_item("ratio", c.ratio)?;
    d.set_item("foreground", c.foreground)?;
    d.set_item("total", c.total)?;
    d.set_item("fraction", c.fraction())?;
    d.set_item("weight", c.weight())?;
    d.set_item("source", c.source.as_str())?;
    Ok(d)
}

/// Foreground/total counts of the label group `path` at the training `voxel_size` (z, y, x nm),
/// from metadata, the count cache, or a parallel scan (see `cellmap_engine::pipeline::labels`).
#[pyfunction]
#[pyo3(signature = (path, voxel_size, *, cache_dir=None, use_cache=true, use_metadata=true, progress=None))]
fn label_counts<'py>(
    py: Python<'py>,
    path: String,
    voxel_size: [f64; 3],
    cache_dir: Option<PathBuf>,
    use_cache: bool,
    use_metadata: bool,
    progress: Option<PyRef<'py, CountProgress>>,
) -> BindResult<Bound<'py, PyDict>> {
    let options = options(cache_dir, use_cache, use_metadata);
    let progress = progress.map(|p| p.inner.clone());
    let counts = run(py, move || {
        labels::count_label_group(Location::parse(&path), voxel_size, &options, progress.as_deref())
    })?;
    counts_dict(py, &counts)
}

/// `(dataset, crop, class, label group path or None, training voxel size)` as Python passes it.
type EntryTuple = (String, String, String, Option<String>, [f64; 3]);

/// The class statistics table (Arrow record batch) of `entries`, each a tuple
/// `(dataset, crop, class, label group path or None, training voxel size (z, y, x))`; distinct
/// label volumes are counted in parallel.
#[pyfunction]
#[pyo3(signature = (entries, *, cache_dir=None, use_cache=true, use_metadata=true, progress=None))]
fn class_stats<'py>(
    py: Python<'py>,
    entries: Vec<EntryTuple>,
    cache_dir: Option<PathBuf>,
    use_cache: bool,
    use_metadata: bool,
    progress: Option<PyRef<'py, CountProgress>>,
) -> BindResult<PyRecordBatch> {
    let options = options(cache_dir, use_cache, use_metadata);
    let progress = progress.map(|p| p.inner.clone());
    let entries: Vec<StatsEntry> = entries
        .into_iter()
        .map(|(dataset, crop, class, label_path, training_voxel_size)| StatsEntry {
            dataset,
            crop,
            class,
            label_path: label_path.as_deref().map(Location::parse),
            training_voxel_size,
        })
        .collect();
    let batch = run(py, move || stats::class_stats(&entries, &options, progress.as_deref()))?;
    Ok(PyRecordBatch::new(batch))
}

#[pyfunction]
fn class_weight(foreground: f64, total: f64) -> f64 {
    labels::class_weight(foreground, total)
}

/// The count cache folder used when none is given (None: caching is off).
#[pyfunction]
fn default_count_cache_dir() -> Option<PathBuf> {
    CountCache::default_location().dir().map(PathBuf::from)
}

/// Adds this module's functions and classes to `_engine`.
pub fn register(m: &Bound<'_, PyModule>) -> BindResult<()> {
    m.add_class::<CountProgress>()?;
    m.add_function(wrap_pyfunction!(label_counts, m)?)?;
    m.add_function(wrap_pyfunction!(class_stats, m)?)?;
    m.add_function(wrap_pyfunction!(default_count_cache_dir, m)?)?;
    m.add_function(wrap_pyfunction!(class_weight, m)?)?;
    m.add("CLASS_WEIGHT_CAP", labels::CLASS_WEIGHT_CAP)?;
    Ok(())
}
