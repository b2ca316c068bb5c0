//! Label crops held decoded. The annotated classes of one crop that a target array reads from
//! one voxel grid are decoded once, whole, and packed as bits — one byte per voxel for every
//! seven classes (bit `c % 7` of plane `c / 7`) — then shared by every sample and thread. A
//! crop costs a byte per voxel per seven classes (a 150³ crop of up to seven classes: 3.4 MB),
//! so a split's label crops fit in memory where their decoded chunks (a byte or more per voxel
//! per class, plus the chunks' margins) thrash a chunk cache; once a crop is held, a sample
//! decodes no label chunk. Crops are counted against a byte budget of their own and evicted
//! whole; a crop too large for the budget is read chunk by chunk through the chunk cache.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quick_cache::sync::Cache;
use quick_cache::Weighter;

use crate::error::Result;
use crate::geometry::grid_cells;
use crate::runtime::PerProcess;
use crate::source::cache::with_chunk_values;
use crate::source::volume::{ToF32, Volume};

/// Classes per plane (the top bit of a packed byte marks padding in a gathered block).
pub const CLASSES_PER_PLANE: usize = 7;

/// The classes of one crop on one voxel grid, packed as bits.
#[derive(Debug)]
pub struct PackedLabels {
    /// Shape (z, y, x) of the grid.
    pub shape: [usize; 3],
    /// Plane `p` holds classes `7p..7p + 6` as bits 0..6, one byte per voxel, C order.
    pub planes: Vec<Vec<u8>>,
}

impl PackedLabels {
    /// Decodes every chunk of each member's level on this thread (not through the chunk cache:
    /// a crop is read once) and packs the classes' foreground (non-zero voxels) as bits.
    /// Members share one grid.
    pub fn build(members: &[(&Volume, usize)], decoded_bytes: &AtomicU64) -> Result<PackedLabels> {
        let Some(&(first, first_level)) = members.first() else {
            return Ok(PackedLabels {
                shape: [0; 3],
                planes: Vec::new(),
            });
        };
        let shape = first.levels[first_level].shape.map(|n| n as usize);
        let voxels: usize = shape.iter().product();
        let mut planes = vec![vec![0u8; voxels]; members.len().div_ceil(CLASSES_PER_PLANE)];
        for (c, &(volume, level)) in members.iter().enumerate() {
            let lvl = &volume.levels[level];
            let grid: [u64; 3] = std::array::from_fn(|k| lvl.shape[k].div_ceil(lvl.chunk_shape[k]));
            let plane = &mut planes[c / CLASSES_PER_PLANE];
            let bit = (c % CLASSES_PER_PLANE) as u32;
            // One thread decodes the whole crop: building runs while the cache holds the key's
            // placeholder, and a rayon task stolen here while waiting could ask for this same
            // crop and wait for itself.
            for index in grid_cells(grid) {
                let chunk = lvl.decode_chunk(index)?;
                decoded_bytes.fetch_add(chunk.data.nbytes() as u64, Ordering::Relaxed);
                let origin: [usize; 3] = std::array::from_fn(|k| (index[k] * lvl.chunk_shape[k]) as usize);
                with_chunk_values!(&chunk.data, v => set_bits(v, chunk.shape, origin, shape, plane, bit));
            }
        }
        Ok(PackedLabels { shape, planes })
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.planes.iter().map(Vec::len).sum()
    }
}

/// Sets `bit` of the packed bytes of the voxels where the chunk at `origin` is non-zero.
fn set_bits<T: ToF32>(data: &[T], chunk_shape: [usize; 3], origin: [usize; 3], shape: [usize; 3], packed: &mut [u8], bit: u32) {
    let [cz, cy, cx] = chunk_shape;
    let valid = [
        cz.min(shape[0] - origin[0]),
        cy.min(shape[1] - origin[1]),
        cx.min(shape[2] - origin[2]),
    ];
    for z in 0..valid[0] {
        for y in 0..valid[1] {
            let src = &data[(z * cy + y) * cx..(z * cy + y) * cx + valid[2]];
            let at = ((origin[0] + z) * shape[1] + origin[1] + y) * shape[2] + origin[2];
            for (p, v) in packed[at..at + valid[2]].iter_mut().zip(src) {
                *p |= (v.is_nonzero() as u8) << bit;
            }
        }
    }
}

/// A held crop's identity: the opened levels of its classes, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelKey(Vec<u64>);

impl LabelKey {
    /// The key of these members.
    pub fn of(members: &[(&Volume, usize)]) -> LabelKey {
        LabelKey(members.iter().map(|(v, l)| v.levels[*l].id).collect())
    }
}

#[derive(Clone)]
struct ByteWeighter;

impl Weighter<LabelKey, Arc<PackedLabels>> for ByteWeighter {
    fn weight(&self, _key: &LabelKey, value: &Arc<PackedLabels>) -> u64 {
        value.nbytes() as u64 + 256
    }
}

/// Counters of the label-crop cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LabelCacheStats {
    /// Reads served by a held crop.
    pub hits: u64,
    /// Crops decoded.
    pub misses: u64,
    /// Reads of crops too large to hold (read through the chunk cache).
    pub passed: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Byte budget.
    pub budget: u64,
    /// Crops held.
    pub crops: u64,
    /// Bytes of label chunks decoded to build crops.
    pub decoded_bytes: u64,
    /// Time spent building crops, summed over threads (nanoseconds).
    pub decode_nanos: u64,
}

