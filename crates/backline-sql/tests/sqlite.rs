//! The conformance suite and the SQLite-specific tests, each on a fresh database file under
//! the system's temporary directory (no server needed).

mod group;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use backline_core::{Backend, EnqueueOptions, JobManager, JobServer};
use backline_sql::{sqlx, PlanMode, SqlBackend, SqlConfig};
use backline_testkit::{Recorder, Task, TaskHandler};

mod support;

use support::corrupt::{self, Dialect};
use support::fixture;

fn dir() -> PathBuf {
    static CLEANED: std::sync::Once = std::sync::Once::new();
    let dir = std::env::temp_dir().join("backline-sqlite-tests");
    CLEANED.call_once(|| {
        let _ = std::fs::create_dir_all(&dir);
        // Files of runs more than an hour old.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 3600);
                if old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    });
    dir
}

fn fresh_url() -> String {
    let file = dir().join(format!(
        "t_{}_{:08x}.db",
        chrono::Utc::now().timestamp(),
        fastrand::u32(..)
    ));
    format!("sqlite://{}", file.display())
}

async fn connect(url: &str) -> SqlBackend {
    SqlBackend::connect(SqlConfig::new(url).with_max_connections(4))
        .await
        .expect("open the SQLite file")
}

/// A fresh file per backend; `twin` opens it again with its own pools, as a second process would.
struct SqliteHarness {
    url: Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl backline_testkit::Harness for SqliteHarness {
    async fn write_raw(
        &self,
        _backend: &Arc<dyn Backend>,
        statement: &str,
    ) -> backline_core::Result<()> {
        let url = self
            .url
            .lock()
            .expect("harness lock")
            .clone()
            .expect("backend() before write_raw()");
        corrupt::raw_exec(&connect(&url).await, statement).await
    }

    async fn backend(&self) -> Arc<dyn Backend> {
        let url = fresh_url();
        let b = connect(&url).await;
        *self.url.lock().expect("harness lock") = Some(url);
        Arc::new(b)
    }

    async fn twin(&self, _backend: &Arc<dyn Backend>) -> Arc<dyn Backend> {
        let url = self
            .url
            .lock()
            .expect("harness lock")
            .clone()
            .expect("backend() before twin()");
        Arc::new(connect(&url).await)
    }
}

backline_testkit::conformance!(SqliteHarness {
    url: Mutex::new(None)
});

group::group_commit_tests!(Some(connect(&fresh_url()).await));

#[tokio::test]
async fn a_rolled_back_transaction_leaves_no_job() {
    let b = connect(&fresh_url()).await;
    let manager = JobManager::new(b.clone());
    let pool = b.sqlite_pool().expect("sqlite").clone();

    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
    let job = manager
        .prepare(&Task::ok("rolled back"), EnqueueOptions::new())
        .expect("prepare");
    let gone = b.enqueue_in(&mut *tx, job).await.expect("enqueue in tx");
    tx.rollback().await.expect("rollback");
    assert!(manager.get(gone).await.expect("get").is_none());

    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
    let job = manager
        .prepare(&Task::ok("committed"), EnqueueOptions::new())
        .expect("prepare");
    let kept = b.enqueue_in(&mut *tx, job).await.expect("enqueue in tx");
    assert!(
        manager.get(kept).await.expect("get").is_none(),
        "not visible before commit"
    );
    tx.commit().await.expect("commit");
    assert!(manager.get(kept).await.expect("get").is_some());
    assert_eq!(manager.counts(None).await.expect("counts").total(), 1);
}

#[tokio::test]
async fn an_oversized_job_is_refused_in_a_transaction() {
    let b = connect(&fresh_url()).await;
    let pool = b.sqlite_pool().expect("sqlite").clone();
    support::an_oversized_job_is_refused_in_a_transaction(&b, &pool).await;
}

#[tokio::test]
async fn the_claim_reads_the_claim_index_without_sorting() {
    let b = connect(&fresh_url()).await;
    let manager = JobManager::new(b.clone());
    manager
        .enqueue_batch((0..2000).map(|i| Task::ok(format!("{i}"))))
        .await
        .expect("enqueue");
    let plan = b
        .explain_claim("default", &["testkit.task".to_owned(), "other".to_owned()])
        .await
        .expect("explain");
    assert!(
        plan.contains(&b.claim_index_name()),
        "the claim does not read {}:\n{plan}",
        b.claim_index_name()
    );
    assert!(!plan.contains("TEMP B-TREE"), "the claim sorts:\n{plan}");
}

/// The claim reads the claim index without sorting, the finish reads the claimed rows through
/// the primary key, and promotion, lease recovery and retention read their partial index in
/// its order: without `sqlite_stat1` (Backline never runs `ANALYZE`) and with it (after an
/// application's `ANALYZE` or `PRAGMA optimize`).
#[tokio::test]
async fn with_or_without_statistics_every_statement_keeps_its_plan() {
    let b = connect(&fresh_url()).await;
    fixture::fill_every_state(&b).await;
    let pool = b.sqlite_pool().expect("sqlite").clone();
    let stats = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'",
        )
        .fetch_one(&pool)
        .await
        .expect("read sqlite_master")
    };
    assert_eq!(stats().await, 0, "the table has statistics");
    assert_plans(&b).await;
    sqlx::query("ANALYZE")
        .execute(&pool)
        .await
        .expect("analyze");
    assert_eq!(stats().await, 1, "ANALYZE made no statistics");
    assert_plans(&b).await;
}

