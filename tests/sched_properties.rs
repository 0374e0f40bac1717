//! Property tests of leaderless scheduling (`mantissa::sched`).
//!
//! A scenario runs 1–5 schedulers and 2–5 machines, each on its own replica, through a random
//! interleaving of planning rounds, admission rounds, job submissions and stops, machine deaths,
//! and delivery of the writes between replicas: each write travels to every other replica on its
//! own and may be delivered late, out of order, twice, or never (partitions), and pairwise
//! anti-entropy runs now and then. Then the faults stop: everything still in flight is delivered,
//! replicas exchange their state, and every scheduler and every live machine runs rounds until
//! nothing changes (or a generous bound).
//!
//! Checked on every replica after every step:
//! 1. no ledger holds more than its machine's capacity (and the single-writer ledger register
//!    never has concurrent siblings);
//! 5. the quota's namespace never holds more CPU than its limit, summed over all ledgers, nor do
//!    the members' escrow shares consume more than it.
//!
//! Checked once the cluster has converged:
//! 2. no task instance is held by two live machines;
//! 3. liveness: every task that no live machine holds fits on no live machine with what that
//!    machine has left (or its quota's live rights do not cover it);
//! 4. every replica computes the same allocations, pending tasks and predicted decisions.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use mantissa::crdt::{Delta, NodeId, Replica, Value};
use mantissa::gossip::MemberName;
use mantissa::sched::{
    ALLOC, Cluster, ClusterView, Constraints, JobSpec, Ledger, Name, NodeRecord, QuotaSpec,
    RejectReason, ReleaseCause, Resources, Strategy as Placement, TaskGroup,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};

/// Scenarios per run; each runs up to 100 steps and up to [`MAX_ROUNDS`] rounds to converge.
const CASES: u32 = 2_000;

/// Rounds (plan everywhere, exchange, admit everywhere, exchange) allowed to converge.
const MAX_ROUNDS: usize = 40;

/// Milliseconds between two rounds of the convergence phase: more than the longest backoff
/// divided by the quiet rounds required, so quiet means nothing is merely waiting.
const ROUND_MILLIS: u64 = 4_000;

/// Consecutive rounds without a write that count as converged.
const QUIET_ROUNDS: usize = 3;

/// Node ids of the replicas, not in name order, so that no order matters by accident.
const NODE_IDS: [u64; 10] = [41, 7, 23, 3, 59, 11, 31, 2, 47, 17];

const QUOTA_NAMESPACE: &str = "team";

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct MachineShape {
    cpu_millis: u64,
    memory_gib: u64,
    gpus: u64,
    zone: u8,
}

#[derive(Clone, Debug)]
struct GroupShape {
    count: u32,
    cpu_millis: u64,
    memory_mib: u64,
    gpus: u64,
    /// Required zone.
    zone: Option<u8>,
    spread_by_zone: bool,
}

#[derive(Clone, Debug)]
struct JobShape {
    groups: Vec<GroupShape>,
    priority: u32,
    spread: bool,
    in_quota: bool,
}

#[derive(Clone, Debug)]
enum Fate {
    Deliver,
    /// Delivered, and stays in flight: it arrives again later.
    Duplicate,
    Drop,
}

#[derive(Clone, Debug)]
enum Step {
    Plan(Index),
    Admit(Index),
    Deliver(Index, Fate),
    /// Anti-entropy from one replica to another.
    Sync(Index, Index),
    Submit {
        job: Index,
        at: Index,
    },
    Stop {
        job: Index,
        at: Index,
    },
    Kill(Index),
    Tick(u64),
}

#[derive(Clone, Debug)]
struct Scenario {
    machines: Vec<MachineShape>,
    schedulers: usize,
    jobs: Vec<JobShape>,
    /// The quota's limit and which machines start with its rights.
    quota: Option<(u64, Vec<bool>)>,
    steps: Vec<Step>,
}

fn machine() -> impl Strategy<Value = MachineShape> {
    (
        prop::sample::select(vec![1_000u64, 2_000, 4_000]),
        1..=4u64,
        0..=2u64,
        0..2u8,
    )
        .prop_map(|(cpu_millis, memory_gib, gpus, zone)| MachineShape {
            cpu_millis,
            memory_gib,
            gpus,
            zone,
        })
}

