//! Scenario: scheduling. Placements per second, time from submit to admitted, and the conflict
//! (reject) rate, with 1, 3 and 10 concurrent schedulers.
//!
//! * **mantissa**: a fresh loopback cluster of `mantissa agent` processes per case, every one
//!   offering the same capacity (`--cpu-millis`, `--memory`), K of them with `--scheduler` and
//!   the rest with `--offer`. Jobs are submitted in one burst (`POST /v1/jobs`, one submitting
//!   thread per agent, each to its own agent); one observer polls the machines' ledgers
//!   (`GET /v1/kv?prefix=_sched/alloc/`) at one agent: a task is admitted when it first appears
//!   in a ledger's `admitted` list, and every entry of a ledger's `rejected` list is a refused
//!   claim (a conflict). At the end the scenario checks that no machine is over-committed
//!   (`GET /v1/nodes`) and every task is held exactly once (`GET /v1/allocations` at every agent,
//!   and the raw ledgers); a failure there fails the run.
//! * **etcd** (reference): K client threads place the same tasks on the same simulated machines
//!   (same count, same capacities) with compare-and-swap transactions on the 3-member etcd: a
//!   key per machine holds its used CPU; a placement reads them (with their mod revisions),
//!   picks a machine with the same strategy (bin-pack: the fullest that fits) and commits
//!   `Txn(If(mod_revision(machine) == rev)).Then(put machine used+cpu, put alloc/<task> machine)`.
//!   A failed transaction is a conflict; the task is retried at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Barrier, Mutex, mpsc};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde_json::{Value as Json, json};

use crate::agent::{self, HttpConnection, NodeSpec};
use crate::cleanup;
use crate::progress::Progress;
use crate::report::{Layout, Report, Row};
use crate::systems::Deployment;

/// What every task asks for.
const TASK_CPU_MILLIS: u64 = 250;
const TASK_MEMORY_BYTES: u64 = 64 << 20;
/// The machines together offer this much of what the tasks ask for, in percent: enough that
/// every task fits, tight enough that bin-packing fills machines and claims get refused.
const HEADROOM_PERCENT: usize = 125;
/// How long the cluster gets to form and register every offer and scheduler.
const FORM_PATIENCE: Duration = Duration::from_secs(60);
/// How long the converged state gets to show every task held once, after the last admission.
const SETTLE_PATIENCE: Duration = Duration::from_secs(30);
/// Transport errors tolerated per etcd placement before the task is given up.
const ETCD_RETRIES: u32 = 20;

/// Sizes of the scheduling scenario.
pub struct SchedulingPlan {
    /// Tasks placed per case.
    pub tasks: usize,
    /// Tasks per job (one group each).
    pub tasks_per_job: usize,
    /// Cases as (machines, schedulers).
    pub cases: Vec<(usize, usize)>,
    /// How long a mantissa case may take from the first submit to the last admission.
    pub patience: Duration,
    /// The observer's interval between two ledger reads.
    pub poll: Duration,
}

impl SchedulingPlan {
    pub fn new(quick: bool) -> SchedulingPlan {
        if quick {
            SchedulingPlan {
                tasks: 200,
                tasks_per_job: 20,
                cases: vec![(3, 1), (3, 3)],
                patience: Duration::from_secs(60),
                poll: Duration::from_millis(25),
            }
        } else {
            SchedulingPlan {
                tasks: 2000,
                tasks_per_job: 50,
                cases: vec![(3, 1), (3, 3), (10, 10)],
                patience: Duration::from_secs(240),
                poll: Duration::from_millis(25),
            }
        }
    }

    fn jobs(&self) -> usize {
        self.tasks.div_ceil(self.tasks_per_job)
    }

    /// Tasks of job `job`: `(task id, job number)`.
    fn job_tasks(&self, job: usize) -> Vec<String> {
        let first = job * self.tasks_per_job;
        let last = (first + self.tasks_per_job).min(self.tasks);
        (0..last - first)
            .map(|i| format!("{}/t/{i}", job_name(job)))
            .collect()
    }

    fn all_tasks(&self) -> Vec<(usize, String)> {
        (0..self.jobs())
            .flat_map(|job| self.job_tasks(job).into_iter().map(move |task| (job, task)))
            .collect()
    }

    /// Tasks one machine can hold, so that `machines` of them hold the demand with headroom.
    fn slots_per_machine(&self, machines: usize) -> u64 {
        (self.tasks * HEADROOM_PERCENT).div_ceil(100 * machines) as u64
    }
}

fn job_name(job: usize) -> String {
    format!("j{job:04}")
}

/// One case's figures and whether its invariants held.
struct Outcome {
    row: Row,
    failures: Vec<String>,
}

