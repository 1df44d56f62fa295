//! [`WorkerManager`]: starts background workers, supervises them (a worker that fails, panics
//! or returns early is restarted with back-off; a singleton runs under a distributed lock) and
//! stops them ([`RunningWorkers`]).

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::periodic::Periodic;
use super::{BackgroundWorker, PeriodicWorker, WorkerContext, WorkerError};
use crate::lock::DistributedLock;
use crate::util::panic_message;
use crate::{Backend, ErrorChain, Extensions, IntoBackend};

/// The boxed twin of [`BackgroundWorker`], held by the manager.
trait ErasedWorker: Send + Sync {
    fn name(&self) -> &str;
    fn run(&self, ctx: WorkerContext) -> BoxFuture<'_, Result<(), WorkerError>>;
}

impl<W: BackgroundWorker> ErasedWorker for W {
    fn name(&self) -> &str {
        BackgroundWorker::name(self)
    }
    fn run(&self, ctx: WorkerContext) -> BoxFuture<'_, Result<(), WorkerError>> {
        Box::pin(BackgroundWorker::run(self, ctx))
    }
}

/// How one worker is run by the [`WorkerManager`].
#[derive(Debug, Clone, Default)]
pub struct WorkerOptions {
    /// Run at most one instance across every process sharing the lock backend.
    pub singleton: bool,
}

impl WorkerOptions {
    /// One instance across the cluster, under a distributed lock.
    pub fn singleton() -> Self {
        WorkerOptions { singleton: true }
    }
}

/// Timing knobs of the [`WorkerManager`].
#[derive(Debug, Clone, Copy)]
pub struct WorkerManagerConfig {
    /// The first wait before restarting a failed worker (doubles per failure).
    pub restart_initial: Duration,
    /// The longest wait before a restart.
    pub restart_max: Duration,
    /// A run that lasted this long resets the back-off.
    pub restart_reset_after: Duration,
    /// How long `shutdown` waits for workers before aborting them.
    pub grace: Duration,
    /// The TTL of a singleton's lock (renewed every third of it).
    pub lock_ttl: Duration,
}

impl Default for WorkerManagerConfig {
    fn default() -> Self {
        WorkerManagerConfig {
            restart_initial: Duration::from_secs(1),
            restart_max: Duration::from_secs(60),
            restart_reset_after: Duration::from_secs(60),
            grace: Duration::from_secs(10),
            lock_ttl: Duration::from_secs(30),
        }
    }
}

struct Entry {
    worker: Arc<dyn ErasedWorker>,
    options: WorkerOptions,
}

/// Starts, supervises and stops background workers (ABP's `IBackgroundWorkerManager`).
///
/// A worker that fails, panics or returns before shutdown is restarted with capped exponential
/// back-off (1 s → 1 min by default), each restart logged at error level: a worker never dies
/// silently. `enabled(false)` (ABP's `IsEnabled = false`) makes `start` run nothing.
///
/// ```
/// use std::time::Duration;
/// use backline_core::{PeriodicWorker, Schedule, WorkerContext, WorkerError, WorkerManager};
///
/// struct Tick;
/// impl PeriodicWorker for Tick {
///     fn name(&self) -> &str { "tick" }
///     fn schedule(&self) -> Schedule { Schedule::every(Duration::from_millis(10)) }
///     async fn do_work(&self, _ctx: WorkerContext) -> Result<(), WorkerError> { Ok(()) }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut workers = WorkerManager::new();
/// workers.add_periodic(Tick);
/// let running = workers.start();
/// tokio::time::sleep(Duration::from_millis(50)).await;
/// running.shutdown().await;
/// # }
/// ```
#[derive(Default)]
pub struct WorkerManager {
    entries: Vec<Entry>,
    data: Extensions,
    config: WorkerManagerConfig,
    disabled: bool,
    locks: Option<Arc<dyn Backend>>,
}

impl fmt::Debug for WorkerManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerManager")
            .field(
                "workers",
                &self
                    .entries
                    .iter()
                    .map(|e| e.worker.name())
                    .collect::<Vec<_>>(),
            )
            .field("enabled", &!self.disabled)
            .finish()
    }
}

