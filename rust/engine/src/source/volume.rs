//! One multiscale image (raw EM or one label class): every level opened with zarrs, the level
//! choice for a requested voxel size, world boxes, and region reads through the chunk cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;
use zarrs::array::{Array, ArrayBytes, ArrayToBytesCodecTraits, CodecChain, CodecOptions, FromArrayBytes};

use crate::format::decode_guard::DecodeGuard;
use crate::io::location::Location;
use crate::io::store::{storage_read_error, store_io_error, Store};
use zarrs::storage::ReadableStorageTraits;

use crate::error::{Error, Result};
use crate::format::dtype::DType;
use crate::format::ngff::{CoordinateFrame, Multiscale};
use crate::format::zarr_node::read_multiscale;
use crate::geometry::{WorldBox, AXES, MAX_VOXEL_COORDINATE};
use crate::source::cache::{with_chunk_values, Chunk, ChunkCache, ChunkData, ChunkKey};
use crate::source::shards::ShardedReads;

/// How stored values become output values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueMode {
    /// The stored value, as float32.
    Raw,
    /// 1 where the stored value is non-zero (mask or instance id), else 0.
    Foreground,
}

/// One opened resolution level.
pub struct Level {
    /// Cache identity of this level.
    pub id: u64,
    /// Where the level's array is (for messages and the count cache).
    pub path: Location,
    array: Array<dyn ReadableStorageTraits>,
    /// What the encoded chunks are checked for before decoding (decompression bombs).
    guard: DecodeGuard,
    /// Sharded levels: inner chunks read as byte ranges of their shard.
    sharded: Option<ShardedReads>,
    /// The store the array reads from (inner chunks are read from it directly).
    storage: Arc<dyn ReadableStorageTraits>,
    /// Number of leading non-spatial axes (each of size 1).
    leading: usize,
    /// Spatial shape (z, y, x) in voxels.
    pub shape: [u64; 3],
    /// Shape (z, y, x) of the unit read, decoded and cached: the chunk, or a sharded array's
    /// inner chunk.
    pub chunk_shape: [u64; 3],
    /// Voxel size (z, y, x) in world units (nm).
    pub voxel_size: [f64; 3],
    /// World coordinate of the centre of voxel 0 (z, y, x), in the frame the volume was opened
    /// with (see [`CoordinateFrame`]).
    pub translation: [f64; 3],
    /// The translation as written in the metadata (z, y, x).
    pub origin: [f64; 3],
    /// Element type.
    pub dtype: DType,
}

impl Level {
    /// World box covered by the level's voxels (voxel edges, not centres).
    pub fn world_box(&self) -> WorldBox {
        let mut b = WorldBox {
            lo: [0.0; 3],
            hi: [0.0; 3],
        };
        for k in 0..3 {
            b.lo[k] = self.translation[k] - self.voxel_size[k] / 2.0;
            b.hi[k] = b.lo[k] + self.shape[k] as f64 * self.voxel_size[k];
        }
        b
    }

    /// Continuous voxel index of a world coordinate (voxel centres at integers).
    pub fn world_to_voxel(&self, world: [f64; 3]) -> [f64; 3] {
        std::array::from_fn(|k| (world[k] - self.translation[k]) / self.voxel_size[k])
    }

    pub(crate) fn decode_chunk(&self, index: [u64; 3]) -> Result<Chunk> {
        let mut full_index = vec![0u64; self.leading];
        full_index.extend_from_slice(&index);
        let where_ = || format!("{} chunk {:?}", self.path, index);
        crate::io::faults::check(self.path.as_ref()).map_err(|e| e.with_context(format!("chunk {index:?}")))?;
        let (chunk_shape, encoded) = match &self.sharded {
            // An inner chunk: its byte range from the shard's index, then those bytes only.
            Some(sharded) => (
                sharded.inner_shape.clone(),
                sharded.read_encoded(&self.array, self.storage.as_ref(), &full_index)?,
            ),
            None => {
                let shape = self.array.chunk_shape(&full_index).map_err(|e| Error::decode(where_(), e))?;
                let encoded = self
                    .array
                    .retrieve_encoded_chunk(&full_index)
                    .map_err(|e| storage_read_error(where_(), e))?;
                (shape.to_vec(), encoded.map(|b| b.to_vec()))
            }
        };
        let shape_u64: Vec<u64> = chunk_shape.iter().map(|s| s.get()).collect();
        let spatial: [usize; 3] = std::array::from_fn(|k| shape_u64[self.leading + k] as usize);
        let elements: u64 = shape_u64.iter().product();
        let bytes = match encoded {
            Some(bytes) => {
                self.guard
                    .check(&bytes, elements * self.dtype.size() as u64)
                    .map_err(|m| Error::decode(where_(), m))?;
                let codecs = self.array.codecs();
                let codecs: &CodecChain = match &self.sharded {
                    Some(sharded) => &sharded.inner_codecs,
                    None => &codecs,
                };
                codecs
                    .decode(
                        std::borrow::Cow::Owned(bytes),
                        &chunk_shape,
                        self.array.data_type(),
                        self.array.fill_value(),
                        // One thread per chunk: chunks are decoded in parallel by the callers,
                        // and a decode runs while a cache holds the chunk's (or crop's) key, where
                        // a rayon task stolen inside the codec could wait for that same key.
                        &CodecOptions::default().with_concurrent_target(1),
                    )
                    .map_err(|e| Error::decode(where_(), e))?
                    .into_owned()
            }
            // Absent: the fill value, without asking the store again.
            None => ArrayBytes::new_fill_value(self.array.data_type(), elements, self.array.fill_value())
                .map_err(|e| Error::decode(where_(), e))?,
        };
        macro_rules! get {
            ($t:ty, $variant:ident) => {
                ChunkData::$variant(
                    <Vec<$t> as FromArrayBytes>::from_array_bytes(bytes, &shape_u64, self.array.data_type())
                        .map_err(|e| Error::decode(where_(), e))?,
                )
            };
        }
        let data = match self.dtype {
            DType::U8 => get!(u8, U8),
            DType::U16 => get!(u16, U16),
            DType::U32 => get!(u32, U32),
            DType::U64 => get!(u64, U64),
            DType::I8 => get!(i8, I8),
            DType::I16 => get!(i16, I16),
            DType::I32 => get!(i32, I32),
            DType::I64 => get!(i64, I64),
            DType::F32 => get!(f32, F32),
            DType::F64 => get!(f64, F64),
        };
        // Leading axes have size 1, so the spatial block is the whole chunk.
        Ok(Chunk { data, shape: spatial })
    }
}

