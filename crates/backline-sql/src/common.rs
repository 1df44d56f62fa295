//! What the drivers share: state names, the row → `Job` mapping, error mapping, tokens.

use std::collections::HashSet;
use std::time::Duration;

use backline_core::{Error, Finish, Job, JobId, JobState, LeaseToken, Priority};
use chrono::{DateTime, Utc};

/// The columns of a job as every statement that reads whole jobs selects them, in the order
/// [`decode_job`] reads them.
pub(crate) const COLUMNS: &str = "id, name, queue, payload, priority, state, attempt, max_attempts, timeout_ms, enqueued_at, run_at, last_error, lease_until, finished_at";

/// A column of a stored job whose value does not decode or is out of its range.
#[derive(Debug)]
pub(crate) struct BadColumn {
    /// The column's name.
    pub(crate) column: &'static str,
    /// What is wrong with its value, with the driver's message.
    pub(crate) problem: String,
}

/// A stored job that cannot be read: its id (when that column reads) and the first bad column.
#[derive(Debug)]
pub(crate) struct BadRow {
    /// The job's id; `None` when the id column itself does not decode (SQLite, whose columns
    /// take any value, finds such a row by its `rowid`).
    pub(crate) id: Option<uuid::Uuid>,
    /// The first column that does not decode.
    pub(crate) bad: BadColumn,
}

impl BadRow {
    /// The text stored as the job's `last_error` when it is made dead for this.
    pub(crate) fn reason(&self) -> String {
        format!(
            "the stored job cannot be read: column {}: {}",
            self.bad.column, self.bad.problem
        )
    }

    /// The typed error that `get` returns (and `list` logs) for this row.
    pub(crate) fn error(&self, backend: &'static str, key: impl FnOnce() -> String) -> Error {
        Error::Undecodable {
            backend,
            job: self
                .id
                .map_or_else(key, |id| JobId::from_uuid(id).to_string()),
            field: format!("column {}", self.bad.column),
            problem: self.bad.problem.clone(),
        }
    }

    /// The assignment that puts the bad column back in range when the job is made dead (the
    /// value it held is named in `last_error`), so that the dead job reads afterwards; `None`
    /// for the columns a dead job cannot do without (id, name, queue, payload, state).
    ///
    /// `now` is the dialect's current-time expression (or a literal), used for the times.
    pub(crate) fn repair(&self, now: &str) -> Option<String> {
        Some(match self.bad.column {
            "timeout_ms" => "timeout_ms = NULL".to_owned(),
            "priority" => format!("priority = {}", Priority::Normal.value()),
            "attempt" => "attempt = 0".to_owned(),
            "max_attempts" => "max_attempts = 1".to_owned(),
            // last_error, lease_until and finished_at are set by the statement that marks the
            // job dead; enqueued_at and run_at take the time it was marked.
            "enqueued_at" => format!("enqueued_at = {now}"),
            "run_at" => format!("run_at = {now}"),
            _ => return None,
        })
    }
}

/// The statement that makes one claimed job that cannot be read dead, with its reason as
/// `last_error` and its bad column repaired: `{table}`, the dialect's `now`, and the
/// placeholders of the reason, the row's key and the claim's token (in this order), filled in
/// by the caller. `key` is the column that finds the row (`id`, or SQLite's `rowid`).
pub(crate) fn mark_dead_sql(
    table: &str,
    bad: &BadRow,
    now: &str,
    key: &str,
    [reason, id, token]: [&str; 3],
    with_token: bool,
) -> String {
    let repair = bad
        .repair(now)
        .map(|r| format!(", {r}"))
        .unwrap_or_default();
    let fence = if with_token {
        format!(" AND lease_token = {token}")
    } else {
        String::new()
    };
    format!(
        "UPDATE {table} SET state = 'dead', last_error = {reason}, finished_at = {now},
            lease_token = NULL, lease_until = NULL{repair}
        WHERE {key} = {id}{fence}"
    )
}

