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
//! encoded + written once complete; memory holds the partially covered chunks and at most a
//! group of complete ones. Complete chunks are written in groups of about the thread count, in
//! parallel: with blending a chunk completes only when the next row of tiles arrives, one or
//! two per call, and encoding them one at a time would leave the other threads idle. A chunk
//! is complete when
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
//! Metadata and chunks are written through zarrs into [`OutputStore`], which writes every
//! value whole (a hidden temporary file, then a rename): a process killed at any moment leaves
//! each chunk absent, old or new, never torn. With `fsync` each value is also flushed before
//! the rename, which extends this to power loss.
//!
//! # Modules
//!
//! `config` (the typed configuration and its checks), `tiling` (tile plan and blend weights),
//! `accumulate` (chunks assembled in memory), `pyramid` (downsampled levels), `layout` (path
//! safety and the zarr nodes, via zarrs) and `store` (the atomic storage adapter).

mod accumulate;
mod config;
mod layout;
mod progress;
mod pyramid;
mod ranks;
mod store;
#[cfg(test)]
mod tests;
mod tiling;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rayon::prelude::*;
use zarrs::array::Array;

use crate::error::{Error, Result};
use crate::with_dtype;

pub(crate) use crate::geometry::chunks_meeting;
use accumulate::{copy_piece, empty_acc, normalise_in_place, normalised, Acc, ChunkState, Piece, Sample};
pub use config::{Downsample, TilingConfig, WriterConfig};
use progress::Progress;
pub use progress::Shard;

pub use ranks::{finish_ranks, RanksDone};
pub use store::OutputStore;
pub use tiling::{Blend, TilePlan};

/// One level of the image: its array path, geometry, and (once created) its open array.
struct LevelInfo<A = Array<OutputStore>> {
    name: String,
    shape: [u64; 3],
    voxel_size: [f64; 3],
    translation: [f64; 3],
    array: A,
}

impl LevelInfo<()> {
    fn with_array(self, array: Array<OutputStore>) -> LevelInfo {
        LevelInfo {
            name: self.name,
            shape: self.shape,
            voxel_size: self.voxel_size,
            translation: self.translation,
            array,
        }
    }
}

/// Counters of one writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Chunk files written (including rewrites and downsampled levels).
    pub chunks_written: u64,
    /// Encoded bytes written.
    pub bytes_written: u64,
    /// Chunks accumulated in memory, not yet complete.
    pub pending_chunks: u64,
    /// Complete chunks in memory, waiting to be written with the next group.
    pub complete_chunks: u64,
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
    /// Complete chunks not yet written (`ChunkState::Complete`).
    complete: Mutex<Vec<[u64; 3]>>,
    /// Buffers of written chunks, reused for new ones: a fresh chunk-sized allocation is zero
    /// pages that fault on first write, and the faults' TLB shootdowns serialise the threads.
    spare: Mutex<Vec<Vec<f32>>>,
    closed: AtomicBool,
    /// Whether any tile or box was written through this writer.
    received_writes: AtomicBool,
    store: Arc<OutputStore>,
    /// Completion marks and this process's chunks (planned writers only).
    progress: Option<Progress>,
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

impl ImageWriter {
    /// Checks that `config` can be written — values, the input it must not touch, an existing
    /// image (an error unless `overwrite`), conflicting parent groups, write permission —
    /// without creating anything.
    pub fn validate(config: &WriterConfig) -> Result<()> {
        layout::validate(config)
    }

    /// Removes an existing image at the configured path (checked as `overwrite` checks it: a
    /// zarr group, not the protected input); returns whether one was there. Several ranks
    /// starting over an old output: one rank clears it, then every rank writes with `exist_ok`.
    pub fn clear(config: &WriterConfig) -> Result<bool> {
        layout::clear_image(config)
    }