fn group() -> impl Strategy<Value = GroupShape> {
    (
        1..=4u32,
        1..=15u64,
        prop::sample::select(vec![128u64, 512, 1_024, 2_048]),
        prop_oneof![4 => Just(0u64), 1 => Just(1u64)],
        prop_oneof![3 => Just(None), 1 => (0..2u8).prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(
            |(count, cpu, memory_mib, gpus, zone, spread_by_zone)| GroupShape {
                count,
                cpu_millis: cpu * 100,
                memory_mib,
                gpus,
                zone,
                spread_by_zone,
            },
        )
}

fn job() -> impl Strategy<Value = JobShape> {
    (
        prop::collection::vec(group(), 1..=2),
        0..3u32,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(groups, priority, spread, in_quota)| JobShape {
            groups,
            priority,
            spread,
            in_quota,
        })
}

fn step() -> impl Strategy<Value = Step> {
    let fate =
        prop_oneof![6 => Just(Fate::Deliver), 1 => Just(Fate::Duplicate), 2 => Just(Fate::Drop)];
    prop_oneof![
        3 => any::<Index>().prop_map(Step::Plan),
        4 => any::<Index>().prop_map(Step::Admit),
        10 => (any::<Index>(), fate).prop_map(|(pick, fate)| Step::Deliver(pick, fate)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(from, to)| Step::Sync(from, to)),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(job, at)| Step::Submit { job, at }),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(job, at)| Step::Stop { job, at }),
        1 => any::<Index>().prop_map(Step::Kill),
        2 => (1..3_000u64).prop_map(Step::Tick),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(machine(), 2..=5),
        1..=5usize,
        prop::collection::vec(job(), 1..=4),
        prop::option::of((
            prop::sample::select(vec![500u64, 1_500, 3_000, 6_000]),
            prop::collection::vec(any::<bool>(), 5),
        )),
        prop::collection::vec(step(), 10..100),
    )
        .prop_map(|(machines, schedulers, jobs, quota, steps)| Scenario {
            machines,
            schedulers,
            jobs,
            quota,
            steps,
        })
}

// ---------------------------------------------------------------------------------------------
// The simulated cluster
// ---------------------------------------------------------------------------------------------

fn member(name: &str) -> MemberName {
    MemberName::new(name).expect("test member names are valid")
}

fn name(text: &str) -> Name {
    Name::new(text).expect("test names are valid")
}

/// What happened across all cases, to show the scenarios reach the interesting paths.
#[derive(Debug, Default)]
struct Coverage {
    cases: usize,
    claims: usize,
    admitted: usize,
    rejected: BTreeMap<String, usize>,
    released_after_tie_break: usize,
    /// Tasks seen held by two live machines in some replica's view during the faults.
    double_placements: usize,
    deaths: usize,
    orphaned: usize,
    replaced_after_death: usize,
    quota_grants: usize,
    converged: usize,
    rounds: usize,
}

struct Sim {
    /// Machines first, then schedulers.
    names: Vec<MemberName>,
    machines: usize,
    replicas: Vec<Replica>,
    alive: Vec<bool>,
    /// Writes on their way: (to, delta).
    in_flight: Vec<(usize, Delta)>,
    now: u64,
    jobs: Vec<JobSpec>,
    capacity: BTreeMap<MemberName, Resources>,
    quota_limit: Option<u64>,
    /// Tasks held by a machine when it died.
    orphans: BTreeSet<String>,
}

