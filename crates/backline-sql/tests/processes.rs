//! Two OS processes draining one table never run a job twice, on SQLite (one file), PostgreSQL
//! and MySQL/MariaDB (one table).
//!
//! The test enqueues the jobs, then runs this test binary again, twice, as children
//! (`BACKLINE_CHILD_URL` and `BACKLINE_CHILD_TABLE` set, filtered to [`child_process_entry`]).
//! Each child runs a `JobServer` with `run_until_idle()` on the table and prints a line per job
//! it runs. So that both really drain at the same time, every job in a child waits at a gate
//! that opens only once *both* children are running a job: the parent reads their first
//! reports and then tells both to go on (on stdin). The parent asserts that every job ran
//! exactly once, in attempt 1, that both children ran jobs, and that the table shows every job
//! succeeded in attempt 1.
//!
//! Servers: `BACKLINE_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and
//! `BACKLINE_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`). Without a server the
//! test says so loudly and passes, unless `BACKLINE_REQUIRE_SERVICES=1`. Children are ended by
//! their own pid when the test fails.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline_core::{
    BackgroundJob, JobArgs, JobContext, JobError, JobFilter, JobManager, JobServer, JobState,
    ServerConfig,
};
use backline_sql::{SqlBackend, SqlConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

/// Set in a child: the database URL to drain.
const CHILD_URL: &str = "BACKLINE_CHILD_URL";
/// Set in a child: the jobs table to drain.
const CHILD_TABLE: &str = "BACKLINE_CHILD_TABLE";
/// The test a child runs (and the only one).
const CHILD_ENTRY: &str = "child_process_entry";
/// The prefix of the lines a child reports on, among libtest's own output.
const TAG: &str = "backline-child:";
/// Jobs per run.
const JOBS: u32 = 300;
/// The longest the parent waits for its children before it ends them and fails.
const PATIENCE: Duration = Duration::from_secs(120);

#[derive(Serialize, Deserialize)]
struct Work {
    n: u32,
}

impl JobArgs for Work {
    const NAME: &'static str = "processes.work";
}

/// The child's handler: reports its first job, waits at the gate, then reports each job run.
struct Gated {
    gate: watch::Receiver<bool>,
    first: AtomicBool,
}

impl BackgroundJob for Gated {
    type Args = Work;

    async fn execute(&self, _args: Work, ctx: JobContext) -> Result<(), JobError> {
        if !self.first.swap(true, Ordering::SeqCst) {
            println!("{TAG} FIRST");
        }
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open)
            .await
            .map_err(|_| JobError::fatal("the gate closed without opening"))?;
        println!("{TAG} RAN {} {}", ctx.id(), ctx.attempt());
        Ok(())
    }
}

/// The entry point of a child process; does nothing in the parent's own run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_entry() {
    let (Ok(url), Ok(table)) = (std::env::var(CHILD_URL), std::env::var(CHILD_TABLE)) else {
        return;
    };
    let backend = SqlBackend::connect(
        SqlConfig::new(url)
            .with_table(table)
            .with_max_connections(4)
            .with_migrate_on_connect(false)
            .with_poll_interval(Duration::from_millis(200)),
    )
    .await
    .expect("child: connect");

    // The gate opens when the parent writes `CONTINUE`; if the parent goes away first (stdin
    // ends), this child ends too.
    let (open, gate) = watch::channel(false);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if l.trim() == "CONTINUE" => {
                    let _ = open.send(true);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if !*open.borrow() {
            eprintln!("{TAG} the parent went away before opening the gate");
            std::process::exit(3);
        }
    });

    let server = JobServer::builder(backend)
        .register(Gated {
            gate,
            first: AtomicBool::new(false),
        })
        .queue("default", 4)
        .config(
            ServerConfig::default()
                .with_poll_interval(Duration::from_millis(200))
                // Long leases: a lease never expires here, so no job may run twice.
                .with_lease(Duration::from_secs(60))
                .with_heartbeat(Duration::from_secs(5))
                .with_claim_batch(4)
                .with_maintenance_interval(Duration::from_millis(200)),
        )
        .build()
        .expect("child: server");
    server.run_until_idle().await.expect("child: drain");
    println!("{TAG} DONE");
}

