//! The conformance suite and the Redis-specific tests, against a real server
//! (`BACKLINE_REDIS_URL`, default `redis://127.0.0.1:6379`).
//!
//! Each backend gets its own random key prefix, so the tests run in parallel and never touch
//! other keys; each test deletes its keys at the end (a `SCAN` by its prefix, here in the test
//! only). Without a server the tests print a loud notice and pass, unless
//! `BACKLINE_REQUIRE_SERVICES=1`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline_core::{
    Backend, ClaimRequest, Error, Finish, JobArgs, JobFilter, JobManager, JobState,
};
use backline_redis::{RedisBackend, RedisConfig};
use backline_testkit::service::REDIS;
use backline_testkit::Task;

fn url() -> String {
    REDIS.url()
}

async fn reachable() -> bool {
    REDIS
        .reachable(|url| async move {
            let config = RedisConfig::new(url)
                .with_prefix(fresh_prefix())
                .with_connect_timeout(Duration::from_secs(5))
                .with_reconnect_retries(0);
            RedisBackend::connect(config).await.map(|_| ())
        })
        .await
}

fn fresh_prefix() -> String {
    format!("backline-test-{:016x}", fastrand::u64(..))
}

async fn connect(prefix: &str) -> RedisBackend {
    RedisBackend::connect(RedisConfig::new(url()).with_prefix(prefix))
        .await
        .expect("connect to Redis")
}

/// Deletes every key of `prefix` (its keys start with `prefix:` or `{prefix:`).
async fn delete_keys(prefix: &str) {
    let Ok(client) = redis::Client::open(url()) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    for pattern in [format!("{prefix}:*"), format!("{{{prefix}:*")] {
        let mut cursor = 0u64;
        loop {
            let r: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await;
            let Ok((next, keys)) = r else { break };
            if !keys.is_empty() {
                let _: redis::RedisResult<i64> =
                    redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}

/// A fresh prefix per backend; `twin` opens other connections on the same prefix. Dropping
/// the harness deletes the keys of every prefix it made.
struct RedisHarness {
    prefixes: Arc<Mutex<Vec<String>>>,
}

impl Drop for RedisHarness {
    fn drop(&mut self) {
        let prefixes = std::mem::take(&mut *self.prefixes.lock().expect("harness lock"));
        if prefixes.is_empty() {
            return;
        }
        // The test's runtime is ending: clean up on a small runtime of our own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    for p in prefixes {
                        delete_keys(&p).await;
                    }
                });
            }
        })
        .join();
    }
}

async fn harness() -> Option<RedisHarness> {
    reachable().await.then(|| RedisHarness {
        prefixes: Arc::new(Mutex::new(Vec::new())),
    })
}

impl RedisHarness {
    fn current(&self) -> String {
        self.prefixes
            .lock()
            .expect("harness lock")
            .last()
            .cloned()
            .expect("backend() before twin()")
    }
}

#[async_trait::async_trait]
impl backline_testkit::Harness for RedisHarness {
    async fn backend(&self) -> Arc<dyn Backend> {
        let prefix = fresh_prefix();
        self.prefixes
            .lock()
            .expect("harness lock")
            .push(prefix.clone());
        Arc::new(connect(&prefix).await)
    }

    async fn twin(&self, _backend: &Arc<dyn Backend>) -> Arc<dyn Backend> {
        Arc::new(connect(&self.current()).await)
    }
}

backline_testkit::conformance!(match harness().await {
    Some(h) => h,
    None => return,
});

