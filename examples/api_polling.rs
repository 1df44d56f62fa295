//! Run with: cargo run --example api_polling
//!
//! Polling an external API on a fixed period and handling what it returns.
//!
//! Job or worker? Polling happens because time passes, for as long as the application runs,
//! and a missed poll is simply made up by the next one: a background worker. (Acting on one
//! price change that must not be lost, e.g. emailing a buyer, would be a job it enqueues.)
//!
//! The worker is a `PeriodicWorker` with `Schedule::every`: the period is measured from the end
//! of one run to the start of the next, so a slow API never makes runs overlap. The API client
//! is shared state given to the `WorkerManager` with `data` and read with `WorkerContext::data`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backline::{PeriodicWorker, Schedule, WorkerContext, WorkerError, WorkerManager};
use tokio::sync::mpsc;

/// A stand-in for a price API: the price goes up a little on every call.
#[derive(Default)]
struct PriceApi {
    calls: AtomicU32,
}

impl PriceApi {
    async fn fetch_price(&self, sku: &str) -> Result<(String, f64), std::io::Error> {
        // The network round trip.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        Ok((sku.to_owned(), 19.99 + f64::from(n) * 0.5))
    }
}

struct ApiPollingWorker {
    prices: mpsc::UnboundedSender<(String, f64)>,
}

impl PeriodicWorker for ApiPollingWorker {
    fn name(&self) -> &str {
        "price-poller"
    }

    fn schedule(&self) -> Schedule {
        // Every 300 ms here; every minute in real life.
        Schedule::every(Duration::from_millis(300))
    }

    async fn do_work(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        let api = ctx
            .data::<PriceApi>()
            .ok_or_else(|| WorkerError::msg("no PriceApi registered"))?;
        // A failed poll (`?`) is logged and the schedule goes on.
        let (sku, price) = api.fetch_price("B0-KEYBOARD").await?;
        println!("[{}] {sku} costs {price:.2}", ctx.name());
        let _ = self.prices.send((sku, price));
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

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut workers = WorkerManager::new();
    workers
        .data(PriceApi::default())
        .add_periodic(ApiPollingWorker { prices: tx });
    let running = workers.start();

    // The rest of the application would run here; we watch three polls, then stop.
    let three = async {
        let mut last = None;
        for _ in 0..3 {
            last = rx.recv().await;
        }
        last
    };
    match tokio::time::timeout(Duration::from_secs(5), three).await {
        Ok(Some((sku, price))) => println!("[app] latest price of {sku}: {price:.2}"),
        _ => eprintln!("[app] fewer than three polls within 5 s"),
    }

    running.shutdown().await;
    println!("[app] stopped");
    Ok(())
}
