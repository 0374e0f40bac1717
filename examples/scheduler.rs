//! An orchestrator embedding mantissa's leaderless scheduler: three machines in one process,
//! each running the reference scheduler and offering its capacity. A job submitted on one
//! machine is placed across all three with no leader; each machine's agent learns what to run
//! by following its allocations (`Handle::watch_my_allocations`), and starts (here: prints) its
//! tasks.
//!
//! Run with `cargo run --release --example scheduler`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use mantissa::runtime::{
    ClusterCa, Handle, NodeConfig, Scheduler, SchedulerConfig, TlsConfig, start,
};
use mantissa::sched::{JobSpec, Name, NodeRecord, Resources, Strategy, TaskGroup};

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let ca = ClusterCa::generate("example")?;
    let any_port: SocketAddr = "127.0.0.1:0".parse()?;
    let mut machines: Vec<(Handle, Scheduler)> = Vec::new();
    for (name, cores) in [("node-a", 4), ("node-b", 2), ("node-c", 2)] {
        let identity = ca.issue(name, Duration::from_secs(24 * 3600))?;
        let tls = TlsConfig::new(ca.cert_pem(), &identity)?;
        let seeds = machines
            .first()
            .map(|(h, _)| vec![h.addr()])
            .unwrap_or_default();
        let node = start(NodeConfig::new(any_port, tls, seeds)).await?;
        // Every machine offers itself and also plans: any of them may place any task.
        let offer = NodeRecord::new(node.name().clone(), Resources::new(cores * 1000, 8 << 30))
            .label("zone", if name == "node-a" { "eu-1" } else { "eu-2" });
        let scheduler = node
            .run_scheduler(SchedulerConfig::new(true, Some(offer)))
            .await?;
        machines.push((node, scheduler));
    }

    // Each machine's agent follows its allocations: what its own ledger admitted, less any task
    // another machine won in a race.
    for (node, _) in &machines {
        let node = node.clone();
        tokio::spawn(async move { run_tasks(node).await });
    }

    // Wait until the three offers are known, then submit a job on node-b.
    let (submitter, _) = &machines[1];
    while submitter.scheduling().await?.nodes().len() < 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut job = JobSpec::new(Name::new("web")?)
        .group(TaskGroup::new(
            Name::new("api")?,
            6,
            Resources::new(500, 512 << 20),
        ))
        .group(TaskGroup::new(
            Name::new("cache")?,
            2,
            Resources::new(1000, 1 << 30),
        ));
    job.strategy = Strategy::Spread;
    submitter.submit_job(&job).await?;
    println!("node-b submitted job web: 6 api tasks and 2 cache tasks");

    // Any machine answers how the job stands, from its own replica.
    let (observer, _) = &machines[2];
    let status = loop {
        let state = observer.scheduling().await?;
        // The job reaches node-c by gossip; until then node-c does not know it.
        if let Some(status) = state.job(&job.name)
            && status.admitted == status.tasks.len()
        {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("node-c sees all {} tasks admitted:", status.tasks.len());
    for state in observer.scheduling().await?.nodes() {
        println!(
            "  {}: {} tasks, {} of {} CPU millis",
            state.record.name,
            state.allocations,
            state.used.cpu_millis,
            state.record.capacity.cpu_millis
        );
    }

    // Stop scheduling everywhere first: a machine that leaves while the others still schedule
    // has its tasks re-placed on them, as it should in production.
    let mut nodes = Vec::new();
    for (node, scheduler) in machines {
        scheduler.stop().await;
        nodes.push(node);
    }
    for node in nodes {
        node.shutdown().await?;
    }
    Ok(())
}

/// What an orchestrator's node agent does: start the tasks this machine wins, stop the ones it
/// no longer wins.
///
/// Two schedulers that race can have one task admitted by two machines, each before it hears
/// of the other. Every replica picks the same winner (the earlier admission), so the loser
/// stops its copy as soon as it sees the winner's ledger: the window where a task runs twice.
/// A task that must never run twice fences on its allocation id before it acts.
async fn run_tasks(node: Handle) -> Result<(), mantissa::runtime::HandleError> {
    let mut allocations = node.watch_my_allocations().await?;
    let mut running = BTreeSet::new();
    while let Some(current) = allocations.next().await {
        let wanted: BTreeSet<String> = current?
            .into_iter()
            .map(|allocation| allocation.task.to_string())
            .collect();
        for task in wanted.difference(&running) {
            println!("{}: start {task}", node.name());
        }
        for task in running.difference(&wanted) {
            println!("{}: stop {task}", node.name());
        }
        running = wanted;
    }
    Ok(())
}