/// 200,000 jobs in one queue: pushes, a claim of 1,000 and a maintenance pass all do bounded
/// work (no script walks the whole queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_queued_jobs_and_a_claim_of_a_thousand() {
    let Some(h) = harness().await else { return };
    let b = backline_testkit::Harness::backend(&h).await;
    let manager = JobManager::new(b.clone());
    for chunk in 0..20 {
        manager
            .enqueue_batch((0..10_000).map(|i| Task::ok(format!("{chunk}-{i}"))))
            .await
            .expect("enqueue");
    }
    let counts = manager.counts(Some("default")).await.expect("counts");
    assert_eq!(counts.ready, 200_000);
    let names = vec!["testkit.task".to_owned()];
    let claimed = b
        .claim(ClaimRequest::new(
            "default",
            &names,
            1000,
            Duration::from_secs(60),
        ))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1000);
    assert!(claimed.iter().all(|c| c.job.state == JobState::Running));
    // Equal priority: the oldest first (ids are UUIDv7, made in order).
    let ids: Vec<_> = claimed.iter().map(|c| c.job.id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    let counts = manager.counts(Some("default")).await.expect("counts");
    assert_eq!((counts.ready, counts.running), (199_000, 1000));
    let report = b
        .maintain(&backline_core::Maintenance {
            batch: 1000,
            succeeded_ttl: Duration::from_secs(3600),
            dead_ttl: Duration::from_secs(3600),
        })
        .await
        .expect("maintain");
    assert_eq!(report.recovered, 0);
}

#[tokio::test]
async fn a_prefix_with_braces_is_refused() {
    for bad in ["", "a{b", "x}"] {
        let r = RedisBackend::connect(RedisConfig::new(url()).with_prefix(bad)).await;
        assert!(
            matches!(r, Err(Error::Config(_))),
            "{bad:?} was not refused: {r:?}"
        );
    }
}

#[tokio::test]
async fn a_connection_error_names_the_operation_and_hides_the_password() {
    let config = RedisConfig::new("redis://someone:hunter2@127.0.0.1:1/0")
        .with_connect_timeout(Duration::from_secs(2))
        .with_reconnect_retries(0);
    assert!(!format!("{config:?}").contains("hunter2"));
    match RedisBackend::connect(config).await {
        Err(e @ Error::Connection { op: "connect", .. }) => {
            let mut chain = format!("{e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                chain.push_str(&format!(": {s}"));
                src = s.source();
            }
            assert!(!chain.contains("hunter2"), "{chain}");
        }
        other => panic!("expected a connection error, got {other:?}"),
    }
}

/// Maintenance promotes due delayed jobs in scripts of at most 1,000 and loops up to the
/// batch it was given; a smaller batch is honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_promotes_in_bounded_batches() {
    let Some(h) = harness().await else { return };
    let b = backline_testkit::Harness::backend(&h).await;
    let manager = JobManager::new(b.clone());
    manager
        .enqueue_batch_with(
            (0..2500).map(|i| Task::ok(format!("d{i}"))),
            backline_core::EnqueueOptions::new().delay(Duration::from_millis(1)),
        )
        .await
        .expect("enqueue");
    let m = |batch| backline_core::Maintenance {
        batch,
        succeeded_ttl: Duration::from_secs(3600),
        dead_ttl: Duration::from_secs(3600),
    };
    // Wait until the first one is due (the server's clock decides), promoting at most 10.
    let first = backline_testkit::eventually("the delayed jobs to be due", || async {
        let r = b.maintain(&m(10)).await.expect("maintain");
        (r.promoted > 0).then_some(r.promoted)
    })
    .await;
    assert!(first <= 10, "promoted {first} with a batch of 10");
    let mut promoted = first;
    while promoted < 2500 {
        let r = b.maintain(&m(5000)).await.expect("maintain");
        assert!(r.promoted <= 5000);
        if r.promoted == 0 {
            // Not all due yet by the server's clock: let the remaining milliseconds pass.
            tokio::task::yield_now().await;
        }
        promoted += r.promoted;
    }
    assert_eq!(promoted, 2500);
    let c = manager.counts(None).await.expect("counts");
    assert_eq!((c.ready, c.scheduled), (2500, 0));
}

