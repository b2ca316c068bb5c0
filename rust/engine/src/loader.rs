//! The batch pipeline behind `CellMapDataLoader`: a dispatcher thread turns an epoch plan into
//! batch reads on an engine thread pool, with at most `prefetch` batches ahead of the consumer,
//! delivered in plan order (so the thread count never changes what comes out).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arrow_array::{ArrayRef, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field};

use crate::batch::{Batch, SampleMetadata};
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::runtime::new_pool;
use crate::sampler::{epoch_batches, request, EpochSettings, PlannedSample, StreamKey};

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

    /// Reads one planned batch.
    pub fn read(&self, samples: &[PlannedSample], key: StreamKey, augment: bool, cancel: Option<&AtomicBool>) -> Result<Batch> {
        let items = samples
            .iter()
            .map(|p| {
                let dataset = self
                    .datasets
                    .get(p.dataset)
                    .ok_or_else(|| Error::invalid(format!("dataset {} does not exist", p.dataset)))?;
                Ok((dataset.as_ref(), request(dataset, p.index, key, p.stream, augment)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut batch = Batch::read_items(&items, cancel)?;
        batch.positions = samples.iter().map(|p| p.dataset).collect();
        Ok(batch)
    }

    /// The batches of one epoch ([`epoch_batches`] over these datasets).
    pub fn epoch_plan(&self, settings: &EpochSettings) -> Result<Vec<Vec<PlannedSample>>> {
        let annotated: Vec<Vec<bool>> = self.datasets.iter().map(|d| d.annotated_classes()).collect();
        epoch_batches(&self.sizes(), &annotated, settings)
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
        for (b, batch) in batches.iter().enumerate() {
            for p in batch {
                let dataset = self
                    .datasets
                    .get(p.dataset)
                    .ok_or_else(|| Error::invalid(format!("dataset {} does not exist", p.dataset)))?;
                samples.push(request(dataset, p.index, key, p.stream, augment)?);
                datasets.push(dataset.config.name());
                crops.push(dataset.config.crop.clone());
                levels.push(dataset.array_levels());
                batch_numbers.push(b as u64);
            }
        }
        let array_names: Vec<String> = match self.datasets.first() {
            Some(d) => d.config.inputs.iter().chain(&d.config.targets).map(|a| a.name.clone()).collect(),
            None => Vec::new(),
        };
        let meta = SampleMetadata {
            samples: &samples,
            dataset_labels: &datasets,
            crop_labels: &crops,
            levels: &levels,
            array_names: &array_names,
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
}

/// What `next` returns.
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
}

impl BatchStream {
    /// Starts reading `batches` (each a list of planned samples) from `collection`.
    pub fn start(collection: Collection, batches: Vec<Vec<PlannedSample>>, settings: StreamSettings) -> Result<BatchStream> {
        let pool = new_pool(settings.threads, "loader")?;
        let cancel = Arc::new(AtomicBool::new(false));
        // The slot queue is bounded: the dispatcher waits when `prefetch` batches are ahead.
        let (slot_tx, slots) = sync_channel::<Receiver<Result<Batch>>>(settings.prefetch.max(1));
        let stop = cancel.clone();
        let dispatcher = std::thread::Builder::new()
            .name("cellmap-dispatch".into())
            .spawn(move || {
                let collection = Arc::new(collection);
                for samples in batches {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (tx, rx) = sync_channel(1);
                    if slot_tx.send(rx).is_err() {
                        break; // consumer gone
                    }
                    let (collection, stop) = (collection.clone(), stop.clone());
                    pool.spawn(move || {
                        let result = collection.read(&samples, settings.key, settings.augment, Some(&stop));
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
        })
    }

    /// Waits up to `timeout` for the next batch in plan order.
    pub fn next(&mut self, timeout: Duration) -> Next {
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
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.stop();
    }
}
