//! Run with: cargo run --example data_export
//!
//! Exporting a user's data to CSV, with a time limit per attempt and progress reporting.
//!
//! Job or worker? An export is requested once by a user and takes a while: a background job
//! keeps the request fast, survives restarts and is retried. (Rebuilding every report each
//! night would be a worker.)
//!
//! - The time limit is `JobArgs::timeout` (a default per job type), overridden for one job with
//!   `EnqueueOptions::timeout`. An attempt past its limit is cancelled and counts as a failure.
//! - Progress goes to a shared store the handler gets from `JobContext::data` (registered with
//!   `JobServerBuilder::data`), keyed by `JobContext::id`; a web page could poll it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline::{
    BackgroundJob, EnqueueOptions, JobArgs, JobContext, JobError, JobId, JobManager, JobServer,
    MemoryBackend,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct ExportData {
    user_id: u64,
    rows: u32,
}

impl JobArgs for ExportData {
    const NAME: &'static str = "reports.export";
    fn queue() -> &'static str {
        "reports"
    }
    /// An attempt may take at most 2 s (per job type; one enqueue can override it).
    fn timeout() -> Option<Duration> {
        Some(Duration::from_secs(2))
    }
}

/// Shared application state: the progress of each export, and the finished files.
#[derive(Default)]
struct ExportStore {
    progress: Mutex<HashMap<JobId, u8>>,
    files: Mutex<Vec<String>>,
}

impl ExportStore {
    fn set_progress(&self, id: JobId, percent: u8) {
        if let Ok(mut p) = self.progress.lock() {
            p.insert(id, percent);
        }
    }
}

struct RunExport;

impl BackgroundJob for RunExport {
    type Args = ExportData;

    async fn execute(&self, args: ExportData, ctx: JobContext) -> Result<(), JobError> {
        let store = ctx
            .data::<Arc<ExportStore>>()
            .ok_or_else(|| JobError::fatal("the export store is not registered"))?;
        let mut csv = String::from("id,amount\n");
        for row in 0..args.rows {
            // Stand-in for reading a page of rows from the database.
            tokio::time::sleep(Duration::from_millis(5)).await;
            csv.push_str(&format!("{row},{}\n", row * 10));
            if (row + 1) % (args.rows / 10).max(1) == 0 {
                let percent = ((row + 1) * 100 / args.rows) as u8;
                store.set_progress(ctx.id(), percent);
                println!(
                    "[job {}] user {}: {percent} % ({} of {} rows)",
                    ctx.id(),
                    args.user_id,
                    row + 1,
                    args.rows
                );
            }
        }
        let path = format!("exports/user-{}.csv", args.user_id);
        if let Ok(mut files) = store.files.lock() {
            files.push(path.clone());
        }
        // "Notify the user once complete."
        println!(
            "[job {}] user {}: your export is ready at {path} ({} bytes)",
            ctx.id(),
            args.user_id,
            csv.len()
        );
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

    let backend = MemoryBackend::new();
    let jobs = JobManager::new(backend.clone());

    let small = jobs
        .enqueue(ExportData {
            user_id: 7,
            rows: 40,
        })
        .await?;
    // This one would take about 2 s: give it 300 ms and one attempt, so it fails for good.
    let huge = jobs
        .enqueue_with(
            ExportData {
                user_id: 8,
                rows: 400,
            },
            EnqueueOptions::new()
                .timeout(Duration::from_millis(300))
                .max_attempts(1),
        )
        .await?;

    // `data` stores a value by type; an `Arc` lets `main` read the same store.
    let store = Arc::new(ExportStore::default());
    let server = JobServer::builder(backend)
        .register(RunExport)
        .queue("reports", 2)
        .data(store.clone())
        .build()?;
    // Runs until no due job is left, then returns: fine for a batch tool or an example.
    server.run_until_idle().await?;

    for id in [small, huge] {
        let progress = store
            .progress
            .lock()
            .map(|p| p.get(&id).copied().unwrap_or(0))
            .unwrap_or(0);
        if let Some(job) = jobs.get(id).await? {
            println!(
                "[app] export {id}: {} at {progress} % ({})",
                job.state,
                job.last_error.as_deref().unwrap_or("no error")
            );
        }
    }
    let files = store.files.lock().map(|f| f.clone()).unwrap_or_default();
    println!("[app] files written: {files:?}");
    Ok(())
}
