//! Batch assembly: reads a list of sample requests in parallel into one float32 buffer per
//! array, and exposes the result as an Arrow RecordBatch (one fixed-shape-tensor column per
//! array plus metadata columns). Buffers are tracked so tests can see memory being released.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, UInt64Builder, UInt8Builder};
use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, UInt8Array};
use arrow_buffer::{Buffer, ScalarBuffer};
use arrow_schema::extension::FixedShapeTensor;
use arrow_schema::{DataType, Field, Schema};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::geometry::AXES;
use crate::pipeline::dataset::{Annotation, Dataset};
use crate::pipeline::read_policy::{with_retries, ReadErrorPolicy, ReadIncident, MAX_REPLACEMENTS};
use crate::sample::augment::{SpatialDraw, SHEAR_TERMS};
use crate::sample::elastic::ElasticDraw;
use crate::sample::extract::Tally;

static LIVE_BATCH_BYTES: AtomicI64 = AtomicI64::new(0);

/// Bytes of batch tensor memory currently alive (engine- or Python-owned).
pub fn live_batch_bytes() -> i64 {
    LIVE_BATCH_BYTES.load(Ordering::SeqCst)
}

/// Bytes of freed batch buffers each element type's pool keeps for reuse. Without it every
/// batch takes fresh pages from the kernel (a page fault and a page clear per 4 KiB), which
/// cost about a tenth of a rotated read. 1 GiB: three batches of 128³ input + 4 classes at
/// batch size 8 (335 MB each), so such batches, too, are recycled while the next are filled.
const POOL_BYTES: usize = 1 << 30;

/// Freed batch buffers of one element type, reused by later batches of the same size.
pub struct BufferPool<T> {
    free: Mutex<Vec<Vec<T>>>,
    /// The process that uses the pool: a forked child (whose copy of the lock may be held by a
    /// thread that does not exist there) allocates and frees directly instead.
    owner: AtomicU32,
}

impl<T: BatchElement> BufferPool<T> {
    const fn new() -> Self {
        BufferPool {
            free: Mutex::new(Vec::new()),
            owner: AtomicU32::new(0),
        }
    }

    /// The free list, unless this is a forked child of the process that first used it.
    fn list(&self) -> Option<std::sync::MutexGuard<'_, Vec<Vec<T>>>> {
        let pid = std::process::id();
        let owner = match self.owner.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => pid,
            Err(existing) => existing,
        };
        (owner == pid).then(|| self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// A pooled buffer of `len` elements (contents unspecified), if one of a fitting size is free.
    fn take(&self, len: usize) -> Option<Vec<T>> {
        let mut free = self.list()?;
        let i = free.iter().position(|v| v.capacity() >= len && v.capacity() <= 2 * len.max(1))?;
        let mut v = free.swap_remove(i);
        drop(free);
        v.resize(len, T::default());
        Some(v)
    }

    /// Keeps `v` for reuse while the pool holds less than [`POOL_BYTES`]; frees it otherwise.
    fn give(&self, v: Vec<T>) {
        let size = std::mem::size_of::<T>();
        if let Some(mut free) = self.list() {
            let held: usize = free.iter().map(|b| b.capacity() * size).sum();
            if held + v.capacity() * size <= POOL_BYTES {
                free.push(v);
            }
        }
    }

    /// Bytes held for reuse.
    fn held_bytes(&self) -> usize {
        self.list()
            .map_or(0, |free| free.iter().map(|b| b.capacity() * std::mem::size_of::<T>()).sum())
    }

    fn clear(&self) {
        if let Some(mut free) = self.list() {
            free.clear();
        }
    }
}

static F32_POOL: BufferPool<f32> = BufferPool::new();
static U8_POOL: BufferPool<u8> = BufferPool::new();

/// Bytes of freed batch buffers held for reuse.
pub fn pooled_batch_bytes() -> usize {
    F32_POOL.held_bytes() + U8_POOL.held_bytes()
}

/// Frees every pooled batch buffer (e.g. before measuring memory).
pub fn release_pooled_buffers() {
    F32_POOL.clear();
    U8_POOL.clear();
}

/// Element types of batch buffers.
pub trait BatchElement: Copy + Default + Send + Sync + std::panic::RefUnwindSafe + 'static {
    /// What debug builds fill recycled buffers with, so a voxel a read forgets to write shows
    /// up in tests instead of silently holding an older batch's value.
    const POISON: Self;
    /// The pool of freed buffers of this type.
    fn pool() -> &'static BufferPool<Self>;
}

impl BatchElement for f32 {
    const POISON: f32 = -7.77e30;
    fn pool() -> &'static BufferPool<f32> {
        &F32_POOL
    }
}

