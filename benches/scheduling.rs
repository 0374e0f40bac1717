//! The pure scheduling model of `mantissa::sched` at 1,000 machines, with no network and no async
//! runtime: how many tasks it places per second of CPU, how long a task waits from submission to
//! admission, how often concurrent schedulers collide, and whether any machine is ever
//! over-committed. Prints markdown tables; results are in `docs/benchmarks.md`.
//!
//! `cargo bench --bench scheduling` runs 1, 3 and 10 schedulers over the same workload: 1,000
//! machines, a burst of 8,000 tasks submitted at once, then 2 waves of 200. `-- --quick` (or
//! `MANTISSA_BENCH_QUICK=1`) runs 200 machines and 2,000 tasks. Other arguments:
//! `--schedulers 1,3,10`, `--machines N`, `--hosts N`, `--tasks N` (the burst), `--waves N`,
//! `--wave-tasks N`, `--profile` (times the parts of one admission round at the final state).
//! `MANTISSA_BENCH_VERBOSE=1` prints every round. The burst is 8,000 rather than 10,000 or more
//! because each admission round costs time in proportion to the whole cluster's state (see
//! `docs/benchmarks.md`): `--tasks 10000` takes about twice as long as the default.
//!
//! Each scheduler has a replica of its own. It plans from the state it holds at the start of the
//! round, which is the same stale state for every scheduler, so they race for the same machines;
//! their deltas are exchanged only after all of them have planned. Each machine that received a
//! claim then runs its own `Cluster::admit` round, and the deltas of those rounds are applied to
//! every other replica before the next round starts. One round is 100 simulated milliseconds, so
//! a rejected task waits out its first 250 ms backoff for two rounds.
//!
//! **The approximation.** 1,000 machines with a full replica each would hold 1,000 copies of the
//! whole state (tens of MB each) and apply every delta 1,000 times. Instead the machines share a
//! few machine-side replicas (`--hosts`, 4 by default, 250 machines each). Every machine still
//! runs its own admission round, on its host's replica, and writes only its own keys, so sharing
//! a replica changes no decision: a ledger, a quota share or a claim deletion has one writer
//! either way. What it changes: (1) a machine sees the ledgers its host-mates wrote earlier in the
//! same round one round sooner than it would over the network, which only affects tasks held
//! twice, and there are none here; (2) applying deltas is measured on `schedulers + hosts`
//! replicas instead of `schedulers + 1,000`. The tables therefore give the apply time per replica
//! as well, from which the cost of 1,000 full replicas follows.
//!
//! CPU time is the bench thread's own (`CLOCK_THREAD_CPUTIME_ID`), summed over every `plan`,
//! `admit` and `apply` call of every simulated member. The "critical path" adds up, per round, the
//! slowest scheduler's plan, the slowest replica's apply of the plan deltas, the slowest machine's
//! admission and the slowest replica's apply of the admission deltas: the time a round would take
//! if every member ran on a core of its own and the network were free.
//!
//! Checks, which fail the bench with a panic: after every round, on every replica, that no
//! ledger's admitted resources exceed the capacity its machine registered, that no ledger register
//! has concurrent siblings and that no ledger lists a task twice (each round checks the ledgers
//! the round wrote, on every replica, which covers every version any replica ever holds; the end
//! of a run checks them all); at the end, that every replica holds the same state, that no task
//! is held by two machines, that no task was admitted twice, and that a sample of machines has
//! nothing left to decide or release in a further admission round.

#[path = "common/process.rs"]
mod process;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mantissa::crdt::{Delta, Key, NodeId, Replica, Value};
use mantissa::gossip::MemberName;
use mantissa::sched::{
    ALLOC, Admitted, Cluster, ClusterView, JobSpec, Ledger, Name, NodeRecord, Plan, Resources,
    TaskGroup, TaskId, ViewCache, backoff_millis,
};
use process::{peak_rss_kib, reset_peak_rss, thread_cpu_time};

/// The simulated wall clock at the first round (ms).
const EPOCH_MS: u64 = 1_764_000_000_000;
/// Simulated time per round: well above a LAN gossip round, below the first backoff (250 ms).
const ROUND_MS: u64 = 100;
/// The most rounds one run may take (5 simulated minutes).
const MAX_ROUNDS: usize = 3_000;
/// Rounds between two waves of the second phase.
const WAVE_GAP: usize = 3;
/// Machines that run a last admission round after convergence, to show they write nothing.
const QUIET_SAMPLE: usize = 8;
const GIB: u64 = 1 << 30;

#[derive(Clone)]
struct Options {
    schedulers: Vec<usize>,
    machines: usize,
    hosts: usize,
    burst_tasks: usize,
    waves: usize,
    wave_tasks: usize,
    quick: bool,
    profile: bool,
    verbose: bool,
}

