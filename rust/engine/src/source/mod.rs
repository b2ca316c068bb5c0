//! Opened data: multiscale images and their levels (`volume`), the process-wide decoded-chunk
//! cache (`cache`) and label crops held bit-packed (`label_cache`). Built on `format` and `io`.

pub mod cache;
pub mod label_cache;
pub mod volume;