impl BatchElement for u8 {
    const POISON: u8 = 0xA5;
    fn pool() -> &'static BufferPool<u8> {
        &U8_POOL
    }
}

/// A vector whose size is counted in [`live_batch_bytes`] until dropped; its memory then goes
/// back to its type's pool.
#[derive(Debug)]
pub struct TrackedVec<T: BatchElement = f32>(Vec<T>);

impl<T: BatchElement> TrackedVec<T> {
    /// A vector of `len` elements whose contents are unspecified (a recycled buffer): the
    /// caller writes every element. Debug builds fill it with [`BatchElement::POISON`].
    pub fn for_overwrite(len: usize) -> TrackedVec<T> {
        LIVE_BATCH_BYTES.fetch_add((len * std::mem::size_of::<T>()) as i64, Ordering::SeqCst);
        let mut v = T::pool().take(len).unwrap_or_else(|| vec![T::default(); len]);
        if cfg!(debug_assertions) {
            v.fill(T::POISON);
        }
        TrackedVec(v)
    }

    /// Moves the vector into an Arrow buffer without copying; the buffer frees it.
    pub fn into_buffer(self) -> Buffer {
        let owner = Arc::new(self);
        let ptr = NonNull::new(owner.0.as_ptr() as *mut u8).unwrap_or(NonNull::dangling());
        let len = owner.0.len() * std::mem::size_of::<T>();
        // SAFETY: the pointer and length describe `owner`'s live allocation, which the buffer
        // keeps alive through the Arc for as long as any clone of the buffer exists.
        unsafe { Buffer::from_custom_allocation(ptr, len, owner) }
    }
}

impl<T: BatchElement> std::ops::Deref for TrackedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: BatchElement> std::ops::DerefMut for TrackedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

impl<T: BatchElement> Drop for TrackedVec<T> {
    fn drop(&mut self) {
        LIVE_BATCH_BYTES.fetch_sub((self.0.len() * std::mem::size_of::<T>()) as i64, Ordering::SeqCst);
        T::pool().give(std::mem::take(&mut self.0));
    }
}

/// Copies `src` into `dst` (same length) on the engine's threads, in 1 MiB pieces: moving a
/// batch into page-locked memory for a GPU upload is a plain copy that one thread does at a
/// fraction of the memory bandwidth.
pub fn copy_parallel(src: &[u8], dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "copy between buffers of different sizes");
    const PIECE: usize = 1 << 20;
    dst.par_chunks_mut(PIECE)
        .zip(src.par_chunks(PIECE))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Value of an unknown voxel in compact (uint8) targets.
pub const COMPACT_UNKNOWN: u8 = 255;

/// A column's values: float32, or compact uint8 targets (0, 1, 255 = unknown).
#[derive(Debug)]
pub enum ColumnData {
    /// float32 values (NaN = unknown).
    F32(TrackedVec<f32>),
    /// uint8 values (255 = unknown).
    U8(TrackedVec<u8>),
}

/// One sample to read: where, how it is turned, and the seed of its value transforms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRequest {
    /// Sample index within its dataset.
    pub index: u64,
    /// World centre (nm).
    pub centre: [f64; 3],
    /// Spatial draw.
    pub draw: SpatialDraw,
    /// Seed of the sample's value transforms (engine and torch).
    pub value_seed: u64,
    /// A repeat added so every rank reads as many samples (see `sampler::EpochShape`).
    pub padding: bool,
}

/// One array of a batch: `[batch, *sample_shape]` float32, C order.
#[derive(Debug)]
pub struct TensorColumn {
    /// Array name (the sample dict key).
    pub name: String,
    /// Per-sample shape (channel first, singleton spatial axes squeezed).
    pub sample_shape: Vec<usize>,
    /// Axis names of the per-sample shape.
    pub dim_names: Vec<String>,
    /// The values.
    pub data: ColumnData,
}

/// A batch of samples (possibly from several datasets of one collection).
#[derive(Debug)]
pub struct Batch {
    /// Inputs then targets.
    pub columns: Vec<TensorColumn>,
    /// The requests, in batch order.
    pub samples: Vec<SampleRequest>,
    /// Name of the dataset each sample came from.
    pub dataset_labels: Vec<String>,
    /// Crop (label group) each sample came from.
    pub crop_labels: Vec<String>,
    /// Per sample, the level read for each array (same order as columns; a target reports the
    /// level of its first annotated class, or -1 when none is annotated).
    pub levels: Vec<Vec<i64>>,
    /// The requested classes and the target arrays' names and sizes.
    pub classes: ClassInfo,
    /// Per sample and class, whether the sample's crop annotates the class.
    pub annotation: Vec<Vec<Annotation>>,
    /// Per sample, per target array and class (target-major): foreground and unknown voxels.
    pub tallies: Vec<Vec<Tally>>,
    /// Per sample, the position of its dataset in the collection it was read from (empty for a
    /// batch read from one dataset).
    pub positions: Vec<usize>,
    /// Reads retried or samples replaced while reading this batch (see [`ReadErrorPolicy`]).
    pub incidents: Vec<ReadIncident>,
}

