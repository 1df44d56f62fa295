//! The conformance suite and the RabbitMQ-specific tests, against a real broker
//! (`BACKLINE_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Each backend gets its own random queue prefix, so the tests run in parallel and never touch
//! other queues; dropping the harness deletes every queue its backends declared. Without a
//! broker the tests print a loud notice and pass, unless `BACKLINE_REQUIRE_SERVICES=1`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline_core::{
    Backend, ClaimRequest, ClaimedJob, EnqueueOptions, Error, Finish, JobArgs, JobFilter, JobId,
    JobManager, JobServer, JobState, Outcome,
};
use backline_rabbitmq::{QueueKind, QueueNaming, RabbitMqBackend, RabbitMqConfig};
use backline_testkit::service::RABBITMQ;
use backline_testkit::{eventually, fast_config, Action, Recorder, Task, TaskHandler};

fn url() -> String {
    RABBITMQ.url()
}

async fn reachable() -> bool {
    RABBITMQ
        .reachable(|url| async move {
            let config = RabbitMqConfig::new(url)
                .with_prefix(fresh_prefix())
                .with_connect_timeout(Duration::from_secs(5))
                .with_reconnect_attempts(0);
            let b = RabbitMqBackend::connect(config).await?;
            b.close().await;
            Ok::<_, backline_core::Error>(())
        })
        .await
}

fn fresh_prefix() -> String {
    format!("backline-test-{:016x}", fastrand::u64(..))
}

async fn connect(prefix: &str) -> RabbitMqBackend {
    RabbitMqBackend::connect(
        RabbitMqConfig::new(url())
            .with_prefix(prefix)
            .with_connection_name(format!("{prefix}-conformance")),
    )
    .await
    .expect("connect to RabbitMQ")
}

/// A fresh prefix per backend; `twin` opens another connection on the same prefix. Dropping
/// the harness deletes every queue its backends declared.
struct RabbitHarness {
    /// Quorum work queues instead of classic ones.
    quorum: bool,
    prefixes: Mutex<Vec<String>>,
    backends: Mutex<Vec<RabbitMqBackend>>,
    twins: std::sync::atomic::AtomicBool,
}

impl Drop for RabbitHarness {
    fn drop(&mut self) {
        let backends = std::mem::take(&mut *self.backends.lock().expect("harness lock"));
        let mut queues: Vec<String> = backends.iter().flat_map(|b| b.declared_queues()).collect();
        drop(backends);
        if self.twins.load(std::sync::atomic::Ordering::SeqCst) {
            // A twin (dropped by the scenario) may have declared queues of its own.
            let prefixes = self.prefixes.lock().expect("harness lock").clone();
            queues.extend(
                broker_queues()
                    .into_iter()
                    .filter(|q| prefixes.iter().any(|p| q.starts_with(&format!("{p}.")))),
            );
        }
        queues.sort();
        queues.dedup();
        if queues.is_empty() {
            return;
        }
        // The test's runtime is ending: clean up on a small runtime of our own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(delete_queues(queues));
            }
        })
        .join();
    }
}

/// Every queue name on the broker (`rabbitmqctl list_queues`), for a clean-up after twins.
fn broker_queues() -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect(),
        _ => Vec::new(),
    }
}

async fn delete_queues(queues: Vec<String>) {
    use backline_rabbitmq::lapin::{options::QueueDeleteOptions, Connection, ConnectionProperties};
    let Ok(conn) = Connection::connect(&url(), ConnectionProperties::default()).await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "test clean-up".into()).await;
}

async fn harness() -> Option<RabbitHarness> {
    reachable().await.then(|| RabbitHarness {
        quorum: false,
        prefixes: Mutex::new(Vec::new()),
        backends: Mutex::new(Vec::new()),
        twins: std::sync::atomic::AtomicBool::new(false),
    })
}

impl RabbitHarness {
    fn current(&self) -> String {
        self.prefixes
            .lock()
            .expect("harness lock")
            .last()
            .cloned()
            .expect("backend() before twin()")
    }

    async fn make(&self, prefix: &str) -> RabbitMqBackend {
        let b = if self.quorum {
            RabbitMqBackend::connect(
                RabbitMqConfig::new(url())
                    .with_prefix(prefix)
                    .with_connection_name(format!("{prefix}-quorum"))
                    .with_queue_kind(QueueKind::Quorum { delivery_limit: 5 }),
            )
            .await
            .expect("connect to RabbitMQ")
        } else {
            connect(prefix).await
        };
        self.backends.lock().expect("harness lock").push(b.clone());
        b
    }
}

#[async_trait::async_trait]
impl backline_testkit::Harness for RabbitHarness {
    async fn backend(&self) -> Arc<dyn Backend> {
        let prefix = fresh_prefix();
        self.prefixes
            .lock()
            .expect("harness lock")
            .push(prefix.clone());
        Arc::new(self.make(&prefix).await)
    }

