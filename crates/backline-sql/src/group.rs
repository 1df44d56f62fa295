//! Group commit of concurrent pushes: calls that arrive while a commit is in flight share the
//! next transaction.
//!
//! # Why
//!
//! The most common call is one enqueue per request, from many tasks at once, and each
//! enqueue alone is one commit. The commit, not the insert, is what a database serializes:
//! SQLite has one writer and an fsync per commit; on PostgreSQL a transaction that sends a
//! `NOTIFY` takes a global lock at commit, so notifying commits queue behind each other (on
//! this machine 3,240 notifying commits/s against 12,800 plain single-row `INSERT`s/s from 32
//! connections). Putting the jobs of every call that is waiting anyway into one transaction
//! turns N commits (and N `NOTIFY`s) into one, without changing what a call means.
//!
//! # How: leader and followers
//!
//! A [`GroupCommit`] (one per backend handle) holds a mutex-protected list of pending calls.
//! A call appends itself (its jobs and a oneshot sender for its answer) to the list, then:
//!
//! - if no commit is in flight, it becomes the **leader**: it takes the pending calls (its
//!   own first, up to [`MAX_GROUP_JOBS`] jobs and [`MAX_GROUP_BYTES`] payload bytes), stores
//!   them in one transaction through the dialect's [`Commit::commit`], wakes this process's
//!   waiters of each queue that got a ready job once, answers every member, and, if more
//!   calls arrived meanwhile, hands leadership on to the oldest of them (a `Lead` message on
//!   its oneshot) before it returns its own result;
//! - otherwise it is a **follower**: it waits on its oneshot for either its answer or
//!   leadership.
//!
//! A call returns only after the commit that holds its jobs (nothing is acknowledged before it
//! is durable), and there is never more than one commit in flight per handle, so each commit
//! carries everything that queued up during the previous one: the busier the handle, the
//! larger the groups, and a lone caller commits at once with no added wait.
//!
//! # Why no timer and no task
//!
//! A linger timer ("wait 1 ms for company") would slow the lone caller down and the busy one
//! not at all: under load, the commit in flight is the wait. A background committer task
//! would belong to the runtime that spawned it and die with it (a handle shared between
//! runtimes, as in tests or in a `#[tokio::main]` plus a blocking pool, would hang its callers
//! afterwards), and it would need a shutdown of its own. Here every commit runs in the future
//! of a caller that waits for it anyway.
//!
//! # Failures
//!
//! Each call's batch stays all or nothing: it is in one transaction whatever the group. If the
//! shared transaction fails with an error that is not connection trouble (a value the database
//! refuses, a constraint), the leader retries each member on its own, in its own transaction,
//! so only the guilty call fails. Connection trouble and time-outs fail every member of that
//! commit (none was acknowledged, and a retry would meet the same connection). Rows are
//! inserted with "on conflict do nothing" semantics, so two calls in one group that carry the
//! same id keep their meaning: the first one stored wins and both get the id back.
//!
//! # Cancellation
//!
//! A caller's future may be dropped at any await. A dropped follower takes its jobs out of
//! the pending list and, if leadership had just been handed to it, hands it on to the next
//! waiter (a oneshot closed before the hand-off makes the leader pick the next one itself). A
//! dropped leader (or one whose commit panicked) puts the members it had not answered back at
//! the front of the pending list and hands leadership on, in a `Drop` guard: their commit may
//! or may not have happened, and storing them again is safe because an insert of an existing
//! id does nothing. The dropped caller's own jobs are left to that uncertain commit, as with
//! any cancelled call.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use backline_core::{validate_name, Error, NewJob, Result};
use tokio::sync::oneshot;

use crate::common::Signals;

/// The most jobs stored in one shared commit (a single call with more goes alone).
pub(crate) const MAX_GROUP_JOBS: usize = 2_000;

