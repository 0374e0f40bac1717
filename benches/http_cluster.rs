//! HTTP write load on a real cluster: three `mantissa agent` processes of the release binary on
//! loopback, each with durable storage (a data directory under the system temp dir), driven by
//! `PUT /v1/kv/bench/L<level>/<client>/<n>` with 100-byte values from 1, 16 and 64 concurrent
//! clients. Each client is one keep-alive HTTP/1.1 connection, the clients spread round-robin over
//! the three nodes. Per level it reports writes/s and p50/p99/p99.9 latency (measured after a
//! warm-up) and errors, then checks that the nodes converged (same version vector, same number of
//! keys), and prints a markdown table compared with an etcd baseline.
//!
//! ```sh
//! cargo bench --bench http_cluster                  # builds the binary too, 10 s per level
//! MANTISSA_BENCH_SECS=3 cargo bench --bench http_cluster
//! MANTISSA_BENCH_LEVELS=1,64 cargo bench --bench http_cluster
//! ```
//!
//! The agent binary: cargo builds it with the bench and names it in `CARGO_BIN_EXE_mantissa`;
//! otherwise `MANTISSA_BIN`, else `$CARGO_TARGET_DIR/release/mantissa` or `target/release/mantissa`
//! (build it with `cargo build --release` first). The bench stops with a message if it is missing.
//!
//! The clients are plain threads doing blocking writes and reads on their sockets (no async
//! runtime, no HTTP library): the cheapest client there is, since it competes with the agents for
//! the same cores. The output says how much CPU the clients and each agent used.
//!
//! Without `--bench` (as `cargo test --benches` runs it) it only says how to run it.

#[path = "../tests/support/agent.rs"]
mod agent;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use agent::{Cluster, HttpConnection};

/// Bytes in every value.
const VALUE_LEN: usize = 100;
/// Client counts, unless `MANTISSA_BENCH_LEVELS` says otherwise.
const DEFAULT_LEVELS: [usize; 3] = [1, 16, 64];
/// Seconds measured per level, unless `MANTISSA_BENCH_SECS` says otherwise.
const DEFAULT_SECS: u64 = 10;
/// Writes before the measured window, so connections, allocators and the data files are warm.
const WARM_UP: Duration = Duration::from_secs(1);
/// How long the nodes get to converge once the load stops.
const CONVERGENCE_DEADLINE: Duration = Duration::from_secs(120);
/// The most keys one list request returns (the server's cap).
const LIST_PAGE: usize = 10_000;

/// etcd 3.4.23, one node, data on disk, on this kind of machine (2 cores, shared), `etcdctl`-
/// style puts of small values: the figures the comparison is made against.
///
/// A live etcd run on the same machine would go here (start `etcd` with its own temp data dir and
/// ports, drive it with the same client counts); it is tracked separately, so this bench only
/// compares with the recorded figures.
const ETCD_BASELINE: [Baseline; 2] = [
    Baseline {
        clients: 1,
        writes_per_second: 2_000.0,
        p50_ms: Some(0.48),
        p99_ms: Some(0.88),
    },
    Baseline {
        clients: 64,
        writes_per_second: 13_000.0,
        p50_ms: None,
        p99_ms: Some(14.0),
    },
];

/// A recorded etcd figure.
struct Baseline {
    clients: usize,
    writes_per_second: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

/// What one level measured.
struct Level {
    clients: usize,
    /// Acknowledged (200) writes in the measured window.
    writes: u64,
    measured: Duration,
    /// Latencies of the measured writes, sorted.
    latencies: Vec<Duration>,
    /// Non-200 answers and failed requests, over the whole level.
    errors: u64,
    /// The first few errors, to show.
    error_samples: Vec<String>,
    /// Acknowledged writes over the whole level (warm-up included): keys that must exist.
    acknowledged: u64,
    /// CPU seconds used in the measured window by the bench process and by each agent.
    client_cpu: f64,
    agent_cpu: Vec<f64>,
}

/// What one client thread measured.
#[derive(Default)]
struct ClientResult {
    writes: u64,
    latencies: Vec<Duration>,
    errors: u64,
    error_samples: Vec<String>,
    acknowledged: u64,
}

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("http_cluster: a load benchmark; run it with `cargo bench --bench http_cluster`");
        return;
    }
    let (binary, source) = binary();
    let secs = env_number("MANTISSA_BENCH_SECS", DEFAULT_SECS);
    let levels = levels();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    println!("# mantissa HTTP write load: 3 agents on loopback, durable storage");
    println!();
    println!("- binary: {} ({source})", binary.display());
    println!("- cores: {cores} (shared by the agents and the clients)");
    println!(
        "- per level: {secs} s measured after {} s of warm-up; {VALUE_LEN}-byte values; \
         clients spread round-robin over the 3 nodes, one keep-alive HTTP/1.1 connection each",
        WARM_UP.as_secs()
    );

    let mut cluster = Cluster::start(&binary, "bench", 3);
    println!("- data directories under {}", cluster.root().display());
    println!();

    let mut results = Vec::new();
    for &clients in &levels {
        let level = run_level(&cluster, clients, Duration::from_secs(secs));
        print_level_line(&level);
        results.push(level);
    }
    let acknowledged: u64 = results.iter().map(|level| level.acknowledged).sum();
    let convergence = converge(&cluster, acknowledged);

    println!();
    println!("{}", table(&results));
    println!("{}", comparison(&results));
    println!("{}", cpu_table(&results));
    println!("{convergence}");
    println!("{}", storage_summary(&cluster));
    for node in 0..cluster.len() {
        if !cluster.is_running(node) {
            panic!(
                "node {node} exited during the bench:\n{}",
                cluster.log_tail(node)
            );
        }
    }
    for node in 0..cluster.len() {
        cluster.stop(node);
    }
}

