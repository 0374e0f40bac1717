//! Memory stays bounded in bytes under large-value churn, with watchers that stop reading: real
//! `mantissa` agents, measured by the kernel's count of their resident memory.
//!
//! Two in-memory agents; 50 keys are overwritten with 1 MiB values (50 MiB of live data) on the
//! first, 3,000 writes in all, while four watchers on each agent open a stream and never read it.
//! Without byte budgets every write left about 2 MiB behind (the change feed and the recent-writes
//! buffer each kept a copy) and each stalled watcher queued up to 4,096 values: gigabytes. The
//! bound checked is the one operators are promised: resident memory at most twice the live data
//! plus the buffer budget (`--buffer-memory`, 256 MiB by default). It is a correctness bound
//! with ample slack, not a timing.

#[path = "support/agent.rs"]
mod agent;

use std::time::{Duration, Instant};

use agent::{Cluster, HttpConnection, NodeSpec, PATIENCE};

const BINARY: &str = env!("CARGO_BIN_EXE_mantissa");

const KEYS: usize = 50;
const ROUNDS: usize = 60;
const VALUE: usize = 1 << 20;
const BUFFER_BUDGET: u64 = 256 << 20;
const STALLED_PER_AGENT: usize = 4;

/// The agent's resident memory, from `/proc/<pid>/status`.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|err| panic!("read /proc/{pid}/status: {err}"));
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}

#[test]
fn large_value_churn_with_stalled_watchers_stays_within_the_memory_bound() {
    let mut cluster = Cluster::new(BINARY, "memory");
    for _ in 0..2 {
        cluster.add_node(NodeSpec {
            durable: false,
            ..NodeSpec::default()
        });
    }
    cluster.wait_formed();
    let pids: Vec<u32> = (0..2)
        .map(|node| cluster.pid(node).expect("running"))
        .collect();

    // Opened and never read: their queues fill and the node must stop queueing for them.
    let mut stalled: Vec<_> = (0..2)
        .flat_map(|node| (0..STALLED_PER_AGENT).map(move |_| node))
        .map(|node| cluster.watch(node, "/v1/watch?prefix=churn/"))
        .collect();

    let mut http = HttpConnection::new(cluster.agent(0).http);
    let live = (KEYS * VALUE) as u64;
    let bound = 2 * live + BUFFER_BUDGET;
    let mut peak = [0u64; 2];
    for round in 0..ROUNDS {
        for key in 0..KEYS {
            let value = vec![b'a' + ((round + key) % 26) as u8; VALUE];
            let response = http
                .request("PUT", &format!("/v1/kv/churn/{key:02}"), &value)
                .expect("put");
            assert_eq!(response.status, 200, "{}", response.text());
        }
        for (node, pid) in pids.iter().enumerate() {
            peak[node] = peak[node].max(resident_bytes(*pid));
        }
    }
    // The second agent has applied everything once it holds the last write.
    let last = format!("churn/{:02}", KEYS - 1);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let response = cluster.http(1, "GET", &format!("/v1/kv/{last}?raw"), b"");
        let expected = b'a' + ((ROUNDS - 1 + KEYS - 1) % 26) as u8;
        if response.status == 200 && response.body.first() == Some(&expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second agent never caught up: {} {:?}\nstatus 0: {}\nstatus 1: {}",
            response.status,
            response.body.first(),
            cluster.get_json(0, "/v1/status"),
            cluster.get_json(1, "/v1/status")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (node, pid) in pids.iter().enumerate() {
        peak[node] = peak[node].max(resident_bytes(*pid));
    }
    let mib = |bytes: u64| bytes >> 20;
    println!(
        "peak resident memory: {} MiB and {} MiB (bound {} MiB: 2 x {} MiB live + {} MiB budget)",
        mib(peak[0]),
        mib(peak[1]),
        mib(bound),
        mib(live),
        mib(BUFFER_BUDGET)
    );
    for (node, peak) in peak.iter().enumerate() {
        assert!(
            *peak <= bound,
            "agent {node} reached {} MiB resident, above the bound of {} MiB",
            mib(*peak),
            mib(bound)
        );
    }

    // The node says where the memory is, and that it paused the stalled watchers.
    let status = cluster.get_json(0, "/v1/status");
    let buffers = &status["buffers"];
    for name in [
        "change_feed",
        "recent_writes",
        "held_back",
        "watchers",
        "peer_queues",
    ] {
        let buffer = &buffers[name];
        let (bytes, budget) = (buffer["bytes"].as_u64(), buffer["budget"].as_u64());
        assert!(
            bytes.is_some() && budget.is_some_and(|budget| budget > 0),
            "{name} in {buffers}"
        );
    }
    assert_eq!(
        buffers["watchers_paused"].as_u64(),
        Some(STALLED_PER_AGENT as u64),
        "{buffers}"
    );
    let metrics = cluster.http(0, "GET", "/metrics", b"").text();
    assert!(
        metrics.contains("mantissa_buffer_bytes{buffer=\"change_feed\"}"),
        "{metrics}"
    );

    // A stalled reader that comes back gets what was queued for it, in order, then a last line
    // saying it fell behind what the node keeps — never a silent gap.
    let watch = &mut stalled[0];
    let deadline = Instant::now() + PATIENCE;
    let mut cursors = Vec::new();
    let last_line = loop {
        let line = watch
            .next_line(deadline)
            .expect("the stream ends with a line that says why");
        if let Some(cursor) = line.get("cursor").and_then(|c| c.as_u64()) {
            cursors.push(cursor);
        } else if line.get("error").is_some() {
            break line;
        }
    };
    assert_eq!(last_line["error"]["code"], "compacted", "{last_line}");
    assert!(
        cursors.windows(2).all(|pair| pair[0] < pair[1]),
        "{cursors:?}"
    );
    assert!(cursors.len() < KEYS * ROUNDS, "{} events", cursors.len());
}
