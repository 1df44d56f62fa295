//! The application's entry point for enqueueing and inspecting jobs.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{
    Backend, Counts, Error, Job, JobArgs, JobFilter, JobId, JobState, NewJob, Priority, Result,
    RunAt,
};

/// The default queue name.
pub const DEFAULT_QUEUE: &str = "default";

/// The default limit on an encoded payload: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Anything that can be used as a backend: a provider value, an `Arc` of one, or an `Arc<dyn Backend>`.
pub trait IntoBackend {
    /// The shared backend.
    fn into_backend(self) -> Arc<dyn Backend>;
}

impl<B: Backend> IntoBackend for B {
    fn into_backend(self) -> Arc<dyn Backend> {
        Arc::new(self)
    }
}

impl<B: Backend> IntoBackend for Arc<B> {
    fn into_backend(self) -> Arc<dyn Backend> {
        self
    }
}

impl IntoBackend for Arc<dyn Backend> {
    fn into_backend(self) -> Arc<dyn Backend> {
        self
    }
}

/// Options for one enqueue; anything left `None` takes the job type's default
/// (see [`JobArgs`]).
///
/// ```
/// use std::time::Duration;
/// use backline_core::{EnqueueOptions, Priority};
///
/// let opts = EnqueueOptions::new()
///     .delay(Duration::from_secs(30))
///     .priority(Priority::High)
///     .queue("reports");
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    /// Use this id instead of a fresh one (an enqueue retried with the same id makes one job,
    /// where the backend has `dedup_by_id`).
    pub id: Option<JobId>,
    /// The queue.
    pub queue: Option<String>,
    /// The priority.
    pub priority: Option<Priority>,
    /// When it becomes due.
    pub run_at: Option<RunAt>,
    /// The most attempts.
    pub max_attempts: Option<u32>,
    /// The limit on one attempt.
    pub timeout: Option<Duration>,
}

impl EnqueueOptions {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }
    /// Uses this id.
    pub fn id(mut self, id: JobId) -> Self {
        self.id = Some(id);
        self
    }
    /// Sends the job to this queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    /// Sets the priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = Some(priority);
        self
    }
    /// Makes the job due after `delay` (ABP's `delay`).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.run_at = Some(RunAt::After(delay));
        self
    }
    /// Makes the job due at `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(RunAt::At(at));
        self
    }
    /// Sets the most attempts.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
    /// Sets the limit on one attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// Checks a job or queue name: 1 to 128 bytes of ASCII letters, digits and `_ - . : /`.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidJob(format!(
            "{kind} name `{}` must be 1 to 128 ASCII letters, digits or `_-.:/`",
            name.escape_debug()
        )))
    }
}

/// Enqueues jobs and inspects them: ABP's `IBackgroundJobManager`, over any [`Backend`].
///
/// It is cheap to clone and meant to be shared. A process that only enqueues (a web node)
/// creates a `JobManager` and never starts a [`JobServer`](crate::JobServer).
///
/// There is one implementation for every provider, so it is a struct, not a trait: tests that
/// need a manager use the in-memory provider instead of a mock.
///
/// ```
/// # use backline_core::*;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct WelcomeEmail { to: String }
/// # impl JobArgs for WelcomeEmail { const NAME: &'static str = "emails.welcome"; }
/// # async fn demo(manager: JobManager) -> Result<()> {
/// let id = manager.enqueue(WelcomeEmail { to: "ada@example.com".into() }).await?;
/// let later = manager
///     .enqueue_with(
///         WelcomeEmail { to: "alan@example.com".into() },
///         EnqueueOptions::new().delay(std::time::Duration::from_secs(60)),
///     )
///     .await?;
/// # let _ = (id, later); Ok(()) }
/// ```
#[derive(Clone)]
pub struct JobManager {
    backend: Arc<dyn Backend>,
    max_payload: usize,
}

impl std::fmt::Debug for JobManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobManager")
            .field("backend", &self.backend.name())
            .field("max_payload", &self.max_payload)
            .finish()
    }
}

