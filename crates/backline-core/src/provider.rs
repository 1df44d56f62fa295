//! A toolkit for provider authors: the pieces every [`Backend`](crate::Backend) needs and that
//! would otherwise be written once per provider.
//!
//! Applications do not need this module. A provider crate uses it for:
//! - [`WakeSignals`]: per-queue wake-up counters behind [`Backend::wait`](crate::Backend::wait);
//! - [`lock_unpoisoned`]: a mutex guard that survives a panic in another holder;
//! - [`saturating_add`], [`micros`], [`millis`]: time arithmetic that never panics or wraps;
//! - the error constructors [`Error::connection`], [`Error::backend`] and
//!   [`Error::unsupported`](crate::Error::unsupported);
//! - [`lease_expired`] and its parts, the one text a job gets when its worker was lost (bound
//!   into SQL statements and Lua scripts as parameters, so that every provider says the same);
//! - [`NewJob::validate`](crate::NewJob::validate), the checks every way into a store runs.
//!
//! ```
//! use backline_core::provider::{lease_expired, saturating_add, WakeSignals};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let signals = WakeSignals::default();
//! let seen = signals.current("default");
//! signals.bump("default");
//! // A waiter that saw an older counter returns at once with the new one.
//! assert_ne!(signals.wait("default", seen, Duration::from_secs(5)).await, seen);
//!
//! assert_eq!(
//!     lease_expired(25, 25),
//!     "lease expired: the worker was lost during attempt 25 of 25"
//! );
//! let far = saturating_add(chrono::DateTime::<chrono::Utc>::MAX_UTC, Duration::from_secs(1));
//! assert_eq!(far, chrono::DateTime::<chrono::Utc>::MAX_UTC);
//! # }
//! ```

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::{BoxError, Error};

/// Per-queue wake-up counters: a push bumps its queue's counter, and [`WakeSignals::wait`]
/// returns as soon as the counter differs from the one the caller saw (the `seen` protocol of
/// [`Backend::wait`](crate::Backend::wait)), so no wake-up between two waits is missed.
#[derive(Default)]
pub struct WakeSignals {
    map: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl std::fmt::Debug for WakeSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeSignals")
            .field("queues", &lock_unpoisoned(&self.map).len())
            .finish()
    }
}

impl WakeSignals {
    fn sender(&self, queue: &str) -> watch::Sender<u64> {
        let mut map = lock_unpoisoned(&self.map);
        if let Some(tx) = map.get(queue) {
            return tx.clone();
        }
        let tx = watch::channel(0).0;
        map.insert(queue.to_owned(), tx.clone());
        tx
    }

    /// The counter of `queue` now.
    pub fn current(&self, queue: &str) -> u64 {
        *self.sender(queue).borrow()
    }

    /// Wakes the waiters of one queue.
    pub fn bump(&self, queue: &str) {
        self.sender(queue).send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Wakes every waiter (after a lost connection, when notifications may have been missed).
    pub fn bump_all(&self) {
        for tx in lock_unpoisoned(&self.map).values() {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Waits until the counter of `queue` differs from `seen`, or `timeout` passes; returns the
    /// counter then.
    pub async fn wait(&self, queue: &str, seen: u64, timeout: Duration) -> u64 {
        let mut rx = self.sender(queue).subscribe();
        let current = *rx.borrow_and_update();
        if current != seen {
            return current;
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(timeout) => {}
        }
        let v = *rx.borrow();
        v
    }
}

/// Locks a mutex, taking the data even if another holder panicked: the state a provider keeps
/// behind its mutexes (maps, counters) stays consistent between statements, so a panic elsewhere
/// must not make every later call fail.
pub fn lock_unpoisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `t + d`, or the latest representable time where that overflows (a huge lease or delay).
pub fn saturating_add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The microseconds of a duration, saturating at `i64::MAX`.
pub fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The milliseconds of a duration, saturating at `i64::MAX`.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The start of the text a job gets when its lease expired: followed by the attempt number.
pub const LEASE_EXPIRED_PREFIX: &str = "lease expired: the worker was lost during attempt ";

/// Between the attempt and the maximum, when the lost attempt was the last one.
pub const LEASE_EXPIRED_OF: &str = " of ";

/// The text a job gets when its lease expired in `attempt` (of `max_attempts`): with the
/// maximum when that was the last attempt (the job is dead then), else without.
pub fn lease_expired(attempt: u32, max_attempts: u32) -> String {
    if attempt >= max_attempts {
        format!("{LEASE_EXPIRED_PREFIX}{attempt}{LEASE_EXPIRED_OF}{max_attempts}")
    } else {
        format!("{LEASE_EXPIRED_PREFIX}{attempt}")
    }
}

impl Error {
    /// An [`Error::Connection`]: the server could not be reached or the connection broke
    /// during `op`.
    pub fn connection(
        backend: &'static str,
        op: &'static str,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Connection {
            backend,
            op,
            source: source.into(),
        }
    }

    /// An [`Error::Backend`]: the backend answered `op` with an error.
    pub fn backend(backend: &'static str, op: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            backend,
            op,
            source: source.into(),
        }
    }

    /// An [`Error::Unsupported`]: the backend cannot do `what`.
    pub fn unsupported(backend: &'static str, what: &'static str) -> Self {
        Error::Unsupported { backend, what }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_expired_names_the_maximum_only_on_the_last_attempt() {
        assert_eq!(
            lease_expired(3, 25),
            "lease expired: the worker was lost during attempt 3"
        );
        assert_eq!(
            lease_expired(25, 25),
            "lease expired: the worker was lost during attempt 25 of 25"
        );
    }

    #[test]
    fn time_arithmetic_saturates() {
        assert_eq!(micros(Duration::MAX), i64::MAX);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        let t = DateTime::<Utc>::MAX_UTC;
        assert_eq!(saturating_add(t, Duration::MAX), t);
    }

    #[test]
    fn a_poisoned_mutex_still_locks() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*lock_unpoisoned(&m), 1);
    }
}
