//! Decoded-chunk cache shared by every volume: LRU-like (quick_cache's CLOCK-Pro) with a byte
//! budget, one decode per chunk even when many threads ask for it at once, and hit/miss counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::Weighter;

use crate::error::Result;
use crate::runtime::PerProcess;

/// A decoded chunk in its native element type, C order over (z, y, x).
#[derive(Debug, Clone)]
pub enum ChunkData {
    /// uint8
    U8(Vec<u8>),
    /// uint16
    U16(Vec<u16>),
    /// uint32
    U32(Vec<u32>),
    /// uint64
    U64(Vec<u64>),
    /// int8
    I8(Vec<i8>),
    /// int16
    I16(Vec<i16>),
    /// int32
    I32(Vec<i32>),
    /// int64
    I64(Vec<i64>),
    /// float32
    F32(Vec<f32>),
    /// float64
    F64(Vec<f64>),
}

/// Evaluates `$body` with `$v` bound to the typed values of a `ChunkData` (one match arm per
/// element type), so code generic over the element type is written once.
macro_rules! with_chunk_values {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::source::cache::ChunkData::U8($v) => $body,
            $crate::source::cache::ChunkData::U16($v) => $body,
            $crate::source::cache::ChunkData::U32($v) => $body,
            $crate::source::cache::ChunkData::U64($v) => $body,
            $crate::source::cache::ChunkData::I8($v) => $body,
            $crate::source::cache::ChunkData::I16($v) => $body,
            $crate::source::cache::ChunkData::I32($v) => $body,
            $crate::source::cache::ChunkData::I64($v) => $body,
            $crate::source::cache::ChunkData::F32($v) => $body,
            $crate::source::cache::ChunkData::F64($v) => $body,
        }
    };
}
pub(crate) use with_chunk_values;

impl ChunkData {
    /// Bytes held by the decoded data.
    pub fn nbytes(&self) -> usize {
        with_chunk_values!(self, v => std::mem::size_of_val(v.as_slice()))
    }
}

/// A decoded chunk and its (possibly clipped at the array edge) shape.
#[derive(Debug)]
pub struct Chunk {
    /// Elements, C order.
    pub data: ChunkData,
    /// Shape (z, y, x) of `data`.
    pub shape: [usize; 3],
}

/// Identifies a chunk: which level of which volume, and its grid index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    /// Unique id of the opened level (see `volume::Level`).
    pub level_id: u64,
    /// Chunk grid index (z, y, x).
    pub index: [u64; 3],
}

#[derive(Clone)]
struct ByteWeighter;

impl Weighter<ChunkKey, Arc<Chunk>> for ByteWeighter {
    fn weight(&self, _key: &ChunkKey, value: &Arc<Chunk>) -> u64 {
        // Count a small overhead so empty chunks still have weight.
        value.data.nbytes() as u64 + 64
    }
}

/// Counters describing cache behaviour since creation (or the last reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Requests served from memory (including waits on another thread's decode).
    pub hits: u64,
    /// Chunks decoded.
    pub misses: u64,
    /// Bytes currently held.
    pub bytes: u64,
    /// Byte budget.
    pub budget: u64,
    /// Chunks currently held.
    pub entries: u64,
    /// Total time spent decoding chunks, summed over threads (nanoseconds).
    pub decode_nanos: u64,
    /// Bytes of the chunks decoded (their decoded size).
    pub decoded_bytes: u64,
}

/// The shared decoded-chunk cache.
pub struct ChunkCache {
    chunks: Cache<ChunkKey, Arc<Chunk>, ByteWeighter>,
    hits: AtomicU64,
    misses: AtomicU64,
    decode_nanos: AtomicU64,
    decoded_bytes: AtomicU64,
}

static GLOBAL: PerProcess<ChunkCache> = PerProcess::new();
/// Budget of the process-wide cache, remembered so a forked child's fresh cache keeps it.
static GLOBAL_BUDGET: AtomicU64 = AtomicU64::new(0);

/// Default budget: `CELLMAP_CACHE_BYTES` when set, else an eighth of the memory limit shared
/// among the job's processes on this machine, at least 2 GiB and at most 32 GiB (2 GiB where
/// the memory cannot be read). A 24 GB machine with one process gets 3 GiB.
pub fn default_budget() -> u64 {
    crate::runtime::memory_budget("CELLMAP_CACHE_BYTES", 8, 2 << 30, 32 << 30)
}

impl ChunkCache {
    /// A cache holding at most `budget_bytes` of decoded chunks.
    pub fn new(budget_bytes: u64) -> Self {
        // quick_cache sizes its tables from an item estimate; assume ~256 KiB chunks.
        let estimated_items = ((budget_bytes / (256 << 10)) as usize).clamp(16, 1 << 20);
        ChunkCache {
            chunks: Cache::with_weighter(estimated_items, budget_bytes.max(1), ByteWeighter),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            decode_nanos: AtomicU64::new(0),
            decoded_bytes: AtomicU64::new(0),
        }
    }

