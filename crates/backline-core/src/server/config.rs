//! [`ServerConfig`]: the timing and sizing knobs of a job server, and their checks.

use std::time::Duration;

use crate::{Error, Result};

/// Timing and sizing knobs of a [`JobServer`](crate::JobServer); every one is configurable so
/// that tests run with leases of about a second.
#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    /// The longest idle wait between claims when no wake-up signal arrives (default 1 s;
    /// ABP polls every 5 s).
    pub poll_interval: Duration,
    /// The lease a claimed job gets (default 30 s); heartbeats extend it.
    pub lease: Duration,
    /// How often running jobs' leases are extended (default 10 s: a third of the lease).
    pub heartbeat: Duration,
    /// On shutdown, how long running jobs may finish before they are cancelled and handed back
    /// (default 10 s).
    pub grace: Duration,
    /// The most jobs one claim takes (default 100; ABP fetches up to 1,000).
    pub claim_batch: usize,
    /// The most finished attempts written in one call (default 256).
    pub finish_batch: usize,
    /// How often the maintenance runs: promotion, expired leases, retention (default 1 s).
    pub maintenance_interval: Duration,
    /// The most rows one maintenance step touches (default 1,000).
    pub maintenance_batch: usize,
    /// How long succeeded jobs are kept (default 1 h; zero deletes them at once, the fastest path).
    pub succeeded_ttl: Duration,
    /// How long dead jobs are kept (default 7 days).
    pub dead_ttl: Duration,
    /// The concurrency of a queue not given one with
    /// [`JobServerBuilder::queue`](crate::JobServerBuilder::queue) (default 16).
    pub default_concurrency: usize,
    /// The longest wait between tries while the backend fails (default 30 s; starts at 100 ms).
    pub max_error_backoff: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            grace: Duration::from_secs(10),
            claim_batch: 100,
            finish_batch: 256,
            maintenance_interval: Duration::from_secs(1),
            maintenance_batch: 1000,
            succeeded_ttl: Duration::from_secs(3600),
            dead_ttl: Duration::from_secs(7 * 24 * 3600),
            default_concurrency: 16,
            max_error_backoff: Duration::from_secs(30),
        }
    }
}

impl ServerConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        if self.lease.is_zero() {
            return bad("lease must be longer than zero");
        }
        if self.heartbeat.is_zero() || self.heartbeat >= self.lease {
            return bad("heartbeat must be shorter than the lease and longer than zero");
        }
        if self.poll_interval.is_zero() || self.maintenance_interval.is_zero() {
            return bad("poll and maintenance intervals must be longer than zero");
        }
        if self.claim_batch == 0 || self.finish_batch == 0 || self.maintenance_batch == 0 {
            return bad("batch sizes must be at least 1");
        }
        if self.default_concurrency == 0 {
            return bad("concurrency must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_valid() {
        ServerConfig::default()
            .validate()
            .expect("the default is valid");
    }

    #[test]
    fn validate_accepts_the_edges() {
        let cfg = ServerConfig {
            lease: Duration::from_millis(2),
            heartbeat: Duration::from_millis(1),
            poll_interval: Duration::from_nanos(1),
            maintenance_interval: Duration::from_nanos(1),
            claim_batch: 1,
            finish_batch: 1,
            maintenance_batch: 1,
            default_concurrency: 1,
            succeeded_ttl: Duration::ZERO, // documented: delete at once
            ..ServerConfig::default()
        };
        cfg.validate().expect("the edges are valid");
    }

    #[test]
    fn validate_refuses_each_bad_value() {
        const LEASE: &str = "lease must be longer than zero";
        const HEARTBEAT: &str = "heartbeat must be shorter than the lease and longer than zero";
        const INTERVALS: &str = "poll and maintenance intervals must be longer than zero";
        const BATCHES: &str = "batch sizes must be at least 1";
        const CONCURRENCY: &str = "concurrency must be at least 1";
        type Case = (&'static str, fn(&mut ServerConfig), &'static str);
        #[rustfmt::skip]
        let table: [Case; 11] = [
            ("zero lease", |c| c.lease = Duration::ZERO, LEASE),
            ("zero heartbeat", |c| c.heartbeat = Duration::ZERO, HEARTBEAT),
            ("heartbeat equal to the lease", |c| c.heartbeat = c.lease, HEARTBEAT),
            ("heartbeat longer than the lease", |c| c.lease = Duration::from_secs(5), HEARTBEAT),
            ("zero poll interval", |c| c.poll_interval = Duration::ZERO, INTERVALS),
            ("zero maintenance interval", |c| c.maintenance_interval = Duration::ZERO, INTERVALS),
            ("zero claim batch", |c| c.claim_batch = 0, BATCHES),
            ("zero finish batch", |c| c.finish_batch = 0, BATCHES),
            ("zero maintenance batch", |c| c.maintenance_batch = 0, BATCHES),
            ("zero default concurrency", |c| c.default_concurrency = 0, CONCURRENCY),
            ("a zero lease is reported before the heartbeat it breaks too",
                |c| { c.lease = Duration::ZERO; c.heartbeat = Duration::ZERO }, LEASE),
        ];
        for (case, change, message) in table {
            let mut cfg = ServerConfig::default();
            change(&mut cfg);
            match cfg.validate() {
                Err(Error::Config(m)) => assert_eq!(m, message, "{case}"),
                other => panic!("{case}: expected a config error, got {other:?}"),
            }
        }
    }
}
