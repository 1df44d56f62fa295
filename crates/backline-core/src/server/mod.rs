//! The job server: claims due jobs and runs their handlers.
//!
//! This module holds [`JobServer`], its [`ServerHandle`] and the state shared by the tasks of
//! one run ([`Run`]); the rest lives in one file per concern:
//!
//! - `config`: [`ServerConfig`] and its checks;
//! - `builder`: the erased handler registry and [`JobServerBuilder`];
//! - `claim`: the claim loop of each queue;
//! - `attempt`: running one claimed job and deciding how it ended;
//! - `results`: the batched result writer;
//! - `housekeeping`: the heartbeat and maintenance loops.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod attempt;
mod builder;
mod claim;
mod config;
mod housekeeping;
mod results;

pub use builder::JobServerBuilder;
pub use config::ServerConfig;

use builder::ErasedHandler;
use claim::claim_loop;
use housekeeping::{heartbeat_loop, maintenance_loop};
use results::{finisher, FinishMsg};

use crate::{
    Backend, BackgroundWorker, Error, ErrorChain, Extensions, IntoBackend, JobId, LeaseToken,
    Result, WorkerContext, WorkerError,
};

/// What a built server holds: the backend, the handler registry and the knobs.
struct Inner {
    backend: Arc<dyn Backend>,
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    names: Vec<String>,
    queues: Vec<(String, usize)>,
    config: ServerConfig,
    data: Extensions,
}

/// Pulls due jobs from a backend and runs their handlers with bounded concurrency per queue
/// (ABP's `BackgroundJobWorker`).
///
/// - One claim loop per queue takes as many jobs as it has free slots (up to
///   [`ServerConfig::claim_batch`]) in priority order, and sleeps on the backend's wake-up
///   signal (with [`ServerConfig::poll_interval`] as a fallback) when the queue is empty.
/// - Leases of running jobs are extended in one batched heartbeat; results are written in
///   batches; a maintenance task promotes delayed jobs, recovers expired leases and prunes.
/// - A handler's failure is turned into a retry with back-off or a dead job, as its
///   [`RetryPolicy`](crate::RetryPolicy) says; a panic is a retryable failure; undecodable
///   arguments are fatal; a name without a handler (on a backend that cannot filter claims by
///   name) is retryable.
/// - Graceful shutdown: stop claiming, tell running jobs
///   ([`JobContext::shutdown`](crate::JobContext::shutdown)), wait up to
///   [`ServerConfig::grace`], then cancel them and hand them back without spending the attempt.
///
/// A process that only enqueues (ABP's `IsJobExecutionEnabled = false`) simply does not start one.
///
/// The server is itself a [`BackgroundWorker`], so it can be added to a
/// [`WorkerManager`](crate::WorkerManager).
///
/// ```
/// # use backline_core::*;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Hello;
/// # impl JobArgs for Hello { const NAME: &'static str = "hello"; }
/// # struct SayHello;
/// # impl BackgroundJob for SayHello { type Args = Hello;
/// #   async fn execute(&self, _: Hello, _: JobContext) -> Result<(), JobError> { Ok(()) } }
/// # async fn demo(backend: std::sync::Arc<dyn Backend>) -> Result<()> {
/// let server = JobServer::builder(backend)
///     .register(SayHello)
///     .queue("default", 8)
///     .build()?;
/// let running = server.start();
/// // … the application runs …
/// running.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct JobServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JobServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobServer")
            .field("backend", &self.inner.backend.name())
            .field("names", &self.inner.names)
            .field("queues", &self.inner.queues)
            .finish()
    }
}

/// The handle of a started [`JobServer`].
#[derive(Debug)]
pub struct ServerHandle {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl ServerHandle {
    /// The token that starts the graceful shutdown when cancelled.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Shuts the server down gracefully and waits for it.
    pub async fn shutdown(self) -> Result<()> {
        self.stop.cancel();
        self.join().await
    }

    /// Waits for the server to end (after its stop token is cancelled).
    pub async fn join(self) -> Result<()> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(Error::Backend {
                backend: "job server",
                op: "run",
                source: Box::new(e),
            }),
        }
    }
}

/// One running attempt, as the heartbeat and the shutdown see it.
struct Running {
    token: LeaseToken,
    cancel: CancellationToken,
    lease_lost: Arc<AtomicBool>,
}

