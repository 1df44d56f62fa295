//! PostgreSQL: one-statement claims (`UPDATE … WHERE id = ANY(ARRAY(SELECT … SKIP LOCKED))`) and
//! wake-ups through `LISTEN/NOTIFY`.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backline_core::provider::{LEASE_EXPIRED_OF, LEASE_EXPIRED_PREFIX};
use backline_core::ErrorChain;
use backline_core::{
    Backend, Capabilities, ClaimRequest, ClaimedJob, Counts, Error, Finish, Job, JobFilter, JobId,
    JobState, LeaseToken, Maintenance, MaintenanceReport, NewJob, Result, RunAt,
};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow, PgValueFormat};
use sqlx::{AssertSqlSafe, PgConnection, Row, ValueRef};
use tokio::sync::oneshot;

use crate::common::{
    column, decode_all, decode_job, decode_problem, first_per_job, map_err, mark_dead_sql, micros,
    ranges_check, repair_sql, sort_claimed, timeout_ms, token_from_db, token_to_db, warn_skipped,
    BadColumn, Flavor, JobRow, Signals, COLUMNS,
};
use crate::config::{SqlConfig, TableName};
use crate::group::{Commit, GroupCommit};
use crate::{PlanMode, Statement};

const NAME: &str = "postgres";

/// The key of the advisory lock that serializes `migrate()` (held only inside its transaction).
const MIGRATION_LOCK: i64 = 0x6261_636b_6c69_6e65; // "backline"

/// The schema, in order; each step a list of statements. `{table}`, `{name}` and `{locks}` are
/// replaced by the validated names.
///
/// Version 2 adds the range `CHECK`s ([`ranges_check`], and finite times) as `NOT VALID`: a
/// short lock, after which every write is checked. Existing rows are repaired and the
/// constraints validated afterwards, in a transaction of their own ([`PgBackend::validate`]),
/// which locks no writer out while it scans the table.
const MIGRATIONS: &[&[&str]] = &[&[
    "CREATE TABLE IF NOT EXISTS {table} (
        id uuid PRIMARY KEY,
        name text NOT NULL,
        queue text NOT NULL,
        payload bytea NOT NULL,
        priority smallint NOT NULL,
        state text NOT NULL CHECK (state IN ('scheduled', 'ready', 'running', 'retrying', 'succeeded', 'dead')),
        attempt integer NOT NULL DEFAULT 0,
        max_attempts integer NOT NULL,
        timeout_ms bigint,
        enqueued_at timestamptz NOT NULL,
        run_at timestamptz NOT NULL,
        last_error text,
        lease_token bigint,
        lease_until timestamptz,
        finished_at timestamptz
    )",
    // The claim reads this index in its ORDER BY direction: no sort, no future jobs.
    "CREATE INDEX IF NOT EXISTS {name}_claim ON {table} (queue, priority DESC, run_at, id) WHERE state = 'ready'",
    "CREATE INDEX IF NOT EXISTS {name}_due ON {table} (run_at) WHERE state IN ('scheduled', 'retrying')",
    "CREATE INDEX IF NOT EXISTS {name}_lease ON {table} (lease_until) WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS {name}_finished ON {table} (finished_at) WHERE state IN ('succeeded', 'dead')",
    "CREATE INDEX IF NOT EXISTS {name}_queue_state ON {table} (queue, state)",
    "CREATE TABLE IF NOT EXISTS {locks} (
        name text PRIMARY KEY,
        owner bigint NOT NULL,
        expires_at timestamptz NOT NULL
    )",
], &[
    "ALTER TABLE {table} ADD CONSTRAINT {name}_ranges CHECK ({ranges}) NOT VALID",
    "ALTER TABLE {table} ADD CONSTRAINT {name}_times CHECK (
        enqueued_at > '-infinity' AND enqueued_at < 'infinity' AND run_at > '-infinity' AND run_at < 'infinity'
        AND (lease_until IS NULL OR (lease_until > '-infinity' AND lease_until < 'infinity'))
        AND (finished_at IS NULL OR (finished_at > '-infinity' AND finished_at < 'infinity'))
    ) NOT VALID",
]];

/// The constraints of version 2, validated after their migration.
const VALIDATED: [&str; 2] = ["ranges", "times"];

/// The settings of the claim's connections: `enable_sort = off`, so that the planner takes a
/// plan with a sort only where no other plan exists. Without statistics (a table never analyzed:
/// a fresh table after a burst of enqueues, or any server where autovacuum is off or behind; and
/// per-table autovacuum settings do nothing where it is off globally) the planner guesses about
/// one row for `state = 'ready' AND queue = $1 AND name = ANY($2)`, whatever the depth, and for
/// one row a sort is free: reading the claim index in order, reading the `(queue, state)` index
/// (which matches two of the equalities) and sorting, and a bitmap scan of the claim index and a
/// sort then cost the same to a hair, and the size of the table picks the winner (measured with
/// 100,000 ready jobs: the `(queue, state)` index and a sort of all of them; without that index,
/// the ordered scan, until 90,000 jobs in other states joined them and the bitmap scan won; each
/// sort 30-250 ms a claim instead of 1). No statement form breaks that
/// tie (three equalities estimate one row however they are written), and an `ANALYZE` by the
/// maintenance would only shorten the bad stretch; so the claim runs where the sort cannot win:
/// the claim index is read in its `ORDER BY` order, the one plan without a sort. The setting
/// travels as a startup parameter of these connections only, never of the pool the application
/// gets from `pg_pool()`, and costs no round trip. (Behind PgBouncer the `options` parameter must
/// be allowed, or ignored through `ignore_startup_parameters`.)
const CLAIM_OPTIONS: &[(&str, &str)] = &[("enable_sort", "off")];

