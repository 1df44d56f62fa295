//! The scenarios of the contract, one `pub async fn` each, named as sentences.
//!
//! Each takes a [`Harness`] and asserts something that could fail. None asserts how fast
//! anything happened: waits have a generous deadline ([`PATIENCE`](crate::PATIENCE)) and only
//! lower bounds of time (a delayed job never starts early) are checked.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backline_core::{
    Backend, BackgroundWorker, ClaimRequest, EnqueueOptions, Error, Finish, JobArgs, JobFilter,
    JobId, JobManager, JobServer, JobServerBuilder, JobState, LeaseToken, Maintenance, NewJob,
    Outcome, Priority, RunAt, WorkerContext, WorkerError, WorkerManager, WorkerManagerConfig,
    WorkerOptions,
};
use chrono::Utc;

use crate::jobs::{Action, AgingTask, Recorder, SlowBackoffTask, Task, TaskHandler, UnknownTask};
use crate::{all_jobs, eventually, fast_config, job, Harness};

macro_rules! scenario_names {
    ($($name:ident),* $(,)?) => {
        /// The name of every scenario, in the order of [`for_each_scenario!`](crate::for_each_scenario).
        pub const ALL: &[&str] = &[$(stringify!($name)),*];
    };
}
crate::for_each_scenario!(scenario_names);

struct Setup {
    backend: Arc<dyn Backend>,
    manager: JobManager,
    rec: Arc<Recorder>,
}

async fn setup(h: &dyn Harness) -> Setup {
    let backend = h.backend().await;
    Setup {
        manager: JobManager::new(backend.clone()),
        backend,
        rec: Recorder::new(),
    }
}

impl Setup {
    /// A server with every test handler and the fast timings, serving `default` with 4 slots.
    fn server(&self) -> JobServerBuilder {
        JobServer::builder(self.backend.clone())
            .register(TaskHandler::<Task>::new(self.rec.clone()))
            .register(TaskHandler::<SlowBackoffTask>::new(self.rec.clone()))
            .register(TaskHandler::<AgingTask>::new(self.rec.clone()))
            .config(fast_config())
            .queue("default", 4)
    }

    async fn drain(&self) {
        self.server()
            .build()
            .expect("build server")
            .run_until_idle()
            .await
            .expect("run until idle");
    }

    async fn enqueue(&self, task: Task) -> JobId {
        self.manager.enqueue(task).await.expect("enqueue")
    }

    async fn enqueue_with(&self, task: Task, opts: EnqueueOptions) -> JobId {
        self.manager
            .enqueue_with(task, opts)
            .await
            .expect("enqueue")
    }

    async fn state(&self, id: JobId) -> Option<JobState> {
        job(&self.manager, id).await.map(|j| j.state)
    }

    async fn wait_state(&self, id: JobId, state: JobState) -> backline_core::Job {
        eventually(&format!("job {id} to be {state}"), || async {
            job(&self.manager, id).await.filter(|j| j.state == state)
        })
        .await
    }

    /// Whether the backend answers `get` (a broker does not: a job it handed out is gone).
    fn tracks(&self) -> bool {
        self.backend.capabilities().get_job
    }

    /// Asserts that `get` is refused as unsupported.
    async fn no_get(&self, id: JobId) {
        unsupported("getting a job by id", self.backend.get(id).await);
    }

    /// The counts of every queue.
    async fn counts(&self) -> backline_core::Counts {
        self.manager.counts(None).await.expect("counts")
    }

    /// Without `get`: nothing is left in any queue (the job succeeded and left the broker).
    async fn assert_gone(&self, id: JobId) {
        self.no_get(id).await;
        let c = self.counts().await;
        assert_eq!(c.total(), 0, "nothing left: {c:?}");
    }

    /// Waits until the job succeeded: by its state, or (without `get`) by its attempt
    /// `attempt` recorded in `rec` and every queue empty. Returns the job where `get` answers.
    async fn wait_succeeded(
        &self,
        rec: &Recorder,
        id: JobId,
        attempt: u32,
    ) -> Option<backline_core::Job> {
        if self.tracks() {
            return Some(self.wait_state(id, JobState::Succeeded).await);
        }
        rec.wait_until(&format!("attempt {attempt} of {id}"), |e| {
            e.iter().any(|e| e.id == id && e.attempt == attempt)
        })
        .await;
        eventually("every queue to be empty", || async {
            (self.counts().await.total() == 0).then_some(())
        })
        .await;
        None
    }

    /// The job if it is dead: by `get`, or from the dead letters (`list_dead`).
    async fn dead_job(&self, id: JobId) -> Option<backline_core::Job> {
        if self.tracks() {
            return job(&self.manager, id)
                .await
                .filter(|j| j.state == JobState::Dead);
        }
        assert!(
            self.backend.capabilities().list_dead,
            "a backend answers get or lists its dead jobs"
        );
        self.manager
            .list(&JobFilter {
                state: Some(JobState::Dead),
                limit: 10_000,
                ..JobFilter::default()
            })
            .await
            .expect("list dead jobs")
            .into_iter()
            .find(|j| j.id == id)
    }

    /// Waits until the job is dead.
    async fn wait_dead(&self, id: JobId) -> backline_core::Job {
        eventually(&format!("job {id} to be dead"), || self.dead_job(id)).await
    }

    async fn maintain(&self) -> backline_core::MaintenanceReport {
        self.backend
            .maintain(&Maintenance {
                batch: 1000,
                succeeded_ttl: Duration::from_secs(3600),
                dead_ttl: Duration::from_secs(3600),
            })
            .await
            .expect("maintain")
    }

    async fn claim(&self, limit: usize, lease: Duration) -> Vec<backline_core::ClaimedJob> {
        let names = [Task::NAME.to_owned()];
        self.backend
            .claim(ClaimRequest {
                queue: "default",
                names: &names,
                limit,
                lease,
            })
            .await
            .expect("claim")
    }
}

fn unsupported(what: &str, r: Result<impl std::fmt::Debug, Error>) {
    match r {
        Err(e) if e.is_unsupported() => {
            eprintln!("{what}: unsupported by this backend (asserted Error::Unsupported)")
        }
        other => panic!("{what}: expected Error::Unsupported, got {other:?}"),
    }
}

