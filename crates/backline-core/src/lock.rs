//! A distributed lock over any backend with the `locks` capability.

use crate::ErrorChain;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{Backend, Error, LeaseToken, Result};

/// A named lock held by this process across the cluster, renewed in the background.
///
/// It is taken with a TTL and renewed every third of it. A holder that fails to renew (the lock
/// expired and someone else took it, or the backend stayed unreachable for a whole TTL) learns it
/// through [`lost`](Self::lost). Dropping the lock stops the renewal and releases it.
///
/// ```
/// # use std::time::Duration;
/// # use backline_core::DistributedLock;
/// # async fn demo(backend: std::sync::Arc<dyn backline_core::Backend>) -> backline_core::Result<()> {
/// if let Some(lock) = DistributedLock::acquire(backend, "nightly-report", Duration::from_secs(30)).await? {
///     tokio::select! {
///         _ = lock.lost() => eprintln!("lost the lock; stopping"),
///         _ = async { /* the work only one replica may do */ } => {}
///     }
///     lock.release().await;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DistributedLock {
    backend: Arc<dyn Backend>,
    name: String,
    owner: LeaseToken,
    lost: CancellationToken,
    renewal: Option<JoinHandle<()>>,
}

impl DistributedLock {
    /// Takes the lock if it is free; `None` if another holder has it.
    pub async fn acquire(
        backend: Arc<dyn Backend>,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<DistributedLock>> {
        if !backend.capabilities().locks {
            return Err(Error::Unsupported {
                backend: backend.name(),
                what: "distributed locks",
            });
        }
        if ttl < Duration::from_millis(30) {
            return Err(Error::Config(format!(
                "lock TTL {ttl:?} is too short (30 ms at least)"
            )));
        }
        let owner = LeaseToken::random();
        if !backend.lock_acquire(name, owner, ttl).await? {
            return Ok(None);
        }
        let lost = CancellationToken::new();
        let renewal = tokio::spawn(renew(
            backend.clone(),
            name.to_owned(),
            owner,
            ttl,
            lost.clone(),
        ));
        Ok(Some(DistributedLock {
            backend,
            name: name.to_owned(),
            owner,
            lost,
            renewal: Some(renewal),
        }))
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Resolves when the lock is lost.
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// Whether the lock is lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// A token cancelled when the lock is lost.
    pub fn lost_token(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Stops renewing and releases the lock (if still held).
    pub async fn release(mut self) {
        if let Some(task) = self.renewal.take() {
            task.abort();
        }
        if let Err(e) = self.backend.lock_release(&self.name, self.owner).await {
            tracing::warn!(lock = %self.name, error = %ErrorChain(&e), "cannot release lock; it will expire");
        }
    }
}

impl Drop for DistributedLock {
    fn drop(&mut self) {
        if let Some(task) = self.renewal.take() {
            task.abort();
            let backend = self.backend.clone();
            let name = std::mem::take(&mut self.name);
            let owner = self.owner;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = backend.lock_release(&name, owner).await;
                });
            }
        }
    }
}

async fn renew(
    backend: Arc<dyn Backend>,
    name: String,
    owner: LeaseToken,
    ttl: Duration,
    lost: CancellationToken,
) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        match backend.lock_renew(&name, owner, ttl).await {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::warn!(lock = %name, "lock lost: another holder has it");
                lost.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(lock = %name, error = %ErrorChain(&e), "cannot renew lock");
                if last_ok.elapsed() >= ttl {
                    tracing::warn!(lock = %name, "lock lost: not renewed within its TTL");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}
