//! Housekeeping beside the claim loops: the heartbeat that extends the leases of running jobs
//! (and cancels an attempt whose lease was lost), and the maintenance loop (promotion of
//! delayed jobs, recovery of expired leases, retention).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{sleep_or, Inner, Run, ServerConfig};
use crate::{ErrorChain, JobId, LeaseToken, Maintenance};

pub(super) fn maintenance(cfg: &ServerConfig) -> Maintenance {
    Maintenance {
        batch: cfg.maintenance_batch,
        succeeded_ttl: cfg.succeeded_ttl,
        dead_ttl: cfg.dead_ttl,
    }
}

pub(super) async fn heartbeat_loop(run: Arc<Run>, stop: CancellationToken) {
    let cfg = run.inner.config;
    loop {
        if !sleep_or(&stop, cfg.heartbeat).await {
            return;
        }
        let leases: Vec<(JobId, LeaseToken)> = match run.running.lock() {
            Ok(m) => m.iter().map(|(id, r)| (*id, r.token)).collect(),
            Err(_) => continue,
        };
        if leases.is_empty() {
            continue;
        }
        match run.inner.backend.heartbeat(&leases, cfg.lease).await {
            Ok(held) => {
                if let Ok(m) = run.running.lock() {
                    for ((id, _), ok) in leases.iter().zip(held) {
                        if !ok {
                            if let Some(r) = m.get(id) {
                                tracing::warn!(job = %id, "lease lost; cancelling the attempt");
                                r.lease_lost.store(true, Ordering::Release);
                                r.cancel.cancel();
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %ErrorChain(&e), "heartbeat failed"),
        }
    }
}

pub(super) async fn maintenance_loop(inner: Arc<Inner>, stop: CancellationToken) {
    let cfg = inner.config;
    let m = maintenance(&cfg);
    loop {
        match inner.backend.maintain(&m).await {
            Ok(report) => {
                if report.recovered > 0 || report.expired_dead > 0 {
                    tracing::warn!(
                        recovered = report.recovered,
                        dead = report.expired_dead,
                        "expired leases recovered"
                    );
                }
                if report.is_saturated(m.batch) {
                    continue;
                }
            }
            Err(e) => tracing::warn!(error = %ErrorChain(&e), "maintenance failed"),
        }
        if !sleep_or(&stop, cfg.maintenance_interval).await {
            return;
        }
    }
}
