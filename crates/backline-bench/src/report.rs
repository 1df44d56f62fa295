//! The rows, the table on stdout and the JSON under `target/bench/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::Plan;

/// The unit of a row's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Unit {
    /// A rate: jobs per second, higher is better.
    #[serde(rename = "jobs/s")]
    JobsPerSecond,
    /// A latency in microseconds, lower is better.
    #[serde(rename = "us")]
    Micros,
}

/// One figure, measured `runs.len()` times.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    /// A stable key for comparing runs (`drain_c256`, `raw_push_1000`, …).
    pub(crate) id: String,
    /// What was measured, for people.
    pub(crate) label: String,
    /// Jobs per run.
    pub(crate) jobs: usize,
    /// The unit of `runs` and `median`.
    pub(crate) unit: Unit,
    /// Each run's figure, in the order measured.
    pub(crate) runs: Vec<f64>,
    /// The median of `runs`: the figure reported.
    pub(crate) median: f64,
}

impl Row {
    /// A row, with its median computed.
    pub(crate) fn new(id: String, label: String, jobs: usize, unit: Unit, runs: Vec<f64>) -> Row {
        let median = median(&runs);
        eprintln!("  {label:<48} {}", show(median, unit));
        Row {
            id,
            label,
            jobs,
            unit,
            runs,
            median,
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `1234567.8` as `1,234,568`.
pub(crate) fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn show(x: f64, unit: Unit) -> String {
    match unit {
        Unit::JobsPerSecond => format!("{} jobs/s", thousands(x)),
        Unit::Micros if x >= 10_000.0 => format!("{:.1} ms", x / 1_000.0),
        Unit::Micros => format!("{x:.0} µs"),
    }
}

/// The 1-minute load average, where `/proc/loadavg` tells it.
pub(crate) fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The results of one provider.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// The provider's name.
    provider: String,
    /// Whether this was a `--quick` smoke run.
    quick: bool,
    /// Runs per figure.
    runs_per_figure: usize,
    /// Tokio worker threads.
    worker_threads: usize,
    /// What the machine offers.
    available_parallelism: usize,
    /// Seconds since the Unix epoch when the report was made.
    unix_time: u64,
    /// The machine's 1-minute load average before the benchmark started (Linux): a hint of
    /// how much else was running, since figures are only comparable on a quiet machine.
    load_average_before: Option<f64>,
    /// The figures.
    pub(crate) rows: Vec<Row>,
}

impl Report {
    /// A report of `rows` for `provider`, measured with `plan` after [`load_average`] read
    /// `load_average_before`.
    pub(crate) fn new(
        provider: &str,
        plan: &Plan,
        worker_threads: usize,
        load_average_before: Option<f64>,
        rows: Vec<Row>,
    ) -> Self {
        Report {
            provider: provider.to_owned(),
            quick: plan.quick,
            runs_per_figure: plan.runs,
            worker_threads,
            available_parallelism: std::thread::available_parallelism().map_or(0, |n| n.get()),
            unix_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            load_average_before,
            rows,
        }
    }

    fn row(&self, id: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.id == id)
    }

    /// The table printed on stdout.
    pub(crate) fn table(&self, took: Duration) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\n{} — release build, Tokio {} worker threads on {} cores, median of {} run(s){}{}",
            self.provider,
            self.worker_threads,
            self.available_parallelism,
            self.runs_per_figure,
            self.load_average_before
                .map(|l| format!(", load average {l:.2} before"))
                .unwrap_or_default(),
            if self.quick { ", QUICK" } else { "" }
        );
        let _ = writeln!(
            s,
            "| {:<48} | {:>7} | {:>17} | runs",
            "row", "jobs", "median"
        );
        let _ = writeln!(s, "|{:-<50}|{:->9}|{:->19}|------", "", "", "");
        for r in &self.rows {
            let runs: Vec<String> = r
                .runs
                .iter()
                .map(|x| match r.unit {
                    Unit::JobsPerSecond => format!("{:.0}k", x / 1_000.0),
                    Unit::Micros => show(*x, r.unit),
                })
                .collect();
            let _ = writeln!(
                s,
                "| {:<48} | {:>7} | {:>17} | {}",
                r.label,
                thousands(r.jobs as f64),
                show(r.median, r.unit),
                runs.join(", ")
            );
        }
        // The server against the provider's own limit, where both were measured.
        let mut shown = std::collections::HashSet::new();
        for (server, raw) in [
            ("drain_c256", "raw_claim_finish_256"),
            ("drain_c1", "raw_claim_finish_1"),
            ("enqueue_batch_1000", "raw_push_1000"),
            // One-by-one enqueue against one job per commit (SQL).
            ("enqueue_single_32_tasks", "raw_insert_c32"),
            ("enqueue_single_32_tasks", "raw_insert_notify_c32"),
            ("enqueue_single_32_tasks", "raw_commit_c1"),
            ("enqueue_single_1_task", "raw_commit_c1"),
            // PostgreSQL: rows kept against the CTE claim + UPDATE, deleted against claim-delete.
            ("drain_c256_kept", "raw_cte_update_1x256"),
            ("drain_c256_kept", "raw_cte_update_4x500"),
            ("drain_c256", "raw_cte_update_1x256"),
            ("drain_c256", "raw_cte_update_4x500"),
            ("drain_c256", "raw_claim_delete_1x256"),
            // MySQL/MariaDB.
            ("drain_c256", "raw_select_delete_1x100"),
            ("drain_c256_kept", "raw_select_update_1x100"),
            ("drain_c256", "raw_select_delete_4x500"),
            // SQLite; and its drain of 5,000 queued against 100,000.
            ("drain_c256_kept", "raw_claim_complete_1x100"),
            ("drain_c256", "raw_claim_complete_1x100"),
            ("drain_c256", "raw_claim_delete_1x256"),
            ("drain_c256", "drain_c256_5000"),
            // Redis.
            ("enqueue_single_32_tasks", "raw_set_c32"),
            ("enqueue_single_32_tasks", "raw_evalsha_c32"),
            ("enqueue_single_32_tasks", "enqueue_grouped_32"),
            ("enqueue_batch_1000", "raw_pipeline_1000"),
            ("drain_c256", "raw_pop_delete_256"),
            // RabbitMQ.
            ("enqueue_batch_1000", "raw_publish_1000"),
            ("enqueue_batch_1000", "raw_publish_props_1000"),
            ("enqueue_single_32_tasks", "raw_publish_single_c32"),
            ("enqueue_single_32_tasks", "raw_publish_single_props_c32"),
            ("enqueue_single_paired_c32", "raw_publish_single_paired_c32"),
            ("drain_c256", "raw_consume_ack_p100"),
            ("drain_c256", "raw_consume_multiack_p100"),
            ("drain_c256", "raw_get_multiack_256"),
            ("drain_c16", "raw_consume_ack_p100"),
        ] {
            if !shown.insert((server, raw)) {
                continue;
            }
            if let (Some(a), Some(b)) = (self.row(server), self.row(raw)) {
                let _ = writeln!(
                    s,
                    "Backline/raw: {server} = {:.0} % of {raw}",
                    100.0 * a.median / b.median.max(1e-9)
                );
            }
        }
        // The fastest raw loop and the fastest Backline drain (the claim strategies compared).
        let fastest = |raw: bool| {
            self.rows
                .iter()
                .filter(|r| r.unit == Unit::JobsPerSecond)
                .filter(|r| r.id.starts_with("raw_") == raw && (raw || r.id.starts_with("drain")))
                .max_by(|a, b| a.median.total_cmp(&b.median))
        };
        if let (Some(d), Some(r)) = (fastest(false), fastest(true)) {
            let _ = writeln!(
                s,
                "fastest Backline drain: {} ({}); fastest raw loop: {} ({})",
                d.label,
                show(d.median, d.unit),
                r.label,
                show(r.median, r.unit)
            );
        }
        let _ = write!(s, "({:.1} s in all)", took.as_secs_f64());
        s
    }

    /// The report as pretty JSON.
    pub(crate) fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// Writes `<dir>/<provider>.json`; returns its path.
    pub(crate) fn write_json(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.provider));
        std::fs::write(&path, self.json() + "\n")?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_formatted() {
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(show(1500.0, Unit::Micros), "1500 µs");
        assert_eq!(show(25_000.0, Unit::Micros), "25.0 ms");
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
    }
}
