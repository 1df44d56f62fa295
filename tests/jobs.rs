//! End-to-end tests of background jobs through the `backline` facade: a job server under a
//! worker manager, enqueue-only processes, registration and name checks, and retry policies.
#![cfg(feature = "memory")]

use std::time::Duration;

use backline::{
    BackgroundJob, EnqueueOptions, Error, JobArgs, JobContext, JobError, JobManager, JobServer,
    JobState, MemoryBackend, RetryPolicy, WorkerManager,
};
use backline_testkit::fast_config;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The longest a test waits for something that should happen; never an expectation of speed.
const PATIENCE: Duration = Duration::from_secs(30);

async fn next<T>(what: &str, rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for {what}"))
        .unwrap_or_else(|| panic!("channel closed while waiting for {what}"))
}

#[derive(Serialize, Deserialize)]
struct Greet {
    n: u32,
}

impl JobArgs for Greet {
    const NAME: &'static str = "tests.greet";
}

struct GreetHandler(mpsc::UnboundedSender<u32>);

impl BackgroundJob for GreetHandler {
    type Args = Greet;
    async fn execute(&self, args: Greet, _ctx: JobContext) -> Result<(), JobError> {
        let _ = self.0.send(args.n);
        Ok(())
    }
}

/// A second handler for the same job name.
struct OtherGreetHandler;

impl BackgroundJob for OtherGreetHandler {
    type Args = Greet;
    async fn execute(&self, _args: Greet, _ctx: JobContext) -> Result<(), JobError> {
        Ok(())
    }
}

/// A job that runs until its server begins to shut down.
#[derive(Serialize, Deserialize)]
struct Hold;

impl JobArgs for Hold {
    const NAME: &'static str = "tests.hold";
}

struct HoldHandler(mpsc::UnboundedSender<&'static str>);

impl BackgroundJob for HoldHandler {
    type Args = Hold;
    async fn execute(&self, _args: Hold, ctx: JobContext) -> Result<(), JobError> {
        let _ = self.0.send("started");
        ctx.shutdown().await;
        let _ = self.0.send("saw shutdown");
        Ok(())
    }
}

#[tokio::test]
async fn a_job_server_in_a_worker_manager_runs_jobs_and_stops_with_it() {
    let backend = MemoryBackend::new();
    let jobs = JobManager::new(backend.clone());
    let (greet_tx, mut greeted) = mpsc::unbounded_channel();
    let (hold_tx, mut hold) = mpsc::unbounded_channel();
    let server = JobServer::builder(backend)
        .register(GreetHandler(greet_tx))
        .register(HoldHandler(hold_tx))
        .config(fast_config())
        .build()
        .expect("a valid server");

    let mut workers = WorkerManager::new();
    workers.add(server);
    let running = workers.start();

    jobs.enqueue(Greet { n: 1 }).await.expect("enqueue");
    assert_eq!(next("the first job", &mut greeted).await, 1);
    jobs.enqueue(Hold).await.expect("enqueue");
    assert_eq!(next("the holding job to start", &mut hold).await, "started");

    running.shutdown().await;

    // The manager's shutdown reached the server, which told the running job and let it finish.
    assert_eq!(hold.try_recv().ok(), Some("saw shutdown"));
    let counts = jobs.counts(None).await.expect("counts");
    assert_eq!(counts.succeeded, 2, "{counts:?}");
    assert_eq!(counts.running, 0, "{counts:?}");

    // Nothing runs jobs any more.
    let late = jobs.enqueue(Greet { n: 2 }).await.expect("enqueue");
    // A negative check: give a server that failed to stop a moment to pick the job up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let job = jobs.get(late).await.expect("get").expect("the job exists");
    assert_eq!(job.state, JobState::Ready);
    assert_eq!(job.attempt, 0);
    assert!(greeted.try_recv().is_err(), "a job ran after shutdown");
}

#[tokio::test]
async fn jobs_enqueued_by_a_process_without_a_server_are_run_by_a_server_started_later() {
    let backend = MemoryBackend::new();

    // The enqueue-only process (a web node): a JobManager and no JobServer.
    let web = JobManager::new(backend.clone());
    let ids = web
        .enqueue_batch((1..=3).map(|n| Greet { n }))
        .await
        .expect("enqueue a batch");
    assert_eq!(ids.len(), 3);
    let counts = web.counts(None).await.expect("counts");
    assert_eq!(counts.ready, 3, "{counts:?}");
    for id in &ids {
        let job = web.get(*id).await.expect("get").expect("stored");
        assert_eq!((job.state, job.attempt), (JobState::Ready, 0));
    }

    // Later, a worker process over the same storage.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let server = JobServer::builder(backend.clone())
        .register(GreetHandler(tx))
        .build()
        .expect("a valid server");
    server.run_until_idle().await.expect("run");

    let mut seen = Vec::new();
    while let Ok(n) = rx.try_recv() {
        seen.push(n);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2, 3]);
    for id in &ids {
        let job = web
            .get(*id)
            .await
            .expect("get")
            .expect("kept after success");
        assert_eq!((job.state, job.attempt), (JobState::Succeeded, 1));
    }
}

