#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod error;
mod job;
mod job_manager;
mod lock;
pub mod provider;
mod retry;
mod server;
mod util;
mod worker;

pub use backend::{
    Backend, Capabilities, ClaimRequest, ClaimedJob, Counts, Finish, Job, JobFilter, LeaseToken,
    Maintenance, MaintenanceReport, NewJob, Outcome, RunAt,
};
pub use error::{redact_url, BoxError, Error, ErrorChain, Result};
pub use job::{
    BackgroundJob, Extensions, FailureKind, JobArgs, JobContext, JobError, JobId, JobState,
    Priority,
};
pub use job_manager::{
    validate_name, EnqueueOptions, IntoBackend, JobManager, DEFAULT_MAX_PAYLOAD, DEFAULT_QUEUE,
};
pub use lock::DistributedLock;
pub use retry::RetryPolicy;
pub use server::{JobServer, JobServerBuilder, ServerConfig, ServerHandle};
#[cfg(feature = "cron")]
pub use worker::CronSchedule;
pub use worker::{
    BackgroundWorker, PeriodicWorker, RunningWorkers, Schedule, WorkerContext, WorkerError,
    WorkerManager, WorkerManagerConfig, WorkerOptions,
};

/// Dates and times used in the API.
pub use chrono;
#[cfg(feature = "cron")]
/// The IANA timezone database used by [`Schedule::cron`].
pub use chrono_tz;
/// Re-exported for `JobServer::run` and custom workers.
pub use tokio_util::sync::CancellationToken;
