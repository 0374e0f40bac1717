//! Fault injection with real agent processes: each agent in its own network namespace, clients
//! recording a history while a seeded nemesis partitions, drops packets, pauses, kills and
//! restarts nodes; then every fault heals and checkers judge the history and the final state.
//!
//! Needs root, `ip` and `nft` (network namespaces and nftables); without them the test prints
//! `SKIPPED faults: <why>` and passes, or fails if `MANTISSA_REQUIRE_ALL_SUITES=1` (CI sets it).
//! Replay a run with `MANTISSA_FAULT_SEED=<seed>` (printed at the start of each run); run more
//! with `MANTISSA_FAULT_SEEDS=<n>`, longer with `MANTISSA_FAULT_SECS=<s>`, larger with
//! `MANTISSA_FAULT_NODES=<n>`. The seed fixes the nemesis schedule and every client's choices;
//! thread timing still varies from run to run. The ignored `soak_…` test runs rounds of faults on
//! one cluster for 10 minutes and tracks memory and tombstones. See docs/testing.md.

#[path = "support/agent.rs"]
mod agent;
#[path = "support/faults_check.rs"]
mod check;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/requires.rs"]
mod requires;
#[path = "support/rng.rs"]
mod rng;
#[path = "support/faults_sched.rs"]
mod sched;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;

use agent::{Cluster, encode_path, encode_query, request_once};
use check::{Action, NodeState, Op, Outcome, Register, Violation};
use netns::{Faults, Network};

const BINARY: &str = env!("CARGO_BIN_EXE_mantissa");
/// The seeds CI runs: fixed, so a red CI run replays exactly the same schedule.
const CI_SEEDS: [u64; 2] = [0x6d61_6e74_0001, 0x6d61_6e74_0002];
/// Nodes, and seconds of faults per seed, unless the environment says otherwise: small enough
/// for a shared 2-core CI machine.
const DEFAULT_NODES: usize = 5;
const DEFAULT_SECS: u64 = 20;
const HTTP_PORT: u16 = 7700;
const GOSSIP_PORT: u16 = 7701;
/// How long after the last fault heals every node must hold the same state.
const CONVERGENCE: Duration = Duration::from_secs(30);
/// How long an agent gets to start answering, or to exit after SIGTERM.
const PATIENCE: Duration = Duration::from_secs(30);
/// How long after healing every task may still be held twice: membership counts every member
/// live again within `Config::membership_heal_bound` (7 s on a LAN), then a scheduling round or
/// two settle the copies. (Before that bound existed, two members could count each other dead
/// for about a minute after back-to-back partitions, and this was 90 s.)
const SCHEDULING_CONVERGENCE: Duration = Duration::from_secs(30);
/// Once the workload's keys and the scheduling state have converged, how long every node gets
/// to report the same state digest. The version vectors are equal by then; what differs is
/// tombstones, which each node collects on its own 10 s timer once it knows every member has
/// seen the delete (observed: up to 20 s after the workload converged, CI seed 2).
const DIGEST_PATIENCE: Duration = Duration::from_secs(60);
/// `wait=` on requests carrying a token: short, so that a client stuck behind a partition moves
/// on (a `504` is a definite failure) instead of holding its history still.
const CLIENT_WAIT: &str = "3s";
/// Register keys of the workload (few, so writes contend).
const REGISTER_KEYS: usize = 3;

#[test]
fn faults_keep_acknowledged_writes_sessions_and_convergence() {
    if !requires::suite_can_run("faults", &netns::NEEDS) {
        return;
    }
    let settings = Settings::from_env();
    println!("faults: {settings:?}");
    let mut failures = Vec::new();
    for &seed in &settings.seeds {
        let started = Instant::now();
        if let Err(report) = run_seed(seed, &settings) {
            failures.push(report);
        }
        println!("faults: seed {seed:#x} took {:.1?}", started.elapsed());
    }
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed:\n{}",
        failures.len(),
        settings.seeds.len(),
        failures.join("\n")
    );
}

