//! Tiled prediction writing into OME-NGFF zarr (the engine half of `ImageWriter` and
//! `CellMapDatasetWriter`).
//!
//! One [`ImageWriter`] owns one multiscale image: `<path>/s<first_level>` (plus optional
//! downsampled levels), written as zarr v2 with OME-NGFF 0.4 metadata or zarr v3 with OME-NGFF
//! 0.5 metadata.
//!
//! # Geometry (the half-voxel convention)
//!
//! The writer is given world *bounds* in nm whose `lo`/`hi` are voxel **edges** (the way users
//! build them: `translation .. translation + voxel * shape`). The array has
//! `ceil((hi - lo) / voxel)` voxels per axis; voxel `i` spans `[lo + i·voxel, lo + (i+1)·voxel)`.
//! In the default [`CoordinateFrame::Corner`] the metadata says `translation = lo` (the corner
//! of voxel 0, as the reference library and the CellMap challenge read it); in
//! [`CoordinateFrame::Centre`] it says `translation = lo + voxel / 2` (the centre of voxel 0).
//! Either way, reading the image back in the same frame gives a world box starting at `lo`.
//!
//! # Tiles, chunks and completion
//!
//! Writes arrive as tiles (possibly from several threads, in any order). Each tile is spread
//! over the output chunks it touches, which are accumulated in memory (one lock per chunk) and
//! encoded + written as soon as they are complete; complete chunks are dropped from memory at
//! once, so memory holds only the partially covered chunks. A chunk is complete when
//! - with a tiling plan (`tiling` in the config): every planned tile that touches it arrived;
//! - without one: every voxel of it was written at least once.
//!
//! `flush`/`close` write whatever is still pending (voxels never written keep the fill value).
//! A chunk that was already written and receives another tile is read back, the tile's voxels
//! are overwritten (last write wins, no blending with the flushed data) and it is written again.
//!
//! With a plan and no overlap, each voxel belongs to exactly one tile (the last tile of an
//! axis, shifted back inside the array, only owns the voxels its predecessor did not cover), so
//! the result does not depend on the arrival order. With `overlap > 0` tiles are blended: each
//! tile contributes `value · w` and `w` with separable linear (tent) or Gaussian weights, and
//! the chunk is normalised by the summed weight when written.
//!
//! # Crash safety
//!
//! Every chunk (and metadata file) is written whole: encoded in memory, written to a hidden
//! temporary file beside its destination (`.<name>.<pid>-<n>.partial`), then renamed over it.
//! A process killed at any moment leaves each chunk either absent, old or new, never torn
//! (only a hidden `.partial` file may remain). With `fsync` the data are also flushed to disk
//! before the rename, which extends this to power loss.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};
use zarrs::array::{Array, ArraySubset, ArrayToBytesCodecTraits, CodecOptions, IntoArrayBytes};
use zarrs::filesystem::FilesystemStore;

use crate::error::{Error, Result};
use crate::geometry::{WorldBox, AXES};
use crate::ngff::{CoordinateFrame, ZarrFormat};
use crate::volume::DType;

/// How overlapping tiles are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blend {
    /// Tent weights: a linear ramp over the `overlap` voxels at each tile edge, 1 inside.
    Linear,
    /// Gaussian weights centred on the tile, sigma = tile / 8 per axis.
    Gaussian,
}

impl Blend {
    /// Parses `linear` (also `tent`) or `gaussian`.
    pub fn parse(name: &str) -> Result<Blend> {
        match name.to_ascii_lowercase().as_str() {
            "linear" | "tent" => Ok(Blend::Linear),
            "gaussian" | "gauss" => Ok(Blend::Gaussian),
            other => Err(Error::invalid(format!("blend must be 'linear' or 'gaussian', not '{other}'"))),
        }
    }

    /// Weights along one tile axis of `n` voxels overlapping its neighbours by `overlap`.
    /// All weights are positive; an axis without overlap has weight 1 everywhere.
    pub fn axis_weights(self, n: usize, overlap: usize) -> Vec<f32> {
        if overlap == 0 || n <= 1 {
            return vec![1.0; n];
        }
        match self {
            Blend::Linear => {
                let ramp = (overlap + 1) as f64;
                (0..n)
                    .map(|i| {
                        let w = ((i + 1) as f64 / ramp).min((n - i) as f64 / ramp).min(1.0);
                        w as f32
                    })
                    .collect()
            }
            Blend::Gaussian => {
                let sigma = (n as f64 / 8.0).max(0.5);
                let c = (n as f64 - 1.0) / 2.0;
                (0..n)
                    .map(|i| {
                        let d = i as f64 - c;
                        ((-d * d / (2.0 * sigma * sigma)).exp()).max(1e-6) as f32
                    })
                    .collect()
            }
        }
    }
}

/// Tile start positions along one axis of `extent` voxels: tiles of `tile` voxels stepping by
/// `tile - overlap`, the last one shifted back so that it ends exactly at `extent` (never
/// dropped). An axis shorter than the tile gets one tile centred on it (its start is negative
/// and the tile is clipped to the array when written).
pub fn plan_starts(extent: u64, tile: usize, overlap: usize) -> Vec<i64> {
    assert!(
        tile > 0 && overlap < tile.max(1),
        "tile must be positive and larger than the overlap"
    );
    let (extent, tile_i) = (extent as i64, tile as i64);
    if extent <= tile_i {
        return vec![-((tile_i - extent) / 2)];
    }
    let step = (tile - overlap) as i64;
    let mut starts = Vec::new();
    let mut p = 0i64;
    loop {
        if p + tile_i >= extent {
            starts.push(extent - tile_i);
            break;
        }
        starts.push(p);
        p += step;
    }
    starts.dedup();
    starts
}

/// The tiles a dataset writer hands out: a regular grid of per-axis starts over the array.
#[derive(Debug, Clone)]
pub struct TilePlan {
    /// Tile shape (voxels, z y x).
    pub tile: [usize; 3],
    /// Overlap between neighbouring tiles (voxels, z y x).
    pub overlap: [usize; 3],
    /// Tile starts per axis (array voxels; may be negative for an axis shorter than the tile).
    pub starts: [Vec<i64>; 3],
    /// Per axis, per start: the voxels `[lo, hi)` that tile writes.
    regions: [Vec<(u64, u64)>; 3],
    /// Separable blend weights of a tile (only when some overlap is positive).
    weights: Option<[Vec<f32>; 3]>,
}

impl TilePlan {
    /// Plans tiles of `tile` voxels over an array of `shape` voxels.
    pub fn new(shape: [u64; 3], tile: [usize; 3], overlap: [usize; 3], blend: Blend) -> Result<TilePlan> {
        for k in 0..3 {
            if tile[k] == 0 {
                return Err(Error::invalid(format!("tile shape {tile:?} has a zero-length axis")));
            }
            if overlap[k] >= tile[k] && overlap[k] > 0 {
                return Err(Error::invalid(format!(
                    "overlap {} on axis '{}' must be smaller than the tile ({} voxels)",
                    overlap[k], AXES[k], tile[k]
                )));
            }
        }
        let starts: [Vec<i64>; 3] = std::array::from_fn(|k| plan_starts(shape[k], tile[k], overlap[k]));
        let blended = overlap.iter().any(|&o| o > 0);
        let regions = std::array::from_fn(|k| {
            let t = tile[k] as i64;
            let extent = shape[k] as i64;
            starts[k]
                .iter()
                .enumerate()
                .map(|(j, &s)| {
                    let mut lo = s.max(0);
                    if !blended && j > 0 {
                        // Plain tiling: a voxel belongs to the first tile covering it.
                        lo = lo.max(starts[k][j - 1] + t);
                    }
                    let hi = (s + t).min(extent);
                    (lo as u64, hi.max(lo) as u64)
                })
                .collect()
        });
        let weights = blended.then(|| std::array::from_fn(|k| blend.axis_weights(tile[k], overlap[k])));
        Ok(TilePlan {
            tile,
            overlap,
            starts,
            regions,
            weights,
        })
    }

