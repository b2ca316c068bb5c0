//! Which output chunks of a planned (tiled) image are complete, and which a rank owns.
//!
//! A chunk of the first level that received every planned tile touching it is written, then
//! marked complete by a small file `<image>/.cellmap-progress/<z>.<y>.<x>` (written atomically,
//! holding the rank that wrote it). A job restarted with the same plan skips complete chunks, so
//! a killed job resumes where it stopped; `status()` counts the marks while a job runs. The plan
//! the marks belong to is recorded next to them (`plan.json`), and a different plan refuses to
//! resume from them.
//!
//! With several ranks, each owns a contiguous run of chunks in C order (whole chunks: a rank
//! processes every tile touching its chunks and keeps only its own chunks' share), so each
//! chunk is summed by one process in tile order, exactly as a one-rank run sums it.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::PathBuf;

use serde::Deserialize;

use super::config::WriterConfig;
use super::store::write_atomic;
use crate::error::{Error, Result};

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
    dir: PathBuf,
    done_at_open: HashSet<[u64; 3]>,
    shard: Shard,
    grid: [u64; 3],
    fsync: bool,
}

const PLAN_FILE: &str = "plan.json";

impl Progress {
    /// The marks of the image at `config.path` (chunk grid `grid`): read back when writing into
    /// an existing image (`exist_ok`), started afresh otherwise.
    pub(super) fn open(config: &WriterConfig, grid: [u64; 3]) -> Result<Progress> {
        let dir = config.path.join(".cellmap-progress");
        let plan = plan_fingerprint(config);
        let plan_path = dir.join(PLAN_FILE);
        let mut done_at_open = HashSet::new();
        match fs::read_to_string(&plan_path) {
            Ok(stored) if config.exist_ok => {
                if stored != plan {
                    return Err(Error::invalid(format!(
                        "{}: the image's completed chunks were written with another plan ({stored}); this writer's plan is {plan}. Pass overwrite=True to start again",
                        plan_path.display()
                    )));
                }
                for entry in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                    let entry = entry.map_err(|e| Error::io(&dir, e))?;
                    if let Some(chunk) = parse_mark(&entry.file_name().to_string_lossy()) {
                        done_at_open.insert(chunk);
                    }
                }
            }
            _ => {
                if !config.exist_ok && dir.exists() {
                    fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                }
                write_atomic(&plan_path, plan.as_bytes(), config.fsync).map_err(|e| Error::io(&plan_path, e))?;
            }
        }
        let shard = config.shard.unwrap_or(Shard { rank: 0, world_size: 1 });
        Ok(Progress {
            dir,
            done_at_open,
            shard,
            grid,
            fsync: config.fsync,
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

    /// The rank that owns `chunk`: contiguous runs of chunks in C order, as even as can be.
    fn owner(&self, chunk: [u64; 3]) -> usize {
        let flat = (chunk[0] * self.grid[1] + chunk[1]) * self.grid[2] + chunk[2];
        ((flat as u128 * self.shard.world_size as u128) / self.total() as u128) as usize
    }

    /// Whether this process writes `chunk`: it owns it and it was not complete at open.
    pub(super) fn writes(&self, chunk: [u64; 3]) -> bool {
        self.owner(chunk) == self.shard.rank && !self.done_at_open.contains(&chunk)
    }

    /// Marks `chunk` complete (after it was written).
    pub(super) fn mark_done(&self, chunk: [u64; 3]) -> Result<()> {
        let path = self.dir.join(format!("{}.{}.{}", chunk[0], chunk[1], chunk[2]));
        write_atomic(&path, self.shard.rank.to_string().as_bytes(), self.fsync).map_err(|e| Error::io(&path, e))
    }

    /// Complete chunks now, per rank that wrote them (every process's marks, read from disk).
    pub(super) fn done_by_rank(&self) -> Result<BTreeMap<usize, u64>> {
        let mut out = BTreeMap::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&self.dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            if parse_mark(&entry.file_name().to_string_lossy()).is_some() {
                // A mark is written whole (renamed into place); an unreadable one still counts.
                let rank = fs::read_to_string(entry.path())
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                *out.entry(rank).or_insert(0) += 1;
            }
        }
        Ok(out)
    }
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

    #[test]
    fn marks_name_chunks_and_nothing_else() {
        assert_eq!(parse_mark("3.0.12"), Some([3, 0, 12]));
        assert_eq!(parse_mark("plan.json"), None);
        assert_eq!(parse_mark("1.2"), None);
        assert_eq!(parse_mark("1.2.3.4"), None);
        assert_eq!(parse_mark(".3.0.12.partial"), None);
    }
}
