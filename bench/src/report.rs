//! Figures: a row per system and case, distributions as percentiles, tables and JSON.

use std::fmt::Write as _;

use serde_json::{Value as Json, json};

/// Percentiles shown for distributions (visibility, watch).
const DISTRIBUTION: [(f64, &str); 7] = [
    (0.10, "p10"),
    (0.25, "p25"),
    (0.50, "p50"),
    (0.75, "p75"),
    (0.90, "p90"),
    (0.99, "p99"),
    (1.00, "max"),
];

/// One measured case of one system.
pub struct Row {
    pub system: &'static str,
    pub case: String,
    /// Concurrent clients (or watchers per member), when it applies.
    pub clients: Option<usize>,
    /// Operations (or samples) measured.
    pub count: u64,
    /// Failed operations.
    pub errors: u64,
    /// Operations that succeeded but did not see what they should have (a read that found no
    /// value, an event that never arrived).
    pub misses: u64,
    /// The measured window, for throughput.
    pub seconds: Option<f64>,
    /// Latencies (or delays) in milliseconds; may be negative for delays measured from an
    /// acknowledgement.
    pub millis: Vec<f64>,
    /// The first few errors, to show.
    pub error_samples: Vec<String>,
    /// Refused placements (scheduling), when it applies.
    pub conflicts: Option<u64>,
    /// A second latency distribution in milliseconds (scheduling: per task, where `millis` is
    /// per job).
    pub task_millis: Vec<f64>,
    /// Further figures for the JSON (`null` when none).
    pub detail: Json,
}

/// How a scenario's table shows its rows.
#[derive(Clone, Copy)]
pub enum Layout {
    /// ops/s, p50, p99, max.
    Throughput,
    /// p10 … p99, max.
    Distribution,
    /// placements/s, conflicts and their share, per-job and per-task p50/p99, max.
    Scheduling,
    /// Figures from each row's `detail`: (column header, detail field) pairs.
    Figures(&'static [(&'static str, &'static str)]),
}

/// One scenario's rows, with how they were measured.
pub struct Report {
    pub scenario: &'static str,
    pub method: String,
    pub layout: Layout,
    pub rows: Vec<Row>,
    /// Invariants the scenario found broken (over-commit, a task held twice or never): the run
    /// fails when any is listed.
    pub failures: Vec<String>,
}

impl Row {
    pub fn new(system: &'static str, case: impl Into<String>, clients: Option<usize>) -> Row {
        Row {
            system,
            case: case.into(),
            clients,
            count: 0,
            errors: 0,
            misses: 0,
            seconds: None,
            millis: Vec::new(),
            error_samples: Vec::new(),
            conflicts: None,
            task_millis: Vec::new(),
            detail: Json::Null,
        }
    }

    pub fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < 3 && !self.error_samples.contains(&message) {
            self.error_samples.push(message);
        }
    }

    fn sorted(&self) -> Vec<f64> {
        sorted(&self.millis)
    }

    /// Conflicts as a share of all placement attempts (conflicts plus placements).
    fn conflict_rate(&self) -> Option<f64> {
        self.conflicts
            .map(|conflicts| conflicts as f64 / (conflicts + self.count).max(1) as f64)
    }

    fn throughput(&self) -> Option<f64> {
        self.seconds
            .filter(|&s| s > 0.0)
            .map(|s| self.count as f64 / s)
    }

    pub fn json(&self) -> Json {
        let mut json = json!({
            "system": self.system,
            "case": self.case,
            "clients": self.clients,
            "count": self.count,
            "errors": self.errors,
            "misses": self.misses,
            "seconds": self.seconds,
            "ops_per_second": self.throughput(),
            "millis": percentiles(&self.millis),
            "error_samples": self.error_samples,
        });
        if self.conflicts.is_some() {
            json["conflicts"] = json!(self.conflicts);
            json["conflict_rate"] = json!(self.conflict_rate());
            json["task_millis"] = percentiles(&self.task_millis);
        }
        if !self.detail.is_null() {
            json["detail"] = self.detail.clone();
        }
        json
    }
}