/// The outcome kinds as the finish statements name them.
const KIND_DROP: &str = "drop";
const KIND_SUCCEEDED: &str = "succeeded";
const KIND_RETRY: &str = "retry";
const KIND_DEAD: &str = "dead";
const KIND_RELEASE: &str = "release";

/// One finish item in columns: kind, delay in microseconds, error. An outcome this version
/// does not know hands the job back, as `Release` does.
fn outcome_columns(o: &backline_core::Outcome) -> (&'static str, i64, Option<&str>) {
    use backline_core::Outcome;
    match o {
        Outcome::Succeeded { keep: false } => (KIND_DROP, 0, None),
        Outcome::Succeeded { keep: true } => (KIND_SUCCEEDED, 0, None),
        Outcome::Retry { delay, error } => (KIND_RETRY, micros(*delay), Some(error)),
        Outcome::Dead { error } => (KIND_DEAD, 0, Some(error)),
        _ => (KIND_RELEASE, 0, None),
    }
}

fn claim_index(table: &TableName) -> String {
    format!("{}_claim", table.name())
}

/// Every statement, built once from the validated table name.
struct Sql {
    push: Arc<str>,
    claim: Arc<str>,
    finish: Arc<str>,
    heartbeat: Arc<str>,
    promote: Arc<str>,
    expire: Arc<str>,
    prune_succeeded: Arc<str>,
    prune_dead: Arc<str>,
    notify: Arc<str>,
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
    fn new(table: &TableName) -> Sql {
        let t = table.qualified();
        let locks = table.sibling(&format!("{}_locks", table.name()));
        let s = |sql: String| -> Arc<str> { Arc::from(sql) };
        let returning = COLUMNS
            .split(", ")
            .map(|c| format!("j.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        Sql {
            push: s(format!(
                "WITH ins AS (
                    INSERT INTO {t} AS j (id, name, queue, payload, priority, state, attempt, max_attempts, timeout_ms, enqueued_at, run_at)
                    SELECT i.id, i.name, i.queue, i.payload, i.priority,
                           CASE WHEN r.run_at <= now() THEN 'ready' ELSE 'scheduled' END,
                           0, i.max_attempts, i.timeout_ms, now(), r.run_at
                    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::int2[], $6::int4[], $7::int8[], $8::timestamptz[], $9::int8[])
                         AS i(id, name, queue, payload, priority, max_attempts, timeout_ms, at, after_us)
                    CROSS JOIN LATERAL (SELECT COALESCE(i.at, now() + i.after_us * interval '1 microsecond') AS run_at) r
                    ON CONFLICT (id) DO NOTHING
                    RETURNING j.queue, j.state
                )
                SELECT w.queue FROM (SELECT DISTINCT queue FROM ins WHERE state = 'ready') w
                CROSS JOIN LATERAL pg_notify($10, w.queue) n"
            )),
            // The ids are picked in an `ARRAY(…)` sub-query: an init plan, run once, whose result
            // the update finds through the primary key. A join against a CTE instead leaves the
            // planner free to hash-join a sequential scan of the whole table under a generic plan
            // (its `LIMIT $3` is estimated at a tenth of the table), which made a drain slow down
            // with the depth of the queue.
            claim: s(format!(
                "UPDATE {t} AS j
                SET state = 'running', attempt = j.attempt + 1, lease_token = $4,
                    lease_until = now() + $5::int8 * interval '1 microsecond'
                WHERE j.id = ANY(ARRAY(
                    SELECT id FROM {t}
                    WHERE state = 'ready' AND queue = $1 AND name = ANY($2::text[])
                    ORDER BY priority DESC, run_at, id
                    LIMIT $3
                    FOR UPDATE SKIP LOCKED
                ))
                RETURNING {returning}"
            )),
            // A lease token is set exactly while a job is running (the claim sets it; finish,
            // expiry and retry clear it), so matching it is the fencing test. `state = 'running'`
            // is left out on purpose: with it the planner may serve the join from the partial
            // lease index, whose dead entries pile up during a drain, instead of the primary key.
            finish: s(format!(
                "WITH i AS (
                    SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int8[], $5::text[])
                        AS i(id, token, kind, delay_us, error)
                ),
                del AS (
                    DELETE FROM {t} AS j USING i
                    WHERE j.id = i.id AND j.lease_token = i.token AND i.kind = 'drop'
                    RETURNING j.id
                ),
                upd AS (
                    UPDATE {t} AS j SET
                        state = CASE i.kind
                            WHEN 'succeeded' THEN 'succeeded'
                            WHEN 'dead' THEN 'dead'
                            WHEN 'release' THEN 'ready'
                            ELSE CASE WHEN i.delay_us <= 0 THEN 'ready' ELSE 'retrying' END
                        END,
                        attempt = CASE WHEN i.kind = 'release' THEN greatest(j.attempt - 1, 0) ELSE j.attempt END,
                        run_at = CASE WHEN i.kind = 'retry' THEN now() + i.delay_us * interval '1 microsecond' ELSE j.run_at END,
                        last_error = CASE WHEN i.kind IN ('retry', 'dead') THEN i.error ELSE j.last_error END,
                        finished_at = CASE WHEN i.kind IN ('succeeded', 'dead') THEN now() ELSE NULL END,
                        lease_token = NULL,
                        lease_until = NULL
                    FROM i
                    WHERE j.id = ANY($1::uuid[]) AND j.id = i.id AND j.lease_token = i.token AND i.kind <> 'drop'
                    RETURNING j.id, j.queue, j.state
                ),
                woke AS (SELECT DISTINCT queue FROM upd WHERE state = 'ready')
                SELECT id FROM del
                UNION ALL SELECT id FROM upd
                UNION ALL SELECT NULL::uuid FROM woke CROSS JOIN LATERAL pg_notify($6, woke.queue) n"
            )),
            heartbeat: s(format!(
                "UPDATE {t} AS j SET lease_until = now() + $3::int8 * interval '1 microsecond'
                FROM unnest($1::uuid[], $2::int8[]) AS i(id, token)
                WHERE j.id = ANY($1::uuid[]) AND j.id = i.id AND j.lease_token = i.token
                RETURNING j.id, j.lease_token"
            )),
            // Promotion, lease recovery and retention read their partial index in its order
            // and stop after the batch. Their `LIMIT` is a sub-select, which the planner cannot
            // see into: it costs such a limit as a tenth of the rows, so reading the index in
            // order and stopping early is the cheapest plan for any row estimate. With a plain
            // `LIMIT $1`, the custom plans of a prepared statement's first runs see the batch
            // (1,000) and, on a table without statistics (which guess a few hundred due rows),
            // chose a bitmap scan of every due row and a sort of them all.
            promote: s(format!(
                "UPDATE {t} AS j SET state = 'ready'
                WHERE j.id = ANY(ARRAY(
                    SELECT id FROM {t}
                    WHERE state IN ('scheduled', 'retrying') AND run_at <= now()
                    ORDER BY run_at LIMIT (SELECT $1::int8)
                    FOR UPDATE SKIP LOCKED
                ))
                RETURNING j.queue"
            )),
            expire: s(format!(
                "UPDATE {t} AS j SET
                    state = CASE WHEN j.attempt >= j.max_attempts THEN 'dead' ELSE 'ready' END,
                    last_error = $2::text || j.attempt
                        || CASE WHEN j.attempt >= j.max_attempts THEN $3::text || j.max_attempts ELSE '' END,
                    finished_at = CASE WHEN j.attempt >= j.max_attempts THEN now() ELSE NULL END,
                    lease_token = NULL,
                    lease_until = NULL
                WHERE j.id = ANY(ARRAY(
                    SELECT id FROM {t}
                    WHERE state = 'running' AND lease_until <= now()
                    ORDER BY lease_until LIMIT (SELECT $1::int8)
                    FOR UPDATE SKIP LOCKED
                ))
                RETURNING j.queue, j.state"
            )),
            prune_succeeded: s(Self::prune(&t, "succeeded")),
            prune_dead: s(Self::prune(&t, "dead")),
            notify: s("SELECT 1 FROM unnest($2::text[]) AS q(queue) CROSS JOIN LATERAL pg_notify($1, q.queue) n".to_owned()),
            get: s(format!("SELECT {COLUMNS} FROM {t} WHERE id = $1")),
            list: s(format!(
                "SELECT {COLUMNS} FROM {t}
                WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR queue = $2) AND ($3::text IS NULL OR name = $3)
                ORDER BY id LIMIT $4 OFFSET $5"
            )),
            counts: s(format!(
                "SELECT state, count(*) AS n FROM {t} WHERE ($1::text IS NULL OR queue = $1) GROUP BY state"
            )),
            cancel: s(format!(
                "DELETE FROM {t} WHERE id = $1 AND state IN ('scheduled', 'ready', 'retrying')"
            )),
            retry_dead: s(format!(
                "WITH up AS (
                    UPDATE {t} SET state = 'ready', attempt = 0, finished_at = NULL, run_at = now(),
                        lease_token = NULL, lease_until = NULL
                    WHERE id = $1 AND state = 'dead'
                    RETURNING queue
                )
                SELECT up.queue FROM up CROSS JOIN LATERAL pg_notify($2, up.queue) n"
            )),
            delete: s(format!("DELETE FROM {t} WHERE id = $1 AND state <> 'running'")),
            purge: s(format!(
                "DELETE FROM {t} WHERE state = $1 AND ($2::text IS NULL OR queue = $2)"
            )),
            lock_acquire: s(format!(
                "INSERT INTO {locks} AS l (name, owner, expires_at)
                VALUES ($1, $2, now() + $3::int8 * interval '1 microsecond')
                ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
                WHERE l.owner = EXCLUDED.owner OR l.expires_at <= now()"
            )),
            lock_renew: s(format!(
                "UPDATE {locks} SET expires_at = now() + $3::int8 * interval '1 microsecond'
                WHERE name = $1 AND owner = $2 AND expires_at > now()"
            )),
            lock_release: s(format!("DELETE FROM {locks} WHERE name = $1 AND owner = $2")),
        }
    }

    fn prune(t: &str, state: &str) -> String {
        format!(
            "DELETE FROM {t}
            WHERE id = ANY(ARRAY(
                SELECT id FROM {t}
                WHERE state = '{state}' AND finished_at <= now() - $1::int8 * interval '1 microsecond'
                ORDER BY finished_at LIMIT (SELECT $2::int8)
                FOR UPDATE SKIP LOCKED
            ))"
        )
    }
}

