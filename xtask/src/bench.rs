//! `cargo xtask bench [ARGS]`: the benchmarks of `crates/backline-bench`, in a release build.
//!
//! `ARGS` go to the bench binary: `--quick` for a smoke run, `--provider NAME` for one provider,
//! `--help` for the rest. It prints a table and writes `target/bench/<provider>.json`.

use crate::{cargo, exec, Result};

pub(crate) fn run(args: &[String]) -> Result {
    exec(
        cargo()
            .args(["run", "--release", "--package", "backline-bench", "--"])
            .args(args),
    )
}
