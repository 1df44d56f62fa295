//! The job server: claims due jobs and runs their handlers.

use crate::ErrorChain;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::job::Extensions;
use crate::worker::panic_message;
use crate::{
    Backend, BackgroundJob, BackgroundWorker, ClaimRequest, ClaimedJob, Error, FailureKind, Finish,
    IntoBackend, JobArgs, JobContext, JobError, JobId, LeaseToken, Maintenance, Outcome, Result,
    RetryPolicy, WorkerContext, WorkerError,
};

/// Timing and sizing knobs of a [`JobServer`]; every one is configurable so that tests run
/// with leases of about a second.
#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    /// The longest idle wait between claims when no wake-up signal arrives (default 1 s;
    /// ABP polls every 5 s).
    pub poll_interval: Duration,
    /// The lease a claimed job gets (default 30 s); heartbeats extend it.
    pub lease: Duration,
    /// How often running jobs' leases are extended (default 10 s: a third of the lease).
    pub heartbeat: Duration,
    /// On shutdown, how long running jobs may finish before they are cancelled and handed back
    /// (default 10 s).
    pub grace: Duration,
    /// The most jobs one claim takes (default 100; ABP fetches up to 1,000).
    pub claim_batch: usize,
    /// The most finished attempts written in one call (default 256).
    pub finish_batch: usize,
    /// How often the maintenance runs: promotion, expired leases, retention (default 1 s).
    pub maintenance_interval: Duration,
    /// The most rows one maintenance step touches (default 1,000).
    pub maintenance_batch: usize,
    /// How long succeeded jobs are kept (default 1 h; zero deletes them at once, the fastest path).
    pub succeeded_ttl: Duration,
    /// How long dead jobs are kept (default 7 days).
    pub dead_ttl: Duration,
    /// The concurrency of a queue not given one with [`JobServerBuilder::queue`] (default 16).
    pub default_concurrency: usize,
    /// The longest wait between tries while the backend fails (default 30 s; starts at 100 ms).
    pub max_error_backoff: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            grace: Duration::from_secs(10),
            claim_batch: 100,
            finish_batch: 256,
            maintenance_interval: Duration::from_secs(1),
            maintenance_batch: 1000,
            succeeded_ttl: Duration::from_secs(3600),
            dead_ttl: Duration::from_secs(7 * 24 * 3600),
            default_concurrency: 16,
            max_error_backoff: Duration::from_secs(30),
        }
    }
}

impl ServerConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        if self.lease.is_zero() {
            return bad("lease must be longer than zero");
        }
        if self.heartbeat.is_zero() || self.heartbeat >= self.lease {
            return bad("heartbeat must be shorter than the lease and longer than zero");
        }
        if self.poll_interval.is_zero() || self.maintenance_interval.is_zero() {
            return bad("poll and maintenance intervals must be longer than zero");
        }
        if self.claim_batch == 0 || self.finish_batch == 0 || self.maintenance_batch == 0 {
            return bad("batch sizes must be at least 1");
        }
        if self.default_concurrency == 0 {
            return bad("concurrency must be at least 1");
        }
        Ok(())
    }
}

/// The boxed twin of [`BackgroundJob`], held in the registry by job name.
trait ErasedHandler: Send + Sync {
    fn call(&self, payload: &[u8], ctx: JobContext) -> BoxFuture<'static, Result<(), JobError>>;
    fn retry_policy(&self) -> RetryPolicy;
    fn default_queue(&self) -> &'static str;
}

struct Typed<H>(Arc<H>);

impl<H: BackgroundJob> ErasedHandler for Typed<H> {
    fn call(&self, payload: &[u8], ctx: JobContext) -> BoxFuture<'static, Result<(), JobError>> {
        match serde_json::from_slice::<H::Args>(payload) {
            Ok(args) => {
                let handler = self.0.clone();
                Box::pin(async move { handler.execute(args, ctx).await })
            }
            Err(e) => {
                let err = JobError::fatal(format!("undecodable arguments: {e}"));
                Box::pin(std::future::ready(Err(err)))
            }
        }
    }

    fn retry_policy(&self) -> RetryPolicy {
        <H::Args as JobArgs>::retry_policy()
    }

    fn default_queue(&self) -> &'static str {
        <H::Args as JobArgs>::queue()
    }
}

