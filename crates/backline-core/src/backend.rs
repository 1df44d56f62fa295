//! The provider SPI: the one trait a storage provider implements.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::{JobId, JobState, Priority, Result};

/// When a new job becomes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunAt {
    /// Due at once.
    #[default]
    Now,
    /// Due this long after the backend stores it (measured by the backend's clock).
    After(Duration),
    /// Due at this instant; an instant in the past means now.
    At(DateTime<Utc>),
}

/// A job to store, as the [`JobManager`](crate::JobManager) prepared it (arguments encoded).
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The id, made by the client; storing a job whose id exists is a no-op where the backend
    /// has [`Capabilities::dedup_by_id`].
    pub id: JobId,
    /// The job name ([`JobArgs::NAME`](crate::JobArgs::NAME)).
    pub name: String,
    /// The queue.
    pub queue: String,
    /// The encoded arguments.
    pub payload: Vec<u8>,
    /// The priority.
    pub priority: Priority,
    /// When it becomes due.
    pub run_at: RunAt,
    /// The most attempts it gets (at least 1).
    pub max_attempts: u32,
    /// The limit on one attempt.
    pub timeout: Option<Duration>,
}

impl NewJob {
    /// Checks a job before it is stored, whichever way it goes in ([`JobManager`](crate::JobManager)
    /// or a provider's own transactional enqueue): a valid job name and queue
    /// ([`validate_name`](crate::validate_name)), at least one attempt, and an encoded payload
    /// of at most `max_payload` bytes.
    pub fn validate(&self, max_payload: usize) -> crate::Result<()> {
        crate::validate_name("job", &self.name)?;
        crate::validate_name("queue", &self.queue)?;
        if self.max_attempts == 0 {
            return Err(crate::Error::InvalidJob(format!(
                "job {} needs at least one attempt",
                self.name
            )));
        }
        if self.payload.len() > max_payload {
            return Err(crate::Error::PayloadTooLarge {
                name: self.name.clone(),
                size: self.payload.len(),
                limit: max_payload,
            });
        }
        Ok(())
    }
}

/// A stored job, as inspection and claims return it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The id.
    pub id: JobId,
    /// The job name.
    pub name: String,
    /// The queue.
    pub queue: String,
    /// The encoded arguments.
    pub payload: Vec<u8>,
    /// The priority.
    pub priority: Priority,
    /// The state.
    pub state: JobState,
    /// Attempts started so far (counted when claimed).
    pub attempt: u32,
    /// The most attempts it gets.
    pub max_attempts: u32,
    /// The limit on one attempt.
    pub timeout: Option<Duration>,
    /// When it was stored.
    pub enqueued_at: DateTime<Utc>,
    /// When it is (or was) due.
    pub run_at: DateTime<Utc>,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// When the current lease ends (running jobs).
    pub lease_until: Option<DateTime<Utc>>,
    /// When it succeeded or died.
    pub finished_at: Option<DateTime<Utc>>,
}

/// The fencing token of one claim: a finish or heartbeat with an older token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(pub u64);

impl LeaseToken {
    /// A random token.
    pub fn random() -> Self {
        LeaseToken(fastrand::u64(1..))
    }
}

/// A job claimed under a lease.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    /// The job, in state `Running`, with its attempt already counted.
    pub job: Job,
    /// The fencing token of this claim.
    pub token: LeaseToken,
}

/// What to claim.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// The queue to claim from.
    pub queue: &'a str,
    /// Only jobs with these names (the server's registered handlers).
    ///
    /// A backend without [`Capabilities::filter_by_name`] may return other names; the server
    /// then fails them as retryable with a reason naming the job.
    pub names: &'a [String],
    /// At most this many jobs.
    pub limit: usize,
    /// The lease each claimed job gets.
    pub lease: Duration,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It succeeded. With `keep: false` the job is deleted at once (retention 0).
    Succeeded {
        /// Keep the record until retention prunes it.
        keep: bool,
    },
    /// It failed and runs again after `delay` (backend clock).
    Retry {
        /// The wait before the next attempt.
        delay: Duration,
        /// The reason, stored as `last_error`.
        error: String,
    },
    /// It failed for good.
    Dead {
        /// The reason, stored as `last_error`.
        error: String,
    },
    /// Hand the job back without spending the attempt (shutdown): it is `Ready` again at once.
    Release,
}