/// One job, one attempt, succeeded.
pub async fn a_job_runs_exactly_once(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s.enqueue(Task::ok("once")).await;
    s.drain().await;
    let events = s.rec.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].id, id);
    assert_eq!(events[0].attempt, 1);
    if !s.tracks() {
        s.assert_gone(id).await;
        return;
    }
    let j = job(&s.manager, id).await.expect("kept for retention");
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(j.attempt, 1);
}

/// A batch of 200 runs every job once.
pub async fn batch_enqueue_runs_every_job(h: &dyn Harness) {
    let s = setup(h).await;
    let ids = s
        .manager
        .enqueue_batch((0..200).map(|i| Task::ok(format!("b{i}"))))
        .await
        .expect("batch enqueue");
    assert_eq!(ids.len(), 200);
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 200, "ids are distinct");
    s.drain().await;
    let mut ran: Vec<JobId> = s.rec.events().into_iter().map(|e| e.id).collect();
    ran.sort();
    assert_eq!(ran, unique, "each job ran exactly once");
}

/// A job delayed by 1.5 s is scheduled meanwhile and never starts before it is due.
pub async fn a_delayed_job_waits_until_due(h: &dyn Harness) {
    let s = setup(h).await;
    let delay = Duration::from_millis(1500);
    let before = Utc::now();
    let late = s
        .enqueue_with(Task::ok("late"), EnqueueOptions::new().delay(delay))
        .await;
    let now_id = s.enqueue(Task::ok("now")).await;
    if s.tracks() {
        assert_eq!(s.state(late).await, Some(JobState::Scheduled));
    } else {
        let c = s.counts().await;
        assert_eq!((c.scheduled, c.ready), (1, 1), "{c:?}");
    }
    let running = s.server().build().expect("server").start();
    s.rec.wait_until("both ran", |e| e.len() >= 2).await;
    running.shutdown().await.expect("shutdown");
    let events = s.rec.events();
    assert_eq!(events[0].id, now_id, "the immediate job ran first");
    let late_event = events.iter().find(|e| e.id == late).expect("late ran");
    let earliest = before + chrono::Duration::from_std(delay).expect("delay");
    // 5 ms of slack for the clock resolution of database servers.
    assert!(
        late_event.started + chrono::Duration::milliseconds(5) >= earliest,
        "started {} before due {}",
        late_event.started,
        earliest
    );
}

/// A run-at an hour in the past runs at once.
pub async fn a_run_at_in_the_past_runs_now(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s
        .enqueue_with(
            Task::ok("past"),
            EnqueueOptions::new().run_at(Utc::now() - chrono::Duration::hours(1)),
        )
        .await;
    if !s.tracks() {
        let c = s.counts().await;
        assert_eq!((c.ready, c.scheduled), (1, 0), "{c:?}");
        s.drain().await;
        assert_eq!(s.rec.tags(), ["past"]);
        s.assert_gone(id).await;
        return;
    }
    assert_eq!(s.state(id).await, Some(JobState::Ready));
    s.drain().await;
    assert_eq!(s.state(id).await, Some(JobState::Succeeded));
}

async fn one_slot_order(s: &Setup) -> Vec<String> {
    s.server()
        .queue("default", 1)
        .configure(|c| c.claim_batch = 1)
        .build()
        .expect("server")
        .run_until_idle()
        .await
        .expect("drain");
    s.rec.tags()
}

/// Among due jobs, higher priority runs first, whatever the enqueue order.
pub async fn higher_priority_runs_first(h: &dyn Harness) {
    let s = setup(h).await;
    for p in [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::BelowNormal,
        Priority::AboveNormal,
    ] {
        s.enqueue_with(
            Task::ok(format!("{p:?}")),
            EnqueueOptions::new().priority(p),
        )
        .await;
    }
    let order = one_slot_order(&s).await;
    if !s.backend.capabilities().priorities {
        // A queue without priorities is FIFO: due jobs run in the order they were enqueued.
        eprintln!("priorities: not kept by this backend (asserted FIFO order)");
        assert_eq!(
            order,
            ["Low", "Normal", "High", "BelowNormal", "AboveNormal"],
            "claim order without priorities"
        );
        return;
    }
    assert_eq!(
        order,
        ["High", "AboveNormal", "Normal", "BelowNormal", "Low"],
        "claim order"
    );
}

/// Among due jobs of equal priority, the earlier run-at runs first.
pub async fn equal_priority_runs_in_run_at_order(h: &dyn Harness) {
    let s = setup(h).await;
    let now = Utc::now();
    for (tag, secs_ago) in [("third", 10), ("first", 30), ("second", 20)] {
        s.enqueue_with(
            Task::ok(tag),
            EnqueueOptions::new().run_at(now - chrono::Duration::seconds(secs_ago)),
        )
        .await;
    }
    s.enqueue(Task::ok("fourth")).await;
    if !s.backend.capabilities().run_at_order {
        // A broker queue is FIFO: due jobs of equal priority run in the order they became due.
        eprintln!("run-at order among due jobs: not kept by this backend (asserted FIFO order)");
        assert_eq!(
            one_slot_order(&s).await,
            ["third", "first", "second", "fourth"]
        );
        return;
    }
    assert_eq!(
        one_slot_order(&s).await,
        ["first", "second", "third", "fourth"]
    );
}

/// A server runs only the queues it serves; other queues keep their jobs.
pub async fn queues_are_isolated(h: &dyn Harness) {
    let s = setup(h).await;
    let a = s
        .enqueue_with(Task::ok("a"), EnqueueOptions::new().queue("alpha"))
        .await;
    let b = s
        .enqueue_with(Task::ok("b"), EnqueueOptions::new().queue("beta"))
        .await;
    JobServer::builder(s.backend.clone())
        .register(TaskHandler::<Task>::new(s.rec.clone()))
        .config(fast_config())
        .queue("alpha", 2)
        .build()
        .expect("server")
        .run_until_idle()
        .await
        .expect("drain");
    assert_eq!(s.rec.tags(), ["a"]);
    assert_eq!(s.rec.events()[0].queue, "alpha");
    if s.tracks() {
        assert_eq!(s.state(a).await, Some(JobState::Succeeded));
        assert_eq!(s.state(b).await, Some(JobState::Ready));
    } else {
        s.no_get(a).await;
        assert_eq!(
            s.manager
                .counts(Some("alpha"))
                .await
                .expect("counts")
                .total(),
            0
        );
        let _ = b;
    }
    let beta = s.manager.counts(Some("beta")).await.expect("counts");
    assert_eq!((beta.ready, beta.succeeded), (1, 0));
}

