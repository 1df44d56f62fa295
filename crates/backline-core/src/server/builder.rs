//! The registry of handlers, erased behind [`ErasedHandler`] and keyed by job name, and
//! [`JobServerBuilder`], which fills it and checks the setup.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{Inner, JobServer, ServerConfig};
use crate::{
    Backend, BackgroundJob, Error, Extensions, JobArgs, JobContext, JobError, Result, RetryPolicy,
};

/// The boxed twin of [`BackgroundJob`], held in the registry by job name.
pub(super) trait ErasedHandler: Send + Sync {
    fn call(&self, payload: &[u8], ctx: JobContext) -> BoxFuture<'static, Result<(), JobError>>;
    fn retry_policy(&self) -> RetryPolicy;
    fn default_queue(&self) -> &'static str;
}

struct Typed<H>(Arc<H>);

impl<H: BackgroundJob> ErasedHandler for Typed<H> {
    fn call(&self, payload: &[u8], ctx: JobContext) -> BoxFuture<'static, Result<(), JobError>> {
        match serde_json::from_slice::<H::Args>(payload) {
            Ok(args) => {
                let handler = self.0.clone();
                Box::pin(async move { handler.execute(args, ctx).await })
            }
            Err(e) => {
                let err = JobError::fatal(format!("undecodable arguments: {e}"));
                Box::pin(std::future::ready(Err(err)))
            }
        }
    }

    fn retry_policy(&self) -> RetryPolicy {
        <H::Args as JobArgs>::retry_policy()
    }

    fn default_queue(&self) -> &'static str {
        <H::Args as JobArgs>::queue()
    }
}

/// Builds a [`JobServer`]: register handlers, set queues and knobs.
pub struct JobServerBuilder {
    backend: Arc<dyn Backend>,
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    duplicate: Option<String>,
    queues: Vec<(String, usize)>,
    config: ServerConfig,
    data: Extensions,
}

impl std::fmt::Debug for JobServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobServerBuilder")
            .field("backend", &self.backend.name())
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field("queues", &self.queues)
            .field("config", &self.config)
            .finish()
    }
}

impl JobServerBuilder {
    /// An empty builder over `backend` (see [`JobServer::builder`]).
    pub(super) fn new(backend: Arc<dyn Backend>) -> Self {
        JobServerBuilder {
            backend,
            handlers: HashMap::new(),
            duplicate: None,
            queues: Vec::new(),
            config: ServerConfig::default(),
            data: Extensions::default(),
        }
    }

    /// Registers the handler of one job type; a second handler for the same name is an error at `build`.
    pub fn register<H: BackgroundJob>(mut self, handler: H) -> Self {
        let name = <H::Args as JobArgs>::NAME;
        if self.handlers.contains_key(name) {
            self.duplicate.get_or_insert_with(|| name.to_owned());
        }
        self.handlers
            .insert(name.to_owned(), Arc::new(Typed(Arc::new(handler))));
        self
    }

    /// Serves `queue` with at most `concurrency` jobs running at once.
    ///
    /// Without any call to `queue`, the server serves the default queues of its registered job
    /// types with [`ServerConfig::default_concurrency`].
    pub fn queue(mut self, queue: impl Into<String>, concurrency: usize) -> Self {
        let queue = queue.into();
        self.queues.retain(|(q, _)| *q != queue);
        self.queues.push((queue, concurrency));
        self
    }

    /// Replaces all knobs.
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Changes some knobs.
    pub fn configure(mut self, f: impl FnOnce(&mut ServerConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// Adds shared state that handlers read with [`JobContext::data`].
    pub fn data<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.data.insert(value);
        self
    }

    /// Checks the setup and builds the server.
    pub fn build(self) -> Result<JobServer> {
        if let Some(name) = self.duplicate {
            return Err(Error::DuplicateHandler(name));
        }
        self.config.validate()?;
        let mut names: Vec<String> = self.handlers.keys().cloned().collect();
        names.sort();
        for name in &names {
            crate::validate_name("job", name)?;
        }
        let mut queues = self.queues;
        if queues.is_empty() {
            let mut defaults: Vec<&'static str> =
                self.handlers.values().map(|h| h.default_queue()).collect();
            defaults.sort_unstable();
            defaults.dedup();
            queues = defaults
                .into_iter()
                .map(|q| (q.to_owned(), self.config.default_concurrency))
                .collect();
        }
        for (q, c) in &queues {
            crate::validate_name("queue", q)?;
            if *c == 0 {
                return Err(Error::Config(format!(
                    "queue {q} needs a concurrency of at least 1"
                )));
            }
        }
        if names.is_empty() {
            return Err(Error::Config(
                "a job server needs at least one registered handler".into(),
            ));
        }
        Ok(JobServer {
            inner: Arc::new(Inner {
                backend: self.backend,
                handlers: self.handlers,
                names,
                queues,
                config: self.config,
                data: self.data,
            }),
        })
    }
}
