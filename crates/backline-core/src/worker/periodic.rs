//! [`PeriodicWorker`], a task that runs on a [`Schedule`], and [`Periodic`], the adapter that
//! runs one as a [`BackgroundWorker`] (never overlapping itself, a failing run logged).

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;

use super::{BackgroundWorker, Schedule, WorkerContext, WorkerError};
use crate::util::panic_message;

/// A task that runs on a schedule (ABP's `AsyncPeriodicBackgroundWorkerBase`), never
/// overlapping itself. Add it with
/// [`WorkerManager::add_periodic`](crate::WorkerManager::add_periodic).
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
pub(super) struct Periodic<W>(pub(super) W);

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
