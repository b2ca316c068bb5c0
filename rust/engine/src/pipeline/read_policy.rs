//! What a batch read does when one sample's read fails: raise (the default), retry transient
//! I/O errors with backoff, or skip the sample in favour of a replacement drawn from the keyed
//! streams (so the same seed gives the same replacements). Every retry and skip is recorded as
//! a [`ReadIncident`] on the batch, for the caller to count and report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};

/// What a read does when a sample's read fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadErrorPolicy {
    /// The batch fails with the error (default).
    #[default]
    Raise,
    /// The sample is replaced by another sample of the same dataset, drawn from the seed.
    Skip,
    /// Transient I/O errors (EIO, EAGAIN, timeouts, interrupted calls) are retried with backoff
    /// before the batch fails.
    Retry,
}

/// Waits between retries of a transient error: about 1.5 s in all before giving up.
pub const RETRY_DELAYS: [Duration; 5] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
];

/// Replacements tried for one failing sample before the batch fails with the last error.
pub const MAX_REPLACEMENTS: u32 = 16;

/// One read that failed and was retried or replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadIncident {
    /// Position of the sample in its batch.
    pub position: usize,
    /// `retried` (a transient error, read again) or `skipped` (replaced by another sample).
    pub action: &'static str,
    /// Dataset name of the sample that failed.
    pub dataset: String,
    /// Its index within the dataset.
    pub index: u64,
    /// Its world centre (nm).
    pub centre: [f64; 3],
    /// The error (naming the path).
    pub message: String,
}

/// Runs `read`, retrying it after [`RETRY_DELAYS`] while it fails with a transient error and
/// the policy is [`ReadErrorPolicy::Retry`]; `on_retry` hears of each retried error. A raised
/// `cancel` flag ends the wait with [`Error::Interrupted`].
pub fn with_retries<T>(
    policy: ReadErrorPolicy,
    cancel: Option<&AtomicBool>,
    mut read: impl FnMut() -> Result<T>,
    mut on_retry: impl FnMut(&Error),
) -> Result<T> {
    let mut delays = RETRY_DELAYS.iter();
    loop {
        match read() {
            Err(e) if policy == ReadErrorPolicy::Retry && e.is_transient() => match delays.next() {
                Some(delay) => {
                    on_retry(&e);
                    sleep_unless_cancelled(*delay, cancel)?;
                }
                None => return Err(e),
            },
            other => return other,
        }
    }
}

fn sleep_unless_cancelled(delay: Duration, cancel: Option<&AtomicBool>) -> Result<()> {
    let step = Duration::from_millis(10);
    let mut left = delay;
    while !left.is_zero() {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Interrupted);
        }
        let nap = left.min(step);
        std::thread::sleep(nap);
        left -= nap;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eio() -> Error {
        Error::io("a/0.0.0", std::io::Error::from_raw_os_error(5))
    }

    #[test]
    fn retry_reads_again_only_transient_errors_and_only_when_asked() {
        let mut calls = 0;
        let mut heard = 0;
        let out = with_retries(
            ReadErrorPolicy::Retry,
            None,
            || {
                calls += 1;
                if calls < 3 {
                    Err(eio())
                } else {
                    Ok(7)
                }
            },
            |_| heard += 1,
        );
        assert_eq!((out.unwrap(), calls, heard), (7, 3, 2));
        let mut calls = 0;
        let raised = with_retries(
            ReadErrorPolicy::Raise,
            None,
            || -> Result<()> {
                calls += 1;
                Err(eio())
            },
            |_| {},
        );
        assert!(raised.is_err() && calls == 1);
        let mut calls = 0;
        let corrupt = with_retries(
            ReadErrorPolicy::Retry,
            None,
            || -> Result<()> {
                calls += 1;
                Err(Error::decode("a/0.0.0", "bad bytes"))
            },
            |_| {},
        );
        assert!(corrupt.is_err() && calls == 1, "a corrupt chunk is not transient");
    }

    #[test]
    fn retries_give_up_after_the_last_delay_and_stop_when_cancelled() {
        let mut calls = 0;
        let cancel = AtomicBool::new(true);
        let out = with_retries(
            ReadErrorPolicy::Retry,
            Some(&cancel),
            || -> Result<()> {
                calls += 1;
                Err(eio())
            },
            |_| {},
        );
        assert!(matches!(out, Err(Error::Interrupted)) && calls == 1);
    }
}
