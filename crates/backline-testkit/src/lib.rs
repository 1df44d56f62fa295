//! The conformance suite every Backline provider runs against its real server.
//!
//! A provider implements [`Harness`] (a fresh, isolated backend per call: its own table, key
//! prefix or queue prefix) and expands [`conformance!`] once in a test file:
//!
//! ```text
//! struct MyHarness;
//! #[async_trait::async_trait]
//! impl backline_testkit::Harness for MyHarness {
//!     async fn backend(&self) -> std::sync::Arc<dyn backline_core::Backend> { /* … */ }
//! }
//! backline_testkit::conformance!(MyHarness);
//! ```
//!
//! The macro turns every scenario of [`scenarios`] into one named `#[tokio::test]`, so a new
//! scenario reaches every provider and no provider hand-picks. A scenario that needs a
//! capability the backend lacks does not pass silently: it asserts that the call returns
//! [`Error::Unsupported`](backline_core::Error::Unsupported) and says so on stderr.
//!
//! Servers come from `BACKLINE_{POSTGRES,MYSQL,REDIS,AMQP}_URL`; [`require_services`] tells a
//! harness whether a missing server is a failure (`BACKLINE_REQUIRE_SERVICES=1`, set by
//! `cargo xtask test` and CI) or a loud skip.

mod jobs;
mod macros;
pub mod scenarios;
pub mod service;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backline_core::{Backend, JobFilter, JobId, JobManager, ServerConfig};

pub use jobs::{
    Action, AgingTask, Event, Recorder, SlowBackoffTask, Task, TaskHandler, UnknownTask,
};

/// Makes fresh, isolated backends for the scenarios.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// A new backend that shares no jobs with any other returned backend.
    async fn backend(&self) -> Arc<dyn Backend>;

    /// A second handle on the same storage as `backend` (another pool, another connection, as a
    /// second process would have). The default returns the same handle.
    ///
    /// A backend without [`Capabilities::lease_expiry`](backline_core::Capabilities) (a broker,
    /// whose lease is the delivery) must return another connection here, and dropping it must
    /// close that connection: the lease scenarios end a claim's lease by dropping its twin.
    async fn twin(&self, backend: &Arc<dyn Backend>) -> Arc<dyn Backend> {
        backend.clone()
    }

    /// Writes straight into the storage of the last backend this harness returned, past
    /// Backline, as a hand-written row, a migration script or another language's client would:
    /// `statement` is in the store's own language (SQL for the SQL providers, where `{table}`
    /// stands for the jobs table). Tests of bad input use it to put rows Backline would never
    /// write beside healthy jobs.
    ///
    /// The default returns [`Error::Unsupported`](backline_core::Error::Unsupported): a
    /// provider whose tests write raw rows implements it.
    async fn write_raw(
        &self,
        backend: &Arc<dyn Backend>,
        statement: &str,
    ) -> backline_core::Result<()> {
        let _ = statement;
        Err(backline_core::Error::Unsupported {
            backend: backend.name(),
            what: "raw writes from the test harness",
        })
    }
}

/// Whether a missing server must fail the tests (`BACKLINE_REQUIRE_SERVICES=1`).
pub fn require_services() -> bool {
    std::env::var("BACKLINE_REQUIRE_SERVICES").is_ok_and(|v| v == "1" || v == "true")
}

/// A server configuration with short timings, so scenarios take a second, not minutes.
pub fn fast_config() -> ServerConfig {
    ServerConfig {
        poll_interval: Duration::from_millis(200),
        lease: Duration::from_secs(2),
        heartbeat: Duration::from_millis(400),
        grace: Duration::from_secs(2),
        maintenance_interval: Duration::from_millis(100),
        max_error_backoff: Duration::from_secs(1),
        ..ServerConfig::default()
    }
}

/// The longest a scenario waits for a condition before it fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Waits until `check` returns `Some`, polling the backend's state; panics after [`PATIENCE`].
///
/// This awaits a condition with a generous deadline; it never asserts how fast it came.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("gave up waiting: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads one job, failing the test on an error.
pub async fn job(manager: &JobManager, id: JobId) -> Option<backline_core::Job> {
    manager.backend().get(id).await.expect("get a job")
}

/// Every job in the backend (through `list`).
pub async fn all_jobs(manager: &JobManager) -> Vec<backline_core::Job> {
    manager
        .backend()
        .list(&JobFilter {
            limit: 100_000,
            ..JobFilter::default()
        })
        .await
        .expect("list jobs")
}