/// A child process, killed by its pid if the test ends before it does.
struct ChildGuard {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<String>>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

enum Report {
    Line(String),
    Exited,
}

fn spawn_child(
    idx: usize,
    url: &str,
    table: &str,
    reports: mpsc::UnboundedSender<(usize, Report)>,
) -> ChildGuard {
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = Command::new(exe)
        .args([CHILD_ENTRY, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_URL, url)
        .env(CHILD_TABLE, table)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a child process");
    let stdout = child.stdout.take().expect("child stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = reports.send((idx, Report::Line(line)));
        }
        let _ = reports.send((idx, Report::Exited));
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut err = child.stderr.take().expect("child stderr");
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("stderr lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    ChildGuard {
        stdin: child.stdin.take(),
        child,
        stderr,
    }
}

/// What one child did.
#[derive(Default)]
struct ChildRun {
    first: bool,
    done: bool,
    exited: bool,
    /// (job id, attempt) of each job it ran.
    ran: Vec<(String, u32)>,
}

/// Enqueues the jobs, lets two child processes drain `table` at once, and checks that every
/// job ran exactly once.
async fn two_processes_drain_one_table(url: &str, table: &str) {
    let backend = SqlBackend::connect(SqlConfig::new(url).with_table(table))
        .await
        .expect("connect and migrate");
    let manager = JobManager::new(backend.clone());
    let ids: HashSet<String> = manager
        .enqueue_batch((0..JOBS).map(|n| Work { n }))
        .await
        .expect("enqueue")
        .iter()
        .map(|id| id.to_string())
        .collect();
    assert_eq!(ids.len(), JOBS as usize);

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut children = [
        spawn_child(0, url, table, tx.clone()),
        spawn_child(1, url, table, tx),
    ];
    let mut runs = [ChildRun::default(), ChildRun::default()];
    let stderr_of = |children: &[ChildGuard; 2]| -> String {
        children
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "--- child {i} stderr ---\n{}",
                    c.stderr.lock().expect("lock")
                )
            })
            .collect()
    };

    let watched = tokio::time::timeout(PATIENCE, async {
        let mut released = false;
        while !runs.iter().all(|r| r.exited) {
            let Some((idx, report)) = rx.recv().await else {
                break;
            };
            let run = &mut runs[idx];
            match report {
                Report::Exited => run.exited = true,
                Report::Line(line) => {
                    // libtest's `test child_process_entry ... ` may precede the first one.
                    let Some((_, msg)) = line.split_once(TAG) else {
                        continue;
                    };
                    let mut words = msg.split_whitespace();
                    match (words.next(), words.next(), words.next()) {
                        (Some("FIRST"), None, None) => run.first = true,
                        (Some("DONE"), None, None) => run.done = true,
                        (Some("RAN"), Some(id), Some(attempt)) => {
                            let attempt = attempt.parse().expect("an attempt number");
                            run.ran.push((id.to_owned(), attempt));
                        }
                        _ => panic!("child {idx} said something unexpected: {line}"),
                    }
                }
            }
            // Both children are running a job at the same time: open both gates. (If a child
            // ended early, open them too, so that the other ends and the test reports why.)
            let failed = runs.iter().any(|r| r.exited);
            if !released && (runs.iter().all(|r| r.first) || failed) {
                for child in children.iter_mut() {
                    let Some(mut stdin) = child.stdin.take() else {
                        continue;
                    };
                    let told = stdin.write_all(b"CONTINUE\n").and_then(|()| stdin.flush());
                    assert!(failed || told.is_ok(), "tell a child to go on: {told:?}");
                }
                released = true;
            }
        }
    })
    .await;
    if watched.is_err() {
        panic!(
            "the children did not finish within {PATIENCE:?} (first: {:?}, ran: {:?}); ending them\n{}",
            runs.iter().map(|r| r.first).collect::<Vec<_>>(),
            runs.iter().map(|r| r.ran.len()).collect::<Vec<_>>(),
            stderr_of(&children)
        );
    }
    let statuses: Vec<ExitStatus> = children
        .iter_mut()
        .map(|c| c.child.wait().expect("wait for a child"))
        .collect();
    for (i, (status, run)) in statuses.iter().zip(&runs).enumerate() {
        assert!(
            status.success() && run.done,
            "child {i} failed ({status}, done: {})\n{}",
            run.done,
            stderr_of(&children)
        );
    }

    // Every job ran exactly once, in its first attempt, and both processes took part.
    eprintln!(
        "jobs run by each child: {} and {}",
        runs[0].ran.len(),
        runs[1].ran.len()
    );
    for (i, run) in runs.iter().enumerate() {
        assert!(!run.ran.is_empty(), "child {i} ran no job");
    }
    let mut times: HashMap<&str, usize> = HashMap::new();
    for (id, attempt) in runs.iter().flat_map(|r| &r.ran) {
        assert_eq!(*attempt, 1, "job {id} ran in attempt {attempt}");
        *times.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    let ran: HashSet<String> = times.keys().map(|id| id.to_string()).collect();
    assert_eq!(ran, ids, "the jobs run are not the jobs enqueued");

    // The table agrees: every job succeeded, in attempt 1.
    let jobs = manager
        .list(&JobFilter::new().with_limit(JOBS as usize * 2))
        .await
        .expect("list");
    assert_eq!(jobs.len(), JOBS as usize);
    for job in &jobs {
        assert_eq!(
            (job.state, job.attempt),
            (JobState::Succeeded, 1),
            "job {}",
            job.id
        );
    }
    let counts = manager.counts(None).await.expect("counts");
    assert_eq!(counts.succeeded, u64::from(JOBS), "{counts:?}");
}

