#![doc = include_str!("../README.md")]

mod config;
mod scripts;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use backline_core::{
    Backend, Capabilities, ClaimRequest, ClaimedJob, Counts, Error, ErrorChain, Finish, Job,
    JobFilter, JobId, JobState, LeaseToken, Maintenance, MaintenanceReport, NewJob, Outcome,
    Priority, Result, RunAt,
};
use chrono::DateTime;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, RedisError, Value};

pub use config::{RedisConfig, DEFAULT_URL, URL_ENV};
use scripts::Scripts;

const NAME: &str = "redis";
/// Jobs per push script: a push is atomic per queue and per this many jobs.
const PUSH_CHUNK: usize = 1000;
/// Due delayed jobs one claim promotes before it claims.
const PROMOTE_PER_CLAIM: usize = 1000;
/// The most entries one maintenance script promotes, reaps or prunes (the caller loops).
const SCRIPT_BATCH: u64 = 1000;
/// The most entries one purge or listing step touches.
const STEP: usize = 1000;
/// Idle blocking connections kept for `wait`.
const IDLE_WAITERS: usize = 64;

/// Maps a driver error to [`Error::Connection`] (the server is unreachable or the link broke)
/// or [`Error::Backend`] (the server answered with an error).
fn map_err(op: &'static str) -> impl Fn(RedisError) -> Error {
    move |e| {
        if e.is_io_error()
            || e.is_connection_refusal()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            Error::Connection {
                backend: NAME,
                op,
                source: Box::new(e),
            }
        } else {
            Error::Backend {
                backend: NAME,
                op,
                source: Box::new(e),
            }
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// The keys of one queue; all share the hash tag `{prefix:queue}`, so a script on them runs
/// in one slot.
struct QueueKeys {
    base: String,
}

impl QueueKeys {
    fn new(prefix: &str, queue: &str) -> Self {
        QueueKeys {
            base: format!("{{{prefix}:{queue}}}"),
        }
    }
    fn key(&self, part: &str) -> String {
        format!("{}:{part}", self.base)
    }
    fn job_prefix(&self) -> String {
        self.key("j:")
    }
    fn job(&self, id: JobId) -> String {
        format!("{}:j:{id}", self.base)
    }
    /// The set that holds jobs in `state`.
    fn set(&self, state: JobState) -> String {
        self.key(match state {
            // The prefix of the per-name ready sets.
            JobState::Ready => "ready:",
            JobState::Scheduled => "sched",
            JobState::Retrying => "retry",
            JobState::Running => "run",
            JobState::Succeeded => "done",
            JobState::Dead => "dead",
        })
    }
}

/// Reads script replies.
fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other).and_then(|s| s.parse().ok()),
    }
}

fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => Vec::new(),
    }
}

/// The hash fields of a job, in the order of the scripts' `F` (a row is the id, then these).
const FIELDS: [&str; 13] = [
    "name", "queue", "payload", "pri", "state", "att", "max", "tmo", "enq", "run", "err", "lease",
    "fin",
];

/// A part of a stored job that is missing or holds a value Backline never writes there (a
/// hash rewritten by hand, by a migration script or by another client).
#[derive(Debug)]
struct BadField {
    /// Where the value is: `field NAME` for a hash field, or `id in the key`.
    field: String,
    /// What is wrong with the value, quoting it.
    problem: String,
}

impl BadField {
    fn new(field: &str, problem: impl Into<String>) -> Self {
        BadField {
            field: format!("field {field}"),
            problem: problem.into(),
        }
    }

    /// The typed error of `get`, and what `list` and the claim log: `job` is the id as stored.
    fn error(&self, job: &str) -> Error {
        Error::Undecodable {
            backend: NAME,
            job: job.to_owned(),
            field: self.field.clone(),
            problem: self.problem.clone(),
        }
    }

    /// The `err` of a job made dead for this, worded as the scripts' `kill` words it.
    fn reason(&self) -> String {
        format!(
            "the stored job cannot be read: {}: {}",
            self.field, self.problem
        )
    }
}

/// A stored value quoted for a message: its first 64 bytes (as the scripts quote it), as text.
fn quoted(b: &[u8]) -> String {
    if b.len() > 64 {
        format!("'{}…'", String::from_utf8_lossy(&b[..64]))
    } else {
        format!("'{}'", String::from_utf8_lossy(b))
    }
}