impl Sim {
    fn new(scenario: &Scenario) -> Result<Sim, TestCaseError> {
        let machines = scenario.machines.len();
        let mut names: Vec<MemberName> = (0..machines).map(|i| member(&format!("n{i}"))).collect();
        names.extend((0..scenario.schedulers).map(|i| member(&format!("s{i}"))));
        let replicas = (0..names.len())
            .map(|i| Replica::new(NodeId(NODE_IDS[i])))
            .collect();
        let quota = scenario.quota.as_ref().map(|(limit, _)| *limit);
        let jobs = scenario
            .jobs
            .iter()
            .enumerate()
            .map(|(i, shape)| job_spec(i, shape, quota.is_some()))
            .collect();
        let mut sim = Sim {
            alive: vec![true; names.len()],
            names,
            machines,
            replicas,
            in_flight: Vec::new(),
            now: 1_000,
            jobs,
            capacity: BTreeMap::new(),
            quota_limit: quota,
            orphans: BTreeSet::new(),
        };
        for (i, shape) in scenario.machines.iter().enumerate() {
            let capacity =
                Resources::new(shape.cpu_millis, shape.memory_gib << 30).with("gpu", shape.gpus);
            let record = NodeRecord::new(sim.names[i].clone(), capacity.clone())
                .label("zone", zone(shape.zone));
            sim.capacity.insert(sim.names[i].clone(), capacity);
            let delta = Cluster::new(&mut sim.replicas[i])
                .register_node(&record, sim.now)
                .map_err(fail)?;
            sim.broadcast(i, vec![delta]);
        }
        if let Some((limit, holders)) = &scenario.quota {
            let mut holders: Vec<MemberName> = (0..machines)
                .filter(|&i| holders[i])
                .map(|i| sim.names[i].clone())
                .collect();
            if holders.is_empty() {
                holders.push(sim.names[0].clone());
            }
            let spec = QuotaSpec {
                namespace: name(QUOTA_NAMESPACE),
                cpu_millis: *limit,
                holders,
            };
            let at = sim.names.len() - 1;
            let delta = Cluster::new(&mut sim.replicas[at])
                .create_quota(&spec, sim.now)
                .map_err(fail)?;
            sim.broadcast(at, vec![delta]);
        }
        // Everyone knows the machines and the quota before the first job, and the first half
        // of the jobs, so that the fault phase races over real placements from its first step.
        sim.deliver_everything()?;
        for job in sim.jobs.clone().iter().take(sim.jobs.len().div_ceil(2)) {
            let delta = Cluster::new(&mut sim.replicas[0])
                .submit_job(job, sim.now)
                .map_err(fail)?;
            sim.broadcast(0, vec![delta]);
        }
        sim.deliver_everything()?;
        Ok(sim)
    }

    fn live(&self) -> BTreeSet<MemberName> {
        (0..self.names.len())
            .filter(|&i| self.alive[i])
            .map(|i| self.names[i].clone())
            .collect()
    }

    fn alive_indices(&self) -> Vec<usize> {
        (0..self.names.len()).filter(|&i| self.alive[i]).collect()
    }

    fn broadcast(&mut self, from: usize, deltas: Vec<Delta>) {
        for delta in deltas {
            for to in 0..self.names.len() {
                if to != from {
                    self.in_flight.push((to, delta.clone()));
                }
            }
        }
    }

    fn deliver(&mut self, to: usize, delta: Delta) -> Result<(), TestCaseError> {
        if self.alive[to] {
            let applied = self.replicas[to].apply(delta);
            prop_assert!(applied.is_ok(), "apply failed: {applied:?}");
        }
        Ok(())
    }

    fn sync(&mut self, from: usize, to: usize) -> Result<(), TestCaseError> {
        if from != to && self.alive[from] && self.alive[to] {
            let delta = self.replicas[from].delta_since(self.replicas[to].version());
            self.deliver(to, delta)?;
        }
        Ok(())
    }

    /// Delivers everything in flight, then exchanges state among the live replicas until they
    /// all hold the same writes.
    fn deliver_everything(&mut self) -> Result<(), TestCaseError> {
        for (to, delta) in std::mem::take(&mut self.in_flight) {
            self.deliver(to, delta)?;
        }
        self.exchange()
    }

    fn exchange(&mut self) -> Result<(), TestCaseError> {
        self.in_flight.clear();
        let alive = self.alive_indices();
        for _ in 0..2 {
            for &from in &alive {
                for &to in &alive {
                    self.sync(from, to)?;
                }
            }
        }
        let digests: BTreeSet<u64> = alive.iter().map(|&i| self.replicas[i].digest()).collect();
        prop_assert_eq!(digests.len(), 1, "live replicas did not converge");
        Ok(())
    }

    fn plan(&mut self, index: usize, coverage: &mut Coverage) -> Result<usize, TestCaseError> {
        let live = self.live();
        let scheduler = self.names[index].clone();
        let plan = Cluster::new(&mut self.replicas[index])
            .plan(&scheduler, &live, self.now)
            .map_err(fail)?;
        coverage.claims += plan.claims.len();
        for claim in &plan.claims {
            if self.orphans.remove(&claim.task.to_string()) {
                coverage.replaced_after_death += 1;
            }
        }
        let writes = plan.deltas.len();
        self.broadcast(index, plan.deltas);
        Ok(writes)
    }

