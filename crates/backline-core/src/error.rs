//! The error type shared by the core and every provider.

use std::time::Duration;

/// A boxed error from a driver (`sqlx`, `redis`, `lapin`, …), kept as a source only.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of Backline's fallible operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Backline, in terms every provider maps into.
///
/// Driver errors never appear as variants: they are boxed sources of [`Error::Connection`] or
/// [`Error::Backend`], so that a new driver version never changes this type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The job, lock or record does not exist (any more).
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, e.g. `job 0190…`.
        what: String,
    },
    /// The lease on a job was lost: it expired and the job was claimed again, or it was finished.
    ///
    /// A worker that sees this must stop touching the job: a newer attempt owns it.
    #[error("lease lost on job {job}")]
    LeaseLost {
        /// The job whose lease was lost.
        job: crate::JobId,
    },
    /// The backend cannot do this (see [`Capabilities`](crate::Capabilities)).
    #[error("{backend} does not support {what}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// The operation or capability.
        what: &'static str,
    },
    /// Job arguments could not be encoded or decoded.
    #[error("cannot {op} arguments of job {name}")]
    Serialization {
        /// `encode` or `decode`.
        op: &'static str,
        /// The job name.
        name: String,
        /// The codec's error.
        #[source]
        source: BoxError,
    },
    /// An encoded payload is larger than the configured limit.
    #[error("payload of job {name} is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The job name.
        name: String,
        /// The encoded size.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// A configuration value is invalid (bad identifier, zero concurrency, malformed URL, …).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A job to enqueue is malformed (empty or unusable name or queue, zero attempts, …).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// Two handlers were registered for one job name.
    #[error("a handler for job {0} is already registered")]
    DuplicateHandler(String),
    /// The server could not be reached or the connection broke; usually worth retrying.
    #[error("connection to {backend} failed during {op}")]
    Connection {
        /// The backend's name.
        backend: &'static str,
        /// The operation that failed.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// The backend answered with an error.
    #[error("{backend} failed during {op}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// The operation that failed.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// An operation did not finish in time.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// The component is shutting down and takes no new work.
    #[error("shutting down")]
    ShuttingDown,
    /// A stored job cannot be read: one of its fields holds a value of the wrong type or out of
    /// its range (a row written by hand, a migration script or another client).
    ///
    /// It costs only that job: a claim marks it dead with this text as its `last_error`, and
    /// `list` skips it with a warning; `get` returns this error.
    #[error("{backend}: job {job} cannot be read: {field}: {problem}")]
    Undecodable {
        /// The backend's name.
        backend: &'static str,
        /// The job: its id, or how the store finds it when the id itself is unreadable.
        job: String,
        /// The column, hash field or header that holds the bad value.
        field: String,
        /// What is wrong with the value.
        problem: String,
    },
}

impl Error {
    /// Whether the same call may succeed if tried again (connection trouble, time-outs).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Connection { .. } | Error::Timeout { .. })
    }

    /// Whether this is [`Error::Unsupported`].
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Error::Unsupported { .. })
    }

    /// A [`Error::NotFound`] for a job.
    pub fn job_not_found(id: crate::JobId) -> Self {
        Error::NotFound {
            what: format!("job {id}"),
        }
    }
}

/// An error with its whole source chain, for log lines: `outer: cause: root cause`.
///
/// `tracing`'s `%e` prints only the outermost message (`postgres failed during claim`), which
/// hides the part an operator needs (the column, the driver's message). Every log line of
/// Backline and its providers that carries an error prints it through this type. A source whose
/// text the previous message already contains (drivers that repeat their cause) is not repeated.
///
/// ```
/// use backline_core::{Error, ErrorChain};
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// let e = Error::Connection { backend: "postgres", op: "claim", source: Box::new(io) };
/// assert_eq!(
///     ErrorChain(&e).to_string(),
///     "connection to postgres failed during claim: connection refused"
/// );
/// ```
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut previous = self.0.to_string();
        f.write_str(&previous)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            let text = e.to_string();
            if !text.is_empty() && !previous.contains(&text) {
                write!(f, ": {text}")?;
            }
            previous = text;
            next = e.source();
        }
        Ok(())
    }
}

impl std::fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Replaces the password of a connection URL with `***`, for logs and error messages.
///
/// ```
/// use backline_core::redact_url;
/// assert_eq!(redact_url("postgres://app:s3cret@db:5432/jobs"), "postgres://app:***@db:5432/jobs");
/// assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let redacted = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_owned(),
    };
    format!("{}{}{}", &url[..scheme_end + 3], redacted, &rest[at..])
}