/// One finished attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// The job.
    pub id: JobId,
    /// The token of the claim that ran it.
    pub token: LeaseToken,
    /// How it ended.
    pub outcome: Outcome,
}

/// What the periodic maintenance does in one call; each part is bounded by `batch`.
#[derive(Debug, Clone, Copy)]
pub struct Maintenance {
    /// The most rows or entries each part touches.
    pub batch: usize,
    /// Succeeded jobs older than this are removed.
    pub succeeded_ttl: Duration,
    /// Dead jobs older than this are removed.
    pub dead_ttl: Duration,
}

/// What one maintenance call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Scheduled or retrying jobs made ready.
    pub promoted: u64,
    /// Running jobs whose lease expired, made ready again.
    pub recovered: u64,
    /// Running jobs whose lease expired on their last attempt, now dead.
    pub expired_dead: u64,
    /// Succeeded and dead jobs removed by retention.
    pub pruned: u64,
}

impl MaintenanceReport {
    /// Whether some part used its whole batch, so another call right away has work.
    pub fn is_saturated(&self, batch: usize) -> bool {
        let b = batch as u64;
        self.promoted >= b || self.recovered + self.expired_dead >= b || self.pruned >= b
    }
}

/// Which jobs to list.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only this state.
    pub state: Option<JobState>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this job name.
    pub name: Option<String>,
    /// At most this many (0 means 100).
    pub limit: usize,
    /// Skip this many (ordered by id, oldest first).
    pub offset: usize,
}

/// How many jobs are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Waiting for a first run-at in the future.
    pub scheduled: u64,
    /// Due.
    pub ready: u64,
    /// Claimed.
    pub running: u64,
    /// Waiting for a retry.
    pub retrying: u64,
    /// Succeeded and kept.
    pub succeeded: u64,
    /// Dead and kept.
    pub dead: u64,
}

impl Counts {
    /// The count for one state.
    pub fn get(&self, state: JobState) -> u64 {
        match state {
            JobState::Scheduled => self.scheduled,
            JobState::Ready => self.ready,
            JobState::Running => self.running,
            JobState::Retrying => self.retrying,
            JobState::Succeeded => self.succeeded,
            JobState::Dead => self.dead,
        }
    }

    /// A mutable count for one state.
    pub fn get_mut(&mut self, state: JobState) -> &mut u64 {
        match state {
            JobState::Scheduled => &mut self.scheduled,
            JobState::Ready => &mut self.ready,
            JobState::Running => &mut self.running,
            JobState::Retrying => &mut self.retrying,
            JobState::Succeeded => &mut self.succeeded,
            JobState::Dead => &mut self.dead,
        }
    }

    /// All jobs counted.
    pub fn total(&self) -> u64 {
        JobState::ALL.iter().map(|s| self.get(*s)).sum()
    }
}

