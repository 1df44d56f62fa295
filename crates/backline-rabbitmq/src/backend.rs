//! The [`Backend`] implementation of [`RabbitMqBackend`], on top of the helpers of the other
//! modules.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backline_core::{
    Backend, Capabilities, ClaimRequest, ClaimedJob, Counts, Error, ErrorChain, Finish, Job,
    JobFilter, JobId, JobState, LeaseToken, Maintenance, MaintenanceReport, NewJob, Result, RunAt,
};
use chrono::{DateTime, Utc};
use lapin::options::{BasicGetOptions, QueuePurgeOptions};
use lapin::types::FieldTable;

use crate::claim::GetResult;
use crate::conn::{open_channel, Probe};
use crate::dead::{ScanStep, DEAD_SCAN_LIMIT};
use crate::message::Meta;
use crate::topology::{MAX_STEP, MIN_STEP};
use crate::{config, conn_err, invalid_job, later, lock, unsupported, RabbitMqBackend, BACKEND};

#[async_trait]
impl Backend for RabbitMqBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        // A queue per job name, persistent messages, dead letters that can be browsed; no
        // store to look jobs up in, no locks, the lease is the delivery, FIFO among due jobs.
        // Quorum queues (3.10) have no priorities.
        Capabilities::NONE
            .with_filter_by_name(true)
            .with_durable(true)
            .with_list_dead(true)
            .with_priorities(!matches!(
                self.inner.config.kind,
                crate::QueueKind::Quorum { .. }
            ))
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
        Ok(self.inner.wakes.wait(queue, seen, timeout).await)
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
}
