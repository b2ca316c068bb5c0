//! Rank 0's close of a job written by several ranks, as one engine call: each image (one per
//! class) builds rank 0's share of its second level, then the call waits until every rank's
//! chunks and second-level shares are marked on disk, and says how the work was shared. The
//! images' own `close` then builds what is left of each pyramid.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::ImageWriter;
use crate::error::{Error, Result};

/// What the ranks wrote, over every image of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RanksDone {
    /// Complete chunks of the first levels.
    pub done: u64,
    /// Chunks of the first levels.
    pub total: u64,
    /// Complete chunks per rank that wrote them.
    pub by_rank: BTreeMap<usize, u64>,
}

/// Flushes rank 0's `writers` and builds its shares of their second levels, then waits (up to
/// `timeout_s` seconds: finite, not negative) until every rank has completed its chunks and
/// shares. `interrupted` is asked
/// between polls (a Ctrl-C ends the wait). The error after `timeout` names `job`, the chunks
/// still missing, the chunks per rank and the second-level chunks built: a rank has probably
/// died, and a restart with the same arguments resumes.
pub fn finish_ranks(writers: &[&ImageWriter], job: &str, timeout_s: f64, interrupted: &dyn Fn() -> bool) -> Result<RanksDone> {
    if !(timeout_s.is_finite() && timeout_s >= 0.0) {
        return Err(Error::invalid(format!(
            "timeout must be a non-negative number of seconds, not {timeout_s}"
        )));
    }
    let timeout = Duration::from_secs_f64(timeout_s);
    // The writes on the engine's threads; the wait on the caller's (which can see a Ctrl-C).
    crate::runtime::install(|| {
        writers.iter().try_for_each(|writer| {
            writer.flush()?;
            writer.downsample_own_share()
        })
    })?;
    let start = Instant::now();
    loop {
        if all_complete(writers)? {
            return ranks_done(writers);
        }
        let waited = start.elapsed();
        if waited > timeout {
            return Err(timed_out(writers, job, timeout)?);
        }
        if interrupted() {
            return Err(Error::Interrupted);
        }
        // Soon after the last rank at first; in long waits at most 5 % of the time waited
        // late, and at most once a second.
        std::thread::sleep(waited.mul_f64(0.05).clamp(Duration::from_millis(5), Duration::from_secs(1)));
    }
}

fn all_complete(writers: &[&ImageWriter]) -> Result<bool> {
    let complete = |counts: Option<(u64, u64)>| counts.is_none_or(|(done, total)| done >= total);
    for writer in writers {
        if !complete(writer.chunks_done()?) || !complete(writer.shares_built()?) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn ranks_done(writers: &[&ImageWriter]) -> Result<RanksDone> {
    let mut done = RanksDone {
        done: 0,
        total: 0,
        by_rank: BTreeMap::new(),
    };
    for writer in writers {
        if let Some((per_rank, total)) = writer.progress()? {
            for (rank, chunks) in per_rank {
                *done.by_rank.entry(rank).or_default() += chunks;
                done.done += chunks;
            }
            done.total += total;
        }
    }
    Ok(done)
}

fn timed_out(writers: &[&ImageWriter], job: &str, timeout: Duration) -> Result<Error> {
    let done = ranks_done(writers)?;
    let by_rank: Vec<String> = done.by_rank.iter().map(|(rank, n)| format!("rank {rank}: {n}")).collect();
    // The second level's chunks built, per level name, over every image.
    let mut levels: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for writer in writers {
        if let (Some((built, total)), Some(level)) = (writer.levels_done()?, writer.levels.get(1)) {
            let entry = levels.entry(level.name.clone()).or_default();
            entry.0 += built;
            entry.1 += total;
        }
    }
    let levels: String = levels
        .iter()
        .filter(|(_, (built, total))| built < total)
        .map(|(name, (built, total))| format!("; {name}: {built} of {total} chunks built"))
        .collect();
    Ok(Error::TimedOut(format!(
        "{job}: {} of {} chunks are still missing after {:.0} s (chunks by rank: {}{levels}); a rank may have died: \
         restart the job with the same arguments to resume",
        done.total - done.done,
        done.total,
        timeout.as_secs_f64(),
        if by_rank.is_empty() {
            "none".to_string()
        } else {
            by_rank.join(", ")
        },
    )))
}
