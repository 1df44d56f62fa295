#![doc = include_str!("../README.md")]

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use backline_core::provider::{lease_expired, lock_unpoisoned, saturating_add, WakeSignals};
use backline_core::{
    Backend, Capabilities, ClaimRequest, ClaimedJob, Counts, Error, Finish, Job, JobFilter, JobId,
    JobState, LeaseToken, Maintenance, MaintenanceReport, NewJob, Outcome, Result, RunAt,
};
use chrono::{DateTime, Utc};

/// The most due delayed jobs one claim promotes before it claims (bounded work).
const PROMOTE_PER_CLAIM: usize = 10_000;

type Time = DateTime<Utc>;
/// The claim order: higher priority, then earlier run-at, then earlier (UUIDv7) id.
type ReadyKey = (Reverse<i16>, Time, JobId);

struct Entry {
    job: Job,
    token: Option<LeaseToken>,
}

#[derive(Default)]
struct State {
    jobs: HashMap<JobId, Entry>,
    /// queue → job name → ready jobs in claim order.
    ready: HashMap<String, HashMap<String, BTreeSet<ReadyKey>>>,
    /// Scheduled and retrying jobs by run-at.
    delayed: BTreeSet<(Time, JobId)>,
    /// Running jobs by lease deadline.
    leases: BTreeSet<(Time, JobId)>,
    succeeded: BTreeSet<(Time, JobId)>,
    dead: BTreeSet<(Time, JobId)>,
    locks: HashMap<String, (LeaseToken, Time)>,
}

struct Shared {
    state: Mutex<State>,
    signals: WakeSignals,
}

/// The in-memory provider: the whole Backline contract inside one process.
///
/// Nothing survives a restart of the process: use it for tests, examples and work that may be
/// lost. Clones share the same store, so a [`JobManager`](backline_core::JobManager) and a
/// [`JobServer`](backline_core::JobServer) built from clones see the same jobs.
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.state().map(|s| s.jobs.len()).unwrap_or(0);
        f.debug_struct("MemoryBackend").field("jobs", &n).finish()
    }
}

