//! Background workers: long-running tasks that live as long as the application.

use crate::ErrorChain;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::job::Extensions;
use crate::lock::DistributedLock;
use crate::{Backend, BoxError, IntoBackend};

/// What a running worker knows: its name, its stop signal and the shared state.
#[derive(Clone, Debug)]
pub struct WorkerContext {
    name: Arc<str>,
    stop: CancellationToken,
    data: Extensions,
}

impl WorkerContext {
    /// A context with its own stop token (for running a worker by hand, e.g. in a test).
    pub fn new(name: impl Into<Arc<str>>, stop: CancellationToken) -> Self {
        WorkerContext {
            name: name.into(),
            stop,
            data: Extensions::default(),
        }
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Resolves when the worker must stop.
    pub async fn cancelled(&self) {
        self.stop.cancelled().await
    }
    /// Whether the worker must stop.
    pub fn is_cancelled(&self) -> bool {
        self.stop.is_cancelled()
    }
    /// The stop token, to hand to other tasks.
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }
    /// Shared state of type `T` given to the [`WorkerManager`] with `data`.
    pub fn data<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.data.get::<T>()
    }
}

/// The failure of a worker run.
///
/// Like [`JobError`](crate::JobError), it does not implement `std::error::Error`, so that `?`
/// works on any error.
pub struct WorkerError(BoxError);

impl WorkerError {
    /// A failure with a message.
    pub fn msg(message: impl Into<String>) -> Self {
        WorkerError(message.into().into())
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for WorkerError {
    fn from(e: E) -> Self {
        WorkerError(Box::new(e))
    }
}

impl fmt::Debug for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)?;
        let mut src = self.0.source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
}

/// A long-running task (ABP's `IBackgroundWorker`): a queue consumer, a listener, a loop.
///
/// `run` is the one method: it runs until `ctx` is cancelled, then returns `Ok(())`. The
/// [`WorkerManager`] starts it with the application, restarts it with back-off if it fails,
/// panics or returns early, and cancels it on shutdown.
///
/// ```
/// use backline_core::{BackgroundWorker, WorkerContext, WorkerError};
///
/// struct QueueConsumer;
///
/// impl BackgroundWorker for QueueConsumer {
///     fn name(&self) -> &str { "queue-consumer" }
///     async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
///         while !ctx.is_cancelled() {
///             tokio::select! {
///                 _ = ctx.cancelled() => break,
///                 _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => { /* poll */ }
///             }
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait BackgroundWorker: Send + Sync + 'static {
    /// A name for logs.
    fn name(&self) -> &str;
    /// Runs until `ctx` is cancelled.
    fn run(&self, ctx: WorkerContext) -> impl Future<Output = Result<(), WorkerError>> + Send;
}

/// When a [`PeriodicWorker`] runs.
#[derive(Clone)]
pub enum Schedule {
    /// Every `period`, measured from the end of the previous run (never overlapping).
    Every {
        /// The pause between the end of one run and the start of the next.
        period: Duration,
        /// Run once right at start, before the first pause.
        run_on_start: bool,
    },
    /// On a cron expression in a timezone. A tick that falls in a DST gap runs at the first
    /// valid time after it (a daily 02:30 runs at 03:00 on the day clocks go forward), a tick in
    /// a DST overlap runs once (at its first occurrence), and ticks missed while a run was still
    /// going are not replayed.
    #[cfg(feature = "cron")]
    Cron(CronSchedule),
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every {
                period,
                run_on_start,
            } => f
                .debug_struct("Every")
                .field("period", period)
                .field("run_on_start", run_on_start)
                .finish(),
            #[cfg(feature = "cron")]
            Schedule::Cron(c) => f.debug_tuple("Cron").field(&c.expr).field(&c.tz).finish(),
        }
    }
}

impl Schedule {
    /// Every `period`, the first run one period after start.
    pub fn every(period: Duration) -> Self {
        Schedule::Every {
            period,
            run_on_start: false,
        }
    }

    /// Every `period`, the first run at start.
    pub fn every_from_start(period: Duration) -> Self {
        Schedule::Every {
            period,
            run_on_start: true,
        }
    }

