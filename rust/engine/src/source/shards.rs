//! Sharded arrays read by inner chunk: the unit decoded and cached is the inner chunk, read as
//! a byte range of its shard, so a shard may be far larger than a patch (or than memory).
//!
//! zarrs decodes the shard index (`ShardingCodec::decode_index`) and the inner chunks (the
//! inner codec chain); this module keeps the indexes of the shards read so far and turns an
//! inner chunk into its shard's key and byte range, which is what a remote store needs to ask
//! for a batch's inner chunks together. An inner chunk the index marks empty, or one of an
//! absent shard, is the fill value.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::ops::Range;

use std::sync::{Arc, Mutex};

use zarrs::array::codec::ShardingCodec;
use zarrs::array::{
    Array, ArrayShardedExt, ArrayToBytesCodecTraits, BytesRepresentation, CodecChain, CodecMetadataOptions, CodecOptions, FillValue,
};
use zarrs::metadata::ConfigurationSerialize;
use zarrs::metadata_ext::codec::sharding::{ShardingCodecConfiguration, ShardingIndexLocation};
use zarrs::storage::byte_range::ByteRange;
use zarrs::storage::{ReadableStorageTraits, StoreKey};

use crate::error::{Error, Result};
use crate::io::location::Location;
use crate::io::store::storage_read_error;

/// Shard indexes a level keeps before it forgets them all (an index of 8³ inner chunks is 8 KiB).
const MAX_SHARD_INDEXES: usize = 4096;

/// An index entry that marks an inner chunk as not stored (the fill value).
const EMPTY: u64 = u64::MAX;

/// A shard's decoded index (offset and size of each inner chunk); `None`: the shard is absent.
type ShardIndex = Option<Arc<Vec<u64>>>;

/// Where an inner chunk's bytes are: its shard's key and the range within it.
pub type InnerChunkPlace = (StoreKey, Range<u64>);

/// The inner-chunk reader of one sharded level.
pub struct ShardedReads {
    codec: ShardingCodec,
    /// The codecs of one inner chunk.
    pub inner_codecs: CodecChain,
    /// The shape of one inner chunk (every axis, leading ones included).
    pub inner_shape: Vec<NonZeroU64>,
    /// Inner chunks per shard along each axis.
    per_shard: Vec<NonZeroU64>,
    /// Where the index sits in a shard, and its encoded size.
    index_range: ByteRange,
    /// Indexes read so far, by shard.
    indexes: Mutex<HashMap<Vec<u64>, ShardIndex>>,
    /// The store's root, which errors name a shard's key under.
    root: Location,
}

impl ShardedReads {
    /// The inner-chunk reader of `array`, when it is sharded and nothing wraps the shards (a
    /// codec around the sharding codec means a shard can only be read whole).
    /// `root` is the store's root, `path` the array's.
    pub fn of(array: &Array<dyn ReadableStorageTraits>, root: &Location, path: &Location) -> Result<Option<ShardedReads>> {
        if !array.is_exclusively_sharded() {
            return Ok(None);
        }
        let bad = |e: String| Error::metadata(path, format!("sharding_indexed codec: {e}"));
        let configuration = array
            .codecs()
            .array_to_bytes_codec()
            .configuration_v3(&CodecMetadataOptions::default())
            .ok_or_else(|| bad("no configuration".into()))?;
        let configuration = ShardingCodecConfiguration::try_from_configuration(configuration).map_err(|e| bad(e.to_string()))?;
        let ShardingCodecConfiguration::V1(v1) = &configuration else {
            return Err(bad(format!("unsupported configuration {configuration}")));
        };
        let codec = ShardingCodec::new_with_configuration(&configuration).map_err(|e| bad(e.to_string()))?;
        let inner_codecs = CodecChain::from_metadata(&v1.codecs).map_err(|e| bad(e.to_string()))?;
        let shard = array
            .chunk_shape(&vec![0; array.dimensionality()])
            .map_err(|e| Error::metadata(path, e))?;
        let inner_shape = array
            .effective_subchunk_shape()
            .ok_or_else(|| bad("no inner chunk shape".into()))?
            .to_vec();
        let per_shard: Vec<NonZeroU64> = shard
            .iter()
            .zip(&inner_shape)
            .map(|(s, i)| {
                NonZeroU64::new(s.get() / i.get()).ok_or_else(|| bad(format!("inner chunks {inner_shape:?} larger than shards {shard:?}")))
            })
            .collect::<Result<_>>()?;
        let mut index_shape = per_shard.clone();
        index_shape.push(NonZeroU64::new(2).expect("non-zero"));
        let index_codecs = CodecChain::from_metadata(&v1.index_codecs).map_err(|e| bad(e.to_string()))?;
        let index_size = match index_codecs
            .encoded_representation(&index_shape, &zarrs::array::data_type::uint64(), &FillValue::from(EMPTY))
            .map_err(|e| bad(e.to_string()))?
        {
            BytesRepresentation::FixedSize(size) => size,
            _ => return Err(bad("the shard index has no fixed size".into())),
        };
        let index_range = match v1.index_location {
            ShardingIndexLocation::Start => ByteRange::FromStart(0, Some(index_size)),
            _ => ByteRange::Suffix(index_size),
        };
        Ok(Some(ShardedReads {
            codec,
            inner_codecs,
            inner_shape,
            per_shard,
            index_range,
            indexes: Mutex::new(HashMap::new()),
            root: root.clone(),
        }))
    }