/// The soak (on demand, not in CI; see docs/testing.md): `MANTISSA_FAULT_NODES` agents (5)
/// under rounds of seeded faults for `MANTISSA_SOAK_SECS` (600). Each round is
/// `MANTISSA_FAULT_SECS` (60) of faults with the clients on keys of its own, then heal and every
/// check of the CI run; a churn client writes and deletes fresh keys throughout, so tombstones
/// are made all the time. Every 5 s the agents' resident memory and tombstone counts are
/// sampled. At the end: every round passed, the tombstones are all collected once the churn
/// stops, and the memory of the last round is within [`SOAK_MEMORY_GROWTH`] of the second's.
#[test]
#[ignore = "a 10-minute soak, run on demand: see docs/testing.md"]
fn soak_keeps_memory_bounded_and_every_round_correct() {
    if !requires::suite_can_run("soak", &netns::NEEDS) {
        return;
    }
    let number = |name: &str, default: u64| {
        std::env::var(name).ok().map_or(default, |text| {
            parse_number(&text).unwrap_or_else(|| panic!("{name}={text} is not a number"))
        })
    };
    let nodes = number("MANTISSA_FAULT_NODES", 5) as usize;
    let round_time = Duration::from_secs(number("MANTISSA_FAULT_SECS", 60));
    let total = Duration::from_secs(number("MANTISSA_SOAK_SECS", 600));
    let seed = number("MANTISSA_FAULT_SEED", clock_seed());
    println!(
        "soak: seed {seed:#x}, {nodes} agents, {total:?} in rounds of {round_time:?} (replay: \
         MANTISSA_FAULT_SEED={seed:#x} MANTISSA_FAULT_NODES={nodes} MANTISSA_FAULT_SECS={} \
         MANTISSA_SOAK_SECS={})",
        round_time.as_secs(),
        total.as_secs()
    );
    let mut cluster = FaultCluster::start(nodes)
        .unwrap_or_else(|err| panic!("running as root, but the network cannot be built: {err}"));
    let namespaces: Vec<String> = (0..nodes).map(|n| cluster.net.namespace(n)).collect();
    let addrs: Vec<SocketAddr> = (0..nodes).map(|n| cluster.http(n)).collect();
    let began = Instant::now();
    let sampling = AtomicBool::new(true);
    let (outcome, samples) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                samples.extend(soak_sample(&namespaces, &addrs, began.elapsed()));
                std::thread::sleep(Duration::from_secs(5));
            }
            samples
        });
        let mut rounds = Vec::new();
        let mut failure = None;
        for round in 0.. {
            if round > 0 && began.elapsed() + round_time > total {
                break;
            }
            let round_seed = seed.wrapping_add(round as u64);
            let schedule = schedule(round_seed, nodes, round_time);
            let text = format!("soak round {round}, seed {round_seed:#x}: {schedule:?}");
            let round_began = began.elapsed();
            match run_round(&mut cluster, round_seed, round, &schedule, &text, true) {
                Ok(churn) => {
                    println!(
                        "soak: round {round} passed ({:.0?}), churn {churn:?}",
                        began.elapsed()
                    );
                    rounds.push((round_began, began.elapsed()));
                }
                Err(report) => {
                    failure = Some(format!("round {round} failed:\n{report}"));
                    break;
                }
            }
        }
        let collected = failure.is_none().then(|| tombstones_collected(&addrs));
        sampling.store(false, Ordering::Relaxed);
        let samples = sampler.join().expect("sampler thread");
        ((rounds, failure, collected), samples)
    });
    let (rounds, failure, collected) = outcome;
    print_soak(&rounds, &samples, nodes);
    if let Some(failure) = failure {
        panic!("{failure}");
    }
    if let Some(Err(err)) = collected {
        panic!("{err}");
    }
    let in_round = |index: usize| {
        let (from, to) = rounds[index];
        samples
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .filter_map(|s| s.rss_kib)
            .max()
            .unwrap_or(0)
    };
    assert!(rounds.len() >= 3, "the soak needs at least 3 rounds");
    let (second, last) = (in_round(1), in_round(rounds.len() - 1));
    let bound = second as f64 * SOAK_MEMORY_GROWTH + SOAK_MEMORY_SLACK_KIB as f64;
    assert!(
        last as f64 <= bound,
        "resident memory grew: the largest agent held {} MiB in the last round, {} MiB in the \
         second (bound {:.0} MiB)",
        last / 1024,
        second / 1024,
        bound / 1024.0
    );
}

/// The soak's memory bound: the largest agent's resident memory in the last round is at most
/// this many times its size in the second round (after the first warmed up), plus
/// [`SOAK_MEMORY_SLACK_KIB`]. The live data grows a little each round (a set of a few thousand
/// short elements, a few keys), which the slack covers.
const SOAK_MEMORY_GROWTH: f64 = 1.5;
const SOAK_MEMORY_SLACK_KIB: u64 = 32 * 1024;

/// One soak sample of one agent.
struct SoakSample {
    at: Duration,
    node: usize,
    /// `None` while the agent is down (killed, restarting).
    rss_kib: Option<u64>,
    tombstones: Option<u64>,
}

fn soak_sample(namespaces: &[String], addrs: &[SocketAddr], at: Duration) -> Vec<SoakSample> {
    (0..namespaces.len())
        .map(|node| {
            let pid = Command::new("ip")
                .args(["netns", "pids", &namespaces[node]])
                .output()
                .ok()
                .and_then(|out| {
                    String::from_utf8_lossy(&out.stdout)
                        .split_whitespace()
                        .next()
                        .map(str::to_owned)
                });
            let rss_kib = pid.and_then(|pid| {
                let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse().ok()
            });
            let tombstones = request_once(addrs[node], "GET", "/v1/status", b"")
                .ok()
                .filter(|response| response.status == 200)
                .and_then(|response| response.json()["tombstones"].as_u64());
            SoakSample {
                at,
                node,
                rss_kib,
                tombstones,
            }
        })
        .collect()
}

