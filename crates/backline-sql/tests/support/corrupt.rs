//! Rows Backline would never write, put straight into the table beside healthy jobs (as a
//! hand-written row, a migration script or another language's client would), and what each
//! dialect must make of them: on a table of schema version 1 (no constraints) each bad row costs
//! only itself; on the current schema the database refuses it; the migration repairs it.

use std::sync::Arc;
use std::time::Duration;

use backline_core::{Backend, Error, JobArgs, JobId, JobManager, JobServer, JobState};
use backline_sql::SqlBackend;
use backline_testkit::{fast_config, Recorder, Task, TaskHandler};

/// The SQL spelling of the literals a raw row needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    Mysql,
    Sqlite,
}

/// What becomes of a bad row on a table without constraints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Claimed, found unreadable, and made dead with its reason in the same call.
    Dead,
    /// The claim overwrites the bad value (the lease columns): it runs like any job.
    Runs,
    /// Never claimed (its state is no claimable one): only inspection meets it.
    Stays,
    /// Reads as NULL (MySQL's zero date in a nullable column): no reader trips over it, so it
    /// runs; the migration still makes it dead, as the constraint forbids it.
    ReadsAsNull,
}

/// One bad row: the column it spoils, the SQL literals it holds instead of the healthy ones,
/// and its fate.
pub(crate) struct Spoiled {
    pub(crate) column: &'static str,
    pub(crate) set: Vec<(&'static str, String)>,
    pub(crate) fate: Fate,
    /// Whether its id reads (a SQLite text id does not: it is found by counts only).
    pub(crate) id_reads: bool,
}

impl Spoiled {
    pub(crate) fn new(column: &'static str, value: impl Into<String>, fate: Fate) -> Spoiled {
        Spoiled {
            column,
            set: vec![(column, value.into())],
            fate,
            id_reads: column != "id",
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Dialect {
    fn bytes(self, b: &[u8]) -> String {
        match self {
            Dialect::Postgres => format!("'\\x{}'::bytea", hex(b)),
            Dialect::Mysql | Dialect::Sqlite => format!("X'{}'", hex(b)),
        }
    }

    fn id(self, id: JobId) -> String {
        match self {
            Dialect::Postgres => format!("'{}'::uuid", id.as_uuid()),
            _ => self.bytes(id.as_bytes()),
        }
    }

    fn now(self) -> String {
        match self {
            Dialect::Postgres => "now()".to_owned(),
            Dialect::Mysql => "UTC_TIMESTAMP(6)".to_owned(),
            Dialect::Sqlite => chrono::Utc::now().timestamp_micros().to_string(),
        }
    }

    /// A ready `testkit.task` at High priority (claimed before the healthy Normal ones), with
    /// `set` in place of the healthy values.
    fn insert(self, id: JobId, tag: &str, set: &[(&'static str, String)]) -> String {
        let payload = serde_json::to_vec(&Task::ok(tag)).expect("encode a task");
        let mut cols: Vec<(&str, String)> = vec![
            ("id", self.id(id)),
            ("name", format!("'{}'", Task::NAME)),
            ("queue", "'default'".to_owned()),
            ("payload", self.bytes(&payload)),
            ("priority", "25".to_owned()),
            ("state", "'ready'".to_owned()),
            ("attempt", "0".to_owned()),
            ("max_attempts", "5".to_owned()),
            ("timeout_ms", "NULL".to_owned()),
            ("enqueued_at", self.now()),
            ("run_at", self.now()),
            ("last_error", "NULL".to_owned()),
            ("lease_until", "NULL".to_owned()),
            ("finished_at", "NULL".to_owned()),
        ];
        for (c, v) in set {
            if let Some(slot) = cols.iter_mut().find(|(name, _)| name == c) {
                slot.1 = v.clone();
            }
        }
        format!(
            "INSERT INTO {{table}} ({}) VALUES ({})",
            cols.iter().map(|c| c.0).collect::<Vec<_>>().join(", "),
            cols.iter()
                .map(|c| c.1.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Runs `statement` (`{table}` filled in) on the backend's own pool. On MySQL the session's
/// `sql_mode` is emptied first, so that only the table's constraints can refuse a value (zero
/// dates and the like), as on a server configured that way.
pub(crate) async fn raw_exec(b: &SqlBackend, statement: &str) -> backline_core::Result<()> {
    let sql = statement.replace("{table}", &b.table().qualified());
    let err = |e: sqlx::Error| Error::Backend {
        backend: "test",
        op: "raw write",
        source: Box::new(e),
    };
    if let Some(pool) = b.pg_pool() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .map_err(err)?;
    } else if let Some(pool) = b.mysql_pool() {
        let mut conn = pool.acquire().await.map_err(err)?;
        sqlx::query("SET SESSION sql_mode = ''")
            .execute(&mut *conn)
            .await
            .map_err(err)?;
        let result = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await;
        // The relaxed session must not go back into the pool.
        conn.detach();
        result.map_err(err)?;
    } else if let Some(pool) = b.sqlite_pool() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .map_err(err)?;
    }
    Ok(())
}

/// The healthy jobs enqueued beside the bad rows.
const HEALTHY: usize = 14;

struct Written {
    healthy: Vec<JobId>,
    bad: Vec<(JobId, Spoiled)>,
}

async fn write_all(b: &SqlBackend, dialect: Dialect, spoiled: Vec<Spoiled>) -> Written {
    let manager = JobManager::new(b.clone());
    let mut healthy = Vec::new();
    for i in 0..HEALTHY {
        healthy.push(
            manager
                .enqueue(Task::ok(format!("healthy {i}")))
                .await
                .expect("enqueue a healthy job"),
        );
    }
    let mut bad = Vec::new();
    for s in spoiled {
        let id = JobId::new();
        let sql = dialect.insert(id, &format!("bad {}", s.column), &s.set);
        raw_exec(b, &sql).await.unwrap_or_else(|e| {
            panic!(
                "write a row with a bad {}: {}",
                s.column,
                backline_core::ErrorChain(&e)
            )
        });
        bad.push((id, s));
    }
    Written { healthy, bad }
}

fn assert_names(e: &Error, id: JobId, column: &str) {
    match e {
        Error::Undecodable { job, field, .. } => {
            assert_eq!(job, &id.to_string(), "the error names the job");
            assert!(
                field.contains(column),
                "the error names column {column}: {e}"
            );
        }
        other => panic!("expected Error::Undecodable naming {column}, got {other}"),
    }
}

/// On a table of schema version 1 (no constraints): inspection pages load and name each bad
/// row; a server runs every healthy job in its first attempt; each bad row meets its fate.
pub(crate) async fn bad_rows_cost_only_themselves(
    b: SqlBackend,
    dialect: Dialect,
    spoiled: Vec<Spoiled>,
) {
    let w = write_all(&b, dialect, spoiled).await;
    let manager = JobManager::new(b.clone());
    let all = backline_core::JobFilter::new().with_limit(1000);
    // Before any claim: get names the column, list skips the row, counts see every row.
    let mut readable = 0;
    for (id, s) in &w.bad {
        if s.fate == Fate::ReadsAsNull {
            readable += 1;
            assert!(b.get(*id).await.expect("get").is_some());
        } else if s.id_reads {
            let e = b.get(*id).await.expect_err("get on a bad row fails");
            assert_names(&e, *id, s.column);
        }
    }
    let listed = b.list(&all).await.expect("list loads despite bad rows");
    assert_eq!(
        listed.len(),
        HEALTHY + readable,
        "list shows the healthy jobs and skips the bad rows"
    );
    let counts = manager.counts(None).await.expect("counts");
    // A row in no known state has no bucket to be counted in.
    let stateless = w.bad.iter().filter(|(_, s)| s.fate == Fate::Stays).count();
    assert_eq!(
        counts.total() as usize,
        HEALTHY + w.bad.len() - stateless,
        "counts see every row in a known state"
    );

    let rec = Recorder::new();
    let backend: Arc<dyn Backend> = Arc::new(b.clone());
    let server = JobServer::builder(backend)
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(fast_config())
        .queue("default", 4)
        .build()
        .expect("build a server");
    tokio::time::timeout(Duration::from_secs(60), server.run_until_idle())
        .await
        .expect("the server drains within a minute")
        .expect("run until idle");

    for id in &w.healthy {
        let job = b
            .get(*id)
            .await
            .expect("get")
            .expect("the healthy job is kept");
        assert_eq!(job.state, JobState::Succeeded, "healthy job {id}");
        assert_eq!(job.attempt, 1, "healthy job {id} ran in its first attempt");
    }
    let mut dead = 0;
    for (id, s) in &w.bad {
        match s.fate {
            Fate::Dead => {
                dead += 1;
                if s.id_reads {
                    let job = b
                        .get(*id)
                        .await
                        .unwrap_or_else(|e| {
                            panic!("the dead row with a bad {} reads: {e}", s.column)
                        })
                        .expect("the bad row is kept");
                    assert_eq!(job.state, JobState::Dead, "the row with a bad {}", s.column);
                    let reason = job.last_error.unwrap_or_default();
                    assert!(
                        reason.contains(&format!("column {}", s.column)),
                        "its reason names column {}: {reason}",
                        s.column
                    );
                }
            }
            Fate::Runs | Fate::ReadsAsNull => {
                let job = b.get(*id).await.expect("get").expect("kept");
                assert_eq!(
                    job.state,
                    JobState::Succeeded,
                    "the row with a bad {}",
                    s.column
                );
            }
            Fate::Stays => {
                let e = b.get(*id).await.expect_err("still unreadable");
                assert_names(&e, *id, s.column);
            }
        }
    }
    let counts = manager.counts(None).await.expect("counts");
    assert_eq!(
        counts.dead as usize, dead,
        "every claimed bad row is dead, nothing else"
    );
    b.list(&all.clone().with_state(JobState::Dead))
        .await
        .expect("the dead page loads");
}

/// On the current schema the database refuses every one of these rows.
pub(crate) async fn the_schema_refuses_bad_rows(
    b: SqlBackend,
    dialect: Dialect,
    spoiled: Vec<Spoiled>,
) {
    for s in spoiled {
        let sql = dialect.insert(JobId::new(), "refused", &s.set);
        assert!(
            raw_exec(&b, &sql).await.is_err(),
            "a row with a bad {} ({:?}) is refused",
            s.column,
            s.set
        );
    }
    assert_eq!(
        JobManager::new(b)
            .counts(None)
            .await
            .expect("counts")
            .total(),
        0
    );
}

/// A table of version 1 with bad rows upgrades without losing a row: each bad row that its
/// rules cover is dead, readable, and names its column; the healthy jobs wait as before.
pub(crate) async fn the_migration_repairs_bad_rows(
    b: SqlBackend,
    dialect: Dialect,
    spoiled: Vec<Spoiled>,
) {
    let w = write_all(&b, dialect, spoiled).await;
    b.migrate().await.expect("migrate to the current schema");
    let manager = JobManager::new(b.clone());
    let counts = manager.counts(None).await.expect("counts");
    assert_eq!(
        counts.total() as usize,
        HEALTHY + w.bad.len(),
        "no row is lost"
    );
    for id in &w.healthy {
        let job = b.get(*id).await.expect("get").expect("kept");
        assert_eq!(job.state, JobState::Ready);
    }
    for (id, s) in &w.bad {
        if !s.id_reads {
            continue;
        }
        let job = b
            .get(*id)
            .await
            .unwrap_or_else(|e| panic!("the migrated row with a bad {} reads: {e}", s.column))
            .expect("kept");
        assert_eq!(job.state, JobState::Dead, "the row with a bad {}", s.column);
        let reason = job.last_error.unwrap_or_default();
        assert!(
            reason.contains(&format!("column {}", s.column)) && reason.contains("schema version 2"),
            "its reason names column {}: {reason}",
            s.column
        );
    }
}

/// The bad rows of each dialect: one per nullable or range-limited column, in the forms that
/// database can hold.
pub(crate) fn spoiled(dialect: Dialect) -> Vec<Spoiled> {
    use Fate::*;
    let mut rows = vec![
        Spoiled::new("timeout_ms", "-5", Dead),
        Spoiled::new("priority", "999", Dead),
        Spoiled::new("attempt", "-5", Dead),
        Spoiled::new("max_attempts", "0", Dead),
    ];
    match dialect {
        Dialect::Sqlite => rows.extend([
            Spoiled::new("timeout_ms", "'soon'", Dead),
            Spoiled::new("priority", "'high'", Dead),
            Spoiled::new("max_attempts", "'many'", Dead),
            Spoiled::new("enqueued_at", "'yesterday'", Dead),
            Spoiled::new("last_error", "X'ff00ff'", Dead),
            Spoiled::new("finished_at", "'done'", Dead),
            Spoiled::new("id", "'not-a-uuid'", Dead),
            Spoiled::new("lease_until", "'later'", Runs),
        ]),
        Dialect::Postgres => rows.extend([
            Spoiled::new("enqueued_at", "'-infinity'", Dead),
            Spoiled::new("run_at", "'-infinity'", Dead),
            Spoiled::new("finished_at", "'infinity'", Dead),
            Spoiled::new("lease_until", "'infinity'", Runs),
        ]),
        Dialect::Mysql => rows.extend([
            Spoiled::new("enqueued_at", "'0000-00-00 00:00:00'", Dead),
            Spoiled::new("run_at", "'0000-00-00 00:00:00'", Dead),
            Spoiled::new("finished_at", "'0000-00-00 00:00:00'", ReadsAsNull),
            Spoiled::new("lease_until", "'0000-00-00 00:00:00'", ReadsAsNull),
            Spoiled::new("state", "'bogus'", Stays),
        ]),
    }
    rows
}
