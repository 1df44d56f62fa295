//! Run with: cargo run --example file_upload
//!
//! Processing an uploaded file in the background: parse, validate, save.
//!
//! Job or worker? Each upload is processed once, because a user uploaded it, and the user gets
//! a quick answer while the work happens later: a background job. (Scanning an upload folder
//! every minute would be a worker.)
//!
//! A file that cannot be parsed will not parse better on a retry: the job returns
//! `JobError::fatal` and goes straight to `Dead`, with the reason as its `last_error`. An
//! operator lists dead jobs (`JobManager::list`), reads one (`get`), fixes the file and sends
//! the job back with `retry_dead`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use backline::{
    BackgroundJob, JobArgs, JobContext, JobError, JobFilter, JobManager, JobServer, JobState,
    MemoryBackend,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct ProcessUpload {
    path: String,
}

impl JobArgs for ProcessUpload {
    const NAME: &'static str = "uploads.process";
}

/// Where uploads are kept (a stand-in for object storage), and the rows saved from them.
#[derive(Default)]
struct Storage {
    files: Mutex<HashMap<String, String>>,
    saved: Mutex<Vec<(String, u32)>>,
}

/// A parse error in an uploaded file.
#[derive(Debug)]
struct BadRow {
    line: usize,
    text: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}: `{}` is not `name,quantity`",
            self.line, self.text
        )
    }
}

impl std::error::Error for BadRow {}

fn parse(csv: &str) -> Result<Vec<(String, u32)>, BadRow> {
    csv.lines()
        .enumerate()
        .map(|(i, line)| {
            let bad = || BadRow {
                line: i + 1,
                text: line.to_owned(),
            };
            let (name, qty) = line.split_once(',').ok_or_else(bad)?;
            Ok((
                name.trim().to_owned(),
                qty.trim().parse().map_err(|_| bad())?,
            ))
        })
        .collect()
}

struct ProcessUploadJob(Arc<Storage>);

impl BackgroundJob for ProcessUploadJob {
    type Args = ProcessUpload;

    async fn execute(&self, args: ProcessUpload, _ctx: JobContext) -> Result<(), JobError> {
        let content = self
            .0
            .files
            .lock()
            .ok()
            .and_then(|f| f.get(&args.path).cloned());
        let Some(content) = content else {
            // Maybe the upload is not fully written yet: try again later.
            return Err(JobError::msg(format!("{} not found", args.path)));
        };
        // Bad content stays bad: do not retry.
        let rows = parse(&content).map_err(JobError::fatal)?;
        println!("[job] {}: saved {} rows", args.path, rows.len());
        if let Ok(mut saved) = self.0.saved.lock() {
            saved.extend(rows);
        }
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

    let storage = Arc::new(Storage::default());
    if let Ok(mut files) = storage.files.lock() {
        files.insert("uploads/good.csv".into(), "apples,3\npears,5".into());
        files.insert("uploads/bad.csv".into(), "apples,3\npears;five".into());
    }

    let backend = MemoryBackend::new();
    let jobs = JobManager::new(backend.clone());
    for path in ["uploads/good.csv", "uploads/bad.csv"] {
        jobs.enqueue(ProcessUpload { path: path.into() }).await?;
    }

    let server = JobServer::builder(backend)
        .register(ProcessUploadJob(storage.clone()))
        .build()?;
    server.run_until_idle().await?;

    // The operator's view: which uploads failed, and why?
    let dead = jobs
        .list(&JobFilter::new().with_state(JobState::Dead))
        .await?;
    println!("[ops] {} dead job(s)", dead.len());
    for job in &dead {
        let args: ProcessUpload = serde_json::from_slice(&job.payload)?;
        println!(
            "[ops] {} ({}) died after {} attempt(s): {}",
            job.id,
            args.path,
            job.attempt,
            job.last_error.as_deref().unwrap_or("no error recorded")
        );
        // The user uploads a corrected file; the operator sends the job back.
        if let Ok(mut files) = storage.files.lock() {
            files.insert(args.path.clone(), "apples,3\npears,5".into());
        }
        let retried = jobs.retry_dead(job.id).await?;
        println!("[ops] retry_dead({}) -> {retried}", job.id);
    }

    server.run_until_idle().await?;

    for job in &dead {
        if let Some(now) = jobs.get(job.id).await? {
            println!("[ops] {} is now {}", now.id, now.state);
        }
    }
    let saved = storage.saved.lock().map(|s| s.len()).unwrap_or(0);
    println!("[app] {saved} rows saved in total");
    Ok(())
}
