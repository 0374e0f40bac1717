//! The scenarios: what each one drives into every system, and the rows it reports.
//!
//! Each scenario is a function from the [`Deployment`] and the [`Plan`] to a [`Report`]; a new
//! one slots in as a variant, a name and a function. Partition and bandwidth are in
//! `isolated.rs` (they need a network of their own), scheduling in `scheduling.rs`.

use std::collections::HashMap;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::isolated::{self, IsolatedPlan};
use crate::progress::Progress;
use crate::report::{Layout, Report, Row};
use crate::scheduling::{self, SchedulingPlan};
use crate::systems::{Connection, Deployment, ReadMode, System};

/// Bytes in every value written.
pub const VALUE_LEN: usize = 100;

/// A workload from issue 6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Write,
    Read,
    Visibility,
    Watch,
    /// A member cut off, clients on both sides, time to converge after the heal.
    Partition,
    /// Bytes on the wire per write, and idle traffic.
    Bandwidth,
    /// Placements/s, submit-to-admitted and conflicts with 1, 3 and 10 concurrent schedulers
    /// (etcd: compare-and-swap placement, for reference).
    Scheduling,
}

/// Durations and sizes of a run.
pub struct Plan {
    pub quick: bool,
    /// Load before the measured window, per case.
    pub warm_up: Duration,
    /// The measured window, per case.
    pub measured: Duration,
    pub write_clients: Vec<usize>,
    pub read_clients: Vec<usize>,
    /// Keys preloaded for the read scenario.
    pub read_keys: usize,
    /// Paced writes whose arrival is timed, per system (visibility) and per level (watch).
    pub propagation_writes: usize,
    /// The pace of those writes: one per interval.
    pub propagation_interval: Duration,
    /// Watchers per member, per level of the watch scenario.
    pub watchers_per_member: Vec<usize>,
    /// Tasks, jobs and cases of the scheduling scenario.
    pub scheduling: SchedulingPlan,
    /// Durations of the partition and bandwidth scenarios.
    pub isolated: IsolatedPlan,
}

/// One timed operation.
struct Sample {
    latency: Duration,
    /// The operation saw what it should (a read found the value).
    hit: bool,
}

/// What the writes and watchers of a propagation run saw.
struct Propagation {
    /// Per write: the member written to, when the request was sent, when it was acknowledged.
    writes: Vec<(usize, Instant, Instant)>,
    /// Per watcher: its member, and when each write (by number) arrived.
    watchers: Vec<(usize, HashMap<u64, Instant>)>,
    /// Watchers on the members other than a write's: arrivals each write should have.
    expected: usize,
    errors: Vec<String>,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::Write,
        Scenario::Read,
        Scenario::Visibility,
        Scenario::Watch,
        Scenario::Partition,
        Scenario::Bandwidth,
        Scenario::Scheduling,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Write => "write",
            Scenario::Read => "read",
            Scenario::Visibility => "visibility",
            Scenario::Watch => "watch",
            Scenario::Partition => "partition",
            Scenario::Bandwidth => "bandwidth",
            Scenario::Scheduling => "scheduling",
        }
    }

    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL
            .into_iter()
            .find(|scenario| scenario.name() == name)
    }

    /// Runs the scenario against every system.
    pub fn run(self, deployment: &Deployment, plan: &Plan, progress: &Progress) -> Report {
        match self {
            Scenario::Write => write(deployment, plan, progress),
            Scenario::Read => read(deployment, plan, progress),
            Scenario::Visibility => visibility(deployment, plan, progress),
            Scenario::Watch => watch(deployment, plan, progress),
            Scenario::Partition => isolated::partition(deployment, &plan.isolated, progress),
            Scenario::Bandwidth => isolated::bandwidth(deployment, &plan.isolated, progress),
            Scenario::Scheduling => scheduling::run(deployment, &plan.scheduling, progress),
        }
    }
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                warm_up: Duration::from_millis(500),
                measured: Duration::from_secs(3),
                write_clients: vec![1, 16],
                read_clients: vec![16],
                read_keys: 200,
                propagation_writes: 150,
                propagation_interval: Duration::from_millis(10),
                watchers_per_member: vec![1, 8],
                scheduling: SchedulingPlan::new(true),
                isolated: IsolatedPlan::new(true),
            }
        } else {
            Plan {
                quick,
                warm_up: Duration::from_secs(1),
                measured: Duration::from_secs(10),
                write_clients: vec![1, 16, 64],
                read_clients: vec![1, 16],
                read_keys: 1000,
                propagation_writes: 1000,
                propagation_interval: Duration::from_millis(10),
                watchers_per_member: vec![1, 16],
                scheduling: SchedulingPlan::new(false),
                isolated: IsolatedPlan::new(false),
            }
        }
    }
}