/// How a driver reads the columns whose types differ between the databases; the rest of
/// [`decode_job`] is the same for all three.
pub(crate) trait JobRow: sqlx::Row {
    /// The id column (read first and on its own, so that a bad row can always be marked).
    fn job_id(&self) -> Result<uuid::Uuid, BadColumn>;
    /// A time column; `None` for SQL `NULL`.
    fn time(&self, column: &'static str) -> Result<Option<DateTime<Utc>>, BadColumn>;
}

/// The text of a driver's decode error without sqlx's "error occurred while decoding column"
/// wrapper (the column is named by [`BadColumn`]).
pub(crate) fn decode_problem(e: sqlx::Error) -> String {
    match e {
        sqlx::Error::ColumnDecode { source, .. } => backline_core::ErrorChain(&*source).to_string(),
        other => backline_core::ErrorChain(&other).to_string(),
    }
}

/// Reads one column, naming it on failure; on a type mismatch the value is quoted when it reads
/// as text (SQLite keeps any value in any column).
pub(crate) fn column<'r, R, T>(row: &'r R, name: &'static str) -> Result<T, BadColumn>
where
    R: JobRow,
    &'static str: sqlx::ColumnIndex<R>,
    T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    row.try_get::<T, _>(name).map_err(|e| {
        let mut problem = decode_problem(e);
        if let Ok(text) = row.try_get::<String, _>(name) {
            let shown: String = text.chars().take(64).collect();
            let more = if shown.len() < text.len() { "…" } else { "" };
            problem.push_str(&format!("; the stored value is the text {shown:?}{more}"));
        }
        BadColumn {
            column: name,
            problem,
        }
    })
}

fn out_of_range(column: &'static str, problem: String) -> BadColumn {
    BadColumn { column, problem }
}

/// Decodes a whole job from a row selected with [`COLUMNS`], checking every range the schema
/// promises (priority among the five levels, attempts and time limits not negative, at least
/// one attempt allowed, a known state).
pub(crate) fn decode_job<'r, R>(row: &'r R) -> Result<Job, BadRow>
where
    R: JobRow,
    &'static str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i16: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id = row.job_id().map_err(|bad| BadRow { id: None, bad })?;
    let rest = || -> Result<Job, BadColumn> {
        let required = |name: &'static str| -> Result<DateTime<Utc>, BadColumn> {
            row.time(name)?.ok_or_else(|| BadColumn {
                column: name,
                problem: "NULL in a column that needs a time".to_owned(),
            })
        };
        let state: String = column(row, "state")?;
        let state = JobState::parse(&state)
            .ok_or_else(|| out_of_range("state", format!("{state:?} is not a job state")))?;
        let priority: i16 = column(row, "priority")?;
        let levels = Priority::Low.value()..=Priority::High.value();
        if !levels.contains(&priority) {
            return Err(out_of_range(
                "priority",
                format!(
                    "{priority} is outside {}..={}",
                    levels.start(),
                    levels.end()
                ),
            ));
        }
        let attempt: i32 = column(row, "attempt")?;
        let attempt = u32::try_from(attempt)
            .map_err(|_| out_of_range("attempt", format!("{attempt} is negative")))?;
        let max_attempts: i32 = column(row, "max_attempts")?;
        let max_attempts = u32::try_from(max_attempts)
            .ok()
            .filter(|&m| m >= 1)
            .ok_or_else(|| {
                out_of_range(
                    "max_attempts",
                    format!("{max_attempts} allows no attempt (at least 1)"),
                )
            })?;
        let timeout_ms: Option<i64> = column(row, "timeout_ms")?;
        let timeout = timeout_ms
            .map(|ms| {
                u64::try_from(ms)
                    .map(Duration::from_millis)
                    .map_err(|_| out_of_range("timeout_ms", format!("{ms} is negative")))
            })
            .transpose()?;
        let mut job = Job::new(
            JobId::from_uuid(id),
            column::<_, String>(row, "name")?,
            column::<_, String>(row, "queue")?,
            column(row, "payload")?,
        );
        job.priority = Priority::from_value(priority);
        job.state = state;
        job.attempt = attempt;
        job.max_attempts = max_attempts;
        job.timeout = timeout;
        job.enqueued_at = required("enqueued_at")?;
        job.run_at = required("run_at")?;
        job.last_error = column(row, "last_error")?;
        job.lease_until = row.time("lease_until")?;
        job.finished_at = row.time("finished_at")?;
        Ok(job)
    };
    rest().map_err(|bad| BadRow { id: Some(id), bad })
}

