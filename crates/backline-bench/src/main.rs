//! Backline's benchmarks: `cargo xtask bench [--quick] [--provider NAME] [--runs N]`.
//!
//! For each provider, on a multi-thread Tokio runtime with 2 workers, in a release build, each
//! figure the median of 3 runs (every run on a fresh, empty backend):
//!
//! - **enqueue one by one** from 32 concurrent tasks ([`JobManager::enqueue`]), jobs/s, and
//!   from one task enqueuing sequentially;
//! - **batch enqueue** in batches of 1,000 from one task ([`JobManager::enqueue_batch`]), jobs/s;
//! - **drain** of pre-enqueued no-op jobs by a [`JobServer`] at concurrency 1, 16 and 256
//!   (`claim_batch = min(c, 1000)`, succeeded jobs deleted at once, `run_until_idle`), jobs/s,
//!   and once more at 256 with the default retention (succeeded jobs kept for an hour);
//! - **enqueue-to-start latency** p50/p99 at a fixed rate (2,000 jobs/s for 5 s) with a server
//!   in its default configuration running: each job carries the instant it was enqueued and
//!   its handler records how long it waited;
//! - **raw** rows: the provider's own limit measured in the same run, without the server or the
//!   manager (for memory: [`Backend::push`], [`Backend::claim`] and [`Backend::finish`] called
//!   directly in batches).
//!
//! The SQL providers (`postgres`, `sqlite`, `mysql`; `backline-sql` on the loopback servers of
//! `BACKLINE_POSTGRES_URL` and `BACKLINE_MYSQL_URL`, SQLite files under `target/bench/`) run the
//! same rows, each run on a fresh table dropped after it, with these differences, each shown
//! in the table (jobs column, "(1 run)"): enqueue one by one of 5,000 jobs, one run (each job is
//! a commit); the drains at concurrency 1 and 16 on 10,000 jobs, one run; latency at 500
//! jobs/s; on MySQL the kept drain once; and a drain of 5,000 queued beside 100,000 (the rate
//! must be flat); one task enqueues 2,000 jobs. On PostgreSQL every drain runs after an
//! `ANALYZE` of the filled table, and the drain at the highest concurrency runs once more on a
//! table never analyzed (autovacuum off for it), which must be within noise of the analyzed one.
//! Their raw rows are plain SQL through sqlx on the same server (see the `sql` module): the
//! claim loops, and one job per commit (single-row `INSERT`s from 32 connections, with and
//! without a `NOTIFY` on PostgreSQL; single-row commits on SQLite's writer), which bound the
//! one-by-one enqueue. The table prints Backline/raw ratios.
//!
//! `--rows PREFIX,…` measures only the rows whose id starts with one of the prefixes (the SQL
//! raw loops are skipped; other providers' raw rows are measured and left out of the table).
//!
//! Redis (`redis`: `backline-redis` on `BACKLINE_REDIS_URL`, a fresh key prefix per run, its
//! keys deleted after it) enqueues 20,000 jobs one by one, measures latency at 1,000 jobs/s, and
//! prints raw rates of the same server (see the `redis_rows` module): `SET` and a two-write
//! `EVALSHA` from 32 tasks, pipelined writes, and a `ZPOPMIN` + `UNLINK` drain.
//!
//! RabbitMQ (`rabbitmq`: `backline-rabbitmq` on `BACKLINE_AMQP_URL`, a fresh queue prefix per
//! run, its queues deleted after it) enqueues 20,000 jobs one by one, drains 10,000 at
//! concurrency 1, has no kept row (succeeded jobs are acked away), measures latency at 500
//! jobs/s, and prints raw lapin rates (see the `rabbitmq_rows` module).
//!
//! It prints a table and writes `target/bench/<provider>.json` (or under `CARGO_TARGET_DIR`).
//! `--quick` runs the same rows on 10,000 jobs, one run each, for a smoke test.
//!
//! Rates are benchmark rows, never test assertions: the unit test here only checks that every
//! row runs and every job is done.
//!
//! [`JobManager::enqueue`]: backline_core::JobManager::enqueue
//! [`JobManager::enqueue_batch`]: backline_core::JobManager::enqueue_batch
//! [`JobServer`]: backline_core::JobServer
//! [`Backend::push`]: backline_core::Backend::push
//! [`Backend::claim`]: backline_core::Backend::claim
//! [`Backend::finish`]: backline_core::Backend::finish

