//! One job per commit (single-row `INSERT`s, with and without `NOTIFY`; single-row commits on
//! SQLite): the limit of one-by-one enqueue.

use super::*;

/// One-by-one inserts, one job per commit: the limit of one-by-one enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Single {
    /// A single-row `INSERT` per commit.
    Insert,
    /// PostgreSQL: a single-row `INSERT` and a `NOTIFY` per commit.
    InsertNotify,
}

impl Single {
    /// The connections: 32 on the servers, SQLite's one writer.
    pub(super) fn conns(db: Db, plan: &Plan) -> usize {
        if db == Db::Sqlite {
            1
        } else {
            plan.enqueue_tasks
        }
    }

    pub(super) fn id(self, db: Db, plan: &Plan) -> String {
        let what = match self {
            Single::Insert if db == Db::Sqlite => "commit",
            Single::Insert => "insert",
            Single::InsertNotify => "insert_notify",
        };
        format!("raw_{what}_c{}", Single::conns(db, plan))
    }

    pub(super) fn label(self, db: Db, plan: &Plan) -> String {
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
    pub(super) async fn run(self, db: Db, n: usize, conns: usize) -> Result<f64> {
        let fresh = FreshTable::create(db).await?;
        let result = self.run_on(&fresh, n, conns).await;
        fresh.dispose().await;
        result
    }

    pub(super) async fn run_on(self, fresh: &FreshTable, n: usize, conns: usize) -> Result<f64> {
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
pub(super) async fn warm<DB: sqlx::Database>(pool: &sqlx::Pool<DB>, conns: usize) -> Result<()> {
    let mut held = Vec::with_capacity(conns);
    for _ in 0..conns {
        held.push(pool.acquire().await?);
    }
    Ok(())
}

/// The single-row rows of `db`: `INSERT`s (and on PostgreSQL `INSERT` + `NOTIFY`), one job per
/// commit, `plan.slow_runs` runs each, as many jobs as the one-by-one enqueue.
pub(super) async fn single_rows(db: Db, plan: &Plan) -> Result<Vec<Row>> {
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
