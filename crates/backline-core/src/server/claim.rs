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

/// How many jobs one claim asks for, given the permits still `free` besides the one the loop
/// waited for: one job per permit it can hold, at most `claim_batch`, and always at least the
/// one (`claim_batch` is at least 1, [`ServerConfig::validate`](super::ServerConfig::validate)
/// sees to that). `free` is at most the semaphore's maximum, far below `usize::MAX`.
fn claim_limit(free: usize, claim_batch: usize) -> usize {
    (free + 1).min(claim_batch)
}

/// Adds to `first` (the permit the loop waited for) as many free permits of `sem` as one claim
/// may use ([`claim_limit`]); the claim then asks for one job per permit held. Only this loop
/// takes permits (job tasks give them back), so the free ones are still free; should taking
/// them fail anyway, the claim makes do with the one it has.
fn take_permits(
    sem: &Arc<Semaphore>,
    mut first: OwnedSemaphorePermit,
    claim_batch: usize,
) -> OwnedSemaphorePermit {
    let want = claim_limit(sem.available_permits(), claim_batch);
    if want > 1 {
        if let Ok(more) = sem.clone().try_acquire_many_owned((want - 1) as u32) {
            first.merge(more);
        }
    }
    first
}

/// One queue's loop: wait for a free slot, claim up to as many due jobs as there are free
/// slots, start each in its own task, and wait for a wake-up when the queue ran dry (with
/// `run_until_idle`: quiesce and end instead).
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
        let first: OwnedSemaphorePermit = tokio::select! {
            biased;
            _ = run.draining.cancelled() => break,
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        if run.draining.is_cancelled() {
            break;
        }
        let mut permits = take_permits(&sem, first, cfg.claim_batch);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_asks_for_one_job_per_permit_up_to_the_batch() {
        #[rustfmt::skip]
        let table = [
            // (free besides the first, claim_batch, jobs asked for)
            (0, 100, 1),   // no other slot free: the one the loop waited for
            (5, 100, 6),   // every free slot
            (98, 100, 99),
            (99, 100, 100), // exactly the batch
            (100, 100, 100),
            (500, 100, 100), // more free than the batch: the batch
            (0, 1, 1),     // a batch of one
            (15, 1, 1),
        ];
        for (free, batch, want) in table {
            assert_eq!(claim_limit(free, batch), want, "free {free}, batch {batch}");
        }
    }

    #[test]
    fn take_permits_holds_what_the_claim_asks_for() {
        #[rustfmt::skip]
        let table = [
            // (concurrency, held by running jobs, claim_batch, permits for the claim)
            (16, 0, 100, 16), // all free, batch larger: every slot
            (16, 0, 4, 4),    // all free, batch smaller: the batch
            (16, 10, 100, 6), // some running: what is left
            (16, 15, 100, 1), // one left: that one
            (1, 0, 100, 1),   // concurrency one
            (16, 0, 1, 1),    // batch one
        ];
        for (concurrency, running, batch, want) in table {
            let sem = Arc::new(Semaphore::new(concurrency));
            let busy = match running {
                0 => None,
                n => Some(sem.clone().try_acquire_many_owned(n).expect("free permits")),
            };
            let first = sem.clone().try_acquire_owned().expect("a free permit");
            let permits = take_permits(&sem, first, batch);
            let case = format!("concurrency {concurrency}, running {running}, batch {batch}");
            assert_eq!(permits.num_permits(), want, "{case}");
            assert_eq!(
                sem.available_permits(),
                concurrency - running as usize - want,
                "{case}"
            );
            drop((permits, busy));
            assert_eq!(sem.available_permits(), concurrency, "{case}: all returned");
        }
    }

    #[test]
    fn each_claimed_job_takes_one_permit_and_the_rest_go_back() {
        let sem = Arc::new(Semaphore::new(8));
        let first = sem.clone().try_acquire_owned().expect("a free permit");
        let mut permits = take_permits(&sem, first, 100);
        assert_eq!(permits.num_permits(), 8);
        // The backend returned 3 of the 8 jobs asked for: each takes one permit ...
        let jobs: Vec<_> = (0..3)
            .map(|_| permits.split(1).expect("a permit per job"))
            .collect();
        assert_eq!(permits.num_permits(), 5);
        // ... and dropping the rest frees the slots for the next claim at once.
        drop(permits);
        assert_eq!(sem.available_permits(), 5);
        drop(jobs);
        assert_eq!(sem.available_permits(), 8);
    }
}
