#![doc = include_str!("../README.md")]

mod acks;
mod config;
mod conn;
mod dead;
mod message;
mod publish;
mod relay;
mod topology;
mod wake;

use backline_core::ErrorChain;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use backline_core::{
    Backend, Capabilities, ClaimRequest, ClaimedJob, Counts, Error, Finish, Job, JobFilter, JobId,
    JobState, LeaseToken, Maintenance, MaintenanceReport, NewJob, Outcome, Result, RunAt,
};
use chrono::{DateTime, Utc};
use lapin::options::{BasicGetOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::Acker;

pub use config::{QueueKind, QueueNaming, RabbitMqConfig, DEFAULT_URL, URL_ENV};
/// The AMQP client this provider is built on, re-exported so that versions match.
pub use lapin;

use conn::{open_channel, Conn, Probe};
use dead::{ScanStep, DEAD_SCAN_LIMIT};
use message::Meta;
use topology::{MAX_STEP, MIN_STEP};
use wake::Signal;

const BACKEND: &str = "rabbitmq";

/// The RabbitMQ provider: one durable queue per (queue, job name), publisher confirms, manual
/// acks, a TTL wait-queue ladder for delays and back-off, and a dead-letter queue per queue.
///
/// Cloning is cheap: clones share one connection. Dropping the last clone closes it, which
/// hands every job it still holds back to the broker (redelivered, counted as a crashed attempt).
#[derive(Clone)]
pub struct RabbitMqBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RabbitMqBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqBackend")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// This handle itself, for tasks that must not keep it alive (the wake-up sender).
    me: Weak<Inner>,
    config: RabbitMqConfig,
    /// The current connection (read on every call).
    conn: std::sync::RwLock<Option<Arc<Conn>>>,
    /// Held while (re)connecting, so one caller reconnects and the others wait for it.
    reconnecting: tokio::sync::Mutex<()>,
    /// Per work queue, how many messages the last `basic.get` said were left (a hint for how
    /// many gets the next claim pipelines at once).
    backlog: Mutex<HashMap<String, u32>>,
    generation: AtomicU64,
    /// Queues declared on the current connection.
    declared: Mutex<HashSet<String>>,
    /// Every queue this handle ever declared (for tear-down).
    ever_declared: Mutex<BTreeSet<String>>,
    /// The (queue → job names) this handle knows of.
    known: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// Deliveries claimed and not yet finished, by the token of their claim: two deliveries
    /// of one job id (a duplicate publish) are two leases, each finished on its own.
    held: Mutex<HashMap<LeaseToken, Held>>,
    /// Wake-up signals per queue.
    signals: Mutex<HashMap<String, Arc<Signal>>>,
    /// Queues whose landing queue has a relay consumer, with the connection generation.
    relays: Mutex<HashMap<String, u64>>,
    /// Where the next claim starts among the job names.
    rotation: AtomicU64,
    /// Queues this handle listens to wake-ups for, with the connection generation.
    wakers: Mutex<HashMap<String, u64>>,
}