/// The most payload bytes stored in one shared commit (a single call with more goes alone):
/// far under MySQL's `max_allowed_packet`, so that grouping never makes a statement too large
/// that would have fitted alone.
pub(crate) const MAX_GROUP_BYTES: usize = 4 << 20;

/// The dialect's part of a push: storing jobs in one transaction.
#[async_trait]
pub(crate) trait Commit: Send + Sync {
    /// Inserts `jobs` on one connection in one transaction and commits it (with the database's
    /// own wake-ups, such as PostgreSQL's `NOTIFY`, at most one per queue, inside it); returns
    /// the queues that got a ready job. All or nothing; a job whose id exists is left as it is.
    async fn commit(&self, jobs: &[&NewJob]) -> Result<HashSet<String>>;
}

/// The pending calls and the leader flag of one backend handle (see the [module docs](self)).
#[derive(Default)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Calls waiting for a commit, oldest first.
    pending: Vec<Member>,
    /// Whether a caller leads: it is committing, or has been told to.
    leading: bool,
    /// The ticket of the next call.
    next_ticket: u64,
}

/// One call waiting for a commit.
struct Member {
    ticket: u64,
    jobs: Vec<NewJob>,
    /// Where its answer goes; `None` for the leader (it returns its own answer) and once a
    /// follower has been answered or told to lead.
    reply: Option<oneshot::Sender<Reply>>,
}

impl Member {
    fn bytes(&self) -> usize {
        self.jobs.iter().map(|j| j.payload.len()).sum()
    }
}

/// What a follower is told.
enum Reply {
    /// Its jobs' commit is over, with this result.
    Done(Result<()>),
    /// It leads now: its jobs are still pending.
    Lead,
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic: every change is a single step.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a caller leads, and how many calls wait for a commit (for tests that need a
    /// group to have formed).
    pub(crate) fn state(&self) -> (bool, usize) {
        let st = self.lock();
        (st.leading, st.pending.len())
    }

    /// Stores `jobs` (one call's batch, all or nothing), sharing the transaction with
    /// concurrent calls; returns once the commit that holds them is over. An invalid job is
    /// refused before the batch joins a group (it would fail the shared statement and cost
    /// every member a retry).
    pub(crate) async fn push<C: Commit + ?Sized>(
        &self,
        commit: &C,
        signals: &Signals,
        jobs: Vec<NewJob>,
    ) -> Result<()> {
        validate(&jobs)?;
        if jobs.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let (ticket, lead) = {
            let mut st = self.lock();
            let ticket = st.next_ticket;
            st.next_ticket = st.next_ticket.wrapping_add(1);
            let lead = !st.leading;
            st.leading = true;
            st.pending.push(Member {
                ticket,
                jobs,
                reply: (!lead).then_some(tx),
            });
            (ticket, lead)
        };
        if !lead {
            let mut follower = Following {
                group: self,
                ticket,
                rx,
                armed: true,
            };
            let reply = (&mut follower.rx).await;
            follower.armed = false;
            match reply {
                Ok(Reply::Done(result)) => return result,
                Ok(Reply::Lead) => {}
                // Every path answers or hands on; this would be a bug, reported, not a hang.
                Err(_) => {
                    return Err(Error::Backend {
                        backend: "sql",
                        op: "push",
                        source: "the shared commit was abandoned without an answer".into(),
                    })
                }
            }
        }
        self.lead(commit, signals, ticket).await
    }

    /// Takes the pending calls (this one first), commits them and answers them; then hands
    /// leadership on. Returns this call's own result.
    async fn lead<C: Commit + ?Sized>(
        &self,
        commit: &C,
        signals: &Signals,
        ticket: u64,
    ) -> Result<()> {
        let batch = take_batch(&mut self.lock());
        let mut leading = Leading {
            group: self,
            batch,
            armed: true,
        };
        let own = leading.commit(commit, signals, ticket).await;
        leading.armed = false;
        drop(leading);
        hand_on(&mut self.lock());
        own
    }
}

/// Refuses a batch with an invalid job before it joins a group (the checks of
/// [`JobManager::check`](backline_core::JobManager::check) that need no configuration).
pub(crate) fn validate(jobs: &[NewJob]) -> Result<()> {
    for job in jobs {
        validate_name("job", &job.name)?;
        validate_name("queue", &job.queue)?;
        if job.max_attempts == 0 {
            return Err(Error::InvalidJob(format!(
                "job {} needs at least one attempt",
                job.name
            )));
        }
    }
    Ok(())
}

/// The oldest pending calls that fit in one commit (at least one).
fn take_batch(st: &mut State) -> Vec<Member> {
    let (mut jobs, mut bytes, mut take) = (0, 0, 0);
    for m in &st.pending {
        let b = m.bytes();
        if take > 0 && (jobs + m.jobs.len() > MAX_GROUP_JOBS || bytes + b > MAX_GROUP_BYTES) {
            break;
        }
        jobs += m.jobs.len();
        bytes += b;
        take += 1;
    }
    st.pending.drain(..take).collect()
}

/// Tells the oldest pending call that it leads now, or, with none, that nobody leads.
fn hand_on(st: &mut State) {
    while let Some(first) = st.pending.first_mut() {
        if let Some(tx) = first.reply.take() {
            if tx.send(Reply::Lead).is_ok() {
                return;
            }
        }
        // Its caller is gone (its guard will find nothing to remove): drop its jobs.
        st.pending.remove(0);
    }
    st.leading = false;
}

/// A follower's wait; dropped while armed (the caller's future was dropped), it removes the
/// call and passes on leadership it was handed meanwhile.
struct Following<'a> {
    group: &'a GroupCommit,
    ticket: u64,
    rx: oneshot::Receiver<Reply>,
    armed: bool,
}

