//! Disruptive RabbitMQ tests: they close their own connections from the broker's side
//! (`rabbitmqctl close_connection`, found by the connection name each test sets), or cut the
//! network between their own handle and the broker with a TCP relay of their own (the broker
//! "down", or "stalled": no answer, as under a memory alarm). They never touch anyone else's
//! connection and never restart or block the shared broker.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline_core::{
    Backend, BackgroundJob, ClaimRequest, EnqueueOptions, Error, JobArgs, JobContext, JobError,
    JobId, JobManager, JobServer,
};
use backline_rabbitmq::{RabbitMqBackend, RabbitMqConfig};
use backline_testkit::{eventually, fast_config, Task, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn url() -> String {
    backline_testkit::service::RABBITMQ.url()
}

async fn connect(prefix: &str, name: &str) -> Option<RabbitMqBackend> {
    let config = RabbitMqConfig::new(url())
        .with_prefix(prefix)
        .with_connection_name(name);
    let up = backline_testkit::service::RABBITMQ
        .reachable(|url| async move {
            let probe = RabbitMqConfig::new(url)
                .with_prefix(format!("{prefix}-probe"))
                .with_reconnect_attempts(0);
            RabbitMqBackend::connect(probe).await?.close().await;
            Ok::<_, backline_core::Error>(())
        })
        .await;
    if !up {
        return None;
    }
    Some(
        RabbitMqBackend::connect(config)
            .await
            .expect("connect to RabbitMQ"),
    )
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

/// What the relay does with the broker's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Both ways, as a plain connection.
    Up,
    /// Every connection through the relay is closed, and new ones are closed at once.
    Down,
    /// The broker's bytes are held back (not lost) until the link is up again.
    Stalled,
}

/// A TCP relay between this test's handle and the broker, to take the broker away from this
/// handle alone.
struct Relay {
    /// The broker URL with the relay's address in place of the broker's.
    url: String,
    link: watch::Sender<Link>,
}

/// An `amqp://user:pass@host:port/vhost` URL split around its `host:port` (port 5672 if none).
fn split_authority(url: &str) -> (String, String, String) {
    let start = url
        .find('@')
        .map_or_else(|| url.find("//").map_or(0, |i| i + 2), |i| i + 1);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let mut hostport = url[start..end].to_owned();
    if !hostport.contains(':') {
        hostport.push_str(":5672");
    }
    (url[..start].to_owned(), hostport, url[end..].to_owned())
}

impl Relay {
    async fn start() -> Relay {
        let (head, broker, tail) = split_authority(&url());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("relay address");
        let (link, watching) = watch::channel(Link::Up);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *watching.borrow() == Link::Down {
                    continue; // dropped: closed at once
                }
                let Ok(upstream) = TcpStream::connect(&broker).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::spawn(pump(cr, uw, watching.clone(), false));
                tokio::spawn(pump(ur, cw, watching.clone(), true));
            }
        });
        Relay {
            url: format!("{head}{addr}{tail}"),
            link,
        }
    }

    fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

/// Copies `from` into `to` until either closes or the link goes down; the broker's side
/// (`from_broker`) waits while the link is stalled.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
    from_broker: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = link.wait_for(|l| *l == Link::Down) => return,
        };
        if from_broker {
            match link.wait_for(|l| *l != Link::Stalled).await {
                Ok(l) if *l == Link::Up => {}
                _ => return,
            }
        }
        if *link.borrow() == Link::Down || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Every ready job of `Task` in the prefix's `default` queue, claimed (and held) by `b`.
async fn claim_all(b: &RabbitMqBackend) -> BTreeSet<JobId> {
    let names = vec![Task::NAME.to_owned()];
    let claimed = b
        .claim(ClaimRequest {
            queue: "default",
            names: &names,
            limit: 1000,
            lease: Duration::from_secs(30),
        })
        .await
        .expect("claim");
    claimed.into_iter().map(|c| c.job.id).collect()
}

