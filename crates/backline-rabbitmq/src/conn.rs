//! The connection: its channels (`Conn`), opening and reconnecting with back-off, the one
//! helper that opens a channel, and the passive-declare [`Probe`] of the inspection calls.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline_core::{redact_url, Error, ErrorChain, Result};
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

use crate::acks::Tags;
use crate::topology::MAX_QUEUE_NAME;
use crate::{backend_err, conn_err, lock, Inner, BACKEND};

/// Opens a channel on `connection`.
pub(crate) async fn open_channel(connection: &Connection) -> Result<Channel> {
    connection
        .create_channel()
        .await
        .map_err(|e| conn_err("channel.open", e))
}

/// One connection and its channels; replaced as a whole on reconnect.
pub(crate) struct Conn {
    pub(crate) generation: u64,
    pub(crate) connection: Connection,
    /// Publishes, in confirm mode.
    pub(crate) publish: Channel,
    /// Claims (`basic.get`) and their acks.
    pub(crate) claim: Channel,
    /// The claim channel's delivery tags, for multiple acks (see [`Inner::ack_claimed`]).
    pub(crate) tags: Mutex<Tags>,
    /// Held while an ack or nack on `claim` is planned and sent: frames go out in plan order.
    pub(crate) acking: tokio::sync::Mutex<()>,
    /// Declarations, purges and wake-ups. A refused declaration (other arguments) closes only
    /// this channel: it is reopened on its own, and the claimed jobs keep their leases.
    admin: Mutex<Channel>,
    /// The delay relays' consumers (one per landing queue), opened on first use.
    pub(crate) relay: tokio::sync::OnceCell<Channel>,
    /// The wake-up listener: one exclusive queue, bound once per waited-on queue.
    pub(crate) waker: tokio::sync::OnceCell<(Channel, String)>,
}

impl Conn {
    /// The admin channel, reopened if the broker closed it.
    pub(crate) async fn admin(&self) -> Result<Channel> {
        let ch = lock(&self.admin).clone();
        if ch.status().connected() {
            return Ok(ch);
        }
        let fresh = open_channel(&self.connection).await?;
        *lock(&self.admin) = fresh.clone();
        Ok(fresh)
    }

    fn healthy(&self) -> bool {
        self.connection.status().connected()
            && self.publish.status().connected()
            && self.claim.status().connected()
            && self.relay.get().is_none_or(|c| c.status().connected())
            && self.waker.get().is_none_or(|(c, _)| c.status().connected())
    }
}

/// Passive declares (how many messages a queue holds, without creating it or checking its
/// arguments) on a channel of their own, opened per inspection call: the broker answers a
/// missing queue with 404, which closes the channel it came on, so it must never be the admin
/// channel other calls are using at the same moment. It is reopened after each 404 and closed
/// when the probe is dropped.
pub(crate) struct Probe<'a> {
    conn: &'a Conn,
    channel: Option<Channel>,
}

impl<'a> Probe<'a> {
    pub(crate) fn new(conn: &'a Conn) -> Self {
        Probe {
            conn,
            channel: None,
        }
    }

    /// The messages in `name`, or `None` if there is no such queue.
    pub(crate) async fn passive(&mut self, name: &str) -> Result<Option<u32>> {
        if name.len() > MAX_QUEUE_NAME {
            return Ok(None);
        }
        let channel = match &self.channel {
            Some(c) if c.status().connected() => c.clone(),
            _ => {
                let c = open_channel(&self.conn.connection).await?;
                self.channel = Some(c.clone());
                c
            }
        };
        let declared = channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(q) => Ok(Some(q.message_count())),
            Err(e) if is_not_found(&e) => {
                // The broker closed the channel with the 404.
                self.channel = None;
                Ok(None)
            }
            Err(e) => Err(conn_err("queue.declare", e)),
        }
    }

    /// [`passive`](Self::passive), a missing queue counting 0.
    pub(crate) async fn count(&mut self, name: &str) -> Result<u64> {
        Ok(self.passive(name).await?.map_or(0, u64::from))
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.channel.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = c.close(200, "probe done".into()).await;
                });
            }
        }
    }
}

/// Whether the broker answered "no such queue" (404 NOT_FOUND, e.g. to a passive declare).
fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

impl Inner {
    /// The current connection if it is healthy; never reconnects.
    pub(crate) fn current(&self) -> Option<Arc<Conn>> {
        self.conn
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|c| c.healthy())
            .cloned()
    }

    /// The current connection, reconnecting with back-off when it is gone.
    pub(crate) async fn conn(&self) -> Result<Arc<Conn>> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _reconnecting = self.reconnecting.lock().await;
        // Another caller may have reconnected while this one waited.
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let old = self.conn.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(old) = old {
            tracing::warn!(
                url = %redact_url(&self.config.url),
                "RabbitMQ connection lost; reconnecting"
            );
            // Jobs held on the old channels are the broker's again once it closes.
            if old.connection.status().connected() {
                let closing = old
                    .connection
                    .close(200, "reconnecting after a channel error".into());
                let _ = tokio::time::timeout(self.config.connect_timeout, closing).await;
            }
        }
        let mut delay = Duration::from_millis(100);
        let mut tries = 0u32;
        loop {
            let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
            let opened = tokio::time::timeout(self.config.connect_timeout, self.open(generation))
                .await
                .unwrap_or_else(|_| {
                    Err(backend_err(
                        "connect",
                        format!("no answer within {:?}", self.config.connect_timeout),
                    ))
                });
            match opened {
                Ok(c) => {
                    lock(&self.declared).clear();
                    // Deliveries of the old connection are the broker's again: forget them.
                    lock(&self.held).retain(|_, h| h.generation == c.generation);
                    let c = Arc::new(c);
                    *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                    tracing::info!(url = %redact_url(&self.config.url), "connected to RabbitMQ");
                    return Ok(c);
                }
                Err(e) => {
                    tries += 1;
                    if tries > self.config.reconnect_attempts {
                        return Err(match e {
                            e @ Error::Connection { .. } => e,
                            other => Error::Connection {
                                backend: BACKEND,
                                op: "connect",
                                source: Box::new(other),
                            },
                        });
                    }
                    tracing::warn!(error = %ErrorChain(&e), retry_in = ?delay, "RabbitMQ connect failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn open(&self, generation: u64) -> Result<Conn> {
        let props = ConnectionProperties::default()
            .with_connection_name(self.config.connection_name.clone().into());
        let connection = Connection::connect(&self.config.url, props)
            .await
            .map_err(|e| conn_err("connect", e))?;
        let publish = open_channel(&connection).await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| conn_err("confirm.select", e))?;
        let claim = open_channel(&connection).await?;
        let admin = open_channel(&connection).await?;
        Ok(Conn {
            generation,
            connection,
            publish,
            claim,
            tags: Mutex::new(Tags::default()),
            acking: tokio::sync::Mutex::new(()),
            admin: Mutex::new(admin),
            relay: tokio::sync::OnceCell::new(),
            waker: tokio::sync::OnceCell::new(),
        })
    }
}
