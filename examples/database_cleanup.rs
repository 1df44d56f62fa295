//! Run with: cargo run --example database_cleanup
//!
//! Periodic database maintenance on a cron schedule, run by one replica of the cluster only.
//!
//! Job or worker? Cleaning up happens because time passes (every night, every hour), not
//! because something happened: a background worker. (Deleting one user's data on request would
//! be a job.)
//!
//! - `Schedule::cron` takes 5 fields, or 6 with seconds first, and a timezone; here
//!   `*/1 * * * * *` fires every second so the example ends quickly. In real life:
//!   `Schedule::cron("0 30 3 * * *", chrono_tz::Europe::Berlin)`, at 03:30 Berlin time.
//! - With several replicas of the application, `WorkerOptions::singleton()` makes the worker
//!   run in one of them at a time, under a distributed lock taken on the backend given to
//!   `WorkerManager::with_lock_backend`. Two managers below play two replicas sharing one
//!   backend: only one of them cleans up; the other waits for the lock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline::chrono::{self, DateTime, Utc};
use backline::{
    chrono_tz, MemoryBackend, PeriodicWorker, Schedule, WorkerContext, WorkerError, WorkerManager,
    WorkerOptions,
};
use tokio::sync::mpsc;

/// A stand-in for a sessions table shared by every replica.
#[derive(Default)]
struct Database {
    sessions: Mutex<Vec<DateTime<Utc>>>,
}

struct DatabaseCleanupWorker {
    replica: &'static str,
    db: Arc<Database>,
    runs: mpsc::UnboundedSender<&'static str>,
}

impl PeriodicWorker for DatabaseCleanupWorker {
    fn name(&self) -> &str {
        "database-cleanup"
    }

    fn schedule(&self) -> Schedule {
        Schedule::cron("*/1 * * * * *", chrono_tz::UTC).expect("a valid cron expression")
    }

    async fn do_work(&self, _ctx: WorkerContext) -> Result<(), WorkerError> {
        let now = Utc::now();
        let (deleted, left) = {
            let mut sessions = self
                .db
                .sessions
                .lock()
                .map_err(|_| WorkerError::msg("the sessions table is poisoned"))?;
            let before = sessions.len();
            sessions.retain(|expires| *expires > now);
            (before - sessions.len(), sessions.len())
        };
        println!(
            "[{}] {} deleted {deleted} expired session(s), {left} left",
            now.format("%H:%M:%S%.3f"),
            self.replica
        );
        let _ = self.runs.send(self.replica);
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

    let db = Arc::new(Database::default());
    if let Ok(mut sessions) = db.sessions.lock() {
        let now = Utc::now();
        for secs in [-60, -1, 1, 3600] {
            sessions.push(now + chrono::Duration::seconds(secs));
        }
    }

    // The backend both replicas share; its locks elect the one that runs the singleton.
    let backend = MemoryBackend::new();
    let (runs_tx, mut runs) = mpsc::unbounded_channel();

    let mut replicas = Vec::new();
    for replica in ["replica-a", "replica-b"] {
        let mut workers = WorkerManager::new().with_lock_backend(backend.clone());
        workers.add_periodic_with(
            DatabaseCleanupWorker {
                replica,
                db: db.clone(),
                runs: runs_tx.clone(),
            },
            WorkerOptions::singleton(),
        );
        replicas.push(workers.start());
    }
    drop(runs_tx);

    // Watch three cleanups (about three seconds), then stop both replicas.
    let mut by = Vec::new();
    let three = async {
        while by.len() < 3 {
            match runs.recv().await {
                Some(replica) => by.push(replica),
                None => break,
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(6), three)
        .await
        .is_err()
    {
        eprintln!("[app] fewer than three cleanups within 6 s");
    }
    for running in replicas {
        running.shutdown().await;
    }
    by.dedup();
    println!("[app] cleanups were run by: {by:?} (one replica only)");
    Ok(())
}
