//! The batch pipeline behind `CellMapDataLoader`: a dispatcher thread turns an epoch plan into
//! batch reads on an engine thread pool, with at most `prefetch` batches ahead of the consumer,
//! delivered in plan order (so the thread count never changes what comes out).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arrow_array::{ArrayRef, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field};

use crate::error::{Error, Result};
use crate::pipeline::batch::SampleRequest;
use crate::pipeline::batch::{Batch, BatchReadOptions, ClassInfo, SampleMetadata};
use crate::pipeline::dataset::Dataset;
use crate::pipeline::read_policy::ReadErrorPolicy;
use crate::pipeline::sampler::{epoch_batches, replacement, request, EpochSettings, EpochShape, PlannedSample, StreamKey};
use crate::runtime::new_pool;

/// The request of a planned sample (marked when it is padding).
fn planned_request(dataset: &Dataset, planned: &PlannedSample, key: StreamKey, augment: bool) -> Result<SampleRequest> {
    let mut req = request(dataset, planned.index, key, planned.stream, augment)?;
    req.padding = planned.padding;
    Ok(req)
}

/// Datasets concatenated into one index space.
#[derive(Clone)]
pub struct Collection {
    /// The datasets, in order.
    pub datasets: Vec<Arc<Dataset>>,
}

impl Collection {
    /// Checks that every dataset produces the same array names and shapes.
    pub fn new(datasets: Vec<Arc<Dataset>>) -> Result<Collection> {
        if let Some(first) = datasets.first() {
            let shapes = first.sample_shapes();
            for d in &datasets[1..] {
                if d.sample_shapes() != shapes {
                    return Err(Error::invalid(format!(
                        "dataset {} produces arrays {:?} but {} produces {:?}: datasets of one loader must agree",
                        d.config.name(),
                        d.sample_shapes(),
                        first.config.name(),
                        shapes
                    )));
                }
            }
        }
        Ok(Collection { datasets })
    }

    /// Samples per dataset.
    pub fn sizes(&self) -> Vec<usize> {
        self.datasets.iter().map(|d| d.len()).collect()
    }