impl WorkerManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the timing knobs.
    pub fn with_config(mut self, config: WorkerManagerConfig) -> Self {
        self.config = config;
        self
    }

    /// Turns the whole manager on or off (ABP's `IsEnabled`).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.disabled = !enabled;
        self
    }

    /// The backend whose locks singleton workers take.
    pub fn with_lock_backend(mut self, backend: impl IntoBackend) -> Self {
        self.locks = Some(backend.into_backend());
        self
    }

    /// Adds shared state that workers read with [`WorkerContext::data`].
    pub fn data<T: Send + Sync + 'static>(&mut self, value: T) -> &mut Self {
        self.data.insert(value);
        self
    }

    /// Adds a worker.
    pub fn add<W: BackgroundWorker>(&mut self, worker: W) -> &mut Self {
        self.add_with(worker, WorkerOptions::default())
    }

    /// Adds a worker with options (e.g. [`WorkerOptions::singleton`]).
    pub fn add_with<W: BackgroundWorker>(
        &mut self,
        worker: W,
        options: WorkerOptions,
    ) -> &mut Self {
        self.entries.push(Entry {
            worker: Arc::new(worker),
            options,
        });
        self
    }

    /// Adds a periodic worker.
    pub fn add_periodic<W: PeriodicWorker>(&mut self, worker: W) -> &mut Self {
        self.add(Periodic(worker))
    }

    /// Adds a periodic worker with options.
    pub fn add_periodic_with<W: PeriodicWorker>(
        &mut self,
        worker: W,
        options: WorkerOptions,
    ) -> &mut Self {
        self.add_with(Periodic(worker), options)
    }

    /// Starts every worker (none if disabled) and returns the handle that stops them.
    ///
    /// Must be called inside a Tokio runtime.
    pub fn start(self) -> RunningWorkers {
        let stop = CancellationToken::new();
        let mut set = JoinSet::new();
        if self.disabled {
            tracing::info!("worker manager disabled; no worker started");
        } else {
            for entry in self.entries {
                let ctx = WorkerContext {
                    name: Arc::from(entry.worker.name()),
                    stop: stop.child_token(),
                    data: self.data.clone(),
                };
                let lock = if entry.options.singleton {
                    match &self.locks {
                        Some(b) => Some(b.clone()),
                        None => {
                            tracing::error!(worker = entry.worker.name(), "singleton worker needs a lock backend (WorkerManager::with_lock_backend); running it unlocked");
                            None
                        }
                    }
                } else {
                    None
                };
                tracing::info!(worker = entry.worker.name(), "worker started");
                set.spawn(supervise(entry.worker, ctx, self.config, lock));
            }
        }
        RunningWorkers {
            stop,
            set,
            grace: self.config.grace,
        }
    }
}

async fn supervise(
    worker: Arc<dyn ErasedWorker>,
    ctx: WorkerContext,
    config: WorkerManagerConfig,
    lock: Option<Arc<dyn Backend>>,
) {
    let name = worker.name().to_owned();
    let mut backoff = config.restart_initial;
    loop {
        if ctx.is_cancelled() {
            break;
        }
        let started = tokio::time::Instant::now();
        let result = match &lock {
            None => run_once(&*worker, ctx.clone()).await,
            Some(backend) => run_locked(&*worker, &ctx, backend.clone(), config.lock_ttl).await,
        };
        if ctx.is_cancelled() {
            break;
        }
        if started.elapsed() >= config.restart_reset_after {
            backoff = config.restart_initial;
        }
        match result {
            Ok(()) => {
                tracing::error!(worker = %name, restart_in = ?backoff, "worker returned before shutdown; restarting")
            }
            Err(reason) => {
                tracing::error!(worker = %name, error = %reason, restart_in = ?backoff, "worker failed; restarting")
            }
        }
        tokio::select! {
            _ = ctx.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.restart_max);
    }
    tracing::info!(worker = %name, "worker stopped");
}

async fn run_once(worker: &dyn ErasedWorker, ctx: WorkerContext) -> Result<(), String> {
    match AssertUnwindSafe(worker.run(ctx)).catch_unwind().await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => Err(format!("panicked: {}", panic_message(&*p))),
    }
}

/// Waits for the lock, runs the worker while holding it, and stops the run if the lock is lost.
async fn run_locked(
    worker: &dyn ErasedWorker,
    ctx: &WorkerContext,
    backend: Arc<dyn Backend>,
    ttl: Duration,
) -> Result<(), String> {
    let lock_name = format!("worker:{}", worker.name());
    let lock = loop {
        match DistributedLock::acquire(backend.clone(), &lock_name, ttl).await {
            Ok(Some(lock)) => break lock,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(worker = worker.name(), error = %ErrorChain(&e), "cannot take the singleton lock; trying again")
            }
        }
        tokio::select! {
            _ = ctx.cancelled() => return Ok(()),
            _ = tokio::time::sleep(ttl / 3) => {}
        }
    };
    tracing::info!(worker = worker.name(), "singleton lock taken");
    let run_ctx = WorkerContext {
        stop: ctx.stop.child_token(),
        ..ctx.clone()
    };
    let lost = lock.lost_token();
    let run_stop = run_ctx.stop.clone();
    let watch = tokio::spawn(async move {
        lost.cancelled().await;
        run_stop.cancel();
    });
    let result = run_once(worker, run_ctx).await;
    watch.abort();
    let was_lost = lock.is_lost();
    lock.release().await;
    if was_lost && !ctx.is_cancelled() {
        return Err("the singleton lock was lost".to_owned());
    }
    result
}

/// The handle of started workers.
#[derive(Debug)]
pub struct RunningWorkers {
    stop: CancellationToken,
    set: JoinSet<()>,
    grace: Duration,
}

impl RunningWorkers {
    /// The token that stops every worker when cancelled.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Cancels every worker, waits up to the grace period, then aborts what is left.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        let all = async { while self.set.join_next().await.is_some() {} };
        if tokio::time::timeout(self.grace, all).await.is_err() {
            tracing::warn!(grace = ?self.grace, "workers still running after the grace period; aborting them");
            self.set.abort_all();
            while self.set.join_next().await.is_some() {}
        }
    }
}
