//! [`RabbitMqConfig`]: where the broker is, how the queues are named and which kind they are.

use std::time::Duration;

use backline_core::{redact_url, Error, Result};

/// The environment variable [`RabbitMqConfig::from_env`] reads.
pub const URL_ENV: &str = "BACKLINE_AMQP_URL";

/// The URL used when [`URL_ENV`] is not set.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How work queues are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueNaming {
    /// `{prefix}.{queue}.{JobName}` for every queue.
    #[default]
    Prefixed,
    /// ABP's names: `AbpBackgroundJobs.{JobName}` for the `default` queue (so Backline and
    /// ABP's RabbitMQ provider share queues), `{prefix}.{queue}.{JobName}` for the others.
    /// Those `AbpBackgroundJobs.*` queues are declared as ABP declares them, durable and
    /// without arguments (classic kind): **priorities are not honoured there**.
    Abp,
}

/// The kind of the work queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    /// Classic durable queues with `x-max-priority = 5`: priorities are honoured.
    #[default]
    Classic,
    /// Quorum queues (replicated, for clusters) with `x-delivery-limit`: the broker moves a
    /// message redelivered more often than the limit (a poison message) to the queue's dead
    /// letters. RabbitMQ 3.10's quorum queues have **no priorities**: every job runs in FIFO
    /// order.
    Quorum {
        /// The most redeliveries of one message (`x-delivery-limit`, at least 1).
        delivery_limit: u32,
    },
}

/// How to reach RabbitMQ and name the queues.
///
/// `Debug` prints the URL with its password replaced by `***`.
#[derive(Clone)]
pub struct RabbitMqConfig {
    pub(crate) url: String,
    pub(crate) prefix: String,
    pub(crate) naming: QueueNaming,
    pub(crate) kind: QueueKind,
    pub(crate) connection_name: String,
    pub(crate) prefetch: u16,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_attempts: u32,
    pub(crate) confirm_timeout: Duration,
    pub(crate) wake_linger: Duration,
    pub(crate) known_jobs: Vec<(String, String)>,
}

impl std::fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("naming", &self.naming)
            .field("kind", &self.kind)
            .field("connection_name", &self.connection_name)
            .field("prefetch", &self.prefetch)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_attempts", &self.reconnect_attempts)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("wake_linger", &self.wake_linger)
            .field("known_jobs", &self.known_jobs)
            .finish()
    }
}

impl RabbitMqConfig {
    /// A configuration for the broker at `url` (`amqp://user:password@host:port/vhost`, the
    /// vhost URL-encoded: `%2f` is `/`), with the queue prefix `backline`, classic queues and
    /// a prefetch of 100.
    pub fn new(url: impl Into<String>) -> Self {
        RabbitMqConfig {
            url: url.into(),
            prefix: "backline".to_owned(),
            naming: QueueNaming::Prefixed,
            kind: QueueKind::Classic,
            connection_name: "backline".to_owned(),
            prefetch: 100,
            connect_timeout: Duration::from_secs(5),
            reconnect_attempts: 3,
            confirm_timeout: Duration::from_secs(30),
            wake_linger: Duration::from_millis(1),
            known_jobs: Vec::new(),
        }
    }