fn q(sql: &Arc<str>) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(sql.clone()))
}

impl JobRow for PgRow {
    fn job_id(&self) -> std::result::Result<uuid::Uuid, BadColumn> {
        column(self, "id")
    }

    /// Reads a `timestamptz` without sqlx's chrono decoding, which panics on `infinity` and on
    /// years past chrono's range (it adds the microseconds unchecked): such a value is a
    /// [`BadColumn`], not a crashed claim loop.
    fn time(&self, name: &'static str) -> std::result::Result<Option<DateTime<Utc>>, BadColumn> {
        let bad = |problem: String| BadColumn {
            column: name,
            problem,
        };
        let value = self.try_get_raw(name).map_err(|e| bad(decode_problem(e)))?;
        if value.is_null() {
            return Ok(None);
        }
        match value.format() {
            PgValueFormat::Binary => {
                let bytes = value.as_bytes().map_err(|e| bad(e.to_string()))?;
                let us = <[u8; 8]>::try_from(bytes)
                    .map(i64::from_be_bytes)
                    .map_err(|_| bad(format!("{} bytes are no timestamptz", bytes.len())))?;
                match us {
                    i64::MAX => Err(bad("infinity is no point in time".to_owned())),
                    i64::MIN => Err(bad("-infinity is no point in time".to_owned())),
                    _ => PG_EPOCH_US
                        .checked_add(us)
                        .and_then(DateTime::from_timestamp_micros)
                        .map(Some)
                        .ok_or_else(|| {
                            bad("the time is outside the dates this crate can represent".to_owned())
                        }),
                }
            }
            PgValueFormat::Text => column(self, name),
        }
    }
}

