//! Run with: cargo run --example memory
//!
//! The in-memory provider: the whole Backline contract inside one process, for tests,
//! examples and work that may be lost.
//!
//! Job or worker? Jobs are the one-time units of work stored by a provider, like the ones
//! below; workers (periodic or looping) need no provider at all. This provider keeps jobs in
//! the process's memory: **nothing survives a restart**, so jobs that must not be lost need a
//! persistent provider (SQL, Redis, RabbitMQ).
//!
//! Shown here: clones of a `MemoryBackend` share one store; `JobManager::counts` before and
//! after; `JobServer::run_until_idle`, which returns when no due job is left; and a delayed job
//! staying where it is.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backline::{
    BackgroundJob, Counts, EnqueueOptions, JobArgs, JobContext, JobError, JobManager, JobServer,
    MemoryBackend,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Resize {
    image: String,
}

impl JobArgs for Resize {
    const NAME: &'static str = "images.resize";
}

struct ResizeJob(Arc<AtomicU32>);

impl BackgroundJob for ResizeJob {
    type Args = Resize;

    async fn execute(&self, args: Resize, _ctx: JobContext) -> Result<(), JobError> {
        println!("[job] resizing {}", args.image);
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn show(label: &str, c: Counts) {
    println!(
        "[app] {label:<22} scheduled {} | ready {} | running {} | retrying {} | succeeded {} | dead {}",
        c.scheduled, c.ready, c.running, c.retrying, c.succeeded, c.dead
    );
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
    // A clone shares the same store: the manager and the server see the same jobs.
    let jobs = JobManager::new(backend.clone());

    jobs.enqueue_batch(["cat.png", "dog.png", "owl.png"].map(|image| Resize {
        image: image.into(),
    }))
    .await?;
    jobs.enqueue_with(
        Resize {
            image: "later.png".into(),
        },
        EnqueueOptions::new().delay(Duration::from_secs(3600)),
    )
    .await?;
    show("after enqueue:", jobs.counts(None).await?);

    let resized = Arc::new(AtomicU32::new(0));
    let server = JobServer::builder(backend)
        .register(ResizeJob(resized.clone()))
        .build()?;
    server.run_until_idle().await?;
    println!("[app] resized {} images", resized.load(Ordering::SeqCst));
    // The delayed job is still scheduled; the others succeeded (kept for the retention period).
    show("after run_until_idle:", jobs.counts(None).await?);

    // A new process starts with a new, empty store: the scheduled job is gone.
    let after_restart = JobManager::new(MemoryBackend::new());
    show("after a \"restart\":", after_restart.counts(None).await?);
    Ok(())
}
