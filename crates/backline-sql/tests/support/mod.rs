//! What the PostgreSQL and MySQL test binaries share: the server's URL, a reachability probe
//! that also drops tables left by old runs, a fresh table per test, and the conformance
//! harness. Each test binary compiles this module on its own and uses a part of it.
#![allow(dead_code)]

pub(crate) mod corrupt;
pub(crate) mod fixture;

use std::sync::{Arc, Mutex};

use backline_core::Backend;
use backline_sql::{SqlBackend, SqlConfig};

/// A database server of the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Db {
    /// `BACKLINE_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`.
    Postgres,
    /// `BACKLINE_MYSQL_URL`, default `mysql://root@127.0.0.1:3306/test`.
    Mysql,
}

impl Db {
    /// The server's URL from the environment, or the loopback default.
    pub(crate) fn url(self) -> String {
        self.service().url()
    }

    fn label(self) -> &'static str {
        match self {
            Db::Postgres => "PostgreSQL",
            Db::Mysql => "MySQL",
        }
    }

    /// The testkit's description of this server.
    pub(crate) fn service(self) -> backline_testkit::service::Service {
        match self {
            Db::Postgres => backline_testkit::service::POSTGRES,
            Db::Mysql => backline_testkit::service::MYSQL,
        }
    }

    /// Whether the server answers (probed once per test process, by the testkit); drops test
    /// tables left over by runs more than an hour old. Without a server, a loud notice and
    /// `false`, or a panic under `BACKLINE_REQUIRE_SERVICES=1`.
    pub(crate) async fn reachable(self) -> bool {
        self.service()
            .reachable(|url| async move {
                let config = SqlConfig::new(url)
                    .with_table("backline_t_probe")
                    .with_max_connections(1)
                    .with_migrate_on_connect(false)
                    .with_connect_timeout(std::time::Duration::from_secs(5));
                let b = SqlBackend::connect(config).await?;
                self.drop_old_tables(&b).await;
                Ok::<_, backline_core::Error>(())
            })
            .await
    }

    /// Drops the `backline_t_<unix seconds>_…` tables older than an hour, and their migration
    /// records.
    async fn drop_old_tables(self, b: &SqlBackend) {
        let cutoff = chrono::Utc::now().timestamp() - 3600;
        let old = |tables: Vec<String>| -> Vec<String> {
            tables
                .into_iter()
                .filter(|t| {
                    t.strip_prefix("backline_t_")
                        .and_then(|r| r.split('_').next())
                        .and_then(|s| s.parse::<i64>().ok())
                        .is_some_and(|s| s < cutoff)
                })
                .collect()
        };
        match self {
            Db::Postgres => {
                let Some(pool) = b.pg_pool() else { return };
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'backline\\_t\\_%'",
                )
                .fetch_all(pool)
                .await
                .unwrap_or_default();
                for t in old(tables) {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}")))
                        .execute(pool)
                        .await;
                    let _ = sqlx::query("DELETE FROM backline_migrations WHERE table_name = $1")
                        .bind(&t)
                        .execute(pool)
                        .await;
                }
            }
            Db::Mysql => {
                let Some(pool) = b.mysql_pool() else { return };
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT CAST(table_name AS CHAR) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name LIKE 'backline\\_t\\_%'",
                )
                .fetch_all(pool)
                .await
                .unwrap_or_default();
                for t in old(tables) {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}")))
                        .execute(pool)
                        .await;
                    let _ = sqlx::query("DELETE FROM backline_migrations WHERE table_name = ?")
                        .bind(&t)
                        .execute(pool)
                        .await;
                }
            }
        }
    }

    /// A backend on `table` (migrated on connect), with a pool of 5.
    pub(crate) async fn connect(self, table: &str) -> SqlBackend {
        SqlBackend::connect(
            SqlConfig::new(self.url())
                .with_table(table)
                .with_max_connections(5),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connect to {}: {}",
                self.label(),
                backline_core::ErrorChain(&e)
            )
        })
    }

    /// The conformance harness, if the server answers.
    pub(crate) async fn harness(self) -> Option<SqlHarness> {
        self.reachable().await.then(|| SqlHarness {
            db: self,
            table: Mutex::new(None),
        })
    }
}

/// A table name no other test uses: `backline_t_<unix seconds>_<random>`.
pub(crate) fn fresh_table() -> String {
    format!(
        "backline_t_{}_{:08x}",
        chrono::Utc::now().timestamp(),
        fastrand::u32(..)
    )
}

