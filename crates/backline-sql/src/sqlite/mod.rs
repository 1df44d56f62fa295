//! SQLite: an embedded file in WAL mode; every write in `BEGIN IMMEDIATE` on one writer
//! connection; claims as `UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING …`.

mod backend;

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backline_core::provider::{LEASE_EXPIRED_OF, LEASE_EXPIRED_PREFIX};
use backline_core::{
    Backend, Capabilities, ClaimRequest, ClaimedJob, Counts, Error, ErrorChain, Finish, Job,
    JobFilter, JobId, JobState, LeaseToken, Maintenance, MaintenanceReport, NewJob, Outcome,
    Result, RunAt,
};
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, SqliteConnection};

use crate::common::{
    column, decode_all, decode_job, map_err, mark_dead_sql, micros, placeholders, ranges_check,
    repair_sql, sort_claimed, state_list, timeout_ms, token_to_db, warn_skipped, BadColumn,
    FinishPlan, Flavor, JobRow, Signals, COLUMNS, ID_CHUNK,
};
use crate::config::{SqlConfig, SqliteSync, TableName};
use crate::group::{Commit, GroupCommit};
use crate::{PlanMode, Statement};

const NAME: &str = "sqlite";

/// The indexes of the jobs table (created by version 1, again after version 2's rebuild).
const INDEXES: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS {name}_claim ON {table} (queue, priority DESC, run_at, id) WHERE state = 'ready'",
    "CREATE INDEX IF NOT EXISTS {name}_due ON {table} (run_at) WHERE state IN ('scheduled', 'retrying')",
    "CREATE INDEX IF NOT EXISTS {name}_lease ON {table} (lease_until) WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS {name}_finished ON {table} (finished_at) WHERE state IN ('succeeded', 'dead')",
    "CREATE INDEX IF NOT EXISTS {name}_queue_state ON {table} (queue, state)",
];

/// The schema, in order: each version a list of statements, with `{table}`, `{name}` and
/// `{locks}` replaced by the validated names; `now` (microseconds) is the migration's time.
///
/// Version 2 rebuilds the table as `STRICT` with range `CHECK`s, so that the database refuses
/// a value of the wrong type or out of range instead of keeping it for a claim to trip over.
/// SQLite cannot add constraints to a table, so the rebuild copies it, inside the migration's
/// one transaction: rows that break the new rules are first made dead with their reason
/// ([`repair_sql`]), and no row is lost.
fn migrations(now: i64) -> Vec<Vec<String>> {
    let v1 = [
        "CREATE TABLE IF NOT EXISTS {table} (
            id BLOB PRIMARY KEY,
            name TEXT NOT NULL,
            queue TEXT NOT NULL,
            payload BLOB NOT NULL,
            priority INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('scheduled', 'ready', 'running', 'retrying', 'succeeded', 'dead')),
            attempt INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            timeout_ms INTEGER,
            enqueued_at INTEGER NOT NULL,
            run_at INTEGER NOT NULL,
            last_error TEXT,
            lease_token INTEGER,
            lease_until INTEGER,
            finished_at INTEGER
        )",
    ]
    .iter()
    .chain(INDEXES)
    .chain(&["CREATE TABLE IF NOT EXISTS {locks} (
            name TEXT PRIMARY KEY,
            owner INTEGER NOT NULL,
            expires_at INTEGER NOT NULL
        )"])
    .map(|s| (*s).to_owned())
    .collect();
    let mut v2 = vec![
        repair_sql(Flavor::Sqlite, &now.to_string()),
        "DROP TABLE IF EXISTS {name}_strict".to_owned(),
        format!(
            "CREATE TABLE {{name}}_strict (
                id BLOB PRIMARY KEY,
                name TEXT NOT NULL,
                queue TEXT NOT NULL,
                payload BLOB NOT NULL,
                priority INTEGER NOT NULL,
                state TEXT NOT NULL CHECK (state IN ({states})),
                attempt INTEGER NOT NULL DEFAULT 0,
                max_attempts INTEGER NOT NULL,
                timeout_ms INTEGER,
                enqueued_at INTEGER NOT NULL,
                run_at INTEGER NOT NULL,
                last_error TEXT,
                lease_token INTEGER,
                lease_until INTEGER,
                finished_at INTEGER,
                CHECK ({ranges})
            ) STRICT",
            states = state_list(),
            ranges = ranges_check(),
        ),
        // Values of another storage class than the column's become it (a text id or payload its
        // bytes, a blob name its text); numbers and times are integers after the repair.
        "INSERT INTO {name}_strict (rowid, id, name, queue, payload, priority, state, attempt, max_attempts,
                timeout_ms, enqueued_at, run_at, last_error, lease_token, lease_until, finished_at)
            SELECT rowid, CAST(id AS BLOB), CAST(name AS TEXT), CAST(queue AS TEXT), CAST(payload AS BLOB),
                priority, state, attempt, max_attempts, timeout_ms, enqueued_at, run_at,
                CAST(last_error AS TEXT), lease_token, lease_until, finished_at
            FROM {table}"
            .to_owned(),
        "DROP TABLE {table}".to_owned(),
        "ALTER TABLE {name}_strict RENAME TO {name}".to_owned(),
    ];
    v2.extend(INDEXES.iter().map(|s| (*s).to_owned()));
    vec![v1, v2]
}