/// Builds a [`JobServer`]: register handlers, set queues and knobs.
pub struct JobServerBuilder {
    backend: Arc<dyn Backend>,
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    duplicate: Option<String>,
    queues: Vec<(String, usize)>,
    config: ServerConfig,
    data: Extensions,
}

impl std::fmt::Debug for JobServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobServerBuilder")
            .field("backend", &self.backend.name())
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field("queues", &self.queues)
            .field("config", &self.config)
            .finish()
    }
}

impl JobServerBuilder {
    /// Registers the handler of one job type; a second handler for the same name is an error at `build`.
    pub fn register<H: BackgroundJob>(mut self, handler: H) -> Self {
        let name = <H::Args as JobArgs>::NAME;
        if self.handlers.contains_key(name) {
            self.duplicate.get_or_insert_with(|| name.to_owned());
        }
        self.handlers
            .insert(name.to_owned(), Arc::new(Typed(Arc::new(handler))));
        self
    }

    /// Serves `queue` with at most `concurrency` jobs running at once.
    ///
    /// Without any call to `queue`, the server serves the default queues of its registered job
    /// types with [`ServerConfig::default_concurrency`].
    pub fn queue(mut self, queue: impl Into<String>, concurrency: usize) -> Self {
        let queue = queue.into();
        self.queues.retain(|(q, _)| *q != queue);
        self.queues.push((queue, concurrency));
        self
    }

