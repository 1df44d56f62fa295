//! Run with: cargo run --example rabbitmq --features rabbitmq
//!
//! Needs RabbitMQ (3.10 or newer) at `BACKLINE_AMQP_URL`, by default
//! `amqp://guest:guest@127.0.0.1:5672/%2f` (`cargo xtask services up rabbitmq`, or
//! `docker compose up -d rabbitmq`). Every queue the example declares starts with its own
//! prefix, `backline-example.`; it never touches other queues, and it deletes its queues when it
//! is done.
//!
//! Shown here, in order: connect with a queue prefix and a connection name; enqueue jobs due now
//! with different priorities, and one delayed by a second (it waits in the TTL wait-queue
//! ladder); a `JobServer` running them one at a time, so the priorities show; `counts` as the
//! broker knows them; a job that fails fatally and lands in the dead letters, listed with its
//! error and republished with `retry_dead` once the cause is fixed. It exits by itself in a few
//! seconds.
//!
//! What a broker cannot answer (a job by id, succeeded jobs, cancel): see the
//! `backline-rabbitmq` README.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline::rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use backline::{
    BackgroundJob, Counts, EnqueueOptions, JobArgs, JobContext, JobError, JobFilter, JobManager,
    JobServer, JobState, Priority,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The prefix of every queue of this example.
const PREFIX: &str = "backline-example";

/// How long the example waits for its jobs before it gives up.
const DEADLINE: Duration = Duration::from_secs(15);

/// A notification, enqueued at several priorities.
#[derive(Serialize, Deserialize)]
struct Notify {
    user: String,
}

impl JobArgs for Notify {
    const NAME: &'static str = "notifications.send";
}

/// A payment that fails fatally until the payment provider is configured.
#[derive(Serialize, Deserialize)]
struct Charge {
    order_id: u64,
}

impl JobArgs for Charge {
    const NAME: &'static str = "payments.charge";
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

struct SendNotification {
    ran: Arc<Mutex<Vec<String>>>,
    started: Instant,
}

impl BackgroundJob for SendNotification {
    type Args = Notify;

    async fn execute(&self, args: Notify, ctx: JobContext) -> Result<(), JobError> {
        println!(
            "[job {}] +{:>4} ms notifying {}",
            ctx.id(),
            self.started.elapsed().as_millis(),
            args.user
        );
        if let Ok(mut ran) = self.ran.lock() {
            ran.push(args.user);
        }
        Ok(())
    }
}

struct ChargeCard {
    configured: Arc<AtomicBool>,
    charged: Arc<AtomicBool>,
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
            return Err(JobError::fatal("the payment provider is not configured"));
        }
        println!("[job {}] order {}: charged", ctx.id(), args.order_id);
        self.charged.store(true, Ordering::SeqCst);
        Ok(())
    }
}

fn print_counts(when: &str, c: &Counts) {
    println!(
        "[app] counts {when}: ready {}, waiting {}, running {}, dead {}",
        c.ready, c.scheduled, c.running, c.dead
    );
}

/// Polls `check` every 50 ms until it holds, or fails after [`DEADLINE`].
async fn until(what: &str, mut check: impl FnMut() -> bool) -> Result<(), AnyError> {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        if Instant::now() > deadline {
            return Err(format!("gave up waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn demo(backend: &RabbitMqBackend) -> Result<(), AnyError> {
    let backend_dyn: Arc<dyn backline::Backend> = Arc::new(backend.clone());
    let manager = JobManager::new(backend_dyn.clone());
    let started = Instant::now();

    for (user, priority) in [
        ("low@example.com", Priority::Low),
        ("normal@example.com", Priority::Normal),
        ("high@example.com", Priority::High),
    ] {
        manager
            .enqueue_with(
                Notify { user: user.into() },
                EnqueueOptions::new().priority(priority),
            )
            .await?;
    }
    manager
        .enqueue_with(
            Notify {
                user: "later@example.com".into(),
            },
            EnqueueOptions::new().delay(Duration::from_secs(1)),
        )
        .await?;
    let charge = manager.enqueue(Charge { order_id: 42 }).await?;
    print_counts("after enqueue", &manager.counts(None).await?);

    let ran = Arc::new(Mutex::new(Vec::new()));
    let configured = Arc::new(AtomicBool::new(false));
    let charged = Arc::new(AtomicBool::new(false));
    let server = JobServer::builder(backend_dyn.clone())
        .register(SendNotification {
            ran: ran.clone(),
            started,
        })
        .register(ChargeCard {
            configured: configured.clone(),
            charged: charged.clone(),
        })
        .queue("default", 1)
        .configure(|c| {
            c.claim_batch = 1;
            c.poll_interval = Duration::from_millis(200);
        })
        .build()?;
    let running = server.start();

    let notified = || ran.lock().map(|r| r.len()).unwrap_or(0);
    until("the four notifications", || notified() >= 4).await?;
    println!(
        "[app] notification order: {:?}",
        ran.lock().map(|r| r.clone()).unwrap_or_default()
    );

    // The charge failed fatally: it waits in the dead letters with its error.
    let deadline = Instant::now() + DEADLINE;
    let dead = loop {
        let dead = manager
            .list(&JobFilter::new().with_state(JobState::Dead))
            .await?;
        if let Some(job) = dead.into_iter().find(|j| j.id == charge) {
            break job;
        }
        if Instant::now() > deadline {
            return Err("the charge never reached the dead letters".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "[app] dead letter {}: attempt {}, error {:?}",
        dead.id, dead.attempt, dead.last_error
    );
    print_counts("with a dead job", &manager.counts(None).await?);

    // The operator fixes the configuration and republishes the dead job.
    configured.store(true, Ordering::SeqCst);
    println!("[app] retry_dead: {}", manager.retry_dead(charge).await?);
    until("the retried charge", || charged.load(Ordering::SeqCst)).await?;

    running.shutdown().await?;
    print_counts("at the end", &manager.counts(None).await?);
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = RabbitMqConfig::from_env()
        .with_prefix(PREFIX)
        .with_connection_name("backline-example");
    let backend = match RabbitMqBackend::connect(config).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "cannot reach RabbitMQ: {e} (start it with `cargo xtask services up rabbitmq`)"
            );
            return ExitCode::FAILURE;
        }
    };
    let result = demo(&backend).await;
    match backend.delete_declared_queues().await {
        Ok(_) => println!("[app] deleted the example's queues"),
        Err(e) => eprintln!("[app] could not delete the example's queues: {e}"),
    }
    backend.close().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("example failed: {e}");
            ExitCode::FAILURE
        }
    }
}
