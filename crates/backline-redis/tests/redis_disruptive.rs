//! Redis tests that restart the server. They run on their OWN `redis-server`, spawned as a
//! child process on a free port with the append-only file (`appendfsync always`) in a directory
//! under `target/`, killed by its own pid and restarted on the same port and directory: the
//! machine's shared Redis is never touched.
//!
//! Without a `redis-server` binary the tests print a loud notice and pass, unless
//! `BACKLINE_REQUIRE_SERVICES=1`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backline_core::{JobId, JobManager, JobServer};
use backline_redis::{RedisBackend, RedisConfig};
use backline_testkit::{eventually, fast_config, Action, Recorder, Task, TaskHandler};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A private `redis-server` with AOF on.
struct OwnRedis {
    port: u16,
    dir: PathBuf,
    child: Child,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address").port()
}

/// Starts `redis-server` and returns once it logs that it accepts connections.
async fn spawn_redis(port: u16, dir: &Path) -> Option<Child> {
    let spawned = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot start redis-server ({e}); install Redis");
            if backline_testkit::require_services() {
                panic!("{msg}");
            }
            eprintln!("\n!!!!!!!!!! SKIPPING REDIS RESTART TESTS: {msg} !!!!!!!!!!\n");
            return None;
        }
    };
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(backline_testkit::PATIENCE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Ready to accept connections") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(ready, Ok(true)),
        "redis-server on port {port} did not become ready"
    );
    // Keep draining its log so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Some(child)
}

impl OwnRedis {
    async fn start(name: &str) -> Option<OwnRedis> {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("backline-redis")
            .join(format!("{name}-{:08x}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir).expect("create the data directory");
        let port = free_port();
        let child = spawn_redis(port, &dir).await?;
        Some(OwnRedis { port, dir, child })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL, by its pid) and starts it again on the same port and data.
    async fn restart(&mut self) {
        self.child.start_kill().expect("kill our redis-server");
        self.child.wait().await.expect("reap our redis-server");
        self.child = spawn_redis(self.port, &self.dir)
            .await
            .expect("restart redis-server");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server killed and restarted mid-drain (AOF with `appendfsync always`): every job whose
/// enqueue was acknowledged, before, during or after the outage, still completes; an enqueue
/// while the server is down fails with a connection error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_job_completes_across_a_restart() {
    let Some(mut redis) = OwnRedis::start("restart").await else {
        return;
    };
    let config = RedisConfig::new(redis.url())
        .with_prefix("restart")
        .with_connect_timeout(Duration::from_secs(1))
        .with_reconnect_retries(1);
    let backend = RedisBackend::connect(config.clone())
        .await
        .expect("connect to our redis-server");
    let manager = JobManager::new(backend.clone());
    let acked: Arc<Mutex<Vec<JobId>>> = Arc::new(Mutex::new(
        manager
            .enqueue_batch((0..300).map(|i| Task::new(format!("b{i}"), Action::Sleep(5))))
            .await
            .expect("enqueue"),
    ));
    let rec = Recorder::new();
    let running = JobServer::builder(backend.clone())
        .register(TaskHandler::<Task>::new(rec.clone()))
        .config(fast_config())
        .queue("default", 8)
        .build()
        .expect("server")
        .start();

    // A producer that keeps enqueuing one by one and records what was acknowledged.
    let stop = backline_core::CancellationToken::new();
    let producer = {
        let (manager, acked, stop) = (manager.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u32;
            let mut failures = 0u32;
            while !stop.is_cancelled() {
                i += 1;
                match manager.enqueue(Task::ok(format!("p{i}"))).await {
                    Ok(id) => acked.lock().expect("acked").push(id),
                    Err(e) => {
                        assert!(e.is_retryable(), "not a connection error: {e}");
                        failures += 1;
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                            _ = stop.cancelled() => {}
                        }
                    }
                }
                tokio::task::yield_now().await;
            }
            failures
        })
    };

    rec.wait_for_attempts(50).await;
    redis.restart().await;
    // The producer gets acknowledgements again once the server is back.
    let after_restart = acked.lock().expect("acked").len();
    eventually("enqueues to be acknowledged again", || async {
        (acked.lock().expect("acked").len() > after_restart + 20).then_some(())
    })
    .await;
    stop.cancel();
    producer.await.expect("producer");

    let ids = acked.lock().expect("acked").clone();
    let other = JobManager::new(RedisBackend::connect(config).await.expect("connect again"));
    eventually("every acknowledged job to succeed", || async {
        let c = other.counts(None).await.ok()?;
        // An enqueue whose answer was lost in the crash may have stored its job: more
        // jobs than acknowledged may run, never fewer.
        (c.succeeded >= ids.len() as u64 && c.total() == c.succeeded).then_some(())
    })
    .await;
    running.shutdown().await.expect("shutdown");
    for id in &ids {
        let j = other.get(*id).await.expect("get").expect("kept");
        assert_eq!(j.state, backline_core::JobState::Succeeded);
    }
    let mut ran: Vec<JobId> = rec.events().into_iter().map(|e| e.id).collect();
    ran.sort();
    ran.dedup();
    assert!(
        ids.iter().all(|id| ran.binary_search(id).is_ok()),
        "every acknowledged job ran"
    );
}

/// While the server is down an enqueue fails at once with a connection error naming the
/// operation; after the restart the same handle works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_fails_clearly_while_redis_is_down_and_works_after() {
    let Some(mut redis) = OwnRedis::start("down").await else {
        return;
    };
    let backend = RedisBackend::connect(
        RedisConfig::new(redis.url())
            .with_prefix("down")
            .with_connect_timeout(Duration::from_secs(1))
            .with_reconnect_retries(0),
    )
    .await
    .expect("connect to our redis-server");
    let manager = JobManager::new(backend);
    let kept = manager.enqueue(Task::ok("before")).await.expect("enqueue");
    redis.child.start_kill().expect("kill our redis-server");
    redis.child.wait().await.expect("reap our redis-server");
    match manager.enqueue(Task::ok("while down")).await {
        Err(e @ backline_core::Error::Connection { .. }) => assert!(e.is_retryable()),
        other => panic!("expected a connection error, got {other:?}"),
    }
    redis.child = spawn_redis(redis.port, &redis.dir)
        .await
        .expect("restart redis-server");
    let after = eventually("the handle to reconnect", || async {
        manager.enqueue(Task::ok("after")).await.ok()
    })
    .await;
    for id in [kept, after] {
        assert!(manager.get(id).await.expect("get").is_some());
    }
}