    fn admit(&mut self, index: usize, coverage: &mut Coverage) -> Result<usize, TestCaseError> {
        let live = self.live();
        let node = self.names[index].clone();
        let predicted = Cluster::new(&mut self.replicas[index])
            .predict(&node, &live)
            .map_err(fail)?;
        let held_elsewhere: BTreeSet<String> = Cluster::new(&mut self.replicas[index])
            .allocations(&live)
            .map_err(fail)?
            .into_values()
            .filter(|allocation| allocation.node != node)
            .map(|allocation| allocation.task.to_string())
            .collect();
        let admitted = Cluster::new(&mut self.replicas[index])
            .admit(&node, &live, self.now)
            .map_err(fail)?;
        prop_assert_eq!(
            &admitted.decision,
            &predicted,
            "admit differs from its prediction"
        );
        for claim in &admitted.decision.admitted {
            prop_assert!(
                !held_elsewhere.contains(&claim.task.to_string()),
                "{} admitted {} while it saw another live machine hold it",
                node,
                claim.task
            );
        }
        coverage.admitted += admitted.decision.admitted.len();
        for rejected in &admitted.decision.rejected {
            let reason = match &rejected.reason {
                RejectReason::OutOfResource(_) => "out_of_resource".to_string(),
                RejectReason::OutOfQuota(_) => "out_of_quota".to_string(),
                other => format!("{other:?}"),
            };
            *coverage.rejected.entry(reason).or_insert(0) += 1;
        }
        coverage.released_after_tie_break += admitted
            .released
            .iter()
            .filter(|release| matches!(release.cause, ReleaseCause::LostTieBreak(_)))
            .count();
        let writes = admitted.deltas.len();
        self.broadcast(index, admitted.deltas);
        Ok(writes)
    }

    fn kill(&mut self, machine: usize, coverage: &mut Coverage) -> Result<(), TestCaseError> {
        let alive_machines = (0..self.machines).filter(|&i| self.alive[i]).count();
        if !self.alive[machine] || alive_machines < 2 {
            return Ok(());
        }
        let view = ClusterView::read(&self.replicas[machine]).map_err(fail)?;
        if let Some(ledger) = view.ledgers.get(&self.names[machine]) {
            coverage.orphaned += ledger.admitted.len();
            self.orphans
                .extend(ledger.admitted.iter().map(|a| a.task.to_string()));
        }
        self.alive[machine] = false;
        self.in_flight.retain(|(to, _)| *to != machine);
        coverage.deaths += 1;
        Ok(())
    }

    fn run_step(&mut self, step: &Step, coverage: &mut Coverage) -> Result<(), TestCaseError> {
        self.now += 10;
        let everyone = self.names.len();
        let schedulers = everyone - self.machines;
        match step {
            Step::Plan(pick) => {
                let index = self.machines + pick.index(schedulers);
                self.plan(index, coverage)?;
            }
            Step::Admit(pick) => {
                let index = pick.index(self.machines);
                if self.alive[index] {
                    self.admit(index, coverage)?;
                }
            }
            Step::Deliver(pick, fate) => {
                if !self.in_flight.is_empty() {
                    let index = pick.index(self.in_flight.len());
                    let (to, delta) = match fate {
                        Fate::Duplicate => self.in_flight[index].clone(),
                        _ => self.in_flight.swap_remove(index),
                    };
                    if !matches!(fate, Fate::Drop) {
                        self.deliver(to, delta)?;
                    }
                }
            }
            Step::Sync(from, to) => self.sync(from.index(everyone), to.index(everyone))?,
            Step::Submit { job, at } | Step::Stop { job, at } => {
                let at = at.index(everyone);
                if !self.alive[at] {
                    return Ok(());
                }
                let spec = self.jobs[job.index(self.jobs.len())].clone();
                let mut cluster = Cluster::new(&mut self.replicas[at]);
                let delta = if matches!(step, Step::Submit { .. }) {
                    Some(cluster.submit_job(&spec, self.now).map_err(fail)?)
                } else {
                    cluster.stop_job(&spec.name, self.now).map_err(fail)?
                };
                self.broadcast(at, delta.into_iter().collect());
            }
            Step::Kill(pick) => self.kill(pick.index(self.machines), coverage)?,
            Step::Tick(millis) => self.now += millis,
        }
        Ok(())
    }

    /// One round of the convergence phase; returns how many writes it made.
    fn round(&mut self, coverage: &mut Coverage) -> Result<usize, TestCaseError> {
        self.now += ROUND_MILLIS;
        let mut writes = 0;
        for index in self.machines..self.names.len() {
            writes += self.plan(index, coverage)?;
        }
        self.exchange()?;
        for index in 0..self.machines {
            if self.alive[index] {
                writes += self.admit(index, coverage)?;
            }
        }
        self.exchange()?;
        coverage.rounds += 1;
        Ok(writes)
    }
}

