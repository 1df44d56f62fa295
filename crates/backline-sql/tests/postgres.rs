//! The conformance suite and the PostgreSQL-specific tests, against a real server
//! (`BACKLINE_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! Each test gets its own table, so the tests run in parallel. Without a server the tests
//! print a loud notice and pass, unless `BACKLINE_REQUIRE_SERVICES=1`.

mod group;
mod support;

use support::corrupt::{self, Dialect};

use backline_core::{EnqueueOptions, Error, JobManager};
use backline_sql::{sqlx, PlanMode, SqlBackend, SqlConfig};
use backline_testkit::Task;
use support::{fixture, fresh_table, Db};

const DB: Db = Db::Postgres;

fn url() -> String {
    DB.url()
}

async fn reachable() -> bool {
    DB.reachable().await
}

async fn connect(table: &str) -> SqlBackend {
    DB.connect(table).await
}

backline_testkit::conformance!(match DB.harness().await {
    Some(h) => h,
    None => return,
});

group::group_commit_tests!(if reachable().await {
    Some(connect(&fresh_table()).await)
} else {
    None
});

#[tokio::test]
async fn a_rolled_back_transaction_leaves_no_job() {
    if !reachable().await {
        return;
    }
    let b = connect(&fresh_table()).await;
    let pool = b.pg_pool().expect("postgres").clone();
    support::rolled_back_and_committed(&b, &pool).await;
}

#[tokio::test]
async fn an_oversized_job_is_refused_in_a_transaction() {
    if !reachable().await {
        return;
    }
    let b = connect(&fresh_table()).await;
    let pool = b.pg_pool().expect("postgres").clone();
    support::an_oversized_job_is_refused_in_a_transaction(&b, &pool).await;
}

#[tokio::test]
async fn the_claim_reads_the_claim_index_without_sorting() {
    if !reachable().await {
        return;
    }
    let b = connect(&fresh_table()).await;
    support::fill_and_analyze(&b, "ANALYZE").await;
    let plan = b
        .explain_claim("default", &["testkit.task".to_owned()])
        .await
        .expect("explain");
    assert!(
        plan.contains(&b.claim_index_name()),
        "the claim does not read {}:\n{plan}",
        b.claim_index_name()
    );
    assert!(!plan.contains("Sort"), "the claim sorts:\n{plan}");
    assert!(
        !plan.contains("Seq Scan"),
        "the claim scans the whole table:\n{plan}"
    );
}

/// The batched finish finds its jobs through the primary key, also in the generic plan a
/// prepared statement settles on: not through the partial lease index (whose dead entries pile
/// up during a drain) and never by a scan of the table, so a drain keeps its rate at any depth.
#[tokio::test]
async fn the_finish_finds_jobs_through_the_primary_key() {
    if !reachable().await {
        return;
    }
    let b = connect(&fresh_table()).await;
    support::fill_and_analyze(&b, "ANALYZE").await;
    let plan = b.explain_finish().await.expect("explain");
    let name = b.table().name().to_owned();
    assert!(
        plan.contains(&format!("{name}_pkey")),
        "the finish does not use the primary key:\n{plan}"
    );
    assert!(
        !plan.contains(&format!("{name}_lease")),
        "the finish reads the lease index:\n{plan}"
    );
    assert!(
        !plan.contains("Seq Scan"),
        "the finish scans the whole table:\n{plan}"
    );
}

/// A fresh table that autovacuum may not analyze (a no-op where it is off globally, as on the
/// test machines), filled in every state; asserts that it has no statistics.
async fn never_analyzed() -> SqlBackend {
    let b = connect(&fresh_table()).await;
    let pool = b.pg_pool().expect("postgres").clone();
    let t = b.table().qualified();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {t} SET (autovacuum_enabled = false)"
    )))
    .execute(&pool)
    .await
    .expect("autovacuum off");
    fixture::fill_every_state(&b).await;
    let analyzed: (f32, i64) = sqlx::query_as(
        "SELECT reltuples, (SELECT count(*) FROM pg_stats WHERE schemaname || '.' || tablename = $2 OR tablename = $2)
        FROM pg_class WHERE oid = $1::regclass",
    )
    .bind(&t)
    .bind(&t)
    .fetch_one(&pool)
    .await
    .expect("read pg_class");
    assert_eq!(analyzed, (-1.0, 0), "{t} has statistics");
    b
}

fn assert_claim_plan(b: &SqlBackend, plan: &str) {
    assert!(
        plan.contains(&b.claim_index_name()),
        "the claim does not read {}:\n{plan}",
        b.claim_index_name()
    );
    assert!(!plan.contains("Sort"), "the claim sorts:\n{plan}");
    assert!(
        !plan.contains("Seq Scan"),
        "the claim scans the whole table:\n{plan}"
    );
}

fn assert_finish_plan(b: &SqlBackend, plan: &str) {
    let name = b.table().name().to_owned();
    assert!(
        plan.contains(&format!("{name}_pkey")),
        "the finish does not use the primary key:\n{plan}"
    );
    assert!(
        !plan.contains(&format!("{name}_lease")),
        "the finish reads the lease index:\n{plan}"
    );
    assert!(
        !plan.contains("Seq Scan"),
        "the finish scans the whole table:\n{plan}"
    );
}

fn assert_maintenance_plans(plans: &[(String, String)], mode: PlanMode) {
    for (index, plan) in plans {
        assert!(
            plan.contains(index),
            "{mode:?}: the statement does not read {index}:\n{plan}"
        );
        assert!(!plan.contains("Sort"), "{mode:?}: it sorts:\n{plan}");
        assert!(
            !plan.contains("Seq Scan"),
            "{mode:?}: it scans the whole table:\n{plan}"
        );
    }
}

