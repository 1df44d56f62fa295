//! `cargo xtask test [ARGS]`: the README's test command.
//!
//! Starts the servers that the providers' tests need, then builds and tests the whole workspace
//! once with all features (unit, integration and doc tests) with `BACKLINE_REQUIRE_SERVICES=1`,
//! so a provider test whose server is missing fails instead of skipping. Every test runs even
//! when one fails, and the run ends with the totals over all of them.
//!
//! With `cargo-nextest` installed (it is on the CI machines) the tests run under
//! `cargo nextest run`: every test in its own process, tests of different binaries in parallel,
//! the disruptive binaries in a serial group, and a time-out on every test
//! (`.config/nextest.toml`); doc tests, which nextest does not run, follow with
//! `cargo test --doc`. Without it, one `cargo test`. Each step prints how long it took. `ARGS`
//! go to the test runner (a filter, …); with `ARGS` the doc tests are left out.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use crate::services::{self, Server};
use crate::{cargo, display, Result};

/// The servers each provider's tests talk to (SQLite is embedded). A provider adds its line
/// when its tests land, e.g. `("backline-redis", &[Server::Redis])`,
/// `("backline-rabbitmq", &[Server::Rabbitmq])`.
const PROVIDERS: &[(&str, &[Server])] = &[
    ("backline-memory", &[]),
    ("backline-sql", &[Server::Postgres, Server::Mysql]),
    ("backline-redis", &[Server::Redis]),
    ("backline-rabbitmq", &[Server::Rabbitmq]),
];

/// The servers that `test` makes sure of, each once, in [`Server::ALL`] order.
pub(crate) fn needed() -> Vec<Server> {
    Server::ALL
        .into_iter()
        .filter(|s| PROVIDERS.iter().any(|(_, needs)| needs.contains(s)))
        .collect()
}

pub(crate) fn run(args: &[String]) -> Result {
    let needed = needed();
    crate::step("services", || services::ensure(&needed))?;
    if !nextest_available() {
        eprintln!(
            "cargo-nextest is not installed: running `cargo test` (slower, one process per binary)"
        );
        return crate::step("test", || {
            let mut cmd = cargo();
            cmd.env("BACKLINE_REQUIRE_SERVICES", "1")
                .args(["test", "--workspace", "--all-features", "--no-fail-fast"])
                .args(args);
            counted(&mut cmd, Stream::Stdout).map(|_| ())
        });
    }
    crate::step("build tests", || {
        crate::exec(cargo().args([
            "nextest",
            "run",
            "--workspace",
            "--all-features",
            "--no-run",
        ]))
    })?;
    let mut totals = Totals::default();
    let tests = crate::step("test (nextest)", || {
        let mut cmd = cargo();
        cmd.env("BACKLINE_REQUIRE_SERVICES", "1")
            .args([
                "nextest",
                "run",
                "--workspace",
                "--all-features",
                "--no-fail-fast",
            ])
            .args(args);
        let (t, r) = counted_totals(&mut cmd, Stream::Stderr);
        totals.merge(&t);
        r
    });
    let docs = if args.is_empty() {
        crate::step("doc tests", || {
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--all-features", "--doc"]);
            let (t, r) = counted_totals(&mut cmd, Stream::Stdout);
            totals.merge(&t);
            r
        })
    } else {
        Ok(())
    };
    if totals.binaries > 0 {
        println!("{}", totals.line());
    }
    tests.and(docs)
}

/// Whether `cargo nextest` runs here.
fn nextest_available() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Which output of a runner carries its summaries.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Runs a test runner, passing its output through, and prints the totals of its summaries.
fn counted(cmd: &mut std::process::Command, stream: Stream) -> Result<Totals> {
    let (totals, r) = counted_totals(cmd, stream);
    if totals.binaries > 0 {
        println!("{}", totals.line());
    }
    r.map(|()| totals)
}

/// Runs a test runner, passing its output through and adding up its summary lines.
fn counted_totals(cmd: &mut std::process::Command, stream: Stream) -> (Totals, Result) {
    let line = display(cmd);
    eprintln!("$ {line}");
    match stream {
        Stream::Stdout => cmd.stdout(Stdio::piped()),
        Stream::Stderr => cmd.stderr(Stdio::piped()),
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (Totals::default(), Err(format!("cannot run `{line}`: {e}"))),
    };
    let mut totals = Totals::default();
    let out: Option<Box<dyn std::io::Read>> = match stream {
        Stream::Stdout => child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read>),
        Stream::Stderr => child
            .stderr
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read>),
    };
    if let Some(out) = out {
        let mut reader = BufReader::new(out);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
            totals.add(&String::from_utf8_lossy(&buf));
            match stream {
                Stream::Stdout => {
                    let mut o = std::io::stdout();
                    let _ = o.write_all(&buf);
                    let _ = o.flush();
                }
                Stream::Stderr => {
                    let mut o = std::io::stderr();
                    let _ = o.write_all(&buf);
                    let _ = o.flush();
                }
            }
            buf.clear();
        }
    }
    let result = match child.wait() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("`{line}` failed ({status})")),
        Err(e) => Err(format!("cannot wait for `{line}`: {e}")),
    };
    (totals, result)
}

/// The sum of cargo test's `test result:` lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    binaries: u64,
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds one line of output if it is a summary: cargo test's `test result: ok. 3 passed;
    /// 0 failed; …` or nextest's `Summary [ 12.3s] 40 tests run: 39 passed, 1 failed, 2 skipped`.
    fn add(&mut self, line: &str) {
        let line = line.trim();
        let rest = if let Some(rest) = line.strip_prefix("test result: ") {
            rest
        } else if let Some(rest) = line
            .strip_prefix("Summary [")
            .and_then(|r| r.split_once("tests run:"))
            .map(|(_, r)| r)
        {
            rest
        } else {
            return;
        };
        self.binaries += 1;
        for part in rest.split(['.', ';', ',']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" | "skipped" => self.ignored += n,
                _ => {}
            }
        }
    }

    /// Adds another runner's totals.
    fn merge(&mut self, other: &Totals) {
        self.binaries += other.binaries;
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }

    /// `tests: 120 passed, 0 failed, 1 skipped` (ignored tests), over all test binaries.
    fn line(&self) -> String {
        let mut s = format!("tests: {} passed, {} failed", self.passed, self.failed);
        if self.ignored > 0 {
            s.push_str(&format!(", {} skipped", self.ignored));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn summaries_are_added_up() {
        let mut t = Totals::default();
        t.add("test result: ok. 35 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 6.56s\n");
        t.add("test result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s");
        t.add("test a_job_runs_exactly_once ... ok");
        assert_eq!(
            t,
            Totals {
                binaries: 2,
                passed: 37,
                failed: 1,
                ignored: 1
            }
        );
        assert_eq!(t.line(), "tests: 37 passed, 1 failed, 1 skipped");
    }

    #[test]
    fn nextest_summaries_are_added_up() {
        let mut t = Totals::default();
        t.add("     Summary [ 212.481s] 310 tests run: 308 passed, 2 failed, 1 skipped\n");
        t.add("        PASS [   0.012s] backline-core provider::tests::time_arithmetic_saturates");
        assert_eq!(
            t,
            Totals {
                binaries: 1,
                passed: 308,
                failed: 2,
                ignored: 1
            }
        );
    }
}