    /// Replaces all knobs.
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Changes some knobs.
    pub fn configure(mut self, f: impl FnOnce(&mut ServerConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// Adds shared state that handlers read with [`JobContext::data`].
    pub fn data<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.data.insert(value);
        self
    }

    /// Checks the setup and builds the server.
    pub fn build(self) -> Result<JobServer> {
        if let Some(name) = self.duplicate {
            return Err(Error::DuplicateHandler(name));
        }
        self.config.validate()?;
        let mut names: Vec<String> = self.handlers.keys().cloned().collect();
        names.sort();
        for name in &names {
            crate::manager::validate_name("job", name)?;
        }
        let mut queues = self.queues;
        if queues.is_empty() {
            let mut defaults: Vec<&'static str> =
                self.handlers.values().map(|h| h.default_queue()).collect();
            defaults.sort_unstable();
            defaults.dedup();
            queues = defaults
                .into_iter()
                .map(|q| (q.to_owned(), self.config.default_concurrency))
                .collect();
        }
        for (q, c) in &queues {
            crate::manager::validate_name("queue", q)?;
            if *c == 0 {
                return Err(Error::Config(format!(
                    "queue {q} needs a concurrency of at least 1"
                )));
            }
        }
        if names.is_empty() {
            return Err(Error::Config(
                "a job server needs at least one registered handler".into(),
            ));
        }
        Ok(JobServer {
            inner: Arc::new(Inner {
                backend: self.backend,
                handlers: self.handlers,
                names,
                queues,
                config: self.config,
                data: self.data,
            }),
        })
    }
}

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
///   [`RetryPolicy`] says; a panic is a retryable failure; undecodable arguments are fatal; a
///   name without a handler (on a backend that cannot filter claims by name) is retryable.
/// - Graceful shutdown: stop claiming, tell running jobs ([`JobContext::shutdown`]), wait up to
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

enum FinishMsg {
    Item(Finish),
    Flush(oneshot::Sender<()>),
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
        JobServerBuilder {
            backend: backend.into_backend(),
            handlers: HashMap::new(),
            duplicate: None,
            queues: Vec::new(),
            config: ServerConfig::default(),
            data: Extensions::default(),
        }
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

async fn claim_loop(run: Arc<Run>, queue: String, concurrency: usize) {
    let inner = &run.inner;
    let cfg = inner.config;
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut seen = 0u64;
    let mut backoff = Duration::from_millis(100);
    let mut quiet_rounds = 0u32;
    loop {
        if run.draining.is_cancelled() {
            break;
        }
        let mut permits: OwnedSemaphorePermit = tokio::select! {
            biased;
            _ = run.draining.cancelled() => break,
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        if run.draining.is_cancelled() {
            break;
        }
        let want = (sem.available_permits() + 1).min(cfg.claim_batch);
        if want > 1 {
            if let Ok(more) = sem.clone().try_acquire_many_owned((want - 1) as u32) {
                permits.merge(more);
            }
        }
        let want = permits.num_permits();
        let req = ClaimRequest {
            queue: &queue,
            names: &inner.names,
            limit: want,
            lease: cfg.lease,
        };
        let claimed = match inner.backend.claim(req).await {
            Ok(c) => {
                backoff = Duration::from_millis(100);
                c
            }
            Err(e) => {
                drop(permits);
                tracing::warn!(queue = %queue, error = %ErrorChain(&e), retry_in = ?backoff, "claim failed");
                if !sleep_or(&run.draining, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(cfg.max_error_backoff);
                continue;
            }
        };
        let got = claimed.len();
        if run.draining.is_cancelled() {
            // The shutdown began while the claim was in flight: hand the jobs back unstarted.
            release_unstarted(&run, claimed).await;
            break;
        }
        for job in claimed {
            // `got <= want`: each job takes one of the permits acquired for this claim.
            let Some(permit) = permits.split(1) else {
                tracing::error!(queue = %queue, "backend returned more jobs than asked; handing the extra back");
                let _ = run
                    .finish_tx
                    .send(FinishMsg::Item(Finish {
                        id: job.job.id,
                        token: job.token,
                        outcome: Outcome::Release,
                    }))
                    .await;
                continue;
            };
            let run2 = run.clone();
            run.tracker
                .spawn(async move { run_job(run2, job, permit).await });
        }
        drop(permits);
        if got == want {
            quiet_rounds = 0;
            continue;
        }
        if run.idle_exit {
            if got > 0 {
                quiet_rounds = 0;
                continue;
            }
            // Quiesce: wait for this queue's running jobs, write their results, run maintenance.
            match sem.acquire_many(concurrency as u32).await {
                Ok(all) => drop(all),
                Err(_) => break,
            }
            flush(&run).await;
            let m = maintenance(&cfg);
            if let Err(e) = inner.backend.maintain(&m).await {
                tracing::warn!(error = %ErrorChain(&e), "maintenance failed");
            }
            quiet_rounds += 1;
            if quiet_rounds >= 2 {
                break;
            }
            continue;
        }
        let wait = inner.backend.wait(&queue, seen, cfg.poll_interval);
        tokio::select! {
            r = wait => match r {
                Ok(s) => seen = s,
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %ErrorChain(&e), "wake-up signal failed; polling");
                    if !sleep_or(&run.draining, cfg.poll_interval.min(backoff)).await {
                        break;
                    }
                }
            },
            _ = run.draining.cancelled() => break,
        }
    }
}

async fn release_unstarted(run: &Run, claimed: Vec<ClaimedJob>) {
    for c in claimed {
        let _ = run
            .finish_tx
            .send(FinishMsg::Item(Finish {
                id: c.job.id,
                token: c.token,
                outcome: Outcome::Release,
            }))
            .await;
    }
}

async fn flush(run: &Run) {
    let (tx, rx) = oneshot::channel();
    if run.finish_tx.send(FinishMsg::Flush(tx)).await.is_ok() {
        let _ = rx.await;
    }
}

fn maintenance(cfg: &ServerConfig) -> Maintenance {
    Maintenance {
        batch: cfg.maintenance_batch,
        succeeded_ttl: cfg.succeeded_ttl,
        dead_ttl: cfg.dead_ttl,
    }
}

enum Ended {
    Done(Result<(), JobError>),
    TimedOut(Duration),
    Cancelled,
}

async fn run_job(run: Arc<Run>, claimed: ClaimedJob, permit: OwnedSemaphorePermit) {
    let ClaimedJob { job, token } = claimed;
    let inner = &run.inner;
    let cancel = run.hard.child_token();
    let lease_lost = Arc::new(AtomicBool::new(false));
    if let Ok(mut m) = run.running.lock() {
        m.insert(
            job.id,
            Running {
                token,
                cancel: cancel.clone(),
                lease_lost: lease_lost.clone(),
            },
        );
    }
    let span = tracing::debug_span!("job", name = %job.name, id = %job.id, attempt = job.attempt, queue = %job.queue);
    let handler = inner.handlers.get(&job.name).cloned();
    let outcome = async {
        let Some(handler) = handler else {
            let error = format!(
                "no handler for job `{}` on this server (registered: {})",
                job.name,
                inner.names.join(", ")
            );
            tracing::warn!(%error, "unknown job name");
            return decide(&RetryPolicy::default(), &job, JobError::msg(error));
        };
        tracing::debug!("job started");
        let ctx = JobContext {
            id: job.id,
            name: Arc::from(job.name.as_str()),
            queue: Arc::from(job.queue.as_str()),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            enqueued_at: job.enqueued_at,
            shutdown: run.draining.clone(),
            cancel: cancel.clone(),
            data: inner.data.clone(),
        };
        let fut = AssertUnwindSafe(handler.call(&job.payload, ctx)).catch_unwind();
        let limited = async {
            match job.timeout {
                None => Ended::Done(flatten(fut.await)),
                Some(t) => match tokio::time::timeout(t, fut).await {
                    Ok(r) => Ended::Done(flatten(r)),
                    Err(_) => Ended::TimedOut(t),
                },
            }
        };
        let mut ended = tokio::select! {
            biased;
            _ = cancel.cancelled() => Ended::Cancelled,
            e = limited => e,
        };
        // A handler that returns an error because the shutdown cancelled it is handed back too.
        if run.hard.is_cancelled() && !matches!(ended, Ended::Done(Ok(()))) {
            ended = Ended::Cancelled;
        }
        match ended {
            Ended::Done(Ok(())) => {
                tracing::debug!("job succeeded");
                Outcome::Succeeded {
                    keep: !inner.config.succeeded_ttl.is_zero(),
                }
            }
            Ended::Done(Err(e)) => decide(&handler.retry_policy(), &job, e),
            Ended::TimedOut(t) => {
                cancel.cancel();
                decide(
                    &handler.retry_policy(),
                    &job,
                    JobError::msg(format!("timed out after {t:?}")),
                )
            }
            Ended::Cancelled => Outcome::Release,
        }
    }
    .instrument(span)
    .await;
    if let Ok(mut m) = run.running.lock() {
        m.remove(&job.id);
    }
    if lease_lost.load(Ordering::Acquire) {
        tracing::warn!(job = %job.id, name = %job.name, "lease lost while running; the result is dropped (another attempt owns the job)");
        drop(permit);
        return;
    }
    match &outcome {
        Outcome::Retry { delay, error } => {
            tracing::warn!(job = %job.id, name = %job.name, attempt = job.attempt, retry_in = ?delay, %error, "job failed; will retry")
        }
        Outcome::Dead { error } => {
            tracing::error!(job = %job.id, name = %job.name, attempt = job.attempt, %error, "job dead")
        }
        Outcome::Release => {
            tracing::info!(job = %job.id, name = %job.name, "job cancelled by shutdown; handed back")
        }
        Outcome::Succeeded { .. } => {}
    }
    let _ = run
        .finish_tx
        .send(FinishMsg::Item(Finish {
            id: job.id,
            token,
            outcome,
        }))
        .await;
    drop(permit);
}

fn flatten(
    r: std::result::Result<Result<(), JobError>, Box<dyn std::any::Any + Send>>,
) -> Result<(), JobError> {
    match r {
        Ok(r) => r,
        Err(p) => Err(JobError::msg(format!("panicked: {}", panic_message(&*p)))),
    }
}

/// Turns a failed attempt into a retry or a dead job.
fn decide(policy: &RetryPolicy, job: &crate::Job, err: JobError) -> Outcome {
    let error = err.message().to_owned();
    let delay = match err.kind() {
        FailureKind::Fatal => return Outcome::Dead { error },
        FailureKind::RetryAfter(d) => d,
        FailureKind::Retryable => policy.jittered_delay_for(job.attempt),
    };
    if job.attempt >= job.max_attempts {
        return Outcome::Dead {
            error: format!("{error} (attempt {} of {})", job.attempt, job.max_attempts),
        };
    }
    if let Some(max_age) = policy.max_age {
        let next =
            chrono::Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        let limit =
            job.enqueued_at + chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        if next > limit {
            return Outcome::Dead {
                error: format!("abandoned: the next try would be past the max age of {max_age:?}; last error: {error}"),
            };
        }
    }
    Outcome::Retry { delay, error }
}

async fn finisher(inner: Arc<Inner>, mut rx: mpsc::Receiver<FinishMsg>) {
    let max = inner.config.finish_batch;
    let mut batch: Vec<Finish> = Vec::with_capacity(max);
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        let Some(first) = rx.recv().await else { break };
        let push = |m: FinishMsg, batch: &mut Vec<Finish>, flushes: &mut Vec<_>| match m {
            FinishMsg::Item(f) => batch.push(f),
            FinishMsg::Flush(tx) => flushes.push(tx),
        };
        push(first, &mut batch, &mut flushes);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(m) => push(m, &mut batch, &mut flushes),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write_results(&inner, &batch).await;
            batch.clear();
        }
        for tx in flushes.drain(..) {
            let _ = tx.send(());
        }
    }
}