/// One server serving 100 queues runs the job of each.
pub async fn many_queues_are_all_served(h: &dyn Harness) {
    let s = setup(h).await;
    let mut builder = JobServer::builder(s.backend.clone())
        .register(TaskHandler::<Task>::new(s.rec.clone()))
        .config(fast_config());
    for i in 0..100 {
        let q = format!("q{i:03}");
        s.enqueue_with(Task::ok(q.clone()), EnqueueOptions::new().queue(q.clone()))
            .await;
        builder = builder.queue(q, 1);
    }
    builder
        .build()
        .expect("server")
        .run_until_idle()
        .await
        .expect("drain");
    let mut tags = s.rec.tags();
    tags.sort();
    let expected: Vec<String> = (0..100).map(|i| format!("q{i:03}")).collect();
    assert_eq!(tags, expected);
    for e in s.rec.events() {
        assert_eq!(e.tag, e.queue, "ran from its own queue");
    }
}

/// Two failures, then success: three attempts, spaced by at least the back-off.
pub async fn a_retryable_failure_is_retried_with_backoff(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s.enqueue(Task::new("flaky", Action::FailUntil(3))).await;
    let running = s.server().build().expect("server").start();
    let j = s.wait_succeeded(&s.rec, id, 3).await;
    running.shutdown().await.expect("shutdown");
    let events = s.rec.events();
    let attempts: Vec<u32> = events.iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    // The policy waits 50 ms, then 100 ms (no jitter): later attempts never start sooner.
    let gap1 = events[1].started - events[0].started;
    let gap2 = events[2].started - events[1].started;
    assert!(
        gap1 >= chrono::Duration::milliseconds(45),
        "first back-off {gap1}"
    );
    assert!(
        gap2 >= chrono::Duration::milliseconds(95),
        "second back-off {gap2}"
    );
    if let Some(j) = j {
        assert_eq!(j.attempt, 3);
        assert_eq!(j.last_error.as_deref(), Some("boom at attempt 2"));
    }
}

/// A job that always fails ends dead after its attempts, with the last error.
pub async fn exhausted_attempts_end_dead_with_the_last_error(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s
        .enqueue_with(
            Task::new("doomed", Action::AlwaysFail),
            EnqueueOptions::new().max_attempts(3),
        )
        .await;
    let running = s.server().build().expect("server").start();
    let j = s.wait_dead(id).await;
    running.shutdown().await.expect("shutdown");
    assert_eq!(j.attempt, 3);
    let err = j.last_error.expect("last error");
    assert!(err.contains("boom at attempt 3"), "{err}");
    assert_eq!(s.rec.events().len(), 3);
}

/// A fatal error ends the job dead after one attempt.
pub async fn a_fatal_error_ends_dead_at_once(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s.enqueue(Task::new("fatal", Action::Fatal)).await;
    s.drain().await;
    let j = s.dead_job(id).await.expect("dead job");
    assert_eq!(j.state, JobState::Dead);
    assert_eq!(j.attempt, 1);
    assert_eq!(j.last_error.as_deref(), Some("fatal boom"));
    assert_eq!(s.rec.events().len(), 1);
}

/// A panicking handler is retried, and the server keeps running other jobs.
pub async fn a_panic_is_a_retryable_failure(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s.enqueue(Task::new("panicky", Action::PanicUntil(2))).await;
    let other = s.enqueue(Task::ok("bystander")).await;
    let running = s.server().build().expect("server").start();
    let j = s.wait_succeeded(&s.rec, id, 2).await;
    s.wait_succeeded(&s.rec, other, 1).await;
    running.shutdown().await.expect("shutdown");
    let attempts: Vec<u32> = s
        .rec
        .events()
        .iter()
        .filter(|e| e.id == id)
        .map(|e| e.attempt)
        .collect();
    assert_eq!(attempts, [1, 2]);
    if let Some(j) = j {
        assert_eq!(j.attempt, 2);
        let err = j.last_error.expect("the panic is recorded");
        assert!(err.contains("kaboom at attempt 1"), "{err}");
    }
}

/// `retry_after` reschedules after the asked delay, not the type's 30 s back-off.
pub async fn retry_after_reschedules_without_escalation(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s
        .manager
        .enqueue(SlowBackoffTask(Task::new(
            "later",
            Action::RetryAfter { ms: 200, until: 3 },
        )))
        .await
        .expect("enqueue");
    let running = s.server().build().expect("server").start();
    // With the 30 s back-off, attempt 3 would come after 90 s; PATIENCE is 30 s.
    let j = s.wait_succeeded(&s.rec, id, 3).await;
    running.shutdown().await.expect("shutdown");
    if let Some(j) = j {
        assert_eq!(j.attempt, 3);
    }
    let events = s.rec.events();
    let gap = events[2].started - events[1].started;
    assert!(
        gap >= chrono::Duration::milliseconds(195),
        "retry_after honoured: {gap}"
    );
}

/// Arguments that do not decode end the job dead at once with the reason.
pub async fn undecodable_arguments_end_dead_with_the_reason(h: &dyn Harness) {
    let s = setup(h).await;
    let id = JobId::new();
    s.manager
        .enqueue_raw(vec![NewJob {
            id,
            name: Task::NAME.to_owned(),
            queue: "default".to_owned(),
            payload: b"{\"not\": \"a task\"}".to_vec(),
            priority: Priority::Normal,
            run_at: RunAt::Now,
            max_attempts: 5,
            timeout: None,
        }])
        .await
        .expect("enqueue raw");
    let good = s.enqueue(Task::ok("good")).await;
    s.drain().await;
    let j = s.dead_job(id).await.expect("dead job kept");
    assert_eq!(j.state, JobState::Dead);
    assert_eq!(j.attempt, 1);
    let err = j.last_error.expect("reason");
    assert!(err.contains("undecodable arguments"), "{err}");
    if s.tracks() {
        assert_eq!(s.state(good).await, Some(JobState::Succeeded));
    } else {
        assert!(s.rec.events().iter().any(|e| e.id == good));
        assert_eq!(s.counts().await.dead, 1);
    }
    assert!(s.rec.events().iter().all(|e| e.id != id));
}