    /// Another connection on the same prefix. Dropping it closes its connection, which hands
    /// its claimed jobs back to the broker: the suite ends leases that way, since a broker
    /// lease does not expire by time.
    async fn twin(&self, _backend: &Arc<dyn Backend>) -> Arc<dyn Backend> {
        let prefix = self.current();
        self.twins.store(true, std::sync::atomic::Ordering::SeqCst);
        Arc::new(connect(&prefix).await)
    }
}

backline_testkit::conformance!(match harness().await {
    Some(h) => h,
    None => return,
});

/// A backend on a fresh prefix whose queues are deleted when the guard drops.
async fn fresh() -> Option<(RabbitHarness, RabbitMqBackend)> {
    let h = harness().await?;
    let prefix = fresh_prefix();
    h.prefixes
        .lock()
        .expect("harness lock")
        .push(prefix.clone());
    let b = h.make(&prefix).await;
    Some((h, b))
}

fn task_names() -> Vec<String> {
    vec![Task::NAME.to_owned()]
}

async fn claim(b: &RabbitMqBackend, limit: usize) -> Vec<ClaimedJob> {
    claim_from(b, "default", &task_names(), limit).await
}

/// Claims up to `limit` jobs of `names` from `queue` with a 30 s lease; panics on an error.
async fn claim_from(
    b: &RabbitMqBackend,
    queue: &str,
    names: &[String],
    limit: usize,
) -> Vec<ClaimedJob> {
    b.claim(ClaimRequest {
        queue,
        names,
        limit,
        lease: Duration::from_secs(30),
    })
    .await
    .expect("claim")
}

/// Finishes acknowledge with `multiple` where they can (tags below every other open delivery)
/// and one by one elsewhere. Out of order, mixed with a retry and a job held open across
/// batches, every finish applies and the claim channel stays open: a wrong multiple ack makes
/// the broker close it ("unknown delivery tag"), which the claim round trip and the canary's
/// heartbeat at the end would see. No acked job comes back after the handle closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_finishes_ack_each_job_exactly_once() {
    let Some((h, b)) = fresh().await else { return };
    let manager = JobManager::new(Arc::new(b.clone()));
    manager
        .enqueue_batch((0..13).map(|i| Task::ok(format!("j{i}"))))
        .await
        .expect("enqueue");
    let mut claimed = claim(&b, 13).await;
    assert_eq!(claimed.len(), 13);
    claimed.sort_by_key(|c| c.job.id);
    let canary = claimed.pop().expect("13 claimed");
    let finish = |c: &ClaimedJob, outcome: Outcome| Finish {
        id: c.job.id,
        token: c.token,
        outcome,
    };
    let ok = || Outcome::Succeeded { keep: false };
    // Above open deliveries (j0..j4 run on): acked one by one.
    let batch: Vec<Finish> = claimed[5..7].iter().map(|c| finish(c, ok())).collect();
    assert_eq!(b.finish(&batch).await.expect("finish"), [true, true]);
    // The lowest ones, with a retry among them: one multiple ack.
    let mut batch: Vec<Finish> = claimed[0..4].iter().map(|c| finish(c, ok())).collect();
    batch.push(finish(
        &claimed[4],
        Outcome::Retry {
            delay: Duration::from_secs(3600),
            error: "later".into(),
        },
    ));
    assert_eq!(b.finish(&batch).await.expect("finish"), [true; 5]);
    // j7 stays open; j8..j11 are above it.
    let batch: Vec<Finish> = claimed[8..12].iter().map(|c| finish(c, ok())).collect();
    assert_eq!(b.finish(&batch).await.expect("finish"), [true; 4]);
    assert_eq!(
        b.finish(&[finish(&claimed[7], ok())])
            .await
            .expect("finish"),
        [true]
    );
    // A round trip on the claim channel after every ack frame: an empty claim. Then the
    // canary, claimed first and still running, still holds its lease on that channel.
    assert!(claim(&b, 1).await.is_empty());
    assert_eq!(
        b.heartbeat(&[(canary.job.id, canary.token)], Duration::from_secs(30))
            .await
            .expect("heartbeat"),
        [true],
        "the claim channel closed: an ack covered a tag twice"
    );
    assert_eq!(
        b.finish(&[finish(&canary, ok())]).await.expect("finish"),
        [true]
    );
    // Nothing unacked: closing the handle returns nothing to the work queue.
    b.close().await;
    let other = h.make(&h.current()).await;
    assert!(claim(&other, 13).await.is_empty(), "an acked job came back");
    let counts = other.counts(Some("default")).await.expect("counts");
    assert_eq!((counts.ready, counts.scheduled), (0, 1), "{counts:?}");
}