/// What a backend can do beyond the core contract.
///
/// A call that needs a missing capability returns [`Error::Unsupported`](crate::Error::Unsupported),
/// never a silent approximation.
///
/// A provider starts from [`Capabilities::NONE`] and opts in flag by flag, so that a flag added
/// by a later version of Backline is off for it until it says otherwise (the struct is
/// `#[non_exhaustive]`: it cannot be written as a literal outside this crate):
///
/// ```
/// use backline_core::Capabilities;
/// let caps = Capabilities::NONE
///     .with_durable(true)
///     .with_filter_by_name(true)
///     .with_priorities(true);
/// assert!(caps.durable && !caps.locks);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Storing a job whose id exists is a no-op (a retried `enqueue` makes no second job).
    pub dedup_by_id: bool,
    /// Claims honour [`ClaimRequest::names`].
    pub filter_by_name: bool,
    /// `get` answers for any job.
    pub get_job: bool,
    /// `list` answers.
    pub list_jobs: bool,
    /// `cancel` removes a waiting job.
    pub cancel: bool,
    /// Enqueue inside the caller's database transaction (provider-specific API).
    pub transactional_enqueue: bool,
    /// The `lock_*` methods work.
    pub locks: bool,
    /// An acknowledged job survives a restart of the process.
    pub durable: bool,
    /// A lease ends when its time runs out: a claim neither finished nor heartbeated in time is
    /// claimed again (with a fresh token). Without it (a message broker), the lease is the
    /// delivery itself: it holds until the claiming connection dies, heartbeats are no-ops,
    /// and a job whose worker died is redelivered when the broker sees its connection close.
    pub lease_expiry: bool,
    /// Among due jobs of equal priority, the earlier run-at runs first. Without it (a broker's
    /// FIFO queue), due jobs of equal priority run in the order they became due.
    pub run_at_order: bool,
    /// `list` answers for dead jobs (`state: Some(Dead)`) even without
    /// [`list_jobs`](Self::list_jobs): a browse of the dead letters.
    pub list_dead: bool,
    /// Among due jobs, a higher priority runs first. Without it (RabbitMQ's quorum queues have
    /// no priorities), due jobs run in the order they became due, whatever their priority.
    pub priorities: bool,
}

macro_rules! capability_setters {
    ($($field:ident => $setter:ident),* $(,)?) => {
        impl Capabilities {
            /// No capability: where a provider starts.
            pub const NONE: Capabilities = Capabilities { $($field: false),* };

            /// Every capability (for tests and docs; a provider builds from [`NONE`](Self::NONE)).
            pub const ALL: Capabilities = Capabilities { $($field: true),* };

            $(
                #[doc = concat!("Sets [`", stringify!($field), "`](Self::", stringify!($field), ").")]
                pub const fn $setter(mut self, on: bool) -> Self {
                    self.$field = on;
                    self
                }
            )*
        }
    };
}

capability_setters! {
    dedup_by_id => with_dedup_by_id,
    filter_by_name => with_filter_by_name,
    get_job => with_get_job,
    list_jobs => with_list_jobs,
    cancel => with_cancel,
    transactional_enqueue => with_transactional_enqueue,
    locks => with_locks,
    durable => with_durable,
    lease_expiry => with_lease_expiry,
    run_at_order => with_run_at_order,
    list_dead => with_list_dead,
    priorities => with_priorities,
}