/// A handle on a fresh prefix connected straight to the broker, and one through a relay of
/// its own, configured by `configure`; their queues are deleted when the [`Cleanup`] drops.
/// `None` when the broker is unreachable (and services are not required).
async fn through_relay(
    configure: impl FnOnce(RabbitMqConfig) -> RabbitMqConfig,
) -> Option<(Relay, RabbitMqBackend, RabbitMqBackend, Cleanup)> {
    let prefix = format!("backline-test-{:016x}", fastrand::u64(..));
    let direct = connect(&prefix, &format!("{prefix}-direct")).await?;
    let relay = Relay::start().await;
    let through = RabbitMqBackend::connect(configure(
        RabbitMqConfig::new(&relay.url).with_prefix(&prefix),
    ))
    .await
    .expect("connect through the relay");
    let cleanup = Cleanup {
        prefix,
        backends: vec![direct.clone(), through.clone()],
    };
    Some((relay, direct, through, cleanup))
}

/// While the broker is unreachable, `enqueue` fails with a connection error (after its
/// reconnect attempts) instead of hanging or pretending; every job it confirmed before is
/// still there, and enqueueing works again once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_fails_clearly_while_the_broker_is_down_and_loses_nothing_it_confirmed() {
    let Some((relay, direct, through, _cleanup)) = through_relay(|c| {
        c.with_reconnect_attempts(2)
            .with_connect_timeout(Duration::from_secs(2))
    })
    .await
    else {
        return;
    };
    let manager = JobManager::new(Arc::new(through.clone()));
    let mut confirmed: BTreeSet<JobId> = manager
        .enqueue_batch((0..20).map(|i| Task::ok(format!("before{i}"))))
        .await
        .expect("enqueue")
        .into_iter()
        .collect();
    relay.set(Link::Down);
    let down = tokio::time::timeout(PATIENCE, manager.enqueue(Task::ok("while down"))).await;
    match down.expect("enqueue hung while the broker was down") {
        Err(e @ Error::Connection { .. }) => {
            assert!(!e.to_string().contains("guest:guest"), "password in {e}");
        }
        other => panic!("expected a connection error, got {other:?}"),
    }
    relay.set(Link::Up);
    confirmed.insert(
        manager
            .enqueue(Task::ok("after"))
            .await
            .expect("enqueue after the broker came back"),
    );
    // Read through the other (direct) handle: exactly the confirmed jobs are there.
    let found = claim_all(&direct).await;
    assert_eq!(found, confirmed);
    through.close().await;
    direct.close().await;
}

/// A broker that stops answering (no confirm arrives, as under a memory alarm that blocks
/// publishers) fails `enqueue` with a time-out after `with_confirm_timeout`, not a hang; once
/// it answers again, the handle works on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_publish_times_out_and_the_handle_recovers() {
    let Some((relay, direct, through, _cleanup)) =
        through_relay(|c| c.with_confirm_timeout(Duration::from_millis(300))).await
    else {
        return;
    };
    let manager = JobManager::new(Arc::new(through.clone()));
    // Declares the work queue while the broker answers.
    let first = manager.enqueue(Task::ok("first")).await.expect("enqueue");
    relay.set(Link::Stalled);
    // A hang fails the test (after PATIENCE) instead of blocking it.
    let stalled = tokio::time::timeout(PATIENCE, manager.enqueue(Task::ok("unconfirmed"))).await;
    match stalled.expect("enqueue hung although the confirm time-out passed") {
        Err(Error::Timeout { after, .. }) => assert_eq!(after, Duration::from_millis(300)),
        other => panic!("expected a time-out, got {other:?}"),
    }
    relay.set(Link::Up);
    let last = manager
        .enqueue(Task::ok("last"))
        .await
        .expect("enqueue after the broker answers again");
    // The timed-out message reached the broker (only its confirm was held back): a time-out
    // means "unknown", so it may be stored; the confirmed ones certainly are.
    let found = claim_all(&direct).await;
    assert!(found.contains(&first) && found.contains(&last), "{found:?}");
    assert!(found.len() <= 3, "{found:?}");
    through.close().await;
    direct.close().await;
}