/// Waits until no agent holds an uncollected tombstone (the churn has stopped).
fn tombstones_collected(addrs: &[SocketAddr]) -> Result<(), String> {
    let patience = Duration::from_secs(90);
    let deadline = Instant::now() + patience;
    loop {
        let counts: Vec<Option<u64>> = addrs
            .iter()
            .map(|&addr| {
                request_once(addr, "GET", "/v1/status", b"")
                    .ok()
                    .filter(|response| response.status == 200)
                    .and_then(|response| response.json()["tombstones"].as_u64())
            })
            .collect();
        if counts.iter().all(|count| *count == Some(0)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "tombstones not collected {patience:?} after the churn stopped: {counts:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The soak's figures: per round, the largest resident memory and tombstone count per agent.
fn print_soak(rounds: &[(Duration, Duration)], samples: &[SoakSample], nodes: usize) {
    println!("soak: per round, each agent's largest resident memory (MiB) and tombstones");
    for (index, &(from, to)) in rounds.iter().enumerate() {
        let mut line = format!(
            "  round {index:>2} [{:>4.0}s..{:>4.0}s]",
            from.as_secs_f64(),
            to.as_secs_f64()
        );
        for node in 0..nodes {
            let of_node = || {
                samples
                    .iter()
                    .filter(move |s| s.node == node && s.at >= from && s.at <= to)
            };
            let rss = of_node().filter_map(|s| s.rss_kib).max().unwrap_or(0);
            let tombstones = of_node().filter_map(|s| s.tombstones).max().unwrap_or(0);
            let _ = write!(
                line,
                " | node-{node} {:>4} MiB {tombstones:>5} t",
                rss / 1024
            );
        }
        println!("{line}");
    }
}

/// The soak's churn client: writes fresh keys and deletes each one 50 writes later, on random
/// nodes, until `stop`. Its answers are counted, not checked.
fn churn_loop(addrs: &[SocketAddr], seed: u64, round: usize, stop: &AtomicBool) -> Churn {
    const LAG: u64 = 50;
    let mut rng = Rng(seed ^ 0xC4_0A2E);
    let mut churn = Churn::default();
    // Where each of the last LAG keys was written: its delete goes to the same node, which
    // holds the key whatever the partitions.
    let mut written_at = [0usize; LAG as usize];
    for n in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let slot = (n % LAG) as usize;
        if let Some(old) = n.checked_sub(LAG) {
            let path = format!("/v1/kv/churn/{round}/{old}");
            match request_once(addrs[written_at[slot]], "DELETE", &path, b"") {
                Ok(response) if response.status == 200 => churn.deletes += 1,
                _ => churn.failed += 1,
            }
        }
        let node = rng.below(addrs.len() as u64) as usize;
        written_at[slot] = node;
        let path = format!("/v1/kv/churn/{round}/{n}");
        match request_once(addrs[node], "PUT", &path, b"churned") {
            Ok(response) if response.status == 200 => churn.writes += 1,
            _ => churn.failed += 1,
        }
        std::thread::sleep(Duration::from_millis(5 + rng.below(10)));
    }
    churn
}

/// The run's shape, from the environment.
#[derive(Debug)]
struct Settings {
    seeds: Vec<u64>,
    nodes: usize,
    fault_time: Duration,
}

/// One agent process and what it is started with.
struct Node {
    name: String,
    addr: Ipv4Addr,
    data_dir: PathBuf,
    child: Option<Child>,
    /// Starts so far; each logs to its own files.
    starts: usize,
}

/// Agents in a private network, with the certificates and scratch directory of an (otherwise
/// empty) loopback [`Cluster`].
struct FaultCluster {
    nodes: Vec<Node>,
    net: Network,
    /// Owns the scratch directory (removed on drop) and the CA.
    files: Cluster,
}

/// How far ahead the last node's wall clock runs, in milliseconds.
const CLOCK_SKEW_MS: i64 = 90_000;

/// One fault of the schedule.
#[derive(Clone, Debug)]
enum Fault {
    /// Gossip between `side` and the other nodes is dropped both ways.
    Partition { side: Vec<usize> },
    /// One node cut off from every other.
    Isolate(usize),
    /// The other nodes split in two sides that cannot reach each other, while this node reaches
    /// both: a non-transitive partition, where the bridge relays what the sides cannot exchange.
    Bridge(usize),
    /// Each node reaches only its two neighbours in a ring (0-1-2-…-0); with 3 nodes it is no cut.
    Ring,
    /// Every node drops this percentage of incoming gossip packets.
    Loss(u8),
    /// SIGSTOP, then SIGCONT.
    Pause(usize),
    /// SIGKILL, then a start on the same data directory.
    Kill(usize),
    /// SIGTERM (exit 0 expected), then a start on the same data directory.
    Restart(usize),
}

/// A fault held for `hold`, then healed, then `quiet` without faults.
#[derive(Clone, Debug)]
struct Step {
    fault: Fault,
    hold: Duration,
    quiet: Duration,
}

/// SplitMix64: small, seedable, good enough to pick faults and operations.
struct Rng(u64);

impl Settings {
    fn from_env() -> Settings {
        let number = |name: &str| {
            std::env::var(name).ok().map(|text| {
                parse_number(&text).unwrap_or_else(|| panic!("{name}={text} is not a number"))
            })
        };
        let seeds = match (
            number("MANTISSA_FAULT_SEED"),
            number("MANTISSA_FAULT_SEEDS"),
        ) {
            (Some(seed), _) => vec![seed],
            (None, Some(count)) => {
                let mut rng = Rng(clock_seed());
                let extra = (CI_SEEDS.len() as u64..count).map(|_| rng.next());
                CI_SEEDS
                    .iter()
                    .copied()
                    .take(count as usize)
                    .chain(extra)
                    .collect()
            }
            (None, None) => CI_SEEDS.to_vec(),
        };
        let nodes = number("MANTISSA_FAULT_NODES").map_or(DEFAULT_NODES, |n| n as usize);
        assert!(
            (2..=32).contains(&nodes),
            "MANTISSA_FAULT_NODES must be 2..=32"
        );
        let secs = number("MANTISSA_FAULT_SECS").unwrap_or(DEFAULT_SECS);
        Settings {
            seeds,
            nodes,
            fault_time: Duration::from_secs(secs),
        }
    }
}

/// Runs one seed: start, load under faults, heal, converge, check. `Err` is the report.
fn run_seed(seed: u64, settings: &Settings) -> Result<(), String> {
    let schedule = schedule(seed, settings.nodes, settings.fault_time);
    let mut text = format!(
        "faults: seed {seed:#x} (replay: MANTISSA_FAULT_SEED={seed:#x} \
         MANTISSA_FAULT_NODES={} MANTISSA_FAULT_SECS={}), schedule:\n",
        settings.nodes,
        settings.fault_time.as_secs()
    );
    for step in &schedule {
        let _ = writeln!(text, "  {step:?}");
    }
    println!("{text}");

    let mut cluster = FaultCluster::start(settings.nodes)
        .unwrap_or_else(|err| panic!("running as root, but the network cannot be built: {err}"));
    run_round(&mut cluster, seed, 0, &schedule, &text, false).map(drop)
}

/// What the churn client of a soak round did.
#[derive(Debug, Default)]
struct Churn {
    writes: u64,
    deletes: u64,
    failed: u64,
}

/// One round on a running cluster: clients (on the round's own keys) and the scheduling client
/// under the nemesis `schedule`, heal, converge, check. With `churn`, one more client writes
/// and deletes fresh keys (tombstones) without being checked. `Err` is the report.
fn run_round(
    cluster: &mut FaultCluster,
    seed: u64,
    round: usize,
    schedule: &[Step],
    text: &str,
    churn: bool,
) -> Result<Churn, String> {
    let nodes = cluster.nodes.len();
    let addrs: Vec<SocketAddr> = (0..nodes).map(|i| cluster.http(i)).collect();
    let start = Instant::now();
    let stop = AtomicBool::new(false);
    let (nemesis, histories, scheduling, churned) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..nodes)
            .map(|client| {
                let (addrs, stop) = (&addrs, &stop);
                scope.spawn(move || client_loop(client, addrs, seed, round, start, stop))
            })
            .collect();
        let scheduler = scope.spawn(|| sched::client(&addrs, seed, &stop));
        let churner = churn.then(|| scope.spawn(|| churn_loop(&addrs, seed, round, &stop)));
        let nemesis = run_schedule(cluster, schedule);
        // Heal before stopping the clients, so their last operations see a whole cluster.
        let healed = cluster.heal();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let histories: Vec<(Vec<Op>, Option<String>)> = clients
            .into_iter()
            .map(|client| client.join().expect("client thread"))
            .collect();
        let scheduling = scheduler.join().expect("scheduling client thread");
        let churned = churner
            .map(|churner| churner.join().expect("churn thread"))
            .unwrap_or_default();
        (nemesis.and(healed), histories, scheduling, churned)
    });
    let (histories, tokens): (Vec<Vec<Op>>, Vec<Option<String>>) = histories.into_iter().unzip();
    let history: Vec<Op> = histories.into_iter().flatten().collect();
    let summary = format!(
        "{}; jobs: {} submitted, {} indeterminate, {} ledger reads",
        summarize(&history),
        scheduling.submitted.len(),
        scheduling.indeterminate.len(),
        scheduling.reads
    );
    println!("faults: seed {seed:#x} history: {summary}");
    if let Ok(checked) = check::causal_across_keys(&history) {
        println!("faults: causal order across keys held {checked} times (value read, then set)");
    }

    let mut violations = Vec::new();
    if let Err(err) = nemesis {
        violations.push(Violation {
            check: "faults run as scheduled",
            detail: err,
            ops: Vec::new(),
        });
    }
    let finals = cluster.converge(round);
    violations.extend(check::check_all(&history, &finals));
    if let Some(violation) = cluster.tokens_satisfiable(&history, &tokens) {
        violations.push(violation);
    }
    violations.extend(sched::check_converged(
        &addrs,
        &scheduling,
        SCHEDULING_CONVERGENCE,
    ));
    violations.extend(cluster.digests_agree());
    if violations.is_empty() {
        return Ok(churned);
    }
    let mut report = format!("===== seed {seed:#x} FAILED ({summary})\n{text}");
    for violation in &violations {
        let _ = writeln!(report, "{violation}");
    }
    report.push_str(&cluster.log_tails());
    eprintln!("{report}");
    Err(report)
}

