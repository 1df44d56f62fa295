//! Every statement of the PostgreSQL backend, built once from the validated table name, with
//! why each has its shape.

use super::*;

/// Every statement, built once from the validated table name.
pub(super) struct Sql {
    pub(super) push: Arc<str>,
    pub(super) claim: Arc<str>,
    pub(super) finish: Arc<str>,
    pub(super) heartbeat: Arc<str>,
    pub(super) promote: Arc<str>,
    pub(super) expire: Arc<str>,
    pub(super) prune_succeeded: Arc<str>,
    pub(super) prune_dead: Arc<str>,
    pub(super) notify: Arc<str>,
    pub(super) get: Arc<str>,
    pub(super) list: Arc<str>,
    pub(super) counts: Arc<str>,
    pub(super) cancel: Arc<str>,
    pub(super) retry_dead: Arc<str>,
    pub(super) delete: Arc<str>,
    pub(super) purge: Arc<str>,
    pub(super) lock_acquire: Arc<str>,
    pub(super) lock_renew: Arc<str>,
    pub(super) lock_release: Arc<str>,
}

impl Sql {
    pub(super) fn new(table: &TableName) -> Sql {
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