    /// Creates the image (parent groups, arrays, multiscales metadata) and returns a writer.
    pub fn create(config: WriterConfig) -> Result<ImageWriter> {
        Self::validate(&config)?;
        let shape0 = config.array_shape();
        let levels = config
            .level_geometry()
            .into_iter()
            .enumerate()
            .map(|(i, (shape, f))| {
                let voxel_size: [f64; 3] = std::array::from_fn(|k| config.voxel_size[k] * f[k] as f64);
                // Voxel 0 of every level has its corner at `lo`; the metadata marks that corner
                // or that voxel's centre, per the coordinate frame.
                let translation =
                    std::array::from_fn(|k| config.bounds.lo[k] + voxel_size[k] / 2.0 - config.frame.centre_offset(voxel_size[k]));
                LevelInfo {
                    name: format!("s{}", config.first_level + i),
                    shape,
                    voxel_size,
                    translation,
                    array: (),
                }
            })
            .collect();
        let (store, levels, image_key) = layout::create_image(&config, levels)?;

        let plan = config
            .tiling
            .as_ref()
            .map(|t| TilePlan::new(shape0, config.write_shape, t.overlap, t.blend));
        let received = (0..plan.as_ref().map_or(0, TilePlan::len))
            .map(|_| AtomicBool::new(false))
            .collect();
        let grid: [u64; 3] = std::array::from_fn(|k| shape0[k].div_ceil(config.chunk_shape[k] as u64));
        let progress = plan
            .as_ref()
            .map(|p| Progress::open(&config, grid, p, store.clone(), &image_key))
            .transpose()?;
        Ok(ImageWriter {
            config,
            levels,
            plan,
            received,
            chunks: Mutex::new(HashMap::new()),
            complete: Mutex::new(Vec::new()),
            spare: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            received_writes: AtomicBool::new(false),
            store,
            progress,
        })
    }

    /// Whether this process writes `chunk` (with a tiling plan: its rank owns it and it was not
    /// complete when the writer opened; otherwise always).
    fn writes_chunk(&self, chunk: [u64; 3]) -> bool {
        self.progress.as_ref().is_none_or(|p| p.writes(chunk))
    }

    /// The planned tiles this process has to write, ascending: those touching a chunk it writes
    /// (all tiles for a fresh one-rank job; fewer for a rank's share or a resumed job).
    pub fn tiles_to_write(&self) -> Result<Vec<usize>> {
        let plan = self.require_plan()?;
        Ok((0..plan.len())
            .filter(|&i| chunks_meeting(plan.region(i), self.config.chunk_shape).any(|c| self.writes_chunk(c)))
            .collect())
    }

    /// Completion of the first level: (complete chunks per rank that wrote them, total chunks),
    /// read from the marks on disk (every process's). `None` without a tiling plan.
    pub fn progress(&self) -> Result<Option<(std::collections::BTreeMap<usize, u64>, u64)>> {
        self.progress.as_ref().map(|p| Ok((p.done_by_rank()?, p.total()))).transpose()
    }

    /// Complete and total chunks of the first level (marks counted on disk, every process's);
    /// `None` without a tiling plan. Cheaper than [`Self::progress`] for frequent polling.
    pub fn chunks_done(&self) -> Result<Option<(u64, u64)>> {
        self.progress.as_ref().map(|p| Ok((p.done()?, p.total()))).transpose()
    }

    /// Whether this process computes the downsampled levels at close (all of them with one
    /// rank; with several, those below the second level): rank 0, once every rank is done.
    fn builds_pyramid(&self) -> bool {
        self.progress.as_ref().is_none_or(|p| p.shard().rank == 0)
    }

    /// The completion marks when several ranks share the second level (there is one, and more
    /// than one rank).
    fn shared_levels(&self) -> Option<&Progress> {
        self.progress.as_ref().filter(|p| self.levels.len() > 1 && p.shard().world_size > 1)
    }

    /// With several ranks: builds the chunks of the second level whose chunks below are all
    /// this rank's and complete (written and marked: call after `flush`), and that no run built
    /// before, and marks them. `close` calls it after its flush; rank 0 calls it before waiting
    /// for the other ranks. A no-op otherwise, and when called again.
    pub fn downsample_own_share(&self) -> Result<()> {
        let Some(progress) = self.shared_levels() else {
            return Ok(());
        };
        let name = &self.levels[1].name;
        let built = progress.level_done(name)?;
        let rank = progress.shard().rank;
        let chunks: Vec<[u64; 3]> = self
            .level_chunks(1)
            .into_iter()
            .filter(|&c| self.builder(progress, c) == Some(rank) && !built.contains(&c) && self.sources_complete(progress, c))
            .collect();
        self.downsample_chunks(1, &chunks, |c| progress.mark_level_done(name, c))
    }

    /// Whether every chunk of the first level under chunk `chunk` of the second is complete.
    fn sources_complete(&self, progress: &Progress, chunk: [u64; 3]) -> bool {
        self.source_chunks(1, chunk).all(|s| progress.is_complete(s))
    }