/// Largest decoded chunk the engine reads (chunks are decoded whole, and an absent chunk is a
/// whole chunk of the fill value): 256 MiB, far above EM chunk sizes (256³ float32 is 64 MiB).
pub const MAX_CHUNK_BYTES: u64 = 256 << 20;

/// Remote sharded levels whose shards decode to at most this are read a whole shard at a time
/// (one request, no index request); larger shards by inner chunk.
pub const WHOLE_REMOTE_SHARD_BYTES: u64 = 16 << 20;

/// Decoded bytes of a block of `extent` voxels of `dtype` (saturating: a block beyond any
/// memory is `u64::MAX`).
fn decoded_bytes(extent: &[u64], dtype: DType) -> u64 {
    extent
        .iter()
        .try_fold(dtype.size() as u64, |n, &c| n.checked_mul(c))
        .unwrap_or(u64::MAX)
}

/// Largest decoded chunk of an array smaller than that: 64 MiB.
const SMALL_ARRAY_CHUNK_BYTES: u64 = 64 << 20;

/// Rejects a level whose chunks could not be held in memory or whose world box, in its own
/// voxels, is beyond what the sampling arithmetic represents (metadata written in error).
fn check_level_geometry(
    path: &Location,
    shape: [u64; 3],
    chunk: [u64; 3],
    dtype: DType,
    voxel_size: [f64; 3],
    origin: [f64; 3],
) -> Result<()> {
    let chunk_bytes = decoded_bytes(&chunk, dtype);
    // A chunk far larger than its whole array is bad metadata, and would still be allocated
    // whole (an absent chunk is a full chunk of the fill value).
    let array_bytes = decoded_bytes(&shape, dtype);
    let limit = MAX_CHUNK_BYTES.min(array_bytes.max(SMALL_ARRAY_CHUNK_BYTES));
    if chunk_bytes > limit {
        return Err(Error::metadata(
            path,
            format!(
                "chunk shape {chunk:?} decodes to {chunk_bytes} bytes; chunks are read whole and may hold at most {limit} bytes here (256 MiB, and 64 MiB for an array of {array_bytes} bytes)"
            ),
        ));
    }
    for (k, axis) in AXES.iter().enumerate() {
        let far = (origin[k] / voxel_size[k]).abs() + shape[k] as f64;
        if !(far.is_finite() && far < MAX_VOXEL_COORDINATE) {
            return Err(Error::metadata(
                path,
                format!(
                    "translation {} / voxel size {} on axis '{axis}' puts the level {far:e} voxels from the origin; at most {MAX_VOXEL_COORDINATE:e} are supported",
                    origin[k], voxel_size[k]
                ),
            ));
        }
    }
    Ok(())
}

static NEXT_LEVEL_ID: AtomicU64 = AtomicU64::new(1);

/// A multiscale image with all its levels open.
pub struct Volume {
    /// The image group's location.
    pub path: Location,
    /// Its parsed metadata.
    pub multiscale: Multiscale,
    /// Levels in metadata order (finest first in CellMap data).
    pub levels: Vec<Level>,
    cache: Arc<ChunkCache>,
    /// Where the volume is read from (one store for its metadata and every level).
    store: Store,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("path", &self.path)
            .field("levels", &self.levels.len())
            .finish()
    }
}

fn data_type_of(array: &Array<dyn ReadableStorageTraits>, path: &Location) -> Result<DType> {
    let dt = array.data_type();
    DType::from_zarrs(dt).ok_or_else(|| {
        Error::metadata(
            path,
            format!("unsupported data type {dt} (expected an integer or float32/float64 array)"),
        )
    })
}

impl Volume {
    /// Opens the image group at `path` and every level its multiscales metadata lists, reading
    /// translations in the process-wide [`CoordinateFrame`].
    pub fn open(location: impl Into<Location>, cache: Arc<ChunkCache>) -> Result<Volume> {
        Self::open_in_frame(location, cache, CoordinateFrame::current())
    }