/// An integer as the scripts store it: an optional minus and 1 to 15 digits (exact in a Lua
/// double). The same rule as `problem` in the scripts' prelude.
fn stored_int(b: &[u8]) -> Option<i64> {
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// A job from a row `[id, FIELDS…]` (an `HMGET` of [`FIELDS`] after the id), or the first part
/// that does not read.
///
/// The rules are those of the scripts' prelude (keep the two in step): integers as
/// [`stored_int`] reads them, the priority within the five levels (5 to 25), attempts from 0,
/// at least one attempt allowed, time-out not negative; the time-out, lease and finish time may
/// be absent or empty; name, queue, payload and state must be present, the state one of the six.
/// Nothing is clamped or defaulted: a value out of its range is reported, not hidden.
fn parse_job(v: &[Value]) -> Result<Job, BadField> {
    // Index `i` of the row is FIELDS[i - 1]; `None` for an absent field.
    let at = |i: usize| v.get(i).and_then(bytes);
    let name = |i: usize| {
        i.checked_sub(1)
            .and_then(|j| FIELDS.get(j))
            .copied()
            .unwrap_or("id")
    };
    let present = |i: usize| at(i).ok_or_else(|| BadField::new(name(i), "missing"));
    let number = |b: &[u8], i: usize| {
        stored_int(b)
            .ok_or_else(|| BadField::new(name(i), format!("{} is not a number", quoted(b))))
    };
    let ranged = |i: usize, lo: i64, hi: i64| {
        let b = present(i)?;
        let n = number(b, i)?;
        if n < lo || n > hi {
            return Err(BadField::new(
                name(i),
                format!("{} is out of range ({lo} to {hi})", quoted(b)),
            ));
        }
        Ok(n)
    };
    let optional = |i: usize| match at(i) {
        None | Some(b"") => Ok(None),
        Some(b) => number(b, i).map(Some),
    };
    let to_time = |i: usize, ms: i64| {
        DateTime::from_timestamp_millis(ms)
            .ok_or_else(|| BadField::new(name(i), format!("{ms} ms is out of range as a time")))
    };
    let required_time = |i: usize| {
        let b = present(i)?;
        to_time(i, number(b, i)?)
    };
    let optional_time = |i: usize| optional(i)?.map(|ms| to_time(i, ms)).transpose();
    let text_of = |i: usize| present(i).map(|b| String::from_utf8_lossy(b).into_owned());

    let id = at(0).unwrap_or_default();
    let id = std::str::from_utf8(id)
        .ok()
        .and_then(|s| s.parse::<uuid::Uuid>().ok())
        .ok_or_else(|| BadField {
            field: "id in the key".to_owned(),
            problem: format!("{} is not a UUID", quoted(id)),
        })?;
    let state = text_of(5)?;
    let state = JobState::parse(&state).ok_or_else(|| {
        BadField::new(
            "state",
            format!("{} is not a job state", quoted(state.as_bytes())),
        )
    })?;
    let levels = i64::from(Priority::Low.value())..=i64::from(Priority::High.value());
    let priority = ranged(4, *levels.start(), *levels.end())?;
    let timeout = match optional(8)? {
        None => None,
        Some(ms) if ms >= 0 => Some(Duration::from_millis(ms.unsigned_abs())),
        Some(_) => {
            let b = at(8).unwrap_or_default();
            return Err(BadField::new("tmo", format!("{} is below 0", quoted(b))));
        }
    };
    let u32_max = i64::from(u32::MAX);
    let mut job = Job::new(
        JobId::from_uuid(id),
        text_of(1)?,
        text_of(2)?,
        present(3)?.to_vec(),
    );
    job.priority = Priority::from_value(i16::try_from(priority).unwrap_or_default());
    job.state = state;
    job.attempt = u32::try_from(ranged(6, 0, u32_max)?).unwrap_or_default();
    job.max_attempts = u32::try_from(ranged(7, 1, u32_max)?).unwrap_or(1);
    job.timeout = timeout;
    job.enqueued_at = required_time(9)?;
    job.run_at = required_time(10)?;
    job.last_error = at(11).map(|b| String::from_utf8_lossy(b).into_owned());
    job.lease_until = optional_time(12)?;
    job.finished_at = optional_time(13)?;
    Ok(job)
}

/// One item of a FINISH script: the id and token as stored, the kind (`s`, `x`, `r`, `d`,
/// `l`), the retry delay in ms and the error text.
struct FinishItem {
    id: String,
    token: String,
    kind: &'static str,
    delay: i64,
    error: String,
}

/// Logs, at error, the jobs a script made dead because their fields do not read: `killed` is
/// the script's `KILLED`, `{id, 'field F', problem}` each.
fn log_killed(queue: &str, killed: Option<Value>) {
    for entry in killed.map(array).unwrap_or_default() {
        let entry = array(entry);
        let part = |i: usize| entry.get(i).and_then(text).unwrap_or_default();
        let e = Error::Undecodable {
            backend: NAME,
            job: part(0),
            field: part(1),
            problem: part(2),
        };
        tracing::error!(queue = %queue, error = %ErrorChain(&e), "a stored job cannot be read; it is dead");
    }
}

struct Inner {
    config: RedisConfig,
    client: redis::Client,
    conn: ConnectionManager,
    /// Connections without a response time-out, for `BLPOP`; one per concurrent wait.
    waiters: Mutex<Vec<MultiplexedConnection>>,
    scripts: Scripts,
    /// Queues this handle has recorded in the set of known queues.
    registered: Mutex<HashSet<String>>,
    /// The queue of each job this handle has claimed and not yet finished.
    claimed: Mutex<HashMap<JobId, String>>,
    /// Where the next maintenance starts among the queues, so that none starves.
    rotation: AtomicUsize,
}

/// The Redis provider: job hashes and per-queue sorted sets, changed only by Lua scripts.
///
/// Clones share the connections. See the crate documentation for the key layout and the
/// durability caveat.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("config", &self.inner.config)
            .finish()
    }
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl RedisBackend {
    /// Connects (and fails with [`Error::Connection`] if the server cannot be reached).
    ///
    /// Later connection losses are repaired by reconnecting; calls made while the server is
    /// down fail with [`Error::Connection`] naming the operation.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let client = redis::Client::open(config.url.as_str()).map_err(|e| {
            Error::Config(format!(
                "invalid redis URL {} ({:?})",
                config.redacted_url(),
                e.kind()
            ))
        })?;
        let mgr_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.connect_timeout))
            .set_number_of_retries(config.reconnect_retries)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client.clone(), mgr_config)
            .await
            .map_err(|e| Error::Connection {
                backend: NAME,
                op: "connect",
                source: Box::new(e),
            })?;
        tracing::debug!(url = %config.redacted_url(), prefix = %config.prefix, "connected to redis");
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                config,
                client,
                conn,
                waiters: Mutex::new(Vec::new()),
                scripts: Scripts::new(),
                registered: Mutex::new(HashSet::new()),
                claimed: Mutex::new(HashMap::new()),
                rotation: AtomicUsize::new(0),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    fn keys(&self, queue: &str) -> QueueKeys {
        QueueKeys::new(&self.inner.config.prefix, queue)
    }

    fn queues_key(&self) -> String {
        format!("{}:queues", self.inner.config.prefix)
    }

    fn lock_key(&self, name: &str) -> String {
        format!("{}:lock:{name}", self.inner.config.prefix)
    }

    /// Records `queue` in the set of known queues (once per handle).
    async fn register(&self, queue: &str) -> Result<()> {
        if guard(&self.inner.registered).contains(queue) {
            return Ok(());
        }
        let _: i64 = redis::cmd("SADD")
            .arg(self.queues_key())
            .arg(queue)
            .query_async(&mut self.conn())
            .await
            .map_err(map_err("push"))?;
        guard(&self.inner.registered).insert(queue.to_owned());
        Ok(())
    }

    /// Every queue that ever had a job.
    async fn queues(&self, op: &'static str) -> Result<Vec<String>> {
        let mut q: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.queues_key())
            .query_async(&mut self.conn())
            .await
            .map_err(map_err(op))?;
        q.sort();
        Ok(q)
    }

    /// The queue a job lives in: from this handle's claims, else by probing the known queues.
    async fn find_queue(&self, id: JobId, op: &'static str) -> Result<Option<String>> {
        if let Some(q) = guard(&self.inner.claimed).get(&id) {
            return Ok(Some(q.clone()));
        }
        let queues = self.queues(op).await?;
        for chunk in queues.chunks(STEP) {
            let mut pipe = redis::pipe();
            for q in chunk {
                pipe.cmd("EXISTS").arg(self.keys(q).job(id));
            }
            let found: Vec<i64> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(map_err(op))?;
            if let Some(i) = found.iter().position(|n| *n > 0) {
                return Ok(Some(chunk[i].clone()));
            }
        }
        Ok(None)
    }

    /// Reads the jobs `ids` of `queue`: each id with its job or the part of it that does not
    /// read. An id whose hash is gone (none of [`FIELDS`] present) is left out.
    async fn fetch(
        &self,
        queue: &str,
        ids: &[String],
        op: &'static str,
    ) -> Result<Vec<(String, Result<Job, BadField>)>> {
        let keys = self.keys(queue);
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(format!("{}{id}", keys.job_prefix()))
                .arg(&FIELDS[..]);
        }
        let rows: Vec<Value> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(map_err(op))?;
        Ok(ids
            .iter()
            .zip(rows)
            .filter_map(|(id, row)| {
                let fields = array(row);
                if fields.iter().all(|f| matches!(f, Value::Nil)) {
                    return None;
                }
                let mut v = vec![Value::BulkString(id.as_bytes().to_vec())];
                v.extend(fields);
                Some((id.clone(), parse_job(&v)))
            })
            .collect())
    }

    /// A blocking-capable connection: one without a response time-out.
    async fn waiter(&self) -> Result<MultiplexedConnection> {
        if let Some(c) = guard(&self.inner.waiters).pop() {
            return Ok(c);
        }
        let cfg = AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(self.inner.config.connect_timeout));
        self.inner
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(map_err("wait"))
    }

    fn return_waiter(&self, c: MultiplexedConnection) {
        let mut w = guard(&self.inner.waiters);
        if w.len() < IDLE_WAITERS {
            w.push(c);
        }
    }

    async fn operate(&self, id: JobId, op: &'static str) -> Result<bool> {
        let Some(queue) = self.find_queue(id, op).await? else {
            return Ok(false);
        };
        let k = self.keys(&queue);
        let reply: Value = self
            .inner
            .scripts
            .operate
            .key(k.set(JobState::Ready))
            .key(k.set(JobState::Scheduled))
            .key(k.set(JobState::Retrying))
            .key(k.set(JobState::Succeeded))
            .key(k.set(JobState::Dead))
            .key(k.key("sig"))
            .key(k.key("seq"))
            .key(k.key("names"))
            .arg(k.job(id))
            .arg(id.to_string())
            .arg(match op {
                "retry_dead" => "retry",
                "cancel" => "cancel",
                _ => "delete",
            })
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err(op))?;
        match reply {
            // A retry refused because the priority or name it needs does not read.
            Value::Array(bad) => Err(Error::Undecodable {
                backend: NAME,
                job: id.to_string(),
                field: bad.first().and_then(text).unwrap_or_default(),
                problem: bad.get(1).and_then(text).unwrap_or_default(),
            }),
            other => Ok(int(&other) == Some(1)),
        }
    }

    /// The sets holding jobs in `state` in `queue`: one per job name for `Ready`.
    async fn state_sets(
        &self,
        queue: &str,
        state: JobState,
        op: &'static str,
    ) -> Result<Vec<String>> {
        let k = self.keys(queue);
        if state != JobState::Ready {
            return Ok(vec![k.set(state)]);
        }
        let names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(k.key("names"))
            .query_async(&mut self.conn())
            .await
            .map_err(map_err(op))?;
        let prefix = k.set(JobState::Ready);
        Ok(names.into_iter().map(|n| format!("{prefix}{n}")).collect())
    }

    /// One CLAIM script of up to `want` jobs, appended to `out`; returns how many ready
    /// entries it looked at and did not hand over (made dead, or gone), 0 when none.
    ///
    /// Two checks guard a claim against hashes Backline never wrote. The script checks every
    /// field it hands back before it writes to the job, and makes a job whose fields do not
    /// read dead in the same script (atomically, no lease left behind). What the script cannot
    /// judge (the id, which is a set member, not a field; any rule of [`parse_job`] the
    /// script's copy lacks) is caught here, after the claim: such a job is leased to this
    /// claim, so it is finished dead right away with its reason, fenced by the claim's token,
    /// in this same call. It costs only itself: the others run, and it does not wait out its
    /// lease and come back, attempt after attempt, to fail every claim that meets it.
    async fn claim_once(
        &self,
        req: &ClaimRequest<'_>,
        want: usize,
        out: &mut Vec<ClaimedJob>,
    ) -> Result<usize> {
        let k = self.keys(req.queue);
        let mut inv = self.inner.scripts.claim.prepare_invoke();
        inv.key(k.set(JobState::Ready))
            .key(k.set(JobState::Scheduled))
            .key(k.set(JobState::Retrying))
            .key(k.set(JobState::Running))
            .key(k.key("names"))
            .key(k.set(JobState::Dead))
            .arg(k.job_prefix())
            .arg(want)
            .arg(ms(req.lease))
            .arg(PROMOTE_PER_CLAIM);
        let mut names: Vec<&String> = req.names.iter().collect();
        names.sort();
        names.dedup();
        inv.arg(names.len());
        for n in names {
            inv.arg(n);
        }
        for _ in 0..want {
            inv.arg(LeaseToken::random().0.to_string());
        }
        let reply: Value = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err("claim"))?;
        let mut parts = array(reply).into_iter();
        let rows = parts.next().map(array).unwrap_or_default();
        log_killed(req.queue, parts.next());
        let mut skipped = parts
            .next()
            .as_ref()
            .and_then(int)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0);
        let mut unreadable = Vec::new();
        for row in rows {
            let row = array(row);
            let id = row.first().and_then(text).unwrap_or_default();
            let Some(token) = row.get(14).and_then(text) else {
                // Never so: the script puts the token it was given after the fields.
                tracing::error!(queue = %req.queue, id = %id, "a claim reply without a token; the job is left to its lease");
                continue;
            };
            match (parse_job(&row), token.parse()) {
                (Ok(job), Ok(t)) => out.push(ClaimedJob {
                    job,
                    token: LeaseToken(t),
                }),
                (Err(bad), _) => unreadable.push((id, token, bad)),
                (Ok(_), Err(_)) => {
                    tracing::error!(queue = %req.queue, id = %id, "a claim reply with an unreadable token; the job is left to its lease");
                }
            }
        }
        if !unreadable.is_empty() {
            let items: Vec<FinishItem> = unreadable
                .iter()
                .map(|(id, token, bad)| FinishItem {
                    id: id.clone(),
                    token: token.clone(),
                    kind: "d",
                    delay: 0,
                    error: bad.reason(),
                })
                .collect();
            let done = self.finish_items(req.queue, &items, "claim").await?;
            for ((id, _, bad), done) in unreadable.iter().zip(done) {
                let e = bad.error(id);
                if done {
                    tracing::error!(queue = %req.queue, error = %ErrorChain(&e), "a claimed job cannot be read; it is dead");
                } else {
                    tracing::error!(queue = %req.queue, error = %ErrorChain(&e), "a claimed job cannot be read; its lease was lost before it could be made dead");
                }
            }
            skipped += unreadable.len();
        }
        Ok(skipped)
    }

    /// Runs the FINISH script on items of one queue; returns whether each applied (its lease
    /// was held).
    async fn finish_items(
        &self,
        queue: &str,
        items: &[FinishItem],
        op: &'static str,
    ) -> Result<Vec<bool>> {
        let k = self.keys(queue);
        let mut inv = self.inner.scripts.finish.prepare_invoke();
        inv.key(k.set(JobState::Ready))
            .key(k.set(JobState::Retrying))
            .key(k.set(JobState::Running))
            .key(k.set(JobState::Succeeded))
            .key(k.set(JobState::Dead))
            .key(k.key("sig"))
            .key(k.key("seq"))
            .key(k.key("names"))
            .arg(k.job_prefix());
        for f in items {
            inv.arg(&f.id)
                .arg(&f.token)
                .arg(f.kind)
                .arg(f.delay)
                .arg(&f.error);
        }
        let reply: Value = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err(op))?;
        let mut parts = array(reply).into_iter();
        let applied: Vec<bool> = parts
            .next()
            .map(array)
            .unwrap_or_default()
            .iter()
            .map(|r| int(r) == Some(1))
            .collect();
        log_killed(queue, parts.next());
        Ok(applied)
    }

    /// Groups finish or heartbeat items by queue, keeping their positions.
    async fn by_queue(
        &self,
        ids: impl Iterator<Item = JobId>,
        op: &'static str,
    ) -> Result<(HashMap<String, Vec<usize>>, Vec<usize>)> {
        let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
        let mut lost = Vec::new();
        for (i, id) in ids.enumerate() {
            match self.find_queue(id, op).await? {
                Some(q) => groups.entry(q).or_default().push(i),
                None => lost.push(i),
            }
        }
        Ok((groups, lost))
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
            .with_dedup_by_id(true)
            .with_filter_by_name(true)
            .with_get_job(true)
            .with_list_jobs(true)
            .with_cancel(true)
            .with_transactional_enqueue(false)
            .with_locks(true)
            .with_durable(true)
            .with_lease_expiry(true)
            .with_run_at_order(true)
            .with_list_dead(true)
            .with_priorities(true)
    }

    async fn push(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>> {
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        let mut by_queue: Vec<(String, Vec<NewJob>)> = Vec::new();
        for job in jobs {
            match by_queue.iter_mut().find(|(q, _)| *q == job.queue) {
                Some((_, v)) => v.push(job),
                None => by_queue.push((job.queue.clone(), vec![job])),
            }
        }
        for (queue, jobs) in by_queue {
            self.register(&queue).await?;
            let k = self.keys(&queue);
            for chunk in jobs.chunks(PUSH_CHUNK) {
                let mut inv = self.inner.scripts.push.prepare_invoke();
                inv.key(k.set(JobState::Ready))
                    .key(k.set(JobState::Scheduled))
                    .key(k.key("sig"))
                    .key(k.key("seq"))
                    .key(k.key("names"))
                    .arg(k.job_prefix());
                for j in chunk {
                    let (mode, value) = match j.run_at {
                        RunAt::Now => ("n", 0),
                        RunAt::After(d) => ("a", ms(d)),
                        RunAt::At(t) => ("t", t.timestamp_millis()),
                    };
                    let timeout = j.timeout.map(|t| ms(t).to_string()).unwrap_or_default();
                    inv.arg(j.id.to_string())
                        .arg(&j.name)
                        .arg(&j.queue)
                        .arg(&j.payload[..])
                        .arg(j.priority.value())
                        .arg(mode)
                        .arg(value)
                        .arg(j.max_attempts.max(1))
                        .arg(timeout);
                }
                let _: i64 = inv
                    .invoke_async(&mut self.conn())
                    .await
                    .map_err(map_err("push"))?;
            }
        }
        Ok(ids)
    }

    async fn claim(&self, req: ClaimRequest<'_>) -> Result<Vec<ClaimedJob>> {
        let mut out = Vec::new();
        // A short batch with ready entries that were not claimed (jobs made dead because they
        // do not read, hashes gone) is no sign of an empty queue: claim the rest again. Each
        // such round removes at least one entry from the ready sets for good, so this ends.
        while out.len() < req.limit {
            let want = req.limit - out.len();
            match self.claim_once(&req, want, &mut out).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if out.is_empty() => return Err(e),
                Err(e) => {
                    // The jobs already claimed are leased: hand them over rather than leave
                    // them to their leases.
                    tracing::warn!(queue = %req.queue, error = %ErrorChain(&e), "claim stopped early");
                    break;
                }
            }
        }
        let mut claimed = guard(&self.inner.claimed);
        for c in &out {
            claimed.insert(c.job.id, c.job.queue.clone());
        }
        Ok(out)
    }

    async fn finish(&self, batch: &[Finish]) -> Result<Vec<bool>> {
        let mut applied = vec![false; batch.len()];
        let (groups, _lost) = self.by_queue(batch.iter().map(|f| f.id), "finish").await?;
        for (queue, idx) in groups {
            let items: Vec<FinishItem> = idx
                .iter()
                .map(|&i| {
                    let f = &batch[i];
                    let (kind, delay, error) = match &f.outcome {
                        Outcome::Succeeded { keep: true } => ("s", 0, ""),
                        Outcome::Succeeded { keep: false } => ("x", 0, ""),
                        Outcome::Retry { delay, error } => ("r", ms(*delay), error.as_str()),
                        Outcome::Dead { error } => ("d", 0, error.as_str()),
                        // Release, and an outcome this version does not know: handed back.
                        _ => ("l", 0, ""),
                    };
                    FinishItem {
                        id: f.id.to_string(),
                        token: f.token.0.to_string(),
                        kind,
                        delay,
                        error: error.to_owned(),
                    }
                })
                .collect();
            let res = self.finish_items(&queue, &items, "finish").await?;
            for (&i, r) in idx.iter().zip(res) {
                applied[i] = r;
            }
        }
        let mut claimed = guard(&self.inner.claimed);
        for f in batch {
            claimed.remove(&f.id);
        }
        Ok(applied)
    }

    async fn heartbeat(
        &self,
        leases: &[(JobId, LeaseToken)],
        lease: Duration,
    ) -> Result<Vec<bool>> {
        let mut held = vec![false; leases.len()];
        let (groups, _lost) = self
            .by_queue(leases.iter().map(|(id, _)| *id), "heartbeat")
            .await?;
        for (queue, idx) in groups {
            let k = self.keys(&queue);
            let mut inv = self.inner.scripts.heartbeat.prepare_invoke();
            inv.key(k.set(JobState::Running))
                .arg(k.job_prefix())
                .arg(ms(lease));
            for &i in &idx {
                inv.arg(leases[i].0.to_string())
                    .arg(leases[i].1 .0.to_string());
            }
            let res: Vec<i64> = inv
                .invoke_async(&mut self.conn())
                .await
                .map_err(map_err("heartbeat"))?;
            for (&i, r) in idx.iter().zip(res) {
                held[i] = r == 1;
            }
        }
        Ok(held)
    }

    async fn wait(&self, queue: &str, seen: u64, timeout: Duration) -> Result<u64> {
        let k = self.keys(queue);
        let (seq, next): (i64, i64) = self
            .inner
            .scripts
            .peek
            .key(k.key("seq"))
            .key(k.set(JobState::Scheduled))
            .key(k.set(JobState::Retrying))
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err("wait"))?;
        let seq = u64::try_from(seq).unwrap_or(0);
        if seq != seen {
            return Ok(seq);
        }
        let mut block = timeout;
        if next >= 0 {
            block = block.min(Duration::from_millis(next as u64 + 1));
        }
        if block < Duration::from_millis(1) {
            return Ok(seq);
        }
        let mut conn = self.waiter().await?;
        // The list keeps the token of a push made since the peek, so it is never missed.
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(k.key("sig")).arg(block.as_secs_f64());
        let blpop = cmd.query_async::<Value>(&mut conn);
        // A guard against a peer that vanishes without closing the connection.
        match tokio::time::timeout(block + self.inner.config.response_timeout, blpop).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(map_err("wait")(e)),
            Err(_) => {
                return Err(Error::Timeout {
                    op: "wait",
                    after: block + self.inner.config.response_timeout,
                })
            }
        }
        let now: Option<u64> = redis::cmd("GET")
            .arg(k.key("seq"))
            .query_async(&mut conn)
            .await
            .map_err(map_err("wait"))?;
        self.return_waiter(conn);
        Ok(now.unwrap_or(0))
    }

    async fn maintain(&self, m: &Maintenance) -> Result<MaintenanceReport> {
        let queues = self.queues("maintain").await?;
        let mut report = MaintenanceReport::default();
        if queues.is_empty() {
            return Ok(report);
        }
        let batch = m.batch as u64;
        // Due delayed entries promotion took: made ready, made dead (unreadable) or gone.
        let mut promote_taken = 0u64;
        let start = self.inner.rotation.fetch_add(1, Ordering::Relaxed) % queues.len();
        for i in 0..queues.len() {
            let queue = &queues[(start + i) % queues.len()];
            let k = self.keys(queue);
            // Each script does at most SCRIPT_BATCH of each part; loop while one is saturated.
            loop {
                let cap = |left: u64| left.min(SCRIPT_BATCH);
                let promote = cap(batch.saturating_sub(promote_taken));
                let reap = cap(batch.saturating_sub(report.recovered + report.expired_dead));
                let prune = cap(batch.saturating_sub(report.pruned));
                if promote == 0 && reap == 0 && prune == 0 {
                    return Ok(report);
                }
                let reply: Value = self
                    .inner
                    .scripts
                    .maintain
                    .key(k.set(JobState::Ready))
                    .key(k.set(JobState::Scheduled))
                    .key(k.set(JobState::Retrying))
                    .key(k.set(JobState::Running))
                    .key(k.set(JobState::Succeeded))
                    .key(k.set(JobState::Dead))
                    .key(k.key("sig"))
                    .key(k.key("seq"))
                    .key(k.key("names"))
                    .arg(k.job_prefix())
                    .arg(promote)
                    .arg(reap)
                    .arg(prune)
                    .arg(ms(m.succeeded_ttl))
                    .arg(ms(m.dead_ttl))
                    // The lease-expired text, defined once in core.
                    .arg(backline_core::provider::LEASE_EXPIRED_PREFIX)
                    .arg(backline_core::provider::LEASE_EXPIRED_OF)
                    .invoke_async(&mut self.conn())
                    .await
                    .map_err(map_err("maintain"))?;
                let mut r = array(reply);
                log_killed(
                    queue,
                    r.get_mut(5).map(|v| std::mem::replace(v, Value::Nil)),
                );
                let n = |i: usize| r.get(i).and_then(int).unwrap_or(0).max(0) as u64;
                let (p, rec, dead, pruned, taken) = (n(0), n(1), n(2), n(3), n(4));
                promote_taken += taken;
                report.promoted += p;
                report.recovered += rec;
                report.expired_dead += dead;
                report.pruned += pruned;
                let saturated = (promote > 0 && taken >= promote)
                    || (reap > 0 && rec + dead >= reap)
                    || (prune > 0 && pruned >= prune);
                if !saturated {
                    break;
                }
            }
        }
        Ok(report)
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        let Some(queue) = self.find_queue(id, "get").await? else {
            return Ok(None);
        };
        match self
            .fetch(&queue, &[id.to_string()], "get")
            .await?
            .into_iter()
            .next()
        {
            None => Ok(None),
            Some((_, Ok(job))) => Ok(Some(job)),
            Some((key, Err(bad))) => Err(bad.error(&key)),
        }
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let queues = match &filter.queue {
            Some(q) => vec![q.clone()],
            None => self.queues("list").await?,
        };
        let states: Vec<JobState> = match filter.state {
            Some(s) => vec![s],
            None => JobState::ALL.to_vec(),
        };
        // Every candidate id: listing reads the whole of each listed set.
        let mut ids: Vec<(String, String)> = Vec::new();
        for q in &queues {
            let mut pipe = redis::pipe();
            let mut any = false;
            for s in &states {
                for key in self.state_sets(q, *s, "list").await? {
                    pipe.cmd("ZRANGE").arg(key).arg(0).arg(-1);
                    any = true;
                }
            }
            if !any {
                continue;
            }
            let sets: Vec<Vec<String>> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(map_err("list"))?;
            ids.extend(sets.into_iter().flatten().map(|id| (id, q.clone())));
        }
        ids.sort();
        ids.dedup();
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        let mut skip = filter.offset;
        let mut out = Vec::new();
        for chunk in ids.chunks(STEP) {
            let mut by_q: HashMap<&str, Vec<String>> = HashMap::new();
            for (id, q) in chunk {
                by_q.entry(q.as_str()).or_default().push(id.clone());
            }
            let mut jobs = Vec::new();
            for (q, ids) in by_q {
                for (id, job) in self.fetch(q, &ids, "list").await? {
                    match job {
                        Ok(job) => jobs.push(job),
                        // One bad hash must not cost the page: skipped, and said so.
                        Err(bad) => tracing::warn!(
                            queue = %q,
                            error = %ErrorChain(&bad.error(&id)),
                            "list skips a job that cannot be read"
                        ),
                    }
                }
            }
            jobs.sort_by_key(|j| j.id);
            for j in jobs {
                if filter.state.is_some_and(|s| s != j.state)
                    || filter.name.as_deref().is_some_and(|n| n != j.name)
                {
                    continue;
                }
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                out.push(j);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    async fn counts(&self, queue: Option<&str>) -> Result<Counts> {
        let queues = match queue {
            Some(q) => vec![q.to_owned()],
            None => self.queues("counts").await?,
        };
        let mut c = Counts::default();
        for q in queues {
            let k = self.keys(&q);
            let n: Vec<u64> = self
                .inner
                .scripts
                .count
                .key(k.key("names"))
                .key(k.set(JobState::Scheduled))
                .key(k.set(JobState::Retrying))
                .key(k.set(JobState::Running))
                .key(k.set(JobState::Succeeded))
                .key(k.set(JobState::Dead))
                .arg(k.set(JobState::Ready))
                .invoke_async(&mut self.conn())
                .await
                .map_err(map_err("counts"))?;
            // The script counts in JobState::ALL's order.
            for (s, n) in JobState::ALL.into_iter().zip(n) {
                *c.get_mut(s) += n;
            }
        }
        Ok(c)
    }

    async fn cancel(&self, id: JobId) -> Result<bool> {
        self.operate(id, "cancel").await
    }

    async fn retry_dead(&self, id: JobId) -> Result<bool> {
        self.operate(id, "retry_dead").await
    }

    async fn delete(&self, id: JobId) -> Result<bool> {
        self.operate(id, "delete").await
    }

    async fn purge(&self, state: JobState, queue: Option<&str>) -> Result<u64> {
        if state == JobState::Running {
            return Err(Error::InvalidJob("running jobs cannot be purged".into()));
        }
        let queues = match queue {
            Some(q) => vec![q.to_owned()],
            None => self.queues("purge").await?,
        };
        let mut total = 0;
        for q in queues {
            let k = self.keys(&q);
            for set in self.state_sets(&q, state, "purge").await? {
                loop {
                    let n: u64 = self
                        .inner
                        .scripts
                        .purge
                        .key(&set)
                        .arg(k.job_prefix())
                        .arg(STEP)
                        .invoke_async(&mut self.conn())
                        .await
                        .map_err(map_err("purge"))?;
                    total += n;
                    if n < STEP as u64 {
                        break;
                    }
                }
            }
        }
        Ok(total)
    }

    async fn lock_acquire(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let n: i64 = self
            .inner
            .scripts
            .lock_acquire
            .key(self.lock_key(name))
            .arg(owner.0.to_string())
            .arg(ms(ttl).max(1))
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err("lock_acquire"))?;
        Ok(n == 1)
    }

    async fn lock_renew(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let n: i64 = self
            .inner
            .scripts
            .lock_renew
            .key(self.lock_key(name))
            .arg(owner.0.to_string())
            .arg(ms(ttl).max(1))
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err("lock_renew"))?;
        Ok(n == 1)
    }

    async fn lock_release(&self, name: &str, owner: LeaseToken) -> Result<bool> {
        let n: i64 = self
            .inner
            .scripts
            .lock_release
            .key(self.lock_key(name))
            .arg(owner.0.to_string())
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err("lock_release"))?;
        Ok(n == 1)
    }
}