fn options() -> Options {
    let quick = std::env::var("MANTISSA_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::args().any(|arg| arg == "--quick");
    let mut options = Options {
        schedulers: vec![1, 3, 10],
        machines: 1_000,
        hosts: 4,
        burst_tasks: if quick { 2_000 } else { 8_000 },
        waves: 2,
        wave_tasks: if quick { 100 } else { 200 },
        quick,
        profile: false,
        verbose: std::env::var_os("MANTISSA_BENCH_VERBOSE").is_some(),
    };
    if quick {
        options.machines = 200;
        options.hosts = 2;
    }
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> usize {
            let text = args
                .next()
                .unwrap_or_else(|| panic!("{name} needs a value"));
            text.trim()
                .replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {text}"))
        };
        match arg.as_str() {
            "--schedulers" => {
                let text = args.next().expect("--schedulers needs a value");
                options.schedulers = text
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse()
                            .unwrap_or_else(|_| panic!("--schedulers: not a number: {s}"))
                    })
                    .collect();
            }
            "--machines" => options.machines = number(&arg),
            "--hosts" => options.hosts = number(&arg),
            "--tasks" => options.burst_tasks = number(&arg),
            "--waves" => options.waves = number(&arg),
            "--wave-tasks" => options.wave_tasks = number(&arg),
            "--profile" => options.profile = true,
            // `cargo bench` passes `--bench`; `--quick` was read above.
            _ => {}
        }
    }
    assert!(
        options.machines > 0 && options.hosts > 0,
        "need machines and hosts"
    );
    assert!(
        options.schedulers.iter().all(|&s| s > 0),
        "each run needs at least one scheduler"
    );
    options.hosts = options.hosts.min(options.machines);
    options
}

fn main() {
    let options = options();
    let wall = Instant::now();
    println!(
        "scheduling: {} machines on {} shared machine-side replicas, schedulers {:?}, burst of {} \
         tasks then {} waves of {}, {} mode",
        options.machines,
        options.hosts,
        options.schedulers,
        options.burst_tasks,
        options.waves,
        options.wave_tasks,
        if options.quick { "quick" } else { "full" },
    );
    println!(
        "approximation: each machine runs its own admission round, but {} machines share each \
         machine-side replica (1,000 full replicas would hold 1,000 copies of the state); \
         deltas are applied to {} + schedulers replicas, not {} + schedulers",
        options.machines.div_ceil(options.hosts),
        options.hosts,
        options.machines,
    );
    let mut outcomes = Vec::new();
    for &schedulers in &options.schedulers {
        let outcome = run(&options, schedulers);
        println!("{}", outcome.summary());
        outcomes.push(outcome);
    }
    print_tables(&options, &outcomes);
    let over_commit: u64 = outcomes.iter().map(|o| o.over_commit).sum();
    let checks: u64 = outcomes.iter().map(|o| o.ledger_checks).sum();
    println!();
    println!("over-commit: {over_commit} ({checks} ledger checks across all replicas and rounds)");
    println!("double admissions after convergence: 0");
    println!(
        "total wall time {:.1} s, peak RSS {}",
        wall.elapsed().as_secs_f64(),
        peak_rss_kib().map_or("–".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0)),
    );
}

// ---- the simulated cluster ----

struct Machine {
    name: MemberName,
    host: usize,
    capacity: Resources,
}

/// Every replica of the simulation: the schedulers' first, then the machine-side hosts.
struct World {
    replicas: Vec<Replica>,
    /// Each replica's parsed scheduling state, kept across rounds as a node keeps it
    /// (`ViewCache`): a round re-parses what changed since the previous one, and that work is
    /// timed with the round.
    caches: Vec<ViewCache>,
    scheduler_names: Vec<MemberName>,
    machines: Vec<Machine>,
    /// Where each machine is in `machines`, by name.
    by_name: BTreeMap<MemberName, usize>,
    live: BTreeSet<MemberName>,
}

impl World {
    fn new(options: &Options, schedulers: usize) -> World {
        let member = |name: String| MemberName::new(name).expect("valid member name");
        let scheduler_names: Vec<MemberName> = (0..schedulers)
            .map(|i| member(format!("sched-{i:02}")))
            .collect();
        let machines: Vec<Machine> = (0..options.machines)
            .map(|i| Machine {
                name: member(format!("node-{i:04}")),
                host: i % options.hosts,
                capacity: machine_size(i),
            })
            .collect();
        let replicas: Vec<Replica> = (0..schedulers + options.hosts)
            .map(|i| Replica::new(NodeId(i as u64 + 1)))
            .collect();
        let caches = replicas.iter().map(|_| ViewCache::default()).collect();
        let by_name = machines
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        let live = scheduler_names
            .iter()
            .chain(machines.iter().map(|m| &m.name))
            .cloned()
            .collect();
        World {
            replicas,
            caches,
            scheduler_names,
            machines,
            by_name,
            live,
        }
    }

    fn schedulers(&self) -> usize {
        self.scheduler_names.len()
    }

    fn host_replica(&self, host: usize) -> usize {
        self.schedulers() + host
    }

