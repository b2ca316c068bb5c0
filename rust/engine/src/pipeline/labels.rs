//! Label volumes: class semantics and class counts.
//!
//! # Class counts
//!
//! [`count_label_group`] / [`count_volume`] give the foreground and total voxel counts of one
//! label volume at a *training* voxel size, the numbers class weights are made of. Any non-zero
//! voxel is foreground (0/1 masks and instance ids alike). The counts are taken from the first
//! of these that has them:
//!
//! 1. the CellMap annotation metadata of the level chosen for the training voxel size
//!    (`cellmap.annotation.complement_counts = {"absent": a, "unknown": u}` in the array's
//!    attributes: foreground = size − a − u);
//! 2. the same metadata on the finest level (`s0`), scaled to the training resolution;
//! 3. the on-disk count cache (see [`CountCache`]), keyed by the chosen level's canonical
//!    path, its array-metadata file's modification time and the level;
//! 4. a scan of the chosen level, in parallel over its chunks, whose result is then cached.
//!
//! Counts at a level are scaled to training-resolution voxels by the voxel-volume ratio
//! `level voxel volume / training voxel volume`. The user's data is only ever read.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::zarr_node::read_attributes;
use crate::geometry::WorldBox;
use crate::io::location::Location;
use crate::source::cache::{with_chunk_values, Chunk, ChunkCache};
use crate::source::volume::Volume;

// ---------------------------------------------------------------------------------------------
// Class counts
// ---------------------------------------------------------------------------------------------

/// Largest class weight [`class_weight`] returns; a class annotated somewhere but never present
/// (no foreground) gets exactly this, so `pos_weight`-style losses stay finite.
pub const CLASS_WEIGHT_CAP: f64 = 1.0e4;

/// Decoded-chunk budget of the private cache a counting scan reads through (so a scan does not
/// evict the chunks training reads from the shared cache).
const SCAN_CACHE_BYTES: u64 = 64 << 20;

/// Background/foreground weight of a class with `foreground` of `total` voxels:
/// `(total − foreground) / foreground`, at most [`CLASS_WEIGHT_CAP`]; [`CLASS_WEIGHT_CAP`] when
/// the class has no foreground but some background; 1 when it has no voxels at all
/// (never annotated: its targets are all unknown, so the weight is irrelevant).
pub fn class_weight(foreground: f64, total: f64) -> f64 {
    let background = (total - foreground).max(0.0);
    if foreground > 0.0 {
        (background / foreground).min(CLASS_WEIGHT_CAP)
    } else if background > 0.0 {
        CLASS_WEIGHT_CAP
    } else {
        1.0
    }
}

/// Progress of a counting job, shared with whoever reports it (e.g. a progress bar polled
/// from Python) and a way to cancel it.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    cancelled: AtomicBool,
}

impl Progress {
    /// A fresh counter (nothing to do yet).
    pub fn new() -> Progress {
        Progress::default()
    }

