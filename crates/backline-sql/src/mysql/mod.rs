//! MySQL 8 and MariaDB 10.8+: claims in one `READ COMMITTED` transaction
//! (`SELECT … FOR UPDATE SKIP LOCKED`, then `UPDATE … WHERE id IN (…)`).

mod backend;

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use backline_core::provider::{LEASE_EXPIRED_OF, LEASE_EXPIRED_PREFIX};
use backline_core::{
    Backend, Capabilities, ClaimRequest, ClaimedJob, Counts, Error, ErrorChain, Finish, Job,
    JobFilter, JobId, JobState, LeaseToken, Maintenance, MaintenanceReport, NewJob, Outcome,
    Result, RunAt,
};
use chrono::{DateTime, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::{AssertSqlSafe, Executor, MySqlConnection, Row};

use crate::common::{
    column, decode_all, decode_job, map_err, mark_dead_sql, micros, placeholders, ranges_check,
    repair_sql, sort_claimed, state_list, timeout_ms, token_to_db, warn_skipped, BadColumn,
    FinishPlan, Flavor, JobRow, Signals, COLUMNS, ID_CHUNK,
};
use crate::config::{SqlConfig, TableName};
use crate::group::{Commit, GroupCommit};
use crate::{PlanMode, Statement};

const NAME: &str = "mysql";

/// MySQL has no partial indexes, so each index leads with `state`: the claim index is
/// `(state, queue, priority DESC, run_at, id)`, read in the claim's ORDER BY direction
/// (MariaDB ≥ 10.8 and MySQL 8 honour `DESC`).
///
/// Version 2 adds range `CHECK`s ([`ranges_check`]), a state check and a time check (no zero
/// dates): rows that would break them are first made dead with their reason ([`repair_sql`]),
/// as MariaDB and MySQL check the existing rows when a constraint is added.
const MIGRATIONS: &[&[&str]] = &[
    &[
        "CREATE TABLE IF NOT EXISTS {table} (
        id BINARY(16) NOT NULL PRIMARY KEY,
        name VARCHAR(128) NOT NULL,
        queue VARCHAR(128) NOT NULL,
        payload LONGBLOB NOT NULL,
        priority SMALLINT NOT NULL,
        state VARCHAR(16) NOT NULL,
        attempt INT NOT NULL DEFAULT 0,
        max_attempts INT NOT NULL,
        timeout_ms BIGINT NULL,
        enqueued_at DATETIME(6) NOT NULL,
        run_at DATETIME(6) NOT NULL,
        last_error TEXT NULL,
        lease_token BIGINT NULL,
        lease_until DATETIME(6) NULL,
        finished_at DATETIME(6) NULL,
        KEY {name}_claim (state, queue, priority DESC, run_at, id),
        KEY {name}_due (state, run_at),
        KEY {name}_lease (state, lease_until),
        KEY {name}_finished (state, finished_at),
        KEY {name}_queue_state (queue, state)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
        "CREATE TABLE IF NOT EXISTS {locks} (
        name VARCHAR(191) NOT NULL PRIMARY KEY,
        owner BIGINT NOT NULL,
        expires_at DATETIME(6) NOT NULL
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    ],
    &[
        "{repair}",
        "ALTER TABLE {table}
        ADD CONSTRAINT {name}_ranges CHECK ({ranges}),
        ADD CONSTRAINT {name}_state CHECK (state IN ({states})),
        ADD CONSTRAINT {name}_times CHECK (
            enqueued_at >= '1000-01-01' AND run_at >= '1000-01-01'
            AND (lease_until IS NULL OR lease_until >= '1000-01-01')
            AND (finished_at IS NULL OR finished_at >= '1000-01-01'))",
    ],
];

/// The number of `?` in an `IN (…)` list for `n` ids: the next power of two. sqlx prepares each
/// distinct statement text once per connection and keeps 100; an `IN` list as long as each batch
/// made a new text for almost every claim and finish (a prepare round trip each, and a thrashed
/// cache), which left MariaDB idle two thirds of a drain. With padded lists a connection sees at
/// most ten shapes per statement. The extra slots repeat the last id, which `IN` ignores.
fn slots(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// The most rows in one multi-row `INSERT`.
const INSERT_CHUNK: usize = 500;

impl JobRow for MySqlRow {
    fn job_id(&self) -> std::result::Result<uuid::Uuid, BadColumn> {
        let id: Vec<u8> = column(self, "id")?;
        uuid::Uuid::from_slice(&id).map_err(|e| BadColumn {
            column: "id",
            problem: format!("{} bytes are no UUID ({e})", id.len()),
        })
    }

    fn time(&self, name: &'static str) -> std::result::Result<Option<DateTime<Utc>>, BadColumn> {
        column(self, name).map_err(|mut bad| {
            // sqlx reads MySQL's zero date ('0000-00-00', allowed without NO_ZERO_DATE) as an
            // unexpected NULL: say what it is.
            if bad.problem.contains("unexpected null") {
                bad.problem = "a zero date (0000-00-00), which is no point in time".to_owned();
            }
            bad
        })
    }
}

/// A row's key for messages (the id column of MySQL always reads: `BINARY(16)`).
fn unreadable_id() -> String {
    "with an unreadable id".to_owned()
}

use backline_core::provider::saturating_add as add;

/// The MySQL/MariaDB backend behind [`SqlBackend`](crate::SqlBackend).
pub(crate) struct MySqlBackend {
    pool: MySqlPool,
    table: TableName,
    t: String,
    locks: String,
    signals: Signals,
    poll_interval: Duration,
    /// Concurrent pushes share commits.
    group: GroupCommit,
}

impl MySqlBackend {
    pub(crate) async fn connect(config: &SqlConfig, table: TableName) -> Result<MySqlBackend> {
        let url = match config.url.strip_prefix("mariadb:") {
            Some(rest) => format!("mysql:{rest}"),
            None => config.url.clone(),
        };
        let options = MySqlConnectOptions::from_str(&url)
            .map_err(|e| Error::Config(format!("bad MySQL URL {}: {e}", config.redacted_url())))?
            .timezone(Some("+00:00".to_owned()));
        crate::common::probe(NAME, &options, config.connect_timeout).await?;
        let pool = MySqlPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.connect_timeout)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(map_err(NAME, "connect"))?;
        let t = table.qualified();
        let locks = table.sibling(&format!("{}_locks", table.name()));
        Ok(MySqlBackend {
            pool,
            table,
            t,
            locks,
            signals: Signals::default(),
            poll_interval: config.poll_interval,
            group: GroupCommit::default(),
        })
    }

    pub(crate) fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    pub(crate) async fn migrate(&self, target: usize) -> Result<()> {
        let err = map_err(NAME, "migrate");
        let versions = self.table.sibling("backline_migrations");
        // DDL is not transactional here: serialize migrations with a named lock held by this
        // one connection for the duration.
        let mut conn = self.pool.acquire().await.map_err(&err)?;
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('backline_migrate', 60)")
            .fetch_one(&mut *conn)
            .await
            .map_err(&err)?;
        if got != Some(1) {
            return Err(Error::Timeout {
                op: "migrate (waiting for another migration)",
                after: Duration::from_secs(60),
            });
        }
        let result = async {
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE IF NOT EXISTS {versions} (
                    table_name VARCHAR(191) NOT NULL PRIMARY KEY,
                    version INT NOT NULL,
                    applied_at DATETIME(6) NOT NULL
                ) ENGINE = InnoDB"
            )))
            .execute(&mut *conn)
            .await
            .map_err(&err)?;
            let current: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT version FROM {versions} WHERE table_name = ?"
            )))
            .bind(self.table.qualified())
            .fetch_optional(&mut *conn)
            .await
            .map_err(&err)?;
            let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
            if current > MIGRATIONS.len() {
                return Err(Error::Config(format!(
                    "table {} is at schema version {current}, newer than this backline-sql ({})",
                    self.table,
                    MIGRATIONS.len()
                )));
            }
            // DDL commits on its own: each version is recorded as soon as it is applied, so an
            // interrupted migration goes on where it stopped.
            let target = target.min(MIGRATIONS.len());
            for (version, step) in MIGRATIONS.iter().enumerate().take(target).skip(current) {
                for stmt in *step {
                    let sql = stmt
                        .replace("{repair}", &repair_sql(Flavor::MySql, "UTC_TIMESTAMP(6)"))
                        .replace("{table}", &self.t)
                        .replace("{name}", self.table.name())
                        .replace("{locks}", &self.locks)
                        .replace("{ranges}", &ranges_check())
                        .replace("{states}", &state_list());
                    sqlx::query(AssertSqlSafe(sql))
                        .execute(&mut *conn)
                        .await
                        .map_err(&err)?;
                }
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {versions} (table_name, version, applied_at) VALUES (?, ?, UTC_TIMESTAMP(6))
                    ON DUPLICATE KEY UPDATE version = VALUES(version), applied_at = VALUES(applied_at)"
                )))
                .bind(self.table.qualified())
                .bind(i32::try_from(version + 1).unwrap_or(i32::MAX))
                .execute(&mut *conn)
                .await
                .map_err(&err)?;
            }
            Ok(())
        }
        .await;
        let _ = sqlx::query("SELECT RELEASE_LOCK('backline_migrate')")
            .execute(&mut *conn)
            .await;
        result
    }

    async fn db_now(conn: &mut MySqlConnection, op: &'static str) -> Result<DateTime<Utc>> {
        sqlx::query_scalar("SELECT UTC_TIMESTAMP(6)")
            .fetch_one(conn)
            .await
            .map_err(map_err(NAME, op))
    }

    /// Inserts jobs on a connection; returns the queues that got a ready job.
    async fn insert<J: Borrow<NewJob> + Sync>(
        &self,
        conn: &mut MySqlConnection,
        jobs: &[J],
        op: &'static str,
    ) -> Result<HashSet<String>> {
        let now = Self::db_now(conn, op).await?;
        let mut woken = HashSet::new();
        for chunk in jobs.chunks(INSERT_CHUNK) {
            let rows = vec!["(?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let sql = format!(
                "INSERT INTO {} (id, name, queue, payload, priority, state, attempt, max_attempts, timeout_ms, enqueued_at, run_at)
                VALUES {rows}
                ON DUPLICATE KEY UPDATE id = id",
                self.t
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for j in chunk {
                let j = j.borrow();
                let run_at = match j.run_at {
                    RunAt::Now => now,
                    RunAt::After(d) => add(now, d),
                    RunAt::At(t) => t,
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
    pub(crate) async fn push_on(&self, conn: &mut MySqlConnection, jobs: &[NewJob]) -> Result<()> {
        self.insert(conn, jobs, "enqueue in a transaction").await?;
        Ok(())
    }

    fn claim_select(&self, names: usize) -> String {
        format!(
            "SELECT {COLUMNS}, UTC_TIMESTAMP(6) AS db_now FROM {t} FORCE INDEX ({idx})
            WHERE state = 'ready' AND queue = ? AND name IN ({list})
            ORDER BY priority DESC, run_at, id
            LIMIT ?
            FOR UPDATE SKIP LOCKED",
            t = self.t,
            idx = self.claim_index_name(),
            list = placeholders(names),
        )
    }

    /// The read of the lease tokens of `n` running rows, locking them, by which the finish and
    /// the heartbeat begin.
    fn lease_select(&self, n: usize) -> String {
        format!(
            "SELECT id, lease_token FROM {} WHERE state = 'running' AND id IN ({}) FOR UPDATE",
            self.t,
            placeholders(n)
        )
    }

    // The maintenance selects name their index, as the claim does: the optimizer's choice
    // follows InnoDB's persistent statistics, which on a freshly filled table describe the
    // table as it was when it was small (computed in the background after 10% of it changed):
    // with them MariaDB served the promotion from the claim index and retention from the
    // due index, each with a filesort of every matching row. `state = ?` rather than
    // `state IN ('scheduled', 'retrying')`: an `IN` makes two ranges of `(state, run_at)`,
    // which come out in `run_at` order only through a filesort, so the promotion reads one
    // state at a time.

    /// The promotion's select of due jobs of one state (`?`), oldest first.
    fn promote_select(&self) -> String {
        format!(
            "SELECT id, queue FROM {t} FORCE INDEX ({n}_due)
            WHERE state = ? AND run_at <= UTC_TIMESTAMP(6)
            ORDER BY run_at LIMIT ?
            FOR UPDATE SKIP LOCKED",
            t = self.t,
            n = self.table.name(),
        )
    }

    /// The lease recovery's select of expired leases, oldest first.
    fn recover_select(&self) -> String {
        format!(
            "SELECT id, queue, attempt >= max_attempts AS last FROM {t} FORCE INDEX ({n}_lease)
            WHERE state = 'running' AND lease_until <= UTC_TIMESTAMP(6)
            ORDER BY lease_until LIMIT ?
            FOR UPDATE SKIP LOCKED",
            t = self.t,
            n = self.table.name(),
        )
    }

    /// Retention's delete of a batch of jobs of `state` past their time to live. A `DELETE`
    /// takes no index hint, so the batch is picked in a derived table that does.
    fn prune_delete(&self, state: &str) -> String {
        format!(
            "DELETE j FROM {t} AS j JOIN (
                SELECT id FROM {t} FORCE INDEX ({n}_finished)
                WHERE state = '{state}' AND finished_at <= UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
                ORDER BY finished_at LIMIT ?
            ) AS p ON j.id = p.id",
            t = self.t,
            n = self.table.name(),
        )
    }

    /// The plan of `statement` (`EXPLAIN`), one line per table: `type=… key=… extra=…`.
    pub(crate) async fn explain(&self, statement: Statement<'_>) -> Result<String> {
        let explain = |sql: String| sqlx::query(AssertSqlSafe(format!("EXPLAIN {sql}")));
        let query = match statement {
            Statement::Claim { queue, names } => {
                let mut query = explain(self.claim_select(names.len())).bind(queue.to_owned());
                for n in names {
                    query = query.bind(n.clone());
                }
                query.bind(100i64)
            }
            Statement::Finish => {
                let mut query = explain(self.lease_select(slots(100)));
                for _ in 0..slots(100) {
                    query = query.bind(JobId::new().as_bytes().to_vec());
                }
                query
            }
            Statement::Promote => explain(self.promote_select())
                .bind("scheduled")
                .bind(1_000i64),
            Statement::Recover => explain(self.recover_select()).bind(1_000i64),
            Statement::Prune => explain(self.prune_delete("succeeded"))
                .bind(3_600_000_000i64)
                .bind(1_000i64),
        };
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(NAME, "explain"))?;
        let mut plan = String::new();
        for r in rows {
            let key: Option<String> = r.try_get("key").unwrap_or(None);
            let extra: Option<String> = r.try_get("Extra").unwrap_or(None);
            let typ: Option<String> = r.try_get("type").unwrap_or(None);
            plan.push_str(&format!(
                "type={} key={} extra={}\n",
                typ.unwrap_or_default(),
                key.unwrap_or_default(),
                extra.unwrap_or_default()
            ));
        }
        Ok(plan)
    }

    pub(crate) fn claim_index_name(&self) -> String {
        format!("{}_claim", self.table.name())
    }

    async fn tx(&self, op: &'static str) -> Result<sqlx::Transaction<'static, sqlx::MySql>> {
        self.pool.begin().await.map_err(map_err(NAME, op))
    }
}

#[async_trait]
impl crate::DriverOps for MySqlBackend {
    async fn migrate(&self, target: usize) -> Result<()> {
        MySqlBackend::migrate(self, target).await
    }

    async fn explain(&self, statement: Statement<'_>, _mode: PlanMode) -> Result<String> {
        MySqlBackend::explain(self, statement).await
    }

    fn claim_index_name(&self) -> String {
        MySqlBackend::claim_index_name(self)
    }

    fn group_state(&self) -> (bool, usize) {
        self.group.state()
    }
}

/// The number of rows in a group commit's `INSERT` of `n` jobs: the next power of two (at most
/// [`INSERT_CHUNK`]), so that a connection prepares a handful of statement shapes instead of one
/// per group size (as [`slots`] does for `IN` lists), unless repeating the last job that often
/// would send more than [`PAD_BYTES`]. The extra rows repeat the last job, which the statement's
/// `ON DUPLICATE KEY UPDATE id = id` turns into nothing.
fn padded_rows(jobs: &[&NewJob]) -> usize {
    let n = jobs.len();
    let padded = n.next_power_of_two().min(INSERT_CHUNK).max(n);
    let last = jobs
        .last()
        .map_or(0, |j| j.payload.len() + j.name.len() + j.queue.len());
    if (padded - n).saturating_mul(last) <= PAD_BYTES {
        padded
    } else {
        n
    }
}

/// The most bytes of repeated rows a group commit's `INSERT` is padded with.
const PAD_BYTES: usize = 16 * 1024;

/// One group commit. Up to [`INSERT_CHUNK`] jobs (every group of one-by-one enqueues) are one
/// multi-row `INSERT` in autocommit, atomic on its own, that takes its times from the server's
/// clock (`UTC_TIMESTAMP(6)`, constant within a statement): one round trip, where a
/// transaction with a separate read of the clock took four. More jobs are several such
/// statements in one transaction.
#[async_trait]
impl Commit for MySqlBackend {
    async fn commit(&self, jobs: &[&NewJob]) -> Result<HashSet<String>> {
        let err = map_err(NAME, "push");
        // Local waiters are woken by the client's clock: a wake-up is a hint (the server polls
        // and promotes due jobs anyway), so a clock skew costs at most a spurious one.
        let now = Utc::now();
        let woken = jobs
            .iter()
            .filter(|j| match j.run_at {
                RunAt::Now => true,
                RunAt::After(d) => d.is_zero(),
                RunAt::At(t) => t <= now,
            })
            .map(|j| j.queue.clone())
            .collect();
        if jobs.len() <= INSERT_CHUNK {
            let mut conn = self.pool.acquire().await.map_err(&err)?;
            self.group_insert(jobs, padded_rows(jobs))
                .execute(&mut *conn)
                .await
                .map_err(&err)?;
        } else {
            let mut tx = self.tx("push").await?;
            for chunk in jobs.chunks(INSERT_CHUNK) {
                self.group_insert(chunk, chunk.len())
                    .execute(&mut *tx)
                    .await
                    .map_err(&err)?;
            }
            tx.commit().await.map_err(&err)?;
        }
        Ok(woken)
    }
}

impl MySqlBackend {
    /// A group commit's `INSERT` of `jobs` in `rows` rows (the last job repeated to fill them).
    fn group_insert<'q>(
        &self,
        jobs: &[&NewJob],
        rows: usize,
    ) -> sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments> {
        const RUN_AT: &str = "COALESCE(?, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND)";
        let row = format!(
            "(?, ?, ?, ?, ?, IF({RUN_AT} <= UTC_TIMESTAMP(6), 'ready', 'scheduled'), 0, ?, ?, UTC_TIMESTAMP(6), {RUN_AT})"
        );
        let sql = format!(
            "INSERT INTO {} (id, name, queue, payload, priority, state, attempt, max_attempts, timeout_ms, enqueued_at, run_at)
            VALUES {}
            ON DUPLICATE KEY UPDATE id = id",
            self.t,
            vec![row.as_str(); rows].join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        let last = jobs.len().saturating_sub(1);
        for i in 0..rows {
            let Some(j) = jobs.get(i.min(last)) else {
                break;
            };
            let (at, after) = match j.run_at {
                RunAt::Now => (None, 0),
                RunAt::After(d) => (None, micros(d)),
                RunAt::At(t) => (Some(t), 0),
            };
            query = query
                .bind(j.id.as_bytes().to_vec())
                .bind(j.name.clone())
                .bind(j.queue.clone())
                .bind(j.payload.clone())
                .bind(j.priority.value())
                .bind(at)
                .bind(after)
                .bind(i64::from(j.max_attempts.max(1)))
                .bind(timeout_ms(j.timeout))
                .bind(at)
                .bind(after);
        }
        query
    }
}
