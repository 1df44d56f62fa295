//! Run with: cargo run --example quickstart
//!
//! Backline in one file: two background jobs (one delayed, one with a high priority) run by a
//! `JobServer`, beside a periodic health-check worker, all under one `WorkerManager`.
//!
//! Job or worker? A *job* happens once because something happened (a user signed up, a report
//! was requested) and must survive a crash; a *worker* runs because time passes (every 500 ms
//! here) for as long as the process lives.
//!
//! Set `RUST_LOG=debug` to see more of what the server does. The example exits by itself.

use std::time::Duration;

use backline::{
    BackgroundJob, EnqueueOptions, JobArgs, JobContext, JobError, JobManager, JobServer,
    MemoryBackend, PeriodicWorker, Priority, Schedule, WorkerContext, WorkerError, WorkerManager,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The arguments of the welcome email job.
#[derive(Serialize, Deserialize)]
struct WelcomeEmail {
    to: String,
}

impl JobArgs for WelcomeEmail {
    // Stored with every job: keep it stable when the Rust type is renamed.
    const NAME: &'static str = "emails.welcome";
}

/// The arguments of the data export job.
#[derive(Serialize, Deserialize)]
struct ExportData {
    user_id: u64,
}

impl JobArgs for ExportData {
    const NAME: &'static str = "reports.export";
}

/// Sends the welcome email, then tells `main` it is done.
struct SendWelcomeEmail {
    done: mpsc::UnboundedSender<String>,
}

impl BackgroundJob for SendWelcomeEmail {
    type Args = WelcomeEmail;

    async fn execute(&self, args: WelcomeEmail, ctx: JobContext) -> Result<(), JobError> {
        println!("[job {}] sending a welcome email to {}", ctx.id(), args.to);
        let _ = self.done.send(format!("welcome email to {}", args.to));
        Ok(())
    }
}

/// Exports a user's data, then tells `main` it is done.
struct RunExport {
    done: mpsc::UnboundedSender<String>,
}

impl BackgroundJob for RunExport {
    type Args = ExportData;

    async fn execute(&self, args: ExportData, ctx: JobContext) -> Result<(), JobError> {
        println!(
            "[job {}] exporting the data of user {} (attempt {})",
            ctx.id(),
            args.user_id,
            ctx.attempt()
        );
        let _ = self.done.send(format!("export for user {}", args.user_id));
        Ok(())
    }
}

/// A periodic worker: checks the health of the application every 500 ms.
struct HealthCheck;

impl PeriodicWorker for HealthCheck {
    fn name(&self) -> &str {
        "health-check"
    }

    fn schedule(&self) -> Schedule {
        // The first check runs at start, then one every 500 ms after the end of the previous.
        Schedule::every_from_start(Duration::from_millis(500))
    }

    async fn do_work(&self, _ctx: WorkerContext) -> Result<(), WorkerError> {
        println!("[worker] health check: all systems go");
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

    // The in-memory provider: nothing survives a restart. The SQL provider, with SQLite as the
    // embedded default, comes in a later issue; switching is a change of this one line.
    let backend = MemoryBackend::new();

    // The application side: enqueue jobs. A web node would only ever do this part.
    let jobs = JobManager::new(backend.clone());

    // The execution side: a job server with one handler per job type. It is itself a
    // background worker, so the worker manager starts, supervises and stops it.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let server = JobServer::builder(backend.clone())
        .register(SendWelcomeEmail {
            done: done_tx.clone(),
        })
        .register(RunExport { done: done_tx })
        .build()?;

    let mut workers = WorkerManager::new();
    workers.add_periodic(HealthCheck);
    workers.add(server);
    let running = workers.start();

    let welcome = jobs
        .enqueue_with(
            WelcomeEmail {
                to: "ada@example.com".into(),
            },
            EnqueueOptions::new().delay(Duration::from_secs(1)),
        )
        .await?;
    println!("[app] enqueued welcome email {welcome}, due in 1 s");

    let export = jobs
        .enqueue_with(
            ExportData { user_id: 42 },
            EnqueueOptions::new().priority(Priority::High),
        )
        .await?;
    println!("[app] enqueued export {export} with priority High");

    // Wait until both handlers have reported, with a deadline so the example always ends.
    let both = async {
        for _ in 0..2 {
            match done_rx.recv().await {
                Some(what) => println!("[app] done: {what}"),
                None => break,
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .is_err()
    {
        eprintln!("[app] the jobs did not finish within 5 s; shutting down anyway");
    }

    // Graceful shutdown: the server stops claiming, lets running jobs finish and writes their
    // results; the health check is cancelled between two runs.
    running.shutdown().await;

    let counts = jobs.counts(None).await?;
    println!(
        "[app] stopped; jobs succeeded: {}, waiting: {}",
        counts.succeeded,
        counts.scheduled + counts.ready + counts.retrying
    );
    Ok(())
}
