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

/// Times `conns` concurrent loops, each returning how many jobs it completed; fails unless
/// `n` were completed in all; jobs/s.
async fn timed<F, Fut>(n: usize, conns: usize, mut make: F) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<usize>> + Send + 'static,
{
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..conns {
        set.spawn(make());
    }
    let mut done = 0;
    while let Some(r) = set.join_next().await {
        done += r??;
    }
    let took = start.elapsed();
    if done != n {
        return Err(format!("a raw loop completed {done} of {n} jobs").into());
    }
    Ok(n as f64 / took.as_secs_f64().max(1e-9))
}

/// What one raw loop does with a claimed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Complete {
    /// Marks the rows succeeded (rows kept).
    Update,
    /// Deletes them.
    Delete,
}

/// One raw measurement: a fresh table with `n` jobs, then `conns` loops of batches of `batch`.
#[derive(Debug, Clone, Copy)]
struct Raw {
    conns: usize,
    batch: usize,
    complete: Complete,
}

impl Raw {
    fn id(self, db: Db) -> String {
        let what = match (db, self.complete) {
            (Db::Postgres, Complete::Update) => "cte_update",
            (Db::Postgres, Complete::Delete) => "claim_delete",
            (Db::Mysql, Complete::Update) => "select_update",
            (Db::Mysql, Complete::Delete) => "select_delete",
            (Db::Sqlite, Complete::Update) => "claim_complete",
            (Db::Sqlite, Complete::Delete) => "claim_delete",
        };
        format!("raw_{what}_{}x{}", self.conns, self.batch)
    }

    fn label(self, db: Db) -> String {
        let what = match (db, self.complete) {
            (Db::Postgres, Complete::Update) => "CTE claim + UPDATE (kept)",
            (Db::Postgres, Complete::Delete) => "CTE claim-and-delete",
            (Db::Mysql, Complete::Update) => "SKIP LOCKED + UPDATE",
            (Db::Mysql, Complete::Delete) => "SKIP LOCKED + DELETE",
            (Db::Sqlite, Complete::Update) => "claim + complete (kept)",
            (Db::Sqlite, Complete::Delete) => "claim + delete",
        };
        let conns = if self.conns == 1 {
            "1 conn".to_owned()
        } else {
            format!("{} conns", self.conns)
        };
        format!("raw: {what}, {conns} × {}", self.batch)
    }

    /// One run on a fresh table; jobs/s.
    async fn run(self, db: Db, n: usize) -> Result<f64> {
        let fresh = FreshTable::create(db).await?;
        let result = self.run_on(&fresh, n).await;
        fresh.dispose().await;
        result
    }

    async fn run_on(self, fresh: &FreshTable, n: usize) -> Result<f64> {
        fill(&fresh.dyn_backend(), n).await?;
        let t = fresh.table();
        let batch = i64::try_from(self.batch)?;
        match fresh.db {
            Db::Postgres => {
                let pool = fresh.backend.pg_pool().ok_or("not PostgreSQL")?.clone();
                let (claim, complete) = pg_sql(&t, self.complete);
                timed(n, self.conns, || {
                    pg_loop(pool.clone(), claim.clone(), complete.clone(), batch)
                })
                .await
            }
            Db::Mysql => {
                let pool = fresh.backend.mysql_pool().ok_or("not MySQL")?.clone();
                let index = fresh.backend.claim_index_name();
                let select: Arc<str> = format!(
                    "SELECT id FROM {t} FORCE INDEX ({index})
                    WHERE state = 'ready' AND queue = ? AND name = ?
                    ORDER BY priority DESC, run_at, id
                    LIMIT ?
                    FOR UPDATE SKIP LOCKED"
                )
                .into();
                let complete = self.complete;
                timed(n, self.conns, || {
                    mysql_loop(pool.clone(), t.clone(), select.clone(), complete, batch)
                })
                .await
            }
            Db::Sqlite => {
                let pool = fresh.backend.sqlite_pool().ok_or("not SQLite")?.clone();
                let claim: Arc<str> = format!(
                    "UPDATE {t} SET state = 'running', attempt = attempt + 1, lease_token = ?1,
                        lease_until = ?2
                    WHERE id IN (SELECT id FROM {t}
                        WHERE state = 'ready' AND queue = ?3 AND name = ?4
                        ORDER BY priority DESC, run_at, id
                        LIMIT ?5)
                    RETURNING id"
                )
                .into();
                let complete = self.complete;
                timed(n, self.conns, || {
                    sqlite_loop(pool.clone(), t.clone(), claim.clone(), complete, batch)
                })
                .await
            }
        }
    }
}