    /// The URL from `BACKLINE_AMQP_URL`, or `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub fn from_env() -> Self {
        Self::new(std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned()))
    }

    /// Every queue name starts with this prefix (default `backline`); applications or tests
    /// sharing one broker use different prefixes.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How work queues are named (default [`QueueNaming::Prefixed`]).
    pub fn with_naming(mut self, naming: QueueNaming) -> Self {
        self.naming = naming;
        self
    }

    /// Classic (default) or quorum work queues. A queue keeps the kind it was created with:
    /// changing it for existing queues fails their declaration (`PRECONDITION_FAILED`).
    pub fn with_queue_kind(mut self, kind: QueueKind) -> Self {
        self.kind = kind;
        self
    }

    /// The connection name the broker shows (`rabbitmqctl list_connections client_properties`,
    /// the management UI); default `backline`.
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// The prefetch (`basic.qos`, default 100) of the consumers this handle runs: the delay
    /// relay of each queue it claims from. Claims themselves pull with `basic.get`, so a handle
    /// never holds more jobs than its server asked for (its claim batch and concurrency).
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// How long one connection attempt may take (default 5 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many times a call retries a lost connection, with back-off, before it fails with
    /// [`Error::Connection`] (default 3; 0 fails at once).
    pub fn with_reconnect_attempts(mut self, attempts: u32) -> Self {
        self.reconnect_attempts = attempts;
        self
    }

    /// How long an `enqueue` (the whole batch: declarations, sends and confirms) or a move
    /// of a finished job may wait for the broker (default 30 s) before it fails with
    /// [`Error::Timeout`]: a broker that stopped answering (a network partition, a memory or
    /// disk alarm blocking publishers) fails an `enqueue` instead of hanging it. The messages
    /// may still have been stored: an `enqueue` retried after a time-out can store them twice.
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// How long this handle coalesces the wake-ups it sends other handles for one queue
    /// (default 1 ms). The first job to come due after a quiet spell wakes the others at once;
    /// jobs that come due within the linger after it are announced together when it ends, so
    /// other processes hear of them up to this much later. Each wake-up is a message the
    /// broker routes: one per job halved the rate of enqueues one by one. `Duration::ZERO`
    /// still coalesces wake-ups that are due while one is being sent.
    pub fn with_wake_linger(mut self, linger: Duration) -> Self {
        self.wake_linger = linger;
        self
    }

    /// Tells this handle that jobs named `name` may sit in `queue`, so that
    /// [`counts`](backline_core::Backend::counts) and the dead-letter calls look at them even
    /// before this handle pushed or claimed such a job (an operator's process, a dashboard).
    pub fn with_known_job(mut self, queue: impl Into<String>, name: impl Into<String>) -> Self {
        self.known_jobs.push((queue.into(), name.into()));
        self
    }

    /// Checks the names used in queue names (see [`check_part`], [`check_queue`],
    /// [`check_job_name`]; the prefix has no `.`) and the delivery limit.
    pub(crate) fn validate(&self) -> Result<()> {
        check_part("prefix", &self.prefix)?;
        if self.prefix.contains('.') {
            return Err(Error::Config(format!(
                "a RabbitMQ prefix must not contain `.` (it separates the parts of queue names), got {:?}",
                self.prefix
            )));
        }
        for (q, n) in &self.known_jobs {
            check_queue(q)?;
            check_job_name(n)?;
        }
        if let QueueKind::Quorum { delivery_limit: 0 } = self.kind {
            return Err(Error::Config(
                "a quorum queue's delivery_limit must be at least 1".into(),
            ));
        }
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) {
            return Err(Error::Config(format!(
                "a RabbitMQ URL starts with amqp:// or amqps://, got {}",
                redact_url(&self.url)
            )));
        }
        Ok(())
    }
}

/// A part of a queue name must be non-empty, short, without whitespace or control characters.
pub(crate) fn check_part(what: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > 100 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::Config(format!(
            "a RabbitMQ {what} must be 1 to 100 bytes without whitespace, got {s:?}"
        )));
    }
    Ok(())
}

/// A queue name: a [`check_part`], without `.` (queue `a.b` with job `c` and queue `a` with
/// job `b.c` would share the work queue `{prefix}.a.b.c`) and not starting with `~` (the mark
/// of Backline's own queues: wait, landing, dead).
pub(crate) fn check_queue(queue: &str) -> Result<()> {
    check_part("queue", queue)?;
    if queue.contains('.') || queue.starts_with('~') {
        return Err(Error::Config(format!(
            "a RabbitMQ queue name must not contain `.` or start with `~` (they mark the parts of queue names), got {queue:?}"
        )));
    }
    Ok(())
}

/// A job name: a [`check_part`] not starting with `~` (a job named `~dead` would be the
/// queue's dead letters). Dots are fine: the job name is the last part of a queue name.
pub(crate) fn check_job_name(name: &str) -> Result<()> {
    check_part("job name", name)?;
    if name.starts_with('~') {
        return Err(Error::Config(format!(
            "a RabbitMQ job name must not start with `~` (the mark of Backline's own queues), got {name:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let c = RabbitMqConfig::new("amqp://user:secret@host:5672/%2f");
        let s = format!("{c:?}");
        assert!(!s.contains("secret"), "{s}");
        assert!(s.contains("user"), "{s}");
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(RabbitMqConfig::from_env().validate().is_ok());
        assert!(RabbitMqConfig::from_env()
            .with_prefix("")
            .validate()
            .is_err());
        assert!(RabbitMqConfig::from_env()
            .with_prefix("a b")
            .validate()
            .is_err());
        assert!(RabbitMqConfig::new("redis://x").validate().is_err());
        assert!(RabbitMqConfig::from_env()
            .with_prefix("a.b")
            .validate()
            .is_err());
        assert!(RabbitMqConfig::from_env()
            .with_known_job("a.b", "c")
            .validate()
            .is_err());
        assert!(RabbitMqConfig::from_env()
            .with_known_job("a", "~dead")
            .validate()
            .is_err());
        assert!(RabbitMqConfig::from_env()
            .with_known_job("a", "emails.welcome")
            .validate()
            .is_ok());
    }

    #[test]
    fn a_quorum_delivery_limit_of_zero_is_refused() {
        let c = RabbitMqConfig::from_env().with_queue_kind(QueueKind::Quorum { delivery_limit: 0 });
        assert!(matches!(c.validate(), Err(Error::Config(_))));
        let c = RabbitMqConfig::from_env().with_queue_kind(QueueKind::Quorum { delivery_limit: 1 });
        assert!(c.validate().is_ok());
    }
}