fn fresh_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        chrono::Utc::now().timestamp(),
        fastrand::u32(..)
    )
}

/// Whether the server answers (the testkit's probe: a missing server fails under
/// `BACKLINE_REQUIRE_SERVICES=1` and is skipped loudly otherwise).
async fn reachable(service: backline_testkit::service::Service) -> bool {
    service
        .reachable(|url| async move {
            let probe = SqlConfig::new(url)
                .with_max_connections(1)
                .with_migrate_on_connect(false)
                .with_connect_timeout(Duration::from_secs(5));
            SqlBackend::connect(probe).await.map(|_| ())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_sqlite_file_never_run_a_job_twice() {
    let dir = std::env::temp_dir().join("backline-sqlite-tests");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(format!("{}.db", fresh_name("p")));
    let url = format!("sqlite://{}", file.display());
    two_processes_drain_one_table(&url, "backline_jobs").await;
    for suffix in ["", "-wal", "-shm"] {
        let mut path = file.as_os_str().to_owned();
        path.push(suffix);
        let _ = std::fs::remove_file(path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_table_never_run_a_job_twice() {
    let url = backline_testkit::service::POSTGRES.url();
    if !reachable(backline_testkit::service::POSTGRES).await {
        return;
    }
    let table = fresh_name("backline_t");
    two_processes_drain_one_table(&url, &table).await;
    let b = SqlBackend::connect(SqlConfig::new(&url).with_table(&table))
        .await
        .expect("connect");
    let pool = b.pg_pool().expect("postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {table}, {table}_locks"
    )))
    .execute(pool)
    .await
    .expect("drop the test's tables");
    sqlx::query("DELETE FROM backline_migrations WHERE table_name = $1")
        .bind(&table)
        .execute(pool)
        .await
        .expect("forget the test's migrations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_mysql_table_never_run_a_job_twice() {
    let url = backline_testkit::service::MYSQL.url();
    if !reachable(backline_testkit::service::MYSQL).await {
        return;
    }
    let table = fresh_name("backline_t");
    two_processes_drain_one_table(&url, &table).await;
    let b = SqlBackend::connect(SqlConfig::new(&url).with_table(&table))
        .await
        .expect("connect");
    let pool = b.mysql_pool().expect("mysql");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {table}, {table}_locks"
    )))
    .execute(pool)
    .await
    .expect("drop the test's tables");
    sqlx::query("DELETE FROM backline_migrations WHERE table_name = ?")
        .bind(&table)
        .execute(pool)
        .await
        .expect("forget the test's migrations");
}