    /// Like [`Volume::open`], reading translations in `frame`.
    pub fn open_in_frame(location: impl Into<Location>, cache: Arc<ChunkCache>, frame: CoordinateFrame) -> Result<Volume> {
        let store = Store::open(&location.into())?;
        // A volume is named by its path, or by its URL (no trailing slash).
        let path = store.location().clone();
        let remote = store.remote().cloned();
        if let Some(local) = path.local().filter(|p| !p.exists()) {
            return Err(Error::not_found(local));
        }
        let multiscale = read_multiscale(&store, "")?;
        let spatial: Vec<usize> = (0..multiscale.axes.len()).filter(|&i| multiscale.axes[i].is_spatial()).collect();
        let names: Vec<&str> = spatial.iter().map(|&i| multiscale.axes[i].name.as_str()).collect();
        if names != ["z", "y", "x"] {
            return Err(Error::metadata(
                &path,
                format!("expected spatial axes z, y, x (in that order) but the metadata has {names:?}"),
            ));
        }
        let leading = multiscale.axes.len() - 3;
        if spatial != [leading, leading + 1, leading + 2] {
            return Err(Error::metadata(&path, "non-spatial axes must come before the spatial axes"));
        }
        // Every level's metadata (v3 or v2 names) requested at once: one round trip, not one
        // per document.
        let names = ["zarr.json", ".zarray", ".zattrs"];
        store.prefetch(
            multiscale
                .levels
                .iter()
                .flat_map(|m| names.iter().map(move |n| format!("{}/{n}", m.path.trim_matches('/')))),
        );
        let mut levels = Vec::with_capacity(multiscale.levels.len());
        for meta in &multiscale.levels {
            let level_path = path.join(&meta.path);
            let missing = || {
                Error::not_found_because(
                    &level_path,
                    format!("listed as level '{}' in the multiscales metadata of {path}", meta.path),
                )
            };
            if level_path.local().is_some_and(|p| !p.exists()) {
                return Err(missing());
            }
            let key = format!("/{}", meta.path.trim_matches('/'));
            let array = Array::open(store.storage(), &key).map_err(|e| match e {
                zarrs::array::ArrayCreateError::MissingMetadata => missing(),
                // An unreadable .zarray/zarr.json keeps its I/O kind (permission denied...).
                zarrs::array::ArrayCreateError::StorageError(zarrs::storage::StorageError::IOError(io)) => store_io_error(&level_path, &io),
                other => Error::metadata(&level_path, other),
            })?;
            let full_shape = array.shape().to_vec();
            if full_shape.len() != multiscale.axes.len() {
                return Err(Error::metadata(
                    &level_path,
                    format!(
                        "array has {} dimensions but the multiscales metadata has {} axes",
                        full_shape.len(),
                        multiscale.axes.len()
                    ),
                ));
            }
            if let Some(k) = (0..leading).find(|&k| full_shape[k] != 1) {
                return Err(Error::metadata(
                    &level_path,
                    format!(
                        "non-spatial axis '{}' has size {}; only size 1 is supported",
                        multiscale.axes[k].name, full_shape[k]
                    ),
                ));
            }
            // A sharded level is read by inner chunk, except a remote one whose shards are small:
            // one request for a whole shard then costs about what the index request alone would.
            let dtype = data_type_of(&array, &level_path)?;
            let outer: Vec<u64> = array
                .chunk_shape(&vec![0; full_shape.len()])
                .map_err(|e| Error::metadata(&level_path, e))?
                .iter()
                .map(|c| c.get())
                .collect();
            let whole_shards = remote.is_some() && decoded_bytes(&outer, dtype) <= WHOLE_REMOTE_SHARD_BYTES;
            let sharded = if whole_shards {
                None
            } else {
                ShardedReads::of(&array, &path, &level_path)?
            };
            let chunk0: Vec<u64> = match &sharded {
                Some(reads) => reads.inner_shape.iter().map(|c| c.get()).collect(),
                None => outer,
            };
            let s = |v: &[f64]| [v[leading], v[leading + 1], v[leading + 2]];
            let voxel_size = s(&meta.scale);
            let origin = s(&meta.translation);
            let spatial_shape = [full_shape[leading], full_shape[leading + 1], full_shape[leading + 2]];
            let spatial_chunk = [chunk0[leading], chunk0[leading + 1], chunk0[leading + 2]];
            check_level_geometry(&level_path, spatial_shape, spatial_chunk, dtype, voxel_size, origin)?;
            levels.push(Level {
                id: NEXT_LEVEL_ID.fetch_add(1, Ordering::Relaxed),
                path: level_path,
                leading,
                shape: spatial_shape,
                chunk_shape: spatial_chunk,
                voxel_size,
                translation: std::array::from_fn(|k| origin[k] + frame.centre_offset(voxel_size[k])),
                origin,
                dtype,
                guard: match &sharded {
                    Some(reads) => DecodeGuard::of_chain(&reads.inner_codecs),
                    None => DecodeGuard::of(&array),
                },
                sharded,
                storage: store.storage(),
                array,
            });
        }
        Ok(Volume {
            path,
            multiscale,
            levels,
            cache,
            store,
        })
    }

    /// The level closest to `voxel_size` (sum of per-axis relative differences); the finer
    /// level wins a tie.
    pub fn pick_level(&self, voxel_size: [f64; 3]) -> usize {
        let mut best = (f64::INFINITY, f64::INFINITY, 0usize);
        for (i, level) in self.levels.iter().enumerate() {
            let distance: f64 = (0..3).map(|k| (level.voxel_size[k] - voxel_size[k]).abs() / voxel_size[k]).sum();
            let volume: f64 = level.voxel_size.iter().product();
            let better = distance < best.0 - 1e-9 || ((distance - best.0).abs() <= 1e-9 && volume < best.1);
            if better {
                best = (distance, volume, i);
            }
        }
        best.2
    }

    /// The cache this volume reads through.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// The store the volume is read from.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the volume's reads are requests worth starting ahead of their use (it is read
    /// from an object store, where latency, not decoding, bounds a read).
    pub fn reads_ahead(&self) -> bool {
        self.store.remote().is_some()
    }

    /// Starts the requests for the chunks `indices` of `level` that are neither decoded in
    /// the cache nor already requested (remote volumes; a no-op for local ones).
    pub fn prefetch(&self, level: usize, indices: impl IntoIterator<Item = [u64; 3]>) {
        let Some(remote) = self.store.remote() else { return };
        let lvl = &self.levels[level];
        let wanted = indices
            .into_iter()
            .filter(|&index| !self.cache.contains(&ChunkKey { level_id: lvl.id, index }))
            .map(|index| {
                let mut full = vec![0u64; lvl.leading];
                full.extend_from_slice(&index);
                full
            });
        let Some(sharded) = &lvl.sharded else {
            remote.prefetch(wanted.map(|full| lvl.array.chunk_key(&full).as_str().to_string()));
            return;
        };
        // Inner chunks grouped by shard: each shard's ranges go out together (coalesced). The
        // index of a shard not seen before is read here, once; an error is left for the read.
        let mut by_shard: std::collections::BTreeMap<String, Vec<std::ops::Range<u64>>> = Default::default();
        for full in wanted {
            if let Ok(Some((key, range))) = sharded.locate(&lvl.array, lvl.storage.as_ref(), &full) {
                by_shard.entry(key.as_str().to_string()).or_default().push(range);
            }
        }
        for (key, ranges) in by_shard {
            remote.prefetch_ranges(&key, ranges);
        }
    }

    /// Decoded chunk `index` of `level`, through the cache.
    pub fn chunk(&self, level: usize, index: [u64; 3]) -> Result<Arc<Chunk>> {
        let lvl = &self.levels[level];
        self.cache
            .get_or_decode(ChunkKey { level_id: lvl.id, index }, || lvl.decode_chunk(index))
    }

