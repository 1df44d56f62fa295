//! PostgreSQL: one-statement claims (`UPDATE … WHERE id = ANY(ARRAY(SELECT … SKIP LOCKED))`) and
//! wake-ups through `LISTEN/NOTIFY`.

mod backend;
mod listen;
mod statements;

use statements::Sql;

use listen::listen_loop;

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
