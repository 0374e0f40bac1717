//! Leaderless scheduling end to end: three real `mantissa agent --scheduler` processes, a job
//! submitted through the CLI, every task admitted exactly once within each node's capacity, all
//! nodes agreeing; then a node killed with `kill -9` has its tasks re-placed on the others, and
//! once restarted from its data directory it catches up and the cluster still holds each task
//! exactly once.
//!
//! Nothing asserts on timing: every wait is a generous deadline.

#[path = "support/agent.rs"]
mod agent;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::Duration;

use serde_json::Value as Json;

use agent::{Cluster, NodeSpec, PATIENCE, eventually};

const BINARY: &str = env!("CARGO_BIN_EXE_mantissa");
const CPU_PER_NODE: u64 = 2_000;
const TASKS: usize = 30;
const CPU_PER_TASK: u64 = 120;

/// Where each task runs, as node `node` sees it, once its allocations cover `TASKS` tasks.
fn placements(cluster: &Cluster, node: usize) -> Option<BTreeMap<String, String>> {
    let body = cluster.read(node, "/v1/allocations?job=web", None)?;
    let placed: BTreeMap<String, String> = body["allocations"]
        .as_array()?
        .iter()
        .map(|a| (text(&a["task"]), text(&a["node"])))
        .collect();
    (placed.len() == TASKS).then_some(placed)
}

fn text(value: &Json) -> String {
    value.as_str().unwrap_or("?").to_owned()
}

/// No node's ledger, as node `node` sees it, admits more than its capacity.
fn assert_within_capacity(cluster: &Cluster, node: usize) {
    let body = cluster.get_json(node, "/v1/nodes");
    for entry in body["nodes"].as_array().expect("a node list") {
        let used = entry["used"]["cpu_millis"].as_u64().expect("used CPU");
        let capacity = entry["record"]["capacity"]["cpu_millis"]
            .as_u64()
            .expect("capacity");
        assert!(
            used <= capacity,
            "{} over-committed as node {node} sees it: {entry}",
            entry["record"]["name"]
        );
    }
}

/// Waits until every running node in `nodes` sees the same placement of all tasks, with none on
/// `avoid`, and returns it.
fn converged(cluster: &Cluster, nodes: &[usize], avoid: Option<&str>) -> BTreeMap<String, String> {
    eventually(
        "every node sees the same placement of every task",
        PATIENCE * 2,
        Duration::from_millis(100),
        || {
            let seen: Vec<_> = nodes
                .iter()
                .map(|&node| placements(cluster, node))
                .collect::<Option<_>>()?;
            let first: &BTreeMap<String, String> = seen.first()?;
            let agreed = seen.iter().all(|placed| placed == first);
            let avoided = avoid.is_none_or(|gone| first.values().all(|n| n != gone));
            (agreed && avoided).then(|| first.clone())
        },
    )
}

