//! `cargo xtask services [up|status] [NAME...]`: the servers the provider tests talk to.
//!
//! Each server is checked by a TCP connect to its address: the host and port of its
//! `BACKLINE_*_URL` variable, or its loopback default. `up` (the default) starts the local
//! servers on their standard ports that are down, with the machine's own commands where the server is installed, or
//! with `docker compose` (the repository's `docker-compose.yml`) where it is not and a Docker
//! engine answers; then it waits, bounded, until each answers and fails naming any that does
//! not. It never stops or restarts a running server.

use std::fs::File;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{display, pause, project_root, Result};

/// How long a started server gets to answer.
const STARTUP: Duration = Duration::from_secs(60);
/// How long one start command may run (`rabbitmqctl await_startup` waits for the broker).
const COMMAND_LIMIT: Duration = Duration::from_secs(90);
/// How long one connection attempt may take.
const CONNECT: Duration = Duration::from_millis(500);

/// A server that provider tests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Server {
    /// PostgreSQL (SQL provider).
    Postgres,
    /// MariaDB (SQL provider, `mysql` feature).
    Mysql,
    /// Redis (Redis provider).
    Redis,
    /// RabbitMQ (RabbitMQ provider).
    Rabbitmq,
}

impl Server {
    /// Every server, in the order they are checked and started.
    pub(crate) const ALL: [Server; 4] = [
        Server::Postgres,
        Server::Mysql,
        Server::Redis,
        Server::Rabbitmq,
    ];

    /// The name on the command line and of the start log (`target/xtask/<name>.log`).
    fn name(self) -> &'static str {
        match self {
            Server::Postgres => "postgres",
            Server::Mysql => "mysql",
            Server::Redis => "redis",
            Server::Rabbitmq => "rabbitmq",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Server::Postgres => "PostgreSQL",
            Server::Mysql => "MariaDB",
            Server::Redis => "Redis",
            Server::Rabbitmq => "RabbitMQ",
        }
    }

    fn parse(s: &str) -> Option<Server> {
        match s {
            "postgres" | "postgresql" | "pg" => Some(Server::Postgres),
            "mysql" | "mariadb" => Some(Server::Mysql),
            "redis" => Some(Server::Redis),
            "rabbitmq" | "amqp" => Some(Server::Rabbitmq),
            _ => None,
        }
    }

    /// The variable the tests read the server's URL from.
    pub(crate) fn env_var(self) -> &'static str {
        match self {
            Server::Postgres => "BACKLINE_POSTGRES_URL",
            Server::Mysql => "BACKLINE_MYSQL_URL",
            Server::Redis => "BACKLINE_REDIS_URL",
            Server::Rabbitmq => "BACKLINE_AMQP_URL",
        }
    }

    /// The URL the tests use when the variable is unset (documented in CONTRIBUTING.md).
    pub(crate) fn default_url(self) -> &'static str {
        match self {
            Server::Postgres => "postgres://postgres@127.0.0.1:5432/test",
            Server::Mysql => "mysql://root@127.0.0.1:3306/test",
            Server::Redis => "redis://127.0.0.1:6379",
            Server::Rabbitmq => "amqp://guest:guest@127.0.0.1:5672/%2f",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Server::Postgres => 5432,
            Server::Mysql => 3306,
            Server::Redis => 6379,
            Server::Rabbitmq => 5672,
        }
    }

    /// The service in `docker-compose.yml`.
    fn compose_service(self) -> &'static str {
        match self {
            Server::Postgres => "postgres",
            Server::Mysql => "mariadb",
            Server::Redis => "redis",
            Server::Rabbitmq => "rabbitmq",
        }
    }

    /// The program whose presence means the server is installed on this machine.
    fn installed_program(self) -> &'static str {
        match self {
            Server::Postgres => "pg_ctlcluster",
            Server::Mysql => "/usr/sbin/mariadbd",
            Server::Redis => "redis-server",
            Server::Rabbitmq => "rabbitmq-server",
        }
    }

    /// The machine's commands that start the locally installed server.
    fn local_start(self) -> Result<Vec<Vec<String>>> {
        let argv = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Ok(match self {
            Server::Postgres => {
                // `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`
                let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
                    .map_err(|e| format!("PostgreSQL: cannot list /etc/postgresql: {e}"))?
                    .filter_map(|d| d.ok())
                    .map(|d| d.file_name().to_string_lossy().into_owned())
                    .collect();
                versions.sort();
                if versions.is_empty() {
                    return Err("PostgreSQL: no cluster under /etc/postgresql".into());
                }
                versions
                    .iter()
                    .map(|v| {
                        argv(&[
                            "pg_ctlcluster",
                            "--skip-systemctl-redirect",
                            v,
                            "main",
                            "start",
                        ])
                    })
                    .collect()
            }
            Server::Mysql => vec![argv(&[
                "start-stop-daemon",
                "--start",
                "--oknodo",
                "--background",
                "--exec",
                "/usr/sbin/mariadbd",
            ])],
            Server::Redis => vec![argv(&[
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
            ])],
            Server::Rabbitmq => vec![
                argv(&["rabbitmq-server", "-detached"]),
                argv(&["rabbitmqctl", "await_startup"]),
            ],
        })
    }
}

