//! Run with: cargo run --example redis --features redis
//!
//! Needs a Redis server (6.0 or newer) at `BACKLINE_REDIS_URL`, by default
//! `redis://127.0.0.1:6379` (`cargo xtask services up redis`, or `docker compose up -d redis`).
//! Every key the example writes starts with its own prefix, `backline-example`
//! (`{backline-example:…` or `backline-example:…`); it never touches other keys. When it is done it purges its jobs in
//! every state (`JobManager::purge`), which deletes their hashes and sets; three small
//! bookkeeping keys stay (`backline-example:queues`, and the queue's `names` and `seq`), and the
//! next run reuses them.
//!
//! Shown here, in order: connect with a dedicated key prefix; enqueue jobs due now with
//! different priorities, and one delayed by a second; a `JobServer` running them (one at a time,
//! so the priorities show) until they are done, awaited by polling each job with a deadline;
//! inspection with `counts`; a job that fails with a fatal error and goes dead, then
//! `retry_dead` once the cause is fixed. It exits by itself in a few seconds.
//!
//! Durability: Redis acknowledges a write once it is in memory. Without the append-only file
//! with `appendfsync always` (`appendonly yes`), or replication to a replica that survives, an
//! acknowledged job can vanish with the server. See the `backline-redis` README.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline::redis::{RedisBackend, RedisConfig};
use backline::{
    BackgroundJob, Counts, EnqueueOptions, JobArgs, JobContext, JobError, JobFilter, JobId,
    JobManager, JobServer, JobState, Priority,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The prefix of every key of this example.
const PREFIX: &str = "backline-example";

/// How long the example waits for its jobs before it gives up.
const DEADLINE: Duration = Duration::from_secs(10);

/// A notification, enqueued at several priorities.
#[derive(Serialize, Deserialize)]
struct Notify {
    user: String,
    message: String,
}

impl JobArgs for Notify {
    const NAME: &'static str = "notifications.send";
}

/// A payment that fails fatally until the payment provider is configured.
#[derive(Serialize, Deserialize)]
struct Charge {
    order_id: u64,
    cents: u64,
}

impl JobArgs for Charge {
    const NAME: &'static str = "payments.charge";
}

/// Any error of the demo (`Send`, so that the futures holding one are `Send`).
type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// What ran, in order, for the output and the check at the end.
type Ran = Arc<Mutex<Vec<String>>>;

struct SendNotification {
    ran: Ran,
    started: Instant,
}

impl BackgroundJob for SendNotification {
    type Args = Notify;

    async fn execute(&self, args: Notify, ctx: JobContext) -> Result<(), JobError> {
        println!(
            "[job {}] +{:>4} ms notifying {}: {}",
            ctx.id(),
            self.started.elapsed().as_millis(),
            args.user,
            args.message
        );
        self.ran.lock().expect("lock").push(args.user);
        Ok(())
    }
}

struct ChargeCard {
    /// Whether the payment provider is configured; the application sets it after the job
    /// went dead, then retries the job.
    configured: Arc<AtomicBool>,
}

impl BackgroundJob for ChargeCard {
    type Args = Charge;

    async fn execute(&self, args: Charge, ctx: JobContext) -> Result<(), JobError> {
        if !self.configured.load(Ordering::SeqCst) {
            println!(
                "[job {}] order {}: the payment provider is not configured (fatal)",
                ctx.id(),
                args.order_id
            );
            // A fatal error: no retry, the job goes straight to `dead`.
            return Err(JobError::fatal("the payment provider is not configured"));
        }
        println!(
            "[job {}] order {}: charged {}.{:02}",
            ctx.id(),
            args.order_id,
            args.cents / 100,
            args.cents % 100
        );
        Ok(())
    }
}

fn print_counts(when: &str, c: &Counts) {
    println!(
        "[app] counts {when}: scheduled {}, ready {}, running {}, retrying {}, succeeded {}, dead {}",
        c.scheduled, c.ready, c.running, c.retrying, c.succeeded, c.dead
    );
}

/// The error and its causes on one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// Deletes the example's jobs in every state that can be purged (running jobs cannot; none
/// are left once the server has stopped). Returns how many it deleted.
async fn purge_all(manager: &JobManager) -> backline::Result<u64> {
    let mut total = 0;
    for state in JobState::ALL {
        if state != JobState::Running {
            total += manager.purge(state, None).await?;
        }
    }
    Ok(total)
}

/// Waits until each job of `ids` is finished (succeeded or dead), polling with a deadline.
async fn wait_finished(manager: &JobManager, ids: &[JobId]) -> Result<(), AnyError> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut pending = 0;
        for id in ids {
            match manager.get(*id).await? {
                Some(job) if matches!(job.state, JobState::Succeeded | JobState::Dead) => {}
                _ => pending += 1,
            }
        }
        if pending == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{pending} job(s) not finished after {DEADLINE:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    // `BACKLINE_REDIS_URL`, or redis://127.0.0.1:6379; every key under `backline-example`.
    let config = RedisConfig::from_env()
        .with_prefix(PREFIX)
        .with_connect_timeout(Duration::from_secs(2))
        .with_reconnect_retries(1);
    let url = config.redacted_url();
    let backend = match RedisBackend::connect(config).await {
        Ok(b) => b,
        Err(e) => {
            // The message never contains the URL's password.
            eprintln!(
                "[app] cannot reach Redis at {url}: {}\n[app] start it (`cargo xtask services up redis` or `docker compose up -d redis`), or set BACKLINE_REDIS_URL",
                describe(&e)
            );
            return ExitCode::FAILURE;
        }
    };
    println!("[app] connected to {url}, key prefix `{PREFIX}`");
    let manager = JobManager::new(backend.clone());

    let result = async {
        // What an interrupted earlier run may have left.
        let stale = purge_all(&manager).await?;
        if stale > 0 {
            println!("[app] purged {stale} job(s) left by an earlier run");
        }
        demo(&backend, &manager).await
    }
    .await;
    let cleaned = purge_all(&manager).await;
    match (result, cleaned) {
        (Ok(()), Ok(n)) => {
            println!("[app] purged the example's {n} job(s)");
            ExitCode::SUCCESS
        }
        (Err(e), _) => {
            eprintln!("[app] error: {}", describe(&*e));
            ExitCode::FAILURE
        }
        (Ok(()), Err(e)) => {
            eprintln!("[app] cannot purge the example's jobs: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

async fn demo(backend: &RedisBackend, manager: &JobManager) -> Result<(), AnyError> {
    // 1. Jobs due now, enqueued lowest priority first, and one for a second later.
    let mut ids = Vec::new();
    for (user, priority) in [
        ("lin", Priority::Low),
        ("ada", Priority::Normal),
        ("grace", Priority::High),
    ] {
        let id = manager
            .enqueue_with(
                Notify {
                    user: user.into(),
                    message: format!("a {priority:?} priority notification"),
                },
                EnqueueOptions::new().priority(priority),
            )
            .await?;
        println!("[app] enqueued notification {id} for {user}, priority {priority:?}");
        ids.push(id);
    }
    let later = manager
        .enqueue_with(
            Notify {
                user: "alan".into(),
                message: "a delayed notification".into(),
            },
            EnqueueOptions::new()
                .priority(Priority::High)
                .delay(Duration::from_secs(1)),
        )
        .await?;
    println!("[app] enqueued notification {later} for alan, due in a second");
    ids.push(later);
    let charge = manager
        .enqueue(Charge {
            order_id: 7,
            cents: 4250,
        })
        .await?;
    println!("[app] enqueued charge {charge} for order 7");
    ids.push(charge);
    print_counts("before the server", &manager.counts(None).await?);

    // 2. A server on the same backend, one job at a time, so that the priorities show.
    let ran: Ran = Arc::default();
    let configured = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let server = JobServer::builder(backend.clone())
        .register(SendNotification {
            ran: ran.clone(),
            started,
        })
        .register(ChargeCard {
            configured: configured.clone(),
        })
        .queue(backline::DEFAULT_QUEUE, 1)
        .configure(|c| c.grace = Duration::from_secs(2))
        .build()?;
    let handle = server.start();

    let outcome = async {
        wait_finished(manager, &ids).await?;
        println!(
            "[app] all jobs finished after {} ms",
            started.elapsed().as_millis()
        );
        print_counts("after the run", &manager.counts(None).await?);

        // 3. The dead job: why it died, then a retry once the cause is fixed.
        let dead = manager
            .list(&JobFilter::new().with_state(JobState::Dead))
            .await?;
        for job in &dead {
            println!(
                "[app] dead: {} {} after {} attempt(s): {}",
                job.name,
                job.id,
                job.attempt,
                job.last_error.as_deref().unwrap_or("?")
            );
        }
        if dead.iter().map(|j| j.id).collect::<Vec<_>>() != [charge] {
            return Err("expected the charge, and only it, to be dead".into());
        }
        configured.store(true, Ordering::SeqCst);
        println!("[app] payment provider configured; retry_dead({charge})");
        if !manager.retry_dead(charge).await? {
            return Err("retry_dead found no dead job".into());
        }
        wait_finished(manager, &[charge]).await?;
        let state = manager.get(charge).await?.map(|j| j.state);
        println!("[app] the charge is now {state:?}");
        if state != Some(JobState::Succeeded) {
            return Err("expected the retried charge to succeed".into());
        }
        print_counts("after the retry", &manager.counts(None).await?);
        Ok::<(), AnyError>(())
    }
    .await;
    // Stop the server in every case, then report.
    handle.shutdown().await?;
    outcome?;

    let ran = ran.lock().expect("lock").clone();
    println!("[app] notifications ran in this order: {}", ran.join(", "));
    if ran != ["grace", "ada", "lin", "alan"] {
        return Err("expected priority order, then the delayed job".into());
    }
    Ok(())
}