/// A job delayed by 10 s enqueued before one delayed by 1 s (the issue's case): the short
/// delay runs first (different delays sit in different wait queues, so the long one blocks
/// nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_delays_run_in_delay_order() {
    let Some((_h, b)) = fresh().await else { return };
    let b = Arc::new(b);
    let manager = JobManager::new(b.clone());
    let long = manager
        .enqueue_with(
            Task::ok("long"),
            EnqueueOptions::new().delay(Duration::from_secs(10)),
        )
        .await
        .expect("enqueue");
    let short = manager
        .enqueue_with(
            Task::ok("short"),
            EnqueueOptions::new().delay(Duration::from_secs(1)),
        )
        .await
        .expect("enqueue");
    let c = manager.counts(None).await.expect("counts");
    assert_eq!((c.scheduled, c.ready), (2, 0), "{c:?}");
    let rec = Recorder::new();
    let running = JobServer::builder(b.clone())
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(fast_config())
        .queue("default", 2)
        .build()
        .expect("server")
        .start();
    rec.wait_until("both ran", |e| e.len() >= 2).await;
    running.shutdown().await.expect("shutdown");
    let ids: Vec<JobId> = rec.events().iter().map(|e| e.id).collect();
    assert_eq!(ids, [short, long], "delay order, not enqueue order");
    assert_eq!(manager.counts(None).await.expect("counts").total(), 0);
}

/// A delivery whose connection closed before it finished comes back `redelivered`: the next
/// claim counts the lost attempt, and a job out of attempts goes to the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_job_counts_the_lost_attempt() {
    let Some((h, b)) = fresh().await else { return };
    let manager = JobManager::new(Arc::new(b.clone()));
    let twice = manager
        .enqueue_with(Task::ok("twice"), EnqueueOptions::new().max_attempts(3))
        .await
        .expect("enqueue");
    let once = manager
        .enqueue_with(Task::ok("once"), EnqueueOptions::new().max_attempts(1))
        .await
        .expect("enqueue");
    let worker = h.make(&h.current()).await;
    let first = claim(&worker, 2).await;
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|c| c.job.attempt == 1));
    // The worker "dies": its connection closes with both jobs unacknowledged.
    worker.close().await;
    let again = eventually("the lost job to come back", || async {
        let mut c = claim(&b, 2).await;
        c.pop()
    })
    .await;
    assert_eq!(again.job.id, twice);
    assert_eq!(again.job.attempt, 2, "the lost attempt counts");
    assert_eq!(
        b.finish(&[Finish {
            id: twice,
            token: again.token,
            outcome: Outcome::Succeeded { keep: false },
        }])
        .await
        .expect("finish"),
        [true]
    );
    let dead = manager
        .backend()
        .list(&JobFilter {
            state: Some(JobState::Dead),
            ..JobFilter::default()
        })
        .await
        .expect("list dead");
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].id, dead[0].attempt), (once, 1));
    let err = dead[0].last_error.clone().unwrap_or_default();
    assert!(err.contains("lease expired"), "{err}");
}

/// A dead letter lists with its error, is republished with fresh attempts, runs again, and
/// can be purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_republished_and_purged() {
    let Some((_h, b)) = fresh().await else { return };
    let b = Arc::new(b);
    let manager = JobManager::new(b.clone());
    let id = manager
        .enqueue(Task::new("doomed", Action::Fatal))
        .await
        .expect("enqueue");
    let rec = Recorder::new();
    let server = JobServer::builder(b.clone())
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(fast_config())
        .queue("default", 2)
        .build()
        .expect("server");
    server.run_until_idle().await.expect("drain");
    let dead_filter = JobFilter {
        state: Some(JobState::Dead),
        ..JobFilter::default()
    };
    let dead = manager.list(&dead_filter).await.expect("list dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(dead[0].last_error.as_deref(), Some("fatal boom"));
    let task: Task = serde_json::from_slice(&dead[0].payload).expect("payload");
    assert_eq!(task.tag, "doomed");
    // Listing is a browse: the dead letter is still there.
    assert_eq!(manager.counts(None).await.expect("counts").dead, 1);
    assert!(manager.retry_dead(id).await.expect("retry"));
    assert!(
        !manager.retry_dead(id).await.expect("retry"),
        "not dead any more"
    );
    server.run_until_idle().await.expect("drain");
    let attempts: Vec<(JobId, u32)> = rec.events().iter().map(|e| (e.id, e.attempt)).collect();
    assert_eq!(attempts, [(id, 1), (id, 1)], "a fresh set of attempts");
    assert_eq!(manager.purge(JobState::Dead, None).await.expect("purge"), 1);
    assert!(manager.list(&dead_filter).await.expect("list").is_empty());
    assert_eq!(manager.counts(None).await.expect("counts").total(), 0);
}

