//! The [`Backend`] impl of SQLite, and its claim.

use super::*;

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
