//! Run with: cargo run --example postgres --features postgres
//!
//! Needs a PostgreSQL server at `BACKLINE_POSTGRES_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/test` (`cargo xtask services up postgres`, or
//! `docker compose up -d postgres`). The example uses its own tables, `backline_example_jobs`
//! (and `backline_example_jobs_locks`) for Backline and `backline_example_orders` for the
//! application, and drops them when it is done.
//!
//! Shown here, in order: connect and migrate; enqueue; enqueue inside the application's own
//! sqlx transaction, beside the application's own write (one transaction committed, one rolled
//! back: only the committed job exists and runs); a `JobServer` draining the table with
//! `run_until_idle`; inspection with `counts` and `list`. It exits by itself.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline::sql::sqlx;
use backline::{
    redact_url, BackgroundJob, Counts, EnqueueOptions, JobArgs, JobContext, JobError, JobFilter,
    JobManager, JobServer, JobState, SqlBackend, SqlConfig,
};
use serde::{Deserialize, Serialize};

/// Backline's table for this example (its lock table is `backline_example_jobs_locks`).
const TABLE: &str = "backline_example_jobs";

/// A job enqueued on its own.
#[derive(Serialize, Deserialize)]
struct WelcomeEmail {
    to: String,
}

impl JobArgs for WelcomeEmail {
    const NAME: &'static str = "emails.welcome";
}

/// A job enqueued in the same transaction as the order it belongs to.
#[derive(Serialize, Deserialize)]
struct SendReceipt {
    order_id: i64,
}

impl JobArgs for SendReceipt {
    const NAME: &'static str = "orders.receipt";
}

/// What ran, for the check at the end.
type Ran = Arc<Mutex<Vec<String>>>;

struct SendWelcomeEmail(Ran);

impl BackgroundJob for SendWelcomeEmail {
    type Args = WelcomeEmail;

    async fn execute(&self, args: WelcomeEmail, ctx: JobContext) -> Result<(), JobError> {
        println!("[job {}] sending a welcome email to {}", ctx.id(), args.to);
        self.0
            .lock()
            .expect("lock")
            .push(format!("welcome {}", args.to));
        Ok(())
    }
}

struct SendReceiptEmail(Ran);

impl BackgroundJob for SendReceiptEmail {
    type Args = SendReceipt;

    async fn execute(&self, args: SendReceipt, ctx: JobContext) -> Result<(), JobError> {
        println!(
            "[job {}] sending the receipt of order {}",
            ctx.id(),
            args.order_id
        );
        self.0
            .lock()
            .expect("lock")
            .push(format!("receipt {}", args.order_id));
        Ok(())
    }
}

