//! The result writer: one task that gathers finished attempts from every queue and writes
//! them to the backend in batches of up to [`ServerConfig::finish_batch`](super::ServerConfig::finish_batch).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Inner, Run};
use crate::{ErrorChain, Finish};

/// What the claim loops and the job tasks send to the result writer.
pub(super) enum FinishMsg {
    Item(Finish),
    Flush(oneshot::Sender<()>),
}

/// Waits until the result writer has written every result sent before this call.
pub(super) async fn flush(run: &Run) {
    let (tx, rx) = oneshot::channel();
    if run.finish_tx.send(FinishMsg::Flush(tx)).await.is_ok() {
        let _ = rx.await;
    }
}

/// The result writer: takes what is queued (up to `finish_batch`), writes it in one call,
/// then answers the flushes that came with it; ends when every sender is gone.
pub(super) async fn finisher(inner: Arc<Inner>, mut rx: mpsc::Receiver<FinishMsg>) {
    let max = inner.config.finish_batch;
    let mut batch: Vec<Finish> = Vec::with_capacity(max);
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        let Some(first) = rx.recv().await else { break };
        let push = |m: FinishMsg, batch: &mut Vec<Finish>, flushes: &mut Vec<_>| match m {
            FinishMsg::Item(f) => batch.push(f),
            FinishMsg::Flush(tx) => flushes.push(tx),
        };
        push(first, &mut batch, &mut flushes);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(m) => push(m, &mut batch, &mut flushes),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write_results(&inner, &batch).await;
            batch.clear();
        }
        for tx in flushes.drain(..) {
            let _ = tx.send(());
        }
    }
}

async fn write_results(inner: &Inner, batch: &[Finish]) {
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=8 {
        match inner.backend.finish(batch).await {
            Ok(applied) => {
                for (f, ok) in batch.iter().zip(applied) {
                    if !ok {
                        tracing::warn!(job = %f.id, "result not applied: the lease was lost (the job runs again or ran elsewhere)");
                    }
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), attempt, "cannot write job results; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(inner.config.max_error_backoff);
            }
        }
    }
    tracing::error!(
        jobs = batch.len(),
        "giving up writing job results; their leases will expire and the jobs run again"
    );
}