    /// Writes the voxels of region `[start, start + shape)` of `level` (voxel indices, may
    /// extend outside the array) into `out` as float32: voxel `(z, y, x)` of the region goes to
    /// `out[base + z*strides[0] + y*strides[1] + x*strides[2]]`. Voxels outside the array get
    /// `pad_value`. Strides may be negative or permuted, which is how mirrored and transposed
    /// patches are copied without an intermediate buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn gather<O: OutputElement>(
        &self,
        level: usize,
        start: [i64; 3],
        shape: [usize; 3],
        out: &mut [O],
        base: isize,
        strides: [isize; 3],
        mode: ValueMode,
        pad_value: O,
    ) -> Result<()> {
        // The output is a batch buffer this thread does not read again: streamed past the cache.
        self.gather_region(level, start, shape, out, base, strides, None, mode, pad_value, true)
    }

    /// Like [`Volume::gather`] into a C-order block of `shape`, but only the voxels of each
    /// row's span: `spans[z * shape[1] + y]` is the x range `[lo, hi)` of row `(z, y)` (region
    /// coordinates). Voxels outside the spans are left as they were.
    #[allow(clippy::too_many_arguments)]
    pub fn gather_spans<O: OutputElement>(
        &self,
        level: usize,
        start: [i64; 3],
        shape: [usize; 3],
        out: &mut [O],
        spans: &[[u32; 2]],
        mode: ValueMode,
        pad_value: O,
    ) -> Result<()> {
        assert_eq!(spans.len(), shape[0] * shape[1], "one span per block row");
        let strides = [(shape[1] * shape[2]) as isize, shape[2] as isize, 1];
        self.gather_region(level, start, shape, out, 0, strides, Some(spans), mode, pad_value, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn gather_region<O: OutputElement>(
        &self,
        level: usize,
        start: [i64; 3],
        shape: [usize; 3],
        out: &mut [O],
        base: isize,
        strides: [isize; 3],
        spans: Option<&[[u32; 2]]>,
        mode: ValueMode,
        pad_value: O,
        streaming: bool,
    ) -> Result<()> {
        let lvl = &self.levels[level];
        let mut inside_lo = [0i64; 3];
        let mut inside_hi = [0i64; 3];
        let mut fully_inside = true;
        for k in 0..3 {
            inside_lo[k] = start[k].max(0);
            inside_hi[k] = (start[k] + shape[k] as i64).min(lvl.shape[k] as i64);
            if start[k] < 0 || start[k] + shape[k] as i64 > lvl.shape[k] as i64 {
                fully_inside = false;
            }
        }
        if !fully_inside {
            fill_outside(out, base, strides, start, shape, lvl.shape, spans, pad_value, streaming);
        }
        if (0..3).any(|k| inside_hi[k] <= inside_lo[k]) {
            return Ok(());
        }
        let chunk_lo: [u64; 3] = std::array::from_fn(|k| inside_lo[k] as u64 / lvl.chunk_shape[k]);
        let chunk_hi: [u64; 3] = std::array::from_fn(|k| (inside_hi[k] as u64 - 1) / lvl.chunk_shape[k]);
        let mut indices = Vec::new();
        for cz in chunk_lo[0]..=chunk_hi[0] {
            for cy in chunk_lo[1]..=chunk_hi[1] {
                for cx in chunk_lo[2]..=chunk_hi[2] {
                    indices.push([cz, cy, cx]);
                }
            }
        }
        // Remote: the region's chunks requested together (a shard's inner chunks as coalesced
        // ranges); a batch has usually asked for them already.
        self.prefetch(level, indices.iter().copied());
        // Decode in parallel (cache misses dominate cold reads), copy afterwards.
        let chunks: Vec<(usize, Arc<Chunk>)> = indices
            .par_iter()
            .enumerate()
            .map(|(i, &index)| self.chunk(level, index).map(|c| (i, c)))
            .collect::<Result<_>>()?;
        if spans.is_none() && strides[2] == 1 && mode == ValueMode::Raw && chunks.iter().all(|(_, c)| matches!(c.data, ChunkData::U8(_))) {
            let grid: [usize; 3] = std::array::from_fn(|k| (chunk_hi[k] - chunk_lo[k] + 1) as usize);
            let chunks: Vec<Arc<Chunk>> = chunks.into_iter().map(|(_, c)| c).collect();
            copy_u8_rows(
                &chunks,
                grid,
                chunk_lo,
                lvl.chunk_shape,
                inside_lo,
                inside_hi,
                start,
                out,
                base,
                strides,
                streaming,
            );
            if streaming {
                store_fence();
            }
            return Ok(());
        }
        for (i, chunk) in chunks {
            let index = indices[i];
            let origin: [i64; 3] = std::array::from_fn(|k| (index[k] * lvl.chunk_shape[k]) as i64);
            let lo: [i64; 3] = std::array::from_fn(|k| inside_lo[k].max(origin[k]));
            let hi: [i64; 3] = std::array::from_fn(|k| inside_hi[k].min(origin[k] + chunk.shape[k] as i64));
            let part = ChunkPart {
                origin,
                lo,
                hi,
                region_start: start,
                region_rows: shape[1],
                spans,
            };
            copy_chunk_part(&chunk, &part, out, base, strides, mode, streaming);
        }
        if streaming {
            store_fence();
        }
        Ok(())
    }
}

/// The inside of a region of uint8 chunks, row by row: each output row's bytes are put
/// together from the chunks it crosses (in the first-level cache), then converted in one run, so
/// a row is one streamed run with no partial cache lines at the chunk seams (converting each
/// chunk's piece on its own left a scalar head and tail at every seam, a third of the time).
#[allow(clippy::too_many_arguments)]
fn copy_u8_rows<O: OutputElement>(
    chunks: &[Arc<Chunk>],
    grid: [usize; 3],
    chunk_lo: [u64; 3],
    chunk_shape: [u64; 3],
    inside_lo: [i64; 3],
    inside_hi: [i64; 3],
    start: [i64; 3],
    out: &mut [O],
    base: isize,
    strides: [isize; 3],
    streaming: bool,
) {
    fn bytes(c: &Chunk) -> &[u8] {
        match &c.data {
            ChunkData::U8(v) => v,
            // The caller checked every chunk is uint8.
            _ => &[],
        }
    }
    let row_len = (inside_hi[2] - inside_lo[2]) as usize;
    let mut row = vec![0u8; row_len];
    let cell = |k: usize, v: i64| (v as u64 / chunk_shape[k] - chunk_lo[k]) as usize;
    for z in inside_lo[0]..inside_hi[0] {
        let cz = cell(0, z);
        for y in inside_lo[1]..inside_hi[1] {
            let cy = cell(1, y);
            let mut x = inside_lo[2];
            while x < inside_hi[2] {
                let cx = cell(2, x);
                let chunk = &chunks[(cz * grid[1] + cy) * grid[2] + cx];
                let origin: [i64; 3] = std::array::from_fn(|k| ((chunk_lo[k] + [cz, cy, cx][k] as u64) * chunk_shape[k]) as i64);
                let end = inside_hi[2].min(origin[2] + chunk.shape[2] as i64);
                let src0 =
                    ((z - origin[0]) as usize * chunk.shape[1] + (y - origin[1]) as usize) * chunk.shape[2] + (x - origin[2]) as usize;
                let at = (x - inside_lo[2]) as usize;
                row[at..at + (end - x) as usize].copy_from_slice(&bytes(chunk)[src0..src0 + (end - x) as usize]);
                x = end;
            }
            let dst0 =
                (base + (z - start[0]) as isize * strides[0] + (y - start[1]) as isize * strides[1] + (inside_lo[2] - start[2]) as isize)
                    as usize;
            O::convert_u8_run(&row, &mut out[dst0..dst0 + row_len], ValueMode::Raw, streaming);
        }
    }
}

/// Writes `value` at the voxels of the region `[start, start + shape)` that lie outside an
/// array of `level_shape` (within each row's span when `spans` is given); the voxels inside are
/// left to the chunk copies, so each output voxel is written once.
#[allow(clippy::too_many_arguments)]
fn fill_outside<O: OutputElement>(
    out: &mut [O],
    base: isize,
    strides: [isize; 3],
    start: [i64; 3],
    shape: [usize; 3],
    level_shape: [u64; 3],
    spans: Option<&[[u32; 2]]>,
    value: O,
    streaming: bool,
) {
    let inside = |k: usize, i: usize| (0..level_shape[k] as i64).contains(&(start[k] + i as i64));
    // The x range of the region inside the array, in region coordinates.
    let x_in0 = (-start[2]).clamp(0, shape[2] as i64) as usize;
    let x_in1 = (level_shape[2] as i64 - start[2]).clamp(x_in0 as i64, shape[2] as i64) as usize;
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            let row = base + z as isize * strides[0] + y as isize * strides[1];
            let [x0, x1] = spans.map_or([0, shape[2] as u32], |s| s[z * shape[1] + y]).map(|v| v as usize);
            if x0 >= x1 {
                continue;
            }
            let parts: [(usize, usize); 2] = if inside(0, z) && inside(1, y) {
                [(x0, x1.min(x_in0)), (x0.max(x_in1), x1)]
            } else {
                [(x0, x1), (0, 0)]
            };
            for (a, b) in parts {
                if a >= b {
                    continue;
                }
                if strides[2] == 1 {
                    O::fill_run(&mut out[(row + a as isize) as usize..(row + b as isize) as usize], value, streaming);
                } else {
                    for x in a..b {
                        out[(row + x as isize * strides[2]) as usize] = value;
                    }
                }
            }
        }
    }
}