/// A job whose name this server has no handler for is never lost nor marked succeeded; a
/// server that has the handler runs it later (after an operator retry if it went dead).
pub async fn an_unknown_job_name_is_never_lost(h: &dyn Harness) {
    let s = setup(h).await;
    let unknown = s
        .manager
        .enqueue_with(
            UnknownTask(Task::ok("unknown")),
            EnqueueOptions::new().max_attempts(2),
        )
        .await
        .expect("enqueue");
    let known = s.enqueue(Task::ok("known")).await;
    s.drain().await;
    if !s.tracks() {
        // Claims filter by name: the unknown job waits, untouched, in its own queue.
        assert_eq!(s.rec.tags(), ["known"]);
        let c = s.counts().await;
        assert_eq!((c.ready, c.dead), (1, 0), "{c:?}");
        let newer = Recorder::new();
        let running = JobServer::builder(s.backend.clone())
            .register(TaskHandler::<UnknownTask>::new(newer.clone()))
            .config(fast_config())
            .queue("default", 2)
            .build()
            .expect("server")
            .start();
        s.wait_succeeded(&newer, unknown, 1).await;
        running.shutdown().await.expect("shutdown");
        let _ = known;
        return;
    }
    assert_eq!(s.state(known).await, Some(JobState::Succeeded));
    let j = job(&s.manager, unknown)
        .await
        .expect("the unknown job is kept");
    assert_ne!(j.state, JobState::Succeeded);
    if j.state == JobState::Dead || j.state == JobState::Retrying {
        let err = j.last_error.clone().unwrap_or_default();
        assert!(
            err.contains("testkit.unknown"),
            "reason names the job: {err}"
        );
    }
    if j.state == JobState::Dead {
        assert!(s.manager.retry_dead(unknown).await.expect("retry dead"));
    }
    // A newer deployment knows the name.
    let newer = Recorder::new();
    let running = JobServer::builder(s.backend.clone())
        .register(TaskHandler::<UnknownTask>::new(newer.clone()))
        .config(fast_config())
        .queue("default", 2)
        .build()
        .expect("server")
        .start();
    newer.wait_for_attempts(1).await;
    s.wait_state(unknown, JobState::Succeeded).await;
    running.shutdown().await.expect("shutdown");
    assert!(s.rec.events().iter().all(|e| e.id != unknown));
}

/// A claim whose worker died is claimed again once its lease expires.
pub async fn lease_expiry_redelivers_the_job(h: &dyn Harness) {
    let s = setup(h).await;
    if !s.backend.capabilities().lease_expiry {
        return lease_ends_with_the_connection(h, &s).await;
    }
    let id = s.enqueue(Task::ok("orphan")).await;
    let claimed = s.claim(1, Duration::from_millis(300)).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].job.attempt, 1);
    // The "worker" dies: nothing finishes or heartbeats this claim.
    assert!(
        s.claim(1, Duration::from_secs(5)).await.is_empty(),
        "leased jobs are not claimable"
    );
    let running = s.server().build().expect("server").start();
    let j = s.wait_state(id, JobState::Succeeded).await;
    running.shutdown().await.expect("shutdown");
    assert_eq!(j.attempt, 2, "the lost attempt counts");
    assert_eq!(s.rec.events().len(), 1);
}

/// Without `lease_expiry` (a broker), a lease is the delivery: it never expires by time, and
/// it ends when the claiming connection closes (here: a twin handle is dropped).
async fn lease_ends_with_the_connection(h: &dyn Harness, s: &Setup) {
    eprintln!("lease expiry: leases end with their connection on this backend (asserted)");
    let id = s.enqueue(Task::ok("orphan")).await;
    let twin = h.twin(&s.backend).await;
    assert!(
        !Arc::ptr_eq(&twin, &s.backend),
        "a backend without lease_expiry needs a harness whose twin is another connection"
    );
    let claimed = claim_on(&twin, 1, Duration::from_millis(300)).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].job.attempt, 1);
    // Outlive the nominal lease on purpose (a negative check has no signal to await): the
    // delivery still holds the job.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        s.claim(1, Duration::from_secs(5)).await.is_empty(),
        "a held delivery is not claimable"
    );
    assert_eq!(
        twin.heartbeat(&[(id, claimed[0].token)], Duration::from_secs(1))
            .await
            .expect("heartbeat"),
        [true]
    );
    // The "worker" dies: its connection closes and the broker takes the delivery back.
    drop(twin);
    let running = s.server().build().expect("server").start();
    s.wait_succeeded(&s.rec, id, 2).await;
    running.shutdown().await.expect("shutdown");
    let attempts: Vec<u32> = s.rec.events().iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, [2], "the lost attempt counts");
}

async fn claim_on(
    b: &Arc<dyn Backend>,
    limit: usize,
    lease: Duration,
) -> Vec<backline_core::ClaimedJob> {
    let names = [Task::NAME.to_owned()];
    b.claim(ClaimRequest {
        queue: "default",
        names: &names,
        limit,
        lease,
    })
    .await
    .expect("claim")
}

/// A finish or heartbeat with the token of an expired claim is refused.
pub async fn a_stale_token_cannot_complete_or_fail_a_job(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s.enqueue(Task::ok("contested")).await;
    let broker = !s.backend.capabilities().lease_expiry;
    let (first, second) = if broker {
        // The first claim's connection dies (a dropped twin): its lease ends.
        let twin = h.twin(&s.backend).await;
        let first = claim_on(&twin, 1, Duration::from_millis(200))
            .await
            .remove(0);
        drop(twin);
        let second = eventually("the lost delivery to be claimed again", || async {
            s.claim(1, Duration::from_secs(30)).await.pop()
        })
        .await;
        (first, second)
    } else {
        let first = s.claim(1, Duration::from_millis(200)).await.remove(0);
        let second = eventually("the expired lease to be reclaimed", || async {
            s.maintain().await;
            s.claim(1, Duration::from_secs(30)).await.pop()
        })
        .await;
        (first, second)
    };
    assert_eq!(second.job.id, id);
    assert_ne!(first.token, second.token);
    let stale = s
        .backend
        .finish(&[
            Finish {
                id,
                token: first.token,
                outcome: Outcome::Succeeded { keep: true },
            },
            Finish {
                id,
                token: first.token,
                outcome: Outcome::Dead {
                    error: "stale".into(),
                },
            },
        ])
        .await
        .expect("finish");
    assert_eq!(stale, [false, false]);
    let hb = s
        .backend
        .heartbeat(&[(id, first.token)], Duration::from_secs(30))
        .await
        .expect("heartbeat");
    assert_eq!(hb, [false]);
    if broker {
        assert_eq!(second.job.attempt, 2);
        assert_eq!(s.counts().await.running, 1);
    } else {
        let j = job(&s.manager, id).await.expect("job");
        assert_eq!(j.state, JobState::Running);
        assert_eq!(j.attempt, 2);
    }
    let fresh = s
        .backend
        .finish(&[Finish {
            id,
            token: second.token,
            outcome: Outcome::Succeeded { keep: true },
        }])
        .await
        .expect("finish");
    assert_eq!(fresh, [true]);
    if broker {
        s.assert_gone(id).await;
    } else {
        assert_eq!(s.state(id).await, Some(JobState::Succeeded));
    }
}

