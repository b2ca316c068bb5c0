//! A writer's configuration: the typed form the Python layer sends (unknown keys rejected),
//! and the one place its values are checked.

use serde::Deserialize;
use serde_json::Value;

use super::progress::Shard;
use super::tiling::Blend;
use crate::error::{Error, Result};
use crate::format::dtype::DType;
use crate::format::ngff::{CoordinateFrame, ZarrFormat};
use crate::geometry::{WorldBox, AXES};
use crate::io::location::Location;

/// Blending / tiling part of a writer configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TilingConfig {
    /// Overlap between neighbouring tiles (voxels, z y x); zero means plain tiling.
    pub overlap: [usize; 3],
    /// Weights used when the overlap is positive.
    pub blend: Blend,
}

/// Everything needed to create one output image.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// The image group to create, e.g. `<target_path>/<class>` (a folder or an object-store URL).
    pub path: Location,
    /// `name` of the multiscale (default: the path below the `.zarr` container).
    pub name: Option<String>,
    /// Voxel size (nm, z y x).
    pub voxel_size: [f64; 3],
    /// World bounds (nm, voxel edges).
    pub bounds: WorldBox,
    /// Shape of one write (tile), voxels.
    pub write_shape: [usize; 3],
    /// Chunk shape of the arrays (default: the write shape).
    pub chunk_shape: [usize; 3],
    /// Element type stored.
    pub dtype: DType,
    /// Fill value (voxels never written).
    pub fill_value: f64,
    /// zarr v2 + OME-NGFF 0.4, or zarr v3 + OME-NGFF 0.5.
    pub format: ZarrFormat,
    /// Replace an existing image at `path` (otherwise an existing image is an error).
    pub overwrite: bool,
    /// Open an existing image with this layout and write into it, keeping what is there
    /// (several processes writing one image, or resuming): partly written chunks are merged
    /// with the stored ones under a file lock. Creates the image when it does not exist.
    pub exist_ok: bool,
    /// Index of the first level (`s<first_level>`).
    pub first_level: usize,
    /// Number of 2× downsampled levels added after the first (computed at close).
    pub downsample_levels: usize,
    /// zstd level.
    pub compression_level: i32,
    /// Tiling plan (dataset writer) or `None` (free writes at any position).
    pub tiling: Option<TilingConfig>,
    /// Locations the writer must never write into (the raw input).
    pub protected: Vec<Location>,
    /// fsync every chunk before renaming it into place.
    pub fsync: bool,
    /// What the written translation marks (default: the process-wide frame).
    pub frame: CoordinateFrame,
    /// This process's share when several write one planned image (`None`: the whole image).
    pub shard: Option<Shard>,
    /// How downsampled levels summarise a block.
    pub downsample: Downsample,
}

/// How a downsampled level summarises each 2×2×2 block of the level before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downsample {
    /// The mean (raw-like outputs: probabilities, distances).
    Mean,
    /// The most frequent value, the smallest on a tie (labels).
    Mode,
}

/// The tiling part of a writer's configuration as the Python layer sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TilingJson {
    #[serde(default)]
    overlap: Option<[i64; 3]>,
    #[serde(default)]
    blend: Option<String>,
}

fn default_dtype() -> String {
    "float32".into()
}

fn default_zarr_format() -> u8 {
    2
}

fn default_compression_level() -> i32 {
    3
}