#[test]
fn two_handlers_for_one_job_name_are_refused_at_build() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let result = JobServer::builder(MemoryBackend::new())
        .register(GreetHandler(tx.clone()))
        .register(OtherGreetHandler)
        .build();
    match result {
        Err(Error::DuplicateHandler(name)) => assert_eq!(name, Greet::NAME),
        other => panic!("expected Error::DuplicateHandler, got {other:?}"),
    }

    // The same handlers for different names build.
    let (hold_tx, _hold_rx) = mpsc::unbounded_channel();
    let server = JobServer::builder(MemoryBackend::new())
        .register(GreetHandler(tx))
        .register(HoldHandler(hold_tx))
        .build()
        .expect("distinct names build");
    let mut names = server.job_names().to_vec();
    names.sort();
    assert_eq!(names, [Greet::NAME, Hold::NAME]);
}

/// A job type whose name breaks the rules.
#[derive(Serialize, Deserialize)]
struct BadName;

impl JobArgs for BadName {
    const NAME: &'static str = "emails welcome!";
}

struct BadNameHandler;

impl BackgroundJob for BadNameHandler {
    type Args = BadName;
    async fn execute(&self, _args: BadName, _ctx: JobContext) -> Result<(), JobError> {
        Ok(())
    }
}

/// A job type whose default queue breaks the rules.
#[derive(Serialize, Deserialize)]
struct BadQueue;

impl JobArgs for BadQueue {
    const NAME: &'static str = "tests.bad-queue";
    fn queue() -> &'static str {
        "reports?eu"
    }
}

fn assert_invalid_job<T: std::fmt::Debug>(what: &str, result: backline::Result<T>) {
    match result {
        Err(Error::InvalidJob(_)) => {}
        other => panic!("{what}: expected Error::InvalidJob, got {other:?}"),
    }
}

#[tokio::test]
async fn an_invalid_job_or_queue_name_is_refused_at_enqueue() {
    let jobs = JobManager::new(MemoryBackend::new());

    assert_invalid_job("job name with a space", jobs.enqueue(BadName).await);
    assert_invalid_job(
        "batch of a badly named job",
        jobs.enqueue_batch([BadName, BadName]).await,
    );
    assert_invalid_job("default queue with a `?`", jobs.enqueue(BadQueue).await);
    for queue in [
        String::new(),
        "has space".into(),
        "é".into(),
        "q".repeat(129),
    ] {
        assert_invalid_job(
            &format!("queue {queue:?}"),
            jobs.enqueue_with(Greet { n: 0 }, EnqueueOptions::new().queue(queue.clone()))
                .await,
        );
    }
    assert_invalid_job(
        "zero attempts",
        jobs.enqueue_with(Greet { n: 0 }, EnqueueOptions::new().max_attempts(0))
            .await,
    );
    assert_eq!(
        jobs.counts(None).await.expect("counts").total(),
        0,
        "a refused job was stored"
    );

    // The edges of the rule are accepted.
    for queue in ["reports:eu-west/1_a.b".to_owned(), "q".repeat(128)] {
        jobs.enqueue_with(Greet { n: 0 }, EnqueueOptions::new().queue(queue.clone()))
            .await
            .unwrap_or_else(|e| panic!("queue {queue:?} refused: {e}"));
    }
    assert_eq!(jobs.counts(None).await.expect("counts").total(), 2);

    // A server refuses to register a badly named handler too.
    assert_invalid_job(
        "server with a badly named handler",
        JobServer::builder(MemoryBackend::new())
            .register(BadNameHandler)
            .build(),
    );
}

