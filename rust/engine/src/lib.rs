//! cellmap-engine: reads training patches from OME-NGFF Zarr volumes (the CellMap/COSEM
//! layout) with one affine map per array per sample, through a shared decoded-chunk cache, and
//! assembles batches as Arrow record batches. No Python here: the `cellmap-python` crate binds it.
#![deny(missing_docs)]

// Layers, each built only on those listed before it (checked by `module_graph_has_no_cycle`):
// error, geometry, runtime → io → format → source → sample → pipeline; writer (on source).
pub mod error;
pub mod geometry;
pub mod runtime;

pub mod io;

pub mod format;

pub mod source;

pub mod sample;

pub mod pipeline;

pub mod writer;

#[cfg(test)]
mod test_fixtures;

pub use error::{Error, ErrorKind, Result};