fn zone(index: u8) -> String {
    format!("z{index}")
}

fn job_spec(index: usize, shape: &JobShape, quota: bool) -> JobSpec {
    let mut job = JobSpec::new(name(&format!("j{index}")));
    job.priority = shape.priority;
    job.strategy = if shape.spread {
        Placement::Spread
    } else {
        Placement::BinPack
    };
    if shape.in_quota && quota {
        job.namespace = name(QUOTA_NAMESPACE);
    }
    for (g, group) in shape.groups.iter().enumerate() {
        let resources =
            Resources::new(group.cpu_millis, group.memory_mib << 20).with("gpu", group.gpus);
        let mut task_group = TaskGroup::new(name(&format!("g{g}")), group.count, resources);
        task_group.constraints = Constraints {
            labels: group
                .zone
                .map(|z| BTreeMap::from([("zone".to_string(), zone(z))]))
                .unwrap_or_default(),
            spread_by: group.spread_by_zone.then(|| "zone".to_string()),
        };
        job = job.group(task_group);
    }
    job
}

fn fail(error: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(error.to_string())
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

/// Properties 1 and 5 on every live replica's view.
fn check_safety(sim: &Sim, coverage: &mut Coverage) -> Result<(), TestCaseError> {
    for index in sim.alive_indices() {
        let replica = &sim.replicas[index];
        let mut quota_used = 0u64;
        let mut quota_used_by: BTreeMap<MemberName, u64> = BTreeMap::new();
        let mut holders: BTreeMap<String, usize> = BTreeMap::new();
        let live = sim.live();
        for (key, value) in replica.range(ALLOC.as_bytes(), usize::MAX).map_err(fail)? {
            let Value::Register(register) = value else {
                return Err(fail(format!("{key} is not a register")));
            };
            prop_assert!(
                register.siblings.is_empty(),
                "{key} has concurrent versions: a ledger has a single writer"
            );
            let ledger: Ledger = serde_json::from_slice(&register.value).map_err(fail)?;
            let used = ledger.used();
            // Property 1: never over capacity, against the machine's real capacity.
            let capacity = &sim.capacity[&ledger.node];
            prop_assert!(
                capacity.holds(&used),
                "replica {} sees {} over capacity: {used:?} > {capacity:?}",
                sim.names[index],
                ledger.node
            );
            for allocation in &ledger.admitted {
                if allocation.namespace.as_str() == QUOTA_NAMESPACE {
                    quota_used += allocation.resources.cpu_millis;
                    *quota_used_by.entry(ledger.node.clone()).or_insert(0) +=
                        allocation.resources.cpu_millis;
                }
                if live.contains(&ledger.node) {
                    *holders.entry(allocation.task.to_string()).or_insert(0) += 1;
                }
            }
        }
        coverage.double_placements += holders.values().filter(|&&n| n > 1).count();
        // Property 5: the quota holds in every merged state, dead machines' ledgers included.
        if let Some(limit) = sim.quota_limit {
            prop_assert!(
                quota_used <= limit,
                "replica {} sees {quota_used} CPU millis of the quota admitted, limit {limit}",
                sim.names[index]
            );
            let view = ClusterView::read(replica).map_err(fail)?;
            let escrow = &view.quotas[&name(QUOTA_NAMESPACE)];
            prop_assert!(escrow.total_consumed() <= limit);
            // Each machine's share covers its ledger in every merged state: the share is
            // written before a ledger that uses more, and after one that uses less.
            for (machine, used) in &quota_used_by {
                prop_assert!(
                    *used <= escrow.consumed(machine),
                    "replica {} sees {}'s ledger use {} of the quota, its share only {}",
                    sim.names[index],
                    machine,
                    used,
                    escrow.consumed(machine)
                );
            }
        }
    }
    Ok(())
}

/// Properties 2, 3 and 4 on the converged cluster.
fn check_converged(sim: &mut Sim) -> Result<(), TestCaseError> {
    let live = sim.live();
    let alive = sim.alive_indices();
    let views: Vec<ClusterView> = alive
        .iter()
        .map(|&i| ClusterView::read(&sim.replicas[i]))
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    let view = &views[0];

    // Property 4: every replica computes the same allocations, pending tasks and decisions.
    let live_machines = view.live_nodes(&live);
    let allocations = view.allocations(&live_machines);
    let pending = view.pending_tasks(&live);
    let mut predictions = BTreeMap::new();
    for (&index, other) in alive.iter().zip(&views) {
        let cluster = Cluster::new(&mut sim.replicas[index]);
        prop_assert_eq!(&cluster.allocations(&live).map_err(fail)?, &allocations);
        prop_assert_eq!(&other.pending_tasks(&live), &pending);
        for machine in &live_machines {
            let predicted = cluster.predict(machine, &live).map_err(fail)?;
            let first = predictions
                .entry(machine.clone())
                .or_insert_with(|| predicted.clone());
            prop_assert_eq!(&predicted, first);
        }
    }

    // Property 2: no task held by two live machines.
    let mut held: BTreeMap<String, Vec<&MemberName>> = BTreeMap::new();
    for machine in &live_machines {
        for allocation in view
            .ledgers
            .get(machine)
            .into_iter()
            .flat_map(|l| &l.admitted)
        {
            held.entry(allocation.task.to_string())
                .or_default()
                .push(machine);
        }
    }
    for (task, machines) in &held {
        prop_assert_eq!(machines.len(), 1, "{} is held by {:?}", task, machines);
    }

    // Property 3: a task left waiting fits nowhere (or its quota is spent among live machines).
    for task in view.wanted().values() {
        if allocations.contains_key(&task.id) {
            continue;
        }
        let quota_blocked = view.quotas.get(&task.namespace).is_some_and(|escrow| {
            let spare: u64 = live_machines.iter().map(|m| escrow.available(m)).sum();
            spare < task.resources.cpu_millis
        });
        if quota_blocked {
            continue;
        }
        for machine in &live_machines {
            let record = &view.nodes[machine];
            let used = view
                .ledgers
                .get(machine)
                .map(Ledger::used)
                .unwrap_or_default();
            let fits = task.constraints.allows(record)
                && record.capacity.shortfall(&used, &task.resources).is_none();
            prop_assert!(
                !fits,
                "{} waits, but fits on {} (used {:?} of {:?})",
                task.id,
                machine,
                used,
                record.capacity
            );
        }
    }
    Ok(())
}

fn run(scenario: &Scenario, coverage: &mut Coverage) -> Result<(), TestCaseError> {
    coverage.cases += 1;
    let mut sim = Sim::new(scenario)?;
    // Safety phase: faults and races.
    for step in &scenario.steps {
        sim.run_step(step, coverage)?;
        check_safety(&sim, coverage)?;
    }
    // Liveness phase: the faults stop.
    sim.deliver_everything()?;
    check_safety(&sim, coverage)?;
    let mut quiet = 0;
    for _ in 0..MAX_ROUNDS {
        let writes = sim.round(coverage)?;
        check_safety(&sim, coverage)?;
        quiet = if writes == 0 { quiet + 1 } else { 0 };
        if quiet == QUIET_ROUNDS {
            break;
        }
    }
    prop_assert_eq!(
        quiet,
        QUIET_ROUNDS,
        "still writing after {} rounds",
        MAX_ROUNDS
    );
    coverage.converged += 1;
    check_converged(&mut sim)?;
    let view = ClusterView::read(&sim.replicas[sim.alive_indices()[0]]).map_err(fail)?;
    if let Some(escrow) = view.quotas.get(&name(QUOTA_NAMESPACE)) {
        let moved = sim.names.iter().any(|m| escrow.received(m) > 0);
        coverage.quota_grants += usize::from(moved);
    }
    Ok(())
}

#[test]
fn scheduling_is_safe_and_live_under_races_partitions_and_deaths() {
    let config = Config {
        cases: CASES,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    };
    let coverage = RefCell::new(Coverage::default());
    let mut runner = TestRunner::new(config);
    let result = runner.run(&scenario(), |scenario| {
        run(&scenario, &mut coverage.borrow_mut())
    });
    let coverage = coverage.into_inner();
    eprintln!("{coverage:#?}");
    if let Err(failure) = result {
        panic!("{failure}");
    }
    // The scenarios must reach what the properties are about, or they prove little.
    assert!(coverage.claims > 0 && coverage.admitted > 0);
    assert!(
        coverage.double_placements > 0,
        "no task was ever placed twice"
    );
    assert!(
        coverage.released_after_tie_break > 0,
        "no tie-break release"
    );
    assert!(
        coverage.replaced_after_death > 0,
        "no task re-placed after a death"
    );
    assert!(coverage.quota_grants > 0, "quota rights never moved");
    for reason in ["OutOfCpu", "out_of_quota", "DuplicateTask"] {
        assert!(
            coverage.rejected.contains_key(reason),
            "no {reason} rejection"
        );
    }
}