/// The per-sample metadata of a batch or of a planned epoch: the one schema of every sample
/// table (record batches, epoch tables, the Polars tables built from them).
///
/// | column | type | |
/// |---|---|---|
/// | `dataset` | utf8 | dataset name (its raw path) |
/// | `crop` | utf8 | crop (label group) |
/// | `idx` | u64 | sample index within its dataset |
/// | `centre_z/y/x` | f64 | world centre (nm) |
/// | `mirror_z/y/x` | bool | mirrored axes |
/// | `transpose_z/y/x` | u8 | output axis k walks world axis `transpose_k` |
/// | `rotate_z/y/x` | f64 | rotation angles (degrees) |
/// | `scale_z/y/x` | f64 | zoom factors (1: none) |
/// | `shear_zy/zx/yz/yx/xz/xy` | f64 | shear terms (0: none) |
/// | `elastic_seed` | u64 | seed of the elastic field (0 with no deformation) |
/// | `elastic_sigma_z/y/x` | f64 | its jitter sigma (nm; 0: no deformation) |
/// | `elastic_spacing_z/y/x` | f64 | its control point spacing (nm; 0: no deformation) |
/// | `level_<array>` | i64 | level read per array (−1: a target with no annotated class) |
/// | `value_seed` | u64 | seed of the value transforms |
/// | `padding` | bool | a repeat of an earlier sample, added so every rank reads as many samples |
/// | `annotated_<class>` | utf8 | `annotated` (the crop labels the class), `inferred` (not labelled, but exclusive with labelled classes: 0 where they are present, NaN elsewhere) or `unknown` (NaN everywhere) |
/// | `foreground_<class>` | u64 | delivered batches only: target voxels above 0 after the spatial transforms |
/// | `fraction_<class>` | f64 | delivered batches only: `foreground_<class>` / voxels of the target patch |
/// | `unknown_<class>` | f64 | delivered batches only: NaN voxels / voxels of the target patch |
///
/// The per-class columns describe the first target array; a second array's are named
/// `foreground_<array>_<class>` and so on.
pub struct SampleMetadata<'a> {
    /// The requests, in order.
    pub samples: &'a [SampleRequest],
    /// Dataset name of each sample.
    pub dataset_labels: &'a [String],
    /// Crop of each sample.
    pub crop_labels: &'a [String],
    /// Per sample, the level read for each array.
    pub levels: &'a [Vec<i64>],
    /// The arrays' names (inputs then targets).
    pub array_names: &'a [String],
    /// The requested classes and the target arrays.
    pub classes: &'a ClassInfo,
    /// Per sample and class, whether the sample's crop annotates the class.
    pub annotation: &'a [Vec<Annotation>],
    /// Per sample (target-major, then class), what the delivered targets hold; `None` for a
    /// plan (nothing read yet).
    pub tallies: Option<&'a [Vec<Tally>]>,
}

/// The requested classes and the target arrays (name, voxels per channel) a sample table
/// describes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassInfo {
    /// Requested classes, in channel order.
    pub names: Vec<String>,
    /// Target arrays: name and voxels of one channel's patch.
    pub targets: Vec<(String, usize)>,
}

impl ClassInfo {
    /// The classes and target arrays of `dataset`.
    pub fn of(dataset: &Dataset) -> ClassInfo {
        ClassInfo {
            names: dataset.config.classes.iter().map(|(name, _)| name.clone()).collect(),
            targets: dataset.config.targets.iter().map(|t| (t.name.clone(), t.patch.len())).collect(),
        }
    }

    /// The suffix of target array `t`'s class columns: the class, after the array's name for
    /// every array but the first.
    fn column(&self, t: usize, class: &str) -> String {
        if t == 0 {
            class.to_string()
        } else {
            format!("{}_{class}", self.targets[t].0)
        }
    }
}

