//! The gossip protocol at cluster sizes no machine could run for real, in the message-level
//! [`Simulation`]: how fast a write reaches every node, over how many hops, with how many duplicate
//! deliveries, and what an idle cluster sends. Prints markdown tables.
//!
//! `cargo bench --bench gossip_scale` runs 100, 1,000 and 10,000 nodes, each with 1 ms links and
//! with 1 ms + up to 1 ms of jitter; `-- --quick` (or `GOSSIP_SCALE_QUICK=1`) a small run of 100
//! and 1,000 nodes with fewer writes. Other arguments: `--sizes 100,1000`, `--writes N` (per run),
//! `--no-jitter`, `--seed N`, `--view N` (initial membership view of the partial-view runs),
//! `--view-from N` (sizes from which runs are partial-view; 2,001 by default), and to try other
//! settings `--graft-timeout MS` and `--announce-delay MS`. `GOSSIP_SCALE_VERBOSE=1` prints
//! progress. Each run is a child process of its own, so its wall time and peak RSS (VmHWM) are
//! its own.
//!
//! Each run: a cluster whose nodes know every other from the start (`Simulation::new`), a warm-up,
//! single writes from random nodes spaced 250 ms apart so they never overlap, then a quiet period
//! of 30 simulated seconds (one cycle of SWIM's periodic announce). Duplicates are split into the
//! first writes (the push tree still prunes itself) and the rest.
//!
//! Partial-view runs (10,000 nodes) cannot run SWIM: it is a full-membership protocol, and from a
//! partial view it spreads every member to every node: 10⁸ member entries, and foca's member
//! lookup is a linear scan that clones a name per member, so a 10,000-node simulation ran at
//! ~0.005× real time and grew by GBs per simulated second. Instead each node knows `--view` random
//! others (`Simulation::with_view`), which is all the push tree and anti-entropy need (3 eager + 6
//! lazy peers), and every SWIM datagram is dropped (`datagram_loss` 1). The run must end before
//! SWIM would declare unanswered members down (suspicion lasts 16 s at 10,000 nodes); it reports
//! the member-down events it saw, and no idle traffic. `--sizes 1000 --view-from 1000` checks the
//! mode against the full 1,000-node run.

#[path = "common/process.rs"]
mod process;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mantissa::crdt::Key;
use mantissa::gossip::{Config, NetworkModel, Simulation, Stats};
use process::{peak_rss_kib, reset_peak_rss};

/// Writes counted as "first" (before the push tree has pruned itself).
const FIRST_WRITES: usize = 10;
/// How long a write may take to reach everyone before the run moves on.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// The gap between two writes, from the first: lets announcements and grafts finish.
const WRITE_SPACING: Duration = Duration::from_millis(250);
/// Bytes in each written value.
const VALUE_LEN: usize = 100;
const KINDS: [&str; 9] = [
    "swim",
    "digest",
    "in-sync",
    "sync-request",
    "sync",
    "ihave",
    "push",
    "graft",
    "prune",
];

#[derive(Clone)]
struct Options {
    sizes: Vec<usize>,
    writes: Option<usize>,
    jitter: bool,
    view: usize,
    view_from: usize,
    seed: u64,
    quick: bool,
    graft_timeout: Option<Duration>,
    announce_delay: Option<Duration>,
    /// Run only this (size, jitter) in this process, and print its rows for the parent.
    child: Option<(usize, bool)>,
}

