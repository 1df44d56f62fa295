//! The conformance suite and the MySQL/MariaDB-specific tests, against a real server
//! (`BACKLINE_MYSQL_URL`, default `mysql://root@127.0.0.1:3306/test`).
//!
//! Each test gets its own table, so the tests run in parallel. Without a server the tests
//! print a loud notice and pass, unless `BACKLINE_REQUIRE_SERVICES=1`.

mod group;
mod support;

use support::corrupt::{self, Dialect};

use backline_core::Error;
use backline_sql::{sqlx, PlanMode, SqlBackend, SqlConfig};
use support::{fixture, fresh_table, Db};

const DB: Db = Db::Mysql;

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
    let pool = b.mysql_pool().expect("mysql").clone();
    support::rolled_back_and_committed(&b, &pool).await;
}

#[tokio::test]
async fn an_oversized_job_is_refused_in_a_transaction() {
    if !reachable().await {
        return;
    }
    let b = connect(&fresh_table()).await;
    let pool = b.mysql_pool().expect("mysql").clone();
    support::an_oversized_job_is_refused_in_a_transaction(&b, &pool).await;
}

#[tokio::test]
async fn the_claim_reads_the_claim_index_without_sorting() {
    if !reachable().await {
        return;
    }
    let b = connect(&fresh_table()).await;
    support::fill_and_analyze(&b, "ANALYZE TABLE").await;
    let plan = b
        .explain_claim("default", &["testkit.task".to_owned()])
        .await
        .expect("explain");
    assert!(
        plan.contains(&b.claim_index_name()),
        "the claim does not read {}:\n{plan}",
        b.claim_index_name()
    );
    assert!(!plan.contains("filesort"), "the claim sorts:\n{plan}");
}

/// The claim reads the claim index without a filesort, the finish reads the claimed rows
/// through the primary key, and promotion, lease recovery and retention read their index in
/// its order: on a freshly filled table (whose persistent statistics describe it as it was
/// when it was small) and after `ANALYZE TABLE`. Each statement names its index, so neither
/// state of the statistics can move it to a filesort or a full scan.
#[tokio::test]
async fn with_or_without_fresh_statistics_every_statement_keeps_its_plan() {
    if !reachable().await {
        return;
    }
    let b = connect(&fresh_table()).await;
    fixture::fill_every_state(&b).await;
    assert_plans(&b).await;
    let pool = b.mysql_pool().expect("mysql").clone();
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE TABLE {}", b.table())))
        .execute(&pool)
        .await
        .expect("analyze");
    assert_plans(&b).await;
}

async fn assert_plans(b: &SqlBackend) {
    let (claim, finish) = fixture::claim_and_finish(b, PlanMode::Generic).await;
    assert!(
        claim.contains(&format!("key={}", b.claim_index_name())),
        "the claim does not read {}:\n{claim}",
        b.claim_index_name()
    );
    assert!(!claim.contains("filesort"), "the claim sorts:\n{claim}");
    assert!(
        finish.contains("key=PRIMARY"),
        "the finish does not read the primary key:\n{finish}"
    );
    for (index, plan) in fixture::maintenance(b, PlanMode::Generic).await {
        assert!(
            plan.contains(&format!("key={index}")),
            "the statement does not read {index}:\n{plan}"
        );
        assert!(!plan.contains("filesort"), "it sorts:\n{plan}");
    }
    for plan in [claim, finish] {
        assert!(!plan.contains("type=ALL "), "a full scan:\n{plan}");
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
        SqlConfig::new("mysql://someone:hunter2@127.0.0.1:1/test")
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

/// Rows of a table of schema version 1 that no claim can read cost only themselves.
#[tokio::test]
async fn bad_rows_in_an_old_table_cost_only_themselves() {
    if !Db::Mysql.reachable().await {
        return;
    }
    let b = support::version_1(&Db::Mysql.url(), &support::fresh_table()).await;
    corrupt::bad_rows_cost_only_themselves(b, Dialect::Mysql, corrupt::spoiled(Dialect::Mysql))
        .await;
}

/// The current schema refuses the rows that version 1 kept.
#[tokio::test]
async fn the_current_schema_refuses_bad_rows() {
    if !Db::Mysql.reachable().await {
        return;
    }
    let b = Db::Mysql.connect(&support::fresh_table()).await;
    corrupt::the_schema_refuses_bad_rows(b, Dialect::Mysql, corrupt::spoiled(Dialect::Mysql)).await;
}

/// Upgrading a table of version 1 with bad rows loses none and makes each dead with its reason.
#[tokio::test]
async fn the_migration_repairs_bad_rows() {
    if !Db::Mysql.reachable().await {
        return;
    }
    let b = support::version_1(&Db::Mysql.url(), &support::fresh_table()).await;
    corrupt::the_migration_repairs_bad_rows(b, Dialect::Mysql, corrupt::spoiled(Dialect::Mysql))
        .await;
}