/// Runs `clients` threads of writes for warm-up plus `measured`.
fn run_level(cluster: &Cluster, clients: usize, measured: Duration) -> Level {
    let addrs: Vec<_> = (0..cluster.len())
        .map(|node| cluster.agent(node).http)
        .collect();
    let pids: Vec<u32> = (0..cluster.len())
        .filter_map(|node| cluster.pid(node))
        .collect();
    // The clients and the main thread start together; the main thread samples CPU at the edges
    // of the measured window.
    let start = Barrier::new(clients + 1);
    let (results, before, after) = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|client| {
                let (start, addr) = (&start, addrs[client % addrs.len()]);
                scope.spawn(move || {
                    start.wait();
                    run_client(addr, clients, client, measured)
                })
            })
            .collect();
        start.wait();
        let window_start = Instant::now() + WARM_UP;
        std::thread::sleep(WARM_UP);
        let before = cpu_seconds(&pids);
        let sleep = (window_start + measured).saturating_duration_since(Instant::now());
        std::thread::sleep(sleep);
        let after = cpu_seconds(&pids);
        let results: Vec<ClientResult> = threads
            .into_iter()
            .map(|thread| thread.join().expect("client thread"))
            .collect();
        (results, before, after)
    });
    let client_cpu = after.0 - before.0;
    let agent_cpu = after.1.iter().zip(&before.1).map(|(a, b)| a - b).collect();
    let mut level = Level {
        clients,
        writes: 0,
        measured,
        latencies: Vec::new(),
        errors: 0,
        error_samples: Vec::new(),
        acknowledged: 0,
        client_cpu,
        agent_cpu,
    };
    for result in results {
        level.writes += result.writes;
        level.latencies.extend(result.latencies);
        level.errors += result.errors;
        level.acknowledged += result.acknowledged;
        for sample in result.error_samples {
            if level.error_samples.len() < 5 {
                level.error_samples.push(sample);
            }
        }
    }
    level.latencies.sort_unstable();
    level
}

/// One client: writes fresh keys on one connection until warm-up plus `measured` has passed,
/// timing the writes after the warm-up.
fn run_client(
    addr: std::net::SocketAddr,
    level: usize,
    client: usize,
    measured: Duration,
) -> ClientResult {
    let mut connection = HttpConnection::new(addr);
    let mut result = ClientResult::default();
    let began = Instant::now();
    let window_start = began + WARM_UP;
    let end = window_start + measured;
    let mut value = vec![b'v'; VALUE_LEN];
    let mut path = String::with_capacity(64);
    for n in 0u64.. {
        let now = Instant::now();
        if now >= end {
            break;
        }
        path.clear();
        let _ = write!(path, "/v1/kv/bench/L{level}/{client}/{n}");
        let stamp = n.to_le_bytes();
        value[..8].copy_from_slice(&stamp);
        let sent = Instant::now();
        let outcome = connection.request("PUT", &path, &value);
        let took = sent.elapsed();
        match outcome {
            Ok(response) if response.status == 200 => {
                result.acknowledged += 1;
                if sent >= window_start {
                    result.writes += 1;
                    result.latencies.push(took);
                }
            }
            Ok(response) => {
                result.errors += 1;
                if result.error_samples.len() < 3 {
                    result.error_samples.push(format!(
                        "{} {}",
                        response.status,
                        response.text().trim()
                    ));
                }
            }
            Err(err) => {
                result.errors += 1;
                if result.error_samples.len() < 3 {
                    result.error_samples.push(err.to_string());
                }
            }
        }
    }
    result
}

