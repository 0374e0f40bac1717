//! Leaderless scheduling on real embedded nodes (QUIC, mutual TLS, 127.0.0.1): every node runs
//! the scheduler loop and offers its machine; jobs submitted anywhere are admitted exactly once
//! within capacity, and re-placed when a machine leaves.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use mantissa::gossip::MemberName;
use mantissa::runtime::{
    AllocationWatch, ClusterCa, Handle, HandleError, NodeConfig, Scheduler, SchedulerConfig,
    TlsConfig, start,
};
use mantissa::sched::{
    Allocation, JobSpec, Name, NodeRecord, Resources, SchedError, Strategy, TaskGroup,
};

const PATIENCE: Duration = Duration::from_secs(30);
const CPU_PER_NODE: u64 = 4_000;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

fn tls(ca: &ClusterCa, name: &str) -> TlsConfig {
    let node = ca.issue(name, Duration::from_secs(3600)).expect("issue");
    TlsConfig::new(ca.cert_pem(), &node).expect("tls config")
}

fn name(text: &str) -> Name {
    Name::new(text).expect("valid name")
}

/// Starts the nodes, each running the scheduler loop and offering 4 CPUs and 8 GiB.
async fn cluster(ca: &ClusterCa, names: &[&str]) -> Vec<(Handle, Scheduler)> {
    let mut nodes = Vec::new();
    let mut seeds = Vec::new();
    for node_name in names {
        let handle = start(NodeConfig::new(
            any_port(),
            tls(ca, node_name),
            seeds.clone(),
        ))
        .await
        .expect("start");
        seeds = vec![
            nodes
                .first()
                .map_or(handle.addr(), |(h, _): &(Handle, _)| h.addr()),
        ];
        let offer = NodeRecord::new(handle.name().clone(), Resources::new(CPU_PER_NODE, 8 << 30));
        let scheduler = handle
            .run_scheduler(SchedulerConfig::new(true, Some(offer)))
            .await
            .expect("scheduler starts");
        nodes.push((handle, scheduler));
    }
    nodes
}

