//! The dead-letter scan: browsing a queue's dead letters on a channel of its own, taking
//! (acking) the ones a visitor picks, and finding a dead job by id.

use backline_core::{JobId, Result};
use lapin::options::{BasicAckOptions, BasicGetOptions};

use crate::conn::open_channel;
use crate::message::Meta;
use crate::{conn_err, Inner};

/// The most dead letters one `retry_dead` or `delete` looks at.
pub(crate) const DEAD_SCAN_LIMIT: usize = 10_000;

/// What a dead-letter scan does with the message it looked at.
pub(crate) enum ScanStep {
    Next,
    Stop,
    Take,
    TakeAndStop,
}

impl Inner {
    /// Browses up to `limit` dead letters of `queue` on a channel of its own (closed after, so
    /// every message goes back in place); `visit` says, per message, whether to take it (ack)
    /// and whether to go on.
    pub(crate) async fn scan_dead<F>(&self, queue: &str, limit: usize, mut visit: F) -> Result<()>
    where
        F: FnMut(&Meta, &[u8]) -> ScanStep,
    {
        let conn = self.conn().await?;
        let dead = self.dead_name(queue);
        self.ensure_plain(&conn, &dead).await?;
        let channel = open_channel(&conn.connection).await?;
        let result = async {
            for _ in 0..limit {
                let Some(msg) = channel
                    .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(|e| conn_err("basic.get", e))?
                else {
                    break;
                };
                let d = msg.delivery;
                let Some(meta) = Meta::from_delivery(&d.properties, queue, None) else {
                    continue;
                };
                match visit(&meta, &d.data) {
                    ScanStep::Next => {}
                    ScanStep::Stop => break,
                    ScanStep::Take => {
                        d.acker
                            .ack(BasicAckOptions::default())
                            .await
                            .map_err(|e| conn_err("basic.ack", e))?;
                    }
                    ScanStep::TakeAndStop => {
                        d.acker
                            .ack(BasicAckOptions::default())
                            .await
                            .map_err(|e| conn_err("basic.ack", e))?;
                        break;
                    }
                }
            }
            Ok(())
        }
        .await;
        let _ = channel.close(200, "dead-letter scan done".into()).await;
        result
    }

    /// Finds a dead job by id; with `take`, takes it too (acks it: it is gone from the dead
    /// letters), else leaves it in place.
    pub(crate) async fn find_dead(&self, id: JobId, take: bool) -> Result<Option<(Meta, Vec<u8>)>> {
        for (queue, _) in self.known_queues(None) {
            let mut found = None;
            self.scan_dead(&queue, DEAD_SCAN_LIMIT, |m, data| {
                if m.id == id {
                    found = Some((m.clone(), data.to_vec()));
                    if take {
                        ScanStep::TakeAndStop
                    } else {
                        ScanStep::Stop
                    }
                } else {
                    ScanStep::Next
                }
            })
            .await?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }
}
