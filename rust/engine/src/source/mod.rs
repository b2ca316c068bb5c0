//! Opened data: multiscale images and their levels (`volume`), the process-wide decoded-chunk
//! cache (`cache`), label crops held bit-packed (`label_cache`) and batch output written past
//! the CPU cache (`streaming`). Built on `format` and `io`.

pub mod cache;
pub mod label_cache;
pub mod shards;
pub mod streaming;
pub mod volume;
