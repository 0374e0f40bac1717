//! The scheduling side of the fault suite: a client that submits jobs to random agents while
//! faults run, reading every machine's ledger as it goes; and the checks that no ledger ever
//! admits more than its machine's capacity, and that once the cluster has healed every task of
//! every job is admitted exactly once, with every agent agreeing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::agent::request_once;
use super::check::Violation;

/// CPU millis each agent offers.
pub const CPU_PER_NODE: u64 = 3_000;
/// Tasks per job, and what each needs: jobs submitted over a run fit in two machines.
const TASKS_PER_JOB: u64 = 3;
const CPU_PER_TASK: u64 = 150;
/// The most jobs one run submits (10 × 450 millis: less than two machines hold).
const MAX_JOBS: usize = 10;

/// The agent flags that make every agent a scheduler offering [`CPU_PER_NODE`].
pub fn agent_args() -> [String; 5] {
    [
        "--scheduler".to_owned(),
        "--cpu-millis".to_owned(),
        CPU_PER_NODE.to_string(),
        "--memory".to_owned(),
        "4GiB".to_owned(),
    ]
}

/// What the scheduling client did and saw.
#[derive(Debug, Default)]
pub struct SchedulingLog {
    /// Jobs whose submission was acknowledged.
    pub submitted: Vec<String>,
    /// Jobs whose submission got no answer: they may or may not exist.
    pub indeterminate: Vec<String>,
    /// Ledger listings read and checked.
    pub reads: usize,
    /// Over-commits seen, each with the agent and the ledger.
    pub violations: Vec<String>,
}

/// Submits up to [`MAX_JOBS`] jobs, one every second or so, each at a random agent, and reads
/// and checks every agent's ledgers in between, until `stop`.
pub fn client(addrs: &[SocketAddr], seed: u64, stop: &AtomicBool) -> SchedulingLog {
    let mut rng = seed ^ 0x5EED_5C4E_D000_0000;
    let mut next = move |bound: u64| {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (rng >> 33) % bound
    };
    let mut log = SchedulingLog::default();
    let mut last_submit = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let node = next(addrs.len() as u64) as usize;
        let due = last_submit.elapsed() >= Duration::from_millis(700 + next(600));
        if due && log.submitted.len() + log.indeterminate.len() < MAX_JOBS {
            last_submit = Instant::now();
            let name = format!("job-{}", log.submitted.len() + log.indeterminate.len());
            let strategy = if next(2) == 0 { "spread" } else { "bin_pack" };
            let spec = format!(
                r#"{{"name":"{name}","strategy":"{strategy}","groups":[{{"name":"t","count":{TASKS_PER_JOB},"resources":{{"cpu_millis":{CPU_PER_TASK},"memory_bytes":33554432}}}}]}}"#
            );
            match request_once(addrs[node], "POST", "/v1/jobs", spec.as_bytes()) {
                Ok(response) if response.status == 200 => log.submitted.push(name),
                Ok(response) if response.status < 500 => {
                    log.violations.push(format!(
                        "agent {node} refused job {name} with {}: {}",
                        response.status,
                        String::from_utf8_lossy(&response.body)
                    ));
                }
                _ => log.indeterminate.push(name),
            }
        } else if let Some(listing) = ledgers(addrs[node]) {
            log.reads += 1;
            if let Err(err) = check_capacity(&listing) {
                log.violations.push(format!("agent {node}: {err}"));
            }
        }
        std::thread::sleep(Duration::from_millis(20 + next(40)));
    }
    log
}

/// Every ledger an agent holds, parsed; `None` when the agent does not answer.
fn ledgers(addr: SocketAddr) -> Option<Vec<Json>> {
    let response = request_once(addr, "GET", "/v1/kv?prefix=_sched/alloc/", b"").ok()?;
    if response.status != 200 {
        return None;
    }
    let body: Json = serde_json::from_slice(&response.body).ok()?;
    let items = body["items"].as_array()?;
    Some(
        items
            .iter()
            .map(|item| {
                item["value"]
                    .as_str()
                    .and_then(|text| serde_json::from_str(text).ok())
                    .unwrap_or(Json::Null)
            })
            .collect(),
    )
}

