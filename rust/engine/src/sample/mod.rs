//! One sample's geometry and voxels: the keyed random streams (`rng`), spatial draws
//! (`augment`), elastic deformation (`elastic`), the resampling kernels (`resample`) and the
//! read of one patch of one array (`extract`). Built on `source`.

pub mod augment;
pub mod elastic;
pub mod extract;
pub mod resample;
pub mod rng;