mod measure;
mod memory;
mod rabbitmq_rows;
mod redis_rows;
mod report;
mod sql;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use backline_core::Backend;

use crate::report::{Report, Row};

/// What the benchmarks fail with: any error, as a message.
type Error = Box<dyn std::error::Error + Send + Sync>;
/// The benchmarks' result type.
type Result<T> = std::result::Result<T, Error>;

/// The runtime's worker threads: the machines have 2 cores.
const WORKER_THREADS: usize = 2;

/// A provider under benchmark. A new provider adds a variant, its fresh-backend constructor
/// and its raw rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    /// The in-process provider (`backline-memory`).
    Memory,
    /// `backline-sql` on PostgreSQL (`BACKLINE_POSTGRES_URL`).
    Postgres,
    /// `backline-sql` on a SQLite file under `target/bench/`.
    Sqlite,
    /// `backline-sql` on MySQL/MariaDB (`BACKLINE_MYSQL_URL`).
    Mysql,
    /// `backline-redis` (`BACKLINE_REDIS_URL`), a fresh key prefix per run.
    Redis,
    /// `backline-rabbitmq` (`BACKLINE_AMQP_URL`), a fresh queue prefix per run.
    Rabbitmq,
}

impl Provider {
    /// Every provider, in the order they run.
    const ALL: &[Provider] = &[
        Provider::Memory,
        Provider::Postgres,
        Provider::Sqlite,
        Provider::Mysql,
        Provider::Redis,
        Provider::Rabbitmq,
    ];