/// PostgreSQL's epoch (2000-01-01 UTC) in microseconds since the Unix epoch.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// The PostgreSQL backend behind [`SqlBackend`](crate::SqlBackend).
pub(crate) struct PgBackend {
    pool: PgPool,
    /// The claim's own connections, which plan with sorts disabled (see [`CLAIM_OPTIONS`]).
    claim_pool: PgPool,
    table: TableName,
    channel: String,
    sql: Sql,
    signals: Arc<Signals>,
    listener_up: Arc<AtomicBool>,
    poll_interval: Duration,
    /// Concurrent pushes share commits.
    group: GroupCommit,
    /// Dropping it stops the listener task.
    _stop: oneshot::Sender<()>,
}

impl PgBackend {
    pub(crate) async fn connect(config: &SqlConfig, table: TableName) -> Result<PgBackend> {
        let options: PgConnectOptions = config.url.parse().map_err(|e: sqlx::Error| {
            Error::Config(format!("bad PostgreSQL URL {}: {e}", config.redacted_url()))
        })?;
        // Named after the table, so that an operator (or a test) can find these connections.
        let options = options.application_name(&format!("backline:{}", table.qualified()));
        crate::common::probe(NAME, &options, config.connect_timeout).await?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.connect_timeout)
            .connect_with(options.clone())
            .await
            .map_err(map_err(NAME, "connect"))?;
        let claim_pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(0)
            .acquire_timeout(config.connect_timeout)
            .connect_lazy_with(options.clone().options(CLAIM_OPTIONS.iter().copied()));
        let channel = format!("backline:{}", table.qualified());
        let signals = Arc::new(Signals::default());
        let listener_up = Arc::new(AtomicBool::new(false));
        let (stop, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(config.connect_timeout)
            .connect_lazy_with(
                options.application_name(&format!("backline-listener:{}", table.qualified())),
            );
        tokio::spawn(listen_loop(
            listen_pool,
            channel.clone(),
            signals.clone(),
            listener_up.clone(),
            stop_rx,
            ready_tx,
        ));
        // Listen before the first push can happen, so no notification is missed at start;
        // if it cannot, wait() polls until the listener is up.
        let _ = tokio::time::timeout(config.connect_timeout, ready_rx).await;
        Ok(PgBackend {
            pool,
            claim_pool,
            sql: Sql::new(&table),
            table,
            channel,
            signals,
            listener_up,
            poll_interval: config.poll_interval,
            group: GroupCommit::default(),
            _stop: stop,
        })
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) async fn migrate(&self, target: usize) -> Result<()> {
        let err = map_err(NAME, "migrate");
        let versions = self.table.sibling("backline_migrations");
        let mut tx = self.pool.begin().await.map_err(&err)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(&err)?;
        if let Some(schema) = self.table.schema() {
            sqlx::query(AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}"
            )))
            .execute(&mut *tx)
            .await
            .map_err(&err)?;
        }
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {versions} (
                table_name text PRIMARY KEY,
                version integer NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )"
        )))
        .execute(&mut *tx)
        .await
        .map_err(&err)?;
        let current: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT version FROM {versions} WHERE table_name = $1"
        )))
        .bind(self.table.qualified())
        .fetch_optional(&mut *tx)
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
        let target = target.min(MIGRATIONS.len());
        for step in MIGRATIONS.iter().take(target).skip(current) {
            for stmt in *step {
                sqlx::raw_sql(AssertSqlSafe(self.fill(stmt)))
                    .execute(&mut *tx)
                    .await
                    .map_err(&err)?;
            }
        }
        if current < target {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {versions} (table_name, version) VALUES ($1, $2)
                ON CONFLICT (table_name) DO UPDATE SET version = EXCLUDED.version, applied_at = now()"
            )))
            .bind(self.table.qualified())
            .bind(i32::try_from(target).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await
            .map_err(&err)?;
        }
        tx.commit().await.map_err(&err)?;
        if target >= 2 {
            self.validate().await?;
        }
        Ok(())
    }

    /// A migration statement with the validated names filled in.
    fn fill(&self, stmt: &str) -> String {
        stmt.replace("{table}", &self.table.qualified())
            .replace("{name}", self.table.name())
            .replace(
                "{locks}",
                &self.table.sibling(&format!("{}_locks", self.table.name())),
            )
            .replace("{ranges}", &ranges_check())
    }

    /// Validates the constraints of version 2 if they are not yet: first the rows that break
    /// them are made dead with their reason and repaired ([`repair_sql`]), then `VALIDATE`
    /// scans the table under a lock that lets every reader and writer go on. Rows written
    /// since the constraints were added are checked on write, so none can break them here.
    async fn validate(&self) -> Result<()> {
        let err = map_err(NAME, "migrate (validate the constraints)");
        let names: Vec<String> = VALIDATED
            .iter()
            .map(|c| format!("{}_{c}", self.table.name()))
            .collect();
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_constraint
            WHERE conrelid = to_regclass($1) AND conname::text = ANY($2::text[]) AND NOT convalidated",
        )
        .bind(self.table.qualified())
        .bind(&names)
        .fetch_one(&self.pool)
        .await
        .map_err(&err)?;
        if pending == 0 {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(&err)?;
        sqlx::raw_sql(AssertSqlSafe(
            self.fill(&repair_sql(Flavor::Postgres, "now()")),
        ))
        .execute(&mut *tx)
        .await
        .map_err(&err)?;
        for name in &names {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "ALTER TABLE {} VALIDATE CONSTRAINT {name}",
                self.table.qualified()
            )))
            .execute(&mut *tx)
            .await
            .map_err(&err)?;
        }
        tx.commit().await.map_err(&err)?;
        Ok(())
    }

    fn push_query<J: Borrow<NewJob>>(
        &self,
        jobs: &[J],
    ) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let n = jobs.len();
        let mut ids = Vec::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        let mut queues = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut priorities = Vec::with_capacity(n);
        let mut max_attempts = Vec::with_capacity(n);
        let mut timeouts = Vec::with_capacity(n);
        let mut ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
        let mut afters = Vec::with_capacity(n);
        for j in jobs {
            let j = j.borrow();
            ids.push(*j.id.as_uuid());
            names.push(j.name.clone());
            queues.push(j.queue.clone());
            payloads.push(j.payload.clone());
            priorities.push(j.priority.value());
            max_attempts.push(i32::try_from(j.max_attempts.max(1)).unwrap_or(i32::MAX));
            timeouts.push(timeout_ms(j.timeout));
            match j.run_at {
                RunAt::Now => {
                    ats.push(None);
                    afters.push(0i64);
                }
                RunAt::After(d) => {
                    ats.push(None);
                    afters.push(micros(d));
                }
                RunAt::At(t) => {
                    ats.push(Some(t));
                    afters.push(0);
                }
            }
        }
        q(&self.sql.push)
            .bind(ids)
            .bind(names)
            .bind(queues)
            .bind(payloads)
            .bind(priorities)
            .bind(max_attempts)
            .bind(timeouts)
            .bind(ats)
            .bind(afters)
            .bind(self.channel.clone())
    }

    /// Stores jobs on the caller's connection (inside its transaction).
    pub(crate) async fn push_on(&self, conn: &mut PgConnection, jobs: &[NewJob]) -> Result<()> {
        self.push_query(jobs)
            .execute(conn)
            .await
            .map_err(map_err(NAME, "enqueue in a transaction"))?;
        Ok(())
    }

    /// The plan of `sql` in `mode`, for the parameters `args` (SQL expressions). The statement
    /// is prepared with SQL's `PREPARE` and explained with `EXPLAIN EXECUTE`, so that
    /// `plan_cache_mode` applies: an `EXPLAIN` of the statement itself with its parameters bound
    /// plans for their values (a custom plan) whatever that setting says. (`EXECUTE` takes no
    /// bound parameters, hence the expressions.) The generic plan is the one a prepared
    /// statement settles on after its first five runs, which does not see the values (a custom
    /// plan, made for a batch of 100, would hide a bad generic one); the custom plans are those
    /// of its first runs on each connection. It runs on a connection of `pool` (so with the
    /// settings of the connections that run the statement), detached and closed afterwards, so
    /// nothing it prepares or sets stays in the pool.
    async fn plan(
        &self,
        pool: &PgPool,
        sql: &str,
        args: &[String],
        mode: PlanMode,
    ) -> Result<String> {
        let err = map_err(NAME, "explain");
        let mut conn = pool.acquire().await.map_err(&err)?.detach();
        let set = match mode {
            PlanMode::Generic => "SET plan_cache_mode = force_generic_plan",
            PlanMode::Custom => "SET plan_cache_mode = force_custom_plan",
        };
        sqlx::raw_sql(set).execute(&mut conn).await.map_err(&err)?;
        sqlx::raw_sql(AssertSqlSafe(format!("PREPARE backline_explain AS {sql}")))
            .execute(&mut conn)
            .await
            .map_err(&err)?;
        let rows = sqlx::raw_sql(AssertSqlSafe(format!(
            "EXPLAIN EXECUTE backline_explain({})",
            args.join(", ")
        )))
        .fetch_all(&mut conn)
        .await
        .map_err(&err)?;
        let _ = sqlx::Connection::close(conn).await;
        let mut plan = String::new();
        for r in rows {
            let line: String = r.try_get(0).map_err(&err)?;
            plan.push_str(&line);
            plan.push('\n');
        }
        Ok(plan)
    }

    /// The plan of `statement` in `mode`, with representative parameters. Nothing is executed.
    pub(crate) async fn explain(&self, statement: Statement<'_>, mode: PlanMode) -> Result<String> {
        // Text from the caller travels as hex digits: nothing in it can end the literal.
        let text = |s: &str| {
            let hex: String = s.bytes().map(|b| format!("{b:02x}")).collect();
            format!("convert_from(decode('{hex}', 'hex'), 'UTF8')")
        };
        let ids = (0..100)
            .map(|_| JobId::new().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let (sql, args) = match statement {
            Statement::Claim { queue, names } => {
                let names = names.iter().map(|n| text(n)).collect::<Vec<_>>();
                (
                    &self.sql.claim,
                    vec![
                        text(queue),
                        format!("ARRAY[{}]::text[]", names.join(", ")),
                        "100".to_owned(),
                        "0".to_owned(),
                        "1000000".to_owned(),
                    ],
                )
            }
            Statement::Finish => (
                &self.sql.finish,
                vec![
                    format!("'{{{ids}}}'::uuid[]"),
                    "array_fill(0::int8, ARRAY[100])".to_owned(),
                    format!("array_fill('{KIND_SUCCEEDED}'::text, ARRAY[100])"),
                    "array_fill(0::int8, ARRAY[100])".to_owned(),
                    "array_fill(NULL::text, ARRAY[100])".to_owned(),
                    text(&self.channel),
                ],
            ),
            Statement::Promote => (&self.sql.promote, vec!["1000".to_owned()]),
            Statement::Recover => (
                &self.sql.expire,
                vec![
                    "1000".to_owned(),
                    text(LEASE_EXPIRED_PREFIX),
                    text(LEASE_EXPIRED_OF),
                ],
            ),
            Statement::Prune => (
                &self.sql.prune_succeeded,
                vec!["3600000000".to_owned(), "1000".to_owned()],
            ),
        };
        let pool = match statement {
            Statement::Claim { .. } => &self.claim_pool,
            _ => &self.pool,
        };
        self.plan(pool, sql, &args, mode).await
    }

    pub(crate) fn claim_index_name(&self) -> String {
        claim_index(&self.table)
    }

    async fn notify(&self, queues: &HashSet<String>) -> Result<()> {
        if queues.is_empty() {
            return Ok(());
        }
        let list: Vec<&String> = queues.iter().collect();
        q(&self.sql.notify)
            .bind(&self.channel)
            .bind(list)
            .execute(&self.pool)
            .await
            .map_err(map_err(NAME, "notify"))?;
        for queue in queues {
            self.signals.bump(queue);
        }
        Ok(())
    }
}

