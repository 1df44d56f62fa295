//! Run with: cargo run --example email_job
//!
//! Sending a welcome email through a flaky SMTP server, with retries.
//!
//! Job or worker? An email is sent once, because a user signed up, and must not be lost if the
//! SMTP server hiccups or the process restarts: that is a background job. (Polling an outbox
//! table every minute would be a worker.)
//!
//! The SMTP stub refuses the first attempt; the job returns `JobError::retryable`, and the
//! server tries again after the back-off of the job type's own `RetryPolicy` (200 ms, at most 3
//! attempts) instead of the default (1 s × 2, 25 attempts). (With the in-memory provider the
//! retry may start up to one `ServerConfig::poll_interval`, 1 s, after it is due.)

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backline::{
    BackgroundJob, JobArgs, JobContext, JobError, JobManager, JobServer, MemoryBackend, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Serialize, Deserialize)]
struct WelcomeEmail {
    to: String,
}

impl JobArgs for WelcomeEmail {
    const NAME: &'static str = "emails.welcome";

    fn retry_policy() -> RetryPolicy {
        RetryPolicy::default()
            .with_initial(Duration::from_millis(200))
            .with_max_attempts(3)
    }
}

/// The error of the SMTP stub.
#[derive(Debug)]
struct SmtpError(&'static str);

impl std::fmt::Display for SmtpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SMTP: {}", self.0)
    }
}

impl std::error::Error for SmtpError {}

/// An SMTP client stub that refuses its first message.
#[derive(Default)]
struct FlakySmtp {
    calls: AtomicU32,
}

impl FlakySmtp {
    async fn send(&self, to: &str, subject: &str) -> Result<(), SmtpError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(SmtpError("421 service not available, try again later"));
        }
        println!("[smtp] delivered {subject:?} to {to}");
        Ok(())
    }
}

struct SendWelcomeEmail {
    smtp: Arc<FlakySmtp>,
    sent: mpsc::UnboundedSender<u32>,
}

impl BackgroundJob for SendWelcomeEmail {
    type Args = WelcomeEmail;

    async fn execute(&self, args: WelcomeEmail, ctx: JobContext) -> Result<(), JobError> {
        println!(
            "[job] attempt {} of {}: mailing {}",
            ctx.attempt(),
            ctx.max_attempts(),
            args.to
        );
        // A temporary SMTP failure is worth retrying. (`?` alone would do the same: any error
        // converts into a retryable `JobError`; `JobError::fatal` would give up at once.)
        self.smtp
            .send(&args.to, "Welcome!")
            .await
            .map_err(JobError::retryable)?;
        let _ = self.sent.send(ctx.attempt());
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

    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel();
    let server = JobServer::builder(backend)
        .register(SendWelcomeEmail {
            smtp: Arc::new(FlakySmtp::default()),
            sent: sent_tx,
        })
        .build()?;
    let running = server.start();

    let id = jobs
        .enqueue(WelcomeEmail {
            to: "ada@example.com".into(),
        })
        .await?;
    println!("[app] enqueued {id}; the sign-up request returns at once");

    match tokio::time::timeout(Duration::from_secs(5), sent_rx.recv()).await {
        Ok(Some(attempt)) => println!("[app] the email went out on attempt {attempt}"),
        _ => eprintln!("[app] the email was not sent within 5 s"),
    }
    running.shutdown().await?;

    if let Some(job) = jobs.get(id).await? {
        println!(
            "[app] job {} is {} after {} attempt(s); last error: {}",
            job.id,
            job.state,
            job.attempt,
            job.last_error.as_deref().unwrap_or("none")
        );
    }
    Ok(())
}