    /// Tiles per axis.
    pub fn grid(&self) -> [usize; 3] {
        std::array::from_fn(|k| self.starts[k].len())
    }

    /// Number of tiles.
    pub fn len(&self) -> usize {
        self.grid().iter().product()
    }

    /// Whether the plan has no tile (never true: every axis has at least one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether tiles are blended (some overlap is positive).
    pub fn is_blended(&self) -> bool {
        self.weights.is_some()
    }

    fn index3(&self, index: usize) -> [usize; 3] {
        let g = self.grid();
        [index / (g[1] * g[2]), (index / g[2]) % g[1], index % g[2]]
    }

    /// Start (array voxels) of tile `index` (row-major over the per-axis starts).
    pub fn tile_start(&self, index: usize) -> [i64; 3] {
        let i = self.index3(index);
        std::array::from_fn(|k| self.starts[k][i[k]])
    }

    fn region(&self, index: usize) -> [(u64, u64); 3] {
        let i = self.index3(index);
        std::array::from_fn(|k| self.regions[k][i[k]])
    }

    /// Number of tiles whose written region meets the voxel box `[lo, hi)`.
    fn tiles_meeting(&self, lo: [u64; 3], hi: [u64; 3]) -> u64 {
        (0..3)
            .map(|k| self.regions[k].iter().filter(|&&(a, b)| a < b && a < hi[k] && b > lo[k]).count() as u64)
            .product()
    }
}

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
    /// The image group to create, e.g. `<target_path>/<class>`.
    pub path: PathBuf,
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
    /// Index of the first level (`s<first_level>`).
    pub first_level: usize,
    /// Number of 2× downsampled levels added after the first (computed at close).
    pub downsample_levels: usize,
    /// zstd level.
    pub compression_level: i32,
    /// Tiling plan (dataset writer) or `None` (free writes at any position).
    pub tiling: Option<TilingConfig>,
    /// Paths the writer must never write into (the raw input).
    pub protected: Vec<PathBuf>,
    /// fsync every chunk before renaming it into place.
    pub fsync: bool,
    /// What the written translation marks (default: the process-wide frame).
    pub frame: CoordinateFrame,
}

fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "float32" => DType::F32,
        "float64" => DType::F64,
        "uint8" => DType::U8,
        "uint16" => DType::U16,
        "uint32" => DType::U32,
        "uint64" => DType::U64,
        "int8" => DType::I8,
        "int16" => DType::I16,
        "int32" => DType::I32,
        "int64" => DType::I64,
        other => {
            return Err(Error::invalid(format!(
                "dtype must be a float or integer type name such as 'float32', not '{other}'"
            )))
        }
    })
}

/// The tiling part of a writer's configuration as the Python layer sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TilingJson {
    #[serde(default)]
    overlap: Option<[usize; 3]>,
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
    path: PathBuf,
    #[serde(default)]
    name: Option<String>,
    voxel_size: [f64; 3],
    bounds_lo: [f64; 3],
    bounds_hi: [f64; 3],
    write_shape: [usize; 3],
    #[serde(default)]
    chunk_shape: Option<[usize; 3]>,
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
    first_level: usize,
    #[serde(default)]
    downsample_levels: usize,
    #[serde(default = "default_compression_level")]
    compression_level: i32,
    #[serde(default)]
    tiling: Option<TilingJson>,
    #[serde(default)]
    protected: Vec<PathBuf>,
    #[serde(default)]
    fsync: bool,
    #[serde(default)]
    coordinate_frame: Option<String>,
}

fn zero_fill() -> Option<f64> {
    Some(0.0)
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
        let tiling = match parsed.tiling {
            None => None,
            Some(t) => Some(TilingConfig {
                overlap: t.overlap.unwrap_or([0; 3]),
                blend: Blend::parse(t.blend.as_deref().unwrap_or("linear"))?,
            }),
        };
        Ok(WriterConfig {
            path: parsed.path,
            name: parsed.name,
            voxel_size: parsed.voxel_size,
            bounds: WorldBox {
                lo: parsed.bounds_lo,
                hi: parsed.bounds_hi,
            },
            write_shape: parsed.write_shape,
            chunk_shape: parsed.chunk_shape.unwrap_or(parsed.write_shape),
            dtype: parse_dtype(&parsed.dtype)?,
            fill_value: parsed.fill_value.unwrap_or(f64::NAN),
            format,
            overwrite: parsed.overwrite,
            first_level: parsed.first_level,
            downsample_levels: parsed.downsample_levels,
            compression_level: parsed.compression_level,
            tiling,
            protected: parsed.protected,
            fsync: parsed.fsync,
            frame: match parsed.coordinate_frame {
                Some(name) => CoordinateFrame::parse(&name)?,
                None => CoordinateFrame::current(),
            },
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
        let shape = self.array_shape();
        if shape.iter().product::<u64>() > (1u64 << 50) {
            return Err(Error::invalid(format!("array shape {shape:?} is too large")));
        }
        Ok(())
    }

    /// Per level: its shape and its voxel size as a multiple of the first level's (each
    /// downsampling halves every axis that still has more than one voxel).
    fn level_geometry(&self) -> Vec<([u64; 3], [u64; 3])> {
        let mut shape = self.array_shape();
        let mut factor = [1u64; 3];
        let mut out = vec![(shape, factor)];
        for _ in 0..self.downsample_levels {
            let f: [u64; 3] = std::array::from_fn(|k| if shape[k] > 1 { 2 } else { 1 });
            shape = std::array::from_fn(|k| shape[k].div_ceil(f[k]));
            factor = std::array::from_fn(|k| factor[k] * f[k]);
            out.push((shape, factor));
        }
        out
    }
}

// -- paths ---------------------------------------------------------------------------------

/// Absolute, lexically normalised path, with the longest existing prefix canonicalised
/// (symlinks resolved).
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut clean = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    let mut existing = clean.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match existing.file_name() {
            Some(name) => {
                rest.push(name.to_os_string());
                existing.pop();
            }
            None => break,
        }
    }
    let mut out = fs::canonicalize(&existing).unwrap_or(existing);
    for name in rest.iter().rev() {
        out.push(name);
    }
    out
}

fn is_zarr_node(dir: &Path) -> bool {
    [".zgroup", ".zarray", ".zattrs", "zarr.json"].iter().any(|f| dir.join(f).is_file())
}

fn is_empty_dir(dir: &Path) -> bool {
    fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false)
}