async fn write_results(inner: &Inner, batch: &[Finish]) {
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=8 {
        match inner.backend.finish(batch).await {
            Ok(applied) => {
                for (f, ok) in batch.iter().zip(applied) {
                    if !ok {
                        tracing::warn!(job = %f.id, "result not applied: the lease was lost (the job runs again or ran elsewhere)");
                    }
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), attempt, "cannot write job results; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(inner.config.max_error_backoff);
            }
        }
    }
    tracing::error!(
        jobs = batch.len(),
        "giving up writing job results; their leases will expire and the jobs run again"
    );
}

async fn heartbeat_loop(run: Arc<Run>, stop: CancellationToken) {
    let cfg = run.inner.config;
    loop {
        if !sleep_or(&stop, cfg.heartbeat).await {
            return;
        }
        let leases: Vec<(JobId, LeaseToken)> = match run.running.lock() {
            Ok(m) => m.iter().map(|(id, r)| (*id, r.token)).collect(),
            Err(_) => continue,
        };
        if leases.is_empty() {
            continue;
        }
        match run.inner.backend.heartbeat(&leases, cfg.lease).await {
            Ok(held) => {
                if let Ok(m) = run.running.lock() {
                    for ((id, _), ok) in leases.iter().zip(held) {
                        if !ok {
                            if let Some(r) = m.get(id) {
                                tracing::warn!(job = %id, "lease lost; cancelling the attempt");
                                r.lease_lost.store(true, Ordering::Release);
                                r.cancel.cancel();
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %ErrorChain(&e), "heartbeat failed"),
        }
    }
}

async fn maintenance_loop(inner: Arc<Inner>, stop: CancellationToken) {
    let cfg = inner.config;
    let m = maintenance(&cfg);
    loop {
        match inner.backend.maintain(&m).await {
            Ok(report) => {
                if report.recovered > 0 || report.expired_dead > 0 {
                    tracing::warn!(
                        recovered = report.recovered,
                        dead = report.expired_dead,
                        "expired leases recovered"
                    );
                }
                if report.is_saturated(m.batch) {
                    continue;
                }
            }
            Err(e) => tracing::warn!(error = %ErrorChain(&e), "maintenance failed"),
        }
        if !sleep_or(&stop, cfg.maintenance_interval).await {
            return;
        }
    }
}