/// A job running three times longer than its lease keeps it through heartbeats: one attempt.
pub async fn a_heartbeat_keeps_a_long_job_leased(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s.enqueue(Task::new("long", Action::Sleep(3000))).await;
    let running = s
        .server()
        .configure(|c| {
            c.lease = Duration::from_secs(1);
            c.heartbeat = Duration::from_millis(200);
        })
        .build()
        .expect("server")
        .start();
    let j = s.wait_succeeded(&s.rec, id, 1).await;
    running.shutdown().await.expect("shutdown");
    if let Some(j) = j {
        assert_eq!(j.attempt, 1);
    }
    assert_eq!(s.rec.events().len(), 1, "never redelivered");
}

/// An attempt past its timeout is cancelled and counts as a retryable failure.
pub async fn a_timeout_cancels_the_attempt(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s
        .enqueue_with(
            Task::new("stuck", Action::Forever),
            EnqueueOptions::new()
                .timeout(Duration::from_millis(200))
                .max_attempts(2),
        )
        .await;
    let running = s.server().build().expect("server").start();
    let j = s.wait_dead(id).await;
    running.shutdown().await.expect("shutdown");
    assert_eq!(j.attempt, 2);
    let err = j.last_error.expect("reason");
    assert!(err.contains("timed out"), "{err}");
    assert_eq!(s.rec.events().len(), 2);
}

/// A job whose worker dies on every attempt ends dead after its attempts, not in a loop.
pub async fn a_job_that_never_finishes_ends_dead_after_max_attempts(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s
        .enqueue_with(Task::ok("crashy"), EnqueueOptions::new().max_attempts(2))
        .await;
    if !s.backend.capabilities().lease_expiry {
        // Each attempt's worker dies with its connection (a twin handle, dropped).
        for attempt in 1..=2 {
            let twin = h.twin(&s.backend).await;
            let claimed = eventually(&format!("claim {attempt}"), || async {
                claim_on(&twin, 1, Duration::from_millis(150)).await.pop()
            })
            .await;
            assert_eq!(claimed.job.attempt, attempt);
            drop(twin);
        }
        let j = eventually("the job to die", || async {
            assert!(s.claim(1, Duration::from_secs(1)).await.is_empty());
            s.dead_job(id).await
        })
        .await;
        assert_eq!(j.attempt, 2);
        let err = j.last_error.expect("reason");
        assert!(err.contains("lease expired"), "{err}");
        return;
    }
    for attempt in 1..=2 {
        let claimed = eventually(&format!("claim {attempt}"), || async {
            s.maintain().await;
            s.claim(1, Duration::from_millis(150)).await.pop()
        })
        .await;
        assert_eq!(claimed.job.attempt, attempt);
    }
    let j = eventually("the job to die", || async {
        s.maintain().await;
        job(&s.manager, id)
            .await
            .filter(|j| j.state == JobState::Dead)
    })
    .await;
    assert_eq!(j.attempt, 2);
    let err = j.last_error.expect("reason");
    assert!(err.contains("lease expired"), "{err}");
    assert!(s.claim(1, Duration::from_secs(1)).await.is_empty());
}

/// A failure whose next try would fall past the max age abandons the job.
pub async fn max_age_abandons_a_job(h: &dyn Harness) {
    let s = setup(h).await;
    let id = s
        .manager
        .enqueue(AgingTask(Task::new("old", Action::AlwaysFail)))
        .await
        .expect("enqueue");
    s.drain().await;
    let j = s.dead_job(id).await.expect("dead job");
    assert_eq!(j.state, JobState::Dead);
    assert_eq!(j.attempt, 1);
    let err = j.last_error.expect("reason");
    assert!(err.contains("abandoned"), "{err}");
}

/// On shutdown, a running job that finishes within the grace period succeeds, and jobs not
/// yet claimed stay ready with no attempt spent.
pub async fn shutdown_lets_running_jobs_finish_and_leaves_queued_jobs_untouched(h: &dyn Harness) {
    let s = setup(h).await;
    let running_id = s
        .enqueue(Task::new("graceful", Action::UntilShutdown))
        .await;
    let running = s
        .server()
        .queue("default", 1)
        .configure(|c| c.claim_batch = 1)
        .build()
        .expect("server")
        .start();
    s.rec.wait_for_attempts(1).await;
    let queued: Vec<JobId> = s
        .manager
        .enqueue_batch((0..3).map(|i| Task::ok(format!("queued{i}"))))
        .await
        .expect("enqueue");
    running.shutdown().await.expect("shutdown");
    if !s.tracks() {
        s.no_get(running_id).await;
        let c = s.counts().await;
        assert_eq!((c.ready, c.total()), (3, 3), "{c:?}");
        let claimed = s.claim(3, Duration::from_secs(5)).await;
        assert!(
            claimed.iter().all(|c| c.job.attempt == 1),
            "no attempt spent"
        );
        assert_eq!(s.rec.events().len(), 1);
        return;
    }
    assert_eq!(s.state(running_id).await, Some(JobState::Succeeded));
    for id in queued {
        let j = job(&s.manager, id).await.expect("job");
        assert_eq!((j.state, j.attempt), (JobState::Ready, 0));
    }
    assert_eq!(s.rec.events().len(), 1);
}

/// A job still running after the grace period is cancelled and handed back without spending
/// its attempt; the next server runs it.
pub async fn shutdown_cancels_running_jobs_after_the_grace_period_and_hands_them_back(
    h: &dyn Harness,
) {
    let s = setup(h).await;
    let id = s.enqueue(Task::new("stubborn", Action::Forever)).await;
    let running = s
        .server()
        .configure(|c| c.grace = Duration::from_millis(300))
        .build()
        .expect("server")
        .start();
    s.rec.wait_for_attempts(1).await;
    running.shutdown().await.expect("shutdown");
    if s.tracks() {
        let j = job(&s.manager, id).await.expect("job");
        assert_eq!((j.state, j.attempt), (JobState::Ready, 0), "handed back");
    } else {
        let c = s.counts().await;
        assert_eq!((c.ready, c.total()), (1, 1), "handed back: {c:?}");
    }
    let claimed = s.claim(1, Duration::from_secs(5)).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        claimed[0].job.attempt, 1,
        "the cancelled attempt was given back"
    );
}

