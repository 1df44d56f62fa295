//! PostgreSQL tests that break connections: each kills only the connections of its own
//! backend (found by `application_name`, which names the table), never the shared server.
//! Run in their own binary (one test thread is not required: nothing here is global).

use std::time::Duration;

use backline_core::{JobManager, JobServer, JobState};
use backline_sql::{SqlBackend, SqlConfig};
use backline_testkit::{eventually, fast_config, Recorder, Task, TaskHandler};

fn url() -> String {
    backline_testkit::service::POSTGRES.url()
}

async fn connect(table: &str) -> Option<SqlBackend> {
    // Polling would hide a dead listener: make it hourly.
    let config = SqlConfig::new(url())
        .with_table(table)
        .with_max_connections(3)
        .with_poll_interval(Duration::from_secs(3600))
        .with_connect_timeout(Duration::from_secs(5));
    let up = backline_testkit::service::POSTGRES
        .reachable(|url| async move {
            let probe = SqlConfig::new(url)
                .with_max_connections(1)
                .with_migrate_on_connect(false)
                .with_connect_timeout(Duration::from_secs(5));
            SqlBackend::connect(probe).await.map(|_| ())
        })
        .await;
    if !up {
        return None;
    }
    Some(
        SqlBackend::connect(config)
            .await
            .unwrap_or_else(|e| panic!("connect to PostgreSQL: {}", backline_core::ErrorChain(&e))),
    )
}

async fn listener_pids(b: &SqlBackend, table: &str) -> Vec<i32> {
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
        .bind(format!("backline-listener:{table}"))
        .fetch_all(b.pg_pool().expect("postgres"))
        .await
        .expect("read pg_stat_activity")
}

/// A push from another process wakes the server through NOTIFY alone; after its LISTEN
/// connection is killed, the listener comes back by itself and the next push wakes it again.
#[tokio::test]
async fn a_killed_listen_connection_comes_back_and_wakes_the_server_again() {
    let table = format!(
        "backline_t_{}_{:08x}",
        chrono::Utc::now().timestamp(),
        fastrand::u32(..)
    );
    let Some(a) = connect(&table).await else {
        return;
    };
    let b = connect(&table).await.expect("second pool");
    let rec = Recorder::new();
    let running = JobServer::builder(a.clone())
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(fast_config())
        .configure(|c| {
            c.poll_interval = Duration::from_secs(3600);
            c.maintenance_interval = Duration::from_secs(3600);
        })
        .build()
        .expect("server")
        .start();
    // Pushed through the other pool: only NOTIFY can wake `a`'s server.
    let other = JobManager::new(b.clone());
    let first = other.enqueue(Task::ok("first")).await.expect("enqueue");
    rec.wait_for_attempts(1).await;

    // Both backends' listeners (this test's own connections).
    let before = listener_pids(&b, &table).await;
    assert_eq!(before.len(), 2, "one listener per backend: {before:?}");
    let killed: Vec<bool> =
        sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS p(pid)")
            .bind(&before)
            .fetch_all(b.pg_pool().expect("postgres"))
            .await
            .expect("terminate the listeners");
    assert_eq!(killed, [true, true]);
    eventually("the listeners to reconnect", || async {
        let now = listener_pids(&b, &table).await;
        (now.len() == 2 && now.iter().all(|p| !before.contains(p))).then_some(())
    })
    .await;

    let second = other.enqueue(Task::ok("second")).await.expect("enqueue");
    rec.wait_for_attempts(2).await;
    running.shutdown().await.expect("shutdown");
    for id in [first, second] {
        let j = other.get(id).await.expect("get").expect("kept");
        assert_eq!(j.state, JobState::Succeeded);
    }
    assert_eq!(rec.tags(), ["first", "second"]);
}

/// Killing every connection of the backend's pool while a server drains loses no job: the
/// pool reconnects, the server backs off and goes on, and a claim whose answer was lost comes
/// back when its lease expires.
#[tokio::test]
async fn killed_pool_connections_lose_no_job() {
    let table = format!(
        "backline_t_{}_{:08x}",
        chrono::Utc::now().timestamp(),
        fastrand::u32(..)
    );
    let Some(a) = connect(&table).await else {
        return;
    };
    let b = connect(&table).await.expect("second pool");
    let manager = JobManager::new(a.clone());
    let ids = manager
        .enqueue_batch(
            (0..60).map(|i| Task::new(format!("j{i}"), backline_testkit::Action::Sleep(20))),
        )
        .await
        .expect("enqueue");
    let rec = Recorder::new();
    let running = JobServer::builder(a.clone())
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(fast_config())
        .queue("default", 4)
        .build()
        .expect("server")
        .start();
    rec.wait_for_attempts(5).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
        WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind(format!("backline:{table}"))
    .fetch_all(b.pg_pool().expect("postgres"))
    .await
    .expect("terminate the pool's connections");
    // `b`'s pool has the same name: its other connections go too.
    assert!(!killed.is_empty());
    let other = JobManager::new(connect(&table).await.expect("third pool"));
    eventually("every job to succeed", || async {
        let c = other.counts(None).await.ok()?;
        (c.succeeded == ids.len() as u64).then_some(())
    })
    .await;
    running.shutdown().await.expect("shutdown");
    let mut ran: Vec<_> = rec.events().into_iter().map(|e| e.id).collect();
    ran.sort();
    ran.dedup();
    assert_eq!(ran.len(), ids.len(), "every job ran");
}