/// No ledger admits more CPU or memory than its capacity, and none is unreadable.
fn check_capacity(ledgers: &[Json]) -> Result<(), String> {
    for ledger in ledgers {
        let node = ledger["node"]
            .as_str()
            .ok_or("a ledger that does not parse")?;
        let capacity = &ledger["capacity"];
        let (mut cpu, mut memory) = (0u64, 0u64);
        for allocation in ledger["admitted"].as_array().into_iter().flatten() {
            cpu += allocation["resources"]["cpu_millis"].as_u64().unwrap_or(0);
            memory += allocation["resources"]["memory_bytes"]
                .as_u64()
                .unwrap_or(0);
        }
        let cpu_capacity = capacity["cpu_millis"].as_u64().unwrap_or(0);
        let memory_capacity = capacity["memory_bytes"].as_u64().unwrap_or(0);
        if cpu > cpu_capacity || memory > memory_capacity || cpu_capacity > CPU_PER_NODE {
            return Err(format!(
                "ledger of {node} over-committed: {cpu} of {cpu_capacity} CPU millis, {memory} of \
                 {memory_capacity} bytes: {ledger}"
            ));
        }
    }
    Ok(())
}

/// Where each admitted task is, by ledger; a task in two ledgers appears twice.
fn admitted(ledgers: &[Json]) -> Vec<(String, String)> {
    let mut placed = Vec::new();
    for ledger in ledgers {
        let node = ledger["node"].as_str().unwrap_or("?").to_owned();
        for allocation in ledger["admitted"].as_array().into_iter().flatten() {
            let task = allocation["task"].as_str().unwrap_or("?").to_owned();
            placed.push((task, node.clone()));
        }
    }
    placed.sort();
    placed
}

/// After healing: within `bound`, every agent holds the same ledgers, no task is admitted by
/// two machines, and every task of every job that exists is admitted (they all fit).
pub fn check_converged(
    addrs: &[SocketAddr],
    log: &SchedulingLog,
    bound: Duration,
) -> Vec<Violation> {
    let mut violations: Vec<Violation> = log
        .violations
        .iter()
        .map(|detail| Violation {
            check: "no machine is ever over-committed",
            detail: detail.clone(),
            ops: Vec::new(),
        })
        .collect();
    let deadline = Instant::now() + bound;
    let problem = loop {
        let problem = settled(addrs, log);
        match problem {
            None => break None,
            Some(problem) if Instant::now() > deadline => break Some(problem),
            Some(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    if let Some(detail) = problem {
        violations.push(Violation {
            check: "every task admitted exactly once after healing",
            detail,
            ops: Vec::new(),
        });
    }
    violations
}

/// What keeps the scheduling state from being settled, if anything.
fn settled(addrs: &[SocketAddr], log: &SchedulingLog) -> Option<String> {
    let mut views = Vec::new();
    for (node, addr) in addrs.iter().enumerate() {
        let Some(listing) = ledgers(*addr) else {
            return Some(format!("agent {node} does not answer"));
        };
        if let Err(err) = check_capacity(&listing) {
            return Some(format!("agent {node}: {err}"));
        }
        views.push(admitted(&listing));
    }
    if let Some(node) = views.iter().position(|view| *view != views[0]) {
        return Some(format!(
            "agents 0 and {node} hold different ledgers: {:?} / {:?}",
            views[0], views[node]
        ));
    }
    let mut machines: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (task, node) in &views[0] {
        machines.entry(task).or_default().push(node);
    }
    if let Some((task, nodes)) = machines.iter().find(|(_, nodes)| nodes.len() > 1) {
        return Some(format!("task {task} is admitted on {nodes:?}"));
    }
    let jobs: BTreeSet<String> = log
        .submitted
        .iter()
        .chain(&log.indeterminate)
        .cloned()
        .collect();
    for job in &jobs {
        let path = format!("/v1/jobs/{job}");
        let Ok(response) = request_once(addrs[0], "GET", &path, b"") else {
            return Some("agent 0 does not answer".to_owned());
        };
        let acknowledged = log.submitted.contains(job);
        match response.status {
            404 if !acknowledged => continue,
            200 => {}
            status => {
                return Some(format!(
                    "job {job} (acknowledged: {acknowledged}): {status}"
                ));
            }
        }
        let Ok(status) = serde_json::from_slice::<Json>(&response.body) else {
            return Some(format!("job {job}: an answer that is not JSON"));
        };
        if status["admitted"].as_u64() != Some(TASKS_PER_JOB) {
            return Some(format!("job {job} is not fully admitted: {status}"));
        }
    }
    None
}
