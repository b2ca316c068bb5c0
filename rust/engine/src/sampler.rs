//! Turns sample indices into sample requests: the centre and every random draw of a sample
//! come from its own keyed RNG stream, so batches do not depend on thread count or order.

use crate::augment::{SampleRng, SpatialDraw};
use crate::batch::SampleRequest;
use crate::dataset::Dataset;
use crate::error::Result;

/// Keys of the random streams: one run = (seed, epoch, rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamKey {
    /// User seed.
    pub seed: u64,
    /// Epoch number.
    pub epoch: u64,
    /// Distributed rank.
    pub rank: u64,
}

/// The request for grid sample `index` of `dataset`; with `augment`, the dataset's spatial
/// config is drawn from the sample's stream (keyed by `stream_index`).
pub fn request(dataset: &Dataset, index: usize, key: StreamKey, stream_index: u64, augment: bool) -> Result<SampleRequest> {
    let centre = dataset.centre(index)?;
    let mut rng = SampleRng::new(key.seed, key.epoch, key.rank, stream_index);
    let draw = if augment {
        dataset.config.spatial.draw(&mut rng, dataset.planar_axis)
    } else {
        SpatialDraw::default()
    };
    Ok(SampleRequest { index: index as u64, centre, draw, value_seed: rng.next_seed() })
}
