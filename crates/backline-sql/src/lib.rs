#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code, unused_imports, unused_variables)
)]

mod common;
mod config;
mod group;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backline_core::{
    Backend, Capabilities, ClaimRequest, ClaimedJob, Counts, Error, Finish, Job, JobFilter, JobId,
    JobState, LeaseToken, Maintenance, MaintenanceReport, NewJob, Result,
};
use futures_util::future::BoxFuture;

pub use config::{SqlConfig, SqliteSync, TableName, DEFAULT_TABLE};
/// The `sqlx` this crate is built with, so that the caller's transactions match its version.
pub use sqlx;

/// The driver behind a [`SqlBackend`].
#[derive(Clone)]
enum Driver {
    #[cfg(feature = "postgres")]
    Postgres(Arc<postgres::PgBackend>),
    #[cfg(feature = "sqlite")]
    Sqlite(Arc<sqlite::SqliteBackend>),
    #[cfg(feature = "mysql")]
    MySql(Arc<mysql::MySqlBackend>),
}

/// A Backline backend over a SQL database: PostgreSQL, MySQL/MariaDB or SQLite, picked by the
/// URL's scheme (each behind the crate feature of the same name).
///
/// Cheap to clone: clones share the pool. See the [crate docs](crate) for the schema, the claim
/// statements and the wake-ups of each database.
#[derive(Clone)]
pub struct SqlBackend {
    ops: Arc<dyn DriverOps>,
    driver: Driver,
    table: Arc<TableName>,
    max_payload: usize,
}

/// A statement of the provider whose plan [`SqlBackend::explain`] shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Statement<'a> {
    /// The claim of a batch of ready jobs of `queue` with one of `names`.
    Claim {
        /// The queue claimed from.
        queue: &'a str,
        /// The job names the server has handlers for.
        names: &'a [String],
    },
    /// The batched finish (on MySQL and SQLite, its read of the claimed rows' tokens).
    Finish,
    /// The promotion of due scheduled and retrying jobs (on MySQL, its select).
    Promote,
    /// The recovery of expired leases (on MySQL, its select).
    Recover,
    /// Retention: the deletion of succeeded jobs past their time to live.
    Prune,
}

/// Which of PostgreSQL's plans of a prepared statement [`SqlBackend::explain`] shows. MySQL
/// and SQLite plan each execution alike and ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanMode {
    /// The plan made without the parameters' values (`plan_cache_mode = force_generic_plan`),
    /// which a prepared statement settles on after its first five runs.
    Generic,
    /// The plan made for the parameters' values (`plan_cache_mode = force_custom_plan`), as
    /// in a prepared statement's first runs on each connection.
    Custom,
}

/// What every driver does beyond [`Backend`].
#[async_trait]
pub(crate) trait DriverOps: Backend {
    /// Applies the migrations up to schema version `target` (capped at the newest).
    async fn migrate(&self, target: usize) -> Result<()>;
    async fn explain(&self, statement: Statement<'_>, mode: PlanMode) -> Result<String>;
    fn claim_index_name(&self) -> String;
    /// Whether a push leads a group commit, and how many pushes wait for one.
    fn group_state(&self) -> (bool, usize);
}

impl std::fmt::Debug for SqlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlBackend")
            .field("driver", &self.name())
            .field("table", &self.table.qualified())
            .finish()
    }
}

fn scheme(url: &str) -> &str {
    url.split_once(':').map(|(s, _)| s).unwrap_or("")
}

#[allow(dead_code)]
fn not_built(feature: &'static str) -> Error {
    Error::Config(format!(
        "this URL needs backline-sql's `{feature}` feature, which is not enabled"
    ))
}

impl SqlBackend {
    /// Connects to the database of `config.url` (and applies the migrations, unless
    /// [`SqlConfig::with_migrate_on_connect`] turned that off).
    ///
    /// Fails with [`Error::Config`] for a bad table name or a URL whose driver is not built in,
    /// and with [`Error::Connection`] when the server cannot be reached (the URL's password is
    /// never part of a message).
    #[allow(unreachable_code)]
    pub async fn connect(config: SqlConfig) -> Result<SqlBackend> {
        config.validate()?;
        let table = TableName::parse(&config.table)?;
        let (driver, ops): (Driver, Arc<dyn DriverOps>) = match scheme(&config.url) {
            "postgres" | "postgresql" => {
                #[cfg(feature = "postgres")]
                {
                    let b = Arc::new(postgres::PgBackend::connect(&config, table.clone()).await?);
                    (Driver::Postgres(b.clone()), b)
                }
                #[cfg(not(feature = "postgres"))]
                return Err(not_built("postgres"));
            }
            "sqlite" => {
                #[cfg(feature = "sqlite")]
                {
                    let b = Arc::new(sqlite::SqliteBackend::connect(&config, table.clone()).await?);
                    (Driver::Sqlite(b.clone()), b)
                }
                #[cfg(not(feature = "sqlite"))]
                return Err(not_built("sqlite"));
            }
            "mysql" | "mariadb" => {
                #[cfg(feature = "mysql")]
                {
                    let b = Arc::new(mysql::MySqlBackend::connect(&config, table.clone()).await?);
                    (Driver::MySql(b.clone()), b)
                }
                #[cfg(not(feature = "mysql"))]
                return Err(not_built("mysql"));
            }
            other => {
                return Err(Error::Config(format!(
                "unknown database URL scheme `{other}` in {} (postgres, mysql, mariadb or sqlite)",
                config.redacted_url()
            )))
            }
        };
        let backend = SqlBackend {
            ops,
            driver,
            table: Arc::new(table),
            max_payload: config.max_payload,
        };
        if config.migrate_on_connect {
            backend.migrate().await?;
        }
        Ok(backend)
    }

