//! Fault injection for the reliability tests, in debug builds only (release builds compile
//! [`check`] to nothing and [`inject`] refuses): the next `count` chunk reads of arrays whose
//! path contains a pattern fail with EIO (a transient I/O error) or panic inside the read.

use std::path::Path;

use crate::error::{Error, Result};

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The read fails with EIO.
    Eio,
    /// The read panics (as a bug in a kernel would).
    Panic,
}

impl FaultKind {
    /// Parses `eio` or `panic`.
    pub fn parse(name: &str) -> Result<FaultKind> {
        match name {
            "eio" => Ok(FaultKind::Eio),
            "panic" => Ok(FaultKind::Panic),
            other => Err(Error::invalid(format!("fault kind must be 'eio' or 'panic', not '{other}'"))),
        }
    }
}

#[cfg(debug_assertions)]
mod active {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use super::FaultKind;

    pub struct Fault {
        pub kind: FaultKind,
        pub pattern: String,
        pub remaining: u64,
    }

    pub static ARMED: AtomicBool = AtomicBool::new(false);
    pub static FAULT: Mutex<Option<Fault>> = Mutex::new(None);

    pub fn set(fault: Option<Fault>) {
        let mut slot = FAULT.lock().unwrap_or_else(|e| e.into_inner());
        ARMED.store(fault.is_some(), Ordering::Release);
        *slot = fault;
    }
}

/// Tests that arm faults hold this: there is one process-wide fault slot.
#[cfg(test)]
pub static TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether this build can inject faults (debug builds).
pub fn available() -> bool {
    cfg!(debug_assertions)
}

/// Arms a fault: the next `count` chunk reads of arrays whose path contains `pattern` fail
/// with `kind`. Replaces any armed fault.
pub fn inject(kind: FaultKind, pattern: &str, count: u64) -> Result<()> {
    #[cfg(debug_assertions)]
    {
        active::set(Some(active::Fault {
            kind,
            pattern: pattern.to_string(),
            remaining: count,
        }));
        Ok(())
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = (kind, pattern, count);
        Err(Error::invalid("fault injection exists only in debug builds of the engine"))
    }
}

/// Disarms any fault.
pub fn clear() {
    #[cfg(debug_assertions)]
    active::set(None);
}

/// Called before each chunk read of the array at `path`: fails or panics when an armed fault
/// matches.
#[inline]
pub fn check(path: &Path) -> Result<()> {
    #[cfg(debug_assertions)]
    {
        use std::sync::atomic::Ordering;
        if !active::ARMED.load(Ordering::Acquire) {
            return Ok(());
        }
        let kind = {
            let mut slot = active::FAULT.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_mut() {
                Some(f) if f.remaining > 0 && path.to_string_lossy().contains(&f.pattern) => {
                    f.remaining -= 1;
                    Some(f.kind)
                }
                _ => None,
            }
        };
        match kind {
            Some(FaultKind::Eio) => return Err(Error::io(path, std::io::Error::from_raw_os_error(5))),
            Some(FaultKind::Panic) => panic!("injected fault while reading a chunk of {}", path.display()),
            None => {}
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armed_faults_fire_count_times_on_matching_paths_only() {
        let _one_at_a_time = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        inject(FaultKind::Eio, "faults-test-array", 2).unwrap();
        assert!(check(Path::new("/data/other/s0")).is_ok());
        let e = check(Path::new("/data/faults-test-array/s0")).unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(check(Path::new("/data/faults-test-array/s0")).is_err());
        assert!(check(Path::new("/data/faults-test-array/s0")).is_ok());
        clear();
        assert!(FaultKind::parse("fire").is_err());
    }
}
