//! The claim loop: one per queue, it takes as many due jobs as the queue has free slots and
//! hands each to its own task ([`run_job`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::attempt::run_job;
use super::housekeeping::maintenance;
use super::results::{flush, FinishMsg};
use super::{sleep_or, Run};
use crate::{ClaimRequest, ClaimedJob, ErrorChain, Finish, Outcome};

pub(super) async fn claim_loop(run: Arc<Run>, queue: String, concurrency: usize) {
    let inner = &run.inner;
    let cfg = inner.config;
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut seen = 0u64;
    let mut backoff = Duration::from_millis(100);
    let mut quiet_rounds = 0u32;
    loop {
        if run.draining.is_cancelled() {
            break;
        }
        let mut permits: OwnedSemaphorePermit = tokio::select! {
            biased;
            _ = run.draining.cancelled() => break,
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        if run.draining.is_cancelled() {
            break;
        }
        let want = (sem.available_permits() + 1).min(cfg.claim_batch);
        if want > 1 {
            if let Ok(more) = sem.clone().try_acquire_many_owned((want - 1) as u32) {
                permits.merge(more);
            }
        }
        let want = permits.num_permits();
        let req = ClaimRequest {
            queue: &queue,
            names: &inner.names,
            limit: want,
            lease: cfg.lease,
        };
        let claimed = match inner.backend.claim(req).await {
            Ok(c) => {
                backoff = Duration::from_millis(100);
                c
            }
            Err(e) => {
                drop(permits);
                tracing::warn!(queue = %queue, error = %ErrorChain(&e), retry_in = ?backoff, "claim failed");
                if !sleep_or(&run.draining, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(cfg.max_error_backoff);
                continue;
            }
        };
        let got = claimed.len();
        if run.draining.is_cancelled() {
            // The shutdown began while the claim was in flight: hand the jobs back unstarted.
            release_unstarted(&run, claimed).await;
            break;
        }
        for job in claimed {
            // `got <= want`: each job takes one of the permits acquired for this claim.
            let Some(permit) = permits.split(1) else {
                tracing::error!(queue = %queue, "backend returned more jobs than asked; handing the extra back");
                let _ = run
                    .finish_tx
                    .send(FinishMsg::Item(Finish {
                        id: job.job.id,
                        token: job.token,
                        outcome: Outcome::Release,
                    }))
                    .await;
                continue;
            };
            let run2 = run.clone();
            run.tracker
                .spawn(async move { run_job(run2, job, permit).await });
        }
        drop(permits);
        if got == want {
            quiet_rounds = 0;
            continue;
        }
        if run.idle_exit {
            if got > 0 {
                quiet_rounds = 0;
                continue;
            }
            // Quiesce: wait for this queue's running jobs, write their results, run maintenance.
            match sem.acquire_many(concurrency as u32).await {
                Ok(all) => drop(all),
                Err(_) => break,
            }
            flush(&run).await;
            let m = maintenance(&cfg);
            if let Err(e) = inner.backend.maintain(&m).await {
                tracing::warn!(error = %ErrorChain(&e), "maintenance failed");
            }
            quiet_rounds += 1;
            if quiet_rounds >= 2 {
                break;
            }
            continue;
        }
        let wait = inner.backend.wait(&queue, seen, cfg.poll_interval);
        tokio::select! {
            r = wait => match r {
                Ok(s) => seen = s,
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %ErrorChain(&e), "wake-up signal failed; polling");
                    if !sleep_or(&run.draining, cfg.poll_interval.min(backoff)).await {
                        break;
                    }
                }
            },
            _ = run.draining.cancelled() => break,
        }
    }
}

async fn release_unstarted(run: &Run, claimed: Vec<ClaimedJob>) {
    for c in claimed {
        let _ = run
            .finish_tx
            .send(FinishMsg::Item(Finish {
                id: c.job.id,
                token: c.token,
                outcome: Outcome::Release,
            }))
            .await;
    }
}
