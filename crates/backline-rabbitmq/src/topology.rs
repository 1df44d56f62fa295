//! Queue topology: the names of a queue's work, landing, wait-step and dead-letter queues,
//! their declaration (once per connection) and arguments, the wait-queue ladder, where a
//! message goes next ([`Inner::route`]), and the (queue → job names) this handle knows of.

use std::time::Duration;

use backline_core::{Error, Result, DEFAULT_QUEUE};
use chrono::{DateTime, Utc};
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

use crate::config::{self, QueueKind, QueueNaming};
use crate::conn::Conn;
use crate::message::Meta;
use crate::{conn_err, invalid_job, lock, Inner};

/// The smallest step of the wait-queue ladder: 2^4 ms = 16 ms.
pub(crate) const MIN_STEP: u32 = 4;
/// The largest step of the wait-queue ladder: 2^27 ms, about 37 hours.
pub(crate) const MAX_STEP: u32 = 27;

/// The longest a queue name may be (an AMQP short string).
pub(crate) const MAX_QUEUE_NAME: usize = 255;

/// A refused declaration (the queue exists with other arguments, e.g. another queue kind) is
/// a configuration problem, not a lost connection.
fn declare_err(name: &str, e: lapin::Error) -> Error {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Error::Config(format!(
            "RabbitMQ refused to declare queue {name}: {amqp} (does it exist with other arguments, such as another queue kind?)"
        )),
        _ => conn_err("queue.declare", e),
    }
}

/// The step of the ladder a message waits in: the largest TTL not past `remaining`.
fn step_for(remaining: Duration) -> u32 {
    let ms = remaining.as_millis().max(1);
    let log2 = 127 - ms.leading_zeros();
    log2.clamp(MIN_STEP, MAX_STEP)
}

impl Inner {
    pub(crate) fn prefixed(&self, queue: &str, rest: &str) -> String {
        format!("{}.{queue}.{rest}", self.config.prefix)
    }

    pub(crate) fn work_name(&self, queue: &str, name: &str) -> String {
        if self.abp_named(queue) {
            format!("AbpBackgroundJobs.{name}")
        } else {
            self.prefixed(queue, name)
        }
    }

    pub(crate) fn landing_name(&self, queue: &str) -> String {
        self.prefixed(queue, "~landing")
    }

    pub(crate) fn dead_name(&self, queue: &str) -> String {
        self.prefixed(queue, "~dead")
    }

    pub(crate) fn step_name(&self, queue: &str, step: u32) -> String {
        self.prefixed(queue, &format!("~wait.{step:02}"))
    }

    fn remember(&self, queue: &str, name: &str) {
        let mut known = lock(&self.known);
        if !known.get(queue).is_some_and(|s| s.contains(name)) {
            known
                .entry(queue.to_owned())
                .or_default()
                .insert(name.to_owned());
        }
    }

    pub(crate) fn known_queues(&self, queue: Option<&str>) -> Vec<(String, Vec<String>)> {
        let known = lock(&self.known);
        match queue {
            Some(q) => vec![(
                q.to_owned(),
                known
                    .get(q)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
            )],
            None => known
                .iter()
                .map(|(q, s)| (q.clone(), s.iter().cloned().collect()))
                .collect(),
        }
    }

    pub(crate) async fn declare(&self, conn: &Conn, name: &str, args: FieldTable) -> Result<u32> {
        if name.len() > MAX_QUEUE_NAME {
            return Err(Error::InvalidJob(format!(
                "the RabbitMQ queue name {name:?} is longer than {MAX_QUEUE_NAME} bytes"
            )));
        }
        let q = conn
            .admin()
            .await?
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(|e| declare_err(name, e))?;
        lock(&self.declared).insert(name.to_owned());
        lock(&self.ever_declared).insert(name.to_owned());
        Ok(q.message_count())
    }

    fn is_declared(&self, name: &str) -> bool {
        lock(&self.declared).contains(name)
    }

