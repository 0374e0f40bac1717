//! The embedded library end to end: real nodes over QUIC with mutual TLS on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use mantissa::crdt::{Change, Value};
use mantissa::runtime::{ClusterCa, Handle, HandleError, NodeConfig, TlsConfig, start};

const PATIENCE: Duration = Duration::from_secs(20);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

fn tls(ca: &ClusterCa, name: &str) -> TlsConfig {
    let node = ca.issue(name, Duration::from_secs(3600)).expect("issue");
    TlsConfig::new(ca.cert_pem(), &node).expect("tls config")
}

async fn cluster(ca: &ClusterCa, names: &[&str]) -> Vec<Handle> {
    let first = start(NodeConfig::new(any_port(), tls(ca, names[0]), vec![]))
        .await
        .expect("start");
    let seeds = vec![first.addr()];
    let mut nodes = vec![first];
    for name in &names[1..] {
        let node = start(NodeConfig::new(any_port(), tls(ca, name), seeds.clone()))
            .await
            .expect("start");
        nodes.push(node);
    }
    nodes
}

async fn wait_members(node: &Handle, count: usize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let members = node.members().await.expect("members");
        if members.len() >= count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} sees {} members, expected {count}",
            node.name(),
            members.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_one_node_are_watched_and_read_on_the_others() {
    let ca = ClusterCa::generate("test").expect("ca");
    let nodes = cluster(&ca, &["node-a", "node-b", "node-c"]).await;
    for node in &nodes {
        wait_members(node, 2).await;
    }
    let mut watch = nodes[2].watch("jobs/", None).await.expect("watch");
    let token = nodes[0].put("jobs/web", "v1").await.expect("put");
    let counter = nodes[1].counter_add("jobs/count", 5).await.expect("add");

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(PATIENCE, watch.next())
            .await
            .expect("an event within the patience")
            .expect("node running")
            .expect("no watch error");
        seen.push((event.key.to_string(), event.change));
    }
    assert!(seen.iter().any(|(key, change)| key == "jobs/web"
        && matches!(change, Change::Put(Value::Register(r)) if r.value == b"v1")));
    assert!(
        seen.iter()
            .any(|(key, change)| key == "jobs/count" && *change == Change::Put(Value::Counter(5)))
    );

    for node in &nodes {
        node.wait_for(&token, PATIENCE).await.expect("covered");
        node.wait_for(&counter, PATIENCE).await.expect("covered");
        let listed = node.list("jobs/", 10).await.expect("list");
        assert_eq!(listed.len(), 2, "{} lists {listed:?}", node.name());
    }
    for node in nodes {
        node.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_foreign_certificate_cannot_join() {
    let ca = ClusterCa::generate("test").expect("ca");
    let nodes = cluster(&ca, &["node-a", "node-b"]).await;
    wait_members(&nodes[0], 1).await;

    let other_ca = ClusterCa::generate("other").expect("ca");
    let intruder = start(NodeConfig::new(
        any_port(),
        tls(&other_ca, "node-x"),
        vec![nodes[0].addr()],
    ))
    .await
    .expect("start");
    let legit = start(NodeConfig::new(
        any_port(),
        tls(&ca, "node-c"),
        vec![nodes[0].addr()],
    ))
    .await
    .expect("start");
    wait_members(&legit, 2).await;
    nodes[0].put("k", "v").await.expect("put");
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert!(intruder.members().await.expect("members").is_empty());
    assert!(intruder.get("k").await.expect("get").is_none());
    let members: Vec<String> = nodes[0]
        .members()
        .await
        .expect("members")
        .into_iter()
        .map(|m| m.name.to_string())
        .collect();
    assert!(!members.contains(&"node-x".to_string()), "{members:?}");
    assert!(members.contains(&"node-c".to_string()), "{members:?}");
    for node in nodes.iter().chain([&intruder, &legit]) {
        node.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_an_unknown_write_times_out_with_a_clear_error() {
    let ca = ClusterCa::generate("test").expect("ca");
    let nodes = cluster(&ca, &["node-a"]).await;
    let token = "01010a07"
        .parse()
        .expect("a token naming write 7 of node 10");
    let err = nodes[0]
        .wait_for(&token, Duration::from_millis(200))
        .await
        .expect_err("never covered");
    assert!(matches!(err, HandleError::Timeout(_)), "{err}");
    assert!(
        nodes[0].put("", "v").await.is_err(),
        "an empty key is refused"
    );
    nodes[0].shutdown().await.expect("shutdown");
}
