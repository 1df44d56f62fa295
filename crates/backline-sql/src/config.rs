//! Configuration: the URL, the table name and the knobs of a [`SqlBackend`](crate::SqlBackend).

use std::fmt;
use std::time::Duration;

use backline_core::{redact_url, Error, Result};

/// The table used when none is configured.
pub const DEFAULT_TABLE: &str = "backline_jobs";

/// A validated table name, optionally with a schema (`jobs` or `app.jobs`).
///
/// Each part is 1 to 41 characters: a lowercase ASCII letter or `_`, then lowercase letters,
/// digits or `_`. Nothing else is accepted, so a name from configuration can never inject SQL
/// (it is written into statements as it is, and derived names such as `{table}_locks` stay
/// within every database's identifier limit).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

fn valid_ident(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 41
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

impl TableName {
    /// Parses and checks a table name.
    ///
    /// ```
    /// use backline_sql::TableName;
    /// assert!(TableName::parse("backline_jobs").is_ok());
    /// assert!(TableName::parse("app.jobs").is_ok());
    /// assert!(TableName::parse("jobs; DROP TABLE users").is_err());
    /// assert!(TableName::parse("Jobs").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<TableName> {
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, s),
        };
        let ok = valid_ident(name) && schema.is_none_or(valid_ident);
        if !ok {
            return Err(Error::Config(format!(
                "table name `{}` must be `name` or `schema.name`, each 1 to 41 of `a-z`, `0-9`, `_`, not starting with a digit",
                s.escape_debug()
            )));
        }
        Ok(TableName {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The schema, if one was given.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The table's own name, without the schema.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name as written in statements (`schema.name` or `name`).
    pub fn qualified(&self) -> String {
        self.sibling(&self.name)
    }

    /// Another table in the same schema (`schema.other`).
    pub(crate) fn sibling(&self, other: &str) -> String {
        match &self.schema {
            Some(s) => format!("{s}.{other}"),
            None => other.to_owned(),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.qualified())
    }
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TableName({})", self.qualified())
    }
}

/// How hard SQLite syncs each commit to disk (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SqliteSync {
    /// `FULL` (the default): an acknowledged enqueue survives a power loss.
    #[default]
    Full,
    /// `NORMAL`: faster; in WAL mode a power loss may lose the last commits (never corrupts).
    Normal,
}

/// How to reach the database and how to use it.
///
/// ```
/// use std::time::Duration;
/// use backline_sql::SqlConfig;
///
/// let config = SqlConfig::new("postgres://app:secret@db/app")
///     .with_table("jobs.background")
///     .with_max_connections(16)
///     .with_poll_interval(Duration::from_millis(500));
/// // The password never shows in logs.
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone)]
pub struct SqlConfig {
    pub(crate) url: String,
    pub(crate) table: String,
    pub(crate) max_connections: u32,
    pub(crate) connect_timeout: Duration,
    pub(crate) migrate_on_connect: bool,
    pub(crate) poll_interval: Duration,
    pub(crate) sqlite_sync: SqliteSync,
    pub(crate) busy_timeout: Duration,
    pub(crate) max_payload: usize,
}

impl fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &redact_url(&self.url))
            .field("table", &self.table)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("migrate_on_connect", &self.migrate_on_connect)
            .field("poll_interval", &self.poll_interval)
            .field("sqlite_sync", &self.sqlite_sync)
            .field("busy_timeout", &self.busy_timeout)
            .field("max_payload", &self.max_payload)
            .finish()
    }
}

impl SqlConfig {
    /// A configuration for a database URL (`postgres://…`, `mysql://…`, `mariadb://…`,
    /// `sqlite://path` or `sqlite::memory:`), with the defaults: table `backline_jobs`,
    /// 10 connections, migrations applied on connect, a 1 s poll interval, SQLite `synchronous=FULL`.
    pub fn new(url: impl Into<String>) -> Self {
        SqlConfig {
            url: url.into(),
            table: DEFAULT_TABLE.to_owned(),
            max_connections: 10,
            connect_timeout: Duration::from_secs(10),
            migrate_on_connect: true,
            poll_interval: Duration::from_secs(1),
            sqlite_sync: SqliteSync::Full,
            busy_timeout: Duration::from_secs(10),
            max_payload: backline_core::DEFAULT_MAX_PAYLOAD,
        }
    }

    /// Reads `BACKLINE_SQL_URL` (or `DATABASE_URL`), and optionally `BACKLINE_SQL_TABLE` and
    /// `BACKLINE_SQL_MAX_CONNECTIONS`.
    pub fn from_env() -> Result<Self> {
        let url = std::env::var("BACKLINE_SQL_URL")
            .or_else(|_| std::env::var("DATABASE_URL"))
            .map_err(|_| Error::Config("set BACKLINE_SQL_URL (or DATABASE_URL)".into()))?;
        let mut config = SqlConfig::new(url);
        if let Ok(table) = std::env::var("BACKLINE_SQL_TABLE") {
            config.table = table;
        }
        if let Ok(n) = std::env::var("BACKLINE_SQL_MAX_CONNECTIONS") {
            config.max_connections = n.parse().map_err(|_| {
                Error::Config(format!(
                    "BACKLINE_SQL_MAX_CONNECTIONS `{n}` is not a number"
                ))
            })?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Uses this table (`name` or `schema.name`; see [`TableName`]); other tables take its
    /// name as a prefix (`{table}_locks`).
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The largest encoded payload [`SqlBackend::enqueue_in`](crate::SqlBackend::enqueue_in)
    /// stores (default [`DEFAULT_MAX_PAYLOAD`](backline_core::DEFAULT_MAX_PAYLOAD), 1 MiB, as
    /// [`JobManager`](backline_core::JobManager)'s): a larger job is
    /// [`Error::PayloadTooLarge`].
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// The most connections in the pool (default 10). On PostgreSQL the claims have a pool of
    /// their own with the same bound, opened on demand (in practice one connection per queue a
    /// server claims from); see the crate docs on plans without statistics.
    pub fn with_max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// How long to wait for a connection (default 10 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Whether `connect` applies the migrations (default `true`); without, call
    /// [`SqlBackend::migrate`](crate::SqlBackend::migrate) yourself.
    pub fn with_migrate_on_connect(mut self, migrate: bool) -> Self {
        self.migrate_on_connect = migrate;
        self
    }

    /// The longest wait before looking for jobs pushed by other processes (MySQL, SQLite, and
    /// PostgreSQL while its `LISTEN` connection is down); default 1 s.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// SQLite's `synchronous` setting (default [`SqliteSync::Full`]).
    pub fn with_sqlite_sync(mut self, sync: SqliteSync) -> Self {
        self.sqlite_sync = sync;
        self
    }

    /// How long SQLite waits for another writer's lock (default 10 s).
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The URL with its password hidden.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        TableName::parse(&self.table)?;
        if self.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::Config(
                "poll_interval must be longer than zero".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_that_could_inject_are_refused() {
        for bad in [
            "",
            "1jobs",
            "Jobs",
            "jobs;drop table x",
            "jobs--",
            "a.b.c",
            ".jobs",
            "jobs.",
            "\"jobs\"",
            "jobs ",
            "jöbs",
            &"x".repeat(42),
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "jobs",
            "_jobs",
            "app.jobs",
            "backline_t_123",
            &"x".repeat(41),
        ] {
            assert!(TableName::parse(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let c = SqlConfig::new("postgres://u:hunter2@h/db");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
