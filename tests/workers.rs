//! End-to-end tests of background workers through the `backline` facade: periodic schedules,
//! supervision (restarts), shutdown, singletons, and cron schedules across DST changes.
#![cfg(feature = "memory")]

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backline::chrono::{DateTime, NaiveDate, TimeZone, Utc};
use backline::chrono_tz::{self, Europe::Berlin};
use backline::{
    BackgroundWorker, CronSchedule, Error, MemoryBackend, PeriodicWorker, Schedule, WorkerContext,
    WorkerError, WorkerManager, WorkerManagerConfig, WorkerOptions,
};
use tokio::sync::mpsc;

/// The longest a test waits for something that should happen; never an expectation of speed.
const PATIENCE: Duration = Duration::from_secs(30);

/// Awaits `fut`, failing the test if it takes longer than [`PATIENCE`].
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for {what}"))
}

/// Receives the next message, failing the test after [`PATIENCE`] or if every sender is gone.
async fn next<T>(what: &str, rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    within(what, rx.recv())
        .await
        .unwrap_or_else(|| panic!("channel closed while waiting for {what}"))
}

/// Restarts after 10 ms instead of 1 s.
fn fast_restarts() -> WorkerManagerConfig {
    WorkerManagerConfig {
        restart_initial: Duration::from_millis(10),
        restart_max: Duration::from_millis(100),
        ..WorkerManagerConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Periodic workers
// ---------------------------------------------------------------------------------------------

/// A periodic worker whose run takes much longer than its period.
struct SlowPeriodic {
    running: Arc<AtomicUsize>,
    max_running: Arc<AtomicUsize>,
    done: mpsc::UnboundedSender<()>,
}

impl PeriodicWorker for SlowPeriodic {
    fn name(&self) -> &str {
        "slow-periodic"
    }

    fn schedule(&self) -> Schedule {
        Schedule::every(Duration::from_millis(5))
    }

    async fn do_work(&self, _ctx: WorkerContext) -> Result<(), WorkerError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        // The work itself: ten periods long, so a timer that fired regardless would overlap.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        let _ = self.done.send(());
        Ok(())
    }
}

#[tokio::test]
async fn a_periodic_worker_never_overlaps_itself_and_runs_again_after_each_run() {
    let running = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let (tx, mut done) = mpsc::unbounded_channel();
    let mut workers = WorkerManager::new();
    workers.add_periodic(SlowPeriodic {
        running: running.clone(),
        max_running: max_running.clone(),
        done: tx,
    });
    let handle = workers.start();

    for i in 1..=4 {
        next(&format!("run {i}"), &mut done).await;
    }
    handle.shutdown().await;

    assert_eq!(
        max_running.load(Ordering::SeqCst),
        1,
        "runs of one periodic worker overlapped"
    );
    assert_eq!(running.load(Ordering::SeqCst), 0);
}

/// Signals every run; fails its first run (with an error or a panic).
struct FailsFirstRun {
    panic: bool,
    runs: AtomicU32,
    tx: mpsc::UnboundedSender<u32>,
}

impl PeriodicWorker for FailsFirstRun {
    fn name(&self) -> &str {
        "fails-first-run"
    }

    fn schedule(&self) -> Schedule {
        Schedule::every_from_start(Duration::from_millis(5))
    }

    async fn do_work(&self, _ctx: WorkerContext) -> Result<(), WorkerError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.tx.send(n);
        match (n, self.panic) {
            (1, true) => panic!("first periodic run panics (expected in this test)"),
            (1, false) => Err(WorkerError::msg("first periodic run fails")),
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn a_failing_or_panicking_periodic_run_does_not_stop_the_schedule() {
    for panic in [false, true] {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // A restart would also bring a second run; a 1-hour restart delay rules that path out,
        // so the second run can only come from the schedule going on.
        let config = WorkerManagerConfig {
            restart_initial: Duration::from_secs(3600),
            ..WorkerManagerConfig::default()
        };
        let mut workers = WorkerManager::new().with_config(config);
        workers.add_periodic(FailsFirstRun {
            panic,
            runs: AtomicU32::new(0),
            tx,
        });
        let handle = workers.start();
        assert_eq!(next("the first run", &mut rx).await, 1);
        assert_eq!(next("the run after the failed one", &mut rx).await, 2);
        handle.shutdown().await;
    }
}

/// Signals each run; its period is one hour.
struct Hourly {
    schedule: Schedule,
    tx: mpsc::UnboundedSender<()>,
}

impl PeriodicWorker for Hourly {
    fn name(&self) -> &str {
        "hourly"
    }

    fn schedule(&self) -> Schedule {
        self.schedule.clone()
    }

    async fn do_work(&self, _ctx: WorkerContext) -> Result<(), WorkerError> {
        let _ = self.tx.send(());
        Ok(())
    }
}

#[tokio::test]
async fn run_on_start_runs_at_once_instead_of_after_the_first_period() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut workers = WorkerManager::new();
    workers.add_periodic(Hourly {
        schedule: Schedule::every_from_start(Duration::from_secs(3600)),
        tx,
    });
    let handle = workers.start();
    // The period is an hour and PATIENCE is 30 s: only the run at start can arrive in time.
    next("the run at start", &mut rx).await;
    handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Supervision
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum FirstRun {
    Errors,
    Panics,
    ReturnsEarly,
}

/// A looping worker whose first run ends badly; later runs wait for the shutdown.
struct Flaky {
    first: FirstRun,
    starts: AtomicU32,
    tx: mpsc::UnboundedSender<u32>,
}

impl BackgroundWorker for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        let n = self.starts.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.tx.send(n);
        if n == 1 {
            match self.first {
                FirstRun::Errors => return Err(WorkerError::msg("first run fails")),
                FirstRun::Panics => panic!("first run panics (expected in this test)"),
                FirstRun::ReturnsEarly => return Ok(()),
            }
        }
        ctx.cancelled().await;
        Ok(())
    }
}

async fn assert_restarted(first: FirstRun) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut workers = WorkerManager::new().with_config(fast_restarts());
    workers.add(Flaky {
        first,
        starts: AtomicU32::new(0),
        tx,
    });
    let handle = workers.start();
    assert_eq!(next("the first start", &mut rx).await, 1, "{first:?}");
    assert_eq!(next("the restart", &mut rx).await, 2, "{first:?}");
    handle.shutdown().await;
    // The second run ended because of the shutdown: that is no reason to restart it. (The
    // channel closes when the manager drops the worker.)
    assert_eq!(
        within("the worker to be dropped", rx.recv()).await,
        None,
        "{first:?}: started again after shutdown"
    );
}

