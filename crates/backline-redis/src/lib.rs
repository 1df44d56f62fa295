#![doc = include_str!("../README.md")]

mod backend;
mod config;
mod decode;
mod scripts;

use decode::*;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

use backline_core::provider::lock_unpoisoned as guard;

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