struct Held {
    acker: Acker,
    /// The delivery tag on the claim channel of connection `generation`.
    tag: u64,
    generation: u64,
    meta: Meta,
    payload: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn conn_err(op: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Connection {
        backend: BACKEND,
        op,
        source: Box::new(e),
    }
}

/// A name refused by [`config`]'s checks, given with a job (push, claim): an invalid job.
fn invalid_job(e: Error) -> Error {
    match e {
        Error::Config(msg) => Error::InvalidJob(msg),
        other => other,
    }
}

fn backend_err(op: &'static str, msg: String) -> Error {
    Error::Backend {
        backend: BACKEND,
        op,
        source: msg.into(),
    }
}

fn unsupported(what: &'static str) -> Error {
    Error::Unsupported {
        backend: BACKEND,
        what,
    }
}

/// `now + d`, saturating at the largest instant instead of overflowing.
fn later(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl RabbitMqBackend {
    /// Connects to the broker (with the configured retries and back-off).
    ///
    /// Queues are declared when first used, so connecting creates nothing.
    pub async fn connect(config: RabbitMqConfig) -> Result<Self> {
        config.validate()?;
        let backend = RabbitMqBackend {
            inner: Arc::new_cyclic(|me| Inner {
                me: me.clone(),
                config,
                conn: std::sync::RwLock::new(None),
                reconnecting: tokio::sync::Mutex::new(()),
                backlog: Mutex::new(HashMap::new()),
                generation: AtomicU64::new(0),
                declared: Mutex::new(HashSet::new()),
                ever_declared: Mutex::new(BTreeSet::new()),
                known: Mutex::new(BTreeMap::new()),
                held: Mutex::new(HashMap::new()),
                signals: Mutex::new(HashMap::new()),
                relays: Mutex::new(HashMap::new()),
                rotation: AtomicU64::new(0),
                wakers: Mutex::new(HashMap::new()),
            }),
        };
        {
            let mut known = lock(&backend.inner.known);
            for (q, n) in &backend.inner.config.known_jobs {
                known.entry(q.clone()).or_default().insert(n.clone());
            }
        }
        backend.inner.conn().await?;
        Ok(backend)
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitMqConfig {
        &self.inner.config
    }

    /// The work queue of jobs named `name` in `queue` (`{prefix}.{queue}.{name}`, or
    /// `AbpBackgroundJobs.{name}` for the default queue under [`QueueNaming::Abp`]).
    pub fn work_queue_name(&self, queue: &str, name: &str) -> String {
        self.inner.work_name(queue, name)
    }

    /// The dead-letter queue of `queue` (`{prefix}.{queue}.~dead`).
    pub fn dead_queue_name(&self, queue: &str) -> String {
        self.inner.dead_name(queue)
    }

    /// Every queue this handle declared, for a tear-down (tests, a removed application).
    pub fn declared_queues(&self) -> Vec<String> {
        lock(&self.inner.ever_declared).iter().cloned().collect()
    }

    /// Deletes every queue this handle declared, with the jobs in them; returns how many
    /// messages went with them.
    pub async fn delete_declared_queues(&self) -> Result<u64> {
        let conn = self.inner.conn().await?;
        let mut n = 0u64;
        for q in self.declared_queues() {
            n += u64::from(
                conn.admin()
                    .await?
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map_err(|e| conn_err("queue.delete", e))?,
            );
        }
        lock(&self.inner.declared).clear();
        Ok(n)
    }

    /// Closes the connection: jobs this handle still holds go back to their queues (the broker
    /// marks them redelivered, which counts the attempt). The next call reconnects.
    pub async fn close(&self) {
        let _reconnecting = self.inner.reconnecting.lock().await;
        let old = self
            .inner
            .conn
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = old {
            let _ = c.connection.close(200, "closed by backline".into()).await;
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Some(c) = self
            .conn
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = c.connection.close(200, "closed by backline".into()).await;
            });
        }
    }
}

impl Inner {
    /// One `basic.get` from a work queue; a redelivered message is counted and moved here.
    async fn get_one(
        &self,
        conn: &Conn,
        work: &str,
        queue: &str,
        name: &str,
        lease: Duration,
    ) -> Result<GetResult> {
        let msg = conn
            .claim
            .basic_get(work.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| conn_err("basic.get", e))?;
        let Some(msg) = msg else {
            return Ok(GetResult::Empty);
        };
        let remaining = msg.message_count;
        let d = msg.delivery;
        let tag = d.delivery_tag;
        lock(&conn.tags).received(tag);
        let Some(mut meta) = Meta::from_delivery(&d.properties, queue, Some(name)) else {
            self.requeue_claimed(conn, &d.acker, tag).await;
            return Err(backend_err("basic.get", "unreadable message".into()));
        };
        if d.redelivered {
            // The last delivery's connection closed before it finished: a crashed attempt.
            meta.attempt = meta.attempt.saturating_add(1);
            meta.last_error = Some(format!(
                "lease expired: the connection holding attempt {} closed before it finished",
                meta.attempt
            ));
            let moved = async {
                if meta.attempt >= meta.max_attempts {
                    meta.died_at = Some(Utc::now());
                    let dead = self.dead_name(queue);
                    self.ensure_plain(conn, &dead).await?;
                    self.publish_confirmed(conn, &dead, &meta, &d.data).await?;
                    tracing::error!(job = %meta.id, name = %meta.name, attempt = meta.attempt, "job dead: its worker died on every attempt");
                } else {
                    self.publish_confirmed(conn, work, &meta, &d.data).await?;
                }
                Ok::<(), Error>(())
            }
            .await;
            if let Err(e) = moved {
                // Not moved: hand it back (still redelivered), never drop the delivery.
                self.requeue_claimed(conn, &d.acker, tag).await;
                return Err(e);
            }
            if !self.ack_claimed(conn, &[tag]).await.contains(&tag) {
                return Err(backend_err(
                    "basic.ack",
                    "the claim channel closed before the ack was sent".into(),
                ));
            }
            return Ok(GetResult::Moved(remaining));
        }
        // A header claiming every attempt spent (outside input: Backline never publishes one
        // into a work queue) makes this claim the last attempt.
        meta.attempt = meta.attempt.min(meta.max_attempts - 1);
        let now = Utc::now();
        let mut held = lock(&self.held);
        let token = loop {
            let t = LeaseToken::random();
            if !held.contains_key(&t) {
                break t;
            }
        };
        let job = meta.to_job(
            d.data.clone(),
            JobState::Running,
            meta.attempt.saturating_add(1),
            Some(later(now, lease)),
        );
        held.insert(
            token,
            Held {
                acker: d.acker,
                tag,
                generation: conn.generation,
                meta,
                payload: d.data,
            },
        );
        drop(held);
        Ok(GetResult::Claimed(
            Box::new(ClaimedJob { job, token }),
            remaining,
        ))
    }

