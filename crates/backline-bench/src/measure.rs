//! The rows every provider gets: enqueue, drain and latency through Backline's own API.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use backline_core::{
    Backend, BackgroundJob, JobArgs, JobContext, JobError, JobManager, JobServer, ServerConfig,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::report::{thousands, Row, Unit};
use crate::{Plan, Provider, Result};

/// The longest the latency run waits for its last job before it fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// A job that does nothing.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Noop;

impl JobArgs for Noop {
    const NAME: &'static str = "bench.noop";
}

/// Runs [`Noop`] jobs and counts them.
struct NoopHandler(Arc<AtomicUsize>);

impl BackgroundJob for NoopHandler {
    type Args = Noop;
    async fn execute(&self, _: Noop, _: JobContext) -> std::result::Result<(), JobError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The process's reference instant: a job carries its enqueue time as nanoseconds since it.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A job that carries the instant it was enqueued.
#[derive(Debug, Serialize, Deserialize)]
struct Stamped {
    /// Nanoseconds since [`epoch`] when `enqueue` was called.
    sent: u64,
}

impl JobArgs for Stamped {
    const NAME: &'static str = "bench.stamped";
}

/// The waits seen by the handlers of one latency run.
struct Waits {
    nanos: Mutex<Vec<u64>>,
    expected: usize,
    all_seen: Notify,
}

struct StampedHandler(Arc<Waits>);

impl BackgroundJob for StampedHandler {
    type Args = Stamped;
    async fn execute(&self, args: Stamped, _: JobContext) -> std::result::Result<(), JobError> {
        let wait = nanos_since_epoch().saturating_sub(args.sent);
        let seen = {
            let mut v = self.0.nanos.lock().map_err(|_| JobError::msg("poisoned"))?;
            v.push(wait);
            v.len()
        };
        if seen == self.0.expected {
            self.0.all_seen.notify_one();
        }
        Ok(())
    }
}

/// Repeats one measurement `times` times, each on a fresh backend (a fresh table on SQL,
/// dropped after the run).
async fn repeat<F, Fut>(provider: Provider, times: usize, mut once: F) -> Result<Vec<f64>>
where
    F: FnMut(Arc<dyn Backend>) -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    let mut runs = Vec::with_capacity(times);
    for _ in 0..times {
        let fresh = provider.backend().await?;
        let result = once(fresh.backend.clone()).await;
        fresh.dispose().await;
        runs.push(result?);
    }
    Ok(runs)
}

/// `" (1 run)"` when a row runs fewer times than the plan's other rows.
pub(crate) fn fewer_runs(plan: &Plan, times: usize) -> String {
    if times < plan.runs {
        format!(" ({times} run{})", if times == 1 { "" } else { "s" })
    } else {
        String::new()
    }
}

fn per_second(jobs: usize, took: Duration) -> f64 {
    jobs as f64 / took.as_secs_f64().max(1e-9)
}

