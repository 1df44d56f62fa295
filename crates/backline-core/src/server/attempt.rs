//! One attempt of one job: decode, run the handler under its timeout and the server's
//! cancellation, catch a panic, and turn the end into an [`Outcome`] for the result writer (a
//! failure through [`RetryPolicy::outcome`]).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::results::FinishMsg;
use super::{Run, Running};
use crate::util::panic_message;
use crate::{ClaimedJob, Finish, JobContext, JobError, Outcome, Result, RetryPolicy};

enum Ended {
    Done(Result<(), JobError>),
    TimedOut(Duration),
    Cancelled,
}

pub(super) async fn run_job(run: Arc<Run>, claimed: ClaimedJob, permit: OwnedSemaphorePermit) {
    let ClaimedJob { job, token } = claimed;
    let inner = &run.inner;
    let cancel = run.hard.child_token();
    let lease_lost = Arc::new(AtomicBool::new(false));
    if let Ok(mut m) = run.running.lock() {
        m.insert(
            job.id,
            Running {
                token,
                cancel: cancel.clone(),
                lease_lost: lease_lost.clone(),
            },
        );
    }
    let span = tracing::debug_span!("job", name = %job.name, id = %job.id, attempt = job.attempt, queue = %job.queue);
    let handler = inner.handlers.get(&job.name).cloned();
    let outcome = async {
        let Some(handler) = handler else {
            let error = format!(
                "no handler for job `{}` on this server (registered: {})",
                job.name,
                inner.names.join(", ")
            );
            tracing::warn!(%error, "unknown job name");
            return RetryPolicy::default().outcome(&job, &JobError::msg(error), Utc::now());
        };
        tracing::debug!("job started");
        let ctx = JobContext {
            id: job.id,
            name: Arc::from(job.name.as_str()),
            queue: Arc::from(job.queue.as_str()),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            enqueued_at: job.enqueued_at,
            shutdown: run.draining.clone(),
            cancel: cancel.clone(),
            data: inner.data.clone(),
        };
        let fut = AssertUnwindSafe(handler.call(&job.payload, ctx)).catch_unwind();
        let limited = async {
            match job.timeout {
                None => Ended::Done(flatten(fut.await)),
                Some(t) => match tokio::time::timeout(t, fut).await {
                    Ok(r) => Ended::Done(flatten(r)),
                    Err(_) => Ended::TimedOut(t),
                },
            }
        };
        let mut ended = tokio::select! {
            biased;
            _ = cancel.cancelled() => Ended::Cancelled,
            e = limited => e,
        };
        // A handler that returns an error because the shutdown cancelled it is handed back too.
        if run.hard.is_cancelled() && !matches!(ended, Ended::Done(Ok(()))) {
            ended = Ended::Cancelled;
        }
        match ended {
            Ended::Done(Ok(())) => {
                tracing::debug!("job succeeded");
                Outcome::Succeeded {
                    keep: !inner.config.succeeded_ttl.is_zero(),
                }
            }
            Ended::Done(Err(e)) => handler.retry_policy().outcome(&job, &e, Utc::now()),
            Ended::TimedOut(t) => {
                cancel.cancel();
                let err = JobError::msg(format!("timed out after {t:?}"));
                handler.retry_policy().outcome(&job, &err, Utc::now())
            }
            Ended::Cancelled => Outcome::Release,
        }
    }
    .instrument(span)
    .await;
    if let Ok(mut m) = run.running.lock() {
        m.remove(&job.id);
    }
    if lease_lost.load(Ordering::Acquire) {
        tracing::warn!(job = %job.id, name = %job.name, "lease lost while running; the result is dropped (another attempt owns the job)");
        drop(permit);
        return;
    }
    match &outcome {
        Outcome::Retry { delay, error } => {
            tracing::warn!(job = %job.id, name = %job.name, attempt = job.attempt, retry_in = ?delay, %error, "job failed; will retry")
        }
        Outcome::Dead { error } => {
            tracing::error!(job = %job.id, name = %job.name, attempt = job.attempt, %error, "job dead")
        }
        Outcome::Release => {
            tracing::info!(job = %job.id, name = %job.name, "job cancelled by shutdown; handed back")
        }
        Outcome::Succeeded { .. } => {}
    }
    let _ = run
        .finish_tx
        .send(FinishMsg::Item(Finish {
            id: job.id,
            token,
            outcome,
        }))
        .await;
    drop(permit);
}

fn flatten(
    r: std::result::Result<Result<(), JobError>, Box<dyn std::any::Any + Send>>,
) -> Result<(), JobError> {
    match r {
        Ok(r) => r,
        Err(p) => Err(JobError::msg(format!("panicked: {}", panic_message(&*p)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FailureKind;

    #[test]
    fn flatten_passes_the_handlers_result_through() {
        assert!(flatten(Ok(Ok(()))).is_ok());
        let e = flatten(Ok(Err(JobError::fatal("bad input")))).expect_err("an error");
        assert_eq!((e.kind(), e.message()), (FailureKind::Fatal, "bad input"));
        let e =
            flatten(Ok(Err(JobError::retry_after(Duration::from_secs(3))))).expect_err("an error");
        assert_eq!(e.kind(), FailureKind::RetryAfter(Duration::from_secs(3)));
    }

    #[test]
    fn flatten_turns_a_panic_into_a_retryable_failure_with_its_message() {
        for (payload, message) in [
            (
                Box::new("oops") as Box<dyn std::any::Any + Send>,
                "panicked: oops",
            ),
            (Box::new(String::from("oops 2")), "panicked: oops 2"),
            (
                Box::new(42_u32),
                "panicked: a panic with a non-text payload",
            ),
        ] {
            let e = flatten(Err(payload)).expect_err("a panic is an error");
            assert_eq!((e.kind(), e.message()), (FailureKind::Retryable, message));
        }
    }
}
