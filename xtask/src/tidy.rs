//! `cargo xtask tidy`: repository checks that no compiler makes.
//!
//! They also run as xtask's unit test, so `cargo xtask test` (and CI) runs them.
//!
//! - every package opts into the workspace lints (`[lints] workspace = true`);
//! - no test is marked ignored: CI would not run it, and a provider test must run or fail.

use std::path::{Path, PathBuf};

use crate::{no_args, project_root, Result};

pub(crate) fn run(args: &[String]) -> Result {
    no_args("tidy", args)?;
    let problems = check(&project_root());
    if problems.is_empty() {
        eprintln!("tidy: ok");
        Ok(())
    } else {
        Err(format!("tidy:\n- {}", problems.join("\n- ")))
    }
}

/// Every problem found under `root`, one line each.
fn check(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let mut manifests = vec![root.join("Cargo.toml"), root.join("xtask/Cargo.toml")];
    if let Ok(dirs) = std::fs::read_dir(root.join("crates")) {
        let mut crates: Vec<PathBuf> = dirs
            .filter_map(|d| d.ok())
            .map(|d| d.path().join("Cargo.toml"))
            .filter(|p| p.is_file())
            .collect();
        crates.sort();
        manifests.extend(crates);
    }
    for manifest in &manifests {
        let text = std::fs::read_to_string(manifest).unwrap_or_default();
        if !opts_into_workspace_lints(&text) {
            problems.push(format!(
                "{}: add `[lints]` with `workspace = true`",
                relative(root, manifest)
            ));
        }
    }
    // Spelled in two pieces so that this file does not find itself.
    let ignored = ["#[", "ignore"].concat();
    let mut sources = Vec::new();
    for dir in ["src", "crates", "tests", "examples", "xtask"] {
        rust_files(&root.join(dir), &mut sources);
    }
    sources.sort();
    for file in &sources {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with(&ignored) {
                problems.push(format!(
                    "{}:{}: an ignored test never runs in CI; make it run or delete it",
                    relative(root, file),
                    i + 1
                ));
            }
        }
    }
    problems
}

fn opts_into_workspace_lints(manifest: &str) -> bool {
    let mut in_lints = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_lints = line == "[lints]";
        } else if in_lints && line.replace(' ', "") == "workspace=true" {
            return true;
        }
    }
    false
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidy() {
        let problems = check(&project_root());
        assert!(problems.is_empty(), "tidy:\n- {}", problems.join("\n- "));
    }

    #[test]
    fn the_lints_table_is_recognised() {
        assert!(opts_into_workspace_lints(
            "[package]\n[lints]\nworkspace = true\n"
        ));
        assert!(!opts_into_workspace_lints(
            "[lints]\n[package]\nworkspace = true\n"
        ));
        assert!(!opts_into_workspace_lints("[workspace]\nmembers = []\n"));
    }
}