    /// Applies one finish up to its ack: moves the job to its next home (confirmed) and
    /// returns the delivery tag to ack; `None` if the lease was lost. A failed move hands the
    /// delivery back (requeue) and is the error.
    async fn finish_one(&self, conn: &Conn, f: &Finish) -> Result<Option<u64>> {
        let held = {
            let mut held = lock(&self.held);
            match held.get(&f.token) {
                Some(h) if h.meta.id == f.id => held.remove(&f.token),
                _ => None,
            }
        };
        let Some(h) = held else { return Ok(None) };
        if h.generation != conn.generation || !h.acker.usable() {
            return Ok(None);
        }
        let mut meta = h.meta.clone();
        let attempt = meta.attempt.saturating_add(1);
        let moved = match &f.outcome {
            Outcome::Succeeded { .. } => Ok(()),
            Outcome::Retry { delay, error } => {
                meta.attempt = attempt;
                meta.last_error = Some(error.clone());
                let now = Utc::now();
                meta.run_at = later(now, *delay);
                match self.route(conn, &meta, now).await {
                    Ok((target, _)) => {
                        self.publish_confirmed(conn, &target, &meta, &h.payload)
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            Outcome::Dead { error } => {
                meta.attempt = attempt;
                meta.last_error = Some(error.clone());
                meta.died_at = Some(Utc::now());
                let dead = self.dead_name(&meta.queue);
                match self.ensure_plain(conn, &dead).await {
                    Ok(()) => self.publish_confirmed(conn, &dead, &meta, &h.payload).await,
                    Err(e) => Err(e),
                }
            }
            Outcome::Release => {
                // The attempt header is unchanged: the attempt is given back.
                meta.run_at = Utc::now();
                match self.ensure_work(conn, &meta.queue, &meta.name).await {
                    Ok(work) => self.publish_confirmed(conn, &work, &meta, &h.payload).await,
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = moved {
            tracing::warn!(job = %f.id, error = %ErrorChain(&e), "moving a finished job failed; the broker redelivers it");
            self.requeue_claimed(conn, &h.acker, h.tag).await;
            return Err(e);
        }
        if matches!(f.outcome, Outcome::Release) {
            self.notify_due(conn, &meta.queue).await;
        }
        Ok(Some(h.tag))
    }
}

enum GetResult {
    Empty,
    Claimed(Box<ClaimedJob>, u32),
    Moved(u32),
}

#[async_trait]
impl Backend for RabbitMqBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            dedup_by_id: false,
            filter_by_name: true,
            get_job: false,
            list_jobs: false,
            cancel: false,
            transactional_enqueue: false,
            locks: false,
            durable: true,
            lease_expiry: false,
            run_at_order: false,
            list_dead: true,
        }
    }

    async fn push(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>> {
        let inner = &self.inner;
        let conn = inner.conn().await?;
        let now = Utc::now();
        let mut woken: BTreeSet<&str> = BTreeSet::new();
        // One deadline for the whole call (declarations, sends and confirms): a broker that
        // stops answering fails it with `Error::Timeout` after `confirm_timeout`. One timer per
        // call, not two per message (which cost a sixth of the rate of enqueues one by one).
        let publishing = async {
            let mut ids = Vec::with_capacity(jobs.len());
            let mut pending = Vec::with_capacity(jobs.len());
            // The work queue of the batch's last (queue, name): a batch is mostly one job
            // type, so most jobs skip the declared-queue lookup and the name formatting.
            let mut last: Option<(&str, &str, Arc<str>)> = None;
            for job in &jobs {
                // Declares the work queue and remembers the name even for a delayed job.
                let work = match &last {
                    Some((q, n, w)) if *q == job.queue && *n == job.name => w.clone(),
                    _ => {
                        let w: Arc<str> = inner
                            .ensure_work(&conn, &job.queue, &job.name)
                            .await?
                            .into();
                        last = Some((&job.queue, &job.name, w.clone()));
                        w
                    }
                };
                let run_at = match job.run_at {
                    RunAt::Now => None,
                    RunAt::After(d) => Some(later(now, d)),
                    RunAt::At(t) => Some(t),
                };
                let meta = Meta::new(job, now, run_at);
                let target: Arc<str> = if meta.run_at <= now {
                    woken.insert(&job.queue);
                    work
                } else {
                    inner.route(&conn, &meta, now).await?.0.into()
                };
                let confirm = inner
                    .publish(&conn, &target, &meta, &job.payload, None)
                    .await?;
                pending.push((confirm, target));
                ids.push(job.id);
            }
            for (confirm, target) in pending {
                inner.confirmed(confirm, &target, None).await?;
            }
            Ok::<_, Error>(ids)
        };
        let ids = inner.within(Some(inner.deadline()), publishing).await??;
        for q in woken {
            inner.notify_due(&conn, q).await;
        }
        Ok(ids)
    }

    async fn claim(&self, req: ClaimRequest<'_>) -> Result<Vec<ClaimedJob>> {
        let inner = &self.inner;
        config::check_queue(req.queue).map_err(invalid_job)?;
        let conn = inner.conn().await?;
        inner.ensure_relay(&conn, req.queue).await?;
        // Listen to wake-ups before looking at the queues: a job pushed after this claim saw
        // its queue empty then always wakes the `wait` that follows.
        inner.ensure_waker(&conn, req.queue).await?;
        let mut works = Vec::with_capacity(req.names.len());
        for name in req.names {
            works.push((
                name.as_str(),
                inner.ensure_work(&conn, req.queue, name).await?,
            ));
        }
        // Start at a different job name each claim, so a busy name never starves the others.
        if !works.is_empty() {
            let start = inner.rotation.fetch_add(1, Ordering::Relaxed) as usize % works.len();
            works.rotate_left(start);
        }
        let mut out: Vec<ClaimedJob> = Vec::new();
        let mut failed: Option<Error> = None;
        let mut open: Vec<bool> = vec![true; works.len()];
        while failed.is_none() && out.len() < req.limit && open.iter().any(|o| *o) {
            for (i, (name, work)) in works.iter().enumerate() {
                if !open[i] || out.len() >= req.limit {
                    continue;
                }
                // As many gets at once as the queue had left last time (at least one), so a
                // deep queue fills a batch in one round trip.
                let need = req.limit - out.len();
                let hint = lock(&inner.backlog)
                    .get(work.as_str())
                    .copied()
                    .unwrap_or(0);
                let k = (hint as usize).clamp(1, need);
                let gets = (0..k).map(|_| inner.get_one(&conn, work, req.queue, name, req.lease));
                let mut left = None;
                for r in futures_util::future::join_all(gets).await {
                    match r {
                        Ok(GetResult::Empty) => left = Some(0),
                        Ok(GetResult::Moved(n)) => left = Some(n),
                        Ok(GetResult::Claimed(job, n)) => {
                            out.push(*job);
                            left = Some(n);
                        }
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                }
                if failed.is_some() {
                    break;
                }
                let left = left.unwrap_or(0);
                lock(&inner.backlog).insert(work.clone(), left);
                if left == 0 {
                    open[i] = false;
                }
            }
        }
        match failed {
            // The jobs already taken are held: return them rather than strand their leases.
            Some(e) if !out.is_empty() => {
                tracing::warn!(queue = %req.queue, error = %ErrorChain(&e), claimed = out.len(), "claim failed part-way; returning the jobs taken");
                Ok(out)
            }
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    async fn finish(&self, batch: &[Finish]) -> Result<Vec<bool>> {
        let conn = self.inner.conn().await?;
        // Each item is independent (its own delivery): apply them concurrently. An item whose
        // move failed was handed back to the broker (redelivered, so it runs again): it did
        // not apply.
        let results =
            futures_util::future::join_all(batch.iter().map(|f| self.inner.finish_one(&conn, f)))
                .await;
        let tags: Vec<u64> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied().flatten())
            .collect();
        let sent: HashSet<u64> = self
            .inner
            .ack_claimed(&conn, &tags)
            .await
            .into_iter()
            .collect();
        Ok(results
            .into_iter()
            .map(|r| matches!(r, Ok(Some(t)) if sent.contains(&t)))
            .collect())
    }

    async fn heartbeat(
        &self,
        leases: &[(JobId, LeaseToken)],
        _lease: Duration,
    ) -> Result<Vec<bool>> {
        // The lease is the delivery: it holds as long as its channel is open.
        let generation = self.inner.generation.load(Ordering::SeqCst);
        let held = lock(&self.inner.held);
        Ok(leases
            .iter()
            .map(|(id, token)| {
                held.get(token).is_some_and(|h| {
                    h.meta.id == *id && h.generation == generation && h.acker.usable()
                })
            })
            .collect())
    }

    async fn wait(&self, queue: &str, seen: u64, timeout: Duration) -> Result<u64> {
        // Wake-ups from other handles and processes arrive on this connection's waker.
        if let Some(conn) = self.inner.current() {
            if let Err(e) = self.inner.ensure_waker(&conn, queue).await {
                tracing::debug!(queue = %queue, error = %ErrorChain(&e), "cannot listen to wake-ups; polling");
            }
        }
        Ok(self.inner.signal(queue).wait(seen, timeout).await)
    }

    async fn maintain(&self, m: &Maintenance) -> Result<MaintenanceReport> {
        let inner = &self.inner;
        let conn = inner.conn().await?;
        let mut report = MaintenanceReport::default();
        let queues = inner.known_queues(None);
        for (queue, _) in &queues {
            // Landing queues that no relay consumer of this handle serves.
            if lock(&inner.relays).get(queue) != Some(&conn.generation) {
                let landing = inner.landing_name(queue);
                // A plain declare (it creates an empty landing queue at worst) tells how many
                // messages wait, without the 404 a passive declare of a missing queue costs
                // (a closed channel) on every maintenance pass.
                let waiting = inner
                    .declare(&conn, &landing, FieldTable::default())
                    .await?;
                if waiting > 0 {
                    // A channel of its own: the claim channel's tags are all claimed jobs (its
                    // acks are planned as multiple acks, see `ack_claimed`).
                    let channel = open_channel(&conn.connection).await?;
                    let relayed = async {
                        for _ in 0..m.batch.min(usize::try_from(waiting).unwrap_or(usize::MAX)) {
                            let Some(msg) = channel
                                .basic_get(
                                    landing.as_str().into(),
                                    BasicGetOptions { no_ack: false },
                                )
                                .await
                                .map_err(|e| conn_err("basic.get", e))?
                            else {
                                break;
                            };
                            if inner.relay_delivery(&conn, queue, &msg.delivery).await? {
                                report.promoted += 1;
                            }
                        }
                        Ok::<(), Error>(())
                    }
                    .await;
                    let _ = channel.close(200, "relay pass done".into()).await;
                    relayed?;
                }
            }
            // Retention of dead letters: the oldest are at the head of the queue.
            let cutoff = chrono::Duration::from_std(m.dead_ttl)
                .ok()
                .and_then(|ttl| Utc::now().checked_sub_signed(ttl))
                .unwrap_or(DateTime::<Utc>::MIN_UTC);
            // Declared here (plain, like the landing queue above), so a dead queue another
            // handle or connection filled is pruned too.
            let dead = inner.dead_name(queue);
            if inner.declare(&conn, &dead, FieldTable::default()).await? > 0 {
                let mut pruned = 0u64;
                inner
                    .scan_dead(queue, m.batch, |meta, _| match meta.died_at {
                        Some(t) if t <= cutoff => {
                            pruned += 1;
                            ScanStep::Take
                        }
                        Some(_) => ScanStep::Stop,
                        // No death time (not ours, no `x-death`): keep it, look further.
                        None => ScanStep::Next,
                    })
                    .await?;
                report.pruned += pruned;
            }
        }
        Ok(report)
    }

    async fn get(&self, _id: JobId) -> Result<Option<Job>> {
        Err(unsupported("getting a job by id"))
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        if filter.state != Some(JobState::Dead) {
            return Err(unsupported("listing jobs other than dead letters"));
        }
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        // Pages are by id across every queue: collect every match (up to the scan limit per
        // queue), order by id, then skip and take.
        let mut all = Vec::new();
        for (queue, _) in self.inner.known_queues(filter.queue.as_deref()) {
            self.inner
                .scan_dead(&queue, DEAD_SCAN_LIMIT, |m, data| {
                    if filter.name.as_ref().is_none_or(|n| *n == m.name) {
                        all.push(m.to_job(data.to_vec(), JobState::Dead, m.attempt, None));
                    }
                    ScanStep::Next
                })
                .await?;
        }
        all.sort_by_key(|j| j.id);
        Ok(all.into_iter().skip(filter.offset).take(limit).collect())
    }

    async fn counts(&self, queue: Option<&str>) -> Result<Counts> {
        let inner = &self.inner;
        let conn = inner.conn().await?;
        let mut c = Counts::default();
        let mut probe = Probe::new(&conn);
        let queues = inner.known_queues(queue);
        for (q, names) in &queues {
            // Passive declares: counting creates no queue and checks no arguments.
            for name in names {
                c.ready += probe.count(&inner.work_name(q, name)).await?;
            }
            c.scheduled += probe.count(&inner.landing_name(q)).await?;
            for step in MIN_STEP..=MAX_STEP {
                c.scheduled += probe.count(&inner.step_name(q, step)).await?;
            }
            c.dead += probe.count(&inner.dead_name(q)).await?;
        }
        let held = lock(&inner.held);
        c.running = held
            .values()
            .filter(|h| queue.is_none_or(|q| h.meta.queue == q))
            .count() as u64;
        Ok(c)
    }

    async fn cancel(&self, _id: JobId) -> Result<bool> {
        Err(unsupported("cancelling a job"))
    }

    async fn retry_dead(&self, id: JobId) -> Result<bool> {
        let inner = &self.inner;
        let conn = inner.conn().await?;
        // Republish first, confirmed; only then take the dead letter.
        let Some((mut meta, payload)) = inner.find_dead(id, false).await? else {
            return Ok(false);
        };
        meta.attempt = 0;
        meta.died_at = None;
        meta.run_at = Utc::now();
        let work = inner.ensure_work(&conn, &meta.queue, &meta.name).await?;
        inner
            .publish_confirmed(&conn, &work, &meta, &payload)
            .await?;
        inner.find_dead(id, true).await?;
        inner.notify_due(&conn, &meta.queue).await;
        Ok(true)
    }

    async fn delete(&self, id: JobId) -> Result<bool> {
        Ok(self.inner.find_dead(id, true).await?.is_some())
    }

    async fn purge(&self, state: JobState, queue: Option<&str>) -> Result<u64> {
        let inner = &self.inner;
        let conn = inner.conn().await?;
        let mut probe = Probe::new(&conn);
        let mut n = 0u64;
        for (q, names) in inner.known_queues(queue) {
            let targets: Vec<String> =
                match state {
                    JobState::Dead => vec![inner.dead_name(&q)],
                    JobState::Ready => names.iter().map(|name| inner.work_name(&q, name)).collect(),
                    JobState::Succeeded => Vec::new(),
                    JobState::Running => {
                        return Err(Error::InvalidJob("running jobs cannot be purged".into()))
                    }
                    JobState::Scheduled | JobState::Retrying => return Err(unsupported(
                        "purging waiting jobs (scheduled and retrying jobs share the wait queues)",
                    )),
                };
            for t in targets {
                if probe.passive(&t).await?.is_none() {
                    continue;
                }
                n += u64::from(
                    conn.admin()
                        .await?
                        .queue_purge(t.as_str().into(), QueuePurgeOptions::default())
                        .await
                        .map_err(|e| conn_err("queue.purge", e))?,
                );
            }
        }
        Ok(n)
    }

    async fn lock_acquire(&self, _name: &str, _owner: LeaseToken, _ttl: Duration) -> Result<bool> {
        Err(unsupported("distributed locks"))
    }

    async fn lock_renew(&self, _name: &str, _owner: LeaseToken, _ttl: Duration) -> Result<bool> {
        Err(unsupported("distributed locks"))
    }

    async fn lock_release(&self, _name: &str, _owner: LeaseToken) -> Result<bool> {
        Err(unsupported("distributed locks"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_delay_saturates() {
        let now = Utc::now();
        assert_eq!(later(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + chrono::Duration::seconds(1)
        );
    }
}
