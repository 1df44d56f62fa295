//! Background workers: long-running tasks that live as long as the application.
//!
//! This module holds the [`BackgroundWorker`] trait, the [`WorkerContext`] a worker runs with
//! and the [`WorkerError`] it fails with; the rest lives in one file per concern:
//!
//! - `schedule`: [`Schedule`] (a period or a cron expression) and `CronSchedule`;
//! - `periodic`: [`PeriodicWorker`] and the adapter that runs it as a background worker;
//! - `manager`: [`WorkerManager`], which starts, supervises (restarts with back-off, runs
//!   singletons under a distributed lock) and stops workers.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

mod manager;
mod periodic;
mod schedule;

pub use manager::{RunningWorkers, WorkerManager, WorkerManagerConfig, WorkerOptions};
pub use periodic::PeriodicWorker;
#[cfg(feature = "cron")]
pub use schedule::CronSchedule;
pub use schedule::Schedule;

use crate::{BoxError, Extensions};

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
