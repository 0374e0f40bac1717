//! Consistency benchmarks: a 3-member mantissa cluster (agent processes, and embedded nodes in
//! this process) next to a 3-member etcd 3.4 cluster, the same workloads driven into each, in one
//! run. See docs/benchmarks.md ("Side by side with etcd") for what it measures and how.
//!
//! ```sh
//! cargo build --release                                   # the mantissa binary, at the root
//! cargo run --release --manifest-path bench/Cargo.toml -- [--quick] [--out FILE.json] [--plots DIR] [SCENARIO...]
//! ```

#[path = "../../tests/support/agent.rs"]
mod agent;
mod cleanup;
mod etcd;
mod isolated;
#[path = "../../tests/support/netns.rs"]
mod netns;
mod plot;
mod progress;
mod report;
#[path = "../../tests/support/requires.rs"]
mod requires;
mod scenarios;
mod scheduling;
mod systems;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use serde_json::{Value as Json, json};

use progress::Progress;
use scenarios::{Plan, Scenario, VALUE_LEN};
use systems::Deployment;

const USAGE: &str = "\
usage: cargo run --release --manifest-path bench/Cargo.toml -- [--quick] [--out FILE.json] [--plots DIR] [SCENARIO...]

  --quick        short run (< 3 minutes on 2 cores): fewer client counts, 3 s per case
  --out FILE     where to write every figure as JSON (default: bench-results.json)
  --plots DIR    where to write the latency CDFs, one SVG per scenario
                 (default: FILE's name without .json, then -plots: bench-results-plots/)
  SCENARIO       write, read, visibility, partition, watch, bandwidth, scheduling
                 (default: all of them; partition and bandwidth need root, `ip` and `nft`)

environment: MANTISSA_BIN (default: release/mantissa in CARGO_TARGET_DIR, else ../target/release/mantissa relative to bench/),
             ETCD_BIN (default: etcd on the PATH)";

const CONSISTENCY: &str = "\
etcd is linearizable: every acknowledged write is visible to every later linearizable read, at \
any member. mantissa is causally consistent with session tokens: a member answers from its own \
replica, and a read carrying a write's token (`after=`) waits until that member has applied \
the write. The two do not promise the same thing; the 'after a write at another member' read \
and the visibility figures are where the difference shows.";

/// What the command line asked for.
struct Options {
    quick: bool,
    out: PathBuf,
    plots: Option<PathBuf>,
    scenarios: Vec<Scenario>,
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        quick: false,
        out: PathBuf::from("bench-results.json"),
        plots: None,
        scenarios: Vec::new(),
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--out" => options.out = args.next().ok_or("--out needs a file name")?.into(),
            "--plots" => {
                options.plots = Some(args.next().ok_or("--plots needs a directory")?.into());
            }
            "-h" | "--help" => {
                return Err("Consistency benchmarks: mantissa and etcd side by side.".into());
            }
            name => options.scenarios.push(
                Scenario::parse(name)
                    .ok_or_else(|| format!("unknown scenario or option {name:?}"))?,
            ),
        }
    }
    if options.scenarios.is_empty() {
        options.scenarios = Scenario::ALL.to_vec();
    }
    Ok(options)
}

fn run(options: &Options) -> Result<(), String> {
    let mantissa_bin = mantissa_binary()?;
    let etcd_bin = etcd_binary()?;
    cleanup::install()?;
    let plan = Plan::new(options.quick);
    let progress = Progress::new();
    let meta = meta(&mantissa_bin, &etcd_bin, &plan);
    print_header(&meta, &plan);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start a tokio runtime: {err}"))?;
    progress.step("starting etcd (3 members), mantissa agents (3) and embedded nodes (3)");
    let started = Instant::now();
    let mut deployment = Deployment::start(&mantissa_bin, &etcd_bin, runtime.handle().clone())?;
    let leader = deployment.etcd.leader(&deployment.runtime);
    progress.clear();
    println!(
        "Clusters up in {:.1} s; etcd leader: {}; scratch directories are removed at exit.\n",
        started.elapsed().as_secs_f64(),
        leader.as_deref().unwrap_or("unknown")
    );

    let plots = options.plots.clone().unwrap_or_else(|| {
        let stem = options
            .out
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        options.out.with_file_name(format!("{stem}-plots"))
    });
    let mut results = serde_json::Map::new();
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for &scenario in &options.scenarios {
        let report = scenario.run(&deployment, &plan, &progress);
        progress.clear();
        println!("{}", report.table());
        failures.extend(
            report
                .failures
                .iter()
                .map(|failure| format!("{}: {failure}", scenario.name())),
        );
        results.insert(scenario.name().to_owned(), report.json());
        // Written after every scenario, so an interrupted run keeps what it measured.
        write_json(&options.out, &meta, &results, leader.as_deref(), &progress)?;
        reports.push(report);
        plot::write_all(&plots, &reports)?;
    }
    println!("Latency CDFs: {}/<scenario>.svg", plots.display());
    println!(
        "Every figure: {} (run took {:.0} s).",
        options.out.display(),
        progress.elapsed_secs()
    );
    let alive = check_alive(&mut deployment);
    deployment.shutdown();
    alive?;
    match failures.is_empty() {
        true => Ok(()),
        false => Err(format!(
            "invariants broken (figures kept in {}):\n{}",
            options.out.display(),
            failures.join("\n")
        )),
    }
}