/// `QueueNaming::Abp` puts default-queue jobs in `AbpBackgroundJobs.{JobName}`, and a message
/// published there without a `type` or Backline headers (as ABP publishes it) runs as a fresh job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abp_naming_and_a_message_without_headers() {
    use backline_rabbitmq::lapin::{
        options::BasicPublishOptions, BasicProperties, Connection, ConnectionProperties,
    };
    let Some(h) = harness().await else { return };
    let prefix = fresh_prefix();
    h.prefixes
        .lock()
        .expect("harness lock")
        .push(prefix.clone());
    let b = RabbitMqBackend::connect(
        RabbitMqConfig::new(url())
            .with_prefix(&prefix)
            .with_naming(QueueNaming::Abp),
    )
    .await
    .expect("connect");
    h.backends.lock().expect("harness lock").push(b.clone());
    // A job name of this test alone: ABP's queue names carry no prefix.
    let name = format!("BacklineTest{:016x}", fastrand::u64(..));
    let work = b.work_queue_name("default", &name);
    assert_eq!(work, format!("AbpBackgroundJobs.{name}"));
    assert_eq!(
        b.work_queue_name("other", &name),
        format!("{prefix}.other.{name}")
    );
    let names = vec![name.clone()];
    // Declares the queue.
    assert!(claim_from(&b, "default", &names, 1).await.is_empty());
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_publish(
        "".into(),
        work.as_str().into(),
        BasicPublishOptions::default(),
        br#"{"email":"a@example.com"}"#,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
    let _ = conn.close(200, "done".into()).await;
    let claimed = eventually("the foreign message", || async {
        claim_from(&b, "default", &names, 1).await.pop()
    })
    .await;
    assert_eq!(claimed.job.name, name);
    assert_eq!(claimed.job.attempt, 1);
    assert_eq!(claimed.job.payload, br#"{"email":"a@example.com"}"#);
    assert_eq!(
        b.finish(&[Finish {
            id: claimed.job.id,
            token: claimed.token,
            outcome: Outcome::Succeeded { keep: false },
        }])
        .await
        .expect("finish"),
        [true]
    );
}

/// Quorum work queues (no priorities on 3.10, a delivery limit) run jobs too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_run_jobs() {
    let Some(h) = harness().await else { return };
    let prefix = fresh_prefix();
    h.prefixes
        .lock()
        .expect("harness lock")
        .push(prefix.clone());
    let b = RabbitMqBackend::connect(
        RabbitMqConfig::new(url())
            .with_prefix(&prefix)
            .with_queue_kind(QueueKind::Quorum { delivery_limit: 5 }),
    )
    .await
    .expect("connect");
    h.backends.lock().expect("harness lock").push(b.clone());
    let b = Arc::new(b);
    let manager = JobManager::new(b.clone());
    let ids = manager
        .enqueue_batch((0..3).map(|i| Task::ok(format!("q{i}"))))
        .await
        .expect("enqueue");
    let rec = Recorder::new();
    JobServer::builder(b.clone())
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(fast_config())
        .queue("default", 1)
        .configure(|c| c.claim_batch = 1)
        .build()
        .expect("server")
        .run_until_idle()
        .await
        .expect("drain");
    let ran: Vec<JobId> = rec.events().iter().map(|e| e.id).collect();
    assert_eq!(ran, ids, "FIFO on a quorum queue");
}

/// With no broker behind the URL, connecting fails with a typed connection error whose text
/// does not show the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_a_connection_error() {
    let config = RabbitMqConfig::new("amqp://guest:s3cret@127.0.0.1:1/%2f")
        .with_reconnect_attempts(1)
        .with_connect_timeout(Duration::from_secs(2));
    match RabbitMqBackend::connect(config).await {
        Err(e @ Error::Connection { .. }) => {
            let text = format!("{e} {e:?}");
            assert!(!text.contains("s3cret"), "{text}");
            assert!(e.is_retryable());
        }
        other => panic!("expected a connection error, got {other:?}"),
    }
}

/// A job pushed by another handle (another connection, as another process would have) and a
/// delayed job that comes due both wake a server whose poll interval is an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_from_another_handle_and_a_due_delay_wake_an_idle_server() {
    let Some((h, server_side)) = fresh().await else {
        return;
    };
    let producer = h.make(&h.current()).await;
    let manager = JobManager::new(Arc::new(producer));
    let rec = Recorder::new();
    let running = JobServer::builder(Arc::new(server_side))
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(fast_config())
        .configure(|c| {
            c.poll_interval = Duration::from_secs(3600);
            c.maintenance_interval = Duration::from_secs(3600);
        })
        .queue("default", 2)
        .build()
        .expect("server")
        .start();
    // The first job proves the server is up and idle after it.
    manager.enqueue(Task::ok("first")).await.expect("enqueue");
    rec.wait_until("the first job", |e| !e.is_empty()).await;
    manager.enqueue(Task::ok("second")).await.expect("enqueue");
    rec.wait_until("the second job", |e| e.len() >= 2).await;
    manager
        .enqueue_with(
            Task::ok("delayed"),
            EnqueueOptions::new().delay(Duration::from_millis(300)),
        )
        .await
        .expect("enqueue");
    rec.wait_until("the delayed job", |e| e.len() >= 3).await;
    running.shutdown().await.expect("shutdown");
    assert_eq!(rec.tags(), ["first", "second", "delayed"]);
}