/// A writer's configuration as the Python layer sends it (`cellmap_data/writer.py`): parsed
/// once, typed; unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriterJson {
    path: String,
    #[serde(default)]
    name: Option<String>,
    voxel_size: [f64; 3],
    bounds_lo: [f64; 3],
    bounds_hi: [f64; 3],
    write_shape: [i64; 3],
    #[serde(default)]
    chunk_shape: Option<[i64; 3]>,
    #[serde(default = "default_dtype")]
    dtype: String,
    /// `null` (JSON has no NaN): NaN; absent: 0.
    #[serde(default = "zero_fill")]
    fill_value: Option<f64>,
    #[serde(default = "default_zarr_format")]
    zarr_format: u8,
    #[serde(default)]
    overwrite: bool,
    #[serde(default)]
    exist_ok: bool,
    #[serde(default)]
    first_level: i64,
    #[serde(default)]
    downsample_levels: i64,
    #[serde(default = "default_compression_level")]
    compression_level: i32,
    #[serde(default)]
    tiling: Option<TilingJson>,
    #[serde(default)]
    protected: Vec<String>,
    #[serde(default)]
    fsync: bool,
    #[serde(default)]
    coordinate_frame: Option<String>,
    #[serde(default)]
    shard: Option<Shard>,
    /// "mean" or "mode" (default: mean for float types, mode for integer types).
    #[serde(default)]
    downsample: Option<String>,
}

fn zero_fill() -> Option<f64> {
    Some(0.0)
}

/// Signed numbers from the caller as counts, refusing a negative one by the name the caller
/// knows it by (`write_voxel_shape`, `overlap`...): serde's own message would name a Rust type.
fn counts<const N: usize>(name: &str, values: [i64; N], positive: bool) -> Result<[usize; N]> {
    let least = i64::from(positive);
    if values.iter().any(|&v| v < least) {
        let shown = if N == 1 { values[0].to_string() } else { format!("{values:?}") };
        let rule = if positive { "positive" } else { "non-negative" };
        return Err(Error::invalid(format!("{name} {shown} must be {rule}")));
    }
    Ok(values.map(|v| v as usize))
}

impl WriterConfig {
    /// Parses the JSON the Python layer sends (see `cellmap_data/writer.py`). `fill_value:
    /// null` means NaN.
    pub fn from_json(value: &Value) -> Result<WriterConfig> {
        let parsed = WriterJson::deserialize(value).map_err(|e| Error::invalid(format!("writer configuration: {e}")))?;
        let format = match parsed.zarr_format {
            2 => ZarrFormat::V2,
            3 => ZarrFormat::V3,
            other => return Err(Error::invalid(format!("zarr_format must be 2 or 3, not {other}"))),
        };
        let write_shape = counts("write_voxel_shape", parsed.write_shape, true)?;
        let chunk_shape = match parsed.chunk_shape {
            Some(chunks) => counts("chunks", chunks, true)?,
            None => write_shape,
        };
        let [first_level] = counts("scale_level", [parsed.first_level], false)?;
        let [downsample_levels] = counts("downsample_levels", [parsed.downsample_levels], false)?;
        let tiling = match parsed.tiling {
            None => None,
            Some(t) => Some(TilingConfig {
                overlap: counts("overlap", t.overlap.unwrap_or([0; 3]), false)?,
                blend: Blend::parse(t.blend.as_deref().unwrap_or("linear"))?,
            }),
        };
        let dtype = DType::from_name(&parsed.dtype)?;
        let downsample = match parsed.downsample.as_deref() {
            None if dtype.is_float() => Downsample::Mean,
            None => Downsample::Mode,
            Some("mean") => Downsample::Mean,
            Some("mode") => Downsample::Mode,
            Some(other) => return Err(Error::invalid(format!("downsample must be 'mean' or 'mode', not '{other}'"))),
        };
        Ok(WriterConfig {
            path: Location::parse(&parsed.path),
            name: parsed.name,
            voxel_size: parsed.voxel_size,
            bounds: WorldBox {
                lo: parsed.bounds_lo,
                hi: parsed.bounds_hi,
            },
            write_shape,
            chunk_shape,
            dtype,
            fill_value: parsed.fill_value.unwrap_or(f64::NAN),
            format,
            overwrite: parsed.overwrite,
            exist_ok: parsed.exist_ok,
            first_level,
            downsample_levels,
            compression_level: parsed.compression_level,
            tiling,
            protected: parsed.protected.iter().map(|p| Location::parse(p)).collect(),
            fsync: parsed.fsync,
            frame: match parsed.coordinate_frame {
                Some(name) => CoordinateFrame::parse(&name)?,
                None => CoordinateFrame::current(),
            },
            shard: parsed.shard,
            downsample,
        })
    }

