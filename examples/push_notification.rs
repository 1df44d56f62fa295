//! Run with: cargo run --example push_notification
//!
//! Sending push notifications in bulk, with priorities.
//!
//! Job or worker? Each notification is sent once because something happened ("your order has
//! shipped") and may be retried: background jobs, enqueued many at a time. (Sending a digest
//! every Monday would be a worker that enqueues such jobs.)
//!
//! - `enqueue_batch` stores many jobs of one type in one call, with the type's defaults
//!   (`JobArgs::priority`, here `Normal`).
//! - One urgent notification jumps the line with `EnqueueOptions::priority(Priority::High)`.
//! - A batch with its own options is built with `JobManager::prepare` + `enqueue_raw`.
//!
//! The server runs one job at a time here, so the printed order is the priority order.

use std::sync::{Arc, Mutex};

use backline::{
    BackgroundJob, EnqueueOptions, JobArgs, JobContext, JobError, JobManager, JobServer,
    MemoryBackend, Priority,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct PushNotification {
    user_id: u64,
    message: String,
}

impl JobArgs for PushNotification {
    const NAME: &'static str = "push.send";
    fn queue() -> &'static str {
        "push"
    }
    // The default; shown for clarity.
    fn priority() -> Priority {
        Priority::Normal
    }
}

/// A stand-in for a push service (APNs, FCM): records what it sent.
#[derive(Default)]
struct PushService {
    sent: Mutex<Vec<String>>,
}

struct SendPush(Arc<PushService>);

impl BackgroundJob for SendPush {
    type Args = PushNotification;

    async fn execute(&self, args: PushNotification, _ctx: JobContext) -> Result<(), JobError> {
        let line = format!("user {}: {}", args.user_id, args.message);
        println!("[push] {line}");
        if let Ok(mut sent) = self.0.sent.lock() {
            sent.push(line);
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let backend = MemoryBackend::new();
    let jobs = JobManager::new(backend.clone());

    // Five orders shipped: one call, five jobs, priority Normal (the type's default).
    let shipped = jobs
        .enqueue_batch((1..=5).map(|user_id| PushNotification {
            user_id,
            message: format!("your order #{} has shipped", 1000 + user_id),
        }))
        .await?;
    println!(
        "[app] enqueued {} 'order shipped' notifications",
        shipped.len()
    );

    // A batch of low-priority digests: prepare each job with options, store them in one call.
    let digests = (1..=3)
        .map(|user_id| {
            jobs.prepare(
                &PushNotification {
                    user_id,
                    message: "your weekly digest is ready".into(),
                },
                EnqueueOptions::new().priority(Priority::Low),
            )
        })
        .collect::<backline::Result<Vec<_>>>()?;
    let digests = jobs.enqueue_raw(digests).await?;
    println!("[app] enqueued {} low-priority digests", digests.len());

    // Enqueued last, sent first.
    jobs.enqueue_with(
        PushNotification {
            user_id: 3,
            message: "new sign-in from an unknown device".into(),
        },
        EnqueueOptions::new().priority(Priority::High),
    )
    .await?;
    println!("[app] enqueued one high-priority security alert");

    let service = Arc::new(PushService::default());
    let server = JobServer::builder(backend)
        .register(SendPush(service.clone()))
        .queue("push", 1)
        .build()?;
    server.run_until_idle().await?;

    let sent = service.sent.lock().map(|s| s.len()).unwrap_or(0);
    let counts = jobs.counts(Some("push")).await?;
    println!(
        "[app] sent {sent} notifications; succeeded: {}, dead: {}",
        counts.succeeded, counts.dead
    );
    Ok(())
}