/// The mantissa binary: `MANTISSA_BIN`, else `release/mantissa` in `CARGO_TARGET_DIR`, else
/// `../target/release/mantissa` relative to bench/.
fn mantissa_binary() -> Result<PathBuf, String> {
    let path = match (
        std::env::var_os("MANTISSA_BIN"),
        std::env::var_os("CARGO_TARGET_DIR"),
    ) {
        (Some(path), _) => PathBuf::from(path),
        (None, Some(target)) => PathBuf::from(target).join("release/mantissa"),
        (None, None) => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/mantissa")
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the mantissa binary is missing at {}: run `cargo build --release` at the repository \
             root first (or set MANTISSA_BIN)",
            path.display()
        ))
    }
}

/// The etcd binary: `ETCD_BIN`, else `etcd` on the PATH; it must run.
fn etcd_binary() -> Result<PathBuf, String> {
    let path = std::env::var_os("ETCD_BIN").map_or_else(|| PathBuf::from("etcd"), PathBuf::from);
    match Command::new(&path).arg("--version").output() {
        Ok(output) if output.status.success() => Ok(path),
        _ => Err(format!(
            "cannot run {} --version: install etcd 3.4 (`apt-get install -y etcd-server \
             etcd-client`) or set ETCD_BIN",
            path.display()
        )),
    }
}

/// The machine and versions, for the header and the JSON.
fn meta(mantissa_bin: &std::path::Path, etcd_bin: &std::path::Path, plan: &Plan) -> Json {
    let first_line = |program: &std::path::Path, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .and_then(|output| {
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_default();
    json!({
        "date": first_line(std::path::Path::new("date"), &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "mode": if plan.quick { "quick" } else { "full" },
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpu": cpu,
        "kernel": first_line(std::path::Path::new("uname"), &["-r"]),
        "load_average_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "etcd": first_line(etcd_bin, &["--version"]),
        "mantissa_bin": mantissa_bin.display().to_string(),
        "value_bytes": VALUE_LEN,
        "consistency": CONSISTENCY,
    })
}

fn print_header(meta: &Json, plan: &Plan) {
    println!(
        "# mantissa and etcd, side by side ({} run)\n",
        meta["mode"].as_str().unwrap_or("")
    );
    println!("{CONSISTENCY}\n");
    println!(
        "- {} UTC; {} cores ({}), Linux {}; load average at start {}",
        meta["date"].as_str().unwrap_or(""),
        meta["cores"],
        meta["cpu"].as_str().unwrap_or(""),
        meta["kernel"].as_str().unwrap_or(""),
        meta["load_average_at_start"].as_str().unwrap_or("")
    );
    println!(
        "- {} and mantissa {}: 3 members each, data directories on the same disk; plus 3 embedded \
         mantissa nodes (durable) inside this process. All 6 server processes, the embedded nodes \
         and every client share these cores; idle clusters keep running while another is measured.",
        meta["etcd"].as_str().unwrap_or("etcd"),
        meta["mantissa_bin"].as_str().unwrap_or("")
    );
    println!(
        "- clients: one OS thread and one reused connection each (etcd: gRPC via etcd-client; \
         mantissa: keep-alive HTTP/1.1; embedded: Handle); {VALUE_LEN}-byte values; \
         {:.1} s measured per case{}",
        plan.measured.as_secs_f64(),
        if plan.quick { " (--quick)" } else { "" }
    );
    println!(
        "- partition and bandwidth start their own clusters (3 agents, 3 etcd members) in network \
         namespaces; scheduling starts its own agent clusters (one per case, every agent offering \
         capacity); its etcd column places the same tasks with compare-and-swap transactions\n"
    );
}

fn write_json(
    out: &std::path::Path,
    meta: &Json,
    results: &serde_json::Map<String, Json>,
    leader: Option<&str>,
    progress: &Progress,
) -> Result<(), String> {
    let mut meta = meta.clone();
    meta["etcd_leader"] = json!(leader);
    meta["run_seconds"] = json!(progress.elapsed_secs());
    let document = json!({ "meta": meta, "scenarios": results });
    let text = serde_json::to_string_pretty(&document).expect("a JSON value serializes");
    std::fs::write(out, text + "\n").map_err(|err| format!("cannot write {}: {err}", out.display()))
}

/// Fails the run if a member died during it: its figures would be misleading.
fn check_alive(deployment: &mut Deployment) -> Result<(), String> {
    let mut dead = deployment.etcd.exited();
    for node in 0..deployment.agents.len() {
        if !deployment.agents.is_running(node) {
            dead.push(format!(
                "mantissa agent {node} exited during the run:\n{}",
                deployment.agents.log_tail(node)
            ));
        }
    }
    match dead.is_empty() {
        true => Ok(()),
        false => Err(dead.join("\n")),
    }
}
