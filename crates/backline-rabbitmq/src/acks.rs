//! The claim channel's delivery-tag book (which tags a multiple ack may cover), and the acks
//! and requeues of claimed deliveries planned with it.

use std::collections::BTreeSet;

use backline_core::ErrorChain;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Acker;

use crate::conn::Conn;
use crate::{lock, Inner};

/// The most tags kept above a gap in the claim channel's tags: a gap that many deliveries old
/// is a claim dropped in flight, not a reply still on its way.
const MAX_AHEAD: usize = 65_536;

/// What this handle knows of its claim channel's delivery tags. A channel numbers its
/// deliveries 1, 2, 3, …, and only claims' `basic.get`s receive deliveries on it.
#[derive(Debug, Default)]
pub(crate) struct Tags {
    /// Every tag below this one has been received (registered).
    received_below: u64,
    /// Tags received above a gap: a delivery still on its way to its `basic.get`, or one whose
    /// claim was dropped (cancelled) in flight, which this handle never sees.
    received_ahead: BTreeSet<u64>,
    /// Whether the gap is one that never fills (more than [`MAX_AHEAD`] tags received above
    /// it): `received_ahead` is no longer kept, and no multiple ack reaches past the gap.
    stuck: bool,
    /// Received tags neither acked nor handed back yet.
    open: BTreeSet<u64>,
}

impl Tags {
    pub(crate) fn received(&mut self, tag: u64) {
        self.open.insert(tag);
        if self.received_below == 0 {
            self.received_below = 1;
        }
        if self.stuck {
            return;
        }
        if tag == self.received_below {
            self.received_below += 1;
            while self.received_ahead.remove(&self.received_below) {
                self.received_below += 1;
            }
        } else if tag > self.received_below {
            self.received_ahead.insert(tag);
            if self.received_ahead.len() > MAX_AHEAD {
                self.received_ahead.clear();
                self.stuck = true;
            }
        }
    }

    /// The tags a multiple ack may cover: below every open tag and every tag not received.
    fn multiple_below(&self) -> u64 {
        let open = self.open.first().copied().unwrap_or(u64::MAX);
        open.min(self.received_below.max(1))
    }
}

/// Hands a delivery back to its queue (`nack` with requeue): for a move that failed, so the
/// delivery is never dropped unacknowledged (it would stay with this channel until it closes).
pub(crate) async fn requeue(acker: &Acker) {
    let nacked = acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await;
    if let Err(e) = nacked {
        tracing::debug!(error = %ErrorChain(&e), "nack failed; the broker requeues the delivery when its channel closes");
    }
}

impl Inner {
    /// Acks claimed deliveries (`tags`, on `conn`'s claim channel, each open); returns the
    /// tags whose ack was sent.
    ///
    /// The tags below every other open tag and below every tag not received yet go out as one
    /// `basic.ack` with `multiple`: the broker acks every outstanding delivery up to it, which
    /// are exactly these (every other delivery up to it was received, and acked or handed back
    /// before). The rest go one by one. In a drain the jobs of a batch finish roughly in claim
    /// order, so most of a finish batch is one frame. A tag leaves the open set only under
    /// `acking`, with its frame sent before the next plan. A delivery whose claim was dropped
    /// in flight is never received: it stays a gap, no multiple ack reaches past it, and the
    /// broker redelivers it when the connection closes.
    pub(crate) async fn ack_claimed(&self, conn: &Conn, tags: &[u64]) -> Vec<u64> {
        let _order = conn.acking.lock().await;
        let (below, above): (Vec<u64>, Vec<u64>) = {
            let mut book = lock(&conn.tags);
            for t in tags {
                book.open.remove(t);
            }
            let limit = book.multiple_below();
            tags.iter().partition(|t| **t < limit)
        };
        let mut sent = Vec::with_capacity(tags.len());
        if let Some(&last) = below.iter().max() {
            let options = BasicAckOptions {
                multiple: below.len() > 1,
            };
            match conn.claim.basic_ack(last, options).await {
                Ok(()) => sent.extend_from_slice(&below),
                Err(e) => {
                    tracing::debug!(error = %ErrorChain(&e), "ack failed; the broker redelivers those jobs")
                }
            }
        }
        let singles = above.iter().map(|&t| async move {
            conn.claim
                .basic_ack(t, BasicAckOptions::default())
                .await
                .map(|()| t)
        });
        for r in futures_util::future::join_all(singles).await {
            match r {
                Ok(t) => sent.push(t),
                Err(e) => {
                    tracing::debug!(error = %ErrorChain(&e), "ack failed; the broker redelivers the job")
                }
            }
        }
        sent
    }

    /// Hands a claimed delivery back (`nack` with requeue), then forgets its tag.
    pub(crate) async fn requeue_claimed(&self, conn: &Conn, acker: &Acker, tag: u64) {
        let _order = conn.acking.lock().await;
        requeue(acker).await;
        lock(&conn.tags).open.remove(&tag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multiple_ack_never_reaches_past_an_open_or_unseen_tag() {
        let mut tags = Tags::default();
        assert_eq!(
            tags.multiple_below(),
            1,
            "nothing received: nothing to cover"
        );
        for t in [1, 2, 4, 5] {
            tags.received(t);
        }
        // Tag 3 is still on its way (or its claim was dropped): a gap.
        tags.open.retain(|t| *t != 1 && *t != 2 && *t != 4);
        assert_eq!(tags.multiple_below(), 3);
        tags.received(3);
        tags.open.remove(&3);
        // 1..=4 received and acked; 5 open.
        assert_eq!(tags.multiple_below(), 5);
        tags.open.remove(&5);
        assert_eq!(tags.multiple_below(), 6);
        // A gap that never fills (tag 6 never arrives) stops multiple acks below it for good,
        // without keeping every later tag.
        for t in 7..(8 + MAX_AHEAD as u64) {
            tags.received(t);
            tags.open.remove(&t);
        }
        assert!(tags.stuck && tags.received_ahead.is_empty());
        assert_eq!(tags.multiple_below(), 6);
    }
}