/// State shared by the tasks of one run.
struct Run {
    inner: Arc<Inner>,
    /// Cancelled when the server stops claiming and tells jobs to finish.
    draining: CancellationToken,
    /// Cancelled when running jobs must stop now (grace over).
    hard: CancellationToken,
    running: Mutex<HashMap<JobId, Running>>,
    finish_tx: mpsc::Sender<FinishMsg>,
    tracker: TaskTracker,
    idle_exit: bool,
}

impl JobServer {
    /// Starts building a server over a backend.
    pub fn builder(backend: impl IntoBackend) -> JobServerBuilder {
        JobServerBuilder::new(backend.into_backend())
    }

    /// The job names this server has handlers for.
    pub fn job_names(&self) -> &[String] {
        &self.inner.names
    }

    /// The queues it serves, with their concurrency.
    pub fn queues(&self) -> &[(String, usize)] {
        &self.inner.queues
    }

    /// Spawns the server on the current Tokio runtime.
    pub fn start(&self) -> ServerHandle {
        let stop = CancellationToken::new();
        let this = self.clone();
        let token = stop.clone();
        let task = tokio::spawn(async move { this.run(token).await });
        ServerHandle { stop, task }
    }

    /// Runs until `stop` is cancelled, then shuts down gracefully.
    pub async fn run(&self, stop: CancellationToken) -> Result<()> {
        self.run_inner(stop, false).await
    }

    /// Runs until no due job is left and nothing is running, then returns (for tests, batch
    /// tools and examples). Jobs scheduled for later stay where they are.
    pub async fn run_until_idle(&self) -> Result<()> {
        self.run_inner(CancellationToken::new(), true).await
    }

    async fn run_inner(&self, stop: CancellationToken, idle_exit: bool) -> Result<()> {
        let inner = self.inner.clone();
        let cfg = inner.config;
        tracing::info!(
            backend = inner.backend.name(),
            queues = ?inner.queues,
            jobs = ?inner.names,
            "job server started"
        );
        let (finish_tx, finish_rx) = mpsc::channel(cfg.finish_batch * 4);
        let run = Arc::new(Run {
            inner: inner.clone(),
            draining: CancellationToken::new(),
            hard: CancellationToken::new(),
            running: Mutex::new(HashMap::new()),
            finish_tx,
            tracker: TaskTracker::new(),
            idle_exit,
        });
        let background = CancellationToken::new();
        // If this future is dropped mid-run (its task aborted), stop everything it spawned:
        // a heartbeat left running would keep abandoned leases alive forever.
        let _guard = CancelOnDrop([background.clone(), run.hard.clone(), run.draining.clone()]);
        let finisher = tokio::spawn(finisher(inner.clone(), finish_rx));
        let heart = tokio::spawn(heartbeat_loop(run.clone(), background.clone()));
        let maint = tokio::spawn(maintenance_loop(inner.clone(), background.clone()));

        let mut loops = JoinSet::new();
        for (queue, concurrency) in &inner.queues {
            loops.spawn(claim_loop(run.clone(), queue.clone(), *concurrency));
        }
        if idle_exit {
            while loops.join_next().await.is_some() {}
        } else {
            stop.cancelled().await;
            tracing::info!("job server draining");
        }
        run.draining.cancel();
        while loops.join_next().await.is_some() {}

        run.tracker.close();
        if tokio::time::timeout(cfg.grace, run.tracker.wait())
            .await
            .is_err()
        {
            let n = run.running.lock().map(|m| m.len()).unwrap_or(0);
            tracing::warn!(running = n, grace = ?cfg.grace, "grace period over; cancelling running jobs and handing them back");
            run.hard.cancel();
            run.tracker.wait().await;
        }
        // Every job task has sent its result. Stop the heartbeat (it holds a handle on the
        // run), then close the channel so the result writer drains it and ends.
        background.cancel();
        let _ = heart.await;
        drop(run);
        if let Err(e) = finisher.await {
            tracing::error!(error = %ErrorChain(&e), "result writer failed");
        }
        let _ = maint.await;
        tracing::info!("job server stopped");
        Ok(())
    }
}

struct CancelOnDrop<const N: usize>([CancellationToken; N]);

impl<const N: usize> Drop for CancelOnDrop<N> {
    fn drop(&mut self) {
        for t in &self.0 {
            t.cancel();
        }
    }
}

impl BackgroundWorker for JobServer {
    fn name(&self) -> &str {
        "job-server"
    }

    async fn run(&self, ctx: WorkerContext) -> std::result::Result<(), WorkerError> {
        JobServer::run(self, ctx.token())
            .await
            .map_err(WorkerError::from)
    }
}

async fn sleep_or(token: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