/// The rows of a claim or a page, split into the jobs that read and the ones that do not.
pub(crate) fn decode_all<'r, R>(rows: &'r [R]) -> (Vec<Job>, Vec<(usize, BadRow)>)
where
    R: JobRow,
    &'static str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i16: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut jobs = Vec::with_capacity(rows.len());
    let mut bad = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        match decode_job(row) {
            Ok(job) => jobs.push(job),
            Err(b) => bad.push((i, b)),
        }
    }
    (jobs, bad)
}

/// Logs the rows a page of `list` skipped because they cannot be read.
pub(crate) fn warn_skipped(
    backend: &'static str,
    bad: &[(usize, BadRow)],
    key: impl Fn(usize) -> String,
) {
    for (i, b) in bad {
        let e = b.error(backend, || key(*i));
        tracing::warn!(error = %backline_core::ErrorChain(&e), "list skips a job that cannot be read");
    }
}

/// Claimed jobs in claim order (higher priority, earlier run-at, earlier id).
pub(crate) fn sort_claimed(jobs: &mut [backline_core::ClaimedJob]) {
    jobs.sort_by(|a, b| {
        (std::cmp::Reverse(a.job.priority), a.job.run_at, a.job.id).cmp(&(
            std::cmp::Reverse(b.job.priority),
            b.job.run_at,
            b.job.id,
        ))
    });
}

/// A token as stored (the bits of the `u64` in a signed 64-bit column).
pub(crate) fn token_to_db(t: LeaseToken) -> i64 {
    i64::from_ne_bytes(t.0.to_ne_bytes())
}

/// A stored token.
#[cfg(feature = "postgres")]
pub(crate) fn token_from_db(v: i64) -> LeaseToken {
    LeaseToken(u64::from_ne_bytes(v.to_ne_bytes()))
}

pub(crate) use backline_core::provider::micros;

/// Milliseconds of an optional timeout, saturating.
pub(crate) fn timeout_ms(d: Option<Duration>) -> Option<i64> {
    d.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The index of the first finish item of each job: a later item for the same job never
/// applies (the first one ended the claim), so only these are sent to the database.
pub(crate) fn first_per_job(batch: &[Finish]) -> Vec<usize> {
    let mut seen = HashSet::with_capacity(batch.len());
    (0..batch.len())
        .filter(|&i| seen.insert(batch[i].id))
        .collect()
}

/// `?, ?, …` for `n` parameters.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// The most ids bound in one `IN (…)` list.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) const ID_CHUNK: usize = 500;

/// A finish batch split by what can be written in one statement per group: the items whose
/// token is the current one (`held`: job → token of its running claim), by outcome.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
#[derive(Default)]
pub(crate) struct FinishPlan {
    /// Succeeded, not kept: deleted.
    pub(crate) drop: Vec<usize>,
    /// Succeeded and kept.
    pub(crate) succeeded: Vec<usize>,
    /// Handed back.
    pub(crate) release: Vec<usize>,
    /// Retries and dead jobs, each with its own delay or error: one statement each.
    pub(crate) one_by_one: Vec<usize>,
}

#[cfg(any(feature = "sqlite", feature = "mysql"))]
impl FinishPlan {
    pub(crate) fn new(
        batch: &[Finish],
        held: &std::collections::HashMap<JobId, i64>,
    ) -> FinishPlan {
        use backline_core::Outcome;
        let mut plan = FinishPlan::default();
        for i in first_per_job(batch) {
            let f = &batch[i];
            if held.get(&f.id) != Some(&token_to_db(f.token)) {
                continue;
            }
            match f.outcome {
                Outcome::Succeeded { keep: false } => plan.drop.push(i),
                Outcome::Succeeded { keep: true } => plan.succeeded.push(i),
                Outcome::Retry { .. } | Outcome::Dead { .. } => plan.one_by_one.push(i),
                // Release, and an outcome this version does not know: the job is handed back.
                _ => plan.release.push(i),
            }
        }
        plan
    }
}

/// Maps a driver error: connection trouble is [`Error::Connection`], the rest [`Error::Backend`].
pub(crate) fn map_err(backend: &'static str, op: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Error::Connection {
            backend,
            op,
            source: Box::new(e),
        },
        // SQLSTATE class 08 (connection exception) and 57 (operator intervention: the server
        // is shutting down or killed this session) are connection trouble too.
        sqlx::Error::Database(ref db)
            if db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57")) =>
        {
            Error::Connection {
                backend,
                op,
                source: Box::new(e),
            }
        }
        other => Error::Backend {
            backend,
            op,
            source: Box::new(other),
        },
    }
}