impl JobManager {
    /// A manager over a backend.
    pub fn new(backend: impl IntoBackend) -> Self {
        JobManager {
            backend: backend.into_backend(),
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }

    /// Sets the limit on an encoded payload (default 1 MiB).
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Encodes and checks a job without storing it (for providers' transactional enqueue).
    pub fn prepare<A: JobArgs>(&self, args: &A, opts: EnqueueOptions) -> Result<NewJob> {
        let payload = serde_json::to_vec(args).map_err(|e| Error::Serialization {
            op: "encode",
            name: A::NAME.to_owned(),
            source: Box::new(e),
        })?;
        let job = NewJob {
            id: opts.id.unwrap_or_default(),
            name: A::NAME.to_owned(),
            queue: opts.queue.unwrap_or_else(|| A::queue().to_owned()),
            payload,
            priority: opts.priority.unwrap_or_else(A::priority),
            run_at: opts.run_at.unwrap_or_default(),
            max_attempts: opts
                .max_attempts
                .unwrap_or_else(|| A::retry_policy().max_attempts),
            timeout: opts.timeout.or_else(A::timeout),
        };
        self.check(&job)?;
        Ok(job)
    }

    /// Checks a prepared job against the limits.
    pub fn check(&self, job: &NewJob) -> Result<()> {
        job.validate(self.max_payload)
    }

    /// Enqueues a job with its type's defaults; returns its id once it is stored.
    pub async fn enqueue<A: JobArgs>(&self, args: A) -> Result<JobId> {
        self.enqueue_with(args, EnqueueOptions::default()).await
    }

    /// Enqueues a job with options.
    ///
    /// An explicit [`EnqueueOptions::id`] needs a backend that deduplicates by id; elsewhere it is
    /// [`Error::Unsupported`], since a retried enqueue would silently make a second job.
    pub async fn enqueue_with<A: JobArgs>(&self, args: A, opts: EnqueueOptions) -> Result<JobId> {
        if opts.id.is_some() {
            self.require(
                self.backend.capabilities().dedup_by_id,
                "enqueue with an explicit id",
            )?;
        }
        let job = self.prepare(&args, opts)?;
        let ids = self.backend.push(vec![job]).await?;
        ids.into_iter().next().ok_or_else(|| Error::Backend {
            backend: self.backend.name(),
            op: "push",
            source: "the backend stored no job".into(),
        })
    }

    /// Enqueues many jobs of one type in one call (all or nothing where the backend allows).
    pub async fn enqueue_batch<A: JobArgs>(
        &self,
        args: impl IntoIterator<Item = A>,
    ) -> Result<Vec<JobId>> {
        let jobs = args
            .into_iter()
            .map(|a| self.prepare(&a, EnqueueOptions::default()))
            .collect::<Result<Vec<_>>>()?;
        self.enqueue_raw(jobs).await
    }

    /// Enqueues many jobs of one type with the same options (queue, priority, delay, …).
    ///
    /// [`EnqueueOptions::id`] makes no sense for a batch and is refused as
    /// [`Error::InvalidJob`].
    pub async fn enqueue_batch_with<A: JobArgs>(
        &self,
        args: impl IntoIterator<Item = A>,
        opts: EnqueueOptions,
    ) -> Result<Vec<JobId>> {
        if opts.id.is_some() {
            return Err(Error::InvalidJob(
                "a batch cannot share one explicit id".into(),
            ));
        }
        let jobs = args
            .into_iter()
            .map(|a| self.prepare(&a, opts.clone()))
            .collect::<Result<Vec<_>>>()?;
        self.enqueue_raw(jobs).await
    }

    /// Enqueues prepared jobs (of any types) in one call.
    pub async fn enqueue_raw(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>> {
        for job in &jobs {
            self.check(job)?;
        }
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        self.backend.push(jobs).await
    }

    fn require(&self, cap: bool, what: &'static str) -> Result<()> {
        if cap {
            Ok(())
        } else {
            Err(Error::Unsupported {
                backend: self.backend.name(),
                what,
            })
        }
    }

    /// One job by id.
    pub async fn get(&self, id: JobId) -> Result<Option<Job>> {
        self.require(self.backend.capabilities().get_job, "getting a job by id")?;
        self.backend.get(id).await
    }

    /// Jobs matching a filter.
    pub async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let caps = self.backend.capabilities();
        let dead_only = filter.state == Some(JobState::Dead) && caps.list_dead;
        self.require(caps.list_jobs || dead_only, "listing jobs")?;
        self.backend.list(filter).await
    }

    /// Counts by state, for one queue or all.
    pub async fn counts(&self, queue: Option<&str>) -> Result<Counts> {
        self.backend.counts(queue).await
    }

    /// Removes a waiting job; `false` if it was not waiting (running, finished or gone).
    pub async fn cancel(&self, id: JobId) -> Result<bool> {
        self.require(self.backend.capabilities().cancel, "cancelling a job")?;
        self.backend.cancel(id).await
    }

    /// Makes a dead job ready again with fresh attempts.
    pub async fn retry_dead(&self, id: JobId) -> Result<bool> {
        self.backend.retry_dead(id).await
    }

    /// Deletes a job that is not running.
    pub async fn delete(&self, id: JobId) -> Result<bool> {
        self.backend.delete(id).await
    }

    /// Deletes every job in a state (not `Running`), for one queue or all.
    pub async fn purge(&self, state: JobState, queue: Option<&str>) -> Result<u64> {
        if state == JobState::Running {
            return Err(Error::InvalidJob(
                "running jobs cannot be purged; cancel them by stopping their server".into(),
            ));
        }
        self.backend.purge(state, queue).await
    }
}
