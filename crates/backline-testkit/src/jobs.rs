//! The job types and the recorder the scenarios use.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline_core::{BackgroundJob, JobArgs, JobContext, JobError, JobId, RetryPolicy};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// What a test job does on each attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Succeed.
    Succeed,
    /// Fail (retryable) on every attempt below `n`, then succeed.
    FailUntil(u32),
    /// Fail (retryable) on every attempt.
    AlwaysFail,
    /// Fail fatally.
    Fatal,
    /// Panic on every attempt below `n`, then succeed.
    PanicUntil(u32),
    /// Ask for a retry after this many milliseconds on every attempt below `until`, then succeed.
    RetryAfter {
        /// The delay asked for.
        ms: u64,
        /// The first attempt that succeeds.
        until: u32,
    },
    /// Sleep this many milliseconds, then succeed.
    Sleep(u64),
    /// Wait for the server's shutdown signal, then succeed.
    UntilShutdown,
    /// Never finish by itself (only cancellation ends it).
    Forever,
    /// Succeed; the string only makes the payload large.
    Pad(String),
}

/// The arguments of the main test job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// A label the scenario recognises.
    pub tag: String,
    /// What to do.
    pub action: Action,
}

impl Task {
    /// A task that succeeds.
    pub fn ok(tag: impl Into<String>) -> Self {
        Task {
            tag: tag.into(),
            action: Action::Succeed,
        }
    }
    /// A task with an action.
    pub fn new(tag: impl Into<String>, action: Action) -> Self {
        Task {
            tag: tag.into(),
            action,
        }
    }
}

/// A fast retry policy: 50 ms, ×2, no jitter, 5 attempts.
fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(50),
        factor: 2.0,
        max_delay: Duration::from_secs(2),
        jitter: 0.0,
        max_attempts: 5,
        max_age: None,
    }
}

impl JobArgs for Task {
    const NAME: &'static str = "testkit.task";
    fn retry_policy() -> RetryPolicy {
        fast_policy()
    }
}

/// A task whose back-off is 30 s, to show that `retry_after` does not use it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SlowBackoffTask(pub Task);

impl JobArgs for SlowBackoffTask {
    const NAME: &'static str = "testkit.slow_backoff";
    fn retry_policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(30),
            ..fast_policy()
        }
    }
}

/// A task with a max age of 1 s and a first back-off of 5 s: its first failure abandons it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AgingTask(pub Task);

impl JobArgs for AgingTask {
    const NAME: &'static str = "testkit.aging";
    fn retry_policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(5),
            max_age: Some(Duration::from_secs(1)),
            ..fast_policy()
        }
    }
}

/// A task whose name the first server of a scenario has no handler for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnknownTask(pub Task);

impl JobArgs for UnknownTask {
    const NAME: &'static str = "testkit.unknown";
    fn retry_policy() -> RetryPolicy {
        fast_policy()
    }
}

/// One thing a test job did.
#[derive(Debug, Clone)]
pub struct Event {
    /// The job.
    pub id: JobId,
    /// Its tag.
    pub tag: String,
    /// The attempt.
    pub attempt: u32,
    /// The queue it ran from.
    pub queue: String,
    /// When the attempt started (local clock).
    pub started: DateTime<Utc>,
}

/// Records every attempt of the test jobs and lets a scenario await them.
#[derive(Debug)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
    changed: watch::Sender<usize>,
    running: AtomicUsize,
    max_running: AtomicUsize,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            events: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
        }
    }
}

impl Recorder {
    /// A shared recorder.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn record(&self, e: Event) {
        let n = {
            let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
            ev.push(e);
            ev.len()
        };
        self.changed.send_replace(n);
    }

    /// Every attempt so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The tags in the order their attempts started.
    pub fn tags(&self) -> Vec<String> {
        self.events().into_iter().map(|e| e.tag).collect()
    }

    /// The most attempts that ran at once.
    pub fn max_running(&self) -> usize {
        self.max_running.load(Ordering::SeqCst)
    }

    /// Waits until `cond` holds for the events; panics after [`PATIENCE`](crate::PATIENCE).
    pub async fn wait_until(
        &self,
        what: &str,
        cond: impl Fn(&[Event]) -> bool + Send + Sync,
    ) -> Vec<Event> {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                let events = self.events();
                if cond(&events) {
                    return events;
                }
                if rx.changed().await.is_err() {
                    return self.events();
                }
            }
        };
        match tokio::time::timeout(crate::PATIENCE, wait).await {
            Ok(e) => e,
            Err(_) => panic!("gave up waiting: {what}; events: {:?}", self.tags()),
        }
    }

    /// Waits until at least `n` attempts started.
    pub async fn wait_for_attempts(&self, n: usize) -> Vec<Event> {
        self.wait_until(&format!("{n} attempts"), |e| e.len() >= n)
            .await
    }
}

/// Arguments that carry a [`Task`].
pub trait HasTask: JobArgs {
    /// The task.
    fn task(&self) -> &Task;
}

impl HasTask for Task {
    fn task(&self) -> &Task {
        self
    }
}
impl HasTask for SlowBackoffTask {
    fn task(&self) -> &Task {
        &self.0
    }
}
impl HasTask for AgingTask {
    fn task(&self) -> &Task {
        &self.0
    }
}
impl HasTask for UnknownTask {
    fn task(&self) -> &Task {
        &self.0
    }
}

/// The handler of the test jobs: records each attempt, then does the task's action.
pub struct TaskHandler<A = Task> {
    recorder: Arc<Recorder>,
    _args: PhantomData<fn() -> A>,
}

impl<A> TaskHandler<A> {
    /// A handler recording into `recorder`.
    pub fn new(recorder: Arc<Recorder>) -> Self {
        TaskHandler {
            recorder,
            _args: PhantomData,
        }
    }
}

struct RunningGuard<'a>(&'a Recorder);
impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<A: HasTask> BackgroundJob for TaskHandler<A> {
    type Args = A;

    async fn execute(&self, args: A, ctx: JobContext) -> Result<(), JobError> {
        let task = args.task().clone();
        let now = self.recorder.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.recorder.max_running.fetch_max(now, Ordering::SeqCst);
        let _guard = RunningGuard(&self.recorder);
        self.recorder.record(Event {
            id: ctx.id(),
            tag: task.tag.clone(),
            attempt: ctx.attempt(),
            queue: ctx.queue().to_owned(),
            started: Utc::now(),
        });
        let attempt = ctx.attempt();
        match task.action {
            Action::Succeed | Action::Pad(_) => Ok(()),
            Action::FailUntil(n) if attempt < n => {
                Err(JobError::msg(format!("boom at attempt {attempt}")))
            }
            Action::FailUntil(_) => Ok(()),
            Action::AlwaysFail => Err(JobError::msg(format!("boom at attempt {attempt}"))),
            Action::Fatal => Err(JobError::fatal("fatal boom")),
            Action::PanicUntil(n) if attempt < n => panic!("kaboom at attempt {attempt}"),
            Action::PanicUntil(_) => Ok(()),
            Action::RetryAfter { ms, until } if attempt < until => {
                Err(JobError::retry_after(Duration::from_millis(ms)))
            }
            Action::RetryAfter { .. } => Ok(()),
            Action::Sleep(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
            Action::UntilShutdown => {
                ctx.shutdown().await;
                Ok(())
            }
            Action::Forever => {
                ctx.cancelled().await;
                Err(JobError::msg("cancelled"))
            }
        }
    }
}
