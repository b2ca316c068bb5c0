//! cellmap-engine: reads training patches from OME-NGFF Zarr volumes (the CellMap/COSEM
//! layout) with one affine map per array per sample, through a shared decoded-chunk cache, and
//! assembles batches as Arrow record batches. No Python here: the `cellmap-python` crate binds it.
#![deny(missing_docs)]

pub mod augment;
pub mod batch;
pub mod cache;
pub mod dataset;
pub mod decode_guard;
pub mod elastic;
pub mod error;
pub mod extract;
pub mod faults;
pub mod geometry;
pub mod label_cache;
pub mod labels;
pub mod loader;
pub mod ngff;
pub mod read_policy;
pub mod remote;
pub mod runtime;
pub mod sampler;
pub mod stats;
pub mod values;
pub mod volume;
pub mod writer;

#[cfg(test)]
mod test_fixtures;

pub use error::{Error, ErrorKind, Result};