/// The directories from the `.zarr` container root (if the path is inside one) down to the
/// parent of `image`.
fn container_chain(image: &Path) -> Vec<PathBuf> {
    let ancestors: Vec<&Path> = image.ancestors().skip(1).collect();
    let root = ancestors.iter().position(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.to_ascii_lowercase().ends_with(".zarr"))
    });
    match root {
        Some(i) => ancestors[..=i].iter().rev().map(|p| p.to_path_buf()).collect(),
        None => Vec::new(),
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` whole: a hidden temporary file beside it, then a rename.
fn write_atomic(path: &Path, bytes: &[u8], fsync: bool) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("chunk");
    let tmp = parent.join(format!(
        ".{name}.{}-{}.partial",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let attempt = || -> std::io::Result<()> {
        let mut file = match fs::File::create(&tmp) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(parent)?;
                fs::File::create(&tmp)?
            }
            other => other?,
        };
        file.write_all(bytes)?;
        if fsync {
            file.sync_all()?;
        }
        drop(file);
        fs::rename(&tmp, path)
    };
    attempt().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| Error::metadata(path, e))?;
    write_atomic(path, &text, false)
}

// -- metadata ------------------------------------------------------------------------------

fn fill_json(dtype: DType, fill: f64) -> Value {
    if dtype.is_float() {
        if fill.is_nan() {
            json!("NaN")
        } else if fill.is_infinite() {
            json!(if fill > 0.0 { "Infinity" } else { "-Infinity" })
        } else {
            json!(fill)
        }
    } else if fill < 0.0 {
        json!(fill as i64)
    } else {
        json!(fill as u64)
    }
}

fn v2_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::U8 => "|u1",
        DType::U16 => "<u2",
        DType::U32 => "<u4",
        DType::U64 => "<u8",
        DType::I8 => "|i1",
        DType::I16 => "<i2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::F32 => "<f4",
        DType::F64 => "<f8",
    }
}

fn array_metadata(config: &WriterConfig, shape: [u64; 3]) -> Value {
    let chunks = config.chunk_shape;
    let fill = fill_json(config.dtype, config.fill_value);
    match config.format {
        ZarrFormat::V2 => json!({
            "zarr_format": 2,
            "shape": shape,
            "chunks": chunks,
            "dtype": v2_dtype(config.dtype),
            "compressor": {"id": "zstd", "level": config.compression_level},
            "fill_value": fill,
            "order": "C",
            "filters": null,
            "dimension_separator": ".",
        }),
        ZarrFormat::V3 => {
            let bytes = if matches!(config.dtype, DType::U8 | DType::I8) {
                json!({"name": "bytes"})
            } else {
                json!({"name": "bytes", "configuration": {"endian": "little"}})
            };
            json!({
                "zarr_format": 3,
                "node_type": "array",
                "shape": shape,
                "data_type": config.dtype.name(),
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": fill,
                "codecs": [bytes, {"name": "zstd", "configuration": {"level": config.compression_level, "checksum": false}}],
                "attributes": {},
                "dimension_names": ["z", "y", "x"],
            })
        }
    }
}

fn multiscale_name(config: &WriterConfig) -> String {
    if let Some(n) = &config.name {
        return n.clone();
    }
    let chain = container_chain(&config.path);
    match chain.first() {
        Some(root) => config
            .path
            .strip_prefix(root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        None => config
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// The multiscale description: per level its path, voxel size and translation (per the
/// coordinate frame).
fn multiscale_json(config: &WriterConfig, levels: &[LevelInfo]) -> Value {
    let datasets: Vec<Value> = levels
        .iter()
        .map(|l| {
            json!({
                "path": l.name,
                "coordinateTransformations": [
                    {"type": "scale", "scale": l.voxel_size},
                    {"type": "translation", "translation": l.translation},
                ],
            })
        })
        .collect();
    let axes: Vec<Value> = AXES
        .iter()
        .map(|a| json!({"name": a, "type": "space", "unit": "nanometer"}))
        .collect();
    let mut m = json!({
        "name": multiscale_name(config),
        "axes": axes,
        "datasets": datasets,
        "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}],
    });
    if config.format == ZarrFormat::V2 {
        m["version"] = json!("0.4");
    }
    m
}

fn group_metadata_files(dir: &Path, format: ZarrFormat, attributes: Option<Value>) -> Vec<(PathBuf, Value)> {
    match format {
        ZarrFormat::V2 => {
            let mut files = vec![(dir.join(".zgroup"), json!({"zarr_format": 2}))];
            if let Some(a) = attributes {
                files.push((dir.join(".zattrs"), a));
            }
            files
        }
        ZarrFormat::V3 => vec![(
            dir.join("zarr.json"),
            json!({"zarr_format": 3, "node_type": "group", "attributes": attributes.unwrap_or_else(|| json!({}))}),
        )],
    }
}

// -- element conversion -------------------------------------------------------------------

trait Sample: Copy + Send + Sync + zarrs::array::Element + zarrs::array::ElementOwned + 'static {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    fn from_f64(v: f64) -> Self;
    fn same(self, other: Self) -> bool;
}

macro_rules! int_sample {
    ($($t:ty),*) => {$(
        impl Sample for $t {
            #[inline(always)]
            fn from_f32(v: f32) -> Self { v.round() as $t }
            #[inline(always)]
            fn to_f32(self) -> f32 { self as f32 }
            fn from_f64(v: f64) -> Self { v.round() as $t }
            #[inline(always)]
            fn same(self, other: Self) -> bool { self == other }
        }
    )*};
}
int_sample!(u8, u16, u32, u64, i8, i16, i32, i64);

impl Sample for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn same(self, other: Self) -> bool {
        self.to_bits() == other.to_bits() || (self.is_nan() && other.is_nan()) || self == other
    }
}

impl Sample for f64 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn same(self, other: Self) -> bool {
        (self.is_nan() && other.is_nan()) || self == other
    }
}

macro_rules! with_sample {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::U8 => {
                type $t = u8;
                $body
            }
            DType::U16 => {
                type $t = u16;
                $body
            }
            DType::U32 => {
                type $t = u32;
                $body
            }
            DType::U64 => {
                type $t = u64;
                $body
            }
            DType::I8 => {
                type $t = i8;
                $body
            }
            DType::I16 => {
                type $t = i16;
                $body
            }
            DType::I32 => {
                type $t = i32;
                $body
            }
            DType::I64 => {
                type $t = i64;
                $body
            }
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
        }
    };
}

// -- chunk accumulation --------------------------------------------------------------------

struct Acc {
    /// Plain: the values; blended: the sum of value × weight.
    values: Vec<f32>,
    /// Blended: the summed weights.
    weights: Option<Vec<f32>>,
    /// Without a plan: which voxels were written.
    covered: Option<Vec<bool>>,
    /// Tiles (plan) or voxels (no plan) still missing.
    remaining: u64,
}

enum ChunkState {
    Pending(Acc),
    Written,
}

/// One level's array.
struct LevelInfo {
    name: String,
    shape: [u64; 3],
    voxel_size: [f64; 3],
    translation: [f64; 3],
    array: Option<Array<FilesystemStore>>,
}

/// A tile (or free write) about to be applied to one chunk.
struct Piece<'a> {
    start: [i64; 3],
    shape: [usize; 3],
    data: &'a [f32],
    /// Voxels written (array coordinates), already clipped to the array.
    region: [(u64, u64); 3],
    /// Whether it counts toward plan completion (first arrival of a planned tile).
    counts: bool,
}

/// Counters of one writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Chunk files written (including rewrites and downsampled levels).
    pub chunks_written: u64,
    /// Encoded bytes written.
    pub bytes_written: u64,
    /// Chunks accumulated in memory, not yet written.
    pub pending_chunks: u64,
}

/// One level of an output image: (path below the image group, shape, voxel size, translation).
pub type LevelSummary = (String, [u64; 3], [f64; 3], [f64; 3]);

/// One output image being written.
pub struct ImageWriter {
    config: WriterConfig,
    levels: Vec<LevelInfo>,
    plan: Option<TilePlan>,
    received: Vec<AtomicBool>,
    chunks: Mutex<HashMap<[u64; 3], Arc<Mutex<ChunkState>>>>,
    closed: AtomicBool,
    chunks_written: AtomicU64,
    bytes_written: AtomicU64,
}

impl std::fmt::Debug for ImageWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageWriter")
            .field("path", &self.config.path)
            .field("shape", &self.shape())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere; the data are still consistent enough to write.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn chunk_range(lo: u64, hi: u64, chunk: u64) -> std::ops::RangeInclusive<u64> {
    lo / chunk..=(hi - 1) / chunk
}

impl ImageWriter {
    /// Checks that `config` can be written — values, the input it must not touch, an existing
    /// image (an error unless `overwrite`), conflicting parent groups, write permission —
    /// without creating anything.
    pub fn validate(config: &WriterConfig) -> Result<()> {
        config.check_values()?;
        let path = resolved(&config.path);
        for p in &config.protected {
            let p = resolved(p);
            if path.starts_with(&p) || p.starts_with(&path) {
                return Err(Error::invalid(format!(
                    "output {} would write into the input data at {}; choose another target path",
                    config.path.display(),
                    p.display()
                )));
            }
        }
        if path.exists() {
            if !path.is_dir() {
                return Err(Error::io(
                    &config.path,
                    std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists and is not a directory"),
                ));
            }
            if !is_empty_dir(&path) {
                if !config.overwrite {
                    return Err(Error::io(
                        &config.path,
                        std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "output already exists (pass overwrite=True to replace it)",
                        ),
                    ));
                }
                if !is_zarr_node(&path) {
                    return Err(Error::invalid(format!(
                        "{}: exists and is not a zarr group; refusing to delete it for overwrite=True",
                        config.path.display()
                    )));
                }
            }
        }
        for dir in container_chain(&path) {
            if dir.join(".zarray").is_file() {
                return Err(Error::invalid(format!(
                    "{}: is a zarr array, not a group; cannot write inside it",
                    dir.display()
                )));
            }
            let other = match config.format {
                ZarrFormat::V2 => dir.join("zarr.json"),
                ZarrFormat::V3 => dir.join(".zgroup"),
            };
            if other.is_file() {
                let (have, want) = match config.format {
                    ZarrFormat::V2 => (3, 2),
                    ZarrFormat::V3 => (2, 3),
                };
                return Err(Error::invalid(format!(
                    "{}: is a zarr v{have} group but zarr_format={want} was requested",
                    dir.display()
                )));
            }
            if dir.join("zarr.json").is_file() {
                if let Ok(doc) = crate::ngff::read_json(&dir.join("zarr.json")) {
                    if doc.get("node_type").and_then(Value::as_str) == Some("array") {
                        return Err(Error::invalid(format!(
                            "{}: is a zarr array, not a group; cannot write inside it",
                            dir.display()
                        )));
                    }
                }
            }
        }
        // Write permission: probe the nearest existing ancestor.
        let mut existing = path.clone();
        while !existing.exists() {
            if !existing.pop() {
                break;
            }
        }
        if !existing.is_dir() {
            return Err(Error::io(
                &existing,
                std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    "is not a directory; cannot create the output below it",
                ),
            ));
        }
        let probe = existing.join(format!(
            ".cellmap-write-probe-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::File::create(&probe) {
            Ok(_) => {
                let _ = fs::remove_file(&probe);
            }
            Err(e) => {
                return Err(Error::io(
                    format!("{}: cannot create the output {} here", existing.display(), config.path.display()),
                    e,
                ))
            }
        }
        Ok(())
    }

    /// Creates the image (parent groups, arrays, multiscales metadata) and returns a writer.
    pub fn create(config: WriterConfig) -> Result<ImageWriter> {
        Self::validate(&config)?;
        let path = config.path.clone();
        if path.exists() && !is_empty_dir(&path) {
            fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        // Parent groups from the container root down (those lacking metadata), then the image.
        for dir in container_chain(&resolved(&path)) {
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            if !is_zarr_node(&dir) {
                for (file, value) in group_metadata_files(&dir, config.format, None) {
                    write_json(&file, &value)?;
                }
            }
        }
        fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;

        let shape0 = config.array_shape();
        let frame = config.frame;
        let mut levels = Vec::new();
        for (i, (shape, f)) in config.level_geometry().into_iter().enumerate() {
            let voxel_size: [f64; 3] = std::array::from_fn(|k| config.voxel_size[k] * f[k] as f64);
            // Voxel 0 of every level has its corner at `lo`; the metadata marks that corner or
            // that voxel's centre, per the coordinate frame.
            let translation = std::array::from_fn(|k| config.bounds.lo[k] + voxel_size[k] / 2.0 - frame.centre_offset(voxel_size[k]));
            levels.push(LevelInfo {
                name: format!("s{}", config.first_level + i),
                shape,
                voxel_size,
                translation,
                array: None,
            });
        }
        let store = Arc::new(FilesystemStore::new(&path).map_err(|e| Error::metadata(&path, e))?);
        for level in levels.iter_mut() {
            let dir = path.join(&level.name);
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let meta = array_metadata(&config, level.shape);
            match config.format {
                ZarrFormat::V2 => {
                    write_json(&dir.join(".zarray"), &meta)?;
                    write_json(&dir.join(".zattrs"), &json!({}))?;
                }
                ZarrFormat::V3 => write_json(&dir.join("zarr.json"), &meta)?,
            }
            let array = Array::open(store.clone(), &format!("/{}", level.name)).map_err(|e| Error::metadata(&dir, e))?;
            level.array = Some(array);
        }
        // The image group's metadata last: a half-created image has no multiscales.
        let multiscale = multiscale_json(&config, &levels);
        let attributes = match config.format {
            ZarrFormat::V2 => json!({"multiscales": [multiscale]}),
            ZarrFormat::V3 => json!({"ome": {"version": "0.5", "multiscales": [multiscale]}}),
        };
        for (file, value) in group_metadata_files(&path, config.format, Some(attributes)) {
            write_json(&file, &value)?;
        }

        let plan = match &config.tiling {
            Some(t) => Some(TilePlan::new(shape0, config.write_shape, t.overlap, t.blend)?),
            None => None,
        };
        let received = (0..plan.as_ref().map_or(0, TilePlan::len))
            .map(|_| AtomicBool::new(false))
            .collect();
        Ok(ImageWriter {
            config,
            levels,
            plan,
            received,
            chunks: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            chunks_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &WriterConfig {
        &self.config
    }

    /// Array shape of the first level (voxels, z y x).
    pub fn shape(&self) -> [u64; 3] {
        self.levels[0].shape
    }

    /// The translation written for the first level (the corner of voxel 0, or its centre in
    /// the centre coordinate frame).
    pub fn translation(&self) -> [f64; 3] {
        self.levels[0].translation
    }

    /// Per level: (path, shape, voxel size, translation).
    pub fn levels(&self) -> Vec<LevelSummary> {
        self.levels
            .iter()
            .map(|l| (l.name.clone(), l.shape, l.voxel_size, l.translation))
            .collect()
    }

    /// The tiling plan, if any.
    pub fn plan(&self) -> Option<&TilePlan> {
        self.plan.as_ref()
    }

    /// World centre (nm) of planned tile `index`.
    pub fn tile_centre(&self, index: usize) -> Result<[f64; 3]> {
        let plan = self.require_plan()?;
        if index >= plan.len() {
            return Err(Error::invalid(format!(
                "tile index {index} is out of range for {} tiles",
                plan.len()
            )));
        }
        let s = plan.tile_start(index);
        Ok(std::array::from_fn(|k| {
            self.config.bounds.lo[k] + (s[k] as f64 + plan.tile[k] as f64 / 2.0) * self.config.voxel_size[k]
        }))
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Counters.
    pub fn stats(&self) -> WriterStats {
        let pending = lock(&self.chunks)
            .values()
            .filter(|c| matches!(*lock(c), ChunkState::Pending(_)))
            .count() as u64;
        WriterStats {
            chunks_written: self.chunks_written.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            pending_chunks: pending,
        }
    }

    fn require_plan(&self) -> Result<&TilePlan> {
        self.plan
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{}: this writer has no tiling plan", self.config.path.display())))
    }

    fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::invalid(format!("{}: the writer is closed", self.config.path.display())));
        }
        Ok(())
    }

    /// Writes planned tiles `indices`; `data` holds one tile after another (C order, tile
    /// shape each).
    pub fn write_tiles(&self, indices: &[usize], data: &[f32]) -> Result<()> {
        self.check_open()?;
        let plan = self.require_plan()?;
        let n = plan.tile.iter().product::<usize>();
        if data.len() != indices.len() * n {
            return Err(Error::invalid(format!(
                "{}: {} values for {} tiles of shape {:?} (expected {})",
                self.config.path.display(),
                data.len(),
                indices.len(),
                plan.tile,
                indices.len() * n
            )));
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= plan.len()) {
            return Err(Error::invalid(format!("tile index {bad} is out of range for {} tiles", plan.len())));
        }
        let pieces: Vec<Piece<'_>> = indices
            .iter()
            .enumerate()
            .map(|(j, &i)| Piece {
                start: plan.tile_start(i),
                shape: plan.tile,
                data: &data[j * n..(j + 1) * n],
                region: plan.region(i),
                counts: !self.received[i].swap(true, Ordering::AcqRel),
            })
            .collect();
        self.apply_pieces(&pieces)
    }

    /// Writes boxes of the write shape starting at `starts` (array voxels, may lie partly
    /// outside the array: clipped); `data` holds one box after another.
    pub fn write_boxes(&self, starts: &[[i64; 3]], data: &[f32]) -> Result<()> {
        self.check_open()?;
        let shape = self.config.write_shape;
        let n = shape.iter().product::<usize>();
        if data.len() != starts.len() * n {
            return Err(Error::invalid(format!(
                "{}: {} values for {} writes of shape {:?} (expected {})",
                self.config.path.display(),
                data.len(),
                starts.len(),
                shape,
                starts.len() * n
            )));
        }
        let array = self.shape();
        let pieces: Vec<Piece<'_>> = starts
            .iter()
            .enumerate()
            .map(|(j, &s)| Piece {
                start: s,
                shape,
                data: &data[j * n..(j + 1) * n],
                region: std::array::from_fn(|k| {
                    let lo = s[k].clamp(0, array[k] as i64) as u64;
                    let hi = (s[k] + shape[k] as i64).clamp(0, array[k] as i64) as u64;
                    (lo, hi.max(lo))
                }),
                counts: false,
            })
            .collect();
        self.apply_pieces(&pieces)
    }

    fn apply_pieces(&self, pieces: &[Piece<'_>]) -> Result<()> {
        let cs: [u64; 3] = std::array::from_fn(|k| self.config.chunk_shape[k] as u64);
        let mut by_chunk: HashMap<[u64; 3], Vec<usize>> = HashMap::new();
        for (p, piece) in pieces.iter().enumerate() {
            let r = piece.region;
            if (0..3).any(|k| r[k].1 <= r[k].0) {
                continue;
            }
            for cz in chunk_range(r[0].0, r[0].1, cs[0]) {
                for cy in chunk_range(r[1].0, r[1].1, cs[1]) {
                    for cx in chunk_range(r[2].0, r[2].1, cs[2]) {
                        by_chunk.entry([cz, cy, cx]).or_default().push(p);
                    }
                }
            }
        }
        let mut work: Vec<([u64; 3], Vec<usize>)> = by_chunk.into_iter().collect();
        work.sort_unstable_by_key(|(c, _)| *c);
        work.par_iter()
            .try_for_each(|(chunk, list)| self.apply_to_chunk(*chunk, list.iter().map(|&p| &pieces[p])))
    }

    fn chunk_box(&self, level: usize, chunk: [u64; 3]) -> ([u64; 3], [u64; 3]) {
        let shape = self.levels[level].shape;
        let lo: [u64; 3] = std::array::from_fn(|k| chunk[k] * self.config.chunk_shape[k] as u64);
        let hi = std::array::from_fn(|k| (lo[k] + self.config.chunk_shape[k] as u64).min(shape[k]));
        (lo, hi)
    }

    fn new_acc(&self, chunk: [u64; 3]) -> Acc {
        let n: usize = self.config.chunk_shape.iter().product();
        let (lo, hi) = self.chunk_box(0, chunk);
        let blended = self.plan.as_ref().is_some_and(TilePlan::is_blended);
        match &self.plan {
            Some(plan) => Acc {
                values: vec![if blended { 0.0 } else { self.config.fill_value as f32 }; n],
                weights: blended.then(|| vec![0.0; n]),
                covered: None,
                remaining: plan.tiles_meeting(lo, hi),
            },
            None => Acc {
                values: vec![self.config.fill_value as f32; n],
                weights: None,
                covered: Some(vec![false; n]),
                remaining: (0..3).map(|k| hi[k] - lo[k]).product(),
            },
        }
    }

    fn chunk_slot(&self, chunk: [u64; 3]) -> Arc<Mutex<ChunkState>> {
        let mut map = lock(&self.chunks);
        map.entry(chunk)
            .or_insert_with(|| Arc::new(Mutex::new(ChunkState::Pending(self.new_acc(chunk)))))
            .clone()
    }

    fn apply_to_chunk<'p, 'd: 'p>(&self, chunk: [u64; 3], pieces: impl Iterator<Item = &'p Piece<'d>>) -> Result<()> {
        let slot = self.chunk_slot(chunk);
        let mut state = lock(&slot);
        let (lo, hi) = self.chunk_box(0, chunk);
        let weights = self.plan.as_ref().and_then(|p| p.weights.as_ref());
        match &mut *state {
            ChunkState::Pending(acc) => {
                for piece in pieces {
                    let newly = copy_piece(acc, lo, hi, self.config.chunk_shape, piece, weights);
                    if acc.covered.is_some() {
                        acc.remaining = acc.remaining.saturating_sub(newly);
                    } else if piece.counts {
                        acc.remaining = acc.remaining.saturating_sub(1);
                    }
                }
                if acc.remaining == 0 {
                    let values = finish(std::mem::replace(acc, empty_acc()), self.config.fill_value as f32);
                    self.store_chunk(0, chunk, &values)?;
                    *state = ChunkState::Written;
                }
            }
            ChunkState::Written => {
                // Read back, overwrite the new voxels (last write wins), write again.
                let mut values = self.load_chunk(0, chunk)?;
                let mut acc = Acc {
                    values: std::mem::take(&mut values),
                    weights: None,
                    covered: None,
                    remaining: 0,
                };
                for piece in pieces {
                    copy_piece(&mut acc, lo, hi, self.config.chunk_shape, piece, None);
                }
                self.store_chunk(0, chunk, &acc.values)?;
            }
        }
        Ok(())
    }

    /// Decodes chunk `chunk` of `level` from disk as f32 (the fill value where absent).
    fn load_chunk(&self, level: usize, chunk: [u64; 3]) -> Result<Vec<f32>> {
        let info = &self.levels[level];
        let array = info.array.as_ref().expect("level array is open");
        let n: usize = self.config.chunk_shape.iter().product();
        let where_ = || format!("{} chunk {:?}", self.config.path.join(&info.name).display(), chunk);
        with_sample!(self.config.dtype, T => {
            match array.retrieve_chunk_if_exists::<Vec<T>>(&chunk).map_err(|e| Error::decode(where_(), e))? {
                Some(v) => Ok(v.into_iter().map(Sample::to_f32).collect()),
                None => Ok(vec![self.config.fill_value as f32; n]),
            }
        })
    }

    /// Encodes `values` (a whole chunk, f32) to the array's dtype and writes it atomically;
    /// an all-fill chunk is not stored (and any previous file removed), as zarr does.
    fn store_chunk(&self, level: usize, chunk: [u64; 3], values: &[f32]) -> Result<()> {
        let info = &self.levels[level];
        let array = info.array.as_ref().expect("level array is open");
        let key = array.chunk_key(&chunk);
        let file = self.config.path.join(key.as_str());
        let where_ = || format!("{} chunk {:?}", self.config.path.join(&info.name).display(), chunk);
        let encoded: Option<Vec<u8>> = with_sample!(self.config.dtype, T => {
            let fill = <T as Sample>::from_f64(self.config.fill_value);
            let typed: Vec<T> = values.iter().map(|&v| <T as Sample>::from_f32(v)).collect();
            if typed.iter().all(|v| v.same(fill)) {
                None
            } else {
                let shape = array.chunk_shape(&chunk).map_err(|e| Error::decode(where_(), e))?;
                let bytes = (&typed[..]).into_array_bytes(array.data_type()).map_err(|e| Error::decode(where_(), e))?;
                let out = array
                    .codecs()
                    .encode(bytes, &shape, array.data_type(), array.fill_value(), &CodecOptions::default())
                    .map_err(|e| Error::decode(where_(), e))?;
                Some(out.into_owned())
            }
        });
        match encoded {
            None => match fs::remove_file(&file) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io(&file, e)),
            },
            Some(bytes) => {
                write_atomic(&file, &bytes, self.config.fsync)?;
                self.chunks_written.fetch_add(1, Ordering::Relaxed);
                self.bytes_written.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Reads back a box of `shape` voxels starting at `start` (array voxels of the first
    /// level) as currently written, pending data included (normalised); voxels outside the
    /// array or never written are the fill value.
    pub fn read_box(&self, start: [i64; 3], shape: [usize; 3]) -> Result<Vec<f32>> {
        let fill = self.config.fill_value as f32;
        let n: usize = shape.iter().product();
        let mut out = vec![fill; n];
        let array = self.shape();
        let lo: [u64; 3] = std::array::from_fn(|k| start[k].clamp(0, array[k] as i64) as u64);
        let hi: [u64; 3] = std::array::from_fn(|k| (start[k] + shape[k] as i64).clamp(0, array[k] as i64) as u64);
        if (0..3).any(|k| hi[k] <= lo[k]) {
            return Ok(out);
        }
        let cs: [u64; 3] = std::array::from_fn(|k| self.config.chunk_shape[k] as u64);
        for cz in chunk_range(lo[0], hi[0], cs[0]) {
            for cy in chunk_range(lo[1], hi[1], cs[1]) {
                for cx in chunk_range(lo[2], hi[2], cs[2]) {
                    let chunk = [cz, cy, cx];
                    let slot = lock(&self.chunks).get(&chunk).cloned();
                    let values = match slot.as_ref().map(|s| lock(s)) {
                        Some(state) => match &*state {
                            ChunkState::Pending(acc) => normalised(acc, fill),
                            ChunkState::Written => self.load_chunk(0, chunk)?,
                        },
                        None => self.load_chunk(0, chunk)?,
                    };
                    let (clo, chi) = self.chunk_box(0, chunk);
                    for z in lo[0].max(clo[0])..hi[0].min(chi[0]) {
                        for y in lo[1].max(clo[1])..hi[1].min(chi[1]) {
                            let x0 = lo[2].max(clo[2]);
                            let x1 = hi[2].min(chi[2]);
                            let src = (((z - clo[0]) * cs[1] + (y - clo[1])) * cs[2] + (x0 - clo[2])) as usize;
                            let dst = (((z as i64 - start[0]) as usize * shape[1] + (y as i64 - start[1]) as usize) * shape[2])
                                + (x0 as i64 - start[2]) as usize;
                            let len = (x1 - x0) as usize;
                            out[dst..dst + len].copy_from_slice(&values[src..src + len]);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Writes every pending chunk (in parallel). Chunks never written stay absent (fill value).
    pub fn flush(&self) -> Result<()> {
        let slots: Vec<([u64; 3], Arc<Mutex<ChunkState>>)> = lock(&self.chunks).iter().map(|(k, v)| (*k, v.clone())).collect();
        slots.par_iter().try_for_each(|(chunk, slot)| {
            let mut state = lock(slot);
            if let ChunkState::Pending(acc) = &mut *state {
                let values = finish(std::mem::replace(acc, empty_acc()), self.config.fill_value as f32);
                self.store_chunk(0, *chunk, &values)?;
                *state = ChunkState::Written;
            }
            Ok(())
        })
    }

    /// Flushes, computes the downsampled levels, and refuses further writes. Closing twice is
    /// a no-op.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.flush()?;
        for level in 1..self.levels.len() {
            self.downsample(level)?;
        }
        lock(&self.chunks).clear();
        Ok(())
    }

    /// Level `level` from level `level - 1` by averaging 2×2×2 (or 1×2×2 ...) blocks.
    fn downsample(&self, level: usize) -> Result<()> {
        let src = &self.levels[level - 1];
        let dst = &self.levels[level];
        let f: [u64; 3] = std::array::from_fn(|k| if src.shape[k] > 1 { 2 } else { 1 });
        let cs = self.config.chunk_shape;
        let grid: [u64; 3] = std::array::from_fn(|k| dst.shape[k].div_ceil(cs[k] as u64));
        let chunks: Vec<[u64; 3]> = (0..grid[0])
            .flat_map(|z| (0..grid[1]).flat_map(move |y| (0..grid[2]).map(move |x| [z, y, x])))
            .collect();
        let src_array = src.array.as_ref().expect("level array is open");
        let where_ = || src.name.clone();
        chunks.par_iter().try_for_each(|&chunk| {
            let (lo, hi) = self.chunk_box(level, chunk);
            let slo: [u64; 3] = std::array::from_fn(|k| lo[k] * f[k]);
            let shi: [u64; 3] = std::array::from_fn(|k| (hi[k] * f[k]).min(src.shape[k]));
            let sshape: [usize; 3] = std::array::from_fn(|k| (shi[k] - slo[k]) as usize);
            let subset = ArraySubset::new_with_ranges(&[slo[0]..shi[0], slo[1]..shi[1], slo[2]..shi[2]]);
            let source: Vec<f32> = with_sample!(self.config.dtype, T => {
                src_array
                    .retrieve_array_subset::<Vec<T>>(&subset)
                    .map_err(|e| Error::decode(self.config.path.join(where_()), e))?
                    .into_iter()
                    .map(Sample::to_f32)
                    .collect()
            });
            let n: usize = cs.iter().product();
            let mut values = vec![self.config.fill_value as f32; n];
            for z in lo[0]..hi[0] {
                for y in lo[1]..hi[1] {
                    for x in lo[2]..hi[2] {
                        let mut sum = 0.0f64;
                        let mut count = 0u32;
                        for dz in 0..f[0] {
                            for dy in 0..f[1] {
                                for dx in 0..f[2] {
                                    let (sz, sy, sx) = (z * f[0] + dz, y * f[1] + dy, x * f[2] + dx);
                                    if sz < shi[0] && sy < shi[1] && sx < shi[2] {
                                        let i = (((sz - slo[0]) as usize * sshape[1]) + (sy - slo[1]) as usize) * sshape[2]
                                            + (sx - slo[2]) as usize;
                                        sum += source[i] as f64;
                                        count += 1;
                                    }
                                }
                            }
                        }
                        let o = (((z - lo[0]) as usize * cs[1]) + (y - lo[1]) as usize) * cs[2] + (x - lo[2]) as usize;
                        values[o] = (sum / count.max(1) as f64) as f32;
                    }
                }
            }
            self.store_chunk(level, chunk, &values)
        })
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        // Best effort: a writer dropped without close() still writes what it holds.
        if !self.is_closed() {
            let _ = crate::runtime::install(|| self.close());
        }
    }
}

fn empty_acc() -> Acc {
    Acc {
        values: Vec::new(),
        weights: None,
        covered: None,
        remaining: 0,
    }
}

/// The chunk's final values: blended sums divided by their weights (fill where no weight).
fn finish(acc: Acc, fill: f32) -> Vec<f32> {
    match acc.weights {
        None => acc.values,
        Some(w) => acc
            .values
            .iter()
            .zip(&w)
            .map(|(&v, &w)| if w > 0.0 { v / w } else { fill })
            .collect(),
    }
}

fn normalised(acc: &Acc, fill: f32) -> Vec<f32> {
    match &acc.weights {
        None => acc.values.clone(),
        Some(w) => acc
            .values
            .iter()
            .zip(w)
            .map(|(&v, &w)| if w > 0.0 { v / w } else { fill })
            .collect(),
    }
}

/// Copies the part of `piece` inside the chunk `[lo, hi)` into `acc`; returns how many voxels
/// became covered for the first time (0 when coverage is not tracked).
fn copy_piece(
    acc: &mut Acc,
    lo: [u64; 3],
    hi: [u64; 3],
    chunk_shape: [usize; 3],
    piece: &Piece<'_>,
    weights: Option<&[Vec<f32>; 3]>,
) -> u64 {
    let r = piece.region;
    let a: [u64; 3] = std::array::from_fn(|k| r[k].0.max(lo[k]));
    let b: [u64; 3] = std::array::from_fn(|k| r[k].1.min(hi[k]));
    if (0..3).any(|k| b[k] <= a[k]) {
        return 0;
    }
    let mut newly = 0u64;
    let run = (b[2] - a[2]) as usize;
    let t = piece.shape;
    for z in a[0]..b[0] {
        let tz = (z as i64 - piece.start[0]) as usize;
        for y in a[1]..b[1] {
            let ty = (y as i64 - piece.start[1]) as usize;
            let tx0 = (a[2] as i64 - piece.start[2]) as usize;
            let src0 = (tz * t[1] + ty) * t[2] + tx0;
            let dst0 = (((z - lo[0]) as usize * chunk_shape[1]) + (y - lo[1]) as usize) * chunk_shape[2] + (a[2] - lo[2]) as usize;
            let src = &piece.data[src0..src0 + run];
            match (weights, acc.weights.as_mut()) {
                (Some(w), Some(acc_w)) => {
                    let wzy = w[0][tz] * w[1][ty];
                    let wx = &w[2][tx0..tx0 + run];
                    let dv = &mut acc.values[dst0..dst0 + run];
                    let dw = &mut acc_w[dst0..dst0 + run];
                    for i in 0..run {
                        let wi = wzy * wx[i];
                        dv[i] += src[i] * wi;
                        dw[i] += wi;
                    }
                }
                _ => match acc.weights.as_mut() {
                    // A free write into a blended chunk: weight 1.
                    Some(acc_w) => {
                        acc.values[dst0..dst0 + run].iter_mut().zip(src).for_each(|(d, s)| *d += *s);
                        acc_w[dst0..dst0 + run].iter_mut().for_each(|w| *w += 1.0);
                    }
                    None => acc.values[dst0..dst0 + run].copy_from_slice(src),
                },
            }
            if let Some(cov) = acc.covered.as_mut() {
                for c in &mut cov[dst0..dst0 + run] {
                    if !*c {
                        *c = true;
                        newly += 1;
                    }
                }
            }
        }
    }
    newly
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ChunkCache;
    use crate::geometry::tile_starts;
    use crate::volume::Volume;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "cellmap-writer-test-{}-{}-{name}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn config(path: PathBuf, lo: [f64; 3], hi: [f64; 3], voxel: [f64; 3], tile: [usize; 3]) -> WriterConfig {
        WriterConfig {
            path,
            name: None,
            voxel_size: voxel,
            bounds: WorldBox { lo, hi },
            write_shape: tile,
            chunk_shape: tile,
            dtype: DType::F32,
            fill_value: 0.0,
            format: ZarrFormat::V2,
            overwrite: false,
            first_level: 0,
            downsample_levels: 0,
            compression_level: 3,
            tiling: Some(TilingConfig {
                overlap: [0; 3],
                blend: Blend::Linear,
            }),
            protected: Vec::new(),
            fsync: false,
            frame: CoordinateFrame::Corner,
        }
    }

    /// f(world centre of the voxel)
    fn field(w: [f64; 3]) -> f32 {
        (w[0] * 0.5 + w[1] * 0.25 - w[2] * 0.125) as f32
    }

    fn tile_values(writer: &ImageWriter, index: usize) -> Vec<f32> {
        let plan = writer.plan().unwrap();
        let s = plan.tile_start(index);
        let t = plan.tile;
        let c = writer.config();
        let mut out = Vec::with_capacity(t.iter().product());
        for z in 0..t[0] {
            for y in 0..t[1] {
                for x in 0..t[2] {
                    let v = [z, y, x];
                    out.push(field(std::array::from_fn(|k| {
                        c.bounds.lo[k] + ((s[k] + v[k] as i64) as f64 + 0.5) * c.voxel_size[k]
                    })));
                }
            }
        }
        out
    }

    #[test]
    fn plan_starts_match_tile_starts_without_overlap() {
        for (extent, tile) in [(1000u64, 128usize), (257, 256), (400, 128), (8, 4), (10, 4)] {
            let a = plan_starts(extent, tile, 0);
            let b: Vec<i64> = tile_starts(extent as usize, tile).into_iter().map(|s| s as i64).collect();
            assert_eq!(a, b, "extent {extent} tile {tile}");
        }
        assert_eq!(plan_starts(100, 32, 8), vec![0, 24, 48, 68]);
        assert_eq!(plan_starts(3, 8, 0), vec![-2]);
    }

    #[test]
    fn linear_weights_are_a_partition_of_unity_in_the_overlap() {
        let (n, o) = (32usize, 8usize);
        let w = Blend::Linear.axis_weights(n, o);
        for i in 0..o {
            // tile A's voxel n-o+i overlaps tile B's voxel i
            assert!((w[n - o + i] + w[i] - 1.0).abs() < 1e-6);
        }
        assert!(w.iter().all(|&v| v > 0.0 && v <= 1.0));
        let g = Blend::Gaussian.axis_weights(n, o);
        assert!(g.iter().all(|&v| v > 0.0));
        assert!(g[n / 2] > g[0]);
    }

    #[test]
    fn plain_regions_partition_the_axis() {
        let plan = TilePlan::new([1, 10, 1000], [1, 4, 128], [0; 3], Blend::Linear).unwrap();
        for k in 0..3 {
            let mut next = 0;
            for &(lo, hi) in &plan.regions[k] {
                assert_eq!(lo, next);
                next = hi;
            }
            assert_eq!(next, [1, 10, 1000][k]);
        }
    }

    #[test]
    fn round_trip_exact_and_readable_by_the_engine() {
        let dir = temp_dir("roundtrip");
        let path = dir.join("out.zarr").join("pred").join("mito");
        // 37 x 70 x 45 voxels of (4, 4, 8) nm, not multiples of the (16, 32, 32) tile
        let lo = [100.0, -40.0, 8.0];
        let voxel = [4.0, 4.0, 8.0];
        let hi = [lo[0] + 37.0 * 4.0, lo[1] + 70.0 * 4.0, lo[2] + 45.0 * 8.0];
        let writer = ImageWriter::create(config(path.clone(), lo, hi, voxel, [16, 32, 32])).unwrap();
        assert_eq!(writer.shape(), [37, 70, 45]);
        let n = writer.plan().unwrap().len();
        // arrive in reverse, two at a time
        let order: Vec<usize> = (0..n).rev().collect();
        for pair in order.chunks(2) {
            let data: Vec<f32> = pair.iter().flat_map(|&i| tile_values(&writer, i)).collect();
            writer.write_tiles(pair, &data).unwrap();
        }
        assert_eq!(writer.stats().pending_chunks, 0, "every chunk completes without flush");
        writer.close().unwrap();
        assert!(path.parent().unwrap().join(".zgroup").is_file());
        assert!(dir.join("out.zarr").join(".zgroup").is_file());

        let volume = Volume::open(&path, ChunkCache::global()).unwrap();
        let level = &volume.levels[0];
        assert_eq!(level.shape, [37, 70, 45]);
        let b = level.world_box();
        for k in 0..3 {
            assert!((b.lo[k] - lo[k]).abs() < 1e-9 && (b.hi[k] - hi[k]).abs() < 1e-9);
        }
        let mut out = vec![0f32; 37 * 70 * 45];
        volume
            .gather(
                0,
                [0, 0, 0],
                [37, 70, 45],
                &mut out,
                0,
                [70 * 45, 45, 1],
                crate::volume::ValueMode::Raw,
                f32::NAN,
            )
            .unwrap();
        for z in 0..37 {
            for y in 0..70 {
                for x in 0..45 {
                    let v = [z, y, x];
                    let w = std::array::from_fn(|k| level.translation[k] + v[k] as f64 * level.voxel_size[k]);
                    assert_eq!(out[(z * 70 + y) * 45 + x], field(w), "voxel {v:?}");
                }
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn blended_constant_is_exact_and_pending_is_bounded() {
        let dir = temp_dir("blend");
        let path = dir.join("b.zarr").join("c");
        let mut c = config(path.clone(), [0.0; 3], [8.0, 200.0, 200.0], [8.0, 2.0, 2.0], [1, 32, 32]);
        c.tiling = Some(TilingConfig {
            overlap: [0, 8, 8],
            blend: Blend::Gaussian,
        });
        c.format = ZarrFormat::V3;
        let writer = ImageWriter::create(c).unwrap();
        let n = writer.plan().unwrap().len();
        for i in 0..n {
            writer.write_tiles(&[i], &vec![2.5f32; 32 * 32]).unwrap();
        }
        assert_eq!(writer.stats().pending_chunks, 0);
        let back = writer.read_box([0, 0, 0], [1, 100, 100]).unwrap();
        assert!(back.iter().all(|&v| (v - 2.5).abs() < 1e-5), "{:?}", &back[..4]);
        writer.close().unwrap();
        assert!(path.join("zarr.json").is_file());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn existing_output_needs_overwrite_and_input_is_protected() {
        let dir = temp_dir("exists");
        let path = dir.join("o.zarr").join("x");
        let c = config(path.clone(), [0.0; 3], [4.0; 3], [1.0; 3], [4, 4, 4]);
        ImageWriter::create(c.clone()).unwrap().close().unwrap();
        let e = ImageWriter::create(c.clone()).unwrap_err();
        assert!(
            matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
            "{e}"
        );
        assert!(e.to_string().contains("overwrite"));
        let mut o = c.clone();
        o.overwrite = true;
        ImageWriter::create(o).unwrap();
        let mut p = c;
        p.overwrite = true;
        p.protected = vec![dir.join("o.zarr")];
        let e = ImageWriter::create(p).unwrap_err();
        assert!(e.to_string().contains("input data"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn free_writes_complete_by_coverage_and_rewrite_after_flush() {
        let dir = temp_dir("free");
        let path = dir.join("f.zarr").join("x");
        let mut c = config(path.clone(), [0.0; 3], [4.0, 8.0, 8.0], [1.0; 3], [4, 4, 4]);
        c.tiling = None;
        let writer = ImageWriter::create(c).unwrap();
        writer.write_boxes(&[[0, 0, 0]], &vec![1.0; 64]).unwrap();
        assert_eq!(writer.stats().chunks_written, 1);
        writer.write_boxes(&[[0, 2, 2]], &vec![3.0; 64]).unwrap();
        let back = writer.read_box([0, 0, 0], [1, 8, 8]).unwrap();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[2 * 8 + 2], 3.0);
        assert_eq!(back[5 * 8 + 5], 3.0);
        assert_eq!(back[7 * 8 + 7], 0.0);
        writer.close().unwrap();
        assert!(writer.write_boxes(&[[0, 0, 0]], &vec![1.0; 64]).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn downsampled_level_is_the_block_mean() {
        let dir = temp_dir("down");
        let path = dir.join("d.zarr").join("x");
        let mut c = config(path.clone(), [0.0; 3], [4.0, 8.0, 8.0], [1.0; 3], [4, 8, 8]);
        c.downsample_levels = 1;
        let writer = ImageWriter::create(c).unwrap();
        let data: Vec<f32> = (0..256).map(|i| i as f32).collect();
        writer.write_tiles(&[0], &data).unwrap();
        writer.close().unwrap();
        let volume = Volume::open(&path, ChunkCache::global()).unwrap();
        assert_eq!(volume.levels.len(), 2);
        assert_eq!(volume.levels[1].shape, [2, 4, 4]);
        assert_eq!(volume.levels[1].voxel_size, [2.0; 3]);
        assert_eq!(volume.levels[1].translation, [1.0; 3]);
        let mut out = vec![0f32; 32];
        volume
            .gather(1, [0, 0, 0], [2, 4, 4], &mut out, 0, [16, 4, 1], crate::volume::ValueMode::Raw, 0.0)
            .unwrap();
        // block (0,0,0): z 0-1, y 0-1, x 0-1 of i = z*64 + y*8 + x
        let expect = [0, 1, 8, 9, 64, 65, 72, 73].iter().sum::<i32>() as f32 / 8.0;
        assert_eq!(out[0], expect);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn written_translation_follows_the_coordinate_frame() {
        use crate::ngff::CoordinateFrame;
        let dir = temp_dir("frame");
        for (frame, written) in [
            (CoordinateFrame::Corner, [8.0, -4.0, 2.0]),
            (CoordinateFrame::Centre, [10.0, -2.0, 4.0]),
        ] {
            let path = dir.join(format!("{}.zarr", frame.name())).join("x");
            let mut c = config(path.clone(), [8.0, -4.0, 2.0], [40.0, 28.0, 34.0], [4.0; 3], [8, 8, 8]);
            c.frame = frame;
            c.downsample_levels = 1;
            let writer = ImageWriter::create(c).unwrap();
            assert_eq!(writer.translation(), written);
            writer.close().unwrap();
            // Read back in the same frame, every level spans the bounds from `lo`.
            let volume = Volume::open_in_frame(&path, ChunkCache::global(), frame).unwrap();
            assert_eq!(volume.levels[0].origin, written);
            for level in &volume.levels {
                assert_eq!(
                    level.world_box().lo,
                    [8.0, -4.0, 2.0],
                    "{} level {:?}",
                    frame.name(),
                    level.voxel_size
                );
            }
            assert_eq!(volume.levels[0].world_box().hi, [40.0, 28.0, 34.0]);
            // Read in the other frame, the box moves by half a voxel of the level.
            let other = if frame == CoordinateFrame::Corner {
                CoordinateFrame::Centre
            } else {
                CoordinateFrame::Corner
            };
            let shifted = Volume::open_in_frame(&path, ChunkCache::global(), other).unwrap();
            let sign = if frame == CoordinateFrame::Corner { -1.0 } else { 1.0 };
            assert_eq!(
                shifted.levels[0].world_box().lo,
                [8.0 + sign * 2.0, -4.0 + sign * 2.0, 2.0 + sign * 2.0]
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_write_leaves_no_temporary() {
        let dir = temp_dir("atomic");
        let file = dir.join("a").join("0.0.0");
        write_atomic(&file, b"hello", false).unwrap();
        write_atomic(&file, b"world!", true).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"world!");
        let names: Vec<_> = fs::read_dir(dir.join("a")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