/// Keeps a `LISTEN` connection open, reconnecting by itself, and turns each notification into
/// a bump of its queue's counter.
async fn listen_loop(
    pool: PgPool,
    channel: String,
    signals: Arc<Signals>,
    up: Arc<AtomicBool>,
    mut stop: oneshot::Receiver<()>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    let mut was_lost = false;
    loop {
        let connect = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let listener = tokio::select! {
            _ = &mut stop => return,
            r = connect => r,
        };
        let mut listener = match listener {
            Ok(l) => l,
            Err(e) => {
                if !was_lost {
                    tracing::warn!(error = %ErrorChain(&e), retry_in = ?backoff, "postgres LISTEN connection failed; polling until it is back");
                    was_lost = true;
                }
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        up.store(true, Ordering::Release);
        if was_lost {
            tracing::info!("postgres LISTEN connection restored");
        }
        // Anything pushed while we were not listening: let every waiter look.
        signals.bump_all();
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
        backoff = Duration::from_millis(100);
        loop {
            let r = tokio::select! {
                _ = &mut stop => return,
                r = listener.try_recv() => r,
            };
            match r {
                Ok(Some(n)) => signals.bump(n.payload()),
                Ok(None) => {
                    // Lost and already reconnected: notifications in between are gone.
                    tracing::warn!("postgres LISTEN connection was lost and re-established");
                    signals.bump_all();
                }
                Err(e) => {
                    up.store(false, Ordering::Release);
                    signals.bump_all();
                    tracing::warn!(error = %ErrorChain(&e), "postgres LISTEN connection lost; polling until it is back");
                    was_lost = true;
                    break;
                }
            }
        }
    }
}

#[async_trait]
impl crate::DriverOps for PgBackend {
    async fn migrate(&self, target: usize) -> Result<()> {
        PgBackend::migrate(self, target).await
    }

    async fn explain(&self, statement: Statement<'_>, mode: PlanMode) -> Result<String> {
        PgBackend::explain(self, statement, mode).await
    }

    fn claim_index_name(&self) -> String {
        PgBackend::claim_index_name(self)
    }

    fn group_state(&self) -> (bool, usize) {
        self.group.state()
    }
}

/// One group commit: one statement (its own transaction) that inserts the jobs and sends one
/// `NOTIFY` per queue that got a ready job.
#[async_trait]
impl Commit for PgBackend {
    async fn commit(&self, jobs: &[&NewJob]) -> Result<HashSet<String>> {
        let rows = self
            .push_query(jobs)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(NAME, "push"))?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect())
    }
}