impl Drop for Following<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // After close() no hand-off can arrive: either it came before (and is ours to pass
        // on) or the leader's send fails and it picks the next call itself.
        self.rx.close();
        let told_to_lead = matches!(self.rx.try_recv(), Ok(Reply::Lead));
        let mut st = self.group.lock();
        st.pending.retain(|m| m.ticket != self.ticket);
        if told_to_lead {
            hand_on(&mut st);
        }
    }
}

/// A leader's batch; dropped while armed (cancelled or panicking mid-commit), it puts the
/// members not yet answered back in front of the pending list and hands leadership on.
struct Leading<'a> {
    group: &'a GroupCommit,
    batch: Vec<Member>,
    armed: bool,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let unanswered: Vec<Member> = std::mem::take(&mut self.batch)
            .into_iter()
            .filter(|m| m.reply.as_ref().is_some_and(|tx| !tx.is_closed()))
            .collect();
        let mut st = self.group.lock();
        st.pending.splice(0..0, unanswered);
        hand_on(&mut st);
    }
}

impl Leading<'_> {
    /// Commits the batch (members one by one after a shared failure that is not connection
    /// trouble), answers every member but `own`, and returns `own`'s result.
    async fn commit<C: Commit + ?Sized>(
        &mut self,
        commit: &C,
        signals: &Signals,
        own: u64,
    ) -> Result<()> {
        let shared = {
            let jobs: Vec<&NewJob> = self.batch.iter().flat_map(|m| m.jobs.iter()).collect();
            commit.commit(&jobs).await
        };
        let mut mine = None;
        match shared {
            Ok(queues) => {
                wake(signals, &queues);
                for i in 0..self.batch.len() {
                    self.answer(i, own, &mut mine, Ok(()));
                }
            }
            Err(e) if self.batch.len() == 1 || e.is_retryable() => {
                let e = Arc::new(e);
                for i in 0..self.batch.len() {
                    self.answer(i, own, &mut mine, Err(copy(&e)));
                }
            }
            Err(_) => {
                for i in 0..self.batch.len() {
                    let alone = {
                        let jobs: Vec<&NewJob> = self.batch[i].jobs.iter().collect();
                        commit.commit(&jobs).await
                    };
                    if let Ok(queues) = &alone {
                        wake(signals, queues);
                    }
                    self.answer(i, own, &mut mine, alone.map(|_| ()));
                }
            }
        }
        mine.unwrap_or(Ok(()))
    }

    /// Sends member `i` its result (keeps it in `mine` if it is the leader's own).
    fn answer(&mut self, i: usize, own: u64, mine: &mut Option<Result<()>>, r: Result<()>) {
        let m = &mut self.batch[i];
        if m.ticket == own {
            *mine = Some(r);
        } else if let Some(tx) = m.reply.take() {
            // A follower that went away meanwhile needs no answer.
            let _ = tx.send(Reply::Done(r));
        }
        m.jobs = Vec::new();
    }
}

