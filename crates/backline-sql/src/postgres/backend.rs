//! The [`Backend`] impl of PostgreSQL, and its claim.

use super::*;

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
