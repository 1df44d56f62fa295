//! [`RedisConfig`]: where the server is and how the keys are named.

use std::time::Duration;

use backline_core::{redact_url, Error, Result};

/// The environment variable [`RedisConfig::from_env`] reads.
pub const URL_ENV: &str = "BACKLINE_REDIS_URL";

/// The URL used when [`URL_ENV`] is not set.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// How to reach Redis and name the keys.
///
/// `Debug` prints the URL with its password replaced by `***`.
#[derive(Clone)]
pub struct RedisConfig {
    pub(crate) url: String,
    pub(crate) prefix: String,
    pub(crate) response_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_retries: usize,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_retries", &self.reconnect_retries)
            .finish()
    }
}

impl RedisConfig {
    /// A configuration for the server at `url` (`redis://[:password@]host:port[/db]`), with the
    /// key prefix `backline`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "backline".to_owned(),
            response_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            reconnect_retries: 3,
        }
    }

    /// The URL from `BACKLINE_REDIS_URL`, or `redis://127.0.0.1:6379`.
    pub fn from_env() -> Self {
        Self::new(std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned()))
    }

    /// Every key starts with this prefix (default `backline`); applications or tests that
    /// share one server use different prefixes. It must not contain `{` or `}` (hash tags).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a command may take before it fails as a time-out (default 5 s). The blocking
    /// wait for wake-ups uses its own connections without this limit.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long opening a connection may take (default 5 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many times a lost connection is retried (with exponential back-off) before a
    /// command fails with [`Error::Connection`] (default 3). The next command tries again.
    pub fn with_reconnect_retries(mut self, retries: usize) -> Self {
        self.reconnect_retries = retries;
        self
    }

    /// The URL, with its password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err(Error::Config(format!(
                "redis key prefix `{}` must be non-empty and contain no `{{` or `}}`",
                self.prefix.escape_debug()
            )));
        }
        Ok(())
    }
}