fn options() -> Options {
    let mut options = Options {
        sizes: vec![100, 1_000, 10_000],
        writes: None,
        jitter: true,
        view: 48,
        view_from: 2_001,
        seed: 7,
        quick: std::env::var("GOSSIP_SCALE_QUICK").is_ok_and(|v| !v.is_empty() && v != "0"),
        graft_timeout: None,
        announce_delay: None,
        child: None,
    };
    let mut args = std::env::args().skip(1);
    let mut sizes_given = false;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        let number = |name: &str, text: String| -> u64 {
            text.trim()
                .replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {text}"))
        };
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--no-jitter" => options.jitter = false,
            "--sizes" => {
                sizes_given = true;
                options.sizes = value("--sizes")
                    .split(',')
                    .map(|s| number("--sizes", s.to_string()) as usize)
                    .collect();
            }
            "--writes" => options.writes = Some(number(&arg, value(&arg)) as usize),
            "--view" => options.view = number(&arg, value(&arg)) as usize,
            "--view-from" => options.view_from = number(&arg, value(&arg)) as usize,
            "--seed" => options.seed = number(&arg, value(&arg)),
            "--graft-timeout" => {
                options.graft_timeout = Some(Duration::from_millis(number(&arg, value(&arg))));
            }
            "--announce-delay" => {
                options.announce_delay = Some(Duration::from_millis(number(&arg, value(&arg))));
            }
            "--child" => {
                let spec = value(&arg);
                let (size, jitter) = spec.split_once(',').expect("--child SIZE,JITTER");
                options.child = Some((number(&arg, size.into()) as usize, jitter == "1"));
            }
            // `cargo bench` passes `--bench`; ignore it and anything else unknown.
            _ => {}
        }
    }
    if options.quick && !sizes_given {
        options.sizes = vec![100, 1_000];
    }
    options
}

/// What one run measured.
struct Run {
    size: usize,
    jitter: bool,
    view: Option<usize>,
    writes: usize,
    incomplete: usize,
    /// Per write: time until every node held it.
    full: Vec<Duration>,
    /// Per write: time until 99% of the nodes held it.
    ninety_nine: Vec<Duration>,
    /// Hops of every push delivery of the steady writes.
    hops: Vec<u16>,
    /// Duplicate deliveries per node: of the very first write, of the first writes, of the rest.
    dup_very_first: f64,
    dup_first: f64,
    dup_steady: f64,
    /// Grafts (writes fetched after an announcement) per steady write, in the whole cluster.
    grafts_steady: f64,
    /// Dissemination bytes (push, ihave, graft, prune) per node per steady write.
    dissemination_bytes: f64,
    /// Idle bytes per node per second, in total and by kind (NaN: not measured).
    idle: f64,
    idle_by_kind: BTreeMap<&'static str, f64>,
    members_known: f64,
    /// Per node: version vectors kept for causal stability, and their entries in all.
    reports: (f64, f64),
    member_downs: u64,
    wall: Duration,
    peak_rss_kib: Option<u64>,
}

fn main() {
    let options = options();
    if let Some((size, jitter)) = options.child {
        let run = run(&options, size, jitter);
        println!("SUMMARY\t{}", summary(&run));
        println!("ROW\t{}", row(&run));
        if let Some(idle) = idle_row(&run) {
            println!("IDLE\t{idle}");
        }
        return;
    }
    println!(
        "gossip_scale: sizes {:?}, {} mode, seed {}{}{}",
        options.sizes,
        if options.quick { "quick" } else { "full" },
        options.seed,
        options
            .graft_timeout
            .map_or(String::new(), |d| format!(", graft timeout {d:?}")),
        options
            .announce_delay
            .map_or(String::new(), |d| format!(", announce delay {d:?}")),
    );
    let mut rows = Vec::new();
    let mut idle_rows = Vec::new();
    for &size in &options.sizes {
        let mut jitters = vec![false];
        if options.jitter {
            jitters.push(true);
        }
        for &jitter in &jitters {
            let (summary, row, idle) = match run_in_child(size, jitter) {
                Some(lines) => lines,
                None => {
                    let run = run(&options, size, jitter);
                    (summary(&run), row(&run), idle_row(&run))
                }
            };
            println!("{summary}");
            rows.push(row);
            idle_rows.extend(idle);
        }
    }
    println!();
    println!(
        "| nodes | links | writes | all informed p50 (ms) | p99 (ms) | 99% informed p99 (ms) | \
         hops p50 / p99 / max | dup/node first write | first {FIRST_WRITES} | steady | \
         grafts/update | push+ihave+graft+prune B/node/update | idle B/s/node | \
         member-down events | wall (s) | peak RSS |"
    );
    println!("|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!("{row}");
    }
    if !idle_rows.is_empty() {
        println!();
        println!(
            "Idle traffic by message kind, bytes sent per node per second over a quiet period \
             without writes:"
        );
        println!();
        print!("| nodes | links | quiet (s) | members known |");
        for kind in KINDS {
            print!(" {kind} |");
        }
        println!(" total |");
        println!("|---:|---|---:|---:|{}---:|", "---:|".repeat(KINDS.len()));
        for row in &idle_rows {
            println!("{row}");
        }
    }
}

