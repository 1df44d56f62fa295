//! `cargo xtask test [ARGS]`: the README's test command.
//!
//! Starts the servers that the providers' tests need, then builds and tests the whole workspace
//! once with all features (unit, integration and doc tests) with `BACKLINE_REQUIRE_SERVICES=1`,
//! so a provider test whose server is missing fails instead of skipping. `ARGS` go to
//! `cargo test` (a filter, `-- --nocapture`, …). Every test binary runs even when one fails
//! (`--no-fail-fast`), and the run ends with the totals over all of them.

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
    services::ensure(&needed)?;
    let mut cmd = cargo();
    cmd.env("BACKLINE_REQUIRE_SERVICES", "1")
        .args(["test", "--workspace", "--all-features", "--no-fail-fast"])
        .args(args);
    let line = display(&cmd);
    eprintln!("$ {line}");
    // cargo test prints one summary per test binary and none for the run: pass its output
    // through and add the totals.
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{line}`: {e}"))?;
    let mut totals = Totals::default();
    if let Some(out) = child.stdout.take() {
        let mut reader = BufReader::new(out);
        let mut stdout = std::io::stdout();
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
            totals.add(&String::from_utf8_lossy(&buf));
            let _ = stdout.write_all(&buf);
            let _ = stdout.flush();
            buf.clear();
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for `{line}`: {e}"))?;
    if totals.binaries > 0 {
        println!("{}", totals.line());
    }
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{line}` failed ({status})"))
    }
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
    /// Adds one line of output if it is a summary: `test result: ok. 3 passed; 0 failed; …`.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.binaries += 1;
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
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
}
