//! `cellmap_data._engine`: the thin PyO3 shell over `cellmap-engine`. Arguments are converted
//! here, heavy calls release the GIL, engine errors become `cellmap_data.exceptions` classes and
//! no Rust panic reaches Python as anything but a `CellMapError`.

mod convert;
use convert::BindResult;
mod dataset;
mod loader;
mod remote;
mod stats;
mod tensor;
mod volume;
mod writer;

use pyo3::prelude::*;

/// Every allocation of the engine goes through mimalloc (see the workspace Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use cellmap_engine::format::ngff::CoordinateFrame;
use cellmap_engine::pipeline::values::ValuePipeline;
use cellmap_engine::source::cache::ChunkCache;
use cellmap_engine::source::label_cache::LabelCache;

/// Counters of the shared decoded-chunk cache.
#[pyfunction]
fn cache_stats(py: Python<'_>) -> BindResult<Bound<'_, pyo3::types::PyDict>> {
    let s = ChunkCache::global().stats();
    let d = pyo3::types::PyDict::new(py);
    d.set_item("hits", s.hits)?;
    d.set_item("misses", s.misses)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("budget", s.budget)?;
    d.set_item("entries", s.entries)?;
    d.set_item("decode_seconds", s.decode_nanos as f64 * 1e-9)?;
    d.set_item("decoded_bytes", s.decoded_bytes)?;
    let l = LabelCache::global().stats();
    d.set_item("label_hits", l.hits)?;
    d.set_item("label_misses", l.misses)?;
    d.set_item("label_passed", l.passed)?;
    d.set_item("label_bytes", l.bytes)?;
    d.set_item("label_budget", l.budget)?;
    d.set_item("label_crops", l.crops)?;
    d.set_item("label_decoded_bytes", l.decoded_bytes)?;
    d.set_item("label_decode_seconds", l.decode_nanos as f64 * 1e-9)?;
    Ok(d)
}

/// Test hook (debug builds only): the next `count` chunk reads of arrays whose path contains
/// `pattern` fail with `kind` (`eio`: a transient I/O error; `panic`: a panic in the read).
#[pyfunction]
#[pyo3(signature = (kind, pattern, count = 1))]
fn inject_fault(kind: &str, pattern: &str, count: u64) -> BindResult<()> {
    let kind = cellmap_engine::io::faults::FaultKind::parse(kind)?;
    cellmap_engine::io::faults::inject(kind, pattern, count).map_err(Into::into)
}

/// Disarms any injected fault.
#[pyfunction]
fn clear_faults() {
    cellmap_engine::io::faults::clear();
}

/// Whether this build of the engine can inject faults (debug builds).
#[pyfunction]
fn fault_injection_available() -> bool {
    cellmap_engine::io::faults::available()
}

/// Sets the byte budget of the shared decoded-chunk cache.
#[pyfunction]
fn set_cache_budget(bytes: u64) {
    ChunkCache::set_global_budget(bytes);
}

/// Sets the byte budget of the label-crop cache (0 turns it off: labels are read chunk by chunk).
#[pyfunction]
fn set_label_cache_budget(bytes: u64) {
    LabelCache::set_global_budget(bytes);
}

/// Drops every cached chunk, held label crop and pooled batch buffer, and resets the counters.
#[pyfunction]
fn clear_cache() {
    let cache = ChunkCache::global();
    cache.clear();
    cache.reset_counters();
    LabelCache::global().clear();
    cellmap_engine::pipeline::batch::release_pooled_buffers();
    // Freed memory goes back to the system now rather than after mimalloc's purge delay.
    // SAFETY: mi_collect only walks the allocator's own free lists.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Bytes of batch tensor memory currently alive (in the engine or held by Python tensors).
#[pyfunction]
fn live_batch_bytes() -> i64 {
    cellmap_engine::pipeline::batch::live_batch_bytes()
}

/// Bytes of freed batch buffers the engine keeps for reuse by later batches (at most 512 MiB
/// per element type; `clear_cache()` frees them).
#[pyfunction]
fn pooled_batch_bytes() -> usize {
    cellmap_engine::pipeline::batch::pooled_batch_bytes()
}

/// Sets what an OME-NGFF `translation` marks for volumes and writers opened from now on:
/// `"corner"` (of voxel 0; the default) or `"centre"`.
#[pyfunction]
fn set_coordinate_frame(frame: &str) -> BindResult<()> {
    let frame = CoordinateFrame::parse(frame)?;
    frame.set_current();
    Ok(())
}

/// The current coordinate frame: `"corner"` or `"centre"`.
#[pyfunction]
fn coordinate_frame() -> &'static str {
    CoordinateFrame::current().name()
}

/// Applies engine value-transform ops (the JSON list a dataset sends) to `values`, a sample
/// tensor of `shape` (channel first), drawing random ops from `value_seed` and `stream` as a
/// dataset read does. For tests and inspection; datasets apply the ops while reading.
#[pyfunction]
#[pyo3(signature = (ops_json, values, shape, value_seed=0, stream=0))]
fn apply_value_ops(
    py: Python<'_>,
    ops_json: &str,
    values: Vec<f32>,
    shape: Vec<usize>,
    value_seed: u64,
    stream: u64,
) -> BindResult<Vec<f32>> {
    let json = convert::parse_json(ops_json)?;
    let pipeline = ValuePipeline::from_json(&json, "value transforms")?;
    convert::run(py, move || {
        let mut values = values;
        pipeline.apply_to(&mut values, &shape, value_seed, stream)?;
        Ok(values)
    })
}

/// Whether the extension was compiled with optimisations.
#[pyfunction]
fn is_optimized_build() -> bool {
    !cfg!(debug_assertions)
}

#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cache_stats, m)?)?;
    m.add_function(wrap_pyfunction!(set_cache_budget, m)?)?;
    m.add_function(wrap_pyfunction!(set_label_cache_budget, m)?)?;
    m.add_function(wrap_pyfunction!(inject_fault, m)?)?;
    m.add_function(wrap_pyfunction!(clear_faults, m)?)?;
    m.add_function(wrap_pyfunction!(fault_injection_available, m)?)?;
    m.add_function(wrap_pyfunction!(clear_cache, m)?)?;
    m.add_function(wrap_pyfunction!(live_batch_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(pooled_batch_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(is_optimized_build, m)?)?;
    m.add_function(wrap_pyfunction!(set_coordinate_frame, m)?)?;
    m.add_function(wrap_pyfunction!(coordinate_frame, m)?)?;
    m.add_function(wrap_pyfunction!(apply_value_ops, m)?)?;
    m.add_function(wrap_pyfunction!(volume::elastic_field, m)?)?;
    m.add_function(wrap_pyfunction!(volume::check_spatial_draw, m)?)?;
    m.add_function(wrap_pyfunction!(remote::remote_options, m)?)?;
    m.add_function(wrap_pyfunction!(remote::set_remote_options, m)?)?;
    m.add_function(wrap_pyfunction!(remote::nodes_exist, m)?)?;
    m.add_function(wrap_pyfunction!(remote::is_remote, m)?)?;
    m.add_function(wrap_pyfunction!(remote::describe, m)?)?;
    m.add_function(wrap_pyfunction!(loader::balanced_plan, m)?)?;
    m.add_class::<volume::Volume>()?;
    m.add_class::<dataset::Dataset>()?;
    m.add_class::<dataset::Batch>()?;
    m.add_class::<loader::Collection>()?;
    m.add_class::<loader::BatchStream>()?;
    m.add_class::<tensor::Tensor>()?;
    m.add_class::<pyo3_arrow::PyRecordBatch>()?;
    m.add_class::<writer::ImageWriter>()?;
    m.add_function(wrap_pyfunction!(writer::finish_ranks, m)?)?;
    stats::register(m)?;
    Ok(())
}
