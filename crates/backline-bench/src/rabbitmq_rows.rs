//! The RabbitMQ provider: a fresh queue prefix per run (its queues deleted after it), and the
//! raw limits of the same broker measured in the same run with plain lapin:
//!
//! - **confirmed publishes**: persistent messages with `mandatory`, 1,000 outstanding confirms
//!   at a time (beside batch enqueue), once with a bare message and once with the properties a
//!   fresh Backline job carries (priority, id, name, enqueue time; no headers): the gap between
//!   the two is what the broker pays to store those bytes, not Backline's client;
//! - **publish, then await its confirm**, from 32 tasks on one channel (beside enqueue one by
//!   one), bare and with a job's properties;
//! - **consume with manual acks**, prefetch 100: one awaited ack per message, and one `multiple`
//!   ack per 50 messages (the fastest a consumer can go; beside the drain);
//! - **pull with `basic.get`**, 256 at a time pipelined, one `multiple` ack per round: the limit
//!   of the protocol Backline claims with (a pull never hands out a job nobody started, so a
//!   crash never counts an attempt for it; a push consumer's prefetched messages would be).
//!
//! Each run measures the bare and the job-shaped publishes in alternating order, so that
//! neither always meets the fresher queue. The broker's rate drifts by ±20 % within a bench
//! run, so one pair is measured back to back, in alternating order: Backline's enqueue one by
//! one and the raw publish of the same messages (the `paired` rows; their ratio is the one to
//! trust for enqueue one by one).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backline_core::Backend;
use backline_rabbitmq::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use backline_rabbitmq::lapin::types::{AMQPValue, FieldTable, ShortString};
use backline_rabbitmq::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use backline_rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use futures_util::StreamExt;
use tokio::task::JoinSet;

use crate::report::{thousands, Row, Unit};
use crate::{Plan, Result};

/// `BACKLINE_AMQP_URL`, or the loopback broker.
fn url() -> String {
    std::env::var("BACKLINE_AMQP_URL").unwrap_or_else(|_| backline_rabbitmq::DEFAULT_URL.to_owned())
}

/// A queue prefix no other run uses: `backline-bench-<unix seconds>-<pid>-<counter>`.
fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "backline-bench-{secs}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn unreachable(e: impl std::fmt::Display) -> crate::Error {
    format!(
        "cannot reach RabbitMQ at {} ({e}); start it (`cargo xtask services up`) or set BACKLINE_AMQP_URL",
        backline_core::redact_url(&url())
    )
    .into()
}

/// A RabbitMQ backend on a queue prefix of its own, for one run.
pub(crate) struct FreshPrefix {
    /// The backend under test.
    pub(crate) backend: RabbitMqBackend,
}

impl FreshPrefix {
    /// Connects with a new prefix.
    pub(crate) async fn create() -> Result<FreshPrefix> {
        let config = RabbitMqConfig::new(url()).with_prefix(unique_prefix());
        let backend = RabbitMqBackend::connect(config)
            .await
            .map_err(unreachable)?;
        Ok(FreshPrefix { backend })
    }

    /// Deletes the run's queues and closes the connection; a failure is a warning.
    pub(crate) async fn dispose(self) {
        if let Err(e) = self.backend.delete_declared_queues().await {
            eprintln!("  warning: cannot delete the bench queues: {e}");
        }
        self.backend.close().await;
    }
}

/// A durable priority queue of the raw rows (as Backline declares its work queues).
async fn raw_queue(ch: &Channel) -> Result<String> {
    let name = format!("{}.raw", unique_prefix());
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::LongInt(5));
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

/// A persistent message, bare or with the properties of a fresh Backline job.
fn properties(i: usize, like_backline: bool) -> BasicProperties {
    let bare = BasicProperties::default().with_delivery_mode(2);
    if !like_backline {
        return bare;
    }
    let id = format!("0190f3c2-7a4e-7c4d-9a1b-{i:012x}");
    bare.with_priority(3)
        .with_message_id(ShortString::from(id))
        .with_type("bench.noop".into())
        .with_timestamp(1_795_600_000)
}

/// `n` confirmed persistent publishes, `window` outstanding; msgs/s.
async fn publish(ch: &Channel, queue: &str, n: usize, window: usize, like: bool) -> Result<f64> {
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = window.min(n - sent);
        let mut confirms = Vec::with_capacity(k);
        for i in sent..sent + k {
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    b"null",
                    properties(i, like),
                )
                .await?,
            );
        }
        for c in confirms {
            if !c.await?.is_ack() {
                return Err("the broker refused a raw publish".into());
            }
        }
        sent += k;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