/// Runs every case on mantissa, then every case on etcd.
pub fn run(deployment: &Deployment, plan: &SchedulingPlan, progress: &Progress) -> Report {
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &(machines, schedulers) in &plan.cases {
        progress.step(&format!(
            "scheduling: mantissa, {schedulers} scheduler(s) on {machines} agents, {} tasks",
            plan.tasks
        ));
        let outcome = mantissa_case(deployment, plan, machines, schedulers, progress);
        failures.extend(outcome.failures);
        rows.push(outcome.row);
    }
    for &(machines, schedulers) in &plan.cases {
        progress.step(&format!(
            "scheduling: etcd, {schedulers} CAS client(s) on {machines} simulated machines"
        ));
        let outcome = etcd_case(deployment, plan, machines, schedulers, progress);
        failures.extend(outcome.failures);
        rows.push(outcome.row);
    }
    let slots = plan.slots_per_machine(3);
    Report {
        scenario: "scheduling",
        method: format!(
            "{} tasks ({} jobs of {}, bin_pack, {TASK_CPU_MILLIS} CPU millis and {} MiB each) \
             submitted in one burst; the machines offer {HEADROOM_PERCENT}% of the demand \
             (with 3 machines: {slots} tasks each). mantissa: a fresh cluster of agents per case, \
             all offering, K with --scheduler; jobs POSTed round-robin over the agents; one \
             observer reads the ledgers (`/v1/kv?prefix=_sched/alloc/`) every {} ms at agent 0: \
             admitted = first seen in a ledger, conflicts = distinct entries seen in the ledgers' \
             `rejected` lists (refused claims). etcd (reference): K client threads place the \
             same tasks on the same simulated machines with compare-and-swap transactions on \
             the machine's used-CPU key; conflicts = failed transactions, retried at once. \
             placements/s = tasks / (first submit to last admission); conflict % = conflicts / \
             (conflicts + tasks); job = submit to every task of the job admitted; task = its \
             job's submit to the task admitted.",
            plan.tasks,
            plan.jobs(),
            plan.tasks_per_job,
            TASK_MEMORY_BYTES >> 20,
            plan.poll.as_millis()
        ),
        layout: Layout::Scheduling,
        rows,
        failures,
    }
}

fn case_name(machines: usize, schedulers: usize) -> String {
    let who = match schedulers {
        1 => "1 scheduler".to_owned(),
        k => format!("{k} schedulers"),
    };
    format!("{who}, {machines} machines")
}

fn spec(plan: &SchedulingPlan, job: usize) -> Json {
    json!({
        "name": job_name(job),
        "strategy": "bin_pack",
        "groups": [{
            "name": "t",
            "count": plan.job_tasks(job).len(),
            "resources": {"cpu_millis": TASK_CPU_MILLIS, "memory_bytes": TASK_MEMORY_BYTES},
        }],
    })
}

/// An agent cluster registered for cleanup on interruption, unregistered when dropped.
struct Agents {
    cluster: agent::Cluster,
    pids: Vec<u32>,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for pid in &self.pids {
            cleanup::unregister_pid(*pid);
        }
        cleanup::unregister_dir(self.cluster.root());
        // The cluster kills its agents and removes its directory after this.
    }
}

/// Starts `machines` agents offering `slots` tasks' worth each, the first `schedulers` of them
/// with `--scheduler`.
fn start_agents(
    deployment: &Deployment,
    machines: usize,
    schedulers: usize,
    slots: u64,
) -> Result<Agents, String> {
    let binary = deployment.mantissa_bin.clone();
    let registered = Mutex::new(None::<std::path::PathBuf>);
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut cluster = agent::Cluster::new(&binary, &format!("bench-sched-{schedulers}"));
        cleanup::register_dir(cluster.root());
        *registered.lock().unwrap_or_else(|p| p.into_inner()) = Some(cluster.root().into());
        let mut pids = Vec::new();
        for node in 0..machines {
            let role = if node < schedulers {
                "--scheduler"
            } else {
                "--offer"
            };
            let extra_args = vec![
                role.to_owned(),
                "--cpu-millis".to_owned(),
                (slots * TASK_CPU_MILLIS).to_string(),
                "--memory".to_owned(),
                (slots * TASK_MEMORY_BYTES).to_string(),
            ];
            let index = cluster.add_node(NodeSpec {
                extra_args,
                ..NodeSpec::default()
            });
            if let Some(pid) = cluster.pid(index) {
                cleanup::register_pid(pid);
                pids.push(pid);
            }
        }
        cluster.wait_formed();
        Agents { cluster, pids }
    }));
    started.map_err(|panic| {
        if let Some(dir) = registered.lock().unwrap_or_else(|p| p.into_inner()).take() {
            cleanup::unregister_dir(&dir);
        }
        format!(
            "the agents did not start: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic")
        )
    })
}

