#![doc = include_str!("../README.md")]

mod config;
mod scripts;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use backline_core::{
    Backend, Capabilities, ClaimRequest, ClaimedJob, Counts, Error, Finish, Job, JobFilter, JobId,
    JobState, LeaseToken, Maintenance, MaintenanceReport, NewJob, Outcome, Priority, Result, RunAt,
};
use chrono::{DateTime, Utc};
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

fn state_str(s: JobState) -> &'static str {
    match s {
        JobState::Scheduled => "scheduled",
        JobState::Ready => "ready",
        JobState::Running => "running",
        JobState::Retrying => "retrying",
        JobState::Succeeded => "succeeded",
        JobState::Dead => "dead",
    }
}

fn parse_state(s: &str) -> Option<JobState> {
    JobState::ALL.into_iter().find(|st| state_str(*st) == s)
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

fn time(v: &Value) -> Option<DateTime<Utc>> {
    int(v).and_then(DateTime::from_timestamp_millis)
}

fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => Vec::new(),
    }
}

/// A job from `[id, name, queue, payload, pri, state, att, max, tmo, enq, run, err, lease, fin]`.
fn parse_job(v: &[Value]) -> Option<Job> {
    if v.len() < 14 {
        return None;
    }
    let id = JobId::from_uuid(text(&v[0])?.parse().ok()?);
    let mut job = Job::new(id, text(&v[1])?, text(&v[2])?, bytes(&v[3])?.to_vec());
    job.priority = Priority::from_value(int(&v[4])?.clamp(0, 1000) as i16);
    job.state = parse_state(&text(&v[5])?)?;
    job.attempt = u32::try_from(int(&v[6])?).unwrap_or(0);
    job.max_attempts = u32::try_from(int(&v[7])?).unwrap_or(1);
    job.timeout = int(&v[8]).map(|t| Duration::from_millis(t.max(0) as u64));
    job.enqueued_at = time(&v[9])?;
    job.run_at = time(&v[10])?;
    job.last_error = text(&v[11]);
    job.lease_until = time(&v[12]);
    job.finished_at = time(&v[13]);
    Some(job)
}

const FIELDS: [&str; 13] = [
    "name", "queue", "payload", "pri", "state", "att", "max", "tmo", "enq", "run", "err", "lease",
    "fin",
];

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

    async fn fetch(&self, queue: &str, ids: &[String], op: &'static str) -> Result<Vec<Job>> {
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
                let mut v = vec![Value::BulkString(id.as_bytes().to_vec())];
                v.extend(array(row));
                parse_job(&v)
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
        let n: i64 = self
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
        Ok(n == 1)
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
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        let k = self.keys(req.queue);
        let tokens: Vec<LeaseToken> = (0..req.limit).map(|_| LeaseToken::random()).collect();
        let mut inv = self.inner.scripts.claim.prepare_invoke();
        inv.key(k.set(JobState::Ready))
            .key(k.set(JobState::Scheduled))
            .key(k.set(JobState::Retrying))
            .key(k.set(JobState::Running))
            .key(k.key("names"))
            .arg(k.job_prefix())
            .arg(req.limit)
            .arg(ms(req.lease))
            .arg(PROMOTE_PER_CLAIM);
        let mut names: Vec<&String> = req.names.iter().collect();
        names.sort();
        names.dedup();
        inv.arg(names.len());
        for n in names {
            inv.arg(n);
        }
        for t in &tokens {
            inv.arg(t.0.to_string());
        }
        let rows: Value = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err("claim"))?;
        let mut out = Vec::new();
        for row in array(rows) {
            let row = array(row);
            let token = row
                .get(14)
                .and_then(text)
                .and_then(|t| t.parse().ok())
                .map(LeaseToken);
            match (parse_job(&row), token) {
                (Some(job), Some(token)) => out.push(ClaimedJob { job, token }),
                // Not written by this crate: leave it to its lease (the others still run).
                _ => tracing::error!(
                    queue = %req.queue,
                    id = %row.first().and_then(text).unwrap_or_default(),
                    "skipping a malformed job hash in a claim"
                ),
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
            let k = self.keys(&queue);
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
            for &i in &idx {
                let f = &batch[i];
                let (kind, delay, error) = match &f.outcome {
                    Outcome::Succeeded { keep: true } => ("s", 0, ""),
                    Outcome::Succeeded { keep: false } => ("x", 0, ""),
                    Outcome::Retry { delay, error } => ("r", ms(*delay), error.as_str()),
                    Outcome::Dead { error } => ("d", 0, error.as_str()),
                    // Release, and an outcome this version does not know: handed back.
                    _ => ("l", 0, ""),
                };
                inv.arg(f.id.to_string())
                    .arg(f.token.0.to_string())
                    .arg(kind)
                    .arg(delay)
                    .arg(error);
            }
            let res: Vec<i64> = inv
                .invoke_async(&mut self.conn())
                .await
                .map_err(map_err("finish"))?;
            for (&i, r) in idx.iter().zip(res) {
                applied[i] = r == 1;
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
        let start = self.inner.rotation.fetch_add(1, Ordering::Relaxed) % queues.len();
        for i in 0..queues.len() {
            let k = self.keys(&queues[(start + i) % queues.len()]);
            // Each script does at most SCRIPT_BATCH of each part; loop while one is saturated.
            loop {
                let cap = |left: u64| left.min(SCRIPT_BATCH);
                let promote = cap(batch.saturating_sub(report.promoted));
                let reap = cap(batch.saturating_sub(report.recovered + report.expired_dead));
                let prune = cap(batch.saturating_sub(report.pruned));
                if promote == 0 && reap == 0 && prune == 0 {
                    return Ok(report);
                }
                let r: Vec<i64> = self
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
                    .invoke_async(&mut self.conn())
                    .await
                    .map_err(map_err("maintain"))?;
                let n = |i: usize| r.get(i).copied().unwrap_or(0).max(0) as u64;
                let (p, rec, dead, pruned) = (n(0), n(1), n(2), n(3));
                report.promoted += p;
                report.recovered += rec;
                report.expired_dead += dead;
                report.pruned += pruned;
                let saturated = (promote > 0 && p >= promote)
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
        Ok(self
            .fetch(&queue, &[id.to_string()], "get")
            .await?
            .into_iter()
            .next())
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
                jobs.extend(self.fetch(q, &ids, "list").await?);
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
            let order = [
                JobState::Scheduled,
                JobState::Ready,
                JobState::Running,
                JobState::Retrying,
                JobState::Succeeded,
                JobState::Dead,
            ];
            for (s, n) in order.into_iter().zip(n) {
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