/// Wake-ups are coalesced: a job that comes due while the producer lingers after a wake-up
/// (here 300 ms) is announced by one more wake-up when the linger ends, never dropped. The
/// listening handle's `wait` (the server's idle wait) returns for both jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_coalesced_during_the_linger_is_sent_when_it_ends() {
    let Some((h, listener)) = fresh().await else {
        return;
    };
    let producer = RabbitMqBackend::connect(
        RabbitMqConfig::new(url())
            .with_prefix(h.current())
            .with_wake_linger(Duration::from_millis(300)),
    )
    .await
    .expect("connect");
    h.backends
        .lock()
        .expect("harness lock")
        .push(producer.clone());
    let manager = JobManager::new(Arc::new(producer.clone()));
    // The first wait binds the listener's wake-up queue.
    let s0 = listener
        .wait("default", u64::MAX, Duration::from_millis(1))
        .await
        .expect("wait");
    manager.enqueue(Task::ok("first")).await.expect("enqueue");
    let s1 = listener
        .wait("default", s0, Duration::from_secs(20))
        .await
        .expect("wait");
    assert!(s1 > s0, "the first job's wake-up did not arrive");
    // Within the producer's linger: no wake-up now, one when the linger ends.
    manager.enqueue(Task::ok("second")).await.expect("enqueue");
    let s2 = listener
        .wait("default", s1, Duration::from_secs(20))
        .await
        .expect("wait");
    assert!(s2 > s1, "the second job's wake-up never came");
    assert_eq!(
        producer
            .counts(Some("default"))
            .await
            .expect("counts")
            .ready,
        2
    );
}

/// A queue that exists with other arguments (here: quorum, while this handle declares classic
/// queues) refuses the declaration with a configuration error, and the jobs this handle holds
/// keep their leases (only the declaring channel is closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_declaration_costs_no_lease() {
    let Some((h, classic)) = fresh().await else {
        return;
    };
    let prefix = h.current();
    let quorum = RabbitMqBackend::connect(
        RabbitMqConfig::new(url())
            .with_prefix(&prefix)
            .with_queue_kind(QueueKind::Quorum { delivery_limit: 3 }),
    )
    .await
    .expect("connect");
    h.backends
        .lock()
        .expect("harness lock")
        .push(quorum.clone());
    let held_id = JobManager::new(Arc::new(classic.clone()))
        .enqueue(Task::ok("held"))
        .await
        .expect("enqueue");
    let held = claim(&classic, 1).await.pop().expect("claimed");
    JobManager::new(Arc::new(quorum))
        .enqueue_with(Task::ok("quorum"), EnqueueOptions::new().queue("beta"))
        .await
        .expect("enqueue on quorum");
    match JobManager::new(Arc::new(classic.clone()))
        .enqueue_with(Task::ok("refused"), EnqueueOptions::new().queue("beta"))
        .await
    {
        Err(e @ Error::Config(_)) => assert!(e.to_string().contains("beta"), "{e}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
    assert_eq!(
        classic
            .heartbeat(&[(held_id, held.token)], Duration::from_secs(30))
            .await
            .expect("heartbeat"),
        [true]
    );
    assert_eq!(
        classic
            .finish(&[Finish {
                id: held_id,
                token: held.token,
                outcome: Outcome::Succeeded { keep: false },
            }])
            .await
            .expect("finish"),
        [true],
        "the lease held"
    );
}

/// Claiming from 200 queues opens a fixed handful of channels, not one per queue (a broker
/// allows 2,047 per connection by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_queues_share_a_few_channels() {
    let Some(h) = harness().await else { return };
    let prefix = fresh_prefix();
    h.prefixes
        .lock()
        .expect("harness lock")
        .push(prefix.clone());
    let name = format!("{prefix}-channels");
    let b = RabbitMqBackend::connect(
        RabbitMqConfig::new(url())
            .with_prefix(&prefix)
            .with_connection_name(&name),
    )
    .await
    .expect("connect");
    h.backends.lock().expect("harness lock").push(b.clone());
    for i in 0..200 {
        let queue = format!("q{i:03}");
        let got = claim_from(&b, &queue, &task_names(), 1).await;
        assert!(got.is_empty());
    }
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "channels",
            "client_properties",
        ])
        .output()
        .await
        .expect("run rabbitmqctl");
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&needle))
        .expect("our connection is listed");
    let channels: u32 = line
        .split_whitespace()
        .next()
        .and_then(|c| c.parse().ok())
        .expect("a channel count");
    assert!(channels <= 6, "{channels} channels for 200 queues");
}

/// Deletes the named queues when dropped (a failed test cleans up too), for queues a handle
/// may not have declared itself (ABP's names, declared here first).
struct QueueGuard(Vec<String>);

impl Drop for QueueGuard {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(delete_queues(queues));
            }
        })
        .join();
    }
}

