//! Claim and finish of one delivery: the `basic.get` that makes a lease (or moves a
//! redelivered message on), the deliveries held until their finish, and the move of a
//! finished job to its next home before its ack.

use std::time::Duration;

use backline_core::{ClaimedJob, Error, ErrorChain, Finish, JobState, LeaseToken, Outcome, Result};
use chrono::Utc;
use lapin::options::BasicGetOptions;
use lapin::Acker;

use crate::conn::Conn;
use crate::message::Meta;
use crate::{backend_err, conn_err, later, lock, Inner};

/// A claimed delivery, held until its finish (or until its connection is replaced).
pub(crate) struct Held {
    pub(crate) acker: Acker,
    /// The delivery tag on the claim channel of connection `generation`.
    pub(crate) tag: u64,
    pub(crate) generation: u64,
    pub(crate) meta: Meta,
    pub(crate) payload: Vec<u8>,
}

/// What one [`Inner::get_one`] found.
pub(crate) enum GetResult {
    Empty,
    Claimed(Box<ClaimedJob>, u32),
    Moved(u32),
}

impl Inner {
    /// One `basic.get` from a work queue; a redelivered message is counted and moved here.
    pub(crate) async fn get_one(
        &self,
        conn: &Conn,
        work: &str,
        queue: &str,
        name: &str,
        lease: Duration,
    ) -> Result<GetResult> {
        let msg = conn
            .claim
            .basic_get(work.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| conn_err("basic.get", e))?;
        let Some(msg) = msg else {
            return Ok(GetResult::Empty);
        };
        let remaining = msg.message_count;
        let d = msg.delivery;
        let tag = d.delivery_tag;
        lock(&conn.tags).received(tag);
        let Some(mut meta) = Meta::from_delivery(&d.properties, queue, Some(name)) else {
            self.requeue_claimed(conn, &d.acker, tag).await;
            return Err(backend_err("basic.get", "unreadable message".into()));
        };
        if d.redelivered {
            // The last delivery's connection closed before it finished: a crashed attempt.
            meta.attempt = meta.attempt.saturating_add(1);
            meta.last_error = Some(format!(
                "lease expired: the connection holding attempt {} closed before it finished",
                meta.attempt
            ));
            let moved = async {
                if meta.attempt >= meta.max_attempts {
                    meta.died_at = Some(Utc::now());
                    let dead = self.dead_name(queue);
                    self.ensure_plain(conn, &dead).await?;
                    self.publish_confirmed(conn, &dead, &meta, &d.data).await?;
                    tracing::error!(job = %meta.id, name = %meta.name, attempt = meta.attempt, "job dead: its worker died on every attempt");
                } else {
                    self.publish_confirmed(conn, work, &meta, &d.data).await?;
                }
                Ok::<(), Error>(())
            }
            .await;
            if let Err(e) = moved {
                // Not moved: hand it back (still redelivered), never drop the delivery.
                self.requeue_claimed(conn, &d.acker, tag).await;
                return Err(e);
            }
            if !self.ack_claimed(conn, &[tag]).await.contains(&tag) {
                return Err(backend_err(
                    "basic.ack",
                    "the claim channel closed before the ack was sent".into(),
                ));
            }
            return Ok(GetResult::Moved(remaining));
        }
        // A header claiming every attempt spent (outside input: Backline never publishes one
        // into a work queue) makes this claim the last attempt.
        meta.attempt = meta.attempt.min(meta.max_attempts - 1);
        let now = Utc::now();
        let mut held = lock(&self.held);
        let token = loop {
            let t = LeaseToken::random();
            if !held.contains_key(&t) {
                break t;
            }
        };
        let job = meta.to_job(
            d.data.clone(),
            JobState::Running,
            meta.attempt.saturating_add(1),
            Some(later(now, lease)),
        );
        held.insert(
            token,
            Held {
                acker: d.acker,
                tag,
                generation: conn.generation,
                meta,
                payload: d.data,
            },
        );
        drop(held);
        Ok(GetResult::Claimed(
            Box::new(ClaimedJob { job, token }),
            remaining,
        ))
    }

    /// Applies one finish up to its ack: moves the job to its next home (confirmed) and
    /// returns the delivery tag to ack; `None` if the lease was lost. A failed move hands the
    /// delivery back (requeue) and is the error.
    pub(crate) async fn finish_one(&self, conn: &Conn, f: &Finish) -> Result<Option<u64>> {
        let held = {
            let mut held = lock(&self.held);
            match held.get(&f.token) {
                Some(h) if h.meta.id == f.id => held.remove(&f.token),
                _ => None,
            }
        };
        let Some(h) = held else { return Ok(None) };
        if h.generation != conn.generation || !h.acker.usable() {
            return Ok(None);
        }
        let mut meta = h.meta.clone();
        let attempt = meta.attempt.saturating_add(1);
        let moved = match &f.outcome {
            Outcome::Succeeded { .. } => Ok(()),
            Outcome::Retry { delay, error } => {
                meta.attempt = attempt;
                meta.last_error = Some(error.clone());
                let now = Utc::now();
                meta.run_at = later(now, *delay);
                match self.route(conn, &meta, now).await {
                    Ok((target, _)) => {
                        self.publish_confirmed(conn, &target, &meta, &h.payload)
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            Outcome::Dead { error } => {
                meta.attempt = attempt;
                meta.last_error = Some(error.clone());
                meta.died_at = Some(Utc::now());
                let dead = self.dead_name(&meta.queue);
                match self.ensure_plain(conn, &dead).await {
                    Ok(()) => self.publish_confirmed(conn, &dead, &meta, &h.payload).await,
                    Err(e) => Err(e),
                }
            }
            Outcome::Release => {
                // The attempt header is unchanged: the attempt is given back.
                meta.run_at = Utc::now();
                match self.ensure_work(conn, &meta.queue, &meta.name).await {
                    Ok(work) => self.publish_confirmed(conn, &work, &meta, &h.payload).await,
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = moved {
            tracing::warn!(job = %f.id, error = %ErrorChain(&e), "moving a finished job failed; the broker redelivers it");
            self.requeue_claimed(conn, &h.acker, h.tag).await;
            return Err(e);
        }
        if matches!(f.outcome, Outcome::Release) {
            self.notify_due(conn, &meta.queue).await;
        }
        Ok(Some(h.tag))
    }
}