    /// The process-wide cache. A forked child gets a fresh one (see [`PerProcess`]).
    pub fn global() -> Arc<ChunkCache> {
        GLOBAL.get(|| {
            if GLOBAL_BUDGET.load(Ordering::Relaxed) == 0 {
                GLOBAL_BUDGET.store(default_budget(), Ordering::Relaxed);
            }
            ChunkCache::new(GLOBAL_BUDGET.load(Ordering::Relaxed))
        })
    }

    /// Returns the chunk for `key`, decoding it with `decode` if absent. Concurrent callers
    /// for the same key wait for a single decode instead of decoding it again.
    pub fn get_or_decode(&self, key: ChunkKey, decode: impl FnOnce() -> Result<Chunk>) -> Result<Arc<Chunk>> {
        let mut decoded_here = false;
        let chunk = self.chunks.get_or_insert_with(&key, || {
            decoded_here = true;
            let started = std::time::Instant::now();
            let chunk = decode().map(Arc::new);
            self.decode_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if let Ok(c) = &chunk {
                self.decoded_bytes.fetch_add(c.data.nbytes() as u64, Ordering::Relaxed);
            }
            chunk
        })?;
        if decoded_here {
            self.misses.fetch_add(1, Ordering::Relaxed);
        } else {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(chunk)
    }

    /// Whether `key` is held (no counters change).
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.chunks.contains_key(key)
    }

    /// Changes the byte budget of the process-wide cache (evicting as needed).
    pub fn set_global_budget(budget_bytes: u64) {
        GLOBAL_BUDGET.store(budget_bytes, Ordering::Relaxed);
        ChunkCache::global().set_budget(budget_bytes);
    }

    /// Changes the byte budget (evicting as needed).
    pub fn set_budget(&self, budget_bytes: u64) {
        self.chunks.set_capacity(budget_bytes.max(1));
    }

    /// Drops every cached chunk (counters are kept).
    pub fn clear(&self) {
        self.chunks.clear();
    }

    /// Resets hit/miss counters to zero.
    pub fn reset_counters(&self) {
        self.hits.store(0, Ordering::Relaxed);
        self.misses.store(0, Ordering::Relaxed);
        self.decode_nanos.store(0, Ordering::Relaxed);
        self.decoded_bytes.store(0, Ordering::Relaxed);
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.chunks.weight(),
            budget: self.chunks.capacity(),
            entries: self.chunks.len() as u64,
            decode_nanos: self.decode_nanos.load(Ordering::Relaxed),
            decoded_bytes: self.decoded_bytes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn chunk(n: usize) -> Chunk {
        Chunk {
            data: ChunkData::U8(vec![7; n]),
            shape: [1, 1, n],
        }
    }

    #[test]
    fn second_request_is_a_hit() {
        let cache = ChunkCache::new(1 << 20);
        let key = ChunkKey {
            level_id: 1,
            index: [0, 0, 0],
        };
        cache.get_or_decode(key, || Ok(chunk(10))).unwrap();
        cache.get_or_decode(key, || panic!("decoded twice")).unwrap();
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.entries), (1, 1, 1));
    }

    #[test]
    fn concurrent_requests_decode_once() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let decodes = Arc::new(AtomicUsize::new(0));
        let key = ChunkKey {
            level_id: 3,
            index: [1, 2, 3],
        };
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (cache, decodes) = (cache.clone(), decodes.clone());
                s.spawn(move || {
                    cache
                        .get_or_decode(key, || {
                            decodes.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(chunk(100))
                        })
                        .unwrap();
                });
            }
        });
        assert_eq!(decodes.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats().misses, 1);
        assert_eq!(cache.stats().hits, 7);
    }

    #[test]
    fn byte_budget_bounds_memory() {
        let cache = ChunkCache::new(10_000);
        for i in 0..100 {
            let key = ChunkKey {
                level_id: 0,
                index: [i, 0, 0],
            };
            cache.get_or_decode(key, || Ok(chunk(1000))).unwrap();
        }
        assert!(cache.stats().bytes <= 10_000, "{:?}", cache.stats());
        assert!(cache.stats().entries >= 1);
    }

    #[test]
    fn decode_errors_are_not_cached() {
        let cache = ChunkCache::new(1 << 20);
        let key = ChunkKey {
            level_id: 0,
            index: [0, 0, 0],
        };
        let err = cache.get_or_decode(key, || Err(crate::Error::decode("a/s0/0.0.0", "bad bytes")));
        assert!(err.is_err());
        cache.get_or_decode(key, || Ok(chunk(4))).unwrap();
        assert_eq!(cache.stats().entries, 1);
    }
}