/// No more jobs run at once than the queue's concurrency.
pub async fn the_concurrency_limit_holds(h: &dyn Harness) {
    let s = setup(h).await;
    s.manager
        .enqueue_batch((0..24).map(|i| Task::new(format!("c{i}"), Action::Sleep(30))))
        .await
        .expect("enqueue");
    s.server()
        .queue("default", 3)
        .build()
        .expect("server")
        .run_until_idle()
        .await
        .expect("drain");
    assert_eq!(s.rec.events().len(), 24);
    let max = s.rec.max_running();
    assert!((1..=3).contains(&max), "at most 3 at once, saw {max}");
}

/// With a one-hour poll interval, a job enqueued to an idle server still runs: the wake-up
/// signal, not polling, starts it.
pub async fn a_new_job_wakes_an_idle_server(h: &dyn Harness) {
    let s = setup(h).await;
    let running = s
        .server()
        .configure(|c| {
            c.poll_interval = Duration::from_secs(3600);
            c.maintenance_interval = Duration::from_secs(3600);
        })
        .build()
        .expect("server")
        .start();
    // The first job proves the server is up and has gone idle after it.
    let first = s.enqueue(Task::ok("first")).await;
    s.wait_succeeded(&s.rec, first, 1).await;
    let second = s.enqueue(Task::ok("second")).await;
    s.wait_succeeded(&s.rec, second, 1).await;
    running.shutdown().await.expect("shutdown");
    assert_eq!(s.rec.tags(), ["first", "second"]);
}

/// Enqueueing twice with the same id stores and runs one job.
pub async fn enqueue_with_an_existing_id_is_idempotent(h: &dyn Harness) {
    let s = setup(h).await;
    let id = JobId::new();
    let opts = EnqueueOptions::new().id(id);
    if !s.backend.capabilities().dedup_by_id {
        unsupported(
            "enqueue with an explicit id",
            s.manager.enqueue_with(Task::ok("dup"), opts).await,
        );
        return;
    }
    assert_eq!(s.enqueue_with(Task::ok("dup"), opts.clone()).await, id);
    assert_eq!(s.enqueue_with(Task::ok("dup again"), opts).await, id);
    s.drain().await;
    assert_eq!(s.rec.tags(), ["dup"], "one job, the first one");
}