/// A claim takes only the names asked for, in priority order across those names; jobs of
/// other names stay ready, untouched (no attempt spent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_takes_only_the_names_asked_for_in_order_across_names() {
    let Some(h) = harness().await else { return };
    let b = backline_testkit::Harness::backend(&h).await;
    let manager = JobManager::new(b.clone());
    let opts = |p| backline_core::EnqueueOptions::new().priority(p);
    let unknown = manager
        .enqueue_with(
            backline_testkit::UnknownTask(Task::ok("unknown")),
            opts(backline_core::Priority::High),
        )
        .await
        .expect("enqueue");
    let low = manager
        .enqueue_with(Task::ok("low"), opts(backline_core::Priority::Low))
        .await
        .expect("enqueue");
    let high = manager
        .enqueue_with(
            backline_testkit::AgingTask(Task::ok("high")),
            opts(backline_core::Priority::AboveNormal),
        )
        .await
        .expect("enqueue");
    let names = vec![
        "testkit.task".to_owned(),
        backline_testkit::AgingTask::NAME.to_owned(),
    ];
    let claimed = b
        .claim(ClaimRequest::new(
            "default",
            &names,
            10,
            Duration::from_secs(60),
        ))
        .await
        .expect("claim");
    let ids: Vec<_> = claimed.iter().map(|c| c.job.id).collect();
    assert_eq!(ids, [high, low]);
    let j = manager.get(unknown).await.expect("get").expect("kept");
    assert_eq!((j.state, j.attempt), (JobState::Ready, 0));
    let c = manager.counts(None).await.expect("counts");
    assert_eq!((c.ready, c.running), (1, 2));
}

/// With hourly polls, only the signal list can wake the server: a push from another handle
/// (another process, as far as Redis knows) wakes it, and so does a delayed job's run-at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_from_another_handle_and_a_due_delayed_job_wake_an_idle_server() {
    let Some(h) = harness().await else { return };
    let a = backline_testkit::Harness::backend(&h).await;
    let b = backline_testkit::Harness::twin(&h, &a).await;
    let rec = backline_testkit::Recorder::new();
    let running = backline_core::JobServer::builder(a.clone())
        .register(backline_testkit::TaskHandler::<Task>::new(rec.clone()))
        .config(backline_testkit::fast_config())
        .configure(|c| {
            c.poll_interval = Duration::from_secs(3600);
            c.maintenance_interval = Duration::from_secs(3600);
        })
        .build()
        .expect("server")
        .start();
    let other = JobManager::new(b);
    let first = other.enqueue(Task::ok("first")).await.expect("enqueue");
    rec.wait_for_attempts(1).await;
    let delayed = other
        .enqueue_with(
            Task::ok("delayed"),
            backline_core::EnqueueOptions::new().delay(Duration::from_millis(300)),
        )
        .await
        .expect("enqueue");
    let events = rec.wait_for_attempts(2).await;
    running.shutdown().await.expect("shutdown");
    assert_eq!((events[0].id, events[1].id), (first, delayed));
}