#[tokio::test]
async fn a_worker_that_returns_an_error_is_restarted() {
    assert_restarted(FirstRun::Errors).await;
}

#[tokio::test]
async fn a_worker_that_panics_is_restarted() {
    assert_restarted(FirstRun::Panics).await;
}

#[tokio::test]
async fn a_worker_that_returns_before_shutdown_is_restarted() {
    assert_restarted(FirstRun::ReturnsEarly).await;
}

/// Signals its start, then waits for the shutdown.
struct Announce {
    tx: mpsc::UnboundedSender<&'static str>,
    tag: &'static str,
}

impl BackgroundWorker for Announce {
    fn name(&self) -> &str {
        "announce"
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        let _ = self.tx.send(self.tag);
        ctx.cancelled().await;
        Ok(())
    }
}

#[tokio::test]
async fn a_disabled_manager_starts_nothing() {
    let (on_tx, mut on_rx) = mpsc::unbounded_channel();
    let (off_tx, mut off_rx) = mpsc::unbounded_channel();
    let (off_periodic_tx, mut off_periodic_rx) = mpsc::unbounded_channel();

    let mut enabled = WorkerManager::new().enabled(true);
    enabled.add(Announce {
        tx: on_tx,
        tag: "enabled",
    });
    let mut disabled = WorkerManager::new().enabled(false);
    disabled
        .add(Announce {
            tx: off_tx,
            tag: "disabled",
        })
        .add_periodic(Hourly {
            schedule: Schedule::every_from_start(Duration::from_secs(3600)),
            tx: off_periodic_tx,
        });

    let on = enabled.start();
    let off = disabled.start();
    // The same workers do start in an enabled manager…
    assert_eq!(
        next("the enabled manager's worker", &mut on_rx).await,
        "enabled"
    );
    // …and get a little more time to show up in the disabled one (a negative check: short).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        off_rx.try_recv().is_err(),
        "a disabled manager started a worker"
    );
    assert!(
        off_periodic_rx.try_recv().is_err(),
        "a disabled manager ran a periodic worker"
    );
    off.shutdown().await;
    on.shutdown().await;
}

/// Loops until cancelled; reports when it starts and when its `run` returns.
struct Looping {
    events: mpsc::UnboundedSender<&'static str>,
}

