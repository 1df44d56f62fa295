//! Group commit of concurrent enqueues, on every database: the scenarios, and
//! [`group_commit_tests!`] that expands them into one `#[tokio::test]` each in a test binary.
//!
//! A scenario that needs a group to form holds every connection of the backend's pool, so that
//! the first call (the leader) blocks in its commit while the others join the pending list;
//! it waits for that through [`SqlBackend::group_state`] (yielding, never sleeping), then
//! gives the connections back: the leader commits alone and the others share the next commit.
#![allow(dead_code)]

use std::any::Any;
use std::collections::HashSet;
use std::time::Duration;

use backline_core::{EnqueueOptions, Error, JobId, JobManager, NewJob, Result};
use backline_sql::SqlBackend;
use backline_testkit::Task;
use tokio::task::JoinHandle;

/// The queue that [`refuse`] makes the database reject.
pub(crate) const REFUSED: &str = "refused";

/// A guard against a hang, never a timing expectation.
const PATIENCE: Duration = Duration::from_secs(60);

/// Every connection of the backend's pool (the writer's, on SQLite), held until dropped.
pub(crate) async fn hold(b: &SqlBackend) -> Vec<Box<dyn Any + Send>> {
    async fn all<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> Vec<Box<dyn Any + Send>> {
        let mut held: Vec<Box<dyn Any + Send>> = Vec::new();
        for _ in 0..pool.options().get_max_connections() {
            held.push(Box::new(
                pool.acquire().await.expect("acquire a connection"),
            ));
        }
        held
    }
    #[cfg(feature = "postgres")]
    if let Some(pool) = b.pg_pool() {
        return all(pool).await;
    }
    #[cfg(feature = "mysql")]
    if let Some(pool) = b.mysql_pool() {
        return all(pool).await;
    }
    #[cfg(feature = "sqlite")]
    if let Some(pool) = b.sqlite_pool() {
        return all(pool).await;
    }
    panic!("no pool to hold")
}

/// Makes the database refuse any job on queue [`REFUSED`]: a `CHECK` constraint (PostgreSQL,
/// MySQL/MariaDB) or a trigger that aborts the statement (SQLite), as an application's own
/// rule would.
pub(crate) async fn refuse(b: &SqlBackend) {
    let t = b.table().qualified();
    let name = format!("{}_refuse", b.table().name());
    let check = format!("ALTER TABLE {t} ADD CONSTRAINT {name} CHECK (queue <> '{REFUSED}')");
    #[cfg(feature = "postgres")]
    if let Some(pool) = b.pg_pool() {
        sqlx::query(sqlx::AssertSqlSafe(check))
            .execute(pool)
            .await
            .expect("constraint");
        return;
    }
    #[cfg(feature = "mysql")]
    if let Some(pool) = b.mysql_pool() {
        sqlx::query(sqlx::AssertSqlSafe(check))
            .execute(pool)
            .await
            .expect("constraint");
        return;
    }
    #[cfg(feature = "sqlite")]
    if let Some(pool) = b.sqlite_pool() {
        let trigger = format!(
            "CREATE TRIGGER {name} BEFORE INSERT ON {t} WHEN NEW.queue = '{REFUSED}'
            BEGIN SELECT RAISE(ABORT, 'queue refused'); END"
        );
        sqlx::query(sqlx::AssertSqlSafe(trigger))
            .execute(pool)
            .await
            .expect("trigger");
        return;
    }
    let _ = check;
    panic!("no pool")
}

/// A prepared job tagged `tag`, on `queue`, with `id` if given.
pub(crate) fn job(b: &SqlBackend, tag: &str, queue: &str, id: Option<JobId>) -> NewJob {
    let mut opts = EnqueueOptions::new().queue(queue);
    if let Some(id) = id {
        opts = opts.id(id);
    }
    JobManager::new(b.clone())
        .prepare(&Task::ok(tag), opts)
        .expect("prepare")
}

/// One enqueue call of `jobs`, in a task of its own.
pub(crate) fn call(b: &SqlBackend, jobs: Vec<NewJob>) -> JoinHandle<Result<Vec<JobId>>> {
    let manager = JobManager::new(b.clone());
    tokio::spawn(async move { manager.enqueue_raw(jobs).await })
}