/// The part of one chunk a gather copies: voxels `[lo, hi)` (level indices) of the chunk whose
/// voxel 0 is `origin`, into a region starting at `region_start` with `region_rows` rows per
/// plane, restricted to each row's span when `spans` is given.
struct ChunkPart<'a> {
    origin: [i64; 3],
    lo: [i64; 3],
    hi: [i64; 3],
    region_start: [i64; 3],
    region_rows: usize,
    spans: Option<&'a [[u32; 2]]>,
}

/// A stored element type the engine can read.
pub trait ToF32: Copy {
    /// The value as float32.
    fn to_f32(self) -> f32;
    /// Whether the value is non-zero (foreground).
    fn is_nonzero(self) -> bool;
    /// Converts a contiguous run of values (the rows of a copy); `streaming`: the output is not
    /// read again soon and may bypass the cache.
    #[inline(always)]
    fn convert_run<O: OutputElement>(src: &[Self], dst: &mut [O], mode: ValueMode, _streaming: bool) {
        convert_run_scalar(src, dst, mode);
    }
}

#[inline(always)]
fn convert_run_scalar<T: ToF32, O: OutputElement>(src: &[T], dst: &mut [O], mode: ValueMode) {
    match mode {
        // Separate loops so each is a straight conversion the compiler vectorises.
        ValueMode::Raw => dst.iter_mut().zip(src).for_each(|(d, s)| *d = O::convert(*s, ValueMode::Raw)),
        ValueMode::Foreground => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = O::convert(*s, ValueMode::Foreground)),
    }
}

/// What a gather can write: float32 values, or uint8 foreground masks (used by nearest-neighbour
/// label reads, whose source blocks are then 4× smaller and stay in cache) and uint8 raw bytes.
pub trait OutputElement: Copy + Send + Sync {
    /// Converts one stored value.
    fn convert<T: ToF32>(value: T, mode: ValueMode) -> Self;
    /// Converts a contiguous run of uint8 values (see [`ToF32::convert_run`]).
    #[inline(always)]
    fn convert_u8_run(src: &[u8], dst: &mut [Self], mode: ValueMode, _streaming: bool) {
        convert_run_scalar(src, dst, mode);
    }
    /// Fills a contiguous run (float32 batch output is streamed past the cache).
    #[inline(always)]
    fn fill_run(dst: &mut [Self], value: Self, _streaming: bool) {
        dst.fill(value);
    }
}

use crate::source::streaming::store_fence;

/// uint8 → float32 with the output streamed past the cache (AVX2): copies write megabytes of
/// batch output that the producing thread never reads, and a plain store first reads each
/// line into the cache. The values are the exact conversions of the scalar loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn u8_to_f32_streaming(src: &[u8], dst: &mut [f32]) {
    use std::arch::x86_64::{_mm256_cvtepi32_ps, _mm256_cvtepu8_epi32, _mm256_stream_ps, _mm_loadu_si128, _mm_srli_si128};
    let n = src.len().min(dst.len());
    // Whole cache lines only: a line written partly by streaming stores is flushed partly,
    // which costs a read-modify-write in memory.
    let head = crate::source::streaming::unaligned_head(&dst[..n]);
    for i in 0..head {
        dst[i] = f32::from(src[i]);
    }
    let mut i = head;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n bounds both slices; dst + i is 64-byte aligned (after the head).
        unsafe {
            let bytes = _mm_loadu_si128(src.as_ptr().add(i).cast());
            _mm256_stream_ps(dst.as_mut_ptr().add(i), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
            _mm256_stream_ps(
                dst.as_mut_ptr().add(i + 8),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(bytes))),
            );
        }
        i += 16;
    }
    for j in i..n {
        dst[j] = f32::from(src[j]);
    }
}

impl OutputElement for f32 {
    #[inline(always)]
    fn fill_run(dst: &mut [f32], value: f32, streaming: bool) {
        if streaming {
            crate::source::streaming::fill(dst, value);
        } else {
            dst.fill(value);
        }
    }