/// Wakes this process's waiters on each queue once.
fn wake(signals: &Signals, queues: &HashSet<String>) {
    for q in queues {
        signals.bump(q);
    }
}

/// One member's copy of an error the whole commit failed with: the same variant (so that
/// `is_retryable` keeps its answer) over the same source chain.
fn copy(e: &Arc<Error>) -> Error {
    let source = Box::new(SharedError(e.clone()));
    match &**e {
        Error::Connection { backend, op, .. } => Error::Connection {
            backend,
            op,
            source,
        },
        Error::Timeout { op, after } => Error::Timeout { op, after: *after },
        Error::Backend { backend, op, .. } => Error::Backend {
            backend,
            op,
            source,
        },
        _ => Error::Backend {
            backend: "sql",
            op: "push",
            source,
        },
    }
}

/// An error shared by the members of one commit: shows the original's source (the original
/// itself is described by the variant it was copied into).
#[derive(Debug)]
struct SharedError(Arc<Error>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::error::Error::source(&*self.0) {
            Some(s) if matches!(*self.0, Error::Connection { .. } | Error::Backend { .. }) => {
                std::fmt::Display::fmt(s, f)
            }
            _ => std::fmt::Display::fmt(&self.0, f),
        }
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match std::error::Error::source(&*self.0) {
            Some(s) if matches!(*self.0, Error::Connection { .. } | Error::Backend { .. }) => {
                s.source()
            }
            _ => std::error::Error::source(&*self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use std::future::Future as _;

    use super::*;

    /// A commit that records its batches (job names), fails a batch holding a job named
    /// `bad` (or any batch with a connection error when `broken`), and, when gated, waits
    /// for a permit per commit.
    #[derive(Default)]
    struct Fake {
        batches: Mutex<Vec<Vec<String>>>,
        gate: Option<Semaphore>,
        broken: bool,
    }

    impl Fake {
        fn gated() -> Fake {
            Fake {
                gate: Some(Semaphore::new(0)),
                ..Fake::default()
            }
        }

        fn open(&self) {
            if let Some(g) = &self.gate {
                g.add_permits(Semaphore::MAX_PERMITS / 2);
            }
        }

        fn open_one(&self) {
            if let Some(g) = &self.gate {
                g.add_permits(1);
            }
        }

        fn batches(&self) -> Vec<Vec<String>> {
            self.batches.lock().expect("lock").clone()
        }

        fn committed(&self) -> Vec<String> {
            self.batches().into_iter().flatten().collect()
        }
    }

    #[async_trait]
    impl Commit for Fake {
        async fn commit(&self, jobs: &[&NewJob]) -> Result<HashSet<String>> {
            if let Some(g) = &self.gate {
                g.acquire().await.expect("gate").forget();
            }
            if self.broken {
                return Err(Error::Connection {
                    backend: "fake",
                    op: "push",
                    source: "reset by peer".into(),
                });
            }
            if jobs.iter().any(|j| j.name == "bad") {
                return Err(Error::Backend {
                    backend: "fake",
                    op: "push",
                    source: "refused".into(),
                });
            }
            self.batches
                .lock()
                .expect("lock")
                .push(jobs.iter().map(|j| j.name.clone()).collect());
            Ok(jobs.iter().map(|j| j.queue.clone()).collect())
        }
    }

    fn job(name: &str) -> NewJob {
        NewJob::new(name, Vec::new())
            .with_queue("q")
            .with_max_attempts(1)
    }

    struct World {
        group: GroupCommit,
        fake: Fake,
        signals: Signals,
    }

    fn world(fake: Fake) -> Arc<World> {
        Arc::new(World {
            group: GroupCommit::default(),
            fake,
            signals: Signals::default(),
        })
    }

    /// A task pushing `jobs`.
    fn spawn(w: &Arc<World>, jobs: Vec<NewJob>) -> tokio::task::JoinHandle<Result<()>> {
        let w = w.clone();
        tokio::spawn(async move { w.group.push(&w.fake, &w.signals, jobs).await })
    }

    /// Waits (yielding, never sleeping) until the group is in `state`.
    async fn until(w: &World, state: (bool, usize)) {
        let reached = async {
            while w.group.state() != state {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), reached)
            .await
            .unwrap_or_else(|_| panic!("the group never reached {state:?}"));
    }

    /// A leader blocked in its commit (of job `lead`), and `followers` calls of one job each,
    /// named `f0`, `f1`, … (or as `name` says), all pending.
    async fn formed(
        w: &Arc<World>,
        followers: &[&str],
    ) -> (
        tokio::task::JoinHandle<Result<()>>,
        Vec<tokio::task::JoinHandle<Result<()>>>,
    ) {
        let leader = spawn(w, vec![job("lead")]);
        until(w, (true, 0)).await;
        let mut calls = Vec::new();
        for (i, name) in followers.iter().enumerate() {
            calls.push(spawn(w, vec![job(name)]));
            until(w, (true, i + 1)).await;
        }
        (leader, calls)
    }

    #[tokio::test]
    async fn a_lone_call_commits_at_once() {
        let w = world(Fake::default());
        w.group
            .push(&w.fake, &w.signals, vec![job("a"), job("b")])
            .await
            .expect("push");
        assert_eq!(w.fake.batches(), vec![vec!["a", "b"]]);
        assert_eq!(w.group.state(), (false, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_that_arrive_during_a_commit_share_the_next_one() {
        let w = world(Fake::gated());
        let (leader, calls) = formed(&w, &["f0", "f1", "f2"]).await;
        w.fake.open();
        leader.await.expect("join").expect("leader");
        for c in calls {
            c.await.expect("join").expect("follower");
        }
        assert_eq!(
            w.fake.batches(),
            vec![
                vec!["lead".to_owned()],
                vec!["f0".into(), "f1".into(), "f2".into()]
            ]
        );
        assert_eq!(w.group.state(), (false, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_job_fails_only_its_own_call() {
        let w = world(Fake::gated());
        let (leader, calls) = formed(&w, &["f0", "bad", "f2"]).await;
        w.fake.open();
        leader.await.expect("join").expect("leader");
        let results: Vec<Result<()>> = futures_util::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.expect("join"))
            .collect();
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(matches!(results[1], Err(Error::Backend { .. })));
        assert_eq!(w.fake.committed(), vec!["lead", "f0", "f2"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connection_trouble_fails_every_member_of_the_commit() {
        let w = world(Fake {
            broken: true,
            ..Fake::gated()
        });
        let (leader, calls) = formed(&w, &["f0", "f1"]).await;
        w.fake.open();
        assert!(leader.await.expect("join").is_err());
        for c in calls {
            let e = c.await.expect("join").expect_err("no connection");
            assert!(e.is_retryable(), "{e:?}");
            let chain = std::error::Error::source(&e).map(|s| s.to_string());
            assert_eq!(chain.as_deref(), Some("reset by peer"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_leader_does_not_strand_its_followers() {
        let w = world(Fake::gated());
        let (leader, calls) = formed(&w, &["f0", "f1"]).await;
        leader.abort();
        assert!(leader.await.expect_err("aborted").is_cancelled());
        w.fake.open();
        for c in calls {
            tokio::time::timeout(Duration::from_secs(30), c)
                .await
                .expect("a follower was stranded")
                .expect("join")
                .expect("follower");
        }
        assert_eq!(w.fake.committed(), vec!["f0", "f1"]);
        assert_eq!(w.group.state(), (false, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_dropped_mid_commit_puts_its_followers_back() {
        // The leader of the second commit (f0, carrying f1) is dropped while it commits.
        let w = world(Fake::gated());
        let (leader, mut calls) = formed(&w, &["f0", "f1"]).await;
        w.fake.open_one();
        leader.await.expect("join").expect("leader");
        until(&w, (true, 0)).await;
        let f2 = spawn(&w, vec![job("f2")]);
        until(&w, (true, 1)).await;
        let f0 = calls.remove(0);
        f0.abort();
        assert!(f0.await.expect_err("aborted").is_cancelled());
        w.fake.open();
        for c in calls.into_iter().chain([f2]) {
            tokio::time::timeout(Duration::from_secs(30), c)
                .await
                .expect("a follower was stranded")
                .expect("join")
                .expect("follower");
        }
        let committed = w.fake.committed();
        assert!(committed.contains(&"f1".to_owned()) && committed.contains(&"f2".to_owned()));
        assert_eq!(w.group.state(), (false, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_dropped_after_it_was_told_to_lead_hands_on() {
        let w = world(Fake::gated());
        let leader = spawn(&w, vec![job("lead")]);
        until(&w, (true, 0)).await;
        // f0 joins (one poll) and is then never polled again.
        let mut f0 = Box::pin(w.group.push(&w.fake, &w.signals, vec![job("f0")]));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(f0.as_mut().poll(&mut cx).is_pending());
        let f1 = spawn(&w, vec![job("f1")]);
        until(&w, (true, 2)).await;
        w.fake.open();
        leader.await.expect("join").expect("leader");
        // The leader handed on to f0, which is not polled: dropping it must pass the lead on.
        drop(f0);
        tokio::time::timeout(Duration::from_secs(30), f1)
            .await
            .expect("f1 was stranded")
            .expect("join")
            .expect("f1");
        assert_eq!(w.fake.committed(), vec!["lead", "f1"]);
        assert_eq!(w.group.state(), (false, 0));
    }

    #[tokio::test]
    async fn invalid_jobs_are_refused_before_they_join() {
        let w = world(Fake::default());
        let mut bad = job("ok");
        bad.queue = "no spaces".into();
        let e = w
            .group
            .push(&w.fake, &w.signals, vec![job("ok"), bad])
            .await
            .expect_err("invalid");
        assert!(matches!(e, Error::InvalidJob(_)));
        assert!(w.fake.batches().is_empty());
    }

    #[test]
    fn a_batch_stops_at_the_byte_limit_but_takes_one_call_at_least() {
        let member = |bytes: usize| Member {
            ticket: 0,
            jobs: vec![{
                let mut j = job("x");
                j.payload = vec![0; bytes];
                j
            }],
            reply: None,
        };
        let mut st = State {
            pending: vec![member(MAX_GROUP_BYTES + 1), member(1)],
            ..State::default()
        };
        assert_eq!(take_batch(&mut st).len(), 1);
        st.pending = vec![
            member(MAX_GROUP_BYTES / 2),
            member(MAX_GROUP_BYTES / 2),
            member(1),
        ];
        assert_eq!(take_batch(&mut st).len(), 2);
        assert_eq!(st.pending.len(), 1);
    }
}
