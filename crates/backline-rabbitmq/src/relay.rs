//! The delay relay: messages that waited out their step of the ladder arrive in their queue's
//! landing queue, and are moved on from there, to their work queue if due or down the ladder.
//! [`Inner::relay_delivery`] is that step for one delivery, used by the relay consumer each
//! queue gets on its first claim and by `maintain` for landing queues no consumer serves.

use std::sync::{Arc, Weak};
use std::time::Duration;

use backline_core::{Error, ErrorChain, Result};
use chrono::Utc;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use crate::acks::requeue;
use crate::conn::{open_channel, Conn};
use crate::message::Meta;
use crate::{conn_err, lock, Inner};

impl Inner {
    /// Moves a waiting message on: to its work queue if due, else down the ladder.
    async fn relay(&self, conn: &Conn, meta: &Meta, payload: &[u8]) -> Result<bool> {
        let (target, due) = self.route(conn, meta, Utc::now()).await?;
        self.publish_confirmed(conn, &target, meta, payload).await?;
        Ok(due)
    }

    /// Another publisher's message (no job name) in `queue`'s landing queue (published there
    /// by hand, or dead-lettered from a wait step): its job is unknown, so it goes to the dead
    /// letters with the reason, confirmed, before the caller acks it.
    async fn landing_foreign(
        &self,
        conn: &Conn,
        queue: &str,
        properties: &BasicProperties,
        payload: &[u8],
    ) -> Result<()> {
        tracing::error!(queue = %queue, "a message without a job name in the landing queue; moved to the dead letters");
        self.dead_letter_foreign(
            conn,
            queue,
            properties,
            payload,
            "a message without a job name (no `type`, no Backline header) in a wait or landing queue",
        )
        .await
    }

    /// Starts the relay consumer of `queue`'s landing queue on this connection, once.
    pub(crate) async fn ensure_relay(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        queue: &str,
    ) -> Result<()> {
        if lock(&self.relays).get(queue) == Some(&conn.generation) {
            return Ok(());
        }
        let landing = self.landing_name(queue);
        self.ensure_plain(conn, &landing).await?;
        let channel = conn
            .relay
            .get_or_try_init(|| async {
                let channel = open_channel(&conn.connection).await?;
                channel
                    .basic_qos(self.config.prefetch, BasicQosOptions::default())
                    .await
                    .map_err(|e| conn_err("basic.qos", e))?;
                Ok::<Channel, Error>(channel)
            })
            .await?;
        let mut consumer = channel
            .basic_consume(
                landing.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| conn_err("basic.consume", e))?;
        lock(&self.relays).insert(queue.to_owned(), conn.generation);
        let weak: Weak<Inner> = Arc::downgrade(self);
        let queue = queue.to_owned();
        let generation = conn.generation;
        tokio::spawn(async move {
            while let Some(delivery) = consumer.next().await {
                let Ok(delivery) = delivery else { break };
                let Some(inner) = weak.upgrade() else { break };
                let Ok(conn) = inner.conn().await else { break };
                if let Err(e) = inner.relay_delivery(&conn, &queue, &delivery).await {
                    // Back to the landing queue; try again after a pause, never in a loop. (A
                    // lost channel ends the loop at the next delivery it no longer yields.)
                    tracing::warn!(queue = %queue, error = %ErrorChain(&e), "delay relay failed; retrying in a second");
                    drop(inner);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            if let Some(inner) = weak.upgrade() {
                let mut relays = lock(&inner.relays);
                if relays.get(&queue) == Some(&generation) {
                    relays.remove(&queue);
                }
            }
        });
        Ok(())
    }

    /// Moves one delivery of `queue`'s landing queue on (another publisher's message to the
    /// dead letters), then acks it; returns whether it is due now (in its work queue), whose
    /// workers it then wakes. A move that failed hands the delivery back (requeue) and is the
    /// error.
    pub(crate) async fn relay_delivery(
        &self,
        conn: &Conn,
        queue: &str,
        delivery: &Delivery,
    ) -> Result<bool> {
        let moved = match Meta::from_delivery(&delivery.properties, queue, None) {
            Some(meta) => self.relay(conn, &meta, &delivery.data).await,
            None => self
                .landing_foreign(conn, queue, &delivery.properties, &delivery.data)
                .await
                .map(|()| false),
        };
        let due = match moved {
            Ok(due) => due,
            Err(e) => {
                // Not moved: back to the landing queue, for the next try.
                requeue(&delivery.acker).await;
                return Err(e);
            }
        };
        let acked = delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| conn_err("basic.ack", e));
        if due {
            // The job is in its work queue (confirmed) whether or not the ack went out.
            self.notify_due(conn, queue).await;
        }
        acked.map(|_| due)
    }
}
