//! Run with: cargo run --release -p backline-rabbitmq --example throughput [-- JOBS]
//!
//! Rough throughput and latency of the RabbitMQ provider beside raw lapin, measured in the same
//! run against the broker at `BACKLINE_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`):
//!
//! - enqueue: Backline `push` of batches of 1,000 vs raw persistent publishes with confirms, 1,000
//!   outstanding; one by one from 32 tasks vs raw publish-and-await-confirm from 32 tasks;
//! - drain of JOBS no-op jobs (default 100,000) by a `JobServer` at concurrency 16 and 256 vs a
//!   raw consumer with manual acks and prefetch 100;
//! - enqueue-to-start latency p50/p99 at 500 jobs/s for 4 s.
//!
//! Each row uses queues of its own under the prefix `backline-throughput-…` and deletes them. It
//! prints a table and exits. Until `backline-bench` has a RabbitMQ module, this is where the
//! provider's numbers come from.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backline_core::{
    Backend, BackgroundJob, EnqueueOptions, JobArgs, JobContext, JobError, JobManager, JobServer,
    NewJob, ServerConfig,
};
use backline_rabbitmq::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use backline_rabbitmq::lapin::types::FieldTable;
use backline_rabbitmq::lapin::{BasicProperties, Connection, ConnectionProperties};
use backline_rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

type AnyError = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, AnyError>;

#[derive(Serialize, Deserialize)]
struct Noop;

impl JobArgs for Noop {
    const NAME: &'static str = "bench.noop";
}

struct NoopHandler(Arc<AtomicUsize>);