/// PostgreSQL's claim statement and the completion statement of one raw loop.
fn pg_sql(t: &str, complete: Complete) -> (Arc<str>, Arc<str>) {
    let picked = format!(
        "WITH picked AS MATERIALIZED (
            SELECT id FROM {t}
            WHERE state = 'ready' AND queue = $1 AND name = $2
            ORDER BY priority DESC, run_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        )"
    );
    match complete {
        Complete::Update => (
            format!(
                "{picked}
                UPDATE {t} AS j
                SET state = 'running', attempt = j.attempt + 1, lease_token = $4,
                    lease_until = now() + interval '30 seconds'
                FROM picked WHERE j.id = picked.id
                RETURNING j.id"
            )
            .into(),
            format!(
                "UPDATE {t} SET state = 'succeeded', finished_at = now(), lease_token = NULL,
                    lease_until = NULL
                WHERE id = ANY($1::uuid[]) AND lease_token = $2 AND state = 'running'"
            )
            .into(),
        ),
        Complete::Delete => (
            format!(
                "{picked}
                DELETE FROM {t} AS j USING picked
                WHERE j.id = picked.id AND $4::int8 IS NOT NULL
                RETURNING j.id, j.payload"
            )
            .into(),
            "".into(),
        ),
    }
}

/// Claims and completes (or claims and deletes) until nothing is left; jobs completed.
async fn pg_loop(
    pool: sqlx::PgPool,
    claim: Arc<str>,
    complete: Arc<str>,
    batch: i64,
) -> Result<usize> {
    use sqlx::Row as _;
    let mut done = 0;
    loop {
        let rows = sqlx::query(AssertSqlSafe(claim.clone()))
            .bind(DEFAULT_QUEUE)
            .bind(Noop::NAME)
            .bind(batch)
            .bind(TOKEN)
            .fetch_all(&pool)
            .await?;
        if rows.is_empty() {
            return Ok(done);
        }
        if complete.is_empty() {
            done += rows.len();
            continue;
        }
        let ids = rows
            .iter()
            .map(|r| r.try_get::<uuid::Uuid, _>(0))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let r = sqlx::query(AssertSqlSafe(complete.clone()))
            .bind(&ids)
            .bind(TOKEN)
            .execute(&pool)
            .await?;
        done += usize::try_from(r.rows_affected())?;
    }
}

