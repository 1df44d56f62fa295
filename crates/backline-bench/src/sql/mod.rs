//! The SQL providers (`backline-sql` on PostgreSQL, SQLite and MySQL/MariaDB): a fresh table
//! per run, and the server's raw limit in plain SQL through sqlx on the same server and the
//! same table layout, in the same run.
//!
//! Raw loops, each on a fresh table filled with the run's jobs by Backline (not timed):
//!
//! - PostgreSQL: the claim CTE (`WITH picked AS MATERIALIZED (… FOR UPDATE SKIP LOCKED)
//!   UPDATE … FROM picked`) plus one batched completion `UPDATE` (rows kept), on one connection
//!   with the drain's claim batch and on four connections with batches of 500; and a
//!   claim-and-delete loop (`… DELETE … USING picked RETURNING id, payload`).
//! - MySQL/MariaDB: `SELECT id … FORCE INDEX (claim index, priority DESC) … FOR UPDATE SKIP
//!   LOCKED` then `DELETE` (or `UPDATE`) of those ids, in one `READ COMMITTED` transaction per
//!   batch, at several batch sizes and connection counts; plus Backline's own drain with a
//!   larger claim batch and with two servers (two claim loops), to find the best strategy.
//! - SQLite: WAL, `synchronous=FULL` (Backline's writer connection), claim + complete of a
//!   batch in one `BEGIN IMMEDIATE` transaction, in a loop.
//!
//! And the limits of one-by-one enqueue, on an empty fresh table, with the rows Backline's
//! enqueue of [`Noop`] writes (the same columns, payload and indexes), one job per commit:
//!
//! - PostgreSQL: a single-row `INSERT` from 32 connections, and the same `INSERT` with a
//!   `NOTIFY` on Backline's channel in its transaction (one statement each), from 32
//!   connections;
//! - SQLite: a single-row `INSERT` in its own `BEGIN IMMEDIATE` transaction, one after the
//!   other on Backline's writer connection;
//! - MySQL/MariaDB: a single-row `INSERT` (autocommit) from 32 connections.

mod raw_loops;
mod single;

use raw_loops::*;
use single::*;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backline_core::{Backend, JobArgs, DEFAULT_QUEUE};
use backline_sql::sqlx::{self, AssertSqlSafe};
use backline_sql::{SqlBackend, SqlConfig};
use tokio::task::JoinSet;

use crate::measure::{drain, fewer_runs, fill, Drain, Noop};
use crate::report::{Row, Unit};
use crate::{Plan, Result};

/// A SQL database under benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Db {
    /// PostgreSQL.
    Postgres,
    /// A SQLite file under `target/bench/`.
    Sqlite,
    /// MySQL or MariaDB.
    Mysql,
}

/// The lease token the raw loops write (any value: only their own rows carry it).
const TOKEN: i64 = 0x0062_656e_6368;

