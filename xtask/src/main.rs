//! Backline's project tasks, run as `cargo xtask <task>` (matklad's xtask convention).
//!
//! One small binary with one file per task and no dependencies beyond std, so that it builds in
//! a second on a cold machine. The `xtask` alias lives in `.cargo/config.toml`.

mod bench;
mod ci;
mod services;
mod test;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const USAGE: &str = "\
cargo xtask <task> [args]

tasks:
  test [ARGS]            start the servers the providers' tests need, then
                         `cargo test --workspace --all-features [ARGS]` with
                         BACKLINE_REQUIRE_SERVICES=1 (the README's test command)
  ci                     fmt check, clippy -D warnings, rustdoc -D warnings, then `test`
  bench [ARGS]           `cargo run --release -p backline-bench -- [ARGS]`
                         (e.g. --quick, --provider memory; see `cargo xtask bench --help`)
  services [up|status] [NAME...]
                         check postgres, mysql, redis and rabbitmq on their loopback ports
                         (or BACKLINE_*_URL); `up` (the default) starts those that are down
  tidy                   repository checks (also run by `cargo test` as xtask's unit test)";

/// The result of a task: an error is one message for the user.
type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    let result = match task.as_deref() {
        Some("test") => test::run(&rest),
        Some("ci") => ci::run(&rest),
        Some("bench") => bench::run(&rest),
        Some("services") => services::run(&rest),
        Some("tidy") => tidy::run(&rest),
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(format!("unknown task `{other}`\n\n{USAGE}")),
        None => Err(format!("no task given\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root (the parent of `xtask/`).
fn project_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// A `cargo` command (the same cargo that runs xtask) in the repository root.
fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(project_root());
    cmd
}

/// Shows a command as a shell line, with the environment it sets.
fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| {
            v.map(|v| format!("{}={}", k.to_string_lossy(), quote(&v.to_string_lossy())))
        })
        .collect();
    let program = cmd.get_program().to_string_lossy();
    parts.push(
        Path::new(&*program)
            .file_name()
            .map_or(program.to_string(), |f| f.to_string_lossy().into_owned()),
    );
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    parts.join(" ")
}

fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=./:,@%+".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs a command to completion with inherited stdio; an unsuccessful exit is an error.
fn exec(cmd: &mut Command) -> Result {
    let line = display(cmd);
    eprintln!("$ {line}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run `{line}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{line}` failed ({status})"))
    }
}

/// Runs one named step of a task, announcing it and how long it took.
fn step(name: &str, f: impl FnOnce() -> Result) -> Result {
    eprintln!("\n==> {name}");
    let start = Instant::now();
    let r = f();
    let took = start.elapsed().as_secs_f64();
    match &r {
        Ok(()) => eprintln!("==> {name}: ok ({took:.1} s)"),
        Err(_) => eprintln!("==> {name}: FAILED ({took:.1} s)"),
    }
    r
}

/// Blocks this thread. xtask is a plain synchronous program: no Tokio worker is blocked here.
#[expect(
    clippy::disallowed_methods,
    reason = "xtask has no async runtime; the workspace ban protects Tokio workers"
)]
fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// Refuses arguments to a task that takes none.
fn no_args(task: &str, args: &[String]) -> Result {
    match args.first() {
        None => Ok(()),
        Some(a) => Err(format!(
            "`cargo xtask {task}` takes no arguments (got `{a}`)"
        )),
    }
}