/// The faults of one run, from its seed: about `total` of faults with quiet gaps between them.
fn schedule(seed: u64, nodes: usize, total: Duration) -> Vec<Step> {
    let mut rng = Rng(seed);
    let mut steps = Vec::new();
    let mut planned = Duration::ZERO;
    while planned < total {
        let node = rng.below(nodes as u64) as usize;
        let fault = match rng.below(8) {
            0 => {
                let mut side: Vec<usize> = (0..nodes).filter(|_| rng.below(2) == 0).collect();
                if side.is_empty() || side.len() == nodes {
                    side = (0..nodes / 2).collect();
                }
                Fault::Partition { side }
            }
            1 => Fault::Isolate(node),
            2 => Fault::Loss(10 + rng.below(50) as u8),
            3 => Fault::Pause(node),
            4 => Fault::Kill(node),
            5 => Fault::Restart(node),
            6 => Fault::Bridge(node),
            _ => Fault::Ring,
        };
        let hold = Duration::from_millis(1_000 + rng.below(3_000));
        let quiet = Duration::from_millis(500 + rng.below(1_500));
        planned += hold + quiet;
        steps.push(Step { fault, hold, quiet });
    }
    steps
}

fn run_schedule(cluster: &mut FaultCluster, schedule: &[Step]) -> Result<(), String> {
    // Let the clients make some history on a whole cluster first.
    std::thread::sleep(Duration::from_secs(1));
    for step in schedule {
        cluster.inflict(&step.fault, step.hold)?;
        std::thread::sleep(step.quiet);
    }
    Ok(())
}

