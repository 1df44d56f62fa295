//! The [`Backend`] impl of MySQL/MariaDB, and its claim.

use super::*;

#[async_trait]
impl Backend for MySqlBackend {
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
        let err = map_err(NAME, "finish");
        let t = &self.t;
        let mut out = vec![false; batch.len()];
        let mut tx = self.tx("finish").await?;
        // Lock the rows and read their tokens, then write each group in one statement.
        let mut held = HashMap::with_capacity(batch.len());
        for chunk in batch.chunks(ID_CHUNK) {
            let mut query = sqlx::query(AssertSqlSafe(self.lease_select(slots(chunk.len()))));
            for i in 0..slots(chunk.len()) {
                query = query.bind(chunk[i.min(chunk.len() - 1)].id.as_bytes().to_vec());
            }
            for r in query.fetch_all(&mut *tx).await.map_err(&err)? {
                let id: Vec<u8> = r.try_get(0).map_err(&err)?;
                let token: Option<i64> = r.try_get(1).map_err(&err)?;
                if let (Ok(id), Some(token)) = (uuid::Uuid::from_slice(&id), token) {
                    held.insert(JobId::from_uuid(id), token);
                }
            }
        }
        let plan = FinishPlan::new(batch, &held);
        let groups: [(&[usize], String); 3] = [
            (&plan.drop, format!("DELETE FROM {t} WHERE id IN ")),
            (
                &plan.succeeded,
                format!(
                    "UPDATE {t} SET state = 'succeeded', finished_at = UTC_TIMESTAMP(6),
                        lease_token = NULL, lease_until = NULL WHERE id IN "
                ),
            ),
            (
                &plan.release,
                format!(
                    "UPDATE {t} SET state = 'ready', attempt = GREATEST(attempt - 1, 0),
                        lease_token = NULL, lease_until = NULL WHERE id IN "
                ),
            ),
        ];
        for (items, prefix) in &groups {
            for chunk in items.chunks(ID_CHUNK) {
                let mut query = sqlx::query(AssertSqlSafe(format!(
                    "{prefix}({})",
                    placeholders(slots(chunk.len()))
                )));
                for k in 0..slots(chunk.len()) {
                    query = query.bind(batch[chunk[k.min(chunk.len() - 1)]].id.as_bytes().to_vec());
                }
                query.execute(&mut *tx).await.map_err(&err)?;
                for &i in chunk {
                    out[i] = true;
                }
            }
        }
        let mut wake = !plan.release.is_empty();
        for &i in &plan.one_by_one {
            let f = &batch[i];
            let id = f.id.as_bytes().to_vec();
            let query = match &f.outcome {
                Outcome::Retry { delay, error } => {
                    wake |= delay.is_zero();
                    sqlx::query(AssertSqlSafe(format!(
                        "UPDATE {t} SET state = IF(? <= 0, 'ready', 'retrying'),
                            run_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, last_error = ?,
                            lease_token = NULL, lease_until = NULL
                        WHERE id = ?"
                    )))
                    .bind(micros(*delay))
                    .bind(micros(*delay))
                    .bind(error.clone())
                    .bind(id)
                }
                Outcome::Dead { error } => sqlx::query(AssertSqlSafe(format!(
                    "UPDATE {t} SET state = 'dead', finished_at = UTC_TIMESTAMP(6), last_error = ?,
                        lease_token = NULL, lease_until = NULL
                    WHERE id = ?"
                )))
                .bind(error.clone())
                .bind(id),
                _ => continue,
            };
            query.execute(&mut *tx).await.map_err(&err)?;
            out[i] = true;
        }
        tx.commit().await.map_err(&err)?;
        if wake {
            self.signals.bump_all();
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
        let err = map_err(NAME, "heartbeat");
        let t = &self.t;
        let mut tx = self.tx("heartbeat").await?;
        let mut held = HashMap::with_capacity(leases.len());
        for chunk in leases.chunks(ID_CHUNK) {
            let mut query = sqlx::query(AssertSqlSafe(self.lease_select(slots(chunk.len()))));
            for i in 0..slots(chunk.len()) {
                query = query.bind(chunk[i.min(chunk.len() - 1)].0.as_bytes().to_vec());
            }
            for r in query.fetch_all(&mut *tx).await.map_err(&err)? {
                let id: Vec<u8> = r.try_get(0).map_err(&err)?;
                let token: Option<i64> = r.try_get(1).map_err(&err)?;
                if let (Ok(id), Some(token)) = (uuid::Uuid::from_slice(&id), token) {
                    held.insert(JobId::from_uuid(id), token);
                }
            }
        }
        let out: Vec<bool> = leases
            .iter()
            .map(|(id, token)| held.get(id) == Some(&token_to_db(*token)))
            .collect();
        let mut extend: Vec<&JobId> = leases
            .iter()
            .zip(&out)
            .filter(|(_, ok)| **ok)
            .map(|((id, _), _)| id)
            .collect();
        extend.dedup();
        for chunk in extend.chunks(ID_CHUNK) {
            let mut query = sqlx::query(AssertSqlSafe(format!(
                "UPDATE {t} SET lease_until = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND WHERE id IN ({})",
                placeholders(slots(chunk.len()))
            )))
            .bind(micros(lease));
            for i in 0..slots(chunk.len()) {
                query = query.bind(chunk[i.min(chunk.len() - 1)].as_bytes().to_vec());
            }
            query.execute(&mut *tx).await.map_err(&err)?;
        }
        tx.commit().await.map_err(&err)?;
        Ok(out)
    }