impl BackgroundWorker for Looping {
    fn name(&self) -> &str {
        "looping"
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        let _ = self.events.send("started");
        loop {
            tokio::select! {
                _ = ctx.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        let _ = self.events.send("returned");
        Ok(())
    }
}

#[tokio::test]
async fn shutdown_cancels_a_looping_worker_and_its_run_returns() {
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut workers = WorkerManager::new();
    workers.add(Looping { events: tx });
    let handle = workers.start();
    assert_eq!(next("the worker to start", &mut events).await, "started");

    within("the shutdown", handle.shutdown()).await;
    // Had the manager aborted the task instead of cancelling its context, `run` would not
    // have reached its end.
    assert_eq!(
        events.try_recv().ok(),
        Some("returned"),
        "the worker's run did not return"
    );
}

#[tokio::test]
async fn the_stop_token_stops_every_worker() {
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut workers = WorkerManager::new();
    workers.add(Looping { events: tx });
    let handle = workers.start();
    assert_eq!(next("the worker to start", &mut events).await, "started");
    handle.stop_token().cancel();
    assert_eq!(next("the worker to return", &mut events).await, "returned");
    handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Singletons
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_singleton_runs_in_one_manager_at_a_time_and_fails_over() {
    let backend = MemoryBackend::new();
    let config = WorkerManagerConfig {
        // The lock is retried (and renewed) every third of its TTL: 500 ms keeps the failover
        // short, 1.5 s keeps a busy machine from losing the lock by missing renewals.
        lock_ttl: Duration::from_millis(1500),
        ..fast_restarts()
    };
    let (tx, mut started) = mpsc::unbounded_channel();
    let mut handles = Vec::new();
    for tag in ["a", "b"] {
        let mut workers = WorkerManager::new()
            .with_config(config)
            .with_lock_backend(backend.clone());
        workers.add_with(
            Announce {
                tx: tx.clone(),
                tag,
            },
            WorkerOptions::singleton(),
        );
        handles.push((tag, workers.start()));
    }
    drop(tx);

    let first = next("the first holder to start", &mut started).await;
    // A negative check: the other manager retries the lock every 500 ms; give it two tries.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        started.try_recv().is_err(),
        "both managers ran the singleton at once"
    );

    // Stop the holder: it releases the lock and the other manager takes over.
    let at = handles
        .iter()
        .position(|(tag, _)| *tag == first)
        .expect("the first holder is one of the managers");
    let (_, holder) = handles.remove(at);
    holder.shutdown().await;
    let second = next("the other manager to take over", &mut started).await;
    assert_ne!(first, second);

    for (_, h) in handles {
        h.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Cron
// ---------------------------------------------------------------------------------------------

/// Sends the time of each run.
struct EverySecond {
    tx: mpsc::UnboundedSender<DateTime<Utc>>,
}

impl PeriodicWorker for EverySecond {
    fn name(&self) -> &str {
        "every-second"
    }

    fn schedule(&self) -> Schedule {
        Schedule::cron("*/1 * * * * *", chrono_tz::UTC).expect("a valid 6-field expression")
    }

    async fn do_work(&self, _ctx: WorkerContext) -> Result<(), WorkerError> {
        let _ = self.tx.send(Utc::now());
        Ok(())
    }
}

#[tokio::test]
async fn a_cron_schedule_with_seconds_fires() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut workers = WorkerManager::new();
    workers.add_periodic(EverySecond { tx });
    let handle = workers.start();
    let first = next("the first tick", &mut rx).await;
    let second = next("the second tick", &mut rx).await;
    handle.shutdown().await;
    assert!(second > first);
    assert_ne!(
        first.timestamp(),
        second.timestamp(),
        "two ticks of a once-a-second schedule in the same second"
    );
}

#[test]
fn a_bad_cron_expression_is_an_error() {
    for bad in [
        "",
        "not cron",
        "61 * * * *",
        "* 25 * * *",
        "* * * * * * * *",
    ] {
        match Schedule::cron(bad, chrono_tz::UTC) {
            Err(Error::Config(msg)) => assert!(msg.contains("cron"), "{bad:?}: {msg}"),
            Err(other) => panic!("{bad:?}: expected Error::Config, got {other:?}"),
            Ok(s) => panic!("{bad:?} was accepted as {s:?}"),
        }
    }
    for good in ["30 2 * * *", "*/1 * * * * *", "0 0 3 * * MON-FRI"] {
        assert!(Schedule::cron(good, Berlin).is_ok(), "{good:?} was refused");
    }
}

fn cron(expr: &str, tz: chrono_tz::Tz) -> CronSchedule {
    match Schedule::cron(expr, tz).expect("a valid expression") {
        Schedule::Cron(c) => c,
        other => panic!("not a cron schedule: {other:?}"),
    }
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
        .single()
        .expect("a valid UTC time")
}

/// The ticks of `schedule` strictly after `from` and up to `until`, by chaining `next_after`.
fn ticks(schedule: &CronSchedule, from: DateTime<Utc>, until: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut at = from;
    while let Some(next) = schedule.next_after(at) {
        assert!(next > at, "next_after({at}) went backwards to {next}");
        if next > until {
            break;
        }
        out.push(next);
        at = next;
    }
    out
}

fn local_dates(ticks: &[DateTime<Utc>]) -> Vec<NaiveDate> {
    ticks
        .iter()
        .map(|t| t.with_timezone(&Berlin).date_naive())
        .collect()
}

fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).expect("a valid date")
}

/// Spring forward in Berlin: on 2026-03-29 the clocks jump from 02:00 CET to 03:00 CEST, so
/// 02:30 does not exist that day. croner moves the tick to the first instant after the gap,
/// 03:00 CEST (01:00 UTC): it is neither skipped nor run twice.
///
/// (The doc of `Schedule::Cron` says a gap "skips the missing tick"; croner runs it at 03:00.)
#[test]
fn cron_in_a_spring_forward_gap_runs_once_at_the_end_of_the_gap() {
    let nightly = cron("30 2 * * *", Berlin);

    let next = nightly
        .next_after(utc(2026, 3, 28, 12, 0))
        .expect("a next tick");
    assert_eq!(
        next,
        utc(2026, 3, 29, 1, 0),
        "the 02:30 tick of 2026-03-29 (inside the gap) should move to 03:00 CEST; got {}",
        next.with_timezone(&Berlin)
    );
    assert_eq!(
        nightly.next_after(next),
        Some(utc(2026, 3, 30, 0, 30)),
        "the day after the gap runs at 02:30 CEST again"
    );

    // One tick per local day across the change, each at 02:30 local except the gap day.
    let all = ticks(&nightly, utc(2026, 3, 27, 0, 0), utc(2026, 3, 31, 12, 0));
    assert_eq!(
        all,
        vec![
            utc(2026, 3, 27, 1, 30), // 02:30 CET
            utc(2026, 3, 28, 1, 30), // 02:30 CET
            utc(2026, 3, 29, 1, 0),  // 03:00 CEST: the end of the gap
            utc(2026, 3, 30, 0, 30), // 02:30 CEST
            utc(2026, 3, 31, 0, 30), // 02:30 CEST
        ]
    );
    assert_eq!(
        local_dates(&all),
        vec![
            date(2026, 3, 27),
            date(2026, 3, 28),
            date(2026, 3, 29),
            date(2026, 3, 30),
            date(2026, 3, 31)
        ]
    );
}

/// Fall back in Berlin: on 2026-10-25 the clocks go from 03:00 CEST back to 02:00 CET, so
/// 02:30 happens twice (00:30 UTC and 01:30 UTC). The nightly job runs once, at the first.
#[test]
fn cron_in_a_fall_back_overlap_runs_once() {
    let nightly = cron("30 2 * * *", Berlin);

    let all = ticks(&nightly, utc(2026, 10, 23, 12, 0), utc(2026, 10, 27, 12, 0));
    assert_eq!(
        all,
        vec![
            utc(2026, 10, 24, 0, 30), // 02:30 CEST
            utc(2026, 10, 25, 0, 30), // 02:30 CEST, the first of the two
            utc(2026, 10, 26, 1, 30), // 02:30 CET
            utc(2026, 10, 27, 1, 30), // 02:30 CET
        ]
    );
    assert_eq!(
        local_dates(&all),
        vec![
            date(2026, 10, 24),
            date(2026, 10, 25),
            date(2026, 10, 26),
            date(2026, 10, 27)
        ]
    );

    // A run that ends inside the repeated hour (after the first 02:30, before the second) must
    // not find the second 02:30 as its next tick: that would run the nightly job twice.
    for after in [
        utc(2026, 10, 25, 0, 45),
        utc(2026, 10, 25, 1, 0),
        utc(2026, 10, 25, 1, 15),
    ] {
        assert_eq!(
            nightly.next_after(after),
            Some(utc(2026, 10, 26, 1, 30)),
            "next_after({after}) inside the repeated hour"
        );
    }
}