/// GET `path` at `connection`, as JSON; a non-200 answer is an error.
fn get_json(connection: &mut HttpConnection, path: &str) -> Result<Json, String> {
    let response = connection
        .request("GET", path, b"")
        .map_err(|err| format!("GET {path}: {err}"))?;
    if response.status != 200 {
        return Err(format!(
            "GET {path}: {} {}",
            response.status,
            response.text()
        ));
    }
    serde_json::from_slice(&response.body).map_err(|err| format!("GET {path}: {err}"))
}

/// Waits until every agent sees every machine live and every scheduler registered.
fn wait_registered(agents: &Agents, machines: usize, schedulers: usize) -> Result<(), String> {
    let deadline = Instant::now() + FORM_PATIENCE;
    for node in 0..machines {
        let mut connection = HttpConnection::new(agents.cluster.agent(node).http);
        loop {
            let nodes = get_json(&mut connection, "/v1/nodes")?;
            let live = nodes["nodes"].as_array().map_or(0, |nodes| {
                nodes.iter().filter(|n| n["live"] == json!(true)).count()
            });
            let registered = get_json(
                &mut connection,
                "/v1/kv?prefix=_sched%2Fschedulers%2F&limit=1000",
            )?["items"]
                .as_array()
                .map_or(0, Vec::len);
            if live == machines && registered == schedulers {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "agent {node} sees {live} live machines of {machines} and {registered} \
                     schedulers of {schedulers} after {FORM_PATIENCE:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// What the observer saw in the ledgers.
#[derive(Default)]
struct Observed {
    /// When each task was first seen admitted.
    admitted: HashMap<String, Instant>,
    /// Refused claims: (machine, task, claim timestamp) → reason.
    rejections: HashMap<(String, String, String), String>,
    /// Highest attempt number seen rejected, per task.
    attempts: HashMap<String, u64>,
    /// Most tasks seen held by two machines at once in one read.
    double_held: usize,
    polls: u64,
}

/// The ledgers (`_sched/alloc/<machine>`) at `connection`: (machine, ledger).
fn read_ledgers(connection: &mut HttpConnection) -> Result<Vec<(String, Json)>, String> {
    let listing = get_json(connection, "/v1/kv?prefix=_sched%2Falloc%2F&limit=1000")?;
    let items = listing["items"]
        .as_array()
        .ok_or_else(|| format!("no items in the ledger listing: {listing}"))?;
    items
        .iter()
        .map(|item| {
            let key = item["key"].as_str().unwrap_or_default();
            let machine = key.trim_start_matches("_sched/alloc/").to_owned();
            let text = item["value"]
                .as_str()
                .ok_or_else(|| format!("ledger {key} is not a text register: {item}"))?;
            let ledger: Json = serde_json::from_str(text)
                .map_err(|err| format!("ledger {key} is not JSON: {err}"))?;
            Ok((machine, ledger))
        })
        .collect()
}

impl Observed {
    fn record(&mut self, ledgers: &[(String, Json)], at: Instant) {
        self.polls += 1;
        let mut holders: HashMap<&str, usize> = HashMap::new();
        for (machine, ledger) in ledgers {
            for allocation in ledger["admitted"].as_array().into_iter().flatten() {
                if let Some(task) = allocation["task"].as_str() {
                    *holders.entry(task).or_default() += 1;
                    self.admitted.entry(task.to_owned()).or_insert(at);
                }
            }
            for rejection in ledger["rejected"].as_array().into_iter().flatten() {
                let task = rejection["task"].as_str().unwrap_or_default().to_owned();
                let reason = match &rejection["reason"] {
                    Json::String(reason) => reason.clone(),
                    other => other.to_string(),
                };
                let attempt = rejection["attempt"].as_u64().unwrap_or(0);
                let best = self.attempts.entry(task.clone()).or_default();
                *best = (*best).max(attempt);
                self.rejections.insert(
                    (machine.clone(), task, rejection["claim"].to_string()),
                    reason,
                );
            }
        }
        let double = holders.values().filter(|&&n| n > 1).count();
        self.double_held = self.double_held.max(double);
    }
}

fn mantissa_case(
    deployment: &Deployment,
    plan: &SchedulingPlan,
    machines: usize,
    schedulers: usize,
    progress: &Progress,
) -> Outcome {
    let mut row = Row::new(
        "mantissa",
        case_name(machines, schedulers),
        Some(schedulers),
    );
    let mut failures = Vec::new();
    match measure_mantissa(deployment, plan, machines, schedulers, progress, &mut row) {
        Ok(mut found) => failures.append(&mut found),
        Err(err) => {
            row.error(err.clone());
            failures.push(format!("mantissa, {}: {err}", row.case));
        }
    }
    Outcome { row, failures }
}

/// Runs one mantissa case into `row`; returns the invariant violations found.
fn measure_mantissa(
    deployment: &Deployment,
    plan: &SchedulingPlan,
    machines: usize,
    schedulers: usize,
    progress: &Progress,
    row: &mut Row,
) -> Result<Vec<String>, String> {
    let slots = plan.slots_per_machine(machines);
    let formed = Instant::now();
    let agents = start_agents(deployment, machines, schedulers, slots)?;
    wait_registered(&agents, machines, schedulers)?;
    let formed = formed.elapsed();
    let expected = plan.all_tasks();
    let barrier = Barrier::new(machines + 1);
    let (submits, observed) = std::thread::scope(|scope| {
        let submitters: Vec<_> = (0..machines)
            .map(|node| {
                let (barrier, agents) = (&barrier, &agents);
                scope.spawn(move || -> Result<Vec<(usize, Instant)>, String> {
                    let mut connection = HttpConnection::new(agents.cluster.agent(node).http);
                    barrier.wait();
                    let mut submits = Vec::new();
                    for job in (node..plan.jobs()).step_by(machines) {
                        let body = spec(plan, job).to_string();
                        let sent = Instant::now();
                        let response = connection
                            .request("POST", "/v1/jobs", body.as_bytes())
                            .map_err(|err| format!("POST /v1/jobs at agent {node}: {err}"))?;
                        if !(200..300).contains(&response.status) {
                            return Err(format!(
                                "POST /v1/jobs at agent {node}: {} {}",
                                response.status,
                                response.text()
                            ));
                        }
                        submits.push((job, sent));
                    }
                    Ok(submits)
                })
            })
            .collect();
        let mut observer = HttpConnection::new(agents.cluster.agent(0).http);
        let mut observed = Observed::default();
        barrier.wait();
        let began = Instant::now();
        let deadline = began + plan.patience;
        let mut result = Ok(());
        loop {
            let polled = Instant::now();
            match read_ledgers(&mut observer) {
                Ok(ledgers) => observed.record(&ledgers, Instant::now()),
                Err(err) => {
                    result = Err(err);
                    break;
                }
            }
            if observed.admitted.len() >= expected.len()
                && submitters.iter().all(|thread| thread.is_finished())
            {
                break;
            }
            if Instant::now() >= deadline {
                result = Err(format!(
                    "{} of {} tasks admitted after {:?}",
                    observed.admitted.len(),
                    expected.len(),
                    plan.patience
                ));
                break;
            }
            progress.tick(&format!(
                "scheduling: mantissa, {schedulers} scheduler(s): {}/{} admitted, {} refused \
                 claims, {:.1} s",
                observed.admitted.len(),
                expected.len(),
                observed.rejections.len(),
                began.elapsed().as_secs_f64()
            ));
            std::thread::sleep((polled + plan.poll).saturating_duration_since(Instant::now()));
        }
        let mut submits = Vec::new();
        for thread in submitters {
            match thread.join() {
                Ok(Ok(mine)) => submits.extend(mine),
                Ok(Err(err)) => result = result.and(Err(err)),
                Err(_) => result = result.and(Err("a submitting thread panicked".to_owned())),
            }
        }
        (result.map(|()| submits), observed)
    });
    let stuck = match submits {
        Ok(submits) => {
            fill_row(row, plan, &submits, &observed, &expected);
            None
        }
        Err(err) => Some(err),
    };
    row.conflicts = Some(observed.rejections.len() as u64);
    let mut by_reason: BTreeMap<&str, u64> = BTreeMap::new();
    for reason in observed.rejections.values() {
        *by_reason.entry(reason).or_default() += 1;
    }
    let lower_bound: u64 = observed.attempts.values().map(|a| a + 1).sum();
    row.detail = json!({
        "machines": machines,
        "schedulers": schedulers,
        "offering": machines,
        "tasks": plan.tasks,
        "jobs": plan.jobs(),
        "tasks_per_job": plan.tasks_per_job,
        "slots_per_machine": slots,
        "cpu_millis_per_machine": slots * TASK_CPU_MILLIS,
        "memory_bytes_per_machine": slots * TASK_MEMORY_BYTES,
        "conflict_source": "distinct (machine, task, claim) entries seen in the ledgers' \
                            `rejected` lists, read every poll at agent 0",
        "rejections_by_reason": by_reason,
        "tasks_with_a_rejection": observed.attempts.len(),
        "rejections_implied_by_attempt_numbers": lower_bound,
        "most_tasks_seen_held_twice_in_one_read": observed.double_held,
        "ledger_reads": observed.polls,
        "poll_interval_ms": plan.poll.as_millis() as u64,
        "cluster_start_seconds": formed.as_secs_f64(),
    });
    if let Some(err) = stuck {
        let status = jobs_status(&agents);
        return Err(format!("{err}; job status at agent 0: {status}"));
    }
    progress.step(&format!(
        "scheduling: mantissa, {schedulers} scheduler(s): checking capacity and placements"
    ));
    let failures = verify_mantissa(&agents, machines, &expected);
    check_agents_alive(agents, machines).map(|()| failures)
}

/// Per job, the first pending tasks and their last rejection, to show what got stuck.
fn jobs_status(agents: &Agents) -> String {
    let mut connection = HttpConnection::new(agents.cluster.agent(0).http);
    match get_json(&mut connection, "/v1/jobs") {
        Err(err) => err,
        Ok(jobs) => {
            let mut lines = Vec::new();
            for job in jobs["jobs"].as_array().into_iter().flatten() {
                if job["pending"].as_u64().unwrap_or(0) + job["claimed"].as_u64().unwrap_or(0) == 0
                {
                    continue;
                }
                let name = job["name"].as_str().unwrap_or_default();
                let mut line = format!(
                    "{name}: admitted {} claimed {} pending {}",
                    job["admitted"], job["claimed"], job["pending"]
                );
                if let Ok(detail) = get_json(&mut connection, &format!("/v1/jobs/{name}")) {
                    for task in detail["tasks"].as_array().into_iter().flatten() {
                        if task["state"] != json!("admitted") {
                            line.push_str(&format!(
                                "; {} {} last_rejection {}",
                                task["task"], task["state"], task["last_rejection"]
                            ));
                            break;
                        }
                    }
                }
                lines.push(line);
            }
            if lines.is_empty() {
                "every job admitted".to_owned()
            } else {
                lines.join(" | ")
            }
        }
    }
}

fn fill_row(
    row: &mut Row,
    plan: &SchedulingPlan,
    submits: &[(usize, Instant)],
    observed: &Observed,
    expected: &[(usize, String)],
) {
    let submitted: HashMap<usize, Instant> = submits.iter().copied().collect();
    let Some(&first) = submitted.values().min() else {
        return;
    };
    let mut last = first;
    let mut job_done: HashMap<usize, Instant> = HashMap::new();
    for (job, task) in expected {
        let Some(&at) = observed.admitted.get(task) else {
            row.misses += 1;
            continue;
        };
        row.count += 1;
        last = last.max(at);
        if let Some(&sent) = submitted.get(job) {
            row.task_millis
                .push(at.saturating_duration_since(sent).as_secs_f64() * 1e3);
        }
        let done = job_done.entry(*job).or_insert(at);
        *done = (*done).max(at);
    }
    for job in 0..plan.jobs() {
        if let (Some(done), Some(sent)) = (job_done.get(&job), submitted.get(&job)) {
            row.millis
                .push(done.saturating_duration_since(*sent).as_secs_f64() * 1e3);
        }
    }
    row.seconds = Some(last.saturating_duration_since(first).as_secs_f64());
}

/// No machine over-committed, every task held exactly once (at every agent, and in the raw
/// ledgers), waiting up to [`SETTLE_PATIENCE`] for the cluster to converge.
fn verify_mantissa(agents: &Agents, machines: usize, expected: &[(usize, String)]) -> Vec<String> {
    let expected: HashSet<&str> = expected.iter().map(|(_, task)| task.as_str()).collect();
    let deadline = Instant::now() + SETTLE_PATIENCE;
    loop {
        let mut problems = Vec::new();
        let mut over_commit = Vec::new();
        for node in 0..machines {
            let mut connection = HttpConnection::new(agents.cluster.agent(node).http);
            match get_json(&mut connection, "/v1/nodes") {
                Err(err) => problems.push(format!("agent {node}: {err}")),
                Ok(nodes) => {
                    for entry in nodes["nodes"].as_array().into_iter().flatten() {
                        let name = &entry["record"]["name"];
                        let capacity = &entry["record"]["capacity"];
                        let used = &entry["used"];
                        for resource in ["cpu_millis", "memory_bytes"] {
                            let (used, capacity) = (
                                used[resource].as_u64().unwrap_or(0),
                                capacity[resource].as_u64().unwrap_or(0),
                            );
                            if used > capacity {
                                over_commit.push(format!(
                                    "OVER-COMMIT at agent {node}: machine {name} uses \
                                     {used} {resource} of {capacity}"
                                ));
                            }
                        }
                    }
                }
            }
            match get_json(&mut connection, "/v1/allocations") {
                Err(err) => problems.push(format!("agent {node}: {err}")),
                Ok(listing) => {
                    let tasks: Vec<&str> = listing["allocations"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a["task"].as_str())
                        .collect();
                    let distinct: HashSet<&str> = tasks.iter().copied().collect();
                    let missing = expected.difference(&distinct).count();
                    let unexpected = distinct.difference(&expected).count();
                    if tasks.len() != expected.len() || missing > 0 || unexpected > 0 {
                        problems.push(format!(
                            "agent {node} lists {} allocations ({} distinct tasks, {missing} \
                             missing, {unexpected} unexpected) for {} tasks",
                            tasks.len(),
                            distinct.len(),
                            expected.len()
                        ));
                    }
                }
            }
            match read_ledgers(&mut connection) {
                Err(err) => problems.push(format!("agent {node}: {err}")),
                Ok(ledgers) => {
                    let mut holders: HashMap<String, usize> = HashMap::new();
                    for (_, ledger) in &ledgers {
                        for allocation in ledger["admitted"].as_array().into_iter().flatten() {
                            if let Some(task) = allocation["task"].as_str() {
                                *holders.entry(task.to_owned()).or_default() += 1;
                            }
                        }
                    }
                    let twice = holders.values().filter(|&&n| n > 1).count();
                    if twice > 0 || holders.len() != expected.len() {
                        problems.push(format!(
                            "agent {node}: the ledgers hold {} tasks, {twice} of them on two \
                             machines or more",
                            holders.len()
                        ));
                    }
                }
            }
        }
        if !over_commit.is_empty() {
            // A ledger must never exceed its machine, at any moment: no waiting on this one.
            over_commit.extend(problems);
            return over_commit;
        }
        if problems.is_empty() {
            return Vec::new();
        }
        if Instant::now() >= deadline {
            return problems
                .into_iter()
                .map(|problem| format!("after {SETTLE_PATIENCE:?}: {problem}"))
                .collect();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Fails when an agent exited during the case, with its log.
fn check_agents_alive(mut agents: Agents, machines: usize) -> Result<(), String> {
    let mut dead = Vec::new();
    for node in 0..machines {
        if !agents.cluster.is_running(node) {
            dead.push(format!(
                "agent {node} exited during the case:\n{}",
                agents.cluster.log_tail(node)
            ));
        }
    }
    match dead.is_empty() {
        true => Ok(()),
        false => Err(dead.join("\n")),
    }
}

/// FNV-1a of `task` and `machine`, to break ties between equal machines like a rendezvous hash.
fn weight(task: &str, machine: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in task.bytes().chain([0]).chain(machine.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^ (hash >> 29)
}

/// One task handed to an etcd scheduler: its job, its id, when its job was submitted.
type Work = (usize, String, Instant);

/// What an etcd scheduler did with one task.
struct Placed {
    job: usize,
    submitted: Instant,
    started: Instant,
    done: Instant,
    conflicts: u64,
}

fn etcd_case(
    deployment: &Deployment,
    plan: &SchedulingPlan,
    machines: usize,
    schedulers: usize,
    progress: &Progress,
) -> Outcome {
    let mut row = Row::new("etcd", case_name(machines, schedulers), Some(schedulers));
    let mut failures = Vec::new();
    match measure_etcd(deployment, plan, machines, schedulers, progress, &mut row) {
        Ok(mut found) => failures.append(&mut found),
        Err(err) => {
            row.error(err.clone());
            failures.push(format!("etcd, {}: {err}", row.case));
        }
    }
    Outcome { row, failures }
}

fn measure_etcd(
    deployment: &Deployment,
    plan: &SchedulingPlan,
    machines: usize,
    schedulers: usize,
    progress: &Progress,
    row: &mut Row,
) -> Result<Vec<String>, String> {
    let runtime = &deployment.runtime;
    let prefix = format!("bench/sched/{machines}-{schedulers}/");
    let nodes_prefix = format!("{prefix}nodes/");
    let alloc_prefix = format!("{prefix}alloc/");
    let capacity = plan.slots_per_machine(machines) * TASK_CPU_MILLIS;
    let connect = |member: usize| {
        let endpoint = deployment.etcd.endpoints[member % 3].clone();
        runtime
            .block_on(Client::connect([endpoint], None))
            .map_err(|err| format!("etcd connect: {err}"))
    };
    let mut setup = connect(0)?;
    runtime
        .block_on(async {
            setup
                .delete(
                    prefix.clone(),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                )
                .await?;
            for machine in 0..machines {
                setup
                    .put(format!("{nodes_prefix}m{machine:02}"), "0", None)
                    .await?;
            }
            Ok::<_, etcd_client::Error>(())
        })
        .map_err(|err| format!("etcd setup: {err}"))?;

    let expected = plan.all_tasks();
    let submitters = 3;
    let barrier = Barrier::new(submitters + schedulers + 1);
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..schedulers).map(|_| mpsc::channel::<Work>()).unzip();
    let placed_count = std::sync::atomic::AtomicUsize::new(0);
    let (submits, placements) = std::thread::scope(|scope| {
        let placers: Vec<_> = receivers
            .into_iter()
            .enumerate()
            .map(|(k, receiver)| {
                let (barrier, nodes_prefix, alloc_prefix, placed_count) =
                    (&barrier, &nodes_prefix, &alloc_prefix, &placed_count);
                scope.spawn(move || -> Result<Vec<Placed>, String> {
                    let client = connect(k);
                    barrier.wait();
                    let mut client = client?;
                    let mut placed = Vec::new();
                    while let Ok((job, task, submitted)) = receiver.recv() {
                        let started = Instant::now();
                        let conflicts = runtime.block_on(place(
                            &mut client,
                            &task,
                            nodes_prefix,
                            alloc_prefix,
                            capacity,
                        ))?;
                        placed.push(Placed {
                            job,
                            submitted,
                            started,
                            done: Instant::now(),
                            conflicts,
                        });
                        placed_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(placed)
                })
            })
            .collect();
        let submitting: Vec<_> = (0..submitters)
            .map(|member| {
                let (barrier, senders, prefix) = (&barrier, senders.clone(), &prefix);
                scope.spawn(move || -> Result<Vec<(usize, Instant)>, String> {
                    let client = connect(member);
                    barrier.wait();
                    let mut client = client?;
                    let mut submits = Vec::new();
                    for job in (member..plan.jobs()).step_by(submitters) {
                        let sent = Instant::now();
                        runtime
                            .block_on(client.put(
                                format!("{prefix}jobs/{}", job_name(job)),
                                spec(plan, job).to_string(),
                                None,
                            ))
                            .map_err(|err| format!("etcd job put: {err}"))?;
                        submits.push((job, sent));
                        for task in plan.job_tasks(job) {
                            let k = (weight(&task, "") % schedulers as u64) as usize;
                            senders[k]
                                .send((job, task, sent))
                                .map_err(|_| format!("etcd scheduler {k} stopped early"))?;
                        }
                    }
                    Ok(submits)
                })
            })
            .collect();
        drop(senders);
        barrier.wait();
        let began = Instant::now();
        while !placers.iter().all(|thread| thread.is_finished()) {
            progress.tick(&format!(
                "scheduling: etcd, {schedulers} CAS client(s): {}/{} placed, {:.1} s",
                placed_count.load(std::sync::atomic::Ordering::Relaxed),
                expected.len(),
                began.elapsed().as_secs_f64()
            ));
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut errors = Vec::new();
        let mut submits = Vec::new();
        for thread in submitting {
            match thread.join() {
                Ok(Ok(mine)) => submits.extend(mine),
                Ok(Err(err)) => errors.push(err),
                Err(_) => errors.push("an etcd submitting thread panicked".to_owned()),
            }
        }
        let mut placements = Vec::new();
        for thread in placers {
            match thread.join() {
                Ok(Ok(mine)) => placements.extend(mine),
                Ok(Err(err)) => errors.push(err),
                Err(_) => errors.push("an etcd scheduler thread panicked".to_owned()),
            }
        }
        match errors.is_empty() {
            true => Ok((submits, placements)),
            false => Err(errors.join("; ")),
        }
    })?;

    let first = submits
        .iter()
        .map(|&(_, sent)| sent)
        .min()
        .ok_or("no job submitted")?;
    let last = placements.iter().map(|p| p.done).max().unwrap_or(first);
    let mut job_done: HashMap<usize, (Instant, Instant)> = HashMap::new();
    let mut placing = Vec::new();
    let mut conflicts = 0;
    for placed in &placements {
        row.count += 1;
        conflicts += placed.conflicts;
        row.task_millis
            .push((placed.done - placed.submitted).as_secs_f64() * 1e3);
        placing.push((placed.done - placed.started).as_secs_f64() * 1e3);
        let entry = job_done
            .entry(placed.job)
            .or_insert((placed.submitted, placed.done));
        entry.1 = entry.1.max(placed.done);
    }
    for (sent, done) in job_done.values() {
        row.millis.push((*done - *sent).as_secs_f64() * 1e3);
    }
    row.misses = (expected.len() - placements.len()) as u64;
    row.seconds = Some((last - first).as_secs_f64());
    row.conflicts = Some(conflicts);
    placing.sort_by(f64::total_cmp);
    let at =
        |q: f64| placing[((q * placing.len() as f64).ceil() as usize).clamp(1, placing.len()) - 1];
    row.detail = json!({
        "machines": machines,
        "schedulers": schedulers,
        "tasks": plan.tasks,
        "jobs": plan.jobs(),
        "tasks_per_job": plan.tasks_per_job,
        "cpu_millis_per_machine": capacity,
        "conflict_source": "failed compare-and-swap transactions (each retried at once)",
        "placement_only_millis": (!placing.is_empty()).then(|| json!({
            "p50": at(0.5), "p99": at(0.99), "max": at(1.0),
        })),
        "what_it_models": "one range read of every machine's used-CPU key plus one \
                           Txn(If(mod_revision == read)).Then(put used, put alloc/<task>) per \
                           attempt; job specs are put in etcd but handed to the schedulers \
                           in-process (no watch); CPU only, no memory accounting",
    });
    progress.step(&format!(
        "scheduling: etcd, {schedulers} CAS client(s): checking capacity and placements"
    ));
    let failures = runtime.block_on(verify_etcd(
        &mut setup,
        &nodes_prefix,
        &alloc_prefix,
        capacity,
        &expected,
    ))?;
    let _ = runtime.block_on(setup.delete(
        prefix.clone(),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    ));
    Ok(failures)
}

/// Places `task`: read every machine, pick the fullest that fits, compare-and-swap its used CPU.
/// Returns the failed transactions (conflicts).
async fn place(
    client: &mut Client,
    task: &str,
    nodes_prefix: &str,
    alloc_prefix: &str,
    capacity: u64,
) -> Result<u64, String> {
    let mut conflicts = 0;
    let mut errors = 0;
    loop {
        let attempt = async {
            let nodes = client
                .get(nodes_prefix, Some(GetOptions::new().with_prefix()))
                .await?;
            let mut best: Option<(u64, u64, String, i64, u64)> = None;
            for kv in nodes.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let used: u64 = String::from_utf8_lossy(kv.value())
                    .parse()
                    .unwrap_or(u64::MAX);
                let after = used.saturating_add(TASK_CPU_MILLIS);
                if after > capacity {
                    continue;
                }
                let rank = (after, weight(task, &key));
                if best.as_ref().is_none_or(|b| rank > (b.0, b.1)) {
                    best = Some((after, rank.1, key, kv.mod_revision(), used));
                }
            }
            let Some((after, _, key, revision, _)) = best else {
                return Ok(None);
            };
            let machine = key.trim_start_matches(nodes_prefix).to_owned();
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([
                    TxnOp::put(key, after.to_string(), None),
                    TxnOp::put(format!("{alloc_prefix}{task}"), machine, None),
                ]);
            let response = client.txn(txn).await?;
            Ok::<_, etcd_client::Error>(Some(response.succeeded()))
        };
        match attempt.await {
            Ok(Some(true)) => return Ok(conflicts),
            Ok(Some(false)) => conflicts += 1,
            Ok(None) => return Err(format!("etcd: no machine has room for {task}")),
            Err(err) => {
                errors += 1;
                if errors > ETCD_RETRIES {
                    return Err(format!("etcd placement of {task}: {err}"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Every task allocated once, every machine's used CPU equal to its allocations and within its
/// capacity.
async fn verify_etcd(
    client: &mut Client,
    nodes_prefix: &str,
    alloc_prefix: &str,
    capacity: u64,
    expected: &[(usize, String)],
) -> Result<Vec<String>, String> {
    let read = |prefix: &str| {
        let prefix = prefix.to_owned();
        let mut client = client.clone();
        async move {
            client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|err| format!("etcd check: {err}"))
        }
    };
    let allocs = read(alloc_prefix).await?;
    let nodes = read(nodes_prefix).await?;
    let mut failures = Vec::new();
    let mut per_machine: HashMap<String, u64> = HashMap::new();
    let mut tasks = HashSet::new();
    for kv in allocs.kvs() {
        let task = String::from_utf8_lossy(kv.key()).into_owned();
        tasks.insert(task.trim_start_matches(alloc_prefix).to_owned());
        *per_machine
            .entry(String::from_utf8_lossy(kv.value()).into_owned())
            .or_default() += TASK_CPU_MILLIS;
    }
    let missing = expected
        .iter()
        .filter(|(_, task)| !tasks.contains(task))
        .count();
    if missing > 0 || tasks.len() != expected.len() {
        failures.push(format!(
            "etcd: {} tasks allocated, {missing} of {} missing",
            tasks.len(),
            expected.len()
        ));
    }
    for kv in nodes.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let machine = key.trim_start_matches(nodes_prefix);
        let used: u64 = String::from_utf8_lossy(kv.value())
            .parse()
            .unwrap_or(u64::MAX);
        let allocated = per_machine.get(machine).copied().unwrap_or(0);
        if used > capacity || used != allocated {
            failures.push(format!(
                "etcd: machine {machine} records {used} CPU millis used, its allocations \
                 {allocated}, capacity {capacity}"
            ));
        }
    }
    Ok(failures)
}