impl Report {
    /// The table for the terminal (markdown).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## {}\n\n{}\n", self.scenario, self.method);
        let figures: Vec<&str> = match self.layout {
            Layout::Throughput => vec!["ops/s", "p50 ms", "p99 ms", "max ms"],
            Layout::Distribution => DISTRIBUTION.iter().map(|(_, name)| *name).collect(),
            Layout::Scheduling => vec![
                "placements/s",
                "conflicts",
                "conflict %",
                "job p50 ms",
                "job p99 ms",
                "task p50 ms",
                "task p99 ms",
                "max ms",
            ],
            Layout::Figures(columns) => columns.iter().map(|(header, _)| *header).collect(),
        };
        let _ = writeln!(
            out,
            "| system | case | count | errors | misses | {} |",
            figures.join(" | ")
        );
        let _ = writeln!(out, "|---|---|--:|--:|--:|{}", "--:|".repeat(figures.len()));
        for row in &self.rows {
            let sorted = row.sorted();
            let cells: Vec<String> = match self.layout {
                Layout::Throughput => {
                    let mut cells =
                        vec![row.throughput().map_or("-".into(), |t| format!("{t:.0}"))];
                    for q in [0.5, 0.99, 1.0] {
                        cells.push(millis(percentile(&sorted, q)));
                    }
                    cells
                }
                Layout::Distribution => DISTRIBUTION
                    .iter()
                    .map(|(q, _)| millis(percentile(&sorted, *q)))
                    .collect(),
                Layout::Scheduling => {
                    let tasks = self::sorted(&row.task_millis);
                    vec![
                        row.throughput().map_or("-".into(), |t| format!("{t:.0}")),
                        row.conflicts.map_or("-".into(), |c| c.to_string()),
                        row.conflict_rate()
                            .map_or("-".into(), |r| format!("{:.1}", r * 100.0)),
                        millis(percentile(&sorted, 0.5)),
                        millis(percentile(&sorted, 0.99)),
                        millis(percentile(&tasks, 0.5)),
                        millis(percentile(&tasks, 0.99)),
                        millis(percentile(&tasks, 1.0)),
                    ]
                }
                Layout::Figures(columns) => columns
                    .iter()
                    .map(|(_, field)| figure(&row.detail[*field]))
                    .collect(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                row.system,
                row.case,
                row.count,
                row.errors,
                row.misses,
                cells.join(" | ")
            );
        }
        for row in &self.rows {
            for sample in &row.error_samples {
                let _ = writeln!(out, "\n- error, {} {}: {sample}", row.system, row.case);
            }
        }
        for failure in &self.failures {
            let _ = writeln!(out, "\n- FAILED: {failure}");
        }
        out
    }

    pub fn json(&self) -> Json {
        json!({
            "method": self.method,
            "rows": self.rows.iter().map(Row::json).collect::<Vec<_>>(),
            "failures": self.failures,
        })
    }
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// p10 … max, p99.9, min and mean of `values`, for the JSON.
fn percentiles(values: &[f64]) -> Json {
    let sorted = sorted(values);
    let mut percentiles = serde_json::Map::new();
    for (q, name) in DISTRIBUTION.iter().chain(&[(0.999, "p99.9"), (0.0, "min")]) {
        percentiles.insert((*name).to_owned(), json!(percentile(&sorted, *q)));
    }
    let mean = (!sorted.is_empty()).then(|| sorted.iter().sum::<f64>() / sorted.len() as f64);
    percentiles.insert("mean".to_owned(), json!(mean));
    Json::Object(percentiles)
}

/// The nearest-rank percentile `q` (0 = min, 1 = max) of sorted values.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A detail figure for a table cell: whole numbers plainly, others to one decimal.
fn figure(value: &Json) -> String {
    match value.as_f64() {
        None => "-".to_owned(),
        Some(x) if x.abs() >= 100.0 || x.fract() == 0.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
    }
}

fn millis(value: Option<f64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(ms) if ms.abs() >= 100.0 => format!("{ms:.0}"),
        Some(ms) if ms.abs() >= 10.0 => format!("{ms:.1}"),
        Some(ms) => format!("{ms:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), Some(50.0));
        assert_eq!(percentile(&values, 0.99), Some(99.0));
        assert_eq!(percentile(&values, 1.0), Some(100.0));
        assert_eq!(percentile(&values, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