/// A raw connection and channel, as another publisher (ABP, a script) would use.
async fn raw() -> (
    backline_rabbitmq::lapin::Connection,
    backline_rabbitmq::lapin::Channel,
) {
    use backline_rabbitmq::lapin::{Connection, ConnectionProperties};
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// How many ready messages the queue holds, by a passive declare on a raw channel.
async fn ready_in(queue: &str) -> u32 {
    use backline_rabbitmq::lapin::{options::QueueDeclareOptions, types::FieldTable};
    let (conn, ch) = raw().await;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    let _ = conn.close(200, "done".into()).await;
    q.message_count()
}

/// A job of `name` in `queue`, as the manager would prepare it.
fn new_job(id: JobId, queue: &str, name: &str) -> backline_core::NewJob {
    backline_core::NewJob {
        id,
        name: name.to_owned(),
        queue: queue.to_owned(),
        payload: serde_json::to_vec(&Task::ok("raw")).expect("encode"),
        priority: backline_core::Priority::Normal,
        run_at: backline_core::RunAt::Now,
        max_attempts: 3,
        timeout: None,
    }
}

fn finish_ok(c: &ClaimedJob) -> Finish {
    Finish {
        id: c.job.id,
        token: c.token,
        outcome: Outcome::Succeeded { keep: false },
    }
}

fn dead_filter() -> JobFilter {
    JobFilter {
        state: Some(JobState::Dead),
        ..JobFilter::default()
    }
}

/// A 200 KB error would not fit in one AMQP frame with the message's headers (the broker
/// would close the whole connection, and every lease on it): it is cut to a few KiB, the job
/// dies or retries with the cut error, and the other job held on the handle keeps its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_error_is_cut_and_costs_no_other_lease() {
    let Some((_h, b)) = fresh().await else { return };
    let manager = JobManager::new(Arc::new(b.clone()));
    manager
        .enqueue_batch((0..3).map(|i| Task::ok(format!("j{i}"))))
        .await
        .expect("enqueue");
    let held = claim(&b, 3).await;
    assert_eq!(held.len(), 3);
    let huge = "é".repeat(100_000);
    let applied = b
        .finish(&[
            Finish {
                id: held[0].job.id,
                token: held[0].token,
                outcome: Outcome::Dead {
                    error: huge.clone(),
                },
            },
            Finish {
                id: held[1].job.id,
                token: held[1].token,
                outcome: Outcome::Retry {
                    delay: Duration::ZERO,
                    error: huge.clone(),
                },
            },
        ])
        .await
        .expect("finish");
    assert_eq!(applied, [true, true]);
    assert_eq!(
        b.heartbeat(&[(held[2].job.id, held[2].token)], Duration::from_secs(30))
            .await
            .expect("heartbeat"),
        [true],
        "the connection survived"
    );
    assert_eq!(
        b.finish(&[finish_ok(&held[2])]).await.expect("finish"),
        [true]
    );
    let dead = b.list(&dead_filter()).await.expect("list dead");
    assert_eq!(dead.len(), 1);
    let err = dead[0].last_error.clone().unwrap_or_default();
    assert!(err.len() <= 4096, "{} bytes", err.len());
    assert!(
        err.starts_with("éé") && err.ends_with("(truncated)"),
        "{err}"
    );
    let again = eventually("the retried job", || async { claim(&b, 1).await.pop() }).await;
    assert_eq!(again.job.id, held[1].job.id);
    let err = again.job.last_error.clone().unwrap_or_default();
    assert!(err.len() <= 4096 && err.ends_with("(truncated)"), "{err}");
    assert_eq!(
        b.finish(&[finish_ok(&again)]).await.expect("finish"),
        [true]
    );
}

/// Two messages with one job id (a duplicate publish: an enqueue retried after a confirm
/// time-out, a `retry_dead` repeated) are two deliveries with two leases: both finish, and
/// the broker holds no unacknowledged message afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deliveries_of_one_id_are_two_leases() {
    let Some((_h, b)) = fresh().await else { return };
    let id = JobId::new();
    b.push(vec![
        new_job(id, "default", Task::NAME),
        new_job(id, "default", Task::NAME),
    ])
    .await
    .expect("push");
    let both = claim(&b, 2).await;
    assert_eq!(both.len(), 2);
    assert!(both.iter().all(|c| c.job.id == id));
    assert_ne!(both[0].token, both[1].token);
    assert_eq!(
        b.heartbeat(
            &[(id, both[0].token), (id, both[1].token)],
            Duration::from_secs(30)
        )
        .await
        .expect("heartbeat"),
        [true, true]
    );
    assert_eq!(
        b.finish(&[finish_ok(&both[0]), finish_ok(&both[1])])
            .await
            .expect("finish"),
        [true, true]
    );
    // Closing the connection hands back whatever it did not ack: nothing.
    let work = b.work_queue_name("default", Task::NAME);
    b.close().await;
    assert_eq!(ready_in(&work).await, 0, "every delivery was acked");
}

/// A foreign message whose attempt header is `u32::MAX` is claimed (as its last attempt)
/// without an arithmetic overflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_attempt_header_does_not_overflow() {
    use backline_rabbitmq::lapin::{
        options::BasicPublishOptions,
        types::{AMQPValue, FieldTable},
        BasicProperties,
    };
    let Some((_h, b)) = fresh().await else { return };
    assert!(claim(&b, 1).await.is_empty(), "declares the work queue");
    let work = b.work_queue_name("default", Task::NAME);
    let (conn, ch) = raw().await;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-backline-attempt".into(),
        AMQPValue::LongLongInt(i64::from(u32::MAX)),
    );
    ch.basic_publish(
        "".into(),
        work.as_str().into(),
        BasicPublishOptions::default(),
        &serde_json::to_vec(&Task::ok("huge")).expect("encode"),
        BasicProperties::default().with_headers(headers),
    )
    .await
    .expect("publish");
    let _ = conn.close(200, "done".into()).await;
    let c = eventually("the foreign message", || async { claim(&b, 1).await.pop() }).await;
    assert_eq!(c.job.attempt, c.job.max_attempts, "its last attempt");
    assert_eq!(b.finish(&[finish_ok(&c)]).await.expect("finish"), [true]);
}