    /// A cron expression (5 fields, or 6 with seconds first) in a timezone.
    ///
    /// ```
    /// use backline_core::Schedule;
    /// let nightly = Schedule::cron("30 2 * * *", chrono_tz::Europe::Istanbul).unwrap();
    /// assert!(Schedule::cron("not cron", chrono_tz::UTC).is_err());
    /// # let _ = nightly;
    /// ```
    #[cfg(feature = "cron")]
    pub fn cron(expr: &str, tz: chrono_tz::Tz) -> crate::Result<Self> {
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build();
        let cron = parser
            .parse(expr)
            .map_err(|e| crate::Error::Config(format!("cron expression `{expr}`: {e}")))?;
        Ok(Schedule::Cron(CronSchedule {
            expr: expr.to_owned(),
            cron: Arc::new(cron),
            tz,
        }))
    }

    /// How long from `now` until the next run, or `None` if there is none.
    fn next_delay(&self, now: chrono::DateTime<chrono::Utc>, first: bool) -> Option<Duration> {
        match self {
            Schedule::Every {
                period,
                run_on_start,
            } => Some(if first && *run_on_start {
                Duration::ZERO
            } else {
                *period
            }),
            #[cfg(feature = "cron")]
            Schedule::Cron(c) => c
                .next_after(now)
                .map(|next| (next - now).to_std().unwrap_or(Duration::ZERO)),
        }
    }
}

/// A parsed cron schedule with its timezone.
#[cfg(feature = "cron")]
#[derive(Clone)]
pub struct CronSchedule {
    expr: String,
    cron: Arc<croner::Cron>,
    tz: chrono_tz::Tz,
}

#[cfg(feature = "cron")]
impl CronSchedule {
    /// The next tick strictly after `after`.
    pub fn next_after(
        &self,
        after: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let local = after.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    }
}

/// A task that runs on a schedule (ABP's `AsyncPeriodicBackgroundWorkerBase`), never
/// overlapping itself. Add it with [`WorkerManager::add_periodic`].
///
/// A failing or panicking run is logged at error level and the schedule goes on.
///
/// ```
/// use std::time::Duration;
/// use backline_core::{PeriodicWorker, Schedule, WorkerContext, WorkerError};
///
/// struct HealthCheck;
///
/// impl PeriodicWorker for HealthCheck {
///     fn name(&self) -> &str { "health-check" }
///     fn schedule(&self) -> Schedule { Schedule::every_from_start(Duration::from_secs(30)) }
///     async fn do_work(&self, _ctx: WorkerContext) -> Result<(), WorkerError> {
///         println!("all systems go");
///         Ok(())
///     }
/// }
/// ```
pub trait PeriodicWorker: Send + Sync + 'static {
    /// A name for logs.
    fn name(&self) -> &str;
    /// When it runs.
    fn schedule(&self) -> Schedule;
    /// One run.
    fn do_work(&self, ctx: WorkerContext) -> impl Future<Output = Result<(), WorkerError>> + Send;
}

/// Runs a [`PeriodicWorker`] as a [`BackgroundWorker`].
struct Periodic<W>(W);

impl<W: PeriodicWorker> BackgroundWorker for Periodic<W> {
    fn name(&self) -> &str {
        self.0.name()
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        let schedule = self.0.schedule();
        let mut first = true;
        loop {
            let Some(delay) = schedule.next_delay(chrono::Utc::now(), first) else {
                tracing::warn!(
                    worker = self.0.name(),
                    "schedule has no next run; idle until shutdown"
                );
                ctx.cancelled().await;
                return Ok(());
            };
            first = false;
            tokio::select! {
                _ = ctx.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            let run = AssertUnwindSafe(self.0.do_work(ctx.clone())).catch_unwind();
            match run.await {
                Ok(Ok(())) => tracing::debug!(worker = self.0.name(), "periodic run done"),
                Ok(Err(e)) => {
                    tracing::error!(worker = self.0.name(), error = %e, "periodic run failed")
                }
                Err(p) => {
                    tracing::error!(worker = self.0.name(), panic = %panic_message(&*p), "periodic run panicked")
                }
            }
            if ctx.is_cancelled() {
                return Ok(());
            }
        }
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_owned()
    }
}

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