    /// The rank that builds chunk `chunk` of the second level at its close: the owner of every
    /// chunk under it; `None` where two ranks share those (rank 0 builds it last).
    fn builder(&self, progress: &Progress, chunk: [u64; 3]) -> Option<usize> {
        let mut owners = self.source_chunks(1, chunk).map(|s| progress.owner(s));
        let first = owners.next()?;
        owners.all(|o| o == first).then_some(first)
    }

    /// Built and expected chunks of the second level among those the ranks build at their own
    /// close (not those rank 0 builds last); `None` unless several ranks share the level.
    pub fn shares_built(&self) -> Result<Option<(u64, u64)>> {
        self.shared_levels()
            .map(|progress| Ok(self.shares_among(progress, &progress.level_done(&self.levels[1].name)?)))
            .transpose()
    }

    /// Of the second level's chunks the ranks build at their own close: how many are in
    /// `built`, and how many there are.
    fn shares_among(&self, progress: &Progress, built: &HashSet<[u64; 3]>) -> (u64, u64) {
        let shared: Vec<[u64; 3]> = self
            .level_chunks(1)
            .into_iter()
            .filter(|&c| self.builder(progress, c).is_some())
            .collect();
        (shared.iter().filter(|&c| built.contains(c)).count() as u64, shared.len() as u64)
    }

    /// Built and total chunks of the second level (marks counted on disk, every process's: a
    /// chunk is marked once built from complete chunks); `None` without a tiling plan or
    /// downsampled levels.
    pub fn levels_done(&self) -> Result<Option<(u64, u64)>> {
        self.progress
            .as_ref()
            .filter(|_| self.levels.len() > 1)
            .map(|p| Ok((p.level_done(&self.levels[1].name)?.len() as u64, self.level_chunks(1).len() as u64)))
            .transpose()
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
        let (mut pending, mut complete) = (0, 0);
        for slot in lock(&self.chunks).values() {
            match *lock(slot) {
                ChunkState::Pending(_) => pending += 1,
                ChunkState::Complete(_) => complete += 1,
                ChunkState::Written => {}
            }
        }
        WriterStats {
            chunks_written: self.store.chunks_written(),
            bytes_written: self.store.bytes_written(),
            pending_chunks: pending,
            complete_chunks: complete,
        }
    }

    fn require_plan(&self) -> Result<&TilePlan> {
        self.plan
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{}: this writer has no tiling plan", self.config.path)))
    }

    fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::invalid(format!("{}: the writer is closed", self.config.path)));
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
                self.config.path,
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
                self.config.path,
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
        self.received_writes.store(true, Ordering::Release);
        let mut by_chunk: HashMap<[u64; 3], Vec<usize>> = HashMap::new();
        for (p, piece) in pieces.iter().enumerate() {
            // Another rank's chunk, or one complete before a resume, is not ours.
            for chunk in chunks_meeting(piece.region, self.config.chunk_shape).filter(|&c| self.writes_chunk(c)) {
                by_chunk.entry(chunk).or_default().push(p);
            }
        }
        let mut work: Vec<([u64; 3], Vec<usize>)> = by_chunk.into_iter().collect();
        work.sort_unstable_by_key(|(c, _)| *c);
        work.par_iter()
            .try_for_each(|(chunk, list)| self.apply_to_chunk(*chunk, list.iter().map(|&p| &pieces[p])))?;
        if lock(&self.complete).len() >= rayon::current_num_threads() {
            self.store_complete()?;
        }
        Ok(())
    }

    /// Encodes and writes every complete chunk held in memory, in parallel, then marks them
    /// done.
    fn store_complete(&self) -> Result<()> {
        let group = std::mem::take(&mut *lock(&self.complete));
        group.par_iter().try_for_each(|&chunk| {
            let slot = lock(&self.chunks).get(&chunk).cloned();
            match slot {
                Some(slot) => self.store_if_complete(chunk, &mut lock(&slot)),
                None => Ok(()),
            }
        })
    }

    /// Writes a complete chunk held in memory (no-op in any other state).
    fn store_if_complete(&self, chunk: [u64; 3], state: &mut ChunkState) -> Result<()> {
        if let ChunkState::Complete(acc) = state {
            self.store_accumulated(chunk, std::mem::replace(acc, empty_acc()))?;
            *state = ChunkState::Written;
            // Planned writers only: a chunk is complete once all its tiles arrived.
            if let Some(progress) = &self.progress {
                progress.mark_done(chunk)?;
            }
        }
        Ok(())
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
                values: self.buffer(n, if blended { 0.0 } else { self.config.fill_value as f32 }),
                weights: blended.then(|| self.buffer(n, 0.0)),
                // Shared images merge partly written chunks by the voxels written here.
                covered: self.config.exist_ok.then(|| vec![false; n]),
                remaining: plan.tiles_meeting(lo, hi),
            },
            None => Acc {
                values: self.buffer(n, self.config.fill_value as f32),
                weights: None,
                covered: Some(vec![false; n]),
                remaining: (0..3).map(|k| hi[k] - lo[k]).product(),
            },
        }
    }

    /// A chunk buffer of `n` values `fill`, reused when one is spare.
    fn buffer(&self, n: usize, fill: f32) -> Vec<f32> {
        match lock(&self.spare).pop() {
            Some(mut v) => {
                v.clear();
                v.resize(n, fill);
                v
            }
            None => vec![fill; n],
        }
    }

    fn recycle(&self, buffer: Vec<f32>) {
        let mut spare = lock(&self.spare);
        // Enough for a group of complete chunks and their weights; the rest is freed.
        if spare.len() < 4 * rayon::current_num_threads() {
            spare.push(buffer);
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
                    if self.plan.is_none() {
                        acc.remaining = acc.remaining.saturating_sub(newly);
                    } else if piece.counts {
                        acc.remaining = acc.remaining.saturating_sub(1);
                    }
                }
                if acc.remaining == 0 {
                    *state = ChunkState::Complete(std::mem::replace(acc, empty_acc()));
                    lock(&self.complete).push(chunk);
                }
            }
            ChunkState::Complete(_) | ChunkState::Written => {
                // A write into a chunk already complete (a repeated tile, or a free write):
                // written first if it is still in memory, then treated as a written one.
                self.store_if_complete(chunk, &mut state)?;
                // Read back, overwrite the new voxels (last write wins), write again.
                let _shared = self.shared_write_lock()?;
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

    /// With `exist_ok` (several writers may share the image): an exclusive lock on the image,
    /// held while a chunk is read, merged and written back. Blocks until it is free.
    fn shared_write_lock(&self) -> Result<Option<std::fs::File>> {
        // An object store has no file locks: writers sharing a remote image must write
        // disjoint chunks (as ranks do).
        let Some(image) = self.config.path.local().filter(|_| self.config.exist_ok) else {
            return Ok(None);
        };
        let path = image.join(".cellmap-write.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.lock().map_err(|e| Error::io(&path, e))?;
        Ok(Some(file))
    }

    /// Writes an accumulated chunk of the first level. In a shared image a chunk not wholly
    /// written here is merged with the stored one (the voxels written here replace the
    /// stored voxels, the rest are kept) under the shared lock.
    fn store_accumulated(&self, chunk: [u64; 3], mut acc: Acc) -> Result<()> {
        let covered = acc.covered.take();
        let mut values = std::mem::take(&mut acc.values);
        if let Some(weights) = acc.weights.take() {
            normalise_in_place(&mut values, &weights, self.config.fill_value as f32);
            self.recycle(weights);
        }
        let stored = match covered {
            Some(covered) if self.config.exist_ok && covered.iter().any(|c| !c) => {
                let _shared = self.shared_write_lock()?;
                let mut merged = self.load_chunk(0, chunk)?;
                for ((m, v), c) in merged.iter_mut().zip(&values).zip(&covered) {
                    if *c {
                        *m = *v;
                    }
                }
                self.store_chunk(0, chunk, &merged)
            }
            _ => self.store_chunk(0, chunk, &values),
        };
        self.recycle(values);
        stored
    }

    /// Decodes chunk `chunk` of `level` from disk as f32 (the fill value where absent).
    fn load_chunk(&self, level: usize, chunk: [u64; 3]) -> Result<Vec<f32>> {
        let info = &self.levels[level];
        let n: usize = self.config.chunk_shape.iter().product();
        let where_ = || format!("{} chunk {:?}", self.config.path.join(&info.name), chunk);
        with_dtype!(self.config.dtype, T => {
            match info.array.retrieve_chunk_if_exists::<Vec<T>>(&chunk).map_err(|e| Error::decode(where_(), e))? {
                Some(v) => Ok(v.into_iter().map(Sample::to_f32).collect()),
                None => Ok(vec![self.config.fill_value as f32; n]),
            }
        })
    }

    /// Converts `values` (a whole chunk, f32) to the array's dtype and stores it through zarrs
    /// (encoded, written atomically); an all-fill chunk is not stored and any previous one is
    /// erased.
    fn store_chunk(&self, level: usize, chunk: [u64; 3], values: &[f32]) -> Result<()> {
        let info = &self.levels[level];
        let where_ = || format!("{} chunk {:?}", self.config.path.join(&info.name), chunk);
        with_dtype!(self.config.dtype, T => {
            let fill = <T as Sample>::from_f64(self.config.fill_value);
            // Every NaN becomes the fill's NaN, so an all-NaN chunk is recognised as fill.
            let typed: Vec<T> = values
                .iter()
                .map(|&v| {
                    let t = <T as Sample>::from_f32(v);
                    if t.same(fill) {
                        fill
                    } else {
                        t
                    }
                })
                .collect();
            info.array.store_chunk(&chunk, &typed[..]).map_err(|e| Error::decode(where_(), e))
        })
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
        for chunk in chunks_meeting(std::array::from_fn(|k| (lo[k], hi[k])), self.config.chunk_shape) {
            let slot = lock(&self.chunks).get(&chunk).cloned();
            let values = match slot.as_ref().map(|s| lock(s)) {
                Some(state) => match &*state {
                    ChunkState::Pending(acc) | ChunkState::Complete(acc) => normalised(acc, fill),
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
        Ok(out)
    }

    /// Writes every pending chunk (in parallel). Chunks never written stay absent (fill value).
    pub fn flush(&self) -> Result<()> {
        self.store_complete()?;
        let slots: Vec<([u64; 3], Arc<Mutex<ChunkState>>)> = lock(&self.chunks).iter().map(|(k, v)| (*k, v.clone())).collect();
        slots.par_iter().try_for_each(|(chunk, slot)| {
            let mut state = lock(slot);
            if let ChunkState::Pending(acc) = &mut *state {
                self.store_accumulated(*chunk, std::mem::replace(acc, empty_acc()))?;
                *state = ChunkState::Written;
            }
            Ok(())
        })
    }

    /// Flushes, computes the downsampled levels, and refuses further writes. Closing twice is
    /// a no-op. Of several ranks each builds the second level over its own chunks
    /// ([`Self::downsample_own_share`]), and rank 0 the levels below it, only once every chunk
    /// of the first two levels is there (an error names how many are missing: wait for the
    /// other ranks before closing rank 0).
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.flush()?;
        self.downsample_own_share()?;
        lock(&self.chunks).clear();
        if self.levels.len() > 1 && self.builds_pyramid() {
            let name = &self.levels[1].name;
            match self.shared_levels() {
                Some(progress) => {
                    let done = progress.done()?;
                    let built = progress.level_done(name)?;
                    let (shares, expected) = self.shares_among(progress, &built);
                    if done < progress.total() || shares < expected {
                        return Err(Error::invalid(format!(
                            "{}: {done} of {} chunks are complete and the ranks have built {shares} of {expected} \
                             chunks of {name}; rank 0 finishes the downsampled levels once every rank has finished",
                            self.config.path,
                            progress.total(),
                        )));
                    }
                    // What is left: the chunks of the second level over two ranks' chunks.
                    let rest: Vec<[u64; 3]> = self.level_chunks(1).into_iter().filter(|c| !built.contains(c)).collect();
                    self.downsample_chunks(1, &rest, |c| progress.mark_level_done(name, c))?;
                }
                // One rank builds the second level whole, marking (as ranks do) the chunks built
                // from complete chunks.
                None => self.downsample_chunks(1, &self.level_chunks(1), |c| match &self.progress {
                    Some(p) if self.sources_complete(p, c) => p.mark_level_done(name, c),
                    _ => Ok(()),
                })?,
            }
            for level in 2..self.levels.len() {
                self.downsample(level)?;
            }
        }
        Ok(())
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        // Best effort: a writer dropped without close() still writes what it holds. One that
        // received no writes (opened to watch a job's status, say) leaves the image alone: its
        // levels are the writing processes' to build.
        if !self.is_closed() && self.received_writes.load(Ordering::Acquire) {
            let _ = crate::runtime::install(|| self.close());
        }
    }
}