impl SampleMetadata<'_> {
    /// The metadata columns, in schema order.
    pub fn columns(&self) -> Vec<(Field, ArrayRef)> {
        let mut out: Vec<(Field, ArrayRef)> = Vec::new();
        let mut push = |name: &str, array: ArrayRef| out.push((Field::new(name, array.data_type().clone(), false), array));
        // Sized builders: the default reserves 1024 rows per column (~95 kB for a small batch).
        let rows = self.samples.len();
        let mut dataset = StringBuilder::with_capacity(rows, rows * 32);
        self.dataset_labels.iter().for_each(|d| dataset.append_value(d));
        push("dataset", Arc::new(dataset.finish()));
        let mut crop = StringBuilder::with_capacity(rows, rows * 32);
        self.crop_labels.iter().for_each(|c| crop.append_value(c));
        push("crop", Arc::new(crop.finish()));
        let mut idx = UInt64Builder::with_capacity(rows);
        self.samples.iter().for_each(|s| idx.append_value(s.index));
        push("idx", Arc::new(idx.finish()));
        for (k, axis) in AXES.iter().enumerate() {
            let mut c = Float64Builder::with_capacity(rows);
            self.samples.iter().for_each(|s| c.append_value(s.centre[k]));
            push(&format!("centre_{axis}"), Arc::new(c.finish()));
        }
        for (k, axis) in AXES.iter().enumerate() {
            let mut m = BooleanBuilder::with_capacity(rows);
            self.samples.iter().for_each(|s| m.append_value(s.draw.mirror[k]));
            push(&format!("mirror_{axis}"), Arc::new(m.finish()));
        }
        for (k, axis) in AXES.iter().enumerate() {
            let mut p = UInt8Builder::with_capacity(rows);
            self.samples.iter().for_each(|s| p.append_value(s.draw.permutation[k] as u8));
            push(&format!("transpose_{axis}"), Arc::new(p.finish()));
        }
        for (k, axis) in AXES.iter().enumerate() {
            let mut r = Float64Builder::with_capacity(rows);
            self.samples.iter().for_each(|s| r.append_value(s.draw.angles_deg[k]));
            push(&format!("rotate_{axis}"), Arc::new(r.finish()));
        }
        for (k, axis) in AXES.iter().enumerate() {
            let mut z = Float64Builder::with_capacity(rows);
            self.samples.iter().for_each(|s| z.append_value(s.draw.zoom[k]));
            push(&format!("scale_{axis}"), Arc::new(z.finish()));
        }
        for (term, &(row, column)) in SHEAR_TERMS.iter().enumerate() {
            let mut h = Float64Builder::with_capacity(rows);
            self.samples.iter().for_each(|s| h.append_value(s.draw.shear[term]));
            push(&format!("shear_{}{}", AXES[row], AXES[column]), Arc::new(h.finish()));
        }
        let mut elastic_seed = UInt64Builder::with_capacity(rows);
        self.samples
            .iter()
            .for_each(|s| elastic_seed.append_value(s.draw.elastic.map_or(0, |e| e.seed)));
        push("elastic_seed", Arc::new(elastic_seed.finish()));
        let sigma: fn(&ElasticDraw) -> [f64; 3] = |e| e.sigma;
        let spacing: fn(&ElasticDraw) -> [f64; 3] = |e| e.spacing;
        for (name, value) in [("sigma", sigma), ("spacing", spacing)] {
            for (k, axis) in AXES.iter().enumerate() {
                let mut c = Float64Builder::with_capacity(rows);
                self.samples
                    .iter()
                    .for_each(|s| c.append_value(s.draw.elastic.as_ref().map_or(0.0, |e| value(e)[k])));
                push(&format!("elastic_{name}_{axis}"), Arc::new(c.finish()));
            }
        }
        for (a, name) in self.array_names.iter().enumerate() {
            let mut l = Int64Builder::with_capacity(rows);
            self.levels.iter().for_each(|per| l.append_value(per[a]));
            push(&format!("level_{name}"), Arc::new(l.finish()));
        }
        let mut seeds = UInt64Builder::with_capacity(rows);
        self.samples.iter().for_each(|s| seeds.append_value(s.value_seed));
        push("value_seed", Arc::new(seeds.finish()));
        for (c, class) in self.classes.names.iter().enumerate() {
            let mut a = StringBuilder::with_capacity(rows, rows * 9);
            self.annotation
                .iter()
                .for_each(|per| a.append_value(per.get(c).map_or("unknown", |s| s.as_str())));
            push(&format!("annotated_{class}"), Arc::new(a.finish()));
        }
        if let Some(tallies) = self.tallies {
            let n_classes = self.classes.names.len();
            for (t, &(_, voxels)) in self.classes.targets.iter().enumerate() {
                for (c, class) in self.classes.names.iter().enumerate() {
                    let suffix = self.classes.column(t, class);
                    let at = |per: &Vec<Tally>| per.get(t * n_classes + c).copied().unwrap_or_default();
                    let mut count = UInt64Builder::with_capacity(rows);
                    let mut fraction = Float64Builder::with_capacity(rows);
                    let mut unknown = Float64Builder::with_capacity(rows);
                    for per in tallies {
                        let tally = at(per);
                        count.append_value(tally.foreground);
                        fraction.append_value(tally.foreground as f64 / voxels.max(1) as f64);
                        unknown.append_value(tally.unknown as f64 / voxels.max(1) as f64);
                    }
                    push(&format!("foreground_{suffix}"), Arc::new(count.finish()));
                    push(&format!("fraction_{suffix}"), Arc::new(fraction.finish()));
                    push(&format!("unknown_{suffix}"), Arc::new(unknown.finish()));
                }
            }
        }
        let mut padding = BooleanBuilder::with_capacity(rows);
        self.samples.iter().for_each(|s| padding.append_value(s.padding));
        push("padding", Arc::new(padding.finish()));
        out
    }

    /// The metadata alone as a record batch, after `leading` columns (e.g. the batch number).
    pub fn record_batch(&self, leading: Vec<(Field, ArrayRef)>) -> Result<RecordBatch> {
        let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = leading.into_iter().chain(self.columns()).unzip();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).map_err(|e| Error::invalid(format!("building the sample table: {e}")))
    }
}