/// `n` publishes, each awaiting its confirm, from `tasks` tasks on one channel; msgs/s.
async fn publish_one_by_one(
    ch: &Channel,
    queue: &str,
    n: usize,
    tasks: usize,
    like: bool,
) -> Result<f64> {
    let start = Instant::now();
    let mut set = JoinSet::new();
    for t in 0..tasks {
        let ch = ch.clone();
        let queue = queue.to_owned();
        let share = n / tasks + usize::from(t < n % tasks);
        set.spawn(async move {
            for i in 0..share {
                ch.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    b"null",
                    properties(t * n + i, like),
                )
                .await?
                .await?;
            }
            Ok::<(), backline_rabbitmq::lapin::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

/// Consumes `n` messages with manual acks, prefetch 100: one awaited ack per message
/// (`ack_every` 1) or one `multiple` ack per `ack_every` messages; msgs/s.
async fn consume(conn: &Connection, queue: &str, n: usize, ack_every: usize) -> Result<f64> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(100, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let next = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await;
        let Ok(Some(d)) = next else {
            return Err(format!("raw consume got {got} of {n} messages").into());
        };
        let d = d?;
        got += 1;
        if ack_every == 1 {
            d.acker.ack(BasicAckOptions::default()).await?;
        } else if got % ack_every == 0 || got == n {
            d.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let _ = ch.close(200, "done".into()).await;
    Ok(rate)
}

/// Pulls `n` messages with `basic.get`, `k` pipelined at a time, one `multiple` ack per round;
/// msgs/s.
async fn pull(conn: &Connection, queue: &str, n: usize, k: usize) -> Result<f64> {
    let ch = conn.create_channel().await?;
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let gets = (0..k.min(n - got))
            .map(|_| ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }));
        let mut last = None;
        for r in futures_util::future::join_all(gets).await {
            if let Some(m) = r? {
                got += 1;
                last = last.max(Some(m.delivery.delivery_tag));
            }
        }
        let Some(last) = last else {
            return Err(format!("raw pull got {got} of {n} messages").into());
        };
        ch.basic_ack(last, BasicAckOptions { multiple: true })
            .await?;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let _ = ch.close(200, "done".into()).await;
    Ok(rate)
}

/// The raw rows; each run on queues of its own, deleted after it.
pub(crate) async fn raw_rows(plan: &Plan) -> Result<Vec<Row>> {
    let n = plan.jobs;
    let single = plan.single_jobs;
    let tasks = plan.enqueue_tasks;
    let window = plan.batch;
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .map_err(unreachable)?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (mut bare, mut like, mut one, mut one_like) = (vec![], vec![], vec![], vec![]);
    let (mut drain, mut drain_multiple, mut drain_pull) = (vec![], vec![], vec![]);
    let (mut paired_backline, mut paired_raw) = (vec![], vec![]);
    for run in 0..plan.runs {
        let q = raw_queue(&ch).await?;
        let purge = || ch.queue_purge(q.as_str().into(), Default::default());
        let result = async {
            for like_first in [run % 2 == 0, run % 2 == 1] {
                if like_first {
                    like.push(publish(&ch, &q, n, window, true).await?);
                    purge().await?;
                    one_like.push(publish_one_by_one(&ch, &q, single, tasks, true).await?);
                } else {
                    bare.push(publish(&ch, &q, n, window, false).await?);
                    purge().await?;
                    one.push(publish_one_by_one(&ch, &q, single, tasks, false).await?);
                }
                purge().await?;
            }
            for backline_turn in [run % 2 == 0, run % 2 == 1] {
                if backline_turn {
                    let fresh = FreshPrefix::create().await?;
                    let backend: Arc<dyn Backend> = Arc::new(fresh.backend.clone());
                    let rate = crate::measure::enqueue_one_by_one(backend, single, tasks).await;
                    fresh.dispose().await;
                    paired_backline.push(rate?);
                } else {
                    paired_raw.push(publish_one_by_one(&ch, &q, single, tasks, true).await?);
                    purge().await?;
                }
            }
            publish(&ch, &q, n, window, false).await?;
            drain.push(consume(&conn, &q, n, 1).await?);
            publish(&ch, &q, n, window, false).await?;
            drain_multiple.push(consume(&conn, &q, n, 50).await?);
            publish(&ch, &q, n, window, false).await?;
            drain_pull.push(pull(&conn, &q, n, 256).await?);
            Ok::<(), crate::Error>(())
        }
        .await;
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
        result?;
    }
    let _ = conn.close(200, "done".into()).await;
    let w = thousands(window as f64);
    Ok(vec![
        Row::new(
            format!("raw_publish_{window}"),
            format!("raw: confirmed publish, {w} outstanding"),
            n,
            Unit::JobsPerSecond,
            bare,
        ),
        Row::new(
            format!("raw_publish_props_{window}"),
            "raw: same, with a job's properties".to_owned(),
            n,
            Unit::JobsPerSecond,
            like,
        ),
        Row::new(
            format!("raw_publish_single_c{tasks}"),
            format!("raw: publish + await confirm, {tasks} tasks"),
            single,
            Unit::JobsPerSecond,
            one,
        ),
        Row::new(
            format!("raw_publish_single_props_c{tasks}"),
            "raw: same, with a job's properties".to_owned(),
            single,
            Unit::JobsPerSecond,
            one_like,
        ),
        Row::new(
            format!("enqueue_single_paired_c{tasks}"),
            format!("paired: Backline enqueue one by one, {tasks} tasks"),
            single,
            Unit::JobsPerSecond,
            paired_backline,
        ),
        Row::new(
            format!("raw_publish_single_paired_c{tasks}"),
            "paired: raw publish, job's properties".to_owned(),
            single,
            Unit::JobsPerSecond,
            paired_raw,
        ),
        Row::new(
            "raw_consume_ack_p100".to_owned(),
            "raw: consume + ack each, prefetch 100".to_owned(),
            n,
            Unit::JobsPerSecond,
            drain,
        ),
        Row::new(
            "raw_consume_multiack_p100".to_owned(),
            "raw: consume, one multiple ack per 50".to_owned(),
            n,
            Unit::JobsPerSecond,
            drain_multiple,
        ),
        Row::new(
            "raw_get_multiack_256".to_owned(),
            "raw: basic.get x256 pipelined, multiple ack".to_owned(),
            n,
            Unit::JobsPerSecond,
            drain_pull,
        ),
    ])
}
