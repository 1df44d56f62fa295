//! The `LISTEN` task that turns notifications into wake-ups, and reconnects by itself.

use super::*;

/// Keeps a `LISTEN` connection open, reconnecting by itself, and turns each notification into
/// a bump of its queue's counter.
pub(super) async fn listen_loop(
    pool: PgPool,
    channel: String,
    signals: Arc<Signals>,
    up: Arc<AtomicBool>,
    mut stop: oneshot::Receiver<()>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    let mut was_lost = false;
    loop {
        let connect = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let listener = tokio::select! {
            _ = &mut stop => return,
            r = connect => r,
        };
        let mut listener = match listener {
            Ok(l) => l,
            Err(e) => {
                if !was_lost {
                    tracing::warn!(error = %ErrorChain(&e), retry_in = ?backoff, "postgres LISTEN connection failed; polling until it is back");
                    was_lost = true;
                }
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        up.store(true, Ordering::Release);
        if was_lost {
            tracing::info!("postgres LISTEN connection restored");
        }
        // Anything pushed while we were not listening: let every waiter look.
        signals.bump_all();
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
        backoff = Duration::from_millis(100);
        loop {
            let r = tokio::select! {
                _ = &mut stop => return,
                r = listener.try_recv() => r,
            };
            match r {
                Ok(Some(n)) => signals.bump(n.payload()),
                Ok(None) => {
                    // Lost and already reconnected: notifications in between are gone.
                    tracing::warn!("postgres LISTEN connection was lost and re-established");
                    signals.bump_all();
                }
                Err(e) => {
                    up.store(false, Ordering::Release);
                    signals.bump_all();
                    tracing::warn!(error = %ErrorChain(&e), "postgres LISTEN connection lost; polling until it is back");
                    was_lost = true;
                    break;
                }
            }
        }
    }
}