fn clients_case(clients: usize) -> String {
    match clients {
        1 => "1 client".to_owned(),
        _ => format!("{clients} clients"),
    }
}

fn value() -> Vec<u8> {
    vec![b'v'; VALUE_LEN]
}

/// Scenario 1, write: throughput and latency at each client count.
fn write(deployment: &Deployment, plan: &Plan, progress: &Progress) -> Report {
    let mut rows = Vec::new();
    for system in System::ALL {
        for &clients in &plan.write_clients {
            let value = value();
            let label = format!("write: {} with {clients} clients", system.name());
            let mut row = load(
                deployment,
                system,
                clients,
                plan,
                progress,
                &label,
                false,
                |home, _, client, n| {
                    let key = format!("bench/write/{clients}/{client}/{n}");
                    let began = Instant::now();
                    home.put(&key, &value)?;
                    Ok(Sample {
                        latency: began.elapsed(),
                        hit: true,
                    })
                },
            );
            row.case = clients_case(clients);
            rows.push(row);
        }
    }
    Report {
        scenario: "write",
        method: format!(
            "Fresh keys, {VALUE_LEN}-byte values; clients spread round-robin over the 3 members, \
             one connection each; {:.1} s measured after {:.1} s of warm-up per case. \
             Latency = request sent to acknowledgement received.",
            plan.measured.as_secs_f64(),
            plan.warm_up.as_secs_f64()
        ),
        layout: Layout::Throughput,
        rows,
        failures: Vec::new(),
    }
}

/// Scenario 2, read: etcd linearizable and serializable, mantissa local, and reads that must see a
/// write just acknowledged by another member.
fn read(deployment: &Deployment, plan: &Plan, progress: &Progress) -> Report {
    let mut rows = Vec::new();
    for system in System::ALL {
        progress.step(&format!(
            "read: preloading {} keys into {}",
            plan.read_keys,
            system.name()
        ));
        if let Err(err) = preload(deployment, system, plan.read_keys) {
            let mut row = Row::new(system.name(), "preload", None);
            row.error(err);
            rows.push(row);
            continue;
        }
        let local = match system {
            System::Etcd => "serializable",
            _ => "local",
        };
        let mut cases: Vec<(&str, Option<ReadMode>)> = vec![(local, Some(ReadMode::Local))];
        if system == System::Etcd {
            cases.push(("linearizable", Some(ReadMode::Linearizable)));
        }
        cases.push(("after a write at another member", None));
        for &clients in &plan.read_clients {
            for (case, mode) in &cases {
                let label = format!("read: {} {case}, {clients} clients", system.name());
                let keys = plan.read_keys as u64;
                let value = value();
                let mut row = load(
                    deployment,
                    system,
                    clients,
                    plan,
                    progress,
                    &label,
                    mode.is_none(),
                    |home, other, client, n| match (mode, other) {
                        (Some(mode), _) => {
                            let key = format!("bench/read/{}", (client as u64 * 7919 + n) % keys);
                            let began = Instant::now();
                            let hit = home.get(&key, mode)?;
                            Ok(Sample {
                                latency: began.elapsed(),
                                hit,
                            })
                        }
                        (None, Some(other)) => {
                            let key = format!("bench/read-after/{clients}/{client}/{n}");
                            let token = home.put(&key, &value)?;
                            let mode = match token {
                                Some(token) => ReadMode::After(token),
                                None => ReadMode::Linearizable,
                            };
                            let began = Instant::now();
                            let hit = other.get(&key, &mode)?;
                            Ok(Sample {
                                latency: began.elapsed(),
                                hit,
                            })
                        }
                        (None, None) => Err("no second connection".to_owned()),
                    },
                );
                row.case = format!("{case}, {}", clients_case(clients));
                rows.push(row);
            }
        }
    }
    Report {
        scenario: "read",
        method: format!(
            "{} preloaded keys read at random by clients spread over the 3 members. \
             'after a write at another member': each client writes a fresh key at its member, then \
             reads it at the next member (mantissa: `after=` the write's token, embedded: `wait_for` \
             then `get`, etcd: a linearizable read); only the read is timed; a miss is a read that \
             did not find the value. {:.1} s measured per case.",
            plan.read_keys,
            plan.measured.as_secs_f64()
        ),
        layout: Layout::Throughput,
        rows,
        failures: Vec::new(),
    }
}

