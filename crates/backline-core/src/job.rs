//! Background jobs: arguments, handlers, their errors and their context.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::RetryPolicy;

/// The identity of a job: a UUIDv7, made by the client before the write.
///
/// Because the id exists before the job is stored, an `enqueue` retried after a time-out
/// does not create a second job on providers that deduplicate by id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(uuid::Uuid);

impl JobId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        JobId(uuid::Uuid::now_v7())
    }

    /// Wraps an existing UUID.
    pub fn from_uuid(id: uuid::Uuid) -> Self {
        JobId(id)
    }

    /// The UUID.
    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }

    /// The 16 bytes of the UUID.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0)
    }
}

impl std::str::FromStr for JobId {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        uuid::Uuid::parse_str(s)
            .map(JobId)
            .map_err(|e| crate::Error::Config(format!("`{s}` is not a job id: {e}")))
    }
}

/// A job's priority: among due jobs, higher runs first.
///
/// ABP's five levels, with ABP's numeric values (stored by providers as the number).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub enum Priority {
    /// 5
    Low,
    /// 10
    BelowNormal,
    /// 15, the default.
    #[default]
    Normal,
    /// 20
    AboveNormal,
    /// 25
    High,
}

impl Priority {
    /// All levels, lowest first.
    pub const ALL: [Priority; 5] = [
        Priority::Low,
        Priority::BelowNormal,
        Priority::Normal,
        Priority::AboveNormal,
        Priority::High,
    ];

    /// ABP's number for this level (5, 10, 15, 20, 25).
    pub fn value(self) -> i16 {
        match self {
            Priority::Low => 5,
            Priority::BelowNormal => 10,
            Priority::Normal => 15,
            Priority::AboveNormal => 20,
            Priority::High => 25,
        }
    }

    /// The level for a stored number; numbers between levels round down, out of range clamps.
    pub fn from_value(v: i16) -> Priority {
        match v {
            i16::MIN..=9 => Priority::Low,
            10..=14 => Priority::BelowNormal,
            15..=19 => Priority::Normal,
            20..=24 => Priority::AboveNormal,
            _ => Priority::High,
        }
    }
}

/// Where a job is in its life.
///
/// `Scheduled` → `Ready` → `Running` → `Succeeded`; a failed attempt goes to `Retrying` (waiting
/// for its next run-at, then `Ready` again) or to `Dead` (fatal error, attempts exhausted, or past
/// its `max_age`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for a run-at in the future (first attempt).
    Scheduled,
    /// Due: may be claimed now.
    Ready,
    /// Claimed by a worker under a lease.
    Running,
    /// Waiting for its next attempt after a retryable failure.
    Retrying,
    /// Finished successfully (kept for the retention period).
    Succeeded,
    /// Will not run again unless an operator retries it.
    Dead,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 6] = [
        JobState::Scheduled,
        JobState::Ready,
        JobState::Running,
        JobState::Retrying,
        JobState::Succeeded,
        JobState::Dead,
    ];

    /// The lowercase name used in storage and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Ready => "ready",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Succeeded => "succeeded",
            JobState::Dead => "dead",
        }
    }

    /// Parses [`JobState::as_str`].
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the job waits to run (scheduled, ready or retrying): what `cancel` can remove.
    pub fn is_waiting(self) -> bool {
        matches!(
            self,
            JobState::Scheduled | JobState::Ready | JobState::Retrying
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The arguments of one kind of job, with the stable name that ties stored jobs to handlers.
///
/// `NAME` is ABP's `[BackgroundJobName]`: it is stored with every job, so keep it stable when
/// the Rust type is renamed. The other items are per-type defaults that
/// [`EnqueueOptions`](crate::EnqueueOptions) can override for one job.
///
/// ```
/// use backline_core::{JobArgs, Priority};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct WelcomeEmail { to: String }
///
/// impl JobArgs for WelcomeEmail {
///     const NAME: &'static str = "emails.welcome";
///     fn priority() -> Priority { Priority::AboveNormal }
/// }
/// ```
pub trait JobArgs: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable job name.
    const NAME: &'static str;

    /// The queue jobs of this type go to (default `"default"`).
    fn queue() -> &'static str {
        crate::DEFAULT_QUEUE
    }

    /// The default priority.
    fn priority() -> Priority {
        Priority::Normal
    }

    /// How failures are retried; its `max_attempts` is stored with each job.
    fn retry_policy() -> RetryPolicy {
        RetryPolicy::default()
    }

    /// The limit on one attempt: past it the attempt is cancelled and counts as a retryable failure.
    fn timeout() -> Option<Duration> {
        None
    }
}

