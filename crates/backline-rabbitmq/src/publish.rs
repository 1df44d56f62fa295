//! Publishing: persistent, `mandatory` publishes on the connection's confirm-mode channel, the
//! confirm deadline, the wait for the broker's confirm, and the move of another publisher's
//! message to the dead letters.

use backline_core::{Error, Result};
use chrono::Utc;
use lapin::options::BasicPublishOptions;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Confirmation};

use crate::conn::Conn;
use crate::message::{self, Meta};
use crate::{backend_err, conn_err, Inner};

impl Inner {
    /// When a publish started now must have its confirm: the confirm timeout covers the send
    /// (which waits while the broker blocks publishers) and the confirm together.
    pub(crate) fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.config.confirm_timeout
    }

    /// `f`, failing with [`Error::Timeout`] past `deadline`; `None`: the caller enforces a
    /// deadline around a larger whole (one timer per call instead of two per message).
    pub(crate) async fn within<F: std::future::Future>(
        &self,
        deadline: Option<tokio::time::Instant>,
        f: F,
    ) -> Result<F::Output> {
        match deadline {
            Some(d) => tokio::time::timeout_at(d, f)
                .await
                .map_err(|_| self.timed_out()),
            None => Ok(f.await),
        }
    }

    fn timed_out(&self) -> Error {
        Error::Timeout {
            op: "publish confirm",
            after: self.config.confirm_timeout,
        }
    }

    /// Publishes persistently with `mandatory`, without awaiting the confirm.
    pub(crate) async fn publish(
        &self,
        conn: &Conn,
        routing_key: &str,
        meta: &Meta,
        payload: &[u8],
        deadline: Option<tokio::time::Instant>,
    ) -> Result<lapin::PublisherConfirm> {
        self.publish_raw(conn, routing_key, meta.properties(), payload, deadline)
            .await
    }

    async fn publish_raw(
        &self,
        conn: &Conn,
        routing_key: &str,
        properties: BasicProperties,
        payload: &[u8],
        deadline: Option<tokio::time::Instant>,
    ) -> Result<lapin::PublisherConfirm> {
        let send = conn.publish.basic_publish(
            "".into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            payload,
            properties,
        );
        self.within(deadline, send)
            .await?
            .map_err(|e| conn_err("basic.publish", e))
    }

    pub(crate) async fn confirmed(
        &self,
        confirm: lapin::PublisherConfirm,
        routing_key: &str,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<()> {
        let confirmation = self
            .within(deadline, confirm)
            .await?
            .map_err(|e| conn_err("publish confirm", e))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err(backend_err(
                "basic.publish",
                format!("the broker returned a message for queue {routing_key}: no such queue"),
            )),
            Confirmation::Nack(None) => Err(backend_err(
                "basic.publish",
                format!("the broker refused (nack) a message for queue {routing_key}"),
            )),
            Confirmation::NotRequested => Err(backend_err(
                "basic.publish",
                "the publish channel is not in confirm mode".into(),
            )),
        }
    }

    /// Publishes one message and waits for the broker's confirm.
    pub(crate) async fn publish_confirmed(
        &self,
        conn: &Conn,
        routing_key: &str,
        meta: &Meta,
        payload: &[u8],
    ) -> Result<()> {
        let deadline = Some(self.deadline());
        let c = self
            .publish(conn, routing_key, meta, payload, deadline)
            .await?;
        self.confirmed(c, routing_key, deadline).await
    }

    /// Moves another publisher's message (no job name) out of a wait or landing queue into
    /// `queue`'s dead letters, confirmed, with the reason in its headers.
    pub(crate) async fn dead_letter_foreign(
        &self,
        conn: &Conn,
        queue: &str,
        properties: &BasicProperties,
        payload: &[u8],
        reason: &str,
    ) -> Result<()> {
        let dead = self.dead_name(queue);
        self.ensure_plain(conn, &dead).await?;
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            message::H_ERROR.into(),
            AMQPValue::LongString(message::truncate_error(reason).into()),
        );
        headers.insert(
            message::H_DIED_AT.into(),
            AMQPValue::LongLongInt(Utc::now().timestamp_micros()),
        );
        let props = properties
            .clone()
            .with_delivery_mode(2)
            .with_headers(headers);
        let deadline = Some(self.deadline());
        let c = self
            .publish_raw(conn, &dead, props, payload, deadline)
            .await?;
        self.confirmed(c, &dead, deadline).await
    }
}