/// A fresh table per backend; `twin` opens a second pool on the same table.
pub(crate) struct SqlHarness {
    db: Db,
    table: Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl backline_testkit::Harness for SqlHarness {
    async fn write_raw(
        &self,
        _backend: &Arc<dyn Backend>,
        statement: &str,
    ) -> backline_core::Result<()> {
        let table = self
            .table
            .lock()
            .expect("harness lock")
            .clone()
            .expect("backend() before write_raw()");
        corrupt::raw_exec(&self.db.connect(&table).await, statement).await
    }

    async fn backend(&self) -> Arc<dyn Backend> {
        let table = fresh_table();
        let b = self.db.connect(&table).await;
        *self.table.lock().expect("harness lock") = Some(table);
        Arc::new(b)
    }

    async fn twin(&self, _backend: &Arc<dyn Backend>) -> Arc<dyn Backend> {
        let table = self
            .table
            .lock()
            .expect("harness lock")
            .clone()
            .expect("backend() before twin()");
        Arc::new(self.db.connect(&table).await)
    }
}

/// A job enqueued in a rolled-back transaction leaves nothing; one enqueued in a committed
/// transaction is invisible to others until the commit, then there.
pub(crate) async fn rolled_back_and_committed<DB>(b: &SqlBackend, pool: &sqlx::Pool<DB>)
where
    DB: sqlx::Database,
    DB::Connection: backline_sql::EnqueueConnection,
{
    use backline_core::{EnqueueOptions, JobManager};
    use backline_testkit::Task;

    let manager = JobManager::new(b.clone());
    let mut tx = pool.begin().await.expect("begin");
    let job = manager
        .prepare(&Task::ok("rolled back"), EnqueueOptions::new())
        .expect("prepare");
    let gone = b.enqueue_in(&mut *tx, job).await.expect("enqueue in tx");
    tx.rollback().await.expect("rollback");
    assert!(manager.get(gone).await.expect("get").is_none());

    let mut tx = pool.begin().await.expect("begin");
    let job = manager
        .prepare(&Task::ok("committed"), EnqueueOptions::new())
        .expect("prepare");
    let kept = b.enqueue_in(&mut *tx, job).await.expect("enqueue in tx");
    // Not visible to others before the commit.
    assert!(manager.get(kept).await.expect("get").is_none());
    tx.commit().await.expect("commit");
    assert!(manager.get(kept).await.expect("get").is_some());
    assert_eq!(manager.counts(None).await.expect("counts").total(), 1);
}

/// Enqueues 10,000 ready jobs in batches, then refreshes the table's statistics (`ANALYZE`),
/// so that a plan read afterwards is the one a busy queue gets.
pub(crate) async fn fill_and_analyze(b: &SqlBackend, analyze: &str) {
    let manager = backline_core::JobManager::new(b.clone());
    for chunk in 0..10 {
        manager
            .enqueue_batch((0..1000).map(|i| backline_testkit::Task::ok(format!("{chunk}-{i}"))))
            .await
            .expect("enqueue");
    }
    let sql = format!("{analyze} {}", b.table());
    let done = match (b.pg_pool(), b.mysql_pool()) {
        (Some(pool), _) => sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .map(|_| ()),
        (None, Some(pool)) => sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .map(|_| ()),
        (None, None) => Ok(()),
    };
    done.expect("analyze");
}

/// A backend on a fresh table of schema version 1 (as a deployment that has not upgraded yet
/// has), for the tests of rows that break the later constraints.
pub(crate) async fn version_1(url: &str, table: &str) -> SqlBackend {
    let b = SqlBackend::connect(
        SqlConfig::new(url)
            .with_table(table)
            .with_max_connections(5)
            .with_migrate_on_connect(false),
    )
    .await
    .expect("connect");
    b.migrate_to(1).await.expect("migrate to version 1");
    b
}

/// `enqueue_in` checks a job as `JobManager` does, the payload limit included: a job over
/// [`SqlConfig::with_max_payload`] is refused before anything is written, and the transaction
/// stays usable.
pub(crate) async fn an_oversized_job_is_refused_in_a_transaction<DB>(
    b: &SqlBackend,
    pool: &sqlx::Pool<DB>,
) where
    DB: sqlx::Database,
    DB::Connection: backline_sql::EnqueueConnection,
{
    use backline_core::{EnqueueOptions, Error, JobManager};
    use backline_testkit::Task;

    // A manager with a larger limit prepares it; the backend's own limit (1 MiB) refuses it.
    let manager = JobManager::new(b.clone()).with_max_payload(4 << 20);
    let big = manager
        .prepare(
            &Task::new("big", backline_testkit::Action::Pad("x".repeat(2 << 20))),
            EnqueueOptions::new(),
        )
        .expect("prepare");
    let small = manager
        .prepare(&Task::ok("small"), EnqueueOptions::new())
        .expect("prepare");
    let mut tx = pool.begin().await.expect("begin");
    let e = b
        .enqueue_batch_in(&mut *tx, vec![small.clone(), big])
        .await
        .expect_err("an oversized payload is refused");
    assert!(matches!(e, Error::PayloadTooLarge { .. }), "got {e}");
    let kept = b
        .enqueue_in(&mut *tx, small)
        .await
        .expect("the transaction goes on");
    tx.commit().await.expect("commit");
    assert!(manager.get(kept).await.expect("get").is_some());
    assert_eq!(
        manager.counts(None).await.expect("counts").total(),
        1,
        "only the small job"
    );
}
