//! Backline's benchmarks: `cargo xtask bench [--quick] [--provider NAME] [--runs N]`.
//!
//! For each provider, on a multi-thread Tokio runtime with 2 workers, in a release build, each
//! figure the median of 3 runs (every run on a fresh, empty backend):
//!
//! - **enqueue one by one** from 32 concurrent tasks ([`JobManager::enqueue`]), jobs/s;
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
mod report;

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
}

impl Provider {
    /// Every provider, in the order they run.
    const ALL: &[Provider] = &[Provider::Memory];

    /// The name on the command line and in the JSON file name.
    fn name(self) -> &'static str {
        match self {
            Provider::Memory => "memory",
        }
    }

    fn parse(s: &str) -> Option<Provider> {
        Provider::ALL.iter().copied().find(|p| p.name() == s)
    }

    /// A fresh, empty backend for one run.
    async fn backend(self) -> Result<Arc<dyn Backend>> {
        match self {
            Provider::Memory => Ok(Arc::new(backline_memory::MemoryBackend::new())),
        }
    }

    /// The provider's own limit, without Backline's server or manager.
    async fn raw_rows(self, plan: &Plan) -> Result<Vec<Row>> {
        match self {
            Provider::Memory => memory::raw_rows(plan).await,
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
    /// Whether this is a `--quick` smoke run.
    quick: bool,
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
            quick: false,
        }
    }

    fn quick() -> Plan {
        Plan {
            jobs: 10_000,
            runs: 1,
            latency_for: Duration::from_secs(1),
            quick: true,
            ..Plan::full()
        }
    }
}

const USAGE: &str = "\
backline-bench [--quick] [--provider NAME]... [--runs N]

  --quick          10,000 jobs per row, one run, 1 s of latency: a smoke run
  --provider NAME  only this provider (repeatable); providers: memory
  --runs N         runs per figure (default 3; the median is reported)

Prints a table and writes target/bench/<provider>.json.";

/// The parsed command line.
struct Args {
    plan: Plan,
    providers: Vec<Provider>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> std::result::Result<Args, String> {
    let mut quick = false;
    let mut runs = None;
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
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let mut plan = if quick { Plan::quick() } else { Plan::full() };
    if let Some(runs) = runs {
        plan.runs = runs;
    }
    if providers.is_empty() {
        providers = Provider::ALL.to_vec();
    }
    Ok(Args { plan, providers })
}

/// Every row for one provider.
async fn bench(provider: Provider, plan: &Plan) -> Result<Vec<Row>> {
    let mut rows = measure::rows(provider, plan).await?;
    rows.extend(provider.raw_rows(plan).await?);
    Ok(rows)
}

/// Where the JSON goes: `target/bench` of this workspace (or of `CARGO_TARGET_DIR`).
fn out_dir() -> PathBuf {
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
        for &provider in Provider::ALL {
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
        assert!(parse(&["--provider", "oracle"]).is_err());
        assert!(parse(&["--runs", "0"]).is_err());
    }
}