/// Waits until every node reports the same version vector, then counts the keys under `bench/`
/// on each node; returns a report.
fn converge(cluster: &Cluster, acknowledged: u64) -> String {
    let started = Instant::now();
    let deadline = started + CONVERGENCE_DEADLINE;
    let versions = loop {
        let versions: Vec<Json> = (0..cluster.len())
            .map(|node| cluster.get_json(node, "/v1/status")["version"].clone())
            .collect();
        if versions.windows(2).all(|pair| pair[0] == pair[1]) {
            break Some(versions);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let waited = started.elapsed();
    let counts: Vec<usize> = (0..cluster.len())
        .map(|node| count_keys(cluster, node, "bench/"))
        .collect();
    let mut report = String::from("## Convergence\n\n");
    match versions {
        Some(versions) => {
            let _ = writeln!(
                report,
                "- version vectors equal on all nodes {:.1} s after the load stopped: {}",
                waited.as_secs_f64(),
                versions[0]
            );
        }
        None => {
            let _ = writeln!(
                report,
                "- NOT CONVERGED: version vectors still differ after {CONVERGENCE_DEADLINE:?}"
            );
        }
    }
    let _ = writeln!(
        report,
        "- keys under bench/ per node: {counts:?}; acknowledged writes: {acknowledged} ({})",
        if counts.iter().all(|&count| count as u64 >= acknowledged)
            && counts.windows(2).all(|pair| pair[0] == pair[1])
        {
            "every node holds every acknowledged key"
        } else {
            "MISMATCH"
        }
    );
    report
}

/// Keys under `prefix` at `node`, paging through the list.
fn count_keys(cluster: &Cluster, node: usize, prefix: &str) -> usize {
    let mut count = 0;
    let mut start_after: Option<String> = None;
    loop {
        let mut path = format!(
            "/v1/kv?prefix={}&limit={LIST_PAGE}",
            agent::encode_query(prefix)
        );
        if let Some(key) = &start_after {
            let _ = write!(path, "&start_after={}", agent::encode_query(key));
        }
        let page = cluster.get_json(node, &path);
        let items = page["items"].as_array().expect("items");
        count += items.len();
        if page["more"] != Json::Bool(true) || items.is_empty() {
            return count;
        }
        start_after = items
            .last()
            .and_then(|item| item["key"].as_str())
            .map(str::to_owned);
    }
}

fn print_level_line(level: &Level) {
    println!(
        "{:>3} clients: {:>8.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, {} errors{}",
        level.clients,
        level.writes_per_second(),
        ms(level.percentile(0.50)),
        ms(level.percentile(0.99)),
        ms(level.percentile(0.999)),
        level.errors,
        if level.error_samples.is_empty() {
            String::new()
        } else {
            format!(" (e.g. {:?})", level.error_samples)
        }
    );
}

fn table(levels: &[Level]) -> String {
    let mut text = String::from(
        "## Results\n\n\
         | clients | writes/s | p50 ms | p99 ms | p99.9 ms | errors |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for level in levels {
        let _ = writeln!(
            text,
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
            level.clients,
            level.writes_per_second(),
            ms(level.percentile(0.50)),
            ms(level.percentile(0.99)),
            ms(level.percentile(0.999)),
            level.errors
        );
    }
    text
}

fn comparison(levels: &[Level]) -> String {
    let mut text = String::from(
        "## Against etcd 3.4.23 (recorded: one node, data on disk, this kind of machine)\n\n\
         Ratios are mantissa / etcd: above 1 is better for writes/s, below 1 is better for \
         latency. Not like for like: mantissa runs 3 nodes on the same cores and disk, each \
         storing every write, and acknowledges after its local fsync (replication is \
         asynchronous); etcd is a single node acknowledging after its own fsync.\n\n\
         | clients | mantissa writes/s | etcd writes/s | ratio | mantissa p50 | etcd p50 | ratio | mantissa p99 | etcd p99 | ratio |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for baseline in &ETCD_BASELINE {
        let Some(level) = levels
            .iter()
            .find(|level| level.clients == baseline.clients)
        else {
            continue;
        };
        let ours = level.writes_per_second();
        let p50 = ms(level.percentile(0.50));
        let p99 = ms(level.percentile(0.99));
        let ratio = |ours: f64, theirs: Option<f64>| {
            theirs.map_or("—".to_owned(), |theirs| format!("{:.2}", ours / theirs))
        };
        let shown =
            |value: Option<f64>| value.map_or("—".to_owned(), |value| format!("{value:.2}"));
        let _ = writeln!(
            text,
            "| {} | {ours:.0} | {:.0} | {} | {p50:.2} ms | {} | {} | {p99:.2} ms | {} | {} |",
            baseline.clients,
            baseline.writes_per_second,
            ratio(ours, Some(baseline.writes_per_second)),
            shown(baseline.p50_ms),
            ratio(p50, baseline.p50_ms),
            shown(baseline.p99_ms),
            ratio(p99, baseline.p99_ms),
        );
    }
    text
}

fn cpu_table(levels: &[Level]) -> String {
    let mut text = String::from(
        "## CPU in the measured window (seconds of CPU per second; the machine has the cores \
         listed above)\n\n\
         | clients | bench clients | node-0 | node-1 | node-2 | clients' share |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for level in levels {
        let secs = level.measured.as_secs_f64();
        let total = level.client_cpu + level.agent_cpu.iter().sum::<f64>();
        let agents: Vec<String> = level
            .agent_cpu
            .iter()
            .map(|cpu| format!("{:.2}", cpu / secs))
            .collect();
        let _ = writeln!(
            text,
            "| {} | {:.2} | {} | {:.0} % |",
            level.clients,
            level.client_cpu / secs,
            agents.join(" | "),
            if total > 0.0 {
                100.0 * level.client_cpu / total
            } else {
                0.0
            }
        );
    }
    text
}

/// Each node's storage counters: commits, writes per commit, time in fsync.
fn storage_summary(cluster: &Cluster) -> String {
    let mut text = String::from(
        "## Storage (whole run)\n\n\
         | node | commits | deltas written | deltas per commit | mean commit ms | max commit ms |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for node in 0..cluster.len() {
        let status = cluster.get_json(node, "/v1/status");
        let storage = &status["storage"];
        let commits = storage["commits"].as_f64().unwrap_or(0.0);
        let deltas = storage["deltas_written"].as_f64().unwrap_or(0.0);
        let sync = storage["sync_seconds"].as_f64().unwrap_or(0.0);
        let max_sync = storage["max_sync_seconds"].as_f64().unwrap_or(0.0);
        let per = |total: f64| if commits > 0.0 { total / commits } else { 0.0 };
        let _ = writeln!(
            text,
            "| {} | {commits:.0} | {deltas:.0} | {:.1} | {:.2} | {:.1} |",
            cluster.agent(node).name,
            per(deltas),
            per(sync) * 1000.0,
            max_sync * 1000.0
        );
    }
    text
}

impl Level {
    fn writes_per_second(&self) -> f64 {
        self.writes as f64 / self.measured.as_secs_f64()
    }

    fn percentile(&self, quantile: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() as f64 * quantile).ceil() as usize)
            .clamp(1, self.latencies.len());
        self.latencies[index - 1]
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The agent binary and where its path came from: cargo's, `MANTISSA_BIN`, or the release
/// build in the target directory.
fn binary() -> (PathBuf, &'static str) {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let candidates = [
        (
            option_env!("CARGO_BIN_EXE_mantissa").map(PathBuf::from),
            "CARGO_BIN_EXE_mantissa",
        ),
        (
            std::env::var_os("MANTISSA_BIN").map(PathBuf::from),
            "MANTISSA_BIN",
        ),
        (
            Some(target_dir.join("release").join("mantissa")),
            "the target directory",
        ),
    ];
    let found = candidates.iter().find_map(|(path, source)| {
        path.as_ref()
            .filter(|path| path.is_file())
            .map(|path| (path.clone(), *source))
    });
    found.unwrap_or_else(|| {
        let looked: Vec<_> = candidates
            .iter()
            .filter_map(|(path, _)| path.as_ref())
            .collect();
        eprintln!(
            "http_cluster: the mantissa binary is missing (looked at {looked:?}); build it with \
             `cargo build --release` or set MANTISSA_BIN"
        );
        std::process::exit(1);
    })
}

fn levels() -> Vec<usize> {
    match std::env::var("MANTISSA_BENCH_LEVELS") {
        Ok(text) => {
            text.split(',')
                .map(|level| {
                    level.trim().parse().unwrap_or_else(|_| {
                        panic!("MANTISSA_BENCH_LEVELS: {level:?} is not a number")
                    })
                })
                .collect()
        }
        Err(_) => DEFAULT_LEVELS.to_vec(),
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: {text:?} is not a number")),
        Err(_) => default,
    }
}

/// CPU seconds (user + system) used so far by this process and by each of `pids`.
fn cpu_seconds(pids: &[u32]) -> (f64, Vec<f64>) {
    let own = process_cpu("self");
    let agents = pids
        .iter()
        .map(|pid| process_cpu(&pid.to_string()))
        .collect();
    (own, agents)
}

/// utime + stime of `/proc/<pid>/stat`, in seconds (0 where /proc is not available).
fn process_cpu(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&index| fields.get(index)?.parse::<f64>().ok())
        .sum();
    ticks / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