/// Waits (yielding, never sleeping) until the group is in `state`.
pub(crate) async fn until(b: &SqlBackend, state: (bool, usize)) {
    let reached = async {
        while b.group_state() != state {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, reached)
        .await
        .unwrap_or_else(|_| panic!("the group never reached {state:?}: {:?}", b.group_state()));
}

/// A formed group: the leader (one job tagged `lead`) blocked in its commit, and `calls`
/// waiting for the next commit, in this order. Nothing moves until `held` is dropped.
pub(crate) struct Formed {
    pub(crate) held: Vec<Box<dyn Any + Send>>,
    pub(crate) leader: JoinHandle<Result<Vec<JobId>>>,
    pub(crate) calls: Vec<JoinHandle<Result<Vec<JobId>>>>,
}

pub(crate) async fn formed(b: &SqlBackend, calls: Vec<Vec<NewJob>>) -> Formed {
    let held = hold(b).await;
    let leader = call(b, vec![job(b, "lead", "default", None)]);
    until(b, (true, 0)).await;
    let mut handles = Vec::new();
    for (i, jobs) in calls.into_iter().enumerate() {
        handles.push(call(b, jobs));
        until(b, (true, i + 1)).await;
    }
    Formed {
        held,
        leader,
        calls: handles,
    }
}

/// The result of a call, within [`PATIENCE`].
pub(crate) async fn outcome(h: JoinHandle<Result<Vec<JobId>>>) -> Result<Vec<JobId>> {
    tokio::time::timeout(PATIENCE, h)
        .await
        .expect("a call was stranded")
        .expect("the call's task")
}

/// The tag of a stored job, if it is stored.
pub(crate) async fn tag(b: &SqlBackend, id: JobId) -> Option<String> {
    let job = JobManager::new(b.clone()).get(id).await.expect("get")?;
    let task: Task = serde_json::from_slice(&job.payload).expect("a task");
    Some(task.tag)
}

/// 32 tasks enqueue 10 jobs each, one call per job: every call returns Ok and every job is
/// stored exactly once.
pub(crate) async fn concurrent_enqueues_land_exactly_once(b: SqlBackend) {
    let manager = JobManager::new(b.clone());
    let mut tasks = Vec::new();
    for t in 0..32 {
        let manager = manager.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..10 {
                ids.push(manager.enqueue(Task::ok(format!("{t}-{i}"))).await?);
            }
            Ok::<_, Error>(ids)
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        let got = tokio::time::timeout(PATIENCE, t)
            .await
            .expect("stranded")
            .expect("task")
            .expect("every enqueue succeeds");
        ids.extend(got);
    }
    assert_eq!(ids.len(), 320);
    let counts = manager.counts(None).await.expect("counts");
    assert_eq!((counts.ready, counts.total()), (320, 320), "{counts:?}");
    for id in ids {
        assert!(tag(&b, id).await.is_some(), "job {id} is missing");
    }
    assert_eq!(b.group_state(), (false, 0));
}

/// A call whose job the database refuses fails alone: the calls that shared its commit are
/// stored (each retried in its own transaction).
pub(crate) async fn a_refused_job_fails_only_its_own_call(b: SqlBackend) {
    refuse(&b).await;
    let f = formed(
        &b,
        vec![
            vec![job(&b, "f0", "default", None)],
            vec![job(&b, "bad", REFUSED, None)],
            vec![job(&b, "f2", "default", None)],
        ],
    )
    .await;
    drop(f.held);
    outcome(f.leader).await.expect("the leader");
    let mut results = Vec::new();
    for c in f.calls {
        results.push(outcome(c).await);
    }
    let bad = results.remove(1);
    assert!(matches!(bad, Err(Error::Backend { .. })), "{bad:?}");
    for r in results {
        let ids = r.expect("the innocent calls succeed");
        assert!(tag(&b, ids[0]).await.is_some());
    }
    let counts = JobManager::new(b.clone())
        .counts(None)
        .await
        .expect("counts");
    assert_eq!(counts.total(), 3, "{counts:?}");
}

/// A multi-job call is all or nothing inside a group: one refused job keeps the whole call
/// out, and the other calls of the group are stored.
pub(crate) async fn each_calls_batch_is_all_or_nothing(b: SqlBackend) {
    refuse(&b).await;
    let f = formed(
        &b,
        vec![
            vec![job(&b, "before", "default", None)],
            vec![
                job(&b, "b0", "default", None),
                job(&b, "b1", REFUSED, None),
                job(&b, "b2", "default", None),
            ],
            vec![job(&b, "c0", "default", None), job(&b, "c1", "other", None)],
        ],
    )
    .await;
    drop(f.held);
    outcome(f.leader).await.expect("the leader");
    let mut calls = f.calls.into_iter();
    let before = calls.next().expect("call");
    let batch = calls.next().expect("call");
    let pair = calls.next().expect("call");
    assert!(outcome(before).await.is_ok());
    assert!(outcome(batch).await.is_err());
    let pair = outcome(pair).await.expect("the other batch");
    assert_eq!(pair.len(), 2);
    for id in pair {
        assert!(tag(&b, id).await.is_some());
    }
    let stored: Vec<String> = JobManager::new(b.clone())
        .list(&backline_core::JobFilter::default())
        .await
        .expect("list")
        .into_iter()
        .map(|j| {
            serde_json::from_slice::<Task>(&j.payload)
                .expect("task")
                .tag
        })
        .collect();
    let stored: HashSet<String> = stored.into_iter().collect();
    let expected: HashSet<String> = ["lead", "before", "c0", "c1"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(stored, expected);
}

/// Dedup by id keeps its meaning inside a group: of two calls with one new id, the first
/// stored wins and both get the id; a call with the id of a stored job leaves it as it is.
pub(crate) async fn dedup_by_id_holds_across_calls_in_one_group(b: SqlBackend) {
    let manager = JobManager::new(b.clone());
    let old = JobId::new();
    manager
        .enqueue_raw(vec![job(&b, "old", "default", Some(old))])
        .await
        .expect("the first job");
    let twin = JobId::new();
    let f = formed(
        &b,
        vec![
            vec![job(&b, "first", "default", Some(twin))],
            vec![job(&b, "second", "default", Some(twin))],
            vec![job(&b, "again", "default", Some(old))],
        ],
    )
    .await;
    drop(f.held);
    outcome(f.leader).await.expect("the leader");
    let mut got = Vec::new();
    for c in f.calls {
        got.push(outcome(c).await.expect("every call succeeds"));
    }
    assert_eq!(got, vec![vec![twin], vec![twin], vec![old]]);
    assert_eq!(tag(&b, twin).await.as_deref(), Some("first"));
    assert_eq!(tag(&b, old).await.as_deref(), Some("old"));
    let counts = manager.counts(None).await.expect("counts");
    assert_eq!(counts.total(), 3, "{counts:?}");
}

/// A leader whose caller goes away while it waits for its commit does not strand the calls
/// queued behind it: they are stored and return.
pub(crate) async fn a_cancelled_leader_does_not_strand_the_others(b: SqlBackend) {
    let f = formed(
        &b,
        (0..4)
            .map(|i| vec![job(&b, &format!("f{i}"), "default", None)])
            .collect(),
    )
    .await;
    f.leader.abort();
    assert!(f.leader.await.expect_err("aborted").is_cancelled());
    // The leader's commit never got a connection; the lead has passed to a follower.
    drop(f.held);
    for c in f.calls {
        let ids = outcome(c).await.expect("a follower succeeds");
        assert!(tag(&b, ids[0]).await.is_some());
    }
    assert_eq!(b.group_state(), (false, 0));
}

/// Expands every group-commit scenario into a `#[tokio::test]`; `$backend` is an async
/// expression giving `Option<SqlBackend>` (a fresh one; `None` skips, as without a server).
macro_rules! group_commit_tests {
    ($backend:expr) => {
        mod group_commit {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_enqueues_land_exactly_once() {
                let Some(b) = ($backend) else { return };
                crate::group::concurrent_enqueues_land_exactly_once(b).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_refused_job_fails_only_its_own_call() {
                let Some(b) = ($backend) else { return };
                crate::group::a_refused_job_fails_only_its_own_call(b).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn each_calls_batch_is_all_or_nothing() {
                let Some(b) = ($backend) else { return };
                crate::group::each_calls_batch_is_all_or_nothing(b).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dedup_by_id_holds_across_calls_in_one_group() {
                let Some(b) = ($backend) else { return };
                crate::group::dedup_by_id_holds_across_calls_in_one_group(b).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_cancelled_leader_does_not_strand_the_others() {
                let Some(b) = ($backend) else { return };
                crate::group::a_cancelled_leader_does_not_strand_the_others(b).await;
            }
        }
    };
}
pub(crate) use group_commit_tests;