#[test]
fn the_abp_retry_policy_has_abps_numbers() {
    let abp = RetryPolicy::abp();
    assert_eq!(abp.initial, Duration::from_secs(60));
    assert_eq!(abp.factor, 2.0);
    assert_eq!(abp.jitter, 0.0);
    assert_eq!(abp.max_age, Some(Duration::from_secs(172_800)));

    // 60 s × 2^(n−1): 1, 2, 4, … minutes, uncapped and without jitter.
    for n in 1..=12u32 {
        let want = Duration::from_secs(60 * 2u64.pow(n - 1));
        assert_eq!(abp.delay_for(n), want, "delay after attempt {n}");
        assert_eq!(abp.jittered_delay_for(n), want, "jitter after attempt {n}");
    }

    // Abandoned after 2 days: the 12th attempt starts about 34 h after the first, and a 13th
    // would start past 48 h.
    let start_of = |attempt: u32| -> Duration { (1..attempt).map(|n| abp.delay_for(n)).sum() };
    assert_eq!(start_of(12), Duration::from_secs(122_820));
    assert!(start_of(12) <= Duration::from_secs(172_800));
    assert!(start_of(13) > Duration::from_secs(172_800));

    // The default, for contrast: 1 s × 2 capped at 5 min, 25 attempts.
    let default = RetryPolicy::default();
    assert_eq!(default.delay_for(1), Duration::from_secs(1));
    assert_eq!(default.delay_for(30), Duration::from_secs(300));
    assert_eq!(default.max_attempts, 25);
}

/// Always fails, retryably, with ABP's policy.
#[derive(Serialize, Deserialize)]
struct AbpFails;

impl JobArgs for AbpFails {
    const NAME: &'static str = "tests.abp-fails";
    fn retry_policy() -> RetryPolicy {
        RetryPolicy::abp()
    }
}

/// Always fails, retryably, with ABP's policy but a max age shorter than its first back-off.
#[derive(Serialize, Deserialize)]
struct AbpFailsYoung;

impl JobArgs for AbpFailsYoung {
    const NAME: &'static str = "tests.abp-fails-young";
    fn retry_policy() -> RetryPolicy {
        RetryPolicy::abp().with_max_age(Duration::from_secs(30))
    }
}

struct AlwaysFails;

impl BackgroundJob for AlwaysFails {
    type Args = AbpFails;
    async fn execute(&self, _args: AbpFails, _ctx: JobContext) -> Result<(), JobError> {
        Err(JobError::msg("downstream unavailable"))
    }
}

struct AlwaysFailsYoung;

impl BackgroundJob for AlwaysFailsYoung {
    type Args = AbpFailsYoung;
    async fn execute(&self, _args: AbpFailsYoung, _ctx: JobContext) -> Result<(), JobError> {
        Err(JobError::msg("downstream unavailable"))
    }
}

#[tokio::test]
async fn the_abp_policy_retries_after_a_minute_and_abandons_past_the_max_age() {
    let backend = MemoryBackend::new();
    let jobs = JobManager::new(backend.clone());
    let retried = jobs.enqueue(AbpFails).await.expect("enqueue");
    let abandoned = jobs.enqueue(AbpFailsYoung).await.expect("enqueue");
    let server = JobServer::builder(backend)
        .register(AlwaysFails)
        .register(AlwaysFailsYoung)
        .build()
        .expect("a valid server");
    server.run_until_idle().await.expect("run");

    let job = jobs.get(retried).await.expect("get").expect("stored");
    assert_eq!((job.state, job.attempt), (JobState::Retrying, 1));
    assert_eq!(job.max_attempts, 1000, "ABP limits by age, not by count");
    let wait = job.run_at - job.enqueued_at;
    assert!(
        wait >= backline::chrono::Duration::seconds(60)
            && wait < backline::chrono::Duration::seconds(60 + 30),
        "the first retry is due one minute after the failure, not {wait}"
    );
    assert_eq!(job.last_error.as_deref(), Some("downstream unavailable"));

    // Its next try (in 60 s) would fall past its 30 s max age: dead at once.
    let job = jobs.get(abandoned).await.expect("get").expect("kept");
    assert_eq!((job.state, job.attempt), (JobState::Dead, 1));
    let error = job.last_error.unwrap_or_default();
    assert!(error.contains("abandoned"), "{error}");
    assert!(error.contains("downstream unavailable"), "{error}");
}
