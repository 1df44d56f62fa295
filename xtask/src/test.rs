//! `cargo xtask test [ARGS]`: the README's test command.
//!
//! Starts the servers that the providers' tests need, then builds and tests the whole workspace
//! once with all features (unit, integration and doc tests) with `BACKLINE_REQUIRE_SERVICES=1`,
//! so a provider test whose server is missing fails instead of skipping. `ARGS` go to
//! `cargo test` (a filter, `-- --nocapture`, …).

use crate::services::{self, Server};
use crate::{cargo, exec, Result};

/// The servers each provider's tests talk to. A provider adds its line when it lands, e.g.
/// `("backline-sql", &[Server::Postgres, Server::Mysql])`,
/// `("backline-redis", &[Server::Redis])`, `("backline-rabbitmq", &[Server::Rabbitmq])`.
const PROVIDERS: &[(&str, &[Server])] = &[("backline-memory", &[])];

/// The servers that `test` makes sure of, each once, in [`Server::ALL`] order.
pub(crate) fn needed() -> Vec<Server> {
    Server::ALL
        .into_iter()
        .filter(|s| PROVIDERS.iter().any(|(_, needs)| needs.contains(s)))
        .collect()
}

pub(crate) fn run(args: &[String]) -> Result {
    let needed = needed();
    if needed.is_empty() {
        eprintln!("no provider needs a server yet");
    } else {
        services::ensure(&needed)?;
    }
    let mut cmd = cargo();
    cmd.env("BACKLINE_REQUIRE_SERVICES", "1")
        .args(["test", "--workspace", "--all-features"])
        .args(args);
    exec(&mut cmd)
}
