//! Latency CDF plots as standalone SVG files: one per scenario, a line per row (system and
//! case), latency on the x axis (logarithmic when every value is positive), the share of
//! operations at or below it on the y axis.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::report::Report;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 540.0;
/// The plot area inside the picture (left, top, right, bottom); the legend is right of it.
const AREA: (f64, f64, f64, f64) = (70.0, 40.0, 640.0, 490.0);
/// Points per line at most: more adds bytes, not information.
const MAX_POINTS: usize = 300;

/// Line colours by system; lines of one system differ by dash pattern.
fn colour(system: &str) -> &'static str {
    match system {
        "etcd" => "#d62728",
        "mantissa" => "#1f77b4",
        "embedded" => "#2ca02c",
        _ => "#7f7f7f",
    }
}

const DASHES: [&str; 6] = ["", "8 4", "2 3", "12 4 2 4", "4 4", "1 6"];

/// Writes `<dir>/<scenario>.svg` for every report with latencies; the paths written.
pub fn write_all(dir: &Path, reports: &[Report]) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir)
        .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let mut written = Vec::new();
    for report in reports {
        let Some(svg) = cdf(report) else {
            continue;
        };
        let path = dir.join(format!("{}.svg", report.scenario));
        std::fs::write(&path, svg)
            .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// One line of the plot.
struct Line {
    label: String,
    colour: &'static str,
    dash: &'static str,
    sorted: Vec<f64>,
}

/// The CDF plot of a report's rows, `None` when no row has two or more latencies.
fn cdf(report: &Report) -> Option<String> {
    let mut dash_of_system: Vec<(&str, usize)> = Vec::new();
    let mut lines = Vec::new();
    for row in &report.rows {
        if row.millis.len() < 2 {
            continue;
        }
        let used = match dash_of_system.iter_mut().find(|(s, _)| *s == row.system) {
            Some((_, used)) => used,
            None => {
                dash_of_system.push((row.system, 0));
                &mut dash_of_system.last_mut().expect("just pushed").1
            }
        };
        let dash = DASHES[*used % DASHES.len()];
        *used += 1;
        let mut sorted = row.millis.clone();
        sorted.sort_by(f64::total_cmp);
        lines.push(Line {
            label: format!("{} — {}", row.system, row.case),
            colour: colour(row.system),
            dash,
            sorted,
        });
    }
    if lines.is_empty() {
        return None;
    }
    let min = lines
        .iter()
        .map(|l| l.sorted[0])
        .fold(f64::INFINITY, f64::min);
    let max = lines
        .iter()
        .map(|l| l.sorted[l.sorted.len() - 1])
        .fold(f64::NEG_INFINITY, f64::max);
    let axis = Axis::new(min, max);
    let (left, top, right, bottom) = AREA;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        svg,
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"24\" font-size=\"15\">{}: cumulative distribution</text>",
        escape(report.scenario)
    );
    // The frame, horizontal grid lines every 10 % and the x ticks.
    let _ = writeln!(
        svg,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#444\"/>",
        right - left,
        bottom - top
    );
    for tenth in 0..=10 {
        let share = f64::from(tenth) / 10.0;
        let y = bottom - share * (bottom - top);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{right}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0} %</text>",
            left - 6.0,
            y + 4.0,
            share * 100.0
        );
    }
    for tick in axis.ticks() {
        let x = left + axis.position(tick) * (right - left);
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#eee\"/>\
             <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            bottom + 16.0,
            tick_label(tick)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">milliseconds{}</text>",
        (left + right) / 2.0,
        bottom + 36.0,
        match axis.log {
            true => " (logarithmic)",
            false => "",
        }
    );
    for (n, line) in lines.iter().enumerate() {
        let count = line.sorted.len();
        let step = (count / MAX_POINTS).max(1);
        let mut points = String::new();
        for (i, &value) in line.sorted.iter().enumerate() {
            if i % step != 0 && i + 1 != count {
                continue;
            }
            let x = left + axis.position(value) * (right - left);
            let y = bottom - (i + 1) as f64 / count as f64 * (bottom - top);
            let _ = write!(points, "{x:.1},{y:.1} ");
        }
        let dash = match line.dash {
            "" => String::new(),
            dash => format!(" stroke-dasharray=\"{dash}\""),
        };
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\"{dash} points=\"{}\"/>",
            line.colour,
            points.trim_end()
        );
        let y = top + 8.0 + n as f64 * 18.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"{}\" \
             stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{:.1}\">{} (n={count})</text>",
            right + 16.0,
            right + 46.0,
            line.colour,
            right + 52.0,
            y + 4.0,
            escape(&line.label)
        );
    }
    svg.push_str("</svg>\n");
    Some(svg)
}

