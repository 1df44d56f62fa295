//! The raw claim loops: the server's limit for a drain, in plain SQL through sqlx on the same
//! table and indexes as Backline.

use super::*;

/// Times `conns` concurrent loops, each returning how many jobs it completed; fails unless
/// `n` were completed in all; jobs/s.
pub(super) async fn timed<F, Fut>(n: usize, conns: usize, mut make: F) -> Result<f64>
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
pub(super) enum Complete {
    /// Marks the rows succeeded (rows kept).
    Update,
    /// Deletes them.
    Delete,
}

/// One raw measurement: a fresh table with `n` jobs, then `conns` loops of batches of `batch`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Raw {
    conns: usize,
    batch: usize,
    complete: Complete,
}

impl Raw {
    pub(super) fn id(self, db: Db) -> String {
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

    pub(super) fn label(self, db: Db) -> String {
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
    pub(super) async fn run(self, db: Db, n: usize) -> Result<f64> {
        let fresh = FreshTable::create(db).await?;
        let result = self.run_on(&fresh, n).await;
        fresh.dispose().await;
        result
    }

    pub(super) async fn run_on(self, fresh: &FreshTable, n: usize) -> Result<f64> {
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
pub(super) fn pg_sql(t: &str, complete: Complete) -> (Arc<str>, Arc<str>) {
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
pub(super) async fn pg_loop(
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
pub(super) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `SELECT … FOR UPDATE SKIP LOCKED`, then `DELETE` or `UPDATE` of those ids, in one
/// `READ COMMITTED` transaction per batch (Backline's pool sets the isolation level on every
/// connection), until nothing is left; jobs completed.
pub(super) async fn mysql_loop(
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
pub(super) fn is_deadlock(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40001" || c == "HY000" && e.to_string().contains("1205"))
}

/// Deletes or completes the claimed rows in the claim's transaction; rows changed.
pub(super) async fn mysql_complete(
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
pub(super) async fn sqlite_loop(
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
pub(super) fn raws(db: Db, plan: &Plan) -> Vec<Raw> {
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
