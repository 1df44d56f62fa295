//! Run with: cargo run --example quickstart   (then run it again)
//!
//! Backline in one file, on the embedded default: a SQLite file under `target/`
//! (`target/backline-quickstart.sqlite`, or under `$CARGO_TARGET_DIR`), no server needed. Two
//! background jobs (one delayed, one with a high priority) run by a `JobServer`, beside a
//! periodic health-check worker, all under one `WorkerManager`.
//!
//! Jobs are durable: each run also enqueues a follow-up email due in 3 s and exits before it
//! is due, printing how many jobs it leaves for the next run. Run the example again and it
//! finds those jobs in the file and runs them.
//!
//! Job or worker? A *job* happens once because something happened (a user signed up, a report
//! was requested) and must survive a crash; a *worker* runs because time passes (every 500 ms
//! here) for as long as the process lives.
//!
//! Set `RUST_LOG=debug` to see more of what the server does. The example exits by itself.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use backline::{
    BackgroundJob, EnqueueOptions, JobArgs, JobContext, JobError, JobFilter, JobId, JobManager,
    JobServer, JobState, PeriodicWorker, Priority, Schedule, SqlBackend, SqlConfig, WorkerContext,
    WorkerError, WorkerManager,
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

/// The arguments of the follow-up email: due after this run has ended.
#[derive(Serialize, Deserialize)]
struct FollowUpEmail {
    to: String,
}

impl JobArgs for FollowUpEmail {
    const NAME: &'static str = "emails.follow_up";
}

/// The arguments of the data export job.
#[derive(Serialize, Deserialize)]
struct ExportData {
    user_id: u64,
}

impl JobArgs for ExportData {
    const NAME: &'static str = "reports.export";
}

/// What a handler tells `main` when it is done: the job and a few words about it.
type Done = mpsc::UnboundedSender<(JobId, String)>;

/// Sends the welcome email, then tells `main` it is done.
struct SendWelcomeEmail {
    done: Done,
}

impl BackgroundJob for SendWelcomeEmail {
    type Args = WelcomeEmail;

    async fn execute(&self, args: WelcomeEmail, ctx: JobContext) -> Result<(), JobError> {
        println!("[job {}] sending a welcome email to {}", ctx.id(), args.to);
        let _ = self
            .done
            .send((ctx.id(), format!("welcome email to {}", args.to)));
        Ok(())
    }
}

/// Sends the follow-up email, then tells `main` it is done.
struct SendFollowUpEmail {
    done: Done,
}

impl BackgroundJob for SendFollowUpEmail {
    type Args = FollowUpEmail;

    async fn execute(&self, args: FollowUpEmail, ctx: JobContext) -> Result<(), JobError> {
        println!(
            "[job {}] sending a follow-up email to {}",
            ctx.id(),
            args.to
        );
        let _ = self
            .done
            .send((ctx.id(), format!("follow-up email to {}", args.to)));
        Ok(())
    }
}

/// Exports a user's data, then tells `main` it is done.
struct RunExport {
    done: Done,
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
        let _ = self
            .done
            .send((ctx.id(), format!("export for user {}", args.user_id)));
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

/// `target/backline-quickstart.sqlite`, under `$CARGO_TARGET_DIR` when it is set.
fn database_file() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("backline-quickstart.sqlite")
}

fn jobs(n: u64) -> String {
    format!("{n} job{}", if n == 1 { "" } else { "s" })
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A clear message, no panic and no backtrace.
            eprintln!("[app] error: {}", describe(&*e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // The embedded default: one SQLite file, created (and its tables migrated) on the first
    // connect. Switching to PostgreSQL or MySQL is a change of this URL (and a cargo feature).
    let file = database_file();
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let backend = SqlBackend::connect(SqlConfig::new(format!("sqlite://{}", file.display())))
        .await
        .map_err(|e| format!("cannot open {}: {}", file.display(), describe(&e)))?;
    println!("[app] jobs are stored in {}", file.display());

    // The application side: enqueue and inspect jobs. A web node would only ever do this part.
    let manager = JobManager::new(backend.clone());

    // What an earlier run left behind: jobs still waiting in the file.
    let mut found = Vec::new();
    for state in [JobState::Scheduled, JobState::Ready, JobState::Retrying] {
        let filter = JobFilter::new().with_state(state).with_limit(1000);
        found.extend(manager.list(&filter).await?);
    }
    if found.is_empty() {
        println!("[app] no jobs left by a previous run (run the example again to see some)");
    } else {
        println!(
            "[app] found {} left by the previous run; running them now:",
            jobs(found.len() as u64)
        );
        for job in &found {
            println!("[app]   {} {} ({:?})", job.name, job.id, job.state);
        }
    }
    let left_over: HashSet<JobId> = found.iter().map(|job| job.id).collect();

    // The execution side: a job server with one handler per job type. It is itself a
    // background worker, so the worker manager starts, supervises and stops it.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let server = JobServer::builder(backend.clone())
        .register(SendWelcomeEmail {
            done: done_tx.clone(),
        })
        .register(SendFollowUpEmail {
            done: done_tx.clone(),
        })
        .register(RunExport { done: done_tx })
        .build()?;

    let mut workers = WorkerManager::new();
    workers.add_periodic(HealthCheck);
    workers.add(server);
    let running = workers.start();

    let welcome = manager
        .enqueue_with(
            WelcomeEmail {
                to: "ada@example.com".into(),
            },
            EnqueueOptions::new().delay(Duration::from_secs(1)),
        )
        .await?;
    println!("[app] enqueued welcome email {welcome}, due in 1 s");

    let export = manager
        .enqueue_with(
            ExportData { user_id: 42 },
            EnqueueOptions::new().priority(Priority::High),
        )
        .await?;
    println!("[app] enqueued export {export} with priority High");

    let follow_up = manager
        .enqueue_with(
            FollowUpEmail {
                to: "ada@example.com".into(),
            },
            EnqueueOptions::new().delay(Duration::from_secs(3)),
        )
        .await?;
    println!("[app] enqueued follow-up email {follow_up}, due in 3 s: after this run has ended");

    // Wait until the welcome email, the export and the jobs left by the previous run have run,
    // with a deadline so that the example always ends. The follow-up is not waited for.
    let mut waiting: HashSet<JobId> = left_over.iter().copied().collect();
    waiting.extend([welcome, export]);
    let all_done = async {
        while !waiting.is_empty() {
            let Some((id, what)) = done_rx.recv().await else {
                break;
            };
            let note = if left_over.contains(&id) {
                " (left by the previous run)"
            } else {
                ""
            };
            println!("[app] done: {what}{note}");
            waiting.remove(&id);
        }
    };
    if tokio::time::timeout(Duration::from_secs(8), all_done)
        .await
        .is_err()
    {
        eprintln!("[app] some jobs did not finish within 8 s; shutting down anyway");
    }

    // Graceful shutdown: the server stops claiming, lets running jobs finish and writes their
    // results; the health check is cancelled between two runs.
    running.shutdown().await;

    let counts = manager.counts(None).await?;
    let left = counts.scheduled + counts.ready + counts.retrying;
    println!(
        "[app] stopped; {} succeeded (kept for an hour), {} left for the next run",
        jobs(counts.succeeded),
        jobs(left)
    );
    if left > 0 {
        println!("[app] run `cargo run --example quickstart` again: it will find and run them");
    }
    Ok(())
}