    async fn wait(&self, queue: &str, seen: u64, timeout: Duration) -> Result<u64> {
        Ok(self
            .signals
            .wait(queue, seen, timeout.min(self.poll_interval))
            .await)
    }

    async fn maintain(&self, m: &Maintenance) -> Result<MaintenanceReport> {
        let err = map_err(NAME, "maintain");
        let t = &self.t;
        let batch = i64::try_from(m.batch).unwrap_or(i64::MAX);
        let mut report = MaintenanceReport::default();
        let mut woken: HashSet<String> = HashSet::new();

        // Promote due jobs: scheduled ones, then retrying ones (one ordered range each).
        let mut tx = self.tx("promote due jobs").await?;
        let mut rows = Vec::new();
        for state in ["scheduled", "retrying"] {
            let left = batch - i64::try_from(rows.len()).unwrap_or(i64::MAX);
            if left <= 0 {
                break;
            }
            rows.extend(
                sqlx::query(AssertSqlSafe(self.promote_select()))
                    .bind(state)
                    .bind(left)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(&err)?,
            );
        }
        if !rows.is_empty() {
            let mut update = sqlx::query(AssertSqlSafe(format!(
                "UPDATE {t} SET state = 'ready' WHERE id IN ({})",
                placeholders(rows.len())
            )));
            for r in &rows {
                update = update.bind(r.try_get::<Vec<u8>, _>(0).map_err(&err)?);
                woken.insert(r.try_get(1).map_err(&err)?);
            }
            update.execute(&mut *tx).await.map_err(&err)?;
            report.promoted = rows.len() as u64;
        }
        tx.commit().await.map_err(&err)?;

        // Recover expired leases.
        let mut tx = self.tx("recover expired leases").await?;
        let rows = sqlx::query(AssertSqlSafe(self.recover_select()))
            .bind(batch)
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        if !rows.is_empty() {
            let mut update = sqlx::query(AssertSqlSafe(format!(
                "UPDATE {t} SET
                    last_error = CONCAT(?, attempt,
                        IF(attempt >= max_attempts, CONCAT(?, max_attempts), '')),
                    finished_at = IF(attempt >= max_attempts, UTC_TIMESTAMP(6), NULL),
                    state = IF(attempt >= max_attempts, 'dead', 'ready'),
                    lease_token = NULL, lease_until = NULL
                WHERE id IN ({})",
                placeholders(rows.len())
            )));
            update = update.bind(LEASE_EXPIRED_PREFIX).bind(LEASE_EXPIRED_OF);
            for r in &rows {
                update = update.bind(r.try_get::<Vec<u8>, _>(0).map_err(&err)?);
                let last: i64 = r.try_get(2).map_err(&err)?;
                if last != 0 {
                    report.expired_dead += 1;
                } else {
                    report.recovered += 1;
                    woken.insert(r.try_get(1).map_err(&err)?);
                }
            }
            update.execute(&mut *tx).await.map_err(&err)?;
        }
        tx.commit().await.map_err(&err)?;

        // Retention.
        for (state, ttl) in [("succeeded", m.succeeded_ttl), ("dead", m.dead_ttl)] {
            let left = (m.batch as u64).saturating_sub(report.pruned);
            if left == 0 {
                break;
            }
            let r = sqlx::query(AssertSqlSafe(self.prune_delete(state)))
                .bind(micros(ttl))
                .bind(i64::try_from(left).unwrap_or(i64::MAX))
                .execute(&self.pool)
                .await
                .map_err(&err)?;
            report.pruned += r.rows_affected();
        }
        for q in &woken {
            self.signals.bump(q);
        }
        Ok(report)
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM {} WHERE id = ?",
            self.t
        )))
        .bind(id.as_bytes().to_vec())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err(NAME, "get a job"))?;
        row.as_ref()
            .map(|r| decode_job(r).map_err(|b| b.error(NAME, unreadable_id)))
            .transpose()
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        let mut sql = format!("SELECT {COLUMNS} FROM {} WHERE 1 = 1", self.t);
        let mut args: Vec<String> = Vec::new();
        if let Some(s) = filter.state {
            sql.push_str(" AND state = ?");
            args.push(s.as_str().to_owned());
        }
        if let Some(q) = &filter.queue {
            sql.push_str(" AND queue = ?");
            args.push(q.clone());
        }
        if let Some(n) = &filter.name {
            sql.push_str(" AND name = ?");
            args.push(n.clone());
        }
        sql.push_str(" ORDER BY id LIMIT ? OFFSET ?");
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for a in args {
            query = query.bind(a);
        }
        let rows = query
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(i64::try_from(filter.offset).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(NAME, "list jobs"))?;
        let (jobs, bad) = decode_all(&rows);
        warn_skipped(NAME, &bad, |_| unreadable_id());
        Ok(jobs)
    }

    async fn counts(&self, queue: Option<&str>) -> Result<Counts> {
        let err = map_err(NAME, "count jobs");
        let rows = match queue {
            Some(q) => sqlx::query(AssertSqlSafe(format!(
                "SELECT state, COUNT(*) FROM {} WHERE queue = ? GROUP BY state",
                self.t
            )))
            .bind(q.to_owned()),
            None => sqlx::query(AssertSqlSafe(format!(
                "SELECT state, COUNT(*) FROM {} GROUP BY state",
                self.t
            ))),
        }
        .fetch_all(&self.pool)
        .await
        .map_err(&err)?;
        let mut c = Counts::default();
        for r in rows {
            let state: String = r.try_get(0).map_err(&err)?;
            let n: i64 = r.try_get(1).map_err(&err)?;
            if let Some(s) = JobState::parse(&state) {
                *c.get_mut(s) += u64::try_from(n).unwrap_or(0);
            }
        }
        Ok(c)
    }

    async fn cancel(&self, id: JobId) -> Result<bool> {
        let r = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE id = ? AND state IN ('scheduled', 'ready', 'retrying')",
            self.t
        )))
        .bind(id.as_bytes().to_vec())
        .execute(&self.pool)
        .await
        .map_err(map_err(NAME, "cancel a job"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn retry_dead(&self, id: JobId) -> Result<bool> {
        let r = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET state = 'ready', attempt = 0, finished_at = NULL, run_at = UTC_TIMESTAMP(6),
                lease_token = NULL, lease_until = NULL
            WHERE id = ? AND state = 'dead'",
            self.t
        )))
        .bind(id.as_bytes().to_vec())
        .execute(&self.pool)
        .await
        .map_err(map_err(NAME, "retry a dead job"))?;
        if r.rows_affected() > 0 {
            self.signals.bump_all();
        }
        Ok(r.rows_affected() > 0)
    }

    async fn delete(&self, id: JobId) -> Result<bool> {
        let r = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE id = ? AND state <> 'running'",
            self.t
        )))
        .bind(id.as_bytes().to_vec())
        .execute(&self.pool)
        .await
        .map_err(map_err(NAME, "delete a job"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn purge(&self, state: JobState, queue: Option<&str>) -> Result<u64> {
        if state == JobState::Running {
            return Err(Error::InvalidJob("running jobs cannot be purged".into()));
        }
        let r = match queue {
            Some(q) => sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {} WHERE state = ? AND queue = ?",
                self.t
            )))
            .bind(state.as_str())
            .bind(q.to_owned()),
            None => sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {} WHERE state = ?",
                self.t
            )))
            .bind(state.as_str()),
        }
        .execute(&self.pool)
        .await
        .map_err(map_err(NAME, "purge jobs"))?;
        Ok(r.rows_affected())
    }

    async fn lock_acquire(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let err = map_err(NAME, "acquire a lock");
        let l = &self.locks;
        let mut tx = self.tx("acquire a lock").await?;
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {l} WHERE name = ? AND expires_at <= UTC_TIMESTAMP(6)"
        )))
        .bind(name.to_owned())
        .execute(&mut *tx)
        .await
        .map_err(&err)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {l} (name, owner, expires_at) VALUES (?, ?, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND)
            ON DUPLICATE KEY UPDATE expires_at = IF(owner = VALUES(owner), VALUES(expires_at), expires_at)"
        )))
        .bind(name.to_owned())
        .bind(token_to_db(owner))
        .bind(micros(ttl))
        .execute(&mut *tx)
        .await
        .map_err(&err)?;
        let holder: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT owner FROM {l} WHERE name = ?"
        )))
        .bind(name.to_owned())
        .fetch_optional(&mut *tx)
        .await
        .map_err(&err)?;
        tx.commit().await.map_err(&err)?;
        Ok(holder == Some(token_to_db(owner)))
    }

    async fn lock_renew(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let r = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND
            WHERE name = ? AND owner = ? AND expires_at > UTC_TIMESTAMP(6)",
            self.locks
        )))
        .bind(micros(ttl))
        .bind(name.to_owned())
        .bind(token_to_db(owner))
        .execute(&self.pool)
        .await
        .map_err(map_err(NAME, "renew a lock"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn lock_release(&self, name: &str, owner: LeaseToken) -> Result<bool> {
        let r = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE name = ? AND owner = ?",
            self.locks
        )))
        .bind(name.to_owned())
        .bind(token_to_db(owner))
        .execute(&self.pool)
        .await
        .map_err(map_err(NAME, "release a lock"))?;
        Ok(r.rows_affected() > 0)
    }
}

