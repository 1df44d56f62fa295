//! Run with: cargo run --example health_check
//!
//! Periodic health checks, and a worker that crashes once and is restarted.
//!
//! Job or worker? Checking the health of connected services every N seconds, for as long as the
//! application runs, is a background worker. (Paging the on-call engineer once when a check
//! fails, with retries until the pager answers, would be a job.)
//!
//! - `HealthCheckWorker` is a `PeriodicWorker`: a failing check is logged and the schedule
//!   goes on.
//! - `MetricsListener` is a looping `BackgroundWorker` whose first run panics. The
//!   `WorkerManager` logs the panic and restarts it after `WorkerManagerConfig::restart_initial`
//!   (doubling per failure, up to `restart_max`): a worker never dies silently. The panic
//!   message it prints on stderr is part of the show.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backline::{
    BackgroundWorker, PeriodicWorker, Schedule, WorkerContext, WorkerError, WorkerManager,
    WorkerManagerConfig,
};
use tokio::sync::mpsc;

enum Event {
    Checked(u32),
    ListenerStarted(u32),
}

struct HealthCheckWorker {
    runs: AtomicU32,
    events: mpsc::UnboundedSender<Event>,
}

impl PeriodicWorker for HealthCheckWorker {
    fn name(&self) -> &str {
        "health-check"
    }

    fn schedule(&self) -> Schedule {
        Schedule::every_from_start(Duration::from_millis(300))
    }

    async fn do_work(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        // Stand-ins for pinging the database, the cache and the mail server.
        let checks = [("database", true), ("cache", true), ("smtp", n % 2 == 1)];
        let _ = self.events.send(Event::Checked(n));
        let down: Vec<&str> = checks
            .iter()
            .filter(|(_, up)| !up)
            .map(|(name, _)| *name)
            .collect();
        if down.is_empty() {
            println!("[{}] check {n}: all services up", ctx.name());
            Ok(())
        } else {
            // Logged by the manager at error level; the next check runs on schedule.
            Err(WorkerError::msg(format!("check {n}: down: {down:?}")))
        }
    }
}

struct MetricsListener {
    starts: AtomicU32,
    events: mpsc::UnboundedSender<Event>,
}

impl BackgroundWorker for MetricsListener {
    fn name(&self) -> &str {
        "metrics-listener"
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        let start = self.starts.fetch_add(1, Ordering::SeqCst) + 1;
        println!("[{}] start {start}", ctx.name());
        let _ = self.events.send(Event::ListenerStarted(start));
        if start == 1 {
            panic!("the metrics socket closed unexpectedly");
        }
        ctx.cancelled().await;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let (tx, mut events) = mpsc::unbounded_channel();
    let config = WorkerManagerConfig {
        // Restart after 200 ms instead of the default 1 s, so the example stays short.
        restart_initial: Duration::from_millis(200),
        ..WorkerManagerConfig::default()
    };
    let mut workers = WorkerManager::new().with_config(config);
    workers
        .add_periodic(HealthCheckWorker {
            runs: AtomicU32::new(0),
            events: tx.clone(),
        })
        .add(MetricsListener {
            starts: AtomicU32::new(0),
            events: tx,
        });
    let running = workers.start();

    // Wait until the listener is back after its crash and three checks have run.
    let watch = async {
        let (mut restarted, mut checks) = (false, 0);
        while !(restarted && checks >= 3) {
            match events.recv().await {
                Some(Event::ListenerStarted(n)) => restarted |= n >= 2,
                Some(Event::Checked(n)) => checks = n,
                None => break,
            }
        }
        restarted
    };
    match tokio::time::timeout(Duration::from_secs(5), watch).await {
        Ok(true) => println!("[app] the metrics listener was restarted after its panic"),
        _ => eprintln!("[app] the listener was not restarted within 5 s"),
    }

    running.shutdown().await;
    println!("[app] stopped");
    Ok(())
}