    /// Whether `queue`'s work queues carry ABP's names (declared as ABP declares them).
    fn abp_named(&self, queue: &str) -> bool {
        self.config.naming == QueueNaming::Abp && queue == DEFAULT_QUEUE
    }

    /// The arguments of `queue`'s work queues.
    fn work_args(&self, queue: &str) -> FieldTable {
        let mut t = FieldTable::default();
        match self.config.kind {
            // ABP declares its queues durable without arguments; any argument of ours would
            // make one of the two declarations fail (PRECONDITION_FAILED). No priorities there.
            QueueKind::Classic if self.abp_named(queue) => {}
            QueueKind::Classic => {
                t.insert("x-max-priority".into(), AMQPValue::LongInt(5));
            }
            QueueKind::Quorum { delivery_limit } => {
                t.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
                t.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongLongInt(i64::from(delivery_limit)),
                );
                // A message past the delivery limit goes to the dead letters, not away.
                t.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString("".into()),
                );
                t.insert(
                    "x-dead-letter-routing-key".into(),
                    AMQPValue::LongString(self.dead_name(queue).into()),
                );
            }
        }
        t
    }

    fn step_args(&self, queue: &str, step: u32) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-message-ttl".into(), AMQPValue::LongLongInt(1i64 << step));
        t.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        t.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.landing_name(queue).into()),
        );
        t
    }

    /// Declares (once per connection) the work queue of (queue, name); returns its name.
    pub(crate) async fn ensure_work(&self, conn: &Conn, queue: &str, name: &str) -> Result<String> {
        let q = self.work_name(queue, name);
        if !self.is_declared(&q) {
            config::check_queue(queue).map_err(invalid_job)?;
            config::check_job_name(name).map_err(invalid_job)?;
            if matches!(self.config.kind, QueueKind::Quorum { .. }) {
                // The target of the delivery limit's dead-lettering must exist first.
                self.ensure_plain(conn, &self.dead_name(queue)).await?;
            }
            self.declare(conn, &q, self.work_args(queue)).await?;
        }
        self.remember(queue, name);
        Ok(q)
    }

    pub(crate) async fn ensure_plain(&self, conn: &Conn, q: &str) -> Result<()> {
        if !self.is_declared(q) {
            self.declare(conn, q, FieldTable::default()).await?;
        }
        Ok(())
    }

    /// Declares the landing queue and one step of `queue`'s ladder; returns the step's name.
    async fn ensure_step(&self, conn: &Conn, queue: &str, step: u32) -> Result<String> {
        self.ensure_plain(conn, &self.landing_name(queue)).await?;
        let q = self.step_name(queue, step);
        if !self.is_declared(&q) {
            self.declare(conn, &q, self.step_args(queue, step)).await?;
        }
        Ok(q)
    }

    /// Where a message due at `run_at` goes now: its work queue, or the wait step it fits.
    pub(crate) async fn route(
        &self,
        conn: &Conn,
        meta: &Meta,
        now: DateTime<Utc>,
    ) -> Result<(String, bool)> {
        let remaining = (meta.run_at - now).to_std().unwrap_or(Duration::ZERO);
        if remaining.is_zero() {
            Ok((self.ensure_work(conn, &meta.queue, &meta.name).await?, true))
        } else {
            Ok((
                self.ensure_step(conn, &meta.queue, step_for(remaining))
                    .await?,
                false,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ladder_never_waits_past_the_due_time() {
        assert_eq!(step_for(Duration::from_millis(1)), MIN_STEP);
        assert_eq!(step_for(Duration::from_millis(16)), 4);
        assert_eq!(step_for(Duration::from_millis(31)), 4);
        assert_eq!(step_for(Duration::from_millis(32)), 5);
        assert_eq!(step_for(Duration::from_millis(1500)), 10);
        assert_eq!(step_for(Duration::from_secs(10 * 86_400)), MAX_STEP);
        for ms in [16u64, 17, 100, 999, 1000, 65_000, 3_600_000] {
            assert!(1u64 << step_for(Duration::from_millis(ms)) <= ms, "{ms}");
        }
    }
}
