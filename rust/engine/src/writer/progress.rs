//! Which output chunks of a planned (tiled) image are complete, and which a rank owns.
//!
//! A chunk of the first level that received every planned tile touching it is written, then
//! marked complete by a small file `<image>/.cellmap-progress/<z>.<y>.<x>` (written atomically,
//! holding the rank that wrote it). A job restarted with the same plan skips complete chunks, so
//! a killed job resumes where it stopped; `status()` counts the marks while a job runs. The plan
//! the marks belong to is recorded next to them (`plan.json`), and a different plan refuses to
//! resume from them.
//!
//! With several ranks, each owns a contiguous run of chunks in a run order, whole chunks: a rank
//! processes every tile touching its chunks and keeps only its own chunks' share, so each chunk
//! is summed by one process in tile order, exactly as a one-rank run sums it. Tiles on a border
//! between two ranks are predicted by both, so the runs are cut so that the largest number of
//! tiles a rank processes is as small as it can be, and of two run orders the one giving the
//! smaller largest count is taken: Z order (Morton order: the bits of the chunk's z, y and x
//! indices interleaved), whose runs are compact boxes and win for many ranks and large
//! volumes, or C order of the 2×2×2 blocks of chunks under each chunk of the next level (single
//! chunks without downsampled levels), whose runs are slabs. Both keep each block together: a
//! rank owns every chunk under most of its second-level chunks, builds those itself at close
//! and marks them in `<image>/.cellmap-progress/<level>/`; rank 0 builds the few whose chunks
//! two ranks share (at most one per cut).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::chunks_meeting;
use super::config::{downsample_factors, WriterConfig};
use super::store::OutputStore;
use super::tiling::TilePlan;
use crate::error::{Error, Result};
use crate::geometry::grid_cells;

/// This process's share of a job split over `world_size` processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    /// This process (0-based).
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
}

impl Shard {
    /// Checks `rank < world_size`.
    pub fn check(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::invalid(format!(
                "rank {} is out of range for world_size {}",
                self.rank, self.world_size
            )));
        }
        Ok(())
    }
}

/// The completion marks of one image and this process's chunks.
#[derive(Debug)]
pub(super) struct Progress {
    /// The store holding the image, and the key of the marks' folder in it.
    store: Arc<OutputStore>,
    dir: String,
    done_at_open: HashSet<[u64; 3]>,
    /// Chunks marked complete by this process since it opened.
    marked: Mutex<HashSet<[u64; 3]>>,
    shard: Shard,
    grid: [u64; 3],
    /// The order of the ranks' runs.
    order: RunOrder,
    /// Rank `r` owns the chunks whose place in `order` lies in `cuts[r]..cuts[r + 1]`.
    cuts: Vec<u64>,
}

const PLAN_FILE: &str = "plan.json";

impl Progress {
    /// The marks of the image at `config.path` (chunk grid `grid`): read back when writing into
    /// an existing image (`exist_ok`), started afresh otherwise.
    pub(super) fn open(
        config: &WriterConfig,
        grid: [u64; 3],
        plan: &TilePlan,
        store: Arc<OutputStore>,
        image_key: &str,
    ) -> Result<Progress> {
        let dir = match image_key.trim_matches('/') {
            "" => ".cellmap-progress".to_string(),
            key => format!("{key}/.cellmap-progress"),
        };
        let fingerprint = plan_fingerprint(config);
        let plan_key = format!("{dir}/{PLAN_FILE}");
        let mut done_at_open = HashSet::new();
        match store.read_text(&plan_key) {
            Ok(Some(stored)) if config.exist_ok => {
                if stored != fingerprint {
                    return Err(Error::invalid(format!(
                        "{}: the image's completed chunks were written with another plan ({stored}); this writer's plan is {fingerprint}. Pass overwrite=True to start again",
                        store.describe(&plan_key)
                    )));
                }
                done_at_open.extend(marks_in(&store, &dir)?.into_iter().map(|(chunk, _)| chunk));
            }
            _ => {
                if !config.exist_ok {
                    store.erase_below(&dir)?;
                }
                store.write_value(&plan_key, fingerprint.as_bytes())?;
            }
        }
        let shard = config.shard.unwrap_or(Shard { rank: 0, world_size: 1 });
        let blocks = RunOrder::Blocks(if config.downsample_levels > 0 {
            downsample_factors(config.array_shape())
        } else {
            [1; 3]
        });
        // The order whose busiest rank has fewer tiles; Z order on a tie.
        let (z_cuts, z_busiest) = balanced_cuts(plan, config.chunk_shape, grid, RunOrder::Z, shard.world_size);
        let (block_cuts, block_busiest) = balanced_cuts(plan, config.chunk_shape, grid, blocks, shard.world_size);
        let (order, cuts) = if block_busiest < z_busiest {
            (blocks, block_cuts)
        } else {
            (RunOrder::Z, z_cuts)
        };
        Ok(Progress {
            store,
            dir,
            done_at_open,
            marked: Mutex::new(HashSet::new()),
            shard,
            grid,
            order,
            cuts,
        })
    }

