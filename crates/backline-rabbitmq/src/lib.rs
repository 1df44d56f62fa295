#![doc = include_str!("../README.md")]

// One module per concern (object_store's `aws/` layout): `conn` (the connection, reconnect,
// channels), `topology` (queue names and declarations), `publish` (publish and confirm),
// `claim` (claim and finish of one delivery), `acks` (the delivery-tag book, acks and
// requeues), `wake` (wake-up signals), `relay` (the delay relay), `dead` (the dead-letter
// scan) and `backend` (the `Backend` implementation on top of them).
mod acks;
mod backend;
mod claim;
mod config;
mod conn;
mod dead;
mod message;
mod publish;
mod relay;
mod topology;
mod wake;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Weak};

use backline_core::{Error, LeaseToken, Result};
use lapin::options::QueueDeleteOptions;

pub use config::{QueueKind, QueueNaming, RabbitMqConfig, DEFAULT_URL, URL_ENV};
/// The AMQP client this provider is built on, re-exported so that versions match.
pub use lapin;

use backline_core::provider::WakeSignals;
use claim::Held;
use conn::Conn;
use wake::Signal;

const BACKEND: &str = "rabbitmq";

/// The RabbitMQ provider: one durable queue per (queue, job name), publisher confirms, manual
/// acks, a TTL wait-queue ladder for delays and back-off, and a dead-letter queue per queue.
///
/// Cloning is cheap: clones share one connection. Dropping the last clone closes it, which
/// hands every job it still holds back to the broker (redelivered, counted as a crashed attempt).
#[derive(Clone)]
pub struct RabbitMqBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RabbitMqBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqBackend")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The state every clone of a [`RabbitMqBackend`] shares.
struct Inner {
    /// This handle itself, for tasks that must not keep it alive (the wake-up sender).
    me: Weak<Inner>,
    config: RabbitMqConfig,
    /// The current connection (read on every call).
    conn: std::sync::RwLock<Option<Arc<Conn>>>,
    /// Held while (re)connecting, so one caller reconnects and the others wait for it.
    reconnecting: tokio::sync::Mutex<()>,
    /// Per work queue, how many messages the last `basic.get` said were left (a hint for how
    /// many gets the next claim pipelines at once).
    backlog: Mutex<HashMap<String, u32>>,
    generation: AtomicU64,
    /// Queues declared on the current connection.
    declared: Mutex<HashSet<String>>,
    /// Every queue this handle ever declared (for tear-down).
    ever_declared: Mutex<BTreeSet<String>>,
    /// The (queue → job names) this handle knows of.
    known: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// Deliveries claimed and not yet finished, by the token of their claim: two deliveries
    /// of one job id (a duplicate publish) are two leases, each finished on its own.
    held: Mutex<HashMap<LeaseToken, Held>>,
    /// The wake-up counters of the queues, which `wait` sleeps on.
    wakes: WakeSignals,
    /// The wake-up sender state per queue.
    signals: Mutex<HashMap<String, Arc<Signal>>>,
    /// Queues whose landing queue has a relay consumer, with the connection generation.
    relays: Mutex<HashMap<String, u64>>,
    /// Where the next claim starts among the job names.
    rotation: AtomicU64,
    /// Queues this handle listens to wake-ups for, with the connection generation.
    wakers: Mutex<HashMap<String, u64>>,
}

impl RabbitMqBackend {
    /// Connects to the broker (with the configured retries and back-off).
    ///
    /// Queues are declared when first used, so connecting creates nothing.
    pub async fn connect(config: RabbitMqConfig) -> Result<Self> {
        config.validate()?;
        let backend = RabbitMqBackend {
            inner: Arc::new_cyclic(|me| Inner {
                me: me.clone(),
                config,
                conn: std::sync::RwLock::new(None),
                reconnecting: tokio::sync::Mutex::new(()),
                backlog: Mutex::new(HashMap::new()),
                generation: AtomicU64::new(0),
                declared: Mutex::new(HashSet::new()),
                ever_declared: Mutex::new(BTreeSet::new()),
                known: Mutex::new(BTreeMap::new()),
                held: Mutex::new(HashMap::new()),
                wakes: WakeSignals::default(),
                signals: Mutex::new(HashMap::new()),
                relays: Mutex::new(HashMap::new()),
                rotation: AtomicU64::new(0),
                wakers: Mutex::new(HashMap::new()),
            }),
        };
        {
            let mut known = lock(&backend.inner.known);
            for (q, n) in &backend.inner.config.known_jobs {
                known.entry(q.clone()).or_default().insert(n.clone());
            }
        }
        backend.inner.conn().await?;
        Ok(backend)
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitMqConfig {
        &self.inner.config
    }

    /// The work queue of jobs named `name` in `queue` (`{prefix}.{queue}.{name}`, or
    /// `AbpBackgroundJobs.{name}` for the default queue under [`QueueNaming::Abp`]).
    pub fn work_queue_name(&self, queue: &str, name: &str) -> String {
        self.inner.work_name(queue, name)
    }

    /// The dead-letter queue of `queue` (`{prefix}.{queue}.~dead`).
    pub fn dead_queue_name(&self, queue: &str) -> String {
        self.inner.dead_name(queue)
    }

    /// Every queue this handle declared, for a tear-down (tests, a removed application).
    pub fn declared_queues(&self) -> Vec<String> {
        lock(&self.inner.ever_declared).iter().cloned().collect()
    }

    /// Deletes every queue this handle declared, with the jobs in them; returns how many
    /// messages went with them.
    pub async fn delete_declared_queues(&self) -> Result<u64> {
        let conn = self.inner.conn().await?;
        let mut n = 0u64;
        for q in self.declared_queues() {
            n += u64::from(
                conn.admin()
                    .await?
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map_err(|e| conn_err("queue.delete", e))?,
            );
        }
        lock(&self.inner.declared).clear();
        Ok(n)
    }

    /// Closes the connection: jobs this handle still holds go back to their queues (the broker
    /// marks them redelivered, which counts the attempt). The next call reconnects.
    pub async fn close(&self) {
        let _reconnecting = self.inner.reconnecting.lock().await;
        let old = self
            .inner
            .conn
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = old {
            let _ = c.connection.close(200, "closed by backline".into()).await;
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Some(c) = self
            .conn
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = c.connection.close(200, "closed by backline".into()).await;
            });
        }
    }
}

// Small helpers every module uses.

use backline_core::provider::{lock_unpoisoned as lock, saturating_add as later};

fn conn_err(op: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::connection(BACKEND, op, e)
}

/// A name refused by [`config`]'s checks, given with a job (push, claim): an invalid job.
fn invalid_job(e: Error) -> Error {
    match e {
        Error::Config(msg) => Error::InvalidJob(msg),
        other => other,
    }
}

fn backend_err(op: &'static str, msg: String) -> Error {
    Error::backend(BACKEND, op, msg)
}

fn unsupported(what: &'static str) -> Error {
    Error::unsupported(BACKEND, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use std::time::Duration;

    #[test]
    fn a_huge_delay_saturates() {
        let now = Utc::now();
        assert_eq!(later(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + chrono::Duration::seconds(1)
        );
    }
}