/// Gives the replacement for the sample at batch position `p`, attempt `k` (1, 2, ...).
pub type ReplaceSample<'a, 'd> = dyn Fn(usize, u32) -> Result<(&'d Dataset, SampleRequest)> + Sync + 'a;

/// How a batch read behaves: cancellation, and what it does when a sample's read fails.
#[derive(Clone, Copy, Default)]
pub struct BatchReadOptions<'a, 'd> {
    /// A raised flag stops the read with [`Error::Interrupted`].
    pub cancel: Option<&'a AtomicBool>,
    /// Raise, retry transient errors, or skip failing samples.
    pub policy: ReadErrorPolicy,
    /// With [`ReadErrorPolicy::Skip`]: the replacement for the sample at batch position `p`,
    /// attempt `k` (1, 2, ...), a function of the seed. Without it, skipping is impossible and
    /// the error is raised.
    pub replace: Option<&'a ReplaceSample<'a, 'd>>,
}

/// Reads one sample into its output slices (float columns, then compact byte columns).
fn read_one(dataset: &Dataset, req: &SampleRequest, floats: &mut [&mut [f32]], bytes: &mut [&mut [u8]]) -> Result<Vec<Tally>> {
    let in_sample = |e: Error| {
        let c = req.centre;
        e.with_context(format!(
            "reading sample {} of dataset '{}' centred at z={:.1}, y={:.1}, x={:.1} nm",
            req.index,
            dataset.config.name(),
            c[0],
            c[1],
            c[2]
        ))
    };
    if bytes.is_empty() {
        let mut read = dataset.read_sample(req.centre, &req.draw, floats).map_err(in_sample)?;
        dataset.apply_values(req.value_seed, floats, &mut read);
        return Ok(read.tallies);
    }
    // Compact targets: read as float, then pack (0, 1, 255 = unknown).
    let mut scratch: Vec<Vec<f32>> = bytes.iter().map(|b| vec![0f32; b.len()]).collect();
    let mut outs: Vec<&mut [f32]> = floats.iter_mut().map(|s| &mut **s).collect();
    outs.extend(scratch.iter_mut().map(|v| v.as_mut_slice()));
    let mut read = dataset.read_sample(req.centre, &req.draw, &mut outs).map_err(in_sample)?;
    // Compact targets carry no engine value transforms (they stay 0/1/NaN).
    dataset.apply_values(req.value_seed, &mut outs, &mut read);
    for (dst, src) in bytes.iter_mut().zip(&scratch) {
        for (d, v) in dst.iter_mut().zip(src) {
            *d = if v.is_nan() { COMPACT_UNKNOWN } else { *v as u8 };
        }
    }
    Ok(read.tallies)
}

impl Batch {
    /// Reads `requests` from `dataset` in parallel.
    pub fn read(dataset: &Dataset, requests: &[SampleRequest]) -> Result<Batch> {
        let items: Vec<(&Dataset, SampleRequest)> = requests.iter().map(|r| (dataset, *r)).collect();
        Batch::read_items(&items, &BatchReadOptions::default())
    }

    /// Reads samples from their datasets in parallel; every dataset must produce the same
    /// array shapes. `options` say what a failing sample read does (see [`ReadErrorPolicy`]);
    /// retried and replaced samples are listed in the batch's `incidents`, and a replaced
    /// sample's metadata is its replacement's.
    pub fn read_items<'d>(items: &[(&'d Dataset, SampleRequest)], options: &BatchReadOptions<'_, 'd>) -> Result<Batch> {
        let cancel = options.cancel;
        let first = items.first().ok_or_else(|| Error::invalid("a batch needs at least one sample"))?.0;
        let shapes = first.sample_shapes();
        for (dataset, _) in items {
            if dataset.sample_shapes() != shapes {
                return Err(Error::invalid(format!(
                    "datasets {} and {} produce different array shapes and cannot share a batch",
                    first.config.name(),
                    dataset.config.name()
                )));
            }
        }
        let specs: Vec<_> = first.config.inputs.iter().chain(&first.config.targets).collect();
        let n_inputs = first.config.inputs.len();
        let compact = first.config.compact_targets;
        let per_sample: Vec<usize> = shapes.iter().map(|(_, s)| s.iter().product()).collect();
        let is_compact = |column: usize| compact && column >= n_inputs;
        let mut float_buffers: Vec<Option<TrackedVec<f32>>> = Vec::new();
        let mut byte_buffers: Vec<Option<TrackedVec<u8>>> = Vec::new();
        for (column, n) in per_sample.iter().enumerate() {
            if is_compact(column) {
                float_buffers.push(None);
                byte_buffers.push(Some(TrackedVec::for_overwrite(n * items.len())));
            } else {
                float_buffers.push(Some(TrackedVec::for_overwrite(n * items.len())));
                byte_buffers.push(None);
            }
        }
        // Remote volumes: every chunk of the batch requested at once, before any is decoded.
        for (dataset, req) in items.iter().filter(|(d, _)| d.reads_ahead()) {
            dataset.prefetch_sample(req.centre, &req.draw);
        }
        let mut items: Vec<(&'d Dataset, SampleRequest)> = items.to_vec();
        let mut incidents: Vec<Vec<ReadIncident>> = vec![Vec::new(); items.len()];
        let mut tallies: Vec<Vec<Tally>> = vec![Vec::new(); items.len()];
        {
            // Per sample: a float slice per float column, a byte slice per compact column.
            let mut float_slots: Vec<Vec<&mut [f32]>> = (0..items.len()).map(|_| Vec::new()).collect();
            let mut byte_slots: Vec<Vec<&mut [u8]>> = (0..items.len()).map(|_| Vec::new()).collect();
            for ((floats, bytes), n) in float_buffers.iter_mut().zip(byte_buffers.iter_mut()).zip(&per_sample) {
                if let Some(buf) = floats.as_mut() {
                    for (slot, chunk) in float_slots.iter_mut().zip(buf.chunks_mut((*n).max(1))) {
                        slot.push(chunk);
                    }
                }
                if let Some(buf) = bytes.as_mut() {
                    for (slot, chunk) in byte_slots.iter_mut().zip(buf.chunks_mut((*n).max(1))) {
                        slot.push(chunk);
                    }
                }
            }
            float_slots
                .par_iter_mut()
                .zip(byte_slots.par_iter_mut())
                .zip(items.par_iter_mut())
                .zip(incidents.par_iter_mut())
                .zip(tallies.par_iter_mut())
                .enumerate()
                .try_for_each(|(position, ((((floats, bytes), item), log), tally))| {
                    let mut attempt = 0u32;
                    loop {
                        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                            return Err(Error::Interrupted);
                        }
                        let (dataset, req) = *item;
                        let incident = |action: &'static str, e: &Error| ReadIncident {
                            position,
                            action,
                            dataset: dataset.config.name(),
                            index: req.index,
                            centre: req.centre,
                            message: e.to_string(),
                        };
                        let outcome = with_retries(
                            options.policy,
                            cancel,
                            || read_one(dataset, &req, floats, bytes),
                            |e| log.push(incident("retried", e)),
                        );
                        let error = match outcome {
                            Ok(counted) => {
                                *tally = counted;
                                return Ok(());
                            }
                            Err(e) => e,
                        };
                        let replace = match options.replace {
                            Some(f) if options.policy == ReadErrorPolicy::Skip && attempt < MAX_REPLACEMENTS => f,
                            _ => return Err(error),
                        };
                        if matches!(error, Error::Interrupted | Error::Internal(_)) {
                            return Err(error);
                        }
                        log.push(incident("skipped", &error));
                        attempt += 1;
                        *item = replace(position, attempt)?;
                    }
                })?;
        }
        let columns = shapes
            .into_iter()
            .enumerate()
            .zip(&specs)
            .map(|((column, (name, sample_shape)), spec)| TensorColumn {
                name,
                sample_shape,
                dim_names: Dataset::dim_names(&spec.patch),
                data: match (float_buffers[column].take(), byte_buffers[column].take()) {
                    (Some(f), _) => ColumnData::F32(f),
                    (None, Some(b)) => ColumnData::U8(b),
                    (None, None) => unreachable!("every column has a buffer"),
                },
            })
            .collect();
        Ok(Batch {
            columns,
            incidents: incidents.into_iter().flatten().collect(),
            samples: items.iter().map(|(_, r)| *r).collect(),
            dataset_labels: items.iter().map(|(d, _)| d.config.name()).collect(),
            crop_labels: items.iter().map(|(d, _)| d.config.crop.clone()).collect(),
            levels: items.iter().map(|(d, _)| d.array_levels()).collect(),
            classes: ClassInfo::of(first),
            annotation: items.iter().map(|(d, _)| d.annotation()).collect(),
            tallies,
            positions: Vec::new(),
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether the batch has no sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Converts into an Arrow RecordBatch without copying tensor data.
    pub fn into_record_batch(self) -> Result<RecordBatch> {
        let n = self.samples.len();
        let mut fields: Vec<Field> = Vec::new();
        let mut arrays: Vec<ArrayRef> = Vec::new();
        let array_names: Vec<String> = self.columns.iter().map(|c| c.name.clone()).collect();
        for column in self.columns {
            let size: usize = column.sample_shape.iter().product();
            let (value_type, values): (DataType, ArrayRef) = match column.data {
                ColumnData::F32(v) => (
                    DataType::Float32,
                    Arc::new(Float32Array::new(ScalarBuffer::new(v.into_buffer(), 0, size * n), None)),
                ),
                ColumnData::U8(v) => (
                    DataType::UInt8,
                    Arc::new(UInt8Array::new(ScalarBuffer::new(v.into_buffer(), 0, size * n), None)),
                ),
            };
            let ext = FixedShapeTensor::try_new(
                value_type.clone(),
                column.sample_shape.clone(),
                Some(column.dim_names.clone()),
                None,
            )
            .map_err(|e| Error::invalid(format!("array '{}': {e}", column.name)))?;
            let item = Arc::new(Field::new("item", value_type, false));
            let list = FixedSizeListArray::try_new(item.clone(), size as i32, values, None)
                .map_err(|e| Error::invalid(format!("array '{}': {e}", column.name)))?;
            let mut field = Field::new(&column.name, DataType::FixedSizeList(item, size as i32), false);
            field
                .try_with_extension_type(ext)
                .map_err(|e| Error::invalid(format!("array '{}': {e}", column.name)))?;
            fields.push(field);
            arrays.push(Arc::new(list));
        }
        let meta = SampleMetadata {
            samples: &self.samples,
            dataset_labels: &self.dataset_labels,
            crop_labels: &self.crop_labels,
            levels: &self.levels,
            array_names: &array_names,
            classes: &self.classes,
            annotation: &self.annotation,
            tallies: Some(&self.tallies),
        };
        for (field, array) in meta.columns() {
            fields.push(field);
            arrays.push(array);
        }
        let schema = Arc::new(Schema::new(fields));
        RecordBatch::try_new(schema, arrays).map_err(|e| Error::invalid(format!("building the batch: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_metadata_has_one_schema() {
        let draw = SpatialDraw {
            mirror: [true, false, true],
            permutation: [0, 2, 1],
            angles_deg: [10.0, 0.0, -5.0],
            rotation: None,
            zoom: [1.0; 3],
            shear: [0.0; 6],
            elastic: Some(ElasticDraw {
                seed: 9,
                spacing: [40.0, 40.0, 30.0],
                sigma: [0.0, 2.0, 2.5],
            }),
        };
        let samples = [
            SampleRequest {
                index: 3,
                centre: [1.0, 2.0, 3.0],
                draw,
                value_seed: 42,
                padding: false,
            },
            SampleRequest {
                index: 7,
                centre: [4.0, 5.0, 6.0],
                draw: SpatialDraw::default(),
                value_seed: 43,
                padding: true,
            },
        ];
        let names = ["input".to_string(), "output".to_string()];
        let classes = ClassInfo {
            names: vec!["mito".to_string(), "er".to_string()],
            targets: vec![("output".to_string(), 8), ("extra".to_string(), 4)],
        };
        let tallies = [
            vec![
                Tally { foreground: 2, unknown: 0 },
                Tally { foreground: 0, unknown: 8 },
                Tally { foreground: 1, unknown: 1 },
                Tally::default(),
            ],
            vec![
                Tally { foreground: 8, unknown: 0 },
                Tally::default(),
                Tally::default(),
                Tally::default(),
            ],
        ];
        let meta = SampleMetadata {
            samples: &samples,
            dataset_labels: &["/d/raw".to_string(), "/d/raw".to_string()],
            crop_labels: &["/d/crop1".to_string(), "/d/crop2".to_string()],
            levels: &[vec![0, 1], vec![1, -1]],
            array_names: &names,
            classes: &classes,
            annotation: &[
                vec![Annotation::Annotated, Annotation::Unknown],
                vec![Annotation::Annotated, Annotation::Inferred],
            ],
            tallies: Some(&tallies),
        };
        let batch = meta.record_batch(Vec::new()).unwrap();
        let schema = batch.schema();
        let columns: Vec<(&str, &DataType)> = schema.fields().iter().map(|f| (f.name().as_str(), f.data_type())).collect();
        assert_eq!(
            &columns[..4],
            &[
                ("dataset", &DataType::Utf8),
                ("crop", &DataType::Utf8),
                ("idx", &DataType::UInt64),
                ("centre_z", &DataType::Float64)
            ]
        );
        let kind = |name: &str| schema.field_with_name(name).unwrap().data_type().clone();
        assert_eq!(kind("transpose_y"), DataType::UInt8);
        assert_eq!(kind("mirror_x"), DataType::Boolean);
        assert_eq!(kind("level_output"), DataType::Int64);
        assert_eq!(kind("value_seed"), DataType::UInt64);
        assert_eq!(kind("padding"), DataType::Boolean);
        use arrow_array::cast::AsArray;
        let level = batch
            .column_by_name("level_output")
            .unwrap()
            .as_primitive::<arrow_array::types::Int64Type>()
            .values()
            .to_vec();
        assert_eq!(level, vec![1, -1]);
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .unwrap()
                .as_primitive::<arrow_array::types::Float64Type>()
                .values()
                .to_vec()
        };
        assert_eq!(column("elastic_sigma_x"), vec![2.5, 0.0], "0 where a sample is not deformed");
        assert_eq!(column("elastic_spacing_z"), vec![40.0, 0.0]);
        let seeds = batch
            .column_by_name("elastic_seed")
            .unwrap()
            .as_primitive::<arrow_array::types::UInt64Type>()
            .values()
            .to_vec();
        assert_eq!(seeds, vec![9, 0]);
        let transpose = batch
            .column_by_name("transpose_y")
            .unwrap()
            .as_primitive::<arrow_array::types::UInt8Type>()
            .value(0);
        assert_eq!(transpose, 2);
        let text = |name: &str| -> Vec<String> {
            let column = batch.column_by_name(name).unwrap().as_string::<i32>().clone();
            column.iter().map(|v| v.unwrap().to_string()).collect()
        };
        assert_eq!(text("annotated_mito"), ["annotated", "annotated"]);
        assert_eq!(text("annotated_er"), ["unknown", "inferred"]);
        let counts = batch
            .column_by_name("foreground_mito")
            .unwrap()
            .as_primitive::<arrow_array::types::UInt64Type>()
            .values()
            .to_vec();
        assert_eq!(counts, vec![2, 8]);
        assert_eq!(column("fraction_mito"), vec![0.25, 1.0]);
        assert_eq!(column("unknown_er"), vec![1.0, 0.0]);
        assert_eq!(
            column("fraction_extra_mito"),
            vec![0.25, 0.0],
            "a second target array's columns are prefixed"
        );
        assert_eq!(column("unknown_extra_mito"), vec![0.25, 0.0]);
        let plan = SampleMetadata { tallies: None, ..meta }.record_batch(Vec::new()).unwrap();
        assert!(plan.column_by_name("annotated_er").is_some() && plan.column_by_name("foreground_mito").is_none());
    }

    #[test]
    fn dropped_buffers_are_reused() {
        // A size no other test uses, so the pool's other buffers cannot interfere.
        let len = 12_345;
        let first = TrackedVec::<u8>::for_overwrite(len);
        let address = first.as_ptr();
        drop(first);
        let second = TrackedVec::<u8>::for_overwrite(len);
        assert_eq!(second.as_ptr(), address, "the freed buffer is handed out again");
        assert_eq!(second.len(), len);
        if cfg!(debug_assertions) {
            assert!(second.iter().all(|&v| v == u8::POISON), "debug builds poison recycled buffers");
        }
        // A much smaller request does not take (and pin) a large buffer.
        drop(second);
        let small = TrackedVec::<u8>::for_overwrite(100);
        assert_ne!(small.as_ptr(), address);
    }
}