/// `?, ?, …` for `n` values.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `SELECT … FOR UPDATE SKIP LOCKED`, then `DELETE` or `UPDATE` of those ids, in one
/// `READ COMMITTED` transaction per batch (Backline's pool sets the isolation level on every
/// connection), until nothing is left; jobs completed.
async fn mysql_loop(
    pool: sqlx::MySqlPool,
    t: String,
    select: Arc<str>,
    complete: Complete,
    batch: i64,
) -> Result<usize> {
    let mut done = 0;
    loop {
        let mut tx = pool.begin().await?;
        let claimed = sqlx::query_scalar(AssertSqlSafe(select.clone()))
            .bind(DEFAULT_QUEUE)
            .bind(Noop::NAME)
            .bind(batch)
            .fetch_all(&mut *tx)
            .await;
        let ids: Vec<Vec<u8>> = match claimed {
            Ok(ids) => ids,
            Err(e) if is_deadlock(&e) => {
                tx.rollback().await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(done);
        }
        match mysql_complete(&mut tx, &t, ids, complete).await {
            Ok(n) => {
                tx.commit().await?;
                done += n;
            }
            // InnoDB's gap locks can deadlock concurrent claimers: roll back and claim again,
            // as Backline does.
            Err(e) if is_deadlock(&e) => tx.rollback().await?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether a MySQL error is a deadlock or a lock wait timeout (worth a retry).
fn is_deadlock(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40001" || c == "HY000" && e.to_string().contains("1205"))
}

/// Deletes or completes the claimed rows in the claim's transaction; rows changed.
async fn mysql_complete(
    tx: &mut sqlx::Transaction<'static, sqlx::MySql>,
    t: &str,
    ids: Vec<Vec<u8>>,
    complete: Complete,
) -> std::result::Result<usize, sqlx::Error> {
    {
        let sql = match complete {
            Complete::Delete => {
                format!("DELETE FROM {t} WHERE id IN ({})", placeholders(ids.len()))
            }
            Complete::Update => format!(
                "UPDATE {t} SET state = 'succeeded', attempt = attempt + 1,
                    finished_at = UTC_TIMESTAMP(6)
                WHERE id IN ({})",
                placeholders(ids.len())
            ),
        };
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for id in ids {
            q = q.bind(id);
        }
        let r = q.execute(&mut **tx).await?;
        Ok(usize::try_from(r.rows_affected()).unwrap_or(usize::MAX))
    }
}

/// Claim then complete (or delete) a batch in one `BEGIN IMMEDIATE` transaction on
/// Backline's writer connection (WAL, `synchronous=FULL`), until nothing is left.
async fn sqlite_loop(
    pool: sqlx::SqlitePool,
    t: String,
    claim: Arc<str>,
    complete: Complete,
    batch: i64,
) -> Result<usize> {
    let mut done = 0;
    loop {
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_micros(),
        )?;
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let ids: Vec<Vec<u8>> = sqlx::query_scalar(AssertSqlSafe(claim.clone()))
            .bind(TOKEN)
            .bind(now + 30_000_000)
            .bind(DEFAULT_QUEUE)
            .bind(Noop::NAME)
            .bind(batch)
            .fetch_all(&mut *tx)
            .await?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(done);
        }
        let sql = match complete {
            Complete::Delete => {
                format!("DELETE FROM {t} WHERE id IN ({})", placeholders(ids.len()))
            }
            Complete::Update => format!(
                "UPDATE {t} SET state = 'succeeded', finished_at = {now}, lease_token = NULL,
                    lease_until = NULL
                WHERE id IN ({})",
                placeholders(ids.len())
            ),
        };
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for id in ids {
            q = q.bind(id);
        }
        let r = q.execute(&mut *tx).await?;
        tx.commit().await?;
        done += usize::try_from(r.rows_affected())?;
    }
}

/// The raw measurements of `db`; the first is run `plan.runs` times, the others once.
fn raws(db: Db, plan: &Plan) -> Vec<Raw> {
    let b = plan
        .concurrencies
        .iter()
        .max()
        .map_or(100, |c| (*c).min(1_000));
    let r = |conns, batch, complete| Raw {
        conns,
        batch,
        complete,
    };
    use Complete::{Delete, Update};
    match db {
        Db::Postgres => vec![
            r(1, b, Update),
            r(4, 500, Update),
            r(1, b, Delete),
            r(1, 100, Update),
        ],
        Db::Mysql => vec![
            r(1, 100, Delete),
            r(1, 100, Update),
            r(4, 100, Delete),
            r(1, 500, Delete),
            r(4, 500, Delete),
        ],
        Db::Sqlite => vec![r(1, 100, Update), r(1, b, Update), r(1, b, Delete)],
    }
}

/// One-by-one inserts, one job per commit: the limit of one-by-one enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Single {
    /// A single-row `INSERT` per commit.
    Insert,
    /// PostgreSQL: a single-row `INSERT` and a `NOTIFY` per commit.
    InsertNotify,
}

impl Single {
    /// The connections: 32 on the servers, SQLite's one writer.
    fn conns(db: Db, plan: &Plan) -> usize {
        if db == Db::Sqlite {
            1
        } else {
            plan.enqueue_tasks
        }
    }

    fn id(self, db: Db, plan: &Plan) -> String {
        let what = match self {
            Single::Insert if db == Db::Sqlite => "commit",
            Single::Insert => "insert",
            Single::InsertNotify => "insert_notify",
        };
        format!("raw_{what}_c{}", Single::conns(db, plan))
    }

    fn label(self, db: Db, plan: &Plan) -> String {
        let c = Single::conns(db, plan);
        match self {
            Single::Insert if db == Db::Sqlite => {
                "raw: single-row commits, 1 conn (writer)".to_owned()
            }
            Single::Insert => format!("raw: single-row INSERT, {c} conns"),
            Single::InsertNotify => format!("raw: single-row INSERT + NOTIFY, {c} conns"),
        }
    }

    /// One run on a fresh, empty table: `n` jobs, one per commit; jobs/s.
    async fn run(self, db: Db, n: usize, conns: usize) -> Result<f64> {
        let fresh = FreshTable::create(db).await?;
        let result = self.run_on(&fresh, n, conns).await;
        fresh.dispose().await;
        result
    }

    async fn run_on(self, fresh: &FreshTable, n: usize, conns: usize) -> Result<f64> {
        use backline_core::EnqueueOptions;
        let backend = fresh.dyn_backend();
        let manager = backline_core::JobManager::new(backend.clone());
        // The rows Backline's enqueue of a `Noop` writes, prepared before the clock starts.
        let jobs = (0..n)
            .map(|_| manager.prepare(&Noop, EnqueueOptions::default()))
            .collect::<backline_core::Result<Vec<_>>>()?;
        let mut shares: Vec<Vec<backline_core::NewJob>> = vec![Vec::new(); conns];
        for (i, j) in jobs.into_iter().enumerate() {
            shares[i % conns].push(j);
        }
        let t = fresh.table();
        let columns = "id, name, queue, payload, priority, state, attempt, max_attempts, timeout_ms, enqueued_at, run_at";
        let rate = match fresh.db {
            Db::Postgres => {
                let insert = format!(
                    "INSERT INTO {t} ({columns})
                    VALUES ($1, $2, $3, $4, $5, 'ready', 0, $6, $7, now(), now())"
                );
                let sql: Arc<str> = match self {
                    Single::Insert => insert.into(),
                    Single::InsertNotify => format!(
                        "WITH ins AS ({insert} RETURNING queue) SELECT pg_notify($8, queue) FROM ins"
                    )
                    .into(),
                };
                let channel: Arc<str> = format!("backline:{t}").into();
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(u32::try_from(conns)?)
                    .connect(&fresh.db.url(&fresh.name))
                    .await?;
                warm(&pool, conns).await?;
                let mut shares = shares.into_iter();
                let rate = timed(n, conns, || {
                    let (pool, sql, channel) = (pool.clone(), sql.clone(), channel.clone());
                    let share = shares.next().unwrap_or_default();
                    async move {
                        for j in &share {
                            sqlx::query(AssertSqlSafe(sql.clone()))
                                .bind(*j.id.as_uuid())
                                .bind(&j.name)
                                .bind(&j.queue)
                                .bind(&j.payload)
                                .bind(j.priority.value())
                                .bind(i32::try_from(j.max_attempts)?)
                                .bind(j.timeout.map(|d| d.as_millis() as i64))
                                .bind(&*channel)
                                .execute(&pool)
                                .await?;
                        }
                        Ok(share.len())
                    }
                })
                .await;
                pool.close().await;
                rate?
            }
            Db::Mysql => {
                let sql: Arc<str> = format!(
                    "INSERT INTO {t} ({columns})
                    VALUES (?, ?, ?, ?, ?, 'ready', 0, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))"
                )
                .into();
                let pool = sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(u32::try_from(conns)?)
                    .connect(&fresh.db.url(&fresh.name))
                    .await?;
                warm(&pool, conns).await?;
                let mut shares = shares.into_iter();
                let rate = timed(n, conns, || {
                    let (pool, sql) = (pool.clone(), sql.clone());
                    let share = shares.next().unwrap_or_default();
                    async move {
                        for j in &share {
                            sqlx::query(AssertSqlSafe(sql.clone()))
                                .bind(j.id.as_bytes().to_vec())
                                .bind(&j.name)
                                .bind(&j.queue)
                                .bind(&j.payload)
                                .bind(j.priority.value())
                                .bind(i64::from(j.max_attempts))
                                .bind(j.timeout.map(|d| d.as_millis() as i64))
                                .execute(&pool)
                                .await?;
                        }
                        Ok(share.len())
                    }
                })
                .await;
                pool.close().await;
                rate?
            }
            Db::Sqlite => {
                let sql: Arc<str> = format!(
                    "INSERT INTO {t} ({columns})
                    VALUES (?1, ?2, ?3, ?4, ?5, 'ready', 0, ?6, ?7, ?8, ?8)"
                )
                .into();
                let pool = fresh.backend.sqlite_pool().ok_or("not SQLite")?.clone();
                let mut shares = shares.into_iter();
                timed(n, conns, || {
                    let (pool, sql) = (pool.clone(), sql.clone());
                    let share = shares.next().unwrap_or_default();
                    async move {
                        for j in &share {
                            let now = i64::try_from(
                                std::time::SystemTime::now()
                                    .duration_since(std::time::UNIX_EPOCH)?
                                    .as_micros(),
                            )?;
                            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                            sqlx::query(AssertSqlSafe(sql.clone()))
                                .bind(j.id.as_bytes().to_vec())
                                .bind(&j.name)
                                .bind(&j.queue)
                                .bind(&j.payload)
                                .bind(j.priority.value())
                                .bind(i64::from(j.max_attempts))
                                .bind(j.timeout.map(|d| d.as_millis() as i64))
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                            tx.commit().await?;
                        }
                        Ok(share.len())
                    }
                })
                .await?
            }
        };
        let counts = backend.counts(None).await?;
        if counts.ready != n as u64 || counts.total() != n as u64 {
            return Err(format!("a raw insert loop left {counts:?}, not {n} ready").into());
        }
        Ok(rate)
    }
}