/// A payload over the limit is refused with a typed error and stores nothing.
pub async fn an_oversized_payload_is_refused(h: &dyn Harness) {
    let s = setup(h).await;
    let manager = s.manager.clone().with_max_payload(1024);
    let big = Task::new("big", Action::Pad("x".repeat(2048)));
    match manager.enqueue(big.clone()).await {
        Err(Error::PayloadTooLarge { size, limit, .. }) => {
            assert!(size > 2048);
            assert_eq!(limit, 1024);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    match manager.enqueue_batch([Task::ok("small"), big]).await {
        Err(Error::PayloadTooLarge { .. }) => {}
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert_eq!(s.manager.counts(None).await.expect("counts").total(), 0);
}

/// Counts and listing by state, queue and name agree with what was enqueued.
pub async fn inspection_lists_and_counts_by_state(h: &dyn Harness) {
    let s = setup(h).await;
    let ready = s
        .manager
        .enqueue_batch((0..3).map(|i| Task::ok(format!("r{i}"))))
        .await
        .expect("enqueue");
    let later = s
        .enqueue_with(
            Task::ok("later"),
            EnqueueOptions::new().delay(Duration::from_secs(3600)),
        )
        .await;
    let other_q = s
        .enqueue_with(Task::ok("elsewhere"), EnqueueOptions::new().queue("other"))
        .await;
    let c = s.manager.counts(None).await.expect("counts");
    assert_eq!((c.ready, c.scheduled, c.total()), (4, 1, 5));
    let c = s.manager.counts(Some("default")).await.expect("counts");
    assert_eq!((c.ready, c.scheduled, c.total()), (3, 1, 4));
    if !s.backend.capabilities().list_jobs {
        unsupported("listing jobs", s.manager.list(&JobFilter::default()).await);
        return;
    }
    let listed = s
        .manager
        .list(&JobFilter {
            state: Some(JobState::Ready),
            queue: Some("default".into()),
            ..JobFilter::default()
        })
        .await
        .expect("list");
    let mut ids: Vec<JobId> = listed.iter().map(|j| j.id).collect();
    ids.sort();
    let mut want = ready.clone();
    want.sort();
    assert_eq!(ids, want);
    let scheduled = s
        .manager
        .list(&JobFilter {
            state: Some(JobState::Scheduled),
            ..JobFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(scheduled.len(), 1);
    assert_eq!(scheduled[0].id, later);
    let by_queue = s
        .manager
        .list(&JobFilter {
            queue: Some("other".into()),
            ..JobFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(by_queue.len(), 1);
    assert_eq!(by_queue[0].id, other_q);
    let by_name = s
        .manager
        .list(&JobFilter {
            name: Some(Task::NAME.into()),
            limit: 2,
            ..JobFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(by_name.len(), 2, "limit honoured");
    let none = s
        .manager
        .list(&JobFilter {
            name: Some("no.such.job".into()),
            ..JobFilter::default()
        })
        .await
        .expect("list");
    assert!(none.is_empty());
    let j = job(&s.manager, later).await.expect("get");
    assert_eq!(j.name, Task::NAME);
    assert_eq!(j.queue, "default");
    let task: Task = serde_json::from_slice(&j.payload).expect("payload decodes");
    assert_eq!(task, Task::ok("later"));
}

/// Dead jobs can be retried (fresh attempts) or deleted; waiting jobs can be cancelled.
pub async fn an_operator_can_retry_or_delete_a_dead_job_and_cancel_a_queued_one(h: &dyn Harness) {
    let s = setup(h).await;
    let dead = s.enqueue(Task::new("dead", Action::Fatal)).await;
    let doomed = s.enqueue(Task::new("deleted", Action::Fatal)).await;
    s.drain().await;
    assert!(s.dead_job(dead).await.is_some(), "dead");
    assert_eq!(s.manager.counts(None).await.expect("counts").dead, 2);

    assert!(s.manager.retry_dead(dead).await.expect("retry"));
    if s.tracks() {
        let j = job(&s.manager, dead).await.expect("job");
        assert_eq!((j.state, j.attempt), (JobState::Ready, 0));
    } else {
        let c = s.counts().await;
        assert_eq!((c.ready, c.dead), (1, 1), "{c:?}");
    }
    assert!(
        !s.manager.retry_dead(dead).await.expect("retry"),
        "not dead any more"
    );

    assert!(s.manager.delete(doomed).await.expect("delete"));
    if s.tracks() {
        assert_eq!(s.state(doomed).await, None);
    } else {
        assert!(s.dead_job(doomed).await.is_none());
    }
    assert!(
        !s.manager.delete(doomed).await.expect("delete"),
        "already gone"
    );

    let queued = s
        .enqueue_with(
            Task::ok("cancelled"),
            EnqueueOptions::new().delay(Duration::from_secs(3600)),
        )
        .await;
    if !s.backend.capabilities().cancel {
        unsupported("cancelling a job", s.manager.cancel(queued).await);
        s.drain().await;
        let j = s.dead_job(dead).await.expect("dead again");
        assert_eq!(j.attempt, 1, "a fresh set of attempts");
        assert_eq!(
            s.manager.purge(JobState::Dead, None).await.expect("purge"),
            1
        );
        let c = s.counts().await;
        assert_eq!((c.dead, c.scheduled, c.total()), (0, 1, 1), "{c:?}");
        return;
    }
    assert!(s.manager.cancel(queued).await.expect("cancel"));
    assert_eq!(s.state(queued).await, None);
    assert!(
        !s.manager.cancel(queued).await.expect("cancel"),
        "already gone"
    );

    // The retried job now runs (and fails fatally again): a new attempt 1.
    s.drain().await;
    let j = job(&s.manager, dead).await.expect("job");
    assert_eq!((j.state, j.attempt), (JobState::Dead, 1));
    assert_eq!(
        s.manager.purge(JobState::Dead, None).await.expect("purge"),
        1
    );
    assert_eq!(s.manager.counts(None).await.expect("counts").total(), 0);
}

/// Retention removes succeeded and dead jobs past their TTL; a zero TTL deletes on success.
pub async fn retention_prunes_succeeded_and_dead_jobs(h: &dyn Harness) {
    let s = setup(h).await;
    let ok = s.enqueue(Task::ok("kept")).await;
    let dead = s.enqueue(Task::new("dead", Action::Fatal)).await;
    s.drain().await;
    if !s.tracks() {
        return retention_without_get(&s, ok, dead).await;
    }
    // Long TTLs keep both.
    s.maintain().await;
    assert_eq!(s.state(ok).await, Some(JobState::Succeeded));
    assert_eq!(s.state(dead).await, Some(JobState::Dead));
    let pruned = eventually("retention to prune both", || async {
        let r = s
            .backend
            .maintain(&Maintenance {
                batch: 1000,
                succeeded_ttl: Duration::ZERO,
                dead_ttl: Duration::ZERO,
            })
            .await
            .expect("maintain");
        let gone = s.state(ok).await.is_none() && s.state(dead).await.is_none();
        gone.then_some(r)
    })
    .await;
    assert!(pruned.pruned <= 2);
    // Retention zero: a succeeded job is deleted at once.
    let fleeting = s.enqueue(Task::ok("fleeting")).await;
    s.server()
        .configure(|c| c.succeeded_ttl = Duration::ZERO)
        .build()
        .expect("server")
        .run_until_idle()
        .await
        .expect("drain");
    let mut tags = s.rec.tags();
    tags.sort();
    assert_eq!(tags, ["dead", "fleeting", "kept"]);
    assert_eq!(s.state(fleeting).await, None);
}

/// Retention where `get` does not answer (a broker keeps no succeeded job): dead letters are
/// pruned by their age.
async fn retention_without_get(s: &Setup, ok: JobId, dead: JobId) {
    s.no_get(ok).await;
    s.maintain().await;
    let c = s.counts().await;
    assert_eq!((c.succeeded, c.dead, c.total()), (0, 1, 1), "{c:?}");
    assert!(s.dead_job(dead).await.is_some());
    let pruned = eventually("retention to prune the dead job", || async {
        let r = s
            .backend
            .maintain(&Maintenance {
                batch: 1000,
                succeeded_ttl: Duration::ZERO,
                dead_ttl: Duration::ZERO,
            })
            .await
            .expect("maintain");
        (s.counts().await.total() == 0).then_some(r)
    })
    .await;
    assert!(pruned.pruned <= 1);
    assert!(s.dead_job(dead).await.is_none());
}

/// A lock has one holder; the holder can renew it; it expires when not renewed.
pub async fn the_lock_is_exclusive_renewable_and_expires(h: &dyn Harness) {
    let s = setup(h).await;
    let b = &s.backend;
    let (alice, bob) = (LeaseToken::random(), LeaseToken::random());
    let ttl = Duration::from_millis(500);
    if !b.capabilities().locks {
        unsupported(
            "distributed locks",
            backline_core::DistributedLock::acquire(b.clone(), "testkit", ttl).await,
        );
        return;
    }
    assert!(b
        .lock_acquire("testkit", alice, ttl)
        .await
        .expect("acquire"));
    assert!(!b.lock_acquire("testkit", bob, ttl).await.expect("acquire"));
    assert!(b.lock_renew("testkit", alice, ttl).await.expect("renew"));
    assert!(!b.lock_renew("testkit", bob, ttl).await.expect("renew"));
    assert!(
        !b.lock_release("testkit", bob).await.expect("release"),
        "only the owner releases"
    );
    assert!(b
        .lock_acquire("other", bob, ttl)
        .await
        .expect("other names are independent"));
    // Alice stops renewing: Bob gets it once it expires, and Alice can no longer renew.
    eventually("the lock to expire", || async {
        b.lock_acquire("testkit", bob, ttl)
            .await
            .expect("acquire")
            .then_some(())
    })
    .await;
    assert!(!b.lock_renew("testkit", alice, ttl).await.expect("renew"));
    assert!(b.lock_release("testkit", bob).await.expect("release"));
    assert!(b
        .lock_acquire("testkit", alice, ttl)
        .await
        .expect("free again"));

    // The managed lock renews by itself past several TTLs.
    let lock = backline_core::DistributedLock::acquire(b.clone(), "managed", ttl)
        .await
        .expect("acquire")
        .expect("free");
    // Outlive three TTLs on purpose (a negative check has no signal to await): the renewal
    // must keep the lock.
    tokio::time::sleep(ttl * 3).await;
    assert!(!lock.is_lost());
    assert!(
        !b.lock_acquire("managed", bob, ttl).await.expect("acquire"),
        "still held"
    );
    lock.release().await;
    assert!(b.lock_acquire("managed", bob, ttl).await.expect("released"));
}

struct Singleton {
    started: Arc<AtomicUsize>,
    live: Arc<AtomicUsize>,
    max_live: Arc<AtomicUsize>,
}

impl BackgroundWorker for Singleton {
    fn name(&self) -> &str {
        "testkit-singleton"
    }
    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_live.fetch_max(now, Ordering::SeqCst);
        ctx.cancelled().await;
        self.live.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Two managers with a singleton worker: one runs it; when it stops, the other takes over.
pub async fn a_singleton_worker_runs_on_one_manager_at_a_time(h: &dyn Harness) {
    let s = setup(h).await;
    if !s.backend.capabilities().locks {
        unsupported(
            "singleton workers (distributed locks)",
            backline_core::DistributedLock::acquire(s.backend.clone(), "x", Duration::from_secs(1))
                .await,
        );
        return;
    }
    let started = Arc::new(AtomicUsize::new(0));
    let live = Arc::new(AtomicUsize::new(0));
    let max_live = Arc::new(AtomicUsize::new(0));
    let config = WorkerManagerConfig {
        lock_ttl: Duration::from_millis(600),
        grace: Duration::from_secs(2),
        ..WorkerManagerConfig::default()
    };
    let twin = h.twin(&s.backend).await;
    let mut handles = Vec::new();
    for backend in [s.backend.clone(), twin] {
        let mut m = WorkerManager::new()
            .with_config(config)
            .with_lock_backend(backend);
        m.add_with(
            Singleton {
                started: started.clone(),
                live: live.clone(),
                max_live: max_live.clone(),
            },
            WorkerOptions::singleton(),
        );
        handles.push(m.start());
    }
    eventually("one instance to start", || async {
        (started.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    // Give the other manager several lock periods to (wrongly) start a second instance.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(started.load(Ordering::SeqCst), 1, "only one instance runs");
    // Stop both managers one after the other: whichever held the lock, the other must take over.
    let first = handles.remove(0);
    first.shutdown().await;
    let second = handles.remove(0);
    if started.load(Ordering::SeqCst) == 1 && live.load(Ordering::SeqCst) == 0 {
        eventually("the other manager to take over", || async {
            (started.load(Ordering::SeqCst) >= 2).then_some(())
        })
        .await;
    }
    second.shutdown().await;
    assert_eq!(max_live.load(Ordering::SeqCst), 1, "never two at once");
}

/// Two servers (two handles on the same storage, as two processes would have) drain one
/// queue without running any job twice.
pub async fn two_servers_never_run_a_job_twice(h: &dyn Harness) {
    let s = setup(h).await;
    let twin = h.twin(&s.backend).await;
    let ids = s
        .manager
        .enqueue_batch((0..300).map(|i| Task::ok(format!("t{i}"))))
        .await
        .expect("enqueue");
    let a = s
        .server()
        .configure(|c| c.claim_batch = 7)
        .build()
        .expect("server a");
    let b = JobServer::builder(twin)
        .register(TaskHandler::<Task>::new(s.rec.clone()))
        .config(fast_config())
        .configure(|c| c.claim_batch = 5)
        .queue("default", 4)
        .build()
        .expect("server b");
    let (ra, rb) = tokio::join!(a.run_until_idle(), b.run_until_idle());
    ra.expect("a");
    rb.expect("b");
    let mut ran: Vec<JobId> = s.rec.events().into_iter().map(|e| e.id).collect();
    assert_eq!(ran.len(), 300, "no job ran twice");
    ran.sort();
    let mut want = ids;
    want.sort();
    assert_eq!(ran, want);
    if !s.backend.capabilities().list_jobs {
        assert_eq!(s.counts().await.total(), 0);
        return;
    }
    let all = all_jobs(&s.manager).await;
    assert!(all
        .iter()
        .all(|j| j.state == JobState::Succeeded && j.attempt == 1));
}

struct Greeting(&'static str);

struct Greeter {
    seen: Arc<std::sync::Mutex<Option<String>>>,
}

impl backline_core::BackgroundJob for Greeter {
    type Args = Task;
    async fn execute(
        &self,
        _args: Task,
        ctx: backline_core::JobContext,
    ) -> Result<(), backline_core::JobError> {
        let g = ctx
            .data::<Greeting>()
            .ok_or_else(|| backline_core::JobError::fatal("no greeting"))?;
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(g.0.to_owned());
        }
        Ok(())
    }
}

/// State given to the server with `data` reaches the handlers through their context.
pub async fn shared_state_reaches_handlers(h: &dyn Harness) {
    let s = setup(h).await;
    let seen = Arc::new(std::sync::Mutex::new(None));
    let id = s.enqueue(Task::ok("state")).await;
    JobServer::builder(s.backend.clone())
        .register(Greeter { seen: seen.clone() })
        .data(Greeting("merhaba"))
        .config(fast_config())
        .build()
        .expect("server")
        .run_until_idle()
        .await
        .expect("drain");
    if s.tracks() {
        assert_eq!(s.state(id).await, Some(JobState::Succeeded));
    } else {
        s.assert_gone(id).await;
    }
    assert_eq!(
        seen.lock().ok().and_then(|g| g.clone()).as_deref(),
        Some("merhaba")
    );
}

#[cfg(test)]
mod tests {
    /// Every `pub async fn` here is listed in [`super::ALL`] (and so expanded by `conformance!`).
    #[test]
    fn every_scenario_is_listed() {
        let src = include_str!("scenarios.rs");
        let defined: Vec<&str> = src
            .lines()
            .filter_map(|l| l.strip_prefix("pub async fn "))
            .filter_map(|l| l.split('(').next())
            .collect();
        assert_eq!(defined.len(), super::ALL.len(), "{defined:?}");
        for name in defined {
            assert!(super::ALL.contains(&name), "{name} is not in ALL");
        }
    }
}