    /// The name on the command line and in the JSON file name.
    fn name(self) -> &'static str {
        match self {
            Provider::Memory => "memory",
            Provider::Postgres => "postgres",
            Provider::Sqlite => "sqlite",
            Provider::Mysql => "mysql",
            Provider::Redis => "redis",
            Provider::Rabbitmq => "rabbitmq",
        }
    }

    /// The provider of a command-line name.
    fn parse(s: &str) -> Option<Provider> {
        Provider::ALL.iter().copied().find(|p| p.name() == s)
    }

    /// The SQL database behind this provider, if any.
    fn sql(self) -> Option<sql::Db> {
        match self {
            Provider::Memory | Provider::Redis | Provider::Rabbitmq => None,
            Provider::Postgres => Some(sql::Db::Postgres),
            Provider::Sqlite => Some(sql::Db::Sqlite),
            Provider::Mysql => Some(sql::Db::Mysql),
        }
    }

    /// The plan for this provider: the SQL providers enqueue one by one fewer jobs, run the
    /// slowest rows once, and measure latency at 500 jobs/s.
    fn plan(self, base: &Plan) -> Plan {
        let mut plan = base.clone();
        if self.sql().is_some() {
            // One commit per job: ~1k jobs/s, so 100k would take minutes per run.
            plan.single_jobs = if plan.quick { 1_000 } else { 5_000 };
            // One task, one commit at a time: a few seconds.
            plan.sequential_jobs = if plan.quick { 500 } else { 2_000 };
            plan.slow_runs = 1;
            plan.rate = 500;
            // Concurrency 1 is one claim and one finish per job: 10k jobs, one run.
            plan.drain_overrides
                .push((1, if plan.quick { 1_000 } else { 10_000 }, 1));
            // Concurrency 16 claims a few jobs at a time (a round trip each): 10k jobs, one run.
            plan.drain_overrides
                .push((16, if plan.quick { 2_000 } else { 10_000 }, 1));
            // 5,000 queued beside 100,000: the drain rate must not depend on the depth.
            plan.flat_jobs = Some(5_000.min(plan.jobs));
        }
        if self == Provider::Redis {
            // One round trip per enqueue, as on SQL but without a commit: 20k jobs; latency at
            // 1,000 jobs/s (issue 4's rate).
            plan.single_jobs = if plan.quick { 2_000 } else { 20_000 };
            plan.rate = 1_000;
        }
        if self == Provider::Rabbitmq {
            // A confirm round trip per enqueue: 20k jobs. One claim (basic.get) per job at
            // concurrency 1: 10k jobs, one run. Succeeded jobs are never kept (no kept row).
            // Latency at 500 jobs/s (issue 5's rate).
            plan.single_jobs = if plan.quick { 2_000 } else { 20_000 };
            plan.drain_overrides
                .push((1, if plan.quick { 1_000 } else { 10_000 }, 1));
            plan.kept_runs = 0;
            plan.rate = 500;
        }
        if self == Provider::Postgres {
            // Beside the drains, which run after an `ANALYZE` of the filled table: the same
            // drain on a table without statistics (issue 11) must be within noise of it.
            plan.never_analyzed = true;
        }
        if self == Provider::Mysql && !plan.quick {
            plan.kept_runs = 1;
        }
        plan
    }

    /// A fresh, empty backend for one run (for SQL, a new table that [`Fresh::dispose`] drops).
    async fn backend(self) -> Result<Fresh> {
        if self == Provider::Redis {
            let fresh = redis_rows::FreshPrefix::create().await?;
            return Ok(Fresh {
                backend: Arc::new(fresh.backend.clone()),
                table: None,
                prefix: Some(fresh),
                queues: None,
            });
        }
        if self == Provider::Rabbitmq {
            let fresh = rabbitmq_rows::FreshPrefix::create().await?;
            return Ok(Fresh {
                backend: Arc::new(fresh.backend.clone()),
                table: None,
                prefix: None,
                queues: Some(fresh),
            });
        }
        match self.sql() {
            None => Ok(Fresh {
                backend: Arc::new(backline_memory::MemoryBackend::new()),
                table: None,
                prefix: None,
                queues: None,
            }),
            Some(db) => {
                let table = sql::FreshTable::create(db).await?;
                Ok(Fresh {
                    backend: Arc::new(table.backend.clone()),
                    table: Some(table),
                    prefix: None,
                    queues: None,
                })
            }
        }
    }

    /// The provider's own limit, without Backline's server or manager.
    async fn raw_rows(self, plan: &Plan) -> Result<Vec<Row>> {
        match self.sql() {
            None if self == Provider::Redis => redis_rows::raw_rows(plan).await,
            None if self == Provider::Rabbitmq => rabbitmq_rows::raw_rows(plan).await,
            None => memory::raw_rows(plan).await,
            Some(db) => sql::raw_rows(db, plan).await,
        }
    }
}

/// A fresh backend for one run, and what to remove after it.
struct Fresh {
    /// The backend under test.
    backend: Arc<dyn Backend>,
    /// The SQL table (or file) made for this run.
    table: Option<sql::FreshTable>,
    /// The Redis key prefix made for this run.
    prefix: Option<redis_rows::FreshPrefix>,
    /// The RabbitMQ queues made for this run.
    queues: Option<rabbitmq_rows::FreshPrefix>,
}

impl Fresh {
    /// Drops the run's table (or SQLite file); a failure is a warning, not a failed row.
    async fn dispose(self) {
        drop(self.backend);
        if let Some(t) = self.table {
            t.dispose().await;
        }
        if let Some(p) = self.prefix {
            p.dispose().await;
        }
        if let Some(q) = self.queues {
            q.dispose().await;
        }
    }
}