    /// The index of `shard` (read once, then kept); `None` when the shard is absent.
    fn index(
        &self,
        array: &Array<dyn ReadableStorageTraits>,
        storage: &dyn ReadableStorageTraits,
        shard: &[u64],
    ) -> Result<Option<Arc<Vec<u64>>>> {
        let lock = || self.indexes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = lock().get(shard) {
            return Ok(known.clone());
        }
        let key = array.chunk_key(shard);
        let where_ = || format!("{} (shard index)", self.root.join(key.as_str()));
        // Read outside the lock: two threads may read one index, neither waits on the other.
        let encoded = storage
            .get_partial(&key, self.index_range)
            .map_err(|e| storage_read_error(where_(), e))?;
        let index = match encoded {
            Some(bytes) => Some(Arc::new(
                self.codec
                    .decode_index(&bytes, &self.per_shard, &CodecOptions::default())
                    .map_err(|e| Error::decode(where_(), e))?,
            )),
            None => None,
        };
        let mut known = lock();
        if known.len() >= MAX_SHARD_INDEXES {
            known.clear();
        }
        known.insert(shard.to_vec(), index.clone());
        Ok(index)
    }

    /// Where inner chunk `inner` (indices over the whole array, every axis) is stored; `None`
    /// when it is the fill value (its shard is absent or the index marks it empty).
    pub fn locate(
        &self,
        array: &Array<dyn ReadableStorageTraits>,
        storage: &dyn ReadableStorageTraits,
        inner: &[u64],
    ) -> Result<Option<InnerChunkPlace>> {
        let shard: Vec<u64> = inner.iter().zip(&self.per_shard).map(|(i, n)| i / n.get()).collect();
        let Some(index) = self.index(array, storage, &shard)? else {
            return Ok(None);
        };
        // The entry of the inner chunk within its shard, C order.
        let entry = inner
            .iter()
            .zip(&self.per_shard)
            .fold(0u64, |flat, (i, n)| flat * n.get() + i % n.get()) as usize;
        let (offset, size) = (index[2 * entry], index[2 * entry + 1]);
        if offset == EMPTY && size == EMPTY {
            return Ok(None);
        }
        let key = array.chunk_key(&shard);
        match offset.checked_add(size) {
            Some(end) => Ok(Some((key, offset..end))),
            None => Err(Error::decode(
                format!("{} (shard index)", self.root.join(key.as_str())),
                format!("inner chunk {inner:?} has offset {offset} and size {size}, beyond any shard"),
            )),
        }
    }

    /// The encoded bytes of inner chunk `inner`; `None` when it is the fill value. A range
    /// beyond the shard's end is an error, never bytes decoded short.
    pub fn read_encoded(
        &self,
        array: &Array<dyn ReadableStorageTraits>,
        storage: &dyn ReadableStorageTraits,
        inner: &[u64],
    ) -> Result<Option<Vec<u8>>> {
        let Some((key, range)) = self.locate(array, storage, inner)? else {
            return Ok(None);
        };
        let expected = range.end - range.start;
        let where_ = || format!("{} bytes {range:?}", self.root.join(key.as_str()));
        let bytes = storage
            .get_partial(&key, ByteRange::new(range.clone()))
            .map_err(|e| storage_read_error(where_(), e))?;
        match bytes {
            Some(bytes) if bytes.len() as u64 == expected => Ok(Some(bytes.to_vec())),
            Some(bytes) => Err(Error::decode(
                where_(),
                format!("the shard ended after {} of {expected} bytes of inner chunk {inner:?}", bytes.len()),
            )),
            None => Ok(None),
        }
    }
}