    fn inner(&self) -> &dyn Backend {
        &*self.ops
    }

    /// Creates or upgrades the tables: the jobs table, its indexes and `{table}_locks`, recorded
    /// in `backline_migrations` (in the same schema). Safe to call from several processes at once.
    pub async fn migrate(&self) -> Result<()> {
        self.ops.migrate(usize::MAX).await
    }

    /// Applies the migrations up to schema version `version` only: for tests that need a table
    /// of an older schema (as an upgraded deployment has). Not part of the supported API.
    #[doc(hidden)]
    pub async fn migrate_to(&self, version: usize) -> Result<()> {
        self.ops.migrate(version).await
    }

    /// The jobs table.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The PostgreSQL pool, if this backend is on PostgreSQL.
    #[cfg(feature = "postgres")]
    pub fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.driver {
            Driver::Postgres(b) => Some(b.pool()),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The SQLite pool of the writer connection, if this backend is on SQLite.
    ///
    /// Transactions for [`enqueue_in`](Self::enqueue_in) should start with
    /// `begin_with("BEGIN IMMEDIATE")`, as every write of this crate does.
    #[cfg(feature = "sqlite")]
    pub fn sqlite_pool(&self) -> Option<&sqlx::SqlitePool> {
        match &self.driver {
            Driver::Sqlite(b) => Some(b.pool()),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The MySQL/MariaDB pool, if this backend is on MySQL or MariaDB.
    #[cfg(feature = "mysql")]
    pub fn mysql_pool(&self) -> Option<&sqlx::MySqlPool> {
        match &self.driver {
            Driver::MySql(b) => Some(b.pool()),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Stores a job on the caller's connection, inside its transaction: if the transaction
    /// rolls back, there is no job. Take the job from
    /// [`JobManager::prepare`](backline_core::JobManager::prepare), which encodes and checks it.
    ///
    /// On PostgreSQL the wake-up (`NOTIFY`) is sent on commit. A connection of another database
    /// than this backend's is [`Error::Config`].
    pub async fn enqueue_in<C: EnqueueConnection + ?Sized>(
        &self,
        conn: &mut C,
        job: NewJob,
    ) -> Result<JobId> {
        let id = job.id;
        self.enqueue_batch_in(conn, vec![job]).await?;
        Ok(id)
    }

    /// Stores several jobs on the caller's connection, inside its transaction (all or none).
    ///
    /// Each job is checked first ([`NewJob::validate`]): a bad name or queue, no attempt, or a
    /// payload over [`SqlConfig::with_max_payload`] fails the call before anything is written.
    pub async fn enqueue_batch_in<C: EnqueueConnection + ?Sized>(
        &self,
        conn: &mut C,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<JobId>> {
        // The same checks as JobManager's, the payload limit included.
        for job in &jobs {
            job.validate(self.max_payload)?;
        }
        if !jobs.is_empty() {
            conn.push_jobs(self, &jobs).await?;
        }
        Ok(jobs.iter().map(|j| j.id).collect())
    }

    /// The plan the database makes for the claim of `queue` (PostgreSQL: its generic plan), to
    /// check that it reads the claim index.
    pub async fn explain_claim(&self, queue: &str, names: &[String]) -> Result<String> {
        self.explain(Statement::Claim { queue, names }, PlanMode::Generic)
            .await
    }

    /// The plan the database makes for the batched finish (PostgreSQL: its generic plan), to
    /// check that it finds jobs through the primary key.
    pub async fn explain_finish(&self) -> Result<String> {
        self.explain(Statement::Finish, PlanMode::Generic).await
    }

    /// The plan the database makes for one of its statements, as text (`EXPLAIN`; SQLite:
    /// `EXPLAIN QUERY PLAN`; MySQL: one line per table, `type=… key=… extra=…`), with
    /// representative parameters (batches of 100 to 1,000, retention of an hour). Nothing is
    /// changed: PostgreSQL explains inside a transaction that it rolls back.
    pub async fn explain(&self, statement: Statement<'_>, mode: PlanMode) -> Result<String> {
        self.ops.explain(statement, mode).await
    }

    /// The name of the claim index (`{table}_claim`).
    pub fn claim_index_name(&self) -> String {
        self.ops.claim_index_name()
    }

    /// Whether a push is committing a group (or about to), and how many pushes wait for the
    /// next commit: for tests that need a group to have formed before they go on.
    #[doc(hidden)]
    pub fn group_state(&self) -> (bool, usize) {
        self.ops.group_state()
    }
}

mod sealed {
    #[allow(unreachable_pub)]
    pub trait Sealed {}
}

/// A database connection that [`SqlBackend::enqueue_in`] can write to: `sqlx::PgConnection`,
/// `sqlx::MySqlConnection` or `sqlx::SqliteConnection` (a `&mut *tx` of a transaction).
///
/// Sealed: implemented by this crate only.
pub trait EnqueueConnection: sealed::Sealed + Send {
    /// Writes the jobs through this connection.
    #[doc(hidden)]
    fn push_jobs<'a>(
        &'a mut self,
        backend: &'a SqlBackend,
        jobs: &'a [NewJob],
    ) -> BoxFuture<'a, Result<()>>;
}

#[cfg(feature = "postgres")]
impl sealed::Sealed for sqlx::PgConnection {}

#[cfg(feature = "postgres")]
impl EnqueueConnection for sqlx::PgConnection {
    fn push_jobs<'a>(
        &'a mut self,
        backend: &'a SqlBackend,
        jobs: &'a [NewJob],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match &backend.driver {
                Driver::Postgres(b) => b.push_on(self, jobs).await,
                #[allow(unreachable_patterns)]
                _ => Err(Error::Config(format!(
                    "enqueue_in got a PostgreSQL connection for a {} backend",
                    backend.name()
                ))),
            }
        })
    }
}

#[cfg(feature = "sqlite")]
impl sealed::Sealed for sqlx::SqliteConnection {}

#[cfg(feature = "sqlite")]
impl EnqueueConnection for sqlx::SqliteConnection {
    fn push_jobs<'a>(
        &'a mut self,
        backend: &'a SqlBackend,
        jobs: &'a [NewJob],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match &backend.driver {
                Driver::Sqlite(b) => b.push_on(self, jobs).await,
                #[allow(unreachable_patterns)]
                _ => Err(Error::Config(format!(
                    "enqueue_in got a SQLite connection for a {} backend",
                    backend.name()
                ))),
            }
        })
    }
}

