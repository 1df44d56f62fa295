//! Disruptive RabbitMQ tests: they close their own connections from the broker's side
//! (`rabbitmqctl close_connection`, found by the connection name each test sets), never anyone
//! else's, and never restart the shared broker. Run with one test thread (`cargo xtask test`
//! runs each test binary's tests; this file holds one test).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline_core::{
    BackgroundJob, EnqueueOptions, JobContext, JobError, JobId, JobManager, JobServer,
};
use backline_rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use backline_testkit::{eventually, fast_config, Task, PATIENCE};
use tokio::sync::watch;

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

/// The handler of this test: records each attempt, then waits until the gate opens. The test
/// opens it only after the broker closed the worker's connection, so the jobs running then
/// are still unacknowledged when it closes, whatever the machine's speed.
struct GatedHandler {
    started: Arc<Mutex<Vec<(JobId, u32)>>>,
    count: watch::Sender<usize>,
    gate: watch::Receiver<bool>,
}

impl BackgroundJob for GatedHandler {
    type Args = Task;

    async fn execute(&self, _args: Task, ctx: JobContext) -> Result<(), JobError> {
        let n = {
            let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
            started.push((ctx.id(), ctx.attempt()));
            started.len()
        };
        self.count.send_replace(n);
        let mut gate = self.gate.clone();
        let _ = gate.wait_for(|open| *open).await;
        Ok(())
    }
}

/// Deletes every queue under the test's prefix when dropped, so a failed test cleans up too.
struct Cleanup {
    prefix: String,
    backends: Vec<RabbitMqBackend>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut queues: BTreeSet<String> = self
            .backends
            .iter()
            .flat_map(|b| b.declared_queues())
            .collect();
        let head = format!("{}.", self.prefix);
        queues.extend(broker_queues().into_iter().filter(|q| q.starts_with(&head)));
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(delete_queues(queues));
            }
        })
        .join();
    }
}

/// Every queue name on the broker (`rabbitmqctl list_queues`).
fn broker_queues() -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect(),
        _ => Vec::new(),
    }
}

/// The consumer's connection is closed by the broker while it drains a queue: the server
/// reconnects, re-declares and resumes (delay relay included), and every job runs; the jobs it
/// held come back and none is lost or dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_connection_killed_mid_drain_loses_no_job() {
    const CONCURRENCY: usize = 4;
    let prefix = format!("backline-test-{:016x}", fastrand::u64(..));
    let worker_name = format!("{prefix}-worker");
    let Some(producer) = connect(&prefix, &format!("{prefix}-producer")).await else {
        return;
    };
    let Some(worker) = connect(&prefix, &worker_name).await else {
        return;
    };
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
        backends: vec![producer.clone(), worker.clone()],
    };
    let manager = JobManager::new(Arc::new(producer.clone()));
    let mut ids: Vec<JobId> = manager
        .enqueue_batch((0..300).map(|i| Task::ok(format!("j{i}"))))
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
    let started = Arc::new(Mutex::new(Vec::new()));
    let (count, mut counted) = watch::channel(0usize);
    let (gate, closed) = watch::channel(false);
    let running = JobServer::builder(Arc::new(worker.clone()))
        .register(GatedHandler {
            started: started.clone(),
            count,
            gate: closed,
        })
        .config(fast_config())
        .queue("default", CONCURRENCY)
        .configure(|c| c.claim_batch = 8)
        .build()
        .expect("server")
        .start();
    // Every slot holds a job that waits at the gate: nothing can finish before the close.
    tokio::time::timeout(PATIENCE, counted.wait_for(|n| *n >= CONCURRENCY))
        .await
        .expect("the first jobs to start")
        .expect("the handler is alive");
    // The jobs running now are unacknowledged, blocked at the gate, when the broker closes
    // the connection.
    let before: Vec<(JobId, u32)> = started.lock().expect("lock").clone();
    close_connection(&pid).await;
    gate.send_replace(true);
    assert!(before.len() <= CONCURRENCY, "{before:?}");
    let want: BTreeSet<JobId> = ids.iter().copied().collect();
    let events = || started.lock().expect("lock").clone();
    eventually("every job to run and every queue to empty", || async {
        let ran: BTreeSet<JobId> = events().iter().map(|e| e.0).collect();
        let c = manager.counts(None).await.expect("counts");
        (ran == want && c.total() == 0).then_some(())
    })
    .await;
    running.shutdown().await.expect("shutdown");
    let c = manager.counts(None).await.expect("counts");
    assert_eq!(c.dead, 0, "{c:?}");
    // The jobs the closed connection held came back (redelivered, their attempt counted).
    let all = events();
    for (id, attempt) in &before {
        assert!(
            all.iter().any(|(i, a)| i == id && a > attempt),
            "job {id} held by the closed connection ran again: {all:?}"
        );
    }
    let new_pid = connection_pid(&worker_name).await.expect("reconnected");
    assert_ne!(new_pid, pid, "a new connection");
    producer.close().await;
    worker.close().await;
}

async fn delete_queues(queues: BTreeSet<String>) {
    use backline_rabbitmq::lapin::{options::QueueDeleteOptions, Connection, ConnectionProperties};
    let Ok(conn) = Connection::connect(&url(), ConnectionProperties::default()).await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "test clean-up".into()).await;
}
