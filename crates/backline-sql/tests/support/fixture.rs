//! A jobs table in every state, for the plan tests of all three databases: compiled by each
//! test binary on its own (`#[path = "support/fixture.rs"]` where `support` is not used).
#![allow(dead_code)]

use std::time::Duration;

use backline_core::{Backend, ClaimRequest, EnqueueOptions, Finish, JobManager, Outcome};
use backline_sql::{PlanMode, SqlBackend, Statement};
use backline_testkit::Task;

/// The name of the test jobs, as the claim filters on it.
pub(crate) const NAME: &str = "testkit.task";

/// The jobs [`fill_every_state`] enqueues to run now. The sizes matter: PostgreSQL, guessing
/// without statistics, preferred the `(queue, state)` index and a sort to the claim index from
/// about 50,000 ready rows on (when the claim index grows a level), as the issue saw at 100,000;
/// and without that index, a bitmap scan and a sort once [`LATER`] more rows joined them.
pub(crate) const JOBS: usize = 100_000;

/// The jobs [`fill_every_state`] schedules an hour ahead.
pub(crate) const LATER: usize = 90_000;

/// Fills the table through Backline, as an application would, and does nothing about its
/// statistics: [`JOBS`] jobs enqueued in batches of 1,000, of which 1,000 are then claimed and
/// finished as succeeded (kept) and 1,000 claimed and left running (leases of an hour), the
/// rest ready; and [`LATER`] scheduled an hour ahead.
pub(crate) async fn fill_every_state(b: &SqlBackend) {
    let manager = JobManager::new(b.clone());
    for chunk in 0..JOBS / 1000 {
        manager
            .enqueue_batch((0..1000).map(|i| Task::ok(format!("{chunk}-{i}"))))
            .await
            .expect("enqueue");
    }
    for chunk in 0..LATER / 1000 {
        let later = (0..1000)
            .map(|i| {
                manager
                    .prepare(
                        &Task::ok(format!("later-{chunk}-{i}")),
                        EnqueueOptions::new().delay(Duration::from_secs(3600)),
                    )
                    .expect("prepare")
            })
            .collect::<Vec<_>>();
        b.push(later).await.expect("enqueue delayed jobs");
    }
    let names = [NAME.to_owned()];
    for finish in [true, false] {
        let claimed = b
            .claim(ClaimRequest::new(
                backline_core::DEFAULT_QUEUE,
                &names,
                1000,
                Duration::from_secs(3600),
            ))
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1000);
        if finish {
            let done = claimed
                .iter()
                .map(|c| Finish::new(c.job.id, c.token, Outcome::Succeeded { keep: true }))
                .collect::<Vec<_>>();
            let applied = b.finish(&done).await.expect("finish");
            assert!(applied.iter().all(|a| *a));
        }
    }
}

/// The plans of the claim and of the finish in `mode`.
pub(crate) async fn claim_and_finish(b: &SqlBackend, mode: PlanMode) -> (String, String) {
    let names = [NAME.to_owned(), "other".to_owned()];
    let claim = b
        .explain(
            Statement::Claim {
                queue: backline_core::DEFAULT_QUEUE,
                names: &names,
            },
            mode,
        )
        .await
        .expect("explain the claim");
    let finish = b
        .explain(Statement::Finish, mode)
        .await
        .expect("explain the finish");
    (claim, finish)
}

/// The plans of the maintenance statements in `mode`, each with the index it must read:
/// promotion, lease recovery and retention.
pub(crate) async fn maintenance(b: &SqlBackend, mode: PlanMode) -> Vec<(String, String)> {
    let name = b.table().name().to_owned();
    let mut plans = Vec::new();
    for (statement, index) in [
        (Statement::Promote, "due"),
        (Statement::Recover, "lease"),
        (Statement::Prune, "finished"),
    ] {
        let plan = b
            .explain(statement, mode)
            .await
            .unwrap_or_else(|e| panic!("explain {statement:?}: {e}"));
        plans.push((format!("{name}_{index}"), plan));
    }
    plans
}
