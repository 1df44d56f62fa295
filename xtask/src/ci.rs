//! `cargo xtask ci`: what `.ci/run` runs on every submission.
//!
//! Formatting, clippy with warnings denied, rustdoc with warnings denied, then `cargo xtask
//! test` (the README's test command: the whole workspace, all features, servers required).

use crate::{cargo, exec, no_args, step, Result};

pub(crate) fn run(args: &[String]) -> Result {
    no_args("ci", args)?;
    step("fmt", || {
        exec(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    step("clippy", || {
        exec(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step("doc", || {
        let mut flags = std::env::var("RUSTDOCFLAGS").unwrap_or_default();
        if !flags.is_empty() {
            flags.push(' ');
        }
        flags.push_str("-D warnings");
        exec(cargo().env("RUSTDOCFLAGS", flags).args([
            "doc",
            "--workspace",
            "--no-deps",
            "--all-features",
        ]))
    })?;
    // Nothing is printed after the test step: the run ends on its totals line.
    eprintln!("\n==> test");
    crate::test::run(&[])
}
