//! Run with: cargo run --example queue_processing
//!
//! A looping worker that consumes a queue for as long as the application runs.
//!
//! Job or worker? Listening to a queue (Azure Service Bus, RabbitMQ, or here a Tokio channel)
//! is a task that lives as long as the process: a background worker. (Each message that must
//! be handled exactly once, with retries, could in turn be enqueued as a job.)
//!
//! `BackgroundWorker::run` loops until `WorkerContext::cancelled` resolves, then returns
//! `Ok(())`. The receiver lives in the worker behind a mutex, so that if the run fails and the
//! `WorkerManager` restarts it, the new run picks up the same channel.

use std::time::Duration;

use backline::{BackgroundWorker, WorkerContext, WorkerError, WorkerManager};
use tokio::sync::{mpsc, Mutex};

#[derive(Debug)]
struct OrderPlaced {
    order_id: u64,
}

struct QueueProcessingWorker {
    inbox: Mutex<mpsc::Receiver<OrderPlaced>>,
    processed: mpsc::UnboundedSender<u64>,
}

impl BackgroundWorker for QueueProcessingWorker {
    fn name(&self) -> &str {
        "order-queue"
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        let mut inbox = self.inbox.lock().await;
        println!("[{}] listening", ctx.name());
        loop {
            tokio::select! {
                // Stop between two messages when the application shuts down.
                _ = ctx.cancelled() => break,
                msg = inbox.recv() => match msg {
                    Some(msg) => {
                        println!("[{}] processing order {}", ctx.name(), msg.order_id);
                        let _ = self.processed.send(msg.order_id);
                    }
                    // Every sender is gone: nothing more will come; wait for the shutdown.
                    None => {
                        ctx.cancelled().await;
                        break;
                    }
                },
            }
        }
        println!("[{}] cancelled; returning", ctx.name());
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

    let (queue, inbox) = mpsc::channel(16);
    let (processed_tx, mut processed) = mpsc::unbounded_channel();

    let mut workers = WorkerManager::new();
    workers.add(QueueProcessingWorker {
        inbox: Mutex::new(inbox),
        processed: processed_tx,
    });
    let running = workers.start();

    // Other parts of the application publish messages.
    for order_id in 1..=5 {
        queue.send(OrderPlaced { order_id }).await?;
    }

    let all = async {
        let mut n = 0;
        while n < 5 && processed.recv().await.is_some() {
            n += 1;
        }
        n
    };
    let n = tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .unwrap_or(0);
    println!("[app] {n} of 5 orders processed; shutting down");

    // Cancels the worker's context: its loop breaks and `run` returns.
    running.shutdown().await;
    println!("[app] stopped");
    Ok(())
}