/// Waits until `node` sees `count` live machines offering themselves.
async fn wait_offers(node: &Handle, count: usize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let state = node.scheduling().await.expect("reads");
        if state.nodes().iter().filter(|n| n.live).count() >= count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never saw {count} live offers: {:?}",
            node.name(),
            state.nodes()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `node` sees every task of `job` admitted, and returns where each runs.
async fn wait_admitted(node: &Handle, job: &Name, count: usize) -> BTreeMap<String, MemberName> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let state = node.scheduling().await.expect("reads");
        if let Some(status) = state.job(job)
            && status.admitted == count
        {
            return state
                .allocations()
                .into_iter()
                .filter(|allocation| allocation.task.job == *job)
                .map(|allocation| (allocation.task.to_string(), allocation.node))
                .collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never saw {count} tasks of {job} admitted: {:?}",
            node.name(),
            state.job(job).map(|s| (s.admitted, s.claimed, s.pending))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// No machine's ledger admits more than its capacity, as `node` sees the ledgers.
/// Reads `watch` until a list satisfies `done`; each change must come within [`PATIENCE`].
async fn watch_until(watch: &mut AllocationWatch, done: impl Fn(&[Allocation]) -> bool) {
    loop {
        let list = tokio::time::timeout(PATIENCE, watch.next())
            .await
            .expect("the watch answers a change")
            .expect("open")
            .expect("reads");
        if done(&list) {
            return;
        }
    }
}

async fn assert_within_capacity(node: &Handle) {
    let state = node.scheduling().await.expect("reads");
    for (machine, ledger) in &state.view.ledgers {
        let used = ledger.used();
        assert!(
            used.cpu_millis <= ledger.capacity.cpu_millis
                && used.memory_bytes <= ledger.capacity.memory_bytes,
            "{machine} over-committed: {used:?} of {:?}",
            ledger.capacity
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_anywhere_is_admitted_once_within_capacity_and_replaced_after_a_leave() {
    let ca = ClusterCa::generate("test").expect("ca");
    let nodes = cluster(&ca, &["node-a", "node-b", "node-c"]).await;
    // 24 tasks of 0.3 CPU: more than one machine holds (4 CPUs = 13 tasks), fewer than two do.
    let job = name("web");
    let mut spec = JobSpec::new(job.clone()).group(TaskGroup::new(
        name("api"),
        24,
        Resources::new(300, 64 << 20),
    ));
    // Spread: every machine gets tasks, so the one that leaves had some to give back.
    spec.strategy = Strategy::Spread;
    wait_offers(&nodes[1].0, 3).await;
    // node-a's agent follows what it should run.
    let mut watch = nodes[0].0.watch_my_allocations().await.expect("watches");
    let first = watch.next().await.expect("open").expect("reads");
    assert!(first.is_empty(), "nothing submitted yet: {first:?}");
    nodes[1].0.submit_job(&spec).await.expect("submits");

    let mut placements = Vec::new();
    for (handle, _) in &nodes {
        placements.push(wait_admitted(handle, &job, 24).await);
        assert_within_capacity(handle).await;
    }
    // Every replica computes the same allocations, each task on one machine.
    assert!(placements.windows(2).all(|pair| pair[0] == pair[1]));
    assert_eq!(placements[0].len(), 24);
    let me = nodes[0].0.name().clone();
    let held_by_me = placements[0].values().filter(|m| **m == me).count();
    assert!(held_by_me > 0, "spread gives every machine tasks");
    // The watch answers each change; it reaches node-a's share, and only node-a's tasks.
    watch_until(&mut watch, |list| {
        assert!(list.iter().all(|allocation| allocation.node == me));
        list.len() == held_by_me
    })
    .await;

    // A machine leaves: its tasks go back to pending and are placed on the others.
    let mut nodes = nodes;
    let (leaving, scheduler) = nodes.pop().expect("three nodes");
    let gone = leaving.name().clone();
    let held = placements[0].values().filter(|m| **m == gone).count();
    assert!(
        held > 0,
        "spread gives every machine tasks: {:?}",
        placements[0]
    );
    scheduler.stop().await;
    leaving.shutdown().await.expect("shuts down");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let placed = wait_admitted(&nodes[0].0, &job, 24).await;
        if placed.values().all(|machine| *machine != gone) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tasks on {gone} were never re-placed: {placed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (handle, _) in &nodes {
        let placed = wait_admitted(handle, &job, 24).await;
        assert!(placed.values().all(|machine| *machine != gone));
        assert_within_capacity(handle).await;
    }
    let mine = nodes[0].0.my_allocations().await.expect("reads");
    assert!(!mine.is_empty() && mine.iter().all(|a| a.node == *nodes[0].0.name()));
    // The watch follows the re-placement too.
    watch_until(&mut watch, |list| list == mine.as_slice()).await;
    // Together: a node that shuts down after its peers waits for them in vain.
    let mut stops = tokio::task::JoinSet::new();
    for (handle, scheduler) in nodes {
        stops.spawn(async move {
            scheduler.stop().await;
            handle.shutdown().await.expect("shuts down");
        });
    }
    while let Some(stopped) = stops.join_next().await {
        stopped.expect("stops");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduling_keys_are_written_only_through_the_scheduling_api() {
    let ca = ClusterCa::generate("test").expect("ca");
    let node = start(NodeConfig::new(any_port(), tls(&ca, "node-a"), vec![]))
        .await
        .expect("start");
    let refused = node.put("_sched/alloc/node-a", "{}").await;
    assert!(
        matches!(refused, Err(HandleError::Reserved { .. })),
        "{refused:?}"
    );
    let refused = node.counter_add("_sched/jobs/x", 1).await;
    assert!(matches!(refused, Err(HandleError::Reserved { .. })));
    assert!(node.put("nodes/node-a", "mine").await.is_ok());

    let other = MemberName::new("node-b").expect("valid");
    let record = NodeRecord::new(other, Resources::new(1_000, 1 << 30));
    let refused = node.register_node(&record).await;
    assert!(
        matches!(
            refused,
            Err(HandleError::Sched(SchedError::NotOwner { .. }))
        ),
        "{refused:?}"
    );
    let invalid = JobSpec::new(name("empty"));
    assert!(matches!(
        node.submit_job(&invalid).await,
        Err(HandleError::Sched(SchedError::InvalidJob(_)))
    ));
    node.shutdown().await.expect("shuts down");
}