/// A handler for one kind of job.
///
/// Write `execute` as a plain `async fn`; the future must be `Send`.
///
/// ```
/// use backline_core::{BackgroundJob, JobArgs, JobContext, JobError};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct WelcomeEmail { to: String }
/// # impl JobArgs for WelcomeEmail { const NAME: &'static str = "emails.welcome"; }
///
/// struct SendWelcomeEmail;
///
/// impl BackgroundJob for SendWelcomeEmail {
///     type Args = WelcomeEmail;
///     async fn execute(&self, args: WelcomeEmail, ctx: JobContext) -> Result<(), JobError> {
///         println!("attempt {}: mailing {}", ctx.attempt(), args.to);
///         Ok(())
///     }
/// }
/// ```
pub trait BackgroundJob: Send + Sync + 'static {
    /// The arguments this handler takes.
    type Args: JobArgs;

    /// Runs one attempt of the job.
    ///
    /// Return `Err(JobError::retryable(..))` (what `?` gives) to try again after a back-off,
    /// `JobError::fatal(..)` to give up, `JobError::retry_after(d)` to try again after `d`
    /// without escalating the back-off. A panic counts as a retryable failure.
    fn execute(
        &self,
        args: Self::Args,
        ctx: JobContext,
    ) -> impl Future<Output = Result<(), JobError>> + Send;
}

/// What kind of failure a [`JobError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Try again after the retry policy's back-off (while attempts remain).
    Retryable,
    /// Do not try again: the job goes to `Dead`.
    Fatal,
    /// Try again after exactly this delay, without escalating the back-off.
    RetryAfter(Duration),
}

/// The failure of one attempt of a job.
///
/// Like `anyhow::Error`, it does not implement `std::error::Error` itself, so that `?` converts
/// any error into a retryable `JobError`.
pub struct JobError {
    kind: FailureKind,
    message: String,
    source: Option<crate::BoxError>,
}

impl JobError {
    /// A failure worth retrying.
    pub fn retryable(e: impl Into<crate::BoxError>) -> Self {
        Self::from_boxed(FailureKind::Retryable, e.into())
    }

    /// A failure that no retry will fix: the job goes to `Dead` at once.
    pub fn fatal(e: impl Into<crate::BoxError>) -> Self {
        Self::from_boxed(FailureKind::Fatal, e.into())
    }

    /// Try again after `delay` (e.g. a rate-limited API); the attempt is used, the back-off is not escalated.
    pub fn retry_after(delay: Duration) -> Self {
        JobError {
            kind: FailureKind::RetryAfter(delay),
            message: format!("retry requested after {delay:?}"),
            source: None,
        }
    }

    /// A retryable failure with a message.
    pub fn msg(message: impl Into<String>) -> Self {
        JobError {
            kind: FailureKind::Retryable,
            message: message.into(),
            source: None,
        }
    }

    fn from_boxed(kind: FailureKind, e: crate::BoxError) -> Self {
        let mut message = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        JobError {
            kind,
            message,
            source: Some(e),
        }
    }

    /// Makes this failure fatal.
    pub fn into_fatal(mut self) -> Self {
        self.kind = FailureKind::Fatal;
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The message stored as the job's last error (the whole source chain).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The original error, if any.
    pub fn source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for JobError {
    fn from(e: E) -> Self {
        JobError::retryable(e)
    }
}

impl fmt::Debug for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Shared application state handed to jobs and workers, by type.
#[derive(Clone, Default)]
pub struct Extensions {
    map: Arc<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl Extensions {
    /// Adds a value (replacing one of the same type).
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        Arc::make_mut(&mut self.map).insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T`, if one was added.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.map
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.map.len())
            .finish()
    }
}

/// What a running job knows about itself, and its two signals.
///
/// - [`shutdown`](JobContext::shutdown) resolves when the server starts draining: finish soon or checkpoint.
/// - [`cancelled`](JobContext::cancelled) resolves when the attempt must stop now (the grace
///   period is over, the timeout passed, or the lease was lost); soon after, its future is dropped.
#[derive(Clone, Debug)]
pub struct JobContext {
    pub(crate) id: JobId,
    pub(crate) name: Arc<str>,
    pub(crate) queue: Arc<str>,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) enqueued_at: DateTime<Utc>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) cancel: CancellationToken,
    pub(crate) data: Extensions,
}

impl JobContext {
    /// The job's id.
    pub fn id(&self) -> JobId {
        self.id
    }
    /// The job's name ([`JobArgs::NAME`]).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The queue it was claimed from.
    pub fn queue(&self) -> &str {
        &self.queue
    }
    /// This attempt's number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The most attempts the job gets.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
    /// When the job was enqueued.
    pub fn enqueued_at(&self) -> DateTime<Utc> {
        self.enqueued_at
    }
    /// Resolves when the server begins a graceful shutdown.
    pub async fn shutdown(&self) {
        self.shutdown.cancelled().await
    }
    /// Whether a graceful shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }
    /// Resolves when this attempt must stop now.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
    /// Whether this attempt must stop now.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
    /// The cancellation token of this attempt, to hand to other tasks.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
    /// Shared state of type `T` registered on the server with `JobServerBuilder::data`.
    pub fn data<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.data.get::<T>()
    }
}