/// The process-wide cache of packed label crops.
pub struct LabelCache {
    crops: Cache<LabelKey, Arc<PackedLabels>, ByteWeighter>,
    hits: AtomicU64,
    misses: AtomicU64,
    passed: AtomicU64,
    decoded_bytes: AtomicU64,
    decode_nanos: AtomicU64,
    /// Crops whose chunks failed to decode: read chunk by chunk from then on.
    failed: Mutex<HashSet<LabelKey>>,
}

static GLOBAL: PerProcess<LabelCache> = PerProcess::new();
static GLOBAL_BUDGET: AtomicU64 = AtomicU64::new(0);

/// Default budget: `CELLMAP_LABEL_CACHE_BYTES` when set (0 turns the cache off: every label
/// read goes through the chunk cache), else a sixteenth of the memory limit shared among the
/// job's processes on this machine, at least 1 GiB and at most 16 GiB (1 GiB where the memory
/// cannot be read). A 24 GB machine with one process gets 1.5 GiB: 400 crops of 150³ with up to
/// seven classes (3.4 MB each).
pub fn default_budget() -> u64 {
    crate::runtime::memory_budget("CELLMAP_LABEL_CACHE_BYTES", 16, 1 << 30, 16 << 30)
}

/// The largest share of the budget one crop may take; larger crops are read chunk by chunk.
const MAX_CROP_SHARE: u64 = 8;

impl LabelCache {
    /// A cache holding at most `budget_bytes` of packed crops.
    pub fn new(budget_bytes: u64) -> LabelCache {
        LabelCache {
            crops: Cache::with_weighter(
                ((budget_bytes >> 20) as usize).clamp(16, 1 << 16),
                budget_bytes.max(1),
                ByteWeighter,
            ),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            passed: AtomicU64::new(0),
            decoded_bytes: AtomicU64::new(0),
            decode_nanos: AtomicU64::new(0),
            failed: Mutex::new(HashSet::new()),
        }
    }

    /// The process-wide cache; a forked child gets a fresh one (see [`PerProcess`]).
    pub fn global() -> Arc<LabelCache> {
        GLOBAL.get(|| {
            if GLOBAL_BUDGET.load(Ordering::Relaxed) == 0 {
                GLOBAL_BUDGET.store(default_budget().max(1), Ordering::Relaxed);
            }
            LabelCache::new(GLOBAL_BUDGET.load(Ordering::Relaxed))
        })
    }

    /// Changes the byte budget of the process-wide cache (evicting as needed); 0 turns it off.
    pub fn set_global_budget(budget_bytes: u64) {
        GLOBAL_BUDGET.store(budget_bytes.max(1), Ordering::Relaxed);
        LabelCache::global().crops.set_capacity(budget_bytes.max(1));
    }

    /// The packed crop of `members` (decoded now if it is not held), or None when it is too
    /// large to hold (more than an eighth of the budget), remote, or one of its chunks cannot be
    /// decoded (the caller then reads chunk by chunk, which reports the failure for the samples
    /// that touch the chunk, under the loader's read-error policy). A transient error while
    /// building (EIO, a timeout) is returned, so the read fails and may be retried.
    pub fn get(&self, members: &[(&Volume, usize)]) -> Result<Option<Arc<PackedLabels>>> {
        let Some(&(first, level)) = members.first() else {
            return Ok(None);
        };
        let voxels: u64 = first.levels[level].shape.iter().product();
        let bytes = voxels * members.len().div_ceil(CLASSES_PER_PLANE) as u64;
        if bytes.saturating_mul(MAX_CROP_SHARE) > self.crops.capacity() || members.iter().any(|(v, _)| v.reads_ahead()) {
            self.passed.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let key = LabelKey::of(members);
        let failed = || self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed().contains(&key) {
            self.passed.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let mut built_here = false;
        let crop = self.crops.get_or_insert_with(&key, || {
            built_here = true;
            let started = std::time::Instant::now();
            let crop = PackedLabels::build(members, &self.decoded_bytes).map(Arc::new);
            self.decode_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            crop
        });
        let crop = match crop {
            Ok(crop) => crop,
            // A transient failure (EIO, a timeout) fails this read, which the loader's policy
            // may retry; a chunk that cannot be decoded sends the crop's reads to the chunks.
            Err(e) if e.is_transient() => return Err(e),
            Err(_) => {
                failed().insert(key);
                self.passed.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
        };
        let counter = if built_here { &self.misses } else { &self.hits };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(Some(crop))
    }

    /// Drops every held crop and resets the counters.
    pub fn clear(&self) {
        self.crops.clear();
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).clear();
        for c in [&self.hits, &self.misses, &self.passed, &self.decoded_bytes, &self.decode_nanos] {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Current counters.
    pub fn stats(&self) -> LabelCacheStats {
        LabelCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            passed: self.passed.load(Ordering::Relaxed),
            bytes: self.crops.weight(),
            budget: self.crops.capacity(),
            crops: self.crops.len() as u64,
            decoded_bytes: self.decoded_bytes.load(Ordering::Relaxed),
            decode_nanos: self.decode_nanos.load(Ordering::Relaxed),
        }
    }
}