/// The most rows in one multi-row `INSERT` (10 parameters each, well under SQLite's limit).
const INSERT_CHUNK: usize = 500;

struct Sql {
    finish: Arc<str>,
    heartbeat: Arc<str>,
    promote: Arc<str>,
    expire: Arc<str>,
    prune_succeeded: Arc<str>,
    prune_dead: Arc<str>,
    get: Arc<str>,
    list: Arc<str>,
    counts: Arc<str>,
    cancel: Arc<str>,
    retry_dead: Arc<str>,
    delete: Arc<str>,
    purge: Arc<str>,
    lock_acquire: Arc<str>,
    lock_renew: Arc<str>,
    lock_release: Arc<str>,
}

impl Sql {
    fn new(t: &str, locks: &str) -> Sql {
        let s = |sql: String| -> Arc<str> { Arc::from(sql) };
        // `state IN ('succeeded', 'dead')` repeats the predicate of the partial index
        // `{table}_finished` word for word: SQLite uses a partial index only for a query whose
        // WHERE contains its predicate, and does not see that `state = 'succeeded'` implies it.
        // With `state = …` alone, retention scanned the whole table and sorted what it found
        // (with `sqlite_stat1`, after an `ANALYZE`, it skip-scanned `(queue, state)` and sorted).
        let prune = |state: &str| {
            s(format!(
                "DELETE FROM {t} WHERE id IN (
                    SELECT id FROM {t}
                    WHERE state IN ('succeeded', 'dead') AND state = '{state}' AND finished_at <= ?1
                    ORDER BY finished_at LIMIT ?2)"
            ))
        };
        Sql {
            finish: s(format!(
                "UPDATE {t} SET state = ?1, attempt = MAX(attempt - ?2, 0), run_at = COALESCE(?3, run_at),
                    last_error = COALESCE(?4, last_error), finished_at = ?5,
                    lease_token = NULL, lease_until = NULL
                WHERE id = ?6 AND lease_token = ?7 AND state = 'running'"
            )),
            heartbeat: s(format!(
                "UPDATE {t} SET lease_until = ?1 WHERE id = ?2 AND lease_token = ?3 AND state = 'running'"
            )),
            promote: s(format!(
                "UPDATE {t} SET state = 'ready' WHERE id IN (
                    SELECT id FROM {t} WHERE state IN ('scheduled', 'retrying') AND run_at <= ?1
                    ORDER BY run_at LIMIT ?2)
                RETURNING queue"
            )),
            expire: s(format!(
                "UPDATE {t} SET
                    state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'ready' END,
                    last_error = ?3 || attempt
                        || CASE WHEN attempt >= max_attempts THEN ?4 || max_attempts ELSE '' END,
                    finished_at = CASE WHEN attempt >= max_attempts THEN ?1 ELSE NULL END,
                    lease_token = NULL, lease_until = NULL
                WHERE id IN (
                    SELECT id FROM {t} WHERE state = 'running' AND lease_until <= ?1
                    ORDER BY lease_until LIMIT ?2)
                RETURNING queue, state"
            )),
            prune_succeeded: prune("succeeded"),
            prune_dead: prune("dead"),
            get: s(format!("SELECT {COLUMNS}, rowid FROM {t} WHERE id = ?1")),
            list: s(format!(
                "SELECT {COLUMNS}, rowid FROM {t}
                WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR queue = ?2) AND (?3 IS NULL OR name = ?3)
                ORDER BY id LIMIT ?4 OFFSET ?5"
            )),
            counts: s(format!(
                "SELECT state, count(*) AS n FROM {t} WHERE (?1 IS NULL OR queue = ?1) GROUP BY state"
            )),
            cancel: s(format!(
                "DELETE FROM {t} WHERE id = ?1 AND state IN ('scheduled', 'ready', 'retrying')"
            )),
            retry_dead: s(format!(
                "UPDATE {t} SET state = 'ready', attempt = 0, finished_at = NULL, run_at = ?2,
                    lease_token = NULL, lease_until = NULL
                WHERE id = ?1 AND state = 'dead'
                RETURNING queue"
            )),
            delete: s(format!("DELETE FROM {t} WHERE id = ?1 AND state <> 'running'")),
            purge: s(format!(
                "DELETE FROM {t} WHERE state = ?1 AND (?2 IS NULL OR queue = ?2)"
            )),
            lock_acquire: s(format!(
                "INSERT INTO {locks} (name, owner, expires_at) VALUES (?1, ?2, ?3)
                ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
                WHERE {locks}.owner = excluded.owner OR {locks}.expires_at <= ?4"
            )),
            lock_renew: s(format!(
                "UPDATE {locks} SET expires_at = ?3 WHERE name = ?1 AND owner = ?2 AND expires_at > ?4"
            )),
            lock_release: s(format!("DELETE FROM {locks} WHERE name = ?1 AND owner = ?2")),
        }
    }
}