impl BackgroundJob for NoopHandler {
    type Args = Noop;
    async fn execute(&self, _: Noop, _: JobContext) -> std::result::Result<(), JobError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A job that carries the instant it was enqueued (microseconds since the run began).
#[derive(Serialize, Deserialize)]
struct Stamp {
    at_us: u64,
}

impl JobArgs for Stamp {
    const NAME: &'static str = "bench.stamp";
}

struct StampHandler {
    origin: Instant,
    lat: Arc<Mutex<Vec<u64>>>,
}

impl BackgroundJob for StampHandler {
    type Args = Stamp;
    async fn execute(&self, args: Stamp, _: JobContext) -> std::result::Result<(), JobError> {
        let now = self.origin.elapsed().as_micros() as u64;
        if let Ok(mut l) = self.lat.lock() {
            l.push(now.saturating_sub(args.at_us));
        }
        Ok(())
    }
}

fn url() -> String {
    std::env::var("BACKLINE_AMQP_URL").unwrap_or_else(|_| backline_rabbitmq::DEFAULT_URL.to_owned())
}

fn prefix() -> String {
    format!("backline-throughput-{:08x}", fastrand::u32(..))
}

async fn backend(prefix: &str) -> Result<RabbitMqBackend> {
    Ok(RabbitMqBackend::connect(RabbitMqConfig::new(url()).with_prefix(prefix)).await?)
}

fn jobs(manager: &JobManager, n: usize) -> Result<Vec<NewJob>> {
    Ok((0..n)
        .map(|_| manager.prepare(&Noop, EnqueueOptions::new()))
        .collect::<backline_core::Result<Vec<_>>>()?)
}

/// Backline: `push` in batches of 1,000; jobs/s. Leaves the jobs queued.
async fn backline_enqueue_batch(b: &RabbitMqBackend, n: usize) -> Result<f64> {
    let manager = JobManager::new(Arc::new(b.clone()));
    let batches: Vec<Vec<NewJob>> = jobs(&manager, n)?
        .chunks(1000)
        .map(|c| c.to_vec())
        .collect();
    let start = Instant::now();
    for batch in batches {
        b.push(batch).await?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Backline: one job per `enqueue`, from 32 tasks; jobs/s.
async fn backline_enqueue_single(b: &RabbitMqBackend, n: usize) -> Result<f64> {
    let manager = JobManager::new(Arc::new(b.clone()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let m = manager.clone();
        let k = n / 32;
        tasks.push(tokio::spawn(async move {
            for _ in 0..k {
                m.enqueue(Noop).await?;
            }
            Ok::<(), backline_core::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((n / 32 * 32) as f64 / start.elapsed().as_secs_f64())
}

/// Backline: a `JobServer` drains `n` no-op jobs at `concurrency`; jobs/s.
async fn backline_drain(b: &RabbitMqBackend, n: usize, concurrency: usize) -> Result<f64> {
    let count = Arc::new(AtomicUsize::new(0));
    let server = JobServer::builder(Arc::new(b.clone()))
        .register(NoopHandler(count.clone()))
        .queue("default", concurrency)
        .config(ServerConfig {
            claim_batch: concurrency.min(100),
            ..ServerConfig::default()
        })
        .configure(|c| c.succeeded_ttl = Duration::ZERO)
        .build()?;
    let start = Instant::now();
    server.run_until_idle().await?;
    let secs = start.elapsed().as_secs_f64();
    let done = count.load(Ordering::Relaxed);
    if done != n {
        return Err(format!("drained {done} of {n}").into());
    }
    Ok(n as f64 / secs)
}

async fn raw_connection() -> Result<Connection> {
    Ok(Connection::connect(&url(), ConnectionProperties::default()).await?)
}

/// Raw lapin: persistent publishes with confirms, `window` outstanding; msgs/s.
async fn raw_publish(conn: &Connection, queue: &str, n: usize, window: usize) -> Result<f64> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = b"null";
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = window.min(n - sent);
        let mut confirms = Vec::with_capacity(k);
        for _ in 0..k {
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?,
            );
        }
        for c in confirms {
            c.await?;
        }
        sent += k;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Raw lapin: one publish-and-confirm at a time from 32 tasks; msgs/s.
async fn raw_publish_single(conn: &Connection, queue: &str, n: usize) -> Result<f64> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let ch = ch.clone();
        let q = queue.to_owned();
        let k = n / 32;
        tasks.push(tokio::spawn(async move {
            for _ in 0..k {
                ch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    b"null",
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await?;
            }
            Ok::<(), backline_rabbitmq::lapin::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((n / 32 * 32) as f64 / start.elapsed().as_secs_f64())
}

/// Raw lapin: consume `n` messages with manual acks, prefetch 100; msgs/s.
async fn raw_consume(conn: &Connection, queue: &str, n: usize) -> Result<f64> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(100, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let Some(d) = consumer.next().await else {
            break;
        };
        d?.acker.ack(BasicAckOptions::default()).await?;
        got += 1;
    }
    let rate = got as f64 / start.elapsed().as_secs_f64();
    let _ = ch.close(200, "done".into()).await;
    Ok(rate)
}

/// Enqueue-to-start latency at `rate` jobs/s for `secs`; (p50, p99) in ms.
async fn latency(b: &RabbitMqBackend, rate: u64, secs: u64) -> Result<(f64, f64)> {
    let origin = Instant::now();
    let lat = Arc::new(Mutex::new(Vec::new()));
    let backend: Arc<dyn Backend> = Arc::new(b.clone());
    let manager = JobManager::new(backend.clone());
    let running = JobServer::builder(backend)
        .register(StampHandler {
            origin,
            lat: lat.clone(),
        })
        .queue("default", 16)
        .configure(|c| c.succeeded_ttl = Duration::ZERO)
        .build()?
        .start();
    let n = rate * secs;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for _ in 0..n {
        tick.tick().await;
        let at_us = origin.elapsed().as_micros() as u64;
        manager.enqueue(Stamp { at_us }).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while lat.lock().map(|l| l.len()).unwrap_or(0) < n as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await?;
    let mut l = lat.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    if l.is_empty() {
        return Err("no job ran".into());
    }
    let pick = |q: f64| l[((l.len() as f64 * q) as usize).min(l.len() - 1)] as f64 / 1000.0;
    Ok((pick(0.50), pick(0.99)))
}

async fn raw_queue(conn: &Connection) -> Result<String> {
    let name = format!("{}.raw", prefix());
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        backline_rabbitmq::lapin::types::AMQPValue::LongInt(5),
    );
    ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;
    Ok(name)
}

async fn delete(conn: &Connection, queues: impl IntoIterator<Item = String>) -> Result<()> {
    let ch = conn.create_channel().await?;
    for q in queues {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    Ok(())
}

fn row(what: &str, backline: f64, raw: f64) {
    println!(
        "{what:<44} {backline:>10.0} {raw:>10.0} {:>7.0}%",
        100.0 * backline / raw
    );
}

async fn run(n: usize) -> Result<()> {
    let conn = raw_connection().await?;
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "row (jobs/s)", "Backline", "raw lapin", "ratio"
    );

    // Enqueue in batches, then drain at 256, with raw rows beside them.
    let p = prefix();
    let b = backend(&p).await?;
    let q = raw_queue(&conn).await?;
    let raw = raw_publish(&conn, &q, n, 1000).await?;
    let ours = backline_enqueue_batch(&b, n).await?;
    row("enqueue, batches of 1,000", ours, raw);
    let raw = raw_consume(&conn, &q, n).await?;
    let ours = backline_drain(&b, n, 256).await?;
    row("drain, concurrency 256 (raw: prefetch 100)", ours, raw);
    delete(&conn, b.declared_queues().into_iter().chain([q])).await?;

    // Drain at 16.
    let p = prefix();
    let b = backend(&p).await?;
    let k = n / 5;
    backline_enqueue_batch(&b, k).await?;
    let q = raw_queue(&conn).await?;
    raw_publish(&conn, &q, k, 1000).await?;
    let raw = raw_consume(&conn, &q, k).await?;
    let ours = backline_drain(&b, k, 16).await?;
    row("drain, concurrency 16 (raw: prefetch 100)", ours, raw);
    delete(&conn, b.declared_queues().into_iter().chain([q])).await?;

    // One by one from 32 tasks.
    let p = prefix();
    let b = backend(&p).await?;
    let q = raw_queue(&conn).await?;
    let k = n / 10;
    let raw = raw_publish_single(&conn, &q, k).await?;
    let ours = backline_enqueue_single(&b, k).await?;
    row("enqueue one by one, 32 tasks", ours, raw);
    delete(&conn, b.declared_queues().into_iter().chain([q])).await?;

    // Latency.
    let p = prefix();
    let b = backend(&p).await?;
    let (p50, p99) = latency(&b, 500, 4).await?;
    println!("enqueue-to-start at 500/s: p50 {p50:.2} ms, p99 {p99:.2} ms");
    delete(&conn, b.declared_queues()).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000usize);
    match run(n).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("throughput failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