/// The x axis: logarithmic from a power of ten below the least value to one above the greatest
/// when every value is positive, else linear over the values' range.
struct Axis {
    log: bool,
    low: f64,
    high: f64,
}

impl Axis {
    fn new(min: f64, max: f64) -> Axis {
        if min > 0.0 {
            Axis {
                log: true,
                low: min.log10().floor(),
                high: max.log10().ceil().max(min.log10().floor() + 1.0),
            }
        } else {
            let step = nice_step(max - min);
            Axis {
                log: false,
                low: (min / step).floor() * step,
                high: ((max / step).ceil() * step).max((min / step).floor() * step + step),
            }
        }
    }

    /// Where `value` falls, from 0 (left) to 1 (right).
    fn position(&self, value: f64) -> f64 {
        let value = match self.log {
            true => value.max(f64::MIN_POSITIVE).log10(),
            false => value,
        };
        ((value - self.low) / (self.high - self.low)).clamp(0.0, 1.0)
    }

    fn ticks(&self) -> Vec<f64> {
        match self.log {
            true => (self.low as i32..=self.high as i32)
                .map(|power| 10f64.powi(power))
                .collect(),
            false => {
                let step = nice_step(self.high - self.low);
                let count = ((self.high - self.low) / step).round() as usize;
                (0..=count).map(|i| self.low + i as f64 * step).collect()
            }
        }
    }
}

/// 1, 2 or 5 times a power of ten, giving 4 to 10 ticks over `span`.
fn nice_step(span: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let rough = span / 8.0;
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|&m| m * power >= rough)
        .unwrap_or(10.0);
    step * power
}

fn tick_label(value: f64) -> String {
    match value.abs() {
        v if v >= 1.0 || v == 0.0 => format!("{value:.0}"),
        v if v >= 0.1 => format!("{value:.1}"),
        _ => format!("{value}"),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Layout, Row};

    fn report(values: &[(&'static str, Vec<f64>)]) -> Report {
        Report {
            scenario: "write",
            method: String::new(),
            layout: Layout::Throughput,
            rows: values
                .iter()
                .map(|(system, millis)| {
                    let mut row = Row::new(system, "1 client", Some(1));
                    row.millis = millis.clone();
                    row
                })
                .collect(),
            failures: Vec::new(),
        }
    }

    #[test]
    fn positive_latencies_get_a_logarithmic_axis_and_a_line_per_row() {
        let svg = cdf(&report(&[
            ("etcd", vec![1.5, 2.0, 30.0]),
            ("mantissa", vec![0.2, 0.3, 0.4]),
        ]))
        .expect("two rows with latencies");
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("(logarithmic)"));
        assert!(svg.contains("etcd — 1 client (n=3)"));
        // Ticks from 0.1 ms to 100 ms.
        assert!(svg.contains(">0.1</text>") && svg.contains(">100</text>"));
        assert!(svg.contains("#d62728") && svg.contains("#1f77b4"));
    }

    #[test]
    fn negative_delays_get_a_linear_axis() {
        let svg = cdf(&report(&[("mantissa", vec![-0.5, 0.5, 3.0])])).expect("a line");
        assert!(!svg.contains("(logarithmic)"));
        let axis = Axis::new(-0.5, 3.0);
        assert!(axis.low <= -0.5 && axis.high >= 3.0);
        assert!(axis.position(-0.5) < axis.position(3.0));
    }

    #[test]
    fn rows_without_latencies_make_no_plot() {
        assert!(cdf(&report(&[("etcd", vec![1.0])])).is_none());
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(10.0), 2.0);
        assert_eq!(nice_step(35.0), 5.0);
        assert_eq!(nice_step(0.8), 0.1);
    }
}
