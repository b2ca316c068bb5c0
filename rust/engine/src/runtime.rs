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