    #[inline(always)]
    fn convert_u8_run(src: &[u8], dst: &mut [f32], mode: ValueMode, streaming: bool) {
        #[cfg(target_arch = "x86_64")]
        if streaming && mode == ValueMode::Raw && src.len() >= 32 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked just above).
            unsafe { u8_to_f32_streaming(src, dst) };
            return;
        }
        let _ = streaming;
        convert_run_scalar(src, dst, mode);
    }

    #[inline(always)]
    fn convert<T: ToF32>(value: T, mode: ValueMode) -> f32 {
        match mode {
            ValueMode::Raw => value.to_f32(),
            ValueMode::Foreground => {
                if value.is_nonzero() {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }
}

/// uint8 output: foreground masks, or in raw mode the stored bytes of a uint8 array as they are
/// (source blocks of rotated raw reads; only uint8 arrays are gathered so).
impl OutputElement for u8 {
    #[inline(always)]
    fn convert<T: ToF32>(value: T, mode: ValueMode) -> u8 {
        match mode {
            ValueMode::Foreground => value.is_nonzero() as u8,
            ValueMode::Raw => {
                debug_assert!(
                    value.to_f32() == f32::from(value.to_f32() as u8),
                    "raw uint8 gathers read uint8 data"
                );
                value.to_f32() as u8
            }
        }
    }

    #[inline(always)]
    fn convert_u8_run(src: &[u8], dst: &mut [u8], mode: ValueMode, _streaming: bool) {
        match mode {
            ValueMode::Raw => dst.copy_from_slice(src),
            ValueMode::Foreground => convert_run_scalar(src, dst, mode),
        }
    }
}

macro_rules! impl_to_f32 {
    ($($t:ty),*) => {$(
        impl ToF32 for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 { self as f32 }
            #[inline(always)]
            #[allow(clippy::float_cmp)]
            fn is_nonzero(self) -> bool { self != (0 as $t) }
        }
    )*};
}
impl_to_f32!(u16, u32, u64, i8, i16, i32, i64, f32, f64);

impl ToF32 for u8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
    #[inline(always)]
    fn is_nonzero(self) -> bool {
        self != 0
    }
    #[inline(always)]
    fn convert_run<O: OutputElement>(src: &[u8], dst: &mut [O], mode: ValueMode, streaming: bool) {
        O::convert_u8_run(src, dst, mode, streaming);
    }
}

fn copy_chunk_part<O: OutputElement>(
    chunk: &Chunk,
    part: &ChunkPart,
    out: &mut [O],
    base: isize,
    strides: [isize; 3],
    mode: ValueMode,
    streaming: bool,
) {
    with_chunk_values!(&chunk.data, v => copy_typed(v, chunk.shape, part, out, base, strides, mode, streaming))
}