impl FaultCluster {
    /// Builds the network, issues certificates and starts `n` durable agents that know each
    /// other, waiting until each answers `/v1/health`.
    fn start(n: usize) -> Result<FaultCluster, String> {
        let net = Network::create(n)?;
        let mut files = Cluster::new(BINARY, "faults");
        let ca = files.ca_dir().to_owned();
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("node-{i}");
            files.issue(&ca, &name);
            nodes.push(Node {
                data_dir: files.root().join(&name).join("data"),
                addr: net.node_addr(i),
                name,
                child: None,
                starts: 0,
            });
        }
        let mut cluster = FaultCluster { nodes, net, files };
        for node in 0..n {
            cluster.spawn(node);
        }
        for node in 0..n {
            cluster.wait_healthy(node)?;
        }
        cluster.wait_formed()?;
        Ok(cluster)
    }

    fn http(&self, node: usize) -> SocketAddr {
        SocketAddr::from((self.nodes[node].addr, HTTP_PORT))
    }

    fn spawn(&mut self, node: usize) {
        let logs = self.files.root().join("logs");
        fs::create_dir_all(&logs).expect("create the log directory");
        let ca = self.files.ca_dir().to_owned();
        let peers: Vec<Ipv4Addr> = self.nodes.iter().map(|n| n.addr).collect();
        let mut command = self.net.command(node, std::path::Path::new(BINARY));
        let this = &mut self.nodes[node];
        assert!(this.child.is_none(), "{} already runs", this.name);
        this.starts += 1;
        let tls = |file: String| ca.join(file).display().to_string();
        command
            .args(["agent", "--node-id", &this.name])
            .args(["--bind", &format!("{}:{GOSSIP_PORT}", this.addr)])
            .args(["--http", &format!("{}:{HTTP_PORT}", this.addr)])
            .arg("--data-dir")
            .arg(&this.data_dir)
            .args(["--tls-ca", &tls("ca.pem".to_owned())])
            .args(["--tls-cert", &tls(format!("{}.pem", this.name))])
            .args(["--tls-key", &tls(format!("{}-key.pem", this.name))])
            .args(sched::agent_args());
        for peer in peers.iter().filter(|&&peer| peer != this.addr) {
            command.args(["--join", &format!("{peer}:{GOSSIP_PORT}")]);
        }
        let log = |stream: &str| {
            let path = logs.join(format!("{}.{}.{stream}", this.name, this.starts));
            fs::File::create(path).expect("create a log file")
        };
        if node + 1 == peers.len() && peers.len() > 1 {
            // One node's wall clock runs ahead: its timestamps must not let its writes win over
            // writes that causally follow them (the hybrid logical clock's job).
            command.env("MANTISSA_DANGER_CLOCK_OFFSET_MS", CLOCK_SKEW_MS.to_string());
        }
        command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log("stdout"))
            .stderr(log("stderr"));
        this.child = Some(command.spawn().expect("spawn ip netns exec mantissa agent"));
    }

    fn wait_healthy(&mut self, node: usize) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.exit_status(node) {
                let name = &self.nodes[node].name;
                return Err(format!("{name} exited with {status} instead of starting"));
            }
            let healthy = request_once(self.http(node), "GET", "/v1/health", b"")
                .is_ok_and(|response| response.status == 200);
            if healthy {
                return Ok(());
            }
            if Instant::now() > deadline {
                let name = &self.nodes[node].name;
                return Err(format!("{name} did not answer /v1/health in {PATIENCE:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every node lists every node in `/v1/members`.
    fn wait_formed(&self) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        let everyone = self.nodes.len();
        for node in 0..everyone {
            loop {
                let members = request_once(self.http(node), "GET", "/v1/members", b"")
                    .ok()
                    .filter(|response| response.status == 200)
                    .map(|response| agent::member_names(&response.json()).len());
                if members == Some(everyone) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "node {node} lists {members:?} of {everyone} members"
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    fn exit_status(&mut self, node: usize) -> Option<ExitStatus> {
        let child = self.nodes[node].child.as_mut()?;
        let status = child.try_wait().expect("poll an agent")?;
        self.nodes[node].child = None;
        Some(status)
    }

    fn signal(&self, node: usize, signal: &str) -> Result<(), String> {
        let this = &self.nodes[node];
        let pid = this.child.as_ref().map(Child::id);
        let pid = pid.ok_or_else(|| format!("{} is not running", this.name))?;
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .map_err(|err| format!("run kill: {err}"))?;
        match sent.success() {
            true => Ok(()),
            false => Err(format!("kill {signal} {} ({pid}) failed", this.name)),
        }
    }

    /// Applies `fault`, holds it for `hold`, and heals it.
    fn inflict(&mut self, fault: &Fault, hold: Duration) -> Result<(), String> {
        let everyone: Vec<usize> = (0..self.nodes.len()).collect();
        match fault {
            Fault::Partition { side } => {
                let other: Vec<usize> = everyone
                    .iter()
                    .filter(|n| !side.contains(n))
                    .copied()
                    .collect();
                self.cut(side, &other)?;
            }
            Fault::Isolate(node) => {
                let other: Vec<usize> = everyone.iter().filter(|n| *n != node).copied().collect();
                self.cut(&[*node], &other)?;
            }
            Fault::Bridge(bridge) => {
                let (a, b): (Vec<usize>, Vec<usize>) = everyone
                    .iter()
                    .filter(|n| *n != bridge)
                    .partition(|&&n| n % 2 == 0);
                self.cut(&a, &b)?;
            }
            Fault::Ring => {
                let n = everyone.len();
                for &node in &everyone {
                    let blocked = everyone
                        .iter()
                        .filter(|&&other| {
                            other != node && other != (node + 1) % n && other != (node + n - 1) % n
                        })
                        .map(|&other| self.nodes[other].addr)
                        .collect();
                    let faults = Faults {
                        blocked,
                        ..Faults::default()
                    };
                    self.net.set_faults(node, &faults)?;
                }
            }
            Fault::Loss(percent) => {
                for &node in &everyone {
                    let faults = Faults {
                        loss_percent: *percent,
                        ..Faults::default()
                    };
                    self.net.set_faults(node, &faults)?;
                }
            }
            Fault::Pause(node) => self.signal(*node, "-STOP")?,
            Fault::Kill(node) => {
                self.signal(*node, "-KILL")?;
                self.wait_exit(*node)?;
            }
            Fault::Restart(node) => {
                self.signal(*node, "-TERM")?;
                let status = self.wait_exit(*node)?;
                if !status.success() {
                    let name = &self.nodes[*node].name;
                    return Err(format!("{name} exited with {status} after SIGTERM, not 0"));
                }
            }
        }
        std::thread::sleep(hold);
        match fault {
            Fault::Pause(node) => self.signal(*node, "-CONT"),
            Fault::Kill(node) | Fault::Restart(node) => {
                self.spawn(*node);
                self.wait_healthy(*node)
            }
            _ => self.net.heal(),
        }
    }

    /// Drops gossip between every node of `a` and every node of `b`, both ways.
    fn cut(&self, a: &[usize], b: &[usize]) -> Result<(), String> {
        let addrs = |nodes: &[usize]| nodes.iter().map(|&n| self.nodes[n].addr).collect();
        for &node in a {
            let blocked = addrs(b);
            self.net.set_faults(
                node,
                &Faults {
                    blocked,
                    ..Faults::default()
                },
            )?;
        }
        for &node in b {
            let blocked = addrs(a);
            self.net.set_faults(
                node,
                &Faults {
                    blocked,
                    ..Faults::default()
                },
            )?;
        }
        Ok(())
    }

    fn wait_exit(&mut self, node: usize) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.exit_status(node) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let name = &self.nodes[node].name;
                return Err(format!("{name} did not exit within {PATIENCE:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes every network fault, resumes every node and starts any that is down.
    fn heal(&mut self) -> Result<(), String> {
        self.net.heal()?;
        for node in 0..self.nodes.len() {
            if self.nodes[node].child.is_some() {
                self.signal(node, "-CONT")?;
            } else {
                self.spawn(node);
                self.wait_healthy(node)?;
            }
        }
        Ok(())
    }

    /// Waits up to [`CONVERGENCE`] for every node to report the same version vector and hold
    /// the same state; returns the states last read (equal unless the deadline passed).
    fn converge(&self, round: usize) -> Vec<NodeState> {
        let deadline = Instant::now() + CONVERGENCE;
        let started = Instant::now();
        loop {
            let versions: Vec<Option<Json>> = (0..self.nodes.len())
                .map(|node| {
                    self.read_json(node, "/v1/status")
                        .map(|s| s["version"].clone())
                })
                .collect();
            let finals: Vec<NodeState> = (0..self.nodes.len())
                .map(|node| self.state(node, round))
                .collect();
            let same_versions = versions[0].is_some() && versions.iter().all(|v| *v == versions[0]);
            if same_versions && check::check_convergence(&finals).is_ok() {
                println!("faults: converged {:.1?} after healing", started.elapsed());
                return finals;
            }
            if Instant::now() > deadline {
                println!("faults: NOT converged within {CONVERGENCE:?}: versions {versions:?}");
                return finals;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Whether every node reports the same state digest (`GET /v1/digest`: every key, the
    /// scheduling state's included, and every tombstone) within [`DIGEST_PATIENCE`].
    fn digests_agree(&self) -> Option<Violation> {
        let deadline = Instant::now() + DIGEST_PATIENCE;
        let started = Instant::now();
        loop {
            let digests: Vec<Option<String>> = (0..self.nodes.len())
                .map(|node| {
                    self.read_json(node, "/v1/digest")
                        .and_then(|json| json["digest"].as_str().map(str::to_owned))
                })
                .collect();
            if digests[0].is_some() && digests.iter().all(|digest| *digest == digests[0]) {
                println!(
                    "faults: identical state digests {:.1?} after the other checks",
                    started.elapsed()
                );
                return None;
            }
            if Instant::now() > deadline {
                return Some(Violation {
                    check: "convergence (state digests)",
                    detail: format!(
                        "the nodes' state digests still differ {DIGEST_PATIENCE:?} after the \
                         workload converged: {digests:?}"
                    ),
                    ops: Vec::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What node `node` holds of the workload's keys.
    fn state(&self, node: usize, round: usize) -> NodeState {
        let registers = (0..REGISTER_KEYS)
            .map(|k| {
                let key = register_key(round, k);
                let read = self.read_json(node, &format!("/v1/kv/{}", encode_path(&key)));
                (key, read.map(|json| register_of(&json)))
            })
            .collect();
        let counter = self.read_json(node, &format!("/v1/counter/{}", counter_key(round)));
        let set = self.read_json(node, &format!("/v1/set/{}", set_key(round)));
        NodeState {
            node,
            registers,
            counter: counter.and_then(|json| json["value"].as_i64()),
            set: set.map(|json| strings(&json["value"])).unwrap_or_default(),
        }
    }

    /// `GET path` as JSON; `None` for 404 or any failure (a converging check retries).
    fn read_json(&self, node: usize, path: &str) -> Option<Json> {
        let response = request_once(self.http(node), "GET", path, b"").ok()?;
        (response.status == 200).then(|| response.json())
    }

    /// Session liveness: once converged, each client's last token is covered at every node.
    /// A token names writes some node applied; a token that no node can cover any more (its
    /// writes were lost) would leave its client waiting forever.
    fn tokens_satisfiable(&self, history: &[Op], tokens: &[Option<String>]) -> Option<Violation> {
        for (client, token) in tokens.iter().enumerate() {
            let Some(token) = token else { continue };
            for node in 0..self.nodes.len() {
                let path = format!("/v1/status?after={}&wait=10s", encode_query(token));
                let status = request_once(self.http(node), "GET", &path, b"").map(|r| r.status);
                if matches!(status, Ok(200)) {
                    continue;
                }
                let last = history
                    .iter()
                    .rev()
                    .find(|op| op.client == client && op.outcome == Outcome::Ok);
                return Some(Violation {
                    check: "session tokens stay satisfiable",
                    detail: format!(
                        "node {node} answers {status:?} to client {client}'s last token {token} \
                         after convergence"
                    ),
                    ops: last.cloned().into_iter().collect(),
                });
            }
        }
        None
    }

    fn log_tails(&self) -> String {
        let logs = self.files.root().join("logs");
        let mut text = format!("===== agent logs ({})\n", logs.display());
        for node in &self.nodes {
            for start in 1..=node.starts {
                for stream in ["stdout", "stderr"] {
                    let path = logs.join(format!("{}.{start}.{stream}", node.name));
                    agent::append_tail(&mut text, &path);
                }
            }
        }
        text
    }
}

impl Drop for FaultCluster {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
    }
}

impl Rng {
    fn next(&mut self) -> u64 {
        rng::splitmix64(&mut self.0)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// One client: a session that keeps its latest token, mostly talks to its own node and sometimes
/// to another, until `stop`. Returns its operations in the order made.
fn client_loop(
    client: usize,
    addrs: &[SocketAddr],
    seed: u64,
    round: usize,
    start: Instant,
    stop: &AtomicBool,
) -> (Vec<Op>, Option<String>) {
    let mut rng = Rng(seed ^ (client as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    let mut token: Option<String> = None;
    let mut history = Vec::new();
    let mut sequence = 0u64;
    while !stop.load(Ordering::Relaxed) {
        sequence += 1;
        let node = match rng.below(100) < 80 {
            true => client % addrs.len(),
            false => rng.below(addrs.len() as u64) as usize,
        };
        let unique = format!("c{client}-{sequence}");
        let key = register_key(round, rng.below(REGISTER_KEYS as u64) as usize);
        let (method, route, body, action) = match rng.below(6) {
            0 => {
                let route = format!("/v1/kv/{}", encode_path(&key));
                let value = unique.clone();
                (
                    "PUT",
                    route,
                    unique.into_bytes(),
                    Action::RegisterWrite { key, value },
                )
            }
            1 => {
                let route = format!("/v1/kv/{}", encode_path(&key));
                (
                    "GET",
                    route,
                    Vec::new(),
                    Action::RegisterRead { key, read: None },
                )
            }
            2 => {
                let route = format!("/v1/counter/{}", counter_key(round));
                ("POST", route, br#"{"add": 1}"#.to_vec(), Action::CounterAdd)
            }
            3 => {
                let route = format!("/v1/counter/{}", counter_key(round));
                (
                    "GET",
                    route,
                    Vec::new(),
                    Action::CounterRead { value: None },
                )
            }
            4 => {
                let route = format!("/v1/set/{}", set_key(round));
                let body = format!(r#"{{"add": ["{unique}"]}}"#).into_bytes();
                ("POST", route, body, Action::SetAdd { element: unique })
            }
            _ => {
                let route = format!("/v1/set/{}", set_key(round));
                ("GET", route, Vec::new(), Action::SetRead { elements: None })
            }
        };
        let path = match &token {
            Some(token) => format!("{route}?after={}&wait={CLIENT_WAIT}", encode_query(token)),
            None => route,
        };
        let invoked = start.elapsed();
        let response = request_once(addrs[node], method, &path, &body);
        let completed = start.elapsed();
        let (outcome, action, new_token) = interpret(action, response);
        if let Some(new_token) = new_token {
            token = Some(new_token);
        }
        history.push(Op {
            client,
            node,
            action,
            invoked,
            completed,
            outcome,
            after: path.contains("?after="),
        });
        std::thread::sleep(Duration::from_millis(5 + rng.below(20)));
    }
    (history, token)
}

/// What an answer means for the operation: its outcome, what it read, and its token.
fn interpret(
    action: Action,
    response: std::io::Result<agent::Response>,
) -> (Outcome, Action, Option<String>) {
    let is_write = matches!(
        action,
        Action::RegisterWrite { .. } | Action::CounterAdd | Action::SetAdd { .. }
    );
    let response = match response {
        Ok(response) => response,
        Err(_) if is_write => return (Outcome::Indeterminate, action, None),
        Err(_) => return (Outcome::Fail, action, None),
    };
    let json: Option<Json> = serde_json::from_slice(&response.body).ok();
    let token = json
        .as_ref()
        .and_then(|json| json["token"].as_str().map(str::to_owned));
    let outcome = match response.status {
        200 => Outcome::Ok,
        404 if !is_write => Outcome::Ok,
        400..=499 | 504 => Outcome::Fail,
        _ if is_write => Outcome::Indeterminate,
        _ => Outcome::Fail,
    };
    if outcome != Outcome::Ok || is_write {
        return (outcome, action, token.filter(|_| outcome == Outcome::Ok));
    }
    let json = json.filter(|_| response.status == 200);
    let action = match action {
        Action::RegisterRead { key, .. } => {
            let read = json.as_ref().map(register_of);
            Action::RegisterRead { key, read }
        }
        Action::CounterRead { .. } => {
            let value = json.as_ref().and_then(|json| json["value"].as_i64());
            Action::CounterRead { value }
        }
        Action::SetRead { .. } => {
            let elements = json.as_ref().map(|json| strings(&json["value"]));
            Action::SetRead { elements }
        }
        other => other,
    };
    (outcome, action, token)
}

/// The workload's keys are per round (a soak runs many rounds on one cluster).
fn register_key(round: usize, index: usize) -> String {
    format!("f/{round}/register/{index}")
}

fn counter_key(round: usize) -> String {
    format!("f/{round}/counter")
}

fn set_key(round: usize) -> String {
    format!("f/{round}/set")
}

fn register_of(json: &Json) -> Register {
    let siblings = json["siblings"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    Register {
        value: json["value"].as_str().unwrap_or_default().to_owned(),
        siblings: siblings
            .iter()
            .filter_map(|sibling| sibling["value"].as_str().map(str::to_owned))
            .collect(),
    }
}

fn strings(json: &Json) -> BTreeSet<String> {
    let items = json.as_array().map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .filter_map(|item| item.as_str().map(str::to_owned))
        .collect()
}

/// Counts of operations by kind and outcome, for the log.
fn summarize(history: &[Op]) -> String {
    let mut counts: BTreeMap<(&str, Outcome), usize> = BTreeMap::new();
    for op in history {
        let kind = match op.action {
            Action::RegisterWrite { .. } => "register-write",
            Action::RegisterRead { .. } => "register-read",
            Action::CounterAdd => "counter-add",
            Action::CounterRead { .. } => "counter-read",
            Action::SetAdd { .. } => "set-add",
            Action::SetRead { .. } => "set-read",
        };
        *counts.entry((kind, op.outcome)).or_default() += 1;
    }
    let mut text = format!("{} ops", history.len());
    for ((kind, outcome), count) in counts {
        let _ = write!(text, ", {kind} {outcome:?} {count}");
    }
    text
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn clock_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    nanos ^ u64::from(std::process::id())
}

#[test]
fn a_schedule_is_a_function_of_its_seed() {
    let a = format!("{:?}", schedule(7, 5, Duration::from_secs(30)));
    let b = format!("{:?}", schedule(7, 5, Duration::from_secs(30)));
    let c = format!("{:?}", schedule(8, 5, Duration::from_secs(30)));
    assert_eq!(a, b);
    assert_ne!(a, c);
}