async fn assert_plans(b: &SqlBackend) {
    let (claim, finish) = fixture::claim_and_finish(b, PlanMode::Generic).await;
    assert!(
        claim.contains(&format!("USING INDEX {} ", b.claim_index_name())),
        "the claim does not read {}:\n{claim}",
        b.claim_index_name()
    );
    assert!(
        finish.contains("USING INDEX sqlite_autoindex_"),
        "the finish does not read the primary key:\n{finish}"
    );
    let mut plans = vec![claim, finish];
    for (index, plan) in fixture::maintenance(b, PlanMode::Generic).await {
        assert!(
            plan.contains(&format!("USING INDEX {index} ")),
            "the statement does not read {index}:\n{plan}"
        );
        plans.push(plan);
    }
    for plan in plans {
        assert!(!plan.contains("TEMP B-TREE"), "it sorts:\n{plan}");
        assert!(!plan.contains("SCAN "), "a full scan:\n{plan}");
    }
}

#[tokio::test]
async fn jobs_survive_reopening_the_file() {
    let url = fresh_url();
    let id = {
        let b = connect(&url).await;
        JobManager::new(b)
            .enqueue(Task::ok("durable"))
            .await
            .expect("enqueue")
    };
    let b = connect(&url).await;
    assert!(b.capabilities().durable);
    let rec = Recorder::new();
    JobServer::builder(b.clone())
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(backline_testkit::fast_config())
        .build()
        .expect("server")
        .run_until_idle()
        .await
        .expect("drain");
    assert_eq!(rec.events().len(), 1);
    assert_eq!(rec.events()[0].id, id);
}

#[tokio::test]
async fn an_in_memory_database_works_and_says_it_is_not_durable() {
    let b = connect("sqlite::memory:").await;
    assert!(!b.capabilities().durable);
    let manager = JobManager::new(b.clone());
    let id = manager
        .enqueue(Task::ok("fleeting"))
        .await
        .expect("enqueue");
    let rec = Recorder::new();
    JobServer::builder(b)
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(backline_testkit::fast_config())
        .build()
        .expect("server")
        .run_until_idle()
        .await
        .expect("drain");
    assert_eq!(rec.events().len(), 1);
    assert_eq!(rec.events()[0].id, id);
}

#[tokio::test]
async fn a_schema_prefix_is_refused_on_sqlite() {
    let r = SqlBackend::connect(SqlConfig::new(fresh_url()).with_table("app.jobs")).await;
    assert!(matches!(r, Err(backline_core::Error::Config(_))), "{r:?}");
}

/// Rows of a table of schema version 1 that no claim can read cost only themselves.
#[tokio::test]
async fn bad_rows_in_an_old_table_cost_only_themselves() {
    let b = support::version_1(&fresh_url(), "backline_jobs").await;
    corrupt::bad_rows_cost_only_themselves(b, Dialect::Sqlite, corrupt::spoiled(Dialect::Sqlite))
        .await;
}

/// The current schema (`STRICT`, with `CHECK`s) refuses the rows that version 1 kept.
#[tokio::test]
async fn the_current_schema_refuses_bad_rows() {
    let b = connect(&fresh_url()).await;
    corrupt::the_schema_refuses_bad_rows(b, Dialect::Sqlite, corrupt::spoiled(Dialect::Sqlite))
        .await;
}

/// Upgrading a table of version 1 with bad rows (a `STRICT` rebuild) loses none and makes each
/// dead with its reason.
#[tokio::test]
async fn the_migration_repairs_bad_rows() {
    let b = support::version_1(&fresh_url(), "backline_jobs").await;
    corrupt::the_migration_repairs_bad_rows(b, Dialect::Sqlite, corrupt::spoiled(Dialect::Sqlite))
        .await;
}