    /// This process's rank and the number of processes.
    pub(super) fn shard(&self) -> Shard {
        self.shard
    }

    /// Number of chunks of the first level.
    pub(super) fn total(&self) -> u64 {
        self.grid.iter().product()
    }

    /// The rank that owns `chunk`.
    pub(super) fn owner(&self, chunk: [u64; 3]) -> usize {
        let place = self.order.place(chunk, self.grid);
        self.cuts[1..].partition_point(|&end| end <= place)
    }

    /// Whether this process writes `chunk`: it owns it and it was not complete at open.
    pub(super) fn writes(&self, chunk: [u64; 3]) -> bool {
        self.owner(chunk) == self.shard.rank && !self.done_at_open.contains(&chunk)
    }

    /// Whether `chunk` is known complete here: complete at open, or marked by this process.
    pub(super) fn is_complete(&self, chunk: [u64; 3]) -> bool {
        self.done_at_open.contains(&chunk) || self.marked.lock().unwrap_or_else(|e| e.into_inner()).contains(&chunk)
    }

    /// Marks `chunk` complete (after it was written).
    pub(super) fn mark_done(&self, chunk: [u64; 3]) -> Result<()> {
        let key = format!("{}/{}.{}.{}", self.dir, chunk[0], chunk[1], chunk[2]);
        self.store.write_value(&key, self.shard.rank.to_string().as_bytes())?;
        self.marked.lock().unwrap_or_else(|e| e.into_inner()).insert(chunk);
        Ok(())
    }

    /// Complete chunks now (every process's marks; counted, not read: cheap enough to poll).
    pub(super) fn done(&self) -> Result<u64> {
        Ok(marks_in(&self.store, &self.dir)?.len() as u64)
    }

    /// The folder of the marks of the downsampled level `level` (its array name, e.g. `s1`).
    fn level_dir(&self, level: &str) -> String {
        format!("{}/{level}", self.dir)
    }

    /// Marks chunk `chunk` of the downsampled level `level` built.
    pub(super) fn mark_level_done(&self, level: &str, chunk: [u64; 3]) -> Result<()> {
        let key = format!("{}/{}.{}.{}", self.level_dir(level), chunk[0], chunk[1], chunk[2]);
        self.store.write_value(&key, self.shard.rank.to_string().as_bytes())
    }

    /// The chunks of the downsampled level `level` marked built (every process's marks).
    pub(super) fn level_done(&self, level: &str) -> Result<HashSet<[u64; 3]>> {
        Ok(marks_in(&self.store, &self.level_dir(level))?
            .into_iter()
            .map(|(chunk, _)| chunk)
            .collect())
    }