#[inline]
#[allow(clippy::too_many_arguments)]
fn copy_typed<T: ToF32, O: OutputElement>(
    data: &[T],
    chunk_shape: [usize; 3],
    part: &ChunkPart,
    out: &mut [O],
    base: isize,
    strides: [isize; 3],
    mode: ValueMode,
    streaming: bool,
) {
    let ChunkPart {
        origin,
        lo,
        hi,
        region_start,
        ..
    } = *part;
    for z in lo[0]..hi[0] {
        for y in lo[1]..hi[1] {
            let (mut x_lo, mut x_hi) = (lo[2], hi[2]);
            if let Some(spans) = part.spans {
                let [a, b] = spans[(z - region_start[0]) as usize * part.region_rows + (y - region_start[1]) as usize];
                x_lo = x_lo.max(region_start[2] + a as i64);
                x_hi = x_hi.min(region_start[2] + b as i64);
                if x_hi <= x_lo {
                    continue;
                }
            }
            let run = (x_hi - x_lo) as usize;
            let src0 =
                (((z - origin[0]) as usize * chunk_shape[1]) + (y - origin[1]) as usize) * chunk_shape[2] + (x_lo - origin[2]) as usize;
            let src = &data[src0..src0 + run];
            let dst0 = base
                + (z - region_start[0]) as isize * strides[0]
                + (y - region_start[1]) as isize * strides[1]
                + (x_lo - region_start[2]) as isize * strides[2];
            if strides[2] == 1 {
                T::convert_run(src, &mut out[dst0 as usize..dst0 as usize + run], mode, streaming);
            } else {
                for (i, s) in src.iter().enumerate() {
                    out[(dst0 + i as isize * strides[2]) as usize] = O::convert(*s, mode);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{assert_same, c_order, ImageSpec, TempDir};
    use std::path::{Path, PathBuf};

    /// A pyramid of voxel sizes (8, 2, 2), (16, 4, 4), (32, 8, 8), (32, 16, 16) nm: the single z
    /// voxel of the third level is never halved again, so the levels are anisotropic.
    fn anisotropic_pyramid(dir: &TempDir) -> PathBuf {
        let path = dir.join("p.zarr").join("raw");
        let mut spec = ImageSpec::new([0.0; 3], [8.0, 2.0, 2.0], [4, 32, 32]);
        spec.chunk = [4, 8, 8];
        spec.downsample_levels = 3;
        spec.frame = CoordinateFrame::Corner;
        spec.write(&path, |_| 1.0);
        path
    }

    fn open(path: &Path) -> Volume {
        Volume::open_in_frame(path, ChunkCache::global(), CoordinateFrame::Corner).unwrap()
    }

    #[test]
    fn pick_level_takes_the_level_of_the_requested_voxel_size() {
        let dir = TempDir::new("pick-exact");
        let volume = open(&anisotropic_pyramid(&dir));
        let sizes: Vec<[f64; 3]> = volume.levels.iter().map(|l| l.voxel_size).collect();
        assert_eq!(sizes, vec![[8.0, 2.0, 2.0], [16.0, 4.0, 4.0], [32.0, 8.0, 8.0], [32.0, 16.0, 16.0]]);
        for (i, size) in sizes.iter().enumerate() {
            assert_eq!(volume.pick_level(*size), i, "{size:?}");
        }
    }

    #[test]
    fn pick_level_minimises_the_summed_relative_difference() {
        let dir = TempDir::new("pick-closest");
        let volume = open(&anisotropic_pyramid(&dir));
        // (32, 4, 4): s1 is 16/32 + 0 + 0 = 0.5 away, s2 0 + 1 + 1 = 2, s0 0.75 + 0.5 + 0.5 = 1.75.
        assert_eq!(volume.pick_level([32.0, 4.0, 4.0]), 1);
        // (32, 6, 6): s1 is 0.5 + 1/3 + 1/3 ≈ 1.17 away, s2 0 + 1/3 + 1/3 ≈ 0.67, s3 0 + 5/3 + 5/3.
        assert_eq!(volume.pick_level([32.0, 6.0, 6.0]), 2);
        // (12.5, 3, 3): s0 is 4.5/12.5 + 2/3 ≈ 1.03 away, s1 3.5/12.5 + 2/3 ≈ 0.95.
        assert_eq!(volume.pick_level([12.5, 3.0, 3.0]), 1);
    }

    #[test]
    fn pick_level_breaks_a_tie_towards_the_finer_level_whatever_the_listing_order() {
        let dir = TempDir::new("pick-tie");
        let path = anisotropic_pyramid(&dir);
        // (12, 3, 3) is 4/12 + 1/3 + 1/3 = 1 away from both s0 and s1.
        assert_eq!(open(&path).pick_level([12.0, 3.0, 3.0]), 0);
        // The same levels listed coarsest first: s0 is now the last entry.
        let zattrs = path.join(".zattrs");
        let mut attrs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&zattrs).unwrap()).unwrap();
        attrs["multiscales"][0]["datasets"].as_array_mut().unwrap().reverse();
        std::fs::write(&zattrs, serde_json::to_string(&attrs).unwrap()).unwrap();
        let reversed = open(&path);
        assert_eq!(reversed.levels[3].voxel_size, [8.0, 2.0, 2.0]);
        assert_eq!(reversed.pick_level([12.0, 3.0, 3.0]), 3);
    }

    /// Voxel 0's corner at (100, -40, 8) nm, voxels (8, 2, 2), 4 × 30 × 32 voxels, two
    /// downsampled levels (2 × 15 × 16 and 1 × 8 × 8), metadata in the corner frame.
    fn offset_pyramid(dir: &TempDir) -> PathBuf {
        let path = dir.join("o.zarr").join("raw");
        let mut spec = ImageSpec::new([100.0, -40.0, 8.0], [8.0, 2.0, 2.0], [4, 30, 32]);
        spec.downsample_levels = 2;
        spec.frame = CoordinateFrame::Corner;
        spec.write(&path, |_| 0.0);
        path
    }

    #[test]
    fn corner_frame_boxes_start_at_the_written_translation() {
        let dir = TempDir::new("corner");
        let volume = open(&offset_pyramid(&dir));
        let l = &volume.levels;
        assert_eq!([l[0].shape, l[1].shape, l[2].shape], [[4, 30, 32], [2, 15, 16], [1, 8, 8]]);
        assert_eq!(l[0].origin, [100.0, -40.0, 8.0]);
        // The centre of voxel 0 is half a voxel of the level inside the corner.
        assert_eq!(l[0].translation, [104.0, -39.0, 9.0]);
        assert_eq!(l[1].translation, [108.0, -38.0, 10.0]);
        assert_eq!(
            l[0].world_box(),
            WorldBox {
                lo: [100.0, -40.0, 8.0],
                hi: [132.0, 20.0, 72.0]
            }
        );
        assert_eq!(
            l[1].world_box(),
            WorldBox {
                lo: [100.0, -40.0, 8.0],
                hi: [132.0, 20.0, 72.0]
            }
        );
        // 15 rows halve to 8 of 8 nm: the coarsest level reaches 4 nm further in y.
        assert_eq!(
            l[2].world_box(),
            WorldBox {
                lo: [100.0, -40.0, 8.0],
                hi: [132.0, 24.0, 72.0]
            }
        );
    }

    #[test]
    fn centre_frame_boxes_start_half_a_voxel_before_the_written_translation() {
        let dir = TempDir::new("centre");
        let path = offset_pyramid(&dir);
        let volume = Volume::open_in_frame(&path, ChunkCache::global(), CoordinateFrame::Centre).unwrap();
        let l = &volume.levels;
        // Every level's metadata says (100, -40, 8) (the corner rule); read as voxel centres.
        assert_eq!(l[1].origin, [100.0, -40.0, 8.0]);
        assert_eq!(l[0].translation, [100.0, -40.0, 8.0]);
        assert_eq!(
            l[0].world_box(),
            WorldBox {
                lo: [96.0, -41.0, 7.0],
                hi: [128.0, 19.0, 71.0]
            }
        );
        assert_eq!(
            l[1].world_box(),
            WorldBox {
                lo: [92.0, -42.0, 6.0],
                hi: [124.0, 18.0, 70.0]
            }
        );
    }

    #[test]
    fn world_to_voxel_puts_voxel_centres_on_integers() {
        let dir = TempDir::new("w2v");
        let path = offset_pyramid(&dir);
        let corner = open(&path);
        let (s0, s1) = (&corner.levels[0], &corner.levels[1]);
        assert_eq!(s0.world_to_voxel([104.0, -39.0, 9.0]), [0.0, 0.0, 0.0]);
        assert_eq!(s0.world_to_voxel([100.0, -40.0, 8.0]), [-0.5, -0.5, -0.5]);
        assert_eq!(s0.world_to_voxel([132.0, 20.0, 72.0]), [3.5, 29.5, 31.5]);
        assert_eq!(s1.world_to_voxel([100.0, -40.0, 8.0]), [-0.5, -0.5, -0.5]);
        assert_eq!(s1.world_to_voxel([124.0, -30.0, 18.0]), [1.0, 2.0, 2.0]);
        let centre = Volume::open_in_frame(&path, ChunkCache::global(), CoordinateFrame::Centre).unwrap();
        assert_eq!(centre.levels[0].world_to_voxel([100.0, -40.0, 8.0]), [0.0, 0.0, 0.0]);
        assert_eq!(centre.levels[0].world_to_voxel([112.0, -30.0, 12.0]), [1.5, 5.0, 2.0]);
    }

    /// 6 × 6 × 6 voxels of 1 nm in 4-voxel chunks (the last chunk per axis is partial), voxel
    /// (z, y, x) holding 100 z + 10 y + x.
    fn numbered_cube(dir: &TempDir) -> Volume {
        let path = dir.join("n.zarr").join("raw");
        let mut spec = ImageSpec::new([0.0; 3], [1.0; 3], [6, 6, 6]);
        spec.frame = CoordinateFrame::Corner;
        spec.write(&path, |[z, y, x]| (100 * z + 10 * y + x) as f32);
        open(&path)
    }

    #[test]
    fn gather_pads_the_part_of_a_region_outside_the_array() {
        let dir = TempDir::new("gather-pad");
        let volume = numbered_cube(&dir);
        let (start, shape) = ([-2i64, 3, 4], [4usize, 5, 4]);
        let mut out = vec![0f32; 80];
        volume
            .gather(0, start, shape, &mut out, 0, [20, 4, 1], ValueMode::Raw, -1.0)
            .unwrap();
        let expected = c_order(shape, |v| {
            let p: [i64; 3] = std::array::from_fn(|k| start[k] + v[k] as i64);
            if p.iter().all(|&i| (0..6).contains(&i)) {
                (100 * p[0] + 10 * p[1] + p[2]) as f32
            } else {
                -1.0
            }
        });
        assert_same(&out, &expected, "region [-2, 3, 4] + [4, 5, 4]");
        // Rows z = -2, -1 are padding; (z 0, y 3, x 4) = 34 is the first voxel inside.
        assert_eq!(out[2 * 20], 34.0);
        assert_eq!(out[2 * 20 + 2], -1.0);
    }

    #[test]
    fn gather_in_foreground_mode_marks_non_zero_voxels() {
        let dir = TempDir::new("gather-fg");
        let volume = numbered_cube(&dir);
        let mut out = vec![9f32; 8];
        volume
            .gather(0, [0, 0, -1], [1, 2, 4], &mut out, 0, [8, 4, 1], ValueMode::Foreground, f32::NAN)
            .unwrap();
        // (0, 0, 0) holds 0; every other voxel is non-zero; x = -1 is outside.
        assert_same(&out, &[f32::NAN, 0.0, 1.0, 1.0, f32::NAN, 1.0, 1.0, 1.0], "foreground");
    }

    #[test]
    fn absent_chunks_read_as_the_fill_value() {
        let dir = TempDir::new("fill");
        let path = dir.join("f.zarr").join("labels");
        let mut spec = ImageSpec::new([0.0; 3], [1.0; 3], [8, 8, 8]);
        spec.dtype = DType::U8;
        spec.fill_value = 7.0;
        spec.frame = CoordinateFrame::Corner;
        spec.write_chunks(&path, &[[0, 0, 0], [4, 4, 4]], |[z, y, x]| (z + y + x) as f32);
        assert!(path.join("s0").join("0.0.0").is_file());
        assert!(!path.join("s0").join("0.1.0").exists(), "an unwritten chunk is absent");
        let volume = open(&path);
        let mut out = vec![0f32; 512];
        volume
            .gather(0, [0; 3], [8; 3], &mut out, 0, [64, 8, 1], ValueMode::Raw, -1.0)
            .unwrap();
        let expected = c_order([8; 3], |[z, y, x]| {
            let written = (z < 4 && y < 4 && x < 4) || (z >= 4 && y >= 4 && x >= 4);
            if written {
                (z + y + x) as f32
            } else {
                7.0
            }
        });
        assert_same(&out, &expected, "two written chunks of eight");
    }

    #[test]
    fn missing_image_group_is_not_found_naming_it() {
        let dir = TempDir::new("missing-group");
        let path = dir.join("absent.zarr").join("raw");
        match Volume::open(&path, ChunkCache::global()) {
            Err(Error::NotFound { path: p, .. }) => assert_eq!(p, path.display().to_string()),
            other => panic!("expected NotFound, got {other:?}"),
        }
    }

    #[test]
    fn missing_level_directory_is_not_found_naming_the_level() {
        let dir = TempDir::new("missing-level");
        let path = offset_pyramid(&dir);
        std::fs::remove_dir_all(path.join("s1")).unwrap();
        let e = Volume::open(&path, ChunkCache::global()).unwrap_err();
        let message = e.to_string();
        match e {
            Error::NotFound { path: p, .. } => assert_eq!(p, path.join("s1").display().to_string()),
            other => panic!("expected NotFound, got {other:?}"),
        }
        assert!(message.contains("level 's1'"), "{message}");
    }

    #[test]
    fn malformed_zattrs_is_a_metadata_error_naming_the_file() {
        let dir = TempDir::new("bad-json");
        let path = offset_pyramid(&dir);
        std::fs::write(path.join(".zattrs"), "{\"multiscales\": [").unwrap();
        match Volume::open(&path, ChunkCache::global()) {
            Err(Error::Metadata { path: p, message }) => {
                assert_eq!(p, path.join(".zattrs").display().to_string());
                assert!(message.contains("malformed JSON"), "{message}");
            }
            other => panic!("expected a metadata error, got {other:?}"),
        }
    }

    #[test]
    fn zattrs_without_multiscales_is_a_metadata_error() {
        let dir = TempDir::new("no-multiscales");
        let path = offset_pyramid(&dir);
        std::fs::write(path.join(".zattrs"), r#"{"name": "raw"}"#).unwrap();
        match Volume::open(&path, ChunkCache::global()) {
            Err(Error::Metadata { path: p, message }) => {
                assert_eq!(p, path.join(".zattrs").display().to_string());
                assert!(message.contains("no 'multiscales'"), "{message}");
            }
            other => panic!("expected a metadata error, got {other:?}"),
        }
    }

    #[test]
    fn axes_other_than_z_y_x_are_a_metadata_error() {
        let dir = TempDir::new("axes");
        let path = offset_pyramid(&dir);
        let attrs = serde_json::json!({"multiscales": [{
            "version": "0.4",
            "axes": ["x", "y", "z"],
            "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0, 8.0]}]}],
        }]});
        std::fs::write(path.join(".zattrs"), attrs.to_string()).unwrap();
        match Volume::open(&path, ChunkCache::global()) {
            Err(Error::Metadata { path: p, message }) => {
                assert_eq!(p, path.display().to_string());
                assert!(message.contains("z, y, x"), "{message}");
            }
            other => panic!("expected a metadata error, got {other:?}"),
        }
    }

    #[test]
    fn streamed_uint8_conversion_equals_the_plain_loop_at_any_offset() {
        let src: Vec<u8> = (0..400u32).map(|i| (i * 37 % 256) as u8).collect();
        for start in 0..17 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 100, 257, 383 - start] {
                let mut streamed = vec![-1.0f32; 400];
                let mut plain = vec![-1.0f32; 400];
                <f32 as OutputElement>::convert_u8_run(&src[start..start + len], &mut streamed[start..start + len], ValueMode::Raw, true);
                crate::source::streaming::store_fence();
                convert_run_scalar(&src[start..start + len], &mut plain[start..start + len], ValueMode::Raw);
                assert_eq!(streamed, plain, "start {start} len {len}");
            }
        }
    }
}