#[cfg(feature = "mysql")]
impl sealed::Sealed for sqlx::MySqlConnection {}

#[cfg(feature = "mysql")]
impl EnqueueConnection for sqlx::MySqlConnection {
    fn push_jobs<'a>(
        &'a mut self,
        backend: &'a SqlBackend,
        jobs: &'a [NewJob],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match &backend.driver {
                Driver::MySql(b) => b.push_on(self, jobs).await,
                #[allow(unreachable_patterns)]
                _ => Err(Error::Config(format!(
                    "enqueue_in got a MySQL connection for a {} backend",
                    backend.name()
                ))),
            }
        })
    }
}

#[async_trait]
impl Backend for SqlBackend {
    fn name(&self) -> &'static str {
        self.inner().name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner().capabilities()
    }

    async fn push(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>> {
        self.inner().push(jobs).await
    }

    async fn claim(&self, req: ClaimRequest<'_>) -> Result<Vec<ClaimedJob>> {
        self.inner().claim(req).await
    }

    async fn finish(&self, batch: &[Finish]) -> Result<Vec<bool>> {
        self.inner().finish(batch).await
    }

    async fn heartbeat(
        &self,
        leases: &[(JobId, LeaseToken)],
        lease: Duration,
    ) -> Result<Vec<bool>> {
        self.inner().heartbeat(leases, lease).await
    }

    async fn wait(&self, queue: &str, seen: u64, timeout: Duration) -> Result<u64> {
        self.inner().wait(queue, seen, timeout).await
    }

    async fn maintain(&self, m: &Maintenance) -> Result<MaintenanceReport> {
        self.inner().maintain(m).await
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        self.inner().get(id).await
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        self.inner().list(filter).await
    }

    async fn counts(&self, queue: Option<&str>) -> Result<Counts> {
        self.inner().counts(queue).await
    }

    async fn cancel(&self, id: JobId) -> Result<bool> {
        self.inner().cancel(id).await
    }

    async fn retry_dead(&self, id: JobId) -> Result<bool> {
        self.inner().retry_dead(id).await
    }

    async fn delete(&self, id: JobId) -> Result<bool> {
        self.inner().delete(id).await
    }

    async fn purge(&self, state: JobState, queue: Option<&str>) -> Result<u64> {
        self.inner().purge(state, queue).await
    }

    async fn lock_acquire(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        self.inner().lock_acquire(name, owner, ttl).await
    }

    async fn lock_renew(&self, name: &str, owner: LeaseToken, ttl: Duration) -> Result<bool> {
        self.inner().lock_renew(name, owner, ttl).await
    }

    async fn lock_release(&self, name: &str, owner: LeaseToken) -> Result<bool> {
        self.inner().lock_release(name, owner).await
    }
}