impl MySqlBackend {
    /// One claim: the jobs that read, and how many rows did not (made dead).
    async fn claim_once(&self, req: ClaimRequest<'_>) -> Result<(Vec<ClaimedJob>, usize)> {
        if req.limit == 0 || req.names.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let err = map_err(NAME, "claim");
        let token = LeaseToken::random();
        let mut tx = self.tx("claim").await?;
        let mut query = sqlx::query(AssertSqlSafe(self.claim_select(req.names.len())))
            .bind(req.queue.to_owned());
        for n in req.names {
            query = query.bind(n.clone());
        }
        let rows = query
            .bind(i64::try_from(req.limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        if rows.is_empty() {
            tx.commit().await.map_err(&err)?;
            return Ok((Vec::new(), 0));
        }
        let db_now: DateTime<Utc> = rows[0].try_get("db_now").map_err(&err)?;
        let lease_until = add(db_now, req.lease);
        let (jobs, bad) = decode_all(&rows);
        // A row that cannot be read costs only itself: made dead in the same transaction (its
        // row is locked by the select), with its reason; the others run.
        for (_, b) in &bad {
            let e = b.error(NAME, unreadable_id);
            let Some(id) = b.id else {
                tracing::error!(error = %ErrorChain(&e), "a claimed job cannot be read");
                continue;
            };
            let sql = mark_dead_sql(&self.t, b, "UTC_TIMESTAMP(6)", "id", ["?", "?", "?"], false);
            sqlx::query(AssertSqlSafe(sql))
                .bind(b.reason())
                .bind(id.as_bytes().to_vec())
                .execute(&mut *tx)
                .await
                .map_err(map_err(NAME, "mark an unreadable job dead"))?;
            tracing::error!(error = %ErrorChain(&e), "a claimed job cannot be read; it is dead");
        }
        if jobs.is_empty() {
            tx.commit().await.map_err(&err)?;
            return Ok((Vec::new(), bad.len()));
        }
        let sql = format!(
            "UPDATE {} SET state = 'running', attempt = attempt + 1, lease_token = ?, lease_until = ?
            WHERE id IN ({})",
            self.t,
            placeholders(slots(jobs.len()))
        );
        let mut update = sqlx::query(AssertSqlSafe(sql))
            .bind(token_to_db(token))
            .bind(lease_until);
        let mut out = Vec::with_capacity(jobs.len());
        for mut j in jobs {
            update = update.bind(j.id.as_bytes().to_vec());
            j.state = JobState::Running;
            j.attempt += 1;
            j.lease_until = Some(lease_until);
            out.push(ClaimedJob { job: j, token });
        }
        if let Some(last) = out.last() {
            for _ in out.len()..slots(out.len()) {
                update = update.bind(last.job.id.as_bytes().to_vec());
            }
        }
        update.execute(&mut *tx).await.map_err(&err)?;
        tx.commit().await.map_err(&err)?;
        sort_claimed(&mut out);
        Ok((out, bad.len()))
    }
}