/// Every Backline-level row for one provider (those that `plan` wants).
pub(crate) async fn rows(provider: Provider, plan: &Plan) -> Result<Vec<Row>> {
    let n = plan.jobs;
    let mut rows = Vec::new();

    let tasks = plan.enqueue_tasks;
    let single = plan.single_jobs;
    let id = format!("enqueue_single_{tasks}_tasks");
    if plan.wants(&id) {
        let runs = repeat(provider, plan.slow_runs, |b| {
            enqueue_one_by_one(b, single, tasks)
        })
        .await?;
        rows.push(Row::new(
            id,
            format!(
                "enqueue one by one, {tasks} tasks{}",
                fewer_runs(plan, plan.slow_runs)
            ),
            single,
            Unit::JobsPerSecond,
            runs,
        ));
    }

    let sequential = plan.sequential_jobs;
    let id = "enqueue_single_1_task".to_owned();
    if plan.wants(&id) {
        let runs = repeat(provider, plan.slow_runs, |b| {
            enqueue_one_by_one(b, sequential, 1)
        })
        .await?;
        rows.push(Row::new(
            id,
            format!(
                "enqueue one by one, 1 task{}",
                fewer_runs(plan, plan.slow_runs)
            ),
            sequential,
            Unit::JobsPerSecond,
            runs,
        ));
    }

    // Redis: the ceiling of grouping concurrent one-by-one enqueues into one script call per
    // round trip (as the SQL providers group commits): one task pushing `tasks` jobs per call,
    // one call in flight. Measured to decide whether grouping is worth it there.
    let id = format!("enqueue_grouped_{tasks}");
    if provider == Provider::Redis && plan.wants(&id) {
        let runs = repeat(provider, plan.slow_runs, |b| {
            enqueue_batches(b, single, tasks)
        })
        .await?;
        rows.push(Row::new(
            id,
            format!(
                "push batches of {tasks}, 1 task (grouping's ceiling){}",
                fewer_runs(plan, plan.slow_runs)
            ),
            single,
            Unit::JobsPerSecond,
            runs,
        ));
    }

    let batch = plan.batch;
    let id = format!("enqueue_batch_{batch}");
    if plan.wants(&id) {
        let runs = repeat(provider, plan.runs, |b| enqueue_batches(b, n, batch)).await?;
        rows.push(Row::new(
            id,
            format!("enqueue in batches of {}", thousands(batch as f64)),
            n,
            Unit::JobsPerSecond,
            runs,
        ));
    }

    for &c in &plan.concurrencies {
        let id = format!("drain_c{c}");
        if !plan.wants(&id) {
            continue;
        }
        let (jobs, times) = plan
            .drain_overrides
            .iter()
            .find(|o| o.0 == c)
            .map_or((n, plan.runs), |o| (o.1, o.2));
        let shape = Drain::new(c);
        let runs = repeat(provider, times, |b| drain(b, jobs, shape)).await?;
        rows.push(Row::new(
            id,
            format!(
                "drain no-op jobs, concurrency {c}{}",
                fewer_runs(plan, times)
            ),
            jobs,
            Unit::JobsPerSecond,
            runs,
        ));
    }
    if let (Some(&c), true) = (plan.concurrencies.last(), plan.never_analyzed) {
        let shape = Drain {
            analyzed: false,
            ..Drain::new(c)
        };
        let runs = repeat(provider, plan.runs, |b| drain(b, n, shape)).await?;
        rows.push(Row::new(
            format!("drain_c{c}_never_analyzed"),
            format!(
                "drain of {} on a table never analyzed, concurrency {c}",
                thousands(n as f64)
            ),
            n,
            Unit::JobsPerSecond,
            runs,
        ));
    }
    if let (Some(&c), Some(flat)) = (plan.concurrencies.last(), plan.flat_jobs) {
        let id = format!("drain_c{c}_{flat}");
        if plan.wants(&id) {
            let shape = Drain::new(c);
            let runs = repeat(provider, plan.runs, |b| drain(b, flat, shape)).await?;
            rows.push(Row::new(
                id,
                format!("drain {} queued, concurrency {c}", thousands(flat as f64)),
                flat,
                Unit::JobsPerSecond,
                runs,
            ));
        }
    }
    if let (Some(&c), true) = (plan.concurrencies.last(), plan.kept_runs > 0) {
        let id = format!("drain_c{c}_kept");
        if plan.wants(&id) {
            let keep = ServerConfig::default().succeeded_ttl;
            let shape = Drain {
                keep,
                ..Drain::new(c)
            };
            let runs = repeat(provider, plan.kept_runs, |b| drain(b, n, shape)).await?;
            rows.push(Row::new(
                id,
                format!(
                    "drain, concurrency {c}, succeeded kept 1 h{}",
                    fewer_runs(plan, plan.kept_runs)
                ),
                n,
                Unit::JobsPerSecond,
                runs,
            ));
        }
    }

    if !plan.wants("latency_p50") && !plan.wants("latency_p99") {
        return Ok(rows);
    }
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for _ in 0..plan.runs {
        let fresh = provider.backend().await?;
        let result = latency(fresh.backend.clone(), plan.rate, plan.latency_for).await;
        fresh.dispose().await;
        let (a, b) = result?;
        p50.push(a);
        p99.push(b);
    }
    let sent = (plan.rate as f64 * plan.latency_for.as_secs_f64()).round() as usize;
    let what = format!(
        "{}/s for {} s",
        thousands(plan.rate as f64),
        plan.latency_for.as_secs_f64()
    );
    rows.push(Row::new(
        "latency_p50".into(),
        format!("enqueue-to-start p50, {what}"),
        sent,
        Unit::Micros,
        p50,
    ));
    rows.push(Row::new(
        "latency_p99".into(),
        format!("enqueue-to-start p99, {what}"),
        sent,
        Unit::Micros,
        p99,
    ));
    Ok(rows)
}

/// Fails unless exactly `n` jobs are ready: an enqueue that lost jobs measures nothing.
async fn expect_ready(backend: &Arc<dyn Backend>, n: usize) -> Result<()> {
    let counts = backend.counts(None).await?;
    if counts.ready != n as u64 || counts.total() != n as u64 {
        return Err(format!("expected {n} ready jobs, found {counts:?}").into());
    }
    Ok(())
}

