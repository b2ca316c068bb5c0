//! Datasets to batches: a dataset's arrays and value transforms (`dataset`, `values`, `labels`),
//! epoch plans (`sampler`), batch assembly and its Arrow form (`batch`), the read-error policy
//! (`read_policy`), the ordered prefetching stream (`loader`) and class statistics (`stats`).
//! Built on `sample`.

pub mod batch;
pub mod dataset;
pub mod labels;
pub mod loader;
pub mod read_policy;
pub mod sampler;
pub mod stats;
pub mod values;
