//! Disruptive RabbitMQ tests: they close their own connections from the broker's side
//! (`rabbitmqctl close_connection`, found by the connection name each test sets), never anyone
//! else's, and never restart the shared broker. Run with one test thread (`cargo xtask test`
//! runs each test binary's tests; this file holds one test).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use backline_core::{EnqueueOptions, JobId, JobManager, JobServer};
use backline_rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use backline_testkit::{eventually, fast_config, Action, Recorder, Task, TaskHandler};

fn url() -> String {
    std::env::var("BACKLINE_AMQP_URL").unwrap_or_else(|_| backline_rabbitmq::DEFAULT_URL.to_owned())
}

async fn connect(prefix: &str, name: &str) -> Option<RabbitMqBackend> {
    let config = RabbitMqConfig::new(url())
        .with_prefix(prefix)
        .with_connection_name(name);
    match RabbitMqBackend::connect(config).await {
        Ok(b) => Some(b),
        Err(e) => {
            let msg = format!(
                "RabbitMQ at {} is unreachable ({e}); start it (`cargo xtask services up`)",
                backline_core::redact_url(&url())
            );
            if backline_testkit::require_services() {
                panic!("{msg}");
            }
            eprintln!("\n!!!!!!!!!! SKIPPING RABBITMQ DISRUPTIVE TESTS: {msg} !!!!!!!!!!\n");
            None
        }
    }
}

/// The broker's pid of the connection named `name` (`rabbitmqctl list_connections`).
async fn connection_pid(name: &str) -> Option<String> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .await
        .expect("run rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl list_connections failed");
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_owned)
}

/// Closes our own connection (broker pid `pid`) from the broker's side.
async fn close_connection(pid: &str) {
    let status = tokio::process::Command::new("rabbitmqctl")
        .args(["close_connection", pid, "backline disruptive test"])
        .status()
        .await
        .expect("run rabbitmqctl");
    assert!(status.success(), "rabbitmqctl close_connection {pid}");
}

/// The consumer's connection is closed by the broker while it drains a queue: the server
/// reconnects, re-declares and resumes (delay relay included), and every job runs; the jobs it
/// held come back and none is lost or dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_connection_killed_mid_drain_loses_no_job() {
    let prefix = format!("backline-test-{:016x}", fastrand::u64(..));
    let worker_name = format!("{prefix}-worker");
    let Some(producer) = connect(&prefix, &format!("{prefix}-producer")).await else {
        return;
    };
    let Some(worker) = connect(&prefix, &worker_name).await else {
        return;
    };
    let manager = JobManager::new(Arc::new(producer.clone()));
    let mut ids: Vec<JobId> = manager
        .enqueue_batch((0..300).map(|i| Task::new(format!("j{i}"), Action::Sleep(50))))
        .await
        .expect("enqueue");
    ids.extend(
        manager
            .enqueue_batch_with(
                (0..5).map(|i| Task::ok(format!("later{i}"))),
                EnqueueOptions::new().delay(Duration::from_millis(1500)),
            )
            .await
            .expect("enqueue delayed"),
    );
    // Look the connection up first: rabbitmqctl takes a while to start.
    let pid = eventually(&format!("connection {worker_name} to be listed"), || {
        connection_pid(&worker_name)
    })
    .await;
    let rec = Recorder::new();
    let running = JobServer::builder(Arc::new(worker.clone()))
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(fast_config())
        .queue("default", 4)
        .configure(|c| c.claim_batch = 8)
        .build()
        .expect("server")
        .start();
    rec.wait_for_attempts(40).await;
    close_connection(&pid).await;
    assert!(
        rec.events().len() < 300,
        "the connection closed mid-drain (else the jobs are too fast for this test)"
    );
    let want: BTreeSet<JobId> = ids.iter().copied().collect();
    eventually("every job to run and every queue to empty", || async {
        let ran: BTreeSet<JobId> = rec.events().iter().map(|e| e.id).collect();
        let c = manager.counts(None).await.expect("counts");
        (ran == want && c.total() == 0).then_some(())
    })
    .await;
    running.shutdown().await.expect("shutdown");
    let c = manager.counts(None).await.expect("counts");
    assert_eq!(c.dead, 0, "{c:?}");
    // The jobs the closed connection held came back (redelivered, their attempt counted).
    let again = rec.events().iter().filter(|e| e.attempt > 1).count();
    eprintln!("{again} jobs held by the closed connection ran again");
    assert!(again >= 1, "the closed connection held running jobs");
    let new_pid = connection_pid(&worker_name).await.expect("reconnected");
    assert_ne!(new_pid, pid, "a new connection");
    let mut queues: BTreeSet<String> = producer.declared_queues().into_iter().collect();
    queues.extend(worker.declared_queues());
    producer.close().await;
    worker.close().await;
    delete_queues(queues).await;
}

async fn delete_queues(queues: BTreeSet<String>) {
    use backline_rabbitmq::lapin::{options::QueueDeleteOptions, Connection, ConnectionProperties};
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("connect for the clean-up");
    let ch = conn.create_channel().await.expect("channel");
    for q in queues {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete a queue");
    }
    let _ = conn.close(200, "test clean-up".into()).await;
}