/// `n` jobs enqueued with one `enqueue` call each, from `tasks` concurrent tasks; jobs/s.
pub(crate) async fn enqueue_one_by_one(
    backend: Arc<dyn Backend>,
    n: usize,
    tasks: usize,
) -> Result<f64> {
    let manager = JobManager::new(backend.clone());
    let mut set = JoinSet::new();
    let start = Instant::now();
    for t in 0..tasks {
        let share = n / tasks + usize::from(t < n % tasks);
        let manager = manager.clone();
        set.spawn(async move {
            for _ in 0..share {
                manager.enqueue(Noop).await?;
            }
            Ok::<(), backline_core::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let took = start.elapsed();
    expect_ready(&backend, n).await?;
    Ok(per_second(n, took))
}

/// `n` jobs enqueued `batch` at a time from one task; jobs/s.
async fn enqueue_batches(backend: Arc<dyn Backend>, n: usize, batch: usize) -> Result<f64> {
    let manager = JobManager::new(backend.clone());
    let start = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(batch);
        manager.enqueue_batch((0..k).map(|_| Noop)).await?;
        left -= k;
    }
    let took = start.elapsed();
    expect_ready(&backend, n).await?;
    Ok(per_second(n, took))
}

/// Enqueues `n` no-op jobs in batches of 1,000 (not timed), then has a PostgreSQL table
/// analyzed ([`crate::sql::after_fill`]).
pub(crate) async fn fill(backend: &Arc<dyn Backend>, n: usize) -> Result<()> {
    fill_only(backend, n).await?;
    crate::sql::after_fill().await
}

/// Enqueues `n` no-op jobs in batches of 1,000 (not timed), nothing else.
async fn fill_only(backend: &Arc<dyn Backend>, n: usize) -> Result<()> {
    let manager = JobManager::new(backend.clone());
    let mut left = n;
    while left > 0 {
        let k = left.min(1_000);
        manager.enqueue_batch((0..k).map(|_| Noop)).await?;
        left -= k;
    }
    Ok(())
}

/// The shape of a drain: how many servers, each with which concurrency and claim batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drain {
    /// Servers draining the one backend at once (each its own claim loop).
    pub(crate) servers: usize,
    /// Each server's concurrency.
    pub(crate) concurrency: usize,
    /// Each server's `claim_batch`.
    pub(crate) claim_batch: usize,
    /// How long succeeded jobs are kept.
    pub(crate) keep: Duration,
    /// Whether a PostgreSQL table is analyzed after the fill; if not, it never is (autovacuum
    /// is turned off for it before the fill).
    pub(crate) analyzed: bool,
}

impl Drain {
    /// One server at concurrency `c` with `claim_batch = min(c, 1000)`, deleting succeeded jobs.
    pub(crate) fn new(c: usize) -> Drain {
        Drain {
            servers: 1,
            concurrency: c,
            claim_batch: c.min(1_000),
            keep: Duration::ZERO,
            analyzed: true,
        }
    }
}

/// Enqueues `n` no-op jobs (not timed), then times `shape.servers` servers draining them with
/// `run_until_idle`; jobs/s.
pub(crate) async fn drain(backend: Arc<dyn Backend>, n: usize, shape: Drain) -> Result<f64> {
    if shape.analyzed {
        fill(&backend, n).await?;
    } else {
        crate::sql::never_analyze().await?;
        fill_only(&backend, n).await?;
    }
    let done = Arc::new(AtomicUsize::new(0));
    let mut servers = Vec::with_capacity(shape.servers);
    for _ in 0..shape.servers {
        servers.push(
            JobServer::builder(backend.clone())
                .register(NoopHandler(done.clone()))
                .queue(backline_core::DEFAULT_QUEUE, shape.concurrency)
                .configure(|cfg| {
                    cfg.claim_batch = shape.claim_batch;
                    cfg.succeeded_ttl = shape.keep;
                })
                .build()?,
        );
    }
    let start = Instant::now();
    let mut set = JoinSet::new();
    for server in servers {
        set.spawn(async move { server.run_until_idle().await });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let took = start.elapsed();
    let ran = done.load(Ordering::Relaxed);
    let counts = backend.counts(None).await?;
    let left = counts.total() - counts.succeeded;
    if ran != n || left != 0 {
        return Err(format!("drain ran {ran} of {n} jobs and left {counts:?}").into());
    }
    Ok(per_second(n, took))
}

/// The `p`-th percentile (nearest rank) of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Enqueues one job at a time at `rate` per second for `duration` while a server in its
/// default configuration runs them; the p50 and p99 of enqueue-to-start, in microseconds.
async fn latency(backend: Arc<dyn Backend>, rate: usize, duration: Duration) -> Result<(f64, f64)> {
    let total = ((rate as f64) * duration.as_secs_f64()).round() as usize;
    let waits = Arc::new(Waits {
        nanos: Mutex::new(Vec::with_capacity(total)),
        expected: total,
        all_seen: Notify::new(),
    });
    let server = JobServer::builder(backend.clone())
        .register(StampedHandler(waits.clone()))
        .build()?;
    let running = server.start();
    let manager = JobManager::new(backend);
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(start + period * i as u32).await;
        manager
            .enqueue(Stamped {
                sent: nanos_since_epoch(),
            })
            .await?;
    }
    let late = start.elapsed().saturating_sub(duration);
    if late > duration / 10 {
        eprintln!("  warning: enqueueing fell behind the rate by {late:?}");
    }
    let finished = tokio::time::timeout(PATIENCE, waits.all_seen.notified()).await;
    running.shutdown().await?;
    if finished.is_err() {
        let seen = waits.nanos.lock().map_or(0, |v| v.len());
        return Err(format!("only {seen} of {total} jobs started within {PATIENCE:?}").into());
    }
    let mut nanos = waits
        .nanos
        .lock()
        .map_err(|_| "a handler panicked")?
        .clone();
    nanos.sort_unstable();
    let micros = |p| percentile(&nanos, p) as f64 / 1_000.0;
    Ok((micros(50.0), micros(99.0)))
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