    /// Complete chunks now, per rank that wrote them.
    pub(super) fn done_by_rank(&self) -> Result<BTreeMap<usize, u64>> {
        let mut out = BTreeMap::new();
        for (_, mark) in marks_in(&self.store, &self.dir)? {
            *out.entry(self.mark_rank(&mark)).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// The rank a mark names (a mark is written whole; an unreadable one counts as rank 0's).
    fn mark_rank(&self, key: &str) -> usize {
        self.store
            .read_text(key)
            .ok()
            .flatten()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The chunks of the downsampled level `level` marked built, with the rank that built each.
    #[cfg(test)]
    pub(super) fn level_builders(&self, level: &str) -> Result<BTreeMap<[u64; 3], usize>> {
        Ok(marks_in(&self.store, &self.level_dir(level))?
            .into_iter()
            .map(|(chunk, key)| (chunk, self.mark_rank(&key)))
            .collect())
    }
}

/// The marks in the folder `dir` of `store` (none when it does not exist; not those of the
/// levels' subfolders, which an object store lists too): each chunk and its key.
fn marks_in(store: &OutputStore, dir: &str) -> Result<Vec<([u64; 3], String)>> {
    let prefix = format!("{}/", dir.trim_matches('/'));
    Ok(store
        .keys_below(dir)?
        .into_iter()
        .filter_map(|key| {
            let name = key.strip_prefix(&prefix).filter(|name| !name.contains('/'))?;
            parse_mark(name).map(|chunk| (chunk, key))
        })
        .collect())
}

/// An order of the chunks, along which each rank owns a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunOrder {
    /// Z order ([`z_order`]).
    Z,
    /// C order of blocks of this many chunks along each axis, then C order within a block.
    Blocks([u64; 3]),
}

impl RunOrder {
    /// The place of `chunk` (of a grid of `grid` chunks) in this order; places may leave gaps.
    fn place(self, chunk: [u64; 3], grid: [u64; 3]) -> u64 {
        match self {
            RunOrder::Z => z_order(chunk),
            RunOrder::Blocks(b) => {
                let blocks: [u64; 3] = std::array::from_fn(|k| grid[k].div_ceil(b[k]));
                let outer = (chunk[0] / b[0] * blocks[1] + chunk[1] / b[1]) * blocks[2] + chunk[2] / b[2];
                let inner = (chunk[0] % b[0] * b[1] + chunk[1] % b[1]) * b[2] + chunk[2] % b[2];
                outer * b.iter().product::<u64>() + inner
            }
        }
    }
}

/// One past the largest place of a chunk of a grid of `grid` chunks in `order` (places grow with
/// each index in both orders, so the last chunk has it).
fn order_end(grid: [u64; 3], order: RunOrder) -> u64 {
    order.place(std::array::from_fn(|k| grid[k].saturating_sub(1)), grid) + 1
}

/// The place of `chunk` in Z order: the bits of its z, y and x indices interleaved (z highest).
fn z_order(chunk: [u64; 3]) -> u64 {
    // 21 bits per axis fill 63 bits: two million chunks along an axis.
    let mut place = 0u64;
    for bit in 0..21 {
        for (k, &index) in chunk.iter().enumerate() {
            place |= ((index >> bit) & 1) << (3 * bit + 2 - k);
        }
    }
    place
}

/// Plans with more tiles than this split chunks evenly instead (the search below evaluates
/// every tile a few hundred times).
const BALANCED_SPLIT_MAX_TILES: usize = 50_000;

/// Cut points in `order` of the runs of `world_size` ranks over a grid of `grid` chunks
/// (`world_size + 1` places, from 0 to [`order_end`]), and the largest number of tiles a rank
/// then processes: the cuts that make it smallest, found by a binary search on that count with
/// greedy runs; even chunk counts for very large plans.
fn balanced_cuts(plan: &TilePlan, chunk_shape: [usize; 3], grid: [u64; 3], order: RunOrder, world_size: usize) -> (Vec<u64>, usize) {
    let total = order_end(grid, order);
    if world_size <= 1 {
        return (vec![0, total], plan.len());
    }
    // Per tile, the places of the chunks it touches, ascending.
    let touched: Vec<Vec<u64>> = (0..plan.len())
        .map(|i| {
            let mut places: Vec<u64> = chunks_meeting(plan.region(i), chunk_shape).map(|c| order.place(c, grid)).collect();
            places.sort_unstable();
            places
        })
        .collect();
    // Tiles a rank owning places `a..b` processes.
    let tiles_for = |a: u64, b: u64| -> usize {
        touched
            .iter()
            .filter(|places| {
                let i = places.partition_point(|&p| p < a);
                i < places.len() && places[i] < b
            })
            .count()
    };
    let busiest = |cuts: &[u64]| cuts.windows(2).map(|w| tiles_for(w[0], w[1])).max().unwrap_or(0);
    if plan.len() > BALANCED_SPLIT_MAX_TILES {
        let mut places: Vec<u64> = grid_cells(grid).map(|c| order.place(c, grid)).collect();
        places.sort_unstable();
        let n = places.len();
        let cuts: Vec<u64> = (0..=world_size)
            .map(|r| {
                if r == world_size {
                    total
                } else {
                    places.get(r * n / world_size).copied().unwrap_or(total)
                }
            })
            .collect();
        let most = busiest(&cuts);
        return (cuts, most);
    }
    // Greedy runs of at most `most` tiles each; None when `world_size` runs do not cover all.
    let runs_within = |most: usize| -> Option<Vec<u64>> {
        let mut cuts = vec![0u64];
        let mut start = 0u64;
        for _ in 0..world_size {
            if start < total {
                if tiles_for(start, start + 1) > most {
                    return None;
                }
                // The furthest end whose run stays within `most` (tile counts grow with the end).
                let (mut lo, mut hi) = (start + 1, total);
                while lo < hi {
                    let mid = lo + (hi - lo).div_ceil(2);
                    if tiles_for(start, mid) <= most {
                        lo = mid;
                    } else {
                        hi = mid - 1;
                    }
                }
                start = lo;
            }
            cuts.push(start);
        }
        (start == total).then_some(cuts)
    };
    let (mut lo, mut hi) = (1usize, plan.len().max(1));
    while lo < hi {
        let mid = (lo + hi) / 2;
        if runs_within(mid).is_some() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    // A run of every tile always fits, so the search ends on cuts that exist; else rank 0 all.
    let cuts = runs_within(lo).unwrap_or_else(|| (0..=world_size).map(|r| if r == 0 { 0 } else { total }).collect());
    let most = busiest(&cuts);
    (cuts, most)
}

/// The chunk a mark's file name names (`z.y.x`), or `None` for other files.
fn parse_mark(name: &str) -> Option<[u64; 3]> {
    let mut parts = name.split('.').map(|p| p.parse::<u64>().ok());
    let chunk = [parts.next()??, parts.next()??, parts.next()??];
    parts.next().is_none().then_some(chunk)
}

/// What the marks depend on: the array, chunk and tile geometry, blending, element type.
fn plan_fingerprint(config: &WriterConfig) -> String {
    let tiling = config.tiling.as_ref();
    serde_json::json!({
        "shape": config.array_shape(),
        "chunks": config.chunk_shape,
        "tile": config.write_shape,
        "overlap": tiling.map(|t| t.overlap),
        "blend": tiling.map(|t| format!("{:?}", t.blend)),
        "dtype": config.dtype.name(),
        "fill_value": if config.fill_value.is_nan() { None } else { Some(config.fill_value) },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::Blend;

    /// Per rank, the tiles touching its chunks (runs of Z order).
    fn tiles_per_rank(plan: &TilePlan, chunk_shape: [usize; 3], cuts: &[u64]) -> Vec<usize> {
        (0..cuts.len() - 1)
            .map(|r| {
                (0..plan.len())
                    .filter(|&i| chunks_meeting(plan.region(i), chunk_shape).any(|c| (cuts[r]..cuts[r + 1]).contains(&z_order(c))))
                    .count()
            })
            .collect()
    }

    #[test]
    fn z_order_interleaves_the_bits_with_z_highest() {
        assert_eq!(z_order([0, 0, 1]), 1);
        assert_eq!(z_order([0, 1, 0]), 2);
        assert_eq!(z_order([1, 0, 0]), 4);
        assert_eq!(z_order([0, 0, 2]), 8);
        assert_eq!(z_order([3, 3, 3]), 63);
        assert_eq!(z_order([1 << 20, 0, 0]), 1 << 62);
    }

    #[test]
    fn ranks_split_the_chunks_so_the_busiest_rank_has_the_fewest_tiles() {
        // 320 voxels per axis, 64³ tiles stepping by 48, 64³ chunks: 343 tiles, 125 chunks.
        let plan = TilePlan::new([320; 3], [64; 3], [16; 3], Blend::Linear);
        let grid = [5u64; 3];
        let total = z_order([4, 4, 4]) + 1;
        let (cuts, busiest) = balanced_cuts(&plan, [64; 3], grid, RunOrder::Z, 2);
        assert_eq!((cuts[0], cuts[2]), (0, total));
        assert_eq!(busiest, *tiles_per_rank(&plan, [64; 3], &cuts).iter().max().unwrap());
        // Even chunk counts in Z order give more to the busiest rank.
        let mut places: Vec<u64> = grid_cells(grid).map(z_order).collect();
        places.sort_unstable();
        let even = tiles_per_rank(&plan, [64; 3], &[0, places[62], total]);
        assert!(busiest < *even.iter().max().unwrap(), "{busiest} against {even:?}");
        // Every chunk has one owner, whatever the number of ranks.
        for world in [1, 3, 7, 200] {
            for order in [RunOrder::Z, RunOrder::Blocks([2; 3]), RunOrder::Blocks([1; 3])] {
                let (cuts, _) = balanced_cuts(&plan, [64; 3], grid, order, world);
                assert_eq!(cuts.len(), world + 1);
                let end = order_end(grid, order);
                assert!(cuts.windows(2).all(|w| w[0] <= w[1]) && cuts[0] == 0 && cuts[world] == end);
            }
        }
        // C order (slabs) beats Z order for two ranks on this odd grid; Z order for eight.
        let slabs = balanced_cuts(&plan, [64; 3], grid, RunOrder::Blocks([1; 3]), 2).1;
        assert!(slabs < busiest, "{slabs} {busiest}");
    }

    #[test]
    fn runs_split_at_most_one_block_per_cut_and_z_order_runs_are_compact() {
        for (shape, tile, overlap) in [
            ([320u64, 320, 320], [64usize; 3], [16usize; 3]),
            ([40, 56, 72], [8; 3], [2; 3]),
            ([1, 100, 36], [1, 8, 8], [0, 0, 0]),
            ([24, 200, 24], [8; 3], [0; 3]),
        ] {
            let plan = TilePlan::new(shape, tile, overlap, Blend::Linear);
            let grid: [u64; 3] = std::array::from_fn(|k| shape[k].div_ceil(tile[k] as u64));
            let chunks: Vec<[u64; 3]> = grid_cells(grid).collect();
            let block: [u64; 3] = std::array::from_fn(|k| if shape[k] > 1 { 2 } else { 1 });
            for (world, order) in (1..=5).flat_map(|w| [(w, RunOrder::Z), (w, RunOrder::Blocks(block))]) {
                let (cuts, _) = balanced_cuts(&plan, tile, grid, order, world);
                assert_eq!(cuts.len(), world + 1);
                assert!(cuts.windows(2).all(|w| w[0] <= w[1]));
                let owner = |c: [u64; 3]| cuts[1..].partition_point(|&end| end <= order.place(c, grid));
                assert!(chunks.iter().all(|&c| owner(c) < world));
                // Blocks (the chunks under one chunk of the next level) with chunks of two
                // ranks: at most one per cut.
                let mut mixed = 0;
                for b in chunks.iter().filter(|c| (0..3).all(|k| c[k] % block[k] == 0)) {
                    let mut owners: Vec<usize> = chunks
                        .iter()
                        .filter(|c| (0..3).all(|k| c[k] / block[k] == b[k] / block[k]))
                        .map(|&c| owner(c))
                        .collect();
                    owners.sort_unstable();
                    owners.dedup();
                    mixed += usize::from(owners.len() > 1);
                }
                assert!(mixed < world, "{shape:?} world {world}: {mixed} blocks shared");
            }
        }
        // Many ranks over a large cube: Z-order runs are boxes, so the busiest rank predicts
        // at least 10 % fewer tiles than with slabs of C order.
        let plan = TilePlan::new([1024; 3], [64; 3], [16; 3], Blend::Linear);
        let z = balanced_cuts(&plan, [64; 3], [16; 3], RunOrder::Z, 8).1;
        let slabs = balanced_cuts(&plan, [64; 3], [16; 3], RunOrder::Blocks([1; 3]), 8).1;
        assert!(z * 10 < slabs * 9, "Z order {z}, C order {slabs}");
    }

    #[test]
    fn marks_name_chunks_and_nothing_else() {
        assert_eq!(parse_mark("3.0.12"), Some([3, 0, 12]));
        assert_eq!(parse_mark("plan.json"), None);
        assert_eq!(parse_mark("1.2"), None);
        assert_eq!(parse_mark("1.2.3.4"), None);
        assert_eq!(parse_mark(".3.0.12.partial"), None);
    }
}
