//! The Redis provider: a fresh key prefix per run (its keys deleted after it), and the raw
//! limits of the same server measured in the same run, in the manner of `redis-benchmark`
//! (`SET` from 32 clients, pipelined writes) but shaped like Backline's own work:
//!
//! - **one command per enqueue**: `SET` from 32 tasks on one multiplexed connection, the round
//!   trip Backline's one-by-one enqueue (one `EVALSHA`) cannot beat;
//! - **a two-write script per enqueue**: `EVALSHA` of a script that stores the job hash and
//!   adds its id to a sorted set, from 32 tasks: the cost of Lua without Backline's bookkeeping;
//! - **pipelined writes**: `HSET` + `ZADD` of 1,000 jobs in one pipeline, beside batch enqueue;
//! - **pop and delete**: `ZPOPMIN` of 256 ids, then one `UNLINK` of their hashes, until the set
//!   is empty: a drain with no lease, no fencing and no retry, the server's floor for a drain.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backline_redis::{RedisBackend, RedisConfig};
use redis::aio::MultiplexedConnection;
use tokio::task::JoinSet;

use crate::report::{thousands, Row, Unit};
use crate::{Plan, Result};

/// `BACKLINE_REDIS_URL`, or the loopback server.
fn url() -> String {
    std::env::var("BACKLINE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other run uses: `backline_bench_<unix seconds>_<pid>_<counter>`.
fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "backline_bench_{secs}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn connection() -> Result<MultiplexedConnection> {
    let client = redis::Client::open(url())?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| {
            format!(
                "cannot reach Redis at {} ({e}); start it (`cargo xtask services up`) or set BACKLINE_REDIS_URL",
                backline_core::redact_url(&url())
            )
            .into()
        })
}