/// A quorum queue's delivery limit moves a poison message to the dead letters (not away):
/// it lists with the broker's death time, and retention prunes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_delivery_limit_dead_letters_the_message() {
    use backline_rabbitmq::lapin::options::{BasicGetOptions, BasicNackOptions};
    let Some(h) = harness().await else { return };
    let prefix = fresh_prefix();
    h.prefixes
        .lock()
        .expect("harness lock")
        .push(prefix.clone());
    let quorum = |limit| {
        RabbitMqConfig::new(url())
            .with_prefix(&prefix)
            .with_queue_kind(QueueKind::Quorum {
                delivery_limit: limit,
            })
    };
    assert!(matches!(
        RabbitMqBackend::connect(quorum(0)).await,
        Err(Error::Config(_))
    ));
    let b = RabbitMqBackend::connect(quorum(1)).await.expect("connect");
    h.backends.lock().expect("harness lock").push(b.clone());
    let id = JobManager::new(Arc::new(b.clone()))
        .enqueue(Task::ok("poison"))
        .await
        .expect("enqueue");
    let work = b.work_queue_name("default", Task::NAME);
    let (conn, ch) = raw().await;
    // Deliver and hand back until the broker gives up on it.
    eventually("the delivery limit to dead-letter the job", || async {
        if let Some(m) = ch
            .basic_get(work.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .expect("get")
        {
            m.delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
                .expect("nack");
        }
        let c = b.counts(None).await.expect("counts");
        (c.dead == 1).then_some(())
    })
    .await;
    let _ = conn.close(200, "done".into()).await;
    let dead = b.list(&dead_filter()).await.expect("list dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert!(dead[0].finished_at.is_some(), "the broker's death time");
    let report = b
        .maintain(&backline_core::Maintenance {
            batch: 10,
            succeeded_ttl: Duration::ZERO,
            dead_ttl: Duration::ZERO,
        })
        .await
        .expect("maintain");
    assert_eq!(report.pruned, 1);
    assert_eq!(b.counts(None).await.expect("counts").dead, 0);
}

/// A message without a job name (no `type`, no Backline headers) in a landing queue (its job name unknown) goes to the
/// dead letters with a reason, not away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_in_a_landing_queue_is_dead_lettered() {
    use backline_rabbitmq::lapin::{
        options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
        types::FieldTable,
        BasicProperties,
    };
    let Some(h) = harness().await else { return };
    let prefix = fresh_prefix();
    h.prefixes
        .lock()
        .expect("harness lock")
        .push(prefix.clone());
    h.twins.store(true, std::sync::atomic::Ordering::SeqCst);
    let b = RabbitMqBackend::connect(
        RabbitMqConfig::new(url())
            .with_prefix(&prefix)
            .with_known_job("default", Task::NAME),
    )
    .await
    .expect("connect");
    h.backends.lock().expect("harness lock").push(b.clone());
    let landing = format!("{prefix}.default.~landing");
    let (conn, ch) = raw().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch.queue_declare(
        landing.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.basic_publish(
        "".into(),
        landing.as_str().into(),
        BasicPublishOptions::default(),
        b"not a job",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
    let _ = conn.close(200, "done".into()).await;
    b.maintain(&backline_core::Maintenance {
        batch: 10,
        succeeded_ttl: Duration::ZERO,
        dead_ttl: Duration::from_secs(3600),
    })
    .await
    .expect("maintain");
    let c = b.counts(None).await.expect("counts");
    assert_eq!((c.scheduled, c.dead), (0, 1), "{c:?}");
}

/// Under `QueueNaming::Abp`, a queue ABP declared first (durable, no arguments) is used as it
/// is: Backline declares it the same way (no priorities there), so neither side is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abp_naming_uses_a_queue_abp_declared_first() {
    use backline_rabbitmq::lapin::{options::QueueDeclareOptions, types::FieldTable};
    let Some(h) = harness().await else { return };
    let prefix = fresh_prefix();
    h.prefixes
        .lock()
        .expect("harness lock")
        .push(prefix.clone());
    let name = format!("BacklineTest{:016x}", fastrand::u64(..));
    let abp_queue = format!("AbpBackgroundJobs.{name}");
    let _guard = QueueGuard(vec![abp_queue.clone()]);
    let (conn, ch) = raw().await;
    ch.queue_declare(
        abp_queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare as ABP does");
    let _ = conn.close(200, "done".into()).await;
    let b = RabbitMqBackend::connect(
        RabbitMqConfig::new(url())
            .with_prefix(&prefix)
            .with_naming(QueueNaming::Abp),
    )
    .await
    .expect("connect");
    h.backends.lock().expect("harness lock").push(b.clone());
    assert_eq!(b.work_queue_name("default", &name), abp_queue);
    let id = JobId::new();
    b.push(vec![new_job(id, "default", &name)])
        .await
        .expect("push into ABP's queue");
    let names = vec![name.clone()];
    let c = eventually("the job", || async {
        claim_from(&b, "default", &names, 1).await.pop()
    })
    .await;
    assert_eq!(c.job.id, id);
    assert_eq!(b.finish(&[finish_ok(&c)]).await.expect("finish"), [true]);
}

/// Names that would collide with other queues are refused: a `.` in a queue name (queue
/// `a.b` + job `c` and queue `a` + job `b.c` would share a work queue), a leading `~` (the
/// mark of the wait, landing and dead queues) in a queue or job name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colliding_names_are_refused() {
    let Some((_h, b)) = fresh().await else { return };
    for (queue, name) in [("a.b", "c"), ("default", "~dead"), ("~x", "c")] {
        match b.push(vec![new_job(JobId::new(), queue, name)]).await {
            Err(Error::InvalidJob(msg)) => assert!(msg.contains('~') || msg.contains('.'), "{msg}"),
            other => panic!("{queue}/{name}: expected InvalidJob, got {other:?}"),
        }
    }
    // Job names with dots are fine (the name is the last part of the queue name).
    b.push(vec![new_job(JobId::new(), "a", "b.c")])
        .await
        .expect("a dotted job name");
    let err = b
        .claim(ClaimRequest {
            queue: "a.b",
            names: &["c".to_owned()],
            limit: 1,
            lease: Duration::from_secs(30),
        })
        .await;
    assert!(matches!(err, Err(Error::InvalidJob(_))), "{err:?}");
    assert!(matches!(
        RabbitMqBackend::connect(RabbitMqConfig::new(url()).with_prefix("a.b")).await,
        Err(Error::Config(_))
    ));
}

/// Dead letters page by id across queues: offset and limit apply to the whole ordered list,
/// not to each queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_page_by_id_across_queues() {
    let Some((_h, b)) = fresh().await else { return };
    let mut ids = Vec::new();
    for queue in ["b", "a", "b", "a"] {
        let id = JobId::new();
        b.push(vec![new_job(id, queue, Task::NAME)])
            .await
            .expect("push");
        let c = claim_from(&b, queue, &task_names(), 1)
            .await
            .pop()
            .expect("claimed");
        assert_eq!(
            b.finish(&[Finish {
                id,
                token: c.token,
                outcome: Outcome::Dead {
                    error: "dead".into()
                },
            }])
            .await
            .expect("finish"),
            [true]
        );
        ids.push(id);
    }
    let page = b
        .list(&JobFilter {
            offset: 1,
            limit: 2,
            ..dead_filter()
        })
        .await
        .expect("list");
    let got: Vec<JobId> = page.iter().map(|j| j.id).collect();
    assert_eq!(got, ids[1..3]);
}