/// On a table that was never analyzed (a fresh table after a burst of enqueues, or any server
/// where autovacuum is off or behind), the claim still reads the claim index without sorting,
/// in the generic plan a prepared statement settles on and in the custom plans of its first
/// runs, and the finish still finds its jobs through the primary key in the generic plan. (The
/// finish's custom plan sees the length of its id array and may rightly prefer one pass over a
/// table to 100 index probes; it is made for a connection's first five runs only.)
#[tokio::test]
async fn without_statistics_the_claim_and_the_finish_keep_their_plans() {
    if !reachable().await {
        return;
    }
    let b = never_analyzed().await;
    for mode in [PlanMode::Generic, PlanMode::Custom] {
        let (claim, finish) = fixture::claim_and_finish(&b, mode).await;
        assert_claim_plan(&b, &claim);
        if mode == PlanMode::Generic {
            assert_finish_plan(&b, &finish);
        }
    }
}

/// Promotion, lease recovery and retention read their partial index in its order and stop
/// after the batch, with statistics or without, in generic and custom plans: never a sort of
/// every due, expired or old row.
#[tokio::test]
async fn maintenance_reads_its_indexes_in_order_with_or_without_statistics() {
    if !reachable().await {
        return;
    }
    let b = never_analyzed().await;
    for mode in [PlanMode::Generic, PlanMode::Custom] {
        assert_maintenance_plans(&fixture::maintenance(&b, mode).await, mode);
    }
    let pool = b.pg_pool().expect("postgres").clone();
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {}", b.table())))
        .execute(&pool)
        .await
        .expect("analyze");
    for mode in [PlanMode::Generic, PlanMode::Custom] {
        assert_maintenance_plans(&fixture::maintenance(&b, mode).await, mode);
        let (claim, finish) = fixture::claim_and_finish(&b, mode).await;
        assert_claim_plan(&b, &claim);
        if mode == PlanMode::Generic {
            assert_finish_plan(&b, &finish);
        }
    }
}

#[tokio::test]
async fn a_table_name_that_could_inject_sql_is_refused() {
    for bad in [
        "jobs; DROP TABLE users",
        "jobs--",
        "\"jobs\"",
        "a.b.c",
        "Jobs",
    ] {
        let r = SqlBackend::connect(SqlConfig::new(url()).with_table(bad)).await;
        assert!(
            matches!(r, Err(Error::Config(_))),
            "{bad:?} was not refused: {r:?}"
        );
    }
}

#[tokio::test]
async fn a_connection_error_names_the_operation_and_hides_the_password() {
    let r = SqlBackend::connect(
        SqlConfig::new("postgres://someone:hunter2@127.0.0.1:1/test")
            .with_connect_timeout(std::time::Duration::from_secs(2)),
    )
    .await;
    match r {
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

/// A job enqueued in a transaction wakes an idle server when the transaction commits
/// (`pg_notify` in the same transaction): nothing else would, with hour-long polls.
#[tokio::test]
async fn a_committed_transactional_enqueue_wakes_an_idle_server() {
    if !reachable().await {
        return;
    }
    let b = connect(&fresh_table()).await;
    let manager = JobManager::new(b.clone());
    let rec = backline_testkit::Recorder::new();
    let running = backline_core::JobServer::builder(b.clone())
        .register(backline_testkit::TaskHandler::<Task>::new(rec.clone()))
        .config(backline_testkit::fast_config())
        .configure(|c| {
            c.poll_interval = std::time::Duration::from_secs(3600);
            c.maintenance_interval = std::time::Duration::from_secs(3600);
        })
        .build()
        .expect("server")
        .start();
    // The first job proves the server is up and has gone idle after it.
    let first = manager.enqueue(Task::ok("first")).await.expect("enqueue");
    rec.wait_for_attempts(1).await;
    let pool = b.pg_pool().expect("postgres").clone();
    let mut tx = pool.begin().await.expect("begin");
    let job = manager
        .prepare(&Task::ok("in a transaction"), EnqueueOptions::new())
        .expect("prepare");
    let id = b.enqueue_in(&mut *tx, job).await.expect("enqueue in tx");
    tx.commit().await.expect("commit");
    let events = rec.wait_for_attempts(2).await;
    running.shutdown().await.expect("shutdown");
    assert_eq!((events[0].id, events[1].id), (first, id));
}

/// Rows of a table of schema version 1 that no claim can read cost only themselves.
#[tokio::test]
async fn bad_rows_in_an_old_table_cost_only_themselves() {
    if !Db::Postgres.reachable().await {
        return;
    }
    let b = support::version_1(&Db::Postgres.url(), &support::fresh_table()).await;
    corrupt::bad_rows_cost_only_themselves(
        b,
        Dialect::Postgres,
        corrupt::spoiled(Dialect::Postgres),
    )
    .await;
}

/// The current schema refuses the rows that version 1 kept.
#[tokio::test]
async fn the_current_schema_refuses_bad_rows() {
    if !Db::Postgres.reachable().await {
        return;
    }
    let b = Db::Postgres.connect(&support::fresh_table()).await;
    corrupt::the_schema_refuses_bad_rows(b, Dialect::Postgres, corrupt::spoiled(Dialect::Postgres))
        .await;
}

/// Upgrading a table of version 1 with bad rows loses none and makes each dead with its reason.
#[tokio::test]
async fn the_migration_repairs_bad_rows() {
    if !Db::Postgres.reachable().await {
        return;
    }
    let b = support::version_1(&Db::Postgres.url(), &support::fresh_table()).await;
    corrupt::the_migration_repairs_bad_rows(
        b,
        Dialect::Postgres,
        corrupt::spoiled(Dialect::Postgres),
    )
    .await;
}