/// Where a server is expected, from its variable or the default.
struct Target {
    server: Server,
    host: String,
    port: u16,
    /// Set by the variable rather than defaulted.
    from_env: bool,
}

impl Target {
    fn of(server: Server) -> Result<Target> {
        let (url, from_env) = match std::env::var(server.env_var()) {
            Ok(url) if !url.trim().is_empty() => (url, true),
            _ => (server.default_url().to_owned(), false),
        };
        let (host, port) = host_port(&url).ok_or_else(|| {
            format!(
                "{}: cannot read a host from {}",
                server.label(),
                server.env_var()
            )
        })?;
        Ok(Target {
            server,
            host,
            port: port.unwrap_or(server.default_port()),
            from_env,
        })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Whether this is the machine's own server on its standard port: the one xtask can start.
    fn is_local_default(&self) -> bool {
        let loopback = self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        loopback && self.port == self.server.default_port()
    }

    /// Whether a TCP connection to the server succeeds now.
    fn answers(&self) -> bool {
        let addrs: Vec<SocketAddr> = match (self.host.as_str(), self.port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(_) => return false,
        };
        addrs
            .iter()
            .any(|a| TcpStream::connect_timeout(a, CONNECT).is_ok())
    }

    fn describe(&self) -> String {
        let origin = if self.from_env {
            self.server.env_var()
        } else {
            "default"
        };
        format!("{:<10} {:<22} ({origin})", self.server.label(), self.addr())
    }
}

/// The host and port of a URL such as `postgres://user:pw@127.0.0.1:5432/db` (no port: `None`).
fn host_port(url: &str) -> Option<(String, Option<u16>)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    Some((host.to_owned(), port))
}

pub(crate) fn run(args: &[String]) -> Result {
    let (mode, names) = match args.first().map(String::as_str) {
        Some("up") => ("up", &args[1..]),
        Some("status") => ("status", &args[1..]),
        _ => ("up", args),
    };
    let servers = if names.is_empty() {
        Server::ALL.to_vec()
    } else {
        names
            .iter()
            .map(|n| {
                Server::parse(n).ok_or_else(|| {
                    format!("unknown server `{n}` (postgres, mysql, redis or rabbitmq)")
                })
            })
            .collect::<Result<Vec<_>>>()?
    };
    if mode == "status" {
        status(&servers)
    } else {
        ensure(&servers)
    }
}

fn status(servers: &[Server]) -> Result {
    let mut down = Vec::new();
    for &s in servers {
        let t = Target::of(s)?;
        let up = t.answers();
        println!("{}  {}", t.describe(), if up { "up" } else { "DOWN" });
        if !up {
            down.push(s.label());
        }
    }
    if down.is_empty() {
        Ok(())
    } else {
        Err(format!("not answering: {}", down.join(", ")))
    }
}

