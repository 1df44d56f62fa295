//! SQLite: an embedded file in WAL mode; every write in `BEGIN IMMEDIATE` on one writer
//! connection; claims as `UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING …`.

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

#[async_trait]
impl Backend for SqliteBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        crate::common::capabilities(self.durable)
    }

    async fn push(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let ids = jobs.iter().map(|j| j.id).collect();
        self.group.push(self, &self.signals, jobs).await?;
        Ok(ids)
    }

    async fn claim(&self, req: ClaimRequest<'_>) -> Result<Vec<ClaimedJob>> {
        // A batch of rows that were all unreadable (now dead) is no sign of an empty queue:
        // claim again. Each round makes at least one row dead, so this ends.
        loop {
            let (out, unreadable) = self.claim_once(req).await?;
            if !out.is_empty() || unreadable == 0 {
                return Ok(out);
            }
        }
    }

    async fn finish(&self, batch: &[Finish]) -> Result<Vec<bool>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_us();
        let err = map_err(NAME, "finish");
        let t = self.table.qualified();
        let mut out = vec![false; batch.len()];
        let mut woken = HashSet::new();
        // BEGIN IMMEDIATE holds the write lock: read the tokens, then write each group in one
        // statement.
        let mut tx = self.begin("finish").await?;
        let mut held = HashMap::with_capacity(batch.len());
        let mut queues = HashMap::with_capacity(batch.len());
        for chunk in batch.chunks(ID_CHUNK) {
            let mut query = sqlx::query(AssertSqlSafe(self.finish_select(chunk.len())));
            for f in chunk {
                query = query.bind(f.id.as_bytes().to_vec());
            }
            for r in query.fetch_all(&mut *tx).await.map_err(&err)? {
                let id: Vec<u8> = r.try_get(0).map_err(&err)?;
                let token: Option<i64> = r.try_get(1).map_err(&err)?;
                let queue: String = r.try_get(2).map_err(&err)?;
                if let (Ok(id), Some(token)) = (uuid::Uuid::from_slice(&id), token) {
                    held.insert(JobId::from_uuid(id), token);
                    queues.insert(JobId::from_uuid(id), queue);
                }
            }
        }
        let plan = FinishPlan::new(batch, &held);
        let groups: [(&[usize], String, Option<i64>); 3] = [
            (&plan.drop, format!("DELETE FROM {t} WHERE id IN "), None),
            (
                &plan.succeeded,
                format!(
                    "UPDATE {t} SET state = 'succeeded', finished_at = ?,
                        lease_token = NULL, lease_until = NULL WHERE id IN "
                ),
                Some(now),
            ),
            (
                &plan.release,
                format!(
                    "UPDATE {t} SET state = 'ready', attempt = MAX(attempt - 1, 0),
                        lease_token = NULL, lease_until = NULL WHERE id IN "
                ),
                None,
            ),
        ];
        for (items, prefix, first) in &groups {
            for chunk in items.chunks(ID_CHUNK) {
                let mut query = sqlx::query(AssertSqlSafe(format!(
                    "{prefix}({})",
                    placeholders(chunk.len())
                )));
                if let Some(v) = first {
                    query = query.bind(*v);
                }
                for &i in chunk {
                    query = query.bind(batch[i].id.as_bytes().to_vec());
                }
                query.execute(&mut *tx).await.map_err(&err)?;
                for &i in chunk {
                    out[i] = true;
                }
            }
        }
        for &i in &plan.release {
            if let Some(q) = queues.get(&batch[i].id) {
                woken.insert(q.clone());
            }
        }
        for &i in &plan.one_by_one {
            let f = &batch[i];
            let (state, run_at, error, finished) = match &f.outcome {
                Outcome::Retry { delay, error } => {
                    let state = if delay.is_zero() { "ready" } else { "retrying" };
                    (state, Some(now.saturating_add(micros(*delay))), error, None)
                }
                Outcome::Dead { error } => ("dead", None, error, Some(now)),
                _ => continue,
            };
            q(&self.sql.finish)
                .bind(state)
                .bind(0i64)
                .bind(run_at)
                .bind(error.clone())
                .bind(finished)
                .bind(f.id.as_bytes().to_vec())
                .bind(token_to_db(f.token))
                .execute(&mut *tx)
                .await
                .map_err(&err)?;
            out[i] = true;
            if state == "ready" {
                if let Some(q) = queues.get(&f.id) {
                    woken.insert(q.clone());
                }
            }
        }
        tx.commit().await.map_err(&err)?;
        for queue in &woken {
            self.signals.bump(queue);
        }
        Ok(out)
    }

    async fn heartbeat(
        &self,
        leases: &[(JobId, LeaseToken)],
        lease: Duration,
    ) -> Result<Vec<bool>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let until = now_us().saturating_add(micros(lease));
        let err = map_err(NAME, "heartbeat");
        let mut tx = self.begin("heartbeat").await?;
        let mut held = Vec::with_capacity(leases.len());
        for (id, token) in leases {
            let r = q(&self.sql.heartbeat)
                .bind(until)
                .bind(id.as_bytes().to_vec())
                .bind(token_to_db(*token))
                .execute(&mut *tx)
                .await
                .map_err(&err)?;
            held.push(r.rows_affected() > 0);
        }
        tx.commit().await.map_err(&err)?;
        Ok(held)
    }

    async fn wait(&self, queue: &str, seen: u64, timeout: Duration) -> Result<u64> {
        Ok(self
            .signals
            .wait(queue, seen, timeout.min(self.poll_interval))
            .await)
    }

    async fn maintain(&self, m: &Maintenance) -> Result<MaintenanceReport> {
        let now = now_us();
        let batch = i64::try_from(m.batch).unwrap_or(i64::MAX);
        let mut report = MaintenanceReport::default();
        let mut woken = HashSet::new();
        let err = map_err(NAME, "maintain");
        let mut tx = self.begin("maintain").await?;
        let rows = q(&self.sql.promote)
            .bind(now)
            .bind(batch)
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        report.promoted = rows.len() as u64;
        for r in rows {
            woken.insert(r.try_get::<String, _>(0).map_err(&err)?);
        }
        let rows = q(&self.sql.expire)
            .bind(now)
            .bind(batch)
            .bind(LEASE_EXPIRED_PREFIX)
            .bind(LEASE_EXPIRED_OF)
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        for r in rows {
            let queue: String = r.try_get(0).map_err(&err)?;
            let state: String = r.try_get(1).map_err(&err)?;
            if state == "dead" {
                report.expired_dead += 1;
            } else {
                report.recovered += 1;
                woken.insert(queue);
            }
        }
        for (sql, ttl) in [
            (&self.sql.prune_succeeded, m.succeeded_ttl),
            (&self.sql.prune_dead, m.dead_ttl),
        ] {
            let left = (m.batch as u64).saturating_sub(report.pruned);
            if left == 0 {
                break;
            }
            let r = q(sql)
                .bind(now.saturating_sub(micros(ttl)))
                .bind(i64::try_from(left).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map_err(&err)?;
            report.pruned += r.rows_affected();
        }
        tx.commit().await.map_err(&err)?;
        for queue in &woken {
            self.signals.bump(queue);
        }
        Ok(report)
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        let row = q(&self.sql.get)
            .bind(id.as_bytes().to_vec())
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err(NAME, "get a job"))?;
        row.as_ref()
            .map(|r| decode_job(r).map_err(|b| b.error(NAME, || rowid_of(r))))
            .transpose()
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        let rows = q(&self.sql.list)
            .bind(filter.state.map(|s| s.as_str()))
            .bind(filter.queue.clone())
            .bind(filter.name.clone())
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(i64::try_from(filter.offset).unwrap_or(i64::MAX))
            .fetch_all(&self.reader)
            .await
            .map_err(map_err(NAME, "list jobs"))?;
        let (jobs, bad) = decode_all(&rows);
        warn_skipped(NAME, &bad, |i| rowid_of(&rows[i]));
        Ok(jobs)
    }

    async fn counts(&self, queue: Option<&str>) -> Result<Counts> {
        let rows = q(&self.sql.counts)
            .bind(queue.map(str::to_owned))
            .fetch_all(&self.reader)
            .await
            .map_err(map_err(NAME, "count jobs"))?;
        let mut c = Counts::default();
        for r in rows {
            let state: String = r.try_get(0).map_err(map_err(NAME, "count jobs"))?;
            let n: i64 = r.try_get(1).map_err(map_err(NAME, "count jobs"))?;
            if let Some(s) = JobState::parse(&state) {
                *c.get_mut(s) += u64::try_from(n).unwrap_or(0);
            }
        }
        Ok(c)
    }

    async fn cancel(&self, id: JobId) -> Result<bool> {
        let mut tx = self.begin("cancel a job").await?;
        let r = q(&self.sql.cancel)
            .bind(id.as_bytes().to_vec())
            .execute(&mut *tx)
            .await
            .map_err(map_err(NAME, "cancel a job"))?;
        tx.commit().await.map_err(map_err(NAME, "cancel a job"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn retry_dead(&self, id: JobId) -> Result<bool> {
        let err = map_err(NAME, "retry a dead job");
        let mut tx = self.begin("retry a dead job").await?;
        let row = q(&self.sql.retry_dead)
            .bind(id.as_bytes().to_vec())
            .bind(now_us())
            .fetch_optional(&mut *tx)
            .await
            .map_err(&err)?;
        tx.commit().await.map_err(&err)?;
        match row {
            Some(r) => {
                self.signals.bump(&r.try_get::<String, _>(0).map_err(&err)?);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn delete(&self, id: JobId) -> Result<bool> {
        let mut tx = self.begin("delete a job").await?;
        let r = q(&self.sql.delete)
            .bind(id.as_bytes().to_vec())
            .execute(&mut *tx)
            .await
            .map_err(map_err(NAME, "delete a job"))?;
        tx.commit().await.map_err(map_err(NAME, "delete a job"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn purge(&self, state: JobState, queue: Option<&str>) -> Result<u64> {
        if state == JobState::Running {
            return Err(Error::InvalidJob("running jobs cannot be purged".into()));
        }
        let mut tx = self.begin("purge jobs").await?;
        let r = q(&self.sql.purge)
            .bind(state.as_str())
            .bind(queue.map(str::to_owned))
            .execute(&mut *tx)
            .await
            .map_err(map_err(NAME, "purge jobs"))?;
        tx.commit().await.map_err(map_err(NAME, "purge jobs"))?;
        Ok(r.rows_affected())
    }

    async fn lock_acquire(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let now = now_us();
        let mut tx = self.begin("acquire a lock").await?;
        let r = q(&self.sql.lock_acquire)
            .bind(name.to_owned())
            .bind(token_to_db(owner))
            .bind(now.saturating_add(micros(ttl)))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err(NAME, "acquire a lock"))?;
        tx.commit().await.map_err(map_err(NAME, "acquire a lock"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn lock_renew(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let now = now_us();
        let mut tx = self.begin("renew a lock").await?;
        let r = q(&self.sql.lock_renew)
            .bind(name.to_owned())
            .bind(token_to_db(owner))
            .bind(now.saturating_add(micros(ttl)))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err(NAME, "renew a lock"))?;
        tx.commit().await.map_err(map_err(NAME, "renew a lock"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn lock_release(&self, name: &str, owner: LeaseToken) -> Result<bool> {
        let mut tx = self.begin("release a lock").await?;
        let r = q(&self.sql.lock_release)
            .bind(name.to_owned())
            .bind(token_to_db(owner))
            .execute(&mut *tx)
            .await
            .map_err(map_err(NAME, "release a lock"))?;
        tx.commit().await.map_err(map_err(NAME, "release a lock"))?;
        Ok(r.rows_affected() > 0)
    }
}

impl SqliteBackend {
    /// One claim: the jobs that read, and how many rows did not (made dead).
    async fn claim_once(&self, req: ClaimRequest<'_>) -> Result<(Vec<ClaimedJob>, usize)> {
        if req.limit == 0 || req.names.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let token = LeaseToken::random();
        let now = now_us();
        let sql = self.claim_sql(req.names.len());
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .bind(token_to_db(token))
            .bind(now.saturating_add(micros(req.lease)))
            .bind(req.queue.to_owned())
            .bind(i64::try_from(req.limit).unwrap_or(i64::MAX));
        for n in req.names {
            query = query.bind(n.clone());
        }
        let mut tx = self.begin("claim").await?;
        let rows = query
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err(NAME, "claim"))?;
        let (jobs, bad) = decode_all(&rows);
        // A row that cannot be read costs only itself: dead in the same transaction, with
        // its reason; the others run.
        for (i, b) in &bad {
            let (key, sql) = match b.id {
                Some(id) => (
                    KeyValue::Id(id.as_bytes().to_vec()),
                    mark_dead_sql(
                        &self.table.qualified(),
                        b,
                        &now.to_string(),
                        "id",
                        ["?1", "?2", "?3"],
                        true,
                    ),
                ),
                None => (
                    KeyValue::RowId(rows[*i].try_get("rowid").map_err(map_err(NAME, "claim"))?),
                    mark_dead_sql(
                        &self.table.qualified(),
                        b,
                        &now.to_string(),
                        "rowid",
                        ["?1", "?2", "?3"],
                        true,
                    ),
                ),
            };
            let query = sqlx::query(AssertSqlSafe(sql)).bind(b.reason());
            let query = match key {
                KeyValue::Id(id) => query.bind(id),
                KeyValue::RowId(r) => query.bind(r),
            };
            query
                .bind(token_to_db(token))
                .execute(&mut *tx)
                .await
                .map_err(map_err(NAME, "mark an unreadable job dead"))?;
            let e = b.error(NAME, || rowid_of(&rows[*i]));
            tracing::error!(error = %ErrorChain(&e), "a claimed job cannot be read; it is dead");
        }
        tx.commit().await.map_err(map_err(NAME, "claim"))?;
        let mut out: Vec<ClaimedJob> = jobs
            .into_iter()
            .map(|job| ClaimedJob { job, token })
            .collect();
        sort_claimed(&mut out);
        Ok((out, bad.len()))
    }
}