/// Per-queue wake-up counters fed by pushes in this process (and NOTIFY on PostgreSQL): core's
/// toolkit type.
pub(crate) type Signals = backline_core::provider::WakeSignals;

/// Opens one connection and closes it, so that an unreachable server is reported with its real
/// cause ("connection refused", "unknown database") instead of the pool's "timed out".
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) async fn probe<O>(
    backend: &'static str,
    options: &O,
    timeout: std::time::Duration,
) -> Result<(), Error>
where
    O: sqlx::ConnectOptions,
    O::Connection: Sized,
{
    use sqlx::Connection as _;
    match tokio::time::timeout(timeout, options.connect()).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(map_err(backend, "connect")(e)),
        Err(_) => Err(Error::Timeout {
            op: "connect",
            after: timeout,
        }),
    }
}

/// The three SQL dialects, where a statement shared by them is spelled differently.
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    not(all(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]
pub(crate) enum Flavor {
    /// PostgreSQL: typed columns, `||`, `'infinity'` times.
    Postgres,
    /// MySQL and MariaDB: typed columns, `CONCAT`, zero dates.
    MySql,
    /// SQLite: any value in any column of a table that is not `STRICT`.
    Sqlite,
}

impl Flavor {
    fn concat(self, parts: &[String]) -> String {
        match self {
            Flavor::MySql => format!("CONCAT({})", parts.join(", ")),
            _ => parts.join(" || "),
        }
    }

    /// A value shown as text in a reason.
    fn text(self, column: &str) -> String {
        match self {
            Flavor::Postgres => format!("CAST({column} AS text)"),
            Flavor::MySql => format!("CAST({column} AS CHAR)"),
            Flavor::Sqlite => format!("quote({column})"),
        }
    }

    /// The test that a value of a time column is no point in time.
    fn bad_time(self, column: &str) -> String {
        match self {
            Flavor::Postgres => format!("NOT ({column} > '-infinity' AND {column} < 'infinity')"),
            Flavor::MySql => format!("{column} < '1000-01-01'"),
            Flavor::Sqlite => format!("typeof({column}) <> 'integer'"),
        }
    }

    /// On SQLite, `test` also holds for a value of the wrong type (`null_ok`: NULL is fine).
    fn typed(self, column: &str, ty: &str, null_ok: bool, test: &str) -> String {
        match self {
            Flavor::Sqlite => {
                let types = if null_ok {
                    format!("'{ty}', 'null'")
                } else {
                    format!("'{ty}'")
                };
                format!("(typeof({column}) NOT IN ({types}) OR {test})")
            }
            _ => format!("({test})"),
        }
    }
}

/// What the constraints of schema version 2 allow, as one test per column: the bad value's
/// test, its description, and what it becomes when the row is made dead.
fn rules(f: Flavor, now: &str) -> Vec<(String, &'static str, String)> {
    let (lo, hi) = (Priority::Low.value(), Priority::High.value());
    let mut rules = vec![
        (
            f.typed(
                "priority",
                "integer",
                false,
                &format!("priority NOT BETWEEN {lo} AND {hi}"),
            ),
            "priority",
            Priority::Normal.value().to_string(),
        ),
        (
            f.typed("attempt", "integer", false, "attempt < 0"),
            "attempt",
            "0".to_owned(),
        ),
        (
            f.typed("max_attempts", "integer", false, "max_attempts < 1"),
            "max_attempts",
            "1".to_owned(),
        ),
        (
            f.typed("timeout_ms", "integer", true, "timeout_ms < 0"),
            "timeout_ms",
            "NULL".to_owned(),
        ),
        (f.bad_time("enqueued_at"), "enqueued_at", now.to_owned()),
        (f.bad_time("run_at"), "run_at", now.to_owned()),
        (
            format!(
                "(lease_until IS NOT NULL AND {})",
                f.bad_time("lease_until")
            ),
            "lease_until",
            "NULL".to_owned(),
        ),
        (
            format!(
                "(finished_at IS NOT NULL AND {})",
                f.bad_time("finished_at")
            ),
            "finished_at",
            now.to_owned(),
        ),
    ];
    match f {
        // PostgreSQL's and SQLite's first schema already checks the state.
        Flavor::MySql => rules.push((
            format!("state NOT IN ({})", state_list()),
            "state",
            "'dead'".to_owned(),
        )),
        Flavor::Sqlite => {
            rules.push((
                "typeof(lease_token) NOT IN ('integer', 'null')".to_owned(),
                "lease_token",
                "NULL".to_owned(),
            ));
            rules.push((
                "typeof(last_error) NOT IN ('text', 'null')".to_owned(),
                "last_error",
                "NULL".to_owned(),
            ));
        }
        Flavor::Postgres => {}
    }
    rules
}

/// `'scheduled', 'ready', …`: every state, quoted.
pub(crate) fn state_list() -> String {
    JobState::ALL
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The statement run before the constraints of schema version 2 are added to a table of
/// version 1: every row that would break one is made dead, its bad values put back in range,
/// and its `last_error` names each column and the value it held (and keeps the error it had).
/// No row is deleted. `{table}` is left for the migration to fill in.
pub(crate) fn repair_sql(f: Flavor, now: &str) -> String {
    let rules = rules(f, now);
    let any = rules
        .iter()
        .map(|(bad, _, _)| bad.as_str())
        .collect::<Vec<_>>()
        .join(" OR ");
    let notes = rules
        .iter()
        .map(|(bad, column, _)| {
            format!(
                "CASE WHEN {bad} THEN {} ELSE '' END",
                f.concat(&[format!("'; column {column} held '"), f.text(column)])
            )
        })
        .collect::<Vec<_>>();
    let listed = f.concat(&notes);
    let reason = f.concat(&[
        "'the stored job broke the constraints of schema version 2 (repaired by the migration)'"
            .to_owned(),
        listed,
        format!(
            "COALESCE({}, '')",
            f.concat(&["'; its last error was: '".to_owned(), f.text("last_error")])
        ),
    ]);
    let mut sets = vec![
        format!("last_error = {reason}"),
        "state = 'dead'".to_owned(),
        "lease_token = NULL".to_owned(),
        "lease_until = NULL".to_owned(),
    ];
    for (bad, column, repair) in &rules {
        if matches!(
            *column,
            "state" | "last_error" | "lease_token" | "lease_until" | "finished_at"
        ) {
            continue;
        }
        sets.push(format!(
            "{column} = CASE WHEN {bad} THEN {repair} ELSE {column} END"
        ));
    }
    sets.push(format!(
        "finished_at = COALESCE(CASE WHEN {} THEN NULL ELSE finished_at END, {now})",
        rules
            .iter()
            .find(|r| r.1 == "finished_at")
            .map_or("FALSE".to_owned(), |r| r.0.clone())
    ));
    // MySQL applies SET assignments left to right, each seeing the columns set before it: the
    // reason must be computed before the values it names are repaired. It is, as `last_error`
    // comes first; `finished_at` is repaired last, after every test that reads it.
    format!("UPDATE {{table}} SET {} WHERE {any}", sets.join(", "))
}

/// The `CHECK` of schema version 2 on the numbers: priority among the five levels, attempts
/// and time limits not negative, at least one attempt.
pub(crate) fn ranges_check() -> String {
    format!(
        "priority BETWEEN {} AND {} AND attempt >= 0 AND max_attempts >= 1 AND (timeout_ms IS NULL OR timeout_ms >= 0)",
        Priority::Low.value(),
        Priority::High.value()
    )
}

/// What every SQL dialect can do: everything the SPI has, transactional enqueue included;
/// `durable` is false only for an in-memory SQLite database.
pub(crate) fn capabilities(durable: bool) -> backline_core::Capabilities {
    backline_core::Capabilities::NONE
        .with_dedup_by_id(true)
        .with_filter_by_name(true)
        .with_get_job(true)
        .with_list_jobs(true)
        .with_cancel(true)
        .with_transactional_enqueue(true)
        .with_locks(true)
        .with_durable(durable)
        .with_lease_expiry(true)
        .with_run_at_order(true)
        .with_list_dead(true)
        .with_priorities(true)
}
