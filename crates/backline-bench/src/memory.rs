//! The memory provider's raw limit: its store driven directly, without Backline's server or
//! manager, in the same run as the other rows.
//!
//! The server's drain is compared with `claim` + `finish` in the batch sizes it uses (256 at
//! concurrency 256, 1 at concurrency 1); batch enqueue is compared with `push` of 1,000.

use std::time::{Duration, Instant};

use backline_core::{
    Backend, ClaimRequest, EnqueueOptions, Finish, JobArgs, JobManager, NewJob, Outcome,
};
use backline_memory::MemoryBackend;

use crate::measure::Noop;
use crate::report::{thousands, Row, Unit};
use crate::{Plan, Result};

/// The jobs of one run, encoded by the manager as an enqueue would, in batches (not timed).
fn new_jobs(n: usize, batch: usize) -> Result<Vec<Vec<NewJob>>> {
    let manager = JobManager::new(MemoryBackend::new());
    let mut batches = Vec::with_capacity(n.div_ceil(batch));
    let mut left = n;
    while left > 0 {
        let k = left.min(batch);
        batches.push(
            (0..k)
                .map(|_| manager.prepare(&Noop, EnqueueOptions::new()))
                .collect::<backline_core::Result<Vec<_>>>()?,
        );
        left -= k;
    }
    Ok(batches)
}

/// `push` of `n` jobs, `batch` at a time; jobs/s.
async fn push(n: usize, batch: usize) -> Result<f64> {
    let backend = MemoryBackend::new();
    let batches = new_jobs(n, batch)?;
    let start = Instant::now();
    for jobs in batches {
        backend.push(jobs).await?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

/// `claim` of `batch` jobs then one `finish` of them (deleted, as with a retention of zero),
/// until `n` pushed jobs are done; jobs/s.
async fn claim_finish(n: usize, batch: usize) -> Result<f64> {
    let backend = MemoryBackend::new();
    for jobs in new_jobs(n, 1_000)? {
        backend.push(jobs).await?;
    }
    let names = vec![Noop::NAME.to_owned()];
    let req = ClaimRequest::new(
        backline_core::DEFAULT_QUEUE,
        &names,
        batch,
        Duration::from_secs(30),
    );
    let mut done = 0;
    let mut results = Vec::with_capacity(batch);
    let start = Instant::now();
    loop {
        let claimed = backend.claim(req).await?;
        if claimed.is_empty() {
            break;
        }
        results.clear();
        results.extend(
            claimed
                .into_iter()
                .map(|c| Finish::new(c.job.id, c.token, Outcome::Succeeded { keep: false })),
        );
        let applied = backend.finish(&results).await?;
        done += applied.iter().filter(|a| **a).count();
    }
    let took = start.elapsed();
    if done != n {
        return Err(format!("raw claim+finish finished {done} of {n} jobs").into());
    }
    Ok(n as f64 / took.as_secs_f64().max(1e-9))
}

/// The raw rows; each run uses a fresh store.
pub(crate) async fn raw_rows(plan: &Plan) -> Result<Vec<Row>> {
    let n = plan.jobs;
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for _ in 0..plan.runs {
        runs.push(push(n, plan.batch).await?);
    }
    rows.push(Row::new(
        format!("raw_push_{}", plan.batch),
        format!("raw: push, batches of {}", thousands(plan.batch as f64)),
        n,
        Unit::JobsPerSecond,
        runs,
    ));
    let mut batches = vec![1];
    if let Some(&c) = plan.concurrencies.iter().max() {
        batches.push(c.min(1_000));
    }
    batches.dedup();
    for batch in batches.into_iter().rev() {
        let mut runs = Vec::new();
        for _ in 0..plan.runs {
            runs.push(claim_finish(n, batch).await?);
        }
        rows.push(Row::new(
            format!("raw_claim_finish_{batch}"),
            format!("raw: claim + finish, batches of {batch}"),
            n,
            Unit::JobsPerSecond,
            runs,
        ));
    }
    Ok(rows)
}