/// Writes `bench/read/0..keys` at member 0, then waits until every member serves the last one
/// locally (in both systems a member applies one writer's writes in order).
fn preload(deployment: &Deployment, system: System, keys: usize) -> Result<(), String> {
    let mut writer = deployment.connect(system, 0)?;
    let value = value();
    for i in 0..keys {
        writer.put(&format!("bench/read/{i}"), &value)?;
    }
    let last = format!("bench/read/{}", keys.saturating_sub(1));
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in 0..3 {
        let mut reader = deployment.connect(system, node)?;
        while !reader.get(&last, &ReadMode::Local)? {
            if Instant::now() >= deadline {
                return Err(format!("member {node} did not get the preloaded keys"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Scenario 3, visibility: from a write's acknowledgement until the first other member, and then every
/// other member, has applied it (detected by a watch on each member).
fn visibility(deployment: &Deployment, plan: &Plan, progress: &Progress) -> Report {
    let mut rows = Vec::new();
    for system in System::ALL {
        progress.step(&format!("visibility: {}", system.name()));
        let mut first = Row::new(system.name(), "first other member", None);
        let mut all = Row::new(system.name(), "all members", None);
        match propagate(deployment, system, "visibility", 1, plan, progress) {
            Err(err) => first.error(err),
            Ok(run) => {
                for err in run.errors {
                    first.error(err);
                }
                for (n, &(writer, _, ack)) in run.writes.iter().enumerate() {
                    let arrivals: Vec<Option<Instant>> = run
                        .watchers
                        .iter()
                        .filter(|(node, _)| *node != writer)
                        .map(|(_, seen)| seen.get(&(n as u64)).copied())
                        .collect();
                    let delays: Vec<f64> = arrivals
                        .iter()
                        .flatten()
                        .map(|&at| signed_millis(at, ack))
                        .collect();
                    if let Some(min) = delays.iter().copied().reduce(f64::min) {
                        first.millis.push(min);
                        first.count += 1;
                    } else {
                        first.misses += 1;
                    }
                    if delays.len() == run.expected {
                        all.millis
                            .push(delays.iter().copied().fold(f64::MIN, f64::max));
                        all.count += 1;
                    } else {
                        all.misses += 1;
                    }
                }
            }
        }
        rows.push(first);
        rows.push(all);
    }
    Report {
        scenario: "visibility",
        method: format!(
            "{} writes, one every {} ms, rotating over the 3 members; one watch on every member. \
             Delay = the event's arrival at a watcher on another member minus the write's \
             acknowledgement at the writer, in ms (negative: the other member had it before the \
             writer heard back). 'all members' is the slowest of the two other members. \
             Arrival is observed through each system's watch, so it includes watch delivery.",
            plan.propagation_writes,
            plan.propagation_interval.as_millis()
        ),
        layout: Layout::Distribution,
        rows,
        failures: Vec::new(),
    }
}

/// Scenario 5, watch: from a write's request until each watcher on another member receives the event,
/// with 1 and more watchers per member.
fn watch(deployment: &Deployment, plan: &Plan, progress: &Progress) -> Report {
    let mut rows = Vec::new();
    for system in System::ALL {
        for &watchers in &plan.watchers_per_member {
            progress.step(&format!(
                "watch: {} with {watchers} watcher(s) per member",
                system.name()
            ));
            let mut row = Row::new(
                system.name(),
                match watchers {
                    1 => "1 watcher/member".to_owned(),
                    _ => format!("{watchers} watchers/member"),
                },
                Some(watchers),
            );
            match propagate(
                deployment,
                system,
                &format!("watch-{watchers}"),
                watchers,
                plan,
                progress,
            ) {
                Err(err) => row.error(err),
                Ok(run) => {
                    for err in run.errors {
                        row.error(err);
                    }
                    for (n, &(writer, sent, _)) in run.writes.iter().enumerate() {
                        let mut found = 0;
                        for (node, seen) in &run.watchers {
                            if *node == writer {
                                continue;
                            }
                            if let Some(&at) = seen.get(&(n as u64)) {
                                row.millis.push(signed_millis(at, sent));
                                row.count += 1;
                                found += 1;
                            }
                        }
                        row.misses += (run.expected - found) as u64;
                    }
                }
            }
            rows.push(row);
        }
    }
    Report {
        scenario: "watch",
        method: format!(
            "{} writes, one every {} ms, rotating over the 3 members; N watchers on every member \
             (etcd Watch API with a prefix, mantissa `GET /v1/watch?prefix=` NDJSON, embedded \
             `Handle::watch`). Latency = the request's sending to the event's arrival at each \
             watcher on another member (count = writes × watchers on the 2 other members).",
            plan.propagation_writes,
            plan.propagation_interval.as_millis()
        ),
        layout: Layout::Distribution,
        rows,
        failures: Vec::new(),
    }
}

/// Runs `clients` threads calling `op` in a loop for warm-up plus the measured window, timing
/// the calls made in the window. `op` gets the client's connection to its member (client `c`
/// talks to member `c % 3`), when asked for one to the next member, the client's number and
/// the call's number.
#[allow(clippy::too_many_arguments)]
fn load<F>(
    deployment: &Deployment,
    system: System,
    clients: usize,
    plan: &Plan,
    progress: &Progress,
    label: &str,
    needs_other: bool,
    op: F,
) -> Row
where
    F: Fn(&mut Connection, Option<&mut Connection>, usize, u64) -> Result<Sample, String> + Sync,
{
    let mut row = Row::new(system.name(), "", Some(clients));
    let barrier = Barrier::new(clients + 1);
    let total = plan.warm_up + plan.measured;
    let results: Vec<Row> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|client| {
                let (barrier, op) = (&barrier, &op);
                scope.spawn(move || {
                    let mut mine = Row::new(system.name(), "", None);
                    let connections = deployment.connect(system, client % 3).and_then(|home| {
                        let other = match needs_other {
                            true => Some(deployment.connect(system, (client + 1) % 3)?),
                            false => None,
                        };
                        Ok((home, other))
                    });
                    barrier.wait();
                    let (mut home, mut other) = match connections {
                        Ok(connections) => connections,
                        Err(err) => {
                            mine.error(err);
                            return mine;
                        }
                    };
                    let began = Instant::now();
                    let window = began + plan.warm_up;
                    let end = window + plan.measured;
                    for n in 0u64.. {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        match op(&mut home, other.as_mut(), client, n) {
                            Ok(sample) if now >= window => {
                                mine.count += 1;
                                mine.millis.push(sample.latency.as_secs_f64() * 1e3);
                                mine.misses += u64::from(!sample.hit);
                            }
                            Ok(_) => {}
                            Err(err) => {
                                mine.error(err);
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        barrier.wait();
        let began = Instant::now();
        while began.elapsed() < total {
            progress.tick(&format!(
                "{label}: {:.1}/{:.1} s",
                began.elapsed().as_secs_f64(),
                total.as_secs_f64()
            ));
            std::thread::sleep(Duration::from_millis(250));
        }
        threads
            .into_iter()
            .map(|thread| {
                thread.join().unwrap_or_else(|_| {
                    let mut failed = Row::new(system.name(), "", None);
                    failed.error("a client thread panicked".to_owned());
                    failed
                })
            })
            .collect()
    });
    row.seconds = Some(plan.measured.as_secs_f64());
    for result in results {
        row.count += result.count;
        row.misses += result.misses;
        row.millis.extend(result.millis);
        row.errors += result.errors;
        for sample in result.error_samples {
            if row.error_samples.len() < 3 {
                row.error_samples.push(sample);
            }
        }
    }
    row
}

/// Paced writes under `bench/<tag>/`, rotating over the members, with `per_member` watchers on
/// every member recording when each write arrives. A last write (`…/end`) tells the watchers to
/// stop.
fn propagate(
    deployment: &Deployment,
    system: System,
    tag: &str,
    per_member: usize,
    plan: &Plan,
    progress: &Progress,
) -> Result<Propagation, String> {
    let prefix = format!("bench/{tag}/");
    let end = format!("{prefix}end");
    let mut writers = (0..3)
        .map(|node| deployment.connect(system, node))
        .collect::<Result<Vec<_>, _>>()?;
    let watcher_nodes: Vec<usize> = (0..3 * per_member).map(|i| i % 3).collect();
    let barrier = Barrier::new(watcher_nodes.len() + 1);
    let value = value();
    std::thread::scope(|scope| {
        let threads: Vec<_> = watcher_nodes
            .iter()
            .map(|&node| {
                let (barrier, prefix, end) = (&barrier, &prefix, &end);
                scope.spawn(move || -> Result<HashMap<u64, Instant>, String> {
                    let watcher = deployment.watch(system, node, prefix);
                    barrier.wait();
                    let mut watcher = watcher?;
                    let mut seen = HashMap::new();
                    loop {
                        let keys = watcher.next_keys()?;
                        let now = Instant::now();
                        for key in keys {
                            if key == *end {
                                return Ok(seen);
                            }
                            if let Some(n) = key
                                .strip_prefix(prefix.as_str())
                                .and_then(|n| n.parse().ok())
                            {
                                seen.entry(n).or_insert(now);
                            }
                        }
                    }
                })
            })
            .collect();
        barrier.wait();
        let mut run = Propagation {
            writes: Vec::new(),
            watchers: Vec::new(),
            expected: 2 * per_member,
            errors: Vec::new(),
        };
        let began = Instant::now();
        for n in 0..plan.propagation_writes {
            let node = n % 3;
            let sent = Instant::now();
            match writers[node].put(&format!("{prefix}{n}"), &value) {
                Ok(_) => run.writes.push((node, sent, Instant::now())),
                Err(err) => {
                    run.errors.push(err);
                    // Keep the numbering: an unacknowledged write counts as never arriving.
                    run.writes.push((node, sent, Instant::now()));
                }
            }
            if n % 25 == 0 {
                progress.tick(&format!(
                    "{tag}: {} write {n}/{}",
                    system.name(),
                    plan.propagation_writes
                ));
            }
            let next = began + plan.propagation_interval * (n as u32 + 1);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        if let Err(err) = writers[0].put(&end, &value) {
            run.errors.push(format!("the end marker: {err}"));
        }
        for (thread, &node) in threads.into_iter().zip(&watcher_nodes) {
            match thread.join() {
                Ok(Ok(seen)) => run.watchers.push((node, seen)),
                Ok(Err(err)) => run.errors.push(format!("watcher on member {node}: {err}")),
                Err(_) => run
                    .errors
                    .push(format!("watcher on member {node} panicked")),
            }
        }
        Ok(run)
    })
}

/// `at - since` in milliseconds, negative when `at` came first.
fn signed_millis(at: Instant, since: Instant) -> f64 {
    match at.checked_duration_since(since) {
        Some(after) => after.as_secs_f64() * 1e3,
        None => -(since - at).as_secs_f64() * 1e3,
    }
}
