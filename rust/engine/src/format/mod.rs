//! What the bytes mean: OME-NGFF multiscales metadata as types (`ngff`), zarr nodes' attributes
//! read through a store (`zarr_node`), the element types the engine
//! reads and writes (`dtype`, one table), and checks of encoded chunks before they are decoded
//! (`decode_guard`). Built on `io`.

pub mod decode_guard;
pub mod dtype;
pub mod ngff;
pub mod zarr_node;