/// Counting creates no queue (passive declares), and retention reaches a dead queue that
/// another handle declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_create_nothing_and_retention_reaches_other_handles_dead_letters() {
    let Some((h, b)) = fresh().await else { return };
    let prefix = h.current();
    let id = JobManager::new(Arc::new(b.clone()))
        .enqueue(Task::new("doomed", Action::Fatal))
        .await
        .expect("enqueue");
    let c = claim(&b, 1).await.pop().expect("claimed");
    assert_eq!(
        b.finish(&[Finish {
            id,
            token: c.token,
            outcome: Outcome::Dead {
                error: "dead".into()
            },
        }])
        .await
        .expect("finish"),
        [true]
    );
    let operator = RabbitMqBackend::connect(
        RabbitMqConfig::new(url())
            .with_prefix(&prefix)
            .with_known_job("default", Task::NAME)
            .with_known_job("unused", Task::NAME),
    )
    .await
    .expect("connect");
    h.backends
        .lock()
        .expect("harness lock")
        .push(operator.clone());
    let counts = operator.counts(None).await.expect("counts");
    assert_eq!(counts.dead, 1, "{counts:?}");
    assert!(
        operator.declared_queues().is_empty(),
        "{:?}",
        operator.declared_queues()
    );
    let report = operator
        .maintain(&backline_core::Maintenance {
            batch: 10,
            succeeded_ttl: Duration::ZERO,
            dead_ttl: Duration::ZERO,
        })
        .await
        .expect("maintain");
    assert_eq!(report.pruned, 1);
    assert_eq!(operator.counts(None).await.expect("counts").dead, 0);
}

/// Quorum queues have no priorities (RabbitMQ 3.10): the backend says so, and the priority
/// scenario of the suite asserts FIFO order for it instead.
#[tokio::test]
async fn quorum_queues_declare_no_priorities_and_run_fifo() {
    let Some(mut h) = harness().await else { return };
    h.quorum = true;
    let b = backline_testkit::Harness::backend(&h).await;
    assert!(!b.capabilities().priorities);
    drop(b);
    backline_testkit::scenarios::higher_priority_runs_first(&h).await;
}
