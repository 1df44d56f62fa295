//! MySQL/MariaDB tests that break connections: each kills only the connections of its own
//! backend's pool (their ids read through that pool), never the shared server's others.

use std::time::Duration;

use backline_core::{JobManager, JobServer};
use backline_sql::{SqlBackend, SqlConfig};
use backline_testkit::{eventually, fast_config, Action, Recorder, Task, TaskHandler};

fn url() -> String {
    backline_testkit::service::MYSQL.url()
}

const POOL: u32 = 3;

async fn connect(table: &str) -> Option<SqlBackend> {
    let config = SqlConfig::new(url())
        .with_table(table)
        .with_max_connections(POOL)
        .with_connect_timeout(Duration::from_secs(5));
    let up = backline_testkit::service::MYSQL
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
            .unwrap_or_else(|e| panic!("connect to MySQL: {}", backline_core::ErrorChain(&e))),
    )
}

/// The server-side ids of every connection of `b`'s pool: all of them are checked out at
/// once, so each is a distinct connection of this pool.
async fn own_connection_ids(b: &SqlBackend) -> Vec<u64> {
    let pool = b.mysql_pool().expect("mysql");
    let mut held = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..POOL {
        let mut conn = pool.acquire().await.expect("acquire");
        let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
            .fetch_one(&mut *conn)
            .await
            .expect("connection id");
        ids.push(id);
        held.push(conn);
    }
    ids
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
        .enqueue_batch((0..60).map(|i| Task::new(format!("j{i}"), Action::Sleep(20))))
        .await
        .expect("enqueue");
    let victims = own_connection_ids(&a).await;
    assert_eq!(victims.len(), POOL as usize);
    let rec = Recorder::new();
    let running = JobServer::builder(a.clone())
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(fast_config())
        .queue("default", 4)
        .build()
        .expect("server")
        .start();
    rec.wait_for_attempts(5).await;
    let killer = b.mysql_pool().expect("mysql");
    let mut killed = 0;
    for id in &victims {
        // A connection the pool already closed is "unknown thread": not an error here.
        if sqlx::query(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
            .execute(killer)
            .await
            .is_ok()
        {
            killed += 1;
        }
    }
    assert!(killed > 0, "killed at least one of the pool's connections");
    eventually("every job to succeed", || async {
        let c = JobManager::new(b.clone()).counts(None).await.ok()?;
        (c.succeeded == ids.len() as u64).then_some(())
    })
    .await;
    running.shutdown().await.expect("shutdown");
    let mut ran: Vec<_> = rec.events().into_iter().map(|e| e.id).collect();
    ran.sort();
    ran.dedup();
    assert_eq!(ran.len(), ids.len(), "every job ran");
}