/// The sizes of one benchmark run.
#[derive(Debug, Clone)]
struct Plan {
    /// Jobs per enqueue and drain run.
    jobs: usize,
    /// Runs per figure (the median is reported).
    runs: usize,
    /// Tasks enqueueing one by one.
    enqueue_tasks: usize,
    /// Jobs per batch enqueue.
    batch: usize,
    /// Server concurrencies for the drain.
    concurrencies: Vec<usize>,
    /// Enqueues per second for the latency run.
    rate: usize,
    /// How long the latency run enqueues.
    latency_for: Duration,
    /// Jobs enqueued one by one (fewer on SQL, where each is a commit).
    single_jobs: usize,
    /// Jobs enqueued one by one from a single task.
    sequential_jobs: usize,
    /// Runs of the slowest rows (enqueue one by one, drain at concurrency 1).
    slow_runs: usize,
    /// Drains measured on other sizes than `jobs`: (concurrency, jobs, runs).
    drain_overrides: Vec<(usize, usize, usize)>,
    /// Runs of the drain that keeps succeeded jobs.
    kept_runs: usize,
    /// A second drain size at the highest concurrency, to show the rate is flat (SQLite).
    flat_jobs: Option<usize>,
    /// Whether to drain once more at the highest concurrency on a table never analyzed
    /// (PostgreSQL; the other drains run after an `ANALYZE`).
    never_analyzed: bool,
    /// Whether this is a `--quick` smoke run.
    quick: bool,
    /// Only the rows whose id starts with one of these (all rows when empty).
    only: Vec<String>,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            jobs: 100_000,
            runs: 3,
            enqueue_tasks: 32,
            batch: 1_000,
            concurrencies: vec![1, 16, 256],
            rate: 2_000,
            latency_for: Duration::from_secs(5),
            single_jobs: 100_000,
            sequential_jobs: 10_000,
            slow_runs: 3,
            drain_overrides: Vec::new(),
            kept_runs: 3,
            flat_jobs: None,
            never_analyzed: false,
            quick: false,
            only: Vec::new(),
        }
    }

    /// Whether the row `id` is to be measured (`--rows`).
    fn wants(&self, id: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| id.starts_with(p.as_str()))
    }

    fn quick() -> Plan {
        Plan {
            jobs: 10_000,
            runs: 1,
            latency_for: Duration::from_secs(1),
            single_jobs: 10_000,
            sequential_jobs: 2_000,
            slow_runs: 1,
            kept_runs: 1,
            quick: true,
            ..Plan::full()
        }
    }
}

const USAGE: &str = "\
backline-bench [--quick] [--provider NAME]... [--runs N] [--rows PREFIX,...]

  --quick          10,000 jobs per row, one run, 1 s of latency: a smoke run
  --provider NAME  only this provider (repeatable); providers: memory, postgres,
                   sqlite, mysql, redis, rabbitmq (default: all)
  --runs N         runs per figure (default 3; the median is reported)
  --rows PREFIX    only the rows whose id starts with PREFIX (repeatable, or
                   comma-separated; e.g. enqueue_single,latency,raw_insert)

Prints a table and writes target/bench/<provider>.json.";

/// The parsed command line.
struct Args {
    plan: Plan,
    providers: Vec<Provider>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> std::result::Result<Args, String> {
    let mut quick = false;
    let mut runs = None;
    let mut only = Vec::new();
    let mut providers = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--provider" | "-p" => {
                let v = args.next().ok_or("--provider needs a name")?;
                for name in v.split(',') {
                    let p = Provider::parse(name)
                        .ok_or_else(|| format!("unknown provider `{name}`"))?;
                    if !providers.contains(&p) {
                        providers.push(p);
                    }
                }
            }
            "--runs" => {
                let v = args.next().ok_or("--runs needs a number")?;
                runs = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("--runs takes a positive number, not `{v}`"))?,
                );
            }
            "--rows" => {
                let v = args.next().ok_or("--rows needs a row id prefix")?;
                only.extend(v.split(',').filter(|p| !p.is_empty()).map(String::from));
            }
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let mut plan = if quick { Plan::quick() } else { Plan::full() };
    plan.only = only;
    if let Some(runs) = runs {
        plan.runs = runs;
        plan.slow_runs = runs;
        plan.kept_runs = runs;
    }
    if providers.is_empty() {
        providers = Provider::ALL.to_vec();
    }
    Ok(Args { plan, providers })
}

