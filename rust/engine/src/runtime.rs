//! Engine thread pools. Every parallel section runs inside one of these pools (never rayon's
//! global pool) so that a forked child process, whose copy of a pool has no threads, gets fresh
//! pools instead of hanging: pools are tagged with the process id that built them.

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

struct Tagged {
    pid: u32,
    pool: Arc<ThreadPool>,
}

static DEFAULT_POOL: Mutex<Option<Tagged>> = Mutex::new(None);

/// Threads of the default pool: `CELLMAP_NUM_THREADS`, else the number of cores.
pub fn default_threads() -> usize {
    std::env::var("CELLMAP_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// Memory this process may use: the machine's (`MemTotal` of `/proc/meminfo`), or the
/// container's limit when a cgroup sets a smaller one; `None` where neither can be read.
pub fn memory_limit() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .min();
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// Processes of this job on this machine (torchrun's `LOCAL_WORLD_SIZE`, else 1): each holds
/// caches of its own, so memory-sized budgets are shared out among them.
pub fn local_processes() -> u64 {
    std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// A cache budget: `variable` when set (bytes), else `1 / share` of this process's part of the
/// memory limit (see [`memory_limit`], [`local_processes`]), kept within `[floor, ceiling]`
/// (`floor` where the memory cannot be read).
pub fn memory_budget(variable: &str, share: u64, floor: u64, ceiling: u64) -> u64 {
    if let Some(bytes) = std::env::var(variable).ok().and_then(|v| v.trim().parse().ok()) {
        return bytes;
    }
    memory_limit().map_or(floor, |memory| (memory / share / local_processes()).clamp(floor, ceiling))
}

/// A process-wide value that a forked child builds afresh (the parent's copy may hold locks of
/// threads the child does not have): the caches' `global()`.
pub struct PerProcess<T>(Mutex<Option<(u32, Arc<T>)>>);

impl<T> PerProcess<T> {
    /// Empty until first used.
    pub const fn new() -> PerProcess<T> {
        PerProcess(Mutex::new(None))
    }

    /// This process's value, built with `make` on first use here (a parent's is forgotten,
    /// never dropped: its locks may be held).
    pub fn get(&self, make: impl FnOnce() -> T) -> Arc<T> {
        let pid = std::process::id();
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some((owner, value)) if *owner == pid => value.clone(),
            _ => {
                if let Some(inherited) = guard.take() {
                    std::mem::forget(inherited);
                }
                let value = Arc::new(make());
                *guard = Some((pid, value.clone()));
                value
            }
        }
    }
}

impl<T> Default for PerProcess<T> {
    fn default() -> Self {
        PerProcess::new()
    }
}

/// A new pool of `threads` threads named `cellmap-<role>-<i>`.
pub fn new_pool(threads: usize, role: &str) -> Result<Arc<ThreadPool>> {
    let role = role.to_string();
    ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("cellmap-{role}-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::invalid(format!("could not start engine threads: {e}")))
}

/// The process's default pool (rebuilt after a fork).
pub fn default_pool() -> Result<Arc<ThreadPool>> {
    let pid = std::process::id();
    // A poisoned lock only means another thread panicked while holding it; the pool is intact.
    let mut guard = DEFAULT_POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = guard.as_ref() {
        if t.pid == pid {
            return Ok(t.pool.clone());
        }
        // Forked child: the parent's threads do not exist here. Leak the old pool rather than
        // dropping it, since dropping would try to talk to threads that are gone.
        if let Some(old) = guard.take() {
            std::mem::forget(old);
        }
    }
    let pool = new_pool(default_threads(), "engine")?;
    *guard = Some(Tagged { pid, pool: pool.clone() });
    Ok(pool)
}

/// Runs `work` inside the default pool.
pub fn install<T: Send>(work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    default_pool()?.install(work)
}