    /// Array shape (voxels) of the first level: `ceil((hi - lo) / voxel)` per axis.
    pub fn array_shape(&self) -> [u64; 3] {
        std::array::from_fn(|k| {
            let n = (self.bounds.hi[k] - self.bounds.lo[k]) / self.voxel_size[k];
            // Tolerate float noise: 10.000000001 voxels is 10 voxels.
            ((n - 1e-6).ceil().max(1.0)) as u64
        })
    }

    /// Checks the numbers (no filesystem access).
    pub fn check_values(&self) -> Result<()> {
        for (k, axis) in AXES.iter().enumerate() {
            let (lo, hi, v) = (self.bounds.lo[k], self.bounds.hi[k], self.voxel_size[k]);
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::invalid(format!(
                    "voxel size on axis '{axis}' must be positive and finite, not {v}"
                )));
            }
            if !(lo.is_finite() && hi.is_finite() && hi > lo) {
                return Err(Error::invalid(format!(
                    "bounds on axis '{axis}' must be finite with lo < hi, not [{lo}, {hi}]"
                )));
            }
        }
        if self.overwrite && self.exist_ok {
            return Err(Error::invalid(
                "overwrite=True replaces an existing image and exist_ok=True writes into it: pass one of them",
            ));
        }
        if self.write_shape.contains(&0) {
            return Err(Error::invalid(format!("write shape {:?} has a zero-length axis", self.write_shape)));
        }
        if self.chunk_shape.contains(&0) {
            return Err(Error::invalid(format!("chunk shape {:?} has a zero-length axis", self.chunk_shape)));
        }
        if !(-131072..=22).contains(&self.compression_level) {
            return Err(Error::invalid(format!(
                "compression_level {} is not a zstd level (-131072..=22)",
                self.compression_level
            )));
        }
        if !self.dtype.is_float() {
            let f = self.fill_value;
            if !(f.is_finite() && f.fract() == 0.0) {
                return Err(Error::invalid(format!(
                    "fill_value {f} is not an integer but dtype is {}",
                    self.dtype.name()
                )));
            }
        }
        if let Some(t) = &self.tiling {
            for (k, axis) in AXES.iter().enumerate() {
                if t.overlap[k] > 0 && t.overlap[k] >= self.write_shape[k] {
                    return Err(Error::invalid(format!(
                        "overlap {} on axis '{axis}' must be smaller than the tile ({} voxels)",
                        t.overlap[k], self.write_shape[k]
                    )));
                }
            }
        }
        if let Some(shard) = &self.shard {
            shard.check()?;
            if self.tiling.is_none() {
                return Err(Error::invalid("a writer shared by several ranks needs a tiling plan"));
            }
            if shard.world_size > 1 && !self.exist_ok {
                return Err(Error::invalid(
                    "a writer shared by several ranks writes into one image: pass exist_ok=True (and no overwrite)",
                ));
            }
        }
        let shape = self.array_shape();
        if shape.iter().product::<u64>() > (1u64 << 50) {
            return Err(Error::invalid(format!("array shape {shape:?} is too large")));
        }
        Ok(())
    }

    /// Per level: its shape and its voxel size as a multiple of the first level's (each
    /// downsampling halves every axis that still has more than one voxel).
    pub(super) fn level_geometry(&self) -> Vec<([u64; 3], [u64; 3])> {
        let mut shape = self.array_shape();
        let mut factor = [1u64; 3];
        let mut out = vec![(shape, factor)];
        for _ in 0..self.downsample_levels {
            let f = downsample_factors(shape);
            shape = std::array::from_fn(|k| shape[k].div_ceil(f[k]));
            factor = std::array::from_fn(|k| factor[k] * f[k]);
            out.push((shape, factor));
        }
        out
    }
}

/// The factors from a level of shape `shape` to the next: 2 along each axis longer than one
/// voxel.
pub(super) fn downsample_factors(shape: [u64; 3]) -> [u64; 3] {
    std::array::from_fn(|k| if shape[k] > 1 { 2 } else { 1 })
}