type Query = sqlx::query::Query<'static, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

fn q(sql: &Arc<str>) -> Query {
    sqlx::query(AssertSqlSafe(sql.clone()))
}

fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

fn time_of(column: &'static str, us: i64) -> std::result::Result<DateTime<Utc>, BadColumn> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| BadColumn {
        column,
        problem: format!("{us} µs since 1970 is outside the dates this crate can represent"),
    })
}

impl JobRow for SqliteRow {
    fn job_id(&self) -> std::result::Result<uuid::Uuid, BadColumn> {
        let id: Vec<u8> = column(self, "id")?;
        uuid::Uuid::from_slice(&id).map_err(|e| BadColumn {
            column: "id",
            problem: format!("{} bytes are no UUID ({e})", id.len()),
        })
    }

    fn time(&self, name: &'static str) -> std::result::Result<Option<DateTime<Utc>>, BadColumn> {
        column::<_, Option<i64>>(self, name)?
            .map(|us| time_of(name, us))
            .transpose()
    }
}

/// A row's key for messages when its id does not read.
fn rowid_of(row: &SqliteRow) -> String {
    row.try_get::<i64, _>("rowid").map_or_else(
        |_| "with an unreadable id".to_owned(),
        |r| format!("at rowid {r}"),
    )
}

/// How a row to mark is found.
enum KeyValue {
    Id(Vec<u8>),
    RowId(i64),
}

/// The SQLite backend behind [`SqlBackend`](crate::SqlBackend).
pub(crate) struct SqliteBackend {
    /// One connection: every write goes through it, in `BEGIN IMMEDIATE`.
    writer: SqlitePool,
    /// Readers (the writer itself for an in-memory database).
    reader: SqlitePool,
    table: TableName,
    locks: String,
    sql: Sql,
    signals: Signals,
    poll_interval: Duration,
    durable: bool,
    /// Concurrent pushes share commits.
    group: GroupCommit,
}