/// Runs one (size, jitter) in a child process of this binary; `None` if it could not be started.
fn run_in_child(size: usize, jitter: bool) -> Option<(String, String, Option<String>)> {
    let exe = std::env::current_exe().ok()?;
    let output = Command::new(exe)
        .args(std::env::args().skip(1))
        .arg("--child")
        .arg(format!("{size},{}", u8::from(jitter)))
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    assert!(
        output.status.success(),
        "the run of {size} nodes failed: {}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = |tag: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(tag).map(str::to_string))
    };
    Some((line("SUMMARY\t")?, line("ROW\t")?, line("IDLE\t")))
}

fn run(options: &Options, size: usize, jitter: bool) -> Run {
    reset_peak_rss();
    let wall = Instant::now();
    let quick = options.quick;
    let view = (size >= options.view_from).then_some(options.view);
    let writes = options.writes.unwrap_or(match (quick, size) {
        (true, s) if s <= 100 => 40,
        (true, _) => 20,
        (false, s) if s <= 1_000 && view.is_none() => 200,
        (false, _) => 50,
    });
    let mut config = Config::lan();
    config.cluster_size = NonZeroU32::new(size as u32).expect("size > 0");
    if let Some(timeout) = options.graft_timeout {
        config.graft_timeout = timeout;
    }
    if let Some(delay) = options.announce_delay {
        config.announce_delay = delay;
    }
    let network = NetworkModel {
        latency: Duration::from_millis(1),
        jitter: if jitter {
            Duration::from_millis(1)
        } else {
            Duration::ZERO
        },
        // Partial-view runs silence SWIM (see the top of this file).
        datagram_loss: if view.is_some() { 1.0 } else { 0.0 },
    };
    let start = Instant::now();
    let seed = options.seed;
    let mut sim = match view {
        None => Simulation::new(size, config, network, seed, start),
        Some(view) => Simulation::with_view(size, view, config, network, seed, start),
    };
    let mut rng = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    let mut next = move |bound: usize| {
        // xorshift64*: deterministic choice of writers, independent of the simulation's rng.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % bound
    };
    let verbose = size >= 5_000 || std::env::var_os("GOSSIP_SCALE_VERBOSE").is_some();
    let progress = |sim: &Simulation, what: &str| {
        if verbose {
            eprintln!(
                "  [{size} nodes{}] {what}: simulated {:.1} s, wall {:.1} s, {:.0} members known \
                 per node, {} messages delivered, peak RSS {}",
                if jitter { ", jitter" } else { "" },
                (sim.now() - start).as_secs_f64(),
                wall.elapsed().as_secs_f64(),
                members_known(sim),
                sim.delivered.0,
                rss(peak_rss_kib()),
            );
        }
    };

    // Warm-up: SWIM probes and settles. Partial-view runs have no SWIM to settle, and must end
    // before its suspicion would time out.
    let warmup = match (quick, view) {
        (true, None) => Duration::from_secs(3),
        (false, None) => Duration::from_secs(10),
        (_, Some(_)) => Duration::from_secs(2),
    };
    let mut writes = writes;
    if view.is_some() {
        // Without SWIM, unanswered probes make members suspect, and foca's LAN settings declare
        // them down after 4 · log10(size) probe periods of 1 s: the writes must be over by then
        // (the first probe fails ~1.5 s in).
        let suspicion = Duration::from_secs_f64((size as f64).log10().max(1.0) * 4.0);
        let window = suspicion.saturating_sub(warmup + Duration::from_millis(1_500));
        let fit = (window.as_millis() / WRITE_SPACING.as_millis()) as usize;
        if fit < writes {
            eprintln!(
                "  [{size} nodes] {fit} writes instead of {writes}: SWIM would declare members down"
            );
            writes = fit;
        }
    }
    let warm_until = sim.now() + warmup;
    while sim.now() < warm_until {
        let step = (warm_until - sim.now()).min(Duration::from_secs(1));
        sim.run_for(step);
        progress(&sim, "warm-up");
    }

    let mut full = Vec::new();
    let mut ninety_nine = Vec::new();
    let mut hops = Vec::new();
    let mut incomplete = 0;
    let mut dup_very_first = 0u64;
    let mut dup_first = 0u64;
    let mut dup_steady = 0u64;
    let mut grafts_steady = 0u64;
    let mut dissemination_steady = 0u64;
    let value = vec![0xa5u8; VALUE_LEN];
    for k in 0..writes {
        let before = sim.total_stats();
        let writer = next(size);
        let key = Key::new(format!("bench/w{k:05}")).expect("valid key");
        let dot = sim
            .write(writer, |r| {
                r.put(key, value.clone(), 1_700_000_000_000 + k as u64)
                    .map(Some)
            })
            .expect("write")
            .expect("a put writes");
        sim.track(dot);
        let written = sim.now();
        sim.run_until(written + WRITE_DEADLINE, Simulation::tracked_complete);
        // Let announcements, grafts and prunes of this write finish before the next.
        let settle = (written + WRITE_SPACING).max(sim.now() + Duration::from_millis(1));
        sim.run_until(settle, |_| false);
        let delivery = sim.untrack(dot).expect("tracked");
        match delivery.complete_after() {
            Some(after) => full.push(after),
            None => incomplete += 1,
        }
        if let Some(after) = delivery.time_to_fraction(0.99) {
            ninety_nine.push(after);
        }
        if k % 10 == 9 {
            progress(&sim, &format!("{} writes", k + 1));
        }
        let after = sim.total_stats();
        let duplicates = after.duplicate_writes - before.duplicate_writes;
        if k == 0 {
            dup_very_first = duplicates;
        }
        if k < FIRST_WRITES {
            dup_first += duplicates;
        } else {
            dup_steady += duplicates;
            hops.extend_from_slice(delivery.hops());
            grafts_steady += after.grafts - before.grafts;
            dissemination_steady += ["push", "ihave", "graft", "prune"]
                .iter()
                .map(|kind| kind_bytes(&after, kind) - kind_bytes(&before, kind))
                .sum::<u64>();
        }
    }
    let first = writes.min(FIRST_WRITES);
    let steady = writes - first;
    let per_node = |total: u64, count: usize| {
        if count == 0 {
            f64::NAN
        } else {
            total as f64 / (size as f64 * count as f64)
        }
    };
    let member_downs = sim.membership_events.1;

    // Quiet period: no writes at all. SWIM's periodic announce runs every 30 s: a full cycle,
    // where it can be afforded. Partial-view runs have no SWIM to measure.
    let quiet = match (quick, view) {
        (_, Some(_)) => Duration::ZERO,
        (true, None) => Duration::from_secs(10),
        (false, None) => Duration::from_secs(30),
    };
    let mut idle = f64::NAN;
    let mut idle_by_kind = BTreeMap::new();
    if !quiet.is_zero() {
        sim.run_for(Duration::from_secs(2));
        let before = sim.total_stats();
        let quiet_until = sim.now() + quiet;
        while sim.now() < quiet_until {
            let step = (quiet_until - sim.now()).min(Duration::from_secs(5));
            sim.run_for(step);
            progress(&sim, "quiet");
        }
        let after = sim.total_stats();
        let rate = |bytes: u64| bytes as f64 / size as f64 / quiet.as_secs_f64();
        idle = rate(after.bytes_sent - before.bytes_sent);
        idle_by_kind = KINDS
            .iter()
            .map(|kind| {
                let bytes = kind_bytes(&after, kind) - kind_bytes(&before, kind);
                (*kind, rate(bytes))
            })
            .collect();
        idle_by_kind.insert("quiet", quiet.as_secs_f64());
    }

    full.sort();
    ninety_nine.sort();
    hops.sort_unstable();
    Run {
        size,
        jitter,
        view,
        writes,
        incomplete,
        full,
        ninety_nine,
        hops,
        dup_very_first: per_node(dup_very_first, usize::from(writes > 0)),
        dup_first: per_node(dup_first, first),
        dup_steady: per_node(dup_steady, steady),
        grafts_steady: per_node(grafts_steady, steady) * size as f64,
        dissemination_bytes: per_node(dissemination_steady, steady),
        idle,
        idle_by_kind,
        members_known: members_known(&sim),
        reports: reports(&sim),
        member_downs,
        wall: wall.elapsed(),
        peak_rss_kib: peak_rss_kib(),
    }
}