/// Deletes every key under `prefix` (`prefix:…` and the hash-tagged `{prefix:…`).
async fn delete_keys(conn: &mut MultiplexedConnection, prefix: &str) -> Result<()> {
    for pattern in [format!("{prefix}:*"), format!("{{{prefix}:*")] {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await?;
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// A Redis backend on a key prefix of its own, for one run.
pub(crate) struct FreshPrefix {
    /// The backend under test.
    pub(crate) backend: RedisBackend,
    prefix: String,
}

impl FreshPrefix {
    /// Connects with a new prefix.
    pub(crate) async fn create() -> Result<FreshPrefix> {
        let prefix = unique_prefix();
        let config = RedisConfig::new(url())
            .with_prefix(prefix.clone())
            .with_connect_timeout(Duration::from_secs(5));
        let backend = RedisBackend::connect(config).await.map_err(|e| {
            format!(
                "cannot reach Redis at {} ({e}); start it (`cargo xtask services up`) or set BACKLINE_REDIS_URL",
                backline_core::redact_url(&url())
            )
        })?;
        Ok(FreshPrefix { backend, prefix })
    }

    /// Deletes the run's keys; a failure is a warning, not a failed row.
    pub(crate) async fn dispose(self) {
        drop(self.backend);
        let result = match connection().await {
            Ok(mut conn) => delete_keys(&mut conn, &self.prefix).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            eprintln!(
                "  warning: cannot delete the bench keys {}:*: {e}",
                self.prefix
            );
        }
    }
}

/// `tasks` tasks share `n` operations made by `op` on one multiplexed connection; ops/s.
async fn one_by_one<F, Fut>(n: usize, tasks: usize, op: F) -> Result<f64>
where
    F: Fn(MultiplexedConnection, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = redis::RedisResult<()>> + Send + 'static,
{
    let conn = connection().await?;
    let op = Arc::new(op);
    let start = Instant::now();
    let mut set = JoinSet::new();
    for t in 0..tasks {
        let conn = conn.clone();
        let op = op.clone();
        let share = n / tasks + usize::from(t < n % tasks);
        set.spawn(async move {
            for i in 0..share {
                op(conn.clone(), t * n + i).await?;
            }
            Ok::<(), redis::RedisError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

/// The raw enqueue script: the job hash and its place in the ready set.
const ENQUEUE_LUA: &str = "redis.call('HSET', KEYS[1], 'payload', ARGV[1], 'state', 'ready') \
                           redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3]) return 1";

/// Stores `n` jobs (hash + sorted-set entry) in pipelines of `batch`; jobs/s.
async fn pipelined(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    n: usize,
    batch: usize,
) -> Result<f64> {
    let start = Instant::now();
    let ready = format!("{{{prefix}:q}}:ready");
    let mut i = 0;
    while i < n {
        let k = batch.min(n - i);
        let mut pipe = redis::pipe();
        for j in i..i + k {
            pipe.cmd("HSET")
                .arg(format!("{{{prefix}:q}}:job:{j}"))
                .arg("payload")
                .arg("null")
                .arg("state")
                .arg("ready")
                .ignore();
            pipe.cmd("ZADD").arg(&ready).arg(j).arg(j).ignore();
        }
        let () = pipe.query_async(conn).await?;
        i += k;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

/// `ZPOPMIN` `batch` ids, then `UNLINK` their hashes, until the set is empty; jobs/s.
async fn pop_delete(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    n: usize,
    batch: usize,
) -> Result<f64> {
    let ready = format!("{{{prefix}:q}}:ready");
    let start = Instant::now();
    let mut done = 0;
    loop {
        let popped: Vec<(String, f64)> = redis::cmd("ZPOPMIN")
            .arg(&ready)
            .arg(batch)
            .query_async(conn)
            .await?;
        if popped.is_empty() {
            break;
        }
        let keys: Vec<String> = popped
            .iter()
            .map(|(id, _)| format!("{{{prefix}:q}}:job:{id}"))
            .collect();
        let removed: usize = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
        done += removed;
    }
    let took = start.elapsed();
    if done != n {
        return Err(format!("raw pop+delete removed {done} of {n} jobs").into());
    }
    Ok(n as f64 / took.as_secs_f64().max(1e-9))
}

/// The raw rows, each on a fresh prefix whose keys are deleted after it.
pub(crate) async fn raw_rows(plan: &Plan) -> Result<Vec<Row>> {
    let n = plan.jobs;
    let single = plan.single_jobs;
    let tasks = plan.enqueue_tasks;
    let drain_batch = plan
        .concurrencies
        .iter()
        .max()
        .map_or(256, |c| (*c).min(1_000));
    let mut conn = connection().await?;
    let script = redis::Script::new(ENQUEUE_LUA);
    let mut set_runs = Vec::new();
    let mut lua_runs = Vec::new();
    let mut pipe_runs = Vec::new();
    let mut pop_runs = Vec::new();
    for _ in 0..plan.runs {
        let prefix = unique_prefix();
        let p = prefix.clone();
        set_runs.push(
            one_by_one(single, tasks, move |mut c, i| {
                let key = format!("{p}:set:{i}");
                async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg("null")
                        .query_async(&mut c)
                        .await
                }
            })
            .await?,
        );
        let p = prefix.clone();
        let script = script.clone();
        lua_runs.push(
            one_by_one(single, tasks, move |mut c, i| {
                let script = script.clone();
                let keys = [format!("{{{p}:lua}}:job:{i}"), format!("{{{p}:lua}}:ready")];
                async move {
                    let _: i64 = script
                        .key(&keys[0])
                        .key(&keys[1])
                        .arg("null")
                        .arg(i)
                        .arg(i)
                        .invoke_async(&mut c)
                        .await?;
                    Ok(())
                }
            })
            .await?,
        );
        pipe_runs.push(pipelined(&mut conn, &prefix, n, plan.batch).await?);
        pop_runs.push(pop_delete(&mut conn, &prefix, n, drain_batch).await?);
        delete_keys(&mut conn, &prefix).await?;
    }
    let t = thousands(single as f64);
    Ok(vec![
        Row::new(
            format!("raw_set_c{tasks}"),
            format!("raw: SET one by one, {tasks} tasks ({t})"),
            single,
            Unit::JobsPerSecond,
            set_runs,
        ),
        Row::new(
            format!("raw_evalsha_c{tasks}"),
            format!("raw: EVALSHA HSET+ZADD, {tasks} tasks ({t})"),
            single,
            Unit::JobsPerSecond,
            lua_runs,
        ),
        Row::new(
            format!("raw_pipeline_{}", plan.batch),
            format!(
                "raw: HSET+ZADD pipelined by {}",
                thousands(plan.batch as f64)
            ),
            n,
            Unit::JobsPerSecond,
            pipe_runs,
        ),
        Row::new(
            format!("raw_pop_delete_{drain_batch}"),
            format!("raw: ZPOPMIN {drain_batch} + UNLINK, 1 conn"),
            n,
            Unit::JobsPerSecond,
            pop_runs,
        ),
    ])
}