/// Opens `conns` connections of `pool` before the clock starts.
async fn warm<DB: sqlx::Database>(pool: &sqlx::Pool<DB>, conns: usize) -> Result<()> {
    let mut held = Vec::with_capacity(conns);
    for _ in 0..conns {
        held.push(pool.acquire().await?);
    }
    Ok(())
}

/// The single-row rows of `db`: `INSERT`s (and on PostgreSQL `INSERT` + `NOTIFY`), one job per
/// commit, `plan.slow_runs` runs each, as many jobs as the one-by-one enqueue.
async fn single_rows(db: Db, plan: &Plan) -> Result<Vec<Row>> {
    let n = plan.single_jobs;
    let conns = Single::conns(db, plan);
    let shapes: &[Single] = match db {
        Db::Postgres => &[Single::Insert, Single::InsertNotify],
        Db::Mysql | Db::Sqlite => &[Single::Insert],
    };
    let mut rows = Vec::new();
    for &shape in shapes {
        let id = shape.id(db, plan);
        if !plan.wants(&id) {
            continue;
        }
        let mut runs = Vec::with_capacity(plan.slow_runs);
        for _ in 0..plan.slow_runs {
            runs.push(shape.run(db, n, conns).await?);
        }
        rows.push(Row::new(
            id,
            format!(
                "{}{}",
                shape.label(db, plan),
                fewer_runs(plan, plan.slow_runs)
            ),
            n,
            Unit::JobsPerSecond,
            runs,
        ));
    }
    Ok(rows)
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