/// `t - d`, or the earliest representable time where that overflows.
fn before(t: Time, d: Duration) -> Time {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl State {
    fn make_ready(&mut self, id: JobId) {
        if let Some(e) = self.jobs.get_mut(&id) {
            e.job.state = JobState::Ready;
            e.token = None;
            e.job.lease_until = None;
            let key = (Reverse(e.job.priority.value()), e.job.run_at, id);
            self.ready
                .entry(e.job.queue.clone())
                .or_default()
                .entry(e.job.name.clone())
                .or_default()
                .insert(key);
        }
    }

    fn unready(&mut self, job: &Job) {
        if let Some(names) = self.ready.get_mut(&job.queue) {
            if let Some(set) = names.get_mut(&job.name) {
                set.remove(&(Reverse(job.priority.value()), job.run_at, job.id));
            }
        }
    }

    /// Removes a job from whichever index holds it.
    fn unindex(&mut self, job: &Job) {
        match job.state {
            JobState::Ready => self.unready(job),
            JobState::Scheduled | JobState::Retrying => {
                self.delayed.remove(&(job.run_at, job.id));
            }
            JobState::Running => {
                if let Some(t) = job.lease_until {
                    self.leases.remove(&(t, job.id));
                }
            }
            JobState::Succeeded => {
                if let Some(t) = job.finished_at {
                    self.succeeded.remove(&(t, job.id));
                }
            }
            JobState::Dead => {
                if let Some(t) = job.finished_at {
                    self.dead.remove(&(t, job.id));
                }
            }
        }
    }

    fn promote(&mut self, now: Time, limit: usize) -> Vec<String> {
        let mut queues = Vec::new();
        let mut n = 0;
        while n < limit {
            let Some(&(at, id)) = self.delayed.first() else {
                break;
            };
            if at > now {
                break;
            }
            self.delayed.pop_first();
            self.make_ready(id);
            if let Some(e) = self.jobs.get(&id) {
                if !queues.contains(&e.job.queue) {
                    queues.push(e.job.queue.clone());
                }
            }
            n += 1;
        }
        queues
    }

    fn finish_dead(&mut self, id: JobId, now: Time, error: String) {
        if let Some(e) = self.jobs.get_mut(&id) {
            e.job.state = JobState::Dead;
            e.job.last_error = Some(error);
            e.job.finished_at = Some(now);
            e.job.lease_until = None;
            e.token = None;
            self.dead.insert((now, id));
        }
    }
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        MemoryBackend {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                signals: WakeSignals::default(),
            }),
        }
    }

    /// The store. A panic while it was held (none is expected: every section is short and
    /// panic-free) leaves it as it was, so later calls go on.
    fn state(&self) -> Result<MutexGuard<'_, State>> {
        Ok(lock_unpoisoned(&self.shared.state))
    }

    fn notify<'a>(&self, queues: impl IntoIterator<Item = &'a String>) {
        for q in queues {
            self.shared.signals.bump(q);
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
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
            .with_durable(false)
            .with_lease_expiry(true)
            .with_run_at_order(true)
            .with_list_dead(true)
            .with_priorities(true)
    }

    async fn push(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>> {
        let now = Utc::now();
        let mut ids = Vec::with_capacity(jobs.len());
        let mut woken: Vec<String> = Vec::new();
        {
            let mut st = self.state()?;
            for new in jobs {
                ids.push(new.id);
                if st.jobs.contains_key(&new.id) {
                    continue;
                }
                let run_at = match new.run_at {
                    RunAt::Now => now,
                    RunAt::After(d) => saturating_add(now, d),
                    RunAt::At(t) => t,
                };
                let due = run_at <= now;
                let job = Job {
                    id: new.id,
                    name: new.name,
                    queue: new.queue,
                    payload: new.payload,
                    priority: new.priority,
                    state: if due {
                        JobState::Ready
                    } else {
                        JobState::Scheduled
                    },
                    attempt: 0,
                    max_attempts: new.max_attempts.max(1),
                    timeout: new.timeout,
                    enqueued_at: now,
                    run_at,
                    last_error: None,
                    lease_until: None,
                    finished_at: None,
                };
                let (id, queue) = (job.id, job.queue.clone());
                st.jobs.insert(id, Entry { job, token: None });
                if due {
                    st.make_ready(id);
                } else {
                    st.delayed.insert((run_at, id));
                }
                if !woken.contains(&queue) {
                    woken.push(queue);
                }
            }
        }
        self.notify(&woken);
        Ok(ids)
    }

    async fn claim(&self, req: ClaimRequest<'_>) -> Result<Vec<ClaimedJob>> {
        let now = Utc::now();
        let lease_until = saturating_add(now, req.lease);
        let mut out = Vec::with_capacity(req.limit.min(1024));
        let mut st = self.state()?;
        let promoted = st.promote(now, PROMOTE_PER_CLAIM);
        let st = &mut *st;
        if let Some(names) = st.ready.get_mut(req.queue) {
            let mut sets: Vec<&mut BTreeSet<ReadyKey>> = names
                .iter_mut()
                .filter(|(name, set)| !set.is_empty() && req.names.contains(name))
                .map(|(_, set)| set)
                .collect();
            while out.len() < req.limit {
                // The best head among the allowed names.
                let mut best: Option<(usize, ReadyKey)> = None;
                for (i, set) in sets.iter().enumerate() {
                    if let Some(k) = set.first() {
                        if best.as_ref().is_none_or(|(_, b)| k < b) {
                            best = Some((i, *k));
                        }
                    }
                }
                let Some((i, key)) = best else { break };
                sets[i].pop_first();
                let id = key.2;
                let Some(e) = st.jobs.get_mut(&id) else {
                    continue;
                };
                let token = LeaseToken::random();
                e.token = Some(token);
                e.job.state = JobState::Running;
                e.job.attempt += 1;
                e.job.lease_until = Some(lease_until);
                st.leases.insert((lease_until, id));
                out.push(ClaimedJob {
                    job: e.job.clone(),
                    token,
                });
            }
        }
        drop(promoted);
        Ok(out)
    }

    async fn finish(&self, batch: &[Finish]) -> Result<Vec<bool>> {
        let now = Utc::now();
        let mut applied = Vec::with_capacity(batch.len());
        let mut woken: Vec<String> = Vec::new();
        {
            let mut st = self.state()?;
            for f in batch {
                let current = match st.jobs.get(&f.id) {
                    Some(e) => e.job.state == JobState::Running && e.token == Some(f.token),
                    None => false,
                };
                applied.push(current);
                if !current {
                    continue;
                }
                let Some(lease) = st.jobs.get(&f.id).and_then(|e| e.job.lease_until) else {
                    continue;
                };
                st.leases.remove(&(lease, f.id));
                match &f.outcome {
                    Outcome::Succeeded { keep: false } => {
                        st.jobs.remove(&f.id);
                    }
                    Outcome::Succeeded { keep: true } => {
                        if let Some(e) = st.jobs.get_mut(&f.id) {
                            e.job.state = JobState::Succeeded;
                            e.job.finished_at = Some(now);
                            e.job.lease_until = None;
                            e.token = None;
                        }
                        st.succeeded.insert((now, f.id));
                    }
                    Outcome::Retry { delay, error } => {
                        let run_at = saturating_add(now, *delay);
                        if let Some(e) = st.jobs.get_mut(&f.id) {
                            e.job.last_error = Some(error.clone());
                            e.job.run_at = run_at;
                            e.job.lease_until = None;
                            e.token = None;
                            if delay.is_zero() {
                                let q = e.job.queue.clone();
                                st.make_ready(f.id);
                                woken.push(q);
                            } else {
                                e.job.state = JobState::Retrying;
                                // Wake the waiters so they re-arm for this earlier deadline.
                                woken.push(e.job.queue.clone());
                                st.delayed.insert((run_at, f.id));
                            }
                        }
                    }
                    Outcome::Dead { error } => st.finish_dead(f.id, now, error.clone()),
                    Outcome::Release => {
                        if let Some(e) = st.jobs.get_mut(&f.id) {
                            e.job.attempt = e.job.attempt.saturating_sub(1);
                            woken.push(e.job.queue.clone());
                        }
                        st.make_ready(f.id);
                    }
                }
            }
        }
        woken.sort();
        woken.dedup();
        self.notify(&woken);
        Ok(applied)
    }

    async fn heartbeat(
        &self,
        leases: &[(JobId, LeaseToken)],
        lease: Duration,
    ) -> Result<Vec<bool>> {
        let until = saturating_add(Utc::now(), lease);
        let mut st = self.state()?;
        let mut held = Vec::with_capacity(leases.len());
        for (id, token) in leases {
            let old = match st.jobs.get_mut(id) {
                Some(e) if e.job.state == JobState::Running && e.token == Some(*token) => {
                    let old = e.job.lease_until;
                    e.job.lease_until = Some(until);
                    old
                }
                _ => {
                    held.push(false);
                    continue;
                }
            };
            if let Some(old) = old {
                st.leases.remove(&(old, *id));
            }
            st.leases.insert((until, *id));
            held.push(true);
        }
        Ok(held)
    }

    async fn wait(&self, queue: &str, seen: u64, timeout: Duration) -> Result<u64> {
        // Wake for the earliest delayed job too, so delays are honoured without polling.
        let mut deadline = timeout;
        if let Some(&(at, _)) = self.state()?.delayed.first() {
            let until = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            deadline = deadline.min(until + Duration::from_millis(1));
        }
        Ok(self.shared.signals.wait(queue, seen, deadline).await)
    }

    async fn maintain(&self, m: &Maintenance) -> Result<MaintenanceReport> {
        let now = Utc::now();
        let mut report = MaintenanceReport::default();
        let mut woken = Vec::new();
        {
            let mut st = self.state()?;
            let promoted = st.promote(now, m.batch);
            report.promoted = promoted.len() as u64;
            woken.extend(promoted);
            let mut n = 0;
            while n < m.batch {
                let Some(&(at, id)) = st.leases.first() else {
                    break;
                };
                if at > now {
                    break;
                }
                st.leases.pop_first();
                n += 1;
                let Some(e) = st.jobs.get(&id) else { continue };
                let (attempt, max, queue) =
                    (e.job.attempt, e.job.max_attempts, e.job.queue.clone());
                if attempt >= max {
                    st.finish_dead(id, now, lease_expired(attempt, max));
                    report.expired_dead += 1;
                } else {
                    if let Some(e) = st.jobs.get_mut(&id) {
                        e.job.last_error = Some(lease_expired(attempt, max));
                    }
                    st.make_ready(id);
                    report.recovered += 1;
                    woken.push(queue);
                }
            }
            for (ttl, dead) in [(m.succeeded_ttl, false), (m.dead_ttl, true)] {
                let cutoff = before(now, ttl);
                while (report.pruned as usize) < m.batch {
                    let set = if dead {
                        &mut st.dead
                    } else {
                        &mut st.succeeded
                    };
                    let Some(&(at, id)) = set.first() else { break };
                    if at > cutoff {
                        break;
                    }
                    set.pop_first();
                    st.jobs.remove(&id);
                    report.pruned += 1;
                }
            }
        }
        woken.sort();
        woken.dedup();
        self.notify(&woken);
        Ok(report)
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        Ok(self.state()?.jobs.get(&id).map(|e| e.job.clone()))
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let st = self.state()?;
        let mut jobs: Vec<&Job> = st
            .jobs
            .values()
            .map(|e| &e.job)
            .filter(|j| filter.state.is_none_or(|s| j.state == s))
            .filter(|j| filter.queue.as_deref().is_none_or(|q| j.queue == q))
            .filter(|j| filter.name.as_deref().is_none_or(|n| j.name == n))
            .collect();
        jobs.sort_by_key(|j| j.id);
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        Ok(jobs
            .into_iter()
            .skip(filter.offset)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn counts(&self, queue: Option<&str>) -> Result<Counts> {
        let st = self.state()?;
        let mut c = Counts::default();
        for e in st.jobs.values() {
            if queue.is_none_or(|q| e.job.queue == q) {
                *c.get_mut(e.job.state) += 1;
            }
        }
        Ok(c)
    }

    async fn cancel(&self, id: JobId) -> Result<bool> {
        let mut st = self.state()?;
        let Some(job) = st.jobs.get(&id).map(|e| e.job.clone()) else {
            return Ok(false);
        };
        if !job.state.is_waiting() {
            return Ok(false);
        }
        st.unindex(&job);
        st.jobs.remove(&id);
        Ok(true)
    }

    async fn retry_dead(&self, id: JobId) -> Result<bool> {
        let queue = {
            let mut st = self.state()?;
            let Some(job) = st.jobs.get(&id).map(|e| e.job.clone()) else {
                return Ok(false);
            };
            if job.state != JobState::Dead {
                return Ok(false);
            }
            st.unindex(&job);
            if let Some(e) = st.jobs.get_mut(&id) {
                e.job.attempt = 0;
                e.job.finished_at = None;
                e.job.run_at = Utc::now();
            }
            st.make_ready(id);
            job.queue
        };
        self.notify([&queue]);
        Ok(true)
    }

    async fn delete(&self, id: JobId) -> Result<bool> {
        let mut st = self.state()?;
        let Some(job) = st.jobs.get(&id).map(|e| e.job.clone()) else {
            return Ok(false);
        };
        if job.state == JobState::Running {
            return Ok(false);
        }
        st.unindex(&job);
        st.jobs.remove(&id);
        Ok(true)
    }

    async fn purge(&self, state: JobState, queue: Option<&str>) -> Result<u64> {
        if state == JobState::Running {
            return Err(Error::InvalidJob("running jobs cannot be purged".into()));
        }
        let mut st = self.state()?;
        let victims: Vec<Job> = st
            .jobs
            .values()
            .filter(|e| e.job.state == state && queue.is_none_or(|q| e.job.queue == q))
            .map(|e| e.job.clone())
            .collect();
        for job in &victims {
            st.unindex(job);
            st.jobs.remove(&job.id);
        }
        Ok(victims.len() as u64)
    }

    async fn lock_acquire(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let now = Utc::now();
        let mut st = self.state()?;
        let free = match st.locks.get(name) {
            None => true,
            Some((holder, until)) => *holder == owner || *until <= now,
        };
        if free {
            st.locks
                .insert(name.to_owned(), (owner, saturating_add(now, ttl)));
        }
        Ok(free)
    }

    async fn lock_renew(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let now = Utc::now();
        let mut st = self.state()?;
        match st.locks.get_mut(name) {
            Some((holder, until)) if *holder == owner && *until > now => {
                *until = saturating_add(now, ttl);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn lock_release(&self, name: &str, owner: LeaseToken) -> Result<bool> {
        let mut st = self.state()?;
        match st.locks.get(name) {
            Some((holder, _)) if *holder == owner => {
                st.locks.remove(name);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
