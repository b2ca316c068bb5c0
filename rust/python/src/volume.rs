//! `Volume`: one multiscale image, for `CellMapImage` and inspection.

use std::sync::Arc;

use cellmap_engine::pipeline::batch::TrackedVec;
use cellmap_engine::sample::augment::{Interpolation, SpatialDraw};
use cellmap_engine::sample::elastic::ElasticDraw;
use cellmap_engine::sample::extract::{read_patch, PatchSpec, ReadOptions};
use cellmap_engine::source::cache::ChunkCache;
use cellmap_engine::source::volume::{ValueMode, Volume as EngineVolume};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{run, BindResult};
use crate::tensor::Tensor;

/// A multiscale OME-NGFF image opened by the engine.
#[pyclass(module = "cellmap_data._engine", frozen)]
pub struct Volume {
    inner: Arc<EngineVolume>,
}

#[pymethods]
impl Volume {
    /// Opens the image group at `path` (e.g. `.../recon-1/em/fibsem-uint8`).
    #[new]
    fn new(py: Python<'_>, path: String) -> BindResult<Self> {
        let inner = run(py, || EngineVolume::open(path.as_str(), ChunkCache::global()))?;
        Ok(Volume { inner: Arc::new(inner) })
    }

    /// The image group path.
    #[getter]
    fn path(&self) -> String {
        self.inner.path.to_string()
    }

    /// OME-NGFF version of the metadata.
    #[getter]
    fn ngff_version(&self) -> String {
        self.inner.multiscale.version.clone()
    }

    /// Axes as (name, type, unit) tuples.
    #[getter]
    fn axes(&self) -> Vec<(String, Option<String>, Option<String>)> {
        self.inner
            .multiscale
            .axes
            .iter()
            .map(|a| (a.name.clone(), a.kind.clone(), a.unit.clone()))
            .collect()
    }

    /// One dict per level: path, shape, chunks, voxel_size, translation (as written),
    /// voxel0_centre (world centre of voxel 0 in the coordinate frame), dtype, world box.
    #[getter]
    fn levels<'py>(&self, py: Python<'py>) -> BindResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .levels
            .iter()
            .zip(&self.inner.multiscale.levels)
            .map(|(l, meta)| {
                let d = PyDict::new(py);
                d.set_item("path", &meta.path)?;
                d.set_item("shape", l.shape.to_vec())?;
                d.set_item("chunks", l.chunk_shape.to_vec())?;
                d.set_item("voxel_size", l.voxel_size.to_vec())?;
                d.set_item("translation", l.origin.to_vec())?;
                d.set_item("voxel0_centre", l.translation.to_vec())?;
                d.set_item("dtype", l.dtype.name())?;
                let b = l.world_box();
                d.set_item("world_box", (b.lo.to_vec(), b.hi.to_vec()))?;
                Ok(d)
            })
            .collect()
    }

    /// Index of the level closest to `voxel_size` (z, y, x nm); ties go to the finer level.
    fn pick_level(&self, voxel_size: [f64; 3]) -> usize {
        self.inner.pick_level(voxel_size)
    }

    /// Reads a patch of `shape` voxels of `voxel_size` nm centred at `centre` (nm, z y x).
    /// Returns a float32 tensor exported through DLPack.
    #[pyo3(signature = (centre, shape, voxel_size, *, level=None, pad=true, pad_value=f32::NAN,
                        interpolation="nearest", foreground=false, mirror=[false; 3],
                        permutation=[0, 1, 2], rotation_deg=[0.0; 3], rotation_matrix=None,
                        zoom=[1.0; 3], shear=[0.0; 6], elastic=None))]
    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        py: Python<'_>,
        centre: [f64; 3],
        shape: [usize; 3],
        voxel_size: [f64; 3],
        level: Option<usize>,
        pad: bool,
        pad_value: f32,
        interpolation: &str,
        foreground: bool,
        mirror: [bool; 3],
        permutation: [usize; 3],
        rotation_deg: [f64; 3],
        rotation_matrix: Option<[[f64; 3]; 3]>,
        zoom: [f64; 3],
        shear: [f64; 6],
        elastic: Option<(u64, [f64; 3], [f64; 3])>,
    ) -> BindResult<Tensor> {
        let interpolation = Interpolation::parse(interpolation)?;
        let spec = PatchSpec::new(shape, voxel_size)?;
        let level = level.unwrap_or_else(|| self.inner.pick_level(voxel_size));
        let draw = spatial_draw(mirror, permutation, rotation_deg, rotation_matrix, zoom, shear, elastic)?;
        let options = ReadOptions {
            interpolation,
            mode: if foreground { ValueMode::Foreground } else { ValueMode::Raw },
            pad,
            pad_value,
        };
        let volume = self.inner.clone();
        let data = run(py, move || {
            let mut out = TrackedVec::<f32>::for_overwrite(spec.len());
            read_patch(&volume, level, &spec, centre, &draw, &options, &mut out)?;
            Ok(out)
        })?;
        Tensor::new(data.into_buffer(), shape.to_vec())
    }

    fn __repr__(&self) -> String {
        format!("Volume('{}', levels={})", self.inner.path, self.inner.levels.len())
    }
}