#[test]
fn a_job_run_through_the_cli_is_admitted_once_within_capacity_and_survives_a_kill() {
    let mut cluster = Cluster::new(BINARY, "scheduling");
    let cpu = CPU_PER_NODE.to_string();
    for _ in 0..3 {
        cluster.add_node(NodeSpec {
            durable: true,
            extra_args: ["--scheduler", "--cpu-millis", &cpu, "--memory", "4GiB"]
                .map(str::to_owned)
                .to_vec(),
            ..NodeSpec::default()
        });
    }
    cluster.wait_formed();
    eventually(
        "every node sees three live offers",
        PATIENCE,
        Duration::from_millis(100),
        || {
            let body = cluster.get_json(0, "/v1/nodes");
            let live = body["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["live"] == true);
            (live.count() == 3).then_some(())
        },
    );

    // 30 tasks of 0.12 CPU: 3.6 CPUs, more than one node holds, less than two do.
    let spec = cluster.root().join("web.toml");
    fs::write(
        &spec,
        format!(
            "name = \"web\"\nstrategy = \"spread\"\n\n[[groups]]\nname = \"api\"\ncount = {TASKS}\n\
             resources = {{ cpu_millis = {CPU_PER_TASK}, memory_bytes = 67108864 }}\n"
        ),
    )
    .expect("write the job spec");
    let addr = format!("http://{}", cluster.agent(1).http);
    let spec_path = spec.display().to_string();
    let output = cluster.run_ok(&[
        "--addr",
        &addr,
        "job",
        "run",
        &spec_path,
        "--timeout",
        "60s",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("all {TASKS} tasks admitted")),
        "{stdout}"
    );

    let placed = converged(&cluster, &[0, 1, 2], None);
    let used: BTreeSet<&String> = placed.values().collect();
    assert_eq!(used.len(), 3, "spread uses every node: {placed:?}");
    for node in 0..3 {
        assert_within_capacity(&cluster, node);
    }
    let listing = cluster.run_ok(&["--addr", &addr, "alloc", "ls", "--job", "web"]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert_eq!(listing.lines().count(), TASKS + 1, "{listing}");
    let nodes = cluster.run_ok(&["--addr", &addr, "node", "ls"]);
    let nodes = String::from_utf8_lossy(&nodes.stdout);
    assert!(
        nodes.contains("node-2") && nodes.contains("live"),
        "{nodes}"
    );

    // kill -9 a node: membership declares it dead and its tasks are placed on the others.
    let victim = cluster.agent(2).name.clone();
    cluster.kill_9(2);
    converged(&cluster, &[0, 1], Some(&victim));
    for node in 0..2 {
        assert_within_capacity(&cluster, node);
    }

    // Restarted from its data directory, it catches up, gives up the tasks placed elsewhere
    // meanwhile, and every task is still held exactly once.
    cluster.start_node(2);
    let placed = converged(&cluster, &[0, 1, 2], None);
    assert_eq!(placed.len(), TASKS);
    for node in 0..3 {
        assert_within_capacity(&cluster, node);
    }
    let status = cluster.run_ok(&["--addr", &addr, "job", "status", "web"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!("{TASKS} admitted, 0 claimed, 0 pending")),
        "{status}"
    );
}

#[test]
fn the_cli_refuses_bad_job_specs_and_reserved_keys() {
    let mut cluster = Cluster::start(BINARY, "scheduling-errors", 1);
    let addr = format!("http://{}", cluster.agent(0).http);
    let bad = cluster.root().join("bad.toml");
    fs::write(&bad, "name = \"web\"\ngroups = []\n").expect("write");
    let bad_path = bad.display().to_string();
    let output = cluster.run(&["--addr", &addr, "job", "run", &bad_path]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("has no task group"), "{stderr}");

    let output = cluster.run(&["--addr", &addr, "kv", "put", "_sched/alloc/node-0", "{}"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reserved for scheduling"), "{stderr}");

    let output = cluster.run(&["--addr", &addr, "job", "status", "nope"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no job nope"));
}

/// What an operator reads: `node ls` shows the named resources a machine offers and uses, a
/// task that fits on no machine says why, a spec's `memory_bytes` takes a size like `--memory`,
/// and a misspelt field is refused by name.
#[test]
fn the_cli_shows_named_resources_and_why_a_task_fits_nowhere() {
    let mut cluster = Cluster::new(BINARY, "scheduling-explain");
    cluster.add_node(NodeSpec {
        extra_args: [
            "--scheduler",
            "--cpu-millis",
            "2000",
            "--memory",
            "4GiB",
            "--resource",
            "gpu=2",
            "--label",
            "zone=eu-1",
        ]
        .map(str::to_owned)
        .to_vec(),
        ..NodeSpec::default()
    });
    cluster.wait_formed();
    let addr = format!("http://{}", cluster.agent(0).http);
    let spec = cluster.root().join("web.toml");
    fs::write(
        &spec,
        "name = \"web\"\n\n\
         [[groups]]\nname = \"gpu\"\ncount = 1\n\
         resources = { cpu_millis = 100, memory_bytes = \"1GiB\", custom = { gpu = 1 } }\n\n\
         [[groups]]\nname = \"mars\"\ncount = 1\n\
         resources = { cpu_millis = 100, memory_bytes = 1024 }\n\
         constraints = { labels = { zone = \"mars\" } }\n",
    )
    .expect("write");
    let spec = spec.display().to_string();
    let output = cluster.run(&["--addr", &addr, "job", "run", "--detach", &spec]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let why = eventually(
        "the gpu task is admitted and the mars task says why it waits",
        PATIENCE,
        Duration::from_millis(200),
        || {
            let output = cluster.run(&["--addr", &addr, "job", "status", "web"]);
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            let gpu = text
                .lines()
                .any(|l| l.contains("web/gpu/0") && l.contains("admitted"));
            (gpu && text.contains("no label zone=mars")).then_some(text)
        },
    );
    assert!(why.contains("fits on no live machine"), "{why}");
    let output = cluster.run(&["--addr", &addr, "node", "ls"]);
    let nodes = String::from_utf8_lossy(&output.stdout);
    assert!(
        nodes.contains("RESOURCES") && nodes.contains("gpu=1/2"),
        "{nodes}"
    );

    let typo = cluster.root().join("typo.json");
    fs::write(
        &typo,
        r#"{"name": "web", "prority": 10, "groups": [{"name": "api", "count": 1,
            "resources": {"cpu_millis": 1}}]}"#,
    )
    .expect("write");
    let typo = typo.display().to_string();
    let output = cluster.run(&["--addr", &addr, "job", "run", &typo]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("prority"), "{stderr}");
}