impl Db {
    /// The server's URL (environment first, then the machines' loopback default).
    fn url(self, file: &str) -> String {
        let env = |key: &str, default: &str| std::env::var(key).unwrap_or_else(|_| default.into());
        match self {
            Db::Postgres => env(
                "BACKLINE_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
            Db::Mysql => env("BACKLINE_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
            Db::Sqlite => format!("sqlite://{}", sqlite_file(file).display()),
        }
    }
}

/// The SQLite file of table `name`.
fn sqlite_file(name: &str) -> PathBuf {
    crate::out_dir().join(format!("{name}.db"))
}

/// A table name no other run uses: `backline_bench_<unix seconds>_<pid>_<counter>`.
fn unique_table() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "backline_bench_{secs}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The PostgreSQL pool and qualified name of the latest fresh table (runs are sequential).
static PG_CURRENT: std::sync::Mutex<Option<(sqlx::PgPool, String)>> = std::sync::Mutex::new(None);

/// After a fill (not timed): `ANALYZE` the latest fresh PostgreSQL table, as autovacuum would
/// soon after a bulk insert where it runs. Backline's plans no longer depend on it (issue 11:
/// without statistics the planner used to take a `(queue, state)` index and sort every ready
/// row on each claim, 100k queued drained at ~3.4k jobs/s); the row "drain of 100,000 on a table
/// never analyzed" ([`never_analyze`]) measures the same drain without it. Measured with six
/// alternating runs of the baseline and the change (`--runs 1`, a loaded shared machine):
/// analyzed drain at concurrency 256 median 31.3k jobs/s (22.2k-53.0k) before, 38.8k
/// (19.1k-44.2k) after; never analyzed, after, 47.2k (14.8k-50.7k), and in each run within
/// the analyzed row's spread. Before the change the never-analyzed drain ran at 3.4k-3.5k
/// jobs/s (two runs) against 18k-20k analyzed in the same runs.
pub(crate) async fn after_fill() -> Result<()> {
    let current = PG_CURRENT.lock().ok().and_then(|c| c.clone());
    if let Some((pool, table)) = current {
        sqlx::query(AssertSqlSafe(format!("ANALYZE {table}")))
            .execute(&pool)
            .await?;
    }
    Ok(())
}

/// Before a fill (not timed): turns autovacuum off for the latest fresh PostgreSQL table, so
/// that it keeps no statistics where autovacuum runs (on the test machines it is off anyway).
pub(crate) async fn never_analyze() -> Result<()> {
    let current = PG_CURRENT.lock().ok().and_then(|c| c.clone());
    if let Some((pool, table)) = current {
        sqlx::query(AssertSqlSafe(format!(
            "ALTER TABLE {table} SET (autovacuum_enabled = false)"
        )))
        .execute(&pool)
        .await?;
    }
    Ok(())
}

/// A backend on a table made for one run; [`FreshTable::dispose`] drops it.
pub(crate) struct FreshTable {
    /// The backend on the fresh table.
    pub(crate) backend: SqlBackend,
    db: Db,
    name: String,
}

impl FreshTable {
    /// Connects to `db` with a new, migrated table.
    pub(crate) async fn create(db: Db) -> Result<FreshTable> {
        let name = unique_table();
        if db == Db::Sqlite {
            std::fs::create_dir_all(crate::out_dir())?;
        }
        let url = db.url(&name);
        let config = SqlConfig::new(url.clone())
            .with_table(name.clone())
            .with_connect_timeout(Duration::from_secs(5));
        let backend = SqlBackend::connect(config).await.map_err(|e| {
            format!(
                "cannot reach {} ({e}); start it (`cargo xtask services up`) or set its URL",
                backline_core::redact_url(&url)
            )
        })?;
        if let Some(pool) = backend.pg_pool() {
            if let Ok(mut current) = PG_CURRENT.lock() {
                *current = Some((pool.clone(), backend.table().qualified()));
            }
        }
        Ok(FreshTable { backend, db, name })
    }

    /// The table's name, as in SQL.
    fn table(&self) -> String {
        self.backend.table().qualified()
    }

    /// The backend as the measurements take it.
    fn dyn_backend(&self) -> Arc<dyn Backend> {
        Arc::new(self.backend.clone())
    }

    /// Drops the table, its locks table and its migration record (on SQLite: the file).
    pub(crate) async fn dispose(self) {
        if let Ok(mut current) = PG_CURRENT.lock() {
            *current = None;
        }
        let t = self.table();
        let drop_sql = AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}, {t}_locks"));
        let result = match self.db {
            Db::Postgres => match self.backend.pg_pool() {
                Some(pool) => {
                    let a = sqlx::query(drop_sql).execute(pool).await.map(|_| ());
                    let b = sqlx::query("DELETE FROM backline_migrations WHERE table_name = $1")
                        .bind(&self.name)
                        .execute(pool)
                        .await
                        .map(|_| ());
                    a.and(b)
                }
                None => Ok(()),
            },
            Db::Mysql => match self.backend.mysql_pool() {
                Some(pool) => {
                    let a = sqlx::query(drop_sql).execute(pool).await.map(|_| ());
                    let b = sqlx::query("DELETE FROM backline_migrations WHERE table_name = ?")
                        .bind(&self.name)
                        .execute(pool)
                        .await
                        .map(|_| ());
                    a.and(b)
                }
                None => Ok(()),
            },
            Db::Sqlite => {
                if let Some(pool) = self.backend.sqlite_pool() {
                    pool.close().await;
                }
                let file = sqlite_file(&self.name);
                for suffix in ["", "-wal", "-shm"] {
                    let mut path = file.clone().into_os_string();
                    path.push(suffix);
                    let _ = std::fs::remove_file(path);
                }
                Ok(())
            }
        };
        if let Err(e) = result {
            eprintln!("  warning: cannot drop bench table {t}: {e}");
        }
    }
}

/// The raw rows of `db` (and, on MySQL, Backline's drain in other claim shapes); each run on a
/// fresh table, dropped after it.
pub(crate) async fn raw_rows(db: Db, plan: &Plan) -> Result<Vec<Row>> {
    let n = plan.jobs;
    let mut rows = single_rows(db, plan).await?;
    for (i, raw) in raws(db, plan).into_iter().enumerate() {
        if !plan.wants(&raw.id(db)) {
            continue;
        }
        // The main raw rows (the limits the drain is compared with) get every run.
        let main = i == 0 || (db == Db::Postgres && i <= 2);
        let times = if main { plan.runs } else { 1 };
        let mut runs = Vec::with_capacity(times);
        for _ in 0..times {
            runs.push(raw.run(db, n).await?);
        }
        rows.push(Row::new(
            raw.id(db),
            format!("{}{}", raw.label(db), fewer_runs(plan, times)),
            n,
            Unit::JobsPerSecond,
            runs,
        ));
    }
    if db == Db::Mysql && plan.wants("drain_c") {
        rows.extend(mysql_variants(plan).await?);
    }
    Ok(rows)
}

/// Backline's own MySQL drain in other shapes: a larger claim batch, and two servers (two
/// claim loops, as two processes would run) on one table. One run each.
async fn mysql_variants(plan: &Plan) -> Result<Vec<Row>> {
    let n = plan.jobs;
    let c = plan.concurrencies.iter().copied().max().unwrap_or(256);
    let shapes = [
        (
            format!("drain_c{c}_x2_servers"),
            format!("drain, 2 servers × concurrency {c}"),
            Drain {
                servers: 2,
                ..Drain::new(c)
            },
        ),
        (
            "drain_c1000".to_owned(),
            "drain, concurrency 1000, claim batch 1000".to_owned(),
            Drain::new(1_000),
        ),
    ];
    let mut rows = Vec::new();
    for (id, label, shape) in shapes {
        let fresh = FreshTable::create(Db::Mysql).await?;
        let result = drain(fresh.dyn_backend(), n, shape).await;
        fresh.dispose().await;
        rows.push(Row::new(
            id,
            format!("{label}{}", fewer_runs(plan, 1)),
            n,
            Unit::JobsPerSecond,
            vec![result?],
        ));
    }
    Ok(rows)
}
