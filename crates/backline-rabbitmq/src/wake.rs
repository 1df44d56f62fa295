//! Wake-ups: the per-queue counters that `wait` sleeps on (core's
//! [`WakeSignals`](backline_core::provider::WakeSignals)), the sender state of each queue
//! ([`Signal`]), and the wake-ups that travel
//! between handles and processes on `amq.direct` (the coalescing sender, [`Waking`], and the
//! listener each connection opens). [`Inner::notify_due`] is the one call for "jobs of this
//! queue are due now".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use backline_core::{ErrorChain, Result};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use crate::conn::{open_channel, Conn};
use crate::topology::MAX_QUEUE_NAME;
use crate::{conn_err, lock, Inner};

/// The exchange wake-ups travel on: built into every broker, nothing to declare or delete.
const WAKE_EXCHANGE: &str = "amq.direct";

/// A queue's wake-up sender state (its waiters' counter is in [`Inner::wakes`]).
#[derive(Default)]
pub(crate) struct Signal {
    /// Whether a wake-up sender task runs for this queue (see [`Inner::wake_others`]).
    waking: AtomicBool,
    /// Whether a job came due since the sender's last wake-up began.
    wake_again: AtomicBool,
}

/// Whether a queue's wake-up sender is active; dropping it (the sender stopped, or its task
/// was dropped with its runtime) lets the next caller start a new one.
struct Waking {
    signal: Arc<Signal>,
    /// Whether dropping this resets `waking` (not when another sender has taken over).
    armed: bool,
}

impl Waking {
    /// Ends this sender without resetting `waking`: another sender has taken over.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Waking {
    fn drop(&mut self) {
        if self.armed {
            self.signal.waking.store(false, Ordering::SeqCst);
        }
    }
}

/// Publishes one wake-up for `queue` on `conn`'s admin channel; `false` if it could not.
async fn send_wake(conn: &Conn, key: &str, queue: &str) -> bool {
    let admin = match conn.admin().await {
        Ok(admin) => admin,
        Err(e) => {
            tracing::debug!(queue = %queue, error = %ErrorChain(&e), "no channel for a wake-up");
            return false;
        }
    };
    let sent = admin
        .basic_publish(
            WAKE_EXCHANGE.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"",
            BasicProperties::default(),
        )
        .await;
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(queue = %queue, error = %ErrorChain(&e), "wake-up publish failed");
            false
        }
    }
}

impl Inner {
    /// Jobs of `queue` are due now: wakes this handle's waiters and, through
    /// [`wake_others`](Self::wake_others), every other handle's.
    pub(crate) async fn notify_due(&self, conn: &Conn, queue: &str) {
        self.wakes.bump(queue);
        self.wake_others(conn, queue).await;
    }

    /// The routing key of `queue`'s wake-ups on `amq.direct`.
    fn wake_key(&self, queue: &str) -> String {
        self.prefixed(queue, "~wake")
    }

    /// Tells every handle waiting on `queue` (in any process) that jobs may be due: a
    /// transient message on `amq.direct`, unconfirmed (a lost one costs a poll interval).
    ///
    /// Wake-ups are coalesced, at most one per queue per `wake_linger` (default 1 ms,
    /// [`RabbitMqConfig::with_wake_linger`]) from a handle: every publish is a message the
    /// broker routes, and one per enqueued job halved the rate of enqueues one by one. The
    /// first wake-up after a quiet spell is sent by its caller before it returns (a producer
    /// that exits right after `enqueue` has sent it); a task then lingers, and the jobs that
    /// came due meanwhile share one more wake-up when the linger ends, and so on until a linger
    /// passes without any. A caller either sends (and starts the task) or marks `wake_again`
    /// while a sender is active, which sends after the mark. Only a lost connection or channel
    /// drops a wake-up (the sender stops; the next caller starts afresh).
    async fn wake_others(&self, conn: &Conn, queue: &str) {
        let key = self.wake_key(queue);
        if key.len() > MAX_QUEUE_NAME {
            return;
        }
        let signal = self.signal(queue);
        signal.wake_again.store(true, Ordering::SeqCst);
        if signal.waking.swap(true, Ordering::SeqCst) {
            return;
        }
        let waking = Waking {
            signal,
            armed: true,
        };
        waking.signal.wake_again.store(false, Ordering::SeqCst);
        if !send_wake(conn, &key, queue).await {
            return;
        }
        let linger = self.config.wake_linger;
        let me = self.me.clone();
        let queue = queue.to_owned();
        tokio::spawn(async move {
            loop {
                if linger.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(linger).await;
                }
                let signal = &waking.signal;
                if !signal.wake_again.load(Ordering::SeqCst) {
                    signal.waking.store(false, Ordering::SeqCst);
                    // A caller that marked `wake_again` after the check above but saw
                    // `waking` still set has left its wake-up to this task: send it, unless
                    // another caller has started a new sender in the meantime.
                    if !signal.wake_again.load(Ordering::SeqCst)
                        || signal.waking.swap(true, Ordering::SeqCst)
                    {
                        waking.disarm();
                        return;
                    }
                }
                signal.wake_again.store(false, Ordering::SeqCst);
                // The current connection each time: the one the first wake-up went out on
                // may have been replaced.
                let Some(conn) = me.upgrade().and_then(|inner| inner.current()) else {
                    return;
                };
                if !send_wake(&conn, &key, &queue).await {
                    return;
                }
            }
        });
    }

    /// Listens to `queue`'s wake-ups on this connection, once: an exclusive, auto-deleted
    /// queue bound to `amq.direct`, consumed without acks; each message bumps the signal.
    pub(crate) async fn ensure_waker(self: &Arc<Self>, conn: &Conn, queue: &str) -> Result<()> {
        if lock(&self.wakers).get(queue) == Some(&conn.generation) {
            return Ok(());
        }
        let key = self.wake_key(queue);
        if key.len() > MAX_QUEUE_NAME {
            return Ok(());
        }
        let (channel, listener) = conn
            .waker
            .get_or_try_init(|| self.start_waker(conn))
            .await?;
        channel
            .queue_bind(
                listener.as_str().into(),
                WAKE_EXCHANGE.into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| conn_err("queue.bind", e))?;
        lock(&self.wakers).insert(queue.to_owned(), conn.generation);
        Ok(())
    }

    /// Opens this connection's wake-up listener: an exclusive, auto-deleted queue consumed
    /// without acks; a message's routing key names the queue whose signal it bumps.
    async fn start_waker(self: &Arc<Self>, conn: &Conn) -> Result<(Channel, String)> {
        let channel = open_channel(&conn.connection).await?;
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| conn_err("queue.declare", e))?;
        let mut consumer = channel
            .basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| conn_err("basic.consume", e))?;
        let weak: Weak<Inner> = Arc::downgrade(self);
        let head = format!("{}.", self.config.prefix);
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let Some(inner) = weak.upgrade() else { break };
                let key = d.routing_key.as_str();
                if let Some(queue) = key
                    .strip_prefix(head.as_str())
                    .and_then(|k| k.strip_suffix(".~wake"))
                {
                    inner.wakes.bump(queue);
                }
            }
        });
        Ok((channel, q.name().as_str().to_owned()))
    }

    pub(crate) fn signal(&self, queue: &str) -> Arc<Signal> {
        lock(&self.signals)
            .entry(queue.to_owned())
            .or_default()
            .clone()
    }
}