/// The storage of jobs: the one trait a provider implements.
///
/// The [`JobServer`](crate::JobServer), the [`JobManager`](crate::JobManager) and the
/// inspection API hold it as `Arc<dyn Backend>`; providers never write enqueue or retry logic.
///
/// # Contract
///
/// - **Durable push**: `push` returns only once every job is stored; a batch is all or nothing
///   where the backend allows (the provider documents it otherwise).
/// - **Order**: among due jobs of a queue, higher priority first, then earlier run-at, then
///   earlier id.
/// - **Attempts are counted at claim**, and a `Release` gives the attempt back.
/// - **Fencing**: `finish` and `heartbeat` apply only with the token of the current claim.
/// - **The backend's clock** decides when a job is due and when a lease expires.
/// - **Bounded work**: every call touches at most the batch it was given.
///
/// # Optional operations
///
/// The methods with a default body (`get`, `list`, `cancel`, `retry_dead`, `delete`, the
/// `lock_*` methods) are optional: the default returns
/// [`Error::Unsupported`](crate::Error::Unsupported), so a provider that cannot do one writes
/// nothing for it, and says so in [`capabilities`](Self::capabilities) (the conformance suite
/// checks, inside each scenario, that the two agree). A new optional operation is added the
/// same way, once, here:
///
/// 1. a method with a default body that returns `Error::unsupported(self.name(), "what")`;
/// 2. a [`Capabilities`] flag, off in [`Capabilities::NONE`], that providers opt into;
/// 3. a conformance scenario that exercises it where the flag is on and asserts
///    `Unsupported` where it is off.
///
/// No provider needs to change for the new version to build.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and errors (`"memory"`, `"postgres"`, …).
    fn name(&self) -> &'static str;

    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Stores jobs; returns their ids in order.
    ///
    /// # Contract
    /// Returns only when every job is stored. With `dedup_by_id`, a job whose id exists is left
    /// as it is and its id returned.
    async fn push(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>>;

    /// Claims up to `req.limit` due jobs of one queue, in priority order, under a lease.
    ///
    /// # Contract
    /// Each returned job is `Running`, its `attempt` incremented, `lease_until` set to the
    /// backend's now + `req.lease`, and a fresh token issued. Two concurrent claims never
    /// return the same job while its lease holds.
    async fn claim(&self, req: ClaimRequest<'_>) -> Result<Vec<ClaimedJob>>;

    /// Applies finished attempts; returns, per item, whether it applied.
    ///
    /// # Contract
    /// An item applies only if the job is `Running` with the same token; otherwise it is
    /// ignored (`false`): a newer claim owns the job.
    async fn finish(&self, batch: &[Finish]) -> Result<Vec<bool>>;

    /// Extends the leases of running jobs to now + `lease`; returns, per item, whether the lease was still held.
    async fn heartbeat(&self, leases: &[(JobId, LeaseToken)], lease: Duration)
        -> Result<Vec<bool>>;

    /// Waits until a job may have become due on `queue`, or `timeout` passes.
    ///
    /// # Contract
    /// `seen` is the value this method last returned (0 at first). It returns at once with a
    /// newer value when jobs were pushed to the queue since then, so a push between an empty
    /// claim and this call is never missed. A backend without a signal sleeps for `timeout`.
    /// Spurious returns are allowed.
    async fn wait(&self, queue: &str, seen: u64, timeout: Duration) -> Result<u64>;

    /// Housekeeping: promote due scheduled jobs, recover expired leases (dead when it was the
    /// last attempt), prune by retention. Each part bounded by `m.batch`.
    async fn maintain(&self, m: &Maintenance) -> Result<MaintenanceReport>;

    /// One job by id.
    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        let _ = id;
        Err(crate::Error::unsupported(
            self.name(),
            "getting a job by id",
        ))
    }

    /// Jobs matching a filter, ordered by id.
    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let _ = filter;
        Err(crate::Error::unsupported(self.name(), "listing jobs"))
    }

    /// How many jobs are in each state, for one queue or all.
    async fn counts(&self, queue: Option<&str>) -> Result<Counts>;

    /// Removes a waiting job (scheduled, ready or retrying); `false` if it was not waiting.
    async fn cancel(&self, id: JobId) -> Result<bool> {
        let _ = id;
        Err(crate::Error::unsupported(self.name(), "cancelling a job"))
    }

    /// Makes a dead job ready again with a fresh set of attempts; `false` if it was not dead.
    async fn retry_dead(&self, id: JobId) -> Result<bool> {
        let _ = id;
        Err(crate::Error::unsupported(
            self.name(),
            "retrying a dead job",
        ))
    }

    /// Removes a job that is not running; `false` if there was none (or it is running).
    async fn delete(&self, id: JobId) -> Result<bool> {
        let _ = id;
        Err(crate::Error::unsupported(self.name(), "deleting a job"))
    }

    /// Removes every job in `state` (never `Running`), for one queue or all; returns how many.
    async fn purge(&self, state: JobState, queue: Option<&str>) -> Result<u64>;

    /// Takes the named lock for `ttl` if it is free or expired (or held by `owner`).
    async fn lock_acquire(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let _ = (name, owner, ttl);
        Err(crate::Error::unsupported(self.name(), "distributed locks"))
    }

    /// Extends the lock if `owner` still holds it.
    async fn lock_renew(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let _ = (name, owner, ttl);
        Err(crate::Error::unsupported(self.name(), "distributed locks"))
    }

    /// Releases the lock if `owner` holds it.
    async fn lock_release(&self, name: &str, owner: LeaseToken) -> Result<bool> {
        let _ = (name, owner);
        Err(crate::Error::unsupported(self.name(), "distributed locks"))
    }
}

impl std::fmt::Debug for dyn Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backend({})", self.name())
    }
}

/// `Backend` must stay dyn-compatible: this stops compiling if it does not.
const _: Option<&dyn Backend> = None;