/// Drops the example's tables and forgets their migrations, so that the next run starts afresh.
async fn drop_tables(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DROP TABLE IF EXISTS backline_example_jobs, backline_example_jobs_locks, backline_example_orders",
    )
    .execute(pool)
    .await?;
    sqlx::query("DELETE FROM backline_migrations WHERE table_name = $1")
        .bind(TABLE)
        .execute(pool)
        .await?;
    Ok(())
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

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let url = std::env::var("BACKLINE_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());

    // Connect, then apply the migrations explicitly (by default `connect` migrates too).
    let config = SqlConfig::new(&url)
        .with_table(TABLE)
        .with_migrate_on_connect(false)
        .with_connect_timeout(Duration::from_secs(5));
    let backend = match SqlBackend::connect(config).await {
        Ok(b) => b,
        Err(e) => {
            // The message never contains the URL's password.
            eprintln!(
                "[app] cannot reach PostgreSQL at {}: {}\n[app] start it (`cargo xtask services up postgres` or `docker compose up -d postgres`), or set BACKLINE_POSTGRES_URL",
                redact_url(&url),
                describe(&e)
            );
            return ExitCode::FAILURE;
        }
    };
    println!("[app] connected to {}", redact_url(&url));
    let Some(pool) = backend.pg_pool().cloned() else {
        eprintln!(
            "[app] {} is not a PostgreSQL URL (postgres://…)",
            redact_url(&url)
        );
        return ExitCode::FAILURE;
    };
    // What an interrupted earlier run may have left (the first time, there is nothing to drop).
    let _ = drop_tables(&pool).await;

    let result = demo(&backend, &pool).await;
    let cleaned = drop_tables(&pool).await;
    match (result, cleaned) {
        (Ok(()), Ok(())) => {
            println!("[app] dropped the example's tables");
            ExitCode::SUCCESS
        }
        (Err(e), _) => {
            eprintln!("[app] error: {}", describe(&*e));
            ExitCode::FAILURE
        }
        (Ok(()), Err(e)) => {
            eprintln!("[app] cannot drop the example's tables: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

async fn demo(backend: &SqlBackend, pool: &sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    backend.migrate().await?;
    println!("[app] migrations applied to {TABLE}");
    let manager = JobManager::new(backend.clone());

    // The application's own table.
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS backline_example_orders (id BIGINT PRIMARY KEY, item TEXT NOT NULL)",
    )
    .execute(pool)
    .await?;

    // 1. A plain enqueue, and one for later.
    let welcome = manager
        .enqueue(WelcomeEmail {
            to: "ada@example.com".into(),
        })
        .await?;
    println!("[app] enqueued welcome email {welcome}");
    let later = manager
        .enqueue_with(
            WelcomeEmail {
                to: "grace@example.com".into(),
            },
            EnqueueOptions::new().delay(Duration::from_secs(3600)),
        )
        .await?;
    println!("[app] enqueued welcome email {later}, due in an hour");

    // 2. Transactional enqueue: the order and its receipt job are written together, on the
    //    application's connection; the wake-up (NOTIFY) goes out on commit.
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO backline_example_orders (id, item) VALUES (1, 'a teapot')")
        .execute(&mut *tx)
        .await?;
    let job = manager.prepare(&SendReceipt { order_id: 1 }, EnqueueOptions::new())?;
    let committed = backend.enqueue_in(&mut *tx, job).await?;
    tx.commit().await?;
    println!("[app] order 1 and its receipt job {committed}: committed");

    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO backline_example_orders (id, item) VALUES (2, 'a kettle')")
        .execute(&mut *tx)
        .await?;
    let job = manager.prepare(&SendReceipt { order_id: 2 }, EnqueueOptions::new())?;
    let rolled_back = backend.enqueue_in(&mut *tx, job).await?;
    tx.rollback().await?;
    println!(
        "[app] order 2 and its receipt job {rolled_back}: rolled back, so the job exists: {}",
        manager.get(rolled_back).await?.is_some()
    );

    // 3. Inspection before the drain.
    print_counts("before the drain", &manager.counts(None).await?);

    // 4. A job server drains what is due and returns; the job for later stays where it is.
    let ran: Ran = Arc::default();
    let server = JobServer::builder(backend.clone())
        .register(SendWelcomeEmail(ran.clone()))
        .register(SendReceiptEmail(ran.clone()))
        .build()?;
    server.run_until_idle().await?;

    // 5. Inspection after the drain.
    print_counts("after the drain", &manager.counts(None).await?);
    let succeeded = manager
        .list(&JobFilter::new().with_state(JobState::Succeeded))
        .await?;
    for job in &succeeded {
        println!(
            "[app] succeeded: {} {} after {} attempt(s)",
            job.name, job.id, job.attempt
        );
    }

    let mut ran = ran.lock().expect("lock").clone();
    ran.sort();
    if ran != ["receipt 1", "welcome ada@example.com"] {
        return Err(
            format!("expected the committed jobs to run, and only them; ran {ran:?}").into(),
        );
    }
    println!("[app] the committed receipt ran; the rolled-back one never existed");
    Ok(())
}