impl SqliteBackend {
    pub(crate) async fn connect(config: &SqlConfig, table: TableName) -> Result<SqliteBackend> {
        if table.schema().is_some() {
            return Err(Error::Config(format!(
                "SQLite tables take no schema: `{table}`"
            )));
        }
        let options = SqliteConnectOptions::from_str(&config.url)
            .map_err(|e| Error::Config(format!("bad SQLite URL {}: {e}", config.redacted_url())))?;
        let memory = config.url.contains(":memory:") || config.url.contains("mode=memory");
        let options = options
            .create_if_missing(true)
            .busy_timeout(config.busy_timeout)
            .synchronous(match config.sqlite_sync {
                SqliteSync::Full => SqliteSynchronous::Full,
                SqliteSync::Normal => SqliteSynchronous::Normal,
            });
        let options = if memory {
            options
        } else {
            options.journal_mode(SqliteJournalMode::Wal)
        };
        let err = map_err(NAME, "connect");
        // An in-memory database lives in its one connection: keep it forever.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(if memory { 1 } else { 0 })
            .max_lifetime(if memory {
                None
            } else {
                Some(Duration::from_secs(1800))
            })
            .idle_timeout(if memory {
                None
            } else {
                Some(Duration::from_secs(600))
            })
            .acquire_timeout(config.connect_timeout)
            .connect_with(options.clone())
            .await
            .map_err(&err)?;
        let reader = if memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(config.max_connections)
                .acquire_timeout(config.connect_timeout)
                .connect_with(options)
                .await
                .map_err(&err)?
        };
        let t = table.qualified();
        let locks = format!("{t}_locks");
        Ok(SqliteBackend {
            writer,
            reader,
            sql: Sql::new(&t, &locks),
            locks,
            table,
            signals: Signals::default(),
            poll_interval: config.poll_interval,
            durable: !memory,
            group: GroupCommit::default(),
        })
    }

    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.writer
    }

    async fn begin(&self, op: &'static str) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(NAME, op))
    }

    pub(crate) async fn migrate(&self, target: usize) -> Result<()> {
        let err = map_err(NAME, "migrate");
        let mut tx = self.begin("migrate").await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS backline_migrations (
                table_name TEXT PRIMARY KEY,
                version INTEGER NOT NULL,
                applied_at INTEGER NOT NULL
            )",
        )
        .execute(&mut *tx)
        .await
        .map_err(&err)?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT version FROM backline_migrations WHERE table_name = ?1")
                .bind(self.table.qualified())
                .fetch_optional(&mut *tx)
                .await
                .map_err(&err)?;
        let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
        let steps = migrations(now_us());
        if current > steps.len() {
            return Err(Error::Config(format!(
                "table {} is at schema version {current}, newer than this backline-sql ({})",
                self.table,
                steps.len()
            )));
        }
        let target = target.min(steps.len());
        for step in steps.iter().take(target).skip(current) {
            for stmt in step {
                let sql = stmt
                    .replace("{table}", &self.table.qualified())
                    .replace("{name}", self.table.name())
                    .replace("{locks}", &self.locks);
                sqlx::query(AssertSqlSafe(sql))
                    .execute(&mut *tx)
                    .await
                    .map_err(&err)?;
            }
        }
        if current < target {
            sqlx::query(
                "INSERT INTO backline_migrations (table_name, version, applied_at) VALUES (?1, ?2, ?3)
                ON CONFLICT (table_name) DO UPDATE SET version = excluded.version, applied_at = excluded.applied_at",
            )
            .bind(self.table.qualified())
            .bind(i64::try_from(target).unwrap_or(i64::MAX))
            .bind(now_us())
            .execute(&mut *tx)
            .await
            .map_err(&err)?;
        }
        tx.commit().await.map_err(&err)?;
        Ok(())
    }

    /// Inserts jobs on a connection (multi-row statements); returns the queues that got a
    /// ready job.
    async fn insert<J: Borrow<NewJob> + Sync>(
        &self,
        conn: &mut SqliteConnection,
        jobs: &[J],
        op: &'static str,
    ) -> Result<HashSet<String>> {
        let now = now_us();
        let mut woken = HashSet::new();
        for chunk in jobs.chunks(INSERT_CHUNK) {
            let rows = vec!["(?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let sql = format!(
                "INSERT INTO {} (id, name, queue, payload, priority, state, attempt, max_attempts, timeout_ms, enqueued_at, run_at)
                VALUES {rows}
                ON CONFLICT (id) DO NOTHING",
                self.table.qualified()
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for j in chunk {
                let j = j.borrow();
                let run_at = match j.run_at {
                    RunAt::Now => now,
                    RunAt::After(d) => now.saturating_add(micros(d)),
                    RunAt::At(t) => t.timestamp_micros(),
                };
                let ready = run_at <= now;
                if ready {
                    woken.insert(j.queue.clone());
                }
                query = query
                    .bind(j.id.as_bytes().to_vec())
                    .bind(j.name.clone())
                    .bind(j.queue.clone())
                    .bind(j.payload.clone())
                    .bind(j.priority.value())
                    .bind(if ready { "ready" } else { "scheduled" })
                    .bind(i64::from(j.max_attempts.max(1)))
                    .bind(timeout_ms(j.timeout))
                    .bind(now)
                    .bind(run_at);
            }
            query.execute(&mut *conn).await.map_err(map_err(NAME, op))?;
        }
        Ok(woken)
    }

    /// Stores jobs on the caller's connection (inside its transaction).
    pub(crate) async fn push_on(&self, conn: &mut SqliteConnection, jobs: &[NewJob]) -> Result<()> {
        self.insert(conn, jobs, "enqueue in a transaction").await?;
        Ok(())
    }

    fn claim_sql(&self, names: usize) -> String {
        let t = self.table.qualified();
        let list = (0..names)
            .map(|i| format!("?{}", i + 5))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "UPDATE {t} SET state = 'running', attempt = attempt + 1, lease_token = ?1, lease_until = ?2
            WHERE id IN (
                SELECT id FROM {t}
                WHERE state = 'ready' AND queue = ?3 AND name IN ({list})
                ORDER BY priority DESC, run_at, id
                LIMIT ?4)
            RETURNING {COLUMNS}, rowid"
        )
    }

    /// The finish's read of the tokens and queues of `n` claimed rows.
    fn finish_select(&self, n: usize) -> String {
        format!(
            "SELECT id, lease_token, queue FROM {} WHERE state = 'running' AND id IN ({})",
            self.table.qualified(),
            placeholders(n)
        )
    }

    /// The plan of `statement` (`EXPLAIN QUERY PLAN`), one line per step.
    pub(crate) async fn explain(&self, statement: Statement<'_>) -> Result<String> {
        let explain = |sql: &str| sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")));
        let now = now_us();
        let query = match statement {
            Statement::Claim { queue, names } => {
                let mut query = explain(&self.claim_sql(names.len()))
                    .bind(0i64)
                    .bind(0i64)
                    .bind(queue.to_owned())
                    .bind(100i64);
                for n in names {
                    query = query.bind(n.clone());
                }
                query
            }
            Statement::Finish => {
                let mut query = explain(&self.finish_select(100));
                for _ in 0..100 {
                    query = query.bind(JobId::new().as_bytes().to_vec());
                }
                query
            }
            Statement::Promote => explain(&self.sql.promote).bind(now).bind(1_000i64),
            Statement::Recover => explain(&self.sql.expire)
                .bind(now)
                .bind(1_000i64)
                .bind(LEASE_EXPIRED_PREFIX)
                .bind(LEASE_EXPIRED_OF),
            Statement::Prune => explain(&self.sql.prune_succeeded)
                .bind(now - 3_600_000_000)
                .bind(1_000i64),
        };
        let rows = query
            .fetch_all(&self.reader)
            .await
            .map_err(map_err(NAME, "explain"))?;
        let mut plan = String::new();
        for r in rows {
            let line: String = r.try_get("detail").map_err(map_err(NAME, "explain"))?;
            plan.push_str(&line);
            plan.push('\n');
        }
        Ok(plan)
    }

    pub(crate) fn claim_index_name(&self) -> String {
        format!("{}_claim", self.table.name())
    }
}

#[async_trait]
impl crate::DriverOps for SqliteBackend {
    async fn migrate(&self, target: usize) -> Result<()> {
        SqliteBackend::migrate(self, target).await
    }

    async fn explain(&self, statement: Statement<'_>, _mode: PlanMode) -> Result<String> {
        SqliteBackend::explain(self, statement).await
    }

    fn claim_index_name(&self) -> String {
        SqliteBackend::claim_index_name(self)
    }

    fn group_state(&self) -> (bool, usize) {
        self.group.state()
    }
}

/// One group commit: the jobs in one `BEGIN IMMEDIATE` transaction on the writer.
#[async_trait]
impl Commit for SqliteBackend {
    async fn commit(&self, jobs: &[&NewJob]) -> Result<HashSet<String>> {
        let mut tx = self.begin("push").await?;
        let woken = self.insert(&mut tx, jobs, "push").await?;
        tx.commit().await.map_err(map_err(NAME, "push"))?;
        Ok(woken)
    }
}