/// Hashes Backline would never write (a field rewritten by hand or by another client) cost
/// only themselves: every healthy job beside them runs in its first attempt, claims and
/// maintenance go on, inspection pages load.
///
/// Each bad hash meets a different path: a claim (Lua checks each field it hands back; the id,
/// a set member, is checked in Rust), promotion of a delayed job, the expiry of a lease, and a
/// release. Each ends dead with a reason naming its field, or, where the field cannot be
/// repaired (a missing name, an id that is no UUID), `get` names it in `Error::Undecodable`
/// and `list` skips it.
#[tokio::test]
async fn malformed_hashes_cost_only_themselves() {
    if !reachable().await {
        return;
    }
    let prefix = fresh_prefix();
    let b = connect(&prefix).await;
    let manager = JobManager::new(b.clone());
    let client = redis::Client::open(url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let job_key = |id: &str| format!("{{{prefix}:default}}:j:{id}");
    let names = vec![Task::NAME.to_owned()];
    let claim = |limit, lease| ClaimRequest::new("default", &names, limit, lease);
    let maintenance = backline_core::Maintenance {
        batch: 1000,
        succeeded_ttl: Duration::from_secs(3600),
        dead_ttl: Duration::from_secs(3600),
    };
    let high = || backline_core::EnqueueOptions::new().priority(backline_core::Priority::High);
    let delayed = || backline_core::EnqueueOptions::new().delay(Duration::from_millis(100));

    // A running job spoiled under its lease: a release (which computes its ready score) makes
    // it dead instead.
    let released = manager
        .enqueue(Task::ok("released"))
        .await
        .expect("enqueue");
    let c = b
        .claim(claim(1, Duration::from_secs(60)))
        .await
        .expect("claim");
    assert_eq!(c.iter().map(|c| c.job.id).collect::<Vec<_>>(), [released]);
    hset(&mut conn, &job_key(&released.to_string()), "pri", "high").await;
    let done = b
        .finish(&[Finish::new(
            released,
            c[0].token,
            backline_core::Outcome::Release,
        )])
        .await
        .expect("a release of a spoiled job");
    assert_eq!(done, [true]);

    // A running job whose lease runs out with max='many' (the reaper compares att with max).
    let leased = manager.enqueue(Task::ok("leased")).await.expect("enqueue");
    let c = b
        .claim(claim(1, Duration::from_millis(100)))
        .await
        .expect("claim");
    assert_eq!(c.iter().map(|c| c.job.id).collect::<Vec<_>>(), [leased]);
    hset(&mut conn, &job_key(&leased.to_string()), "max", "many").await;

    let mut healthy = Vec::new();
    for i in 0..14 {
        healthy.push(
            manager
                .enqueue(Task::ok(format!("healthy {i}")))
                .await
                .expect("enqueue"),
        );
    }
    healthy.push(
        manager
            .enqueue_with(Task::ok("healthy, delayed"), delayed())
            .await
            .expect("enqueue"),
    );
    // A delayed job with a bad priority: promotion meets it (on main it failed every claim
    // and maintenance of the queue).
    let promoted = manager
        .enqueue_with(Task::ok("bad pri, delayed"), delayed())
        .await
        .expect("enqueue");
    hset(&mut conn, &job_key(&promoted.to_string()), "pri", "high").await;

    // Ready jobs ahead of the healthy ones (High priority), each with one field spoiled.
    let spoiled = [
        ("pri", Some("high")),
        ("att", Some("x")),
        ("max", Some("many")),
        ("tmo", Some("soon")),
        ("enq", Some("yesterday")),
        ("name", None),
    ];
    let mut bad = vec![(released, "pri"), (leased, "max"), (promoted, "pri")];
    for (field, value) in spoiled {
        let id = manager
            .enqueue_with(Task::ok(format!("bad {field}")), high())
            .await
            .expect("enqueue");
        match value {
            Some(v) => hset(&mut conn, &job_key(&id.to_string()), field, v).await,
            None => {
                let _: i64 = redis::cmd("HDEL")
                    .arg(job_key(&id.to_string()))
                    .arg(field)
                    .query_async(&mut conn)
                    .await
                    .expect("delete a field");
            }
        }
        bad.push((id, field));
    }
    // Last of the High ones: an empty payload, which reads (it is bytes) but does not decode
    // as the job's arguments: the handler's decoding makes it dead (fatal), as on every backend.
    let empty = manager
        .enqueue_with(Task::ok("bad payload"), high())
        .await
        .expect("enqueue");
    hset(&mut conn, &job_key(&empty.to_string()), "payload", "").await;
    // A job another client wrote with an id that is no UUID, first in claim order: the Lua
    // checks pass (the id is no field), Rust's do not.
    let odd = "not-a-uuid";
    let _: () = redis::cmd("HSET")
        .arg(job_key(odd))
        .arg(vec![
            "name",
            Task::NAME,
            "queue",
            "default",
            "payload",
            "{}",
            "pri",
            "25",
            "state",
            "ready",
            "att",
            "0",
            "max",
            "3",
            "tmo",
            "",
            "enq",
            "0",
            "run",
            "0",
        ])
        .query_async(&mut conn)
        .await
        .expect("write a foreign job");
    let _: i64 = redis::cmd("ZADD")
        .arg(format!("{{{prefix}:default}}:ready:{}", Task::NAME))
        .arg(0)
        .arg(odd)
        .query_async(&mut conn)
        .await
        .expect("make it ready");

    // Maintenance (called directly, every call Ok) meets the delayed one and the expired lease.
    backline_testkit::eventually(
        "maintenance to meet the delayed and the leased job",
        || async {
            b.maintain(&maintenance).await.expect("maintain");
            (is_dead(&b, promoted).await && is_dead(&b, leased).await).then_some(())
        },
    )
    .await;
    // One claim of one job goes past the seven bad ones ahead of it (each dead, or gone from
    // the ready set) and returns the first job that reads.
    let c = b
        .claim(claim(1, Duration::from_secs(60)))
        .await
        .expect("a claim beside bad hashes");
    assert_eq!(c.iter().map(|c| c.job.id).collect::<Vec<_>>(), [empty]);
    let done = b
        .finish(&[Finish::new(
            empty,
            c[0].token,
            backline_core::Outcome::Release,
        )])
        .await
        .expect("release");
    assert_eq!(done, [true]);

    let rec = backline_testkit::Recorder::new();
    let server = backline_core::JobServer::builder(b.clone())
        .register(backline_testkit::TaskHandler::<Task>::new(rec.clone()))
        .config(backline_testkit::fast_config())
        .queue("default", 4)
        .build()
        .expect("server");
    let handle = server.start();
    for id in &healthy {
        let job = backline_testkit::eventually("the healthy jobs succeed", || async {
            b.get(*id)
                .await
                .ok()
                .flatten()
                .filter(|j| j.state == JobState::Succeeded)
        })
        .await;
        assert_eq!(job.attempt, 1, "healthy job {id} ran in its first attempt");
    }
    let job = backline_testkit::eventually("the empty payload to be dead", || async {
        b.get(empty)
            .await
            .ok()
            .flatten()
            .filter(|j| j.state == JobState::Dead)
    })
    .await;
    assert_eq!(job.attempt, 1, "{job:?}");
    handle.shutdown().await.expect("shutdown");
    for _ in 0..3 {
        let c = b
            .claim(claim(10, Duration::from_secs(60)))
            .await
            .expect("claim");
        assert!(c.is_empty(), "{c:?}");
        b.maintain(&maintenance).await.expect("maintain");
    }

    // Each bad job is dead with its reason (its field repaired, so it reads), or `get` names
    // the field that cannot be repaired.
    let mut unreadable = Vec::new();
    for (id, field) in &bad {
        match b.get(*id).await {
            Ok(Some(j)) => {
                assert_eq!(j.state, JobState::Dead, "{field}: {j:?}");
                let err = j.last_error.unwrap_or_default();
                assert!(
                    err.starts_with(&format!("the stored job cannot be read: field {field}: ")),
                    "{field}: {err}"
                );
            }
            Err(Error::Undecodable {
                field: f, problem, ..
            }) => {
                assert_eq!(f, format!("field {field}"), "{problem}");
                unreadable.push(*id);
            }
            other => panic!("{field}: {other:?}"),
        }
    }
    assert_eq!(
        unreadable.len(),
        1,
        "only the missing name cannot be repaired"
    );
    let err = b
        .get(bad[3].0)
        .await
        .expect("get")
        .and_then(|j| j.last_error);
    assert_eq!(
        err.as_deref(),
        Some("the stored job cannot be read: field pri: 'high' is not a number")
    );
    let odd_fields: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(job_key(odd))
        .arg("state")
        .arg("err")
        .query_async(&mut conn)
        .await
        .expect("read the foreign job");
    assert_eq!(odd_fields[0].as_deref(), Some("dead"));
    assert_eq!(
        odd_fields[1].as_deref(),
        Some("the stored job cannot be read: id in the key: 'not-a-uuid' is not a UUID")
    );

    // Inspection loads; `list` leaves out the two that do not read (with a warning).
    let listed = b
        .list(&JobFilter::new().with_limit(1000))
        .await
        .expect("list loads beside malformed hashes");
    let dead = bad.len() + 2; // and the empty payload, and the foreign job
    let counts = manager.counts(None).await.expect("counts");
    assert_eq!(
        (counts.succeeded, counts.dead),
        (healthy.len() as u64, dead as u64)
    );
    assert_eq!(listed.len(), healthy.len() + dead - 2);
    // An operator's retry of the unreadable one is refused with the field; a delete works.
    match b.retry_dead(unreadable[0]).await {
        Err(Error::Undecodable { field, .. }) => assert_eq!(field, "field name"),
        other => panic!("{other:?}"),
    }
    assert!(b.delete(unreadable[0]).await.expect("delete"));
    assert!(b.get(unreadable[0]).await.expect("get").is_none());
    // A repaired dead job can be retried, and then runs like any other.
    assert!(b.retry_dead(bad[3].0).await.expect("retry"));
    delete_keys(&prefix).await;
}

async fn is_dead(b: &RedisBackend, id: backline_core::JobId) -> bool {
    matches!(b.get(id).await, Ok(Some(j)) if j.state == JobState::Dead)
}

async fn hset(conn: &mut redis::aio::MultiplexedConnection, key: &str, field: &str, value: &str) {
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg(field)
        .arg(value)
        .query_async(conn)
        .await
        .expect("spoil a field");
}

/// The other paths a bad hash can meet: a claim across several names (the merge of their
/// ready sets), a retry due at once (which computes the ready score), and a delete or `get` of a
/// job whose state is no job state.
#[tokio::test]
async fn malformed_hashes_in_a_claim_across_names_a_retry_and_a_delete() {
    let Some(h) = harness().await else { return };
    let b = backline_testkit::Harness::backend(&h).await;
    let prefix = h.current();
    let manager = JobManager::new(b.clone());
    let client = redis::Client::open(url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let job_key = |id: backline_core::JobId| format!("{{{prefix}:default}}:j:{id}");
    let high = || backline_core::EnqueueOptions::new().priority(backline_core::Priority::High);
    let aging = backline_testkit::AgingTask;
    let bad_att = manager
        .enqueue_with(Task::ok("bad att"), high())
        .await
        .expect("enqueue");
    hset(&mut conn, &job_key(bad_att), "att", "x").await;
    let bad_pri = manager
        .enqueue_with(aging(Task::ok("bad pri")), high())
        .await
        .expect("enqueue");
    hset(&mut conn, &job_key(bad_pri), "pri", "99").await;
    let a = manager.enqueue(Task::ok("a")).await.expect("enqueue");
    let z = manager
        .enqueue(aging(Task::ok("z")))
        .await
        .expect("enqueue");
    let names = vec![
        Task::NAME.to_owned(),
        backline_testkit::AgingTask::NAME.to_owned(),
    ];
    let claimed = b
        .claim(ClaimRequest::new(
            "default",
            &names,
            2,
            Duration::from_secs(60),
        ))
        .await
        .expect("a claim across names beside bad hashes");
    let ids: Vec<_> = claimed.iter().map(|c| c.job.id).collect();
    assert_eq!(ids, [a, z]);
    for (id, reason) in [
        (bad_att, "field att: 'x' is not a number"),
        (bad_pri, "field pri: '99' is out of range (5 to 25)"),
    ] {
        let j = b.get(id).await.expect("get").expect("kept");
        assert_eq!(j.state, JobState::Dead);
        assert_eq!(
            j.last_error.as_deref(),
            Some(format!("the stored job cannot be read: {reason}").as_str())
        );
    }

    // A retry due at once of a job spoiled under its lease: dead instead, the item applied.
    hset(&mut conn, &job_key(a), "pri", "").await;
    let retry = |id, token| {
        Finish::new(
            id,
            token,
            backline_core::Outcome::Retry {
                delay: Duration::ZERO,
                error: "try again".to_owned(),
            },
        )
    };
    let done = b
        .finish(&[retry(a, claimed[0].token), retry(z, claimed[1].token)])
        .await
        .expect("finish beside a bad hash");
    assert_eq!(done, [true, true]);
    let j = b.get(a).await.expect("get").expect("kept");
    assert_eq!(
        (j.state, j.last_error.as_deref()),
        (
            JobState::Dead,
            Some("the stored job cannot be read: field pri: '' is not a number")
        )
    );
    let j = b.get(z).await.expect("get").expect("kept");
    assert_eq!(j.state, JobState::Ready);

    // A state that is no job state: `get` names it, `delete` still removes the job.
    hset(&mut conn, &job_key(z), "state", "paused").await;
    match b.get(z).await {
        Err(Error::Undecodable { field, problem, .. }) => {
            assert_eq!(
                (field.as_str(), problem.as_str()),
                ("field state", "'paused' is not a job state")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(b.delete(z).await.expect("delete"));
    assert!(b.get(z).await.expect("get").is_none());
    let c = manager.counts(None).await.expect("counts");
    assert_eq!((c.ready, c.running, c.dead), (0, 0, 3));
}