fn members_known(sim: &Simulation) -> f64 {
    let known: usize = sim.nodes().iter().map(|n| n.members().count()).sum();
    known as f64 / sim.nodes().len() as f64
}

fn reports(sim: &Simulation) -> (f64, f64) {
    let nodes = sim.nodes().len() as f64;
    let (count, entries) = sim.nodes().iter().fold((0, 0), |(count, entries), node| {
        let reports = node.reports();
        (
            count + reports.len(),
            entries + reports.values().map(|v| v.len()).sum::<usize>(),
        )
    });
    (count as f64 / nodes, entries as f64 / nodes)
}

fn kind_bytes(stats: &Stats, kind: &str) -> u64 {
    stats.bytes_sent_by_kind.get(kind).copied().unwrap_or(0)
}

fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("–".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
}

fn number(value: f64, decimals: usize) -> String {
    if value.is_nan() {
        "n/a".into()
    } else {
        format!("{value:.decimals$}")
    }
}

fn rss(kib: Option<u64>) -> String {
    kib.map_or("–".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
}

fn links(run: &Run) -> String {
    let mut s = String::from(if run.jitter { "1 ms + ≤1 ms" } else { "1 ms" });
    if let Some(view) = run.view {
        s.push_str(&format!(", view {view}, no SWIM"));
    }
    s
}

fn summary(run: &Run) -> String {
    format!(
        "{} nodes, {}: {} writes ({} incomplete), all informed p99 {} ms, duplicates per node \
         first/steady {}/{}, idle {} B/s/node, {:.0} members known, {:.0} version vectors \
         ({:.0} entries) kept per node for stability, {} member-down events, wall {:.1} s, \
         peak RSS {}",
        run.size,
        links(run),
        run.writes,
        run.incomplete,
        ms(percentile(&run.full, 99.0)),
        number(run.dup_first, 2),
        number(run.dup_steady, 2),
        number(run.idle, 0),
        run.members_known,
        run.reports.0,
        run.reports.1,
        run.member_downs,
        run.wall.as_secs_f64(),
        rss(run.peak_rss_kib),
    )
}

fn row(run: &Run) -> String {
    let hop = |p| percentile(&run.hops, p).map_or("–".into(), |h: u16| h.to_string());
    let writes = if run.incomplete > 0 {
        format!("{} ({} incomplete)", run.writes, run.incomplete)
    } else {
        run.writes.to_string()
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |",
        run.size,
        links(run),
        writes,
        ms(percentile(&run.full, 50.0)),
        ms(percentile(&run.full, 99.0)),
        ms(percentile(&run.ninety_nine, 99.0)),
        hop(50.0),
        hop(99.0),
        hop(100.0),
        number(run.dup_very_first, 2),
        number(run.dup_first, 2),
        number(run.dup_steady, 3),
        number(run.grafts_steady, 2),
        number(run.dissemination_bytes, 0),
        number(run.idle, 0),
        run.member_downs,
        run.wall.as_secs_f64(),
        rss(run.peak_rss_kib),
    )
}

fn idle_row(run: &Run) -> Option<String> {
    if run.idle.is_nan() {
        return None;
    }
    let mut row = format!(
        "| {} | {} | {:.0} | {:.0} |",
        run.size,
        links(run),
        run.idle_by_kind.get("quiet").copied().unwrap_or(0.0),
        run.members_known
    );
    for kind in KINDS {
        let rate = run.idle_by_kind.get(kind).copied().unwrap_or(0.0);
        row.push_str(&format!(" {rate:.1} |"));
    }
    row.push_str(&format!(" {:.1} |", run.idle));
    Some(row)
}