/// Makes sure every server in `servers` answers, starting the loopback ones that are down.
pub(crate) fn ensure(servers: &[Server]) -> Result {
    let mut waiting: Vec<(Target, String)> = Vec::new();
    for &s in servers {
        let t = Target::of(s)?;
        if t.answers() {
            eprintln!("{}  up", t.describe());
            continue;
        }
        if !t.is_local_default() {
            return Err(format!(
                "{} does not answer on {} (from {}); xtask starts only the local server on its \
                 standard port: start this one, or unset the variable",
                s.label(),
                t.addr(),
                s.env_var()
            ));
        }
        eprintln!("{}  down: starting it", t.describe());
        let how = start(s)?;
        waiting.push((t, how));
    }
    if waiting.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + STARTUP;
    loop {
        waiting.retain(|(t, _)| {
            let up = t.answers();
            if up {
                eprintln!("{}  up", t.describe());
            }
            !up
        });
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let names: Vec<String> = waiting
                .iter()
                .map(|(t, how)| {
                    format!("{} on {} (started with {how})", t.server.label(), t.addr())
                })
                .collect();
            return Err(format!(
                "no answer within {} s from: {}",
                STARTUP.as_secs(),
                names.join("; ")
            ));
        }
        pause(Duration::from_millis(250));
    }
}

/// Starts one server; returns how, for the messages.
fn start(s: Server) -> Result<String> {
    let log = log_path(s);
    let commands = if is_installed(s.installed_program()) {
        s.local_start()?
    } else if docker_engine_answers() {
        vec![vec![
            "docker".to_owned(),
            "compose".to_owned(),
            "up".to_owned(),
            "--detach".to_owned(),
            s.compose_service().to_owned(),
        ]]
    } else {
        return Err(format!(
            "{} is down, `{}` is not installed and no Docker engine answers: install the server, \
             run `docker compose up -d` where Docker runs, or point {} at a server",
            s.label(),
            s.installed_program(),
            s.env_var()
        ));
    };
    let mut shown = Vec::new();
    for argv in &commands {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).current_dir(project_root());
        let line = display(&cmd);
        eprintln!("$ {line}    # output: {}", log.display());
        shown.push(format!("`{line}`"));
        match run_logged(&mut cmd, &log) {
            Ok(()) => {}
            // The wait below decides: report the failure and let it tell whether the server came up.
            Err(e) => eprintln!("warning: {}: {e}", s.label()),
        }
    }
    Ok(format!("{}; log: {}", shown.join(" then "), log.display()))
}

/// Runs a start command with its output appended to `log`, within [`COMMAND_LIMIT`].
///
/// Daemons inherit the log file rather than a pipe, so they never hold xtask's output open.
fn run_logged(cmd: &mut Command, log: &Path) -> Result {
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let err = file
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let deadline = Instant::now() + COMMAND_LIMIT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("it exited with {status}")),
            Ok(None) if Instant::now() >= deadline => {
                // Our own child, by its handle.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "it was still running after {} s; stopped it",
                    COMMAND_LIMIT.as_secs()
                ));
            }
            Ok(None) => pause(Duration::from_millis(100)),
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    }
}

fn log_path(s: Server) -> PathBuf {
    let dir = project_root().join("target").join("xtask");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{}.log", s.name()))
}

/// Whether `program` (a path, or a name looked up on `PATH`) exists.
fn is_installed(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn docker_engine_answers() -> bool {
    is_installed("docker")
        && Command::new("docker")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_and_port_are_read_from_urls() {
        let hp = host_port;
        assert_eq!(
            hp("postgres://postgres@127.0.0.1:5432/test"),
            Some(("127.0.0.1".into(), Some(5432)))
        );
        assert_eq!(
            hp("amqp://guest:guest@localhost:5673/%2f"),
            Some(("localhost".into(), Some(5673)))
        );
        assert_eq!(
            hp("redis://:secret@[::1]:6380"),
            Some(("::1".into(), Some(6380)))
        );
        assert_eq!(hp("redis://cache"), Some(("cache".into(), None)));
        assert_eq!(hp("mysql://root@:3306/test"), None);
        assert_eq!(hp("redis://host:port"), None);
    }
}