/// The elastic displacement field (nm, in the patch's frame before its rotation) of the draw
/// `(seed, control_point_spacing, jitter_sigma)` at the voxel centres of a patch of `shape`
/// voxels of `voxel_size` nm: a `[3, *shape]` tensor (z, y, x components).
#[pyfunction]
pub fn elastic_field(
    py: Python<'_>,
    seed: u64,
    control_point_spacing: [f64; 3],
    jitter_sigma: [f64; 3],
    shape: [usize; 3],
    voxel_size: [f64; 3],
) -> BindResult<Tensor> {
    let draw = ElasticDraw {
        seed,
        spacing: control_point_spacing,
        sigma: jitter_sigma,
    }
    .checked()?;
    let spec = PatchSpec::new(shape, voxel_size)?;
    let data = run(py, move || {
        let mut out = TrackedVec::<f32>::for_overwrite(3 * spec.len());
        for (k, component) in draw.field_nm(shape, voxel_size).iter().enumerate() {
            out[k * spec.len()..(k + 1) * spec.len()].copy_from_slice(component);
        }
        Ok(out)
    })?;
    Tensor::new(data.into_buffer(), vec![3, shape[0], shape[1], shape[2]])
}

/// Checks a hand-given spatial transform in the engine (the same check `Volume.read` makes), so
/// `CellMapImage.set_spatial_transforms` refuses a bad one when it is set, not at the next read.
#[pyfunction]
#[pyo3(signature = (*, mirror=[false; 3], permutation=[0, 1, 2], rotation_deg=[0.0; 3], rotation_matrix=None,
                    zoom=[1.0; 3], shear=[0.0; 6], elastic=None))]
pub fn check_spatial_draw(
    mirror: [bool; 3],
    permutation: [usize; 3],
    rotation_deg: [f64; 3],
    rotation_matrix: Option<[[f64; 3]; 3]>,
    zoom: [f64; 3],
    shear: [f64; 6],
    elastic: Option<(u64, [f64; 3], [f64; 3])>,
) -> BindResult<()> {
    spatial_draw(mirror, permutation, rotation_deg, rotation_matrix, zoom, shear, elastic)
        .map(|_| ())
        .map_err(Into::into)
}

fn spatial_draw(
    mirror: [bool; 3],
    permutation: [usize; 3],
    angles_deg: [f64; 3],
    rotation: Option<[[f64; 3]; 3]>,
    zoom: [f64; 3],
    shear: [f64; 6],
    elastic: Option<(u64, [f64; 3], [f64; 3])>,
) -> cellmap_engine::Result<SpatialDraw> {
    let elastic = elastic.map(|(seed, spacing, sigma)| ElasticDraw { seed, spacing, sigma });
    SpatialDraw {
        mirror,
        permutation,
        angles_deg,
        rotation,
        zoom,
        shear,
        elastic,
    }
    .checked()
}
