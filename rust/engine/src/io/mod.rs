//! The bottom floor: where bytes come from and go to. Locations parsed once (`location`), one
//! store per opened location (`store`), object-store access with its options (`remote_options`),
//! retries and requests started ahead (`remote`), fetched values kept as files (`disk_cache`),
//! files written whole (`atomic`), and fault injection for the reliability tests (`faults`).
//! Nothing here knows zarr metadata, volumes or samples.

pub mod atomic;
pub mod disk_cache;
pub mod faults;
pub mod location;
pub mod remote;
pub mod remote_options;
pub mod store;