/// Every row for one provider.
async fn bench(provider: Provider, plan: &Plan) -> Result<Vec<Row>> {
    let plan = &provider.plan(plan);
    let mut rows = measure::rows(provider, plan).await?;
    rows.extend(provider.raw_rows(plan).await?);
    // The SQL raw rows skip what `--rows` leaves out; the others are measured and dropped here.
    rows.retain(|r| plan.wants(&r.id));
    Ok(rows)
}

/// Where the JSON goes: `target/bench` of this workspace (or of `CARGO_TARGET_DIR`).
pub(crate) fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // crates/backline-bench → the workspace root.
            let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            let root = crate_dir.ancestors().nth(2).unwrap_or(crate_dir);
            root.join("target")
        });
    target.join("bench")
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("backline-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run `cargo xtask bench` for figures worth quoting");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("backline-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for &provider in &args.providers {
        let load = report::load_average();
        let started = std::time::Instant::now();
        eprintln!("benchmarking {} …", provider.name());
        match runtime.block_on(bench(provider, &args.plan)) {
            Ok(rows) => {
                let report = Report::new(provider.name(), &args.plan, WORKER_THREADS, load, rows);
                println!("{}", report.table(started.elapsed()));
                let dir = out_dir();
                match report.write_json(&dir) {
                    Ok(path) => println!("wrote {}", path.display()),
                    Err(e) => {
                        eprintln!(
                            "backline-bench: cannot write JSON under {}: {e}",
                            dir.display()
                        );
                        failed = true;
                    }
                }
            }
            Err(e) => {
                eprintln!("backline-bench: {} failed: {e}", provider.name());
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row runs on every provider and every job is done (the measurements check counts);
    /// no figure is asserted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_row_runs() {
        let plan = Plan {
            jobs: 2_000,
            runs: 1,
            rate: 1_000,
            latency_for: Duration::from_millis(200),
            ..Plan::quick()
        };
        // The SQL providers need servers and disks: they are benchmarks, not unit tests.
        for provider in [Provider::Memory] {
            let rows = bench(provider, &plan).await.expect("the benchmark runs");
            let report = Report::new(provider.name(), &plan, WORKER_THREADS, None, rows);
            assert!(report.rows.iter().any(|r| r.id.starts_with("raw_")));
            assert!(report.rows.iter().all(|r| r.median > 0.0));
            assert!(report.table(Duration::ZERO).contains("drain"));
            assert!(report.json().contains("\"provider\""));
        }
    }

    #[test]
    fn arguments_are_parsed() {
        let parse = |a: &[&str]| parse_args(a.iter().map(|s| s.to_string()));
        let quick = parse(&["--quick", "--provider", "memory"]).expect("valid");
        assert!(quick.plan.quick && quick.plan.jobs < Plan::full().jobs);
        assert_eq!(quick.providers, vec![Provider::Memory]);
        assert_eq!(parse(&["--runs", "5"]).expect("valid").plan.runs, 5);
        let some = parse(&["--rows", "enqueue_single,raw_insert"]).expect("valid");
        assert!(some.plan.wants("enqueue_single_1_task") && some.plan.wants("raw_insert_c32"));
        assert!(!some.plan.wants("drain_c256"));
        assert!(Plan::full().wants("drain_c256"));
        assert!(parse(&["--provider", "oracle"]).is_err());
        assert!(parse(&["--runs", "0"]).is_err());
    }
}