#[async_trait]
impl Backend for PgBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        crate::common::capabilities(true)
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
        let firsts = first_per_job(batch);
        let mut ids = Vec::with_capacity(firsts.len());
        let mut tokens = Vec::with_capacity(firsts.len());
        let mut kinds = Vec::with_capacity(firsts.len());
        let mut delays = Vec::with_capacity(firsts.len());
        let mut errors = Vec::with_capacity(firsts.len());
        for &i in &firsts {
            let f = &batch[i];
            let (kind, delay, error) = outcome_columns(&f.outcome);
            ids.push(*f.id.as_uuid());
            tokens.push(token_to_db(f.token));
            kinds.push(kind);
            delays.push(delay);
            errors.push(error);
        }
        let rows = q(&self.sql.finish)
            .bind(ids)
            .bind(tokens)
            .bind(kinds)
            .bind(delays)
            .bind(errors)
            .bind(&self.channel)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(NAME, "finish"))?;
        let mut applied_ids = HashSet::with_capacity(rows.len());
        for r in rows {
            let id: Option<uuid::Uuid> = r.try_get(0).map_err(map_err(NAME, "finish"))?;
            if let Some(id) = id {
                applied_ids.insert(id);
            }
        }
        let mut out = vec![false; batch.len()];
        for i in firsts {
            out[i] = applied_ids.contains(batch[i].id.as_uuid());
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
        let ids: Vec<uuid::Uuid> = leases.iter().map(|(id, _)| *id.as_uuid()).collect();
        let tokens: Vec<i64> = leases.iter().map(|(_, t)| token_to_db(*t)).collect();
        let rows = q(&self.sql.heartbeat)
            .bind(ids)
            .bind(tokens)
            .bind(micros(lease))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(NAME, "heartbeat"))?;
        let mut held = HashSet::with_capacity(rows.len());
        for r in rows {
            let id: uuid::Uuid = r.try_get(0).map_err(map_err(NAME, "heartbeat"))?;
            let token: i64 = r.try_get(1).map_err(map_err(NAME, "heartbeat"))?;
            held.insert((id, token_from_db(token)));
        }
        Ok(leases
            .iter()
            .map(|(id, t)| held.contains(&(*id.as_uuid(), *t)))
            .collect())
    }

    async fn wait(&self, queue: &str, seen: u64, timeout: Duration) -> Result<u64> {
        let timeout = if self.listener_up.load(Ordering::Acquire) {
            timeout
        } else {
            timeout.min(self.poll_interval)
        };
        Ok(self.signals.wait(queue, seen, timeout).await)
    }

    async fn maintain(&self, m: &Maintenance) -> Result<MaintenanceReport> {
        let batch = i64::try_from(m.batch).unwrap_or(i64::MAX);
        let mut report = MaintenanceReport::default();
        let mut woken = HashSet::new();
        let rows = q(&self.sql.promote)
            .bind(batch)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(NAME, "promote due jobs"))?;
        report.promoted = rows.len() as u64;
        for r in rows {
            woken.insert(
                r.try_get::<String, _>(0)
                    .map_err(map_err(NAME, "promote due jobs"))?,
            );
        }
        let rows = q(&self.sql.expire)
            .bind(batch)
            .bind(LEASE_EXPIRED_PREFIX)
            .bind(LEASE_EXPIRED_OF)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(NAME, "recover expired leases"))?;
        for r in rows {
            let queue: String = r
                .try_get(0)
                .map_err(map_err(NAME, "recover expired leases"))?;
            let state: String = r
                .try_get(1)
                .map_err(map_err(NAME, "recover expired leases"))?;
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
            let left = m.batch as u64 - report.pruned.min(m.batch as u64);
            if left == 0 {
                break;
            }
            let done = q(sql)
                .bind(micros(ttl))
                .bind(i64::try_from(left).unwrap_or(i64::MAX))
                .execute(&self.pool)
                .await
                .map_err(map_err(NAME, "prune by retention"))?;
            report.pruned += done.rows_affected();
        }
        self.notify(&woken).await?;
        Ok(report)
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        let row = q(&self.sql.get)
            .bind(id.as_uuid())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err(NAME, "get a job"))?;
        row.as_ref()
            .map(|r| {
                decode_job(r).map_err(|b| b.error(NAME, || "with an unreadable id".to_owned()))
            })
            .transpose()
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        let rows = q(&self.sql.list)
            .bind(filter.state.map(|s| s.as_str()))
            .bind(filter.queue.as_deref())
            .bind(filter.name.as_deref())
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(i64::try_from(filter.offset).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(NAME, "list jobs"))?;
        let (jobs, bad) = decode_all(&rows);
        warn_skipped(NAME, &bad, |_| "with an unreadable id".to_owned());
        Ok(jobs)
    }

    async fn counts(&self, queue: Option<&str>) -> Result<Counts> {
        let rows = q(&self.sql.counts)
            .bind(queue)
            .fetch_all(&self.pool)
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
        let r = q(&self.sql.cancel)
            .bind(id.as_uuid())
            .execute(&self.pool)
            .await
            .map_err(map_err(NAME, "cancel a job"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn retry_dead(&self, id: JobId) -> Result<bool> {
        let rows = q(&self.sql.retry_dead)
            .bind(id.as_uuid())
            .bind(&self.channel)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(NAME, "retry a dead job"))?;
        for r in &rows {
            if let Ok(queue) = r.try_get::<String, _>(0) {
                self.signals.bump(&queue);
            }
        }
        Ok(!rows.is_empty())
    }

    async fn delete(&self, id: JobId) -> Result<bool> {
        let r = q(&self.sql.delete)
            .bind(id.as_uuid())
            .execute(&self.pool)
            .await
            .map_err(map_err(NAME, "delete a job"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn purge(&self, state: JobState, queue: Option<&str>) -> Result<u64> {
        if state == JobState::Running {
            return Err(Error::InvalidJob("running jobs cannot be purged".into()));
        }
        let r = q(&self.sql.purge)
            .bind(state.as_str())
            .bind(queue)
            .execute(&self.pool)
            .await
            .map_err(map_err(NAME, "purge jobs"))?;
        Ok(r.rows_affected())
    }

    async fn lock_acquire(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let r = q(&self.sql.lock_acquire)
            .bind(name)
            .bind(token_to_db(owner))
            .bind(micros(ttl))
            .execute(&self.pool)
            .await
            .map_err(map_err(NAME, "acquire a lock"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn lock_renew(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let r = q(&self.sql.lock_renew)
            .bind(name)
            .bind(token_to_db(owner))
            .bind(micros(ttl))
            .execute(&self.pool)
            .await
            .map_err(map_err(NAME, "renew a lock"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn lock_release(&self, name: &str, owner: LeaseToken) -> Result<bool> {
        let r = q(&self.sql.lock_release)
            .bind(name)
            .bind(token_to_db(owner))
            .execute(&self.pool)
            .await
            .map_err(map_err(NAME, "release a lock"))?;
        Ok(r.rows_affected() > 0)
    }
}

impl PgBackend {
    /// One claim: the jobs that read, and how many rows did not (made dead).
    async fn claim_once(&self, req: ClaimRequest<'_>) -> Result<(Vec<ClaimedJob>, usize)> {
        if req.limit == 0 || req.names.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let token = LeaseToken::random();
        let rows = q(&self.sql.claim)
            .bind(req.queue)
            .bind(req.names)
            .bind(i64::try_from(req.limit).unwrap_or(i64::MAX))
            .bind(token_to_db(token))
            .bind(micros(req.lease))
            .fetch_all(&self.claim_pool)
            .await
            .map_err(map_err(NAME, "claim"))?;
        let (jobs, bad) = decode_all(&rows);
        // A row that cannot be read costs only itself: made dead right away (under the claim's
        // token), with its reason; the others run.
        for (_, b) in &bad {
            let e = b.error(NAME, || "with an unreadable id".to_owned());
            let Some(id) = b.id else {
                // A uuid column always reads; left to its lease if it ever does not.
                tracing::error!(error = %ErrorChain(&e), "a claimed job cannot be read");
                continue;
            };
            let sql = mark_dead_sql(
                &self.table.qualified(),
                b,
                "now()",
                "id",
                ["$1", "$2", "$3"],
                true,
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(b.reason())
                .bind(id)
                .bind(token_to_db(token))
                .execute(&self.pool)
                .await
                .map_err(map_err(NAME, "mark an unreadable job dead"))?;
            tracing::error!(error = %ErrorChain(&e), "a claimed job cannot be read; it is dead");
        }
        let mut out: Vec<ClaimedJob> = jobs
            .into_iter()
            .map(|job| ClaimedJob { job, token })
            .collect();
        sort_claimed(&mut out);
        Ok((out, bad.len()))
    }
}