    /// One planning round of every scheduler at `now`, each on its own replica and thread, with
    /// the CPU it took. Threads only shorten the wall time; each is timed on its own clock.
    fn plan_all(&mut self, now: u64) -> Vec<(Duration, Plan)> {
        let live = &self.live;
        let (schedulers, _) = self.replicas.split_at_mut(self.scheduler_names.len());
        let (caches, _) = self.caches.split_at_mut(self.scheduler_names.len());
        std::thread::scope(|scope| {
            let running: Vec<_> = schedulers
                .iter_mut()
                .zip(caches.iter_mut())
                .zip(&self.scheduler_names)
                .map(|((replica, cache), scheduler)| {
                    scope.spawn(move || {
                        let start = thread_cpu_time();
                        let plan = Cluster::with_cache(replica, cache)
                            .plan(scheduler, live, now)
                            .expect("a planning round succeeds");
                        (thread_cpu_time() - start, plan)
                    })
                })
                .collect();
            running
                .into_iter()
                .map(|thread| thread.join().expect("a planning thread does not panic"))
                .collect()
        })
    }

    /// One admission round of each machine in `woken` at `now`, each on its host's replica: the
    /// hosts run on threads of their own, their machines one after the other. Returns, in
    /// machine order, what each round did and the CPU it took.
    fn admit_all(&mut self, woken: &BTreeSet<usize>, now: u64) -> Vec<(usize, Duration, Admitted)> {
        let live = &self.live;
        let machines = &self.machines;
        let (_, hosts) = self.replicas.split_at_mut(self.scheduler_names.len());
        let (_, caches) = self.caches.split_at_mut(self.scheduler_names.len());
        let mut results: Vec<(usize, Duration, Admitted)> = std::thread::scope(|scope| {
            let running: Vec<_> = hosts
                .iter_mut()
                .zip(caches.iter_mut())
                .enumerate()
                .map(|(host, (replica, cache))| {
                    let mine: Vec<usize> = woken
                        .iter()
                        .copied()
                        .filter(|&m| machines[m].host == host)
                        .collect();
                    scope.spawn(move || {
                        mine.into_iter()
                            .map(|m| {
                                let start = thread_cpu_time();
                                let admitted = Cluster::with_cache(replica, cache)
                                    .admit(&machines[m].name, live, now)
                                    .expect("an admission round succeeds");
                                (m, thread_cpu_time() - start, admitted)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            running
                .into_iter()
                .flat_map(|thread| thread.join().expect("an admission thread does not panic"))
                .collect()
        });
        results.sort_by_key(|(m, _, _)| *m);
        results
    }

    /// Applies each origin's deltas to every other replica, in the order they were written, and
    /// returns the CPU each destination spent applying them.
    fn deliver(&mut self, from: &[(usize, Vec<Delta>)]) -> Vec<Duration> {
        let mut spent = vec![Duration::ZERO; self.replicas.len()];
        for (to, replica) in self.replicas.iter_mut().enumerate() {
            // Cloning stands in for decoding a received delta; it is left out of the time.
            let incoming: Vec<Delta> = from
                .iter()
                .filter(|(origin, _)| *origin != to)
                .flat_map(|(_, deltas)| deltas.iter().cloned())
                .collect();
            let start = thread_cpu_time();
            for delta in incoming {
                replica.apply(delta).expect("a delta from a peer applies");
            }
            spent[to] = thread_cpu_time() - start;
            assert_eq!(
                replica.held_back(),
                0,
                "deltas are delivered in causal order, so none waits"
            );
        }
        spent
    }
}

/// Mixed machine sizes: mostly 16 CPUs / 64 GiB, one in ten twice that, one in ten half.
fn machine_size(i: usize) -> Resources {
    match i % 10 {
        0 => Resources::new(32_000, 128 * GIB),
        5 => Resources::new(8_000, 32 * GIB),
        _ => Resources::new(16_000, 64 * GIB),
    }
}

/// The kinds of task in the workload: (name, share of the tasks in %, CPU millis, memory,
/// priority, spread across zones). All bin-pack, the default strategy: with `spread`, a group of
/// 1,000 tasks would put one task on each of 1,000 machines and wake every machine.
const KINDS: [(&str, usize, u64, u64, u32, bool); 5] = [
    ("web", 40, 500, GIB, 50, true),
    ("api", 27, 1_000, 2 * GIB, 40, false),
    ("worker", 20, 1_000, 4 * GIB, 20, false),
    ("cache", 10, 250, 4 * GIB, 30, true),
    ("batch", 3, 4_000, 8 * GIB, 10, false),
];
/// Zones the machines are spread over, for the groups spread by zone.
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
/// Tasks per job: a job is one group, as in Nomad's C1M.
const JOB_TASKS: usize = 1_000;

/// The burst: `total` tasks split across the kinds, in jobs of at most [`JOB_TASKS`].
fn burst_jobs(total: usize) -> Vec<JobSpec> {
    let mut jobs = Vec::new();
    let mut left = total;
    for (k, &(kind, share, cpu, memory, priority, by_zone)) in KINDS.iter().enumerate() {
        let mut count = if k + 1 == KINDS.len() {
            left
        } else {
            total * share / 100
        };
        left -= count;
        let mut part = 0;
        while count > 0 {
            let size = count.min(JOB_TASKS);
            let mut group = TaskGroup::new(name("main"), size as u32, Resources::new(cpu, memory));
            if by_zone {
                group.constraints.spread_by = Some("zone".into());
            }
            let mut job = JobSpec::new(name(&format!("{kind}-{part:02}"))).group(group);
            job.priority = priority;
            jobs.push(job);
            count -= size;
            part += 1;
        }
    }
    jobs
}

/// One wave of the second phase: small tasks, in one job.
fn wave_job(wave: usize, tasks: usize) -> JobSpec {
    let mut job = JobSpec::new(name(&format!("wave-{wave:02}"))).group(TaskGroup::new(
        name("main"),
        tasks as u32,
        Resources::new(250, GIB / 2),
    ));
    job.priority = 35;
    job
}

fn name(text: &str) -> Name {
    Name::new(text).expect("valid name")
}

// ---- one run ----

/// The submission of one batch of tasks: when, in rounds and in measured CPU.
#[derive(Clone, Copy)]
struct Submitted {
    phase: Phase,
    round: usize,
    cpu: Duration,
    critical: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    Burst,
    Waves,
}

/// Submit→admitted of one task.
struct Latency {
    phase: Phase,
    rounds: usize,
    cpu: Duration,
    critical: Duration,
}

#[derive(Default)]
struct Outcome {
    schedulers: usize,
    tasks: usize,
    placed: usize,
    rounds: usize,
    burst_rounds: usize,
    claims: u64,
    rejected: u64,
    reasons: BTreeMap<String, u64>,
    plan_cpu: Duration,
    plan_calls: u64,
    admit_cpu: Duration,
    admit_calls: u64,
    apply_cpu: Duration,
    /// Apply CPU of each replica, summed over the run.
    apply_by_replica: Vec<Duration>,
    critical: Duration,
    latencies: Vec<Latency>,
    over_commit: u64,
    ledger_checks: u64,
    /// The slowest admission round, and the mean at the end of the run.
    admit_max: Duration,
    final_admit_mean: Duration,
    final_view_read: Duration,
    wall: Duration,
    replicas: usize,
    peak_rss_kib: Option<u64>,
}

impl Outcome {
    fn cpu(&self) -> Duration {
        self.plan_cpu + self.admit_cpu + self.apply_cpu
    }

    fn summary(&self) -> String {
        format!(
            "{} scheduler(s): {} of {} tasks placed in {} rounds ({} for the burst), {} claims, \
             {} rejected, CPU {:.2} s (plan {:.2}, admit {:.2}, apply {:.2}), critical path \
             {:.2} s, {:.0} placements/s of CPU, wall {:.1} s, peak RSS {}",
            self.schedulers,
            self.placed,
            self.tasks,
            self.rounds,
            self.burst_rounds,
            self.claims,
            self.rejected,
            self.cpu().as_secs_f64(),
            self.plan_cpu.as_secs_f64(),
            self.admit_cpu.as_secs_f64(),
            self.apply_cpu.as_secs_f64(),
            self.critical.as_secs_f64(),
            self.placed as f64 / self.cpu().as_secs_f64(),
            self.wall.as_secs_f64(),
            self.peak_rss_kib
                .map_or("–".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0)),
        )
    }
}

fn run(options: &Options, schedulers: usize) -> Outcome {
    reset_peak_rss();
    let wall = Instant::now();
    let mut world = World::new(options, schedulers);
    let mut outcome = Outcome {
        schedulers,
        replicas: world.replicas.len(),
        apply_by_replica: vec![Duration::ZERO; world.replicas.len()],
        ..Outcome::default()
    };
    setup(&mut world);

    let burst = burst_jobs(options.burst_tasks);
    let waves: Vec<JobSpec> = (0..options.waves)
        .map(|w| wave_job(w, options.wave_tasks))
        .collect();
    outcome.tasks = burst
        .iter()
        .chain(&waves)
        .map(|job| job.tasks().count())
        .sum();

    let mut submitted: BTreeMap<Name, Submitted> = BTreeMap::new();
    let mut admitted: BTreeMap<TaskId, Latency> = BTreeMap::new();
    let mut spent = Duration::ZERO;
    let mut critical = Duration::ZERO;
    let mut next_wave = 0;
    let mut wave_round = None;

    submit(&mut world, 0, &burst, EPOCH_MS - 1);
    for job in &burst {
        let at = Submitted {
            phase: Phase::Burst,
            round: 0,
            cpu: spent,
            critical,
        };
        submitted.insert(job.name.clone(), at);
    }

    let mut round = 0;
    let mut idle = false;
    loop {
        if wave_round.is_none() && admitted.len() >= options.burst_tasks {
            outcome.burst_rounds = round;
            wave_round = Some(round);
        }
        let wave_due = wave_round
            .filter(|_| next_wave < waves.len())
            .map(|first| (first + next_wave * WAVE_GAP).max(round));
        if idle {
            // Members are event-driven: after a round in which nobody claimed anything, the next
            // one that can do something is when a backoff ends or a job arrives. Skipped rounds
            // still count as simulated time, but cost no CPU.
            let next = next_eligible(&world)
                .map(|millis| (millis.saturating_sub(EPOCH_MS)).div_ceil(ROUND_MS) as usize);
            match (next, wave_due) {
                (Some(next), Some(wave)) if next >= round => round = next.min(wave),
                (Some(next), None) if next >= round => round = next,
                (_, Some(wave)) => round = wave,
                (Some(_), None) => {
                    stopped(
                        schedulers,
                        round,
                        "tasks fit on no machine",
                        &outcome,
                        &admitted,
                    );
                    break;
                }
                (None, None) => {}
            }
        }
        let now = EPOCH_MS + round as u64 * ROUND_MS;
        if wave_due == Some(round) {
            let job = &waves[next_wave];
            let at = next_wave % schedulers;
            submit(&mut world, at, std::slice::from_ref(job), now - 1);
            let at = Submitted {
                phase: Phase::Waves,
                round,
                cpu: spent,
                critical,
            };
            submitted.insert(job.name.clone(), at);
            next_wave += 1;
        }
        if admitted.len() == outcome.tasks && next_wave == waves.len() {
            break;
        }
        if round >= MAX_ROUNDS {
            stopped(schedulers, round, "the time limit", &outcome, &admitted);
            break;
        }

        // Every scheduler plans from the state of the previous round, before any of them has
        // seen the others' claims.
        let mut plan_deltas = Vec::new();
        let mut woken: BTreeSet<usize> = BTreeSet::new();
        let mut plan_max = Duration::ZERO;
        for (s, (took, plan)) in world.plan_all(now).into_iter().enumerate() {
            outcome.plan_cpu += took;
            outcome.plan_calls += 1;
            spent += took;
            plan_max = plan_max.max(took);
            outcome.claims += plan.claims.len() as u64;
            for claim in &plan.claims {
                woken.insert(world.by_name[&claim.node]);
            }
            plan_deltas.push((s, plan.deltas));
        }
        idle = woken.is_empty();
        let applied = world.deliver(&plan_deltas);
        let deliver_max = account_apply(&mut outcome, &applied, &mut spent);
        critical += plan_max + deliver_max;

        // Each machine that was sent a claim runs its own admission round, on its host's replica.
        let mut admit_deltas: Vec<(usize, Vec<Delta>)> = (0..options.hosts)
            .map(|h| (world.host_replica(h), Vec::new()))
            .collect();
        let mut admit_max = Duration::ZERO;
        let mut round_admit = (Duration::ZERO, 0u32);
        for (m, took, result) in world.admit_all(&woken, now + ROUND_MS / 2) {
            let machine = &world.machines[m];
            let (node, host) = (machine.name.clone(), machine.host);
            outcome.admit_cpu += took;
            outcome.admit_calls += 1;
            spent += took;
            admit_max = admit_max.max(took);
            round_admit = (round_admit.0 + took, round_admit.1 + 1);
            assert!(
                result.released.is_empty(),
                "{node} released {:?}: nothing here is stopped, shrunk, lost or held twice",
                result.released
            );
            outcome.rejected += result.decision.rejected.len() as u64;
            for rejected in &result.decision.rejected {
                *outcome
                    .reasons
                    .entry(rejected.reason.to_string())
                    .or_insert(0) += 1;
            }
            for claim in &result.decision.admitted {
                let at = submitted[&claim.task.job];
                let latency = Latency {
                    phase: at.phase,
                    rounds: round - at.round + 1,
                    cpu: spent - at.cpu,
                    critical: critical + took - at.critical,
                };
                let first = admitted.insert(claim.task.clone(), latency);
                assert!(
                    first.is_none(),
                    "{} was admitted twice, the second time by {node}",
                    claim.task
                );
            }
            admit_deltas[host].1.extend(result.deltas);
        }
        outcome.admit_max = outcome.admit_max.max(admit_max);
        if round_admit.1 > 0 {
            outcome.final_admit_mean = round_admit.0 / round_admit.1;
        }
        let applied = world.deliver(&admit_deltas);
        let deliver_max = account_apply(&mut outcome, &applied, &mut spent);
        critical += admit_max + deliver_max;

        // A ledger changes on a replica only through a delta that carries its key, so checking
        // the keys this round wrote, on every replica, checks every version any replica holds.
        let changed: BTreeSet<Key> = admit_deltas
            .iter()
            .flat_map(|(_, deltas)| deltas.iter().flat_map(Delta::keys))
            .filter(|key| key.as_bytes().starts_with(ALLOC.as_bytes()))
            .cloned()
            .collect();
        if !changed.is_empty() {
            outcome.ledger_checks += check_all_ledgers(&world, Some(&changed));
        }
        if options.verbose {
            eprintln!(
                "  [{schedulers} scheduler(s)] round {round}: {} machines admitted, {} of {} \
                 tasks placed, {} claims and {} rejections so far, CPU {:.2} s, wall {:.1} s",
                woken.len(),
                admitted.len(),
                outcome.tasks,
                outcome.claims,
                outcome.rejected,
                spent.as_secs_f64(),
                wall.elapsed().as_secs_f64(),
            );
        }
        round += 1;
    }
    outcome.rounds = round;
    if outcome.burst_rounds == 0 {
        outcome.burst_rounds = round;
    }
    outcome.placed = admitted.len();
    outcome.critical = critical;
    outcome.latencies = admitted.into_values().collect();
    outcome.ledger_checks += check_all_ledgers(&world, None);
    check_converged(&mut world, EPOCH_MS + (round as u64 + 1) * ROUND_MS);
    outcome.final_view_read = time_view_read(&world.replicas[world.host_replica(0)]);
    if options.profile {
        profile_admission(&world);
    }
    outcome.wall = wall.elapsed();
    outcome.peak_rss_kib = peak_rss_kib();
    outcome
}

/// The earliest simulated time at which a pending task may be claimed, as the scheduler computes
/// it (the latest rejection of the task plus the backoff of its next attempt); `None` when no
/// task is pending.
fn next_eligible(world: &World) -> Option<u64> {
    let view = ClusterView::read(&world.replicas[0]).expect("the view reads");
    let mut latest: BTreeMap<&TaskId, (u32, u64)> = BTreeMap::new();
    for ledger in view.ledgers.values() {
        for rejection in &ledger.rejected {
            let entry = latest.entry(&rejection.task).or_insert((0, 0));
            entry.0 = entry.0.max(rejection.attempt.saturating_add(1));
            entry.1 = entry.1.max(rejection.at.millis);
        }
    }
    view.pending_tasks(&world.live)
        .iter()
        .map(|task| {
            latest.get(&task.id).map_or(0, |&(attempt, at)| {
                at.saturating_add(backoff_millis(attempt))
            })
        })
        .min()
}

fn stopped(
    schedulers: usize,
    round: usize,
    why: &str,
    outcome: &Outcome,
    admitted: &BTreeMap<TaskId, Latency>,
) {
    println!(
        "  [{schedulers} scheduler(s)] stopped at round {round} ({why}) with {} of {} tasks \
         unplaced",
        outcome.tasks - admitted.len(),
        outcome.tasks
    );
}

/// Adds one delivery's apply times to the totals; returns the slowest replica's.
fn account_apply(outcome: &mut Outcome, applied: &[Duration], spent: &mut Duration) -> Duration {
    let mut slowest = Duration::ZERO;
    for (total, &took) in outcome.apply_by_replica.iter_mut().zip(applied) {
        *total += took;
        outcome.apply_cpu += took;
        *spent += took;
        slowest = slowest.max(took);
    }
    slowest
}

/// Untimed: the machines register, and every scheduler runs one round before any job exists, so
/// that all of them know each other when the jobs arrive. Schedulers that did not would each
/// think themselves responsible for every task and claim it once each.
fn setup(world: &mut World) {
    let mut deltas: Vec<(usize, Vec<Delta>)> = Vec::new();
    for m in 0..world.machines.len() {
        let machine = &world.machines[m];
        let record = NodeRecord::new(machine.name.clone(), machine.capacity.clone())
            .label("zone", ZONES[m % ZONES.len()]);
        let replica = world.host_replica(machine.host);
        let delta = Cluster::new(&mut world.replicas[replica])
            .register_node(&record, EPOCH_MS - 1_000)
            .expect("a node registers");
        match deltas.iter_mut().find(|(origin, _)| *origin == replica) {
            Some((_, list)) => list.push(delta),
            None => deltas.push((replica, vec![delta])),
        }
    }
    for s in 0..world.schedulers() {
        let scheduler = world.scheduler_names[s].clone();
        let plan = Cluster::new(&mut world.replicas[s])
            .plan(&scheduler, &world.live, EPOCH_MS - 500)
            .expect("a planning round succeeds");
        assert!(plan.claims.is_empty(), "no job exists yet");
        deltas.push((s, plan.deltas));
    }
    world.deliver(&deltas);
}

/// Untimed: a client submits `jobs` at the replica of scheduler `at`, and the jobs reach everyone.
fn submit(world: &mut World, at: usize, jobs: &[JobSpec], now: u64) {
    let mut deltas = Vec::new();
    for job in jobs {
        deltas.push(
            Cluster::new(&mut world.replicas[at])
                .submit_job(job, now)
                .expect("a valid job is accepted"),
        );
    }
    world.deliver(&[(at, deltas)]);
}

/// [`check_ledgers`] on every replica, each on a thread of its own.
fn check_all_ledgers(world: &World, only: Option<&BTreeSet<Key>>) -> u64 {
    std::thread::scope(|scope| {
        let running: Vec<_> = world
            .replicas
            .iter()
            .map(|replica| scope.spawn(move || check_ledgers(replica, world, only)))
            .collect();
        running
            .into_iter()
            .map(|thread| thread.join().expect("a checking thread does not panic"))
            .sum()
    })
}

/// Checks the ledgers `replica` holds (all, or those under the keys `only`) against the capacity
/// their machines registered, reading the raw registers so that a ledger `ClusterView` would
/// refuse is still seen. Panics on any over-commit; returns how many ledgers it checked.
fn check_ledgers(replica: &Replica, world: &World, only: Option<&BTreeSet<Key>>) -> u64 {
    let ledgers = match only {
        None => replica
            .range(ALLOC.as_bytes(), usize::MAX)
            .expect("a prefix range reads"),
        Some(keys) => keys
            .iter()
            .filter_map(|key| {
                let value = replica.get(key).expect("a key reads");
                value.map(|value| (key.clone(), value))
            })
            .collect(),
    };
    let mut checked = 0;
    for (key, value) in ledgers {
        let Value::Register(register) = value else {
            panic!("{key:?} is not a register");
        };
        assert!(
            register.siblings.is_empty(),
            "{key:?} has concurrent versions: a ledger must have a single writer"
        );
        let ledger: Ledger =
            serde_json::from_slice(&register.value).expect("a ledger holds a Ledger as JSON");
        let machine = &world.machines[world.by_name[&ledger.node]];
        let used = ledger.used();
        assert!(
            machine.capacity.holds(&used),
            "over-commit on {}: {used:?} admitted, capacity {:?}",
            machine.name,
            machine.capacity
        );
        let tasks: BTreeSet<&TaskId> = ledger.admitted.iter().map(|a| &a.task).collect();
        assert_eq!(
            tasks.len(),
            ledger.admitted.len(),
            "a task twice in one ledger"
        );
        checked += 1;
    }
    checked
}

/// After the last round: every replica holds the same writes and reads the same allocations, no
/// task is held by two machines, and machines have nothing left to do.
fn check_converged(world: &mut World, now: u64) {
    let digest = world.replicas[0].digest();
    for replica in &world.replicas {
        assert_eq!(replica.digest(), digest, "replicas diverged");
    }
    let view = ClusterView::read(&world.replicas[0]).expect("the view reads");
    assert!(view.ignored.is_empty(), "refused keys: {:?}", view.ignored);
    assert!(view.claims.is_empty(), "undecided claims left");
    let held: usize = view.ledgers.values().map(|l| l.admitted.len()).sum();
    let live_nodes = view.live_nodes(&world.live);
    let allocations = view.allocations(&live_nodes);
    assert_eq!(
        allocations.len(),
        held,
        "double admission: a task is held by two machines"
    );
    for node in live_nodes.iter().take(QUIET_SAMPLE) {
        let winning = view.node_allocations(node, &world.live).len();
        assert_eq!(
            winning,
            view.ledgers.get(node).map_or(0, |l| l.admitted.len())
        );
    }
    let step = (world.machines.len() / QUIET_SAMPLE).max(1);
    for m in (0..world.machines.len()).step_by(step) {
        let machine = &world.machines[m];
        let (node, replica) = (machine.name.clone(), world.host_replica(machine.host));
        // The first round may still forget rejections of tasks placed elsewhere since; the
        // second must write nothing at all.
        for quiet in [false, true] {
            let result = Cluster::new(&mut world.replicas[replica])
                .admit(&node, &world.live, now)
                .expect("an admission round succeeds");
            let decided = result.decision.admitted.len() + result.decision.rejected.len();
            assert!(
                decided == 0 && result.released.is_empty(),
                "{node} still had claims to decide or tasks to release after convergence"
            );
            assert!(
                !quiet || result.deltas.is_empty(),
                "{node} kept writing after convergence"
            );
        }
    }
}

fn time_view_read(replica: &Replica) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = thread_cpu_time();
        let view = ClusterView::read(replica).expect("the view reads");
        best = best.min(thread_cpu_time() - start);
        drop(view);
    }
    best
}

/// Times the parts of an admission round at the final state through the public API.
fn profile_admission(world: &World) {
    let replica = &world.replicas[world.host_replica(0)];
    let time = |what: &str, f: &mut dyn FnMut()| {
        let start = thread_cpu_time();
        f();
        println!(
            "  profile: {what}: {:.2} ms",
            (thread_cpu_time() - start).as_secs_f64() * 1e3
        );
    };
    let mut view = None;
    time("ClusterView::read", &mut || {
        view = Some(ClusterView::read(replica).expect("the view reads"));
    });
    let view = view.expect("read above");
    let mut live_nodes = BTreeSet::new();
    time("live_nodes", &mut || {
        live_nodes = view.live_nodes(&world.live)
    });
    time("allocations (all ledgers)", &mut || {
        std::hint::black_box(view.allocations(&live_nodes));
    });
    time("wanted (every task of every job)", &mut || {
        std::hint::black_box(view.wanted());
    });
    time("pending_tasks", &mut || {
        std::hint::black_box(view.pending_tasks(&world.live));
    });
    let node = &world.machines[0].name;
    time(
        "predict (one machine's round without the read)",
        &mut || {
            std::hint::black_box(view.predict(node, &world.live));
        },
    );
    let bytes: usize = replica
        .range(b"", usize::MAX)
        .expect("a range reads")
        .iter()
        .map(|(key, value)| {
            key.as_bytes().len()
                + match value {
                    Value::Register(register) => register.value.len(),
                    _ => 0,
                }
        })
        .sum();
    println!(
        "  profile: state read by every round: {} keys, {:.1} MB of keys and JSON values",
        replica.len(),
        bytes as f64 / 1e6
    );
}

// ---- reporting ----

fn print_tables(options: &Options, outcomes: &[Outcome]) {
    println!();
    println!(
        "| schedulers | tasks placed | rounds (burst) | placements/s of CPU | placements/s on \
         the critical path | CPU s: plan / admit / apply | admit rounds | mean admit at the end \
         (ms) | slowest admit (ms) | apply per replica (s) | claims | rejected | conflict rate | \
         wall (s) | peak RSS |"
    );
    println!("|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        let per_replica = o.apply_cpu.as_secs_f64() / o.replicas as f64;
        println!(
            "| {} | {} / {} | {} ({}) | {:.0} | {:.0} | {:.2} / {:.2} / {:.2} | {} | {:.1} | {:.1} \
             | {:.2} | {} | {} | {:.1}% | {:.1} | {} |",
            o.schedulers,
            o.placed,
            o.tasks,
            o.rounds,
            o.burst_rounds,
            o.placed as f64 / o.cpu().as_secs_f64(),
            o.placed as f64 / o.critical.as_secs_f64(),
            o.plan_cpu.as_secs_f64(),
            o.admit_cpu.as_secs_f64(),
            o.apply_cpu.as_secs_f64(),
            o.admit_calls,
            ms(o.final_admit_mean),
            ms(o.admit_max),
            per_replica,
            o.claims,
            o.rejected,
            100.0 * o.rejected as f64 / (o.claims as f64).max(1.0),
            o.wall.as_secs_f64(),
            o.peak_rss_kib
                .map_or("–".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0)),
        );
    }
    println!();
    println!(
        "Submit → admitted, per task: rounds of {ROUND_MS} simulated ms (a task admitted in the \
         round after its submission took 1), CPU summed over all members since the submission, \
         and the critical path:"
    );
    println!();
    println!(
        "| schedulers | phase | tasks | rounds p50 / p99 / max | CPU ms p50 / p99 / max | \
         critical-path ms p50 / p99 / max |"
    );
    println!("|---:|---|---:|---|---|---|");
    for o in outcomes {
        for phase in [Phase::Burst, Phase::Waves] {
            let of_phase: Vec<&Latency> = o.latencies.iter().filter(|l| l.phase == phase).collect();
            if of_phase.is_empty() {
                continue;
            }
            let mut rounds: Vec<usize> = of_phase.iter().map(|l| l.rounds).collect();
            let mut cpu: Vec<Duration> = of_phase.iter().map(|l| l.cpu).collect();
            let mut path: Vec<Duration> = of_phase.iter().map(|l| l.critical).collect();
            rounds.sort_unstable();
            cpu.sort_unstable();
            path.sort_unstable();
            let label = match phase {
                Phase::Burst => format!("burst of {}", options.burst_tasks),
                Phase::Waves => format!(
                    "{} waves of {}, every {WAVE_GAP} rounds",
                    options.waves, options.wave_tasks
                ),
            };
            let three = |sorted: &[Duration]| {
                format!(
                    "{:.0} / {:.0} / {:.0}",
                    ms(percentile(sorted, 50.0)),
                    ms(percentile(sorted, 99.0)),
                    ms(percentile(sorted, 100.0))
                )
            };
            println!(
                "| {} | {label} | {} | {} / {} / {} | {} | {} |",
                o.schedulers,
                of_phase.len(),
                percentile(&rounds, 50.0),
                percentile(&rounds, 99.0),
                percentile(&rounds, 100.0),
                three(&cpu),
                three(&path),
            );
        }
    }
    println!();
    println!("Rejections by reason, and the cost of one `ClusterView::read` at the final state:");
    println!();
    println!("| schedulers | rejections by reason | ClusterView::read at the end (ms) |");
    println!("|---:|---|---:|");
    for o in outcomes {
        let reasons: Vec<String> = o.reasons.iter().map(|(r, n)| format!("{r}: {n}")).collect();
        println!(
            "| {} | {} | {:.1} |",
            o.schedulers,
            if reasons.is_empty() {
                "none".into()
            } else {
                reasons.join(", ")
            },
            ms(o.final_view_read),
        );
    }
}

fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