    /// Units (chunks) finished.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Units (chunks) announced so far; grows as scans start.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Asks the job to stop; it then fails with [`Error::Interrupted`].
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether [`Progress::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn announce(&self, units: u64) {
        self.total.fetch_add(units, Ordering::Relaxed);
    }

    fn advance(&self, units: u64) {
        self.done.fetch_add(units, Ordering::Relaxed);
    }

    fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// Where a count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountSource {
    /// `complement_counts` of the level chosen for the training voxel size.
    Metadata,
    /// `complement_counts` of the finest level, scaled to the training resolution.
    MetadataFinest,
    /// The on-disk count cache.
    Cache,
    /// A scan of the level's chunks.
    Scan,
}

impl CountSource {
    /// Short lower-case name (`metadata`, `metadata_s0`, `cache`, `scan`).
    pub fn as_str(self) -> &'static str {
        match self {
            CountSource::Metadata => "metadata",
            CountSource::MetadataFinest => "metadata_s0",
            CountSource::Cache => "cache",
            CountSource::Scan => "scan",
        }
    }
}

/// Counts of one label volume at a training voxel size.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassCounts {
    /// The label (image) group.
    pub path: Location,
    /// Index of the level the counts were taken at.
    pub level: usize,
    /// Where that level's array is.
    pub level_path: Location,
    /// Voxel size (z, y, x) of that level, nm.
    pub voxel_size: [f64; 3],
    /// Shape (z, y, x) of that level, voxels.
    pub shape: [u64; 3],
    /// World box of that level, nm (voxel edges).
    pub world_box: WorldBox,
    /// Foreground voxels at that level.
    pub level_foreground: u64,
    /// Voxels marked unknown at that level (from metadata; 0 after a scan).
    pub level_unknown: u64,
    /// The training voxel size (z, y, x), nm.
    pub training_voxel_size: [f64; 3],
    /// Level voxel volume / training voxel volume.
    pub ratio: f64,
    /// Foreground voxels at the training resolution.
    pub foreground: f64,
    /// All voxels at the training resolution.
    pub total: f64,
    /// Where the level count came from.
    pub source: CountSource,
}

impl ClassCounts {
    /// `foreground / total` (0 for an empty volume).
    pub fn fraction(&self) -> f64 {
        if self.total > 0.0 {
            self.foreground / self.total
        } else {
            0.0
        }
    }

    /// [`class_weight`] of these counts.
    pub fn weight(&self) -> f64 {
        class_weight(self.foreground, self.total)
    }
}

/// Where computed counts are remembered between runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CountCache {
    /// Nothing is remembered.
    Disabled,
    /// One small JSON file per counted level in this folder.
    Dir(PathBuf),
}

impl CountCache {
    /// The default folder: `$CELLMAP_CACHE_DIR/counts` when that variable is set (it names the
    /// package's cache root), else `$XDG_CACHE_HOME/cellmap-data/counts`, else
    /// `~/.cache/cellmap-data/counts`; disabled when none of these can be found.
    pub fn default_location() -> CountCache {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(root) = var("CELLMAP_CACHE_DIR") {
            return CountCache::Dir(root.join("counts"));
        }
        if let Some(xdg) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
            return CountCache::Dir(xdg.join("cellmap-data").join("counts"));
        }
        match var("HOME") {
            Some(home) => CountCache::Dir(home.join(".cache").join("cellmap-data").join("counts")),
            None => CountCache::Disabled,
        }
    }

    /// `dir` when given, else [`CountCache::default_location`].
    pub fn resolve(dir: Option<PathBuf>) -> CountCache {
        match dir {
            Some(d) => CountCache::Dir(d),
            None => CountCache::default_location(),
        }
    }

    /// The folder, if enabled.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            CountCache::Disabled => None,
            CountCache::Dir(d) => Some(d),
        }
    }
}

/// How counts are obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountOptions {
    /// The on-disk cache of scanned counts.
    pub cache: CountCache,
    /// Whether `complement_counts` metadata may be used instead of scanning.
    pub use_metadata: bool,
}

impl Default for CountOptions {
    fn default() -> Self {
        CountOptions {
            cache: CountCache::default_location(),
            use_metadata: true,
        }
    }
}

/// Opens the label group at `path` (through a private, small chunk cache) and counts it at
/// `training_voxel_size`; see the module documentation for where counts come from.
pub fn count_label_group(
    path: impl Into<Location>,
    training_voxel_size: [f64; 3],
    options: &CountOptions,
    progress: Option<&Progress>,
) -> Result<ClassCounts> {
    let volume = Volume::open(path, Arc::new(ChunkCache::new(SCAN_CACHE_BYTES)))?;
    count_volume(&volume, training_voxel_size, options, progress)
}

/// Counts an opened label volume at `training_voxel_size` (reads through its cache).
pub fn count_volume(
    volume: &Volume,
    training_voxel_size: [f64; 3],
    options: &CountOptions,
    progress: Option<&Progress>,
) -> Result<ClassCounts> {
    if let Some(k) = (0..3).find(|&k| !(training_voxel_size[k].is_finite() && training_voxel_size[k] > 0.0)) {
        return Err(Error::invalid(format!(
            "training voxel size must be positive on every axis, got {training_voxel_size:?} (axis {k})"
        )));
    }
    if let Some(level) = volume.levels.iter().find(|l| l.dtype.is_float()) {
        return Err(Error::metadata(
            &level.path,
            "labels must be integer masks or instance ids, not floating point: cannot count foreground",
        ));
    }
    let chosen = volume.pick_level(training_voxel_size);
    let result = |level: usize, foreground: u64, unknown: u64, source: CountSource| {
        let lvl = &volume.levels[level];
        let ratio = voxel_volume(lvl.voxel_size) / voxel_volume(training_voxel_size);
        let size: u64 = lvl.shape.iter().product();
        ClassCounts {
            path: volume.path.clone(),
            level,
            level_path: lvl.path.clone(),
            voxel_size: lvl.voxel_size,
            shape: lvl.shape,
            world_box: lvl.world_box(),
            level_foreground: foreground,
            level_unknown: unknown,
            training_voxel_size,
            ratio,
            foreground: foreground as f64 * ratio,
            total: size as f64 * ratio,
            source,
        }
    };
    if options.use_metadata {
        if let Some((fg, unknown)) = metadata_counts(volume, chosen)? {
            return Ok(result(chosen, fg, unknown, CountSource::Metadata));
        }
        if chosen != 0 {
            if let Some((fg, unknown)) = metadata_counts(volume, 0)? {
                return Ok(result(0, fg, unknown, CountSource::MetadataFinest));
            }
        }
    }
    let key = CacheKey::of(volume, chosen);
    if let (Some(dir), Some(key)) = (options.cache.dir(), key.as_ref()) {
        if let Some(fg) = key.load(dir) {
            return Ok(result(chosen, fg, 0, CountSource::Cache));
        }
    }
    let fg = scan_level(volume, chosen, progress)?;
    if let (Some(dir), Some(key)) = (options.cache.dir(), key.as_ref()) {
        // Best effort: an unwritable cache only means counting again next time.
        let _ = key.store(dir, fg);
    }
    Ok(result(chosen, fg, 0, CountSource::Scan))
}

fn voxel_volume(v: [f64; 3]) -> f64 {
    v[0] * v[1] * v[2]
}

/// `cellmap.annotation.complement_counts` in a label array's attributes (other keys ignored).
#[derive(Debug, Deserialize)]
struct CellmapAttributesJson {
    #[serde(default)]
    cellmap: Option<CellmapJson>,
}

#[derive(Debug, Deserialize)]
struct CellmapJson {
    #[serde(default)]
    annotation: Option<AnnotationJson>,
}

#[derive(Debug, Deserialize)]
struct AnnotationJson {
    #[serde(default)]
    complement_counts: Option<ComplementCountsJson>,
}

/// Voxels that are not the class (`absent`) or not annotated (`unknown`); `null` counts as 0.
#[derive(Debug, Deserialize)]
struct ComplementCountsJson {
    #[serde(default)]
    absent: Option<f64>,
    #[serde(default)]
    unknown: Option<f64>,
}

/// Foreground and unknown voxels of `level` from its `cellmap.annotation.complement_counts`
/// attributes, or `None` when it has none (or they do not fit the array's size).
pub fn metadata_counts(volume: &Volume, level: usize) -> Result<Option<(u64, u64)>> {
    let lvl = &volume.levels[level];
    let attrs = match read_attributes(volume.store(), &volume.multiscale.levels[level].path) {
        Ok((_, attrs)) => attrs,
        Err(Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    // Counts that are missing, malformed or not whole numbers are ignored (the level is
    // counted instead), as are attributes without both keys absent.
    let Ok(parsed) = CellmapAttributesJson::deserialize(&attrs) else {
        return Ok(None);
    };
    let Some(counts) = parsed.cellmap.and_then(|c| c.annotation).and_then(|a| a.complement_counts) else {
        return Ok(None);
    };
    if counts.absent.is_none() && counts.unknown.is_none() {
        return Ok(None);
    }
    let whole = |v: Option<f64>| -> Option<u64> {
        match v {
            None => Some(0),
            Some(f) => (f >= 0.0 && f.fract() == 0.0 && f < 2f64.powi(63)).then_some(f as u64),
        }
    };
    let (Some(absent), Some(unknown)) = (whole(counts.absent), whole(counts.unknown)) else {
        return Ok(None);
    };
    let size: u64 = lvl.shape.iter().product();
    match absent.checked_add(unknown).filter(|&s| s <= size) {
        Some(complement) => Ok(Some((size - complement, unknown))),
        None => Ok(None),
    }
}

/// Number of non-zero voxels of `level`, counted in parallel over its chunks (run it inside a
/// rayon pool). `progress` learns the chunk count up front and each finished chunk.
pub fn scan_level(volume: &Volume, level: usize, progress: Option<&Progress>) -> Result<u64> {
    let lvl = &volume.levels[level];
    let grid: [u64; 3] = std::array::from_fn(|k| lvl.shape[k].div_ceil(lvl.chunk_shape[k]));
    let n_chunks = grid.iter().product::<u64>();
    if let Some(p) = progress {
        p.announce(n_chunks);
    }
    let index_of = |i: u64| [i / (grid[1] * grid[2]), (i / grid[2]) % grid[1], i % grid[2]];
    // A remote volume's chunks are requested a window at a time, all at once (a no-op locally).
    const WINDOW: u64 = 1024;
    let mut total = 0u64;
    for start in (0..n_chunks).step_by(WINDOW as usize) {
        let end = (start + WINDOW).min(n_chunks);
        volume.prefetch(level, (start..end).map(index_of));
        total += count_chunks(volume, level, start..end, &index_of, progress)?;
    }
    Ok(total)
}

fn count_chunks(
    volume: &Volume,
    level: usize,
    chunks: std::ops::Range<u64>,
    index_of: &(dyn Fn(u64) -> [u64; 3] + Sync),
    progress: Option<&Progress>,
) -> Result<u64> {
    let lvl = &volume.levels[level];
    chunks
        .into_par_iter()
        .map(|i| {
            if let Some(p) = progress {
                p.check()?;
            }
            let index = index_of(i);
            let chunk = volume.chunk(level, index)?;
            let origin: [u64; 3] = std::array::from_fn(|k| index[k] * lvl.chunk_shape[k]);
            // Edge chunks may be full-size buffers: count only the part inside the array.
            let valid: [usize; 3] = std::array::from_fn(|k| (chunk.shape[k] as u64).min(lvl.shape[k] - origin[k]) as usize);
            let n = count_nonzero_chunk(&chunk, valid);
            if let Some(p) = progress {
                p.advance(1);
            }
            Ok(n)
        })
        .try_reduce(|| 0, |a, b| Ok(a + b))
}

/// Non-zero elements in the `valid` corner (z, y, x) of a decoded chunk.
fn count_nonzero_chunk(chunk: &Chunk, valid: [usize; 3]) -> u64 {
    with_chunk_values!(&chunk.data, v => count_nonzero_block(v, chunk.shape, valid))
}

fn count_nonzero_block<T: Copy + Default + PartialEq>(data: &[T], shape: [usize; 3], valid: [usize; 3]) -> u64 {
    let zero = T::default();
    let count = |s: &[T]| s.iter().fold(0usize, |n, v| n + usize::from(*v != zero)) as u64;
    if valid == shape {
        return count(&data[..shape.iter().product::<usize>()]);
    }
    let mut n = 0;
    for z in 0..valid[0] {
        for y in 0..valid[1] {
            let start = (z * shape[1] + y) * shape[2];
            n += count(&data[start..start + valid[2]]);
        }
    }
    n
}

/// Identity of a counted level: its array's canonical path, the modification time and size of
/// its array metadata file (`zarr.json` / `.zarray`), the level index and the shape. A rewritten
/// array gets a new metadata mtime, which invalidates the entry.
#[derive(Debug, Clone, PartialEq)]
struct CacheKey {
    array: String,
    metadata_mtime_ns: u128,
    metadata_len: u64,
    level: usize,
    shape: [u64; 3],
}

const CACHE_FORMAT: u64 = 1;

/// One cached count as stored on disk (the mtime as a string: JSON numbers lose u128 digits).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct CacheEntryJson {
    format: u64,
    array: String,
    metadata_mtime_ns: String,
    metadata_len: u64,
    level: usize,
    shape: [u64; 3],
    foreground: u64,
}

impl CacheKey {
    fn of(volume: &Volume, level: usize) -> Option<CacheKey> {
        let lvl = &volume.levels[level];
        let canonical = std::fs::canonicalize(lvl.path.local()?).ok()?;
        let meta_file = ["zarr.json", ".zarray"].iter().map(|f| canonical.join(f)).find(|p| p.is_file())?;
        let meta = std::fs::metadata(&meta_file).ok()?;
        let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_nanos();
        Some(CacheKey {
            array: canonical.to_string_lossy().into_owned(),
            metadata_mtime_ns: mtime,
            metadata_len: meta.len(),
            level,
            shape: lvl.shape,
        })
    }

    fn file_name(&self) -> String {
        // FNV-1a over the array path and level: one file per level; the rest is checked on load.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.array.bytes().chain(self.level.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}.json")
    }

    fn entry(&self, foreground: u64) -> CacheEntryJson {
        CacheEntryJson {
            format: CACHE_FORMAT,
            array: self.array.clone(),
            metadata_mtime_ns: self.metadata_mtime_ns.to_string(),
            metadata_len: self.metadata_len,
            level: self.level,
            shape: self.shape,
            foreground,
        }
    }

    fn load(&self, dir: &Path) -> Option<u64> {
        let text = std::fs::read_to_string(dir.join(self.file_name())).ok()?;
        let stored: CacheEntryJson = serde_json::from_str(&text).ok()?;
        (stored == self.entry(stored.foreground)).then_some(stored.foreground)
    }

    fn store(&self, dir: &Path, foreground: u64) -> std::io::Result<()> {
        let text = serde_json::to_string(&self.entry(foreground)).map_err(std::io::Error::other)?;
        crate::io::atomic::write_atomic(&dir.join(self.file_name()), text.as_bytes(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::fs;

    /// Writes a zarr v2 / OME-NGFF 0.4 label image (uncompressed chunks, written by hand) with
    /// levels `(data, shape, voxel size)`. Edge chunks are full-size with non-zero padding
    /// outside the array, which a correct count must ignore.
    fn write_image(dir: &Path, levels: &[(Vec<u8>, [u64; 3], f64)], chunk: [u64; 3]) {
        fs::create_dir_all(dir).unwrap();
        let datasets: Vec<Value> = levels
            .iter()
            .enumerate()
            .map(|(i, (_, _, vs))| {
                json!({"path": format!("s{i}"), "coordinateTransformations": [
                    {"type": "scale", "scale": [vs, vs, vs]}, {"type": "translation", "translation": [0.0, 0.0, 0.0]}]})
            })
            .collect();
        fs::write(dir.join(".zgroup"), r#"{"zarr_format": 2}"#).unwrap();
        let attrs = json!({"multiscales": [{"version": "0.4",
            "axes": [{"name": "z", "type": "space"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": datasets}]});
        fs::write(dir.join(".zattrs"), attrs.to_string()).unwrap();
        for (i, (data, shape, _)) in levels.iter().enumerate() {
            let adir = dir.join(format!("s{i}"));
            fs::create_dir_all(&adir).unwrap();
            let meta = json!({"zarr_format": 2, "shape": shape, "chunks": chunk, "dtype": "|u1",
                "compressor": null, "fill_value": 0, "order": "C", "filters": null});
            fs::write(adir.join(".zarray"), meta.to_string()).unwrap();
            let grid: Vec<u64> = (0..3).map(|k| shape[k].div_ceil(chunk[k])).collect();
            for cz in 0..grid[0] {
                for cy in 0..grid[1] {
                    for cx in 0..grid[2] {
                        let mut bytes = Vec::new();
                        for z in cz * chunk[0]..(cz + 1) * chunk[0] {
                            for y in cy * chunk[1]..(cy + 1) * chunk[1] {
                                for x in cx * chunk[2]..(cx + 1) * chunk[2] {
                                    let inside = z < shape[0] && y < shape[1] && x < shape[2];
                                    let v = if inside {
                                        data[((z * shape[1] + y) * shape[2] + x) as usize]
                                    } else {
                                        9
                                    };
                                    bytes.push(v);
                                }
                            }
                        }
                        fs::write(adir.join(format!("{cz}.{cy}.{cx}")), bytes).unwrap();
                    }
                }
            }
        }
    }

    fn set_complement_counts(array_dir: &Path, absent: u64, unknown: u64) {
        let attrs = json!({"cellmap": {"annotation": {"complement_counts": {"absent": absent, "unknown": unknown}}}});
        fs::write(array_dir.join(".zattrs"), attrs.to_string()).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cellmap-labels-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn pattern(shape: [u64; 3]) -> Vec<u8> {
        let n = shape.iter().product::<u64>() as usize;
        (0..n).map(|i| if (i * 7) % 5 == 0 { (i % 3) as u8 + 1 } else { 0 }).collect()
    }

    fn no_cache() -> CountOptions {
        CountOptions {
            cache: CountCache::Disabled,
            use_metadata: true,
        }
    }

    #[test]
    fn weights_are_finite_and_capped() {
        assert_eq!(class_weight(10.0, 100.0), 9.0);
        assert_eq!(class_weight(0.0, 100.0), CLASS_WEIGHT_CAP);
        assert_eq!(class_weight(1.0, 1e9), CLASS_WEIGHT_CAP);
        assert_eq!(class_weight(0.0, 0.0), 1.0);
        assert_eq!(class_weight(5.0, 5.0), 0.0);
    }

    #[test]
    fn scan_counts_nonzero_with_partial_edge_chunks() {
        let dir = temp_dir("scan");
        let shape = [13, 10, 17];
        let data = pattern(shape);
        let expected = data.iter().filter(|v| **v != 0).count() as u64;
        write_image(&dir, &[(data, shape, 4.0)], [8, 8, 8]);
        let progress = Progress::new();
        let c = count_label_group(&dir, [4.0; 3], &no_cache(), Some(&progress)).unwrap();
        assert_eq!(c.source, CountSource::Scan);
        assert_eq!(c.level_foreground, expected);
        assert_eq!(c.foreground, expected as f64);
        assert_eq!(c.total, (13 * 10 * 17) as f64);
        assert_eq!((progress.done(), progress.total()), (12, 12));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn counts_at_chosen_level_scaled_to_training_resolution() {
        let dir = temp_dir("levels");
        let s0 = [16, 16, 16];
        let s1 = [8, 8, 8];
        let d1 = pattern(s1);
        let fg1 = d1.iter().filter(|v| **v != 0).count() as f64;
        write_image(&dir, &[(pattern(s0), s0, 4.0), (d1, s1, 8.0)], [8, 8, 8]);
        // Training at 8 nm picks s1; at 16 nm, s1 is still closest and each 8 nm voxel is 1/8.
        let c = count_label_group(&dir, [8.0; 3], &no_cache(), None).unwrap();
        assert_eq!((c.level, c.foreground, c.total), (1, fg1, 512.0));
        let c = count_label_group(&dir, [16.0; 3], &no_cache(), None).unwrap();
        assert_eq!((c.level, c.ratio), (1, 0.125));
        assert_eq!((c.foreground, c.total), (fg1 / 8.0, 64.0));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metadata_counts_win_and_fall_back_to_finest_level() {
        let dir = temp_dir("meta");
        let s0 = [16, 16, 16];
        let s1 = [8, 8, 8];
        write_image(&dir, &[(pattern(s0), s0, 4.0), (pattern(s1), s1, 8.0)], [8, 8, 8]);
        set_complement_counts(&dir.join("s0"), 4000, 10);
        let c = count_label_group(&dir, [8.0; 3], &no_cache(), None).unwrap();
        assert_eq!(c.source, CountSource::MetadataFinest);
        assert_eq!((c.level, c.level_foreground, c.level_unknown), (0, 4096 - 4010, 10));
        assert_eq!(c.foreground, 86.0 / 8.0);
        set_complement_counts(&dir.join("s1"), 500, 0);
        let c = count_label_group(&dir, [8.0; 3], &no_cache(), None).unwrap();
        assert_eq!((c.source, c.level, c.foreground), (CountSource::Metadata, 1, 12.0));
        let scan = CountOptions {
            cache: CountCache::Disabled,
            use_metadata: false,
        };
        assert_eq!(count_label_group(&dir, [8.0; 3], &scan, None).unwrap().source, CountSource::Scan);
        // Counts that cannot fit the array are ignored.
        set_complement_counts(&dir.join("s1"), 600, 0);
        assert_eq!(
            count_label_group(&dir, [8.0; 3], &no_cache(), None).unwrap().source,
            CountSource::MetadataFinest
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cache_hits_and_invalidates_on_metadata_change() {
        let dir = temp_dir("cache-data");
        let cache_dir = temp_dir("cache-dir");
        let shape = [9, 9, 9];
        let data = pattern(shape);
        let expected = data.iter().filter(|v| **v != 0).count() as u64;
        write_image(&dir, &[(data, shape, 4.0)], [4, 4, 4]);
        let options = CountOptions {
            cache: CountCache::Dir(cache_dir.clone()),
            use_metadata: true,
        };
        assert_eq!(count_label_group(&dir, [4.0; 3], &options, None).unwrap().source, CountSource::Scan);
        let c = count_label_group(&dir, [4.0; 3], &options, None).unwrap();
        assert_eq!((c.source, c.level_foreground), (CountSource::Cache, expected));
        // Rewriting the array metadata (new mtime) invalidates the entry.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let meta = dir.join("s0").join(".zarray");
        fs::write(&meta, fs::read(&meta).unwrap()).unwrap();
        assert_eq!(count_label_group(&dir, [4.0; 3], &options, None).unwrap().source, CountSource::Scan);
        assert_eq!(fs::read_dir(&cache_dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&cache_dir).unwrap();
    }

    #[test]
    fn cancelled_scan_is_interrupted() {
        let dir = temp_dir("cancel");
        let shape = [8, 8, 8];
        write_image(&dir, &[(pattern(shape), shape, 4.0)], [4, 4, 4]);
        let progress = Progress::new();
        progress.cancel();
        let e = count_label_group(&dir, [4.0; 3], &no_cache(), Some(&progress)).unwrap_err();
        assert!(matches!(e, Error::Interrupted));
        fs::remove_dir_all(&dir).unwrap();
    }
}