    /// Reads one planned batch; `policy` says what a failing sample read does (replacements
    /// for [`ReadErrorPolicy::Skip`] come from [`replacement`]).
    pub fn read(
        &self,
        samples: &[PlannedSample],
        key: StreamKey,
        augment: bool,
        cancel: Option<&AtomicBool>,
        policy: ReadErrorPolicy,
    ) -> Result<Batch> {
        let dataset_of = |p: &PlannedSample| {
            self.datasets
                .get(p.dataset)
                .ok_or_else(|| Error::invalid(format!("dataset {} does not exist", p.dataset)))
        };
        let items = samples
            .iter()
            .map(|p| {
                let dataset = dataset_of(p)?;
                Ok((dataset.as_ref(), planned_request(dataset, p, key, augment)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let replace = |position: usize, attempt: u32| -> Result<(&Dataset, SampleRequest)> {
            let p = &samples[position];
            let dataset = dataset_of(p)?;
            let (index, stream) = replacement(key, p.stream, attempt, dataset.len());
            let mut req = request(dataset, index, key, stream, augment)?;
            req.padding = p.padding;
            Ok((dataset.as_ref(), req))
        };
        let options = BatchReadOptions {
            cancel,
            policy,
            replace: Some(&replace),
        };
        let mut batch = Batch::read_items(&items, &options)?;
        batch.positions = samples.iter().map(|p| p.dataset).collect();
        Ok(batch)
    }

    /// Whether any dataset reads ahead (is read from an object store).
    pub fn reads_ahead(&self) -> bool {
        self.datasets.iter().any(|d| d.reads_ahead())
    }

    /// Starts the requests for the chunks a planned batch will read (remote datasets only), so
    /// that they are in flight before the batch is read.
    pub fn prefetch(&self, samples: &[PlannedSample], key: StreamKey, augment: bool) {
        for p in samples {
            if let Some(dataset) = self.datasets.get(p.dataset).filter(|d| d.reads_ahead()) {
                if let Ok(req) = request(dataset, p.index, key, p.stream, augment) {
                    dataset.prefetch_sample(req.centre, &req.draw);
                }
            }
        }
    }

    /// The batches of one epoch ([`epoch_batches`] over these datasets).
    pub fn epoch_plan(&self, settings: &EpochSettings) -> Result<Vec<Vec<PlannedSample>>> {
        let annotated: Vec<Vec<bool>> = self.datasets.iter().map(|d| d.annotated_classes()).collect();
        epoch_batches(&self.sizes(), &annotated, settings)
    }

    /// The shape of one epoch (samples planned, per rank, padding, batches), without planning it.
    pub fn epoch_shape(&self, settings: &EpochSettings) -> Result<EpochShape> {
        settings.shape(self.sizes().iter().sum())
    }
}

impl Collection {
    /// The metadata of planned batches, without reading any voxel: one row per sample in plan
    /// order, a `batch` column (the batch number) then the [`SampleMetadata`] columns, exactly
    /// what the batches' record batches will hold.
    pub fn plan_metadata(&self, batches: &[Vec<PlannedSample>], key: StreamKey, augment: bool) -> Result<RecordBatch> {
        let mut samples = Vec::new();
        let mut datasets = Vec::new();
        let mut crops = Vec::new();
        let mut levels = Vec::new();
        let mut batch_numbers = Vec::new();
        let mut annotation = Vec::new();
        for (b, batch) in batches.iter().enumerate() {
            for p in batch {
                let dataset = self
                    .datasets
                    .get(p.dataset)
                    .ok_or_else(|| Error::invalid(format!("dataset {} does not exist", p.dataset)))?;
                samples.push(planned_request(dataset, p, key, augment)?);
                datasets.push(dataset.config.name());
                crops.push(dataset.config.crop.clone());
                levels.push(dataset.array_levels());
                annotation.push(dataset.annotation());
                batch_numbers.push(b as u64);
            }
        }
        let array_names: Vec<String> = match self.datasets.first() {
            Some(d) => d.config.inputs.iter().chain(&d.config.targets).map(|a| a.name.clone()).collect(),
            None => Vec::new(),
        };
        let classes = self.datasets.first().map(|d| ClassInfo::of(d)).unwrap_or_default();
        let meta = SampleMetadata {
            samples: &samples,
            dataset_labels: &datasets,
            crop_labels: &crops,
            levels: &levels,
            array_names: &array_names,
            classes: &classes,
            annotation: &annotation,
            tallies: None,
        };
        let batch_column: ArrayRef = Arc::new(UInt64Array::from(batch_numbers));
        meta.record_batch(vec![(Field::new("batch", DataType::UInt64, false), batch_column)])
    }
}

/// Settings of one epoch's stream.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// Engine threads reading batches.
    pub threads: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Random stream key.
    pub key: StreamKey,
    /// Whether spatial augmentation is drawn.
    pub augment: bool,
    /// What a failing sample read does.
    pub on_read_error: ReadErrorPolicy,
}

/// What `next` returns. A batch travels by value once per call: boxing it to even out the
/// variants would only add an allocation per batch.
#[allow(clippy::large_enum_variant)]
pub enum Next {
    /// A batch (or the error reading it).
    Batch(Result<Batch>),
    /// Nothing yet: call again (lets the caller check for Ctrl-C).
    Pending,
    /// The epoch is over.
    Done,
}

/// An epoch of batches being read in the background.
pub struct BatchStream {
    slots: Receiver<Receiver<Result<Batch>>>,
    current: Option<Receiver<Result<Batch>>>,
    cancel: Arc<AtomicBool>,
    dispatcher: Option<JoinHandle<()>>,
    /// Batch reads started and not finished (they end early once `cancel` is raised).
    in_flight: Arc<AtomicUsize>,
    stopped: bool,
}

/// Counts a batch read as in flight until it is dropped (also when the read panics).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(counter: &Arc<AtomicUsize>) -> InFlight {
        counter.fetch_add(1, Ordering::AcqRel);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long `stop` waits for reads in flight to see the cancel flag (a read blocked in the
/// operating system cannot be interrupted; it is left to finish on its own after this).
const STOP_WAIT: Duration = Duration::from_secs(10);

impl BatchStream {
    /// Starts reading `batches` (each a list of planned samples) from `collection`.
    pub fn start(collection: Collection, batches: Vec<Vec<PlannedSample>>, settings: StreamSettings) -> Result<BatchStream> {
        if let Some(empty) = batches.iter().position(Vec::is_empty) {
            return Err(Error::invalid(format!(
                "batch {empty} of the plan has no samples; a batch needs at least one"
            )));
        }
        let pool = new_pool(settings.threads, "loader")?;
        let cancel = Arc::new(AtomicBool::new(false));
        // The slot queue is bounded: the dispatcher waits when `prefetch` batches are ahead.
        let (slot_tx, slots) = sync_channel::<Receiver<Result<Batch>>>(settings.prefetch.max(1));
        let stop = cancel.clone();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let counter = in_flight.clone();
        let dispatcher = std::thread::Builder::new()
            .name("cellmap-dispatch".into())
            .spawn(move || {
                let collection = Arc::new(collection);
                // Remote data: the requests of the batches `prefetch` places ahead start when a
                // batch is dispatched, so the network is busy before their reads begin.
                let lookahead = if collection.reads_ahead() { settings.prefetch.max(1) } else { 0 };
                for ahead in batches.iter().take(lookahead) {
                    collection.prefetch(ahead, settings.key, settings.augment);
                }
                for (i, samples) in batches.iter().enumerate() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(ahead) = batches.get(i + lookahead).filter(|_| lookahead > 0) {
                        collection.prefetch(ahead, settings.key, settings.augment);
                    }
                    let samples = samples.clone();
                    let (tx, rx) = sync_channel(1);
                    if slot_tx.send(rx).is_err() {
                        break; // consumer gone
                    }
                    let (collection, stop) = (collection.clone(), stop.clone());
                    let running = InFlight::start(&counter);
                    pool.spawn(move || {
                        let _running = running;
                        // A panic must not abort the process (rayon's default for spawned
                        // jobs): it becomes this batch's error.
                        let result = catch_unwind(AssertUnwindSafe(|| {
                            collection.read(&samples, settings.key, settings.augment, Some(&stop), settings.on_read_error)
                        }))
                        .unwrap_or_else(|payload| Err(Error::from_panic(payload)));
                        let _ = tx.send(result);
                    });
                }
            })
            .map_err(|e| Error::invalid(format!("could not start the loader thread: {e}")))?;
        Ok(BatchStream {
            slots,
            current: None,
            cancel,
            dispatcher: Some(dispatcher),
            in_flight,
            stopped: false,
        })
    }

    /// Waits up to `timeout` for the next batch in plan order.
    pub fn next(&mut self, timeout: Duration) -> Next {
        if self.stopped {
            return Next::Done;
        }
        if self.current.is_none() {
            match self.slots.recv_timeout(timeout) {
                Ok(rx) => self.current = Some(rx),
                Err(RecvTimeoutError::Timeout) => return Next::Pending,
                Err(RecvTimeoutError::Disconnected) => return Next::Done,
            }
        }
        let rx = self.current.as_ref().expect("slot present");
        match rx.recv_timeout(timeout) {
            Ok(result) => {
                self.current = None;
                Next::Batch(result)
            }
            Err(RecvTimeoutError::Timeout) => Next::Pending,
            Err(RecvTimeoutError::Disconnected) => {
                self.current = None;
                Next::Batch(Err(Error::invalid("an engine thread stopped without producing its batch")))
            }
        }
    }

    /// Stops reading: queued batches are dropped and in-flight reads end early.
    pub fn stop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.current = None;
        // Draining the slot queue unblocks the dispatcher, which then sees the flag.
        while self.slots.try_recv().is_ok() {}
        if let Some(handle) = self.dispatcher.take() {
            let _ = handle.join();
        }
        // The dispatcher may have queued one more slot between the drain and seeing the flag.
        while self.slots.try_recv().is_ok() {}
        // Reads in flight end at their next sample: wait for them, so nothing of this stream
        // runs (or holds batch memory) after it is stopped.
        let deadline = std::time::Instant::now() + STOP_WAIT;
        while self.in_flight.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stopped = true;
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::dtype::DType;
    use crate::pipeline::batch::ColumnData;
    use crate::pipeline::dataset::DatasetConfig;
    use crate::pipeline::read_policy::ReadIncident;
    use crate::source::cache::ChunkCache;
    use crate::test_fixtures::{ImageSpec, TempDir};
    use serde_json::{json, Value};
    use std::path::Path;
    use std::time::Instant;

    fn s(path: &Path) -> &str {
        path.to_str().unwrap()
    }

    fn settings(value: Value) -> EpochSettings {
        serde_json::from_value(value).unwrap()
    }

    fn stream_settings(threads: usize, prefetch: usize, augment: bool) -> StreamSettings {
        StreamSettings {
            threads,
            prefetch,
            key: StreamKey {
                seed: 5,
                epoch: 0,
                rank: 0,
            },
            augment,
            on_read_error: ReadErrorPolicy::Raise,
        }
    }

    /// Two crops (8 × 8 × 9 uint8 `mito` masks, at different places) of one 16³ float32 raw
    /// volume of 4 nm voxels, sampled as 4³ patches with mirrors, transposes and rotations.
    fn two_crops(dir: &TempDir) -> Collection {
        let raw = dir.join("data.zarr").join("raw");
        let mut spec = ImageSpec::new([0.0; 3], [4.0; 3], [16; 3]);
        spec.chunk = [8; 3];
        spec.write(&raw, |[z, y, x]| (256 * z + 16 * y + x) as f32);
        let datasets = [("crop1", [16.0, 16.0, 16.0]), ("crop2", [4.0, 8.0, 20.0])]
            .iter()
            .map(|(name, lo)| {
                let mito = dir.join("data.zarr").join(name).join("mito");
                let mut labels = ImageSpec::new(*lo, [4.0; 3], [8, 8, 9]);
                labels.dtype = DType::U8;
                labels.write(&mito, |[z, y, x]| f32::from(u8::from((z + 2 * y + 3 * x) % 5 < 2)));
                let config = DatasetConfig::from_json(&json!({
                    "raw_path": s(&raw),
                    "crop": name,
                    "classes": [["mito", s(&mito), []]],
                    "inputs": [{"name": "raw", "shape": [4, 4, 4], "scale": [4.0, 4.0, 4.0]}],
                    "targets": [{"name": "labels", "shape": [4, 4, 4], "scale": [4.0, 4.0, 4.0]}],
                    "spatial": {"mirror": {"x": 0.5, "y": 0.5}, "transpose": ["x", "y"], "rotate": {"z": [-30, 30]}},
                }))
                .unwrap();
                Arc::new(Dataset::open(config, ChunkCache::global()).unwrap())
            })
            .collect();
        Collection::new(datasets).unwrap()
    }

    /// Replaces the bytes of one stored chunk with garbage of the same length.
    fn corrupt(chunk: &Path) {
        let len = std::fs::metadata(chunk).unwrap().len() as usize;
        std::fs::write(chunk, vec![0xA5u8; len]).unwrap();
    }

    fn read_epoch(collection: &Collection, threads: usize, policy: ReadErrorPolicy) -> Result<Vec<Batch>> {
        let plan = collection.epoch_plan(&shuffled_epoch()).unwrap();
        let mut settings = stream_settings(threads, 2, true);
        settings.on_read_error = policy;
        let mut stream = BatchStream::start(collection.clone(), plan, settings).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut batches = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "the stream did not finish");
            match stream.next(Duration::from_millis(100)) {
                Next::Batch(batch) => batches.push(batch?),
                Next::Pending => {}
                Next::Done => return Ok(batches),
            }
        }
    }

    #[test]
    fn a_corrupt_chunk_raises_naming_chunk_and_sample_or_is_skipped_deterministically() {
        let dir = TempDir::new("loader-corrupt");
        let collection = two_crops(&dir);
        corrupt(&dir.join("data.zarr/crop2/mito/s0/0.0.0"));
        let e = read_epoch(&collection, 2, ReadErrorPolicy::Raise).map(|_| ()).unwrap_err();
        let message = e.to_string();
        assert!(matches!(e, Error::Decode { .. }), "{message}");
        assert!(
            message.contains("crop2/mito/s0") && message.contains("chunk [0, 0, 0]"),
            "{message}"
        );
        assert!(message.contains("reading sample") && message.contains("centred at"), "{message}");

        let one = read_epoch(&collection, 1, ReadErrorPolicy::Skip).unwrap();
        let four = read_epoch(&collection, 4, ReadErrorPolicy::Skip).unwrap();
        let skipped: Vec<&ReadIncident> = one.iter().flat_map(|b| &b.incidents).collect();
        assert!(
            !skipped.is_empty()
                && skipped
                    .iter()
                    .all(|i| i.action == "skipped" && i.message.contains("chunk [0, 0, 0]"))
        );
        assert_eq!(one.iter().map(|b| b.len()).sum::<usize>(), 12, "every planned sample is delivered");
        for (a, b) in one.iter().zip(&four) {
            assert_eq!(a.samples, b.samples, "replacements are a function of the seed");
            assert_eq!(values(a), values(b));
            assert_eq!(a.incidents, b.incidents);
        }
        // A replaced sample's metadata is its replacement's: never the failing sample.
        for batch in &one {
            for incident in &batch.incidents {
                assert_ne!(batch.samples[incident.position].index, incident.index);
            }
        }
    }

    #[test]
    fn transient_errors_are_retried_and_panics_become_errors() {
        let _one_at_a_time = crate::io::faults::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let dir = TempDir::new("loader-faults");
        let collection = two_crops(&dir);
        let pattern = dir.join("data.zarr/crop1").to_string_lossy().into_owned();
        crate::io::faults::inject(crate::io::faults::FaultKind::Eio, &pattern, 2).unwrap();
        let batches = read_epoch(&collection, 2, ReadErrorPolicy::Retry).unwrap();
        let retried: Vec<&ReadIncident> = batches.iter().flat_map(|b| &b.incidents).collect();
        assert_eq!(retried.len(), 2, "{retried:?}");
        assert!(retried.iter().all(|i| i.action == "retried"));
        // Faults fire on chunk reads: empty the caches so the chunks are read again.
        ChunkCache::global().clear();
        crate::source::label_cache::LabelCache::global().clear();
        crate::io::faults::inject(crate::io::faults::FaultKind::Eio, &pattern, 1).unwrap();
        let e = read_epoch(&collection, 2, ReadErrorPolicy::Raise).map(|_| ()).unwrap_err();
        assert!(e.is_transient() && e.to_string().contains("crop1"), "{e}");
        ChunkCache::global().clear();
        crate::source::label_cache::LabelCache::global().clear();
        crate::io::faults::inject(crate::io::faults::FaultKind::Panic, &pattern, 1).unwrap();
        let e = read_epoch(&collection, 2, ReadErrorPolicy::Skip).map(|_| ()).unwrap_err();
        assert!(matches!(e, Error::Internal(_)) && e.to_string().contains("injected fault"), "{e}");
        crate::io::faults::clear();
        // The process and the collection are fine afterwards.
        assert_eq!(read_epoch(&collection, 2, ReadErrorPolicy::Raise).unwrap().len(), 4);
    }

    fn shuffled_epoch() -> EpochSettings {
        settings(json!({"source": {"kind": "uniform", "shuffle": true}, "samples": 12, "batch_size": 3, "seed": 5, "epoch": 0}))
    }

    /// Every batch of the stream, in the order it delivers them.
    fn drain(stream: &mut BatchStream) -> Vec<Batch> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut batches = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "the stream did not finish");
            match stream.next(Duration::from_millis(100)) {
                Next::Batch(batch) => batches.push(batch.unwrap()),
                Next::Pending => {}
                Next::Done => return batches,
            }
        }
    }

    fn values(batch: &Batch) -> Vec<Vec<u32>> {
        batch
            .columns
            .iter()
            .map(|c| match &c.data {
                ColumnData::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
                ColumnData::U8(v) => v.iter().map(|&x| u32::from(x)).collect(),
            })
            .collect()
    }

    fn assert_same_batch(a: &Batch, b: &Batch, context: &str) {
        assert_eq!(a.samples, b.samples, "{context}: sample requests");
        assert_eq!(a.positions, b.positions, "{context}: dataset positions");
        assert_eq!(a.dataset_labels, b.dataset_labels, "{context}: dataset labels");
        assert_eq!(a.crop_labels, b.crop_labels, "{context}: crops");
        assert_eq!(a.levels, b.levels, "{context}: levels");
        let names = |x: &Batch| {
            x.columns
                .iter()
                .map(|c| (c.name.clone(), c.sample_shape.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(a), names(b), "{context}: columns");
        assert!(values(a) == values(b), "{context}: tensor values differ");
    }

    #[test]
    fn batches_arrive_in_plan_order() {
        let dir = TempDir::new("plan-order");
        let collection = two_crops(&dir);
        let plan = collection.epoch_plan(&shuffled_epoch()).unwrap();
        assert_eq!(plan.len(), 4);
        let mut stream = BatchStream::start(collection.clone(), plan.clone(), stream_settings(3, 2, true)).unwrap();
        let batches = drain(&mut stream);
        assert_eq!(batches.len(), plan.len());
        for (b, (batch, planned)) in batches.iter().zip(&plan).enumerate() {
            let indices: Vec<u64> = planned.iter().map(|p| p.index as u64).collect();
            let datasets: Vec<usize> = planned.iter().map(|p| p.dataset).collect();
            assert_eq!(batch.samples.iter().map(|s| s.index).collect::<Vec<_>>(), indices, "batch {b}");
            assert_eq!(batch.positions, datasets, "batch {b}");
            assert_eq!(
                batch.crop_labels,
                datasets.iter().map(|&d| format!("crop{}", d + 1)).collect::<Vec<_>>()
            );
            for (sample, p) in batch.samples.iter().zip(planned) {
                assert_eq!(sample.centre, collection.datasets[p.dataset].centre(p.index).unwrap());
            }
        }
    }

    #[test]
    fn one_and_four_threads_deliver_identical_batches() {
        let dir = TempDir::new("threads");
        let collection = two_crops(&dir);
        let plan = collection.epoch_plan(&shuffled_epoch()).unwrap();
        let one = drain(&mut BatchStream::start(collection.clone(), plan.clone(), stream_settings(1, 1, true)).unwrap());
        let four = drain(&mut BatchStream::start(collection, plan, stream_settings(4, 3, true)).unwrap());
        assert_eq!((one.len(), four.len()), (4, 4));
        for (b, (x, y)) in one.iter().zip(&four).enumerate() {
            assert_same_batch(x, y, &format!("batch {b}"));
        }
        // The comparison is worth something only if samples were actually turned.
        assert!(one.iter().flat_map(|b| &b.samples).any(|s| s.draw.angles_deg[0] != 0.0));
        assert!(one.iter().flat_map(|b| &b.samples).any(|s| s.draw.mirror.contains(&true)));
    }

    #[test]
    fn streamed_batches_equal_direct_reads_of_the_plan() {
        let dir = TempDir::new("direct");
        let collection = two_crops(&dir);
        let plan = collection.epoch_plan(&shuffled_epoch()).unwrap();
        let settings = stream_settings(2, 2, true);
        let streamed = drain(&mut BatchStream::start(collection.clone(), plan.clone(), settings).unwrap());
        for (b, (batch, planned)) in streamed.iter().zip(&plan).enumerate() {
            let direct = collection.read(planned, settings.key, true, None, ReadErrorPolicy::Raise).unwrap();
            assert_same_batch(batch, &direct, &format!("batch {b}"));
        }
    }

    /// A 32³ float32 raw volume of 1 nm voxels in 8³ chunks read as 8³ patches through its own
    /// cache, and the global sample indices whose patches are exactly chunk (a, b, c): grid
    /// centres run from 4 nm in steps of 1 nm, 25 per axis.
    fn chunk_per_sample(dir: &TempDir) -> (Collection, Arc<ChunkCache>) {
        let raw = dir.join("c.zarr").join("raw");
        let mut spec = ImageSpec::new([0.0; 3], [1.0; 3], [32; 3]);
        spec.chunk = [8; 3];
        spec.write(&raw, |[z, y, x]| (z + y + x) as f32);
        let cache = Arc::new(ChunkCache::new(64 << 20));
        let config = DatasetConfig::from_json(&json!({
            "raw_path": s(&raw),
            "inputs": [{"name": "raw", "shape": [8, 8, 8], "scale": [1.0, 1.0, 1.0]}],
        }))
        .unwrap();
        let dataset = Dataset::open(config, cache.clone()).unwrap();
        assert_eq!(dataset.len(), 25 * 25 * 25);
        (Collection::new(vec![Arc::new(dataset)]).unwrap(), cache)
    }

    fn chunk_sample(a: usize, b: usize, c: usize) -> usize {
        8 * a * 625 + 8 * b * 25 + 8 * c
    }

    fn wait_for(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn reads_stay_at_most_prefetch_batches_ahead_of_the_consumer() {
        let dir = TempDir::new("prefetch");
        let (collection, cache) = chunk_per_sample(&dir);
        // One sample per batch, each on a chunk of its own: chunk decodes count batches read.
        let indices: Vec<usize> = (0..8).map(|i| chunk_sample(i / 4, (i / 2) % 2, i % 2)).collect();
        let plan = collection
            .epoch_plan(&settings(
                json!({"source": {"kind": "given", "indices": indices}, "batch_size": 1, "seed": 0, "epoch": 0}),
            ))
            .unwrap();
        assert_eq!(plan.len(), 8);
        let misses = || cache.stats().misses;
        let mut stream = BatchStream::start(collection, plan, stream_settings(4, 2, false)).unwrap();
        wait_for("two batches", || misses() >= 2);
        // Give a third read every chance to start: it must not.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(misses(), 2, "nothing taken yet: only `prefetch` batches are read");
        for taken in 1..=3u64 {
            match stream.next(Duration::from_secs(30)) {
                Next::Batch(batch) => assert_eq!(batch.unwrap().samples[0].index, indices[taken as usize - 1] as u64),
                _ => panic!("batch {taken} did not come"),
            }
            wait_for("the next batch", || misses() >= taken + 2);
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(misses(), taken + 2, "{taken} taken: reads stay `prefetch` batches ahead");
        }
    }

    fn long_epoch(collection: &Collection) -> Vec<Vec<PlannedSample>> {
        let plan = collection
            .epoch_plan(&settings(
                json!({"source": {"kind": "uniform", "shuffle": false}, "samples": 500, "batch_size": 1, "seed": 0, "epoch": 0}),
            ))
            .unwrap();
        assert_eq!(plan.len(), 500);
        plan
    }

    #[test]
    fn stop_with_batches_pending_returns_promptly_and_ends_the_stream() {
        let dir = TempDir::new("stop");
        let (collection, cache) = chunk_per_sample(&dir);
        let plan = long_epoch(&collection);
        let mut stream = BatchStream::start(collection, plan, stream_settings(1, 2, false)).unwrap();
        assert!(matches!(stream.next(Duration::from_secs(30)), Next::Batch(Ok(_))));
        // Batches 1 and 2 (x from 1 and 2 nm: two chunks each) are read, the queue is full and
        // the dispatcher waits to hand out batch 3.
        wait_for("two batches ahead", || cache.stats().misses + cache.stats().hits >= 5);
        let started = Instant::now();
        stream.stop();
        assert!(started.elapsed() < Duration::from_secs(5), "stop took {:?}", started.elapsed());
        // Queued batches are dropped, a slot dispatched while stop drained the queue included:
        // the epoch is over at once.
        assert!(matches!(stream.next(Duration::from_millis(100)), Next::Done));
    }

    #[test]
    fn dropping_a_stream_mid_epoch_does_not_hang() {
        let dir = TempDir::new("drop");
        let (collection, _cache) = chunk_per_sample(&dir);
        let plan = long_epoch(&collection);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut stream = BatchStream::start(collection, plan, stream_settings(2, 3, false)).unwrap();
            let first = stream.next(Duration::from_secs(30));
            drop(stream);
            let _ = done_tx.send(matches!(first, Next::Batch(Ok(_))));
        });
        match done_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(got_a_batch) => assert!(got_a_batch, "the first batch did not come"),
            Err(_) => panic!("dropping the stream hung"),
        }
    }
}
