//! What the drivers share: state names, the row → `Job` mapping, error mapping, tokens.

use std::collections::HashSet;
use std::time::Duration;

use backline_core::{Error, Finish, Job, JobId, JobState, LeaseToken, Priority};
use chrono::{DateTime, Utc};

/// A job row in portable types, as each driver decodes it.
pub(crate) struct RawJob {
    pub(crate) id: uuid::Uuid,
    pub(crate) name: String,
    pub(crate) queue: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) priority: i16,
    pub(crate) state: String,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    pub(crate) timeout_ms: Option<i64>,
    pub(crate) enqueued_at: DateTime<Utc>,
    pub(crate) run_at: DateTime<Utc>,
    pub(crate) last_error: Option<String>,
    pub(crate) lease_until: Option<DateTime<Utc>>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
}

impl RawJob {
    pub(crate) fn into_job(self, backend: &'static str) -> backline_core::Result<Job> {
        let state = JobState::parse(&self.state).ok_or_else(|| Error::Backend {
            backend,
            op: "decode a job",
            source: format!("unknown state `{}` in job {}", self.state, self.id).into(),
        })?;
        Ok(Job {
            id: JobId::from_uuid(self.id),
            name: self.name,
            queue: self.queue,
            payload: self.payload,
            priority: Priority::from_value(self.priority),
            state,
            attempt: u32::try_from(self.attempt).unwrap_or(0),
            max_attempts: u32::try_from(self.max_attempts).unwrap_or(1),
            timeout: self
                .timeout_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .map(Duration::from_millis),
            enqueued_at: self.enqueued_at,
            run_at: self.run_at,
            last_error: self.last_error,
            lease_until: self.lease_until,
            finished_at: self.finished_at,
        })
    }
}

/// Claimed jobs in claim order (higher priority, earlier run-at, earlier id).
pub(crate) fn sort_claimed(jobs: &mut [backline_core::ClaimedJob]) {
    jobs.sort_by(|a, b| {
        (std::cmp::Reverse(a.job.priority), a.job.run_at, a.job.id).cmp(&(
            std::cmp::Reverse(b.job.priority),
            b.job.run_at,
            b.job.id,
        ))
    });
}

/// A token as stored (the bits of the `u64` in a signed 64-bit column).
pub(crate) fn token_to_db(t: LeaseToken) -> i64 {
    i64::from_ne_bytes(t.0.to_ne_bytes())
}

/// A stored token.
#[cfg(feature = "postgres")]
pub(crate) fn token_from_db(v: i64) -> LeaseToken {
    LeaseToken(u64::from_ne_bytes(v.to_ne_bytes()))
}

/// Microseconds of a duration, saturating.
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Milliseconds of an optional timeout, saturating.
pub(crate) fn timeout_ms(d: Option<Duration>) -> Option<i64> {
    d.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The index of the first finish item of each job: a later item for the same job never
/// applies (the first one ended the claim), so only these are sent to the database.
pub(crate) fn first_per_job(batch: &[Finish]) -> Vec<usize> {
    let mut seen = HashSet::with_capacity(batch.len());
    (0..batch.len())
        .filter(|&i| seen.insert(batch[i].id))
        .collect()
}

/// `?, ?, …` for `n` parameters.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// The most ids bound in one `IN (…)` list.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) const ID_CHUNK: usize = 500;

/// A finish batch split by what can be written in one statement per group: the items whose
/// token is the current one (`held`: job → token of its running claim), by outcome.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
#[derive(Default)]
pub(crate) struct FinishPlan {
    /// Succeeded, not kept: deleted.
    pub(crate) drop: Vec<usize>,
    /// Succeeded and kept.
    pub(crate) succeeded: Vec<usize>,
    /// Handed back.
    pub(crate) release: Vec<usize>,
    /// Retries and dead jobs, each with its own delay or error: one statement each.
    pub(crate) one_by_one: Vec<usize>,
}

#[cfg(any(feature = "sqlite", feature = "mysql"))]
impl FinishPlan {
    pub(crate) fn new(
        batch: &[Finish],
        held: &std::collections::HashMap<JobId, i64>,
    ) -> FinishPlan {
        use backline_core::Outcome;
        let mut plan = FinishPlan::default();
        for i in first_per_job(batch) {
            let f = &batch[i];
            if held.get(&f.id) != Some(&token_to_db(f.token)) {
                continue;
            }
            match f.outcome {
                Outcome::Succeeded { keep: false } => plan.drop.push(i),
                Outcome::Succeeded { keep: true } => plan.succeeded.push(i),
                Outcome::Release => plan.release.push(i),
                Outcome::Retry { .. } | Outcome::Dead { .. } => plan.one_by_one.push(i),
            }
        }
        plan
    }
}

/// Maps a driver error: connection trouble is [`Error::Connection`], the rest [`Error::Backend`].
pub(crate) fn map_err(backend: &'static str, op: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Error::Connection {
            backend,
            op,
            source: Box::new(e),
        },
        // SQLSTATE class 08 (connection exception) and 57 (operator intervention: the server
        // is shutting down or killed this session) are connection trouble too.
        sqlx::Error::Database(ref db)
            if db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57")) =>
        {
            Error::Connection {
                backend,
                op,
                source: Box::new(e),
            }
        }
        other => Error::Backend {
            backend,
            op,
            source: Box::new(other),
        },
    }
}

/// Per-queue wake-up counters fed by pushes in this process (and NOTIFY on PostgreSQL).
#[derive(Default)]
pub(crate) struct Signals {
    map: std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>>,
}

impl Signals {
    pub(crate) fn sender(&self, queue: &str) -> tokio::sync::watch::Sender<u64> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(queue.to_owned())
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .clone()
    }

    /// Wakes the waiters of one queue.
    pub(crate) fn bump(&self, queue: &str) {
        self.sender(queue).send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Wakes every waiter (after a lost connection, when notifications may have been missed).
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    pub(crate) fn bump_all(&self) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for tx in map.values() {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Waits for a push to `queue` newer than `seen`, or `timeout`.
    pub(crate) async fn wait(&self, queue: &str, seen: u64, timeout: Duration) -> u64 {
        let mut rx = self.sender(queue).subscribe();
        let current = *rx.borrow_and_update();
        if current != seen {
            return current;
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(timeout) => {}
        }
        let v = *rx.borrow();
        v
    }
}

/// Opens one connection and closes it, so that an unreachable server is reported with its real
/// cause ("connection refused", "unknown database") instead of the pool's "timed out".
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) async fn probe<O>(
    backend: &'static str,
    options: &O,
    timeout: std::time::Duration,
) -> Result<(), Error>
where
    O: sqlx::ConnectOptions,
    O::Connection: Sized,
{
    use sqlx::Connection as _;
    match tokio::time::timeout(timeout, options.connect()).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(map_err(backend, "connect")(e)),
        Err(_) => Err(Error::Timeout {
            op: "connect",
            after: timeout,
        }),
    }
}
