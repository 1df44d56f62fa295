//! The [`Backend`] impl of Redis: one script call per queue and transition.

use super::*;

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
            .with_dedup_by_id(true)
            .with_filter_by_name(true)
            .with_get_job(true)
            .with_list_jobs(true)
            .with_cancel(true)
            .with_transactional_enqueue(false)
            .with_locks(true)
            .with_durable(true)
            .with_lease_expiry(true)
            .with_run_at_order(true)
            .with_list_dead(true)
            .with_priorities(true)
    }

    async fn push(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>> {
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        let mut by_queue: Vec<(String, Vec<NewJob>)> = Vec::new();
        for job in jobs {
            match by_queue.iter_mut().find(|(q, _)| *q == job.queue) {
                Some((_, v)) => v.push(job),
                None => by_queue.push((job.queue.clone(), vec![job])),
            }
        }
        for (queue, jobs) in by_queue {
            self.register(&queue).await?;
            let k = self.keys(&queue);
            for chunk in jobs.chunks(PUSH_CHUNK) {
                let mut inv = self.inner.scripts.push.prepare_invoke();
                inv.key(k.set(JobState::Ready))
                    .key(k.set(JobState::Scheduled))
                    .key(k.key("sig"))
                    .key(k.key("seq"))
                    .key(k.key("names"))
                    .arg(k.job_prefix());
                for j in chunk {
                    let (mode, value) = match j.run_at {
                        RunAt::Now => ("n", 0),
                        RunAt::After(d) => ("a", ms(d)),
                        RunAt::At(t) => ("t", t.timestamp_millis()),
                    };
                    let timeout = j.timeout.map(|t| ms(t).to_string()).unwrap_or_default();
                    inv.arg(j.id.to_string())
                        .arg(&j.name)
                        .arg(&j.queue)
                        .arg(&j.payload[..])
                        .arg(j.priority.value())
                        .arg(mode)
                        .arg(value)
                        .arg(j.max_attempts.max(1))
                        .arg(timeout);
                }
                let _: i64 = inv
                    .invoke_async(&mut self.conn())
                    .await
                    .map_err(map_err("push"))?;
            }
        }
        Ok(ids)
    }

    async fn claim(&self, req: ClaimRequest<'_>) -> Result<Vec<ClaimedJob>> {
        let mut out = Vec::new();
        // A short batch with ready entries that were not claimed (jobs made dead because they
        // do not read, hashes gone) is no sign of an empty queue: claim the rest again. Each
        // such round removes at least one entry from the ready sets for good, so this ends.
        while out.len() < req.limit {
            let want = req.limit - out.len();
            match self.claim_once(&req, want, &mut out).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if out.is_empty() => return Err(e),
                Err(e) => {
                    // The jobs already claimed are leased: hand them over rather than leave
                    // them to their leases.
                    tracing::warn!(queue = %req.queue, error = %ErrorChain(&e), "claim stopped early");
                    break;
                }
            }
        }
        let mut claimed = guard(&self.inner.claimed);
        for c in &out {
            claimed.insert(c.job.id, c.job.queue.clone());
        }
        Ok(out)
    }

    async fn finish(&self, batch: &[Finish]) -> Result<Vec<bool>> {
        let mut applied = vec![false; batch.len()];
        let (groups, _lost) = self.by_queue(batch.iter().map(|f| f.id), "finish").await?;
        for (queue, idx) in groups {
            let items: Vec<FinishItem> = idx
                .iter()
                .map(|&i| {
                    let f = &batch[i];
                    let (kind, delay, error) = match &f.outcome {
                        Outcome::Succeeded { keep: true } => ("s", 0, ""),
                        Outcome::Succeeded { keep: false } => ("x", 0, ""),
                        Outcome::Retry { delay, error } => ("r", ms(*delay), error.as_str()),
                        Outcome::Dead { error } => ("d", 0, error.as_str()),
                        // Release, and an outcome this version does not know: handed back.
                        _ => ("l", 0, ""),
                    };
                    FinishItem {
                        id: f.id.to_string(),
                        token: f.token.0.to_string(),
                        kind,
                        delay,
                        error: error.to_owned(),
                    }
                })
                .collect();
            let res = self.finish_items(&queue, &items, "finish").await?;
            for (&i, r) in idx.iter().zip(res) {
                applied[i] = r;
            }
        }
        let mut claimed = guard(&self.inner.claimed);
        for f in batch {
            claimed.remove(&f.id);
        }
        Ok(applied)
    }

    async fn heartbeat(
        &self,
        leases: &[(JobId, LeaseToken)],
        lease: Duration,
    ) -> Result<Vec<bool>> {
        let mut held = vec![false; leases.len()];
        let (groups, _lost) = self
            .by_queue(leases.iter().map(|(id, _)| *id), "heartbeat")
            .await?;
        for (queue, idx) in groups {
            let k = self.keys(&queue);
            let mut inv = self.inner.scripts.heartbeat.prepare_invoke();
            inv.key(k.set(JobState::Running))
                .arg(k.job_prefix())
                .arg(ms(lease));
            for &i in &idx {
                inv.arg(leases[i].0.to_string())
                    .arg(leases[i].1 .0.to_string());
            }
            let res: Vec<i64> = inv
                .invoke_async(&mut self.conn())
                .await
                .map_err(map_err("heartbeat"))?;
            for (&i, r) in idx.iter().zip(res) {
                held[i] = r == 1;
            }
        }
        Ok(held)
    }

    async fn wait(&self, queue: &str, seen: u64, timeout: Duration) -> Result<u64> {
        let k = self.keys(queue);
        let (seq, next): (i64, i64) = self
            .inner
            .scripts
            .peek
            .key(k.key("seq"))
            .key(k.set(JobState::Scheduled))
            .key(k.set(JobState::Retrying))
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err("wait"))?;
        let seq = u64::try_from(seq).unwrap_or(0);
        if seq != seen {
            return Ok(seq);
        }
        let mut block = timeout;
        if next >= 0 {
            block = block.min(Duration::from_millis(next as u64 + 1));
        }
        if block < Duration::from_millis(1) {
            return Ok(seq);
        }
        let mut conn = self.waiter().await?;
        // The list keeps the token of a push made since the peek, so it is never missed.
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(k.key("sig")).arg(block.as_secs_f64());
        let blpop = cmd.query_async::<Value>(&mut conn);
        // A guard against a peer that vanishes without closing the connection.
        match tokio::time::timeout(block + self.inner.config.response_timeout, blpop).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(map_err("wait")(e)),
            Err(_) => {
                return Err(Error::Timeout {
                    op: "wait",
                    after: block + self.inner.config.response_timeout,
                })
            }
        }
        let now: Option<u64> = redis::cmd("GET")
            .arg(k.key("seq"))
            .query_async(&mut conn)
            .await
            .map_err(map_err("wait"))?;
        self.return_waiter(conn);
        Ok(now.unwrap_or(0))
    }

    async fn maintain(&self, m: &Maintenance) -> Result<MaintenanceReport> {
        let queues = self.queues("maintain").await?;
        let mut report = MaintenanceReport::default();
        if queues.is_empty() {
            return Ok(report);
        }
        let batch = m.batch as u64;
        // Due delayed entries promotion took: made ready, made dead (unreadable) or gone.
        let mut promote_taken = 0u64;
        let start = self.inner.rotation.fetch_add(1, Ordering::Relaxed) % queues.len();
        for i in 0..queues.len() {
            let queue = &queues[(start + i) % queues.len()];
            let k = self.keys(queue);
            // Each script does at most SCRIPT_BATCH of each part; loop while one is saturated.
            loop {
                let cap = |left: u64| left.min(SCRIPT_BATCH);
                let promote = cap(batch.saturating_sub(promote_taken));
                let reap = cap(batch.saturating_sub(report.recovered + report.expired_dead));
                let prune = cap(batch.saturating_sub(report.pruned));
                if promote == 0 && reap == 0 && prune == 0 {
                    return Ok(report);
                }
                let reply: Value = self
                    .inner
                    .scripts
                    .maintain
                    .key(k.set(JobState::Ready))
                    .key(k.set(JobState::Scheduled))
                    .key(k.set(JobState::Retrying))
                    .key(k.set(JobState::Running))
                    .key(k.set(JobState::Succeeded))
                    .key(k.set(JobState::Dead))
                    .key(k.key("sig"))
                    .key(k.key("seq"))
                    .key(k.key("names"))
                    .arg(k.job_prefix())
                    .arg(promote)
                    .arg(reap)
                    .arg(prune)
                    .arg(ms(m.succeeded_ttl))
                    .arg(ms(m.dead_ttl))
                    // The lease-expired text, defined once in core.
                    .arg(backline_core::provider::LEASE_EXPIRED_PREFIX)
                    .arg(backline_core::provider::LEASE_EXPIRED_OF)
                    .invoke_async(&mut self.conn())
                    .await
                    .map_err(map_err("maintain"))?;
                let mut r = array(reply);
                log_killed(
                    queue,
                    r.get_mut(5).map(|v| std::mem::replace(v, Value::Nil)),
                );
                let n = |i: usize| r.get(i).and_then(int).unwrap_or(0).max(0) as u64;
                let (p, rec, dead, pruned, taken) = (n(0), n(1), n(2), n(3), n(4));
                promote_taken += taken;
                report.promoted += p;
                report.recovered += rec;
                report.expired_dead += dead;
                report.pruned += pruned;
                let saturated = (promote > 0 && taken >= promote)
                    || (reap > 0 && rec + dead >= reap)
                    || (prune > 0 && pruned >= prune);
                if !saturated {
                    break;
                }
            }
        }
        Ok(report)
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        let Some(queue) = self.find_queue(id, "get").await? else {
            return Ok(None);
        };
        match self
            .fetch(&queue, &[id.to_string()], "get")
            .await?
            .into_iter()
            .next()
        {
            None => Ok(None),
            Some((_, Ok(job))) => Ok(Some(job)),
            Some((key, Err(bad))) => Err(bad.error(&key)),
        }
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let queues = match &filter.queue {
            Some(q) => vec![q.clone()],
            None => self.queues("list").await?,
        };
        let states: Vec<JobState> = match filter.state {
            Some(s) => vec![s],
            None => JobState::ALL.to_vec(),
        };
        // Every candidate id: listing reads the whole of each listed set.
        let mut ids: Vec<(String, String)> = Vec::new();
        for q in &queues {
            let mut pipe = redis::pipe();
            let mut any = false;
            for s in &states {
                for key in self.state_sets(q, *s, "list").await? {
                    pipe.cmd("ZRANGE").arg(key).arg(0).arg(-1);
                    any = true;
                }
            }
            if !any {
                continue;
            }
            let sets: Vec<Vec<String>> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(map_err("list"))?;
            ids.extend(sets.into_iter().flatten().map(|id| (id, q.clone())));
        }
        ids.sort();
        ids.dedup();
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        let mut skip = filter.offset;
        let mut out = Vec::new();
        for chunk in ids.chunks(STEP) {
            let mut by_q: HashMap<&str, Vec<String>> = HashMap::new();
            for (id, q) in chunk {
                by_q.entry(q.as_str()).or_default().push(id.clone());
            }
            let mut jobs = Vec::new();
            for (q, ids) in by_q {
                for (id, job) in self.fetch(q, &ids, "list").await? {
                    match job {
                        Ok(job) => jobs.push(job),
                        // One bad hash must not cost the page: skipped, and said so.
                        Err(bad) => tracing::warn!(
                            queue = %q,
                            error = %ErrorChain(&bad.error(&id)),
                            "list skips a job that cannot be read"
                        ),
                    }
                }
            }
            jobs.sort_by_key(|j| j.id);
            for j in jobs {
                if filter.state.is_some_and(|s| s != j.state)
                    || filter.name.as_deref().is_some_and(|n| n != j.name)
                {
                    continue;
                }
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                out.push(j);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    async fn counts(&self, queue: Option<&str>) -> Result<Counts> {
        let queues = match queue {
            Some(q) => vec![q.to_owned()],
            None => self.queues("counts").await?,
        };
        let mut c = Counts::default();
        for q in queues {
            let k = self.keys(&q);
            let n: Vec<u64> = self
                .inner
                .scripts
                .count
                .key(k.key("names"))
                .key(k.set(JobState::Scheduled))
                .key(k.set(JobState::Retrying))
                .key(k.set(JobState::Running))
                .key(k.set(JobState::Succeeded))
                .key(k.set(JobState::Dead))
                .arg(k.set(JobState::Ready))
                .invoke_async(&mut self.conn())
                .await
                .map_err(map_err("counts"))?;
            // The script counts in JobState::ALL's order.
            for (s, n) in JobState::ALL.into_iter().zip(n) {
                *c.get_mut(s) += n;
            }
        }
        Ok(c)
    }

    async fn cancel(&self, id: JobId) -> Result<bool> {
        self.operate(id, "cancel").await
    }

    async fn retry_dead(&self, id: JobId) -> Result<bool> {
        self.operate(id, "retry_dead").await
    }

    async fn delete(&self, id: JobId) -> Result<bool> {
        self.operate(id, "delete").await
    }

    async fn purge(&self, state: JobState, queue: Option<&str>) -> Result<u64> {
        if state == JobState::Running {
            return Err(Error::InvalidJob("running jobs cannot be purged".into()));
        }
        let queues = match queue {
            Some(q) => vec![q.to_owned()],
            None => self.queues("purge").await?,
        };
        let mut total = 0;
        for q in queues {
            let k = self.keys(&q);
            for set in self.state_sets(&q, state, "purge").await? {
                loop {
                    let n: u64 = self
                        .inner
                        .scripts
                        .purge
                        .key(&set)
                        .arg(k.job_prefix())
                        .arg(STEP)
                        .invoke_async(&mut self.conn())
                        .await
                        .map_err(map_err("purge"))?;
                    total += n;
                    if n < STEP as u64 {
                        break;
                    }
                }
            }
        }
        Ok(total)
    }

    async fn lock_acquire(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let n: i64 = self
            .inner
            .scripts
            .lock_acquire
            .key(self.lock_key(name))
            .arg(owner.0.to_string())
            .arg(ms(ttl).max(1))
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err("lock_acquire"))?;
        Ok(n == 1)
    }

    async fn lock_renew(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        let n: i64 = self
            .inner
            .scripts
            .lock_renew
            .key(self.lock_key(name))
            .arg(owner.0.to_string())
            .arg(ms(ttl).max(1))
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err("lock_renew"))?;
        Ok(n == 1)
    }

    async fn lock_release(&self, name: &str, owner: LeaseToken) -> Result<bool> {
        let n: i64 = self
            .inner
            .scripts
            .lock_release
            .key(self.lock_key(name))
            .arg(owner.0.to_string())
            .invoke_async(&mut self.conn())
            .await
            .map_err(map_err("lock_release"))?;
        Ok(n == 1)
    }
}
