//! The servers the provider tests talk to, and the one way a test finds out whether its server
//! is there: [`Service::reachable`], which probes once per test process and, when the server
//! is missing, fails the test under `BACKLINE_REQUIRE_SERVICES=1` (CI) or says loudly that it
//! skips (a contributor's plain `cargo test`).
//!
//! ```no_run
//! use backline_testkit::service::POSTGRES;
//! # async fn probe(url: &str) -> Result<(), std::io::Error> { Ok(()) }
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // In a test: return early (or panic in CI) when the server is not there.
//! if !POSTGRES.reachable(|url| async move { probe(&url).await }).await {
//!     return;
//! }
//! # }
//! ```

use std::future::Future;
use std::sync::{Mutex, OnceLock};

/// A server of the tests: its label, the variable that points at it, and the loopback default
/// the CI machines and `docker-compose.yml` use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    /// How messages name it (`PostgreSQL`).
    pub label: &'static str,
    /// The environment variable with its URL.
    pub env: &'static str,
    /// The URL when the variable is not set.
    pub default_url: &'static str,
}

/// PostgreSQL 15, trust authentication, database `test`.
pub const POSTGRES: Service = Service {
    label: "PostgreSQL",
    env: "BACKLINE_POSTGRES_URL",
    default_url: "postgres://postgres@127.0.0.1:5432/test",
};

/// MariaDB 10.11 (or MySQL 8), `root` with an empty password, database `test`.
pub const MYSQL: Service = Service {
    label: "MySQL",
    env: "BACKLINE_MYSQL_URL",
    default_url: "mysql://root@127.0.0.1:3306/test",
};

/// Redis 7, nothing kept on disk.
pub const REDIS: Service = Service {
    label: "Redis",
    env: "BACKLINE_REDIS_URL",
    default_url: "redis://127.0.0.1:6379",
};

/// RabbitMQ 3.10, `guest`/`guest`.
pub const RABBITMQ: Service = Service {
    label: "RabbitMQ",
    env: "BACKLINE_AMQP_URL",
    default_url: "amqp://guest:guest@127.0.0.1:5672/%2f",
};

/// The answers of this process's probes, by variable (a probe runs once per process).
fn answers() -> &'static Mutex<Vec<(&'static str, bool)>> {
    static ANSWERS: OnceLock<Mutex<Vec<(&'static str, bool)>>> = OnceLock::new();
    ANSWERS.get_or_init(|| Mutex::new(Vec::new()))
}

impl Service {
    /// The server's URL: the variable, or the default.
    pub fn url(&self) -> String {
        std::env::var(self.env).unwrap_or_else(|_| self.default_url.to_owned())
    }

    /// Whether the server answers `probe` (given [`url`](Self::url)), asked once per process.
    /// A missing server panics under `BACKLINE_REQUIRE_SERVICES=1` and otherwise prints a loud
    /// notice and returns `false`, so the test can return early. The URL in messages is
    /// redacted.
    pub async fn reachable<F, Fut, E>(&self, probe: F) -> bool
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::error::Error + 'static,
    {
        if let Some(&(_, up)) = backline_core::provider::lock_unpoisoned(answers())
            .iter()
            .find(|(env, _)| *env == self.env)
        {
            return up;
        }
        let up = match probe(self.url()).await {
            Ok(()) => true,
            Err(e) => {
                let msg = format!(
                    "{} at {} is unreachable ({}); start it (`cargo xtask services up`)",
                    self.label,
                    backline_core::redact_url(&self.url()),
                    backline_core::ErrorChain(&e)
                );
                if crate::require_services() {
                    panic!("{msg}");
                }
                eprintln!(
                    "\n!!!!!!!!!! SKIPPING {} TESTS: {msg} !!!!!!!!!!\n",
                    self.label.to_uppercase()
                );
                false
            }
        };
        backline_core::provider::lock_unpoisoned(answers()).push((self.env, up));
        up
    }
}

/// A name no other test run uses: `{prefix}_{unix seconds}_{random}` (the seconds let a clean-up
/// recognise what old runs left).
pub fn fresh_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        chrono::Utc::now().timestamp(),
        fastrand::u32(..)
    )
}
